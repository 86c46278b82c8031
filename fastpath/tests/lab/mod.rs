//! A client, a relay and an exit network namespace joined by veth pairs, for the tests that
//! attach the program for real (root only).
//!
//! ```text
//!  client ns               relay ns                         exit ns
//!  c0 10.17.1.2, .3  ──  rc0 10.17.1.1 | re0 10.17.2.1  ──  e0 10.17.2.2
//! ```
//!
//! Each lab has its own namespaces (named after the process and a counter), so the tests of
//! one binary run in parallel; dropping the lab deletes them and the veths with them.

#![allow(dead_code)] // each test binary uses its own part of the helpers

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 17, 1, 2);
/// A second address of the client namespace: "another source".
pub const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 17, 1, 3);
pub const LISTEN: Ipv4Addr = Ipv4Addr::new(10, 17, 1, 1);
pub const RELAY_EXIT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 17, 2, 1);
pub const EXIT: Ipv4Addr = Ipv4Addr::new(10, 17, 2, 2);
/// The relay's interfaces, inside the relay namespace.
pub const RELAY_INTERFACES: [&str; 2] = ["rc0", "re0"];

/// Whether the namespace tests can run; if not, says why loudly and returns false, or
/// panics when `WRAITHGATE_REQUIRE_ALL_TESTS` forbids skipping (CI).
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("needs root (network namespaces, veth, BPF)".to_owned())
    } else {
        ["ip", "ethtool"]
            .iter()
            .find(|p| !in_path(p))
            .map(|p| format!("needs {p} in PATH (Debian: apt-get install iproute2 ethtool)"))
    };
    let Some(why) = why else { return true };
    if std::env::var_os("WRAITHGATE_REQUIRE_ALL_TESTS").is_none() {
        eprintln!("\n*** SKIPPED {test}: {why}. It runs as root in CI (.ci/run). ***\n");
        return false;
    }
    panic!("{test} cannot run: {why}; WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping");
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// How the veths treat checksums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checksums {
    /// No offload anywhere: every datagram carries its final UDP checksum on every hop and
    /// every receiving stack verifies it (a bad one is dropped and counted).
    Full,
    /// The client's veth keeps its offloads (so UDP_SEGMENT builds GSO trains, which carry
    /// CHECKSUM_PARTIAL through the relay); the relay's exit-side veth has none, so the
    /// kernel segments the train and computes each checksum from the pseudo-header sum
    /// the program rewrote; the exit verifies them.
    GsoFromClient,
}

#[derive(Debug)]
pub struct Lab {
    pub client: String,
    pub relay: String,
    pub exit: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Lab {
    pub fn new(checksums: Checksums) -> Lab {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("wgf-{}-{n}", std::process::id());
        let lab = Lab {
            client: format!("{base}-c"),
            relay: format!("{base}-r"),
            exit: format!("{base}-e"),
        };
        for ns in [&lab.client, &lab.relay, &lab.exit] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (c, r, e) = (&lab.client, &lab.relay, &lab.exit);
        ip(&[
            "link", "add", "c0", "netns", c, "type", "veth", "peer", "name", "rc0", "netns", r,
        ]);
        ip(&[
            "link", "add", "e0", "netns", e, "type", "veth", "peer", "name", "re0", "netns", r,
        ]);
        for (ns, dev, addrs) in [
            (c, "c0", &["10.17.1.2/24", "10.17.1.3/24"][..]),
            (r, "rc0", &["10.17.1.1/24"][..]),
            (r, "re0", &["10.17.2.1/24"][..]),
            (e, "e0", &["10.17.2.2/24"][..]),
        ] {
            for a in addrs {
                ip(&["-n", ns, "addr", "add", a, "dev", dev]);
            }
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        // The FIB lookup the program does refuses to route what arrives on an interface
        // that does not forward.
        run(Command::new("ip").args([
            "netns",
            "exec",
            r,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
        ]));
        match checksums {
            Checksums::Full => {
                for (ns, dev) in [(c, "c0"), (r, "rc0"), (r, "re0"), (e, "e0")] {
                    ethtool(ns, dev, &["tx", "off", "rx", "off"]);
                }
            }
            Checksums::GsoFromClient => {
                ethtool(r, "re0", &["tx", "off"]);
                ethtool(e, "e0", &["rx", "off"]);
                ethtool(r, "rc0", &["tx", "off"]);
                ethtool(c, "c0", &["rx", "off"]);
            }
        }
        lab
    }

    /// Runs `f` on a thread inside namespace `ns`: sockets it creates live there, and the
    /// loader resolves interface names there.
    pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = Path::new("/run/netns").join(ns);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("namespace handle");
            // SAFETY: `file` is an open namespace file descriptor for the whole call, and
            // setns only changes this (fresh, short-lived) thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }

    pub fn udp(ns: &str, addr: SocketAddrV4) -> UdpSocket {
        Lab::within(ns, move || {
            let s = UdpSocket::bind(addr).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        })
    }

    /// A raw socket that sees every UDP datagram delivered in `ns`, header and all.
    pub fn raw_udp(ns: &str) -> socket2::Socket {
        Lab::within(ns, || {
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::UDP),
            )
            .expect("raw socket");
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            s
        })
    }

    /// The namespace's UDP `InCsumErrors` counter.
    pub fn udp_checksum_errors(ns: &str) -> u64 {
        let snmp = run(Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/snmp"]));
        let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let i = names
            .split_whitespace()
            .position(|n| n == "InCsumErrors")
            .unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.relay, &self.exit] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

fn ethtool(ns: &str, dev: &str, features: &[&str]) {
    run(Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", dev])
        .args(features));
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every datagram `socket` receives within `window` (each with its source).
pub fn drain(socket: &UdpSocket, window: Duration) -> Vec<(Vec<u8>, SocketAddr)> {
    let end = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < end {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => got.push((buf[..n].to_vec(), from)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    got
}

/// Waits up to a second for `count` datagrams, then a little longer for any extra.
pub fn expect(socket: &UdpSocket, count: usize) -> Vec<(Vec<u8>, SocketAddr)> {
    let end = Instant::now() + Duration::from_secs(2);
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < end {
        got.extend(drain(socket, Duration::from_millis(50)));
    }
    got.extend(drain(socket, Duration::from_millis(100)));
    got
}

/// Raw IPv4 packets (UDP) that `raw` received, from `from` to `to`.
pub fn raw_packets(raw: &socket2::Socket, from: Ipv4Addr, to: Ipv4Addr) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_millis(300);
    let mut buf = [MaybeUninit::<u8>::uninit(); 65_536];
    while Instant::now() < end {
        match raw.recv(&mut buf) {
            Ok(n) => {
                // SAFETY: recv initialised the first `n` bytes.
                let p: Vec<u8> = buf[..n]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                if p.len() >= 28 && p[12..16] == from.octets() && p[16..20] == to.octets() {
                    got.push(p);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("raw recv: {e}"),
        }
    }
    got
}

/// Whether an IPv4 packet's UDP checksum is present and correct (RFC 768: the one's
/// complement sum over the pseudo-header and the datagram is all ones).
pub fn udp_checksum_ok(packet: &[u8]) -> bool {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let udp = &packet[ihl..];
    if udp[6..8] == [0, 0] {
        return false;
    }
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for chunk in bytes.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&packet[12..20]);
    add(&[0, 17]);
    add(&u16::try_from(udp.len()).unwrap().to_be_bytes());
    add(udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

/// A WireGuard transport message (type 4) of `len` bytes (≥ 32, a multiple of 16).
pub fn transport(receiver_index: u32, counter: u64, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len];
    m[0] = 4;
    m[4..8].copy_from_slice(&receiver_index.to_le_bytes());
    m[8..16].copy_from_slice(&counter.to_le_bytes());
    for (i, b) in m[16..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(counter as u8);
    }
    m
}

/// A message of another type with the length WireGuard gives it: 1 initiation (148 B),
/// 2 response (92 B), 3 cookie reply (64 B).
pub fn handshake(kind: u8, receiver_index: u32) -> Vec<u8> {
    let len = match kind {
        1 => 148,
        2 => 92,
        3 => 64,
        _ => panic!("not a handshake type"),
    };
    let mut m = vec![0x5a; len];
    m[0] = kind;
    m[1..4].fill(0);
    m[4..8].copy_from_slice(&receiver_index.to_le_bytes());
    m
}

/// Sets a SOL_UDP option (UDP_GRO, UDP_SEGMENT) on `socket`.
pub fn set_udp_option(socket: &UdpSocket, option: libc::c_int, value: libc::c_int) {
    // SAFETY: a valid socket and a pointer to a c_int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            option,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SOL_UDP option {option}: {}",
        io::Error::last_os_error()
    );
}

/// Sets UDP_SEGMENT on `socket`: each send of more than `size` bytes leaves as one GSO
/// train of `size`-byte datagrams (the last may be shorter).
pub fn set_udp_segment(socket: &UdpSocket, size: u16) {
    set_udp_option(socket, libc::UDP_SEGMENT, libc::c_int::from(size));
}
