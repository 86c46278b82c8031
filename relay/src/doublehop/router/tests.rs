use super::*;
use crate::table::ExitSpec;
use crate::wire::{
    COOKIE_REPLY_LEN, COOKIE_REPLY_TYPE, INITIATION_LEN, INITIATION_MAC1_OFFSET,
    INITIATION_MAC2_OFFSET, RESPONSE_LEN, RESPONSE_MAC1_OFFSET, RESPONSE_TYPE, TRANSPORT_TYPE,
};
use proptest::prelude::*;

const MAIN_PORT: u16 = 51820;
const PINNED_PORT: u16 = 51821;
const MAIN: Listener = Listener {
    id: 0,
    port: MAIN_PORT,
};
const PINNED: Listener = Listener {
    id: 1,
    port: PINNED_PORT,
};

fn key(n: u8) -> PublicKey {
    PublicKey([n; 32])
}

fn exit_addr(n: u8) -> SocketAddr {
    format!("192.0.2.{n}:51820").parse().unwrap()
}

fn client(n: u16) -> SocketAddr {
    format!("198.51.100.{}:{}", n % 250 + 1, 40000 + n)
        .parse()
        .unwrap()
}

/// Exits 1 and 2, exit 2 also pinned to PINNED_PORT.
fn table() -> Arc<ExitTable> {
    Arc::new(
        ExitTable::new(
            1,
            vec![
                ExitSpec {
                    name: "one".into(),
                    public_key: key(1),
                    endpoint: exit_addr(1),
                    listen_port: None,
                },
                ExitSpec {
                    name: "two".into(),
                    public_key: key(2),
                    endpoint: exit_addr(2),
                    listen_port: Some(PINNED_PORT),
                },
            ],
        )
        .unwrap(),
    )
}

fn initiation(to: PublicKey, sender: u32) -> Vec<u8> {
    let mut m = vec![0x5a; INITIATION_LEN];
    m[0] = 1;
    m[1..4].fill(0);
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    let mac = to.mac1_key().compute(&m[..INITIATION_MAC1_OFFSET]);
    m[116..132].copy_from_slice(&mac);
    m[132..148].fill(0);
    m
}

fn response(sender: u32, receiver: u32) -> Vec<u8> {
    let mut m = vec![0x33; RESPONSE_LEN];
    m[0] = RESPONSE_TYPE;
    m[1..4].fill(0);
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    m[8..12].copy_from_slice(&receiver.to_le_bytes());
    m
}

/// A response with the mac1 of `to`, the initiator it answers (as a real client's is).
fn response_to(to: PublicKey, sender: u32, receiver: u32) -> Vec<u8> {
    let mut m = response(sender, receiver);
    let mac = to.mac1_key().compute(&m[..RESPONSE_MAC1_OFFSET]);
    m[RESPONSE_MAC1_OFFSET..RESPONSE_MAC1_OFFSET + 16].copy_from_slice(&mac);
    m[RESPONSE_MAC1_OFFSET + 16..].fill(0);
    m
}

fn cookie(receiver: u32) -> Vec<u8> {
    let mut m = vec![0x44; COOKIE_REPLY_LEN];
    m[0] = COOKIE_REPLY_TYPE;
    m[1..4].fill(0);
    m[4..8].copy_from_slice(&receiver.to_le_bytes());
    m
}

fn transport(receiver: u32, len: usize) -> Vec<u8> {
    let mut m = vec![0x77; len];
    m[0] = TRANSPORT_TYPE;
    m[1..4].fill(0);
    m[4..8].copy_from_slice(&receiver.to_le_bytes());
    m[8..16].copy_from_slice(&1u64.to_le_bytes());
    m
}

/// The mac2 a client puts on `retry` after `reply` answered `sent`.
fn mac2_for(k: &PublicKey, reply: &CookieReplyBytes, sent: &[u8], retry: &[u8]) -> [u8; 16] {
    let (Ok(Message::Initiation(sent)), Ok(Message::Initiation(retry))) =
        (Message::parse(sent), Message::parse(retry))
    else {
        panic!("not initiations")
    };
    crate::cookie::initiator_mac2(k, reply, &sent, &retry).expect("our reply decrypts")
}

struct Harness {
    r: Router,
    now: Instant,
}

impl Harness {
    fn new() -> Self {
        Self::with(RouterConfig::default())
    }
    fn with(cfg: RouterConfig) -> Self {
        let now = Instant::now();
        Harness {
            r: Router::new(cfg, table(), now),
            now,
        }
    }
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.r.handle_timeout(self.now);
    }
    fn client(&mut self, l: Listener, from: SocketAddr, p: &[u8]) -> Action {
        self.r.handle_client(self.now, l, from, p)
    }
    fn exit(&mut self, slot: SessionSlot, p: &[u8]) -> Action {
        self.r.handle_exit(self.now, slot, p)
    }
    fn commands(&mut self) -> Vec<Command> {
        std::iter::from_fn(|| self.r.poll_command()).collect()
    }
    /// Cookie replies the router asked to send, with their destination.
    fn cookie_replies(&mut self) -> Vec<(SocketAddr, CookieReplyBytes)> {
        self.commands()
            .into_iter()
            .filter_map(|c| match c {
                Command::SendCookieReply { client, reply, .. } => Some((client, reply)),
                _ => None,
            })
            .collect()
    }
    /// Client `c` sends an initiation to `k`; if the relay challenges it, retries as a
    /// WireGuard client would, with mac2 made from the cookie. Returns the final action.
    fn initiate_proving(&mut self, c: SocketAddr, k: PublicKey, sender: u32) -> Action {
        let first = initiation(k, sender);
        let action = self.client(MAIN, c, &first);
        if action != Action::Drop(DropReason::CookieChallenge) {
            return action;
        }
        let replies = self.cookie_replies();
        assert_eq!(replies.len(), 1, "one cookie reply per challenge");
        assert_eq!(replies[0].0, c, "the reply goes to the initiation's source");
        let mut retry = initiation(k, sender + 1);
        let mac2 = mac2_for(&k, &replies[0].1, &first, &retry);
        retry[INITIATION_MAC2_OFFSET..].copy_from_slice(&mac2);
        self.client(MAIN, c, &retry)
    }
    /// Client `c` handshakes with exit `k` through the relay; the exit answers with index
    /// `exit_index`, and the client confirms with a keepalive. Returns the session's slot.
    fn establish(&mut self, c: SocketAddr, k: PublicKey, exit_index: u32) -> SessionSlot {
        let Action::ToExit(slot) = self.client(MAIN, c, &initiation(k, 100)) else {
            panic!("initiation not forwarded")
        };
        self.commands();
        assert_eq!(
            self.exit(slot, &response(exit_index, 100)),
            Action::ToClient {
                listener: MAIN,
                client: c
            }
        );
        assert_eq!(
            self.client(MAIN, c, &transport(exit_index, 32)),
            Action::ToExit(slot)
        );
        slot
    }
    /// As [`Harness::establish`], without the client's transport: established, unverified.
    fn establish_unverified(
        &mut self,
        c: SocketAddr,
        k: PublicKey,
        exit_index: u32,
    ) -> SessionSlot {
        let Action::ToExit(slot) = self.client(MAIN, c, &initiation(k, 100)) else {
            panic!("initiation not forwarded")
        };
        self.exit(slot, &response(exit_index, 100));
        slot
    }
}

#[test]
fn initiation_opens_a_socket_to_the_exit_its_mac1_names() {
    let mut h = Harness::new();
    let c = client(1);
    let Action::ToExit(slot) = h.client(MAIN, c, &initiation(key(2), 7)) else {
        panic!("not forwarded")
    };
    assert_eq!(
        h.commands(),
        vec![Command::OpenExitSocket {
            slot,
            exit: exit_addr(2),
            local_port: None
        }]
    );
    assert_eq!((h.r.session_count(), h.r.pending_count()), (1, 1));
    // A retry reuses the session and its socket.
    assert_eq!(
        h.client(MAIN, c, &initiation(key(2), 8)),
        Action::ToExit(slot)
    );
    assert!(h.commands().is_empty());
    assert_eq!(h.r.stats().client_handshakes, 2);
}

#[test]
fn initiation_for_no_configured_exit_is_dropped() {
    let mut h = Harness::new();
    assert_eq!(
        h.client(MAIN, client(1), &initiation(key(9), 1)),
        Action::Drop(DropReason::NoExit)
    );
    assert!(h.commands().is_empty());
    assert_eq!(h.r.stats().dropped(DropReason::NoExit), 1);
    assert_eq!(h.r.session_count(), 0);
}

#[test]
fn pinned_port_routes_to_its_exit_and_checks_mac1() {
    let mut h = Harness::new();
    let Action::ToExit(slot) = h.client(PINNED, client(1), &initiation(key(2), 1)) else {
        panic!("not forwarded")
    };
    assert_eq!(
        h.commands(),
        vec![Command::OpenExitSocket {
            slot,
            exit: exit_addr(2),
            local_port: None
        }]
    );
    // Exit 1's initiation on exit 2's port.
    assert_eq!(
        h.client(PINNED, client(2), &initiation(key(1), 1)),
        Action::Drop(DropReason::Mac1Mismatch)
    );
    // Replies go out the pinned listener.
    assert_eq!(
        h.exit(slot, &response(5, 1)),
        Action::ToClient {
            listener: PINNED,
            client: client(1)
        }
    );
}

#[test]
fn a_closed_listener_takes_its_sessions_and_only_those() {
    let mut h = Harness::new();
    let Action::ToExit(pinned) = h.client(PINNED, client(1), &initiation(key(2), 1)) else {
        panic!("not forwarded")
    };
    h.commands();
    h.exit(pinned, &response(5, 1));
    let main = h.establish(client(2), key(2), 2);
    h.r.listener_closed(PINNED);
    assert!(h.r.sweeping());
    h.advance(Duration::ZERO);
    assert!(!h.r.sweeping());
    assert_eq!(
        h.commands(),
        vec![Command::CloseExitSocket { slot: pinned }]
    );
    assert_eq!(h.r.session_count(), 1);
    assert_eq!(
        h.client(MAIN, client(2), &transport(2, 32)),
        Action::ToExit(main)
    );
    assert_eq!(h.r.stats().sessions_closed_by_table, 1);
}

#[test]
fn transport_flows_both_ways_once_established() {
    let mut h = Harness::new();
    let c = client(1);
    let slot = h.establish(c, key(1), 0xE1);
    assert_eq!(h.r.pending_count(), 0);
    for _ in 0..10 {
        assert_eq!(
            h.client(MAIN, c, &transport(0xE1, 1440)),
            Action::ToExit(slot)
        );
        assert_eq!(
            h.exit(slot, &transport(100, 1440)),
            Action::ToClient {
                listener: MAIN,
                client: c
            }
        );
    }
    let s = h.r.stats();
    assert_eq!(s.client_to_exit.packets, 12); // initiation, keepalive, 10 data
    assert_eq!(s.exit_to_client.packets, 11);
    assert_eq!(s.total_drops(), 0);
    let info: Vec<_> = h.r.sessions(h.now).collect();
    assert_eq!(info.len(), 1);
    assert!(info[0].established && info[0].verified);
    assert_eq!(info[0].to_exit.bytes, 148 + 32 + 14400);
}

#[test]
fn spoofed_transport_moves_nothing() {
    let mut h = Harness::new();
    let c = client(1);
    let slot = h.establish(c, key(1), 0xE1);
    // The attacker knows the index (it is sent in clear) but not the address.
    let attacker = client(66);
    assert_eq!(
        h.client(MAIN, attacker, &transport(0xE1, 64)),
        Action::Drop(DropReason::UnknownClient)
    );
    // Unknown index from the real address is not forwarded either.
    assert_eq!(
        h.client(MAIN, c, &transport(0xBAD, 64)),
        Action::Drop(DropReason::UnknownIndex)
    );
    // Replies still go to the real client.
    assert_eq!(
        h.exit(slot, &transport(1, 64)),
        Action::ToClient {
            listener: MAIN,
            client: c
        }
    );
}

#[test]
fn unverified_clients_get_no_more_bytes_than_they_sent() {
    let mut h = Harness::new();
    let victim = client(1);
    let Action::ToExit(slot) = h.client(MAIN, victim, &initiation(key(1), 1)) else {
        panic!()
    };
    // 148 in: a 92-byte response fits, a 64-byte cookie does not after it.
    assert!(matches!(
        h.exit(slot, &response(9, 1)),
        Action::ToClient { .. }
    ));
    assert_eq!(
        h.exit(slot, &transport(1, 64)),
        Action::Drop(DropReason::AmplificationLimit)
    );
    // Once the client uses the exit's index, it has proven it receives: no more cap.
    assert_eq!(
        h.client(MAIN, victim, &transport(9, 32)),
        Action::ToExit(slot)
    );
    assert!(matches!(
        h.exit(slot, &transport(1, 1440)),
        Action::ToClient { .. }
    ));
}

#[test]
fn cookie_replies_reach_the_client_and_the_retry_goes_through() {
    let mut h = Harness::new();
    let c = client(3);
    let Action::ToExit(slot) = h.client(MAIN, c, &initiation(key(1), 41)) else {
        panic!()
    };
    assert_eq!(
        h.exit(slot, &cookie(41)),
        Action::ToClient {
            listener: MAIN,
            client: c
        }
    );
    assert_eq!(
        h.client(MAIN, c, &initiation(key(1), 42)),
        Action::ToExit(slot)
    );
    assert!(matches!(
        h.exit(slot, &response(77, 42)),
        Action::ToClient { .. }
    ));
    assert_eq!(h.r.stats().cookie_replies, 1);
    assert_eq!(h.r.stats().sessions_established, 1);
}

#[test]
fn exit_initiated_handshakes_reach_the_right_client() {
    let mut h = Harness::new();
    let (a, b) = (client(1), client(2));
    let sa = h.establish(a, key(1), 0xA);
    let sb = h.establish(b, key(1), 0xB);
    assert_ne!(sa, sb, "each client has its own exit-facing socket");
    assert_eq!(
        h.exit(sb, &initiation(PublicKey([0xCC; 32]), 0xB2)),
        Action::ToClient {
            listener: MAIN,
            client: b
        }
    );
    // B answers using the index from the exit's initiation.
    assert_eq!(
        h.client(MAIN, b, &response_to(key(1), 500, 0xB2)),
        Action::ToExit(sb)
    );
    // A response without the exit's mac1 names no session.
    assert_eq!(
        h.client(MAIN, b, &response(501, 0xB2)),
        Action::Drop(DropReason::Mac1Mismatch)
    );
    assert_eq!(h.client(MAIN, b, &transport(0xB2, 48)), Action::ToExit(sb));
    // A cannot use B's new index.
    assert_eq!(
        h.client(MAIN, a, &transport(0xB2, 48)),
        Action::Drop(DropReason::UnknownIndex)
    );
    assert_eq!(h.r.stats().exit_handshakes, 1);
}

#[test]
fn one_client_can_hold_sessions_to_two_exits() {
    let mut h = Harness::new();
    let c = client(1);
    let s1 = h.establish(c, key(1), 0x11);
    let s2 = h.establish(c, key(2), 0x22);
    assert_ne!(s1, s2);
    assert_eq!(h.client(MAIN, c, &transport(0x11, 32)), Action::ToExit(s1));
    assert_eq!(h.client(MAIN, c, &transport(0x22, 32)), Action::ToExit(s2));
}

#[test]
fn pending_handshakes_expire_and_close_their_socket() {
    let mut h = Harness::new();
    let Action::ToExit(slot) = h.client(MAIN, client(1), &initiation(key(1), 1)) else {
        panic!()
    };
    h.commands();
    h.advance(Duration::from_millis(4_900));
    assert_eq!(h.r.session_count(), 1);
    assert!(h.commands().is_empty());
    h.advance(Duration::from_millis(200));
    assert_eq!(h.r.session_count(), 0);
    assert_eq!(h.commands(), vec![Command::CloseExitSocket { slot }]);
    assert_eq!(h.r.stats().sessions_expired_pending, 1);
    // A late answer for the old slot goes nowhere.
    assert_eq!(
        h.exit(slot, &response(1, 1)),
        Action::Drop(DropReason::NoSession)
    );
}

#[test]
fn retries_keep_a_pending_handshake_alive() {
    let mut h = Harness::new();
    let c = client(1);
    h.client(MAIN, c, &initiation(key(1), 1));
    for i in 0..5 {
        h.advance(Duration::from_secs(4));
        h.client(MAIN, c, &initiation(key(1), 2 + i));
    }
    assert_eq!(h.r.session_count(), 1);
}

#[test]
fn idle_sessions_expire_and_traffic_keeps_them() {
    let mut h = Harness::new();
    let c = client(1);
    let busy = h.establish(c, key(1), 1);
    let quiet_client = client(2);
    h.establish(quiet_client, key(1), 2);
    for _ in 0..6 {
        h.advance(Duration::from_secs(100));
        assert_eq!(h.client(MAIN, c, &transport(1, 32)), Action::ToExit(busy));
    }
    assert_eq!(h.r.session_count(), 1, "the quiet session expired");
    assert_eq!(h.r.stats().sessions_expired_idle, 1);
    assert_eq!(
        h.client(MAIN, quiet_client, &transport(2, 32)),
        Action::Drop(DropReason::UnknownClient)
    );
}

#[test]
fn bounds_refuse_new_handshakes_and_never_evict() {
    let cfg = RouterConfig {
        max_sessions: 4,
        max_pending: 2,
        ..RouterConfig::default()
    };
    let mut h = Harness::with(cfg);
    let s0 = h.establish(client(0), key(1), 10);
    let s1 = h.establish(client(1), key(1), 11);
    assert!(matches!(
        h.client(MAIN, client(2), &initiation(key(1), 1)),
        Action::ToExit(_)
    ));
    // One pending session is half of max_pending: from here on the relay is under load,
    // and only sources that prove their address with our cookie get in.
    assert_eq!(
        h.client(MAIN, client(3), &initiation(key(1), 1)),
        Action::Drop(DropReason::CookieChallenge)
    );
    h.commands();
    assert!(matches!(
        h.initiate_proving(client(3), key(1), 1),
        Action::ToExit(_)
    ));
    assert_eq!(
        h.initiate_proving(client(4), key(1), 1),
        Action::Drop(DropReason::SessionsFull)
    );
    let mut h2 = Harness::with(RouterConfig {
        max_sessions: 10,
        max_pending: 2,
        ..RouterConfig::default()
    });
    for c in 0..2 {
        assert!(matches!(
            h2.initiate_proving(client(c), key(1), 1),
            Action::ToExit(_)
        ));
    }
    assert_eq!(
        h2.initiate_proving(client(2), key(1), 1),
        Action::Drop(DropReason::PendingFull)
    );
    // The established sessions in the full router are untouched.
    assert_eq!(
        h.client(MAIN, client(0), &transport(10, 32)),
        Action::ToExit(s0)
    );
    assert_eq!(
        h.client(MAIN, client(1), &transport(11, 32)),
        Action::ToExit(s1)
    );
    assert_eq!(h.r.stats().dropped(DropReason::SessionsFull), 1);
}

#[test]
fn per_client_session_limit() {
    let mut h = Harness::with(RouterConfig {
        max_sessions_per_client: 1,
        ..RouterConfig::default()
    });
    h.client(MAIN, client(1), &initiation(key(1), 1));
    assert_eq!(
        h.client(MAIN, client(1), &initiation(key(2), 1)),
        Action::Drop(DropReason::ClientSessionLimit)
    );
}

#[test]
fn handshake_rate_limit_is_per_source() {
    let mut h = Harness::new();
    let c = client(1);
    let results: Vec<_> = (0..10)
        .map(|i| h.client(MAIN, c, &initiation(key(1), i)))
        .collect();
    let limited = results
        .iter()
        .filter(|a| **a == Action::Drop(DropReason::CookieChallenge))
        .count();
    assert_eq!(limited, 5, "burst of 5 then challenged: {results:?}");
    assert_eq!(h.cookie_replies().len(), 5);
    assert!(matches!(
        h.client(MAIN, client(2), &initiation(key(1), 1)),
        Action::ToExit(_)
    ));
    h.advance(Duration::from_millis(60));
    assert!(matches!(
        h.client(MAIN, c, &initiation(key(1), 99)),
        Action::ToExit(_)
    ));
}

#[test]
fn table_swap_keeps_sessions_whose_exit_stays() {
    let mut h = Harness::new();
    let keep = h.establish(client(1), key(1), 1);
    let gone = h.establish(client(2), key(2), 2);
    let t = ExitTable::new(
        2,
        vec![ExitSpec {
            name: "one".into(),
            public_key: key(1),
            endpoint: exit_addr(1),
            listen_port: None,
        }],
    )
    .unwrap();
    h.r.set_table(Arc::new(t));
    h.advance(Duration::ZERO);
    assert!(!h.r.sweeping());
    assert_eq!(h.commands(), vec![Command::CloseExitSocket { slot: gone }]);
    assert_eq!(
        h.client(MAIN, client(1), &transport(1, 32)),
        Action::ToExit(keep)
    );
    assert_eq!(
        h.client(MAIN, client(2), &transport(2, 32)),
        Action::Drop(DropReason::UnknownClient)
    );
    assert_eq!(
        h.client(MAIN, client(3), &initiation(key(2), 1)),
        Action::Drop(DropReason::NoExit)
    );
    assert_eq!(h.r.stats().sessions_closed_by_table, 1);
}

#[test]
fn exits_are_counted_apart_and_a_removed_exits_entry_goes_to_the_next_new_one() {
    let mut h = Harness::new();
    let one = h.establish(client(1), key(1), 1);
    h.establish(client(2), key(2), 2);
    h.establish(client(3), key(2), 3);
    h.commands();
    assert_eq!(
        h.exit(one, &transport(9, 100)),
        Action::ToClient {
            listener: MAIN,
            client: client(1)
        }
    );
    // A forged response on exit 1's socket counts against exit 1.
    assert_eq!(
        h.exit(one, &response(5, 12345)),
        Action::Drop(DropReason::UnmatchedResponse)
    );
    let by_key = |h: &Harness, k: PublicKey| {
        h.r.exit_stats()
            .iter()
            .find(|e| e.key == Some(k))
            .cloned()
            .expect("an entry per exit")
    };
    let e1 = by_key(&h, key(1));
    let e2 = by_key(&h, key(2));
    assert_eq!(
        (e1.sessions, e1.sessions_opened, e1.client_handshakes),
        (1, 1, 1)
    );
    assert_eq!(
        (e2.sessions, e2.sessions_opened, e2.client_handshakes),
        (2, 2, 2)
    );
    // Initiation, keepalive; response, the 100-byte transport.
    assert_eq!(e1.client_to_exit.packets, 2);
    assert_eq!(
        e1.exit_to_client,
        Traffic {
            packets: 2,
            bytes: RESPONSE_LEN as u64 + 100
        }
    );
    assert_eq!(e1.dropped(DropReason::UnmatchedResponse), 1);
    assert_eq!(e2.dropped(DropReason::UnmatchedResponse), 0);
    // Exit 2 leaves and exit 3 comes: once the sweep has closed exit 2's sessions, its
    // entry is vacant, and the next exit counted starts from zero in it.
    let spec = |n: u8| ExitSpec {
        name: format!("e{n}"),
        public_key: key(n),
        endpoint: exit_addr(n),
        listen_port: None,
    };
    h.r.set_table(Arc::new(ExitTable::new(2, vec![spec(1), spec(3)]).unwrap()));
    assert!(
        h.r.exit_stats().iter().any(|e| e.key == Some(key(2))),
        "kept while swept"
    );
    h.advance(Duration::ZERO);
    assert!(!h.r.sweeping());
    assert!(h.r.exit_stats().iter().all(|e| e.key != Some(key(2))));
    assert_eq!(by_key(&h, key(1)), e1, "exit 1 counts on");
    h.r.set_table(Arc::new(
        ExitTable::new(3, vec![spec(1), spec(3), spec(4)]).unwrap(),
    ));
    h.establish(client(4), key(4), 4);
    assert_eq!(
        h.r.exit_stats().len(),
        2,
        "exit 4 took exit 2's vacant entry"
    );
    let e4 = by_key(&h, key(4));
    assert_eq!(
        (e4.sessions, e4.sessions_opened, e4.client_handshakes),
        (1, 1, 1)
    );
    assert!(
        h.r.exit_stats().iter().all(|e| e.key != Some(key(3))),
        "an exit without traffic has no entry"
    );
}

#[test]
fn table_swap_sweep_is_spread_over_calls() {
    let mut h = Harness::with(RouterConfig {
        swap_sweep_budget: 2 * SWEEP_CLOSE_COST,
        handshake_burst: 100,
        ..RouterConfig::default()
    });
    for i in 0..10 {
        h.establish(client(i), key(2), 1);
    }
    // Every session kept: one step examines ten.
    let same = ExitTable::new(2, h.r.table().specs().cloned().collect()).unwrap();
    h.r.set_table(Arc::new(same));
    h.advance(Duration::ZERO);
    assert!(!h.r.sweeping());
    assert_eq!(h.r.session_count(), 10);
    // Every session closed: a close costs five examinations, so two per step.
    h.r.set_table(Arc::new(ExitTable::new(3, vec![]).unwrap()));
    let mut calls = 0;
    while h.r.sweeping() {
        h.advance(Duration::ZERO);
        calls += 1;
        assert!(calls < 10);
    }
    assert_eq!(calls, 5);
    assert_eq!(h.r.session_count(), 0);
}

/// Every message type travels both ways in WireGuard (either side initiates, answers or
/// sends a cookie), so nothing is refused for its direction; a response or cookie reply
/// from a client address with no session has nowhere to go.
#[test]
fn responses_and_cookies_from_unknown_client_addresses_are_dropped() {
    let mut h = Harness::new();
    assert_eq!(
        h.client(MAIN, client(1), &response(1, 2)),
        Action::Drop(DropReason::UnknownClient)
    );
    assert_eq!(
        h.client(MAIN, client(1), &cookie(2)),
        Action::Drop(DropReason::UnknownClient)
    );
}

#[test]
fn malformed_packets_are_dropped_with_their_reason() {
    let mut h = Harness::new();
    let slot = h.establish(client(1), key(1), 1);
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![], DropReason::Truncated),
        (vec![1, 0, 0], DropReason::Truncated),
        (vec![1, 0, 0, 0, 9], DropReason::BadLength),
        ([4, 0, 0, 0].repeat(7), DropReason::BadLength),
        ([1, 1, 0, 0].repeat(37), DropReason::ReservedNonZero),
        ([9, 0, 0, 0].repeat(8), DropReason::UnknownType),
    ];
    for (bytes, reason) in &cases {
        assert_eq!(h.client(MAIN, client(1), bytes), Action::Drop(*reason));
        assert_eq!(h.exit(slot, bytes), Action::Drop(*reason));
    }
    for (_, reason) in &cases {
        assert!(h.r.stats().dropped(*reason) >= 2);
    }
}

#[test]
fn snapshot_and_restore_keep_a_session_without_a_handshake() {
    let mut h = Harness::new();
    let c = client(1);
    let slot = h.establish(c, key(1), 0xE1);
    h.exit(slot, &initiation(key(0xCC), 0xE2));
    h.client(MAIN, c, &response_to(key(1), 7, 0xE2));
    let info = h.r.sessions(h.now).next().unwrap();
    assert_eq!(info.exit_indices, vec![0xE1, 0xE2]);
    let snap = SessionSnapshot::new(info, 40123);
    // A new relay process.
    let mut fresh = Harness::new();
    let restored = fresh.r.restore(fresh.now, MAIN, &snap).unwrap();
    assert_eq!(
        fresh.commands(),
        vec![Command::OpenExitSocket {
            slot: restored,
            exit: exit_addr(1),
            local_port: Some(40123)
        }]
    );
    assert_eq!((fresh.r.session_count(), fresh.r.pending_count()), (1, 0));
    assert_eq!(
        fresh.client(MAIN, c, &transport(0xE2, 64)),
        Action::ToExit(restored)
    );
    assert!(matches!(
        fresh.exit(restored, &transport(5, 1440)),
        Action::ToClient { .. }
    ));
    // A session whose exit is gone is not restored.
    let mut gone = snap.clone();
    gone.exit_key = key(9);
    assert_eq!(
        fresh.r.restore(fresh.now, MAIN, &gone),
        Err(DropReason::NoExit)
    );
}

#[test]
fn index_ring_lists_oldest_first_after_wrapping() {
    let mut r = IndexRing::default();
    for i in 0..11 {
        r.push(i);
    }
    assert_eq!(r.to_vec(), (3..11).collect::<Vec<_>>());
    assert!(!r.contains(2) && r.contains(3));
}

#[test]
fn index_ring_evicts_unused_indices_first() {
    let mut r = IndexRing::default();
    for i in 0..EXIT_INDICES as u32 {
        r.push(i);
    }
    r.mark_used(2);
    r.mark_used(5);
    for i in 100..120 {
        r.push(i);
    }
    let v = r.to_vec();
    assert_eq!(v.len(), EXIT_INDICES);
    assert!(r.contains(2) && r.contains(5), "used indices stay: {v:?}");
    assert_eq!(&v[2..], &[114, 115, 116, 117, 118, 119]);
    // With every index used, the oldest goes.
    for i in v {
        r.mark_used(i);
    }
    r.push(7);
    assert!(!r.contains(2) && r.contains(5) && r.contains(7));
}

#[test]
fn forged_exit_initiations_never_evict_the_clients_indices() {
    let mut h = Harness::new();
    let c = client(1);
    let slot = h.establish(c, key(1), 0xE1);
    // Anyone who spoofs the exit's address towards this session's socket is "the exit".
    for forged in 0..1_000u32 {
        h.exit(
            slot,
            &initiation(PublicKey([0xCC; 32]), 0xF000_0000 + forged),
        );
    }
    assert_eq!(
        h.client(MAIN, c, &transport(0xE1, 64)),
        Action::ToExit(slot)
    );
    // A rekey in the middle of the flood: the exit's new index survives until the client
    // uses it, and then for good.
    assert_eq!(
        h.client(MAIN, c, &initiation(key(1), 101)),
        Action::ToExit(slot)
    );
    h.exit(slot, &response(0xE2, 101));
    for forged in 0..3u32 {
        h.exit(
            slot,
            &initiation(PublicKey([0xCC; 32]), 0xF100_0000 + forged),
        );
    }
    assert_eq!(
        h.client(MAIN, c, &transport(0xE2, 64)),
        Action::ToExit(slot)
    );
    for forged in 0..1_000u32 {
        h.exit(
            slot,
            &initiation(PublicKey([0xCC; 32]), 0xF200_0000 + forged),
        );
    }
    assert_eq!(
        h.client(MAIN, c, &transport(0xE2, 64)),
        Action::ToExit(slot)
    );
    assert_eq!(
        h.client(MAIN, c, &transport(0xE1, 64)),
        Action::ToExit(slot)
    );
}

#[test]
fn slot_packing_round_trips() {
    let s = SessionSlot {
        index: 0xDEAD_BEEF,
        generation: 7,
    };
    assert_eq!(SessionSlot::from_u64(s.to_u64()), s);
}

#[test]
fn mac1_matches_a_real_boringtun_initiation() {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey as XPublic, StaticSecret};
    let client_secret = StaticSecret::random_from_rng(rand::thread_rng());
    let exit_secret = StaticSecret::random_from_rng(rand::thread_rng());
    let exit_public = XPublic::from(&exit_secret);
    let mut tunn = Tunn::new(client_secret, exit_public, None, None, 1, None);
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut buf, false) else {
        panic!("boringtun made no initiation")
    };
    let Ok(Message::Initiation(init)) = Message::parse(init) else {
        panic!("boringtun's initiation refused")
    };
    let exit_key = PublicKey(exit_public.to_bytes());
    assert!(exit_key.mac1_key().verify(init.mac1_input(), init.mac1()));
    assert!(!PublicKey([0; 32])
        .mac1_key()
        .verify(init.mac1_input(), init.mac1()));
}

/// One step of the adversarial model: who sends what, and how time moves.
#[derive(Debug, Clone)]
enum Step {
    ClientInit { client: u8, exit: u8, sender: u32 },
    ClientTransport { client: u8, index: u32, len: u16 },
    ClientRaw { client: u8, bytes: Vec<u8> },
    ExitResponse { slot: u8, sender: u32 },
    ExitInit { slot: u8, sender: u32 },
    ExitTransport { slot: u8, len: u16 },
    ExitRaw { slot: u8, bytes: Vec<u8> },
    Advance { millis: u32 },
    DropExit2,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..8, 0u8..4, 0u32..4).prop_map(|(client, exit, sender)| Step::ClientInit {
            client,
            exit,
            sender
        }),
        (0u8..8, 0u32..6, 2u16..100).prop_map(|(client, index, len)| Step::ClientTransport {
            client,
            index,
            len: len * 16
        }),
        (0u8..8, proptest::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(client, bytes)| Step::ClientRaw { client, bytes }),
        (0u8..8, 0u32..6).prop_map(|(slot, sender)| Step::ExitResponse { slot, sender }),
        (0u8..8, 0u32..6).prop_map(|(slot, sender)| Step::ExitInit { slot, sender }),
        (0u8..8, 2u16..100).prop_map(|(slot, len)| Step::ExitTransport {
            slot,
            len: len * 16
        }),
        (0u8..8, proptest::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(slot, bytes)| Step::ExitRaw { slot, bytes }),
        (0u32..20_000).prop_map(|millis| Step::Advance { millis }),
        Just(Step::DropExit2),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever anyone sends: nothing panics, packets only go to addresses that sent a
    /// valid initiation, unverified addresses never receive more than they sent, bounds
    /// hold, and the session and command bookkeeping stays consistent.
    #[test]
    fn router_invariants_hold_under_arbitrary_input(steps in proptest::collection::vec(step(), 1..200)) {
        let cfg = RouterConfig { max_sessions: 6, max_pending: 4, ..RouterConfig::default() };
        let mut h = Harness::with(cfg);
        let mut open: std::collections::HashSet<SessionSlot> = Default::default();
        let mut slots: Vec<SessionSlot> = Vec::new();
        let mut initiated: std::collections::HashSet<SocketAddr> = Default::default();
        // Per address: bytes in, bytes out, and whether it has proven receipt.
        let mut ledger: HashMap<SocketAddr, (u64, u64)> = HashMap::new();
        for step in steps {
            let (action, from, len) = match &step {
                Step::ClientInit { client: c, exit, sender } => {
                    let p = initiation(key(*exit), *sender);
                    (h.client(MAIN, client(u16::from(*c)), &p), Some(client(u16::from(*c))), p.len())
                }
                Step::ClientTransport { client: c, index, len } => {
                    let p = transport(*index, usize::from(*len));
                    (h.client(MAIN, client(u16::from(*c)), &p), Some(client(u16::from(*c))), p.len())
                }
                Step::ClientRaw { client: c, bytes } => {
                    (h.client(MAIN, client(u16::from(*c)), bytes), Some(client(u16::from(*c))), bytes.len())
                }
                Step::ExitResponse { slot, sender } => {
                    let Some(&s) = slots.get(usize::from(*slot)) else { continue };
                    let p = response(*sender, 0);
                    (h.exit(s, &p), None, p.len())
                }
                Step::ExitInit { slot, sender } => {
                    let Some(&s) = slots.get(usize::from(*slot)) else { continue };
                    let p = initiation(key(0xEE), *sender);
                    (h.exit(s, &p), None, p.len())
                }
                Step::ExitTransport { slot, len } => {
                    let Some(&s) = slots.get(usize::from(*slot)) else { continue };
                    let p = transport(0, usize::from(*len));
                    (h.exit(s, &p), None, p.len())
                }
                Step::ExitRaw { slot, bytes } => {
                    let Some(&s) = slots.get(usize::from(*slot)) else { continue };
                    (h.exit(s, bytes), None, bytes.len())
                }
                Step::Advance { millis } => {
                    h.advance(Duration::from_millis(u64::from(*millis)));
                    (Action::Drop(DropReason::NoSession), None, 0)
                }
                Step::DropExit2 => {
                    let t = ExitTable::new(9, vec![ExitSpec {
                        name: "one".into(), public_key: key(1), endpoint: exit_addr(1), listen_port: None,
                    }]).unwrap();
                    h.r.set_table(Arc::new(t));
                    h.advance(Duration::ZERO);
                    (Action::Drop(DropReason::NoSession), None, 0)
                }
            };
            if let Some(from) = from {
                ledger.entry(from).or_default().0 += len as u64;
            }
            for cmd in h.commands() {
                match cmd {
                    Command::OpenExitSocket { slot, exit, .. } => {
                        prop_assert!(exit == exit_addr(1) || exit == exit_addr(2));
                        prop_assert!(open.insert(slot));
                        slots.push(slot);
                    }
                    Command::CloseExitSocket { slot } => prop_assert!(open.remove(&slot)),
                    Command::Offload(_) | Command::Withdraw { .. } => {
                        prop_assert!(false, "offload is off in this model");
                    }
                    Command::SendCookieReply { client: to, .. } => {
                        // Only ever an answer to the initiation just received, and smaller.
                        prop_assert_eq!(Some(to), from);
                        let is_init = matches!(step, Step::ClientInit { .. });
                        prop_assert!(is_init);
                        prop_assert_eq!(action, Action::Drop(DropReason::CookieChallenge));
                        let e = ledger.entry(to).or_default();
                        e.1 += COOKIE_REPLY_LEN as u64;
                        prop_assert!(e.1 <= e.0, "cookie amplification to {}", to);
                    }
                }
            }
            if let Some(from) = from {
                if matches!(step, Step::ClientInit { exit: 1 | 2, .. }) && matches!(action, Action::ToExit(_)) {
                    initiated.insert(from);
                }
            }
            match action {
                Action::ToExit(slot) => prop_assert!(open.contains(&slot), "sent through a closed socket"),
                Action::ToClient { client: to, .. } => {
                    prop_assert!(initiated.contains(&to), "sent to {} which never initiated", to);
                    let e = ledger.entry(to).or_default();
                    e.1 += len as u64;
                    let verified = h.r.sessions(h.now).any(|s| s.client == to && s.verified);
                    prop_assert!(verified || e.1 <= e.0, "amplification to {}: {} out, {} in", to, e.1, e.0);
                }
                Action::Drop(_) => {}
            }
            prop_assert!(h.r.session_count() <= 6);
            prop_assert!(h.r.pending_count() <= 4);
            prop_assert_eq!(h.r.session_count(), open.len());
            prop_assert_eq!(h.r.sessions(h.now).count(), open.len());
            // The per-exit counters add up to the router's own, less those of an exit
            // that left the table (its entry is emptied once its sessions are gone).
            let mut total = ExitStats::default();
            for e in h.r.exit_stats() {
                total.merge(e);
            }
            let st = h.r.stats();
            prop_assert_eq!(total.sessions as usize, h.r.session_count());
            let exact = st.table_swaps == 0;
            let t = |a: Traffic, b: Traffic| if exact { a == b } else { a.packets <= b.packets && a.bytes <= b.bytes };
            let n = |a: u64, b: u64| if exact { a == b } else { a <= b };
            prop_assert!(t(total.client_to_exit, st.client_to_exit));
            prop_assert!(t(total.exit_to_client, st.exit_to_client));
            prop_assert!(n(total.client_handshakes, st.client_handshakes));
            prop_assert!(n(total.exit_handshakes, st.exit_handshakes));
            prop_assert!(n(total.sessions_opened, st.sessions_opened));
            for reason in DropReason::ALL {
                prop_assert!(total.dropped(reason) <= st.dropped(reason));
                if !ExitStats::REASONS.contains(&reason) {
                    prop_assert_eq!(total.dropped(reason), 0);
                }
            }
        }
    }
}

#[test]
fn an_idle_timeout_shorter_than_the_pending_one_never_leaves_a_session_past_its_deadline() {
    let mut h = Harness::with(RouterConfig {
        pending_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(2),
        ..RouterConfig::default()
    });
    let c = client(1);
    h.establish(c, key(1), 0xE1);
    // Established at once, the session's deadline is its last packet plus the idle timeout.
    // Its timer was set for the pending deadline; the worker sleeps until poll_timeout, so
    // that must not be later than the deadline the router itself applies.
    let deadline = h.now + h.r.config().idle_timeout;
    let wake = h.r.poll_timeout().expect("a session is open");
    assert!(wake <= deadline, "wakes {:?} late", wake - deadline);
    h.now = deadline;
    h.r.handle_timeout(h.now);
    assert_eq!(h.r.session_count(), 0, "idle until its deadline");
    assert_eq!(h.r.stats().sessions_expired_idle, 1);
}

#[test]
fn under_load_a_spoofed_flood_fills_half_the_pending_table_and_real_clients_still_get_in() {
    let mut h = Harness::with(RouterConfig {
        max_pending: 8,
        ..RouterConfig::default()
    });
    // 200 spoofed sources, each sending one initiation: they never see our replies.
    let mut challenged = 0;
    for n in 0..200 {
        match h.client(MAIN, client(1000 + n), &initiation(key(1), n.into())) {
            Action::ToExit(_) => {}
            Action::Drop(DropReason::CookieChallenge) => challenged += 1,
            other => panic!("flood initiation {n}: {other:?}"),
        }
    }
    assert_eq!(h.r.pending_count(), 4, "the flood stops at half the table");
    assert_eq!(challenged, 196);
    let replies = h.cookie_replies();
    assert_eq!(replies.len(), 196, "every challenge is one cookie reply");
    assert!(replies.iter().all(|(_, r)| r.len() < INITIATION_LEN));

    // A real client proves its address and gets in, as do three more, up to the bound.
    for n in 0..4 {
        assert!(matches!(
            h.initiate_proving(client(n), key(n as u8 % 2 + 1), 7),
            Action::ToExit(_)
        ));
    }
    assert_eq!(h.r.pending_count(), 8);
    assert_eq!(
        h.initiate_proving(client(9), key(1), 7),
        Action::Drop(DropReason::PendingFull)
    );
    assert_eq!(h.r.stats().dropped(DropReason::CookieChallenge), 196 + 5);

    // The pending handshakes expire; the load mark holds for a second after the table was
    // last at it, then unproven sources are welcome again.
    h.advance(Duration::from_millis(4500));
    assert!(h.r.under_load(h.now), "still full");
    h.advance(Duration::from_millis(800));
    assert_eq!(h.r.pending_count(), 0, "expired after 5 s");
    assert!(h.r.under_load(h.now), "load is remembered for a second");
    h.advance(Duration::from_millis(300));
    assert!(!h.r.under_load(h.now));
    assert!(matches!(
        h.client(MAIN, client(20), &initiation(key(1), 1)),
        Action::ToExit(_)
    ));
}

#[test]
fn spoofed_initiations_in_a_victims_name_cannot_spend_its_handshake_budget() {
    let mut h = Harness::new();
    let victim = client(1);
    // A flood from the victim's own address (another port: the attacker cannot see its
    // traffic) spends the unproven budget of that address...
    let spoofed: SocketAddr = format!("{}:9", victim.ip()).parse().unwrap();
    for i in 0..100 {
        h.client(MAIN, spoofed, &initiation(key(1), i));
    }
    h.commands();
    // ...but the victim is challenged, not refused, and its proof spends another budget.
    assert!(matches!(
        h.initiate_proving(victim, key(1), 500),
        Action::ToExit(_)
    ));
    // A mac2 made for the victim is no good from another port.
    let first = initiation(key(2), 600);
    assert_eq!(
        h.client(MAIN, victim, &first),
        Action::Drop(DropReason::CookieChallenge)
    );
    let reply = h.cookie_replies()[0].1;
    let mut retry = initiation(key(2), 601);
    let mac2 = mac2_for(&key(2), &reply, &first, &retry);
    retry[INITIATION_MAC2_OFFSET..].copy_from_slice(&mac2);
    assert_eq!(
        h.client(MAIN, spoofed, &retry),
        Action::Drop(DropReason::CookieChallenge)
    );
    assert!(matches!(h.client(MAIN, victim, &retry), Action::ToExit(_)));
}

#[test]
fn cookie_replies_have_a_budget_of_their_own() {
    let mut h = Harness::with(RouterConfig {
        cookie_replies_per_second: 100,
        max_pending: 2,
        ..RouterConfig::default()
    });
    let results: Vec<_> = (0..100)
        .map(|n| h.client(MAIN, client(100 + n), &initiation(key(1), 1)))
        .collect();
    let count = |r: DropReason| results.iter().filter(|a| **a == Action::Drop(r)).count();
    // One admitted (the mark is 1), a burst of 10 challenged, the rest refused unanswered.
    assert_eq!(count(DropReason::CookieChallenge), 10);
    assert_eq!(count(DropReason::RateLimited), 89);
    assert_eq!(h.cookie_replies().len(), 10);
    h.advance(Duration::from_millis(100));
    assert_eq!(
        h.client(MAIN, client(500), &initiation(key(1), 1)),
        Action::Drop(DropReason::CookieChallenge),
        "10 ms per reply at 100/s"
    );
}

#[test]
fn under_load_an_established_clients_rekey_is_not_challenged() {
    let mut h = Harness::with(RouterConfig {
        max_pending: 4,
        ..RouterConfig::default()
    });
    let c = client(1);
    let slot = h.establish(c, key(1), 0xE1);
    // A flood takes the pending table to the load mark.
    for n in 0..50 {
        h.client(MAIN, client(100 + n), &initiation(key(1), n.into()));
    }
    h.commands();
    assert!(h.r.under_load(h.now));
    // The client has used an index the exit sent only to it: its rekey goes straight
    // through, and so does its first handshake with another exit.
    assert_eq!(
        h.client(MAIN, c, &initiation(key(1), 7)),
        Action::ToExit(slot)
    );
    assert!(matches!(
        h.client(MAIN, c, &initiation(key(2), 8)),
        Action::ToExit(_)
    ));
    assert!(h.cookie_replies().is_empty());
    // Another port on the same host has proven nothing.
    let other: SocketAddr = format!("{}:9", c.ip()).parse().unwrap();
    assert_eq!(
        h.client(MAIN, other, &initiation(key(1), 9)),
        Action::Drop(DropReason::CookieChallenge)
    );
}

#[test]
fn spoofing_a_verified_clients_exact_address_costs_it_a_challenge_not_its_handshakes() {
    let mut h = Harness::new();
    let c = client(1);
    h.establish(c, key(1), 0xE1);
    // A flood in the client's exact name (it cannot see our replies, but the client can):
    // it spends the unproven budget and that of the address's verified session.
    for i in 0..100 {
        h.client(MAIN, c, &initiation(key(2), 1000 + i));
    }
    h.commands();
    // The client's own initiation is challenged, not refused, and its answer gets in.
    assert!(matches!(
        h.initiate_proving(c, key(2), 5000),
        Action::ToExit(_)
    ));
}

// Attacks by someone who spoofs the exit's address towards a session's exit-facing socket
// (its port seen on the relay–exit path or found by trying) and knows the client's public
// key. The router cannot authenticate the exit side; none of this may cost the session.

/// Attack 1: a flood of forged responses and initiations with fresh sender indices right
/// after a rekey, before the client's first transport on the new index.
#[test]
fn forged_exit_packets_during_a_rekey_never_evict_the_new_index() {
    let mut h = Harness::new();
    let c = client(1);
    let slot = h.establish(c, key(1), 0xE1);
    assert_eq!(
        h.client(MAIN, c, &initiation(key(1), 101)),
        Action::ToExit(slot)
    );
    assert!(matches!(
        h.exit(slot, &response(0xE2, 101)),
        Action::ToClient { .. }
    ));
    for forged in 0..2_000u32 {
        // Responses naming made-up initiations, the old (answered) ones, and the rekey's.
        let receiver = [forged, 100, 101][forged as usize % 3];
        assert_eq!(
            h.exit(slot, &response(0xF000_0000 + forged, receiver)),
            Action::Drop(DropReason::UnmatchedResponse)
        );
        h.exit(
            slot,
            &initiation(PublicKey([0xCC; 32]), 0xF100_0000 + forged),
        );
    }
    assert_eq!(
        h.client(MAIN, c, &transport(0xE2, 64)),
        Action::ToExit(slot),
        "the rekey's index survived the flood"
    );
    assert_eq!(
        h.client(MAIN, c, &transport(0xE1, 64)),
        Action::ToExit(slot)
    );
    assert_eq!(h.r.stats().dropped(DropReason::UnmatchedResponse), 2_000);
    assert_eq!(h.r.stats().dropped(DropReason::UnknownIndex), 0);
}

/// Attack 2: forged exit initiations with a valid mac1 for the client's key, which a stock
/// client under load answers with cookie replies naming the forged indices.
#[test]
fn client_cookie_replies_to_forged_initiations_never_count_as_use() {
    let mut h = Harness::new();
    let c = client(1);
    let client_key = PublicKey([0xC1; 32]);
    let slot = h.establish(c, key(1), 0xE1);
    for forged in 0..1_000u32 {
        let index = 0xF000_0000 + forged;
        assert!(matches!(
            h.exit(slot, &initiation(client_key, index)),
            Action::ToClient { .. }
        ));
        // The client refuses it with a cookie reply, which reaches the (real) exit.
        assert_eq!(h.client(MAIN, c, &cookie(index)), Action::ToExit(slot));
    }
    assert_eq!(
        h.client(MAIN, c, &transport(0xE1, 64)),
        Action::ToExit(slot),
        "the index the client's transport runs on stays"
    );
    // An exit-initiated rekey in the middle of the flood: the client's response names its
    // exit by mac1, even though the exit's index is long gone from the offered ones.
    h.exit(slot, &initiation(client_key, 0xE3));
    for forged in 0..100u32 {
        h.exit(slot, &initiation(client_key, 0xF200_0000 + forged));
    }
    assert_eq!(
        h.client(MAIN, c, &response_to(key(1), 0xC3, 0xE3)),
        Action::ToExit(slot)
    );
    for forged in 0..1_000u32 {
        h.exit(slot, &initiation(client_key, 0xF300_0000 + forged));
        h.client(MAIN, c, &cookie(0xF300_0000 + forged));
    }
    assert_eq!(
        h.client(MAIN, c, &transport(0xE3, 64)),
        Action::ToExit(slot)
    );
    assert_eq!(h.r.stats().dropped(DropReason::UnknownIndex), 0);
}

/// Attack 3: an initiation in a victim's name, a forged exit response with an index of the
/// attacker's choosing, then a transport in the victim's name with that index: the victim
/// must stay unverified, capped at what was sent in its name.
#[test]
fn a_forged_response_never_lifts_the_amplification_cap() {
    let mut h = Harness::new();
    let victim = client(1);
    let Action::ToExit(slot) = h.client(MAIN, victim, &initiation(key(1), 1)) else {
        panic!("initiation not forwarded")
    };
    assert_eq!(
        h.exit(slot, &response(0xBAD, 0x5EED)),
        Action::Drop(DropReason::UnmatchedResponse)
    );
    assert_eq!(
        h.client(MAIN, victim, &transport(0xBAD, 32)),
        Action::Drop(DropReason::UnknownIndex)
    );
    let info = h.r.sessions(h.now).next().unwrap();
    assert!(!info.verified && !info.established);
    // 148 bytes were sent in its name: the exit's retries go no further than that.
    let mut to_victim = 0;
    for _ in 0..10 {
        if let Action::ToClient { .. } = h.exit(slot, &initiation(PublicKey([0xC1; 32]), 9)) {
            to_victim += INITIATION_LEN;
        }
    }
    assert!(
        to_victim <= INITIATION_LEN,
        "{to_victim} bytes to the victim"
    );
}

/// The limit of what the relay can tell without authentication (ARCHITECTURE.md): an
/// attacker who spoofs the victim's initiation knows its sender index, so a response it
/// forges for it is believed. It gets exactly one per initiation, and the initiations it
/// can send in the victim's name are rate-limited.
#[test]
fn a_response_is_believed_once_per_initiation_of_the_client() {
    let mut h = Harness::new();
    let c = client(1);
    let Action::ToExit(slot) = h.client(MAIN, c, &initiation(key(1), 1)) else {
        panic!("initiation not forwarded")
    };
    assert!(matches!(
        h.exit(slot, &response(0xE1, 1)),
        Action::ToClient { .. }
    ));
    assert_eq!(
        h.exit(slot, &response(0xE2, 1)),
        Action::Drop(DropReason::UnmatchedResponse)
    );
    assert_eq!(
        h.client(MAIN, c, &transport(0xE2, 32)),
        Action::Drop(DropReason::UnknownIndex)
    );
    assert_eq!(
        h.client(MAIN, c, &transport(0xE1, 32)),
        Action::ToExit(slot)
    );
}

/// A client under load answers the exit's response to its own initiation with a cookie
/// reply naming the response's index; it must reach the exit, whose next response then
/// carries the cookie (wireguard-go's way through a flood).
#[test]
fn a_cookie_reply_to_the_exits_response_reaches_the_exit() {
    let mut h = Harness::new();
    let c = client(1);
    let slot = h.establish(c, key(1), 0xE1);
    h.client(MAIN, c, &initiation(key(1), 101));
    h.exit(slot, &response(0xE2, 101));
    assert_eq!(h.client(MAIN, c, &cookie(0xE2)), Action::ToExit(slot));
    assert_eq!(
        h.client(MAIN, c, &cookie(0x0BAD)),
        Action::Drop(DropReason::UnknownIndex)
    );
}

/// The limit ARCHITECTURE.md states: an attacker who spoofs both the victim and the exit,
/// and knows the new session's exit-facing port, can make the session verified. The relay
/// then reflects what arrives from the exit side, which is the attacker's own bytes, never
/// more than it sent.
#[test]
fn the_residual_lift_reflects_the_attackers_own_bytes_one_for_one() {
    let mut h = Harness::new();
    let victim = client(1);
    let mut attacker_sent = 0usize;
    let mut to_victim = 0usize;
    let send_exit = |h: &mut Harness, slot, p: &[u8], to_victim: &mut usize| {
        if let Action::ToClient { client, .. } = h.exit(slot, p) {
            assert_eq!(client, victim);
            *to_victim += p.len();
        }
    };
    let init = initiation(key(1), 1);
    attacker_sent += init.len();
    let Action::ToExit(slot) = h.client(MAIN, victim, &init) else {
        panic!("initiation not forwarded")
    };
    let forged = response(0xBAD, 1);
    attacker_sent += forged.len();
    send_exit(&mut h, slot, &forged, &mut to_victim);
    let t = transport(0xBAD, 32);
    attacker_sent += t.len();
    assert_eq!(h.client(MAIN, victim, &t), Action::ToExit(slot));
    for _ in 0..100 {
        let p = transport(7, 1440);
        attacker_sent += p.len();
        send_exit(&mut h, slot, &p, &mut to_victim);
    }
    assert!(
        to_victim > INITIATION_LEN,
        "the lift is the documented limit"
    );
    assert!(
        to_victim <= attacker_sent,
        "{to_victim} bytes to the victim for {attacker_sent} sent"
    );
}

/// The offload requests among `cmds`: (slot, indices).
fn offloads(cmds: &[Command]) -> Vec<(SessionSlot, Vec<u32>)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Offload(o) => Some((o.slot, o.indices().to_vec())),
            _ => None,
        })
        .collect()
}

fn with_offload() -> Harness {
    Harness::with(RouterConfig {
        offload: true,
        ..RouterConfig::default()
    })
}

#[test]
fn a_session_is_offloaded_only_once_its_client_has_proven_its_address() {
    let mut h = with_offload();
    let c = client(1);
    let Action::ToExit(slot) = h.client(MAIN, c, &initiation(key(1), 100)) else {
        panic!("initiation not forwarded")
    };
    assert!(offloads(&h.commands()).is_empty());
    // The exit's response establishes the session, but proves nothing about the client.
    assert!(matches!(
        h.exit(slot, &response(7, 100)),
        Action::ToClient { .. }
    ));
    assert!(
        offloads(&h.commands()).is_empty(),
        "not before return routability"
    );
    // Forged exit-side packets offer indices; none of them offloads anything.
    h.exit(slot, &initiation(key(9), 555));
    h.exit(slot, &response(8, 100));
    assert!(offloads(&h.commands()).is_empty());
    // The client uses the index the exit sent only to it: offloaded, with that index.
    assert_eq!(h.client(MAIN, c, &transport(7, 32)), Action::ToExit(slot));
    let cmds = h.commands();
    assert_eq!(offloads(&cmds), vec![(slot, vec![7])]);
    let Command::Offload(o) = cmds[0] else {
        panic!("{cmds:?}")
    };
    assert_eq!((o.client, o.listener, o.exit), (c, MAIN, exit_addr(1)));
    // Later transport asks nothing more.
    h.client(MAIN, c, &transport(7, 32));
    assert!(h.commands().is_empty());
    assert_eq!(h.r.stats().offloads, 1);
    assert!(h.r.sessions(h.now).all(|s| s.offloaded));
}

#[test]
fn without_a_fast_path_nothing_is_offloaded() {
    let mut h = Harness::new();
    let slot = h.establish(client(1), key(1), 7);
    assert!(offloads(&h.commands()).is_empty());
    h.r.close_session(slot);
    assert_eq!(h.commands(), vec![Command::CloseExitSocket { slot }]);
}

#[test]
fn a_rekey_either_way_offloads_its_new_index() {
    let mut h = with_offload();
    let c = client(1);
    let slot = h.establish(c, key(1), 7);
    h.commands();
    // The client rekeys; the exit's answer passes through userspace with the new index.
    assert_eq!(
        h.client(MAIN, c, &initiation(key(1), 200)),
        Action::ToExit(slot)
    );
    h.exit(slot, &response(8, 200));
    assert_eq!(offloads(&h.commands()), vec![(slot, vec![7, 8])]);
    // The exit rekeys: its initiation offers an index, the client's response makes it one.
    h.exit(slot, &initiation(key(9), 9));
    assert!(offloads(&h.commands()).is_empty(), "an offer is no index");
    assert_eq!(
        h.client(MAIN, c, &response_to(key(1), 300, 9)),
        Action::ToExit(slot)
    );
    assert_eq!(offloads(&h.commands()), vec![(slot, vec![7, 8, 9])]);
}

#[test]
fn kill_expiry_and_table_swap_withdraw_before_the_socket_closes() {
    let mut h = with_offload();
    let killed = h.establish(client(1), key(1), 1);
    let idle = h.establish(client(2), key(1), 2);
    let moved = h.establish(client(3), key(2), 3);
    let unverified = h.establish_unverified(client(4), key(1), 4);
    h.commands();
    assert!(h.r.close_session(killed));
    assert_eq!(
        h.commands(),
        vec![
            Command::Withdraw { slot: killed },
            Command::CloseExitSocket { slot: killed }
        ]
    );
    // Exit two moves: its session is withdrawn by the sweep.
    let t = ExitTable::new(
        2,
        vec![
            ExitSpec {
                name: "one".into(),
                public_key: key(1),
                endpoint: exit_addr(1),
                listen_port: None,
            },
            ExitSpec {
                name: "two".into(),
                public_key: key(2),
                endpoint: exit_addr(9),
                listen_port: None,
            },
        ],
    )
    .unwrap();
    h.r.set_table(Arc::new(t));
    h.advance(Duration::ZERO);
    assert_eq!(
        h.commands(),
        vec![
            Command::Withdraw { slot: moved },
            Command::CloseExitSocket { slot: moved }
        ]
    );
    h.advance(Duration::from_secs(541));
    let cmds = h.commands();
    assert_eq!(
        cmds,
        vec![
            Command::Withdraw { slot: idle },
            Command::CloseExitSocket { slot: idle },
            Command::CloseExitSocket { slot: unverified },
        ],
        "a session never offloaded is not withdrawn"
    );
    assert_eq!(h.r.stats().withdrawals, 3);
}

#[test]
fn kernel_traffic_keeps_a_session_alive_and_is_counted_apart() {
    let mut h = with_offload();
    let c = client(1);
    let slot = h.establish(c, key(1), 1);
    h.commands();
    let before = h.r.stats().client_to_exit;
    let t = |packets, bytes| Traffic { packets, bytes };
    for _ in 0..6 {
        h.advance(Duration::from_secs(100));
        let now = h.now;
        h.r.fast_path_traffic(slot, t(10, 1_000), t(20, 4_000), Some(now));
    }
    assert_eq!(h.r.session_count(), 1, "the kernel's traffic kept it");
    let s = h.r.sessions(h.now).next().expect("listed");
    assert_eq!(s.fast_to_exit, t(60, 6_000));
    assert_eq!(s.fast_to_client, t(120, 24_000));
    assert_eq!(s.to_exit.packets, 60 + 2, "totals include both paths");
    assert_eq!(
        h.r.stats().client_to_exit,
        before,
        "userspace's own counters"
    );
    assert_eq!(h.r.stats().fast_client_to_exit, t(60, 6_000));
    // Without kernel traffic it idles out; its final counters still count.
    h.advance(Duration::from_secs(541));
    assert_eq!(h.r.session_count(), 0);
    h.r.fast_path_traffic(slot, t(1, 100), t(0, 0), None);
    assert_eq!(h.r.stats().fast_client_to_exit, t(61, 6_100));
}

/// A counter as a saved session may hold it: any value, and often one at its end.
fn counter() -> impl Strategy<Value = u64> {
    prop_oneof![Just(u64::MAX), (u64::MAX - 3000)..=u64::MAX, any::<u64>()]
}

/// A saved session as `sessions.json` may hold it once damaged or edited by hand, yet still
/// parseable: any client of a small pool, any exit key and endpoint (in the table or not),
/// any exit-facing port, any indices (repeated, zero, more than a session keeps), any flags
/// and counters (near their end too).
fn saved_session() -> impl Strategy<Value = SessionSnapshot> {
    (
        (0u16..6, 0u8..4, 0u8..4, any::<u16>()),
        (any::<bool>(), any::<bool>()),
        proptest::collection::vec(0u32..6, 0..12),
        (counter(), counter(), counter()),
    )
        .prop_map(
            |((c, k, e, local_port), (established, verified), exit_indices, (a, b, handshakes))| {
                SessionSnapshot {
                    client: client(c),
                    listen_port: MAIN_PORT,
                    exit_key: key(k),
                    exit_endpoint: exit_addr(e),
                    local_port,
                    established,
                    verified,
                    exit_indices,
                    to_exit: Traffic {
                        packets: a,
                        bytes: b,
                    },
                    to_client: Traffic {
                        packets: b,
                        bytes: a,
                    },
                    handshakes,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever a parseable `sessions.json` holds, restoring it and then any traffic leaves
    /// the router sound: nothing panics (counters near their end included), a session is
    /// restored only for an exit still in the table at the same endpoint and within the
    /// bounds, and from then on packets go only through open sockets and to clients that
    /// were restored or initiated, with the bounds held.
    #[test]
    fn restoring_any_saved_sessions_then_any_traffic_keeps_the_router_sound(
        saved in proptest::collection::vec(saved_session(), 0..12),
        steps in proptest::collection::vec(step(), 0..80),
    ) {
        let cfg = RouterConfig { max_sessions: 6, max_pending: 4, ..RouterConfig::default() };
        let mut h = Harness::with(cfg);
        let mut open: std::collections::HashSet<SessionSlot> = Default::default();
        let mut slots: Vec<SessionSlot> = Vec::new();
        let mut known: std::collections::HashSet<SocketAddr> = Default::default();
        let track = |h: &mut Harness, open: &mut std::collections::HashSet<SessionSlot>,
                         slots: &mut Vec<SessionSlot>| -> Result<(), TestCaseError> {
            for cmd in h.commands() {
                match cmd {
                    Command::OpenExitSocket { slot, exit, .. } => {
                        prop_assert!(exit == exit_addr(1) || exit == exit_addr(2));
                        prop_assert!(open.insert(slot));
                        slots.push(slot);
                    }
                    Command::CloseExitSocket { slot } => prop_assert!(open.remove(&slot)),
                    _ => {}
                }
            }
            prop_assert!(h.r.session_count() <= 6);
            prop_assert!(h.r.pending_count() <= 4);
            prop_assert_eq!(h.r.session_count(), open.len());
            Ok(())
        };
        for snap in &saved {
            match h.r.restore(h.now, MAIN, snap) {
                Ok(_) => {
                    let endpoint = if snap.exit_key == key(1) { exit_addr(1) } else { exit_addr(2) };
                    prop_assert!(
                        (snap.exit_key == key(1) || snap.exit_key == key(2))
                            && snap.exit_endpoint == endpoint,
                        "restored a session of an exit not in the table: {:?}", snap
                    );
                    known.insert(snap.client);
                }
                Err(reason) => prop_assert!(matches!(
                    reason,
                    DropReason::NoExit | DropReason::ClientSessionLimit
                        | DropReason::SessionsFull | DropReason::PendingFull
                ), "{:?}", reason),
            }
            track(&mut h, &mut open, &mut slots)?;
        }
        for step in steps {
            let action = match &step {
                Step::ClientInit { client: c, exit, sender } => {
                    let a = h.client(MAIN, client(u16::from(*c)), &initiation(key(*exit), *sender));
                    if matches!(a, Action::ToExit(_)) {
                        known.insert(client(u16::from(*c)));
                    }
                    a
                }
                Step::ClientTransport { client: c, index, len } => {
                    h.client(MAIN, client(u16::from(*c)), &transport(*index, usize::from(*len)))
                }
                Step::ClientRaw { client: c, bytes } => h.client(MAIN, client(u16::from(*c)), bytes),
                Step::ExitResponse { slot, sender } => {
                    let Some(&s) = slots.get(usize::from(*slot)) else { continue };
                    h.exit(s, &response(*sender, 0))
                }
                Step::ExitInit { slot, sender } => {
                    let Some(&s) = slots.get(usize::from(*slot)) else { continue };
                    h.exit(s, &initiation(key(0xEE), *sender))
                }
                Step::ExitTransport { slot, len } => {
                    let Some(&s) = slots.get(usize::from(*slot)) else { continue };
                    h.exit(s, &transport(0, usize::from(*len)))
                }
                Step::ExitRaw { slot, bytes } => {
                    let Some(&s) = slots.get(usize::from(*slot)) else { continue };
                    h.exit(s, bytes)
                }
                Step::Advance { millis } => {
                    h.advance(Duration::from_millis(u64::from(*millis)));
                    Action::Drop(DropReason::NoSession)
                }
                Step::DropExit2 => continue,
            };
            // The sockets the step opened or closed first, as the worker carries them out.
            track(&mut h, &mut open, &mut slots)?;
            match action {
                Action::ToExit(slot) => prop_assert!(open.contains(&slot), "sent through a closed socket"),
                Action::ToClient { client: to, .. } => {
                    prop_assert!(known.contains(&to), "sent to {} which was neither restored nor initiated", to);
                }
                Action::Drop(_) => {}
            }
        }
    }
}
