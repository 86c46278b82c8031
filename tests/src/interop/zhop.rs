//! The Z-HOP lab (issue 8, DESIGN §4): a client with two stock WireGuard interfaces, the
//! inner one routed through the outer one, a real `wraithgate` node terminating the outer
//! tunnel, and a wireguard-go exit terminating the inner one.
//!
//! ```text
//!  client (wgi-zc)                       relay (wgi-relay)         exit (wgi-zx)        internet
//!  wgi-zi inner 10.200.0.11 ─┐                                                           (wgi-internet)
//!    peer exit, endpoint     │ routed    wraithgate :51820          wgi-zx 10.200.0.1
//!    10.92.2.2:51820         │ into ──►  outer tunnel ends here ──► 10.92.2.2:51820 ──► 198.18.0.1
//!  wgi-zo outer 10.201.0.2 ◄─┘           inner payload leaves from  masquerade           iperf3
//!    peer relay node key,                10.92.2.1 (a flow socket)
//!    AllowedIPs 10.92.2.2/32
//!  eth0 10.92.1.2 ──────────── veth ──── zc 10.92.1.1   zx 10.92.2.1 ── veth ── eth0
//! ```
//!
//! The relay namespace does not forward (`ip_forward=0`): the only way from the client to the
//! exit is through the node. The peer is provisioned through the operator API (`wraithctl
//! peer add`, i.e. `POST /v1/peers`) with the outer interface's address as its allowed IP
//! and the exit as its allowed exit; the exit is added with `wraithctl exit add`. The client's
//! outer peer key is the node's own public key, read from `GET /v1/node`.
//!
//! MTU: the outer interface keeps wireguard-go's 1,420 (1,420 + 60 bytes of IPv4, UDP and
//! WireGuard headers = 1,480 on the 1,500-byte veth). Every inner WireGuard datagram travels
//! inside the outer tunnel, so it must fit the outer MTU: inner MTU + 60 (IPv4) or + 80
//! (IPv6 underlay) ≤ 1,420, hence 1,340 for the inner interface, and for the exit's end of
//! the inner tunnel, whose datagrams to the client ride the outer tunnel too. With the inner
//! MTU at 1,420, full-size inner datagrams would not fit the outer tunnel and would be
//! fragmented (or dropped, with DF set by TCP's path MTU discovery).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::relay::{Metrics, RelayNode};
use super::wg::WgHost;
use super::{iperf_start, ping, IperfResult, IperfRun, Traffic, EXIT_PORT, INTERNET, RELAY_PORT};
use crate::netns::{self, veth, Daemon, Netns, SuiteLock};

/// The outer interface's MTU: wireguard-go's default, as a client would have it.
pub const OUTER_MTU: u16 = 1420;
/// The inner interface's MTU: the outer MTU less the headers an inner WireGuard datagram
/// carries (20 IPv4 or 40 IPv6, 8 UDP, 32 WireGuard), with room for an IPv6 underlay.
pub const INNER_MTU: u16 = OUTER_MTU - 80;
/// The iperf3 server on the internet host.
pub const IPERF_PORT: u16 = 5201;

/// The relay's address on the client link: the outer interface's endpoint.
const RELAY_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 92, 1, 1);
/// The relay's address on the exit link: where the exit sees the client's inner tunnel.
pub const RELAY_EXIT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 92, 2, 1);
/// The exit's underlay address: the inner tunnel's endpoint, and the outer tunnel's only
/// allowed IP on the client.
const EXIT_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 92, 2, 2);
/// The client's address inside the outer tunnel: the source of its inner WireGuard
/// datagrams, and the peer's `allowed_ips` on the node.
pub(crate) const OUTER_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
/// The client's and the exit's addresses inside the inner tunnel.
const INNER_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 11);
const EXIT_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// The Z-HOP topology, up, with both layers' tunnels established.
#[derive(Debug)]
pub struct ZhopLab {
    pub test: String,
    pub dir: PathBuf,
    pub relay: RelayNode,
    /// The client's outer interface (peer: the node).
    pub outer: WgHost,
    /// The client's inner interface (peer: the exit), in the same namespace as `outer`.
    pub inner: WgHost,
    pub exit: WgHost,
    /// The node's public key, as `GET /v1/node` gave it.
    pub node_key: String,
    iperf_server: Daemon,
    // Dropped last: processes above stop before their namespaces go.
    _namespaces: Vec<Arc<Netns>>,
    _lock: SuiteLock,
}

/// A Z-HOP client's two wireguard-go interfaces in `ns`, started but not configured (their
/// keys go to the node and the exit first): `<stem>o`, the outer one, with tunnel address
/// `outer_ip` over `underlay_ip`, port 40001; `<stem>i`, the inner one, with `inner_ip`,
/// whose datagrams leave from `outer_ip`, port 40002.
pub(crate) fn start_client(
    ns: &Arc<Netns>,
    stem: &str,
    dir: &Path,
    underlay_ip: Ipv4Addr,
    outer_ip: Ipv4Addr,
    inner_ip: Ipv4Addr,
) -> Result<(WgHost, WgHost)> {
    let outer = WgHost::start(
        ns.clone(),
        &format!("{stem}o"),
        dir,
        outer_ip,
        underlay_ip,
        40001,
    )?;
    let inner = WgHost::start(
        ns.clone(),
        &format!("{stem}i"),
        dir,
        inner_ip,
        outer_ip,
        40002,
    )?;
    Ok((outer, inner))
}

/// Provisions the client's outer key on the Z-HOP node `relay` as a peer whose allowed IP
/// is the outer tunnel's address and whose allowed exit is the node's exit "exit"; then
/// configures and brings up the client's interfaces: the outer tunnel to the node (its key,
/// at `node`), carrying only what is for the exit's underlay address, routed there; the
/// inner one to the exit's real endpoint (`exit_key` at `exit`), which that route sends
/// through the outer tunnel, carrying `inner_allowed` (routed into it). Returns the node's
/// public key.
pub(crate) fn connect_client(
    relay: &RelayNode,
    outer: &WgHost,
    inner: &WgHost,
    node: SocketAddr,
    exit_key: &str,
    exit: SocketAddr,
    inner_allowed: &[&str],
) -> Result<String> {
    relay.add_peer(
        &outer.keys.public,
        &[&format!("{}/32", outer.tunnel_ip)],
        &["exit"],
    )?;
    let node_key = relay.node_public_key()?;
    let exit_host = format!("{}/32", exit.ip());
    outer.set_peer(&node_key, Some(node), &exit_host, None)?;
    outer.set_mtu(OUTER_MTU)?;
    outer.up(32)?;
    outer.route(&exit_host)?;
    inner.set_peer(exit_key, Some(exit), &inner_allowed.join(","), None)?;
    inner.set_mtu(INNER_MTU)?;
    inner.up(32)?;
    for prefix in inner_allowed {
        inner.route(prefix)?;
    }
    Ok(node_key)
}

/// Handshakes of both layers as the client's wireguard-go and `wg show` see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshakes {
    /// "Received handshake response" lines in the outer interface's log (from the node).
    pub outer: usize,
    /// The same for the inner interface (from the exit).
    pub inner: usize,
    /// `wg show latest-handshakes` of the outer interface for the node, Unix seconds.
    pub outer_latest: Option<u64>,
    /// … of the inner interface for the exit.
    pub inner_latest: Option<u64>,
}

impl ZhopLab {
    /// Builds the lab for `test` with the node on data-path `backend`, or explains why this
    /// machine cannot and returns `None` when skips are allowed (panics when
    /// `WRAITHGATE_REQUIRE_ALL_TESTS` forbids them).
    pub fn start_or_skip(test: &str, backend: &str) -> Option<ZhopLab> {
        if !super::prerequisites_or_skip(test) {
            return None;
        }
        match ZhopLab::start(test, backend) {
            Ok(lab) => Some(lab),
            Err(e) => panic!("{test}: building the lab failed: {e:#}"),
        }
    }

    fn start(test: &str, backend: &str) -> Result<ZhopLab> {
        let (lock, started, dir) = super::begin(test)?;

        let ns = |s: &str| Netns::create(s).map(Arc::new);
        let (client, relay_ns, exit_ns, inet) =
            (ns("zc")?, ns("relay")?, ns("zx")?, ns("internet")?);
        // Nothing reaches the exit from the client but through the node.
        relay_ns.sysctl("net.ipv4.ip_forward", "0")?;
        veth(
            &client,
            "eth0",
            "10.92.1.2/24",
            &relay_ns,
            "zc",
            &format!("{RELAY_CLIENT_SIDE}/24"),
        )?;
        veth(
            &relay_ns,
            "zx",
            &format!("{RELAY_EXIT_SIDE}/24"),
            &exit_ns,
            "eth0",
            &format!("{EXIT_UNDERLAY}/24"),
        )?;
        veth(
            &exit_ns,
            "inet",
            "10.92.3.1/24",
            &inet,
            "zx",
            "10.92.3.2/24",
        )?;
        exit_ns.ip(&["route", "add", "default", "via", "10.92.3.2"])?;
        exit_ns.sysctl("net.ipv4.ip_forward", "1")?;
        exit_ns.nft(
            "table ip wgi_exit {\n\
             \tchain postrouting {\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"inet\" masquerade\n\
             \t}\n\
             }\n",
        )?;
        inet.ip(&["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"])?;
        let iperf_server = super::iperf3_server(&inet, IPERF_PORT, &dir.join("iperf3-server.log"))?;

        let prefix = netns::PREFIX;
        let exit = WgHost::start(
            exit_ns.clone(),
            &format!("{prefix}zx"),
            &dir,
            EXIT_TUNNEL_IP,
            EXIT_UNDERLAY,
            EXIT_PORT,
        )?;
        let (outer, inner) = start_client(
            &client,
            &format!("{prefix}z"),
            &dir,
            Ipv4Addr::new(10, 92, 1, 2),
            OUTER_TUNNEL_IP,
            INNER_TUNNEL_IP,
        )?;
        // The exit knows only the inner key; the endpoint it learns is the node's flow socket.
        exit.set_peer(
            &inner.keys.public,
            None,
            &format!("{INNER_TUNNEL_IP}/32"),
            None,
        )?;
        // The exit's end of the inner tunnel: its datagrams to the client ride the outer
        // tunnel too.
        exit.set_mtu(INNER_MTU)?;
        exit.up(24)?;

        let relay = RelayNode::start(relay_ns.clone(), &dir, backend)?;
        relay.add_exit(
            "exit",
            &exit.keys.public,
            SocketAddr::from((EXIT_UNDERLAY, EXIT_PORT)),
            None,
        )?;
        let node_key = connect_client(
            &relay,
            &outer,
            &inner,
            SocketAddr::from((RELAY_CLIENT_SIDE, RELAY_PORT)),
            &exit.keys.public,
            SocketAddr::from((EXIT_UNDERLAY, EXIT_PORT)),
            &[&format!("{EXIT_TUNNEL_IP}/32"), &format!("{INTERNET}/32")],
        )?;

        let mut lab = ZhopLab {
            test: test.to_owned(),
            dir,
            relay,
            outer,
            inner,
            exit,
            node_key,
            iperf_server,
            _namespaces: vec![client, relay_ns, exit_ns, inet],
            _lock: lock,
        };
        let took = lab.wait_for_ping(Duration::from_secs(15))?;
        lab.check_processes()?;
        lab.report(&format!(
            "lab ready in {:.1} s (both layers up {:.0} ms after the first ping), relay backend {}",
            started.elapsed().as_secs_f64(),
            took.as_secs_f64() * 1e3,
            lab.relay.backend_in_use().unwrap_or_else(|| "?".into())
        ));
        Ok(lab)
    }

    /// The client's namespace (both interfaces live there).
    pub fn client_ns(&self) -> &Netns {
        &self.outer.ns
    }

    /// Pings the internet host through both layers until one answer comes back.
    pub fn wait_for_ping(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok((_, 1)) = ping(self.client_ns(), INTERNET, 1) {
                return Ok(start.elapsed());
            }
        }
        bail!(
            "no ping through both layers within {timeout:?}\n{}",
            self.diagnostics()
        )
    }

    /// `ping -c count` to the internet host through both layers: (sent, received).
    pub fn ping(&self, count: u32) -> Result<(u32, u32)> {
        ping(self.client_ns(), INTERNET, count)
    }

    /// Starts iperf3 from the client, through both layers, to the internet host.
    pub fn iperf_start(&self, traffic: Traffic, seconds: u32, reverse: bool) -> Result<IperfRun> {
        iperf_start(
            self.client_ns(),
            "z-hop client",
            SocketAddr::from((INTERNET, IPERF_PORT)),
            traffic,
            seconds,
            reverse,
        )
    }

    /// Runs iperf3 from the client and waits for its result.
    pub fn iperf(&self, traffic: Traffic, seconds: u32, reverse: bool) -> Result<IperfResult> {
        self.iperf_start(traffic, seconds, reverse)?.wait()
    }

    /// Both layers' handshakes as the client sees them.
    pub fn handshakes(&self) -> Result<Handshakes> {
        let response = "Received handshake response";
        Ok(Handshakes {
            outer: self.outer.log_count_for(&self.node_key, response),
            inner: self.inner.log_count(&self.exit.keys, response),
            outer_latest: self.outer.latest_handshake(&self.node_key)?,
            inner_latest: self.inner.latest_handshake(&self.exit.keys.public)?,
        })
    }

    /// Makes the client forget both peers and configures them again, as a client that
    /// restarts its tunnels does: its next packets start a new handshake on each layer.
    pub fn reset_client_peers(&self) -> Result<()> {
        self.inner.remove_peer(&self.exit.keys.public)?;
        self.outer.remove_peer(&self.node_key)?;
        self.outer.set_peer(
            &self.node_key,
            Some(SocketAddr::from((RELAY_CLIENT_SIDE, RELAY_PORT))),
            &format!("{EXIT_UNDERLAY}/32"),
            None,
        )?;
        self.inner.set_peer(
            &self.exit.keys.public,
            Some(SocketAddr::from((EXIT_UNDERLAY, EXIT_PORT))),
            &format!("{EXIT_TUNNEL_IP}/32,{INTERNET}/32"),
            None,
        )
    }

    /// Where the exit sends the client's inner tunnel: the node's flow socket.
    pub fn exit_view_of_client(&self) -> Result<Option<SocketAddr>> {
        self.exit.endpoint_of(&self.inner.keys.public)
    }

    /// The node's metrics (after its workers have published).
    pub fn metrics(&self) -> Result<Metrics> {
        self.relay.metrics()
    }

    /// Fails if a daemon of the lab died.
    pub fn check_processes(&mut self) -> Result<()> {
        if !self.relay.is_running() {
            bail!("wraithgate died:\n{}", self.relay.log_tail(30));
        }
        if !self.iperf_server.is_running() {
            bail!("iperf3 server died:\n{}", self.iperf_server.log_tail(10));
        }
        Ok(())
    }

    /// CPU seconds used so far by the client's two wireguard-go processes, the node and the
    /// exit's wireguard-go.
    pub fn cpu_seconds(&self) -> [f64; 3] {
        [
            self.outer.cpu_seconds() + self.inner.cpu_seconds(),
            self.relay.cpu_seconds(),
            self.exit.cpu_seconds(),
        ]
    }

    /// Everything useful to see when a check failed.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        match self.relay.metrics() {
            Ok(m) => out.push_str(&format!(
                "relay drops: {:?}; z-hop handshakes {}, to exit {} packets, to peer {} packets\n",
                m.drops(),
                m.sum("wraithgate_zhop_outer_handshakes_total", &[]),
                m.sum("wraithgate_zhop_packets_to_exit_total", &[]),
                m.sum("wraithgate_zhop_packets_to_peer_total", &[]),
            )),
            Err(e) => out.push_str(&format!("relay metrics unavailable: {e:#}\n")),
        }
        for h in [&self.outer, &self.inner, &self.exit] {
            out.push_str(&format!(
                "--- wg show {}:\n{}",
                h.ifname,
                h.wg(&["show", &h.ifname])
                    .unwrap_or_else(|e| format!("{e:#}\n"))
            ));
        }
        out.push_str(&format!(
            "--- wraithgate log (tail):\n{}\n",
            self.relay.log_tail(25)
        ));
        for h in [&self.outer, &self.inner, &self.exit] {
            out.push_str(&format!(
                "--- {} log (tail):\n{}\n",
                h.ifname,
                h.log_tail(12)
            ));
        }
        out
    }

    /// Prints a figure for the report, marked so it can be grepped out of the test log.
    pub fn report(&self, what: &str) {
        eprintln!("interop[{}]: {what}", self.test);
    }
}

impl Drop for ZhopLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\n===== interop[{}] failed; state before teardown (logs kept in {}) =====\n{}",
                self.test,
                self.dir.display(),
                self.diagnostics()
            );
        }
    }
}
