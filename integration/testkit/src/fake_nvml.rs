//! The fake NVML library (`integration/fake-nvml`) for the tests that run the
//! agent's real NVML backend against it: built once per test binary, copied
//! with its own scenario file for each test that needs private statics.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{FixtureError, artifacts, io_error};

/// `target/<profile>/libnvidia_ml.so`, built with cargo once per test binary
/// (so `cargo nextest run -p <crate>` works without a workspace build first).
pub fn library() -> Result<PathBuf, FixtureError> {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| build().map_err(|e| e.to_string()))
        .clone()
        .map_err(|reason| FixtureError::Build {
            what: "the fake NVML library",
            reason,
        })
}

fn build() -> Result<PathBuf, FixtureError> {
    let profile_dir = artifacts::profile_dir()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec!["build", "--quiet", "-p", "fake-nvml"];
    if profile_dir.ends_with("release") {
        args.push("--release");
    }
    let status = std::process::Command::new(&cargo)
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(io_error(Path::new(&cargo)))?;
    if !status.success() {
        return Err(FixtureError::Build {
            what: "the fake NVML library",
            reason: format!("cargo build -p fake-nvml: {status}"),
        });
    }
    artifacts::built("libnvidia_ml.so")
}

/// A private copy of the fake library (its own statics) in `dir` with
/// `scenario` beside it; returns the path to pass as the NVML library override.
pub fn install(dir: &Path, scenario: &str) -> Result<PathBuf, FixtureError> {
    let lib = dir.join("libnvidia-ml.so.1");
    let built = library()?;
    std::fs::copy(&built, &lib).map_err(io_error(&built))?;
    crate::write(&dir.join("fake-nvml-scenario.toml"), scenario)?;
    Ok(lib)
}

/// `n` GPUs with the fake library's defaults, as scenario text.
pub fn gpus(n: usize) -> String {
    "[[gpu]]\n".repeat(n)
}
