//! The WireGuard configurations a Z-HOP client needs (`wraithctl peer config`): an outer
//! tunnel to this node, and for each exit the peer may reach an inner tunnel to that exit,
//! routed through the outer one (DESIGN §4). wg-quick files; the private keys, which the
//! node never holds, and the client's address at each exit are left as `<…>` placeholders.

use std::net::SocketAddr;

use crate::model::{Exit, Peer};

/// The outer interface's MTU: wireguard-go's and wg-quick's default on a 1,500-byte path.
pub const OUTER_MTU: u16 = 1420;
/// The inner interface's MTU: every inner WireGuard datagram rides the outer tunnel, so it
/// must fit its MTU with its own headers (up to 40 bytes of IPv6, 8 of UDP, 32 of
/// WireGuard).
pub const INNER_MTU: u16 = OUTER_MTU - 80;

/// The placeholder for the outer tunnel's private key.
pub const OUTER_KEY_PLACEHOLDER: &str = "<your outer private key>";

/// The placeholder for the client's inner private key at the exit named `exit`.
pub fn inner_key_placeholder(exit: &str) -> String {
    format!("<your private key at exit {exit}>")
}

/// The placeholder for the client's tunnel address at the exit named `exit`.
pub fn inner_address_placeholder(exit: &str) -> String {
    format!("<your address at exit {exit}>")
}

/// One wg-quick file: the name it should be saved under (wg-quick names the interface
/// after it) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFile {
    pub file: String,
    /// The exit an inner tunnel goes to; `None` for the outer tunnel.
    pub exit: Option<String>,
    pub text: String,
}

/// Why no configuration can be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The peer may reach no exit: there is no inner tunnel to make.
    NoExits,
    /// An allowed exit is not in the node's table (the node never lets that happen, but
    /// the two lists are read one after the other).
    UnknownExit(String),
    /// An exit's endpoint is not `ip:port`.
    BadEndpoint { exit: String, endpoint: String },
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::NoExits => write!(
                f,
                "the peer may reach no exit; add one with `wraithctl peer add … --exit NAME`"
            ),
            ConfigError::UnknownExit(k) => {
                write!(
                    f,
                    "the peer's exit {k} is not in the node's table (changed meanwhile?)"
                )
            }
            ConfigError::BadEndpoint { exit, endpoint } => {
                write!(f, "exit {exit} has endpoint {endpoint:?}, not ip:port")
            }
        }
    }
}

/// The outer configuration and one inner configuration per allowed exit, in the order of
/// the peer's `allowed_exits`. `node_endpoint` is where clients reach this node.
pub fn render(
    node_key: &str,
    node_endpoint: &str,
    peer: &Peer,
    exits: &[Exit],
) -> Result<Vec<ConfigFile>, ConfigError> {
    if peer.allowed_exits.is_empty() {
        return Err(ConfigError::NoExits);
    }
    let mut chosen = Vec::new();
    for key in &peer.allowed_exits {
        let exit = exits
            .iter()
            .find(|e| &e.public_key == key)
            .ok_or_else(|| ConfigError::UnknownExit(key.clone()))?;
        let endpoint: SocketAddr = exit
            .endpoint
            .parse()
            .map_err(|_| ConfigError::BadEndpoint {
                exit: exit.name.clone(),
                endpoint: exit.endpoint.clone(),
            })?;
        chosen.push((exit, endpoint));
    }
    let who = if peer.name.is_empty() {
        peer.public_key.clone()
    } else {
        format!("{} ({})", peer.name, peer.public_key)
    };
    // Only the exits' own addresses travel in the outer tunnel: the inner tunnels' datagrams.
    let exit_routes: Vec<String> = chosen
        .iter()
        .map(|(_, ep)| match ep {
            SocketAddr::V4(a) => format!("{}/32", a.ip()),
            SocketAddr::V6(a) => format!("{}/128", a.ip()),
        })
        .collect();
    let mut files = vec![ConfigFile {
        file: "zhop-outer.conf".into(),
        exit: None,
        text: format!(
            "# WraithGate Z-HOP, peer {who}: the outer tunnel, to the node.\n\
             # Bring it up first (wg-quick up ./zhop-outer.conf), then one inner tunnel.\n\
             [Interface]\n\
             PrivateKey = {OUTER_KEY_PLACEHOLDER}\n\
             Address = {address}\n\
             MTU = {OUTER_MTU}\n\
             \n\
             [Peer]\n\
             # the WraithGate node\n\
             PublicKey = {node_key}\n\
             Endpoint = {node_endpoint}\n\
             # the exits' addresses only: the inner tunnels ride this one\n\
             AllowedIPs = {routes}\n\
             PersistentKeepalive = 25\n",
            address = peer.allowed_ips.join(", "),
            routes = exit_routes.join(", "),
        ),
    }];
    for (i, (exit, endpoint)) in chosen.iter().enumerate() {
        let name = &exit.name;
        files.push(ConfigFile {
            file: format!("zhop-exit{}.conf", i + 1),
            exit: Some(name.clone()),
            text: format!(
                "# WraithGate Z-HOP, peer {who}: the inner tunnel to exit {name}, inside the\n\
                 # outer one. Its keys and address are yours and the exit's: the node sees\n\
                 # none of them. One inner tunnel up at a time (each routes everything).\n\
                 [Interface]\n\
                 PrivateKey = {key}\n\
                 Address = {address}\n\
                 MTU = {INNER_MTU}\n\
                 \n\
                 [Peer]\n\
                 # exit {name}\n\
                 PublicKey = {exit_key}\n\
                 Endpoint = {endpoint}\n\
                 AllowedIPs = 0.0.0.0/0, ::/0\n",
                key = inner_key_placeholder(name),
                address = inner_address_placeholder(name),
                exit_key = exit.public_key,
            ),
        });
    }
    Ok(files)
}

/// Where clients reach the node: the first listen address that names a host, or a
/// placeholder with the port when the node listens on every address.
pub fn node_endpoint(listen: &[String]) -> String {
    let parsed: Vec<SocketAddr> = listen.iter().filter_map(|l| l.parse().ok()).collect();
    if let Some(a) = parsed.iter().find(|a| !a.ip().is_unspecified()) {
        return a.to_string();
    }
    let port = parsed.first().map_or(51820, SocketAddr::port);
    format!("<this node's address>:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(name: &str, key: &str, endpoint: &str) -> Exit {
        Exit {
            name: name.into(),
            public_key: key.into(),
            endpoint: endpoint.into(),
            listen_port: None,
        }
    }

    fn peer(exits: &[&str]) -> Peer {
        Peer {
            public_key: "PEER=".into(),
            name: "laptop".into(),
            allowed_ips: vec!["10.201.0.2/32".into()],
            allowed_exits: exits.iter().map(|s| s.to_string()).collect(),
            ..Peer::default()
        }
    }

    #[test]
    fn an_outer_and_one_inner_file_per_exit_with_the_exits_routed_outside() {
        let exits = [
            exit("fra", "FRA=", "192.0.2.7:51820"),
            exit("ams", "AMS=", "[2001:db8::9]:51821"),
        ];
        let files = render(
            "NODE=",
            "203.0.113.1:51820",
            &peer(&["AMS=", "FRA="]),
            &exits,
        )
        .unwrap();
        assert_eq!(files.len(), 3);
        let outer = &files[0].text;
        assert!(outer.contains("PublicKey = NODE=\n"));
        assert!(outer.contains("Endpoint = 203.0.113.1:51820\n"));
        assert!(outer.contains("Address = 10.201.0.2/32\n"));
        assert!(outer.contains("AllowedIPs = 2001:db8::9/128, 192.0.2.7/32\n"));
        assert!(outer.contains(&format!("MTU = {OUTER_MTU}\n")));
        assert!(outer.contains(OUTER_KEY_PLACEHOLDER));
        assert_eq!(files[1].exit.as_deref(), Some("ams"));
        assert_eq!(files[1].file, "zhop-exit1.conf");
        let inner = &files[1].text;
        assert!(inner.contains("PublicKey = AMS=\n"));
        assert!(inner.contains("Endpoint = [2001:db8::9]:51821\n"));
        assert!(inner.contains(&format!("MTU = {INNER_MTU}\n")));
        assert!(inner.contains(&inner_key_placeholder("ams")));
        assert!(inner.contains(&inner_address_placeholder("ams")));
        assert!(files[2].text.contains("Endpoint = 192.0.2.7:51820\n"));
    }

    #[test]
    fn no_exit_or_an_unknown_one_is_refused_with_a_reason() {
        let exits = [exit("fra", "FRA=", "192.0.2.7:51820")];
        assert_eq!(
            render("NODE=", "x:1", &peer(&[]), &exits),
            Err(ConfigError::NoExits)
        );
        assert_eq!(
            render("NODE=", "x:1", &peer(&["GONE="]), &exits),
            Err(ConfigError::UnknownExit("GONE=".into()))
        );
        let bad = [exit("fra", "FRA=", "fra.example:51820")];
        assert!(matches!(
            render("NODE=", "x:1", &peer(&["FRA="]), &bad),
            Err(ConfigError::BadEndpoint { .. })
        ));
    }

    #[test]
    fn the_node_endpoint_is_a_listen_address_or_a_placeholder() {
        assert_eq!(
            node_endpoint(&["0.0.0.0:51820".into(), "198.51.100.4:51821".into()]),
            "198.51.100.4:51821"
        );
        assert_eq!(
            node_endpoint(&["[::]:51999".into()]),
            "<this node's address>:51999"
        );
    }
}
