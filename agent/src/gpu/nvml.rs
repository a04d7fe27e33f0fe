//! The real backend: libnvidia-ml through nvml-wrapper. NVML is initialised
//! lazily and again after it failed, so a host whose driver was missing at
//! start (or was reloaded by a patch) recovers without an agent restart.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    EccCounter, MemoryError, RetirementCause, TemperatureSensor, TemperatureThreshold,
};
use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, cuda_driver_version_major, cuda_driver_version_minor};
use ringfence::pb;

use super::{GpuBackend, GpuError, Snapshot, XidHit, XidWatch, throttle_reason_names};

/// NVML_NVLINK_MAX_LINKS.
const NVLINK_MAX_LINKS: u32 = 18;

type Slot = Arc<Mutex<Option<Arc<Nvml>>>>;

/// Reads GPUs through NVML.
#[derive(Debug)]
pub struct NvmlBackend {
    lib_path: Option<PathBuf>,
    nvml: Slot,
}

impl NvmlBackend {
    /// `lib_path` overrides where libnvidia-ml.so.1 is loaded from. Nothing is
    /// loaded until the first collect.
    pub fn new(lib_path: Option<PathBuf>) -> Self {
        Self {
            lib_path,
            nvml: Arc::new(Mutex::new(None)),
        }
    }
}

/// The current NVML handle, initialising it when there is none.
fn handle(slot: &Slot, lib_path: Option<&PathBuf>) -> Result<Arc<Nvml>, String> {
    let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = guard.as_ref() {
        return Ok(Arc::clone(n));
    }
    let mut builder = Nvml::builder();
    if let Some(p) = lib_path {
        builder.lib_path(OsStr::new(p.as_os_str()));
    }
    let where_ = lib_path.map_or_else(|| "libnvidia-ml.so".to_owned(), |p| p.display().to_string());
    let nvml = builder
        .init()
        .map_err(|e| format!("NVML init from {where_} failed: {e}"))?;
    let nvml = Arc::new(nvml);
    *guard = Some(Arc::clone(&nvml));
    Ok(nvml)
}

/// Forgets the handle so the next call re-initialises NVML.
fn reset(slot: &Slot) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// Collects per-field results: NotSupported is recorded, other errors kept.
struct Fields {
    unsupported: Vec<String>,
    errors: Vec<String>,
    index: u32,
}

impl Fields {
    fn take<T>(&mut self, name: &str, r: Result<T, NvmlError>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(NvmlError::NotSupported) => {
                self.unsupported.push(name.to_owned());
                None
            }
            Err(e) => {
                self.errors.push(format!("gpu {}: {name}: {e}", self.index));
                None
            }
        }
    }
}

/// (correctable, uncorrectable, pending, failure) via the raw
/// nvmlDeviceGetRemappedRows call, which nvml-wrapper 0.13 does not wrap.
#[allow(unsafe_code)]
fn remapped_rows(nvml: &Nvml, device: &Device<'_>) -> Result<(u32, u32, bool, bool), NvmlError> {
    let Ok(sym) = nvml.lib().nvmlDeviceGetRemappedRows.as_ref() else {
        // An old driver without the symbol: the feature is not there.
        return Err(NvmlError::NotSupported);
    };
    let (mut corr, mut unc, mut pending, mut failure) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: `sym` was resolved from the loaded NVML library that `nvml` keeps
    // alive; the device handle belongs to that same library instance; the four
    // out-pointers are valid, writable u32s for the duration of the call.
    let rc = unsafe {
        sym(
            device.handle(),
            &mut corr,
            &mut unc,
            &mut pending,
            &mut failure,
        )
    };
    if rc != 0 {
        return Err(NvmlError::from(rc));
    }
    Ok((corr, unc, pending != 0, failure != 0))
}

fn gpu_report(nvml: &Nvml, device: &Device<'_>, index: u32) -> (pb::GpuReport, Vec<String>) {
    let mut f = Fields {
        unsupported: Vec::new(),
        errors: Vec::new(),
        index,
    };
    let mut r = pb::GpuReport {
        index,
        ..Default::default()
    };
    r.uuid = f.take("uuid", device.uuid()).unwrap_or_default();
    r.name = f.take("name", device.name()).unwrap_or_default();
    r.serial = f.take("serial", device.serial()).unwrap_or_default();
    r.pci_bus_id = f
        .take("pci_bus_id", device.pci_info())
        .map(|p| p.bus_id)
        .unwrap_or_default();
    use EccCounter::{Aggregate, Volatile};
    use MemoryError::{Corrected, Uncorrected};
    r.ecc_volatile_corrected = f.take(
        "ecc_volatile_corrected",
        device.total_ecc_errors(Corrected, Volatile),
    );
    r.ecc_volatile_uncorrected = f.take(
        "ecc_volatile_uncorrected",
        device.total_ecc_errors(Uncorrected, Volatile),
    );
    r.ecc_aggregate_corrected = f.take(
        "ecc_aggregate_corrected",
        device.total_ecc_errors(Corrected, Aggregate),
    );
    r.ecc_aggregate_uncorrected = f.take(
        "ecc_aggregate_uncorrected",
        device.total_ecc_errors(Uncorrected, Aggregate),
    );
    let count = |v: Vec<_>| u32::try_from(v.len()).unwrap_or(u32::MAX);
    r.retired_pages_single_bit = f
        .take(
            "retired_pages_single_bit",
            device.retired_pages(RetirementCause::MultipleSingleBitEccErrors),
        )
        .map(count);
    r.retired_pages_double_bit = f
        .take(
            "retired_pages_double_bit",
            device.retired_pages(RetirementCause::DoubleBitEccError),
        )
        .map(count);
    r.retired_pages_pending = f.take("retired_pages_pending", device.are_pages_pending_retired());
    match remapped_rows(nvml, device) {
        Ok((c, u, p, fail)) => {
            r.remapped_rows_correctable = Some(c);
            r.remapped_rows_uncorrectable = Some(u);
            r.remapped_rows_pending = Some(p);
            r.remapped_rows_failure = Some(fail);
        }
        Err(NvmlError::NotSupported) => f.unsupported.extend(
            [
                "remapped_rows_correctable",
                "remapped_rows_uncorrectable",
                "remapped_rows_pending",
                "remapped_rows_failure",
            ]
            .map(str::to_owned),
        ),
        Err(e) => f.errors.push(format!("gpu {index}: remapped_rows: {e}")),
    }
    r.temperature_c = f.take("temperature_c", device.temperature(TemperatureSensor::Gpu));
    r.temperature_slowdown_c = f.take(
        "temperature_slowdown_c",
        device.temperature_threshold(TemperatureThreshold::Slowdown),
    );
    r.temperature_shutdown_c = f.take(
        "temperature_shutdown_c",
        device.temperature_threshold(TemperatureThreshold::Shutdown),
    );
    r.throttle_reasons_mask = f
        .take("throttle_reasons_mask", device.current_throttle_reasons())
        .map(|t| t.bits());
    r.throttle_reasons = throttle_reason_names(r.throttle_reasons_mask.unwrap_or(0));
    r.power_usage_mw = f.take("power_usage_mw", device.power_usage());
    r.power_limit_mw = f.take("power_limit_mw", device.enforced_power_limit());
    r.pcie_link_gen_current = f.take("pcie_link_gen_current", device.current_pcie_link_gen());
    r.pcie_link_gen_max = f.take("pcie_link_gen_max", device.max_pcie_link_gen());
    r.pcie_link_width_current = f.take("pcie_link_width_current", device.current_pcie_link_width());
    r.pcie_link_width_max = f.take("pcie_link_width_max", device.max_pcie_link_width());
    r.pcie_replay_counter = f
        .take("pcie_replay_counter", device.pcie_replay_counter())
        .map(u64::from);
    for link in 0..NVLINK_MAX_LINKS {
        let l = device.link_wrapper_for(link);
        match l.is_active() {
            Ok(active) => {
                let counter = |c| l.error_counter(c).ok();
                r.nvlinks.push(pb::NvLink {
                    link,
                    active,
                    replay_errors: counter(ErrorCounter::DlReplay),
                    recovery_errors: counter(ErrorCounter::DlRecovery),
                    crc_flit_errors: counter(ErrorCounter::DlCrcFlit),
                });
            }
            Err(NvmlError::NotSupported) if link == 0 => {
                f.unsupported.push("nvlinks".to_owned());
                break;
            }
            // Past the last link (InvalidArg) or a link the GPU does not have.
            Err(_) => break,
        }
    }
    if let Some(procs) = f.take("processes", device.running_compute_processes()) {
        r.processes = procs
            .into_iter()
            .map(|p| pb::GpuProcess {
                pid: p.pid,
                used_memory_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => b,
                    UsedGpuMemory::Unavailable => 0,
                },
            })
            .collect();
    }
    r.unsupported = f.unsupported;
    (r, f.errors)
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn collect(&self) -> Snapshot {
        let nvml = match handle(&self.nvml, self.lib_path.as_ref()) {
            Ok(n) => n,
            Err(e) => {
                crate::metrics::nvml_query_failures(1);
                return Snapshot {
                    nvml_available: false,
                    error: Some(e),
                    ..Default::default()
                };
            }
        };
        let count = match nvml.device_count() {
            Ok(c) => c,
            Err(e) => {
                // A dead handle (driver unloaded or upgraded): start over next time.
                crate::metrics::nvml_query_failures(1);
                reset(&self.nvml);
                return Snapshot {
                    nvml_available: false,
                    error: Some(format!("NVML device count failed: {e}")),
                    ..Default::default()
                };
            }
        };
        let mut errors = Vec::new();
        let driver_version = nvml.sys_driver_version().unwrap_or_else(|e| {
            errors.push(format!("driver version: {e}"));
            String::new()
        });
        let cuda_driver_version = match nvml.sys_cuda_driver_version() {
            Ok(v) => format!(
                "{}.{}",
                cuda_driver_version_major(v),
                cuda_driver_version_minor(v)
            ),
            Err(e) => {
                errors.push(format!("CUDA driver version: {e}"));
                String::new()
            }
        };
        let mut gpus = Vec::new();
        for index in 0..count {
            match nvml.device_by_index(index) {
                Ok(device) => {
                    let (report, errs) = gpu_report(&nvml, &device, index);
                    errors.extend(errs);
                    gpus.push(report);
                }
                // A GPU that cannot be opened is missing; the count check reports it.
                Err(e) => errors.push(format!("gpu {index}: handle: {e}")),
            }
        }
        crate::metrics::nvml_query_failures(errors.len());
        Snapshot {
            nvml_available: true,
            error: (!errors.is_empty()).then(|| errors.join("; ")),
            driver_version,
            cuda_driver_version,
            gpus,
        }
    }

    fn watch_xids(&self, sink: Sender<XidHit>) -> Result<XidWatch, GpuError> {
        let slot = Arc::clone(&self.nvml);
        let lib_path = self.lib_path.clone();
        XidWatch::spawn("nvml-xid-watch", move |stop| {
            while !stop.load(Ordering::SeqCst) {
                // NVML not there (yet): try again shortly.
                let Ok(nvml) = handle(&slot, lib_path.as_ref()) else {
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                };
                if !watch_with(&nvml, &sink, &stop) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    }
}

/// Waits for XIDs on every GPU until `stop` is set (returns true) or the sink
/// is gone (returns false). Returns true early when NVML fails, so the caller
/// re-initialises.
fn watch_with(nvml: &Nvml, sink: &Sender<XidHit>, stop: &std::sync::atomic::AtomicBool) -> bool {
    let Ok(mut set) = nvml.create_event_set() else {
        return true;
    };
    let count = nvml.device_count().unwrap_or(0);
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => s,
            // The set was released by the failed registration: start a new one.
            Err(_) => match nvml.create_event_set() {
                Ok(s) => s,
                Err(_) => return true,
            },
        };
    }
    while !stop.load(Ordering::SeqCst) {
        match set.wait(200) {
            Ok(data) => {
                let Some(XidError::Value(xid)) = data.event_data else {
                    continue;
                };
                let hit = XidHit {
                    gpu_index: data.device.index().unwrap_or(u32::MAX),
                    gpu_uuid: data.device.uuid().unwrap_or_default(),
                    xid,
                };
                if sink.send(hit).is_err() {
                    return false;
                }
            }
            Err(NvmlError::Timeout) => {}
            Err(_) => return true,
        }
    }
    true
}
