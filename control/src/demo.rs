//! `wraithgate demo`: a relay, two exits and several clients on loopback, all real
//! WireGuard endpoints (boringtun), with traffic both ways through the relay.
//!
//! Clients pick their exit the way real ones do, by the exit's public key (mac1); one
//! client reaches its exit through a listen port pinned to it. Each client sends paced
//! IPv4/UDP packets carrying a sequence number and a send time; its exit decrypts them,
//! measures one-way delay and loss, and echoes them back through the relay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use wraithgate_relay::io::{BackendChoice, DataPlane, DataPlaneConfig};
use wraithgate_relay::table::{ExitSpec, ExitTable, SharedTable};

use crate::endpoints::{
    any_loopback, ipv4_udp, tunnel_addrs, udp_payload, KeyPair, PeerOptions, Received, WgNode,
};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub clients: usize,
    pub duration: Duration,
    /// Paced rate of each client, in megabits per second of IP payload.
    pub rate_mbps: f64,
    pub workers: usize,
    pub packet_size: usize,
    pub backend: BackendChoice,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            clients: 4,
            duration: Duration::from_secs(3),
            rate_mbps: 50.0,
            workers: 2,
            packet_size: 1380,
            backend: BackendChoice::Auto,
        }
    }
}

/// One client's results.
#[derive(Debug, Clone, Serialize)]
pub struct ClientReport {
    pub client: usize,
    pub exit: String,
    pub via_port: u16,
    pub sent: u64,
    pub received_by_exit: u64,
    pub echoed_back: u64,
    pub gbps: f64,
    pub loss_percent: f64,
    pub jitter_ms: f64,
    pub handshakes: u64,
}

/// The whole run (`--json` prints this).
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub backend: String,
    pub workers: usize,
    pub seconds: f64,
    pub handshakes: u64,
    pub bytes_forwarded: u64,
    pub packets_forwarded: u64,
    pub gbps: f64,
    pub loss_percent: f64,
    pub jitter_ms: f64,
    pub drops: u64,
    pub drops_by_reason: std::collections::BTreeMap<&'static str, u64>,
    pub sessions: usize,
    pub clients: Vec<ClientReport>,
}

/// Receive side of one flow: loss by sequence, RFC 3550 jitter of one-way delay.
#[derive(Debug, Default, Clone)]
struct FlowMeter {
    received: u64,
    bytes: u64,
    jitter_ns: f64,
    last_transit: Option<i64>,
}

impl FlowMeter {
    fn record(&mut self, len: usize, sent_ns: u64, now_ns: u64) {
        self.received += 1;
        self.bytes += len as u64;
        let transit = now_ns as i64 - sent_ns as i64;
        if let Some(prev) = self.last_transit {
            // RFC 3550 §6.4.1: J += (|D| - J) / 16.
            let d = (transit - prev).unsigned_abs() as f64;
            self.jitter_ns += (d - self.jitter_ns) / 16.0;
        }
        self.last_transit = Some(transit);
    }
}

/// Payload layout: client id (u32), sequence (u64), send time in ns since the demo's
/// clock base (u64), then filler.
fn payload(client: u32, seq: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let mut p = vec![0xAB; size.max(20)];
    p[..4].copy_from_slice(&client.to_le_bytes());
    p[4..12].copy_from_slice(&seq.to_le_bytes());
    p[12..20].copy_from_slice(&sent_ns.to_le_bytes());
    p
}

fn parse_payload(p: &[u8]) -> Option<(u32, u64, u64)> {
    let client = u32::from_le_bytes(p.get(..4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(p.get(4..12)?.try_into().ok()?);
    let sent = u64::from_le_bytes(p.get(12..20)?.try_into().ok()?);
    Some((client, seq, sent))
}

/// Runs the demo and returns its report.
pub fn run(opts: &DemoOptions) -> Result<DemoReport> {
    let base = Instant::now();
    let ns = move || base.elapsed().as_nanos() as u64;
    let stop = Arc::new(AtomicBool::new(false));

    // Two exits, each a WireGuard interface with one peer per client that uses it.
    let exit_keys = [KeyPair::generate(), KeyPair::generate()];
    let client_keys: Vec<KeyPair> = (0..opts.clients).map(|_| KeyPair::generate()).collect();
    let mut exits = Vec::new();
    for (e, keys) in exit_keys.iter().enumerate() {
        let mut node = WgNode::bind(any_loopback(), keys.clone()).context("binding an exit")?;
        for (c, ck) in client_keys.iter().enumerate() {
            if c % 2 == e {
                node.add_peer(ck.public, PeerOptions::default());
            }
        }
        exits.push(node);
    }
    // Both relay ports are chosen here, so that the pinned one can never be the port the
    // relay's main listener would have drawn for itself.
    let listen_port = free_udp_port()?;
    let pinned_port = loop {
        let p = free_udp_port()?;
        if p != listen_port {
            break p;
        }
    };
    let table = ExitTable::new(
        1,
        vec![
            ExitSpec {
                name: "exit-a".into(),
                public_key: exit_keys[0].relay_key(),
                endpoint: exits[0].local_addr(),
                listen_port: None,
            },
            ExitSpec {
                name: "exit-b".into(),
                public_key: exit_keys[1].relay_key(),
                endpoint: exits[1].local_addr(),
                listen_port: Some(pinned_port),
            },
        ],
    )?;
    let shared = SharedTable::new(table);
    let dp = DataPlane::start(
        DataPlaneConfig {
            listen: vec![SocketAddr::new(any_loopback().ip(), listen_port)],
            workers: opts.workers,
            backend: opts.backend,
            ..DataPlaneConfig::default()
        },
        shared,
    )?;
    let relay = dp.local_addrs()[0];
    let pinned = SocketAddr::new(relay.ip(), pinned_port);

    // Exits echo every packet back and meter what arrives.
    let exit_threads: Vec<_> = exits
        .into_iter()
        .map(|mut node| {
            let stop = stop.clone();
            let socket = node.socket_clone();
            std::thread::spawn(move || {
                let mut meters: HashMap<u32, FlowMeter> = HashMap::new();
                let Ok(socket) = socket else { return meters };
                let _ = socket.set_read_timeout(Some(Duration::from_millis(20)));
                let mut buf = vec![0u8; 65_536];
                let mut last_tick = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        if let Received::Packet { peer, data } =
                            node.handle_datagram(&buf[..n], from)
                        {
                            if let Some((client, _seq, sent)) =
                                udp_payload(&data).and_then(parse_payload)
                            {
                                meters
                                    .entry(client)
                                    .or_default()
                                    .record(data.len(), sent, ns());
                                let _ = node.send_ip(peer, &data);
                            }
                        }
                    }
                    if last_tick.elapsed() > Duration::from_millis(100) {
                        node.tick();
                        last_tick = Instant::now();
                    }
                }
                meters
            })
        })
        .collect();

    // Clients: the last one with an odd number goes through the pinned port.
    let pinned_client = (0..opts.clients).rev().find(|c| c % 2 == 1);
    let client_threads: Vec<_> = client_keys
        .iter()
        .enumerate()
        .map(|(c, keys)| {
            let exit = c % 2;
            let endpoint = if Some(c) == pinned_client {
                pinned
            } else {
                relay
            };
            let mut node = WgNode::bind(any_loopback(), keys.clone())?;
            let peer = node.add_peer(
                exit_keys[exit].public,
                PeerOptions {
                    endpoint: Some(endpoint),
                    ..Default::default()
                },
            );
            let o = opts.clone();
            let socket = node.socket_clone()?;
            let node = Arc::new(Mutex::new(node));
            Ok(std::thread::spawn(move || {
                // A receiving thread blocks in recv_from; the sender paces with sleeps.
                let done = Arc::new(AtomicBool::new(false));
                let receiver = {
                    let (node, done) = (node.clone(), done.clone());
                    std::thread::spawn(move || {
                        let _ = socket.set_read_timeout(Some(Duration::from_millis(20)));
                        let mut buf = vec![0u8; 65_536];
                        let mut echoed = 0u64;
                        while !done.load(Ordering::Relaxed) {
                            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                                let r = lock(&node).handle_datagram(&buf[..n], from);
                                if matches!(r, Received::Packet { .. }) {
                                    echoed += 1;
                                }
                            }
                        }
                        echoed
                    })
                };
                let (src, dst) = tunnel_addrs(c as u8 + 1);
                let bits = (o.packet_size as f64 + 28.0) * 8.0;
                let interval = Duration::from_secs_f64(bits / (o.rate_mbps * 1e6));
                let start = Instant::now();
                let end = start + o.duration;
                let mut next = start;
                let mut sent = 0u64;
                let mut last_tick = start;
                while next < end {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let p = payload(c as u32, sent, ns(), o.packet_size);
                    let ip = ipv4_udp(src, dst, 40000, 9, &p);
                    let mut n = lock(&node);
                    if n.send_ip(peer, &ip).is_ok() {
                        sent += 1;
                    }
                    if now.duration_since(last_tick) > Duration::from_millis(100) {
                        n.tick();
                        last_tick = now;
                    }
                    drop(n);
                    next += interval;
                }
                // Let the last echoes come home.
                std::thread::sleep(Duration::from_millis(300));
                done.store(true, Ordering::Relaxed);
                let echoed = receiver.join().unwrap_or(0);
                let handshakes = lock(&node).handshakes(peer);
                (c, exit, endpoint.port(), sent, echoed, handshakes)
            }))
        })
        .collect::<std::io::Result<_>>()?;

    let started = Instant::now();
    let mut results = Vec::new();
    for t in client_threads {
        results.push(
            t.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))?,
        );
    }
    let elapsed = started
        .elapsed()
        .as_secs_f64()
        .min(opts.duration.as_secs_f64() + 0.3);
    stop.store(true, Ordering::Relaxed);
    let mut meters: HashMap<u32, FlowMeter> = HashMap::new();
    for t in exit_threads {
        meters.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("an exit thread panicked"))?,
        );
    }
    // Give workers a moment to publish their final counters.
    std::thread::sleep(Duration::from_millis(120));
    let stats = dp.stats();
    let sessions = dp.reports().iter().map(|r| r.sessions).sum();
    let backend = dp.backend().to_owned();
    dp.shutdown();

    let mut clients = Vec::new();
    let (mut total_sent, mut total_lost) = (0u64, 0u64);
    for (c, exit, port, sent, echoed, handshakes) in results {
        let m = meters.get(&(c as u32)).cloned().unwrap_or_default();
        // Both directions: sent out, and echoes of what arrived coming home.
        let expected = sent + m.received;
        let lost = (sent - m.received.min(sent)) + (m.received - echoed.min(m.received));
        total_sent += expected;
        total_lost += lost;
        clients.push(ClientReport {
            client: c,
            exit: ["exit-a", "exit-b"][exit].into(),
            via_port: port,
            sent,
            received_by_exit: m.received,
            echoed_back: echoed,
            gbps: (m.bytes as f64 * 8.0 * 2.0) / opts.duration.as_secs_f64() / 1e9,
            loss_percent: pct(lost, expected),
            jitter_ms: m.jitter_ns / 1e6,
            handshakes,
        });
    }
    let bytes_forwarded = stats.client_to_exit.bytes + stats.exit_to_client.bytes;
    let jitter_ms = if clients.is_empty() {
        0.0
    } else {
        clients.iter().map(|c| c.jitter_ms).sum::<f64>() / clients.len() as f64
    };
    Ok(DemoReport {
        backend,
        workers: opts.workers,
        seconds: elapsed,
        handshakes: stats.client_handshakes + stats.exit_handshakes,
        bytes_forwarded,
        packets_forwarded: stats.client_to_exit.packets + stats.exit_to_client.packets,
        gbps: bytes_forwarded as f64 * 8.0 / elapsed / 1e9,
        loss_percent: pct(total_lost, total_sent),
        jitter_ms,
        drops: stats.total_drops(),
        drops_by_reason: wraithgate_relay::DropReason::ALL
            .iter()
            .filter(|r| stats.dropped(**r) > 0)
            .map(|r| (r.as_str(), stats.dropped(*r)))
            .collect(),
        sessions,
        clients,
    })
}

/// Locks a node; a panicked holder is a bug the join reports, so poisoning is ignored.
fn lock(node: &Mutex<WgNode>) -> MutexGuard<'_, WgNode> {
    node.lock().unwrap_or_else(|p| p.into_inner())
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// A UDP port free on loopback right now.
fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind(any_loopback())?;
    Ok(s.local_addr()?.port())
}

/// The report as an operator reads it.
pub fn render(r: &DemoReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "WraithGate demo: {} clients -> relay ({} backend, {} workers) -> 2 exits, {:.1} s on loopback\n",
        r.clients.len(),
        r.backend,
        r.workers,
        r.seconds
    );
    let _ = writeln!(
        s,
        "{:<7} {:<7} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10} {:>4}",
        "client", "exit", "port", "sent", "at exit", "echoed", "Gb/s", "loss %", "jitter ms", "hs"
    );
    for c in &r.clients {
        let _ = writeln!(
            s,
            "{:<7} {:<7} {:>6} {:>9} {:>9} {:>9} {:>8.3} {:>8.2} {:>10.4} {:>4}",
            c.client,
            c.exit,
            c.via_port,
            c.sent,
            c.received_by_exit,
            c.echoed_back,
            c.gbps,
            c.loss_percent,
            c.jitter_ms,
            c.handshakes
        );
    }
    let _ = writeln!(
        s,
        "{:<7} {:<7} {:>6} {:>9} {:>9} {:>9} {:>8.3} {:>8.2} {:>10.4} {:>4}",
        "total",
        "",
        "",
        r.clients.iter().map(|c| c.sent).sum::<u64>(),
        r.clients.iter().map(|c| c.received_by_exit).sum::<u64>(),
        r.clients.iter().map(|c| c.echoed_back).sum::<u64>(),
        r.gbps,
        r.loss_percent,
        r.jitter_ms,
        r.handshakes
    );
    let _ = writeln!(
        s,
        "\nrelay: {} packets / {} bytes forwarded, {} handshakes routed, {} dropped, {} sessions",
        r.packets_forwarded, r.bytes_forwarded, r.handshakes, r.drops, r.sessions
    );
    for (reason, n) in &r.drops_by_reason {
        let _ = writeln!(s, "  dropped {n} x {reason}");
    }
    s
}
