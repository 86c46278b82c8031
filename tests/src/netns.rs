//! Network namespaces, and the processes and threads that run inside them, for the suites
//! that need root (see [`crate::interop`]).
//!
//! Everything created here is named with [`PREFIX`] so that a run can find and remove what an
//! interrupted run left behind ([`remove_leftovers`]) without touching anyone else's
//! namespaces. A [`Netns`] deletes itself (and kills whatever still runs in it) on drop, a
//! [`Daemon`] stops its process on drop, so a failing test tears its world down while it
//! unwinds.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The prefix of every namespace, interface and socket this suite creates.
pub const PREFIX: &str = "wgi-";

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/var/run/netns";
/// Where wireguard-go puts its control sockets (shared by every namespace).
pub const WG_SOCKET_DIR: &str = "/var/run/wireguard";

/// Runs `cmd` to completion. Returns its stdout, or an error carrying the command line, the
/// exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…` to completion; see [`run`].
pub fn run_args(program: &str, args: &[&str]) -> Result<String> {
    run(Command::new(program).args(args))
}

/// Runs `cmd` with `input` on its stdin; see [`run`].
pub fn run_with_input(cmd: &mut Command, input: &str) -> Result<String> {
    let line = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {line}"))?;
    child
        .stdin
        .take()
        .context("stdin is piped")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why this machine cannot run the namespace suites, if it cannot: not root, no TUN device,
/// or a program missing from `PATH`.
pub fn missing_prerequisites(programs: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (network namespaces, veth, TUN, nftables)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun for wireguard-go".into());
    }
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| find_in_path(p).is_none())
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "needs {} in PATH (Debian: apt-get install wireguard-go wireguard-tools iperf3 \
             nftables iproute2 iputils-ping)",
            missing.join(", ")
        ));
    }
    None
}

/// The full path of `program` if it is in `PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Serializes the namespace suites: they share namespace names. A mutex covers the tests of
/// one binary, a lock file any other process running the suite at the same time.
#[derive(Debug)]
pub struct SuiteLock {
    _file: Flock<File>,
    _guard: MutexGuard<'static, ()>,
}

static SUITE: Mutex<()> = Mutex::new(());

impl SuiteLock {
    /// Waits for the suite to be free.
    pub fn acquire() -> Result<SuiteLock> {
        // A test that failed while holding the mutex poisoned it; its lab is gone by now.
        let guard = SUITE.lock().unwrap_or_else(|p| p.into_inner());
        let path = std::env::temp_dir().join("wraithgate-interop.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let file = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(SuiteLock {
            _file: file,
            _guard: guard,
        })
    }
}

/// Removes every namespace named with [`PREFIX`] (killing what still runs in it) and stale
/// wireguard-go sockets: what an interrupted run left behind. Call with the [`SuiteLock`].
pub fn remove_leftovers() -> Result<()> {
    for name in our_namespaces()? {
        eprintln!("interop: removing namespace {name}");
        kill_all_in(&name, Duration::from_secs(2));
        run_args("ip", &["netns", "del", &name])?;
    }
    remove_stale_wg_sockets();
    Ok(())
}

fn list_namespaces() -> Result<Vec<String>> {
    Ok(run_args("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Removes wireguard-go control sockets of ours whose process is gone (wireguard-go removes
/// its socket when it exits cleanly, not when killed).
fn remove_stale_wg_sockets() {
    let Ok(entries) = std::fs::read_dir(WG_SOCKET_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(PREFIX)
            && name.ends_with(".sock")
            && std::os::unix::net::UnixStream::connect(e.path()).is_err()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Makes an interrupted run clean up after itself: on SIGINT, SIGTERM or SIGHUP (a developer's
/// Ctrl-C, a CI job's timeout) the process removes every namespace of ours and what runs
/// in them ([`remove_leftovers`]) and exits with status 130. Without it the namespaces and
/// their wireguard-go processes would outlive the run until the next one starts. Installed
/// once per process; a lab calls it before it creates anything.
pub fn clean_up_when_interrupted() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // The handler runs on a thread of its own, so it may block on `ip` and `kill`.
        let installed = ctrlc::set_handler(|| {
            eprintln!("interop: interrupted; removing the lab's namespaces and processes");
            if let Err(e) = remove_leftovers() {
                eprintln!("interop: cleaning up after the interrupt: {e:#}");
            }
            std::process::exit(INTERRUPTED_EXIT_CODE);
        });
        if let Err(e) = installed {
            eprintln!("interop: an interrupt will leave the lab behind: {e}");
        }
    });
}

/// The exit status of a run that [`clean_up_when_interrupted`] cleaned up (128 + SIGINT, as a
/// shell reports an interrupted program).
pub const INTERRUPTED_EXIT_CODE: i32 = 130;

/// Our namespaces that exist now.
pub fn our_namespaces() -> Result<Vec<String>> {
    Ok(list_namespaces()?
        .into_iter()
        .filter(|n| n.starts_with(PREFIX))
        .collect())
}

/// The processes running in namespace `name`.
pub fn pids_in(name: &str) -> Vec<Pid> {
    run_args("ip", &["netns", "pids", name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .map(Pid::from_raw)
        .collect()
}

/// Asks every process in namespace `name` to stop (SIGTERM), then kills what remains after
/// `grace`. Every process found there is one this suite started: the namespace is ours.
fn kill_all_in(name: &str, grace: Duration) {
    let pids = pids_in;
    let first = pids(name);
    if first.is_empty() {
        return;
    }
    for &p in &first {
        let _ = kill(p, Signal::SIGTERM);
    }
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if pids(name).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in pids(name) {
        let _ = kill(p, Signal::SIGKILL);
    }
}

/// A network namespace of ours, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `PREFIX + short` with its loopback up.
    pub fn create(short: &str) -> Result<Netns> {
        let name = format!("{PREFIX}{short}");
        run_args("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec <ns> program`, to be completed by the caller.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args…` in the namespace; see [`run`].
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        run(self.command(program).args(args))
    }

    /// The namespace's `Udp6InCsumErrors` counter: IPv6 UDP datagrams its stack refused
    /// for a wrong checksum.
    pub fn udp6_checksum_errors(&self) -> Result<u64> {
        let snmp6 = self.exec("cat", &["/proc/net/snmp6"])?;
        snmp6
            .lines()
            .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
            .and_then(|v| v.trim().parse().ok())
            .context("no Udp6InCsumErrors in /proc/net/snmp6")
    }

    /// `ip -n <ns> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Sets a sysctl of this namespace (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-q", "-w", &format!("{key}={value}")])
            .map(drop)
    }

    /// Loads an nftables ruleset into the namespace.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        run_with_input(self.command("nft").args(["-f", "-"]), ruleset).map(drop)
    }

    /// Starts `program args…` in the namespace with stdout and stderr appended to `log`.
    pub fn spawn(
        &self,
        label: &str,
        program: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Daemon> {
        let mut cmd = self.command(program);
        cmd.args(args).envs(envs.iter().copied());
        Daemon::spawn(label, cmd, log)
    }

    /// Runs `f` on a new thread that has entered this namespace, and waits for it. Sockets
    /// `f` opens belong to the namespace for their whole life, wherever they are used later.
    pub fn run_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.spawn_thread(f)?
            .join()
            .map_err(|_| anyhow::anyhow!("a thread in {} panicked", self.name))?
    }

    /// Starts `f` on a new thread that has entered this namespace.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<std::thread::JoinHandle<Result<T>>> {
        let handle = Path::new(NETNS_DIR).join(&self.name);
        let ns = File::open(&handle).with_context(|| format!("opening {}", handle.display()))?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("in-{}", self.name))
            .spawn(move || {
                // A network namespace is per thread: this thread alone moves.
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering namespace {name}"))?;
                f()
            })
            .context("starting a thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name, Duration::from_secs(2));
        if let Err(e) = run_args("ip", &["netns", "del", &self.name]) {
            eprintln!("interop: cannot delete namespace {}: {e:#}", self.name);
        }
    }
}

/// Adds a veth pair between two namespaces, with addresses (`a.b.c.d/len`), both ends up.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> Result<()> {
    run_args(
        "ip",
        &[
            "link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns",
            &b.name,
        ],
    )?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.ip(&["addr", "add", addr, "dev", ifname])?;
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A process of ours, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Daemon {
    label: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(label: &str, mut cmd: Command, log: &Path) -> Result<Daemon> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {label}: {cmd:?}"))?;
        Ok(Daemon {
            label: label.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit, then kills it. Returns
    /// its exit status and how long it took to exit.
    pub fn terminate(&mut self, grace: Duration) -> Option<(ExitStatus, Duration)> {
        let mut child = self.child.take()?;
        let start = Instant::now();
        if let Ok(Some(status)) = child.try_wait() {
            return Some((status, Duration::ZERO));
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        while start.elapsed() < grace {
            if let Ok(Some(status)) = child.try_wait() {
                return Some((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "interop: {} did not stop within {grace:?} of SIGTERM; killing it",
            self.label
        );
        let _ = child.kill();
        child.wait().ok().map(|s| (s, start.elapsed()))
    }

    /// Kills the process with SIGKILL (no clean-up of its own can run) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// CPU time (user and system) the process has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        self.pid().map_or(0.0, |p| cpu_seconds(&p.to_string()))
    }
}

/// CPU time (user and system, all threads) process `pid` ("self" for this one) has used,
/// in seconds; 0 if it cannot be read.
pub fn cpu_seconds(pid: &str) -> f64 {
    // USER_HZ, the unit of /proc/<pid>/stat times, is 100 on every Linux ABI.
    const TICKS_PER_SECOND: f64 = 100.0;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // utime and stime are the 14th and 15th fields; the command name (2nd) may hold spaces
    // but ends at the last ')'.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / TICKS_PER_SECOND
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(3));
    }
}

/// The last `lines` lines of a file, or a note that it cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("({}: {e})", path.display()),
    }
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}
