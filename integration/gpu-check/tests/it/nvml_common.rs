//! The fake NVML library for these tests (panicking wrappers over
//! `ringfence_testkit::fake_nvml`).

use std::path::{Path, PathBuf};

/// target/<profile>/libnvidia_ml.so, built once per test binary.
pub fn fake_library() -> PathBuf {
    ringfence_testkit::fake_nvml::library().unwrap()
}

/// A private copy of the fake library with `scenario` beside it.
pub fn install(dir: &Path, scenario: &str) -> PathBuf {
    ringfence_testkit::fake_nvml::install(dir, scenario).unwrap()
}
