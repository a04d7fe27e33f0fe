//! What the operator sees while a wave runs: the wave engine's events and
//! status snapshots ([`crate::wave::events`]) rendered as a live view on a
//! terminal (indicatif), plain log lines otherwise, or a JSON event stream
//! (`--json`, one object per line on stdout) for automation. Lines for a
//! terminal are escaped ([`crate::hosttext::escape`]): text a host sent
//! cannot move the cursor or overwrite another row of the live view.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use crate::wave::{Event, EventSink, StatusSnapshot};

/// An event as text: one line; the plan (`planned`, the coordinator's own
/// text from the operator's inventory and spec, escaped when the event was
/// made) as its lines indented below it.
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
    let s = crate::hosttext::escape(&s).into_owned();
    if e.kind == "planned" {
        s.replace("\\u{a}", "\n    ")
    } else {
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
    /// The state of the last wait line printed ([`wait_state`]): a
    /// countdown prints one line per state, not one per second.
    last_wait: Arc<Mutex<Option<String>>>,
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
        Self {
            mode,
            bar,
            last_wait: Arc::default(),
        }
    }

    /// Whether `e` is worth a line of text: a wait whose state (its text
    /// without the countdown's numbers) is the one printed last is not;
    /// any other event starts a new state.
    fn is_news(&self, e: &Event) -> bool {
        let Ok(mut last) = self.last_wait.lock() else {
            return true;
        };
        if e.kind != "wait" {
            *last = None;
            return true;
        }
        let state = wait_state(&e.detail);
        if last.as_deref() == Some(state.as_str()) {
            return false;
        }
        *last = Some(state);
        true
    }

    /// Print one event.
    pub fn emit(&self, e: &Event) {
        match self.mode {
            Mode::Json => {
                if let Ok(s) = serde_json::to_string(e) {
                    print_line(&s);
                }
            }
            Mode::Plain => {
                if self.is_news(e) {
                    print_line(&format!("{} {}", fmt_time(e.at_ms), line(e)));
                }
            }
            Mode::Live => {
                if let Some(b) = &self.bar {
                    if self.is_news(e) {
                        b.println(format!("{} {}", fmt_time(e.at_ms), line(e)));
                    } else {
                        // The countdown lives in the spinner's line.
                        b.set_message(line(e));
                    }
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

/// A wait's state: its text with the numbers of a countdown (`42 s left`)
/// replaced, so that "ring 1 soaking, 42 s left" and "…, 41 s left" are one
/// state and "ring 1 soak time passed; …" another.
fn wait_state(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len());
    let mut rest = detail;
    while let Some(i) = rest.find(|c: char| c.is_ascii_digit()) {
        out.push_str(&rest[..i]);
        let digits = rest[i..]
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len() - i);
        let after = &rest[i + digits..];
        if after.starts_with(" s ") || after == " s" || after.starts_with(" s,") {
            out.push('#');
        } else {
            out.push_str(&rest[i..i + digits]);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// One line to stdout; a reader that went away (`| head -1`) ends the
/// output quietly instead of a panic.
fn print_line(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{s}");
}

fn fmt_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(detail: &str) -> Event {
        Event::wait(&ringfence::time::SystemClock, detail)
    }

    #[test]
    fn a_countdown_is_one_state_and_its_numbers_are_not_the_state() {
        assert_eq!(
            wait_state("ring 1 soaking, 42 s left"),
            wait_state("ring 1 soaking, 7 s left")
        );
        assert_eq!(
            wait_state("ring 1 soaking, 42 s left"),
            "ring 1 soaking, # s left"
        );
        assert_ne!(
            wait_state("ring 1 soaking, 42 s left"),
            wait_state("ring 2 soaking, 42 s left")
        );
        assert_eq!(
            wait_state("waiting for 2 approvals of ring 3"),
            "waiting for 2 approvals of ring 3"
        );
    }

    #[test]
    fn a_plan_prints_as_indented_lines_and_host_text_stays_escaped() {
        let mut plan = Event::wait(&ringfence::time::SystemClock, "x");
        plan.kind = "planned".into();
        plan.what = "w".into();
        plan.detail = crate::hosttext::message("wave w\nring 0: 1 host(s)");
        assert_eq!(line(&plan), "w: wave w\n    ring 0: 1 host(s)");
        let e = Event::host(
            &ringfence::time::SystemClock,
            "h1",
            "failed",
            "first\nsecond \u{1b}[2J",
        );
        assert_eq!(line(&e), "h1 failed: first\\u{a}second \\u{1b}[2J");
    }

    #[test]
    fn plain_output_prints_one_line_per_state_change_not_one_per_second() {
        let r = Reporter::with_mode(Mode::Plain);
        let printed: Vec<bool> = [
            wait("ring 1 soaking, 30 s left"),
            wait("ring 1 soaking, 29 s left"),
            wait("ring 1 soaking, 28 s left"),
            wait("ring 1 soak time passed; waiting for the first health report of 1 host(s)"),
            Event::ring(&ringfence::time::SystemClock, 1, "promoted"),
            wait("ring 2 soaking, 30 s left"),
            wait("ring 2 soaking, 29 s left"),
            Event::host(&ringfence::time::SystemClock, "h1", "start", ""),
            wait("ring 2 soaking, 12 s left"),
        ]
        .iter()
        .map(|e| r.is_news(e))
        .collect();
        assert_eq!(
            printed,
            [true, false, false, true, true, true, false, true, true]
        );
    }
}
