//! The immutable exit table workers route by.
//!
//! The control thread builds a new [`ExitTable`] for every change and publishes it through
//! [`SharedTable`]; workers pick it up once per batch. A table never changes after it is
//! built, so workers read it without locks, and everything derived from the keys (the
//! pre-keyed mac1 states, the port map) is computed once here rather than per packet.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::keys::{Mac1Key, PublicKey};

/// An exit as the operator configured it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitSpec {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: SocketAddr,
    /// A relay listen port whose initiations all go to this exit (port mapping).
    pub listen_port: Option<u16>,
}

/// Why a set of exits cannot become a table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("exit {name:?}: public key {key} is already used by exit {other:?}")]
    DuplicateKey {
        name: String,
        other: String,
        key: PublicKey,
    },
    #[error("exit {name:?}: listen port {port} is already pinned to exit {other:?}")]
    DuplicatePort {
        name: String,
        other: String,
        port: u16,
    },
    #[error("exit {name:?}: listen port 0 cannot be pinned")]
    ZeroPort { name: String },
    #[error("exit {name:?}: endpoint {endpoint} has port 0 or an unspecified address")]
    BadEndpoint { name: String, endpoint: SocketAddr },
    #[error("exit name {name:?} is used twice")]
    DuplicateName { name: String },
    #[error("peer {key}: public key is used twice")]
    DuplicatePeer { key: PublicKey },
    #[error("peer {key}: is also configured as an exit")]
    PeerIsExit { key: PublicKey },
    #[error("peer {key}: allowed_ips must not be empty")]
    NoAllowedIps { key: PublicKey },
    #[error("peer {key}: allowed exit {exit} is not a configured exit")]
    UnknownExit { key: PublicKey, exit: PublicKey },
    #[error("peer {key}: name must be at most 64 characters")]
    PeerName { key: PublicKey },
    #[error("peer {key}: endpoint {endpoint} has port 0 or an unspecified address")]
    PeerEndpoint {
        key: PublicKey,
        endpoint: SocketAddr,
    },
}

/// A provisioned peer with what workers need at hand: the endpoints it may reach.
#[derive(Debug, Clone)]
pub struct Peer {
    pub spec: PeerSpec,
    /// Endpoints of its allowed exits, resolved when the table is built.
    pub exit_endpoints: Vec<SocketAddr>,
    /// The worker holding the peer's tunnel ([`NO_OWNER`] while none does): where the
    /// Exit role hands a packet for it that the TUN gave another worker. Shared by every
    /// table the peer is in ([`ExitTable::keep_owners`]); written only when the tunnel
    /// moves (a handshake, roaming), read per TUN packet.
    pub owner: Arc<AtomicU32>,
}

/// [`Peer::owner`] while no worker holds a tunnel with the peer.
pub const NO_OWNER: u32 = u32::MAX;

impl Peer {
    /// The worker holding this peer's tunnel, if any.
    pub fn owner(&self) -> Option<usize> {
        match self.owner.load(Ordering::Relaxed) {
            NO_OWNER => None,
            w => Some(w as usize),
        }
    }

    /// Records that worker `w` holds the peer's tunnel (a store only when it changes, so
    /// the line stays shared between the workers that read it).
    pub fn set_owner(&self, w: usize) {
        if self.owner.load(Ordering::Relaxed) != w as u32 {
            self.owner.store(w as u32, Ordering::Relaxed);
        }
    }

    /// Whether an inner packet from `src` may go to `dst`.
    pub fn allows(&self, src: IpAddr, dst: SocketAddr) -> (bool, bool) {
        (
            self.spec.allowed_ips.iter().any(|n| n.contains(&src)),
            self.exit_endpoints.contains(&dst),
        )
    }
}

/// An IP network in CIDR notation (`10.0.0.0/24`, `fd00::/64`): the `ipnet` crate's.
pub use ipnet::IpNet;

/// Parses an IP network as the configuration and the API take it: CIDR notation, or a
/// bare address for that one host (`10.0.0.2` is `10.0.0.2/32`), as `wg` takes
/// `AllowedIPs`.
pub fn parse_network(s: &str) -> Result<IpNet, String> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = ip
        .parse()
        .map_err(|_| format!("{s:?} is not an IP network (like 10.0.0.0/24)"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        None => max,
    };
    IpNet::new(addr, prefix).map_err(|e| format!("{s:?}: {e}"))
}

/// Serde for a list of [`IpNet`]s as strings, parsed by [`parse_network`]
/// (`#[serde(with = "ip_networks")]`).
pub mod ip_networks {
    use super::IpNet;

    pub fn serialize<S: serde::Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(nets.iter().map(|n| n.to_string()))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
        let strings = <Vec<String> as serde::Deserialize>::deserialize(d)?;
        strings
            .iter()
            .map(|s| super::parse_network(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// A 32-byte preshared key, base64; never echoed back by the API.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey(pub [u8; 32]);

impl std::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresharedKey(..)")
    }
}

impl serde::Serialize for PresharedKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&PublicKey(self.0).to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PresharedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        PublicKey::from_base64(&s)
            .map(|k| PresharedKey(k.0))
            .map_err(serde::de::Error::custom)
    }
}

/// A provisioned peer (Z-HOP): its outer tunnel ends at this node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    pub public_key: PublicKey,
    #[serde(default)]
    pub name: String,
    /// Inner source addresses the peer may use.
    #[serde(with = "ip_networks")]
    pub allowed_ips: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<PresharedKey>,
    /// Public keys of the exits the peer may reach.
    #[serde(default)]
    pub allowed_exits: Vec<PublicKey>,
    /// Where the peer is reached before it has sent anything (Exit role: the node then
    /// initiates, as a WireGuard client does); resolved when the change is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<SocketAddr>,
    /// Seconds between keepalives the node sends when otherwise silent (0 or none: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_keepalive: Option<u16>,
}

/// Index of an exit within one table. Only meaningful together with that table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitId(pub u32);

/// One exit with its precomputed mac1 key.
#[derive(Debug, Clone)]
pub struct Exit {
    pub spec: ExitSpec,
    mac1: Mac1Key,
}

impl Exit {
    pub fn mac1_key(&self) -> &Mac1Key {
        &self.mac1
    }
}

/// An immutable snapshot of the configured exits.
#[derive(Debug, Default)]
pub struct ExitTable {
    generation: u64,
    exits: Vec<Exit>,
    by_key: HashMap<PublicKey, ExitId>,
    by_port: HashMap<u16, ExitId>,
    peers: HashMap<PublicKey, Peer>,
    /// Peers by their allowed IPs, for the Exit role's routing of TUN packets.
    routes: Routes,
    /// Peers with an endpoint and a persistent keepalive: the node keeps a tunnel with
    /// them up by itself, as `wg` does.
    keepalive_peers: Vec<PublicKey>,
}

/// Longest-prefix match over the peers' allowed IPs (the `ip_network_table` crate, the
/// structure boringtun's device uses).
struct Routes(ip_network_table::IpNetworkTable<PublicKey>);

impl Default for Routes {
    fn default() -> Self {
        Routes(ip_network_table::IpNetworkTable::new())
    }
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (v4, v6) = self.0.len();
        write!(f, "Routes({v4} IPv4, {v6} IPv6)")
    }
}

impl ExitTable {
    /// Validates `specs` and builds a table; nothing is built when anything is wrong.
    pub fn new(generation: u64, specs: Vec<ExitSpec>) -> Result<Self, TableError> {
        Self::build(generation, specs, None)
    }

    /// As [`ExitTable::new`], taking the pre-keyed mac1 state of every exit whose key
    /// `previous` already has from there instead of deriving it again (two BLAKE2s blocks
    /// each): a swap that keeps most of a large table costs a lookup per kept exit.
    pub fn new_after(
        generation: u64,
        specs: Vec<ExitSpec>,
        previous: &ExitTable,
    ) -> Result<Self, TableError> {
        Self::build(generation, specs, Some(previous))
    }

    fn build(
        generation: u64,
        specs: Vec<ExitSpec>,
        previous: Option<&ExitTable>,
    ) -> Result<Self, TableError> {
        let mut by_key = HashMap::with_capacity(specs.len());
        let mut by_port = HashMap::new();
        let mut names: HashMap<&str, ()> = HashMap::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let id = ExitId(i as u32);
            if names.insert(spec.name.as_str(), ()).is_some() {
                return Err(TableError::DuplicateName {
                    name: spec.name.clone(),
                });
            }
            if spec.endpoint.port() == 0 || spec.endpoint.ip().is_unspecified() {
                return Err(TableError::BadEndpoint {
                    name: spec.name.clone(),
                    endpoint: spec.endpoint,
                });
            }
            if let Some(prev) = by_key.insert(spec.public_key, id) {
                return Err(TableError::DuplicateKey {
                    name: spec.name.clone(),
                    other: specs[prev.0 as usize].name.clone(),
                    key: spec.public_key,
                });
            }
            if let Some(port) = spec.listen_port {
                if port == 0 {
                    return Err(TableError::ZeroPort {
                        name: spec.name.clone(),
                    });
                }
                if let Some(prev) = by_port.insert(port, id) {
                    return Err(TableError::DuplicatePort {
                        name: spec.name.clone(),
                        other: specs[prev.0 as usize].name.clone(),
                        port,
                    });
                }
            }
        }
        drop(names);
        let exits = specs
            .into_iter()
            .map(|spec| {
                let kept = previous
                    .and_then(|t| t.by_key.get(&spec.public_key))
                    .and_then(|&id| previous?.get(id));
                Exit {
                    mac1: kept.map_or_else(|| spec.public_key.mac1_key(), |e| e.mac1.clone()),
                    spec,
                }
            })
            .collect();
        Ok(ExitTable {
            generation,
            exits,
            by_key,
            by_port,
            peers: HashMap::new(),
            routes: Routes::default(),
            keepalive_peers: Vec::new(),
        })
    }

    /// Adds the provisioned peers (Z-HOP), each checked against this table's exits.
    pub fn with_peers(mut self, peers: Vec<PeerSpec>) -> Result<Self, TableError> {
        let mut seen = HashSet::new();
        for p in &peers {
            let key = p.public_key;
            if !seen.insert(key) {
                return Err(TableError::DuplicatePeer { key });
            }
            if self.by_key.contains_key(&key) {
                return Err(TableError::PeerIsExit { key });
            }
            if p.allowed_ips.is_empty() {
                return Err(TableError::NoAllowedIps { key });
            }
            if p.name.chars().count() > 64 {
                return Err(TableError::PeerName { key });
            }
            if let Some(endpoint) = p.endpoint {
                if endpoint.port() == 0 || endpoint.ip().is_unspecified() {
                    return Err(TableError::PeerEndpoint { key, endpoint });
                }
            }
            if let Some(exit) = p
                .allowed_exits
                .iter()
                .find(|x| !self.by_key.contains_key(x))
            {
                return Err(TableError::UnknownExit { key, exit: *exit });
            }
        }
        self.keepalive_peers = peers
            .iter()
            .filter(|p| p.endpoint.is_some() && p.persistent_keepalive.unwrap_or(0) > 0)
            .map(|p| p.public_key)
            .collect();
        let mut routes = ip_network_table::IpNetworkTable::new();
        for p in &peers {
            for net in &p.allowed_ips {
                let Ok(n) = ip_network::IpNetwork::new_truncate(net.addr(), net.prefix_len())
                else {
                    continue;
                };
                // Two peers claiming one prefix: the later in the list takes it, as the
                // peer configured last does in `wg`.
                routes.insert(n, p.public_key);
            }
        }
        self.peers = peers
            .into_iter()
            .map(|spec| {
                let exit_endpoints = spec
                    .allowed_exits
                    .iter()
                    .filter_map(|k| self.by_key.get(k))
                    .map(|id| self.exits[id.0 as usize].spec.endpoint)
                    .collect();
                (
                    spec.public_key,
                    Peer {
                        spec,
                        exit_endpoints,
                        owner: Arc::new(AtomicU32::new(NO_OWNER)),
                    },
                )
            })
            .collect();
        self.routes = Routes(routes);
        Ok(self)
    }

    /// The peer whose allowed IPs hold `dst` by longest prefix: where the Exit role sends
    /// a packet read from the TUN device.
    pub fn route(&self, dst: IpAddr) -> Option<&Peer> {
        let (_, key) = self.routes.0.longest_match(dst)?;
        self.peers.get(key)
    }

    /// Gives every peer that `previous` has too the owner cell it has there, so which
    /// worker holds a peer's tunnel survives a table swap.
    pub fn keep_owners(&mut self, previous: &ExitTable) {
        for (key, p) in &mut self.peers {
            if let Some(old) = previous.peers.get(key) {
                p.owner = old.owner.clone();
            }
        }
    }

    /// Peers with an endpoint and a persistent keepalive.
    pub fn keepalive_peers(&self) -> impl Iterator<Item = &Peer> {
        self.keepalive_peers
            .iter()
            .filter_map(|k| self.peers.get(k))
    }

    /// Every provisioned peer.
    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// A provisioned peer by its public key.
    pub fn peer(&self, key: &PublicKey) -> Option<&Peer> {
        self.peers.get(key)
    }

    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Increases with every published change; restored sessions and metrics refer to it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.exits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.exits.is_empty()
    }

    pub fn get(&self, id: ExitId) -> Option<&Exit> {
        self.exits.get(id.0 as usize)
    }

    pub fn iter(&self) -> impl Iterator<Item = (ExitId, &Exit)> {
        self.exits
            .iter()
            .enumerate()
            .map(|(i, e)| (ExitId(i as u32), e))
    }

    pub fn specs(&self) -> impl Iterator<Item = &ExitSpec> {
        self.exits.iter().map(|e| &e.spec)
    }

    pub fn by_key(&self, key: &PublicKey) -> Option<ExitId> {
        self.by_key.get(key).copied()
    }

    /// The exit pinned to a relay listen port, if any.
    pub fn pinned(&self, port: u16) -> Option<ExitId> {
        self.by_port.get(&port).copied()
    }

    /// Listen ports pinned to exits, for the I/O layer to bind.
    pub fn pinned_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.by_port.keys().copied()
    }

    /// The exit whose key produced `mac1` over `input`, trying every exit in table order.
    pub fn match_mac1(&self, input: &[u8], mac1: &[u8; 16]) -> Option<ExitId> {
        self.exits
            .iter()
            .position(|e| e.mac1.verify(input, mac1))
            .map(|i| ExitId(i as u32))
    }
}

/// The current table, shared between the control thread (writer) and the workers (readers).
///
/// Publishing is one atomic pointer swap; readers never wait for the writer.
#[derive(Debug, Clone)]
pub struct SharedTable {
    inner: Arc<ArcSwap<ExitTable>>,
}

impl SharedTable {
    pub fn new(table: ExitTable) -> Self {
        SharedTable {
            inner: Arc::new(ArcSwap::from_pointee(table)),
        }
    }

    /// The table as of now.
    pub fn load(&self) -> Arc<ExitTable> {
        self.inner.load_full()
    }

    /// The generation of the current table, without taking a reference to it.
    pub fn generation(&self) -> u64 {
        self.inner.load().generation
    }

    /// The current table if it is not `current` (one atomic load; no reference taken
    /// unless it changed). Workers call this once per batch.
    pub fn load_if_changed(&self, current: &Arc<ExitTable>) -> Option<Arc<ExitTable>> {
        let guard = self.inner.load();
        (!Arc::ptr_eq(&guard, current)).then(|| Arc::clone(&guard))
    }

    /// Makes `table` current for every worker's next batch.
    pub fn publish(&self, table: ExitTable) {
        self.inner.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, key: u8, port: Option<u16>) -> ExitSpec {
        ExitSpec {
            name: name.into(),
            public_key: PublicKey([key; 32]),
            endpoint: "192.0.2.1:51820".parse().unwrap(),
            listen_port: port,
        }
    }

    #[test]
    fn refuses_duplicates_and_bad_endpoints() {
        assert!(matches!(
            ExitTable::new(1, vec![spec("a", 1, None), spec("b", 1, None)]),
            Err(TableError::DuplicateKey { .. })
        ));
        assert!(matches!(
            ExitTable::new(1, vec![spec("a", 1, Some(5)), spec("b", 2, Some(5))]),
            Err(TableError::DuplicatePort { port: 5, .. })
        ));
        assert!(matches!(
            ExitTable::new(1, vec![spec("a", 1, None), spec("a", 2, None)]),
            Err(TableError::DuplicateName { .. })
        ));
        let mut bad = spec("a", 1, None);
        bad.endpoint = "0.0.0.0:51820".parse().unwrap();
        assert!(matches!(
            ExitTable::new(1, vec![bad]),
            Err(TableError::BadEndpoint { .. })
        ));
        assert!(matches!(
            ExitTable::new(1, vec![spec("a", 1, Some(0))]),
            Err(TableError::ZeroPort { .. })
        ));
    }

    #[test]
    fn finds_exits_by_key_port_and_mac1() {
        let t = ExitTable::new(3, vec![spec("a", 1, None), spec("b", 2, Some(51821))]).unwrap();
        assert_eq!(t.by_key(&PublicKey([2; 32])), Some(ExitId(1)));
        assert_eq!(t.pinned(51821), Some(ExitId(1)));
        assert_eq!(t.pinned(51820), None);
        let input = [9u8; 116];
        let mac = PublicKey([2; 32]).mac1_key().compute(&input);
        assert_eq!(t.match_mac1(&input, &mac), Some(ExitId(1)));
        assert_eq!(t.match_mac1(&input, &[0; 16]), None);
    }

    #[test]
    fn a_table_built_after_another_matches_mac1_for_kept_and_new_exits() {
        let old = ExitTable::new(1, vec![spec("a", 1, None), spec("b", 2, None)]).unwrap();
        // Exit 2 stays (moved in the list), 1 goes, 3 is new.
        let new =
            ExitTable::new_after(2, vec![spec("c", 3, None), spec("b", 2, None)], &old).unwrap();
        let input = [7u8; 116];
        for (key, id) in [(2u8, Some(ExitId(1))), (3, Some(ExitId(0))), (1, None)] {
            let mac = PublicKey([key; 32]).mac1_key().compute(&input);
            assert_eq!(new.match_mac1(&input, &mac), id, "exit key {key}");
        }
    }

    #[test]
    fn ip_networks_parse_and_match() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let n = parse_network("10.1.0.0/16").unwrap();
        assert!(n.contains(&ip("10.1.200.3")));
        assert!(!n.contains(&ip("10.2.0.1")));
        assert!(!n.contains(&ip("::1")));
        let all = parse_network("0.0.0.0/0").unwrap();
        assert!(all.contains(&ip("203.0.113.9")));
        let host = parse_network("fd00::1").unwrap();
        assert_eq!(host.prefix_len(), 128);
        assert!(parse_network("10.0.0.0/33")
            .unwrap_err()
            .contains("prefix length must be 0..=32"));
        assert!(parse_network("nonsense/8")
            .unwrap_err()
            .contains("not an IP network"));
    }

    fn peer(key: u8, ips: &[&str]) -> PeerSpec {
        PeerSpec {
            public_key: PublicKey([key; 32]),
            name: String::new(),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            preshared_key: None,
            allowed_exits: vec![],
            endpoint: None,
            persistent_keepalive: None,
        }
    }

    #[test]
    fn tun_packets_route_to_the_peer_with_the_longest_prefix() {
        let t = ExitTable::new(1, vec![])
            .unwrap()
            .with_peers(vec![
                peer(1, &["0.0.0.0/0"]),
                peer(2, &["10.1.0.0/16", "fd00::/64"]),
                peer(3, &["10.1.2.3/32"]),
            ])
            .unwrap();
        let to = |ip: &str| t.route(ip.parse().unwrap()).map(|p| p.spec.public_key.0[0]);
        assert_eq!(to("10.1.2.3"), Some(3));
        assert_eq!(to("10.1.2.4"), Some(2));
        assert_eq!(to("192.0.2.1"), Some(1));
        assert_eq!(to("fd00::9"), Some(2));
        assert_eq!(to("fd01::9"), None, "no IPv6 default route");
    }

    #[test]
    fn owners_survive_a_swap_for_peers_that_stay() {
        let old = ExitTable::new(1, vec![])
            .unwrap()
            .with_peers(vec![peer(1, &["10.0.0.1/32"]), peer(2, &["10.0.0.2/32"])])
            .unwrap();
        let p1 = old.peer(&PublicKey([1; 32])).unwrap();
        assert_eq!(p1.owner(), None);
        p1.set_owner(1);
        let mut new = ExitTable::new(2, vec![])
            .unwrap()
            .with_peers(vec![peer(1, &["10.0.0.1/32"]), peer(3, &["10.0.0.3/32"])])
            .unwrap();
        new.keep_owners(&old);
        assert_eq!(new.peer(&PublicKey([1; 32])).unwrap().owner(), Some(1));
        assert_eq!(new.peer(&PublicKey([3; 32])).unwrap().owner(), None);
        // One cell: a tunnel moving after the swap is seen through either table.
        old.peer(&PublicKey([1; 32])).unwrap().set_owner(0);
        assert_eq!(new.peer(&PublicKey([1; 32])).unwrap().owner(), Some(0));
    }

    #[test]
    fn a_peer_endpoint_needs_a_port_and_an_address() {
        let mut p = peer(1, &["10.0.0.1/32"]);
        p.endpoint = Some("0.0.0.0:51820".parse().unwrap());
        assert!(matches!(
            ExitTable::new(1, vec![]).unwrap().with_peers(vec![p]),
            Err(TableError::PeerEndpoint { .. })
        ));
    }

    #[test]
    fn shared_table_publishes_atomically() {
        let shared = SharedTable::new(ExitTable::new(1, vec![spec("a", 1, None)]).unwrap());
        let before = shared.load();
        shared.publish(ExitTable::new(2, vec![]).unwrap());
        assert_eq!(before.generation(), 1);
        assert_eq!(before.len(), 1);
        assert_eq!(shared.generation(), 2);
        assert!(shared.load().is_empty());
    }
}
