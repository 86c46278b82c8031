//! Exit-facing sockets shared between sessions of different exits (`[relay] exit_sockets =
//! "shared"`), kept the same way by both backends.
//!
//! **Per-client NAT still holds**: a socket carries at most one session (or Z-HOP flow) per
//! exit endpoint, so each exit still sees every client at a relay address and port of its
//! own, and a worker needs only as many sockets as its busiest exit has sessions, not one
//! per session. The sockets are not connected: sends name the exit (`sendmsg` with a
//! destination, GSO as on any socket), and what arrives is handed to the session whose
//! exit is the datagram's source, `(socket, source) → owner`; the kernel no longer filters
//! by source, so a datagram from any other address is dropped
//! (`DropReason::SharedSocketStranger`). A GRO train comes from one source, so one lookup
//! serves the whole train.
//!
//! **Which socket a session gets**: per exit endpoint `E`, every pool index below `below`
//! that does not carry `E` is in `holes` (lazily: an entry may have been taken since, and
//! is checked when popped); every index from `below` on does not carry `E`. A new session
//! of `E` takes a hole, else index `below` (opening its socket when there is none), so it
//! costs O(1) whatever the number of sockets. The entry of `E` goes when its last session
//! does. A session with a pinned local port (restored after a restart) joins the pooled
//! socket bound to that port, or opens one there.
//!
//! What an unconnected socket changes besides: an exit's ICMP errors (port unreachable)
//! are no longer reported on it (`recv_errors` misses them), and a late datagram of a
//! session that has just left a socket others still use counts as a stranger instead of
//! vanishing with its socket.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use crate::role::SocketOwner;

/// The top bit of a pool id says the address family (set: IPv6): a socket sends to exits
/// of its own family only.
const V6_BIT: u32 = 1 << 31;

/// A worker's shared exit-facing sockets; `H` is how its backend holds a socket.
#[derive(Debug)]
pub(crate) struct SharedExitSockets<H> {
    families: [Family<H>; 2],
    /// What each pooled socket carries: (pool id, exit) → the session or flow.
    peers: HashMap<(u32, SocketAddr), SocketOwner>,
    /// Where each owner is: by role, then slot index.
    owners: Vec<Vec<Option<Placed>>>,
}

/// An owner's place in the pool.
#[derive(Debug, Clone, Copy)]
struct Placed {
    generation: u32,
    pool: u32,
    exit: SocketAddr,
}

#[derive(Debug)]
struct Family<H> {
    slots: Vec<Option<Pooled<H>>>,
    by_exit: HashMap<SocketAddr, Fill>,
    by_port: HashMap<u16, u32>,
}

#[derive(Debug)]
struct Pooled<H> {
    handle: H,
    port: u16,
    /// Sessions and flows it carries.
    carried: u32,
}

/// Where exit `E`'s next session finds a socket not carrying `E` (see the module's docs).
#[derive(Debug, Default)]
struct Fill {
    below: u32,
    holes: Vec<u32>,
    sessions: u32,
}

impl<H> Default for SharedExitSockets<H> {
    fn default() -> Self {
        SharedExitSockets {
            families: [Family::default(), Family::default()],
            peers: HashMap::new(),
            owners: Vec::new(),
        }
    }
}

impl<H> Default for Family<H> {
    fn default() -> Self {
        Family {
            slots: Vec::new(),
            by_exit: HashMap::new(),
            by_port: HashMap::new(),
        }
    }
}

/// What [`SharedExitSockets::open`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Opened {
    pub pool: u32,
    /// Whether it opened a new socket (which the backend then registers for receives).
    pub new_socket: bool,
}

fn family(exit: SocketAddr) -> usize {
    usize::from(exit.is_ipv6())
}

fn pool_id(family: usize, index: u32) -> u32 {
    if family == 1 {
        index | V6_BIT
    } else {
        index
    }
}

fn split(pool: u32) -> (usize, usize) {
    (usize::from(pool & V6_BIT != 0), (pool & !V6_BIT) as usize)
}

impl<H> SharedExitSockets<H> {
    /// Places `owner`, a session or flow towards `exit`, on a pooled socket carrying no
    /// session to `exit` yet, opening one with `make` (given the local port to bind, 0 for
    /// any, and the new socket's pool id; it returns the socket and the port it is bound
    /// to) when none is free. A `local_port` joins the socket bound to that port, or opens
    /// one there; if that socket already carries a session to `exit` the open fails
    /// (EADDRINUSE).
    pub(crate) fn open(
        &mut self,
        owner: SocketOwner,
        exit: SocketAddr,
        local_port: Option<u16>,
        make: impl FnOnce(u16, u32) -> io::Result<(H, u16)>,
    ) -> io::Result<Opened> {
        let fam = family(exit);
        let peers = &self.peers;
        let f = &mut self.families[fam];
        let carries = |i: u32| peers.contains_key(&(pool_id(fam, i), exit));
        // Whether the index came off the exit's holes (it goes back if no socket opens).
        let mut from_hole = false;
        let index = match local_port {
            Some(port) => match f.by_port.get(&port) {
                Some(&i) if carries(i) => return Err(io::ErrorKind::AddrInUse.into()),
                Some(&i) => i,
                None => f.slots.len() as u32,
            },
            None => {
                let fill = f.by_exit.entry(exit).or_default();
                let mut found = None;
                while let Some(i) = fill.holes.pop() {
                    if !carries(i) {
                        found = Some(i);
                        break;
                    }
                }
                from_hole = found.is_some();
                match found {
                    Some(i) => i,
                    None => loop {
                        let i = fill.below;
                        if !carries(i) {
                            break i;
                        }
                        fill.below += 1;
                    },
                }
            }
        };
        let mut new_socket = false;
        if f.slots.get(index as usize).is_none_or(Option::is_none) {
            let (handle, port) = match make(local_port.unwrap_or(0), pool_id(fam, index)) {
                Ok(made) => made,
                Err(e) => {
                    // As it was: the hole stays free, an exit with no session has no entry.
                    if let Some(fill) = f.by_exit.get_mut(&exit) {
                        if from_hole {
                            fill.holes.push(index);
                        }
                        if fill.sessions == 0 {
                            f.by_exit.remove(&exit);
                        }
                    }
                    return Err(e);
                }
            };
            if f.slots.len() <= index as usize {
                f.slots.resize_with(index as usize + 1, || None);
            }
            f.slots[index as usize] = Some(Pooled {
                handle,
                port,
                carried: 0,
            });
            f.by_port.insert(port, index);
            new_socket = true;
        }
        let fill = f.by_exit.entry(exit).or_default();
        if index >= fill.below {
            // A pinned port beyond the fill mark: what it skips is free for this exit.
            fill.holes.extend(fill.below..index);
            fill.below = index + 1;
        }
        fill.sessions += 1;
        if let Some(Some(s)) = f.slots.get_mut(index as usize) {
            s.carried += 1;
        }
        let pool = pool_id(fam, index);
        self.peers.insert((pool, exit), owner);
        let role = usize::from(owner.role.0);
        if self.owners.len() <= role {
            self.owners.resize_with(role + 1, Vec::new);
        }
        let table = &mut self.owners[role];
        let i = owner.slot.index as usize;
        if table.len() <= i {
            table.resize(i + 1, None);
        }
        table[i] = Some(Placed {
            generation: owner.slot.generation,
            pool,
            exit,
        });
        Ok(Opened { pool, new_socket })
    }

    /// Takes `owner` off its socket. Returns `None` if it has none here; else the pool id
    /// and, when that socket now carries nothing, its handle (closed by the caller).
    pub(crate) fn close(&mut self, owner: SocketOwner) -> Option<(u32, Option<H>)> {
        let placed = self.placed(owner)?;
        self.owners[usize::from(owner.role.0)][owner.slot.index as usize] = None;
        self.peers.remove(&(placed.pool, placed.exit));
        let (fam, index) = split(placed.pool);
        let f = &mut self.families[fam];
        if let Some(fill) = f.by_exit.get_mut(&placed.exit) {
            fill.sessions = fill.sessions.saturating_sub(1);
            if fill.sessions == 0 {
                f.by_exit.remove(&placed.exit);
            } else if index as u32 + 1 == fill.below {
                fill.below -= 1;
            } else {
                fill.holes.push(index as u32);
            }
        }
        let slot = f.slots.get_mut(index)?;
        let empty = slot.as_mut().is_some_and(|s| {
            s.carried = s.carried.saturating_sub(1);
            s.carried == 0
        });
        if !empty {
            return Some((placed.pool, None));
        }
        let s = slot.take()?;
        f.by_port.remove(&s.port);
        Some((placed.pool, Some(s.handle)))
    }

    fn placed(&self, owner: SocketOwner) -> Option<Placed> {
        let p = (*self
            .owners
            .get(usize::from(owner.role.0))?
            .get(owner.slot.index as usize)?)?;
        (p.generation == owner.slot.generation).then_some(p)
    }

    /// `owner`'s socket and the exit it sends to, if it is on one here.
    pub(crate) fn of(&self, owner: SocketOwner) -> Option<(u32, SocketAddr)> {
        self.placed(owner).map(|p| (p.pool, p.exit))
    }

    /// The owner of what arrived on socket `pool` from `from`: the session or flow whose
    /// exit `from` is, if any.
    pub(crate) fn owner(&self, pool: u32, from: SocketAddr) -> Option<SocketOwner> {
        self.peers.get(&(pool, from)).copied()
    }

    /// Socket `pool`'s handle.
    pub(crate) fn handle(&self, pool: u32) -> Option<&H> {
        let (fam, index) = split(pool);
        self.families[fam]
            .slots
            .get(index)?
            .as_ref()
            .map(|s| &s.handle)
    }

    pub(crate) fn handle_mut(&mut self, pool: u32) -> Option<&mut H> {
        let (fam, index) = split(pool);
        self.families[fam]
            .slots
            .get_mut(index)?
            .as_mut()
            .map(|s| &mut s.handle)
    }

    /// Sockets open.
    #[cfg(test)]
    fn sockets(&self) -> usize {
        self.families
            .iter()
            .map(|f| f.slots.iter().flatten().count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::RoleId;
    use crate::slab::SessionSlot;

    fn owner(i: u32) -> SocketOwner {
        SocketOwner {
            role: RoleId(0),
            slot: SessionSlot {
                index: i,
                generation: 7,
            },
        }
    }

    fn exit(i: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 1000 + i))
    }

    /// A pool whose "sockets" are numbers (their port is 40000 + the number).
    struct Pool {
        p: SharedExitSockets<u16>,
        next: u16,
    }

    impl Pool {
        fn open(&mut self, o: u32, e: u16, port: Option<u16>) -> io::Result<Opened> {
            let next = &mut self.next;
            self.p.open(owner(o), exit(e), port, |p, _| {
                *next += 1;
                let h = if p == 0 { *next } else { p - 40000 };
                Ok((h, 40000 + h))
            })
        }
    }

    #[test]
    fn sessions_of_different_exits_share_and_of_one_exit_never_do() {
        let mut p = Pool {
            p: SharedExitSockets::default(),
            next: 0,
        };
        let a = p.open(0, 0, None).unwrap();
        let b = p.open(1, 1, None).unwrap();
        let c = p.open(2, 0, None).unwrap();
        assert!(a.new_socket && !b.new_socket && c.new_socket);
        assert_eq!(a.pool, b.pool);
        assert_ne!(a.pool, c.pool);
        assert_eq!(p.p.sockets(), 2);
        assert_eq!(p.p.owner(a.pool, exit(1)), Some(owner(1)));
        assert_eq!(p.p.owner(a.pool, exit(2)), None, "a stranger");
        assert_eq!(p.p.of(owner(2)), Some((c.pool, exit(0))));
        // Closing one of two leaves the socket; closing both closes it.
        assert_eq!(p.p.close(owner(0)), Some((a.pool, None)));
        assert_eq!(p.p.owner(a.pool, exit(1)), Some(owner(1)));
        assert_eq!(p.p.close(owner(1)), Some((a.pool, Some(1))));
        assert_eq!(p.p.sockets(), 1);
        assert_eq!(p.p.close(owner(1)), None, "already gone");
        // Exit 0 still has a session on the second socket: the first is free again.
        let d = p.open(3, 0, None).unwrap();
        assert_eq!(d.pool, a.pool);
        assert!(d.new_socket);
    }

    #[test]
    fn sockets_needed_are_the_busiest_exits_sessions_under_churn() {
        let mut p = Pool {
            p: SharedExitSockets::default(),
            next: 0,
        };
        let mut open = Vec::new();
        let mut peak = 0;
        for round in 0..50u32 {
            for e in 0..4u16 {
                let o = round * 4 + u32::from(e);
                p.open(o, e, None).unwrap();
                open.push(o);
            }
            // Close every third, unevenly across exits.
            if round % 3 == 2 {
                let o = open.remove(round as usize % open.len());
                assert!(p.p.close(owner(o)).is_some());
            }
            let mut per_exit = [0usize; 4];
            for &o in &open {
                per_exit[(o % 4) as usize] += 1;
            }
            let busiest = *per_exit.iter().max().unwrap();
            peak = peak.max(busiest);
            assert!(p.p.sockets() >= busiest, "round {round}");
            assert!(p.p.sockets() <= peak, "round {round}");
        }
        // Per-client NAT: no socket carries two sessions of one exit.
        let mut seen = std::collections::HashSet::new();
        for &o in &open {
            let (pool, e) = p.p.of(owner(o)).unwrap();
            assert!(seen.insert((pool, e)));
        }
    }

    #[test]
    fn a_socket_that_cannot_open_changes_nothing() {
        let mut p = Pool {
            p: SharedExitSockets::default(),
            next: 0,
        };
        let a = p.open(0, 0, None).unwrap();
        p.open(1, 0, None).unwrap();
        p.open(2, 1, None).unwrap();
        assert_eq!(p.p.close(owner(0)).map(|(_, h)| h), Some(None));
        assert_eq!(
            p.p.close(owner(2)).map(|(_, h)| h),
            Some(Some(1)),
            "emptied"
        );
        // Exit 0's hole is socket a's index, now without a socket; opening one fails.
        let failed = p.p.open(owner(3), exit(0), None, |_, _| {
            Err(io::ErrorKind::Other.into())
        });
        assert!(failed.is_err());
        let failed = p.p.open(owner(4), exit(9), None, |_, _| {
            Err(io::ErrorKind::Other.into())
        });
        assert!(failed.is_err());
        assert!(!p.p.families[0].by_exit.contains_key(&exit(9)));
        // The hole is still exit 0's first choice.
        assert_eq!(p.open(5, 0, None).unwrap().pool, a.pool);
    }

    #[test]
    fn a_pinned_port_joins_its_socket_or_opens_it() {
        let mut p = Pool {
            p: SharedExitSockets::default(),
            next: 0,
        };
        let a = p.open(0, 0, Some(40100)).unwrap();
        let b = p.open(1, 1, Some(40100)).unwrap();
        assert_eq!(a.pool, b.pool);
        assert!(a.new_socket && !b.new_socket);
        assert_eq!(
            p.open(2, 0, Some(40100)).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        // Exit 1's next unpinned session skips the pinned socket it is on.
        let c = p.open(3, 1, None).unwrap();
        assert_ne!(c.pool, a.pool);
        let v6 =
            p.p.open(
                owner(4),
                SocketAddr::from(([0u16, 0, 0, 0, 0, 0, 0, 1], 9)),
                None,
                |_, _| Ok((77, 77)),
            )
            .unwrap();
        assert_ne!(v6.pool, a.pool, "a family of its own");
        assert_eq!(p.p.handle(v6.pool), Some(&77));
    }
}
