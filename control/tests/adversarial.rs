//! Adversarial load against a real node process (`wraithgate run`) on loopback: handshake
//! floods from many spoofed sources, session exhaustion, garbage at line rate,
//! amplification, and a soak with memory and file descriptors sampled, DoubleHop alone and
//! with every role at once (Z-HOP peers, and Exit peers on a TUN device).
//!
//! Spoofing on loopback needs no privilege: all of 127.0.0.0/8 is local, so a socket bound
//! to 127.a.b.c sends from that address, and receives whatever the relay sends back to it,
//! which is how the amplification ratio is measured. Real sessions are boringtun endpoints
//! (`endpoints::WgNode`) that know nothing of the relay. Figures come from the node's own
//! `/metrics`, from `/proc/<pid>` and from the kernel's per-socket drop counters. The
//! every-role soak alone needs root, for its TUN device, and runs in a network namespace of
//! its own (its loopback is then the test's alone); it skips loudly without root.
//!
//! Every test is short by default (each well under a minute, in CI). For the figures in
//! RELIABILITY.md, `tools/adversarial` runs them in release with longer phases:
//! `WRAITHGATE_ADVERSARIAL_SECS` sets a phase's length, `WRAITHGATE_SOAK_SECS` the soaks',
//! `WRAITHGATE_ADVERSARIAL_SOURCES` and `_FLOOD_PPS` the handshake flood's size,
//! `WRAITHGATE_ADVERSARIAL_UNPACED=1` lets the real session send as fast as it can, and
//! `WRAITHGATE_ADVERSARIAL_REPORT=FILE` appends each test's figures to FILE as JSON.
//! The tests take a lock so that they never load the machine at the same time.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use serde_json::{json, Value};
use wraithgate_control::endpoints::{
    any_loopback, ipv4_udp, tunnel_addrs, KeyPair, PeerOptions, Received, WgNode, ZhopClient,
};
use wraithgate_relay::wire::{self, Message};
use wraithgate_relay::{DropReason, PublicKey};
use wraithgate_testkit::workspace_command;

// ---------------------------------------------------------------------------------------
// Knobs

/// One at a time: the figures are ratios measured side by side on a shared machine.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn env_secs(name: &str, default: f64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(default);
    Duration::from_secs_f64(secs)
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Length of one measured phase.
fn phase() -> Duration {
    env_secs("WRAITHGATE_ADVERSARIAL_SECS", 3.0)
}

/// Appends a test's figures to the report file, if one is asked for, and prints them.
fn report(test: &str, figures: Value) {
    let line = json!({ "test": test, "figures": figures });
    println!("RESULT {line}");
    if let Ok(path) = std::env::var("WRAITHGATE_ADVERSARIAL_REPORT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("report file");
        writeln!(f, "{line}").expect("write report");
    }
}

// ---------------------------------------------------------------------------------------
// The node under attack

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "adv-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_port() -> u16 {
    // A port free for both UDP (relay) and TCP (API) at this moment.
    loop {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// An exit as the node's configuration names it.
#[derive(Clone)]
struct ExitConf {
    name: String,
    key: PublicKey,
    endpoint: SocketAddr,
}

/// Sums of one scrape of `/metrics`.
#[derive(Debug, Default, Clone)]
struct Metrics(HashMap<String, f64>);

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut m = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            *m.entry(name.to_owned()).or_default() += v;
            // Per drop reason and per close cause, summed over workers.
            for key in ["reason", "cause"] {
                if let Some(rest) = labels.split(&format!("{key}=\"")[..]).nth(1) {
                    let label = rest.split('"').next().unwrap_or("");
                    *m.entry(format!("{name}/{label}")).or_default() += v;
                }
            }
        }
        Metrics(m)
    }

    fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0.0) as u64
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.get(&format!("wraithgate_drops_total/{}", reason.as_str()))
    }

    fn all_drops(&self) -> u64 {
        self.get("wraithgate_drops_total")
    }
}

/// The `wraithgate run` process.
struct Node {
    child: Child,
    relay: SocketAddr,
    api: u16,
    token: String,
    agent: ureq::Agent,
    dir: PathBuf,
}

impl Node {
    fn start(tag: &str, exits: &[ExitConf], workers: usize, limits: &str) -> Node {
        Self::start_with(tag, exits, workers, limits, "")
    }

    /// [`Node::start`] with `extra` (TOML: a `[tun]` section, say) ending the configuration.
    fn start_with(
        tag: &str,
        exits: &[ExitConf],
        workers: usize,
        limits: &str,
        extra: &str,
    ) -> Node {
        let dir = temp_dir(tag);
        let port = free_port();
        let relay: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let api = free_port();
        let mut conf = format!(
            "[relay]\nlisten = [\"{relay}\"]\nworkers = {workers}\npin_workers = false\n\n[limits]\n{limits}\n"
        );
        for e in exits {
            conf += &format!(
                "\n[[exit]]\nname = \"{}\"\npublic_key = \"{}\"\nendpoint = \"{}\"\n",
                e.name, e.key, e.endpoint
            );
        }
        conf += extra;
        let path = dir.join("wraithgate.toml");
        std::fs::write(&path, conf).unwrap();
        // Auto (io_uring where it works) unless WRAITHGATE_ADVERSARIAL_BACKEND says.
        let backend = std::env::var("WRAITHGATE_ADVERSARIAL_BACKEND").unwrap_or("auto".into());
        let child = workspace_command(env!("CARGO_BIN_EXE_wraithgate"))
            .args(["run", "--backend", &backend, "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--api-listen", &format!("127.0.0.1:{api}")])
            .env("WRAITHGATE_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let end = Instant::now() + Duration::from_secs(20);
        let token = loop {
            let up = std::net::TcpStream::connect(("127.0.0.1", api)).is_ok();
            if let (true, Ok(t)) = (
                up,
                std::fs::read_to_string(dir.join("state").join("api.token")),
            ) {
                break t.trim().to_owned();
            }
            assert!(Instant::now() < end, "node never came up");
            std::thread::sleep(Duration::from_millis(20));
        };
        Node {
            child,
            relay,
            api,
            token,
            agent,
            dir,
        }
    }

    /// `method path` with `body` (JSON, or nothing when empty): status and answer.
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}{path}", self.api))
            .header("Authorization", format!("Bearer {}", self.token))
            // No connection kept open: the node's descriptors are counted.
            .header("Connection", "close");
        if !body.is_empty() {
            req = req.header("Content-Type", "application/json");
        }
        let mut r = self
            .agent
            .run(req.body(body.as_bytes()).unwrap())
            .expect("API answers");
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (r.status().as_u16(), text)
    }

    fn get(&self, path: &str) -> String {
        let (status, text) = self.request("GET", path, "");
        assert_eq!(status, 200, "GET {path}: {text}");
        text
    }

    /// `POST path` with a JSON `body`, which must succeed.
    fn post(&self, path: &str, body: &Value) {
        let (status, text) = self.request("POST", path, &body.to_string());
        assert!(
            (200..300).contains(&status),
            "POST {path} {body}: {status} {text}"
        );
    }

    /// `DELETE path`, which must succeed.
    fn delete(&self, path: &str) {
        let (status, text) = self.request("DELETE", path, "");
        assert!(
            (200..300).contains(&status),
            "DELETE {path}: {status} {text}"
        );
    }

    /// A scrape, after the workers' next publication (every 50 ms).
    fn metrics(&self) -> Metrics {
        std::thread::sleep(Duration::from_millis(120));
        Metrics::parse(&self.get("/metrics"))
    }

    /// Scrapes until two scrapes in a row agree on every packet counter: the node has
    /// handled everything that reached it.
    fn settled_metrics(&self) -> Metrics {
        let key = |m: &Metrics| {
            (
                m.all_drops(),
                m.get("wraithgate_packets_to_exit_total"),
                m.get("wraithgate_packets_to_client_total"),
            )
        };
        let mut last = self.metrics();
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(150));
            let now = self.metrics();
            if key(&now) == key(&last) {
                return now;
            }
            last = now;
        }
        panic!("the node's counters never settled");
    }

    fn sessions(&self) -> Vec<Value> {
        serde_json::from_str::<Value>(&self.get("/v1/sessions"))
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// CPU time the node has used so far, user and system, in seconds.
    fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which is in parentheses): utime is the 12th, stime
        // the 13th, in clock ticks.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(100.0);
        (f[11] + f[12]) as f64 / ticks
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// What each open descriptor is (`readlink` of `/proc/<pid>/fd/*`), for a failure's
    /// message.
    fn fd_list(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| {
                        let target = std::fs::read_link(e.path())
                            .map(|t| t.display().to_string())
                            .unwrap_or_default();
                        format!("{}={target}", e.file_name().to_string_lossy())
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Open descriptors once the node has finished starting: the sidecar's runtime and
    /// listeners, and an API connection like the one the end of a test holds (counted too
    /// early, a node still starting looks like it leaks them later).
    fn fds_started(&self) -> usize {
        let _ = self.metrics();
        let mut last = self.fds();
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(100));
            let now = self.fds();
            if now == last {
                return now;
            }
            last = now;
        }
        last
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Open descriptors once they come down to `expected` (closing is asynchronous: an
    /// API connection, a socket whose session just expired), or what they are after 3 s.
    fn fds_settled(&self, expected: usize) -> usize {
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            let n = self.fds();
            if n <= expected || Instant::now() >= end {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Datagrams the kernel dropped on the relay's listening sockets (full receive
    /// buffers): the ones the node never saw, so cannot count.
    fn kernel_drops(&self) -> u64 {
        let port = format!(":{:04X}", self.relay.port());
        let text = std::fs::read_to_string("/proc/net/udp").unwrap();
        text.lines()
            .skip(1)
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|local| local.ends_with(&port))
            })
            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if !matches!(self.child.try_wait(), Ok(None)) {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// Real sessions

/// A boringtun client and exit whose tunnel runs through the relay.
struct Tunnel {
    client: WgNode,
    exit: WgNode,
    cp: usize,
    ep: usize,
}

/// What a run of traffic through a tunnel achieved.
#[derive(Debug, Clone, Copy, Default)]
struct Delivery {
    sent: u64,
    delivered: u64,
    secs: f64,
}

impl Delivery {
    fn pps(&self) -> f64 {
        self.delivered as f64 / self.secs
    }
}

impl Tunnel {
    /// A client of `exit` (whose peers gain the client) with the relay as its endpoint,
    /// its handshake done and a first packet through.
    fn establish(relay: SocketAddr, exit: WgNode, bind: SocketAddr) -> Tunnel {
        match Self::try_establish(relay, exit, bind, Duration::from_secs(15)) {
            Ok(t) => t,
            Err(_) => panic!("no packet crossed the relay"),
        }
    }

    /// As [`Tunnel::establish`], giving up (and the exit back) after `timeout`.
    fn try_establish(
        relay: SocketAddr,
        mut exit: WgNode,
        bind: SocketAddr,
        timeout: Duration,
    ) -> Result<Tunnel, Box<WgNode>> {
        let mut client = WgNode::bind(bind, KeyPair::generate()).unwrap();
        let cp = client.add_peer(
            exit.keys().public,
            PeerOptions {
                endpoint: Some(relay),
                ..Default::default()
            },
        );
        let ep = exit.add_peer(client.keys().public, PeerOptions::default());
        let mut t = Tunnel {
            client,
            exit,
            cp,
            ep,
        };
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let d = t.run(Duration::from_millis(300), Some(20.0), 64);
            if d.delivered > 0 {
                return Ok(t);
            }
            t.client.initiate(t.cp).ok();
        }
        Err(Box::new(t.exit))
    }

    /// Sends `size`-byte IP packets client → exit for `time`, paced at `pps` or as fast as
    /// the endpoints go, and counts what the exit decrypts.
    fn run(&mut self, time: Duration, pps: Option<f64>, size: usize) -> Delivery {
        let (s, d) = tunnel_addrs(1);
        let body = vec![0x5au8; size.saturating_sub(28)];
        let packet = ipv4_udp(s, d, 40000, 9, &body);
        let start = Instant::now();
        let mut last_tick = start;
        let mut out = Delivery::default();
        while start.elapsed() < time {
            let due = match pps {
                Some(r) => ((start.elapsed().as_secs_f64() * r) as u64).saturating_sub(out.sent),
                None => 16,
            };
            for _ in 0..due.min(64) {
                if self.client.send_ip(self.cp, &packet).is_ok() {
                    out.sent += 1;
                }
            }
            let mut idle = true;
            while let Ok(Some(r)) = self.exit.try_recv() {
                idle = false;
                if matches!(r, Received::Packet { .. }) {
                    out.delivered += 1;
                }
            }
            while let Ok(Some(_)) = self.client.try_recv() {
                idle = false;
            }
            if last_tick.elapsed() >= Duration::from_millis(100) {
                self.client.tick();
                self.exit.tick();
                last_tick = Instant::now();
            }
            if idle && pps.is_some() {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Stragglers still in flight (a loaded machine delays them).
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            if let Ok(Some(Received::Packet { .. })) = self.exit.try_recv() {
                out.delivered += 1;
            }
        }
        out.secs = time.as_secs_f64();
        out
    }

    /// One packet exit → client: the session still reaches its client.
    fn reply_reaches_client(&mut self) -> bool {
        let (s, d) = tunnel_addrs(1);
        let packet = ipv4_udp(d, s, 9, 40000, b"reply");
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let _ = self.exit.send_ip(self.ep, &packet);
            let until = Instant::now() + Duration::from_millis(200);
            while Instant::now() < until {
                if let Ok(Some(Received::Packet { .. })) = self.client.try_recv() {
                    return true;
                }
                let _ = self.exit.try_recv();
            }
        }
        false
    }
}

/// An exit that receives and counts, never answers: the target of floods, so that what
/// is measured is the relay, not a debug-built boringtun exit doing a Diffie-Hellman for
/// every junk initiation the relay lets through.
struct Decoy {
    conf: ExitConf,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Decoy {
    fn start(name: &str, key_byte: u8) -> Decoy {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let conf = ExitConf {
            name: name.into(),
            key: PublicKey([key_byte; 32]),
            endpoint: socket.local_addr().unwrap(),
        };
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv_from(&mut buf).is_ok() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Decoy {
            conf,
            received,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Decoy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn exit_conf(name: &str, node: &WgNode) -> ExitConf {
    ExitConf {
        name: name.into(),
        key: node.keys().relay_key(),
        endpoint: node.local_addr(),
    }
}

// ---------------------------------------------------------------------------------------
// Attackers

/// `n` sockets on distinct loopback addresses 127.<net>.x.y: spoofed sources that also
/// hear what the relay sends back.
fn sources(net: u8, n: usize) -> Vec<UdpSocket> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(127, net, (i / 250) as u8, (i % 250 + 1) as u8);
            let s = UdpSocket::bind((ip, 0)).expect("bind a loopback source");
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect()
}

/// An initiation with a valid mac1 for `exit` and nothing valid inside: all an attacker
/// who knows an exit's public key can make.
fn fake_initiation(exit: &PublicKey, sender: u32) -> Vec<u8> {
    let mut m = vec![0u8; wire::INITIATION_LEN];
    m[..4].copy_from_slice(&[wire::INITIATION_TYPE, 0, 0, 0]);
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    for (i, b) in m[8..116].iter_mut().enumerate() {
        *b = (sender as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    let mac = exit.mac1_key().compute(&m[..wire::INITIATION_MAC1_OFFSET]);
    m[116..132].copy_from_slice(&mac);
    m
}

/// Sends initiations for `exit` round-robin from `sources` at `pps` until `stop`; returns
/// how many were sent from each source.
fn flood(
    sources: Vec<UdpSocket>,
    relay: SocketAddr,
    exit: PublicKey,
    pps: f64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<UdpSocket>, Vec<u64>)> {
    std::thread::spawn(move || {
        // A few hundred precomputed packets, so that sending is all the flood costs.
        let packets: Vec<Vec<u8>> = (0..256u32)
            .map(|i| fake_initiation(&exit, i.wrapping_mul(0x9E37_79B9)))
            .collect();
        let mut sent = vec![0u64; sources.len()];
        let start = Instant::now();
        let mut total = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = (start.elapsed().as_secs_f64() * pps) as u64;
            if total >= due {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            for _ in 0..(due - total).min(256) {
                let i = (total % sources.len() as u64) as usize;
                let p = &packets[(total % 256) as usize];
                if sources[i].send_to(p, relay).is_ok() {
                    sent[i] += 1;
                }
                total += 1;
            }
        }
        (sources, sent)
    })
}

/// Bytes each source has received so far (drains its socket).
fn drain(sources: &[UdpSocket]) -> Vec<u64> {
    let mut buf = [0u8; 65_536];
    sources
        .iter()
        .map(|s| {
            let mut n = 0u64;
            while let Ok(len) = s.recv(&mut buf) {
                n += len as u64;
            }
            n
        })
        .collect()
}

/// Samples of a node's memory and descriptors.
#[derive(Debug, Default)]
struct Samples(Vec<(f64, u64, usize)>);

impl Samples {
    fn take(&mut self, node: &Node, since: Instant) {
        self.0
            .push((since.elapsed().as_secs_f64(), node.rss_kib(), node.fds()));
    }
    fn json(&self) -> Value {
        json!(self
            .0
            .iter()
            .map(|(t, rss, fds)| json!([(t * 10.0).round() / 10.0, rss, fds]))
            .collect::<Vec<_>>())
    }
    fn max_rss(&self) -> u64 {
        self.0.iter().map(|s| s.1).max().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------
// The attacks

/// A flood of initiations (valid mac1, garbage inside) from 512 spoofed sources, twice the
/// per-source rate limit each and more sources than the pending-session bound, while a
/// real session carries traffic. The session keeps ≥ 90 % of its undisturbed delivery;
/// once half the pending table is taken the relay challenges with cookie replies, which
/// the spoofed sources never answer, so they hold at most half of it and a new client gets
/// in during the flood; the rate limit and the table bounds hold, every refusal is
/// counted, what goes back to the sources is smaller than what they sent, memory stays flat.
#[test]
fn adversarial_handshake_flood_from_spoofed_sources_spares_a_real_session() {
    let _serial = serial();
    let exit = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let decoy = Decoy::start("decoy", 0xD1);
    let newcomer_exit = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let (max_sessions, max_pending, workers) = (512u64, 128u64, 2u64);
    let node = Node::start(
        "flood",
        &[
            exit_conf("exit", &exit),
            exit_conf("newcomer-exit", &newcomer_exit),
            decoy.conf.clone(),
        ],
        workers as usize,
        &format!("max_sessions = {max_sessions}\nmax_pending = {max_pending}\nhandshakes_per_second = 20\nhandshake_burst = 5"),
    );
    let mut tunnel = Tunnel::establish(node.relay, exit, any_loopback());
    let unpaced = std::env::var_os("WRAITHGATE_ADVERSARIAL_UNPACED").is_some();
    let pace = (!unpaced).then_some(1_000.0);
    let t = phase();

    let cpu0 = node.cpu_secs();
    let quiet = tunnel.run(t, pace, 1200);
    let cpu_quiet = node.cpu_secs() - cpu0;
    let before = node.settled_metrics();
    let n_sources = env_count("WRAITHGATE_ADVERSARIAL_SOURCES", 512);
    let flood_pps = env_count("WRAITHGATE_ADVERSARIAL_FLOOD_PPS", 20_000) as f64;
    let stop = Arc::new(AtomicBool::new(false));
    let attacker = flood(
        sources(20, n_sources),
        node.relay,
        decoy.conf.key,
        flood_pps,
        stop.clone(),
    );
    let started = Instant::now();
    let mut samples = Samples::default();
    samples.take(&node, started);
    // Let the flood fill the tables, then measure the session beside it.
    std::thread::sleep(Duration::from_millis(500));
    samples.take(&node, started);
    let sampler_stop = Arc::new(AtomicBool::new(false));
    let cpu1 = node.cpu_secs();
    let loud = {
        let mut loud = Delivery::default();
        std::thread::scope(|scope| {
            let node = &node;
            let samples = &mut samples;
            let stop = sampler_stop.clone();
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    samples.take(node, started);
                }
            });
            loud = tunnel.run(t, pace, 1200);
            sampler_stop.store(true, Ordering::Relaxed);
        });
        loud
    };
    let cpu_loud = node.cpu_secs() - cpu1;
    let during = node.metrics();
    // A new client while the flood holds its half of the pending table: it is challenged,
    // answers with the cookie (boringtun keeps it for its next initiation) and gets in.
    let before_newcomer = node.metrics();
    let newcomer_started = Instant::now();
    let newcomer = Tunnel::try_establish(
        node.relay,
        newcomer_exit,
        "127.0.0.3:0".parse().unwrap(),
        Duration::from_secs(10),
    )
    .is_ok();
    let newcomer_secs = newcomer_started.elapsed().as_secs_f64();
    let newcomer_refusals = node.metrics().drops(DropReason::PendingFull)
        - before_newcomer.drops(DropReason::PendingFull);
    stop.store(true, Ordering::Relaxed);
    let flood_secs = started.elapsed().as_secs_f64();
    let (srcs, sent) = attacker.join().unwrap();
    samples.take(&node, started);
    let after = node.settled_metrics();
    let echoed: u64 = drain(&srcs).iter().sum();
    let flood_sent: u64 = sent.iter().sum();

    let ratio = loud.pps() / quiet.pps();
    let forwarded = after.get("wraithgate_client_handshakes_total")
        - before.get("wraithgate_client_handshakes_total");
    let rate_limited = after.drops(DropReason::RateLimited) - before.drops(DropReason::RateLimited);
    let refused_at_bound = after.drops(DropReason::PendingFull)
        - before.drops(DropReason::PendingFull)
        + after.drops(DropReason::SessionsFull)
        - before.drops(DropReason::SessionsFull);
    let challenged =
        after.drops(DropReason::CookieChallenge) - before.drops(DropReason::CookieChallenge);
    // Token bucket per source: burst + rate × time, with a second of slack for timing.
    let allowed = n_sources as u64 * (5 + (20.0 * (flood_secs + 1.0)) as u64);
    let handled = after.all_drops() - before.all_drops() + forwarded;
    let kernel = node.kernel_drops();
    report(
        "handshake_flood",
        json!({
            "phase_secs": t.as_secs_f64(), "paced_pps": pace, "packet_bytes": 1200,
            "undisturbed_pps": quiet.pps(), "under_flood_pps": loud.pps(), "ratio": ratio,
            "flood_pps_target": flood_pps, "flood_sent": flood_sent, "flood_secs": flood_secs,
            "sources": n_sources, "forwarded_initiations": forwarded,
            "allowed_by_rate_limit": allowed, "rate_limited": rate_limited,
            "refused_at_bound": refused_at_bound, "cookie_challenges": challenged,
            "sessions_during": during.get("wraithgate_sessions"),
            "pending_during": during.get("wraithgate_sessions_pending"),
            "bytes_back_to_sources": echoed, "kernel_drops": kernel,
            "decoy_exit_received": decoy.received.load(Ordering::Relaxed),
            "rss_kib_fds": samples.json(), "new_client_got_in_during_flood": newcomer,
            "pending_full_while_new_client_tried": newcomer_refusals,
            "new_client_secs": newcomer_secs,
            "relay_cpu_secs_undisturbed": cpu_quiet, "relay_cpu_secs_under_flood": cpu_loud,
        }),
    );
    assert!(
        ratio >= 0.9,
        "the real session got {:.0} pps under the flood, {:.0} without",
        loud.pps(),
        quiet.pps()
    );
    assert!(
        forwarded <= allowed,
        "{forwarded} initiations passed the rate limit"
    );
    assert!(decoy.received.load(Ordering::Relaxed) <= forwarded);
    assert!(
        challenged > 0,
        "a flood past the load mark was never challenged"
    );
    // Unproven sources open pending sessions only below the mark, half the bound.
    assert!(
        during.get("wraithgate_sessions_pending") <= workers * max_pending / 2,
        "{} pending",
        during.get("wraithgate_sessions_pending")
    );
    assert!(during.get("wraithgate_sessions") <= workers * max_sessions);
    assert!(
        newcomer,
        "a new client could not get in during the flood ({newcomer_refusals} pending_full)"
    );
    // What went back to the spoofed sources: cookie replies only, 64 bytes for a 148-byte
    // initiation, never more than one per initiation.
    assert!(
        echoed <= challenged * wire::COOKIE_REPLY_LEN as u64,
        "{echoed} bytes back for {challenged} challenges"
    );
    assert!(echoed * 2 < flood_sent * wire::INITIATION_LEN as u64);
    // Every initiation the node received was forwarded or refused with a reason.
    assert!(handled <= flood_sent + loud.sent + quiet.sent);
    assert!(
        handled + kernel >= flood_sent,
        "{handled} handled of {flood_sent}"
    );
    // Memory: the tables are bounded, so nothing grows once they are full.
    let settled = samples.0[1].1;
    assert!(
        samples.max_rss() <= settled + 16 * 1024,
        "RSS grew from {settled} KiB to {} KiB under the flood",
        samples.max_rss()
    );
    // The real session was neither evicted nor moved.
    assert!(tunnel.reply_reaches_client());
    let client = tunnel.client.local_addr().to_string();
    assert!(node
        .sessions()
        .iter()
        .any(|s| s["client"] == client.as_str() && s["established"] == true));
}

/// More would-be clients than the session table holds, and one source trying to hold
/// sessions to every exit and to churn indices: refused at the bound and counted; the
/// established session is never evicted; everything pending drains when it expires.
#[test]
fn adversarial_session_and_index_exhaustion_is_refused_at_the_bound() {
    let _serial = serial();
    let exit = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    // Four more exits that answer nothing, so that one source can aim at five exits.
    let silent: Vec<UdpSocket> = (0..4)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut exits = vec![exit_conf("real", &exit)];
    let silent_keys: Vec<PublicKey> = (0..4).map(|i| PublicKey([0xA0 + i; 32])).collect();
    for (i, s) in silent.iter().enumerate() {
        exits.push(ExitConf {
            name: format!("silent-{i}"),
            key: silent_keys[i],
            endpoint: s.local_addr().unwrap(),
        });
    }
    let max_sessions = 32u64;
    const PENDING_SECS: u64 = 5;
    let node = Node::start(
        "exhaust",
        &exits,
        1,
        &format!("max_sessions = {max_sessions}\nmax_pending = {max_sessions}\npending_timeout_secs = {PENDING_SECS}\nhandshake_burst = 5"),
    );
    let exit_key = exit.keys().relay_key();
    let mut tunnel = Tunnel::establish(node.relay, exit, any_loopback());
    let base_fds = node.fds_started();
    let before = node.settled_metrics();

    // 200 sources, one initiation each. Unproven sources fill the pending table up to the
    // load mark (half of it); the others are challenged. These sources are real addresses,
    // so they answer the challenge with the cookie, and fill the table to its bound: 31
    // sessions fit beside the real one.
    let srcs = sources(30, 200);
    let first: Vec<Vec<u8>> = (0..srcs.len())
        .map(|i| fake_initiation(&exit_key, i as u32))
        .collect();
    for (s, p) in srcs.iter().zip(&first) {
        s.send_to(p, node.relay).unwrap();
    }
    let unproven = node.settled_metrics();
    let challenged =
        unproven.drops(DropReason::CookieChallenge) - before.drops(DropReason::CookieChallenge);
    let mark = max_sessions / 2;
    assert_eq!(unproven.get("wraithgate_sessions_pending"), mark);
    assert_eq!(challenged, 200 - mark);
    let mut answered = 0;
    for (i, (s, sent)) in srcs.iter().zip(&first).enumerate() {
        let mut reply = [0u8; wire::COOKIE_REPLY_LEN];
        s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
        s.set_nonblocking(false).unwrap();
        let Ok(n) = s.recv(&mut reply) else { continue };
        s.set_nonblocking(true).unwrap();
        assert_eq!(n, wire::COOKIE_REPLY_LEN);
        let mut retry = fake_initiation(&exit_key, 10_000 + i as u32);
        let mac2 = {
            let (Ok(wire::Message::Initiation(a)), Ok(wire::Message::Initiation(b))) =
                (wire::Message::parse(sent), wire::Message::parse(&retry))
            else {
                unreachable!()
            };
            wraithgate_relay::cookie::initiator_mac2(&exit_key, &reply, &a, &b)
                .expect("the relay's cookie reply decrypts with the exit's public key")
        };
        retry[wire::INITIATION_MAC2_OFFSET..].copy_from_slice(&mac2);
        s.send_to(&retry, node.relay).unwrap();
        answered += 1;
    }
    assert_eq!(
        answered, challenged,
        "every challenged source got one reply"
    );
    let full = node.settled_metrics();
    let opened = full.get("wraithgate_sessions_opened_total")
        - before.get("wraithgate_sessions_opened_total");
    let sessions_full =
        full.drops(DropReason::SessionsFull) - before.drops(DropReason::SessionsFull);
    let fds_full = node.fds_settled(base_fds + max_sessions as usize - 1);
    assert_eq!(full.get("wraithgate_sessions"), max_sessions);
    assert_eq!(opened, max_sessions - 1);
    assert_eq!(sessions_full, 200 - (max_sessions - 1));
    assert!(
        fds_full <= base_fds + max_sessions as usize,
        "{fds_full} fds"
    );
    // The established session carries on at the bound.
    let at_bound = tunnel.run(Duration::from_secs(1), Some(500.0), 200);
    assert!(
        at_bound.delivered as f64 >= 0.9 * at_bound.sent as f64,
        "{at_bound:?}"
    );

    // Pending sessions expire; the table has room again.
    std::thread::sleep(Duration::from_secs(PENDING_SECS) + Duration::from_millis(500));
    let drained = node.settled_metrics();
    assert_eq!(drained.get("wraithgate_sessions"), 1);
    assert_eq!(
        drained.get("wraithgate_sessions_closed_total/pending_expired")
            - before.get("wraithgate_sessions_closed_total/pending_expired"),
        max_sessions - 1
    );
    let fds_drained = node.fds_settled(base_fds);
    assert_eq!(
        fds_drained, base_fds,
        "exit-facing sockets closed with their sessions"
    );

    // One source: initiations to all five exits (the fifth is refused), then thousands
    // of fresh sender indices to one exit (one session, rate limited).
    let one = &srcs[0];
    let mut keys = vec![exit_key];
    keys.extend(&silent_keys);
    for (i, k) in keys.iter().enumerate() {
        one.send_to(&fake_initiation(k, 1000 + i as u32), node.relay)
            .unwrap();
    }
    let per_client = node.settled_metrics();
    assert_eq!(
        per_client.drops(DropReason::ClientSessionLimit)
            - drained.drops(DropReason::ClientSessionLimit),
        1
    );
    let churn = 5_000u32;
    let churn_start = Instant::now();
    for i in 0..churn {
        let _ = one.send_to(&fake_initiation(&silent_keys[0], 50_000 + i), node.relay);
    }
    let churned = node.settled_metrics();
    let churn_secs = churn_start.elapsed().as_secs_f64();
    // Over its budget the source is challenged (while the relay's cookie budget lasts) or
    // refused; either way nothing passes.
    let limited = churned.drops(DropReason::RateLimited)
        - per_client.drops(DropReason::RateLimited)
        + churned.drops(DropReason::CookieChallenge)
        - per_client.drops(DropReason::CookieChallenge);
    let passed = churned.get("wraithgate_client_handshakes_total")
        - per_client.get("wraithgate_client_handshakes_total");
    let kernel = node.kernel_drops();
    report(
        "session_and_index_exhaustion",
        json!({
            "bound": max_sessions, "attempts": 200, "challenged": challenged, "opened": opened,
            "refused_sessions_full": sessions_full, "fds_base": base_fds, "fds_at_bound": fds_full,
            "fds_after_expiry": fds_drained, "real_session_at_bound": format!("{}/{}", at_bound.delivered, at_bound.sent),
            "one_source_five_exits_refused": 1, "index_churn": churn, "churn_passed": passed,
            "churn_rate_limited": limited, "kernel_drops": kernel,
        }),
    );
    // Thousands of indices from one source: still one session, and the rate limit.
    assert_eq!(
        churned.get("wraithgate_sessions_opened_total"),
        per_client.get("wraithgate_sessions_opened_total")
    );
    assert!(churned.get("wraithgate_sessions") <= 1 + 4);
    assert!(passed + limited + kernel >= u64::from(churn) && passed + limited <= u64::from(churn));
    let allowed = 5 + (20.0 * (churn_secs + 0.5)) as u64;
    assert!(
        passed <= allowed,
        "{passed} initiations passed the rate limit (allowed {allowed})"
    );
    assert!(tunnel.reply_reaches_client());
}

/// Garbage as fast as one thread sends it, from hundreds of sources and from the real
/// client's own address: random bytes, every malformed header, valid-looking messages
/// with unknown indices, and replays of the real client's captured packets from other
/// addresses. Nothing crashes; every datagram is either forwarded or counted under the
/// reason it deserves (or dropped by the kernel, which says so); the session never moves.
#[test]
fn adversarial_garbage_at_line_rate_is_counted_and_moves_nothing() {
    let _serial = serial();
    let exit = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let exit_key = exit.keys().relay_key();
    let mut node = Node::start("garbage", &[exit_conf("exit", &exit)], 2, "");
    // The client reaches the relay through a tap that keeps a copy of what it sends.
    let tap = Tap::start(node.relay);
    let mut tunnel = Tunnel::establish(tap.addr, exit, any_loopback());
    tunnel.run(Duration::from_millis(300), Some(100.0), 300);
    let captured = tap.captured();
    let init = captured
        .iter()
        .find(|p| p.first() == Some(&1))
        .expect("captured the client's initiation")
        .clone();
    let data = captured
        .iter()
        .find(|p| p.first() == Some(&4) && p.len() > 64)
        .expect("captured a transport packet")
        .clone();
    let real_index = u32::from_le_bytes(data[4..8].try_into().unwrap());
    let session_before = node
        .sessions()
        .into_iter()
        .find(|s| s["client"] == tap.relay_side.to_string().as_str())
        .expect("the real session");

    let srcs = sources(40, 256);
    let real_addr_socket = tap.relay_side_socket();
    let rounds = (phase().as_secs_f64() * 10_000.0) as usize;
    let mut rng = rand::thread_rng();
    use rand::Rng as _;
    let transport = |index: u32, len: usize| {
        let mut m = vec![0x77u8; len];
        m[..4].copy_from_slice(&[4, 0, 0, 0]);
        m[4..8].copy_from_slice(&index.to_le_bytes());
        m
    };
    let header = |kind: u8, len: usize| {
        let mut m = vec![0x11u8; len];
        m[..4].copy_from_slice(&[kind, 0, 0, 0]);
        m
    };
    // (category, the reason every packet of it must get, or None when several can apply)
    type Gen<'a> = Box<dyn FnMut(&mut rand::rngs::ThreadRng) -> Vec<u8> + 'a>;
    let mut categories: Vec<(&str, Option<DropReason>, bool, Gen<'_>)> = vec![
        (
            "truncated",
            Some(DropReason::Truncated),
            false,
            Box::new(|r| {
                let n = r.gen_range(0..4);
                (0..n).map(|_| r.gen()).collect()
            }),
        ),
        (
            "reserved_nonzero",
            Some(DropReason::ReservedNonZero),
            false,
            Box::new(|r| {
                let mut m = header(r.gen_range(1..=4), 148);
                m[r.gen_range(1..4)] = r.gen_range(1..=255);
                m
            }),
        ),
        (
            "unknown_type",
            Some(DropReason::UnknownType),
            false,
            Box::new(|r| header(r.gen_range(5..=255), r.gen_range(4..1500))),
        ),
        (
            "bad_length",
            Some(DropReason::BadLength),
            false,
            Box::new(|r| match r.gen_range(0..4) {
                0 => header(1, 149),
                1 => header(2, 91),
                2 => header(3, r.gen_range(4..64)),
                _ => header(4, r.gen_range(4..32)),
            }),
        ),
        (
            "unknown_index_random_sources",
            Some(DropReason::UnknownClient),
            false,
            Box::new(|r| match r.gen_range(0..3) {
                0 => transport(r.gen(), r.gen_range(32..1500)),
                1 => {
                    let mut m = header(2, 92);
                    m[8..12].copy_from_slice(&r.gen::<u32>().to_le_bytes());
                    m
                }
                _ => header(3, 64),
            }),
        ),
        (
            "unknown_index_from_the_real_client",
            Some(DropReason::UnknownIndex),
            true,
            Box::new(|r| {
                let mut i: u32 = r.gen();
                if i == real_index {
                    i ^= 1;
                }
                transport(i, r.gen_range(32..1500))
            }),
        ),
        (
            "replayed_transport_wrong_sources",
            Some(DropReason::UnknownClient),
            false,
            Box::new(|_| data.clone()),
        ),
        (
            "random_mac1_initiations",
            None,
            false,
            Box::new(|r| {
                let mut m = header(1, 148);
                r.fill(&mut m[4..]);
                m
            }),
        ),
        (
            "replayed_initiation_wrong_sources",
            None,
            false,
            Box::new(|_| init.clone()),
        ),
        (
            "random_bytes",
            None,
            false,
            Box::new(|r| {
                let mut m = vec![0u8; r.gen_range(0..1500)];
                r.fill(&mut m[..]);
                m
            }),
        ),
    ];
    let mut rows = Vec::new();
    let started = Instant::now();
    let mut samples = Samples::default();
    samples.take(&node, started);
    for (name, reason, from_real, gen) in categories.iter_mut() {
        let before = node.settled_metrics();
        let kernel_before = node.kernel_drops();
        let mut sent = 0u64;
        let mut parse_reasons: HashMap<DropReason, u64> = HashMap::new();
        let t0 = Instant::now();
        for i in 0..rounds {
            let p = gen(&mut rng);
            if let Err(r) = Message::parse(&p) {
                *parse_reasons.entry(r).or_default() += 1;
            }
            let s = if *from_real {
                &real_addr_socket
            } else {
                &srcs[i % srcs.len()]
            };
            if s.send_to(&p, node.relay).is_ok() {
                sent += 1;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        samples.take(&node, started);
        let after = node.settled_metrics();
        let kernel = node.kernel_drops() - kernel_before;
        let counted = after.all_drops() - before.all_drops();
        let forwarded = after.get("wraithgate_packets_to_exit_total")
            - before.get("wraithgate_packets_to_exit_total");
        let by_reason: serde_json::Map<String, Value> = DropReason::ALL
            .iter()
            .filter_map(|r| {
                let d = after.drops(*r) - before.drops(*r);
                (d > 0).then(|| (r.as_str().to_owned(), json!(d)))
            })
            .collect();
        rows.push(json!({
            "category": name, "sent": sent, "pps": sent as f64 / secs, "kernel_drops": kernel,
            "forwarded": forwarded, "counted": counted, "by_reason": by_reason,
        }));
        // Nothing vanishes: every datagram was forwarded, counted or dropped by the kernel
        // (the tunnel is quiet meanwhile; its keepalives may add a few forwarded packets).
        assert!(counted + forwarded + kernel >= sent, "{name}: {rows:?}");
        assert!(counted <= sent, "{name}: counted more than sent: {rows:?}");
        if let Some(reason) = reason {
            let d = after.drops(*reason) - before.drops(*reason);
            assert!(
                d <= sent && d + kernel >= sent,
                "{name}: {d} {reason}: {rows:?}"
            );
        }
        // What fails to parse is counted under the parser's reason.
        for (r, n) in &parse_reasons {
            let d = after.drops(*r) - before.drops(*r);
            assert!(d + kernel >= *n, "{name}: {d} {r} of {n}: {rows:?}");
        }
        assert!(node.alive(), "the node died on {name}");
        // Exit-side drops would mean the relay sent something somewhere it should not.
        assert_eq!(
            after.drops(DropReason::AmplificationLimit),
            before.drops(DropReason::AmplificationLimit)
        );
    }
    samples.take(&node, started);
    // No session moved: the real one is where it was, and still works both ways.
    let session_after = node
        .sessions()
        .into_iter()
        .find(|s| s["id"] == session_before["id"])
        .expect("the real session survived");
    assert_eq!(session_after["client"], session_before["client"]);
    assert_eq!(
        session_after["exit_endpoint"],
        session_before["exit_endpoint"]
    );
    let after = tunnel.run(Duration::from_secs(1), Some(300.0), 500);
    assert!(
        after.delivered as f64 >= 0.9 * after.sent as f64,
        "{after:?}"
    );
    assert!(tunnel.reply_reaches_client());
    // Replays from other addresses opened sessions of their own, never took this one.
    for s in node.sessions() {
        if s["client"] != session_before["client"] {
            assert_ne!(s["id"], session_before["id"]);
        }
    }
    let _ = exit_key;
    report(
        "garbage",
        json!({ "categories": rows, "rss_kib_fds": samples.json() }),
    );
}

/// A UDP forwarder between the client and the relay that keeps a copy of the first
/// datagrams the client sends: the "captured packets" an attacker replays.
struct Tap {
    addr: SocketAddr,
    relay_side: SocketAddr,
    relay_socket: UdpSocket,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Tap {
    fn start(relay: SocketAddr) -> Tap {
        let client_side = UdpSocket::bind("127.0.0.1:0").unwrap();
        let relay_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        client_side.set_nonblocking(true).unwrap();
        relay_socket.set_nonblocking(true).unwrap();
        let addr = client_side.local_addr().unwrap();
        let relay_side = relay_socket.local_addr().unwrap();
        let captured = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (captured, stop) = (captured.clone(), stop.clone());
            let to_relay = relay_socket.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                let mut client: Option<SocketAddr> = None;
                while !stop.load(Ordering::Relaxed) {
                    let mut idle = true;
                    while let Ok((n, from)) = client_side.recv_from(&mut buf) {
                        idle = false;
                        client = Some(from);
                        let mut c = captured.lock().unwrap();
                        if c.len() < 256 {
                            c.push(buf[..n].to_vec());
                        }
                        let _ = to_relay.send_to(&buf[..n], relay);
                    }
                    while let Ok((n, from)) = to_relay.recv_from(&mut buf) {
                        idle = false;
                        if let (true, Some(c)) = (from == relay, client) {
                            let _ = client_side.send_to(&buf[..n], c);
                        }
                    }
                    if idle {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
            })
        };
        Tap {
            addr,
            relay_side,
            relay_socket,
            captured,
            stop,
            thread: Some(thread),
        }
    }

    fn captured(&self) -> Vec<Vec<u8>> {
        self.captured.lock().unwrap().clone()
    }

    /// A socket with the real client's address as the relay sees it.
    fn relay_side_socket(&self) -> UdpSocket {
        self.relay_socket.try_clone().unwrap()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An attacker who is a legitimate peer of the exits sends fresh, valid initiations in
/// the name of victims (spoofed sources), so that the exits answer the victims; plus an
/// exit that misbehaves and answers every datagram with three times its size. Whatever
/// the exits send, a victim never receives more bytes than were sent in its name.
#[test]
fn adversarial_amplification_towards_unverified_sources_stays_at_most_one() {
    let _serial = serial();
    let attacker = KeyPair::generate();
    let mut honest = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let mut loaded = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    honest.add_peer(attacker.public, PeerOptions::default());
    // Under load: every initiation gets a cookie reply first.
    let limiter = Arc::new(RateLimiter::new(&loaded.keys().public, 0));
    loaded.add_peer(
        attacker.public,
        PeerOptions {
            rate_limiter: Some(limiter),
            ..Default::default()
        },
    );
    let reflector = UdpSocket::bind("127.0.0.1:0").unwrap();
    reflector.set_nonblocking(true).unwrap();
    let reflector_key = PublicKey([0xBB; 32]);
    let exits = [
        exit_conf("honest", &honest),
        exit_conf("loaded", &loaded),
        ExitConf {
            name: "reflector".into(),
            key: reflector_key,
            endpoint: reflector.local_addr().unwrap(),
        },
    ];
    let node = Node::start(
        "amp",
        &exits,
        2,
        "handshakes_per_second = 20\nhandshake_burst = 5",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let exits_answered = Arc::new(AtomicU64::new(0));
    // The exits run on their own thread, answering whatever reaches them.
    // The exits run on threads of their own, answering whatever reaches them.
    let exit_thread = {
        let (stop, answered) = (stop.clone(), exits_answered.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let mut idle = true;
                for n in [&mut honest, &mut loaded] {
                    while let Ok(Some(r)) = n.try_recv() {
                        idle = false;
                        if !matches!(r, Received::Rejected { .. }) {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };
    let reflected = Arc::new(AtomicU64::new(0));
    let reflector_thread = {
        let (stop, reflected) = (stop.clone(), reflected.clone());
        reflector.set_nonblocking(false).unwrap();
        reflector
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((len, from)) = reflector.recv_from(&mut buf) {
                    // Well-formed WireGuard transport, or the relay refuses it unread.
                    let mut big = vec![0x42u8; (len * 3).min(65_000)];
                    big[..4].copy_from_slice(&[4, 0, 0, 0]);
                    if reflector.send_to(&big, from).is_ok() {
                        reflected.fetch_add(big.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let victims = sources(50, 64);
    let mut sent = vec![0u64; victims.len()];
    let keys = [honest_key(&exits[0]), honest_key(&exits[1])];
    let mut tunns: Vec<Tunn> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| Tunn::new(attacker.secret.clone(), *k, None, None, i as u32 + 1, None))
        .collect();
    let mut got = vec![0u64; victims.len()];
    // Initiation bytes alone: the budget the relay gives an unverified session.
    let mut handshake_bytes = vec![0u64; victims.len()];
    let mut buf = vec![0u8; 2048];
    let end = Instant::now() + phase();
    let mut round = 0u32;
    while Instant::now() < end {
        for (v, s) in victims.iter().enumerate() {
            // A real initiation to one of the two WireGuard exits...
            let t = &mut tunns[(v + round as usize) % 2];
            if let TunnResult::WriteToNetwork(p) = t.format_handshake_initiation(&mut buf, true) {
                if s.send_to(p, node.relay).is_ok() {
                    sent[v] += p.len() as u64;
                    handshake_bytes[v] += p.len() as u64;
                }
            }
            // ...one to the reflector, and transport with a guessed index.
            let fake = fake_initiation(&reflector_key, round);
            if s.send_to(&fake, node.relay).is_ok() {
                sent[v] += fake.len() as u64;
                handshake_bytes[v] += fake.len() as u64;
            }
            let mut guess = vec![0u8; 1400];
            guess[..4].copy_from_slice(&[4, 0, 0, 0]);
            guess[4..8].copy_from_slice(&(round << 8 | 1).to_le_bytes());
            if s.send_to(&guess, node.relay).is_ok() {
                sent[v] += guess.len() as u64;
            }
        }
        round += 1;
        std::thread::sleep(Duration::from_millis(20));
        for (g, d) in got.iter_mut().zip(drain(&victims)) {
            *g += d;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for (g, d) in got.iter_mut().zip(drain(&victims)) {
        *g += d;
    }
    stop.store(true, Ordering::Relaxed);
    exit_thread.join().unwrap();
    reflector_thread.join().unwrap();
    let m = node.settled_metrics();
    let total_sent: u64 = sent.iter().sum();
    let total_got: u64 = got.iter().sum();
    let total_handshake: u64 = handshake_bytes.iter().sum();
    let worst = sent
        .iter()
        .zip(&got)
        .map(|(s, g)| *g as f64 / *s as f64)
        .fold(0.0, f64::max);
    report(
        "amplification",
        json!({
            "victims": victims.len(), "secs": phase().as_secs_f64(), "bytes_sent_as_victims": total_sent,
            "bytes_received_by_victims": total_got, "ratio": total_got as f64 / total_sent as f64,
            "worst_victim_ratio": worst,
            "initiation_bytes_sent_as_victims": total_handshake,
            "ratio_to_initiation_bytes": total_got as f64 / total_handshake as f64, "exit_answers": exits_answered.load(Ordering::Relaxed),
            "reflector_bytes_sent": reflected.load(Ordering::Relaxed),
            "drops": drops_by_reason(&m),
            "amplification_limit_drops": m.drops(DropReason::AmplificationLimit),
            "packets_to_victims": m.get("wraithgate_packets_to_client_total"),
        }),
    );
    assert!(
        total_got > 0,
        "the exits answered no victim: the test measured nothing"
    );
    assert!(
        m.drops(DropReason::AmplificationLimit) > 0,
        "the reflector was never capped"
    );
    for (v, (s, g)) in handshake_bytes.iter().zip(&got).enumerate() {
        assert!(
            g <= s,
            "victim {v} got {g} bytes for {s} initiation bytes sent in its name"
        );
    }
}

/// Drop counters that are not zero, by reason.
fn drops_by_reason(m: &Metrics) -> Value {
    let by: serde_json::Map<String, Value> = DropReason::ALL
        .iter()
        .filter(|r| m.drops(**r) > 0)
        .map(|r| (r.as_str().to_owned(), json!(m.drops(*r))))
        .collect();
    Value::Object(by)
}

fn honest_key(e: &ExitConf) -> boringtun::x25519::PublicKey {
    boringtun::x25519::PublicKey::from(e.key.0)
}

/// Mixed load with sessions coming and going: real clients handshake, talk and vanish; a
/// handshake flood and garbage run beside them. Resident memory and open descriptors are
/// sampled throughout (the curve goes to the report); the flood keeps the relay under
/// load, so every new client gets in through a cookie challenge. Once the load stops and
/// the sessions expire, descriptors are back where they started and memory has not crept.
#[test]
fn adversarial_soak_with_sessions_coming_and_going_keeps_memory_and_fds_flat() {
    let _serial = serial();
    soak(false);
}

/// The soak above with every role of a node at once: beside the DoubleHop clients coming
/// and going, the handshake flood and the garbage, [`ZHOP_PEERS`] Z-HOP peers send through
/// their outer tunnels to an exit, which answers, and [`EXIT_PEERS`] Exit peers' tunnels end
/// on the node's TUN device, where a UDP echo service answers them, all of them all the
/// time (paced, both ways). Needs root for the TUN device, and runs in a network namespace
/// of its own (so its loopback and its TUN device are the test's alone); skips loudly
/// without root. At the end every Z-HOP and Exit peer still carries traffic (most of what
/// it sent arrived, over the whole soak and in a last window once the load stopped) and,
/// once the peers are removed and the sessions expire, descriptors are back where they
/// started and memory has not crept.
#[test]
fn netns_adversarial_soak_with_every_role_keeps_memory_fds_and_peers_healthy() {
    let test = "netns_adversarial_soak_with_every_role_keeps_memory_fds_and_peers_healthy";
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("WRAITHGATE_REQUIRE_ALL_TESTS").is_none(),
            "{test} cannot run: it needs root (a TUN device, a network namespace); \
             WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping"
        );
        eprintln!("\n*** SKIPPED {test}: it needs root (a TUN device, a network namespace) ***\n");
        return;
    }
    let _serial = serial();
    let soaked = std::thread::spawn(|| {
        enter_a_network_namespace_of_its_own();
        soak(true);
    })
    .join();
    if let Err(panic) = soaked {
        std::panic::resume_unwind(panic);
    }
}

/// Moves the calling thread (and the threads and processes it starts from then on) into a
/// new network namespace with its loopback up.
fn enter_a_network_namespace_of_its_own() {
    // SAFETY: unshare takes no pointer; CLONE_NEWNET changes only this thread's namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("running ip");
    assert!(up.success(), "ip link set lo up: {up}");
}

/// Z-HOP peers of the every-role soak, and Exit peers.
const ZHOP_PEERS: usize = 2;
const EXIT_PEERS: usize = 2;
/// Packets per second each of them sends, of [`PEER_PACKET`] bytes.
const PEER_PPS: f64 = 100.0;
const PEER_PACKET: usize = 600;
/// The node's TUN device in the every-role soak, and its address: the Exit peers' far end.
const TUN_SECTION: &str = "\n[tun]\nname = \"wgsoak0\"\naddresses = [\"10.99.0.1/24\"]\n";
const TUN_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const ECHO_PORT: u16 = 7000;

/// What a peer of the every-role soak carried: over the whole soak, and in the last window
/// (one second once the rest of the load has stopped).
#[derive(Debug, Clone, Copy, Default)]
struct PeerHealth {
    sent: u64,
    delivered: u64,
    last_sent: u64,
    last_delivered: u64,
}

impl PeerHealth {
    /// Most of what it sent arrived, over the soak and at its end (the machine is shared,
    /// so a packet or two late is not a failure of the node).
    fn healthy(&self) -> bool {
        self.sent > 0
            && self.delivered as f64 >= 0.8 * self.sent as f64
            && self.last_sent > 0
            && self.last_delivered as f64 >= 0.8 * self.last_sent as f64
    }

    fn json(&self) -> Value {
        json!({ "sent": self.sent, "delivered": self.delivered, "last_sent": self.last_sent,
                "last_delivered": self.last_delivered })
    }
}

/// A set of peers driven together by [`drive_peers`].
trait PeerSet {
    fn len(&self) -> usize;
    /// Sends peer `i`'s next packet; whether it went.
    fn send(&mut self, i: usize) -> bool;
    /// Receives what waits, adding what reached its far end to `delivered[peer]`.
    fn receive(&mut self, delivered: &mut [u64]);
    fn tick(&mut self);
}

/// Sends [`PEER_PPS`] packets per second from each peer of `set` until `stop`, then for a
/// last window of one second, and counts what arrives.
fn drive_peers(mut set: impl PeerSet, stop: &AtomicBool) -> Vec<PeerHealth> {
    let n = set.len();
    let mut health = vec![PeerHealth::default(); n];
    let mut delivered = vec![0u64; n];
    let mut last_window: Option<(Instant, Vec<u64>)> = None;
    let start = Instant::now();
    let mut last_tick = start;
    let mut sent_rounds = 0u64;
    loop {
        let due = (start.elapsed().as_secs_f64() * PEER_PPS) as u64;
        while sent_rounds < due {
            for (i, h) in health.iter_mut().enumerate() {
                if set.send(i) {
                    h.sent += 1;
                    if last_window.is_some() {
                        h.last_sent += 1;
                    }
                }
            }
            sent_rounds += 1;
        }
        set.receive(&mut delivered);
        if last_tick.elapsed() >= Duration::from_millis(100) {
            set.tick();
            last_tick = Instant::now();
        }
        match &last_window {
            None if stop.load(Ordering::Relaxed) => {
                last_window = Some((Instant::now(), delivered.clone()));
            }
            Some((since, _)) if since.elapsed() >= Duration::from_secs(1) => break,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Stragglers still in flight (a loaded machine delays them).
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        set.receive(&mut delivered);
        std::thread::sleep(Duration::from_millis(1));
    }
    let (_, at_window) = last_window.expect("the loop ends in the last window");
    for (i, h) in health.iter_mut().enumerate() {
        h.delivered = delivered[i];
        h.last_delivered = delivered[i] - at_window[i];
    }
    health
}

/// How many decrypted packets `try_recv` hands over before nothing waits (control messages
/// are handled on the way).
fn packets_waiting(mut try_recv: impl FnMut() -> std::io::Result<Option<Received>>) -> u64 {
    let mut n = 0;
    while let Ok(Some(r)) = try_recv() {
        if matches!(r, Received::Packet { .. }) {
            n += 1;
        }
    }
    n
}

/// Z-HOP peers: each a client with an outer tunnel to the node and an inner one, through
/// it, to one exit (a boringtun endpoint the node forwards to), which answers every packet
/// with one of the same size; a packet counts as delivered when its answer is back.
struct ZhopPeers {
    clients: Vec<ZhopClient>,
    exit: WgNode,
    /// The exit's peer index of each client's inner tunnel.
    exit_peer: Vec<usize>,
    packets: Vec<Vec<u8>>,
    /// What the exit answers each client with.
    replies: Vec<Vec<u8>>,
}

impl PeerSet for ZhopPeers {
    fn len(&self) -> usize {
        self.clients.len()
    }
    fn send(&mut self, i: usize) -> bool {
        self.clients[i].send_ip(&self.packets[i]).is_ok()
    }
    fn receive(&mut self, delivered: &mut [u64]) {
        while let Ok(Some(r)) = self.exit.try_recv() {
            if let Received::Packet { peer, .. } = r {
                if let Some(i) = self.exit_peer.iter().position(|&p| p == peer) {
                    let _ = self.exit.send_ip(peer, &self.replies[i]);
                }
            }
        }
        for (i, c) in self.clients.iter_mut().enumerate() {
            delivered[i] += packets_waiting(|| c.try_recv());
        }
    }
    fn tick(&mut self) {
        for c in &mut self.clients {
            c.tick();
        }
        self.exit.tick();
    }
}

/// Exit peers: boringtun clients whose tunnels end at the node, each sending to the echo
/// service on the node's TUN address and counting the echoes.
struct ExitPeers {
    clients: Vec<WgNode>,
    packets: Vec<Vec<u8>>,
}

impl PeerSet for ExitPeers {
    fn len(&self) -> usize {
        self.clients.len()
    }
    fn send(&mut self, i: usize) -> bool {
        self.clients[i].send_ip(0, &self.packets[i]).is_ok()
    }
    fn receive(&mut self, delivered: &mut [u64]) {
        for (i, c) in self.clients.iter_mut().enumerate() {
            delivered[i] += packets_waiting(|| c.try_recv());
        }
    }
    fn tick(&mut self) {
        for c in &mut self.clients {
            c.tick();
        }
    }
}

/// The Z-HOP and Exit peers of the every-role soak, provisioned on the node and carrying
/// traffic on threads of their own.
struct RolePeers {
    /// Their public keys, to remove them at the end.
    keys: Vec<PublicKey>,
    zhop: std::thread::JoinHandle<Vec<PeerHealth>>,
    exit: std::thread::JoinHandle<Vec<PeerHealth>>,
    echo_stop: Arc<AtomicBool>,
    echo: std::thread::JoinHandle<u64>,
}

impl RolePeers {
    /// Provisions the peers through the API (Z-HOP ones allowed to `zexit`, which the node
    /// has as an exit) and starts their traffic, which runs until `stop` and a last window.
    fn start(node: &Node, zexit: WgNode, stop: &Arc<AtomicBool>) -> RolePeers {
        let info: Value = serde_json::from_str(&node.get("/v1/node")).unwrap();
        let node_key = PublicKey::from_base64(info["public_key"].as_str().expect("node key"))
            .expect("the node's key");
        let node_key = boringtun::x25519::PublicKey::from(node_key.0);
        let mut keys = Vec::new();

        let mut zhop = ZhopPeers {
            clients: Vec::new(),
            exit: zexit,
            exit_peer: Vec::new(),
            packets: Vec::new(),
            replies: Vec::new(),
        };
        let zexit_key = zhop.exit.keys().relay_key();
        for i in 0..ZHOP_PEERS {
            let (outer, inner) = (KeyPair::generate(), KeyPair::generate());
            node.post(
                "/v1/peers",
                &json!({ "public_key": outer.relay_key().to_string(), "name": format!("zhop{i}"),
                         "allowed_ips": [format!("10.7.{i}.0/24")],
                         "allowed_exits": [zexit_key.to_string()] }),
            );
            keys.push(outer.relay_key());
            zhop.exit_peer
                .push(zhop.exit.add_peer(inner.public, PeerOptions::default()));
            zhop.clients.push(
                ZhopClient::new(
                    outer,
                    inner,
                    node.relay,
                    node_key,
                    zhop.exit.keys().public,
                    zhop.exit.local_addr(),
                    SocketAddr::from((Ipv4Addr::new(10, 7, i as u8, 2), 40000)),
                )
                .unwrap(),
            );
            let (s, d) = tunnel_addrs(i as u8 + 1);
            zhop.packets
                .push(ipv4_udp(s, d, 40000, 9, &[0x5a; PEER_PACKET - 28]));
            zhop.replies
                .push(ipv4_udp(d, s, 9, 40000, &[0xa5; PEER_PACKET - 28]));
        }

        let echo_socket = UdpSocket::bind((TUN_IP, ECHO_PORT)).expect("binding on the TUN address");
        echo_socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut exits = ExitPeers {
            clients: Vec::new(),
            packets: Vec::new(),
        };
        for i in 0..EXIT_PEERS {
            let keys_i = KeyPair::generate();
            let tunnel_ip = Ipv4Addr::new(10, 99, 0, 10 + i as u8);
            node.post(
                "/v1/peers",
                &json!({ "public_key": keys_i.relay_key().to_string(), "name": format!("exit{i}"),
                         "allowed_ips": [format!("{tunnel_ip}/32")] }),
            );
            keys.push(keys_i.relay_key());
            let mut c = WgNode::bind(any_loopback(), keys_i).unwrap();
            c.add_peer(
                node_key,
                PeerOptions {
                    endpoint: Some(node.relay),
                    ..Default::default()
                },
            );
            exits.clients.push(c);
            exits.packets.push(ipv4_udp(
                tunnel_ip,
                TUN_IP,
                5000,
                ECHO_PORT,
                &[0xa5; PEER_PACKET - 28],
            ));
        }

        let echo_stop = Arc::new(AtomicBool::new(false));
        let echo = {
            let stop = echo_stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                let mut echoed = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = echo_socket.recv_from(&mut buf) {
                        if echo_socket.send_to(&buf[..n], from).is_ok() {
                            echoed += 1;
                        }
                    }
                }
                echoed
            })
        };
        let zhop = {
            let stop = stop.clone();
            std::thread::spawn(move || drive_peers(zhop, &stop))
        };
        let exit = {
            let stop = stop.clone();
            std::thread::spawn(move || drive_peers(exits, &stop))
        };
        RolePeers {
            keys,
            zhop,
            exit,
            echo_stop,
            echo,
        }
    }

    /// Waits for the peers' last window, removes them from the node, and says how each
    /// fared: (Z-HOP peers, Exit peers, datagrams echoed).
    fn finish(self, node: &Node) -> (Vec<PeerHealth>, Vec<PeerHealth>, u64) {
        let zhop = self.zhop.join().unwrap();
        let exit = self.exit.join().unwrap();
        self.echo_stop.store(true, Ordering::Relaxed);
        let echoed = self.echo.join().unwrap();
        for k in &self.keys {
            // base64url, as the API takes a key in a path.
            let key = k.to_string().replace('+', "-").replace('/', "_");
            node.delete(&format!("/v1/peers/{key}"));
        }
        (zhop, exit, echoed)
    }
}

/// The soak, with the Z-HOP and Exit roles too when `every_role` (in a network namespace
/// of the caller's, as root).
fn soak(every_role: bool) {
    let soak = env_secs("WRAITHGATE_SOAK_SECS", 30.0);
    let exit = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let decoy = Decoy::start("decoy", 0xD2);
    let zexit = every_role.then(|| WgNode::bind(any_loopback(), KeyPair::generate()).unwrap());
    let mut exits = vec![exit_conf("exit", &exit), decoy.conf.clone()];
    exits.extend(zexit.as_ref().map(|z| exit_conf("zexit", z)));
    let node = Node::start_with(
        "soak",
        &exits,
        2,
        // The flood's 256 sources are more than the load mark (half of 2 × 128 pending), so
        // the relay stays under load and every new client is challenged with a cookie first.
        "max_sessions = 1024\nmax_pending = 128\npending_timeout_secs = 2\nidle_timeout_secs = 5",
        if every_role { TUN_SECTION } else { "" },
    );
    let base_fds = node.fds_started();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let roles = zexit.map(|z| RolePeers::start(&node, z, &stop));
    let flooder = flood(
        sources(60, 256),
        node.relay,
        decoy.conf.key,
        2_000.0,
        stop.clone(),
    );
    let garbage = {
        let (stop, relay) = (stop.clone(), node.relay);
        std::thread::spawn(move || {
            use rand::Rng as _;
            let srcs = sources(61, 64);
            let mut r = rand::thread_rng();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..20 {
                    let len = r.gen_range(0..1500);
                    let mut p: Vec<u8> = (0..len).map(|_| r.gen()).collect();
                    if len >= 32 && r.gen_bool(0.5) {
                        p[..4].copy_from_slice(&[r.gen_range(1..=4), 0, 0, 0]);
                    }
                    let _ = srcs[(n % 64) as usize].send_to(&p, relay);
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        })
    };
    // Clients come and go: each handshakes, sends for a while, then disappears.
    let churn = {
        let (stop, relay) = (stop.clone(), node.relay);
        std::thread::spawn(move || {
            let mut exit = exit;
            let (mut clients, mut healthy, mut failed) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let mut t = Tunnel::establish(relay, exit, any_loopback());
                let d = t.run(Duration::from_millis(700), Some(300.0), 600);
                clients += 1;
                // Healthy: most of what it sent arrived while it lived (the machine is shared,
                // so a packet or two late is not a failure of the relay).
                if d.delivered as f64 >= 0.8 * d.sent as f64 {
                    healthy += 1;
                } else {
                    failed += 1;
                }
                exit = t.exit;
            }
            (clients, healthy, failed)
        })
    };
    let mut samples = Samples::default();
    let mut sessions_curve = Vec::new();
    let every = if soak > Duration::from_secs(60) {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(1)
    };
    while started.elapsed() < soak {
        std::thread::sleep(every);
        samples.take(&node, started);
        let m = node.metrics();
        sessions_curve.push(json!([
            (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            m.get("wraithgate_sessions"),
            m.get("wraithgate_sessions_pending")
        ]));
    }
    stop.store(true, Ordering::Relaxed);
    let (srcs, flood_sent) = flooder.join().unwrap();
    let garbage_sent = garbage.join().unwrap();
    let (clients, healthy, failed) = churn.join().unwrap();
    drop(srcs);
    let peers = roles.map(|r| r.finish(&node));
    // Everything expires: pending after 2 s, idle after 5 s.
    std::thread::sleep(Duration::from_secs(7));
    let end = node.settled_metrics();
    samples.take(&node, started);
    let warm = samples.0[samples.0.len() / 5].1;
    let fds_end = node.fds_settled(base_fds);
    let last = samples.0.last().unwrap().1;
    // Flat while the load lasted: no more descriptors in its last third than in its first
    // (after warm-up), bar a few sessions' worth (clients come and go).
    let during = &samples.0[..samples.0.len() - 1];
    let third = during.len() / 3;
    let max_fds = |s: &[(f64, u64, usize)]| s.iter().map(|x| x.2).max().unwrap_or(0);
    let (fds_early, fds_late) = (
        max_fds(&during[during.len() / 5..(during.len() / 5).max(third)]),
        max_fds(&during[during.len() - third..]),
    );
    let mut figures = json!({
        "secs": soak.as_secs_f64(), "clients": clients, "clients_healthy": healthy,
        "clients_failed": failed, "flood_sent": flood_sent.iter().sum::<u64>(),
        "garbage_sent": garbage_sent, "fds_base": base_fds, "fds_end": fds_end,
        "rss_kib_after_warmup": warm, "rss_kib_end": last, "rss_kib_max": samples.max_rss(),
        "sessions_end": end.get("wraithgate_sessions"),
        "fds_max_early": fds_early, "fds_max_late": fds_late,
        "rss_kib_fds": samples.json(), "sessions_pending": sessions_curve,
    });
    if let Some((z, x, echoed)) = &peers {
        figures["peers"] = json!({ "zhop": z.iter().map(PeerHealth::json).collect::<Vec<_>>(),
            "exit": x.iter().map(PeerHealth::json).collect::<Vec<_>>(), "echoed": echoed });
        for (key, metric) in [
            (
                "zhop_packets_to_exit",
                "wraithgate_zhop_packets_to_exit_total",
            ),
            (
                "zhop_packets_to_peer",
                "wraithgate_zhop_packets_to_peer_total",
            ),
            (
                "exit_tun_packets_written",
                "wraithgate_exit_tun_packets_written_total",
            ),
            (
                "exit_tun_packets_read",
                "wraithgate_exit_tun_packets_read_total",
            ),
        ] {
            figures[key] = json!(end.get(metric));
        }
    }
    report(
        if every_role {
            "soak_every_role"
        } else {
            "soak"
        },
        figures,
    );
    assert!(
        clients >= 3 && failed * 10 <= clients,
        "{failed} of {clients} clients failed"
    );
    assert_eq!(end.get("wraithgate_sessions"), 0);
    assert!(
        fds_end <= base_fds,
        "descriptors leaked: {fds_end} at the end, {base_fds} at the start: {:?}",
        node.fd_list()
    );
    assert!(
        last <= warm + 16 * 1024,
        "RSS crept from {warm} KiB after warm-up to {last} KiB"
    );
    assert!(
        fds_late <= fds_early + 32,
        "descriptors grew during the soak: at most {fds_early} early, {fds_late} late: {}",
        samples.json()
    );
    if let Some((zhop, exit, echoed)) = peers {
        // What the peers saw went through the node's roles, by its own counters.
        let delivered = |h: &[PeerHealth]| h.iter().map(|p| p.delivered).sum::<u64>();
        assert!(
            end.get("wraithgate_zhop_packets_to_exit_total") >= delivered(&zhop)
                && end.get("wraithgate_zhop_packets_to_peer_total") >= delivered(&zhop)
                && end.get("wraithgate_exit_tun_packets_written_total") >= echoed
                && end.get("wraithgate_exit_tun_packets_read_total") >= delivered(&exit),
            "the node's Z-HOP and TUN counters do not account for the peers' traffic: {:?}",
            end.0
        );
        assert_eq!(
            end.get("wraithgate_zhop_peers"),
            0,
            "removed peers still held"
        );
        for (role, health) in [("Z-HOP", zhop), ("Exit", exit)] {
            assert!(
                health.iter().all(PeerHealth::healthy),
                "{role} peers unhealthy: {health:?}"
            );
        }
    }
}
