//! The relays compared side by side, each started in the relay's place of a [`Topology`]
//! and stopped afterwards.

use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use wraithgate_relay::PublicKey;

use crate::topology::{kill_group, Kind, Topology, CLEANUP};

/// One relay implementation under test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contender {
    /// No relay: the generator sends to the sink itself (in `netns`, routed by the relay
    /// namespace's kernel without NAT). The floor every relay's latency adds to.
    Direct,
    /// The `wraithgate` binary with one worker backend (`portable`, `uring`, …).
    WraithGate {
        binary: PathBuf,
        backend: String,
        /// Names a second build (`relay-bench --wraithgate-alt`): the contender is
        /// `wraithgate-<backend>-<label>`.
        label: Option<String>,
    },
    /// Kernel DNAT + SNAT (masquerade) with nftables: the Mullvad-style forwarder.
    Nftables,
    /// The naive tokio `recv_from`/`send_to` relay in this crate (`relay-bench naive-relay`).
    NaiveTokio,
    /// `socat UDP4-LISTEN,fork` to the exit.
    Socat,
    /// nginx `stream` module UDP proxy.
    Nginx,
}

impl Contender {
    pub fn name(&self) -> String {
        match self {
            Contender::WraithGate {
                backend,
                label: None,
                ..
            } => format!("wraithgate-{backend}"),
            Contender::WraithGate {
                backend,
                label: Some(label),
                ..
            } => format!("wraithgate-{backend}-{label}"),
            Contender::Direct => "direct".into(),
            Contender::Nftables => "nftables".into(),
            Contender::NaiveTokio => "naive-tokio".into(),
            Contender::Socat => "socat".into(),
            Contender::Nginx => "nginx".into(),
        }
    }

    /// Parses a contender name as printed by [`Contender::name`]; `alt` is the second
    /// build and its label, if any (`wraithgate-<backend>-<label>` runs it).
    pub fn parse(name: &str, wraithgate: &Path, alt: Option<(&Path, &str)>) -> Result<Self> {
        if let (Some(rest), Some((binary, label))) = (name.strip_prefix("wraithgate-"), alt) {
            if let Some(backend) = rest.strip_suffix(&format!("-{label}")) {
                return Ok(Contender::WraithGate {
                    binary: binary.to_path_buf(),
                    backend: backend.to_string(),
                    label: Some(label.to_string()),
                });
            }
        }
        Ok(match name {
            "direct" => Contender::Direct,
            "nftables" => Contender::Nftables,
            "naive-tokio" | "naive" => Contender::NaiveTokio,
            "socat" => Contender::Socat,
            "nginx" => Contender::Nginx,
            other => match other.strip_prefix("wraithgate-") {
                Some(backend) => Contender::WraithGate {
                    binary: wraithgate.to_path_buf(),
                    backend: backend.to_string(),
                    label: None,
                },
                None => bail!("unknown contender {other:?}"),
            },
        })
    }

    /// Why this contender cannot run here, if it cannot.
    pub fn unavailable(&self, topo: &Topology) -> Option<String> {
        let needs = |prog: &str| -> Option<String> {
            (!program_exists(prog)).then(|| format!("`{prog}` not installed"))
        };
        match self {
            Contender::WraithGate { binary, .. } if !binary.exists() => {
                Some(format!("{} not built", binary.display()))
            }
            Contender::WraithGate { .. } => self
                .uring_unavailable()
                .map(|e| format!("io_uring cannot run here: {e}")),
            Contender::Nftables if topo.kind == Kind::Host => {
                Some("needs its own namespace (would change the host's ruleset)".into())
            }
            Contender::Nftables => needs("nft"),
            Contender::Direct | Contender::NaiveTokio => None,
            Contender::Socat => needs("socat"),
            Contender::Nginx => needs("nginx").or_else(|| {
                (!Path::new(NGINX_STREAM_MODULE).exists())
                    .then(|| "libnginx-mod-stream not installed".to_string())
            }),
        }
    }

    /// For WraithGate's io_uring backend: why io_uring cannot run on this machine (the
    /// same probe the node runs), if it cannot. `None` for every other contender.
    pub fn uring_unavailable(&self) -> Option<wraithgate_relay::io::UringUnavailable> {
        match self {
            Contender::WraithGate { backend, .. } if backend.split('@').next() == Some("uring") => {
                wraithgate_relay::io::uring::probe().err()
            }
            _ => None,
        }
    }

    /// Asks the `wraithgate` binary whether it accepts this contender's configuration
    /// (`run --check`), so a backend it does not have yet is skipped, not failed.
    pub fn probe(&self, workdir: &Path) -> Option<String> {
        let Contender::WraithGate {
            binary, backend, ..
        } = self
        else {
            return None;
        };
        let conf = workdir.join(format!("probe-{}.toml", self.name()));
        let text = wraithgate_config(
            "127.0.0.1:51820",
            1,
            backend,
            &PublicKey([1; 32]),
            "127.0.0.2:52000",
            &workdir.join("probe-state"),
        );
        if let Err(e) = std::fs::write(&conf, text) {
            return Some(format!("write {}: {e}", conf.display()));
        }
        let out = Command::new(binary)
            .args(["run", "--check", "--config"])
            .arg(&conf)
            .output();
        match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(format!(
                "refused by {}: {}",
                binary.display(),
                String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .rsplit(": ")
                    .next()
                    .unwrap_or("")
            )),
            Err(e) => Some(format!("{}: {e}", binary.display())),
        }
    }

    /// Where the generator sends: the relay's listen address, or the sink for [`Direct`].
    ///
    /// [`Direct`]: Contender::Direct
    pub fn destination(&self, topo: &Topology) -> std::net::SocketAddrV4 {
        match self {
            Contender::Direct => topo.exit,
            _ => topo.relay_listen,
        }
    }

    /// Starts the contender so that datagrams to [`Contender::destination`] reach
    /// `topo.exit`.
    pub fn start(
        &self,
        topo: &Topology,
        exit_key: &PublicKey,
        relay_cpus: &str,
        workdir: &Path,
    ) -> Result<Running> {
        let listen = topo.relay_listen;
        let exit = topo.exit;
        let workers = cpu_count(relay_cpus);
        let name = self.name();
        let log = workdir.join(format!("{name}.log"));
        match self {
            Contender::Direct => Ok(Running {
                name,
                child: None,
                teardown: None,
            }),
            Contender::Nftables => {
                let ns = topo
                    .relay_ns
                    .as_deref()
                    .context("nftables needs a namespace")?;
                let mut rules = String::from("table ip relaybench {\n");
                let hook = if topo.kind == Kind::Loopback {
                    // Locally generated packets pass the output hook, not prerouting.
                    "output priority -100"
                } else {
                    "prerouting priority dstnat"
                };
                let _ = writeln!(
                    rules,
                    "  chain pre {{ type nat hook {hook}; ip daddr {} udp dport {} dnat to {}; }}",
                    listen.ip(),
                    listen.port(),
                    exit
                );
                let _ = writeln!(
                    rules,
                    "  chain post {{ type nat hook postrouting priority srcnat; ip daddr {} udp dport {} snat to {}; }}",
                    exit.ip(),
                    exit.port(),
                    topo.relay_exit_side
                );
                rules.push_str("}\n");
                let file = workdir.join("nftables.nft");
                std::fs::write(&file, rules)?;
                let out = Command::new("ip")
                    .args(["netns", "exec", ns, "nft", "-f"])
                    .arg(&file)
                    .output()?;
                if !out.status.success() {
                    bail!("nft -f: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                Ok(Running {
                    name,
                    child: None,
                    teardown: Some(vec![
                        "ip".into(),
                        "netns".into(),
                        "exec".into(),
                        ns.into(),
                        "nft".into(),
                        "delete".into(),
                        "table".into(),
                        "ip".into(),
                        "relaybench".into(),
                    ]),
                })
            }
            Contender::NaiveTokio => {
                // The harness binary itself, or (from a criterion bench) the one cargo built.
                let exe = std::env::var_os("RB_NAIVE_EXE")
                    .map(PathBuf::from)
                    .map_or_else(std::env::current_exe, Ok)?;
                let args = vec![
                    exe.display().to_string(),
                    "naive-relay".into(),
                    "--listen".into(),
                    listen.to_string(),
                    "--exit".into(),
                    exit.to_string(),
                    "--threads".into(),
                    workers.to_string(),
                ];
                spawn(topo, relay_cpus, &name, &args, &log, listen.port())
            }
            Contender::Socat => {
                let args = vec![
                    "socat".into(),
                    "-b".into(),
                    "65536".into(),
                    "-T".into(),
                    "120".into(),
                    format!(
                        "UDP4-LISTEN:{},bind={},fork,reuseaddr,rcvbuf=8388608",
                        listen.port(),
                        listen.ip()
                    ),
                    format!("UDP4:{exit},sndbuf=8388608"),
                ];
                spawn(topo, relay_cpus, &name, &args, &log, listen.port())
            }
            Contender::Nginx => {
                let conf = workdir.join("nginx.conf");
                let text = format!(
                    "load_module {NGINX_STREAM_MODULE};\n\
                     daemon off;\nmaster_process on;\nworker_processes {workers};\n\
                     pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
                     events {{ worker_connections 65536; }}\n\
                     stream {{\n  server {{\n    listen {listen} udp reuseport;\n    \
                     proxy_pass {exit};\n    proxy_timeout 120s;\n  }}\n}}\n",
                    dir = workdir.display(),
                );
                std::fs::write(&conf, text)?;
                let args = vec![
                    "nginx".into(),
                    "-c".into(),
                    conf.display().to_string(),
                    "-p".into(),
                    workdir.display().to_string(),
                    "-e".into(),
                    workdir.join("nginx-error.log").display().to_string(),
                ];
                spawn(topo, relay_cpus, &name, &args, &log, listen.port())
            }
            Contender::WraithGate {
                binary, backend, ..
            } => {
                let conf = workdir.join(format!("{name}.toml"));
                // A fresh state directory each start: no exits or sessions carried over.
                let state = workdir.join(format!("{name}-state"));
                let _ = std::fs::remove_dir_all(&state);
                let text = wraithgate_config(
                    &listen.to_string(),
                    workers,
                    backend,
                    exit_key,
                    &exit.to_string(),
                    &state,
                );
                std::fs::write(&conf, text)?;
                let args = vec![
                    binary.display().to_string(),
                    "run".into(),
                    "--config".into(),
                    conf.display().to_string(),
                ];
                spawn(topo, relay_cpus, &name, &args, &log, listen.port())
            }
        }
    }
}

/// The pseudo-backend of the `wraithgate-fastpath` contender: `backend = "auto"` with
/// `fast_path = "auto"`.
pub const FAST_PATH: &str = "fastpath";

/// The node configuration WraithGate is started with: one exit, the harness's sink, no
/// operator API, and its own state directory (the node otherwise runs the exits persisted
/// in `/var/lib/wraithgate` by an earlier start, and restores that start's sessions).
pub fn wraithgate_config(
    listen: &str,
    workers: usize,
    backend: &str,
    exit_key: &PublicKey,
    exit: &str,
    state_dir: &Path,
) -> String {
    // `portable@socket_buffer=1048576@batch=64`: a backend with `[relay]` settings of its
    // own, so that variants of one backend run side by side as separate contenders.
    let mut parts = backend.split('@');
    let mut backend = parts.next().unwrap_or_default();
    let mut extra: String = parts
        .map(|kv| format!("{}\n", kv.replacen('=', " = ", 1)))
        .collect();
    // `fastpath`: the kernel fast path on the backend `auto` picks. It attaches to the
    // relay namespace's veths (netns, which forwards IPv4); on `lo` (loopback, host) it
    // cannot, says so in its log, and the cell measures the userspace path.
    if backend == FAST_PATH {
        backend = "auto";
        extra.push_str("fast_path = \"auto\"\n");
    }
    format!(
        "[relay]\nlisten = [\"{listen}\"]\nworkers = {workers}\nbackend = \"{backend}\"\n{extra}\n\
         [limits]\nmax_sessions = 65536\n\n\
         [control]\napi_enabled = false\nstate_dir = \"{}\"\n\n\
         [[exit]]\nname = \"sink\"\npublic_key = \"{}\"\nendpoint = \"{exit}\"\n",
        state_dir.display(),
        exit_key.to_base64()
    )
}

const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

fn program_exists(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(prog).is_file()))
}

/// Number of CPUs in a list like "1" or "0-1,3".
pub fn cpu_count(cpus: &str) -> usize {
    cpus.split(',')
        .map(|p| match p.split_once('-') {
            Some((a, b)) => {
                b.trim().parse::<usize>().unwrap_or(0) + 1 - a.trim().parse::<usize>().unwrap_or(0)
            }
            None => 1,
        })
        .sum::<usize>()
        .max(1)
}

/// A started contender; stop it with [`Running::stop`] (dropping it stops it too).
#[derive(Debug)]
pub struct Running {
    pub name: String,
    child: Option<Child>,
    teardown: Option<Vec<String>>,
}

impl Running {
    /// The contender's main process, for CPU accounting of its process tree.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as i32;
            kill_group(pgid);
            let _ = child.wait();
            if let Ok(mut c) = CLEANUP.lock() {
                c.process_groups.retain(|&g| g != pgid);
            }
        }
        if let Some(cmd) = self.teardown.take() {
            let _ = Command::new(&cmd[0]).args(&cmd[1..]).status();
        }
    }

    /// Fails if the process has exited (crashed or refused its configuration).
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                bail!("{} exited: {status}", self.name);
            }
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Spawns `args` in the relay namespace, pinned to `cpus`, in its own process group, and
/// waits until it has a UDP socket on `port`.
pub fn spawn(
    topo: &Topology,
    cpus: &str,
    name: &str,
    args: &[String],
    log: &Path,
    port: u16,
) -> Result<Running> {
    let mut full = topo.relay_exec();
    if program_exists("taskset") {
        full.extend(["taskset".into(), "-c".into(), cpus.into()]);
    }
    full.extend(args.iter().cloned());
    let logfile = std::fs::File::create(log)?;
    let mut cmd = Command::new(&full[0]);
    cmd.args(&full[1..])
        .stdin(Stdio::null())
        .stdout(logfile.try_clone()?)
        .stderr(logfile)
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", full.join(" ")))?;
    let pid = child.id();
    CLEANUP
        .lock()
        .expect("cleanup lock is never poisoned while held briefly")
        .process_groups
        .push(pid as i32);
    let mut running = Running {
        name: name.to_string(),
        child: Some(child),
        teardown: None,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Err(e) = running.check_alive() {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            bail!("{e}; log: {tail}");
        }
        if udp_port_open(pid, port) {
            return Ok(running);
        }
        if Instant::now() > deadline {
            bail!("{name} did not open UDP port {port} within 5 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the network namespace of `pid` has a UDP socket bound to `port`.
fn udp_port_open(pid: u32, port: u16) -> bool {
    let needle = format!(":{port:04X}");
    std::fs::read_to_string(format!("/proc/{pid}/net/udp"))
        .map(|t| {
            t.lines().skip(1).any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(&needle))
            })
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let wg = Path::new("/x/wraithgate");
        for c in [
            Contender::Nftables,
            Contender::NaiveTokio,
            Contender::Socat,
            Contender::Nginx,
            Contender::WraithGate {
                binary: wg.into(),
                backend: "portable".into(),
                label: None,
            },
            Contender::WraithGate {
                binary: "/y/wraithgate".into(),
                backend: "uring@socket_buffer=1048576".into(),
                label: Some("before".into()),
            },
        ] {
            let alt = Some((Path::new("/y/wraithgate"), "before"));
            assert_eq!(Contender::parse(&c.name(), wg, alt).unwrap(), c);
        }
        assert_eq!(cpu_count("1"), 1);
        assert_eq!(cpu_count("0-1"), 2);
    }

    #[test]
    fn wraithgate_config_is_the_documented_shape() {
        let text = wraithgate_config(
            "127.0.0.1:51820",
            1,
            "portable",
            &PublicKey([1; 32]),
            "127.0.0.2:52000",
            Path::new("/tmp/rb-state"),
        );
        assert!(text.contains("api_enabled = false"));
        assert!(text.contains("listen = [\"127.0.0.1:51820\"]"));
        assert!(text.contains("backend = \"portable\""));
        assert!(text.contains("[[exit]]"));
        assert!(text.contains("endpoint = \"127.0.0.2:52000\""));
        let text = wraithgate_config(
            "127.0.0.1:51820",
            1,
            "uring@socket_buffer=1048576@batch=64",
            &PublicKey([1; 32]),
            "127.0.0.2:52000",
            Path::new("/tmp/rb-state"),
        );
        assert!(text.contains("backend = \"uring\"\nsocket_buffer = 1048576\nbatch = 64\n"));
        let text = wraithgate_config(
            "127.0.0.1:51820",
            1,
            FAST_PATH,
            &PublicKey([1; 32]),
            "127.0.0.2:52000",
            Path::new("/tmp/s"),
        );
        assert!(
            text.contains("backend = \"auto\"\nfast_path = \"auto\"\n"),
            "{text}"
        );
    }
}
