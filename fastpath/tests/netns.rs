//! The program attached for real on the relay namespace's two interfaces, with real UDP
//! sockets in the client and exit namespaces (root only; see `lab`).
//!
//! A datagram the program does not forward reaches the socket bound in the relay namespace
//! (the program returned TC_ACT_OK); one it forwards reaches the exit or the client with
//! the rewritten addresses.

mod lab;

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use lab::{Checksums, Lab, CLIENT, EXIT, LISTEN, OTHER_CLIENT, RELAY_EXIT_SIDE};
use wraithgate_fastpath::{FastPath, SessionId, SessionRoute, Unavailable, Verdict};

const INDEX: u32 = 0x8a11_3c07;
const SESSION: SessionId = SessionId(7);

fn route() -> SessionRoute {
    SessionRoute {
        client: SocketAddrV4::new(CLIENT, 40_001),
        listen: SocketAddrV4::new(LISTEN, 51_820),
        exit_facing: SocketAddrV4::new(RELAY_EXIT_SIDE, 40_100),
        exit: SocketAddrV4::new(EXIT, 51_821),
    }
}

/// The lab, the loaded program, and a socket on each endpoint of the route.
struct World {
    fast: Option<FastPath>,
    client: UdpSocket,
    /// The relay's listen socket: where client traffic the program passes on arrives.
    listen: UdpSocket,
    /// The relay's exit-facing socket: where exit traffic the program passes on arrives.
    exit_facing: UdpSocket,
    exit: UdpSocket,
    lab: Lab,
}

impl World {
    fn new(checksums: Checksums, offload: bool) -> World {
        let lab = Lab::new(checksums);
        let r = route();
        let fast = Lab::within(&lab.relay, || FastPath::attach(&lab::RELAY_INTERFACES));
        let mut fast = fast.unwrap_or_else(|e| panic!("attach: {e}"));
        if offload {
            fast.maps_mut()
                .offload_client_to_exit(SESSION, &r, INDEX)
                .unwrap();
            fast.maps_mut().offload_exit_to_client(SESSION, &r).unwrap();
        }
        World {
            client: Lab::udp(&lab.client, r.client),
            listen: Lab::udp(&lab.relay, r.listen),
            exit_facing: Lab::udp(&lab.relay, r.exit_facing),
            exit: Lab::udp(&lab.exit, r.exit),
            fast: Some(fast),
            lab,
        }
    }

    fn fast(&mut self) -> &mut FastPath {
        self.fast.as_mut().expect("attached")
    }

    fn verdict(&self, which: Verdict) -> u64 {
        let all = self.fast.as_ref().expect("attached").verdicts().unwrap();
        all.into_iter().find(|(v, _)| *v == which).unwrap().1
    }

    /// Sends one transport message client → listen and says where it arrived.
    fn client_sends(&self, message: &[u8]) -> Arrived {
        self.client.send_to(message, route().listen).unwrap();
        arrived(&self.exit, &self.listen, message)
    }

    /// Sends one message exit → exit-facing socket and says where it arrived.
    fn exit_sends(&self, message: &[u8]) -> Arrived {
        self.exit.send_to(message, route().exit_facing).unwrap();
        arrived(&self.client, &self.exit_facing, message)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Arrived {
    /// Forwarded by the program, received from this source.
    Forwarded(SocketAddr),
    /// Passed to the relay's own socket (TC_ACT_OK).
    Userspace,
    Nowhere,
}

fn arrived(forwarded_to: &UdpSocket, relay: &UdpSocket, message: &[u8]) -> Arrived {
    let mut far = lab::drain(forwarded_to, Duration::from_millis(250));
    let near = lab::drain(relay, Duration::from_millis(50));
    match (far.pop(), near.first()) {
        (Some((bytes, from)), None) if far.is_empty() => {
            assert_eq!(bytes, message, "payload changed on the way");
            Arrived::Forwarded(from)
        }
        (None, Some((bytes, _))) if near.len() == 1 => {
            assert_eq!(bytes, message, "payload changed on the way");
            Arrived::Userspace
        }
        (None, None) => Arrived::Nowhere,
        other => panic!("arrived twice or more: {other:?}"),
    }
}

fn forwarded_from(a: SocketAddrV4) -> Arrived {
    Arrived::Forwarded(SocketAddr::V4(a))
}

#[test]
fn root_bpf_transport_is_forwarded_rewritten_with_valid_checksums_both_ways() {
    if !lab::can_run("root_bpf_transport_is_forwarded_rewritten_with_valid_checksums_both_ways") {
        return;
    }
    let w = World::new(Checksums::Full, true);
    let r = route();
    let raw_exit = Lab::raw_udp(&w.lab.exit);
    let raw_client = Lab::raw_udp(&w.lab.client);

    // 40 and 1452 are no multiple of 16: boringtun does not pad, and wireguard-go pads no
    // further than its MTU (1,420 bytes of packet travel as 1,452).
    for (i, len) in [32, 40, 48, 160, 1424, 1452].into_iter().enumerate() {
        let m = lab::transport(INDEX, i as u64, len);
        assert_eq!(
            w.client_sends(&m),
            forwarded_from(r.exit_facing),
            "{len} B to the exit"
        );
        let reply = lab::transport(0x0102_0304, i as u64, len);
        assert_eq!(
            w.exit_sends(&reply),
            forwarded_from(r.listen),
            "{len} B to the client"
        );
    }
    // The datagrams on the wire carry correct UDP checksums (recomputed here), and the
    // receiving stacks, which verify every one (no offload), counted no error.
    let to_exit = lab::raw_packets(&raw_exit, RELAY_EXIT_SIDE, EXIT);
    let to_client = lab::raw_packets(&raw_client, LISTEN, CLIENT);
    assert_eq!((to_exit.len(), to_client.len()), (6, 6));
    for p in to_exit.iter().chain(&to_client) {
        assert!(lab::udp_checksum_ok(p), "bad UDP checksum: {p:02x?}");
    }
    assert_eq!(Lab::udp_checksum_errors(&w.lab.exit), 0);
    assert_eq!(Lab::udp_checksum_errors(&w.lab.client), 0);
    assert_eq!(w.verdict(Verdict::Forwarded), 12);
}

#[test]
fn root_bpf_what_the_program_must_not_forward_reaches_the_relay_socket() {
    if !lab::can_run("root_bpf_what_the_program_must_not_forward_reaches_the_relay_socket") {
        return;
    }
    let w = World::new(Checksums::Full, true);
    let r = route();
    let u = Arrived::Userspace;

    // Handshakes and cookie replies, whichever index they carry.
    assert_eq!(w.client_sends(&lab::handshake(1, INDEX)), u, "initiation");
    assert_eq!(w.client_sends(&lab::handshake(2, INDEX)), u, "response");
    assert_eq!(w.client_sends(&lab::handshake(3, INDEX)), u, "cookie reply");
    assert_eq!(w.exit_sends(&lab::handshake(2, 1)), u, "exit's response");
    assert_eq!(
        w.exit_sends(&lab::handshake(3, 1)),
        u,
        "exit's cookie reply"
    );
    assert_eq!(w.exit_sends(&lab::handshake(1, 0)), u, "exit's initiation");
    // Transport with an index the exit did not assign to this session.
    assert_eq!(
        w.client_sends(&lab::transport(INDEX + 1, 0, 64)),
        u,
        "wrong index"
    );
    // Not a transport message: too short, non-zero reserved bytes.
    assert_eq!(
        w.client_sends(&lab::transport(INDEX, 0, 16)[..16]),
        u,
        "too short"
    );
    let mut reserved = lab::transport(INDEX, 0, 64);
    reserved[2] = 1;
    assert_eq!(w.client_sends(&reserved), u, "reserved bytes");
    // The right index from another source port, or another source address.
    let m = lab::transport(INDEX, 1, 64);
    let other_port = Lab::udp(&w.lab.client, SocketAddrV4::new(CLIENT, 40_002));
    other_port.send_to(&m, r.listen).unwrap();
    assert_eq!(arrived(&w.exit, &w.listen, &m), u, "other port");
    let other_addr = Lab::udp(&w.lab.client, SocketAddrV4::new(OTHER_CLIENT, 40_001));
    other_addr.send_to(&m, r.listen).unwrap();
    assert_eq!(arrived(&w.exit, &w.listen, &m), u, "other address");
    // Exit → client only from the session's exit endpoint, to its exit-facing socket.
    let other_exit = Lab::udp(&w.lab.exit, SocketAddrV4::new(EXIT, 51_999));
    other_exit.send_to(&m, r.exit_facing).unwrap();
    assert_eq!(arrived(&w.client, &w.exit_facing, &m), u, "other exit port");
    // Nothing was forwarded, and the session's counters saw nothing.
    assert_eq!(w.verdict(Verdict::Forwarded), 0);
    let c = w
        .fast
        .as_ref()
        .unwrap()
        .maps()
        .counters(SESSION)
        .unwrap()
        .unwrap();
    assert_eq!((c.client_to_exit.packets, c.exit_to_client.packets), (0, 0));
    assert!(w.verdict(Verdict::NoEntry) >= 4);
    assert!(w.verdict(Verdict::NotTransport) >= 8);
    // And the right packet still goes through.
    assert_eq!(w.client_sends(&m), forwarded_from(r.exit_facing));
}

#[test]
fn root_bpf_counters_count_packets_and_bytes_and_withdraw_stops_forwarding() {
    if !lab::can_run("root_bpf_counters_count_packets_and_bytes_and_withdraw_stops_forwarding") {
        return;
    }
    let mut w = World::new(Checksums::Full, true);
    let r = route();
    let before = wraithgate_fastpath::monotonic_now();
    for i in 0..5 {
        let m = lab::transport(INDEX, i, 96);
        assert_eq!(w.client_sends(&m), forwarded_from(r.exit_facing));
    }
    for i in 0..3 {
        let m = lab::transport(77, i, 48);
        assert_eq!(w.exit_sends(&m), forwarded_from(r.listen));
    }
    // Userspace traffic is not counted as the session's.
    assert_eq!(w.client_sends(&lab::handshake(1, 0)), Arrived::Userspace);

    let c = w.fast().maps_mut().counters(SESSION).unwrap().unwrap();
    assert_eq!(
        (c.client_to_exit.packets, c.client_to_exit.bytes),
        (5, 5 * 96)
    );
    assert_eq!(
        (c.exit_to_client.packets, c.exit_to_client.bytes),
        (3, 3 * 48)
    );
    let seen = c.last_seen.expect("last seen");
    assert!(seen >= before && seen <= wraithgate_fastpath::monotonic_now());

    // A second index of the same session (a rekey's new keypair) forwards too; withdrawing
    // the old one stops only that one.
    w.fast()
        .maps_mut()
        .offload_client_to_exit(SESSION, &r, INDEX ^ 1)
        .unwrap();
    let m = lab::transport(INDEX ^ 1, 9, 64);
    assert_eq!(w.client_sends(&m), forwarded_from(r.exit_facing));
    assert!(w.fast().maps_mut().withdraw_index(SESSION, INDEX).unwrap());
    let old = lab::transport(INDEX, 10, 64);
    assert_eq!(w.client_sends(&old), Arrived::Userspace);

    // Withdrawing the session returns its final counters and sends everything to userspace.
    let last = w
        .fast()
        .maps_mut()
        .withdraw(SESSION)
        .unwrap()
        .expect("was offloaded");
    assert_eq!(last.client_to_exit.packets, 6);
    assert_eq!(w.client_sends(&m), Arrived::Userspace);
    assert_eq!(w.exit_sends(&lab::transport(77, 9, 48)), Arrived::Userspace);
    assert_eq!(w.fast().maps_mut().counters(SESSION).unwrap(), None);
    assert_eq!(w.fast().maps_mut().sessions().count(), 0);
}

#[test]
fn root_bpf_offload_rules_index_limit_route_mismatch_and_taken_keys() {
    if !lab::can_run("root_bpf_offload_rules_index_limit_route_mismatch_and_taken_keys") {
        return;
    }
    let mut w = World::new(Checksums::Full, false);
    let r = route();
    let m = w.fast().maps_mut();
    for i in 0..wraithgate_fastpath::MAX_INDICES_PER_SESSION as u32 {
        m.offload_client_to_exit(SESSION, &r, 100 + i).unwrap();
    }
    m.offload_client_to_exit(SESSION, &r, 100).unwrap(); // idempotent
    let ninth = m.offload_client_to_exit(SESSION, &r, 999);
    assert!(ninth.is_err(), "9th index");
    let mut moved = r;
    moved.exit.set_port(1);
    let moved = m.offload_exit_to_client(SESSION, &moved);
    assert!(moved.is_err(), "other route");
    // Another session cannot take the same client endpoint and index, nor the same
    // exit-facing socket and exit.
    m.offload_exit_to_client(SESSION, &r).unwrap();
    assert!(m.offload_client_to_exit(SessionId(8), &r, 100).is_err());
    assert!(m.offload_exit_to_client(SessionId(8), &r).is_err());
    // A refused first offload leaves nothing behind (no session, no counters).
    assert_eq!(m.sessions().collect::<Vec<_>>(), [SESSION]);
    assert_eq!(m.counters(SessionId(8)).unwrap(), None);
    // A second writer (another worker) shares the maps but not the keys or session ids.
    let mut other = w.fast().session_maps().unwrap();
    assert!(other.offload_client_to_exit(SessionId(8), &r, 100).is_err());
    let mut elsewhere = r;
    elsewhere.client.set_port(40_009);
    let same_id = other.offload_client_to_exit(SESSION, &elsewhere, 1);
    assert!(same_id.is_err(), "same session id");
    w.fast().maps_mut().withdraw(SESSION).unwrap();
    other.offload_client_to_exit(SessionId(8), &r, 100).unwrap();
    other.offload_exit_to_client(SessionId(8), &r).unwrap();
    let msg = lab::transport(100, 0, 64);
    assert_eq!(w.client_sends(&msg), forwarded_from(r.exit_facing));
    let c = other.counters(SessionId(8)).unwrap().unwrap();
    assert_eq!(c.client_to_exit.packets, 1);
}

#[test]
fn root_bpf_gso_trains_are_forwarded_whole_only_when_every_segment_is_the_sessions_transport() {
    let test =
        "root_bpf_gso_trains_are_forwarded_whole_only_when_every_segment_is_the_sessions_transport";
    if !lab::can_run(test) {
        return;
    }
    let w = World::new(Checksums::GsoFromClient, true);
    let r = route();
    let raw_exit = Lab::raw_udp(&w.lab.exit);
    lab::set_udp_segment(&w.client, 160);

    // Eight 160-byte transport messages in one send: one GSO train through the relay.
    let train: Vec<u8> = (0..8).flat_map(|i| lab::transport(INDEX, i, 160)).collect();
    w.client.send_to(&train, r.listen).unwrap();
    let got = lab::expect(&w.exit, 8);
    assert_eq!(got.len(), 8, "datagrams at the exit");
    for (i, (bytes, from)) in got.iter().enumerate() {
        assert_eq!(*from, SocketAddr::V4(r.exit_facing));
        assert_eq!(bytes[..], train[i * 160..(i + 1) * 160]);
    }
    assert!(lab::drain(&w.listen, Duration::from_millis(50)).is_empty());
    // One program run forwarded eight counted datagrams: the train stayed whole.
    assert_eq!(w.verdict(Verdict::Forwarded), 1);
    let c = w
        .fast
        .as_ref()
        .unwrap()
        .maps()
        .counters(SESSION)
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.client_to_exit.packets, c.client_to_exit.bytes),
        (8, 8 * 160)
    );
    // The relay's exit-side veth has no offload: the kernel segmented the train and
    // computed every checksum from the pseudo-header sum the program rewrote.
    let wire = lab::raw_packets(&raw_exit, RELAY_EXIT_SIDE, EXIT);
    assert_eq!(wire.len(), 8);
    assert!(wire.iter().all(|p| lab::udp_checksum_ok(p)), "bad checksum");
    assert_eq!(Lab::udp_checksum_errors(&w.lab.exit), 0);

    // Data, then a 148-byte initiation in the same train: to userspace, whole.
    let mut mixed: Vec<u8> = (0..3)
        .flat_map(|i| lab::transport(INDEX, 10 + i, 160))
        .collect();
    mixed.extend(lab::handshake(1, 0));
    w.client.send_to(&mixed, r.listen).unwrap();
    let got = lab::expect(&w.listen, 4);
    let sizes: Vec<usize> = got.iter().map(|(b, _)| b.len()).collect();
    assert_eq!(sizes, [160, 160, 160, 148], "datagrams at the relay socket");
    assert!(lab::drain(&w.exit, Duration::from_millis(50)).is_empty());

    // Same sizes, but the last segment is not transport (a 160-byte type-3 lookalike).
    let mut odd = lab::transport(INDEX, 20, 160);
    odd[0] = 3;
    let mut same_size: Vec<u8> = (0..3)
        .flat_map(|i| lab::transport(INDEX, 21 + i, 160))
        .collect();
    same_size.extend(&odd);
    w.client.send_to(&same_size, r.listen).unwrap();
    assert_eq!(lab::expect(&w.listen, 4).len(), 4);
    // Same sizes, last segment for an index the session does not own.
    let mut foreign: Vec<u8> = (0..3)
        .flat_map(|i| lab::transport(INDEX, 30 + i, 160))
        .collect();
    foreign.extend(lab::transport(INDEX + 5, 33, 160));
    w.client.send_to(&foreign, r.listen).unwrap();
    assert_eq!(lab::expect(&w.listen, 4).len(), 4);
    assert!(lab::drain(&w.exit, Duration::from_millis(50)).is_empty());

    // Past the 8 KiB the program copies whole, segments are read one by one: the same
    // rules. Eight of 1,200 bytes, the last for an index the session does not own …
    lab::set_udp_segment(&w.client, 1200);
    let mut big: Vec<u8> = (0..7)
        .flat_map(|i| lab::transport(INDEX, 40 + i, 1200))
        .collect();
    big.extend(lab::transport(INDEX + 5, 47, 1200));
    w.client.send_to(&big, r.listen).unwrap();
    assert_eq!(lab::expect(&w.listen, 8).len(), 8);
    assert!(lab::drain(&w.exit, Duration::from_millis(50)).is_empty());
    // … and all of the session's: forwarded whole.
    let big: Vec<u8> = (0..8)
        .flat_map(|i| lab::transport(INDEX, 50 + i, 1200))
        .collect();
    w.client.send_to(&big, r.listen).unwrap();
    let got = lab::expect(&w.exit, 8);
    assert_eq!(got.len(), 8, "datagrams at the exit");
    for (i, (bytes, _)) in got.iter().enumerate() {
        assert_eq!(bytes[..], big[i * 1200..(i + 1) * 1200]);
    }

    assert_eq!(w.verdict(Verdict::TrainMixed), 4);
    assert_eq!(w.verdict(Verdict::Forwarded), 2);
    let c = w
        .fast
        .as_ref()
        .unwrap()
        .maps()
        .counters(SESSION)
        .unwrap()
        .unwrap();
    assert_eq!(
        c.client_to_exit.packets, 16,
        "nothing of the mixed trains was counted"
    );
}

#[test]
fn root_bpf_a_zero_udp_checksum_stays_zero() {
    if !lab::can_run("root_bpf_a_zero_udp_checksum_stays_zero") {
        return;
    }
    let w = World::new(Checksums::Full, true);
    let r = route();
    let raw_exit = Lab::raw_udp(&w.lab.exit);
    // SO_NO_CHECK: the client sends without a UDP checksum (RFC 768 allows it on IPv4).
    let one: libc::c_int = 1;
    // SAFETY: a valid socket and a pointer to a c_int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&w.client),
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let m = lab::transport(INDEX, 0, 64);
    assert_eq!(w.client_sends(&m), forwarded_from(r.exit_facing));
    let wire = lab::raw_packets(&raw_exit, RELAY_EXIT_SIDE, EXIT);
    assert_eq!(wire.len(), 1);
    assert_eq!(wire[0][26..28], [0, 0], "the checksum field stayed zero");
}

#[test]
fn root_bpf_without_ip_forwarding_attach_refuses_and_the_program_passes() {
    if !lab::can_run("root_bpf_without_ip_forwarding_attach_refuses_and_the_program_passes") {
        return;
    }
    let w = World::new(Checksums::Full, true);
    let r = route();
    let set_forwarding = |on: &str| {
        lab::run(Command::new("ip").args([
            "netns",
            "exec",
            &w.lab.relay,
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.all.forwarding={on}"),
        ]));
    };
    set_forwarding("0");
    let err = Lab::within(&w.lab.relay, || FastPath::attach(&lab::RELAY_INTERFACES))
        .expect_err("attached where nothing can be forwarded");
    assert!(matches!(err, Unavailable::ForwardingOff(_)), "{err}");
    // The kernel's FIB lookup refuses too: a program attached before forwarding was turned
    // off passes everything to the stack, untouched.
    let m = lab::transport(INDEX, 0, 64);
    assert_eq!(w.client_sends(&m), Arrived::Userspace);
    assert_eq!(w.verdict(Verdict::NoRoute), 1);
    set_forwarding("1");
    assert_eq!(w.client_sends(&m), forwarded_from(r.exit_facing));
}

#[test]
fn root_bpf_gro_trains_built_at_the_relay_are_forwarded_intact() {
    if !lab::can_run("root_bpf_gro_trains_built_at_the_relay_are_forwarded_intact") {
        return;
    }
    let w = World::new(Checksums::GsoFromClient, true);
    let r = route();
    // GRO on the relay's client-side veth, and UDP_GRO on the listen socket (as the relay's
    // own sockets have it): back-to-back datagrams of one flow may reach tc ingress as one
    // coalesced packet with gso_size set, which the program must treat like a GSO train.
    lab::run(Command::new("ip").args([
        "netns",
        "exec",
        &w.lab.relay,
        "ethtool",
        "-K",
        "rc0",
        "gro",
        "on",
        "rx-udp-gro-forwarding",
        "on",
    ]));
    lab::set_udp_option(&w.listen, libc::UDP_GRO, 1);
    // Bursts: the client's veth segments each 8-datagram send in software, so the relay's
    // veth receives 8 datagrams at once, as a NIC would.
    lab::run(Command::new("ip").args([
        "netns",
        "exec",
        &w.lab.client,
        "ethtool",
        "-K",
        "c0",
        "tx-udp-segmentation",
        "off",
    ]));
    lab::set_udp_segment(&w.client, 160);
    let sent: Vec<Vec<u8>> = (0..64).map(|i| lab::transport(INDEX, i, 160)).collect();
    for burst in sent.chunks(8) {
        w.client.send_to(&burst.concat(), r.listen).unwrap();
    }
    let got = lab::expect(&w.exit, sent.len());
    let got: Vec<Vec<u8>> = got.into_iter().map(|(b, _)| b).collect();
    assert_eq!(got, sent, "every datagram, intact and in order");
    assert!(lab::drain(&w.listen, Duration::from_millis(50)).is_empty());
    let runs = w.verdict(Verdict::Forwarded);
    let c = w
        .fast
        .as_ref()
        .unwrap()
        .maps()
        .counters(SESSION)
        .unwrap()
        .unwrap();
    assert_eq!(
        (c.client_to_exit.packets, c.client_to_exit.bytes),
        (64, 64 * 160)
    );
    eprintln!("gro: 64 datagrams forwarded in {runs} program runs");
    assert!(runs < 64, "no GRO train reached the program");

    // A burst of data that ends in an initiation: if GRO coalesced it, the train is mixed
    // and goes to userspace whole (the listen socket, with UDP_GRO, reads it as one
    // buffer); whatever was not coalesced is forwarded or passed on datagram by datagram.
    let mut burst: Vec<u8> = (0..3)
        .flat_map(|i| lab::transport(INDEX, 100 + i, 160))
        .collect();
    let initiation = lab::handshake(1, 0);
    burst.extend(&initiation);
    w.client.send_to(&burst, r.listen).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let at_exit: usize = lab::drain(&w.exit, Duration::from_millis(100))
        .iter()
        .map(|(b, _)| b.len())
        .sum();
    let at_relay: Vec<u8> = lab::drain(&w.listen, Duration::from_millis(100))
        .into_iter()
        .flat_map(|(b, _)| b)
        .collect();
    assert_eq!(at_exit + at_relay.len(), burst.len(), "lost or duplicated");
    assert!(
        at_relay.ends_with(&initiation),
        "the initiation reached userspace"
    );
    eprintln!(
        "gro: mixed burst: {at_exit} B forwarded, {} B to userspace",
        at_relay.len()
    );
}

#[test]
fn root_bpf_dropping_the_loader_detaches_the_program() {
    if !lab::can_run("root_bpf_dropping_the_loader_detaches_the_program") {
        return;
    }
    let mut w = World::new(Checksums::Full, true);
    let r = route();
    let m = lab::transport(INDEX, 0, 64);
    assert_eq!(w.client_sends(&m), forwarded_from(r.exit_facing));
    assert_eq!(attached_programs(&w.lab.relay), 2);
    drop(w.fast.take());
    assert_eq!(attached_programs(&w.lab.relay), 0);
    assert_eq!(w.client_sends(&m), Arrived::Userspace);
    assert_eq!(w.exit_sends(&m), Arrived::Userspace);
}

/// Programs attached with tcx on the relay's interfaces (ingress).
fn attached_programs(relay_ns: &str) -> usize {
    Lab::within(relay_ns, || {
        lab::RELAY_INTERFACES
            .iter()
            .map(|dev| {
                aya::programs::SchedClassifier::query_tcx(
                    dev,
                    aya::programs::tc::TcAttachType::Ingress,
                )
                .expect("query tcx")
                .1
                .len()
            })
            .sum()
    })
}

const CHILD_ENV: &str = "WRAITHGATE_FASTPATH_TEST_CHILD_NS";

#[test]
fn root_bpf_a_killed_owner_leaves_nothing_attached_that_forwards() {
    if !lab::can_run("root_bpf_a_killed_owner_leaves_nothing_attached_that_forwards") {
        return;
    }
    let lab = Lab::new(Checksums::Full);
    let r = route();
    let client = Lab::udp(&lab.client, r.client);
    let listen = Lab::udp(&lab.relay, r.listen);
    let exit = Lab::udp(&lab.exit, r.exit);

    // A child process attaches and offloads, says READY, then waits to be killed.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_holds_the_fast_path_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &lab.relay)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "the child exited before it was ready");
        // libtest's "test … ... " precedes it on the same line.
        if line.trim_end().ends_with("READY") {
            break;
        }
    }
    let m = lab::transport(INDEX, 0, 64);
    client.send_to(&m, r.listen).unwrap();
    assert_eq!(arrived(&exit, &listen, &m), forwarded_from(r.exit_facing));
    assert_eq!(attached_programs(&lab.relay), 2);

    // SAFETY: kill has no memory preconditions; the pid is our own child's.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0);
    child.wait().unwrap();
    // The kernel releases the links when the last descriptor closes; give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while attached_programs(&lab.relay) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        attached_programs(&lab.relay),
        0,
        "still attached after SIGKILL"
    );
    client.send_to(&m, r.listen).unwrap();
    assert_eq!(arrived(&exit, &listen, &m), Arrived::Userspace);
}

/// Not a test: the child process of the test above (does nothing when run by hand).
#[test]
#[ignore = "child process of root_bpf_a_killed_owner_leaves_nothing_attached_that_forwards"]
fn child_holds_the_fast_path_until_killed() {
    let Some(ns) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let ns = ns.into_string().unwrap();
    let r = route();
    let mut fast = Lab::within(&ns, || FastPath::attach(&lab::RELAY_INTERFACES)).unwrap();
    fast.maps_mut()
        .offload_client_to_exit(SESSION, &r, INDEX)
        .unwrap();
    fast.maps_mut().offload_exit_to_client(SESSION, &r).unwrap();
    println!("READY");
    // Bounded, in case the parent died without killing us.
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn root_bpf_without_capabilities_attach_says_why() {
    if !lab::can_run("root_bpf_without_capabilities_attach_says_why") {
        return;
    }
    // Capabilities are per thread: drop them on a fresh one only.
    let err = std::thread::spawn(|| {
        drop_bpf_capabilities();
        FastPath::attach(&[]).expect_err("attached without CAP_BPF")
    })
    .join()
    .unwrap();
    assert!(
        matches!(err, Unavailable::MissingCapability { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("CAP_BPF"), "{err}");
}

#[test]
fn root_bpf_attach_names_a_missing_or_non_ethernet_interface() {
    if !lab::can_run("root_bpf_attach_names_a_missing_or_non_ethernet_interface") {
        return;
    }
    let lab = Lab::new(Checksums::Full);
    let (missing, loopback) = Lab::within(&lab.relay, || {
        (
            FastPath::attach(&["rc0", "nosuch0"]).expect_err("attached to nothing"),
            FastPath::attach(&["lo"]).expect_err("attached to loopback"),
        )
    });
    assert!(
        matches!(&missing, Unavailable::NoInterface(n) if n == "nosuch0"),
        "{missing}"
    );
    assert!(
        matches!(&loopback, Unavailable::NotEthernet(n) if n == "lo"),
        "{loopback}"
    );
}

#[test]
fn root_bpf_with_bpf_denied_by_seccomp_attach_says_why() {
    if !lab::can_run("root_bpf_with_bpf_denied_by_seccomp_attach_says_why") {
        return;
    }
    let err = std::thread::spawn(|| {
        deny_bpf_syscall();
        FastPath::attach(&[]).expect_err("attached with bpf() denied")
    })
    .join()
    .unwrap();
    assert!(
        matches!(err, Unavailable::Refused { seccomp: true, .. }),
        "{err}"
    );
}

/// Clears CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_PERFMON from this thread's sets.
fn drop_bpf_capabilities() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and a two-element data array, as _LINUX_CAPABILITY_VERSION_3 expects.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0);
    for cap in [12u32, 21, 38, 39] {
        let (word, bit) = ((cap / 32) as usize, 1u32 << (cap % 32));
        data[word].effective &= !bit;
        data[word].permitted &= !bit;
    }
    // SAFETY: as above; capset only changes this thread's capabilities.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

/// Installs a seccomp filter on this thread that fails bpf() with EPERM.
fn deny_bpf_syscall() {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let bpf = libc::SYS_bpf as u32;
    let filter = [
        op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        op(JEQ_K, 0, 1, bpf),
        op(RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls; `prog` points to `filter`, both alive for the call, and
    // without SECCOMP_FILTER_FLAG_TSYNC the filter applies to this thread only.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &raw const prog
            ),
            0,
            "seccomp: {}",
            std::io::Error::last_os_error()
        );
    }
}
