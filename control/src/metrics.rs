//! `/metrics` in the Prometheus text format (version 0.0.4).
//!
//! Workers keep plain per-worker counters and publish a copy every 50 ms; a scrape sums
//! nothing on the packet path, it only reads those copies.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use wraithgate_relay::io::{LatencyHistogram, WorkerReport};
use wraithgate_relay::{DropReason, ExitStats};

use crate::change::Control;

/// The whole exposition.
pub fn render(c: &Control) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let reports = c.dp.reports();
    let backend = c.dp.backend();
    // Family by family, so that each HELP/TYPE header precedes its samples.
    let mut w = Writer { out: &mut out };
    w.header(
        "wraithgate_info",
        "gauge",
        "Constant 1, labelled with the backend in use.",
    );
    w.sample(
        "wraithgate_info",
        &[("backend", backend), ("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    w.header(
        "wraithgate_fastpath_attached",
        "gauge",
        "1 when the kernel fast path is attached ([relay] fast_path = \"auto\" and the kernel allowed it).",
    );
    w.sample(
        "wraithgate_fastpath_attached",
        &[],
        u64::from(c.dp.fast_path_interfaces().is_some()),
    );
    w.header("wraithgate_workers", "gauge", "Data-plane worker threads.");
    w.sample("wraithgate_workers", &[], reports.len() as u64);

    let per_worker: [(&str, &str, ReportField); 44] = [
        (
            "wraithgate_packets_to_exit_total",
            "Packets forwarded from clients to exits.",
            |r| r.router.client_to_exit.packets,
        ),
        (
            "wraithgate_bytes_to_exit_total",
            "Bytes forwarded from clients to exits.",
            |r| r.router.client_to_exit.bytes,
        ),
        (
            "wraithgate_packets_to_client_total",
            "Packets forwarded from exits to clients.",
            |r| r.router.exit_to_client.packets,
        ),
        (
            "wraithgate_bytes_to_client_total",
            "Bytes forwarded from exits to clients.",
            |r| r.router.exit_to_client.bytes,
        ),
        (
            "wraithgate_client_handshakes_total",
            "Handshake initiations forwarded from clients.",
            |r| r.router.client_handshakes,
        ),
        (
            "wraithgate_exit_handshakes_total",
            "Handshake initiations forwarded from exits.",
            |r| r.router.exit_handshakes,
        ),
        (
            "wraithgate_cookie_replies_total",
            "Cookie replies forwarded between clients and exits (the relay's own challenges are counted as drops, reason cookie_challenge).",
            |r| r.router.cookie_replies,
        ),
        (
            "wraithgate_cookie_send_errors_total",
            "The relay's own cookie replies the kernel refused to send.",
            |r| r.io.cookie_send_errors,
        ),
        (
            "wraithgate_sessions_opened_total",
            "Sessions opened.",
            |r| r.router.sessions_opened,
        ),
        (
            "wraithgate_table_swaps_total",
            "Exit tables taken up by the worker.",
            |r| r.router.table_swaps,
        ),
        (
            "wraithgate_gso_fallbacks_total",
            "Times the kernel refused UDP GSO and the worker fell back.",
            |r| r.io.gso_fallbacks,
        ),
        (
            "wraithgate_ring_enters_total",
            "io_uring backend: io_uring_enter calls (each submits a batch and reaps).",
            |r| r.io.ring_enters,
        ),
        (
            "wraithgate_ring_starved_total",
            "io_uring backend: multishot receives ended because every buffer was in use.",
            |r| r.io.ring_starved,
        ),
        (
            "wraithgate_zhop_outer_handshakes_total",
            "Z-HOP: outer handshakes answered.",
            |r| r.zhop.outer_handshakes,
        ),
        (
            "wraithgate_zhop_cookie_replies_total",
            "Z-HOP: cookie replies sent to initiations under handshake load.",
            |r| r.zhop.cookie_replies,
        ),
        (
            "wraithgate_zhop_cookie_proven_total",
            "Z-HOP: initiations decrypted under load because their mac2 carried our cookie.",
            |r| r.zhop.cookie_proven,
        ),
        (
            "wraithgate_zhop_packets_to_exit_total",
            "Z-HOP: inner packets forwarded from peers to their exits.",
            |r| r.zhop.inner_to_exit.packets,
        ),
        (
            "wraithgate_zhop_bytes_to_exit_total",
            "Z-HOP: inner payload bytes forwarded from peers to their exits.",
            |r| r.zhop.inner_to_exit.bytes,
        ),
        (
            "wraithgate_zhop_packets_to_peer_total",
            "Z-HOP: exits' packets wrapped and sent to peers.",
            |r| r.zhop.exit_to_inner.packets,
        ),
        (
            "wraithgate_zhop_bytes_to_peer_total",
            "Z-HOP: exits' payload bytes wrapped and sent to peers.",
            |r| r.zhop.exit_to_inner.bytes,
        ),
        (
            "wraithgate_zhop_trains_sent_total",
            "Z-HOP: GSO sends of several datagrams to one destination (a train).",
            |r| r.io.zhop_trains_sent,
        ),
        (
            "wraithgate_zhop_segments_in_trains_total",
            "Z-HOP: datagrams carried by those GSO sends.",
            |r| r.io.zhop_segments_in_trains,
        ),
        (
            "wraithgate_zhop_unbatched_total",
            "Z-HOP: datagrams sent on their own because every train buffer was in flight.",
            |r| r.io.zhop_unbatched,
        ),
        (
            "wraithgate_zhop_peers",
            "Provisioned peers with a tunnel ending on the worker: Z-HOP and Exit alike (one state machine terminates both).",
            |r| r.zhop.peers,
        ),
        (
            "wraithgate_zhop_flows",
            "Z-HOP: inner flows (exit-facing sockets) on the worker.",
            |r| r.zhop.flows,
        ),
        (
            "wraithgate_fastpath_packets_to_exit_total",
            "Packets the kernel fast path forwarded from clients to exits for the worker's sessions (not in wraithgate_packets_to_exit_total, which is the worker's own).",
            |r| r.router.fast_client_to_exit.packets,
        ),
        (
            "wraithgate_fastpath_bytes_to_exit_total",
            "Bytes the kernel fast path forwarded from clients to exits (not in wraithgate_bytes_to_exit_total).",
            |r| r.router.fast_client_to_exit.bytes,
        ),
        (
            "wraithgate_fastpath_packets_to_client_total",
            "Packets the kernel fast path forwarded from exits to clients (not in wraithgate_packets_to_client_total).",
            |r| r.router.fast_exit_to_client.packets,
        ),
        (
            "wraithgate_fastpath_bytes_to_client_total",
            "Bytes the kernel fast path forwarded from exits to clients (not in wraithgate_bytes_to_client_total).",
            |r| r.router.fast_exit_to_client.bytes,
        ),
        (
            "wraithgate_fastpath_sessions",
            "Sessions the kernel fast path forwards now.",
            |r| r.fast_path.map_or(0, |f| f.offloaded as u64),
        ),
        (
            "wraithgate_fastpath_offload_errors_total",
            "Offloads the kernel maps refused (those sessions stayed in userspace).",
            |r| r.fast_path.map_or(0, |f| f.errors),
        ),
        (
            "wraithgate_exit_tun_packets_read_total",
            "Exit: packets read from the TUN device (towards peers).",
            |r| r.exit.tun_rx.packets,
        ),
        (
            "wraithgate_exit_tun_bytes_read_total",
            "Exit: bytes read from the TUN device (towards peers).",
            |r| r.exit.tun_rx.bytes,
        ),
        (
            "wraithgate_exit_tun_packets_written_total",
            "Exit: decrypted packets written to the TUN device (from peers).",
            |r| r.exit.tun_tx.packets,
        ),
        (
            "wraithgate_exit_tun_bytes_written_total",
            "Exit: decrypted bytes written to the TUN device (from peers).",
            |r| r.exit.tun_tx.bytes,
        ),
        (
            "wraithgate_exit_tun_reads_total",
            "Exit: read(2)s from the TUN device; with offloads, packets read per read is the segments per super-packet.",
            |r| r.exit.tun_reads,
        ),
        (
            "wraithgate_exit_tun_super_reads_total",
            "Exit: TUN reads that were super-packets (TSO/USO), split into MTU-sized packets.",
            |r| r.exit.tun_super_reads,
        ),
        (
            "wraithgate_exit_tun_writes_total",
            "Exit: write(2)s to the TUN device; with offloads, packets written per write is the segments per super-packet.",
            |r| r.exit.tun_writes,
        ),
        (
            "wraithgate_exit_tun_super_writes_total",
            "Exit: TUN writes that were super-packets (decrypted TCP segments coalesced).",
            |r| r.exit.tun_super_writes,
        ),
        (
            "wraithgate_exit_handed_off_total",
            "Exit: TUN packets handed to the worker holding their peer's tunnel.",
            |r| r.exit.handed_off,
        ),
        (
            "wraithgate_exit_handed_in_total",
            "Exit: TUN packets other workers handed to this one.",
            |r| r.exit.handed_in,
        ),
        (
            "wraithgate_sessions",
            "Sessions held (pending included).",
            |r| r.sessions as u64,
        ),
        (
            "wraithgate_sessions_pending",
            "Sessions waiting for the exit's first answer.",
            |r| r.pending as u64,
        ),
        (
            "wraithgate_exit_shared_sockets",
            "Shared exit-facing sockets open ([relay] exit_sockets = \"shared\"): the descriptors the worker's sessions and flows use between them.",
            |r| r.io.shared_exit_sockets,
        ),
    ];
    for (name, help, get) in per_worker {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        w.header(name, kind, help);
        for r in &reports {
            w.sample(name, &[("worker", &r.worker.to_string())], get(r));
        }
    }

    w.header(
        "wraithgate_sessions_closed_total",
        "counter",
        "Sessions closed, by cause.",
    );
    for r in &reports {
        let worker = r.worker.to_string();
        for (cause, v) in [
            ("pending_expired", r.router.sessions_expired_pending),
            ("idle", r.router.sessions_expired_idle),
            ("exit_removed", r.router.sessions_closed_by_table),
            ("operator", r.router.sessions_closed_by_request),
        ] {
            w.sample(
                "wraithgate_sessions_closed_total",
                &[("worker", &worker), ("cause", cause)],
                v,
            );
        }
    }

    w.header(
        "wraithgate_drops_total",
        "counter",
        "Packets refused, by reason.",
    );
    for r in &reports {
        let worker = r.worker.to_string();
        for reason in DropReason::ALL {
            w.sample(
                "wraithgate_drops_total",
                &[("worker", &worker), ("reason", reason.as_str())],
                r.router.dropped(reason),
            );
        }
    }

    per_exit(&mut w, c, &reports);

    let name = "wraithgate_batch_latency_seconds";
    w.header(
        name,
        "histogram",
        "Time from a receive batch's arrival to the return of its last send.",
    );
    for r in &reports {
        w.histogram(name, &r.worker.to_string(), &r.io.batch_latency);
    }

    w.header(
        "wraithgate_table_generation",
        "gauge",
        "Generation of the desired state in force.",
    );
    w.sample("wraithgate_table_generation", &[], c.state().generation);
    w.header("wraithgate_exits", "gauge", "Configured exits.");
    w.sample("wraithgate_exits", &[], c.dp.table().len() as u64);
    w.header(
        "wraithgate_config_changes_total",
        "counter",
        "API changes applied.",
    );
    w.sample(
        "wraithgate_config_changes_total",
        &[],
        c.changes.load(Ordering::Relaxed),
    );
    w.header(
        "wraithgate_config_refused_total",
        "counter",
        "API changes refused.",
    );
    w.sample(
        "wraithgate_config_refused_total",
        &[],
        c.refused.load(Ordering::Relaxed),
    );
    w.header(
        "wraithgate_api_handler_panics_total",
        "counter",
        "Operator API requests whose handler panicked (each answered 500).",
    );
    w.sample(
        "wraithgate_api_handler_panics_total",
        &[],
        c.api_panics.load(Ordering::Relaxed),
    );
    w.header(
        "wraithgate_api_restarts_total",
        "counter",
        "Times the operator API's thread died and the node started it again.",
    );
    w.sample(
        "wraithgate_api_restarts_total",
        &[],
        c.api_restarts.load(Ordering::Relaxed),
    );
    w.header(
        "wraithgate_pinned_ports_unbound",
        "gauge",
        "Listen addresses an exit's pinned port needs that no socket is bound to (the port \
         was taken); the node tries them again, 1 s to 60 s apart.",
    );
    w.sample(
        "wraithgate_pinned_ports_unbound",
        &[],
        c.dp.unbound_pinned().len() as u64,
    );
    w.header(
        "wraithgate_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
    );
    w.sample(
        "wraithgate_uptime_seconds",
        &[],
        c.started.elapsed().as_secs(),
    );
    w.header(
        "wraithgate_build_info",
        "gauge",
        "Constant 1, labelled with the version and the commit built (WRAITHGATE_COMMIT at build time, else \"unknown\").",
    );
    w.sample(
        "wraithgate_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            (
                "commit",
                option_env!("WRAITHGATE_COMMIT").unwrap_or("unknown"),
            ),
        ],
        1,
    );
    process(&mut w, c);
    out
}

/// The DoubleHop counters of each exit in the table, summed over the workers and labelled
/// with the exit's name (operator-chosen, so the series are as many as the exits).
fn per_exit(w: &mut Writer<'_>, c: &Control, reports: &[WorkerReport]) {
    let table = c.dp.table();
    let sums = exit_totals(&table, reports);
    let exits: Vec<(&str, &ExitStats)> = table
        .iter()
        .map(|(id, exit)| (exit.spec.name.as_str(), &sums[id.0 as usize]))
        .collect();
    let families: [(&str, &str, ExitField); 6] = [
        (
            "wraithgate_per_exit_packets_to_exit_total",
            "DoubleHop: packets forwarded from clients to this exit.",
            |e| e.client_to_exit.packets,
        ),
        (
            "wraithgate_per_exit_bytes_to_exit_total",
            "DoubleHop: bytes forwarded from clients to this exit.",
            |e| e.client_to_exit.bytes,
        ),
        (
            "wraithgate_per_exit_packets_to_client_total",
            "DoubleHop: packets forwarded from this exit to clients.",
            |e| e.exit_to_client.packets,
        ),
        (
            "wraithgate_per_exit_bytes_to_client_total",
            "DoubleHop: bytes forwarded from this exit to clients.",
            |e| e.exit_to_client.bytes,
        ),
        (
            "wraithgate_per_exit_sessions",
            "DoubleHop: sessions with this exit (pending included).",
            |e| e.sessions,
        ),
        (
            "wraithgate_per_exit_sessions_opened_total",
            "DoubleHop: sessions opened with this exit.",
            |e| e.sessions_opened,
        ),
    ];
    for (name, help, get) in families {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        w.header(name, kind, help);
        for (exit, e) in &exits {
            w.sample(name, &[("exit", exit)], get(e));
        }
    }
    let name = "wraithgate_per_exit_handshakes_total";
    w.header(
        name,
        "counter",
        "DoubleHop: handshake initiations forwarded for this exit, by who initiated.",
    );
    for (exit, e) in &exits {
        w.sample(
            name,
            &[("exit", exit), ("initiator", "client")],
            e.client_handshakes,
        );
        w.sample(
            name,
            &[("exit", exit), ("initiator", "exit")],
            e.exit_handshakes,
        );
    }
    let name = "wraithgate_per_exit_drops_total";
    w.header(
        name,
        "counter",
        "DoubleHop: packets refused once their exit was known, by reason (the rest count only in wraithgate_drops_total).",
    );
    for (exit, e) in &exits {
        for reason in ExitStats::REASONS {
            w.sample(
                name,
                &[("exit", exit), ("reason", reason.as_str())],
                e.dropped(reason),
            );
        }
    }
}

/// Each exit's counters of `table`, summed over the workers' reports, by [`ExitId`]
/// (`ExitId(i)` at `i`). Counters of exits no longer in the table are left out.
///
/// [`ExitId`]: wraithgate_relay::table::ExitId
pub fn exit_totals(
    table: &wraithgate_relay::ExitTable,
    reports: &[WorkerReport],
) -> Vec<ExitStats> {
    let mut sums: Vec<ExitStats> = vec![ExitStats::default(); table.len()];
    for e in reports.iter().flat_map(|r| &r.exits) {
        if let Some(id) = e.key.and_then(|k| table.by_key(&k)) {
            sums[id.0 as usize].merge(e);
        }
    }
    sums
}

/// The `process_*` families Prometheus' client libraries export, from `/proc/self`. Open
/// descriptors against their limit matter most here: every session holds a socket.
fn process(w: &mut Writer<'_>, c: &Control) {
    let start = c.started_unix;
    w.header(
        "process_start_time_seconds",
        "gauge",
        "Start time of the node since the Unix epoch, seconds.",
    );
    w.sample("process_start_time_seconds", &[], start);
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        w.header("process_open_fds", "gauge", "Open file descriptors.");
        w.sample("process_open_fds", &[], fds.count() as u64);
    }
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    // "Max open files            1048576              1048576              files"
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(max) = soft {
        w.header(
            "process_max_fds",
            "gauge",
            "The open-files limit (soft), descriptors.",
        );
        w.sample("process_max_fds", &[], max);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(kib) = rss_kib {
        w.header(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory, bytes.",
        );
        w.sample("process_resident_memory_bytes", &[], kib * 1024);
    }
}

/// Reads one figure out of a worker's report.
type ReportField = fn(&WorkerReport) -> u64;

/// Reads one figure out of an exit's counters.
type ExitField = fn(&ExitStats) -> u64;

struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        self.out.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.out, " {v}");
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = write!(self.out, "{k}=\"{v}\"");
        }
        self.out.push('}');
    }

    fn histogram(&mut self, name: &str, worker: &str, h: &LatencyHistogram) {
        let mut cumulative = 0;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            if i + 1 == LatencyHistogram::BUCKETS {
                break;
            }
            let le = format!("{}", LatencyHistogram::bound_ns(i) as f64 / 1e9);
            let bucket = format!("{name}_bucket");
            self.sample(&bucket, &[("worker", worker), ("le", &le)], cumulative);
        }
        let bucket = format!("{name}_bucket");
        self.sample(&bucket, &[("worker", worker), ("le", "+Inf")], h.count);
        let _ = writeln!(
            self.out,
            "{name}_sum{{worker=\"{worker}\"}} {}",
            h.sum_ns as f64 / 1e9
        );
        let _ = writeln!(self.out, "{name}_count{{worker=\"{worker}\"}} {}", h.count);
    }
}
