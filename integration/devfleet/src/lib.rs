//! ringfence's test fleet, kept out of the packaged binaries: a local fleet
//! of real agents ([`local_fleet`]), the in-memory host simulator
//! ([`simhost`]), the agent's controllable health source ([`fake`]) and the
//! demo ([`demo`], binary `ringfence-demo`). Used by the coordinator's and
//! agent's tests and by the benchmarks.
#![warn(missing_docs)]
pub mod demo;
pub mod fake;
pub mod local_fleet;
pub mod simhost;
