//! Runs: consecutive segments of one received message (or one train buffer) going to one
//! target, each of which leaves as one send (a GSO send when it holds several segments),
//! and the synchronous `sendmmsg` path with its per-socket GSO fallback.

use std::os::fd::RawFd;

use super::sys::{self, SendBatch, Transmit, MAX_GSO_SEGMENTS};
use super::IoStats;

/// Where a run of segments goes: the roles' name for a socket.
pub(crate) use crate::role::Target;

/// Consecutive segments of one received message going to one target. `msg` names the
/// message in the backend's own terms (a batch index, a ring buffer id).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub target: Target,
    pub msg: usize,
    pub start: usize,
    pub len: usize,
    pub segment: usize,
    pub segments: usize,
}

impl Run {
    /// The UDP_SEGMENT size to send this run with, when it holds more than one segment.
    pub(crate) fn segment_size(&self) -> Option<u16> {
        (self.segments > 1).then_some(self.segment as u16)
    }

    /// Its segments one by one, as (start, length): how it leaves a socket without GSO.
    pub(crate) fn singles(&self) -> impl Iterator<Item = (usize, usize)> {
        let (start, end, seg) = (self.start, self.start + self.len, self.segment.max(1));
        (0..self.segments).map(move |i| {
            let s = start + i * seg;
            (s, seg.min(end - s))
        })
    }
}

/// Adds a forwarded segment to `runs`: it extends the last run when it directly follows it
/// in the same message, goes to the same target, and GSO may carry it (`gso`); otherwise
/// it starts a run of its own.
pub(crate) fn push_segment(
    runs: &mut Vec<Run>,
    gso: bool,
    target: Target,
    msg: usize,
    start: usize,
    len: usize,
) {
    if let Some(run) = runs.last_mut() {
        let contiguous = run.msg == msg && run.start + run.len == start;
        // GSO needs equal segments; only the last may be shorter. An empty datagram is
        // never a segment (a segment size of 0 means no segmentation).
        let fits = len > 0 && len <= run.segment && run.len == run.segment * run.segments;
        if gso && contiguous && fits && run.target == target && run.segments < MAX_GSO_SEGMENTS {
            run.len += len;
            run.segments += 1;
            return;
        }
    }
    runs.push(Run {
        target,
        msg,
        start,
        len,
        segment: len,
        segments: 1,
    });
}

/// Sends `txs` on `fd` with as few `sendmmsg` calls as the batch allows. `gso` is whether
/// this socket may use GSO: when it may not, a message planned as a GSO run leaves as its
/// segments, one datagram each. When the kernel refuses GSO (EIO, EINVAL, EMSGSIZE) for a
/// message, `gso` is cleared for good (the caller keeps it per socket) and the message's
/// segments are sent one by one. Returns how many datagrams could not be sent.
pub(crate) fn send_all(
    send: &mut SendBatch,
    fd: RawFd,
    txs: &[Transmit<'_>],
    gso: &mut bool,
    io: &mut IoStats,
    worker: usize,
) -> usize {
    let mut failed = 0;
    let mut off = 0;
    while off < txs.len() {
        if !*gso && txs[off].segment_size.is_some() {
            failed += send_singly(send, fd, txs[off], io);
            off += 1;
            continue;
        }
        // Everything up to the next GSO message goes as it is (all of it while GSO is on).
        let end = if *gso {
            txs.len()
        } else {
            txs[off..]
                .iter()
                .position(|t| t.segment_size.is_some())
                .map_or(txs.len(), |p| off + p)
        };
        io.send_calls += 1;
        match send.send(fd, &txs[off..end]) {
            Ok(taken) => {
                let taken = taken.max(1);
                io.gso_sends += txs[off..off + taken]
                    .iter()
                    .filter(|t| t.segment_size.is_some())
                    .count() as u64;
                off += taken;
            }
            Err(e) => {
                failed += send_refused(send, fd, txs[off], e, gso, io, worker);
                off += 1;
            }
        }
    }
    failed
}

/// Sends a GSO message's segments as datagrams of their own, as few `sendmmsg` calls as
/// the batch allows. Returns the datagrams that could not be sent.
fn send_singly(send: &mut SendBatch, fd: RawFd, tx: Transmit<'_>, io: &mut IoStats) -> usize {
    const EMPTY: Transmit<'static> = Transmit {
        dest: None,
        contents: &[],
        segment_size: None,
    };
    let segment = tx
        .segment_size
        .map_or(tx.contents.len(), usize::from)
        .max(1);
    let mut failed = 0;
    // A planned run never has more than MAX_GSO_SEGMENTS segments; a longer message (from
    // no planner of ours) leaves in several rounds.
    for group in tx.contents.chunks(segment * MAX_GSO_SEGMENTS) {
        let mut singles = [EMPTY; MAX_GSO_SEGMENTS];
        let mut n = 0;
        for chunk in group.chunks(segment) {
            singles[n] = Transmit {
                dest: tx.dest,
                contents: chunk,
                segment_size: None,
            };
            n += 1;
        }
        let mut off = 0;
        while off < n {
            io.send_calls += 1;
            match send.send(fd, &singles[off..n]) {
                Ok(taken) => off += taken.max(1),
                Err(_) => {
                    failed += 1;
                    off += 1;
                }
            }
        }
    }
    failed
}

/// A send was refused. If the kernel refused GSO, stop using it and send the segments one
/// by one; anything else fails every datagram of the message. Returns the datagrams lost.
fn send_refused(
    send: &mut SendBatch,
    fd: RawFd,
    tx: Transmit<'_>,
    e: std::io::Error,
    gso: &mut bool,
    io: &mut IoStats,
    worker: usize,
) -> usize {
    if tx.segment_size.is_some() && sys::is_gso_error(&e) {
        if *gso {
            *gso = false;
            io.gso_fallbacks += 1;
            tracing::warn!(worker, error = %e,
                "kernel refused UDP GSO; this socket sends segments one by one from now on");
        }
        return send_singly(send, fd, tx, io);
    }
    tracing::trace!(worker, error = %e, "send failed");
    let segment = tx
        .segment_size
        .map_or(tx.contents.len(), usize::from)
        .max(1);
    tx.contents.len().div_ceil(segment).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::{RoleId, SocketOwner};
    use crate::slab::SessionSlot;

    fn exit(i: u32) -> Target {
        Target::Socket(SocketOwner {
            role: RoleId(0),
            slot: SessionSlot {
                index: i,
                generation: 0,
            },
        })
    }

    #[test]
    fn contiguous_equal_segments_to_one_target_make_one_run() {
        let mut runs = Vec::new();
        for i in 0..3 {
            push_segment(&mut runs, true, exit(1), 0, i * 100, 100);
        }
        // A shorter last segment still belongs; nothing may follow it.
        push_segment(&mut runs, true, exit(1), 0, 300, 40);
        push_segment(&mut runs, true, exit(1), 0, 340, 40);
        assert_eq!(runs.len(), 2);
        assert_eq!(
            (runs[0].len, runs[0].segments, runs[0].segment_size()),
            (340, 4, Some(100))
        );
        assert_eq!((runs[1].start, runs[1].segment_size()), (340, None));
    }

    #[test]
    fn a_new_target_message_or_no_gso_starts_a_new_run() {
        let mut runs = Vec::new();
        push_segment(&mut runs, true, exit(1), 0, 0, 100);
        push_segment(&mut runs, true, exit(2), 0, 100, 100);
        push_segment(&mut runs, true, exit(2), 1, 200, 100);
        push_segment(&mut runs, false, exit(2), 1, 300, 100);
        assert_eq!(runs.len(), 4);
        let mut runs = Vec::new();
        for i in 0..(MAX_GSO_SEGMENTS + 1) {
            push_segment(&mut runs, true, exit(1), 0, i * 10, 10);
        }
        assert_eq!(runs.len(), 2);
    }
}
