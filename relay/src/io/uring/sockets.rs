//! A worker's socket registry: every socket by id, what it is to the roles (a listener, or
//! a socket some role owns, kept by its opaque owner), and how many requests and buffers
//! still name it, so that an id is freed and its descriptor closed only when nothing does.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use socket2::Socket;

use crate::io::runs::Target;
use crate::io::shared::SharedExitSockets;
use crate::io::train::TrainSockets;
use crate::role::{Listener, SocketOwner};

/// What a socket is to the roles.
#[derive(Debug, Clone, Copy)]
pub(super) enum Role {
    Listener(Listener),
    /// A socket a role owns (towards an exit).
    Owned(SocketOwner),
    /// A shared exit-facing socket (`io/shared.rs`), by pool id.
    Shared(u32),
}

pub(super) struct IoSocket {
    pub(super) socket: Socket,
    pub(super) role: Role,
    pub(super) local: Option<SocketAddr>,
    /// Whether sends on this socket may use GSO; cleared for good when the kernel refuses.
    pub(super) gso: bool,
    pub(super) recv_armed: bool,
    pub(super) closing: bool,
    /// Requests in flight and received messages waiting that name this socket.
    pub(super) refs: u32,
}

/// The worker's sockets by id, and the router's names for them.
#[derive(Default)]
pub(super) struct Sockets {
    pub(super) slots: Vec<Option<IoSocket>>,
    pub(super) free: Vec<u32>,
    /// Socket id by router listener id.
    pub(super) listeners: Vec<u32>,
    /// Socket id by owning role, then by the owner's slot index (`NONE` when the slot has
    /// no socket).
    pub(super) owned: Vec<Vec<u32>>,
    /// Shared exit-facing sockets (their socket ids) and who is on them.
    pub(super) shared: SharedExitSockets<u32>,
}

pub(super) const NONE: u32 = u32::MAX;

impl Sockets {
    pub(super) fn insert(&mut self, s: IoSocket) -> u32 {
        match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = Some(s);
                id
            }
            None => {
                self.slots.push(Some(s));
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub(super) fn get(&self, id: u32) -> Option<&IoSocket> {
        self.slots.get(id as usize).and_then(Option::as_ref)
    }

    pub(super) fn get_mut(&mut self, id: u32) -> Option<&mut IoSocket> {
        self.slots.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// The open socket of `owner`, its own or a shared one, if it has one.
    pub(super) fn owned(&self, owner: SocketOwner) -> Option<u32> {
        if let Some(id) = self.own(owner) {
            return Some(id);
        }
        let (pool, _) = self.shared.of(owner)?;
        let id = *self.shared.handle(pool)?;
        self.get(id).filter(|s| !s.closing).map(|_| id)
    }

    /// The destination a send to `target` names: `None` on a connected socket.
    pub(super) fn dest(&self, target: Target) -> Option<SocketAddr> {
        match target {
            Target::Client { addr, .. } => Some(addr),
            Target::Socket(owner) => self.shared.of(owner).map(|(_, exit)| exit),
        }
    }

    /// The open socket of its own of `owner`, if it has one.
    fn own(&self, owner: SocketOwner) -> Option<u32> {
        let table = self.owned.get(usize::from(owner.role.0))?;
        let id = *table.get(owner.slot.index as usize)?;
        match self.get(id)? {
            IoSocket {
                role: Role::Owned(o),
                closing: false,
                ..
            } if *o == owner => Some(id),
            _ => None,
        }
    }

    /// The entry of `owner`'s slot in the by-owner table, made when missing.
    pub(super) fn owned_entry(&mut self, owner: SocketOwner) -> &mut u32 {
        let role = usize::from(owner.role.0);
        if self.owned.len() <= role {
            self.owned.resize_with(role + 1, Vec::new);
        }
        let table = &mut self.owned[role];
        let i = owner.slot.index as usize;
        if table.len() <= i {
            table.resize(i + 1, NONE);
        }
        &mut table[i]
    }

    pub(super) fn listener(&self, listener: u16) -> Option<u32> {
        // A closed listener's id maps to NONE (set before it starts closing), which no
        // caller's `get` finds.
        self.listeners
            .get(usize::from(listener))
            .copied()
            .filter(|&sid| sid != NONE)
    }

    /// Drops one reference; a closing socket with none left is closed and its id freed.
    pub(super) fn release(&mut self, id: u32) {
        let done = match self.get_mut(id) {
            Some(s) => {
                s.refs = s.refs.saturating_sub(1);
                s.closing && s.refs == 0
            }
            None => false,
        };
        if done {
            self.finish(id);
        }
    }

    pub(super) fn finish_if_unused(&mut self, id: u32) {
        if matches!(self.get(id), Some(s) if s.closing && s.refs == 0) {
            self.finish(id);
        }
    }

    pub(super) fn finish(&mut self, id: u32) {
        // Dropping the socket closes its descriptor: nothing queued or in flight names it.
        self.slots[id as usize] = None;
        self.free.push(id);
    }
}

impl Sockets {
    /// The open socket a send to `target` leaves from.
    pub(super) fn for_target(&self, target: Target) -> Option<u32> {
        match target {
            Target::Socket(owner) => self.owned(owner),
            Target::Client { listener, .. } => self.listener(listener),
        }
    }
}

impl TrainSockets for Sockets {
    fn socket(&self, target: Target) -> Option<(i32, bool, Option<SocketAddr>)> {
        let s = self.get(self.for_target(target)?)?;
        Some((s.socket.as_raw_fd(), s.gso, self.dest(target)))
    }

    fn refuse_gso(&mut self, target: Target) {
        if let Some(s) = self.for_target(target).and_then(|id| self.get_mut(id)) {
            s.gso = false;
        }
    }
}
