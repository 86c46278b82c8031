//! WraithGate's benchmark harness (DESIGN §7).
//!
//! - [`load`]: the load generator (sendmmsg + UDP GSO, many flows, WireGuard-shaped
//!   handshakes and transport) and the sink (loss, reordering, one-way latency, RFC 3550
//!   jitter), both in this process so one clock stamps both ends.
//! - [`topology`]: the `client`/`relay`/`exit` namespaces joined by veth, the loopback
//!   variant, and the cleanup that runs whatever happens.
//! - [`contender`]: the relays compared: WraithGate (each backend), nftables DNAT+SNAT,
//!   [`naive`] tokio, socat and nginx.
//! - [`wgo`], [`zhop`]: end to end with wireguard-go and iperf3, through a relay and
//!   through Z-HOP's two layers (WraithGate or wireguard-go + kernel forwarding).
//! - [`exitrole`]: the Exit role end to end: tunnels whose ends are WraithGate or
//!   wireguard-go, with and without a WraithGate relay between.
//! - [`report`]: medians, the markdown table, `--json`, the SVG chart.
//!
//! The `relay-bench` binary ties these together; the criterion benches in `benches/` use
//! [`load`] on the host loopback.

pub mod contender;
pub mod cpu;
pub mod exitrole;
pub mod histogram;
pub mod load;
pub mod naive;
pub mod packets;
pub mod report;
pub mod topology;
pub mod udp;
pub mod wgo;
pub mod zhop;
