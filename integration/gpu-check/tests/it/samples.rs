//! The comparator on the nvidia-smi samples in tests/samples (hand-written to
//! nvidia-smi's DTD, three schema generations): the agent's real NVML backend
//! plays each sample's scenario on the fake library, and its report must
//! match the sample field by field; a scenario that disagrees must show up as
//! exactly the mismatching rows, and the CLI must exit 1 on them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::nvml_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ringfence_gpu_check::compare::{Comparison, Outcome, compare};
use ringfence_gpu_check::{render, replay, smi};

fn sample(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/samples")
        .join(name)
}

fn read(name: &str) -> String {
    std::fs::read_to_string(sample(name)).unwrap()
}

/// The agent's report on the fake library playing `scenario`, as JSON.
fn agent_report(scenario: &str, gpus: u32) -> serde_json::Value {
    replay::replay(scenario, &nvml_common::fake_library(), "gpu-check", gpus, 0).unwrap()
}

fn compare_sample(stem: &str, scenario: &str, gpus: u32, with_nvlink: bool) -> Comparison {
    let json = agent_report(scenario, gpus);
    let report = replay::parse_report(&json).unwrap();
    let log = smi::parse_log(&read(&format!("{stem}.xml"))).unwrap();
    let links = with_nvlink.then(|| smi::parse_nvlink_status(&read(&format!("{stem}.nvlink.txt"))));
    compare(&report, &log, links.as_ref())
}

fn no_mismatch(c: &Comparison) {
    let bad: Vec<_> = c.mismatches().collect();
    assert!(bad.is_empty(), "{bad:#?}\n{}", render::render_text(c));
}

/// Asserts a row's values and that it matched (with `how` in its note).
fn matched(c: &Comparison, gpu: &str, field: &str, ours: &str, theirs: &str, how: &str) {
    let r = c
        .row(gpu, field)
        .unwrap_or_else(|| panic!("no row {gpu} {field}"));
    assert_eq!(
        (r.ours.as_str(), r.theirs.as_str()),
        (ours, theirs),
        "{r:?}"
    );
    assert_eq!(r.outcome, Outcome::Match(how.to_owned()), "{r:?}");
}

#[test]
fn four_h100s_on_driver_550_match_field_by_field() {
    let stem = "v12-550-h100x4";
    let c = compare_sample(stem, &read(&format!("{stem}.scenario.toml")), 4, true);
    no_mismatch(&c);
    matched(&c, "host", "driver_version", "550.54.15", "550.54.15", "");
    matched(&c, "host", "cuda_driver_version", "12.4", "12.4", "");
    matched(&c, "host", "gpus_found", "4", "4", "");
    // ECC errors, summed over nvidia-smi's SRAM and DRAM counters.
    matched(&c, "gpu1", "ecc_volatile_corrected", "15", "15", "");
    matched(&c, "gpu1", "ecc_volatile_uncorrected", "1", "1", "");
    matched(&c, "gpu1", "ecc_aggregate_corrected", "40", "40", "");
    matched(&c, "gpu1", "ecc_aggregate_uncorrected", "2", "2", "");
    // A pending row remap.
    matched(&c, "gpu1", "remapped_rows_pending", "true", "Yes", "");
    matched(&c, "gpu1", "remapped_rows_uncorrectable", "2", "2", "");
    matched(&c, "gpu1", "remapped_rows_failure", "false", "No", "");
    // Hopper has no page retirement: NotSupported on our side, N/A on theirs.
    matched(
        &c,
        "gpu0",
        "retired_pages_single_bit",
        "not supported",
        "N/A",
        "both not supported",
    );
    // Active throttle reasons.
    matched(
        &c,
        "gpu2",
        "throttle_reasons",
        "hw_power_brake_slowdown, hw_slowdown (mask 0x88)",
        "hw_power_brake_slowdown, hw_slowdown",
        "",
    );
    matched(
        &c,
        "gpu0",
        "throttle_reasons",
        "gpu_idle (mask 0x1)",
        "gpu_idle",
        "",
    );
    // An inactive NVLink.
    matched(
        &c,
        "gpu3",
        "nvlinks",
        "18 links, inactive: [5]",
        "18 links, inactive: [5]",
        "",
    );
    // Live values within their tolerance; limits exact.
    matched(&c, "gpu0", "temperature_c", "34 C", "35 C", "within ±3 C");
    matched(
        &c,
        "gpu2",
        "power_usage_mw",
        "690000 mW",
        "688.42 W",
        "within ±68842 mW",
    );
    matched(&c, "gpu2", "power_limit_mw", "700000 mW", "700.00 W", "");
    matched(&c, "gpu0", "temperature_slowdown_c", "87 C", "87 C", "");
    matched(&c, "gpu0", "temperature_shutdown_c", "92 C", "92 C", "");
    matched(&c, "gpu0", "pcie_link_width_current", "16x", "16x", "");
    matched(&c, "gpu0", "pcie_link_gen_max", "5", "5", "");
    // Compute processes only (nvidia-smi also lists Xorg, type G).
    matched(
        &c,
        "gpu0",
        "processes",
        "4242 (512 MiB)",
        "4242 (512 MiB)",
        "",
    );
    matched(
        &c,
        "gpu2",
        "processes",
        "5120 (69984 MiB)",
        "5120 (69984 MiB)",
        "",
    );
    let r = c.row("gpu3", "nvlink_error_counters").unwrap();
    assert!(matches!(r.outcome, Outcome::NotComparable(_)), "{r:?}");
    assert!(r.ours.starts_with("3 "), "{r:?}");
    // Every field of every GPU has a row: 3 host rows + 30 per GPU.
    assert_eq!(c.rows.len(), 3 + 4 * 30, "{}", render::render_text(&c));
}

#[test]
fn two_v100s_in_the_older_schema_match() {
    let stem = "v11-525-v100x2";
    let c = compare_sample(stem, &read(&format!("{stem}.scenario.toml")), 2, true);
    no_mismatch(&c);
    // Retired pages of each cause, and a pending retirement.
    matched(&c, "gpu0", "retired_pages_single_bit", "1", "1", "");
    matched(&c, "gpu0", "retired_pages_double_bit", "1", "1", "");
    matched(&c, "gpu0", "retired_pages_pending", "true", "Yes", "");
    // ECC from single_bit/double_bit totals.
    matched(&c, "gpu0", "ecc_volatile_corrected", "2", "2", "");
    matched(&c, "gpu0", "ecc_aggregate_uncorrected", "1", "1", "");
    // No row remapping on Volta: the whole <remapped_rows> is N/A.
    matched(
        &c,
        "gpu0",
        "remapped_rows_pending",
        "not supported",
        "N/A",
        "both not supported",
    );
    // clocks_throttle_reasons (before the rename to clocks_event_reasons).
    matched(
        &c,
        "gpu0",
        "throttle_reasons",
        "hw_slowdown, hw_thermal_slowdown (mask 0x48)",
        "hw_slowdown, hw_thermal_slowdown",
        "",
    );
    // power_readings/enforced_power_limit (before gpu_power_readings).
    matched(&c, "gpu0", "power_limit_mw", "300000 mW", "300.00 W", "");
    matched(
        &c,
        "gpu1",
        "nvlinks",
        "6 links, inactive: [3]",
        "6 links, inactive: [3]",
        "",
    );
    matched(&c, "gpu1", "processes", "none", "none", "");
}

#[test]
fn one_h200_on_driver_570_matches_and_says_what_it_cannot_compare() {
    let stem = "v12-570-h200x1";
    let c = compare_sample(stem, &read(&format!("{stem}.scenario.toml")), 1, false);
    no_mismatch(&c);
    // average_power_draw is what NVML's power usage reads on Hopper; 10% of it
    // is more than the 10 W floor.
    matched(
        &c,
        "gpu0",
        "power_usage_mw",
        "118500 mW",
        "118.21 W",
        "within ±11821 mW",
    );
    matched(
        &c,
        "gpu0",
        "processes",
        "not supported",
        "(none listed)",
        "both not supported",
    );
    matched(&c, "gpu0", "name", "NVIDIA H200", "NVIDIA H200", "");
    let r = c.row("gpu0", "nvlinks").unwrap();
    assert!(
        matches!(&r.outcome, Outcome::NotComparable(why) if why.contains("nvlink -s")),
        "{r:?}"
    );
}

#[test]
fn a_disagreeing_agent_shows_as_exactly_those_mismatches() {
    let stem = "v12-550-h100x4";
    let scenario = read(&format!("{stem}.scenario.toml"))
        // gpu1 loses its uncorrected ECC error...
        .replace(
            "ecc_volatile_uncorrected = 1\n",
            "ecc_volatile_uncorrected = 0\n",
        )
        // ...gpu3's link 5 comes back...
        .replace("{ active = false }", "{}")
        // ...and gpu2 stops throttling for power.
        .replace(
            "throttle_reasons_mask = 0x88",
            "throttle_reasons_mask = 0x8",
        );
    let c = compare_sample(stem, &scenario, 4, true);
    let bad: Vec<(&str, &str)> = c
        .mismatches()
        .map(|r| (r.gpu.as_str(), r.field.as_str()))
        .collect();
    assert_eq!(
        bad,
        [
            ("gpu1", "ecc_volatile_uncorrected"),
            ("gpu2", "throttle_reasons"),
            ("gpu3", "nvlinks"),
        ]
    );
    let t = c.row("gpu2", "throttle_reasons").unwrap();
    assert_eq!(
        t.outcome,
        Outcome::Mismatch("only ours: [], only nvidia-smi's: [hw_power_brake_slowdown]".into())
    );
}

#[test]
fn missing_and_extra_gpus_are_mismatches() {
    let stem = "v12-550-h100x4";
    // The agent sees only the first two GPUs of the four.
    let scenario = read(&format!("{stem}.scenario.toml"));
    let cut = scenario
        .match_indices("[[gpu]]")
        .nth(2)
        .map(|(i, _)| i)
        .unwrap();
    let c = compare_sample(stem, &scenario[..cut], 4, true);
    let bad: Vec<(&str, &str)> = c
        .mismatches()
        .map(|r| (r.gpu.as_str(), r.field.as_str()))
        .collect();
    assert_eq!(
        bad,
        [
            ("host", "gpus_found"),
            ("00000000:3A:00.0", "gpu"),
            ("00000000:5D:00.0", "gpu")
        ]
    );
}

#[test]
fn the_cli_prints_the_table_writes_markdown_and_exits_by_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let stem = "v12-550-h100x4";
    let good = read(&format!("{stem}.scenario.toml"));
    let bad = good.replace(
        "remapped_rows_pending = true",
        "remapped_rows_pending = false",
    );
    for (scenario, want_code) in [(good, 0), (bad, 1)] {
        let health = dir.path().join("health.json");
        let json = agent_report(&scenario, 4);
        std::fs::write(&health, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        let md = dir.path().join("comparison.md");
        let out = Command::new(env!("CARGO_BIN_EXE_ringfence-gpu-check"))
            .args(["compare", "--health"])
            .arg(&health)
            .arg("--smi")
            .arg(sample(&format!("{stem}.xml")))
            .arg("--nvlink-status")
            .arg(sample(&format!("{stem}.nvlink.txt")))
            .arg("--markdown")
            .arg(&md)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(want_code), "{stdout}");
        assert!(stdout.starts_with("gpu "), "{stdout}");
        let line = stdout
            .lines()
            .find(|l| l.starts_with("gpu1") && l.contains("remapped_rows_pending"))
            .unwrap();
        assert_eq!(line.contains("MISMATCH"), want_code == 1, "{line}");
        let markdown = std::fs::read_to_string(&md).unwrap();
        assert!(markdown.starts_with("| gpu | field | ours | nvidia-smi | result |"));
        assert!(markdown.contains("| gpu3 | nvlinks | 18 links, inactive: [5] |"));
    }
    // Bad input: exit 2, naming the file.
    let out = Command::new(env!("CARGO_BIN_EXE_ringfence-gpu-check"))
        .args(["compare", "--health"])
        .arg(sample(&format!("{stem}.xml")))
        .arg("--smi")
        .arg(sample(&format!("{stem}.xml")))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not JSON"));
}
