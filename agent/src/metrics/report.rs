//! GPU and host series from the last health report, built at each scrape.
//! Reading the report is a reference-count copy out of the [`HealthCell`];
//! nothing here touches NVML, so a scrape costs no GPU query.
//!
//! Per-GPU series carry `gpu` (the index) and `uuid`. A field the GPU does
//! not support (absent in the report) has no series.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Unit;
use ringfence::pb;
use tokio::sync::watch;

use super::HostLabels;
use crate::gpu::THROTTLE_REASON_NAMES;
use crate::healthcell::{HealthCell, verdict_name};

type Labels = Vec<(&'static str, String)>;

/// A sample: NVML's counts stay whole numbers; gauges are floats.
#[derive(Debug, Clone, Copy)]
enum Value {
    Count(u64),
    Real(f64),
}

/// One family's samples, written only when there is at least one.
struct Family {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    kind: MetricType,
    rows: Vec<(Labels, Value)>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, unit: Option<Unit>, kind: MetricType) -> Self {
        Self {
            name,
            help,
            unit,
            kind,
            rows: Vec::new(),
        }
    }

    fn gauge(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, None, MetricType::Gauge)
    }

    fn counter(name: &'static str, help: &'static str) -> Self {
        Self::new(name, help, None, MetricType::Counter)
    }

    fn with_unit(mut self, unit: Unit) -> Self {
        self.unit = Some(unit);
        self
    }

    fn push(&mut self, labels: Labels, value: f64) {
        self.rows.push((labels, Value::Real(value)));
    }

    fn push_opt(&mut self, labels: Labels, value: Option<f64>) {
        if let Some(v) = value {
            self.push(labels, v);
        }
    }

    fn count(&mut self, labels: Labels, value: Option<u64>) {
        if let Some(n) = value {
            self.rows.push((labels, Value::Count(n)));
        }
    }

    fn write(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut m =
            encoder.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.kind)?;
        if let [(labels, value)] = self.rows.as_slice()
            && labels.is_empty()
        {
            return encode_value(self.kind, *value, m);
        }
        for (labels, value) in &self.rows {
            encode_value(self.kind, *value, m.encode_family(labels)?)?;
        }
        Ok(())
    }
}

fn encode_value(
    kind: MetricType,
    value: Value,
    e: MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    match (kind, value) {
        (MetricType::Counter, Value::Count(n)) => ConstCounter::new(n).encode(e),
        (MetricType::Counter, Value::Real(v)) => ConstCounter::new(v).encode(e),
        (_, Value::Count(n)) => ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(e),
        (_, Value::Real(v)) => ConstGauge::new(v).encode(e),
    }
}

fn flag(b: Option<bool>) -> Option<f64> {
    b.map(|b| f64::from(u8::from(b)))
}

fn num(v: Option<u32>) -> Option<f64> {
    v.map(f64::from)
}

/// Series of the agent's last health report and drain mark.
#[derive(Debug)]
pub(super) struct ReportCollector {
    host: HostLabels,
    health: Arc<HealthCell>,
    draining: watch::Receiver<bool>,
}

impl ReportCollector {
    pub(super) fn new(
        host: HostLabels,
        health: Arc<HealthCell>,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Self {
            host,
            health,
            draining,
        }
    }
}

impl Collector for ReportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let report = self.health.last();
        let draining = *self.draining.borrow();
        info_series(&mut encoder, &self.host, &report)?;
        for family in host_families(&report, draining)
            .into_iter()
            .chain(gpu_families(&report))
        {
            family.write(&mut encoder)?;
        }
        Ok(())
    }
}

fn info_series(
    encoder: &mut DescriptorEncoder<'_>,
    host: &HostLabels,
    r: &pb::HealthReport,
) -> Result<(), std::fmt::Error> {
    let m = encoder.encode_descriptor(
        "ringfence_build",
        "The agent's version and the NVIDIA driver and CUDA versions NVML reports.",
        None,
        MetricType::Info,
    )?;
    Info::new(vec![
        ("version", ringfence::VERSION.to_owned()),
        ("driver_version", r.driver_version.clone()),
        ("cuda_driver_version", r.cuda_driver_version.clone()),
    ])
    .encode(m)?;
    let m = encoder.encode_descriptor(
        "ringfence_host",
        "This agent's host id, ring (empty when not configured) and GPU backend.",
        None,
        MetricType::Info,
    )?;
    Info::new(vec![
        ("host_id", host.host_id.clone()),
        ("ring", host.ring.map(|r| r.to_string()).unwrap_or_default()),
        ("backend", r.backend.clone()),
    ])
    .encode(m)?;
    let mut m = encoder.encode_descriptor(
        "ringfence_gpu",
        "One series per GPU found: its name and PCI bus id.",
        None,
        MetricType::Info,
    )?;
    let none: Labels = Vec::new();
    for g in &r.gpus {
        let labels = with(
            with(gpu_labels(g), "name", &g.name),
            "pci_bus_id",
            &g.pci_bus_id,
        );
        Info::new(labels).encode(m.encode_family(&none)?)?;
    }
    Ok(())
}

fn host_families(r: &pb::HealthReport, draining: bool) -> Vec<Family> {
    let mut verdict = Family::gauge(
        "ringfence_host_verdict",
        "The host's health verdict: 1 for the current one, 0 for the others.",
    );
    for v in [
        pb::Verdict::Healthy,
        pb::Verdict::Degraded,
        pb::Verdict::Unhealthy,
        pb::Verdict::Unspecified,
    ] {
        let name = verdict_name(v as i32).to_ascii_lowercase();
        verdict.push(
            vec![("verdict", name)],
            f64::from(u8::from(r.verdict == v as i32)),
        );
    }
    let mut reasons = Family::gauge(
        "ringfence_host_reasons",
        "Reasons behind the verdict now, by code, the verdict each forces, and GPU (empty gpu and uuid: the host).",
    );
    let mut counted: BTreeMap<(String, String, String, String), u32> = BTreeMap::new();
    for x in &r.reasons {
        let gpu = if x.gpu_index < 0 {
            String::new()
        } else {
            x.gpu_index.to_string()
        };
        let severity = verdict_name(x.severity).to_ascii_lowercase();
        *counted
            .entry((x.code.clone(), severity, gpu, x.gpu_uuid.clone()))
            .or_insert(0) += 1;
    }
    for ((code, severity, gpu, uuid), n) in counted {
        reasons.push(
            vec![
                ("code", code),
                ("verdict", severity),
                ("gpu", gpu),
                ("uuid", uuid),
            ],
            f64::from(n),
        );
    }
    let single = |name, help, value: f64| {
        let mut f = Family::gauge(name, help);
        f.push(Vec::new(), value);
        f
    };
    vec![
        verdict,
        reasons,
        single(
            "ringfence_host_draining",
            "1 while the host is marked draining (out of service), else 0.",
            f64::from(u8::from(draining)),
        ),
        single(
            "ringfence_host_gpus_expected",
            "GPUs this host must have ([gpu] expected_gpus).",
            f64::from(r.gpus_expected),
        ),
        single(
            "ringfence_host_gpus_found",
            "GPUs NVML found.",
            f64::from(r.gpus_found),
        ),
        single(
            "ringfence_host_acknowledged_faults",
            "Faults an operator acknowledged; they no longer count in the verdict.",
            r.acknowledged_faults.len() as f64,
        ),
        single(
            "ringfence_health_report_timestamp_seconds",
            "When the health report these series come from was collected (Unix time).",
            r.collected_at_unix_ms as f64 / 1000.0,
        ),
    ]
}

fn gpu_labels(g: &pb::GpuReport) -> Labels {
    vec![("gpu", g.index.to_string()), ("uuid", g.uuid.clone())]
}

fn with(mut labels: Labels, key: &'static str, value: impl Into<String>) -> Labels {
    labels.push((key, value.into()));
    labels
}

#[allow(clippy::too_many_lines)] // one flat table of series
fn gpu_families(r: &pb::HealthReport) -> Vec<Family> {
    let mut ecc = Family::counter(
        "ringfence_gpu_ecc_errors",
        "ECC errors: scope volatile (since the last driver load) or aggregate (lifetime), kind corrected or uncorrected.",
    );
    let mut retired = Family::gauge(
        "ringfence_gpu_retired_pages",
        "Retired memory pages by cause (single_bit_ecc: multiple single-bit errors, double_bit_ecc).",
    );
    let mut retired_pending = Family::gauge(
        "ringfence_gpu_retired_pages_pending",
        "1 when a page retirement awaits a reboot.",
    );
    let mut remapped = Family::gauge(
        "ringfence_gpu_remapped_rows",
        "Remapped memory rows by kind (correctable, uncorrectable).",
    );
    let mut remap_pending = Family::gauge(
        "ringfence_gpu_remapped_rows_pending",
        "1 when a row remap awaits a GPU reset.",
    );
    let mut remap_failure = Family::gauge(
        "ringfence_gpu_remapped_rows_failure",
        "1 when a row remap failed.",
    );
    let mut temp =
        Family::gauge("ringfence_gpu_temperature", "GPU temperature.").with_unit(Unit::Celsius);
    let mut slowdown = Family::gauge(
        "ringfence_gpu_slowdown_temperature",
        "Temperature at which the GPU slows down (HW slowdown threshold).",
    )
    .with_unit(Unit::Celsius);
    let mut shutdown = Family::gauge(
        "ringfence_gpu_shutdown_temperature",
        "Temperature at which the GPU shuts down.",
    )
    .with_unit(Unit::Celsius);
    let mut throttle = Family::gauge(
        "ringfence_gpu_throttle_reason_active",
        "1 for each clock throttle (clocks event) reason active now, 0 for the others.",
    );
    let watts = || Unit::Other("watts".into());
    let mut power = Family::gauge("ringfence_gpu_power_usage", "Power draw.").with_unit(watts());
    let mut power_limit =
        Family::gauge("ringfence_gpu_power_limit", "Enforced power limit.").with_unit(watts());
    let mut pcie_gen = Family::gauge(
        "ringfence_gpu_pcie_link_generation",
        "Current PCIe link generation.",
    );
    let mut pcie_gen_max = Family::gauge(
        "ringfence_gpu_pcie_link_max_generation",
        "Maximum PCIe link generation of the GPU and system.",
    );
    let lanes = || Unit::Other("lanes".into());
    let mut pcie_width = Family::gauge("ringfence_gpu_pcie_link_width", "Current PCIe link width.")
        .with_unit(lanes());
    let mut pcie_width_max = Family::gauge(
        "ringfence_gpu_pcie_link_max_width",
        "Maximum PCIe link width.",
    )
    .with_unit(lanes());
    let mut pcie_replays = Family::counter(
        "ringfence_gpu_pcie_replays",
        "PCIe replays (NVML's replay counter).",
    );
    let mut nvlink = Family::gauge(
        "ringfence_gpu_nvlink_active",
        "1 for an active NVLink, 0 for an inactive one, per link.",
    );
    let mut nvlink_errors = Family::counter(
        "ringfence_gpu_nvlink_errors",
        "NVLink errors per link and counter (replay, recovery, crc_flit).",
    );
    let mut xids = Family::counter(
        "ringfence_gpu_xid_events",
        "XID events this boot, per XID code.",
    );
    let mut processes = Family::gauge(
        "ringfence_gpu_compute_processes",
        "Compute processes running on the GPU.",
    );
    for g in &r.gpus {
        let l = gpu_labels(g);
        for (scope, kind, v) in [
            ("volatile", "corrected", g.ecc_volatile_corrected),
            ("volatile", "uncorrected", g.ecc_volatile_uncorrected),
            ("aggregate", "corrected", g.ecc_aggregate_corrected),
            ("aggregate", "uncorrected", g.ecc_aggregate_uncorrected),
        ] {
            ecc.count(with(with(l.clone(), "scope", scope), "kind", kind), v);
        }
        retired.push_opt(
            with(l.clone(), "cause", "single_bit_ecc"),
            num(g.retired_pages_single_bit),
        );
        retired.push_opt(
            with(l.clone(), "cause", "double_bit_ecc"),
            num(g.retired_pages_double_bit),
        );
        retired_pending.push_opt(l.clone(), flag(g.retired_pages_pending));
        remapped.push_opt(
            with(l.clone(), "kind", "correctable"),
            num(g.remapped_rows_correctable),
        );
        remapped.push_opt(
            with(l.clone(), "kind", "uncorrectable"),
            num(g.remapped_rows_uncorrectable),
        );
        remap_pending.push_opt(l.clone(), flag(g.remapped_rows_pending));
        remap_failure.push_opt(l.clone(), flag(g.remapped_rows_failure));
        temp.push_opt(l.clone(), num(g.temperature_c));
        slowdown.push_opt(l.clone(), num(g.temperature_slowdown_c));
        shutdown.push_opt(l.clone(), num(g.temperature_shutdown_c));
        if let Some(mask) = g.throttle_reasons_mask {
            for (bit, name) in THROTTLE_REASON_NAMES {
                throttle.push(
                    with(l.clone(), "reason", *name),
                    f64::from(u8::from(mask & bit != 0)),
                );
            }
        }
        power.push_opt(l.clone(), g.power_usage_mw.map(|mw| f64::from(mw) / 1000.0));
        power_limit.push_opt(l.clone(), g.power_limit_mw.map(|mw| f64::from(mw) / 1000.0));
        pcie_gen.push_opt(l.clone(), num(g.pcie_link_gen_current));
        pcie_gen_max.push_opt(l.clone(), num(g.pcie_link_gen_max));
        pcie_width.push_opt(l.clone(), num(g.pcie_link_width_current));
        pcie_width_max.push_opt(l.clone(), num(g.pcie_link_width_max));
        pcie_replays.count(l.clone(), g.pcie_replay_counter);
        for link in &g.nvlinks {
            let ll = with(l.clone(), "link", link.link.to_string());
            nvlink.push(ll.clone(), f64::from(u8::from(link.active)));
            for (counter, v) in [
                ("replay", link.replay_errors),
                ("recovery", link.recovery_errors),
                ("crc_flit", link.crc_flit_errors),
            ] {
                nvlink_errors.count(with(ll.clone(), "counter", counter), v);
            }
        }
        let mut per_xid: BTreeMap<u64, u64> = BTreeMap::new();
        for x in g.xids.iter().filter(|x| x.boot_id == r.boot_id) {
            *per_xid.entry(x.xid).or_insert(0) += 1;
        }
        for (xid, n) in per_xid {
            xids.count(with(l.clone(), "xid", xid.to_string()), Some(n));
        }
        if !g.unsupported.iter().any(|u| u == "processes") {
            processes.push(l, g.processes.len() as f64);
        }
    }
    vec![
        ecc,
        retired,
        retired_pending,
        remapped,
        remap_pending,
        remap_failure,
        temp,
        slowdown,
        shutdown,
        throttle,
        power,
        power_limit,
        pcie_gen,
        pcie_gen_max,
        pcie_width,
        pcie_width_max,
        pcie_replays,
        nvlink,
        nvlink_errors,
        xids,
        processes,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Format, Metrics};

    fn gpu(index: u32, uuid: &str) -> pb::GpuReport {
        pb::GpuReport {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H100".into(),
            pci_bus_id: format!("00000000:{:02x}:00.0", 0x18 + index),
            ecc_volatile_corrected: Some(4),
            ecc_volatile_uncorrected: Some(0),
            temperature_c: Some(41),
            temperature_slowdown_c: Some(87),
            throttle_reasons_mask: Some(0x44),
            power_usage_mw: Some(72_500),
            pcie_link_gen_current: Some(4),
            pcie_link_gen_max: Some(5),
            pcie_link_width_current: Some(16),
            pcie_link_width_max: Some(16),
            pcie_replay_counter: Some(u64::MAX - 1),
            ..Default::default()
        }
    }

    fn report() -> pb::HealthReport {
        let mut g0 = gpu(0, "GPU-a");
        g0.ecc_volatile_uncorrected = Some(2);
        g0.nvlinks = vec![pb::NvLink {
            link: 3,
            active: false,
            replay_errors: Some(7),
            ..Default::default()
        }];
        let xid = |xid, boot: &str| pb::XidEvent {
            xid,
            at_unix_ms: 1,
            boot_id: boot.into(),
        };
        g0.xids = vec![xid(79, "boot-1"), xid(79, "boot-1"), xid(13, "boot-0")];
        let mut g1 = gpu(1, "GPU-b");
        g1.temperature_c = None;
        g1.unsupported = vec!["temperature_c".into()];
        let reason = |code: &str, sev: pb::Verdict, gpu_index: i32, uuid: &str| pb::Reason {
            code: code.into(),
            severity: sev as i32,
            gpu_index,
            gpu_uuid: uuid.into(),
            ..Default::default()
        };
        pb::HealthReport {
            host_id: "gpu-0001".into(),
            boot_id: "boot-1".into(),
            collected_at_unix_ms: 1_700_000_000_500,
            driver_version: "550.54.15".into(),
            cuda_driver_version: "12.4".into(),
            gpus_expected: 8,
            gpus_found: 2,
            gpus: vec![g0, g1],
            verdict: pb::Verdict::Unhealthy as i32,
            reasons: vec![
                reason(
                    "ecc_uncorrected_volatile",
                    pb::Verdict::Unhealthy,
                    0,
                    "GPU-a",
                ),
                reason("gpu_missing", pb::Verdict::Unhealthy, -1, ""),
                reason("xid_critical", pb::Verdict::Unhealthy, 0, "GPU-a"),
                reason("xid_critical", pb::Verdict::Unhealthy, 0, "GPU-a"),
            ],
            backend: "nvml".into(),
            ..Default::default()
        }
    }

    fn metrics(r: pb::HealthReport, draining: bool) -> (Metrics, Arc<HealthCell>) {
        let cell = Arc::new(HealthCell::new(r));
        let (_tx, rx) = watch::channel(draining);
        let host = HostLabels {
            host_id: "gpu-0001".into(),
            ring: Some(2),
        };
        (Metrics::new(host, cell.clone(), rx), cell)
    }

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }

    #[test]
    fn report_fields_become_series() {
        let (m, _) = metrics(report(), true);
        let t = m.encode(Format::OpenMetrics).unwrap();
        let g0 = r#"gpu="0",uuid="GPU-a""#;
        has(
            &t,
            &format!(
                "ringfence_gpu_ecc_errors_total{{{g0},scope=\"volatile\",kind=\"uncorrected\"}} 2"
            ),
        );
        has(
            &t,
            &format!("ringfence_gpu_temperature_celsius{{{g0}}} 41.0"),
        );
        has(&t, &format!("ringfence_gpu_power_usage_watts{{{g0}}} 72.5"));
        has(
            &t,
            &format!(
                "ringfence_gpu_throttle_reason_active{{{g0},reason=\"hw_thermal_slowdown\"}} 1.0"
            ),
        );
        has(
            &t,
            &format!(
                "ringfence_gpu_throttle_reason_active{{{g0},reason=\"hw_power_brake_slowdown\"}} 0.0"
            ),
        );
        has(
            &t,
            &format!("ringfence_gpu_pcie_link_generation{{{g0}}} 4.0"),
        );
        has(
            &t,
            &format!("ringfence_gpu_pcie_link_max_width_lanes{{{g0}}} 16.0"),
        );
        // Counts stay exact integers.
        has(
            &t,
            &format!("ringfence_gpu_pcie_replays_total{{{g0}}} {}", u64::MAX - 1),
        );
        has(
            &t,
            &format!("ringfence_gpu_nvlink_active{{{g0},link=\"3\"}} 0.0"),
        );
        has(
            &t,
            &format!("ringfence_gpu_nvlink_errors_total{{{g0},link=\"3\",counter=\"replay\"}} 7"),
        );
        // XIDs of this boot only.
        has(
            &t,
            &format!("ringfence_gpu_xid_events_total{{{g0},xid=\"79\"}} 2"),
        );
        assert!(!t.contains("xid=\"13\""), "{t}");
        // An unsupported field has no series.
        assert!(
            !t.contains(r#"ringfence_gpu_temperature_celsius{gpu="1""#),
            "{t}"
        );
        has(
            &t,
            r#"ringfence_gpu_slowdown_temperature_celsius{gpu="1",uuid="GPU-b"} 87.0"#,
        );
        has(
            &t,
            r#"ringfence_gpu_info{gpu="1",uuid="GPU-b",name="NVIDIA H100",pci_bus_id="00000000:19:00.0"} 1"#,
        );
        has(&t, r#"ringfence_host_verdict{verdict="unhealthy"} 1.0"#);
        has(&t, r#"ringfence_host_verdict{verdict="healthy"} 0.0"#);
        has(
            &t,
            r#"ringfence_host_reasons{code="xid_critical",verdict="unhealthy",gpu="0",uuid="GPU-a"} 2.0"#,
        );
        has(
            &t,
            r#"ringfence_host_reasons{code="gpu_missing",verdict="unhealthy",gpu="",uuid=""} 1.0"#,
        );
        has(&t, "ringfence_host_draining 1.0");
        has(&t, "ringfence_host_gpus_found 2.0");
        has(&t, "ringfence_health_report_timestamp_seconds 1700000000.5");
        has(
            &t,
            &format!(
                "ringfence_build_info{{version=\"{}\",driver_version=\"550.54.15\",cuda_driver_version=\"12.4\"}} 1",
                ringfence::VERSION
            ),
        );
        has(
            &t,
            r#"ringfence_host_info{host_id="gpu-0001",ring="2",backend="nvml"} 1"#,
        );
    }

    /// A scrape reads the cell, never a report source: what it shows is
    /// exactly the last published report, and changes only when the poll
    /// loop publishes another.
    #[test]
    fn a_scrape_shows_the_last_published_report() {
        let (m, cell) = metrics(report(), false);
        let before = m.encode(Format::OpenMetrics).unwrap();
        assert_eq!(before, m.encode(Format::OpenMetrics).unwrap());
        has(&before, "ringfence_host_draining 0.0");
        let mut next = report();
        next.verdict = pb::Verdict::Healthy as i32;
        next.reasons.clear();
        next.gpus[0].temperature_c = Some(55);
        cell.publish(next);
        let after = m.encode(Format::OpenMetrics).unwrap();
        has(
            &after,
            r#"ringfence_gpu_temperature_celsius{gpu="0",uuid="GPU-a"} 55.0"#,
        );
        has(&after, r#"ringfence_host_verdict{verdict="healthy"} 1.0"#);
        assert!(!after.contains("ringfence_host_reasons{"), "{after}");
    }
}
