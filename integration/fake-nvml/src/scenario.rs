//! The scenario format shared by the fake NVML library and the agent's
//! simulated backend. Both crates compile this one file (the agent includes
//! it with `#[path]`), so the two can never disagree about the format.
//! The format is documented in integration/fake-nvml/README.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A whole scenario file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Driver version when `driver_version_file` is unset or unreadable.
    #[serde(default = "default_driver_version")]
    pub driver_version: String,
    /// File holding the installed driver version; re-read on every query, so
    /// a patch that rewrites it is seen at the next health read.
    #[serde(default)]
    pub driver_version_file: Option<PathBuf>,
    /// CUDA driver version as "major.minor".
    #[serde(default = "default_cuda_version")]
    pub cuda_driver_version: String,
    /// `nvmlInit_v2` fails with NVML_ERROR_DRIVER_NOT_LOADED.
    #[serde(default)]
    pub nvml_init_fails: bool,
    /// The GPUs NVML enumerates, in index order.
    #[serde(default, rename = "gpu")]
    pub gpus: Vec<GpuSpec>,
    /// Overrides that apply only while a given driver version is installed.
    #[serde(default)]
    pub when_driver: Vec<WhenDriver>,
    /// XID events to deliver through the event set.
    #[serde(default)]
    pub xid: Vec<XidSpec>,
}

fn default_driver_version() -> String {
    "550.54.15".to_owned()
}

fn default_cuda_version() -> String {
    "12.4".to_owned()
}

/// Overrides for one GPU (or all GPUs when `gpu` is absent) under one driver version.
/// Parsed by hand rather than with `#[serde(flatten)]`, which would let a
/// misspelt field name pass silently.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(try_from = "toml::Table")]
pub struct WhenDriver {
    /// The driver version these overrides belong to.
    pub version: String,
    /// GPU index; absent means every GPU.
    pub gpu: Option<u32>,
    /// Any GPU field; it replaces the base value.
    pub set: GpuSpec,
}

impl TryFrom<toml::Table> for WhenDriver {
    type Error = String;

    fn try_from(mut table: toml::Table) -> Result<Self, String> {
        let version = match table.remove("version") {
            Some(toml::Value::String(v)) => v,
            Some(_) => return Err("when_driver: `version` must be a string".to_owned()),
            None => return Err("when_driver: missing `version`".to_owned()),
        };
        let gpu = match table.remove("gpu") {
            None => None,
            Some(toml::Value::Integer(i)) => Some(
                u32::try_from(i).map_err(|_| format!("when_driver: `gpu = {i}` out of range"))?,
            ),
            Some(_) => return Err("when_driver: `gpu` must be an integer".to_owned()),
        };
        let set: GpuSpec = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| format!("when_driver {version}: {}", e.message()))?;
        Ok(Self { version, gpu, set })
    }
}

/// One XID event.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidSpec {
    /// GPU index the event comes from.
    pub gpu: u32,
    /// XID code.
    pub xid: u64,
    /// Deliver this many seconds after the library was initialised.
    #[serde(default)]
    pub at_s: Option<f64>,
    /// Deliver once this file exists.
    #[serde(default)]
    pub trigger_file: Option<PathBuf>,
}

/// A compute process on a GPU.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// Process id NVML reports.
    pub pid: u32,
    /// GPU memory the process uses, in bytes.
    #[serde(default)]
    pub used_memory_bytes: u64,
    /// The process disappears this many seconds after the library was initialised.
    #[serde(default)]
    pub exit_after_s: Option<f64>,
}

/// One NVLink.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NvLinkSpec {
    /// Whether the link is up (default true).
    #[serde(default = "yes")]
    pub active: bool,
    /// NVLink replay error counter.
    #[serde(default)]
    pub replay_errors: u64,
    /// NVLink recovery error counter.
    #[serde(default)]
    pub recovery_errors: u64,
    /// NVLink CRC flit error counter.
    #[serde(default)]
    pub crc_flit_errors: u64,
}

fn yes() -> bool {
    true
}

/// Every field of one GPU; absent fields take the defaults of a healthy H100.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuSpec {
    /// GPU UUID (default derived from the index).
    pub uuid: Option<String>,
    /// Product name (default `NVIDIA H100 80GB HBM3`).
    pub name: Option<String>,
    /// Board serial (default derived from the index).
    pub serial: Option<String>,
    /// PCI bus id (default derived from the index).
    pub pci_bus_id: Option<String>,
    /// Corrected ECC errors since the last driver load.
    pub ecc_volatile_corrected: Option<u64>,
    /// Uncorrected ECC errors since the last driver load.
    pub ecc_volatile_uncorrected: Option<u64>,
    /// Corrected ECC errors over the GPU's life.
    pub ecc_aggregate_corrected: Option<u64>,
    /// Uncorrected ECC errors over the GPU's life.
    pub ecc_aggregate_uncorrected: Option<u64>,
    /// Pages retired for repeated single-bit errors.
    pub retired_pages_single_bit: Option<u32>,
    /// Pages retired for double-bit errors.
    pub retired_pages_double_bit: Option<u32>,
    /// Page retirement waits for a reset.
    pub retired_pages_pending: Option<bool>,
    /// Rows remapped for correctable errors.
    pub remapped_rows_correctable: Option<u32>,
    /// Rows remapped for uncorrectable errors.
    pub remapped_rows_uncorrectable: Option<u32>,
    /// Row remapping waits for a reset.
    pub remapped_rows_pending: Option<bool>,
    /// A row remapping failed.
    pub remapped_rows_failure: Option<bool>,
    /// GPU temperature in C (default 41).
    pub temperature_c: Option<u32>,
    /// Slowdown threshold in C (default 87).
    pub temperature_slowdown_c: Option<u32>,
    /// Shutdown threshold in C (default 92).
    pub temperature_shutdown_c: Option<u32>,
    /// NVML clock throttle-reasons bit mask (default 0, none).
    pub throttle_reasons_mask: Option<u64>,
    /// Power draw in mW (default 72 000).
    pub power_usage_mw: Option<u32>,
    /// Enforced power limit in mW (default 700 000).
    pub power_limit_mw: Option<u32>,
    /// Current PCIe generation (default 5).
    pub pcie_link_gen_current: Option<u32>,
    /// Maximum PCIe generation (default 5).
    pub pcie_link_gen_max: Option<u32>,
    /// Current PCIe lanes (default 16).
    pub pcie_link_width_current: Option<u32>,
    /// Maximum PCIe lanes (default 16).
    pub pcie_link_width_max: Option<u32>,
    /// PCIe replay counter (default 0).
    pub pcie_replay_counter: Option<u64>,
    /// NVLinks in link order (default none: NVLink NOT_SUPPORTED).
    pub nvlinks: Option<Vec<NvLinkSpec>>,
    /// Compute processes on the GPU (default none).
    pub processes: Option<Vec<ProcessSpec>>,
    /// Field names (as in GpuReport) NVML answers with NOT_SUPPORTED.
    pub unsupported: Option<Vec<String>>,
}

macro_rules! merge_fields {
    ($base:expr, $over:expr, $($f:ident),*) => {
        $( if $over.$f.is_some() { $base.$f = $over.$f.clone(); } )*
    };
}

/// A GPU with every value resolved (defaults and driver overrides applied).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuState {
    /// Position in the scenario's `gpus`, also NVML's device index.
    pub index: u32,
    /// The GPU's fields with the matching `when_driver` overrides applied; the
    /// accessors below fill what is still unset with the healthy-H100 defaults.
    pub spec: GpuSpec,
}

impl GpuState {
    /// The UUID, or `GPU-fa4e0000-...-<index>` when unset.
    pub fn uuid(&self) -> String {
        self.spec
            .uuid
            .clone()
            .unwrap_or_else(|| format!("GPU-fa4e0000-0000-0000-0000-{:012x}", self.index))
    }
    /// The product name, or the H100 default.
    pub fn name(&self) -> String {
        self.spec
            .name
            .clone()
            .unwrap_or_else(|| "NVIDIA H100 80GB HBM3".to_owned())
    }
    /// The board serial, or one derived from the index.
    pub fn serial(&self) -> String {
        self.spec
            .serial
            .clone()
            .unwrap_or_else(|| format!("16520000{:05}", self.index))
    }
    /// The PCI bus id, or one derived from the index.
    pub fn pci_bus_id(&self) -> String {
        self.spec
            .pci_bus_id
            .clone()
            .unwrap_or_else(|| format!("00000000:{:02X}:00.0", 0x18 + self.index * 0x10))
    }
    /// Whether NVML should answer NOT_SUPPORTED for this field name.
    pub fn unsupported(&self, field: &str) -> bool {
        self.spec
            .unsupported
            .as_ref()
            .is_some_and(|u| u.iter().any(|f| f == field))
    }
    /// A numeric field by its `GpuReport` name, with the healthy-H100 default; 0 for unknown names.
    pub fn u64_field(&self, field: &str) -> u64 {
        let s = &self.spec;
        match field {
            "ecc_volatile_corrected" => s.ecc_volatile_corrected.unwrap_or(0),
            "ecc_volatile_uncorrected" => s.ecc_volatile_uncorrected.unwrap_or(0),
            "ecc_aggregate_corrected" => s.ecc_aggregate_corrected.unwrap_or(0),
            "ecc_aggregate_uncorrected" => s.ecc_aggregate_uncorrected.unwrap_or(0),
            "retired_pages_single_bit" => u64::from(s.retired_pages_single_bit.unwrap_or(0)),
            "retired_pages_double_bit" => u64::from(s.retired_pages_double_bit.unwrap_or(0)),
            "remapped_rows_correctable" => u64::from(s.remapped_rows_correctable.unwrap_or(0)),
            "remapped_rows_uncorrectable" => u64::from(s.remapped_rows_uncorrectable.unwrap_or(0)),
            "temperature_c" => u64::from(s.temperature_c.unwrap_or(41)),
            "temperature_slowdown_c" => u64::from(s.temperature_slowdown_c.unwrap_or(87)),
            "temperature_shutdown_c" => u64::from(s.temperature_shutdown_c.unwrap_or(92)),
            "throttle_reasons_mask" => s.throttle_reasons_mask.unwrap_or(0),
            "power_usage_mw" => u64::from(s.power_usage_mw.unwrap_or(72_000)),
            "power_limit_mw" => u64::from(s.power_limit_mw.unwrap_or(700_000)),
            "pcie_link_gen_current" => u64::from(s.pcie_link_gen_current.unwrap_or(5)),
            "pcie_link_gen_max" => u64::from(s.pcie_link_gen_max.unwrap_or(5)),
            "pcie_link_width_current" => u64::from(s.pcie_link_width_current.unwrap_or(16)),
            "pcie_link_width_max" => u64::from(s.pcie_link_width_max.unwrap_or(16)),
            "pcie_replay_counter" => s.pcie_replay_counter.unwrap_or(0),
            _ => 0,
        }
    }
    /// A flag field by its `GpuReport` name; false when unset or unknown.
    pub fn bool_field(&self, field: &str) -> bool {
        let s = &self.spec;
        match field {
            "retired_pages_pending" => s.retired_pages_pending.unwrap_or(false),
            "remapped_rows_pending" => s.remapped_rows_pending.unwrap_or(false),
            "remapped_rows_failure" => s.remapped_rows_failure.unwrap_or(false),
            _ => false,
        }
    }
    /// The NVLinks, empty when unset.
    pub fn nvlinks(&self) -> Vec<NvLinkSpec> {
        self.spec.nvlinks.clone().unwrap_or_default()
    }
    /// Processes still running `elapsed_s` seconds after initialisation.
    pub fn processes(&self, elapsed_s: f64) -> Vec<ProcessSpec> {
        self.spec
            .processes
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.exit_after_s.is_none_or(|t| elapsed_s < t))
            .collect()
    }
}

/// What reading a scenario can go wrong with.
#[derive(Debug)]
pub enum ScenarioError {
    /// "cannot read scenario {path}: {err}"
    Read(PathBuf, std::io::Error),
    /// "invalid scenario {path}: {err}"
    Parse(PathBuf, String),
}

impl std::fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Read(p, e) => write!(f, "cannot read scenario {}: {e}", p.display()),
            Self::Parse(p, e) => write!(f, "invalid scenario {}: {e}", p.display()),
        }
    }
}

impl std::error::Error for ScenarioError {}

impl Scenario {
    /// Reads and parses a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ScenarioError::Read(path.into(), e))?;
        toml::from_str(&text).map_err(|e| ScenarioError::Parse(path.into(), e.to_string()))
    }

    /// The installed driver version: the version file's first line when it
    /// exists, the `driver_version` key otherwise.
    pub fn current_driver_version(&self) -> String {
        if let Some(file) = &self.driver_version_file
            && let Ok(text) = std::fs::read_to_string(file)
            && let Some(line) = text.lines().next()
            && !line.trim().is_empty()
        {
            return line.trim().to_owned();
        }
        self.driver_version.clone()
    }

    /// CUDA driver version as NVML encodes it (1000 * major + 10 * minor).
    pub fn cuda_driver_version_int(&self) -> i32 {
        let mut parts = self.cuda_driver_version.split('.');
        let major: i32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor: i32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        major * 1000 + minor * 10
    }

    /// Every GPU with the overrides of `driver_version` applied.
    pub fn gpus_for(&self, driver_version: &str) -> Vec<GpuState> {
        self.gpus
            .iter()
            .enumerate()
            .map(|(i, base)| {
                let index = u32::try_from(i).unwrap_or(u32::MAX);
                let mut spec = base.clone();
                for w in &self.when_driver {
                    if w.version == driver_version && w.gpu.is_none_or(|g| g == index) {
                        let o = &w.set;
                        merge_fields!(
                            spec,
                            o,
                            uuid,
                            name,
                            serial,
                            pci_bus_id,
                            ecc_volatile_corrected,
                            ecc_volatile_uncorrected,
                            ecc_aggregate_corrected,
                            ecc_aggregate_uncorrected,
                            retired_pages_single_bit,
                            retired_pages_double_bit,
                            retired_pages_pending,
                            remapped_rows_correctable,
                            remapped_rows_uncorrectable,
                            remapped_rows_pending,
                            remapped_rows_failure,
                            temperature_c,
                            temperature_slowdown_c,
                            temperature_shutdown_c,
                            throttle_reasons_mask,
                            power_usage_mw,
                            power_limit_mw,
                            pcie_link_gen_current,
                            pcie_link_gen_max,
                            pcie_link_width_current,
                            pcie_link_width_max,
                            pcie_replay_counter,
                            nvlinks,
                            processes,
                            unsupported
                        );
                    }
                }
                GpuState { index, spec }
            })
            .collect()
    }

    /// XIDs due `elapsed_s` seconds after initialisation, by position in `xid`.
    pub fn due_xids(&self, elapsed_s: f64) -> BTreeMap<usize, &XidSpec> {
        self.xid
            .iter()
            .enumerate()
            .filter(|(_, x)| {
                x.at_s.is_some_and(|t| elapsed_s >= t)
                    || x.trigger_file.as_ref().is_some_and(|f| f.exists())
            })
            .collect()
    }
}
