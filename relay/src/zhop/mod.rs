//! Z-HOP (DESIGN §4): nested multihop for provisioned peers.
//!
//! A peer keeps two WireGuard tunnels: an inner one to its exit, routed through an outer one
//! to this node. Z-HOP terminates the outer tunnel (boringtun `Tunn`, one per peer and
//! worker), takes the inner packet out of it, checks that it is UDP from the peer's allowed
//! IPs to one of its allowed exits, and sends the inner UDP payload (the still-encrypted
//! inner WireGuard packet) to that exit from a socket of its own. Replies are wrapped back
//! into IP/UDP with correct checksums, encrypted for the peer and sent to its endpoint.
//!
//! Unlike the DoubleHop router this holds keys and calls boringtun, which keeps its own
//! timers; the I/O layer owns every socket, and learns what to do from [`ZhopOut`] events.

pub mod inner;
mod role;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;

use self::inner::InnerError;
use crate::admission::{Admission, CookieSettings, HandshakeAdmission, SourceBudget};
use crate::drop_reason::DropReason;
use crate::keys::{Mac1Key, PublicKey};
use crate::ratelimit::TokenBucket;
use crate::role::{Datagram, Listener, Traffic};
use crate::slab::{SessionSlot, Slab};
use crate::table::ExitTable;
use crate::wire::{Initiation, Message, INITIATION_LEN, TRANSPORT_TYPE};

/// boringtun's timers want a call about every 100 ms.
const TIMER_TICK: Duration = Duration::from_millis(100);
/// A peer silent this long is forgotten (WireGuard drops keys after 540 s).
const PEER_IDLE: Duration = Duration::from_secs(540);
/// Outer initiations per second a worker decrypts from sources that have not proven their
/// address (boringtun's default limit, counted across all peers of a worker). Past it the
/// worker is under load and asks for cookies.
const HANDSHAKE_LIMIT: u32 = 100;
/// Initiations per second, per source, decrypted under load from a source that proved its
/// address (by our cookie, or by an authenticated packet from it), and their burst.
const PROVEN_PER_SOURCE: u32 = 20;
const PROVEN_BURST: u32 = 5;
/// Buckets of each per-source limiter (fixed: a flood from many sources costs no memory).
const LIMITER_BUCKETS: usize = 4_096;
/// Distinct inner flows (source, exit) one peer may have.
const MAX_FLOWS_PER_PEER: usize = 16;
/// Largest datagram handled.
const MAX_DATAGRAM: usize = 65_535;
/// Largest datagram Z-HOP emits (a [`ZhopOut::ToPeer`] or [`ZhopOut::ToExit`]): what its
/// scratch buffer holds.
pub(crate) const MAX_OUTPUT: usize = MAX_DATAGRAM + 32;

/// The node's own static key pair, for terminating outer tunnels.
#[derive(Clone)]
pub struct NodeKey {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
}

impl NodeKey {
    pub fn from_secret(bytes: [u8; 32]) -> Self {
        let secret = x25519::StaticSecret::from(bytes);
        let public = x25519::PublicKey::from(&secret);
        NodeKey { secret, public }
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.public.to_bytes())
    }
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.public_key())
    }
}

/// What [`Zhop::claim`] found in a client datagram it claims.
#[derive(Debug, Clone, Copy)]
pub enum Claim<'a> {
    /// It comes from the endpoint of one of this worker's tunnels (not parsed yet).
    Endpoint,
    /// An initiation whose mac1 is made for the node's key.
    Initiation(Initiation<'a>),
    /// A transport message naming tunnel `peer` by its index, from an address the
    /// DoubleHop router does not know (a peer that roamed).
    Transport { peer: u32 },
}

/// Something the I/O layer must do, in order.
#[derive(Debug)]
pub enum ZhopOut<'a> {
    /// Open a UDP socket connected to `exit` for `flow`.
    OpenFlow { flow: SessionSlot, exit: SocketAddr },
    /// Close the socket of `flow`.
    CloseFlow { flow: SessionSlot },
    /// Send an outer WireGuard datagram to the peer.
    ToPeer {
        listener: Listener,
        to: SocketAddr,
        bytes: &'a [u8],
    },
    /// Send an inner payload to the exit through `flow`'s socket.
    ToExit { flow: SessionSlot, bytes: &'a [u8] },
    /// Exit role: write a decrypted IP packet to the TUN device.
    ToTun { bytes: &'a [u8] },
}

/// Counters of one worker's Z-HOP state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ZhopStats {
    /// Outer handshakes answered (responses sent).
    pub outer_handshakes: u64,
    /// Cookie replies sent because the worker was under handshake load.
    pub cookie_replies: u64,
    /// Initiations decrypted under load because their mac2 carried our cookie.
    pub cookie_proven: u64,
    pub inner_to_exit: Traffic,
    pub exit_to_inner: Traffic,
    pub peers: u64,
    pub flows: u64,
}

/// A tunnel of one worker, as `wg show` tells of a peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub public_key: PublicKey,
    pub worker: usize,
    /// Where the peer was last seen, authenticated.
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the latest completed handshake, if one completed.
    pub latest_handshake_secs_ago: Option<u64>,
    /// Bytes received from and sent to the peer through its tunnel (boringtun's count).
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

struct ZPeer {
    key: PublicKey,
    tunn: Box<Tunn>,
    /// Where the peer was last seen, authenticated, and the listener it used.
    endpoint: Option<(Listener, SocketAddr)>,
    last_activity: Instant,
    flows: Vec<SessionSlot>,
    /// The [`Zhop::table_epoch`] this peer was last checked against the table at.
    epoch: u64,
    /// Entered around boringtun's calls that may log (its timers, handshakes), so that its
    /// warnings name the peer (by public key; nothing secret). Made once per tunnel: a
    /// span entered costs no allocation, a span made per call would.
    span: tracing::Span,
}

struct Flow {
    peer: u32,
    /// The peer's inner address (its inner WireGuard interface's endpoint).
    inner: SocketAddr,
    exit: SocketAddr,
}

/// One worker's Z-HOP state.
pub struct Zhop {
    key: Option<(NodeKey, Mac1Key)>,
    /// Given to every `Tunn` so that boringtun never challenges on its own: the admission
    /// below has already run, with our cookies, before any DH. It still checks mac1.
    limiter: Arc<RateLimiter>,
    /// Admission of outer initiations, before the DH that decrypting one costs
    /// ([`Zhop::admit`]).
    handshake_budget: TokenBucket,
    /// The budgets of proven sources, the cookie challenge and the load mark.
    admission: HandshakeAdmission,
    table: Arc<ExitTable>,
    /// Counts the tables taken. A peer checked at an older epoch is checked again (still
    /// provisioned? flows still allowed?) before anything of its is handled, and by the
    /// timer walk; so a swap is one pointer store here, however many peers there are.
    table_epoch: u64,
    /// Peers by the index their `Tunn` was created with.
    peers: Slab<ZPeer>,
    by_key: HashMap<PublicKey, u32>,
    by_addr: HashMap<SocketAddr, u32>,
    flows: Slab<Flow>,
    by_tuple: HashMap<(u32, SocketAddr, SocketAddr), SessionSlot>,
    buf: Vec<u8>,
    ip: Vec<u8>,
    last_tick: Instant,
    /// The next peer whose timers run: [`Zhop::tick`] walks the peers a share at a time.
    timer_cursor: u32,
    /// Timer visits owed, in peer-nanoseconds (a visit costs [`TIMER_TICK`]'s nanoseconds).
    timer_credit: u128,
    stats: ZhopStats,
    /// What Z-HOP refused, by reason ([`DropReason::index`]).
    drops: [u64; DropReason::COUNT],
    /// Exit role: the worker this is (`Some` when the node has a TUN device), recorded in
    /// [`crate::table::Peer::owner`] for the peers whose tunnels it holds.
    exit_worker: Option<usize>,
}

impl std::fmt::Debug for Zhop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zhop")
            .field("key", &self.key.as_ref().map(|k| k.0.public_key()))
            .field("peers", &self.by_key.len())
            .field("flows", &self.by_tuple.len())
            .finish()
    }
}

impl Zhop {
    /// Z-HOP with the node's key, or disabled (`None`): then nothing is ever claimed.
    /// Cookies derive from the node's cookie seed (workers sharing it accept each other's
    /// cookies, the DoubleHop router's too), and their replies have the operator's budget
    /// per second (`[limits] cookie_replies_per_second`, as DoubleHop's), which bounds the
    /// work and the bytes sent to unproven addresses a flood can cost once the worker is
    /// under load.
    pub fn new(
        key: Option<NodeKey>,
        table: Arc<ExitTable>,
        cookies: CookieSettings,
        now: Instant,
    ) -> Self {
        let public = key
            .as_ref()
            .map_or(x25519::PublicKey::from([0u8; 32]), |k| k.public);
        static WORKERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        // Apart from the routers' salts (which count from 0), so no two jars share a nonce.
        let salt = (1 << 63) | WORKERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let proven = SourceBudget {
            per_second: PROVEN_PER_SOURCE,
            burst: PROVEN_BURST,
            buckets: LIMITER_BUCKETS,
        };
        Zhop {
            limiter: Arc::new(RateLimiter::new(&public, u64::MAX)),
            handshake_budget: TokenBucket::new(HANDSHAKE_LIMIT, HANDSHAKE_LIMIT, now),
            admission: HandshakeAdmission::new(cookies, salt, proven, now),
            key: key.map(|k| {
                let mac1 = k.public_key().mac1_key();
                (k, mac1)
            }),
            table,
            table_epoch: 0,
            peers: Slab::default(),
            by_key: HashMap::new(),
            by_addr: HashMap::new(),
            flows: Slab::default(),
            by_tuple: HashMap::new(),
            buf: vec![0; MAX_OUTPUT],
            ip: Vec::with_capacity(MAX_DATAGRAM),
            last_tick: now,
            timer_cursor: 0,
            timer_credit: 0,
            stats: ZhopStats::default(),
            drops: [0; DropReason::COUNT],
            exit_worker: None,
        }
    }

    /// Turns the Exit role on for worker `worker`: decrypted packets that are not Z-HOP
    /// traffic to an allowed exit go to the TUN device ([`ZhopOut::ToTun`]) when their
    /// source is inside the peer's allowed IPs.
    pub fn enable_exit(&mut self, worker: usize) {
        self.exit_worker = Some(worker);
    }

    /// Every tunnel this worker holds, as `wg show` tells of its peers.
    pub fn peer_statuses(&self, worker: usize) -> Vec<PeerStatus> {
        self.by_key
            .values()
            .filter_map(|&i| self.peers.at(i))
            .map(|(_, p)| {
                let (since, tx, rx, _, _) = p.tunn.stats();
                PeerStatus {
                    public_key: p.key,
                    worker,
                    endpoint: p.endpoint.map(|e| e.1),
                    latest_handshake_secs_ago: since.map(|d| d.as_secs()),
                    rx_bytes: rx as u64,
                    tx_bytes: tx as u64,
                }
            })
            .collect()
    }

    pub fn stats(&self) -> ZhopStats {
        let mut s = self.stats.clone();
        s.peers = self.by_key.len() as u64;
        s.flows = self.by_tuple.len() as u64;
        s
    }

    /// Whether this datagram from a client is Z-HOP's: an initiation addressed (by mac1)
    /// to the node, anything from an address with an outer tunnel, or — only from an
    /// address the DoubleHop router does not know (`doublehop_client`) — a transport
    /// message naming one of this worker's tunnels by index (a peer that roamed). Indices
    /// chosen by exits are random, so a DoubleHop client's index may look like ours.
    ///
    /// Every client datagram of the worker passes here first, so the address lookups are
    /// made only when they can change the answer: none while the worker has no outer
    /// tunnel, and `doublehop_client` is asked only of a transport naming one of ours.
    pub fn claims(
        &self,
        from: SocketAddr,
        packet: &[u8],
        doublehop_client: impl FnOnce() -> bool,
    ) -> bool {
        self.claim(from, packet, doublehop_client).is_some()
    }

    /// [`Zhop::claims`], returning what it found for [`Zhop::handle_claimed`], so that a
    /// datagram is parsed, and an initiation's mac1 checked, once.
    pub fn claim<'a>(
        &self,
        from: SocketAddr,
        packet: &'a [u8],
        doublehop_client: impl FnOnce() -> bool,
    ) -> Option<Claim<'a>> {
        self.claim_datagram(&Datagram::parse(from, packet), doublehop_client)
    }

    /// [`Zhop::claim`] for a datagram the worker parsed.
    fn claim_datagram<'a>(
        &self,
        dg: &Datagram<'a>,
        doublehop_client: impl FnOnce() -> bool,
    ) -> Option<Claim<'a>> {
        let (_, mac1) = self.key.as_ref()?;
        if self.knows_endpoint(dg.from) {
            return Some(Claim::Endpoint);
        }
        match dg.msg {
            Ok(Message::Initiation(init)) if mac1.verify(init.mac1_input(), init.mac1()) => {
                Some(Claim::Initiation(init))
            }
            Ok(Message::Transport(t)) => {
                let peer = self.peer_by_index(t.receiver_index())?;
                (!doublehop_client()).then_some(Claim::Transport { peer })
            }
            _ => None,
        }
    }

    /// Whether `from` is the endpoint of one of this worker's tunnels; no lookup while it
    /// has none.
    fn knows_endpoint(&self, from: SocketAddr) -> bool {
        !self.by_addr.is_empty() && self.by_addr.contains_key(&from)
    }

    fn peer_by_index(&self, receiver_index: u32) -> Option<u32> {
        // Our tunnels' indices are `peer << 8 | session` (boringtun's scheme, with the peer
        // number we gave `Tunn::new`).
        let peer = receiver_index >> 8;
        self.peers.at(peer).map(|_| peer)
    }

    /// Handles a datagram Z-HOP [`claims`](Zhop::claims). `out` is called for each thing to
    /// do, in order.
    pub fn handle_client(
        &mut self,
        now: Instant,
        listener: Listener,
        from: SocketAddr,
        packet: &[u8],
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        let msg = Message::parse(packet)?;
        self.handle_message(now, listener, from, packet, msg, false, out)
    }

    /// Handles a datagram as [`Zhop::handle_client`] does, with what [`Zhop::claim`] found
    /// (`claim`) rather than looking again.
    pub fn handle_claimed(
        &mut self,
        now: Instant,
        listener: Listener,
        from: SocketAddr,
        packet: &[u8],
        claim: Claim<'_>,
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        self.handle_claim(now, listener, &Datagram::parse(from, packet), claim, out)
    }

    /// Handles a datagram the worker parsed (`dg`) with what [`Zhop::claim`] found.
    fn handle_claim(
        &mut self,
        now: Instant,
        listener: Listener,
        dg: &Datagram<'_>,
        claim: Claim<'_>,
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        let (from, packet) = (dg.from, dg.bytes);
        match claim {
            Claim::Endpoint => {
                let msg = dg.msg?;
                self.handle_message(now, listener, from, packet, msg, false, out)
            }
            Claim::Initiation(init) => {
                let msg = Message::Initiation(init);
                self.handle_message(now, listener, from, packet, msg, true, out)
            }
            Claim::Transport { peer } => self.decapsulate(now, listener, from, packet, peer, out),
        }
    }

    /// Handles `msg`, parsed from `packet`; `mac1_checked`: an initiation's mac1 was
    /// found to be for the node's key already.
    #[allow(clippy::too_many_arguments)]
    fn handle_message(
        &mut self,
        now: Instant,
        listener: Listener,
        from: SocketAddr,
        packet: &[u8],
        msg: Message<'_>,
        mac1_checked: bool,
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        let peer = match msg {
            Message::Initiation(init) => {
                if !self.admit(now, listener, from, &init, mac1_checked, out)? {
                    return Err(DropReason::CookieChallenge);
                }
                self.peer_for_initiation(packet, now)?
            }
            // The receiver index names the session (the source address is not
            // authenticated): two tunnels may have been seen at one address, as when a
            // replayed initiation moved a forgotten peer to another peer's address.
            Message::Transport(t) => self
                .peer_by_index(t.receiver_index())
                .or_else(|| self.by_addr.get(&from).copied())
                .ok_or(DropReason::UnknownClient)?,
            _ => *self.by_addr.get(&from).ok_or(DropReason::UnknownClient)?,
        };
        self.decapsulate(now, listener, from, packet, peer, out)
    }

    /// Decrypts `packet` from `peer`'s tunnel and carries out what comes of it.
    fn decapsulate(
        &mut self,
        now: Instant,
        listener: Listener,
        from: SocketAddr,
        packet: &[u8],
        peer: u32,
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        if !self.check_peer(peer, out) {
            return Err(DropReason::UnknownPeer);
        }
        let kind = packet[0];
        let (_, p) = self
            .peers
            .at_mut(peer)
            .expect("peer numbers in maps name live peers");
        // Transport packets skip the span: boringtun logs nothing for them above trace.
        let _peer = (kind != TRANSPORT_TYPE).then(|| p.span.enter());
        let r = p.tunn.decapsulate(Some(from.ip()), packet, &mut self.buf);
        drop(_peer);
        match r {
            TunnResult::WriteToNetwork(reply) => {
                let len = reply.len();
                if kind == 1 {
                    self.stats.outer_handshakes += 1;
                }
                self.learn(peer, listener, from, now);
                out(ZhopOut::ToPeer {
                    listener,
                    to: from,
                    bytes: &self.buf[..len],
                });
                self.flush_queued(peer, out);
                Ok(())
            }
            TunnResult::WriteToTunnelV4(ip, _) | TunnResult::WriteToTunnelV6(ip, _) => {
                let len = ip.len();
                self.learn(peer, listener, from, now);
                self.forward_inner(peer, len, out)
            }
            TunnResult::Done => {
                self.learn(peer, listener, from, now);
                Ok(())
            }
            TunnResult::Err(e) => {
                tracing::trace!(error = ?e, %from, "outer packet refused");
                Err(DropReason::OuterRejected)
            }
        }
    }

    /// Whether an outer initiation may be decrypted (a DH, which a flood must not get for
    /// free). Cheap checks only: mac1, then budgets. Not under load, any source within the
    /// worker's budget is admitted (boringtun's rule: [`HANDSHAKE_LIMIT`] a second). Under
    /// load only a source that proved its address is, within a per-source budget: by a mac2
    /// made with our cookie, or by an authenticated packet already received from it (a
    /// peer's rekey is not challenged). Anyone else gets a cookie reply, keyed by the
    /// node's public key (WireGuard paper §5.4.7), and `Ok(false)`; a real client retries
    /// with mac2 after REKEY_TIMEOUT, a spoofed source never sees the cookie.
    fn admit(
        &mut self,
        now: Instant,
        listener: Listener,
        from: SocketAddr,
        init: &Initiation<'_>,
        mac1_checked: bool,
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<bool, DropReason> {
        let Some((key, mac1)) = &self.key else {
            return Err(DropReason::UnknownPeer);
        };
        if !mac1_checked && !mac1.verify(init.mac1_input(), init.mac1()) {
            return Err(DropReason::OuterRejected);
        }
        let node_public = key.public_key();
        let open = !self.under_load(now);
        let verified = !open && self.by_addr.contains_key(&from);
        match self.admission.admit(now, from, init, open, verified)? {
            Admission::Admitted => return Ok(true),
            Admission::CookieProven => {
                self.stats.cookie_proven += 1;
                return Ok(true);
            }
            Admission::Challenge => {}
        }
        let reply = self.admission.cookie_reply(now, from, &node_public, init);
        self.stats.cookie_replies += 1;
        // To the unauthenticated sender, no bigger than what it sent; nothing moves.
        out(ZhopOut::ToPeer {
            listener,
            to: from,
            bytes: &reply,
        });
        Ok(false)
    }

    /// Whether the worker is under handshake load: initiations arrive faster than its
    /// budget refills, or did within the last [`LOAD_HOLD`](crate::admission::LOAD_HOLD). Every initiation takes from
    /// the budget, challenged or not, so a sustained flood keeps the worker under load
    /// throughout rather than letting one initiation through each time a token refills.
    fn under_load(&mut self, now: Instant) -> bool {
        let spent = !self.handshake_budget.take(now);
        self.admission.under_load(now, spent)
    }

    /// Exit role, as a WireGuard client: creates the tunnel with `peer` (provisioned with
    /// an `endpoint`) from `listener` to that endpoint, and sends `packet` through it, which
    /// starts the handshake (boringtun queues the packet until it completes). The answer
    /// comes back to this worker: the caller is the worker `endpoint` is steered to.
    pub fn initiate_to(
        &mut self,
        now: Instant,
        peer: &PublicKey,
        listener: Listener,
        endpoint: SocketAddr,
        packet: &[u8],
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        let i = match self.by_key.get(peer) {
            Some(&i) => i,
            None => self.new_peer(*peer, now)?,
        };
        let (_, p) = self.peers.at_mut(i).ok_or(DropReason::ExitNoRoute)?;
        if p.endpoint.is_none() {
            p.endpoint = Some((listener, endpoint));
            self.by_addr.insert(endpoint, i);
        }
        self.handle_tun(now, peer, packet, out).map(drop)
    }

    /// The peer an initiation comes from (decrypting its static key), created on first use.
    fn peer_for_initiation(&mut self, packet: &[u8], now: Instant) -> Result<u32, DropReason> {
        let Some((key, _)) = &self.key else {
            return Err(DropReason::UnknownPeer);
        };
        if packet.len() != INITIATION_LEN {
            return Err(DropReason::BadLength);
        }
        let Ok(Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(packet) else {
            return Err(DropReason::OuterRejected);
        };
        let half = parse_handshake_anon(&key.secret, &key.public, &init)
            .map_err(|_| DropReason::OuterRejected)?;
        let peer_key = PublicKey(half.peer_static_public);
        if let Some(&p) = self.by_key.get(&peer_key) {
            return Ok(p);
        }
        self.new_peer(peer_key, now)
    }

    /// Creates this worker's tunnel with provisioned peer `peer_key`.
    fn new_peer(&mut self, peer_key: PublicKey, now: Instant) -> Result<u32, DropReason> {
        let Some((key, _)) = &self.key else {
            return Err(DropReason::UnknownPeer);
        };
        let spec = &self
            .table
            .peer(&peer_key)
            .ok_or(DropReason::UnknownPeer)?
            .spec;
        // The tunnel's indices are `index << 8 | n`; boringtun keeps 24 bits of `index`.
        let index = self.peers.next_index();
        if index >= 1 << 24 {
            return Err(DropReason::SessionsFull);
        }
        let tunn = Tunn::new(
            key.secret.clone(),
            x25519::PublicKey::from(peer_key.0),
            spec.preshared_key.as_ref().map(|k| k.0),
            spec.persistent_keepalive.filter(|&k| k > 0),
            index,
            Some(self.limiter.clone()),
        );
        let slot = self.peers.insert(ZPeer {
            key: peer_key,
            tunn: Box::new(tunn),
            endpoint: None,
            last_activity: now,
            flows: Vec::new(),
            epoch: self.table_epoch,
            span: tracing::error_span!("zhop_peer", peer = %peer_key),
        });
        debug_assert_eq!(slot.index, index);
        self.by_key.insert(peer_key, index);
        tracing::debug!(peer = %peer_key, "outer tunnel created");
        Ok(index)
    }

    /// WireGuard roaming: an authenticated packet moves the peer's endpoint.
    fn learn(&mut self, peer: u32, listener: Listener, from: SocketAddr, now: Instant) {
        let p = self
            .peers
            .at_mut(peer)
            .expect("peer numbers name live peers")
            .1;
        p.last_activity = now;
        if let (Some(w), Some(spec)) = (self.exit_worker, self.table.peer(&p.key)) {
            spec.set_owner(w);
        }
        if p.endpoint.map(|e| e.1) != Some(from) {
            if let Some((_, old)) = p.endpoint {
                // Only if the old address is still this tunnel's: another may have
                // authenticated from it since.
                if self.by_addr.get(&old) == Some(&peer) {
                    self.by_addr.remove(&old);
                }
            }
            p.endpoint = Some((listener, from));
        }
        // The address is this tunnel's again even if another tunnel took it meanwhile: the
        // latest authenticated packet from an address decides whose it is.
        self.by_addr.insert(from, peer);
    }

    fn flush_queued(&mut self, peer: u32, out: &mut dyn FnMut(ZhopOut<'_>)) {
        let p = self
            .peers
            .at_mut(peer)
            .expect("peer numbers name live peers")
            .1;
        let Some((listener, to)) = p.endpoint else {
            return;
        };
        let _peer = p.span.enter();
        while let TunnResult::WriteToNetwork(b) = p.tunn.decapsulate(None, &[], &mut self.buf) {
            let len = b.len();
            out(ZhopOut::ToPeer {
                listener,
                to,
                bytes: &self.buf[..len],
            });
        }
    }

    /// The decrypted inner packet is in `self.buf[..len]`.
    fn forward_inner(
        &mut self,
        peer: u32,
        len: usize,
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        let parsed = inner::parse_udp(&self.buf[..len]).map_err(|e| match e {
            InnerError::NotUdp => DropReason::InnerNotUdp,
            InnerError::Malformed | InnerError::Fragment => DropReason::InnerMalformed,
        });
        let p = self.peers.at(peer).expect("peer numbers name live peers").1;
        let allowed = self.table.peer(&p.key).ok_or(DropReason::UnknownPeer)?;
        // Z-HOP traffic is UDP to one of the peer's allowed exits; with a TUN device,
        // anything else is the Exit role's.
        let zhop = match &parsed {
            Ok(pkt) => allowed.allows(pkt.src.ip(), pkt.dst),
            Err(_) => (false, false),
        };
        if self.exit_worker.is_some() && !zhop.1 {
            return self.deliver_to_tun(peer, len, out);
        }
        let pkt = parsed?;
        let (src_ok, dst_ok) = zhop;
        if !src_ok {
            return Err(DropReason::InnerSpoofedSource);
        }
        if !dst_ok {
            return Err(DropReason::InnerForbiddenDestination);
        }
        let tuple = (peer, pkt.src, pkt.dst);
        let flow = match self.by_tuple.get(&tuple) {
            Some(&f) => f,
            None => {
                if p.flows.len() >= MAX_FLOWS_PER_PEER {
                    return Err(DropReason::ClientSessionLimit);
                }
                let slot = self.flows.insert(Flow {
                    peer,
                    inner: pkt.src,
                    exit: pkt.dst,
                });
                self.by_tuple.insert(tuple, slot);
                self.peers
                    .at_mut(peer)
                    .expect("live peer")
                    .1
                    .flows
                    .push(slot);
                out(ZhopOut::OpenFlow {
                    flow: slot,
                    exit: pkt.dst,
                });
                slot
            }
        };
        self.stats.inner_to_exit.add_bytes(pkt.payload.len());
        out(ZhopOut::ToExit {
            flow,
            bytes: pkt.payload,
        });
        Ok(())
    }

    /// Exit role: the decrypted packet in `self.buf[..len]` goes to the TUN device if its
    /// source is inside the peer's allowed IPs (cryptokey routing, inbound).
    fn deliver_to_tun(
        &mut self,
        peer: u32,
        len: usize,
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        let pkt = &self.buf[..len];
        let src = inner::ip_source(pkt).ok_or(DropReason::InnerMalformed)?;
        let p = self.peers.at(peer).expect("peer numbers name live peers").1;
        let allowed = self.table.peer(&p.key).ok_or(DropReason::UnknownPeer)?;
        if !allowed.spec.allowed_ips.iter().any(|n| n.contains(&src)) {
            return Err(DropReason::ExitSourceNotAllowed);
        }
        out(ZhopOut::ToTun { bytes: pkt });
        Ok(())
    }

    /// Exit role: encrypts `packet`, read from the TUN device, for `peer` and sends it to
    /// the peer's endpoint. `Ok(false)` when this worker holds no tunnel with the peer.
    pub fn handle_tun(
        &mut self,
        now: Instant,
        peer: &PublicKey,
        packet: &[u8],
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<bool, DropReason> {
        let Some(&i) = self.by_key.get(peer) else {
            return Ok(false);
        };
        if !self.check_peer(i, out) {
            return Err(DropReason::ExitNoRoute);
        }
        let (_, p) = self.peers.at_mut(i).ok_or(DropReason::ExitNoRoute)?;
        let Some((listener, to)) = p.endpoint else {
            return Err(DropReason::NoSession);
        };
        p.last_activity = now;
        match p.tunn.encapsulate(packet, &mut self.buf) {
            TunnResult::WriteToNetwork(b) => {
                let len = b.len();
                out(ZhopOut::ToPeer {
                    listener,
                    to,
                    bytes: &self.buf[..len],
                });
                Ok(true)
            }
            // Queued behind a handshake boringtun started; it goes out when that completes.
            TunnResult::Done => Ok(true),
            _ => Err(DropReason::OuterRejected),
        }
    }

    /// A datagram from an exit arrived on `flow`'s socket: wrap it and send it to its peer.
    pub fn handle_exit(
        &mut self,
        now: Instant,
        flow: SessionSlot,
        payload: &[u8],
        out: &mut dyn FnMut(ZhopOut<'_>),
    ) -> Result<(), DropReason> {
        let peer = self.flows.get(flow).ok_or(DropReason::NoSession)?.peer;
        // The check may close this flow (its exit no longer allowed) or its whole peer.
        self.check_peer(peer, out);
        let entry = self.flows.get(flow).ok_or(DropReason::NoSession)?;
        let (src, dst) = (entry.exit, entry.inner);
        if payload.len() > MAX_DATAGRAM - 48 {
            return Err(DropReason::BadLength);
        }
        inner::build_udp(&mut self.ip, src, dst, payload);
        let (_, p) = self.peers.at_mut(peer).ok_or(DropReason::NoSession)?;
        let (listener, to) = p.endpoint.ok_or(DropReason::NoSession)?;
        p.last_activity = now;
        match p.tunn.encapsulate(&self.ip, &mut self.buf) {
            TunnResult::WriteToNetwork(b) => {
                let len = b.len();
                self.stats.exit_to_inner.add_bytes(payload.len());
                out(ZhopOut::ToPeer {
                    listener,
                    to,
                    bytes: &self.buf[..len],
                });
                Ok(())
            }
            // Queued behind a handshake boringtun started; it goes out when that completes.
            TunnResult::Done => Ok(()),
            _ => Err(DropReason::OuterRejected),
        }
    }

    /// Runs boringtun's timers (each peer's about every 100 ms) and forgets idle peers.
    ///
    /// The walk is spread over the calls: a call visits the share of the peers that the
    /// time since the previous call is of `TIMER_TICK`, so a worker with many peers never
    /// stalls its traffic for a walk over all of them at once (a call after 100 ms or more
    /// of sleep still visits everyone).
    pub fn tick(&mut self, now: Instant, out: &mut dyn FnMut(ZhopOut<'_>)) {
        let bound = self.peers.index_bound();
        let tick_ns = TIMER_TICK.as_nanos();
        let owed = u128::from(bound) * now.duration_since(self.last_tick).as_nanos();
        self.last_tick = now;
        self.timer_credit = (self.timer_credit + owed).min(u128::from(bound) * tick_ns);
        let visits = (self.timer_credit / tick_ns) as u32;
        self.timer_credit -= u128::from(visits) * tick_ns;
        for _ in 0..visits {
            let i = self.timer_cursor % bound;
            self.timer_cursor = (i + 1) % bound;
            if !self.check_peer(i, out) {
                continue;
            }
            let Some((_, p)) = self.peers.at_mut(i) else {
                continue;
            };
            if now.duration_since(p.last_activity) > PEER_IDLE {
                self.remove_peer(i, out);
                continue;
            }
            let timers = p.span.in_scope(|| p.tunn.update_timers(&mut self.buf));
            if let TunnResult::WriteToNetwork(b) = timers {
                let len = b.len();
                if let Some((listener, to)) = p.endpoint {
                    out(ZhopOut::ToPeer {
                        listener,
                        to,
                        bytes: &self.buf[..len],
                    });
                }
            }
        }
    }

    /// When [`Zhop::tick`] next has timers to run: `TIMER_TICK` after the last call while
    /// there are peers (a worker that sleeps that long has every peer visited on waking),
    /// never without them.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.by_key.is_empty()).then(|| self.last_tick + TIMER_TICK)
    }

    /// Takes a new table. Nothing else happens here: each peer is checked against it
    /// (`Zhop::check_peer`) before its next packet either way is handled, and by the
    /// timer walk within about 100 ms if it is idle. A peer no longer provisioned loses
    /// its tunnel and flows then; a flow to an exit the peer may no longer reach is closed.
    pub fn set_table(&mut self, table: Arc<ExitTable>) {
        self.table = table;
        self.table_epoch += 1;
    }

    /// Checks `peer` against the current table if it was not yet: removes it if it is no
    /// longer provisioned (returns false) and closes its flows to exits it may no longer
    /// reach.
    fn check_peer(&mut self, peer: u32, out: &mut dyn FnMut(ZhopOut<'_>)) -> bool {
        let Some((_, p)) = self.peers.at_mut(peer) else {
            return false;
        };
        if p.epoch == self.table_epoch {
            return true;
        }
        p.epoch = self.table_epoch;
        let Some(allowed) = self.table.peer(&p.key) else {
            tracing::info!(peer = %p.key, "peer removed: outer tunnel closed");
            self.remove_peer(peer, out);
            return false;
        };
        let (flows, by_tuple) = (&mut self.flows, &mut self.by_tuple);
        p.flows.retain(|&f| {
            let stale = flows
                .get(f)
                .is_some_and(|fl| !allowed.exit_endpoints.contains(&fl.exit));
            if stale {
                forget_flow(flows, by_tuple, f, out);
            }
            !stale
        });
        true
    }

    fn remove_peer(&mut self, peer: u32, out: &mut dyn FnMut(ZhopOut<'_>)) {
        let Some((slot, _)) = self.peers.at(peer) else {
            return;
        };
        let Some(p) = self.peers.remove(slot) else {
            return;
        };
        self.by_key.remove(&p.key);
        if let (Some(w), Some(spec)) = (self.exit_worker, self.table.peer(&p.key)) {
            let _ = spec.owner.compare_exchange(
                w as u32,
                crate::table::NO_OWNER,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        if let Some((_, addr)) = p.endpoint {
            if self.by_addr.get(&addr) == Some(&peer) {
                self.by_addr.remove(&addr);
            }
        }
        for f in p.flows {
            forget_flow(&mut self.flows, &mut self.by_tuple, f, out);
        }
    }
}

/// Forgets `flow` and tells the I/O layer to close its socket. The caller drops it from its
/// peer's list.
fn forget_flow(
    flows: &mut Slab<Flow>,
    by_tuple: &mut HashMap<(u32, SocketAddr, SocketAddr), SessionSlot>,
    flow: SessionSlot,
    out: &mut dyn FnMut(ZhopOut<'_>),
) {
    if let Some(f) = flows.remove(flow) {
        by_tuple.remove(&(f.peer, f.inner, f.exit));
        out(ZhopOut::CloseFlow { flow });
    }
}

#[cfg(test)]
mod tests;
