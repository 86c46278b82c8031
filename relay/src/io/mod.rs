//! The data plane: worker threads that drive the sans-IO [`Router`](crate::doublehop::router::Router) from real sockets.
//!
//! One worker per core, pinned. Each owns a `SO_REUSEPORT` socket on every listen address
//! (the kernel spreads clients over workers by 4-tuple, so a client always reaches the same
//! worker), its router, its sessions' exit-facing sockets and its buffers. Workers share
//! nothing but the read-only [`ExitTable`] snapshot, and talk to the rest of the process
//! only through a request channel drained once per loop iteration.
//!
//! Here: [`DataPlane`] (start-up, publishing tables, shutdown). Beside it: `config.rs`,
//! `stats.rs` (counters and reports), `backend.rs` (which backend runs), `listeners.rs`
//! (listen sockets and newly pinned ports), `control.rs` (the control side's questions to
//! the workers), `worker.rs` (the worker and its loop, whatever the backend), `runs.rs`,
//! `train.rs`, and the backends `portable.rs` and `uring/`.

mod backend;
mod config;
mod control;
mod exit;
mod fastpath;
mod handoff;
mod listeners;
pub mod portable;
mod runs;
mod shared;
mod stats;
pub mod sys;
mod train;
pub mod uring;
mod worker;

use self::backend::{choose_backend, Chosen};
pub use self::config::{
    default_workers, BackendChoice, DataPlaneConfig, ExitSockets, FastPathChoice,
    CONTROL_DESCRIPTORS,
};
pub use self::exit::ExitStats;
use self::listeners::{bind_group, pinned_exit_name};
pub use self::listeners::{BoundListener, PinError, PinnedListeners};
pub(crate) use self::stats::{CachePadded, SharedReport};
pub use self::stats::{FastPathReport, IoStats, LatencyHistogram, WorkerReport};
pub use uring::UringUnavailable;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::router::{SessionInfo, SessionSlot, SessionSnapshot};
use crate::table::{ExitTable, SharedTable};

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
    #[error("cannot create TUN device {name:?}: {source}")]
    Tun { name: String, source: io::Error },
}

/// Questions the control side may ask a worker; answered between batches.
#[derive(Debug)]
pub enum WorkerRequest {
    Sessions(mpsc::Sender<Vec<SessionInfo>>),
    /// The worker's tunnels with provisioned peers.
    Peers(mpsc::Sender<Vec<crate::zhop::PeerStatus>>),
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
    /// Why `fast_path = "auto"` did not attach, if it did not.
    fast_path_refused: Option<String>,
    /// The kernel fast path, when attached. Declared last: dropped (detached) after the
    /// workers stopped and withdrew their sessions.
    fast: Option<wraithgate_fastpath::FastPath>,
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
    /// Its own writer of the fast path's maps, when the fast path is attached.
    pub fast: Option<wraithgate_fastpath::SessionMaps>,
    /// The Exit role's TUN queue and hand-off queues, when the node has a TUN device.
    pub exit: Option<exit::ExitContext>,
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
        let mut cfg = cfg;
        if let Ok(limit) = sys::raise_nofile_limit() {
            cfg.descriptor_ceiling = limit.saturating_sub(config::CONTROL_DESCRIPTORS);
        }
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
        let (mut fast, mut fast_path_refused) = match fastpath::attach(&cfg) {
            Ok(fast) => (fast, None),
            Err(why) => (None, Some(why)),
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let backend = cfg.backend;
        let mut handles = Vec::with_capacity(workers);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut polls = Vec::with_capacity(workers);
        for _ in 0..workers {
            let poll = mio::Poll::new().map_err(StartError::Poll)?;
            let waker = Arc::new(
                mio::Waker::new(poll.registry(), portable::WAKER_TOKEN)
                    .map_err(StartError::Poll)?,
            );
            polls.push((poll, waker));
        }
        // The Exit role: one TUN queue per worker, and the queues through which a worker
        // hands a peer's packets to the worker holding its tunnel. The device goes away
        // when the last worker closes its queue.
        let mut exits: Vec<Option<exit::ExitContext>> = (0..workers).map(|_| None).collect();
        if let Some(tun) = &cfg.tun {
            let mut device =
                crate::tun::TunDevice::create(tun, workers).map_err(|source| StartError::Tun {
                    name: tun.name.clone(),
                    source,
                })?;
            let wakers = polls.iter().map(|(_, w)| w.clone()).collect();
            let handoff = Arc::new(handoff::Handoff::new(wakers, usize::from(tun.mtu)));
            for (slot, queue) in exits.iter_mut().zip(device.take_queues()) {
                *slot = Some(exit::ExitContext {
                    queue,
                    handoff: handoff.clone(),
                });
            }
            tracing::info!(device = device.name(), queues = workers, mtu = tun.mtu,
                addresses = ?tun.addresses, "TUN device up (Exit role)");
        }
        for (id, ((listeners, restore), ((poll, waker), exit))) in per_worker
            .into_iter()
            .zip(restore)
            .zip(polls.into_iter().zip(exits))
            .enumerate()
        {
            let (tx, rx) = mpsc::channel();
            let report = Arc::new(CachePadded(Mutex::new(WorkerReport {
                worker: id,
                backend: chosen.as_str(),
                ..Default::default()
            })));
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let maps = match fast.as_ref().map(|f| f.session_maps()) {
                Some(Ok(m)) => Some(m),
                Some(Err(e)) => {
                    let why = format!("a worker cannot open its maps ({e})");
                    tracing::warn!("fast path off: {why}; forwarding in userspace");
                    fast = None;
                    fast_path_refused = Some(why);
                    None
                }
                None => None,
            };
            let ctx = WorkerContext {
                fast: maps,
                id,
                cfg: cfg.clone(),
                table: table.clone(),
                listeners,
                restore,
                poll,
                requests: rx,
                report: report.clone(),
                shutdown: shutdown.clone(),
                exit,
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
            fast_path_refused,
            fast,
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

    /// The interfaces the kernel fast path is attached to; `None` when it is off.
    pub fn fast_path_interfaces(&self) -> Option<&[String]> {
        self.fast.as_ref().map(|f| f.interfaces())
    }

    /// Why `fast_path = "auto"` runs without the fast path (the line the log gave); `None`
    /// when it is attached or off.
    pub fn fast_path_refused(&self) -> Option<&str> {
        self.fast_path_refused.as_deref()
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Makes `table` the one workers route by, as [`DataPlane::publish_bound`] with the
    /// ports it newly pins bound by [`DataPlane::bind_pinned`], except that a port that
    /// cannot be bound is logged and skipped: the table is published regardless (mac1
    /// routing still reaches the exit).
    pub fn publish(&self, table: ExitTable) {
        let listeners = self.bind_new_ports(&table, false).unwrap_or_default();
        self.publish_bound(table, listeners);
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
