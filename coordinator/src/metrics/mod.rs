//! Prometheus metrics of a running wave (`ringfence wave run|resume
//! --metrics-listen ADDR`): an HTTP `/metrics` endpoint the command serves
//! while it drives the wave.
//!
//! Fed without new calls through the engine: [`WaveMetrics`] is one more
//! [`EventSink`] (beside the CLI's live view, joined by [`Tee`]). The gauges
//! (wave phase, hosts by ring and state, ring states and approvals, failures
//! against the budget, pools out of service against their reserve, the halt)
//! are built at scrape time from the last status snapshot the engine
//! published, the same one `status.json` and `ringfence wave status` show;
//! halts are counted from the engine's `halting` events. The one hook in the
//! engine is [`steps::step_finished`], which times each step of a host's
//! run (`ringfence_wave_step_duration_seconds`).
//!
//! Every series carries `wave_id`. Scrapers that ask for OpenMetrics get it,
//! others the classic text format 0.0.4 (what `promtool check metrics` reads),
//! as from the agent's endpoint.

mod http;
mod series;
pub mod steps;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

pub use http::MetricsServer;
pub use ringfence::exposition::{Format, PATH};
pub use series::{HOST_STATES, RING_STATES, WAVE_PHASES};

use crate::wave::{Event, EventSink, StatusSnapshot};

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listener could not bind.
    #[error(
        "--metrics-listen {addr}: cannot listen: {source}; nothing was started (choose a free address:port, or leave out --metrics-listen)"
    )]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why the bind failed.
        #[source]
        source: std::io::Error,
    },
}

/// A label value as OpenMetrics text quotes it (`\`, `"` and newlines
/// escaped): wave, pool and host names come from the operator's files.
pub(crate) fn label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// What the sink and the collector share.
#[derive(Debug)]
struct Shared {
    wave_id: String,
    latest: Mutex<Option<StatusSnapshot>>,
    halts: AtomicU64,
}

/// The sink that feeds the wave's series.
#[derive(Debug, Clone)]
pub struct WaveMetrics {
    shared: Arc<Shared>,
}

impl EventSink for WaveMetrics {
    fn emit(&self, e: &Event) {
        if e.kind == "halting" {
            self.shared.halts.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn status(&self, s: &StatusSnapshot) {
        series::store(&self.shared.latest, s);
    }
}

/// The registry of one wave's series and the sink that feeds them.
#[derive(Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    sink: WaveMetrics,
}

impl Metrics {
    /// Series of the wave `wave_id` (fed by [`Metrics::sink`]), the step
    /// durations and the build info.
    pub fn new(wave_id: &str) -> Self {
        let shared = Arc::new(Shared {
            wave_id: wave_id.to_owned(),
            latest: Mutex::new(None),
            halts: AtomicU64::new(0),
        });
        let mut registry = Registry::default();
        registry.register(
            "ringfence_build",
            "The coordinator's version",
            Info::new(vec![
                ("version", ringfence::VERSION.to_owned()),
                ("component", "coordinator".to_owned()),
            ]),
        );
        registry.register_with_unit(
            "ringfence_wave_step_duration",
            "How long each step of a host's run took (the host's phase during it), by result (advanced: it did its work; failed: it failed the host)",
            Unit::Seconds,
            steps::STEPS.clone(),
        );
        registry.register_collector(Box::new(series::WaveCollector {
            shared: shared.clone(),
        }));
        Self {
            registry: Arc::new(registry),
            sink: WaveMetrics { shared },
        }
    }

    /// The sink to give the engine (with [`Tee`] beside the live view).
    pub fn sink(&self) -> WaveMetrics {
        self.sink.clone()
    }

    /// One scrape's body in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        ringfence::exposition::encode(&self.registry, format)
    }

    /// Bind `addr` and serve the series at [`PATH`] until the returned
    /// server is dropped.
    pub async fn serve(&self, addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
        http::start(addr, self.registry.clone()).await
    }
}

/// Several sinks as one: each event and snapshot goes to every one, in order.
pub struct Tee(pub Vec<Arc<dyn EventSink>>);

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tee({} sinks)", self.0.len())
    }
}

impl EventSink for Tee {
    fn emit(&self, e: &Event) {
        for s in &self.0 {
            s.emit(e);
        }
    }

    fn status(&self, snapshot: &StatusSnapshot) {
        for s in &self.0 {
            s.status(snapshot);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::wave::{FailureKind, HaltReport, RingView, Stage, TaskStep};

    fn snapshot(phase: &str, halt: Option<HaltReport>) -> StatusSnapshot {
        let ring = |status: &str, counts: &[(&str, usize)], approval: &str| RingView {
            status: status.into(),
            counts: counts.iter().map(|(k, n)| ((*k).into(), *n)).collect(),
            approval: approval.into(),
        };
        StatusSnapshot {
            wave_id: "w\"1".into(),
            phase: phase.into(),
            ring: Some(2),
            rings: BTreeMap::from([
                (0, ring("complete", &[("done", 1)], "not needed")),
                (
                    2,
                    ring(
                        "running",
                        &[("pending", 1), ("failed", 1)],
                        "AWAITING_APPROVAL",
                    ),
                ),
            ]),
            pools: BTreeMap::from([("a100".to_owned(), (2, 3))]),
            failures: (1, 2),
            halt,
            next_window: None,
            break_glass: Vec::new(),
            ring_hosts: BTreeMap::new(),
            profile: "nvidia-driver".into(),
            version: "560.35.03".into(),
            rollback_version: "550.54.15".into(),
            started_at_ms: 1_700_000_000_000,
            updated_at_ms: 1_700_000_005_500,
            approver_threshold: 2,
            hosts: BTreeMap::new(),
        }
    }

    fn has(text: &str, line: &str) {
        assert!(
            text.lines().any(|l| l == line),
            "no line `{line}` in\n{text}"
        );
    }

    #[test]
    fn series_follow_the_last_snapshot_and_the_halting_events() {
        let m = Metrics::new("w\"1");
        let sink = m.sink();
        let before = m.encode(Format::OpenMetrics).unwrap();
        has(&before, r#"ringfence_wave_halts_total{wave_id="w\"1"} 0"#);
        assert!(!before.contains("ringfence_wave_hosts"), "{before}");

        sink.status(&snapshot("awaiting_approval", None));
        let t = m.encode(Format::OpenMetrics).unwrap();
        let w = r#"wave_id="w\"1""#;
        for line in [
            format!(r#"ringfence_wave_hosts{{{w},ring="0",state="done"}} 1"#),
            format!(r#"ringfence_wave_hosts{{{w},ring="0",state="failed"}} 0"#),
            format!(r#"ringfence_wave_hosts{{{w},ring="2",state="failed"}} 1"#),
            format!(r#"ringfence_wave_hosts{{{w},ring="2",state="pending"}} 1"#),
            format!(r#"ringfence_ring_state{{{w},ring="0",state="complete"}} 1"#),
            format!(r#"ringfence_ring_state{{{w},ring="2",state="complete"}} 0"#),
            format!(r#"ringfence_ring_awaiting_approval{{{w},ring="2"}} 1"#),
            format!(r#"ringfence_ring_awaiting_approval{{{w},ring="0"}} 0"#),
            format!(r#"ringfence_wave_phase{{{w},phase="awaiting_approval"}} 1"#),
            format!(r#"ringfence_wave_phase{{{w},phase="running"}} 0"#),
            format!(r#"ringfence_wave_halted{{{w}}} 0"#),
            format!(r#"ringfence_wave_current_ring{{{w}}} 2"#),
            format!(r#"ringfence_wave_failed_hosts{{{w}}} 1"#),
            format!(r#"ringfence_wave_failure_budget_hosts{{{w}}} 2"#),
            format!(r#"ringfence_pool_out_of_service_hosts{{{w},pool="a100"}} 2"#),
            format!(r#"ringfence_pool_reserve_hosts{{{w},pool="a100"}} 3"#),
            format!(r#"ringfence_wave_status_time_seconds{{{w}}} 1700000005.5"#),
            format!(
                r#"ringfence_wave_info{{{w},profile="nvidia-driver",version="560.35.03",rollback_version="550.54.15"}} 1"#
            ),
        ] {
            has(&t, &line);
        }
        assert!(!t.contains("ringfence_wave_halt_info"), "{t}");

        let h = HaltReport {
            wave_id: "w\"1".into(),
            ring: 2,
            host: Some("gpu-03".into()),
            step: Stage::Task(TaskStep::Validate),
            kind: FailureKind::Attestation,
            reason: "ECC".into(),
        };
        sink.emit(&Event::halting(&ringfence::time::SystemClock, &h, 0));
        sink.status(&snapshot("halted", Some(h)));
        let t = m.encode(Format::OpenMetrics).unwrap();
        has(&t, &format!(r#"ringfence_wave_halted{{{w}}} 1"#));
        has(&t, &format!(r#"ringfence_wave_halts_total{{{w}}} 1"#));
        has(
            &t,
            &format!(r#"ringfence_wave_phase{{{w},phase="halted"}} 1"#),
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("ringfence_wave_halt_info{")
                    && l.contains(r#"host="gpu-03""#)),
            "{t}"
        );
        // The classic text for promtool: counter and info families renamed.
        let c = m.encode(Format::Classic).unwrap();
        has(&c, "# TYPE ringfence_wave_halts_total counter");
        has(&c, "# TYPE ringfence_build_info gauge");
    }

    #[test]
    fn a_tee_hands_everything_to_every_sink() {
        let (a, b) = (Metrics::new("w-a"), Metrics::new("w-a"));
        let tee = Tee(vec![Arc::new(a.sink()), Arc::new(b.sink())]);
        tee.emit(&Event::wait(&ringfence::time::SystemClock, "window"));
        tee.status(&snapshot("running", None));
        for m in [&a, &b] {
            let t = m.encode(Format::OpenMetrics).unwrap();
            assert!(t.contains("ringfence_wave_hosts{"), "{t}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
