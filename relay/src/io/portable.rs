//! The portable backend: epoll (through mio) plus batched `recvmmsg`/`sendmmsg` with UDP
//! GRO and GSO. It runs wherever Linux does, including containers that block io_uring.
//!
//! Per iteration a worker: picks up a new table if one was published, expires sessions,
//! answers control requests, waits for readiness, then for each ready socket receives a
//! batch, runs every datagram (every GRO segment) through the router, and sends each
//! forwarded datagram from the very buffer it arrived in. Consecutive segments of one GRO
//! train that go to the same place leave as one GSO send.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use socket2::Socket;

use super::sys::{self, RecvBatch, SendBatch, Transmit, MAX_GSO_SEGMENTS};
use super::{BoundListener, DataPlaneConfig, IoStats, WorkerReport, WorkerRequest};
use crate::drop_reason::DropReason;
use crate::router::{Action, Command, Listener, Router, SessionSlot, SessionSnapshot};
use crate::table::SharedTable;
use crate::zhop::{NodeKey, Zhop, ZhopOut};

/// Token of the waker that interrupts a worker's wait.
pub(crate) const WAKER_TOKEN: Token = Token(usize::MAX);
/// Tokens below this name listeners; from here on, exit-facing sockets by slot index.
const EXIT_TOKEN_BASE: usize = 1 << 16;
/// From here on, Z-HOP flow sockets by flow index.
const FLOW_TOKEN_BASE: usize = 1 << 40;
/// Longest wait for readiness, so that shutdown and table swaps are noticed when idle.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// How often a worker publishes its counters.
const REPORT_EVERY: Duration = Duration::from_millis(50);
/// Batches taken from one socket before the others get their turn.
const BATCHES_PER_TURN: usize = 4;

/// The sockets Z-HOP's events act on, borrowed field by field so that Z-HOP itself stays
/// free to borrow.
macro_rules! zhop_io {
    ($w:ident) => {
        ZhopIo {
            worker: $w.id,
            cfg: &$w.cfg,
            poll: &$w.poll,
            listeners: &$w.listeners,
            flows: &mut $w.flows,
            failed: 0,
        }
    };
}

pub(crate) struct WorkerContext {
    pub id: usize,
    pub cfg: DataPlaneConfig,
    pub table: SharedTable,
    pub listeners: Vec<BoundListener>,
    /// Sessions saved before a restart that this worker's clients are steered to.
    pub restore: Vec<SessionSnapshot>,
    pub poll: mio::Poll,
    pub requests: mpsc::Receiver<WorkerRequest>,
    pub report: Arc<Mutex<WorkerReport>>,
    pub shutdown: Arc<AtomicBool>,
}

struct ListenerSocket {
    socket: Socket,
    listener: Listener,
    local: SocketAddr,
}

struct ExitSocket {
    generation: u32,
    socket: Socket,
}

/// Where a run of segments goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Exit(SessionSlot),
    Client { listener: u16, addr: SocketAddr },
}

/// Consecutive segments of one received message going to one target.
#[derive(Debug, Clone, Copy)]
struct Run {
    target: Target,
    msg: usize,
    start: usize,
    len: usize,
    segment: usize,
    segments: usize,
}

struct Worker {
    id: usize,
    cfg: DataPlaneConfig,
    router: Router,
    zhop: Zhop,
    /// Z-HOP flow sockets by flow index.
    flows: Vec<Option<ExitSocket>>,
    table: SharedTable,
    poll: mio::Poll,
    listeners: Vec<ListenerSocket>,
    exits: Vec<Option<ExitSocket>>,
    recv: RecvBatch,
    send: SendBatch,
    runs: Vec<Run>,
    /// Sends to clients planned from the current batch: listener, client, message,
    /// offset, length, GSO segment size.
    client_tx: Vec<(u16, SocketAddr, usize, usize, usize, Option<u16>)>,
    ready: VecDeque<Token>,
    requests: mpsc::Receiver<WorkerRequest>,
    report: Arc<Mutex<WorkerReport>>,
    shutdown: Arc<AtomicBool>,
    gso: bool,
    io: IoStats,
    last_report: Instant,
}

pub(crate) fn run(ctx: WorkerContext) {
    let now = Instant::now();
    let table = ctx.table.load();
    let mut w = Worker {
        id: ctx.id,
        zhop: Zhop::new(
            ctx.cfg.node_key.map(NodeKey::from_secret),
            table.clone(),
            now,
        ),
        flows: Vec::new(),
        router: Router::new(ctx.cfg.router.clone(), table, now),
        recv: RecvBatch::new(ctx.cfg.batch, ctx.cfg.recv_buffer),
        send: SendBatch::new(ctx.cfg.batch),
        runs: Vec::with_capacity(ctx.cfg.batch * 4),
        client_tx: Vec::with_capacity(ctx.cfg.batch * 4),
        ready: VecDeque::with_capacity(1024),
        gso: ctx.cfg.gso,
        cfg: ctx.cfg,
        table: ctx.table,
        poll: ctx.poll,
        listeners: Vec::new(),
        exits: Vec::new(),
        requests: ctx.requests,
        report: ctx.report,
        shutdown: ctx.shutdown,
        io: IoStats::default(),
        last_report: now,
    };
    for l in ctx.listeners {
        if let Err(e) = w.add_listener(l) {
            tracing::error!(worker = w.id, error = %e, "cannot register listener");
        }
    }
    w.restore(&ctx.restore, now);
    if let Err(e) = w.event_loop() {
        tracing::error!(worker = w.id, error = %e, "worker stopped");
    }
    w.publish(Instant::now());
}

impl Worker {
    fn add_listener(&mut self, l: BoundListener) -> io::Result<()> {
        let id = self.listeners.len() as u16;
        self.poll.registry().register(
            &mut SourceFd(&l.socket.as_raw_fd()),
            Token(id as usize),
            Interest::READABLE,
        )?;
        tracing::debug!(worker = self.id, local = %l.local, gro = l.gro, "listening");
        self.listeners.push(ListenerSocket {
            listener: Listener {
                id,
                port: l.local.port(),
            },
            local: l.local,
            socket: l.socket,
        });
        Ok(())
    }

    fn restore(&mut self, sessions: &[SessionSnapshot], now: Instant) {
        let mut restored = 0;
        for snap in sessions {
            let Some(listener) = self
                .listeners
                .iter()
                .find(|l| {
                    l.listener.port == snap.listen_port
                        && l.local.is_ipv4() == snap.client.is_ipv4()
                })
                .map(|l| l.listener)
            else {
                continue;
            };
            if self.router.restore(now, listener, snap).is_ok() {
                restored += 1;
            }
            self.apply_commands();
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

    fn snapshot(&self, now: Instant) -> Vec<SessionSnapshot> {
        self.router
            .sessions(now)
            .filter_map(|info| {
                let s = self.exits.get(info.slot.index as usize)?.as_ref()?;
                let port = s.socket.local_addr().ok()?.as_socket()?.port();
                Some(SessionSnapshot::new(info, port))
            })
            .collect()
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return Ok(());
            }
            let now = Instant::now();
            self.housekeeping(now);
            let wait = if !self.ready.is_empty() || self.router.sweeping() {
                Duration::ZERO
            } else {
                self.router
                    .poll_timeout()
                    .map_or(MAX_WAIT, |t| t.saturating_duration_since(now).min(MAX_WAIT))
            };
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                if ev.token() != WAKER_TOKEN {
                    self.ready.push_back(ev.token());
                }
            }
            // Each socket that was ready gets a turn; one that still has data after its
            // turn goes to the back of the queue (readiness is edge-triggered).
            for _ in 0..self.ready.len() {
                let Some(token) = self.ready.pop_front() else {
                    break;
                };
                if self.serve(token) {
                    self.ready.push_back(token);
                }
            }
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        if let Some(t) = self.table.load_if_changed(self.router.table()) {
            tracing::debug!(worker = self.id, generation = t.generation(), "new table");
            self.router.set_table(t.clone());
            let mut io = zhop_io!(self);
            self.zhop.set_table(t, &mut |o| io.handle(o));
            let failed = io.failed;
            self.zhop_result(Ok(()), failed);
        }
        self.router.handle_timeout(now);
        self.apply_commands();
        let mut io = zhop_io!(self);
        self.zhop.tick(now, &mut |o| io.handle(o));
        let failed = io.failed;
        self.zhop_result(Ok(()), failed);
        while let Ok(req) = self.requests.try_recv() {
            match req {
                WorkerRequest::Sessions(reply) => {
                    let _ = reply.send(self.router.sessions(now).collect());
                }
                WorkerRequest::CloseSession { slot, reply } => {
                    let _ = reply.send(self.router.close_session(slot));
                    self.apply_commands();
                }
                WorkerRequest::Snapshot(reply) => {
                    let _ = reply.send(self.snapshot(now));
                }
                WorkerRequest::AddListener(l) => {
                    let local = l.local;
                    if let Err(e) = self.add_listener(l) {
                        tracing::warn!(worker = self.id, %local, error = %e, "cannot register listener");
                    }
                }
            }
        }
        if now.duration_since(self.last_report) >= REPORT_EVERY {
            self.publish(now);
        }
    }

    fn publish(&mut self, now: Instant) {
        self.last_report = now;
        if let Ok(mut r) = self.report.lock() {
            r.router.clone_from(self.router.stats());
            r.io.clone_from(&self.io);
            r.sessions = self.router.session_count();
            r.pending = self.router.pending_count();
            r.table_generation = self.router.table().generation();
            r.zhop = self.zhop.stats();
            r.published = Some(now);
        }
    }

    fn apply_commands(&mut self) {
        while let Some(cmd) = self.router.poll_command() {
            match cmd {
                Command::OpenExitSocket {
                    slot,
                    exit,
                    local_port,
                } => {
                    match sys::exit_socket(
                        exit,
                        self.cfg.exit_source,
                        local_port,
                        self.cfg.exit_socket_buffer,
                    ) {
                        Ok((socket, _gro)) => {
                            let token = Token(EXIT_TOKEN_BASE + slot.index as usize);
                            let reg = self.poll.registry().register(
                                &mut SourceFd(&socket.as_raw_fd()),
                                token,
                                Interest::READABLE,
                            );
                            if let Err(e) = reg {
                                tracing::warn!(worker = self.id, error = %e, "cannot register exit socket");
                                self.router.socket_failed(slot);
                                continue;
                            }
                            let i = slot.index as usize;
                            if self.exits.len() <= i {
                                self.exits.resize_with(i + 1, || None);
                            }
                            self.exits[i] = Some(ExitSocket {
                                generation: slot.generation,
                                socket,
                            });
                            self.io.exit_sockets_open += 1;
                        }
                        Err(e) => {
                            tracing::warn!(worker = self.id, %exit, error = %e, "cannot open exit socket");
                            self.router.socket_failed(slot);
                        }
                    }
                }
                Command::CloseExitSocket { slot } => {
                    let i = slot.index as usize;
                    if let Some(Some(s)) = self.exits.get(i) {
                        if s.generation == slot.generation {
                            let _ = self
                                .poll
                                .registry()
                                .deregister(&mut SourceFd(&s.socket.as_raw_fd()));
                            self.exits[i] = None;
                            self.io.exit_sockets_open -= 1;
                        }
                    }
                }
            }
        }
    }

    /// Serves one ready socket for a turn. Returns whether it may have more to read.
    fn serve(&mut self, token: Token) -> bool {
        for _ in 0..BATCHES_PER_TURN {
            let (fd, source) = if token.0 < EXIT_TOKEN_BASE {
                match self.listeners.get(token.0) {
                    Some(l) => (l.socket.as_raw_fd(), Source::Client(l.listener)),
                    None => return false,
                }
            } else if token.0 >= FLOW_TOKEN_BASE {
                let index = token.0 - FLOW_TOKEN_BASE;
                match self.flows.get(index) {
                    Some(Some(s)) => (
                        s.socket.as_raw_fd(),
                        Source::Flow(SessionSlot {
                            index: index as u32,
                            generation: s.generation,
                        }),
                    ),
                    _ => return false,
                }
            } else {
                let index = token.0 - EXIT_TOKEN_BASE;
                match self.exits.get(index) {
                    Some(Some(s)) => (
                        s.socket.as_raw_fd(),
                        Source::Exit(SessionSlot {
                            index: index as u32,
                            generation: s.generation,
                        }),
                    ),
                    _ => return false,
                }
            };
            self.io.recv_calls += 1;
            let n = match self.recv.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // ECONNREFUSED on a connected exit socket (ICMP port unreachable) and
                    // the like: counted, and the socket is tried again later.
                    self.io.recv_errors += 1;
                    tracing::trace!(worker = self.id, error = %e, "receive error");
                    return false;
                }
            };
            let arrived = Instant::now();
            self.route_batch(n, source, arrived);
            self.transmit();
            self.io
                .batch_latency
                .record(arrived.elapsed().as_nanos() as u64);
            if n < self.recv.capacity() {
                return false;
            }
        }
        true
    }

    /// Runs every received segment through the router and plans the sends.
    fn route_batch(&mut self, n: usize, source: Source, now: Instant) {
        self.runs.clear();
        for msg in 0..n {
            let Some(meta) = self.recv.meta(msg) else {
                continue;
            };
            if meta.stride < meta.len {
                self.io.gro_trains += 1;
            }
            let mut offset = 0;
            while offset < meta.len {
                let seg_len = meta.stride.min(meta.len - offset);
                let seg = &self.recv.payload(msg)[offset..offset + seg_len];
                let zhop = match source {
                    Source::Client(l)
                        if self.zhop.claims(
                            meta.from,
                            seg,
                            self.router.knows_client(meta.from),
                        ) =>
                    {
                        let mut io = zhop_io!(self);
                        let r = self
                            .zhop
                            .handle_client(now, l, meta.from, seg, &mut |o| io.handle(o));
                        Some((r, io.failed))
                    }
                    Source::Flow(flow) => {
                        let mut io = zhop_io!(self);
                        let r = self.zhop.handle_exit(now, flow, seg, &mut |o| io.handle(o));
                        Some((r, io.failed))
                    }
                    _ => None,
                };
                if let Some((r, failed)) = zhop {
                    self.zhop_result(r, failed);
                    offset += seg_len;
                    continue;
                }
                let action = match source {
                    Source::Client(l) => self.router.handle_client(now, l, meta.from, seg),
                    Source::Exit(slot) => self.router.handle_exit(now, slot, seg),
                    // Handled by Z-HOP above.
                    Source::Flow(_) => Action::Drop(DropReason::NoSession),
                };
                // Opening an exit socket must happen before anything is sent through it.
                self.apply_commands();
                let target = match action {
                    Action::ToExit(slot) => Some(Target::Exit(slot)),
                    Action::ToClient { listener, client } => Some(Target::Client {
                        listener: listener.id,
                        addr: client,
                    }),
                    Action::Drop(_) => None,
                };
                if let Some(target) = target {
                    self.plan(target, msg, offset, seg_len);
                }
                offset += seg_len;
            }
        }
    }

    fn plan(&mut self, target: Target, msg: usize, start: usize, len: usize) {
        if let Some(run) = self.runs.last_mut() {
            let contiguous = run.msg == msg && run.start + run.len == start;
            // GSO needs equal segments, only the last may be shorter.
            let fits = len <= run.segment && run.len == run.segment * run.segments;
            if self.gso
                && contiguous
                && fits
                && run.target == target
                && run.segments < MAX_GSO_SEGMENTS
            {
                run.len += len;
                run.segments += 1;
                return;
            }
        }
        self.runs.push(Run {
            target,
            msg,
            start,
            len,
            segment: len,
            segments: 1,
        });
    }

    /// Sends every planned run: runs to exits through their sessions' sockets, runs to
    /// clients gathered per listener into sendmmsg batches.
    fn transmit(&mut self) {
        let runs = std::mem::take(&mut self.runs);
        self.client_tx.clear();
        for run in &runs {
            match run.target {
                Target::Exit(slot) => self.send_to_exit(slot, run),
                Target::Client { listener, addr } => {
                    let seg = (run.segments > 1).then_some(run.segment as u16);
                    self.client_tx
                        .push((listener, addr, run.msg, run.start, run.len, seg));
                }
            }
        }
        self.runs = runs;
        self.send_to_clients();
    }

    fn send_to_exit(&mut self, slot: SessionSlot, run: &Run) {
        let fd = match self.exits.get(slot.index as usize) {
            Some(Some(s)) if s.generation == slot.generation => s.socket.as_raw_fd(),
            // The session went away while its packets were being routed.
            _ => {
                for _ in 0..run.segments {
                    self.router.record_drop(DropReason::NoSession);
                }
                return;
            }
        };
        let tx = Transmit {
            dest: None,
            contents: &self.recv.payload(run.msg)[run.start..run.start + run.len],
            segment_size: (run.segments > 1).then_some(run.segment as u16),
        };
        self.io.send_calls += 1;
        if run.segments > 1 {
            self.io.gso_sends += 1;
        }
        if let Err(e) = self.send.send(fd, &[tx]) {
            let mut out = Outbox {
                send: &mut self.send,
                router: &mut self.router,
                io: &mut self.io,
                gso: &mut self.gso,
                worker: self.id,
            };
            out.failed(fd, tx, e);
        }
    }

    fn send_to_clients(&mut self) {
        const EMPTY: Transmit<'static> = Transmit {
            dest: None,
            contents: &[],
            segment_size: None,
        };
        let mut i = 0;
        while i < self.client_tx.len() {
            let listener = self.client_tx[i].0;
            let Some(fd) = self
                .listeners
                .get(listener as usize)
                .map(|l| l.socket.as_raw_fd())
            else {
                i += 1;
                continue;
            };
            // The following entries for the same listener leave in one sendmmsg.
            let mut end = i;
            while end < self.client_tx.len()
                && self.client_tx[end].0 == listener
                && end - i < SEND_CHUNK.min(self.send.capacity())
            {
                end += 1;
            }
            let mut txs = [EMPTY; SEND_CHUNK];
            for (tx, &(_, addr, msg, start, len, seg)) in
                txs.iter_mut().zip(&self.client_tx[i..end])
            {
                *tx = Transmit {
                    dest: Some(addr),
                    contents: &self.recv.payload(msg)[start..start + len],
                    segment_size: seg,
                };
                if seg.is_some() {
                    self.io.gso_sends += 1;
                }
            }
            let txs = &txs[..end - i];
            let mut out = Outbox {
                send: &mut self.send,
                router: &mut self.router,
                io: &mut self.io,
                gso: &mut self.gso,
                worker: self.id,
            };
            let mut off = 0;
            while off < txs.len() {
                out.io.send_calls += 1;
                match out.send.send(fd, &txs[off..]) {
                    Ok(taken) => off += taken.max(1),
                    Err(e) => {
                        out.failed(fd, txs[off], e);
                        off += 1;
                    }
                }
            }
            i = end;
        }
    }
}

/// Most datagrams gathered into one sendmmsg towards clients.
const SEND_CHUNK: usize = 64;

/// The parts of a worker a failed send touches, borrowed apart from the receive buffers
/// the failed payload still lives in.
struct Outbox<'a> {
    send: &'a mut SendBatch,
    router: &'a mut Router,
    io: &'a mut IoStats,
    gso: &'a mut bool,
    worker: usize,
}

impl Outbox<'_> {
    /// A send was refused. If the kernel refused GSO, stop using it on this worker and
    /// send the segments one by one; anything else is a counted drop.
    fn failed(&mut self, fd: i32, tx: Transmit<'_>, e: io::Error) {
        let segment = tx
            .segment_size
            .map_or(tx.contents.len(), usize::from)
            .max(1);
        if tx.segment_size.is_some() && sys::is_gso_error(&e) {
            if *self.gso {
                *self.gso = false;
                self.io.gso_fallbacks += 1;
                tracing::warn!(worker = self.worker, error = %e,
                    "kernel refused UDP GSO; sending segments one by one from now on");
            }
            for chunk in tx.contents.chunks(segment) {
                let single = Transmit {
                    dest: tx.dest,
                    contents: chunk,
                    segment_size: None,
                };
                self.io.send_calls += 1;
                if self.send.send(fd, &[single]).is_err() {
                    self.router.record_drop(DropReason::SendFailed);
                }
            }
            return;
        }
        tracing::trace!(worker = self.worker, error = %e, "send failed");
        for _ in 0..tx.contents.len().div_ceil(segment) {
            self.router.record_drop(DropReason::SendFailed);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Client(Listener),
    Exit(SessionSlot),
    Flow(SessionSlot),
}

impl Worker {
    fn zhop_result(&mut self, r: Result<(), DropReason>, failed_sends: usize) {
        if let Err(reason) = r {
            self.router.record_drop(reason);
        }
        for _ in 0..failed_sends {
            self.router.record_drop(DropReason::SendFailed);
        }
    }
}

/// Carries out Z-HOP's events on this worker's sockets. Z-HOP decrypts into its own
/// buffer, so these are plain one-datagram sends.
struct ZhopIo<'a> {
    worker: usize,
    cfg: &'a DataPlaneConfig,
    poll: &'a mio::Poll,
    listeners: &'a [ListenerSocket],
    flows: &'a mut Vec<Option<ExitSocket>>,
    failed: usize,
}

impl ZhopIo<'_> {
    fn handle(&mut self, o: ZhopOut<'_>) {
        match o {
            ZhopOut::ToPeer {
                listener,
                to,
                bytes,
            } => {
                let sent = self
                    .listeners
                    .get(listener.id as usize)
                    .map(|l| l.socket.send_to(bytes, &to.into()));
                if !matches!(sent, Some(Ok(_))) {
                    self.failed += 1;
                }
            }
            ZhopOut::ToExit { flow, bytes } => {
                let sent = match self.flows.get(flow.index as usize) {
                    Some(Some(s)) if s.generation == flow.generation => s.socket.send(bytes).ok(),
                    _ => None,
                };
                if sent.is_none() {
                    self.failed += 1;
                }
            }
            ZhopOut::OpenFlow { flow, exit } => {
                match sys::exit_socket(
                    exit,
                    self.cfg.exit_source,
                    None,
                    self.cfg.exit_socket_buffer,
                ) {
                    Ok((socket, _)) => {
                        let token = Token(FLOW_TOKEN_BASE + flow.index as usize);
                        if let Err(e) = self.poll.registry().register(
                            &mut SourceFd(&socket.as_raw_fd()),
                            token,
                            Interest::READABLE,
                        ) {
                            tracing::warn!(worker = self.worker, error = %e, "cannot register flow socket");
                            return;
                        }
                        let i = flow.index as usize;
                        if self.flows.len() <= i {
                            self.flows.resize_with(i + 1, || None);
                        }
                        self.flows[i] = Some(ExitSocket {
                            generation: flow.generation,
                            socket,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(worker = self.worker, %exit, error = %e, "cannot open flow socket")
                    }
                }
            }
            ZhopOut::CloseFlow { flow } => {
                let i = flow.index as usize;
                if let Some(Some(s)) = self.flows.get(i) {
                    if s.generation == flow.generation {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut SourceFd(&s.socket.as_raw_fd()));
                        self.flows[i] = None;
                    }
                }
            }
        }
    }
}
