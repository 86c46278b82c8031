//! WraithGate's data plane.
//!
//! - [`wire`], [`keys`], [`table`], [`ratelimit`] and [`router`] make up the sans-IO core:
//!   no sockets, no clock, no threads.
//! - [`io`] drives that core from real sockets, one worker thread per core.

pub mod drop_reason;
pub mod io;
pub mod keys;
pub mod ratelimit;
pub mod router;
pub mod table;
pub mod wire;

pub use drop_reason::DropReason;
pub use keys::PublicKey;
pub use router::{Action, Command, Listener, Router, RouterConfig, RouterStats, SessionSlot};
pub use table::{ExitSpec, ExitTable, SharedTable};
