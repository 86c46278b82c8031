//! Z-HOP's outer tunnels (`wraithgate_relay::zhop`, DESIGN §4) against a reference model.
//!
//! Four real WireGuard clients (boringtun `Tunn`s, fixed keys; three of them may be
//! provisioned, the fourth never is) talk to one node from a pool of 8 addresses (shared
//! IPs and /64s, an IPv4-mapped one, two nobody starts at). The input is a script of
//! operations: a client's handshake; a client's inner packet (IPv4 or IPv6 UDP to an exit it
//! may or may not use, from inside its allowed IPs or not; not UDP; any bytes; a keepalive);
//! a client moving to another address; a replay of anything a client sent, from where it
//! was sent or from elsewhere; garbage (random bytes, initiations with a valid mac1 and
//! noise inside, transports naming a tunnel's index); time passing (the node's timers run);
//! a flood that puts the node under handshake load; a table swap (peers and their allowed
//! exits); an exit's reply on a flow. What the node sends to an address is delivered to the
//! clients there, and what they answer (keepalives) goes back.
//!
//! The model is written from the WireGuard paper and DESIGN, not from the node's code, and
//! judges every datagram and every call, what was emitted and the reason of every refusal:
//!
//! - claims: a datagram is Z-HOP's if it comes from a tunnel's endpoint, is an initiation
//!   with the node's mac1, or is a transport naming a live tunnel by index (`peer << 8`);
//! - admission (paper §5.3, §5.4.7): 100 initiations a second (burst 100) are decrypted
//!   without proof; past that the node is under load for 1 s after the last initiation it
//!   could not afford. Under load, an initiation from an address that is no tunnel's
//!   endpoint and without a valid mac2 (a cookie given to that very address and port,
//!   IPv4-mapped or not, in this 120 s cookie epoch or the one before) gets exactly one
//!   64-byte cookie reply to its source and nothing else; proven ones may still be refused
//!   for their per-source budgets (not modelled: `rate_limited` or, from an endpoint
//!   without mac2, a challenge);
//! - handshakes: only a provisioned key gets a response (92 bytes, to the initiation's
//!   source), and only for a timestamp newer than the last its tunnel accepted (a tunnel
//!   made anew remembers none); an unprovisioned key gets `unknown_peer` and nothing;
//! - transport: goes to the tunnel its receiver index names (the source address only when
//!   it names none), decrypts only under the session the client made with that tunnel,
//!   once per counter (and while boringtun's 8 session slots still hold it); anything else
//!   is `outer_rejected` and moves nothing;
//! - roaming (§2): a tunnel's endpoint moves to the source of each authenticated packet
//!   (a consumed initiation, a decrypted transport), never otherwise; that address is then
//!   the tunnel's (claimed for anything, proven under load) until it leaves it or is
//!   forgotten, even if another tunnel had authenticated from it in between;
//! - inner packets: boringtun's length rule, then an independent RFC reading: not UDP,
//!   malformed, a source outside the peer's allowed IPs, a destination that is not one of
//!   its allowed exits' endpoints are refused with that reason; otherwise the payload goes
//!   to the exit through the flow of (peer, source, exit), opened on first use, at most 16
//!   per peer; an exit's reply goes to the peer's endpoint and decrypts, at the client, to
//!   UDP from the exit to the inner source;
//! - table swaps: before anything of a peer is handled (and at the latest by the timer
//!   walk after 100 ms), a peer no longer provisioned loses its tunnel and every flow, a
//!   flow to an exit no longer allowed is closed; the timer walk forgets a peer idle for
//!   more than 540 s. Tunnel and flow counts, and every endpoint, equal the model's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use wraithgate_relay::admission::CookieSettings;
use wraithgate_relay::inner::{build_udp, InnerError};
use wraithgate_relay::role::Listener;
use wraithgate_relay::slab::SessionSlot;
use wraithgate_relay::table::{ExitSpec, ExitTable, IpNet, PeerSpec};
use wraithgate_relay::zhop::{NodeKey, Zhop, ZhopOut, ZhopStats};
use wraithgate_relay::{DropReason, PublicKey};

use crate::exit::{boringtun_view, inside, Expect as View};
use crate::Input;

const LISTENER: Listener = Listener { id: 0, port: 51820 };
/// Most operations one input runs.
const MAX_OPS: usize = 96;
/// Client keys; the last one is never provisioned.
const KEYS: usize = 4;
const PROVISIONABLE: usize = 3;
const EXITS: usize = 3;
/// Where clients (and replays, and garbage) send from.
const POOL: [&str; 8] = [
    "198.51.100.1:40000",
    "198.51.100.1:40001",
    "198.51.100.2:40000",
    "[2001:db8:1::1]:40000",
    "[2001:db8:1::2]:40000",
    "[::ffff:198.51.100.2]:40000",
    "203.0.113.66:666",
    "[2001:db8:bad::1]:666",
];
/// Time steps (ms) an operation may take; the shortest is one timer tick, so every step
/// has the timer walk visit every tunnel.
const STEPS_MS: [u64; 8] = [100, 300, 1_000, 1_500, 5_000, 60_000, 130_000, 541_000];
/// The rules' numbers: WireGuard keeps keys 540 s; boringtun's handshake limit is 100 a
/// second; the load mark holds 1 s (DESIGN, admission); cookies live two 120 s epochs
/// (paper §5.4.7); a peer has at most 16 flows; boringtun keeps 8 sessions per tunnel.
const PEER_IDLE: Duration = Duration::from_secs(540);
const HANDSHAKE_COST_NS: u64 = 10_000_000;
const HANDSHAKE_BURST: u64 = 100;
const LOAD_HOLD: Duration = Duration::from_secs(1);
const COOKIE_EPOCH_SECS: u64 = 120;
const MAX_FLOWS: usize = 16;
const SESSIONS: u64 = 8;

fn pool(n: u8) -> SocketAddr {
    POOL[usize::from(n) % POOL.len()]
        .parse()
        .expect("literal address")
}

/// One address and port however written: an IPv4-mapped IPv6 address is its IPv4 one (a
/// cookie is a MAC of the source's address and port, paper §5.4.7).
fn same_address(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

fn client_secret(k: usize) -> x25519::StaticSecret {
    x25519::StaticSecret::from([0x31 + k as u8; 32])
}

fn client_key(k: usize) -> PublicKey {
    PublicKey(x25519::PublicKey::from(&client_secret(k)).to_bytes())
}

fn exit_endpoint(j: usize) -> SocketAddr {
    match j {
        0 => "192.0.2.1:51820",
        1 => "192.0.2.2:51820",
        _ => "[2001:db8:e::1]:51820",
    }
    .parse()
    .expect("literal address")
}

/// Peer `k`'s allowed IPs: its own IPv4 /16 and IPv6 /64.
fn nets(k: usize) -> [IpNet; 2] {
    [
        IpNet::new(IpAddr::V4(Ipv4Addr::new(10, k as u8, 0, 0)), 16).expect("prefix"),
        IpNet::new(
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, k as u16, 0, 0, 0, 0)),
            64,
        )
        .expect("prefix"),
    ]
}

/// What a table says, from 12 bits: which of the three provisionable keys are peers (bits
/// 0-2), and each one's allowed exits (3 bits each from bit 3).
#[derive(Debug, Clone, Copy)]
struct Provisioning(u16);

impl Provisioning {
    fn peer(self, k: usize) -> bool {
        k < PROVISIONABLE && self.0 >> k & 1 == 1
    }
    fn allows_exit(self, k: usize, j: usize) -> bool {
        self.peer(k) && self.0 >> (3 + 3 * k + j) & 1 == 1
    }
    fn exit_allowed(self, k: usize, dst: SocketAddr) -> bool {
        (0..EXITS).any(|j| self.allows_exit(k, j) && exit_endpoint(j) == dst)
    }
    fn table(self, generation: u64) -> ExitTable {
        let exits = (0..EXITS)
            .map(|j| ExitSpec {
                name: format!("exit-{j}"),
                public_key: PublicKey([0x51 + j as u8; 32]),
                endpoint: exit_endpoint(j),
                listen_port: None,
            })
            .collect();
        let peers = (0..PROVISIONABLE)
            .filter(|&k| self.peer(k))
            .map(|k| PeerSpec {
                public_key: client_key(k),
                name: format!("peer-{k}"),
                allowed_ips: nets(k).to_vec(),
                preshared_key: None,
                allowed_exits: (0..EXITS)
                    .filter(|&j| self.allows_exit(k, j))
                    .map(|j| PublicKey([0x51 + j as u8; 32]))
                    .collect(),
                endpoint: None,
                persistent_keepalive: None,
            })
            .collect();
        ExitTable::new(generation, exits)
            .expect("three distinct exits")
            .with_peers(peers)
            .expect("valid peers")
    }
}

/// Who made a datagram, as far as the model needs to know.
#[derive(Debug, Clone)]
enum Origin {
    /// Client `k`'s initiation: its `stamp`-th (timestamps only grow), carrying a mac2
    /// made with the cookie it was given at this address and time, if any.
    Init {
        k: usize,
        stamp: u64,
        cookie: Option<(SocketAddr, Instant)>,
    },
    /// Client `k`'s transport under the session of response `resp` of tunnel `tunnel`.
    Transport {
        k: usize,
        tunnel: u64,
        resp: u64,
        counter: u64,
        inner: Vec<u8>,
    },
    /// An initiation with the node's mac1 and noise inside.
    Junk,
    /// Anything else (any mac1 in it is wrong).
    Garbage,
}

struct Client {
    tunn: Tunn,
    at: u8,
    stamps: u64,
    /// The tunnel and response its current session came from.
    session: Option<(u64, u64)>,
    cookie: Option<(SocketAddr, Instant)>,
}

/// The model's tunnel of one key.
#[derive(Debug)]
struct PeerModel {
    /// Which tunnel this is: a tunnel made again after its peer was forgotten is another.
    tunnel: u64,
    /// The node's number for it (its indices are `number << 8 | n`), from its response.
    number: Option<u32>,
    endpoint: Option<SocketAddr>,
    epoch: u64,
    last_stamp: u64,
    responses: u64,
    last_activity: Instant,
    flows: Vec<SessionSlot>,
}

#[derive(Debug, Clone)]
struct FlowModel {
    k: usize,
    src: SocketAddr,
    dst: SocketAddr,
}

struct Model {
    provisioning: Provisioning,
    epoch: u64,
    peers: [Option<PeerModel>; KEYS],
    tunnels: u64,
    flows: HashMap<SessionSlot, FlowModel>,
    /// Which tunnel each address belongs to: the last one that authenticated from it, until
    /// it moves away or is forgotten. Only these addresses are claimed for any message and
    /// count as proven under load; a transport goes to the tunnel its index names.
    owner: HashMap<SocketAddr, usize>,
    /// Transport counters each session (tunnel, response) took.
    accepted: HashMap<(u64, u64), Vec<u64>>,
    /// The handshake budget, in nanoseconds of credit, and when it was last taken from.
    credit: u64,
    last_ns: u64,
    load_until: Option<Instant>,
}

#[derive(Debug)]
enum Ev {
    Open(SessionSlot, SocketAddr),
    Close(SessionSlot),
    Peer(SocketAddr, Vec<u8>),
    Exit(SessionSlot, Vec<u8>),
}

fn record(evs: &mut Vec<Ev>) -> impl FnMut(ZhopOut<'_>) + '_ {
    move |o| {
        evs.push(match o {
            ZhopOut::OpenFlow { flow, exit } => Ev::Open(flow, exit),
            ZhopOut::CloseFlow { flow } => Ev::Close(flow),
            ZhopOut::ToPeer {
                to,
                bytes,
                listener,
            } => {
                assert_eq!(listener, LISTENER, "sent from the listener it came in on");
                Ev::Peer(to, bytes.to_vec())
            }
            ZhopOut::ToExit { flow, bytes } => Ev::Exit(flow, bytes.to_vec()),
            ZhopOut::ToTun { .. } => panic!("no TUN device here: {o:?}"),
        })
    }
}

/// What one input reached, for the corpus replay to make sure it still does.
#[derive(Debug, Default, Clone)]
pub struct Reached {
    pub stats: ZhopStats,
    pub drops: HashMap<DropReason, u64>,
    /// Endpoints moved by an authenticated packet from another address.
    pub roams: u64,
    /// Tunnels removed because their peer left the table; flows closed by a swap.
    pub removed_by_table: u64,
    pub flows_closed_by_table: u64,
    pub idle_forgotten: u64,
    pub exit_replies_read: u64,
}

impl Reached {
    pub fn merge(&mut self, o: &Reached) {
        let s = &mut self.stats;
        s.outer_handshakes += o.stats.outer_handshakes;
        s.cookie_replies += o.stats.cookie_replies;
        s.cookie_proven += o.stats.cookie_proven;
        s.inner_to_exit.packets += o.stats.inner_to_exit.packets;
        s.exit_to_inner.packets += o.stats.exit_to_inner.packets;
        for (r, n) in &o.drops {
            *self.drops.entry(*r).or_default() += n;
        }
        self.roams += o.roams;
        self.removed_by_table += o.removed_by_table;
        self.flows_closed_by_table += o.flows_closed_by_table;
        self.idle_forgotten += o.idle_forgotten;
        self.exit_replies_read += o.exit_replies_read;
    }
}

struct Harness {
    node: Zhop,
    t0: Instant,
    now: Instant,
    generation: u64,
    clients: Vec<Client>,
    model: Model,
    /// What clients sent: bytes, who made them, from where.
    history: Vec<(Vec<u8>, Origin, SocketAddr)>,
    /// Flows the node closed, to hand their stale slots back to it.
    closed: Vec<SessionSlot>,
    /// An exit's reply on its way to the client of its flow.
    pending_reply: Option<(FlowModel, Vec<u8>)>,
    buf: Vec<u8>,
    reached: Reached,
}

pub fn check(data: &[u8]) {
    run(data);
}

/// Runs one input; panics where the node and the model disagree.
pub fn run(data: &[u8]) -> Reached {
    let mut input = Input::new(data);
    let mut h = Harness::new(Provisioning(input.u16()));
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        h.op(&mut input);
        h.check_state();
    }
    h.reached.stats = h.node.stats();
    h.reached
}

impl Harness {
    fn new(provisioning: Provisioning) -> Self {
        let now = Instant::now();
        let node_key = NodeKey::from_secret([7; 32]);
        let node_public = x25519::PublicKey::from(node_key.public_key().0);
        let node = Zhop::new(
            Some(node_key),
            Arc::new(provisioning.table(1)),
            CookieSettings {
                seed: [3; 32],
                replies_per_second: 20_000,
            },
            now,
        );
        let clients = (0..KEYS)
            .map(|k| Client {
                tunn: Tunn::new(client_secret(k), node_public, None, None, 1, None),
                at: k as u8,
                stamps: 0,
                session: None,
                cookie: None,
            })
            .collect();
        Harness {
            node,
            t0: now,
            now,
            generation: 1,
            clients,
            model: Model {
                provisioning,
                epoch: 0,
                peers: Default::default(),
                tunnels: 0,
                flows: HashMap::new(),
                owner: HashMap::new(),
                accepted: HashMap::new(),
                credit: HANDSHAKE_BURST * HANDSHAKE_COST_NS,
                last_ns: 0,
                load_until: None,
            },
            history: Vec::new(),
            closed: Vec::new(),
            pending_reply: None,
            buf: vec![0; 70_000],
            reached: Reached::default(),
        }
    }

    fn op(&mut self, input: &mut Input<'_>) {
        match input.u8() % 9 {
            0 => {
                let k = usize::from(input.u8()) % KEYS;
                self.handshake(k);
            }
            1 => self.data(input),
            2 => {
                let k = usize::from(input.u8()) % KEYS;
                self.clients[k].at = input.u8() % POOL.len() as u8;
            }
            3 => {
                let (nth, at) = (input.u8(), input.u8());
                if self.history.is_empty() {
                    return;
                }
                let (bytes, origin, from) =
                    self.history[usize::from(nth) % self.history.len()].clone();
                let from = if at >= 0x80 { from } else { pool(at) };
                let _ = self.send(from, &bytes, origin);
            }
            4 => self.garbage(input),
            5 => {
                let step = STEPS_MS[usize::from(input.u8()) % STEPS_MS.len()];
                self.now += Duration::from_millis(step);
                self.tick();
            }
            6 => self.flood(),
            7 => {
                let p = Provisioning(input.u16());
                self.generation += 1;
                self.node.set_table(Arc::new(p.table(self.generation)));
                self.model.provisioning = p;
                self.model.epoch += 1;
            }
            _ => self.exit_reply(input),
        }
    }

    fn handshake(&mut self, k: usize) {
        let c = &mut self.clients[k];
        let init = crate::client_initiation(&mut c.tunn, &mut self.buf);
        c.stamps += 1;
        let origin = Origin::Init {
            k,
            stamp: c.stamps,
            cookie: c.cookie,
        };
        let from = pool(c.at);
        self.history.push((init.clone(), origin.clone(), from));
        let _ = self.send(from, &init, origin);
    }

    /// Client `k`'s inner packet, shaped by the input, through its outer tunnel.
    fn data(&mut self, input: &mut Input<'_>) {
        let k = usize::from(input.u8()) % KEYS;
        let (shape, j, src_kind, port, len) = (
            input.u8(),
            usize::from(input.u8()) % EXITS,
            input.u8() % 4,
            input.u8() % 20,
            usize::from(input.u8()),
        );
        let payload = input.bytes(len).to_vec();
        let Some((tunnel, resp)) = self.clients[k].session else {
            return self.handshake(k);
        };
        let exit = exit_endpoint(j);
        // Its own network, another peer's, none, or its own again from another host.
        let other = (k + 1) % PROVISIONABLE;
        let src_ip = match (exit.is_ipv4(), src_kind) {
            (true, 0) => IpAddr::V4(Ipv4Addr::new(10, k as u8, 1, 2)),
            (true, 1) => IpAddr::V4(Ipv4Addr::new(10, other as u8, 1, 2)),
            (true, 2) => IpAddr::V4(Ipv4Addr::new(172, 16, 0, 9)),
            (true, _) => IpAddr::V4(Ipv4Addr::new(10, k as u8, 200, 1)),
            (false, 0) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, k as u16, 0, 0, 0, 2)),
            (false, 1) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, other as u16, 0, 0, 0, 2)),
            (false, 2) => IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 9)),
            (false, _) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, k as u16, 0, 0, 1, 1)),
        };
        let src = SocketAddr::new(src_ip, 5000 + u16::from(port));
        let mut inner = Vec::new();
        match shape % 5 {
            0 => build_udp(&mut inner, src, exit, &payload),
            // An exit's address, not its port.
            1 => build_udp(
                &mut inner,
                src,
                SocketAddr::new(exit.ip(), exit.port() + 1),
                &payload,
            ),
            2 => {
                build_udp(&mut inner, src, exit, &payload);
                // TCP instead.
                let at = if exit.is_ipv4() { 9 } else { 6 };
                inner[at] = 6;
            }
            3 => inner = payload,
            _ => {} // A keepalive.
        }
        let c = &mut self.clients[k];
        let sealed = match c.tunn.encapsulate(&inner, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("a client with a session seals: {other:?}"),
        };
        assert_eq!(sealed[0], 4, "a transport");
        let origin = Origin::Transport {
            k,
            tunnel,
            resp,
            counter: u64::from_le_bytes(sealed[8..16].try_into().expect("8 bytes")),
            inner,
        };
        let from = pool(c.at);
        self.history.push((sealed.clone(), origin.clone(), from));
        let _ = self.send(from, &sealed, origin);
    }

    fn garbage(&mut self, input: &mut Input<'_>) {
        let (kind, at, len) = (input.u8(), input.u8(), usize::from(input.u8()));
        let from = pool(at);
        let bytes = input.bytes(len).to_vec();
        match kind % 4 {
            0 => {
                let _ = self.send(from, &bytes, Origin::Garbage);
            }
            1 => {
                let sender = u32::from(kind) << 8 | u32::from(len as u8);
                let init = crate::router::initiation(self.node_key(), sender, 0x5a);
                let _ = self.send(from, &init, Origin::Junk);
            }
            2 => {
                // A transport naming tunnel `number`'s index: what an attacker sees on the
                // wire and can send from anywhere.
                let mut t = vec![0x77u8; 32 + 16 * (len % 4)];
                t[..4].copy_from_slice(&[4, 0, 0, 0]);
                let index = (u32::from(kind >> 2) % 4) << 8 | 1;
                t[4..8].copy_from_slice(&index.to_le_bytes());
                let _ = self.send(from, &t, Origin::Garbage);
            }
            _ => {
                let mut m = vec![0x33u8; 148];
                m[..4].copy_from_slice(&[1, 0, 0, 0]);
                m[4..4 + bytes.len().min(144)].copy_from_slice(&bytes[..bytes.len().min(144)]);
                let _ = self.send(from, &m, Origin::Garbage);
            }
        }
    }

    fn node_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&x25519::StaticSecret::from([7; 32])).to_bytes())
    }

    /// Initiations with a valid mac1 and noise inside, from sources nobody else uses, until
    /// the node asks for cookies: past its budget it is under load.
    fn flood(&mut self) {
        for n in 0..=HANDSHAKE_BURST as u32 + 8 {
            let from = SocketAddr::from(([100, 64, (n >> 8) as u8, n as u8], 1000));
            let init = crate::router::initiation(self.node_key(), n, 0x5a);
            if self.send(from, &init, Origin::Junk) == Err(DropReason::CookieChallenge) {
                return;
            }
        }
        panic!(
            "a flood of {} initiations never put the node under load",
            HANDSHAKE_BURST + 9
        );
    }

    /// A datagram to the node from `from`: claimed or not, handled, judged, and what the
    /// node sends delivered.
    fn send(&mut self, from: SocketAddr, bytes: &[u8], origin: Origin) -> Result<(), DropReason> {
        let claimed = self.model.claims(from, bytes, &origin);
        let Some(claim) = self.node.claim(from, bytes, || false) else {
            assert!(!claimed, "{origin:?} from {from} is Z-HOP's, not claimed");
            return Err(DropReason::UnknownClient);
        };
        assert!(claimed, "{origin:?} from {from} claimed: {claim:?}");
        let mut evs = Vec::new();
        let r = self.node.handle_claimed(
            self.now,
            LISTENER,
            from,
            bytes,
            claim,
            &mut record(&mut evs),
        );
        if let Err(reason) = r {
            *self.reached.drops.entry(reason).or_default() += 1;
        }
        let responder = self.judge(from, bytes, &origin, r, &evs);
        self.deliver(&evs, responder);
        r
    }

    /// Checks what the node did with a datagram against the model, and moves the model.
    /// Returns the tunnel a handshake response came from.
    fn judge(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        origin: &Origin,
        r: Result<(), DropReason>,
        evs: &[Ev],
    ) -> Option<(u64, u64)> {
        let what = format!("{origin:?} from {from}: {r:?} {evs:?}");
        let kind = crate::wire::classify(bytes);
        let mac1 = matches!(origin, Origin::Init { .. } | Origin::Junk);
        match kind {
            Err(reason) => {
                assert_eq!(r, Err(reason), "{what}");
                assert!(evs.is_empty(), "{what}");
                None
            }
            Ok(1) if !mac1 => {
                assert_eq!(r, Err(DropReason::OuterRejected), "{what}");
                assert!(evs.is_empty(), "{what}");
                None
            }
            Ok(1) => self.judge_initiation(from, origin, r, evs, &what),
            Ok(4) => {
                self.judge_transport(from, bytes, origin, r, evs, &what);
                None
            }
            Ok(_) => {
                // A response or cookie reply, from an endpoint: its tunnel is checked
                // against the table, and boringtun (a responder here) refuses it.
                let k = *self
                    .model
                    .owner
                    .get(&from)
                    .expect("claimed from an endpoint");
                let closes = self.model.reconcile(k, &mut self.reached);
                let removed = self.model.peers[k].is_none();
                let want = if removed {
                    DropReason::UnknownPeer
                } else {
                    DropReason::OuterRejected
                };
                assert_eq!(r, Err(want), "{what}");
                self.expect(evs, &closes, &[], &what);
                None
            }
        }
    }

    fn judge_initiation(
        &mut self,
        from: SocketAddr,
        origin: &Origin,
        r: Result<(), DropReason>,
        evs: &[Ev],
        what: &str,
    ) -> Option<(u64, u64)> {
        let now = self.now;
        let loaded = self.model.under_load(now, self.t0);
        let verified = self.model.owner.contains_key(&from);
        let mac2 = match origin {
            Origin::Init {
                cookie: Some((at, t)),
                ..
            } => {
                same_address(*at, from) && {
                    let epoch =
                        |t: Instant| t.duration_since(self.t0).as_secs() / COOKIE_EPOCH_SECS;
                    epoch(now) - epoch(*t) <= 1
                }
            }
            _ => false,
        };
        let challenged = |evs: &[Ev]| matches!(evs, [Ev::Peer(to, b)] if *to == from && b.len() == 64 && b[0] == 3);
        match r {
            Err(DropReason::CookieChallenge) => {
                assert!(loaded, "challenged while not under load: {what}");
                assert!(!mac2, "a valid mac2 challenged: {what}");
                assert!(challenged(evs), "one cookie reply to the source: {what}");
                return None;
            }
            Err(DropReason::RateLimited) => {
                assert!(loaded && (verified || mac2), "{what}");
                assert!(evs.is_empty(), "{what}");
                return None;
            }
            _ => {
                assert!(
                    !loaded || verified || mac2,
                    "admitted under load without proof: {what}"
                );
            }
        }
        let Origin::Init { k, stamp, .. } = *origin else {
            // Noise inside: the DH is made, nothing decrypts.
            assert_eq!(r, Err(DropReason::OuterRejected), "{what}");
            assert!(evs.is_empty(), "{what}");
            return None;
        };
        if !self.model.provisioning.peer(k) {
            let closes = self.model.forget(k);
            if !closes.is_empty() || self.model.peers[k].is_none() {
                self.reached.removed_by_table += u64::from(!closes.is_empty());
            }
            assert_eq!(r, Err(DropReason::UnknownPeer), "{what}");
            self.expect(evs, &closes, &[], what);
            return None;
        }
        let closes = match &self.model.peers[k] {
            Some(_) => self.model.reconcile(k, &mut self.reached),
            None => {
                self.model.tunnels += 1;
                self.model.peers[k] = Some(PeerModel {
                    tunnel: self.model.tunnels,
                    number: None,
                    endpoint: None,
                    epoch: self.model.epoch,
                    last_stamp: 0,
                    responses: 0,
                    last_activity: now,
                    flows: Vec::new(),
                });
                Vec::new()
            }
        };
        let p = self.model.peers[k].as_mut().expect("a tunnel");
        if stamp <= p.last_stamp {
            assert_eq!(
                r,
                Err(DropReason::OuterRejected),
                "a replayed initiation: {what}"
            );
            self.expect(evs, &closes, &[], what);
            return None;
        }
        assert_eq!(r, Ok(()), "{what}");
        p.last_stamp = stamp;
        p.responses += 1;
        let responder = (p.tunnel, p.responses);
        self.expect(evs, &closes, &[Want::Response(from)], what);
        let Some(Ev::Peer(_, response)) = evs.iter().find(|e| matches!(e, Ev::Peer(..))) else {
            unreachable!("checked above")
        };
        let number = u32::from_le_bytes(response[4..8].try_into().expect("4 bytes")) >> 8;
        let p = self.model.peers[k].as_mut().expect("a tunnel");
        match p.number {
            None => p.number = Some(number),
            Some(n) => assert_eq!(n, number, "a tunnel keeps its number: {what}"),
        }
        let numbers: Vec<u32> = self
            .model
            .peers
            .iter()
            .flatten()
            .filter_map(|p| p.number)
            .collect();
        assert!(
            numbers.iter().filter(|&&n| n == number).count() == 1,
            "two live tunnels share number {number}: {what}"
        );
        self.model.learn(k, from, now, &mut self.reached);
        Some(responder)
    }

    fn judge_transport(
        &mut self,
        from: SocketAddr,
        bytes: &[u8],
        origin: &Origin,
        r: Result<(), DropReason>,
        evs: &[Ev],
        what: &str,
    ) {
        let index = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        // WireGuard finds the session by the receiver index (the source address is not
        // authenticated); from an endpoint, an index naming no tunnel is that endpoint's.
        let k = self
            .model
            .numbered(index >> 8)
            .or_else(|| self.model.owner.get(&from).copied())
            .expect("claimed: from an endpoint or naming a tunnel");
        let closes = self.model.reconcile(k, &mut self.reached);
        let Some(p) = &self.model.peers[k] else {
            assert_eq!(r, Err(DropReason::UnknownPeer), "{what}");
            self.expect(evs, &closes, &[], what);
            return;
        };
        let genuine = match origin {
            Origin::Transport {
                k: sender,
                tunnel,
                resp,
                counter,
                inner,
            } if *tunnel == p.tunnel
                && *sender == k
                && !self
                    .model
                    .accepted
                    .get(&(*tunnel, *resp))
                    .is_some_and(|c| c.contains(counter)) =>
            {
                if p.responses - resp >= SESSIONS && r.is_err() {
                    // Its session may have been overwritten by newer handshakes.
                    None
                } else {
                    Some(((*tunnel, *resp), *counter, inner.clone()))
                }
            }
            _ => None,
        };
        let Some((session, counter, inner)) = genuine else {
            assert_eq!(r, Err(DropReason::OuterRejected), "not authentic: {what}");
            self.expect(evs, &closes, &[], what);
            return;
        };
        self.model
            .accepted
            .entry(session)
            .or_default()
            .push(counter);
        let packet = match boringtun_view(&inner) {
            View::Refused => {
                assert_eq!(
                    r,
                    Err(DropReason::OuterRejected),
                    "boringtun refuses: {what}"
                );
                self.expect(evs, &closes, &[], what);
                return;
            }
            View::Nothing => None,
            // Possibly empty: an IPv4 header claiming a total length of 0 is handed over as
            // a packet of no bytes, which is no keepalive.
            View::Tun(p) => Some(p),
        };
        self.model.learn(k, from, self.now, &mut self.reached);
        let Some(packet) = packet else {
            assert_eq!(r, Ok(()), "a keepalive: {what}");
            self.expect(evs, &closes, &[], what);
            return;
        };
        let want = match crate::inner::classify(packet) {
            Err(InnerError::NotUdp) => Err(DropReason::InnerNotUdp),
            Err(_) => Err(DropReason::InnerMalformed),
            Ok((src, _, _, _)) if !nets(k).iter().any(|n| inside(n, src.ip())) => {
                Err(DropReason::InnerSpoofedSource)
            }
            Ok((_, dst, _, _)) if !self.model.provisioning.exit_allowed(k, dst) => {
                Err(DropReason::InnerForbiddenDestination)
            }
            Ok((src, dst, a, b)) => {
                let payload = packet[a..b].to_vec();
                let p = self.model.peers[k].as_ref().expect("a tunnel");
                let flow = p.flows.iter().copied().find(|f| {
                    let fl = &self.model.flows[f];
                    (fl.src, fl.dst) == (src, dst)
                });
                match flow {
                    Some(f) => Ok(Want::Exit(Some(f), payload)),
                    None if p.flows.len() >= MAX_FLOWS => Err(DropReason::ClientSessionLimit),
                    None => Ok(Want::Exit(None, payload)),
                }
            }
        };
        match want {
            Err(reason) => {
                assert_eq!(r, Err(reason), "{what}");
                self.expect(evs, &closes, &[], what);
            }
            Ok(w) => {
                assert_eq!(r, Ok(()), "{what}");
                let Ok((src, dst, _, _)) = crate::inner::classify(packet) else {
                    unreachable!("classified above")
                };
                if let Want::Exit(None, _) = w {
                    let opened = self.expect(evs, &closes, &[Want::Open(dst), w], what);
                    let f = opened.expect("a flow opened");
                    self.model.flows.insert(f, FlowModel { k, src, dst });
                    self.model.peers[k]
                        .as_mut()
                        .expect("a tunnel")
                        .flows
                        .push(f);
                } else {
                    self.expect(evs, &closes, &[w], what);
                }
            }
        }
    }

    /// Checks the node's events: the flows closed (in any order), then exactly `want`.
    /// Returns the flow an expected [`Want::Open`] opened.
    fn expect(
        &mut self,
        evs: &[Ev],
        closes: &[SessionSlot],
        want: &[Want],
        what: &str,
    ) -> Option<SessionSlot> {
        self.closes_match(evs, closes, what);
        let rest: Vec<&Ev> = evs.iter().filter(|e| !matches!(e, Ev::Close(_))).collect();
        assert_eq!(rest.len(), want.len(), "{what}");
        let mut opened = None;
        for (got, want) in rest.into_iter().zip(want) {
            match (got, want) {
                (Ev::Peer(to, b), Want::Response(at)) => {
                    assert!(to == at && b.len() == 92 && b[0] == 2, "a response: {what}");
                }
                (Ev::Open(f, exit), Want::Open(dst)) => {
                    assert_eq!(exit, dst, "{what}");
                    assert!(
                        !self.model.flows.contains_key(f),
                        "a live flow reopened: {what}"
                    );
                    opened = Some(*f);
                }
                (Ev::Exit(f, b), Want::Exit(flow, payload)) => {
                    assert_eq!(Some(*f), flow.or(opened), "the flow: {what}");
                    assert_eq!(b, payload, "the inner payload: {what}");
                }
                (got, want) => panic!("{got:?} where {want:?} was due: {what}"),
            }
        }
        opened
    }

    /// Hands what the node sent to the clients at that address; a response's keepalive
    /// goes back at once.
    fn deliver(&mut self, evs: &[Ev], responder: Option<(u64, u64)>) {
        for ev in evs {
            let Ev::Peer(to, bytes) = ev else { continue };
            for k in 0..KEYS {
                if pool(self.clients[k].at) != *to {
                    continue;
                }
                let c = &mut self.clients[k];
                match c.tunn.decapsulate(None, bytes, &mut self.buf) {
                    TunnResult::WriteToNetwork(reply) => {
                        let reply = reply.to_vec();
                        assert_eq!(bytes[0], 2, "a client answers only a response");
                        let (tunnel, resp) = responder.expect("a response from a tunnel");
                        c.session = Some((tunnel, resp));
                        let origin = Origin::Transport {
                            k,
                            tunnel,
                            resp,
                            counter: u64::from_le_bytes(reply[8..16].try_into().expect("8")),
                            inner: Vec::new(),
                        };
                        self.history.push((reply.clone(), origin.clone(), *to));
                        let _ = self.send(*to, &reply, origin);
                    }
                    TunnResult::Done if bytes[0] == 3 => c.cookie = Some((*to, self.now)),
                    TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                        let p = p.to_vec();
                        self.read_reply(k, &p);
                    }
                    // Not for this client, or refused by it (boringtun's own handshake
                    // limit answers `UnderLoad` past 10 responses a second).
                    _ => {}
                }
            }
        }
    }

    /// An exit's reply on a flow (a live one, one closed, or one never opened).
    fn exit_reply(&mut self, input: &mut Input<'_>) {
        let (sel, len) = (input.u8(), usize::from(input.u8()));
        let payload = input.bytes(len).to_vec();
        let mut live: Vec<SessionSlot> = self.model.flows.keys().copied().collect();
        live.sort_by_key(|f| f.to_u64());
        let flow = match sel % 4 {
            0 | 1 if !live.is_empty() => live[usize::from(sel / 4) % live.len()],
            2 if !self.closed.is_empty() => self.closed[usize::from(sel / 4) % self.closed.len()],
            _ => SessionSlot {
                index: u32::from(sel),
                generation: 7,
            },
        };
        let mut evs = Vec::new();
        let r = self
            .node
            .handle_exit(self.now, flow, &payload, &mut record(&mut evs));
        let what = format!("exit reply on {flow:?}: {r:?} {evs:?}");
        let Some(fl) = self.model.flows.get(&flow).cloned() else {
            assert_eq!(r, Err(DropReason::NoSession), "{what}");
            assert!(evs.is_empty(), "{what}");
            return;
        };
        let closes = self.model.reconcile(fl.k, &mut self.reached);
        if !self.model.flows.contains_key(&flow) {
            assert_eq!(r, Err(DropReason::NoSession), "{what}");
            self.expect(&evs, &closes, &[], &what);
            return;
        }
        assert_eq!(r, Ok(()), "{what}");
        let p = self.model.peers[fl.k].as_mut().expect("a flow's tunnel");
        p.last_activity = self.now;
        let endpoint = p.endpoint.expect("a tunnel with flows has an endpoint");
        self.closes_match(&evs, &closes, &what);
        let sent: Vec<&Ev> = evs.iter().filter(|e| matches!(e, Ev::Peer(..))).collect();
        assert!(
            matches!(sent[..], [Ev::Peer(to, b)] if *to == endpoint && b[0] == 4),
            "one transport to the peer's endpoint {endpoint}: {what}"
        );
        self.pending_reply = Some((fl, payload));
        self.deliver(&evs, None);
        if let Some((fl, _)) = self.pending_reply.take() {
            // The node seals with the session its client last sent on, in one of boringtun's
            // 8 slots: newer handshakes the client never completed may have taken it.
            let c = &self.clients[fl.k];
            let due = match (c.session, &self.model.peers[fl.k]) {
                (Some((tunnel, resp)), Some(p)) => {
                    pool(c.at) == endpoint && tunnel == p.tunnel && p.responses - resp < SESSIONS
                }
                _ => false,
            };
            assert!(
                !due,
                "the peer at its endpoint could not read its exit's reply: {what}"
            );
        }
    }
}

#[derive(Debug)]
enum Want {
    /// A handshake response to this address.
    Response(SocketAddr),
    /// A flow opened to this exit.
    Open(SocketAddr),
    /// This payload to the exit through this flow (`None`: the one just opened).
    Exit(Option<SessionSlot>, Vec<u8>),
}

impl Harness {
    /// The timer walk: a step of at least one tick visits every tunnel.
    fn tick(&mut self) {
        let mut evs = Vec::new();
        self.node.tick(self.now, &mut record(&mut evs));
        let mut closes = Vec::new();
        for k in 0..KEYS {
            closes.extend(self.model.reconcile(k, &mut self.reached));
            let idle = self.model.peers[k]
                .as_ref()
                .is_some_and(|p| self.now.duration_since(p.last_activity) > PEER_IDLE);
            if idle {
                self.reached.idle_forgotten += 1;
                closes.extend(self.model.forget(k));
            }
        }
        let what = format!("tick at {:?}: {evs:?}", self.now - self.t0);
        self.closes_match(&evs, &closes, &what);
        for e in &evs {
            match e {
                Ev::Close(_) => {}
                Ev::Peer(to, _) => assert!(
                    self.model
                        .peers
                        .iter()
                        .flatten()
                        .any(|p| p.endpoint == Some(*to)),
                    "timers sent to {to}, no tunnel's endpoint: {what}"
                ),
                other => panic!("timers do not forward: {other:?}: {what}"),
            }
        }
        self.deliver(&evs, None);
    }

    fn closes_match(&mut self, evs: &[Ev], closes: &[SessionSlot], what: &str) {
        let mut closed: Vec<SessionSlot> = evs
            .iter()
            .filter_map(|e| match e {
                Ev::Close(f) => Some(*f),
                _ => None,
            })
            .collect();
        let mut closes = closes.to_vec();
        closed.sort_by_key(|f| f.to_u64());
        closes.sort_by_key(|f| f.to_u64());
        assert_eq!(closed, closes, "flows closed: {what}");
        self.closed.extend(closed);
    }

    /// Client `k` decrypted a packet from the node: it must be the exit's reply due to it.
    fn read_reply(&mut self, k: usize, p: &[u8]) {
        let (fl, payload) = self
            .pending_reply
            .take()
            .unwrap_or_else(|| panic!("client {k} read a packet nobody sent it: {p:?}"));
        assert_eq!(fl.k, k, "another client read the reply");
        let (src, dst, a, b) =
            crate::inner::classify(p).expect("an exit's reply arrives as IP/UDP");
        assert_eq!(
            (src, dst),
            (fl.dst, fl.src),
            "from the exit to the inner source"
        );
        assert_eq!(&p[a..b], &payload[..], "the exit's payload");
        self.reached.exit_replies_read += 1;
    }

    /// What the node holds equals the model's: tunnels, their endpoints, flows.
    fn check_state(&self) {
        let stats = self.node.stats();
        let tunnels = self.model.peers.iter().flatten().count() as u64;
        assert_eq!(stats.peers, tunnels, "tunnels");
        assert_eq!(stats.flows, self.model.flows.len() as u64, "flows");
        for status in self.node.peer_statuses(0) {
            let k = (0..KEYS)
                .find(|&k| client_key(k) == status.public_key)
                .expect("a tunnel for one of the clients");
            assert!(k < PROVISIONABLE, "a tunnel for a key never provisioned");
            let p = self.model.peers[k]
                .as_ref()
                .expect("a tunnel the model has");
            assert_eq!(status.endpoint, p.endpoint, "peer {k}'s endpoint");
        }
    }
}

impl Model {
    /// Whether the node must take a datagram as Z-HOP's.
    fn claims(&self, from: SocketAddr, bytes: &[u8], origin: &Origin) -> bool {
        if self.owner.contains_key(&from) {
            return true;
        }
        match crate::wire::classify(bytes) {
            Ok(1) => matches!(origin, Origin::Init { .. } | Origin::Junk),
            Ok(4) => {
                let index = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
                self.numbered(index >> 8).is_some()
            }
            _ => false,
        }
    }

    fn numbered(&self, number: u32) -> Option<usize> {
        (0..KEYS).find(|&k| {
            self.peers[k]
                .as_ref()
                .is_some_and(|p| p.number == Some(number))
        })
    }

    /// Under handshake load after taking this initiation from the budget?
    fn under_load(&mut self, now: Instant, t0: Instant) -> bool {
        let now_ns = now.duration_since(t0).as_nanos() as u64;
        let cap = HANDSHAKE_BURST * HANDSHAKE_COST_NS;
        self.credit = (self.credit + (now_ns - self.last_ns)).min(cap);
        self.last_ns = now_ns;
        if self.credit >= HANDSHAKE_COST_NS {
            self.credit -= HANDSHAKE_COST_NS;
            return self.load_until.is_some_and(|t| now < t);
        }
        self.load_until = Some(now + LOAD_HOLD);
        true
    }

    /// Checks tunnel `k` against the table once after each swap: gone if its peer is, its
    /// flows to exits no longer allowed closed. Returns the flows closed.
    fn reconcile(&mut self, k: usize, reached: &mut Reached) -> Vec<SessionSlot> {
        let Some(p) = &mut self.peers[k] else {
            return Vec::new();
        };
        if p.epoch == self.epoch {
            return Vec::new();
        }
        p.epoch = self.epoch;
        if !self.provisioning.peer(k) {
            reached.removed_by_table += 1;
            return self.forget(k);
        }
        let (prov, flows) = (self.provisioning, &mut self.flows);
        let mut closes = Vec::new();
        p.flows.retain(|f| {
            let keep = prov.exit_allowed(k, flows[f].dst);
            if !keep {
                flows.remove(f);
                closes.push(*f);
            }
            keep
        });
        reached.flows_closed_by_table += closes.len() as u64;
        closes
    }

    /// Forgets tunnel `k`; returns its flows, all closed.
    fn forget(&mut self, k: usize) -> Vec<SessionSlot> {
        let Some(p) = self.peers[k].take() else {
            return Vec::new();
        };
        if let Some(e) = p.endpoint {
            if self.owner.get(&e) == Some(&k) {
                self.owner.remove(&e);
            }
        }
        for f in &p.flows {
            self.flows.remove(f);
        }
        p.flows
    }

    /// An authenticated packet from `from`: the endpoint moves there, the address is
    /// tunnel `k`'s.
    fn learn(&mut self, k: usize, from: SocketAddr, now: Instant, reached: &mut Reached) {
        let p = self.peers[k].as_mut().expect("a tunnel");
        p.last_activity = now;
        if let Some(old) = p.endpoint.filter(|&e| e != from) {
            reached.roams += 1;
            if self.owner.get(&old) == Some(&k) {
                self.owner.remove(&old);
            }
        }
        p.endpoint = Some(from);
        self.owner.insert(from, k);
    }
}
