//! Writes the hand-made seed inputs of every fuzz target into `fuzz/seeds/<target>/`
//! (`cargo run -p wraithgate-fuzzing --example seeds`). They stay as they are: `tools/fuzz`
//! hands them to libFuzzer beside the corpus it grows and minimises (`fuzz/corpus/`), and
//! the stable replay runs both.

use std::path::{Path, PathBuf};

/// Encodes events for the router target (see `wraithgate_fuzzing::router`).
#[derive(Default)]
struct Script(Vec<u8>);

impl Script {
    /// Limits: sessions, pending, per client, pending and idle timeouts (s), rate, burst,
    /// log2 of buckets, sweep budget; then the table (3 bits per exit).
    #[allow(clippy::too_many_arguments)]
    fn new(
        sessions: u8,
        pending: u8,
        per_client: u8,
        pending_s: u8,
        idle_s: u8,
        rate: u8,
        burst: u8,
        mask: u16,
    ) -> Self {
        let mut s = Script(vec![
            sessions - 1,
            pending - 1,
            per_client,
            pending_s - 1,
            idle_s - 1,
            rate - 1,
            burst - 1,
            13,
            3,
        ]);
        s.0.extend(mask.to_le_bytes());
        s
    }
    fn init(mut self, client: u8, listener: u8, exit: u8, sender: u32, flags: u8) -> Self {
        self.0.extend([0, client, listener, exit]);
        self.0.extend(sender.to_le_bytes());
        self.0.push(flags);
        self
    }
    /// Client transport with the `nth` index seen on the wire.
    fn data(mut self, client: u8, nth: u8, len: u16) -> Self {
        self.0.extend([1, client, 0, 0, nth]);
        self.0.extend(len.to_le_bytes());
        self
    }
    fn client_response(mut self, client: u8, nth: u8, sender: u32) -> Self {
        self.0.extend([1, client, 0, 1, nth]);
        self.0.extend(sender.to_le_bytes());
        self
    }
    fn raw(mut self, client: u8, bytes: &[u8]) -> Self {
        self.0.extend([2, client, 0, bytes.len() as u8]);
        self.0.extend(bytes);
        self
    }
    fn exit_response(mut self, slot: u8, sender: u32, nth: u8) -> Self {
        self.0.extend([3, slot]);
        self.0.extend(sender.to_le_bytes());
        self.0.push(nth);
        self
    }
    fn exit_init(mut self, slot: u8, sender: u32) -> Self {
        self.0.extend([4, slot]);
        self.0.extend(sender.to_le_bytes());
        self.0.push(0x5a);
        self
    }
    fn exit_cookie(mut self, slot: u8, nth: u8) -> Self {
        self.0.extend([5, slot, nth]);
        self
    }
    fn exit_data(mut self, slot: u8, len: u16) -> Self {
        self.0.extend([6, slot]);
        self.0.extend(len.to_le_bytes());
        self
    }
    fn exit_raw(mut self, slot: u8, bytes: &[u8]) -> Self {
        self.0.extend([7, slot, bytes.len() as u8]);
        self.0.extend(bytes);
        self
    }
    fn wait_ms(mut self, ms: u16) -> Self {
        self.0.push(8);
        self.0.extend(ms.to_le_bytes());
        self.0.push(0);
        self
    }
    fn wait_s(mut self, s: u16) -> Self {
        self.0.push(8);
        self.0.extend(s.to_le_bytes());
        self.0.push(1);
        self
    }
    fn swap(mut self, mask: u16, sweeps: u8) -> Self {
        self.0.push(9);
        self.0.extend(mask.to_le_bytes());
        self.0.push(sweeps);
        self
    }
    fn kill(mut self, slot: u8) -> Self {
        self.0.extend([10, slot]);
        self
    }
    fn restart(mut self) -> Self {
        self.0.push(11);
        self
    }
}

/// Initiation flags: answer the relay's last cookie reply for that client and exit.
const PROVE: u8 = 0x18;
/// All four exits, none pinned.
const ALL: u16 = 0b001_001_001_001;
/// All four, exit 1 pinned to listener 2.
const PINNED: u16 = ALL | 0b000_000_100_000;

fn router_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let base = || Script::new(8, 8, 4, 5, 30, 20, 5, ALL);
    // Indices on the wire, in order: the client's sender, then the exit's.
    let established = || {
        base()
            .init(0, 0, 0, 100, 0)
            .exit_response(0, 0xE1, 0)
            .data(0, 1, 64)
    };
    vec![
        (
            "handshake-and-data",
            established()
                .exit_data(0, 1400)
                .data(0, 1, 1400)
                .wait_s(10)
                .data(0, 1, 32)
                .exit_data(0, 32)
                .0,
        ),
        (
            "exit-initiated",
            established()
                .exit_init(0, 0xB2)
                .client_response(0, 2, 500)
                .data(0, 2, 96)
                .data(1, 2, 96)
                .0,
        ),
        (
            "cookie-then-retry",
            base()
                .init(2, 0, 1, 41, 0)
                .exit_cookie(0, 0)
                .init(2, 0, 1, 42, 0)
                .exit_response(0, 77, 1)
                .data(2, 2, 48)
                .0,
        ),
        (
            "amplification",
            base()
                .init(3, 0, 2, 9, 0)
                .exit_response(0, 10, 0)
                .exit_data(0, 64)
                .exit_data(0, 1400)
                .exit_init(0, 11)
                .0,
        ),
        (
            "bounds",
            // One pending session is the load mark here: the others are challenged and
            // get in by answering with the cookie (flags 0x18).
            Script::new(2, 1, 1, 5, 30, 20, 5, ALL)
                .init(0, 0, 0, 1, 0)
                .init(1, 0, 0, 2, 0)
                .exit_response(0, 3, 0)
                .init(1, 0, 0, 2, PROVE)
                .init(2, 0, 1, 4, 0)
                .init(2, 0, 1, 4, PROVE)
                .init(0, 0, 1, 5, 0)
                .init(0, 0, 1, 5, PROVE)
                .0,
        ),
        (
            "bounds-pending",
            Script::new(8, 2, 4, 5, 30, 20, 5, ALL)
                .init(0, 0, 0, 1, 0)
                .init(1, 0, 0, 2, 0)
                .init(1, 0, 0, 2, PROVE)
                .init(2, 0, 0, 3, 0)
                .init(2, 0, 0, 3, PROVE)
                .0,
        ),
        (
            "swap-and-expire",
            established()
                .init(4, 0, 1, 7, 0)
                .swap(0b001_001_001_000, 2)
                .swap(0b001_001_011_011, 1)
                .wait_ms(4_999)
                .wait_ms(2)
                .wait_s(31)
                .0,
        ),
        (
            "expire",
            established()
                .init(4, 0, 1, 7, 0)
                .wait_ms(4_999)
                .data(0, 1, 32)
                .wait_ms(2)
                .wait_s(29)
                .wait_s(2)
                .0,
        ),
        (
            "restart",
            established()
                .init(5, 0, 3, 8, 0)
                .restart()
                .data(0, 1, 64)
                .exit_data(0, 64)
                .0,
        ),
        (
            "rate-limit",
            (0..12u32)
                .fold(base(), |s, i| s.init(6, 0, 0, i, 0).init(7, 0, 1, i, 0))
                .wait_ms(50)
                .init(6, 0, 0, 99, 0)
                .0,
        ),
        (
            "pinned-port",
            Script::new(8, 8, 4, 5, 30, 20, 5, PINNED)
                .init(0, 2, 1, 1, 0)
                .init(1, 2, 0, 1, 0)
                .exit_response(0, 5, 0)
                .0,
        ),
        (
            "kill-and-failed-socket",
            established()
                .kill(0)
                .init(1, 0, 0, 3, 7)
                .exit_data(1, 64)
                .data(0, 1, 64)
                .0,
        ),
        (
            "garbage",
            established()
                .raw(0, &[4, 0, 0, 0, 0xE1, 0, 0, 0])
                .raw(
                    0,
                    &[[4, 0, 0, 0, 0xAD, 0x0B, 0, 0], [0; 8], [0; 8], [0; 8]].concat(),
                )
                .raw(0, &[1, 1, 0, 0])
                .raw(0, &[])
                .exit_raw(0, &[2, 0, 0, 0, 1])
                .exit_raw(0, &[9, 0, 0, 0, 0, 0, 0, 0])
                .0,
        ),
    ]
}

fn message(kind: u8, len: usize) -> Vec<u8> {
    let mut m = vec![0xA5; len];
    m[..4].copy_from_slice(&[kind, 0, 0, 0]);
    m
}

fn wire_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("initiation", message(1, 148)),
        ("response", message(2, 92)),
        ("cookie", message(3, 64)),
        ("keepalive", message(4, 32)),
        ("transport-unpadded", message(4, 1421)),
        ("short", vec![1, 0, 0]),
        ("reserved", vec![1, 0, 1, 0]),
    ]
}

fn config_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let k = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    vec![
        ("example", wraithgate_control::config::EXAMPLE.as_bytes().to_vec()),
        ("empty", Vec::new()),
        (
            "two-exits-pinned",
            format!(
                "[relay]\nlisten = [\"127.0.0.1:51820\", \"[::1]:51820\"]\nworkers = 2\nbackend = \"portable\"\n\n[limits]\nmax_sessions = 10\nmax_pending = 2\nmax_sessions_per_client = 2\npending_timeout_secs = 5\nidle_timeout_secs = 2\n\n[control]\napi_listen = \"127.0.0.1:0\"\nstate_dir = \"/tmp/x\"\n\n[[exit]]\nname = \"a\"\npublic_key = \"{k}\"\nendpoint = \"192.0.2.1:51820\"\nlisten_port = 51821\n\n[[exit]]\nname = \"b\"\npublic_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\nendpoint = \"[2001:db8::1]:51820\"\n"
            )
            .into_bytes(),
        ),
        (
            "duplicate-key",
            format!("[[exit]]\nname = \"a\"\npublic_key = \"{k}\"\nendpoint = \"192.0.2.1:1\"\n[[exit]]\nname = \"b\"\npublic_key = \"{k}\"\nendpoint = \"192.0.2.2:1\"\n").into_bytes(),
        ),
        ("bad-limit", b"[limits]\nmax_pending = 0\n".to_vec()),
    ]
}

fn api_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let k1 = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
    let k2 = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    vec![
        (
            "exit",
            format!(r#"{{"name":"exit-1","public_key":"{k1}","endpoint":"192.0.2.10:51820","listen_port":51821}}"#),
        ),
        (
            "peer",
            format!(r#"{{"public_key":"{k2}","name":"p","allowed_ips":["10.0.0.2/32","fd00::/64","0.0.0.0/0"],"preshared_key":"{k1}","allowed_exits":["{k1}"]}}"#),
        ),
        (
            "config",
            format!(r#"{{"generation":3,"exits":[{{"name":"a","public_key":"{k1}","endpoint":"[2001:db8::1]:51820","listen_port":null}}],"peers":[{{"public_key":"{k2}","allowed_ips":["10.1.0.0/16"],"allowed_exits":["{k1}"]}}]}}"#),
        ),
        ("empty-config", "{}".into()),
        (
            "duplicate-exit",
            format!(r#"{{"exits":[{{"name":"a","public_key":"{k1}","endpoint":"192.0.2.1:1","listen_port":null}},{{"name":"b","public_key":"{k1}","endpoint":"192.0.2.2:1","listen_port":null}}]}}"#),
        ),
    ]
    .into_iter()
    .map(|(n, s)| (n, s.into_bytes()))
    .collect()
}

/// Inner packets: the first byte picks an arbitrary datagram (odd) or one built from the
/// rest (even); see `wraithgate_fuzzing::inner`.
fn inner_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use wraithgate_relay::inner::build_udp;
    let raw = |src: &str, dst: &str, payload: &[u8]| {
        let mut p = Vec::new();
        build_udp(
            &mut p,
            src.parse().expect("address"),
            dst.parse().expect("address"),
            payload,
        );
        p
    };
    let with_mode = |mode: u8, p: Vec<u8>| [vec![mode], p].concat();
    let v4 = raw(
        "10.0.0.2:40000",
        "192.0.2.10:51820",
        &[4, 0, 0, 0, 1, 2, 3, 4],
    );
    let v6 = raw("[fd00::2]:40000", "[2001:db8::10]:51820", &[1; 148]);
    let mut fragment = v4.clone();
    fragment[6] |= 0x20;
    let mut tcp = v4.clone();
    tcp[9] = 6;
    let mut short_udp = v6.clone();
    short_udp[44..46].copy_from_slice(&4u16.to_be_bytes());
    vec![
        ("v4", with_mode(1, v4.clone())),
        ("v6", with_mode(1, v6)),
        ("v4-fragment", with_mode(1, fragment)),
        ("v4-tcp", with_mode(1, tcp)),
        ("v6-udp-length-short", with_mode(1, short_udp)),
        ("v4-truncated", with_mode(1, v4[..30].to_vec())),
        // Built: flags (bit 0 IPv6, bits 1-2 IPv4 option words, bits 3-4 trailing bytes),
        // ports, addresses, payload length, payload.
        (
            "built-v4-options",
            [
                &[0u8, 0b1_0110][..],
                &[1, 2, 3, 4, 10, 0, 0, 2, 192, 0, 2, 1],
                &[3, 0, 7, 7, 7],
            ]
            .concat(),
        ),
        (
            "built-v6",
            [
                &[0u8, 1][..],
                &[9; 4],
                &[0xfd; 16],
                &[0x20; 16],
                &[2, 0, 1, 2],
            ]
            .concat(),
        ),
    ]
}

/// The exit target: networks 10.64.0.0/24 and fd64::/64, then packets (`u16` length, bytes);
/// see `wraithgate_fuzzing::exit`.
fn exit_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use std::net::SocketAddr;
    use wraithgate_relay::inner::build_udp;
    let mut head = vec![10, 64, 0, 0, 24];
    head.extend([0xfd, 0x64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64]);
    let with = |packets: &[Vec<u8>]| {
        let mut d = head.clone();
        for p in packets {
            d.extend((p.len() as u16).to_le_bytes());
            d.extend(p);
        }
        d
    };
    let udp = |src: &str, dst: &str| {
        let mut p = Vec::new();
        let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        build_udp(&mut p, s, d, b"payload");
        p
    };
    let allowed = udp("10.64.0.2:5000", "198.18.0.1:53");
    let spoofed = udp("10.65.0.2:5000", "198.18.0.1:53");
    let v6 = udp("[fd64::2]:5000", "[2001:db8::1]:53");
    let mut padded = allowed.clone();
    padded.extend([0xee; 13]);
    let mut long_claim = allowed.clone();
    long_claim[3] = long_claim[3].wrapping_add(40);
    vec![
        ("allowed-v4", with(std::slice::from_ref(&allowed))),
        ("spoofed-v4", with(&[spoofed])),
        ("allowed-v6", with(&[v6])),
        ("keepalive-then-allowed", with(&[vec![], allowed.clone()])),
        ("padded-cut-to-length", with(&[padded])),
        ("length-beyond-packet", with(&[long_claim])),
        ("not-ip", with(&[vec![0x15; 30]])),
    ]
}

/// The zhop target: a provisioning (`u16`), then operations (see `wraithgate_fuzzing::zhop`).
#[derive(Clone)]
struct Ops(Vec<u8>);

impl Ops {
    /// Peers 0-2 provisioned; peer 0 may use exits 0 and 2, peer 1 exit 1, peer 2 all.
    const ALL: u16 = 0x0EAF;
    fn new(provisioning: u16) -> Self {
        Ops(provisioning.to_le_bytes().to_vec())
    }
    fn handshake(mut self, k: u8) -> Self {
        self.0.extend([0, k]);
        self
    }
    /// Shape 0: UDP to exit `j`; 1: to its address, another port; 2: TCP; 3: the payload
    /// as the packet; 4: a keepalive. Source 0: the peer's own network; 1: another
    /// peer's; 2: nobody's.
    fn data(mut self, k: u8, shape: u8, j: u8, src: u8, port: u8, payload: &[u8]) -> Self {
        self.0
            .extend([1, k, shape, j, src, port, payload.len() as u8]);
        self.0.extend(payload);
        self
    }
    fn roam(mut self, k: u8, at: u8) -> Self {
        self.0.extend([2, k, at]);
        self
    }
    /// The `nth` datagram clients sent, from pool address `at` (0x80: where it came from).
    fn replay(mut self, nth: u8, at: u8) -> Self {
        self.0.extend([3, nth, at]);
        self
    }
    /// Kind 0: the bytes; 1: an initiation with the node's mac1; 2: a transport naming
    /// tunnel `kind >> 2`; 3: an initiation with a wrong mac1.
    fn garbage(mut self, kind: u8, at: u8, bytes: &[u8]) -> Self {
        self.0.extend([4, kind, at, bytes.len() as u8]);
        self.0.extend(bytes);
        self
    }
    /// Steps: 100 ms, 300 ms, 1 s, 1.5 s, 5 s, 60 s, 130 s, 541 s.
    fn time(mut self, step: u8) -> Self {
        self.0.extend([5, step]);
        self
    }
    fn flood(mut self) -> Self {
        self.0.push(6);
        self
    }
    fn swap(mut self, provisioning: u16) -> Self {
        self.0.push(7);
        self.0.extend(provisioning.to_le_bytes());
        self
    }
    /// An exit's reply on flow `sel` (0: the first live one, 2: a closed one, 3: made up).
    fn exit_reply(mut self, sel: u8, payload: &[u8]) -> Self {
        self.0.extend([8, sel, payload.len() as u8]);
        self.0.extend(payload);
        self
    }
}

fn zhop_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let up = Ops::new(Ops::ALL)
        .handshake(0)
        .data(0, 0, 0, 0, 0, b"inner wg");
    vec![
        (
            "handshake-data-reply",
            up.clone()
                .exit_reply(0, b"from the exit")
                .data(0, 0, 2, 0, 1, b"over IPv6")
                .data(0, 0, 0, 0, 0, b"same flow")
                .data(0, 4, 0, 0, 0, b"")
                .0,
        ),
        (
            "inner-refusals",
            up.clone()
                .data(0, 0, 1, 0, 0, b"exit 1 not allowed")
                .data(0, 1, 0, 0, 0, b"wrong port")
                .data(0, 0, 0, 1, 0, b"another peer's source")
                .data(0, 0, 0, 2, 0, b"nobody's source")
                .data(0, 2, 0, 0, 0, b"tcp")
                .data(0, 3, 0, 0, 0, &[0x45, 0, 0, 99])
                // IPv4 whose UDP header does not fit in its total length.
                .data(
                    0,
                    3,
                    0,
                    0,
                    0,
                    &[
                        0x45, 0, 0, 24, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 1, 2, 192, 0, 2, 1, 0x13,
                        0x88, 0xca, 0x6c,
                    ],
                )
                .data(0, 3, 0, 0, 0, &[0x15; 20])
                .0,
        ),
        (
            "unprovisioned",
            Ops::new(Ops::ALL)
                .handshake(3)
                .flood()
                .handshake(3)
                .handshake(3)
                .0,
        ),
        (
            "cookie-under-load",
            Ops::new(Ops::ALL)
                .flood()
                .handshake(0)
                .handshake(0)
                .data(0, 0, 0, 0, 0, b"after the cookie")
                .roam(0, 1)
                .handshake(0)
                .handshake(0)
                .time(3)
                .handshake(1)
                .0,
        ),
        (
            "roaming",
            up.clone()
                .roam(0, 3)
                .data(0, 0, 0, 0, 0, b"from IPv6")
                .garbage(2, 5, b"")
                .replay(3, 4)
                .roam(0, 5)
                .data(0, 4, 0, 0, 0, b"")
                .exit_reply(0, b"to the new address")
                .0,
        ),
        (
            "replays",
            up.clone()
                .replay(2, 0x80)
                .replay(2, 6)
                .replay(0, 6)
                .replay(0, 0x80)
                .garbage(1, 7, b"x")
                .garbage(3, 0, b"bad mac1")
                .garbage(0, 0, &[2, 0, 0, 0, 9])
                .0,
        ),
        (
            "table-swaps",
            up.clone()
                .data(0, 0, 2, 0, 0, b"exit 2")
                .swap(Ops::ALL & !(1 << 3))
                .exit_reply(0, b"exit 0 taken away")
                .exit_reply(2, b"closed flow")
                .exit_reply(3, b"never opened")
                .data(0, 0, 2, 0, 0, b"exit 2 still")
                .swap(Ops::ALL & !1)
                .data(0, 0, 2, 0, 0, b"peer removed")
                .handshake(0)
                .swap(Ops::ALL)
                .handshake(0)
                .time(0)
                .0,
        ),
        (
            // Peer 0's old initiation, replayed from peer 1's address once the node has
            // forgotten peer 0, moves peer 0 there (as in WireGuard); peer 1's tunnel must
            // still take its own packets from that address.
            "regression-replay-after-forget-from-another-peers-address",
            Ops::new(Ops::ALL)
                .handshake(0)
                .handshake(1)
                .data(1, 0, 1, 0, 0, b"before")
                .swap(Ops::ALL & !1)
                .time(0)
                .swap(Ops::ALL)
                .replay(0, 1)
                .data(1, 0, 1, 0, 0, b"after")
                .handshake(1)
                .data(1, 0, 1, 0, 0, b"after its rekey")
                .exit_reply(0, b"reply")
                .0,
        ),
        (
            "idle-forgotten",
            up.clone().time(5).time(7).handshake(0).time(0).0,
        ),
        (
            "flows-per-peer",
            (0..18u8)
                .fold(up.clone(), |o, port| o.data(0, 0, 0, 0, port, b"f"))
                .0,
        ),
    ]
}

fn write(root: &Path, target: &str, seeds: Vec<(&str, Vec<u8>)>) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("create corpus directory");
    for (name, bytes) in seeds {
        // Hand-written inputs that failed before their fix keep the name of the fuzzer's.
        let file = if name.starts_with("regression-") {
            name.to_string()
        } else {
            format!("seed-{name}")
        };
        std::fs::write(dir.join(file), bytes).expect("write seed");
    }
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds"));
    write(&root, "router", router_seeds());
    write(&root, "wire", wire_seeds());
    write(&root, "config", config_seeds());
    write(&root, "api", api_seeds());
    write(&root, "inner", inner_seeds());
    write(&root, "exit", exit_seeds());
    write(&root, "zhop", zhop_seeds());
    println!("seeds written to {}", root.display());
}
