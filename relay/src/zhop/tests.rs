use super::*;
use crate::admission::LOAD_HOLD;
use crate::table::{ExitSpec, PeerSpec};

const L: Listener = Listener { id: 0, port: 51820 };

fn test_cookies() -> CookieSettings {
    CookieSettings {
        seed: [3; 32],
        // The operator's default, `[limits] cookie_replies_per_second`.
        replies_per_second: 20_000,
    }
}

fn setup() -> (Zhop, Tunn, SocketAddr) {
    let node = NodeKey::from_secret([7; 32]);
    let client_secret = x25519::StaticSecret::from([9; 32]);
    let exit = ExitSpec {
        name: "x".into(),
        public_key: PublicKey([1; 32]),
        endpoint: "192.0.2.1:51820".parse().unwrap(),
        listen_port: None,
    };
    let peer = setup_peer(vec![PublicKey([1; 32])]);
    let table = ExitTable::new(1, vec![exit])
        .unwrap()
        .with_peers(vec![peer])
        .unwrap();
    let z = Zhop::new(
        Some(node.clone()),
        Arc::new(table),
        test_cookies(),
        Instant::now(),
    );
    let client = Tunn::new(client_secret, node.public, None, None, 77, None);
    (z, client, "198.51.100.1:4000".parse().unwrap())
}

fn initiation(client: &mut Tunn) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = client.format_handshake_initiation(&mut buf, false)
    else {
        panic!("no initiation")
    };
    init.to_vec()
}

#[test]
fn a_claim_carries_what_it_found_and_is_handled_without_looking_again() {
    let (mut z, mut client, from) = setup();
    let init = initiation(&mut client);
    let claim = z
        .claim(from, &init, || true)
        .expect("an initiation for the node");
    assert!(matches!(claim, Claim::Initiation(_)), "{claim:?}");
    let mut sent = 0;
    z.handle_claimed(Instant::now(), L, from, &init, claim, &mut |o| {
        if let ZhopOut::ToPeer { to, bytes, .. } = o {
            assert_eq!(
                (to, bytes[0]),
                (from, 2),
                "a handshake response to the peer"
            );
            sent += 1;
        }
    })
    .unwrap();
    assert_eq!(sent, 1);
    // Now the peer's address is an endpoint; elsewhere its index names the tunnel.
    let mut t = vec![0u8; 64];
    t[0] = 4;
    t[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(z.claim(from, &t, || true), Some(Claim::Endpoint)));
    let other: SocketAddr = "203.0.113.9:5000".parse().unwrap();
    assert!(matches!(
        z.claim(other, &t, || false),
        Some(Claim::Transport { peer: 0 })
    ));
    // Garbage on the tunnel's index is refused by the tunnel, as by handle_client.
    let claim = z.claim(other, &t, || false).expect("claimed by index");
    assert_eq!(
        z.handle_claimed(Instant::now(), L, other, &t, claim, &mut |_| {}),
        Err(DropReason::OuterRejected)
    );
}

#[test]
fn asks_to_be_woken_for_its_timers_only_while_it_has_peers() {
    let (mut z, mut client, from) = setup();
    assert_eq!(z.poll_timeout(), None, "no peers, no timers");
    let t0 = Instant::now();
    z.handle_client(t0, L, from, &initiation(&mut client), &mut |_| {})
        .unwrap();
    z.tick(t0, &mut |_| {});
    assert_eq!(z.poll_timeout(), Some(t0 + TIMER_TICK));
}

#[test]
fn answers_a_provisioned_peer_and_claims_only_what_is_its_own() {
    let (mut z, mut client, from) = setup();
    let init = initiation(&mut client);
    assert!(
        z.claims(from, &init, || true),
        "an initiation for the node is always Z-HOP's"
    );
    let mut sent = Vec::new();
    z.handle_client(Instant::now(), L, from, &init, &mut |o| {
        if let ZhopOut::ToPeer { to, bytes, .. } = o {
            sent.push((to, bytes.to_vec()));
        }
    })
    .unwrap();
    assert_eq!(sent.len(), 1, "one handshake response");
    assert_eq!(sent[0].0, from);
    assert_eq!(sent[0].1[0], 2);
    // Our tunnel is peer 0: indices 0x000000nn. A transport from an unknown address
    // naming it is a roaming peer -- unless that address is a DoubleHop client.
    let mut t = vec![0u8; 64];
    t[0] = 4;
    t[4..8].copy_from_slice(&1u32.to_le_bytes());
    let other: SocketAddr = "203.0.113.9:5000".parse().unwrap();
    assert!(z.claims(other, &t, || false));
    assert!(!z.claims(other, &t, || true));
    assert!(
        z.claims(from, &t, || true),
        "the peer's own address is always Z-HOP's"
    );
    // An initiation for someone else's key is not claimed.
    let mut stranger = Tunn::new(
        x25519::StaticSecret::from([3; 32]),
        x25519::PublicKey::from([5; 32]),
        None,
        None,
        1,
        None,
    );
    assert!(!z.claims(other, &initiation(&mut stranger), || false));
    assert_eq!(z.stats().outer_handshakes, 1);
}

#[test]
fn an_unprovisioned_key_is_refused() {
    let (mut z, _, from) = setup();
    let node_public = z.key.as_ref().unwrap().0.public;
    let mut stranger = Tunn::new(
        x25519::StaticSecret::from([4; 32]),
        node_public,
        None,
        None,
        1,
        None,
    );
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = stranger.format_handshake_initiation(&mut buf, false)
    else {
        panic!()
    };
    let init = init.to_vec();
    assert!(z.claims(from, &init, || false));
    let r = z.handle_client(Instant::now(), L, from, &init, &mut |_| {
        panic!("nothing is sent")
    });
    assert_eq!(r, Err(DropReason::UnknownPeer));
}

/// An initiation with a valid mac1 for `node` and noise where its encrypted fields go:
/// what anyone who knows the node's public key can send from any source.
fn junk_initiation(node: &NodeKey, sender: u32) -> Vec<u8> {
    use crate::wire::{INITIATION_MAC1_OFFSET, INITIATION_MAC2_OFFSET};
    let mut m = vec![0x5a; INITIATION_LEN];
    m[..4].copy_from_slice(&[1, 0, 0, 0]);
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    let mac1 = node
        .public_key()
        .mac1_key()
        .compute(&m[..INITIATION_MAC1_OFFSET]);
    m[INITIATION_MAC1_OFFSET..INITIATION_MAC2_OFFSET].copy_from_slice(&mac1);
    m[INITIATION_MAC2_OFFSET..].fill(0);
    m
}

/// Past the worker's handshake budget an initiation costs a MAC and a cookie reply,
/// never a DH, until its source proves its address; a real client does with the cookie
/// and is answered.
#[test]
fn under_load_initiations_are_challenged_before_any_dh() {
    let (mut z, mut client, from) = setup();
    let node = z.key.as_ref().unwrap().0.clone();
    let t0 = Instant::now();
    let mut sent = Vec::new();
    let mut record = |o: ZhopOut<'_>| {
        if let ZhopOut::ToPeer { to, bytes, .. } = o {
            sent.push((to, bytes.to_vec()));
        }
    };
    // The budget: decrypted (and refused: noise does not decrypt).
    for i in 0..HANDSHAKE_LIMIT {
        let src = SocketAddr::from(([127, 1, (i >> 8) as u8, i as u8], 1000));
        let r = z.handle_client(t0, L, src, &junk_initiation(&node, i), &mut record);
        assert_eq!(r, Err(DropReason::OuterRejected));
    }
    // Past it, from anywhere: a cookie reply each, addressed to its sender.
    for i in 0..1000u32 {
        let src = SocketAddr::from(([127, 2, (i >> 8) as u8, i as u8], 1000));
        let r = z.handle_client(t0, L, src, &junk_initiation(&node, i), &mut record);
        assert_eq!(r, Err(DropReason::CookieChallenge));
    }
    assert_eq!(sent.len(), 1000);
    assert!(sent.iter().all(|(_, b)| b.len() == 64 && b[0] == 3));
    assert_eq!(z.stats().cookie_replies, 1000);
    // The real client is challenged too, takes the cookie, and its retry carries mac2.
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = client.format_handshake_initiation(&mut buf, false)
    else {
        panic!("no initiation")
    };
    let init = init.to_vec();
    sent.clear();
    let r = z.handle_client(t0, L, from, &init, &mut |o| {
        if let ZhopOut::ToPeer { to, bytes, .. } = o {
            sent.push((to, bytes.to_vec()));
        }
    });
    assert_eq!(r, Err(DropReason::CookieChallenge));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, from);
    assert!(matches!(
        client.decapsulate(None, &sent[0].1, &mut buf),
        TunnResult::Done
    ));
    // REKEY_TIMEOUT later boringtun sends a new initiation; force it now.
    let TunnResult::WriteToNetwork(retry) = client.format_handshake_initiation(&mut buf, true)
    else {
        panic!("no retry")
    };
    assert_ne!(retry[132..148], [0; 16], "the retry carries mac2");
    let retry = retry.to_vec();
    // Still under load a second later (the flood goes on), but the cookie proves it.
    let t1 = t0 + Duration::from_millis(900);
    let _ = z.handle_client(t1, L, from, &junk_initiation(&node, 7), &mut |_| {});
    sent.clear();
    z.handle_client(t1, L, from, &retry, &mut |o| {
        if let ZhopOut::ToPeer { bytes, .. } = o {
            sent.push((from, bytes.to_vec()));
        }
    })
    .unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].1[0], 2, "a handshake response");
    assert_eq!(z.stats().cookie_proven, 1);
    assert_eq!(z.stats().outer_handshakes, 1);
    // The same cookie from another address proves nothing.
    let elsewhere: SocketAddr = "198.51.100.2:4000".parse().unwrap();
    assert_eq!(
        z.handle_client(t1, L, elsewhere, &retry, &mut |_| {}),
        Err(DropReason::CookieChallenge)
    );
    // Once the budget refills and the load has passed, no challenge.
    let later = t1 + LOAD_HOLD + Duration::from_secs(1);
    assert_eq!(
        z.handle_client(later, L, elsewhere, &junk_initiation(&node, 8), &mut |_| {}),
        Err(DropReason::OuterRejected)
    );
}

/// A worker with many peers runs their timers a share at a time: called every
/// millisecond, each call visits about a hundredth of them, and every peer is still
/// visited within one [`TIMER_TICK`] (seen here through idle peers being forgotten).
#[test]
fn timers_are_walked_a_share_at_a_time_and_reach_every_peer_within_a_tick() {
    const N: usize = 40;
    let node = NodeKey::from_secret([7; 32]);
    let secrets: Vec<x25519::StaticSecret> = (0..N)
        .map(|i| x25519::StaticSecret::from([i as u8 + 10; 32]))
        .collect();
    let peers = secrets
        .iter()
        .map(|s| PeerSpec {
            public_key: PublicKey(x25519::PublicKey::from(s).to_bytes()),
            name: String::new(),
            allowed_ips: vec!["10.0.0.0/8".parse().unwrap()],
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            allowed_exits: vec![],
        })
        .collect();
    let table = ExitTable::new(1, vec![])
        .unwrap()
        .with_peers(peers)
        .unwrap();
    let t0 = Instant::now();
    let mut z = Zhop::new(Some(node.clone()), Arc::new(table), test_cookies(), t0);
    let mut buf = [0u8; 256];
    for (i, secret) in secrets.into_iter().enumerate() {
        let mut client = Tunn::new(secret, node.public, None, None, 1, None);
        let TunnResult::WriteToNetwork(init) = client.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no initiation")
        };
        let from: SocketAddr = format!("198.51.100.{}:4000", i + 1).parse().unwrap();
        z.handle_client(t0, L, from, init, &mut |_| {}).unwrap();
    }
    assert_eq!(z.stats().peers, N as u64);
    // Up to the idle limit: every call visits everyone (a long sleep), nobody is idle.
    let limit = t0 + PEER_IDLE;
    z.tick(limit, &mut |_| {});
    assert_eq!(z.stats().peers, N as u64);
    // From here every peer is idle; 1 ms steps each forget at most ceil(N / 100).
    let mut step = limit;
    let mut steps = 0;
    while z.stats().peers > 0 {
        let before = z.stats().peers;
        step += Duration::from_millis(1);
        steps += 1;
        z.tick(step, &mut |_| {});
        let forgotten = before - z.stats().peers;
        assert!(forgotten <= 1, "{forgotten} peers visited in one 1 ms step");
        assert!(steps <= 100, "a peer was not visited within {TIMER_TICK:?}");
    }
    assert!(
        steps >= 90,
        "all {N} peers visited in {steps} ms: not spread"
    );
}

/// Completes the outer handshake of `client` and sends one inner packet to the exit of
/// [`setup`]; returns the flow Z-HOP opened for it.
fn open_flow(z: &mut Zhop, client: &mut Tunn, from: SocketAddr, now: Instant) -> SessionSlot {
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = client.format_handshake_initiation(&mut buf, false)
    else {
        panic!("no initiation")
    };
    let init = init.to_vec();
    let mut response = None;
    z.handle_client(now, L, from, &init, &mut |o| {
        if let ZhopOut::ToPeer { bytes, .. } = o {
            response = Some(bytes.to_vec());
        }
    })
    .unwrap();
    let mut out = vec![0u8; 2048];
    let _ = client.decapsulate(None, &response.expect("a response"), &mut out);
    let mut ip = Vec::new();
    let exit: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    inner::build_udp(&mut ip, "10.0.0.2:5000".parse().unwrap(), exit, b"inner wg");
    let TunnResult::WriteToNetwork(data) = client.encapsulate(&ip, &mut buf) else {
        panic!("no session")
    };
    let data = data.to_vec();
    let mut opened = None;
    z.handle_client(now, L, from, &data, &mut |o| {
        if let ZhopOut::OpenFlow { flow, exit: to } = o {
            assert_eq!(to, exit);
            opened = Some(flow);
        }
    })
    .unwrap();
    opened.expect("a flow to the exit")
}

/// The provisioning of [`setup`]'s client, with other exits.
fn setup_peer(allowed_exits: Vec<PublicKey>) -> PeerSpec {
    let client = x25519::PublicKey::from(&x25519::StaticSecret::from([9; 32]));
    PeerSpec {
        public_key: PublicKey(client.to_bytes()),
        name: String::new(),
        allowed_ips: vec!["10.0.0.0/8".parse().unwrap()],
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: None,
        allowed_exits,
    }
}

/// A table swap costs Z-HOP one pointer store, whatever the peers; a peer removed from
/// the table loses its tunnel and flows before anything of its is handled again.
#[test]
fn a_removed_peer_is_dropped_on_its_next_packet_either_way() {
    let (mut z, mut client, from) = setup();
    let t0 = Instant::now();
    let flow = open_flow(&mut z, &mut client, from, t0);
    let exits: Vec<ExitSpec> = z.table.specs().cloned().collect();
    z.set_table(Arc::new(ExitTable::new(2, exits).unwrap()));
    assert_eq!(z.stats().peers, 1, "nothing happens at the swap itself");
    let mut closed = Vec::new();
    let r = z.handle_exit(t0, flow, b"reply", &mut |o| {
        if let ZhopOut::CloseFlow { flow } = o {
            closed.push(flow);
        }
    });
    assert_eq!(
        r,
        Err(DropReason::NoSession),
        "no reply reaches a removed peer"
    );
    assert_eq!(closed, vec![flow]);
    assert_eq!((z.stats().peers, z.stats().flows), (0, 0));
}

/// An idle peer whose exit was taken away has that flow closed by the timer walk
/// within one tick of the swap, and keeps its tunnel.
#[test]
fn the_walk_closes_flows_to_exits_no_longer_allowed_within_a_tick() {
    let (mut z, mut client, from) = setup();
    let t0 = Instant::now();
    let flow = open_flow(&mut z, &mut client, from, t0);
    let exits: Vec<ExitSpec> = z.table.specs().cloned().collect();
    let table = ExitTable::new(2, exits)
        .unwrap()
        .with_peers(vec![setup_peer(vec![])])
        .unwrap();
    z.tick(t0 + TIMER_TICK, &mut |_| {});
    z.set_table(Arc::new(table));
    let mut closed = Vec::new();
    let mut now = t0 + TIMER_TICK;
    while closed.is_empty() && now < t0 + 3 * TIMER_TICK {
        now += Duration::from_millis(1);
        z.tick(now, &mut |o| {
            if let ZhopOut::CloseFlow { flow } = o {
                closed.push(flow);
            }
        });
    }
    assert_eq!(closed, vec![flow]);
    assert!(now <= t0 + 2 * TIMER_TICK, "closed after {:?}", now - t0);
    assert_eq!((z.stats().peers, z.stats().flows), (1, 0));
}

/// A log sink for one test: what a fmt subscriber wrote, as text.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn boringtuns_logs_name_the_peer_by_public_key_and_nothing_secret() {
    let (mut z, mut client, from) = setup();
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let now = Instant::now();
        z.handle_client(now, L, from, &initiation(&mut client), &mut |_| {})
            .unwrap();
        z.tick(now + TIMER_TICK, &mut |_| {});
    });
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let client_public =
        PublicKey(x25519::PublicKey::from(&x25519::StaticSecret::from([9; 32])).to_bytes());
    let named = format!("zhop_peer{{peer={client_public}}}");
    let line = text
        .lines()
        .find(|l| l.contains("boringtun") && l.contains("handshake_response"))
        .unwrap_or_else(|| panic!("boringtun logged no handshake response:\n{text}"));
    assert!(line.contains(&named), "{line}");
    // Private keys never appear, in either encoding a log might use.
    for secret in [[7u8; 32], [9u8; 32]] {
        let b64 = PublicKey(secret).to_base64();
        assert!(!text.contains(&b64), "a private key in the log:\n{text}");
        assert!(!text.contains(&format!("{:?}", secret)), "{text}");
    }
}

/// A transport goes to the tunnel its receiver index names, whatever address it comes
/// from. A responder that forgot a peer takes an old initiation of that peer again (the
/// paper's limit), and so moves it to wherever the replay came from; when that is another
/// peer's address, the other peer's packets from there still reach its own tunnel. (The
/// zhop fuzz target's model found this; its seed
/// `regression-replay-after-forget-from-another-peers-address` replays it.)
#[test]
fn a_replayed_initiation_from_another_peers_address_never_takes_its_packets() {
    let node = NodeKey::from_secret([7; 32]);
    let spec = |secret: [u8; 32]| PeerSpec {
        public_key: PublicKey(
            x25519::PublicKey::from(&x25519::StaticSecret::from(secret)).to_bytes(),
        ),
        name: String::new(),
        allowed_ips: vec!["10.0.0.0/8".parse().unwrap()],
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: None,
        allowed_exits: vec![],
    };
    let (a, b) = ([10u8; 32], [9u8; 32]);
    let table = |peers: Vec<PeerSpec>, generation| {
        Arc::new(
            ExitTable::new(generation, vec![])
                .unwrap()
                .with_peers(peers)
                .unwrap(),
        )
    };
    let t0 = Instant::now();
    let mut z = Zhop::new(
        Some(node.clone()),
        table(vec![spec(a), spec(b)], 1),
        test_cookies(),
        t0,
    );
    let (addr_a, addr_b): (SocketAddr, SocketAddr) = (
        "198.51.100.1:4000".parse().unwrap(),
        "198.51.100.2:4000".parse().unwrap(),
    );
    let mut client_b = Tunn::new(
        x25519::StaticSecret::from(b),
        node.public,
        None,
        None,
        1,
        None,
    );
    let old_init_b = initiation(&mut client_b);
    z.handle_client(t0, L, addr_b, &old_init_b, &mut |_| {})
        .unwrap();
    // Peer A completes its handshake from its address.
    let mut client_a = Tunn::new(
        x25519::StaticSecret::from(a),
        node.public,
        None,
        None,
        1,
        None,
    );
    let mut response = None;
    z.handle_client(t0, L, addr_a, &initiation(&mut client_a), &mut |o| {
        if let ZhopOut::ToPeer { bytes, .. } = o {
            response = Some(bytes.to_vec());
        }
    })
    .unwrap();
    let mut buf = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(keepalive) =
        client_a.decapsulate(None, &response.unwrap(), &mut buf)
    else {
        panic!("the handshake completes")
    };
    let keepalive = keepalive.to_vec();
    z.handle_client(t0, L, addr_a, &keepalive, &mut |_| {})
        .unwrap();
    // B is removed, forgotten, and provisioned again.
    z.set_table(table(vec![spec(a)], 2));
    z.tick(t0 + TIMER_TICK, &mut |_| {});
    assert_eq!(z.stats().peers, 1);
    z.set_table(table(vec![spec(a), spec(b)], 3));
    // B's old initiation, replayed from A's address, makes B a tunnel there.
    z.handle_client(t0 + TIMER_TICK, L, addr_a, &old_init_b, &mut |_| {})
        .unwrap();
    // A's packets from its address still reach A's tunnel, and its address is its own.
    let TunnResult::WriteToNetwork(data) = client_a.encapsulate(&[], &mut buf) else {
        panic!("A has a session")
    };
    let data = data.to_vec();
    assert_eq!(
        z.handle_client(t0 + TIMER_TICK, L, addr_a, &data, &mut |_| {}),
        Ok(())
    );
    let a_key = spec(a).public_key;
    let status = z.peer_statuses(0);
    let a_status = status.iter().find(|s| s.public_key == a_key).unwrap();
    assert_eq!(a_status.endpoint, Some(addr_a));
    assert!(matches!(
        z.claim(addr_a, &data, || true),
        Some(Claim::Endpoint)
    ));
}
