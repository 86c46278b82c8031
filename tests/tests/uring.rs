//! The io_uring backend's receive buffers over real loopback sockets: what happens when a
//! worker's provided-buffer ring runs dry. Only the io_uring backend has such a ring; the
//! test skips loudly where io_uring cannot be set up.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use wraithgate_control::testbed::{
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
