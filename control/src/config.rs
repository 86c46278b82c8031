//! The node's TOML configuration file.
//!
//! Every mistake stops start-up with the file, the line and the reason: TOML syntax and
//! field errors carry toml's span, and table-level errors (a key used twice, a port pinned
//! twice) point at the `[[exit]]` entry at fault.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use wraithgate_relay::io::{BackendChoice, DataPlaneConfig, ExitSockets, FastPathChoice};
use wraithgate_relay::router::RouterConfig;
use wraithgate_relay::table::{ExitSpec, ExitTable, IpNet, TableError};
use wraithgate_relay::tun::{TunConfig, TunOffload};
use wraithgate_relay::PublicKey;

use crate::state::{DesiredState, StateError};

/// A configuration file, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub relay: RelaySection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub control: ControlSection,
    #[serde(default)]
    pub log: LogSection,
    /// The Exit role's TUN device; without this section the node only relays.
    pub tun: Option<TunSection>,
    #[serde(default, rename = "exit")]
    pub exits: Vec<Spanned<ExitEntry>>,
}

/// `[tun]`: the TUN device the Exit role writes decrypted packets to (and reads the
/// replies from), one queue per worker. The node creates it at start, sets its addresses
/// and MTU, brings it up, and it goes away when the node stops.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunSection {
    #[serde(default = "default_tun_name")]
    pub name: String,
    /// The interface's own addresses with their prefixes (`10.64.0.1/16`, `fd64::1/64`):
    /// the prefix is routed to the device.
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
    #[serde(default = "default_tun_mtu")]
    pub mtu: u16,
    /// `"auto"` (the default): ask the kernel for TCP/UDP super-packets (`IFF_VNET_HDR`,
    /// TSO/USO), falling back to plain packets if it refuses; `"off"`: plain packets.
    #[serde(default)]
    pub offload: TunOffloadSetting,
}

/// `[tun] offload`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunOffloadSetting {
    #[default]
    Auto,
    Off,
}

impl From<TunOffloadSetting> for TunOffload {
    fn from(s: TunOffloadSetting) -> TunOffload {
        match s {
            TunOffloadSetting::Auto => TunOffload::Auto,
            TunOffloadSetting::Off => TunOffload::Off,
        }
    }
}

fn default_tun_name() -> String {
    "wg-exit0".into()
}
fn default_tun_mtu() -> u16 {
    wraithgate_relay::tun::DEFAULT_MTU
}

/// `[log]`: what the node logs. Changes with SIGHUP.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// tracing's EnvFilter syntax, e.g. "info" or "wraithgate_relay=debug". `--log` (or
    /// `WRAITHGATE_LOG`) overrides it.
    pub filter: Option<String>,
}

/// The settings of a configuration file that a running node applies on SIGHUP; any other
/// change waits for a restart (`[[exit]]` entries only ever seed a new state).
pub const LIVE_SETTINGS: &[&str] = &["log.filter"];

/// The settings (`section.key`, and `[[exit]]` as a whole) that differ between two
/// configuration files, both already checked.
pub fn changed_settings(old: &str, new: &str) -> Vec<String> {
    use std::collections::BTreeMap;
    fn settings(text: &str) -> BTreeMap<String, toml::Value> {
        let table: toml::Table = toml::from_str(text).unwrap_or_default();
        let mut out = BTreeMap::new();
        for (k, v) in table {
            match v {
                toml::Value::Table(inner) => {
                    for (k2, v2) in inner {
                        out.insert(format!("{k}.{k2}"), v2);
                    }
                }
                toml::Value::Array(_) if k == "exit" => {
                    out.insert("[[exit]]".to_owned(), v);
                }
                other => {
                    out.insert(k, other);
                }
            }
        }
        out
    }
    let (a, b) = (settings(old), settings(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// `[control]`: the operator API and the node's state on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    /// TCP address of the operator API; keep it on loopback or a management network.
    pub api_listen: Option<SocketAddr>,
    /// A Unix socket serving the API too (file mode 0600).
    pub api_socket: Option<PathBuf>,
    /// Serve the API at all; forwarding never depends on it.
    pub api_enabled: bool,
    /// Holds `state.json` (exits and peers), `sessions.json` (across restarts) and the
    /// API token. Created 0700 if missing.
    pub state_dir: PathBuf,
    /// The API bearer token; created with mode 0600 on first start. Default
    /// `<state_dir>/api.token`.
    pub token_file: Option<PathBuf>,
    /// Serve the API over TLS (HTTPS). With neither `api_tls_cert` nor `api_tls_key`, the
    /// node makes a self-signed certificate on first start (`<state_dir>/api.crt`) and logs
    /// its SHA-256 fingerprint for clients to pin.
    pub api_tls: bool,
    /// PEM certificate chain the API serves (with `api_tls`).
    pub api_tls_cert: Option<PathBuf>,
    /// PEM private key of `api_tls_cert`.
    pub api_tls_key: Option<PathBuf>,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            api_listen: Some(DEFAULT_API_LISTEN.parse().expect("literal address")),
            api_socket: None,
            api_enabled: true,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            token_file: None,
            api_tls: false,
            api_tls_cert: None,
            api_tls_key: None,
        }
    }
}

/// Where the API listens unless configured otherwise.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7070";
/// Bounds of `socket_buffer` and `exit_socket_buffer`: below 64 KiB a socket cannot hold
/// one GRO train; above 256 MiB the kernel's doubled value overflows its int.
const MIN_SOCKET_BUFFER: usize = 64 << 10;
const MAX_SOCKET_BUFFER: usize = 256 << 20;
/// Where the node keeps its state unless configured otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/wraithgate";

/// `[relay]`: where to listen and how to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// Client-facing `ip:port` addresses.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    /// Worker threads; one per core when absent.
    pub workers: Option<usize>,
    #[serde(default = "yes")]
    pub pin_workers: bool,
    #[serde(default)]
    pub backend: BackendChoice,
    /// Source address for exit-facing sockets.
    pub exit_source: Option<IpAddr>,
    /// Messages per recvmmsg/sendmmsg.
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "yes")]
    pub gso: bool,
    /// io_uring receive buffers per worker (64 KiB each, resident only once used).
    #[serde(default = "default_ring_buffers")]
    pub ring_buffers: usize,
    /// SO_RCVBUF/SO_SNDBUF of each client-facing socket, bytes.
    #[serde(default = "default_socket_buffer")]
    pub socket_buffer: usize,
    /// SO_RCVBUF/SO_SNDBUF of each exit-facing socket, bytes.
    #[serde(default = "default_exit_socket_buffer")]
    pub exit_socket_buffer: usize,
    /// "per-session" (the default: a connected exit-facing socket per session) or "shared"
    /// (sockets shared between sessions of different exits).
    #[serde(default)]
    pub exit_sockets: ExitSockets,
    /// The kernel fast path for established DoubleHop sessions: "off" (the default) or
    /// "auto".
    #[serde(default)]
    pub fast_path: FastPathChoice,
    /// Interfaces the fast path attaches to; every Ethernet interface when absent.
    #[serde(default)]
    pub fast_path_interfaces: Vec<String>,
}

impl Default for RelaySection {
    fn default() -> Self {
        RelaySection {
            listen: default_listen(),
            workers: None,
            pin_workers: true,
            backend: BackendChoice::Auto,
            exit_source: None,
            batch: default_batch(),
            gso: true,
            ring_buffers: default_ring_buffers(),
            socket_buffer: default_socket_buffer(),
            exit_socket_buffer: default_exit_socket_buffer(),
            exit_sockets: ExitSockets::PerSession,
            fast_path: FastPathChoice::Off,
            fast_path_interfaces: Vec::new(),
        }
    }
}

/// `[limits]`: bounds and timeouts, per worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    pub max_sessions: usize,
    pub max_pending: usize,
    pub max_sessions_per_client: usize,
    pub handshakes_per_second: u32,
    pub handshake_burst: u32,
    pub cookie_replies_per_second: u32,
    pub pending_timeout_secs: u64,
    pub idle_timeout_secs: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let r = RouterConfig::default();
        LimitsSection {
            max_sessions: r.max_sessions,
            max_pending: r.max_pending,
            max_sessions_per_client: r.max_sessions_per_client,
            handshakes_per_second: r.handshakes_per_second,
            handshake_burst: r.handshake_burst,
            cookie_replies_per_second: r.cookie_replies_per_second,
            pending_timeout_secs: r.pending_timeout.as_secs(),
            idle_timeout_secs: r.idle_timeout.as_secs(),
        }
    }
}

/// One `[[exit]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitEntry {
    pub name: String,
    /// The exit's WireGuard public key, base64 as `wg` prints it.
    pub public_key: PublicKey,
    /// The exit's `ip:port`, or `host:port` resolved when the file is read.
    #[serde(deserialize_with = "crate::endpoint::deserialize")]
    pub endpoint: SocketAddr,
    /// A relay listen port whose initiations all go to this exit.
    pub listen_port: Option<u16>,
}

fn default_listen() -> Vec<SocketAddr> {
    vec!["0.0.0.0:51820".parse().expect("literal address")]
}
fn default_ring_buffers() -> usize {
    DataPlaneConfig::default().ring_buffers
}
fn default_socket_buffer() -> usize {
    DataPlaneConfig::default().listener_socket_buffer
}
fn default_exit_socket_buffer() -> usize {
    DataPlaneConfig::default().exit_socket_buffer
}

fn default_batch() -> usize {
    32
}
fn yes() -> bool {
    true
}

/// A configuration error, with where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // Not named `source`: thiserror would make it the error's source too, and a chain
    // printer (anyhow's `{:#}`) would then print the cause twice.
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    At {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

/// A checked configuration, ready to start a node with.
#[derive(Debug)]
pub struct Config {
    pub data_plane: DataPlaneConfig,
    /// The exits of the file: the node's state until the API changes it.
    pub table: ExitTable,
    pub control: ControlSection,
    pub log: LogSection,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        Self::parse(path, &text)
    }

    /// Checks `text` as the contents of `path` (used in messages only).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>, message: String| match span {
            Some(span) => ConfigError::At {
                path: path.to_owned(),
                line: line_of(text, span.start),
                message,
            },
            None => ConfigError::File {
                path: path.to_owned(),
                message,
            },
        };
        let settings = text.lines().any(|l| {
            let l = l.trim();
            !l.is_empty() && !l.starts_with('#')
        });
        if !settings {
            // Defaults everywhere and no exit: almost certainly the wrong file, or one
            // truncated. A node meant to start empty says so with a section.
            return Err(ConfigError::File {
                path: path.to_owned(),
                message: "the file is empty (no section, no setting): start from \
                          `wraithgate example-config`; a node meant to start without exits \
                          still names its listen addresses in [relay]"
                    .into(),
            });
        }
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            // toml gives no message for some syntax errors (a control character in a
            // comment, for one): never report an error without a reason.
            let message = match e.message().trim() {
                "" => "not valid TOML (a control character, or a stray byte?)".to_owned(),
                m => m.to_owned(),
            };
            at(e.span(), message)
        })?;
        let r = &file.relay;
        let l = &file.limits;
        let bad_buffer = |b: usize| !(MIN_SOCKET_BUFFER..=MAX_SOCKET_BUFFER).contains(&b);
        let checks: [(bool, &str); 9] = [
            (
                r.ring_buffers < 8 || r.ring_buffers > 16_384,
                "[relay] ring_buffers: must be between 8 and 16384 (each buffer needs room in \
                 the kernel's largest io_uring completion queue, 65,536 entries)",
            ),
            (
                bad_buffer(r.socket_buffer),
                "[relay] socket_buffer: must be between 65536 and 268435456 bytes",
            ),
            (
                bad_buffer(r.exit_socket_buffer),
                "[relay] exit_socket_buffer: must be between 65536 and 268435456 bytes",
            ),
            (
                r.listen.is_empty(),
                "[relay] listen: give at least one address",
            ),
            (r.workers == Some(0), "[relay] workers: must be at least 1"),
            (
                r.batch == 0 || r.batch > 1024,
                "[relay] batch: must be between 1 and 1024",
            ),
            (
                l.max_sessions == 0,
                "[limits] max_sessions: must be at least 1",
            ),
            (
                l.max_pending == 0,
                "[limits] max_pending: must be at least 1",
            ),
            (
                l.max_sessions_per_client == 0
                    || l.max_sessions_per_client
                        > wraithgate_relay::router::MAX_SESSIONS_PER_CLIENT,
                "[limits] max_sessions_per_client: must be between 1 and 4",
            ),
        ];
        if let Some((_, msg)) = checks.iter().find(|(bad, _)| *bad) {
            let key = msg.split(' ').nth(1).unwrap_or("").trim_end_matches(':');
            return Err(at(find_key(text, key), (*msg).to_owned()));
        }
        if let Some(name) = r
            .fast_path_interfaces
            .iter()
            .find(|n| !interface_name_ok(n))
        {
            return Err(at(
                find_key(text, "fast_path_interfaces"),
                format!(
                    "[relay] fast_path_interfaces: {name:?} is not an interface name (1 to 15 \
                     bytes, no '/', whitespace or ':')"
                ),
            ));
        }
        if l.cookie_replies_per_second == 0 {
            return Err(at(
                find_key(text, "cookie_replies_per_second"),
                "[limits] cookie_replies_per_second must be at least 1".into(),
            ));
        }
        if l.handshakes_per_second == 0 || l.handshake_burst == 0 {
            return Err(at(
                find_key(text, "handshakes_per_second"),
                "[limits] handshakes_per_second and handshake_burst must be at least 1".into(),
            ));
        }
        if let Some(f) = &file.log.filter {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(f) {
                return Err(at(
                    find_key(text, "filter"),
                    format!("[log] filter: {f:?} is not a log filter: {e}"),
                ));
            }
        }
        let tun = match &file.tun {
            None => None,
            Some(t) => {
                // Interface addresses keep their host part (unlike peers' allowed IPs), and
                // need their prefix: it is what routes the peers' addresses to the device.
                let mut addresses = Vec::with_capacity(t.addresses.len());
                for a in &t.addresses {
                    let net = a.get_ref().parse::<IpNet>().map_err(|_| {
                        at(
                            Some(a.span()),
                            format!(
                                "[tun] addresses: {:?} is not an address with its prefix \
                                 (e.g. \"10.64.0.1/16\", \"fd64::1/64\")",
                                a.get_ref()
                            ),
                        )
                    })?;
                    addresses.push(Spanned::new(a.span(), net));
                }
                let cfg = TunConfig {
                    name: t.name.clone(),
                    addresses: addresses.iter().map(|a| *a.get_ref()).collect(),
                    mtu: t.mtu,
                    offload: t.offload.into(),
                };
                if let Err(e) = cfg.validate() {
                    let key = if e.starts_with("name") { "name" } else { "mtu" };
                    return Err(at(find_key_in(text, "tun", key), format!("[tun] {e}")));
                }
                for (i, a) in addresses.iter().enumerate() {
                    let host = a.get_ref().addr();
                    let span = Some(a.span());
                    if host.is_unspecified() || host.is_multicast() {
                        return Err(at(
                            span,
                            format!(
                                "[tun] addresses: {} is not an interface address",
                                a.get_ref()
                            ),
                        ));
                    }
                    if addresses[..i].iter().any(|b| b.get_ref().addr() == host) {
                        return Err(at(span, format!("[tun] addresses: {host} is given twice")));
                    }
                }
                Some(cfg)
            }
        };
        let spans: Vec<_> = file.exits.iter().map(|e| e.span()).collect();
        let specs: Vec<ExitSpec> = file
            .exits
            .iter()
            .map(|e| {
                let e = e.get_ref();
                ExitSpec {
                    name: e.name.clone(),
                    public_key: e.public_key,
                    endpoint: e.endpoint,
                    listen_port: e.listen_port,
                }
            })
            .collect();
        // The node seeds its state with these exits and will not run on a state that does
        // not validate: refuse here, with the entry's line, the names the state refuses.
        let seed = DesiredState {
            generation: 1,
            exits: specs.clone(),
            peers: Vec::new(),
        };
        if let Err(StateError::ExitName(name)) = seed.validate() {
            let span = specs
                .iter()
                .position(|s| s.name == name)
                .map(|i| spans[i].clone());
            return Err(at(span, StateError::ExitName(name).to_string()));
        }
        if let Some(i) = specs.iter().position(|s| {
            s.listen_port
                .is_some_and(|p| r.listen.iter().any(|l| l.port() == p))
        }) {
            let port = specs[i].listen_port.unwrap_or_default();
            return Err(at(
                Some(spans[i].clone()),
                listen_port_conflict(&specs[i].name, port),
            ));
        }
        let table = ExitTable::new(1, specs.clone()).map_err(|err| {
            let name = match &err {
                TableError::DuplicateKey { name, .. }
                | TableError::DuplicatePort { name, .. }
                | TableError::ZeroPort { name }
                | TableError::BadEndpoint { name, .. }
                | TableError::DuplicateName { name } => name.clone(),
                // The file has no peers.
                _ => String::new(),
            };
            // The last entry with that name is the one that collides.
            let span = specs
                .iter()
                .rposition(|s| s.name == name)
                .map(|i| spans[i].clone());
            at(span, err.to_string())
        })?;
        let router = RouterConfig {
            max_sessions: l.max_sessions,
            max_pending: l.max_pending,
            max_sessions_per_client: l.max_sessions_per_client,
            pending_timeout: Duration::from_secs(l.pending_timeout_secs.max(1)),
            idle_timeout: Duration::from_secs(l.idle_timeout_secs.max(1)),
            handshakes_per_second: l.handshakes_per_second,
            handshake_burst: l.handshake_burst,
            cookie_replies_per_second: l.cookie_replies_per_second,
            ..RouterConfig::default()
        };
        let defaults = DataPlaneConfig::default();
        let data_plane = DataPlaneConfig {
            listen: r.listen.clone(),
            workers: r.workers.unwrap_or(defaults.workers),
            pin_workers: r.pin_workers,
            backend: r.backend,
            router,
            exit_source: r.exit_source,
            batch: r.batch,
            gso: r.gso,
            ring_buffers: r.ring_buffers,
            listener_socket_buffer: r.socket_buffer,
            exit_socket_buffer: r.exit_socket_buffer,
            exit_sockets: r.exit_sockets,
            fast_path: r.fast_path,
            fast_path_interfaces: r.fast_path_interfaces.clone(),
            tun,
            ..defaults
        };
        Ok(Config {
            data_plane,
            table,
            control: file.control.clone(),
            log: file.log.clone(),
        })
    }
}

/// Why an exit may not be pinned to `port`, one of the configured `[relay] listen` ports.
pub fn listen_port_conflict(exit: &str, port: u16) -> String {
    format!(
        "exit {exit:?}: listen_port {port} is a configured [relay] listen port; pinning it \
         would send every initiation arriving there to this exit and cut off the clients of \
         every other exit (found by mac1 on that port); pin a port of its own"
    )
}

/// Whether `name` can be a Linux interface name (`dev_valid_name`).
fn interface_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.contains(['/', ':'])
        && !name.chars().any(char::is_whitespace)
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// Where `key = ` is first assigned, for errors about a value.
fn find_key(text: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with(key) && t[key.len()..].trim_start().starts_with('=') {
            return Some(offset..offset + line.len());
        }
        offset += line.len();
    }
    None
}

/// Where `key = ` is first assigned within section `[section]`.
fn find_key_in(text: &str, section: &str, key: &str) -> Option<std::ops::Range<usize>> {
    let header = format!("[{section}]");
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim() == header {
            let start = offset + line.len();
            return find_key(&text[start..], key).map(|r| r.start + start..r.end + start);
        }
        offset += line.len();
    }
    None
}

/// A commented example configuration, printed by `wraithgate example-config`.
pub const EXAMPLE: &str = r#"# WraithGate relay configuration.
[relay]
# Client-facing addresses. Clients set their WireGuard peer endpoint to one of these.
listen = ["0.0.0.0:51820"]
# Worker threads, one per core by default; each is pinned to its core.
# workers = 2
# "auto" uses io_uring where the kernel allows it, else "portable" (recvmmsg/sendmmsg);
# "uring" refuses to start without io_uring.
backend = "auto"
# io_uring receive buffers per worker, a power of two from 8 to 16384 (64 KiB each,
# resident once used).
# ring_buffers = 256
# Kernel buffer of each client-facing socket, bytes (per worker and listen address). It
# absorbs bursts while a worker is busy; under sustained overload it is also the standing
# queue every forwarded packet waits in (16 MiB ≈ 100 ms at 1 Gb/s), so latency-sensitive
# nodes may want less. See BENCHMARKS.md, "Socket buffers".
# socket_buffer = 16777216
# Kernel buffer of each exit-facing socket (one per session, or per shared socket), bytes.
# exit_socket_buffer = 1048576
# Exit-facing sockets. "per-session" (the default): each DoubleHop session and Z-HOP flow
# has a socket of its own, connected to its exit, so a node needs a descriptor per session
# (RLIMIT_NOFILE bounds its sessions). "shared": a socket carries sessions of different
# exits, at most one per exit, so each exit still sees every client at a relay port of its
# own, and a worker needs only as many sockets as its busiest exit has sessions. The cost:
# the sockets are not connected, so the kernel no longer filters by source; the worker
# looks up each exit-side datagram's source (one hash lookup) and drops datagrams from any
# other address (counted as shared_socket_stranger).
# exit_sockets = "shared"
# Source address of the sockets that talk to exits (by default the kernel picks).
# exit_source = "203.0.113.5"
# Kernel fast path: "auto" forwards the transport messages of established DoubleHop
# sessions (clients that proved their address) in a tc program, without the socket stack;
# handshakes and everything else stay in userspace. It needs CAP_BPF and CAP_NET_ADMIN,
# Linux 6.6+ (tcx) and IPv4 forwarding on the interfaces (sysctl net.ipv4.ip_forward=1);
# where any is missing the node logs why once and forwards in userspace. Off by default.
# fast_path = "auto"
# Interfaces it attaches to (ingress); by default every Ethernet interface.
# fast_path_interfaces = ["eth0"]

[limits]
# Per worker. At a bound new handshakes are refused and counted; nothing is evicted.
max_sessions = 65536
max_pending = 8192
# Per source address (IPv6: per /64).
handshakes_per_second = 20
handshake_burst = 5
# Under load (half of max_pending taken) or over its budget, a source must prove its
# address with a cookie reply the relay sends for the exit, as WireGuard does; this caps
# those replies (and the mac1 checks a flood costs) per worker.
cookie_replies_per_second = 20000
pending_timeout_secs = 5
idle_timeout_secs = 540

[log]
# tracing's filter syntax; `--log` or WRAITHGATE_LOG override it. SIGHUP applies a change.
filter = "info"

# The Exit role: peers provisioned through the API (wraithctl peer add) whose decrypted
# traffic is not Z-HOP goes to this TUN device, one queue per worker; route and masquerade
# it to the internet (README, "Running an exit"). Without this section the node only
# relays.
# [tun]
# name = "wg-exit0"
# addresses = ["10.64.0.1/16"]
# mtu = 1420
# "auto": the kernel hands over and takes TCP/UDP super-packets (TSO/USO, split and
# coalesced by the node), falling back to one packet per read/write if it refuses; "off".
# offload = "auto"

[control]
# The operator API (wraithctl talks to it). Bearer token in <state_dir>/api.token.
api_listen = "127.0.0.1:7070"
# api_socket = "/run/wraithgate/api.sock"
# HTTPS for a control plane that reaches the node over the network: a self-signed
# certificate made on first start (<state_dir>/api.crt; its fingerprint is logged), or
# your own. Clients pin it (wraithctl --ca-file api.crt, or --pin-sha256 FINGERPRINT).
# api_tls = true
# api_tls_cert = "/etc/wraithgate/api.crt"
# api_tls_key = "/etc/wraithgate/api.key"
state_dir = "/var/lib/wraithgate"

# One block per exit; they seed the node's state on its first start. After that the state
# file (<state_dir>/state.json), changed through the API, is what the node runs. Clients reach an exit through the relay by using the relay's address
# as the endpoint of their exit peer; the relay picks the exit by mac1 (the exit's public
# key) or, for a pinned listen_port, by the port.
[[exit]]
name = "exit-1"
public_key = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
endpoint = "192.0.2.10:51820"
# listen_port = 51821
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text)
    }

    #[test]
    fn tun_section_is_checked_with_its_line() {
        let ok = "[relay]\nlisten = [\"127.0.0.1:1\"]\n[tun]\naddresses = [\"10.64.0.1/16\", \"fd64::1/64\"]\n";
        let c = parse(ok).unwrap();
        let t = c.data_plane.tun.expect("a [tun] section");
        assert_eq!((t.name.as_str(), t.mtu), ("wg-exit0", 1420));
        assert_eq!(t.offload, TunOffload::Auto);
        let off = parse("[relay]\nlisten = [\"127.0.0.1:1\"]\n[tun]\noffload = \"off\"\n").unwrap();
        assert_eq!(off.data_plane.tun.expect("[tun]").offload, TunOffload::Off);
        assert!(parse("[relay]\nlisten = [\"127.0.0.1:1\"]\n[tun]\noffload = \"on\"\n").is_err());
        assert_eq!(t.addresses.len(), 2);
        assert!(parse("[relay]\nlisten = [\"127.0.0.1:1\"]\n")
            .unwrap()
            .data_plane
            .tun
            .is_none());
        let cases = [
            (
                "[tun]\nname = \"a-name-far-too-long\"\n",
                2,
                "1 to 15 bytes",
            ),
            ("[tun]\nmtu = 100\n", 2, "mtu"),
            (
                "[tun]\naddresses = [\n  \"10.0.0.1/8\",\n  \"0.0.0.0/0\"]\n",
                4,
                "not an interface address",
            ),
            (
                "[tun]\naddresses = [\"10.0.0.1/8\", \"10.0.0.1/16\"]\n",
                2,
                "twice",
            ),
            ("[tun]\naddresses = [\"10.0.0.1/99\"]\n", 2, "prefix"),
            ("[tun]\nmystery = 1\n", 2, "unknown field"),
        ];
        for (tun, want_line, want) in cases {
            let text = format!("[relay]\nlisten = [\"127.0.0.1:1\"]\n\n{tun}");
            let (l, msg) = line(parse(&text).unwrap_err());
            assert_eq!(l, want_line + 3, "{tun}: {msg}");
            assert!(msg.contains(want), "{tun}: {msg}");
        }
    }

    fn line(err: ConfigError) -> (usize, String) {
        match err {
            ConfigError::At { line, message, .. } => (line, message),
            other => panic!("expected a located error, got {other}"),
        }
    }

    #[test]
    fn example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.table.len(), 1);
        assert_eq!(c.data_plane.router.max_pending, 8192);
    }

    #[test]
    fn fast_path_is_off_by_default_and_a_bad_value_or_interface_names_its_line() {
        let c = parse("[relay]\nlisten = [\"0.0.0.0:51820\"]\n").unwrap();
        assert_eq!(c.data_plane.fast_path, FastPathChoice::Off);
        let c =
            parse("[relay]\nfast_path = \"auto\"\nfast_path_interfaces = [\"eth0\", \"veth1\"]\n")
                .unwrap();
        assert_eq!(c.data_plane.fast_path, FastPathChoice::Auto);
        assert_eq!(c.data_plane.fast_path_interfaces, ["eth0", "veth1"]);
        let (l, m) = line(parse("[relay]\n\nfast_path = \"on\"\n").unwrap_err());
        assert_eq!(l, 3, "{m}");
        assert!(m.contains("auto") && m.contains("off"), "{m}");
        let (l, m) = line(
            parse("[relay]\nfast_path = \"auto\"\nfast_path_interfaces = [\"a/b\"]\n").unwrap_err(),
        );
        assert_eq!(l, 3, "{m}");
        assert!(m.contains("\"a/b\" is not an interface name"), "{m}");
    }

    #[test]
    fn exit_sockets_are_per_session_by_default_and_a_bad_value_names_its_line() {
        let c = parse("[relay]\nlisten = [\"0.0.0.0:51820\"]\n").unwrap();
        assert_eq!(c.data_plane.exit_sockets, ExitSockets::PerSession);
        let c = parse("[relay]\nexit_sockets = \"shared\"\n").unwrap();
        assert_eq!(c.data_plane.exit_sockets, ExitSockets::Shared);
        let c = parse("[relay]\nexit_sockets = \"per-session\"\n").unwrap();
        assert_eq!(c.data_plane.exit_sockets, ExitSockets::PerSession);
        let (l, m) =
            line(parse("[relay]\nworkers = 1\n\nexit_sockets = \"pooled\"\n").unwrap_err());
        assert_eq!(l, 4, "{m}");
        assert!(m.contains("per-session") && m.contains("shared"), "{m}");
        let (l, m) = line(parse("[relay]\nexit_sockets = true\n").unwrap_err());
        assert_eq!(l, 2, "{m}");
    }

    #[test]
    fn an_empty_file_is_refused_with_a_reason() {
        for text in ["", "\n\n", "# only a comment\n   \n"] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with("test.toml: the file is empty"), "{err}");
        }
    }

    #[test]
    fn an_exit_pinned_to_a_listen_port_is_refused_with_its_line() {
        let k = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let text = format!(
            "[relay]\nlisten = [\"0.0.0.0:51820\", \"0.0.0.0:51821\"]\n\n[[exit]]\nname = \"a\"\npublic_key = \"{k}\"\nendpoint = \"192.0.2.1:1\"\nlisten_port = 51821\n"
        );
        let (l, msg) = line(parse(&text).unwrap_err());
        assert!((4..=8).contains(&l), "line {l}: {msg}");
        assert!(
            msg.contains("listen_port 51821 is a configured [relay] listen port"),
            "{msg}"
        );
        assert!(parse(&text.replace("51821\n", "51822\n")).is_ok());
    }

    #[test]
    fn changed_settings_name_each_key_that_differs() {
        let old = "[relay]\nworkers = 1\n[log]\nfilter = \"info\"\n[[exit]]\nname = \"a\"\n";
        let new = "[relay]\nworkers = 2\n[limits]\nmax_pending = 9\n[log]\nfilter = \"info\"\n[[exit]]\nname = \"b\"\n";
        assert_eq!(
            changed_settings(old, new),
            ["[[exit]]", "limits.max_pending", "relay.workers"]
        );
        assert!(changed_settings(old, old).is_empty());
    }

    #[test]
    fn a_bad_log_filter_is_refused_with_its_line() {
        let (l, msg) = line(
            parse("[relay]\nworkers = 1\n[log]\nfilter = \"wraithgate=blah[\"\n").unwrap_err(),
        );
        assert_eq!(l, 4, "{msg}");
        assert!(msg.contains("not a log filter"), "{msg}");
    }

    #[test]
    fn a_missing_file_names_its_cause_once() {
        let err = Config::load(Path::new("/nonexistent/wg.toml")).unwrap_err();
        let chain = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
    }

    #[test]
    fn defaults_fill_an_almost_empty_file() {
        let c = parse("[relay]\n").unwrap();
        assert!(c.table.is_empty());
        assert_eq!(c.data_plane.listen, default_listen());
    }

    #[test]
    fn bad_key_names_its_line() {
        let text = "[relay]\nlisten = [\"127.0.0.1:1\"]\n\n[[exit]]\nname = \"a\"\npublic_key = \"abc\"\nendpoint = \"192.0.2.1:1\"\n";
        let (l, msg) = line(parse(text).unwrap_err());
        assert_eq!(l, 6);
        assert!(msg.contains("32 bytes") || msg.contains("base64"), "{msg}");
    }

    #[test]
    fn bad_endpoint_and_unknown_field_name_their_lines() {
        let text = "[[exit]]\nname = \"a\"\npublic_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\nendpoint = \"nowhere\"\n";
        assert_eq!(line(parse(text).unwrap_err()).0, 4);
        let text = "[relay]\nlisten = []\nwokers = 3\n";
        let (l, msg) = line(parse(text).unwrap_err());
        assert_eq!(l, 3);
        assert!(msg.contains("wokers"), "{msg}");
    }

    #[test]
    fn host_name_endpoints_resolve_or_are_refused_on_their_line() {
        let k = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let text = format!(
            "[[exit]]\nname = \"a\"\npublic_key = \"{k}\"\nendpoint = \"localhost:51820\"\n"
        );
        let cfg = parse(&text).unwrap();
        let e = cfg.table.specs().next().unwrap().endpoint;
        assert!(e.ip().is_loopback() && e.port() == 51820, "{e}");
        let text = format!(
            "[[exit]]\nname = \"a\"\npublic_key = \"{k}\"\nendpoint = \"no-such-host.invalid:51820\"\n"
        );
        let (l, msg) = line(parse(&text).unwrap_err());
        assert_eq!(l, 4);
        assert!(
            msg.contains("no-such-host.invalid:51820") && msg.contains("cannot resolve"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_exit_key_points_at_the_second_entry() {
        let k = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        let text = format!(
            "[[exit]]\nname = \"a\"\npublic_key = \"{k}\"\nendpoint = \"192.0.2.1:1\"\n\n[[exit]]\nname = \"b\"\npublic_key = \"{k}\"\nendpoint = \"192.0.2.2:1\"\n"
        );
        let (l, msg) = line(parse(&text).unwrap_err());
        assert!(l >= 6, "line {l}");
        assert!(msg.contains("already used"), "{msg}");
    }

    #[test]
    fn exit_names_the_node_state_refuses_are_refused_with_their_line() {
        let k = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        for name in [String::new(), "x".repeat(65)] {
            let text = format!(
                "[relay]\nworkers = 1\n\n[[exit]]\nname = \"{name}\"\npublic_key = \"{k}\"\nendpoint = \"192.0.2.1:1\"\n"
            );
            let (l, msg) = line(parse(&text).unwrap_err());
            assert!((4..=5).contains(&l), "line {l}: {msg}");
            assert!(msg.contains("name"), "{msg}");
        }
    }

    #[test]
    fn a_control_character_in_a_comment_is_refused_with_a_reason() {
        let (l, msg) = line(parse("[relay]\n# a \u{1} b\nworkers = 1\n").unwrap_err());
        assert_eq!(l, 2);
        assert!(!msg.trim().is_empty(), "no reason given");
    }

    #[test]
    fn socket_buffers_are_configurable_within_bounds() {
        let c = parse("[relay]\nsocket_buffer = 1048576\nexit_socket_buffer = 262144\n").unwrap();
        assert_eq!(c.data_plane.listener_socket_buffer, 1 << 20);
        assert_eq!(c.data_plane.exit_socket_buffer, 256 << 10);
        let c = parse("[limits]\n").unwrap();
        assert_eq!(c.data_plane.listener_socket_buffer, 16 << 20);
        let (l, msg) =
            line(parse("[relay]\nexit_socket_buffer = 1024\nsocket_buffer = 1024\n").unwrap_err());
        assert_eq!(l, 3, "{msg}");
        assert!(msg.contains("socket_buffer: must be between"), "{msg}");
        let (l, msg) = line(parse("[relay]\n\nexit_socket_buffer = 999999999999\n").unwrap_err());
        assert_eq!(l, 3, "{msg}");
        assert!(msg.contains("exit_socket_buffer"), "{msg}");
    }

    #[test]
    fn ring_buffers_stop_at_what_the_kernel_can_complete() {
        assert_eq!(
            parse("[relay]\nring_buffers = 16384\n")
                .unwrap()
                .data_plane
                .ring_buffers,
            16_384
        );
        let (l, msg) = line(parse("[relay]\n\nring_buffers = 32768\n").unwrap_err());
        assert_eq!(l, 3, "{msg}");
        assert!(msg.contains("between 8 and 16384"), "{msg}");
    }

    #[test]
    fn empty_listen_and_zero_limits_are_refused() {
        let (l, msg) = line(parse("[relay]\nlisten = []\n").unwrap_err());
        assert_eq!(l, 2);
        assert!(msg.contains("listen"));
        let (l, _) = line(parse("[limits]\nmax_pending = 0\n").unwrap_err());
        assert_eq!(l, 2);
        let (_, msg) = line(parse("# x\nbroken = = 1\n").unwrap_err());
        assert!(!msg.is_empty());
    }
}
