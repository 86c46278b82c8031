//! `wraithctl` against a real `wraithgate` node on loopback.
//!
//! The node binary belongs to another package (`wraithgate-control`), so Cargo does not
//! hand its path to these tests. [`wraithgate_bin`] asks Cargo for it: it runs
//! `cargo build -p wraithgate-control --bin wraithgate --message-format json` (a no-op
//! when it is up to date) and takes the executable's path from Cargo's own report, so the
//! binary is never stale and `CARGO_TARGET_DIR`, `--target-dir` or a custom profile
//! directory cannot mislead it. `WRAITHGATE_BIN=/path/to/wraithgate` skips the build.
//!
//! Each node runs with a state directory of its own under the system temp dir and
//! `--api-listen 127.0.0.1:0`; the test reads the bound API and relay addresses from the
//! node's start-up log.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use wraithgate_control::endpoints::{
    any_loopback, ipv4_udp, tunnel_addrs, udp_payload, KeyPair, PeerOptions, Received, WgNode,
};
use wraithgate_testkit::workspace_command;

/// The `wraithgate` binary, built by Cargo on first use.
fn wraithgate_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("WRAITHGATE_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        // Cargo sets these for the test process; build scripts that watch one of them
        // (ring's watches CARGO_MANIFEST_DIR) would rebuild for the nested build and
        // again for the next outer one.
        for (name, _) in std::env::vars_os() {
            let n = name.to_string_lossy();
            if n.starts_with("CARGO_PKG_")
                || n.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&n.as_ref())
            {
                build.env_remove(&name);
            }
        }
        let out = build
            .args([
                "build",
                "--quiet",
                "-p",
                "wraithgate-control",
                "--bin",
                "wraithgate",
                "--message-format",
                "json-render-diagnostics",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running cargo to build wraithgate");
        assert!(out.status.success(), "cargo build of wraithgate failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "wraithgate")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported no wraithgate executable")
    })
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("wraithctl-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `wraithgate run` node.
struct Node {
    child: Child,
    api: SocketAddr,
    relay: SocketAddr,
    dir: TempDir,
    log: Arc<Mutex<String>>,
}

impl Node {
    fn start(name: &str) -> Node {
        Node::start_with(name, "")
    }

    /// Starts a node whose configuration file ends with `extra` TOML.
    fn start_with(name: &str, extra: &str) -> Node {
        let dir = TempDir::new(name);
        let config = dir.0.join("node.toml");
        std::fs::write(
            &config,
            format!(
                "[relay]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\npin_workers = false\n{extra}"
            ),
        )
        .unwrap();
        let mut child = workspace_command(wraithgate_bin())
            .args(["run", "--api-listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.0.join("state"))
            .env("NO_COLOR", "1")
            .env("WRAITHGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting wraithgate");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            // Keeps draining so the node never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("relay running") {
                        let _ = tx.send(line.clone());
                    }
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("the node did not start:\n{}", log.lock().unwrap());
            }
        };
        // relay running; ... listen=[127.0.0.1:PORT] backend="portable" api=Some(127.0.0.1:PORT)
        let field = |start: &str, end: char| -> SocketAddr {
            let from = line
                .find(start)
                .unwrap_or_else(|| panic!("no {start} in {line}"))
                + start.len();
            let rest = &line[from..];
            rest[..rest.find(end).unwrap()].parse().unwrap()
        };
        let api = field("api=Some(", ')');
        let relay = field("listen=[", ']');
        Node {
            child,
            api,
            relay,
            dir,
            log,
        }
    }

    fn token_file(&self) -> PathBuf {
        self.dir.0.join("state").join("api.token")
    }

    fn state_file(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.0.join("state").join("state.json")).unwrap())
            .unwrap()
    }

    /// `wraithctl` aimed at this node.
    fn ctl(&self) -> Command {
        let mut c = wraithctl();
        c.arg("--url")
            .arg(format!("http://{}", self.api))
            .arg("--token-file")
            .arg(self.token_file());
        c
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::of(self.ctl().args(args))
    }

    /// Runs `args` with `--json` and parses what it prints.
    fn json(&self, args: &[&str]) -> Value {
        let r = self.run(&[&["--json"], args].concat());
        r.ok();
        serde_json::from_str(&r.stdout)
            .unwrap_or_else(|e| panic!("{args:?} --json printed no JSON ({e}):\n{}", r.stdout))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- node log ---\n{}", self.log.lock().unwrap());
        }
    }
}

/// `wraithctl` with none of its environment variables set.
fn wraithctl() -> Command {
    let mut c = workspace_command(env!("CARGO_BIN_EXE_wraithctl"));
    for v in ["WRAITHCTL_URL", "WRAITHCTL_SOCKET", "WRAITHCTL_TOKEN_FILE"] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

/// One finished `wraithctl` run.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(cmd: &mut Command) -> Run {
        let Output {
            status,
            stdout,
            stderr,
        } = cmd.output().expect("running wraithctl");
        Run {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }

    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(self.code, Some(0), "wraithctl failed: {self:#?}");
        self
    }

    #[track_caller]
    fn fails(&self, code: i32, says: &[&str]) -> &Self {
        assert_eq!(self.code, Some(code), "wrong exit status: {self:#?}");
        assert!(self.stdout.is_empty(), "printed on failure: {self:#?}");
        for s in says {
            assert!(self.stderr.contains(s), "stderr lacks {s:?}: {self:#?}");
        }
        self
    }
}

fn key() -> String {
    KeyPair::generate().relay_key().to_string()
}

/// A key in the API's path alphabet (base64url, unpadded).
fn url_safe(k: &str) -> String {
    k.replace('+', "-")
        .replace('/', "_")
        .trim_end_matches('=')
        .to_owned()
}

#[test]
fn exits_round_trip_by_key_and_by_name() {
    let node = Node::start("exits");
    assert_eq!(node.run(&["exit", "ls"]).ok().stdout, "no exits\n");
    let (k1, k2) = (key(), key());
    let added = node.run(&[
        "exit",
        "add",
        "exit-1",
        "--public-key",
        &k1,
        "--endpoint",
        "192.0.2.10:51820",
        "--listen-port",
        "51821",
    ]);
    assert!(
        added
            .ok()
            .stdout
            .contains(&format!("added exit exit-1 ({k1})")),
        "{added:?}"
    );
    node.run(&[
        "exit",
        "add",
        "exit-2",
        "--public-key",
        &k2,
        "--endpoint",
        "[2001:db8::1]:51820",
    ])
    .ok();

    let ls = node.run(&["exit", "ls"]);
    let lines: Vec<&str> = ls.ok().stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{ls:?}");
    assert!(lines[0].starts_with("NAME") && lines[0].contains("LISTEN PORT"));
    for (line, name, k, ep, port) in [
        (lines[1], "exit-1", &k1, "192.0.2.10:51820", "51821"),
        (lines[2], "exit-2", &k2, "[2001:db8::1]:51820", "-"),
    ] {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols, [name, k.as_str(), ep, port], "{line}");
    }

    // A duplicate is refused with the node's reason, and nothing changes.
    node.run(&[
        "exit",
        "add",
        "again",
        "--public-key",
        &k1,
        "--endpoint",
        "192.0.2.11:1",
    ])
    .fails(1, &["already exists", "409"]);
    // A malformed key never reaches the node.
    node.run(&[
        "exit",
        "add",
        "bad",
        "--public-key",
        "AAAA",
        "--endpoint",
        "192.0.2.11:1",
    ])
    .fails(2, &["not a WireGuard key"]);
    assert_eq!(node.json(&["exit", "ls"]).as_array().unwrap().len(), 2);

    // Removal by name, then by key in the URL alphabet.
    assert_eq!(
        node.run(&["exit", "rm", "exit-1"]).ok().stdout,
        format!("removed exit {k1}\n")
    );
    node.run(&["exit", "rm", &url_safe(&k2)]).ok();
    node.run(&["exit", "rm", "exit-1"])
        .fails(1, &["no exit is named \"exit-1\""]);
    node.run(&["exit", "rm", &k1]).fails(1, &["no exit", "404"]);
    assert_eq!(node.run(&["exit", "ls"]).ok().stdout, "no exits\n");
    // The file agrees: both additions and both removals were persisted.
    let state = node.state_file();
    assert_eq!(state["exits"], Value::Array(vec![]), "{state}");
    assert_eq!(state["generation"], 5, "{state}");
}

#[test]
fn peers_round_trip_with_exits_by_name_and_a_preshared_key() {
    let node = Node::start("peers");
    let (exit, peer, psk) = (key(), key(), key());
    node.run(&[
        "exit",
        "add",
        "e1",
        "--public-key",
        &exit,
        "--endpoint",
        "192.0.2.1:51820",
    ])
    .ok();
    let psk_file = node.dir.0.join("psk");
    std::fs::write(&psk_file, format!("{psk}\n")).unwrap();
    let added = node.json(&[
        "peer",
        "add",
        &peer,
        "--allowed-ips",
        "10.0.0.2/32,fd00::2",
        "--name",
        "alice",
        "--exit",
        "e1",
        "--preshared-key-file",
        psk_file.to_str().unwrap(),
        "--peer-endpoint",
        "192.0.2.9:51820",
        "--persistent-keepalive",
        "25",
    ]);
    assert_eq!(added["public_key"], peer.as_str());
    assert_eq!(added["allowed_exits"][0], exit.as_str());
    assert_eq!(added["endpoint"], "192.0.2.9:51820", "{added}");
    assert_eq!(added["persistent_keepalive"], 25, "{added}");
    assert_eq!(added["preshared_key"], "set", "{added}");
    assert!(
        !added.to_string().contains(&psk),
        "the node echoed the psk: {added}"
    );
    node.run(&[
        "peer",
        "add",
        &key(),
        "--allowed-ips",
        "10.0.0.9/32",
        "--peer-endpoint",
        "192.0.2.9:0",
    ])
    .fails(1, &["port 0", "400"]);

    let ls = node.run(&["peer", "ls"]);
    let row: Vec<&str> = ls
        .ok()
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        [peer.as_str(), "alice", "10.0.0.2/32,fd00::2/128", "e1"],
        "{ls:?}"
    );
    let listed = node.json(&["peer", "ls"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert!(!listed.to_string().contains(&psk), "psk listed: {listed}");
    // The psk was stored (the node keeps it in its state file, never shows it).
    assert_eq!(node.state_file()["peers"][0]["preshared_key"], psk.as_str());

    // An exit a peer may use cannot go; the node says why.
    node.run(&["exit", "rm", "e1"])
        .fails(1, &["allowed_exits", "409"]);
    node.run(&[
        "peer",
        "add",
        &key(),
        "--allowed-ips",
        "10.0.0.3/32",
        "--exit",
        "nope",
    ])
    .fails(1, &["no exit is named \"nope\""]);
    node.run(&["peer", "add", &key(), "--allowed-ips", "not-a-net"])
        .fails(1, &["not-a-net", "400"]);

    assert_eq!(
        node.run(&["peer", "rm", &peer]).ok().stdout,
        format!("removed peer {peer}\n")
    );
    node.run(&["peer", "rm", &peer])
        .fails(1, &["no peer", "404"]);
    assert_eq!(node.run(&["peer", "ls"]).ok().stdout, "no peers\n");
    node.run(&["exit", "rm", "e1"]).ok();
}

#[test]
fn config_apply_is_conditional_on_the_generation_it_was_fetched_at() {
    let node = Node::start("config");
    let get = node.run(&["config", "get"]);
    let mut doc: Value = serde_json::from_str(&get.ok().stdout).unwrap();
    let g0 = doc["generation"].as_u64().unwrap();
    let k = key();
    doc["exits"] =
        serde_json::json!([{"name": "from-file", "public_key": k, "endpoint": "192.0.2.7:51820"}]);
    let file = node.dir.0.join("edited.json");
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let f = file.to_str().unwrap();

    let applied = node.run(&["config", "apply", f]);
    assert_eq!(
        applied.ok().stdout,
        format!(
            "applied {f}: generation {g0} -> {} (1 exit, 0 peers):\n  exits added: from-file\n",
            g0 + 1
        )
    );
    let now = node.json(&["config", "get"]);
    assert_eq!(now["generation"], g0 + 1);
    assert_eq!(now["exits"][0]["name"], "from-file");

    // The same file again is based on a generation that has passed: refused, clearly,
    // with exit status 5, and nothing changes.
    node.run(&[
        "exit",
        "add",
        "other",
        "--public-key",
        &key(),
        "--endpoint",
        "192.0.2.8:1",
    ])
    .ok();
    let before = node.json(&["config", "get"]);
    node.run(&["config", "apply", f]).fails(
        5,
        &[
            &format!(
                "the node is at generation {}, the request expected {g0}",
                g0 + 2
            ),
            "412",
            "wraithctl config get",
            "--force",
        ],
    );
    node.run(&["config", "apply", f, "--generation", "1"])
        .fails(5, &["expected 1"]);
    assert_eq!(node.json(&["config", "get"]), before);
    assert_eq!(node.state_file()["generation"], before["generation"]);

    // --generation with the current one, or --force, applies.
    let current = before["generation"].as_u64().unwrap().to_string();
    let v = node.json(&["config", "apply", f, "--generation", &current]);
    assert_eq!(v["exits"], 1, "{v}");
    assert_eq!(v["generation"], before["generation"].as_u64().unwrap() + 1);
    node.run(&["config", "apply", f, "--force"]).ok();
    assert_eq!(node.state_file()["exits"][0]["name"], "from-file");

    // A file with no generation needs one of them; bad JSON says where.
    std::fs::write(&file, "{\"exits\": []}").unwrap();
    node.run(&["config", "apply", f])
        .fails(1, &["has no \"generation\"", "--generation N"]);
    std::fs::write(&file, "{\"exits\": [\n").unwrap();
    node.run(&["config", "apply", f])
        .fails(1, &["is not JSON", "line 2"]);
    // An invalid state is the node's to refuse; it says why.
    std::fs::write(&file, format!("{{\"generation\": 0, \"exits\": [{{\"name\": \"\", \"public_key\": \"{k}\", \"endpoint\": \"192.0.2.7:1\"}}]}}")).unwrap();
    node.run(&["config", "apply", f, "--force"])
        .fails(1, &["exit name", "400"]);
    // A misspelt field in a hand-edited state is refused, not silently dropped.
    std::fs::write(
        &file,
        format!("{{\"exits\": [{{\"name\": \"t\", \"public_key\": \"{k}\", \"endpoint\": \"192.0.2.7:1\", \"listen-port\": 5}}]}}"),
    )
    .unwrap();
    node.run(&["config", "apply", f, "--force"])
        .fails(1, &["unknown field `listen-port`", "400"]);
    assert_eq!(node.state_file()["exits"][0]["name"], "from-file");
}

#[test]
fn json_output_parses_for_every_command_and_errors_too() {
    let node = Node::start("json");
    let (k, p) = (key(), key());
    let added = node.json(&[
        "exit",
        "add",
        "j",
        "--public-key",
        &k,
        "--endpoint",
        "192.0.2.3:1",
    ]);
    assert_eq!(added["name"], "j");
    assert_eq!(node.json(&["exit", "ls"])[0]["public_key"], k.as_str());
    node.json(&["peer", "add", &p, "--allowed-ips", "10.1.0.0/24"]);
    assert_eq!(
        node.json(&["peer", "ls"])[0]["allowed_ips"][0],
        "10.1.0.0/24"
    );
    assert_eq!(node.json(&["sessions"]), Value::Array(vec![]));
    assert_eq!(node.json(&["sessions", "ls"]), Value::Array(vec![]));
    let config = node.json(&["config", "get"]);
    assert_eq!(config["generation"], 3);
    let show = node.json(&["show"]);
    assert_eq!(show["generation"], 3);
    assert_eq!(show["backend"], auto_backend());
    assert_eq!(show["exits"][0]["sessions"], 0);
    assert_eq!(show["peers"][0]["public_key"], p.as_str());
    assert_eq!(node.json(&["peer", "rm", &p])["removed"], p.as_str());
    assert_eq!(node.json(&["exit", "rm", "j"])["removed"], k.as_str());

    let r = node.run(&["--json", "sessions", "kill", "0.0.0"]);
    r.fails(1, &[]);
    let err: Value = serde_json::from_str(r.stderr.trim()).expect("a JSON error on stderr");
    assert_eq!(err["status"], 404);
    assert_eq!(err["kind"], "refused");
    assert!(err["error"].as_str().unwrap().contains("no session 0.0.0"));
}

#[test]
fn an_unreachable_node_is_explained() {
    let dir = TempDir::new("unreachable");
    let token = dir.0.join("api.token");
    std::fs::write(&token, "x").unwrap();
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    Run::of(wraithctl().args(["--url", &url, "--token-file"]).arg(&token).arg("show")).fails(
        3,
        &[&format!(
            "cannot reach the node at {url}: connection refused — is wraithgate running? is --url right?"
        )],
    );
    // The environment works as the flags do, and a bare host:port means http://.
    let r = Run::of(
        wraithctl()
            .env("WRAITHCTL_URL", format!("127.0.0.1:{port}"))
            .env("WRAITHCTL_TOKEN_FILE", &token)
            .args(["--json", "exit", "ls"]),
    );
    r.fails(3, &[]);
    let err: Value = serde_json::from_str(r.stderr.trim()).unwrap();
    assert_eq!(err["kind"], "unreachable");
    let sock = dir.0.join("api.sock");
    Run::of(
        wraithctl()
            .arg("--socket")
            .arg(&sock)
            .arg("--token-file")
            .arg(&token)
            .arg("show"),
    )
    .fails(
        3,
        &[
            "cannot reach the node at unix:",
            "no such socket",
            "api_socket",
        ],
    );
}

#[test]
fn a_wrong_or_missing_token_is_explained() {
    let node = Node::start("token");
    let wrong = node.dir.0.join("wrong.token");
    std::fs::write(&wrong, "0123456789abcdef\n").unwrap();
    let url = format!("http://{}", node.api);
    Run::of(
        wraithctl()
            .args(["--url", &url, "--token-file"])
            .arg(&wrong)
            .args(["exit", "ls"]),
    )
    .fails(
        4,
        &["refused the token in", "wrong token", "401", "--token-file"],
    );
    let missing = node.dir.0.join("missing.token");
    Run::of(
        wraithctl()
            .args(["--url", &url, "--token-file"])
            .arg(&missing)
            .arg("show"),
    )
    .fails(
        4,
        &[
            &format!("cannot read the API token file {}", missing.display()),
            "no such file",
        ],
    );
    // The default is the node's default: an operator on a default install needs no flags.
    let help = Run::of(wraithctl().arg("--help"));
    assert!(
        help.ok().stdout.contains("/var/lib/wraithgate/api.token"),
        "{help:?}"
    );
    // The right token works, and the state is untouched by the refused attempts.
    node.run(&["exit", "ls"]).ok();
    assert_eq!(node.state_file()["generation"], 1);
}

#[test]
fn the_unix_socket_serves_the_same_api() {
    let dir = TempDir::new("sockpath");
    let sock = dir.0.join("api.sock");
    let node = Node::start_with(
        "socket",
        &format!("\n[control]\napi_socket = {:?}\n", sock.to_str().unwrap()),
    );
    let k = key();
    let r = Run::of(
        wraithctl()
            .arg("--socket")
            .arg(&sock)
            .arg("--token-file")
            .arg(node.token_file())
            .args([
                "exit",
                "add",
                "s",
                "--public-key",
                &k,
                "--endpoint",
                "192.0.2.9:9",
            ]),
    );
    r.ok();
    // Seen over TCP too: one node, two ways in.
    assert_eq!(node.json(&["exit", "ls"])[0]["public_key"], k.as_str());
}

#[test]
fn show_and_sessions_report_real_traffic_per_exit() {
    let node = Node::start("show");
    let exit_keys = KeyPair::generate();
    let mut exit = WgNode::bind(any_loopback(), exit_keys.clone()).unwrap();
    let exit_key = exit_keys.relay_key().to_string();
    let idle_key = key();
    node.run(&[
        "exit",
        "add",
        "busy",
        "--public-key",
        &exit_key,
        "--endpoint",
        &exit.local_addr().to_string(),
    ])
    .ok();
    node.run(&[
        "exit",
        "add",
        "idle",
        "--public-key",
        &idle_key,
        "--endpoint",
        "192.0.2.50:51820",
    ])
    .ok();

    // A WireGuard client whose exit peer's endpoint is the relay.
    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit_keys.public,
        PeerOptions {
            endpoint: Some(node.relay),
            ..Default::default()
        },
    );
    exit.add_peer(client.keys().public, PeerOptions::default());
    let (s, d) = tunnel_addrs(1);
    let mut delivered = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while delivered < 5 && Instant::now() < deadline {
        let _ = client.send_ip(cp, &ipv4_udp(s, d, 1, 2, &[7u8; 1000]));
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            if let Ok(Some(Received::Packet { data, .. })) = exit.try_recv() {
                assert_eq!(udp_payload(&data).map(<[u8]>::len), Some(1000));
                delivered += 1;
            }
            let _ = client.try_recv();
        }
    }
    assert!(delivered >= 5, "only {delivered} packets crossed the relay");

    let show = node.run(&["show"]);
    let text = &show.ok().stdout;
    assert!(
        text.starts_with(&format!("node: http://{}\n", node.api)),
        "{text}"
    );
    let listening = format!("  listening: {}\n", node.relay);
    for want in [
        &listening,
        &format!("  backend: {}\n", auto_backend()),
        "  workers: 1\n",
        "  generation: 3\n",
        "  sessions: 1 (0 pending)\n",
        "  handshakes: 1 from clients",
        "\nexit: busy\n",
        &format!("  public key: {exit_key}\n"),
        "  sessions: 1 (1 established)\n",
        "  latest activity: ",
        "\nexit: idle\n  public key: ",
        "  endpoint: 192.0.2.50:51820\n  sessions: 0\n",
    ] {
        assert!(text.contains(want), "show lacks {want:?}:\n{text}");
    }
    let busy = text.split("exit: busy").nth(1).unwrap();
    let transfer = busy.lines().find(|l| l.contains("transfer:")).unwrap();
    assert!(transfer.contains("KiB to exit"), "{transfer}");

    let v = node.json(&["show"]);
    assert_eq!(v["url"], format!("http://{}", node.api));
    assert_eq!(v["listen"][0], node.relay.to_string());
    let node_key = v["public_key"].as_str().unwrap();
    assert_eq!(node_key.len(), 44, "{v}");
    assert!(
        text.contains(&format!(
            "node: http://{}\n  public key: {node_key}\n",
            node.api
        )),
        "{text}"
    );
    let busy = &v["exits"][0];
    assert_eq!(busy["name"], "busy");
    assert_eq!(busy["sessions"], 1);
    assert_eq!(busy["established"], 1);
    let to_exit = busy["to_exit"]["bytes"].as_u64().unwrap();
    assert!(busy["to_exit"]["packets"].as_u64().unwrap() >= 6, "{busy}"); // handshake + data
    assert!(to_exit >= 5 * 1000, "{busy}");
    assert!(v["to_exit"]["bytes"].as_u64().unwrap() >= to_exit, "{v}");
    assert_eq!(v["exits"][1]["sessions"], 0);
    assert_eq!(v["sessions"], 1);

    // The session is listed, then killed by its id.
    let sessions = node.json(&["sessions"]);
    assert_eq!(sessions.as_array().unwrap().len(), 1, "{sessions}");
    let id = sessions[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(sessions[0]["exit"], "busy");
    let table = node.run(&["sessions"]);
    let row: Vec<&str> = table
        .ok()
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    // The exit sees the client at the relay's address and this port.
    let exit_port = exit.endpoint(0).expect("the exit heard the client").port();
    assert_eq!(sessions[0]["exit_port"], exit_port, "{sessions}");
    assert!(
        sessions[0]["latest_handshake"].as_u64().is_some(),
        "{sessions}"
    );
    let port = exit_port.to_string();
    assert_eq!(
        &row[..8],
        [
            id.as_str(),
            &client.local_addr().to_string(),
            "busy",
            "established",
            &port,
            "1",
            row[6],
            "ago"
        ],
        "{table:?}"
    );
    // Abuse handling: the port an exit reports finds the client behind it.
    let found = node.json(&["sessions", "--exit-port", &port]);
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["client"], client.local_addr().to_string());
    let other = if exit_port == 65535 { 1 } else { exit_port + 1 };
    assert_eq!(
        node.run(&["sessions", "--exit-port", &other.to_string()])
            .ok()
            .stdout,
        format!("no live session on exit port {other}\n")
    );
    for bad in ["0", "65536", "x"] {
        node.run(&["sessions", "--exit-port", bad])
            .fails(2, &["--exit-port"]);
    }
    node.run(&["sessions", "--exit-port", &port, "kill", &id])
        .fails(1, &["takes a session id"]);
    assert_eq!(node.json(&["sessions"]).as_array().unwrap().len(), 1);
    assert_eq!(
        node.run(&["sessions", "kill", &id]).ok().stdout,
        format!("closed session {id}\n")
    );
    assert_eq!(node.run(&["sessions"]).ok().stdout, "no sessions\n");
    node.run(&["sessions", "kill", &id])
        .fails(1, &["no session", "404"]);
}

#[test]
fn help_names_every_command_and_the_exit_codes() {
    let help = Run::of(wraithctl().arg("--help"));
    let text = &help.ok().stdout;
    for word in [
        "show",
        "exit",
        "peer",
        "sessions",
        "config",
        "--json",
        "--url",
        "--socket",
        "--token-file",
        "WRAITHCTL_URL",
        "Exit status",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
    let apply = Run::of(wraithctl().args(["config", "apply", "--help"]));
    assert!(apply.ok().stdout.contains("If-Match"), "{apply:?}");
    let mut child = wraithctl()
        .args([
            "config",
            "apply",
            "-",
            "--generation",
            "1",
            "--url",
            "127.0.0.1:1",
            "--token-file",
            "/nonexistent",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(b"{}");
    // The token is read before anything is sent.
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4));
}

/// The backend a node started with `backend = "auto"` runs on this machine.
fn auto_backend() -> &'static str {
    match wraithgate_relay::io::uring::probe() {
        Ok(()) => "uring",
        Err(_) => "portable",
    }
}

#[test]
fn config_get_then_apply_keeps_preshared_keys() {
    let node = Node::start("psk-round-trip");
    let (exit, peer, psk) = (key(), key(), key());
    node.run(&[
        "exit",
        "add",
        "e1",
        "--public-key",
        &exit,
        "--endpoint",
        "192.0.2.1:51820",
    ])
    .ok();
    let psk_file = node.dir.0.join("psk");
    std::fs::write(&psk_file, format!("{psk}\n")).unwrap();
    node.run(&[
        "peer",
        "add",
        &peer,
        "--allowed-ips",
        "10.0.0.2/32",
        "--exit",
        "e1",
        "--preshared-key-file",
        psk_file.to_str().unwrap(),
    ])
    .ok();
    // `wraithctl config get > f && wraithctl config apply f`, as the README has it.
    let get = node.run(&["config", "get"]);
    let fetched = &get.ok().stdout;
    assert!(!fetched.contains(&psk), "the psk was shown: {fetched}");
    let file = node.dir.0.join("state-copy.json");
    std::fs::write(&file, fetched).unwrap();
    let f = file.to_str().unwrap();
    node.run(&["config", "apply", f]).ok();
    let state = node.state_file();
    assert_eq!(state["peers"][0]["preshared_key"], psk.as_str(), "{state}");

    // An explicit null in the file removes it.
    let get = node.run(&["config", "get"]);
    let mut doc: Value = serde_json::from_str(&get.ok().stdout).unwrap();
    doc["peers"][0]["preshared_key"] = Value::Null;
    std::fs::write(&file, doc.to_string()).unwrap();
    node.run(&["config", "apply", f]).ok();
    let state = node.state_file();
    assert!(
        state["peers"][0].get("preshared_key").is_none(),
        "the psk stayed: {state}"
    );
    assert_eq!(state["peers"][0]["public_key"], peer.as_str());
}

#[test]
fn a_no_op_apply_a_dry_run_and_exit_set_say_what_they_change() {
    let node = Node::start("changes");
    let k = key();
    node.run(&[
        "exit",
        "add",
        "a",
        "--public-key",
        &k,
        "--endpoint",
        "192.0.2.7:51820",
    ])
    .ok();
    let doc = node.json(&["config", "get"]);
    let g = doc["generation"].as_u64().unwrap();
    let file = node.dir.0.join("same.json");
    let f = file.to_str().unwrap();
    std::fs::write(&file, doc.to_string()).unwrap();
    // The state in use already: nothing changes, the generation stays.
    for _ in 0..2 {
        assert_eq!(
            node.run(&["config", "apply", f]).ok().stdout,
            format!("{f} is the state in use already: nothing applied, generation stays {g}\n")
        );
    }
    assert_eq!(node.state_file()["generation"], g);
    // A dry run of an edit names the difference and applies nothing.
    let mut edited = doc.clone();
    edited["exits"][0]["endpoint"] = serde_json::json!("192.0.2.9:51820");
    std::fs::write(&file, edited.to_string()).unwrap();
    let change = "  exits changed: a (endpoint 192.0.2.7:51820 -> 192.0.2.9:51820)";
    assert_eq!(
        node.run(&["config", "apply", f, "--dry-run"]).ok().stdout,
        format!("dry run, nothing applied: {f} would change generation {g}:\n{change}\n")
    );
    assert_eq!(node.json(&["config", "get"]), doc);
    // `exit set` changes one exit and says so; the same again changes nothing.
    assert_eq!(
        node.run(&["exit", "set", "a", "--endpoint", "192.0.2.9:51820"])
            .ok()
            .stdout,
        format!("changed exit {k}:\n{change}\n  sessions closed: 0 of exit a\n")
    );
    assert_eq!(
        node.run(&["exit", "set", "a", "--endpoint", "192.0.2.9:51820"])
            .ok()
            .stdout,
        format!("exit {k} is so already: nothing changed\n")
    );
    assert_eq!(node.state_file()["generation"], g + 1);
    node.run(&["exit", "set", "a"])
        .fails(1, &["nothing to change"]);
    node.run(&["exit", "set", "nobody", "--unpin"])
        .fails(1, &["no exit is named \"nobody\""]);
    // Pinning a configured listen port is the node's to refuse.
    let port = node.relay.port().to_string();
    node.run(&["exit", "set", "a", "--listen-port", &port])
        .fails(1, &["is a configured [relay] listen port", "409"]);
    assert_eq!(node.state_file()["generation"], g + 1);
    // The node's log has the audit trail: what changed, what was refused.
    let log = wraithgate_testkit::wait_for(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(20));
        let log = node.log.lock().unwrap().clone();
        log.contains("change refused").then_some(log)
    })
    .unwrap_or_else(|| node.log.lock().unwrap().clone());
    assert!(
        log.lines().any(|l| l.contains("state changed")
            && l.contains(
                "changes=exits changed: a (endpoint 192.0.2.7:51820 -> 192.0.2.9:51820)"
            )
            && l.contains("sessions_closed=a=0")),
        "{log}"
    );
    assert!(log.contains("nothing to do"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("change refused") && l.contains("listen port")),
        "{log}"
    );
}

/// Issue 19: the API over TLS for a control plane across the network. With `api_tls`, the
/// node makes a self-signed certificate on first start (`api.crt`, key 0600) and logs its
/// fingerprint; `wraithctl --url https://… --ca-file api.crt` pins exactly that certificate.
/// Another certificate, no pin (the public roots), or plain HTTP to the TLS port: refused.
#[test]
fn the_api_over_tls_with_the_node_certificate_pinned() {
    use std::os::unix::fs::PermissionsExt as _;
    let node = Node::start_with("tls", "[control]\napi_tls = true\n");
    let state = node.dir.0.join("state");
    let cert = state.join("api.crt");
    assert!(cert.is_file(), "no api.crt made");
    assert_eq!(
        std::fs::metadata(state.join("api.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let log = node.log.lock().unwrap().clone();
    assert!(
        log.contains("operator API serves TLS") && log.contains("sha256="),
        "the fingerprint is logged:\n{log}"
    );
    let https = format!("https://127.0.0.1:{}", node.api.port());
    let ctl = |extra: &[&str]| {
        let mut c = wraithctl();
        c.args(["--url", &https, "--token-file"])
            .arg(node.token_file())
            .args(extra);
        Run::of(c.args(["exit", "ls"]))
    };
    let pinned = ctl(&["--ca-file", &cert.display().to_string()]);
    pinned.ok();
    assert!(pinned.stdout.contains("no exits"), "{pinned:#?}");
    // A certificate of another node.
    let other = TempDir::new("tls-other");
    let other_cert = other.0.join("other.crt");
    let made = rcgen_free_cert(&other.0);
    std::fs::copy(made, &other_cert).unwrap();
    let r = ctl(&["--ca-file", &other_cert.display().to_string()]);
    assert_ne!(r.code, Some(0), "another certificate was accepted: {r:#?}");
    // No pin: the node's self-signed certificate is nobody's in the public roots.
    let r = ctl(&[]);
    assert_ne!(
        r.code,
        Some(0),
        "an unpinned self-signed certificate was accepted: {r:#?}"
    );
    // Plain HTTP to the TLS port gets nothing.
    let r = Run::of(
        wraithctl()
            .args([
                "--timeout",
                "5",
                "--url",
                &format!("http://127.0.0.1:{}", node.api.port()),
            ])
            .arg("--token-file")
            .arg(node.token_file())
            .args(["exit", "ls"]),
    );
    assert_ne!(r.code, Some(0), "plain HTTP answered: {r:#?}");
}

/// A self-signed certificate made by another node (its first start with TLS), for the
/// "another certificate" case: returns the path of its `api.crt`.
fn rcgen_free_cert(dir: &Path) -> PathBuf {
    let other = Node::start_with("tls-maker", "[control]\napi_tls = true\n");
    let cert = other.dir.0.join("state").join("api.crt");
    let kept = dir.join("made.crt");
    std::fs::copy(&cert, &kept).unwrap();
    kept
}

/// A reader that stops early (`wraithctl completions bash | grep -q …`, `… | head`) has all
/// it wanted: wraithctl ends with status 0 and no panic, for the offline commands and for
/// output that comes from the node alike. The reader is gone before wraithctl starts, so
/// its first write fails with EPIPE every time.
#[test]
fn a_reader_that_closes_the_pipe_early_ends_wraithctl_quietly() {
    let node = Node::start("closed_pipe");
    let cases: [(&str, Vec<&str>, Option<&Node>); 3] = [
        ("completions", vec!["completions", "bash"], None),
        ("man", vec!["man"], None),
        ("show", vec!["show"], Some(&node)),
    ];
    for (name, args, against) in cases {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(theirs);
        let mut cmd = match against {
            Some(node) => node.ctl(),
            None => wraithctl(),
        };
        let out = cmd
            .args(&args)
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(ours)))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
    }
}
