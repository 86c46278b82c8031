//! The interop lab: stock WireGuard (wireguard-go + `wg`) clients and exits talking through a
//! real `wraithgate` node, in network namespaces joined by veth, as root.
//!
//! ```text
//!   client1 ─┐                      ┌─ exit1 ─┐
//!            ├── relay (wraithgate) ┤         ├── internet (198.18.0.1: echo, iperf3)
//!   client2 ─┤                      └─ exit2 ─┘
//!   attacker ┘
//! ```
//!
//! Namespaces are `wgi-client1`, `wgi-client2`, `wgi-relay`, `wgi-exit1`, `wgi-exit2`,
//! `wgi-internet` and `wgi-attacker` (the issue's names, with the suite's prefix). Each exit masquerades tunnel traffic to `internet` with nftables. Client `i`
//! talks to exit `i` through the relay: its peer's endpoint is the relay, nothing else
//! changes; the exits are configured as if the clients were direct. The relay's exits are
//! added through its operator API, exit2 with a listen port pinned to it.
//!
//! With [`LabOptions::ipv6`] every link also carries an IPv6 twin of its IPv4 addresses
//! (fd91::`net`:0:0:0:`host` for 10.91.`net`.`host`), the relay listens on both families, and
//! clients and exits talk to it over IPv6 (the tunnels inside stay IPv4).
//!
//! A [`Lab`] holds the suite lock, removes what an earlier run left, and tears everything
//! down on drop, printing the logs' tails when the test failed; an interrupted run removes
//! it too ([`crate::netns::clean_up_when_interrupted`]).

pub mod attack;
pub mod exit;
pub mod kernel;
pub mod probe;
pub mod relay;
pub mod wg;
pub mod zhop;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns::{self, remove_leftovers, veth, Daemon, Netns, SuiteLock};
use probe::{EchoServer, Probe, ProbeReport};
use relay::RelayNode;
use wg::WgHost;

/// The "internet" host behind the exits: echo server and iperf3 servers.
pub const INTERNET: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The UDP echo port on [`INTERNET`].
pub const ECHO_PORT: u16 = 7;
/// An iperf3 server on the internet host (`inet`), at [`INTERNET`]:`port`.
pub(crate) fn iperf3_server(
    inet: &crate::netns::Netns,
    port: u16,
    log: &std::path::Path,
) -> Result<crate::netns::Daemon> {
    inet.spawn(
        &format!("iperf3 server {port}"),
        "iperf3",
        &["-s", "-B", &INTERNET.to_string(), "-p", &port.to_string()],
        &[],
        log,
    )
}

/// One iperf3 server per client, so that both can run at once.
pub const IPERF_PORTS: [u16; 2] = [5201, 5202];
/// The relay's client-facing port.
pub const RELAY_PORT: u16 = 51820;
/// The relay port pinned to exit2.
pub const PINNED_PORT: u16 = 51822;
/// The exits' WireGuard port.
pub const EXIT_PORT: u16 = 51820;
/// iperf3's UDP payload; see [`iperf_start`].
pub const IPERF_UDP_LEN: usize = 1300;

/// Programs the lab runs.
pub const PROGRAMS: [&str; 7] = [
    "ip",
    "wg",
    "wireguard-go",
    "iperf3",
    "nft",
    "ping",
    "sysctl",
];

/// The whole topology, up and tunnels established.
#[derive(Debug)]
pub struct Lab {
    pub test: String,
    pub dir: PathBuf,
    pub relay: RelayNode,
    pub clients: Vec<WgHost>,
    pub exits: Vec<WgHost>,
    pub attacker: Arc<Netns>,
    pub internet: Arc<Netns>,
    /// Clients and exits talk to the relay over IPv6 ([`LabOptions::ipv6`]).
    pub ipv6: bool,
    _echo: EchoServer,
    iperf_servers: Vec<Daemon>,
    started: Instant,
    // Dropped last: processes above stop before their namespaces go.
    namespaces: Vec<Arc<Netns>>,
    _lock: SuiteLock,
}

/// How the lab's relay runs.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Data-path backend: "auto", "uring", "portable".
    pub backend: String,
    /// `[relay] fast_path = "auto"`, with IPv4 forwarding on in the relay namespace.
    pub fast_path: bool,
    /// TOML lines of the relay's `[limits]` section.
    pub limits: String,
    /// An IPv6 underlay beside the IPv4 one ([`underlay_v6`] on every link, `nodad`), the
    /// relay listening on both families, and clients and exits talking to it over IPv6.
    pub ipv6: bool,
}

/// The IPv6 twin of 10.91.`net`.`host`, the lab's IPv4 underlay: fd91::`net`:0:0:0:`host`
/// (`net` 1 and 2 the clients' links, 3 the attacker's, 11 and 12 the exits').
pub fn underlay_v6(net: u8, host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd91, 0, 0, u16::from(net), 0, 0, 0, u16::from(host))
}

/// The lab's underlay address 10.91.`net`.`host`, or its IPv6 twin ([`underlay_v6`]).
fn underlay(ipv6: bool, net: u8, host: u8) -> IpAddr {
    if ipv6 {
        underlay_v6(net, host).into()
    } else {
        Ipv4Addr::new(10, 91, net, host).into()
    }
}

/// What an iperf3 run measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Traffic {
    Tcp,
    /// TCP paced by iperf3 at this many Mb/s (`-b`): asks a tunnel for a fixed load, so a
    /// shortfall is the tunnel's, not the machine's CPU being shared out differently.
    TcpPaced {
        mbps: u32,
    },
    /// UDP paced at this many Mb/s.
    Udp {
        mbps: u32,
    },
}

/// One iperf3 run's result, from the client's JSON.
#[derive(Debug, Clone, Copy)]
pub struct IperfResult {
    /// Received at the far end, Mb/s.
    pub mbps: f64,
    /// TCP retransmissions.
    pub retransmits: u64,
    /// UDP loss, percent.
    pub lost_percent: f64,
    /// UDP jitter, ms.
    pub jitter_ms: f64,
}

/// An iperf3 client running in the background.
#[derive(Debug)]
pub struct IperfRun {
    child: std::process::Child,
    deadline: Instant,
    what: String,
}

/// What every lab does first: take the suite lock, make sure an interrupt removes the lab,
/// remove what an earlier run left behind, and give `test` a fresh log directory. Returns the lock, the start time and
/// the directory.
pub(crate) fn begin(test: &str) -> Result<(SuiteLock, Instant, std::path::PathBuf)> {
    let lock = SuiteLock::acquire()?;
    netns::clean_up_when_interrupted();
    remove_leftovers()?;
    let started = Instant::now();
    let dir = std::env::temp_dir().join("wraithgate-interop").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok((lock, started, dir))
}

/// Whether `test` can run here (root, namespaces, the Debian packages). If not, says why
/// and returns false when skips are allowed; panics when `WRAITHGATE_REQUIRE_ALL_TESTS`
/// forbids skipping.
pub fn prerequisites_or_skip(test: &str) -> bool {
    let Some(why) = netns::missing_prerequisites(&PROGRAMS) else {
        return true;
    };
    if crate::skips_allowed() {
        eprintln!(
            "\n*** SKIPPED {test}: {why}. It runs as root with the Debian packages \
             installed (see .ci/run). ***\n"
        );
        return false;
    }
    panic!("{test} cannot run: {why}; WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping");
}

impl Lab {
    /// Builds the lab for `test` with the relay's default data path (`auto`, or
    /// `$WRAITHGATE_INTEROP_BACKEND` to run the suite on another), or explains why this
    /// machine cannot and returns `None` when skips are allowed (panics when
    /// `WRAITHGATE_REQUIRE_ALL_TESTS` forbids them).
    ///
    /// `WRAITHGATE_INTEROP_FAST_PATH=1` runs the suite with the kernel fast path on
    /// ([`LabOptions::fast_path`]); `WRAITHGATE_INTEROP_EXIT_SOCKETS=shared` with shared
    /// exit-facing sockets.
    pub fn start_or_skip(test: &str) -> Option<Lab> {
        let backend = std::env::var("WRAITHGATE_INTEROP_BACKEND").unwrap_or_else(|_| "auto".into());
        Self::start_or_skip_with(test, &backend)
    }

    /// [`Lab::start_or_skip`] with the relay on data-path `backend` ("auto", "uring",
    /// "portable").
    pub fn start_or_skip_with(test: &str, backend: &str) -> Option<Lab> {
        let fast_path = std::env::var("WRAITHGATE_INTEROP_FAST_PATH").is_ok_and(|v| v == "1");
        Self::start_or_skip_with_options(
            test,
            LabOptions {
                backend: backend.to_owned(),
                fast_path,
                limits: String::new(),
                ipv6: false,
            },
        )
    }

    /// [`Lab::start_or_skip`] with the relay set up as `options` say.
    pub fn start_or_skip_with_options(test: &str, options: LabOptions) -> Option<Lab> {
        if !prerequisites_or_skip(test) {
            return None;
        }
        match Lab::start(test, &options) {
            Ok(lab) => Some(lab),
            Err(e) => panic!("{test}: building the lab failed: {e:#}"),
        }
    }

    fn start(test: &str, options: &LabOptions) -> Result<Lab> {
        let backend = options.backend.as_str();
        let (lock, started, dir) = begin(test)?;

        let ns = |s: &str| Netns::create(s).map(Arc::new);
        let (c1, c2, relay_ns, x1, x2, inet, atk) = (
            ns("client1")?,
            ns("client2")?,
            ns("relay")?,
            ns("exit1")?,
            ns("exit2")?,
            ns("internet")?,
            ns("attacker")?,
        );
        // The relay has one uplink in real life, so spoofed packets arrive where real ones
        // do and reverse-path filtering cannot tell them apart; here it must not either.
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
        ] {
            relay_ns.sysctl(key, "0")?;
        }
        // The kernel fast path needs forwarding on (its FIB lookup refuses otherwise).
        relay_ns.sysctl(
            "net.ipv4.ip_forward",
            if options.fast_path { "1" } else { "0" },
        )?;
        for (i, c) in [&c1, &c2].into_iter().enumerate() {
            let n = i + 1;
            veth(
                c,
                "eth0",
                &format!("10.91.{n}.2/24"),
                &relay_ns,
                &format!("c{n}"),
                &format!("10.91.{n}.1/24"),
            )?;
            c.ip(&["route", "add", "default", "via", &format!("10.91.{n}.1")])?;
            if options.ipv6 {
                add_v6(c, "eth0", n as u8, 2)?;
                add_v6(&relay_ns, &format!("c{n}"), n as u8, 1)?;
            }
            // Roaming swaps the address; keep the route when the old one goes.
            c.sysctl("net.ipv4.conf.eth0.promote_secondaries", "1")?;
        }
        veth(
            &atk,
            "eth0",
            "10.91.3.2/24",
            &relay_ns,
            "atk",
            "10.91.3.1/24",
        )?;
        atk.ip(&["route", "add", "default", "via", "10.91.3.1"])?;
        if options.ipv6 {
            add_v6(&atk, "eth0", 3, 2)?;
            add_v6(&relay_ns, "atk", 3, 1)?;
            atk.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &underlay_v6(3, 1).to_string(),
            ])?;
        }
        for (j, x) in [&x1, &x2].into_iter().enumerate() {
            let n = j + 1;
            veth(
                &relay_ns,
                &format!("x{n}"),
                &format!("10.91.1{n}.1/24"),
                x,
                "eth0",
                &format!("10.91.1{n}.2/24"),
            )?;
            veth(
                x,
                "inet",
                &format!("10.91.2{n}.1/24"),
                &inet,
                &format!("x{n}"),
                &format!("10.91.2{n}.2/24"),
            )?;
            x.ip(&[
                "route",
                "add",
                "10.91.0.0/20",
                "via",
                &format!("10.91.1{n}.1"),
            ])?;
            x.ip(&["route", "add", "default", "via", &format!("10.91.2{n}.2")])?;
            x.sysctl("net.ipv4.ip_forward", "1")?;
            if options.ipv6 {
                add_v6(x, "eth0", 10 + n as u8, 2)?;
                add_v6(&relay_ns, &format!("x{n}"), 10 + n as u8, 1)?;
            }
            x.nft(
                "table ip wgi_exit {\n\
                 \tchain postrouting {\n\
                 \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                 \t\toifname \"inet\" masquerade\n\
                 \t}\n\
                 }\n",
            )?;
        }
        inet.ip(&["addr", "add", &format!("{INTERNET}/32"), "dev", "lo"])?;

        let echo = EchoServer::start(&inet, SocketAddr::from((INTERNET, ECHO_PORT)))?;
        let mut iperf_servers = Vec::new();
        for port in IPERF_PORTS {
            iperf_servers.push(iperf3_server(
                &inet,
                port,
                &dir.join(format!("iperf3-server-{port}.log")),
            )?);
        }

        let mut exits = Vec::new();
        for (j, x) in [&x1, &x2].into_iter().enumerate() {
            let n = j as u8 + 1;
            exits.push(WgHost::start(
                x.clone(),
                &format!("{}x{n}", netns::PREFIX),
                &dir,
                Ipv4Addr::new(10, 200, 0, n),
                Ipv4Addr::new(10, 91, 10 + n, 2),
                EXIT_PORT,
            )?);
        }
        let mut clients = Vec::new();
        for (i, c) in [&c1, &c2].into_iter().enumerate() {
            let n = i as u8 + 1;
            clients.push(WgHost::start(
                c.clone(),
                &format!("{}c{n}", netns::PREFIX),
                &dir,
                Ipv4Addr::new(10, 200, 0, 10 + n),
                Ipv4Addr::new(10, 91, n, 2),
                40000 + u16::from(n),
            )?);
        }
        for x in &exits {
            for c in &clients {
                x.set_peer(&c.keys.public, None, &format!("{}/32", c.tunnel_ip), None)?;
            }
            x.up(24)?;
        }

        let mut relay_extra = String::new();
        if options.fast_path {
            relay_extra += "fast_path = \"auto\"\n";
        }
        // `WRAITHGATE_INTEROP_EXIT_SOCKETS=shared` runs any suite with shared exit-facing
        // sockets (`[relay] exit_sockets`).
        if let Ok(mode) = std::env::var("WRAITHGATE_INTEROP_EXIT_SOCKETS") {
            relay_extra += &format!("exit_sockets = \"{mode}\"\n");
        }
        if options.ipv6 {
            relay_extra += &format!("listen = [\"0.0.0.0:{RELAY_PORT}\", \"[::]:{RELAY_PORT}\"]\n");
        }
        let relay = RelayNode::start_with(
            relay_ns.clone(),
            &dir,
            backend,
            &relay_extra,
            &options.limits,
            "",
        )?;
        relay.add_exit(
            "exit1",
            &exits[0].keys.public,
            SocketAddr::new(underlay(options.ipv6, 11, 2), EXIT_PORT),
            None,
        )?;
        relay.add_exit(
            "exit2",
            &exits[1].keys.public,
            SocketAddr::new(underlay(options.ipv6, 12, 2), EXIT_PORT),
            Some(PINNED_PORT),
        )?;

        let mut lab = Lab {
            test: test.to_owned(),
            dir,
            relay,
            clients,
            exits,
            attacker: atk.clone(),
            internet: inet.clone(),
            ipv6: options.ipv6,
            _echo: echo,
            iperf_servers,
            started,
            namespaces: vec![c1, c2, relay_ns, x1, x2, inet, atk],
            _lock: lock,
        };
        for i in 0..lab.clients.len() {
            lab.point_client(i, i, Via::Relay(RELAY_PORT))?;
            let c = &lab.clients[i];
            c.up(32)?;
            c.route(&format!("{INTERNET}/32"))?;
            c.route(&format!("{}/32", lab.exits[i].tunnel_ip))?;
        }
        for i in 0..lab.clients.len() {
            let took = lab.wait_for_tunnel(i, Duration::from_secs(15))?;
            eprintln!(
                "interop[{test}]: client{} tunnel up through the relay in {:.0} ms",
                i + 1,
                took.as_secs_f64() * 1e3
            );
        }
        lab.check_processes()?;
        eprintln!(
            "interop[{test}]: lab ready in {:.1} s, relay backend {}",
            lab.started.elapsed().as_secs_f64(),
            lab.relay.backend_in_use().unwrap_or_else(|| "?".into())
        );
        Ok(lab)
    }

    /// The echo service clients probe.
    pub fn echo_addr(&self) -> SocketAddr {
        SocketAddr::from((INTERNET, ECHO_PORT))
    }

    /// The relay address client `i` uses (the relay's end of its link).
    pub fn relay_addr_for(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(underlay(self.ipv6, i as u8 + 1, 1), port)
    }

    /// Client `i`'s current underlay address and WireGuard port.
    pub fn client_addr(&self, i: usize) -> SocketAddr {
        let c = &self.clients[i];
        if self.ipv6 {
            SocketAddr::new(underlay_v6(i as u8 + 1, 2).into(), c.listen_port)
        } else {
            SocketAddr::from((c.underlay_ip, c.listen_port))
        }
    }

    /// Exit `j`'s WireGuard endpoint.
    pub fn exit_endpoint(&self, j: usize) -> SocketAddr {
        if self.ipv6 {
            SocketAddr::new(underlay_v6(11 + j as u8, 2).into(), EXIT_PORT)
        } else {
            SocketAddr::from((self.exits[j].underlay_ip, EXIT_PORT))
        }
    }

    /// Makes client `i` use exit `j` (its only peer) via `via`.
    pub fn point_client(&self, i: usize, j: usize, via: Via) -> Result<()> {
        let endpoint = match via {
            Via::Relay(port) => self.relay_addr_for(i, port),
            Via::Direct => self.exit_endpoint(j),
        };
        let x = &self.exits[j];
        self.clients[i].set_peer(
            &x.keys.public,
            Some(endpoint),
            &format!("{}/32,{INTERNET}/32", x.tunnel_ip),
            None,
        )
    }

    /// Starts probing the internet echo service from client `i` every `interval`.
    pub fn probe(&self, i: usize, interval: Duration) -> Result<Probe> {
        Probe::start(&self.clients[i].ns, self.echo_addr(), interval)
    }

    /// Probes from client `i` until an echo returns; returns how long that took.
    pub fn wait_for_tunnel(&self, i: usize, timeout: Duration) -> Result<Duration> {
        let p = self.probe(i, Duration::from_millis(20))?;
        let came = p.wait_for_echo_after(Duration::ZERO, timeout);
        let r = p.finish()?;
        match r.echoes.first() {
            Some(e) if came => Ok(e.at),
            _ => bail!(
                "client{} got no echo through the relay within {timeout:?} ({})\n{}",
                i + 1,
                r.summary(),
                self.diagnostics()
            ),
        }
    }

    /// Probes from client `i` for `duration` and returns the report.
    pub fn probe_for(
        &self,
        i: usize,
        duration: Duration,
        interval: Duration,
    ) -> Result<ProbeReport> {
        let p = self.probe(i, interval)?;
        std::thread::sleep(duration);
        p.finish()
    }

    /// `ping -c count` from client `i` to the internet host: (sent, received).
    pub fn ping(&self, i: usize, count: u32) -> Result<(u32, u32)> {
        ping(&self.clients[i].ns, INTERNET, count)
    }

    /// Starts an iperf3 client on client `i` against its own server on the internet host.
    pub fn iperf_start(
        &self,
        i: usize,
        traffic: Traffic,
        seconds: u32,
        reverse: bool,
    ) -> Result<IperfRun> {
        iperf_start(
            &self.clients[i].ns,
            &format!("client{}", i + 1),
            SocketAddr::from((INTERNET, IPERF_PORTS[i])),
            traffic,
            seconds,
            reverse,
        )
    }

    /// Runs iperf3 from client `i` and waits for its result.
    pub fn iperf(
        &self,
        i: usize,
        traffic: Traffic,
        seconds: u32,
        reverse: bool,
    ) -> Result<IperfResult> {
        self.iperf_start(i, traffic, seconds, reverse)?.wait()
    }

    /// Lets the relay namespace route between clients and exits, so that a client can talk
    /// to its exit directly (the baseline for throughput), or stops it.
    pub fn set_relay_forwarding(&self, on: bool) -> Result<()> {
        self.relay
            .ns()
            .sysctl("net.ipv4.ip_forward", if on { "1" } else { "0" })
    }

    /// The relay-side address exit `j` sees for client `i` (the session's exit-facing
    /// socket), as the exit's `wg show endpoints` prints it.
    pub fn exit_view_of_client(&self, j: usize, i: usize) -> Result<Option<SocketAddr>> {
        self.exits[j].endpoint_of(&self.clients[i].keys.public)
    }

    /// Fails if a daemon of the lab died.
    pub fn check_processes(&mut self) -> Result<()> {
        if !self.relay.is_running() {
            bail!("wraithgate died:\n{}", self.relay.log_tail(30));
        }
        for d in &mut self.iperf_servers {
            if !d.is_running() {
                bail!("{} died:\n{}", d.label(), d.log_tail(10));
            }
        }
        Ok(())
    }

    /// Everything useful to see when a check failed: sessions, drops, `wg show`, log tails.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        match self.relay.sessions() {
            Ok(s) => out.push_str(&format!("relay sessions: {s:#?}\n")),
            Err(e) => out.push_str(&format!("relay sessions unavailable: {e:#}\n")),
        }
        if let Ok(m) = self.relay.metrics() {
            out.push_str(&format!("relay drops: {:?}\n", m.drops()));
        }
        for h in self.clients.iter().chain(&self.exits) {
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
        for h in self.clients.iter().chain(&self.exits) {
            out.push_str(&format!(
                "--- {} log (tail):\n{}\n",
                h.ifname,
                h.log_tail(12)
            ));
        }
        out
    }

    /// UDP datagrams each namespace's kernel dropped because a socket's receive buffer was
    /// full (`RcvbufErrors` in its `/proc/net/snmp`): where a busy machine loses packets.
    pub fn udp_receive_errors(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for ns in &self.namespaces {
            let snmp = ns.exec("cat", &["/proc/net/snmp"])?;
            let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
            let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
                continue;
            };
            let n = names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(k, _)| *k == "RcvbufErrors")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            out.push((ns.name().to_owned(), n));
        }
        Ok(out)
    }

    /// CPU seconds used so far by: client1, client2, exit1, exit2 (wireguard-go), the relay,
    /// and this test process (probes, echo server, attacker).
    pub fn cpu_seconds(&self) -> [f64; 6] {
        [
            self.clients[0].cpu_seconds(),
            self.clients[1].cpu_seconds(),
            self.exits[0].cpu_seconds(),
            self.exits[1].cpu_seconds(),
            self.relay.cpu_seconds(),
            netns::cpu_seconds("self"),
        ]
    }

    /// Prints a figure for the report, marked so it can be grepped out of the test log.
    pub fn report(&self, what: &str) {
        eprintln!("interop[{}]: {what}", self.test);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\n===== interop[{}] failed; state before teardown (logs kept in {}) =====\n{}",
                self.test,
                self.dir.display(),
                self.diagnostics()
            );
        }
        // Fields drop next: processes, then namespaces, then the suite lock. Logs stay in
        // `dir` until the next run of the same test.
    }
}

/// Adds [`underlay_v6`]`(net, host)`/64 to `dev` in `ns`, usable at once (`nodad`: no
/// duplicate address detection to wait out).
fn add_v6(ns: &Netns, dev: &str, net: u8, host: u8) -> Result<()> {
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/64", underlay_v6(net, host)),
        "dev",
        dev,
        "nodad",
    ])
    .map(drop)
}

/// How a client reaches its exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through the relay, on this relay port.
    Relay(u16),
    /// Straight to the exit (needs [`Lab::set_relay_forwarding`]).
    Direct,
}

/// `ping -c count` from namespace `ns` to `to`: (sent, received).
pub fn ping(ns: &Netns, to: Ipv4Addr, count: u32) -> Result<(u32, u32)> {
    let out = ns
        .command("ping")
        .args(["-n", "-q", "-c", &count.to_string(), "-i", "0.2", "-W", "2"])
        .arg(to.to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("unexpected ping output: {text}"))?;
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    match nums.as_slice() {
        [sent, received, ..] => Ok((*sent, *received)),
        _ => bail!("unexpected ping summary: {line}"),
    }
}

/// Starts an iperf3 client in namespace `ns` (called `who` in messages) against the server
/// at `server`. UDP datagrams carry 1,300 bytes: 1,328 with their IPv4 and UDP headers,
/// which fits every tunnel MTU of the labs (1,420, and 1,340 inside Z-HOP's outer tunnel)
/// without fragmenting.
pub fn iperf_start(
    ns: &Netns,
    who: &str,
    server: SocketAddr,
    traffic: Traffic,
    seconds: u32,
    reverse: bool,
) -> Result<IperfRun> {
    let mut cmd = ns.command("iperf3");
    cmd.args(["-c", &server.ip().to_string()])
        .args(["-p", &server.port().to_string()])
        .args([
            "-t",
            &seconds.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ]);
    if let Traffic::TcpPaced { mbps } = traffic {
        cmd.args(["-b", &format!("{mbps}M")]);
    }
    if let Traffic::Udp { mbps } = traffic {
        cmd.args([
            "-u",
            "-b",
            &format!("{mbps}M"),
            "-l",
            &IPERF_UDP_LEN.to_string(),
        ]);
    }
    if reverse {
        cmd.arg("-R");
    }
    let what = format!(
        "iperf3 {who} {traffic:?}{} {seconds}s",
        if reverse { " reverse" } else { "" }
    );
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    Ok(IperfRun {
        child,
        deadline: Instant::now() + Duration::from_secs(u64::from(seconds) + 20),
        what,
    })
}

impl IperfRun {
    /// Waits for the run (killing it past its deadline) and parses its JSON.
    pub fn wait(mut self) -> Result<IperfResult> {
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not finish in time", self.what);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = self.child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not JSON: {text}", self.what))?;
        if let Some(err) = json.get("error").and_then(Value::as_str) {
            bail!("{}: {err}", self.what);
        }
        let end = &json["end"];
        let f = |v: &Value| v.as_f64().unwrap_or(0.0);
        let result = if end.get("sum_received").is_some() && end["sum"].is_null() {
            // TCP
            IperfResult {
                mbps: f(&end["sum_received"]["bits_per_second"]) / 1e6,
                retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
                lost_percent: 0.0,
                jitter_ms: 0.0,
            }
        } else {
            // UDP: the receiver's view is in "sum_received" when present, else "sum".
            let sum = if end["sum_received"].is_object() {
                &end["sum_received"]
            } else {
                &end["sum"]
            };
            IperfResult {
                mbps: f(&sum["bits_per_second"]) / 1e6,
                retransmits: 0,
                lost_percent: f(&end["sum"]["lost_percent"]),
                jitter_ms: f(&end["sum"]["jitter_ms"]),
            }
        };
        if !out.status.success() {
            bail!("{} failed ({}): {text}", self.what, out.status);
        }
        Ok(result)
    }
}

impl IperfResult {
    pub fn summary(&self, traffic: Traffic) -> String {
        match traffic {
            Traffic::Tcp | Traffic::TcpPaced { .. } => {
                format!("{:.0} Mb/s ({} retransmits)", self.mbps, self.retransmits)
            }
            Traffic::Udp { mbps } => format!(
                "{:.0} Mb/s of {mbps} offered, {:.2} % lost, jitter {:.3} ms",
                self.mbps, self.lost_percent, self.jitter_ms
            ),
        }
    }
}
