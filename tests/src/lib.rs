//! Shared pieces of WraithGate's integration tests: a relay on loopback, and a pump that
//! drives several real WireGuard endpoints (boringtun) from one thread, so that each test
//! decides exactly who sends what and when; and, for the suites that need root, network
//! namespaces ([`netns`]) and the interop lab with stock WireGuard ([`interop`]).

pub mod flood;
pub mod interop;
pub mod netns;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wraithgate_control::endpoints::{
    any_loopback, udp_payload, KeyPair, PeerOptions, Received, WgNode,
};
use wraithgate_relay::io::{BackendChoice, DataPlane, DataPlaneConfig};
use wraithgate_relay::router::RouterConfig;
use wraithgate_relay::table::{ExitSpec, ExitTable, SharedTable};
use wraithgate_relay::RouterStats;

/// Every backend this machine can run; the suite runs against each.
///
/// io_uring is left out, loudly, where it cannot be set up. That is a failure when every
/// test must run (`WRAITHGATE_REQUIRE_ALL_TESTS`), except under an emulator
/// (`WRAITHGATE_UNDER_QEMU=1`: qemu-user has no io_uring).
pub fn backends() -> Vec<BackendChoice> {
    let mut out = vec![BackendChoice::Portable];
    if uring_runs() {
        out.push(BackendChoice::Uring);
    }
    out
}

/// Whether the io_uring backend can run here; says so loudly when it cannot (a failure
/// under the same conditions as in [`backends`]).
pub fn uring_runs() -> bool {
    match wraithgate_relay::io::uring::probe() {
        Ok(()) => true,
        Err(e) => {
            assert!(
                skips_allowed() || under_qemu(),
                "io_uring backend cannot run here and every test must: {e}"
            );
            eprintln!("SKIPPED: the io_uring backend: {e}");
            false
        }
    }
}

/// Whether the tests run under qemu-user (`WRAITHGATE_UNDER_QEMU=1`, set by
/// `tools/cross-aarch64`): io_uring answers ENOSYS there.
pub fn under_qemu() -> bool {
    std::env::var_os("WRAITHGATE_UNDER_QEMU").is_some_and(|v| v == "1")
}

/// The backend `auto` must run on this machine: io_uring exactly where it can be set up.
pub fn auto_backend_here() -> BackendChoice {
    match wraithgate_relay::io::uring::probe() {
        Ok(()) => BackendChoice::Uring,
        Err(_) => BackendChoice::Portable,
    }
}

/// A relay on loopback.
#[derive(Debug)]
pub struct Relay {
    pub dp: DataPlane,
    pub table: SharedTable,
    /// The main listen address.
    pub addr: SocketAddr,
}

impl Relay {
    pub fn start(backend: BackendChoice, exits: Vec<ExitSpec>) -> Relay {
        Self::start_with(backend, exits, RouterConfig::default(), 2)
    }

    pub fn start_with(
        backend: BackendChoice,
        exits: Vec<ExitSpec>,
        router: RouterConfig,
        workers: usize,
    ) -> Relay {
        Self::start_full(
            backend,
            ExitTable::new(1, exits).expect("valid test table"),
            router,
            workers,
            None,
        )
    }

    /// A relay that also terminates Z-HOP outer tunnels with `node_key`.
    pub fn start_zhop(backend: BackendChoice, table: ExitTable, node_key: [u8; 32]) -> Relay {
        Self::start_full(backend, table, RouterConfig::default(), 2, Some(node_key))
    }

    fn start_full(
        backend: BackendChoice,
        table: ExitTable,
        router: RouterConfig,
        workers: usize,
        node_key: Option<[u8; 32]>,
    ) -> Relay {
        Self::start_config(
            table,
            DataPlaneConfig {
                backend,
                router,
                workers,
                node_key,
                ..Self::config()
            },
        )
    }

    /// The configuration every test relay starts from: loopback, unpinned workers.
    pub fn config() -> DataPlaneConfig {
        DataPlaneConfig {
            listen: vec![any_loopback()],
            pin_workers: false,
            ..DataPlaneConfig::default()
        }
    }

    /// A relay with a configuration of the test's own (start from [`Relay::config`]).
    pub fn start_config(table: ExitTable, cfg: DataPlaneConfig) -> Relay {
        let backend = cfg.backend;
        let table = SharedTable::new(table);
        let dp = DataPlane::start(cfg, table.clone()).expect("relay starts");
        // `auto` runs io_uring exactly where it works: where the probe passes, unless a
        // worker's own ring could not be set up, which the data plane then says.
        let expected = match backend {
            BackendChoice::Auto if dp.fallback_reason().is_some() => BackendChoice::Portable,
            BackendChoice::Auto => auto_backend_here(),
            named => named,
        };
        assert_eq!(
            dp.backend(),
            expected.as_str(),
            "the backend asked for runs ({} asked; fallback reason {:?})",
            backend.as_str(),
            dp.fallback_reason()
        );
        let addr = dp.local_addrs()[0];
        Relay { dp, table, addr }
    }

    /// Counters summed over workers, as published after this call began: everything the
    /// workers handled before the call is in them.
    pub fn stats(&self) -> RouterStats {
        let since = Instant::now();
        let mut total = RouterStats::default();
        for r in self.dp.reports_after(since, Duration::from_secs(10)) {
            total.merge(&r.router);
        }
        total
    }

    /// Waits (up to 10 s) until the published counters satisfy `cond`, and returns them;
    /// returns the last ones seen if they never do, for the caller's assertion to show.
    pub fn stats_when(&self, cond: impl Fn(&RouterStats) -> bool) -> RouterStats {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.dp.stats();
            if cond(&s) || Instant::now() >= end {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Publishes a whole new table (exits and peers).
    pub fn set_table(&self, table: ExitTable) {
        self.dp.publish(table);
    }

    /// Publishes a new exit table (binding any newly pinned port) and wakes the workers.
    pub fn set_exits(&self, generation: u64, exits: Vec<ExitSpec>) {
        self.dp
            .publish(ExitTable::new(generation, exits).expect("valid test table"));
    }
}

/// An exit spec for a node.
pub fn exit_spec(name: &str, node: &WgNode, listen_port: Option<u16>) -> ExitSpec {
    ExitSpec {
        name: name.into(),
        public_key: node.keys().relay_key(),
        endpoint: node.local_addr(),
        listen_port,
    }
}

/// A WireGuard node on loopback with fresh keys.
pub fn node() -> WgNode {
    WgNode::bind(any_loopback(), KeyPair::generate()).expect("bind loopback")
}

/// Drives `nodes` (receiving whatever arrives, running their timers every 100 ms) until
/// `done` returns true for something one of them received, or `timeout` passes. Returns
/// whether `done` was satisfied.
pub fn pump(
    nodes: &mut [&mut WgNode],
    timeout: Duration,
    mut done: impl FnMut(usize, &Received) -> bool,
) -> bool {
    let end = Instant::now() + timeout;
    let mut last_tick = Instant::now();
    while Instant::now() < end {
        let mut idle = true;
        for (i, n) in nodes.iter_mut().enumerate() {
            while let Ok(Some(r)) = n.try_recv() {
                idle = false;
                if done(i, &r) {
                    return true;
                }
            }
        }
        if last_tick.elapsed() >= Duration::from_millis(100) {
            for n in nodes.iter_mut() {
                n.tick();
            }
            last_tick = Instant::now();
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    false
}

/// A DoubleHop pair through a relay at `relay`: `client`'s peer for `exit` (its endpoint the
/// relay) and `exit`'s peer for `client` (no endpoint: it learns the relay's). Returns the
/// two peer numbers, the client's first.
pub fn pair(relay: SocketAddr, exit: &mut WgNode, client: &mut WgNode) -> (usize, usize) {
    let cp = client.add_peer(
        exit.keys().public,
        PeerOptions {
            endpoint: Some(relay),
            ..Default::default()
        },
    );
    let ep = exit.add_peer(client.keys().public, PeerOptions::default());
    (cp, ep)
}

/// Sends the IPv4/UDP `packet` from `from` over `peer`, pumping every node for up to
/// `timeout`, until `to` receives it. Returns the peer it arrived from; panics if any of
/// `others` receives a data packet meanwhile (a relay must never deliver one to the wrong
/// node).
pub fn deliver(
    from: &mut WgNode,
    peer: usize,
    to: &mut WgNode,
    others: &mut [&mut WgNode],
    packet: &[u8],
    timeout: Duration,
) -> Option<usize> {
    from.send_ip(peer, packet).expect("send");
    let want = udp_payload(packet).expect("an IPv4/UDP packet").to_vec();
    let mut got = None;
    let mut nodes: Vec<&mut WgNode> = vec![to, from];
    nodes.extend(others.iter_mut().map(|n| &mut **n));
    pump(&mut nodes, timeout, |i, r| match r {
        Received::Packet { peer, data } if i == 0 && udp_payload(data) == Some(&want[..]) => {
            got = Some(*peer);
            true
        }
        Received::Packet { .. } if i >= 2 => panic!("node {i} received another's packet"),
        _ => false,
    });
    got
}

/// The worker a relay with two workers (as [`Relay::start`] and the Exit tests run) steers
/// `addr`'s datagrams to.
pub fn worker_of(addr: SocketAddr) -> usize {
    wraithgate_relay::io::sys::steer(addr, 2)
}

/// A free loopback address, other than `not`, that a two-worker relay steers to `worker`.
pub fn address_on_worker(worker: usize, not: SocketAddr) -> SocketAddr {
    loop {
        // Binding port 0 on loopback only fails when the machine has run out of ports.
        let sock = std::net::UdpSocket::bind(any_loopback()).expect("a free loopback port");
        let addr = sock.local_addr().expect("a bound socket has an address");
        if addr != not && worker_of(addr) == worker {
            return addr;
        }
    }
}

/// Whether the tests that need root may skip (unset in CI, where a skip is a failure).
pub fn skips_allowed() -> bool {
    std::env::var_os("WRAITHGATE_REQUIRE_ALL_TESTS").is_none()
}
