//! The sans-IO DoubleHop router (DESIGN §3): per-client NAT for WireGuard.
//!
//! Bytes, their source and `now` go in; an [`Action`] for that very buffer comes out, plus
//! [`Command`]s for the I/O layer (open or close an exit-facing socket). The router never
//! touches a socket or the clock, so every rule below is tested with a virtual clock.
//!
//! Routing:
//! - An initiation from client address `C` picks its exit by the listen port it arrived on
//!   (a port pinned to one exit) or else by mac1 against every exit's key. The pair
//!   `(C, exit)` gets a session with its own exit-facing socket, connected to the exit, so the
//!   exit sees one endpoint per client and can start handshakes towards it.
//! - Client → exit transport is found by `C` and the receiver index, which must be one the
//!   exit assigned to this client (see `ExitIndices` for which exit-side packets may teach
//!   the router an index). A client's response names its exit by its mac1 (keyed by the
//!   exit's public key, like an initiation's); a client's cookie reply by the index of the
//!   exit initiation it refuses.
//! - Exit → client packets are found by the socket (slot) they arrived on.
//!
//! Security (DESIGN §3 requirements): nothing is sent anywhere but to a session's client or
//! through a session's socket to its exit; a session never moves, so a spoofed packet moves
//! nothing; until the client proves it receives what we send to it (by using an index the
//! exit sent only to it), it never gets more bytes than it sent.
//!
//! Nothing that arrives on an exit-facing socket is authenticated: anyone who can spoof the
//! exit's address and knows (or guesses) the socket's port is "the exit" to the relay. So no
//! exit-side packet may cost a live session its traffic: an exit's response is believed
//! only when it answers an initiation this session's client sent (whose sender index an
//! off-path attacker never sees), once; an exit's initiation only offers an index, which
//! the client's own response (mac1 for its exit) or transport turns into one it may use.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::{Admission, CookieSettings, HandshakeAdmission, SourceBudget};
use crate::cookie::CookieReplyBytes;
use crate::drop_reason::DropReason;
use crate::keys::PublicKey;
use crate::ratelimit::HandshakeRateLimiter;
use crate::slab::Slab;
// Re-exported: the names the router's API speaks in, defined where every role finds them.
pub use crate::role::{Listener, Traffic};
pub use crate::slab::SessionSlot;
use crate::table::{ExitId, ExitTable};
use crate::wire::{Initiation, Message};

/// Limits and timeouts of one worker's router.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Most sessions (pending and established) this router holds.
    pub max_sessions: usize,
    /// Most sessions still waiting for the exit's response.
    pub max_pending: usize,
    /// Most sessions one client address may hold (one per exit it talks to).
    pub max_sessions_per_client: usize,
    /// A handshake the exit has not answered within this time is forgotten. WireGuard
    /// clients retry every REKEY_TIMEOUT (5 s).
    pub pending_timeout: Duration,
    /// A session without a packet either way for this long is closed. WireGuard throws its
    /// keys away after 3 × REJECT_AFTER_TIME (540 s). Never shorter than `pending_timeout`
    /// (the router raises it): a session's deadline must not move earlier when it is
    /// established, or its timer would fire late.
    pub idle_timeout: Duration,
    /// Handshake initiations per second allowed from one source address (or IPv6 /64).
    pub handshakes_per_second: u32,
    /// Initiations one source may send at once.
    pub handshake_burst: u32,
    /// Buckets of the per-source rate limiter.
    pub rate_limit_buckets: usize,
    /// Work per [`Router::handle_timeout`] call after a table swap, in sessions examined;
    /// a session closed because its exit left counts as [`SWEEP_CLOSE_COST`]. The default
    /// keeps one step near 15 µs (the `table_swap` criterion bench measures ≈30 ns to
    /// examine a session and ≈150 ns to close one), so a swap never stalls a worker.
    pub swap_sweep_budget: usize,
    /// Cookie replies this router sends per second at most (see [`crate::cookie`]);
    /// initiations beyond it, when a challenge is due, are dropped as `rate_limited`. It
    /// also caps the mac1 scans a flood of rate-limited initiations can cost.
    pub cookie_replies_per_second: u32,
    /// Secret the relay's cookies derive from. Routers of one node share it, so a cookie
    /// from one worker is good at all of them. Random by default.
    pub cookie_seed: [u8; 32],
    /// Whether a kernel fast path carries out [`Command::Offload`]: the router then offloads
    /// each IPv4 session whose client has proven its address, and withdraws it when it
    /// closes. Off by default (the I/O layer turns it on when the program is attached).
    pub offload: bool,
}

impl RouterConfig {
    /// The cookie settings Z-HOP shares with the router.
    pub fn cookie_settings(&self) -> CookieSettings {
        CookieSettings {
            seed: self.cookie_seed,
            replies_per_second: self.cookie_replies_per_second,
        }
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            max_sessions: 65_536,
            max_pending: 8_192,
            max_sessions_per_client: MAX_SESSIONS_PER_CLIENT,
            pending_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(540),
            handshakes_per_second: 20,
            handshake_burst: 5,
            rate_limit_buckets: 8_192,
            swap_sweep_budget: 512,
            cookie_replies_per_second: 20_000,
            cookie_seed: rand::random(),
            offload: false,
        }
    }
}

/// The hard upper bound of [`RouterConfig::max_sessions_per_client`].
pub const MAX_SESSIONS_PER_CLIENT: usize = 4;

/// How many exit-assigned receiver indices a session remembers (WireGuard keeps a
/// previous, current and next keypair, plus handshakes in flight).
const EXIT_INDICES: usize = 8;

/// How many of its client's initiations a session remembers while waiting for the exit's
/// response (a client retries every REKEY_TIMEOUT, 5 s, with a new sender index).
const CLIENT_INITIATIONS: usize = 4;

/// How many indices of exit initiations a session remembers for routing the client's
/// cookie replies to them.
const OFFERED_INDICES: usize = 4;

/// What closing a session costs a sweep step, in sessions examined (see
/// [`RouterConfig::swap_sweep_budget`]).
pub const SWEEP_CLOSE_COST: usize = 5;

/// What to do with the packet just handled. The payload is sent from the buffer it was
/// received into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send through the session's exit-facing socket (connected to its exit).
    ToExit(SessionSlot),
    /// Send from the listener to the client.
    ToClient {
        listener: Listener,
        client: SocketAddr,
    },
    /// Refuse it; already counted.
    Drop(DropReason),
}

/// Work for the I/O layer. Drain these with [`Router::poll_command`] after every
/// `handle_*` call and before acting on its [`Action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Open a UDP socket connected to `exit` for `slot`, bound to `local_port` when given
    /// (a restored session keeps the endpoint its exit knows); report failure with
    /// [`Router::socket_failed`].
    OpenExitSocket {
        slot: SessionSlot,
        exit: SocketAddr,
        local_port: Option<u16>,
    },
    /// Close the socket of `slot`.
    CloseExitSocket { slot: SessionSlot },
    /// Send `reply`, the relay's own cookie reply to an initiation it challenged, from
    /// `listener` to `client` (smaller than the initiation it answers).
    SendCookieReply {
        listener: Listener,
        client: SocketAddr,
        reply: CookieReplyBytes,
    },
    /// Let the kernel fast path forward this session's transport messages: client → exit
    /// with exactly these receiver indices (withdrawing any offloaded before that are no
    /// longer among them), exit → client from its exit. Emitted only for a session whose
    /// client has proven its address (the amplification rule), again whenever its usable
    /// indices change (a rekey), and only with [`RouterConfig::offload`].
    Offload(Offload),
    /// Stop the fast path forwarding this session (it closes: expiry, kill, table swap);
    /// always before its socket's [`Command::CloseExitSocket`].
    Withdraw { slot: SessionSlot },
}

/// What the fast path needs to forward one session, as the router knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    pub slot: SessionSlot,
    /// The client's proven address.
    pub client: SocketAddr,
    /// The listener it sends to (and the fast path's replies leave from).
    pub listener: Listener,
    pub exit: SocketAddr,
    /// Receiver indices the exit assigned to this session that its client may use.
    pub indices: [u32; EXIT_INDICES],
    pub len: u8,
}

impl Offload {
    /// The receiver indices, oldest first.
    pub fn indices(&self) -> &[u32] {
        &self.indices[..self.len as usize]
    }
}

/// Counters of one router; plain integers, summed across workers at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterStats {
    pub client_to_exit: Traffic,
    pub exit_to_client: Traffic,
    /// Initiations forwarded from clients to exits.
    pub client_handshakes: u64,
    /// Initiations forwarded from exits to clients.
    pub exit_handshakes: u64,
    /// Cookie replies forwarded, either way.
    pub cookie_replies: u64,
    pub sessions_opened: u64,
    pub sessions_established: u64,
    pub sessions_expired_pending: u64,
    pub sessions_expired_idle: u64,
    /// Closed because their exit left the table (or changed endpoint).
    pub sessions_closed_by_table: u64,
    /// Closed on request (operator kill).
    pub sessions_closed_by_request: u64,
    pub table_swaps: u64,
    /// Forwarded by the kernel fast path (not in `client_to_exit`, which is this worker's
    /// own forwarding), as read back from its per-session counters.
    pub fast_client_to_exit: Traffic,
    /// Forwarded by the kernel fast path, exit → client.
    pub fast_exit_to_client: Traffic,
    /// Offload requests made (a session's first, and one per rekey's new indices).
    pub offloads: u64,
    /// Sessions withdrawn from the fast path.
    pub withdrawals: u64,
    pub drops: [u64; DropReason::COUNT],
}

impl RouterStats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }
    /// Adds `other` into `self` (for summing workers).
    pub fn merge(&mut self, other: &RouterStats) {
        let t = |a: &mut Traffic, b: &Traffic| {
            a.packets += b.packets;
            a.bytes += b.bytes;
        };
        t(&mut self.client_to_exit, &other.client_to_exit);
        t(&mut self.exit_to_client, &other.exit_to_client);
        t(&mut self.fast_client_to_exit, &other.fast_client_to_exit);
        t(&mut self.fast_exit_to_client, &other.fast_exit_to_client);
        self.offloads += other.offloads;
        self.withdrawals += other.withdrawals;
        self.client_handshakes += other.client_handshakes;
        self.exit_handshakes += other.exit_handshakes;
        self.cookie_replies += other.cookie_replies;
        self.sessions_opened += other.sessions_opened;
        self.sessions_established += other.sessions_established;
        self.sessions_expired_pending += other.sessions_expired_pending;
        self.sessions_expired_idle += other.sessions_expired_idle;
        self.sessions_closed_by_table += other.sessions_closed_by_table;
        self.sessions_closed_by_request += other.sessions_closed_by_request;
        self.table_swaps += other.table_swaps;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
    }
}

/// Counters of one exit in one router, summed across workers at scrape time and labelled
/// there with the exit's name. A session knows the index of its exit's entry, so counting
/// costs an index into the router's array, no lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// The exit counted here; `None` for a vacant entry (its exit left the table and no
    /// session counts here any more), which the next new exit reuses.
    pub key: Option<PublicKey>,
    pub client_to_exit: Traffic,
    pub exit_to_client: Traffic,
    /// Initiations forwarded from clients to this exit.
    pub client_handshakes: u64,
    /// Initiations this exit sent to clients, forwarded.
    pub exit_handshakes: u64,
    /// Sessions held now (pending included).
    pub sessions: u64,
    pub sessions_opened: u64,
    /// Refusals that name this exit (see [`ExitStats::REASONS`]), by reason.
    pub drops: [u64; DropReason::COUNT],
}

impl ExitStats {
    /// The drop reasons counted per exit: those decided once the exit is known.
    pub const REASONS: [DropReason; 8] = [
        DropReason::Mac1Mismatch,
        DropReason::CookieChallenge,
        DropReason::PendingFull,
        DropReason::SessionsFull,
        DropReason::ClientSessionLimit,
        DropReason::UnmatchedResponse,
        DropReason::AmplificationLimit,
        DropReason::SocketUnavailable,
    ];

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }

    /// Adds `other`'s counters into `self` (for summing workers; the key is kept).
    pub fn merge(&mut self, other: &ExitStats) {
        let t = |a: &mut Traffic, b: &Traffic| {
            a.packets += b.packets;
            a.bytes += b.bytes;
        };
        t(&mut self.client_to_exit, &other.client_to_exit);
        t(&mut self.exit_to_client, &other.exit_to_client);
        self.client_handshakes += other.client_handshakes;
        self.exit_handshakes += other.exit_handshakes;
        self.sessions += other.sessions;
        self.sessions_opened += other.sessions_opened;
        for (a, b) in self.drops.iter_mut().zip(other.drops.iter()) {
            *a += b;
        }
    }
}

/// A view of one session for listings; never any payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub slot: SessionSlot,
    pub client: SocketAddr,
    pub listen_port: u16,
    pub exit_key: PublicKey,
    pub exit_endpoint: SocketAddr,
    pub established: bool,
    pub verified: bool,
    /// Totals, both paths (`fast_to_exit` is part of them).
    pub to_exit: Traffic,
    pub to_client: Traffic,
    /// Whether the kernel fast path forwards its transport messages.
    pub offloaded: bool,
    /// What the kernel fast path forwarded of `to_exit`.
    pub fast_to_exit: Traffic,
    /// What the kernel fast path forwarded of `to_client`.
    pub fast_to_client: Traffic,
    pub handshakes: u64,
    pub age: Duration,
    pub idle: Duration,
    /// Time since the latest handshake the relay saw completed (a response forwarded
    /// either way); `None` before the first, and for a session restored after a restart
    /// until its next.
    pub since_handshake: Option<Duration>,
    /// Local port of the session's exit-facing socket: the client's source port as the exit
    /// sees it. Filled in by the I/O layer, which owns the socket.
    pub exit_port: Option<u16>,
    /// Receiver indices the exit assigned that the client may use, oldest first (not
    /// secret: they travel in clear).
    pub exit_indices: Vec<u32>,
}

/// What a session needs to survive a relay restart without a new handshake.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionSnapshot {
    pub client: SocketAddr,
    pub listen_port: u16,
    pub exit_key: PublicKey,
    pub exit_endpoint: SocketAddr,
    /// Local port of the exit-facing socket: the client's endpoint as the exit knows it.
    pub local_port: u16,
    pub established: bool,
    pub verified: bool,
    pub exit_indices: Vec<u32>,
    pub to_exit: Traffic,
    pub to_client: Traffic,
    pub handshakes: u64,
}

/// Receiver indices the client may send to, oldest first, each marked once the client has
/// used it (in a response or a transport message; a cookie reply is no use of an index).
///
/// Only two things add an index here, and a forger on the exit side can do neither: the
/// exit's response to an initiation this client sent (its receiver index must be that
/// initiation's sender index, which travelled only from the client to the exit), and the
/// client's own response to an exit initiation (mac1 for the session's exit, from the
/// client's address). When the ring is full the oldest index the client has not used goes
/// first, so the index the client's transport runs on stays.
#[derive(Debug, Clone, Copy, Default)]
struct IndexRing {
    indices: [u32; EXIT_INDICES],
    used: [bool; EXIT_INDICES],
    len: u8,
}

impl SessionSnapshot {
    /// The snapshot of a listed session whose exit-facing socket has `local_port`.
    pub fn new(info: SessionInfo, local_port: u16) -> Self {
        SessionSnapshot {
            client: info.client,
            listen_port: info.listen_port,
            exit_key: info.exit_key,
            exit_endpoint: info.exit_endpoint,
            local_port,
            established: info.established,
            verified: info.verified,
            exit_indices: info.exit_indices,
            to_exit: info.to_exit,
            to_client: info.to_client,
            handshakes: info.handshakes,
        }
    }
}

impl IndexRing {
    /// Indices oldest first.
    fn to_vec(self) -> Vec<u32> {
        self.indices[..self.len as usize].to_vec()
    }
    fn push(&mut self, index: u32) {
        if self.contains(index) {
            return;
        }
        let len = self.len as usize;
        if len < EXIT_INDICES {
            self.indices[len] = index;
            self.used[len] = false;
            self.len += 1;
            return;
        }
        let victim = self.used.iter().position(|&u| !u).unwrap_or(0);
        self.indices.copy_within(victim + 1.., victim);
        self.used.copy_within(victim + 1.., victim);
        self.indices[EXIT_INDICES - 1] = index;
        self.used[EXIT_INDICES - 1] = false;
    }
    fn contains(&self, index: u32) -> bool {
        self.indices[..self.len as usize].contains(&index)
    }
    /// Marks `index` as used by the client (it must be in the ring).
    fn mark_used(&mut self, index: u32) {
        if let Some(i) = self.indices[..self.len as usize]
            .iter()
            .position(|&x| x == index)
        {
            self.used[i] = true;
        }
    }
}

/// The newest `N` indices of one kind, oldest evicted first.
#[derive(Debug, Clone, Copy)]
struct RecentIndices<const N: usize> {
    indices: [u32; N],
    len: u8,
}

impl<const N: usize> Default for RecentIndices<N> {
    fn default() -> Self {
        RecentIndices {
            indices: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> RecentIndices<N> {
    fn as_slice(&self) -> &[u32] {
        &self.indices[..self.len as usize]
    }
    fn push(&mut self, index: u32) {
        if self.contains(index) {
            return;
        }
        let len = self.len as usize;
        if len == N {
            self.indices.copy_within(1.., 0);
            self.indices[N - 1] = index;
        } else {
            self.indices[len] = index;
            self.len += 1;
        }
    }
    fn contains(&self, index: u32) -> bool {
        self.as_slice().contains(&index)
    }
    /// Forgets `index`; returns whether it was there.
    fn take(&mut self, index: u32) -> bool {
        let len = self.len as usize;
        let Some(pos) = self.as_slice().iter().position(|&i| i == index) else {
            return false;
        };
        self.indices.copy_within(pos + 1..len, pos);
        self.len -= 1;
        true
    }
}

/// What a session knows of the indices its client and exit chose.
///
/// The relay cannot authenticate the exit side, so it sorts what it learns by who could
/// have forged it. `usable` (what the client's transport may name) is fed only by packets
/// a forger who merely spoofs the exit cannot make (see [`IndexRing`]); `offered` holds
/// the indices of the exit's initiations, which anyone can forge, and serves only to route
/// the client's cookie replies to them, so a flood of forged initiations churns `offered`
/// and nothing else.
#[derive(Debug, Clone, Copy, Default)]
struct ExitIndices {
    usable: IndexRing,
    /// Sender indices of the exit's initiations forwarded to the client.
    offered: RecentIndices<OFFERED_INDICES>,
    /// Sender indices of the client's initiations forwarded to the exit and not yet
    /// answered: an exit response naming one of these is the exit's.
    awaiting: RecentIndices<CLIENT_INITIATIONS>,
}

#[derive(Debug)]
struct Session {
    client: SocketAddr,
    listener: Listener,
    exit_key: PublicKey,
    /// Its exit's entry in [`Router::exit_stats`].
    exit_stat: u32,
    exit_endpoint: SocketAddr,
    established: bool,
    /// The client has shown it receives what is sent to its address.
    verified: bool,
    /// While unverified: bytes received from the client not yet matched by bytes sent to it.
    budget: u64,
    indices: ExitIndices,
    created: Instant,
    /// When the current pending handshake started (meaningful while not established).
    pending_since: Instant,
    last_activity: Instant,
    to_exit: Traffic,
    to_client: Traffic,
    handshakes: u64,
    /// When the latest handshake completed (a response forwarded either way).
    last_handshake: Option<Instant>,
    /// An [`Command::Offload`] was emitted and no [`Command::Withdraw`] since.
    offloaded: bool,
    fast_to_exit: Traffic,
    fast_to_client: Traffic,
}

impl Session {
    fn deadline(&self, cfg: &RouterConfig) -> Instant {
        if self.established {
            self.last_activity + cfg.idle_timeout
        } else {
            self.pending_since + cfg.pending_timeout
        }
    }
}

/// The sessions of one client address (at most [`MAX_SESSIONS_PER_CLIENT`]).
#[derive(Debug, Clone, Copy, Default)]
struct ClientSessions {
    slots: [u32; MAX_SESSIONS_PER_CLIENT],
    len: u8,
}

impl ClientSessions {
    fn as_slice(&self) -> &[u32] {
        &self.slots[..self.len as usize]
    }
    fn push(&mut self, index: u32) {
        self.slots[self.len as usize] = index;
        self.len += 1;
    }
    fn remove(&mut self, index: u32) {
        if let Some(pos) = self.as_slice().iter().position(|&s| s == index) {
            self.slots.copy_within(pos + 1..self.len as usize, pos);
            self.len -= 1;
        }
    }
}

/// Why a session ends, for counters.
#[derive(Debug, Clone, Copy)]
enum CloseCause {
    PendingExpired,
    Idle,
    Table,
    Request,
    SocketFailed,
}

/// One worker's DoubleHop state machine.
#[derive(Debug)]
pub struct Router {
    cfg: RouterConfig,
    table: Arc<ExitTable>,
    sessions: Slab<Session>,
    clients: HashMap<SocketAddr, ClientSessions>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    commands: VecDeque<Command>,
    /// Handshake budget of sources that have not proven their address.
    rate_limiter: HandshakeRateLimiter,
    /// The budgets of proven sources, the cookie challenge and the load mark
    /// (see [`Router::under_load`]).
    admission: HandshakeAdmission,
    pending: usize,
    /// Next slot index to examine after a table swap, if a sweep is under way.
    sweep: Option<u32>,
    /// Listeners the I/O layer closed (a port no longer pinned): their sessions go in the
    /// sweep. Ids are never reused, and a node unpins a port rarely, so this stays short.
    closed_listeners: Vec<u16>,
    stats: RouterStats,
    /// Per-exit counters, an entry for each exit this router has counted something for
    /// (not every exit of a table: a 100,000-exit table costs nothing until its exits see
    /// traffic). Entries are never removed, so a session's `exit_stat` always indexes one;
    /// an exit that leaves the table keeps its entry until the sweep has closed its
    /// sessions, and the entry is then vacant for the next exit counted.
    exit_stats: Vec<ExitStats>,
    /// The entry of each exit of the current table, plus one, by
    /// [`crate::table::ExitId`]; 0 until the exit is first counted. Zeroed per table
    /// (a zeroed allocation, so a large table costs no walk).
    exit_stat_of: Vec<u32>,
    /// The entry of each exit counted, by key: what survives a table swap.
    exit_stat_by_key: HashMap<PublicKey, u32>,
    /// Entries whose exit left the table and whose sessions are all closed.
    vacant_exit_stats: Vec<u32>,
}

impl Router {
    pub fn new(cfg: RouterConfig, table: Arc<ExitTable>, now: Instant) -> Self {
        let mut cfg = cfg;
        cfg.max_sessions_per_client = cfg
            .max_sessions_per_client
            .clamp(1, MAX_SESSIONS_PER_CLIENT);
        // last_activity >= pending_since, so with this an established session's deadline
        // (last_activity + idle) is never before its pending one, the one its timer is set for.
        cfg.idle_timeout = cfg.idle_timeout.max(cfg.pending_timeout);
        let rate_limiter = HandshakeRateLimiter::new(
            cfg.handshakes_per_second,
            cfg.handshake_burst,
            cfg.rate_limit_buckets,
            now,
        );
        static ROUTERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let salt = ROUTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let proven = SourceBudget {
            per_second: cfg.handshakes_per_second,
            burst: cfg.handshake_burst,
            buckets: cfg.rate_limit_buckets,
        };
        let admission = HandshakeAdmission::new(cfg.cookie_settings(), salt, proven, now);
        let mut router = Router {
            cfg,
            table,
            sessions: Slab::default(),
            clients: HashMap::new(),
            timers: BinaryHeap::new(),
            commands: VecDeque::new(),
            rate_limiter,
            admission,
            pending: 0,
            sweep: None,
            closed_listeners: Vec::new(),
            stats: RouterStats::default(),
            exit_stats: Vec::new(),
            exit_stat_of: Vec::new(),
            exit_stat_by_key: HashMap::new(),
            vacant_exit_stats: Vec::new(),
        };
        router.exit_stat_of = vec![0; router.table.len()];
        router
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    pub fn table(&self) -> &Arc<ExitTable> {
        &self.table
    }

    pub fn stats(&self) -> &RouterStats {
        &self.stats
    }

    /// Per-exit counters (vacant entries included, with no key).
    pub fn exit_stats(&self) -> &[ExitStats] {
        &self.exit_stats
    }

    /// The entry in `exit_stats` of exit `id` of the current table: its own if it has one
    /// (by key), else a vacant one, else a new one. A lookup only the first time an exit
    /// of this table is counted; an index after that.
    fn exit_stat(&mut self, id: ExitId) -> u32 {
        let mapped = self.exit_stat_of[id.0 as usize];
        if mapped != 0 {
            return mapped - 1;
        }
        let key = self
            .table
            .get(id)
            .expect("an id of the current table")
            .spec
            .public_key;
        let i = match self.exit_stat_by_key.get(&key) {
            Some(&i) => i,
            None => {
                let i = self.vacant_exit_stats.pop().unwrap_or_else(|| {
                    self.exit_stats.push(ExitStats::default());
                    self.exit_stats.len() as u32 - 1
                });
                self.exit_stats[i as usize].key = Some(key);
                self.exit_stat_by_key.insert(key, i);
                i
            }
        };
        self.exit_stat_of[id.0 as usize] = i + 1;
        i
    }

    /// Once a sweep has closed every session of the exits that left the table, their
    /// entries hold no session and become vacant.
    fn vacate_exit_stats(&mut self) {
        for (i, e) in self.exit_stats.iter_mut().enumerate() {
            let Some(key) = e.key else { continue };
            if self.table.by_key(&key).is_none() {
                debug_assert_eq!(e.sessions, 0, "a swept exit holds no session");
                *e = ExitStats::default();
                self.exit_stat_by_key.remove(&key);
                self.vacant_exit_stats.push(i as u32);
            }
        }
    }

    /// Counts a drop that names the exit of entry `stat`.
    fn drop_for_exit(&mut self, stat: u32, reason: DropReason) -> Action {
        self.exit_stats[stat as usize].drops[reason.index()] += 1;
        self.drop_packet(reason)
    }

    /// Sessions held, pending ones included.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Sessions still waiting for the exit's first answer.
    pub fn pending_count(&self) -> usize {
        self.pending
    }

    /// Whether new handshakes must prove their source with our cookie first: the pending
    /// table is at least half full, or was within the last second. Below that mark any
    /// source may open a pending session; above it only proven ones, so a flood from spoofed
    /// sources can fill half the table at most and real clients always find room.
    pub fn under_load(&mut self, now: Instant) -> bool {
        let mark = (self.cfg.max_pending / 2).max(1);
        self.admission.under_load(now, self.pending >= mark)
    }

    /// Whether `client` has a session (pending or established).
    pub fn knows_client(&self, client: SocketAddr) -> bool {
        self.clients.contains_key(&client)
    }

    /// Next command for the I/O layer.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// When [`Router::handle_timeout`] next has a session to expire, if ever. While
    /// [`Router::sweeping`] it has work on every call.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|r| r.0 .0)
    }

    /// Counts a drop decided by the I/O layer (for example a failed send).
    pub fn record_drop(&mut self, reason: DropReason) {
        self.stats.drops[reason.index()] += 1;
    }

    fn drop_packet(&mut self, reason: DropReason) -> Action {
        self.record_drop(reason);
        Action::Drop(reason)
    }

    /// A datagram from a client arrived on `listener` from `from`.
    pub fn handle_client(
        &mut self,
        now: Instant,
        listener: Listener,
        from: SocketAddr,
        packet: &[u8],
    ) -> Action {
        self.handle_client_message(now, listener, from, packet.len(), Message::parse(packet))
    }

    /// [`Router::handle_client`] with the datagram already parsed: `msg`, of `len` bytes.
    pub fn handle_client_message(
        &mut self,
        now: Instant,
        listener: Listener,
        from: SocketAddr,
        len: usize,
        msg: Result<Message<'_>, DropReason>,
    ) -> Action {
        let msg = match msg {
            Ok(m) => m,
            Err(reason) => return self.drop_packet(reason),
        };
        let index = match msg {
            Message::Initiation(init) => return self.client_initiation(now, listener, from, init),
            Message::Response(r) => return self.client_response(now, from, r, len),
            Message::CookieReply(c) => c.receiver_index(),
            Message::Transport(t) => t.receiver_index(),
        };
        let Some(sessions) = self.clients.get(&from) else {
            return self.drop_packet(DropReason::UnknownClient);
        };
        let is_transport = matches!(msg, Message::Transport(_));
        // A transport message names an index the client may use; a cookie reply refuses an
        // exit's initiation or response (a client under load answers the exit's response to
        // its own initiation with one), whose sender index it names.
        let found = sessions.as_slice().iter().copied().find(|&i| {
            self.sessions.at(i).is_some_and(|(_, s)| {
                s.indices.usable.contains(index)
                    || (!is_transport && s.indices.offered.contains(index))
            })
        });
        let Some(slot_index) = found else {
            return self.drop_packet(DropReason::UnknownIndex);
        };
        let (slot, s) = self
            .sessions
            .at_mut(slot_index)
            .expect("slot listed for a client holds a session");
        let mut newly_verified = false;
        if is_transport {
            // The exit sent this index only to this address (an exit-side forger cannot
            // put one in `usable`), so using it proves the client receives here.
            newly_verified = !s.verified;
            s.verified = true;
            s.indices.usable.mark_used(index);
        } else {
            // Anyone who spoofs the exit can offer an index and see it refused: a cookie
            // reply proves nothing and uses nothing.
            self.stats.cookie_replies += 1;
        }
        s.last_activity = now;
        s.to_exit.add(len);
        // `exit_stats` never shrinks, so a session's entry is always there.
        self.exit_stats[s.exit_stat as usize]
            .client_to_exit
            .add(len);
        self.stats.client_to_exit.add(len);
        if newly_verified {
            self.offload(slot);
        }
        Action::ToExit(slot)
    }

    /// Queues a [`Command::Offload`] of `slot` with its usable indices, if the fast path is
    /// on and the session may go there: its client has proven its address (so the program
    /// never sends an unverified address more than userspace would), and it is IPv4 (the
    /// program's only family for now).
    fn offload(&mut self, slot: SessionSlot) {
        if !self.cfg.offload {
            return;
        }
        let Some(s) = self.sessions.get_mut(slot) else {
            return;
        };
        let v4 = s.client.is_ipv4() && s.exit_endpoint.is_ipv4();
        if !s.verified || !v4 || s.indices.usable.len == 0 {
            return;
        }
        s.offloaded = true;
        self.stats.offloads += 1;
        self.commands.push_back(Command::Offload(Offload {
            slot,
            client: s.client,
            listener: s.listener,
            exit: s.exit_endpoint,
            indices: s.indices.usable.indices,
            len: s.indices.usable.len,
        }));
    }

    /// Folds what the kernel fast path forwarded for `slot` since the last call into the
    /// session (its totals, and its last activity, so idle expiry sees traffic the worker
    /// never did) and into the counters. `last_seen` is when the kernel last forwarded one
    /// of its packets. A session already closed (its final counters, read at withdrawal)
    /// counts in the counters only.
    pub fn fast_path_traffic(
        &mut self,
        slot: SessionSlot,
        to_exit: Traffic,
        to_client: Traffic,
        last_seen: Option<Instant>,
    ) {
        let sum = |a: &mut Traffic, b: Traffic| {
            a.packets += b.packets;
            a.bytes += b.bytes;
        };
        sum(&mut self.stats.fast_client_to_exit, to_exit);
        sum(&mut self.stats.fast_exit_to_client, to_client);
        let Some(s) = self.sessions.get_mut(slot) else {
            return;
        };
        sum(&mut s.to_exit, to_exit);
        sum(&mut s.to_client, to_client);
        sum(&mut s.fast_to_exit, to_exit);
        sum(&mut s.fast_to_client, to_client);
        if let Some(seen) = last_seen {
            s.last_activity = s.last_activity.max(seen);
        }
    }

    /// A client's response to an exit's initiation. Its mac1 is keyed by the public key of
    /// the exit it answers, so it names its session as an initiation does, whatever became
    /// of the initiation's index meanwhile (a flood of forged exit initiations may have
    /// pushed it out of `offered`). The index it answers becomes one the client may use.
    fn client_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        r: crate::wire::Response<'_>,
        len: usize,
    ) -> Action {
        let Some(sessions) = self.clients.get(&from) else {
            return self.drop_packet(DropReason::UnknownClient);
        };
        let table = &self.table;
        let found = sessions.as_slice().iter().copied().find(|&i| {
            self.sessions.at(i).is_some_and(|(_, s)| {
                let (input, mac1) = (r.mac1_input(), r.mac1());
                match table.by_key(&s.exit_key).and_then(|id| table.get(id)) {
                    Some(exit) => exit.mac1_key().verify(input, mac1),
                    // Its exit left the table and the sweep has not reached it yet.
                    None => s.exit_key.mac1_key().verify(input, mac1),
                }
            })
        });
        let Some(slot_index) = found else {
            return self.drop_packet(DropReason::Mac1Mismatch);
        };
        let (slot, s) = self
            .sessions
            .at_mut(slot_index)
            .expect("slot listed for a client holds a session");
        let index = r.receiver_index();
        // Answering an initiation the relay delivered only to this address proves receipt,
        // as a transport message does.
        s.verified |= s.indices.offered.contains(index);
        let new_index = !s.indices.usable.contains(index);
        s.indices.usable.push(index);
        s.indices.usable.mark_used(index);
        s.last_activity = now;
        s.last_handshake = Some(now);
        s.to_exit.add(len);
        s.handshakes = s.handshakes.wrapping_add(1);
        if !s.established {
            s.established = true;
            self.pending -= 1;
            self.stats.sessions_established += 1;
        }
        self.exit_stats[s.exit_stat as usize]
            .client_to_exit
            .add(len);
        self.stats.client_to_exit.add(len);
        // A verified session's rekey (the exit initiated it) gives the fast path its new
        // index; the first proof of receipt offloads the session.
        if s.verified && (new_index || !s.offloaded) {
            self.offload(slot);
        }
        Action::ToExit(slot)
    }

    fn client_initiation(
        &mut self,
        now: Instant,
        listener: Listener,
        from: SocketAddr,
        init: Initiation<'_>,
    ) -> Action {
        // Who may start a handshake: any source within its budget while we are not under
        // load; otherwise only a source that has proven its address, within a budget of
        // its own: by a mac2 made with our cookie, or by a session whose client has used
        // an index the exit sent only to it (an established client's rekey is never
        // challenged). Everyone else is challenged with a cookie reply, which costs the
        // client one retry (REKEY_TIMEOUT, 5 s) and a spoofer everything.
        //
        // Each kind of proof has a budget of its own. Someone who spoofs a verified client's
        // exact address spends only the budget of that address's verified sessions; the
        // client is then challenged like anyone else, and its mac2 reaches a budget the
        // spoofer cannot touch.
        let open = !self.under_load(now) && self.rate_limiter.allow(from.ip(), now);
        let verified = !open && self.address_verified(from);
        let admitted = match self.admission.admit(now, from, &init, open, verified) {
            Ok(a) => a != Admission::Challenge,
            Err(reason) => return self.drop_packet(reason),
        };
        let exit = match self.table.pinned(listener.port) {
            Some(id) => {
                let exit = self.table.get(id).expect("pinned id is in its table");
                if !exit.mac1_key().verify(init.mac1_input(), init.mac1()) {
                    let stat = self.exit_stat(id);
                    return self.drop_for_exit(stat, DropReason::Mac1Mismatch);
                }
                id
            }
            None => match self.table.match_mac1(init.mac1_input(), init.mac1()) {
                Some(id) => id,
                None => return self.drop_packet(DropReason::NoExit),
            },
        };
        let spec = &self
            .table
            .get(exit)
            .expect("matched id is in its table")
            .spec;
        let (exit_key, exit_endpoint) = (spec.public_key, spec.endpoint);
        // One entry per exit of the current table, by its id.
        let stat = self.exit_stat(exit);
        let len = init.bytes().len();
        if !admitted {
            let reply = self.admission.cookie_reply(now, from, &exit_key, &init);
            self.commands.push_back(Command::SendCookieReply {
                listener,
                client: from,
                reply,
            });
            return self.drop_for_exit(stat, DropReason::CookieChallenge);
        }

        let existing = self.clients.get(&from).and_then(|c| {
            c.as_slice().iter().copied().find(|&i| {
                self.sessions.at(i).is_some_and(|(_, s)| {
                    s.exit_key == exit_key && s.exit_endpoint == exit_endpoint
                })
            })
        });
        let slot = match existing {
            Some(index) => {
                let (slot, s) = self
                    .sessions
                    .at_mut(index)
                    .expect("listed slot holds a session");
                if !s.established {
                    // A retry: the exit gets another pending_timeout to answer.
                    s.pending_since = now;
                }
                if !s.verified {
                    s.budget += len as u64;
                }
                // The latest initiations count: one sent again (a retransmission, a
                // replay) is the newest, not left to age out at its old place.
                s.indices.awaiting.take(init.sender_index());
                s.indices.awaiting.push(init.sender_index());
                s.last_activity = now;
                s.to_exit.add(len);
                s.handshakes = s.handshakes.wrapping_add(1);
                slot
            }
            None => {
                let per_client = self.clients.get(&from).map_or(0, |c| c.len as usize);
                if per_client >= self.cfg.max_sessions_per_client {
                    return self.drop_for_exit(stat, DropReason::ClientSessionLimit);
                }
                if self.sessions.len() >= self.cfg.max_sessions {
                    return self.drop_for_exit(stat, DropReason::SessionsFull);
                }
                if self.pending >= self.cfg.max_pending {
                    return self.drop_for_exit(stat, DropReason::PendingFull);
                }
                let mut to_exit = Traffic::default();
                to_exit.add(len);
                let mut indices = ExitIndices::default();
                indices.awaiting.push(init.sender_index());
                let session = Session {
                    client: from,
                    listener,
                    exit_key,
                    exit_stat: stat,
                    exit_endpoint,
                    established: false,
                    verified: false,
                    budget: len as u64,
                    indices,
                    created: now,
                    pending_since: now,
                    last_activity: now,
                    to_exit,
                    to_client: Traffic::default(),
                    handshakes: 1,
                    last_handshake: None,
                    offloaded: false,
                    fast_to_exit: Traffic::default(),
                    fast_to_client: Traffic::default(),
                };
                let slot = self.insert(session);
                self.pending += 1;
                self.commands.push_back(Command::OpenExitSocket {
                    slot,
                    exit: exit_endpoint,
                    local_port: None,
                });
                slot
            }
        };
        let e = &mut self.exit_stats[stat as usize];
        e.client_handshakes += 1;
        e.client_to_exit.add(len);
        self.stats.client_handshakes += 1;
        self.stats.client_to_exit.add(len);
        Action::ToExit(slot)
    }

    /// Whether a session of `client` has proven that it receives at this address.
    fn address_verified(&self, client: SocketAddr) -> bool {
        self.clients.get(&client).is_some_and(|c| {
            c.as_slice()
                .iter()
                .any(|&i| self.sessions.at(i).is_some_and(|(_, s)| s.verified))
        })
    }

    fn insert(&mut self, session: Session) -> SessionSlot {
        let deadline = session.deadline(&self.cfg);
        let client = session.client;
        let e = &mut self.exit_stats[session.exit_stat as usize];
        e.sessions += 1;
        e.sessions_opened += 1;
        let slot = self.sessions.insert(session);
        self.clients.entry(client).or_default().push(slot.index);
        self.timers
            .push(Reverse((deadline, slot.index, slot.generation)));
        self.stats.sessions_opened += 1;
        slot
    }

    /// A datagram arrived on the exit-facing socket of `slot`.
    ///
    /// Anyone who spoofs the exit's address and knows the socket's port can send here, so
    /// nothing that arrives teaches the router an index the client may use, except a
    /// response to an initiation this session's client sent, and only the first one.
    pub fn handle_exit(&mut self, now: Instant, slot: SessionSlot, packet: &[u8]) -> Action {
        // Only the router reads its exit sockets, so this is the datagram's one parse.
        let msg = match Message::parse(packet) {
            Ok(m) => m,
            Err(reason) => return self.drop_packet(reason),
        };
        let Some(s) = self.sessions.get_mut(slot) else {
            return self.drop_packet(DropReason::NoSession);
        };
        let stat = s.exit_stat;
        if let Message::Response(r) = msg {
            if !s.indices.awaiting.contains(r.receiver_index()) {
                return self.drop_for_exit(stat, DropReason::UnmatchedResponse);
            }
        }
        let len = packet.len() as u64;
        if !s.verified {
            if s.budget < len {
                return self.drop_for_exit(stat, DropReason::AmplificationLimit);
            }
            s.budget -= len;
        }
        let e = &mut self.exit_stats[stat as usize];
        match msg {
            Message::Initiation(init) => {
                s.indices.offered.push(init.sender_index());
                s.handshakes = s.handshakes.wrapping_add(1);
                e.exit_handshakes += 1;
                self.stats.exit_handshakes += 1;
            }
            Message::Response(r) => {
                s.indices.awaiting.take(r.receiver_index());
                s.indices.usable.push(r.sender_index());
                s.last_handshake = Some(now);
                if !s.established {
                    s.established = true;
                    self.pending -= 1;
                    self.stats.sessions_established += 1;
                }
            }
            Message::CookieReply(_) => self.stats.cookie_replies += 1,
            Message::Transport(_) => {}
        }
        s.last_activity = now;
        s.to_client.add(packet.len());
        e.exit_to_client.add(packet.len());
        self.stats.exit_to_client.add(packet.len());
        let action = Action::ToClient {
            listener: s.listener,
            client: s.client,
        };
        // The answer to a verified client's rekey: its new index goes to the fast path
        // before the response reaches the client, so its first transport is forwarded there.
        let rekeyed = s.verified && matches!(msg, Message::Response(_));
        if rekeyed {
            self.offload(slot);
        }
        action
    }

    /// The I/O layer could not open the socket of `slot`: forget the session.
    pub fn socket_failed(&mut self, slot: SessionSlot) {
        let Some(stat) = self.sessions.get(slot).map(|s| s.exit_stat) else {
            return;
        };
        self.close(slot, CloseCause::SocketFailed);
        self.drop_for_exit(stat, DropReason::SocketUnavailable);
    }

    /// Closes a session on request (operator kill). Returns whether it existed.
    pub fn close_session(&mut self, slot: SessionSlot) -> bool {
        self.close(slot, CloseCause::Request)
    }

    fn close(&mut self, slot: SessionSlot, cause: CloseCause) -> bool {
        let Some(s) = self.sessions.remove(slot) else {
            return false;
        };
        if let Some(c) = self.clients.get_mut(&s.client) {
            c.remove(slot.index);
            if c.len == 0 {
                self.clients.remove(&s.client);
            }
        }
        if !s.established {
            self.pending -= 1;
        }
        self.exit_stats[s.exit_stat as usize].sessions -= 1;
        if s.offloaded {
            self.stats.withdrawals += 1;
            self.commands.push_back(Command::Withdraw { slot });
        }
        match cause {
            CloseCause::PendingExpired => self.stats.sessions_expired_pending += 1,
            CloseCause::Idle => self.stats.sessions_expired_idle += 1,
            CloseCause::Table => self.stats.sessions_closed_by_table += 1,
            CloseCause::Request => self.stats.sessions_closed_by_request += 1,
            CloseCause::SocketFailed => {}
        }
        self.commands.push_back(Command::CloseExitSocket { slot });
        true
    }

    /// Expires sessions whose time has come and continues a swap sweep.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((deadline, index, generation))) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let slot = SessionSlot { index, generation };
            let Some(s) = self.sessions.get(slot) else {
                continue;
            };
            let actual = s.deadline(&self.cfg);
            if actual > now {
                self.timers.push(Reverse((actual, index, generation)));
                continue;
            }
            let cause = if s.established {
                CloseCause::Idle
            } else {
                CloseCause::PendingExpired
            };
            self.close(slot, cause);
        }
        self.continue_sweep();
    }

    /// Makes `table` the one new handshakes are routed by. Sessions whose exit is still in
    /// it (same key, same endpoint) carry on; the others are closed by a sweep spread over
    /// the next [`Router::handle_timeout`] calls, so a swap never stalls the worker.
    pub fn set_table(&mut self, table: Arc<ExitTable>) {
        if Arc::ptr_eq(&table, &self.table) {
            return;
        }
        self.table = table;
        self.exit_stat_of = vec![0; self.table.len()];
        self.stats.table_swaps += 1;
        self.sweep = Some(0);
    }

    fn continue_sweep(&mut self) {
        let Some(mut index) = self.sweep else { return };
        let bound = self.sessions.index_bound();
        let mut budget = self.cfg.swap_sweep_budget.max(1);
        while index < bound && budget > 0 {
            budget -= 1;
            if let Some((slot, s)) = self.sessions.at(index) {
                let keep = self
                    .table
                    .by_key(&s.exit_key)
                    .and_then(|id| self.table.get(id))
                    .is_some_and(|e| e.spec.endpoint == s.exit_endpoint)
                    && !self.closed_listeners.contains(&s.listener.id);
                if !keep {
                    self.close(slot, CloseCause::Table);
                    budget = budget.saturating_sub(SWEEP_CLOSE_COST - 1);
                }
            }
            index += 1;
        }
        self.sweep = (index < bound).then_some(index);
        if self.sweep.is_none() {
            self.vacate_exit_stats();
        }
    }

    /// The I/O layer closed `listener` (its port is no longer pinned to an exit): the
    /// sessions of clients that came through it can never hear from their exit again, so
    /// a sweep closes them, spread over calls like a table swap's.
    pub fn listener_closed(&mut self, listener: Listener) {
        if !self.closed_listeners.contains(&listener.id) {
            self.closed_listeners.push(listener.id);
        }
        self.sweep = Some(0);
    }

    /// Whether a swap sweep is still under way.
    pub fn sweeping(&self) -> bool {
        self.sweep.is_some()
    }

    /// Re-creates a session saved before a restart. Its exit must still be in the table
    /// with the same endpoint; the session gets a socket bound to its old local port, so
    /// the exit sees the same endpoint and no new handshake is needed.
    pub fn restore(
        &mut self,
        now: Instant,
        listener: Listener,
        snap: &SessionSnapshot,
    ) -> Result<SessionSlot, DropReason> {
        let kept = self.table.by_key(&snap.exit_key).filter(|&id| {
            self.table
                .get(id)
                .is_some_and(|e| e.spec.endpoint == snap.exit_endpoint)
        });
        let Some(exit) = kept else {
            self.record_drop(DropReason::NoExit);
            return Err(DropReason::NoExit);
        };
        let stat = self.exit_stat(exit);
        let per_client = self.clients.get(&snap.client).map_or(0, |c| c.len as usize);
        let refusal = if per_client >= self.cfg.max_sessions_per_client {
            Some(DropReason::ClientSessionLimit)
        } else if self.sessions.len() >= self.cfg.max_sessions {
            Some(DropReason::SessionsFull)
        } else if !snap.established && self.pending >= self.cfg.max_pending {
            Some(DropReason::PendingFull)
        } else {
            None
        };
        if let Some(reason) = refusal {
            self.drop_for_exit(stat, reason);
            return Err(reason);
        }
        // Indices saved were usable ones; handshakes in flight are not saved (a client
        // whose response was lost in the restart retries within REKEY_TIMEOUT).
        let mut indices = ExitIndices::default();
        for &i in &snap.exit_indices {
            indices.usable.push(i);
        }
        let session = Session {
            client: snap.client,
            listener,
            exit_key: snap.exit_key,
            exit_stat: stat,
            exit_endpoint: snap.exit_endpoint,
            established: snap.established,
            verified: snap.verified,
            budget: 0,
            indices,
            created: now,
            pending_since: now,
            last_activity: now,
            to_exit: snap.to_exit,
            to_client: snap.to_client,
            handshakes: snap.handshakes,
            last_handshake: None,
            offloaded: false,
            fast_to_exit: Traffic::default(),
            fast_to_client: Traffic::default(),
        };
        let slot = self.insert(session);
        if !snap.established {
            self.pending += 1;
        }
        self.commands.push_back(Command::OpenExitSocket {
            slot,
            exit: snap.exit_endpoint,
            local_port: Some(snap.local_port),
        });
        // Its client proved its address before the restart, from the same address.
        self.offload(slot);
        Ok(slot)
    }

    /// Every live session, for listings. Not for the packet path.
    pub fn sessions(&self, now: Instant) -> impl Iterator<Item = SessionInfo> + '_ {
        self.sessions.iter().map(move |(slot, s)| SessionInfo {
            slot,
            client: s.client,
            listen_port: s.listener.port,
            exit_key: s.exit_key,
            exit_endpoint: s.exit_endpoint,
            established: s.established,
            verified: s.verified,
            to_exit: s.to_exit,
            to_client: s.to_client,
            offloaded: s.offloaded,
            fast_to_exit: s.fast_to_exit,
            fast_to_client: s.fast_to_client,
            handshakes: s.handshakes,
            age: now.saturating_duration_since(s.created),
            idle: now.saturating_duration_since(s.last_activity),
            since_handshake: s.last_handshake.map(|t| now.saturating_duration_since(t)),
            exit_port: None,
            exit_indices: s.indices.usable.to_vec(),
        })
    }
}

mod role;

#[cfg(test)]
mod tests;
