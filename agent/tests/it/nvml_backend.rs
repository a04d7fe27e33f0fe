//! The real NvmlBackend (nvml-wrapper) against the fake libnvidia-ml.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::nvml_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence::pb::{self, Verdict};
use ringfence::time::SystemClock;
use ringfenced::gpu::nvml::NvmlBackend;
use ringfenced::gpu::{GpuBackend, Snapshot};
use ringfenced::health::{Collector, HealthConfig, ReportContext, evaluate};

use nvml_common::{gpus, install};

fn backend(dir: &tempfile::TempDir, scenario: &str) -> NvmlBackend {
    NvmlBackend::new(Some(install(dir.path(), scenario)))
}

fn judge(snap: &Snapshot, expected: u32) -> (Verdict, Vec<pb::Reason>) {
    evaluate(
        snap,
        &pb::HostFacts::default(),
        &HealthConfig::default(),
        expected,
        &[],
        "boot-1",
    )
}

#[test]
fn healthy_host_reports_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = format!(
        "{}[[gpu.processes]]\npid = 4242\nused_memory_bytes = 1048576\n[[gpu.nvlinks]]\n[[gpu.nvlinks]]\nreplay_errors = 3\n{}",
        gpus(1),
        gpus(7)
    );
    let snap = backend(&dir, &scenario).collect();
    assert!(snap.nvml_available, "{:?}", snap.error);
    assert_eq!(snap.error, None);
    assert_eq!(snap.driver_version, "550.54.15");
    assert_eq!(snap.cuda_driver_version, "12.4");
    assert_eq!(snap.gpus.len(), 8);
    let g = &snap.gpus[0];
    assert_eq!(g.index, 0);
    assert_eq!(g.uuid, "GPU-fa4e0000-0000-0000-0000-000000000000");
    assert_eq!(g.name, "NVIDIA H100 80GB HBM3");
    assert_eq!(g.serial, "1652000000000");
    assert_eq!(g.pci_bus_id, "00000000:18:00.0");
    assert_eq!(snap.gpus[1].pci_bus_id, "00000000:28:00.0");
    assert_eq!(g.ecc_volatile_uncorrected, Some(0));
    assert_eq!(g.ecc_aggregate_corrected, Some(0));
    assert_eq!(g.retired_pages_single_bit, Some(0));
    assert_eq!(g.retired_pages_pending, Some(false));
    assert_eq!(g.remapped_rows_pending, Some(false));
    assert_eq!(g.remapped_rows_failure, Some(false));
    assert_eq!(g.temperature_c, Some(41));
    assert_eq!(g.temperature_slowdown_c, Some(87));
    assert_eq!(g.temperature_shutdown_c, Some(92));
    assert_eq!(g.throttle_reasons_mask, Some(0));
    assert_eq!(g.power_usage_mw, Some(72_000));
    assert_eq!(g.power_limit_mw, Some(700_000));
    assert_eq!(g.pcie_link_gen_current, Some(5));
    assert_eq!(g.pcie_link_width_max, Some(16));
    assert_eq!(g.pcie_replay_counter, Some(0));
    assert_eq!(g.nvlinks.len(), 2);
    assert!(g.nvlinks[1].active);
    assert_eq!(g.nvlinks[1].replay_errors, Some(3));
    assert_eq!(
        g.processes,
        vec![pb::GpuProcess {
            pid: 4242,
            used_memory_bytes: 1_048_576
        }]
    );
    assert!(g.unsupported.is_empty(), "{:?}", g.unsupported);
    // GPUs without NVLink say NotSupported for it, like PCIe-only cards.
    assert_eq!(snap.gpus[1].unsupported, vec!["nvlinks".to_owned()]);
    let (verdict, reasons) = judge(&snap, 8);
    assert_eq!(verdict, Verdict::Healthy, "{reasons:?}");
    assert!(reasons.is_empty());
}

/// One row per failure class: scenario keys for GPU 3, reason code, verdict.
const CLASSES: &[(&str, &str, Verdict)] = &[
    (
        "ecc_volatile_uncorrected = 1",
        "ecc_uncorrected_volatile",
        Verdict::Unhealthy,
    ),
    (
        "retired_pages_pending = true",
        "retired_pages_pending",
        Verdict::Unhealthy,
    ),
    (
        "retired_pages_double_bit = 60",
        "retired_pages_limit",
        Verdict::Unhealthy,
    ),
    (
        "retired_pages_single_bit = 2",
        "retired_pages",
        Verdict::Degraded,
    ),
    (
        "remapped_rows_pending = true",
        "row_remap_pending",
        Verdict::Unhealthy,
    ),
    (
        "remapped_rows_failure = true",
        "row_remap_failure",
        Verdict::Unhealthy,
    ),
    (
        "throttle_reasons_mask = 0x48",
        "hw_thermal_slowdown",
        Verdict::Unhealthy,
    ),
    (
        "throttle_reasons_mask = 0x88",
        "hw_power_brake",
        Verdict::Unhealthy,
    ),
    (
        "temperature_c = 83",
        "temperature_near_slowdown",
        Verdict::Unhealthy,
    ),
    (
        "pcie_link_gen_current = 4",
        "pcie_link_degraded",
        Verdict::Degraded,
    ),
    (
        "pcie_link_width_current = 8",
        "pcie_link_degraded",
        Verdict::Degraded,
    ),
    (
        "pcie_replay_counter = 101",
        "pcie_replay_high",
        Verdict::Degraded,
    ),
    (
        "nvlinks = [{ active = false }]",
        "nvlink_inactive",
        Verdict::Degraded,
    ),
    (
        "nvlinks = [{ crc_flit_errors = 150 }]",
        "nvlink_errors_high",
        Verdict::Degraded,
    ),
];

#[test]
fn each_failure_class_gives_its_verdict_code_and_gpu() {
    for (keys, code, verdict) in CLASSES {
        let dir = tempfile::tempdir().unwrap();
        let scenario = format!("{}[[gpu]]\n{keys}\n{}", gpus(3), gpus(4));
        let snap = backend(&dir, &scenario).collect();
        assert!(snap.nvml_available, "{keys}: {:?}", snap.error);
        let (got, reasons) = judge(&snap, 8);
        assert_eq!(got, *verdict, "{keys}: {reasons:?}");
        assert_eq!(reasons.len(), 1, "{keys}: {reasons:?}");
        let r = &reasons[0];
        assert_eq!(r.code, *code, "{keys}");
        assert_eq!(r.gpu_index, 3, "{keys}");
        assert_eq!(r.gpu_uuid, snap.gpus[3].uuid, "{keys}");
        assert!(
            r.fault_id.starts_with(&format!("{code}/{}/", r.gpu_uuid)),
            "{}",
            r.fault_id
        );
    }
}

#[test]
fn missing_gpu_is_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let snap = backend(&dir, &gpus(7)).collect();
    assert_eq!(snap.gpus.len(), 7);
    let (verdict, reasons) = judge(&snap, 8);
    assert_eq!(verdict, Verdict::Unhealthy);
    assert_eq!(reasons.len(), 1);
    assert_eq!(reasons[0].code, "gpu_missing");
    assert_eq!(reasons[0].gpu_index, -1);
    assert_eq!(reasons[0].observed, "7");
    assert_eq!(reasons[0].threshold, "8");
}

#[test]
fn unsupported_fields_are_recorded_not_failures() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = format!(
        "[[gpu]]\nunsupported = [\"remapped_rows_pending\", \"temperature_slowdown_c\", \"processes\", \"serial\", \"ecc_volatile_uncorrected\", \"pcie_replay_counter\"]\n{}",
        gpus(7)
    );
    let snap = backend(&dir, &scenario).collect();
    assert!(snap.nvml_available);
    assert_eq!(snap.error, None, "NotSupported must not count as an error");
    let g = &snap.gpus[0];
    for field in [
        "remapped_rows_pending",
        "remapped_rows_failure",
        "temperature_slowdown_c",
        "processes",
        "serial",
        "ecc_volatile_uncorrected",
        "pcie_replay_counter",
        "nvlinks",
    ] {
        assert!(
            g.unsupported.iter().any(|u| u == field),
            "{field} in {:?}",
            g.unsupported
        );
    }
    assert_eq!(g.remapped_rows_pending, None);
    assert_eq!(g.temperature_slowdown_c, None);
    assert_eq!(g.ecc_volatile_uncorrected, None);
    assert_eq!(g.pcie_replay_counter, None);
    assert_eq!(g.serial, "");
    assert_eq!(g.temperature_c, Some(41), "supported fields still read");
    let (verdict, reasons) = judge(&snap, 8);
    assert_eq!(verdict, Verdict::Healthy, "{reasons:?}");
}

#[test]
fn patch_changes_driver_version_and_activates_its_faults() {
    let dir = tempfile::tempdir().unwrap();
    let version_file = dir.path().join("driver-version");
    std::fs::write(&version_file, "550.54.15\n").unwrap();
    let scenario = format!(
        "driver_version_file = {:?}\n{}\n[[when_driver]]\nversion = \"560.35.03\"\ngpu = 0\necc_volatile_uncorrected = 2\n",
        version_file,
        gpus(8)
    );
    let b = backend(&dir, &scenario);
    let before = b.collect();
    assert_eq!(before.driver_version, "550.54.15");
    assert_eq!(judge(&before, 8).0, Verdict::Healthy);

    std::fs::write(&version_file, "560.35.03\n").unwrap();
    let after = b.collect();
    assert_eq!(after.driver_version, "560.35.03");
    assert_eq!(after.gpus[0].ecc_volatile_uncorrected, Some(2));
    assert_eq!(after.gpus[1].ecc_volatile_uncorrected, Some(0));
    let (verdict, reasons) = judge(&after, 8);
    assert_eq!(verdict, Verdict::Unhealthy);
    assert_eq!(reasons[0].code, "ecc_uncorrected_volatile");
    assert_eq!(reasons[0].gpu_index, 0);
    assert_eq!(reasons[0].observed, "2");
}

#[test]
fn processes_with_exit_after_disappear() {
    let dir = tempfile::tempdir().unwrap();
    let scenario = format!(
        "[[gpu]]\nprocesses = [{{ pid = 10, exit_after_s = 1.0 }}, {{ pid = 11 }}]\n{}",
        gpus(7)
    );
    let b = backend(&dir, &scenario);
    let start = Instant::now();
    let first = b.collect();
    let pids: Vec<u32> = first.gpus[0].processes.iter().map(|p| p.pid).collect();
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "collect too slow for this test"
    );
    assert_eq!(pids, vec![10, 11]);
    std::thread::sleep(Duration::from_millis(1300));
    let later = b.collect();
    let pids: Vec<u32> = later.gpus[0].processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, vec![11]);
}

#[test]
fn missing_or_broken_library_is_nvml_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"not an ELF file").unwrap();
    let failing = tempfile::tempdir().unwrap();
    let failing_lib = install(failing.path(), "nvml_init_fails = true\n[[gpu]]\n");
    for lib in [
        dir.path().join("absent/libnvidia-ml.so.1"),
        garbage,
        failing_lib,
    ] {
        let snap = NvmlBackend::new(Some(lib.clone())).collect();
        assert!(!snap.nvml_available, "{}", lib.display());
        assert!(snap.error.is_some());
        let (verdict, reasons) = judge(&snap, 8);
        assert_eq!(verdict, Verdict::Unhealthy);
        assert_eq!(reasons[0].code, "nvml_unavailable", "{}", lib.display());
        assert_eq!(reasons[0].gpu_index, -1);
    }
}

fn ctx() -> ReportContext {
    ReportContext {
        host_id: "gpu-host-01".into(),
        agent_version: "0.1.0".into(),
        draining: false,
        acknowledged: vec![],
    }
}

fn wait_for_verdict(c: &Collector, want: Verdict) -> pb::HealthReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = c.collect(&ctx());
        if report.verdict == want as i32 || Instant::now() > deadline {
            return report;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn xid_79_while_running_flips_the_verdict_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("xid79");
    let boot = dir.path().join("boot_id");
    std::fs::write(&boot, "boot-1\n").unwrap();
    let scenario = format!(
        "{}\n[[xid]]\ngpu = 2\nxid = 79\ntrigger_file = {:?}\n",
        gpus(8),
        trigger
    );
    let lib = install(dir.path(), &scenario);
    let backend = Arc::new(NvmlBackend::new(Some(lib)));
    let c = Collector::start(
        backend.clone(),
        HealthConfig::default(),
        8,
        state.path(),
        &boot,
        Arc::new(SystemClock),
    )
    .unwrap();
    let report = c.collect(&ctx());
    assert_eq!(
        report.verdict,
        Verdict::Healthy as i32,
        "{:?}",
        report.reasons
    );
    assert_eq!(report.backend, "nvml");
    assert_eq!(report.boot_id, "boot-1");
    assert_eq!(report.gpus_found, 8);
    assert_eq!(report.host_id, "gpu-host-01");
    assert!(
        report
            .host
            .as_ref()
            .is_some_and(|h| h.memory_total_bytes > 0)
    );

    std::fs::write(&trigger, "").unwrap();
    let report = wait_for_verdict(&c, Verdict::Unhealthy);
    assert_eq!(
        report.verdict,
        Verdict::Unhealthy as i32,
        "XID 79 never arrived"
    );
    let r = &report.reasons[0];
    assert_eq!(r.code, "xid_critical");
    assert_eq!(r.gpu_index, 2);
    assert_eq!(report.gpus[2].xids.len(), 1);
    assert_eq!(report.gpus[2].xids[0].xid, 79);
    let fault = r.fault_id.clone();

    // The operator acknowledges it: it no longer counts.
    let acked = c.collect(&ReportContext {
        acknowledged: vec![fault],
        ..ctx()
    });
    assert_eq!(
        acked.verdict,
        Verdict::Healthy as i32,
        "{:?}",
        acked.reasons
    );
    drop(c);

    // An agent restart in the same boot remembers it (the trigger is gone).
    std::fs::remove_file(&trigger).unwrap();
    let c = Collector::start(
        backend.clone(),
        HealthConfig::default(),
        8,
        state.path(),
        &boot,
        Arc::new(SystemClock),
    )
    .unwrap();
    let report = c.collect(&ctx());
    assert_eq!(report.verdict, Verdict::Unhealthy as i32);
    assert_eq!(report.reasons[0].code, "xid_critical");
    drop(c);

    // A reboot (new boot id) clears it.
    std::fs::write(&boot, "boot-2\n").unwrap();
    let c = Collector::start(
        backend,
        HealthConfig::default(),
        8,
        state.path(),
        &boot,
        Arc::new(SystemClock),
    )
    .unwrap();
    let report = c.collect(&ctx());
    assert_eq!(
        report.verdict,
        Verdict::Healthy as i32,
        "{:?}",
        report.reasons
    );
}

#[test]
fn nvml_that_appears_later_is_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    let b = NvmlBackend::new(Some(lib.clone()));
    let before = b.collect();
    assert!(!before.nvml_available);
    assert!(
        before
            .error
            .as_deref()
            .unwrap_or("")
            .contains("libnvidia-ml.so.1"),
        "error names the library: {:?}",
        before.error
    );
    let installed = install(dir.path(), &gpus(8));
    assert_eq!(installed, lib);
    let after = b.collect();
    assert!(after.nvml_available, "{:?}", after.error);
    assert_eq!(after.gpus.len(), 8);
    assert_eq!(judge(&after, 8).0, Verdict::Healthy);
}
