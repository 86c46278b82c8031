//! The operator API's request bodies and the state file they end up in.
//!
//! Every body the API accepts becomes a candidate state; `DesiredState::validate` must
//! agree with an independent reading of the rules, and a state it accepts must survive
//! being persisted and read back (the node reloads it on every start: a state the API
//! accepts but the node cannot reload would stop the node at its next restart).

use std::collections::HashSet;

use wraithgate_control::api::body;
use wraithgate_control::state::{DesiredState, PeerSpec};
use wraithgate_relay::table::ExitSpec;

pub fn check(data: &[u8]) {
    if let Ok(exit) = body::exit(data) {
        check_state(DesiredState {
            generation: 1,
            exits: vec![exit],
            peers: vec![],
        });
    }
    if let Ok(peer) = body::peer(data) {
        check_state(with_its_exits(peer));
    }
    if let Ok(state) = body::config(data) {
        check_state(state);
    }
    // The state file itself, as `StateFile::load` reads it.
    if let Ok(state) = serde_json::from_slice::<DesiredState>(data) {
        check_state(state);
    }
}

/// A state holding `peer` and an exit for each exit it may use.
fn with_its_exits(peer: PeerSpec) -> DesiredState {
    let mut keys = Vec::new();
    for k in &peer.allowed_exits {
        if !keys.contains(k) {
            keys.push(*k);
        }
    }
    let exits = keys
        .into_iter()
        .enumerate()
        .map(|(i, public_key)| ExitSpec {
            name: format!("exit-{i}"),
            public_key,
            endpoint: std::net::SocketAddr::from(([192, 0, 2, 1], 10_000 + i as u16)),
            listen_port: None,
        })
        .collect();
    DesiredState {
        generation: 1,
        exits,
        peers: vec![peer],
    }
}

/// The rules of DESIGN §6 ("keys are 32-byte base64, endpoints parse, no duplicates") and
/// of the state's documentation, written out once more.
fn valid(s: &DesiredState) -> bool {
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut ports = HashSet::new();
    for e in &s.exits {
        // Names are limited in characters (as JSON Schema's maxLength counts), not bytes.
        let name_ok = !e.name.is_empty() && e.name.chars().count() <= 64 && names.insert(&e.name);
        let endpoint_ok = e.endpoint.port() != 0 && !e.endpoint.ip().is_unspecified();
        let port_ok = match e.listen_port {
            Some(0) => false,
            Some(p) => ports.insert(p),
            None => true,
        };
        if !(name_ok && endpoint_ok && port_ok && keys.insert(e.public_key)) {
            return false;
        }
    }
    let mut peers = HashSet::new();
    s.peers.iter().all(|p| {
        peers.insert(p.public_key)
            && !keys.contains(&p.public_key)
            && !p.allowed_ips.is_empty()
            && p.name.chars().count() <= 64
            && p.allowed_exits.iter().all(|x| keys.contains(x))
    })
}

fn check_state(state: DesiredState) {
    for p in &state.peers {
        for net in &p.allowed_ips {
            assert!(
                net.contains(&net.addr()),
                "{net} does not contain its own address"
            );
        }
    }
    let verdict = state.validate();
    assert_eq!(
        verdict.is_ok(),
        valid(&state),
        "validate says {verdict:?} for {state:?}"
    );
    let Ok(table) = verdict else { return };
    assert_eq!(table.len(), state.exits.len());
    for e in &state.exits {
        let id = table
            .by_key(&e.public_key)
            .expect("every exit is in its table");
        assert_eq!(table.get(id).map(|x| &x.spec), Some(e));
        if let Some(port) = e.listen_port {
            assert_eq!(table.pinned(port), Some(id));
        }
    }
    // Persisted as `StateFile::save` does, read back as `StateFile::load` does.
    let json = serde_json::to_vec_pretty(&state).expect("a state serializes");
    let back: DesiredState = match serde_json::from_slice(&json) {
        Ok(b) => b,
        Err(e) => panic!(
            "an accepted state does not read back: {e}\n{}",
            String::from_utf8_lossy(&json)
        ),
    };
    assert_eq!(back, state, "the state changed on its way through the file");
    assert!(
        back.validate().is_ok(),
        "an accepted state is refused after a reload"
    );
}
