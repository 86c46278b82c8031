//! Test support: packets built by hand with checksums from a checksum routine of their own
//! (sharing no code with the module's), and TUN devices in network namespaces. The TUN and
//! namespace system calls are this file's `unsafe`; it is compiled for tests only.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const TCP_ACK: u8 = 0x10;

/// The RFC 1071 checksum the slow way: the parts end to end, 16-bit words, carries folded
/// at the end.
pub fn ones_sum(parts: &[&[u8]]) -> u16 {
    let all: Vec<u8> = parts.concat();
    let mut acc: u64 = 0;
    for pair in all.chunks(2) {
        acc += u64::from(pair[0]) << 8 | pair.get(1).map_or(0, |b| u64::from(*b));
    }
    while acc > 0xffff {
        acc = (acc >> 16) + (acc & 0xffff);
    }
    acc as u16
}

/// The pseudo-header of an IP packet's transport segment, as bytes.
pub fn pseudo(ip: &[u8], proto: u8, l4_len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    if ip[0] >> 4 == 6 {
        v.extend_from_slice(&ip[8..40]);
        v.extend_from_slice(&(l4_len as u32).to_be_bytes());
        v.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        v.extend_from_slice(&ip[12..20]);
        v.extend_from_slice(&[0, proto]);
        v.extend_from_slice(&(l4_len as u16).to_be_bytes());
    }
    v
}

/// Whether an IP packet's IPv4 header checksum (if any) and TCP/UDP checksum verify.
pub fn checksums_ok(p: &[u8]) -> bool {
    let (ip, proto) = if p[0] >> 4 == 6 {
        (40, p[6])
    } else {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        if ones_sum(&[&p[..ihl]]) != 0xffff {
            return false;
        }
        (ihl, p[9])
    };
    let ps = pseudo(p, proto, p.len() - ip);
    ones_sum(&[&ps, &p[ip..]]) == 0xffff
}

/// A TCP segment's description, for [`tcp_packet`].
#[derive(Debug, Clone)]
pub struct Tcp {
    pub v6: bool,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub options: Vec<u8>,
    pub ip_id: u16,
    pub df: bool,
    pub ttl: u8,
}

impl Default for Tcp {
    fn default() -> Tcp {
        Tcp {
            v6: false,
            src_port: 40_000,
            dst_port: 5201,
            seq: 1_000_000,
            ack: 77,
            flags: TCP_ACK,
            window: 500,
            // Timestamps, as Linux sends them: NOP NOP TS.
            options: vec![1, 1, 8, 10, 0, 0, 1, 2, 0, 0, 3, 4],
            ip_id: 0x1234,
            df: true,
            ttl: 64,
        }
    }
}

pub const SRC4: [u8; 4] = [10, 77, 1, 1];
pub const DST4: [u8; 4] = [10, 77, 2, 1];
pub const SRC6: [u8; 16] = [0xfd, 0, 0, 0x77, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const DST6: [u8; 16] = [0xfd, 0, 0, 0x77, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An IP header for `l4_len` transport bytes of `proto`.
fn ip_header(v6: bool, proto: u8, l4_len: usize, id: u16, df: bool, ttl: u8) -> Vec<u8> {
    if v6 {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(l4_len as u16).to_be_bytes());
        h.extend_from_slice(&[proto, ttl]);
        h.extend_from_slice(&SRC6);
        h.extend_from_slice(&DST6);
        h
    } else {
        let mut h = vec![0x45, 0];
        h.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h.extend_from_slice(&[if df { 0x40 } else { 0 }, 0, ttl, proto, 0, 0]);
        h.extend_from_slice(&SRC4);
        h.extend_from_slice(&DST4);
        let ck = !ones_sum(&[&h]);
        h[10..12].copy_from_slice(&ck.to_be_bytes());
        h
    }
}

/// A TCP/IP packet with correct checksums.
pub fn tcp_packet(t: &Tcp, payload: &[u8]) -> Vec<u8> {
    assert_eq!(t.options.len() % 4, 0);
    let doff = 20 + t.options.len();
    let mut p = ip_header(t.v6, 6, doff + payload.len(), t.ip_id, t.df, t.ttl);
    let ip = p.len();
    p.extend_from_slice(&t.src_port.to_be_bytes());
    p.extend_from_slice(&t.dst_port.to_be_bytes());
    p.extend_from_slice(&t.seq.to_be_bytes());
    p.extend_from_slice(&t.ack.to_be_bytes());
    p.extend_from_slice(&[((doff / 4) as u8) << 4, t.flags]);
    p.extend_from_slice(&t.window.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0]);
    p.extend_from_slice(&t.options);
    p.extend_from_slice(payload);
    let ps = pseudo(&p, 6, p.len() - ip);
    let ck = !ones_sum(&[&ps, &p[ip..]]);
    p[ip + 16..ip + 18].copy_from_slice(&ck.to_be_bytes());
    p
}

/// A UDP/IP packet with correct checksums.
pub fn udp_packet(v6: bool, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = ip_header(v6, 17, 8 + payload.len(), id, false, 64);
    let ip = p.len();
    p.extend_from_slice(&4000u16.to_be_bytes());
    p.extend_from_slice(&5000u16.to_be_bytes());
    p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let ps = pseudo(&p, 17, p.len() - ip);
    let ck = match !ones_sum(&[&ps, &p[ip..]]) {
        0 => 0xffff,
        c => c,
    };
    p[ip + 6..ip + 8].copy_from_slice(&ck.to_be_bytes());
    p
}

/// What a TCP super-packet looks like when the kernel hands it over: the headers of its
/// first segment with the whole length, and the pseudo-header sum in the checksum field.
pub fn tso_read(t: &Tcp, payload: &[u8], gso_size: u16) -> Vec<u8> {
    let p = tcp_packet(t, payload);
    let ip = if t.v6 { 40 } else { 20 };
    partial(p, ip, 16, if t.v6 { 4 } else { 1 }, gso_size, 6)
}

/// A UDP super-packet as the kernel hands it over.
pub fn uso_read(v6: bool, id: u16, payload: &[u8], gso_size: u16) -> Vec<u8> {
    let p = udp_packet(v6, id, payload);
    let ip = if v6 { 40 } else { 20 };
    partial(p, ip, 6, 5, gso_size, 17)
}

/// `p` with its transport checksum replaced by the pseudo-header sum, behind a header with
/// NEEDS_CSUM.
pub fn partial(
    mut p: Vec<u8>,
    ip: usize,
    csum_offset: u16,
    gso_type: u8,
    gso_size: u16,
    proto: u8,
) -> Vec<u8> {
    let ps = pseudo(&p, proto, p.len() - ip);
    let folded = ones_sum(&[&ps]);
    let at = ip + usize::from(csum_offset);
    p[at..at + 2].copy_from_slice(&folded.to_be_bytes());
    let mut read = vec![1, gso_type];
    for v in [ip as u16 + 20, gso_size, ip as u16, csum_offset] {
        read.extend_from_slice(&v.to_le_bytes());
    }
    read.extend_from_slice(&p);
    read
}

/// What a device does with a NEEDS_CSUM packet: the checksum from `csum_start` to the end,
/// the field included, complemented into the field. `write` is a header and its packet;
/// returns the packet.
pub fn complete_as_a_device(write: &[u8]) -> Vec<u8> {
    let mut p = write[10..].to_vec();
    if write[0] & 1 != 0 {
        let start = usize::from(u16::from_le_bytes([write[6], write[7]]));
        let at = start + usize::from(u16::from_le_bytes([write[8], write[9]]));
        let ck = !ones_sum(&[&p[start..]]);
        p[at..at + 2].copy_from_slice(&ck.to_be_bytes());
    }
    p
}

// ---- TUN devices and namespaces (root only) ----

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Opens `/dev/net/tun` as TUN `name` with `IFF_NO_PI | IFF_VNET_HDR` and asks for
/// `offloads` (`TUN_F_*`); returns the device's file, non-blocking.
pub fn open_tun(name: &str, offloads: u32) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    assert!(name.len() < libc::IFNAMSIZ, "interface name too long");
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = IFF_TUN | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: the fd is open for the whole call and TUNSETIFF reads and writes one ifreq,
    // which `ifr` is and outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags).
    if unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            TUNSETOFFLOAD,
            libc::c_ulong::from(offloads),
        )
    } < 0
    {
        return Err(io::Error::last_os_error());
    }
    set_nonblocking(&file)?;
    Ok(file)
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd open for the whole call; no pointers involved.
    let rc = unsafe {
        let fl = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits up to `ms` for `file` to be readable.
pub fn wait_readable(file: &File, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd, valid and exclusively borrowed for the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Whether this test may run: root and `ip`. If not, says why loudly and returns false, or
/// panics when `WRAITHGATE_REQUIRE_ALL_TESTS` forbids skipping (CI).
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("needs root (network namespaces, TUN devices)")
    } else if !Path::new("/dev/net/tun").exists() {
        Some("needs /dev/net/tun")
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("needs ip in PATH (Debian: apt-get install iproute2)")
    } else {
        None
    };
    let Some(why) = why else { return true };
    assert!(
        std::env::var_os("WRAITHGATE_REQUIRE_ALL_TESTS").is_none(),
        "{test} cannot run: {why}; WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping"
    );
    eprintln!("\n*** SKIPPED {test}: {why}. It runs as root in CI (.ci/run). ***\n");
    false
}

/// A network namespace of this process, deleted (with its devices) on drop.
#[derive(Debug)]
pub struct Netns(pub String);

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "wgv-{}-{}-{tag}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.0];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A counter of the namespace's `/proc/net/snmp` (`Ip`/`InHdrErrors`, `Tcp`/`InCsumErrors`).
    pub fn snmp(&self, group: &str, name: &str) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "cat", "/proc/net/snmp"])
            .output()
            .expect("read /proc/net/snmp");
        let text = String::from_utf8_lossy(&out.stdout);
        let prefix = format!("{group}:");
        let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
        let (names, values) = (lines.next().expect(group), lines.next().expect(group));
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{group} {name}"));
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    }

    /// Runs `f` on a fresh thread inside the namespace (sockets and TUNs it opens live
    /// there) and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().expect("namespace thread")
    }

    /// Starts `f` on a thread inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = Path::new("/run/netns").join(&self.0);
        std::thread::spawn(move || {
            let file = File::open(&path).expect("namespace handle");
            // SAFETY: `file` is an open namespace fd for the whole call; setns changes only
            // this thread's network namespace, and the thread is ours alone.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets a socket option whose value is an int (UDP_SEGMENT and the like).
pub fn set_int_option(fd: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: `value` is a live int for the call and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
