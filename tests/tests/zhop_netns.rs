//! Z-HOP with stock WireGuard (issue 8): a client running two wireguard-go interfaces, the
//! inner one (to the exit) routed through the outer one (to the node), a real `wraithgate`
//! node terminating the outer tunnel with the peer provisioned through its operator API, and
//! a wireguard-go exit that masquerades to an internet host running iperf3. In network
//! namespaces, as root; topology and helpers: `wraithgate_tests::interop::zhop`.
//!
//! Each test runs the same case on one data-path backend (io_uring, portable), so both are
//! checked whatever `auto` would pick. They take the interop suite's lock, so they never
//! overlap with each other or with `tests/interop.rs`; each takes about 15 s. Figures are
//! printed as `interop[test]: …` lines (run with `--nocapture` to see them).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use wraithgate_relay::io::BackendChoice;
use wraithgate_tests::interop::relay::Metrics;
use wraithgate_tests::interop::zhop::{ZhopLab, RELAY_EXIT_SIDE};
use wraithgate_tests::interop::Traffic;

/// Far below what any working path does here (two layers of wireguard-go on the client share
/// two cores with everything else); a path that lost packets in bulk would not reach it.
const MIN_TCP_MBPS: f64 = 20.0;
/// A paced UDP stream well below what the two layers carry.
const UDP_MBPS: u32 = 50;
const MAX_UDP_LOSS_PERCENT: f64 = 5.0;
const IPERF_SECS: u32 = 3;

fn zhop_case(test: &str, backend: BackendChoice) {
    let name = match backend {
        BackendChoice::Uring => "uring",
        BackendChoice::Portable => "portable",
        other => panic!("{test}: no such case for {other:?}"),
    };
    if !wraithgate_tests::backends().contains(&backend) {
        // `backends()` already said why, and panicked if skipping is not allowed.
        eprintln!("\n*** SKIPPED {test}: the {name} backend cannot run here ***\n");
        return;
    }
    let Some(mut lab) = ZhopLab::start_or_skip(test, name) else {
        return;
    };
    let started = Instant::now();
    if let Err(e) = through_both_layers(&mut lab, name) {
        panic!("{test} failed: {e:#}");
    }
    if let Err(e) = lab.check_processes() {
        panic!("{test}: {e:#}");
    }
    lab.report(&format!(
        "passed in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}

/// Ping, iperf3 TCP both ways and UDP through both layers; the traffic is Z-HOP's (the
/// node's counters, the exit's view of the client); a new handshake on each layer.
fn through_both_layers(lab: &mut ZhopLab, backend: &str) -> Result<()> {
    ensure!(
        lab.relay.backend_in_use().as_deref() == Some(backend),
        "the node runs {:?}, not {backend}",
        lab.relay.backend_in_use()
    );
    let shown = lab.relay.wraithctl(&["show"])?;
    ensure!(
        shown.contains(&lab.node_key),
        "`wraithctl show` does not print the node key {}:\n{shown}",
        lab.node_key
    );

    let (sent, received) = lab.ping(5)?;
    lab.report(&format!("ping through both layers: {received}/{sent}"));
    ensure!(received == sent, "ping {received}/{sent}");
    let exit_sees = lab.exit_view_of_client()?;
    ensure!(
        exit_sees.is_some_and(|a| a.ip() == RELAY_EXIT_SIDE),
        "the exit should see the inner tunnel from the node's flow socket on \
         {RELAY_EXIT_SIDE}, sees {exit_sees:?}"
    );

    let before = lab.metrics()?;
    let cpu_before = lab.cpu_seconds();
    let up = lab.iperf(Traffic::Tcp, IPERF_SECS, false)?;
    let down = lab.iperf(Traffic::Tcp, IPERF_SECS, true)?;
    let cpu = lab.cpu_seconds();
    let after = lab.metrics()?;
    let gb = (up.mbps + down.mbps) * f64::from(IPERF_SECS) / 8e3;
    lab.report(&format!(
        "TCP up {} / down {}; CPU s/GB: client (2× wireguard-go) {:.1}, node {:.1}, exit {:.1}",
        up.summary(Traffic::Tcp),
        down.summary(Traffic::Tcp),
        (cpu[0] - cpu_before[0]) / gb,
        (cpu[1] - cpu_before[1]) / gb,
        (cpu[2] - cpu_before[2]) / gb,
    ));
    for (what, r) in [("up", up), ("down", down)] {
        ensure!(r.mbps >= MIN_TCP_MBPS, "TCP {what} only {:.1} Mb/s", r.mbps);
    }
    // What iperf3 delivered crossed the node as inner WireGuard datagrams, each larger than
    // the TCP payload it carries.
    let delta = |name: &str| after.sum(name, &[]) - before.sum(name, &[]);
    let payload_bytes = |mbps: f64| (mbps * 1e6 / 8.0 * f64::from(IPERF_SECS) * 0.9) as u64;
    ensure!(
        delta("wraithgate_zhop_bytes_to_exit_total") >= payload_bytes(up.mbps),
        "the node forwarded {} bytes to the exit, less than TCP up carried ({:.0} Mb/s)",
        delta("wraithgate_zhop_bytes_to_exit_total"),
        up.mbps
    );
    ensure!(
        delta("wraithgate_zhop_bytes_to_peer_total") >= payload_bytes(down.mbps),
        "the node wrapped {} bytes for the peer, less than TCP down carried ({:.0} Mb/s)",
        delta("wraithgate_zhop_bytes_to_peer_total"),
        down.mbps
    );
    ensure!(
        after.sum("wraithgate_sessions", &[]) == 0,
        "Z-HOP traffic opened DoubleHop sessions"
    );

    udp(lab)?;
    new_handshakes(lab)?;

    let m = lab.metrics()?;
    let refused = m.drops();
    lab.report(&format!("node drops at the end: {refused:?}"));
    for reason in [
        "inner_spoofed_source",
        "inner_forbidden_destination",
        "inner_not_udp",
    ] {
        ensure!(
            !refused.iter().any(|(r, _)| r == reason),
            "the node refused the client's own inner traffic as {reason}: {refused:?}"
        );
    }
    Ok(())
}

/// A paced UDP stream; a second try tells a busy machine's one-off overflow from a path that
/// loses packets.
fn udp(lab: &ZhopLab) -> Result<()> {
    let traffic = Traffic::Udp { mbps: UDP_MBPS };
    let mut lost = Vec::new();
    for _ in 0..2 {
        let r = lab.iperf(traffic, IPERF_SECS, false)?;
        lab.report(&format!("UDP {}", r.summary(traffic)));
        lost.push(r.lost_percent);
        if r.lost_percent <= MAX_UDP_LOSS_PERCENT && r.mbps >= f64::from(UDP_MBPS) * 0.9 {
            return Ok(());
        }
    }
    anyhow::bail!("a {UDP_MBPS} Mb/s UDP stream lost {lost:.2?} %")
}

/// The client forgets both peers and sets them again: each layer handshakes anew, and the
/// counts (`wg show`, the client's and the node's) grow.
fn new_handshakes(lab: &ZhopLab) -> Result<()> {
    let h0 = lab.handshakes()?;
    ensure!(
        h0.outer >= 1 && h0.inner >= 1 && h0.outer_latest.is_some() && h0.inner_latest.is_some(),
        "both layers should have handshaken: {h0:?}"
    );
    let node_before = node_handshakes(&lab.metrics()?);
    let exit_before = lab.exit.latest_handshake(&lab.inner.keys.public)?;
    // `wg show` counts in whole seconds: let the clock move on.
    std::thread::sleep(Duration::from_millis(1100));
    lab.reset_client_peers()?;
    let took = lab.wait_for_ping(Duration::from_secs(15))?;
    let h1 = wait_for(Duration::from_secs(5), || {
        let h = lab.handshakes()?;
        Ok((h.outer > h0.outer && h.inner > h0.inner).then_some(h))
    })?
    .with_context(|| format!("no new handshake on both layers: before {h0:?}"))?;
    let node_after = node_handshakes(&lab.metrics()?);
    let exit_after = lab.exit.latest_handshake(&lab.inner.keys.public)?;
    lab.report(&format!(
        "handshakes after resetting the client's peers (through again in {:.0} ms): outer \
         {} → {}, inner {} → {}; the node answered {node_before} → {node_after}",
        took.as_secs_f64() * 1e3,
        h0.outer,
        h1.outer,
        h0.inner,
        h1.inner
    ));
    ensure!(
        later(h1.outer_latest, h0.outer_latest) && later(h1.inner_latest, h0.inner_latest),
        "`wg show latest-handshakes` did not move on the client: {h0:?} → {h1:?}"
    );
    ensure!(
        later(exit_after, exit_before),
        "the exit saw no new inner handshake: {exit_before:?} → {exit_after:?}"
    );
    ensure!(
        node_after > node_before,
        "the node answered no new outer handshake ({node_before} → {node_after})"
    );
    let (sent, received) = lab.ping(3)?;
    ensure!(
        received == sent,
        "ping after the new handshakes {received}/{sent}"
    );
    Ok(())
}

fn node_handshakes(m: &Metrics) -> u64 {
    m.sum("wraithgate_zhop_outer_handshakes_total", &[])
}

fn later(now: Option<u64>, then: Option<u64>) -> bool {
    now.is_some_and(|n| then.is_none_or(|t| n > t))
}

/// Polls `f` every 100 ms until it returns something or `timeout` passes.
fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<Option<T>> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f()? {
            return Ok(Some(v));
        }
        if Instant::now() > end {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn netns_zhop_uring_wireguard_go_through_both_layers() {
    zhop_case(
        "netns_zhop_uring_wireguard_go_through_both_layers",
        BackendChoice::Uring,
    );
}

#[test]
fn netns_zhop_portable_wireguard_go_through_both_layers() {
    zhop_case(
        "netns_zhop_portable_wireguard_go_through_both_layers",
        BackendChoice::Portable,
    );
}

/// The IPv6/UDP packets Z-HOP wraps replies in (`inner::build_udp`, what `Zhop::handle_exit`
/// sends to the peer) pass the kernel's own checksum check: through a wireguard-go
/// interface, whose TUN hands them to the kernel as they are, each reaches a UDP socket on
/// its destination. A copy with its checksum off by one bit is dropped and counted as a
/// checksum error, so the path does check.
#[test]
fn netns_ipv6_inner_packets_pass_the_kernels_udp_checksum_check() {
    use wraithgate_tests::interop::kernel::{KernelSink, SINK_V6};
    let test = "netns_ipv6_inner_packets_pass_the_kernels_udp_checksum_check";
    let Some(sink) = KernelSink::start_or_skip(test) else {
        return;
    };
    const PORT: u16 = 5353;
    let from: std::net::SocketAddr = "[fd00:7::1]:51820".parse().unwrap();
    let to = std::net::SocketAddr::new(SINK_V6.parse().unwrap(), PORT);
    let payloads: Vec<Vec<u8>> = [0usize, 1, 2, 17, 32, 61, 148, 1001, 1280]
        .iter()
        .map(|&len| (0..len).map(|i| (i * 31 + len) as u8).collect())
        .collect();
    let mut packets: Vec<Vec<u8>> = payloads
        .iter()
        .map(|p| {
            let mut ip = Vec::new();
            wraithgate_relay::inner::build_udp(&mut ip, from, to, p);
            ip
        })
        .collect();
    let mut bad = packets[5].clone();
    bad[47] ^= 1;
    packets.insert(0, bad);
    let errors_before = sink.udp6_checksum_errors().unwrap();
    let got = sink
        .deliver(PORT, packets, Duration::from_millis(300))
        .unwrap_or_else(|e| panic!("{test}: {e:#}"));
    let errors = sink.udp6_checksum_errors().unwrap() - errors_before;
    eprintln!(
        "{test}: {} of {} good packets delivered, {errors} checksum error(s) counted",
        got.len(),
        payloads.len()
    );
    let lens = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(
        lens(&got),
        lens(&payloads),
        "payload lengths delivered: every good packet, and nothing else"
    );
    assert!(
        got == payloads,
        "a delivered payload differs from the one sent"
    );
    assert_eq!(
        errors, 1,
        "the corrupted copy is counted as a checksum error"
    );
}

/// Issue 19: a Z-HOP client set up from what the node prints and nothing else.
/// `wraithctl peer add … --client-config --out-dir DIR` provisions a new peer and writes its
/// outer and inner wg-quick files; with only their `<…>` placeholders filled in (the
/// client's own keys, the address its exit gave it), `wg-quick up` brings a stock
/// wireguard-go client up from them (userspace: this machine has no kernel WireGuard), and
/// its traffic reaches the internet host through both layers.
#[test]
fn netns_zhop_client_from_wraithctl_client_config() {
    let test = "netns_zhop_client_from_wraithctl_client_config";
    let Some(mut lab) = ZhopLab::start_or_skip(test, "auto") else {
        return;
    };
    if let Err(e) = client_from_printed_config(&mut lab) {
        panic!("{test} failed: {e:#}");
    }
    if let Err(e) = lab.check_processes() {
        panic!("{test}: {e:#}");
    }
}

fn genkey() -> Result<(String, String)> {
    let private = std::process::Command::new("wg").arg("genkey").output()?;
    ensure!(private.status.success(), "wg genkey: {private:?}");
    let private = String::from_utf8(private.stdout)?.trim().to_string();
    let mut child = std::process::Command::new("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(private.as_bytes())?;
    let public = child.wait_with_output()?;
    ensure!(public.status.success(), "wg pubkey: {public:?}");
    Ok((
        private,
        String::from_utf8(public.stdout)?.trim().to_string(),
    ))
}

fn client_from_printed_config(lab: &mut ZhopLab) -> Result<()> {
    // The lab's own client interfaces go: the new ones take their routes.
    for ifname in [lab.inner.ifname.clone(), lab.outer.ifname.clone()] {
        lab.client_ns().ip(&["link", "del", &ifname])?;
    }
    let (outer_private, outer_public) = genkey()?;
    let (inner_private, inner_public) = genkey()?;
    // The exit's operator gives the client an address (10.200.0.12) for its inner key.
    lab.exit
        .set_peer(&inner_public, None, "10.200.0.12/32", None)?;
    let dir = lab.dir.join("client-config");
    let printed = lab.relay.wraithctl(&[
        "peer",
        "add",
        &outer_public,
        "--allowed-ips",
        "10.201.0.3/32",
        "--exit",
        "exit",
        "--client-config",
        "--endpoint",
        "10.92.1.1:51820",
        "--out-dir",
        &dir.display().to_string(),
    ])?;
    lab.report(&format!("wraithctl: {}", printed.trim()));
    let fill = |file: &str, with: &[(&str, &str)]| -> Result<std::path::PathBuf> {
        let path = dir.join(file);
        let mut text =
            std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        for (placeholder, value) in with {
            ensure!(
                text.contains(placeholder),
                "{file} has no {placeholder}:\n{text}"
            );
            text = text.replace(placeholder, value);
        }
        ensure!(
            !text.contains('<'),
            "{file} still has a placeholder after filling in the documented ones:\n{text}"
        );
        std::fs::write(&path, &text)?;
        Ok(path)
    };
    let outer = fill(
        "zhop-outer.conf",
        &[("<your outer private key>", &outer_private)],
    )?;
    let inner = fill(
        "zhop-exit1.conf",
        &[
            ("<your private key at exit exit>", &inner_private),
            ("<your address at exit exit>", "10.200.0.12/32"),
        ],
    )?;
    for conf in [&outer, &inner] {
        let out = lab
            .client_ns()
            .command("wg-quick")
            .arg("up")
            .arg(conf)
            .output()?;
        ensure!(
            out.status.success(),
            "wg-quick up {}: {}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let started = Instant::now();
    let mut answered = false;
    while !answered && started.elapsed() < Duration::from_secs(15) {
        answered = matches!(lab.ping(1), Ok((_, 1)));
    }
    ensure!(
        answered,
        "no ping through the configured client within 15 s"
    );
    let (sent, received) = lab.ping(5)?;
    lab.report(&format!(
        "client from the printed config: up after {:.2} s, ping {received}/{sent}",
        started.elapsed().as_secs_f64()
    ));
    ensure!(received == sent, "ping {received}/{sent}");
    let peers = lab.relay.wraithctl(&["--json", "peer", "ls"])?;
    ensure!(
        peers.contains(&outer_public),
        "the new peer is not listed: {peers}"
    );
    let exit_sees = lab.exit.endpoint_of(&inner_public)?;
    ensure!(
        exit_sees.is_some_and(|a| a.ip() == RELAY_EXIT_SIDE),
        "the exit should see the new client's inner tunnel from the node, sees {exit_sees:?}"
    );
    for conf in [&inner, &outer] {
        let _ = lab
            .client_ns()
            .command("wg-quick")
            .arg("down")
            .arg(conf)
            .output();
    }
    Ok(())
}
