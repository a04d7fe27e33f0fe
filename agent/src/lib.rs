//! ringfenced, the per-host agent, as a library: the binary in `main.rs` only
//! parses arguments and wires these modules together. The test fleet of
//! `integration/devfleet` (its `ringfence-demo` and the coordinator's tests)
//! runs the same agent in-process.

#![warn(missing_docs)]

pub mod cli;
pub mod command;
pub mod config;
pub mod daemon;
pub mod gpu;
pub mod health;
pub mod healthcell;
pub mod hostfacts;
pub mod journal;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod profiles;
pub mod server;
pub mod tasks;
pub mod xidlog;
