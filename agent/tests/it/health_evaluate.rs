//! Table tests of the pure verdict function.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ringfence::pb::{self, Verdict};
use ringfenced::gpu::Snapshot;
use ringfenced::health::{HealthConfig, evaluate};

fn gpu(index: u32) -> pb::GpuReport {
    pb::GpuReport {
        index,
        uuid: format!("GPU-{index}"),
        ecc_volatile_uncorrected: Some(0),
        retired_pages_single_bit: Some(0),
        retired_pages_double_bit: Some(0),
        retired_pages_pending: Some(false),
        remapped_rows_pending: Some(false),
        remapped_rows_failure: Some(false),
        temperature_c: Some(40),
        temperature_slowdown_c: Some(87),
        throttle_reasons_mask: Some(0),
        pcie_link_gen_current: Some(5),
        pcie_link_gen_max: Some(5),
        pcie_link_width_current: Some(16),
        pcie_link_width_max: Some(16),
        pcie_replay_counter: Some(0),
        ..Default::default()
    }
}

fn healthy(n: u32) -> Snapshot {
    Snapshot {
        nvml_available: true,
        error: None,
        driver_version: "550.54.15".into(),
        cuda_driver_version: "12.4".into(),
        gpus: (0..n).map(gpu).collect(),
    }
}

fn xid(code: u64, boot: &str) -> pb::XidEvent {
    pb::XidEvent {
        xid: code,
        at_unix_ms: 1,
        boot_id: boot.into(),
    }
}

type Edit = fn(&mut Snapshot);

/// (name, edit of a healthy 2-GPU snapshot, verdict, codes in order)
const CASES: &[(&str, Edit, Verdict, &[&str])] = &[
    ("healthy", |_| {}, Verdict::Healthy, &[]),
    (
        "nvml down",
        |s| {
            s.nvml_available = false;
            s.error = Some("Driver Not Loaded".into());
            s.gpus.clear();
        },
        Verdict::Unhealthy,
        &["nvml_unavailable", "gpu_missing"],
    ),
    (
        "query error",
        |s| s.error = Some("gpu 1: uuid: GPU is lost".into()),
        Verdict::Degraded,
        &["nvml_query_failed"],
    ),
    (
        "gpu missing",
        |s| {
            s.gpus.pop();
        },
        Verdict::Unhealthy,
        &["gpu_missing"],
    ),
    (
        "ecc",
        |s| s.gpus[1].ecc_volatile_uncorrected = Some(1),
        Verdict::Unhealthy,
        &["ecc_uncorrected_volatile"],
    ),
    (
        "ecc corrected only",
        |s| s.gpus[1].ecc_volatile_corrected = Some(500),
        Verdict::Healthy,
        &[],
    ),
    (
        "page pending",
        |s| s.gpus[0].retired_pages_pending = Some(true),
        Verdict::Unhealthy,
        &["retired_pages_pending"],
    ),
    (
        "pages below limit",
        |s| s.gpus[0].retired_pages_single_bit = Some(59),
        Verdict::Degraded,
        &["retired_pages"],
    ),
    (
        "pages at limit",
        |s| {
            s.gpus[0].retired_pages_single_bit = Some(30);
            s.gpus[0].retired_pages_double_bit = Some(30);
        },
        Verdict::Unhealthy,
        &["retired_pages_limit"],
    ),
    (
        "remap pending",
        |s| s.gpus[0].remapped_rows_pending = Some(true),
        Verdict::Unhealthy,
        &["row_remap_pending"],
    ),
    (
        "remap failure",
        |s| s.gpus[0].remapped_rows_failure = Some(true),
        Verdict::Unhealthy,
        &["row_remap_failure"],
    ),
    (
        "sw thermal only",
        |s| s.gpus[0].throttle_reasons_mask = Some(0x20),
        Verdict::Healthy,
        &[],
    ),
    (
        "hw thermal",
        |s| s.gpus[0].throttle_reasons_mask = Some(0x40),
        Verdict::Unhealthy,
        &["hw_thermal_slowdown"],
    ),
    (
        "power brake",
        |s| s.gpus[0].throttle_reasons_mask = Some(0x80),
        Verdict::Unhealthy,
        &["hw_power_brake"],
    ),
    (
        "temp just below margin",
        |s| s.gpus[0].temperature_c = Some(81),
        Verdict::Healthy,
        &[],
    ),
    (
        "temp at margin",
        |s| s.gpus[0].temperature_c = Some(82),
        Verdict::Unhealthy,
        &["temperature_near_slowdown"],
    ),
    (
        "temp unknown slowdown",
        |s| {
            s.gpus[0].temperature_c = Some(99);
            s.gpus[0].temperature_slowdown_c = None;
        },
        Verdict::Healthy,
        &[],
    ),
    (
        "pcie gen",
        |s| s.gpus[0].pcie_link_gen_current = Some(3),
        Verdict::Degraded,
        &["pcie_link_degraded"],
    ),
    (
        "pcie replay at threshold",
        |s| s.gpus[0].pcie_replay_counter = Some(100),
        Verdict::Healthy,
        &[],
    ),
    (
        "pcie replay over",
        |s| s.gpus[0].pcie_replay_counter = Some(101),
        Verdict::Degraded,
        &["pcie_replay_high"],
    ),
    (
        "nvlink errors",
        |s| {
            s.gpus[0].nvlinks = vec![pb::NvLink {
                link: 4,
                active: true,
                replay_errors: Some(50),
                recovery_errors: Some(1),
                crc_flit_errors: Some(50),
            }]
        },
        Verdict::Degraded,
        &["nvlink_errors_high"],
    ),
    (
        "nvlink down",
        |s| {
            s.gpus[0].nvlinks = vec![pb::NvLink {
                link: 0,
                active: false,
                ..Default::default()
            }]
        },
        Verdict::Degraded,
        &["nvlink_inactive"],
    ),
    (
        "critical xid",
        |s| s.gpus[1].xids = vec![xid(79, "boot-1")],
        Verdict::Unhealthy,
        &["xid_critical"],
    ),
    (
        "critical xid twice counts once",
        |s| s.gpus[1].xids = vec![xid(48, "boot-1"), xid(48, "boot-1")],
        Verdict::Unhealthy,
        &["xid_critical"],
    ),
    (
        "critical xid of earlier boot",
        |s| s.gpus[1].xids = vec![xid(79, "boot-0")],
        Verdict::Healthy,
        &[],
    ),
    (
        "application xid",
        |s| s.gpus[1].xids = vec![xid(13, "boot-1")],
        Verdict::Degraded,
        &["xid_application"],
    ),
    (
        "xid 94 is application",
        |s| s.gpus[1].xids = vec![xid(94, "boot-1")],
        Verdict::Degraded,
        &["xid_application"],
    ),
    (
        "unlisted xid",
        |s| s.gpus[1].xids = vec![xid(62, "boot-1")],
        Verdict::Degraded,
        &["xid_other"],
    ),
    (
        "worst wins",
        |s| {
            s.gpus[0].pcie_link_width_current = Some(8);
            s.gpus[1].remapped_rows_failure = Some(true);
        },
        Verdict::Unhealthy,
        &["pcie_link_degraded", "row_remap_failure"],
    ),
    (
        "unsupported fields do not fail",
        |s| {
            let g = &mut s.gpus[0];
            g.ecc_volatile_uncorrected = None;
            g.remapped_rows_pending = None;
            g.pcie_link_gen_max = None;
            g.unsupported = vec!["ecc_volatile_uncorrected".into()];
        },
        Verdict::Healthy,
        &[],
    ),
];

#[test]
fn verdict_table() {
    let config = HealthConfig::default();
    for (name, edit, verdict, codes) in CASES {
        let mut snap = healthy(2);
        edit(&mut snap);
        let (got, reasons) = evaluate(&snap, &pb::HostFacts::default(), &config, 2, &[], "boot-1");
        let got_codes: Vec<&str> = reasons.iter().map(|r| r.code.as_str()).collect();
        assert_eq!(got, *verdict, "{name}: {reasons:?}");
        assert_eq!(got_codes, *codes, "{name}");
        for r in &reasons {
            let subject = if r.gpu_index < 0 {
                "host"
            } else {
                r.gpu_uuid.as_str()
            };
            assert!(
                r.fault_id.starts_with(&format!("{}/{subject}/", r.code)),
                "{name}: {}",
                r.fault_id
            );
            assert!(
                !r.message.is_empty() && !r.observed.is_empty() && !r.threshold.is_empty(),
                "{name}: {r:?}"
            );
            assert!(r.severity != Verdict::Unspecified as i32, "{name}");
        }
    }
}

#[test]
fn reasons_name_gpu_observed_and_threshold() {
    let mut snap = healthy(4);
    snap.gpus[2].temperature_c = Some(85);
    let (_, reasons) = evaluate(
        &snap,
        &pb::HostFacts::default(),
        &HealthConfig::default(),
        4,
        &[],
        "b",
    );
    assert_eq!(reasons.len(), 1);
    let r = &reasons[0];
    assert_eq!(r.gpu_index, 2);
    assert_eq!(r.gpu_uuid, "GPU-2");
    assert_eq!(r.observed, "85 C");
    assert_eq!(r.threshold, "82 C");
    assert_eq!(r.severity, Verdict::Unhealthy as i32);
    assert_eq!(r.fault_id, "temperature_near_slowdown/GPU-2/temperature");
}

#[test]
fn acknowledged_faults_do_not_count_but_others_do() {
    let mut snap = healthy(2);
    snap.gpus[0].xids = vec![xid(79, "b")];
    snap.gpus[1].xids = vec![xid(79, "b")];
    let cfg = HealthConfig::default();
    let (v, reasons) = evaluate(&snap, &pb::HostFacts::default(), &cfg, 2, &[], "b");
    assert_eq!(v, Verdict::Unhealthy);
    assert_eq!(reasons[0].fault_id, "xid_critical/GPU-0/79");
    let ack = vec!["xid_critical/GPU-0/79".to_owned()];
    let (v, reasons) = evaluate(&snap, &pb::HostFacts::default(), &cfg, 2, &ack, "b");
    assert_eq!(v, Verdict::Unhealthy, "GPU 1's XID still counts");
    assert_eq!(reasons.len(), 1);
    assert_eq!(reasons[0].gpu_index, 1);
    let ack = vec![
        "xid_critical/GPU-0/79".to_owned(),
        "xid_critical/GPU-1/79".to_owned(),
    ];
    let (v, reasons) = evaluate(&snap, &pb::HostFacts::default(), &cfg, 2, &ack, "b");
    assert_eq!(v, Verdict::Healthy);
    assert!(reasons.is_empty());
}

#[test]
fn thresholds_come_from_config() {
    let cfg: HealthConfig = toml::from_str(
        "critical_xids = [13]\napplication_xids = []\ntemperature_margin_c = 0\npcie_replay_threshold = 5\nretired_pages_limit = 2\n",
    )
    .unwrap();
    assert_eq!(
        cfg.nvlink_error_threshold,
        HealthConfig::default().nvlink_error_threshold
    );
    let mut snap = healthy(1);
    snap.gpus[0].xids = vec![xid(13, "b")];
    snap.gpus[0].temperature_c = Some(86);
    snap.gpus[0].pcie_replay_counter = Some(6);
    snap.gpus[0].retired_pages_single_bit = Some(2);
    let (v, reasons) = evaluate(&snap, &pb::HostFacts::default(), &cfg, 1, &[], "b");
    let codes: Vec<&str> = reasons.iter().map(|r| r.code.as_str()).collect();
    assert_eq!(v, Verdict::Unhealthy);
    assert_eq!(
        codes,
        ["retired_pages_limit", "pcie_replay_high", "xid_critical"]
    );
}

#[test]
fn config_rejects_unknown_keys_and_has_safe_defaults() {
    let err = toml::from_str::<HealthConfig>("temprature_margin_c = 3\n").unwrap_err();
    assert!(err.to_string().contains("temprature_margin_c"), "{err}");
    let d = HealthConfig::default();
    for x in [48, 64, 74, 79, 95, 119, 120, 140] {
        assert!(d.critical_xids.contains(&x), "{x}");
    }
    for x in [13, 31, 43, 45, 68, 94] {
        assert!(d.application_xids.contains(&x), "{x}");
    }
    let gpu: ringfenced::gpu::GpuConfig =
        toml::from_str("backend = \"simulated\"\nscenario = \"/s.toml\"\nexpected_gpus = 4\n")
            .unwrap();
    assert_eq!(gpu.backend, ringfenced::gpu::BackendKind::Simulated);
    assert_eq!(gpu.expected_gpus, 4);
    assert!(toml::from_str::<ringfenced::gpu::GpuConfig>("backend = \"cuda\"\n").is_err());
}
