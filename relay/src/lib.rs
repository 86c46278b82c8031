//! WraithGate's data plane.
//!
//! - [`wire`], [`keys`], [`table`], [`ratelimit`], [`cookie`] and [`admission`] make up
//!   the sans-IO core with the roles built on it, the DoubleHop [`router`] and [`zhop`]
//!   (which speak in [`role`]'s and [`slab`]'s names, never in each other's): no sockets,
//!   no threads; `now` is an argument (boringtun keeps Z-HOP's tunnels' own clocks).
//! - [`io`] drives the roles from real sockets, one worker thread per core.
//! - [`vnet`] splits the TCP/UDP super-packets a TUN with offloads hands over and coalesces
//!   TCP segments into them for the other direction (the Exit role's TUN path).

pub mod admission;
pub mod cookie;
pub mod drop_reason;
pub mod io;
pub mod keys;
pub mod ratelimit;
pub mod role;
pub mod slab;
pub mod table;
pub mod tun;
pub mod vnet;
pub mod wire;
pub mod zhop;

/// DoubleHop (DESIGN §3): per-client NAT for WireGuard, the sans-IO [`router`].
pub mod doublehop {
    pub mod router;
}
/// The DoubleHop router, by its long-standing path.
pub use doublehop::router;

/// Z-HOP's inner IP/UDP packets, also the tests' and the demo's.
pub use zhop::inner;

pub use drop_reason::DropReason;
pub use keys::PublicKey;
pub use router::{
    Action, Command, ExitStats, Listener, Router, RouterConfig, RouterStats, SessionSlot,
};
pub use table::{ExitSpec, ExitTable, SharedTable};
