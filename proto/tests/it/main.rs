//! The `ringfence` crate's integration tests as one binary (one link of
//! tonic, rustls and ring instead of one per file): the envelope attack
//! matrix, `ringfence pki` files, mTLS, and certificate reload by call and
//! by SIGHUP. Test names are `module::test`.
// A failed fixture step is a failed test: test code unwraps.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod envelope_attacks;
mod pki_files;
mod tls_mtls;
mod tls_reload;
mod tls_sighup;
