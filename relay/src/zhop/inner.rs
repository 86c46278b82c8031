//! IPv4/IPv6 UDP packets as they travel inside a WireGuard tunnel (Z-HOP's inner packets).
//!
//! Parsing checks what a forwarder must trust before acting: version, header length, total
//! length against the buffer, protocol, and the UDP length. Building fills in every
//! checksum (RFC 791 header checksum, RFC 768 / RFC 8200 §8.1 UDP checksum with the
//! pseudo-header), so the receiving stack accepts the packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why an inner packet was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InnerError {
    /// Not IPv4 or IPv6, or a header that does not fit.
    Malformed,
    /// A protocol other than UDP (or IPv6 extension headers, which Z-HOP does not follow).
    NotUdp,
    /// A fragment: WireGuard packets are never fragmented inside a tunnel.
    Fragment,
}

/// A parsed inner UDP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPacket<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

/// The source and destination of an IPv4 or IPv6 packet of any protocol (the Exit role's
/// cryptokey routing reads only these), or `None` when the header does not fit.
pub fn ip_addresses(ip: &[u8]) -> Option<(IpAddr, IpAddr)> {
    match ip.first()? >> 4 {
        4 if ip.len() >= 20 => Some((
            IpAddr::from([ip[12], ip[13], ip[14], ip[15]]),
            IpAddr::from([ip[16], ip[17], ip[18], ip[19]]),
        )),
        6 if ip.len() >= 40 => {
            let src: [u8; 16] = ip[8..24].try_into().ok()?;
            let dst: [u8; 16] = ip[24..40].try_into().ok()?;
            Some((IpAddr::from(src), IpAddr::from(dst)))
        }
        _ => None,
    }
}

/// The source of an IP packet ([`ip_addresses`]).
pub fn ip_source(ip: &[u8]) -> Option<IpAddr> {
    ip_addresses(ip).map(|a| a.0)
}

/// The destination of an IP packet ([`ip_addresses`]).
pub fn ip_destination(ip: &[u8]) -> Option<IpAddr> {
    ip_addresses(ip).map(|a| a.1)
}

/// Parses an IPv4 or IPv6 packet carrying UDP.
pub fn parse_udp(ip: &[u8]) -> Result<UdpPacket<'_>, InnerError> {
    let version = ip.first().ok_or(InnerError::Malformed)? >> 4;
    let (src, dst, udp) = match version {
        4 => {
            if ip.len() < 20 {
                return Err(InnerError::Malformed);
            }
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ihl < 20 || total < ihl || total > ip.len() {
                return Err(InnerError::Malformed);
            }
            // More-fragments flag or a non-zero offset.
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Err(InnerError::Fragment);
            }
            if ip[9] != 17 {
                return Err(InnerError::NotUdp);
            }
            let src = IpAddr::from([ip[12], ip[13], ip[14], ip[15]]);
            let dst = IpAddr::from([ip[16], ip[17], ip[18], ip[19]]);
            (src, dst, &ip[ihl..total])
        }
        6 => {
            if ip.len() < 40 {
                return Err(InnerError::Malformed);
            }
            let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if 40 + payload_len > ip.len() {
                return Err(InnerError::Malformed);
            }
            if ip[6] != 17 {
                return Err(InnerError::NotUdp);
            }
            let mut s = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            let mut d = [0u8; 16];
            d.copy_from_slice(&ip[24..40]);
            (
                IpAddr::from(Ipv6Addr::from(s)),
                IpAddr::from(Ipv6Addr::from(d)),
                &ip[40..40 + payload_len],
            )
        }
        _ => return Err(InnerError::Malformed),
    };
    if udp.len() < 8 {
        return Err(InnerError::Malformed);
    }
    let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if ulen < 8 || ulen > udp.len() {
        return Err(InnerError::Malformed);
    }
    Ok(UdpPacket {
        src: SocketAddr::new(src, u16::from_be_bytes([udp[0], udp[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([udp[2], udp[3]])),
        payload: &udp[8..ulen],
    })
}

/// Writes an IP/UDP packet from `src` to `dst` carrying `payload` into `out` (cleared
/// first), with all checksums. Both addresses must be of one family.
pub fn build_udp(out: &mut Vec<u8>, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
    out.clear();
    let udp_len = 8 + payload.len();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = 20 + udp_len;
            out.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
            out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            let ck = !fold(sum(&out[..20], 0));
            out[10..12].copy_from_slice(&ck.to_be_bytes());
            push_udp(out, src.port(), dst.port(), payload);
            let pseudo = sum(&s.octets(), sum(&d.octets(), 17 + udp_len as u32));
            finish_udp(out, 20, pseudo);
        }
        (s, d) => {
            let s = to_v6(s);
            let d = to_v6(d);
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(udp_len as u16).to_be_bytes());
            out.extend_from_slice(&[17, 64]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            push_udp(out, src.port(), dst.port(), payload);
            let pseudo = sum(&s.octets(), sum(&d.octets(), 17 + udp_len as u32));
            finish_udp(out, 40, pseudo);
        }
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

fn push_udp(out: &mut Vec<u8>, sport: u16, dport: u16, payload: &[u8]) {
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
}

fn finish_udp(out: &mut [u8], at: usize, pseudo: u32) {
    // RFC 768: a computed zero is sent as all ones (zero means "no checksum").
    let ck = match !fold(sum(&out[at..], pseudo)) {
        0 => 0xffff,
        c => c,
    };
    out[at + 6..at + 8].copy_from_slice(&ck.to_be_bytes());
}

/// One's-complement sum of 16-bit words (RFC 1071), not yet folded.
fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Whether the checksums of a packet made by [`build_udp`] (or anyone) verify.
pub fn checksums_ok(ip: &[u8]) -> bool {
    let Ok(p) = parse_udp(ip) else { return false };
    let (at, header_ok) = match ip[0] >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            (ihl, fold(sum(&ip[..ihl], 0)) == 0xffff)
        }
        _ => (40, true),
    };
    let udp = &ip[at..at + 8 + p.payload.len()];
    let pseudo = match (p.src.ip(), p.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum(&s.octets(), sum(&d.octets(), 17 + udp.len() as u32)),
        (s, d) => sum(
            &to_v6(s).octets(),
            sum(&to_v6(d).octets(), 17 + udp.len() as u32),
        ),
    };
    header_ok && fold(sum(udp, pseudo)) == 0xffff
}

/// An unspecified address of the family of `a`.
pub fn unspecified_like(a: &SocketAddr) -> IpAddr {
    match a {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn v4_and_v6_round_trip_with_valid_checksums() {
        for (s, d) in [
            ("10.0.0.2:40000", "192.0.2.1:51820"),
            ("[fd00::2]:40000", "[2001:db8::1]:51820"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            for len in [0usize, 1, 2, 3, 148, 1420] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let mut out = Vec::new();
                build_udp(&mut out, s, d, &payload);
                assert!(checksums_ok(&out), "{s} -> {d}, {len} bytes");
                let p = parse_udp(&out).unwrap();
                assert_eq!((p.src, p.dst, p.payload), (s, d, &payload[..]));
            }
        }
    }

    #[test]
    fn refuses_what_it_must_not_trust() {
        let mut good = Vec::new();
        build_udp(
            &mut good,
            "10.0.0.2:1".parse().unwrap(),
            "10.0.0.3:2".parse().unwrap(),
            b"x",
        );
        let mut tcp = good.clone();
        tcp[9] = 6;
        assert_eq!(parse_udp(&tcp), Err(InnerError::NotUdp));
        let mut frag = good.clone();
        frag[6] = 0x20;
        assert_eq!(parse_udp(&frag), Err(InnerError::Fragment));
        let mut long = good.clone();
        long[2..4].copy_from_slice(&500u16.to_be_bytes());
        assert_eq!(parse_udp(&long), Err(InnerError::Malformed));
        assert_eq!(parse_udp(&good[..25]), Err(InnerError::Malformed));
        assert_eq!(parse_udp(&[0x50; 40]), Err(InnerError::Malformed));
        assert_eq!(parse_udp(&[]), Err(InnerError::Malformed));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_udp(&bytes);
            let _ = checksums_ok(&bytes);
        }
    }
}
