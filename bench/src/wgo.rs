//! End to end with real WireGuard endpoints: wireguard-go client (client namespace) →
//! relay → wireguard-go exit (exit namespace, listening where the sink would), iperf3 TCP
//! and UDP through the tunnel, against the client talking to the exit directly.
//!
//! Both wireguard-go processes are restarted for every measurement so each starts with a
//! fresh handshake through whatever sits in the relay's place.

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use wraithgate_relay::PublicKey;

use crate::topology::{kill_group, Topology, CLEANUP};

/// Tunnel addresses (inside the namespaces only).
pub const CLIENT_TUNNEL: &str = "198.18.200.1";
pub const EXIT_TUNNEL: &str = "198.18.200.2";

/// A key pair made by `wg genkey` / `wg pubkey`.
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private_file: PathBuf,
    pub public: PublicKey,
}

pub fn available() -> Option<String> {
    for prog in ["wireguard-go", "wg", "iperf3"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {prog}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{prog}` not installed"));
        }
    }
    None
}

pub fn keypair(dir: &Path, name: &str) -> Result<KeyPair> {
    let out = Command::new("wg")
        .arg("genkey")
        .output()
        .context("wg genkey")?;
    let private = String::from_utf8(out.stdout)?.trim().to_string();
    let private_file = dir.join(format!("{name}.key"));
    std::fs::write(&private_file, format!("{private}\n"))?;
    let mut child = Command::new("wg")
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("wg pubkey stdin")?;
        stdin.write_all(private.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let public = PublicKey::from_base64(String::from_utf8(out.stdout)?.trim())
        .map_err(|e| anyhow::anyhow!("wg pubkey output: {e}"))?;
    Ok(KeyPair {
        private_file,
        public,
    })
}

/// The wireguard-go endpoints of one measurement (stopped on drop).
#[derive(Debug)]
pub struct Tunnel {
    children: Vec<Child>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for c in &mut self.children {
            let pg = c.id() as i32;
            kill_group(pg);
            let _ = c.wait();
            if let Ok(mut cl) = CLEANUP.lock() {
                cl.process_groups.retain(|&g| g != pg);
            }
        }
    }
}

impl Tunnel {
    /// Takes charge of processes started with [`spawn_in`].
    pub fn new(children: Vec<Child>) -> Tunnel {
        Tunnel { children }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

/// Runs `sh -c cmd` in namespace `ns`.
pub fn sh(ns: &str, cmd: &str) -> Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()?;
    if !out.status.success() {
        bail!(
            "[{ns}] {cmd}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `args` in namespace `ns` pinned to `cpus` (a taskset list), in its own process
/// group (registered for cleanup), with output to `log`.
pub fn spawn_in(ns: &str, cpus: &str, args: &[&str], log: &Path) -> Result<Child> {
    use std::os::unix::process::CommandExt as _;
    let logfile = std::fs::File::create(log)?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "taskset", "-c", cpus])
        .args(args)
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdin(Stdio::null())
        .stdout(logfile.try_clone()?)
        .stderr(logfile)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawn {}", args.join(" ")))?;
    CLEANUP
        .lock()
        .expect("cleanup lock is never poisoned while held briefly")
        .process_groups
        .push(child.id() as i32);
    Ok(child)
}

/// Starts both endpoints; the client's peer endpoint is `via` (the relay, or the exit).
pub fn start_tunnel(
    topo: &Topology,
    prefix: &str,
    client: &KeyPair,
    exit: &KeyPair,
    via: SocketAddrV4,
    cpu: usize,
    workdir: &Path,
) -> Result<Tunnel> {
    let (cns, ens) = (
        topo.client_ns
            .as_deref()
            .context("e2e needs the netns topology")?,
        topo.exit_ns
            .as_deref()
            .context("e2e needs the netns topology")?,
    );
    let (cif, eif) = (format!("{prefix}-wgc"), format!("{prefix}-wge"));
    let mut children = Vec::new();
    for (ns, ifname) in [(cns, &cif), (ens, &eif)] {
        children.push(spawn_in(
            ns,
            &cpu.to_string(),
            &["wireguard-go", "-f", ifname],
            &workdir.join(format!("{ifname}.log")),
        )?);
    }
    let tunnel = Tunnel { children };
    wait_for_interfaces(&[&cif, &eif])?;
    let exit_port = topo.exit.port();
    sh(
        ens,
        &format!(
            "wg set {eif} private-key {} listen-port {exit_port} peer {} allowed-ips {CLIENT_TUNNEL}/32 \
             && ip addr add {EXIT_TUNNEL}/24 dev {eif} && ip link set {eif} mtu 1420 up",
            exit.private_file.display(),
            client.public.to_base64()
        ),
    )?;
    sh(
        cns,
        &format!(
            "wg set {cif} private-key {} listen-port 51900 peer {} endpoint {via} allowed-ips {EXIT_TUNNEL}/32 \
             && ip addr add {CLIENT_TUNNEL}/24 dev {cif} && ip link set {cif} mtu 1420 up",
            client.private_file.display(),
            exit.public.to_base64()
        ),
    )?;
    Ok(tunnel)
}

/// Waits until wireguard-go has created each interface and its control socket.
pub fn wait_for_interfaces(ifnames: &[&str]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    for ifname in ifnames {
        while !Path::new(&format!("/var/run/wireguard/{ifname}.sock")).exists() {
            if Instant::now() > deadline {
                bail!("wireguard-go did not create {ifname}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The iperf3 server in the exit namespace (one for the whole e2e part). It listens on
/// every address, since the tunnel interface comes and goes with each measurement.
pub fn start_iperf_server(topo: &Topology, cpu: usize, workdir: &Path) -> Result<Child> {
    start_iperf_server_on(topo, &cpu.to_string(), workdir)
}

/// [`start_iperf_server`] pinned to `cpus` (a taskset list).
pub fn start_iperf_server_on(topo: &Topology, cpus: &str, workdir: &Path) -> Result<Child> {
    let ens = topo
        .exit_ns
        .as_deref()
        .context("e2e needs the netns topology")?;
    let child = spawn_in(
        ens,
        cpus,
        &["iperf3", "-s"],
        &workdir.join("iperf3-server.log"),
    )?;
    std::thread::sleep(Duration::from_millis(200));
    Ok(child)
}

/// What one iperf3 run reported.
#[derive(Debug, Clone, Default)]
pub struct IperfResult {
    pub gbps: f64,
    pub mpps: f64,
    pub loss_percent: f64,
    pub jitter_ms: f64,
    pub bytes: f64,
}

/// UDP datagram size of the end-to-end runs: 1,380 + 28 = 1,408 bytes fits the tunnel's
/// MTU of 1,420.
pub const UDP_LEN: usize = 1380;

/// Runs an iperf3 client in the client namespace through the tunnel. `udp` selects UDP at
/// that rate (e.g. "1G") with datagrams of that many bytes (`-l`), else TCP.
pub fn iperf(
    topo: &Topology,
    cpu: usize,
    secs: u32,
    udp: Option<(&str, usize)>,
) -> Result<IperfResult> {
    iperf_streams(topo, cpu, secs, udp, 1, 5)
}

/// [`iperf`] with `streams` parallel streams (`-P`), trying `attempts` times.
pub fn iperf_streams(
    topo: &Topology,
    cpu: usize,
    secs: u32,
    udp: Option<(&str, usize)>,
    streams: u32,
    attempts: u32,
) -> Result<IperfResult> {
    let udp_rate = udp.map(|(rate, _)| rate);
    let cns = topo
        .client_ns
        .as_deref()
        .context("e2e needs the netns topology")?;
    // The first packets trigger the handshake; retry the connection while it completes.
    let mut last_err = String::new();
    for _ in 0..attempts {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", cns, "taskset", "-c", &cpu.to_string()])
            .args(["iperf3", "-c", EXIT_TUNNEL, "-J", "-t", &secs.to_string()]);
        if streams > 1 {
            cmd.args(["-P", &streams.to_string()]);
        }
        match udp {
            Some((rate, len)) => cmd.args(["-u", "-l", &len.to_string(), "-b", rate]),
            // TCP: leave slow start out of the figure. (UDP's omit period would make
            // iperf3 count the omitted packets as lost.)
            None => cmd.args(["-O", "1"]),
        };
        let out = cmd.output().context("iperf3 client")?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(err) = v.get("error").and_then(Value::as_str) {
            last_err = err.to_string();
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        return Ok(iperf_result(&v, udp_rate.is_some()));
    }
    bail!("iperf3: {last_err}")
}

/// What iperf3's JSON report `v` says of a run (`udp`: a UDP test).
pub fn iperf_result(v: &Value, udp: bool) -> IperfResult {
    let end = &v["end"];
    if udp {
        let sum = &end["sum"];
        let secs = sum["seconds"].as_f64().unwrap_or(1.0).max(1e-9);
        let packets = sum["packets"].as_f64().unwrap_or(0.0);
        let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
        let bps = sum["bits_per_second"].as_f64().unwrap_or(0.0);
        let loss = sum["lost_percent"].as_f64().unwrap_or(0.0);
        IperfResult {
            // iperf3's UDP bits_per_second is what was sent; scale by what arrived.
            gbps: bps * (1.0 - loss / 100.0) / 1e9,
            mpps: (packets - lost) / secs / 1e6,
            loss_percent: loss,
            jitter_ms: sum["jitter_ms"].as_f64().unwrap_or(0.0),
            bytes: sum["bytes"].as_f64().unwrap_or(0.0) * (1.0 - loss / 100.0),
        }
    } else {
        let r = &end["sum_received"];
        IperfResult {
            gbps: r["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
            bytes: r["bytes"].as_f64().unwrap_or(0.0),
            ..IperfResult::default()
        }
    }
}
