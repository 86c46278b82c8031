//! The Exit role with stock WireGuard (issue 18): a wireguard-go client whose tunnel ends
//! at a real `wraithgate` node with a `[tun]` device, forwarding and masquerading to an
//! internet host with README's own sysctl and nftables lines. In network namespaces, as
//! root; topology and helpers: `wraithgate_tests::interop::exit`. Takes the interop suite's
//! lock; a few seconds.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use wraithgate_tests::interop::exit::{ExitLab, TUN_SECTION};
use wraithgate_tests::interop::relay::Metrics;
use wraithgate_tests::interop::Traffic;

const IPERF_SECS: u32 = 2;
/// The node's TUN address, which the client's tunnel routes (its AllowedIPs hold it).
const NODE_TUN_IP: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 1);
const TCP_PORT: u16 = 7100;
/// Bytes of the TCP test each way.
const TCP_BYTES: usize = 16 << 20;

#[test]
fn netns_exit_wireguard_go_client_to_the_internet() {
    let test = "netns_exit_wireguard_go_client_to_the_internet";
    let Some(lab) = ExitLab::start_or_skip(test, "auto") else {
        return;
    };
    if let Err(e) = through_the_exit(&lab) {
        panic!("{test} failed: {e:#}\n{}", lab.diagnostics());
    }
}

/// Ping, then a short iperf3 TCP run each way; the node's view of its peer and its TUN
/// counters say the traffic went through it.
fn through_the_exit(lab: &ExitLab) -> Result<()> {
    let (sent, received) = lab.ping(3)?;
    ensure!(received == sent, "ping: {received} of {sent} answered");
    for reverse in [false, true] {
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
    ensure!(
        p["public_key"] == lab.client.keys.public.as_str()
            && p["latest_handshake_secs_ago"].is_u64()
            && p["rx_bytes"].as_u64() > Some(100_000)
            && p["tx_bytes"].as_u64() > Some(100_000)
            && p["current_endpoint"].as_str() == Some("10.94.1.2:40001"),
        "the node's view of its peer: {peers}"
    );
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

/// WraithGate as the client end: the peer is provisioned with the wireguard-go host's
/// endpoint (which knows none for the node) and a persistent keepalive, so the node
/// handshakes by itself (the lab waits for that before any packet); then a ping from the
/// node's namespace through its TUN device.
#[test]
fn netns_exit_node_initiates_to_a_wireguard_go_peer() {
    let test = "netns_exit_node_initiates_to_a_wireguard_go_peer";
    let Some(lab) = ExitLab::start_or_skip_with(test, "auto", true) else {
        return;
    };
    let check = || -> Result<()> {
        let (sent, received) = lab.node_ping(3)?;
        ensure!(received == sent, "ping: {received} of {sent} answered");
        let seen = lab.client.endpoint_of(&lab.node_key)?;
        ensure!(
            seen.map(|e| e.port()) == Some(51820),
            "the wireguard-go host learned the node's listener as its endpoint: {seen:?}"
        );
        Ok(())
    };
    if let Err(e) = check() {
        panic!("{test} failed: {e:#}\n{}", lab.diagnostics());
    }
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
        let Some(lab) = ExitLab::start_or_skip(test, backend) else {
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
    let Some(lab) = ExitLab::start_or_skip_with_tun(test, "auto", false, &tun) else {
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
