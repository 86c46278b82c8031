//! The `wraithgate` binary as an operator uses it.

use std::io::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wraithgate_control::endpoints::{
    any_loopback, ipv4_udp, tunnel_addrs, udp_payload, KeyPair, PeerOptions, Received, WgNode,
};
use wraithgate_testkit::workspace_command;

fn bin() -> Command {
    workspace_command(env!("CARGO_BIN_EXE_wraithgate"))
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wraithgate-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("wraithgate.toml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(contents.as_bytes())
        .unwrap();
    path
}

#[test]
fn a_bad_config_stops_start_up_with_its_line() {
    let path = temp_file(
        "bad",
        "[relay]\nlisten = [\"127.0.0.1:0\"]\n\n[[exit]]\nname = \"x\"\npublic_key = \"tooshort\"\nendpoint = \"192.0.2.1:51820\"\n",
    );
    let out = bin().args(["run", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:6:", path.display())),
        "no file:line in {err}"
    );
    let missing = bin()
        .args(["run", "--config", "/nonexistent/wraithgate.toml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("cannot read /nonexistent/wraithgate.toml"));
}

#[test]
fn the_example_config_checks_out_and_help_explains() {
    let example = bin().arg("example-config").output().unwrap();
    assert!(example.status.success());
    let path = temp_file("example", &String::from_utf8(example.stdout).unwrap());
    let out = bin()
        .args(["run", "--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (1 exits"));
    let help = bin().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in ["--config", "--workers", "--backend", "--check"] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn demo_json_reports_traffic_through_the_relay() {
    let out = bin()
        .args([
            "demo",
            "--json",
            "--seconds",
            "1",
            "--clients",
            "2",
            "--rate-mbps",
            "20",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(v["handshakes"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["bytes_forwarded"].as_u64().unwrap() > 1_000_000, "{v}");
    assert!(v["gbps"].as_f64().unwrap() > 0.0);
    assert!(v["loss_percent"].as_f64().unwrap() < 10.0, "{v}");
    assert!(v["jitter_ms"].as_f64().is_some());
    let expected = match wraithgate_relay::io::uring::probe() {
        Ok(()) => "uring",
        Err(_) => "portable",
    };
    assert_eq!(
        v["backend"], expected,
        "auto picks io_uring exactly where it works"
    );
}

#[test]
fn run_forwards_between_real_endpoints_and_stops_on_sigterm() {
    let exit_keys = KeyPair::generate();
    let mut exit = WgNode::bind(any_loopback(), exit_keys.clone()).unwrap();
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relay: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let path = temp_file(
        "run",
        &format!(
            "[relay]\nlisten = [\"{relay}\"]\nworkers = 1\n\n[[exit]]\nname = \"x\"\npublic_key = \"{}\"\nendpoint = \"{}\"\n",
            exit_keys.relay_key(),
            exit.local_addr()
        ),
    );
    let state_dir = path.parent().unwrap().join("state");
    let child = bin()
        .args(["run", "--api-listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .arg("--state-dir")
        .arg(&state_dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit_keys.public,
        PeerOptions {
            endpoint: Some(relay),
            ..Default::default()
        },
    );
    let ep = exit.add_peer(client.keys().public, PeerOptions::default());
    let (s, d) = tunnel_addrs(1);
    let packet = ipv4_udp(s, d, 1, 2, b"through the binary");
    // The node may still be binding: resend until the exit hears it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = None;
    while got.is_none() && Instant::now() < deadline {
        let _ = client.send_ip(cp, &packet);
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until && got.is_none() {
            if let Ok(Some(Received::Packet { peer, data })) = exit.try_recv() {
                got = Some((peer, data));
            }
            let _ = client.try_recv();
        }
        if got.is_none() {
            client.initiate(cp).ok();
        }
    }
    let (peer, data) = got.expect("a packet crossed the relay binary");
    assert_eq!(peer, ep);
    assert_eq!(udp_payload(&data), Some(&b"through the binary"[..]));

    // Two datagrams of an unknown message type, to be counted by reason.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..2 {
        junk.send_to(&[9, 0, 0, 0, 0, 0, 0, 0], relay).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));

    // SIGTERM, as systemd sends it.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("relay running"), "{log}");
    assert!(log.contains("stopping"), "{log}");
    assert!(
        log.contains("unknown_type=2"),
        "drops by reason at stop: {log}"
    );
    // The state was seeded from the file, the token created private, the sessions saved.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["exits"][0]["name"], "x");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(state_dir.join("api.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("sessions.json")).unwrap()).unwrap();
    assert_eq!(saved["sessions"].as_array().unwrap().len(), 1, "{saved}");
}

/// The node's stderr, read as it comes.
struct Log(std::sync::Arc<std::sync::Mutex<String>>);

impl Log {
    fn follow(stderr: std::process::ChildStderr) -> Log {
        use std::io::BufRead as _;
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let t = text.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut t = t.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        Log(text)
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Waits until `count` lines contain `words`.
    fn wait_for(&self, words: &str, count: usize) -> String {
        wraithgate_testkit::wait_for(Duration::from_secs(10), || {
            std::thread::sleep(Duration::from_millis(20));
            let t = self.text();
            (t.lines().filter(|l| l.contains(words)).count() >= count).then_some(t)
        })
        .unwrap_or_else(|| panic!("no {count} lines with {words:?} in:\n{}", self.text()))
    }
}

/// Sends one packet from `client` through the relay until `exit` gets it.
fn crosses(client: &mut WgNode, cp: usize, exit: &mut WgNode, body: &[u8]) -> bool {
    let (s, d) = tunnel_addrs(1);
    let packet = ipv4_udp(s, d, 1, 2, body);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let _ = client.send_ip(cp, &packet);
        let until = Instant::now() + Duration::from_millis(200);
        while Instant::now() < until {
            if let Ok(Some(Received::Packet { data, .. })) = exit.try_recv() {
                if udp_payload(&data) == Some(body) {
                    return true;
                }
            }
            let _ = client.try_recv();
        }
        client.initiate(cp).ok();
    }
    false
}

/// A node process that a failing test does not leave behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &KillOnDrop, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sighup_reloads_the_configuration_and_a_broken_one_is_refused() {
    let exit_keys = KeyPair::generate();
    let mut exit = WgNode::bind(any_loopback(), exit_keys.clone()).unwrap();
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relay: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let exit_addr = exit.local_addr();
    let text = |filter: &str, max_pending: u32| {
        format!(
            "[relay]\nlisten = [\"{relay}\"]\nworkers = 1\n\n[limits]\nmax_pending = {max_pending}\n\n\
             [log]\nfilter = \"{filter}\"\n\n[[exit]]\nname = \"x\"\npublic_key = \"{}\"\nendpoint = \"{}\"\n",
            exit_keys.relay_key(),
            exit_addr
        )
    };
    let path = temp_file("hup", &text("info", 8192));
    let state_dir = path.parent().unwrap().join("state");
    let mut child = bin()
        .args(["run", "--no-api", "--config"])
        .arg(&path)
        .arg("--state-dir")
        .arg(&state_dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::follow(child.stderr.take().unwrap());
    let mut child = KillOnDrop(child);
    log.wait_for("relay running", 1);
    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit_keys.public,
        PeerOptions {
            endpoint: Some(relay),
            ..Default::default()
        },
    );
    exit.add_peer(client.keys().public, PeerOptions::default());
    assert!(crosses(&mut client, cp, &mut exit, b"before"));

    // A live change (the log filter: debug lines appear) and one that waits for a restart.
    std::fs::write(&path, text("debug", 4096)).unwrap();
    signal(&child, "-HUP");
    let t = log.wait_for("configuration reloaded", 1);
    let waiting = t
        .lines()
        .find(|l| l.contains("not applied"))
        .unwrap_or_else(|| panic!("no line names what waits for a restart:\n{t}"));
    assert!(waiting.contains("limits.max_pending"), "{waiting}");
    assert!(!waiting.contains("log.filter"), "{waiting}");
    assert!(crosses(&mut client, cp, &mut exit, b"after a reload"));
    log.wait_for("log filter in use filter=\"debug\"", 1);

    // A broken file: refused with its line, and the node runs on as it was.
    std::fs::write(
        &path,
        text("info", 4096).replace("max_pending = 4096", "max_pending = \"many\""),
    )
    .unwrap();
    signal(&child, "-HUP");
    let t = log.wait_for("configuration reload refused", 1);
    assert!(
        t.contains(&format!("{}:6:", path.display())),
        "no file:line in:\n{t}"
    );
    assert_eq!(t.matches("configuration reloaded").count(), 1, "{t}");
    assert!(crosses(
        &mut client,
        cp,
        &mut exit,
        b"after a refused reload"
    ));
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the node is still running"
    );

    signal(&child, "-TERM");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let t = log.wait_for("sessions saved", 1);
    // Not a terminal: no colour codes.
    assert!(
        !t.contains('\u{1b}'),
        "ANSI escapes in a log that is not a terminal:\n{t}"
    );
}

#[test]
fn bad_invocations_are_refused_with_one_clear_message() {
    // A missing file: its cause once.
    let out = bin()
        .args(["run", "--check", "--config", "/nonexistent/wraithgate.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    // An empty file does not pass --check.
    let empty = temp_file("empty", "\n# nothing yet\n");
    let out = bin()
        .args(["run", "--check", "--config"])
        .arg(&empty)
        .output()
        .unwrap();
    assert!(!out.status.success(), "an empty config passed --check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the file is empty"), "{err}");
    // A log filter that does not parse is an error, not `info`.
    let ok = temp_file("log", "[relay]\nlisten = [\"127.0.0.1:0\"]\n");
    let out = bin()
        .args(["--log", "wraithgate=blah[", "run", "--check", "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a bad --log was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--log \"wraithgate=blah[\" is not a log filter"),
        "{err}"
    );
    let out = bin()
        .args(["run", "--check", "--config"])
        .arg(&ok)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn log_format_json_writes_one_object_a_line() {
    let path = temp_file("json", "[relay]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n");
    let state_dir = path.parent().unwrap().join("state");
    let mut child = bin()
        .args(["--log-format", "json", "run", "--no-api", "--config"])
        .arg(&path)
        .arg("--state-dir")
        .arg(&state_dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::follow(child.stderr.take().unwrap());
    let mut child = KillOnDrop(child);
    log.wait_for("relay running", 1);
    signal(&child, "-TERM");
    assert!(child.0.wait().unwrap().success());
    let t = log.wait_for("sessions saved", 1);
    for line in t.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    assert!(t.contains("\"message\":\"relay running"), "{t}");
}

#[test]
fn an_api_on_a_non_loopback_address_without_tls_is_warned_about() {
    let path = temp_file(
        "plain",
        "[relay]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n",
    );
    let state_dir = path.parent().unwrap().join("state");
    // Each run until the API has logged its address, then the log so far.
    let run = |api: &str| {
        let mut child = bin()
            .args(["run", "--api-listen", api, "--config"])
            .arg(&path)
            .arg("--state-dir")
            .arg(&state_dir)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Log::follow(child.stderr.take().unwrap());
        let child = KillOnDrop(child);
        let t = log.wait_for("token_file=", 1);
        drop(child);
        t
    };
    let open = run("0.0.0.0:0");
    let warning = open
        .lines()
        .find(|l| l.contains("without TLS"))
        .unwrap_or_else(|| panic!("no warning for an API on 0.0.0.0 in clear:\n{open}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains("api=0.0.0.0:"),
        "names the address: {warning}"
    );
    assert!(
        warning.contains("api_tls = true"),
        "says what to do: {warning}"
    );
    let local = run("127.0.0.1:0");
    assert!(
        !local.contains("without TLS"),
        "loopback is not warned about:\n{local}"
    );
}
