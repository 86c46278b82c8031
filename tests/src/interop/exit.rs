//! The Exit lab (issue 18): a stock wireguard-go client whose tunnel ends at a real
//! `wraithgate` node acting as its exit, which hands the plaintext to its TUN device; the
//! exit namespace forwards and masquerades it to an "internet" host with exactly the
//! sysctl and nftables lines README.md documents ("Running an exit").
//!
//! ```text
//!  client (wgi-ec)                 exit node (wgi-exitnode)                  internet (wgi-internet)
//!  wgi-ec 10.64.0.2 ── tunnel ──►  wraithgate :51820 ─► TUN wg-exit0 10.64.0.1
//!    peer: node key,                 forwards, masquerades out of eth0 ─► eth0 10.94.3.2 ─► 198.18.0.1
//!    AllowedIPs 198.18.0.1/32                                                      iperf3
//!  eth0 10.94.1.2 ──── veth ────── clients 10.94.1.1   eth0 10.94.3.1 ── veth ──┘
//! ```
//!
//! With a relay in front ([`ExitPath::DoubleHop`], [`ExitPath::Zhop`]), a second
//! `wraithgate` node in `wgi-relay` takes the client's link (10.94.1.1, so the client's
//! endpoint stays the same) and reaches the exit node on a link of its own (10.94.2.1 to the
//! exit node's `clients` 10.94.2.2); the relay namespace does not forward, so the client's
//! packets reach the exit node only through the relay node. As DoubleHop entry it has the
//! exit node as an exit and the client's initiation, keyed by the exit node's key, picks it;
//! as Z-HOP entry it terminates the client's outer tunnel (the peer's allowed exit is the exit
//! node) and the client's inner wireguard-go tunnel ends at the exit node.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::relay::RelayNode;
use super::wg::{WgHost, WgKeys};
use super::zhop::{self, INNER_MTU, OUTER_TUNNEL_IP};
use super::{iperf_start, ping, IperfRun, Traffic, EXIT_PORT, INTERNET, RELAY_PORT};
use crate::netns::{self, veth, Daemon, Netns, SuiteLock};

/// The iperf3 server on the internet host.
pub const IPERF_PORT: u16 = 5201;
/// The first hop's address on the clients' link (the exit node's, or the relay node's in
/// front of it): the client's endpoint.
const NODE_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 94, 1, 1);
/// The client's underlay address.
const CLIENT_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 94, 1, 2);
/// The relay node's address on its link to the exit node: where the exit node sees a
/// relayed client from.
pub const RELAY_EXIT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 94, 2, 1);
/// The exit node's address on the relay's link: the relay's endpoint for it.
const EXIT_BEHIND_RELAY: Ipv4Addr = Ipv4Addr::new(10, 94, 2, 2);
/// The client's address inside the tunnel, its allowed IP on the node.
pub const CLIENT_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 2);
/// The `[tun]` section of the node: README's example.
pub const TUN_SECTION: &str = "\n[tun]\nname = \"wg-exit0\"\naddresses = [\"10.64.0.1/24\"]\n";

/// What README.md tells an exit's operator to run (the section "Running an exit"): the
/// sysctl lines and the nftables ruleset, read from the README itself so that the test
/// runs exactly what the documentation says.
pub fn readme_exit_setup() -> Result<(Vec<(String, String)>, String)> {
    let readme = include_str!("../../../README.md");
    let section = readme
        .split("### Running an exit")
        .nth(1)
        .context("README.md has no \"### Running an exit\" section")?;
    let mut sysctls = Vec::new();
    for line in section.lines() {
        if let Some(kv) = line.trim().strip_prefix("sysctl -w ") {
            let (k, v) = kv.split_once('=').context("a sysctl line without =")?;
            sysctls.push((k.to_owned(), v.to_owned()));
        }
        if line.starts_with("## ") {
            break;
        }
    }
    let nft = section
        .split("nft -f - <<'EOF'\n")
        .nth(1)
        .and_then(|rest| rest.split("\nEOF").next())
        .context("README.md's exit section has no `nft -f - <<'EOF'` block")?;
    if sysctls.is_empty() {
        bail!("README.md's exit section names no sysctl");
    }
    Ok((sysctls, format!("{nft}\n")))
}

/// How the client's tunnel reaches the exit node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitPath {
    /// The client's endpoint is the exit node.
    Direct,
    /// The exit node is the client end: the peer is provisioned with the wireguard-go
    /// host's endpoint, which knows none for the node, and the first packet is the node's
    /// (with a persistent keepalive, its own handshake).
    NodeInitiates,
    /// Through a WraithGate DoubleHop relay that has the exit node as an exit.
    DoubleHop,
    /// The client's inner tunnel ends at the exit node, carried by an outer tunnel to a
    /// WraithGate node whose Z-HOP peer it is, with the exit node as its allowed exit.
    Zhop,
}

/// The Exit topology, up, with the client's tunnel established.
#[derive(Debug)]
pub struct ExitLab {
    pub test: String,
    pub dir: PathBuf,
    pub path: ExitPath,
    /// The exit node.
    pub node: RelayNode,
    /// The client's tunnel to the exit node (with [`ExitPath::Zhop`], the inner one).
    pub client: WgHost,
    /// The exit node's public key.
    pub node_key: String,
    /// The relay node in front of the exit node, with [`ExitPath::DoubleHop`] and
    /// [`ExitPath::Zhop`].
    pub relay: Option<RelayNode>,
    /// The client's outer tunnel, to the relay node, with [`ExitPath::Zhop`].
    pub outer: Option<WgHost>,
    iperf_server: Daemon,
    // Dropped last: processes above stop before their namespaces go.
    _namespaces: Vec<Arc<Netns>>,
    _lock: SuiteLock,
}

impl ExitLab {
    /// Builds the lab for `test` with the client's tunnel taking `path` and the nodes on
    /// data-path `backend`, or explains why this machine cannot and returns `None` when
    /// skips are allowed (panics when `WRAITHGATE_REQUIRE_ALL_TESTS` forbids them).
    pub fn start_or_skip(test: &str, backend: &str, path: ExitPath) -> Option<ExitLab> {
        Self::start_or_skip_with_tun(test, backend, path, TUN_SECTION)
    }

    /// [`ExitLab::start_or_skip`] with the exit node's own `[tun]` section (`tun`, e.g.
    /// [`TUN_SECTION`] and an `offload` line).
    pub fn start_or_skip_with_tun(
        test: &str,
        backend: &str,
        path: ExitPath,
        tun: &str,
    ) -> Option<ExitLab> {
        if !super::prerequisites_or_skip(test) {
            return None;
        }
        match ExitLab::start(test, backend, path, tun) {
            Ok(lab) => Some(lab),
            Err(e) => panic!("{test}: building the lab failed: {e:#}"),
        }
    }

    fn start(test: &str, backend: &str, path: ExitPath, tun: &str) -> Result<ExitLab> {
        let (lock, started, dir) = super::begin(test)?;
        let ns = |s: &str| Netns::create(s).map(Arc::new);
        let (client_ns, node_ns, inet) = (ns("ec")?, ns("exitnode")?, ns("internet")?);
        let mut namespaces = vec![client_ns.clone(), node_ns.clone(), inet.clone()];
        let relay_ns = match path {
            ExitPath::Direct | ExitPath::NodeInitiates => {
                veth(
                    &client_ns,
                    "eth0",
                    &format!("{CLIENT_UNDERLAY}/24"),
                    &node_ns,
                    "clients",
                    &format!("{NODE_CLIENT_SIDE}/24"),
                )?;
                None
            }
            ExitPath::DoubleHop | ExitPath::Zhop => {
                let relay_ns = ns("relay")?;
                // Nothing reaches the exit node from the client but through the relay node.
                relay_ns.sysctl("net.ipv4.ip_forward", "0")?;
                veth(
                    &client_ns,
                    "eth0",
                    &format!("{CLIENT_UNDERLAY}/24"),
                    &relay_ns,
                    "clients",
                    &format!("{NODE_CLIENT_SIDE}/24"),
                )?;
                veth(
                    &relay_ns,
                    "exits",
                    &format!("{RELAY_EXIT_SIDE}/24"),
                    &node_ns,
                    "clients",
                    &format!("{EXIT_BEHIND_RELAY}/24"),
                )?;
                namespaces.push(relay_ns.clone());
                Some(relay_ns)
            }
        };
        veth(
            &node_ns,
            "eth0",
            "10.94.3.1/24",
            &inet,
            "eth0",
            "10.94.3.2/24",
        )?;
        node_ns.ip(&["route", "add", "default", "via", "10.94.3.2"])?;
        // The internet host knows no route to the tunnel's addresses: only the masquerade
        // brings its answers back.
        inet.ip(&["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"])?;
        let (sysctls, nft) = readme_exit_setup()?;
        for (k, v) in &sysctls {
            node_ns.sysctl(k, v)?;
        }
        node_ns.nft(&nft)?;
        let iperf_server = super::iperf3_server(&inet, IPERF_PORT, &dir.join("iperf3-server.log"))?;

        // Inside Z-HOP's outer tunnel, the exit node's datagrams to the client must fit the
        // outer MTU too (see `zhop`): its TUN gets the inner tunnel's MTU.
        let tun = match path {
            ExitPath::Zhop => format!("{tun}mtu = {INNER_MTU}\n"),
            _ => tun.to_owned(),
        };
        let node = RelayNode::start_with(node_ns.clone(), &dir, backend, "", "", &tun)?;
        let node_key = node.node_public_key()?;
        let allowed = format!("{CLIENT_TUNNEL_IP}/32");
        let client_routes = [format!("{INTERNET}/32"), "10.64.0.1/32".to_owned()];
        let client_routes: Vec<&str> = client_routes.iter().map(String::as_str).collect();
        let first_hop = SocketAddr::from((NODE_CLIENT_SIDE, RELAY_PORT));
        let stem = format!("{}e", netns::PREFIX);
        let (client, relay, outer) = match path {
            ExitPath::Direct | ExitPath::NodeInitiates | ExitPath::DoubleHop => {
                let relay = match path {
                    ExitPath::DoubleHop => {
                        Some(start_relay(relay_ns.as_ref(), &dir, backend, &node_key)?)
                    }
                    _ => None,
                };
                let client = WgHost::start(
                    client_ns.clone(),
                    &format!("{stem}c"),
                    &dir,
                    CLIENT_TUNNEL_IP,
                    CLIENT_UNDERLAY,
                    40001,
                )?;
                if path == ExitPath::NodeInitiates {
                    let endpoint = format!("{}:{}", client.underlay_ip, client.listen_port);
                    node.wraithctl(&[
                        "peer",
                        "add",
                        &client.keys.public,
                        "--allowed-ips",
                        &allowed,
                        "--peer-endpoint",
                        &endpoint,
                        "--persistent-keepalive",
                        "25",
                    ])?;
                    client.set_peer(&node_key, None, "10.64.0.1/32", None)?;
                } else {
                    node.add_peer(&client.keys.public, &[&allowed], &[])?;
                    // Through a relay, the client is configured as if the relay were the
                    // exit: only the endpoint says otherwise.
                    client.set_peer(&node_key, Some(first_hop), &client_routes.join(","), None)?;
                }
                client.up(24)?;
                client.route(&format!("{INTERNET}/32"))?;
                (client, relay, None)
            }
            ExitPath::Zhop => {
                let relay = start_relay(relay_ns.as_ref(), &dir, backend, &node_key)?;
                let (outer, inner) = zhop::start_client(
                    &client_ns,
                    &stem,
                    &dir,
                    CLIENT_UNDERLAY,
                    OUTER_TUNNEL_IP,
                    CLIENT_TUNNEL_IP,
                )?;
                node.add_peer(&inner.keys.public, &[&allowed], &[])?;
                zhop::connect_client(
                    &relay,
                    &outer,
                    &inner,
                    first_hop,
                    &node_key,
                    SocketAddr::from((EXIT_BEHIND_RELAY, EXIT_PORT)),
                    &client_routes,
                )?;
                (inner, Some(relay), Some(outer))
            }
        };

        let lab = ExitLab {
            test: test.to_owned(),
            dir,
            path,
            node,
            client,
            node_key,
            relay,
            outer,
            iperf_server,
            _namespaces: namespaces,
            _lock: lock,
        };
        let took = if path == ExitPath::NodeInitiates {
            // With a persistent keepalive the node handshakes by itself, before any
            // packet for the peer.
            let start = Instant::now();
            while lab.client.latest_handshake(&lab.node_key)?.is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "the node did not handshake by itself within 10 s\n{}",
                        lab.diagnostics()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            lab.wait_for_node_ping(Duration::from_secs(15))?
        } else {
            lab.wait_for_ping(Duration::from_secs(15))?
        };
        lab.report(&format!(
            "lab ready in {:.1} s (first ping through {:.0} ms), {path:?}, node backend {}",
            started.elapsed().as_secs_f64(),
            took.as_secs_f64() * 1e3,
            lab.node.backend_in_use().unwrap_or_else(|| "?".into())
        ));
        Ok(lab)
    }

    /// Where the exit node sees the client's tunnel come from: the client itself, or the
    /// relay node's socket on the exit node's link.
    pub fn client_seen_from(&self) -> Ipv4Addr {
        match self.path {
            ExitPath::Direct | ExitPath::NodeInitiates => CLIENT_UNDERLAY,
            ExitPath::DoubleHop | ExitPath::Zhop => RELAY_EXIT_SIDE,
        }
    }

    /// Pings the internet host through the tunnel until one answer comes back.
    pub fn wait_for_ping(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok((_, 1)) = ping(&self.client.ns, INTERNET, 1) {
                return Ok(start.elapsed());
            }
        }
        bail!(
            "no ping through the exit within {timeout:?}\n{}",
            self.diagnostics()
        )
    }

    /// Pings the client's tunnel address from the node's namespace (through the TUN device
    /// and the node's own initiation) until one answer comes back.
    pub fn wait_for_node_ping(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok((_, 1)) = ping(self.node.ns(), CLIENT_TUNNEL_IP, 1) {
                return Ok(start.elapsed());
            }
        }
        bail!(
            "no ping from the node to its peer within {timeout:?}\n{}",
            self.diagnostics()
        )
    }

    /// `ping -c count` from the node's namespace to the client's tunnel address.
    pub fn node_ping(&self, count: u32) -> Result<(u32, u32)> {
        ping(self.node.ns(), CLIENT_TUNNEL_IP, count)
    }

    /// `ping -c count` to the internet host: (sent, received).
    pub fn ping(&self, count: u32) -> Result<(u32, u32)> {
        ping(&self.client.ns, INTERNET, count)
    }

    /// Starts iperf3 from the client to the internet host.
    pub fn iperf_start(&self, traffic: Traffic, seconds: u32, reverse: bool) -> Result<IperfRun> {
        iperf_start(
            &self.client.ns,
            "exit client",
            SocketAddr::from((INTERNET, IPERF_PORT)),
            traffic,
            seconds,
            reverse,
        )
    }

    /// What to look at when something failed: the nodes' and the client's logs.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "--- node log ---\n{}\n--- client log ---\n{}\n--- iperf3 server ---\n{}",
            self.node.log_tail(30),
            self.client.log_tail(15),
            self.iperf_server.log_tail(5)
        );
        if let Some(relay) = &self.relay {
            let drops = relay.metrics().map(|m| m.drops());
            out.push_str(&format!(
                "\n--- relay node (drops {drops:?}) log ---\n{}",
                relay.log_tail(25)
            ));
        }
        if let Some(outer) = &self.outer {
            out.push_str(&format!(
                "\n--- client outer log ---\n{}",
                outer.log_tail(15)
            ));
        }
        out
    }

    pub fn report(&self, what: &str) {
        eprintln!("interop[{}]: {what}", self.test);
    }
}

/// The relay node in front of the exit node (in `relay_ns`, its files under `dir/relay`),
/// with the exit node, `node_key` at its address on the relay's link, as its exit "exit",
/// beside a decoy exit added first (a key of its own, nobody at its address): the client's
/// initiation reaches the exit node only if its mac1 picks the right one.
fn start_relay(
    relay_ns: Option<&Arc<Netns>>,
    dir: &std::path::Path,
    backend: &str,
    node_key: &str,
) -> Result<RelayNode> {
    let relay_ns = relay_ns.context("a relay path has a relay namespace")?;
    let dir = dir.join("relay");
    std::fs::create_dir_all(&dir)?;
    let relay = RelayNode::start(relay_ns.clone(), &dir, backend)?;
    let decoy = WgKeys::generate(&dir, "decoy")?;
    relay.add_exit(
        "decoy",
        &decoy.public,
        SocketAddr::from((Ipv4Addr::new(10, 94, 2, 3), EXIT_PORT)),
        None,
    )?;
    relay.add_exit(
        "exit",
        node_key,
        SocketAddr::from((EXIT_BEHIND_RELAY, EXIT_PORT)),
        None,
    )?;
    Ok(relay)
}
