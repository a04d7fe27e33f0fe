//! Undrain: refused while the last validation did not pass (unless the task
//! says `force`, which the verifier only accepts with ring approvals); runs
//! the scheduler's undrain hook, then clears the drain mark.

use std::time::Duration;

use ringfence::pb::{self, TaskState};

use super::Run;
use crate::command::substitute;
use crate::journal::JournalError;

pub(super) async fn run(run: &mut Run, u: &pb::Undrain) -> Result<(), JournalError> {
    run.step("check", "checking the last validation")?;
    let last = run.inner.journal.last_validation()?;
    let forced_note = match (&last, u.force) {
        (Some(v), _) if v.passed => String::new(),
        (_, true) => {
            let what = last.as_ref().map_or_else(
                || "no validation recorded".to_string(),
                |v| format!("last validation {}", v.verdict_name()),
            );
            tracing::warn!("forced undrain despite {what}");
            format!(" (forced despite {what})")
        }
        (Some(v), false) => {
            let why = if v.reasons.is_empty() {
                String::new()
            } else {
                format!(": {}", v.reasons.join("; "))
            };
            return run.fail(format!(
                "undrain refused: the last validation (task `{}`) was {}{why}; a forced undrain needs ring approvals",
                v.task_id,
                v.verdict_name()
            ));
        }
        (None, false) => {
            return run.fail(
                "undrain refused: no passing validation is recorded since the last patch; a forced undrain needs ring approvals",
            );
        }
    };

    let hook = run.inner.drain.undrain_hook.clone();
    if !hook.is_empty() {
        let host_id = run.inner.host_id.clone();
        let argv = match substitute(&hook, &[("host_id", &host_id), ("reason", &u.reason)]) {
            Ok(a) => a,
            Err(e) => return run.fail(format!("undrain hook: {e}; host stays drained")),
        };
        run.step("hook", format!("running undrain hook `{}`", argv[0]))?;
        let timeout = Duration::from_secs(run.inner.drain.hook_timeout_s);
        match run
            .command("undrain hook", argv.clone(), timeout, &[])
            .await
        {
            Ok(o) if o.success() => {}
            Ok(o) => {
                return run.fail(format!(
                    "undrain hook `{}` {}; host stays drained",
                    argv[0],
                    o.describe(timeout)
                ));
            }
            Err(e) => return run.fail(format!("{e}; host stays drained")),
        }
    }
    run.status.step = "clear".into();
    run.finish_with(
        TaskState::Succeeded,
        format!("host back in service{forced_note}"),
        |t| t.set_drain_mark(None),
    )
}
