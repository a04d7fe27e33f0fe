//! Prometheus metrics of the agent (`[metrics]` in agent.toml): an HTTP
//! `/metrics` endpoint, local-only unless it speaks mTLS.
//!
//! Every series is produced by the `prometheus-client` crate. The GPU and
//! host series are built at scrape time from the last health report the
//! poll loop published ([`HealthCell`]) and the drain mark: a scrape makes
//! no NVML call. Task, rejection, TLS and NVML-failure counters are counted
//! where those things happen ([`task_status`], [`nvml_query_failures`], and
//! `ringfence::refusals` in the transport); they are process-wide (one agent
//! per process).
//!
//! Scrapers that ask for OpenMetrics (Prometheus does) get it; any other
//! client gets the classic text format 0.0.4 (`promtool check metrics`
//! reads only that one), the same samples under counter and info family
//! names that format expects.

mod events;
mod http;
mod report;

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::sync::watch;

pub use events::{nvml_query_failures, task_status};
pub use http::MetricsServer;
pub use ringfence::exposition::{Format, PATH};

use crate::config::AgentConfig;
use crate::healthcell::HealthCell;

/// Where the endpoint listens when `[metrics]` names no `listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9465";

/// The `[metrics]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetricsConfig {
    /// address:port of the endpoint.
    #[serde(default = "default_listen")]
    listen: String,
    /// Serve mTLS with the agent's `[tls]` material.
    #[serde(default)]
    tls: bool,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}

/// The validated `[metrics]` table; present only when the endpoint is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Address the endpoint binds.
    pub listen: SocketAddr,
    /// mTLS with the agent's certificate; clients need a certificate of the
    /// fleet CA with the scheduler or ops role.
    pub tls: bool,
}

/// The `[metrics]` table is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricsConfigError {
    /// `listen` is not an address.
    #[error("`{value}` is not an address:port ({reason})")]
    Listen {
        /// The configured `metrics.listen` value.
        value: String,
        /// The parse error.
        reason: String,
    },
    /// Plain HTTP on an address other hosts can reach.
    #[error(
        "`{addr}` is not a loopback address: plain HTTP metrics stay on this host. Set `tls = true` to serve them over mTLS (scrapers then need a scheduler or ops certificate of the fleet CA), or listen on 127.0.0.1"
    )]
    NotLoopback {
        /// The parsed address, not a loopback one.
        addr: SocketAddr,
    },
}

impl MetricsConfigError {
    /// The key (under `metrics.`) the error is about.
    pub fn key(&self) -> &'static str {
        "listen"
    }
}

impl RawMetricsConfig {
    /// Check the address; plain HTTP only on loopback.
    pub fn validate(self) -> Result<MetricsConfig, MetricsConfigError> {
        let listen: SocketAddr = self.listen.parse().map_err(|e: std::net::AddrParseError| {
            MetricsConfigError::Listen {
                value: self.listen.clone(),
                reason: e.to_string(),
            }
        })?;
        if !self.tls && !listen.ip().is_loopback() {
            return Err(MetricsConfigError::NotLoopback { addr: listen });
        }
        Ok(MetricsConfig {
            listen,
            tls: self.tls,
        })
    }
}

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not bind.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The metrics listen address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
}

/// The agent's registry: report series, event counters, refusals.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

/// Who this agent is, for the info series.
#[derive(Debug, Clone, Default)]
pub struct HostLabels {
    /// `host_id` of agent.toml.
    pub host_id: String,
    /// `ring` of agent.toml (`None`: not configured).
    pub ring: Option<u32>,
}

impl Metrics {
    /// Series over `health` (the last report) and `draining` (the drain mark now).
    pub fn new(host: HostLabels, health: Arc<HealthCell>, draining: watch::Receiver<bool>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(report::ReportCollector::new(
            host, health, draining,
        )));
        events::register(&mut registry);
        Self { registry }
    }

    /// One scrape's body in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        ringfence::exposition::encode(&self.registry, format)
    }
}

/// Start the endpoint if agent.toml has a `[metrics]` table (`Ok(None)`
/// otherwise). Dropping the returned server stops it.
pub async fn start(
    config: &AgentConfig,
    health: &Arc<HealthCell>,
    engine: &crate::tasks::TaskEngine,
    tls: &ringfence::tls::ReloadableServerConfig,
) -> Result<Option<MetricsServer>, MetricsError> {
    let Some(m) = &config.metrics else {
        return Ok(None);
    };
    let host = HostLabels {
        host_id: config.host_id.clone(),
        ring: config.ring,
    };
    let metrics = Metrics::new(host, health.clone(), engine.draining());
    let tls = m.tls.then(|| tls.clone());
    http::start(m.listen, Arc::new(metrics), tls)
        .await
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(listen: &str, tls: bool) -> RawMetricsConfig {
        RawMetricsConfig {
            listen: listen.into(),
            tls,
        }
    }

    #[test]
    fn plain_http_only_on_loopback() {
        assert_eq!(
            raw(DEFAULT_LISTEN, false).validate().unwrap().listen,
            DEFAULT_LISTEN.parse().unwrap()
        );
        raw("[::1]:9465", false).validate().unwrap();
        let err = raw("0.0.0.0:9465", false).validate().unwrap_err();
        assert!(
            matches!(err, MetricsConfigError::NotLoopback { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("tls = true"), "{err}");
        let c = raw("0.0.0.0:9465", true).validate().unwrap();
        assert!(c.tls);
    }

    #[test]
    fn bad_address_is_named() {
        let err = raw("localhost", false).validate().unwrap_err();
        assert_eq!(err.key(), "listen");
        assert!(err.to_string().contains("`localhost`"), "{err}");
    }
}
