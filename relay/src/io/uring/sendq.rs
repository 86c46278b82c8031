//! Headers of the sends a worker has in flight.
//!
//! A `SendMsg` request points at a `msghdr`, which points at an iovec, a destination
//! address and a control message; all of it must stay put until the request's completion
//! arrives. [`SendSlots`] owns a fixed number of such header sets in one heap allocation
//! that never moves or grows, so nothing is allocated per packet and a header's address is
//! valid for as long as its slot is taken.

use std::mem::zeroed;
use std::net::SocketAddr;

use socket2::SockAddr;

use crate::io::sys;

/// A control-message buffer aligned for `cmsghdr`, room for one u16 cmsg.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

/// What a send slot's headers point at, beside the payload.
#[repr(C)]
struct Headers {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
    cmsg: CmsgBuf,
}

/// The buffer a send's payload is in: a receive buffer (DoubleHop forwards from it) or a
/// Z-HOP train's buffer. Either is held, one reference per send, until the completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BufRef {
    Recv(u16),
    Train(u16),
}

/// What the worker remembers about a send in flight, to finish it when it completes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SendInfo {
    /// The worker's socket id the send went out on.
    pub socket: u32,
    /// The buffer holding the payload.
    pub buf: BufRef,
    /// Offset of the payload in that buffer, its length, and its GSO segment size.
    pub start: u32,
    pub len: u32,
    pub segment: Option<u16>,
    pub dest: Option<SocketAddr>,
}

/// A taken send slot: the `msghdr` for `SendMsg`, or the destination (null on a
/// connected socket) for a plain `Send`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prepared {
    pub slot: u32,
    pub hdr: *const libc::msghdr,
    pub name: *const libc::sockaddr,
    pub name_len: libc::socklen_t,
}

/// A fixed pool of send header sets.
pub(crate) struct SendSlots {
    headers: Box<[Headers]>,
    info: Box<[Option<SendInfo>]>,
    free: Vec<u32>,
}

impl std::fmt::Debug for SendSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendSlots")
            .field("slots", &self.headers.len())
            .field("free", &self.free.len())
            .finish()
    }
}

// SAFETY: the raw pointers inside the headers point only into this value's own heap
// allocation or into receive and train buffers owned by the same worker thread; the pool moves with
// the worker into its thread and is never shared.
unsafe impl Send for SendSlots {}

impl SendSlots {
    pub(crate) fn new(slots: usize) -> SendSlots {
        let n = slots.clamp(1, u32::MAX as usize);
        // SAFETY: msghdr, iovec and sockaddr_storage are plain C structs for which all
        // zero bytes is a valid (empty) value.
        let empty = || unsafe {
            Headers {
                hdr: zeroed(),
                iov: zeroed(),
                name: zeroed(),
                cmsg: CmsgBuf([0; 32]),
            }
        };
        SendSlots {
            headers: (0..n).map(|_| empty()).collect(),
            info: vec![None; n].into_boxed_slice(),
            // Popped from the back: slot 0 first.
            free: (0..n as u32).rev().collect(),
        }
    }

    pub(crate) fn free(&self) -> usize {
        self.free.len()
    }

    /// Takes a slot for `info` whose payload is `payload` (a pointer into a receive or
    /// train buffer the caller holds). Returns the slot and what to hand to `SendMsg` or `Send`,
    /// or `None` when every slot is in flight.
    ///
    /// The returned header stays valid until [`SendSlots::finish`] is called for the slot;
    /// the payload must stay valid (its buffer owned by the caller) until then too.
    pub(crate) fn take(&mut self, info: SendInfo, payload: *const u8) -> Option<Prepared> {
        let slot = self.free.pop()?;
        let h = &mut self.headers[slot as usize];
        h.iov = libc::iovec {
            iov_base: payload as *mut libc::c_void,
            iov_len: info.len as usize,
        };
        h.hdr.msg_iov = &mut h.iov;
        h.hdr.msg_iovlen = 1;
        h.hdr.msg_flags = 0;
        match info.dest {
            Some(dest) => {
                let sa = SockAddr::from(dest);
                // SAFETY: `sa` holds `sa.len()` valid bytes of a sockaddr, which fit in a
                // sockaddr_storage.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        sa.as_ptr().cast::<u8>(),
                        (&mut h.name as *mut libc::sockaddr_storage).cast::<u8>(),
                        sa.len() as usize,
                    );
                }
                h.hdr.msg_name = (&mut h.name as *mut libc::sockaddr_storage).cast();
                h.hdr.msg_namelen = sa.len();
            }
            None => {
                h.hdr.msg_name = std::ptr::null_mut();
                h.hdr.msg_namelen = 0;
            }
        }
        let segment = info.segment.filter(|&s| u32::from(s) < info.len);
        // SAFETY: the slot's control buffer is 8-aligned (CmsgBuf), 32 bytes (room for one
        // u16 cmsg), and lives in the pool with its header until the slot is finished.
        unsafe { sys::set_gso_segment(&mut h.hdr, h.cmsg.0.as_mut_ptr(), segment) };
        self.info[slot as usize] = Some(info);
        Some(Prepared {
            slot,
            hdr: &h.hdr,
            name: h.hdr.msg_name as *const libc::sockaddr,
            name_len: h.hdr.msg_namelen,
        })
    }

    /// Releases a slot whose completion arrived; returns what it carried.
    pub(crate) fn finish(&mut self, slot: u32) -> Option<SendInfo> {
        let info = self.info.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        Some(info)
    }
}
