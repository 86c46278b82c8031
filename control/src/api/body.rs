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
use crate::openapi::{Key, TrafficSchema};
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
    #[serde(with = "wraithgate_relay::table::ip_networks")]
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
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = PeerStatusView)]
pub(crate) struct PeerView {
    #[schema(value_type = Key)]
    pub(super) public_key: PublicKey,
    pub(super) name: String,
    #[serde(with = "wraithgate_relay::table::ip_networks")]
    #[schema(value_type = Vec<String>)]
    pub(super) allowed_ips: Vec<IpNet>,
    #[schema(value_type = Vec<Key>)]
    pub(super) allowed_exits: Vec<PublicKey>,
    /// `"set"` when the peer has a preshared key (never the key).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub(super) preshared_key: Option<&'static str>,
    /// The configured endpoint (the node initiates to it).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub(super) endpoint: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) persistent_keepalive: Option<u16>,
    /// Where the peer was last seen, authenticated (its tunnel with the latest handshake).
    #[schema(value_type = Option<String>)]
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Peer, description = "A provisioned peer (Z-HOP): its outer tunnel ends at this node.")]
pub(crate) struct PeerEntry {
    #[schema(value_type = Key)]
    public_key: PublicKey,
    #[serde(default)]
    #[schema(max_length = 64)]
    name: String,
    /// Inner source addresses the peer may use.
    #[serde(with = "wraithgate_relay::table::ip_networks")]
    #[schema(value_type = Vec<String>, min_items = 1, example = json!(["10.0.0.2/32"]))]
    allowed_ips: Vec<IpNet>,
    /// Write-only: never shown. In PUT /v1/config a peer that leaves it out keeps the
    /// preshared key the node holds for its public key (so a state from GET /v1/config can
    /// be applied as it is); null removes it; a key sets it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, pattern = "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$")]
    preshared_key: Option<Option<PresharedKey>>,
    /// Public keys of the exits the peer may reach.
    #[serde(default)]
    #[schema(value_type = Vec<Key>)]
    allowed_exits: Vec<PublicKey>,
    /// Where the node reaches the peer before it has sent anything (`ip:port` or
    /// `host:port`, resolved when the change is applied): the node then initiates.
    #[serde(default, deserialize_with = "crate::endpoint::deserialize_option")]
    #[schema(value_type = Option<String>, example = "192.0.2.7:51820")]
    endpoint: Option<SocketAddr>,
    /// Seconds between keepalives the node sends when otherwise silent (0 or none: off).
    #[serde(default)]
    persistent_keepalive: Option<u16>,
}

/// A generation as a request may carry it: an int64 that is not negative (what the
/// OpenAPI document says; a u64 would take values past it).
fn generation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<u64>::deserialize(d)? {
        Some(g) if g > i64::MAX as u64 => Err(serde::de::Error::custom(format!(
            "generation {g} is past the largest one, {}",
            i64::MAX
        ))),
        g => Ok(g),
    }
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExitPatch {
    #[serde(default)]
    #[schema(value_type = String)]
    pub name: Option<String>,
    /// `ip:port`, or `host:port` resolved when the change is applied.
    #[serde(default, deserialize_with = "crate::endpoint::deserialize_option")]
    #[schema(value_type = String)]
    pub endpoint: Option<SocketAddr>,
    /// `null` unpins the exit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u16>, minimum = 1, maximum = 65535)]
    pub listen_port: Option<Option<u16>>,
}

/// An exit as the API takes it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Exit)]
pub(crate) struct ExitBody {
    #[schema(value_type = Key)]
    public_key: PublicKey,
    /// ip:port ([v6]:port), or host:port resolved when the change is applied (POST,
    /// PATCH; PUT /v1/config takes addresses).
    #[serde(deserialize_with = "crate::endpoint::deserialize")]
    #[schema(value_type = String, example = "192.0.2.10:51820")]
    endpoint: SocketAddr,
    #[schema(min_length = 1, max_length = 64)]
    name: String,
    /// A relay listen port whose initiations all go to this exit.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 65535)]
    listen_port: Option<u16>,
}

/// The whole desired state as `PUT /v1/config` takes it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Config)]
pub(crate) struct ConfigBody {
    /// Ignored on PUT; use If-Match. Must still be a generation (0 to 2^63-1, the
    /// int64 the document promises), so a client sending anything else hears so.
    #[serde(default, deserialize_with = "generation")]
    #[allow(dead_code)]
    #[schema(minimum = 0, maximum = 9223372036854775807_i64)]
    generation: Option<u64>,
    #[serde(default)]
    #[schema(value_type = Vec<ExitBody>)]
    exits: Vec<ExitSpec>,
    #[serde(default)]
    peers: Vec<PeerEntry>,
}

/// One session as the API lists it; never any payload.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Session)]
pub(crate) struct SessionView {
    #[schema(example = "0.12.3")]
    pub(super) id: String,
    pub(super) worker: usize,
    #[schema(value_type = String)]
    pub(super) client: SocketAddr,
    pub(super) exit: String,
    #[schema(value_type = Key)]
    pub(super) exit_key: PublicKey,
    #[schema(value_type = String)]
    pub(super) exit_endpoint: SocketAddr,
    pub(super) listen_port: u16,
    pub(super) established: bool,
    pub(super) verified: bool,
    /// Both paths: what the kernel fast path forwarded is part of it.
    #[schema(value_type = TrafficSchema)]
    pub(super) to_exit: Traffic,
    #[schema(value_type = TrafficSchema)]
    pub(super) to_client: Traffic,
    pub(super) fast_path: FastPathView,
    pub(super) handshakes: u64,
    pub(super) age_secs: f64,
    pub(super) idle_secs: f64,
    /// Unix time of the latest handshake seen completed (as `wg show dump` gives it);
    /// `null` before the first, and after a restart until the next.
    pub(super) latest_handshake: Option<u64>,
    /// The relay's exit-facing port of this session: the client's source port as the exit
    /// sees it (what an exit's abuse report names).
    pub(super) exit_port: Option<u16>,
}

/// `GET /v1/sessions?exit_port=P`: the one filter the listing takes, or none.
pub(super) fn sessions_query(query: Option<&str>) -> Result<Option<u16>, String> {
    let query = match query {
        None | Some("") => return Ok(None),
        Some(q) => q,
    };
    let mut port = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "exit_port" {
            return Err(format!(
                "unknown query parameter {k:?}; GET /v1/sessions takes only exit_port"
            ));
        }
        if port.is_some() {
            return Err("exit_port is given twice".into());
        }
        port = Some(
            v.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("exit_port {v:?} is not a port number (1-65535)"))?,
        );
    }
    Ok(port)
}

/// `GET /v1/stats`: the node's counters since start, summed over the workers (what
/// `/metrics` exports, for programs that want JSON rather than Prometheus text).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Stats)]
pub(crate) struct StatsView {
    /// Sessions held now (pending included), and those still pending.
    pub(super) sessions: u64,
    pub(super) sessions_pending: u64,
    pub(super) sessions_opened: u64,
    #[schema(value_type = TrafficSchema)]
    pub(super) to_exit: Traffic,
    #[schema(value_type = TrafficSchema)]
    pub(super) to_client: Traffic,
    pub(super) client_handshakes: u64,
    pub(super) exit_handshakes: u64,
    pub(super) cookie_replies: u64,
    /// Every drop reason with its count, zeros included.
    pub(super) drops: std::collections::BTreeMap<&'static str, u64>,
    pub(super) zhop: ZhopStatsView,
    /// What the kernel fast path forwarded (not in `to_exit`/`to_client`, which are the
    /// workers' own).
    #[schema(value_type = TrafficSchema)]
    pub(super) fast_path_to_exit: Traffic,
    #[schema(value_type = TrafficSchema)]
    pub(super) fast_path_to_client: Traffic,
    /// Per exit of the table, in its order.
    pub(super) exits: Vec<ExitStatsView>,
}

/// Z-HOP's part of [`StatsView`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ZhopStatsView {
    pub(super) peers: u64,
    pub(super) flows: u64,
    pub(super) outer_handshakes: u64,
    #[schema(value_type = TrafficSchema)]
    pub(super) to_exit: Traffic,
    #[schema(value_type = TrafficSchema)]
    pub(super) to_peer: Traffic,
}

/// One exit's DoubleHop counters in [`StatsView`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ExitStatsView {
    pub(super) name: String,
    #[schema(value_type = Key)]
    pub(super) public_key: PublicKey,
    pub(super) sessions: u64,
    pub(super) sessions_opened: u64,
    #[schema(value_type = TrafficSchema)]
    pub(super) to_exit: Traffic,
    #[schema(value_type = TrafficSchema)]
    pub(super) to_client: Traffic,
    pub(super) client_handshakes: u64,
    pub(super) exit_handshakes: u64,
    /// The drops decided once the exit was known, by reason, zeros included.
    pub(super) drops: std::collections::BTreeMap<&'static str, u64>,
}

/// A session's share of the kernel fast path.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct FastPathView {
    /// Whether the kernel forwards its transport messages now.
    pub(super) offloaded: bool,
    /// What the kernel forwarded, included in the session's totals.
    #[schema(value_type = TrafficSchema)]
    pub(super) to_exit: Traffic,
    #[schema(value_type = TrafficSchema)]
    pub(super) to_client: Traffic,
}
