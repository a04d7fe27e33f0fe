//! One test binary for ringfence-docgen (one module per scenario).
mod examples;
mod pages;
