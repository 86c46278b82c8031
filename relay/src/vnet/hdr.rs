//! The 10-byte `virtio_net_hdr` that precedes every packet on a TUN opened with
//! `IFF_VNET_HDR` (see the module comment of [`crate::vnet`] for where the layout comes from).

use thiserror::Error;

/// Length of `struct virtio_net_hdr`, the TUN default (`TUNSETVNETHDRSZ` unset).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum from `csum_start` to the end is still to be
/// computed and stored at `csum_start + csum_offset` (the field holds the pseudo-header sum).
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the kernel already verified the checksum (read only; we
/// ignore it, as we never need the checksum of a packet we only forward).
pub const F_DATA_VALID: u8 = 2;

/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO: UDP by IP fragmentation), which Linux stopped producing
/// in 4.14; refused.
pub const GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO: UDP segmentation, `TUN_F_USO4/6`, Linux 6.2+).
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN`: or-ed into a TCP gso_type when the first segment carries CWR.
pub const GSO_ECN: u8 = 0x80;

/// Byte offset of the checksum field in a TCP header (`csum_offset` for TCP).
pub const TCP_CSUM_OFFSET: u16 = 16;
/// Byte offset of the checksum field in a UDP header (`csum_offset` for UDP).
pub const UDP_CSUM_OFFSET: u16 = 6;

/// What kind of segmentation a header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gso {
    /// One packet as it is.
    None,
    /// TCP over IPv4, cut into `gso_size`-byte payloads.
    TcpV4,
    /// TCP over IPv6.
    TcpV6,
    /// UDP over IPv4 or IPv6, one datagram per `gso_size` bytes of payload.
    UdpL4,
}

/// A header that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HdrError {
    #[error("shorter than the 10-byte virtio_net_hdr")]
    Truncated,
    #[error("unknown gso_type {0:#04x}")]
    UnknownGsoType(u8),
    #[error("gso_type UDP (UFO, IP fragmentation) is not supported")]
    UdpFragmentation,
    #[error("the ECN bit on a gso_type that is not TCP")]
    EcnWithoutTcp,
    #[error("gso_size 0 with a gso_type that segments")]
    ZeroGsoSize,
}

/// `struct virtio_net_hdr` (virtio spec 1.x §5.1.6, Linux `include/uapi/linux/virtio_net.h`).
///
/// The 16-bit fields are little-endian on the wire here: that is virtio 1.x's byte order,
/// and TUN's too on a little-endian host (TUN uses the legacy "native" order unless
/// `TUNSETVNETLE`/`TUNSETVNETBE` says otherwise, and native is little-endian on x86_64 and
/// aarch64, the only hosts we build for). A big-endian host would have to set
/// `TUNSETVNETLE` on the TUN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// [`F_NEEDS_CSUM`], [`F_DATA_VALID`]; other bits are ignored.
    pub flags: u8,
    /// One of the `GSO_*` constants, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// How many bytes of headers the sender says there are. Linux fills it with
    /// `skb_headlen` when reading (a hint for how much to keep linear, not the headers'
    /// length), so the splitter ignores it and reads the headers themselves.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS for TCP).
    pub gso_size: u16,
    /// Where the checksummed part starts, from the start of the IP packet (TUN has no L2).
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum is stored.
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    /// The all-zero header: one packet, checksums complete.
    pub const NONE: VirtioNetHdr = VirtioNetHdr {
        flags: 0,
        gso_type: GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
    };

    /// Reads the header at the start of `buf`. Only the length is checked here; see
    /// [`VirtioNetHdr::gso`] for the fields.
    pub fn decode(buf: &[u8]) -> Result<VirtioNetHdr, HdrError> {
        let b: &[u8; VNET_HDR_LEN] = buf
            .get(..VNET_HDR_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(HdrError::Truncated)?;
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Ok(VirtioNetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    /// Writes the header into the first 10 bytes of `out`.
    pub fn encode(&self, out: &mut [u8; VNET_HDR_LEN]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0; VNET_HDR_LEN];
        self.encode(&mut b);
        b
    }

    /// Whether [`F_NEEDS_CSUM`] is set.
    pub fn needs_csum(&self) -> bool {
        self.flags & F_NEEDS_CSUM != 0
    }

    /// Whether the ECN bit is set (the first TCP segment carries CWR).
    pub fn ecn(&self) -> bool {
        self.gso_type & GSO_ECN != 0
    }

    /// The segmentation asked for, checked: a known type, ECN only with TCP, and a
    /// non-zero `gso_size` whenever something is to be segmented.
    pub fn gso(&self) -> Result<Gso, HdrError> {
        let gso = match self.gso_type & !GSO_ECN {
            GSO_NONE => Gso::None,
            GSO_TCPV4 => Gso::TcpV4,
            GSO_TCPV6 => Gso::TcpV6,
            GSO_UDP_L4 => Gso::UdpL4,
            GSO_UDP => return Err(HdrError::UdpFragmentation),
            _ => return Err(HdrError::UnknownGsoType(self.gso_type)),
        };
        if self.ecn() && !matches!(gso, Gso::TcpV4 | Gso::TcpV6) {
            return Err(HdrError::EcnWithoutTcp);
        }
        if gso != Gso::None && self.gso_size == 0 {
            return Err(HdrError::ZeroGsoSize);
        }
        Ok(gso)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_little_endian() {
        let h = VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 0x0134,
            gso_size: 1448,
            csum_start: 20,
            csum_offset: 16,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 0x81, 0x34, 0x01, 0xa8, 0x05, 20, 0, 16, 0]);
        assert_eq!(VirtioNetHdr::decode(&b), Ok(h));
        assert_eq!(h.gso(), Ok(Gso::TcpV4));
        assert!(h.ecn() && h.needs_csum());
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert_eq!(VirtioNetHdr::decode(&[0; 9]), Err(HdrError::Truncated));
        let with = |gso_type, gso_size| VirtioNetHdr {
            gso_type,
            gso_size,
            ..VirtioNetHdr::NONE
        };
        assert_eq!(with(2, 1000).gso(), Err(HdrError::UnknownGsoType(2)));
        assert_eq!(with(0x86, 1000).gso(), Err(HdrError::UnknownGsoType(0x86)));
        assert_eq!(with(GSO_UDP, 1000).gso(), Err(HdrError::UdpFragmentation));
        assert_eq!(
            with(GSO_UDP_L4 | GSO_ECN, 1000).gso(),
            Err(HdrError::EcnWithoutTcp)
        );
        assert_eq!(
            with(GSO_NONE | GSO_ECN, 0).gso(),
            Err(HdrError::EcnWithoutTcp)
        );
        for t in [GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4] {
            assert_eq!(with(t, 0).gso(), Err(HdrError::ZeroGsoSize));
        }
        assert_eq!(with(GSO_NONE, 0).gso(), Ok(Gso::None));
        assert_eq!(with(GSO_UDP_L4, 1200).gso(), Ok(Gso::UdpL4));
        assert_eq!(with(GSO_TCPV6, 1200).gso(), Ok(Gso::TcpV6));
    }
}
