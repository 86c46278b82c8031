//! A UDP echo server and a paced prober: the suite's stopwatch for outages.
//!
//! The prober sends a small numbered datagram every `interval` and timestamps each echo, so
//! the longest silence between two echoes is the outage a tunnel suffered (to within one
//! interval), whatever caused it: a roaming client, a restarting relay, a removed exit.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Bytes of every probe datagram: sequence number, then padding.
const PROBE_LEN: usize = 64;

/// Echoes every datagram back to its sender until dropped.
#[derive(Debug)]
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    pub addr: SocketAddr,
}

impl EchoServer {
    /// Serves on `addr` inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<EchoServer> {
        let socket = ns.run_in(move || {
            UdpSocket::bind(addr).with_context(|| format!("binding the echo server on {addr}"))
        })?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("echo".into())
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
                Ok(())
            })?;
        Ok(EchoServer {
            stop,
            thread: Some(thread),
            addr,
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A prober running in the background; [`Probe::finish`] stops it and returns its record.
#[derive(Debug)]
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<ProbeReport>>>,
    started: Instant,
    live: Arc<Live>,
}

/// What the probe thread has seen so far, readable while it runs.
#[derive(Debug, Default)]
struct Live {
    echoes: AtomicU64,
    /// Arrival of the latest echo, nanoseconds since the start.
    last_echo_ns: AtomicU64,
}

/// One echo received.
#[derive(Debug, Clone, Copy)]
pub struct Echo {
    pub seq: u64,
    /// When it arrived, since the probe started.
    pub at: Duration,
    pub rtt: Duration,
}

/// Everything a probe saw.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// When the probe started: its timeline's zero.
    pub started: Instant,
    pub target: SocketAddr,
    pub interval: Duration,
    pub sent: u64,
    pub echoes: Vec<Echo>,
    /// How long the probe ran.
    pub ran: Duration,
}

/// A silence between two echoes (or from the start, or until the end).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outage {
    /// The last echo before the silence (or the probe's start).
    pub from: Duration,
    /// The first echo after it, if one came.
    pub until: Option<Duration>,
}

impl Outage {
    /// Its length; an outage that never ended lasts until `end`.
    pub fn length(&self, end: Duration) -> Duration {
        self.until.unwrap_or(end).saturating_sub(self.from)
    }
}

impl Probe {
    /// Starts probing `target` from inside `ns` every `interval`.
    pub fn start(ns: &Netns, target: SocketAddr, interval: Duration) -> Result<Probe> {
        let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
        let socket = ns.run_in(move || UdpSocket::bind(bind).context("binding the prober"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let live = Arc::new(Live::default());
        let seen = live.clone();
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("probe".into())
            .spawn(move || probe_loop(&socket, target, interval, started, &flag, &seen))?;
        Ok(Probe {
            stop,
            thread: Some(thread),
            started,
            live,
        })
    }

    /// Time since the probe started, to place an event on its timeline.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Echoes received so far.
    pub fn echoes(&self) -> u64 {
        self.live.echoes.load(Ordering::Relaxed)
    }

    /// When the latest echo arrived (on the probe's timeline), if any did.
    pub fn last_echo(&self) -> Option<Duration> {
        (self.echoes() > 0)
            .then(|| Duration::from_nanos(self.live.last_echo_ns.load(Ordering::Relaxed)))
    }

    /// Waits until an echo arrives after `t` (on the probe's timeline) or `timeout` passes;
    /// returns whether one did.
    pub fn wait_for_echo_after(&self, t: Duration, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.last_echo().is_some_and(|e| e > t) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Stops probing and returns what was seen.
    pub fn finish(mut self) -> Result<ProbeReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .context("probe already finished")?
            .join()
            .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn probe_loop(
    socket: &UdpSocket,
    target: SocketAddr,
    interval: Duration,
    started: Instant,
    stop: &AtomicBool,
    live: &Live,
) -> Result<ProbeReport> {
    let mut sent_at: Vec<Duration> = Vec::new();
    let mut echoes = Vec::new();
    let mut next_send = Duration::ZERO;
    let mut buf = [0u8; 2048];
    let mut packet = [0u8; PROBE_LEN];
    while !stop.load(Ordering::Relaxed) {
        let now = started.elapsed();
        if now >= next_send {
            let seq = sent_at.len() as u64;
            packet[..8].copy_from_slice(&seq.to_le_bytes());
            // A failed send (no route while an address changes) is a lost probe.
            let _ = socket.send_to(&packet, target);
            sent_at.push(now);
            next_send += interval;
            // After a stall (the machine was busy) catch up without a burst.
            if next_send < now {
                next_send = now + interval;
            }
            continue;
        }
        let wait = (next_send - now).max(Duration::from_micros(100));
        socket.set_read_timeout(Some(wait))?;
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            if from != target || n != PROBE_LEN {
                continue;
            }
            let at = started.elapsed();
            let seq = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            if let Some(&s) = sent_at.get(seq as usize) {
                echoes.push(Echo {
                    seq,
                    at,
                    rtt: at.saturating_sub(s),
                });
                live.last_echo_ns
                    .store(at.as_nanos() as u64, Ordering::Relaxed);
                live.echoes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(ProbeReport {
        started,
        target,
        interval,
        sent: sent_at.len() as u64,
        echoes,
        ran: started.elapsed(),
    })
}

impl ProbeReport {
    pub fn received(&self) -> u64 {
        self.echoes.len() as u64
    }

    /// Silences longer than `min`, in order. The probe's start counts as an echo, so a tunnel
    /// that takes long to answer at all shows as an outage from zero.
    pub fn outages(&self, min: Duration) -> Vec<Outage> {
        let mut out = Vec::new();
        let mut last = Duration::ZERO;
        for e in &self.echoes {
            if e.at.saturating_sub(last) > min {
                out.push(Outage {
                    from: last,
                    until: Some(e.at),
                });
            }
            last = last.max(e.at);
        }
        if self.ran.saturating_sub(last) > min {
            out.push(Outage {
                from: last,
                until: None,
            });
        }
        out
    }

    /// The longest silence (see [`ProbeReport::outages`]).
    pub fn longest_outage(&self) -> Outage {
        self.outages(Duration::ZERO)
            .into_iter()
            .max_by_key(|o| o.length(self.ran))
            .unwrap_or(Outage {
                from: Duration::ZERO,
                until: Some(Duration::ZERO),
            })
    }

    /// The silence that contains `t` (or the next one to start after it), if longer than
    /// `min`.
    pub fn outage_around(&self, t: Duration, min: Duration) -> Option<Outage> {
        self.outages(min)
            .into_iter()
            .find(|o| o.until.is_none_or(|u| u >= t))
    }

    /// The longest silence within the window `[from, to]` (clipped to the run): the longest
    /// gap between consecutive echoes there, counting the window's edges.
    pub fn longest_silence_within(&self, from: Duration, to: Duration) -> Duration {
        let to = to.min(self.ran);
        let mut last = from;
        let mut longest = Duration::ZERO;
        for e in self.echoes.iter().filter(|e| e.at >= from && e.at <= to) {
            longest = longest.max(e.at - last);
            last = e.at;
        }
        longest.max(to.saturating_sub(last))
    }

    /// The silences within `[from, to]` (clipped to the run) as intervals: the gaps between
    /// consecutive echoes there, counting the window's edges.
    pub fn silences_within(&self, from: Duration, to: Duration) -> Vec<(Duration, Duration)> {
        let to = to.min(self.ran);
        let mut out = Vec::new();
        let mut last = from;
        for e in self.echoes.iter().filter(|e| e.at >= from && e.at <= to) {
            if e.at > last {
                out.push((last, e.at));
            }
            last = e.at;
        }
        if to > last {
            out.push((last, to));
        }
        out
    }

    /// The longest time within `[from, to]` during which this probe heard nothing while
    /// `other` (another probe, running at the same time) heard something: a silence both
    /// share is the machine's (a stalled prober, echo server or scheduler), not this
    /// tunnel's. Silences of `other` shorter than `noise` do not count as shared.
    pub fn longest_silence_alone(
        &self,
        other: &ProbeReport,
        from: Duration,
        to: Duration,
        noise: Duration,
    ) -> Duration {
        // `other`'s time t is this probe's time t + shift.
        let shift = |t: Duration| -> Duration {
            if other.started >= self.started {
                t + (other.started - self.started)
            } else {
                t.saturating_sub(self.started - other.started)
            }
        };
        let shared: Vec<(Duration, Duration)> = other
            .silences_within(Duration::ZERO, other.ran)
            .into_iter()
            .filter(|(a, b)| *b - *a >= noise)
            .map(|(a, b)| (shift(a), shift(b)))
            .collect();
        let mut longest = Duration::ZERO;
        for (a, b) in self.silences_within(from, to) {
            // Walk [a, b], skipping the parts `other` was silent too.
            let mut cursor = a;
            let mut cuts: Vec<&(Duration, Duration)> =
                shared.iter().filter(|(x, y)| *y > a && *x < b).collect();
            cuts.sort();
            for (x, y) in cuts {
                if *x > cursor {
                    longest = longest.max(*x - cursor);
                }
                cursor = cursor.max(*y);
            }
            if b > cursor {
                longest = longest.max(b - cursor);
            }
        }
        longest
    }

    /// The median round trip, if any echo came back.
    pub fn median_rtt(&self) -> Option<Duration> {
        let mut rtts: Vec<Duration> = self.echoes.iter().map(|e| e.rtt).collect();
        rtts.sort();
        rtts.get(rtts.len() / 2).copied()
    }

    /// One line for the test log.
    pub fn summary(&self) -> String {
        let longest = self.longest_outage();
        let over = self.outages(Duration::from_millis(200)).len();
        format!(
            "{} sent, {} echoed, longest silence {:.3} s (from {:.3} s), {over} over 200 ms, \
             median rtt {:.2} ms",
            self.sent,
            self.received(),
            longest.length(self.ran).as_secs_f64(),
            longest.from.as_secs_f64(),
            self.median_rtt()
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(at_ms: &[u64], ran_ms: u64) -> ProbeReport {
        ProbeReport {
            started: Instant::now(),
            target: "127.0.0.1:7".parse().unwrap(),
            interval: Duration::from_millis(10),
            sent: at_ms.len() as u64,
            echoes: at_ms
                .iter()
                .enumerate()
                .map(|(i, &ms)| Echo {
                    seq: i as u64,
                    at: Duration::from_millis(ms),
                    rtt: Duration::from_millis(1),
                })
                .collect(),
            ran: Duration::from_millis(ran_ms),
        }
    }

    /// Echoes every 50 ms from 0 to `end`, but for the given silences.
    fn every_50ms_but(silent: &[(u64, u64)], end: u64) -> Vec<u64> {
        (0..=end / 50)
            .map(|i| i * 50)
            .filter(|t| !silent.iter().any(|(a, b)| t > a && t < b))
            .collect()
    }

    #[test]
    fn silences_shared_with_another_probe_are_not_counted() {
        let mine = report(
            &every_50ms_but(&[(200, 1_500), (1_600, 3_000)], 3_100),
            3_100,
        );
        let mut other = report(
            &every_50ms_but(&[(250, 1_200), (1_300, 2_800)], 3_100),
            3_100,
        );
        other.started = mine.started;
        let (from, to) = (Duration::ZERO, Duration::from_millis(3_100));
        // Alone: 200..250, 1200..1300 and 2800..3000.
        assert_eq!(
            mine.longest_silence_alone(&other, from, to, Duration::from_millis(100)),
            Duration::from_millis(200)
        );
        assert_eq!(
            mine.longest_silence_within(from, to),
            Duration::from_millis(1_400)
        );
    }

    #[test]
    fn outages_include_the_start_and_an_unfinished_end() {
        let r = report(&[300, 310, 320, 1_500, 1_510], 4_000);
        let o = r.outages(Duration::from_millis(100));
        assert_eq!(o.len(), 3);
        assert_eq!(o[0].from, Duration::ZERO);
        assert_eq!(o[1].from, Duration::from_millis(320));
        assert_eq!(o[1].until, Some(Duration::from_millis(1_500)));
        assert_eq!(o[2].until, None);
        assert_eq!(
            r.longest_outage().length(r.ran),
            Duration::from_millis(2_490)
        );
        let around = r
            .outage_around(Duration::from_millis(400), Duration::from_millis(100))
            .unwrap();
        assert_eq!(around.from, Duration::from_millis(320));
        assert_eq!(
            r.longest_silence_within(Duration::from_millis(305), Duration::from_millis(1_000)),
            Duration::from_millis(680)
        );
        assert_eq!(
            r.longest_silence_within(Duration::from_millis(1_400), Duration::from_millis(1_600)),
            Duration::from_millis(100)
        );
    }
}
