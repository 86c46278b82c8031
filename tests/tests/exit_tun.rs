//! The Exit role over a real TUN device, in process: a data plane with a `[tun]` device in
//! a network namespace of its own, a boringtun client on loopback there, and the
//! namespace's own stack behind the device (a UDP socket on the device's address stands in
//! for the internet). Needs root; skips loudly without it (a failure under
//! `WRAITHGATE_REQUIRE_ALL_TESTS`). Each test runs its case once per backend, each run in a
//! namespace of its own.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nix::sys::socket::{setsockopt, sockopt};
use wraithgate_control::endpoints::{
    any_loopback, ipv4_udp, udp_payload, KeyPair, PeerOptions, Received, WgNode,
};
use wraithgate_relay::io::BackendChoice;
use wraithgate_relay::table::{ExitTable, PeerSpec};
use wraithgate_relay::tun::{TunConfig, TunOffload};
use wraithgate_relay::zhop::NodeKey;
use wraithgate_relay::{DropReason, PublicKey};
use wraithgate_tests::flood::HandshakeFlood;
use wraithgate_tests::netns::{missing_prerequisites, Netns, SuiteLock};
use wraithgate_tests::{address_on_worker, backends, skips_allowed, worker_of, Relay};

const WAIT: Duration = Duration::from_secs(10);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const SERVER_PORT: u16 = 7000;
const PEER_PORT: u16 = 5000;
/// Datagram size of the stack's UDP GSO send.
const GSO_SEGMENT: usize = 1000;

#[test]
fn netns_exit_tun_both_ways_allowed_ips_handoffs_rekey_and_removal() {
    in_namespaces(
        "netns_exit_tun_both_ways_allowed_ips_handoffs_rekey_and_removal",
        exit_case,
    );
}

/// Runs `case` once per backend, each in a fresh namespace, or skips loudly without root.
fn in_namespaces(test: &str, case: fn(BackendChoice) -> Result<()>) {
    if let Some(why) = missing_prerequisites(&["ip"]) {
        assert!(
            skips_allowed(),
            "{test} cannot run: {why}; WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping"
        );
        eprintln!("\n*** SKIPPED {test}: {why} ***\n");
        return;
    }
    let _lock = SuiteLock::acquire().expect("suite lock");
    for backend in backends() {
        let short = format!("exit{}-{}", std::process::id(), backend.as_str());
        let ns = Netns::create(&short).expect("namespace");
        let started = Instant::now();
        ns.run_in(move || case(backend))
            .unwrap_or_else(|e| panic!("{test}, {} backend: {e:#}", backend.as_str()));
        eprintln!(
            "{test}: {} backend passed in {:.1} s",
            backend.as_str(),
            started.elapsed().as_secs_f64()
        );
    }
}

/// A node with a TUN device and two workers, its one peer a boringtun client on loopback
/// (tunnel address [`PEER_IP`]), and a UDP socket on the device's address standing in for
/// the internet. Nothing sent yet.
struct Setup {
    relay: Relay,
    client: WgNode,
    server: UdpSocket,
    node_public: PublicKey,
    /// Where the server reaches the client's tunnel address.
    peer_addr: SocketAddr,
}

fn setup(backend: BackendChoice) -> Result<Setup> {
    let node_secret: [u8; 32] = rand::random();
    let node_public = NodeKey::from_secret(node_secret).public_key();
    let client_keys = KeyPair::generate();
    let peer = PeerSpec {
        public_key: client_keys.relay_key(),
        name: "roadwarrior".into(),
        allowed_ips: vec![format!("{PEER_IP}/32").parse().expect("literal")],
        preshared_key: None,
        allowed_exits: vec![],
        endpoint: None,
        persistent_keepalive: None,
    };
    let table = ExitTable::new(1, vec![])?.with_peers(vec![peer])?;
    let relay = Relay::start_config(
        table,
        wraithgate_relay::io::DataPlaneConfig {
            backend,
            workers: 2,
            node_key: Some(node_secret),
            tun: Some(TunConfig {
                name: "wgx0".into(),
                addresses: vec![format!("{NODE_IP}/24").parse().expect("literal")],
                mtu: 1420,
                offload: TunOffload::Auto,
            }),
            ..Relay::config()
        },
    );
    let mut client = WgNode::bind(any_loopback(), client_keys)?;
    client.add_peer(
        boringtun::x25519::PublicKey::from(node_public.0),
        PeerOptions {
            endpoint: Some(relay.addr),
            ..PeerOptions::default()
        },
    );
    let server = UdpSocket::bind((NODE_IP, SERVER_PORT)).context("binding on the TUN address")?;
    server.set_nonblocking(true)?;
    Ok(Setup {
        relay,
        client,
        server,
        node_public,
        peer_addr: SocketAddr::from((PEER_IP, PEER_PORT)),
    })
}

impl Setup {
    /// Sends `body` from the client's tunnel address to the server and waits for it there.
    fn send_to_server(&mut self, body: &[u8], within: Duration) -> Result<()> {
        let ip = ipv4_udp(PEER_IP, NODE_IP, PEER_PORT, SERVER_PORT, body);
        self.client.send_ip(0, &ip)?;
        let server = &self.server;
        let (got, from) = pump_until_within(&mut self.client, within, |_| server_recv(server))
            .with_context(|| {
                format!(
                    "{:?} never reached the server",
                    String::from_utf8_lossy(body)
                )
            })?;
        ensure!(got == body && from == self.peer_addr, "{got:?} from {from}");
        Ok(())
    }

    /// Sends `body` from the server (through the TUN device) to the client's tunnel
    /// address and waits for the client to decrypt it.
    fn send_to_client(&mut self, body: &[u8]) -> Result<()> {
        self.server.send_to(body, self.peer_addr)?;
        pump_until(&mut self.client, |r| packet_payload(r, body)).with_context(|| {
            format!(
                "{:?} never reached the client at {}",
                String::from_utf8_lossy(body),
                self.client.local_addr()
            )
        })?;
        Ok(())
    }

    /// The node's view of its one peer's endpoint (`wg show`'s, `GET /v1/peers`'
    /// `current_endpoint`).
    fn endpoint_seen(&self) -> Result<Option<SocketAddr>> {
        let statuses = self.relay.dp.peer_statuses(WAIT);
        ensure!(statuses.len() == 1, "{statuses:?}");
        Ok(statuses[0].endpoint)
    }
}

/// The whole story on one backend, inside the namespace.
fn exit_case(backend: BackendChoice) -> Result<()> {
    let Setup {
        relay,
        mut client,
        server,
        node_public,
        peer_addr,
    } = setup(backend)?;

    // Handshake, then data in through the tunnel to the node's stack, and the reply out.
    let ping = ipv4_udp(PEER_IP, NODE_IP, PEER_PORT, SERVER_PORT, b"ping");
    client.send_ip(0, &ping)?;
    let (got, from) = pump_until(&mut client, |_| server_recv(&server))?;
    ensure!(got == b"ping" && from == peer_addr, "{got:?} from {from}");
    server.send_to(b"pong", peer_addr)?;
    let got = pump_until(&mut client, |r| packet_payload(r, b"pong"))?;
    ensure!(got);

    // Inbound cryptokey routing: a source outside the peer's allowed IPs is dropped.
    let spoofed = ipv4_udp(
        Ipv4Addr::new(10, 99, 0, 3),
        NODE_IP,
        PEER_PORT,
        SERVER_PORT,
        b"spoof",
    );
    client.send_ip(0, &spoofed)?;
    wait_drops(&relay, DropReason::ExitSourceNotAllowed, 1)?;
    ensure!(
        server_recv(&server).is_none(),
        "a spoofed source reached the stack"
    );

    // Outbound: a destination in no peer's allowed IPs is dropped.
    server.send_to(b"nobody", (Ipv4Addr::new(10, 99, 0, 77), PEER_PORT))?;
    wait_drops(&relay, DropReason::ExitNoRoute, 1)?;

    // A UDP GSO send from the stack: with USO on the device it is read as one
    // super-packet and split; each datagram reaches the peer whole, its checksum right.
    let gso = UdpSocket::bind((NODE_IP, 0))?;
    setsockopt(&gso, sockopt::UdpGsoSegment, &(GSO_SEGMENT as i32))?;
    let segments: Vec<Vec<u8>> = (0..10u8)
        .map(|i| {
            let mut d = format!("gso {i} ").into_bytes();
            d.resize(GSO_SEGMENT, i);
            d
        })
        .collect();
    gso.send_to(&segments.concat(), peer_addr)?;
    let mut arrived = vec![false; segments.len()];
    pump_until(&mut client, |r| {
        if let Received::Packet { data, .. } = r {
            let payload = udp_payload(data).unwrap_or_default();
            if let Some(i) = segments.iter().position(|s| s[..] == *payload) {
                assert!(udp_checksum_ok(data), "datagram {i}: bad UDP checksum");
                arrived[i] = true;
            }
        }
        arrived.iter().all(|a| *a).then_some(())
    })?;
    // Not asserted: a kernel before 6.2 has no USO and segments the send itself.
    let super_reads = wait_for_reports(&relay, |r| r.iter().map(|w| w.exit.tun_super_reads).sum())?;
    eprintln!(
        "exit_tun ({}): a UDP GSO send arrived as {} datagrams; TUN super-packets read: {super_reads}",
        backend.as_str(),
        segments.len()
    );

    // Many new flows from the stack: the kernel spreads them over both workers' TUN
    // queues by flow hash, so some surface on the worker that does not hold the tunnel and
    // are handed over. Every one arrives.
    let flows: Vec<UdpSocket> = (0..32)
        .map(|_| UdpSocket::bind((NODE_IP, 0)))
        .collect::<std::io::Result<_>>()?;
    for (i, s) in flows.iter().enumerate() {
        s.send_to(format!("flow {i}").as_bytes(), peer_addr)?;
    }
    let mut seen = vec![false; flows.len()];
    pump_until(&mut client, |r| {
        if let Received::Packet { data, .. } = r {
            let text = String::from_utf8_lossy(udp_payload(data).unwrap_or_default()).to_string();
            if let Some(i) = text
                .strip_prefix("flow ")
                .and_then(|n| n.parse::<usize>().ok())
            {
                seen[i] = true;
            }
        }
        seen.iter().all(|s| *s).then_some(())
    })?;
    let handed = wait_for_reports(&relay, |r| r.iter().map(|w| w.exit.handed_off).sum())?;
    ensure!(handed > 0, "no flow was handed between workers");

    // A new handshake (as a rekey makes) keeps the tunnel working both ways.
    let before = client.handshakes(0);
    client.initiate(0)?;
    let end = Instant::now() + WAIT;
    while client.handshakes(0) <= before {
        ensure!(Instant::now() < end, "the new handshake did not complete");
        client.recv(Duration::from_millis(10))?;
    }
    client.send_ip(
        0,
        &ipv4_udp(PEER_IP, NODE_IP, PEER_PORT, SERVER_PORT, b"again"),
    )?;
    let (got, _) = pump_until(&mut client, |_| server_recv(&server))?;
    ensure!(got == b"again");
    ensure!(client.handshakes(0) > before, "no new handshake completed");

    // `wg show`: the node reports the tunnel, its endpoint and its bytes.
    let statuses = relay.dp.peer_statuses(WAIT);
    ensure!(statuses.len() == 1, "{statuses:?}");
    ensure!(
        statuses[0].rx_bytes > 0 && statuses[0].tx_bytes > 0,
        "{statuses:?}"
    );
    ensure!(statuses[0].latest_handshake_secs_ago.is_some());
    ensure!(statuses[0].endpoint == Some(client_addr(&client)?));

    // Removing the peer ends its tunnel: its packets no longer reach the stack, and
    // packets for it are dropped as unroutable.
    let drops = dropped(&relay, DropReason::ExitNoRoute);
    relay.set_table(ExitTable::new(2, vec![])?.with_peers(vec![])?);
    let end = Instant::now() + WAIT;
    while !relay.dp.peer_statuses(WAIT).is_empty() {
        ensure!(Instant::now() < end, "the removed peer's tunnel stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
    client.send_ip(
        0,
        &ipv4_udp(PEER_IP, NODE_IP, PEER_PORT, SERVER_PORT, b"gone"),
    )?;
    server.send_to(b"for the removed peer", peer_addr)?;
    wait_drops(&relay, DropReason::ExitNoRoute, drops + 1)?;
    std::thread::sleep(Duration::from_millis(200));
    ensure!(
        server_recv(&server).is_none(),
        "a removed peer's packet arrived"
    );

    // A peer with an endpoint: the node's first packet for it starts the handshake, as a
    // WireGuard client does, and the answer comes back to the worker that sent it.
    let mut remote = WgNode::bind(any_loopback(), KeyPair::generate())?;
    remote.add_peer(
        boringtun::x25519::PublicKey::from(node_public.0),
        PeerOptions::default(),
    );
    let remote_ip = Ipv4Addr::new(10, 99, 0, 50);
    let remote_peer = PeerSpec {
        public_key: remote.keys().relay_key(),
        name: "server".into(),
        allowed_ips: vec![format!("{remote_ip}/32").parse().expect("literal")],
        preshared_key: None,
        allowed_exits: vec![],
        endpoint: Some(remote.local_addr()),
        persistent_keepalive: None,
    };
    relay.set_table(ExitTable::new(3, vec![])?.with_peers(vec![remote_peer])?);
    let end = Instant::now() + WAIT;
    while relay.dp.reports().iter().any(|r| r.table_generation < 3) {
        ensure!(Instant::now() < end, "the workers did not take the table");
        std::thread::sleep(Duration::from_millis(10));
    }
    server.send_to(b"hello remote", (remote_ip, 6000))?;
    ensure!(pump_until(&mut remote, |r| packet_payload(
        r,
        b"hello remote"
    ))?);
    remote.send_ip(
        0,
        &ipv4_udp(remote_ip, NODE_IP, 6000, SERVER_PORT, b"hello node"),
    )?;
    let (got, from) = pump_until(&mut remote, |_| server_recv(&server))?;
    ensure!(
        got == b"hello node" && from == SocketAddr::from((remote_ip, 6000)),
        "{got:?} from {from}"
    );
    Ok(())
}

/// Cookie under load (DESIGN §10, WireGuard paper §5.4.7) for an Exit peer: while
/// initiations with a valid mac1 come faster than a worker's handshake budget, a new
/// peer's initiation is answered with a cookie reply instead of a DH; the client retries
/// with the cookie as mac2 (after REKEY_TIMEOUT), gets in, and traffic flows both ways
/// through the TUN device.
#[test]
fn netns_exit_tun_a_new_peer_under_handshake_load_gets_in_with_a_cookie() {
    in_namespaces(
        "netns_exit_tun_a_new_peer_under_handshake_load_gets_in_with_a_cookie",
        cookie_case,
    );
}

fn cookie_case(backend: BackendChoice) -> Result<()> {
    let mut s = setup(backend)?;
    let mut flood = HandshakeFlood::start(s.node_public, s.relay.addr, 120)?;
    // Under load before the peer's first initiation: the flood is being challenged.
    let challenged = wait_for_reports(&s.relay, |r| r.iter().map(|w| w.zhop.cookie_replies).sum())?;
    ensure!(challenged > 0, "the flood got no cookie reply");
    let started = Instant::now();
    // The first initiation is challenged; the retry comes REKEY_TIMEOUT (5 s) later.
    s.send_to_server(b"under load", Duration::from_secs(25))?;
    let took = started.elapsed();
    let flooded = flood.stop();
    s.send_to_client(b"answer under load")?;
    // Counters as published after this point: everything above is in them.
    let reports = s.relay.dp.reports_after(Instant::now(), WAIT);
    let sum = |f: fn(&wraithgate_relay::zhop::ZhopStats) -> u64| -> u64 {
        reports.iter().map(|w| f(&w.zhop)).sum()
    };
    let (replies, proven, handshakes) = (
        sum(|z| z.cookie_replies),
        sum(|z| z.cookie_proven),
        sum(|z| z.outer_handshakes),
    );
    eprintln!(
        "{}: through after {took:.1?}; {flooded} junk initiations, {replies} cookie replies, \
         {proven} proven by mac2, {handshakes} handshakes",
        backend.as_str()
    );
    ensure!(
        proven >= 1,
        "the peer got in without proving its address with our cookie (proven {proven})"
    );
    ensure!(handshakes >= 1, "no handshake completed");
    // The flood's sources were answered with 64-byte cookie replies from the listener.
    flood
        .probe
        .set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 128];
    let (n, from) = flood.probe.recv_from(&mut buf).context("a cookie reply")?;
    ensure!(
        (n, buf[0], from) == (64, 3, s.relay.addr),
        "{n} bytes of type {} from {from}",
        buf[0]
    );
    // A worker decrypts its budget (100 a second, two seconds' worth on a busy machine)
    // and nothing unproven while the flood lasts; decrypting first would have cost a DH
    // for every junk initiation.
    let decrypted = dropped(&s.relay, DropReason::OuterRejected);
    ensure!(
        decrypted <= 2 * (100 + 2 * 100),
        "{decrypted} junk initiations decrypted while under load"
    );
    Ok(())
}

/// WireGuard roaming for an Exit peer (DESIGN §2): a replayed, a forged and a garbage
/// transport packet from a new address move nothing (the node keeps sending the TUN's
/// packets to the peer's old endpoint, none to the new address); an authenticated packet
/// from a new address moves the endpoint there, and the TUN's packets follow.
#[test]
fn netns_exit_tun_a_peer_roams_only_on_an_authenticated_packet() {
    in_namespaces(
        "netns_exit_tun_a_peer_roams_only_on_an_authenticated_packet",
        roaming_case,
    );
}

fn roaming_case(backend: BackendChoice) -> Result<()> {
    let mut s = setup(backend)?;
    s.send_to_server(b"from the first address", WAIT)?;
    let real = s.client.local_addr();
    ensure!(s.endpoint_seen()? == Some(real));
    // The attacker sits on the worker holding the tunnel, where a move could happen.
    let worker = worker_of(real);
    let attacker = UdpSocket::bind(address_on_worker(worker, real))?;
    attacker.set_read_timeout(Some(Duration::from_millis(300)))?;
    // A keepalive the peer really sends, then the same bytes from the attacker.
    let keepalive = s.client.seal(0, &[]).context("a session")?;
    s.client.socket_clone()?.send_to(&keepalive, s.relay.addr)?;
    attacker.send_to(&keepalive, s.relay.addr)?;
    // A fresh one the peer never sent, with one bit of its ciphertext flipped.
    let mut forged = s.client.seal(0, &[]).context("a session")?;
    let last = forged.len() - 1;
    forged[last] ^= 1;
    attacker.send_to(&forged, s.relay.addr)?;
    // Garbage naming the tunnel's index.
    let mut garbage = vec![0u8; 64];
    rand::Rng::fill(&mut rand::thread_rng(), &mut garbage[..]);
    garbage[..4].copy_from_slice(&[4, 0, 0, 0]);
    garbage[4..8].copy_from_slice(&keepalive[4..8]);
    attacker.send_to(&garbage, s.relay.addr)?;
    wait_drops(&s.relay, DropReason::OuterRejected, 3)?;
    ensure!(
        s.endpoint_seen()? == Some(real),
        "an unauthenticated packet moved the endpoint to {:?}",
        s.endpoint_seen()?
    );
    s.send_to_client(b"still at the first address")?;
    let mut buf = [0u8; 2048];
    ensure!(
        attacker.recv_from(&mut buf).is_err(),
        "the node sent something to the attacker's address"
    );

    // The peer roams (on the same worker: roaming onto another is a documented limit) and
    // its next packet authenticates from there.
    let new = address_on_worker(worker, real);
    s.client.rebind(new)?;
    s.send_to_server(b"from the new address", WAIT)?;
    ensure!(
        s.endpoint_seen()? == Some(new),
        "the endpoint did not move to {new}: {:?}",
        s.endpoint_seen()?
    );
    for i in 0..5 {
        s.send_to_client(format!("to the new address {i}").as_bytes())?;
    }
    Ok(())
}

fn client_addr(client: &WgNode) -> Result<SocketAddr> {
    Ok(client.local_addr())
}

/// One datagram the stack received on the server socket, if any.
fn server_recv(server: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    server
        .recv_from(&mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

fn packet_payload(r: &Received, want: &[u8]) -> Option<bool> {
    match r {
        Received::Packet { data, .. } if udp_payload(data) == Some(want) => Some(true),
        _ => None,
    }
}

/// Receives on the client (running its timers) until `done`, given each thing it got
/// (and asked again every 10 ms), says it is done.
fn pump_until<T>(client: &mut WgNode, done: impl FnMut(&Received) -> Option<T>) -> Result<T> {
    pump_until_within(client, WAIT, done)
}

/// [`pump_until`], giving up after `within`.
fn pump_until_within<T>(
    client: &mut WgNode,
    within: Duration,
    mut done: impl FnMut(&Received) -> Option<T>,
) -> Result<T> {
    let end = Instant::now() + within;
    let mut last_tick = Instant::now();
    while Instant::now() < end {
        let r = match client.recv(Duration::from_millis(10)) {
            Ok(r) => r.unwrap_or(Received::Control { peer: usize::MAX }),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if let Some(t) = done(&r) {
            return Ok(t);
        }
        if last_tick.elapsed() >= Duration::from_millis(100) {
            client.tick();
            last_tick = Instant::now();
        }
    }
    bail!("timed out")
}

fn dropped(relay: &Relay, reason: DropReason) -> u64 {
    relay
        .dp
        .reports()
        .iter()
        .map(|r| r.router.dropped(reason))
        .sum()
}

fn wait_drops(relay: &Relay, reason: DropReason, at_least: u64) -> Result<()> {
    let end = Instant::now() + WAIT;
    while dropped(relay, reason) < at_least {
        ensure!(
            Instant::now() < end,
            "{reason} stayed below {at_least}: {}",
            dropped(relay, reason)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits (up to [`WAIT`]) until `f` over the workers' reports is non-zero, and returns it.
fn wait_for_reports(
    relay: &Relay,
    f: impl Fn(&[wraithgate_relay::io::WorkerReport]) -> u64,
) -> Result<u64> {
    let end = Instant::now() + WAIT;
    loop {
        let v = f(&relay.dp.reports());
        if v > 0 || Instant::now() >= end {
            return Ok(v);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the UDP checksum of an IPv4 packet verifies (a zero one, "none", does not).
fn udp_checksum_ok(ip: &[u8]) -> bool {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let udp = &ip[ihl..];
    if udp.len() < 8 || udp[6..8] == [0, 0] {
        return false;
    }
    let mut sum: u32 = 17 + udp.len() as u32;
    for c in ip[12..20].chunks(2).chain(udp.chunks(2)) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}
