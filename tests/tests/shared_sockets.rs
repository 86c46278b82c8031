//! `[relay] exit_sockets = "shared"` over real loopback sockets: boringtun clients and exits
//! that know nothing of the relay, sessions of different exits on one exit-facing socket.
//! Every test runs against every backend.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use wraithgate_control::endpoints::{
    ipv4_udp, tunnel_addrs, udp_payload, KeyPair, PeerOptions, Received, WgNode, ZhopClient,
};
use wraithgate_relay::io::{BackendChoice, DataPlaneConfig, ExitSockets};
use wraithgate_relay::table::{ExitTable, PeerSpec};
use wraithgate_relay::zhop::NodeKey;
use wraithgate_relay::DropReason;
use wraithgate_tests::{backends, deliver, exit_spec, node, pair, pump, Relay};

const WAIT: Duration = Duration::from_secs(10);

fn ip(client: u8, body: &[u8]) -> Vec<u8> {
    let (s, d) = tunnel_addrs(client);
    ipv4_udp(s, d, 40000, 9, body)
}

fn reply(client: u8, body: &[u8]) -> Vec<u8> {
    let (s, d) = tunnel_addrs(client);
    ipv4_udp(d, s, 9, 40000, body)
}

/// A relay with one worker (so every session is on the same worker's sockets) sharing its
/// exit-facing sockets between exits.
fn shared_relay(backend: BackendChoice, exits: &[(&str, &WgNode)]) -> Relay {
    let specs = exits.iter().map(|(n, e)| exit_spec(n, e, None)).collect();
    Relay::start_config(
        ExitTable::new(1, specs).expect("valid test table"),
        DataPlaneConfig {
            backend,
            workers: 1,
            exit_sockets: ExitSockets::Shared,
            ..Relay::config()
        },
    )
}

fn for_each_backend(f: impl Fn(BackendChoice)) {
    for b in backends() {
        eprintln!("backend: {}", b.as_str());
        f(b);
    }
}

/// Whether some socket of this machine holds UDP port `port` (bound to any address).
fn port_taken(port: u16) -> bool {
    UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).is_err()
}

fn shared_sockets(relay: &Relay) -> u64 {
    let since = Instant::now();
    relay
        .dp
        .reports_after(since, WAIT)
        .iter()
        .map(|r| r.io.shared_exit_sockets)
        .sum()
}

/// Two clients of two exits share one exit-facing socket: both exits see their client at
/// the same relay address and port, traffic flows both ways for both, and neither exit
/// sees the other's client. A second client of the same exit gets a port of its own.
/// Closing one of the two sessions leaves the other whole; closing both closes the socket.
#[test]
fn sessions_of_two_exits_share_a_socket_and_one_exits_sessions_never_do() {
    for_each_backend(|backend| {
        let (mut x, mut y) = (node(), node());
        let (mut a, mut b, mut c) = (node(), node(), node());
        let relay = shared_relay(backend, &[("x", &x), ("y", &y)]);
        let (ap, xa) = pair(relay.addr, &mut x, &mut a);
        let (bp, yb) = pair(relay.addr, &mut y, &mut b);
        let (cp, xc) = pair(relay.addr, &mut x, &mut c);

        for round in 0..5 {
            let body = format!("round {round}");
            let body = body.as_bytes();
            assert_eq!(
                deliver(
                    &mut a,
                    ap,
                    &mut x,
                    &mut [&mut y, &mut b, &mut c],
                    &ip(1, body),
                    WAIT
                ),
                Some(xa)
            );
            assert_eq!(
                deliver(
                    &mut b,
                    bp,
                    &mut y,
                    &mut [&mut x, &mut a, &mut c],
                    &ip(2, body),
                    WAIT
                ),
                Some(yb)
            );
            assert_eq!(
                deliver(
                    &mut c,
                    cp,
                    &mut x,
                    &mut [&mut y, &mut a, &mut b],
                    &ip(3, body),
                    WAIT
                ),
                Some(xc)
            );
            assert_eq!(
                deliver(
                    &mut x,
                    xa,
                    &mut a,
                    &mut [&mut y, &mut b, &mut c],
                    &reply(1, body),
                    WAIT
                ),
                Some(ap)
            );
            assert_eq!(
                deliver(
                    &mut y,
                    yb,
                    &mut b,
                    &mut [&mut x, &mut a, &mut c],
                    &reply(2, body),
                    WAIT
                ),
                Some(bp)
            );
            assert_eq!(
                deliver(
                    &mut x,
                    xc,
                    &mut c,
                    &mut [&mut y, &mut a, &mut b],
                    &reply(3, body),
                    WAIT
                ),
                Some(cp)
            );
        }
        let seen_a = x.endpoint(xa).expect("x learned a's endpoint");
        let seen_b = y.endpoint(yb).expect("y learned b's endpoint");
        let seen_c = x.endpoint(xc).expect("x learned c's endpoint");
        assert_eq!(
            seen_a, seen_b,
            "a and b, of different exits, share a socket"
        );
        assert_ne!(
            seen_a.port(),
            seen_c.port(),
            "per-client NAT: x sees a and c apart"
        );
        assert_eq!(seen_a.ip(), relay.addr.ip());
        assert_eq!(shared_sockets(&relay), 2);
        let s = relay.stats();
        assert_eq!(s.sessions_established, 3, "{s:?}");
        assert_eq!(s.total_drops(), 0, "{s:?}");
        assert!(port_taken(seen_a.port()));

        // The sessions as the API lists them name their ports.
        let sessions = relay.dp.sessions(WAIT);
        let on = |client: &WgNode| {
            sessions
                .iter()
                .find(|(_, i)| i.client == client.local_addr())
                .map(|(w, i)| (*w, i.slot, i.exit_port))
                .expect("listed")
        };
        let (wa, sa, pa) = on(&a);
        let (wb, sb, pb) = on(&b);
        assert_eq!((pa, pb), (Some(seen_a.port()), Some(seen_a.port())));
        assert_eq!(on(&c).2, Some(seen_c.port()));

        // One of the two closes: the other still works both ways, on the same port.
        assert!(relay.dp.close_session(wa, sa, WAIT));
        for round in 0..3 {
            let body = format!("after a closed {round}");
            let body = body.as_bytes();
            assert_eq!(
                deliver(
                    &mut b,
                    bp,
                    &mut y,
                    &mut [&mut x, &mut c],
                    &ip(2, body),
                    WAIT
                ),
                Some(yb)
            );
            assert_eq!(
                deliver(
                    &mut y,
                    yb,
                    &mut b,
                    &mut [&mut x, &mut c],
                    &reply(2, body),
                    WAIT
                ),
                Some(bp)
            );
        }
        assert_eq!(y.endpoint(yb), Some(seen_a));
        assert!(port_taken(seen_a.port()));
        assert_eq!(shared_sockets(&relay), 2);

        // Both closed: the socket goes (its port is free again); c's stays.
        assert!(relay.dp.close_session(wb, sb, WAIT));
        let end = Instant::now() + WAIT;
        while port_taken(seen_a.port()) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!port_taken(seen_a.port()), "the emptied socket is closed");
        assert_eq!(shared_sockets(&relay), 1);
        assert!(port_taken(seen_c.port()));
        assert_eq!(
            deliver(&mut c, cp, &mut x, &mut [&mut y], &ip(3, b"c still"), WAIT),
            Some(xc)
        );
        assert_eq!(
            deliver(
                &mut x,
                xc,
                &mut c,
                &mut [&mut y],
                &reply(3, b"c still"),
                WAIT
            ),
            Some(cp)
        );
    });
}

/// A datagram to a shared socket from an address that is none of its sessions' exits is
/// dropped and counted (`shared_socket_stranger`), and reaches no client: the filter a
/// connected socket had in the kernel, kept in the worker.
#[test]
fn a_stranger_on_a_shared_socket_is_dropped_and_counted() {
    for_each_backend(|backend| {
        let (mut x, mut y) = (node(), node());
        let (mut a, mut b) = (node(), node());
        let relay = shared_relay(backend, &[("x", &x), ("y", &y)]);
        let (ap, xa) = pair(relay.addr, &mut x, &mut a);
        let (bp, yb) = pair(relay.addr, &mut y, &mut b);
        assert!(deliver(
            &mut a,
            ap,
            &mut x,
            &mut [&mut y, &mut b],
            &ip(1, b"a"),
            WAIT
        )
        .is_some());
        assert!(deliver(
            &mut b,
            bp,
            &mut y,
            &mut [&mut x, &mut a],
            &ip(2, b"b"),
            WAIT
        )
        .is_some());
        let port = x.endpoint(xa).expect("learned").port();
        assert_eq!(y.endpoint(yb).map(|e| e.port()), Some(port), "shared");

        // A transport message naming a's index as x would send it, and a handshake
        // response, from an address that is neither exit; and a train of them.
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        let mut transport = vec![0u8; 64];
        transport[0] = 4;
        let mut response = vec![0u8; 92];
        response[0] = 2;
        for _ in 0..3 {
            stranger.send_to(&transport, to).unwrap();
            stranger.send_to(&response, to).unwrap();
        }
        send_train(&stranger, to, &vec![transport.clone(); 8]);
        let s = relay.stats_when(|s| s.dropped(DropReason::SharedSocketStranger) >= 14);
        assert_eq!(s.dropped(DropReason::SharedSocketStranger), 14, "{s:?}");
        assert_eq!(s.total_drops(), 14, "{s:?}");
        let mut nodes: Vec<&mut WgNode> = vec![&mut a, &mut b];
        assert!(
            !pump(&mut nodes, Duration::from_millis(300), |_, r| !matches!(
                r,
                Received::Control { .. }
            )),
            "no client hears the stranger"
        );
        // The exits are still heard.
        assert!(deliver(&mut x, xa, &mut a, &mut [&mut b], &reply(1, b"x"), WAIT).is_some());
        assert!(deliver(&mut y, yb, &mut b, &mut [&mut a], &reply(2, b"y"), WAIT).is_some());
    });
}

/// Sends `packets` (equal sizes) from `from` to `to` as one UDP GSO train.
fn send_train(from: &UdpSocket, to: SocketAddr, packets: &[Vec<u8>]) {
    use std::os::fd::AsRawFd;
    use wraithgate_relay::io::sys::{SendBatch, Transmit};
    let train: Vec<u8> = packets.concat();
    let mut batch = SendBatch::new(1);
    let tx = Transmit {
        dest: Some(to),
        contents: &train,
        segment_size: Some(packets[0].len() as u16),
    };
    batch.send(from.as_raw_fd(), &[tx]).expect("GSO send");
}

/// Seals 24 equal packets from `sender` to its `peer`, sends them to `to` as one GSO
/// train, and checks that `receiver` gets every one, in order.
fn train_through(
    sender: &mut WgNode,
    peer: usize,
    receiver: &mut WgNode,
    to: SocketAddr,
    packet: impl Fn(&[u8]) -> Vec<u8>,
) {
    const N: usize = 24;
    let bodies: Vec<Vec<u8>> = (0..N)
        .map(|i| format!("segment {i:04}").repeat(60).into_bytes())
        .collect();
    let sealed: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| sender.seal(peer, &packet(b)).expect("session"))
        .collect();
    send_train(&sender.socket_clone().unwrap(), to, &sealed);
    let mut got = Vec::new();
    let mut nodes: Vec<&mut WgNode> = vec![receiver, sender];
    pump(&mut nodes, WAIT, |i, r| {
        if let (0, Received::Packet { data, .. }) = (i, r) {
            got.push(udp_payload(data).unwrap().to_vec());
        }
        got.len() == N
    });
    assert_eq!(got, bodies, "every segment, in order");
}

/// GRO trains from an exit arrive on a shared socket (one source each, one lookup) and
/// reach their client; a client's trains leave the shared socket as GSO sends naming the
/// exit.
#[test]
fn gro_trains_cross_a_shared_socket_both_ways() {
    for_each_backend(|backend| {
        let (mut x, mut y) = (node(), node());
        let (mut a, mut b) = (node(), node());
        let relay = shared_relay(backend, &[("x", &x), ("y", &y)]);
        let (ap, xa) = pair(relay.addr, &mut x, &mut a);
        let (bp, yb) = pair(relay.addr, &mut y, &mut b);
        assert!(deliver(&mut a, ap, &mut x, &mut [], &ip(1, b"a"), WAIT).is_some());
        assert!(deliver(&mut x, xa, &mut a, &mut [], &reply(1, b"a"), WAIT).is_some());
        assert!(deliver(&mut b, bp, &mut y, &mut [], &ip(2, b"b"), WAIT).is_some());
        assert!(deliver(&mut y, yb, &mut b, &mut [], &reply(2, b"b"), WAIT).is_some());
        let shared = x.endpoint(xa).expect("learned");
        assert_eq!(y.endpoint(yb), Some(shared));
        train_through(&mut a, ap, &mut x, relay.addr, |b| ip(1, b));
        train_through(&mut x, xa, &mut a, shared, |b| reply(1, b));
        train_through(&mut b, bp, &mut y, relay.addr, |b| ip(2, b));
        train_through(&mut y, yb, &mut b, shared, |b| reply(2, b));
        let s = relay.stats();
        assert_eq!(s.total_drops(), 0, "{s:?}");
        let since = Instant::now();
        let io: u64 = relay
            .dp
            .reports_after(since, WAIT)
            .iter()
            .map(|r| r.io.gso_sends)
            .sum();
        assert!(io >= 4, "trains left as GSO sends: {io}");
    });
}

/// A Z-HOP flow takes a shared socket like a DoubleHop session: a flow to exit `x` and a
/// DoubleHop session to exit `y` share one, and both carry traffic both ways.
#[test]
fn a_zhop_flow_and_a_doublehop_session_of_another_exit_share_a_socket() {
    for_each_backend(|backend| {
        let node_secret: [u8; 32] = rand::random();
        let node_key = NodeKey::from_secret(node_secret);
        let (mut x, mut y, mut b) = (node(), node(), node());
        let (outer, inner) = (KeyPair::generate(), KeyPair::generate());
        let xz = x.add_peer(inner.public, PeerOptions::default());
        let peer = PeerSpec {
            public_key: outer.relay_key(),
            name: "zed".into(),
            allowed_ips: vec!["10.7.0.0/24".parse().unwrap()],
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_exits: vec![x.keys().relay_key()],
        };
        let table = ExitTable::new(1, vec![exit_spec("x", &x, None), exit_spec("y", &y, None)])
            .unwrap()
            .with_peers(vec![peer])
            .unwrap();
        let relay = Relay::start_config(
            table,
            DataPlaneConfig {
                backend,
                workers: 1,
                node_key: Some(node_secret),
                exit_sockets: ExitSockets::Shared,
                ..Relay::config()
            },
        );
        let mut z = ZhopClient::new(
            outer,
            inner,
            relay.addr,
            boringtun::x25519::PublicKey::from(node_key.public_key().0),
            x.keys().public,
            x.local_addr(),
            "10.7.0.2:40000".parse().unwrap(),
        )
        .unwrap();
        // Pumps the Z-HOP client and exit x until `want` arrives at the client (`true`) or x.
        let zhop = |z: &mut ZhopClient, x: &mut WgNode, to_client: bool, want: &[u8]| {
            let end = Instant::now() + WAIT;
            let mut tick = Instant::now();
            while Instant::now() < end {
                let got = |r: Option<Received>| matches!(r, Some(Received::Packet { data, .. }) if udp_payload(&data) == Some(want));
                if got(z.try_recv().unwrap()) && to_client {
                    return true;
                }
                if got(x.try_recv().unwrap()) && !to_client {
                    return true;
                }
                if tick.elapsed() > Duration::from_millis(100) {
                    z.tick();
                    x.tick();
                    tick = Instant::now();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            false
        };
        let (src, dst) = tunnel_addrs(2);
        z.send_ip(&ipv4_udp(src, dst, 1000, 9, b"zhop out"))
            .unwrap();
        assert!(
            zhop(&mut z, &mut x, false, b"zhop out"),
            "the flow reached x"
        );
        let (bp, yb) = pair(relay.addr, &mut y, &mut b);
        assert_eq!(
            deliver(&mut b, bp, &mut y, &mut [], &ip(1, b"hop"), WAIT),
            Some(yb)
        );
        assert_eq!(
            deliver(&mut y, yb, &mut b, &mut [], &reply(1, b"hop"), WAIT),
            Some(bp)
        );
        let flow = x.endpoint(xz).expect("x learned the flow's endpoint");
        assert_eq!(
            y.endpoint(yb),
            Some(flow),
            "the flow and the session share a socket"
        );
        assert_eq!(shared_sockets(&relay), 1);
        x.send_ip(xz, &ipv4_udp(dst, src, 9, 1000, b"zhop back"))
            .unwrap();
        assert!(
            zhop(&mut z, &mut x, true, b"zhop back"),
            "x's answer reached the client"
        );
        z.send_ip(&ipv4_udp(src, dst, 1000, 9, b"zhop again"))
            .unwrap();
        assert!(zhop(&mut z, &mut x, false, b"zhop again"));
        let s = relay.stats();
        assert_eq!(s.total_drops(), 0, "{s:?}");
    });
}

/// A restart restores sessions sharing a socket onto one socket again, on the port their
/// exits know (a pinned port joins the shared socket bound there): no new handshake, and
/// the exits see nothing change.
#[test]
fn restored_sessions_share_their_socket_again_on_the_same_port() {
    for_each_backend(|backend| {
        let (mut x, mut y) = (node(), node());
        let (mut a, mut b, mut c) = (node(), node(), node());
        let relay = shared_relay(backend, &[("x", &x), ("y", &y)]);
        let (ap, xa) = pair(relay.addr, &mut x, &mut a);
        let (bp, yb) = pair(relay.addr, &mut y, &mut b);
        let (cp, xc) = pair(relay.addr, &mut x, &mut c);
        assert!(deliver(&mut a, ap, &mut x, &mut [], &ip(1, b"a"), WAIT).is_some());
        assert!(deliver(&mut b, bp, &mut y, &mut [], &ip(2, b"b"), WAIT).is_some());
        assert!(deliver(&mut c, cp, &mut x, &mut [], &ip(3, b"c"), WAIT).is_some());
        let (seen_a, seen_b, seen_c) = (x.endpoint(xa), y.endpoint(yb), x.endpoint(xc));
        assert_eq!(seen_a, seen_b);
        let snaps = relay.dp.snapshot(WAIT);
        assert_eq!(snaps.len(), 3, "{snaps:?}");
        let Relay { dp, table, addr } = relay;
        dp.shutdown();

        let dp = wraithgate_relay::io::DataPlane::start_restoring(
            DataPlaneConfig {
                backend,
                workers: 1,
                listen: vec![addr],
                exit_sockets: ExitSockets::Shared,
                ..Relay::config()
            },
            table.clone(),
            snaps,
        )
        .expect("restarts");
        let relay = Relay { dp, table, addr };
        assert_eq!(relay.dp.sessions(WAIT).len(), 3, "restored");
        assert_eq!(shared_sockets(&relay), 2);
        let handshakes = (a.handshakes(ap), b.handshakes(bp), c.handshakes(cp));
        for (round, body) in [b"one".as_slice(), b"two"].iter().enumerate() {
            assert_eq!(
                deliver(&mut a, ap, &mut x, &mut [], &ip(1, body), WAIT),
                Some(xa),
                "{round}"
            );
            assert_eq!(
                deliver(&mut x, xa, &mut a, &mut [], &reply(1, body), WAIT),
                Some(ap)
            );
            assert_eq!(
                deliver(&mut b, bp, &mut y, &mut [], &ip(2, body), WAIT),
                Some(yb)
            );
            assert_eq!(
                deliver(&mut y, yb, &mut b, &mut [], &reply(2, body), WAIT),
                Some(bp)
            );
            assert_eq!(
                deliver(&mut c, cp, &mut x, &mut [], &ip(3, body), WAIT),
                Some(xc)
            );
            assert_eq!(
                deliver(&mut x, xc, &mut c, &mut [], &reply(3, body), WAIT),
                Some(cp)
            );
        }
        assert_eq!(
            (a.handshakes(ap), b.handshakes(bp), c.handshakes(cp)),
            handshakes,
            "no new handshake"
        );
        assert_eq!(
            (x.endpoint(xa), y.endpoint(yb), x.endpoint(xc)),
            (seen_a, seen_b, seen_c)
        );
    });
}

/// IPv6 exits get sockets of their own family: two IPv6 exits' sessions share one, an
/// IPv4 exit's session is on another, and every session works both ways.
#[test]
fn exits_of_each_address_family_share_sockets_of_that_family() {
    for_each_backend(|backend| {
        let v6 =
            || WgNode::bind("[::1]:0".parse().unwrap(), KeyPair::generate()).expect("bind ::1");
        let (mut x, mut y, mut z) = (node(), v6(), v6());
        let (mut a, mut b, mut c) = (node(), node(), node());
        let relay = shared_relay(backend, &[("x", &x), ("y", &y), ("z", &z)]);
        let (ap, xa) = pair(relay.addr, &mut x, &mut a);
        let (bp, yb) = pair(relay.addr, &mut y, &mut b);
        let (cp, zc) = pair(relay.addr, &mut z, &mut c);
        for (n, body) in [b"one".as_slice(), b"two"].iter().enumerate() {
            assert_eq!(
                deliver(&mut a, ap, &mut x, &mut [], &ip(1, body), WAIT),
                Some(xa),
                "{n}"
            );
            assert_eq!(
                deliver(&mut x, xa, &mut a, &mut [], &reply(1, body), WAIT),
                Some(ap)
            );
            assert_eq!(
                deliver(&mut b, bp, &mut y, &mut [], &ip(2, body), WAIT),
                Some(yb)
            );
            assert_eq!(
                deliver(&mut y, yb, &mut b, &mut [], &reply(2, body), WAIT),
                Some(bp)
            );
            assert_eq!(
                deliver(&mut c, cp, &mut z, &mut [], &ip(3, body), WAIT),
                Some(zc)
            );
            assert_eq!(
                deliver(&mut z, zc, &mut c, &mut [], &reply(3, body), WAIT),
                Some(cp)
            );
        }
        let (sx, sy, sz) = (
            x.endpoint(xa).unwrap(),
            y.endpoint(yb).unwrap(),
            z.endpoint(zc).unwrap(),
        );
        assert!(sx.is_ipv4() && sy.is_ipv6(), "{sx} {sy}");
        assert_eq!(sy, sz, "two IPv6 exits share a socket");
        assert_eq!(shared_sockets(&relay), 2);
        let s = relay.stats();
        assert_eq!(s.total_drops(), 0, "{s:?}");
    });
}
