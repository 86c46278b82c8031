//! The io_uring backend: one ring per worker, multishot receives into a provided buffer
//! ring, sends straight from the receive buffers, one `io_uring_enter` per batch.
//!
//! Per iteration a worker: picks up a new table, expires sessions, answers control
//! requests, gives finished buffers back and re-arms ended receives; then one
//! `io_uring_enter` submits everything queued since the last one (sends, receives,
//! cancellations) and waits for at least one completion (or the next router timer). It then
//! reaps the completion queue (which only records what happened) and processes every
//! received message: each segment goes through the roles exactly as in the portable
//! backend (`Worker::route`), and each run of segments to one target becomes one
//! `SendMsg` (with `UDP_SEGMENT` when it holds several) pointing into the very buffer it
//! arrived in. `probe.rs` says whether this backend can run, `ring.rs` holds the ring,
//! `sockets.rs` the socket registry; this file the loop.
//!
//! Invariants (each `unsafe` block below names the one it relies on):
//! - **Buffers**: a receive buffer belongs to the kernel while it is in the buffer ring,
//!   and to the worker from the completion that names it until its reference count drops
//!   to zero: one reference while the worker processes it, one per send reading from it.
//!   Only then is it given back. Nothing reads a buffer it does not hold a reference to.
//! - **Sockets**: a socket id counts the requests and buffers that name it (armed receive,
//!   sends, cancellation, messages waiting to be routed). Closing a session marks its
//!   socket closing and cancels its receive; the file descriptor is closed and the id
//!   reused only when that count reaches zero, so no queued or in-flight request can reach
//!   another socket that got the same descriptor number, and no late completion is
//!   attributed to another session.
//! - **Send headers** live in a fixed pool (`sendq::SendSlots`) until their completion.
//! - **Teardown**: before the ring is dropped every request is cancelled and waited for;
//!   if that does not finish in time the buffers and headers are leaked, never freed while
//!   the kernel may still use them.

mod bufring;
mod probe;
mod ring;
mod sendq;
mod sockets;

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, IoUring};

use self::bufring::BufRing;
use self::probe::build_ring;
pub use self::probe::{probe, UringUnavailable};
use self::ring::Ring;
use self::sendq::{BufRef, SendInfo, SendSlots};
use self::sockets::{IoSocket, Role, Sockets, NONE};
use super::runs::{self, Run, Target};
use super::sys::{self, is_gso_errno, SendBatch, MAX_GSO_SEGMENTS};
use super::train::{self, SyncSend, Trains};
use super::worker::{self, Datapath, Source, Worker, MAX_WAIT};
use super::{BoundListener, DataPlaneConfig, ExitSockets, IoStats, WorkerContext};
use crate::drop_reason::DropReason;
use crate::role::{Listener, SocketOwner};
/// Deferred completions the kernel runs in an enter that waits for one
/// (`IO_LOCAL_TW_DEFAULT_MAX`).
const LOCAL_WORK_CAP: usize = 20;
/// Completions asked for, without waiting, when a waiting enter hit that cap.
const MORE_WANT: usize = 512;
/// Such extra enters per iteration at most, so that timers and requests keep their turn.
const MORE_ROUNDS: usize = 4;
/// Longest a worker waits at shutdown for the kernel to finish its requests.
const TEARDOWN_WAIT: Duration = Duration::from_secs(2);

/// Space in front of the payload of every receive buffer: the `io_uring_recvmsg_out`
/// header, then the source address, then control messages (the UDP_GRO cmsg).
const RECV_NAME_LEN: u32 = 32;
const RECV_CONTROL_LEN: usize = 64;
const RECV_HEADER_LEN: usize = 16;
/// Payload room of a receive buffer: a whole GRO train (at most 64 KiB).
const RECV_PAYLOAD: usize = 65_536;
/// One receive buffer: header, name, control and a whole GRO train.
pub(crate) const RECV_BUFFER: usize =
    RECV_HEADER_LEN + RECV_NAME_LEN as usize + RECV_CONTROL_LEN + RECV_PAYLOAD;
/// Submission queue entries per ring.
const SQ_ENTRIES: u32 = 1024;
/// The buffer group id of a worker's provided buffer ring.
const BUFFER_GROUP: u16 = 0;

/// What a completion is about: the top byte of its user data.
const KIND_SHIFT: u32 = 56;
const RECV: u64 = 1;
const SEND: u64 = 2;
const WAKE: u64 = 3;
const CANCEL: u64 = 4;
/// A cancellation at teardown (nothing to release when it completes).
const TEARDOWN_CANCEL: u64 = 5;

fn user_data(kind: u64, id: u32) -> u64 {
    (kind << KIND_SHIFT) | u64::from(id)
}

/// The header every multishot receive of a worker uses: only the name and control lengths
/// matter (they lay out each buffer).
fn recv_msghdr() -> Box<libc::msghdr> {
    // SAFETY: msghdr is a plain C struct for which all zero bytes is a valid value.
    let mut h: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
    h.msg_namelen = RECV_NAME_LEN;
    h.msg_controllen = RECV_CONTROL_LEN as _;
    h
}

/// A received message waiting to be routed.
#[derive(Debug, Clone, Copy)]
struct Arrived {
    socket: u32,
    buf: u16,
}

/// The parts of a worker that open, arm and close sockets; borrowed apart from the
/// receive buffers while a message is routed.
struct Plane {
    id: usize,
    cfg: DataPlaneConfig,
    ring: Ring,
    sockets: Sockets,
    recv_hdr: Box<libc::msghdr>,
    io: IoStats,
    /// Z-HOP's datagrams, gathered per destination until the end of the batch (`train.rs`).
    /// Dropped after `ring` (declared after it), and leaked with the receive buffers if the
    /// kernel does not let go at teardown: a train's buffer is read by its sends.
    trains: Trains,
    /// For the rare train that must leave at once (no buffer free, or its flow closing):
    /// a synchronous `sendmmsg`.
    sync_send: SendBatch,
}

impl Plane {
    fn arm_recv(&mut self, id: u32) {
        let Some(s) = self.sockets.get_mut(id) else {
            return;
        };
        if s.recv_armed || s.closing {
            return;
        }
        let entry =
            opcode::RecvMsgMulti::new(Fd(s.socket.as_raw_fd()), &*self.recv_hdr, BUFFER_GROUP)
                .build()
                .user_data(user_data(RECV, id));
        s.recv_armed = true;
        s.refs += 1;
        // SAFETY: the msghdr lives as long as the worker (dropped after the ring); the
        // descriptor stays open while the receive holds its reference on the socket; the
        // buffer ring outlives the ring (see the teardown invariant).
        unsafe { self.ring.push(&entry) };
    }

    /// Starts closing socket `sid`: nothing new goes out on it, its receive is cancelled,
    /// and it is dropped once nothing names it any more.
    fn close_socket(&mut self, sid: u32) {
        let Some(s) = self.sockets.get_mut(sid) else {
            return;
        };
        s.closing = true;
        if s.recv_armed {
            s.refs += 1;
            self.ring
                .cancel(user_data(RECV, sid), user_data(CANCEL, sid));
        }
        self.sockets.finish_if_unused(sid);
    }
}

impl Plane {
    /// The trains, the sockets they leave from and what sends them synchronously,
    /// borrowed apart.
    fn train_parts(&mut self) -> (&mut Trains, &mut Sockets, SyncSend<'_>) {
        (
            &mut self.trains,
            &mut self.sockets,
            SyncSend {
                send: &mut self.sync_send,
                io: &mut self.io,
                worker: self.id,
            },
        )
    }

    /// The listeners that are open, with their local addresses.
    fn open_listeners(&self) -> impl Iterator<Item = (Listener, SocketAddr)> + '_ {
        self.sockets
            .slots
            .iter()
            .flatten()
            .filter(|s| !s.closing)
            .filter_map(|s| match (s.role, s.local) {
                (Role::Listener(l), Some(local)) => Some((l, local)),
                _ => None,
            })
    }

    /// Submits the requests queued on the ring without waiting, so that a synchronous send
    /// that follows cannot overtake them.
    fn submit_queued(&mut self) {
        self.ring.enters += 1;
        if let Err(e) = self.ring.ring.submit() {
            tracing::trace!(worker = self.id, error = %e, "io_uring submit failed");
        }
    }
}

impl Plane {
    /// Puts `owner` on a shared socket (`io/shared.rs`), opening, registering and arming
    /// one when none is free for `peer`.
    fn open_shared(
        &mut self,
        owner: SocketOwner,
        peer: SocketAddr,
        local_port: Option<u16>,
    ) -> io::Result<()> {
        let cfg = &self.cfg;
        let mut made = None;
        let opened = self
            .sockets
            .shared
            .open(owner, peer, local_port, |port, _| {
                let socket = cfg.shared_exit_socket(peer, port)?;
                let bound = socket.local_addr()?.as_socket().map_or(port, |a| a.port());
                made = Some(socket);
                // The id is set below, once the registry holds the socket.
                Ok((NONE, bound))
            })?;
        if let Some(socket) = made {
            let sid = self.sockets.insert(IoSocket {
                socket,
                role: Role::Shared(opened.pool),
                local: None,
                gso: self.cfg.gso,
                recv_armed: false,
                closing: false,
                refs: 0,
            });
            if let Some(h) = self.sockets.shared.handle_mut(opened.pool) {
                *h = sid;
            }
            self.io.shared_exit_sockets += 1;
            self.arm_recv(sid);
        }
        Ok(())
    }
}

impl Datapath for Plane {
    /// Registers the socket under its owner and arms its receive.
    fn open(
        &mut self,
        owner: SocketOwner,
        peer: SocketAddr,
        local_port: Option<u16>,
    ) -> io::Result<()> {
        if self.cfg.exit_sockets == ExitSockets::Shared {
            return self.open_shared(owner, peer, local_port);
        }
        let socket = self.cfg.exit_socket(peer, local_port)?;
        let sid = self.sockets.insert(IoSocket {
            socket,
            role: Role::Owned(owner),
            local: None,
            gso: self.cfg.gso,
            recv_armed: false,
            closing: false,
            refs: 0,
        });
        *self.sockets.owned_entry(owner) = sid;
        self.arm_recv(sid);
        Ok(())
    }

    fn close(&mut self, owner: SocketOwner) -> bool {
        // What waits for this socket leaves before it closes. (Trains are flushed at the
        // end of every batch and housekeeping step; Z-HOP closes a flow mid-batch only when
        // a packet of a peer it checks against a new table finds the flow's exit, or the
        // peer, gone.) Receives already completed on the socket keep their buffers: the
        // socket lingers, closing, until its last reference is dropped.
        let target = Target::Socket(owner);
        if self.trains.holds(target) {
            self.submit_queued();
            let (trains, sockets, mut out) = self.train_parts();
            trains.flush_now(|t| t == target, sockets, &mut out);
        }
        if let Some((_, emptied)) = self.sockets.shared.close(owner) {
            if let Some(sid) = emptied {
                self.io.shared_exit_sockets -= 1;
                self.close_socket(sid);
            }
            return true;
        }
        let Some(sid) = self.sockets.owned(owner) else {
            return false;
        };
        *self.sockets.owned_entry(owner) = NONE;
        self.close_socket(sid);
        true
    }

    /// Outside the ring: cookie replies are rare (only under load) and 64 bytes.
    fn send_from_listener(&self, listener: Listener, to: SocketAddr, bytes: &[u8]) -> bool {
        self.sockets
            .listener(listener.id)
            .and_then(|sid| self.sockets.get(sid))
            .is_some_and(|s| s.socket.send_to(bytes, &to.into()).is_ok())
    }

    fn stats(&mut self) -> &mut IoStats {
        &mut self.io
    }

    /// A role's bytes (Z-HOP decrypts into its own buffer, valid only during this call) are
    /// copied into trains, which the worker queues on the ring at the end of the batch
    /// (`flush_trains`).
    fn send(&mut self, target: Target, bytes: &[u8]) -> bool {
        if self.sockets.for_target(target).is_none() {
            return false;
        }
        if !self.trains.has_free_buffer() {
            // A train may have to leave synchronously: what the ring holds queued goes first.
            self.submit_queued();
        }
        let (trains, sockets, mut out) = self.train_parts();
        trains.queue(target, bytes, sockets, &mut out);
        true
    }

    fn add_listener(&mut self, l: BoundListener) {
        let id = self.sockets.listeners.len() as u16;
        tracing::debug!(worker = self.id, local = %l.local, gro = l.gro, "listening");
        let sid = self.sockets.insert(IoSocket {
            socket: l.socket,
            role: Role::Listener(Listener {
                id,
                port: l.local.port(),
            }),
            local: Some(l.local),
            gso: self.cfg.gso,
            recv_armed: false,
            closing: false,
            refs: 0,
        });
        self.sockets.listeners.push(sid);
        self.arm_recv(sid);
    }

    fn remove_listener(&mut self, local: SocketAddr) -> Option<Listener> {
        let (id, sid, listener) =
            self.sockets
                .listeners
                .iter()
                .enumerate()
                .find_map(|(id, &sid)| match self.sockets.get(sid)? {
                    IoSocket {
                        role: Role::Listener(l),
                        local: Some(at),
                        closing: false,
                        ..
                    } if *at == local => Some((id, sid, *l)),
                    _ => None,
                })?;
        self.sockets.listeners[id] = NONE;
        tracing::debug!(worker = self.id, %local, "listener closed");
        // Cancels its receive; the descriptor closes (and the port frees) once nothing in
        // flight names it.
        self.close_socket(sid);
        Some(listener)
    }

    fn local_addr(&self, owner: SocketOwner) -> Option<SocketAddr> {
        let s = self.sockets.get(self.sockets.owned(owner)?)?;
        s.socket.local_addr().ok()?.as_socket()
    }

    fn shared_owner(&self, pool: u32, from: SocketAddr) -> Option<SocketOwner> {
        self.sockets.shared.owner(pool, from)
    }

    fn listener_local(&self, id: u16) -> Option<SocketAddr> {
        self.open_listeners()
            .find_map(|(l, local)| (l.id == id).then_some(local))
    }

    fn listener_for(&self, port: u16, client: SocketAddr) -> Option<Listener> {
        self.open_listeners().find_map(|(l, local)| {
            (l.port == port && local.is_ipv4() == client.is_ipv4()).then_some(l)
        })
    }
}

/// Receive buffers and how many holders each has.
struct Buffers {
    ring: BufRing,
    refs: Box<[u16]>,
}

impl Buffers {
    fn hold(&mut self, id: u16) {
        self.refs[usize::from(id)] += 1;
    }

    /// Drops one reference; the last gives the buffer back to the kernel.
    fn release(&mut self, id: u16) {
        let r = &mut self.refs[usize::from(id)];
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.ring.give_back(id);
        }
    }
}

/// An io_uring worker: the [`Worker`], and the ring, buffers and sockets that serve it.
struct Loop {
    plane: Plane,
    worker: Worker,
    bufs: Buffers,
    sends: SendSlots,
    poll: mio::Poll,
    events: mio::Events,
    wake_armed: bool,
    /// Sockets whose multishot receive ended and must be armed again.
    rearm: Vec<u32>,
    arrived: VecDeque<Arrived>,
    /// GSO sends the kernel refused, to send again segment by segment. Each holds the
    /// buffer and socket references its failed send had.
    retries: VecDeque<SendInfo>,
    completions: Vec<(u64, i32, u32)>,
    runs: Vec<Run>,
    stopping: bool,
}

/// The largest completion queue `io_uring_setup` accepts (the kernel's
/// `IORING_MAX_CQ_ENTRIES`); it answers EINVAL above.
const MAX_CQ_ENTRIES: usize = 65_536;

/// Sizes of a worker's pools: receive buffers, send slots, completion queue entries.
///
/// The completion queue has room for twice everything that can complete at once (a
/// receive per buffer, a send per slot), and must fit [`MAX_CQ_ENTRIES`]: so at most
/// 16,384 buffers, and fewer than four send slots per buffer above 4,096 (never fewer
/// than one).
fn pool_sizes(cfg: &DataPlaneConfig) -> (u16, usize, u32) {
    let buffers = cfg
        .ring_buffers
        .clamp(8, MAX_CQ_ENTRIES / 4)
        .next_power_of_two();
    let sends = (buffers * 4).min(MAX_CQ_ENTRIES / 2 - buffers);
    let cq = (2 * (buffers + sends)).next_power_of_two().max(4096);
    // At most 16,384 and 65,536 by the bounds above.
    (buffers as u16, sends, cq as u32)
}

/// Runs one worker. Reports on `ready` whether its ring could be set up before it starts
/// serving.
pub(crate) fn run(ctx: WorkerContext, ready: mpsc::Sender<Result<(), UringUnavailable>>) {
    let (buffers, sends, cq) = pool_sizes(&ctx.cfg);
    let setup = || -> Result<(IoUring, BufRing), UringUnavailable> {
        let ring = build_ring(cq)?;
        let bufs = BufRing::new(buffers, RECV_BUFFER, BUFFER_GROUP)
            .map_err(|e| UringUnavailable::new("mapping receive buffers", e))?;
        bufs.register(&ring.submitter())
            .map_err(|e| UringUnavailable::new("registering the buffer ring", e))?;
        Ok((ring, bufs))
    };
    let (ring, bufring) = match setup() {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let now = Instant::now();
    let nbufs = bufring.entries();
    let id = ctx.id;
    let (worker, ctx) = Worker::new(ctx, now);
    let mut w = Loop {
        worker,
        plane: Plane {
            id,
            cfg: ctx.cfg,
            ring: Ring {
                ring,
                inflight: 0,
                enters: 0,
            },
            sockets: Sockets::default(),
            recv_hdr: recv_msghdr(),
            io: IoStats::default(),
            trains: Trains::new(train::URING_BUFFERS),
            sync_send: SendBatch::new(MAX_GSO_SEGMENTS),
        },
        bufs: Buffers {
            ring: bufring,
            refs: vec![0; nbufs].into_boxed_slice(),
        },
        sends: SendSlots::new(sends),
        poll: ctx.poll,
        events: mio::Events::with_capacity(16),
        wake_armed: false,
        rearm: Vec::with_capacity(1024),
        arrived: VecDeque::with_capacity(nbufs),
        retries: VecDeque::with_capacity(sends),
        completions: Vec::with_capacity(cq as usize),
        runs: Vec::with_capacity(256),
        stopping: false,
    };
    w.worker
        .start(&mut w.plane, ctx.listeners, &ctx.restore, now);
    if let Err(e) = worker::run(&mut w) {
        tracing::error!(worker = w.worker.id, error = %e, "worker stopped");
    }
    w.worker.stop_fast_path(Instant::now());
    w.publish(Instant::now());
    w.teardown();
}

impl worker::Backend for Loop {
    fn worker(&self) -> &Worker {
        &self.worker
    }

    fn stats(&mut self) -> &mut IoStats {
        &mut self.plane.io
    }

    fn housekeeping(&mut self, now: Instant) {
        let publish = self.worker.housekeeping(&mut self.plane, now);
        self.flush_trains();
        if publish {
            self.publish(now);
        }
    }

    fn busy(&self) -> bool {
        !self.retries.is_empty()
    }

    /// Arms the waker and the receives that ended, gives the buffers back, then one
    /// `io_uring_enter` submits what is queued and waits; what completed is reaped and
    /// processed.
    fn serve(&mut self, wait: Duration) -> io::Result<()> {
        self.arm_wake();
        self.rearm_receives();
        self.bufs.ring.publish();
        debug_assert!(
            self.plane.trains.is_empty(),
            "Z-HOP trains wait while sleeping"
        );
        self.enter(wait, 1);
        let mut reaped = self.reap();
        // An enter that waits for one completion runs at most LOCAL_WORK_CAP of the
        // kernel's deferred completions; when it ran that many, ask for the rest
        // without waiting, so that a busy socket's batch is taken in one go.
        for _ in 0..MORE_ROUNDS {
            if reaped < LOCAL_WORK_CAP {
                break;
            }
            self.enter(Duration::ZERO, MORE_WANT);
            reaped = self.reap();
        }
        self.process(Instant::now());
        Ok(())
    }
}

impl Loop {
    /// Submits everything queued and waits up to `wait` for `want` completions.
    fn enter(&mut self, wait: Duration, want: usize) {
        let ts = Timespec::from(wait);
        let args = SubmitArgs::new().timespec(&ts);
        self.plane.ring.enters += 1;
        match self
            .plane
            .ring
            .ring
            .submitter()
            .submit_with_args(want, &args)
        {
            Ok(_) => {}
            // ETIME: nothing completed in time; EBUSY: completions to reap first.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => {
                tracing::warn!(worker = self.plane.id, error = %e, "io_uring_enter failed");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn publish(&mut self, now: Instant) {
        self.plane.io.ring_enters = self.plane.ring.enters;
        self.worker.publish(&self.plane.io, now);
    }

    /// Watches the waker's epoll descriptor, which becomes readable when the control side
    /// wakes this worker.
    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let entry = opcode::PollAdd::new(Fd(self.poll.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data(WAKE, 0));
        self.wake_armed = true;
        // SAFETY: the epoll descriptor belongs to `self.poll`, which outlives the ring.
        unsafe { self.plane.ring.push(&entry) };
    }

    /// Arms again the receives that ended, once the kernel has buffers to give them.
    fn rearm_receives(&mut self) {
        if self.rearm.is_empty() || self.bufs.ring.available() == 0 {
            return;
        }
        let mut rearm = std::mem::take(&mut self.rearm);
        for id in rearm.drain(..) {
            self.plane.arm_recv(id);
        }
        self.rearm = rearm;
    }

    /// Records every completion waiting; does no sending (that needs send slots, which
    /// reaping is what frees).
    /// Returns how many completions there were.
    fn reap(&mut self) -> usize {
        self.completions.clear();
        for cqe in self.plane.ring.ring.completion() {
            self.completions
                .push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        for i in 0..self.completions.len() {
            let (ud, res, flags) = self.completions[i];
            if !cqueue::more(flags) {
                self.plane.ring.inflight = self.plane.ring.inflight.saturating_sub(1);
            }
            let id = ud as u32;
            match ud >> KIND_SHIFT {
                RECV => self.on_recv(id, res, flags),
                SEND => self.on_send(id, res),
                WAKE => {
                    // Clears the waker's readiness; requests and shutdown are looked at in
                    // the next iteration.
                    let _ = self.poll.poll(&mut self.events, Some(Duration::ZERO));
                    if self.events.iter().any(|e| e.token() == worker::TUN_TOKEN) {
                        self.worker.tun_readable();
                    }
                    if !cqueue::more(flags) {
                        self.wake_armed = false;
                    }
                }
                CANCEL => self.plane.sockets.release(id),
                _ => {}
            }
        }
        self.completions.len()
    }

    fn on_recv(&mut self, id: u32, res: i32, flags: u32) {
        let more = cqueue::more(flags);
        let buf = cqueue::buffer_select(flags);
        if buf.is_some() {
            self.bufs.ring.taken();
        }
        let Some(s) = self.plane.sockets.get_mut(id) else {
            // Cannot happen: a socket with a receive armed holds a reference.
            if let Some(b) = buf {
                self.bufs.release(b);
            }
            return;
        };
        if !more {
            s.recv_armed = false;
        }
        match (res, buf) {
            (r, Some(b)) if r >= 0 => {
                self.plane.io.recv_calls += 1;
                if s.closing || self.stopping {
                    self.bufs.release(b);
                } else {
                    s.refs += 1;
                    self.bufs.hold(b);
                    self.arrived.push_back(Arrived { socket: id, buf: b });
                }
            }
            (r, buf) => {
                if let Some(b) = buf {
                    self.bufs.release(b);
                }
                match -r {
                    libc::ENOBUFS => self.plane.io.ring_starved += 1,
                    libc::ECANCELED => {}
                    0 => {}
                    _ => {
                        // ECONNREFUSED on a connected exit socket (ICMP port unreachable)
                        // and the like: counted, and the receive goes on.
                        self.plane.io.recv_errors += 1;
                        tracing::trace!(worker = self.plane.id, errno = -r, "receive error");
                    }
                }
            }
        }
        if !more {
            let closing = s.closing;
            if !closing && !self.stopping {
                self.rearm.push(id);
            }
            // The receive's own reference.
            self.plane.sockets.release(id);
        }
    }

    fn on_send(&mut self, slot: u32, res: i32) {
        let Some(info) = self.sends.finish(slot) else {
            return;
        };
        if res < 0 {
            let err = -res;
            if info.segment.is_some() && is_gso_errno(err) && !self.stopping {
                if let Some(s) = self.plane.sockets.get_mut(info.socket) {
                    if s.gso {
                        s.gso = false;
                        self.plane.io.gso_fallbacks += 1;
                        tracing::warn!(worker = self.plane.id, errno = err,
                            "kernel refused UDP GSO; this socket sends segments one by one from now on");
                    }
                }
                // Keeps the buffer and socket references for the resend.
                self.retries.push_back(info);
                return;
            }
            tracing::trace!(worker = self.plane.id, errno = err, "send failed");
            for _ in 0..segments(&info) {
                self.worker.router.record_drop(DropReason::SendFailed);
            }
        }
        self.release_buf(info.buf);
        self.plane.sockets.release(info.socket);
    }

    /// Holds the buffer a send reads, for as long as it is in flight.
    fn hold_buf(&mut self, buf: BufRef) {
        match buf {
            BufRef::Recv(b) => self.bufs.hold(b),
            BufRef::Train(b) => self.plane.trains.hold(b),
        }
    }

    /// Lets go of a buffer held by `hold_buf` (or by processing, or by a flush).
    fn release_buf(&mut self, buf: BufRef) {
        match buf {
            BufRef::Recv(b) => self.bufs.release(b),
            BufRef::Train(b) => self.plane.trains.release(b),
        }
    }

    /// Queues every waiting Z-HOP train on the ring: one `SendMsg` per run, with
    /// `UDP_SEGMENT` when it holds several datagrams. Each send holds the train's buffer
    /// until its completion (`on_send`), so the buffer is reused only after the kernel is
    /// done with it.
    fn flush_trains(&mut self) {
        while let Some(b) = self.plane.trains.next() {
            for i in 0..self.plane.trains.runs(b).len() {
                let run = self.plane.trains.runs(b)[i];
                self.send_run(&run, BufRef::Train(b));
            }
            // The flush's own hold, from `next`.
            self.plane.trains.release(b);
        }
        self.worker
            .record_send_failures(&mut self.plane.trains.failed);
        self.worker.flush_tun();
    }

    /// Routes every received message and queues its sends, then resends refused GSO
    /// sends one segment at a time.
    fn process(&mut self, now: Instant) {
        let batch = !self.arrived.is_empty();
        while let Some(a) = self.arrived.pop_front() {
            self.route(a, now);
            self.bufs.release(a.buf);
            self.plane.sockets.release(a.socket);
        }
        // The Exit role's TUN queue and hand-offs (nothing to do without a TUN device).
        if self.worker.exit.is_some() {
            self.worker.serve_exit(&mut self.plane, now);
        }
        self.flush_trains();
        if batch {
            // From the reaping of a batch to its sends queued; the next enter submits them.
            self.plane
                .io
                .batch_latency
                .record(now.elapsed().as_nanos() as u64);
        }
        while let Some(info) = self.retries.pop_front() {
            let seg = usize::from(info.segment.unwrap_or(1).max(1));
            let (start, len) = (info.start as usize, info.len as usize);
            let mut off = 0;
            while off < len {
                let n = seg.min(len - off);
                self.queue_send(SendInfo {
                    start: (start + off) as u32,
                    len: n as u32,
                    segment: None,
                    ..info
                });
                off += n;
            }
            self.release_buf(info.buf);
            self.plane.sockets.release(info.socket);
        }
    }

    fn route(&mut self, a: Arrived, now: Instant) {
        let source = match self.plane.sockets.get(a.socket) {
            Some(s) if !s.closing => match s.role {
                Role::Listener(l) => Source::Client(l),
                Role::Owned(owner) => Source::Socket(owner),
                Role::Shared(pool) => Source::Shared(pool),
            },
            // Its session ended after the message arrived: as if it arrived a moment later.
            _ => return,
        };
        // SAFETY: the worker holds buffer `a.buf` (the completion handed it over, and the
        // reference taken then is dropped only after this function).
        let buffer = unsafe { self.bufs.ring.buffer(a.buf) };
        let Some(msg) = Received::parse(buffer, &self.plane.recv_hdr) else {
            self.plane.io.recv_errors += 1;
            return;
        };
        if worker::is_train(msg.len, msg.stride) {
            self.plane.io.gro_trains += 1;
        }
        let payload = &buffer[msg.offset..msg.offset + msg.len];
        let planned = &mut self.runs;
        planned.clear();
        self.worker.route(
            &mut self.plane,
            now,
            worker::Message {
                source,
                from: msg.from,
                payload,
                stride: msg.stride,
            },
            // Runs are planned as if every socket did GSO; `send_run` splits them for
            // sockets that fell back.
            |target, offset, len| {
                runs::push_segment(
                    planned,
                    true,
                    target,
                    usize::from(a.buf),
                    msg.offset + offset,
                    len,
                )
            },
        );
        let runs = std::mem::take(&mut self.runs);
        for run in &runs {
            self.send_run(run, BufRef::Recv(a.buf));
        }
        self.runs = runs;
    }

    /// Queues the sends of `run`, whose bytes are in `buf` (its offsets are the buffer's).
    fn send_run(&mut self, run: &Run, buf: BufRef) {
        let Some(socket) = self.plane.sockets.for_target(run.target) else {
            // A session or flow went away while its packets were being routed.
            let reason = match run.target {
                Target::Client { .. } => DropReason::SendFailed,
                Target::Socket(_) => DropReason::NoSession,
            };
            for _ in 0..run.segments {
                self.worker.router.record_drop(reason);
            }
            return;
        };
        let dest = self.plane.sockets.dest(run.target);
        let gso = self.plane.sockets.get(socket).is_some_and(|s| s.gso);
        let info = SendInfo {
            socket,
            buf,
            start: run.start as u32,
            len: run.len as u32,
            segment: run.segment_size(),
            dest,
        };
        if run.segments > 1 && !gso {
            for (start, len) in run.singles() {
                self.queue_send(SendInfo {
                    start: start as u32,
                    len: len as u32,
                    segment: None,
                    ..info
                });
            }
        } else {
            self.queue_send(info);
        }
    }

    /// Queues one `SendMsg` of `info`'s bytes, taking references on its buffer and socket
    /// for as long as it is in flight.
    fn queue_send(&mut self, info: SendInfo) {
        while self.sends.free() == 0 {
            self.make_room();
        }
        let fd = match self.plane.sockets.get_mut(info.socket) {
            Some(s) if !s.closing => {
                s.refs += 1;
                s.socket.as_raw_fd()
            }
            _ => {
                for _ in 0..segments(&info) {
                    self.worker.router.record_drop(DropReason::NoSession);
                }
                return;
            }
        };
        self.hold_buf(info.buf);
        let payload = match info.buf {
            // SAFETY: the worker holds `b` (a reference was just taken), and
            // `start + len` lies within the buffer: runs are planned from payload offsets
            // inside it.
            BufRef::Recv(b) => unsafe {
                self.bufs.ring.buffer(b).as_ptr().add(info.start as usize)
            },
            // A train's bytes stay put until its last send completes (`train.rs`): its
            // buffer is a heap allocation that never moves, written only while free of
            // holders, and this send now holds it.
            BufRef::Train(b) => self.plane.trains.bytes(b)[info.start as usize..].as_ptr(),
        };
        let Some(prepared) = self.sends.take(info, payload) else {
            // Unreachable: a slot was made free above.
            self.release_buf(info.buf);
            self.plane.sockets.release(info.socket);
            return;
        };
        self.plane.io.send_calls += 1;
        if let Some(seg) = info.segment {
            self.plane.io.gso_sends += 1;
            if matches!(info.buf, BufRef::Train(_)) {
                self.plane.io.zhop_trains_sent += 1;
                self.plane.io.zhop_segments_in_trains +=
                    (info.len as usize).div_ceil(usize::from(seg).max(1)) as u64;
            }
        }
        // A single datagram needs no control message: a plain `Send` (with the address for
        // an unconnected listener) spares the kernel copying and parsing a msghdr.
        let entry = if info.segment.is_some() {
            opcode::SendMsg::new(Fd(fd), prepared.hdr).build()
        } else {
            opcode::Send::new(Fd(fd), payload, info.len)
                .dest_addr(prepared.name)
                .dest_addr_len(prepared.name_len)
                .build()
        }
        .user_data(user_data(SEND, prepared.slot));
        // SAFETY: the header and destination live in send slot `prepared.slot` until its
        // completion is reaped (`on_send` frees it); the payload is in a buffer held until
        // then, and the descriptor's socket holds a reference until then.
        unsafe { self.plane.ring.push(&entry) };
    }

    /// Every send slot is in flight: submit, wait for some to complete, and record them.
    fn make_room(&mut self) {
        self.bufs.ring.publish();
        self.enter(MAX_WAIT, 1);
        self.reap();
    }

    /// Cancels every request and waits for the kernel to let go of the buffers and headers
    /// before anything is freed.
    fn teardown(mut self) {
        self.stopping = true;
        // One cancellation per armed request, by user data: the kernel finds each in its
        // hash table, where cancelling "any" would rescan every request for each match.
        // Sends in flight complete on their own.
        let mut cancels: Vec<u64> = self
            .plane
            .sockets
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.recv_armed))
            .map(|(id, _)| user_data(RECV, id as u32))
            .collect();
        if self.wake_armed {
            cancels.push(user_data(WAKE, 0));
        }
        for target in cancels {
            self.plane
                .ring
                .cancel(target, user_data(TEARDOWN_CANCEL, 0));
        }
        let deadline = Instant::now() + TEARDOWN_WAIT;
        while self.plane.ring.inflight > 0 && Instant::now() < deadline {
            self.enter(Duration::from_millis(50), MORE_WANT);
            self.reap();
            tracing::debug!(
                worker = self.plane.id,
                reaped = self.completions.len(),
                inflight = self.plane.ring.inflight,
                "draining the ring"
            );
            // Refused GSO sends are not resent now.
            while let Some(info) = self.retries.pop_front() {
                self.release_buf(info.buf);
                self.plane.sockets.release(info.socket);
            }
        }
        if self.plane.ring.inflight > 0 {
            tracing::error!(
                worker = self.plane.id,
                inflight = self.plane.ring.inflight,
                "io_uring requests still in flight at shutdown; leaking the receive buffers"
            );
            let Loop {
                plane, bufs, sends, ..
            } = self;
            let Plane {
                ring,
                recv_hdr,
                trains,
                ..
            } = plane;
            drop(ring);
            std::mem::forget(bufs);
            std::mem::forget(sends);
            std::mem::forget(recv_hdr);
            std::mem::forget(trains);
        }
        // Otherwise fields drop in declaration order: the ring (in `plane`) first, then
        // the buffers and send headers it no longer uses.
    }
}

fn segments(info: &SendInfo) -> usize {
    let seg = info.segment.map_or(info.len as usize, usize::from).max(1);
    (info.len as usize).div_ceil(seg).max(1)
}

/// One received message, laid out in its buffer as `io_uring_recvmsg_out`, name, control
/// messages, payload.
#[derive(Debug, Clone, Copy)]
struct Received {
    from: SocketAddr,
    /// Where the payload starts in the buffer, and its length.
    offset: usize,
    len: usize,
    /// GRO segment size; equals `len` for a single datagram.
    stride: usize,
}

impl Received {
    fn parse(buffer: &[u8], hdr: &libc::msghdr) -> Option<Received> {
        let out = io_uring::types::RecvMsgOut::parse(buffer, hdr).ok()?;
        if out.is_payload_truncated() || out.is_name_data_truncated() {
            return None;
        }
        let from = sys::sockaddr_from_bytes(out.name_data())?;
        let payload = out.payload_data();
        let offset = (payload.as_ptr() as usize).checked_sub(buffer.as_ptr() as usize)?;
        let len = payload.len();
        let stride = sys::gro_segment_from_cmsgs(out.control_data()).unwrap_or(len);
        Some(Received {
            from,
            offset,
            len,
            stride: if stride == 0 { len } else { stride },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_fit_the_kernels_largest_completion_queue() {
        for asked in [
            0,
            1,
            8,
            9,
            256,
            4_096,
            6_000,
            8_192,
            16_384,
            16_385,
            32_768,
            1 << 20,
        ] {
            let cfg = DataPlaneConfig {
                ring_buffers: asked,
                ..DataPlaneConfig::default()
            };
            let (buffers, sends, cq) = pool_sizes(&cfg);
            let b = usize::from(buffers);
            assert!(
                b.is_power_of_two() && (8..=16_384).contains(&b),
                "{asked}: {b}"
            );
            assert!(b >= asked.min(16_384), "{asked}: {b} buffers");
            assert!(sends >= b, "{asked}: {sends} send slots for {b} buffers");
            assert!(cq as usize >= 2 * (b + sends), "{asked}: cq {cq}");
            assert!(cq as usize <= MAX_CQ_ENTRIES, "{asked}: cq {cq}");
        }
        // The default keeps four send slots per buffer.
        assert_eq!(pool_sizes(&DataPlaneConfig::default()), (256, 1024, 4096));
    }
}
