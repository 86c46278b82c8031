//! Whether this process can run the io_uring backend, and why not: the probe run before
//! the workers start, and the ring every worker builds with the same flags.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, IoUring};

use super::bufring::BufRing;
use super::{recv_msghdr, user_data, BUFFER_GROUP, CANCEL, RECV, SQ_ENTRIES};
use crate::io::sys;

/// Why io_uring cannot drive the data path on this machine.
#[derive(Debug, thiserror::Error)]
#[error("io_uring unavailable: {step} failed: {error}; likely cause: {hint}")]
pub struct UringUnavailable {
    /// What was being set up.
    pub step: &'static str,
    pub error: io::Error,
    /// The likely cause, in words.
    pub hint: String,
}

impl UringUnavailable {
    pub(super) fn new(step: &'static str, error: io::Error) -> Self {
        let hint = match error.raw_os_error() {
            Some(libc::ENOSYS) => {
                "the kernel has no io_uring, or this runs under an emulator such as qemu-user"
                    .to_owned()
            }
            Some(libc::EPERM) | Some(libc::EACCES) => {
                match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                    .ok()
                    .as_deref()
                    .map(str::trim)
                {
                    Some("2") => "kernel.io_uring_disabled = 2".to_owned(),
                    Some("1") => {
                        "kernel.io_uring_disabled = 1 and this process is not in io_uring_group"
                            .to_owned()
                    }
                    _ => "denied by a seccomp filter (Docker's default profile blocks io_uring)"
                        .to_owned(),
                }
            }
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                "the kernel is too old: this backend needs Linux 6.1 (single issuer, deferred \
                 task running, buffer rings, multishot recvmsg)"
                    .to_owned()
            }
            Some(libc::ENOMEM) => "not enough memory (or address space, or locked memory \
                 under RLIMIT_MEMLOCK) for the ring and its receive buffers: each worker maps \
                 ring_buffers of them, 64 KiB each"
                .to_owned(),
            _ => "unexpected error".to_owned(),
        };
        UringUnavailable { step, error, hint }
    }
}

/// A ring with the flags every worker uses: one thread submits, and the kernel runs
/// completion work only when that thread enters the ring (so completions never interrupt
/// the worker), and a bad request does not stop the rest of its batch.
pub(super) fn build_ring(cq_entries: u32) -> Result<IoUring, UringUnavailable> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all()
        .setup_cqsize(cq_entries)
        .build(SQ_ENTRIES)
        .map_err(|e| UringUnavailable::new("io_uring_setup", e))
}

/// Checks that this process can run the io_uring backend: a ring with the workers' flags,
/// a provided buffer ring, and a multishot recvmsg the kernel accepts. Cheap; leaves
/// nothing behind.
pub fn probe() -> Result<(), UringUnavailable> {
    let mut ring = build_ring(2 * SQ_ENTRIES)?;
    let bufs = BufRing::new(1, 4096, BUFFER_GROUP).map_err(|e| UringUnavailable::new("mmap", e))?;
    bufs.register(&ring.submitter())
        .map_err(|e| UringUnavailable::new("registering a buffer ring", e))?;
    let sock = sys::udp_socket(&SocketAddr::from(([127, 0, 0, 1], 0)))
        .map_err(|e| UringUnavailable::new("opening a probe socket", e))?;
    let hdr = recv_msghdr();
    let recv = opcode::RecvMsgMulti::new(Fd(sock.as_raw_fd()), &*hdr, BUFFER_GROUP)
        .build()
        .user_data(user_data(RECV, 0));
    let cancel = opcode::AsyncCancel::new(user_data(RECV, 0))
        .build()
        .user_data(user_data(CANCEL, 0));
    // SAFETY: the receive's msghdr and the buffer ring outlive the ring's requests: both
    // are dropped after `ring`, and the loop below waits for the receive's final
    // completion before anything is dropped.
    unsafe {
        let mut sq = ring.submission();
        let _ = sq.push(&recv);
        let _ = sq.push(&cancel);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut result = Ok(());
    let mut recv_done = false;
    while !recv_done && Instant::now() < deadline {
        let ts = Timespec::from(Duration::from_millis(100));
        match ring
            .submitter()
            .submit_with_args(1, &SubmitArgs::new().timespec(&ts))
        {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => return Err(UringUnavailable::new("io_uring_enter", e)),
        }
        for cqe in ring.completion() {
            if cqe.user_data() == user_data(RECV, 0) && !cqueue::more(cqe.flags()) {
                recv_done = true;
                let res = cqe.result();
                if res < 0 && res != -libc::ECANCELED {
                    result = Err(UringUnavailable::new(
                        "multishot recvmsg",
                        io::Error::from_raw_os_error(-res),
                    ));
                }
            }
        }
    }
    if !recv_done {
        // The kernel still holds the header and the buffer ring: leak them rather than
        // free memory it may write to.
        std::mem::forget(hdr);
        std::mem::forget(bufs);
        return Err(UringUnavailable::new(
            "cancelling the probe receive",
            io::Error::from(io::ErrorKind::TimedOut),
        ));
    }
    drop(ring);
    result
}
