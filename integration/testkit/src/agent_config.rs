//! The agent's `agent.toml` as tests write it ([`AgentToml`]): identity,
//! listen address, state dir, trust file, `[tls]`, `[gpu]` (the fake NVML
//! library or the simulated backend), an optional `[drain]`, and any extra
//! TOML after it ([`crate::set_key`] changes one key of a written file).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::FixtureError;

/// An `agent.toml`.
#[derive(Debug, Clone, Serialize)]
pub struct AgentToml {
    /// `host_id`.
    pub host_id: String,
    /// `ring` (None: left out; the agent then counts as protected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring: Option<u32>,
    /// `listen`, `ip:port`.
    pub listen: String,
    /// `state_dir`.
    pub state_dir: PathBuf,
    /// `trust_file`.
    pub trust_file: PathBuf,
    /// `[tls]`.
    pub tls: TlsSection,
    /// `[gpu]`.
    pub gpu: GpuSection,
    /// `[drain]`, the last table, so that [`extra`](Self::extra) may add
    /// keys to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainSection>,
    /// TOML appended as it is (patch profiles, `[reboot]`, drain keys).
    #[serde(skip)]
    pub extra: String,
}

/// `[tls]`.
#[derive(Debug, Clone, Serialize)]
pub struct TlsSection {
    /// `cert`.
    pub cert: PathBuf,
    /// `key`.
    pub key: PathBuf,
    /// `ca_bundle`.
    pub ca_bundle: PathBuf,
    /// `trust_domain`.
    pub trust_domain: String,
    /// `crl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// `[gpu]`.
#[derive(Debug, Clone, Serialize)]
pub struct GpuSection {
    /// `backend`: `nvml` or `simulated`.
    pub backend: &'static str,
    /// `nvml_library` (backend `nvml`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvml_library: Option<PathBuf>,
    /// `scenario` (backend `simulated`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scenario: Option<PathBuf>,
    /// `expected_gpus`.
    pub expected_gpus: u32,
    /// `poll_interval_s`.
    pub poll_interval_s: u64,
}

impl GpuSection {
    /// The NVML backend on the library at `library`, polled every second.
    pub fn nvml(library: &Path, expected_gpus: u32) -> Self {
        Self {
            backend: "nvml",
            nvml_library: Some(library.to_path_buf()),
            scenario: None,
            expected_gpus,
            poll_interval_s: 1,
        }
    }

    /// The simulated backend playing `scenario`, polled every second.
    pub fn simulated(scenario: &Path, expected_gpus: u32) -> Self {
        Self {
            backend: "simulated",
            nvml_library: None,
            scenario: Some(scenario.to_path_buf()),
            expected_gpus,
            poll_interval_s: 1,
        }
    }
}

/// `[drain]`.
#[derive(Debug, Clone, Serialize)]
pub struct DrainSection {
    /// `timeout_s`.
    pub timeout_s: u64,
    /// `poll_ms`.
    pub poll_ms: u64,
}

impl AgentToml {
    /// An agent whose files all live in `dir`: `state/`, `trust.toml` and
    /// the TLS files of [`crate::pki::host_tls_paths`]; ring 0, no drain
    /// settings.
    pub fn in_dir(
        dir: &Path,
        host_id: &str,
        listen: &str,
        trust_domain: &str,
        gpu: GpuSection,
    ) -> Self {
        let tls = crate::pki::host_tls_paths(dir);
        Self {
            host_id: host_id.into(),
            ring: Some(0),
            listen: listen.into(),
            state_dir: dir.join("state"),
            trust_file: dir.join("trust.toml"),
            tls: TlsSection {
                cert: tls.cert,
                key: tls.key,
                ca_bundle: tls.ca_bundle,
                trust_domain: trust_domain.into(),
                crl: None,
            },
            gpu,
            drain: None,
            extra: String::new(),
        }
    }

    /// The file's text.
    pub fn render(&self) -> Result<String, FixtureError> {
        let mut text = toml::to_string(self).map_err(|source| FixtureError::Render {
            what: "agent.toml",
            source,
        })?;
        text.push_str(&self.extra);
        Ok(text)
    }

    /// Write the file to `path`.
    pub fn write(&self, path: &Path) -> Result<(), FixtureError> {
        crate::write(path, &self.render()?)
    }
}
