//! `wraithgate`: the relay node.

// The doc comments here are the command's --help, where `[section] key` names a setting
// of the configuration file, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{reload, EnvFilter, Registry};
use wraithgate_control::config::{changed_settings, Config, EXAMPLE, LIVE_SETTINGS};
use wraithgate_control::demo::{self, DemoOptions};
use wraithgate_control::node::Node;
use wraithgate_relay::io::BackendChoice;

/// WraithGate: a userspace WireGuard relay.
///
/// Clients keep their WireGuard tunnel to an exit server; the relay sits between them and
/// forwards the encrypted packets without holding any client key. It picks the exit for
/// each client by the exit's public key (mac1) or by a listen port pinned to an exit.
///
/// The node keeps its exits in <state_dir>/state.json (default /var/lib/wraithgate) and
/// serves an operator API on 127.0.0.1:7070; its bearer token is created (mode 0600) in
/// <state_dir>/api.token on first start. `wraithctl` drives that API.
#[derive(Debug, Parser)]
#[command(name = "wraithgate", version, about, long_about)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. "info" or "wraithgate_relay=debug".
    /// Overrides the configuration's [log] filter; "info" when neither says.
    #[arg(long, env = "WRAITHGATE_LOG", global = true)]
    log: Option<String>,
    /// Log lines as text (for people) or as JSON objects, one a line (for collectors).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a relay node from a configuration file.
    Run {
        /// The TOML configuration (see `wraithgate example-config`).
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads (overrides the file); one per core by default.
        #[arg(long)]
        workers: Option<usize>,
        /// Data-path backend (overrides the file).
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        /// Check the configuration and exit without starting.
        #[arg(long)]
        check: bool,
        /// Directory for state.json, sessions.json and the API token (overrides the file;
        /// default /var/lib/wraithgate).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Operator API address (overrides the file; default 127.0.0.1:7070).
        #[arg(long)]
        api_listen: Option<std::net::SocketAddr>,
        /// Do not serve the operator API.
        #[arg(long)]
        no_api: bool,
    },
    /// Run a self-contained demo on loopback: a relay, two exits and several WireGuard
    /// clients (boringtun), with traffic both ways; prints a table and exits.
    Demo {
        /// Number of clients (even ones use exit A, odd ones exit B).
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds of traffic.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Paced rate of each client, Mb/s.
        #[arg(long, default_value_t = 50.0)]
        rate_mbps: f64,
        /// Relay worker threads.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Data-path backend of the relay.
        #[arg(long, value_enum, default_value = "auto")]
        backend: Backend,
    },
    /// Print a commented example configuration.
    ExampleConfig,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell), e.g.
    /// `wraithgate completions bash > /etc/bash_completion.d/wraithgate`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), or with --out-dir write one page per command there.
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `auto` picks io_uring where the kernel allows it and says in the log why not otherwise;
/// `uring` refuses to start without it.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Backend {
    Auto,
    Uring,
    Portable,
}

impl From<Backend> for BackendChoice {
    fn from(b: Backend) -> Self {
        match b {
            Backend::Auto => BackendChoice::Auto,
            Backend::Uring => BackendChoice::Uring,
            Backend::Portable => BackendChoice::Portable,
        }
    }
}

/// The log filter in use, changed when the configuration's changes (SIGHUP).
struct LogFilter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// Given by `--log` or `WRAITHGATE_LOG`: then the file's filter is not used.
    from_command_line: bool,
}

impl LogFilter {
    /// Uses the file's filter, unless the command line gave one.
    fn follow(&self, file: Option<&str>) -> Result<()> {
        if self.from_command_line {
            return Ok(());
        }
        let filter = EnvFilter::try_new(file.unwrap_or("info"))?;
        self.handle
            .reload(filter)
            .context("changing the log filter")?;
        tracing::debug!(filter = file.unwrap_or("info"), "log filter in use");
        Ok(())
    }
}

fn main() {
    let cli = Cli::parse();
    let filter = match EnvFilter::try_new(cli.log.as_deref().unwrap_or("info")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "wraithgate: error: --log {:?} is not a log filter: {e}",
                cli.log.as_deref().unwrap_or_default()
            );
            std::process::exit(2);
        }
    };
    let (filter, handle) = reload::Layer::new(filter);
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Escape codes only for a person at a terminal, never into a journal or file.
        .with_ansi(std::io::stderr().is_terminal());
    let logs = tracing_subscriber::registry().with(filter);
    match cli.log_format {
        LogFormat::Text => logs.with(lines).init(),
        LogFormat::Json => logs.with(lines.json()).init(),
    }
    let log = LogFilter {
        handle,
        from_command_line: cli.log.is_some(),
    };
    if let Err(e) = real_main(cli, &log) {
        eprintln!("wraithgate: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli, log: &LogFilter) -> Result<()> {
    match cli.command {
        Cmd::Run {
            config,
            workers,
            backend,
            check,
            state_dir,
            api_listen,
            no_api,
        } => run(RunArgs {
            path: config,
            workers,
            backend,
            check,
            state_dir,
            api_listen,
            no_api,
            log,
        }),
        Cmd::Demo {
            clients,
            seconds,
            rate_mbps,
            workers,
            json,
            backend,
        } => {
            if clients == 0 || clients > 200 {
                bail!("--clients must be between 1 and 200");
            }
            if !(seconds > 0.0 && seconds <= 600.0) {
                bail!("--seconds must be between 0 and 600");
            }
            if !(rate_mbps > 0.0 && rate_mbps <= 10_000.0) {
                bail!("--rate-mbps must be between 0 and 10000");
            }
            let opts = DemoOptions {
                clients,
                duration: Duration::from_secs_f64(seconds),
                rate_mbps,
                workers: workers.max(1),
                backend: backend.into(),
                ..DemoOptions::default()
            };
            let report = demo::run(&opts)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", demo::render(&report));
            }
            let delivered: u64 = report.clients.iter().map(|c| c.echoed_back).sum();
            if delivered == 0 {
                bail!("no traffic made it through the relay");
            }
            Ok(())
        }
        Cmd::ExampleConfig => {
            print!("{EXAMPLE}");
            Ok(())
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "wraithgate", &mut std::io::stdout());
            Ok(())
        }
        Cmd::Man { out_dir } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match out_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    clap_mangen::generate_to(cmd, &dir)
                        .with_context(|| format!("writing manual pages to {}", dir.display()))
                }
                None => Ok(clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?),
            }
        }
    }
}

struct RunArgs<'a> {
    path: PathBuf,
    workers: Option<usize>,
    backend: Option<Backend>,
    check: bool,
    state_dir: Option<PathBuf>,
    api_listen: Option<std::net::SocketAddr>,
    no_api: bool,
    log: &'a LogFilter,
}

fn run(args: RunArgs<'_>) -> Result<()> {
    let RunArgs {
        path,
        workers,
        backend,
        check,
        state_dir,
        api_listen,
        no_api,
        log,
    } = args;
    // From the start: a SIGHUP while starting must not kill the node either.
    let hup = Arc::new(AtomicBool::new(false));
    signal_hook_register(libc::SIGHUP, hup.clone())?;
    let started_text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut cfg = Config::load(&path)?;
    if let Some(d) = state_dir {
        cfg.control.state_dir = d;
    }
    if let Some(a) = api_listen {
        cfg.control.api_listen = Some(a);
    }
    if no_api {
        cfg.control.api_enabled = false;
    }
    if let Some(w) = workers {
        if w == 0 {
            bail!("--workers must be at least 1");
        }
        cfg.data_plane.workers = w;
    }
    if let Some(b) = backend {
        cfg.data_plane.backend = b.into();
    }
    if check {
        println!(
            "{}: OK ({} exits, {} listen addresses, {} workers)",
            path.display(),
            cfg.table.len(),
            cfg.data_plane.listen.len(),
            cfg.data_plane.workers
        );
        return Ok(());
    }
    log.follow(cfg.log.filter.as_deref())?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        signal_hook_register(sig, stop.clone())?;
    }
    let mut node = Node::start(cfg)?;
    {
        let table = node.control.dp.table();
        for e in table.specs() {
            tracing::info!(name = %e.name, key = %e.public_key, endpoint = %e.endpoint, listen_port = ?e.listen_port, "exit");
        }
    }
    if let Some(path) = &node.token_path {
        eprintln!("wraithgate: operator API token in {}", path.display());
    }
    tracing::info!(listen = ?node.control.dp.local_addrs(), backend = node.control.dp.backend(),
        api = ?node.api_addr(), "relay running; SIGTERM or Ctrl-C stops it, SIGHUP reloads the configuration");
    let mut applied_text = started_text.clone();
    let mut service = Service::new();
    service.ready();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if hup.swap(false, Ordering::Relaxed) {
            service.reloading();
            reload(&path, &started_text, &mut applied_text, log);
            service.ready();
        }
        node.supervise_sidecar(std::time::Instant::now());
        node.supervise_pinned_ports(std::time::Instant::now());
        service.watchdog(&node);
    }
    service.stopping();
    let s = node.control.dp.stats();
    let mut io = wraithgate_relay::io::IoStats::default();
    for r in node.control.dp.reports() {
        io.merge(&r.io);
    }
    // The reasons behind `drops`, those that happened only: "no_session=3 bad_length=1".
    let drops_by_reason = wraithgate_relay::DropReason::ALL
        .iter()
        .filter(|r| s.dropped(**r) > 0)
        .map(|r| format!("{}={}", r.as_str(), s.dropped(*r)))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(
        backend = node.control.dp.backend(),
        to_exit_packets = s.client_to_exit.packets,
        to_client_packets = s.exit_to_client.packets,
        drops = s.total_drops(),
        drops_by_reason,
        worker_cpu_seconds = io.cpu_ns as f64 / 1e9,
        send_calls = io.send_calls,
        gso_sends = io.gso_sends,
        gso_fallbacks = io.gso_fallbacks,
        ring_enters = io.ring_enters,
        ring_starved = io.ring_starved,
        zhop_trains_sent = io.zhop_trains_sent,
        zhop_segments_in_trains = io.zhop_segments_in_trains,
        zhop_unbatched = io.zhop_unbatched,
        "stopping"
    );
    node.stop();
    Ok(())
}

/// What the node tells systemd (`Type=notify`; nothing without `NOTIFY_SOCKET`): ready once
/// it forwards, reloading around a SIGHUP, stopping; and, when the unit sets `WatchdogSec=`,
/// a watchdog ping every half period while every worker keeps publishing and the operator
/// API's thread runs. A stalled worker or a dead sidecar withholds the ping, so systemd
/// restarts the node.
struct Service {
    watchdog: Option<Duration>,
    last_ping: std::time::Instant,
    /// What was last said about withholding the ping, not to repeat it every 100 ms.
    withheld: Option<String>,
}

impl Service {
    fn new() -> Service {
        Service {
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: std::time::Instant::now(),
            withheld: None,
        }
    }

    fn notify(&self, state: &[sd_notify::NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(state) {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
    }

    fn ready(&self) {
        self.notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("forwarding"),
        ]);
    }

    fn reloading(&self) {
        let mut state = vec![sd_notify::NotifyState::Reloading];
        // systemd 253+ wants the time of the reload with it.
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            state.push(now);
        }
        self.notify(&state);
    }

    fn stopping(&self) {
        self.notify(&[sd_notify::NotifyState::Stopping]);
    }

    fn watchdog(&mut self, node: &Node) {
        let Some(period) = self.watchdog else { return };
        if self.last_ping.elapsed() < period / 2 {
            return;
        }
        let health = node.control.health();
        let problem = if !health.stalled.is_empty() {
            Some(format!("worker {:?} stalled", health.stalled))
        } else if node.sidecar_running() == Some(false) {
            Some("the operator API's thread died".to_string())
        } else {
            None
        };
        match problem {
            None => {
                if self.withheld.take().is_some() {
                    tracing::info!("healthy again; systemd watchdog pings resumed");
                }
                self.notify(&[sd_notify::NotifyState::Watchdog]);
                self.last_ping = std::time::Instant::now();
            }
            Some(p) => {
                if self.withheld.as_deref() != Some(p.as_str()) {
                    tracing::error!(problem = %p, watchdog_secs = period.as_secs_f64(),
                        "withholding the systemd watchdog ping: systemd restarts the node if this lasts");
                    self.withheld = Some(p);
                }
            }
        }
    }
}

/// SIGHUP: reads the configuration again. A file with an error is refused whole, with its
/// `file:line`, and the node runs on as it was. Otherwise what can change live does, and
/// one line names the settings that differ from those the node started with but wait for
/// a restart.
fn reload(path: &Path, started_text: &str, applied_text: &mut String, log: &LogFilter) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %format!("cannot read {}: {e}", path.display()),
                "configuration reload refused; the node runs on as it was");
            return;
        }
    };
    let cfg = match Config::parse(path, &text) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "configuration reload refused; the node runs on as it was");
            return;
        }
    };
    let live: Vec<String> = changed_settings(applied_text, &text)
        .into_iter()
        .filter(|k| LIVE_SETTINGS.contains(&k.as_str()))
        .collect();
    if live.iter().any(|k| k == "log.filter") {
        if log.from_command_line {
            tracing::warn!(
                "[log] filter changed in the file, but --log (or WRAITHGATE_LOG) overrides it"
            );
        } else if let Err(e) = log.follow(cfg.log.filter.as_deref()) {
            tracing::error!(error = %format!("{e:#}"), "configuration reload refused; the node runs on as it was");
            return;
        }
    }
    let waiting: Vec<String> = changed_settings(started_text, &text)
        .into_iter()
        .filter(|k| !LIVE_SETTINGS.contains(&k.as_str()))
        .collect();
    tracing::info!(path = %path.display(), applied = %live.join(", "), "configuration reloaded");
    if !waiting.is_empty() {
        tracing::warn!(
            settings = %waiting.join(", "),
            "changed in the file but not applied: they take effect at the next start \
             ([[exit]] entries only seed a new state; change exits through the API)"
        );
    }
    *applied_text = text;
}

/// Sets `flag` when `signal` arrives.
fn signal_hook_register(signal: libc::c_int, flag: Arc<AtomicBool>) -> Result<()> {
    signal_hook::flag::register(signal, flag).context("installing a signal handler")?;
    Ok(())
}
