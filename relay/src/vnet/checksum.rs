//! The Internet checksum (RFC 1071) as split and coalesce need it: sums of regions that
//! always start at an even offset of the packet, so they can be added together.

/// The one's-complement sum of `data` added to `acc`, not yet folded. Eight bytes at a
/// time with the end-around carry: 2^64 ≡ 1 (mod 2^16 - 1), so summing big-endian 64-bit
/// words is summing the 16-bit words. An odd last byte is the high byte of a zero-padded
/// word, as RFC 1071 says.
pub(crate) fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut add = |w: u64| {
        let (s, carry) = acc.overflowing_add(w);
        acc = s + u64::from(carry);
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        add(u64::from_be_bytes(w));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        add(u64::from_be_bytes(w));
    }
    acc
}

/// Folds a sum to 16 bits (not complemented).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The checksum to store for a region whose sum (pseudo-header included) is `acc`: its
/// complement, with 0 sent as 0xffff (for UDP 0 would mean "no checksum"; for TCP the two
/// are the same number in one's complement).
pub(crate) fn finish(acc: u64) -> u16 {
    match !fold(acc) {
        0 => 0xffff,
        c => c,
    }
}

/// The pseudo-header sum (RFC 768/793 for IPv4, RFC 8200 §8.1 for IPv6) of a transport
/// segment of `len` bytes between the addresses of `ip` (an IPv4 or IPv6 header).
pub(crate) fn pseudo_header(ip: &[u8], v6: bool, proto: u8, len: usize) -> u64 {
    let addrs = if v6 { &ip[8..40] } else { &ip[12..20] };
    sum(addrs, u64::from(proto) + len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook 16-bit loop, to check the 64-bit one against.
    fn naive(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for (i, b) in data.iter().enumerate() {
            acc += if i % 2 == 0 {
                u32::from(*b) << 8
            } else {
                u32::from(*b)
            };
        }
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        acc as u16
    }

    #[test]
    fn matches_the_sixteen_bit_loop_at_every_length() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7919 % 251) as u8 ^ 0xa5).collect();
        for len in 0..data.len() {
            assert_eq!(fold(sum(&data[..len], 0)), naive(&data[..len]), "len {len}");
        }
        let ones = [0xffu8; 64];
        assert_eq!(fold(sum(&ones, 0)), 0xffff);
    }

    #[test]
    fn rfc_1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        assert_eq!(
            fold(sum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0)),
            0xddf2
        );
    }
}
