//! The Exit role's TUN device: the one module that talks to `/dev/net/tun` and sets the
//! interface's addresses, MTU and state (ioctls; each `unsafe` block has its `SAFETY:`).
//!
//! The device is multi-queue (`IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE`): one queue per worker,
//! each a non-blocking descriptor the worker registers in its wait. The kernel picks the
//! queue a packet leaves the host on by flow hash. The device is not persistent: it goes
//! away with its last queue, so a stopped (or killed) node leaves nothing behind.
//!
//! Packets move in batches ([`TunQueue::read_batch`], [`TunTx`]). Unless `[tun] offload`
//! is `"off"`, the device is opened with `IFF_VNET_HDR` and `TUNSETOFFLOAD` (checksum, TSO
//! and, where the kernel has it, USO): every read and write then starts with a
//! `virtio_net_hdr` and may carry a TCP or UDP super-packet of up to 64 KiB, so the kernel
//! runs its TCP/IP stack once per super-packet instead of once per MTU-sized packet. These
//! two calls hide it: a read is split ([`vnet::split`]) into the MTU-sized packets the
//! peers get, and the decrypted packets of a batch are coalesced ([`vnet::Coalescer`])
//! into as few writes as possible. A kernel that refuses the offloads gets plain packets,
//! one per read or write.
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
use crate::vnet::{self, Coalescer, SplitError, VirtioNetHdr, VNET_HDR_LEN};

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
    /// Whether to ask the kernel for super-packets (`[tun] offload`).
    pub offload: TunOffload,
}

/// `[tun] offload`: whether the device carries super-packets (`IFF_VNET_HDR` and
/// `TUNSETOFFLOAD`), split on read and coalesced on write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TunOffload {
    /// Ask for them, and fall back to plain packets if the kernel refuses.
    #[default]
    Auto,
    /// Plain IP packets, one per read or write.
    Off,
}

/// Offloads asked of the kernel, the first it accepts wins: USO exists from Linux 6.2, and
/// an older kernel refuses the whole set with `EINVAL`.
const OFFLOAD_SETS: [u32; 2] = [
    vnet::TUN_F_CSUM | vnet::TUN_F_TSO4 | vnet::TUN_F_TSO6 | vnet::TUN_F_USO4 | vnet::TUN_F_USO6,
    vnet::TUN_F_CSUM | vnet::TUN_F_TSO4 | vnet::TUN_F_TSO6,
];

/// The names of `TUNSETOFFLOAD` flags, for the log.
fn offload_names(flags: u32) -> String {
    let names = [
        (vnet::TUN_F_CSUM, "csum"),
        (vnet::TUN_F_TSO4, "tso4"),
        (vnet::TUN_F_TSO6, "tso6"),
        (vnet::TUN_F_USO4, "uso4"),
        (vnet::TUN_F_USO6, "uso6"),
    ];
    let on: Vec<&str> = names
        .iter()
        .filter(|(f, _)| flags & f != 0)
        .map(|(_, n)| *n)
        .collect();
    on.join(" ")
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
    /// The `TUNSETOFFLOAD` flags the kernel accepted; 0 for plain packets.
    offloads: u32,
}

impl TunDevice {
    /// Creates the device with `queues` queues (at least one), sets its MTU and addresses
    /// and brings it up. An interface of that name that exists already is an error unless
    /// it is a TUN device no one holds (the kernel then attaches to it).
    ///
    /// With `offload = "auto"` the queues carry super-packets if the kernel accepts
    /// `IFF_VNET_HDR` and `TUNSETOFFLOAD`, else plain packets; one line says which.
    pub fn create(cfg: &TunConfig, queues: usize) -> io::Result<TunDevice> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let (qs, offloads) = open_queues(cfg, queues.max(1))?;
        if offloads != 0 {
            tracing::info!(
                device = %cfg.name,
                offloads = %offload_names(offloads),
                "TUN offloads on: super-packets are split on read and coalesced on write"
            );
        } else if cfg.offload == TunOffload::Off {
            tracing::info!(device = %cfg.name, "TUN offloads off ([tun] offload = \"off\")");
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
            offloads,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `TUNSETOFFLOAD` flags in force (`vnet::TUN_F_*`); 0 when packets are plain.
    pub fn offloads(&self) -> u32 {
        self.offloads
    }

    /// Hands the queues over, one per worker in order.
    pub fn take_queues(&mut self) -> Vec<TunQueue> {
        std::mem::take(&mut self.queues)
    }
}

/// Opens the device's queues: offloading ones if `cfg` allows and the kernel accepts,
/// else plain ones. Returns them and the offloads in force (0: plain).
fn open_queues(cfg: &TunConfig, queues: usize) -> io::Result<(Vec<TunQueue>, u32)> {
    let mtu = usize::from(cfg.mtu);
    if cfg.offload == TunOffload::Auto {
        match TunQueue::open_offloading(&cfg.name, mtu) {
            Ok((first, offloads)) => {
                let mut qs = Vec::with_capacity(queues);
                qs.push(first);
                for _ in 1..queues {
                    qs.push(TunQueue::open(&cfg.name, mtu, true)?);
                }
                return Ok((qs, offloads));
            }
            // The refused queue is closed (a device it created goes with it) and the device
            // is opened again, plain.
            Err(e) => tracing::info!(
                device = %cfg.name,
                error = %e,
                "TUN offloads off: the kernel refused IFF_VNET_HDR or TUNSETOFFLOAD; one packet per read or write"
            ),
        }
    }
    let qs = (0..queues)
        .map(|_| TunQueue::open(&cfg.name, mtu, false))
        .collect::<io::Result<Vec<_>>>()?;
    Ok((qs, 0))
}

/// One queue of the device: a non-blocking descriptor a worker reads and writes IP
/// packets on, each after a `virtio_net_hdr` when the device offloads.
#[derive(Debug)]
pub struct TunQueue {
    fd: OwnedFd,
    /// Opened with `IFF_VNET_HDR` (and the device given offloads).
    vnet: bool,
    /// The device's MTU: the longest packet a split yields.
    mtu: usize,
}

impl TunQueue {
    fn open(name: &str, mtu: usize, vnet: bool) -> io::Result<TunQueue> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let fd = OwnedFd::from(file);
        let mut req = IfReq::new(name);
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE;
        if vnet {
            flags |= libc::IFF_VNET_HDR;
        }
        req.data.flags = flags as libc::c_short;
        // SAFETY: TUNSETIFF reads (and writes the chosen name back into) a whole `ifreq`,
        // which `req` is, on a descriptor of /dev/net/tun we own.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(TunQueue { fd, vnet, mtu })
    }

    /// The device's first queue with `IFF_VNET_HDR`, a 10-byte header (no `num_buffers`)
    /// and the largest set of [`OFFLOAD_SETS`] the kernel accepts; the device's other
    /// queues share these settings. Returns the queue and the offloads set.
    fn open_offloading(name: &str, mtu: usize) -> io::Result<(TunQueue, u32)> {
        let q = TunQueue::open(name, mtu, true)?;
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which `size` is, for
        // the call's duration; the descriptor is ours.
        let r = unsafe { libc::ioctl(q.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut last = io::Error::from(io::ErrorKind::Unsupported);
        for flags in OFFLOAD_SETS {
            // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long of flags)
            // and touches no memory of ours; the descriptor is ours.
            let r = unsafe {
                libc::ioctl(
                    q.fd.as_raw_fd(),
                    libc::TUNSETOFFLOAD as _,
                    libc::c_ulong::from(flags),
                )
            };
            if r == 0 {
                return Ok((q, flags));
            }
            last = io::Error::last_os_error();
        }
        Err(last)
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

    /// Reads a batch: up to `batch`'s number of reads, each split into its packets when
    /// the queue offloads (see [`TunRxBatch`] for the limits). Returns how many packets,
    /// and whether the queue is drained (a read found it empty) rather than the batch full.
    pub fn read_batch(&self, batch: &mut TunRxBatch) -> io::Result<(usize, bool)> {
        batch.count = TunReadCounts::default();
        if self.vnet {
            self.read_split(batch)
        } else {
            self.read_plain(batch)
        }
    }

    fn read_plain(&self, batch: &mut TunRxBatch) -> io::Result<(usize, bool)> {
        batch.lens.clear();
        for i in 0..batch.slots {
            let slot = &mut batch.reads[i * MAX_PACKET..(i + 1) * MAX_PACKET];
            match self.read(slot) {
                Ok(n) => batch.lens.push(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    batch.count.reads = batch.lens.len() as u64;
                    return Ok((batch.lens.len(), true));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if batch.lens.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        batch.count.reads = batch.lens.len() as u64;
        Ok((batch.lens.len(), false))
    }

    /// Reads super-packets into the batch's one read buffer and splits each into its
    /// segment buffers, until a turn's worth of packets ([`TURN_SEGMENTS`]) or reads. A read
    /// whose packets no longer fit stays in the read buffer for the next call.
    fn read_split(&self, b: &mut TunRxBatch) -> io::Result<(usize, bool)> {
        let mut packets = 0;
        let mut reads = 0;
        while reads < b.slots && packets < TURN_SEGMENTS {
            let n = match b.pending.take() {
                Some(n) => n,
                None => match self.read(&mut b.reads) {
                    Ok(n) => {
                        b.count.reads += 1;
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((packets, true)),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if packets == 0 && b.count.reads == 0 => return Err(e),
                    Err(_) => break,
                },
            };
            reads += 1;
            let read = &b.reads[..n];
            match vnet::split(read, &mut b.segments[packets..], 0, &mut b.lens[packets..]) {
                Ok(k) => {
                    if k > 1 {
                        b.count.super_reads += 1;
                    }
                    packets += k;
                }
                Err(SplitError::TooManySegments { .. }) if packets > 0 => {
                    b.pending = Some(n);
                    break;
                }
                Err(e) => {
                    b.count.unsplittable += 1;
                    let hdr = VirtioNetHdr::decode(read).ok();
                    tracing::trace!(error = %e, reason = e.as_str(), ?hdr, "TUN read not split");
                }
            }
        }
        Ok((packets, false))
    }

    /// Writes one packet as it is: on an offloading queue, it must start with its
    /// `virtio_net_hdr`.
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

/// Packets an offloading queue's [`TunQueue::read_batch`] yields at most per call: a turn's
/// worth (about five 64 KiB super-packets at a 1420-byte MTU) before the sockets get theirs.
const TURN_SEGMENTS: usize = 256;
/// Segment buffers of an offloading batch: the most one super-packet can need (65,535 bytes
/// cut into the smallest MSS Linux sends, 48 bytes) plus a turn's worth before it, so no
/// read is ever too large to split.
const SEGMENT_BUFFERS: usize = TURN_SEGMENTS + MAX_PACKET / 48 + 1;

/// What the last [`TunQueue::read_batch`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TunReadCounts {
    /// `read(2)`s that returned a packet.
    pub reads: u64,
    /// Reads that were super-packets (split into two packets or more).
    pub super_reads: u64,
    /// Reads dropped because they could not be split.
    pub unsplittable: u64,
}

/// Buffers for [`TunQueue::read_batch`]: allocated once per worker, for the kind of queue
/// it is made for. Plain: one packet per slot. Offloading: one read buffer (header and
/// super-packet) and the segment buffers its splits fill.
#[derive(Debug)]
pub struct TunRxBatch {
    reads: Vec<u8>,
    slots: usize,
    /// Offloading: one buffer per packet, each of the device's MTU.
    segments: Vec<Box<[u8]>>,
    /// Length of each packet.
    lens: Vec<usize>,
    /// Offloading: a read left in `reads` because its packets did not fit.
    pending: Option<usize>,
    count: TunReadCounts,
}

impl TunRxBatch {
    /// Buffers for up to `slots` reads from `queue` per batch.
    pub fn new(queue: &TunQueue, slots: usize) -> Self {
        let slots = slots.max(1);
        if queue.vnet {
            TunRxBatch {
                reads: vec![0; VNET_HDR_LEN + MAX_PACKET],
                slots,
                segments: (0..SEGMENT_BUFFERS)
                    .map(|_| vec![0; queue.mtu].into_boxed_slice())
                    .collect(),
                lens: vec![0; SEGMENT_BUFFERS],
                pending: None,
                count: TunReadCounts::default(),
            }
        } else {
            TunRxBatch {
                reads: vec![0; slots * MAX_PACKET],
                slots,
                segments: Vec::new(),
                lens: Vec::with_capacity(slots),
                pending: None,
                count: TunReadCounts::default(),
            }
        }
    }

    /// What the last read batch read.
    pub fn counts(&self) -> TunReadCounts {
        self.count
    }

    /// Packet `i` of the last read batch (`i` below the count it returned).
    pub fn packet(&self, i: usize) -> &[u8] {
        if self.segments.is_empty() {
            &self.reads[i * MAX_PACKET..i * MAX_PACKET + self.lens[i]]
        } else {
            &self.segments[i][..self.lens[i]]
        }
    }
}

/// Packets waiting to be written to a queue: copied in as the roles emit them (their
/// scratch buffers are reused at once), written by [`TunTx::flush`] at the end of the
/// batch. Fixed size; a push that finds it full flushes first.
///
/// On an offloading queue the flush coalesces: TCP segments of one flow that Linux GRO
/// would merge become one super-packet, so a batch of decrypted packets costs the kernel a
/// few trips through its stack instead of one per packet.
#[derive(Debug)]
pub struct TunTx {
    buf: Vec<u8>,
    used: usize,
    lens: Vec<usize>,
    /// For an offloading queue.
    coalescer: Option<Box<Coalescer>>,
    /// The queued packets as slices, rebuilt at each flush in this allocation (kept empty
    /// between flushes, hence `'static`).
    views: Vec<&'static [u8]>,
    /// Whether packets are merged: cleared for good when the kernel refuses a
    /// super-packet as invalid, after which each packet goes alone (after a zero header).
    merge: bool,
}

/// What [`TunTx::flush`] (or a push that had to flush) wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flushed {
    /// IP packets written (segments of a super-packet each count).
    pub packets: u64,
    pub bytes: u64,
    /// IP packets the kernel refused (or the coalescer dropped).
    pub failed: u64,
    /// `write(2)`s that succeeded.
    pub writes: u64,
    /// Of those, the super-packets (two segments or more).
    pub super_writes: u64,
}

impl Flushed {
    fn add(&mut self, o: Flushed) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.failed += o.failed;
        self.writes += o.writes;
        self.super_writes += o.super_writes;
    }
}

impl TunTx {
    const CAPACITY: usize = 256 << 10;
    /// Packets one coalescing pass takes at most; a flush with more makes several passes.
    const COALESCE_PACKETS: usize = 512;

    /// Buffers for writes to `queue`, coalescing if it offloads.
    pub fn new(queue: &TunQueue) -> Self {
        let coalescer = queue.vnet.then(|| {
            Box::new(Coalescer::new(
                Self::COALESCE_PACKETS,
                Self::CAPACITY + Self::COALESCE_PACKETS * VNET_HDR_LEN,
            ))
        });
        TunTx {
            buf: vec![0; Self::CAPACITY],
            used: 0,
            lens: Vec::with_capacity(256),
            coalescer,
            views: Vec::with_capacity(Self::COALESCE_PACKETS),
            merge: true,
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

    /// Writes every queued packet, in order (a flow's packets keep theirs when coalesced).
    pub fn flush(&mut self, q: &TunQueue) -> Flushed {
        let f = match self.coalescer.as_deref_mut() {
            Some(c) => {
                let packets = Packets {
                    buf: &self.buf,
                    lens: &self.lens,
                };
                flush_coalesced(q, c, packets, &mut self.views, &mut self.merge)
            }
            None => flush_plain(q, &self.buf, &self.lens),
        };
        self.lens.clear();
        self.used = 0;
        f
    }
}

/// One `write(2)` per packet.
fn flush_plain(q: &TunQueue, buf: &[u8], lens: &[usize]) -> Flushed {
    let mut f = Flushed::default();
    let mut off = 0;
    for &len in lens {
        match q.write(&buf[off..off + len]) {
            Ok(_) => {
                f.packets += 1;
                f.bytes += len as u64;
                f.writes += 1;
            }
            // A full queue (EAGAIN) or a packet the kernel refuses: dropped, counted.
            Err(_) => f.failed += 1,
        }
        off += len;
    }
    f
}

/// The packets queued in a [`TunTx`]: lengths, back to back in `buf`.
#[derive(Clone, Copy)]
struct Packets<'a> {
    buf: &'a [u8],
    lens: &'a [usize],
}

/// The packets coalesced into writes, each a `virtio_net_hdr` and a (super-)packet, in as
/// many passes as the coalescer needs; one packet per pass unless `merge`. `views` is an
/// empty vector whose allocation is lent for the packets' slices.
///
/// A super-packet the kernel refuses as invalid (`EINVAL`) clears `merge` for good: its
/// segments are lost, but the flows go on one packet per write rather than losing every
/// super-packet (the way a GSO send degrades on a socket that refuses it).
fn flush_coalesced(
    q: &TunQueue,
    c: &mut Coalescer,
    queued: Packets<'_>,
    views: &mut Vec<&'static [u8]>,
    merge: &mut bool,
) -> Flushed {
    let mut packets = relend(std::mem::take(views));
    let mut off = 0;
    for &len in queued.lens {
        packets.push(&queued.buf[off..off + len]);
        off += len;
    }
    let mut f = Flushed::default();
    let mut start = 0;
    while start < packets.len() {
        let end = if *merge { packets.len() } else { start + 1 };
        let taken = c.coalesce(&packets[start..end]);
        let mut in_writes = 0;
        for w in c.writes() {
            let (segments, bytes) = write_contents(w);
            in_writes += segments;
            match q.write(w) {
                Ok(_) => f.add(Flushed {
                    packets: segments,
                    bytes,
                    writes: 1,
                    super_writes: u64::from(segments > 1),
                    failed: 0,
                }),
                Err(e) => {
                    f.failed += segments;
                    if segments > 1 && e.raw_os_error() == Some(libc::EINVAL) && *merge {
                        *merge = false;
                        tracing::warn!(
                            error = %e,
                            "the TUN device refused a coalesced super-packet: writing one packet per write from now on"
                        );
                    }
                }
            }
        }
        // Packets the coalescer dropped (longer than any IP packet) are in no write.
        f.failed += (taken as u64).saturating_sub(in_writes);
        // `coalesce` takes at least one packet: its arena holds the longest one.
        start += taken.max(1);
    }
    *views = relend(packets);
    f
}

/// An empty vector of slices with `v`'s allocation, for slices of another lifetime.
/// (Collecting a vector's `into_iter` into one of a type of the same size and alignment
/// reuses its allocation; the vector is empty, so nothing is converted.)
fn relend<'a, 'b>(mut v: Vec<&'a [u8]>) -> Vec<&'b [u8]> {
    v.clear();
    v.into_iter().map(|_| -> &'b [u8] { &[] }).collect()
}

/// How many IP packets, and bytes of them, a coalesced write (`virtio_net_hdr` and packet)
/// stands for: a super-packet is `gso_size`-byte payloads behind `hdr_len` bytes of headers.
fn write_contents(w: &[u8]) -> (u64, u64) {
    let ip = (w.len() - VNET_HDR_LEN) as u64;
    match VirtioNetHdr::decode(w) {
        Ok(h) if h.gso_type != vnet::GSO_NONE && h.gso_size > 0 => {
            let headers = u64::from(h.hdr_len);
            let segments = ip
                .saturating_sub(headers)
                .div_ceil(u64::from(h.gso_size))
                .max(1);
            (segments, ip + (segments - 1) * headers)
        }
        _ => (1, ip),
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
    use crate::vnet::testing::{checksums_ok, tcp_packet, tso_read, udp_packet, Tcp};
    use std::os::unix::net::UnixDatagram;

    /// A queue whose "device" is the other end of a datagram socket pair: each read and
    /// write is one datagram, as with a TUN device.
    fn fake_queue(vnet: bool) -> (TunQueue, UnixDatagram) {
        let (ours, device) = UnixDatagram::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("non-blocking");
        device
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .expect("timeout");
        let q = TunQueue {
            fd: OwnedFd::from(ours),
            vnet,
            mtu: 1420,
        };
        (q, device)
    }

    fn segment(i: u32, len: usize) -> Vec<u8> {
        let t = Tcp {
            seq: 1_000 + i * len as u32,
            ip_id: 7 + i as u16,
            ..Tcp::default()
        };
        tcp_packet(&t, &vec![i as u8; len])
    }

    #[test]
    fn an_offloading_queue_splits_what_it_reads() {
        let (q, device) = fake_queue(true);
        let mut batch = TunRxBatch::new(&q, 64);
        let payload: Vec<u8> = (0..13_000u32).map(|i| i as u8).collect();
        device
            .send(&tso_read(&Tcp::default(), &payload, 1_300))
            .expect("send");
        let mut single = VirtioNetHdr::NONE.to_bytes().to_vec();
        single.extend_from_slice(&udp_packet(false, 1, b"alone"));
        device.send(&single).expect("send");
        device.send(&[0; 4]).expect("send");
        let (n, drained) = q.read_batch(&mut batch).expect("read");
        assert_eq!((n, drained), (11, true));
        assert_eq!(
            batch.counts(),
            TunReadCounts {
                reads: 3,
                super_reads: 1,
                unsplittable: 1
            }
        );
        let mut joined = Vec::new();
        for i in 0..10 {
            let p = batch.packet(i);
            assert!(checksums_ok(p), "segment {i}");
            joined.extend_from_slice(&p[20 + 32..]);
        }
        assert_eq!(joined, payload);
        assert!(batch.packet(10).ends_with(b"alone"));
    }

    #[test]
    fn an_offloading_queue_coalesces_what_it_writes() {
        let (q, device) = fake_queue(true);
        let mut tx = TunTx::new(&q);
        for i in 0..8 {
            tx.push(&q, &segment(i, 1_000));
        }
        let udp = udp_packet(false, 9, b"not merged");
        tx.push(&q, &udp);
        let f = tx.flush(&q);
        assert_eq!(
            (f.packets, f.writes, f.super_writes, f.failed),
            (9, 2, 1, 0)
        );
        assert_eq!(
            f.bytes,
            8 * segment(0, 1_000).len() as u64 + udp.len() as u64
        );
        let mut buf = vec![0; VNET_HDR_LEN + MAX_PACKET];
        let n = device.recv(&mut buf).expect("the super-packet");
        let h = VirtioNetHdr::decode(&buf[..n]).expect("header");
        assert_eq!((h.gso_type, h.gso_size), (vnet::GSO_TCPV4, 1_000));
        assert_eq!(n, VNET_HDR_LEN + 20 + 32 + 8_000);
        let n = device.recv(&mut buf).expect("the UDP packet");
        assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
        assert_eq!(&buf[VNET_HDR_LEN..n], &udp[..]);
        assert!(tx.is_empty());
    }

    #[test]
    fn without_merging_each_packet_is_written_alone_after_a_zero_header() {
        let (q, device) = fake_queue(true);
        let mut tx = TunTx::new(&q);
        tx.merge = false;
        for i in 0..4 {
            tx.push(&q, &segment(i, 1_000));
        }
        let f = tx.flush(&q);
        assert_eq!((f.packets, f.writes, f.super_writes), (4, 4, 0));
        let mut buf = vec![0; VNET_HDR_LEN + MAX_PACKET];
        for i in 0..4 {
            let n = device.recv(&mut buf).expect("a packet");
            assert_eq!(&buf[..VNET_HDR_LEN], &[0; VNET_HDR_LEN]);
            assert_eq!(&buf[VNET_HDR_LEN..n], &segment(i, 1_000)[..]);
        }
    }

    #[test]
    fn a_plain_queue_reads_and_writes_one_packet_each() {
        let (q, device) = fake_queue(false);
        let mut tx = TunTx::new(&q);
        for i in 0..3 {
            tx.push(&q, &segment(i, 500));
        }
        let f = tx.flush(&q);
        assert_eq!((f.packets, f.writes, f.super_writes), (3, 3, 0));
        let mut buf = vec![0; MAX_PACKET];
        for i in 0..3 {
            let n = device.recv(&mut buf).expect("a packet");
            assert_eq!(&buf[..n], &segment(i, 500)[..]);
        }
        let mut batch = TunRxBatch::new(&q, 4);
        device.send(&segment(5, 100)).expect("send");
        assert_eq!(q.read_batch(&mut batch).expect("read"), (1, true));
        assert_eq!(batch.packet(0), &segment(5, 100)[..]);
        assert_eq!(batch.counts().reads, 1);
    }

    #[test]
    fn offload_names_for_the_log() {
        assert_eq!(offload_names(OFFLOAD_SETS[0]), "csum tso4 tso6 uso4 uso6");
        assert_eq!(offload_names(OFFLOAD_SETS[1]), "csum tso4 tso6");
    }

    #[test]
    fn config_validation_names_the_problem() {
        let ok = TunConfig {
            name: "wg-exit0".into(),
            addresses: vec!["10.9.0.1/24".parse().unwrap()],
            mtu: 1420,
            offload: TunOffload::Auto,
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
