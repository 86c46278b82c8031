//! A running node: the data plane, the desired state that drives it, and the sidecar.
//!
//! The data plane starts first and from the state on disk alone, so a node whose control
//! plane (or sidecar) is down still forwards for every exit it knew. The sidecar runs on a
//! thread of its own with its own single-threaded runtime, never on a worker's core; if it
//! cannot bind or dies, forwarding carries on.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use wraithgate_relay::io::DataPlane;
use wraithgate_relay::router::SessionSnapshot;
use wraithgate_relay::table::SharedTable;

use crate::api::{self, Sidecar};
use crate::change::Control;
use crate::config::Config;
use crate::state::{write_atomically, DesiredState, StateFile};

/// Restored sessions older than this are useless: their keys are rejected after
/// REJECT_AFTER_TIME (180 s) without a new handshake anyway.
const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(180);

/// Sessions saved across a restart.
#[derive(Debug, Serialize, Deserialize)]
struct SessionsFile {
    saved_at_unix: u64,
    sessions: Vec<SessionSnapshot>,
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    pub control: Arc<Control>,
    sidecar: Option<Sidecar>,
    sessions_path: PathBuf,
    pub token_path: Option<PathBuf>,
    /// What the sidecar was started with, to start it again if its thread dies.
    api_cfg: crate::config::ControlSection,
    /// When a dead sidecar may be started again, and the wait after the next death.
    api_restart: Option<(std::time::Instant, Duration)>,
    /// When pinned listen ports not bound are next tried, and the wait after that.
    pinned_retry: (std::time::Instant, Duration),
}

/// The first wait before a dead sidecar is started again; it doubles while the sidecar
/// keeps dying within [`API_RESTART_MAX`] of a restart, up to that.
const API_RESTART_FIRST: Duration = Duration::from_secs(1);
const API_RESTART_MAX: Duration = Duration::from_secs(60);

/// How soon a pinned listen port that could not be bound (taken by another socket) is tried
/// again; the wait doubles while it stays taken, up to [`PINNED_RETRY_MAX`].
const PINNED_RETRY_FIRST: Duration = Duration::from_secs(1);
const PINNED_RETRY_MAX: Duration = Duration::from_secs(60);

impl Node {
    /// Loads the state (the file's exits seed it on first start), restores sessions saved
    /// by the last clean stop, starts the data plane, then the sidecar.
    pub fn start(mut cfg: Config) -> Result<Node> {
        let dir = &cfg.control.state_dir.clone();
        create_private_dir(dir)?;
        remove_stale_temp_files(dir);
        let file = StateFile::new(dir.join("state.json"));
        let state = match file.load().map_err(anyhow::Error::msg)? {
            Some(saved) => {
                tracing::info!(path = %file.path().display(), generation = saved.generation,
                    exits = saved.exits.len(), peers = saved.peers.len(),
                    "loaded state; the configuration file's [[exit]] entries only seed a new state");
                saved
            }
            None => {
                let seeded = DesiredState {
                    generation: 1,
                    exits: cfg.table.specs().cloned().collect(),
                    peers: Vec::new(),
                };
                // Never leave behind a state file that would stop every later start.
                seeded
                    .validate()
                    .context("the configuration's exits do not make a valid state")?;
                file.save(&seeded)
                    .with_context(|| format!("writing {}", file.path().display()))?;
                tracing::info!(path = %file.path().display(), exits = seeded.exits.len(), "new state seeded from the configuration file");
                seeded
            }
        };
        let mut state = state;
        state.normalise();
        // A state written before pinned listen ports were checked: refuse to run on it
        // rather than cut off every other exit's clients on that port.
        if let Some(e) = state.exits.iter().find(|e| {
            e.listen_port
                .is_some_and(|p| cfg.data_plane.listen.iter().any(|l| l.port() == p))
        }) {
            anyhow::bail!(
                "{}: {}; remove its listen_port there (or the port from [relay] listen)",
                file.path().display(),
                crate::config::listen_port_conflict(&e.name, e.listen_port.unwrap_or_default())
            );
        }
        let table = state
            .validate()
            .with_context(|| format!("{} holds an invalid state", file.path().display()))?;
        let node_key = load_or_create_node_key(&dir.join("node.key"))?;
        cfg.data_plane.node_key = Some(node_key.0);
        let node_public = wraithgate_relay::zhop::NodeKey::from_secret(node_key.0).public_key();
        tracing::info!(public_key = %node_public, "node key (provisioned Z-HOP peers use it as their outer peer key)");
        let sessions_path = dir.join("sessions.json");
        let restore = load_sessions(&sessions_path);
        let dp = DataPlane::start_restoring(cfg.data_plane, SharedTable::new(table), restore)
            .context("starting the data plane")?;
        let control = Arc::new(Control::new(node_public, state, file, Arc::new(dp)));
        let mut token_path = None;
        let sidecar = if cfg.control.api_enabled {
            let path = cfg
                .control
                .token_file
                .clone()
                .unwrap_or_else(|| dir.join("api.token"));
            match api::start(control.clone(), &cfg.control, &path) {
                Ok(s) => {
                    token_path = Some(path);
                    Some(s)
                }
                Err(e) => {
                    // Forwarding never depends on the sidecar.
                    tracing::error!(error = %format!("{e:#}"), "operator API not available; forwarding continues");
                    None
                }
            }
        } else {
            None
        };
        Ok(Node {
            control,
            sidecar,
            sessions_path,
            token_path,
            api_cfg: cfg.control.clone(),
            api_restart: None,
            pinned_retry: (std::time::Instant::now(), PINNED_RETRY_FIRST),
        })
    }

    /// Whether the operator API was started and its thread still runs.
    pub fn sidecar_running(&self) -> Option<bool> {
        self.sidecar.as_ref().map(Sidecar::running)
    }

    /// Starts the sidecar again if its thread died (a panic outside any handler: a
    /// handler's own panic is answered 500 and never gets here). Forwarding never noticed;
    /// the API was away from the death until now. Called from the node's main loop; waits
    /// `API_RESTART_FIRST` (1 s) before the first restart and twice as long each time the
    /// sidecar dies again within `API_RESTART_MAX` of a restart.
    pub fn supervise_sidecar(&mut self, now: std::time::Instant) {
        let Some(sidecar) = &mut self.sidecar else {
            return;
        };
        if let Some(why) = sidecar.death() {
            let wait = match self.api_restart {
                Some((at, last)) if now.saturating_duration_since(at) < API_RESTART_MAX => {
                    (last * 2).min(API_RESTART_MAX)
                }
                _ => API_RESTART_FIRST,
            };
            tracing::error!(reason = %why, restart_in_secs = wait.as_secs_f64(),
                "operator API died; forwarding continues and the node starts the API again");
            self.api_restart = Some((now + wait, wait));
        }
        let Some((at, wait)) = self.api_restart else {
            return;
        };
        if sidecar.running() || now < at {
            return;
        }
        let Some(path) = self.token_path.clone() else {
            return;
        };
        match api::start(self.control.clone(), &self.api_cfg, &path) {
            Ok(s) => {
                self.control
                    .api_restarts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(api = ?s.local_addr, "operator API started again");
                self.sidecar = Some(s);
                // The wait stays as it was, so a sidecar that dies again soon waits longer.
                self.api_restart = Some((now, wait));
            }
            Err(e) => {
                let next = (wait * 2).min(API_RESTART_MAX);
                tracing::error!(error = %format!("{e:#}"), retry_in_secs = next.as_secs_f64(),
                    "operator API could not be started again; forwarding continues");
                self.api_restart = Some((now + next, next));
            }
        }
    }

    /// Binds the pinned listen ports the running table needs but could not bind when it came
    /// (another socket held the port), once they are free: without this an exit's pinned
    /// port stayed dark until the next table change. Called from the node's main loop; tries
    /// 1 s after a port is found unbound, then doubles the wait to 60 s while it stays taken.
    pub fn supervise_pinned_ports(&mut self, now: std::time::Instant) {
        let (at, wait) = self.pinned_retry;
        if now < at {
            return;
        }
        if self.control.dp.unbound_pinned().is_empty() {
            self.pinned_retry = (now + PINNED_RETRY_FIRST, PINNED_RETRY_FIRST);
            return;
        }
        let still = self.control.retry_pinned_ports();
        if still.is_empty() {
            self.pinned_retry = (now + PINNED_RETRY_FIRST, PINNED_RETRY_FIRST);
        } else {
            let next = (wait * 2).min(PINNED_RETRY_MAX);
            tracing::warn!(unbound = ?still, retry_in_secs = next.as_secs_f64(),
                "pinned listen ports still cannot be bound; their exits' clients get no answer there");
            self.pinned_retry = (now + next, next);
        }
    }

    /// The sidecar's TCP address, if it runs.
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.sidecar.as_ref().and_then(|s| s.local_addr)
    }

    /// Stops the sidecar, saves the sessions for the next start, stops the workers.
    pub fn stop(mut self) {
        if let Some(s) = self.sidecar.take() {
            s.stop();
        }
        let sessions = self.control.dp.snapshot(Duration::from_secs(2));
        let file = SessionsFile {
            saved_at_unix: unix_now(),
            sessions,
        };
        match serde_json::to_vec(&file)
            .map_err(std::io::Error::other)
            .and_then(|b| write_atomically(&self.sessions_path, &b, 0o600))
        {
            Ok(()) => {
                tracing::info!(sessions = file.sessions.len(), path = %self.sessions_path.display(), "sessions saved for the next start")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not save sessions; clients will re-handshake after the restart")
            }
        }
        match Arc::try_unwrap(self.control) {
            Ok(c) => match Arc::try_unwrap(c.dp) {
                Ok(dp) => dp.shutdown(),
                Err(dp) => drop(dp),
            },
            Err(c) => drop(c),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sessions saved by the last clean stop, if recent enough to be worth restoring. The file
/// is removed once read, so it is never restored twice.
fn load_sessions(path: &Path) -> Vec<SessionSnapshot> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let sessions = match serde_json::from_slice::<SessionsFile>(&bytes) {
        Ok(f) => {
            let age = unix_now().saturating_sub(f.saved_at_unix);
            if age > SNAPSHOT_MAX_AGE.as_secs() {
                tracing::info!(age_secs = age, "saved sessions too old to restore");
                Vec::new()
            } else {
                tracing::info!(
                    sessions = f.sessions.len(),
                    age_secs = age,
                    "restoring sessions saved at the last stop"
                );
                f.sessions
            }
        }
        Err(e) => {
            // Sessions are worth a handshake each, not a refusal to start: the file is set
            // aside for the operator and the clients handshake again.
            let aside = path.with_extension("json.unreadable");
            match std::fs::rename(path, &aside) {
                Ok(()) => tracing::warn!(
                    path = %path.display(), error = %e, set_aside = %aside.display(),
                    "unreadable sessions file set aside; its clients will handshake again"
                ),
                Err(re) => tracing::warn!(
                    path = %path.display(), error = %e, rename_error = %re,
                    "unreadable sessions file ignored; its clients will handshake again"
                ),
            }
            return Vec::new();
        }
    };
    // Read once: a crash after this start must not restore the same sessions again.
    let _ = std::fs::remove_file(path);
    sessions
}

/// The node's static private key from `path` (base64, as `wg genkey` writes it), created
/// with mode 0600 on first start.
fn load_or_create_node_key(path: &Path) -> Result<wraithgate_relay::PublicKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => wraithgate_relay::PublicKey::from_base64(text.trim()).with_context(|| {
            format!(
                "{} does not hold a base64 WireGuard private key",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret: [u8; 32] = rand::random();
            // Curve25519 clamping, as `wg genkey` does.
            secret[0] &= 248;
            secret[31] = (secret[31] & 127) | 64;
            let key = wraithgate_relay::PublicKey(secret);
            write_atomically(path, format!("{}\n", key.to_base64()).as_bytes(), 0o600)
                .with_context(|| format!("creating node key {}", path.display()))?;
            tracing::info!(path = %path.display(), "created the node's private key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading node key {}", path.display())),
    }
}

/// Removes temporary files a killed node left behind (see [`write_atomically`]).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(".json.tmp.") {
            match std::fs::remove_file(e.path()) {
                Ok(()) => {
                    tracing::info!(file = %name, "removed a temporary file left by an earlier crash")
                }
                Err(err) => {
                    tracing::warn!(file = %name, error = %err, "cannot remove stale temporary file")
                }
            }
        }
    }
}

/// Creates `dir` (mode 0700) if it does not exist.
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating state directory {}", dir.display()))?;
    }
    Ok(())
}
