//! Endpoints as operators write them: `ip:port`, `[v6]:port`, or `host:port` resolved when
//! the configuration or API change is applied, as `wg` does (the node keeps the address,
//! not the name; a name that moves needs the change applied again).

use std::net::{SocketAddr, ToSocketAddrs};

/// `value` as an address: parsed, or resolved once if it names a host. The error names
/// the value and says why.
pub fn resolve(value: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = value.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!(
            "endpoint {value:?} is not ip:port, [ipv6]:port or host:port"
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "endpoint {value:?} is not ip:port, [ipv6]:port or host:port"
        ));
    }
    let mut found = value
        .to_socket_addrs()
        .map_err(|e| format!("endpoint {value:?}: cannot resolve {host:?}: {e}"))?;
    found
        .next()
        .ok_or_else(|| format!("endpoint {value:?}: {host:?} has no address"))
}

/// For `#[serde(deserialize_with = "…")]`: an endpoint given as text.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = <String as serde::Deserialize>::deserialize(d)?;
    resolve(&text).map_err(serde::de::Error::custom)
}

/// For an optional endpoint (`PATCH`): absent stays absent.
pub fn deserialize_option<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = <Option<String> as serde::Deserialize>::deserialize(d)?;
    text.map(|t| resolve(&t).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_names_resolve() {
        assert_eq!(
            resolve("192.0.2.1:51820").unwrap(),
            "192.0.2.1:51820".parse().unwrap()
        );
        assert_eq!(resolve("[2001:db8::1]:7").unwrap().port(), 7);
        let local = resolve("localhost:51820").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 51820);
    }

    #[test]
    fn what_cannot_be_an_endpoint_is_named() {
        for bad in [
            "nowhere",
            ":51820",
            "host:port",
            "host:70000",
            "no-such-host.invalid:1",
        ] {
            let e = resolve(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        assert!(resolve("no-such-host.invalid:1")
            .unwrap_err()
            .contains("cannot resolve"));
    }
}
