//! TUN offloads: the `virtio_net_hdr` a TUN opened with `IFF_VNET_HDR` puts before every
//! packet, [`split`] for what the kernel hands over, [`Coalescer`] for what we hand back.
//!
//! A TUN opened with `IFF_TUN | IFF_NO_PI | IFF_VNET_HDR` and given
//! `TUNSETOFFLOAD(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6)` (the USO
//! flags exist from Linux 6.2; an older kernel refuses them with `EINVAL`, so set the TCP
//! ones alone there) tells the kernel the "device" segments and checksums itself. Each
//! `read(2)` then returns a 10-byte [`VirtioNetHdr`] followed by one IP packet that may be
//! a TCP or UDP *super-packet* of up to 64 KiB (so a read buffer needs
//! `VNET_HDR_LEN + MAX_PACKET` bytes), and each `write(2)` must start with such a header
//! too (all zero for an ordinary packet). Sources: the virtio spec (1.x, §5.1.6
//! "Device Operation", the header and its fields), Linux `include/uapi/linux/virtio_net.h`,
//! `include/linux/virtio_net.h` (`virtio_net_hdr_from_skb` on read, `virtio_net_hdr_to_skb`
//! on write) and `drivers/net/tun.c`; the segmentation rules are those of Linux's TSO/USO
//! software fallback (`tcp_gso_segment`, `__udp_gso_segment`, `inet_gso_segment`) and the
//! merge rules those of its GRO (`tcp_gro_receive`, `inet_gro_receive`, `ipv6_gro_receive`).
//!
//! What a read holds, and what [`split`] does with it:
//! - `gso_type` NONE: one packet. With `NEEDS_CSUM` (the kernel left the checksum to the
//!   device, as it does for most locally sent TCP and UDP) its transport checksum field
//!   holds the pseudo-header sum, and the checksum of everything from `csum_start` to the
//!   end, that field included, belongs at `csum_start + csum_offset`.
//! - `TCPV4`/`TCPV6` (`| ECN` when the first segment carries CWR): a TCP segment whose
//!   payload is cut into `gso_size`-byte segments, the last possibly shorter. Each gets the
//!   headers with: IPv4 total length, ID + i (the kernel's non-fixed-ID rule) and header
//!   checksum; IPv6 payload length; sequence number + i·gso_size; CWR only on the first,
//!   FIN and PSH only on the last; a complete TCP checksum.
//! - `UDP_L4` (USO): a UDP datagram whose payload is cut the same way into datagrams with
//!   their own UDP length and checksum (IPv4 ID + i as for TCP).
//! - `hdr_len` is `skb_headlen` on read, a hint for how much is linear and not the header
//!   length; it is ignored, and the headers are read from the packet.
//! - `csum_start` counts from the IP header (TUN has no link-layer header); for a
//!   super-packet it must name the transport header and `csum_offset` its checksum field
//!   when `NEEDS_CSUM` is set. The 16-bit fields are little-endian (see [`VirtioNetHdr`]).
//!
//! What a write may hold, and what [`Coalescer`] builds: an ordinary packet after a zero
//! header, or a TCP super-packet after `NEEDS_CSUM`, `TCPV4`/`TCPV6` (`| ECN` if its first
//! segment has CWR), `gso_size` = the segments' payload size, `hdr_len` = IP + TCP header
//! length (the kernel refuses an `hdr_len` beyond the write), `csum_start` = the TCP header,
//! `csum_offset` = 16, and in the TCP checksum field the folded, uncomplemented pseudo-header
//! sum over the super-packet's TCP length — what `virtio_net_hdr_to_skb` accepts as
//! `CHECKSUM_PARTIAL` and what the kernel's own segmentation adjusts per segment if it
//! forwards the packet. Segments are merged only as Linux GRO merges them (see
//! `coalesce.rs`), and only when their own checksums verify, since the merged packet's
//! checksum is computed afresh and would hide a corrupt segment. UDP is written datagram by
//! datagram: the kernel's UDP GRO is opt-in per socket, and a UDP_L4 super-packet written
//! to a socket that did not ask for it would be segmented again on delivery.
//!
//! Neither side allocates per packet: [`split`] writes into the caller's buffers,
//! [`Coalescer`] into an arena it allocates once. Bad input is a typed [`SplitError`]
//! (never a panic); a packet the coalescer cannot merge is written as it is, for the kernel
//! to accept or drop and count like any other.

mod checksum;
mod coalesce;
mod hdr;
mod split;

#[cfg(test)]
mod netns_tests;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use coalesce::{CoalesceStats, Coalescer};
pub use hdr::{
    Gso, HdrError, VirtioNetHdr, F_DATA_VALID, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4,
    GSO_TCPV6, GSO_UDP, GSO_UDP_L4, TCP_CSUM_OFFSET, UDP_CSUM_OFFSET, VNET_HDR_LEN,
};
pub use split::{split, split_packet, SplitError};

/// The longest IP packet (IPv4 total length and IPv6 payload length are 16 bits; no
/// jumbograms): the bound on one super-packet.
pub const MAX_PACKET: usize = 65_535;

/// `TUNSETOFFLOAD` flags (`include/uapi/linux/if_tun.h`) the Exit sets on its TUN.
pub const TUN_F_CSUM: u32 = 0x01;
/// TCP segmentation over IPv4.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCP segmentation over IPv6.
pub const TUN_F_TSO6: u32 = 0x04;
/// UDP segmentation over IPv4 (Linux 6.2+).
pub const TUN_F_USO4: u32 = 0x20;
/// UDP segmentation over IPv6 (Linux 6.2+).
pub const TUN_F_USO6: u32 = 0x40;

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;
