//! The node's desired state (exits and provisioned peers) and its file.
//!
//! Every change goes validate → persist → publish: a candidate state is checked whole
//! (building the exit table is the check), written to a temporary file in the same
//! directory, fsynced, renamed over the old file, and the directory fsynced; only then do
//! workers see it. A failure up to the rename leaves the running table and the file as they
//! were. The rename is the commit point: if syncing the directory fails after it, the file
//! already holds the new state, so the table follows it and the failure is reported as a
//! change made but perhaps not durable.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wraithgate_relay::table::{ExitSpec, ExitTable, TableError};
pub use wraithgate_relay::table::{IpNet, PeerSpec, PresharedKey};

/// Everything an operator or control plane sets on a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// Increases by one with every accepted change.
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub exits: Vec<ExitSpec>,
    #[serde(default)]
    pub peers: Vec<PeerSpec>,
}

/// Why a state was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Table(#[from] TableError),
    #[error("exit name must be 1 to 64 characters, got {0:?}")]
    ExitName(String),
}

impl DesiredState {
    /// The checks that need no table (cheap); [`DesiredState::validate`] does them too.
    pub fn check(&self) -> Result<(), StateError> {
        for e in &self.exits {
            if e.name.is_empty() || e.name.chars().count() > 64 {
                return Err(StateError::ExitName(e.name.clone()));
            }
        }
        Ok(())
    }

    /// Checks the whole state and builds the exit table workers will use.
    pub fn validate(&self) -> Result<ExitTable, StateError> {
        self.check()?;
        let table =
            ExitTable::new(self.generation, self.exits.clone())?.with_peers(self.peers.clone())?;
        Ok(table)
    }

    /// As [`DesiredState::validate`], reusing what `running` has already derived for the
    /// exits it shares with this state.
    pub fn validate_after(&self, running: &ExitTable) -> Result<ExitTable, StateError> {
        self.check()?;
        let table = ExitTable::new_after(self.generation, self.exits.clone(), running)?
            .with_peers(self.peers.clone())?;
        Ok(table)
    }
}

impl DesiredState {
    /// Writes every allowed network in canonical form, host bits cleared
    /// (`10.77.0.9/24` becomes `10.77.0.0/24`), as `wg` shows them: the stored and the
    /// listed state say exactly which sources a peer may use.
    pub fn normalise(&mut self) {
        for p in &mut self.peers {
            for n in &mut p.allowed_ips {
                *n = network(*n);
            }
        }
    }
}

/// `net` with its host bits cleared.
pub fn network(net: IpNet) -> IpNet {
    net.trunc()
}

/// How many names of each kind a [`StateDiff`] lists; the rest are counted.
const DIFF_NAMES: usize = 10;

/// What a change does to a state, by key: exits by name, peers by public key. Lists left
/// out of the JSON are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StateDiff {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exits_added: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exits_removed: Vec<String>,
    /// One line per changed exit: its name and each field's old and new value.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exits_changed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers_added: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers_removed: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers_changed: Vec<String>,
    /// The exits whose sessions the change closes (removed, or given another endpoint).
    #[serde(skip)]
    pub exits_closing_sessions: Vec<wraithgate_relay::PublicKey>,
}

impl StateDiff {
    /// What turns `old` into `new`.
    pub fn between(old: &DesiredState, new: &DesiredState) -> StateDiff {
        use std::collections::HashMap;
        let mut d = StateDiff::default();
        let old_exits: HashMap<_, _> = old.exits.iter().map(|e| (e.public_key, e)).collect();
        let new_exits: HashMap<_, _> = new.exits.iter().map(|e| (e.public_key, e)).collect();
        for e in &new.exits {
            match old_exits.get(&e.public_key) {
                None => d.exits_added.push(e.name.clone()),
                Some(o) if *o != e => {
                    let mut fields = Vec::new();
                    if o.name != e.name {
                        fields.push(format!("name {:?} -> {:?}", o.name, e.name));
                    }
                    if o.endpoint != e.endpoint {
                        fields.push(format!("endpoint {} -> {}", o.endpoint, e.endpoint));
                        d.exits_closing_sessions.push(e.public_key);
                    }
                    if o.listen_port != e.listen_port {
                        let port = |p: Option<u16>| p.map_or("none".to_owned(), |p| p.to_string());
                        fields.push(format!(
                            "listen_port {} -> {}",
                            port(o.listen_port),
                            port(e.listen_port)
                        ));
                    }
                    d.exits_changed
                        .push(format!("{} ({})", o.name, fields.join(", ")));
                }
                Some(_) => {}
            }
        }
        for e in &old.exits {
            if !new_exits.contains_key(&e.public_key) {
                d.exits_removed.push(e.name.clone());
                d.exits_closing_sessions.push(e.public_key);
            }
        }
        let old_peers: HashMap<_, _> = old.peers.iter().map(|p| (p.public_key, p)).collect();
        let new_peers: HashMap<_, _> = new.peers.iter().map(|p| (p.public_key, p)).collect();
        let label = |p: &PeerSpec| {
            if p.name.is_empty() {
                p.public_key.to_string()
            } else {
                format!("{} ({})", p.name, p.public_key)
            }
        };
        for p in &new.peers {
            match old_peers.get(&p.public_key) {
                None => d.peers_added.push(label(p)),
                Some(o) if *o != p => d.peers_changed.push(label(p)),
                Some(_) => {}
            }
        }
        for p in &old.peers {
            if !new_peers.contains_key(&p.public_key) {
                d.peers_removed.push(label(p));
            }
        }
        // Answers and log lines stay short when a whole table of 100,000 exits changes.
        for list in [
            &mut d.exits_added,
            &mut d.exits_removed,
            &mut d.exits_changed,
            &mut d.peers_added,
            &mut d.peers_removed,
            &mut d.peers_changed,
        ] {
            if list.len() > DIFF_NAMES {
                let more = list.len() - DIFF_NAMES;
                list.truncate(DIFF_NAMES);
                list.push(format!("and {more} more"));
            }
        }
        d
    }

    pub fn is_empty(&self) -> bool {
        self.exits_added.is_empty()
            && self.exits_removed.is_empty()
            && self.exits_changed.is_empty()
            && self.peers_added.is_empty()
            && self.peers_removed.is_empty()
            && self.peers_changed.is_empty()
    }
}

impl std::fmt::Display for StateDiff {
    /// `exits added: a, b; exits changed: c (endpoint x -> y)`, or `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("exits added", &self.exits_added),
            ("exits removed", &self.exits_removed),
            ("exits changed", &self.exits_changed),
            ("peers added", &self.peers_added),
            ("peers removed", &self.peers_removed),
            ("peers changed", &self.peers_changed),
        ]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(what, v)| format!("{what}: {}", v.join(", ")))
        .collect();
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

/// Where the state lives on disk, and what the node last read from it or wrote to it.
///
/// The node reads the file only at start; while it runs the file is its own, written whole
/// at every change. So before writing, [`StateFile::reclaim`] checks the file still holds
/// what the node put there: anything else (garbage, a hand edit, another program's file)
/// would otherwise be overwritten unseen, or, left in place, stop the next start.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
    /// What the node last read or wrote; `None` before either (no file at start).
    known: std::sync::Arc<std::sync::Mutex<Option<Fingerprint>>>,
}

/// Enough of a file's content to tell it changed: its length and a SipHash of its bytes
/// (std's fixed-key hasher; the file is the node's own, nobody is racing to collide it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    len: usize,
    hash: u64,
}

impl Fingerprint {
    fn of(bytes: &[u8]) -> Fingerprint {
        use std::hash::Hasher as _;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(bytes);
        Fingerprint {
            len: bytes.len(),
            hash: h.finish(),
        }
    }
}

/// What [`StateFile::reclaim`] found in place of the node's own file, now set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    /// Where the file that was found now is.
    pub aside: PathBuf,
    /// What it held: a valid state (of that generation) or why it is none.
    pub found: Result<u64, String>,
}

impl std::fmt::Display for Replaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.found {
            Ok(generation) => write!(
                f,
                "a valid state of generation {generation}, not written by this node (a file \
                 edited while the node runs is not applied: change the node through its API)"
            )?,
            Err(why) => write!(f, "no valid state ({why})")?,
        }
        write!(f, "; set aside as {}", self.aside.display())
    }
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile {
            path,
            known: Default::default(),
        }
    }

    fn remember(&self, f: Option<Fingerprint>) {
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    fn known(&self) -> Option<Fingerprint> {
        *self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state, or `None` when there is no file yet.
    pub fn load(&self) -> Result<Option<DesiredState>, String> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        self.remember(Some(Fingerprint::of(text.as_bytes())));
        serde_json::from_str(&text).map(Some).map_err(|e| {
            format!(
                "{}:{}: {} (the file is not valid state; fix or remove it)",
                self.path.display(),
                e.line(),
                e
            )
        })
    }

    /// Replaces the file with `state` atomically: after a crash at any point the file
    /// holds either the old state or the new one, whole.
    pub fn save(&self, state: &DesiredState) -> std::io::Result<()> {
        Ok(self.commit(self.prepare(state)?)?)
    }

    /// Writes `state` beside the file under a temporary name and fsyncs it; the file
    /// itself changes only on [`StateFile::commit`].
    pub fn prepare(&self, state: &DesiredState) -> std::io::Result<PreparedWrite> {
        let json = serde_json::to_vec(state).map_err(std::io::Error::other)?;
        let mut w = PreparedWrite::new(&self.path, &json, 0o600)?;
        w.fingerprint = Some(Fingerprint::of(&json));
        Ok(w)
    }

    /// Renames `w` into place (see [`PreparedWrite::commit`]) and remembers it as the
    /// node's own file once the rename is done.
    pub fn commit(&self, w: PreparedWrite) -> Result<(), CommitError> {
        let written = w.fingerprint;
        let result = w.commit();
        if !matches!(result, Err(CommitError::NotRenamed(_))) {
            self.remember(written);
        }
        result
    }

    /// Checks the file still holds what the node last read or wrote. If something else
    /// has replaced it, renames what was found to `state.json.replaced-<unix seconds>`
    /// (nothing of it is lost), writes `running` back in its place, and says what was
    /// found. A missing file is no conflict: the next write puts the whole state back.
    pub fn reclaim(&self, running: &DesiredState) -> std::io::Result<Option<Replaced>> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.known().is_some() {
                    tracing::warn!(path = %self.path.display(),
                        "the state file was removed while the node ran; the next change writes the whole state again");
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if self.known() == Some(Fingerprint::of(&bytes)) {
            return Ok(None);
        }
        let found = match serde_json::from_slice::<DesiredState>(&bytes) {
            Ok(s) => Ok(s.generation),
            Err(e) => Err(format!("line {}: {e}", e.line())),
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let name = self
            .path
            .file_name()
            .map_or_else(|| "state.json".into(), |n| n.to_string_lossy().into_owned());
        let aside = (0..)
            .map(|n| {
                let suffix = if n == 0 {
                    String::new()
                } else {
                    format!(".{n}")
                };
                self.path
                    .with_file_name(format!("{name}.replaced-{stamp}{suffix}"))
            })
            .find(|p| !p.exists())
            .expect("an unused name");
        fs::rename(&self.path, &aside)?;
        self.save(running)?;
        Ok(Some(Replaced { aside, found }))
    }
}

/// A file's new content, written and fsynced under a temporary name beside it. `commit`
/// renames it into place; dropping it uncommitted removes it.
#[derive(Debug)]
pub struct PreparedWrite {
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    committed: bool,
    /// The content's, for [`StateFile::commit`] to remember.
    fingerprint: Option<Fingerprint>,
}

impl PreparedWrite {
    fn new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<Self> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("state path has no file name"))?;
        let tmp = dir.join(format!(
            ".{}.tmp.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        // From here on, dropping `w` removes the temporary file.
        let w = PreparedWrite {
            tmp,
            path: path.to_owned(),
            dir: dir.to_owned(),
            committed: false,
            fingerprint: None,
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&w.tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(w)
    }

    /// Renames the new content into place and fsyncs the directory. The rename is the
    /// commit point: once it is done the file holds the new content, whatever follows.
    pub fn commit(mut self) -> Result<(), CommitError> {
        fs::rename(&self.tmp, &self.path).map_err(CommitError::NotRenamed)?;
        self.committed = true;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(CommitError::NotDurable)
    }
}

/// Why [`PreparedWrite::commit`] failed, which says whether the file changed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The rename failed: the file holds the old content.
    #[error("{0}")]
    NotRenamed(std::io::Error),
    /// The file holds the new content, but the directory entry may not survive a power
    /// loss.
    #[error("syncing the directory after the rename: {0}")]
    NotDurable(std::io::Error),
}

impl From<CommitError> for std::io::Error {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::NotRenamed(e) => e,
            CommitError::NotDurable(e) => std::io::Error::new(e.kind(), CommitError::NotDurable(e)),
        }
    }
}

impl Drop for PreparedWrite {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` by temp file + fsync + rename + directory fsync.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    Ok(PreparedWrite::new(path, bytes, mode)?.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wraithgate_relay::PublicKey;

    fn exit(name: &str, k: u8) -> ExitSpec {
        ExitSpec {
            name: name.into(),
            public_key: PublicKey([k; 32]),
            endpoint: format!("192.0.2.{k}:51820").parse().unwrap(),
            listen_port: None,
        }
    }

    #[test]
    fn a_file_replaced_while_running_is_set_aside_and_the_running_state_written_back() {
        let dir = std::env::temp_dir().join(format!("wg-reclaim-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        let file = StateFile::new(path.clone());
        let running = DesiredState {
            generation: 3,
            exits: vec![exit("a", 1)],
            peers: vec![],
        };
        file.save(&running).unwrap();
        assert_eq!(file.reclaim(&running).unwrap(), None, "the node's own file");
        let asides = || {
            let mut v: Vec<PathBuf> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.to_string_lossy().contains(".replaced-"))
                .collect();
            v.sort();
            v
        };

        // Garbage: set aside byte for byte, the running state back in place.
        let garbage = b"\x00\xffnot json at all";
        fs::write(&path, garbage).unwrap();
        let r = file.reclaim(&running).unwrap().expect("a replaced file");
        assert!(
            matches!(&r.found, Err(why) if why.starts_with("line 1:")),
            "{r:?}"
        );
        assert_eq!(fs::read(&r.aside).unwrap(), garbage);
        assert_eq!(file.load().unwrap(), Some(running.clone()));
        assert_eq!(
            file.reclaim(&running).unwrap(),
            None,
            "written back: its own again"
        );

        // A valid state written by someone else: set aside too, under another name.
        let edited = DesiredState {
            generation: 9,
            exits: vec![exit("b", 2)],
            peers: vec![],
        };
        fs::write(&path, serde_json::to_vec(&edited).unwrap()).unwrap();
        let r2 = file.reclaim(&running).unwrap().expect("a replaced file");
        assert_eq!(r2.found, Ok(9));
        assert_ne!(
            r2.aside, r.aside,
            "an earlier set-aside file is never overwritten"
        );
        assert_eq!(asides(), {
            let mut v = vec![r.aside.clone(), r2.aside.clone()];
            v.sort();
            v
        });
        assert_eq!(file.load().unwrap(), Some(running.clone()));

        // Removed: no conflict (the next write puts the whole state back).
        fs::remove_file(&path).unwrap();
        assert_eq!(file.reclaim(&running).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_prepared_write_changes_the_file_only_when_committed() {
        let dir = std::env::temp_dir().join(format!("wg-prepared-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = StateFile::new(dir.join("state.json"));
        let old = DesiredState {
            generation: 1,
            exits: vec![exit("a", 1)],
            peers: vec![],
        };
        file.save(&old).unwrap();
        let listing = || {
            let mut names: Vec<String> = fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let new = DesiredState {
            generation: 2,
            exits: vec![exit("a", 1), exit("b", 2)],
            peers: vec![],
        };
        // Abandoned (the state proved invalid): the temporary file goes, the old stays.
        let prepared = file.prepare(&new).unwrap();
        assert_eq!(listing().len(), 2, "the temporary file is beside the state");
        drop(prepared);
        assert_eq!(listing(), vec!["state.json".to_owned()]);
        assert_eq!(file.load().unwrap(), Some(old));
        // Committed: the new state, and nothing else left behind.
        file.prepare(&new).unwrap().commit().unwrap();
        assert_eq!(listing(), vec!["state.json".to_owned()]);
        assert_eq!(file.load().unwrap(), Some(new));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_directory_sync_after_the_rename_says_the_file_changed() {
        // Opening the directory to sync it is the one step after the rename that needs a
        // file descriptor: with none left it fails, the rename having been made. Run in a
        // child process of its own, so that no other test runs short of descriptors.
        const CHILD: &str = "WG_STATE_TEST_CHILD";
        let name = "state::tests::a_failed_directory_sync_after_the_rename_says_the_file_changed";
        if std::env::var_os(CHILD).is_none() {
            // Through the target runner under emulation, which cannot exec an aarch64 binary
            // by itself.
            let out = wraithgate_testkit::workspace_command(std::env::current_exe().unwrap())
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("commit: not durable, file new"),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("wg-not-durable-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = StateFile::new(dir.join("state.json"));
        let old = DesiredState {
            generation: 1,
            exits: vec![exit("a", 1)],
            peers: vec![],
        };
        file.save(&old).unwrap();
        let new = DesiredState {
            generation: 2,
            ..old.clone()
        };
        let prepared = file.prepare(&new).unwrap();
        let mut hog = Vec::new();
        let committed = loop {
            match File::open("/dev/null") {
                Ok(f) => hog.push(f),
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break prepared.commit(),
                Err(e) => panic!("opening /dev/null: {e}"),
            }
        };
        drop(hog);
        assert!(
            matches!(committed, Err(CommitError::NotDurable(_))),
            "{committed:?}"
        );
        assert_eq!(file.load().unwrap(), Some(new));
        fs::remove_dir_all(&dir).unwrap();
        println!("commit: not durable, file new");
    }

    #[test]
    fn peers_must_reference_configured_exits() {
        let mut s = DesiredState {
            generation: 1,
            exits: vec![exit("a", 1)],
            peers: vec![PeerSpec {
                public_key: PublicKey([9; 32]),
                name: "p".into(),
                allowed_ips: vec!["10.0.0.2/32".parse().unwrap()],
                preshared_key: None,
                endpoint: None,
                persistent_keepalive: None,
                allowed_exits: vec![PublicKey([1; 32])],
            }],
        };
        assert!(s.validate().is_ok());
        s.peers[0].allowed_exits = vec![PublicKey([2; 32])];
        assert!(matches!(
            s.validate(),
            Err(StateError::Table(TableError::UnknownExit { .. }))
        ));
        s.peers[0].allowed_exits.clear();
        s.peers[0].allowed_ips.clear();
        assert!(matches!(
            s.validate(),
            Err(StateError::Table(TableError::NoAllowedIps { .. }))
        ));
        s.peers[0].allowed_ips = vec!["10.0.0.2/32".parse().unwrap()];
        s.peers[0].public_key = PublicKey([1; 32]);
        assert!(matches!(
            s.validate(),
            Err(StateError::Table(TableError::PeerIsExit { .. }))
        ));
    }

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp_files() {
        let dir = std::env::temp_dir().join(format!("wg-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = StateFile::new(dir.join("state.json"));
        assert_eq!(f.load().unwrap(), None);
        let s = DesiredState {
            generation: 7,
            exits: vec![exit("a", 1), exit("b", 2)],
            peers: vec![],
        };
        f.save(&s).unwrap();
        assert_eq!(f.load().unwrap(), Some(s));
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(f.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::write(f.path(), "{ not json").unwrap();
        assert!(f.load().unwrap_err().contains(":1:"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
