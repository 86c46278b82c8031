//! The Exit role's receive path: a real boringtun client completes a handshake with a
//! node whose only peer it is (allowed IPs: one IPv4 and one IPv6 network from the input),
//! then sends the input's packets through the tunnel; the node's decisions are checked
//! against an independent reading of the rules:
//!
//! - what boringtun hands over: nothing for an empty packet (a keepalive); otherwise the
//!   packet cut to the length its IPv4 total length (or IPv6 payload length + 40) says, or
//!   a refusal when that header does not fit or claims more than there is;
//! - cryptokey routing in: such a packet reaches the TUN device, unchanged and exactly
//!   once, if and only if its source (bytes 12..16, or 8..24) is inside an allowed network;
//!   otherwise it is refused with a reason and nothing is written;
//! - cryptokey routing out: the table routes a destination to the peer if and only if one
//!   of its networks holds it, and what the node encrypts for the peer decrypts, on the
//!   client, to the packet given.
//!
//! Input: IPv4 network (4 address bytes, prefix byte), IPv6 network (16 + 1), then packets,
//! each a little-endian `u16` length and that many bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use wraithgate_relay::admission::CookieSettings;
use wraithgate_relay::role::Listener;
use wraithgate_relay::table::{ExitTable, IpNet, PeerSpec};
use wraithgate_relay::zhop::{NodeKey, Zhop, ZhopOut};
use wraithgate_relay::{DropReason, PublicKey};

use crate::Input;

const LISTENER: Listener = Listener { id: 0, port: 51820 };
const MAX_PACKETS: usize = 16;

pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let v4 = Ipv4Addr::from(input.u32().to_be_bytes());
    let v4_prefix = input.u8() % 33;
    let mut v6 = [0u8; 16];
    for b in &mut v6 {
        *b = input.u8();
    }
    let v6_prefix = input.u8() % 129;
    let nets = [
        // As the table holds allowed IPs: host bits cleared.
        IpNet::new(IpAddr::V4(v4), v4_prefix)
            .expect("a prefix of 0-32")
            .trunc(),
        IpNet::new(IpAddr::V6(Ipv6Addr::from(v6)), v6_prefix)
            .expect("a prefix of 0-128")
            .trunc(),
    ];

    let node = NodeKey::from_secret([7; 32]);
    let client_secret = x25519::StaticSecret::from([9; 32]);
    let client_public = x25519::PublicKey::from(&client_secret);
    let peer_key = PublicKey(client_public.to_bytes());
    let table = ExitTable::new(1, vec![])
        .expect("an empty table")
        .with_peers(vec![PeerSpec {
            public_key: peer_key,
            name: String::new(),
            allowed_ips: nets.to_vec(),
            preshared_key: None,
            allowed_exits: vec![],
            endpoint: None,
            persistent_keepalive: None,
        }])
        .expect("one valid peer");
    let table = Arc::new(table);
    let now = Instant::now();
    let mut zhop = Zhop::new(
        Some(node.clone()),
        table.clone(),
        CookieSettings {
            seed: [3; 32],
            replies_per_second: 20_000,
        },
        now,
    );
    zhop.enable_exit(0);
    let node_public = x25519::PublicKey::from(node.public_key().0);
    let mut client = Tunn::new(client_secret, node_public, None, None, 1, None);
    let from: SocketAddr = "198.51.100.7:40000".parse().expect("literal");

    // The handshake.
    let mut buf = vec![0u8; 70_000];
    let init = crate::client_initiation(&mut client, &mut buf);
    let outs = run(&mut zhop, now, from, &init).expect("the initiation is admitted");
    let [Out::Peer(response)] = &outs[..] else {
        panic!("one response to the initiation, got {outs:?}");
    };
    match client.decapsulate(None, response, &mut buf) {
        TunnResult::WriteToNetwork(keepalive) => {
            let keepalive = keepalive.to_vec();
            let outs = run(&mut zhop, now, from, &keepalive).expect("the keepalive is taken");
            assert!(outs.is_empty(), "a keepalive writes nothing: {outs:?}");
        }
        other => panic!("the handshake completes: {other:?}"),
    }

    for _ in 0..MAX_PACKETS {
        if input.is_empty() {
            break;
        }
        let len = usize::from(input.u16() % 2048);
        let packet: Vec<u8> = (0..len).map(|_| input.u8()).collect();
        let sealed = match client.encapsulate(&packet, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("the client seals with a session: {other:?}"),
        };
        let got = run(&mut zhop, now, from, &sealed);
        let tun: Vec<&Vec<u8>> = match &got {
            Ok(outs) => outs
                .iter()
                .filter_map(|o| match o {
                    Out::Tun(b) => Some(b),
                    Out::Peer(_) => None,
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        match expected(&packet, &nets) {
            Expect::Nothing => assert!(got.is_ok() && tun.is_empty(), "{got:?}"),
            Expect::Refused => assert!(got.is_err() && tun.is_empty(), "{got:?}"),
            Expect::Tun(want) => assert_eq!(tun, [&want.to_vec()], "{got:?}"),
        }

        // Out: the route by destination, and the peer decrypting what the node sealed.
        if let Some(dst) = packet_address(&packet, false) {
            let routed = table.route(dst).map(|p| p.spec.public_key);
            let inside = nets.iter().any(|n| inside(n, dst));
            assert_eq!(routed.is_some(), inside, "route of {dst}");
            let mut sealed = Vec::new();
            let r = zhop.handle_tun(now, &peer_key, &packet, &mut |o| {
                if let ZhopOut::ToPeer { bytes, .. } = o {
                    sealed.push(bytes.to_vec());
                }
            });
            assert_eq!(r, Ok(true), "the node holds the tunnel");
            let [sealed] = &sealed[..] else {
                panic!("one datagram to the peer, got {}", sealed.len());
            };
            let opened = match client.decapsulate(None, sealed, &mut buf) {
                TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                    Some(p.to_vec())
                }
                _ => None,
            };
            if let Expect::Tun(want) = boringtun_view(&packet) {
                assert_eq!(
                    opened.as_deref(),
                    Some(want),
                    "the peer reads what was sent"
                );
            }
        }
    }
}

#[derive(Debug)]
enum Out {
    Peer(Vec<u8>),
    Tun(Vec<u8>),
}

fn run(
    zhop: &mut Zhop,
    now: Instant,
    from: SocketAddr,
    datagram: &[u8],
) -> Result<Vec<Out>, DropReason> {
    let mut outs = Vec::new();
    zhop.handle_client(now, LISTENER, from, datagram, &mut |o| match o {
        ZhopOut::ToPeer { bytes, .. } => outs.push(Out::Peer(bytes.to_vec())),
        ZhopOut::ToTun { bytes } => outs.push(Out::Tun(bytes.to_vec())),
        other => panic!("the Exit role opens no flow and sends to no exit: {other:?}"),
    })?;
    Ok(outs)
}

pub(crate) enum Expect<'a> {
    /// Taken, nothing written (a keepalive).
    Nothing,
    /// Refused with a reason, nothing written.
    Refused,
    /// Written to the TUN device, exactly these bytes.
    Tun(&'a [u8]),
}

/// What a WireGuard receiver hands over of a decrypted `packet`: nothing for a keepalive;
/// the packet cut to its IP length; a refusal when its header does not say one that fits.
pub(crate) fn boringtun_view(packet: &[u8]) -> Expect<'_> {
    if packet.is_empty() {
        return Expect::Nothing;
    }
    let len = match packet[0] >> 4 {
        4 if packet.len() >= 20 => usize::from(u16::from_be_bytes([packet[2], packet[3]])),
        6 if packet.len() >= 40 => usize::from(u16::from_be_bytes([packet[4], packet[5]])) + 40,
        _ => return Expect::Refused,
    };
    if len > packet.len() {
        return Expect::Refused;
    }
    Expect::Tun(&packet[..len])
}

fn expected<'a>(packet: &'a [u8], nets: &[IpNet]) -> Expect<'a> {
    match boringtun_view(packet) {
        Expect::Tun(p) => match packet_address(p, true) {
            Some(src) if nets.iter().any(|n| inside(n, src)) => Expect::Tun(p),
            _ => Expect::Refused,
        },
        other => other,
    }
}

/// The source (or destination) address of an IP packet whose header fits, read by offset.
fn packet_address(p: &[u8], source: bool) -> Option<IpAddr> {
    let v = *p.first()? >> 4;
    if v == 4 && p.len() >= 20 {
        let at = if source { 12 } else { 16 };
        let b: [u8; 4] = p[at..at + 4].try_into().ok()?;
        return Some(IpAddr::from(b));
    }
    if v == 6 && p.len() >= 40 {
        let at = if source { 8 } else { 24 };
        let b: [u8; 16] = p[at..at + 16].try_into().ok()?;
        return Some(IpAddr::from(b));
    }
    None
}

/// Whether `ip` is in `net`, bit by bit.
pub(crate) fn inside(net: &IpNet, ip: IpAddr) -> bool {
    let (a, b): (Vec<u8>, Vec<u8>) = match (net.addr(), ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => (n.octets().to_vec(), i.octets().to_vec()),
        (IpAddr::V6(n), IpAddr::V6(i)) => (n.octets().to_vec(), i.octets().to_vec()),
        _ => return false,
    };
    (0..usize::from(net.prefix_len())).all(|bit| {
        let mask = 0x80 >> (bit % 8);
        a[bit / 8] & mask == b[bit / 8] & mask
    })
}
