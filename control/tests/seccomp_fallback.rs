//! io_uring blocked for real: a child process installs a seccomp filter that makes
//! `io_uring_setup` fail (EPERM as Docker's default profile does, ENOSYS as qemu-user
//! does), then runs the `wraithgate` binary, which inherits the filter. `auto` must pick the
//! portable backend, say why once, and still forward traffic; `uring` must refuse to start
//! with an error that names the cause.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Set in the re-executed test binary: the errno `io_uring_setup` must fail with.
const CHILD_ENV: &str = "WRAITHGATE_TEST_SECCOMP_ERRNO";

fn bin() -> Command {
    wraithgate_testkit::workspace_command(env!("CARGO_BIN_EXE_wraithgate"))
}

/// Makes `io_uring_setup` fail with `errno` for every thread of this process and every
/// process it starts from now on.
fn deny_io_uring_setup(errno: u32) {
    let arch = TargetArch::try_from(std::env::consts::ARCH).expect("a seccompiler architecture");
    let rules = BTreeMap::from([(libc::SYS_io_uring_setup, vec![])]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno),
        arch,
    )
    .expect("valid filter");
    let program: BpfProgram = filter.try_into().expect("filter compiles");
    seccompiler::apply_filter_all_threads(&program).expect("seccomp filter installs");
}

/// Runs `cmd` to completion within `limit`; kills it past that.
fn output_within(mut cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wraithgate");
    let end = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (status.and_then(|s| s.code()), out, err)
}

/// The child's side, run by [`run_child`] in a process of its own (the filter cannot be
/// removed once installed). Ignored in a normal run; run by hand without the parent it
/// fails, never passes vacuously.
#[test]
#[ignore = "the child of the seccomp tests: run by them with --ignored --exact"]
fn seccomp_child() {
    let errno = std::env::var(CHILD_ENV).unwrap_or_else(|_| {
        panic!("seccomp_child runs only as the child of the seccomp tests ({CHILD_ENV} unset)")
    });
    let errno: i32 = errno.parse().expect("an errno");
    deny_io_uring_setup(errno as u32);
    let probe = wraithgate_relay::io::uring::probe().expect_err("io_uring is blocked");
    assert_eq!(probe.error.raw_os_error(), Some(errno), "{probe}");

    // auto: the portable backend, one line saying why, and traffic through it.
    let mut demo = bin();
    demo.args([
        "--log",
        "warn",
        "demo",
        "--json",
        "--seconds",
        "1",
        "--clients",
        "2",
        "--backend",
        "auto",
    ]);
    let (code, out, err) = output_within(demo, Duration::from_secs(30));
    assert_eq!(code, Some(0), "demo failed:\n{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(report["backend"], "portable", "{report}");
    assert!(
        report["packets_forwarded"].as_u64().unwrap_or(0) > 100,
        "traffic flows on the fallback: {report}"
    );
    let why: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("falling back to the portable backend"))
        .collect();
    assert_eq!(why.len(), 1, "exactly one line says why:\n{err}");
    eprintln!("auto under seccomp logs: {}", why[0]);
    let reason = io::Error::from_raw_os_error(errno).to_string();
    assert!(
        why[0].contains("io_uring_setup") && why[0].contains(&reason),
        "{}",
        why[0]
    );

    // uring: refuses to start, naming the cause.
    let dir = std::env::temp_dir().join(format!("wraithgate-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("relay.toml");
    // Its own state directory and no API: nothing outside `dir` is touched.
    std::fs::write(
        &conf,
        format!(
            "[relay]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n\n\
             [control]\napi_enabled = false\nstate_dir = \"{}\"\n\n\
             [[exit]]\nname = \"x\"\n\
             public_key = \"HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\"\nendpoint = \"127.0.0.1:9\"\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let mut run = bin();
    run.args(["run", "--backend", "uring", "--config"])
        .arg(&conf);
    let (code, _, err) = output_within(run, Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("`run --backend uring` under seccomp says: {}", err.trim());
    assert_eq!(code, Some(1), "`--backend uring` must fail here:\n{err}");
    assert!(
        err.contains("io_uring") && err.contains(&reason),
        "the error names io_uring and the cause:\n{err}"
    );
}

fn run_child(errno: i32) {
    if std::env::var_os("WRAITHGATE_UNDER_QEMU").is_some_and(|v| v == "1") {
        // qemu-user passes seccomp filters to the host kernel, which sees the host's
        // architecture and syscall numbers, and cannot exec the aarch64 binary itself.
        eprintln!("SKIPPED: seccomp fallback test under qemu-user (no io_uring there anyway)");
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, errno.to_string())
        .output()
        .expect("re-run the test binary");
    assert!(
        out.status.success(),
        "child under seccomp failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // A filter that matched no test would succeed too: the child must have run.
    assert!(
        stdout.contains(" 1 passed;"),
        "the child test did not run:\n{stdout}"
    );
}

#[test]
fn auto_falls_back_to_portable_when_seccomp_denies_io_uring_with_eperm() {
    run_child(libc::EPERM);
}

#[test]
fn auto_falls_back_to_portable_when_io_uring_is_missing_enosys() {
    run_child(libc::ENOSYS);
}
