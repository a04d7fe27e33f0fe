//! `integration/gpu-check/run.sh` end to end without a GPU: the real
//! `ringfenced` and `ringfence-gpu-check` binaries, the fake NVML library
//! playing sample A's scenario, and a stand-in `nvidia-smi` printing
//! sample A's captures. The script must write every output, compare clean,
//! and exit 1 once the agent disagrees with nvidia-smi.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::nvml_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use ringfenced::gpu::sim::scenario::Scenario;

const STEM: &str = "v12-550-h100x4";

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>, holding both binaries (ringfenced built here once).
fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let kit = PathBuf::from(env!("CARGO_BIN_EXE_ringfence-gpu-check"));
        let dir = kit.parent().unwrap().to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut args = vec![
            "build",
            "--quiet",
            "-p",
            "ringfenced",
            "--bin",
            "ringfenced",
        ];
        if dir.ends_with("release") {
            args.push("--release");
        }
        let mut build = Command::new(cargo);
        build.args(&args).current_dir(manifest());
        // The test's own package variables would dirty build scripts that
        // track them (ring's tracks CARGO_MANIFEST_DIR) and rebuild half the
        // tree; the build must see what a plain `cargo build` sees.
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&k.as_ref())
            {
                build.env_remove(&key);
            }
        }
        let status = build.status().unwrap();
        assert!(status.success(), "cargo build -p ringfenced failed");
        assert!(dir.join("ringfenced").exists());
        dir
    })
    .clone()
}

/// A stand-in nvidia-smi answering from sample A's files.
fn fake_smi(dir: &Path) -> PathBuf {
    let samples = manifest().join("tests/samples");
    let s = samples.display();
    let script = format!(
        "#!/bin/sh\n\
         case \"$*\" in\n\
         \"-L\") grep '^GPU ' '{s}/{STEM}.nvlink.txt' ;;\n\
         \"-q -x\") cat '{s}/{STEM}.xml' ;;\n\
         \"-q\") echo '==============NVSMI LOG==============' ;;\n\
         \"nvlink -s\") cat '{s}/{STEM}.nvlink.txt' ;;\n\
         \"nvlink -e\") echo 'no counters in this stand-in' ;;\n\
         *) echo \"unexpected arguments: $*\" >&2; exit 9 ;;\n\
         esac\n"
    );
    let path = dir.join("nvidia-smi");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn run(dir: &Path, scenario: &str, out: &Path) -> Output {
    let lib_dir = dir.join(out.file_name().unwrap()).with_extension("lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    let lib = nvml_common::install(&lib_dir, scenario);
    Command::new(manifest().join("run.sh"))
        .env("OUT", out)
        .env("BIN_DIR", bin_dir())
        .env("NVIDIA_SMI", fake_smi(dir))
        .env("NVML_LIBRARY", &lib)
        .env("CALL_SECONDS", "0.2")
        .env("SMI_RUNS", "2")
        .env("COLLECTIONS", "3")
        .current_dir(dir)
        .output()
        .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_script_captures_compares_converts_and_times() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = read(&manifest().join(format!("tests/samples/{STEM}.scenario.toml")));
    let out = dir.path().join("out");
    let o = run(dir.path(), &scenario, &out);
    let log = || {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert_eq!(o.status.code(), Some(0), "{}", log());
    for f in [
        "env.txt",
        "agent.toml",
        "health.json",
        "nvidia-smi.xml",
        "nvlink-status.txt",
        "nvlink-errors.txt",
        "nvidia-smi-q.txt",
        "comparison.txt",
        "comparison.md",
        "scenario.toml",
        "timing.json",
        "summary.txt",
        "run.log",
    ] {
        assert!(out.join(f).exists(), "{f} missing\n{}", log());
    }
    let comparison = read(&out.join("comparison.txt"));
    assert!(
        comparison.contains("123 rows: 115 match, 0 mismatch, 8 not comparable"),
        "{comparison}"
    );
    // The NVLink status was passed on: the inactive link was compared.
    assert!(comparison.lines().any(|l| l.starts_with("gpu3")
        && l.contains("nvlinks")
        && l.trim_end().ends_with("match")));
    // The fixture candidate is a scenario the fake library reads, of the same GPUs.
    let s = Scenario::load(&out.join("scenario.toml")).unwrap();
    assert_eq!(s.gpus.len(), 4);
    assert_eq!(s.gpus[1].remapped_rows_pending, Some(true));
    assert_eq!(s.driver_version, "550.54.15");
    let timing: serde_json::Value = serde_json::from_str(&read(&out.join("timing.json"))).unwrap();
    assert_eq!(timing["gpus"], 4);
    assert_eq!(timing["collection"]["runs"], 3);
    assert!(timing["collection"]["mean_ms"].as_f64().unwrap() > 0.0);
    assert!(timing["nvml_calls"]["calls"].as_u64().unwrap() > 0);
    assert_eq!(timing["nvml_calls"]["failed"], 0);
    assert_eq!(timing["nvidia_smi_q"]["runs"], 2);
    let summary = read(&out.join("summary.txt"));
    assert!(
        summary.contains("0 mismatch") && summary.contains("calls/s"),
        "{summary}"
    );
    assert!(read(&out.join("agent.toml")).contains("expected_gpus = 4"));
}

#[test]
fn the_script_exits_1_when_the_agent_disagrees() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = read(&manifest().join(format!("tests/samples/{STEM}.scenario.toml")))
        .replace("temperature_c = 48", "temperature_c = 60");
    let out = dir.path().join("out");
    let o = run(dir.path(), &scenario, &out);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let comparison = read(&out.join("comparison.txt"));
    let row = comparison
        .lines()
        .find(|l| l.starts_with("gpu2") && l.contains("temperature_c "))
        .unwrap();
    assert!(
        row.contains("MISMATCH (differ by 12 C, more than ±3 C)"),
        "{row}"
    );
    // Everything after the comparison still ran.
    assert!(out.join("timing.json").exists());
}

#[test]
fn the_script_stops_with_2_when_a_binary_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(manifest().join("run.sh"))
        .env("OUT", dir.path().join("out"))
        .env("BIN_DIR", dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("ringfenced is missing (build with: cargo build --release"),
        "{err}"
    );
}
