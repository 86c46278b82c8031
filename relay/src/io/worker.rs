//! What both backends do between receiving and sending: run every segment of a received
//! message (a datagram or a GRO train) through Z-HOP or the DoubleHop router, group what
//! the router forwards into runs, each of which leaves as one send (a GSO send when it
//! holds several segments), answer control requests and restore sessions.
//!
//! The backends differ only in how they receive, open sockets and send: that is
//! [`WorkerIo`]. The rest lives here once.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{mpsc, Mutex, TryLockError};
use std::time::Instant;

use super::sys::{self, SendBatch, Transmit, MAX_GSO_SEGMENTS};
use super::{BoundListener, IoStats, WorkerReport, WorkerRequest};
use crate::drop_reason::DropReason;
use crate::router::{Action, Listener, Router, SessionSlot, SessionSnapshot};
use crate::table::ExitTable;
use crate::zhop::{Zhop, ZhopOut};

/// A backend's sockets, as the shared logic needs them.
pub(crate) trait WorkerIo {
    /// Carries out the router's pending commands (open or close exit sockets).
    fn router_commands(&mut self, router: &mut Router);
    /// Queues one of Z-HOP's datagrams towards `target` (a flow's exit, or a peer's
    /// endpoint from a listener). Returns `false` when the socket is gone.
    fn zhop_send(&mut self, target: Target, bytes: &[u8]) -> bool;
    /// Opens Z-HOP flow `flow`'s socket, connected to `exit`.
    fn open_flow(&mut self, flow: SessionSlot, exit: SocketAddr);
    /// Closes Z-HOP flow `flow`'s socket, after sending what waits for it.
    fn close_flow(&mut self, flow: SessionSlot);
    /// Takes a listener bound by the control side for a newly pinned port.
    fn add_listener(&mut self, l: BoundListener);
    /// Closes the listener bound to `local` (a port no longer pinned), if any.
    fn remove_listener(&mut self, local: SocketAddr) -> Option<Listener>;
    /// The local port of session `slot`'s exit-facing socket.
    fn exit_port(&self, slot: SessionSlot) -> Option<u16>;
    /// The listener on `port` for clients of `client`'s address family.
    fn listener_for(&self, port: u16, client: SocketAddr) -> Option<Listener>;
}

/// The socket a message arrived on, as the router and Z-HOP know it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    Client(Listener),
    Exit(SessionSlot),
    /// A Z-HOP flow's socket towards an exit.
    Flow(SessionSlot),
}

/// Where a run of segments goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Exit(SessionSlot),
    /// From a listener to an address: a DoubleHop client, or a Z-HOP peer's endpoint.
    Client {
        listener: u16,
        addr: SocketAddr,
    },
    /// Through a Z-HOP flow's socket to its exit.
    Flow(SessionSlot),
}

impl Target {
    /// Where the router said a segment goes, or `None` when it dropped it.
    pub(crate) fn of(action: Action) -> Option<Target> {
        match action {
            Action::ToExit(slot) => Some(Target::Exit(slot)),
            Action::ToClient { listener, client } => Some(Target::Client {
                listener: listener.id,
                addr: client,
            }),
            Action::Drop(_) => None,
        }
    }

    /// The address to send to, or `None` for a connected socket.
    pub(crate) fn address(self) -> Option<SocketAddr> {
        match self {
            Target::Client { addr, .. } => Some(addr),
            Target::Exit(_) | Target::Flow(_) => None,
        }
    }
}

/// Consecutive segments of one received message going to one target. `msg` names the
/// message in the backend's own terms (a batch index, a ring buffer id).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub target: Target,
    pub msg: usize,
    pub start: usize,
    pub len: usize,
    pub segment: usize,
    pub segments: usize,
}

impl Run {
    /// The UDP_SEGMENT size to send this run with, when it holds more than one segment.
    pub(crate) fn segment_size(&self) -> Option<u16> {
        (self.segments > 1).then_some(self.segment as u16)
    }

    /// Its segments one by one, as (start, length): how it leaves a socket without GSO.
    pub(crate) fn singles(&self) -> impl Iterator<Item = (usize, usize)> {
        let (start, end, seg) = (self.start, self.start + self.len, self.segment.max(1));
        (0..self.segments).map(move |i| {
            let s = start + i * seg;
            (s, seg.min(end - s))
        })
    }
}

/// Adds a forwarded segment to `runs`: it extends the last run when it directly follows it
/// in the same message, goes to the same target, and GSO may carry it (`gso`); otherwise
/// it starts a run of its own.
pub(crate) fn plan(
    runs: &mut Vec<Run>,
    gso: bool,
    target: Target,
    msg: usize,
    start: usize,
    len: usize,
) {
    if let Some(run) = runs.last_mut() {
        let contiguous = run.msg == msg && run.start + run.len == start;
        // GSO needs equal segments; only the last may be shorter. An empty datagram is
        // never a segment (a segment size of 0 means no segmentation).
        let fits = len > 0 && len <= run.segment && run.len == run.segment * run.segments;
        if gso && contiguous && fits && run.target == target && run.segments < MAX_GSO_SEGMENTS {
            run.len += len;
            run.segments += 1;
            return;
        }
    }
    runs.push(Run {
        target,
        msg,
        start,
        len,
        segment: len,
        segments: 1,
    });
}

/// Sends `txs` on `fd` with as few `sendmmsg` calls as the batch allows. `gso` is whether
/// this socket may use GSO: when it may not, a message planned as a GSO run leaves as its
/// segments, one datagram each. When the kernel refuses GSO (EIO, EINVAL, EMSGSIZE) for a
/// message, `gso` is cleared for good (the caller keeps it per socket) and the message's
/// segments are sent one by one. Returns how many datagrams could not be sent.
pub(crate) fn send_all(
    send: &mut SendBatch,
    fd: RawFd,
    txs: &[Transmit<'_>],
    gso: &mut bool,
    io: &mut IoStats,
    worker: usize,
) -> usize {
    let mut failed = 0;
    let mut off = 0;
    while off < txs.len() {
        if !*gso && txs[off].segment_size.is_some() {
            failed += send_singly(send, fd, txs[off], io);
            off += 1;
            continue;
        }
        // Everything up to the next GSO message goes as it is (all of it while GSO is on).
        let end = if *gso {
            txs.len()
        } else {
            txs[off..]
                .iter()
                .position(|t| t.segment_size.is_some())
                .map_or(txs.len(), |p| off + p)
        };
        io.send_calls += 1;
        match send.send(fd, &txs[off..end]) {
            Ok(taken) => {
                let taken = taken.max(1);
                io.gso_sends += txs[off..off + taken]
                    .iter()
                    .filter(|t| t.segment_size.is_some())
                    .count() as u64;
                off += taken;
            }
            Err(e) => {
                failed += send_refused(send, fd, txs[off], e, gso, io, worker);
                off += 1;
            }
        }
    }
    failed
}

/// Sends a GSO message's segments as datagrams of their own, as few `sendmmsg` calls as
/// the batch allows. Returns the datagrams that could not be sent.
fn send_singly(send: &mut SendBatch, fd: RawFd, tx: Transmit<'_>, io: &mut IoStats) -> usize {
    const EMPTY: Transmit<'static> = Transmit {
        dest: None,
        contents: &[],
        segment_size: None,
    };
    let segment = tx
        .segment_size
        .map_or(tx.contents.len(), usize::from)
        .max(1);
    let mut failed = 0;
    // A planned run never has more than MAX_GSO_SEGMENTS segments; a longer message (from
    // no planner of ours) leaves in several rounds.
    for group in tx.contents.chunks(segment * MAX_GSO_SEGMENTS) {
        let mut singles = [EMPTY; MAX_GSO_SEGMENTS];
        let mut n = 0;
        for chunk in group.chunks(segment) {
            singles[n] = Transmit {
                dest: tx.dest,
                contents: chunk,
                segment_size: None,
            };
            n += 1;
        }
        let mut off = 0;
        while off < n {
            io.send_calls += 1;
            match send.send(fd, &singles[off..n]) {
                Ok(taken) => off += taken.max(1),
                Err(_) => {
                    failed += 1;
                    off += 1;
                }
            }
        }
    }
    failed
}

/// A send was refused. If the kernel refused GSO, stop using it and send the segments one
/// by one; anything else fails every datagram of the message. Returns the datagrams lost.
fn send_refused(
    send: &mut SendBatch,
    fd: RawFd,
    tx: Transmit<'_>,
    e: std::io::Error,
    gso: &mut bool,
    io: &mut IoStats,
    worker: usize,
) -> usize {
    if tx.segment_size.is_some() && sys::is_gso_error(&e) {
        if *gso {
            *gso = false;
            io.gso_fallbacks += 1;
            tracing::warn!(worker, error = %e,
                "kernel refused UDP GSO; this socket sends segments one by one from now on");
        }
        return send_singly(send, fd, tx, io);
    }
    tracing::trace!(worker, error = %e, "send failed");
    let segment = tx
        .segment_size
        .map_or(tx.contents.len(), usize::from)
        .max(1);
    tx.contents.len().div_ceil(segment).max(1)
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

/// Runs each segment of `msg` through Z-HOP (what it claims, and whatever arrives on a
/// flow socket) or the router. Z-HOP's events and the router's commands are carried out
/// by `io` as they come (an exit socket must exist before anything is sent through it);
/// `forward` gets the target, offset and length of each segment the router forwards.
pub(crate) fn route_message(
    router: &mut Router,
    zhop: &mut Zhop,
    io: &mut impl WorkerIo,
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
    let mut offset = 0;
    // At least one pass, so that an empty datagram reaches the router too and is counted
    // (as truncated) like any other malformed one.
    let mut first = true;
    while offset < len || first {
        first = false;
        let seg_len = stride.min(len - offset);
        let seg = &payload[offset..offset + seg_len];
        offset += seg_len;
        let mut failed = 0;
        let mut out = |o: ZhopOut<'_>| {
            if !zhop_event(io, o) {
                failed += 1;
            }
        };
        let zhop_result = match source {
            Source::Client(l) if zhop.claims(from, seg, || router.knows_client(from)) => {
                Some(zhop.handle_client(now, l, from, seg, &mut out))
            }
            Source::Flow(flow) => Some(zhop.handle_exit(now, flow, seg, &mut out)),
            _ => None,
        };
        if let Some(r) = zhop_result {
            record_zhop(router, r, failed);
            continue;
        }
        let action = match source {
            Source::Client(l) => router.handle_client(now, l, from, seg),
            Source::Exit(slot) => router.handle_exit(now, slot, seg),
            Source::Flow(_) => continue,
        };
        io.router_commands(router);
        if let Some(target) = Target::of(action) {
            forward(target, offset - seg_len, seg_len);
        }
    }
}

/// Carries out one Z-HOP event through `io`. Returns `false` when its send failed.
fn zhop_event(io: &mut impl WorkerIo, o: ZhopOut<'_>) -> bool {
    match o {
        ZhopOut::ToPeer {
            listener,
            to,
            bytes,
        } => io.zhop_send(
            Target::Client {
                listener: listener.id,
                addr: to,
            },
            bytes,
        ),
        ZhopOut::ToExit { flow, bytes } => io.zhop_send(Target::Flow(flow), bytes),
        ZhopOut::OpenFlow { flow, exit } => {
            io.open_flow(flow, exit);
            true
        }
        ZhopOut::CloseFlow { flow } => {
            io.close_flow(flow);
            true
        }
    }
}

/// Counts what Z-HOP refused and the sends of its events that failed.
fn record_zhop(router: &mut Router, r: Result<(), DropReason>, failed_sends: usize) {
    if let Err(reason) = r {
        router.record_drop(reason);
    }
    for _ in 0..failed_sends {
        router.record_drop(DropReason::SendFailed);
    }
}

/// Counts the Z-HOP datagrams whose sends failed (`failed`, which is reset).
pub(crate) fn record_send_failures(router: &mut Router, failed: &mut usize) {
    for _ in 0..std::mem::take(failed) {
        router.record_drop(DropReason::SendFailed);
    }
}

/// Runs `f` with a sink for Z-HOP events that `io` carries out, counting failed sends.
fn with_zhop_events(
    router: &mut Router,
    io: &mut impl WorkerIo,
    f: impl FnOnce(&mut dyn FnMut(ZhopOut<'_>)),
) {
    let mut failed = 0;
    f(&mut |o: ZhopOut<'_>| {
        if !zhop_event(io, o) {
            failed += 1;
        }
    });
    record_zhop(router, Ok(()), failed);
}

/// The periodic part of a worker's loop that does not touch packets: a new table, router
/// and Z-HOP timers, control requests. A step that took a new table or swept sessions of
/// removed exits returns the thread CPU time it used (the clock is read only then, never
/// on an ordinary step).
pub(crate) fn housekeeping(
    router: &mut Router,
    zhop: &mut Zhop,
    io: &mut impl WorkerIo,
    new_table: Option<std::sync::Arc<ExitTable>>,
    requests: &mpsc::Receiver<WorkerRequest>,
    now: Instant,
) -> Option<std::time::Duration> {
    let swap_work = new_table.is_some() || router.sweeping();
    let cpu_at_start = swap_work.then(super::sys::thread_cpu_time);
    if let Some(t) = new_table {
        router.set_table(t.clone());
        zhop.set_table(t);
    }
    router.handle_timeout(now);
    io.router_commands(router);
    with_zhop_events(router, io, |out| zhop.tick(now, out));
    while let Ok(req) = requests.try_recv() {
        match req {
            WorkerRequest::Sessions(reply) => {
                let _ = reply.send(router.sessions(now).collect());
            }
            WorkerRequest::CloseSession { slot, reply } => {
                let _ = reply.send(router.close_session(slot));
                io.router_commands(router);
            }
            WorkerRequest::Snapshot(reply) => {
                let snaps = router
                    .sessions(now)
                    .filter_map(|info| {
                        let port = io.exit_port(info.slot)?;
                        Some(SessionSnapshot::new(info, port))
                    })
                    .collect();
                let _ = reply.send(snaps);
            }
            WorkerRequest::AddListener(l) => io.add_listener(l),
            WorkerRequest::RemoveListener(local) => {
                // Z-HOP peers that used it find their replies unsendable (counted) until
                // they come back through a listener that is open.
                if let Some(l) = io.remove_listener(local) {
                    router.listener_closed(l);
                }
            }
        }
    }
    cpu_at_start.map(|c| super::sys::thread_cpu_time().saturating_sub(c))
}

/// Re-creates sessions saved before a restart, each on the listener its client used.
pub(crate) fn restore(
    worker: usize,
    router: &mut Router,
    io: &mut impl WorkerIo,
    sessions: &[SessionSnapshot],
    now: Instant,
) {
    let mut restored = 0;
    for snap in sessions {
        let Some(listener) = io.listener_for(snap.listen_port, snap.client) else {
            continue;
        };
        if router.restore(now, listener, snap).is_ok() {
            restored += 1;
        }
        io.router_commands(router);
    }
    if !sessions.is_empty() {
        tracing::info!(
            worker,
            restored,
            offered = sessions.len(),
            "sessions restored"
        );
    }
}

/// Publishes a worker's counters for the control side, unless a reader holds the report at
/// this moment: a worker never waits for the control side. Returns whether it published;
/// when not, the caller tries again on its next loop iteration.
pub(crate) fn publish(
    report: &Mutex<WorkerReport>,
    router: &Router,
    zhop: &Zhop,
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
    r.io.clone_from(io);
    r.io.cpu_ns = sys::thread_cpu_time().as_nanos() as u64;
    r.sessions = router.session_count();
    r.pending = router.pending_count();
    r.table_generation = router.table().generation();
    r.zhop = zhop.stats();
    r.published = Some(std::time::Instant::now());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(i: u32) -> Target {
        Target::Exit(SessionSlot {
            index: i,
            generation: 0,
        })
    }

    #[test]
    fn contiguous_equal_segments_to_one_target_make_one_run() {
        let mut runs = Vec::new();
        for i in 0..3 {
            plan(&mut runs, true, exit(1), 0, i * 100, 100);
        }
        // A shorter last segment still belongs; nothing may follow it.
        plan(&mut runs, true, exit(1), 0, 300, 40);
        plan(&mut runs, true, exit(1), 0, 340, 40);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].len, runs[0].segments, runs[0].segment_size()),
            (340, 4, Some(100))
        );
        assert_eq!((runs[1].start, runs[1].segment_size()), (340, None));
    }

    #[test]
    fn a_new_target_message_or_no_gso_starts_a_new_run() {
        let mut runs = Vec::new();
        plan(&mut runs, true, exit(1), 0, 0, 100);
        plan(&mut runs, true, exit(2), 0, 100, 100);
        plan(&mut runs, true, exit(2), 1, 200, 100);
        plan(&mut runs, false, exit(2), 1, 300, 100);
        assert_eq!(runs.len(), 4);
        let mut runs = Vec::new();
        for i in 0..(MAX_GSO_SEGMENTS + 1) {
            plan(&mut runs, true, exit(1), 0, i * 10, 10);
        }
        assert_eq!(runs.len(), 2);
    }
    #[test]
    fn publish_skips_while_a_reader_holds_the_report_and_never_waits() {
        let now = Instant::now();
        let table = std::sync::Arc::new(ExitTable::new(1, Vec::new()).expect("empty table"));
        let cfg = crate::router::RouterConfig::default();
        let router = Router::new(cfg.clone(), table.clone(), now);
        let zhop = Zhop::new(None, table, &cfg, now);
        let io = IoStats {
            recv_calls: 7,
            ..IoStats::default()
        };
        let report = Mutex::new(WorkerReport::default());

        let held = report.lock().expect("not poisoned");
        assert!(
            !publish(&report, &router, &zhop, &io),
            "skipped, not blocked"
        );
        drop(held);
        assert_eq!(report.lock().expect("not poisoned").io.recv_calls, 0);

        assert!(publish(&report, &router, &zhop, &io));
        let r = report.lock().expect("not poisoned");
        assert_eq!(r.io.recv_calls, 7);
        assert_eq!(r.table_generation, 1);
        assert!(r.published.is_some());
    }
}
