//! Z-HOP end to end (issue 8, DESIGN §4): a client with two wireguard-go interfaces, the
//! inner one (to the exit) routed through the outer one (to the relay), and a wireguard-go
//! exit; iperf3 TCP and UDP through both layers. In the relay's place:
//!
//! - `zhop-wraithgate-<backend>`: the `wraithgate` node terminating the outer tunnel, the
//!   peer provisioned through its operator API (`POST /v1/peers`), its public key from
//!   `GET /v1/node`;
//! - `wireguard-go+kernel` (the baseline issue 8 names): wireguard-go terminating the outer
//!   tunnel in the relay namespace, and the kernel forwarding the inner datagrams it
//!   decrypts to the exit (`ip_forward=1`, routes; no NAT).
//!
//! ```text
//!  client                                   relay                    exit
//!  <p>-zi 198.18.200.1/24 (MTU 1340)
//!    peer exit @ 198.18.2.2:52000 ──route──► outer tunnel ends ──────► <p>-zx 198.18.200.2
//!  <p>-zo 198.18.201.1 (MTU 1420)           at 198.18.1.2:51820       iperf3 -s
//!    peer relay, AllowedIPs 198.18.2.2/32
//! ```
//!
//! MTU: the outer interface has wireguard-go's 1,420; every inner WireGuard datagram rides
//! inside it, so the inner tunnel's MTU leaves room for 80 bytes of headers (IPv6 underlay,
//! UDP, WireGuard): 1,340, at both of its ends. UDP runs use 1,300-byte datagrams (1,328
//! with their IPv4 and UDP headers), the largest round size that fits without fragmenting;
//! the plain end-to-end runs' 1,380 would be cut in two inside the inner tunnel.
//!
//! CPU s/GB here is the relay namespace's own processes only (`wraithgate`, or the relay's
//! wireguard-go): the kernel's forwarding runs in the context of the task that hands it the
//! packet (wireguard-go's write to its TUN device), so it is counted there too.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::contender::{self, cpu_count, Running};
use crate::load::enter_netns;
use crate::topology::Topology;
use crate::wgo::{self, sh, spawn_in, KeyPair, Tunnel, EXIT_TUNNEL};

/// The name of the baseline contender.
pub const BASELINE: &str = "wireguard-go+kernel";
/// The outer interface's MTU (wireguard-go's default).
pub const OUTER_MTU: u16 = 1420;
/// The inner interface's MTU: room for 80 bytes of headers inside the outer tunnel.
pub const INNER_MTU: u16 = OUTER_MTU - 80;
/// iperf3's UDP datagrams: 1,300 + 28 bytes of headers fit [`INNER_MTU`].
pub const UDP_LEN: usize = 1300;

/// The client's address inside the outer tunnel: its inner datagrams' source, and the
/// peer's allowed IP.
const OUTER_TUNNEL: &str = "198.18.201.1";
/// The relay's wireguard-go address in the outer tunnel (baseline only).
const RELAY_OUTER_TUNNEL: &str = "198.18.201.254";
/// The operator API of the node under test, inside the relay namespace.
const API: &str = "127.0.0.1:7071";
/// Client-side WireGuard ports.
const OUTER_PORT: u16 = 51901;
const INNER_PORT: u16 = 51902;

/// What terminates the outer tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OuterEnd {
    WraithGate {
        binary: PathBuf,
        backend: String,
        /// Told apart from the main binary's contenders by this suffix (`--wraithgate-alt`).
        label: Option<String>,
    },
    WireguardGo,
}

impl OuterEnd {
    pub fn name(&self) -> String {
        match self {
            OuterEnd::WraithGate {
                backend,
                label: None,
                ..
            } => format!("zhop-wraithgate-{backend}"),
            OuterEnd::WraithGate {
                backend,
                label: Some(label),
                ..
            } => format!("zhop-wraithgate-{backend}-{label}"),
            OuterEnd::WireguardGo => BASELINE.into(),
        }
    }

    /// The contenders of a run: the baseline, then WraithGate with each backend, then the
    /// other binary `alt` (path and label) with each backend, for a before/after comparison.
    pub fn all(binary: &Path, backends: &[String], alt: Option<(&Path, &str)>) -> Vec<OuterEnd> {
        let wraithgate = |binary: &Path, label: Option<&str>| -> Vec<OuterEnd> {
            backends
                .iter()
                .map(|b| OuterEnd::WraithGate {
                    binary: binary.to_path_buf(),
                    backend: b.clone(),
                    label: label.map(str::to_owned),
                })
                .collect()
        };
        let mut ends = vec![OuterEnd::WireguardGo];
        ends.extend(wraithgate(binary, None));
        if let Some((path, label)) = alt {
            ends.extend(wraithgate(path, Some(label)));
        }
        ends
    }

    /// The equivalent DoubleHop contender, whose `probe` and `unavailable` say whether the
    /// binary runs this backend here.
    pub fn as_contender(&self) -> Option<contender::Contender> {
        match self {
            OuterEnd::WraithGate {
                binary, backend, ..
            } => Some(contender::Contender::WraithGate {
                binary: binary.clone(),
                backend: backend.clone(),
                label: None,
            }),
            OuterEnd::WireguardGo => None,
        }
    }
}

/// Every key of the topology.
#[derive(Debug, Clone)]
pub struct Keys {
    /// The client's outer interface (the provisioned peer).
    pub outer: KeyPair,
    /// The client's inner interface (the exit's peer).
    pub inner: KeyPair,
    pub exit: KeyPair,
    /// The baseline relay's wireguard-go (WraithGate uses its own node key).
    pub relay: KeyPair,
}

impl Keys {
    pub fn generate(dir: &Path) -> Result<Keys> {
        Ok(Keys {
            outer: wgo::keypair(dir, "zhop-outer")?,
            inner: wgo::keypair(dir, "zhop-inner")?,
            exit: wgo::keypair(dir, "zhop-exit")?,
            relay: wgo::keypair(dir, "zhop-relay")?,
        })
    }
}

/// The relay side of one measurement.
#[derive(Debug)]
enum RelayEnd {
    WraithGate(Running),
    WireguardGo(Tunnel),
}

/// One measurement's processes: the outer end in the relay namespace, the client's two
/// wireguard-go and the exit's. Dropping it stops them all.
#[derive(Debug)]
pub struct ZhopPath {
    // Dropped first: the endpoints stop before the relay, so nothing re-handshakes.
    _endpoints: Tunnel,
    relay: RelayEnd,
}

impl ZhopPath {
    /// The relay namespace's processes (for CPU accounting).
    pub fn relay_pids(&self) -> Vec<u32> {
        match &self.relay {
            RelayEnd::WraithGate(r) => r.pid().into_iter().collect(),
            RelayEnd::WireguardGo(t) => t.pids(),
        }
    }

    /// The `wraithgate` process, if WraithGate is the outer end.
    pub fn wraithgate_pid(&self) -> Option<u32> {
        match &self.relay {
            RelayEnd::WraithGate(r) => r.pid(),
            RelayEnd::WireguardGo(_) => None,
        }
    }

    pub fn check_alive(&mut self) -> Result<()> {
        match &mut self.relay {
            RelayEnd::WraithGate(r) => r.check_alive(),
            RelayEnd::WireguardGo(_) => Ok(()),
        }
    }
}

/// Starts the outer end, then the exit and the client, configured for it.
pub fn start(
    topo: &Topology,
    prefix: &str,
    keys: &Keys,
    end: &OuterEnd,
    relay_cpus: &str,
    load_cpu: usize,
    workdir: &Path,
) -> Result<ZhopPath> {
    let (cns, rns, ens) = match (&topo.client_ns, &topo.relay_ns, &topo.exit_ns) {
        (Some(c), Some(r), Some(e)) if c != r => (c.as_str(), r.as_str(), e.as_str()),
        _ => bail!("Z-HOP needs the netns topology"),
    };
    let (relay, node_key) = match end {
        OuterEnd::WraithGate {
            binary, backend, ..
        } => {
            let name = end.name();
            let state = workdir.join(format!("{name}-state"));
            let _ = std::fs::remove_dir_all(&state);
            let conf = workdir.join(format!("{name}.toml"));
            std::fs::write(
                &conf,
                config(
                    topo.relay_listen,
                    cpu_count(relay_cpus),
                    backend,
                    &keys.exit.public.to_base64(),
                    topo.exit,
                    &state,
                ),
            )?;
            let args = vec![
                binary.display().to_string(),
                "run".into(),
                "--config".into(),
                conf.display().to_string(),
            ];
            let running = contender::spawn(
                topo,
                relay_cpus,
                &name,
                &args,
                &workdir.join(format!("{name}.log")),
                topo.relay_listen.port(),
            )?;
            let netns = Topology::netns_path(&topo.relay_ns).context("relay namespace")?;
            let node_key = provision(&netns, &state, keys)?;
            (RelayEnd::WraithGate(running), node_key)
        }
        OuterEnd::WireguardGo => {
            let ifname = format!("{prefix}-zr");
            let child = spawn_in(
                rns,
                relay_cpus,
                &["wireguard-go", "-f", &ifname],
                &workdir.join(format!("{ifname}.log")),
            )?;
            let tunnel = Tunnel::new(vec![child]);
            wgo::wait_for_interfaces(&[&ifname])?;
            sh(
                rns,
                &format!(
                    "sysctl -qw net.ipv4.ip_forward=1 \
                     && wg set {ifname} private-key {} listen-port {} peer {} allowed-ips {OUTER_TUNNEL}/32 \
                     && ip addr add {RELAY_OUTER_TUNNEL}/24 dev {ifname} \
                     && ip link set {ifname} mtu {OUTER_MTU} up",
                    keys.relay.private_file.display(),
                    topo.relay_listen.port(),
                    keys.outer.public.to_base64()
                ),
            )?;
            (RelayEnd::WireguardGo(tunnel), keys.relay.public.to_base64())
        }
    };

    let (zo, zi, zx) = (
        format!("{prefix}-zo"),
        format!("{prefix}-zi"),
        format!("{prefix}-zx"),
    );
    let load = load_cpu.to_string();
    let mut children = Vec::new();
    for (ns, ifname) in [(ens, &zx), (cns, &zo), (cns, &zi)] {
        children.push(spawn_in(
            ns,
            &load,
            &["wireguard-go", "-f", ifname],
            &workdir.join(format!("{ifname}.log")),
        )?);
    }
    let endpoints = Tunnel::new(children);
    wgo::wait_for_interfaces(&[&zx, &zo, &zi])?;
    let exit = topo.exit;
    // The exit's end of the inner tunnel: its datagrams to the client ride the outer
    // tunnel too, so the same MTU as the client's end.
    sh(
        ens,
        &format!(
            "wg set {zx} private-key {} listen-port {} peer {} allowed-ips {}/32 \
             && ip addr add {EXIT_TUNNEL}/24 dev {zx} && ip link set {zx} mtu {INNER_MTU} up",
            keys.exit.private_file.display(),
            exit.port(),
            keys.inner.public.to_base64(),
            wgo::CLIENT_TUNNEL
        ),
    )?;
    // Outer: to the relay, carrying only what is for the exit's underlay address.
    sh(
        cns,
        &format!(
            "wg set {zo} private-key {} listen-port {OUTER_PORT} peer {node_key} endpoint {} \
             allowed-ips {}/32 \
             && ip addr add {OUTER_TUNNEL}/32 dev {zo} && ip link set {zo} mtu {OUTER_MTU} up \
             && ip route add {}/32 dev {zo}",
            keys.outer.private_file.display(),
            topo.relay_listen,
            exit.ip(),
            exit.ip()
        ),
    )?;
    // Inner: to the exit's real endpoint, which the route above sends into the outer
    // tunnel (with the outer interface's address as source).
    sh(
        cns,
        &format!(
            "wg set {zi} private-key {} listen-port {INNER_PORT} peer {} endpoint {exit} \
             allowed-ips {EXIT_TUNNEL}/32 \
             && ip addr add {}/24 dev {zi} && ip link set {zi} mtu {INNER_MTU} up",
            keys.inner.private_file.display(),
            keys.exit.public.to_base64(),
            wgo::CLIENT_TUNNEL
        ),
    )?;
    Ok(ZhopPath {
        _endpoints: endpoints,
        relay,
    })
}

/// Bytes the relay namespace has sent towards the exit so far (its exit-side interface's
/// `tx_bytes`): what the relay forwarded, whatever became of it after.
pub fn forwarded_bytes(topo: &Topology) -> Result<u64> {
    let (Some(ns), Some(dev)) = (&topo.relay_ns, &topo.relay_exit_dev) else {
        bail!("Z-HOP needs the netns topology");
    };
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{dev}/statistics/tx_bytes"))
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("tx_bytes of {dev} in {ns}"))
}

/// UDP datagrams each namespace's kernel dropped so far because a socket's receive buffer
/// was full (`RcvbufErrors`): client, relay, exit. Where a flood loses its packets.
pub fn receive_buffer_drops(topo: &Topology) -> [u64; 3] {
    [&topo.client_ns, &topo.relay_ns, &topo.exit_ns].map(|ns| {
        let Some(ns) = ns else { return 0 };
        let Ok(out) = Command::new("ip")
            .args(["netns", "exec", ns, "cat", "/proc/net/snmp"])
            .output()
        else {
            return 0;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
        let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
            return 0;
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(k, _)| *k == "RcvbufErrors")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    })
}

/// The node's configuration: one exit (the topology's exit, now a wireguard-go endpoint),
/// the operator API on loopback inside the relay namespace, its own state directory.
fn config(
    listen: SocketAddrV4,
    workers: usize,
    backend: &str,
    exit_key: &str,
    exit: SocketAddrV4,
    state_dir: &Path,
) -> String {
    format!(
        "[relay]\nlisten = [\"{listen}\"]\nworkers = {workers}\nbackend = \"{backend}\"\n\n\
         [control]\napi_listen = \"{API}\"\nstate_dir = \"{}\"\n\n\
         [[exit]]\nname = \"exit\"\npublic_key = \"{exit_key}\"\nendpoint = \"{exit}\"\n",
        state_dir.display()
    )
}

/// Provisions the client's outer key as a Z-HOP peer (`POST /v1/peers`: its outer tunnel
/// address as allowed IP, the exit as allowed exit) and returns the node's public key
/// (`GET /v1/node`).
fn provision(relay_netns: &Path, state_dir: &Path, keys: &Keys) -> Result<String> {
    let token_file = state_dir.join("api.token");
    let deadline = Instant::now() + Duration::from_secs(5);
    let token = loop {
        match std::fs::read_to_string(&token_file) {
            Ok(t) if !t.trim().is_empty() => break t.trim().to_owned(),
            _ if Instant::now() > deadline => bail!("no API token at {}", token_file.display()),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let peer = json!({
        "public_key": keys.outer.public.to_base64(),
        "allowed_ips": [format!("{OUTER_TUNNEL}/32")],
        "allowed_exits": [keys.exit.public.to_base64()],
    })
    .to_string();
    let netns = relay_netns.to_path_buf();
    std::thread::spawn(move || -> Result<String> {
        enter_netns(&netns)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let node = loop {
            match http(&token, "GET", "/v1/node", None) {
                Ok((200, body)) => break body,
                _ if Instant::now() > deadline => bail!("the node's API did not answer on {API}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let (status, body) = http(&token, "POST", "/v1/peers", Some(&peer))?;
        if !(200..300).contains(&status) {
            bail!("POST /v1/peers: HTTP {status}: {body}");
        }
        let v: Value = serde_json::from_str(&node).context("GET /v1/node: not JSON")?;
        v["public_key"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("GET /v1/node has no public_key: {node}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the API thread panicked"))?
}

/// One HTTP/1.1 request to the node's API (`Connection: close`): status and body.
fn http(token: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
    http_at(API, token, method, path, body)
}

/// One HTTP/1.1 request to the node API at `api` (`Connection: close`): status and body.
pub fn http_at(
    api: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(api).with_context(|| format!("connect {api}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {text:.80}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Samples the `wraithgate` process with `perf record` for `secs` seconds (call-graphs),
/// then writes `perf report`'s flat profile next to `data` (`.txt`) and returns its top
/// `top` lines. `None` (with the reason on stderr) where perf is missing or refuses.
pub fn profile(pid: u32, secs: u32, data: &Path, top: usize) -> Option<String> {
    let rec = Command::new("perf")
        .args(["record", "-q", "-F", "999", "-g", "-o"])
        .arg(data)
        .args(["-p", &pid.to_string(), "--", "sleep", &secs.to_string()])
        .output();
    match rec {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            eprintln!(
                "relay-bench: perf record failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        Err(e) => {
            eprintln!("relay-bench: perf not available: {e}");
            return None;
        }
    }
    let rep = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "-g",
            "none",
            "--percent-limit",
            "0.5",
            "--sort",
            "dso,symbol",
            "-i",
        ])
        .arg(data)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&rep.stdout).into_owned();
    let _ = std::fs::write(data.with_extension("txt"), &text);
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(top)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_gets_an_api_and_one_exit() {
        let text = config(
            "198.18.1.2:51820".parse().unwrap(),
            1,
            "uring",
            "KEY=",
            "198.18.2.2:52000".parse().unwrap(),
            Path::new("/tmp/zs"),
        );
        assert!(text.contains("api_listen = \"127.0.0.1:7071\""));
        assert!(text.contains("endpoint = \"198.18.2.2:52000\""));
        assert!(text.contains("backend = \"uring\""));
        assert!(!text.contains("api_enabled = false"));
    }

    #[test]
    fn mtus_leave_room_for_the_inner_headers() {
        // An inner datagram: inner MTU + IPv6 (40) + UDP (8) + WireGuard (32) bytes.
        assert!(usize::from(INNER_MTU) + 80 <= usize::from(OUTER_MTU));
        // An iperf3 UDP datagram with its IPv4 and UDP headers fits the inner MTU.
        assert!(UDP_LEN + 28 <= usize::from(INNER_MTU));
        assert_eq!(
            OuterEnd::WraithGate {
                binary: "/x".into(),
                backend: "uring".into(),
                label: None,
            }
            .name(),
            "zhop-wraithgate-uring"
        );
        let ends = OuterEnd::all(
            Path::new("/new"),
            &["portable".into()],
            Some((Path::new("/old"), "before")),
        );
        let names: Vec<_> = ends.iter().map(OuterEnd::name).collect();
        assert_eq!(
            names,
            [
                BASELINE,
                "zhop-wraithgate-portable",
                "zhop-wraithgate-portable-before"
            ]
        );
    }
}
