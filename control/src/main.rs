//! `wraithgate`: the relay node.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use wraithgate_control::config::{Config, EXAMPLE};
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
    #[arg(long, env = "WRAITHGATE_LOG", default_value = "info", global = true)]
    log: String,
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

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = real_main(cli) {
        eprintln!("wraithgate: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
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
    }
}

struct RunArgs {
    path: PathBuf,
    workers: Option<usize>,
    backend: Option<Backend>,
    check: bool,
    state_dir: Option<PathBuf>,
    api_listen: Option<std::net::SocketAddr>,
    no_api: bool,
}

fn run(args: RunArgs) -> Result<()> {
    let RunArgs {
        path,
        workers,
        backend,
        check,
        state_dir,
        api_listen,
        no_api,
    } = args;
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
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        signal_hook_register(sig, stop.clone())?;
    }
    let node = Node::start(cfg)?;
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
        api = ?node.api_addr(), "relay running; SIGTERM or Ctrl-C stops it");
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
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

/// Sets `flag` when `signal` arrives.
fn signal_hook_register(signal: libc::c_int, flag: Arc<AtomicBool>) -> Result<()> {
    signal_hook::flag::register(signal, flag).context("installing a signal handler")?;
    Ok(())
}
