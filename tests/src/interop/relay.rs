//! The `wraithgate` node in the relay namespace, driven the way an operator drives it: a
//! configuration file, the operator API with the bearer token from the state directory,
//! SIGTERM to stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::interop::RELAY_PORT;
use crate::netns::{log_tail, run, Daemon, Netns};

/// Where the operator API listens, inside the relay namespace.
pub const API_LISTEN: &str = "127.0.0.1:7070";
/// Longest a worker's counters lag behind its packets (see [`RelayNode::metrics`]).
const METRICS_SETTLE: Duration = Duration::from_millis(250);
/// Worker threads of the relay under test.
const WORKERS: &str = "2";

/// The `wraithgate` node binary (`$WRAITHGATE_BIN` overrides); see `workspace_bin`.
pub fn wraithgate_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        workspace_bin(
            "WRAITHGATE_BIN",
            "wraithgate-control",
            "wraithgate",
            &["relay", "control", "fastpath"],
        )
        .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The `wraithctl` operator tool (`$WRAITHCTL_BIN` overrides); see `workspace_bin`.
pub fn wraithctl_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        workspace_bin(
            "WRAITHCTL_BIN",
            "wraithctl",
            "wraithctl",
            &["tools/wraithctl"],
        )
        .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// A binary of this workspace: `$override_var` if set; else the one next to the running test
/// (same target directory and profile) if it is newer than every source it is built from
/// (`sources`, workspace-relative, plus the manifests and lock file), as after `cargo test
/// --workspace`, which builds it for its own package's tests; else built, once per test run,
/// with the same cargo, profile and target directory.
fn workspace_bin(
    override_var: &str,
    package: &str,
    name: &str,
    sources: &[&str],
) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os(override_var) {
        return Ok(PathBuf::from(bin));
    }
    // The test runs as <target>/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test binary is not in <target>/<profile>/deps")?;
    let target_dir = profile_dir
        .parent()
        .context("the test binary is not in <target>/<profile>/deps")?;
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .context("profile directory name")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate lives in the workspace")?;
    let bin = profile_dir.join(name);
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let mut inputs = vec![workspace.join("Cargo.toml"), workspace.join("Cargo.lock")];
    inputs.extend(sources.iter().map(|s| workspace.join(s)));
    let newest = newest_mtime(&inputs);
    if built.is_some_and(|b| newest.is_some_and(|s| s <= b)) {
        return Ok(bin);
    }
    // Select this package too, as `cargo test -p wraithgate-tests` does, so that features
    // unify the same way for the dependencies both builds share.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "wraithgate-tests", "-p", package])
        .args(["--bin", name, "--manifest-path"])
        .arg(workspace.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    eprintln!("interop: building {name} ({profile}) …");
    run(&mut cmd).with_context(|| format!("building {name}"))?;
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    Ok(bin)
}

/// The latest modification time of the given files and everything under the given
/// directories (but `target`).
fn newest_mtime(paths: &[PathBuf]) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if p.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(m) = meta.modified() {
            newest = newest.max(Some(m));
        }
    }
    newest
}

/// The relay node: configuration, state directory, process, operator API.
#[derive(Debug)]
pub struct RelayNode {
    ns: Arc<Netns>,
    dir: PathBuf,
    config: PathBuf,
    state_dir: PathBuf,
    process: Option<Daemon>,
    starts: u32,
    agent: ureq::Agent,
    token: Option<String>,
    /// A command the node is started through (`setpriv …`), empty for none.
    wrapper: Vec<String>,
}

/// How a start went.
#[derive(Debug, Clone, Copy)]
pub struct StartTimes {
    /// From spawning the process to its "relay running" log line.
    pub to_running: Duration,
}

impl RelayNode {
    /// Writes the configuration (no exits: they come through the API) and starts the node
    /// with data-path `backend` ("auto", "uring" or "portable").
    pub fn start(ns: Arc<Netns>, dir: &Path, backend: &str) -> Result<RelayNode> {
        Self::start_with(ns, dir, backend, "", "", "")
    }

    /// [`RelayNode::start`] with more `[relay]` settings (`relay_extra`, TOML lines; a
    /// `listen = […]` line there replaces the default, every IPv4 address on
    /// [`RELAY_PORT`]), a `[limits]` section (`limits`, TOML lines) and `extra` appended to
    /// the configuration file (a `[tun]` section, say).
    pub fn start_with(
        ns: Arc<Netns>,
        dir: &Path,
        backend: &str,
        relay_extra: &str,
        limits: &str,
        extra: &str,
    ) -> Result<RelayNode> {
        let config = dir.join("wraithgate.toml");
        let state_dir = dir.join("relay-state");
        // The lab shares its cores with wireguard-go, iperf3 and whatever else the machine
        // runs: a worker pinned to a core could not move off it when that core is busy.
        let listen = if relay_extra
            .lines()
            .any(|l| l.trim_start().starts_with("listen"))
        {
            String::new()
        } else {
            format!("listen = [\"0.0.0.0:{RELAY_PORT}\"]")
        };
        let toml = format!(
            r#"[relay]
{listen}
backend = "{backend}"
pin_workers = false
{relay_extra}

[limits]
{limits}

[control]
api_listen = "{API_LISTEN}"
state_dir = "{}"
"#,
            state_dir.display()
        );
        std::fs::write(&config, toml + extra)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut node = RelayNode {
            ns,
            dir: dir.to_owned(),
            config,
            state_dir,
            process: None,
            starts: 0,
            agent,
            token: None,
            wrapper: Vec::new(),
        };
        node.launch(true)?;
        Ok(node)
    }

    /// The data-path backend the running node chose, from its log.
    pub fn backend_in_use(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.log_path()).ok()?;
        let line = log.lines().find(|l| l.contains("relay running"))?;
        let rest = &line[line.find("backend=")? + "backend=".len()..];
        Some(rest.split_whitespace().next()?.trim_matches('"').to_owned())
    }

    pub fn ns(&self) -> &Arc<Netns> {
        &self.ns
    }

    /// The log of the current (or last) run.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("wraithgate-{}.log", self.starts))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path(), lines)
    }

    /// Starts the process and waits until it says it runs; with `api`, also until the API
    /// answers.
    pub fn launch(&mut self, api: bool) -> Result<StartTimes> {
        if self.process.is_some() {
            bail!("the relay already runs");
        }
        let bin = wraithgate_bin()?;
        self.starts += 1;
        let log = self.log_path();
        let started = Instant::now();
        let bin = bin.to_string_lossy().into_owned();
        let config = self.config.to_string_lossy().into_owned();
        let state = self.state_dir.to_string_lossy().into_owned();
        let mut args: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        args.extend([
            bin.as_str(),
            "run",
            "--config",
            &config,
            "--state-dir",
            &state,
            "--workers",
            WORKERS,
        ]);
        let mut daemon = self.ns.spawn(
            "wraithgate",
            args[0],
            &args[1..],
            &[("WRAITHGATE_LOG", "info"), ("NO_COLOR", "1")],
            &log,
        )?;
        let end = started + Duration::from_secs(20);
        let to_running = loop {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("relay running")
            {
                break started.elapsed();
            }
            if !daemon.is_running() {
                bail!("wraithgate exited at start:\n{}", log_tail(&log, 30));
            }
            if Instant::now() > end {
                bail!(
                    "wraithgate did not report running within 20 s:\n{}",
                    log_tail(&log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.process = Some(daemon);
        if api {
            self.token = Some(
                std::fs::read_to_string(self.state_dir.join("api.token"))
                    .context("reading the API token")?
                    .trim()
                    .to_owned(),
            );
            let end = Instant::now() + Duration::from_secs(10);
            while !self.api_answers() {
                if Instant::now() > end {
                    bail!("the operator API did not answer within 10 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(StartTimes { to_running })
    }

    /// SIGTERM, as an init system stops it; returns how long the node took to exit.
    pub fn stop(&mut self) -> Result<Duration> {
        let mut p = self.process.take().context("the relay does not run")?;
        let (status, took) = p
            .terminate(Duration::from_secs(15))
            .context("the relay had already exited")?;
        if !status.success() {
            bail!(
                "wraithgate exited with {status} on SIGTERM:\n{}",
                log_tail(&self.log_path(), 30)
            );
        }
        Ok(took)
    }

    /// Kills the node with SIGKILL: nothing of its own clean-up runs.
    pub fn kill9(&mut self) -> Result<()> {
        let mut p = self.process.take().context("the relay does not run")?;
        p.kill9();
        Ok(())
    }

    /// Starts the node through `wrapper` (say `setpriv --bounding-set=… --`) from the next
    /// [`RelayNode::launch`] on.
    pub fn set_wrapper(&mut self, wrapper: &[&str]) {
        self.wrapper = wrapper.iter().map(|s| (*s).to_owned()).collect();
    }

    /// CPU time the node has used so far, in seconds; 0 if it does not run.
    pub fn cpu_seconds(&self) -> f64 {
        self.process.as_ref().map_or(0.0, Daemon::cpu_seconds)
    }

    /// The node's resident memory now, KiB; `None` if it does not run.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.process.as_ref()?.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// Whether the node still runs.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(Daemon::is_running)
    }

    // ---- the operator API ----

    /// `GET path` from inside the relay namespace, with the token when the node has one.
    /// Reads that are not an operator's typing (health, Prometheus scrapes) go straight
    /// to the API; changes go through [`RelayNode::wraithctl`].
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("http://{API_LISTEN}{path}");
        let agent = self.agent.clone();
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        self.ns.run_in(move || {
            let mut r = agent.get(&url);
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            let r = r.call().with_context(|| format!("GET {url}"))?;
            let status = r.status().as_u16();
            let text = r.into_body().read_to_string().unwrap_or_default();
            Ok((status, text))
        })
    }

    pub fn get_ok(&self, path: &str) -> Result<String> {
        let (status, text) = self.get(path)?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}: {text}");
        }
        Ok(text)
    }

    /// `GET /healthz` with a deadline: whether the API answered at all.
    pub fn api_answers(&self) -> bool {
        matches!(self.get("/healthz"), Ok((200, _)))
    }

    /// `wraithctl args…` on the node, as root reads the token: what an operator types.
    /// Returns stdout.
    pub fn wraithctl(&self, args: &[&str]) -> Result<String> {
        let bin = wraithctl_bin()?;
        let token = self.state_dir.join("api.token");
        let mut cmd = self.ns.command(&bin.to_string_lossy());
        cmd.args(["--url", API_LISTEN, "--timeout", "10", "--token-file"])
            .arg(&token)
            .args(args);
        run(&mut cmd)
    }

    /// `wraithctl exit add NAME --public-key KEY --endpoint IP:PORT [--listen-port PORT]`.
    pub fn add_exit(
        &self,
        name: &str,
        public_key: &str,
        endpoint: SocketAddr,
        listen_port: Option<u16>,
    ) -> Result<()> {
        let endpoint = endpoint.to_string();
        let mut args = vec![
            "exit",
            "add",
            name,
            "--public-key",
            public_key,
            "--endpoint",
            &endpoint,
        ];
        let port = listen_port.map(|p| p.to_string());
        if let Some(p) = &port {
            args.extend(["--listen-port", p]);
        }
        self.wraithctl(&args).map(drop)
    }

    /// `wraithctl peer add KEY --allowed-ips CIDR,… --exit EXIT…`: provisions a Z-HOP peer
    /// (`POST /v1/peers`), whose outer tunnel this node then terminates.
    pub fn add_peer(&self, public_key: &str, allowed_ips: &[&str], exits: &[&str]) -> Result<()> {
        let ips = allowed_ips.join(",");
        let mut args = vec!["peer", "add", public_key, "--allowed-ips", &ips];
        for e in exits {
            args.extend(["--exit", e]);
        }
        self.wraithctl(&args).map(drop)
    }

    /// The node's own public key (`GET /v1/node`): what a Z-HOP peer's outer tunnel names
    /// as its peer.
    pub fn node_public_key(&self) -> Result<String> {
        let text = self.get_ok("/v1/node")?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing /v1/node: {text}"))?;
        v["public_key"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("/v1/node has no public_key: {text}"))
    }

    /// `wraithctl exit rm KEY`.
    pub fn remove_exit(&self, public_key: &str) -> Result<()> {
        self.wraithctl(&["exit", "rm", public_key]).map(drop)
    }

    /// `wraithctl --json sessions`: the node's sessions as `GET /v1/sessions` lists them.
    pub fn sessions(&self) -> Result<Vec<SessionView>> {
        let text = self.wraithctl(&["--json", "sessions"])?;
        serde_json::from_str(&text).with_context(|| format!("parsing sessions: {text}"))
    }

    /// `GET /metrics`, after waiting long enough for every worker to have published what
    /// it counted up to now (workers publish every 50 ms, an idle one when its 100 ms wait
    /// for packets ends).
    pub fn metrics(&self) -> Result<Metrics> {
        std::thread::sleep(METRICS_SETTLE);
        Ok(Metrics::parse(&self.get_ok("/metrics")?))
    }
}

/// A session as `GET /v1/sessions` lists it (the fields the suite reads).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SessionView {
    pub id: String,
    pub client: SocketAddr,
    pub exit: String,
    pub exit_key: String,
    pub listen_port: u16,
    pub established: bool,
    pub verified: bool,
    pub handshakes: u64,
    pub to_exit: TrafficView,
    pub to_client: TrafficView,
    #[serde(default)]
    pub fast_path: Option<FastPathView>,
}

/// A session's share of the kernel fast path, as `GET /v1/sessions` lists it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct FastPathView {
    pub offloaded: bool,
    pub to_exit: TrafficView,
    pub to_client: TrafficView,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub struct TrafficView {
    pub packets: u64,
    pub bytes: u64,
}

/// A Prometheus text exposition, sample by sample.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: Vec<(String, String, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let value: f64 = value.parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                Some((name.to_owned(), labels.to_owned(), value))
            })
            .collect();
        Metrics { samples }
    }

    /// The sum of `name` over every sample whose labels contain all of `labels`
    /// (`key="value"` pairs), e.g. summed over workers.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.split(',').any(|p| p == format!("{k}=\"{v}\"")))
            })
            .map(|(_, _, v)| *v as u64)
            .sum()
    }

    /// Drops by reason (summed over workers), the non-zero ones.
    pub fn drops(&self) -> Vec<(String, u64)> {
        let mut by: std::collections::BTreeMap<String, u64> = Default::default();
        for (n, l, v) in &self.samples {
            if n != "wraithgate_drops_total" {
                continue;
            }
            if let Some(reason) = l
                .split(',')
                .find_map(|p| p.strip_prefix("reason=\""))
                .map(|r| r.trim_end_matches('"'))
            {
                *by.entry(reason.to_owned()).or_default() += *v as u64;
            }
        }
        by.into_iter().filter(|(_, v)| *v > 0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_sum_over_workers_and_filter_by_label() {
        let m = Metrics::parse(
            "# HELP x y\nwraithgate_drops_total{worker=\"0\",reason=\"no_exit\"} 2\n\
             wraithgate_drops_total{worker=\"1\",reason=\"no_exit\"} 3\n\
             wraithgate_drops_total{worker=\"1\",reason=\"bad_length\"} 0\n\
             wraithgate_exits 2\n",
        );
        assert_eq!(m.sum("wraithgate_drops_total", &[("reason", "no_exit")]), 5);
        assert_eq!(m.sum("wraithgate_drops_total", &[]), 5);
        assert_eq!(m.sum("wraithgate_exits", &[]), 2);
        assert_eq!(m.drops(), vec![("no_exit".to_owned(), 5)]);
    }
}
