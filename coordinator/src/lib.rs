//! ringfence, the coordinator, as a library: inventory, wave specs, the pure
//! wave planner, the I/O loop that drives agents, evidence, and the
//! `ringfence` command line (`cli`). The test fleet, host simulator and demo
//! live in `integration/devfleet`.

#![warn(missing_docs)]

pub mod approvals;
pub mod cli;
pub mod client;
pub mod dsse;
pub mod evidence;
pub mod hosttext;
pub mod inventory;
pub mod metrics;
pub mod plan;
pub mod preflight;
pub mod settings;
pub mod spec;
pub mod store;
pub mod wave;
