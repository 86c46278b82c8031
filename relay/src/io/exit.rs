//! A worker's side of the Exit role: its TUN queue, the packets it writes there, and the
//! packets it reads there, each sent through the tunnel of the peer whose allowed IPs hold
//! its destination (longest prefix, [`ExitTable::route`]) — on this worker when it holds
//! that tunnel, else handed to the worker that does ([`Handoff`]).
//!
//! The role logic (decrypting, the inbound allowed-IPs check, encrypting) is Z-HOP's
//! ([`Zhop::handle_tun`]): an Exit peer is a provisioned peer terminated on the node's key
//! like a Z-HOP peer, so both share admission, cookies, roaming and timers.
//!
//! Reads and writes are batches ([`TunQueue::read_batch`], [`TunTx`]). On an offloading
//! device a read is a super-packet that `tun.rs` splits into MTU-sized packets before they
//! reach this module, and the decrypted packets queued during a socket batch are coalesced
//! into super-packets when the worker flushes: the roles only ever see IP packets.

use std::sync::Arc;
use std::time::Instant;

use super::handoff::Handoff;
use super::sys;
use crate::drop_reason::DropReason;
use crate::role::{Listener, Output, Role, Traffic};
use crate::table::ExitTable;
use crate::tun::{TunQueue, TunRxBatch, TunTx};
use crate::zhop::{inner, Zhop};

/// Packets read from the TUN queue per turn, before the sockets get theirs.
const TUN_BATCH: usize = 64;
/// Handed-over packets taken per turn.
const HANDOFF_BATCH: usize = 256;

/// The Exit role's counters of one worker.
///
/// With TUN offloads on, a read or write may be a super-packet: `tun_rx.packets /
/// tun_reads` is the packets per read (1 without offloads), likewise for writes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Packets read from the TUN device (towards peers), after splitting.
    pub tun_rx: Traffic,
    /// Packets written to the TUN device (from peers), before coalescing.
    pub tun_tx: Traffic,
    /// `read(2)`s from the TUN device.
    pub tun_reads: u64,
    /// Of those, super-packets (split into two packets or more).
    pub tun_super_reads: u64,
    /// `write(2)`s to the TUN device that it accepted.
    pub tun_writes: u64,
    /// Of those, super-packets (two packets or more coalesced).
    pub tun_super_writes: u64,
    /// TUN packets handed to the worker holding their peer's tunnel.
    pub handed_off: u64,
    /// Packets other workers handed to this one.
    pub handed_in: u64,
}

impl ExitStats {
    pub fn merge(&mut self, o: &ExitStats) {
        self.tun_rx.packets += o.tun_rx.packets;
        self.tun_rx.bytes += o.tun_rx.bytes;
        self.tun_tx.packets += o.tun_tx.packets;
        self.tun_tx.bytes += o.tun_tx.bytes;
        self.tun_reads += o.tun_reads;
        self.tun_super_reads += o.tun_super_reads;
        self.tun_writes += o.tun_writes;
        self.tun_super_writes += o.tun_super_writes;
        self.handed_off += o.handed_off;
        self.handed_in += o.handed_in;
    }
}

/// What a worker starts the Exit role with: its queue and the shared hand-off queues.
#[derive(Debug)]
pub(crate) struct ExitContext {
    pub queue: TunQueue,
    pub handoff: Arc<Handoff>,
}

/// One worker's TUN side.
#[derive(Debug)]
pub(crate) struct ExitIo {
    worker: usize,
    queue: TunQueue,
    rx: TunRxBatch,
    tx: TunTx,
    handoff: Arc<Handoff>,
    /// The queue may have packets: set by the backend on readiness (edge-triggered),
    /// cleared when a read finds it empty.
    readable: bool,
    pub stats: ExitStats,
    /// Write failures not yet counted as drops.
    failed: u64,
    /// The listeners (IPv4, IPv6) the node initiates to a peer's configured endpoint from.
    listeners: (Option<Listener>, Option<Listener>),
}

impl ExitIo {
    pub(crate) fn new(worker: usize, ctx: ExitContext) -> Self {
        let rx = TunRxBatch::new(&ctx.queue, TUN_BATCH);
        let tx = TunTx::new(&ctx.queue);
        ExitIo {
            worker,
            queue: ctx.queue,
            rx,
            tx,
            handoff: ctx.handoff,
            readable: true,
            stats: ExitStats::default(),
            failed: 0,
            listeners: (None, None),
        }
    }

    pub(crate) fn set_listeners(&mut self, v4: Option<Listener>, v6: Option<Listener>) {
        self.listeners = (v4, v6);
    }

    pub(crate) fn set_readable(&mut self) {
        self.readable = true;
    }

    /// Whether work waits that must not wait for readiness.
    pub(crate) fn busy(&self) -> bool {
        self.readable || self.handoff.waiting(self.worker)
    }

    /// Queues a decrypted packet for the TUN device.
    pub(crate) fn write(&mut self, pkt: &[u8]) -> bool {
        let f = self.tx.push(&self.queue, pkt);
        self.count(f);
        true
    }

    /// Writes what waits for the TUN device; returns the packets it refused.
    pub(crate) fn flush(&mut self) -> u64 {
        if !self.tx.is_empty() {
            let f = self.tx.flush(&self.queue);
            self.count(f);
        }
        std::mem::take(&mut self.failed)
    }

    fn count(&mut self, f: crate::tun::Flushed) {
        self.stats.tun_tx.packets += f.packets;
        self.stats.tun_tx.bytes += f.bytes;
        self.stats.tun_writes += f.writes;
        self.stats.tun_super_writes += f.super_writes;
        self.failed += f.failed;
    }

    /// One turn: the packets other workers handed over, then a batch from the TUN queue,
    /// each through its peer's tunnel (`zhop`) or handed to the worker holding it.
    pub(crate) fn serve(
        &mut self,
        zhop: &mut Zhop,
        table: &ExitTable,
        now: Instant,
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) {
        for _ in 0..HANDOFF_BATCH {
            let Some(h) = self.handoff.take(self.worker) else {
                break;
            };
            self.stats.handed_in += 1;
            if !zhop.tun_packet(now, &h.peer, &h.packet, out) {
                match table.peer(&h.peer) {
                    Some(peer) => {
                        self.elsewhere().send(zhop, peer, &h.packet, true, now, out);
                    }
                    None => zhop.record_drop(DropReason::ExitNoRoute),
                }
            }
            self.handoff.give_back(h.packet);
        }
        if !self.readable {
            return;
        }
        let (n, drained) = match self.queue.read_batch(&mut self.rx) {
            Ok(r) => r,
            Err(e) => {
                tracing::trace!(worker = self.worker, error = %e, "TUN read failed");
                (0, true)
            }
        };
        if drained {
            self.readable = false;
        }
        let counts = self.rx.counts();
        self.stats.tun_reads += counts.reads;
        self.stats.tun_super_reads += counts.super_reads;
        for _ in 0..counts.unsplittable {
            zhop.record_drop(DropReason::ExitTunReadUnsplittable);
        }
        let rx = &self.rx;
        let mut elsewhere = Elsewhere {
            worker: self.worker,
            handoff: &self.handoff,
            stats: &mut self.stats,
            listeners: self.listeners,
        };
        for i in 0..n {
            let pkt = rx.packet(i);
            elsewhere.stats.tun_rx.add(pkt.len());
            let Some(peer) = inner::ip_destination(pkt).and_then(|d| table.route(d)) else {
                zhop.record_drop(DropReason::ExitNoRoute);
                continue;
            };
            // The worker that last heard from the peer holds its live tunnel: a copy here is
            // one the peer roamed away from (onto another worker), whose endpoint is stale.
            let owned_elsewhere = peer.owner().is_some_and(|w| w != elsewhere.worker);
            if !owned_elsewhere && zhop.tun_packet(now, &peer.spec.public_key, pkt, out) {
                continue;
            }
            elsewhere.send(zhop, peer, pkt, false, now, out);
        }
    }

    /// Starts the tunnels this worker is due to keep up by itself: with every peer that has
    /// an endpoint steered here and a persistent keepalive, and no tunnel on any worker.
    /// The first packet is empty: a keepalive once the handshake completes.
    pub(crate) fn bring_up(
        &mut self,
        zhop: &mut Zhop,
        table: &ExitTable,
        now: Instant,
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) {
        let workers = self.handoff.workers();
        for peer in table.keepalive_peers() {
            let Some(endpoint) = peer.spec.endpoint else {
                continue;
            };
            if sys::steer(endpoint, workers) != self.worker || peer.owner().is_some() {
                continue;
            }
            let listener = if endpoint.is_ipv4() {
                self.listeners.0
            } else {
                self.listeners.1
            };
            if let Some(l) = listener {
                zhop.initiate(now, &peer.spec.public_key, l, endpoint, &[], out);
            }
        }
    }

    fn elsewhere(&mut self) -> Elsewhere<'_> {
        Elsewhere {
            worker: self.worker,
            handoff: &self.handoff,
            stats: &mut self.stats,
            listeners: self.listeners,
        }
    }
}

/// What a worker needs to send a TUN packet whose peer's tunnel it does not hold.
struct Elsewhere<'a> {
    worker: usize,
    handoff: &'a Handoff,
    stats: &'a mut ExitStats,
    listeners: (Option<Listener>, Option<Listener>),
}

impl Elsewhere<'_> {
    /// A TUN packet for `peer`, whose tunnel this worker does not hold: to the worker that
    /// does; else, for a peer with a configured endpoint, to the worker that endpoint's
    /// answers are steered to (`sys::steer`), which initiates (WireGuard's client end);
    /// else dropped. `handed`: it was handed to this worker already (never handed on).
    fn send(
        &mut self,
        zhop: &mut Zhop,
        peer: &crate::table::Peer,
        pkt: &[u8],
        handed: bool,
        now: Instant,
        out: &mut impl FnMut(Output<'_>) -> bool,
    ) {
        let key = peer.spec.public_key;
        let target = match (peer.owner(), peer.spec.endpoint) {
            (Some(w), _) if w != self.worker => Some(w),
            (_, Some(ep)) => Some(sys::steer(ep, self.handoff.workers())),
            _ => None,
        };
        match target {
            Some(w) if w != self.worker && !handed => {
                if self.handoff.hand(w, key, pkt) {
                    self.stats.handed_off += 1;
                } else {
                    zhop.record_drop(DropReason::ExitHandoffFull);
                }
            }
            Some(w) if w == self.worker => {
                // Only an endpoint makes this worker the target.
                let Some(endpoint) = peer.spec.endpoint else {
                    zhop.record_drop(DropReason::ExitNoRoute);
                    return;
                };
                let listener = if endpoint.is_ipv4() {
                    self.listeners.0
                } else {
                    self.listeners.1
                };
                match listener {
                    Some(l) => zhop.initiate(now, &key, l, endpoint, pkt, out),
                    None => zhop.record_drop(DropReason::ExitNoRoute),
                }
            }
            _ => zhop.record_drop(DropReason::ExitNoRoute),
        }
    }
}
