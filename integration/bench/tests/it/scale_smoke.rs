//! The scale benchmark's whole path on 200 hosts: the real coordinator
//! process patches every simulated host exactly once, and in the halt run
//! nothing reaches a host that had not started, nor rings 3 and 4.
//! Needs `ringfence` beside the bench (`cargo build --workspace --bins`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn value(figures: &[serde_json::Value], name: &str) -> f64 {
    figures
        .iter()
        .find(|f| f["name"] == name)
        .and_then(|f| f["value"].as_f64())
        .unwrap_or_else(|| panic!("no figure `{name}` in {figures:?}"))
}

#[test]
fn two_hundred_hosts_patch_once_and_the_halt_stops_dispatch() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_ringfence-bench"))
        .args(["--only", "scale", "--out"])
        .arg(out.path())
        .env("RINGFENCE_BENCH_HOSTS", "200")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "bench failed: {stderr}");
    let figures: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();

    // The full wave completed (the bench fails otherwise) and the simulator
    // counted exactly one patch on every host.
    assert_eq!(value(&figures, "hosts"), 200.0);
    assert_eq!(value(&figures, "hosts patched exactly once"), 200.0);
    assert!(value(&figures, "peak coordinator RSS") > 1.0);
    assert!(value(&figures, "state store size") > 0.0);

    // The halted wave never reached a host that had not started, nor rings 3-4.
    assert_eq!(
        value(
            &figures,
            "halt: tasks to hosts not started before the failure"
        ),
        0.0
    );
    assert_eq!(value(&figures, "halt: tasks to rings 3-4"), 0.0);
}
