//! The coordinator's own configuration (`ringfence.toml`): where wave state
//! lives, which key signs tasks, and the operator's TLS identity.
//!
//! ```toml
//! state_dir = "/var/lib/ringfence-coordinator"   # wave stores, status snapshots, evidence
//! trust_file = "/etc/ringfence/trust.toml"       # the agents' trust file: coordinator + approver keys
//! [signing]
//! key = "/etc/ringfence/coordinator.key"         # ed25519 PKCS#8 PEM, mode 0600
//! key_id = "coord-2026"                          # must match the id in the agents' trust files
//! [tls]
//! cert = "/etc/ringfence/tls/ops-coordinator.pem" # spiffe://<td>/ops/<name>
//! key = "/etc/ringfence/tls/ops-coordinator.key"
//! ca_bundle = "/etc/ringfence/tls/ca.pem"
//! crl = "/etc/ringfence/tls/crl.pem"            # optional: agents' certificates checked against it
//! [timeouts]
//! connect_s = 5                                   # TCP+TLS connect to one agent
//! rpc_s = 30                                      # one RPC, as a whole (headers, body, trailers)
//! halt_grace_s = 120                              # after a halt, wait this long for hosts in flight
//! soak_report_max_age_s = 30                      # during a soak, a host with no new health report for this long fails
//! [store]
//! backend = "redb"                                # or "etcd": wave state on an etcd cluster
//! # endpoints = ["https://etcd-1:2379", "https://etcd-2:2379"]
//! # prefix = "/ringfence"
//! # [store.tls]
//! # cert = "/etc/ringfence/tls/etcd-client.pem"
//! # key = "/etc/ringfence/tls/etcd-client.key"
//! # ca = "/etc/ringfence/tls/etcd-ca.pem"
//! ```

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringfence::config::{ConfigError, Source};
use serde::Deserialize;

/// Where the coordinator looks for its config when `--config` is not given.
pub const DEFAULT_PATHS: &[&str] = &["ringfence.toml", "/etc/ringfence/coordinator.toml"];

/// The task-signing key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signing {
    /// PKCS#8 PEM ed25519 private key.
    pub key: PathBuf,
    /// Key id put in signatures.
    pub key_id: String,
}

/// The operator's client TLS identity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate with an `ops` SPIFFE id.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle agents' certificates chain to.
    pub ca_bundle: PathBuf,
    /// Optional PEM CRL(s) of the fleet CA (and any intermediate): an agent
    /// whose certificate, or a CA above it, is revoked is refused. Expired
    /// CRLs and CRLs without nextUpdate are refused when loaded.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl Tls {
    /// The operator's client identity: certificate, key, CA bundle and,
    /// when `crl` is set, the CRL agents' certificates are checked against.
    pub fn client_identity(
        &self,
    ) -> Result<ringfence::tls::ClientIdentity, ringfence::tls::TlsError> {
        let identity =
            ringfence::tls::ClientIdentity::load(&self.cert, &self.key, &self.ca_bundle)?;
        match &self.crl {
            Some(crl) => identity.with_crl_file(crl),
            None => Ok(identity),
        }
    }
}

/// Default `soak_report_max_age_s`: three of the agents' default poll intervals.
const DEFAULT_SOAK_REPORT_MAX_AGE: NonZeroU64 = NonZeroU64::new(30).unwrap();

/// Network timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Connect timeout, seconds.
    pub connect_s: u64,
    /// Per-RPC timeout, seconds: bounds each call as a whole.
    pub rpc_s: u64,
    /// After a halt, seconds to wait for hosts in flight to stop; hosts
    /// still in flight then are recorded `unreachable` and left drained.
    pub halt_grace_s: u64,
    /// During a soak, seconds a host may go without a new health report
    /// (WatchHealth heartbeat) before it fails with a soak regression: a
    /// few of the agents' `[gpu] poll_interval_s` (default 10 s). A broken
    /// stream is reopened within this bound.
    pub soak_report_max_age_s: NonZeroU64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_s: 5,
            rpc_s: 30,
            halt_grace_s: 120,
            soak_report_max_age_s: DEFAULT_SOAK_REPORT_MAX_AGE,
        }
    }
}

impl Timeouts {
    /// Connect timeout.
    pub fn connect(&self) -> Duration {
        Duration::from_secs(self.connect_s)
    }
    /// Per-RPC timeout.
    pub fn rpc(&self) -> Duration {
        Duration::from_secs(self.rpc_s)
    }
    /// Halt grace period.
    pub fn halt_grace(&self) -> Duration {
        Duration::from_secs(self.halt_grace_s)
    }
    /// Longest time a soaking host may go without a new health report.
    pub fn soak_report_max_age(&self) -> Duration {
        Duration::from_secs(self.soak_report_max_age_s.get())
    }
}

/// Which engine keeps the coordinator's wave state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One embedded redb file per wave under `state_dir` (the default).
    #[default]
    Redb,
    /// An etcd v3 cluster: every coordinator configured with the same
    /// endpoints and prefix sees the same waves.
    Etcd,
}

/// Client TLS to etcd (all three PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreTls {
    /// PEM client certificate presented to etcd.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA bundle etcd's server certificates chain to.
    pub ca: PathBuf,
}

/// Default etcd key prefix.
pub const DEFAULT_STORE_PREFIX: &str = "/ringfence";

/// Where the wave state lives (`[store]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// `redb` (default) or `etcd`.
    #[serde(default)]
    pub backend: Backend,
    /// etcd client URLs (`http://` or, with `[store.tls]`, `https://`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Every key of this coordinator lives under `<prefix>/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Client TLS to etcd.
    #[serde(default)]
    pub tls: Option<StoreTls>,
}

fn default_prefix() -> String {
    DEFAULT_STORE_PREFIX.to_string()
}

impl Default for Store {
    fn default() -> Self {
        Self {
            backend: Backend::Redb,
            endpoints: Vec::new(),
            prefix: default_prefix(),
            tls: None,
        }
    }
}

/// `[store]` as written, with the spans its checks point at.
#[derive(Debug, Deserialize)]
struct StoreSpans {
    #[serde(default)]
    store: Option<toml::Spanned<StoreKeySpans>>,
}

#[derive(Debug, Deserialize)]
struct StoreKeySpans {
    #[serde(default)]
    backend: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    endpoints: Option<toml::Spanned<toml::Value>>,
    #[serde(default)]
    prefix: Option<toml::Spanned<toml::Value>>,
}

impl Store {
    /// Check what serde cannot: etcd needs endpoints, URLs must be
    /// `http(s)://host:port`, TLS needs `https://` and the prefix must be
    /// an absolute key path without a trailing `/`.
    fn validate(&self, src: &Source) -> Result<(), ConfigError> {
        let spans: StoreSpans = src.parse()?;
        let Some(table) = spans.store else {
            return Ok(());
        };
        let whole = table.span();
        let keys = table.into_inner();
        let span = |v: &Option<toml::Spanned<toml::Value>>| {
            v.as_ref().map_or(whole.clone(), toml::Spanned::span)
        };
        if self.backend == Backend::Etcd && self.endpoints.is_empty() {
            return Err(src.invalid(
                span(&keys.backend),
                "store.backend",
                "backend \"etcd\" needs `endpoints` (etcd client URLs)",
            ));
        }
        for e in &self.endpoints {
            let scheme_ok = e.starts_with("http://") || e.starts_with("https://");
            let rest = e.split_once("://").map_or("", |(_, r)| r);
            if !scheme_ok || rest.is_empty() || !rest.contains(':') {
                return Err(src.invalid(
                    span(&keys.endpoints),
                    "store.endpoints",
                    format!(
                        "`{e}` is not an etcd client URL (http://host:port or https://host:port)"
                    ),
                ));
            }
            if self.tls.is_some() != e.starts_with("https://") {
                return Err(src.invalid(
                    span(&keys.endpoints),
                    "store.endpoints",
                    format!(
                        "`{e}`: use https:// endpoints with [store.tls] and http:// without it"
                    ),
                ));
            }
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(src.invalid(
                span(&keys.prefix),
                "store.prefix",
                format!(
                    "`{}`: the prefix starts with `/` and does not end with one, e.g. \"/ringfence\"",
                    self.prefix
                ),
            ));
        }
        Ok(())
    }
}

/// The coordinator's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Wave stores, status snapshots, evidence packets.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The same trust file the agents use: which keys are coordinators and approvers.
    #[serde(default = "default_trust_file")]
    pub trust_file: PathBuf,
    /// Task-signing key.
    pub signing: Signing,
    /// Operator TLS identity.
    pub tls: Tls,
    /// Network timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Where wave state lives (`[store]`; redb under `state_dir` by default).
    #[serde(default)]
    pub store: Store,
}

fn default_trust_file() -> PathBuf {
    PathBuf::from("/etc/ringfence/trust.toml")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ringfence-coordinator")
}

impl Settings {
    /// Load from `path`, or from the first of [`DEFAULT_PATHS`] that exists.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => DEFAULT_PATHS
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PATHS[0])),
        };
        let src = Source::read(&path)?;
        let settings: Self = src.parse()?;
        settings.store.validate(&src)?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const BASE: &str = "[signing]\nkey = \"/k\"\nkey_id = \"c\"\n[tls]\ncert = \"/c.pem\"\nkey = \"/c.key\"\nca_bundle = \"/ca.pem\"\n";

    #[test]
    fn the_soak_report_bound_defaults_to_30_s_and_zero_is_refused_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringfence.toml");
        std::fs::write(&path, BASE).unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.timeouts.soak_report_max_age(), Duration::from_secs(30));
        std::fs::write(
            &path,
            format!("{BASE}[timeouts]\nsoak_report_max_age_s = 4\n"),
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.timeouts.soak_report_max_age(), Duration::from_secs(4));
        std::fs::write(
            &path,
            format!("{BASE}[timeouts]\nsoak_report_max_age_s = 0\n"),
        )
        .unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        // Line 9 of the file: `soak_report_max_age_s = 0`.
        assert!(
            err.contains("ringfence.toml:9:") && err.contains("nonzero"),
            "{err}"
        );
    }

    #[test]
    fn the_store_defaults_to_redb_and_etcd_settings_are_checked_at_their_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringfence.toml");
        std::fs::write(&path, BASE).unwrap();
        assert_eq!(Settings::load(Some(&path)).unwrap().store, Store::default());
        assert_eq!(Store::default().backend, Backend::Redb);

        std::fs::write(
            &path,
            format!(
                "{BASE}[store]\nbackend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\nprefix = \"/fleet-a\"\n[store.tls]\ncert = \"/e.pem\"\nkey = \"/e.key\"\nca = \"/eca.pem\"\n"
            ),
        )
        .unwrap();
        let s = Settings::load(Some(&path)).unwrap().store;
        assert_eq!(s.backend, Backend::Etcd);
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.prefix, "/fleet-a");
        assert_eq!(s.tls.unwrap().ca, PathBuf::from("/eca.pem"));

        let refused = |store: &str| {
            std::fs::write(&path, format!("{BASE}[store]\n{store}")).unwrap();
            Settings::load(Some(&path)).unwrap_err().to_string()
        };
        // Line 9: `backend = "etcd"` with no endpoints.
        let err = refused("backend = \"etcd\"\n");
        assert!(
            err.contains("ringfence.toml:9:")
                && err.contains("store.backend")
                && err.contains("endpoints"),
            "{err}"
        );
        let err = refused("backend = \"etcd\"\nendpoints = [\"10.0.0.1:2379\"]\n");
        assert!(
            err.contains("ringfence.toml:10:") && err.contains("store.endpoints"),
            "{err}"
        );
        let err = refused("backend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\n");
        assert!(err.contains("[store.tls]"), "{err}");
        let err = refused(
            "backend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\nprefix = \"fleet/\"\n",
        );
        assert!(
            err.contains("ringfence.toml:11:") && err.contains("store.prefix"),
            "{err}"
        );
        let err = refused("backend = \"consul\"\n");
        assert!(
            err.contains("ringfence.toml:9:") && err.contains("consul"),
            "{err}"
        );
        let err = refused("endpoint = [\"http://a:1\"]\n");
        assert!(err.contains("endpoint"), "{err}");
    }

    #[test]
    fn tls_crl_is_optional_and_loaded_with_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ringfence.toml");
        std::fs::write(&path, BASE).unwrap();
        assert_eq!(Settings::load(Some(&path)).unwrap().tls.crl, None);

        ringfence::tls::install_crypto_provider();
        let pki = ringfence::pki::TestPki::new("fleet.test").unwrap();
        let ops = pki.issue(ringfence::spiffe::Role::Ops, "coord").unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let tls = Tls {
            cert: file("ops.pem", &ops.cert_pem),
            key: file("ops.key", &ops.key_pem),
            ca_bundle: file("ca.pem", pki.ca_pem()),
            crl: Some(file("crl.pem", &pki.fresh_crl(&[]).unwrap())),
        };
        let text = format!(
            "[signing]\nkey = \"/k\"\nkey_id = \"c\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca_bundle = \"{}\"\ncrl = \"{}\"\n",
            tls.cert.display(),
            tls.key.display(),
            tls.ca_bundle.display(),
            tls.crl.as_ref().unwrap().display()
        );
        std::fs::write(&path, text).unwrap();
        let loaded = Settings::load(Some(&path)).unwrap();
        assert_eq!(loaded.tls.crl, tls.crl);
        loaded.tls.client_identity().unwrap();

        // A CRL without nextUpdate is refused, naming the file.
        file("crl.pem", &pki.crl_without_next_update(&[]).unwrap());
        let err = loaded.tls.client_identity().unwrap_err().to_string();
        assert!(
            err.contains("crl.pem") && err.contains("nextUpdate"),
            "{err}"
        );
    }
}
