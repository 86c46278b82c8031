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
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use socket2::Socket;

use super::runs::{self, Run, Target};
use super::shared::SharedExitSockets;
use super::sys::{RecvBatch, SendBatch, Transmit};
use super::train::{self, SyncSend, TrainSockets, Trains};
use super::worker::{self, Datapath, Source, Worker};
use super::{BoundListener, DataPlaneConfig, ExitSockets, IoStats, WorkerContext};
use crate::drop_reason::DropReason;
use crate::role::Listener;
use crate::role::{RoleId, SocketOwner};
use crate::slab::SessionSlot;

/// Token of the waker that interrupts a worker's wait.
pub(crate) const WAKER_TOKEN: Token = Token(usize::MAX);
/// Tokens below this name listeners; from here on, sockets roles own: the owning role's id
/// above [`ROLE_SHIFT`], the owner's slot index below.
const OWNED_TOKEN_BASE: usize = 1 << 16;
const ROLE_SHIFT: u32 = 40;
/// The "role" under which shared exit-facing sockets' tokens are made (by pool id): no
/// role has this id.
const SHARED_TOKENS: usize = 0xff;
/// Batches taken from one socket before the others get their turn.
const BATCHES_PER_TURN: usize = 4;

/// The worker's sockets, borrowed field by field so that the router, Z-HOP and the
/// receive buffers stay free to borrow.
macro_rules! portable_io {
    ($w:ident) => {
        PortableIo {
            worker: $w.worker.id,
            cfg: &$w.cfg,
            poll: &$w.poll,
            listeners: &mut $w.listeners,
            owned: &mut $w.owned,
            shared: &mut $w.shared,
            io: &mut $w.io,
            send: &mut $w.send,
            trains: &mut $w.trains,
        }
    };
}

struct ListenerSocket {
    socket: Socket,
    listener: Listener,
    local: SocketAddr,
    /// Whether sends on this socket may use GSO; cleared for good when the kernel refuses.
    gso: bool,
}

/// Listener `id` if it is open; a closed one leaves a hole, so ids (and mio tokens) of the
/// others stay as they are.
fn open_listener(listeners: &[Option<ListenerSocket>], id: usize) -> Option<&ListenerSocket> {
    listeners.get(id).and_then(Option::as_ref)
}

/// A socket a role owns, by its owner ([`owned`], [`owned_mut`]).
struct OwnedSocket {
    generation: u32,
    socket: Socket,
    /// Whether sends on this socket may use GSO; cleared for good when the kernel refuses.
    gso: bool,
}

/// A shared exit-facing socket (`io/shared.rs`), by pool id.
struct PooledSocket {
    socket: Socket,
    /// Whether sends on this socket may use GSO; cleared for good when the kernel refuses.
    gso: bool,
}

/// A portable worker: the [`Worker`] and the sockets and batches that serve it.
struct Loop {
    worker: Worker,
    cfg: DataPlaneConfig,
    poll: mio::Poll,
    listeners: Vec<Option<ListenerSocket>>,
    /// Sockets roles own, by role id, then by the owner's slot index.
    owned: Vec<Vec<Option<OwnedSocket>>>,
    /// Shared exit-facing sockets and who is on them.
    shared: SharedExitSockets<PooledSocket>,
    recv: RecvBatch,
    send: SendBatch,
    /// Z-HOP's datagrams of the current batch, per destination (`train.rs`).
    trains: Trains,
    runs: Vec<Run>,
    /// Sends to clients planned from the current batch: listener, client, message,
    /// offset, length, GSO segment size.
    client_tx: Vec<(u16, SocketAddr, usize, usize, usize, Option<u16>)>,
    ready: VecDeque<Token>,
    events: Events,
    io: IoStats,
}

pub(crate) fn run(ctx: WorkerContext) {
    let now = Instant::now();
    let (worker, ctx) = Worker::new(ctx, now);
    let mut w = Loop {
        worker,
        recv: RecvBatch::new(ctx.cfg.batch, ctx.cfg.recv_buffer),
        send: SendBatch::new(ctx.cfg.batch),
        trains: Trains::new(train::PORTABLE_BUFFERS),
        runs: Vec::with_capacity(ctx.cfg.batch * 4),
        client_tx: Vec::with_capacity(ctx.cfg.batch * 4),
        ready: VecDeque::with_capacity(1024),
        events: Events::with_capacity(1024),
        cfg: ctx.cfg,
        poll: ctx.poll,
        listeners: Vec::new(),
        owned: Vec::new(),
        shared: SharedExitSockets::default(),
        io: IoStats::default(),
    };
    w.worker
        .start(&mut portable_io!(w), ctx.listeners, &ctx.restore, now);
    if let Err(e) = worker::run(&mut w) {
        tracing::error!(worker = w.worker.id, error = %e, "worker stopped");
    }
    w.worker.stop_fast_path(Instant::now());
    w.worker.publish(&w.io, Instant::now());
}

impl worker::Backend for Loop {
    fn worker(&self) -> &Worker {
        &self.worker
    }

    fn stats(&mut self) -> &mut IoStats {
        &mut self.io
    }

    fn housekeeping(&mut self, now: Instant) {
        let publish = self.worker.housekeeping(&mut portable_io!(self), now);
        self.flush_trains();
        if publish {
            self.worker.publish(&self.io, now);
        }
    }

    fn busy(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Waits for readiness, then gives each socket that was ready a turn; one that still
    /// has data after its turn goes to the back of the queue (readiness is
    /// edge-triggered).
    fn serve(&mut self, wait: Duration) -> io::Result<()> {
        debug_assert!(self.trains.is_empty(), "Z-HOP trains wait while sleeping");
        match self.poll.poll(&mut self.events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        for ev in self.events.iter() {
            match ev.token() {
                WAKER_TOKEN => {}
                worker::TUN_TOKEN => self.worker.tun_readable(),
                t => self.ready.push_back(t),
            }
        }
        for _ in 0..self.ready.len() {
            let Some(token) = self.ready.pop_front() else {
                break;
            };
            if self.serve_socket(token) {
                self.ready.push_back(token);
            }
        }
        // The Exit role's TUN queue and hand-offs (nothing to do without a TUN device).
        if self.worker.exit.is_some() {
            self.worker
                .serve_exit(&mut portable_io!(self), Instant::now());
            self.flush_trains();
        }
        Ok(())
    }
}

impl Loop {
    /// Serves one ready socket for a turn. Returns whether it may have more to read.
    fn serve_socket(&mut self, token: Token) -> bool {
        for _ in 0..BATCHES_PER_TURN {
            let (fd, source) = if token.0 < OWNED_TOKEN_BASE {
                match open_listener(&self.listeners, token.0) {
                    Some(l) => (l.socket.as_raw_fd(), Source::Client(l.listener)),
                    None => return false,
                }
            } else {
                let t = token.0 - OWNED_TOKEN_BASE;
                let index = t & ((1 << ROLE_SHIFT) - 1);
                if t >> ROLE_SHIFT == SHARED_TOKENS {
                    match self.shared.handle(index as u32) {
                        Some(s) => (s.socket.as_raw_fd(), Source::Shared(index as u32)),
                        None => return false,
                    }
                } else {
                    let role = RoleId((t >> ROLE_SHIFT) as u8);
                    match self
                        .owned
                        .get(usize::from(role.0))
                        .and_then(|v| v.get(index))
                    {
                        Some(Some(s)) => (
                            s.socket.as_raw_fd(),
                            Source::Socket(SocketOwner {
                                role,
                                slot: SessionSlot {
                                    index: index as u32,
                                    generation: s.generation,
                                },
                            }),
                        ),
                        _ => return false,
                    }
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
                    tracing::trace!(worker = self.worker.id, error = %e, "receive error");
                    return false;
                }
            };
            let arrived = Instant::now();
            self.route_batch(n, source, arrived);
            self.transmit();
            self.flush_trains();
            self.io
                .batch_latency
                .record(arrived.elapsed().as_nanos() as u64);
            if n < self.recv.capacity() {
                return false;
            }
        }
        true
    }

    /// Runs every received segment through Z-HOP or the router and plans the sends.
    fn route_batch(&mut self, n: usize, source: Source, now: Instant) {
        self.runs.clear();
        for msg in 0..n {
            let Some(meta) = self.recv.meta(msg) else {
                continue;
            };
            if worker::is_train(meta.len, meta.stride) {
                self.io.gro_trains += 1;
            }
            // Runs are planned as if every socket did GSO; a socket the kernel refused it
            // on sends its runs' segments one by one (`runs::send_all`).
            let (planned, gso) = (&mut self.runs, self.cfg.gso);
            self.worker.route(
                &mut portable_io!(self),
                now,
                worker::Message {
                    source,
                    from: meta.from,
                    payload: self.recv.payload(msg),
                    stride: meta.stride,
                },
                |target, offset, len| runs::push_segment(planned, gso, target, msg, offset, len),
            );
        }
    }

    /// Sends every planned run: runs to a role's socket through it, runs to
    /// clients gathered per listener into sendmmsg batches.
    fn transmit(&mut self) {
        let runs = std::mem::take(&mut self.runs);
        self.client_tx.clear();
        for run in &runs {
            match run.target {
                Target::Socket(owner) => self.send_to_socket(owner, run),
                Target::Client { listener, addr } => {
                    self.client_tx.push((
                        listener,
                        addr,
                        run.msg,
                        run.start,
                        run.len,
                        run.segment_size(),
                    ));
                }
            }
        }
        self.runs = runs;
        self.send_to_clients();
    }

    fn send_to_socket(&mut self, owner: SocketOwner, run: &Run) {
        let (fd, gso, dest) = match exit_socket_mut(&mut self.owned, &mut self.shared, owner) {
            Some(s) => s,
            // The session went away while its packets were being routed.
            None => {
                for _ in 0..run.segments {
                    self.worker.router.record_drop(DropReason::NoSession);
                }
                return;
            }
        };
        let tx = Transmit {
            dest,
            contents: &self.recv.payload(run.msg)[run.start..run.start + run.len],
            segment_size: run.segment_size(),
        };
        let mut failed =
            runs::send_all(&mut self.send, fd, &[tx], gso, &mut self.io, self.worker.id);
        self.worker.record_send_failures(&mut failed);
    }

    /// Sends what Z-HOP emitted since the last flush, each train in one `sendmmsg`.
    fn flush_trains(&mut self) {
        let mut io = portable_io!(self);
        io.flush_trains(|_| true);
        self.worker.record_send_failures(&mut self.trains.failed);
        self.worker.flush_tun();
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
            let Some(l) = self
                .listeners
                .get_mut(usize::from(listener))
                .and_then(Option::as_mut)
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
            }
            let mut failed = runs::send_all(
                &mut self.send,
                l.socket.as_raw_fd(),
                &txs[..end - i],
                &mut l.gso,
                &mut self.io,
                self.worker.id,
            );
            self.worker.record_send_failures(&mut failed);
            i = end;
        }
    }
}

/// Most datagrams gathered into one sendmmsg towards clients.
const SEND_CHUNK: usize = 64;

/// A portable worker's sockets, for the logic shared with the io_uring backend.
struct PortableIo<'a> {
    worker: usize,
    cfg: &'a DataPlaneConfig,
    poll: &'a mio::Poll,
    listeners: &'a mut Vec<Option<ListenerSocket>>,
    owned: &'a mut Vec<Vec<Option<OwnedSocket>>>,
    shared: &'a mut SharedExitSockets<PooledSocket>,
    io: &'a mut IoStats,
    send: &'a mut SendBatch,
    trains: &'a mut Trains,
}

/// The sockets Z-HOP's trains leave from, borrowed apart from the trains.
struct TrainSocketsView<'a> {
    listeners: &'a mut [Option<ListenerSocket>],
    owned: &'a mut [Vec<Option<OwnedSocket>>],
    shared: &'a mut SharedExitSockets<PooledSocket>,
}

impl TrainSocketsView<'_> {
    fn gso_flag(&mut self, target: Target) -> Option<&mut bool> {
        match target {
            Target::Client { listener, .. } => self
                .listeners
                .get_mut(usize::from(listener))?
                .as_mut()
                .map(|l| &mut l.gso),
            Target::Socket(owner) => {
                exit_socket_mut(self.owned, self.shared, owner).map(|(_, gso, _)| gso)
            }
        }
    }
}

impl TrainSockets for TrainSocketsView<'_> {
    fn socket(&self, target: Target) -> Option<(i32, bool, Option<SocketAddr>)> {
        match target {
            Target::Client { listener, addr } => {
                let l = open_listener(self.listeners, usize::from(listener))?;
                Some((l.socket.as_raw_fd(), l.gso, Some(addr)))
            }
            Target::Socket(owner) => exit_socket(self.owned, self.shared, owner),
        }
    }

    fn refuse_gso(&mut self, target: Target) {
        if let Some(gso) = self.gso_flag(target) {
            *gso = false;
        }
    }
}

/// `owner`'s socket, its own or a shared one: its descriptor, whether it may use GSO, and
/// the destination its sends name (the exit, on a shared socket).
fn exit_socket(
    owned_sockets: &[Vec<Option<OwnedSocket>>],
    shared: &SharedExitSockets<PooledSocket>,
    owner: SocketOwner,
) -> Option<(i32, bool, Option<SocketAddr>)> {
    if let Some(s) = owned(owned_sockets, owner) {
        return Some((s.socket.as_raw_fd(), s.gso, None));
    }
    let (pool, exit) = shared.of(owner)?;
    let s = shared.handle(pool)?;
    Some((s.socket.as_raw_fd(), s.gso, Some(exit)))
}

fn exit_socket_mut<'a>(
    owned_sockets: &'a mut [Vec<Option<OwnedSocket>>],
    shared: &'a mut SharedExitSockets<PooledSocket>,
    owner: SocketOwner,
) -> Option<(i32, &'a mut bool, Option<SocketAddr>)> {
    if let Some(s) = owned_mut(owned_sockets, owner) {
        return Some((s.socket.as_raw_fd(), &mut s.gso, None));
    }
    let (pool, exit) = shared.of(owner)?;
    let s = shared.handle_mut(pool)?;
    Some((s.socket.as_raw_fd(), &mut s.gso, Some(exit)))
}

impl PortableIo<'_> {
    /// Opens a socket connected to `exit` and registers it under `token`.
    fn open_socket(
        &self,
        exit: SocketAddr,
        local_port: Option<u16>,
        token: Token,
    ) -> io::Result<Socket> {
        let socket = self.cfg.exit_socket(exit, local_port)?;
        self.poll.registry().register(
            &mut SourceFd(&socket.as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        Ok(socket)
    }
}

/// `owner`'s socket, if it is still that one.
fn owned(table: &[Vec<Option<OwnedSocket>>], owner: SocketOwner) -> Option<&OwnedSocket> {
    let s = table
        .get(usize::from(owner.role.0))?
        .get(owner.slot.index as usize)?;
    s.as_ref().filter(|s| s.generation == owner.slot.generation)
}

fn owned_mut(
    table: &mut [Vec<Option<OwnedSocket>>],
    owner: SocketOwner,
) -> Option<&mut OwnedSocket> {
    let s = table
        .get_mut(usize::from(owner.role.0))?
        .get_mut(owner.slot.index as usize)?;
    s.as_mut().filter(|s| s.generation == owner.slot.generation)
}

impl PortableIo<'_> {
    /// The trains, the sockets they leave from and what sends them, borrowed apart.
    fn train_parts(&mut self) -> (&mut Trains, TrainSocketsView<'_>, SyncSend<'_>) {
        (
            self.trains,
            TrainSocketsView {
                listeners: self.listeners,
                owned: self.owned,
                shared: self.shared,
            },
            SyncSend {
                send: self.send,
                io: self.io,
                worker: self.worker,
            },
        )
    }

    /// Sends the waiting trains whose destination `wanted` accepts.
    fn flush_trains(&mut self, wanted: impl Fn(Target) -> bool) {
        let (trains, mut sockets, mut out) = self.train_parts();
        trains.flush_now(wanted, &mut sockets, &mut out);
    }
}

impl Datapath for PortableIo<'_> {
    fn open(
        &mut self,
        owner: SocketOwner,
        peer: SocketAddr,
        local_port: Option<u16>,
    ) -> io::Result<()> {
        if self.cfg.exit_sockets == ExitSockets::Shared {
            let (cfg, poll) = (self.cfg, self.poll);
            let opened = self.shared.open(owner, peer, local_port, |port, pool| {
                let socket = cfg.shared_exit_socket(peer, port)?;
                let token = OWNED_TOKEN_BASE + (SHARED_TOKENS << ROLE_SHIFT) + pool as usize;
                poll.registry().register(
                    &mut SourceFd(&socket.as_raw_fd()),
                    Token(token),
                    Interest::READABLE,
                )?;
                let port = socket.local_addr()?.as_socket().map_or(port, |a| a.port());
                let gso = cfg.gso;
                Ok((PooledSocket { socket, gso }, port))
            })?;
            if opened.new_socket {
                self.io.shared_exit_sockets += 1;
            }
            return Ok(());
        }
        let i = owner.slot.index as usize;
        let token = OWNED_TOKEN_BASE + (usize::from(owner.role.0) << ROLE_SHIFT) + i;
        let socket = self.open_socket(peer, local_port, Token(token))?;
        let role = usize::from(owner.role.0);
        if self.owned.len() <= role {
            self.owned.resize_with(role + 1, Vec::new);
        }
        let table = &mut self.owned[role];
        if table.len() <= i {
            table.resize_with(i + 1, || None);
        }
        table[i] = Some(OwnedSocket {
            generation: owner.slot.generation,
            socket,
            gso: self.cfg.gso,
        });
        Ok(())
    }

    fn close(&mut self, owner: SocketOwner) -> bool {
        let target = Target::Socket(owner);
        self.flush_trains(|t| t == target);
        if let Some((_, emptied)) = self.shared.close(owner) {
            if let Some(s) = emptied {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&s.socket.as_raw_fd()));
                self.io.shared_exit_sockets -= 1;
            }
            return true;
        }
        let Some(entry) = self
            .owned
            .get_mut(usize::from(owner.role.0))
            .and_then(|v| v.get_mut(owner.slot.index as usize))
            .filter(|e| {
                e.as_ref()
                    .is_some_and(|s| s.generation == owner.slot.generation)
            })
        else {
            return false;
        };
        if let Some(s) = entry.take() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&s.socket.as_raw_fd()));
        }
        true
    }

    fn send_from_listener(&self, listener: Listener, to: SocketAddr, bytes: &[u8]) -> bool {
        open_listener(self.listeners, usize::from(listener.id))
            .is_some_and(|l| l.socket.send_to(bytes, &to.into()).is_ok())
    }

    fn stats(&mut self) -> &mut IoStats {
        self.io
    }

    fn send(&mut self, target: Target, bytes: &[u8]) -> bool {
        let (trains, mut sockets, mut out) = self.train_parts();
        if sockets.socket(target).is_none() {
            return false;
        }
        trains.queue(target, bytes, &mut sockets, &mut out);
        true
    }

    fn add_listener(&mut self, l: BoundListener) {
        let id = self.listeners.len() as u16;
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&l.socket.as_raw_fd()),
            Token(id as usize),
            Interest::READABLE,
        ) {
            tracing::warn!(worker = self.worker, local = %l.local, error = %e, "cannot register listener");
            return;
        }
        tracing::debug!(worker = self.worker, local = %l.local, gro = l.gro, "listening");
        self.listeners.push(Some(ListenerSocket {
            listener: Listener {
                id,
                port: l.local.port(),
            },
            local: l.local,
            socket: l.socket,
            gso: self.cfg.gso,
        }));
    }

    fn remove_listener(&mut self, local: SocketAddr) -> Option<Listener> {
        let slot = self
            .listeners
            .iter_mut()
            .find(|l| l.as_ref().is_some_and(|l| l.local == local))?;
        let l = slot.take()?;
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&l.socket.as_raw_fd()));
        tracing::debug!(worker = self.worker, %local, "listener closed");
        // Dropping the socket closes it: the port is free once every worker let go.
        Some(l.listener)
    }

    fn local_addr(&self, owner: SocketOwner) -> Option<SocketAddr> {
        let socket = match owned(self.owned, owner) {
            Some(s) => &s.socket,
            None => &self.shared.handle(self.shared.of(owner)?.0)?.socket,
        };
        socket.local_addr().ok()?.as_socket()
    }

    fn shared_owner(&self, pool: u32, from: SocketAddr) -> Option<SocketOwner> {
        self.shared.owner(pool, from)
    }

    fn listener_local(&self, id: u16) -> Option<SocketAddr> {
        open_listener(self.listeners, id as usize).map(|l| l.local)
    }

    fn listener_for(&self, port: u16, client: SocketAddr) -> Option<Listener> {
        self.listeners
            .iter()
            .flatten()
            .find(|l| l.listener.port == port && l.local.is_ipv4() == client.is_ipv4())
            .map(|l| l.listener)
    }
}
