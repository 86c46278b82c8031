//! An attacker in a namespace of its own: garbage, WireGuard-shaped forgeries, and packets
//! with spoofed source addresses (clients' and exits'), sent at a steady rate.
//!
//! Spoofing uses `IP_TRANSPARENT` sockets bound to the impersonated address, so the kernel
//! sends from an address the attacker's namespace does not own, as an off-path attacker on
//! a network without source filtering would. The raw flood ([`launch_raw_flood`]) writes
//! whole IPv4 or IPv6 datagrams through a raw socket instead, each from another address.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng as _;
use socket2::{Domain, Protocol, Socket, Type};
use wraithgate_relay::keys::Mac1Key;
use wraithgate_relay::wire::{
    COOKIE_REPLY_LEN, INITIATION_LEN, INITIATION_MAC1_OFFSET, RESPONSE_LEN,
};
use wraithgate_relay::zhop::inner::build_udp;
use wraithgate_relay::PublicKey;

use crate::netns::Netns;

/// What to send, to whom, as whom.
#[derive(Debug, Clone)]
pub struct AttackPlan {
    /// The relay's client-facing address, reached from the attacker's own address.
    pub relay: SocketAddr,
    /// Clients to impersonate: (the client's address, the relay address it talks to).
    pub clients: Vec<(SocketAddr, SocketAddr)>,
    /// Exits to impersonate towards the relay's exit-facing sockets: (the exit's endpoint,
    /// the relay's exit-facing address of a session).
    pub exits: Vec<(SocketAddr, SocketAddr)>,
    /// Exit public keys: anyone can make initiations with a valid mac1 for them.
    pub exit_keys: Vec<String>,
    /// Client public keys (not secret either), for exit-side initiations with a valid
    /// mac1 ([`EXIT_INDEX_ATTACKS`]).
    pub client_keys: Vec<String>,
    /// Which forgeries to send (all when empty); see [`ATTACKS`].
    pub only: Vec<&'static str>,
    /// Datagrams per second, all kinds together.
    pub rate: u32,
    pub duration: Duration,
}

/// Every kind of forgery, by name.
pub const ATTACKS: [&str; 9] = [
    "garbage",
    "forged_transport",
    "mac1_initiation",
    "spoofed_client_transport",
    "spoofed_client_response",
    "spoofed_client_initiation",
    "spoofed_exit_transport",
    "spoofed_exit_initiation",
    "spoofed_exit_cookie",
];

/// Forgeries of the exit side that carry a fresh random sender index in every datagram
/// (issue 15: they tried to push the exit's real indices out of the relay's session).
/// Sent only when named in [`AttackPlan::only`]:
/// - `spoofed_exit_response`: responses with a fresh sender and receiver index;
/// - `spoofed_exit_initiation_fresh`: initiations with a fresh sender index;
/// - `spoofed_exit_initiation_mac1`: the same with a valid mac1 for a client's key, which a
///   stock client under load answers with a cookie reply naming the forged index.
pub const EXIT_INDEX_ATTACKS: [&str; 3] = [
    "spoofed_exit_response",
    "spoofed_exit_initiation_fresh",
    "spoofed_exit_initiation_mac1",
];

/// What was sent.
#[derive(Debug, Clone, Default)]
pub struct AttackReport {
    pub sent: BTreeMap<&'static str, u64>,
    pub send_errors: u64,
    pub ran: Duration,
}

impl AttackReport {
    pub fn total(&self) -> u64 {
        self.sent.values().sum()
    }

    /// Adds another run's figures to these.
    pub fn add(&mut self, other: AttackReport) {
        for (k, n) in other.sent {
            *self.sent.entry(k).or_default() += n;
        }
        self.send_errors += other.send_errors;
        self.ran += other.ran;
    }
}

/// Runs `plan` from inside `ns` on a thread of its own; join the handle for the report.
pub fn launch(
    ns: &Netns,
    plan: AttackPlan,
) -> Result<std::thread::JoinHandle<Result<AttackReport>>> {
    ns.spawn_thread(move || attack(&plan))
}

/// Forgeries made in advance per source and sent round-robin, so that the attacker spends
/// its CPU on sending, not on making packets (it shares the machine with the tunnels).
const POOL: usize = 64;

/// One forged datagram source.
struct Source {
    kind: &'static str,
    socket: UdpSocket,
    to: SocketAddr,
    /// For initiations with a valid mac1.
    mac1_for: Option<PublicKey>,
    /// Fresh indices in every datagram ([`EXIT_INDEX_ATTACKS`]), with the mac1 remade for
    /// this key when given.
    fresh: Option<Option<Mac1Key>>,
}

/// A UDP socket that sends from `from`, an address this namespace need not own.
pub fn spoofing_socket(from: SocketAddr) -> Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_ip_transparent_v4(true)
        .context("IP_TRANSPARENT (needs CAP_NET_ADMIN)")?;
    s.set_reuse_address(true)?;
    s.bind(&from.into())
        .with_context(|| format!("binding a spoofing socket to {from}"))?;
    Ok(s.into())
}

fn attack(plan: &AttackPlan) -> Result<AttackReport> {
    let wanted = |k: &str| plan.only.is_empty() || plan.only.contains(&k);
    let keys: Vec<PublicKey> = plan
        .exit_keys
        .iter()
        .map(|k| PublicKey::from_base64(k).map_err(|e| anyhow::anyhow!("{k}: {e:?}")))
        .collect::<Result<_>>()?;
    let own = || -> Result<UdpSocket> { Ok(UdpSocket::bind("0.0.0.0:0")?) };
    let mut sources = Vec::new();
    for kind in ["garbage", "forged_transport"] {
        if wanted(kind) {
            sources.push(Source {
                kind,
                socket: own()?,
                to: plan.relay,
                mac1_for: None,
                fresh: None,
            });
        }
    }
    if wanted("mac1_initiation") {
        for k in &keys {
            sources.push(Source {
                kind: "mac1_initiation",
                socket: own()?,
                to: plan.relay,
                mac1_for: Some(*k),
                fresh: None,
            });
        }
    }
    for &(client, relay) in &plan.clients {
        for kind in ["spoofed_client_transport", "spoofed_client_response"] {
            if wanted(kind) {
                sources.push(Source {
                    kind,
                    socket: spoofing_socket(client)?,
                    to: relay,
                    mac1_for: None,
                    fresh: None,
                });
            }
        }
        if wanted("spoofed_client_initiation") {
            for k in &keys {
                sources.push(Source {
                    kind: "spoofed_client_initiation",
                    socket: spoofing_socket(client)?,
                    to: relay,
                    mac1_for: Some(*k),
                    fresh: None,
                });
            }
        }
    }
    for &(exit, relay_side) in &plan.exits {
        for kind in [
            "spoofed_exit_transport",
            "spoofed_exit_initiation",
            "spoofed_exit_cookie",
        ] {
            if wanted(kind) {
                sources.push(Source {
                    kind,
                    socket: spoofing_socket(exit)?,
                    to: relay_side,
                    mac1_for: None,
                    fresh: None,
                });
            }
        }
    }
    let client_keys: Vec<PublicKey> = plan
        .client_keys
        .iter()
        .map(|k| PublicKey::from_base64(k).map_err(|e| anyhow::anyhow!("{k}: {e:?}")))
        .collect::<Result<_>>()?;
    for &(exit, relay_side) in &plan.exits {
        let named = |k: &str| plan.only.contains(&k);
        for kind in ["spoofed_exit_response", "spoofed_exit_initiation_fresh"] {
            if named(kind) {
                sources.push(Source {
                    kind,
                    socket: spoofing_socket(exit)?,
                    to: relay_side,
                    mac1_for: None,
                    fresh: Some(None),
                });
            }
        }
        if named("spoofed_exit_initiation_mac1") {
            for k in &client_keys {
                sources.push(Source {
                    kind: "spoofed_exit_initiation_mac1",
                    socket: spoofing_socket(exit)?,
                    to: relay_side,
                    mac1_for: Some(*k),
                    fresh: Some(Some(k.mac1_key())),
                });
            }
        }
    }
    anyhow::ensure!(!sources.is_empty(), "the attack plan sends nothing");

    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 1500];
    let pools: Vec<Vec<Vec<u8>>> = sources
        .iter()
        .map(|s| {
            (0..POOL)
                .map(|_| {
                    let len = forge(s.kind, s.mac1_for.as_ref(), &mut buf, &mut rng);
                    buf[..len].to_vec()
                })
                .collect()
        })
        .collect();
    let mut report = AttackReport::default();
    let start = Instant::now();
    let mut sent_total: u64 = 0;
    let mut next = 0usize;
    let mut scratch = vec![0u8; 1500];
    while start.elapsed() < plan.duration {
        let due = (start.elapsed().as_secs_f64() * f64::from(plan.rate)) as u64;
        while sent_total < due {
            let i = next % sources.len();
            let packet = &pools[i][(next / sources.len()) % POOL];
            next += 1;
            let s = &sources[i];
            let packet = match &s.fresh {
                None => &packet[..],
                Some(mac1) => {
                    let out = &mut scratch[..packet.len()];
                    out.copy_from_slice(packet);
                    rng.fill(&mut out[4..12]);
                    if let Some(key) = mac1 {
                        let mac = key.compute(&out[..INITIATION_MAC1_OFFSET]);
                        out[INITIATION_MAC1_OFFSET..INITIATION_MAC1_OFFSET + 16]
                            .copy_from_slice(&mac);
                    }
                    out
                }
            };
            match s.socket.send_to(packet, s.to) {
                Ok(_) => *report.sent.entry(s.kind).or_default() += 1,
                Err(_) => report.send_errors += 1,
            }
            sent_total += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    report.ran = start.elapsed();
    Ok(report)
}

/// A flood as an off-path attacker on a network without source filtering sends it,
/// written whole (IP and UDP headers included) through a raw socket, IPv4 or IPv6 as the
/// relay's address is:
/// - `raw_flood_initiation`: initiations with a valid mac1 (for one of `exit_keys`,
///   round-robin), each from a different random address in `sources` and a random port, so
///   that no source is ever seen twice for long and none of them can receive an answer;
/// - `raw_flood_transport` (when [`RawFloodPlan::transport`]): transport messages with
///   random indices, from random addresses in `sources` too;
/// - `raw_forged_exit_transport` (for each of [`RawFloodPlan::exit_side`]): transport
///   messages with random indices in an exit's name (its address and port) towards a
///   session's exit-facing socket, which only the exit's address can reach.
///
/// The kinds share the rate round-robin. Every datagram carries its UDP checksum, over the
/// pseudo-header of its family (mandatory in IPv6, RFC 8200 §8.1).
#[derive(Debug, Clone)]
pub struct RawFloodPlan {
    /// The relay's client-facing address.
    pub relay: SocketAddr,
    pub exit_keys: Vec<String>,
    /// The spoofed sources: a network of the relay's family and its prefix length.
    pub sources: (IpAddr, u8),
    /// Also forged transport from the spoofed sources.
    pub transport: bool,
    /// Forged exit-side transport: (the exit's endpoint, a session's exit-facing address).
    pub exit_side: Vec<(SocketAddr, SocketAddr)>,
    /// Datagrams per second, all kinds together.
    pub rate: u32,
    pub duration: Duration,
}

/// Runs `plan` from inside `ns` on a thread of its own; join the handle for how many
/// datagrams of each kind went out.
pub fn launch_raw_flood(
    ns: &Netns,
    plan: RawFloodPlan,
) -> Result<std::thread::JoinHandle<Result<AttackReport>>> {
    ns.spawn_thread(move || raw_flood(&plan))
}

/// A random address of `net`/`prefix` (never the network's own address).
fn random_in(net: IpAddr, prefix: u8, rng: &mut impl rand::Rng) -> IpAddr {
    match net {
        IpAddr::V4(n) => {
            let host_mask = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            IpAddr::from(Ipv4Addr::from(
                u32::from(n) | (rng.gen::<u32>() & host_mask).max(1),
            ))
        }
        IpAddr::V6(n) => {
            let host_mask = u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            IpAddr::from(Ipv6Addr::from(
                u128::from(n) | (rng.gen::<u128>() & host_mask).max(1),
            ))
        }
    }
}

fn raw_flood(plan: &RawFloodPlan) -> Result<AttackReport> {
    const INITIATION: &str = "raw_flood_initiation";
    const TRANSPORT: &str = "raw_flood_transport";
    const EXIT_TRANSPORT: &str = "raw_forged_exit_transport";
    let keys: Vec<PublicKey> = plan
        .exit_keys
        .iter()
        .map(|k| PublicKey::from_base64(k).map_err(|e| anyhow::anyhow!("{k}: {e:?}")))
        .collect::<Result<_>>()?;
    anyhow::ensure!(!keys.is_empty(), "a flood needs an exit key for its mac1");
    anyhow::ensure!(
        plan.sources.0.is_ipv4() == plan.relay.is_ipv4()
            && plan
                .exit_side
                .iter()
                .all(|(x, r)| x.is_ipv4() == plan.relay.is_ipv4() && r.is_ipv4() == x.is_ipv4()),
        "a flood's addresses are all of one family"
    );
    // The kernel sends our header as written: IPv4 with IP_HDRINCL (raw(7); it fills in
    // only the identification and header checksum), IPv6 on an IPPROTO_RAW socket, which
    // implies IPV6_HDRINCL (ipv6(7)).
    let socket = if plan.relay.is_ipv4() {
        let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
            .context("a raw socket (needs CAP_NET_RAW)")?;
        s.set_header_included_v4(true)?;
        s
    } else {
        Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(255)))
            .context("a raw IPv6 socket (needs CAP_NET_RAW)")?
    };

    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 1500];
    let initiations: Vec<Vec<u8>> = (0..POOL * keys.len())
        .map(|i| {
            let n = forge(
                "mac1_initiation",
                Some(&keys[i % keys.len()]),
                &mut buf,
                &mut rng,
            );
            buf[..n].to_vec()
        })
        .collect();
    let transports: Vec<Vec<u8>> = (0..POOL)
        .map(|_| {
            let n = forge("forged_transport", None, &mut buf, &mut rng);
            buf[..n].to_vec()
        })
        .collect();
    // What each turn of the round-robin sends: a kind, and for exit-side forgeries the
    // (exit, relay) pair.
    let mut turns: Vec<(&'static str, Option<(SocketAddr, SocketAddr)>)> = vec![(INITIATION, None)];
    if plan.transport {
        turns.push((TRANSPORT, None));
    }
    turns.extend(plan.exit_side.iter().map(|&p| (EXIT_TRANSPORT, Some(p))));

    let (net, prefix) = plan.sources;
    let mut datagram = Vec::with_capacity(1500);
    let mut report = AttackReport::default();
    let start = Instant::now();
    let mut sent: u64 = 0;
    while start.elapsed() < plan.duration {
        let due = (start.elapsed().as_secs_f64() * f64::from(plan.rate)) as u64;
        while sent < due {
            let (kind, pair) = turns[(sent as usize) % turns.len()];
            let pick = (sent as usize / turns.len()) % POOL;
            let (from, to, payload) = match (kind, pair) {
                (_, Some((exit, relay_side))) => (exit, relay_side, &transports[pick]),
                _ => {
                    let from = SocketAddr::new(
                        random_in(net, prefix, &mut rng),
                        rng.gen_range(1024u16..=65535),
                    );
                    let payload = if kind == INITIATION {
                        &initiations[(sent as usize) % initiations.len()]
                    } else {
                        &transports[pick]
                    };
                    (from, plan.relay, payload)
                }
            };
            build_udp(&mut datagram, from, to, payload);
            // Port 0: for an IPv6 raw socket the port is a protocol number.
            let dest = socket2::SockAddr::from(SocketAddr::new(to.ip(), 0));
            match socket.send_to(&datagram, &dest) {
                Ok(_) => *report.sent.entry(kind).or_default() += 1,
                Err(_) => report.send_errors += 1,
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    report.ran = start.elapsed();
    Ok(report)
}

/// Writes one forgery of `kind` into `buf`; returns its length.
fn forge(
    kind: &str,
    mac1_for: Option<&PublicKey>,
    buf: &mut [u8],
    rng: &mut impl rand::Rng,
) -> usize {
    let header = |buf: &mut [u8], t: u8| {
        buf[0] = t;
        buf[1..4].fill(0);
    };
    match kind {
        "garbage" => {
            // Anything: often a known type with a wrong size or reserved bytes set.
            let len = rng.gen_range(1..=1400);
            rng.fill(&mut buf[..len]);
            if rng.gen_bool(0.5) {
                buf[0] = rng.gen_range(1..=4);
            }
            len
        }
        "forged_transport" | "spoofed_client_transport" | "spoofed_exit_transport" => {
            let len = 32 + 16 * rng.gen_range(0..=88);
            rng.fill(&mut buf[..len]);
            header(buf, 4);
            len
        }
        "spoofed_client_response" => {
            rng.fill(&mut buf[..RESPONSE_LEN]);
            header(buf, 2);
            RESPONSE_LEN
        }
        "spoofed_exit_response" => {
            rng.fill(&mut buf[..RESPONSE_LEN]);
            header(buf, 2);
            RESPONSE_LEN
        }
        "spoofed_exit_cookie" => {
            rng.fill(&mut buf[..COOKIE_REPLY_LEN]);
            header(buf, 3);
            COOKIE_REPLY_LEN
        }
        "mac1_initiation"
        | "spoofed_client_initiation"
        | "spoofed_exit_initiation"
        | "spoofed_exit_initiation_fresh"
        | "spoofed_exit_initiation_mac1" => {
            rng.fill(&mut buf[..INITIATION_LEN]);
            header(buf, 1);
            // mac2 stays zero, as without a cookie.
            buf[INITIATION_MAC1_OFFSET + 16..INITIATION_LEN].fill(0);
            if let Some(k) = mac1_for {
                let mac = k.mac1_key().compute(&buf[..INITIATION_MAC1_OFFSET]);
                buf[INITIATION_MAC1_OFFSET..INITIATION_MAC1_OFFSET + 16].copy_from_slice(&mac);
            }
            INITIATION_LEN
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wraithgate_relay::wire::Message;

    #[test]
    fn spoofed_sources_stay_inside_their_network() {
        let mut rng = rand::thread_rng();
        for (net, prefix) in [("100.64.0.0", 16u8), ("2001:db8:6600::", 48)] {
            let net: IpAddr = net.parse().unwrap();
            let inside = |a: IpAddr| match (a, net) {
                (IpAddr::V4(a), IpAddr::V4(n)) => {
                    (u32::from(a) ^ u32::from(n)) >> (32 - u32::from(prefix)) == 0
                }
                (IpAddr::V6(a), IpAddr::V6(n)) => {
                    (u128::from(a) ^ u128::from(n)) >> (128 - u32::from(prefix)) == 0
                }
                _ => false,
            };
            for _ in 0..1000 {
                let a = random_in(net, prefix, &mut rng);
                assert!(inside(a), "{a} outside {net}/{prefix}");
            }
        }
    }

    #[test]
    fn forgeries_parse_as_what_they_pretend_to_be() {
        let key = PublicKey([7; 32]);
        let mut rng = rand::thread_rng();
        let mut buf = vec![0u8; 1500];
        for _ in 0..100 {
            let n = forge("mac1_initiation", Some(&key), &mut buf, &mut rng);
            let Ok(Message::Initiation(init)) = Message::parse(&buf[..n]) else {
                panic!("not an initiation");
            };
            assert!(key.mac1_key().verify(init.mac1_input(), init.mac1()));
            let n = forge("forged_transport", None, &mut buf, &mut rng);
            assert!(matches!(
                Message::parse(&buf[..n]),
                Ok(Message::Transport(_))
            ));
            let n = forge("spoofed_client_response", None, &mut buf, &mut rng);
            assert!(matches!(
                Message::parse(&buf[..n]),
                Ok(Message::Response(_))
            ));
        }
    }
}
