//! What the operator sees while a wave runs: the wave engine's events and
//! status snapshots ([`crate::wave::events`]) rendered as a live view on a
//! terminal (indicatif), plain log lines otherwise, or a JSON event stream
//! (`--json`, one object per line on stdout) for automation. Lines for a
//! terminal are escaped ([`crate::hosttext::escape`]): text a host sent
//! cannot move the cursor or overwrite another row of the live view.

use std::io::IsTerminal;
use std::sync::Arc;

use crate::wave::{Event, EventSink, StatusSnapshot};

/// An event as one line of text.
fn line(e: &Event) -> String {
    let mut s = String::new();
    if let Some(r) = e.ring {
        s.push_str(&format!("ring {r} "));
    }
    if let Some(h) = &e.host {
        s.push_str(&format!("{h} "));
    }
    s.push_str(&e.what);
    if !e.detail.is_empty() {
        s.push_str(": ");
        s.push_str(&e.detail);
    }
    crate::hosttext::escape(&s).into_owned()
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
            Mode::Plain => println!("{} {}", fmt_time(e.at_ms), line(e)),
            Mode::Live => {
                if let Some(b) = &self.bar {
                    b.println(format!("{} {}", fmt_time(e.at_ms), line(e)));
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

impl EventSink for Reporter {
    fn emit(&self, e: &Event) {
        Reporter::emit(self, e);
    }
    fn status(&self, s: &StatusSnapshot) {
        Reporter::status(self, s);
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
    let line = format!(
        "{} {} | {} | out of service: {} | failures {}/{} | {}s",
        s.wave_id,
        s.phase,
        rings.join(" "),
        pools.join(", "),
        s.failures.0,
        s.failures.1,
        elapsed
    );
    crate::hosttext::escape(&line).into_owned()
}

fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}
