//! The test networks, and cleaning them up whatever happens.
//!
//! `netns`: three namespaces joined by veth pairs, addressed from 198.18.0.0/15 (RFC 2544's
//! benchmarking range), so nothing here can collide with a real network:
//!
//! ```text
//!  <prefix>-client            <prefix>-relay                 <prefix>-exit
//!  198.19.0.0/16 (flows,      <p>-c1 198.18.1.2 ─ listen     <p>-e0 198.18.2.2:52000 (sink)
//!  local on lo)               <p>-e1 198.18.2.1
//!  <p>-c0 198.18.1.1 ──veth── <p>-c1        <p>-e1 ──veth── <p>-e0
//! ```
//!
//! By default a packet's receive processing runs on the CPU that sent it into the veth (the
//! generator's for client → relay, the relay's for relay → exit). With `rps` the relay
//! namespace's ingress veth steers it to the relay's CPUs instead, as a NIC's interrupts
//! would; a flood then starves a userspace relay of its own CPU (receive livelock), which
//! measures the livelock rather than the relay, so it is off unless asked for.
//!
//! `loopback`: one namespace with only `lo`; relay on 127.0.0.1, sink on 127.0.0.2, flows
//! from 127.1.0.0/16. `host`: the current namespace (no root needed, used by the criterion
//! benches), on 127.77.0.1/127.77.0.2 with flows from 127.78.0.0/16 and an ephemeral client
//! port, so it does not collide with other programs on the machine.
//!
//! Everything created is registered in [`Cleanup`], run by a drop guard (normal exit,
//! error, panic) and by the SIGINT/SIGTERM handler.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Netns,
    Loopback,
    Host,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Netns => "netns",
            Kind::Loopback => "loopback",
            Kind::Host => "host",
        }
    }
}

/// A built topology; dropping it tears it down.
#[derive(Debug)]
pub struct Topology {
    pub kind: Kind,
    pub client_ns: Option<String>,
    pub relay_ns: Option<String>,
    pub exit_ns: Option<String>,
    /// The relay's client-facing address.
    pub relay_listen: SocketAddrV4,
    /// The relay's address towards the exit (for SNAT).
    pub relay_exit_side: Ipv4Addr,
    /// The exit (sink) address.
    pub exit: SocketAddrV4,
    /// The relay namespace's interface towards the exit (netns only): every datagram a
    /// relay forwards to the exit leaves through it.
    pub relay_exit_dev: Option<String>,
    source_base: Ipv4Addr,
}

impl Topology {
    /// The generator's UDP port: fixed in our own namespaces, ephemeral on the host.
    pub fn client_port(&self) -> u16 {
        if self.kind == Kind::Host {
            0
        } else {
            40_000
        }
    }
}

/// Namespaces, processes and files to remove; shared with the signal handler.
#[derive(Debug, Default)]
pub struct Cleanup {
    pub namespaces: Vec<String>,
    /// Process groups of the contenders we started.
    pub process_groups: Vec<i32>,
    pub files: Vec<PathBuf>,
}

pub static CLEANUP: Mutex<Cleanup> = Mutex::new(Cleanup {
    namespaces: Vec::new(),
    process_groups: Vec::new(),
    files: Vec::new(),
});

/// Kills what we started and deletes what we created. Idempotent.
pub fn cleanup_all() {
    let c = match CLEANUP.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    for pg in c.process_groups {
        kill_group(pg);
    }
    for ns in c.namespaces.iter().rev() {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(std::process::Stdio::null())
            .status();
    }
    for f in c.files {
        let _ = std::fs::remove_file(&f).or_else(|_| std::fs::remove_dir_all(&f));
    }
}

/// SIGTERM a process group, then SIGKILL it if it is still there after a second.
pub fn kill_group(pgid: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    for _ in 0..100 {
        // SAFETY: as above; signal 0 only checks for existence.
        if unsafe { libc::kill(-pgid, 0) } != 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

/// Installs the SIGINT/SIGTERM handler: clean up, then exit 130.
pub fn install_signal_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("relay-bench: interrupted, cleaning up");
        cleanup_all();
        std::process::exit(130);
    })
    .context("install signal handler")
}

/// Runs `cleanup_all` when dropped (also while unwinding from a panic).
#[derive(Debug)]
pub struct CleanupGuard;

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        cleanup_all();
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn register_ns(name: &str) {
    CLEANUP
        .lock()
        .expect("cleanup lock is never poisoned while held briefly")
        .namespaces
        .push(name.to_string());
}

/// A CPU list like "1" or "0-1" as the hex mask `rps_cpus` wants.
fn cpu_mask(cpus: &str) -> String {
    let mut mask = 0u64;
    for part in cpus.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
            for c in a..=b.min(63) {
                mask |= 1 << c;
            }
        }
    }
    format!("{mask:x}")
}

impl Topology {
    /// Builds a topology. With `rps`, receive processing in the relay namespace is steered
    /// to the relay CPUs and in the exit namespace to the load CPU (netns only).
    pub fn build(kind: Kind, prefix: &str, rps: Option<(&str, usize)>) -> Result<Self> {
        match kind {
            // Shared with whatever else runs on this machine: addresses of our own in
            // 127.0.0.0/8 so nothing listening on 127.0.0.1 collides with us.
            Kind::Host => Ok(Topology {
                kind,
                client_ns: None,
                relay_ns: None,
                exit_ns: None,
                relay_listen: SocketAddrV4::new(Ipv4Addr::new(127, 77, 0, 1), 51820),
                relay_exit_side: Ipv4Addr::new(127, 77, 0, 1),
                exit: SocketAddrV4::new(Ipv4Addr::new(127, 77, 0, 2), 52000),
                relay_exit_dev: None,
                source_base: Ipv4Addr::new(127, 78, 0, 0),
            }),
            Kind::Loopback => {
                let ns = format!("{prefix}-lo");
                remove_stale(&[&ns]);
                run(&["ip", "netns", "add", &ns])?;
                register_ns(&ns);
                run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
                Ok(Topology {
                    kind,
                    client_ns: Some(ns.clone()),
                    relay_ns: Some(ns.clone()),
                    exit_ns: Some(ns),
                    relay_listen: SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 51820),
                    relay_exit_side: Ipv4Addr::new(127, 0, 0, 1),
                    exit: SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2), 52000),
                    relay_exit_dev: None,
                    source_base: Ipv4Addr::new(127, 1, 0, 0),
                })
            }
            Kind::Netns => {
                let (c, r, e) = (
                    format!("{prefix}-client"),
                    format!("{prefix}-relay"),
                    format!("{prefix}-exit"),
                );
                remove_stale(&[&c, &r, &e]);
                for ns in [&c, &r, &e] {
                    run(&["ip", "netns", "add", ns])?;
                    register_ns(ns);
                    run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
                }
                let (c0, c1, e1, e0) = (
                    format!("{prefix}-c0"),
                    format!("{prefix}-c1"),
                    format!("{prefix}-e1"),
                    format!("{prefix}-e0"),
                );
                run(&[
                    "ip", "link", "add", &c0, "netns", &c, "type", "veth", "peer", "name", &c1,
                    "netns", &r,
                ])?;
                run(&[
                    "ip", "link", "add", &e1, "netns", &r, "type", "veth", "peer", "name", &e0,
                    "netns", &e,
                ])?;
                run(&["ip", "-n", &c, "addr", "add", "198.18.1.1/24", "dev", &c0])?;
                run(&["ip", "-n", &r, "addr", "add", "198.18.1.2/24", "dev", &c1])?;
                run(&["ip", "-n", &r, "addr", "add", "198.18.2.1/24", "dev", &e1])?;
                run(&["ip", "-n", &e, "addr", "add", "198.18.2.2/24", "dev", &e0])?;
                for (ns, dev) in [(&c, &c0), (&r, &c1), (&r, &e1), (&e, &e0)] {
                    run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
                }
                run(&[
                    "ip",
                    "-n",
                    &c,
                    "route",
                    "add",
                    "default",
                    "via",
                    "198.18.1.2",
                ])?;
                run(&[
                    "ip",
                    "-n",
                    &c,
                    "route",
                    "add",
                    "local",
                    "198.19.0.0/16",
                    "dev",
                    "lo",
                ])?;
                run(&[
                    "ip",
                    "-n",
                    &r,
                    "route",
                    "add",
                    "198.19.0.0/16",
                    "via",
                    "198.18.1.1",
                ])?;
                run(&[
                    "ip",
                    "-n",
                    &e,
                    "route",
                    "add",
                    "default",
                    "via",
                    "198.18.2.1",
                ])?;
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &r,
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                ])?;
                let steer = |ns: &str, dev: &str, mask: &str| {
                    let cmd = format!("echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus");
                    run(&["ip", "netns", "exec", ns, "sh", "-c", &cmd])
                };
                if let Some((relay_cpus, load_cpu)) = rps {
                    steer(&r, &c1, &cpu_mask(relay_cpus))?;
                    steer(&e, &e0, &cpu_mask(&load_cpu.to_string()))?;
                }
                Ok(Topology {
                    kind,
                    client_ns: Some(c),
                    relay_ns: Some(r),
                    exit_ns: Some(e),
                    relay_listen: SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), 51820),
                    relay_exit_side: Ipv4Addr::new(198, 18, 2, 1),
                    exit: SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 2), 52000),
                    relay_exit_dev: Some(e1),
                    source_base: Ipv4Addr::new(198, 19, 0, 0),
                })
            }
        }
    }

    /// The source address of flow `i` (one address per flow, so per-source handshake rate
    /// limits apply per flow, as they would to distinct clients).
    pub fn source(&self, i: usize) -> Ipv4Addr {
        let base = u32::from(self.source_base);
        Ipv4Addr::from(base + ((i / 250) as u32) * 256 + (i % 250) as u32 + 1)
    }

    pub fn netns_path(ns: &Option<String>) -> Option<PathBuf> {
        ns.as_ref()
            .map(|n| PathBuf::from(format!("/var/run/netns/{n}")))
    }

    /// Argument prefix that runs a command in the relay's namespace.
    pub fn relay_exec(&self) -> Vec<String> {
        match &self.relay_ns {
            Some(ns) => vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()],
            None => Vec::new(),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut names: Vec<String> = [&self.client_ns, &self.relay_ns, &self.exit_ns]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        names.dedup();
        for ns in &names {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if let Ok(mut c) = CLEANUP.lock() {
            c.namespaces.retain(|n| !names.contains(n));
        }
    }
}

/// Deletes namespaces left by an earlier run that was killed with SIGKILL.
fn remove_stale(names: &[&str]) {
    for ns in names {
        if std::path::Path::new(&format!("/var/run/netns/{ns}")).exists() {
            eprintln!("relay-bench: removing stale namespace {ns}");
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_sources() {
        assert_eq!(cpu_mask("1"), "2");
        assert_eq!(cpu_mask("0-1"), "3");
        assert_eq!(cpu_mask("0,2"), "5");
        let t = Topology::build(Kind::Host, "rb", None).unwrap();
        assert_eq!(t.source(0), Ipv4Addr::new(127, 78, 0, 1));
        assert_eq!(t.source(250), Ipv4Addr::new(127, 78, 1, 1));
        assert_eq!(t.source(999), Ipv4Addr::new(127, 78, 3, 250));
    }

    #[test]
    fn netns_topology_builds_and_cleans_up_needs_root() {
        if !is_root() {
            assert!(
                std::env::var_os("WRAITHGATE_REQUIRE_ALL_TESTS").is_none(),
                "netns_topology_builds_and_cleans_up_needs_root needs root"
            );
            eprintln!("SKIPPED netns_topology_builds_and_cleans_up_needs_root: not root");
            return;
        }
        let prefix = format!("rbt{}", std::process::id() % 10_000);
        {
            let t = Topology::build(Kind::Netns, &prefix, Some(("1", 0))).unwrap();
            assert!(std::path::Path::new(&format!("/var/run/netns/{prefix}-relay")).exists());
            let ok = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    t.client_ns.as_deref().unwrap(),
                    "ping",
                    "-c1",
                    "-W1",
                    "198.18.2.2",
                ])
                .output()
                .map(|o| o.status.success());
            // ping may not be installed; only the cleanup is asserted.
            let _ = ok;
        }
        assert!(!std::path::Path::new(&format!("/var/run/netns/{prefix}-relay")).exists());
    }
}
