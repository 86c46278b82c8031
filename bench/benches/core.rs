//! Micro-benches of the sans-IO core: parsing, mac1 matching, the session lookup on the
//! transport fast path, a batch through the router, and a table swap.
//!
//! Quick mode for CI: `RB_QUICK=1 cargo bench -p wraithgate-bench --bench core`
//! (or criterion's own `-- --quick`); `cargo test --benches` runs each once.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wraithgate_bench::packets;
use wraithgate_relay::router::SWEEP_CLOSE_COST;
use wraithgate_relay::wire::Message;
use wraithgate_relay::{Action, ExitSpec, ExitTable, Listener, PublicKey, Router, RouterConfig};

fn config() -> Criterion {
    let c = Criterion::default();
    if std::env::var_os("RB_QUICK").is_some() {
        c.warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(800))
            .sample_size(20)
    } else {
        c
    }
}

fn exit_key(i: usize) -> PublicKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k[31] = 0x77;
    PublicKey(k)
}

fn table(exits: usize, generation: u64) -> ExitTable {
    let specs = (0..exits)
        .map(|i| ExitSpec {
            name: format!("exit-{i}"),
            public_key: exit_key(i),
            endpoint: SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::new(198, 18, 100 + (i / 250) as u8, (i % 250) as u8 + 1),
                51820,
            )),
            listen_port: None,
        })
        .collect();
    ExitTable::new(generation, specs).expect("distinct names, keys and endpoints")
}

const LISTENER: Listener = Listener { id: 0, port: 51820 };

fn client(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250) as u8 + 1),
        40_000,
    ))
}

/// A router with `clients` established sessions to exit 0; returns their slots too.
fn established_router(clients: usize) -> (Router, Vec<wraithgate_relay::SessionSlot>, Instant) {
    let now = Instant::now();
    // Every client starts its handshake at the same instant: a burst that the per-source
    // limiter's hashed buckets would otherwise cut short where sources share a bucket.
    let cfg = RouterConfig {
        handshake_burst: 1 << 20,
        ..RouterConfig::default()
    };
    let mut router = Router::new(cfg, Arc::new(table(1, 1)), now);
    let mac1 = exit_key(0).mac1_key();
    let mut slots = Vec::with_capacity(clients);
    for i in 0..clients {
        let init = packets::initiation(i as u32, &mac1);
        let slot = match router.handle_client(now, LISTENER, client(i), &init) {
            Action::ToExit(slot) => slot,
            other => panic!("initiation {i} is forwarded, not {other:?}"),
        };
        while router.poll_command().is_some() {}
        let resp = packets::response(packets::client_index(i as u32));
        assert!(matches!(
            router.handle_exit(now, slot, &resp),
            Action::ToClient { .. }
        ));
        slots.push(slot);
    }
    (router, slots, now)
}

fn transport(flow: usize, len: usize) -> Vec<u8> {
    let mut t = vec![0u8; len];
    packets::write_transport(&mut t, packets::exit_index(flow as u32), 1, flow as u32, 0);
    t
}

fn parse(c: &mut Criterion) {
    let mac1 = exit_key(0).mac1_key();
    let msgs: [(&str, Vec<u8>); 5] = [
        ("initiation", packets::initiation(1, &mac1).to_vec()),
        (
            "response",
            packets::response(packets::client_index(1)).to_vec(),
        ),
        ("cookie_reply", {
            let mut m = vec![0u8; 64];
            m[0] = 3;
            m
        }),
        ("transport_1424", transport(1, 1424)),
        ("garbage", vec![9u8; 200]),
    ];
    let mut g = c.benchmark_group("parse");
    for (name, bytes) in &msgs {
        g.bench_function(*name, |b| {
            b.iter(|| black_box(Message::parse(black_box(bytes)).map(|m| m.kind())))
        });
    }
    g.finish();
}

fn mac1(c: &mut Criterion) {
    let mut g = c.benchmark_group("mac1_match");
    for exits in [1usize, 16, 256] {
        let t = table(exits, 1);
        // Keyed for the last exit: the worst case of a linear match.
        let init = packets::initiation(7, &exit_key(exits - 1).mac1_key());
        let Ok(Message::Initiation(i)) = Message::parse(&init) else {
            panic!("initiation parses");
        };
        g.bench_with_input(BenchmarkId::from_parameter(exits), &exits, |b, _| {
            b.iter(|| black_box(t.match_mac1(i.mac1_input(), i.mac1())))
        });
    }
    g.finish();
}

fn session_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("session_lookup");
    for clients in [1usize, 1000] {
        let (mut router, _slots, now) = established_router(clients);
        let pkt = transport(clients / 2, 1424);
        let from = client(clients / 2);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("client_transport", clients),
            &clients,
            |b, _| {
                b.iter(|| {
                    let a = router.handle_client(now, LISTENER, from, black_box(&pkt));
                    debug_assert!(matches!(a, Action::ToExit(_)));
                    black_box(a)
                })
            },
        );
    }
    g.finish();
}

fn batch(c: &mut Criterion) {
    const BATCH: usize = 64;
    let mut g = c.benchmark_group("router_batch");
    for clients in [1usize, 1000] {
        let (mut router, slots, now) = established_router(clients);
        let packets: Vec<(usize, Vec<u8>)> = (0..BATCH)
            .map(|k| {
                let flow = (k * 7919) % clients;
                (flow, transport(flow, 1424))
            })
            .collect();
        g.throughput(Throughput::Elements(2 * BATCH as u64));
        g.bench_with_input(
            BenchmarkId::new("64_each_way", clients),
            &clients,
            |b, _| {
                b.iter(|| {
                    for (flow, p) in &packets {
                        black_box(router.handle_client(now, LISTENER, client(*flow), p));
                        black_box(router.handle_exit(now, slots[*flow], p));
                    }
                })
            },
        );
    }
    g.finish();
}

fn table_swap(c: &mut Criterion) {
    let mut g = c.benchmark_group("table_swap");
    for sessions in [0usize, 1000] {
        let (mut router, _slots, now) = established_router(sessions.max(1));
        let tables = [Arc::new(table(1, 2)), Arc::new(table(1, 3))];
        let mut k = 0;
        g.bench_with_input(
            BenchmarkId::new("set_table_and_sweep", sessions),
            &sessions,
            |b, _| {
                b.iter(|| {
                    k ^= 1;
                    router.set_table(tables[k].clone());
                    while router.sweeping() {
                        router.handle_timeout(now);
                    }
                })
            },
        );
        assert_eq!(
            router.session_count(),
            sessions.max(1),
            "sessions survive a swap"
        );
    }
    // The most a single housekeeping step does for a swap: one sweep step, when every
    // session is kept (`swap_sweep_budget` examined) and when every one is closed because
    // its exit was removed (each close costs `SWEEP_CLOSE_COST` of the budget).
    let budget = RouterConfig::default().swap_sweep_budget;
    let (mut router, _slots, now) = established_router(budget);
    let tables = [Arc::new(table(1, 2)), Arc::new(table(1, 3))];
    let mut k = 0;
    g.bench_function(BenchmarkId::new("sweep_step_all_kept", budget), |b| {
        b.iter(|| {
            k ^= 1;
            router.set_table(tables[k].clone());
            router.handle_timeout(now);
            assert!(!router.sweeping(), "one step covers the budget");
        })
    });
    let empty = Arc::new(ExitTable::new(9, Vec::new()).expect("an empty table is valid"));
    g.sampling_mode(criterion::SamplingMode::Flat);
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("sweep_step_all_closed", budget), |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let (mut router, _slots, now) = established_router(budget);
                let t = Instant::now();
                router.set_table(empty.clone());
                router.handle_timeout(now);
                spent += t.elapsed();
                assert_eq!(
                    router.session_count(),
                    budget - budget.div_ceil(SWEEP_CLOSE_COST),
                    "one step closes what its budget allows"
                );
            }
            spent
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = parse, mac1, session_lookup, batch, table_swap
}
criterion_main!(benches);
