//! The shared library of ringfence: the wire contract (generated from
//! `proto/ringfence/v1`), DSSE-style signed envelopes, health attestations,
//! mTLS identity and the PKI helpers used by both `ringfenced` and `ringfence`.
#![forbid(unsafe_code)]

pub mod attest;
pub mod config;
pub mod envelope;
pub mod keys;
pub mod pki;
pub mod refusals;
pub mod spiffe;
pub mod status;
pub mod time;
pub mod tls;
pub mod trust;

/// Generated protobuf messages and gRPC client/server code (`ringfence.v1`).
pub mod pb {
    #![allow(
        missing_docs,
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic
    )]
    tonic::include_proto!("ringfence.v1");
}

/// The version of this build, shared by agent and coordinator.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
