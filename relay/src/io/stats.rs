//! What a worker counts and publishes: its I/O counters, batch latency histogram, and the
//! report the control side reads.

use std::sync::{Arc, Mutex};

use crate::router::{ExitStats, RouterStats};

/// A fixed-bucket latency histogram: plain integers, bounds 1 µs · 2^i.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// `buckets[i]` counts samples ≤ [`LatencyHistogram::bound_ns`]`(i)` and above the
    /// previous bound; the last bucket also holds everything larger.
    pub buckets: [u64; LatencyHistogram::BUCKETS],
    pub sum_ns: u64,
    pub count: u64,
}

impl LatencyHistogram {
    pub const BUCKETS: usize = 16;

    /// Upper bound of bucket `i` in nanoseconds (1 µs, 2 µs, … 32.8 ms).
    pub fn bound_ns(i: usize) -> u64 {
        1_000 << i
    }

    pub fn record(&mut self, ns: u64) {
        let i = (ns.max(1).div_ceil(1_000))
            .next_power_of_two()
            .trailing_zeros() as usize;
        self.buckets[i.min(Self::BUCKETS - 1)] += 1;
        self.sum_ns += ns;
        self.count += 1;
    }

    pub fn merge(&mut self, o: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += b;
        }
        self.sum_ns += o.sum_ns;
        self.count += o.count;
    }
}

/// I/O counters of one worker, beside its router's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IoStats {
    /// Time from a batch's arrival to the return of its last send.
    pub batch_latency: LatencyHistogram,
    pub recv_calls: u64,
    pub send_calls: u64,
    /// Datagrams that arrived coalesced by GRO (counted per train).
    pub gro_trains: u64,
    /// Sends that used GSO.
    pub gso_sends: u64,
    /// Times the kernel refused GSO and the worker switched to plain sends.
    pub gso_fallbacks: u64,
    pub recv_errors: u64,
    /// The relay's own cookie replies the kernel refused to send.
    pub cookie_send_errors: u64,
    /// DoubleHop sessions with an exit-facing socket: one descriptor each with
    /// `exit_sockets = "per-session"`; with `"shared"`, sessions placed on the shared
    /// sockets counted below.
    pub exit_sockets_open: u64,
    /// Shared exit-facing sockets open (`[relay] exit_sockets = "shared"`): the descriptors
    /// the sessions and flows counted above (and Z-HOP's) use between them.
    pub shared_exit_sockets: u64,
    /// Longest single housekeeping step (table pick-up, expiry, control requests), in ns:
    /// what a table swap costs a worker's loop.
    pub housekeeping_max_ns: u64,
    /// Longest CPU time (the worker thread's own clock, so preemption does not count) of a
    /// housekeeping step that took a new table or swept sessions of removed exits, in ns:
    /// what a table swap itself costs a worker.
    pub swap_step_max_cpu_ns: u64,
    /// CPU time the worker thread has used, in nanoseconds (read when it publishes).
    pub cpu_ns: u64,
    /// io_uring: `io_uring_enter` calls (submit and wait).
    pub ring_enters: u64,
    /// io_uring: multishot receives that ended because every buffer was in use.
    pub ring_starved: u64,
    /// Z-HOP: GSO sends of its trains (several datagrams to one destination in one send).
    pub zhop_trains_sent: u64,
    /// Z-HOP: datagrams those GSO sends carried.
    pub zhop_segments_in_trains: u64,
    /// Z-HOP: datagrams sent on their own because every train buffer was in flight.
    pub zhop_unbatched: u64,
}

impl IoStats {
    pub fn merge(&mut self, o: &IoStats) {
        self.batch_latency.merge(&o.batch_latency);
        self.recv_calls += o.recv_calls;
        self.send_calls += o.send_calls;
        self.gro_trains += o.gro_trains;
        self.gso_sends += o.gso_sends;
        self.gso_fallbacks += o.gso_fallbacks;
        self.recv_errors += o.recv_errors;
        self.cookie_send_errors += o.cookie_send_errors;
        self.exit_sockets_open += o.exit_sockets_open;
        self.shared_exit_sockets += o.shared_exit_sockets;
        self.housekeeping_max_ns = self.housekeeping_max_ns.max(o.housekeeping_max_ns);
        self.swap_step_max_cpu_ns = self.swap_step_max_cpu_ns.max(o.swap_step_max_cpu_ns);
        self.cpu_ns += o.cpu_ns;
        self.ring_enters += o.ring_enters;
        self.ring_starved += o.ring_starved;
        self.zhop_trains_sent += o.zhop_trains_sent;
        self.zhop_segments_in_trains += o.zhop_segments_in_trains;
        self.zhop_unbatched += o.zhop_unbatched;
    }
}

/// `T` aligned, and so padded, to 128 bytes: per-worker state that another thread reads
/// never shares a cache line with another worker's. Graviton 2-4 (Neoverse N1/V1/V2) have
/// 64-byte lines, but some ARM server cores have 128-byte lines, and x86_64's spatial
/// prefetcher pulls lines in 128-byte pairs; 64 would be enough only on the first.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A worker's published report as the worker and the control side share it: in an
/// allocation of its own, padded so that no other worker's report shares its lines.
pub(crate) type SharedReport = Arc<CachePadded<Mutex<WorkerReport>>>;

/// A worker's share of the kernel fast path (its traffic is in the router's counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FastPathReport {
    /// Sessions this worker has offloaded now.
    pub offloaded: usize,
    /// Offloads the kernel maps refused (those sessions stayed in userspace).
    pub errors: u64,
}

/// What a worker last published about itself.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    pub worker: usize,
    pub backend: &'static str,
    pub router: RouterStats,
    /// The router's per-exit counters, vacant entries included (no key).
    pub exits: Vec<ExitStats>,
    pub io: IoStats,
    pub sessions: usize,
    pub pending: usize,
    pub table_generation: u64,
    pub zhop: crate::zhop::ZhopStats,
    /// The kernel fast path as this worker drives it; `None` when it is not attached.
    pub fast_path: Option<FastPathReport>,
    /// The Exit role's counters (zero without a TUN device).
    pub exit: super::ExitStats,
    /// When the worker published this report.
    pub published: Option<std::time::Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_reports_fill_whole_128_byte_blocks() {
        assert_eq!(
            std::mem::align_of::<CachePadded<Mutex<WorkerReport>>>(),
            128
        );
        assert_eq!(
            std::mem::size_of::<CachePadded<Mutex<WorkerReport>>>() % 128,
            0
        );
        let reports: Vec<SharedReport> = (0..4)
            .map(|_| Arc::new(CachePadded(Mutex::new(WorkerReport::default()))))
            .collect();
        for r in &reports {
            assert_eq!(Arc::as_ptr(r) as usize % 128, 0, "{:p}", Arc::as_ptr(r));
        }
    }

    #[test]
    fn histogram_buckets_by_powers_of_two_microseconds() {
        let mut h = LatencyHistogram::default();
        for ns in [1, 999, 1_000, 1_001, 3_000, 40_000_000] {
            h.record(ns);
        }
        assert_eq!(h.buckets[0], 3, "up to 1 µs");
        assert_eq!(h.buckets[1], 1, "up to 2 µs");
        assert_eq!(h.buckets[2], 1, "up to 4 µs");
        assert_eq!(h.buckets[LatencyHistogram::BUCKETS - 1], 1, "overflow");
        assert_eq!(h.count, 6);
    }
}
