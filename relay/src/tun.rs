//! The Exit role's TUN device: the one module that talks to `/dev/net/tun` and sets the
//! interface's addresses, MTU and state (ioctls; each `unsafe` block has its `SAFETY:`).
//!
//! The device is multi-queue (`IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE`): one queue per worker,
//! each a non-blocking descriptor the worker registers in its wait. The kernel picks the
//! queue a packet leaves the host on by flow hash. The device is not persistent: it goes
//! away with its last queue, so a stopped (or killed) node leaves nothing behind.
//!
//! Packets move in batches ([`TunQueue::read_batch`], [`TunTx`]), plain IP packets one per
//! read or write: the place where a `virtio_net_hdr` (`IFF_VNET_HDR`, TSO split and
//! coalesce) plugs in later is these two calls, which then carry super-packets.
//!
//! Addresses and MTU are set with the classic `SIOCSIF*` ioctls (IPv6 through an
//! `in6_ifreq` on an AF_INET6 socket) rather than netlink: four synchronous calls at
//! start-up, with no async runtime on the data plane's start path and no new dependency.

use std::fs::OpenOptions;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::table::IpNet;

/// Largest IP packet read from or written to the device (the largest MTU we accept).
pub const MAX_PACKET: usize = 65_535;
/// Default MTU: WireGuard's 1420 (a 1500-byte path less 80 bytes of IPv6/UDP/WireGuard).
pub const DEFAULT_MTU: u16 = 1420;

/// The `[tun]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// Interface name, at most 15 bytes.
    pub name: String,
    /// Addresses of the interface, with their prefixes (a route to each prefix follows).
    pub addresses: Vec<IpNet>,
    pub mtu: u16,
}

impl TunConfig {
    /// Checks what the kernel would refuse, so `--check` catches it: the name's length and
    /// characters, the MTU's range.
    pub fn validate(&self) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty() || n.len() > 15 {
            return Err(format!("name {n:?} must be 1 to 15 bytes"));
        }
        if n == "." || n == ".." || n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
            return Err(format!(
                "name {n:?} may not contain '/', ':' or white space"
            ));
        }
        if !(576..=9000).contains(&self.mtu) {
            return Err(format!("mtu {} must be between 576 and 9000", self.mtu));
        }
        if self.mtu < 1280 && self.addresses.iter().any(|a| a.addr().is_ipv6()) {
            return Err(format!(
                "mtu {} is below IPv6's minimum of 1280, and an address is IPv6",
                self.mtu
            ));
        }
        Ok(())
    }
}

/// A multi-queue TUN device as created: its queues until the workers take them.
#[derive(Debug)]
pub struct TunDevice {
    name: String,
    queues: Vec<TunQueue>,
}

impl TunDevice {
    /// Creates the device with `queues` queues (at least one), sets its MTU and addresses
    /// and brings it up. An interface of that name that exists already is an error unless
    /// it is a TUN device no one holds (the kernel then attaches to it).
    pub fn create(cfg: &TunConfig, queues: usize) -> io::Result<TunDevice> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut qs = Vec::with_capacity(queues.max(1));
        for _ in 0..queues.max(1) {
            qs.push(TunQueue::open(&cfg.name)?);
        }
        let ctl = control_socket(libc::AF_INET)?;
        let mut req = IfReq::new(&cfg.name);
        req.data.mtu = libc::c_int::from(cfg.mtu);
        ioctl(&ctl, libc::SIOCSIFMTU, &mut req)?;
        for a in &cfg.addresses {
            set_address(&ctl, &cfg.name, *a)?;
        }
        let mut req = IfReq::new(&cfg.name);
        ioctl(&ctl, libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.data.flags };
        req.data.flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        ioctl(&ctl, libc::SIOCSIFFLAGS, &mut req)?;
        Ok(TunDevice {
            name: cfg.name.clone(),
            queues: qs,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hands the queues over, one per worker in order.
    pub fn take_queues(&mut self) -> Vec<TunQueue> {
        std::mem::take(&mut self.queues)
    }
}

/// One queue of the device: a non-blocking descriptor a worker reads and writes IP
/// packets on.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
}

impl TunQueue {
    fn open(name: &str) -> io::Result<TunQueue> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let fd = OwnedFd::from(file);
        let mut req = IfReq::new(name);
        req.data.flags = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes the chosen name back into) a whole `ifreq`,
        // which `req` is, on a descriptor of /dev/net/tun we own.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(TunQueue { fd })
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one packet into `buf`; `WouldBlock` when the queue is empty.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call's duration,
        // and the descriptor is ours.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Reads up to `batch.capacity()` packets. Returns how many, and whether the queue is
    /// drained (a read found it empty) rather than the batch full.
    pub fn read_batch(&self, batch: &mut TunRxBatch) -> io::Result<(usize, bool)> {
        batch.lens.clear();
        for i in 0..batch.slots {
            let slot = &mut batch.buf[i * MAX_PACKET..(i + 1) * MAX_PACKET];
            match self.read(slot) {
                Ok(n) => batch.lens.push(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok((batch.lens.len(), true))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if batch.lens.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok((batch.lens.len(), false))
    }

    /// Writes one IP packet.
    pub fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        // SAFETY: `pkt` is valid for reads of `pkt.len()` bytes for the call's duration,
        // and the descriptor is ours.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Buffers for one [`TunQueue::read_batch`]: allocated once per worker.
#[derive(Debug)]
pub struct TunRxBatch {
    buf: Vec<u8>,
    slots: usize,
    lens: Vec<usize>,
}

impl TunRxBatch {
    pub fn new(slots: usize) -> Self {
        TunRxBatch {
            buf: vec![0; slots.max(1) * MAX_PACKET],
            slots: slots.max(1),
            lens: Vec::with_capacity(slots.max(1)),
        }
    }

    pub fn len(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Packet `i` of the last read.
    pub fn packet(&self, i: usize) -> &[u8] {
        &self.buf[i * MAX_PACKET..i * MAX_PACKET + self.lens[i]]
    }
}

/// Packets waiting to be written to a queue: copied in as the roles emit them (their
/// scratch buffers are reused at once), written by [`TunTx::flush`] at the end of the
/// batch. Fixed size; a push that finds it full flushes first.
#[derive(Debug)]
pub struct TunTx {
    buf: Vec<u8>,
    used: usize,
    lens: Vec<usize>,
}

/// What [`TunTx::flush`] wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    pub packets: u64,
    pub bytes: u64,
    pub failed: u64,
}

impl TunTx {
    const CAPACITY: usize = 256 << 10;

    pub fn new() -> Self {
        TunTx {
            buf: vec![0; Self::CAPACITY],
            used: 0,
            lens: Vec::with_capacity(256),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Queues a copy of `pkt`, writing what waits first when there is no room.
    pub fn push(&mut self, q: &TunQueue, pkt: &[u8]) -> Flushed {
        let mut f = Flushed::default();
        if pkt.len() > Self::CAPACITY - self.used {
            f = self.flush(q);
        }
        if pkt.len() > Self::CAPACITY {
            f.failed += 1;
            return f;
        }
        self.buf[self.used..self.used + pkt.len()].copy_from_slice(pkt);
        self.used += pkt.len();
        self.lens.push(pkt.len());
        f
    }

    /// Writes every queued packet, in order.
    pub fn flush(&mut self, q: &TunQueue) -> Flushed {
        let mut f = Flushed::default();
        let mut off = 0;
        for &len in &self.lens {
            match q.write(&self.buf[off..off + len]) {
                Ok(_) => {
                    f.packets += 1;
                    f.bytes += len as u64;
                }
                // A full queue (EAGAIN) or a packet the kernel refuses: dropped, counted.
                Err(_) => f.failed += 1,
            }
            off += len;
        }
        self.lens.clear();
        self.used = 0;
        f
    }
}

impl Default for TunTx {
    fn default() -> Self {
        Self::new()
    }
}

/// `struct ifreq`: a name and a 24-byte union, of which we use the members below.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
union IfReqData {
    flags: libc::c_short,
    mtu: libc::c_int,
    ifindex: libc::c_int,
    addr: libc::sockaddr_in,
    _size: [u8; 24],
}

impl IfReq {
    /// A request for interface `name` (validated: at most 15 bytes), the rest zero.
    fn new(name: &str) -> IfReq {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: IfReqData { _size: [0; 24] },
        };
        for (d, s) in req
            .name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *d = s as libc::c_char;
        }
        req
    }
}

/// `struct in6_ifreq`, for SIOCSIFADDR on an AF_INET6 socket.
#[repr(C)]
struct In6IfReq {
    addr: libc::in6_addr,
    prefixlen: u32,
    ifindex: libc::c_int,
}

fn control_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: every request passed here (SIOC[GS]IF*) reads or writes one `struct ifreq`,
    // which `req` is, for the call's duration.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr_in(ip: std::net::Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn set_address(ctl: &OwnedFd, name: &str, net: IpNet) -> io::Result<()> {
    match net.addr() {
        IpAddr::V4(ip) => {
            let mut req = IfReq::new(name);
            req.data.addr = sockaddr_in(ip);
            ioctl(ctl, libc::SIOCSIFADDR, &mut req)?;
            let mask = u32::MAX
                .checked_shl(32 - u32::from(net.prefix_len()))
                .unwrap_or(0);
            let mut req = IfReq::new(name);
            req.data.addr = sockaddr_in(mask.into());
            ioctl(ctl, libc::SIOCSIFNETMASK, &mut req)
        }
        IpAddr::V6(ip) => {
            let mut req = IfReq::new(name);
            ioctl(ctl, libc::SIOCGIFINDEX, &mut req)?;
            // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
            let ifindex = unsafe { req.data.ifindex };
            let sock6 = control_socket(libc::AF_INET6)?;
            let mut req6 = In6IfReq {
                addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                prefixlen: u32::from(net.prefix_len()),
                ifindex,
            };
            // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one `struct in6_ifreq`,
            // which `req6` is (same layout), for the call's duration.
            let r = unsafe {
                libc::ioctl(
                    sock6.as_raw_fd(),
                    libc::SIOCSIFADDR as _,
                    &mut req6 as *mut In6IfReq,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_the_problem() {
        let ok = TunConfig {
            name: "wg-exit0".into(),
            addresses: vec!["10.9.0.1/24".parse().unwrap()],
            mtu: 1420,
        };
        assert!(ok.validate().is_ok());
        let long = TunConfig {
            name: "a-very-long-name-indeed".into(),
            ..ok.clone()
        };
        assert!(long.validate().unwrap_err().contains("1 to 15 bytes"));
        let slash = TunConfig {
            name: "a/b".into(),
            ..ok.clone()
        };
        assert!(slash.validate().is_err());
        let tiny = TunConfig {
            mtu: 100,
            ..ok.clone()
        };
        assert!(tiny.validate().unwrap_err().contains("mtu"));
        let v6 = TunConfig {
            mtu: 1000,
            addresses: vec!["fd00::1/64".parse().unwrap()],
            ..ok
        };
        assert!(v6.validate().unwrap_err().contains("1280"));
    }
}
