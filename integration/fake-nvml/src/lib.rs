//! A fake `libnvidia-ml.so.1`: exports, with NVML's C ABI, every NVML function
//! ringfenced's NVML backend calls, answering from a scenario file so the real
//! nvml-wrapper code path runs without a GPU. The scenario is the file named by
//! `FAKE_NVML_SCENARIO`, or else `fake-nvml-scenario.toml` next to this library
//! (so tests that copy the library into their own directory stay independent).
//! See README.md for the format.
//!
//! Unsafe code is this crate's job (the workspace denies it elsewhere): the
//! exported functions take NVML's raw pointers. Each `unsafe` block says in a
//! `// SAFETY:` comment why it is sound; the exported functions' contract is
//! NVML's own documentation of the call they stand in for, so they carry no
//! `# Safety` section of their own.
#![allow(unsafe_code, non_snake_case, clippy::missing_safety_doc)]
#![warn(missing_docs)]

pub mod scenario;

use std::collections::HashSet;
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use scenario::{GpuState, Scenario};

type Ret = c_uint;
type Device = *mut c_void;
type EventSetHandle = *mut c_void;

const SUCCESS: Ret = 0;
const UNINITIALIZED: Ret = 1;
const INVALID_ARGUMENT: Ret = 2;
const NOT_SUPPORTED: Ret = 3;
const INSUFFICIENT_SIZE: Ret = 7;
const DRIVER_NOT_LOADED: Ret = 9;
const TIMEOUT: Ret = 10;
const UNKNOWN: Ret = 999;

const EVENT_XID_CRITICAL: u64 = 0x8;

/// nvmlPciInfo_t (the v3 layout nvml-wrapper passes).
#[repr(C)]
#[derive(Debug)]
pub struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

/// nvmlProcessInfo_t (v2 struct, used by the _v2 and _v3 process calls).
#[repr(C)]
#[derive(Debug)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// nvmlEventData_t.
#[repr(C)]
#[derive(Debug)]
pub struct EventData {
    device: Device,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// One event set: the GPUs registered for XID events.
#[derive(Debug, Default)]
struct EventSet {
    gpus: HashSet<u32>,
}

#[derive(Debug)]
struct State {
    scenario: Scenario,
    init_count: u32,
    loaded_at: Instant,
    delivered: HashSet<usize>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn scenario_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FAKE_NVML_SCENARIO") {
        return Some(PathBuf::from(p));
    }
    // SAFETY: dladdr only reads the loader's tables for an address inside this
    // library; `info` is a plain out-struct and dli_fname, when non-null, is a
    // NUL-terminated string owned by the loader for as long as we are loaded.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(nvmlInit_v2 as *const c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        let lib = PathBuf::from(
            CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned(),
        );
        lib.parent().map(|d| d.join("fake-nvml-scenario.toml"))
    }
}

fn init() -> Ret {
    let mut guard = lock();
    if let Some(st) = guard.as_mut() {
        st.init_count += 1;
        return SUCCESS;
    }
    let Some(path) = scenario_path() else {
        return UNKNOWN;
    };
    let scenario = match Scenario::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fake-nvml: {e}");
            return UNKNOWN;
        }
    };
    if scenario.nvml_init_fails {
        return DRIVER_NOT_LOADED;
    }
    *guard = Some(State {
        scenario,
        init_count: 1,
        loaded_at: Instant::now(),
        delivered: HashSet::new(),
    });
    SUCCESS
}

/// Runs `f` with the initialised state, or returns UNINITIALIZED.
fn with_state(f: impl FnOnce(&mut State) -> Ret) -> Ret {
    match lock().as_mut() {
        Some(st) => f(st),
        None => UNINITIALIZED,
    }
}

fn gpus(st: &State) -> Vec<GpuState> {
    st.scenario.gpus_for(&st.scenario.current_driver_version())
}

fn device_index(dev: Device) -> Option<u32> {
    let raw = dev as usize;
    if raw == 0 {
        return None;
    }
    u32::try_from(raw - 1).ok()
}

/// Runs `f` on the GPU behind `dev` with driver overrides applied.
fn with_gpu(dev: Device, f: impl FnOnce(&State, &GpuState) -> Ret) -> Ret {
    with_state(|st| {
        let Some(idx) = device_index(dev) else {
            return INVALID_ARGUMENT;
        };
        match gpus(st).into_iter().find(|g| g.index == idx) {
            Some(g) => f(st, &g),
            None => INVALID_ARGUMENT,
        }
    })
}

/// Writes `s` NUL-terminated into a caller buffer of `len` bytes.
unsafe fn write_str(s: &str, buf: *mut c_char, len: c_uint) -> Ret {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the caller gave a buffer of `len` bytes and we checked that the
    // string plus its NUL fits.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    SUCCESS
}

/// Stores `v` through an out-pointer after checking it is not null.
unsafe fn put<T>(out: *mut T, v: T) -> Ret {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null out-pointer supplied by the caller for a T.
    unsafe { out.write(v) };
    SUCCESS
}

/// Answers a u32 field, or NOT_SUPPORTED when the scenario says so.
unsafe fn u32_field(dev: Device, field: &'static str, out: *mut c_uint) -> Ret {
    with_gpu(dev, |_, g| {
        if g.unsupported(field) {
            return NOT_SUPPORTED;
        }
        let v = u32::try_from(g.u64_field(field)).unwrap_or(u32::MAX);
        // SAFETY: out-pointer from the caller.
        unsafe { put(out, v) }
    })
}

/// `nvmlInit_v2`: Loads the scenario (on the first call) and counts one more init.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> Ret {
    init()
}

/// `nvmlInitWithFlags`: As [`nvmlInit_v2`]; the flags are ignored.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    init()
}

/// `nvmlShutdown`: Counts one init fewer; the scenario stays loaded.
#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> Ret {
    with_state(|st| {
        st.init_count = st.init_count.saturating_sub(1);
        SUCCESS
    })
}

/// `nvmlErrorString`: NVML's text for a return code (static, never freed).
#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let s: &'static CStr = match result {
        SUCCESS => c"Success",
        UNINITIALIZED => c"Uninitialized",
        INVALID_ARGUMENT => c"Invalid Argument",
        NOT_SUPPORTED => c"Not Supported",
        INSUFFICIENT_SIZE => c"Insufficient Size",
        DRIVER_NOT_LOADED => c"Driver Not Loaded",
        TIMEOUT => c"Timeout",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// `nvmlSystemGetDriverVersion`: The driver version: the first line of the scenario's `driver_version_file` when it has one (so a patch hook can change it), else `driver_version`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(buf: *mut c_char, len: c_uint) -> Ret {
    // SAFETY: caller buffer of `len` bytes.
    with_state(|st| unsafe { write_str(&st.scenario.current_driver_version(), buf, len) })
}

/// `nvmlSystemGetNVMLVersion`: An NVML version string derived from the scenario's driver version.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(buf: *mut c_char, len: c_uint) -> Ret {
    // SAFETY: caller buffer of `len` bytes.
    with_state(|st| unsafe {
        write_str(
            &format!("12.{}", st.scenario.current_driver_version()),
            buf,
            len,
        )
    })
}

/// `nvmlSystemGetCudaDriverVersion_v2`: The scenario's CUDA driver version as NVML's integer (major * 1000 + minor * 10).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(out: *mut c_int) -> Ret {
    // SAFETY: caller out-pointer.
    with_state(|st| unsafe { put(out, st.scenario.cuda_driver_version_int()) })
}

/// `nvmlSystemGetCudaDriverVersion`: Alias of [`nvmlSystemGetCudaDriverVersion_v2`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(out: *mut c_int) -> Ret {
    // SAFETY: same contract as the _v2 call.
    unsafe { nvmlSystemGetCudaDriverVersion_v2(out) }
}

/// `nvmlDeviceGetCount_v2`: How many GPUs the scenario lists.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    with_state(|st| unsafe { put(out, u32::try_from(st.scenario.gpus.len()).unwrap_or(0)) })
}

/// `nvmlDeviceGetHandleByIndex_v2`: A handle for GPU `index` (index + 1 as an opaque pointer).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, out: *mut Device) -> Ret {
    with_state(|st| {
        if index as usize >= st.scenario.gpus.len() {
            return INVALID_ARGUMENT;
        }
        // The handle is index + 1 disguised as a pointer; it is never dereferenced.
        // SAFETY: caller out-pointer.
        unsafe { put(out, (index as usize + 1) as Device) }
    })
}

/// `nvmlDeviceGetIndex`: The GPU's index in the scenario.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(dev: Device, out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    with_gpu(dev, |_, g| unsafe { put(out, g.index) })
}

/// `nvmlDeviceGetName`: The GPU's product name.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(dev: Device, buf: *mut c_char, len: c_uint) -> Ret {
    // SAFETY: caller buffer of `len` bytes.
    with_gpu(dev, |_, g| unsafe { write_str(&g.name(), buf, len) })
}

/// `nvmlDeviceGetUUID`: The GPU's UUID.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(dev: Device, buf: *mut c_char, len: c_uint) -> Ret {
    // SAFETY: caller buffer of `len` bytes.
    with_gpu(dev, |_, g| unsafe { write_str(&g.uuid(), buf, len) })
}

/// `nvmlDeviceGetSerial`: The GPU's board serial, or NOT_SUPPORTED when the scenario says so.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSerial(dev: Device, buf: *mut c_char, len: c_uint) -> Ret {
    with_gpu(dev, |_, g| {
        if g.unsupported("serial") {
            return NOT_SUPPORTED;
        }
        // SAFETY: caller buffer of `len` bytes.
        unsafe { write_str(&g.serial(), buf, len) }
    })
}

/// `nvmlDeviceGetPciInfo_v3`: PCI info built from the GPU's bus id, with fixed H100-like device ids.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(dev: Device, out: *mut PciInfo) -> Ret {
    with_gpu(dev, |_, g| {
        if out.is_null() {
            return INVALID_ARGUMENT;
        }
        let id = g.pci_bus_id();
        let mut info = PciInfo {
            bus_id_legacy: [0; 16],
            domain: 0,
            bus: 0x18 + g.index * 0x10,
            device: 0,
            pci_device_id: 0x2330_10de,
            pci_sub_system_id: 0x16c1_10de,
            bus_id: [0; 32],
        };
        for (i, b) in id.bytes().take(31).enumerate() {
            info.bus_id[i] = b as c_char;
        }
        for (i, b) in id.bytes().skip(4).take(15).enumerate() {
            info.bus_id_legacy[i] = b as c_char;
        }
        // SAFETY: checked non-null out-pointer for a PciInfo.
        unsafe { put(out, info) }
    })
}

/// `nvmlDeviceGetTotalEccErrors`: Volatile or aggregate, corrected or uncorrected ECC error total.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    dev: Device,
    error_type: c_uint,
    counter_type: c_uint,
    out: *mut c_ulonglong,
) -> Ret {
    let field = match (counter_type, error_type) {
        (0, 0) => "ecc_volatile_corrected",
        (0, 1) => "ecc_volatile_uncorrected",
        (1, 0) => "ecc_aggregate_corrected",
        (1, 1) => "ecc_aggregate_uncorrected",
        _ => return INVALID_ARGUMENT,
    };
    with_gpu(dev, |_, g| {
        if g.unsupported(field) {
            return NOT_SUPPORTED;
        }
        // SAFETY: caller out-pointer.
        unsafe { put(out, g.u64_field(field)) }
    })
}

fn retired_field(cause: c_uint) -> Option<&'static str> {
    match cause {
        0 => Some("retired_pages_single_bit"),
        1 => Some("retired_pages_double_bit"),
        _ => None,
    }
}

/// `nvmlDeviceGetRetiredPages_v2`: Retired pages of one cause, with made-up addresses and timestamps.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    dev: Device,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> Ret {
    let Some(field) = retired_field(cause) else {
        return INVALID_ARGUMENT;
    };
    with_gpu(dev, |_, g| {
        if g.unsupported(field) {
            return NOT_SUPPORTED;
        }
        if count.is_null() {
            return INVALID_ARGUMENT;
        }
        let n = u32::try_from(g.u64_field(field)).unwrap_or(u32::MAX);
        // SAFETY: count is a non-null in/out pointer; addresses and timestamps,
        // when non-null, hold at least *count entries (the NVML contract).
        unsafe {
            let cap = *count;
            *count = n;
            if cap < n {
                return INSUFFICIENT_SIZE;
            }
            for i in 0..n as usize {
                if !addresses.is_null() {
                    *addresses.add(i) = 0x1000 * (i as u64 + 1);
                }
                if !timestamps.is_null() {
                    *timestamps.add(i) = 1_700_000_000_000_000 + i as u64;
                }
            }
        }
        SUCCESS
    })
}

/// `nvmlDeviceGetRetiredPages`: As [`nvmlDeviceGetRetiredPages_v2`] without timestamps.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    dev: Device,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> Ret {
    // SAFETY: same contract as _v2 without timestamps.
    unsafe { nvmlDeviceGetRetiredPages_v2(dev, cause, count, addresses, std::ptr::null_mut()) }
}

/// `nvmlDeviceGetRetiredPagesPendingStatus`: Whether page retirement is pending (needs a reset).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    dev: Device,
    out: *mut c_uint,
) -> Ret {
    with_gpu(dev, |_, g| {
        if g.unsupported("retired_pages_pending") {
            return NOT_SUPPORTED;
        }
        // SAFETY: caller out-pointer.
        unsafe { put(out, u32::from(g.bool_field("retired_pages_pending"))) }
    })
}

/// `nvmlDeviceGetRemappedRows`: Correctable and uncorrectable remapped rows, and the pending and failure flags.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    dev: Device,
    corr: *mut c_uint,
    unc: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> Ret {
    with_gpu(dev, |_, g| {
        let fields = [
            "remapped_rows_correctable",
            "remapped_rows_uncorrectable",
            "remapped_rows_pending",
            "remapped_rows_failure",
        ];
        if fields.iter().any(|f| g.unsupported(f)) {
            return NOT_SUPPORTED;
        }
        let c = u32::try_from(g.u64_field(fields[0])).unwrap_or(u32::MAX);
        let u = u32::try_from(g.u64_field(fields[1])).unwrap_or(u32::MAX);
        // SAFETY: caller out-pointers; put checks each for null.
        unsafe {
            let r = [
                put(corr, c),
                put(unc, u),
                put(pending, u32::from(g.bool_field(fields[2]))),
                put(failure, u32::from(g.bool_field(fields[3]))),
            ];
            r.into_iter().find(|r| *r != SUCCESS).unwrap_or(SUCCESS)
        }
    })
}

/// `nvmlDeviceGetTemperature`: GPU core temperature in C (only sensor 0, the GPU die).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    dev: Device,
    sensor: c_uint,
    out: *mut c_uint,
) -> Ret {
    if sensor != 0 {
        return INVALID_ARGUMENT;
    }
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, "temperature_c", out) }
}

/// `nvmlDeviceGetTemperatureThreshold`: Shutdown (kind 0) or slowdown (kind 1) temperature threshold in C.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperatureThreshold(
    dev: Device,
    kind: c_uint,
    out: *mut c_uint,
) -> Ret {
    let field = match kind {
        0 => "temperature_shutdown_c",
        1 => "temperature_slowdown_c",
        _ => return NOT_SUPPORTED,
    };
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, field, out) }
}

/// `nvmlDeviceGetCurrentClocksThrottleReasons`: The scenario's clock throttle-reasons bit mask.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    dev: Device,
    out: *mut c_ulonglong,
) -> Ret {
    with_gpu(dev, |_, g| {
        if g.unsupported("throttle_reasons_mask") {
            return NOT_SUPPORTED;
        }
        // SAFETY: caller out-pointer.
        unsafe { put(out, g.u64_field("throttle_reasons_mask")) }
    })
}

/// `nvmlDeviceGetCurrentClocksEventReasons`: Newer name of [`nvmlDeviceGetCurrentClocksThrottleReasons`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksEventReasons(
    dev: Device,
    out: *mut c_ulonglong,
) -> Ret {
    // SAFETY: same contract as the throttle-reasons call it renames.
    unsafe { nvmlDeviceGetCurrentClocksThrottleReasons(dev, out) }
}

/// `nvmlDeviceGetPowerUsage`: Power draw in milliwatts.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(dev: Device, out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, "power_usage_mw", out) }
}

/// `nvmlDeviceGetEnforcedPowerLimit`: Enforced power limit in milliwatts.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(dev: Device, out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, "power_limit_mw", out) }
}

/// `nvmlDeviceGetCurrPcieLinkGeneration`: Current PCIe link generation.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrPcieLinkGeneration(dev: Device, out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, "pcie_link_gen_current", out) }
}

/// `nvmlDeviceGetMaxPcieLinkGeneration`: Maximum PCIe link generation.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxPcieLinkGeneration(dev: Device, out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, "pcie_link_gen_max", out) }
}

/// `nvmlDeviceGetCurrPcieLinkWidth`: Current PCIe link width (lanes).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrPcieLinkWidth(dev: Device, out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, "pcie_link_width_current", out) }
}

/// `nvmlDeviceGetMaxPcieLinkWidth`: Maximum PCIe link width (lanes).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxPcieLinkWidth(dev: Device, out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, "pcie_link_width_max", out) }
}

/// `nvmlDeviceGetPcieReplayCounter`: PCIe replay counter.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPcieReplayCounter(dev: Device, out: *mut c_uint) -> Ret {
    // SAFETY: caller out-pointer.
    unsafe { u32_field(dev, "pcie_replay_counter", out) }
}

/// `nvmlDeviceGetNvLinkState`: Whether NVLink `link` is active; NOT_SUPPORTED when the GPU has no links.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkState(
    dev: Device,
    link: c_uint,
    out: *mut c_uint,
) -> Ret {
    with_gpu(dev, |_, g| {
        let links = g.nvlinks();
        if g.unsupported("nvlinks") || links.is_empty() {
            return NOT_SUPPORTED;
        }
        match links.get(link as usize) {
            // SAFETY: caller out-pointer.
            Some(l) => unsafe { put(out, u32::from(l.active)) },
            None => INVALID_ARGUMENT,
        }
    })
}

/// `nvmlDeviceGetNvLinkErrorCounter`: One NVLink error counter (0 replay, 1 recovery, 2 CRC flit) of one link.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkErrorCounter(
    dev: Device,
    link: c_uint,
    counter: c_uint,
    out: *mut c_ulonglong,
) -> Ret {
    with_gpu(dev, |_, g| {
        let links = g.nvlinks();
        if g.unsupported("nvlinks") || links.is_empty() {
            return NOT_SUPPORTED;
        }
        let Some(l) = links.get(link as usize) else {
            return INVALID_ARGUMENT;
        };
        let v = match counter {
            0 => l.replay_errors,
            1 => l.recovery_errors,
            2 => l.crc_flit_errors,
            _ => return NOT_SUPPORTED,
        };
        // SAFETY: caller out-pointer.
        unsafe { put(out, v) }
    })
}

/// `nvmlDeviceGetComputeRunningProcesses_v3`: The compute processes on the GPU at this moment of the scenario's timeline.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    dev: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    with_gpu(dev, |st, g| {
        if g.unsupported("processes") {
            return NOT_SUPPORTED;
        }
        if count.is_null() {
            return INVALID_ARGUMENT;
        }
        let procs = g.processes(st.loaded_at.elapsed().as_secs_f64());
        let n = u32::try_from(procs.len()).unwrap_or(u32::MAX);
        // SAFETY: count is non-null; infos, when non-null, holds *count entries.
        unsafe {
            let cap = *count;
            *count = n;
            if n == 0 {
                return SUCCESS;
            }
            if infos.is_null() || cap < n {
                return INSUFFICIENT_SIZE;
            }
            for (i, p) in procs.iter().enumerate() {
                infos.add(i).write(ProcessInfo {
                    pid: p.pid,
                    used_gpu_memory: p.used_memory_bytes,
                    gpu_instance_id: u32::MAX,
                    compute_instance_id: u32::MAX,
                });
            }
        }
        SUCCESS
    })
}

/// `nvmlDeviceGetComputeRunningProcesses_v2`: As [`nvmlDeviceGetComputeRunningProcesses_v3`] (same struct layout).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v2(
    dev: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    // SAFETY: v2 and v3 share the nvmlProcessInfo_v2_t layout.
    unsafe { nvmlDeviceGetComputeRunningProcesses_v3(dev, count, infos) }
}

/// `nvmlDeviceGetSupportedEventTypes`: The event types the fake can deliver: critical Xid errors only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    dev: Device,
    out: *mut c_ulonglong,
) -> Ret {
    // SAFETY: caller out-pointer.
    with_gpu(dev, |_, _| unsafe { put(out, EVENT_XID_CRITICAL) })
}

/// `nvmlEventSetCreate`: A new, empty event set (heap-allocated; free with [`nvmlEventSetFree`]).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(out: *mut EventSetHandle) -> Ret {
    with_state(|_| {
        let set = Box::into_raw(Box::new(EventSet::default()));
        // SAFETY: caller out-pointer.
        unsafe { put(out, set.cast::<c_void>()) }
    })
}

/// `nvmlDeviceRegisterEvents`: Adds the GPU to the set when critical Xid events are asked for.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    dev: Device,
    types: c_ulonglong,
    set: EventSetHandle,
) -> Ret {
    if set.is_null() {
        return INVALID_ARGUMENT;
    }
    with_gpu(dev, |_, g| {
        if types & EVENT_XID_CRITICAL != 0 {
            // SAFETY: `set` came from nvmlEventSetCreate and is not freed yet.
            unsafe { (*set.cast::<EventSet>()).gpus.insert(g.index) };
        }
        SUCCESS
    })
}

/// `nvmlEventSetWait_v2`: Delivers the next due scenario Xid for a registered GPU, each once; waits up to `timeout_ms`, else TIMEOUT.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: EventSetHandle,
    out: *mut EventData,
    timeout_ms: c_uint,
) -> Ret {
    if set.is_null() || out.is_null() {
        return INVALID_ARGUMENT;
    }
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        let r = with_state(|st| {
            let elapsed = st.loaded_at.elapsed().as_secs_f64();
            // SAFETY: `set` came from nvmlEventSetCreate and is not freed yet.
            let registered = unsafe { &(*set.cast::<EventSet>()).gpus };
            let due = st
                .scenario
                .due_xids(elapsed)
                .into_iter()
                .find(|(i, x)| !st.delivered.contains(i) && registered.contains(&x.gpu))
                .map(|(i, x)| (i, x.gpu, x.xid));
            let Some((i, gpu, xid)) = due else {
                return TIMEOUT;
            };
            st.delivered.insert(i);
            let data = EventData {
                device: (gpu as usize + 1) as Device,
                event_type: EVENT_XID_CRITICAL,
                event_data: xid,
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            };
            // SAFETY: checked non-null out-pointer.
            unsafe { put(out, data) }
        });
        if r != TIMEOUT || Instant::now() >= deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `nvmlEventSetFree`: Frees an event set made by [`nvmlEventSetCreate`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: EventSetHandle) -> Ret {
    if set.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: `set` came from Box::into_raw in nvmlEventSetCreate and is freed once.
    drop(unsafe { Box::from_raw(set.cast::<EventSet>()) });
    SUCCESS
}
