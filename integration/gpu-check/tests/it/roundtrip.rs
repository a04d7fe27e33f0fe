//! The converter and the fixtures: a fake-NVML scenario played through the
//! agent's NVML backend, converted back into a scenario and played again,
//! gives the same health (all fields except times and host facts); and
//! every fixture in integration/fixtures replays to its captured report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::nvml_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ringfence::pb;
use ringfence_gpu_check::{convert, replay};

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixtures_dir() -> PathBuf {
    manifest().join("../fixtures")
}

/// Sample A's four H100s (ECC errors, a pending remap, throttling, an
/// inactive NVLink, processes) plus what it lacks: a GPU without a serial,
/// NVLink, processes or row remapping but with retired pages, and XIDs.
fn rich_scenario() -> String {
    let base =
        std::fs::read_to_string(manifest().join("tests/samples/v12-550-h100x4.scenario.toml"))
            .unwrap();
    format!(
        "{base}
[[gpu]]
name = \"Tesla V100-SXM2-32GB\"
retired_pages_single_bit = 2
retired_pages_double_bit = 1
retired_pages_pending = true
pcie_link_gen_current = 2
pcie_link_width_current = 8
pcie_replay_counter = 250
temperature_c = 85
unsupported = [\"serial\", \"nvlinks\", \"processes\", \"remapped_rows_pending\"]

[[xid]]
gpu = 4
xid = 79
at_s = 0.0

[[xid]]
gpu = 1
xid = 13
at_s = 0.0
"
    )
}

fn report_of(json: &serde_json::Value) -> pb::HealthReport {
    // Through text, as the converter reads a file printed by `health --once --json`.
    let text = serde_json::to_string_pretty(json).unwrap();
    replay::parse_report(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn xid_count(r: &pb::HealthReport) -> usize {
    r.gpus.iter().map(|g| g.xids.len()).sum()
}

#[test]
fn scenario_to_health_to_scenario_to_the_same_health() {
    let lib = nvml_common::fake_library();
    let first = report_of(&replay::replay(&rich_scenario(), &lib, "gpu-rt", 5, 2).unwrap());
    // The first report carries every kind of fault the conversion must keep.
    assert_eq!(first.gpus.len(), 5);
    assert_eq!(xid_count(&first), 2, "{first:?}");
    let codes: Vec<&str> = first.reasons.iter().map(|r| r.code.as_str()).collect();
    for code in [
        "ecc_uncorrected_volatile",
        "row_remap_pending",
        "retired_pages_pending",
        "hw_power_brake",
        "nvlink_inactive",
        "pcie_link_degraded",
        "xid_critical",
        "xid_application",
    ] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
    assert_eq!(first.gpus[4].serial, "");
    assert!(first.gpus[4].unsupported.contains(&"serial".to_owned()));

    let conversion = convert::to_scenario(&first, "round trip").unwrap();
    assert!(conversion.losses.is_empty(), "{:?}", conversion.losses);
    let second = report_of(&replay::replay(&conversion.toml, &lib, "gpu-rt", 5, 2).unwrap());
    let diffs = replay::differences(&first, &second);
    assert!(diffs.is_empty(), "{diffs:#?}\n{}", conversion.toml);
    // Times were the only thing set aside, and they were there to set aside.
    assert_ne!(first.collected_at_unix_ms, 0);
    assert_ne!(second.gpus[4].xids[0].at_unix_ms, 0);
}

#[test]
fn the_round_trip_catches_a_field_the_conversion_drops() {
    let lib = nvml_common::fake_library();
    let first = report_of(&replay::replay(&rich_scenario(), &lib, "gpu-rt", 5, 2).unwrap());
    let conversion = convert::to_scenario(&first, "round trip").unwrap();
    // A converter that forgot the pending row remap of gpu1 would be caught.
    let dropped = conversion
        .toml
        .replacen("remapped_rows_pending = true\n", "", 1);
    assert_ne!(dropped, conversion.toml);
    let second = report_of(&replay::replay(&dropped, &lib, "gpu-rt", 5, 2).unwrap());
    let diffs = replay::differences(&first, &second);
    assert!(
        diffs
            .iter()
            .any(|d| d.starts_with(".gpus[1].remapped_rows_pending: true vs false")),
        "{diffs:#?}"
    );
    assert!(
        diffs
            .iter()
            .any(|d| d.starts_with(".verdict") || d.starts_with(".reasons")),
        "{diffs:#?}"
    );
}

/// `<stem>.toml` scenarios in integration/fixtures with their `<stem>.health.json` captures.
fn fixtures() -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let capture = path.with_extension("health.json");
            assert!(
                capture.exists(),
                "{} has no capture {}",
                path.display(),
                capture.display()
            );
            out.push((path, capture));
        }
    }
    out.sort();
    out
}

#[test]
fn every_fixture_replays_to_its_capture() {
    let lib = nvml_common::fake_library();
    let all = fixtures();
    assert!(
        !all.is_empty(),
        "no fixture in {}",
        fixtures_dir().display()
    );
    for (scenario, capture) in all {
        let want =
            report_of(&serde_json::from_str(&std::fs::read_to_string(&capture).unwrap()).unwrap());
        assert_eq!(want.backend, "nvml", "{}", capture.display());
        let got = report_of(
            &replay::replay(
                &std::fs::read_to_string(&scenario).unwrap(),
                &lib,
                &want.host_id,
                want.gpus_expected,
                xid_count(&want),
            )
            .unwrap(),
        );
        let diffs = replay::differences(&want, &got);
        assert!(diffs.is_empty(), "{}: {diffs:#?}", scenario.display());
    }
}

fn kit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringfence-gpu-check"))
}

#[test]
fn the_cli_converts_a_capture_and_checks_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let (_, capture) = fixtures().into_iter().next().unwrap();
    let scenario = dir.path().join("scenario.toml");
    let out = kit()
        .args(["to-scenario", "--health"])
        .arg(&capture)
        .arg("--out")
        .arg(&scenario)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = std::fs::read_to_string(&scenario).unwrap();
    assert!(text.starts_with("# fake-NVML scenario"), "{text}");
    let replay_cmd = |scenario: &Path| {
        kit()
            .args(["replay", "--scenario"])
            .arg(scenario)
            .arg("--fake-nvml")
            .arg(nvml_common::fake_library())
            .arg("--expect")
            .arg(&capture)
            .output()
            .unwrap()
    };
    let out = replay_cmd(&scenario);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // One value changed: the replay no longer equals the capture, and says where.
    let changed = dir.path().join("changed.toml");
    std::fs::write(
        &changed,
        text.replacen("temperature_c = ", "temperature_c = 1", 1),
    )
    .unwrap();
    let out = replay_cmd(&changed);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("differs: .gpus[0].temperature_c"),
        "{out:?}"
    );

    // A report with a failed query: refused unless --allow-lossy.
    let mut report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&capture).unwrap()).unwrap();
    report["gpus"][0]["power_usage_mw"] = serde_json::Value::Null;
    let lossy = dir.path().join("lossy.json");
    std::fs::write(&lossy, report.to_string()).unwrap();
    let out = kit()
        .args(["to-scenario", "--health"])
        .arg(&lossy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not reproduced: gpu 0 power_usage_mw"),
        "{out:?}"
    );
    let out = kit()
        .args(["to-scenario", "--allow-lossy", "--health"])
        .arg(&lossy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("# NOT REPRODUCED: gpu 0 power_usage_mw")
    );
}
