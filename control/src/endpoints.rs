//! Real WireGuard endpoints (boringtun's `Tunn`) over real UDP sockets, for the demo and
//! for the integration tests: clients and exits that know nothing about the relay.
//!
//! A [`WgNode`] is one UDP socket with one static key and any number of peers, as a
//! WireGuard interface is. Incoming packets are matched to a peer by source address, and
//! an initiation from a new address by the static key inside it, exactly as a WireGuard
//! device does; endpoints move only after an authenticated packet.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use wraithgate_relay::inner;

/// Largest datagram an endpoint handles.
const MAX_PACKET: usize = 65_536;

/// A static key pair.
#[derive(Clone)]
pub struct KeyPair {
    pub secret: StaticSecret,
    pub public: PublicKey,
}

impl KeyPair {
    pub fn generate() -> Self {
        let secret = StaticSecret::random_from_rng(rand::thread_rng());
        let public = PublicKey::from(&secret);
        KeyPair { secret, public }
    }

    /// The public key as the relay's tables hold it.
    pub fn relay_key(&self) -> wraithgate_relay::PublicKey {
        wraithgate_relay::PublicKey(self.public.to_bytes())
    }
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair({})", self.relay_key())
    }
}

/// Options for one peer of a node.
#[derive(Clone, Default)]
pub struct PeerOptions {
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    /// A shared rate limiter; one with limit 0 makes the node answer every initiation
    /// with a cookie reply first (as a loaded WireGuard responder does).
    pub rate_limiter: Option<Arc<RateLimiter>>,
}

impl std::fmt::Debug for PeerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerOptions")
            .field("endpoint", &self.endpoint)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("rate_limiter", &self.rate_limiter.is_some())
            .finish()
    }
}

struct Peer {
    tunn: Tunn,
    /// The index given to `Tunn::new`; boringtun's session indices are `index << 8 | n`.
    index: u32,
    public: [u8; 32],
    endpoint: Option<SocketAddr>,
    handshakes_completed: u64,
}

/// Something a node received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A decrypted IP packet from peer `peer`.
    Packet { peer: usize, data: Vec<u8> },
    /// A WireGuard control message was handled (handshake, cookie, keepalive).
    Control { peer: usize },
    /// A datagram no peer would accept.
    Rejected { from: SocketAddr },
}

/// One WireGuard interface: a socket, a key pair and its peers.
pub struct WgNode {
    socket: UdpSocket,
    keys: KeyPair,
    peers: Vec<Peer>,
    by_addr: HashMap<SocketAddr, usize>,
    buf: Vec<u8>,
    out: Vec<u8>,
    next_index: u32,
    last_sent_type: Option<u8>,
    /// Datagrams sent, for tests that count.
    pub sent_datagrams: u64,
}

impl std::fmt::Debug for WgNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgNode")
            .field("local", &self.socket.local_addr().ok())
            .field("key", &self.keys)
            .field("peers", &self.peers.len())
            .finish()
    }
}

impl WgNode {
    pub fn bind(addr: SocketAddr, keys: KeyPair) -> io::Result<Self> {
        let socket = UdpSocket::bind(addr)?;
        // Room for bursts: a descheduled endpoint should not lose what queued meanwhile.
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_recv_buffer_size(4 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        Ok(WgNode {
            socket,
            keys,
            peers: Vec::new(),
            by_addr: HashMap::new(),
            buf: vec![0; MAX_PACKET],
            out: vec![0; MAX_PACKET],
            next_index: rand::random::<u32>() >> 8,
            last_sent_type: None,
            sent_datagrams: 0,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket
            .local_addr()
            .expect("bound socket has an address")
    }

    pub fn keys(&self) -> &KeyPair {
        &self.keys
    }

    /// Adds a peer; returns its number.
    pub fn add_peer(&mut self, public: PublicKey, opts: PeerOptions) -> usize {
        self.next_index = (self.next_index + 1) & 0x00FF_FFFF;
        let tunn = Tunn::new(
            self.keys.secret.clone(),
            public,
            None,
            opts.persistent_keepalive,
            self.next_index,
            opts.rate_limiter,
        );
        self.peers.push(Peer {
            tunn,
            index: self.next_index,
            public: public.to_bytes(),
            endpoint: opts.endpoint,
            handshakes_completed: 0,
        });
        let id = self.peers.len() - 1;
        if let Some(e) = opts.endpoint {
            self.by_addr.insert(e, id);
        }
        id
    }

    /// Where the node currently sends to `peer`.
    pub fn endpoint(&self, peer: usize) -> Option<SocketAddr> {
        self.peers[peer].endpoint
    }

    /// Points `peer` at a new endpoint (an operator's `wg set ... endpoint`).
    pub fn set_endpoint(&mut self, peer: usize, endpoint: SocketAddr) {
        self.peers[peer].endpoint = Some(endpoint);
        self.by_addr.insert(endpoint, peer);
    }

    /// Handshakes completed with `peer` as seen by boringtun (a new session each time).
    pub fn handshakes(&self, peer: usize) -> u64 {
        self.peers[peer].handshakes_completed
    }

    /// Moves the node to a new socket (a client roaming to a new address).
    pub fn rebind(&mut self, addr: SocketAddr) -> io::Result<()> {
        self.socket = UdpSocket::bind(addr)?;
        Ok(())
    }

    fn send_to(&mut self, peer: usize, len: usize) -> io::Result<()> {
        let Some(dst) = self.peers[peer].endpoint else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "peer has no endpoint yet",
            ));
        };
        self.socket.send_to(&self.out[..len], dst)?;
        self.sent_datagrams += 1;
        self.last_sent_type = self.out.first().copied();
        Ok(())
    }

    /// Starts a handshake with `peer` now (forcing one even if a session exists, as a
    /// rekey does).
    pub fn initiate(&mut self, peer: usize) -> io::Result<()> {
        let r = self.peers[peer]
            .tunn
            .format_handshake_initiation(&mut self.out, true);
        match r {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                self.send_to(peer, len)
            }
            TunnResult::Err(e) => Err(io::Error::other(format!("{e:?}"))),
            _ => Ok(()),
        }
    }

    /// Encrypts an IP packet to `peer` and sends it (starting a handshake first if there
    /// is no session; boringtun queues the packet until it completes).
    pub fn send_ip(&mut self, peer: usize, ip: &[u8]) -> io::Result<()> {
        let r = self.peers[peer].tunn.encapsulate(ip, &mut self.out);
        match r {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                self.send_to(peer, len)
            }
            TunnResult::Err(e) => Err(io::Error::other(format!("{e:?}"))),
            _ => Ok(()),
        }
    }

    /// Encrypts an IP packet to `peer` without sending it: the transport message, for a
    /// caller that sends it itself (a GSO train, say). `None` without a session.
    pub fn seal(&mut self, peer: usize, ip: &[u8]) -> Option<Vec<u8>> {
        match self.peers[peer].tunn.encapsulate(ip, &mut self.out) {
            TunnResult::WriteToNetwork(p) if p.first() == Some(&4) => Some(p.to_vec()),
            _ => None,
        }
    }

    /// Runs boringtun's timers for every peer (retries, keepalives, rekeys).
    pub fn tick(&mut self) {
        for peer in 0..self.peers.len() {
            // update_timers yields at most one packet per call; one call per tick is what
            // a WireGuard device does.
            if let TunnResult::WriteToNetwork(p) =
                self.peers[peer].tunn.update_timers(&mut self.out)
            {
                let len = p.len();
                let _ = self.send_to(peer, len);
            }
        }
    }

    /// Receives and handles one datagram, waiting up to `timeout`. `Ok(None)` on timeout.
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Option<Received>> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_micros(1))))?;
        let (n, from) = match self.socket.recv_from(&mut self.buf) {
            Ok(r) => r,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        Ok(Some(self.handle(n, from)))
    }

    /// Receives and handles one datagram if one is waiting; never blocks.
    pub fn try_recv(&mut self) -> io::Result<Option<Received>> {
        self.socket.set_nonblocking(true)?;
        let r = self.socket.recv_from(&mut self.buf);
        self.socket.set_nonblocking(false)?;
        match r {
            Ok((n, from)) => Ok(Some(self.handle(n, from))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A second handle on the node's socket, for a thread that blocks in `recv_from` and
    /// hands datagrams to [`WgNode::handle_datagram`].
    pub fn socket_clone(&self) -> io::Result<UdpSocket> {
        self.socket.try_clone()
    }

    /// Handles a datagram received on the node's socket by someone else.
    pub fn handle_datagram(&mut self, data: &[u8], from: SocketAddr) -> Received {
        let n = data.len().min(self.buf.len());
        self.buf[..n].copy_from_slice(&data[..n]);
        self.handle(n, from)
    }

    fn handle(&mut self, n: usize, from: SocketAddr) -> Received {
        // An initiation names its peer by the static key inside; anything else is matched
        // by the address it came from.
        let peer = self
            .identify(n)
            .or_else(|| self.by_addr.get(&from).copied())
            .or_else(|| self.by_receiver_index(n));
        let Some(peer) = peer else {
            return Received::Rejected { from };
        };
        let datagram = self.buf[..n].to_vec();
        self.last_sent_type = None;
        let r = self.peers[peer]
            .tunn
            .decapsulate(Some(from.ip()), &datagram, &mut self.out);
        let result = match r {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                self.learn(peer, from, &datagram);
                let _ = self.send_to(peer, len);
                // Flush packets queued behind the handshake.
                while let TunnResult::WriteToNetwork(p) =
                    self.peers[peer].tunn.decapsulate(None, &[], &mut self.out)
                {
                    let len = p.len();
                    let _ = self.send_to(peer, len);
                }
                Received::Control { peer }
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                let data = p.to_vec();
                self.learn(peer, from, &datagram);
                Received::Packet { peer, data }
            }
            TunnResult::Done => {
                self.learn(peer, from, &datagram);
                Received::Control { peer }
            }
            TunnResult::Err(_) => Received::Rejected { from },
        };
        // A handshake completes for the initiator when a response is accepted, and for the
        // responder when it answers an initiation with a response.
        let completed = match datagram.first() {
            Some(2) => !matches!(result, Received::Rejected { .. }),
            Some(1) => self.last_sent_type == Some(2),
            _ => false,
        };
        if completed {
            self.peers[peer].handshakes_completed += 1;
        }
        result
    }

    /// The peer a response, cookie or transport message is for, by the receiver index in it:
    /// boringtun's indices are `peer_index << 8 | session`. This is how a WireGuard device
    /// finds the peer of a packet from an address it has not seen (roaming).
    fn by_receiver_index(&self, n: usize) -> Option<usize> {
        let bytes = self.buf.get(4..8).filter(|_| n >= 8 && self.buf[0] != 1)?;
        let index = u32::from_le_bytes(bytes.try_into().ok()?) >> 8;
        self.peers.iter().position(|p| p.index == index)
    }

    /// The peer an initiation comes from, by the static key it carries.
    fn identify(&self, n: usize) -> Option<usize> {
        let Ok(Packet::HandshakeInit(init)) = Tunn::parse_incoming_packet(&self.buf[..n]) else {
            return None;
        };
        let half = parse_handshake_anon(&self.keys.secret, &self.keys.public, &init).ok()?;
        self.peers
            .iter()
            .position(|p| p.public == half.peer_static_public)
    }

    /// WireGuard roaming: the endpoint follows authenticated packets.
    fn learn(&mut self, peer: usize, from: SocketAddr, datagram: &[u8]) {
        // Cookie replies are not authenticated by the peer's session; do not move for them.
        if datagram.first() == Some(&3) {
            return;
        }
        if self.peers[peer].endpoint != Some(from) {
            if let Some(old) = self.peers[peer].endpoint {
                if self.by_addr.get(&old) == Some(&peer) {
                    self.by_addr.remove(&old);
                }
            }
            self.peers[peer].endpoint = Some(from);
        }
        self.by_addr.insert(from, peer);
    }
}

/// An IPv4/UDP packet (checksums computed) carrying `payload`, as a WireGuard interface
/// would hand it to the tunnel.
pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    inner::build_udp(
        &mut p,
        SocketAddr::new(src.into(), sport),
        SocketAddr::new(dst.into(), dport),
        payload,
    );
    p
}

/// The UDP payload of an IP/UDP packet.
pub fn udp_payload(ip: &[u8]) -> Option<&[u8]> {
    inner::parse_udp(ip).ok().map(|p| p.payload)
}

/// A Z-HOP client: an inner WireGuard tunnel to an exit, carried inside an outer tunnel to
/// the relay, as a client with two interfaces (inner routed through outer) has.
pub struct ZhopClient {
    /// The outer interface; its peer 0 is the relay.
    pub outer: WgNode,
    inner: Tunn,
    /// The inner interface's own address and port, as seen inside the outer tunnel.
    pub inner_addr: SocketAddr,
    /// The exit's endpoint: where the inner tunnel's packets go.
    pub exit: SocketAddr,
    buf: Vec<u8>,
    wrapped: Vec<u8>,
}

impl std::fmt::Debug for ZhopClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZhopClient")
            .field("outer", &self.outer)
            .field("inner_addr", &self.inner_addr)
            .field("exit", &self.exit)
            .finish()
    }
}

impl ZhopClient {
    /// `outer_keys` are provisioned at the relay (whose key is `relay_public`), `inner_keys`
    /// are known to the exit.
    pub fn new(
        outer_keys: KeyPair,
        inner_keys: KeyPair,
        relay: SocketAddr,
        relay_public: PublicKey,
        exit_public: PublicKey,
        exit: SocketAddr,
        inner_addr: SocketAddr,
    ) -> io::Result<Self> {
        let mut outer = WgNode::bind(any_loopback(), outer_keys)?;
        outer.add_peer(
            relay_public,
            PeerOptions {
                endpoint: Some(relay),
                ..Default::default()
            },
        );
        let inner = Tunn::new(
            inner_keys.secret.clone(),
            exit_public,
            None,
            None,
            rand::random::<u32>() >> 8,
            None,
        );
        Ok(ZhopClient {
            outer,
            inner,
            inner_addr,
            exit,
            buf: vec![0; MAX_PACKET],
            wrapped: Vec::new(),
        })
    }

    /// Sends the inner WireGuard datagram in `buf[..len]` through the outer tunnel.
    fn send_inner_datagram(
        &mut self,
        len: usize,
        from: SocketAddr,
        to: SocketAddr,
    ) -> io::Result<()> {
        inner::build_udp(&mut self.wrapped, from, to, &self.buf[..len]);
        let wrapped = std::mem::take(&mut self.wrapped);
        let r = self.outer.send_ip(0, &wrapped);
        self.wrapped = wrapped;
        r
    }

    /// Encrypts `ip` for the exit (inner tunnel) and sends it through the outer tunnel.
    pub fn send_ip(&mut self, ip: &[u8]) -> io::Result<()> {
        let (from, to) = (self.inner_addr, self.exit);
        self.send_ip_as(ip, from, to)
    }

    /// Like [`ZhopClient::send_ip`], with the inner UDP addresses chosen by the caller
    /// (tests spoof them).
    pub fn send_ip_as(&mut self, ip: &[u8], from: SocketAddr, to: SocketAddr) -> io::Result<()> {
        match self.inner.encapsulate(ip, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                self.send_inner_datagram(len, from, to)
            }
            TunnResult::Err(e) => Err(io::Error::other(format!("{e:?}"))),
            _ => Ok(()),
        }
    }

    /// Receives what waits on the outer socket: inner plaintext as [`Received::Packet`],
    /// anything else as [`Received::Control`].
    pub fn try_recv(&mut self) -> io::Result<Option<Received>> {
        let Some(r) = self.outer.try_recv()? else {
            return Ok(None);
        };
        let Received::Packet { data, .. } = r else {
            return Ok(Some(r));
        };
        let Some(payload) = udp_payload(&data) else {
            return Ok(Some(Received::Control { peer: 0 }));
        };
        let (from, to) = (self.inner_addr, self.exit);
        match self
            .inner
            .decapsulate(Some(self.exit.ip()), payload, &mut self.buf)
        {
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                self.send_inner_datagram(len, from, to)?;
                while let TunnResult::WriteToNetwork(p) =
                    self.inner.decapsulate(None, &[], &mut self.buf)
                {
                    let len = p.len();
                    self.send_inner_datagram(len, from, to)?;
                }
                Ok(Some(Received::Control { peer: 0 }))
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                Ok(Some(Received::Packet {
                    peer: 0,
                    data: p.to_vec(),
                }))
            }
            _ => Ok(Some(Received::Control { peer: 0 })),
        }
    }

    /// Runs both tunnels' timers.
    pub fn tick(&mut self) {
        self.outer.tick();
        if let TunnResult::WriteToNetwork(p) = self.inner.update_timers(&mut self.buf) {
            let len = p.len();
            let (from, to) = (self.inner_addr, self.exit);
            let _ = self.send_inner_datagram(len, from, to);
        }
    }
}

/// Source and destination addresses inside the tunnels of the demo and the tests.
pub fn tunnel_addrs(client: u8) -> (Ipv4Addr, Ipv4Addr) {
    (
        Ipv4Addr::new(10, 66, 0, client),
        Ipv4Addr::new(10, 66, 255, 1),
    )
}

/// Loopback with port 0.
pub fn any_loopback() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wraithgate_testkit::wait_for;

    #[test]
    fn ipv4_udp_checksums_verify() {
        let p = ipv4_udp(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            1000,
            2000,
            b"hello",
        );
        assert!(inner::checksums_ok(&p));
        assert_eq!(udp_payload(&p), Some(&b"hello"[..]));
    }

    #[test]
    fn two_nodes_handshake_and_exchange_directly() {
        let (a_keys, b_keys) = (KeyPair::generate(), KeyPair::generate());
        let mut a = WgNode::bind(any_loopback(), a_keys.clone()).unwrap();
        let mut b = WgNode::bind(any_loopback(), b_keys.clone()).unwrap();
        let pa = a.add_peer(
            b_keys.public,
            PeerOptions {
                endpoint: Some(b.local_addr()),
                ..Default::default()
            },
        );
        let pb = b.add_peer(a_keys.public, PeerOptions::default());
        let (s, d) = tunnel_addrs(1);
        a.send_ip(pa, &ipv4_udp(s, d, 1, 2, b"ping")).unwrap();
        let got = wait_for(Duration::from_secs(5), || {
            // Alternate until the queued packet arrives at b.
            let _ = a.recv(Duration::from_millis(5));
            match b.recv(Duration::from_millis(5)) {
                Ok(Some(Received::Packet { peer, data })) => Some((peer, data)),
                _ => None,
            }
        })
        .expect("packet through a direct tunnel");
        assert_eq!(got.0, pb);
        assert_eq!(udp_payload(&got.1), Some(&b"ping"[..]));
        assert_eq!(b.endpoint(pb), Some(a.local_addr()));
    }
}
