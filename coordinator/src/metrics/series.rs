//! The wave's series, built at each scrape from the last status snapshot
//! the engine published (the one `status.json` holds) and the halts the
//! sink counted. Enumerated states (wave phase, ring state, hosts by state)
//! have a series for every state, so that a state's first host or first
//! moment is a change of value, not a new series.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Unit;

use super::{Shared, label_value};
use crate::wave::StatusSnapshot;

/// The phases a status snapshot names (`StatusSnapshot::phase`).
pub const WAVE_PHASES: [&str; 8] = [
    "running",
    "awaiting_approval",
    "waiting_window",
    "soaking",
    "halting",
    "halted",
    "completed",
    "aborted",
];

/// A ring's states (`RingView::status`).
pub const RING_STATES: [&str; 4] = ["waiting", "running", "soaking", "complete"];

/// A host's states in a wave (`RingView::counts`).
pub const HOST_STATES: [&str; 5] = ["pending", "inflight", "done", "failed", "skipped"];

type Labels = Vec<(&'static str, String)>;

/// One gauge family's samples, written only when it has at least one.
struct Gauges {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    rows: Vec<(Labels, f64)>,
}

impl Gauges {
    fn new(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            help,
            unit: None,
            rows: Vec::new(),
        }
    }

    fn seconds(mut self) -> Self {
        self.unit = Some(Unit::Seconds);
        self
    }

    fn push(&mut self, labels: Labels, v: f64) {
        self.rows.push((labels, v));
    }

    fn write(&self, encoder: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let mut m = encoder.encode_descriptor(
            self.name,
            self.help,
            self.unit.as_ref(),
            MetricType::Gauge,
        )?;
        for (labels, v) in &self.rows {
            let e = m.encode_family(labels)?;
            // Counts and flags as whole numbers (`3`, not `3.0`).
            if v.fract() == 0.0 && v.abs() < 9.0e15 {
                ConstGauge::new(*v as i64).encode(e)?;
            } else {
                ConstGauge::new(*v).encode(e)?;
            }
        }
        Ok(())
    }
}

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

fn count(n: usize) -> f64 {
    // Host counts are far below 2^52: exact as f64.
    n as f64
}

/// Whether the snapshot shows a halted (or halting) wave.
pub fn halted(s: &StatusSnapshot) -> bool {
    s.halt.is_some() || s.phase == "halted" || s.phase == "halting"
}

/// The gauge families of one snapshot.
fn families(s: &StatusSnapshot) -> Vec<Gauges> {
    let wave = || ("wave_id", label_value(&s.wave_id));
    let mut phase = Gauges::new(
        "ringfence_wave_phase",
        "The wave's phase: 1 for the current one, 0 for the others.",
    );
    let mut phases: Vec<&str> = WAVE_PHASES.to_vec();
    if !phases.contains(&s.phase.as_str()) {
        phases.push(&s.phase);
    }
    for p in phases {
        phase.push(vec![wave(), ("phase", label_value(p))], flag(s.phase == p));
    }
    let mut halted_g = Gauges::new(
        "ringfence_wave_halted",
        "1 while the wave is halted or halting (a host failed validation or its soak, the failure budget is spent, or an operator halted it), else 0.",
    );
    halted_g.push(vec![wave()], flag(halted(s)));
    let mut current = Gauges::new(
        "ringfence_wave_current_ring",
        "The first ring not complete yet (absent once every ring is).",
    );
    if let Some(r) = s.ring {
        current.push(vec![wave()], f64::from(r));
    }
    let mut failures = Gauges::new(
        "ringfence_wave_failed_hosts",
        "Hosts of the wave that failed so far (they count against the failure budget).",
    );
    failures.push(vec![wave()], f64::from(s.failures.0));
    let mut budget = Gauges::new(
        "ringfence_wave_failure_budget_hosts",
        "Failed hosts the wave tolerates (its spec's failure_budget); one more halts it.",
    );
    budget.push(vec![wave()], f64::from(s.failures.1));
    let mut started = Gauges::new(
        "ringfence_wave_start_time",
        "When the wave started, seconds since the epoch.",
    )
    .seconds();
    let mut updated = Gauges::new(
        "ringfence_wave_status_time",
        "When the engine last published the wave's status, seconds since the epoch.",
    )
    .seconds();
    if s.started_at_ms > 0 {
        started.push(vec![wave()], s.started_at_ms as f64 / 1000.0);
    }
    updated.push(vec![wave()], s.updated_at_ms as f64 / 1000.0);
    let mut grants = Gauges::new(
        "ringfence_wave_break_glass_grants",
        "Break-glass approvals the wave runs under (expired ones included).",
    );
    grants.push(vec![wave()], count(s.break_glass.len()));

    let mut hosts = Gauges::new(
        "ringfence_wave_hosts",
        "Hosts of the wave by ring and state (pending, inflight, done, failed, skipped).",
    );
    let mut ring_state = Gauges::new(
        "ringfence_ring_state",
        "Each ring's state (waiting, running, soaking, complete): 1 for the current one, 0 for the others.",
    );
    let mut awaiting = Gauges::new(
        "ringfence_ring_awaiting_approval",
        "1 while a protected ring lacks its approvals, else 0.",
    );
    for (r, v) in &s.rings {
        let ring = || ("ring", r.to_string());
        let mut states: Vec<&str> = HOST_STATES.to_vec();
        for k in v.counts.keys() {
            if !states.contains(&k.as_str()) {
                states.push(k);
            }
        }
        for st in states {
            let n = v.counts.get(st).copied().unwrap_or(0);
            hosts.push(vec![wave(), ring(), ("state", label_value(st))], count(n));
        }
        let mut states: Vec<&str> = RING_STATES.to_vec();
        if !states.contains(&v.status.as_str()) {
            states.push(&v.status);
        }
        for st in states {
            ring_state.push(
                vec![wave(), ring(), ("state", label_value(st))],
                flag(v.status == st),
            );
        }
        awaiting.push(
            vec![wave(), ring()],
            flag(v.approval == "AWAITING_APPROVAL"),
        );
    }

    let mut out = Gauges::new(
        "ringfence_pool_out_of_service_hosts",
        "Hosts of the pool out of service now: this wave's in flight, failed and left drained, those drained or unhealthy before it, and other waves'.",
    );
    let mut reserve = Gauges::new(
        "ringfence_pool_reserve_hosts",
        "Hosts of the pool its capacity reserve lets be out of service at once (floor(size x reserve_percent / 100), or a break-glass limit in force): at this many, waves start no further host there.",
    );
    for (p, (n, limit)) in &s.pools {
        let pool = || ("pool", label_value(p));
        out.push(vec![wave(), pool()], count(*n));
        reserve.push(vec![wave(), pool()], count(*limit));
    }
    vec![
        phase, halted_g, current, failures, budget, started, updated, grants, hosts, ring_state,
        awaiting, out, reserve,
    ]
}

/// Series of the last snapshot and the halts counted.
#[derive(Debug)]
pub(super) struct WaveCollector {
    pub(super) shared: Arc<Shared>,
}

impl Collector for WaveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let sh = &self.shared;
        let mut m = encoder.encode_descriptor(
            "ringfence_wave_halts",
            "Halts of the wave this process saw (a halted wave resumed and halted again counts again).",
            None,
            MetricType::Counter,
        )?;
        let wave = vec![("wave_id", label_value(&sh.wave_id))];
        ConstCounter::new(sh.halts.load(Ordering::Relaxed)).encode(m.encode_family(&wave)?)?;
        let snapshot = sh
            .latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(s) = snapshot else {
            return Ok(());
        };
        let m = encoder.encode_descriptor(
            "ringfence_wave",
            "The wave: its patch profile, version and rollback version.",
            None,
            MetricType::Info,
        )?;
        Info::new(vec![
            ("wave_id", label_value(&s.wave_id)),
            ("profile", label_value(&s.profile)),
            ("version", label_value(&s.version)),
            ("rollback_version", label_value(&s.rollback_version)),
        ])
        .encode(m)?;
        if let Some(h) = &s.halt {
            let m = encoder.encode_descriptor(
                "ringfence_wave_halt",
                "Why the wave halted: the failure kind, ring, host (empty for an operator's halt) and stage.",
                None,
                MetricType::Info,
            )?;
            Info::new(vec![
                ("wave_id", label_value(&s.wave_id)),
                ("kind", label_value(h.kind.as_str())),
                ("ring", h.ring.to_string()),
                ("host", label_value(h.host.as_deref().unwrap_or(""))),
                ("stage", h.step.as_str().to_owned()),
            ])
            .encode(m)?;
        }
        for f in families(&s) {
            f.write(&mut encoder)?;
        }
        Ok(())
    }
}

/// The sample lock guards only a clone.
pub(super) fn store(latest: &Mutex<Option<StatusSnapshot>>, s: &StatusSnapshot) {
    *latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(s.clone());
}
