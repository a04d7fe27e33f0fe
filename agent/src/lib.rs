//! ringfenced, the per-host agent, as a library: the binary in `main.rs` only
//! parses arguments and wires these modules together. The coordinator's
//! `demo` and the integration tests run the same agent in-process.
pub mod gpu;
pub mod health;
pub mod hostfacts;
pub mod xidlog;
