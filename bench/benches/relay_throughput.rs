//! Throughput and jitter through a running relay on the host loopback (no root needed).
//!
//! Each relay is started as a process (`wraithgate run` for each backend it accepts, and
//! the naive tokio relay as the reference), the flows complete their handshakes, and each
//! criterion iteration pushes a burst of 1424-byte transport messages through it and waits
//! for them at the sink: `Throughput::Bytes`, 1 flow and 1,000 flows. After the criterion
//! groups, a 1 Gb/s paced run per relay prints RFC 3550 jitter and one-way latency
//! quantiles next to criterion's figures.
//!
//! The `wraithgate` binary is taken from `WRAITHGATE_BIN`, else `target/release/wraithgate`
//! (build it first: `cargo build --release -p wraithgate-control`). A relay that will not
//! start, or through which the flows cannot complete their handshakes, fails the bench
//! (a skipped relay would let a broken node pass CI); only the io_uring backend where
//! io_uring cannot run here is skipped, loudly. Without the binary, `cargo bench` fails;
//! `cargo test --benches` (which only checks that the benches still run) runs the naive
//! relay alone, with a loud message. Quick mode for CI: `RB_QUICK=1`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wraithgate_bench::contender::{Contender, Running};
use wraithgate_bench::load::{self, Burst, LoadSpec};
use wraithgate_bench::packets;
use wraithgate_bench::topology::{Kind, Topology};
use wraithgate_relay::PublicKey;

const SIZE: usize = 1424;
const BURST: usize = 256;
const EXIT_KEY: PublicKey = PublicKey([0x5a; 32]);

fn quick() -> bool {
    std::env::var_os("RB_QUICK").is_some()
}

fn config() -> Criterion {
    let c = Criterion::default().sample_size(10);
    if quick() {
        c.warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(1))
    } else {
        c.measurement_time(Duration::from_secs(4))
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ sits in the workspace")
        .to_path_buf()
}

/// Whether this is `cargo bench` (criterion passes `--bench`), not `cargo test --benches`.
fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The relays to measure: each WraithGate backend that can run here, then the baseline.
fn contenders(workdir: &std::path::Path) -> Vec<Contender> {
    let binary = std::env::var_os("WRAITHGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/wraithgate"));
    let mut out = Vec::new();
    if binary.exists() {
        for backend in ["portable", "uring"] {
            let c = Contender::WraithGate {
                binary: binary.clone(),
                backend: backend.into(),
                label: None,
            };
            if let Some(e) = c.uring_unavailable() {
                eprintln!("relay_throughput: SKIPPING {}: {e}", c.name());
                continue;
            }
            if let Some(why) = c.probe(workdir) {
                panic!(
                    "relay_throughput: {} refuses its configuration: {why}",
                    c.name()
                );
            }
            out.push(c);
        }
    } else if benching() {
        panic!(
            "relay_throughput: {} not found (cargo build --release -p wraithgate-control, or set WRAITHGATE_BIN)",
            binary.display()
        );
    } else {
        eprintln!(
            "relay_throughput: SKIPPING WraithGate under cargo test: {} not found",
            binary.display()
        );
    }
    // The naive relay runs from the relay-bench binary cargo built for this bench.
    out.push(Contender::NaiveTokio);
    out
}

fn start(c: &Contender, topo: &Topology, workdir: &std::path::Path) -> Running {
    c.start(topo, &EXIT_KEY, "0-1", workdir)
        .unwrap_or_else(|e| panic!("relay_throughput: cannot start {}: {e:#}", c.name()))
}

fn throughput(c: &mut Criterion) {
    std::env::set_var("RB_NAIVE_EXE", env!("CARGO_BIN_EXE_relay-bench"));
    let workdir = workspace_root().join("target/relay-bench/criterion");
    std::fs::create_dir_all(&workdir).expect("create the work directory");
    let topo = Topology::build(Kind::Host, "rbc", None).expect("host topology needs nothing");
    let mut g = c.benchmark_group("relay_throughput");
    g.throughput(Throughput::Bytes((BURST * SIZE) as u64));
    for contender in contenders(&workdir) {
        let mut running = start(&contender, &topo, &workdir);
        for flows in [1usize, 1000] {
            let sources: Vec<_> = (0..flows).map(|i| topo.source(i)).collect();
            let mut burst = Burst::establish(
                topo.relay_listen,
                topo.exit,
                &sources,
                topo.client_port(),
                &EXIT_KEY,
                SIZE,
            )
            .unwrap_or_else(|e| {
                panic!(
                    "relay_throughput: {} {flows} flows: {e:#}",
                    contender.name()
                )
            });
            let mut lost = 0usize;
            g.bench_with_input(
                BenchmarkId::new(contender.name(), format!("{flows}flow")),
                &flows,
                |b, _| {
                    b.iter(|| {
                        let got = burst
                            .round(BURST, Duration::from_millis(20))
                            .expect("loopback sockets keep working");
                        lost += BURST - got.min(BURST);
                    })
                },
            );
            if lost > 0 {
                eprintln!(
                    "relay_throughput: {} {flows} flows lost {lost} packets over the bench",
                    contender.name()
                );
            }
        }
        running.stop();
    }
    g.finish();
}

/// Paced 1 Gb/s through each relay; prints jitter and latency quantiles.
fn jitter(_c: &mut Criterion) {
    let workdir = workspace_root().join("target/relay-bench/criterion");
    let topo = Topology::build(Kind::Host, "rbc", None).expect("host topology needs nothing");
    let clock = quanta::Clock::new();
    let abort = AtomicBool::new(false);
    // `cargo test --benches` runs each bench once without `--bench`: keep that short.
    let secs = match (benching(), quick()) {
        (false, _) => 0.3,
        (true, true) => 1.0,
        (true, false) => 5.0,
    };
    println!("\nrelay_jitter: 1 flow, {SIZE} B, 1 Gb/s paced, {secs} s, host loopback");
    println!("| relay | Gb/s | loss % | jitter ms | p50 µs | p99 µs | p99.9 µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut failed = Vec::new();
    for contender in contenders(&workdir) {
        let mut running = start(&contender, &topo, &workdir);
        let spec = LoadSpec {
            relay: topo.relay_listen,
            sink: topo.exit,
            sources: vec![topo.source(0)],
            client_port: topo.client_port(),
            exit_key: EXIT_KEY,
            size: packets::transport_len(SIZE),
            rate_bps: Some(1_000_000_000),
            warmup: Duration::from_millis(300),
            duration: Duration::from_secs_f64(secs),
            gso: true,
            train: 8,
            client_netns: None,
            exit_netns: None,
            load_cpu: None,
            handshake_timeout: Duration::from_secs(4),
            paced_trains: false,
        };
        match load::run(&spec, &clock, &abort, |_| {}) {
            Ok(m) => println!(
                "| {} | {:.3} | {:.3} | {:.4} | {:.0} | {:.0} | {:.0} |",
                contender.name(),
                m.gbps(),
                m.loss_percent(),
                m.jitter_ns / 1e6,
                m.latency.quantile(0.5) as f64 / 1e3,
                m.latency.quantile(0.99) as f64 / 1e3,
                m.latency.quantile(0.999) as f64 / 1e3,
            ),
            Err(e) => {
                println!("| {} | failed: {e:#} ||||||", contender.name());
                failed.push(contender.name());
            }
        }
        running.stop();
    }
    assert!(
        failed.is_empty(),
        "relay_jitter: no paced run through {failed:?}"
    );
}

criterion_group! {
    name = benches;
    config = config();
    targets = throughput, jitter
}
criterion_main!(benches);
