//! The node as systemd runs it (`Type=notify`, `WatchdogSec=`): readiness, reloads and stops
//! told to the service manager, watchdog pings only while every worker keeps publishing, and
//! `/healthz` and `/readyz` telling the truth about a stalled worker. The service manager is
//! played by a Unix datagram socket in `NOTIFY_SOCKET`; a worker is stalled for real by
//! stopping its thread alone with ptrace.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use wraithgate_testkit::workspace_command;

struct Node {
    child: Child,
    api: String,
    notify: UnixDatagram,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `wraithgate run` with two workers, told to notify `NOTIFY_SOCKET` and to keep a
/// watchdog of `watchdog`.
fn start(tag: &str, watchdog: Duration) -> Node {
    let dir = std::env::temp_dir().join(format!(
        "wg-service-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&sock).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let api = format!("127.0.0.1:{}", free_tcp_port());
    let conf = dir.join("node.toml");
    std::fs::write(
        &conf,
        format!(
            "[relay]\nlisten = [\"127.0.0.1:0\"]\nworkers = 2\n\
             [control]\napi_listen = \"{api}\"\nstate_dir = \"{}\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let child = workspace_command(env!("CARGO_BIN_EXE_wraithgate"))
        .args(["run", "--config"])
        .arg(&conf)
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("node.log")).unwrap())
        .spawn()
        .unwrap();
    Node {
        child,
        api,
        notify,
        dir,
    }
}

impl Node {
    /// Messages the node sent the service manager within `within`.
    fn messages(&self, within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.notify.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }

    /// Waits for a message containing `what`; returns everything received up to it.
    fn wait_for(&self, what: &str, within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = m.lines().any(|l| l == what);
                seen.push(m);
                if found {
                    return seen;
                }
            }
        }
        panic!(
            "no {what} within {within:?}; got {seen:?}; log:\n{}",
            std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
        );
    }

    fn get(&self, path: &str) -> (u16, String) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let r = agent
            .get(format!("http://{}{path}", self.api))
            .call()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.into_body().read_to_string().unwrap_or_default())
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

fn pings(messages: &[String]) -> usize {
    messages
        .iter()
        .flat_map(|m| m.lines())
        .filter(|l| *l == "WATCHDOG=1")
        .count()
}

#[test]
fn the_service_manager_hears_ready_watchdog_reloading_and_stopping() {
    let mut node = start("notify", Duration::from_millis(400));
    let first = node.wait_for("READY=1", Duration::from_secs(20));
    assert!(
        first.iter().any(|m| m.contains("STATUS=forwarding")),
        "{first:?}"
    );
    // Half the watchdog period: about four pings in a second.
    let n = pings(&node.messages(Duration::from_secs(1)));
    assert!((2..=8).contains(&n), "{n} watchdog pings in a second");
    assert_eq!(node.get("/healthz"), (200, "ok\n".into()));
    assert_eq!(node.get("/readyz"), (200, "ready\n".into()));

    node.signal(libc::SIGHUP);
    let reload = node.wait_for("RELOADING=1", Duration::from_secs(5));
    assert!(
        reload.last().is_some_and(|m| m.contains("MONOTONIC_USEC=")),
        "a reload tells its time: {reload:?}"
    );
    node.wait_for("READY=1", Duration::from_secs(5));

    node.signal(libc::SIGTERM);
    node.wait_for("STOPPING=1", Duration::from_secs(10));
    let status = node.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The thread id of worker `i` of process `pid`, by its name.
fn worker_tid(pid: u32, i: usize) -> Option<i32> {
    let name = format!("wg-worker-{i}");
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
}

/// A thread stopped on its own by ptrace (the rest of the process runs on); resumed on drop.
struct Stopped(i32);

impl Stopped {
    fn stop(tid: i32) -> Stopped {
        // SAFETY: PTRACE_SEIZE/INTERRUPT on a thread of our child process; no memory is
        // passed. The tracee stops alone: ptrace stops threads, not processes.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
                0,
                "PTRACE_SEIZE: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0), 0);
            let mut status = 0;
            assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        }
        Stopped(tid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: detaching a thread we seized resumes it; no memory is passed.
        unsafe {
            libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0);
        }
    }
}

fn may_skip(test: &str, why: &str) -> bool {
    assert!(
        std::env::var_os("WRAITHGATE_REQUIRE_ALL_TESTS").is_none()
            || std::env::var_os("WRAITHGATE_UNDER_QEMU").is_some_and(|v| v == "1"),
        "{test} cannot run: {why}; WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping"
    );
    eprintln!("SKIPPED {test}: {why}");
    true
}

#[test]
fn a_stalled_worker_fails_healthz_and_readyz_and_stops_the_watchdog() {
    let test = "a_stalled_worker_fails_healthz_and_readyz_and_stops_the_watchdog";
    if std::env::var_os("WRAITHGATE_UNDER_QEMU").is_some_and(|v| v == "1")
        && may_skip(
            test,
            "qemu-user threads cannot be stopped one by one with ptrace",
        )
    {
        return;
    }
    let node = start("stall", Duration::from_millis(400));
    node.wait_for("READY=1", Duration::from_secs(20));
    let Some(tid) = worker_tid(node.child.id(), 1) else {
        panic!(
            "no thread named wg-worker-1 in /proc/{}/task",
            node.child.id()
        );
    };
    assert_eq!(node.get("/healthz").0, 200);
    let stopped = Stopped::stop(tid);
    // The stall counts after two seconds without a report.
    std::thread::sleep(Duration::from_millis(2_500));
    let (status, body) = node.get("/healthz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("[1]"), "the stalled worker is named: {body}");
    assert_eq!(node.get("/readyz").0, 503);
    let _ = node.messages(Duration::from_millis(300));
    assert_eq!(
        pings(&node.messages(Duration::from_secs(1))),
        0,
        "watchdog pings while a worker is stalled"
    );
    drop(stopped);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(node.get("/healthz"), (200, "ok\n".into()));
    assert!(
        pings(&node.messages(Duration::from_secs(1))) > 0,
        "pings resumed"
    );
    let log = std::fs::read_to_string(node.dir.join("node.log")).unwrap_or_default();
    assert!(
        log.contains("withholding the systemd watchdog ping"),
        "the log says why:\n{log}"
    );
}
