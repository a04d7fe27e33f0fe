//! One test binary for ringfence-docgen (one module per scenario).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod examples;
mod pages;
