//! The load generator and the sink, run as two threads of this process so one `quanta`
//! clock stamps both ends of every packet.
//!
//! The generator first completes a WireGuard-shaped handshake per flow (initiation from
//! the flow's own source address, answered by the sink), because a relay like WraithGate
//! forwards transport only for sessions it saw a handshake for. Then it sends transport
//! messages, unpaced (as fast as `sendmmsg` + GSO allow) or paced to a bit rate.
//!
//! Measurement window: the generator publishes `[start, end)` in raw clock units before
//! it sends its first transport packet. Only packets *stamped* inside the window count, at
//! both ends, so loss is exact however long the queues are; the sink keeps draining after
//! the generator stops.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use quanta::Clock;
use wraithgate_relay::PublicKey;

use crate::cpu;
use crate::histogram::Histogram;
use crate::packets;
use crate::udp::{self, RecvBatch, SendBatch, Train, MAX_GSO_SEGMENTS, MAX_TRAIN_BYTES};

/// Everything one load run needs to know.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where the generator sends (the contender's client-facing address).
    pub relay: SocketAddrV4,
    /// Where the sink listens (the exit's address).
    pub sink: SocketAddrV4,
    /// Source address of each flow; the flow count is its length.
    pub sources: Vec<Ipv4Addr>,
    pub client_port: u16,
    /// The exit key the initiations' mac1 is computed for.
    pub exit_key: PublicKey,
    /// WireGuard message size in bytes (a multiple of 16).
    pub size: usize,
    /// Paced bit rate (message bytes), or unpaced.
    pub rate_bps: Option<u64>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Send with UDP GSO (falls back to plain sends when the kernel refuses).
    pub gso: bool,
    /// Segments per train for each flow's turn when several flows interleave.
    pub train: usize,
    /// Network namespaces (`/var/run/netns/NAME`) of the generator and of the sink.
    pub client_netns: Option<PathBuf>,
    pub exit_netns: Option<PathBuf>,
    /// CPU the generator and sink threads are pinned to.
    pub load_cpu: Option<usize>,
    /// How long the generator waits for handshakes to complete.
    pub handshake_timeout: Duration,
    /// Paced runs send what is due as GSO trains (the shape of the unpaced runs) instead
    /// of separate datagrams; for pacing at a fraction of an unpaced maximum.
    pub paced_trains: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    pub flows: usize,
    pub flows_established: usize,
    /// Packets and bytes stamped inside the window.
    pub sent_packets: u64,
    pub received_packets: u64,
    pub received_bytes: u64,
    pub reordered: u64,
    pub window: Duration,
    /// RFC 3550 jitter, mean over flows, in nanoseconds.
    pub jitter_ns: f64,
    pub latency: Histogram,
    /// On-CPU time of the generator and the sink threads within the window.
    pub load_cpu_ns: u64,
    /// Whether the generator ended up sending with GSO.
    pub gso_used: bool,
}

impl Measurement {
    pub fn gbps(&self) -> f64 {
        self.received_bytes as f64 * 8.0 / self.window.as_secs_f64().max(1e-9) / 1e9
    }
    pub fn mpps(&self) -> f64 {
        self.received_packets as f64 / self.window.as_secs_f64().max(1e-9) / 1e6
    }
    pub fn loss_percent(&self) -> f64 {
        if self.sent_packets == 0 {
            return 100.0;
        }
        self.sent_packets.saturating_sub(self.received_packets) as f64 * 100.0
            / self.sent_packets as f64
    }
}

/// State the three threads (main, generator, sink) share.
#[derive(Debug, Default)]
pub struct Shared {
    /// Raw clock window; 0 until the generator publishes it.
    pub start: AtomicU64,
    pub end: AtomicU64,
    /// Set by the caller to end the run early (Ctrl-C), or by the generator on error.
    pub abort: AtomicBool,
    /// Set once the generator is done; the sink then drains and returns.
    pub generator_done: AtomicBool,
    pub generator_tid: AtomicU32,
    pub sink_tid: AtomicU32,
    pub sink_ready: AtomicBool,
}

/// Enters the network namespace at `path` for the calling thread only.
pub fn enter_netns(path: &PathBuf) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: `f` is an open namespace file; setns only changes this thread's namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn pin(cpu: Option<usize>) {
    if let Some(id) = cpu {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

/// Runs one load: starts the sink, then the generator, samples CPU at the window's edges
/// through `on_window` (called with `true` at the start and `false` at the end), and returns
/// what the sink saw.
pub fn run(
    spec: &LoadSpec,
    clock: &Clock,
    abort: &AtomicBool,
    mut on_window: impl FnMut(bool),
) -> Result<Measurement> {
    let shared = Arc::new(Shared::default());
    let sink = {
        let (spec, clock, shared) = (spec.clone(), clock.clone(), shared.clone());
        std::thread::Builder::new()
            .name("rb-sink".into())
            .spawn(move || sink_thread(&spec, &clock, &shared))?
    };
    while !shared.sink_ready.load(Ordering::Acquire) {
        if sink.is_finished() {
            return match sink.join() {
                Ok(Err(e)) => Err(e.context("sink")),
                _ => bail!("sink thread ended before it was ready"),
            };
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let generator = {
        let (spec, clock, shared) = (spec.clone(), clock.clone(), shared.clone());
        std::thread::Builder::new()
            .name("rb-generator".into())
            .spawn(move || generator_thread(&spec, &clock, &shared))?
    };

    // Follow the window from the main thread to take CPU samples at its edges.
    let pid = std::process::id();
    let load_cpu = |s: &Shared| {
        cpu::task_cpu_ns(pid, Some(s.generator_tid.load(Ordering::Relaxed)))
            + cpu::task_cpu_ns(pid, Some(s.sink_tid.load(Ordering::Relaxed)))
    };
    let mut load_cpu_ns = 0;
    let mut phase = 0;
    loop {
        if abort.load(Ordering::Relaxed) {
            shared.abort.store(true, Ordering::Relaxed);
        }
        if generator.is_finished() {
            break;
        }
        let (start, end) = (
            shared.start.load(Ordering::Acquire),
            shared.end.load(Ordering::Acquire),
        );
        let now = clock.raw();
        if phase == 0 && start != 0 && now >= start {
            on_window(true);
            load_cpu_ns = load_cpu(&shared);
            phase = 1;
        } else if phase == 1 && now >= end {
            on_window(false);
            load_cpu_ns = load_cpu(&shared).saturating_sub(load_cpu_ns);
            phase = 2;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let gen_result = generator.join().expect("generator thread does not panic");
    if phase == 1 {
        on_window(false);
        load_cpu_ns = load_cpu(&shared).saturating_sub(load_cpu_ns);
    }
    let sink_result = sink.join().expect("sink thread does not panic");
    let (sent_packets, gso_used, established) = gen_result?;
    let mut m = sink_result?;
    m.sent_packets = sent_packets;
    m.gso_used = gso_used;
    m.flows = spec.sources.len();
    m.flows_established = established;
    m.window = spec.duration;
    m.load_cpu_ns = load_cpu_ns;
    Ok(m)
}

#[derive(Debug, Clone, Copy, Default)]
struct FlowRx {
    received: u64,
    max_seq: Option<u64>,
    last_transit: Option<i64>,
    jitter: f64,
}

/// The sink's accounting of the transport messages stamped inside the window.
#[derive(Debug)]
struct Tally {
    flows: Vec<FlowRx>,
    m: Measurement,
}

impl Tally {
    fn new(flows: usize) -> Self {
        Tally {
            flows: vec![FlowRx::default(); flows],
            m: Measurement::default(),
        }
    }

    /// Counts one message of `len` bytes from `flow` with sequence number `seq`, received
    /// `transit_ns` after it was stamped. A flow the run does not have is ignored (false).
    fn record(&mut self, flow: u32, seq: u64, transit_ns: u64, len: usize) -> bool {
        let Some(f) = self.flows.get_mut(flow as usize) else {
            return false;
        };
        let m = &mut self.m;
        m.latency.record(transit_ns);
        m.received_packets += 1;
        m.received_bytes += len as u64;
        f.received += 1;
        // Anything not above the flow's highest sequence so far came late (or twice).
        match f.max_seq {
            Some(max) if seq <= max => m.reordered += 1,
            _ => f.max_seq = Some(seq),
        }
        // RFC 3550 §6.4.1: D(i,j) = (Rj − Ri) − (Sj − Si), J += (|D| − J)/16.
        let transit = transit_ns as i64;
        if let Some(last) = f.last_transit {
            let d = (transit - last).unsigned_abs() as f64;
            f.jitter += (d - f.jitter) / 16.0;
        }
        f.last_transit = Some(transit);
        true
    }

    /// The measurement so far; jitter is the mean over the flows with two messages or more
    /// (one message has no interarrival).
    fn finish(self) -> Measurement {
        let mut m = self.m;
        let active: Vec<_> = self.flows.iter().filter(|f| f.received > 1).collect();
        if !active.is_empty() {
            m.jitter_ns = active.iter().map(|f| f.jitter).sum::<f64>() / active.len() as f64;
        }
        m
    }
}

fn sink_thread(spec: &LoadSpec, clock: &Clock, shared: &Shared) -> Result<Measurement> {
    if let Some(ns) = &spec.exit_netns {
        enter_netns(ns)?;
    }
    pin(spec.load_cpu);
    shared.sink_tid.store(cpu::gettid(), Ordering::Relaxed);
    let sock = udp::bind_udp(SocketAddr::V4(spec.sink), false)
        .with_context(|| format!("bind sink {}", spec.sink))?;
    udp::enable_gro(&sock);
    shared.sink_ready.store(true, Ordering::Release);

    let mut rb = RecvBatch::new(64, 65_536);
    let mut tally = Tally::new(spec.sources.len());
    // After the generator stops, keep draining until nothing has arrived for 300 ms.
    let mut last_arrival: Option<u64> = None;
    loop {
        if shared.abort.load(Ordering::Relaxed) {
            break;
        }
        let n = rb.recv(&sock)?;
        let now = clock.raw();
        if n > 0 || last_arrival.is_none() {
            last_arrival = Some(now);
        }
        if shared.generator_done.load(Ordering::Acquire)
            && last_arrival.is_some_and(|t| clock.delta_as_nanos(t, now) > 300_000_000)
        {
            break;
        }
        if n == 0 {
            continue;
        }
        let (start, end) = (
            shared.start.load(Ordering::Acquire),
            shared.end.load(Ordering::Acquire),
        );
        for r in rb.got.clone() {
            for d in rb.datagrams(&r) {
                match d.first() {
                    Some(1) if d.len() == wraithgate_relay::wire::INITIATION_LEN => {
                        let mut idx = [0u8; 4];
                        idx.copy_from_slice(&d[4..8]);
                        let resp = packets::response(u32::from_le_bytes(idx));
                        if let Some(from) = r.from {
                            let _ = sock.send_to(&resp, &SocketAddr::V4(from).into());
                        }
                    }
                    Some(4) => {
                        let Some(p) = packets::read_transport(d) else {
                            continue;
                        };
                        if start == 0 || p.sent_raw < start || p.sent_raw >= end {
                            continue;
                        }
                        let transit = clock.delta_as_nanos(p.sent_raw, now);
                        tally.record(p.flow, p.seq, transit, d.len());
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(tally.finish())
}

/// Per-flow state of the generator.
#[derive(Debug, Clone, Copy)]
struct FlowTx {
    source: Ipv4Addr,
    receiver_index: Option<u32>,
    seq: u64,
}

/// Returns (packets stamped in the window, GSO used, flows established).
fn generator_thread(spec: &LoadSpec, clock: &Clock, shared: &Shared) -> Result<(u64, bool, usize)> {
    let result = generate(spec, clock, shared);
    shared.generator_done.store(true, Ordering::Release);
    if result.is_err() {
        // Let the sink stop quickly; the error is reported by `run`.
        shared.abort.store(true, Ordering::Relaxed);
    }
    result
}

fn generate(spec: &LoadSpec, clock: &Clock, shared: &Shared) -> Result<(u64, bool, usize)> {
    if let Some(ns) = &spec.client_netns {
        enter_netns(ns)?;
    }
    pin(spec.load_cpu);
    shared.generator_tid.store(cpu::gettid(), Ordering::Relaxed);
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack (1 µs instead of
    // 50 µs), so the paced generator wakes close to when packets are due.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000u64, 0u64, 0u64, 0u64) };
    let bind = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, spec.client_port));
    let sock = udp::bind_udp(bind, true).with_context(|| format!("bind generator {bind}"))?;
    let mut flows: Vec<FlowTx> = spec
        .sources
        .iter()
        .map(|&source| FlowTx {
            source,
            receiver_index: None,
            seq: 0,
        })
        .collect();
    let established = handshake(spec, clock, shared, &sock, &mut flows)?;
    if established == 0 {
        bail!(
            "no flow completed its handshake through {} within {:?}",
            spec.relay,
            spec.handshake_timeout
        );
    }
    let live: Vec<usize> = (0..flows.len())
        .filter(|&i| flows[i].receiver_index.is_some())
        .collect();

    let size = spec.size;
    let paced = spec.rate_bps.is_some();
    let single_flow = live.len() == 1;
    let mut gso = spec.gso;
    let max_segs = (MAX_TRAIN_BYTES / size).clamp(1, MAX_GSO_SEGMENTS);
    let segs_for = |gso: bool| -> usize {
        if !gso || (paced && !spec.paced_trains) {
            1
        } else if single_flow {
            max_segs
        } else {
            spec.train.clamp(1, max_segs)
        }
    };
    // Unpaced: a few trains per sendmmsg. Paced: whatever is due, one datagram per message.
    let trains_per_batch = if paced {
        64
    } else if single_flow {
        8
    } else {
        32
    };
    let mut buf = vec![0u8; trains_per_batch * max_segs * size];
    let mut trains: Vec<Train> = Vec::with_capacity(trains_per_batch);
    let mut train_flows: Vec<(usize, usize)> = Vec::with_capacity(trains_per_batch);
    let mut batch = SendBatch::new(trains_per_batch);

    // quanta's raw units are not nanoseconds: scale through the clock's own calibration.
    let raw_per_ns = {
        let r0 = clock.raw();
        1_000_000_000.0 / clock.delta_as_nanos(r0, r0 + 1_000_000_000).max(1) as f64
    };
    let ns_to_raw = |ns: u128| (ns as f64 * raw_per_ns) as u64;
    let begin = clock.raw();
    let start = begin + ns_to_raw(spec.warmup.as_nanos());
    let end = start + ns_to_raw(spec.duration.as_nanos());
    shared.start.store(start, Ordering::Release);
    shared.end.store(end, Ordering::Release);

    let mut next_flow = 0usize;
    let mut in_window = 0u64;
    let mut sent_bytes_total = 0u64;
    loop {
        if shared.abort.load(Ordering::Relaxed) {
            break;
        }
        let now = clock.raw();
        if now >= end {
            break;
        }
        let segs = segs_for(gso);
        let mut budget = usize::MAX;
        if let Some(bps) = spec.rate_bps {
            let elapsed_ns = clock.delta_as_nanos(begin, now);
            let allowed = (elapsed_ns as u128 * bps as u128 / 8 / 1_000_000_000) as u64;
            let due = allowed.saturating_sub(sent_bytes_total) / size as u64;
            if due == 0 {
                // Sleep (never spin) until the next packet is due, so the generator's CPU
                // time stays small next to the contender's; whatever became due while
                // asleep goes out as one batch of separate datagrams.
                let wait_ns = (size as u64 * 8 * 1_000_000_000 / bps).max(1_000);
                std::thread::sleep(Duration::from_nanos(wait_ns));
                continue;
            }
            budget = due as usize;
        }
        trains.clear();
        train_flows.clear();
        let stamp = clock.raw();
        let mut offset = 0;
        while trains.len() < trains_per_batch && budget > 0 {
            let i = live[next_flow];
            next_flow = (next_flow + 1) % live.len();
            let n = segs.min(budget);
            budget -= n;
            let f = &mut flows[i];
            let index = f.receiver_index.expect("live flows are established");
            for k in 0..n {
                let at = offset + k * size;
                packets::write_transport(&mut buf[at..at + size], index, f.seq, i as u32, stamp);
                f.seq += 1;
            }
            trains.push(Train {
                offset,
                len: n * size,
                segment: size,
                source: Some(f.source),
                destination: spec.relay,
            });
            train_flows.push((i, n));
            offset += n * size;
        }
        match batch.send(&sock, &buf, &trains) {
            Ok(sent) => {
                // Unsent trains are a suffix; give their sequence numbers back, newest first.
                for &(i, n) in train_flows[sent..].iter().rev() {
                    flows[i].seq -= n as u64;
                }
                let pkts: u64 = train_flows[..sent].iter().map(|&(_, n)| n as u64).sum();
                sent_bytes_total += pkts * size as u64;
                if stamp >= start && stamp < end {
                    in_window += pkts;
                }
                if sent < trains.len() {
                    std::thread::yield_now();
                }
            }
            Err(e) => {
                for &(i, n) in train_flows.iter().rev() {
                    flows[i].seq -= n as u64;
                }
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::ECONNREFUSED) => {
                        std::thread::yield_now();
                    }
                    Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EMSGSIZE) if gso => {
                        gso = false;
                    }
                    _ => return Err(e).context("sendmmsg"),
                }
            }
        }
    }
    Ok((in_window, gso && spec.gso, live.len()))
}

/// Sends each flow's initiation (again, every second) until every flow has its response or
/// the timeout passes. Returns the number of flows established.
fn handshake(
    spec: &LoadSpec,
    clock: &Clock,
    shared: &Shared,
    sock: &socket2::Socket,
    flows: &mut [FlowTx],
) -> Result<usize> {
    let mac1 = spec.exit_key.mac1_key();
    let begin = clock.now();
    let mut last_round: Option<quanta::Instant> = None;
    let mut rb = RecvBatch::new(64, 2048);
    let mut batch = SendBatch::new(64);
    let mut established = 0;
    while established < flows.len() {
        if shared.abort.load(Ordering::Relaxed) || begin.elapsed() > spec.handshake_timeout {
            break;
        }
        if last_round.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
            last_round = Some(clock.now());
            let pending: Vec<usize> = (0..flows.len())
                .filter(|&i| flows[i].receiver_index.is_none())
                .collect();
            for chunk in pending.chunks(64) {
                let mut buf = Vec::with_capacity(chunk.len() * 148);
                let mut trains = Vec::with_capacity(chunk.len());
                for &i in chunk {
                    trains.push(Train {
                        offset: buf.len(),
                        len: 148,
                        segment: 148,
                        source: Some(flows[i].source),
                        destination: spec.relay,
                    });
                    buf.extend_from_slice(&packets::initiation(i as u32, &mac1));
                }
                let mut done = 0;
                while done < trains.len() {
                    match batch.send(sock, &buf, &trains[done..]) {
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(1))
                        }
                        Err(e) => return Err(e).context("send initiations"),
                    }
                }
                // Spread a burst of initiations a little; relays rate-limit handshakes.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if rb.recv(sock)? == 0 {
            continue;
        }
        for r in rb.got.clone() {
            for d in rb.datagrams(&r) {
                if d.len() != wraithgate_relay::wire::RESPONSE_LEN || d[0] != 2 {
                    continue;
                }
                let idx = |at: usize| {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(&d[at..at + 4]);
                    u32::from_le_bytes(b)
                };
                let Some(flow) = packets::flow_of_index(idx(8)) else {
                    continue;
                };
                if let Some(f) = flows.get_mut(flow as usize) {
                    if f.receiver_index.is_none() {
                        f.receiver_index = Some(idx(4));
                        established += 1;
                    }
                }
            }
        }
    }
    Ok(established)
}

/// A single-threaded client + exit pair for criterion: establishes the flows through a
/// relay, then pushes bursts through it and counts what comes out.
#[derive(Debug)]
pub struct Burst {
    client: socket2::Socket,
    sink: socket2::Socket,
    relay: SocketAddrV4,
    flows: Vec<(Ipv4Addr, u32)>,
    size: usize,
    seq: u64,
    next_flow: usize,
    send: SendBatch,
    recv: RecvBatch,
    buf: Vec<u8>,
}

impl Burst {
    /// Binds the client (wildcard, `client_port`) and the sink, and completes a handshake
    /// for each source through `relay`.
    pub fn establish(
        relay: SocketAddrV4,
        sink: SocketAddrV4,
        sources: &[Ipv4Addr],
        client_port: u16,
        exit_key: &PublicKey,
        size: usize,
    ) -> Result<Self> {
        let client = udp::bind_udp(
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, client_port)),
            true,
        )?;
        let sink_sock = udp::bind_udp(SocketAddr::V4(sink), false)?;
        for s in [&client, &sink_sock] {
            s.set_read_timeout(Some(Duration::from_millis(5)))?;
        }
        let mac1 = exit_key.mac1_key();
        let mut flows: Vec<Option<u32>> = vec![None; sources.len()];
        let mut send = SendBatch::new(64);
        let mut recv = RecvBatch::new(64, 2048);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut last_round: Option<std::time::Instant> = None;
        while flows.iter().any(Option::is_none) {
            if std::time::Instant::now() > deadline {
                bail!(
                    "{} of {} flows did not complete a handshake through {relay}",
                    flows.iter().filter(|f| f.is_none()).count(),
                    flows.len()
                );
            }
            if last_round.is_none_or(|t| t.elapsed() > Duration::from_millis(500)) {
                last_round = Some(std::time::Instant::now());
                let pending: Vec<usize> =
                    (0..flows.len()).filter(|&i| flows[i].is_none()).collect();
                for chunk in pending.chunks(64) {
                    let mut buf = Vec::new();
                    let trains: Vec<Train> = chunk
                        .iter()
                        .map(|&i| {
                            let offset = buf.len();
                            buf.extend_from_slice(&packets::initiation(i as u32, &mac1));
                            Train {
                                offset,
                                len: 148,
                                segment: 148,
                                source: Some(sources[i]),
                                destination: relay,
                            }
                        })
                        .collect();
                    let _ = send.send(&client, &buf, &trains)?;
                }
            }
            // Answer what reached the sink, then collect the answers at the client.
            for _ in 0..20 {
                if recv.recv(&sink_sock)? == 0 {
                    break;
                }
                for r in recv.got.clone() {
                    let d = &recv.buf[r.offset..r.offset + r.len];
                    if d.len() == 148 && d[0] == 1 {
                        let mut idx = [0u8; 4];
                        idx.copy_from_slice(&d[4..8]);
                        if let Some(from) = r.from {
                            let resp = packets::response(u32::from_le_bytes(idx));
                            sink_sock.send_to(&resp, &SocketAddr::V4(from).into())?;
                        }
                    }
                }
            }
            for _ in 0..20 {
                if recv.recv(&client)? == 0 {
                    break;
                }
                for r in recv.got.clone() {
                    let d = &recv.buf[r.offset..r.offset + r.len];
                    if d.len() == 92 && d[0] == 2 {
                        let mut b = [0u8; 4];
                        b.copy_from_slice(&d[8..12]);
                        if let Some(flow) = packets::flow_of_index(u32::from_le_bytes(b)) {
                            let mut e = [0u8; 4];
                            e.copy_from_slice(&d[4..8]);
                            if let Some(f) = flows.get_mut(flow as usize) {
                                *f = Some(u32::from_le_bytes(e));
                            }
                        }
                    }
                }
            }
        }
        udp::enable_gro(&sink_sock);
        Ok(Burst {
            client,
            sink: sink_sock,
            relay,
            flows: sources
                .iter()
                .zip(flows)
                .map(|(&s, f)| (s, f.expect("every flow established above")))
                .collect(),
            size,
            seq: 0,
            next_flow: 0,
            send: SendBatch::new(64),
            recv: RecvBatch::new(64, 65_536),
            buf: vec![0u8; 64 * size],
        })
    }

    /// Sends `packets` transport messages (round-robin over the flows, one datagram per
    /// message) and waits until they came out at the sink or nothing arrived for
    /// `quiet`. Returns how many arrived.
    pub fn round(&mut self, packets: usize, quiet: Duration) -> Result<usize> {
        let mut sent = 0;
        let mut received = 0;
        while sent < packets {
            let n = (packets - sent).min(64);
            let mut trains = Vec::with_capacity(n);
            for k in 0..n {
                let (source, index) = self.flows[self.next_flow];
                let flow = self.next_flow as u32;
                self.next_flow = (self.next_flow + 1) % self.flows.len();
                let at = k * self.size;
                packets::write_transport(
                    &mut self.buf[at..at + self.size],
                    index,
                    self.seq,
                    flow,
                    0,
                );
                self.seq += 1;
                trains.push(Train {
                    offset: at,
                    len: self.size,
                    segment: self.size,
                    source: Some(source),
                    destination: self.relay,
                });
            }
            let mut done = 0;
            while done < n {
                match self.send.send(&self.client, &self.buf, &trains[done..]) {
                    Ok(k) => done += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        received += self.drain_once(false)?;
                    }
                    Err(e) => return Err(e).context("sendmmsg"),
                }
            }
            sent += n;
            // Take what has arrived meanwhile so the sink queue never overflows.
            received += self.drain_once(false)?;
        }
        self.sink.set_read_timeout(Some(quiet))?;
        while received < packets {
            let got = self.drain_once(true)?;
            if got == 0 {
                break;
            }
            received += got;
        }
        Ok(received)
    }

    fn drain_once(&mut self, wait: bool) -> Result<usize> {
        let n = if wait {
            self.recv.recv(&self.sink)?
        } else {
            self.recv.try_recv(&self.sink)?
        };
        if n == 0 {
            return Ok(0);
        }
        Ok(self
            .recv
            .got
            .iter()
            .map(|r| r.len.div_ceil(r.segment.max(1)))
            .sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 1424;

    #[test]
    fn in_order_steady_flow_has_no_reordering_no_jitter_and_its_loss_from_the_sender() {
        let mut t = Tally::new(1);
        for seq in 0..90 {
            assert!(t.record(0, seq, 50_000, LEN));
        }
        let mut m = t.finish();
        assert_eq!(m.received_packets, 90);
        assert_eq!(m.received_bytes, 90 * LEN as u64);
        assert_eq!(m.reordered, 0);
        assert_eq!(m.jitter_ns, 0.0);
        assert_eq!(m.latency.count(), 90);
        // 10 of the 100 stamped never arrived.
        m.sent_packets = 100;
        assert!(
            (m.loss_percent() - 10.0).abs() < 1e-9,
            "{}",
            m.loss_percent()
        );
        m.sent_packets = 0;
        assert_eq!(m.loss_percent(), 100.0, "nothing sent reads as total loss");
    }

    #[test]
    fn late_and_duplicate_messages_count_as_reordered_per_flow() {
        let mut t = Tally::new(2);
        // Flow 0: 2 arrives after 3, and 4 twice.
        for seq in [0, 1, 3, 2, 4, 4, 5] {
            t.record(0, seq, 1_000, LEN);
        }
        // Flow 1 starts at 0 after flow 0 reached 5: a flow of its own, not late.
        for seq in [0, 1, 2] {
            t.record(1, seq, 1_000, LEN);
        }
        let m = t.finish();
        assert_eq!(m.reordered, 2);
        assert_eq!(m.received_packets, 10);
    }

    #[test]
    fn jitter_follows_rfc_3550() {
        // Transit times alternating 100 and 300 µs: |D| = 200 µs at every arrival after
        // the first, so J_n = 200 µs × (1 − (15/16)^n).
        let mut t = Tally::new(1);
        let n = 40;
        for i in 0..=n {
            let transit = if i % 2 == 0 { 100_000 } else { 300_000 };
            t.record(0, i, transit, LEN);
        }
        let m = t.finish();
        let want = 200_000.0 * (1.0 - (15.0f64 / 16.0).powi(n as i32));
        assert!(
            (m.jitter_ns - want).abs() < 1e-6,
            "{} vs {want}",
            m.jitter_ns
        );
        // A constant delay added to every transit changes nothing.
        let mut shifted = Tally::new(1);
        for i in 0..=n {
            let transit = if i % 2 == 0 { 5_100_000 } else { 5_300_000 };
            shifted.record(0, i, transit, LEN);
        }
        assert!((shifted.finish().jitter_ns - want).abs() < 1e-6);
    }

    #[test]
    fn jitter_is_the_mean_over_flows_with_an_interarrival() {
        let mut t = Tally::new(3);
        // Flow 0: one step of |D| = 160 µs -> J = 10 µs. Flow 1: steady -> 0. Flow 2: a
        // single message, no interarrival: left out of the mean.
        t.record(0, 0, 100_000, LEN);
        t.record(0, 1, 260_000, LEN);
        t.record(1, 0, 100_000, LEN);
        t.record(1, 1, 100_000, LEN);
        t.record(2, 0, 900_000, LEN);
        assert_eq!(t.finish().jitter_ns, 5_000.0);
    }

    #[test]
    fn a_flow_the_run_does_not_have_is_ignored() {
        let mut t = Tally::new(1);
        assert!(!t.record(1, 0, 1_000, LEN));
        assert!(!t.record(u32::MAX, 0, 1_000, LEN));
        let m = t.finish();
        assert_eq!(m.received_packets, 0);
        assert_eq!(m.jitter_ns, 0.0);
    }
}
