//! The API's objects as wraithctl reads them for people. `--json` prints the API's own
//! JSON instead, so fields added to the API later reach programs even before they
//! reach these types; unknown fields are ignored here for the same reason.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// A WireGuard key (32 bytes), given in standard base64 as `wg` prints it, or base64url.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// The key as the API's paths take it: base64url without padding.
    pub fn path_segment(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }
}

impl FromStr for Key {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bytes = STANDARD
            .decode(s)
            .or_else(|_| URL_SAFE.decode(s))
            .or_else(|_| URL_SAFE_NO_PAD.decode(s))
            .map_err(|_| {
                format!(
                    "{s:?} is not a WireGuard key (44 characters of base64, as `wg pubkey` prints)"
                )
            })?;
        let len = bytes.len();
        bytes.try_into().map(Key).map_err(|_| {
            format!("{s:?} is not a WireGuard key: it decodes to {len} bytes, a key is 32")
        })
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Exit {
    pub name: String,
    pub public_key: String,
    pub endpoint: String,
    #[serde(default)]
    pub listen_port: Option<u16>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Peer {
    pub public_key: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    #[serde(default)]
    pub allowed_exits: Vec<String>,
    /// Configured endpoint (the node initiates to it).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub persistent_keepalive: Option<u16>,
    /// `"set"` when the peer has a preshared key (`GET /v1/peers` never shows the key).
    #[serde(default)]
    pub preshared_key: Option<String>,
    /// Live state (`GET /v1/peers` only): where the peer was last seen, authenticated.
    #[serde(default)]
    pub current_endpoint: Option<String>,
    #[serde(default)]
    pub latest_handshake_secs_ago: Option<u64>,
    #[serde(default)]
    pub rx_bytes: u64,
    #[serde(default)]
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub exits: Vec<Exit>,
    #[serde(default)]
    pub peers: Vec<Peer>,
}

/// `GET /v1/node`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeInfo {
    #[serde(default)]
    pub public_key: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub backend: String,
    #[serde(default)]
    pub workers: u64,
    #[serde(default)]
    pub listen: Vec<String>,
    #[serde(default)]
    pub zhop_peers: u64,
    /// The kernel fast path when attached.
    #[serde(default)]
    pub fast_path: Option<NodeFastPath>,
    /// Why `fast_path = "auto"` runs without it.
    #[serde(default)]
    pub fast_path_refused: Option<String>,
    #[serde(default)]
    pub uptime_secs: u64,
}

/// `fast_path` of `GET /v1/node`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct NodeFastPath {
    #[serde(default)]
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub offloaded: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Traffic {
    #[serde(default)]
    pub packets: u64,
    #[serde(default)]
    pub bytes: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Traffic) {
        self.packets += o.packets;
        self.bytes += o.bytes;
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Session {
    pub id: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub exit: String,
    #[serde(default)]
    pub exit_key: String,
    #[serde(default)]
    pub established: bool,
    #[serde(default)]
    pub to_exit: Traffic,
    #[serde(default)]
    pub to_client: Traffic,
    #[serde(default)]
    pub handshakes: u64,
    #[serde(default)]
    pub age_secs: f64,
    #[serde(default)]
    pub idle_secs: f64,
    /// Unix time of the latest handshake, if any since the node started.
    #[serde(default)]
    pub latest_handshake: Option<u64>,
    /// The relay's exit-facing port: the client's source port as the exit sees it.
    #[serde(default)]
    pub exit_port: Option<u16>,
}

/// `GET /v1/stats`: the node's counters since start (only what `show` reads).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Stats {
    #[serde(default)]
    pub sessions: u64,
    #[serde(default)]
    pub sessions_pending: u64,
    #[serde(default)]
    pub to_exit: Traffic,
    #[serde(default)]
    pub to_client: Traffic,
    #[serde(default)]
    pub client_handshakes: u64,
    #[serde(default)]
    pub exit_handshakes: u64,
    /// Drops by reason.
    #[serde(default)]
    pub drops: std::collections::BTreeMap<String, u64>,
    /// What the kernel fast path forwarded (apart from `to_exit`/`to_client`).
    #[serde(default)]
    pub fast_path_to_exit: Traffic,
    #[serde(default)]
    pub fast_path_to_client: Traffic,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_in_both_alphabets_and_print_as_wg_does() {
        let wg = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        let k: Key = wg.parse().unwrap();
        assert_eq!(k.to_string(), wg);
        let url = k.path_segment();
        assert!(!url.contains(['+', '/', '=']));
        assert_eq!(url.parse::<Key>().unwrap(), k);
        let slashy = Key([0xff; 32]);
        assert!(slashy.to_string().contains('/'));
        assert_eq!(slashy.to_string().parse::<Key>().unwrap(), slashy);
        assert_eq!(slashy.path_segment().parse::<Key>().unwrap(), slashy);
        assert!("tooshort"
            .parse::<Key>()
            .unwrap_err()
            .contains("not a WireGuard key"));
        assert!("AAAA".parse::<Key>().unwrap_err().contains("3 bytes"));
    }
}
