//! What every role (the DoubleHop router, Z-HOP) speaks in, so that no role imports
//! another: the listener a datagram arrived on and leaves from, and traffic counters.
//! Slot handles are the slab's ([`crate::slab::SessionSlot`]).

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
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}
