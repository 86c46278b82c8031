//! `relay-bench`: WraithGate against nftables DNAT+SNAT, a naive tokio relay, socat and
//! nginx, side by side in one run with one generator and one topology (DESIGN §7).
//!
//! ```text
//! relay-bench --quick                       # < 5 min: every contender, every scenario
//! relay-bench --json out.json --svg out.svg # full run (3 runs each, medians)
//! relay-bench --zhop-only --zhop-perf       # Z-HOP against wireguard-go + kernel, profiled
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use wraithgate_bench::contender::{Contender, Running};
use wraithgate_bench::exitrole;
use wraithgate_bench::load::{self, LoadSpec};
use wraithgate_bench::packets;
use wraithgate_bench::report::{self, ContenderResult, Figures, Outcome, ScenarioResult};
use wraithgate_bench::topology::{self, Kind, Topology};
use wraithgate_bench::wgo;
use wraithgate_bench::zhop::{self, OuterEnd};
use wraithgate_relay::PublicKey;

#[derive(Debug, Parser)]
#[command(
    name = "relay-bench",
    about = "Side-by-side UDP relay benchmark for WraithGate"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Short runs (0.4 s warm-up, 1.5 s measured, 1 run each; Z-HOP TCP only): under 5
    /// minutes.
    #[arg(long)]
    quick: bool,
    /// Topologies: netns, loopback, host (host needs no root; nftables is skipped there).
    #[arg(long, value_delimiter = ',')]
    topology: Option<Vec<String>>,
    /// Contenders to run (default: all): `wraithgate-<backend>` for each of --backends,
    /// nftables, naive-tokio, socat, nginx, and direct (no relay at all: the generator
    /// sends to the sink, so its latency is the path's own floor).
    #[arg(long, value_delimiter = ',')]
    contenders: Option<Vec<String>>,
    /// WraithGate backends to run as contenders. `BACKEND@KEY=VALUE[@KEY=VALUE…]` adds
    /// `[relay]` settings, e.g. `portable@socket_buffer=1048576`, to compare variants of one
    /// backend side by side.
    #[arg(long, value_delimiter = ',', default_value = "portable,uring")]
    backends: Vec<String>,
    /// Scenarios to run (default: all): 1flow-1420B-unpaced, 1000flow-1420B-unpaced,
    /// 1flow-64B-unpaced, 1flow-1420B-paced, 1flow-1420B-paced-80pct-of-max (not in
    /// --quick; paced at 80 % of each contender's own 1flow-1420B-unpaced median).
    #[arg(long, value_delimiter = ',')]
    scenarios: Option<Vec<String>>,
    /// The `wraithgate` binary.
    #[arg(long, default_value = "target/release/wraithgate")]
    wraithgate: PathBuf,
    /// Also run this other `wraithgate` binary (one built from another commit, in a target
    /// directory of its own) with each backend, as contenders
    /// `wraithgate-<backend>-<--wraithgate-alt-label>` (and `zhop-wraithgate-…` in the
    /// Z-HOP runs), interleaved with the others: before and after a change, side by side
    /// in one run. With `--contenders`, name them there.
    #[arg(long)]
    wraithgate_alt: Option<PathBuf>,
    /// The suffix naming `--wraithgate-alt`'s contenders.
    #[arg(long, default_value = "alt")]
    wraithgate_alt_label: String,
    /// Measured seconds per run.
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds per run (sent, not counted).
    #[arg(long)]
    warmup: Option<f64>,
    /// Runs per contender and scenario (medians are reported).
    #[arg(long)]
    runs: Option<usize>,
    /// Rate of the paced scenario, Gb/s.
    #[arg(long, default_value_t = 1.0)]
    rate_gbps: f64,
    /// Flows of the many-flow scenario.
    #[arg(long, default_value_t = 1000)]
    flows: usize,
    /// CPUs the relay runs on (taskset list) and its namespace's receive processing.
    #[arg(long, default_value = "1")]
    relay_cpus: String,
    /// CPU of the generator and the sink.
    #[arg(long, default_value_t = 0)]
    load_cpu: usize,
    /// Steer the relay namespace's receive processing to the relay CPUs (RPS), as NIC
    /// interrupts would; floods then livelock userspace relays.
    #[arg(long)]
    rps: bool,
    /// Skip the end-to-end wireguard-go + iperf3 runs (netns topology only).
    #[arg(long)]
    no_e2e: bool,
    /// Only the end-to-end runs.
    #[arg(long)]
    e2e_only: bool,
    /// Skip the Z-HOP runs (netns topology only).
    #[arg(long)]
    no_zhop: bool,
    /// Only the Z-HOP runs.
    #[arg(long)]
    zhop_only: bool,
    /// Also run the Exit role end to end (netns topology only): iperf3 TCP (1 and 4
    /// streams) and UDP at --e2e-udp-rate through tunnels whose ends are wireguard-go or
    /// WraithGate (`wgo>wgo`, `wgo>relay>wgo`, `wgo>wg-exit`, `wg>relay>wg-exit`), the
    /// exit end's CPU per GB. Every WraithGate there runs the `uring` backend (the node's
    /// default), or the first of --backends without it. Off by default: about 10 s per
    /// cell and run.
    #[arg(long)]
    exit: bool,
    /// Only the Exit role runs (implies --exit).
    #[arg(long)]
    exit_only: bool,
    /// After the Z-HOP runs, profile WraithGate (each backend, TCP and UDP) with `perf
    /// record` during one more iperf3 run each, not counted; reports go to the workdir.
    #[arg(long)]
    zhop_perf: bool,
    /// Rate of the paced Z-HOP UDP test (iperf3 -b): one the endpoints carry with little
    /// loss, so that the relays are compared at equal load. (The other Z-HOP UDP test
    /// floods at --e2e-udp-rate.)
    #[arg(long, default_value = "200M")]
    zhop_udp_paced: String,
    /// Rate of the end-to-end iperf3 UDP test (iperf3 -b).
    #[arg(long, default_value = "1G")]
    e2e_udp_rate: String,
    /// Send without UDP GSO.
    #[arg(long)]
    no_gso: bool,
    /// Name prefix of namespaces and interfaces.
    #[arg(long, default_value = "rb")]
    prefix: String,
    /// Write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the chart here.
    #[arg(long, default_value = "target/relay-bench/relay-bench.svg")]
    svg: PathBuf,
    /// Also write the markdown tables here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Working directory for contender configs and logs.
    #[arg(long, default_value = "target/relay-bench")]
    workdir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// The naive tokio relay (started by the harness as a contender).
    NaiveRelay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        exit: SocketAddr,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

/// One load shape.
#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    flows: usize,
    size: usize,
    rate_bps: Option<u64>,
    /// Paced at this fraction of the contender's own median `1flow-1420B-unpaced`
    /// throughput in this run (the "zero loss at 80 % of the maximum" check).
    of_max: Option<f64>,
}

const MAX_SCENARIO: &str = "1flow-1420B-unpaced";

fn scenarios(cli: &Cli) -> Result<Vec<Scenario>> {
    let rate = (cli.rate_gbps * 1e9) as u64;
    let all = vec![
        Scenario {
            name: "1flow-1420B-unpaced".into(),
            flows: 1,
            size: 1420,
            rate_bps: None,
            of_max: None,
        },
        Scenario {
            name: format!("{}flow-1420B-unpaced", cli.flows),
            flows: cli.flows,
            size: 1420,
            rate_bps: None,
            of_max: None,
        },
        Scenario {
            name: "1flow-64B-unpaced".into(),
            flows: 1,
            size: 64,
            rate_bps: None,
            of_max: None,
        },
        Scenario {
            name: format!("1flow-1420B-paced-{}G", cli.rate_gbps),
            flows: 1,
            size: 1420,
            rate_bps: Some(rate),
            of_max: None,
        },
        Scenario {
            name: "1flow-1420B-paced-80pct-of-max".into(),
            flows: 1,
            size: 1420,
            rate_bps: None,
            of_max: Some(0.8),
        },
    ];
    let Some(wanted) = &cli.scenarios else {
        // The 80 % check needs the maximum first and costs a run per contender: full only.
        return Ok(all
            .into_iter()
            .filter(|s| !cli.quick || s.of_max.is_none())
            .collect());
    };
    let mut out = Vec::new();
    for w in wanted {
        match all
            .iter()
            .find(|s| s.name == *w || s.name.starts_with(w.as_str()))
        {
            Some(s) => out.push(s.clone()),
            None => bail!("unknown scenario {w:?}"),
        }
    }
    Ok(out)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Sub::NaiveRelay {
        listen,
        exit,
        threads,
    }) = cli.command
    {
        return wraithgate_bench::naive::run(listen, exit, threads);
    }
    topology::install_signal_handler()?;
    let _guard = topology::CleanupGuard;
    bench(&cli)
}

fn bench(cli: &Cli) -> Result<()> {
    let root = topology::is_root();
    let kinds: Vec<Kind> = match &cli.topology {
        Some(list) => list
            .iter()
            .map(|t| match t.as_str() {
                "netns" => Ok(Kind::Netns),
                "loopback" => Ok(Kind::Loopback),
                "host" => Ok(Kind::Host),
                other => bail!("unknown topology {other:?}"),
            })
            .collect::<Result<_>>()?,
        None if root => vec![Kind::Netns, Kind::Loopback],
        None => {
            eprintln!(
                "relay-bench: NOT ROOT: namespaces unavailable, running the host loopback only"
            );
            vec![Kind::Host]
        }
    };
    if !root && kinds.iter().any(|k| *k != Kind::Host) {
        bail!("the netns and loopback topologies need root");
    }
    let alt = cli
        .wraithgate_alt
        .as_deref()
        .map(|p| (p, cli.wraithgate_alt_label.as_str()));
    let names: Vec<String> = match &cli.contenders {
        Some(c) => c.clone(),
        None => cli
            .backends
            .iter()
            .flat_map(|b| {
                let label = alt.map(|(_, l)| format!("wraithgate-{b}-{l}"));
                std::iter::once(format!("wraithgate-{b}")).chain(label)
            })
            // The kernel fast path beside the userspace backends (not in --backends: the
            // end-to-end and Z-HOP runs do not offload, so it would only add their time).
            .chain(
                [
                    "wraithgate-fastpath",
                    "nftables",
                    "naive-tokio",
                    "socat",
                    "nginx",
                    "direct",
                ]
                .map(String::from),
            )
            .collect(),
    };
    let contenders: Vec<Contender> = names
        .iter()
        .map(|n| Contender::parse(n, &cli.wraithgate, alt))
        .collect::<Result<_>>()?;
    // Cells that fail the run when they have no figures: WraithGate's (what this harness
    // is for) and the direct path's (no relay at all: when it fails, the generator, the
    // sink or the topology is broken and no figure of the run means anything). The other
    // contenders are third-party programs; their failures are reported in the table.
    // `--wraithgate-alt` is an older build that may lack a backend: reported only. So is
    // the io_uring backend where io_uring cannot run (a container's seccomp profile, say).
    let mut fatal: Vec<String> = Vec::new();
    for c in &contenders {
        if let Some(e) = c.uring_unavailable() {
            eprintln!("relay-bench: SKIPPING {}: {e}", c.name());
        } else if matches!(
            c,
            Contender::WraithGate { label: None, .. } | Contender::Direct
        ) {
            fatal.push(c.name());
        }
    }
    if wraithgate_relay::io::uring::probe().is_ok() {
        fatal.extend(cli.backends.iter().map(|b| format!("zhop-wraithgate-{b}")));
    } else {
        let portable = cli.backends.iter().filter(|b| !b.starts_with("uring"));
        fatal.extend(portable.map(|b| format!("zhop-wraithgate-{b}")));
    }
    let scenarios = scenarios(cli)?;
    let (duration, warmup, runs) = if cli.quick {
        (
            // 56 cells of forwarding plus the end-to-end and Z-HOP runs: these keep the
            // whole under five minutes on a 2-core machine (CI measured 5 min 10 s with
            // 2 s cells once `direct` joined).
            cli.duration.unwrap_or(1.5),
            cli.warmup.unwrap_or(0.4),
            cli.runs.unwrap_or(1),
        )
    } else {
        (
            cli.duration.unwrap_or(10.0),
            cli.warmup.unwrap_or(1.0),
            cli.runs.unwrap_or(3),
        )
    };
    std::fs::create_dir_all(&cli.workdir)?;
    let workdir = std::fs::canonicalize(&cli.workdir)?;
    let exit_key = PublicKey([0x5a; 32]);
    let clock = quanta::Clock::new();
    let abort = AtomicBool::new(false);

    eprintln!(
        "relay-bench: {} topologies × {} scenarios × {} contenders × {runs} runs, {warmup}+{duration} s each",
        kinds.len(),
        scenarios.len(),
        contenders.len()
    );
    let mut results: Vec<ScenarioResult> = Vec::new();
    let mut zhop_summary = String::new();
    for kind in kinds {
        let topo = Topology::build(
            kind,
            &cli.prefix,
            cli.rps.then_some((cli.relay_cpus.as_str(), cli.load_cpu)),
        )
        .with_context(|| format!("build the {} topology", kind.as_str()))?;
        let first = results.len();
        let relay_runs = !cli.e2e_only && !cli.zhop_only && !cli.exit_only;
        for s in scenarios.iter().filter(|_| relay_runs) {
            results.push(ScenarioResult {
                name: format!("{}/{}", kind.as_str(), s.name),
                paced: s.rate_bps.is_some() || s.of_max.is_some(),
                reference: "nftables".into(),
                contenders: contenders
                    .iter()
                    .map(|c| ContenderResult {
                        name: c.name(),
                        outcome: match c.unavailable(&topo).or_else(|| c.probe(&workdir)) {
                            Some(why) => Outcome::Skipped(why),
                            None => Outcome::Measured { runs: Vec::new() },
                        },
                    })
                    .collect(),
            });
        }
        // Run-major order: every contender once, then again, so slow drift on a shared
        // machine spreads over all of them instead of penalising one.
        for run in 0..if relay_runs { runs } else { 0 } {
            for (si, s) in scenarios.iter().enumerate() {
                for (ci, c) in contenders.iter().enumerate() {
                    let rate_bps = match s.of_max {
                        None => s.rate_bps,
                        Some(frac) => {
                            let max = scenarios
                                .iter()
                                .position(|x| x.name == MAX_SCENARIO)
                                .and_then(|b| results[first + b].contenders[ci].figures())
                                .map(|f| f.gbps)
                                .filter(|g| *g > 0.0);
                            match max {
                                Some(g) => Some((g * frac * 1e9) as u64),
                                None => {
                                    results[first + si].contenders[ci].outcome = Outcome::Skipped(
                                        format!("needs a {MAX_SCENARIO} figure in this run"),
                                    );
                                    continue;
                                }
                            }
                        }
                    };
                    let slot = &mut results[first + si].contenders[ci];
                    if !matches!(slot.outcome, Outcome::Measured { .. }) {
                        continue;
                    }
                    let spec = LoadSpec {
                        relay: c.destination(&topo),
                        sink: topo.exit,
                        sources: (0..s.flows).map(|i| topo.source(i)).collect(),
                        client_port: topo.client_port(),
                        exit_key,
                        size: packets::transport_len(s.size),
                        rate_bps,
                        warmup: Duration::from_secs_f64(warmup),
                        duration: Duration::from_secs_f64(duration),
                        gso: !cli.no_gso,
                        train: 8,
                        client_netns: Topology::netns_path(&topo.client_ns),
                        exit_netns: Topology::netns_path(&topo.exit_ns),
                        load_cpu: Some(cli.load_cpu),
                        handshake_timeout: Duration::from_secs(if s.flows > 1 { 8 } else { 4 }),
                        paced_trains: s.of_max.is_some(),
                    };
                    eprint!(
                        "[{} run {}/{runs}] {:<24} {:<20} ",
                        kind.as_str(),
                        run + 1,
                        s.name,
                        c.name()
                    );
                    let measured = measure_once(c, &topo, &spec, cli, &workdir, &clock, &abort);
                    record(slot, measured, |f| {
                        format!(
                            "{:7.3} Gb/s {:7.3} Mpps loss {:6.2}% reordered {} p99 {:8.0} µs",
                            f.gbps,
                            f.mpps,
                            f.loss_percent,
                            report::count(f.reordered),
                            f.p99_us()
                        )
                    });
                }
            }
        }
        let e2e_secs = duration.max(2.0).round() as u32;
        if kind == Kind::Netns && !cli.no_e2e && !cli.zhop_only && !cli.exit_only {
            match wgo::available() {
                Some(why) => eprintln!("relay-bench: skipping end-to-end runs: {why}"),
                None => results.extend(end_to_end(
                    cli,
                    &topo,
                    &contenders,
                    &workdir,
                    runs,
                    e2e_secs,
                )?),
            }
        }
        if kind == Kind::Netns && (cli.exit || cli.exit_only) && !cli.e2e_only && !cli.zhop_only {
            match wgo::available() {
                Some(why) => eprintln!("relay-bench: skipping the Exit runs: {why}"),
                None => results.extend(exit_runs(cli, &topo, &workdir, runs, e2e_secs)?),
            }
        }
        if kind == Kind::Netns && !cli.no_zhop && !cli.e2e_only && !cli.exit_only {
            match wgo::available() {
                Some(why) => eprintln!("relay-bench: skipping Z-HOP runs: {why}"),
                None => {
                    let ends = OuterEnd::all(&cli.wraithgate, &cli.backends, alt);
                    let (z, forwarded) = zhop_runs(cli, &topo, &ends, &workdir, runs, e2e_secs)?;
                    zhop_summary = zhop_ratios(&z, &forwarded);
                    results.extend(z);
                    if cli.zhop_perf {
                        zhop_profiles(cli, &topo, &ends, &workdir, e2e_secs)?;
                    }
                }
            }
        }
        drop(topo);
    }

    let md = report::markdown(&results) + &zhop_summary;
    println!("{md}");
    if results.is_empty() {
        bail!("nothing was run");
    }
    if let Some(path) = &cli.markdown {
        std::fs::write(path, &md)?;
    }
    if let Some(path) = &cli.json {
        let text = serde_json::to_string_pretty(&report::json(&results))?;
        std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
        eprintln!("relay-bench: wrote {}", path.display());
    }
    if let Some(dir) = cli.svg.parent() {
        std::fs::create_dir_all(dir)?;
    }
    report::svg(&results, &cli.svg)?;
    eprintln!("relay-bench: wrote {}", cli.svg.display());
    let missing = report::missing_cells(&results, &fatal);
    if !missing.is_empty() {
        for m in &missing {
            eprintln!("relay-bench: {m}");
        }
        bail!(
            "{} cell(s) of WraithGate or of the direct path have no figures (listed above)",
            missing.len()
        );
    }
    Ok(())
}

/// Ends the progress line a run started: its figures (`describe`) and into the cell's
/// runs, or FAILED and the cell failed.
fn record(
    slot: &mut ContenderResult,
    measured: Result<Figures>,
    describe: impl Fn(&Figures) -> String,
) {
    match measured {
        Ok(f) => {
            eprintln!("{}", describe(&f));
            if let Outcome::Measured { runs } = &mut slot.outcome {
                runs.push(f);
            }
        }
        Err(e) => {
            eprintln!("FAILED: {e:#}");
            slot.outcome = Outcome::Failed(format!("{e:#}"));
        }
    }
}

/// The figures of one iperf3 run; `cpu_ns` is what the measured processes spent in it.
/// iperf3 counts no reordering here, so `reordered` is not a figure of these rows.
fn iperf_figures(r: &wgo::IperfResult, cpu_ns: u64) -> Figures {
    let gb = r.bytes / 1e9;
    Figures {
        gbps: r.gbps,
        mpps: r.mpps,
        loss_percent: r.loss_percent,
        jitter_ms: r.jitter_ms,
        cpu_s_per_gb: if gb > 0.0 {
            cpu_ns as f64 / 1e9 / gb
        } else {
            f64::NAN
        },
        reordered: f64::NAN,
        ..Figures::default()
    }
}

fn measure_once(
    c: &Contender,
    topo: &Topology,
    spec: &LoadSpec,
    cli: &Cli,
    workdir: &std::path::Path,
    clock: &quanta::Clock,
    abort: &AtomicBool,
) -> Result<Figures> {
    let mut running: Running = c.start(topo, &spec.exit_key, &cli.relay_cpus, workdir)?;
    let pid = running.pid();
    let mut cpu_at_start = 0;
    let mut contender_cpu = 0;
    let m = load::run(spec, clock, abort, |starting| {
        let now = pid.map_or(0, wraithgate_bench::cpu::tree_cpu_ns);
        if starting {
            cpu_at_start = now;
        } else {
            contender_cpu = now.saturating_sub(cpu_at_start);
        }
    });
    let alive = running.check_alive();
    running.stop();
    let m = m?;
    alive?;
    if m.flows_established < m.flows {
        eprint!("({}/{} flows established) ", m.flows_established, m.flows);
    }
    Ok(Figures::from_run(&m, contender_cpu))
}

/// wireguard-go client → relay → wireguard-go exit with iperf3 TCP and UDP, against the
/// client talking to the exit directly. Returns one scenario per iperf3 test.
fn end_to_end(
    cli: &Cli,
    topo: &Topology,
    contenders: &[Contender],
    workdir: &std::path::Path,
    runs: usize,
    secs: u32,
) -> Result<Vec<ScenarioResult>> {
    let client = wgo::keypair(workdir, "wg-client")?;
    let exit = wgo::keypair(workdir, "wg-exit")?;
    let mut server = wgo::start_iperf_server(topo, cli.load_cpu, workdir)?;
    let tests: [(&str, Option<&str>); 2] = [
        ("e2e-iperf3-tcp", None),
        ("e2e-iperf3-udp-1380B", Some(cli.e2e_udp_rate.as_str())),
    ];
    // The direct path is always the reference here, and not a relay to put in between.
    let mut paths: Vec<Option<&Contender>> = vec![None];
    paths.extend(
        contenders
            .iter()
            .filter(|c| **c != Contender::Direct)
            .map(Some),
    );
    let mut results: Vec<ScenarioResult> = tests
        .iter()
        .map(|(name, _)| ScenarioResult {
            name: format!("{}/{name}", topo.kind.as_str()),
            paced: false,
            reference: "direct".into(),
            contenders: paths
                .iter()
                .map(|p| ContenderResult {
                    name: p.map_or("direct".into(), |c| c.name()),
                    outcome: match p.and_then(|c| c.unavailable(topo).or_else(|| c.probe(workdir)))
                    {
                        Some(why) => Outcome::Skipped(why),
                        None => Outcome::Measured { runs: Vec::new() },
                    },
                })
                .collect(),
        })
        .collect();
    for run in 0..runs {
        for (ti, (test, udp)) in tests.iter().enumerate() {
            for (pi, path) in paths.iter().enumerate() {
                let slot = &mut results[ti].contenders[pi];
                if !matches!(slot.outcome, Outcome::Measured { .. }) {
                    continue;
                }
                eprint!("[e2e run {}/{runs}] {test:<24} {:<20} ", run + 1, slot.name);
                let testdir = workdir.join(test);
                std::fs::create_dir_all(&testdir)?;
                let workdir = testdir.as_path();
                let measured = (|| -> Result<Figures> {
                    let mut relay = match path {
                        Some(c) => Some(c.start(topo, &exit.public, &cli.relay_cpus, workdir)?),
                        None => None,
                    };
                    let via = if relay.is_some() {
                        topo.relay_listen
                    } else {
                        topo.exit
                    };
                    let tunnel = wgo::start_tunnel(
                        topo,
                        &cli.prefix,
                        &client,
                        &exit,
                        via,
                        cli.load_cpu,
                        workdir,
                    )?;
                    let mut pids = tunnel.pids();
                    pids.extend(relay.as_ref().and_then(Running::pid));
                    let cpu = || -> u64 {
                        pids.iter()
                            .map(|&p| wraithgate_bench::cpu::tree_cpu_ns(p))
                            .sum()
                    };
                    let before = cpu();
                    let r = wgo::iperf(
                        topo,
                        cli.load_cpu,
                        secs,
                        udp.map(|rate| (rate, wgo::UDP_LEN)),
                    )?;
                    let cpu_ns = cpu().saturating_sub(before);
                    if let Some(relay) = relay.as_mut() {
                        relay.check_alive()?;
                    }
                    drop(tunnel);
                    drop(relay);
                    Ok(iperf_figures(&r, cpu_ns))
                })();
                record(slot, measured, |f| {
                    format!(
                        "{:7.3} Gb/s loss {:6.2}% jitter {:.4} ms",
                        f.gbps, f.loss_percent, f.jitter_ms
                    )
                });
            }
        }
    }
    topology::kill_group(server.id() as i32);
    let _ = server.wait();
    Ok(results)
}

/// The Exit role end to end ([`exitrole`]): each iperf3 test through each tunnel path,
/// `wgo>wgo` (wireguard-go at both ends, no relay) the reference. The CPU figure is the exit
/// end's.
fn exit_runs(
    cli: &Cli,
    topo: &Topology,
    workdir: &std::path::Path,
    runs: usize,
    secs: u32,
) -> Result<Vec<ScenarioResult>> {
    // The node's own default (io_uring where the kernel has it), unless --backends leaves
    // it out: then the first named.
    let backend = cli
        .backends
        .iter()
        .find(|b| b.as_str() == "uring")
        .or(cli.backends.first())
        .map_or("uring", String::as_str);
    let relay = Contender::parse(&format!("wraithgate-{backend}"), &cli.wraithgate, None)?;
    let paths = exitrole::TunnelPath::all(&cli.wraithgate, backend, relay);
    let client = wgo::keypair(workdir, "exit-client")?;
    let exit = wgo::keypair(workdir, "exit-exit")?;
    let mut server = wgo::start_iperf_server_on(topo, &cli.relay_cpus, workdir)?;
    let tests = exitrole::tests(&cli.e2e_udp_rate);
    let mut results: Vec<ScenarioResult> = tests
        .iter()
        .map(|(name, _)| ScenarioResult {
            name: format!("{}/{name}", topo.kind.as_str()),
            paced: matches!(name, n if n.contains("udp")),
            reference: paths[0].name(),
            contenders: paths
                .iter()
                .map(|p| ContenderResult {
                    name: p.name(),
                    outcome: Outcome::Measured { runs: Vec::new() },
                })
                .collect(),
        })
        .collect();
    for run in 0..runs {
        for (ti, (test, spec)) in tests.iter().enumerate() {
            for (pi, path) in paths.iter().enumerate() {
                let slot = &mut results[ti].contenders[pi];
                if !matches!(slot.outcome, Outcome::Measured { .. }) {
                    continue;
                }
                eprint!(
                    "[exit run {}/{runs}] {test:<28} {:<20} ",
                    run + 1,
                    slot.name
                );
                let testdir = workdir
                    .join("exit")
                    .join(test)
                    .join(path.name().replace('>', "_"));
                std::fs::create_dir_all(&testdir)?;
                let measured = (|| -> Result<Figures> {
                    let mut running = exitrole::start(
                        topo,
                        &cli.prefix,
                        path,
                        (&client, &exit),
                        &cli.relay_cpus,
                        cli.load_cpu,
                        &testdir,
                    )?;
                    let exit_pid = running.exit_pid();
                    let before = wraithgate_bench::cpu::tree_cpu_ns(exit_pid);
                    let r = exitrole::iperf(topo, cli.load_cpu, secs, spec)?;
                    let cpu_ns =
                        wraithgate_bench::cpu::tree_cpu_ns(exit_pid).saturating_sub(before);
                    running.check_alive()?;
                    drop(running);
                    Ok(iperf_figures(&r, cpu_ns))
                })();
                record(slot, measured, |f| {
                    format!(
                        "{:7.3} Gb/s loss {:6.2}% jitter {:.4} ms exit {:.3} s/GB",
                        f.gbps, f.loss_percent, f.jitter_ms, f.cpu_s_per_gb
                    )
                });
            }
        }
    }
    topology::kill_group(server.id() as i32);
    let _ = server.wait();
    Ok(results)
}

/// Per Z-HOP test, outer end and run: the relay's CPU nanoseconds per byte it forwarded
/// (= s/GB).
type Forwarded = Vec<Vec<Vec<f64>>>;

/// Z-HOP's iperf3 tests: TCP, and UDP with datagrams that fit the inner tunnel, as a flood
/// (the end-to-end rate) and paced at a rate the endpoints carry. `--quick` runs TCP only
/// (unless it runs nothing but Z-HOP), which keeps it under five minutes.
fn zhop_tests(cli: &Cli) -> Vec<(String, Option<(&str, usize)>)> {
    let mut tests = vec![
        ("zhop-iperf3-tcp".into(), None),
        (
            format!("zhop-iperf3-udp-1300B-{}", cli.e2e_udp_rate),
            Some((cli.e2e_udp_rate.as_str(), zhop::UDP_LEN)),
        ),
        (
            format!("zhop-iperf3-udp-1300B-{}", cli.zhop_udp_paced),
            Some((cli.zhop_udp_paced.as_str(), zhop::UDP_LEN)),
        ),
    ];
    if cli.quick && !cli.zhop_only {
        tests.truncate(1);
    }
    tests
}

/// Z-HOP end to end: the client's two wireguard-go layers through each outer end (the
/// wireguard-go + kernel baseline, WraithGate with each backend) to a wireguard-go exit,
/// iperf3 TCP and UDP. CPU s/GB is the relay namespace's processes only, per GB delivered;
/// also returned, per test, outer end and run: the same CPU per GB the relay forwarded to
/// the exit (what it sent, whether or not the exit kept up).
fn zhop_runs(
    cli: &Cli,
    topo: &Topology,
    ends: &[OuterEnd],
    workdir: &std::path::Path,
    runs: usize,
    secs: u32,
) -> Result<(Vec<ScenarioResult>, Forwarded)> {
    let tests = zhop_tests(cli);
    let mut forwarded = vec![vec![Vec::new(); ends.len()]; tests.len()];
    let keys = zhop::Keys::generate(workdir)?;
    let mut server = wgo::start_iperf_server(topo, cli.load_cpu, workdir)?;
    let mut results: Vec<ScenarioResult> = tests
        .iter()
        .map(|(name, _)| ScenarioResult {
            name: format!("{}/{name}", topo.kind.as_str()),
            paced: false,
            reference: zhop::BASELINE.into(),
            contenders: ends
                .iter()
                .map(|e| ContenderResult {
                    name: e.name(),
                    outcome: match e
                        .as_contender()
                        .and_then(|c| c.unavailable(topo).or_else(|| c.probe(workdir)))
                    {
                        Some(why) => Outcome::Skipped(why),
                        None => Outcome::Measured { runs: Vec::new() },
                    },
                })
                .collect(),
        })
        .collect();
    for run in 0..runs {
        for (ti, (test, udp)) in tests.iter().enumerate() {
            for (ei, end) in ends.iter().enumerate() {
                let slot = &mut results[ti].contenders[ei];
                if !matches!(slot.outcome, Outcome::Measured { .. }) {
                    continue;
                }
                eprint!(
                    "[zhop run {}/{runs}] {test:<24} {:<24} ",
                    run + 1,
                    slot.name
                );
                let testdir = workdir.join(test);
                std::fs::create_dir_all(&testdir)?;
                let measured = (|| -> Result<Figures> {
                    let mut path = zhop::start(
                        topo,
                        &cli.prefix,
                        &keys,
                        end,
                        &cli.relay_cpus,
                        cli.load_cpu,
                        &testdir,
                    )?;
                    let pids = path.relay_pids();
                    let cpu = || -> u64 {
                        pids.iter()
                            .map(|&p| wraithgate_bench::cpu::tree_cpu_ns(p))
                            .sum()
                    };
                    let (before, sent_before) = (cpu(), zhop::forwarded_bytes(topo)?);
                    let drops_before = zhop::receive_buffer_drops(topo);
                    let r = wgo::iperf(topo, cli.load_cpu, secs, *udp)?;
                    let cpu_ns = cpu().saturating_sub(before);
                    let sent = zhop::forwarded_bytes(topo)?.saturating_sub(sent_before);
                    let drops = zhop::receive_buffer_drops(topo);
                    eprint!(
                        "(forwarded {:.3} GB; socket overflows client/relay/exit {}/{}/{}) ",
                        sent as f64 / 1e9,
                        drops[0] - drops_before[0],
                        drops[1] - drops_before[1],
                        drops[2] - drops_before[2]
                    );
                    path.check_alive()?;
                    drop(path);
                    forwarded[ti][ei].push(cpu_ns as f64 / sent.max(1) as f64);
                    Ok(iperf_figures(&r, cpu_ns))
                })();
                record(slot, measured, |f| {
                    format!(
                        "{:7.3} Gb/s loss {:6.2}% relay CPU {:6.2} s/GB",
                        f.gbps, f.loss_percent, f.cpu_s_per_gb
                    )
                });
            }
        }
    }
    topology::kill_group(server.id() as i32);
    let _ = server.wait();
    Ok((results, forwarded))
}

/// WraithGate against the baseline in each Z-HOP scenario: throughput, the relay's CPU per
/// GB delivered and per GB it forwarded (`forwarded[test][end]`: per run, ns per byte =
/// s/GB), what one relay core would carry at that cost, and the ratios (baseline ÷
/// WraithGate for CPU: how many times less CPU WraithGate spends per GB).
fn zhop_ratios(results: &[ScenarioResult], forwarded: &Forwarded) -> String {
    let mut out = String::from(
        "\n### Z-HOP: WraithGate against wireguard-go + kernel forwarding\n\n\
         | scenario | outer end | Gb/s | × baseline | relay CPU s/GB delivered | s/GB forwarded \
         | Gb/s per relay core | baseline CPU ÷ this (forwarded) |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (ti, s) in results.iter().enumerate() {
        let fwd = |ei: usize| {
            report::median(
                forwarded
                    .get(ti)
                    .and_then(|t| t.get(ei))
                    .cloned()
                    .unwrap_or_default(),
            )
        };
        let Some((bi, base)) = s
            .contenders
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == s.reference)
            .and_then(|(i, c)| Some((i, c.figures()?)))
        else {
            continue;
        };
        for (ei, c) in s.contenders.iter().enumerate() {
            let Some(f) = c.figures() else { continue };
            let ratio = if ei == bi {
                "1.00".to_owned()
            } else {
                format!("{:.2}", fwd(bi) / fwd(ei))
            };
            out.push_str(&format!(
                "| {} | {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {ratio} |\n",
                s.name,
                c.name,
                f.gbps,
                f.gbps / base.gbps,
                f.cpu_s_per_gb,
                fwd(ei),
                8.0 / fwd(ei),
            ));
        }
    }
    out
}

/// One more iperf3 run per WraithGate backend and Z-HOP test with `perf record` on the node,
/// not counted in the tables; prints the top of each flat profile.
fn zhop_profiles(
    cli: &Cli,
    topo: &Topology,
    ends: &[OuterEnd],
    workdir: &std::path::Path,
    secs: u32,
) -> Result<()> {
    let keys = zhop::Keys::generate(workdir)?;
    let mut server = wgo::start_iperf_server(topo, cli.load_cpu, workdir)?;
    for (test, udp) in zhop_tests(cli) {
        for end in ends.iter().filter(|e| e.as_contender().is_some()) {
            if let Some(why) = end
                .as_contender()
                .and_then(|c| c.unavailable(topo).or_else(|| c.probe(workdir)))
            {
                eprintln!("relay-bench: no profile of {}: {why}", end.name());
                continue;
            }
            let testdir = workdir.join(&test);
            std::fs::create_dir_all(&testdir)?;
            let path = zhop::start(
                topo,
                &cli.prefix,
                &keys,
                end,
                &cli.relay_cpus,
                cli.load_cpu,
                &testdir,
            )?;
            let pid = path.wraithgate_pid().context("the node's pid")?;
            let data = workdir.join(format!("{}-{test}.perf.data", end.name()));
            // iperf3 first gets its connection through both handshakes; the profile covers
            // the transfer that follows.
            let perf = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(700));
                zhop::profile(pid, secs, &data, 25)
            });
            let r = wgo::iperf(topo, cli.load_cpu, secs + 1, udp);
            let top = perf
                .join()
                .map_err(|_| anyhow::anyhow!("the profiling thread panicked"))?;
            drop(path);
            let r = r?;
            eprintln!(
                "relay-bench: profile of {} during {test} ({:.3} Gb/s):\n{}",
                end.name(),
                r.gbps,
                top.unwrap_or_else(|| "(none)".into())
            );
        }
    }
    topology::kill_group(server.id() as i32);
    let _ = server.wait();
    Ok(())
}
