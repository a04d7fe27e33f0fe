//! What the wave engine tells the world while it runs: [`Event`]s (also
//! appended to the wave store's audit log) and status snapshots, handed to
//! an [`EventSink`]. The engine defines them; the CLI renders them
//! (`crate::cli::report`: a live view, plain lines or JSON lines).

use std::path::Path;

use ringfence::time::Clock;
use serde::Serialize;

use super::outcome::HaltReport;
use super::status::StatusSnapshot;
use crate::plan::Plan;

/// Where the engine's events and status snapshots go.
pub trait EventSink: Send + Sync {
    /// One thing happened.
    fn emit(&self, e: &Event);
    /// The wave's status changed (written to `status.json` as well).
    fn status(&self, _s: &StatusSnapshot) {}
}

/// One thing that happened. Each constructor takes the wave's clock, which
/// stamps [`at_ms`](Self::at_ms).
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// "started", "planned", "host", "ring", "approved", "wait", "halting", "done", "evidence", "decision", "resumed".
    pub kind: String,
    /// Ring, if about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ring: Option<u32>,
    /// Host, if about one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// What ("start", "done", "failed", "promoted", ...).
    pub what: String,
    /// Details.
    pub detail: String,
}

impl Event {
    fn new(clock: &dyn Clock, kind: &str, what: &str, detail: &str) -> Self {
        Self {
            at_ms: clock.now_ms(),
            kind: kind.into(),
            ring: None,
            host: None,
            what: what.into(),
            detail: crate::hosttext::message(detail),
        }
    }
    /// A wave started.
    pub fn started(clock: &dyn Clock, wave: &str) -> Self {
        Self::new(clock, "started", wave, "")
    }
    /// A wave resumed.
    pub fn resumed(clock: &dyn Clock, wave: &str) -> Self {
        Self::new(clock, "resumed", wave, "")
    }
    /// The plan.
    pub fn planned(clock: &dyn Clock, plan: &Plan) -> Self {
        Self::new(
            clock,
            "planned",
            &plan.wave_id,
            crate::plan::render_text(plan).trim_end(),
        )
    }
    /// A host event.
    pub fn host(clock: &dyn Clock, host: &str, what: &str, detail: &str) -> Self {
        let mut e = Self::new(clock, "host", what, detail);
        e.host = Some(host.into());
        e
    }
    /// A ring event.
    pub fn ring(clock: &dyn Clock, ring: u32, what: &str) -> Self {
        let mut e = Self::new(clock, "ring", what, "");
        e.ring = Some(ring);
        e
    }
    /// Approvals complete for a ring.
    pub fn approved(clock: &dyn Clock, ring: u32, approvers: &[String]) -> Self {
        let mut e = Self::new(clock, "approved", "approved", &approvers.join(", "));
        e.ring = Some(ring);
        e
    }
    /// Waiting for something.
    pub fn wait(clock: &dyn Clock, why: &str) -> Self {
        Self::new(clock, "wait", "wait", why)
    }
    /// Halting.
    pub fn halting(clock: &dyn Clock, h: &HaltReport, in_flight: usize) -> Self {
        let mut e = Self::new(
            clock,
            "halting",
            h.kind.as_str(),
            &format!(
                "{}{} step {}: {} ({} host(s) in flight finish their step)",
                h.host
                    .as_deref()
                    .map(|x| format!("host {x} "))
                    .unwrap_or_default(),
                format_args!("ring {}", h.ring),
                h.step,
                h.reason,
                in_flight
            ),
        );
        e.ring = Some(h.ring);
        e.host = h.host.clone();
        e
    }
    /// Finished.
    pub fn done(clock: &dyn Clock, wave: &str) -> Self {
        Self::new(clock, "done", wave, "every ring complete")
    }
    /// Evidence written.
    pub fn evidence(clock: &dyn Clock, ring: u32, path: &Path) -> Self {
        let mut e = Self::new(clock, "evidence", "written", &path.display().to_string());
        e.ring = Some(ring);
        e
    }
    /// An operator decision on resume.
    pub fn decision(clock: &dyn Clock, host: &str, what: &str, reason: &str) -> Self {
        let mut e = Self::new(clock, "decision", what, reason);
        e.host = Some(host.into());
        e
    }
}
