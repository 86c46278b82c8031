//! What every role (the DoubleHop router, Z-HOP) speaks in, so that no role imports
//! another: the listener a datagram arrived on and leaves from, traffic counters, the
//! datagram as the worker parsed it, and [`Role`], the one interface through which the
//! worker drives them all. Slot handles are the slab's ([`crate::slab::SessionSlot`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::drop_reason::DropReason;
use crate::slab::SessionSlot;
use crate::table::ExitTable;
use crate::wire::Message;

/// The relay socket a client packet arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Listener {
    /// The I/O layer's own number for the socket; replies go out the same socket.
    pub id: u16,
    /// Its local port, for port-pinned exits.
    pub port: u16,
}

/// Packets and bytes in one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl Traffic {
    /// Counts one packet of `bytes`.
    pub fn add_bytes(&mut self, bytes: usize) {
        self.add(bytes);
    }

    pub(crate) fn add(&mut self, bytes: usize) {
        // Wrapping, as counters do: a session restored from a damaged `sessions.json` may
        // start anywhere, and a panic here would take the worker down.
        self.packets = self.packets.wrapping_add(1);
        self.bytes = self.bytes.wrapping_add(bytes as u64);
    }
}

/// A role's place among a worker's roles, which the worker assigns (`io/worker.rs`); the
/// I/O layer uses it only to hand what a socket receives back to the role that owns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RoleId(pub u8);

/// A socket a role owns (a DoubleHop session's exit-facing socket, a Z-HOP flow's): the
/// role and its own handle for it. Opaque to the I/O layer, which keeps its sockets by
/// owner and never asks what kind they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketOwner {
    pub role: RoleId,
    pub slot: SessionSlot,
}

/// Where a role sends something: a socket of the I/O layer's, named in the roles' terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// From a listener to an address: a DoubleHop client, or a Z-HOP peer's endpoint.
    Client { listener: u16, addr: SocketAddr },
    /// Through a socket a role owns (connected to its peer, an exit).
    Socket(SocketOwner),
}

impl Target {
    /// The address to send to, or `None` for a connected socket.
    pub fn address(self) -> Option<SocketAddr> {
        match self {
            Target::Client { addr, .. } => Some(addr),
            Target::Socket(_) => None,
        }
    }
}

/// One datagram as every role sees it: the worker parses it once, and each role's claim
/// and handling look at that parse.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    pub from: SocketAddr,
    pub bytes: &'a [u8],
    /// `bytes` as a WireGuard message, or why it is none.
    pub msg: Result<Message<'a>, DropReason>,
}

impl<'a> Datagram<'a> {
    /// `bytes` from `from`, parsed.
    pub fn parse(from: SocketAddr, bytes: &'a [u8]) -> Self {
        Datagram {
            from,
            bytes,
            msg: Message::parse(bytes),
        }
    }
}

/// What a role asks of the I/O layer, in order. The sink a role is handed answers whether
/// it was carried out (a send that failed, a socket that could not be opened).
#[derive(Debug, Clone, Copy)]
pub enum Output<'a> {
    /// Send the datagram being handled, from the buffer it arrived in, to `Target`.
    Forward(Target),
    /// Send `bytes` (the role's own, copied by the I/O layer and batched) to `to`.
    Send { to: Target, bytes: &'a [u8] },
    /// Send `bytes` from `listener` to `to` at once: the relay's rare cookie replies.
    Reply {
        listener: Listener,
        to: SocketAddr,
        bytes: &'a [u8],
    },
    /// Open a socket owned by `socket`, connected to `exit` (bound to `local_port` when
    /// given).
    Open {
        socket: SocketOwner,
        exit: SocketAddr,
        local_port: Option<u16>,
    },
    /// Close the socket owned by `socket`, after sending what waits for it.
    Close { socket: SocketOwner },
    /// Let the kernel fast path forward the transport messages of the session whose
    /// exit-facing socket is `socket`: from `client` to `listener` with one of `indices`
    /// (exactly these: any other offloaded before is withdrawn) to `exit`, and from `exit`
    /// back to `client`. Only when the I/O layer has a fast path; the session stays on the
    /// userspace path whatever the answer.
    Offload {
        socket: SocketOwner,
        client: SocketAddr,
        listener: Listener,
        exit: SocketAddr,
        indices: &'a [u32],
    },
    /// Stop the fast path forwarding `socket`'s session (before its socket closes).
    Withdraw { socket: SocketOwner },
    /// Write a decrypted IP packet to the node's TUN device (the Exit role).
    ToTun { bytes: &'a [u8] },
}

/// A role: a sans-IO state machine that claims the client datagrams that are its own,
/// handles them and what arrives on its own sockets, runs its timers, and tells the I/O
/// layer what to do through [`Output`]s. The worker asks its roles in order; the first that
/// claims a client datagram handles it.
///
/// Statically dispatched (the worker holds each role by its type), so nothing per packet
/// goes through a `dyn` call.
pub trait Role {
    /// Its place among the worker's roles, and in its sockets' owners.
    const ID: RoleId;

    /// The owner of this role's socket `slot`.
    fn socket(slot: SessionSlot) -> SocketOwner {
        SocketOwner {
            role: Self::ID,
            slot,
        }
    }

    /// What a claim found, handed to [`Role::handle_client`] so nothing is looked up twice.
    type Claim<'a>;

    /// Whether this role takes a client datagram. `later_knows` tells whether a role asked
    /// after this one knows the datagram's source address; it is called only when the
    /// answer matters (a claim by a weak sign, such as an index anyone can name).
    fn claim<'a>(
        &self,
        dg: &Datagram<'a>,
        later_knows: impl FnOnce() -> bool,
    ) -> Option<Self::Claim<'a>>;

    /// Whether `client` is an address this role has state for.
    fn knows_client(&self, client: SocketAddr) -> bool;

    /// Handles a client datagram it claimed, arrived on `listener`.
    fn handle_client(
        &mut self,
        now: Instant,
        listener: Listener,
        dg: &Datagram<'_>,
        claim: Self::Claim<'_>,
        out: &mut impl FnMut(Output<'_>) -> bool,
    );

    /// Handles a datagram that arrived on one of its own sockets, `slot`.
    fn handle_socket(
        &mut self,
        now: Instant,
        slot: SessionSlot,
        bytes: &[u8],
        out: &mut impl FnMut(Output<'_>) -> bool,
    );

    /// When [`Role::handle_timeout`] next has work, if ever.
    fn poll_timeout(&self) -> Option<Instant>;

    /// Runs the role's timers at `now`, and anything else it has queued for the I/O layer.
    fn handle_timeout(&mut self, now: Instant, out: &mut impl FnMut(Output<'_>) -> bool);

    /// Takes a new table.
    fn set_table(&mut self, table: Arc<ExitTable>);

    /// Counts a drop decided outside the role (a send of its that failed later).
    fn record_drop(&mut self, reason: DropReason);

    /// Its drops by reason ([`DropReason::index`]).
    fn drops(&self) -> &[u64; DropReason::COUNT];
}
