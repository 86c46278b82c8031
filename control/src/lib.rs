//! WraithGate node: configuration, state, the operator sidecar, the demo, and the
//! real WireGuard endpoints.

pub mod api;
pub mod change;
pub mod config;
pub mod demo;
pub mod endpoint;
pub mod endpoints;
pub mod metrics;
pub mod node;
pub mod openapi;
pub mod state;
