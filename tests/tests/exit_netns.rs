//! The Exit role with stock WireGuard (issue 18): a wireguard-go client whose tunnel ends
//! at a real `wraithgate` node with a `[tun]` device, forwarding and masquerading to an
//! internet host with README's own sysctl and nftables lines. In network namespaces, as
//! root; topology and helpers: `wraithgate_tests::interop::exit`. Takes the interop suite's
//! lock; a few seconds.

use anyhow::{ensure, Result};
use wraithgate_tests::interop::exit::ExitLab;
use wraithgate_tests::interop::Traffic;

const IPERF_SECS: u32 = 2;

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
