//! The data plane: worker threads that drive the sans-IO [`Router`] from real sockets.
//!
//! One worker per core, pinned. Each owns a `SO_REUSEPORT` socket on every listen address
//! (the kernel spreads clients over workers by 4-tuple, so a client always reaches the same
//! worker), its router, its sessions' exit-facing sockets and its buffers. Workers share
//! nothing but the read-only [`ExitTable`] snapshot, and talk to the rest of the process
//! only through a request channel drained once per loop iteration.

pub mod portable;
mod runs;
pub mod sys;
mod train;
pub mod uring;
mod worker;

pub use uring::UringUnavailable;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::Socket;

use crate::router::{RouterConfig, RouterStats, SessionInfo, SessionSlot, SessionSnapshot};
use crate::table::{ExitTable, SharedTable};

/// Which data-path implementation workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// io_uring where it can be set up, the portable backend otherwise.
    #[default]
    Auto,
    /// io_uring only; starting fails when it cannot be set up.
    Uring,
    /// recvmmsg/sendmmsg over epoll; works everywhere.
    Portable,
}

impl BackendChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendChoice::Auto => "auto",
            BackendChoice::Uring => "uring",
            BackendChoice::Portable => "portable",
        }
    }
}

/// Everything the data plane needs to start.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// Client-facing addresses; port 0 picks a free port (shared by all workers).
    pub listen: Vec<SocketAddr>,
    pub workers: usize,
    /// Pin worker `i` to core `i` (modulo the cores this process may use).
    pub pin_workers: bool,
    pub backend: BackendChoice,
    pub router: RouterConfig,
    /// Source address of exit-facing sockets; the kernel picks by route when `None`.
    pub exit_source: Option<IpAddr>,
    /// Messages per recvmmsg/sendmmsg call.
    pub batch: usize,
    /// Receive buffer per message: 64 KiB holds a whole GRO train.
    pub recv_buffer: usize,
    /// SO_RCVBUF/SO_SNDBUF of listeners. It absorbs bursts while a worker is busy, and under
    /// sustained overload it is the standing queue every packet waits in (BENCHMARKS.md,
    /// "Socket buffers": 16 MiB holds 100–300 ms there, 1–4 MiB a few tens of ms).
    pub listener_socket_buffer: usize,
    /// SO_RCVBUF/SO_SNDBUF of each exit-facing socket.
    pub exit_socket_buffer: usize,
    /// Use UDP GSO on send (each socket still falls back on its own when the kernel refuses).
    pub gso: bool,
    /// The node's static private key; Z-HOP (terminating provisioned peers' outer tunnels)
    /// is off without one.
    pub node_key: Option<[u8; 32]>,
    /// io_uring backend: receive buffers per worker (rounded up to a power of two, at most
    /// 16,384: the kernel bounds the completion queue they need), each big enough for a
    /// whole GRO train; they bound the worker's buffer memory.
    pub ring_buffers: usize,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            listen: vec!["0.0.0.0:51820".parse().expect("literal address")],
            workers: default_workers(),
            pin_workers: true,
            backend: BackendChoice::Auto,
            router: RouterConfig::default(),
            exit_source: None,
            batch: 32,
            recv_buffer: 65_536,
            listener_socket_buffer: 16 << 20,
            exit_socket_buffer: 1 << 20,
            gso: true,
            node_key: None,
            ring_buffers: 256,
        }
    }
}

/// One worker per core this process may run on.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Errors starting the data plane.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("no listen address configured")]
    NoListen,
    #[error("cannot start worker thread: {0}")]
    Thread(io::Error),
    #[error("cannot set up the event loop: {0}")]
    Poll(io::Error),
    #[error("the io_uring backend was asked for but cannot run here")]
    Uring(#[from] UringUnavailable),
}

/// A fixed-bucket latency histogram: plain integers, bounds 1 µs · 2^i.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// `buckets[i]` counts samples ≤ [`LatencyHistogram::bound_ns`]`(i)` and above the
    /// previous bound; the last bucket also holds everything larger.
    pub buckets: [u64; LatencyHistogram::BUCKETS],
    pub sum_ns: u64,
    pub count: u64,
}

impl LatencyHistogram {
    pub const BUCKETS: usize = 16;

    /// Upper bound of bucket `i` in nanoseconds (1 µs, 2 µs, … 32.8 ms).
    pub fn bound_ns(i: usize) -> u64 {
        1_000 << i
    }

    pub fn record(&mut self, ns: u64) {
        let i = (ns.max(1).div_ceil(1_000))
            .next_power_of_two()
            .trailing_zeros() as usize;
        self.buckets[i.min(Self::BUCKETS - 1)] += 1;
        self.sum_ns += ns;
        self.count += 1;
    }

    pub fn merge(&mut self, o: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += b;
        }
        self.sum_ns += o.sum_ns;
        self.count += o.count;
    }
}

/// I/O counters of one worker, beside its router's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Time from a batch's arrival to the return of its last send.
    pub batch_latency: LatencyHistogram,
    pub recv_calls: u64,
    pub send_calls: u64,
    /// Datagrams that arrived coalesced by GRO (counted per train).
    pub gro_trains: u64,
    /// Sends that used GSO.
    pub gso_sends: u64,
    /// Times the kernel refused GSO and the worker switched to plain sends.
    pub gso_fallbacks: u64,
    pub recv_errors: u64,
    /// The relay's own cookie replies the kernel refused to send.
    pub cookie_send_errors: u64,
    pub exit_sockets_open: u64,
    /// Longest single housekeeping step (table pick-up, expiry, control requests), in ns:
    /// what a table swap costs a worker's loop.
    pub housekeeping_max_ns: u64,
    /// Longest CPU time (the worker thread's own clock, so preemption does not count) of a
    /// housekeeping step that took a new table or swept sessions of removed exits, in ns:
    /// what a table swap itself costs a worker.
    pub swap_step_max_cpu_ns: u64,
    /// CPU time the worker thread has used, in nanoseconds (read when it publishes).
    pub cpu_ns: u64,
    /// io_uring: `io_uring_enter` calls (submit and wait).
    pub ring_enters: u64,
    /// io_uring: multishot receives that ended because every buffer was in use.
    pub ring_starved: u64,
    /// Z-HOP: GSO sends of its trains (several datagrams to one destination in one send).
    pub zhop_trains_sent: u64,
    /// Z-HOP: datagrams those GSO sends carried.
    pub zhop_segments_in_trains: u64,
    /// Z-HOP: datagrams sent on their own because every train buffer was in flight.
    pub zhop_unbatched: u64,
}

impl IoStats {
    pub fn merge(&mut self, o: &IoStats) {
        self.batch_latency.merge(&o.batch_latency);
        self.recv_calls += o.recv_calls;
        self.send_calls += o.send_calls;
        self.gro_trains += o.gro_trains;
        self.gso_sends += o.gso_sends;
        self.gso_fallbacks += o.gso_fallbacks;
        self.recv_errors += o.recv_errors;
        self.cookie_send_errors += o.cookie_send_errors;
        self.exit_sockets_open += o.exit_sockets_open;
        self.housekeeping_max_ns = self.housekeeping_max_ns.max(o.housekeeping_max_ns);
        self.swap_step_max_cpu_ns = self.swap_step_max_cpu_ns.max(o.swap_step_max_cpu_ns);
        self.cpu_ns += o.cpu_ns;
        self.ring_enters += o.ring_enters;
        self.ring_starved += o.ring_starved;
        self.zhop_trains_sent += o.zhop_trains_sent;
        self.zhop_segments_in_trains += o.zhop_segments_in_trains;
        self.zhop_unbatched += o.zhop_unbatched;
    }
}

/// `T` aligned, and so padded, to 128 bytes: per-worker state that another thread reads
/// never shares a cache line with another worker's. Graviton 2-4 (Neoverse N1/V1/V2) have
/// 64-byte lines, but some ARM server cores have 128-byte lines, and x86_64's spatial
/// prefetcher pulls lines in 128-byte pairs; 64 would be enough only on the first.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A worker's published report as the worker and the control side share it: in an
/// allocation of its own, padded so that no other worker's report shares its lines.
pub(crate) type SharedReport = Arc<CachePadded<Mutex<WorkerReport>>>;

/// What a worker last published about itself.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    pub worker: usize,
    pub backend: &'static str,
    pub router: RouterStats,
    pub io: IoStats,
    pub sessions: usize,
    pub pending: usize,
    pub table_generation: u64,
    pub zhop: crate::zhop::ZhopStats,
    /// When the worker published this report.
    pub published: Option<std::time::Instant>,
}

/// Questions the control side may ask a worker; answered between batches.
#[derive(Debug)]
pub enum WorkerRequest {
    Sessions(mpsc::Sender<Vec<SessionInfo>>),
    /// Every session with its exit-facing socket's local port, for a restart.
    Snapshot(mpsc::Sender<Vec<SessionSnapshot>>),
    /// A socket for a newly pinned listen port, bound centrally in worker order.
    AddListener(BoundListener),
    /// Close the listener on this address: its port is no longer pinned to any exit.
    RemoveListener(SocketAddr),
    CloseSession {
        slot: SessionSlot,
        reply: mpsc::Sender<bool>,
    },
}

/// A worker as the rest of the process sees it.
#[derive(Debug)]
struct WorkerHandle {
    thread: Option<JoinHandle<()>>,
    requests: mpsc::Sender<WorkerRequest>,
    waker: Arc<mio::Waker>,
    report: SharedReport,
}

/// The running data plane.
#[derive(Debug)]
pub struct DataPlane {
    workers: Vec<WorkerHandle>,
    shutdown: Arc<AtomicBool>,
    local: Vec<SocketAddr>,
    backend: &'static str,
    /// Why `auto` runs the portable backend, when it asked for io_uring and was refused.
    fallback: Option<UringUnavailable>,
    table: SharedTable,
    /// Tables replaced but perhaps still held by a worker. Kept here so that the last
    /// reference, and the cost of freeing a large table, falls on the control thread.
    retired: Mutex<Vec<Arc<ExitTable>>>,
    /// Every address listened on (pinned ports added as tables pin them).
    bound: Mutex<Vec<SocketAddr>>,
    /// The configured listen addresses (resolved): never released, pinned or not.
    configured: Vec<SocketAddr>,
    listen_ips: Vec<IpAddr>,
    listener_socket_buffer: usize,
    steering: bool,
    /// Cores this process may use that no pinned worker runs on.
    spare_cores: Vec<usize>,
}

/// The nice value of control threads when every core has a worker: the scheduler then
/// gives a busy worker most of the core and the API the rest.
pub const CONTROL_THREAD_NICE: i32 = 10;

/// Where [`DataPlane::settle_control_thread`] put a thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlPlacement {
    /// On the cores no worker is pinned to.
    SpareCores(Vec<usize>),
    /// Sharing the workers' cores, at a lower priority than theirs.
    Niced(i32),
    /// The kernel refused both; the thread runs as it was.
    Unchanged(String),
}

impl std::fmt::Display for ControlPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlPlacement::SpareCores(c) => {
                write!(f, "pinned to cores {c:?}, which have no worker")
            }
            ControlPlacement::Niced(n) => write!(
                f,
                "every core has a worker: sharing them at nice {n}, so workers come first"
            ),
            ControlPlacement::Unchanged(why) => write!(f, "left as it was ({why})"),
        }
    }
}

/// What a worker thread starts with, whichever backend it runs.
pub(crate) struct WorkerContext {
    pub id: usize,
    pub cfg: DataPlaneConfig,
    pub table: SharedTable,
    pub listeners: Vec<BoundListener>,
    /// Sessions saved before a restart that this worker's clients are steered to.
    pub restore: Vec<SessionSnapshot>,
    /// Its waker's registry: the worker learns of requests and shutdown through it.
    pub poll: mio::Poll,
    pub requests: mpsc::Receiver<WorkerRequest>,
    pub report: SharedReport,
    pub shutdown: Arc<AtomicBool>,
}

/// The backend workers actually run.
#[derive(Debug, Clone, Copy)]
enum Chosen {
    Uring,
    Portable,
}

impl Chosen {
    fn as_str(self) -> &'static str {
        match self {
            Chosen::Uring => "uring",
            Chosen::Portable => "portable",
        }
    }
}

/// Resolves `auto`: io_uring when this process can set it up, otherwise the portable
/// backend with one log line saying why; that reason is returned with the choice.
fn choose_backend(choice: BackendChoice) -> Result<(Chosen, Option<UringUnavailable>), StartError> {
    match choice {
        BackendChoice::Portable => Ok((Chosen::Portable, None)),
        BackendChoice::Uring => {
            uring::probe()?;
            Ok((Chosen::Uring, None))
        }
        BackendChoice::Auto => match uring::probe() {
            Ok(()) => Ok((Chosen::Uring, None)),
            Err(e) => {
                tracing::warn!("{e}; falling back to the portable backend (epoll + recvmmsg)");
                Ok((Chosen::Portable, Some(e)))
            }
        },
    }
}

/// A listener socket for one worker. All workers' sockets for an address are bound by the
/// control side, in worker order, so that port 0 resolves to one port shared by all and
/// the steering program's socket index is the worker's number.
#[derive(Debug)]
pub struct BoundListener {
    pub(crate) socket: Socket,
    pub(crate) local: SocketAddr,
    pub(crate) gro: bool,
}

/// Says once per address when the kernel gave a listener less receive buffer than
/// configured (`net.core.rmem_max` caps it for a process without `CAP_NET_ADMIN`).
fn warn_if_capped(socket: &socket2::Socket, asked: usize, addr: SocketAddr) {
    // The kernel reports twice the usable size it granted (it counts its bookkeeping).
    if let Ok(got) = socket.recv_buffer_size() {
        if got / 2 < asked {
            tracing::warn!(%addr, asked, granted = got / 2,
                "client-facing socket buffer is smaller than configured: raise \
                 net.core.rmem_max or run with CAP_NET_ADMIN");
        }
    }
}

/// Sockets bound for the listen ports a table newly pins, not yet handed to workers;
/// dropped, they close.
#[derive(Debug, Default)]
pub struct PinnedListeners {
    groups: Vec<(SocketAddr, Vec<BoundListener>)>,
}

impl PinnedListeners {
    /// The addresses bound.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.groups.iter().map(|(a, _)| *a)
    }
}

/// A listen port a table pins to an exit that cannot be bound.
#[derive(Debug, thiserror::Error)]
#[error("exit {exit:?}: listen port {port} cannot be bound on {addr}: {source}")]
pub struct PinError {
    pub exit: String,
    pub port: u16,
    pub addr: SocketAddr,
    pub source: io::Error,
}

/// The name of the exit `table` pins to `port`, for messages.
fn pinned_exit_name(table: &ExitTable, port: u16) -> String {
    table
        .pinned(port)
        .and_then(|id| table.get(id))
        .map_or_else(String::new, |e| e.spec.name.clone())
}

/// Binds one socket per worker on `addr` (in worker order) and steers clients over them.
/// Returns the sockets and the address actually bound.
fn bind_group(
    addr: SocketAddr,
    workers: usize,
    buffer: usize,
    steering: &mut bool,
) -> Result<(Vec<BoundListener>, SocketAddr), StartError> {
    let mut resolved = addr;
    let mut group = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (socket, gro) = sys::listener_socket(resolved, buffer)
            .map_err(|source| StartError::Bind { addr, source })?;
        resolved = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(resolved);
        if group.is_empty() {
            warn_if_capped(&socket, buffer, resolved);
        }
        group.push(BoundListener {
            socket,
            local: resolved,
            gro,
        });
    }
    if workers > 1 {
        if let Err(e) = sys::attach_steering(&group[0].socket, addr.is_ipv6(), workers) {
            if *steering {
                tracing::warn!(%addr, error = %e,
                    "cannot steer clients to workers by address; the kernel's hash decides, \
                     and restored sessions may land on the wrong worker");
            }
            *steering = false;
        }
    }
    Ok((group, resolved))
}

impl DataPlane {
    /// Binds every listen address once per worker and starts the workers.
    pub fn start(cfg: DataPlaneConfig, table: SharedTable) -> Result<DataPlane, StartError> {
        Self::start_restoring(cfg, table, Vec::new())
    }

    /// Starts the data plane with sessions saved by [`DataPlane::snapshot`] before a
    /// restart; each goes to the worker its client is steered to.
    ///
    /// Under `auto`, a worker that cannot set up its own ring (the probe passed, but a
    /// worker's ring or buffers are far bigger than the probe's, so memory limits bite
    /// there) makes the whole data plane start again on the portable backend, with one log
    /// line saying why: every worker runs the same backend.
    pub fn start_restoring(
        cfg: DataPlaneConfig,
        table: SharedTable,
        restore_sessions: Vec<SessionSnapshot>,
    ) -> Result<DataPlane, StartError> {
        if cfg.listen.is_empty() {
            return Err(StartError::NoListen);
        }
        let (chosen, fallback) = choose_backend(cfg.backend)?;
        if !matches!((cfg.backend, chosen), (BackendChoice::Auto, Chosen::Uring)) {
            return Self::start_backend(cfg, chosen, fallback, table, restore_sessions);
        }
        match Self::start_backend(
            cfg.clone(),
            Chosen::Uring,
            None,
            table.clone(),
            restore_sessions.clone(),
        ) {
            Err(StartError::Uring(e)) => {
                tracing::warn!(
                    "{e}; a worker could not set up io_uring, falling back to the portable \
                     backend (epoll + recvmmsg)"
                );
                Self::start_backend(cfg, Chosen::Portable, Some(e), table, restore_sessions)
            }
            started => started,
        }
    }

    /// Binds the listeners and starts every worker on `chosen` (`fallback`: why `auto` did
    /// not get io_uring, if so). Whatever was started is stopped again (sockets closed)
    /// before an error returns.
    fn start_backend(
        cfg: DataPlaneConfig,
        chosen: Chosen,
        fallback: Option<UringUnavailable>,
        table: SharedTable,
        restore_sessions: Vec<SessionSnapshot>,
    ) -> Result<DataPlane, StartError> {
        let workers = cfg.workers.max(1);
        let _ = sys::raise_nofile_limit();
        // Every session holds one exit-facing socket, each worker a few more descriptors.
        let descriptors = workers as u64 * (cfg.router.max_sessions as u64 + 64) + 1024;
        match sys::reserve_descriptors(descriptors) {
            Ok(n) => tracing::debug!(descriptors = n, "descriptor table reserved"),
            Err(e) => tracing::warn!(error = %e, "could not reserve the descriptor table"),
        }
        let pinned: Vec<u16> = table.load().pinned_ports().collect();
        let mut per_worker: Vec<Vec<BoundListener>> = (0..workers).map(|_| Vec::new()).collect();
        let mut local: Vec<SocketAddr> = Vec::new();
        let mut steering = true;
        // The configured addresses first (port 0 resolves here), then each pinned port on
        // their addresses, unless a configured address already is that port: a second
        // SO_REUSEPORT group on one address would split its clients between the two.
        let pinned_addrs = cfg.listen.iter().flat_map(|a| {
            pinned
                .iter()
                .map(move |&port| SocketAddr::new(a.ip(), port))
        });
        for (i, addr) in cfg.listen.iter().copied().chain(pinned_addrs).enumerate() {
            let is_pin = i >= cfg.listen.len();
            if is_pin && local.contains(&addr) {
                continue;
            }
            let (group, resolved) =
                match bind_group(addr, workers, cfg.listener_socket_buffer, &mut steering) {
                    Ok(bound) => bound,
                    // One exit's port must not cost every other exit its forwarding: the
                    // exit is still found by mac1 on the configured listeners, and the
                    // next table published retries the port.
                    Err(e) if is_pin => {
                        tracing::error!(exit = %pinned_exit_name(&table.load(), addr.port()),
                            port = addr.port(), error = %e,
                            "pinned listen port cannot be bound; its exit is reached through \
                             the other listeners (by mac1) until the port is free");
                        continue;
                    }
                    Err(e) => return Err(e),
                };
            for (w, l) in per_worker.iter_mut().zip(group) {
                w.push(l);
            }
            local.push(resolved);
        }
        let mut restore: Vec<Vec<SessionSnapshot>> = (0..workers).map(|_| Vec::new()).collect();
        for snap in restore_sessions {
            restore[sys::steer(snap.client, workers)].push(snap);
        }
        let cores = if cfg.pin_workers {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let spare_cores: Vec<usize> = if cores.len() > workers {
            cores[workers..].iter().map(|c| c.id).collect()
        } else {
            Vec::new()
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let backend = cfg.backend;
        let mut handles = Vec::with_capacity(workers);
        let (ready_tx, ready_rx) = mpsc::channel();
        for (id, (listeners, restore)) in per_worker.into_iter().zip(restore).enumerate() {
            let poll = mio::Poll::new().map_err(StartError::Poll)?;
            let waker = Arc::new(
                mio::Waker::new(poll.registry(), portable::WAKER_TOKEN)
                    .map_err(StartError::Poll)?,
            );
            let (tx, rx) = mpsc::channel();
            let report = Arc::new(CachePadded(Mutex::new(WorkerReport {
                worker: id,
                backend: chosen.as_str(),
                ..Default::default()
            })));
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let ctx = WorkerContext {
                id,
                cfg: cfg.clone(),
                table: table.clone(),
                listeners,
                restore,
                poll,
                requests: rx,
                report: report.clone(),
                shutdown: shutdown.clone(),
            };
            let ready = ready_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("wg-worker-{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            tracing::warn!(worker = id, core = core.id, "could not pin worker");
                        }
                    }
                    match chosen {
                        Chosen::Uring => uring::run(ctx, ready),
                        Chosen::Portable => {
                            let _ = ready.send(Ok(()));
                            portable::run(ctx)
                        }
                    }
                })
                .map_err(StartError::Thread)?;
            handles.push(WorkerHandle {
                thread: Some(thread),
                requests: tx,
                waker,
                report,
            });
        }
        drop(ready_tx);
        let mut plane = DataPlane {
            workers: handles,
            shutdown,
            bound: Mutex::new(local.clone()),
            // `local` lists the configured addresses first, then the pinned ports.
            configured: local[..cfg.listen.len()].to_vec(),
            local,
            backend: chosen.as_str(),
            fallback,
            table,
            retired: Mutex::new(Vec::new()),
            listen_ips: cfg.listen.iter().map(|a| a.ip()).collect(),
            listener_socket_buffer: cfg.listener_socket_buffer,
            steering,
            spare_cores,
        };
        // Each worker sets up its own ring (a ring is tied to the thread that made it).
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    plane.stop();
                    return Err(StartError::Uring(e));
                }
                Err(_) => {
                    plane.stop();
                    return Err(StartError::Thread(io::Error::other(
                        "a worker died starting",
                    )));
                }
            }
        }
        tracing::info!(
            workers,
            backend = backend.as_str(),
            chosen = chosen.as_str(),
            listen = ?plane.local,
            "data plane started"
        );
        Ok(plane)
    }

    /// Keeps the calling thread, a control-side one (the API, the state writer), out of
    /// the workers' way: pinned to the cores no worker is pinned to when there are any,
    /// otherwise (every core has a worker, or workers are not pinned) at nice
    /// [`CONTROL_THREAD_NICE`]. Threads it starts afterwards inherit either.
    pub fn settle_control_thread(&self) -> ControlPlacement {
        let mut why = Vec::new();
        if !self.spare_cores.is_empty() {
            match sys::pin_current_thread(&self.spare_cores) {
                Ok(()) => return ControlPlacement::SpareCores(self.spare_cores.clone()),
                Err(e) => why.push(format!("pinning: {e}")),
            }
        }
        match sys::set_current_thread_nice(CONTROL_THREAD_NICE) {
            Ok(()) => ControlPlacement::Niced(CONTROL_THREAD_NICE),
            Err(e) => {
                why.push(format!("nice: {e}"));
                ControlPlacement::Unchanged(why.join("; "))
            }
        }
    }

    /// The addresses actually bound (port 0 resolved), listen addresses first.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    /// The backend the workers run.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Why `backend = "auto"` fell back to the portable backend (the error io_uring's set-up
    /// gave); `None` when it runs io_uring or another backend was asked for by name.
    pub fn fallback_reason(&self) -> Option<&UringUnavailable> {
        self.fallback.as_ref()
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Each worker's last report (published every few tens of milliseconds).
    pub fn reports(&self) -> Vec<WorkerReport> {
        self.workers
            .iter()
            .map(|w| w.report.lock().map(|r| r.clone()).unwrap_or_default())
            .collect()
    }

    /// Reports published after `since` (every worker publishes within 100 ms while it
    /// runs); waits up to `timeout`, then returns what there is.
    pub fn reports_after(&self, since: std::time::Instant, timeout: Duration) -> Vec<WorkerReport> {
        let end = std::time::Instant::now() + timeout;
        loop {
            let r = self.reports();
            if r.iter().all(|w| w.published.is_some_and(|p| p >= since))
                || std::time::Instant::now() >= end
            {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Router counters summed over workers.
    pub fn stats(&self) -> RouterStats {
        let mut total = RouterStats::default();
        for r in self.reports() {
            total.merge(&r.router);
        }
        total
    }

    /// Asks every worker for its sessions; workers that do not answer within `timeout`
    /// are left out.
    pub fn sessions(&self, timeout: Duration) -> Vec<(usize, SessionInfo)> {
        let mut out = Vec::new();
        let mut pending = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            if w.requests.send(WorkerRequest::Sessions(tx)).is_ok() {
                let _ = w.waker.wake();
                pending.push((i, rx));
            }
        }
        for (i, rx) in pending {
            if let Ok(list) = rx.recv_timeout(timeout) {
                out.extend(list.into_iter().map(|s| (i, s)));
            }
        }
        out
    }

    /// Closes one session of one worker. Returns whether it existed.
    pub fn close_session(&self, worker: usize, slot: SessionSlot, timeout: Duration) -> bool {
        let Some(w) = self.workers.get(worker) else {
            return false;
        };
        let (tx, rx) = mpsc::channel();
        if w.requests
            .send(WorkerRequest::CloseSession { slot, reply: tx })
            .is_err()
        {
            return false;
        }
        let _ = w.waker.wake();
        rx.recv_timeout(timeout).unwrap_or(false)
    }

    /// Makes `table` the one workers route by, as [`DataPlane::publish_bound`] with the
    /// ports it newly pins bound by [`DataPlane::bind_pinned`], except that a port that
    /// cannot be bound is logged and skipped: the table is published regardless (mac1
    /// routing still reaches the exit).
    pub fn publish(&self, table: ExitTable) {
        let listeners = self.bind_new_ports(&table, false).unwrap_or_default();
        self.publish_bound(table, listeners);
    }

    /// Binds, on every listen address and once per worker, each listen port `table` pins
    /// that is not bound yet, without handing the sockets to workers: a change can find
    /// out that its port is taken before it is persisted. A port the running table pins
    /// already (and could not bind before) is retried but never refuses the change; a port
    /// newly pinned that cannot be bound does, and closes whatever this call bound.
    ///
    /// Callers serialise `bind_pinned` and the [`DataPlane::publish_bound`] that follows.
    pub fn bind_pinned(&self, table: &ExitTable) -> Result<PinnedListeners, PinError> {
        self.bind_new_ports(table, true)
    }

    fn bind_new_ports(&self, table: &ExitTable, strict: bool) -> Result<PinnedListeners, PinError> {
        let running = self.table.load();
        let bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        let mut steering = self.steering;
        let mut out = PinnedListeners::default();
        for ip in &self.listen_ips {
            for port in table.pinned_ports() {
                let addr = SocketAddr::new(*ip, port);
                if bound.contains(&addr) || out.groups.iter().any(|(a, _)| *a == addr) {
                    continue;
                }
                match bind_group(
                    addr,
                    self.workers.len(),
                    self.listener_socket_buffer,
                    &mut steering,
                ) {
                    Ok((group, _)) => out.groups.push((addr, group)),
                    Err(e) => {
                        let source = match e {
                            StartError::Bind { source, .. } => source,
                            other => io::Error::other(other.to_string()),
                        };
                        let err = PinError {
                            exit: pinned_exit_name(table, port),
                            port,
                            addr,
                            source,
                        };
                        if strict && running.pinned(port).is_none() {
                            return Err(err);
                        }
                        tracing::warn!(error = %err, "pinned port not bound");
                    }
                }
            }
        }
        Ok(out)
    }

    /// Makes `table` the one workers route by: hands them the sockets `listeners` holds
    /// for the ports it newly pins (see [`DataPlane::bind_pinned`]), publishes it, wakes
    /// the workers, and releases the ports it no longer pins (sessions that came through
    /// one are closed: their clients must move to another port anyway). Sessions whose
    /// exit stays carry on.
    pub fn publish_bound(&self, table: ExitTable, listeners: PinnedListeners) {
        let mut bound = self.bound.lock().unwrap_or_else(|p| p.into_inner());
        for (addr, group) in listeners.groups {
            for (w, l) in self.workers.iter().zip(group) {
                let _ = w.requests.send(WorkerRequest::AddListener(l));
            }
            bound.push(addr);
            tracing::info!(%addr, "listening on pinned port");
        }
        let ports: Vec<u16> = table.pinned_ports().collect();
        let released: Vec<SocketAddr> = bound
            .iter()
            .copied()
            .filter(|a| !self.configured.contains(a) && !ports.contains(&a.port()))
            .collect();
        bound.retain(|a| !released.contains(a));
        drop(bound);
        let old = self.table.load();
        self.table.publish(table);
        // After the table: by the time a worker closes the socket, no initiation on it is
        // routed by the old pin any more.
        for &addr in &released {
            for w in &self.workers {
                let _ = w.requests.send(WorkerRequest::RemoveListener(addr));
            }
            tracing::info!(%addr, "pinned port released");
        }
        self.nudge();
        self.reap_retired();
        self.retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(old);
    }

    /// Frees retired tables no worker holds any more. Called on every publish; callers
    /// that publish rarely may call it now and then.
    pub fn reap_retired(&self) {
        let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        retired.retain(|t| Arc::strong_count(t) > 1);
    }

    /// The table workers route by.
    pub fn table(&self) -> Arc<ExitTable> {
        self.table.load()
    }

    /// Every session with what a restart needs to keep it (see
    /// [`DataPlane::start_restoring`]).
    pub fn snapshot(&self, timeout: Duration) -> Vec<SessionSnapshot> {
        let mut out = Vec::new();
        let mut pending = Vec::new();
        for w in &self.workers {
            let (tx, rx) = mpsc::channel();
            if w.requests.send(WorkerRequest::Snapshot(tx)).is_ok() {
                let _ = w.waker.wake();
                pending.push(rx);
            }
        }
        for rx in pending {
            if let Ok(list) = rx.recv_timeout(timeout) {
                out.extend(list);
            }
        }
        out
    }

    /// Wakes workers so that they notice a new table at once rather than at their next
    /// packet or tick.
    pub fn nudge(&self) {
        for w in &self.workers {
            let _ = w.waker.wake();
        }
    }

    /// Stops every worker and waits for them.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        for w in &self.workers {
            let _ = w.waker.wake();
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_reports_fill_whole_128_byte_blocks() {
        assert_eq!(
            std::mem::align_of::<CachePadded<Mutex<WorkerReport>>>(),
            128
        );
        assert_eq!(
            std::mem::size_of::<CachePadded<Mutex<WorkerReport>>>() % 128,
            0
        );
        let reports: Vec<SharedReport> = (0..4)
            .map(|_| Arc::new(CachePadded(Mutex::new(WorkerReport::default()))))
            .collect();
        for r in &reports {
            assert_eq!(Arc::as_ptr(r) as usize % 128, 0, "{:p}", Arc::as_ptr(r));
        }
    }

    #[test]
    fn histogram_buckets_by_powers_of_two_microseconds() {
        let mut h = LatencyHistogram::default();
        for ns in [1, 999, 1_000, 1_001, 3_000, 40_000_000] {
            h.record(ns);
        }
        assert_eq!(h.buckets[0], 3, "up to 1 µs");
        assert_eq!(h.buckets[1], 1, "up to 2 µs");
        assert_eq!(h.buckets[2], 1, "up to 4 µs");
        assert_eq!(h.buckets[LatencyHistogram::BUCKETS - 1], 1, "overflow");
        assert_eq!(h.count, 6);
    }
}
