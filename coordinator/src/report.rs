//! What the operator sees while a wave runs: a live view on a terminal
//! (indicatif), plain log lines otherwise, or a JSON event stream
//! (`--json`, one object per line on stdout) for automation.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::plan::Plan;
use crate::wave::{HaltReport, StatusSnapshot};

/// One thing that happened.
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
    fn new(kind: &str, what: &str, detail: &str) -> Self {
        Self {
            at_ms: ringfence::time::now_ms(),
            kind: kind.into(),
            ring: None,
            host: None,
            what: what.into(),
            detail: detail.into(),
        }
    }
    /// A wave started.
    pub fn started(wave: &str) -> Self {
        Self::new("started", wave, "")
    }
    /// A wave resumed.
    pub fn resumed(wave: &str) -> Self {
        Self::new("resumed", wave, "")
    }
    /// The plan.
    pub fn planned(plan: &Plan) -> Self {
        Self::new(
            "planned",
            &plan.wave_id,
            crate::plan::render_text(plan).trim_end(),
        )
    }
    /// A host event.
    pub fn host(host: &str, what: &str, detail: &str) -> Self {
        let mut e = Self::new("host", what, detail);
        e.host = Some(host.into());
        e
    }
    /// A ring event.
    pub fn ring(ring: u32, what: &str) -> Self {
        let mut e = Self::new("ring", what, "");
        e.ring = Some(ring);
        e
    }
    /// Approvals complete for a ring.
    pub fn approved(ring: u32, approvers: &[String]) -> Self {
        let mut e = Self::new("approved", "approved", &approvers.join(", "));
        e.ring = Some(ring);
        e
    }
    /// Waiting for something.
    pub fn wait(why: &str) -> Self {
        Self::new("wait", "wait", why)
    }
    /// Halting.
    pub fn halting(h: &HaltReport, in_flight: usize) -> Self {
        let mut e = Self::new(
            "halting",
            &h.kind,
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
    pub fn done(wave: &str) -> Self {
        Self::new("done", wave, "every ring complete")
    }
    /// Evidence written.
    pub fn evidence(ring: u32, path: &Path) -> Self {
        let mut e = Self::new("evidence", "written", &path.display().to_string());
        e.ring = Some(ring);
        e
    }
    /// An operator decision on resume.
    pub fn decision(host: &str, what: &str, reason: &str) -> Self {
        let mut e = Self::new("decision", what, reason);
        e.host = Some(host.into());
        e
    }

    fn line(&self) -> String {
        let mut s = String::new();
        if let Some(r) = self.ring {
            s.push_str(&format!("ring {r} "));
        }
        if let Some(h) = &self.host {
            s.push_str(&format!("{h} "));
        }
        s.push_str(&self.what);
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

/// Output mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Live view on a terminal.
    Live,
    /// Plain timestamped lines.
    Plain,
    /// JSON lines.
    Json,
    /// Nothing (tests).
    Quiet,
}

/// Prints events and status in the chosen mode.
#[derive(Debug, Clone)]
pub struct Reporter {
    mode: Mode,
    bar: Option<Arc<indicatif::ProgressBar>>,
}

impl Reporter {
    /// `json`: JSON lines; otherwise live on a terminal, plain lines when not.
    pub fn new(json: bool) -> Self {
        if json {
            return Self::with_mode(Mode::Json);
        }
        if std::io::stderr().is_terminal() {
            Self::with_mode(Mode::Live)
        } else {
            Self::with_mode(Mode::Plain)
        }
    }

    /// A reporter in `mode`.
    pub fn with_mode(mode: Mode) -> Self {
        let bar = (mode == Mode::Live).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            Arc::new(b)
        });
        Self { mode, bar }
    }

    /// Print one event.
    pub fn emit(&self, e: &Event) {
        match self.mode {
            Mode::Json => {
                if let Ok(s) = serde_json::to_string(e) {
                    println!("{s}");
                }
            }
            Mode::Plain => println!("{} {}", fmt_time(e.at_ms), e.line()),
            Mode::Live => {
                if let Some(b) = &self.bar {
                    b.println(format!("{} {}", fmt_time(e.at_ms), e.line()));
                }
            }
            Mode::Quiet => {}
        }
    }

    /// Update the live view with a status snapshot.
    pub fn status(&self, s: &StatusSnapshot) {
        if let Some(b) = &self.bar {
            b.set_message(summary(s));
        }
    }

    /// Stop the live view.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// One line summarising a status snapshot (live view, `wave status`).
pub fn summary(s: &StatusSnapshot) -> String {
    let rings: Vec<String> = s
        .rings
        .iter()
        .map(|(r, v)| {
            let counts: Vec<String> = v.counts.iter().map(|(k, n)| format!("{k} {n}")).collect();
            format!("r{r}:{}[{}]", v.status, counts.join(" "))
        })
        .collect();
    let pools: Vec<String> = s
        .pools
        .iter()
        .map(|(p, (out, max))| format!("{p} {out}/{max}"))
        .collect();
    let elapsed = (s.updated_at_ms - s.started_at_ms).max(0) / 1000;
    format!(
        "{} {} | {} | out of service: {} | failures {}/{} | {}s",
        s.wave_id,
        s.phase,
        rings.join(" "),
        pools.join(", "),
        s.failures.0,
        s.failures.1,
        elapsed
    )
}

fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}
