//! Shared by the tests that run the real NVML backend against the fake library.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// target/<profile>/libnvidia_ml.so, built once per test binary.
pub fn fake_library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let profile_dir = ringfence_testkit::artifacts::profile_dir().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut args = vec!["build", "--quiet", "-p", "fake-nvml"];
        if profile_dir.ends_with("release") {
            args.push("--release");
        }
        let status = std::process::Command::new(cargo)
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p fake-nvml");
        assert!(status.success(), "cargo build -p fake-nvml failed");
        let lib = profile_dir.join("libnvidia_ml.so");
        assert!(lib.exists(), "{} missing after build", lib.display());
        lib
    })
    .clone()
}

/// A private copy of the fake library (its own statics) with `scenario` beside it.
/// Returns the path to pass as the NVML library override.
pub fn install(dir: &Path, scenario: &str) -> PathBuf {
    let lib = dir.join("libnvidia-ml.so.1");
    std::fs::copy(fake_library(), &lib).unwrap();
    std::fs::write(dir.join("fake-nvml-scenario.toml"), scenario).unwrap();
    lib
}

/// `n` default GPUs as scenario text.
pub fn gpus(n: usize) -> String {
    "[[gpu]]\n".repeat(n)
}
