//! The operator API against a real node (data plane, state file, sidecar) on loopback.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use wraithgate_control::config::{Config, ControlSection};
use wraithgate_control::endpoints::{
    any_loopback, ipv4_udp, tunnel_addrs, udp_payload, KeyPair, PeerOptions, Received, WgNode,
    ZhopClient,
};
use wraithgate_control::node::Node;
use wraithgate_relay::io::DataPlaneConfig;
use wraithgate_relay::table::{ExitSpec, ExitTable};

struct TestNode {
    node: Option<Node>,
    url: String,
    token: String,
    dir: PathBuf,
    agent: ureq::Agent,
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "wg-api-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &std::path::Path, exits: Vec<ExitSpec>, api_socket: Option<PathBuf>) -> Config {
    Config {
        data_plane: DataPlaneConfig {
            listen: vec![any_loopback()],
            workers: 1,
            pin_workers: false,
            ..DataPlaneConfig::default()
        },
        table: ExitTable::new(1, exits).unwrap(),
        control: ControlSection {
            api_listen: Some("127.0.0.1:0".parse().unwrap()),
            api_socket,
            state_dir: dir.to_owned(),
            ..ControlSection::default()
        },
        log: Default::default(),
    }
}

impl TestNode {
    fn start(tag: &str, exits: Vec<ExitSpec>) -> TestNode {
        let dir = temp_dir(tag);
        let node = Node::start(config(&dir, exits, None)).unwrap();
        let url = format!("http://{}", node.api_addr().unwrap());
        let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        TestNode {
            node: Some(node),
            url,
            token,
            dir,
            agent,
        }
    }

    fn relay_addr(&self) -> SocketAddr {
        self.node.as_ref().unwrap().control.dp.local_addrs()[0]
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .agent
            .get(format!("{}{path}", self.url))
            .header("Authorization", self.auth())
            .call()
            .unwrap();
        finish(r)
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let url = format!("{}{path}", self.url);
        let r = match method {
            "POST" => {
                let mut req = self.agent.post(url).header("Authorization", self.auth());
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.content_type("application/json").send(body)
            }
            "PUT" => {
                let mut req = self.agent.put(url).header("Authorization", self.auth());
                for (k, v) in headers {
                    req = req.header(*k, *v);
                }
                req.content_type("application/json").send(body)
            }
            "PATCH" => self
                .agent
                .patch(url)
                .header("Authorization", self.auth())
                .content_type("application/json")
                .send(body),
            "DELETE" => self
                .agent
                .delete(url)
                .header("Authorization", self.auth())
                .call(),
            _ => unreachable!(),
        };
        finish(r.unwrap())
    }

    fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The state as the API and as the file see it.
    fn state(&self) -> (Value, Vec<u8>) {
        (
            self.json("/v1/config"),
            std::fs::read(self.dir.join("state.json")).unwrap(),
        )
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            n.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn finish(r: ureq::http::Response<ureq::Body>) -> (u16, String) {
    let status = r.status().as_u16();
    let body = r.into_body().read_to_string().unwrap_or_default();
    (status, body)
}

fn key() -> String {
    KeyPair::generate().relay_key().to_base64()
}

fn exit_json(name: &str, k: &str, port: u16) -> String {
    json!({"public_key": k, "endpoint": format!("192.0.2.1:{port}"), "name": name}).to_string()
}

fn url_key(k: &str) -> String {
    k.replace('+', "-").replace('/', "_")
}

#[test]
fn guards_token_and_browsers() {
    let n = TestNode::start("guards", vec![]);
    let ok = n.agent.get(format!("{}/healthz", n.url)).call().unwrap();
    assert_eq!(ok.status(), 200, "healthz needs no token");
    let none = n.agent.get(format!("{}/v1/exits", n.url)).call().unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers().get("www-authenticate").unwrap(), "Bearer");
    let wrong = n
        .agent
        .get(format!("{}/v1/exits", n.url))
        .header("Authorization", "Bearer not-the-token")
        .call()
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // Off by the last character, a prefix, the token twice: refused alike.
    let token = n.token.trim().to_owned();
    let mut last = token.clone();
    let c = last.pop().unwrap();
    last.push(if c == '0' { '1' } else { '0' });
    for presented in [last, token[..token.len() - 1].to_owned(), token.repeat(2)] {
        let r = n
            .agent
            .get(format!("{}/v1/exits", n.url))
            .header("Authorization", format!("Bearer {presented}"))
            .call()
            .unwrap();
        assert_eq!(r.status(), 401, "{presented}");
    }
    for h in ["Origin", "Referer"] {
        let r = n
            .agent
            .get(format!("{}/v1/exits", n.url))
            .header("Authorization", n.auth())
            .header(h, "https://evil.example")
            .call()
            .unwrap();
        assert_eq!(r.status(), 403, "{h}");
        let (status, body) = finish(r);
        assert_eq!(status, 403);
        assert!(body.contains("Origin or Referer"));
    }
    // A mutation by GET does not exist.
    let (status, body) = n.get("/v1/exits/abc");
    assert_eq!(status, 405);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["error"],
        "GET is not allowed on /v1/exits/abc; allowed: PATCH, DELETE"
    );
    let (status, body) = n.get("/nope");
    assert_eq!(status, 404);
    assert!(body.contains("error"));
}

#[test]
fn exits_good_and_bad_input_leave_state_exactly_as_it_was() {
    let n = TestNode::start("exits", vec![]);
    let k1 = key();
    let (status, body) = n.send("POST", "/v1/exits", &exit_json("one", &k1, 51820), &[]);
    assert_eq!(status, 201, "{body}");
    let listed = n.json("/v1/exits");
    assert_eq!(listed[0]["public_key"], k1.as_str());
    assert_eq!(listed[0]["name"], "one");
    let before = n.state();
    assert_eq!(before.0["generation"], 2);

    let oversized = format!("{{\"name\": \"{}\"}}", "x".repeat(100_000));
    let k2 = key();
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "invalid request body"),
        (
            json!({"public_key": "!!!", "endpoint": "192.0.2.1:1", "name": "a"}).to_string(),
            400,
            "base64",
        ),
        (
            json!({"public_key": "AAAA", "endpoint": "192.0.2.1:1", "name": "a"}).to_string(),
            400,
            "32 bytes",
        ),
        (
            json!({"public_key": k2, "endpoint": "not-an-endpoint", "name": "a"}).to_string(),
            400,
            "invalid",
        ),
        (
            json!({"public_key": k2, "endpoint": "0.0.0.0:51820", "name": "a"}).to_string(),
            400,
            "endpoint",
        ),
        (
            json!({"public_key": k2, "endpoint": "192.0.2.1:1", "name": ""}).to_string(),
            400,
            "name",
        ),
        (
            json!({"public_key": k2, "endpoint": "192.0.2.1:1", "name": "é".repeat(65)})
                .to_string(),
            400,
            "name",
        ),
        (
            json!({"public_key": k2, "endpoint": "192.0.2.1:1", "name": "a", "colour": "red"})
                .to_string(),
            400,
            "unknown field",
        ),
        (exit_json("dup-key", &k1, 1), 409, "already exists"),
        (exit_json("one", &k2, 1), 409, "used twice"),
        (
            json!({"public_key": k2, "endpoint": "192.0.2.1:1", "name": "p", "listen_port": 0})
                .to_string(),
            400,
            "port 0",
        ),
        (oversized, 413, "request body larger than 65536 bytes"),
    ];
    for (body, want, words) in cases {
        let (status, answer) = n.send("POST", "/v1/exits", &body, &[]);
        assert_eq!(status, want, "{body:.80} -> {answer}");
        assert!(answer.contains(words), "{answer} lacks {words:?}");
        assert_eq!(
            n.state(),
            before,
            "state changed by a refused request: {body:.80}"
        );
    }
    for (path, want) in [
        ("/v1/exits/notakey", 400),
        (&*format!("/v1/exits/{}", url_key(&k2)), 404),
    ] {
        let (status, _) = n.send("DELETE", path, "", &[]);
        assert_eq!(status, want, "{path}");
        assert_eq!(n.state(), before);
    }
    let (status, _) = n.send("DELETE", &format!("/v1/exits/{}", url_key(&k1)), "", &[]);
    assert_eq!(status, 204);
    assert_eq!(n.json("/v1/exits"), json!([]));
}

#[test]
fn whole_config_replace_needs_the_current_generation() {
    let n = TestNode::start("config", vec![]);
    let r = n
        .agent
        .get(format!("{}/v1/config", n.url))
        .header("Authorization", n.auth())
        .call()
        .unwrap();
    assert_eq!(r.headers().get("etag").unwrap(), "\"1\"");
    let (ka, kb) = (key(), key());
    let desired = json!({"exits": [
        {"public_key": ka, "endpoint": "192.0.2.1:51820", "name": "a"},
        {"public_key": kb, "endpoint": "192.0.2.2:51820", "name": "b", "listen_port": 51999}
    ]})
    .to_string();
    let (status, body) = n.send("PUT", "/v1/config", &desired, &[]);
    assert_eq!(status, 428, "{body}");
    let (status, body) = n.send("PUT", "/v1/config", &desired, &[("If-Match", "1")]);
    assert_eq!(status, 200, "{body}");
    let applied: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(applied["generation"], 2);
    let before = n.state();
    // Replaying the same request is refused: the generation moved on.
    let (status, body) = n.send("PUT", "/v1/config", &desired, &[("If-Match", "1")]);
    assert_eq!(status, 412, "{body}");
    assert!(body.contains("stale generation"));
    assert_eq!(n.state(), before);
    let dup = json!({"exits": [
        {"public_key": ka, "endpoint": "192.0.2.1:51820", "name": "a"},
        {"public_key": ka, "endpoint": "192.0.2.2:51820", "name": "b"}
    ]})
    .to_string();
    let (status, _) = n.send("PUT", "/v1/config", &dup, &[("If-Match", "2")]);
    assert_eq!(status, 409);
    let (status, _) = n.send("PUT", "/v1/config", &desired, &[("If-Match", "two")]);
    assert_eq!(status, 400);
    assert_eq!(n.state(), before);
    // The pinned port from the new state is bound by the data plane.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        std::net::UdpSocket::bind("127.0.0.1:51999").is_err(),
        "pinned port 51999 not bound"
    );
}

#[test]
fn peers_reference_exits_and_keep_their_preshared_keys_to_themselves() {
    let n = TestNode::start("peers", vec![]);
    let (exit_key, peer_key, psk) = (key(), key(), key());
    assert_eq!(
        n.send("POST", "/v1/exits", &exit_json("x", &exit_key, 1), &[])
            .0,
        201
    );
    let unknown =
        json!({"public_key": peer_key, "allowed_ips": ["10.0.0.2/32"], "allowed_exits": [key()]});
    let before = n.state();
    let (status, body) = n.send("POST", "/v1/peers", &unknown.to_string(), &[]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a configured exit"));
    let bad_ip = json!({"public_key": peer_key, "allowed_ips": ["10.0.0.0/40"]});
    assert_eq!(n.send("POST", "/v1/peers", &bad_ip.to_string(), &[]).0, 400);
    assert_eq!(n.state(), before);
    let good = json!({"public_key": peer_key, "name": "alice", "allowed_ips": ["10.0.0.2/32"],
                      "preshared_key": psk, "allowed_exits": [exit_key]});
    assert_eq!(n.send("POST", "/v1/peers", &good.to_string(), &[]).0, 201);
    assert_eq!(n.send("POST", "/v1/peers", &good.to_string(), &[]).0, 409);
    let listed = n.json("/v1/peers");
    assert_eq!(listed[0]["name"], "alice");
    assert_eq!(listed[0]["preshared_key"], "set", "{listed}");
    assert!(!listed.to_string().contains(&psk), "{listed}");
    assert!(!n.get("/v1/config").1.contains(&psk));
    // The exit cannot go while the peer may use it.
    let (status, body) = n.send(
        "DELETE",
        &format!("/v1/exits/{}", url_key(&exit_key)),
        "",
        &[],
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        n.send(
            "DELETE",
            &format!("/v1/peers/{}", url_key(&peer_key)),
            "",
            &[]
        )
        .0,
        204
    );
    assert_eq!(
        n.send(
            "DELETE",
            &format!("/v1/exits/{}", url_key(&exit_key)),
            "",
            &[]
        )
        .0,
        204
    );
}

/// A client and an exit with a session through the node; returns them and the peer ids.
fn tunnel(n: &TestNode) -> (WgNode, WgNode, usize, usize) {
    let mut exit = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let body = json!({"public_key": exit.keys().relay_key().to_base64(),
                      "endpoint": exit.local_addr().to_string(), "name": "x"});
    assert_eq!(n.send("POST", "/v1/exits", &body.to_string(), &[]).0, 201);
    std::thread::sleep(Duration::from_millis(150));
    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit.keys().public,
        PeerOptions {
            endpoint: Some(n.relay_addr()),
            ..Default::default()
        },
    );
    let ep = exit.add_peer(client.keys().public, PeerOptions::default());
    let (s, d) = tunnel_addrs(1);
    client.send_ip(cp, &ipv4_udp(s, d, 1, 2, b"hello")).unwrap();
    let got = wraithgate_testkit::wait_for(Duration::from_secs(10), || {
        let _ = client.try_recv();
        match exit.try_recv() {
            Ok(Some(Received::Packet { .. })) => Some(()),
            _ => None,
        }
    });
    assert!(got.is_some(), "no traffic through the node");
    (client, exit, cp, ep)
}

/// Drives Z-HOP clients and plain WireGuard nodes (receiving, timers every 100 ms) until
/// one of them receives an IP packet whose UDP payload is `body`, or `timeout` passes.
fn pump_until(
    zhop: &mut [&mut ZhopClient],
    nodes: &mut [&mut WgNode],
    timeout: Duration,
    body: &[u8],
) -> bool {
    let end = std::time::Instant::now() + timeout;
    let mut last_tick = std::time::Instant::now();
    let is_it = |r: &Received| matches!(r, Received::Packet { data, .. } if udp_payload(data) == Some(body));
    while std::time::Instant::now() < end {
        let mut idle = true;
        for c in zhop.iter_mut() {
            while let Ok(Some(r)) = c.try_recv() {
                idle = false;
                if is_it(&r) {
                    return true;
                }
            }
        }
        for n in nodes.iter_mut() {
            while let Ok(Some(r)) = n.try_recv() {
                idle = false;
                if is_it(&r) {
                    return true;
                }
            }
        }
        if last_tick.elapsed() >= Duration::from_millis(100) {
            zhop.iter_mut().for_each(|c| c.tick());
            nodes.iter_mut().for_each(|n| n.tick());
            last_tick = std::time::Instant::now();
        }
        if idle {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    false
}

/// Z-HOP end to end through the operator API: two peers provisioned with POST /v1/peers
/// reach their exit through the node (outer tunnel to the node, inner tunnel to a
/// boringtun exit); DELETE /v1/peers/{key} of one ends its tunnel, while the other peer
/// and a DoubleHop client of the same exit carry on.
#[test]
fn a_peer_deleted_through_the_api_loses_its_zhop_tunnel_and_nobody_else_does() {
    let n = TestNode::start("zhop-delete", vec![]);
    // The exit "x", with a DoubleHop session through the node.
    let (mut dh, mut exit, dh_peer, _) = tunnel(&n);
    let node_public = n.json("/v1/node")["public_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let node_public = boringtun::x25519::PublicKey::from(
        wraithgate_relay::PublicKey::from_base64(&node_public)
            .unwrap()
            .0,
    );
    let mut clients = Vec::new();
    let mut outer_keys = Vec::new();
    for i in 2..4u8 {
        let (outer, inner) = (KeyPair::generate(), KeyPair::generate());
        exit.add_peer(inner.public, PeerOptions::default());
        let inner_addr: SocketAddr = format!("10.7.0.{i}:40000").parse().unwrap();
        let peer = json!({"public_key": outer.relay_key().to_base64(), "name": format!("z{i}"),
                          "allowed_ips": [format!("10.7.0.{i}/32")],
                          "allowed_exits": [exit.keys().relay_key().to_base64()]});
        let (status, body) = n.send("POST", "/v1/peers", &peer.to_string(), &[]);
        assert_eq!(status, 201, "{body}");
        outer_keys.push(outer.relay_key().to_base64());
        clients.push(
            ZhopClient::new(
                outer,
                inner,
                n.relay_addr(),
                node_public,
                exit.keys().public,
                exit.local_addr(),
                inner_addr,
            )
            .unwrap(),
        );
    }
    let [a, b] = &mut clients[..] else {
        unreachable!("two clients")
    };
    let wait = Duration::from_secs(10);
    let send = |c: &mut ZhopClient, i: u8, body: &[u8]| {
        let (s, d) = tunnel_addrs(i);
        c.send_ip(&ipv4_udp(s, d, 1000, 9, body)).unwrap();
    };
    send(a, 2, b"a before");
    assert!(pump_until(
        &mut [a, b],
        &mut [&mut exit, &mut dh],
        wait,
        b"a before"
    ));
    send(b, 3, b"b before");
    assert!(pump_until(
        &mut [a, b],
        &mut [&mut exit, &mut dh],
        wait,
        b"b before"
    ));
    // Workers publish their counters every 100 ms or so.
    let zhop_peers = |want: u64| {
        wraithgate_testkit::wait_for(wait, || {
            std::thread::sleep(Duration::from_millis(20));
            (n.json("/v1/node")["zhop_peers"] == want).then_some(())
        })
        .is_some()
    };
    assert!(zhop_peers(2), "{}", n.json("/v1/node"));

    let (status, body) = n.send(
        "DELETE",
        &format!("/v1/peers/{}", url_key(&outer_keys[0])),
        "",
        &[],
    );
    assert_eq!(status, 204, "{body}");
    assert_eq!(n.json("/v1/peers").as_array().unwrap().len(), 1);
    // The swap reaches the worker within its next loop iteration; give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..3 {
        let body = format!("a after {i}").into_bytes();
        send(a, 2, &body);
        assert!(
            !pump_until(
                &mut [a, b],
                &mut [&mut exit, &mut dh],
                Duration::from_millis(300),
                &body
            ),
            "a deleted peer's packet reached the exit"
        );
    }
    // A fresh outer handshake is refused as well: the key is no longer a peer.
    a.outer.initiate(0).unwrap();
    let drops = |n: &TestNode| {
        n.node
            .as_ref()
            .unwrap()
            .control
            .dp
            .stats()
            .dropped(wraithgate_relay::DropReason::UnknownPeer)
    };
    let refused = wraithgate_testkit::wait_for(wait, || {
        std::thread::sleep(Duration::from_millis(20));
        (drops(&n) >= 1).then_some(())
    });
    assert!(
        refused.is_some(),
        "the new initiation was not refused as unknown_peer"
    );
    assert!(zhop_peers(1), "{}", n.json("/v1/node"));
    // The other peer, both ways, and the DoubleHop client still work.
    send(b, 3, b"b after");
    assert!(pump_until(
        &mut [a, b],
        &mut [&mut exit, &mut dh],
        wait,
        b"b after"
    ));
    let b_exit_peer = 2; // exit peers: the DoubleHop client, a's inner key, b's inner key
    let (s, d) = tunnel_addrs(3);
    exit.send_ip(b_exit_peer, &ipv4_udp(d, s, 9, 1000, b"to b"))
        .unwrap();
    assert!(pump_until(
        &mut [a, b],
        &mut [&mut exit, &mut dh],
        wait,
        b"to b"
    ));
    let (s, d) = tunnel_addrs(1);
    dh.send_ip(dh_peer, &ipv4_udp(s, d, 1, 2, b"doublehop after"))
        .unwrap();
    assert!(pump_until(
        &mut [a, b],
        &mut [&mut exit, &mut dh],
        wait,
        b"doublehop after"
    ));
}

/// The node's private key (`node.key`, what `wg genkey` writes) is created 0600 on first
/// start and the same key is used on the next; a file that holds no key stops the start
/// with an error naming it, and is left as it was.
#[test]
fn the_node_key_is_created_private_on_first_start_and_kept() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = temp_dir("node-key");
    let path = dir.join("node.key");
    assert!(!path.exists());
    let node = Node::start(config(&dir, vec![], None)).unwrap();
    let first_public = node.control.node_public;
    node.stop();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "node.key mode");
    let text = std::fs::read_to_string(&path).unwrap();
    let secret = wraithgate_relay::PublicKey::from_base64(text.trim()).unwrap();
    // The public key the node announces is the one of the secret on disk (derived here
    // with x25519 directly).
    let derived =
        boringtun::x25519::PublicKey::from(&boringtun::x25519::StaticSecret::from(secret.0));
    assert_eq!(first_public.0, derived.to_bytes());

    let node = Node::start(config(&dir, vec![], None)).unwrap();
    assert_eq!(
        node.control.node_public, first_public,
        "the key was replaced"
    );
    node.stop();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );

    std::fs::write(&path, "not a key\n").unwrap();
    let err = match Node::start(config(&dir, vec![], None)) {
        Ok(node) => {
            node.stop();
            panic!("started with a node.key that holds no key")
        }
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("node.key"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a key\n");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sessions_are_listed_without_payload_and_can_be_killed() {
    let n = TestNode::start("sessions", vec![]);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (mut client, exit, cp, ep) = tunnel(&n);
    let (s, d) = tunnel_addrs(1);
    for _ in 0..20 {
        client
            .send_ip(cp, &ipv4_udp(s, d, 1, 2, &[7u8; 500]))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    let list = n.json("/v1/sessions");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let sess = &list[0];
    assert_eq!(sess["exit"], "x");
    assert_eq!(sess["client"], client.local_addr().to_string());
    assert!(sess["to_exit"]["packets"].as_u64().unwrap() >= 22, "{sess}");
    assert!(sess["established"].as_bool().unwrap());
    let id = sess["id"].as_str().unwrap().to_owned();
    // The latest handshake, and the port the exit sees the client at.
    let handshake = sess["latest_handshake"].as_u64().expect("a handshake time");
    assert!((started..started + 60).contains(&handshake), "{sess}");
    let exit_port = exit.endpoint(ep).expect("the exit heard the client").port();
    assert_eq!(sess["exit_port"], exit_port, "{sess}");
    // Abuse handling: the exit names a port, the node names the client behind it.
    let found = n.json(&format!("/v1/sessions?exit_port={exit_port}"));
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["id"], id.as_str());
    assert_eq!(found[0]["client"], client.local_addr().to_string());
    let other = if exit_port == 65535 { 1 } else { exit_port + 1 };
    assert_eq!(
        n.json(&format!("/v1/sessions?exit_port={other}")),
        json!([])
    );
    for bad in [
        "exit_port=abc",
        "exit_port=0",
        "exit_port=65536",
        "exit_port=-1",
        "exit_port=",
        "exit_port",
        "exitport=1",
        "exit_port=1&exit_port=2",
        "exit_port=1&x=2",
    ] {
        let (status, body) = n.get(&format!("/v1/sessions?{bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
        let msg = serde_json::from_str::<Value>(&body).unwrap()["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(msg.contains("exit_port"), "{bad}: {body}");
    }
    assert_eq!(n.json("/v1/sessions").as_array().unwrap().len(), 1);
    assert_eq!(n.send("DELETE", "/v1/sessions/garbage", "", &[]).0, 400);
    assert_eq!(
        n.send("DELETE", "/v1/sessions/6936238.3.305462016057947", "", &[])
            .0,
        404
    );
    assert_eq!(
        n.send("DELETE", &format!("/v1/sessions/{id}"), "", &[]).0,
        204
    );
    assert_eq!(
        n.send("DELETE", &format!("/v1/sessions/{id}"), "", &[]).0,
        404
    );
    assert_eq!(n.json("/v1/sessions"), json!([]));
}

/// A `/metrics` exposition read strictly: `prometheus_parse` skips lines it cannot read,
/// so every sample line must also be one it returned, every `# TYPE` a known type, and
/// every histogram cumulative with `+Inf` equal to its `_count`.
fn scrape(n: &TestNode) -> (prometheus_parse::Scrape, String) {
    let (status, text) = n.get("/metrics");
    assert_eq!(status, 200, "{text}");
    (check_exposition(&text), text)
}

fn check_exposition(text: &str) -> prometheus_parse::Scrape {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("reading from a string cannot fail");
    let sample_lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .count();
    // The parser folds a histogram's bucket lines into one sample per label set.
    let returned: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(b) => b.len(),
            prometheus_parse::Value::Summary(q) => q.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(
        returned, sample_lines,
        "the parser skipped sample lines:\n{text}"
    );
    let mut typed = std::collections::HashMap::new();
    for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let parts: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(parts.len(), 4, "{l}");
        assert!(
            ["counter", "gauge", "histogram", "summary", "untyped"].contains(&parts[3]),
            "{l}"
        );
        assert!(
            typed
                .insert(parts[2].to_owned(), parts[3].to_owned())
                .is_none(),
            "{l}: a family typed twice"
        );
    }
    for s in &scrape.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                s.metric
                    .strip_suffix(suffix)
                    .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(&s.metric);
        assert!(typed.contains_key(family), "{} has no # TYPE", s.metric);
        if let prometheus_parse::Value::Histogram(buckets) = &s.value {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count),
                "{} {:?} is not cumulative: {buckets:?}",
                s.metric,
                s.labels
            );
            let last = buckets.last().expect("a histogram has buckets");
            assert_eq!(
                last.less_than,
                f64::INFINITY,
                "{} ends without +Inf",
                s.metric
            );
            let count = scrape
                .samples
                .iter()
                .find(|c| c.metric == format!("{}_count", s.metric) && c.labels == s.labels)
                .unwrap_or_else(|| panic!("{} {:?} has no _count", s.metric, s.labels));
            assert_eq!(
                prometheus_parse::Value::Untyped(last.count),
                count.value,
                "{}: +Inf bucket and _count differ",
                s.metric
            );
        }
    }
    scrape
}

/// The sum of a family's plain samples that pass `filter`.
fn metric_sum(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    filter: &dyn Fn(&prometheus_parse::Sample) -> bool,
) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && filter(s))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("{name} is a histogram or summary"),
        })
        .sum()
}

#[test]
fn metrics_parse_as_prometheus_and_agree_with_the_traffic() {
    let n = TestNode::start("metrics", vec![]);
    let (mut client, mut exit, cp, ep) = tunnel(&n);
    let (before, _) = scrape(&n);
    let latency_count = |s: &prometheus_parse::Scrape| {
        metric_sum(s, "wraithgate_batch_latency_seconds_count", &|_| true)
    };
    let (s, d) = tunnel_addrs(1);
    for _ in 0..100 {
        client
            .send_ip(cp, &ipv4_udp(s, d, 1, 2, &[1u8; 1000]))
            .unwrap();
    }
    for _ in 0..50 {
        exit.send_ip(ep, &ipv4_udp(d, s, 2, 1, &[2u8; 600]))
            .unwrap();
    }
    // Junk from elsewhere, counted by reason.
    let junk = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..7 {
        junk.send_to(&[9, 9], n.relay_addr()).unwrap();
    }
    // Both ends take in what reached them, so that nothing waits on a full socket.
    let scraped = wraithgate_testkit::wait_for(Duration::from_secs(10), || {
        while let Ok(Some(_)) = client.try_recv() {}
        while let Ok(Some(_)) = exit.try_recv() {}
        let (scrape, text) = scrape(&n);
        let done = metric_sum(&scrape, "wraithgate_packets_to_exit_total", &|_| true) >= 102.0
            && metric_sum(&scrape, "wraithgate_packets_to_client_total", &|_| true) >= 51.0
            && metric_sum(&scrape, "wraithgate_drops_total", &|s| {
                s.labels.get("reason") == Some("truncated")
            }) >= 7.0;
        done.then_some((scrape, text))
    });
    let (scrape, text) = scraped.expect("the counters never caught up with the traffic");
    let sum = |name: &str| metric_sum(&scrape, name, &|_| true);
    // To the exit: the initiation, "hello", the 100 sent here, perhaps a keepalive or two.
    let to_exit = sum("wraithgate_packets_to_exit_total");
    assert!(
        (102.0..=106.0).contains(&to_exit),
        "packets to exit {to_exit}"
    );
    let to_exit_bytes = sum("wraithgate_bytes_to_exit_total");
    assert!(
        (100.0 * 1028.0..=to_exit * 1100.0).contains(&to_exit_bytes),
        "bytes to exit {to_exit_bytes} for {to_exit} packets"
    );
    // To the client: the response, the 50 sent here, perhaps a keepalive or two.
    let to_client = sum("wraithgate_packets_to_client_total");
    assert!(
        (51.0..=55.0).contains(&to_client),
        "packets to client {to_client}"
    );
    let to_client_bytes = sum("wraithgate_bytes_to_client_total");
    assert!(
        (50.0 * 628.0..=to_client * 700.0).contains(&to_client_bytes),
        "bytes to client {to_client_bytes} for {to_client} packets"
    );
    assert_eq!(
        metric_sum(&scrape, "wraithgate_drops_total", &|s| s
            .labels
            .get("reason")
            == Some("truncated")),
        7.0
    );
    assert_eq!(sum("wraithgate_sessions"), 1.0);
    assert_eq!(sum("wraithgate_client_handshakes_total"), 1.0);
    // Per exit (the one exit, "x"): the same traffic, labelled with its name.
    let exit_x = |name: &str| metric_sum(&scrape, name, &|s| s.labels.get("exit") == Some("x"));
    for (per_exit, total) in [
        ("wraithgate_per_exit_packets_to_exit_total", to_exit),
        ("wraithgate_per_exit_bytes_to_exit_total", to_exit_bytes),
        ("wraithgate_per_exit_packets_to_client_total", to_client),
        ("wraithgate_per_exit_bytes_to_client_total", to_client_bytes),
        ("wraithgate_per_exit_sessions", 1.0),
        ("wraithgate_per_exit_sessions_opened_total", 1.0),
    ] {
        assert_eq!(exit_x(per_exit), total, "{per_exit}");
        assert_eq!(sum(per_exit), total, "{per_exit}: only exit x has series");
    }
    assert_eq!(
        metric_sum(&scrape, "wraithgate_per_exit_handshakes_total", &|s| {
            s.labels.get("exit") == Some("x") && s.labels.get("initiator") == Some("client")
        }),
        1.0
    );
    assert_eq!(
        sum("wraithgate_per_exit_drops_total"),
        0.0,
        "junk names no exit"
    );
    // The same counters as JSON, read a moment later (keepalives may have crossed since).
    let stats = n.json("/v1/stats");
    let num = |v: &Value| v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    for (field, scraped, slack) in [
        (&stats["to_exit"]["packets"], to_exit, 4.0),
        (&stats["to_exit"]["bytes"], to_exit_bytes, 4.0 * 1100.0),
        (&stats["to_client"]["packets"], to_client, 4.0),
        (&stats["to_client"]["bytes"], to_client_bytes, 4.0 * 700.0),
    ] {
        assert!(
            (scraped..=scraped + slack).contains(&num(field)),
            "{field} against {scraped} scraped: {stats}"
        );
    }
    assert_eq!(stats["sessions"], 1, "{stats}");
    assert_eq!(stats["client_handshakes"], 1, "{stats}");
    assert_eq!(stats["drops"]["truncated"], 7, "{stats}");
    assert_eq!(
        stats["drops"].as_object().unwrap().len(),
        wraithgate_relay::DropReason::ALL.len(),
        "every reason: {stats}"
    );
    let x = &stats["exits"][0];
    assert_eq!(stats["exits"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(x["name"], "x");
    assert_eq!(x["sessions"], 1);
    assert_eq!(
        x["to_exit"], stats["to_exit"],
        "one exit has all the traffic"
    );
    assert_eq!(x["to_client"], stats["to_client"]);
    assert_eq!(x["drops"]["unmatched_response"], 0);
    assert!(text.contains("wraithgate_info{backend=\""), "backend label");
    assert!(
        latency_count(&scrape) > latency_count(&before),
        "the batch latency histogram did not grow: {} then {}",
        latency_count(&before),
        latency_count(&scrape)
    );
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "wraithgate_batch_latency_seconds"
            && matches!(s.value, prometheus_parse::Value::Histogram(_))));
    assert!(scrape.docs.contains_key("wraithgate_drops_total"));
    // The strict reading refuses what the lenient parser would skip or accept.
    let spoiled = [
        text.replacen("wraithgate_workers 1", "wraithgate_workers one", 1),
        text.replacen(
            "# TYPE wraithgate_workers gauge",
            "# TYPE wraithgate_workers meter",
            1,
        ),
        text.replacen("le=\"+Inf\"", "le=\"0.5\"", 1),
        format!("{text}wraithgate_unheard_of 1\n"),
    ];
    for bad in spoiled {
        assert_ne!(bad, text, "the spoiling edit found nothing to change");
        let refused = std::panic::catch_unwind(|| check_exposition(&bad)).is_err();
        assert!(refused, "a spoiled exposition passed the check");
    }
}

#[test]
fn a_change_that_cannot_be_persisted_changes_nothing() {
    let n = TestNode::start("persist", vec![]);
    let before = n.state();
    let pid = std::process::id();
    // Where the temporary file would go, put a directory: the write fails.
    let blocker = n.dir.join(format!(".state.json.tmp.{pid}"));
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("keep"), b"x").unwrap();
    let (status, body) = n.send("POST", "/v1/exits", &exit_json("x", &key(), 1), &[]);
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("nothing was changed"), "{body}");
    assert_eq!(n.state(), before);
    assert!(n.json("/v1/exits").as_array().unwrap().is_empty());
    std::fs::remove_dir_all(&blocker).unwrap();
    assert_eq!(
        n.send("POST", "/v1/exits", &exit_json("x", &key(), 1), &[])
            .0,
        201
    );
}

#[test]
fn the_api_is_also_served_on_a_unix_socket() {
    let dir = temp_dir("unix");
    let sock = dir.join("api.sock");
    let node = Node::start(config(&dir, vec![], Some(sock.clone()))).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    write!(s, "GET /v1/exits HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("[]"), "{answer}");
    node.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn forwarding_carries_on_when_the_api_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = temp_dir("taken");
    let exit = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let spec = ExitSpec {
        name: "x".into(),
        public_key: exit.keys().relay_key(),
        endpoint: exit.local_addr(),
        listen_port: None,
    };
    let mut cfg = config(&dir, vec![spec], None);
    cfg.control.api_listen = Some(taken.local_addr().unwrap());
    let node = Node::start(cfg).expect("the node starts without its API");
    assert!(node.api_addr().is_none());
    let relay = node.control.dp.local_addrs()[0];
    let mut exit = exit;
    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit.keys().public,
        PeerOptions {
            endpoint: Some(relay),
            ..Default::default()
        },
    );
    exit.add_peer(client.keys().public, PeerOptions::default());
    let (s, d) = tunnel_addrs(1);
    client
        .send_ip(cp, &ipv4_udp(s, d, 1, 2, b"no api needed"))
        .unwrap();
    let got = wraithgate_testkit::wait_for(Duration::from_secs(10), || {
        let _ = client.try_recv();
        matches!(exit.try_recv(), Ok(Some(Received::Packet { .. }))).then_some(())
    });
    assert!(got.is_some(), "forwarding must not depend on the API");
    node.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_client_that_stops_reading_does_not_hold_up_the_stop() {
    let n = TestNode::start("stuck-reader", vec![]);
    // A state large enough that its listing outgrows the socket buffers.
    let exits: Vec<Value> = (0..60_000u32)
        .map(|i| json!({"public_key": wraithgate_relay::PublicKey(rand::random()), "endpoint": format!("10.{}.{}.{}:51820", i >> 16, (i >> 8) & 255, i & 255), "name": format!("e{i}")}))
        .collect();
    let (status, body) = n.send(
        "PUT",
        "/v1/config",
        &json!({"exits": exits}).to_string(),
        &[("If-Match", "1")],
    );
    assert_eq!(status, 200, "{body:.200}");
    assert!(
        body.len() < 200,
        "PUT answers with a summary, not the state: {} bytes",
        body.len()
    );
    // Ask for it all and read only the first bytes.
    let addr = n.url.trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "GET /v1/config HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {}\r\n\r\n",
        n.token
    )
    .unwrap();
    let mut buf = [0u8; 64];
    conn.read_exact(&mut buf).unwrap();
    assert!(buf.starts_with(b"HTTP/1.1 200"));
    let mut n = n;
    let node = n.node.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        node.stop();
        let _ = tx.send(());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the node did not stop while a client sat on a response"
    );
    drop(conn);
}

/// A free loopback UDP port, held by a plain socket (no `SO_REUSEPORT`) until dropped.
fn squat_port() -> (std::net::UdpSocket, u16) {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    (s, port)
}

/// Whether a client sending to `relay` with `exit`'s key gets a packet through to it.
fn reaches(relay: SocketAddr, exit: &mut WgNode) -> bool {
    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit.keys().public,
        PeerOptions {
            endpoint: Some(relay),
            ..Default::default()
        },
    );
    exit.add_peer(client.keys().public, PeerOptions::default());
    let (s, d) = tunnel_addrs(1);
    client
        .send_ip(cp, &ipv4_udp(s, d, 1, 2, b"through"))
        .unwrap();
    wraithgate_testkit::wait_for(Duration::from_secs(10), || {
        let _ = client.try_recv();
        matches!(exit.try_recv(), Ok(Some(Received::Packet { .. }))).then_some(())
    })
    .is_some()
}

#[test]
fn a_pinned_port_that_cannot_be_bound_is_refused_and_changes_nothing() {
    let n = TestNode::start("pin-taken", vec![]);
    let (squatter, port) = squat_port();
    let k = key();
    let body = json!({"public_key": k, "endpoint": "192.0.2.1:51820", "name": "pinned",
                      "listen_port": port})
    .to_string();
    let before = n.state();
    let (status, answer) = n.send("POST", "/v1/exits", &body, &[]);
    assert_eq!(status, 409, "{answer}");
    let msg = serde_json::from_str::<Value>(&answer).unwrap()["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        msg.contains("\"pinned\"") && msg.contains(&format!("listen port {port}")),
        "{msg}"
    );
    assert!(msg.contains("nothing was changed"), "{msg}");
    assert_eq!(n.state(), before);
    let whole = json!({"exits": [{"public_key": k, "endpoint": "192.0.2.1:51820",
                                  "name": "pinned", "listen_port": port}]})
    .to_string();
    let (status, answer) = n.send("PUT", "/v1/config", &whole, &[("If-Match", "1")]);
    assert_eq!(status, 409, "{answer}");
    assert!(answer.contains(&format!("listen port {port}")), "{answer}");
    assert_eq!(n.state(), before);
    assert!(!n.get("/v1/node").1.contains(&format!(":{port}\"")));
    // Once the port is free, the same change goes through and the node listens there.
    drop(squatter);
    let (status, answer) = n.send("POST", "/v1/exits", &body, &[]);
    assert_eq!(status, 201, "{answer}");
    assert!(
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_err(),
        "pinned port {port} not bound"
    );
}

#[test]
fn a_node_whose_pinned_port_is_taken_starts_and_forwards_for_every_exit() {
    let (squatter, port) = squat_port();
    let dir = temp_dir("pin-start");
    let mut pinned = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let mut other = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let specs = vec![
        ExitSpec {
            name: "pinned".into(),
            public_key: pinned.keys().relay_key(),
            endpoint: pinned.local_addr(),
            listen_port: Some(port),
        },
        ExitSpec {
            name: "other".into(),
            public_key: other.keys().relay_key(),
            endpoint: other.local_addr(),
            listen_port: None,
        },
    ];
    let node = Node::start(config(&dir, specs, None)).expect("one taken port stops no node");
    let relay = node.control.dp.local_addrs()[0];
    assert!(
        !node
            .control
            .dp
            .local_addrs()
            .iter()
            .any(|a| a.port() == port),
        "{:?}",
        node.control.dp.local_addrs()
    );
    assert_eq!(
        node.control.dp.table().len(),
        2,
        "both exits are in the table"
    );
    assert!(
        reaches(relay, &mut other),
        "the other exit is forwarded for"
    );
    assert!(
        reaches(relay, &mut pinned),
        "the pinned exit is reached by mac1 on the main listener"
    );
    // An unrelated change is not refused for the port the running table already pins,
    // and binds it once it is free.
    drop(squatter);
    let token = std::fs::read_to_string(dir.join("api.token")).unwrap();
    let r = ureq::post(format!("http://{}/v1/exits", node.api_addr().unwrap()))
        .header("Authorization", format!("Bearer {token}"))
        .content_type("application/json")
        .send(exit_json("third", &key(), 1))
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(
        std::net::UdpSocket::bind(("127.0.0.1", port)).is_err(),
        "pinned port {port} bound once free"
    );
    node.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fetched_config_put_back_keeps_preshared_keys_and_null_removes_one() {
    let n = TestNode::start("psk-round-trip", vec![]);
    let (exit_key, alice, bob, psk_a, psk_b) = (key(), key(), key(), key(), key());
    assert_eq!(
        n.send("POST", "/v1/exits", &exit_json("x", &exit_key, 1), &[])
            .0,
        201
    );
    for (peer, psk, ip) in [
        (&alice, &psk_a, "10.0.0.2/32"),
        (&bob, &psk_b, "10.0.0.3/32"),
    ] {
        let body = json!({"public_key": peer, "allowed_ips": [ip], "preshared_key": psk,
                          "allowed_exits": [exit_key]});
        assert_eq!(n.send("POST", "/v1/peers", &body.to_string(), &[]).0, 201);
    }
    let file_psk = |peer: &str| -> Value {
        let state: Value =
            serde_json::from_slice(&std::fs::read(n.dir.join("state.json")).unwrap()).unwrap();
        let p = state["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["public_key"] == peer)
            .unwrap_or_else(|| panic!("no peer {peer} in {state}"))
            .clone();
        p.get("preshared_key").cloned().unwrap_or(Value::Null)
    };
    // Fetched (the keys redacted) and put back as it is: both keys stay.
    let fetched = n.json("/v1/config");
    assert!(!fetched.to_string().contains(&psk_a), "{fetched}");
    let g = fetched["generation"].to_string();
    let (status, body) = n.send(
        "PUT",
        "/v1/config",
        &fetched.to_string(),
        &[("If-Match", &g)],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(file_psk(&alice), psk_a.as_str());
    assert_eq!(file_psk(&bob), psk_b.as_str());
    // An explicit null removes alice's key only; a string replaces bob's.
    let psk_b2 = key();
    let mut edited = n.json("/v1/config");
    let g = edited["generation"].to_string();
    for p in edited["peers"].as_array_mut().unwrap() {
        if p["public_key"] == alice.as_str() {
            p["preshared_key"] = Value::Null;
        } else {
            p["preshared_key"] = json!(psk_b2);
        }
    }
    let (status, body) = n.send(
        "PUT",
        "/v1/config",
        &edited.to_string(),
        &[("If-Match", &g)],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(file_psk(&alice), Value::Null);
    assert_eq!(file_psk(&bob), psk_b2.as_str());
    // A bad key in the edit is refused whole: nothing changes.
    let before = n.state();
    let mut bad = n.json("/v1/config");
    let g = bad["generation"].to_string();
    bad["peers"][0]["preshared_key"] = json!("AAAA");
    let (status, body) = n.send("PUT", "/v1/config", &bad.to_string(), &[("If-Match", &g)]);
    assert_eq!(status, 400, "{body}");
    assert_eq!(n.state(), before);
}

/// Which token a request carries.
#[derive(Clone, Copy, Debug)]
enum Token {
    Right,
    Missing,
    Wrong,
}

/// One request the API must refuse, and how.
struct Refused {
    method: &'static str,
    path: String,
    body: String,
    headers: Vec<(&'static str, String)>,
    token: Token,
    status: u16,
    /// What the `{"error": ...}` message must say.
    words: &'static str,
}

fn refused(
    method: &'static str,
    path: &str,
    body: &str,
    status: u16,
    words: &'static str,
) -> Refused {
    Refused {
        method,
        path: path.to_owned(),
        body: body.to_owned(),
        headers: Vec::new(),
        token: Token::Right,
        status,
        words,
    }
}

impl Refused {
    fn with(mut self, name: &'static str, value: &str) -> Refused {
        self.headers.push((name, value.to_owned()));
        self
    }

    fn token(mut self, token: Token) -> Refused {
        self.token = token;
        self
    }
}

impl TestNode {
    /// Any request, with the token or not.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: &str,
        token: Token,
        headers: &[(&str, String)],
    ) -> (u16, String) {
        let mut req = ureq::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        match token {
            Token::Right => req = req.header("Authorization", self.auth()),
            Token::Wrong => req = req.header("Authorization", "Bearer 0123456789abcdef"),
            Token::Missing => {}
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        // A connection of its own: one the node closed after a refusal is never reused.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        finish(agent.run(req.body(body.as_bytes()).unwrap()).unwrap())
    }

    /// Sends every case; each must be refused as it says, with a JSON message, leaving the
    /// state exactly as it was (the API's view and the file, byte for byte).
    fn assert_refused(&self, cases: Vec<Refused>) {
        let before = self.state();
        for c in cases {
            let what = format!("{} {} {:?} {:.80}", c.method, c.path, c.token, c.body);
            let (status, answer) = self.request(c.method, &c.path, &c.body, c.token, &c.headers);
            assert_eq!(status, c.status, "{what} -> {answer}");
            let v: Value = serde_json::from_str(&answer)
                .unwrap_or_else(|e| panic!("{what}: the answer is not JSON ({e}): {answer}"));
            let msg = v["error"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no \"error\" in {answer}"));
            assert!(msg.contains(c.words), "{what}: {msg:?} lacks {:?}", c.words);
            assert_eq!(self.state(), before, "state changed by a refused {what}");
        }
    }
}

/// A node with exit `x` (used by peer `p`, which has a preshared key) and exit `y` (unused).
fn provisioned(tag: &str) -> (TestNode, String, String, String) {
    let n = TestNode::start(tag, vec![]);
    let (x, y, p) = (key(), key(), key());
    assert_eq!(
        n.send("POST", "/v1/exits", &exit_json("x", &x, 1), &[]).0,
        201
    );
    assert_eq!(
        n.send("POST", "/v1/exits", &exit_json("y", &y, 2), &[]).0,
        201
    );
    let peer = json!({"public_key": p, "name": "p", "allowed_ips": ["10.0.0.2/32"],
                      "preshared_key": key(), "allowed_exits": [x]});
    assert_eq!(n.send("POST", "/v1/peers", &peer.to_string(), &[]).0, 201);
    (n, x, y, p)
}

#[test]
fn peers_good_and_bad_input_leave_state_exactly_as_it_was() {
    let (n, x, _y, p) = provisioned("peers-matrix");
    let fresh = key();
    let peer = |f: &dyn Fn(&mut Value)| {
        let mut v = json!({"public_key": fresh, "name": "q", "allowed_ips": ["10.0.0.3/32"],
                           "preshared_key": key(), "allowed_exits": [x]});
        f(&mut v);
        v.to_string()
    };
    let post = |body: String, status, words| refused("POST", "/v1/peers", &body, status, words);
    n.assert_refused(vec![
        post("{not json".into(), 400, "invalid request body"),
        post("[]".into(), 400, "invalid request body"),
        post(peer(&|v| v["public_key"] = json!("!!!")), 400, "base64"),
        post(peer(&|v| v["public_key"] = json!("AAAA")), 400, "32 bytes"),
        post(peer(&|v| v["preshared_key"] = json!("!!!")), 400, "base64"),
        post(
            peer(&|v| v["preshared_key"] = json!("AAAA")),
            400,
            "32 bytes",
        ),
        post(
            peer(&|v| v["allowed_ips"] = json!(["10.0.0.0/40"])),
            400,
            "prefix length",
        ),
        post(
            peer(&|v| v["allowed_ips"] = json!(["ten"])),
            400,
            "not an IP network",
        ),
        post(
            peer(&|v| v["allowed_ips"] = json!([])),
            400,
            "must not be empty",
        ),
        post(
            peer(&|v| v["endpoint"] = json!("192.0.2.9:0")),
            400,
            "port 0",
        ),
        post(
            peer(&|v| v["endpoint"] = json!("0.0.0.0:51820")),
            400,
            "unspecified",
        ),
        post(
            peer(&|v| v["endpoint"] = json!("no-such-host.invalid:51820")),
            400,
            "no-such-host.invalid",
        ),
        post(
            peer(&|v| v["persistent_keepalive"] = json!(70000)),
            400,
            "invalid request body",
        ),
        post(
            peer(&|v| v["persistent_keepalive"] = json!(-1)),
            400,
            "invalid request body",
        ),
        post(
            peer(&|v| {
                v.as_object_mut().unwrap().remove("allowed_ips");
            }),
            400,
            "missing field `allowed_ips`",
        ),
        post(
            peer(&|v| v["allowed_exits"] = json!([key()])),
            400,
            "not a configured exit",
        ),
        post(
            peer(&|v| v["allowed_exits"] = json!(["AAAA"])),
            400,
            "32 bytes",
        ),
        post(
            peer(&|v| v["name"] = json!("n".repeat(65))),
            400,
            "at most 64",
        ),
        post(peer(&|v| v["colour"] = json!("red")), 400, "unknown field"),
        post(peer(&|v| v["public_key"] = json!(p)), 409, "already exists"),
        post(
            peer(&|v| v["public_key"] = json!(x)),
            409,
            "also configured as an exit",
        ),
        post(
            peer(&|v| v["name"] = json!("x".repeat(100_000))),
            413,
            "larger than 65536 bytes",
        ),
    ]);
    n.assert_refused(vec![
        refused("DELETE", "/v1/peers/notakey!", "", 400, "base64url"),
        refused("DELETE", "/v1/peers/AAAA", "", 400, "32 bytes"),
        refused(
            "DELETE",
            &format!("/v1/peers/{}", url_key(&fresh)),
            "",
            404,
            "no peer",
        ),
        refused(
            "GET",
            &format!("/v1/peers/{}", url_key(&p)),
            "",
            405,
            "allowed: DELETE",
        ),
        refused(
            "PATCH",
            "/v1/peers",
            &peer(&|_| {}),
            405,
            "PATCH is not allowed",
        ),
    ]);
    // The good request from which every bad one above was made goes through.
    assert_eq!(n.send("POST", "/v1/peers", &peer(&|_| {}), &[]).0, 201);
    assert_eq!(
        n.send("DELETE", &format!("/v1/peers/{}", url_key(&fresh)), "", &[])
            .0,
        204
    );
}

#[test]
fn whole_config_bad_input_leaves_state_exactly_as_it_was() {
    let (n, x, y, p) = provisioned("config-matrix");
    let current = n.json("/v1/config");
    let g = current["generation"].as_u64().unwrap();
    let edited = |f: &dyn Fn(&mut Value)| {
        let mut v = current.clone();
        f(&mut v);
        v.to_string()
    };
    let put = |body: String, status, words| {
        refused("PUT", "/v1/config", &body, status, words).with("If-Match", &g.to_string())
    };
    n.assert_refused(vec![
        put("{not json".into(), 400, "invalid request body"),
        put(
            edited(&|v| v["exits"][0]["public_key"] = json!("!!!")),
            400,
            "base64",
        ),
        put(
            edited(&|v| v["exits"][0]["public_key"] = json!("AAAA")),
            400,
            "32 bytes",
        ),
        put(
            edited(&|v| v["peers"][0]["public_key"] = json!("AAAA")),
            400,
            "32 bytes",
        ),
        put(
            edited(&|v| v["peers"][0]["preshared_key"] = json!("!!!")),
            400,
            "base64",
        ),
        put(
            edited(&|v| v["exits"][0]["endpoint"] = json!("nowhere")),
            400,
            "invalid",
        ),
        put(
            edited(&|v| v["exits"][0]["endpoint"] = json!("0.0.0.0:1")),
            400,
            "endpoint",
        ),
        put(
            edited(&|v| v["exits"][1]["public_key"] = json!(x)),
            409,
            "already used",
        ),
        put(
            edited(&|v| v["exits"][1]["name"] = json!("x")),
            409,
            "used twice",
        ),
        put(
            edited(&|v| {
                let again = v["peers"][0].clone();
                v["peers"].as_array_mut().unwrap().push(again);
            }),
            409,
            "used twice",
        ),
        put(
            edited(&|v| v["peers"][0]["allowed_exits"] = json!([key()])),
            400,
            "not a configured exit",
        ),
        put(
            edited(&|v| v["colour"] = json!("red")),
            400,
            "unknown field",
        ),
        // The document says int64: the one past its largest is refused, not ignored.
        put(
            edited(&|v| v["generation"] = json!(1u64 << 63)),
            400,
            "past the largest",
        ),
        put(edited(&|v| v["generation"] = json!(-1)), 400, "invalid"),
        refused("PUT", "/v1/config", &current.to_string(), 428, "If-Match"),
        refused(
            "PUT",
            "/v1/config",
            &current.to_string(),
            400,
            "generation number",
        )
        .with("If-Match", "latest"),
        refused(
            "PUT",
            "/v1/config",
            &current.to_string(),
            412,
            "stale generation",
        )
        .with("If-Match", &(g - 1).to_string()),
        refused(
            "POST",
            "/v1/config",
            &current.to_string(),
            405,
            "allowed: GET, PUT",
        ),
    ]);
    // One byte past the 64 MiB a whole table may take. Sent by hand, all of it before the
    // answer is read: a client still writing when the node answers may be reset instead.
    let before = n.state();
    let addr = n.url.trim_start_matches("http://").to_owned();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "PUT /v1/config HTTP/1.1\r\nHost: node\r\nConnection: close\r\nAuthorization: Bearer {}\r\nIf-Match: {g}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        n.token,
        (64 << 20) + 1
    )
    .unwrap();
    let chunk = vec![b' '; 1 << 20];
    for _ in 0..64 {
        conn.write_all(&chunk).unwrap();
    }
    conn.write_all(b" ").unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains(
            "{\"error\":\"request body larger than 67108864 bytes, the limit for /v1/config\"}"
        ),
        "{answer}"
    );
    drop(conn);
    assert_eq!(n.state(), before);
    // Removing exit y alone is good, so every refusal above was for its own reason.
    let without_y = edited(&|v| {
        v["exits"]
            .as_array_mut()
            .unwrap()
            .retain(|e| e["public_key"] != y.as_str());
    });
    let (status, body) = n.send(
        "PUT",
        "/v1/config",
        &without_y,
        &[("If-Match", &g.to_string())],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(n.json("/v1/peers")[0]["public_key"], p.as_str());
}

/// A request that changes something: method, path, body, headers.
type Mutation = (&'static str, String, String, Vec<(&'static str, String)>);

#[test]
fn every_mutation_needs_the_token_and_no_browser_headers() {
    let (n, x, y, p) = provisioned("guard-matrix");
    let g = n.json("/v1/config")["generation"].to_string();
    let whole = n.json("/v1/config").to_string();
    // Requests that would succeed with the right token and no browser headers.
    // The PUT first: each success below moves the generation on.
    let mutations: Vec<Mutation> = vec![
        ("PUT", "/v1/config".into(), whole, vec![("If-Match", g)]),
        (
            "POST",
            "/v1/exits".into(),
            exit_json("z", &key(), 3),
            vec![],
        ),
        (
            "DELETE",
            format!("/v1/exits/{}", url_key(&y)),
            String::new(),
            vec![],
        ),
        (
            "POST",
            "/v1/peers".into(),
            json!({"public_key": key(), "allowed_ips": ["10.0.0.9/32"], "allowed_exits": [x]})
                .to_string(),
            vec![],
        ),
        (
            "DELETE",
            format!("/v1/peers/{}", url_key(&p)),
            String::new(),
            vec![],
        ),
        ("DELETE", "/v1/sessions/0.0.0".into(), String::new(), vec![]),
    ];
    let mut cases = Vec::new();
    for (method, path, body, headers) in &mutations {
        let case = |status, words| {
            let mut r = refused(method, path, body, status, words);
            r.headers = headers.clone();
            r
        };
        cases.push(case(401, "missing Authorization: Bearer").token(Token::Missing));
        cases.push(case(401, "wrong token").token(Token::Wrong));
        for h in ["Origin", "Referer"] {
            cases.push(case(403, "Origin or Referer").with(h, "https://evil.example"));
            cases.push(
                case(403, "Origin or Referer")
                    .with(h, "https://evil.example")
                    .token(Token::Missing),
            );
        }
    }
    n.assert_refused(cases);
    // With the token they go through (the session one: there is none to close).
    for (method, path, body, headers) in &mutations {
        let (status, answer) = n.request(method, path, body, Token::Right, headers);
        let want = if path.starts_with("/v1/sessions") {
            404
        } else {
            200
        };
        assert!(
            status == want || (want == 200 && (status == 201 || status == 204)),
            "{method} {path} -> {status} {answer}"
        );
    }
}

#[test]
fn the_openapi_document_names_every_route_served() {
    let n = TestNode::start("openapi", vec![]);
    let doc = n.json("/v1/openapi.json");
    let paths = doc["paths"].as_object().expect("paths");
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH"];
    for (path, served) in wraithgate_control::api::ROUTES {
        let documented = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is served but not documented"));
        let concrete = path
            .replace("{key}", &url_key(&key()))
            .replace("{id}", "0.0.0");
        for m in methods {
            let in_doc = documented.get(m.to_lowercase()).is_some();
            // An empty body: every handler refuses it or ignores it; nothing changes.
            let (status, answer) = n.request(m, &concrete, "", Token::Right, &[]);
            let is_served = status != 405 && !answer.contains("no such resource");
            assert_eq!(
                served.contains(&m),
                is_served,
                "{m} {path}: listed in ROUTES and served must agree ({status} {answer:.100})"
            );
            assert_eq!(
                in_doc, is_served,
                "{m} {path}: documented and served must agree"
            );
        }
    }
    for path in paths.keys() {
        assert!(
            wraithgate_control::api::ROUTES
                .iter()
                .any(|(p, _)| p == path),
            "{path} is documented but not served"
        );
    }
}

/// The calling thread's allowed CPUs and nice value, as the kernel reports them.
fn this_thread_cpus_and_nice() -> (Vec<usize>, i64) {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // nice is field 19.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let nice = after.split(' ').nth(16).unwrap().parse().unwrap();
    (cpus, nice)
}

#[test]
fn control_threads_keep_off_the_workers_cores_or_yield_to_them() {
    let (all, _) = this_thread_cpus_and_nice();
    for pin_workers in [true, false] {
        let dir = temp_dir("placement");
        let mut cfg = config(&dir, vec![], None);
        cfg.data_plane.pin_workers = pin_workers;
        cfg.control.api_enabled = false;
        let node = Node::start(cfg).unwrap();
        let dp = node.control.dp.clone();
        let (placement, cpus, nice) = std::thread::spawn(move || {
            let p = dp.settle_control_thread();
            let (cpus, nice) = this_thread_cpus_and_nice();
            (p, cpus, nice)
        })
        .join()
        .unwrap();
        use wraithgate_relay::io::{ControlPlacement, CONTROL_THREAD_NICE};
        if pin_workers && all.len() > 1 {
            // One worker, pinned to the first core this process may use; the rest is ours.
            assert_eq!(placement, ControlPlacement::SpareCores(all[1..].to_vec()));
            assert_eq!(cpus, all[1..], "allowed CPUs");
        } else {
            assert_eq!(placement, ControlPlacement::Niced(CONTROL_THREAD_NICE));
            assert_eq!(nice, i64::from(CONTROL_THREAD_NICE));
            assert_eq!(cpus, all, "allowed CPUs unchanged");
        }
        node.stop();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn an_exit_pinned_to_a_configured_listen_port_is_refused_and_changes_nothing() {
    let n = TestNode::start("pin-listen", vec![]);
    let (_client, mut exit, _, _) = tunnel(&n);
    let listen = n.relay_addr().port();
    let k = key();
    let body = json!({"public_key": k, "endpoint": "192.0.2.1:51820", "name": "decoy",
                      "listen_port": listen})
    .to_string();
    let whole = json!({"exits": [{"public_key": k, "endpoint": "192.0.2.1:51820",
                                  "name": "decoy", "listen_port": listen}]})
    .to_string();
    let generation = n.state().0["generation"].to_string();
    let words = "is a configured [relay] listen port";
    n.assert_refused(vec![
        refused("POST", "/v1/exits", &body, 409, words),
        refused("PUT", "/v1/config", &whole, 409, words).with("If-Match", &generation),
        refused("PUT", "/v1/config?dry_run=true", &whole, 409, words).with("If-Match", &generation),
    ]);
    // The exit already there still gets new clients on that port (found by mac1).
    let mut client = WgNode::bind(any_loopback(), KeyPair::generate()).unwrap();
    let cp = client.add_peer(
        exit.keys().public,
        PeerOptions {
            endpoint: Some(n.relay_addr()),
            ..Default::default()
        },
    );
    exit.add_peer(client.keys().public, PeerOptions::default());
    let (s, d) = tunnel_addrs(2);
    client
        .send_ip(cp, &ipv4_udp(s, d, 1, 2, b"new client"))
        .unwrap();
    let got = wraithgate_testkit::wait_for(Duration::from_secs(10), || {
        let _ = client.try_recv();
        match exit.try_recv() {
            Ok(Some(Received::Packet { data, .. })) => {
                (udp_payload(&data) == Some(&b"new client"[..])).then_some(())
            }
            _ => None,
        }
    });
    assert!(got.is_some(), "a new client of the exit got through");
}

#[test]
fn re_applying_the_state_in_use_is_a_no_op_and_keeps_the_generation() {
    let n = TestNode::start("noop", vec![]);
    let (ka, kb) = (key(), key());
    let desired = json!({"exits": [
        {"public_key": ka, "endpoint": "192.0.2.1:51820", "name": "a"},
        {"public_key": kb, "endpoint": "192.0.2.2:51820", "name": "b"}
    ], "peers": [{"public_key": key(), "allowed_ips": ["10.77.0.9/24"], "allowed_exits": [ka]}]})
    .to_string();
    let (status, body) = n.send("PUT", "/v1/config", &desired, &[("If-Match", "1")]);
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["generation"].as_u64(), v["changed"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(v["changes"]["exits_added"], json!(["a", "b"]), "{v}");
    // Host bits are cleared, in the state file and in listings.
    assert_eq!(
        n.json("/v1/peers")[0]["allowed_ips"],
        json!(["10.77.0.0/24"])
    );
    let file = std::fs::read_to_string(n.dir.join("state.json")).unwrap();
    assert!(
        file.contains("10.77.0.0/24") && !file.contains("10.77.0.9"),
        "{file}"
    );
    let state_before = n.state();
    for _ in 0..3 {
        let (status, body) = n.send("PUT", "/v1/config", &desired, &[("If-Match", "2")]);
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["generation"].as_u64(), v["changed"].as_bool()),
            (Some(2), Some(false)),
            "{v}"
        );
    }
    assert_eq!(n.state(), state_before);
    assert_eq!(
        std::fs::read_to_string(n.dir.join("state.json")).unwrap(),
        file
    );
    // A dry run names the difference and changes nothing.
    let moved = desired.replace("192.0.2.2:51820", "192.0.2.3:51820");
    let (status, body) = n.send(
        "PUT",
        "/v1/config?dry_run=true",
        &moved,
        &[("If-Match", "2")],
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["changes"]["exits_changed"],
        json!(["b (endpoint 192.0.2.2:51820 -> 192.0.2.3:51820)"]),
        "{v}"
    );
    assert_eq!(n.state(), state_before);
    let (status, body) = n.send(
        "PUT",
        "/v1/config?dry_run=maybe",
        &moved,
        &[("If-Match", "2")],
    );
    assert_eq!(status, 400, "{body}");
}

#[test]
fn an_endpoint_change_says_which_exit_and_how_many_sessions_it_closes() {
    let n = TestNode::start("endpoint", vec![]);
    let (_client, exit, _, _) = tunnel(&n);
    let sessions = wraithgate_testkit::wait_for(Duration::from_secs(5), || {
        let s = n.json("/v1/sessions");
        (s.as_array().unwrap().len() == 1).then_some(())
    });
    assert!(sessions.is_some(), "one session through the node");
    let (status, body) = n.get("/v1/config");
    assert_eq!(status, 200);
    let mut config: Value = serde_json::from_str(&body).unwrap();
    let generation = config["generation"].to_string();
    let moved_to = "127.0.0.1:9";
    config["exits"][0]["endpoint"] = json!(moved_to);
    let (status, body) = n.send(
        "PUT",
        "/v1/config",
        &config.to_string(),
        &[("If-Match", &generation)],
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["sessions_closed"],
        json!([{"exit": "x", "exit_key": exit.keys().relay_key().to_base64(), "sessions": 1}]),
        "{v}"
    );
    assert_eq!(
        v["changes"]["exits_changed"],
        json!([format!("x (endpoint {} -> {moved_to})", exit.local_addr())]),
        "{v}"
    );
    let gone = wraithgate_testkit::wait_for(Duration::from_secs(5), || {
        n.json("/v1/sessions")
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "the session was closed");
}

#[test]
fn metrics_include_process_and_build_info() {
    let n = TestNode::start("process", vec![]);
    let (scrape, text) = scrape(&n);
    let one = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => panic!("{name} is not a gauge"),
            })
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    let open = one("process_open_fds");
    let max = one("process_max_fds");
    // The node, its data plane and this test's own descriptors share the process.
    let ours = std::fs::read_dir("/proc/self/fd").unwrap().count() as f64;
    assert!(
        open >= 5.0 && (open - ours).abs() < 50.0,
        "{open} open, {ours} here"
    );
    assert!(max >= open, "{max} max, {open} open");
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    assert!(limits.contains(&format!(" {max} ")), "{max}:\n{limits}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = one("process_start_time_seconds");
    assert!(
        start <= now && start > now - 600.0,
        "start {start}, now {now}"
    );
    assert!(one("process_resident_memory_bytes") > 1e6);
    let build = scrape
        .samples
        .iter()
        .find(|s| s.metric == "wraithgate_build_info")
        .expect("wraithgate_build_info");
    assert_eq!(build.labels.get("version"), Some(env!("CARGO_PKG_VERSION")));
    assert!(build.labels.get("commit").is_some_and(|c| !c.is_empty()));
}

#[test]
fn a_saved_state_pinning_a_configured_listen_port_is_refused_at_start() {
    let dir = temp_dir("pinned-state");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let k = key();
    std::fs::write(
        dir.join("state.json"),
        json!({"generation": 3, "exits": [{"public_key": k, "endpoint": "192.0.2.1:51820",
                                            "name": "decoy", "listen_port": port}]})
        .to_string(),
    )
    .unwrap();
    let mut cfg = config(&dir, vec![], None);
    cfg.data_plane.listen = vec![format!("127.0.0.1:{port}").parse().unwrap()];
    let err = format!("{:#}", Node::start(cfg).unwrap_err());
    assert!(
        err.contains("state.json")
            && err.contains(&format!(
                "listen_port {port} is a configured [relay] listen port"
            )),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 19: a read-only credential for scrapers. `metrics.token` (created 0600 beside the
/// API token) reads `GET /metrics` and nothing else: a Prometheus that holds it cannot list
/// or change anything.
#[test]
fn the_metrics_token_reads_metrics_and_nothing_else() {
    use std::os::unix::fs::PermissionsExt as _;
    let n = TestNode::start("metrics-token", Vec::new());
    let path = n.dir.join("metrics.token");
    let token = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_ne!(token.trim(), n.token.trim(), "two different tokens");
    let call = |method: &str, path: &str| -> u16 {
        let url = format!("{}{path}", n.url);
        let auth = format!("Bearer {}", token.trim());
        let r = match method {
            "GET" => n.agent.get(url).header("Authorization", auth).call(),
            "POST" => n
                .agent
                .post(url)
                .header("Authorization", auth)
                .content_type("application/json")
                .send("{}"),
            "DELETE" => n.agent.delete(url).header("Authorization", auth).call(),
            _ => unreachable!(),
        };
        r.unwrap().status().as_u16()
    };
    assert_eq!(call("GET", "/metrics"), 200);
    for (method, path) in [
        ("GET", "/v1/exits"),
        ("GET", "/v1/config"),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/node"),
        ("POST", "/v1/exits"),
        ("DELETE", "/v1/sessions/0.0.1"),
    ] {
        assert_eq!(
            call(method, path),
            403,
            "{method} {path} with the metrics token"
        );
    }
    // The API token still opens everything.
    assert_eq!(n.get("/v1/exits").0, 200);
    assert_eq!(n.get("/metrics").0, 200);
}

/// Issue 19: an exit's endpoint may be given as `host:port`; it is resolved when the change
/// is applied (as `wg` does) and the address is what the node keeps. A name that does not
/// resolve is refused with a message naming it, and nothing changes.
#[test]
fn host_name_endpoints_are_resolved_or_refused_by_name() {
    let n = TestNode::start("hostname", Vec::new());
    let key = "ERERERERERERERERERERERERERERERERERERERERERE=";
    let (status, body) = n.send(
        "POST",
        "/v1/exits",
        &format!(r#"{{"name":"by-name","public_key":"{key}","endpoint":"localhost:51999"}}"#),
        &[],
    );
    assert!((200..300).contains(&status), "{status} {body}");
    let (_, list) = n.get("/v1/exits");
    let list: Value = serde_json::from_str(&list).unwrap();
    let endpoint: SocketAddr = list[0]["endpoint"].as_str().unwrap().parse().unwrap();
    assert!(
        endpoint.ip().is_loopback() && endpoint.port() == 51999,
        "{list}"
    );
    let before = n.get("/v1/config").1;
    for bad in ["no-such-host.invalid:51820", "just-a-name", "host:99999"] {
        let (status, body) = n.send(
            "POST",
            "/v1/exits",
            &format!(r#"{{"name":"bad","public_key":"IiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiIiI=","endpoint":"{bad}"}}"#),
            &[],
        );
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body.contains(bad),
            "{bad}: the answer does not name it: {body}"
        );
        let (status, body) = n.send(
            "PATCH",
            &format!("/v1/exits/{}", key.replace('/', "_").replace('+', "-")),
            &format!(r#"{{"endpoint":"{bad}"}}"#),
            &[],
        );
        assert_eq!(status, 400, "PATCH {bad}: {body}");
    }
    assert_eq!(
        n.get("/v1/config").1,
        before,
        "a refused endpoint changed the state"
    );
}
