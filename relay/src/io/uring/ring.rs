//! The ring of one worker and the count of its requests in flight.

use std::io;

use io_uring::{opcode, squeue, IoUring};

/// The ring and the count of requests whose final completion has not arrived.
pub(super) struct Ring {
    pub(super) ring: IoUring,
    pub(super) inflight: usize,
    pub(super) enters: u64,
}

impl Ring {
    /// Queues `entry`, submitting what is queued first when the queue is full.
    ///
    /// # Safety
    /// Everything `entry` points at (headers, buffers, descriptors) stays valid until its
    /// final completion has been reaped.
    pub(super) unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: passed on from this function's contract.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.inflight += 1;
                return;
            }
            self.enters += 1;
            if let Err(e) = self.ring.submit() {
                if e.raw_os_error() != Some(libc::EBUSY) && e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "io_uring submit failed");
                }
                // EBUSY: the completion queue overflowed; the caller reaps before long.
                std::thread::yield_now();
            }
        }
    }

    /// Queues the cancellation of the request whose user data is `target`; the
    /// cancellation's own completion carries `user_data`.
    pub(super) fn cancel(&mut self, target: u64, user_data: u64) {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        // SAFETY: a cancellation points at nothing but a user data value.
        unsafe { self.push(&entry) };
    }
}
