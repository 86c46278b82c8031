//! The maps' keys and values, byte for byte as `bpf/doublehop.bpf.c` declares them.
//!
//! Every field is a byte array in wire order (addresses and ports big-endian, the receiver
//! index as its four bytes on the wire, i.e. little-endian), so the layout has no padding and
//! does not depend on the host's byte order. Counters are the program's native `u64`s.

use std::net::SocketAddrV4;

/// Capacity of `exit_to_client` and `session_counters`: sessions offloaded at once.
pub const MAX_SESSIONS: usize = 65_536;
/// Capacity of `client_to_exit` (a session has at most [`MAX_INDICES_PER_SESSION`]).
pub const MAX_CLIENT_INDICES: usize = 4 * MAX_SESSIONS;
/// Receiver indices a session may have offloaded at once (current, previous and next keypair
/// leave room to spare).
pub const MAX_INDICES_PER_SESSION: usize = 8;

/// `client_to_exit` key: a transport message from the client to the listener, with a
/// receiver index the exit assigned to this session.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ClientToExitKey {
    pub client_addr: [u8; 4],
    pub listen_addr: [u8; 4],
    pub client_port: [u8; 2],
    pub listen_port: [u8; 2],
    pub receiver_index: [u8; 4],
}

/// `exit_to_client` key: anything from the session's exit endpoint to its exit-facing socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ExitToClientKey {
    pub exit_addr: [u8; 4],
    pub relay_addr: [u8; 4],
    pub exit_port: [u8; 2],
    pub relay_port: [u8; 2],
}

/// The value of both maps: the new source and destination, and the session to count under.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rewrite {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub session: u32,
}

/// `session_counters` value, one per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct SessionCounters {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    pub last_seen_ns: u64,
}

// SAFETY: plain `repr(C)` structs of integers and byte arrays with no padding (checked by
// the size assertions below), so every bit pattern is a valid value and none is
// uninitialised.
unsafe impl aya::Pod for ClientToExitKey {}
// SAFETY: as above.
unsafe impl aya::Pod for ExitToClientKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Rewrite {}
// SAFETY: as above.
unsafe impl aya::Pod for SessionCounters {}

const _: () = {
    assert!(std::mem::size_of::<ClientToExitKey>() == 16);
    assert!(std::mem::size_of::<ExitToClientKey>() == 12);
    assert!(std::mem::size_of::<Rewrite>() == 16);
    assert!(std::mem::size_of::<SessionCounters>() == 40);
};

impl ClientToExitKey {
    pub(crate) fn new(client: SocketAddrV4, listen: SocketAddrV4, receiver_index: u32) -> Self {
        ClientToExitKey {
            client_addr: client.ip().octets(),
            listen_addr: listen.ip().octets(),
            client_port: client.port().to_be_bytes(),
            listen_port: listen.port().to_be_bytes(),
            receiver_index: receiver_index.to_le_bytes(),
        }
    }
}

impl ExitToClientKey {
    pub(crate) fn new(exit: SocketAddrV4, exit_facing: SocketAddrV4) -> Self {
        ExitToClientKey {
            exit_addr: exit.ip().octets(),
            relay_addr: exit_facing.ip().octets(),
            exit_port: exit.port().to_be_bytes(),
            relay_port: exit_facing.port().to_be_bytes(),
        }
    }
}

impl Rewrite {
    pub(crate) fn new(src: SocketAddrV4, dst: SocketAddrV4, session: u32) -> Self {
        Rewrite {
            src_addr: src.ip().octets(),
            dst_addr: dst.ip().octets(),
            src_port: src.port().to_be_bytes(),
            dst_port: dst.port().to_be_bytes(),
            session,
        }
    }
}

/// Why the program passed a packet to the stack, or that it forwarded it: the index into
/// the `verdicts` per-CPU array (`enum verdict` in the C source).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Rewritten and redirected out of an interface.
    Forwarded,
    /// Not IPv4 (IPv6 too, for now), or not addressed to this host.
    NotIpv4,
    /// Not UDP, IP options, or an IP fragment.
    NotUdp,
    /// Lengths that disagree, a bad IPv4 header checksum, a truncated packet.
    Malformed,
    /// Not a WireGuard transport message: handshakes, cookie replies, bad lengths.
    NotTransport,
    /// No offloaded session matches (unknown flow, wrong index, address or port).
    NoEntry,
    /// A GSO/GRO train whose segments differ in size, message type or session.
    TrainMixed,
    /// The FIB has no usable route (or forwarding is disabled on the interface).
    NoRoute,
    /// The session has no counters entry (never happens with this crate's userspace).
    NoCounters,
}

impl Verdict {
    /// Every verdict, in the program's order.
    pub const ALL: [Verdict; 9] = [
        Verdict::Forwarded,
        Verdict::NotIpv4,
        Verdict::NotUdp,
        Verdict::Malformed,
        Verdict::NotTransport,
        Verdict::NoEntry,
        Verdict::TrainMixed,
        Verdict::NoRoute,
        Verdict::NoCounters,
    ];

    /// A short name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::NotIpv4 => "not_ipv4",
            Verdict::NotUdp => "not_udp",
            Verdict::Malformed => "malformed",
            Verdict::NotTransport => "not_transport",
            Verdict::NoEntry => "no_entry",
            Verdict::TrainMixed => "train_mixed",
            Verdict::NoRoute => "no_route",
            Verdict::NoCounters => "no_counters",
        }
    }
}
