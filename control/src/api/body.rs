//! The request bodies the API takes and the answers it gives, parsed exactly as its
//! handlers parse them.
//!
//! Public so that the fuzz targets (crate `wraithgate-fuzzing`) run the handlers' own
//! code; nothing else should need it. An error is the message the API answers with, under
//! 400 Bad Request.

use std::net::SocketAddr;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use wraithgate_relay::router::Traffic;
use wraithgate_relay::table::ExitSpec;
use wraithgate_relay::PublicKey;

use super::error::{bad_request, ApiError};
use crate::state::{DesiredState, IpNet, PeerSpec, PresharedKey};

/// `POST /v1/exits`.
pub fn exit(body: &[u8]) -> Result<ExitSpec, String> {
    let e: ExitBody = parse_json(body)?;
    Ok(ExitSpec {
        name: e.name,
        public_key: e.public_key,
        endpoint: e.endpoint,
        listen_port: e.listen_port,
    })
}

/// `PATCH /v1/exits/{key}`: the fields to change, at least one.
pub fn exit_patch(body: &[u8]) -> Result<ExitPatch, String> {
    let p: ExitPatch = parse_json(body)?;
    if p.name.is_none() && p.endpoint.is_none() && p.listen_port.is_none() {
        return Err("nothing to change: give name, endpoint or listen_port (null unpins)".into());
    }
    Ok(p)
}

/// `POST /v1/peers`: a peer, its `endpoint` (`ip:port`, or `host:port` resolved now)
/// included.
pub fn peer(body: &[u8]) -> Result<PeerSpec, String> {
    let p: PeerBody = parse_json(body)?;
    Ok(PeerSpec {
        public_key: p.public_key,
        name: p.name,
        allowed_ips: p.allowed_ips,
        preshared_key: p.preshared_key,
        allowed_exits: p.allowed_exits,
        endpoint: p.endpoint,
        persistent_keepalive: p.persistent_keepalive,
    })
}

/// A peer as `POST /v1/peers` takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerBody {
    public_key: PublicKey,
    #[serde(default)]
    name: String,
    allowed_ips: Vec<IpNet>,
    #[serde(default)]
    preshared_key: Option<PresharedKey>,
    #[serde(default)]
    allowed_exits: Vec<PublicKey>,
    #[serde(default, deserialize_with = "crate::endpoint::deserialize_option")]
    endpoint: Option<SocketAddr>,
    #[serde(default)]
    persistent_keepalive: Option<u16>,
}

/// A peer as `GET /v1/peers` shows it: its settings (a preshared key only as `"set"`) and,
/// as `wg show` does, what the workers' tunnels with it report.
#[derive(Debug, Serialize)]
pub(super) struct PeerView {
    pub(super) public_key: PublicKey,
    pub(super) name: String,
    pub(super) allowed_ips: Vec<IpNet>,
    pub(super) allowed_exits: Vec<PublicKey>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) preshared_key: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) endpoint: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) persistent_keepalive: Option<u16>,
    /// Where the peer was last seen, authenticated (its tunnel with the latest handshake).
    pub(super) current_endpoint: Option<SocketAddr>,
    pub(super) latest_handshake_secs_ago: Option<u64>,
    /// Bytes received from and sent to the peer, over every worker's tunnel with it.
    pub(super) rx_bytes: u64,
    pub(super) tx_bytes: u64,
}

impl PeerView {
    /// `spec` with what `statuses` (every worker's tunnels) say of it.
    pub(super) fn new(spec: &PeerSpec, statuses: &[wraithgate_relay::zhop::PeerStatus]) -> Self {
        let mine = statuses.iter().filter(|s| s.public_key == spec.public_key);
        let latest = mine
            .clone()
            .filter(|s| s.latest_handshake_secs_ago.is_some())
            .min_by_key(|s| s.latest_handshake_secs_ago);
        PeerView {
            public_key: spec.public_key,
            name: spec.name.clone(),
            allowed_ips: spec.allowed_ips.clone(),
            allowed_exits: spec.allowed_exits.clone(),
            preshared_key: spec.preshared_key.as_ref().map(|_| "set"),
            endpoint: spec.endpoint,
            persistent_keepalive: spec.persistent_keepalive,
            current_endpoint: latest.and_then(|s| s.endpoint),
            latest_handshake_secs_ago: latest.and_then(|s| s.latest_handshake_secs_ago),
            rx_bytes: mine.clone().map(|s| s.rx_bytes).sum(),
            tx_bytes: mine.map(|s| s.tx_bytes).sum(),
        }
    }
}

/// `PUT /v1/config`: the new exits and peers. A peer that leaves `preshared_key` out
/// keeps the one the node holds for its key, so it is resolved against the node's
/// state ([`WholeState::resolve`]).
pub fn whole_state(body: &[u8]) -> Result<WholeState, String> {
    let c: ConfigBody = parse_json(body)?;
    Ok(WholeState {
        exits: c.exits,
        peers: c.peers,
    })
}

/// `PUT /v1/config` sent to a node with no peers, as a state of generation 0 (the
/// node assigns generations).
pub fn config(body: &[u8]) -> Result<DesiredState, String> {
    Ok(whole_state(body)?.resolve(&DesiredState::default()))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))
}

/// A whole state as `PUT /v1/config` takes it, before it meets the node's own.
///
/// `GET /v1/config` never shows preshared keys, so a state fetched, edited and put back
/// has none: a peer entry without `preshared_key` keeps the key stored for that peer, an
/// explicit `null` removes it, a key sets it.
#[derive(Debug)]
pub struct WholeState {
    exits: Vec<ExitSpec>,
    peers: Vec<PeerEntry>,
}

impl WholeState {
    /// The state this makes of `current`, as generation 0 (the node assigns generations).
    pub fn resolve(self, current: &DesiredState) -> DesiredState {
        let kept: std::collections::HashMap<PublicKey, &PresharedKey> = current
            .peers
            .iter()
            .filter_map(|p| p.preshared_key.as_ref().map(|k| (p.public_key, k)))
            .collect();
        let peers = self
            .peers
            .into_iter()
            .map(|p| PeerSpec {
                preshared_key: match p.preshared_key {
                    Some(given) => given,
                    None => kept.get(&p.public_key).map(|k| (*k).clone()),
                },
                public_key: p.public_key,
                name: p.name,
                allowed_ips: p.allowed_ips,
                allowed_exits: p.allowed_exits,
                endpoint: p.endpoint,
                persistent_keepalive: p.persistent_keepalive,
            })
            .collect();
        DesiredState {
            generation: 0,
            exits: self.exits,
            peers,
        }
    }
}

/// A peer in a whole state: [`PeerSpec`], but telling a left-out `preshared_key` (keep
/// the stored one) from `null` (remove it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerEntry {
    public_key: PublicKey,
    #[serde(default)]
    name: String,
    allowed_ips: Vec<IpNet>,
    #[serde(default, deserialize_with = "present")]
    preshared_key: Option<Option<PresharedKey>>,
    #[serde(default)]
    allowed_exits: Vec<PublicKey>,
    #[serde(default, deserialize_with = "crate::endpoint::deserialize_option")]
    endpoint: Option<SocketAddr>,
    #[serde(default)]
    persistent_keepalive: Option<u16>,
}

/// A field that is present, whatever its value (`null` included); absent is the default.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A key from a URL path: base64url (as in the API's paths) or standard base64.
pub(super) fn key_from_path(s: &str) -> Result<PublicKey, ApiError> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    let bytes = URL_SAFE_NO_PAD
        .decode(s)
        .or_else(|_| URL_SAFE.decode(s))
        .or_else(|_| STANDARD.decode(s))
        .map_err(|_| bad_request(format!("{s:?} is not a base64url key")))?;
    let len = bytes.len();
    bytes
        .try_into()
        .map(PublicKey)
        .map_err(|_| bad_request(format!("a key is 32 bytes, {s:?} decodes to {len}")))
}

/// The fields of an exit that `PATCH /v1/exits/{key}` changes; one left out keeps its
/// value, `"listen_port": null` unpins the exit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "crate::endpoint::deserialize_option")]
    pub endpoint: Option<SocketAddr>,
    #[serde(default, deserialize_with = "present")]
    pub listen_port: Option<Option<u16>>,
}

/// An exit as the API takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExitBody {
    public_key: PublicKey,
    /// `ip:port`, or `host:port` resolved now.
    #[serde(deserialize_with = "crate::endpoint::deserialize")]
    endpoint: SocketAddr,
    name: String,
    #[serde(default)]
    listen_port: Option<u16>,
}

/// The whole desired state as `PUT /v1/config` takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBody {
    /// Ignored if present (the node assigns generations); `If-Match` carries the caller's.
    #[serde(default)]
    #[allow(dead_code)]
    generation: Option<u64>,
    #[serde(default)]
    exits: Vec<ExitSpec>,
    #[serde(default)]
    peers: Vec<PeerEntry>,
}

/// One session as the API lists it; never any payload.
#[derive(Debug, Serialize)]
pub(super) struct SessionView {
    pub(super) id: String,
    pub(super) worker: usize,
    pub(super) client: SocketAddr,
    pub(super) exit: String,
    pub(super) exit_key: PublicKey,
    pub(super) exit_endpoint: SocketAddr,
    pub(super) listen_port: u16,
    pub(super) established: bool,
    pub(super) verified: bool,
    pub(super) to_exit: Traffic,
    pub(super) to_client: Traffic,
    pub(super) handshakes: u64,
    pub(super) age_secs: f64,
    pub(super) idle_secs: f64,
}
