//! The node binary across restarts: sessions survive a SIGTERM and a new start without a new
//! handshake, and a kill -9 in the middle of changes never leaves a corrupt state file.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wraithgate_control::endpoints::{
    any_loopback, ipv4_udp, tunnel_addrs, udp_payload, KeyPair, PeerOptions, Received, WgNode,
};
use wraithgate_control::state::DesiredState;
use wraithgate_testkit::workspace_command;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wg-restart-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(config: &Path, state: &Path, api: u16) -> Child {
    workspace_command(env!("CARGO_BIN_EXE_wraithgate"))
        .args(["run", "--workers", "2", "--config"])
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(["--api-listen", &format!("127.0.0.1:{api}")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sigterm(mut child: Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = child.wait().unwrap();
    assert!(status.success(), "node exit status {status:?}");
}

fn wait_for_api(api: u16) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", api)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("node API never came up");
}

fn lock(n: &Mutex<WgNode>) -> std::sync::MutexGuard<'_, WgNode> {
    n.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn sessions_survive_a_restart_without_a_new_handshake() {
    let dir = temp_dir("sessions");
    let relay: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let api = free_tcp_port();
    let exit_keys = KeyPair::generate();
    let exit = WgNode::bind(any_loopback(), exit_keys.clone()).unwrap();
    let config = dir.join("wraithgate.toml");
    std::fs::write(
        &config,
        format!(
            "[relay]\nlisten = [\"{relay}\"]\n\n[[exit]]\nname = \"x\"\npublic_key = \"{}\"\nendpoint = \"{}\"\n",
            exit_keys.relay_key(),
            exit.local_addr()
        ),
    )
    .unwrap();
    let state = dir.join("state");
    let node = start(&config, &state, api);
    wait_for_api(api);

    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit_keys.public,
        PeerOptions {
            endpoint: Some(relay),
            ..Default::default()
        },
    );
    let exit = Arc::new(Mutex::new(exit));
    let ep = lock(&exit).add_peer(client.keys().public, PeerOptions::default());
    let client = Arc::new(Mutex::new(client));
    let stop = Arc::new(AtomicBool::new(false));
    // Arrival time of each sequence number at the exit, and echoes back at the client.
    let arrivals = Arc::new(Mutex::new(Vec::<(u64, Instant)>::new()));
    let echoes = Arc::new(AtomicU64::new(0));

    let exit_thread = {
        let (exit, stop, arrivals) = (exit.clone(), stop.clone(), arrivals.clone());
        let socket = lock(&exit).socket_clone().unwrap();
        std::thread::spawn(move || {
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let mut e = lock(&exit);
                if let Received::Packet { peer, data } = e.handle_datagram(&buf[..n], from) {
                    if let Some(seq) = udp_payload(&data)
                        .and_then(|p| p.get(..8))
                        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                    {
                        arrivals.lock().unwrap().push((seq, Instant::now()));
                        let _ = e.send_ip(peer, &data);
                    }
                }
            }
        })
    };
    let client_rx = {
        let (client, stop, echoes) = (client.clone(), stop.clone(), echoes.clone());
        let socket = lock(&client).socket_clone().unwrap();
        std::thread::spawn(move || {
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Received::Packet { .. } = lock(&client).handle_datagram(&buf[..n], from) {
                    echoes.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // 2,000 packets per second for 4 seconds; the relay restarts at 1.5 s.
    let (s, d) = tunnel_addrs(1);
    let interval = Duration::from_micros(500);
    let t0 = Instant::now();
    let mut restart_at = None;
    let mut restarter = None;
    let mut node = Some(node);
    let mut seq = 0u64;
    while t0.elapsed() < Duration::from_secs(4) {
        let next = t0 + interval * seq as u32;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut payload = seq.to_le_bytes().to_vec();
        payload.resize(200, 0);
        let _ = lock(&client).send_ip(cp, &ipv4_udp(s, d, 1, 2, &payload));
        seq += 1;
        if restart_at.is_none() && t0.elapsed() >= Duration::from_millis(1500) {
            // Stop and start on the side, as systemd would, while traffic keeps coming.
            restart_at = Some(Instant::now());
            let old = node.take().unwrap();
            let (config, state) = (config.clone(), state.clone());
            restarter = Some(std::thread::spawn(move || {
                sigterm(old);
                start(&config, &state, api)
            }));
        }
    }
    node = Some(restarter.unwrap().join().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    exit_thread.join().unwrap();
    client_rx.join().unwrap();
    sigterm(node.take().unwrap());

    let arrivals = arrivals.lock().unwrap();
    let sent = seq;
    let received = arrivals.len() as u64;
    let restart_at = restart_at.unwrap();
    let before = arrivals.iter().filter(|(_, t)| *t < restart_at).count();
    let after = arrivals.iter().filter(|(_, t)| *t >= restart_at).count();
    // The longest silence at the exit once the restart began.
    let mut times: Vec<Instant> = arrivals.iter().map(|(_, t)| *t).collect();
    times.sort();
    let gap = times
        .windows(2)
        .filter(|w| w[1] > restart_at)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .expect("nothing arrived after the restart");
    eprintln!(
        "restart: sent {sent}, arrived {received} ({before} before, {after} after), lost {} ({:.2}%), gap {:.1} ms, echoes {}",
        sent - received,
        (sent - received) as f64 * 100.0 / sent as f64,
        gap.as_secs_f64() * 1e3,
        echoes.load(Ordering::Relaxed)
    );
    assert!(
        before > 1000 && after > 2000,
        "{before} before, {after} after"
    );
    assert!(
        echoes.load(Ordering::Relaxed) > 3000,
        "the way back works too"
    );
    // No new handshake: the exit never saw another one, the client never made one.
    assert_eq!(lock(&exit).handshakes(ep), 1, "exit saw a new handshake");
    assert_eq!(
        lock(&client).handshakes(cp),
        1,
        "client made a new handshake"
    );
    assert!(gap < Duration::from_secs(2), "gap {gap:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kill_9_during_changes_never_corrupts_the_state_file() {
    let dir = temp_dir("crash");
    let api = free_tcp_port();
    let config = dir.join("wraithgate.toml");
    std::fs::write(
        &config,
        format!(
            "[relay]\nlisten = [\"127.0.0.1:{}\"]\nworkers = 1\n",
            free_udp_port()
        ),
    )
    .unwrap();
    let state = dir.join("state");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let mut acked = 1u64;
    for round in 0..5 {
        let mut node = start(&config, &state, api);
        wait_for_api(api);
        let token = std::fs::read_to_string(state.join("api.token")).unwrap();
        let killer = {
            let pid = node.id();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100 + 70 * round));
                Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .unwrap();
            })
        };
        // Add and remove exits as fast as the node takes them, until it dies.
        let mut keys = Vec::new();
        loop {
            let add = keys.len() < 5 || rand::random::<bool>();
            let r = if add {
                let k = KeyPair::generate().relay_key().to_base64();
                let body = format!(
                    "{{\"public_key\":\"{k}\",\"endpoint\":\"192.0.2.{}:51820\",\"name\":\"e{}\"}}",
                    keys.len() % 250 + 1,
                    rand::random::<u32>()
                );
                keys.push(k);
                agent
                    .post(format!("http://127.0.0.1:{api}/v1/exits"))
                    .header("Authorization", format!("Bearer {token}"))
                    .content_type("application/json")
                    .send(body)
            } else {
                let k = keys.swap_remove(rand::random::<usize>() % keys.len());
                agent
                    .delete(format!(
                        "http://127.0.0.1:{api}/v1/exits/{}",
                        k.replace('+', "-").replace('/', "_")
                    ))
                    .header("Authorization", format!("Bearer {token}"))
                    .call()
            };
            match r {
                Ok(resp) if resp.status().is_success() => acked += 1,
                Ok(resp) => panic!("change refused: {}", resp.status()),
                Err(_) => break, // the node is gone
            }
        }
        killer.join().unwrap();
        let _ = node.wait();
        let text = std::fs::read_to_string(state.join("state.json")).unwrap();
        let saved: DesiredState = serde_json::from_str(&text).expect("state file is whole JSON");
        saved.validate().expect("state file holds a valid state");
        assert!(
            saved.generation == acked || saved.generation == acked + 1,
            "round {round}: file at generation {}, last acknowledged {acked}",
            saved.generation
        );
        acked = saved.generation;
        let leftovers: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
            .collect();
        // The kill may leave one temp file; it is never read, and the next start removes it.
        assert!(leftovers.len() <= 1, "{leftovers:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
