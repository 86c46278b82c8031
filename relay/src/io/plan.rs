//! What both backends do between receiving and sending: run every segment of a received
//! message (a datagram or a GRO train) through the router, and group what it forwards into
//! runs, each of which leaves as one send (a GSO send when it holds several segments).
//!
//! The backends differ only in how they receive, open sockets and send; this module keeps
//! the routing, the run grouping and the control-request answers in one place.

use std::net::SocketAddr;
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use super::sys::{self, MAX_GSO_SEGMENTS};
use super::{BoundListener, DataPlaneConfig, IoStats, WorkerReport, WorkerRequest};
use crate::router::{Action, Listener, Router, SessionSlot};

/// The socket a message arrived on, as the router knows it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Source {
    Client(Listener),
    Exit(SessionSlot),
}

/// Where a run of segments goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Exit(SessionSlot),
    Client { listener: u16, addr: SocketAddr },
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
        // GSO needs equal segments; only the last may be shorter.
        let fits = len <= run.segment && run.len == run.segment * run.segments;
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

/// One received message: a datagram, or a GRO train of `stride`-sized datagrams.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub source: Source,
    pub from: SocketAddr,
    pub payload: &'a [u8],
    pub stride: usize,
}

/// Runs each segment of `msg` through the router. After every segment `commands` executes the router's commands
/// (an exit socket must exist before anything is sent through it), then `forward` gets
/// the target, offset and length of each segment the router forwards.
pub(crate) fn route_message(
    router: &mut Router,
    now: Instant,
    msg: Message<'_>,
    mut commands: impl FnMut(&mut Router),
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
    while offset < len {
        let seg_len = stride.min(len - offset);
        let seg = &payload[offset..offset + seg_len];
        let action = match source {
            Source::Client(l) => router.handle_client(now, l, from, seg),
            Source::Exit(slot) => router.handle_exit(now, slot, seg),
        };
        commands(router);
        if let Some(target) = Target::of(action) {
            forward(target, offset, seg_len);
        }
        offset += seg_len;
    }
}

/// Whether a message of `len` bytes received with GRO segment size `stride` is a train of
/// several datagrams.
pub(crate) fn is_train(len: usize, stride: usize) -> bool {
    stride != 0 && stride < len
}

/// Answers one control request. Returns whether the router may have commands to run (a
/// session was closed).
pub(crate) fn answer(router: &mut Router, req: WorkerRequest, now: Instant) -> bool {
    match req {
        WorkerRequest::Sessions(reply) => {
            let _ = reply.send(router.sessions(now).collect());
            false
        }
        WorkerRequest::CloseSession { slot, reply } => {
            let _ = reply.send(router.close_session(slot));
            true
        }
    }
}

/// Answers every waiting control request, running the router's commands after each.
pub(crate) fn answer_all(
    requests: &mpsc::Receiver<WorkerRequest>,
    router: &mut Router,
    now: Instant,
    mut commands: impl FnMut(&mut Router),
) {
    while let Ok(req) = requests.try_recv() {
        if answer(router, req, now) {
            commands(router);
        }
    }
}

/// Binds a worker's sockets for the listen ports a new table pins, on every listen IP,
/// leaving out addresses in `bound`. Failures are logged and skipped: the other ports
/// keep working.
pub(crate) fn pinned_listeners(
    worker: usize,
    cfg: &DataPlaneConfig,
    ports: &[u16],
    bound: &[SocketAddr],
) -> Vec<BoundListener> {
    let mut out = Vec::new();
    for ip in cfg.listen.iter().map(|a| a.ip()) {
        for &port in ports {
            let addr = SocketAddr::new(ip, port);
            if bound.contains(&addr) || out.iter().any(|l: &BoundListener| l.local == addr) {
                continue;
            }
            match sys::listener_socket(addr, cfg.listener_socket_buffer) {
                Ok((socket, gro)) => {
                    tracing::info!(worker, %addr, "listening on pinned port");
                    out.push(BoundListener {
                        socket,
                        local: addr,
                        gro,
                    });
                }
                Err(e) => tracing::warn!(worker, %addr, error = %e, "cannot bind pinned port"),
            }
        }
    }
    out
}

/// Publishes a worker's counters for the control side.
pub(crate) fn publish(report: &Mutex<WorkerReport>, router: &Router, io: &IoStats) {
    if let Ok(mut r) = report.lock() {
        r.router.clone_from(router.stats());
        r.io.clone_from(io);
        r.sessions = router.session_count();
        r.pending = router.pending_count();
        r.table_generation = router.table().generation();
    }
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
}
