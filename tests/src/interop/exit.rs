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

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::relay::RelayNode;
use super::wg::WgHost;
use super::{iperf_start, ping, IperfRun, Traffic, INTERNET, RELAY_PORT};
use crate::netns::{self, veth, Daemon, Netns, SuiteLock};

/// The iperf3 server on the internet host.
pub const IPERF_PORT: u16 = 5201;
/// The node's address on the clients' link: the client's endpoint for it.
const NODE_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 94, 1, 1);
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

/// The Exit topology, up, with the client's tunnel established.
#[derive(Debug)]
pub struct ExitLab {
    pub test: String,
    pub dir: PathBuf,
    pub node: RelayNode,
    pub client: WgHost,
    pub node_key: String,
    iperf_server: Daemon,
    // Dropped last: processes above stop before their namespaces go.
    _namespaces: Vec<Arc<Netns>>,
    _lock: SuiteLock,
}

impl ExitLab {
    /// Builds the lab for `test` with the node on data-path `backend`, or explains why this
    /// machine cannot and returns `None` when skips are allowed (panics when
    /// `WRAITHGATE_REQUIRE_ALL_TESTS` forbids them).
    pub fn start_or_skip(test: &str, backend: &str) -> Option<ExitLab> {
        Self::start_or_skip_with(test, backend, false)
    }

    /// [`ExitLab::start_or_skip`]; with `node_initiates`, the node is the client end: the
    /// peer is provisioned with the wireguard-go host's endpoint, which knows none for the
    /// node, and the first packet is the node's (a ping from its namespace).
    pub fn start_or_skip_with(test: &str, backend: &str, node_initiates: bool) -> Option<ExitLab> {
        Self::start_or_skip_with_tun(test, backend, node_initiates, TUN_SECTION)
    }

    /// [`ExitLab::start_or_skip_with`] with the node's own `[tun]` section (`tun`, e.g.
    /// [`TUN_SECTION`] and an `offload` line).
    pub fn start_or_skip_with_tun(
        test: &str,
        backend: &str,
        node_initiates: bool,
        tun: &str,
    ) -> Option<ExitLab> {
        if !super::prerequisites_or_skip(test) {
            return None;
        }
        match ExitLab::start(test, backend, node_initiates, tun) {
            Ok(lab) => Some(lab),
            Err(e) => panic!("{test}: building the lab failed: {e:#}"),
        }
    }

    fn start(test: &str, backend: &str, node_initiates: bool, tun: &str) -> Result<ExitLab> {
        let (lock, started, dir) = super::begin(test)?;
        let ns = |s: &str| Netns::create(s).map(Arc::new);
        let (client_ns, node_ns, inet) = (ns("ec")?, ns("exitnode")?, ns("internet")?);
        veth(
            &client_ns,
            "eth0",
            "10.94.1.2/24",
            &node_ns,
            "clients",
            &format!("{NODE_CLIENT_SIDE}/24"),
        )?;
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

        let node = RelayNode::start_with(node_ns.clone(), &dir, backend, "", "", tun)?;
        let client = WgHost::start(
            client_ns.clone(),
            &format!("{}ec", netns::PREFIX),
            &dir,
            CLIENT_TUNNEL_IP,
            Ipv4Addr::new(10, 94, 1, 2),
            40001,
        )?;
        let allowed = format!("{CLIENT_TUNNEL_IP}/32");
        let node_key = node.node_public_key()?;
        if node_initiates {
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
            client.set_peer(
                &node_key,
                Some(SocketAddr::from((NODE_CLIENT_SIDE, RELAY_PORT))),
                &format!("{INTERNET}/32,10.64.0.1/32"),
                None,
            )?;
        }
        client.up(24)?;
        client.route(&format!("{INTERNET}/32"))?;

        let lab = ExitLab {
            test: test.to_owned(),
            dir,
            node,
            client,
            node_key,
            iperf_server,
            _namespaces: vec![client_ns, node_ns, inet],
            _lock: lock,
        };
        let took = if node_initiates {
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
            "lab ready in {:.1} s (first ping through {:.0} ms), node backend {}",
            started.elapsed().as_secs_f64(),
            took.as_secs_f64() * 1e3,
            lab.node.backend_in_use().unwrap_or_else(|| "?".into())
        ));
        Ok(lab)
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

    /// What to look at when something failed: the node's and the client's logs.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- node log ---\n{}\n--- client log ---\n{}\n--- iperf3 server ---\n{}",
            self.node.log_tail(30),
            self.client.log_tail(15),
            self.iperf_server.log_tail(5)
        )
    }

    pub fn report(&self, what: &str) {
        eprintln!("interop[{}]: {what}", self.test);
    }
}
