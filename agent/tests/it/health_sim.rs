//! The simulated backend, the shared scenario format, the XID log and host facts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::nvml_common;

use std::sync::mpsc::channel;
use std::time::Duration;

use ringfence::pb;
use ringfenced::gpu::nvml::NvmlBackend;
use ringfenced::gpu::sim::SimBackend;
use ringfenced::gpu::{GpuBackend, GpuConfig, XidHit, open};
use ringfenced::xidlog::XidLog;

const RICH: &str = r#"
cuda_driver_version = "12.8"
[[gpu]]
uuid = "GPU-aaaa"
name = "NVIDIA A100-SXM4-80GB"
ecc_volatile_corrected = 7
ecc_aggregate_uncorrected = 1
retired_pages_single_bit = 3
remapped_rows_correctable = 2
throttle_reasons_mask = 0x44
pcie_link_width_current = 8
pcie_replay_counter = 12
nvlinks = [{ active = true, replay_errors = 1, recovery_errors = 2, crc_flit_errors = 3 }, { active = false }]
processes = [{ pid = 77, used_memory_bytes = 123 }]
[[gpu]]
unsupported = ["remapped_rows_failure", "nvlinks", "power_usage_mw", "retired_pages_pending"]
"#;

#[test]
fn simulated_and_fake_nvml_agree_on_the_same_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let lib = nvml_common::install(dir.path(), RICH);
    let nvml = NvmlBackend::new(Some(lib)).collect();
    let sim = SimBackend::load(&dir.path().join("fake-nvml-scenario.toml"))
        .unwrap()
        .collect();
    assert!(nvml.nvml_available && sim.nvml_available);
    assert_eq!(nvml.error, None);
    let sorted = |mut g: pb::GpuReport| {
        g.unsupported.sort();
        g
    };
    let n: Vec<_> = nvml.gpus.into_iter().map(sorted).collect();
    let s: Vec<_> = sim.gpus.into_iter().map(sorted).collect();
    assert_eq!(n, s);
    assert_eq!(nvml.driver_version, sim.driver_version);
    assert_eq!(sim.cuda_driver_version, "12.8");
    assert_eq!(nvml.cuda_driver_version, "12.8");
    assert_eq!(
        s[0].throttle_reasons,
        ["sw_power_cap", "hw_thermal_slowdown"]
    );
    assert_eq!(s[0].nvlinks.len(), 2);
    assert_eq!(s[1].power_usage_mw, None);
}

#[test]
fn scenario_typos_are_rejected_even_in_when_driver() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    std::fs::write(&p, "[[gpu]]\necc_volatile_uncorected = 1\n").unwrap();
    let err = SimBackend::load(&p).unwrap_err().to_string();
    assert!(err.contains("ecc_volatile_uncorected"), "{err}");
    std::fs::write(
        &p,
        "[[gpu]]\n[[when_driver]]\nversion = \"1\"\ntemprature_c = 3\n",
    )
    .unwrap();
    let err = SimBackend::load(&p).unwrap_err().to_string();
    assert!(err.contains("temprature_c"), "{err}");
}

#[test]
fn simulated_driver_patch_missing_gpu_and_init_failure() {
    let dir = tempfile::tempdir().unwrap();
    let vf = dir.path().join("ver");
    let p = dir.path().join("s.toml");
    std::fs::write(
        &p,
        format!(
            "driver_version = \"550.1\"\ndriver_version_file = {vf:?}\n{}\n[[when_driver]]\nversion = \"560.2\"\nremapped_rows_pending = true\n",
            nvml_common::gpus(7)
        ),
    )
    .unwrap();
    let config = GpuConfig {
        backend: ringfenced::gpu::BackendKind::Simulated,
        scenario: Some(p.clone()),
        expected_gpus: 8,
        nvml_library: None,
        poll_interval_s: 1,
    };
    let b = open(&config).unwrap();
    assert_eq!(b.name(), "simulated");
    let s = b.collect();
    assert_eq!(
        s.driver_version, "550.1",
        "no version file yet: the key's value"
    );
    assert_eq!(s.gpus.len(), 7);
    std::fs::write(&vf, "560.2\n").unwrap();
    let s = b.collect();
    assert_eq!(s.driver_version, "560.2");
    assert!(
        s.gpus.iter().all(|g| g.remapped_rows_pending == Some(true)),
        "no gpu = every GPU"
    );

    std::fs::write(&p, "nvml_init_fails = true\n").unwrap();
    let s = SimBackend::load(&p).unwrap().collect();
    assert!(!s.nvml_available);
    assert!(s.error.is_some());
}

#[test]
fn simulated_xid_at_time_is_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    std::fs::write(
        &p,
        "[[gpu]]\n[[gpu]]\nuuid = \"GPU-b\"\n[[xid]]\ngpu = 1\nxid = 48\nat_s = 0.2\n",
    )
    .unwrap();
    let b = SimBackend::load(&p).unwrap();
    let (tx, rx) = channel();
    let watch = b.watch_xids(tx).unwrap();
    let hit = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        hit,
        XidHit {
            gpu_index: 1,
            gpu_uuid: "GPU-b".into(),
            xid: 48
        }
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "delivered twice"
    );
    drop(watch);
}

#[test]
fn xid_log_persists_within_a_boot_and_forgets_across_boots() {
    let dir = tempfile::tempdir().unwrap();
    let hit = XidHit {
        gpu_index: 3,
        gpu_uuid: "GPU-3".into(),
        xid: 79,
    };
    let mut log = XidLog::open(dir.path(), "boot-a").unwrap();
    log.record(&hit, 1000).unwrap();
    assert!(!dir.path().join("xid-events.json.tmp").exists());
    let again = XidLog::open(dir.path(), "boot-a").unwrap();
    assert_eq!(again.events().len(), 1);
    let events = again.for_gpu(3, "GPU-3");
    assert_eq!(
        events,
        vec![pb::XidEvent {
            xid: 79,
            at_unix_ms: 1000,
            boot_id: "boot-a".into()
        }]
    );
    assert!(again.for_gpu(4, "GPU-4").is_empty());
    let rebooted = XidLog::open(dir.path(), "boot-b").unwrap();
    assert!(rebooted.events().is_empty());

    std::fs::write(dir.path().join("xid-events.json"), "{not json").unwrap();
    let recovered = XidLog::open(dir.path(), "boot-a").unwrap();
    assert!(recovered.events().is_empty());
    assert!(dir.path().join("xid-events.json.corrupt").exists());
}

#[test]
fn host_facts_read_boot_id_from_the_given_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("boot_id");
    std::fs::write(&p, "3f1c-boot\n").unwrap();
    let facts = ringfenced::hostfacts::collect(&p).unwrap();
    assert_eq!(facts.boot_id, "3f1c-boot");
    assert!(facts.memory_total_bytes > 0);
    assert!(facts.memory_available_bytes <= facts.memory_total_bytes);
    assert!(!facts.kernel_version.is_empty());
    let err = ringfenced::hostfacts::collect(&dir.path().join("nope")).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    std::fs::write(&p, "\n").unwrap();
    assert!(ringfenced::hostfacts::collect(&p).is_err());
}
