//! Issue 6: "namespaces and processes are cleaned up even when a test fails or is
//! interrupted". A failing test tears its lab down while it unwinds (`Netns` and `Daemon`
//! drop); this checks the other half: a run killed from outside.
//!
//! A child process (this very test binary, running only `lab_held_until_interrupted`)
//! builds the whole interop lab (seven namespaces, four wireguard-go endpoints, the relay,
//! iperf3 servers) and waits. It is then interrupted as a developer's Ctrl-C (SIGINT) and as
//! a CI timeout (SIGTERM) would interrupt it, and must leave no namespace and no process of
//! the lab behind.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use wraithgate_tests::interop::{prerequisites_or_skip, Lab};
use wraithgate_tests::netns::{our_namespaces, pids_in, INTERRUPTED_EXIT_CODE};

const READY: &str = "lab ready; waiting to be interrupted";
const CHILD: &str = "lab_held_until_interrupted";

#[test]
fn netns_interop_interrupted_run_leaves_nothing_behind() {
    const TEST: &str = "netns_interop_interrupted_run_leaves_nothing_behind";
    if !prerequisites_or_skip(TEST) {
        return;
    }
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        let (namespaces, pids) = interrupt_a_lab(signal);
        let left = our_namespaces().expect("listing namespaces");
        assert!(
            left.is_empty(),
            "after {signal}: namespaces left behind: {left:?}"
        );
        let alive: Vec<Pid> = pids.iter().copied().filter(|&p| running(p)).collect();
        assert!(
            alive.is_empty(),
            "after {signal}: processes of the lab still running: {alive:?}"
        );
        eprintln!(
            "interop[{TEST}]: {signal}: {} namespaces and {} processes removed",
            namespaces.len(),
            pids.len()
        );
    }
}

/// Whether `pid` still runs: it exists and is not a zombie waiting for its new parent
/// (init) to reap it, which it was when the child lab exited.
fn running(pid: Pid) -> bool {
    if kill(pid, None) == Err(Errno::ESRCH) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Starts the child lab, waits until it is up, sends `signal`, and waits for the child to
/// exit as a cleaned-up run does. Returns the namespaces and processes the lab had.
fn interrupt_a_lab(signal: Signal) -> (Vec<String>, Vec<Pid>) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args([
            "--exact",
            CHILD,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting the child lab");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(READY) => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!("the child lab never came up ({e}); its stderr is above");
            }
        }
    }
    let namespaces = our_namespaces().expect("listing namespaces");
    let pids: Vec<Pid> = namespaces.iter().flat_map(|n| pids_in(n)).collect();
    assert!(
        namespaces.len() >= 7 && !pids.is_empty(),
        "the child lab should be up: namespaces {namespaces:?}, processes {pids:?}"
    );

    kill(Pid::from_raw(child.id() as i32), signal).expect("signalling the child");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the child lab did not exit within 60 s of {signal}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(INTERRUPTED_EXIT_CODE),
        "after {signal} the child should clean up and exit with {INTERRUPTED_EXIT_CODE}: \
         {status}"
    );
    (namespaces, pids)
}

/// The lab that `netns_interop_interrupted_run_leaves_nothing_behind` interrupts; on its
/// own it would wait forever.
#[test]
#[ignore = "run as a child by netns_interop_interrupted_run_leaves_nothing_behind"]
fn lab_held_until_interrupted() {
    let Some(_lab) = Lab::start_or_skip(CHILD) else {
        return;
    };
    println!("{READY}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
