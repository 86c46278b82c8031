//! Z-HOP's inner packets (`wraithgate_relay::inner`) against an independent reading of
//! RFC 791 (IPv4), RFC 8200 (IPv6), RFC 768 (UDP) and RFC 1071 (the Internet checksum).
//!
//! Once the relay has decrypted a provisioned peer's outer packet, what is inside is
//! whatever that peer chose to put there: the parser must accept exactly the IP/UDP
//! packets the RFCs describe (and refuse fragments and anything but UDP), and a reply the
//! relay builds must carry checksums that any stack accepts. The checksum here is written
//! from RFC 1071 §4.1 with 64-bit accumulation, not from the relay's code, so a mistake
//! both could share is unlikely.
//!
//! The input is one packet, except that its first byte picks what it is checked as: an
//! arbitrary datagram (odd), or (even) a well-formed packet built from the rest by
//! [`Input`] so the fuzzer spends its time past the parser's first refusals.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use wraithgate_relay::inner::{build_udp, checksums_ok, parse_udp, InnerError};

use crate::Input;

/// What the packet is, read from the RFCs alone: source, destination, and where the UDP
/// payload lies. The order of the refusals is the parser's documented one: a header that
/// does not fit, then fragments, then protocols other than UDP, then a UDP header that does
/// not fit.
pub(crate) fn classify(p: &[u8]) -> Result<(SocketAddr, SocketAddr, usize, usize), InnerError> {
    let Some(&first) = p.first() else {
        return Err(InnerError::Malformed);
    };
    let (src, dst, udp_start, udp_end) = if first >> 4 == 4 {
        // RFC 791 §3.1: IHL counts 32-bit words, at least 5; Total Length covers header and
        // data; flags bit 2 is More Fragments, then a 13-bit fragment offset.
        if p.len() < 20 {
            return Err(InnerError::Malformed);
        }
        let header = 4 * usize::from(first & 0xf);
        let total = usize::from(p[2]) << 8 | usize::from(p[3]);
        if header < 20 || total < header || total > p.len() {
            return Err(InnerError::Malformed);
        }
        let more_fragments = p[6] & 0x20 != 0;
        let offset = (usize::from(p[6] & 0x1f) << 8) | usize::from(p[7]);
        if more_fragments || offset != 0 {
            return Err(InnerError::Fragment);
        }
        if p[9] != 17 {
            return Err(InnerError::NotUdp);
        }
        let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        (IpAddr::V4(src), IpAddr::V4(dst), header, total)
    } else if first >> 4 == 6 {
        // RFC 8200 §3: a fixed 40-byte header; Payload Length counts what follows it;
        // Next Header 17 is UDP (extension headers are not followed).
        if p.len() < 40 {
            return Err(InnerError::Malformed);
        }
        let payload = usize::from(p[4]) << 8 | usize::from(p[5]);
        if p.len() - 40 < payload {
            return Err(InnerError::Malformed);
        }
        if p[6] != 17 {
            return Err(InnerError::NotUdp);
        }
        let address = |at: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&p[at..at + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        (address(8), address(24), 40, 40 + payload)
    } else {
        return Err(InnerError::Malformed);
    };
    // RFC 768: Length counts the 8-byte header and the data.
    let udp = &p[udp_start..udp_end];
    if udp.len() < 8 {
        return Err(InnerError::Malformed);
    }
    let length = usize::from(udp[4]) << 8 | usize::from(udp[5]);
    if length < 8 || length > udp.len() {
        return Err(InnerError::Malformed);
    }
    let port = |at: usize| u16::from(udp[at]) << 8 | u16::from(udp[at + 1]);
    Ok((
        SocketAddr::new(src, port(0)),
        SocketAddr::new(dst, port(2)),
        udp_start + 8,
        udp_start + length,
    ))
}

/// RFC 1071 §4.1: the one's-complement sum of the 16-bit big-endian words of `parts`
/// (taken as one stream, an odd final byte padded with zero), folded.
fn ones_complement_sum(parts: &[&[u8]]) -> u16 {
    let stream: Vec<u8> = parts.concat();
    let mut total: u64 = stream
        .chunks(2)
        .map(|w| u64::from(w[0]) << 8 | u64::from(w.get(1).copied().unwrap_or(0)))
        .sum();
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

/// Whether the UDP checksum of the datagram `udp` (header and data) verifies over its
/// pseudo-header: RFC 768 for IPv4, RFC 8200 §8.1 for IPv6.
fn udp_checksum_verifies(src: IpAddr, dst: IpAddr, udp: &[u8]) -> bool {
    let len = udp.len();
    let pseudo: Vec<u8> = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => [
            &s.octets()[..],
            &d.octets(),
            &[0, 17],
            &(len as u16).to_be_bytes(),
        ]
        .concat(),
        (IpAddr::V6(s), IpAddr::V6(d)) => [
            &s.octets()[..],
            &d.octets(),
            &(len as u32).to_be_bytes(),
            &[0, 0, 0, 17],
        ]
        .concat(),
        _ => return false,
    };
    ones_complement_sum(&[&pseudo, udp]) == 0xffff
}

pub fn check(data: &[u8]) {
    let (mode, rest) = data.split_first().unwrap_or((&1, &[]));
    let packet = if mode % 2 == 1 {
        rest.to_vec()
    } else {
        well_formed(rest)
    };
    let parsed = parse_udp(&packet);
    let expected = classify(&packet);
    let (src, dst, payload) = match (parsed, expected) {
        (Err(got), Err(want)) => {
            assert_eq!(got, want, "refused for the wrong reason");
            assert!(!checksums_ok(&packet), "checksums of a refused packet");
            return;
        }
        (Ok(p), Ok((src, dst, from, to))) => {
            assert_eq!((p.src, p.dst), (src, dst), "addresses");
            assert_eq!(p.payload, &packet[from..to], "payload");
            (src, dst, p.payload)
        }
        (got, want) => panic!("parser says {got:?}, the RFCs {want:?}"),
    };

    // A reply the relay builds from what it parsed: the stack at the other end must take it.
    let mut built = Vec::new();
    build_udp(&mut built, dst, src, payload);
    let (bsrc, bdst, from, to) = classify(&built).expect("a built packet is well formed");
    assert_eq!((bsrc, bdst), (dst, src), "built addresses");
    assert_eq!(&built[from..to], payload, "built payload");
    assert_eq!(to, built.len(), "nothing after the payload");
    let udp_start = from - 8;
    if built[0] >> 4 == 4 {
        assert_eq!(
            ones_complement_sum(&[&built[..20]]),
            0xffff,
            "IPv4 header checksum"
        );
        assert_ne!(built[8], 0, "a TTL that lets the packet leave");
    }
    assert!(
        udp_checksum_verifies(bsrc.ip(), bdst.ip(), &built[udp_start..]),
        "UDP checksum of the built packet"
    );
    // RFC 768: zero means "no checksum" (and is forbidden over IPv6): a computed zero is sent
    // as all ones.
    assert_ne!(
        &built[udp_start + 6..udp_start + 8],
        &[0, 0],
        "a built packet always carries a checksum"
    );
    assert!(
        checksums_ok(&built),
        "the relay's own verifier refuses its packet"
    );

    // The relay's verifier agrees with the RFCs on the input too (ignoring IPv4's optional
    // zero UDP checksum, which the verifier, meant for packets the relay built, refuses).
    let udp_start_in = from_udp_start(&packet);
    let udp_in = &packet[udp_start_in..udp_start_in + 8 + payload.len()];
    let header_ok =
        packet[0] >> 4 != 4 || ones_complement_sum(&[&packet[..udp_start_in]]) == 0xffff;
    let want = header_ok && udp_checksum_verifies(src.ip(), dst.ip(), udp_in);
    assert_eq!(checksums_ok(&packet), want, "checksum verdict on the input");
}

/// Where the UDP header of an accepted packet starts.
fn from_udp_start(p: &[u8]) -> usize {
    if p[0] >> 4 == 4 {
        4 * usize::from(p[0] & 0xf)
    } else {
        40
    }
}

/// A packet that parses, shaped by the input: family, addresses, ports, payload, and
/// sometimes IPv4 options or bytes after the datagram.
fn well_formed(data: &[u8]) -> Vec<u8> {
    let mut input = Input::new(data);
    let flags = input.u8();
    let v6 = flags & 1 != 0;
    let options = if v6 {
        0
    } else {
        usize::from(flags >> 1 & 3) * 4
    };
    let trailing = usize::from(flags >> 3 & 3);
    let (sport, dport) = (input.u16(), input.u16());
    let (src, dst): (IpAddr, IpAddr) = if v6 {
        let mut s = [0u8; 16];
        s.copy_from_slice(&pad::<16>(input.bytes(16)));
        let mut d = [0u8; 16];
        d.copy_from_slice(&pad::<16>(input.bytes(16)));
        (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into())
    } else {
        (
            Ipv4Addr::from(pad::<4>(input.bytes(4))).into(),
            Ipv4Addr::from(pad::<4>(input.bytes(4))).into(),
        )
    };
    let len = usize::from(input.u16()) % 1500;
    let payload = input.bytes(len).to_vec();
    let mut packet = Vec::new();
    build_udp(
        &mut packet,
        SocketAddr::new(src, sport),
        SocketAddr::new(dst, dport),
        &payload,
    );
    if options > 0 {
        // Options (NOPs) between the header and UDP: IHL and Total Length grow with them.
        packet.splice(20..20, std::iter::repeat_n(1u8, options));
        packet[0] = 0x40 | (5 + options / 4) as u8;
        let total = (packet.len() as u16).to_be_bytes();
        packet[2..4].copy_from_slice(&total);
    }
    packet.extend(std::iter::repeat_n(0xee, trailing));
    packet
}

fn pad<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out[..b.len()].copy_from_slice(b);
    out
}
