//! The simulated backend: plays a scenario file (the same format as the fake
//! NVML library, integration/fake-nvml/README.md) without loading any library.

#[path = "../../../integration/fake-nvml/src/scenario.rs"]
pub mod scenario;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfence::pb;

use super::{GpuBackend, GpuError, Snapshot, XidHit, XidWatch, throttle_reason_names};
use scenario::{GpuState, Scenario};

/// A backend driven by a scenario file.
#[derive(Debug)]
pub struct SimBackend {
    path: PathBuf,
    scenario: Arc<Scenario>,
    started: Instant,
    delivered: Arc<Mutex<HashSet<usize>>>,
}

impl SimBackend {
    /// Loads the scenario; the clock for `exit_after_s` and `at_s` starts now.
    pub fn load(path: &Path) -> Result<Self, GpuError> {
        let scenario = Scenario::load(path).map_err(|e| GpuError::Scenario(e.to_string()))?;
        Ok(Self {
            path: path.to_owned(),
            scenario: Arc::new(scenario),
            started: Instant::now(),
            delivered: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// The scenario file this backend plays.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Converts one scenario GPU into the report NVML would have produced.
pub fn report_from_state(g: &GpuState, elapsed_s: f64) -> pb::GpuReport {
    let mut r = pb::GpuReport {
        index: g.index,
        uuid: g.uuid(),
        name: g.name(),
        serial: if g.unsupported("serial") {
            String::new()
        } else {
            g.serial()
        },
        pci_bus_id: g.pci_bus_id(),
        ..Default::default()
    };
    let mut unsupported = Vec::new();
    let mut u64f = |name: &str| -> Option<u64> {
        if g.unsupported(name) {
            unsupported.push(name.to_owned());
            None
        } else {
            Some(g.u64_field(name))
        }
    };
    let u32of = |v: Option<u64>| v.map(|v| u32::try_from(v).unwrap_or(u32::MAX));
    r.ecc_volatile_corrected = u64f("ecc_volatile_corrected");
    r.ecc_volatile_uncorrected = u64f("ecc_volatile_uncorrected");
    r.ecc_aggregate_corrected = u64f("ecc_aggregate_corrected");
    r.ecc_aggregate_uncorrected = u64f("ecc_aggregate_uncorrected");
    r.retired_pages_single_bit = u32of(u64f("retired_pages_single_bit"));
    r.retired_pages_double_bit = u32of(u64f("retired_pages_double_bit"));
    r.temperature_c = u32of(u64f("temperature_c"));
    r.temperature_slowdown_c = u32of(u64f("temperature_slowdown_c"));
    r.temperature_shutdown_c = u32of(u64f("temperature_shutdown_c"));
    r.throttle_reasons_mask = u64f("throttle_reasons_mask");
    r.power_usage_mw = u32of(u64f("power_usage_mw"));
    r.power_limit_mw = u32of(u64f("power_limit_mw"));
    r.pcie_link_gen_current = u32of(u64f("pcie_link_gen_current"));
    r.pcie_link_gen_max = u32of(u64f("pcie_link_gen_max"));
    r.pcie_link_width_current = u32of(u64f("pcie_link_width_current"));
    r.pcie_link_width_max = u32of(u64f("pcie_link_width_max"));
    r.pcie_replay_counter = u64f("pcie_replay_counter");
    r.throttle_reasons = throttle_reason_names(r.throttle_reasons_mask.unwrap_or(0));
    if g.unsupported("serial") {
        unsupported.push("serial".to_owned());
    }
    if g.unsupported("retired_pages_pending") {
        unsupported.push("retired_pages_pending".to_owned());
    } else {
        r.retired_pages_pending = Some(g.bool_field("retired_pages_pending"));
    }
    let remap = [
        "remapped_rows_correctable",
        "remapped_rows_uncorrectable",
        "remapped_rows_pending",
        "remapped_rows_failure",
    ];
    if remap.iter().any(|f| g.unsupported(f)) {
        unsupported.extend(remap.iter().map(|f| (*f).to_owned()));
    } else {
        r.remapped_rows_correctable = u32of(Some(g.u64_field(remap[0])));
        r.remapped_rows_uncorrectable = u32of(Some(g.u64_field(remap[1])));
        r.remapped_rows_pending = Some(g.bool_field(remap[2]));
        r.remapped_rows_failure = Some(g.bool_field(remap[3]));
    }
    let links = g.nvlinks();
    if g.unsupported("nvlinks") || links.is_empty() {
        unsupported.push("nvlinks".to_owned());
    } else {
        r.nvlinks = links
            .iter()
            .enumerate()
            .map(|(i, l)| pb::NvLink {
                link: u32::try_from(i).unwrap_or(u32::MAX),
                active: l.active,
                replay_errors: Some(l.replay_errors),
                recovery_errors: Some(l.recovery_errors),
                crc_flit_errors: Some(l.crc_flit_errors),
            })
            .collect();
    }
    if g.unsupported("processes") {
        unsupported.push("processes".to_owned());
    } else {
        r.processes = g
            .processes(elapsed_s)
            .iter()
            .map(|p| pb::GpuProcess {
                pid: p.pid,
                used_memory_bytes: p.used_memory_bytes,
            })
            .collect();
    }
    r.unsupported = unsupported;
    r
}

impl GpuBackend for SimBackend {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn collect(&self) -> Snapshot {
        if self.scenario.nvml_init_fails {
            return Snapshot {
                nvml_available: false,
                error: Some("simulated: nvml_init_fails = true (Driver Not Loaded)".to_owned()),
                ..Default::default()
            };
        }
        let driver = self.scenario.current_driver_version();
        let elapsed = self.started.elapsed().as_secs_f64();
        Snapshot {
            nvml_available: true,
            error: None,
            cuda_driver_version: self.scenario.cuda_driver_version.clone(),
            gpus: self
                .scenario
                .gpus_for(&driver)
                .iter()
                .map(|g| report_from_state(g, elapsed))
                .collect(),
            driver_version: driver,
        }
    }

    fn watch_xids(&self, sink: Sender<XidHit>) -> Result<XidWatch, GpuError> {
        let scenario = Arc::clone(&self.scenario);
        let delivered = Arc::clone(&self.delivered);
        let started = self.started;
        XidWatch::spawn("sim-xid-watch", move |stop| {
            while !stop.load(Ordering::SeqCst) {
                let due = scenario.due_xids(started.elapsed().as_secs_f64());
                let mut seen = delivered.lock().unwrap_or_else(|p| p.into_inner());
                let gpus = scenario.gpus_for(&scenario.current_driver_version());
                for (i, x) in due {
                    if seen.insert(i) {
                        let uuid = gpus
                            .iter()
                            .find(|g| g.index == x.gpu)
                            .map(GpuState::uuid)
                            .unwrap_or_default();
                        let hit = XidHit {
                            gpu_index: x.gpu,
                            gpu_uuid: uuid,
                            xid: x.xid,
                        };
                        if sink.send(hit).is_err() {
                            return;
                        }
                    }
                }
                drop(seen);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    }
}
