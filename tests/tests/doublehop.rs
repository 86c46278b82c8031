//! DoubleHop over real loopback sockets: boringtun clients and exits that know nothing of
//! the relay, talking through it. Every test runs against every backend.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::rate_limiter::RateLimiter;
use nix::errno::Errno;
use wraithgate_control::endpoints::{
    ipv4_udp, tunnel_addrs, udp_payload, PeerOptions, Received, WgNode,
};
use wraithgate_relay::io::BackendChoice;
use wraithgate_relay::DropReason;
use wraithgate_tests::{backends, deliver, exit_spec, node, pair, pump, under_qemu, Relay};

const WAIT: Duration = Duration::from_secs(10);

fn ip(client: u8, body: &[u8]) -> Vec<u8> {
    let (s, d) = tunnel_addrs(client);
    ipv4_udp(s, d, 40000, 9, body)
}

fn reply(client: u8, body: &[u8]) -> Vec<u8> {
    let (s, d) = tunnel_addrs(client);
    ipv4_udp(d, s, 9, 40000, body)
}

fn for_each_backend(f: impl Fn(BackendChoice)) {
    for b in backends() {
        eprintln!("backend: {}", b.as_str());
        f(b);
    }
}

#[test]
fn handshake_and_data_both_ways() {
    for_each_backend(|backend| {
        let mut exit = node();
        let mut client = node();
        let relay = Relay::start(backend, vec![exit_spec("exit", &exit, None)]);
        let (cp, ep) = pair(relay.addr, &mut exit, &mut client);

        assert_eq!(
            deliver(
                &mut client,
                cp,
                &mut exit,
                &mut [],
                &ip(1, b"hello exit"),
                WAIT
            ),
            Some(ep)
        );
        assert_eq!(
            deliver(
                &mut exit,
                ep,
                &mut client,
                &mut [],
                &reply(1, b"hello client"),
                WAIT
            ),
            Some(cp)
        );
        for i in 0..50u32 {
            let body = format!("payload {i}").repeat(40);
            assert!(deliver(
                &mut client,
                cp,
                &mut exit,
                &mut [],
                &ip(1, body.as_bytes()),
                WAIT
            )
            .is_some());
            assert!(deliver(
                &mut exit,
                ep,
                &mut client,
                &mut [],
                &reply(1, body.as_bytes()),
                WAIT
            )
            .is_some());
        }
        // The exit sees the relay, never the client.
        let seen = exit.endpoint(ep).expect("exit learned an endpoint");
        assert_ne!(seen, client.local_addr());
        assert_eq!(seen.ip(), relay.addr.ip());
        let s = relay.stats();
        assert_eq!(s.client_handshakes, 1);
        assert_eq!(s.sessions_established, 1);
        assert!(
            s.client_to_exit.packets >= 52 && s.exit_to_client.packets >= 52,
            "{s:?}"
        );
        assert_eq!(s.total_drops(), 0, "{s:?}");
        assert_eq!(exit.handshakes(ep), 1);
    });
}

/// `auto` runs io_uring exactly where this process can set it up and the portable backend
/// elsewhere, says why it fell back, and forwards either way. Under qemu-user, where
/// io_uring answers ENOSYS, this is the test that the fallback happens.
#[test]
fn auto_runs_io_uring_exactly_where_the_probe_allows_and_forwards() {
    let probe = wraithgate_relay::io::uring::probe();
    if under_qemu() {
        let e = probe
            .as_ref()
            .expect_err("qemu-user does not emulate io_uring");
        assert_eq!(e.error.raw_os_error(), Some(Errno::ENOSYS as i32), "{e}");
    }
    let mut exit = node();
    let mut client = node();
    let relay = Relay::start(BackendChoice::Auto, vec![exit_spec("exit", &exit, None)]);
    match &probe {
        Ok(()) => {
            assert_eq!(relay.dp.backend(), "uring");
            assert!(relay.dp.fallback_reason().is_none());
        }
        Err(refused) => {
            assert_eq!(relay.dp.backend(), "portable");
            let why = relay
                .dp
                .fallback_reason()
                .expect("the data plane says why it fell back");
            assert_eq!(why.step, refused.step, "{why}");
            assert_eq!(
                why.error.raw_os_error(),
                refused.error.raw_os_error(),
                "{why}"
            );
            eprintln!("auto fell back to the portable backend: {why}");
        }
    }

    let (cp, ep) = pair(relay.addr, &mut exit, &mut client);
    for i in 0..20u32 {
        let body = format!("auto {i}");
        assert_eq!(
            deliver(
                &mut client,
                cp,
                &mut exit,
                &mut [],
                &ip(1, body.as_bytes()),
                WAIT
            ),
            Some(ep)
        );
        assert_eq!(
            deliver(
                &mut exit,
                ep,
                &mut client,
                &mut [],
                &reply(1, body.as_bytes()),
                WAIT
            ),
            Some(cp)
        );
    }

    // Every worker runs the backend the data plane reports, and the traffic went through
    // it: only io_uring workers enter a ring.
    let since = std::time::Instant::now();
    let reports = relay.dp.reports_after(since, WAIT);
    let mut forwarded = 0;
    let mut ring_enters = 0;
    for r in &reports {
        assert_eq!(r.backend, relay.dp.backend(), "worker {}", r.worker);
        forwarded += r.router.client_to_exit.packets + r.router.exit_to_client.packets;
        ring_enters += r.io.ring_enters;
    }
    assert!(forwarded >= 40, "{reports:?}");
    if probe.is_ok() {
        assert!(ring_enters > 0, "io_uring workers entered their rings");
    } else {
        assert_eq!(ring_enters, 0, "portable workers have no ring");
    }
}

#[test]
fn rekey_mid_stream_keeps_traffic_flowing() {
    for_each_backend(|backend| {
        let mut exit = node();
        let mut client = node();
        let relay = Relay::start(backend, vec![exit_spec("exit", &exit, None)]);
        let (cp, ep) = pair(relay.addr, &mut exit, &mut client);
        for i in 0..120u32 {
            if i == 40 {
                client.initiate(cp).unwrap(); // client-side rekey
            }
            if i == 80 {
                exit.initiate(ep).unwrap(); // exit-side rekey, through the relay
            }
            let body = format!("seq {i}");
            assert!(
                deliver(
                    &mut client,
                    cp,
                    &mut exit,
                    &mut [],
                    &ip(1, body.as_bytes()),
                    WAIT
                )
                .is_some(),
                "packet {i} client->exit lost"
            );
            assert!(
                deliver(
                    &mut exit,
                    ep,
                    &mut client,
                    &mut [],
                    &reply(1, body.as_bytes()),
                    WAIT
                )
                .is_some(),
                "packet {i} exit->client lost"
            );
        }
        assert!(
            client.handshakes(cp) >= 3,
            "client saw {} handshakes",
            client.handshakes(cp)
        );
        assert!(
            exit.handshakes(ep) >= 3,
            "exit saw {} handshakes",
            exit.handshakes(ep)
        );
        let s = relay.stats();
        assert!(s.client_handshakes >= 2 && s.exit_handshakes >= 1, "{s:?}");
        assert_eq!(s.sessions_opened, 1, "a rekey reuses the session");
    });
}

#[test]
fn exit_initiated_handshake_reaches_the_right_client() {
    for_each_backend(|backend| {
        let mut exit = node();
        let mut a = node();
        let mut b = node();
        let relay = Relay::start(backend, vec![exit_spec("exit", &exit, None)]);
        let (ap, ea) = pair(relay.addr, &mut exit, &mut a);
        let (bp, eb) = pair(relay.addr, &mut exit, &mut b);
        assert_eq!(
            deliver(&mut a, ap, &mut exit, &mut [], &ip(1, b"a"), WAIT),
            Some(ea)
        );
        assert_eq!(
            deliver(&mut b, bp, &mut exit, &mut [&mut a], &ip(2, b"b"), WAIT),
            Some(eb)
        );
        assert_ne!(
            exit.endpoint(ea),
            exit.endpoint(eb),
            "one relay socket per client"
        );
        let (a_before, b_before) = (a.handshakes(ap), b.handshakes(bp));

        exit.initiate(eb).unwrap();
        let mut nodes: Vec<&mut WgNode> = vec![&mut b, &mut a, &mut exit];
        let mut b_got_it = false;
        pump(&mut nodes, Duration::from_millis(1500), |i, r| {
            if i == 0 && matches!(r, Received::Control { .. }) {
                b_got_it = true;
            }
            false
        });
        assert!(b_got_it, "the exit's initiation did not reach client b");
        assert!(
            b.handshakes(bp) > b_before,
            "b did not complete the exit's handshake"
        );
        assert_eq!(a.handshakes(ap), a_before, "a must not see b's handshake");
        assert_eq!(
            deliver(
                &mut exit,
                eb,
                &mut b,
                &mut [&mut a],
                &reply(2, b"to b"),
                WAIT
            ),
            Some(bp)
        );
        assert_eq!(
            deliver(
                &mut exit,
                ea,
                &mut a,
                &mut [&mut b],
                &reply(1, b"to a"),
                WAIT
            ),
            Some(ap)
        );
        assert!(relay.stats().exit_handshakes >= 1);
    });
}

#[test]
fn cookie_reply_reaches_the_client() {
    for_each_backend(|backend| {
        let mut exit = node();
        let mut client = node();
        let relay = Relay::start(backend, vec![exit_spec("exit", &exit, None)]);
        // A responder "under load" from the first packet: it answers initiations without a
        // valid mac2 with a cookie reply.
        let loaded = Arc::new(RateLimiter::new(&exit.keys().public, 0));
        let cp = client.add_peer(
            exit.keys().public,
            PeerOptions {
                endpoint: Some(relay.addr),
                ..Default::default()
            },
        );
        let ep = exit.add_peer(
            client.keys().public,
            PeerOptions {
                rate_limiter: Some(loaded),
                ..Default::default()
            },
        );
        client.send_ip(cp, &ip(1, b"queued")).unwrap();
        let mut nodes: Vec<&mut WgNode> = vec![&mut client, &mut exit];
        let got_cookie = pump(&mut nodes, WAIT, |i, r| {
            i == 0 && matches!(r, Received::Control { .. })
        });
        assert!(got_cookie, "no cookie reply reached the client");
        assert!(relay.stats().cookie_replies >= 1);
        // The retry carries mac2 made with the cookie; the loaded exit accepts it.
        client.initiate(cp).unwrap();
        let mut nodes: Vec<&mut WgNode> = vec![&mut client, &mut exit];
        pump(&mut nodes, Duration::from_millis(500), |_, _| false);
        assert_eq!(exit.handshakes(ep), 1, "handshake with mac2 completed");
        assert_eq!(
            deliver(
                &mut client,
                cp,
                &mut exit,
                &mut [],
                &ip(1, b"after cookie"),
                WAIT
            ),
            Some(ep)
        );
    });
}

#[test]
fn two_clients_reach_two_exits_chosen_by_mac1() {
    for_each_backend(|backend| {
        let mut x = node();
        let mut y = node();
        let mut a = node();
        let mut b = node();
        let relay = Relay::start(
            backend,
            vec![exit_spec("x", &x, None), exit_spec("y", &y, None)],
        );
        let (ap, xa) = pair(relay.addr, &mut x, &mut a);
        let (bp, yb) = pair(relay.addr, &mut y, &mut b);
        assert_eq!(
            deliver(&mut a, ap, &mut x, &mut [&mut y], &ip(1, b"for x"), WAIT),
            Some(xa)
        );
        assert_eq!(
            deliver(&mut b, bp, &mut y, &mut [&mut x], &ip(2, b"for y"), WAIT),
            Some(yb)
        );
        assert_eq!(
            deliver(&mut x, xa, &mut a, &mut [], &reply(1, b"from x"), WAIT),
            Some(ap)
        );
        assert_eq!(
            deliver(&mut y, yb, &mut b, &mut [], &reply(2, b"from y"), WAIT),
            Some(bp)
        );
        assert_eq!(relay.stats().sessions_established, 2);
    });
}

/// A relay with exit x reached by mac1 and exit y pinned to a port of its own; returns the
/// relay and y's pinned address.
fn relay_pinning_y(
    backend: BackendChoice,
    x: &WgNode,
    y: &WgNode,
) -> (Relay, std::net::SocketAddr) {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relay = Relay::start(
        backend,
        vec![exit_spec("x", x, None), exit_spec("y", y, Some(port))],
    );
    let pinned = std::net::SocketAddr::new(relay.addr.ip(), port);
    (relay, pinned)
}

#[test]
fn pinned_listen_port_routes_to_its_exit_only() {
    for_each_backend(|backend| {
        let mut x = node();
        let mut y = node();
        let (relay, pinned) = relay_pinning_y(backend, &x, &y);
        let mut b = node();
        let (bp, yb) = pair(pinned, &mut y, &mut b);
        assert_eq!(
            deliver(
                &mut b,
                bp,
                &mut y,
                &mut [&mut x],
                &ip(2, b"via pinned port"),
                WAIT
            ),
            Some(yb)
        );
        assert_eq!(
            deliver(&mut y, yb, &mut b, &mut [], &reply(2, b"back"), WAIT),
            Some(bp)
        );
        assert_eq!(y.endpoint(yb).map(|e| e.ip()), Some(relay.addr.ip()));

        // A client of x on y's pinned port is refused: the port decides, mac1 must match.
        let mut a = node();
        let (ap, _) = pair(pinned, &mut x, &mut a);
        a.send_ip(ap, &ip(1, b"wrong door")).unwrap();
        let mut nodes: Vec<&mut WgNode> = vec![&mut x, &mut a];
        let reached = pump(&mut nodes, Duration::from_millis(500), |i, _| i == 0);
        assert!(!reached, "nothing may reach x through y's port");
        assert!(relay.stats().dropped(DropReason::Mac1Mismatch) >= 1);
    });
}

#[test]
fn a_port_no_longer_pinned_is_released_and_its_sessions_closed() {
    for_each_backend(|backend| {
        let mut x = node();
        let mut y = node();
        let (relay, pinned) = relay_pinning_y(backend, &x, &y);
        let mut a = node();
        let (ap, _) = pair(relay.addr, &mut x, &mut a);
        let mut b = node();
        let (bp, _) = pair(pinned, &mut y, &mut b);
        assert!(deliver(&mut a, ap, &mut x, &mut [], &ip(1, b"a"), WAIT).is_some());
        assert!(deliver(&mut b, bp, &mut y, &mut [], &ip(2, b"b"), WAIT).is_some());
        assert!(
            UdpSocket::bind(pinned).is_err(),
            "the relay holds the pinned port"
        );

        // y stays, unpinned: its port is let go, and the session that came through it ends.
        relay.set_exits(2, vec![exit_spec("x", &x, None), exit_spec("y", &y, None)]);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut released = None;
        while released.is_none() && std::time::Instant::now() < deadline {
            released = UdpSocket::bind(pinned).ok();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(released.is_some(), "{pinned} still bound after the unpin");
        drop(released);
        while relay.stats().sessions_closed_by_table < 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(relay.stats().sessions_closed_by_table, 1);
        // The session through the main port carries on; y is reached through it by mac1.
        assert!(deliver(&mut a, ap, &mut x, &mut [], &ip(1, b"a again"), WAIT).is_some());
        let mut c = node();
        let (cp, _) = pair(relay.addr, &mut y, &mut c);
        assert!(deliver(&mut c, cp, &mut y, &mut [], &ip(3, b"c"), WAIT).is_some());
    });
}

#[test]
fn garbage_and_spoofed_packets_move_nothing() {
    for_each_backend(|backend| {
        let mut exit = node();
        let mut client = node();
        let relay = Relay::start_with(
            backend,
            vec![exit_spec("exit", &exit, None)],
            Default::default(),
            1,
        );
        let (cp, ep) = pair(relay.addr, &mut exit, &mut client);
        assert!(deliver(&mut client, cp, &mut exit, &mut [], &ip(1, b"first"), WAIT).is_some());

        // An attacker elsewhere: junk of every shape, and transport headers with real and
        // made-up indices.
        let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
        for len in 0..400usize {
            let mut junk = vec![(len * 7) as u8; len % 200];
            if junk.len() >= 4 {
                // Half with the reserved bytes zeroed, so the type and length are judged.
                junk[0] = (len % 6) as u8;
                if len % 2 == 0 {
                    junk[1..4].fill(0);
                }
            }
            attacker.send_to(&junk, relay.addr).unwrap();
        }
        for index in 0..64u32 {
            let mut t = vec![0u8; 64];
            t[0] = 4;
            t[4..8].copy_from_slice(&index.to_le_bytes());
            attacker.send_to(&t, relay.addr).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        // The tunnel carries on, to and from the real client.
        assert!(deliver(
            &mut client,
            cp,
            &mut exit,
            &mut [],
            &ip(1, b"still here"),
            WAIT
        )
        .is_some());
        assert_eq!(
            deliver(
                &mut exit,
                ep,
                &mut client,
                &mut [],
                &reply(1, b"and back"),
                WAIT
            ),
            Some(cp)
        );
        let s = relay.stats();
        for reason in [
            DropReason::Truncated,
            DropReason::ReservedNonZero,
            DropReason::BadLength,
            DropReason::UnknownType,
            DropReason::UnknownClient,
        ] {
            assert!(s.dropped(reason) > 0, "no {reason} drops: {s:?}");
        }
        assert_eq!(s.sessions_opened, 1);
        assert_eq!(exit.endpoint(ep).map(|e| e.ip()), Some(relay.addr.ip()));
    });
}

#[test]
fn removing_an_exit_ends_its_sessions_and_keeps_the_others() {
    for_each_backend(|backend| {
        let mut x = node();
        let mut y = node();
        let mut a = node();
        let mut b = node();
        let relay = Relay::start(
            backend,
            vec![exit_spec("x", &x, None), exit_spec("y", &y, None)],
        );
        let (ap, xa) = pair(relay.addr, &mut x, &mut a);
        let (bp, yb) = pair(relay.addr, &mut y, &mut b);
        assert!(deliver(&mut a, ap, &mut x, &mut [], &ip(1, b"a"), WAIT).is_some());
        assert!(deliver(&mut b, bp, &mut y, &mut [], &ip(2, b"b"), WAIT).is_some());

        relay.set_exits(2, vec![exit_spec("x", &x, None)]);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            deliver(&mut a, ap, &mut x, &mut [], &ip(1, b"a again"), WAIT),
            Some(xa)
        );
        b.send_ip(bp, &ip(2, b"into the void")).unwrap();
        let mut nodes: Vec<&mut WgNode> = vec![&mut y, &mut b];
        assert!(!pump(&mut nodes, Duration::from_millis(500), |i, r| i == 0
            && matches!(r, Received::Packet { .. })));
        assert_eq!(relay.stats().sessions_closed_by_table, 1);

        // Back again: a new handshake goes through.
        relay.set_exits(3, vec![exit_spec("x", &x, None), exit_spec("y", &y, None)]);
        std::thread::sleep(Duration::from_millis(200));
        // b still holds its old session, which the relay forgot with the exit; its next
        // handshake (here forced; a real client's after REKEY_TIMEOUT) opens a new one.
        let before = b.handshakes(bp);
        b.initiate(bp).unwrap();
        let mut nodes: Vec<&mut WgNode> = vec![&mut b, &mut y];
        pump(&mut nodes, WAIT, |i, r| {
            i == 0 && matches!(r, Received::Control { .. })
        });
        assert_eq!(b.handshakes(bp), before + 1);
        assert_eq!(
            deliver(&mut b, bp, &mut y, &mut [], &ip(2, b"b is back"), WAIT),
            Some(yb)
        );
    });
}

#[test]
fn killed_session_stops_forwarding_and_a_new_handshake_reopens_it() {
    for_each_backend(|backend| {
        let mut x = node();
        let mut a = node();
        let relay = Relay::start(backend, vec![exit_spec("x", &x, None)]);
        let (ap, xa) = pair(relay.addr, &mut x, &mut a);
        assert!(deliver(&mut a, ap, &mut x, &mut [], &ip(1, b"first"), WAIT).is_some());
        // Kill and reopen a few times: the relay recycles the slot (and its socket id) while
        // the killed socket's receive may still be completing.
        for round in 1..=3u64 {
            let sessions = relay.dp.sessions(WAIT);
            assert_eq!(sessions.len(), 1, "round {round}: {sessions:?}");
            let (worker, info) = &sessions[0];
            assert!(relay.dp.close_session(*worker, info.slot, WAIT));
            assert!(
                !relay.dp.close_session(*worker, info.slot, WAIT),
                "already gone"
            );

            a.send_ip(ap, &ip(1, b"into the void")).unwrap();
            let mut nodes: Vec<&mut WgNode> = vec![&mut x, &mut a];
            assert!(!pump(&mut nodes, Duration::from_millis(300), |i, r| i == 0
                && matches!(r, Received::Packet { .. })));
            assert_eq!(relay.stats().sessions_closed_by_request, round);

            let before = a.handshakes(ap);
            a.initiate(ap).unwrap();
            let mut nodes: Vec<&mut WgNode> = vec![&mut a, &mut x];
            pump(&mut nodes, WAIT, |i, r| {
                i == 0 && matches!(r, Received::Control { .. })
            });
            assert_eq!(a.handshakes(ap), before + 1, "round {round}");
            let body = format!("round {round}");
            assert_eq!(
                deliver(&mut a, ap, &mut x, &mut [], &ip(1, body.as_bytes()), WAIT),
                Some(xa)
            );
            assert!(deliver(
                &mut x,
                xa,
                &mut a,
                &mut [],
                &reply(1, body.as_bytes()),
                WAIT
            )
            .is_some());
        }
        // Workers publish at most every 50 ms and wake at least every 100 ms when idle.
        std::thread::sleep(Duration::from_millis(300));
        let open: u64 = relay
            .dp
            .reports()
            .iter()
            .map(|r| r.io.exit_sockets_open)
            .sum();
        assert_eq!(open, 1, "one socket per live session");
    });
}

/// Sends `packets` (equal sizes) from `from` to `to` as one UDP GSO train.
fn send_train(from: &WgNode, to: std::net::SocketAddr, packets: &[Vec<u8>]) {
    use std::os::fd::AsRawFd;
    use wraithgate_relay::io::sys::{SendBatch, Transmit};
    let train: Vec<u8> = packets.concat();
    let sock = from.socket_clone().unwrap();
    let mut batch = SendBatch::new(1);
    let tx = Transmit {
        dest: Some(to),
        contents: &train,
        segment_size: Some(packets[0].len() as u16),
    };
    batch.send(sock.as_raw_fd(), &[tx]).expect("GSO send");
}

/// Seals 24 equal packets from `sender` to its `peer` (UDP payloads of `12 × repeat`
/// bytes), sends them to `to` as one GSO train, and checks that `receiver` gets every one,
/// in order.
fn train_through(
    sender: &mut WgNode,
    peer: usize,
    receiver: &mut WgNode,
    to: std::net::SocketAddr,
    make_ip: fn(u8, &[u8]) -> Vec<u8>,
    repeat: usize,
) {
    const N: usize = 24;
    let bodies: Vec<Vec<u8>> = (0..N)
        .map(|i| format!("segment {i:04}").repeat(repeat).into_bytes())
        .collect();
    let sealed: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| sender.seal(peer, &make_ip(1, b)).expect("session"))
        .collect();
    send_train(sender, to, &sealed);
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

/// A one-worker relay to exit `x`, with client `a` paired to it and one packet delivered
/// each way. Returns the relay, the client's peer number for the exit, the exit's for the
/// client, and the relay's exit-facing address as the exit sees it.
fn one_session(
    backend: BackendChoice,
    x: &mut WgNode,
    a: &mut WgNode,
) -> (Relay, usize, usize, std::net::SocketAddr) {
    let relay = Relay::start_with(
        backend,
        vec![exit_spec("x", x, None)],
        Default::default(),
        1,
    );
    let (ap, xa) = pair(relay.addr, x, a);
    assert!(deliver(a, ap, x, &mut [], &ip(1, b"hello"), WAIT).is_some());
    assert!(deliver(x, xa, a, &mut [], &reply(1, b"hello"), WAIT).is_some());
    let relay_exit_side = x.endpoint(xa).expect("exit knows the relay's socket");
    (relay, ap, xa, relay_exit_side)
}

#[test]
fn gro_trains_are_routed_per_segment_and_leave_as_gso_sends() {
    for_each_backend(|backend| {
        let mut x = node();
        let mut a = node();
        let (relay, ap, xa, relay_exit_side) = one_session(backend, &mut x, &mut a);
        train_through(&mut a, ap, &mut x, relay.addr, ip, 60);
        train_through(&mut x, xa, &mut a, relay_exit_side, reply, 60);
        std::thread::sleep(Duration::from_millis(300));
        let io = &relay.dp.reports()[0].io;
        assert!(io.gro_trains >= 2, "{io:?}");
        assert!(io.gso_sends >= 2, "{io:?}");
    });
}

/// A path on which the kernel refuses GSO costs GSO on that path's socket only. In a
/// namespace of its own, the exit's address (127.0.0.2) has a route MTU of 1,000 bytes, so
/// the kernel answers EMSGSIZE to a GSO send of 1,300-byte segments towards it (and
/// fragments the same datagrams sent one by one); the client's address keeps loopback's
/// MTU. The relay must fall back to single datagrams on its exit-facing socket, deliver
/// every segment, and keep sending GSO trains to the client.
#[test]
fn netns_gso_refused_on_one_path_falls_back_on_that_socket_only() {
    use wraithgate_control::endpoints::KeyPair;
    use wraithgate_tests::netns::{self, Netns, SuiteLock};

    const TEST: &str = "netns_gso_refused_on_one_path_falls_back_on_that_socket_only";
    if !nix::unistd::geteuid().is_root() {
        assert!(
            wraithgate_tests::skips_allowed(),
            "{TEST} needs root (a network namespace); WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping"
        );
        eprintln!("\n*** SKIPPED {TEST}: needs root (a network namespace) ***\n");
        return;
    }
    let _lock = SuiteLock::acquire().expect("interop suite lock");
    netns::remove_leftovers().expect("remove leftovers");
    let ns = Netns::create("gso").expect("namespace");
    // The relay's socket towards the exit sits on 127.0.0.1 (the route's `src`), so the
    // exit's own trains back to it keep loopback's MTU.
    let route = "route replace local 127.0.0.2 dev lo table local mtu 1000 src 127.0.0.1";
    ns.ip(&route.split(' ').collect::<Vec<_>>())
        .expect("route with a small MTU");
    for backend in backends() {
        eprintln!("backend: {}", backend.as_str());
        ns.run_in(move || {
            let exit_addr: std::net::SocketAddr = "127.0.0.2:0".parse()?;
            let mut x = WgNode::bind(exit_addr, KeyPair::generate())?;
            let mut a = node();
            let (relay, ap, xa, relay_exit_side) = one_session(backend, &mut x, &mut a);
            let io = || {
                std::thread::sleep(Duration::from_millis(300));
                relay.dp.reports()[0].io.clone()
            };
            // Towards the exit: GSO refused, every segment still arrives.
            train_through(&mut a, ap, &mut x, relay.addr, ip, 100);
            let after_refusal = io();
            assert_eq!(after_refusal.gso_fallbacks, 1, "{after_refusal:?}");
            assert!(after_refusal.gro_trains >= 1, "{after_refusal:?}");
            // Towards the client: still GSO.
            train_through(&mut x, xa, &mut a, relay_exit_side, reply, 100);
            let back = io();
            assert!(
                back.gso_sends > after_refusal.gso_sends,
                "the client-facing socket should still send GSO trains: {back:?}"
            );
            // Towards the exit again: the socket remembers, nothing is refused twice.
            train_through(&mut a, ap, &mut x, relay.addr, ip, 100);
            let again = io();
            assert_eq!(again.gso_fallbacks, 1, "{again:?}");
            assert_eq!(
                again.gso_sends, back.gso_sends,
                "no GSO send should be tried on the exit-facing socket again: {again:?}"
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{TEST} ({}): {e:#}", backend.as_str()));
    }
}
