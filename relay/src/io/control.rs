//! The control side's questions to the workers: their reports, their sessions, closing one.
//! Answered between batches; a worker that does not answer in time is left out.

use std::sync::mpsc;
use std::time::Duration;

use super::{DataPlane, WorkerReport, WorkerRequest};
use crate::router::{RouterStats, SessionInfo, SessionSnapshot};
use crate::slab::SessionSlot;

impl DataPlane {
    /// Each worker's last report (published every few tens of milliseconds).
    pub fn reports(&self) -> Vec<WorkerReport> {
        self.workers
            .iter()
            .map(|w| w.report.lock().map(|r| r.clone()).unwrap_or_default())
            .collect()
    }

    /// Reports published after `since` (every worker publishes within 100 ms while it
    /// runs); waits up to `timeout`, then returns what there is.
    pub fn reports_after(&self, since: std::time::Instant, timeout: Duration) -> Vec<WorkerReport> {
        let end = std::time::Instant::now() + timeout;
        loop {
            let r = self.reports();
            if r.iter().all(|w| w.published.is_some_and(|p| p >= since))
                || std::time::Instant::now() >= end
            {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Router counters summed over workers.
    pub fn stats(&self) -> RouterStats {
        let mut total = RouterStats::default();
        for r in self.reports() {
            total.merge(&r.router);
        }
        total
    }

    /// Asks every worker for its sessions; workers that do not answer within `timeout`
    /// are left out.
    pub fn sessions(&self, timeout: Duration) -> Vec<(usize, SessionInfo)> {
        self.ask_all(WorkerRequest::Sessions, timeout)
            .flat_map(|(i, list)| list.into_iter().map(move |s| (i, s)))
            .collect()
    }

    /// Every tunnel the workers hold with provisioned peers (Z-HOP and Exit), as `wg show`
    /// tells of peers; a peer with tunnels on several workers (it roamed) appears once per
    /// worker.
    pub fn peer_statuses(&self, timeout: Duration) -> Vec<crate::zhop::PeerStatus> {
        self.ask_all(WorkerRequest::Peers, timeout)
            .flat_map(|(_, list)| list)
            .collect()
    }

    /// Closes one session of one worker. Returns whether it existed.
    pub fn close_session(&self, worker: usize, slot: SessionSlot, timeout: Duration) -> bool {
        let Some(w) = self.workers.get(worker) else {
            return false;
        };
        let (tx, rx) = mpsc::channel();
        if w.requests
            .send(WorkerRequest::CloseSession { slot, reply: tx })
            .is_err()
        {
            return false;
        }
        let _ = w.waker.wake();
        rx.recv_timeout(timeout).unwrap_or(false)
    }

    /// Every session with what a restart needs to keep it (see
    /// [`DataPlane::start_restoring`]).
    pub fn snapshot(&self, timeout: Duration) -> Vec<SessionSnapshot> {
        self.ask_all(WorkerRequest::Snapshot, timeout)
            .flat_map(|(_, list)| list)
            .collect()
    }

    /// Sends every worker the request `ask` makes with a reply channel, wakes it, and
    /// gathers the answers that come within `timeout`, with the worker's number.
    fn ask_all<T>(
        &self,
        ask: impl Fn(mpsc::Sender<T>) -> WorkerRequest,
        timeout: Duration,
    ) -> impl Iterator<Item = (usize, T)> {
        let mut pending = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            let (tx, rx) = mpsc::channel();
            if w.requests.send(ask(tx)).is_ok() {
                let _ = w.waker.wake();
                pending.push((i, rx));
            }
        }
        pending
            .into_iter()
            .filter_map(move |(i, rx)| rx.recv_timeout(timeout).ok().map(|t| (i, t)))
    }

    /// Wakes workers so that they notice a new table at once rather than at their next
    /// packet or tick.
    pub fn nudge(&self) {
        for w in &self.workers {
            let _ = w.waker.wake();
        }
    }
}
