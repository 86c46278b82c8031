//! The worker, written once: it owns the roles (the DoubleHop router and Z-HOP), picks up
//! tables, runs every segment of a received message (a datagram or a GRO train) through
//! the role that claims it, carries out what the roles ask of the sockets, answers control
//! requests, restores sessions and publishes its counters.
//!
//! A backend supplies its sockets ([`Datapath`]: how it opens, closes and sends on them)
//! and how it waits and receives ([`Backend`]); the loop around them is [`run`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, TryLockError};
use std::time::{Duration, Instant};

use super::exit::ExitIo;
use super::fastpath::FastSessions;
use super::runs::Target;
use super::sys;
use super::{
    BoundListener, DataPlaneConfig, IoStats, SharedReport, WorkerContext, WorkerReport,
    WorkerRequest,
};
use crate::drop_reason::DropReason;
use crate::role::{Datagram, Listener, Output, Role, SocketOwner};
use crate::router::{Router, SessionSnapshot};
use crate::table::{ExitTable, SharedTable};
use crate::zhop::{NodeKey, Zhop};

/// The token under which a worker's TUN queue is registered in its poll (both backends
/// watch that poll: portable directly, io_uring through a poll on its descriptor).
pub(crate) const TUN_TOKEN: mio::Token = mio::Token(usize::MAX - 1);

/// Longest a worker waits for traffic, so that shutdown and table swaps are noticed when
/// idle.
pub(crate) const MAX_WAIT: Duration = Duration::from_millis(100);
/// How often a worker publishes its counters.
const REPORT_EVERY: Duration = Duration::from_millis(50);

/// A backend's sockets, as the worker needs them. Besides listeners, every socket is owned
/// by a role ([`SocketOwner`], opaque here): a backend keeps them by owner and hands what
/// they receive back as [`Source::Socket`], so a new role never edits a backend.
pub(crate) trait Datapath {
    /// Opens a socket for `owner`, connected to `peer` (bound to `local_port` when given:
    /// a restored session keeps the port its exit knows).
    fn open(
        &mut self,
        owner: SocketOwner,
        peer: SocketAddr,
        local_port: Option<u16>,
    ) -> io::Result<()>;
    /// Closes `owner`'s socket, after sending what waits for it. Returns whether it had
    /// one.
    fn close(&mut self, owner: SocketOwner) -> bool;
    /// A plain synchronous send from a listener: for the relay's cookie replies (rare, and
    /// 64 bytes), never the forwarded packets.
    fn send_from_listener(&self, listener: Listener, to: SocketAddr, bytes: &[u8]) -> bool;
    /// Queues a copy of a role's `bytes` towards `target` (batched with the others of the
    /// batch). Returns `false` when the socket is gone.
    fn send(&mut self, target: Target, bytes: &[u8]) -> bool;
    /// Takes a listener bound by the control side for a newly pinned port.
    fn add_listener(&mut self, l: BoundListener);
    /// Closes the listener bound to `local` (a port no longer pinned), if any.
    fn remove_listener(&mut self, local: SocketAddr) -> Option<Listener>;
    /// The local address of `owner`'s socket (its source address once connected; a shared
    /// socket's bound address).
    fn local_addr(&self, owner: SocketOwner) -> Option<SocketAddr>;
    /// The owner of a datagram from `from` on shared socket `pool`: the session or flow
    /// whose exit `from` is, if any.
    fn shared_owner(&self, pool: u32, from: SocketAddr) -> Option<SocketOwner>;
    /// The local port of `owner`'s socket.
    fn local_port(&self, owner: SocketOwner) -> Option<u16> {
        self.local_addr(owner).map(|a| a.port())
    }
    /// The address listener `id` is bound to.
    fn listener_local(&self, id: u16) -> Option<SocketAddr>;
    /// The listener on `port` for clients of `client`'s address family.
    fn listener_for(&self, port: u16, client: SocketAddr) -> Option<Listener>;
    /// The backend's counters.
    fn stats(&mut self) -> &mut IoStats;
}

/// A backend's own part of the worker loop: its housekeeping around
/// [`Worker::housekeeping`] (flushing what Z-HOP queued, publishing), and how it waits for
/// traffic and serves what arrived. The loop itself is [`run`].
pub(crate) trait Backend {
    fn worker(&self) -> &Worker;
    fn stats(&mut self) -> &mut IoStats;
    /// One housekeeping step at `now`.
    fn housekeeping(&mut self, now: Instant);
    /// Whether work is waiting that must not wait for traffic.
    fn busy(&self) -> bool;
    /// Waits at most `wait` for traffic, then receives and serves what arrived.
    fn serve(&mut self, wait: Duration) -> io::Result<()>;
}

/// A worker's loop, whatever its backend: housekeeping, then wait for traffic no longer
/// than the roles' timers allow and serve it, until the data plane shuts down.
pub(crate) fn run(b: &mut impl Backend) -> io::Result<()> {
    loop {
        if b.worker().stopping() {
            return Ok(());
        }
        let now = Instant::now();
        b.housekeeping(now);
        let spent = now.elapsed().as_nanos() as u64;
        let io = b.stats();
        io.housekeeping_max_ns = io.housekeeping_max_ns.max(spent);
        let wait = b.worker().wait(now, b.busy());
        b.serve(wait)?;
    }
}

/// What a backend keeps of its [`WorkerContext`]; the rest is the [`Worker`]'s.
pub(crate) struct BackendContext {
    pub cfg: DataPlaneConfig,
    /// Its waker's registry: the worker learns of requests and shutdown through it.
    pub poll: mio::Poll,
    pub listeners: Vec<BoundListener>,
    /// Sessions saved before a restart that this worker's clients are steered to.
    pub restore: Vec<SessionSnapshot>,
}

/// What a worker is, whatever its backend: its roles, its view of the table, and its line
/// to the control side.
pub(crate) struct Worker {
    pub id: usize,
    pub router: Router,
    pub zhop: Zhop,
    /// This worker's writer of the kernel fast path's maps, when it is attached.
    fast: Option<FastSessions>,
    /// The Exit role's TUN queue, when the node has a TUN device.
    pub exit: Option<ExitIo>,
    table: SharedTable,
    requests: mpsc::Receiver<WorkerRequest>,
    report: SharedReport,
    shutdown: Arc<AtomicBool>,
    last_report: Instant,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("id", &self.id).finish()
    }
}

impl Worker {
    /// A worker with the roles the configuration asks for, routing by the current table,
    /// and what of `ctx` its backend keeps.
    pub(crate) fn new(ctx: WorkerContext, now: Instant) -> (Worker, BackendContext) {
        let current = ctx.table.load();
        let mut router_cfg = ctx.cfg.router.clone();
        router_cfg.offload = ctx.fast.is_some();
        let mut zhop = Zhop::new(
            ctx.cfg.node_key.map(NodeKey::from_secret),
            current.clone(),
            ctx.cfg.router.cookie_settings(),
            now,
        );
        let exit = ctx.exit.and_then(|e| {
            let fd = e.queue.as_raw_fd();
            let registered = ctx.poll.registry().register(
                &mut mio::unix::SourceFd(&fd),
                TUN_TOKEN,
                mio::Interest::READABLE,
            );
            match registered {
                Ok(()) => {
                    zhop.enable_exit(ctx.id);
                    Some(ExitIo::new(ctx.id, e))
                }
                Err(e) => {
                    tracing::error!(worker = ctx.id, error = %e, "cannot watch the TUN queue");
                    None
                }
            }
        });
        let worker = Worker {
            id: ctx.id,
            fast: ctx.fast.map(|maps| FastSessions::new(ctx.id, maps, now)),
            zhop,
            exit,
            router: Router::new(router_cfg, current, now),
            table: ctx.table,
            requests: ctx.requests,
            report: ctx.report,
            shutdown: ctx.shutdown,
            last_report: now,
        };
        let rest = BackendContext {
            cfg: ctx.cfg,
            poll: ctx.poll,
            listeners: ctx.listeners,
            restore: ctx.restore,
        };
        (worker, rest)
    }

    /// Takes the listeners bound at start-up and re-creates the sessions saved before a
    /// restart, each on the listener its client used.
    pub(crate) fn start(
        &mut self,
        d: &mut impl Datapath,
        listeners: Vec<BoundListener>,
        sessions: &[SessionSnapshot],
        now: Instant,
    ) {
        // The Exit role initiates to a peer's configured endpoint from the first listener of
        // its address family (the one its answer comes back to).
        let first: Vec<u16> = listeners.iter().map(|l| l.local.port()).take(1).collect();
        for l in listeners {
            d.add_listener(l);
        }
        if let (Some(exit), Some(&port)) = (self.exit.as_mut(), first.first()) {
            let v4 = d.listener_for(port, SocketAddr::from(([0, 0, 0, 0], 0)));
            let v6 = d.listener_for(port, SocketAddr::from(([0u16; 8], 0)));
            exit.set_listeners(v4, v6);
        }
        self.bring_up_keepalive_peers(d, now);
        let mut restored = 0;
        for snap in sessions {
            let Some(listener) = d.listener_for(snap.listen_port, snap.client) else {
                continue;
            };
            if self.router.restore(now, listener, snap).is_ok() {
                restored += 1;
            }
            self.router_commands(d);
        }
        if !sessions.is_empty() {
            tracing::info!(
                worker = self.id,
                restored,
                offered = sessions.len(),
                "sessions restored"
            );
        }
    }

    /// Whether the data plane is shutting down.
    pub(crate) fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// How long the backend may wait for traffic: not at all when it has work waiting
    /// (`busy`) or a table sweep is under way, else until the roles' next timer, at most
    /// [`MAX_WAIT`].
    pub(crate) fn wait(&self, now: Instant, busy: bool) -> Duration {
        if busy || self.router.sweeping() || self.exit.as_ref().is_some_and(ExitIo::busy) {
            return Duration::ZERO;
        }
        let next = match (
            Role::poll_timeout(&self.router),
            Role::poll_timeout(&self.zhop),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map_or(MAX_WAIT, |t| t.saturating_duration_since(now).min(MAX_WAIT))
    }

    /// The periodic part of a worker's loop that does not touch packets: a new table,
    /// router and Z-HOP timers, control requests. Returns whether the counters are due to
    /// be published: a new table is reported at once (the control side waits for every
    /// worker to route by it before it calls a swap done), otherwise every
    /// [`REPORT_EVERY`]. A step that took a new table or swept sessions of removed exits
    /// records the thread CPU time it used (the clock is read only then, never on an
    /// ordinary step).
    pub(crate) fn housekeeping(&mut self, d: &mut impl Datapath, now: Instant) -> bool {
        let new_table = self.table.load_if_changed(self.router.table());
        let took_table = new_table.is_some();
        let swap_work = took_table || self.router.sweeping();
        let cpu_at_start = swap_work.then(sys::thread_cpu_time);
        if let Some(t) = new_table {
            tracing::debug!(worker = self.id, generation = t.generation(), "new table");
            self.set_table(t);
            self.bring_up_keepalive_peers(d, now);
        }
        let id = self.id;
        // Kernel traffic first, so that idle expiry sees it.
        if let Some(f) = &mut self.fast {
            f.fold(&mut self.router, now, false);
        }
        let fast = &mut self.fast;
        let exit = &mut self.exit;
        let mut out = |o: Output<'_>| carry_out(id, d, fast, o, &mut |_| {}, exit);
        Role::handle_timeout(&mut self.router, now, &mut out);
        Role::handle_timeout(&mut self.zhop, now, &mut out);
        while let Ok(req) = self.requests.try_recv() {
            self.answer(d, req, now);
        }
        if let Some(c) = cpu_at_start {
            let ns = sys::thread_cpu_time().saturating_sub(c).as_nanos() as u64;
            let io = d.stats();
            io.swap_step_max_cpu_ns = io.swap_step_max_cpu_ns.max(ns);
        }
        took_table || now.duration_since(self.last_report) >= REPORT_EVERY
    }

    fn set_table(&mut self, t: Arc<ExitTable>) {
        Role::set_table(&mut self.router, t.clone());
        Role::set_table(&mut self.zhop, t);
    }

    fn answer(&mut self, d: &mut impl Datapath, req: WorkerRequest, now: Instant) {
        let router = &mut self.router;
        match req {
            WorkerRequest::Sessions(reply) => {
                // Offloaded as the kernel maps hold it (an offload the maps refused left
                // the session in userspace, whatever the router asked).
                let fast = self.fast.as_ref();
                let list = router
                    .sessions(now)
                    .map(|mut info| {
                        info.exit_port = d.local_port(Router::socket(info.slot));
                        info.offloaded = fast.is_some_and(|f| f.holds(info.slot));
                        info
                    })
                    .collect();
                let _ = reply.send(list);
            }
            WorkerRequest::CloseSession { slot, reply } => {
                let _ = reply.send(router.close_session(slot));
                self.router_commands(d);
            }
            WorkerRequest::Snapshot(reply) => {
                let snaps = router
                    .sessions(now)
                    .filter_map(|info| {
                        let port = d.local_port(Router::socket(info.slot))?;
                        Some(SessionSnapshot::new(info, port))
                    })
                    .collect();
                let _ = reply.send(snaps);
            }
            WorkerRequest::Peers(reply) => {
                let _ = reply.send(self.zhop.peer_statuses(self.id));
            }
            WorkerRequest::AddListener(l) => d.add_listener(l),
            WorkerRequest::RemoveListener(local) => {
                // Z-HOP peers that used it find their replies unsendable (counted) until
                // they come back through a listener that is open.
                if let Some(l) = d.remove_listener(local) {
                    router.listener_closed(l);
                }
            }
        }
    }

    /// Publishes the counters (`io`, the backend's) unless the control side is reading
    /// them at this moment; then the next housekeeping step tries again.
    pub(crate) fn publish(&mut self, io: &IoStats, now: Instant) {
        let exit = self.exit.as_ref().map(|e| &e.stats);
        if publish(
            &self.report,
            &self.router,
            &self.zhop,
            self.fast.as_ref(),
            exit,
            io,
        ) {
            self.last_report = now;
        }
    }

    /// Withdraws every session from the fast path and folds their last kernel counters in
    /// (the worker stops; publish afterwards).
    pub(crate) fn stop_fast_path(&mut self, now: Instant) {
        if let Some(f) = &mut self.fast {
            f.withdraw_all(&mut self.router, now);
        }
    }

    /// Carries out the router's pending commands: open or close exit sockets, send the
    /// relay's cookie replies.
    fn router_commands(&mut self, d: &mut impl Datapath) {
        let id = self.id;
        let fast = &mut self.fast;
        let exit = &mut self.exit;
        self.router
            .drain_commands(&mut |o: Output<'_>| carry_out(id, d, fast, o, &mut |_| {}, exit));
    }

    /// Exit role: starts a tunnel with each peer that has an endpoint and a persistent
    /// keepalive, whose answers reach this worker, and that no worker holds a tunnel with
    /// (at start and with each new table), as `wg` does when such a peer is configured.
    fn bring_up_keepalive_peers(&mut self, d: &mut impl Datapath, now: Instant) {
        let Some(exit) = self.exit.as_mut() else {
            return;
        };
        let id = self.id;
        let table = self.router.table().clone();
        let mut none = None;
        let mut out = |o: Output<'_>| carry_out(id, d, &mut None, o, &mut |_| {}, &mut none);
        exit.bring_up(&mut self.zhop, &table, now, &mut out);
    }

    /// The backend saw the TUN queue become readable.
    pub(crate) fn tun_readable(&mut self) {
        if let Some(e) = &mut self.exit {
            e.set_readable();
        }
    }

    /// The Exit role's turn: packets handed over by other workers, then a batch from the
    /// TUN queue. The backend flushes its sends after it, as after a receive batch.
    pub(crate) fn serve_exit(&mut self, d: &mut impl Datapath, now: Instant) {
        let Some(exit) = self.exit.as_mut() else {
            return;
        };
        let id = self.id;
        let mut none = None;
        let mut out = |o: Output<'_>| carry_out(id, d, &mut None, o, &mut |_| {}, &mut none);
        exit.serve(&mut self.zhop, self.router.table(), now, &mut out);
    }

    /// Writes the decrypted packets waiting for the TUN device (end of a batch).
    pub(crate) fn flush_tun(&mut self) {
        if let Some(e) = &mut self.exit {
            for _ in 0..e.flush() {
                self.zhop.record_drop(DropReason::ExitTunWriteFailed);
            }
        }
    }

    /// Runs each segment of `msg` through the role it is for: a client datagram, parsed
    /// once, through the roles in order (the first that claims it handles it), a datagram
    /// on a role's own socket through that role. What the roles ask of the sockets is
    /// carried out by `d` as it comes (an exit socket exists before anything is sent
    /// through it); `forward` gets the target, offset and length of each segment a role
    /// forwards as it arrived.
    pub(crate) fn route(
        &mut self,
        d: &mut impl Datapath,
        now: Instant,
        msg: Message<'_>,
        mut forward: impl FnMut(Target, usize, usize),
    ) {
        let Message {
            source,
            from,
            payload,
            stride,
        } = msg;
        let len = payload.len();
        let stride = if stride == 0 { len } else { stride };
        // A shared exit-facing socket: the source says whose it is (a GRO train has one).
        let source = match source {
            Source::Shared(pool) => match d.shared_owner(pool, from) {
                Some(owner) => Source::Socket(owner),
                None => {
                    for _ in 0..len.div_ceil(stride).max(1) {
                        self.router.record_drop(DropReason::SharedSocketStranger);
                    }
                    return;
                }
            },
            s => s,
        };
        let mut offset = 0;
        // At least one pass, so that an empty datagram reaches the router too and is
        // counted (as truncated) like any other malformed one.
        let mut first = true;
        while offset < len || first {
            first = false;
            let seg_len = stride.min(len - offset);
            let start = offset;
            let seg = &payload[start..start + seg_len];
            offset += seg_len;
            let id = self.id;
            let fast = &mut self.fast;
            let exit = &mut self.exit;
            let mut out = |o: Output<'_>| {
                carry_out(id, d, fast, o, &mut |t| forward(t, start, seg_len), exit)
            };
            match source {
                // Z-HOP first: it claims only its own (and asks the router only whether it
                // knows an address); the router takes every client datagram left.
                Source::Client(l) => offer(
                    &mut self.zhop,
                    &mut self.router,
                    now,
                    l,
                    &Datagram::parse(from, seg),
                    &mut out,
                ),
                // Each role's own sockets, by the id the role is registered under.
                Source::Socket(SocketOwner { role, slot }) => match role {
                    Router::ID => self.router.handle_socket(now, slot, seg, &mut out),
                    Zhop::ID => self.zhop.handle_socket(now, slot, seg, &mut out),
                    _ => {}
                },
                Source::Shared(_) => {}
            }
        }
    }

    /// Counts the datagrams whose sends failed (`failed`, which is reset).
    pub(crate) fn record_send_failures(&mut self, failed: &mut usize) {
        for _ in 0..std::mem::take(failed) {
            self.router.record_drop(DropReason::SendFailed);
        }
    }
}

/// Offers a client datagram to role `first`, then to `then`: the first that claims it
/// handles it. A role that claims every datagram (the router) goes last.
fn offer<A: Role, B: Role>(
    first: &mut A,
    then: &mut B,
    now: Instant,
    listener: Listener,
    dg: &Datagram<'_>,
    out: &mut impl FnMut(Output<'_>) -> bool,
) {
    if let Some(claim) = first.claim(dg, || then.knows_client(dg.from)) {
        first.handle_client(now, listener, dg, claim, out);
    } else if let Some(claim) = then.claim(dg, || false) {
        then.handle_client(now, listener, dg, claim, out);
    }
}

/// Carries out one role output through `d`; `forward` sends the segment being handled.
/// Returns whether it was carried out.
fn carry_out(
    worker: usize,
    d: &mut impl Datapath,
    fast: &mut Option<FastSessions>,
    o: Output<'_>,
    forward: &mut impl FnMut(Target),
    exit: &mut Option<ExitIo>,
) -> bool {
    match o {
        Output::Offload {
            socket,
            client,
            listener,
            exit,
            indices,
        } => match fast {
            Some(f) => {
                f.offload(&*d, socket, client, listener, exit, indices);
                true
            }
            None => false,
        },
        Output::Withdraw { socket } => {
            if let Some(f) = fast {
                f.withdraw(socket);
            }
            true
        }
        Output::ToTun { bytes } => exit.as_mut().is_some_and(|e| e.write(bytes)),
        Output::Forward(target) => {
            forward(target);
            true
        }
        Output::Send { to, bytes } => d.send(to, bytes),
        Output::Reply {
            listener,
            to,
            bytes,
        } => {
            let sent = d.send_from_listener(listener, to, bytes);
            if !sent {
                d.stats().cookie_send_errors += 1;
            }
            sent
        }
        Output::Open {
            socket,
            exit,
            local_port,
        } => match d.open(socket, exit, local_port) {
            Ok(()) => {
                // The DoubleHop sessions' sockets are the ones `/metrics` counts as open.
                if socket.role == Router::ID {
                    d.stats().exit_sockets_open += 1;
                }
                true
            }
            Err(e) => {
                let role = socket.role.0;
                tracing::warn!(worker, role, %exit, error = %e, "cannot open a socket towards an exit");
                false
            }
        },
        Output::Close { socket } => {
            if d.close(socket) && socket.role == Router::ID {
                d.stats().exit_sockets_open -= 1;
            }
            true
        }
    }
}

/// The socket a message arrived on, as the roles know it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    Client(Listener),
    /// A socket a role owns.
    Socket(SocketOwner),
    /// A shared exit-facing socket, by pool id: its owner is the datagram's source's.
    Shared(u32),
}
/// One received message: a datagram, or a GRO train of `stride`-sized datagrams.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub source: Source,
    pub from: SocketAddr,
    pub payload: &'a [u8],
    pub stride: usize,
}

/// Whether a message of `len` bytes received with GRO segment size `stride` is a train of
/// several datagrams.
pub(crate) fn is_train(len: usize, stride: usize) -> bool {
    stride != 0 && stride < len
}

/// Publishes a worker's counters for the control side, unless a reader holds the report at
/// this moment: a worker never waits for the control side. Returns whether it published;
/// when not, the caller tries again on its next loop iteration.
pub(crate) fn publish(
    report: &Mutex<WorkerReport>,
    router: &Router,
    zhop: &Zhop,
    fast: Option<&FastSessions>,
    exit: Option<&super::exit::ExitStats>,
    io: &IoStats,
) -> bool {
    let mut r = match report.try_lock() {
        Ok(r) => r,
        Err(TryLockError::WouldBlock) => return false,
        // A reader panicked while cloning; the report itself is whole, and readers that
        // see the poison fall back to an empty one, so keep it current.
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
    };
    r.router.clone_from(router.stats());
    // Into the report's own allocation, which grows only when the router's entries do.
    let exits = router.exit_stats();
    r.exits.truncate(exits.len());
    let kept = r.exits.len();
    r.exits.clone_from_slice(&exits[..kept]);
    r.exits.extend_from_slice(&exits[kept..]);
    // `/metrics` counts drops by reason over every role.
    for (total, zhop) in r.router.drops.iter_mut().zip(Role::drops(zhop)) {
        *total += zhop;
    }
    r.io.clone_from(io);
    r.io.cpu_ns = sys::thread_cpu_time().as_nanos() as u64;
    r.sessions = router.session_count();
    r.pending = router.pending_count();
    r.table_generation = router.table().generation();
    r.zhop = zhop.stats();
    r.fast_path = fast.map(|f| super::stats::FastPathReport {
        offloaded: f.offloaded(),
        errors: f.errors,
    });
    if let Some(e) = exit {
        r.exit.clone_from(e);
    }
    r.published = Some(std::time::Instant::now());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_skips_while_a_reader_holds_the_report_and_never_waits() {
        let now = Instant::now();
        let table = std::sync::Arc::new(ExitTable::new(1, Vec::new()).expect("empty table"));
        let cfg = crate::router::RouterConfig::default();
        let router = Router::new(cfg.clone(), table.clone(), now);
        let zhop = Zhop::new(None, table, cfg.cookie_settings(), now);
        let io = IoStats {
            recv_calls: 7,
            ..IoStats::default()
        };
        let report = Mutex::new(WorkerReport::default());

        let held = report.lock().expect("not poisoned");
        assert!(
            !publish(&report, &router, &zhop, None, None, &io),
            "skipped, not blocked"
        );
        drop(held);
        assert_eq!(report.lock().expect("not poisoned").io.recv_calls, 0);

        assert!(publish(&report, &router, &zhop, None, None, &io));
        let r = report.lock().expect("not poisoned");
        assert_eq!(r.io.recv_calls, 7);
        assert_eq!(r.table_generation, 1);
        assert!(r.published.is_some());
    }

    #[test]
    fn published_drops_are_every_roles_by_reason() {
        let now = Instant::now();
        let table = std::sync::Arc::new(ExitTable::new(1, Vec::new()).expect("empty table"));
        let cfg = crate::router::RouterConfig::default();
        let mut router = Router::new(cfg.clone(), table.clone(), now);
        let mut zhop = Zhop::new(None, table, cfg.cookie_settings(), now);
        Role::record_drop(&mut router, DropReason::SendFailed);
        Role::record_drop(&mut zhop, DropReason::SendFailed);
        Role::record_drop(&mut zhop, DropReason::OuterRejected);
        let report = Mutex::new(WorkerReport::default());
        assert!(publish(
            &report,
            &router,
            &zhop,
            None,
            None,
            &IoStats::default()
        ));
        let r = report.lock().expect("not poisoned");
        assert_eq!(r.router.dropped(DropReason::SendFailed), 2);
        assert_eq!(r.router.dropped(DropReason::OuterRejected), 1);
        assert_eq!(
            router.stats().dropped(DropReason::SendFailed),
            1,
            "each role's own"
        );
    }
}
