//! Linux socket calls the standard library lacks: batched `recvmmsg`/`sendmmsg` with UDP
//! GRO and GSO metadata, and the socket options the data path sets.
//!
//! This is one of the two modules allowed `unsafe` (the other is the io_uring backend).
//! Every batch type owns the memory its `mmsghdr`s point into, on the heap, so the pointers
//! stay valid when the batch moves; they are rebuilt before each call, because the kernel
//! overwrites the length fields.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `SOL_UDP` option carrying the segment size of a GSO send or a GRO receive.
pub const UDP_SEGMENT: libc::c_int = 103;
/// `SOL_UDP` option enabling GRO on a socket.
const UDP_GRO: libc::c_int = 104;
/// Most segments the kernel accepts in one GSO send (`UDP_MAX_SEGMENTS`, 64 before 6.7).
pub const MAX_GSO_SEGMENTS: usize = 64;
/// Control space for one `c_int` cmsg, rounded up generously.
const CMSG_SPACE: usize = 64;

/// A control-message buffer aligned for `cmsghdr`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

/// A received datagram, or a GRO train of equal-sized datagrams from one source.
#[derive(Debug, Clone, Copy)]
pub struct RecvMeta {
    /// Total bytes received.
    pub len: usize,
    /// Size of each segment; equals `len` when the kernel did not coalesce.
    pub stride: usize,
    pub from: SocketAddr,
}

/// Buffers and headers for one `recvmmsg` call.
pub struct RecvBatch {
    buf_size: usize,
    bufs: Box<[u8]>,
    iovecs: Box<[libc::iovec]>,
    names: Box<[libc::sockaddr_storage]>,
    cmsgs: Box<[CmsgBuf]>,
    hdrs: Box<[libc::mmsghdr]>,
    meta: Box<[Option<RecvMeta>]>,
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("messages", &self.hdrs.len())
            .field("buf_size", &self.buf_size)
            .finish()
    }
}

impl RecvBatch {
    /// `messages` buffers of `buf_size` bytes each (64 KiB holds a whole GRO train).
    pub fn new(messages: usize, buf_size: usize) -> Self {
        let n = messages.max(1);
        // SAFETY: iovec, sockaddr_storage and mmsghdr are plain C structs for which all
        // zero bytes is a valid (empty) value.
        let (iov, name, hdr) = unsafe {
            (
                zeroed::<libc::iovec>(),
                zeroed::<libc::sockaddr_storage>(),
                zeroed::<libc::mmsghdr>(),
            )
        };
        RecvBatch {
            buf_size,
            bufs: vec![0u8; n * buf_size].into_boxed_slice(),
            iovecs: vec![iov; n].into_boxed_slice(),
            names: vec![name; n].into_boxed_slice(),
            cmsgs: vec![CmsgBuf([0u8; CMSG_SPACE]); n].into_boxed_slice(),
            hdrs: vec![hdr; n].into_boxed_slice(),
            meta: vec![None; n].into_boxed_slice(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Receives up to [`RecvBatch::capacity`] messages without blocking. Returns how many
    /// arrived; `WouldBlock` when none is waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.hdrs.len();
        let base = self.bufs.as_mut_ptr();
        for i in 0..n {
            self.iovecs[i] = libc::iovec {
                // SAFETY: i * buf_size + buf_size <= bufs.len() by construction.
                iov_base: unsafe { base.add(i * self.buf_size) }.cast(),
                iov_len: self.buf_size,
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovecs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].0.as_mut_ptr().cast();
            h.msg_controllen = CMSG_SPACE as _;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by `self` that outlive the call,
        // with lengths matching those buffers; the kernel writes at most those lengths.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = got as usize;
        for i in 0..got {
            let len = self.hdrs[i].msg_len as usize;
            let h = &self.hdrs[i].msg_hdr;
            let stride = gro_segment_size(h).unwrap_or(len);
            self.meta[i] = to_socket_addr(&self.names[i], h.msg_namelen).map(|from| RecvMeta {
                len,
                stride: if stride == 0 { len } else { stride },
                from,
            });
        }
        Ok(got)
    }

    /// What message `i` of the last call was, or `None` if its source was not IP.
    pub fn meta(&self, i: usize) -> Option<RecvMeta> {
        self.meta[i]
    }

    /// The bytes of message `i` of the last call.
    pub fn payload(&self, i: usize) -> &[u8] {
        let len = self.meta[i].map_or(0, |m| m.len);
        let start = i * self.buf_size;
        &self.bufs[start..start + len]
    }
}

// SAFETY: the raw pointers inside point only into the batch's own heap allocations.
unsafe impl Send for RecvBatch {}

/// The IP socket address the kernel wrote into `storage`, if it is one.
fn to_socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and it is at least
            // that long; sockaddr_storage is aligned for every sockaddr type.
            let a =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::from((
                u32::from_be(a.sin_addr.s_addr).to_be_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Reads the GRO segment size from a received header's control messages.
fn gro_segment_size(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: `h` was filled by recvmmsg; CMSG_FIRSTHDR/NXTHDR walk its control buffer
    // within `msg_controllen`, and CMSG_DATA of a SOL_UDP/UDP_GRO cmsg holds a c_int.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int);
                return usize::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// One datagram (or GSO train) to send.
#[derive(Debug, Clone, Copy)]
pub struct Transmit<'a> {
    /// `None` on a connected socket.
    pub dest: Option<SocketAddr>,
    pub contents: &'a [u8],
    /// Split `contents` into segments of this size (UDP GSO); `None` sends one datagram.
    pub segment_size: Option<u16>,
}

/// Scratch space for one `sendmmsg` call.
pub struct SendBatch {
    iovecs: Box<[libc::iovec]>,
    names: Box<[SockAddrBuf]>,
    cmsgs: Box<[CmsgBuf]>,
    hdrs: Box<[libc::mmsghdr]>,
}

#[derive(Clone, Copy)]
struct SockAddrBuf {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("messages", &self.hdrs.len())
            .finish()
    }
}

impl SendBatch {
    pub fn new(messages: usize) -> Self {
        let n = messages.max(1);
        // SAFETY: plain C structs, all-zero is a valid value.
        let (iov, name, hdr) = unsafe {
            (
                zeroed::<libc::iovec>(),
                zeroed::<libc::sockaddr_storage>(),
                zeroed::<libc::mmsghdr>(),
            )
        };
        SendBatch {
            iovecs: vec![iov; n].into_boxed_slice(),
            names: vec![
                SockAddrBuf {
                    storage: name,
                    len: 0
                };
                n
            ]
            .into_boxed_slice(),
            cmsgs: vec![CmsgBuf([0u8; CMSG_SPACE]); n].into_boxed_slice(),
            hdrs: vec![hdr; n].into_boxed_slice(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Sends `msgs` (at most [`SendBatch::capacity`]) with one `sendmmsg`. Returns how
    /// many the kernel took; an error only when it took none.
    pub fn send(&mut self, fd: RawFd, msgs: &[Transmit<'_>]) -> io::Result<usize> {
        let n = msgs.len().min(self.hdrs.len());
        if n == 0 {
            return Ok(0);
        }
        for (i, m) in msgs[..n].iter().enumerate() {
            self.iovecs[i] = libc::iovec {
                iov_base: m.contents.as_ptr() as *mut libc::c_void,
                iov_len: m.contents.len(),
            };
            let h = &mut self.hdrs[i].msg_hdr;
            match m.dest {
                Some(dest) => {
                    let sa = SockAddr::from(dest);
                    let name = &mut self.names[i];
                    // SAFETY: `sa` holds `sa.len()` valid bytes of a sockaddr, which fit in
                    // a sockaddr_storage.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            sa.as_ptr().cast::<u8>(),
                            (&mut name.storage as *mut libc::sockaddr_storage).cast::<u8>(),
                            sa.len() as usize,
                        );
                    }
                    name.len = sa.len();
                    h.msg_name = (&mut name.storage as *mut libc::sockaddr_storage).cast();
                    h.msg_namelen = name.len;
                }
                None => {
                    h.msg_name = std::ptr::null_mut();
                    h.msg_namelen = 0;
                }
            }
            h.msg_iov = &mut self.iovecs[i];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
            let segment = m
                .segment_size
                .filter(|&s| usize::from(s) < m.contents.len());
            // SAFETY: `cmsgs[i]` is 8-aligned (CmsgBuf), CMSG_SPACE bytes, owned by `self`
            // and not touched again until this header's call is over.
            unsafe { set_gso_segment(h, self.cmsgs[i].0.as_mut_ptr(), segment) };
        }
        // SAFETY: every header points at memory owned by `self` or borrowed from `msgs`,
        // all of which outlives this call; lengths match the buffers.
        let sent = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }
}

// SAFETY: the pointers inside are rebuilt before every call and are never dereferenced
// between calls.
unsafe impl Send for SendBatch {}

/// Bytes a `UDP_SEGMENT` control message takes in a control buffer (`CMSG_SPACE` of a u16).
pub fn udp_segment_cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) as usize }
}

/// Writes a `UDP_SEGMENT` control message (a GSO send's segment size, read by the kernel as
/// a u16) at `c`. Returns the control space it took.
///
/// # Safety
/// `c` points at a `cmsghdr` inside a control buffer that is aligned for `cmsghdr` and has
/// at least [`udp_segment_cmsg_space`] bytes from `c` on (as `CMSG_FIRSTHDR` or
/// `CMSG_NXTHDR` return for a buffer that large).
pub unsafe fn write_udp_segment_cmsg(c: *mut libc::cmsghdr, segment: u16) -> usize {
    // SAFETY: the caller guarantees room for the header and a u16 behind it; the data may be
    // unaligned for u16 only in theory, hence write_unaligned.
    unsafe {
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
    }
    udp_segment_cmsg_space()
}

/// Points `hdr`'s control at `control` holding one `UDP_SEGMENT` message when `segment` is
/// set (a GSO send), or clears it (one datagram).
///
/// # Safety
/// `control` is aligned for `cmsghdr`, has at least [`udp_segment_cmsg_space`] bytes, and
/// stays valid (and unwritten by anyone else) for as long as `hdr` is used.
pub(crate) unsafe fn set_gso_segment(
    hdr: &mut libc::msghdr,
    control: *mut u8,
    segment: Option<u16>,
) {
    match segment {
        Some(seg) => {
            hdr.msg_control = control.cast();
            hdr.msg_controllen = udp_segment_cmsg_space() as _;
            // SAFETY: msg_control/msg_controllen name a buffer large enough for one
            // cmsghdr (the caller's contract), so CMSG_FIRSTHDR is non-null and within it.
            unsafe { write_udp_segment_cmsg(libc::CMSG_FIRSTHDR(hdr), seg) };
        }
        None => {
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
        }
    }
}

/// Whether a send error means "this socket cannot do GSO": the data path then resends the
/// segments one by one and stops using GSO on that worker.
pub fn is_gso_error(e: &io::Error) -> bool {
    e.raw_os_error().is_some_and(is_gso_errno)
}

/// [`is_gso_error`] for a bare errno (as an io_uring completion carries it).
pub fn is_gso_errno(errno: i32) -> bool {
    matches!(errno, libc::EIO | libc::EINVAL | libc::EMSGSIZE)
}

/// The IP socket address in `bytes` (a `sockaddr_in` or `sockaddr_in6` as the kernel wrote
/// it), parsed without trusting its alignment or length.
pub fn sockaddr_from_bytes(bytes: &[u8]) -> Option<SocketAddr> {
    let family = libc::c_int::from(u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]));
    let port = u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = bytes.get(4..8)?.try_into().ok()?;
            Some(SocketAddr::from((ip, port)))
        }
        libc::AF_INET6 if bytes.len() >= size_of::<libc::sockaddr_in6>() => {
            let flowinfo = u32::from_ne_bytes(bytes[4..8].try_into().ok()?);
            let ip: [u8; 16] = bytes[8..24].try_into().ok()?;
            let scope = u32::from_ne_bytes(bytes[24..28].try_into().ok()?);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip.into(),
                port,
                flowinfo,
                scope,
            )))
        }
        _ => None,
    }
}

/// The UDP_GRO segment size among control messages laid out as the kernel writes them
/// (`cmsghdr`, data, padding to the next `size_t`), parsed without trusting them.
pub fn gro_segment_from_cmsgs(control: &[u8]) -> Option<usize> {
    const WORD: usize = size_of::<usize>();
    let header = size_of::<libc::cmsghdr>();
    let mut off = 0;
    while off + header <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + WORD].try_into().ok()?);
        let level = i32::from_ne_bytes(control[off + WORD..off + WORD + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[off + WORD + 4..off + WORD + 8].try_into().ok()?);
        if len < header {
            return None;
        }
        if level == libc::SOL_UDP && kind == UDP_GRO {
            let data = control.get(off + header..off + header + 4)?;
            return usize::try_from(i32::from_ne_bytes(data.try_into().ok()?)).ok();
        }
        off = off.checked_add(len.checked_add(WORD - 1)? & !(WORD - 1))?;
    }
    None
}

fn set_int_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to coalesce received datagrams (UDP GRO). Returns whether it agreed.
pub fn enable_gro(sock: &Socket) -> bool {
    set_int_opt(sock.as_raw_fd(), libc::SOL_UDP, UDP_GRO, 1).is_ok()
}

/// Sets a socket buffer size, forcing past `net.core.{r,w}mem_max` where privileged.
pub fn set_buffer(sock: &Socket, bytes: usize, receive: bool) {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    let (force, plain) = if receive {
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF)
    } else {
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)
    };
    if set_int_opt(sock.as_raw_fd(), libc::SOL_SOCKET, force, v).is_err() {
        let _ = set_int_opt(sock.as_raw_fd(), libc::SOL_SOCKET, plain, v);
    }
}

/// A non-blocking UDP socket of the family of `addr`.
pub fn udp_socket(addr: &SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(*addr),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        // An IPv6 listener serves IPv6 only; IPv4 gets its own listener.
        s.set_only_v6(true)?;
    }
    Ok(s)
}

/// A client-facing socket bound to `addr`, shared with the other workers by
/// `SO_REUSEPORT` (the kernel spreads clients across workers by their 4-tuple).
pub fn listener_socket(addr: SocketAddr, buffer: usize) -> io::Result<(Socket, bool)> {
    let s = udp_socket(&addr)?;
    s.set_reuse_port(true)?;
    set_buffer(&s, buffer, true);
    set_buffer(&s, buffer, false);
    let gro = enable_gro(&s);
    s.bind(&addr.into())?;
    Ok((s, gro))
}

/// An exit-facing socket for one session: bound to `source` (port `local_port`, or an
/// ephemeral one) and connected to `exit`, so the kernel delivers only the exit's packets.
pub fn exit_socket(
    exit: SocketAddr,
    source: Option<std::net::IpAddr>,
    local_port: Option<u16>,
    buffer: usize,
) -> io::Result<(Socket, bool)> {
    let (s, gro) = unconnected_exit_socket(exit, source, local_port.unwrap_or(0), buffer)?;
    s.connect(&exit.into())?;
    Ok((s, gro))
}

/// An exit-facing socket shared by sessions of several exits of `exit`'s address family:
/// bound as [`exit_socket`] binds (port `local_port`, 0 for an ephemeral one), not
/// connected, so it receives from anyone and sends name their destination.
pub fn unconnected_exit_socket(
    exit: SocketAddr,
    source: Option<std::net::IpAddr>,
    local_port: u16,
    buffer: usize,
) -> io::Result<(Socket, bool)> {
    let s = udp_socket(&exit)?;
    set_buffer(&s, buffer, true);
    set_buffer(&s, buffer, false);
    let gro = enable_gro(&s);
    let bind_ip = source.unwrap_or(match exit {
        SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    });
    s.bind(&SocketAddr::new(bind_ip, local_port).into())?;
    Ok((s, gro))
}

/// The worker that [`attach_steering`] sends datagrams from `client` to, out of `workers`.
pub fn steer(client: SocketAddr, workers: usize) -> usize {
    let ip = match client.ip() {
        std::net::IpAddr::V4(a) => u32::from(a),
        std::net::IpAddr::V6(a) => {
            let o = a.octets();
            u32::from_be_bytes([o[12], o[13], o[14], o[15]])
        }
    };
    ((ip ^ u32::from(client.port())) % workers.max(1) as u32) as usize
}

/// Makes the kernel pick a listener of `sock`'s `SO_REUSEPORT` group by [`steer`] instead
/// of by its own secret hash, so that the worker holding a client's sessions is known in
/// advance (restored sessions go to it). The group's sockets must have been bound in worker
/// order. A classic BPF program: source address (last word for IPv6) XOR source port,
/// modulo the number of workers.
pub fn attach_steering(sock: &Socket, ipv6: bool, workers: usize) -> io::Result<()> {
    const SKF_NET_OFF: u32 = (-0x100000i32) as u32;
    let op = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let n = workers.max(1) as u32;
    let prog: Vec<libc::sock_filter> = if ipv6 {
        vec![
            // A = UDP source port (fixed 40-byte header; extension headers are not expected
            // on WireGuard traffic and only skew the choice, never break it).
            op(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, SKF_NET_OFF + 40),
            op(libc::BPF_MISC | libc::BPF_TAX, 0),
            op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, SKF_NET_OFF + 20),
            op(libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X, 0),
            op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, n),
            op(libc::BPF_RET | libc::BPF_A, 0),
        ]
    } else {
        vec![
            // X = IPv4 header length, then A = UDP source port right after it.
            op(libc::BPF_LDX | libc::BPF_B | libc::BPF_MSH, SKF_NET_OFF),
            op(libc::BPF_LD | libc::BPF_H | libc::BPF_IND, SKF_NET_OFF),
            op(libc::BPF_MISC | libc::BPF_TAX, 0),
            op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, SKF_NET_OFF + 12),
            op(libc::BPF_ALU | libc::BPF_XOR | libc::BPF_X, 0),
            op(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, n),
            op(libc::BPF_RET | libc::BPF_A, 0),
        ]
    };
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies the
    // program and validates it before use.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// CPU time the calling thread has used (user and system).
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Raises the soft open-files limit to the hard limit (one socket per session).
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Grows this process's descriptor table now to hold descriptors below `count` (capped by
/// the open-files limit), and returns the size asked for.
///
/// The kernel grows the table by doubling as descriptors are opened, and in a
/// multi-threaded process every growth waits for an RCU grace period (`expand_fdtable`):
/// milliseconds each on a busy machine, stalling whichever worker opened the socket. A
/// flood of handshakes opens thousands of exit-facing sockets at once, so without this the
/// first flood after start-up stalls workers once per doubling (measured here: 6–16 ms
/// each at 256, 512, … 8,192 descriptors). The table never shrinks, so growing it once at
/// start-up costs one grace period and 8 bytes of kernel memory per slot.
pub fn reserve_descriptors(count: u64) -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let count = count.min(lim.rlim_cur).min(i32::MAX as u64);
    if count < 2 {
        return Ok(count);
    }
    let top = (count - 1) as libc::c_int;
    // SAFETY: F_DUPFD_CLOEXEC duplicates descriptor 0 (or fails) onto the lowest free
    // descriptor at or above `top`, which only this function learns of and closes again
    // at once; no descriptor anyone else holds is touched. Descriptor 0 is open in any
    // process started normally; if it is not, the call fails and we report it.
    let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, top) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was opened just above and is owned by nothing else.
    unsafe { libc::close(fd) };
    Ok(count)
}

/// Restricts the calling thread to `cores` (CPU numbers). Threads it starts inherit this.
pub fn pin_current_thread(cores: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { zeroed() };
    for &c in cores {
        // SAFETY: CPU_SET writes only inside the set we own and ignores numbers past its
        // size.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the size is that of the set passed.
    let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling thread's nice value (Linux keeps one per thread; threads it starts
/// inherit it). Raising it needs no privilege.
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority reads its integer arguments only; a tid names one thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn reserving_descriptors_grows_the_table_and_leaks_nothing() {
        // Other tests open and close descriptors meanwhile, but none this high.
        let highest_open = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
                .max()
                .unwrap_or(0)
        };
        let table = || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("FDSize:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .expect("FDSize in /proc/self/status")
        };
        let asked = reserve_descriptors(4096).expect("reserve");
        assert!(asked <= 4096);
        // The table is sized in powers of two and holds at least what was asked for.
        assert!(table() >= asked, "FDSize {} below {asked}", table());
        assert!(
            highest_open() < asked.saturating_sub(1),
            "the probe descriptor was left open"
        );
    }

    #[test]
    fn recvmmsg_and_sendmmsg_round_trip_over_loopback() {
        let (rx, _) = listener_socket("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let rx_addr = rx.local_addr().unwrap().as_socket().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut send = SendBatch::new(8);
        let payloads: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + i as usize]).collect();
        let msgs: Vec<_> = payloads
            .iter()
            .map(|p| Transmit {
                dest: Some(rx_addr),
                contents: p,
                segment_size: None,
            })
            .collect();
        assert_eq!(send.send(tx.as_raw_fd(), &msgs).unwrap(), 5);
        let mut batch = RecvBatch::new(8, 65536);
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < 5 && std::time::Instant::now() < deadline {
            match batch.recv(rx.as_raw_fd()) {
                Ok(n) => {
                    for i in 0..n {
                        let m = batch.meta(i).unwrap();
                        assert_eq!(m.from, tx.local_addr().unwrap());
                        for seg in batch.payload(i).chunks(m.stride) {
                            got.push(seg.to_vec());
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, payloads);
    }

    #[test]
    fn steering_sends_each_client_to_the_worker_steer_names() {
        let workers = 3;
        let mut socks = Vec::new();
        let mut addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for _ in 0..workers {
            let (s, _) = listener_socket(addr, 1 << 20).unwrap();
            addr = s.local_addr().unwrap().as_socket().unwrap();
            socks.push(s);
        }
        attach_steering(&socks[0], false, workers).unwrap();
        let mut expected = vec![0usize; workers];
        let mut senders = Vec::new();
        for _ in 0..30 {
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.send_to(b"x", addr).unwrap();
            expected[steer(tx.local_addr().unwrap(), workers)] += 1;
            senders.push(tx);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut batch = RecvBatch::new(64, 2048);
        for (w, s) in socks.iter().enumerate() {
            let mut got = 0;
            while let Ok(n) = batch.recv(s.as_raw_fd()) {
                for i in 0..n {
                    assert_eq!(steer(batch.meta(i).unwrap().from, workers), w);
                }
                got += n;
            }
            assert_eq!(got, expected[w], "worker {w}");
        }
    }

    #[test]
    fn gso_send_arrives_as_separate_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let tx = exit_socket(rx.local_addr().unwrap(), None, None, 1 << 20)
            .unwrap()
            .0;
        let train: Vec<u8> = (0..4u8)
            .flat_map(|i| vec![i; 1000])
            .chain(vec![9u8; 500])
            .collect();
        let mut send = SendBatch::new(1);
        let r = send.send(
            tx.as_raw_fd(),
            &[Transmit {
                dest: None,
                contents: &train,
                segment_size: Some(1000),
            }],
        );
        match r {
            Ok(1) => {}
            Err(e) if is_gso_error(&e) => {
                // Skipping is loud, and a failure where every test must run.
                assert!(
                    std::env::var_os("WRAITHGATE_REQUIRE_ALL_TESTS").is_none(),
                    "the kernel refused UDP GSO ({e}); WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping"
                );
                eprintln!("SKIPPED: the kernel refused UDP GSO here ({e}); nothing more to check");
                return;
            }
            other => panic!("{other:?}"),
        }
        let mut buf = [0u8; 2000];
        let mut sizes = Vec::new();
        for _ in 0..5 {
            let n = rx.recv(&mut buf).unwrap();
            sizes.push((n, buf[0]));
        }
        assert_eq!(
            sizes,
            vec![(1000, 0), (1000, 1), (1000, 2), (1000, 3), (500, 9)]
        );
    }
}
