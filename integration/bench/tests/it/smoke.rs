//! The benchmark binary runs end to end with tiny windows and writes the
//! figures it promises. Needs `ringfenced` built next to it
//! (`cargo build --workspace --bins`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringfence-bench"))
}

#[test]
fn short_run_writes_every_figure() {
    let out = tempfile::tempdir().unwrap();
    let run = bench()
        .args([
            "--only",
            "envelope,health,footprint",
            "--seconds",
            "0.3",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "exit {}: {stderr}", run.status);

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let figures = json.as_array().unwrap();
    let md = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    let value = |name: &str| {
        let f = figures
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no figure `{name}` in {json:#}"));
        assert!(md.contains(name), "`{name}` missing from results.md");
        f["value"].as_f64().unwrap()
    };
    let positive = [
        "raw verify_strict",
        "task verification (6 checks)",
        "ratio tasks/raw",
        "HealthReport size (8 GPUs)",
        "peak RSS (VmHWM)",
        "steady RSS (median VmRSS)",
        "exec to READY=1",
        "RSS after WatchHealth open/cancel churn",
        "GET /metrics median time (8 GPUs)",
        "GET /metrics response size (8 GPUs)",
        "WatchHealth open/cancel cycles per second",
    ];
    let per_concurrency = [
        "agent p50",
        "bare p50",
        "agent p99",
        "bare p99",
        "agent req/s",
        "bare req/s",
        "p50 ratio agent/bare",
        "p99 ratio agent/bare",
    ];
    let mut names: Vec<String> = positive.iter().map(|s| s.to_string()).collect();
    for c in [1, 64] {
        names.extend(per_concurrency.iter().map(|n| format!("{n} c={c}")));
    }
    for name in &names {
        let v = value(name);
        assert!(v.is_finite() && v > 0.0, "`{name}` = {v}");
    }
    // A short window may see no CPU tick at all; it must still be a number.
    let cpu = value("CPU of one core (8 GPUs, 1 s poll)");
    assert!(cpu.is_finite() && cpu >= 0.0, "CPU = {cpu}");
    // Checked figures say PASS or MISS; the rest carry none.
    for f in figures {
        let checked = f["target"].as_str().unwrap().starts_with(['<', '>']);
        assert_eq!(f["pass"].is_boolean(), checked, "{f}");
    }
    assert_eq!(figures.len(), names.len() + 1, "{json:#}");
}

#[test]
fn unknown_bench_is_a_usage_error_naming_the_known_ones() {
    let run = bench().args(["--only", "envelope,nope"]).output().unwrap();
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("`nope`") && stderr.contains("envelope, health, footprint"),
        "{stderr}"
    );
}
