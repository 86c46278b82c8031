//! A provided buffer ring (`IORING_REGISTER_PBUF_RING`): a fixed pool of equal receive
//! buffers that the kernel picks from for every multishot receive of one worker.
//!
//! Ownership of a buffer moves by its id: it belongs to the kernel while it sits in the
//! ring; a receive completion carrying `IORING_CQE_F_BUFFER` hands it to the worker, which
//! owns it until it calls [`BufRing::give_back`]. Nothing else ever decides who owns a
//! buffer, so the worker keeps a reference count per id (see `Buffers` in the parent
//! module) and gives a buffer back only when no send reads it any more.
//!
//! Both the ring of descriptors and the buffers live in anonymous mappings: the ring must
//! be page aligned, and the buffers only become resident as the kernel writes into them,
//! so a pool sized for whole GRO trains costs memory only for what traffic really uses.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::Submitter;

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing
        // touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and the owner of the mapping
        // only drops it once the kernel can no longer use it (see `BufRing`'s docs).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The provided buffer ring of one worker's io_uring.
///
/// Must be dropped only after the io_uring it is registered with has no request in flight
/// that could select a buffer, or after that ring is gone (the worker drains its ring
/// before it drops anything, and leaks the pool if it cannot).
#[derive(Debug)]
pub(crate) struct BufRing {
    ring: Mapping,
    bufs: Mapping,
    entries: u16,
    buf_size: usize,
    group: u16,
    /// Our copy of the ring's tail; published to the kernel by [`BufRing::publish`].
    tail: u16,
    /// Buffers the kernel may pick right now (given back and published, or about to be).
    in_ring: usize,
}

// SAFETY: the mappings are owned by this value alone; the raw pointers are never shared
// with another thread (a worker moves its whole ring state into its own thread).
unsafe impl Send for BufRing {}

impl BufRing {
    /// Maps `entries` (a power of two, at most 32768) buffers of `buf_size` bytes and their
    /// descriptor ring, all of them given to the ring.
    pub(crate) fn new(entries: u16, buf_size: usize, group: u16) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > 32768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer ring entries must be a power of two up to 32768",
            ));
        }
        let ring_len = usize::from(entries) * std::mem::size_of::<BufRingEntry>();
        let ring = Mapping::new(ring_len.max(page_size()))?;
        let bufs = Mapping::new(usize::from(entries) * buf_size)?;
        let mut r = BufRing {
            ring,
            bufs,
            entries,
            buf_size,
            group,
            tail: 0,
            in_ring: 0,
        };
        for id in 0..entries {
            r.give_back(id);
        }
        r.publish();
        Ok(r)
    }

    /// Registers the ring with `submitter`'s io_uring under this ring's group id.
    pub(crate) fn register(&self, submitter: &Submitter<'_>) -> io::Result<()> {
        // SAFETY: the descriptor ring is a page-aligned mapping of `entries` descriptors
        // owned by `self`; the owner keeps it alive until the io_uring is torn down.
        unsafe {
            submitter.register_buf_ring_with_flags(
                self.ring.ptr.as_ptr() as u64,
                self.entries,
                self.group,
                0,
            )
        }
    }

    pub(crate) fn entries(&self) -> usize {
        usize::from(self.entries)
    }

    /// Buffers the kernel may pick.
    pub(crate) fn available(&self) -> usize {
        self.in_ring
    }

    /// Notes that the kernel took a buffer (a receive completion named it).
    pub(crate) fn taken(&mut self) {
        self.in_ring = self.in_ring.saturating_sub(1);
    }

    /// Puts buffer `id` back at the ring's tail. The kernel sees it after
    /// [`BufRing::publish`].
    pub(crate) fn give_back(&mut self, id: u16) {
        let mask = self.entries - 1;
        let slot = usize::from(self.tail & mask);
        // SAFETY: `slot < entries`, so the descriptor lies inside the ring mapping; the
        // kernel reads descriptors only between its head and the published tail, and this
        // one is at or past the published tail.
        let entry = unsafe { &mut *self.ring.ptr.as_ptr().cast::<BufRingEntry>().add(slot) };
        entry.set_addr(self.buf_ptr(id) as u64);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.in_ring += 1;
    }

    /// Makes every buffer given back so far visible to the kernel.
    pub(crate) fn publish(&self) {
        // SAFETY: the tail field overlays the `resv` field of the first descriptor, inside
        // the page-aligned ring mapping; it is a u16 at a 2-aligned address, so viewing it
        // as an AtomicU16 is sound. The Release store orders the descriptor writes above
        // before the kernel can observe the new tail.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.ptr.as_ptr().cast::<BufRingEntry>());
            (*tail.cast::<AtomicU16>()).store(self.tail, Ordering::Release);
        }
    }

    fn buf_ptr(&self, id: u16) -> *mut u8 {
        let id = usize::from(id & (self.entries - 1));
        // SAFETY: `id < entries`, so the offset stays inside the buffer mapping.
        unsafe { self.bufs.ptr.as_ptr().add(id * self.buf_size) }
    }

    /// The whole of buffer `id`.
    ///
    /// # Safety
    /// The caller owns buffer `id`: a receive completion handed it over and it has not been
    /// given back since. The kernel does not write to a buffer it does not own.
    pub(crate) unsafe fn buffer(&self, id: u16) -> &[u8] {
        // SAFETY: the buffer lies inside the mapping (see `buf_ptr`) and, by the caller's
        // promise, nobody writes to it while this borrow lasts.
        unsafe { std::slice::from_raw_parts(self.buf_ptr(id), self.buf_size) }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a configuration value.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}
