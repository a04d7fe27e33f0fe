//! Shared by the tests that run the real NVML backend against the fake
//! library: thin panicking wrappers over `ringfence_testkit::fake_nvml`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// target/<profile>/libnvidia_ml.so, built once per test binary.
pub fn fake_library() -> PathBuf {
    ringfence_testkit::fake_nvml::library().unwrap()
}

/// A private copy of the fake library (its own statics) with `scenario` beside it.
/// Returns the path to pass as the NVML library override.
pub fn install(dir: &Path, scenario: &str) -> PathBuf {
    ringfence_testkit::fake_nvml::install(dir, scenario).unwrap()
}

/// `n` default GPUs as scenario text.
pub fn gpus(n: usize) -> String {
    ringfence_testkit::fake_nvml::gpus(n)
}
