//! The health verdict: a pure function from a GPU snapshot (plus host facts,
//! thresholds and acknowledged faults) to HEALTHY / DEGRADED / UNHEALTHY with
//! machine-readable reasons, and the `Collector` that feeds it.
//!
//! Reason codes are stable; a `fault_id` is `<code>/<gpu uuid or "host">/<detail>`.
//!
//! | code                        | severity  | when                                                        |
//! |-----------------------------|-----------|-------------------------------------------------------------|
//! | `nvml_unavailable`          | UNHEALTHY | NVML cannot be loaded or initialised                         |
//! | `gpu_missing`               | UNHEALTHY | fewer GPUs found than `[gpu] expected_gpus`                  |
//! | `ecc_uncorrected_volatile`  | UNHEALTHY | volatile uncorrected ECC errors > 0                          |
//! | `retired_pages_pending`     | UNHEALTHY | a page retirement awaits a reboot                            |
//! | `retired_pages_limit`       | UNHEALTHY | retired pages (single + double bit) ≥ `retired_pages_limit`  |
//! | `row_remap_pending`         | UNHEALTHY | a row remap awaits a GPU reset                               |
//! | `row_remap_failure`         | UNHEALTHY | a row remap failed                                          |
//! | `xid_critical`              | UNHEALTHY | an XID in `critical_xids` this boot                          |
//! | `hw_thermal_slowdown`       | UNHEALTHY | HW thermal slowdown throttle active (0x40)                   |
//! | `hw_power_brake`            | UNHEALTHY | HW power brake throttle active (0x80)                        |
//! | `temperature_near_slowdown` | UNHEALTHY | temperature ≥ slowdown threshold − `temperature_margin_c`   |
//! | `nvml_query_failed`         | DEGRADED  | an NVML query failed with an error other than NotSupported   |
//! | `retired_pages`             | DEGRADED  | 0 < retired pages < `retired_pages_limit`                    |
//! | `pcie_link_degraded`        | DEGRADED  | PCIe link generation or width below its maximum              |
//! | `pcie_replay_high`          | DEGRADED  | PCIe replay counter > `pcie_replay_threshold`                |
//! | `nvlink_inactive`           | DEGRADED  | an NVLink reported by the GPU is not active                  |
//! | `nvlink_errors_high`        | DEGRADED  | replay + recovery + CRC errors of a link > `nvlink_error_threshold` |
//! | `xid_application`           | DEGRADED  | an XID in `application_xids` this boot                       |
//! | `xid_other`                 | DEGRADED  | any other XID this boot                                      |

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ringfence::pb;
use ringfence::pb::Verdict;
use ringfence::time::Clock;
use serde::Deserialize;

use crate::gpu::{GpuBackend, GpuError, Snapshot, XidWatch};
use crate::hostfacts::{self, HostFactsError};
use crate::xidlog::{XidLog, XidLogError};

/// The `[health]` section of the agent config: rule thresholds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// XIDs NVIDIA answers with a GPU reset or node restart: UNHEALTHY.
    pub critical_xids: Vec<u64>,
    /// XIDs caused by applications: DEGRADED.
    pub application_xids: Vec<u64>,
    /// UNHEALTHY when the temperature is within this many degrees of slowdown.
    pub temperature_margin_c: u32,
    /// DEGRADED above this PCIe replay count.
    pub pcie_replay_threshold: u64,
    /// DEGRADED above this many errors (replay + recovery + CRC) on one NVLink.
    pub nvlink_error_threshold: u64,
    /// Retired pages at or above this are UNHEALTHY; fewer (but some) DEGRADED.
    pub retired_pages_limit: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            critical_xids: vec![48, 64, 74, 79, 95, 119, 120, 140],
            application_xids: vec![13, 31, 43, 45, 68, 94],
            temperature_margin_c: 5,
            pcie_replay_threshold: 100,
            nvlink_error_threshold: 100,
            retired_pages_limit: 60,
        }
    }
}

/// Health errors.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// "host facts: {0}"
    #[error("host facts: {0}")]
    HostFacts(#[from] HostFactsError),
    /// "XID log: {0}"
    #[error("XID log: {0}")]
    XidLog(#[from] XidLogError),
    /// "GPU backend: {0}"
    #[error("GPU backend: {0}")]
    Gpu(#[from] GpuError),
    /// "cannot start the XID recorder thread: {0}"
    #[error("cannot start the XID recorder thread: {0}")]
    Thread(std::io::Error),
}

fn worse(a: Verdict, b: Verdict) -> Verdict {
    if (b as i32) > (a as i32) { b } else { a }
}

struct Rules<'a> {
    reasons: Vec<pb::Reason>,
    acknowledged: &'a [String],
}

impl Rules<'_> {
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        code: &str,
        severity: Verdict,
        gpu: Option<&pb::GpuReport>,
        detail: &str,
        observed: String,
        threshold: String,
        message: String,
    ) {
        let subject = gpu.map_or("host", |g| g.uuid.as_str());
        let fault_id = format!("{code}/{subject}/{detail}");
        if self.acknowledged.contains(&fault_id) {
            return;
        }
        self.reasons.push(pb::Reason {
            code: code.to_owned(),
            severity: severity as i32,
            gpu_index: gpu.map_or(-1, |g| i32::try_from(g.index).unwrap_or(i32::MAX)),
            gpu_uuid: gpu.map(|g| g.uuid.clone()).unwrap_or_default(),
            observed,
            threshold,
            message,
            fault_id,
        });
    }
}

/// Applies the rules in the module table. XIDs are read from each GPU's
/// `xids`; those of another boot than `boot_id` are ignored. Reasons whose
/// `fault_id` is in `acknowledged` are dropped and do not count. `_host` is
/// taken so host-level rules can be added without changing callers; none
/// exists by default.
pub fn evaluate(
    snapshot: &Snapshot,
    _host: &pb::HostFacts,
    config: &HealthConfig,
    expected_gpus: u32,
    acknowledged: &[String],
    boot_id: &str,
) -> (Verdict, Vec<pb::Reason>) {
    use Verdict::{Degraded, Unhealthy};
    let mut r = Rules {
        reasons: Vec::new(),
        acknowledged,
    };
    if !snapshot.nvml_available {
        let why = snapshot
            .error
            .clone()
            .unwrap_or_else(|| "unknown".to_owned());
        r.add(
            "nvml_unavailable",
            Unhealthy,
            None,
            "init",
            why.clone(),
            "available".into(),
            format!("NVML is unavailable: {why}"),
        );
    } else if let Some(err) = &snapshot.error {
        r.add(
            "nvml_query_failed",
            Degraded,
            None,
            "query",
            err.clone(),
            "no errors".into(),
            format!("NVML queries failed: {err}"),
        );
    }
    let found = u32::try_from(snapshot.gpus.len()).unwrap_or(u32::MAX);
    if found < expected_gpus {
        r.add(
            "gpu_missing",
            Unhealthy,
            None,
            &format!("found{found}of{expected_gpus}"),
            found.to_string(),
            expected_gpus.to_string(),
            format!("{found} of {expected_gpus} expected GPUs found"),
        );
    }
    for g in &snapshot.gpus {
        let i = g.index;
        if let Some(n) = g.ecc_volatile_uncorrected.filter(|n| *n > 0) {
            r.add(
                "ecc_uncorrected_volatile",
                Unhealthy,
                Some(g),
                "volatile",
                n.to_string(),
                "0".into(),
                format!("GPU {i} has {n} uncorrected volatile ECC errors"),
            );
        }
        if g.retired_pages_pending == Some(true) {
            r.add(
                "retired_pages_pending",
                Unhealthy,
                Some(g),
                "pending",
                "true".into(),
                "false".into(),
                format!("GPU {i} has pages pending retirement (reboot needed)"),
            );
        }
        let retired = g
            .retired_pages_single_bit
            .unwrap_or(0)
            .saturating_add(g.retired_pages_double_bit.unwrap_or(0));
        if retired >= config.retired_pages_limit {
            r.add(
                "retired_pages_limit",
                Unhealthy,
                Some(g),
                "limit",
                format!("{retired} pages"),
                format!("{} pages", config.retired_pages_limit),
                format!("GPU {i} has {retired} retired pages, at or over the limit"),
            );
        } else if retired > 0 {
            r.add(
                "retired_pages",
                Degraded,
                Some(g),
                &retired.to_string(),
                format!("{retired} pages"),
                format!("{} pages", config.retired_pages_limit),
                format!("GPU {i} has {retired} retired pages"),
            );
        }
        if g.remapped_rows_pending == Some(true) {
            r.add(
                "row_remap_pending",
                Unhealthy,
                Some(g),
                "pending",
                "true".into(),
                "false".into(),
                format!("GPU {i} has a row remap pending (GPU reset needed)"),
            );
        }
        if g.remapped_rows_failure == Some(true) {
            r.add(
                "row_remap_failure",
                Unhealthy,
                Some(g),
                "failure",
                "true".into(),
                "false".into(),
                format!("GPU {i} had a row remap failure"),
            );
        }
        let mask = g.throttle_reasons_mask.unwrap_or(0);
        if mask & 0x40 != 0 {
            r.add(
                "hw_thermal_slowdown",
                Unhealthy,
                Some(g),
                "0x40",
                format!("{mask:#x}"),
                "not set".into(),
                format!("GPU {i} is in HW thermal slowdown"),
            );
        }
        if mask & 0x80 != 0 {
            r.add(
                "hw_power_brake",
                Unhealthy,
                Some(g),
                "0x80",
                format!("{mask:#x}"),
                "not set".into(),
                format!("GPU {i} is in HW power brake slowdown"),
            );
        }
        if let (Some(t), Some(slow)) = (g.temperature_c, g.temperature_slowdown_c) {
            let limit = slow.saturating_sub(config.temperature_margin_c);
            if t >= limit {
                r.add(
                    "temperature_near_slowdown",
                    Unhealthy,
                    Some(g),
                    "temperature",
                    format!("{t} C"),
                    format!("{limit} C"),
                    format!(
                        "GPU {i} at {t} C is within {} C of slowdown at {slow} C",
                        config.temperature_margin_c
                    ),
                );
            }
        }
        let gen_low =
            matches!((g.pcie_link_gen_current, g.pcie_link_gen_max), (Some(c), Some(m)) if c < m);
        let width_low = matches!((g.pcie_link_width_current, g.pcie_link_width_max), (Some(c), Some(m)) if c < m);
        if gen_low || width_low {
            let show = |c: Option<u32>, w: Option<u32>| {
                format!("gen{} x{}", c.unwrap_or(0), w.unwrap_or(0))
            };
            let detail = match (gen_low, width_low) {
                (true, true) => "gen+width",
                (true, false) => "gen",
                _ => "width",
            };
            r.add(
                "pcie_link_degraded",
                Degraded,
                Some(g),
                detail,
                show(g.pcie_link_gen_current, g.pcie_link_width_current),
                show(g.pcie_link_gen_max, g.pcie_link_width_max),
                format!("GPU {i} PCIe link runs below its maximum ({detail})"),
            );
        }
        if let Some(n) = g
            .pcie_replay_counter
            .filter(|n| *n > config.pcie_replay_threshold)
        {
            r.add(
                "pcie_replay_high",
                Degraded,
                Some(g),
                "replay",
                n.to_string(),
                config.pcie_replay_threshold.to_string(),
                format!(
                    "GPU {i} PCIe replay counter {n} over {}",
                    config.pcie_replay_threshold
                ),
            );
        }
        for l in &g.nvlinks {
            if !l.active {
                r.add(
                    "nvlink_inactive",
                    Degraded,
                    Some(g),
                    &format!("link{}", l.link),
                    "inactive".into(),
                    "active".into(),
                    format!("GPU {i} NVLink {} is not active", l.link),
                );
            }
            let errs = l
                .replay_errors
                .unwrap_or(0)
                .saturating_add(l.recovery_errors.unwrap_or(0))
                .saturating_add(l.crc_flit_errors.unwrap_or(0));
            if errs > config.nvlink_error_threshold {
                r.add(
                    "nvlink_errors_high",
                    Degraded,
                    Some(g),
                    &format!("link{}", l.link),
                    errs.to_string(),
                    config.nvlink_error_threshold.to_string(),
                    format!("GPU {i} NVLink {} has {errs} errors", l.link),
                );
            }
        }
        let xids: BTreeSet<u64> = g
            .xids
            .iter()
            .filter(|x| x.boot_id == boot_id)
            .map(|x| x.xid)
            .collect();
        for xid in xids {
            let (code, sev, kind) = if config.critical_xids.contains(&xid) {
                ("xid_critical", Unhealthy, "critical")
            } else if config.application_xids.contains(&xid) {
                ("xid_application", Degraded, "application")
            } else {
                ("xid_other", Degraded, "unlisted")
            };
            r.add(
                code,
                sev,
                Some(g),
                &xid.to_string(),
                format!("XID {xid}"),
                kind.into(),
                format!("GPU {i} reported {kind} XID {xid} this boot"),
            );
        }
    }
    let verdict = r.reasons.iter().fold(Verdict::Healthy, |v, reason| {
        worse(
            v,
            Verdict::try_from(reason.severity).unwrap_or(Verdict::Unhealthy),
        )
    });
    (verdict, r.reasons)
}

/// Who is asking and the host's service state, for one report.
#[derive(Debug, Clone, Default)]
pub struct ReportContext {
    /// The agent's `host_id`, copied into the report.
    pub host_id: String,
    /// The agent's version, copied into the report.
    pub agent_version: String,
    /// Whether the host is drained (from the task engine).
    pub draining: bool,
    /// Fault ids an operator acknowledged.
    pub acknowledged: Vec<String>,
}

/// Ties backend, host facts, XID log and rules together. XIDs are recorded
/// by a background thread as they arrive, so none is lost between polls.
#[derive(Debug)]
pub struct Collector {
    backend: Arc<dyn GpuBackend>,
    config: HealthConfig,
    expected_gpus: u32,
    boot_id: String,
    xids: Arc<Mutex<XidLog>>,
    clock: Arc<dyn Clock>,
    // Field order matters: the watch is dropped (and its sender closed)
    // before the recorder is joined.
    watch: Option<XidWatch>,
    recorder: Option<JoinHandle<()>>,
}

impl Collector {
    /// Reads the boot id, opens the XID log under `state_dir` and starts
    /// watching XIDs on `backend`. `clock` stamps recorded XIDs and reports.
    pub fn start(
        backend: Arc<dyn GpuBackend>,
        config: HealthConfig,
        expected_gpus: u32,
        state_dir: &Path,
        boot_id_path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, HealthError> {
        let boot_id = hostfacts::boot_id(boot_id_path)?;
        let xids = Arc::new(Mutex::new(XidLog::open(state_dir, &boot_id)?));
        let (tx, rx) = channel();
        let watch = backend.watch_xids(tx)?;
        let log = Arc::clone(&xids);
        let xid_clock = Arc::clone(&clock);
        let recorder = std::thread::Builder::new()
            .name("xid-recorder".into())
            .spawn(move || {
                for hit in rx {
                    tracing::warn!(gpu = hit.gpu_index, uuid = %hit.gpu_uuid, xid = hit.xid, "XID event");
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = log.record(&hit, xid_clock.now_ms()) {
                        tracing::error!(error = %e, "XID event kept in memory only");
                    }
                }
            })
            .map_err(HealthError::Thread)?;
        Ok(Self {
            backend,
            config,
            expected_gpus,
            boot_id,
            xids,
            clock,
            watch: Some(watch),
            recorder: Some(recorder),
        })
    }

    /// The boot id read at start.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Collects a full report now.
    pub fn collect(&self, ctx: &ReportContext) -> pb::HealthReport {
        let mut snapshot = self.backend.collect();
        {
            let log = self.xids.lock().unwrap_or_else(|p| p.into_inner());
            for g in &mut snapshot.gpus {
                g.xids = log.for_gpu(g.index, &g.uuid);
            }
        }
        let host = hostfacts::collect_with_boot_id(&self.boot_id);
        let (verdict, reasons) = evaluate(
            &snapshot,
            &host,
            &self.config,
            self.expected_gpus,
            &ctx.acknowledged,
            &self.boot_id,
        );
        pb::HealthReport {
            host_id: ctx.host_id.clone(),
            collected_at_unix_ms: self.clock.now_ms(),
            boot_id: self.boot_id.clone(),
            driver_version: snapshot.driver_version,
            cuda_driver_version: snapshot.cuda_driver_version,
            gpus_expected: self.expected_gpus,
            gpus_found: u32::try_from(snapshot.gpus.len()).unwrap_or(u32::MAX),
            gpus: snapshot.gpus,
            host: Some(host),
            verdict: verdict as i32,
            reasons,
            agent_version: ctx.agent_version.clone(),
            draining: ctx.draining,
            backend: self.backend.name().to_owned(),
            acknowledged_faults: ctx.acknowledged.clone(),
            // Set by the daemon's report source while draining.
            drain_mark: None,
            critical_xids: self.config.critical_xids.clone(),
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.watch.take();
        if let Some(h) = self.recorder.take() {
            let _ = h.join();
        }
    }
}
