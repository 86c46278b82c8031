//! Resident memory of a `wraithgate` relay holding many established sessions.
//!
//! Starts the given `wraithgate` binary (one worker, the given backend) with one exit
//! served by a stand-in exit in this process that answers every initiation with a
//! response, measures the relay's resident memory idle, opens `--sessions` sessions from
//! as many client sockets on loopback (spread over several 127.x addresses to have enough
//! ports), and measures again. Needs one descriptor per session in both processes: run it
//! under `prlimit --nofile=300000:300000`.
//!
//! ```text
//! prlimit --nofile=300000:300000 cargo run --release -p wraithgate-relay \
//!     --example session_memory -- target/release/wraithgate uring 100000
//! ```
//!
//! With `shared EXITS` the relay runs with `[relay] exit_sockets = "shared"` and EXITS
//! stand-in exits (sessions spread evenly over them), and the clients hold no socket: one
//! raw socket (`IPPROTO_RAW`, so root) sends every initiation from a spoofed
//! `127.77.x.1:port` source, so neither process needs a descriptor per session and 100,000
//! sessions fit in an `RLIMIT_NOFILE` of 20,000 (the relay needs about SESSIONS / EXITS).
//! The relay's replies go to those spoofed addresses, where nobody listens. Sessions are
//! counted by the node itself (`/metrics`: sessions held less those pending, i.e. those
//! its exit answered), along with its shared sockets and open descriptors.
//!
//! ```text
//! cargo run --release -p wraithgate-relay --example session_memory -- \
//!     target/release/wraithgate uring 100000 shared 8
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wraithgate_relay::PublicKey;

/// Client addresses per loopback IP (the ephemeral port range holds about 28,000).
const PER_IP: usize = 20_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: session_memory WRAITHGATE_BINARY BACKEND SESSIONS [shared EXITS]");
        std::process::exit(2);
    }
    let (binary, backend) = (&args[1], &args[2]);
    let sessions: usize = args[3].parse().expect("SESSIONS is a number");
    let _ = wraithgate_relay::io::sys::raise_nofile_limit();
    if args.get(4).map(String::as_str) == Some("shared") {
        let exits: usize = args
            .get(5)
            .and_then(|e| e.parse().ok())
            .expect("EXITS is a number");
        shared(binary, backend, sessions, exits.max(1));
        return;
    }

    let exit_key = PublicKey([0x5a; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    let exit_addr = exit.local_addr().unwrap();
    let responses = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let exit_thread = {
        let (responses, stop) = (responses.clone(), stop.clone());
        std::thread::spawn(move || stand_in_exit(exit, &responses, &stop))
    };

    let relay_addr: SocketAddr = {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let dir = std::env::temp_dir().join(format!("session-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("relay.toml");
    std::fs::write(
        &conf,
        format!(
            "[relay]\nlisten = [\"{relay_addr}\"]\nworkers = 1\nbackend = \"{backend}\"\n\n\
             [control]\napi_enabled = false\nstate_dir = \"{state}\"\n\n\
             [limits]\nmax_sessions = {max}\nmax_pending = {max}\n\
             handshakes_per_second = 1000000\nhandshake_burst = 1000000\n\
             pending_timeout_secs = 60\n\n\
             [[exit]]\nname = \"x\"\npublic_key = \"{key}\"\nendpoint = \"{exit_addr}\"\n",
            max = sessions + 1024,
            key = exit_key.to_base64(),
            state = dir.join("state").display(),
        ),
    )
    .unwrap();
    let mut relay = Command::new(binary)
        .args([
            "--log",
            "warn,wraithgate_relay::io::uring=debug",
            "run",
            "--config",
        ])
        .arg(&conf)
        .stdout(Stdio::null())
        .spawn()
        .expect("start wraithgate");
    std::thread::sleep(Duration::from_millis(1500));
    let idle = rss_kib(&relay);
    let kernel_idle = udp_kernel_pages();

    let mac1 = exit_key.mac1_key();
    let mut clients = Vec::with_capacity(sessions);
    let started = Instant::now();
    let mut sent = 0u64;
    for i in 0..sessions {
        let ip = [127, 77, (i / PER_IP) as u8, 1];
        let c = UdpSocket::bind(SocketAddr::from((ip, 0))).expect("client socket");
        c.set_nonblocking(true).unwrap();
        let mut init = [0u8; 148];
        init[0] = 1;
        init[4..8].copy_from_slice(&(i as u32 + 1).to_le_bytes());
        let mac = mac1.compute(&init[..116]);
        init[116..132].copy_from_slice(&mac);
        c.send_to(&init, relay_addr).unwrap();
        sent += 1;
        clients.push(c);
        // Keep the handshakes in flight bounded.
        if i % 2000 == 1999 {
            wait_until(Duration::from_secs(10), || {
                responses.load(Ordering::Relaxed) + 500 >= sent
            });
        }
    }
    let all = wait_until(Duration::from_secs(30), || {
        responses.load(Ordering::Relaxed) >= sent
    });
    // Each client got the exit's response through the relay: the session is established.
    let mut buf = [0u8; 256];
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<usize> = (0..clients.len()).collect();
    while !pending.is_empty() && Instant::now() < deadline {
        pending.retain(|&i| match clients[i].recv(&mut buf) {
            Ok(92) => {
                answered += 1;
                false
            }
            _ => true,
        });
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let setup = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let loaded = rss_kib(&relay);
    let kernel_loaded = udp_kernel_pages();
    let alive = relay.try_wait().ok().flatten().is_none();
    let _ = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status();
    let _ = relay.wait();
    stop.store(true, Ordering::Relaxed);
    let _ = exit_thread.join();
    let _ = std::fs::remove_dir_all(&dir);

    println!("backend              {backend}");
    println!("relay alive          {alive}");
    println!("sessions requested   {sessions}");
    println!(
        "responses from exit  {} (all: {all})",
        responses.load(Ordering::Relaxed)
    );
    println!("established (client got the response) {answered}");
    print_memory(setup, idle, loaded, answered as usize);
    println!(
        "kernel UDP memory    {} -> {} pages (all UDP sockets on the machine, for context)",
        kernel_idle, kernel_loaded
    );
}

/// `shared EXITS`: sessions of EXITS exits on shared exit-facing sockets, from spoofed
/// clients that hold no socket.
fn shared(binary: &str, backend: &str, sessions: usize, exits: usize) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};

    let responses = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut keys = Vec::new();
    let mut exit_addrs = Vec::new();
    let mut threads = Vec::new();
    for k in 0..exits {
        let key = PublicKey([0x40 + k as u8; 32]);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        exit_addrs.push(sock.local_addr().unwrap());
        keys.push(key);
        let (responses, stop) = (responses.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            stand_in_exit(sock, &responses, &stop)
        }));
    }
    let free_port = || {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let relay_addr = free_port();
    let api = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("session-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    let conf = dir.join("relay.toml");
    let mut text = format!(
        "[relay]\nlisten = [\"{relay_addr}\"]\nworkers = 1\nbackend = \"{backend}\"\n\
         exit_sockets = \"shared\"\n\n\
         [control]\napi_listen = \"{api}\"\nstate_dir = \"{state}\"\n\n\
         [limits]\nmax_sessions = {max}\nmax_pending = {max}\n\
         handshakes_per_second = 1000000\nhandshake_burst = 1000000\n\
         pending_timeout_secs = 60\n",
        max = sessions + 1024,
        state = state.display(),
    );
    for (k, (key, addr)) in keys.iter().zip(&exit_addrs).enumerate() {
        text += &format!(
            "\n[[exit]]\nname = \"x{k}\"\npublic_key = \"{}\"\nendpoint = \"{addr}\"\n",
            key.to_base64()
        );
    }
    std::fs::write(&conf, text).unwrap();
    let mut relay = Command::new(binary)
        .args(["--log", "warn", "run", "--config"])
        .arg(&conf)
        .stdout(Stdio::null())
        .spawn()
        .expect("start wraithgate");
    std::thread::sleep(Duration::from_millis(2000));
    let token = std::fs::read_to_string(state.join("api.token")).expect("the node's API token");
    let token = token.trim();
    let idle = rss_kib(&relay);
    let fds_idle = descriptors(&relay);

    // IPPROTO_RAW: the kernel takes our IPv4 header (it fills in the checksum and length).
    let raw = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .expect("a raw socket (run as root)");
    let to = SockAddr::from(relay_addr);
    let macs: Vec<_> = keys.iter().map(PublicKey::mac1_key).collect();
    let started = Instant::now();
    let mut sent = 0u64;
    // Client ports below the ephemeral range: the relay's replies to these spoofed
    // addresses must not land on its own exit-facing sockets (bound to the wildcard address
    // on ephemeral ports), where they would count as strangers.
    const PORTS: usize = 30_000;
    for i in 0..sessions {
        let src = ([127, 77, (i / PORTS) as u8, 1], (1024 + i % PORTS) as u16);
        let mut init = [0u8; 148];
        init[0] = 1;
        init[4..8].copy_from_slice(&(i as u32 + 1).to_le_bytes());
        let mac = macs[i % exits].compute(&init[..116]);
        init[116..132].copy_from_slice(&mac);
        let packet = ipv4_udp(src, relay_addr, &init);
        while raw.send_to(&packet, &to).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        sent += 1;
        // Keep the handshakes in flight bounded.
        if i % 1000 == 999 {
            wait_until(Duration::from_secs(10), || {
                responses.load(Ordering::Relaxed) + 500 >= sent
            });
        }
    }
    let all = wait_until(Duration::from_secs(30), || {
        responses.load(Ordering::Relaxed) >= sent
    });
    let setup = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let metrics = get(api, "/metrics", token);
    let held = metric(&metrics, "wraithgate_sessions");
    let pending = metric(&metrics, "wraithgate_sessions_pending");
    let sockets = metric(&metrics, "wraithgate_exit_shared_sockets");
    let strangers = metrics
        .lines()
        .filter(|l| l.contains("reason=\"shared_socket_stranger\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    let loaded = rss_kib(&relay);
    let fds_loaded = descriptors(&relay);
    let alive = relay.try_wait().ok().flatten().is_none();
    let _ = Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status();
    let _ = relay.wait();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_dir_all(&dir);

    let established = held.saturating_sub(pending);
    println!("backend              {backend} (exit_sockets = \"shared\", {exits} exits)");
    println!("relay alive          {alive}");
    println!("sessions requested   {sessions}");
    println!(
        "responses from exits {} (all: {all})",
        responses.load(Ordering::Relaxed)
    );
    println!("node: sessions held  {held}, pending {pending}, established {established}");
    println!("node: shared sockets {sockets}, stranger drops {strangers}");
    println!("relay descriptors    {fds_idle} idle -> {fds_loaded} loaded");
    print_memory(setup, idle, loaded, established as usize);
}

/// The set-up time and the relay's resident memory, idle and with `sessions` established
/// (`idle` and `loaded` in KiB).
fn print_memory(setup: Duration, idle: u64, loaded: u64, sessions: usize) {
    let delta_kib = loaded.saturating_sub(idle);
    println!("set-up time          {:.1} s", setup.as_secs_f64());
    println!("relay RSS idle       {:.1} MiB", idle as f64 / 1024.0);
    println!("relay RSS loaded     {:.1} MiB", loaded as f64 / 1024.0);
    println!("RSS above idle       {:.1} MiB", delta_kib as f64 / 1024.0);
    println!(
        "bytes/session (RSS)  {:.0}",
        delta_kib as f64 * 1024.0 / sessions.max(1) as f64
    );
}

/// An IPv4/UDP datagram from `src` to `dst` carrying `payload`; the UDP checksum is left
/// 0 (none, which IPv4 allows), the IP checksum and length to the kernel.
fn ipv4_udp(src: ([u8; 4], u16), dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let SocketAddr::V4(dst) = dst else {
        panic!("IPv4 relay address");
    };
    let total = 20 + 8 + payload.len();
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&src.0);
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.1.to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

/// `GET path` from the node's API with its token; the body.
fn get(api: SocketAddr, path: &str, token: &str) -> String {
    let mut s = TcpStream::connect(api).expect("the node's API");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {api}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or(out)
}

/// Descriptors `child` has open.
fn descriptors(child: &Child) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", child.id())).map_or(0, |d| d.count())
}

/// Answers every initiation with a response naming its sender, as an exit would.
fn stand_in_exit(sock: UdpSocket, responses: &AtomicU64, stop: &AtomicBool) {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let mut next = 1u32;
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n != 148 || buf[0] != 1 {
            continue;
        }
        let mut resp = [0u8; 92];
        resp[0] = 2;
        resp[4..8].copy_from_slice(&next.to_le_bytes());
        resp[8..12].copy_from_slice(&buf[4..8]);
        next = next.wrapping_add(1);
        if sock.send_to(&resp, from).is_ok() {
            responses.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

fn rss_kib(child: &Child) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn udp_kernel_pages() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("UDP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
