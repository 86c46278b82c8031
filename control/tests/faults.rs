//! Faults injected into a running node (issue 20). Its state directory full (ENOSPC) or
//! read-only: the API answers each change with a clear error, the running table and the
//! file stay exactly as they were, forwarding goes on, and the next change after the fault
//! clears goes through. Its state file replaced while it runs, garbage files at start,
//! descriptor exhaustion, a dying sidecar, `kill -9` under load, the wall clock jumping and
//! a resolver that never answers: each test says what held and what was lost.
//!
//! The full and read-only directories are a tmpfs of their own (mounted, so those tests
//! need root; they skip loudly without it, and fail instead under
//! `WRAITHGATE_REQUIRE_ALL_TESTS=1`, as in CI).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use wraithgate_control::config::{Config, ControlSection};
use wraithgate_control::node::Node;
use wraithgate_relay::io::DataPlaneConfig;
use wraithgate_relay::table::{ExitSpec, ExitTable};
use wraithgate_relay::wire::{
    Message, COOKIE_REPLY_LEN, INITIATION_LEN, INITIATION_MAC1_OFFSET, INITIATION_MAC2_OFFSET,
    RESPONSE_LEN,
};
use wraithgate_relay::PublicKey;

/// The `[limits]` of a node these tests start as a child: no per-source handshake budget
/// in the way of a test's many handshakes from 127.0.0.1.
const LIMITS: &str = "handshakes_per_second = 100000\nhandshake_burst = 100000\n";

fn may_skip(test: &str, why: &str) -> bool {
    assert!(
        std::env::var_os("WRAITHGATE_REQUIRE_ALL_TESTS").is_none(),
        "{test} cannot run: {why}; WRAITHGATE_REQUIRE_ALL_TESTS forbids skipping"
    );
    eprintln!("SKIPPED {test}: {why}");
    true
}

/// A new, empty directory of this test run's own under the temporary directory.
fn fresh_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "wg-faults-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("a directory under the temporary directory");
    dir
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(tag: &str, size: &str) -> Result<Tmpfs, String> {
        let dir = fresh_dir(tag);
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount tmpfs: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir))
    }

    fn remount(&self, opts: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(out.status.success(), "remount {opts}: {out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An exit on loopback: a plain UDP socket that answers what the test tells it to.
fn exit_spec(name: &str, key: PublicKey, endpoint: SocketAddr) -> ExitSpec {
    ExitSpec {
        name: name.into(),
        public_key: key,
        endpoint,
        listen_port: None,
    }
}

fn initiation(to: &PublicKey, sender: u32) -> Vec<u8> {
    let mut m = vec![0x5a; INITIATION_LEN];
    m[..4].copy_from_slice(&[1, 0, 0, 0]);
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    let mac = to.mac1_key().compute(&m[..INITIATION_MAC1_OFFSET]);
    m[INITIATION_MAC1_OFFSET..INITIATION_MAC1_OFFSET + 16].copy_from_slice(&mac);
    m[INITIATION_MAC1_OFFSET + 16..].fill(0);
    m
}

fn response(sender: u32, receiver: u32) -> Vec<u8> {
    let mut m = vec![0x33; RESPONSE_LEN];
    m[..4].copy_from_slice(&[2, 0, 0, 0]);
    m[4..8].copy_from_slice(&sender.to_le_bytes());
    m[8..12].copy_from_slice(&receiver.to_le_bytes());
    m
}

fn transport(receiver: u32, counter: u64) -> Vec<u8> {
    let mut m = vec![0x77; 64];
    m[..4].copy_from_slice(&[4, 0, 0, 0]);
    m[4..8].copy_from_slice(&receiver.to_le_bytes());
    m[8..16].copy_from_slice(&counter.to_le_bytes());
    m
}

fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    loop {
        match s.recv_from(&mut buf) {
            Ok((n, from)) => return (buf[..n].to_vec(), from),
            // The node in this process handles signals; a wait may be interrupted.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("no datagram within the timeout: {e}"),
        }
    }
}

/// A client and an exit on loopback with a session through the node between them.
struct Flow {
    client: UdpSocket,
    exit: UdpSocket,
    relay: SocketAddr,
    /// The relay's exit-facing address for this client, as the exit sees it.
    relay_side: SocketAddr,
    counter: u64,
}

impl Flow {
    fn establish(relay: SocketAddr, exit: UdpSocket, key: &PublicKey) -> Flow {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        exit.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        client.send_to(&initiation(key, 0xC1), relay).unwrap();
        let (_, relay_side) = recv(&exit);
        exit.send_to(&response(0xE1, 0xC1), relay_side).unwrap();
        let (got, _) = recv(&client);
        assert_eq!(got[0], 2, "the response reaches the client");
        let mut flow = Flow {
            client,
            exit,
            relay,
            relay_side,
            counter: 0,
        };
        flow.both_ways();
        flow
    }

    /// A transport message each way, through the node.
    fn both_ways(&mut self) {
        self.both_ways_with(0xE1, 0xC1);
    }
}

#[derive(Clone)]
struct Api {
    url: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let auth = format!("Bearer {}", self.token);
        let r = match (method, body) {
            ("GET", _) => self.agent.get(url).header("Authorization", auth).call(),
            ("POST", Some(b)) => self
                .agent
                .post(url)
                .header("Authorization", auth)
                .content_type("application/json")
                .send(b.to_string()),
            ("DELETE", _) => self.agent.delete(url).header("Authorization", auth).call(),
            other => panic!("{other:?}"),
        }
        .unwrap();
        let status = r.status().as_u16();
        let text = r.into_body().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
}

fn start(dir: &Path, exits: Vec<ExitSpec>) -> (Node, Api) {
    let config = Config {
        data_plane: DataPlaneConfig {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            workers: 1,
            pin_workers: false,
            ..DataPlaneConfig::default()
        },
        table: ExitTable::new(1, exits).unwrap(),
        control: ControlSection {
            api_listen: Some("127.0.0.1:0".parse().unwrap()),
            state_dir: dir.to_owned(),
            ..ControlSection::default()
        },
        log: Default::default(),
    };
    let node = Node::start(config).unwrap();
    let api = Api {
        url: format!("http://{}", node.api_addr().unwrap()),
        token: std::fs::read_to_string(dir.join("api.token")).unwrap(),
        agent: ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into(),
    };
    (node, api)
}

/// What must not change when a change is refused: the table the API serves and the file.
fn snapshot(api: &Api, dir: &Path) -> (Value, Vec<u8>) {
    let (status, state) = api.call("GET", "/v1/config", None);
    assert_eq!(status, 200, "{state}");
    (state, std::fs::read(dir.join("state.json")).unwrap())
}

/// Runs `fault` on the state directory, tries three kinds of change, checks each is refused
/// clearly with nothing changed and forwarding unaffected, then lifts the fault with `heal`
/// and checks a change goes through.
fn refused_while(
    test: &str,
    fault: impl FnOnce(&Tmpfs),
    heal: impl FnOnce(&Tmpfs),
    expect_in_error: &[&str],
) {
    if !nix_is_root() && may_skip(test, "needs root to mount a tmpfs") {
        return;
    }
    let fs = match Tmpfs::mount(test, "1m") {
        Ok(fs) => fs,
        Err(e) => {
            if may_skip(test, &e) {
                return;
            }
            unreachable!()
        }
    };
    let exit_key = PublicKey([0x11; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    let exit_addr = exit.local_addr().unwrap();
    let (node, api) = start(&fs.0, vec![exit_spec("exit-1", exit_key, exit_addr)]);
    let relay = node.control.dp.local_addrs()[0];
    let mut flow = Flow::establish(relay, exit, &exit_key);
    let before = snapshot(&api, &fs.0);

    fault(&fs);
    let add = serde_json::json!({
        "name": "exit-2",
        "public_key": "IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI=",
        "endpoint": "127.0.0.1:9",
    });
    let attempts: [(&str, &str, Option<&Value>); 2] = [
        ("POST", "/v1/exits", Some(&add)),
        (
            "DELETE",
            "/v1/exits/ERERERERERERERERERERERERERERERERERERERERERE=",
            None,
        ),
    ];
    for (method, path, body) in attempts {
        let (status, answer) = api.call(method, path, body);
        let msg = answer["error"].as_str().unwrap_or_default().to_string();
        assert!(
            (500..600).contains(&status),
            "{test}: {method} {path} answered {status} {answer}"
        );
        assert!(
            expect_in_error.iter().any(|e| msg.contains(e)),
            "{test}: {method} {path}: {msg:?} does not say why ({expect_in_error:?})"
        );
        assert_eq!(
            snapshot(&api, &fs.0),
            before,
            "{test}: {method} {path} changed state"
        );
        flow.both_ways();
    }
    assert!(
        std::fs::read_dir(&fs.0)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(".tmp")),
        "{test}: a temporary file was left behind"
    );

    heal(&fs);
    let (status, answer) = api.call("POST", "/v1/exits", Some(&add));
    assert!(
        (200..300).contains(&status),
        "{test}: after the fault, {status} {answer}"
    );
    let (state, file) = snapshot(&api, &fs.0);
    assert_ne!(file, before.1, "{test}: the file holds the change");
    assert_eq!(state["exits"].as_array().map(Vec::len), Some(2));
    flow.both_ways();
    drop(node);
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn root_state_dir_full_refuses_changes_and_keeps_table_file_and_traffic() {
    refused_while(
        "root_state_dir_full_refuses_changes_and_keeps_table_file_and_traffic",
        |fs| {
            // Fill the tmpfs to the last byte.
            let filler = fs.0.join("filler");
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 64 * 1024];
            use std::io::Write as _;
            while f.write_all(&block).is_ok() {}
            let small = [0u8; 512];
            while f.write_all(&small).is_ok() {}
            while f.write_all(&[0u8]).is_ok() {}
            let _ = f.sync_all();
        },
        |fs| std::fs::remove_file(fs.0.join("filler")).unwrap(),
        &["No space left on device", "no space"],
    );
}

#[test]
fn root_state_dir_read_only_refuses_changes_and_keeps_table_file_and_traffic() {
    refused_while(
        "root_state_dir_read_only_refuses_changes_and_keeps_table_file_and_traffic",
        |fs| fs.remount("ro"),
        |fs| fs.remount("rw"),
        &["Read-only file system", "read-only"],
    );
}

/// A garbage `state.json` at start stops start-up with a message naming the file; nothing
/// panics and the file is left for the operator to look at (it holds the table).
#[test]
fn garbage_state_file_at_start_is_refused_by_name() {
    for (file, garbage) in [
        ("state.json", &b"{\"generation\": 3, \"exits\": [tr"[..]),
        ("state.json", &b"\x00\xff\xfe garbage"[..]),
    ] {
        let dir = fresh_dir("garbage");
        // A first start writes a good state; then the file is replaced.
        let (node, _api) = start(&dir, Vec::new());
        drop(node);
        std::fs::write(dir.join(file), garbage).unwrap();
        let config = Config {
            data_plane: DataPlaneConfig {
                listen: vec!["127.0.0.1:0".parse().unwrap()],
                workers: 1,
                pin_workers: false,
                ..DataPlaneConfig::default()
            },
            table: ExitTable::new(1, Vec::new()).unwrap(),
            control: ControlSection {
                api_listen: Some("127.0.0.1:0".parse().unwrap()),
                state_dir: dir.clone(),
                ..ControlSection::default()
            },
            log: Default::default(),
        };
        let err = match Node::start(config) {
            Ok(_) => panic!("started on a garbage {file}"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            err.contains(&dir.join(file).display().to_string()),
            "the error does not name {file}: {err}"
        );
        assert_eq!(
            std::fs::read(dir.join(file)).unwrap(),
            garbage,
            "{file} was touched"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A garbage `sessions.json` costs its clients a handshake, not the node its start: the file
/// is set aside as `sessions.json.unreadable` (never deleted unread) and the node runs.
#[test]
fn garbage_sessions_file_at_start_is_set_aside() {
    let dir = fresh_dir("sessions");
    let garbage = b"[{\"client\": 12}";
    std::fs::write(dir.join("sessions.json"), garbage).unwrap();
    let (node, api) = start(&dir, Vec::new());
    assert_eq!(api.call("GET", "/v1/config", None).0, 200);
    assert!(!dir.join("sessions.json").exists());
    assert_eq!(
        std::fs::read(dir.join("sessions.json.unreadable")).unwrap(),
        garbage
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `state.json` replaced while the node runs, by garbage and then by a valid state somebody
/// else wrote: the next change is refused (409) with a message that says what was found and
/// where it went; what was found is set aside byte for byte (never overwritten unseen); the
/// running table and the file are the node's own again; forwarding goes on; the change sent
/// again goes through, and the node starts again on the directory with every change.
#[test]
fn a_state_file_replaced_while_running_is_set_aside_and_loses_nothing() {
    let dir = fresh_dir("replaced");
    let exit_key = PublicKey([0x12; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    let exit_addr = exit.local_addr().unwrap();
    let (node, api) = start(&dir, vec![exit_spec("exit-1", exit_key, exit_addr)]);
    let relay = node.control.dp.local_addrs()[0];
    let mut flow = Flow::establish(relay, exit, &exit_key);
    let before = snapshot(&api, &dir);
    let add = json!({
        "name": "exit-2",
        "public_key": "IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI=",
        "endpoint": "127.0.0.1:9",
    });
    let hand_edit = json!({"generation": 7, "exits": [], "peers": []}).to_string();
    let cases: [(&str, &[u8], &str); 2] = [
        (
            "garbage",
            b"\x00\xff{ half a file",
            "no valid state (line 1:",
        ),
        (
            "a hand edit",
            hand_edit.as_bytes(),
            "a valid state of generation 7",
        ),
    ];
    let mut asides = Vec::new();
    for (what, found, says) in cases {
        std::fs::write(dir.join("state.json"), found).unwrap();
        let (status, answer) = api.call("POST", "/v1/exits", Some(&add));
        let msg = answer["error"].as_str().unwrap_or_default().to_string();
        assert_eq!(status, 409, "{what}: {answer}");
        for part in [
            "state.json had been replaced",
            says,
            "set aside as",
            "send the change again",
        ] {
            assert!(msg.contains(part), "{what}: {msg:?} does not say {part:?}");
        }
        assert_eq!(
            snapshot(&api, &dir),
            before,
            "{what}: the running table and the file are not as the node had them"
        );
        let aside: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("state.json.replaced-") && !asides.contains(p))
            .collect();
        assert_eq!(aside.len(), 1, "{what}: one file set aside: {aside:?}");
        assert!(
            msg.contains(&aside[0].display().to_string()),
            "{what}: {msg:?}"
        );
        assert_eq!(
            std::fs::read(&aside[0]).unwrap(),
            found,
            "{what}: set aside unchanged"
        );
        asides.extend(aside);
        flow.both_ways();
    }
    let (status, answer) = api.call("POST", "/v1/exits", Some(&add));
    assert_eq!(status, 201, "the change sent again: {answer}");
    let (state, _) = snapshot(&api, &dir);
    drop(node);
    let (node, api) = start(&dir, Vec::new());
    assert_eq!(snapshot(&api, &dir).0, state, "a restart runs every change");
    assert_eq!(state["exits"].as_array().map(Vec::len), Some(2));
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An exit's pinned listen port held by another program when the node starts: the node
/// starts and serves on, says so (its log, `wraithgate_pinned_ports_unbound` 1), and binds
/// the port by itself once it is free, with no table change: a client's initiation there
/// then reaches the exit. (Before, the port stayed dark until the next table change.)
#[test]
fn a_pinned_port_taken_at_start_is_bound_once_it_is_free() {
    let dir = fresh_dir("pinned");
    let exit_key = PublicKey([0x16; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    exit.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let exit_addr = exit.local_addr().unwrap();
    let port = free_port(false);
    // Without SO_REUSEPORT: the node's bind of the port fails while this socket lives.
    let squatter = UdpSocket::bind(("127.0.0.1", port)).unwrap();
    let state = json!({"generation": 1, "exits": [{"name": "exit-1",
        "public_key": base64_key(&exit_key), "endpoint": exit_addr.to_string(),
        "listen_port": port}], "peers": []});
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    let node = Child::start(&dir, exit_addr, &exit_key, 1024);
    assert_eq!(node.counter("wraithgate_pinned_ports_unbound"), 1);
    assert!(
        node.log(&dir)
            .contains("pinned listen port cannot be bound"),
        "{}",
        node.log(&dir)
    );
    drop(squatter);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while node.counter("wraithgate_pinned_ports_unbound") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the freed port was not bound within 20 s:\n{}",
            node.log(&dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .send_to(&initiation(&exit_key, 0xC0DE), ("127.0.0.1", port))
        .unwrap();
    let (got, _) = recv(&exit);
    assert_eq!(
        &got[4..8],
        &0xC0DEu32.to_le_bytes(),
        "the exit gets the initiation"
    );
    assert!(node.log(&dir).contains("listening on pinned port"));
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A free loopback port (UDP, or TCP for the API), released for the node to take.
fn free_port(tcp: bool) -> u16 {
    if tcp {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// The node binary as a child, with its open-files limit lowered (soft and hard) to
/// `nofile` by `prlimit`, killed on drop.
struct Child {
    process: std::process::Child,
    relay: SocketAddr,
    api: Api,
}

impl Child {
    fn start(dir: &Path, exit: SocketAddr, exit_key: &PublicKey, nofile: u32) -> Child {
        Child::start_with_env(dir, exit, exit_key, nofile, &[])
    }

    /// [`Child::start`] with `env` added to the node's environment.
    fn start_with_env(
        dir: &Path,
        exit: SocketAddr,
        exit_key: &PublicKey,
        nofile: u32,
        env: &[(&str, &str)],
    ) -> Child {
        let relay: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
        Child::spawn_under(&[], dir, relay, exit, exit_key, nofile, env, LIMITS)
    }

    /// The node listening for clients on `relay`.
    fn spawn(
        dir: &Path,
        relay: SocketAddr,
        exit: SocketAddr,
        exit_key: &PublicKey,
        nofile: u32,
        env: &[(&str, &str)],
    ) -> Child {
        Child::spawn_under(&[], dir, relay, exit, exit_key, nofile, env, LIMITS)
    }

    /// [`Child::spawn`], the command line started by the program and arguments `under`,
    /// with `limits` as its configuration's `[limits]` section.
    #[allow(clippy::too_many_arguments)]
    fn spawn_under(
        under: &[&str],
        dir: &Path,
        relay: SocketAddr,
        exit: SocketAddr,
        exit_key: &PublicKey,
        nofile: u32,
        env: &[(&str, &str)],
        limits: &str,
    ) -> Child {
        let api_addr = format!("127.0.0.1:{}", free_port(true));
        let key = base64_key(exit_key);
        let config = format!(
            "[relay]\nlisten = [\"{relay}\"]\nworkers = 1\nbackend = \"portable\"\n\
             [limits]\n{limits}\
             [control]\napi_listen = \"{api_addr}\"\nstate_dir = \"{}\"\n\
             [[exit]]\nname = \"exit-1\"\npublic_key = \"{key}\"\nendpoint = \"{exit}\"\n",
            dir.display()
        );
        let conf = dir.join("node.toml");
        std::fs::write(&conf, config).unwrap();
        let log = std::fs::File::create(dir.join("node.log")).unwrap();
        // The node as the test runner would start it (under qemu-user, through its runner),
        // behind prlimit.
        let node = wraithgate_testkit::workspace_command(env!("CARGO_BIN_EXE_wraithgate"));
        let mut cmd = match under {
            [program, args @ ..] => {
                let mut c = Command::new(program);
                c.args(args).arg("prlimit");
                c
            }
            [] => Command::new("prlimit"),
        };
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(node.get_program())
            .args(node.get_args());
        for (k, v) in node.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.envs(env.iter().copied());
        let process = cmd
            .args(["run", "--config"])
            .arg(&conf)
            .stderr(log)
            .spawn()
            .expect("prlimit (util-linux) runs the node");
        let mut child = Child {
            process,
            relay,
            api: Api {
                url: format!("http://{api_addr}"),
                token: String::new(),
                agent: ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into(),
            },
        };
        let token_path = dir.join("api.token");
        let started = std::time::Instant::now();
        loop {
            if let Ok(token) = std::fs::read_to_string(&token_path) {
                child.api.token = token;
                let url = format!("{}/healthz", child.api.url);
                if child
                    .api
                    .agent
                    .get(url)
                    .call()
                    .is_ok_and(|r| r.status() == 200)
                {
                    return child;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the node did not come up: {}",
                std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The value of the unlabelled counter `name` in `/metrics`.
    fn counter(&self, name: &str) -> u64 {
        let (status, body) = self.api.call("GET", "/metrics", None);
        assert_eq!(status, 200);
        let text = body.as_str().unwrap_or_default().to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    }

    fn log(&self, dir: &Path) -> String {
        std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
    }

    fn drops(&self, reason: &str) -> u64 {
        let (status, body) = self.api.call("GET", "/metrics", None);
        assert_eq!(status, 200);
        let text = body.as_str().unwrap_or_default().to_string();
        let needle = format!("reason=\"{reason}\"}} ");
        text.lines()
            .filter(|l| l.starts_with("wraithgate_drops_total{") && l.contains(&needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn base64_key(k: &PublicKey) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(k.0)
}

/// One client of the exhaustion test: its own socket (so its own session), established.
fn handshake(relay: SocketAddr, exit: &UdpSocket, key: &PublicKey, n: u32) -> Option<Flow> {
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.send_to(&initiation(key, 0xC000 + n), relay).unwrap();
    exit.set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let relay_side = loop {
        match exit.recv_from(&mut buf) {
            Ok((len, from)) if len == INITIATION_LEN && buf[4..8] == (0xC000 + n).to_le_bytes() => {
                break from
            }
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    };
    let exit = exit.try_clone().unwrap();
    exit.send_to(&response(0xE000 + n, 0xC000 + n), relay_side)
        .unwrap();
    let (got, _) = recv(&client);
    assert_eq!(got[0], 2);
    let mut flow = Flow {
        client,
        exit,
        relay,
        relay_side,
        counter: 0,
    };
    flow.both_ways_with(0xE000 + n, 0xC000 + n);
    Some(flow)
}

impl Flow {
    /// [`Flow::both_ways`] for a flow with its own indices.
    fn both_ways_with(&mut self, exit_index: u32, client_index: u32) {
        self.exit
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        self.counter += 1;
        let up = transport(exit_index, self.counter);
        self.client.send_to(&up, self.relay).unwrap();
        loop {
            let (got, from) = recv(&self.exit);
            // Other flows share the exit socket: skip their datagrams.
            if from == self.relay_side {
                assert_eq!(got, up, "client → exit");
                break;
            }
        }
        let down = transport(client_index, self.counter);
        self.exit.send_to(&down, self.relay_side).unwrap();
        let (got, from) = recv(&self.client);
        assert_eq!((got, from), (down, self.relay), "exit → client");
    }
}

/// Descriptor exhaustion at the process's real limit (issue 20): a node whose open-files
/// limit is 160 takes sessions (one socket each) until it has no descriptor left; then new
/// sessions are refused and counted (`socket_unavailable`), the established ones carry on
/// both ways, the API still answers, and once the operator kills sessions and so frees
/// their descriptors, new sessions get in again.
#[test]
fn descriptor_exhaustion_refuses_new_sessions_and_keeps_established_ones() {
    let dir = fresh_dir("nofile");
    let exit_key = PublicKey([0x11; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    let node = Child::start(&dir, exit.local_addr().unwrap(), &exit_key, 160);

    let mut flows = Vec::new();
    let mut refused = 0;
    for n in 0..200u32 {
        match handshake(node.relay, &exit, &exit_key, n) {
            Some(f) => flows.push((n, f)),
            None => {
                refused += 1;
                if refused == 5 {
                    break;
                }
            }
        }
    }
    assert!(
        flows.len() >= 8 && refused == 5,
        "{} sessions, {refused} refused: the limit was not reached (log: {})",
        flows.len(),
        std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
    );
    let counted = node.drops("socket_unavailable");
    assert!(
        counted >= 5,
        "5 refused sessions, {counted} counted as socket_unavailable"
    );
    // Established sessions are unaffected, both ways.
    for (n, f) in flows.iter_mut() {
        f.both_ways_with(0xE000 + *n, 0xC000 + *n);
    }
    let (status, sessions) = node.api.call("GET", "/v1/sessions", None);
    assert_eq!(status, 200, "the API answers at the limit: {sessions}");
    let sessions = sessions.as_array().cloned().unwrap_or_default();
    assert_eq!(
        sessions.len(),
        flows.len(),
        "every established session is listed"
    );
    // The operator kills five sessions: their descriptors free up.
    let (gone, mut kept): (Vec<_>, Vec<_>) = flows.into_iter().partition(|(n, _)| n % 7 == 0);
    assert!(gone.len() >= 5, "{} flows to kill", gone.len());
    for (_, f) in gone.iter().take(5) {
        let client = f.client.local_addr().unwrap().to_string();
        let id = sessions
            .iter()
            .find(|s| s["client"] == client.as_str())
            .and_then(|s| s["id"].as_str())
            .expect("the flow's session is listed")
            .to_string();
        let (status, answer) = node.api.call("DELETE", &format!("/v1/sessions/{id}"), None);
        assert!((200..300).contains(&status), "kill {id}: {status} {answer}");
    }
    let mut again = 0;
    for n in 1000..1005u32 {
        if handshake(node.relay, &exit, &exit_key, n).is_some() {
            again += 1;
        }
    }
    assert_eq!(
        again, 5,
        "new sessions once killed ones freed their descriptors"
    );
    for (n, f) in kept.iter_mut() {
        f.both_ways_with(0xE000 + *n, 0xC000 + *n);
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sidecar dying (issue 20), both ways it can. A handler that panics is answered 500
/// with a message and counted; the sidecar serves on. A panic that kills the sidecar's
/// thread itself: forwarding never notices, the API is away (a probe of `/healthz` fails,
/// which is how a supervisor learns of it) until the node starts it again about a second
/// later, on the same address, with the same table and tokens, and says so in its log.
/// The faults are injected through routes that only a debug build serves, and only with
/// `WRAITHGATE_FAULT_ROUTES=1`.
#[test]
fn a_panicking_sidecar_never_stops_forwarding_and_comes_back() {
    let dir = fresh_dir("sidecar");
    let exit_key = PublicKey([0x12; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    let node = Child::start_with_env(
        &dir,
        exit.local_addr().unwrap(),
        &exit_key,
        1024,
        &[("WRAITHGATE_FAULT_ROUTES", "1")],
    );
    let mut flow = handshake(node.relay, &exit, &exit_key, 1).expect("a session");

    // A handler panics: 500 with a message, counted, and the API serves on.
    let (status, answer) = node
        .api
        .call("POST", "/v1/_fault/handler-panic", Some(&json!({})));
    assert_eq!(status, 500, "{answer}");
    let message = answer["error"].as_str().unwrap_or_default();
    assert!(message.contains("handler failed"), "{answer}");
    assert_eq!(node.counter("wraithgate_api_handler_panics_total"), 1);
    let (status, exits) = node.api.call("GET", "/v1/exits", None);
    assert_eq!(status, 200, "{exits}");
    flow.both_ways_with(0xE001, 0xC001);

    // The sidecar's thread panics: forwarding goes on while the API is away.
    let (status, answer) = node
        .api
        .call("POST", "/v1/_fault/thread-panic", Some(&json!({})));
    assert_eq!(status, 202, "{answer}");
    let healthz = format!("{}/healthz", node.api.url);
    let probe = |agent: &ureq::Agent| agent.get(&healthz).call().map(|r| r.status().as_u16());
    let died = std::time::Instant::now();
    while probe(&node.api.agent).is_ok() {
        assert!(
            died.elapsed() < Duration::from_secs(5),
            "the API still answers after its thread panicked: {}",
            node.log(&dir)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    flow.both_ways_with(0xE001, 0xC001);
    let away = std::time::Instant::now();
    let mut carried_while_away = 0;
    let status = loop {
        match probe(&node.api.agent) {
            Ok(status) => break status,
            Err(_) => {
                assert!(
                    away.elapsed() < Duration::from_secs(10),
                    "the node did not start its API again: {}",
                    node.log(&dir)
                );
                flow.both_ways_with(0xE001, 0xC001);
                carried_while_away += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    assert_eq!(status, 200);
    assert!(
        carried_while_away > 0,
        "no traffic was tried while the API was away"
    );
    assert_eq!(node.counter("wraithgate_api_restarts_total"), 1);
    let (status, exits) = node.api.call("GET", "/v1/exits", None);
    assert_eq!(status, 200, "{exits}");
    assert!(exits.to_string().contains("exit-1"), "{exits}");
    let log = node.log(&dir);
    for line in [
        "operator API died",
        "injected fault: the operator API's thread panics",
        "operator API started again",
    ] {
        assert!(log.contains(line), "the log lacks {line:?}:\n{log}");
    }
    flow.both_ways_with(0xE001, 0xC001);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kill -9` under load (issue 20): while sessions carry traffic and a controller adds
/// exits one after another, the node is killed outright. Nothing is half-written (the
/// state file parses and holds every change the API acknowledged; no temporary file is
/// left for long: the next start removes them), no session snapshot pretends to be a clean
/// stop's, and after a start on the same state directory and address the clients get back
/// in by handshaking again and carry traffic, with every acknowledged exit routable.
#[test]
fn kill_9_under_load_loses_no_acknowledged_change_and_clients_get_back_in() {
    let dir = fresh_dir("kill9");
    let exit_key = PublicKey([0x13; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    let exit_addr = exit.local_addr().unwrap();
    let mut node = Child::start(&dir, exit_addr, &exit_key, 4096);
    let relay = node.relay;
    let mut flows: Vec<(u32, Flow)> = (0..16)
        .map(|n| (n, handshake(relay, &exit, &exit_key, n).expect("a session")))
        .collect();

    // A controller adds exits as fast as the node acknowledges them.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let writer = {
        let acked = acked.clone();
        let url = node.api.url.clone();
        let token = node.api.token.clone();
        std::thread::spawn(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into();
            for i in 0u32.. {
                let mut key = [0x40; 32];
                key[..4].copy_from_slice(&i.to_le_bytes());
                let name = format!("added-{i}");
                let body = json!({
                    "name": name,
                    "public_key": base64_key(&PublicKey(key)),
                    "endpoint": format!("127.0.0.1:{}", 20000 + i % 1000),
                });
                let r = agent
                    .post(format!("{url}/v1/exits"))
                    .header("Authorization", format!("Bearer {token}"))
                    .content_type("application/json")
                    .send(body.to_string());
                match r {
                    Ok(r) if r.status() == 201 => acked.lock().unwrap().push(name),
                    Ok(r) => panic!("adding {name}: {}", r.status()),
                    // The node is gone.
                    Err(_) => return,
                }
            }
        })
    };
    // Traffic both ways on every session while the changes go in, until enough are in.
    let started = std::time::Instant::now();
    while acked.lock().unwrap().len() < 20 {
        for (n, f) in flows.iter_mut() {
            f.both_ways_with(0xE000 + *n, 0xC000 + *n);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the changes did not go in: {}",
            node.log(&dir)
        );
    }
    node.process.kill().unwrap(); // SIGKILL
    node.process.wait().unwrap();
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();

    let state: Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap())
        .expect("state.json parses after kill -9");
    let names: Vec<&str> = state["exits"]
        .as_array()
        .expect("exits in state.json")
        .iter()
        .filter_map(|x| x["name"].as_str())
        .collect();
    for name in &acked {
        assert!(
            names.contains(&name.as_str()),
            "acknowledged {name} is not in state.json"
        );
    }
    assert!(
        !dir.join("sessions.json").exists(),
        "a killed node cannot have saved its sessions"
    );

    // Started again on the same state directory and address.
    let node = Child::spawn(&dir, relay, exit_addr, &exit_key, 4096, &[]);
    let (status, exits) = node.api.call("GET", "/v1/exits", None);
    assert_eq!(status, 200, "{exits}");
    let listed = exits.to_string();
    for name in &acked {
        assert!(
            listed.contains(&format!("\"{name}\"")),
            "{name} lost by the restart"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left after the start: {leftovers:?}"
    );
    // The old sessions died with the process: the clients handshake again and get in.
    for n in 100..116 {
        let mut f = handshake(relay, &exit, &exit_key, n).expect("a client gets back in");
        f.both_ways_with(0xE000 + n, 0xC000 + n);
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The wall clock jumping (issue 20), a day forwards and then two days back, while
/// sessions carry traffic: the node times everything that matters (session expiry, rate
/// limits, cookie epochs, the workers' health) on the monotonic clock, so nothing moves.
/// Sessions carry traffic both ways across each jump and none is lost; a cookie a source
/// over its handshake budget took before each jump still proves it after (its retry goes to
/// the exit, not challenged again: a cookie epoch on the wall clock would be 720 epochs off
/// after a day); a new client gets in, `/healthz` stays 200, and
/// `process_start_time_seconds` stays put. The node's wall
/// clock is moved by libfaketime (the monotonic clock left alone, as a real `date -s`
/// leaves it); its log's timestamps prove each jump took effect.
#[test]
fn wall_clock_jumps_move_nothing() {
    const TEST: &str = "wall_clock_jumps_move_nothing";
    if std::env::var_os("WRAITHGATE_TARGET_RUNNER").is_some() {
        // libfaketime would be preloaded into qemu-user itself, not the emulated node.
        eprintln!("SKIPPED {TEST}: libfaketime cannot reach a program that qemu-user runs");
        return;
    }
    let lib = format!(
        "/usr/lib/{}-linux-gnu/faketime/libfaketime.so.1",
        std::env::consts::ARCH
    );
    if !Path::new(&lib).exists() && may_skip(TEST, "libfaketime is not installed") {
        return;
    }
    let dir = fresh_dir("clock");
    let offset_file = dir.join("faketime.rc");
    std::fs::write(&offset_file, "+0\n").unwrap();
    let exit_key = PublicKey([0x14; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    let offset = offset_file.to_str().unwrap().to_string();
    let relay: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    // A small per-source handshake budget, so that a source can be put over it and
    // challenged: the sessions' ten handshakes from 127.0.0.1 fit in it; the probes come
    // from other addresses.
    let node = Child::spawn_under(
        &[],
        &dir,
        relay,
        exit.local_addr().unwrap(),
        &exit_key,
        1024,
        &[
            ("LD_PRELOAD", lib.as_str()),
            ("FAKETIME_TIMESTAMP_FILE", offset.as_str()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
        "handshakes_per_second = 1\nhandshake_burst = 12\n",
    );
    let mut flows: Vec<(u32, Flow)> = (0..8)
        .map(|n| {
            (
                n,
                handshake(node.relay, &exit, &exit_key, n).expect("a session"),
            )
        })
        .collect();
    let started = node.counter("process_start_time_seconds");
    let mut newcomer = 100;
    for (probe, (jump, days)) in [("+1d", 1i32), ("-1d", -1)].into_iter().enumerate() {
        // Before the jump, a source over its handshake budget gets the relay's cookie.
        let prober = UdpSocket::bind(format!("127.0.0.{}:0", 2 + probe)).unwrap();
        prober
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let base = 0xD000 + 64 * probe as u32;
        let (sent, reply) = (0..32)
            .find_map(|k| {
                let init = initiation(&exit_key, base + k);
                prober.send_to(&init, node.relay).unwrap();
                let mut reply = [0u8; COOKIE_REPLY_LEN];
                match prober.recv(&mut reply) {
                    Ok(COOKIE_REPLY_LEN) => Some((init, reply)),
                    _ => None,
                }
            })
            .expect("a source over its budget is challenged with a cookie reply");
        let challenged = node.drops("cookie_challenge");

        std::fs::write(&offset_file, format!("{jump}\n")).unwrap();
        // libfaketime reads the file at every call (FAKETIME_NO_CACHE).
        // The cookie taken before the jump still proves the source after it: cookie epochs
        // run on the monotonic clock. Its retry goes to the exit, unchallenged.
        let mut retry = initiation(&exit_key, base + 63);
        let mac2 = {
            let (Ok(Message::Initiation(a)), Ok(Message::Initiation(b))) =
                (Message::parse(&sent), Message::parse(&retry))
            else {
                unreachable!()
            };
            wraithgate_relay::cookie::initiator_mac2(&exit_key, &reply, &a, &b)
                .expect("the relay's cookie reply decrypts with the exit's public key")
        };
        retry[INITIATION_MAC2_OFFSET..].copy_from_slice(&mac2);
        prober.send_to(&retry, node.relay).unwrap();
        exit.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2048];
        loop {
            match exit.recv_from(&mut buf) {
                Ok((n, _)) if n == INITIATION_LEN && buf[4..8] == (base + 63).to_le_bytes() => {
                    break
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!(
                    "the clock moved {jump}: the retry with the cookie taken before it never \
                     reached the exit ({e}); cookie challenges {challenged} -> {}",
                    node.drops("cookie_challenge")
                ),
            }
        }
        assert_eq!(
            node.drops("cookie_challenge"),
            challenged,
            "challenged again after {jump}"
        );
        for (n, f) in flows.iter_mut() {
            f.both_ways_with(0xE000 + *n, 0xC000 + *n);
        }
        let (status, sessions) = node.api.call("GET", "/v1/sessions", None);
        assert_eq!(status, 200, "{sessions}");
        assert_eq!(
            sessions
                .as_array()
                .map(|all| all.iter().filter(|s| s["established"] == true).count()),
            Some(flows.len() + (newcomer - 100) as usize),
            "established sessions after the clock moved {jump} (the probes' stay pending): \
             {sessions}"
        );
        let mut f = handshake(node.relay, &exit, &exit_key, newcomer).expect("a new client");
        f.both_ways_with(0xE000 + newcomer, 0xC000 + newcomer);
        newcomer += 1;
        let (status, health) = node.api.call("GET", "/healthz", None);
        assert_eq!(
            status, 200,
            "/healthz after the clock moved {jump}: {health}"
        );
        assert_eq!(node.counter("process_start_time_seconds"), started);
        // A change is logged: its timestamp is on the node's (moved) wall clock.
        let name = format!("clock-{newcomer}");
        let body = json!({"name": name, "public_key": base64_key(&PublicKey([newcomer as u8; 32])),
            "endpoint": "127.0.0.1:9"});
        let (status, answer) = node.api.call("POST", "/v1/exits", Some(&body));
        assert_eq!(status, 201, "{answer}");
        let day = Command::new("date")
            .args(["-u", "-d", &format!("{days} day"), "+%F"])
            .output()
            .unwrap();
        let day = String::from_utf8_lossy(&day.stdout).trim().to_string();
        let log = node.log(&dir);
        assert!(
            log.lines().any(|l| l.contains(&day) && l.contains(&name)),
            "the jump {jump} did not reach the node (no log line of {day} names {name}):\n{log}"
        );
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A name the node must resolve while the resolver never answers: the API goes on
/// answering meanwhile (resolution is off the sidecar's one runtime thread), and the call
/// naming it ends in a 400 that says so, changing nothing.
#[test]
fn root_a_resolver_that_never_answers_holds_up_no_other_call() {
    let test = "root_a_resolver_that_never_answers_holds_up_no_other_call";
    if !nix_is_root() && may_skip(test, "needs root (a mount namespace for resolv.conf)") {
        return;
    }
    let dir = fresh_dir("resolver");
    // The node's resolver: a socket of ours that reads queries and never answers.
    let resolver = UdpSocket::bind("127.77.0.53:53").expect("root binds port 53");
    resolver
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let resolv_conf = dir.join("resolv.conf");
    std::fs::write(
        &resolv_conf,
        "nameserver 127.77.0.53\noptions timeout:3 attempts:1\n",
    )
    .unwrap();
    let exit_key = PublicKey([0x33; 32]);
    let exit = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay: SocketAddr = format!("127.0.0.1:{}", free_port(false)).parse().unwrap();
    // The node sees our resolv.conf in a mount namespace of its own.
    let script = r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#;
    let conf = resolv_conf.to_str().unwrap();
    let node = Child::spawn_under(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            conf,
        ],
        &dir,
        relay,
        exit.local_addr().unwrap(),
        &exit_key,
        1024,
        &[],
        LIMITS,
    );
    let (_, exits_before) = node.api.call("GET", "/v1/exits", None);

    let api = node.api.clone();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let adding = {
        let done = done.clone();
        std::thread::spawn(move || {
            let answer = api.call(
                "POST",
                "/v1/exits",
                Some(&json!({
                    "name": "far-away",
                    "public_key": base64_key(&PublicKey([0x44; 32])),
                    "endpoint": "exit.resolver-down.test:51820",
                })),
            );
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            answer
        })
    };
    // The node is asking our resolver now.
    let mut query = [0u8; 512];
    let (n, _) = resolver
        .recv_from(&mut query)
        .expect("the node asks the resolver");
    assert!(n > 12, "a DNS query");
    // While it waits for the answer that never comes, other calls are answered.
    for path in ["/healthz", "/v1/exits", "/metrics"] {
        let (status, _) = node.api.call("GET", path, None);
        assert_eq!(status, 200, "{path}");
    }
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "the resolution ended before the other calls were answered: the test proved nothing"
    );
    let (status, answer) = adding.join().unwrap();
    assert_eq!(status, 400, "{answer}");
    let message = answer["error"].as_str().unwrap_or_default();
    assert!(message.contains("cannot resolve"), "{message}");
    let (_, exits_after) = node.api.call("GET", "/v1/exits", None);
    assert_eq!(
        exits_before, exits_after,
        "a refused change changes nothing"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
