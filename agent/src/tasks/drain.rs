//! Drain: mark the host draining (journalled first, so health goes
//! NOT_SERVING at once), run the scheduler hook, wait until the scheduler
//! reports no job on the host (`wait_command` exits 0), then wait until no
//! GPU compute process remains or the timeout hits. The host stays drained
//! whatever happens; only an Undrain clears the mark. A drain also clears
//! the last validation: the Undrain after it needs a new one.
//!
//! The mark says who drained the host (the task, its wave, the trust-file
//! id of the coordinator key that signed it), why (the task's reason) and
//! since when; GetIdentity and every report collected while draining carry
//! it. A Drain of a host already draining names itself in the mark but
//! keeps the first drain's time.

use std::time::Duration;

use ringfence::pb::{self, TaskState};
use tokio::time::Instant;

use super::{OnTimeout, Run};
use crate::command::{CommandOutcome, substitute};
use crate::journal::{DrainMark, JournalError};

pub(super) async fn run(run: &mut Run, d: &pb::Drain) -> Result<(), JournalError> {
    let cfg = run.inner.drain.clone();
    let mut deadline = Instant::now() + Duration::from_secs(cfg.timeout_s);
    let existing = run.inner.journal.drain_mark()?;
    let mark = DrainMark {
        task_id: run.status.task_id.clone(),
        wave_id: run.status.wave_id.clone(),
        signed_by: run.coordinator.clone(),
        reason: d.reason.clone(),
        since_unix_ms: existing
            .as_ref()
            .map_or_else(|| run.inner.clock.now_ms(), |m| m.since_unix_ms),
        already_draining: existing.is_some(),
    };
    run.status.set_state(TaskState::Running);
    run.status.step = "mark".into();
    run.status.message = if existing.is_some() {
        "host was already marked draining".into()
    } else {
        "host marked draining".into()
    };
    // Out of service again: an earlier validation no longer vouches for the
    // host; the Undrain that ends this drain needs a new one.
    run.save_with(|t| {
        t.set_drain_mark(Some(&mark))?;
        t.set_last_validation(None)
    })?;

    if !cfg.hook.is_empty() {
        let host_id = run.inner.host_id.clone();
        let argv = match substitute(&cfg.hook, &[("host_id", &host_id), ("reason", &d.reason)]) {
            Ok(a) => a,
            Err(e) => return run.fail(format!("drain hook: {e}; host stays drained")),
        };
        run.step("hook", format!("running drain hook `{}`", argv[0]))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = remaining.min(Duration::from_secs(cfg.hook_timeout_s));
        let timeout = timeout.max(Duration::from_secs(1));
        match run.command("drain hook", argv.clone(), timeout, &[]).await {
            Ok(o) if o.success() => {}
            Ok(o) => {
                return run.fail(format!(
                    "drain hook `{}` {}; host stays drained",
                    argv[0],
                    ended(&o, timeout)
                ));
            }
            Err(e) => return run.fail(format!("{e}; host stays drained")),
        }
    }

    if !cfg.wait_command.is_empty() {
        let host_id = run.inner.host_id.clone();
        let argv = match substitute(
            &cfg.wait_command,
            &[("host_id", &host_id), ("reason", &d.reason)],
        ) {
            Ok(a) => a,
            Err(e) => return run.fail(format!("drain wait_command: {e}; host stays drained")),
        };
        if !wait_scheduler(run, &cfg, argv).await? {
            return Ok(());
        }
        // The process wait's own timeout starts when the scheduler is done.
        deadline = Instant::now() + Duration::from_secs(cfg.timeout_s);
    }

    run.step(
        "wait_processes",
        "waiting for GPU compute processes to exit",
    )?;
    let poll = Duration::from_millis(cfg.poll_ms);
    let mut last_count = None;
    loop {
        let report = match run.fresh_report(true).await {
            Ok(r) => r,
            Err(e) => return run.fail(format!("{e}; host stays drained")),
        };
        let pids: Vec<u32> = report
            .gpus
            .iter()
            .flat_map(|g| g.processes.iter().map(|p| p.pid))
            .collect();
        if pids.is_empty() {
            return run.finish_with(
                TaskState::Succeeded,
                "DRAINED: no GPU compute process remains",
                |_| Ok(()),
            );
        }
        if Instant::now() >= deadline {
            let left = format!(
                "{} GPU compute process(es) remain (pids {})",
                pids.len(),
                pid_list(&pids)
            );
            return match cfg.on_timeout {
                OnTimeout::Fail => run.fail(format!(
                    "drain timed out after {} s: {left}; host stays drained",
                    cfg.timeout_s
                )),
                OnTimeout::Proceed => run.finish_with(
                    TaskState::Succeeded,
                    format!(
                        "DRAINED at the {} s timeout (on_timeout = proceed): {left}",
                        cfg.timeout_s
                    ),
                    |_| Ok(()),
                ),
            };
        }
        if last_count != Some(pids.len()) {
            last_count = Some(pids.len());
            run.status.message = format!(
                "waiting for {} GPU compute process(es) to exit (pids {})",
                pids.len(),
                pid_list(&pids)
            );
            run.save()?;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(poll.min(remaining).max(Duration::from_millis(10))).await;
    }
}

/// Run `wait_command` every `wait_interval_s` until it exits 0 (true) or
/// `wait_timeout_s` passes (the task fails, false). A non-zero exit means
/// "not yet"; its last output line goes into the task's message.
async fn wait_scheduler(
    run: &mut Run,
    cfg: &super::DrainConfig,
    argv: Vec<String>,
) -> Result<bool, JournalError> {
    run.step(
        "wait_scheduler",
        format!(
            "waiting until `{}` reports no job on the host (exit 0)",
            argv[0]
        ),
    )?;
    let deadline = Instant::now() + Duration::from_secs(cfg.wait_timeout_s);
    let interval = Duration::from_secs(cfg.wait_interval_s);
    let mut last_said = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = remaining
            .min(Duration::from_secs(cfg.hook_timeout_s))
            .max(Duration::from_secs(1));
        let last = match run
            .command("drain wait command", argv.clone(), timeout, &[])
            .await
        {
            Ok(o) if o.success() => return Ok(true),
            Ok(o) => ended(&o, timeout),
            Err(e) => {
                run.fail(format!("{e}; host stays drained"))?;
                return Ok(false);
            }
        };
        if Instant::now() >= deadline {
            run.fail(format!(
                "drain timed out after {} s waiting for the scheduler: `{}` {last}; host stays drained",
                cfg.wait_timeout_s, argv[0]
            ))?;
            return Ok(false);
        }
        // One journal write per change of what the command says, not per poll.
        if last_said.as_ref() != Some(&last) {
            run.status.message = format!("waiting for the scheduler: `{}` {last}", argv[0]);
            run.save()?;
            last_said = Some(last);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(interval.min(remaining).max(Duration::from_millis(10))).await;
    }
}

/// Longest output line quoted in a task message (the whole tail is in
/// the status's `output_tail`).
const MAX_QUOTED_CHARS: usize = 400;

/// How a hook or wait command ended, with its last output line:
/// "exited with status 3 (`node gpu-1 is drained by ...`)".
pub(super) fn ended(o: &CommandOutcome, timeout: Duration) -> String {
    let how = o.describe(timeout);
    match o
        .tail
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| !l.is_empty())
    {
        Some(line) if line.chars().count() > MAX_QUOTED_CHARS => {
            let cut: String = line.chars().take(MAX_QUOTED_CHARS).collect();
            format!("{how} ({cut}…)")
        }
        Some(line) => format!("{how} ({line})"),
        None => how,
    }
}

fn pid_list(pids: &[u32]) -> String {
    let mut s: Vec<String> = pids.iter().take(16).map(u32::to_string).collect();
    if pids.len() > 16 {
        s.push("...".into());
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(code: i32, tail: &[&str]) -> CommandOutcome {
        CommandOutcome {
            exit_code: Some(code),
            signal: None,
            timed_out: false,
            tail: tail.iter().map(|l| (*l).to_string()).collect(),
            elapsed: Duration::from_millis(5),
        }
    }

    #[test]
    fn ended_quotes_the_last_non_empty_line_cut_at_400_chars() {
        let t = Duration::from_secs(1);
        assert_eq!(
            ended(&outcome(4, &["first", "node n stays drained", "  "]), t),
            "exited with status 4 (node n stays drained)"
        );
        assert_eq!(ended(&outcome(1, &[]), t), "exited with status 1");
        let long = "x".repeat(1000);
        assert_eq!(
            ended(&outcome(1, &[&long]), t),
            format!("exited with status 1 ({}…)", "x".repeat(MAX_QUOTED_CHARS))
        );
    }
}
