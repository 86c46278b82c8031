//! The kernel's IPv6/UDP receive path as an independent judge of packets we build: a
//! wireguard-go interface in a namespace of its own, fed by an in-process boringtun peer.
//! wireguard-go writes what it decrypts into its TUN device unchanged, and the kernel then
//! delivers a UDP datagram to a bound socket only if the UDP checksum (RFC 8200 §8.1) is
//! right; a wrong one is dropped and counted as `Udp6InCsumErrors`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use wraithgate_control::endpoints::{KeyPair, PeerOptions, WgNode};

use super::wg::WgHost;
use crate::netns::{Netns, SuiteLock};

/// The address the interface holds; packets are built to it.
pub const SINK_V6: &str = "fd00:7::2";
/// Sources the boringtun peer may use inside the tunnel.
pub const PEER_V6_NET: &str = "fd00:7::/64";
const LISTEN_PORT: u16 = 51830;

/// A wireguard-go interface with [`SINK_V6`], and the key of the peer that may send to it.
#[derive(Debug)]
pub struct KernelSink {
    host: WgHost,
    peer: KeyPair,
    // Dropped last: the namespace goes after the interface's process, then the lock.
    ns: Arc<Netns>,
    _lock: SuiteLock,
}

impl KernelSink {
    /// The sink, or `None` (said loudly) where the suite cannot run and may be skipped.
    pub fn start_or_skip(test: &str) -> Option<KernelSink> {
        if !super::prerequisites_or_skip(test) {
            return None;
        }
        match KernelSink::start(test) {
            Ok(s) => Some(s),
            Err(e) => panic!("{test}: building the sink failed: {e:#}"),
        }
    }

    fn start(test: &str) -> Result<KernelSink> {
        let (lock, _, dir) = super::begin(test)?;
        let ns = Arc::new(Netns::create("v6")?);
        let host = WgHost::start(
            ns.clone(),
            "wgi-v6",
            &dir,
            "10.93.0.2".parse()?,
            "127.0.0.1".parse()?,
            LISTEN_PORT,
        )?;
        host.up(24)?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{SINK_V6}/64"),
            "dev",
            &host.ifname,
            "nodad",
        ])?;
        let peer = KeyPair::generate();
        host.set_peer(&peer.relay_key().to_base64(), None, PEER_V6_NET, None)?;
        Ok(KernelSink {
            host,
            peer,
            ns,
            _lock: lock,
        })
    }

    /// Sends each IP packet through the tunnel into the kernel and returns the UDP payloads
    /// a socket bound to `[SINK_V6]:port` received (in order), waiting `quiet` after the
    /// last one for stragglers.
    pub fn deliver(
        &self,
        port: u16,
        packets: Vec<Vec<u8>>,
        quiet: Duration,
    ) -> Result<Vec<Vec<u8>>> {
        let sink_public = wraithgate_relay::PublicKey::from_base64(&self.host.keys.public)
            .context("wireguard-go's public key")?;
        let keys = KeyPair {
            secret: self.peer.secret.clone(),
            public: self.peer.public,
        };
        self.ns.run_in(move || {
            let sock = UdpSocket::bind(SocketAddr::new(SINK_V6.parse()?, port))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut node = WgNode::bind("127.0.0.1:0".parse()?, keys)?;
            let p = node.add_peer(
                boringtun::x25519::PublicKey::from(sink_public.0),
                PeerOptions {
                    endpoint: Some(SocketAddr::from(([127, 0, 0, 1], LISTEN_PORT))),
                    ..Default::default()
                },
            );
            node.initiate(p)?;
            let end = Instant::now() + Duration::from_secs(10);
            while node.handshakes(p) == 0 {
                if Instant::now() > end {
                    bail!("no handshake with wireguard-go within 10 s");
                }
                node.recv(Duration::from_millis(100))?;
            }
            let mut got = Vec::new();
            let mut buf = vec![0u8; 65_536];
            for pkt in &packets {
                node.send_ip(p, pkt)?;
                // One at a time, so that nothing is coalesced on the way.
                if let Ok(n) = sock.recv(&mut buf) {
                    got.push(buf[..n].to_vec());
                }
            }
            let end = Instant::now() + quiet;
            while Instant::now() < end {
                if let Ok(n) = sock.recv(&mut buf) {
                    got.push(buf[..n].to_vec());
                }
            }
            Ok(got)
        })
    }

    /// The namespace's `Udp6InCsumErrors` counter.
    pub fn udp6_checksum_errors(&self) -> Result<u64> {
        self.ns.udp6_checksum_errors()
    }
}
