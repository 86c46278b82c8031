//! The Exit role with stock WireGuard (issue 18): a wireguard-go client whose tunnel ends
//! at a real `wraithgate` node with a `[tun]` device, forwarding and masquerading to an
//! internet host with README's own sysctl and nftables lines; directly, through a second
//! `wraithgate` node as DoubleHop relay, and as the inner tunnel of a Z-HOP client. In
//! network namespaces, as root; topology and helpers: `wraithgate_tests::interop::exit`.
//! Takes the interop suite's lock; a few seconds each.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use wraithgate_tests::interop::exit::{ExitLab, ExitPath, TUN_SECTION};
use wraithgate_tests::interop::relay::Metrics;
use wraithgate_tests::interop::Traffic;

const IPERF_SECS: u32 = 2;
/// The node's TUN address, which the client's tunnel routes (its AllowedIPs hold it).
const NODE_TUN_IP: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 1);
const TCP_PORT: u16 = 7100;
/// Bytes of the TCP test each way.
const TCP_BYTES: usize = 16 << 20;
/// A paced UDP stream (the brief's 200 Mb/s) and a loss bound generous enough for a busy
/// two-core machine: a path that lost packets in bulk would not meet it.
const UDP_MBPS: u32 = 200;
const MAX_UDP_LOSS_PERCENT: f64 = 10.0;

/// Builds the lab for `test` on `path` and runs `check` on it; skips loudly when the machine
/// cannot, and shows the lab's logs when the check fails.
fn exit_case(test: &str, path: ExitPath, check: impl FnOnce(&ExitLab) -> Result<()>) {
    let Some(lab) = ExitLab::start_or_skip(test, "auto", path) else {
        return;
    };
    let started = std::time::Instant::now();
    if let Err(e) = check(&lab) {
        panic!("{test} failed: {e:#}\n{}", lab.diagnostics());
    }
    lab.report(&format!(
        "passed in {:.1} s after the lab was up",
        started.elapsed().as_secs_f64()
    ));
}

#[test]
fn netns_exit_wireguard_go_client_to_the_internet() {
    exit_case(
        "netns_exit_wireguard_go_client_to_the_internet",
        ExitPath::Direct,
        |lab| {
            through_the_exit(lab, &[false, true])?;
            udp_through_the_exit(lab)
        },
    );
}

/// Ping, then a short iperf3 TCP run each way in `directions` (`true`: reverse); the
/// exit node's view of its peer and its TUN counters say the traffic went through it.
fn through_the_exit(lab: &ExitLab, directions: &[bool]) -> Result<()> {
    let (sent, received) = lab.ping(3)?;
    ensure!(received == sent, "ping: {received} of {sent} answered");
    for &reverse in directions {
        let r = lab.iperf_start(Traffic::Tcp, IPERF_SECS, reverse)?.wait()?;
        ensure!(r.mbps > 0.0, "iperf3 carried nothing: {r:?}");
        lab.report(&format!(
            "iperf3 TCP{}: {}",
            if reverse { " reverse" } else { "" },
            r.summary(Traffic::Tcp)
        ));
    }
    let peers: serde_json::Value = serde_json::from_str(&lab.node.get_ok("/v1/peers")?)?;
    let p = &peers[0];
    let seen_from = p["current_endpoint"]
        .as_str()
        .and_then(|e| e.parse::<std::net::SocketAddr>().ok());
    ensure!(
        p["public_key"] == lab.client.keys.public.as_str()
            && p["latest_handshake_secs_ago"].is_u64()
            && p["rx_bytes"].as_u64() > Some(100_000)
            // Upstream only, what goes back is TCP's acknowledgements: fewer bytes, and
            // fewer still when the far end's GRO acknowledges many segments at once.
            && p["tx_bytes"].as_u64() > Some(10_000)
            && seen_from.is_some_and(|e| e.ip() == lab.client_seen_from()),
        "the node's view of its peer (expected from {}): {peers}",
        lab.client_seen_from()
    );
    if lab.path == ExitPath::Direct {
        ensure!(
            seen_from.map(|e| e.port()) == Some(40001),
            "a direct client is seen at its own port: {seen_from:?}"
        );
    }
    let m = lab.node.metrics()?;
    lab.report(&format!("TUN: {}", TunCounts::from(&m)));
    for name in [
        "wraithgate_exit_tun_packets_read_total",
        "wraithgate_exit_tun_packets_written_total",
    ] {
        ensure!(m.sum(name, &[]) > 100, "{name}: {}", m.sum(name, &[]));
    }
    let shown = lab.node.wraithctl(&["show"])?;
    ensure!(shown.contains("latest handshake"), "{shown}");
    Ok(())
}

/// A short paced iperf3 UDP run to the internet host: it ran, the far end received most
/// of it, and the exit node wrote it to its TUN. A second try tells a busy machine's
/// one-off overflow from a path that loses packets.
fn udp_through_the_exit(lab: &ExitLab) -> Result<()> {
    let traffic = Traffic::Udp { mbps: UDP_MBPS };
    let mut tries = Vec::new();
    for _ in 0..2 {
        let before = lab
            .node
            .metrics()?
            .sum("wraithgate_exit_tun_packets_written_total", &[]);
        let r = lab.iperf_start(traffic, IPERF_SECS, false)?.wait()?;
        let written = lab
            .node
            .metrics()?
            .sum("wraithgate_exit_tun_packets_written_total", &[])
            - before;
        lab.report(&format!(
            "iperf3 UDP: {}; {written} packets written to the TUN",
            r.summary(traffic)
        ));
        ensure!(r.mbps > 0.0, "iperf3 UDP carried nothing: {r:?}");
        // 2 s at 200 Mb/s of 1,300-byte datagrams is about 38,000; most went through the node.
        let offered = f64::from(UDP_MBPS) * 1e6 / 8.0 / 1300.0 * f64::from(IPERF_SECS);
        ensure!(
            written as f64 >= offered * 0.5,
            "the exit node wrote {written} packets to its TUN of about {offered:.0} offered"
        );
        if r.lost_percent <= MAX_UDP_LOSS_PERCENT {
            return Ok(());
        }
        tries.push(r.lost_percent);
    }
    anyhow::bail!("UDP loss above {MAX_UDP_LOSS_PERCENT} % on both tries: {tries:?} %")
}

/// The same wireguard-go client reaching the WraithGate exit through a WraithGate DoubleHop
/// relay: the client's endpoint is the relay, its peer key the exit node's, which is how
/// the relay picks its exit (mac1, among two). The relay holds an established session to
/// "exit", not to the decoy, and the exit node sees the client from the relay's
/// exit-facing socket.
#[test]
fn netns_exit_through_a_wraithgate_doublehop_relay() {
    exit_case(
        "netns_exit_through_a_wraithgate_doublehop_relay",
        ExitPath::DoubleHop,
        |lab| {
            through_the_exit(lab, &[false])?;
            let relay = lab.relay.as_ref().expect("a relay path has a relay node");
            let sessions = relay.sessions()?;
            ensure!(
                sessions.len() == 1
                    && sessions[0].exit == "exit"
                    && sessions[0].exit_key == lab.node_key
                    && sessions[0].established
                    && sessions[0].to_exit.bytes > 100_000
                    && sessions[0].to_client.packets > 0,
                "the relay's sessions: {sessions:#?}"
            );
            Ok(())
        },
    );
}

/// A Z-HOP client whose inner wireguard-go tunnel ends at the WraithGate exit: the outer
/// tunnel goes to a WraithGate node that has the client as a Z-HOP peer with the exit node
/// as its allowed exit. The relay node forwards the inner tunnel (its Z-HOP counters, no
/// DoubleHop session) and the exit node sees it from the relay's flow socket.
#[test]
fn netns_exit_as_the_inner_tunnel_of_a_zhop_client() {
    exit_case(
        "netns_exit_as_the_inner_tunnel_of_a_zhop_client",
        ExitPath::Zhop,
        |lab| {
            through_the_exit(lab, &[false])?;
            let relay = lab.relay.as_ref().expect("a relay path has a relay node");
            let m = relay.metrics()?;
            let (to_exit, to_peer) = (
                m.sum("wraithgate_zhop_bytes_to_exit_total", &[]),
                m.sum("wraithgate_zhop_bytes_to_peer_total", &[]),
            );
            ensure!(
                to_exit > 100_000 && to_peer > 0,
                "the relay's Z-HOP traffic: {to_exit} bytes to the exit, {to_peer} to the peer"
            );
            ensure!(
                m.sum("wraithgate_sessions", &[]) == 0,
                "the inner tunnel opened a DoubleHop session on the relay"
            );
            Ok(())
        },
    );
}

/// WraithGate as the client end: the peer is provisioned with the wireguard-go host's
/// endpoint (which knows none for the node) and a persistent keepalive, so the node
/// handshakes by itself (the lab waits for that before any packet); then a ping from the
/// node's namespace through its TUN device.
#[test]
fn netns_exit_node_initiates_to_a_wireguard_go_peer() {
    exit_case(
        "netns_exit_node_initiates_to_a_wireguard_go_peer",
        ExitPath::NodeInitiates,
        |lab| {
            let (sent, received) = lab.node_ping(3)?;
            ensure!(received == sent, "ping: {received} of {sent} answered");
            let seen = lab.client.endpoint_of(&lab.node_key)?;
            ensure!(
                seen.map(|e| e.port()) == Some(51820),
                "the wireguard-go host learned the node's listener as its endpoint: {seen:?}"
            );
            Ok(())
        },
    );
}

/// TCP both ways between the client and a socket on the node's TUN address, with the
/// device's offloads on, on both backends: the node's stack hands its TSO super-packets to
/// the node, which splits them for the tunnel, and the client's segments, decrypted a batch
/// at a time, are coalesced into super-packets for the node's stack. Every byte arrives
/// intact, and the node's counters say super-packets were read and written.
#[test]
fn netns_exit_tcp_through_the_offloading_tun_is_intact() {
    let test = "netns_exit_tcp_through_the_offloading_tun_is_intact";
    for backend in ["uring", "portable"] {
        let Some(lab) = ExitLab::start_or_skip(test, backend, ExitPath::Direct) else {
            return;
        };
        if let Err(e) = offloading_tcp(&lab, backend) {
            panic!("{test} ({backend}) failed: {e:#}\n{}", lab.diagnostics());
        }
    }
}

fn offloading_tcp(lab: &ExitLab, backend: &str) -> Result<()> {
    let in_use = lab.node.backend_in_use();
    ensure!(
        in_use.as_deref() == Some(backend),
        "backend {in_use:?}, not {backend}"
    );
    tcp_both_ways(lab)?;
    let m = lab.node.metrics()?;
    let t = TunCounts::from(&m);
    lab.report(&format!("{backend}, offload on: {t}"));
    ensure!(
        t.super_reads > 0 && t.rx_packets > t.reads,
        "no super-packet was read from the TUN device: {t}"
    );
    ensure!(
        t.super_writes > 0 && t.tx_packets > t.writes,
        "no super-packet was written to the TUN device: {t}"
    );
    let trains = m.sum("wraithgate_zhop_trains_sent_total", &[]);
    let in_trains = m.sum("wraithgate_zhop_segments_in_trains_total", &[]);
    lab.report(&format!(
        "{backend}, UDP GSO: {in_trains} datagrams in {trains} sends"
    ));
    ensure!(
        trains > 0 && in_trains > trains,
        "the split packets did not leave in UDP GSO trains: {in_trains} datagrams in {trains} sends"
    );
    Ok(())
}

/// The same with `[tun] offload = "off"`: plain packets, one per read and write.
#[test]
fn netns_exit_tcp_with_tun_offload_off() {
    let test = "netns_exit_tcp_with_tun_offload_off";
    let tun = format!("{TUN_SECTION}offload = \"off\"\n");
    let Some(lab) = ExitLab::start_or_skip_with_tun(test, "auto", ExitPath::Direct, &tun) else {
        return;
    };
    let check = || -> Result<()> {
        tcp_both_ways(&lab)?;
        let t = TunCounts::from(&lab.node.metrics()?);
        lab.report(&format!("offload off: {t}"));
        ensure!(
            t.super_reads == 0 && t.super_writes == 0,
            "super-packets with offload off: {t}"
        );
        ensure!(
            t.reads == t.rx_packets && t.writes == t.tx_packets && t.reads > 1000,
            "one packet per read and write: {t}"
        );
        Ok(())
    };
    if let Err(e) = check() {
        panic!("{test} failed: {e:#}\n{}", lab.diagnostics());
    }
}

/// The node's TUN counters, summed over its workers.
struct TunCounts {
    reads: u64,
    super_reads: u64,
    rx_packets: u64,
    writes: u64,
    super_writes: u64,
    tx_packets: u64,
}

impl TunCounts {
    fn from(m: &Metrics) -> TunCounts {
        let get = |n: &str| m.sum(&format!("wraithgate_exit_tun_{n}_total"), &[]);
        TunCounts {
            reads: get("reads"),
            super_reads: get("super_reads"),
            rx_packets: get("packets_read"),
            writes: get("writes"),
            super_writes: get("super_writes"),
            tx_packets: get("packets_written"),
        }
    }
}

impl std::fmt::Display for TunCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = |p: u64, n: u64| p as f64 / n.max(1) as f64;
        write!(
            f,
            "{} packets in {} reads ({} super-packets, {:.1} packets per read), \
             {} packets in {} writes ({} super-packets, {:.1} packets per write)",
            self.rx_packets,
            self.reads,
            self.super_reads,
            per(self.rx_packets, self.reads),
            self.tx_packets,
            self.writes,
            self.super_writes,
            per(self.tx_packets, self.writes)
        )
    }
}

/// [`TCP_BYTES`] from the client to a socket on the node's TUN address, then as many back,
/// each checked byte for byte.
fn tcp_both_ways(lab: &ExitLab) -> Result<()> {
    let listener = lab
        .node
        .ns()
        .run_in(|| Ok(TcpListener::bind((NODE_TUN_IP, TCP_PORT))?))
        .context("listening on the node's TUN address")?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        expect_stream(&mut s, 1).context("client to node")?;
        send_stream(&mut s, 2)?;
        s.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let to = SocketAddr::from((NODE_TUN_IP, TCP_PORT));
    let mut c = lab
        .client
        .ns
        .run_in(move || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(10))?))
        .context("connecting through the tunnel")?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    send_stream(&mut c, 1)?;
    expect_stream(&mut c, 2).context("node to client")?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the node's side panicked"))?
}

/// Fills `out` with the next bytes of the xorshift stream `state`.
fn stream_chunk(state: &mut u64, out: &mut [u8]) {
    for c in out.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        c.copy_from_slice(&state.to_le_bytes()[..c.len()]);
    }
}

fn send_stream(s: &mut TcpStream, seed: u64) -> Result<()> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut chunk = vec![0u8; 64 << 10];
    let mut left = TCP_BYTES;
    while left > 0 {
        let n = left.min(chunk.len());
        stream_chunk(&mut state, &mut chunk[..n]);
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    Ok(())
}

/// Reads exactly [`TCP_BYTES`] and compares them with stream `seed`.
fn expect_stream(s: &mut TcpStream, seed: u64) -> Result<()> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut want = vec![0u8; 64 << 10];
    let mut got = vec![0u8; 64 << 10];
    let mut at = 0;
    while at < TCP_BYTES {
        let n = (TCP_BYTES - at).min(got.len());
        s.read_exact(&mut got[..n])
            .with_context(|| format!("after {at} of {TCP_BYTES} bytes"))?;
        stream_chunk(&mut state, &mut want[..n]);
        if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
            anyhow::bail!("byte {} differs", at + i);
        }
        at += n;
    }
    Ok(())
}
