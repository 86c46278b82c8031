//! Batched UDP I/O for the generator and the sink: `sendmmsg` with UDP GSO and a per-message
//! source address (`IP_PKTINFO`), `recvmmsg` with UDP GRO.
//!
//! The `libc` calls need raw `msghdr`s that point into buffers owned by the batch structs
//! below; every such block says why the pointers are valid for the call.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use wraithgate_relay::io::sys;

/// Largest UDP payload one GSO send or GRO receive carries.
pub const MAX_TRAIN_BYTES: usize = 65_000;
/// The kernel's limit of segments in one GSO send (`UDP_MAX_SEGMENTS`).
pub const MAX_GSO_SEGMENTS: usize = 64;

/// A UDP socket for the harness, with large buffers.
pub fn bind_udp(addr: SocketAddr, pktinfo: bool) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    set_buffers(&s, 32 << 20);
    if pktinfo {
        // Lets the generator bind the wildcard address yet send from any local address.
        s.set_freebind_v4(true)?;
    }
    s.bind(&addr.into())?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(s)
}

/// Raises the socket buffers, with the FORCE variants when we may (root), so a burst of the
/// generator does not overflow the sink's queue before the contender does.
pub fn set_buffers(s: &Socket, bytes: i32) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(s, libc::SOL_SOCKET, force, bytes).is_err() {
            let _ = setsockopt_int(s, libc::SOL_SOCKET, plain, bytes);
        }
    }
}

fn setsockopt_int(s: &Socket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the fd is a live socket owned by `s`; the option value is a c_int on our
    // stack and its size is passed exactly.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to coalesce received datagrams (UDP GRO); false when unsupported.
pub fn enable_gro(s: &Socket) -> bool {
    setsockopt_int(s, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

fn sockaddr_v4(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

const CMSG_SPACE: usize = 64;

/// One message of a send batch: a train of equal-size segments from one source address.
#[derive(Debug, Clone, Copy)]
pub struct Train {
    /// Where in the batch buffer the train starts, and its total length.
    pub offset: usize,
    pub len: usize,
    /// Segment size for GSO; equal to `len` for a single datagram.
    pub segment: usize,
    /// The source address to send from (`IP_PKTINFO`), if not the socket's own.
    pub source: Option<Ipv4Addr>,
    pub destination: SocketAddrV4,
}

/// Reusable `sendmmsg` state: the headers, addresses and control buffers of one batch.
#[derive(Debug)]
pub struct SendBatch {
    names: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<[u64; CMSG_SPACE / 8]>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers inside are rebuilt on every send and only point into this
// struct's own vectors and the caller's buffer for the duration of that call.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub fn new(capacity: usize) -> Self {
        SendBatch {
            names: Vec::with_capacity(capacity),
            iovs: Vec::with_capacity(capacity),
            cmsgs: vec![[0; CMSG_SPACE / 8]; capacity],
            hdrs: Vec::with_capacity(capacity),
        }
    }

    /// Sends `trains` (views into `buf`) with one `sendmmsg`. Returns how many trains the
    /// kernel took; a train is sent whole or not at all.
    pub fn send(&mut self, s: &Socket, buf: &[u8], trains: &[Train]) -> io::Result<usize> {
        let n = trains.len().min(self.cmsgs.len());
        self.names.clear();
        self.iovs.clear();
        self.hdrs.clear();
        for t in &trains[..n] {
            assert!(
                t.offset + t.len <= buf.len(),
                "train lies within the buffer"
            );
            self.names.push(sockaddr_v4(t.destination));
            self.iovs.push(libc::iovec {
                iov_base: buf[t.offset..].as_ptr() as *mut libc::c_void,
                iov_len: t.len,
            });
        }
        for (i, t) in trains[..n].iter().enumerate() {
            let control = self.cmsgs[i].as_mut_ptr().cast::<u8>();
            // SAFETY: an all-zero msghdr is a valid empty header.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = control.cast();
            hdr.msg_controllen = CMSG_SPACE as _;
            let mut used = 0usize;
            // SAFETY: `hdr` points at a CMSG_SPACE-byte, 8-aligned control buffer owned by
            // `self.cmsgs[i]`; we write at most two small cmsgs whose total CMSG_SPACE
            // (32 + 24 bytes) fits in it, always through the CMSG_* macros.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&hdr);
                if let Some(src) = t.source {
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(src).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    (*c).cmsg_level = libc::IPPROTO_IP;
                    (*c).cmsg_type = libc::IP_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), info);
                    used += libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize;
                    c = libc::CMSG_NXTHDR(&hdr, c);
                }
                if t.segment < t.len {
                    used += sys::write_udp_segment_cmsg(c, t.segment as u16);
                }
            }
            hdr.msg_controllen = used as _;
            if used == 0 {
                hdr.msg_control = std::ptr::null_mut();
            }
            self.hdrs.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
        // SAFETY: every header points at live memory: names/iovs/cmsgs are owned by `self`
        // and not resized after the pointers were taken; the iovecs point into `buf`, which
        // the caller borrows for the duration of this call.
        let rc = unsafe {
            libc::sendmmsg(
                s.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    }
}

/// One received datagram or GRO train.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub offset: usize,
    pub len: usize,
    /// Segment size when the kernel coalesced a train (GRO), else `len`.
    pub segment: usize,
    pub from: Option<SocketAddrV4>,
}

/// Reusable `recvmmsg` state with one `slot`-byte buffer per message.
#[derive(Debug)]
pub struct RecvBatch {
    pub buf: Vec<u8>,
    slot: usize,
    names: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<[u64; CMSG_SPACE / 8]>,
    hdrs: Vec<libc::mmsghdr>,
    pub got: Vec<Received>,
}

// SAFETY: as for SendBatch, the raw pointers are rebuilt on each call into owned memory.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(messages: usize, slot: usize) -> Self {
        RecvBatch {
            buf: vec![0; messages * slot],
            slot,
            // SAFETY: sockaddr_in is plain data; all zeros is a valid value.
            names: vec![unsafe { zeroed() }; messages],
            iovs: Vec::with_capacity(messages),
            cmsgs: vec![[0; CMSG_SPACE / 8]; messages],
            hdrs: Vec::with_capacity(messages),
            got: Vec::with_capacity(messages),
        }
    }

    /// Waits (up to the socket's read timeout) for at least one datagram, then takes all
    /// that are queued, up to the batch size. Returns how many; 0 on timeout.
    pub fn recv(&mut self, s: &Socket) -> io::Result<usize> {
        self.recv_flags(s, libc::MSG_WAITFORONE)
    }

    /// Takes what is queued without waiting (`SO_RCVTIMEO` is rounded up to a scheduler
    /// tick, far too coarse for polling). Returns how many; 0 when nothing is queued.
    pub fn try_recv(&mut self, s: &Socket) -> io::Result<usize> {
        self.recv_flags(s, libc::MSG_DONTWAIT)
    }

    fn recv_flags(&mut self, s: &Socket, flags: i32) -> io::Result<usize> {
        let n = self.names.len();
        self.iovs.clear();
        self.hdrs.clear();
        self.got.clear();
        let base = self.buf.as_mut_ptr();
        for i in 0..n {
            self.iovs.push(libc::iovec {
                // SAFETY: i * slot + slot <= buf.len() by construction in `new`.
                iov_base: unsafe { base.add(i * self.slot) }.cast(),
                iov_len: self.slot,
            });
        }
        for i in 0..n {
            // SAFETY: an all-zero msghdr is a valid empty header.
            let mut hdr: libc::msghdr = unsafe { zeroed() };
            hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            hdr.msg_controllen = CMSG_SPACE as _;
            self.hdrs.push(libc::mmsghdr {
                msg_hdr: hdr,
                msg_len: 0,
            });
        }
        // SAFETY: headers point into `self`'s vectors and buffer, all live and not resized
        // until this call returns.
        let rc = unsafe {
            libc::recvmmsg(
                s.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as u32,
                flags,
                std::ptr::null_mut(),
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        for i in 0..rc as usize {
            let h = &self.hdrs[i];
            let len = h.msg_len as usize;
            let mut segment = len;
            // SAFETY: the kernel filled msg_control/msg_controllen for this header; the
            // CMSG_* macros stay within msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        let seg = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                        if seg > 0 {
                            segment = seg as usize;
                        }
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
            let name = &self.names[i];
            let from = (h.msg_hdr.msg_namelen as usize >= size_of::<libc::sockaddr_in>()
                && name.sin_family == libc::AF_INET as libc::sa_family_t)
                .then(|| {
                    SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(name.sin_addr.s_addr)),
                        u16::from_be(name.sin_port),
                    )
                });
            self.got.push(Received {
                offset: i * self.slot,
                len,
                segment,
                from,
            });
        }
        Ok(rc as usize)
    }

    /// Splits received message `i` into its datagrams.
    pub fn datagrams(&self, r: &Received) -> impl Iterator<Item = &[u8]> {
        self.buf[r.offset..r.offset + r.len].chunks(r.segment.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gso_train_arrives_as_segments() {
        let rx = bind_udp("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let tx = bind_udp("0.0.0.0:0".parse().unwrap(), true).unwrap();
        let to = match rx.local_addr().unwrap().as_socket().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        };
        let buf: Vec<u8> = (0..4 * 64).map(|i| (i / 64) as u8).collect();
        let mut batch = SendBatch::new(4);
        let trains = [Train {
            offset: 0,
            len: buf.len(),
            segment: 64,
            source: Some(Ipv4Addr::new(127, 3, 0, 9)),
            destination: to,
        }];
        assert_eq!(batch.send(&tx, &buf, &trains).unwrap(), 1);
        let mut rb = RecvBatch::new(8, 65_536);
        let mut seen = Vec::new();
        while seen.len() < 4 {
            assert!(rb.recv(&rx).unwrap() > 0, "segments arrive");
            for r in rb.got.clone() {
                assert_eq!(r.from.unwrap().ip(), &Ipv4Addr::new(127, 3, 0, 9));
                for d in rb.datagrams(&r) {
                    seen.push((d.len(), d[0]));
                }
            }
        }
        assert_eq!(seen, vec![(64, 0), (64, 1), (64, 2), (64, 3)]);
    }
}
