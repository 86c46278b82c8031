//! The DoubleHop router driven by an arbitrary sequence of events, checked after every
//! event against a reference model that knows only what DESIGN §3 promises.
//!
//! Events: initiations (valid mac1 for a configured exit, for no exit, or random bytes;
//! sometimes with the mac2 of the last cookie the relay gave that client)
//! from any of a set of client addresses on any listener; responses, cookie replies and
//! transport from clients with indices they saw or guessed; anything from any session's
//! exit-facing socket (stale slots and made-up slots too); time steps; table swaps (exits
//! added, removed, moved to another endpoint, pinned and unpinned); operator kills;
//! exit-facing sockets that fail to open; and restarts through the session snapshot.
//!
//! Properties, checked after each event:
//! - a packet from client address `C` leaves only through a session of `C`'s; a packet
//!   from a session's socket goes only to that session's client, on its listener
//!   (sessions never move, so no packet goes to an address that was never a session's
//!   client);
//! - an address that has never used an index the exit sent to it (in a transport, or in a
//!   response to an exit initiation delivered to it) gets no more bytes than it sent;
//! - non-initiations reach an exit only with an index that exit sent through that session;
//!   a client's response only with the mac1 of that session's exit;
//! - the exit side is the attacker's too (anyone who spoofs the exit's address and knows the
//!   socket's port): an exit-side packet changes the indices a session's client may use
//!   only when it is the first response to an initiation that client sent through it, and
//!   then only by adding the response's sender index; any other exit response is refused
//!   as `unmatched_response`; a client's cookie reply uses no index and proves nothing;
//!   a client transport naming an index the session lists as usable is always forwarded;
//! - a new session's socket connects to the endpoint the current table gives its exit;
//! - sessions, pending sessions and sessions per client stay within their bounds, and the
//!   router's list of sessions is the model's;
//! - a session closes only when its deadline has passed, its exit left the table, the
//!   operator killed it or its socket failed, never to make room; and once a deadline has
//!   passed, the next `handle_timeout` closes it (`poll_timeout` is never later than the
//!   earliest deadline);
//! - when a swap's sweep is over, every session's exit is in the table;
//! - the relay's own cookie replies answer only the initiation just received, from its
//!   source, for a configured exit, and never give an unverified address more bytes than
//!   it sent; a source that does not answer them opens a pending session only below the
//!   load mark (half of `max_pending`);
//! - initiations that got past the rate limiter from one source (IPv4 address or IPv6
//!   /64) never exceed its token bucket over any window;
//! - refusals are justified (no `SessionsFull` below the bound, and so on), and every
//!   drop is counted exactly once under the reason returned; byte counters add up;
//! - the kernel fast path (the router runs with `offload` on): a session is offloaded only
//!   once its client's address is verified, only for IPv4, with its own client, listener
//!   and exit, and only with indices the exit sent through that session; every offloaded
//!   session is withdrawn before its socket closes, and withdrawn only if offloaded.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wraithgate_relay::cookie::initiator_mac2;
use wraithgate_relay::keys::Mac1Key;
use wraithgate_relay::router::{
    Action, Command, Listener, Router, RouterConfig, RouterStats, SessionSlot, SessionSnapshot,
    MAX_SESSIONS_PER_CLIENT,
};
use wraithgate_relay::table::{ExitSpec, ExitTable};
use wraithgate_relay::wire::{self, Message};
use wraithgate_relay::{DropReason, PublicKey};

use crate::Input;

/// Exits the tables are made of.
const EXITS: usize = 4;
/// The main listener's port; listener `1 + k` is the port exit `k` may be pinned to.
const MAIN_PORT: u16 = 51820;
const LISTENERS: u8 = 1 + EXITS as u8;
/// Most events one input runs.
const MAX_EVENTS: usize = 4_096;

/// Client addresses: two sharing an IP, two sharing an IPv6 /64, an IPv4-mapped IPv6
/// address equal to an IPv4 one, and an exit's own address.
const CLIENTS: [&str; 9] = [
    "198.51.100.1:40000",
    "198.51.100.1:40001",
    "198.51.100.2:40000",
    "203.0.113.7:51820",
    "[2001:db8:1:2::1]:40000",
    "[2001:db8:1:2::ffff]:40000",
    "[2001:db8:9::1]:40000",
    "[::ffff:198.51.100.2]:40000",
    "192.0.2.1:51820",
];

fn client(n: u8) -> SocketAddr {
    CLIENTS[usize::from(n) % CLIENTS.len()]
        .parse()
        .expect("literal address")
}

fn exit_key(k: usize) -> PublicKey {
    PublicKey([0x10 + k as u8; 32])
}

/// Keys that are no exit's: a client's own, and one unknown.
fn stranger_key(n: u8) -> PublicKey {
    PublicKey([0xE0 + n; 32])
}

fn exit_endpoint(k: usize, variant: bool) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, 1 + k as u8], 51820 + u16::from(variant)))
}

fn listener(id: u8) -> Listener {
    let id = id % LISTENERS;
    Listener {
        id: u16::from(id),
        port: MAIN_PORT + u16::from(id),
    }
}

/// A table from three bits per exit: present, second endpoint, pinned to its port.
fn table(mask: u16, generation: u64) -> ExitTable {
    let specs = (0..EXITS)
        .filter(|k| mask >> (3 * k) & 1 == 1)
        .map(|k| ExitSpec {
            name: format!("exit-{k}"),
            public_key: exit_key(k),
            endpoint: exit_endpoint(k, mask >> (3 * k + 1) & 1 == 1),
            listen_port: (mask >> (3 * k + 2) & 1 == 1).then_some(MAIN_PORT + 1 + k as u16),
        })
        .collect();
    ExitTable::new(generation, specs).expect("distinct keys, ports and names")
}

/// `key.mac1_key()`, derived once per key and thread: deriving it is a hash, and the
/// model checks every initiation against every exit.
fn mac1_key(key: &PublicKey) -> Mac1Key {
    thread_local! {
        static KEYS: std::cell::RefCell<HashMap<PublicKey, Mac1Key>> = Default::default();
    }
    KEYS.with(|k| {
        k.borrow_mut()
            .entry(*key)
            .or_insert_with(|| key.mac1_key())
            .clone()
    })
}

/// An initiation to `to` with a valid mac1 and `filler` where its encrypted fields go:
/// what anyone who knows the public key can send.
pub(crate) fn initiation(to: PublicKey, sender: u32, filler: u8) -> Vec<u8> {
    let mut m = vec![filler; wire::INITIATION_LEN];
    m[..4].copy_from_slice(&[wire::INITIATION_TYPE, 0, 0, 0]);
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    let mac = mac1_key(&to).compute(&m[..wire::INITIATION_MAC1_OFFSET]);
    m[116..132].copy_from_slice(&mac);
    m[132..148].fill(0);
    m
}

fn response(sender: u32, receiver: u32) -> Vec<u8> {
    let mut m = vec![0x33; wire::RESPONSE_LEN];
    m[..4].copy_from_slice(&[wire::RESPONSE_TYPE, 0, 0, 0]);
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    m[8..12].copy_from_slice(&receiver.to_le_bytes());
    m
}

fn cookie(receiver: u32) -> Vec<u8> {
    let mut m = vec![0x44; wire::COOKIE_REPLY_LEN];
    m[..4].copy_from_slice(&[wire::COOKIE_REPLY_TYPE, 0, 0, 0]);
    m[4..8].copy_from_slice(&receiver.to_le_bytes());
    m
}

fn transport(receiver: u32, len: usize) -> Vec<u8> {
    let mut m = vec![0x77; len.max(wire::TRANSPORT_MIN_LEN)];
    m[..4].copy_from_slice(&[wire::TRANSPORT_TYPE, 0, 0, 0]);
    m[4..8].copy_from_slice(&receiver.to_le_bytes());
    m
}

/// The rate limiter's key: an IPv4 address (IPv4-mapped included) or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RateKey {
    V4([u8; 4]),
    V6([u8; 8]),
}

fn rate_key(ip: IpAddr) -> RateKey {
    match ip {
        IpAddr::V4(a) => RateKey::V4(a.octets()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => RateKey::V4(v4.octets()),
            None => {
                let mut k = [0u8; 8];
                k.copy_from_slice(&a.octets()[..8]);
                RateKey::V6(k)
            }
        },
    }
}

/// What the model knows of one open session.
#[derive(Debug, Clone)]
struct SessionModel {
    client: SocketAddr,
    listener: Listener,
    exit_key: PublicKey,
    exit_endpoint: SocketAddr,
    established: bool,
    last_forward: Instant,
    pending_since: Instant,
    /// Every index the exit sent through this session in a response to the client's
    /// initiation, or that the client answered with a response (the router keeps 8).
    exit_indices: HashSet<u32>,
    /// Sender indices of exit initiations delivered through this session.
    offered: HashSet<u32>,
    /// Sender indices of the client's initiations forwarded through this session and not
    /// yet answered, newest last; the router keeps the newest four.
    awaiting: Vec<u32>,
    /// The indices the router last offloaded to the kernel fast path, until withdrawn.
    offloaded: Option<Vec<u32>>,
}

impl SessionModel {
    fn deadline(&self, cfg: &RouterConfig) -> Instant {
        if self.established {
            self.last_forward + cfg.idle_timeout
        } else {
            self.pending_since + cfg.pending_timeout
        }
    }
}

/// One address's account with the relay.
#[derive(Debug, Default)]
struct Ledger {
    bytes_in: u64,
    bytes_out: u64,
    /// Indices sent to this address by exits.
    received: HashSet<u32>,
    /// Sent a packet carrying one of `received`: it sees what is sent to it.
    verified: bool,
}

/// Why sessions may close during the call being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// A packet is being handled: nothing closes.
    Never,
    /// `handle_timeout`: deadlines and table sweeps.
    Timeout,
    /// The operator killed this session, or its socket failed to open.
    Only(SessionSlot),
}

struct Harness {
    cfg: RouterConfig,
    router: Router,
    now: Instant,
    /// The router's creation, where its rate limiter starts.
    born: Instant,
    table: Arc<ExitTable>,
    generation: u64,
    open: HashMap<SessionSlot, SessionModel>,
    /// Every slot ever opened, closed ones too, to aim exit packets at.
    slots: Vec<SessionSlot>,
    ledgers: HashMap<SocketAddr, Ledger>,
    ever_client: HashSet<SocketAddr>,
    /// Indices seen on the wire, for clients to use (or misuse).
    indices: Vec<u32>,
    /// When initiations got past the rate limiter, by rate key.
    handshakes: HashMap<RateKey, Vec<Instant>>,
    /// The same for every initiation, mac2 or not (two budgets: unproven and proven).
    handshakes_any: HashMap<RateKey, Vec<Instant>>,
    /// The last cookie reply each client got for each exit, with the initiation it answered.
    held_cookies: HashMap<(SocketAddr, PublicKey), ([u8; wire::COOKIE_REPLY_LEN], Vec<u8>)>,
    /// The packet being handled by `client`, and whether it carries a mac2 of our cookie.
    in_flight: (Vec<u8>, bool),
    drops: [u64; DropReason::COUNT],
    to_exit_bytes: u64,
    /// The relay's own cookie replies.
    cookie_replies: u64,
    to_client_bytes: u64,
    /// Counters of the routers before the last restart.
    past: RouterStats,
}

/// Runs one input; panics if the router breaks a property.
pub fn check(data: &[u8]) {
    run(data);
}

/// Runs one input and returns the router's counters, summed over restarts (for tests that
/// make sure a corpus reaches the states that matter).
pub fn run(data: &[u8]) -> RouterStats {
    let mut input = Input::new(data);
    let mut h = Harness::new(&mut input);
    for _ in 0..MAX_EVENTS {
        if input.is_empty() {
            break;
        }
        h.event(&mut input);
        h.check_state();
    }
    h.past.merge(h.router.stats());
    h.past
}

impl Harness {
    fn new(input: &mut Input<'_>) -> Self {
        let mut cfg = RouterConfig {
            max_sessions: 1 + usize::from(input.u8() % 8),
            max_pending: 1 + usize::from(input.u8() % 8),
            // 0 and 5 test the router's clamping to 1..=4.
            max_sessions_per_client: usize::from(input.u8() % 6),
            pending_timeout: Duration::from_secs(1 + u64::from(input.u8() % 10)),
            idle_timeout: Duration::from_secs(1 + u64::from(input.u8() % 60)),
            handshakes_per_second: 1 + u32::from(input.u8() % 50),
            handshake_burst: 1 + u32::from(input.u8() % 8),
            rate_limit_buckets: 1 << (input.u8() % 14),
            swap_sweep_budget: 1 + usize::from(input.u8() % 4),
            // From the other limits, so that older corpus inputs keep their meaning.
            cookie_replies_per_second: 0,
            cookie_seed: [0x5c; 32],
            offload: true,
        };
        cfg.cookie_replies_per_second = cfg.handshakes_per_second * 3;
        let table = Arc::new(table(input.u16(), 1));
        let now = Instant::now();
        let router = Router::new(cfg, table.clone(), now);
        // The limits as the router applies them (it clamps some).
        let cfg = router.config().clone();
        assert!((1..=MAX_SESSIONS_PER_CLIENT).contains(&cfg.max_sessions_per_client));
        Harness {
            router,
            cfg,
            now,
            born: now,
            table,
            generation: 1,
            open: HashMap::new(),
            slots: Vec::new(),
            ledgers: HashMap::new(),
            ever_client: HashSet::new(),
            indices: Vec::new(),
            handshakes: HashMap::new(),
            handshakes_any: HashMap::new(),
            held_cookies: HashMap::new(),
            in_flight: (Vec::new(), false),
            drops: [0; DropReason::COUNT],
            to_exit_bytes: 0,
            cookie_replies: 0,
            to_client_bytes: 0,
            past: RouterStats::default(),
        }
    }

    fn event(&mut self, input: &mut Input<'_>) {
        match input.u8() % 12 {
            0 => {
                let from = client(input.u8());
                let l = listener(input.u8());
                let k = input.u8() % (EXITS as u8 + 2);
                let key = if usize::from(k) < EXITS {
                    exit_key(usize::from(k))
                } else {
                    stranger_key(k)
                };
                let sender = input.u32();
                let flags = input.u8();
                self.learn(sender);
                let mut p = initiation(key, sender, flags);
                // Sometimes the client answers a challenge, as WireGuard clients do.
                let mut carries_mac2 = false;
                if flags & 0x18 == 0x18 {
                    if let Some((reply, sent)) = self.held_cookies.get(&(from, key)) {
                        let retry = p.clone();
                        let (Ok(Message::Initiation(s)), Ok(Message::Initiation(r))) =
                            (Message::parse(sent), Message::parse(&retry))
                        else {
                            unreachable!("made as initiations")
                        };
                        let mac2 = initiator_mac2(&key, reply, &s, &r)
                            .expect("the relay's cookie replies decrypt");
                        p[wire::INITIATION_MAC2_OFFSET..].copy_from_slice(&mac2);
                        carries_mac2 = true;
                    }
                }
                self.in_flight = (p.clone(), carries_mac2);
                self.client(l, from, &p, flags & 7 == 7);
                self.in_flight = (Vec::new(), false);
            }
            1 => {
                let from = client(input.u8());
                let l = listener(input.u8());
                let kind = input.u8();
                let index = self.pick_index(input);
                let p = match kind % 3 {
                    0 => transport(index, 32 + usize::from(input.u16() % 1500)),
                    1 => {
                        let sender = input.u32();
                        self.learn(sender);
                        let mut p = response(sender, index);
                        // Mostly a real client's, with the mac1 of one of the exits.
                        let k = (sender >> 29) as usize;
                        if k < EXITS {
                            let mac =
                                mac1_key(&exit_key(k)).compute(&p[..wire::RESPONSE_MAC1_OFFSET]);
                            p[wire::RESPONSE_MAC1_OFFSET..wire::RESPONSE_MAC1_OFFSET + 16]
                                .copy_from_slice(&mac);
                        }
                        p
                    }
                    _ => cookie(index),
                };
                self.client(l, from, &p, false);
            }
            2 => {
                let from = client(input.u8());
                let l = listener(input.u8());
                let n = usize::from(input.u8());
                let p = input.bytes(n).to_vec();
                self.client(l, from, &p, false);
            }
            3 => {
                let slot = self.pick_slot(input);
                let sender = input.u32();
                let receiver = self.pick_index(input);
                self.learn(sender);
                self.exit(slot, &response(sender, receiver));
            }
            4 => {
                let slot = self.pick_slot(input);
                let sender = input.u32();
                let filler = input.u8();
                self.learn(sender);
                self.exit(slot, &initiation(stranger_key(0), sender, filler));
            }
            5 => {
                let slot = self.pick_slot(input);
                let receiver = self.pick_index(input);
                self.exit(slot, &cookie(receiver));
            }
            6 => {
                let slot = self.pick_slot(input);
                let len = 32 + usize::from(input.u16() % 1500);
                self.exit(slot, &transport(0x0102_0304, len));
            }
            7 => {
                let slot = self.pick_slot(input);
                let n = usize::from(input.u8());
                let p = input.bytes(n).to_vec();
                self.exit(slot, &p);
            }
            8 => {
                let ms = u64::from(input.u16());
                let step = if input.u8() & 1 == 1 {
                    Duration::from_secs(ms)
                } else {
                    Duration::from_millis(ms)
                };
                self.now += step;
                self.timeout();
            }
            9 => {
                self.generation += 1;
                let t = Arc::new(table(input.u16(), self.generation));
                self.router.set_table(t.clone());
                self.table = t;
                assert!(
                    self.router.poll_command().is_none(),
                    "a swap closes nothing at once"
                );
                for _ in 0..input.u8() % 4 {
                    self.timeout();
                }
            }
            10 => {
                let slot = self.pick_slot(input);
                let existed = self.router.close_session(slot);
                assert_eq!(existed, self.open.contains_key(&slot), "kill of {slot:?}");
                self.commands(Closing::Only(slot), None);
                assert!(!self.open.contains_key(&slot));
            }
            _ => self.restart(),
        }
    }

    fn learn(&mut self, index: u32) {
        if !self.indices.contains(&index) {
            if self.indices.len() == 32 {
                self.indices.remove(0);
            }
            self.indices.push(index);
        }
    }

    /// An index seen on the wire, or (for selectors from 192 on) any index at all.
    fn pick_index(&mut self, input: &mut Input<'_>) -> u32 {
        let sel = input.u8();
        if sel < 192 && !self.indices.is_empty() {
            self.indices[usize::from(sel) % self.indices.len()]
        } else {
            input.u32()
        }
    }

    /// A slot that was opened (maybe closed since), or a made-up one.
    fn pick_slot(&mut self, input: &mut Input<'_>) -> SessionSlot {
        let sel = input.u8();
        if sel == 255 || self.slots.is_empty() {
            SessionSlot {
                index: u32::from(input.u8()),
                generation: u32::from(input.u8()),
            }
        } else {
            self.slots[usize::from(sel) % self.slots.len()]
        }
    }

    fn drop_counted(&mut self, reason: DropReason) {
        self.drops[reason.index()] += 1;
    }

    /// Drains the router's commands: opens (for `opening`, the initiation just handled,
    /// when given) and closes allowed by `closing`.
    fn commands(&mut self, closing: Closing, opening: Option<(Listener, SocketAddr, PublicKey)>) {
        while let Some(cmd) = self.router.poll_command() {
            match cmd {
                Command::OpenExitSocket {
                    slot,
                    exit,
                    local_port,
                } => {
                    let (l, from, key) =
                        opening.expect("a socket opens only for a new client initiation");
                    assert_eq!(local_port, None, "only restored sessions pick a port");
                    assert!(!self.open.contains_key(&slot), "{slot:?} opened twice");
                    let id = self
                        .table
                        .by_key(&key)
                        .expect("opened for a configured exit");
                    let spec = &self.table.get(id).expect("id of this table").spec;
                    assert_eq!(exit, spec.endpoint, "socket to the wrong endpoint");
                    self.open.insert(
                        slot,
                        SessionModel {
                            client: from,
                            listener: l,
                            exit_key: key,
                            exit_endpoint: exit,
                            established: false,
                            last_forward: self.now,
                            pending_since: self.now,
                            exit_indices: HashSet::new(),
                            offered: HashSet::new(),
                            awaiting: Vec::new(),
                            offloaded: None,
                        },
                    );
                    self.slots.push(slot);
                    self.ever_client.insert(from);
                }
                Command::SendCookieReply {
                    listener,
                    client,
                    reply,
                } => {
                    // Only ever an answer to the initiation just handled, for an exit that
                    // is configured, to its source, and smaller than what it received.
                    let (l, from, key) =
                        opening.expect("a cookie reply answers only a client initiation");
                    assert_eq!((listener, client), (l, from), "cookie reply misdirected");
                    assert!(matches!(
                        Message::parse(&reply),
                        Ok(Message::CookieReply(_))
                    ));
                    let ledger = self.ledgers.entry(client).or_default();
                    ledger.bytes_out += reply.len() as u64;
                    assert!(
                        ledger.verified || ledger.bytes_out <= ledger.bytes_in,
                        "cookie replies amplify towards {client}"
                    );
                    self.cookie_replies += 1;
                    let sent = self.in_flight.0.clone();
                    self.held_cookies.insert((from, key), (reply, sent));
                }
                Command::Offload(o) => {
                    let s = self
                        .open
                        .get_mut(&o.slot)
                        .unwrap_or_else(|| panic!("offloaded {:?}, which is not open", o.slot));
                    assert_eq!(
                        (o.client, o.listener, o.exit),
                        (s.client, s.listener, s.exit_endpoint),
                        "offloaded with another session's endpoints"
                    );
                    assert!(o.client.is_ipv4() && o.exit.is_ipv4(), "offloaded IPv6");
                    assert!(!o.indices().is_empty(), "offloaded without an index");
                    // Checked against the model once the event is over (`check_state`):
                    // verification and the indices learnt are recorded after the drain.
                    s.offloaded = Some(o.indices().to_vec());
                }
                Command::Withdraw { slot } => {
                    let s = self
                        .open
                        .get_mut(&slot)
                        .unwrap_or_else(|| panic!("withdrew {slot:?}, which is not open"));
                    assert!(
                        s.offloaded.take().is_some(),
                        "withdrew {slot:?}, never offloaded"
                    );
                }
                Command::CloseExitSocket { slot } => {
                    let s = self
                        .open
                        .remove(&slot)
                        .unwrap_or_else(|| panic!("closed {slot:?}, which is not open"));
                    assert!(
                        s.offloaded.is_none(),
                        "{slot:?} closed while the fast path still forwards it"
                    );
                    let allowed = match closing {
                        Closing::Never => false,
                        Closing::Only(which) => which == slot,
                        Closing::Timeout => s.deadline(&self.cfg) <= self.now || !self.in_table(&s),
                    };
                    assert!(
                        allowed,
                        "{slot:?} closed for no reason ({closing:?}) at +{:?}: {s:?}",
                        self.now - self.born
                    );
                }
            }
        }
    }

    fn in_table(&self, s: &SessionModel) -> bool {
        self.table
            .by_key(&s.exit_key)
            .and_then(|id| self.table.get(id))
            .is_some_and(|e| e.spec.endpoint == s.exit_endpoint)
    }

    /// The exit an initiation on `l` is for, by the model's own reading of §3.1.
    fn exit_for(&self, l: Listener, init: &wire::Initiation<'_>) -> Result<PublicKey, DropReason> {
        let matches =
            |spec: &ExitSpec| mac1_key(&spec.public_key).verify(init.mac1_input(), init.mac1());
        if let Some(pinned) = self.table.specs().find(|s| s.listen_port == Some(l.port)) {
            return if matches(pinned) {
                Ok(pinned.public_key)
            } else {
                Err(DropReason::Mac1Mismatch)
            };
        }
        self.table
            .specs()
            .find(|s| matches(s))
            .map(|s| s.public_key)
            .ok_or(DropReason::NoExit)
    }

    fn sessions_of(&self, c: SocketAddr) -> impl Iterator<Item = &SessionModel> + '_ {
        self.open.values().filter(move |s| s.client == c)
    }

    fn client(&mut self, l: Listener, from: SocketAddr, p: &[u8], fail_open: bool) {
        let before = self.open.len();
        let pending_before = self.open.values().filter(|s| !s.established).count();
        let per_client_before = self.sessions_of(from).count();
        let replies_before = self.cookie_replies;
        // The router knows an address as verified only while a session of it is open, so
        // this is a superset of what it knows.
        let address_verified = self.ledgers.get(&from).is_some_and(|l| l.verified);
        let usable_before = self.usable();
        let action = self.router.handle_client(self.now, l, from, p);
        self.ledgers.entry(from).or_default().bytes_in += p.len() as u64;
        let msg = Message::parse(p);
        let opening = match msg {
            Ok(Message::Initiation(i)) => self.exit_for(l, &i).ok().map(|k| (l, from, k)),
            _ => None,
        };
        self.commands(Closing::Never, opening);
        let mut failed = None;
        if fail_open && self.open.len() > before {
            let slot = *self.slots.last().expect("just opened");
            self.router.socket_failed(slot);
            self.drop_counted(DropReason::SocketUnavailable);
            self.commands(Closing::Only(slot), None);
            failed = Some(slot);
        }
        let msg = match msg {
            Ok(m) => m,
            Err(reason) => {
                assert_eq!(action, Action::Drop(reason), "malformed packet not refused");
                self.drop_counted(reason);
                return;
            }
        };
        if let Message::Initiation(_) = msg {
            // Initiations certainly past the rate limiter (others may have spent a token
            // too, so this undercounts, which only weakens the check).
            if matches!(
                action,
                Action::ToExit(_)
                    | Action::Drop(
                        DropReason::SessionsFull
                            | DropReason::PendingFull
                            | DropReason::ClientSessionLimit
                    )
            ) {
                self.rate_limited_handshake(from.ip(), self.in_flight.1 || address_verified);
            }
        }
        // A source that has proven nothing (no mac2, no index used) opens a new pending
        // session only below the load mark, half of max_pending.
        if self.open.len() > before && failed.is_none() && !self.in_flight.1 && !address_verified {
            assert!(
                pending_before < (self.cfg.max_pending / 2).max(1),
                "an unproven source opened a session with {pending_before} pending"
            );
        }
        match action {
            Action::ToClient { .. } => panic!("a client packet was reflected: {action:?}"),
            Action::ToExit(slot) if Some(slot) == failed => {
                // The I/O layer finds no socket for it and counts it; the router has
                // already counted it as forwarded, as it does for any failed send.
                self.router.record_drop(DropReason::NoSession);
                self.drop_counted(DropReason::NoSession);
                self.to_exit_bytes += p.len() as u64;
            }
            Action::ToExit(slot) => {
                let now = self.now;
                let wanted = match msg {
                    Message::Initiation(i) => Some(self.exit_for(l, &i)),
                    _ => None,
                };
                let s = self
                    .open
                    .get_mut(&slot)
                    .unwrap_or_else(|| panic!("sent through {slot:?}, which is not open"));
                assert_eq!(s.client, from, "{from} used the session of {}", s.client);
                let mut proves_receipt = false;
                match msg {
                    Message::Initiation(i) => {
                        assert_eq!(
                            Some(Ok(s.exit_key)),
                            wanted,
                            "initiation sent to another exit"
                        );
                        if !s.established {
                            s.pending_since = now;
                        }
                        s.awaiting.retain(|&x| x != i.sender_index());
                        s.awaiting.push(i.sender_index());
                        if s.awaiting.len() > 4 {
                            s.awaiting.remove(0);
                        }
                    }
                    Message::Response(r) => {
                        assert!(
                            mac1_key(&s.exit_key).verify(r.mac1_input(), r.mac1()),
                            "a client response without its exit's mac1 reached it"
                        );
                        s.established = true;
                        proves_receipt = s.offered.contains(&r.receiver_index());
                        s.exit_indices.insert(r.receiver_index());
                    }
                    Message::CookieReply(c) => {
                        let i = c.receiver_index();
                        assert!(
                            s.offered.contains(&i) || s.exit_indices.contains(&i),
                            "a cookie reply for a message the exit never sent"
                        )
                    }
                    Message::Transport(t) => {
                        assert!(s.exit_indices.contains(&t.receiver_index()));
                        proves_receipt = true;
                    }
                }
                s.last_forward = now;
                if proves_receipt {
                    self.ledgers.entry(from).or_default().verified = true;
                }
                self.to_exit_bytes += p.len() as u64;
            }
            Action::Drop(reason) => {
                self.drop_counted(reason);
                let is_init = matches!(msg, Message::Initiation(_));
                match reason {
                    DropReason::RateLimited => assert!(is_init),
                    DropReason::CookieChallenge => {
                        let Message::Initiation(i) = msg else {
                            panic!("challenged a non-initiation")
                        };
                        assert!(self.exit_for(l, &i).is_ok(), "challenged for no exit");
                        assert_eq!(
                            self.cookie_replies,
                            replies_before + 1,
                            "a challenge without a cookie reply"
                        );
                    }
                    DropReason::Mac1Mismatch if matches!(msg, Message::Response(_)) => {
                        let Message::Response(r) = msg else {
                            unreachable!()
                        };
                        assert!(
                            self.sessions_of(from)
                                .all(|s| !mac1_key(&s.exit_key).verify(r.mac1_input(), r.mac1())),
                            "a response with the mac1 of {from}'s exit refused"
                        );
                    }
                    DropReason::NoExit | DropReason::Mac1Mismatch => {
                        let Message::Initiation(i) = msg else {
                            panic!("{reason} for a non-initiation")
                        };
                        assert_eq!(self.exit_for(l, &i), Err(reason));
                    }
                    DropReason::SessionsFull => {
                        assert!(is_init && before >= self.cfg.max_sessions)
                    }
                    DropReason::PendingFull => {
                        assert!(is_init && pending_before >= self.cfg.max_pending)
                    }
                    DropReason::ClientSessionLimit => {
                        assert!(is_init && per_client_before >= self.cfg.max_sessions_per_client)
                    }
                    DropReason::UnknownClient => {
                        assert!(!is_init && per_client_before == 0)
                    }
                    DropReason::UnknownIndex => {
                        assert!(!is_init && per_client_before > 0);
                        if let Message::Transport(t) = msg {
                            let index = t.receiver_index();
                            assert!(
                                !self.usable_of(&usable_before, from).contains(&index),
                                "transport from {from} on usable index {index:#x} refused"
                            );
                        }
                    }
                    other => panic!("client packet refused as {other}"),
                }
            }
        }
        // Only a client's initiation (a new session) or response changes what it may use.
        if !matches!(msg, Message::Initiation(_) | Message::Response(_)) {
            assert_eq!(
                self.usable(),
                usable_before,
                "{msg:?} changed usable indices"
            );
        }
    }

    /// Every open session's usable indices, as the router lists them.
    fn usable(&self) -> HashMap<SessionSlot, Vec<u32>> {
        self.router
            .sessions(self.now)
            .map(|i| (i.slot, i.exit_indices))
            .collect()
    }

    /// The usable indices of all of `client`'s sessions in `usable`.
    fn usable_of(&self, usable: &HashMap<SessionSlot, Vec<u32>>, client: SocketAddr) -> Vec<u32> {
        usable
            .iter()
            .filter(|(slot, _)| self.open.get(slot).is_some_and(|s| s.client == client))
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    }

    /// Records an initiation from `ip` that got past the rate limiter and checks that the
    /// budgets were kept: one token bucket for initiations that cannot have been proven
    /// (no mac2, address never verified), and three (unproven, verified address, cookie)
    /// for all of them.
    fn rate_limited_handshake(&mut self, ip: IpAddr, maybe_proven: bool) {
        let cost = 1_000_000_000 / u128::from(self.cfg.handshakes_per_second);
        let capacity = cost * u128::from(self.cfg.handshake_burst);
        let now = self.now;
        Self::within_budget(
            self.handshakes_any.entry(rate_key(ip)).or_default(),
            now,
            ip,
            cost,
            3 * capacity,
            3,
        );
        if !maybe_proven {
            Self::within_budget(
                self.handshakes.entry(rate_key(ip)).or_default(),
                now,
                ip,
                cost,
                capacity,
                1,
            );
        }
    }

    fn within_budget(
        times: &mut Vec<Instant>,
        now: Instant,
        ip: IpAddr,
        cost: u128,
        capacity: u128,
        buckets: u128,
    ) {
        times.push(now);
        // A token bucket lets through at most `burst + rate × window` in any window.
        let n = times.len();
        for (i, &t) in times.iter().enumerate() {
            let window = (now - t).as_nanos();
            assert!(
                (n - i) as u128 * cost <= capacity + window * buckets,
                "{} handshakes from {ip} within {window} ns",
                n - i
            );
        }
        // Windows over the last 64 of them are checked; that bounds the work per input.
        if n > 128 {
            times.drain(..n - 64);
        }
    }

    fn exit(&mut self, slot: SessionSlot, p: &[u8]) {
        let usable_before = self.usable();
        // The first response to an initiation of the session's client is the exit's; the
        // model believes nothing else that arrives on an exit-facing socket.
        let answers = match (Message::parse(p), self.open.get(&slot)) {
            (Ok(Message::Response(r)), Some(s)) => Some(s.awaiting.contains(&r.receiver_index())),
            _ => None,
        };
        let action = self.router.handle_exit(self.now, slot, p);
        self.commands(Closing::Never, None);
        let msg = match Message::parse(p) {
            Ok(m) => m,
            Err(reason) => {
                assert_eq!(action, Action::Drop(reason), "malformed packet not refused");
                self.drop_counted(reason);
                return;
            }
        };
        match action {
            Action::ToExit(_) => panic!("an exit packet was sent to an exit: {action:?}"),
            Action::ToClient { listener, client } => {
                let now = self.now;
                let s = self
                    .open
                    .get_mut(&slot)
                    .unwrap_or_else(|| panic!("delivered from {slot:?}, which is not open"));
                assert_eq!(client, s.client, "the session of {} moved", s.client);
                assert_eq!(listener, s.listener, "reply on another listener");
                assert!(self.ever_client.contains(&client));
                s.last_forward = now;
                let index = match msg {
                    Message::Initiation(i) => {
                        s.offered.insert(i.sender_index());
                        Some(i.sender_index())
                    }
                    Message::Response(r) => {
                        assert_eq!(answers, Some(true), "an unmatched response was believed");
                        s.awaiting.retain(|&x| x != r.receiver_index());
                        s.established = true;
                        s.exit_indices.insert(r.sender_index());
                        Some(r.sender_index())
                    }
                    _ => None,
                };
                let ledger = self.ledgers.entry(client).or_default();
                if let Some(i) = index {
                    ledger.received.insert(i);
                }
                ledger.bytes_out += p.len() as u64;
                assert!(
                    ledger.verified || ledger.bytes_out <= ledger.bytes_in,
                    "amplification: {client} sent {} bytes, got {}",
                    ledger.bytes_in,
                    ledger.bytes_out
                );
                self.to_client_bytes += p.len() as u64;
            }
            Action::Drop(reason) => {
                self.drop_counted(reason);
                let open = self.open.contains_key(&slot);
                match reason {
                    DropReason::NoSession => assert!(!open, "{slot:?} is open"),
                    DropReason::AmplificationLimit => assert!(open, "{slot:?} is not open"),
                    DropReason::UnmatchedResponse => {
                        assert_eq!(answers, Some(false), "the exit's response refused")
                    }
                    other => panic!("exit packet refused as {other}"),
                }
            }
        }
        // The attacker's packets change nothing the client's traffic runs on.
        let after = self.usable();
        for (slot_after, indices) in &after {
            let before = &usable_before[slot_after];
            if *slot_after == slot
                && answers == Some(true)
                && action != Action::Drop(DropReason::AmplificationLimit)
            {
                let Ok(Message::Response(r)) = Message::parse(p) else {
                    unreachable!("answers is set for responses only")
                };
                assert!(indices.contains(&r.sender_index()));
                assert!(indices
                    .iter()
                    .all(|i| *i == r.sender_index() || before.contains(i)));
            } else {
                assert_eq!(
                    indices, before,
                    "an exit-side packet changed usable indices of {slot_after:?}"
                );
            }
        }
    }

    fn timeout(&mut self) {
        self.router.handle_timeout(self.now);
        self.commands(Closing::Timeout, None);
        for (slot, s) in &self.open {
            assert!(
                s.deadline(&self.cfg) > self.now,
                "{slot:?} outlived its deadline by {:?}: {s:?}",
                self.now - s.deadline(&self.cfg)
            );
        }
        if !self.router.sweeping() {
            for (slot, s) in &self.open {
                assert!(self.in_table(s), "sweep over, {slot:?} still open: {s:?}");
            }
        }
    }

    /// A restart: every session through its snapshot into a new router.
    fn restart(&mut self) {
        let snaps: Vec<(SessionSnapshot, Listener)> = self
            .router
            .sessions(self.now)
            .enumerate()
            .map(|(i, info)| {
                let l = self.open[&info.slot].listener;
                (SessionSnapshot::new(info, 30_000 + i as u16), l)
            })
            .collect();
        let old = std::mem::take(&mut self.open);
        let by_client_exit: HashMap<(SocketAddr, PublicKey, SocketAddr), SessionModel> = old
            .into_values()
            .map(|s| ((s.client, s.exit_key, s.exit_endpoint), s))
            .collect();
        let old_router = std::mem::replace(
            &mut self.router,
            Router::new(self.cfg.clone(), self.table.clone(), self.now),
        );
        self.past.merge(old_router.stats());
        self.born = self.now;
        self.handshakes.clear();
        self.handshakes_any.clear();
        self.drops = [0; DropReason::COUNT];
        self.to_exit_bytes = 0;
        self.to_client_bytes = 0;
        for (snap, l) in snaps {
            let mut s = by_client_exit[&(snap.client, snap.exit_key, snap.exit_endpoint)].clone();
            assert_eq!(s.established, snap.established);
            let result = self.router.restore(self.now, l, &snap);
            if !self.in_table(&s) {
                assert_eq!(result, Err(DropReason::NoExit));
                self.drop_counted(DropReason::NoExit);
                continue;
            }
            let slot = result.expect("a session that fitted before fits again");
            match self.router.poll_command() {
                Some(Command::OpenExitSocket {
                    slot: opened,
                    exit,
                    local_port,
                }) => {
                    assert_eq!(
                        (opened, exit, local_port),
                        (slot, s.exit_endpoint, Some(snap.local_port))
                    );
                }
                other => panic!("restore gave {other:?}"),
            }
            s.last_forward = self.now;
            s.pending_since = self.now;
            s.listener = l;
            // Handshakes in flight are not saved.
            s.awaiting.clear();
            s.offered.clear();
            s.offloaded = None;
            self.open.insert(slot, s);
            self.slots.push(slot);
            // A verified session goes back to the fast path.
            self.commands(Closing::Never, None);
        }
    }

    fn check_state(&mut self) {
        let r = &self.router;
        assert_eq!(r.session_count(), self.open.len());
        assert!(r.session_count() <= self.cfg.max_sessions);
        let pending = self.open.values().filter(|s| !s.established).count();
        assert_eq!(r.pending_count(), pending);
        assert!(pending <= self.cfg.max_pending);
        let mut per_client: HashMap<SocketAddr, usize> = HashMap::new();
        for s in self.open.values() {
            *per_client.entry(s.client).or_default() += 1;
        }
        assert!(per_client
            .values()
            .all(|&n| n <= self.cfg.max_sessions_per_client));
        let mut listed = 0;
        for info in r.sessions(self.now) {
            listed += 1;
            let s = self
                .open
                .get(&info.slot)
                .unwrap_or_else(|| panic!("listed {:?}, which is not open", info.slot));
            assert_eq!(
                (
                    info.client,
                    info.exit_key,
                    info.exit_endpoint,
                    info.established,
                    info.listen_port
                ),
                (
                    s.client,
                    s.exit_key,
                    s.exit_endpoint,
                    s.established,
                    s.listener.port
                )
            );
            assert!(info.exit_indices.iter().all(|i| s.exit_indices.contains(i)));
            if info.verified {
                assert!(self.ledgers.get(&info.client).is_some_and(|l| l.verified));
            }
            assert_eq!(info.offloaded, s.offloaded.is_some());
            if let Some(indices) = &s.offloaded {
                assert!(
                    self.ledgers.get(&info.client).is_some_and(|l| l.verified),
                    "{} offloaded before it proved its address",
                    info.client
                );
                assert!(
                    indices.iter().all(|i| s.exit_indices.contains(i)),
                    "offloaded an index the exit never sent through {:?}",
                    info.slot
                );
            }
        }
        assert_eq!(listed, self.open.len());
        if let Some(earliest) = self.open.values().map(|s| s.deadline(&self.cfg)).min() {
            let wake = r.poll_timeout().expect("sessions open, yet no timer");
            assert!(
                wake <= earliest,
                "timer {:?} after the earliest deadline",
                wake - earliest
            );
        }
        let stats = r.stats();
        assert_eq!(stats.drops, self.drops, "drops by reason");
        assert_eq!(stats.client_to_exit.bytes, self.to_exit_bytes);
        assert_eq!(stats.exit_to_client.bytes, self.to_client_bytes);
    }
}
