//! GPU access behind one seam: the real NVML backend and a simulated one that
//! plays a scenario file, so the health rules, the demo and the tests all see
//! the same `Snapshot`.

pub mod nvml;
pub mod sim;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

use ringfence::pb;
use serde::Deserialize;

/// Which backend reads the GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// libnvidia-ml through nvml-wrapper.
    #[default]
    Nvml,
    /// A scenario file (demo, benchmarks).
    Simulated,
}

/// The `[gpu]` section of the agent config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpuConfig {
    /// Which backend reports the GPUs (`nvml` on real hosts, `simulated` for scenario files).
    pub backend: BackendKind,
    /// Overrides where libnvidia-ml.so.1 is loaded from.
    pub nvml_library: Option<PathBuf>,
    /// Scenario file for the simulated backend.
    pub scenario: Option<PathBuf>,
    /// GPUs this host must have; fewer found is UNHEALTHY.
    pub expected_gpus: u32,
    /// How often health is collected, seconds (default 10).
    pub poll_interval_s: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Nvml,
            nvml_library: None,
            scenario: None,
            expected_gpus: 8,
            poll_interval_s: 10,
        }
    }
}

/// GPU backend errors.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// "the simulated GPU backend needs `scenario` in `[gpu]`"
    #[error("the simulated GPU backend needs `scenario` in [gpu]")]
    NoScenario,
    /// "{0}" (a scenario file that cannot be read or parsed)
    #[error("{0}")]
    Scenario(String),
    /// "cannot start the XID watcher thread: {0}"
    #[error("cannot start the XID watcher thread: {0}")]
    Thread(std::io::Error),
}

/// One collection of everything the backend knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// False when NVML could not be loaded or initialised.
    pub nvml_available: bool,
    /// Why NVML is unavailable, or the first per-GPU query that failed.
    pub error: Option<String>,
    /// The NVIDIA driver version NVML reports, e.g. "550.54.15" (empty without NVML).
    pub driver_version: String,
    /// "major.minor", e.g. "12.4".
    pub cuda_driver_version: String,
    /// Every GPU found; `xids` is left empty (the XID log fills it).
    pub gpus: Vec<pb::GpuReport>,
}

/// An XID event as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidHit {
    /// Index of the GPU as NVML enumerates it.
    pub gpu_index: u32,
    /// The GPU's UUID (`GPU-...`), stable across reboots unlike the index.
    pub gpu_uuid: String,
    /// The XID number (e.g. 79: the GPU fell off the bus).
    pub xid: u64,
}

/// A running XID watcher; dropping it stops and joins the thread.
#[derive(Debug)]
pub struct XidWatch {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl XidWatch {
    /// Spawns `body(stop)` on a named thread; `body` must return soon after `stop` is set.
    pub(crate) fn spawn(
        name: &str,
        body: impl FnOnce(Arc<AtomicBool>) + Send + 'static,
    ) -> Result<Self, GpuError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(flag))
            .map_err(GpuError::Thread)?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for XidWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A source of GPU state. `collect` is called from the poll loop and on
/// demand; XIDs arrive asynchronously, so a backend runs its own watcher
/// thread that sends each event on `sink` until the returned guard drops.
pub trait GpuBackend: Send + Sync + std::fmt::Debug {
    /// "nvml" or "simulated" (HealthReport.backend).
    fn name(&self) -> &'static str;
    /// Reads every GPU now. Never fails: an unusable NVML is reported in the snapshot.
    fn collect(&self) -> Snapshot;
    /// Starts delivering XID events on `sink`.
    fn watch_xids(&self, sink: Sender<XidHit>) -> Result<XidWatch, GpuError>;
}

/// Builds the backend the config selects.
pub fn open(config: &GpuConfig) -> Result<Arc<dyn GpuBackend>, GpuError> {
    match config.backend {
        BackendKind::Nvml => Ok(Arc::new(nvml::NvmlBackend::new(
            config.nvml_library.clone(),
        ))),
        BackendKind::Simulated => {
            let path = config.scenario.as_ref().ok_or(GpuError::NoScenario)?;
            Ok(Arc::new(sim::SimBackend::load(path)?))
        }
    }
}

/// Names of the NVML throttle reason bits, in bit order.
pub const THROTTLE_REASON_NAMES: &[(u64, &str)] = &[
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// The names of the bits set in `mask`.
pub fn throttle_reason_names(mask: u64) -> Vec<String> {
    THROTTLE_REASON_NAMES
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| (*n).to_owned())
        .collect()
}
