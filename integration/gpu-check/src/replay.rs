//! The agent's own health collection, run in this process exactly as
//! `ringfenced health --once` runs it (config loaded by `AgentConfig::load`,
//! `CollectorSource`, the real NVML backend): against the host's NVML, or
//! against a private copy of the fake library playing a scenario. Also what
//! "the same health" means when a replay is compared with a capture.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringfence::pb;
use ringfenced::config::AgentConfig;
use ringfenced::daemon::CollectorSource;
use ringfenced::healthcell::ReportSource;
use serde_json::Value;

/// How long a replay waits for the scenario's XID events to arrive.
const XID_WAIT: Duration = Duration::from_secs(5);

/// Replay errors.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// "{0}" (the agent config was refused)
    #[error("{0}")]
    Config(String),
    /// "health collector: {0}"
    #[error("health collector: {0}")]
    Collector(String),
    /// "{path}: {err}"
    #[error("{path}: {err}")]
    Io {
        /// The file that could not be read or written.
        path: PathBuf,
        /// The I/O error.
        err: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ReplayError + '_ {
    move |err| ReplayError::Io {
        path: path.to_owned(),
        err,
    }
}

/// The smallest agent config `ringfenced health --once` accepts: the NVML
/// backend (the system library, or `nvml_library`), `expected_gpus`, a state
/// dir for the XID log. The TLS paths are placeholders: `health` never reads
/// them.
pub fn agent_config(
    host_id: &str,
    state_dir: &Path,
    nvml_library: Option<&Path>,
    expected_gpus: u32,
) -> String {
    let quote = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let library = nvml_library
        .map(|p| format!("nvml_library = {}\n", quote(p)))
        .unwrap_or_default();
    format!(
        "# Minimal config for `ringfenced health --once` (ringfence-gpu-check agent-config).\n\
         host_id = {host}\n\
         state_dir = {state}\n\n\
         [tls]\n\
         cert = \"/nonexistent/host.pem\"\n\
         key = \"/nonexistent/host.key\"\n\
         ca_bundle = \"/nonexistent/ca.pem\"\n\
         trust_domain = \"gpu-check.invalid\"\n\n\
         [gpu]\n\
         backend = \"nvml\"\n\
         {library}\
         expected_gpus = {expected_gpus}\n",
        host = toml::Value::String(host_id.to_owned()),
        state = quote(state_dir),
    )
}

/// A started health collector, as `ringfenced health` starts it.
pub fn start(config_path: &Path) -> Result<CollectorSource, ReplayError> {
    let config = AgentConfig::load(config_path).map_err(|e| ReplayError::Config(e.to_string()))?;
    CollectorSource::start(&config, std::sync::Arc::new(ringfence::time::SystemClock))
        .map_err(|e| ReplayError::Collector(e.to_string()))
}

/// One report, as `ringfenced health --once --json` prints it, read back.
pub fn collect_json(source: &CollectorSource) -> Value {
    ringfenced::healthcell::report_json(&source.collect(false))
}

/// Plays `scenario` through the agent's NVML backend on a private copy of
/// `fake_library`, and returns the report as `health --once --json` prints
/// it. Waits (up to 5 s) until the scenario's `at_s = 0` XIDs have arrived.
pub fn replay(
    scenario: &str,
    fake_library: &Path,
    host_id: &str,
    expected_gpus: u32,
    expected_xids: usize,
) -> Result<Value, ReplayError> {
    let dir = tempfile::tempdir().map_err(io(Path::new("temporary directory")))?;
    // A copy, not a link: the loader shares one instance (and its state) per file.
    let lib = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(fake_library, &lib).map_err(io(fake_library))?;
    let scenario_path = dir.path().join("fake-nvml-scenario.toml");
    std::fs::write(&scenario_path, scenario).map_err(io(&scenario_path))?;
    let state = dir.path().join("state");
    std::fs::create_dir(&state).map_err(io(&state))?;
    let config_path = dir.path().join("agent.toml");
    std::fs::write(
        &config_path,
        agent_config(host_id, &state, Some(&lib), expected_gpus),
    )
    .map_err(io(&config_path))?;
    let source = start(&config_path)?;
    let deadline = Instant::now() + XID_WAIT;
    loop {
        let report = source.collect(false);
        let xids: usize = report.gpus.iter().map(|g| g.xids.len()).sum();
        if xids >= expected_xids || Instant::now() >= deadline {
            return Ok(ringfenced::healthcell::report_json(&report));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a report printed by `health --once --json`.
pub fn parse_report(json: &Value) -> Result<pb::HealthReport, serde_json::Error> {
    serde_json::from_value(json.clone())
}

/// A report with what may differ between two collections of the same GPUs
/// removed: the times (collection, XID arrival), the boot id, the agent
/// version, the agent's configured critical XID list, and the host facts
/// (kernel, uptime, load, memory describe the machine the agent ran on, not
/// its GPUs).
pub fn comparable(report: &pb::HealthReport) -> pb::HealthReport {
    let mut r = report.clone();
    r.collected_at_unix_ms = 0;
    r.boot_id.clear();
    r.agent_version.clear();
    r.critical_xids.clear();
    r.host = None;
    for g in &mut r.gpus {
        for x in &mut g.xids {
            x.at_unix_ms = 0;
            x.boot_id.clear();
        }
    }
    r
}

/// The JSON paths where two reports differ after [`comparable`], each with
/// both values: empty when they report the same health.
pub fn differences(a: &pb::HealthReport, b: &pb::HealthReport) -> Vec<String> {
    let to_json = |r: &pb::HealthReport| serde_json::to_value(comparable(r)).unwrap_or(Value::Null);
    let mut out = Vec::new();
    diff("", &to_json(a), &to_json(b), &mut out);
    out
}

fn diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                diff(
                    &format!("{path}.{k}"),
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff(&format!("{path}[{i}]"), p, q, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} vs {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn minimal_config_is_one_the_agent_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let text = agent_config(
            "gpu-check",
            dir.path(),
            Some(Path::new("/x/lib \"q\".so")),
            3,
        );
        std::fs::write(&path, &text).unwrap();
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.host_id, "gpu-check");
        assert_eq!(c.gpu.expected_gpus, 3);
        assert_eq!(
            c.gpu.nvml_library.as_deref(),
            Some(Path::new("/x/lib \"q\".so"))
        );
        assert_eq!(c.state_dir, dir.path());
    }

    #[test]
    fn differences_ignore_times_and_host_facts_only() {
        let mut a = pb::HealthReport {
            collected_at_unix_ms: 1,
            host: Some(pb::HostFacts {
                uptime_s: 5,
                ..Default::default()
            }),
            gpus: vec![pb::GpuReport {
                temperature_c: Some(40),
                xids: vec![pb::XidEvent {
                    xid: 79,
                    at_unix_ms: 1,
                    boot_id: "a".into(),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut b = a.clone();
        b.collected_at_unix_ms = 2;
        b.host = None;
        b.gpus[0].xids[0].at_unix_ms = 2;
        assert!(differences(&a, &b).is_empty());
        b.gpus[0].temperature_c = Some(41);
        b.gpus[0].xids[0].xid = 48;
        assert_eq!(
            differences(&a, &b),
            [
                ".gpus[0].temperature_c: 40 vs 41",
                ".gpus[0].xids[0].xid: 79 vs 48"
            ]
        );
        a.gpus.clear();
        assert_eq!(differences(&a, &b).len(), 1);
    }
}
