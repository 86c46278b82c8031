//! Z-HOP over real loopback sockets: a client with an outer and an inner boringtun tunnel,
//! the relay terminating the outer one, and a boringtun exit terminating the inner one.

use std::net::SocketAddr;
use std::time::Duration;

use wraithgate_control::endpoints::{
    ipv4_udp, tunnel_addrs, udp_payload, KeyPair, PeerOptions, Received, WgNode, ZhopClient,
};
use wraithgate_relay::io::BackendChoice;
use wraithgate_relay::table::{ExitTable, PeerSpec};
use wraithgate_relay::zhop::NodeKey;
use wraithgate_relay::DropReason;
use wraithgate_testkit::wait_for;
use wraithgate_tests::flood::HandshakeFlood;
use wraithgate_tests::{address_on_worker, backends, exit_spec, node, worker_of, Relay};

const WAIT: Duration = Duration::from_secs(10);

struct Setup {
    relay: Relay,
    exit: WgNode,
    other_exit: WgNode,
    client: ZhopClient,
    exit_peer: usize,
    peer: PeerSpec,
    node_public: wraithgate_relay::PublicKey,
}

fn setup(backend: BackendChoice) -> Setup {
    let node_secret: [u8; 32] = rand::random();
    let node_key = NodeKey::from_secret(node_secret);
    let mut exit = node();
    let other_exit = node();
    let (outer, inner) = (KeyPair::generate(), KeyPair::generate());
    let exit_peer = exit.add_peer(inner.public, PeerOptions::default());
    let peer = PeerSpec {
        public_key: outer.relay_key(),
        name: "zed".into(),
        allowed_ips: vec!["10.7.0.0/24".parse().unwrap()],
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: None,
        allowed_exits: vec![exit.keys().relay_key()],
    };
    let table = ExitTable::new(
        1,
        vec![
            exit_spec("exit", &exit, None),
            exit_spec("other", &other_exit, None),
        ],
    )
    .unwrap()
    .with_peers(vec![peer.clone()])
    .unwrap();
    let relay = Relay::start_zhop(backend, table, node_secret);
    let client = ZhopClient::new(
        outer,
        inner,
        relay.addr,
        boringtun::x25519::PublicKey::from(node_key.public_key().0),
        exit.keys().public,
        exit.local_addr(),
        "10.7.0.2:40000".parse().unwrap(),
    )
    .unwrap();
    Setup {
        relay,
        exit,
        other_exit,
        client,
        exit_peer,
        peer,
        node_public: node_key.public_key(),
    }
}

/// Pumps the client and the exit until `done` says so for something one of them got.
fn pump(s: &mut Setup, timeout: Duration, mut done: impl FnMut(bool, &Received) -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    let mut last_tick = std::time::Instant::now();
    while std::time::Instant::now() < end {
        let mut idle = true;
        while let Ok(Some(r)) = s.client.try_recv() {
            idle = false;
            if done(true, &r) {
                return true;
            }
        }
        while let Ok(Some(r)) = s.exit.try_recv() {
            idle = false;
            if done(false, &r) {
                return true;
            }
        }
        if last_tick.elapsed() > Duration::from_millis(100) {
            s.client.tick();
            s.exit.tick();
            last_tick = std::time::Instant::now();
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    false
}

/// Sends `body` through both tunnels and waits until the exit has it: both layers have
/// handshaken and the flow's socket is open. Returns the inner source and destination.
fn opened(s: &mut Setup, body: &[u8]) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let (src, dst) = tunnel_addrs(2);
    s.client
        .send_ip(&ipv4_udp(src, dst, 1000, 9, body))
        .unwrap();
    assert!(pump(s, WAIT, wants(body)), "the first packet never arrived");
    (src, dst)
}

fn wants(body: &[u8]) -> impl FnMut(bool, &Received) -> bool + '_ {
    move |_, r| matches!(r, Received::Packet { data, .. } if udp_payload(data) == Some(body))
}

#[test]
fn both_layers_handshake_and_carry_data_both_ways() {
    for backend in backends() {
        let mut s = setup(backend);
        let (src, dst) = tunnel_addrs(2);
        s.client
            .send_ip(&ipv4_udp(src, dst, 1000, 9, b"through two tunnels"))
            .unwrap();
        assert!(
            pump(&mut s, WAIT, |at_client, r| !at_client
                && matches!(r, Received::Packet { data, .. } if udp_payload(data) == Some(&b"through two tunnels"[..]))),
            "inner packet never reached the exit"
        );
        // The exit sees the relay's flow socket, not the client.
        let seen: SocketAddr = s.exit.endpoint(s.exit_peer).unwrap();
        assert_eq!(seen.ip(), s.relay.addr.ip());
        assert_ne!(seen, s.client.outer.local_addr());
        for i in 0..20u32 {
            let body = format!("reply {i}").into_bytes();
            s.exit
                .send_ip(s.exit_peer, &ipv4_udp(dst, src, 9, 1000, &body))
                .unwrap();
            assert!(pump(&mut s, WAIT, wants(&body)), "reply {i} lost");
            let body = format!("request {i}").into_bytes();
            s.client
                .send_ip(&ipv4_udp(src, dst, 1000, 9, &body))
                .unwrap();
            assert!(pump(&mut s, WAIT, wants(&body)), "request {i} lost");
        }
        std::thread::sleep(Duration::from_millis(120));
        let z: u64 = s
            .relay
            .dp
            .reports()
            .iter()
            .map(|r| r.zhop.outer_handshakes)
            .sum();
        // boringtun may repeat an initiation whose answer crossed its retry timer.
        assert!((1..=2).contains(&z), "{z} outer handshakes");
        let to_exit: u64 = s
            .relay
            .dp
            .reports()
            .iter()
            .map(|r| r.zhop.inner_to_exit.packets)
            .sum();
        assert!(to_exit >= 22, "{to_exit}");
        assert_eq!(s.relay.stats().total_drops(), 0);
    }
}

#[test]
fn inner_packets_to_forbidden_destinations_or_from_spoofed_sources_are_dropped() {
    for backend in backends() {
        let mut s = setup(backend);
        let (src, dst) = opened(&mut s, b"open");
        // To an exit the peer is not allowed to use, and to an arbitrary address.
        let other = s.other_exit.local_addr();
        let inner_from = s.client.inner_addr;
        s.client
            .send_ip_as(&ipv4_udp(src, dst, 1, 2, b"x"), inner_from, other)
            .unwrap();
        s.client
            .send_ip_as(
                &ipv4_udp(src, dst, 1, 2, b"x"),
                inner_from,
                "127.0.0.1:9".parse().unwrap(),
            )
            .unwrap();
        // From an inner address outside the peer's allowed IPs.
        s.client
            .send_ip_as(
                &ipv4_udp(src, dst, 1, 2, b"x"),
                "10.8.0.2:40000".parse().unwrap(),
                s.client.exit,
            )
            .unwrap();
        let mut other_exit = s.other_exit;
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            other_exit.try_recv().unwrap().is_none(),
            "nothing may reach the forbidden exit"
        );
        let st = s.relay.stats();
        assert_eq!(
            st.dropped(DropReason::InnerForbiddenDestination),
            2,
            "{st:?}"
        );
        assert_eq!(st.dropped(DropReason::InnerSpoofedSource), 1, "{st:?}");
        let flows: u64 = s.relay.dp.reports().iter().map(|r| r.zhop.flows).sum();
        assert_eq!(flows, 1, "refused packets open no socket");
    }
}

#[test]
fn removing_the_peer_ends_its_tunnel() {
    for backend in backends() {
        let mut s = setup(backend);
        let (src, dst) = opened(&mut s, b"before");
        let exits = vec![
            exit_spec("exit", &s.exit, None),
            exit_spec("other", &s.other_exit, None),
        ];
        s.relay.set_table(ExitTable::new(2, exits.clone()).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        s.client
            .send_ip(&ipv4_udp(src, dst, 1000, 9, b"after"))
            .unwrap();
        assert!(
            !pump(&mut s, Duration::from_millis(700), wants(b"after")),
            "a removed peer's traffic still flows"
        );
        // A new outer handshake is refused too.
        s.client.outer.initiate(0).unwrap();
        let st = s
            .relay
            .stats_when(|st| st.dropped(DropReason::UnknownPeer) >= 1);
        assert!(st.dropped(DropReason::UnknownPeer) >= 1, "{st:?}");
        let peers: u64 = s.relay.dp.reports().iter().map(|r| r.zhop.peers).sum();
        assert_eq!(peers, 0);
        // Provisioned again, it works again after a fresh handshake.
        s.relay.set_table(
            ExitTable::new(3, exits)
                .unwrap()
                .with_peers(vec![s.peer.clone()])
                .unwrap(),
        );
        std::thread::sleep(Duration::from_millis(200));
        s.client.outer.initiate(0).unwrap();
        pump(&mut s, Duration::from_millis(500), |_, _| false);
        s.client
            .send_ip(&ipv4_udp(src, dst, 1000, 9, b"again"))
            .unwrap();
        assert!(
            pump(&mut s, WAIT, wants(b"again")),
            "no traffic after re-provisioning"
        );
    }
}

#[test]
fn doublehop_and_zhop_share_one_relay() {
    for backend in backends() {
        let mut s = setup(backend);
        let (src, dst) = opened(&mut s, b"zhop");
        // A plain DoubleHop client of the other exit through the same listen address.
        let mut other = s.other_exit;
        let mut dh = node();
        let p = dh.add_peer(
            other.keys().public,
            PeerOptions {
                endpoint: Some(s.relay.addr),
                ..Default::default()
            },
        );
        other.add_peer(dh.keys().public, PeerOptions::default());
        dh.send_ip(p, &ipv4_udp(src, dst, 1, 2, b"doublehop"))
            .unwrap();
        let mut nodes: Vec<&mut WgNode> = vec![&mut other, &mut dh];
        assert!(wraithgate_tests::pump(&mut nodes, WAIT, |i, r| i == 0
            && matches!(r, Received::Packet { .. })));
    }
}

/// Sums a Z-HOP counter over the relay's workers.
fn zhop_sum(s: &Setup, f: impl Fn(&wraithgate_relay::zhop::ZhopStats) -> u64) -> u64 {
    s.relay.dp.reports().iter().map(|r| f(&r.zhop)).sum()
}

/// A flood of initiations with the node's mac1 from many source addresses is answered with
/// cookie replies, not DH operations (past each worker's budget), while a real client,
/// challenged like everyone, retries with the cookie as mac2, completes both handshakes and
/// carries data.
#[test]
fn a_flood_of_valid_mac1_initiations_is_challenged_and_a_real_client_gets_through() {
    const SOURCES: u32 = 120;
    for backend in backends() {
        let mut s = setup(backend);
        let mut flood = HandshakeFlood::start(s.node_public, s.relay.addr, SOURCES).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let started = std::time::Instant::now();
        let (src, dst) = tunnel_addrs(2);
        s.client
            .send_ip(&ipv4_udp(src, dst, 1000, 9, b"under load"))
            .unwrap();
        // The client's retry comes REKEY_TIMEOUT (5 s) after its challenge.
        let through = pump(&mut s, Duration::from_secs(20), wants(b"under load"));
        let took = started.elapsed();
        let flooded = flood.stop();
        assert!(through, "the real client never got through the flood");
        eprintln!("{backend:?}: through after {took:?}");
        // And data both ways afterwards.
        s.exit
            .send_ip(s.exit_peer, &ipv4_udp(dst, src, 9, 1000, b"reply"))
            .unwrap();
        assert!(
            pump(&mut s, WAIT, wants(b"reply")),
            "no reply after the flood"
        );

        // The flood's sources got cookie replies (what they would answer with mac2).
        flood
            .probe
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 128];
        let (n, from) = flood.probe.recv_from(&mut buf).expect("a cookie reply");
        assert_eq!((n, buf[0], from), (64, 3, s.relay.addr));

        std::thread::sleep(Duration::from_millis(120));
        let st = s.relay.stats();
        let (replies, proven) = (
            zhop_sum(&s, |z| z.cookie_replies),
            zhop_sum(&s, |z| z.cookie_proven),
        );
        eprintln!(
            "{backend:?}: {flooded} sent, {replies} cookie replies, {proven} proven, {} decrypted and refused",
            st.dropped(DropReason::OuterRejected)
        );
        assert_eq!(st.dropped(DropReason::CookieChallenge), replies, "{st:?}");
        assert!(
            replies >= flooded / 2,
            "{replies} cookie replies for {flooded}"
        );
        assert!(proven >= 1, "the client's retry carried our cookie");
        // A worker decrypts its budget (100, plus what refills until the flood has spent
        // it: allow two seconds' worth on a busy machine) and nothing unproven while the
        // flood lasts; a relay that decrypts first would have decrypted every one.
        let budget = 2 * (100 + 2 * 100);
        assert!(
            st.dropped(DropReason::OuterRejected) <= budget,
            "{} junk initiations decrypted (budget {budget}): {st:?}",
            st.dropped(DropReason::OuterRejected)
        );
    }
}

/// Moves the client's outer tunnel to a new socket that the relay steers to `worker` (a
/// client roaming to a new address); returns the new address.
fn roam(s: &mut Setup, worker: usize) -> SocketAddr {
    let old = s.client.outer.local_addr();
    let new = address_on_worker(worker, old);
    s.client.outer.rebind(new).unwrap();
    new
}

/// WireGuard roaming: once an authenticated packet comes from the peer's new address (on
/// the worker holding its tunnel), replies go there.
#[test]
fn a_peer_that_roams_is_answered_at_its_new_address() {
    for backend in backends() {
        let mut s = setup(backend);
        let (src, dst) = opened(&mut s, b"from the first address");
        let worker = worker_of(s.client.outer.local_addr());
        let new = roam(&mut s, worker);
        s.client
            .send_ip(&ipv4_udp(src, dst, 1000, 9, b"from the new address"))
            .unwrap();
        assert!(
            pump(&mut s, WAIT, wants(b"from the new address")),
            "nothing from the new address reached the exit"
        );
        for i in 0..5 {
            let body = format!("reply {i} to the new address").into_bytes();
            s.exit
                .send_ip(s.exit_peer, &ipv4_udp(dst, src, 9, 1000, &body))
                .unwrap();
            assert!(
                pump(&mut s, WAIT, wants(&body)),
                "reply {i} did not reach {new}"
            );
        }
        assert_eq!(s.client.outer.local_addr(), new);
        assert_eq!(s.relay.stats().total_drops(), 0, "{:?}", s.relay.stats());
        let handshakes: u64 = zhop_sum(&s, |z| z.outer_handshakes);
        assert_eq!(handshakes, 1, "roaming needed no new handshake");
    }
}

/// A packet from another address that does not authenticate — a replay of one the peer
/// sent, or a forged one naming its tunnel — moves nothing: replies still go to the peer,
/// none to the other address.
#[test]
fn a_replayed_or_forged_packet_from_elsewhere_moves_nothing() {
    for backend in backends() {
        let mut s = setup(backend);
        let (src, dst) = opened(&mut s, b"open");
        let real = s.client.outer.local_addr();
        // On the worker holding the tunnel, where a move could happen.
        let attacker = std::net::UdpSocket::bind(address_on_worker(worker_of(real), real)).unwrap();
        attacker
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        // A keepalive the peer really sends, then the same bytes from the attacker.
        let keepalive = s.client.outer.seal(0, &[]).expect("a session");
        s.client
            .outer
            .socket_clone()
            .unwrap()
            .send_to(&keepalive, s.relay.addr)
            .unwrap();
        attacker.send_to(&keepalive, s.relay.addr).unwrap();
        // A fresh one, never sent by the peer, with one bit of its ciphertext flipped.
        let mut forged = s.client.outer.seal(0, &[]).expect("a session");
        let last = forged.len() - 1;
        forged[last] ^= 1;
        attacker.send_to(&forged, s.relay.addr).unwrap();
        let st = s
            .relay
            .stats_when(|st| st.dropped(DropReason::OuterRejected) >= 2);
        assert_eq!(st.dropped(DropReason::OuterRejected), 2, "{st:?}");
        s.exit
            .send_ip(s.exit_peer, &ipv4_udp(dst, src, 9, 1000, b"still yours"))
            .unwrap();
        assert!(
            pump(&mut s, WAIT, wants(b"still yours")),
            "the reply did not reach the peer at {real}"
        );
        let mut buf = [0u8; 2048];
        assert!(
            attacker.recv_from(&mut buf).is_err(),
            "the relay sent something to the attacker's address"
        );
    }
}

/// Workers hold their own tunnels, and the kernel steers a client to a worker by its
/// address; a peer that roams onto the other worker is dropped there (that worker has no
/// tunnel of it) until the client gives up on the session and handshakes again, which a
/// WireGuard client does when it has sent data and heard nothing for KEEPALIVE +
/// REKEY_TIMEOUT (15 s). Then it works again, both ways.
#[test]
fn a_peer_that_roams_to_another_worker_recovers_after_its_next_handshake() {
    for backend in backends() {
        let mut s = setup(backend);
        let (src, dst) = opened(&mut s, b"open");
        let worker = worker_of(s.client.outer.local_addr());
        roam(&mut s, 1 - worker);
        let roamed = std::time::Instant::now();
        let mut next = 0u32;
        let mut through = None;
        while roamed.elapsed() < Duration::from_secs(40) && through.is_none() {
            let body = format!("after roaming {next}").into_bytes();
            next += 1;
            s.client
                .send_ip(&ipv4_udp(src, dst, 1000, 9, &body))
                .unwrap();
            if pump(&mut s, Duration::from_millis(250), |at_client, r| {
                !at_client
                    && matches!(r, Received::Packet { data, .. }
                        if udp_payload(data).is_some_and(|b| b.starts_with(b"after roaming")))
            }) {
                through = Some(roamed.elapsed());
            }
        }
        let took = through.expect("the roamed peer never recovered");
        eprintln!("{backend:?}: data through again {took:?} after roaming to the other worker");
        // Until then its packets were dropped and counted (the other worker has no tunnel
        // of it, so they are nobody's), not sent anywhere.
        let st = s.relay.stats();
        assert!(st.dropped(DropReason::UnknownClient) >= 1, "{st:?}");
        s.exit
            .send_ip(s.exit_peer, &ipv4_udp(dst, src, 9, 1000, b"back"))
            .unwrap();
        assert!(
            pump(&mut s, WAIT, wants(b"back")),
            "no reply after recovery"
        );
        let per_worker: Vec<u64> = s.relay.dp.reports().iter().map(|r| r.zhop.peers).collect();
        assert_eq!(per_worker[1 - worker], 1, "{per_worker:?}");
    }
}

/// The UDP checksum of an IPv6 packet, computed here from RFC 8200 §8.1 and RFC 768 (not
/// with the relay's code): the one's complement of the one's-complement sum of the
/// pseudo-header (source, destination, 32-bit upper-layer length, three zero bytes, next
/// header 17) and the UDP datagram with its checksum field zero, padded to an even length;
/// a result of zero is sent as 0xffff.
fn rfc8200_udp_checksum(ip: &[u8]) -> u16 {
    let udp_len = usize::from(u16::from_be_bytes([ip[44], ip[45]]));
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    let mut udp = ip[40..40 + udp_len].to_vec();
    udp[6] = 0;
    udp[7] = 0;
    pseudo.extend_from_slice(&udp);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut total: u64 = pseudo
        .chunks(2)
        .map(|w| u64::from(w[0]) << 8 | u64::from(w[1]))
        .sum();
    while total > 0xffff {
        total = (total >> 16) + (total & 0xffff);
    }
    match !(total as u16) {
        0 => 0xffff,
        c => c,
    }
}

/// Z-HOP with IPv6 inside the outer tunnel (a peer whose inner interface has an IPv6
/// address, an exit on ::1): the relay's replies are IPv6/UDP packets whose headers and
/// checksums are what an independent computation from the RFCs says.
#[test]
fn ipv6_inner_replies_have_the_checksum_rfc_8200_gives() {
    for backend in backends() {
        let node_secret: [u8; 32] = rand::random();
        let node_key = NodeKey::from_secret(node_secret);
        let mut exit = WgNode::bind("[::1]:0".parse().unwrap(), KeyPair::generate()).unwrap();
        let (outer, inner) = (KeyPair::generate(), KeyPair::generate());
        let exit_peer = exit.add_peer(inner.public, PeerOptions::default());
        let peer = PeerSpec {
            public_key: outer.relay_key(),
            name: "six".into(),
            allowed_ips: vec!["fd00:7::/64".parse().unwrap()],
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_exits: vec![exit.keys().relay_key()],
        };
        let table = ExitTable::new(1, vec![exit_spec("exit6", &exit, None)])
            .unwrap()
            .with_peers(vec![peer.clone()])
            .unwrap();
        let relay = Relay::start_zhop(backend, table, node_secret);
        let inner_addr: SocketAddr = "[fd00:7::2]:40000".parse().unwrap();
        let client = ZhopClient::new(
            outer,
            inner,
            relay.addr,
            boringtun::x25519::PublicKey::from(node_key.public_key().0),
            exit.keys().public,
            exit.local_addr(),
            inner_addr,
        )
        .unwrap();
        let mut s = Setup {
            relay,
            other_exit: node(),
            exit,
            client,
            exit_peer,
            peer,
            node_public: node_key.public_key(),
        };
        let (src, dst) = opened(&mut s, b"over ipv6");
        // Replies of many lengths; read them straight off the outer tunnel.
        for len in [1usize, 15, 16, 17, 100, 555, 1200] {
            s.exit
                .send_ip(s.exit_peer, &ipv4_udp(dst, src, 9, 1000, &vec![0xc3; len]))
                .unwrap();
            let ip = wait_for(WAIT, || match s.client.outer.try_recv() {
                Ok(Some(Received::Packet { data, .. })) => Some(data),
                _ => None,
            })
            .expect("a reply through the outer tunnel");
            assert_eq!(ip[0] >> 4, 6, "an IPv6 packet");
            let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            assert_eq!(40 + payload_len, ip.len());
            assert_eq!((ip[6], ip[7] > 0), (17, true), "UDP, a hop limit");
            let v6 = |a: SocketAddr| match a.ip() {
                std::net::IpAddr::V6(a) => a.octets(),
                std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            assert_eq!(ip[8..24], v6(s.exit.local_addr()), "from the exit");
            assert_eq!(ip[24..40], v6(inner_addr), "to the peer's inner address");
            assert_eq!(
                u16::from_be_bytes([ip[40], ip[41]]),
                s.exit.local_addr().port()
            );
            assert_eq!(u16::from_be_bytes([ip[42], ip[43]]), inner_addr.port());
            assert_eq!(
                usize::from(u16::from_be_bytes([ip[44], ip[45]])),
                payload_len
            );
            let sent = u16::from_be_bytes([ip[46], ip[47]]);
            assert_eq!(sent, rfc8200_udp_checksum(&ip), "{len}-byte reply");
        }
        // And the builder on its own at lengths the relay never sends (odd ones).
        for len in [0usize, 1, 3, 149, 1421] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let mut ip = Vec::new();
            wraithgate_relay::inner::build_udp(
                &mut ip,
                "[2001:db8::1]:51820".parse().unwrap(),
                "[fd00::ffff:2]:65535".parse().unwrap(),
                &payload,
            );
            assert_eq!(
                u16::from_be_bytes([ip[46], ip[47]]),
                rfc8200_udp_checksum(&ip)
            );
        }
        assert_eq!(s.relay.stats().total_drops(), 0, "{:?}", s.relay.stats());
    }
}

/// Sums a counter over the relay's workers.
fn io_sum(s: &Setup, f: impl Fn(&wraithgate_relay::io::IoStats) -> u64) -> u64 {
    s.relay.dp.reports().iter().map(|r| f(&r.io)).sum()
}

/// Sends bursts of equal-sized inner packets (numbered) one way until the relay has sent
/// some of them as GSO trains, and checks that everything that arrived arrived in order.
fn burst_until_trains(s: &mut Setup, to_exit: bool) -> (u64, u64) {
    const BURST: u32 = 64;
    let (src, dst) = tunnel_addrs(2);
    let before = (
        io_sum(s, |io| io.zhop_trains_sent),
        io_sum(s, |io| io.zhop_segments_in_trains),
    );
    let mut next = 0u32;
    let mut last_seen = None::<u32>;
    for _ in 0..30 {
        for _ in 0..BURST {
            let mut body = vec![0xa5u8; 1000];
            body[..4].copy_from_slice(&next.to_be_bytes());
            next += 1;
            if to_exit {
                s.client
                    .send_ip(&ipv4_udp(src, dst, 1000, 9, &body))
                    .unwrap();
            } else {
                s.exit
                    .send_ip(s.exit_peer, &ipv4_udp(dst, src, 9, 1000, &body))
                    .unwrap();
            }
        }
        let end = next;
        pump(s, Duration::from_millis(500), |at_client, r| {
            // The exit receives what goes to it; the client what goes to the peer.
            if at_client == to_exit {
                return false;
            }
            let Received::Packet { data, .. } = r else {
                return false;
            };
            let Some(body) = udp_payload(data) else {
                return false;
            };
            if body.len() != 1000 {
                return false;
            }
            let n = u32::from_be_bytes(body[..4].try_into().unwrap());
            assert!(
                last_seen.is_none_or(|l| n > l),
                "datagram {n} arrived after {last_seen:?}: trains reordered"
            );
            last_seen = Some(n);
            n + 1 == end
        });
        // Counters are published every 50 ms.
        std::thread::sleep(Duration::from_millis(60));
        let trains = io_sum(s, |io| io.zhop_trains_sent) - before.0;
        if trains > 0 {
            let segments = io_sum(s, |io| io.zhop_segments_in_trains) - before.1;
            return (trains, segments);
        }
    }
    (0, 0)
}

#[test]
fn bursts_of_inner_packets_leave_as_gso_trains_in_order() {
    for backend in backends() {
        let mut s = setup(backend);
        opened(&mut s, b"open");
        // Towards the exit (ToExit, one flow socket), then towards the peer (ToPeer, from
        // the listener to its endpoint).
        for to_exit in [true, false] {
            let (trains, segments) = burst_until_trains(&mut s, to_exit);
            eprintln!("{backend:?}, to exit: {to_exit}: {segments} datagrams in {trains} trains");
            assert!(
                trains > 0,
                "{backend:?}: no train formed (to exit: {to_exit})"
            );
            assert!(
                segments >= 2 * trains,
                "{backend:?}: {segments} datagrams in {trains} trains"
            );
        }
        assert_eq!(
            io_sum(&s, |io| io.gso_fallbacks),
            0,
            "loopback takes GSO sends"
        );
        assert_eq!(s.relay.stats().total_drops(), 0, "{:?}", s.relay.stats());
    }
}
