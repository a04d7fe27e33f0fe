//! Fixtures the tests of several crates need alike, so that each is written
//! once: signing keys and the trust sets and trust files naming them
//! ([`trust`]), a host's mTLS files and client identities from a throwaway
//! CA ([`pki`]), the agent's `agent.toml` ([`agent_config`]), task actions and
//! coordinator-signed tasks ([`tasks`]), raw gRPC calls that no generated
//! client would make ([`grpc`]), free loopback addresses ([`net`]), real etcd members ([`etcd`]) and the
//! build's output directory ([`artifacts`]), the fake NVML library
//! ([`fake_nvml`]), the real Prometheus and promtool for the metrics tests
//! ([`prometheus`]); and [`set_key`] to change one
//! key of a TOML file a test wrote (agent.toml, the coordinator's settings).
//!
//! Only proto-level things live here (the `ringfence` crate's types); the
//! agent's and the coordinator's own fixtures stay with their tests, and the
//! local test fleet is `ringfence-devfleet`. Never linked into a packaged
//! binary (integration/test.sh checks).
#![warn(missing_docs)]

pub mod agent_config;
pub mod artifacts;
pub mod etcd;
pub mod fake_nvml;
pub mod grpc;
pub mod net;
pub mod pki;
pub mod prometheus;
pub mod tasks;
pub mod trust;

use std::path::{Path, PathBuf};

/// A fixture could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A fixture file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A fixture does not serialize as TOML (a path that is not UTF-8).
    #[error("rendering {what} as TOML: {source}")]
    Render {
        /// Which fixture.
        what: &'static str,
        /// What the serializer said.
        source: toml::ser::Error,
    },
    /// A TOML file to edit does not parse, or lacks the table to edit.
    #[error("{path}: {reason}")]
    Edit {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A client identity could not be built from the issued certificate.
    #[error("client identity: {0}")]
    Tls(#[from] ringfence::tls::TlsError),
    /// The throwaway CA failed.
    #[error("PKI: {0}")]
    Pki(#[from] ringfence::pki::PkiError),
    /// The running executable (and so the build directory) cannot be located.
    #[error("cannot locate the running executable: {0}")]
    CurrentExe(std::io::Error),
    /// Building a test artifact (the fake NVML library) failed.
    #[error("building {what}: {reason}")]
    Build {
        /// What was being built.
        what: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A build output the test runs is not there.
    #[error(
        "{path} is missing: build the workspace's binaries and the fake NVML library \
         first (`cargo build --workspace --bins --lib`; integration/test.sh does)"
    )]
    NotBuilt {
        /// Where it should be.
        path: PathBuf,
    },
}

/// The error for an I/O failure on `path`.
fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FixtureError + '_ {
    move |source| FixtureError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `text` to `path`.
pub fn write(path: &Path, text: &str) -> Result<(), FixtureError> {
    std::fs::write(path, text).map_err(io_error(path))
}

/// Write `text` to `path` readable by the owner only (0600), by rename so
/// that a reader never sees a half-written file.
pub fn write_private(path: &Path, text: &str) -> Result<(), FixtureError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tmp_path(path);
    write(&tmp, text)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .map_err(io_error(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// Replace `path` with `text` by rename (a reader sees the old or the new file).
pub fn replace(path: &Path, text: &str) -> Result<(), FixtureError> {
    let tmp = tmp_path(path);
    write(&tmp, text)?;
    std::fs::rename(&tmp, path).map_err(io_error(path))
}

/// `<path>.tmp`, beside `path`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Set `key` of table `table` in the TOML file at `path` to `value` (the
/// rest of the file keeps its meaning; comments and layout are not kept).
pub fn set_key(
    path: &Path,
    table: &str,
    key: &str,
    value: impl Into<toml::Value>,
) -> Result<(), FixtureError> {
    let edit = |reason: String| FixtureError::Edit {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    let mut doc: toml::Table = toml::from_str(&text).map_err(|e| edit(e.to_string()))?;
    let Some(toml::Value::Table(t)) = doc.get_mut(table) else {
        return Err(edit(format!("no table [{table}]")));
    };
    t.insert(key.into(), value.into());
    let text = toml::to_string(&doc).map_err(|source| FixtureError::Render {
        what: "an edited TOML file",
        source,
    })?;
    write(path, &text)
}
