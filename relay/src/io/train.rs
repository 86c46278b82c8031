//! Z-HOP's send trains: what Z-HOP sends during one receive batch, gathered per destination
//! and sent at the end of the batch with one GSO (`UDP_SEGMENT`) send per run of equal-sized
//! datagrams, instead of one `send`/`sendto` per datagram.
//!
//! Z-HOP decrypts each outer packet into one reused buffer (boringtun writes the plaintext
//! into Z-HOP's scratch buffer, and the next packet overwrites it), so the bytes must be
//! copied to outlive the callback: a train's buffer is that copy. DoubleHop needs none
//! (it sends from the receive buffer); this copy is the price of sending Z-HOP's datagrams
//! in batches, and far cheaper than the per-datagram trip through the kernel's UDP/IP
//! send path it saves.
//!
//! A worker has one [`Trains`]: a fixed pool of buffers, allocated when the worker starts
//! and never grown, so appending allocates nothing. At most [`MAX_OPEN`] trains are open
//! (being filled) at once, one per destination; a train that is full, or the oldest when
//! another destination needs a train, is closed and waits, whole, for the end of the batch.
//!
//! **Order.** Every Z-HOP datagram goes through the trains (none is sent around them), a
//! destination has at most one open train, and trains leave oldest first (closed ones in
//! the order they were closed, then the open ones in the order they were opened). So the
//! datagrams to one destination leave in the order Z-HOP emitted them. The backends flush
//! at the end of every receive batch and of every housekeeping step, so nothing waits
//! while a worker sleeps, and before a flow's socket is closed (`ZhopOut::CloseFlow`).
//!
//! **Buffer ownership.** A buffer is free, open (the worker writes into it), or taken for
//! sending ([`Trains::next`]). A taken buffer counts its holders: the sender, until it has
//! queued the train's sends ([`Trains::release`]), and each send the kernel has not
//! completed (`hold` when an io_uring send is queued, `release` at its completion). Only at
//! zero does it go back on the free list, and only free buffers are written. So a buffer is
//! never written while the kernel may read it; a synchronous send (portable, or the rare
//! flush that cannot wait for the end of a batch) is simply a holder that lets go when the
//! call returns.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::RawFd;

use super::runs::{self, Run, Target};
use super::sys::{SendBatch, Transmit, MAX_GSO_SEGMENTS};
use super::IoStats;

/// Trains open at once per worker. A receive batch carries few destinations (a peer's
/// flows towards its exits, the peers' endpoints for the replies); a destination beyond
/// these closes the oldest open train, which then waits for the end of the batch.
pub(crate) const MAX_OPEN: usize = 8;
/// Buffers of a portable worker: its sends are synchronous, so a buffer is free again as
/// soon as its train has left; one per open train is enough.
pub(crate) const PORTABLE_BUFFERS: usize = MAX_OPEN;
/// Buffers of an io_uring worker: a train's buffer stays with the kernel until its sends
/// complete, which is usually after the next batch has started filling trains.
pub(crate) const URING_BUFFERS: usize = 4 * MAX_OPEN;
/// Bytes a train carries at most: the largest UDP payload of an IPv4 datagram
/// (65,535 − 20 − 8), which is the most one GSO send may carry (IPv6 allows a little more).
pub(crate) const TRAIN_BYTES: usize = 65_507;
/// Room in a train buffer: any single datagram Z-HOP emits fits, alone, even one larger
/// than [`TRAIN_BYTES`] (it then leaves as a plain send).
const BUFFER_BYTES: usize = crate::zhop::MAX_OUTPUT;

/// One buffer of the pool and the train in it.
struct Slot {
    data: Box<[u8]>,
    /// The train's runs of equal-sized segments, each one send (planned by [`runs::push_segment`]).
    runs: Vec<Run>,
    target: Target,
    len: usize,
    segments: usize,
    /// Holders of a taken buffer (see the module's docs); 0 while free or open.
    refs: u16,
}

/// A worker's trains and their buffer pool.
pub(crate) struct Trains {
    slots: Box<[Slot]>,
    free: Vec<u16>,
    /// Open trains, in the order they were opened.
    open: Vec<u16>,
    /// Closed trains waiting to be sent, in the order they were closed.
    closed: VecDeque<u16>,
    /// Datagrams whose send failed, for the worker to count as drops.
    pub failed: usize,
}

impl std::fmt::Debug for Trains {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trains")
            .field("buffers", &self.slots.len())
            .field("free", &self.free.len())
            .field("open", &self.open.len())
            .field("closed", &self.closed.len())
            .finish()
    }
}

/// The sockets trains leave from, as a backend keeps them.
pub(crate) trait TrainSockets {
    /// The descriptor a train to `target` is sent on, whether that socket may use GSO, and
    /// the destination to name (`None` on a connected socket); `None` when the socket is
    /// gone.
    fn socket(&self, target: Target) -> Option<(RawFd, bool, Option<SocketAddr>)>;
    /// The kernel refused GSO on the socket of `target`.
    fn refuse_gso(&mut self, target: Target);
}

impl Trains {
    pub(crate) fn new(buffers: usize) -> Trains {
        let n = buffers.clamp(MAX_OPEN, usize::from(u16::MAX));
        let slots = (0..n)
            .map(|_| Slot {
                data: vec![0u8; BUFFER_BYTES].into_boxed_slice(),
                runs: Vec::with_capacity(MAX_GSO_SEGMENTS),
                target: Target::Client {
                    listener: 0,
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                },
                len: 0,
                segments: 0,
                refs: 0,
            })
            .collect();
        Trains {
            slots,
            // Popped from the back: buffer 0 first.
            free: (0..n as u16).rev().collect(),
            open: Vec::with_capacity(MAX_OPEN),
            closed: VecDeque::with_capacity(n),
            failed: 0,
        }
    }

    /// Whether a buffer is free for a new train.
    pub(crate) fn has_free_buffer(&self) -> bool {
        !self.free.is_empty()
    }

    /// Whether no train waits to be sent.
    pub(crate) fn is_empty(&self) -> bool {
        self.open.is_empty() && self.closed.is_empty()
    }

    /// Appends a copy of `bytes` to the train towards `target`, opening one if needed.
    /// Returns `false` when no buffer is free: the caller sends a train now ([`Trains::next`])
    /// and tries again, or sends `bytes` on its own when nothing waits.
    pub(crate) fn append(&mut self, target: Target, bytes: &[u8]) -> bool {
        let n = bytes.len().min(BUFFER_BYTES);
        if let Some(pos) = self
            .open
            .iter()
            .position(|&b| self.slot(b).target == target)
        {
            let b = self.open[pos];
            if self.slot(b).fits(n) {
                self.slots[usize::from(b)].push(&bytes[..n]);
                return true;
            }
            self.open.remove(pos);
            self.closed.push_back(b);
        }
        if self.open.len() >= MAX_OPEN {
            let oldest = self.open.remove(0);
            self.closed.push_back(oldest);
        }
        let Some(b) = self.free.pop() else {
            return false;
        };
        let slot = &mut self.slots[usize::from(b)];
        slot.target = target;
        slot.runs.clear();
        slot.len = 0;
        slot.segments = 0;
        slot.push(&bytes[..n]);
        self.open.push(b);
        true
    }

    /// Takes the oldest waiting train for sending: the caller holds it until
    /// [`Trains::release`].
    pub(crate) fn next(&mut self) -> Option<u16> {
        self.next_to(|_| true)
    }

    /// Whether a train towards `target` waits to be sent.
    pub(crate) fn holds(&self, target: Target) -> bool {
        let to = |&b: &u16| self.slot(b).target == target;
        self.open.iter().any(to) || self.closed.iter().any(to)
    }

    /// Takes the oldest waiting train whose target `wanted` accepts.
    pub(crate) fn next_to(&mut self, wanted: impl Fn(Target) -> bool) -> Option<u16> {
        let b = if let Some(i) = self
            .closed
            .iter()
            .position(|&b| wanted(self.slot(b).target))
        {
            self.closed.remove(i)?
        } else {
            let i = self
                .open
                .iter()
                .position(|&b| wanted(self.slot(b).target))?;
            self.open.remove(i)
        };
        self.slots[usize::from(b)].refs = 1;
        Some(b)
    }

    /// Where train `b` goes.
    pub(crate) fn target(&self, b: u16) -> Target {
        self.slot(b).target
    }

    /// The runs of train `b`: each is one send, with `start` an offset into
    /// [`Trains::bytes`].
    pub(crate) fn runs(&self, b: u16) -> &[Run] {
        &self.slot(b).runs
    }

    /// The bytes of train `b`.
    pub(crate) fn bytes(&self, b: u16) -> &[u8] {
        let s = self.slot(b);
        &s.data[..s.len]
    }

    /// One more holder of taken buffer `b` (a send in flight).
    pub(crate) fn hold(&mut self, b: u16) {
        self.slots[usize::from(b)].refs += 1;
    }

    /// A holder of taken buffer `b` lets go; the last one frees it.
    pub(crate) fn release(&mut self, b: u16) {
        let s = &mut self.slots[usize::from(b)];
        s.refs = s.refs.saturating_sub(1);
        if s.refs == 0 {
            self.free.push(b);
        }
    }

    fn slot(&self, b: u16) -> &Slot {
        &self.slots[usize::from(b)]
    }

    /// Appends `bytes`, making room by sending the oldest train now when no buffer is free,
    /// and sending `bytes` alone when nothing waits (every buffer is in the kernel's hands).
    pub(crate) fn queue(
        &mut self,
        target: Target,
        bytes: &[u8],
        sockets: &mut impl TrainSockets,
        out: &mut SyncSend<'_>,
    ) {
        while !self.append(target, bytes) {
            match self.next() {
                Some(b) => self.send_now(b, sockets, out),
                None => {
                    out.io.zhop_unbatched += 1;
                    let Some((fd, gso, dest)) = sockets.socket(target) else {
                        self.failed += 1;
                        return;
                    };
                    let tx = Transmit {
                        dest,
                        contents: bytes,
                        segment_size: None,
                    };
                    let mut gso_now = gso;
                    self.failed +=
                        runs::send_all(out.send, fd, &[tx], &mut gso_now, out.io, out.worker);
                    return;
                }
            }
        }
    }

    /// Sends every waiting train whose target `wanted` accepts, now.
    pub(crate) fn flush_now(
        &mut self,
        wanted: impl Fn(Target) -> bool,
        sockets: &mut impl TrainSockets,
        out: &mut SyncSend<'_>,
    ) {
        while let Some(b) = self.next_to(&wanted) {
            self.send_now(b, sockets, out);
        }
    }

    /// Sends taken train `b` with one `sendmmsg` (one message per run, GSO where the socket
    /// allows it) and frees its buffer.
    pub(crate) fn send_now(
        &mut self,
        b: u16,
        sockets: &mut impl TrainSockets,
        out: &mut SyncSend<'_>,
    ) {
        let target = self.target(b);
        let Some((fd, gso, dest)) = sockets.socket(target) else {
            self.failed += self.slot(b).segments;
            self.release(b);
            return;
        };
        const EMPTY: Transmit<'static> = Transmit {
            dest: None,
            contents: &[],
            segment_size: None,
        };
        // A train has at most MAX_GSO_SEGMENTS segments, so even one message per segment
        // fits.
        let mut txs = [EMPTY; MAX_GSO_SEGMENTS];
        let mut n = 0;
        let bytes = self.bytes(b);
        for run in self.runs(b) {
            let seg = run.segment_size();
            if gso && seg.is_some() {
                out.io.zhop_trains_sent += 1;
                out.io.zhop_segments_in_trains += run.segments as u64;
                txs[n] = Transmit {
                    dest,
                    contents: &bytes[run.start..run.start + run.len],
                    segment_size: seg,
                };
                n += 1;
            } else {
                for (start, len) in run.singles() {
                    txs[n] = Transmit {
                        dest,
                        contents: &bytes[start..start + len],
                        segment_size: None,
                    };
                    n += 1;
                }
            }
        }
        let mut gso_now = gso;
        let failed = runs::send_all(out.send, fd, &txs[..n], &mut gso_now, out.io, out.worker);
        if gso && !gso_now {
            sockets.refuse_gso(target);
        }
        self.failed += failed;
        self.release(b);
    }
}

/// What a synchronous send of a train needs besides the train and its socket.
#[derive(Debug)]
pub(crate) struct SyncSend<'a> {
    pub send: &'a mut SendBatch,
    pub io: &'a mut IoStats,
    pub worker: usize,
}

impl Slot {
    /// Whether `n` more bytes fit: at most [`MAX_GSO_SEGMENTS`] segments and
    /// [`TRAIN_BYTES`] in all. (A new train takes its first datagram whatever its size.)
    fn fits(&self, n: usize) -> bool {
        self.segments < MAX_GSO_SEGMENTS && self.len + n <= TRAIN_BYTES
    }

    fn push(&mut self, bytes: &[u8]) {
        let start = self.len;
        self.data[start..start + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self.segments += 1;
        runs::push_segment(&mut self.runs, true, self.target, 0, start, bytes.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::{RoleId, SocketOwner};
    use crate::router::SessionSlot;

    fn flow(i: u32) -> Target {
        Target::Socket(SocketOwner {
            role: RoleId(1),
            slot: SessionSlot {
                index: i,
                generation: 0,
            },
        })
    }

    fn peer(port: u16) -> Target {
        Target::Client {
            listener: 0,
            addr: SocketAddr::from(([192, 0, 2, 1], port)),
        }
    }

    /// The (target, [(segment, segments)]) of every waiting train, oldest first, taking them.
    fn drain(t: &mut Trains) -> Vec<(Target, Vec<(usize, usize)>)> {
        let mut out = Vec::new();
        while let Some(b) = t.next() {
            let runs = t.runs(b).iter().map(|r| (r.segment, r.segments)).collect();
            out.push((t.target(b), runs));
            t.release(b);
        }
        out
    }

    #[test]
    fn equal_datagrams_to_one_destination_make_one_run() {
        let mut t = Trains::new(PORTABLE_BUFFERS);
        for i in 0..5u8 {
            assert!(t.append(flow(1), &[i; 100]));
        }
        // A shorter one ends the run; a longer one after it starts a new run.
        assert!(t.append(flow(1), &[7; 60]));
        assert!(t.append(flow(1), &[8; 100]));
        let b = t.next().unwrap();
        assert_eq!(t.bytes(b).len(), 660);
        assert_eq!(
            &t.bytes(b)[500..560],
            &[7; 60][..],
            "the bytes are copied in order"
        );
        let runs: Vec<_> = t
            .runs(b)
            .iter()
            .map(|r| (r.start, r.len, r.segments))
            .collect();
        assert_eq!(runs, vec![(0, 560, 6), (560, 100, 1)]);
        assert_eq!(t.runs(b)[0].segment_size(), Some(100));
        assert_eq!(t.runs(b)[1].segment_size(), None);
        t.release(b);
        assert!(t.is_empty());
    }

    #[test]
    fn size_changes_split_runs() {
        let mut t = Trains::new(PORTABLE_BUFFERS);
        for len in [100, 100, 200, 200, 200, 50, 50, 0, 0] {
            assert!(t.append(flow(1), &vec![1; len]));
        }
        // A larger datagram starts a run; a shorter one ends the run it joins (GSO allows
        // only the last segment to be shorter); empty datagrams never join a run (a
        // segment size of 0 means nothing).
        assert_eq!(
            drain(&mut t),
            vec![(flow(1), vec![(100, 2), (200, 4), (50, 1), (0, 1), (0, 1)])]
        );
    }

    #[test]
    fn destinations_get_trains_of_their_own_and_leave_in_opening_order() {
        let mut t = Trains::new(PORTABLE_BUFFERS);
        t.append(flow(1), &[1; 100]);
        t.append(peer(5), &[2; 80]);
        t.append(flow(1), &[1; 100]);
        t.append(flow(2), &[3; 100]);
        t.append(peer(5), &[2; 80]);
        t.append(peer(6), &[2; 80]);
        assert_eq!(
            drain(&mut t),
            vec![
                (flow(1), vec![(100, 2)]),
                (peer(5), vec![(80, 2)]),
                (flow(2), vec![(100, 1)]),
                (peer(6), vec![(80, 1)]),
            ]
        );
    }

    #[test]
    fn a_full_train_is_closed_and_leaves_before_its_successor() {
        let mut t = Trains::new(PORTABLE_BUFFERS);
        // By segments: the 65th datagram opens a second train.
        for _ in 0..MAX_GSO_SEGMENTS + 1 {
            assert!(t.append(flow(1), &[1; 10]));
        }
        t.append(flow(2), &[2; 10]);
        assert_eq!(
            drain(&mut t),
            vec![
                (flow(1), vec![(10, MAX_GSO_SEGMENTS)]),
                (flow(1), vec![(10, 1)]),
                (flow(2), vec![(10, 1)]),
            ]
        );
        // By bytes: 47 × 1,400 = 65,800 > TRAIN_BYTES.
        for _ in 0..47 {
            t.append(peer(1), &[1; 1400]);
        }
        let runs = drain(&mut t);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].1, vec![(1400, TRAIN_BYTES / 1400)]);
        // A datagram larger than a train travels alone.
        t.append(peer(1), &[1; 10]);
        t.append(peer(1), &vec![1; TRAIN_BYTES + 1]);
        t.append(peer(1), &[1; 10]);
        assert_eq!(
            drain(&mut t),
            vec![
                (peer(1), vec![(10, 1)]),
                (peer(1), vec![(TRAIN_BYTES + 1, 1)]),
                (peer(1), vec![(10, 1)]),
            ]
        );
    }

    #[test]
    fn too_many_destinations_close_the_oldest_and_buffers_run_out() {
        let mut t = Trains::new(PORTABLE_BUFFERS);
        for i in 0..MAX_OPEN as u32 {
            assert!(t.append(flow(i), &[1; 10]));
        }
        // A ninth destination closes flow 0's train; no buffer is left for it.
        assert!(!t.append(flow(99), &[1; 10]));
        // The caller sends the oldest (flow 0) and tries again.
        let b = t.next().unwrap();
        assert_eq!(t.target(b), flow(0));
        t.release(b);
        assert!(t.append(flow(99), &[1; 10]));
        // Flow 0 gets a new train: it leaves after the others, which are older.
        let order: Vec<_> = drain(&mut t).into_iter().map(|(d, _)| d).collect();
        let mut expected: Vec<_> = (1..MAX_OPEN as u32).map(flow).collect();
        expected.push(flow(99));
        assert_eq!(order, expected);
    }

    #[test]
    fn a_buffer_is_free_only_when_its_last_holder_lets_go() {
        let mut t = Trains::new(PORTABLE_BUFFERS);
        for i in 0..MAX_OPEN as u32 {
            t.append(flow(i), &[1; 10]);
        }
        let b = t.next().unwrap();
        // Two sends in flight, then the sender lets go: still not free.
        t.hold(b);
        t.hold(b);
        t.release(b);
        assert!(!t.append(flow(50), &[1; 10]), "no free buffer");
        t.release(b);
        assert!(!t.append(flow(51), &[1; 10]));
        t.release(b);
        assert!(t.append(flow(52), &[1; 10]), "the last completion frees it");
    }

    #[test]
    fn next_to_takes_only_the_wanted_destination_oldest_first() {
        let mut t = Trains::new(PORTABLE_BUFFERS);
        for _ in 0..MAX_GSO_SEGMENTS + 3 {
            t.append(flow(1), &[1; 10]);
        }
        t.append(flow(2), &[1; 10]);
        let a = t.next_to(|d| d == flow(1)).unwrap();
        assert_eq!(t.runs(a)[0].segments, MAX_GSO_SEGMENTS);
        let b = t.next_to(|d| d == flow(1)).unwrap();
        assert_eq!(t.runs(b)[0].segments, 3);
        assert!(t.next_to(|d| d == flow(1)).is_none());
        t.release(a);
        t.release(b);
        assert_eq!(drain(&mut t), vec![(flow(2), vec![(10, 1)])]);
    }
}
