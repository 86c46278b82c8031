//! The kernel fast path as the data plane drives it (`wraithgate-fastpath`): attached once
//! by [`attach`] when `[relay] fast_path = "auto"` and the kernel allows it, then written by
//! each worker for the sessions it owns through its own [`FastSessions`].
//!
//! **API Boundary**: the router decides (it emits `Output::Offload`/`Output::Withdraw` for
//! sessions whose client has proven its address); this module only carries that out and
//! reads the kernel's per-session counters back into the router, so idle expiry, listings
//! and metrics see what the kernel forwarded. A failed offload leaves the session whole on
//! the userspace path.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use wraithgate_fastpath::{
    monotonic_now, Counters, FastPath, OffloadError, SessionId, SessionMaps, SessionRoute,
};

use super::config::{DataPlaneConfig, FastPathChoice};
use super::worker::Datapath;
use crate::role::{Listener, Role as _, SocketOwner, Traffic};
use crate::router::Router;
use crate::slab::SessionSlot;

/// Sessions whose kernel counters one housekeeping step reads at most (one `bpf()` call
/// each, about a microsecond): a step stays well under a millisecond, and with a step at
/// least every 100 ms even 65,536 offloaded sessions are each read within 13 s, far inside
/// the 540 s idle timeout.
const READS_PER_STEP: usize = 512;
/// A new round of counter reads starts at most this often.
const READ_ROUND: Duration = Duration::from_secs(1);

/// Attaches the fast path as `cfg` asks: `Ok(None)` when it is off, `Err(why)` when
/// `auto` cannot run here (one WARN line says so, and userspace forwards everything).
pub(crate) fn attach(cfg: &DataPlaneConfig) -> Result<Option<FastPath>, String> {
    if cfg.fast_path == FastPathChoice::Off {
        return Ok(None);
    }
    let interfaces = if cfg.fast_path_interfaces.is_empty() {
        wraithgate_fastpath::ethernet_interfaces()
    } else {
        cfg.fast_path_interfaces.clone()
    };
    if interfaces.is_empty() {
        let why = "no Ethernet interface to attach to (name them in [relay] \
                   fast_path_interfaces)";
        tracing::warn!("fast path off: {why}; forwarding in userspace");
        return Err(why.to_owned());
    }
    let names: Vec<&str> = interfaces.iter().map(String::as_str).collect();
    match FastPath::attach(&names) {
        Ok(fast) => {
            tracing::info!(interfaces = ?interfaces, "fast path attached (tc ingress, tcx links)");
            Ok(Some(fast))
        }
        Err(e) => {
            tracing::warn!("fast path off: {e}; forwarding in userspace");
            Err(e.to_string())
        }
    }
}

/// The session id of worker `worker`'s slot in the kernel maps: unique across workers.
fn session_id(worker: usize, slot: SessionSlot) -> Option<SessionId> {
    let worker = u32::try_from(worker).ok().filter(|&w| w < 256)?;
    (slot.index < 1 << 24).then_some(SessionId(worker << 24 | slot.index))
}

/// One worker's writer of the fast path's maps and what it has offloaded.
#[derive(Debug)]
pub(crate) struct FastSessions {
    worker: usize,
    maps: SessionMaps,
    held: HashMap<SessionSlot, Held>,
    /// The slots the current round of counter reads walks, and where it is.
    round: Vec<SessionSlot>,
    cursor: usize,
    next_round: Instant,
    /// Final counters of withdrawn sessions, folded into the router at the next step.
    withdrawn: Vec<(SessionSlot, Traffic, Traffic)>,
    /// Offloads that failed (the session stayed in userspace).
    pub errors: u64,
}

/// One offloaded session.
#[derive(Debug)]
struct Held {
    id: SessionId,
    indices: Vec<u32>,
    /// Its counters as last folded into the router.
    seen: Counters,
}

impl FastSessions {
    pub(crate) fn new(worker: usize, maps: SessionMaps, now: Instant) -> Self {
        FastSessions {
            worker,
            maps,
            held: HashMap::new(),
            round: Vec::new(),
            cursor: 0,
            next_round: now,
            withdrawn: Vec::new(),
            errors: 0,
        }
    }

    /// Sessions offloaded now.
    pub(crate) fn offloaded(&self) -> usize {
        self.held.len()
    }

    /// Whether the kernel maps hold session `slot`.
    pub(crate) fn holds(&self, slot: SessionSlot) -> bool {
        self.held.contains_key(&slot)
    }

    /// Offloads the session of `socket` with exactly `indices` (see `Output::Offload`). On
    /// any failure the session is withdrawn whole and stays on the userspace path.
    pub(crate) fn offload(
        &mut self,
        d: &impl Datapath,
        socket: SocketOwner,
        client: SocketAddr,
        listener: Listener,
        exit: SocketAddr,
        indices: &[u32],
    ) {
        let slot = socket.slot;
        let result = self
            .route(d, socket, client, listener, exit)
            .and_then(|route| {
                let id = session_id(self.worker, slot).ok_or("session id out of range")?;
                self.apply(slot, id, &route, indices)
                .map_err(|e| -> &'static str {
                    tracing::debug!(worker = self.worker, %client, error = %e, "offload refused");
                    "the kernel maps refused it"
                })
            });
        if let Err(why) = result {
            self.errors += 1;
            tracing::debug!(worker = self.worker, %client, %exit, why, "session stays in userspace");
            self.withdraw(socket);
        }
    }

    /// The four endpoints as the program sees them. A listener bound to the wildcard
    /// address answers from the address the kernel routes to the client by, as the
    /// userspace path's sends do, so that is the address the client sends to.
    fn route(
        &self,
        d: &impl Datapath,
        socket: SocketOwner,
        client: SocketAddr,
        listener: Listener,
        exit: SocketAddr,
    ) -> Result<SessionRoute, &'static str> {
        let v4 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => Some(a),
            SocketAddr::V6(_) => None,
        };
        let client = v4(client).ok_or("IPv6 client")?;
        let exit = v4(exit).ok_or("IPv6 exit")?;
        let mut exit_facing = d
            .local_addr(socket)
            .and_then(v4)
            .ok_or("exit-facing socket has no IPv4 address")?;
        // A shared (unconnected) socket bound to the wildcard address sends from the address
        // the kernel routes to the exit by, as a connected one does: the exit answers there.
        // The program's exit-side key is the whole 4-tuple, and a shared socket carries one
        // session per exit, so sessions sharing a socket never share a key.
        if exit_facing.ip().is_unspecified() {
            let source = route_source(exit).ok_or("no route to the exit")?;
            exit_facing = SocketAddrV4::new(source, exit_facing.port());
        }
        let mut listen = d
            .listener_local(listener.id)
            .and_then(v4)
            .ok_or("listener gone")?;
        if listen.ip().is_unspecified() {
            let source = route_source(client).ok_or("no route back to the client")?;
            listen = SocketAddrV4::new(source, listen.port());
        }
        Ok(SessionRoute {
            client,
            listen,
            exit_facing,
            exit,
        })
    }

    fn apply(
        &mut self,
        slot: SessionSlot,
        id: SessionId,
        route: &SessionRoute,
        indices: &[u32],
    ) -> Result<(), OffloadError> {
        let held = self.held.entry(slot).or_insert_with(|| Held {
            id,
            indices: Vec::new(),
            seen: Counters::default(),
        });
        // Withdrawn first: the index limit counts what is in the map.
        for old in held.indices.clone() {
            if !indices.contains(&old) {
                self.maps.withdraw_index(id, old)?;
                held.indices.retain(|&i| i != old);
            }
        }
        for &index in indices {
            if !held.indices.contains(&index) {
                self.maps.offload_client_to_exit(id, route, index)?;
                held.indices.push(index);
            }
        }
        self.maps.offload_exit_to_client(id, route)
    }

    /// Withdraws the session of `socket`, if offloaded; its final counters are folded into
    /// the router at the next [`FastSessions::fold`].
    pub(crate) fn withdraw(&mut self, socket: SocketOwner) {
        let Some(held) = self.held.remove(&socket.slot) else {
            return;
        };
        match self.maps.withdraw(held.id) {
            Ok(last) => {
                if let Some(last) = last {
                    let (to_exit, to_client, _) = delta(&held.seen, &last);
                    self.withdrawn.push((socket.slot, to_exit, to_client));
                }
            }
            Err(e) => {
                tracing::warn!(worker = self.worker, error = %e, "fast path withdrawal failed")
            }
        }
    }

    /// Withdraws every session (the worker stops).
    pub(crate) fn withdraw_all(&mut self, router: &mut Router, now: Instant) {
        let slots: Vec<SessionSlot> = self.held.keys().copied().collect();
        for slot in slots {
            self.withdraw(Router::socket(slot));
        }
        self.fold(router, now, true);
    }

    /// Reads the kernel's counters of a share of the offloaded sessions (all of them within
    /// a round, [`READ_ROUND`] at most apart, [`READS_PER_STEP`] a step) and folds what is
    /// new into the router: traffic, and last activity. `all` reads every session now.
    pub(crate) fn fold(&mut self, router: &mut Router, now: Instant, all: bool) {
        for (slot, to_exit, to_client) in self.withdrawn.drain(..) {
            router.fast_path_traffic(slot, to_exit, to_client, None);
        }
        if self.cursor >= self.round.len() {
            if !all && now < self.next_round {
                return;
            }
            self.round.clear();
            self.round.extend(self.held.keys().copied());
            self.cursor = 0;
            self.next_round = now + READ_ROUND;
        }
        let budget = if all { usize::MAX } else { READS_PER_STEP };
        let mono = monotonic_now();
        let end = self.round.len().min(self.cursor.saturating_add(budget));
        for &slot in &self.round[self.cursor..end] {
            let Some(held) = self.held.get_mut(&slot) else {
                continue;
            };
            let Ok(Some(c)) = self.maps.counters(held.id) else {
                continue;
            };
            let (to_exit, to_client, fresh) = delta(&held.seen, &c);
            held.seen = c;
            let last_seen = if fresh {
                c.last_seen
                    .and_then(|t| now.checked_sub(mono.saturating_sub(t)))
            } else {
                None
            };
            if to_exit.packets > 0 || to_client.packets > 0 || last_seen.is_some() {
                router.fast_path_traffic(slot, to_exit, to_client, last_seen);
            }
        }
        self.cursor = end;
    }
}

/// What `now` adds to `before`, per direction, and whether the kernel forwarded anything
/// since.
fn delta(before: &Counters, now: &Counters) -> (Traffic, Traffic, bool) {
    let d = |a: &wraithgate_fastpath::DirectionCounters,
             b: &wraithgate_fastpath::DirectionCounters| {
        Traffic {
            packets: b.packets.saturating_sub(a.packets),
            bytes: b.bytes.saturating_sub(a.bytes),
        }
    };
    let to_exit = d(&before.client_to_exit, &now.client_to_exit);
    let to_client = d(&before.exit_to_client, &now.exit_to_client);
    (to_exit, to_client, now.last_seen > before.last_seen)
}

/// The source address the kernel picks for a datagram to `client` (a connected UDP
/// socket's local address; nothing is sent).
fn route_source(peer: SocketAddrV4) -> Option<std::net::Ipv4Addr> {
    let probe = UdpSocket::bind("0.0.0.0:0").ok()?;
    probe.connect(peer).ok()?;
    match probe.local_addr().ok()? {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_unique_across_workers_and_refused_out_of_range() {
        let slot = |index| SessionSlot {
            index,
            generation: 3,
        };
        assert_eq!(session_id(0, slot(5)), Some(SessionId(5)));
        assert_eq!(session_id(2, slot(5)), Some(SessionId(2 << 24 | 5)));
        assert_ne!(session_id(1, slot(0)), session_id(0, slot(1 << 23)));
        assert_eq!(session_id(256, slot(0)), None, "worker out of range");
        assert_eq!(session_id(0, slot(1 << 24)), None, "slot out of range");
    }

    #[test]
    fn deltas_count_what_is_new_and_whether_the_kernel_forwarded_since() {
        let at = |p: u64, b: u64, seen: u64| Counters {
            client_to_exit: wraithgate_fastpath::DirectionCounters {
                packets: p,
                bytes: b,
            },
            exit_to_client: wraithgate_fastpath::DirectionCounters {
                packets: 2 * p,
                bytes: 2 * b,
            },
            last_seen: (seen > 0).then(|| Duration::from_nanos(seen)),
        };
        let (e, c, fresh) = delta(&at(10, 1_000, 5), &at(15, 1_600, 9));
        assert_eq!(
            (e.packets, e.bytes, c.packets, c.bytes),
            (5, 600, 10, 1_200)
        );
        assert!(fresh);
        let (e, _, fresh) = delta(&at(15, 1_600, 9), &at(15, 1_600, 9));
        assert_eq!(e.packets, 0);
        assert!(
            !fresh,
            "nothing new: last activity stays as the router has it"
        );
        let (e, _, fresh) = delta(&Counters::default(), &at(1, 32, 7));
        assert_eq!((e.packets, e.bytes), (1, 32));
        assert!(fresh, "the first packet ever");
    }
}
