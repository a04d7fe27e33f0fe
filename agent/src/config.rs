//! The agent's configuration file (`/etc/ringfence/agent.toml`), loaded and
//! fully validated before any socket is bound or NVML is touched. Unknown
//! keys are refused; every error names the file, line and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ringfence::config::{ConfigError, Source};
use serde::Deserialize;
use toml::Spanned;

use crate::gpu::{BackendKind, GpuConfig};
use crate::health::HealthConfig;
use crate::metrics::{MetricsConfig, RawMetricsConfig};
use crate::profiles::{PatchConfig, ProfilePolicy};
use crate::tasks::{DrainConfig, RebootConfig, TaskConfigError};

/// Default location of the agent config.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ringfence/agent.toml";

/// TLS material of the agent (reloaded on SIGHUP).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of this host (SAN DNS:<host_id> + SPIFFE URI).
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM bundle of the fleet CA(s) that client certificates must chain to.
    pub ca_bundle: PathBuf,
    /// Optional PEM CRL of the fleet CA; expired CRLs are refused.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// SPIFFE trust domain of the fleet, e.g. `gpu.example.com`.
    pub trust_domain: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    host_id: Spanned<String>,
    #[serde(default)]
    ring: Option<Spanned<i64>>,
    #[serde(default = "default_listen")]
    listen: Spanned<String>,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_trust_file")]
    trust_file: PathBuf,
    tls: Spanned<TlsConfig>,
    #[serde(default)]
    gpu: Option<Spanned<GpuConfig>>,
    #[serde(default)]
    health: HealthConfig,
    #[serde(default)]
    drain: Option<Spanned<DrainConfig>>,
    #[serde(default)]
    reboot: Option<Spanned<RebootConfig>>,
    #[serde(default)]
    patch: Option<Spanned<PatchConfig>>,
    #[serde(default)]
    metrics: Option<Spanned<RawMetricsConfig>>,
}

fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, "0.0.0.0:7443".to_string())
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/ringfence")
}
fn default_trust_file() -> PathBuf {
    PathBuf::from("/etc/ringfence/trust.toml")
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's id; must equal the name in its TLS certificate.
    pub host_id: String,
    /// This host's ring (0-4), the same as in the coordinator's inventory.
    /// `None`: not configured; the agent then treats itself as protected.
    pub ring: Option<u32>,
    /// Address the mTLS gRPC listener binds.
    pub listen: SocketAddr,
    /// Durable state: attestation key, task journal, XID log.
    pub state_dir: PathBuf,
    /// Coordinator / approver / revoked keys and verification policy.
    pub trust_file: PathBuf,
    /// TLS material.
    pub tls: TlsConfig,
    /// GPU backend, expected GPU count, poll interval.
    pub gpu: GpuConfig,
    /// Verdict thresholds.
    pub health: HealthConfig,
    /// Drain / undrain hooks, the scheduler wait and the process wait.
    pub drain: DrainConfig,
    /// How the host reboots for `reboot = true` profiles.
    pub reboot: RebootConfig,
    /// Patch profiles.
    pub patch: PatchConfig,
    /// The `/metrics` endpoint (`None`: no `[metrics]` table, no endpoint).
    pub metrics: Option<MetricsConfig>,
}

impl AgentConfig {
    /// Load and validate the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&Source::read(path)?)
    }

    /// Validate config text (`src.path` is used in errors).
    pub fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let raw: RawConfig = src.parse()?;
        if !ringfence::spiffe::valid_name(raw.host_id.get_ref()) {
            return Err(src.invalid(
                raw.host_id.span(),
                "host_id",
                "must be 1-253 characters of [A-Za-z0-9._-]",
            ));
        }
        let ring = match &raw.ring {
            None => None,
            Some(r) => match u32::try_from(*r.get_ref()) {
                Ok(v) if v <= ringfence::envelope::MAX_RING => Some(v),
                _ => {
                    return Err(src.invalid(
                        r.span(),
                        "ring",
                        format!(
                            "`{}` is not a ring: rings are 0 (internal) to 4 (sensitive tenants)",
                            r.get_ref()
                        ),
                    ));
                }
            },
        };
        let listen: SocketAddr = raw.listen.get_ref().parse().map_err(|e| {
            src.invalid(
                raw.listen.span(),
                "listen",
                format!("`{}` is not an address:port ({e})", raw.listen.get_ref()),
            )
        })?;
        let tls_span = raw.tls.span();
        let tls = raw.tls.into_inner();
        if ringfence::spiffe::SpiffeId::new(
            &tls.trust_domain,
            ringfence::spiffe::Role::Host,
            raw.host_id.get_ref(),
        )
        .is_err()
        {
            return Err(src.invalid(
                tls_span,
                "tls.trust_domain",
                format!("`{}` is not a valid SPIFFE trust domain", tls.trust_domain),
            ));
        }
        let gpu = match raw.gpu {
            Some(g) => {
                let span = g.span();
                let g = g.into_inner();
                if g.backend == BackendKind::Simulated && g.scenario.is_none() {
                    return Err(src.invalid(
                        span,
                        "gpu.scenario",
                        "the simulated backend needs a scenario file",
                    ));
                }
                if g.poll_interval_s == 0 {
                    return Err(src.invalid(span, "gpu.poll_interval_s", "must be at least 1"));
                }
                g
            }
            None => GpuConfig::default(),
        };
        let drain = section(src, raw.drain, "drain", DrainConfig::validate)?;
        let reboot = section(src, raw.reboot, "reboot", RebootConfig::validate)?;
        let patch = match raw.patch {
            Some(p) => {
                let span = p.span();
                let p = p.into_inner();
                if let Err(e) = ProfilePolicy::new(&p) {
                    return Err(src.invalid(span, &e.key_path(), e.to_string()));
                }
                p
            }
            None => PatchConfig::default(),
        };
        let metrics = match raw.metrics {
            Some(m) => {
                let span = m.span();
                let m = m.into_inner().validate().map_err(|e| {
                    src.invalid(span, &format!("metrics.{}", e.key()), e.to_string())
                })?;
                Some(m)
            }
            None => None,
        };
        Ok(Self {
            host_id: raw.host_id.into_inner(),
            ring,
            listen,
            state_dir: raw.state_dir,
            trust_file: raw.trust_file,
            tls,
            gpu,
            health: raw.health,
            drain,
            reboot,
            patch,
            metrics,
        })
    }
}

/// A table with defaults, validated; errors point at the table's line.
fn section<T: Default>(
    src: &Source,
    value: Option<Spanned<T>>,
    table: &str,
    validate: fn(&T) -> Result<(), TaskConfigError>,
) -> Result<T, ConfigError> {
    let Some(v) = value else {
        return Ok(T::default());
    };
    let span = v.span();
    let v = v.into_inner();
    validate(&v).map_err(|e| match e {
        TaskConfigError::Invalid { key, message } => {
            src.invalid(span, &format!("{table}.{key}"), message)
        }
    })?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host_id = "gpu-0001"
listen = "127.0.0.1:7443"
state_dir = "/tmp/rf"
[tls]
cert = "/etc/ringfence/tls/host.pem"
key = "/etc/ringfence/tls/host.key"
ca_bundle = "/etc/ringfence/tls/ca.pem"
trust_domain = "gpu.example.com"
"#;

    #[test]
    fn packaged_default_config_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/agent.toml");
        let c = AgentConfig::load(std::path::Path::new(path)).unwrap();
        assert_eq!(c.gpu.expected_gpus, 8);
        assert!(c.patch.profiles.contains_key("nvidia-driver"));
        // A CRL file does not exist on a fresh host: configuring one by
        // default would stop the agent at its first start.
        assert_eq!(c.tls.crl, None, "the packaged config must not set a CRL");
        // No ring by default: an unenrolled host is protected (secure default).
        assert_eq!(c.ring, None, "the packaged config must not set a ring");
        // Metrics on by default, on loopback only, plain HTTP.
        let m = c.metrics.expect("the packaged config enables [metrics]");
        assert!(m.listen.ip().is_loopback() && !m.tls, "{m:?}");
    }

    #[test]
    fn good_config_loads() {
        let c = AgentConfig::from_source(&Source::from_text("agent.toml", GOOD)).unwrap();
        assert_eq!(c.host_id, "gpu-0001");
        assert_eq!(c.listen.port(), 7443);
    }

    #[test]
    fn unknown_key_is_refused_with_line() {
        let text = GOOD.replace("state_dir", "stat_dir");
        let err = AgentConfig::from_source(&Source::from_text("agent.toml", text))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agent.toml:4:"), "{err}");
        assert!(err.contains("stat_dir"), "{err}");
    }

    #[test]
    fn bad_profile_pattern_names_profile_key_and_line() {
        let text = format!(
            "{GOOD}\n[patch.profiles.drv]\nargv = [\"/bin/true\", \"{{version}}\"]\nversion_pattern = '[0-9]+'\n"
        );
        let err = AgentConfig::from_source(&Source::from_text("agent.toml", text))
            .unwrap_err()
            .to_string();
        assert!(err.contains("patch.profiles.drv.version_pattern"), "{err}");
        assert!(err.starts_with("agent.toml:1"), "{err}");
    }

    #[test]
    fn drain_hook_with_unknown_substitution_is_refused() {
        let text = format!("{GOOD}\n[drain]\nhook = [\"/bin/echo\", \"{{host}}\"]\n");
        let err = AgentConfig::from_source(&Source::from_text("agent.toml", text))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `drain.hook`"), "{err}");
    }

    #[test]
    fn drain_wait_command_keys_load_and_are_checked() {
        let text = format!(
            "{GOOD}\n[drain]\nwait_command = [\"/usr/lib/ringfence/hooks/slurm-wait-drained\", \"--node\", \"{{host_id}}\"]\nwait_interval_s = 5\nwait_timeout_s = 86400\n"
        );
        let c = AgentConfig::from_source(&Source::from_text("agent.toml", text)).unwrap();
        assert_eq!(c.drain.wait_command.len(), 3);
        assert_eq!(c.drain.wait_interval_s, 5);
        assert_eq!(c.drain.wait_timeout_s, 86400);

        let text = format!("{GOOD}\n[drain]\nwait_command = [\"/bin/wait\", \"{{node}}\"]\n");
        let err = AgentConfig::from_source(&Source::from_text("agent.toml", text))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agent.toml:11:"), "{err}");
        assert!(err.contains("key `drain.wait_command`"), "{err}");
        assert!(err.contains("unknown substitution {node}"), "{err}");

        for key in ["wait_interval_s", "wait_timeout_s"] {
            let text = format!("{GOOD}\n[drain]\n{key} = 0\n");
            let err = AgentConfig::from_source(&Source::from_text("agent.toml", text))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("key `drain.{key}`")), "{err}");
            assert!(err.contains("must be at least 1"), "{err}");
        }
    }

    #[test]
    fn ring_is_optional_and_limited_to_0_to_4() {
        let c = AgentConfig::from_source(&Source::from_text("agent.toml", GOOD)).unwrap();
        assert_eq!(c.ring, None);
        let text = GOOD.replace("listen =", "ring = 3\nlisten =");
        let c = AgentConfig::from_source(&Source::from_text("agent.toml", text)).unwrap();
        assert_eq!(c.ring, Some(3));
        for bad in ["5", "7", "-1", "\"3\""] {
            let text = GOOD.replace("listen =", &format!("ring = {bad}\nlisten ="));
            let err = AgentConfig::from_source(&Source::from_text("agent.toml", text))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("agent.toml:3:"), "{bad}: {err}");
            assert!(err.contains("ring"), "{bad}: {err}");
        }
    }

    #[test]
    fn metrics_table_turns_the_endpoint_on_with_a_loopback_default() {
        let c = AgentConfig::from_source(&Source::from_text("agent.toml", GOOD)).unwrap();
        assert_eq!(c.metrics, None, "no [metrics] table: no endpoint");
        let text = format!("{GOOD}\n[metrics]\n");
        let c = AgentConfig::from_source(&Source::from_text("agent.toml", text)).unwrap();
        let m = c.metrics.unwrap();
        assert_eq!(m.listen.to_string(), crate::metrics::DEFAULT_LISTEN);
        assert!(!m.tls);
        let text = format!("{GOOD}\n[metrics]\nlisten = \"0.0.0.0:9465\"\n");
        let err = AgentConfig::from_source(&Source::from_text("agent.toml", text))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agent.toml:11:"), "{err}");
        assert!(err.contains("key `metrics.listen`"), "{err}");
        assert!(err.contains("tls = true"), "{err}");
        let text = format!("{GOOD}\n[metrics]\nlisten = \"0.0.0.0:9465\"\ntls = true\n");
        let c = AgentConfig::from_source(&Source::from_text("agent.toml", text)).unwrap();
        assert!(c.metrics.unwrap().tls);
    }

    #[test]
    fn bad_listen_names_key_and_line() {
        let text = GOOD.replace("127.0.0.1:7443", "localhost");
        let err = AgentConfig::from_source(&Source::from_text("agent.toml", text))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agent.toml:3:"), "{err}");
        assert!(err.contains("key `listen`"), "{err}");
    }
}
