//! Hand-offs of the Exit role's TUN packets between workers.
//!
//! The kernel picks the TUN queue a packet comes out of by flow hash, but a peer's tunnel
//! (its boringtun `Tunn`) lives on the one worker its UDP traffic is steered to. A worker
//! that reads a packet for a peer another worker holds copies it into a buffer from a
//! shared, fixed pool and pushes it onto that worker's bounded inbox (lock-free
//! `crossbeam_queue::ArrayQueue`s), then wakes it: the owner's existing waker (an eventfd
//! its wait watches, in both backends), written only when the owner has not been woken
//! since it last drained its inbox. Nothing is allocated per packet; a full inbox or an
//! empty pool drops the packet, counted (`exit_handoff_full`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use super::CachePadded;
use crate::keys::PublicKey;

/// Packets one worker's inbox holds.
const INBOX: usize = 1024;

/// A packet handed to the worker holding its peer's tunnel.
#[derive(Debug)]
pub(crate) struct Handed {
    pub peer: PublicKey,
    pub packet: Vec<u8>,
}

/// The hand-off queues of every worker, shared by all of them.
#[derive(Debug)]
pub(crate) struct Handoff {
    inboxes: Vec<CachePadded<ArrayQueue<Handed>>>,
    /// Whether worker `i` has been woken since it last drained its inbox.
    woken: Vec<CachePadded<AtomicBool>>,
    wakers: Vec<Arc<mio::Waker>>,
    pool: ArrayQueue<Vec<u8>>,
    packet_size: usize,
}

impl Handoff {
    /// Queues for the workers woken by `wakers`, with buffers for packets of up to
    /// `packet_size` bytes (the TUN device's MTU).
    pub(crate) fn new(wakers: Vec<Arc<mio::Waker>>, packet_size: usize) -> Self {
        let n = wakers.len();
        let buffers = INBOX * n.max(1);
        let pool = ArrayQueue::new(buffers);
        for _ in 0..buffers {
            // The pool holds exactly `buffers`: each push finds room.
            let _ = pool.push(Vec::with_capacity(packet_size));
        }
        Handoff {
            inboxes: (0..n)
                .map(|_| CachePadded(ArrayQueue::new(INBOX)))
                .collect(),
            woken: (0..n)
                .map(|_| CachePadded(AtomicBool::new(false)))
                .collect(),
            wakers,
            pool,
            packet_size,
        }
    }

    /// Hands a copy of `packet` for `peer` to worker `to`. Returns false (nothing sent)
    /// when the packet is too big, the pool is empty or the inbox full.
    pub(crate) fn hand(&self, to: usize, peer: PublicKey, packet: &[u8]) -> bool {
        let Some(inbox) = self.inboxes.get(to) else {
            return false;
        };
        if packet.len() > self.packet_size {
            return false;
        }
        let Some(mut buf) = self.pool.pop() else {
            return false;
        };
        buf.clear();
        buf.extend_from_slice(packet);
        if let Err(h) = inbox.push(Handed { peer, packet: buf }) {
            self.give_back(h.packet);
            return false;
        }
        if !self.woken[to].swap(true, Ordering::AcqRel) {
            let _ = self.wakers[to].wake();
        }
        true
    }

    /// The next packet handed to worker `me`. The caller gives its buffer back
    /// ([`Handoff::give_back`]) once done with it.
    pub(crate) fn take(&self, me: usize) -> Option<Handed> {
        let inbox = self.inboxes.get(me)?;
        // Cleared before looking, so a packet pushed after the inbox looked empty wakes
        // the worker again.
        self.woken[me].store(false, Ordering::Release);
        inbox.pop()
    }

    /// How many workers there are.
    pub(crate) fn workers(&self) -> usize {
        self.inboxes.len()
    }

    /// Whether worker `me` has packets waiting.
    pub(crate) fn waiting(&self, me: usize) -> bool {
        self.inboxes.get(me).is_some_and(|q| !q.is_empty())
    }

    pub(crate) fn give_back(&self, buf: Vec<u8>) {
        // Every buffer came from the pool, so there is room for it.
        let _ = self.pool.push(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_packet_reaches_its_worker_and_its_buffer_returns() {
        let polls: Vec<mio::Poll> = (0..2).map(|_| mio::Poll::new().unwrap()).collect();
        let wakers = polls
            .iter()
            .map(|p| Arc::new(mio::Waker::new(p.registry(), mio::Token(0)).unwrap()))
            .collect();
        let h = Handoff::new(wakers, 1500);
        let key = PublicKey([7; 32]);
        assert!(h.hand(1, key, b"hello"));
        assert!(!h.hand(1, key, &[0; 1501]), "bigger than the MTU");
        assert!(!h.hand(5, key, b"x"), "no such worker");
        assert!(h.waiting(1));
        assert!(!h.waiting(0));
        let got = h.take(1).unwrap();
        assert_eq!((got.peer, &got.packet[..]), (key, &b"hello"[..]));
        h.give_back(got.packet);
        assert!(h.take(1).is_none());
        // A full inbox refuses, and gives its buffer back to the pool.
        let mut n = 0;
        while h.hand(0, key, b"y") {
            n += 1;
        }
        assert_eq!(n, INBOX);
        assert_eq!(
            h.pool.len(),
            INBOX,
            "the other worker's share is still free"
        );
    }
}
