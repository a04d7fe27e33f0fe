//! Undrain: back into service only after a fresh, genuine validation. A
//! plain Undrain is refused unless the last validation (cleared by every
//! Drain and Patch) passed and is younger than the trust policy's
//! `max_task_lifetime_s`; `force` skips that, and the verifier accepts a
//! forced Undrain only with ring approvals. Then it runs the scheduler's
//! undrain hook and clears the drain mark.
//!
//! A refusal fails the task with a message ``undrain refused by `<reason>`: …``
//! whose reason is stable: `no_validation`, `validation_failed` or
//! `validation_stale`.

use std::time::Duration;

use ringfence::pb::{self, TaskState};

use super::Run;
use crate::command::substitute;
use crate::journal::{JournalError, ValidationRecord};

/// Why a plain Undrain is refused (the stable reason in the task message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UndrainRefusal {
    /// no validation since the last drain or patch
    #[error(
        "undrain refused by `no_validation`: no validation is recorded since the last drain or patch; a forced undrain needs ring approvals"
    )]
    NoValidation,
    /// the last validation did not pass
    #[error(
        "undrain refused by `validation_failed`: the last validation (task `{task_id}`) was {verdict}{why}; a forced undrain needs ring approvals"
    )]
    Failed {
        task_id: String,
        verdict: &'static str,
        why: String,
    },
    /// the last validation is older than the task lifetime cap
    #[error(
        "undrain refused by `validation_stale`: the last validation (task `{task_id}`) is {age_s} s old, more than the {cap_s} s task lifetime cap; validate again"
    )]
    Stale {
        task_id: String,
        age_s: i64,
        cap_s: u64,
    },
}

impl UndrainRefusal {
    /// The stable name of the reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoValidation => "no_validation",
            Self::Failed { .. } => "validation_failed",
            Self::Stale { .. } => "validation_stale",
        }
    }
}

/// Whether `last` lets a plain Undrain through at `now_ms`.
fn check(last: Option<&ValidationRecord>, now_ms: i64, cap_s: u64) -> Result<(), UndrainRefusal> {
    let Some(v) = last else {
        return Err(UndrainRefusal::NoValidation);
    };
    if !v.passed {
        return Err(UndrainRefusal::Failed {
            task_id: v.task_id.clone(),
            verdict: v.verdict_name(),
            why: if v.reasons.is_empty() {
                String::new()
            } else {
                format!(": {}", v.reasons.join("; "))
            },
        });
    }
    let age_ms = now_ms.saturating_sub(v.at_unix_ms);
    let cap_ms = i64::try_from(cap_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    if age_ms > cap_ms {
        return Err(UndrainRefusal::Stale {
            task_id: v.task_id.clone(),
            age_s: age_ms / 1000,
            cap_s,
        });
    }
    Ok(())
}

pub(super) async fn run(run: &mut Run, u: &pb::Undrain) -> Result<(), JournalError> {
    run.step("check", "checking the last validation")?;
    let last = run.inner.journal.last_validation()?;
    let now = run.inner.clock.now_ms();
    let cap_s = run.inner.trust_now().policy.max_task_lifetime_s;
    let forced_note = match (check(last.as_ref(), now, cap_s), u.force) {
        (Ok(()), _) => String::new(),
        (Err(refusal), true) => {
            let what = refusal.reason();
            tracing::warn!(approvers = ?run.approvers, "forced undrain despite {what}");
            format!(" (forced despite {what})")
        }
        (Err(refusal), false) => {
            tracing::warn!(reason = refusal.reason(), "{refusal}");
            return run.fail(refusal.to_string());
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
                    super::drain::ended(&o, timeout)
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
