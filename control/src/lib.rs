//! WraithGate node: configuration, the demo, and the testbed of real WireGuard endpoints.

pub mod config;
pub mod demo;
pub mod testbed;
