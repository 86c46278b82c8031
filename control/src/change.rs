//! The control side's one way to change the node: validate, persist, then publish.
//!
//! [`Control`] owns the desired state, its file and the data plane it drives; the sidecar
//! and start-up (and, on SIGHUP, the configuration reload) go through it, workers never.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wraithgate_relay::io::DataPlane;

use serde::Serialize;
use wraithgate_relay::PublicKey;

use crate::config::listen_port_conflict;
use crate::state::{CommitError, DesiredState, PreparedWrite, StateDiff, StateError, StateFile};

/// How long counting a change's sessions waits for each worker.
const WORKER_TIMEOUT: Duration = Duration::from_secs(1);

/// What an accepted change did.
#[derive(Debug)]
pub struct Applied {
    /// The state in use now.
    pub state: Arc<DesiredState>,
    /// What changed; empty when the change asked for the state the node already had,
    /// which then keeps its generation.
    pub diff: StateDiff,
    /// The sessions the change closes: those of the exits it removes or points elsewhere.
    pub sessions_closed: Vec<ClosedSessions>,
}

impl Applied {
    /// Whether the change changed anything (else the generation stayed).
    pub fn changed(&self) -> bool {
        !self.diff.is_empty()
    }
}

/// The sessions of one exit that a change closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClosedSessions {
    pub exit: String,
    pub exit_key: PublicKey,
    pub sessions: usize,
}

/// The state the control side owns: the desired state, its file, and the data plane it
/// drives. Only the sidecar and start-up touch it; workers never do.
#[derive(Debug)]
pub struct Control {
    /// The node's own public key (Z-HOP peers' outer peer).
    pub node_public: wraithgate_relay::PublicKey,
    /// Shared, immutable once published: readers (listings, metrics) take a reference, not
    /// a copy of a table that may hold 100,000 exits.
    state: Mutex<Arc<DesiredState>>,
    file: StateFile,
    pub dp: Arc<DataPlane>,
    pub started: std::time::Instant,
    /// The wall clock at start, seconds since the Unix epoch: read once, so that
    /// `process_start_time_seconds` stays put when the wall clock is set.
    pub started_unix: u64,
    /// Accepted changes since start.
    pub changes: AtomicU64,
    /// Changes refused (validation, persistence).
    pub refused: AtomicU64,
    /// API handlers that panicked (each answered 500; the sidecar served on).
    pub api_panics: AtomicU64,
    /// Times the sidecar's thread died and the node started it again.
    pub api_restarts: AtomicU64,
}

/// Why a change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Invalid(#[from] StateError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "stale generation: the node is at generation {current}, the request expected {expected}"
    )]
    Stale { current: u64, expected: u64 },
    #[error("cannot persist the new state to {path}: {source}; nothing was changed")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The change is made (file renamed into place, table published), but the directory
    /// was not synced: the file may revert to the old state after a power loss.
    #[error(
        "the change was applied (generation {generation}, in use and in {path}), but {source}; \
         it may not survive a power loss"
    )]
    NotDurable {
        path: PathBuf,
        generation: u64,
        source: std::io::Error,
    },
}

/// How long a worker may go without publishing its report before it counts as stalled. A
/// running worker publishes every 50 ms and wakes at least every 100 ms, idle or not.
pub const WORKER_STALL: std::time::Duration = std::time::Duration::from_secs(2);

/// What `/healthz`, `/readyz` and the systemd watchdog go by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Workers that have not published within [`WORKER_STALL`] (or ever, once the node is
    /// older than that).
    pub stalled: Vec<usize>,
    /// Every worker has published at least once: the data plane is serving.
    pub ready: bool,
}

impl Health {
    /// The health of workers whose last reports were published at `published`, for a node
    /// started at `started`, seen at `now`.
    pub fn of(
        published: impl IntoIterator<Item = Option<std::time::Instant>>,
        started: std::time::Instant,
        now: std::time::Instant,
    ) -> Health {
        let young = now.saturating_duration_since(started) < WORKER_STALL;
        let mut stalled = Vec::new();
        let mut ready = true;
        for (i, p) in published.into_iter().enumerate() {
            let stale = match p {
                Some(p) => now.saturating_duration_since(p) > WORKER_STALL,
                None => {
                    ready = false;
                    !young
                }
            };
            if stale {
                stalled.push(i);
            }
        }
        Health { stalled, ready }
    }
}

impl Control {
    /// The data plane's health now (see [`Health`]).
    pub fn health(&self) -> Health {
        Health::of(
            self.dp.reports().iter().map(|r| r.published),
            self.started,
            std::time::Instant::now(),
        )
    }

    /// The control side of a node whose data plane `dp` runs the table of `state`, which
    /// `file` holds.
    pub fn new(
        node_public: wraithgate_relay::PublicKey,
        state: DesiredState,
        file: StateFile,
        dp: Arc<DataPlane>,
    ) -> Control {
        Control {
            node_public,
            state: Mutex::new(Arc::new(state)),
            file,
            dp,
            started: std::time::Instant::now(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            changes: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            api_panics: AtomicU64::new(0),
            api_restarts: AtomicU64::new(0),
        }
    }

    /// The current desired state.
    pub fn state(&self) -> Arc<DesiredState> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<DesiredState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to a copy of the state; validates, persists and publishes the
    /// result, or changes nothing. Returns the new state.
    pub fn apply(
        &self,
        change: impl FnOnce(&mut DesiredState) -> Result<(), ChangeError>,
    ) -> Result<Applied, ChangeError> {
        self.apply_with(|current| {
            let mut next = current.clone();
            change(&mut next)?;
            Ok(next)
        })
    }

    /// Makes the next state with `build` from the current one, then validates, persists
    /// and publishes it, or changes nothing.
    ///
    /// Validating builds the exit table (a pre-keyed mac1 state per exit) and persisting
    /// writes and fsyncs the state file: for a large table both take tens of milliseconds,
    /// and they do not depend on each other, so they run at once. The file is written
    /// under a temporary name and renamed into place only once the state has proved
    /// valid; otherwise it is removed and the old file stays.
    fn apply_with(
        &self,
        build: impl FnOnce(&DesiredState) -> Result<DesiredState, ChangeError>,
    ) -> Result<Applied, ChangeError> {
        let mut state = self.lock();
        let started = std::time::Instant::now();
        let mut next = match build(&state) {
            Ok(mut next) => {
                next.normalise();
                next
            }
            Err(e) => return Err(self.refuse(e)),
        };
        let diff = StateDiff::between(&state, &next);
        // The same entries, none twice (the running state has each key once): the state in
        // use, perhaps in another order.
        if diff.is_empty()
            && next.exits.len() == state.exits.len()
            && next.peers.len() == state.peers.len()
        {
            tracing::info!(
                generation = state.generation,
                "change asks for the state in use: nothing to do"
            );
            return Ok(Applied {
                state: state.clone(),
                diff,
                sessions_closed: Vec::new(),
            });
        }
        let result = (|| {
            next.generation = state.generation + 1;
            next.check()?;
            self.check_listen_ports(&next)?;
            let persist_err = |source| ChangeError::Persist {
                path: self.file.path().to_owned(),
                source,
            };
            // The file must still be the node's own before a change replaces it: one
            // somebody else wrote is set aside, never overwritten unseen.
            if let Some(replaced) = self.file.reclaim(&state).map_err(persist_err)? {
                tracing::warn!(path = %self.file.path().display(), found = %replaced,
                    generation = state.generation,
                    "the state file had been replaced while the node ran; the running state is written back");
                return Err(ChangeError::Conflict(format!(
                    "{} had been replaced while the node ran: it held {replaced}. The \
                     running state (generation {}) is written back in its place; nothing \
                     was changed: send the change again",
                    self.file.path().display(),
                    state.generation
                )));
            }
            let timed = |f: &dyn Fn() -> std::io::Result<PreparedWrite>| {
                let t = std::time::Instant::now();
                (f(), t.elapsed())
            };
            let write = || self.file.prepare(&next);
            let (table, table_time, (prepared, write_time)) = std::thread::scope(|scope| {
                let writer = std::thread::Builder::new()
                    .name("wg-state-write".into())
                    .spawn_scoped(scope, || {
                        // Inherited from the API thread already; not from any other caller.
                        self.dp.settle_control_thread();
                        timed(&write)
                    });
                let t = std::time::Instant::now();
                let table = next.validate_after(&self.dp.table());
                let table_time = t.elapsed();
                let prepared = match writer {
                    Ok(w) => w.join().unwrap_or_else(|_| {
                        (
                            Err(std::io::Error::other("the state writer panicked")),
                            Duration::ZERO,
                        )
                    }),
                    // No thread to spare: write it here.
                    Err(_) => timed(&write),
                };
                (table, table_time, prepared)
            });
            // An invalid state drops `prepared`, which removes the temporary file.
            let table = table?;
            // A port the change newly pins must be bindable now, or the state would name a
            // listener the node does not have. The sockets are handed to workers only
            // with the table; refused or unpersisted, they close.
            let listeners = self
                .dp
                .bind_pinned(&table)
                .map_err(|e| ChangeError::Conflict(format!("{e}; nothing was changed")))?;
            // The rename is the commit point: once the file holds the new state, the
            // table follows it even if syncing the directory then fails.
            let not_durable = match self.file.commit(prepared.map_err(persist_err)?) {
                Ok(()) => None,
                Err(CommitError::NotRenamed(e)) => return Err(persist_err(e)),
                Err(e @ CommitError::NotDurable(_)) => Some(e),
            };
            // Counted just before the table that closes them goes out.
            let sessions_closed = self.sessions_closed_by(&state, &diff);
            self.dp.publish_bound(table, listeners);
            Ok((next, table_time, write_time, not_durable, sessions_closed))
        })();
        match result {
            Ok((next, table_time, write_time, not_durable, sessions_closed)) => {
                let next = Arc::new(next);
                *state = next.clone();
                self.changes.fetch_add(1, Ordering::Relaxed);
                let closed = sessions_closed
                    .iter()
                    .map(|c| format!("{}={}", c.exit, c.sessions))
                    .collect::<Vec<_>>()
                    .join(" ");
                if let Some(e) = not_durable {
                    let e = ChangeError::NotDurable {
                        path: self.file.path().to_owned(),
                        generation: next.generation,
                        source: std::io::Error::other(e),
                    };
                    tracing::error!(error = %e, "state changed but not synced");
                    return Err(e);
                }
                tracing::info!(
                    generation = next.generation,
                    changes = %diff,
                    sessions_closed = %closed,
                    exits = next.exits.len(),
                    peers = next.peers.len(),
                    table_ms = table_time.as_secs_f64() * 1e3,
                    write_ms = write_time.as_secs_f64() * 1e3,
                    total_ms = started.elapsed().as_secs_f64() * 1e3,
                    "state changed"
                );
                Ok(Applied {
                    state: next,
                    diff,
                    sessions_closed,
                })
            }
            Err(e) => Err(self.refuse(e)),
        }
    }

    /// Binds again the running table's pinned listen ports that could not be bound when it
    /// came (see [`DataPlane::retry_pinned`]), under the state lock that serialises every
    /// bind; returns the addresses still unbound.
    pub fn retry_pinned_ports(&self) -> Vec<std::net::SocketAddr> {
        let _state = self.lock();
        self.dp.retry_pinned()
    }

    /// What [`Control::replace`] would change, checked as it checks (but for binding
    /// newly pinned ports), without changing anything.
    pub fn preview(
        &self,
        expected: u64,
        build: impl FnOnce(&DesiredState) -> DesiredState,
    ) -> Result<StateDiff, ChangeError> {
        let current = self.state();
        if current.generation != expected {
            return Err(ChangeError::Stale {
                current: current.generation,
                expected,
            });
        }
        let mut next = build(&current);
        next.normalise();
        next.generation = current.generation + 1;
        next.check()?;
        self.check_listen_ports(&next)?;
        next.validate_after(&self.dp.table())?;
        Ok(StateDiff::between(&current, &next))
    }

    fn refuse(&self, e: ChangeError) -> ChangeError {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(error = %e, "change refused");
        e
    }

    /// A configured listen port stays with mac1 routing: pinned to one exit, every other
    /// exit's clients arriving there would be cut off.
    fn check_listen_ports(&self, next: &DesiredState) -> Result<(), ChangeError> {
        let listen = self.dp.local_addrs();
        for e in &next.exits {
            if let Some(port) = e
                .listen_port
                .filter(|p| listen.iter().any(|l| l.port() == *p))
            {
                return Err(ChangeError::Conflict(format!(
                    "{}; nothing was changed",
                    listen_port_conflict(&e.name, port)
                )));
            }
        }
        Ok(())
    }

    /// The sessions that `diff`, applied to `current`, closes: the exits it removes and
    /// those whose endpoint it changes lose theirs.
    fn sessions_closed_by(&self, current: &DesiredState, diff: &StateDiff) -> Vec<ClosedSessions> {
        let keys = &diff.exits_closing_sessions;
        if keys.is_empty() {
            return Vec::new();
        }
        let mut counts: std::collections::HashMap<PublicKey, usize> =
            keys.iter().map(|k| (*k, 0)).collect();
        for (_, s) in self.dp.sessions(WORKER_TIMEOUT) {
            if let Some(n) = counts.get_mut(&s.exit_key) {
                *n += 1;
            }
        }
        keys.iter()
            .map(|k| ClosedSessions {
                exit: current
                    .exits
                    .iter()
                    .find(|e| e.public_key == *k)
                    .map(|e| e.name.clone())
                    .unwrap_or_default(),
                exit_key: *k,
                sessions: counts[k],
            })
            .collect()
    }

    /// Replaces the whole state with what `build` makes of the current one (which it may
    /// consult, say for what the new state leaves out), if the caller saw generation
    /// `expected`.
    pub fn replace(
        &self,
        expected: u64,
        build: impl FnOnce(&DesiredState) -> DesiredState,
    ) -> Result<Applied, ChangeError> {
        // Built by `build`: the current state, however large, is not copied.
        self.apply_with(|s| {
            if s.generation != expected {
                return Err(ChangeError::Stale {
                    current: s.generation,
                    expected,
                });
            }
            Ok(DesiredState {
                generation: s.generation,
                ..build(s)
            })
        })
    }
}
