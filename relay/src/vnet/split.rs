//! Split: one read from the TUN (a `virtio_net_hdr` and the packet it describes) into the
//! MTU-sized IP packets it stands for, each in a caller's buffer.

use thiserror::Error;

use super::checksum::{finish, fold, pseudo_header, sum};
use super::hdr::{Gso, HdrError, VirtioNetHdr, TCP_CSUM_OFFSET, UDP_CSUM_OFFSET, VNET_HDR_LEN};
use super::{IPPROTO_TCP, IPPROTO_UDP, TCP_CWR, TCP_FIN, TCP_PSH};

/// Why a read from the TUN could not be split. Each is a reason to drop the read and
/// count it ([`SplitError::as_str`] names it for counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SplitError {
    #[error(transparent)]
    Header(#[from] HdrError),
    #[error("the IP header is truncated")]
    TruncatedIp,
    #[error("IP version {0} does not go with the gso_type")]
    IpVersion(u8),
    #[error("IPv4 header length {0} is below 20 or beyond the packet")]
    BadIpv4HeaderLength(usize),
    #[error("the IP length fields say {said} bytes, the read has {read}")]
    LengthMismatch { said: usize, read: usize },
    #[error("an IPv4 fragment cannot be segmented")]
    Fragment,
    #[error("protocol {0} does not go with the gso_type (IPv6 extension headers included)")]
    ProtocolMismatch(u8),
    #[error("the transport header is truncated")]
    TruncatedTransport,
    #[error("TCP header length {0} is below 20 or beyond the packet")]
    BadTcpHeaderLength(usize),
    #[error("csum_start {start}/csum_offset {offset} do not point at the transport checksum")]
    ChecksumOffsetMismatch { start: u16, offset: u16 },
    #[error("csum_start {start} + csum_offset {offset} lies beyond the {len}-byte packet")]
    ChecksumOutOfBounds { start: u16, offset: u16, len: usize },
    #[error("{needed} segments, room for {room}")]
    TooManySegments { needed: usize, room: usize },
    #[error("a {needed}-byte segment does not fit a {room}-byte buffer")]
    BufferTooSmall { needed: usize, room: usize },
}

impl SplitError {
    /// A short stable name, for a drop counter.
    pub fn as_str(&self) -> &'static str {
        match self {
            SplitError::Header(HdrError::Truncated) => "vnet_hdr_truncated",
            SplitError::Header(HdrError::UnknownGsoType(_)) => "unknown_gso_type",
            SplitError::Header(HdrError::UdpFragmentation) => "gso_udp_ufo",
            SplitError::Header(HdrError::EcnWithoutTcp) => "gso_ecn_without_tcp",
            SplitError::Header(HdrError::ZeroGsoSize) => "gso_size_zero",
            SplitError::TruncatedIp => "ip_truncated",
            SplitError::IpVersion(_) => "ip_version",
            SplitError::BadIpv4HeaderLength(_) => "ipv4_header_length",
            SplitError::LengthMismatch { .. } => "ip_length_mismatch",
            SplitError::Fragment => "ipv4_fragment",
            SplitError::ProtocolMismatch(_) => "protocol_mismatch",
            SplitError::TruncatedTransport => "transport_truncated",
            SplitError::BadTcpHeaderLength(_) => "tcp_header_length",
            SplitError::ChecksumOffsetMismatch { .. } => "csum_offset_mismatch",
            SplitError::ChecksumOutOfBounds { .. } => "csum_out_of_bounds",
            SplitError::TooManySegments { .. } => "too_many_segments",
            SplitError::BufferTooSmall { .. } => "buffer_too_small",
        }
    }
}

/// Splits one read from a TUN opened with `IFF_VNET_HDR` (`read` = the 10-byte
/// [`VirtioNetHdr`] followed by the packet) into the IP packets it stands for.
///
/// Packet `i` is written to `bufs[i][offset..offset + sizes[i]]` (`offset` leaves room in
/// front, e.g. for the WireGuard transport header, so a buffer can be encrypted in place);
/// returns how many were written. At most `min(bufs.len(), sizes.len())`; more is
/// [`SplitError::TooManySegments`], and nothing written is to be used after an error.
///
/// - No segmentation (`GSO_NONE`): the packet is copied as it is; with `NEEDS_CSUM` its
///   checksum is completed first (the sum from `csum_start` to the end, the field's
///   pseudo-header sum included, stored at `csum_start + csum_offset`), whatever the
///   protocol. Nothing else about it is checked.
/// - `TCPV4`/`TCPV6`/`UDP_L4`: the payload after the IP and transport headers is cut into
///   `gso_size` pieces (the last may be shorter), each given a copy of the headers with
///   the lengths, IPv4 ID (+1 per segment) and header checksum, TCP sequence number
///   (+ bytes before it), flags (CWR on the first only, FIN and PSH on the last only) and a
///   complete transport checksum.
pub fn split<B: AsMut<[u8]>>(
    read: &[u8],
    bufs: &mut [B],
    offset: usize,
    sizes: &mut [usize],
) -> Result<usize, SplitError> {
    let hdr = VirtioNetHdr::decode(read)?;
    split_packet(&hdr, &read[VNET_HDR_LEN..], bufs, offset, sizes)
}

/// [`split`] for a header and packet read apart (`readv` into two buffers, say).
pub fn split_packet<B: AsMut<[u8]>>(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    bufs: &mut [B],
    offset: usize,
    sizes: &mut [usize],
) -> Result<usize, SplitError> {
    let hdr = *hdr;
    let room = bufs.len().min(sizes.len());
    let gso = hdr.gso()?;
    if gso == Gso::None {
        if room == 0 {
            return Err(SplitError::TooManySegments { needed: 1, room });
        }
        sizes[0] = copy_completing_checksum(&hdr, packet, bufs[0].as_mut(), offset)?;
        return Ok(1);
    }
    let l = Layout::parse(&hdr, gso, packet)?;
    let payload = &packet[l.headers..];
    let gso_size = usize::from(hdr.gso_size);
    let needed = payload.len().div_ceil(gso_size).max(1);
    if needed > room {
        return Err(SplitError::TooManySegments { needed, room });
    }
    for i in 0..needed {
        let chunk =
            &payload[(i * gso_size).min(payload.len())..((i + 1) * gso_size).min(payload.len())];
        let len = l.headers + chunk.len();
        let buf = bufs[i].as_mut();
        let room = buf.len();
        let out = buf.get_mut(offset..).and_then(|b| b.get_mut(..len)).ok_or(
            SplitError::BufferTooSmall {
                needed: offset + len,
                room,
            },
        )?;
        out[..l.headers].copy_from_slice(&packet[..l.headers]);
        out[l.headers..].copy_from_slice(chunk);
        l.fix_segment(out, i, needed, gso_size);
        sizes[i] = len;
    }
    Ok(needed)
}

fn copy_completing_checksum(
    hdr: &VirtioNetHdr,
    packet: &[u8],
    buf: &mut [u8],
    offset: usize,
) -> Result<usize, SplitError> {
    let room = buf.len();
    let out = buf
        .get_mut(offset..)
        .and_then(|b| b.get_mut(..packet.len()))
        .ok_or(SplitError::BufferTooSmall {
            needed: offset + packet.len(),
            room,
        })?;
    out.copy_from_slice(packet);
    if hdr.needs_csum() {
        let start = usize::from(hdr.csum_start);
        let at = start + usize::from(hdr.csum_offset);
        if at + 2 > out.len() {
            return Err(SplitError::ChecksumOutOfBounds {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len: packet.len(),
            });
        }
        let ck = finish(sum(&out[start..], 0));
        out[at..at + 2].copy_from_slice(&ck.to_be_bytes());
    }
    Ok(packet.len())
}

/// Where the headers of a super-packet are, checked against its header and its length.
#[derive(Debug)]
struct Layout {
    v6: bool,
    /// IP header length.
    ip: usize,
    /// IP and transport header length.
    headers: usize,
    tcp: bool,
}

impl Layout {
    fn parse(hdr: &VirtioNetHdr, gso: Gso, p: &[u8]) -> Result<Layout, SplitError> {
        let version = p.first().ok_or(SplitError::TruncatedIp)? >> 4;
        let v6 = match (gso, version) {
            (Gso::TcpV4 | Gso::UdpL4, 4) => false,
            (Gso::TcpV6 | Gso::UdpL4, 6) => true,
            _ => return Err(SplitError::IpVersion(version)),
        };
        let (ip, proto) = if v6 {
            if p.len() < 40 {
                return Err(SplitError::TruncatedIp);
            }
            let said = 40 + usize::from(be16(p, 4));
            if said != p.len() {
                return Err(SplitError::LengthMismatch {
                    said,
                    read: p.len(),
                });
            }
            (40, p[6])
        } else {
            if p.len() < 20 {
                return Err(SplitError::TruncatedIp);
            }
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || ihl > p.len() {
                return Err(SplitError::BadIpv4HeaderLength(ihl));
            }
            let said = usize::from(be16(p, 2));
            if said != p.len() {
                return Err(SplitError::LengthMismatch {
                    said,
                    read: p.len(),
                });
            }
            if be16(p, 6) & 0x3fff != 0 {
                return Err(SplitError::Fragment);
            }
            (ihl, p[9])
        };
        let tcp = gso != Gso::UdpL4;
        let (want, csum_offset) = if tcp {
            (IPPROTO_TCP, TCP_CSUM_OFFSET)
        } else {
            (IPPROTO_UDP, UDP_CSUM_OFFSET)
        };
        if proto != want {
            return Err(SplitError::ProtocolMismatch(proto));
        }
        let l4 = if tcp {
            if p.len() < ip + 20 {
                return Err(SplitError::TruncatedTransport);
            }
            let doff = usize::from(p[ip + 12] >> 4) * 4;
            if doff < 20 || ip + doff > p.len() {
                return Err(SplitError::BadTcpHeaderLength(doff));
            }
            doff
        } else {
            if p.len() < ip + 8 {
                return Err(SplitError::TruncatedTransport);
            }
            8
        };
        if hdr.needs_csum() && (usize::from(hdr.csum_start) != ip || hdr.csum_offset != csum_offset)
        {
            return Err(SplitError::ChecksumOffsetMismatch {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
            });
        }
        Ok(Layout {
            v6,
            ip,
            headers: ip + l4,
            tcp,
        })
    }

    /// Makes the copied headers of segment `i` of `n` (`seg` = its whole IP packet) true.
    fn fix_segment(&self, seg: &mut [u8], i: usize, n: usize, gso_size: usize) {
        let len = seg.len();
        let l4_len = len - self.ip;
        if self.v6 {
            put16(seg, 4, l4_len as u16);
        } else {
            put16(seg, 2, len as u16);
            put16(seg, 4, be16(seg, 4).wrapping_add(i as u16));
            put16(seg, 10, 0);
            let ck = !fold(sum(&seg[..self.ip], 0));
            put16(seg, 10, ck);
        }
        let (proto, csum_at) = if self.tcp {
            let t = self.ip;
            let seq = u32::from_be_bytes([seg[t + 4], seg[t + 5], seg[t + 6], seg[t + 7]]);
            let seq = seq.wrapping_add((i * gso_size) as u32);
            seg[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
            if i > 0 {
                seg[t + 13] &= !TCP_CWR;
            }
            if i + 1 < n {
                seg[t + 13] &= !(TCP_FIN | TCP_PSH);
            }
            (IPPROTO_TCP, t + usize::from(TCP_CSUM_OFFSET))
        } else {
            put16(seg, self.ip + 4, l4_len as u16);
            (IPPROTO_UDP, self.ip + usize::from(UDP_CSUM_OFFSET))
        };
        put16(seg, csum_at, 0);
        let acc = sum(&seg[self.ip..], pseudo_header(seg, self.v6, proto, l4_len));
        put16(seg, csum_at, finish(acc));
    }
}

pub(crate) fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

pub(crate) fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
