//! WraithGate node: configuration, state, the operator sidecar, the demo, and the testbed of
//! real WireGuard endpoints.

pub mod api;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod node;
pub mod openapi;
pub mod state;
pub mod testbed;
