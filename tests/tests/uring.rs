//! The io_uring backend's receive buffers over real loopback sockets: what happens when a
//! worker's provided-buffer ring runs dry. Only the io_uring backend has such a ring; the
//! test skips loudly where io_uring cannot be set up.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use wraithgate_control::endpoints::{
    ipv4_udp, tunnel_addrs, udp_payload, PeerOptions, Received, WgNode,
};
use wraithgate_relay::io::sys::{SendBatch, Transmit};
use wraithgate_relay::io::{BackendChoice, DataPlaneConfig, IoStats};
use wraithgate_relay::table::ExitTable;
use wraithgate_tests::{exit_spec, node, pump, uring_runs, Relay};

const WAIT: Duration = Duration::from_secs(10);
/// The smallest `ring_buffers` the configuration accepts.
const SMALLEST_RING: usize = 8;
/// Datagrams per burst: far more than the ring holds, so the multishot receive finds the
/// ring empty while the worker is still busy with the buffers it filled.
const BURST: usize = 1024;

fn ip(body: &[u8]) -> Vec<u8> {
    let (s, d) = tunnel_addrs(1);
    ipv4_udp(s, d, 40000, 9, body)
}

fn reply(body: &[u8]) -> Vec<u8> {
    let (s, d) = tunnel_addrs(1);
    ipv4_udp(d, s, 9, 40000, body)
}

/// Sends `packet` from `from` over `peer` and pumps until `to` receives its payload.
fn delivered(from: &mut WgNode, peer: usize, to: &mut WgNode, packet: &[u8]) -> bool {
    from.send_ip(peer, packet).expect("send");
    let want = udp_payload(packet).expect("an IPv4/UDP packet").to_vec();
    pump(
        &mut [to, from],
        WAIT,
        |i, r| matches!(r, Received::Packet { data, .. } if i == 0 && udp_payload(data) == Some(&want[..])),
    )
}

/// Sends `copies` of each sealed transport packet in `sealed` from `socket` to `to`, in
/// bursts of one `sendmmsg` each.
fn flood(socket: &UdpSocket, to: SocketAddr, sealed: &[Vec<u8>]) {
    let mut batch = SendBatch::new(BURST);
    let msgs: Vec<Transmit<'_>> = sealed
        .iter()
        .map(|p| Transmit {
            dest: Some(to),
            contents: p,
            segment_size: None,
        })
        .collect();
    for chunk in msgs.chunks(BURST) {
        // A full receive queue at the relay drops datagrams; that is part of the flood.
        let _ = batch.send(socket.as_raw_fd(), chunk);
    }
}

/// Reads and throws away whatever reaches `socket` until it has been quiet for 200 ms:
/// the flood's tail, which the relay forwards as its buffers come back.
fn drain(socket: &UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    loop {
        match socket.recv_from(&mut buf) {
            Ok(_) => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                break
            }
            Err(e) => panic!("draining: {e}"),
        }
    }
    socket.set_read_timeout(None).expect("read timeout");
}

/// The worker's I/O counters as published after this call began.
fn io_now(relay: &Relay) -> IoStats {
    let reports = relay.dp.reports_after(Instant::now(), WAIT);
    let mut io = IoStats::default();
    for r in &reports {
        io.merge(&r.io);
    }
    io
}

/// A relay with the smallest ring there is, a real session through it, and floods from
/// both ends that nobody reads while they arrive: the multishot receives end with ENOBUFS
/// (counted as `ring_starved`). Afterwards traffic must flow both ways again, many times
/// more datagrams than the ring has buffers: the receives were armed again and every
/// buffer went back to the kernel.
#[test]
fn starved_receive_ring_is_counted_rearmed_and_refilled() {
    if !uring_runs() {
        return;
    }
    let mut x = node();
    let mut a = node();
    let relay = Relay::start_config(
        ExitTable::new(1, vec![exit_spec("x", &x, None)]).expect("valid test table"),
        DataPlaneConfig {
            backend: BackendChoice::Uring,
            workers: 1,
            ring_buffers: SMALLEST_RING,
            ..Relay::config()
        },
    );
    let ap = a.add_peer(
        x.keys().public,
        PeerOptions {
            endpoint: Some(relay.addr),
            ..Default::default()
        },
    );
    let xa = x.add_peer(a.keys().public, PeerOptions::default());
    assert!(delivered(&mut a, ap, &mut x, &ip(b"before the flood")));
    assert!(delivered(&mut x, xa, &mut a, &reply(b"before the flood")));
    let relay_exit_side = x.endpoint(xa).expect("the exit knows the relay's socket");
    let before = io_now(&relay);

    let body = [0x5au8; 1380];
    let to_exit: Vec<Vec<u8>> = (0..BURST * 4)
        .map(|_| a.seal(ap, &ip(&body)).expect("session"))
        .collect();
    let to_client: Vec<Vec<u8>> = (0..BURST * 4)
        .map(|_| x.seal(xa, &reply(&body)).expect("session"))
        .collect();
    let a_sock = a.socket_clone().expect("client socket");
    let x_sock = x.socket_clone().expect("exit socket");
    // Each round is a few thousand datagrams each way; one is nearly always enough, the
    // rounds are for a machine so busy that the worker kept up with a whole round.
    let mut starved = before.clone();
    for _ in 0..20 {
        std::thread::scope(|s| {
            s.spawn(|| flood(&a_sock, relay.addr, &to_exit));
            flood(&x_sock, relay_exit_side, &to_client);
        });
        starved = io_now(&relay);
        if starved.ring_starved > before.ring_starved {
            break;
        }
    }
    assert!(
        starved.ring_starved > before.ring_starved,
        "the floods should have emptied an {SMALLEST_RING}-buffer ring: {starved:?}"
    );
    drain(&a_sock);
    drain(&x_sock);

    // 64 round trips: 128 datagrams through 8 buffers, each one after the other arrived.
    for i in 0..64u32 {
        let body = format!("after the flood {i}");
        assert!(
            delivered(&mut a, ap, &mut x, &ip(body.as_bytes())),
            "client -> exit {i} lost after the ring ran dry: {:?}",
            io_now(&relay)
        );
        assert!(
            delivered(&mut x, xa, &mut a, &reply(body.as_bytes())),
            "exit -> client {i} lost after the ring ran dry: {:?}",
            io_now(&relay)
        );
    }
    let after = io_now(&relay);
    assert!(
        after.recv_calls >= starved.recv_calls + 128,
        "every datagram after the flood came through a receive: {after:?}"
    );
}

const CHILD_ENV: &str = "WRAITHGATE_TEST_ADDRESS_SPACE_CHILD";
const FALLBACK_TEST: &str = "auto_falls_back_to_portable_when_a_worker_cannot_map_its_buffers";

/// The probe's ring passes, but a worker's own buffers do not fit: in a child process
/// whose address space (RLIMIT_AS) has 384 MiB to spare, 2 workers of 4,096 receive
/// buffers (269 MB each) cannot both map theirs, whichever of them comes first. `--backend uring`
/// must fail saying so; `auto` must start on the portable backend with one log line naming
/// the reason, and carry traffic both ways.
#[test]
fn auto_falls_back_to_portable_when_a_worker_cannot_map_its_buffers() {
    if std::env::var_os(CHILD_ENV).is_some() {
        fallback_child();
        return;
    }
    if !uring_runs() {
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([FALLBACK_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{stderr}"
    );
    let fallbacks: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("falling back to the portable backend"))
        .collect();
    assert_eq!(fallbacks.len(), 1, "one log line:\n{stderr}");
    assert!(
        fallbacks[0].contains("WARN")
            && fallbacks[0].contains("mapping receive buffers")
            && fallbacks[0].contains("ring_buffers"),
        "the line names the step and the setting: {}",
        fallbacks[0]
    );
}

fn fallback_child() {
    use nix::sys::resource::{setrlimit, Resource};
    use wraithgate_relay::io::{DataPlane, StartError};
    use wraithgate_relay::table::SharedTable;

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let vm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/self/status");
    let limit = vm_kib * 1024 + (384 << 20);
    setrlimit(Resource::RLIMIT_AS, limit, limit).expect("setrlimit(RLIMIT_AS)");

    let mut x = node();
    let mut a = node();
    let table = || ExitTable::new(1, vec![exit_spec("x", &x, None)]).expect("valid test table");
    let cfg = |backend| DataPlaneConfig {
        backend,
        workers: 2,
        ring_buffers: 4_096,
        ..Relay::config()
    };
    match DataPlane::start(cfg(BackendChoice::Uring), SharedTable::new(table())) {
        Err(StartError::Uring(e)) => {
            assert_eq!(e.step, "mapping receive buffers", "{e}");
            assert_eq!(
                e.error.raw_os_error(),
                Some(nix::errno::Errno::ENOMEM as i32),
                "{e}"
            );
        }
        Err(e) => panic!("--backend uring should fail on the buffers: {e}"),
        Ok(dp) => panic!(
            "--backend uring started ({}) with 538 MB of buffers in 384 MiB of address space",
            dp.backend()
        ),
    }

    let relay = Relay::start_config(table(), cfg(BackendChoice::Auto));
    assert_eq!(relay.dp.backend(), "portable");
    let ap = a.add_peer(
        x.keys().public,
        PeerOptions {
            endpoint: Some(relay.addr),
            ..Default::default()
        },
    );
    let xa = x.add_peer(a.keys().public, PeerOptions::default());
    assert!(delivered(&mut a, ap, &mut x, &ip(b"through the fallback")));
    assert!(delivered(
        &mut x,
        xa,
        &mut a,
        &reply(b"through the fallback")
    ));
}

/// The largest `ring_buffers` the configuration accepts still gives a ring the kernel
/// sets up: the completion queue a worker asks for stays within the kernel's maximum
/// (65,536 entries), and the worker carries traffic. (The buffers are mapped, not touched:
/// this costs address space, not memory.)
#[test]
fn the_largest_ring_buffers_setting_starts_on_io_uring() {
    if !uring_runs() {
        return;
    }
    let mut x = node();
    let mut a = node();
    let relay = Relay::start_config(
        ExitTable::new(1, vec![exit_spec("x", &x, None)]).expect("valid test table"),
        DataPlaneConfig {
            backend: BackendChoice::Uring,
            workers: 1,
            ring_buffers: 32_768,
            ..Relay::config()
        },
    );
    let ap = a.add_peer(
        x.keys().public,
        PeerOptions {
            endpoint: Some(relay.addr),
            ..Default::default()
        },
    );
    let xa = x.add_peer(a.keys().public, PeerOptions::default());
    assert!(delivered(&mut a, ap, &mut x, &ip(b"a big ring")));
    assert!(delivered(&mut x, xa, &mut a, &reply(b"a big ring")));
}
