//! Facts about the host itself: sysinfo for names, uptime, load and memory,
//! and the kernel's boot id, which ties XIDs and attestations to one boot.

use std::path::{Path, PathBuf};

use ringfence::pb;
use sysinfo::{MemoryRefreshKind, RefreshKind, System};

/// Where Linux publishes the id of the current boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Host fact errors.
#[derive(Debug, thiserror::Error)]
pub enum HostFactsError {
    /// "cannot read boot id from {path}: {source}"
    #[error("cannot read boot id from {path}: {source}")]
    BootId {
        /// The boot id file (normally [`BOOT_ID_PATH`]).
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// "boot id file {path} is empty"
    #[error("boot id file {path} is empty")]
    EmptyBootId {
        /// The boot id file (normally [`BOOT_ID_PATH`]).
        path: PathBuf,
    },
}

/// Reads the boot id (first line, trimmed) from `path`.
pub fn boot_id(path: &Path) -> Result<String, HostFactsError> {
    let text = std::fs::read_to_string(path).map_err(|source| HostFactsError::BootId {
        path: path.to_owned(),
        source,
    })?;
    let id = text.lines().next().unwrap_or("").trim().to_owned();
    if id.is_empty() {
        return Err(HostFactsError::EmptyBootId {
            path: path.to_owned(),
        });
    }
    Ok(id)
}

/// Collects host facts with the boot id already known.
pub fn collect_with_boot_id(boot_id: &str) -> pb::HostFacts {
    let sys = System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let load = System::load_average();
    pb::HostFacts {
        hostname: System::host_name().unwrap_or_default(),
        kernel_version: System::kernel_version().unwrap_or_default(),
        os_version: System::long_os_version().unwrap_or_default(),
        uptime_s: System::uptime(),
        boot_id: boot_id.to_owned(),
        load_1m: load.one,
        load_5m: load.five,
        load_15m: load.fifteen,
        memory_total_bytes: sys.total_memory(),
        memory_available_bytes: sys.available_memory(),
    }
}

/// Collects host facts, reading the boot id from `boot_id_path`
/// (normally [`BOOT_ID_PATH`]; tests point it at a file of their own).
pub fn collect(boot_id_path: &Path) -> Result<pb::HostFacts, HostFactsError> {
    Ok(collect_with_boot_id(&boot_id(boot_id_path)?))
}
