//! An attacker in a namespace of its own: garbage, WireGuard-shaped forgeries, and packets
//! with spoofed source addresses (clients' and exits'), sent at a steady rate.
//!
//! Spoofing uses `IP_TRANSPARENT` sockets bound to the impersonated address, so the kernel
//! sends from an address the attacker's namespace does not own, as an off-path attacker on
//! a network without source filtering would. The handshake flood ([`launch_raw_flood`])
//! writes whole IPv4 datagrams through a raw socket instead, each from another address.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng as _;
use socket2::{Domain, Protocol, Socket, Type};
use wraithgate_relay::keys::Mac1Key;
use wraithgate_relay::wire::{
    COOKIE_REPLY_LEN, INITIATION_LEN, INITIATION_MAC1_OFFSET, RESPONSE_LEN,
};
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

/// A handshake flood as an off-path attacker on a network without source filtering sends
/// it: initiations with a valid mac1 (for one of `exit_keys`, round-robin), each from a
/// different random address in `sources` and a random port, written whole (IPv4 and UDP
/// headers included) through a raw socket, so that no source is ever seen twice for long
/// and none of them can receive an answer.
#[derive(Debug, Clone)]
pub struct RawFloodPlan {
    /// The relay's client-facing address.
    pub relay: SocketAddrV4,
    pub exit_keys: Vec<String>,
    /// The spoofed sources: a network and its prefix length.
    pub sources: (Ipv4Addr, u8),
    /// Initiations per second.
    pub rate: u32,
    pub duration: Duration,
}

/// Runs `plan` from inside `ns` on a thread of its own; join the handle for how many
/// initiations went out (under `"raw_flood_initiation"`).
pub fn launch_raw_flood(
    ns: &Netns,
    plan: RawFloodPlan,
) -> Result<std::thread::JoinHandle<Result<AttackReport>>> {
    ns.spawn_thread(move || raw_flood(&plan))
}

fn raw_flood(plan: &RawFloodPlan) -> Result<AttackReport> {
    const KIND: &str = "raw_flood_initiation";
    const IP_HEADER: usize = 20;
    const UDP_HEADER: usize = 8;
    let keys: Vec<PublicKey> = plan
        .exit_keys
        .iter()
        .map(|k| PublicKey::from_base64(k).map_err(|e| anyhow::anyhow!("{k}: {e:?}")))
        .collect::<Result<_>>()?;
    anyhow::ensure!(!keys.is_empty(), "a flood needs an exit key for its mac1");
    // IP_HDRINCL: the kernel sends our IPv4 header as written, filling in only the total
    // length, the identification and the header checksum (raw(7)).
    let socket = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP))
        .context("a raw socket (needs CAP_NET_RAW)")?;
    socket.set_header_included_v4(true)?;
    let to = socket2::SockAddr::from(SocketAddr::V4(plan.relay));

    let mut rng = rand::thread_rng();
    let mut payload = vec![0u8; INITIATION_LEN];
    let pool: Vec<Vec<u8>> = (0..POOL * keys.len())
        .map(|i| {
            let n = forge(
                "mac1_initiation",
                Some(&keys[i % keys.len()]),
                &mut payload,
                &mut rng,
            );
            payload[..n].to_vec()
        })
        .collect();
    let (net, prefix) = plan.sources;
    let host_bits = 32 - u32::from(prefix);
    let mut datagram = [0u8; IP_HEADER + UDP_HEADER + INITIATION_LEN];
    datagram[0] = 0x45; // IPv4, a 20-byte header
    datagram[6] = 0x40; // don't fragment
    datagram[8] = 64; // TTL
    datagram[9] = 17; // UDP
    datagram[16..20].copy_from_slice(&plan.relay.ip().octets());
    datagram[22..24].copy_from_slice(&plan.relay.port().to_be_bytes());
    datagram[24..26].copy_from_slice(&((UDP_HEADER + INITIATION_LEN) as u16).to_be_bytes());
    // A zero UDP checksum over IPv4 means "none" (RFC 768).

    let mut report = AttackReport::default();
    let start = Instant::now();
    let mut sent: u64 = 0;
    while start.elapsed() < plan.duration {
        let due = (start.elapsed().as_secs_f64() * f64::from(plan.rate)) as u64;
        while sent < due {
            let host = rng.gen::<u32>() & ((1u64 << host_bits) - 1) as u32;
            let source = u32::from(net) | host.max(1);
            datagram[12..16].copy_from_slice(&source.to_be_bytes());
            datagram[20..22].copy_from_slice(&rng.gen_range(1024u16..=65535).to_be_bytes());
            datagram[IP_HEADER + UDP_HEADER..].copy_from_slice(&pool[(sent as usize) % pool.len()]);
            match socket.send_to(&datagram, &to) {
                Ok(_) => *report.sent.entry(KIND).or_default() += 1,
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
