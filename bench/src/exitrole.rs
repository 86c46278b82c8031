//! The Exit role end to end (issue 18): real tunnels whose ends are WraithGate or
//! wireguard-go, iperf3 through them, side by side in one run.
//!
//! The paths, all in the netns topology (client namespace → relay namespace → exit
//! namespace), the iperf3 client in the client namespace and its server in the exit
//! namespace, reached through the tunnel:
//! - `wgo>wgo`: wireguard-go client straight to a wireguard-go exit (what an operator on
//!   Debian runs without WraithGate);
//! - `wgo>relay>wgo`: the same through a WraithGate DoubleHop relay;
//! - `wgo>wg-exit`: wireguard-go client straight to a WraithGate exit;
//! - `wg>relay>wg-exit`: WraithGate at every hop, the client end a WraithGate node whose
//!   peer (the exit) has an endpoint, so it initiates.
//!
//! Pinning: the client end and the iperf3 client on `--load-cpu`, the relay, the exit end
//! and the iperf3 server on `--relay-cpus` (each WraithGate node with one worker). The CPU
//! figure of a row is the exit end's alone (its process tree), per GB received: what an
//! exit spends to carry the traffic.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::contender::Contender;
use crate::topology::{kill_group, Topology, CLEANUP};
use crate::wgo::{self, sh, spawn_in, KeyPair, CLIENT_TUNNEL, EXIT_TUNNEL};

/// The tunnels' MTU, as the other end-to-end runs.
const MTU: u16 = 1420;

/// One end of a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    WireguardGo,
    WraithGate { binary: PathBuf, backend: String },
}

/// A path through which the tunnel runs.
#[derive(Debug, Clone)]
pub struct TunnelPath {
    pub client: End,
    pub relay: Option<Contender>,
    pub exit: End,
}

impl TunnelPath {
    pub fn name(&self) -> String {
        let end = |e: &End, exit: bool| match (e, exit) {
            (End::WireguardGo, _) => "wgo",
            (End::WraithGate { .. }, true) => "wg-exit",
            (End::WraithGate { .. }, false) => "wg",
        };
        match &self.relay {
            Some(_) => format!(
                "{}>relay>{}",
                end(&self.client, false),
                end(&self.exit, true)
            ),
            None => format!("{}>{}", end(&self.client, false), end(&self.exit, true)),
        }
    }

    /// The four paths of issue 18's table, WraithGate's nodes running `binary` on
    /// `backend`; `relay` is the WraithGate relay contender in between.
    pub fn all(binary: &Path, backend: &str, relay: Contender) -> Vec<TunnelPath> {
        let wg = End::WraithGate {
            binary: binary.to_path_buf(),
            backend: backend.to_string(),
        };
        vec![
            TunnelPath {
                client: End::WireguardGo,
                relay: None,
                exit: End::WireguardGo,
            },
            TunnelPath {
                client: End::WireguardGo,
                relay: Some(relay.clone()),
                exit: End::WireguardGo,
            },
            TunnelPath {
                client: End::WireguardGo,
                relay: None,
                exit: wg.clone(),
            },
            TunnelPath {
                client: wg.clone(),
                relay: Some(relay),
                exit: wg,
            },
        ]
    }
}

/// The iperf3 tests of the Exit runs: TCP with 1 and 4 streams, UDP paced at `udp_rate`.
pub fn tests(udp_rate: &str) -> Vec<(String, Test)> {
    vec![
        ("exit-iperf3-tcp-1".into(), Test::Tcp { streams: 1 }),
        ("exit-iperf3-tcp-4".into(), Test::Tcp { streams: 4 }),
        (
            format!("exit-iperf3-udp-1380B-{udp_rate}"),
            Test::Udp {
                rate: udp_rate.to_string(),
            },
        ),
    ]
}

#[derive(Debug, Clone)]
pub enum Test {
    Tcp { streams: u32 },
    Udp { rate: String },
}

/// A running WraithGate node in a namespace (stopped on drop).
#[derive(Debug)]
struct Node {
    child: Child,
}

impl Drop for Node {
    fn drop(&mut self) {
        let pg = self.child.id() as i32;
        kill_group(pg);
        let _ = self.child.wait();
        if let Ok(mut cl) = CLEANUP.lock() {
            cl.process_groups.retain(|&g| g != pg);
        }
    }
}

/// One measurement's processes, stopped on drop (the ends before the relay).
#[derive(Debug)]
pub struct Running {
    ends: Vec<wgo::Tunnel>,
    nodes: Vec<Node>,
    relay: Option<crate::contender::Running>,
    /// The exit end's process.
    exit_pid: u32,
}

impl Running {
    pub fn exit_pid(&self) -> u32 {
        self.exit_pid
    }

    pub fn check_alive(&mut self) -> Result<()> {
        for n in &mut self.nodes {
            if let Some(status) = n.child.try_wait()? {
                bail!("a WraithGate end exited: {status}");
            }
        }
        if let Some(r) = self.relay.as_mut() {
            r.check_alive()?;
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.ends.clear();
        self.nodes.clear();
        self.relay = None;
    }
}

/// Port of each node's API, on loopback inside its own namespace.
const API_PORT: u16 = 7072;
/// The WraithGate client end's UDP port (the exit listens on the topology's exit address).
const CLIENT_PORT: u16 = 51910;

/// Starts the path's exit end, its relay, and its client end, configured for each other.
pub fn start(
    topo: &Topology,
    prefix: &str,
    path: &TunnelPath,
    keys: (&KeyPair, &KeyPair),
    relay_cpus: &str,
    load_cpu: usize,
    workdir: &Path,
) -> Result<Running> {
    let (client_key, exit_key) = keys;
    let (cns, ens) = match (&topo.client_ns, &topo.exit_ns) {
        (Some(c), Some(e)) => (c.as_str(), e.as_str()),
        _ => bail!("the Exit runs need the netns topology"),
    };
    let load = load_cpu.to_string();
    let mut ends = Vec::new();
    let mut nodes = Vec::new();
    let client_public = match &path.client {
        End::WireguardGo => client_key.public.to_base64(),
        // Known once the node runs; its exit needs it first, so the client node starts
        // first (it initiates only once provisioned).
        End::WraithGate { .. } => String::new(),
    };
    // The client end, if WraithGate: started now for its key, provisioned last.
    let mut client_node = None;
    let client_public = if let End::WraithGate { binary, backend } = &path.client {
        let (node, key) = start_node(
            cns,
            &load,
            binary,
            backend,
            &format!("{prefix}-wxc"),
            SocketAddrV4::new(client_addr(topo)?, CLIENT_PORT),
            CLIENT_TUNNEL,
            &workdir.join("client-node"),
        )?;
        client_node = Some(node);
        key
    } else {
        client_public
    };
    // The exit end.
    let (exit_public, exit_pid) = match &path.exit {
        End::WireguardGo => {
            let ifname = format!("{prefix}-wge");
            let child = spawn_in(
                ens,
                relay_cpus,
                &["wireguard-go", "-f", &ifname],
                &workdir.join(format!("{ifname}.log")),
            )?;
            let pid = child.id();
            ends.push(wgo::Tunnel::new(vec![child]));
            wgo::wait_for_interfaces(&[&ifname])?;
            sh(
                ens,
                &format!(
                    "wg set {ifname} private-key {} listen-port {} peer {client_public} \
                     allowed-ips {CLIENT_TUNNEL}/32 \
                     && ip addr add {EXIT_TUNNEL}/24 dev {ifname} && ip link set {ifname} mtu {MTU} up",
                    exit_key.private_file.display(),
                    topo.exit.port(),
                ),
            )?;
            (exit_key.public.to_base64(), pid)
        }
        End::WraithGate { binary, backend } => {
            let state = workdir.join("exit-node");
            let (node, key) = start_node(
                ens,
                relay_cpus,
                binary,
                backend,
                &format!("{prefix}-wxe"),
                topo.exit,
                EXIT_TUNNEL,
                &state,
            )?;
            let pid = node.child.id();
            nodes.push(node);
            api(
                ens,
                &state,
                "POST",
                "/v1/peers",
                Some(json!({
                    "name": "client",
                    "public_key": client_public,
                    "allowed_ips": [format!("{CLIENT_TUNNEL}/32")],
                })),
            )?;
            (key, pid)
        }
    };
    // The relay, forwarding to the exit by its key.
    let relay = match &path.relay {
        Some(c) => {
            let key = wraithgate_relay::PublicKey::from_base64(&exit_public)
                .map_err(|e| anyhow::anyhow!("exit key {exit_public}: {e}"))?;
            Some(c.start(topo, &key, relay_cpus, workdir)?)
        }
        None => None,
    };
    let via = if relay.is_some() {
        topo.relay_listen
    } else {
        topo.exit
    };
    // The client end, now that its peer is known.
    match (&path.client, client_node) {
        (End::WireguardGo, _) => {
            let ifname = format!("{prefix}-wgc");
            let child = spawn_in(
                cns,
                &load,
                &["wireguard-go", "-f", &ifname],
                &workdir.join(format!("{ifname}.log")),
            )?;
            ends.push(wgo::Tunnel::new(vec![child]));
            wgo::wait_for_interfaces(&[&ifname])?;
            sh(
                cns,
                &format!(
                    "wg set {ifname} private-key {} listen-port 51900 peer {exit_public} \
                     endpoint {via} allowed-ips {EXIT_TUNNEL}/32 \
                     && ip addr add {CLIENT_TUNNEL}/24 dev {ifname} && ip link set {ifname} mtu {MTU} up",
                    client_key.private_file.display(),
                ),
            )?;
        }
        (End::WraithGate { .. }, Some(node)) => {
            nodes.push(node);
            api(
                cns,
                &workdir.join("client-node"),
                "POST",
                "/v1/peers",
                Some(json!({
                    "name": "exit",
                    "public_key": exit_public,
                    "allowed_ips": [format!("{EXIT_TUNNEL}/32")],
                    "endpoint": via.to_string(),
                    "persistent_keepalive": 25,
                })),
            )?;
        }
        (End::WraithGate { .. }, None) => unreachable!("started above"),
    }
    Ok(Running {
        ends,
        nodes,
        relay,
        exit_pid,
    })
}

/// The client namespace's address (the source of the generator's datagrams).
fn client_addr(topo: &Topology) -> Result<std::net::Ipv4Addr> {
    let ns = topo.client_ns.as_deref().context("no client namespace")?;
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ip", "-4", "-o", "route", "get"])
        .arg(topo.relay_listen.ip().to_string())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let src = text
        .split_whitespace()
        .skip_while(|w| *w != "src")
        .nth(1)
        .with_context(|| format!("no source address towards the relay in {ns}: {text}"))?;
    Ok(src.parse()?)
}

/// Starts a WraithGate node in `ns` with a TUN device `ifname` holding `tunnel_addr`/24,
/// listening on `listen`, one worker; returns it and its public key.
#[allow(clippy::too_many_arguments)]
fn start_node(
    ns: &str,
    cpus: &str,
    binary: &Path,
    backend: &str,
    ifname: &str,
    listen: SocketAddrV4,
    tunnel_addr: &str,
    state: &Path,
) -> Result<(Node, String)> {
    let _ = std::fs::remove_dir_all(state);
    std::fs::create_dir_all(state)?;
    let conf = state.join("node.toml");
    std::fs::write(
        &conf,
        format!(
            "[relay]\nlisten = [\"{listen}\"]\nworkers = 1\nbackend = \"{backend}\"\n\n\
             [control]\napi_listen = \"127.0.0.1:{API_PORT}\"\nstate_dir = \"{}\"\n\n\
             [tun]\nname = \"{ifname}\"\naddresses = [\"{tunnel_addr}/24\"]\nmtu = {MTU}\n",
            state.display()
        ),
    )?;
    let bin = binary.display().to_string();
    let conf_s = conf.display().to_string();
    let child = spawn_in(
        ns,
        cpus,
        &[&bin, "run", "--config", &conf_s],
        &state.join("node.log"),
    )?;
    let node = Node { child };
    let v = api(ns, state, "GET", "/v1/node", None)?;
    let key = v["public_key"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("GET /v1/node has no public_key: {v}"))?;
    Ok((node, key))
}

/// One call to the API of the node in `ns` whose state directory is `state` (waits up to
/// 5 s for its token and its API); the answer's JSON.
fn api(ns: &str, state: &Path, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let token_file = state.join("api.token");
    let deadline = Instant::now() + Duration::from_secs(5);
    let token = loop {
        match std::fs::read_to_string(&token_file) {
            Ok(t) if !t.trim().is_empty() => break t.trim().to_owned(),
            _ if Instant::now() > deadline => {
                let log = std::fs::read_to_string(state.join("node.log")).unwrap_or_default();
                bail!("no API token at {} (log: {log})", token_file.display())
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let netns = PathBuf::from(format!("/var/run/netns/{ns}"));
    let (method, path) = (method.to_string(), path.to_string());
    let body = body.map(|b| b.to_string());
    std::thread::spawn(move || -> Result<Value> {
        crate::load::enter_netns(&netns)?;
        let addr = format!("127.0.0.1:{API_PORT}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match crate::zhop::http_at(&addr, &token, &method, &path, body.as_deref()) {
                Ok((status, text)) if (200..300).contains(&status) => {
                    return Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
                }
                Ok((status, text)) => bail!("{method} {path}: HTTP {status}: {text}"),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the API thread panicked"))?
}

/// Runs one iperf3 test through the tunnel (client namespace to the exit's tunnel
/// address), retrying while the first handshake completes.
pub fn iperf(topo: &Topology, cpu: usize, secs: u32, test: &Test) -> Result<wgo::IperfResult> {
    match test {
        Test::Tcp { streams } => wgo::iperf_streams(topo, cpu, secs, None, *streams, 8),
        Test::Udp { rate } => wgo::iperf_streams(topo, cpu, secs, Some((rate, wgo::UDP_LEN)), 1, 8),
    }
}
