//! Measures a large table swap through the API while a tunnel carries traffic:
//! `cargo run --release -p wraithgate-control --example table_swap -- [EXITS] [PPS] [PEERS]`
//! (PEERS: provisioned peers in the new table too, each with an allowed /32 of its own, as
//! an Exit node's peers are; `1 20000 100000` swaps in 100,000 peers and one exit).
//!
//! Prints: time from the `PUT /v1/config` request to its answer and to every worker routing
//! by the new generation; the longest housekeeping step of any worker before and after the
//! swap (where a swap costs a worker); and the packets a paced boringtun tunnel lost while
//! the swap happened.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use wraithgate_control::config::{Config, ControlSection};
use wraithgate_control::endpoints::{
    any_loopback, ipv4_udp, tunnel_addrs, udp_payload, KeyPair, PeerOptions, Received, WgNode,
};
use wraithgate_control::node::Node;
use wraithgate_relay::io::DataPlaneConfig;
use wraithgate_relay::table::{ExitSpec, ExitTable};

/// The largest of one figure over every worker's last report.
fn worst(node: &Node, figure: impl Fn(&wraithgate_relay::io::WorkerReport) -> u64) -> u64 {
    node.control
        .dp
        .reports()
        .iter()
        .map(figure)
        .max()
        .unwrap_or(0)
}

fn main() {
    // The node's own log line for the change says where the time went.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "wraithgate_control=info",
        ))
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    let exits: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let pps: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let peers: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("wg-table-swap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let exit_keys = KeyPair::generate();
    let mut exit = WgNode::bind(any_loopback(), exit_keys.clone()).unwrap();
    let spec = ExitSpec {
        name: "real".into(),
        public_key: exit_keys.relay_key(),
        endpoint: exit.local_addr(),
        listen_port: None,
    };
    let node = Node::start(Config {
        data_plane: DataPlaneConfig {
            listen: vec![any_loopback()],
            workers: 2,
            ..DataPlaneConfig::default()
        },
        table: ExitTable::new(1, vec![spec.clone()]).unwrap(),
        control: ControlSection {
            api_listen: Some("127.0.0.1:0".parse().unwrap()),
            state_dir: dir.clone(),
            ..ControlSection::default()
        },
        log: Default::default(),
    })
    .unwrap();
    let url = format!("http://{}", node.api_addr().unwrap());
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    let relay = node.control.dp.local_addrs()[0];

    // A tunnel through the relay, paced; the exit counts what arrives.
    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit_keys.public,
        PeerOptions {
            endpoint: Some(relay),
            ..Default::default()
        },
    );
    exit.add_peer(client.keys().public, PeerOptions::default());
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let exit_socket = exit.socket_clone().unwrap();
    let exit_thread = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            exit_socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = exit_socket.recv_from(&mut buf) {
                    if let Received::Packet { data, .. } = exit.handle_datagram(&buf[..n], from) {
                        if udp_payload(&data).is_some() {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        })
    };
    let client = Arc::new(Mutex::new(client));
    let client_rx = {
        let (client, stop) = (client.clone(), stop.clone());
        let socket = client.lock().unwrap().socket_clone().unwrap();
        std::thread::spawn(move || {
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    client.lock().unwrap().handle_datagram(&buf[..n], from);
                }
            }
        })
    };
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (client, stop, sent) = (client.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let (s, d) = tunnel_addrs(1);
            let packet = ipv4_udp(s, d, 1, 2, &[0u8; 1380]);
            let start = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_nanos(n * 1_000_000_000 / pps);
                if let Some(w) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(w);
                }
                if client.lock().unwrap().send_ip(cp, &packet).is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    // A baseline window of the same length without a swap: what this machine loses anyway.
    let (bs0, br0) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    std::thread::sleep(Duration::from_secs(3));
    let (bs1, br1) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    let baseline_lost = (bs1 - bs0) as i64 - (br1 - br0) as i64;

    // The new table: the real exit plus many more.
    let mut all = vec![
        json!({"public_key": spec.public_key, "endpoint": spec.endpoint.to_string(), "name": "real"}),
    ];
    for i in 0..exits.saturating_sub(1) {
        let k = wraithgate_relay::PublicKey(rand::random());
        let ip = format!(
            "10.{}.{}.{}:51820",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        );
        all.push(json!({"public_key": k, "endpoint": ip, "name": format!("e{i}")}));
    }
    let peers: Vec<serde_json::Value> = (0..peers)
        .map(|i| {
            let k = wraithgate_relay::PublicKey(rand::random());
            let ip = format!(
                "100.{}.{}.{}/32",
                64 + ((i >> 16) & 63),
                (i >> 8) & 255,
                i & 255
            );
            json!({"public_key": k, "allowed_ips": [ip], "name": format!("p{i}")})
        })
        .collect();
    let body = json!({"exits": all, "peers": peers}).to_string();
    let hk_before = worst(&node, |r| r.io.housekeeping_max_ns);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let (sent0, recv0) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    let resp = agent
        .put(format!("{url}/v1/config"))
        .header("Authorization", format!("Bearer {}", token.trim()))
        .header("If-Match", "1")
        .content_type("application/json")
        .send(body.as_str())
        .unwrap();
    let answered = t0.elapsed();
    assert_eq!(resp.status(), 200, "PUT refused");
    let in_use = loop {
        if node
            .control
            .dp
            .reports()
            .iter()
            .all(|r| r.table_generation == 2)
        {
            break t0.elapsed();
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    std::thread::sleep(Duration::from_secs(2));
    let hk_after = worst(&node, |r| r.io.housekeeping_max_ns);
    let swap_cpu = worst(&node, |r| r.io.swap_step_max_cpu_ns);
    let (sent1, recv1) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    exit_thread.join().unwrap();
    client_rx.join().unwrap();
    let window_sent = sent1 - sent0;
    let window_lost = window_sent as i64 - (recv1 - recv0) as i64;
    println!(
        "exits in the new table: {exits}, peers: {} ({} bytes of JSON)",
        peers.len(),
        body.len()
    );
    println!(
        "PUT /v1/config answered after: {:.1} ms",
        answered.as_secs_f64() * 1e3
    );
    println!(
        "all workers on the new table after: {:.1} ms",
        in_use.as_secs_f64() * 1e3
    );
    println!(
        "longest housekeeping step: {:.1} µs before the swap, {:.1} µs after",
        hk_before as f64 / 1e3,
        hk_after as f64 / 1e3
    );
    println!(
        "longest swap step of any worker, its own CPU time (preemption excluded): {:.1} µs",
        swap_cpu as f64 / 1e3
    );
    println!(
        "tunnel at {pps} pkt/s of 1,380-byte packets ({:.2} Gb/s), 3 s windows: {window_sent} sent around the swap, {window_lost} lost; {} sent without a swap, {baseline_lost} lost",
        pps as f64 * 1408.0 * 8.0 / 1e9,
        bs1 - bs0
    );
    node.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
