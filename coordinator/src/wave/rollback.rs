//! Putting a host back on its previous version: the rollback after a
//! failed validation (`on_failure = "rollback"`), the ring-0 rollback drill
//! (patch, roll back, re-patch, each validated) and `ringfence wave
//! rollback` by hand. A rollback is a Patch task with `rollback = true`
//! toward the spec's `rollback_version`, else the driver version the host
//! attested before the wave; the host stays drained for an operator.
//!
//! The host commands by hand live here too: `ringfence hosts drain`
//! ([`drain_by_hand`]) and `ringfence hosts undrain` ([`undrain_by_hand`]:
//! a fresh Validate first, back into service only when HEALTHY, or forced
//! with ring approvals).

use ringfence::pb::{self, task_payload::Action};

use super::model::{
    AttestationRecord, Ctx, HostJob, HostRecord, HostRun, HostRunError, Phase, state_name,
};
use super::outcome::{Failure, FailureKind, StepResult, TaskStep, advance};
use super::task::{NO_APPROVALS, run_task, succeeded};
use super::validate::validate_step;
use crate::client::HostApi;

/// The version a rollback returns to: the spec's `rollback_version`, else the
/// driver version the host attested before the patch.
fn rollback_target(ctx: &Ctx, rec: &HostRecord) -> Option<String> {
    if ctx.params.rollback_version.is_empty() {
        rec.before.as_ref().map(|b| b.driver_version.clone())
    } else {
        Some(ctx.params.rollback_version.clone())
    }
}

fn cuda_before(rec: &HostRecord) -> String {
    rec.before
        .as_ref()
        .map(|b| b.cuda_version.clone())
        .unwrap_or_default()
}

/// Run the step's task (with the ring's approvals when it patches) and
/// fail unless it ended SUCCEEDED; the reason starts with the step's name
/// (`drain` for the drain before a rollback by hand).
async fn task_succeeds(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
    step: TaskStep,
    action: Action,
) -> Result<StepResult, HostRunError> {
    let HostRun { job, .. } = *hr;
    let approvals = if matches!(action, Action::Patch(_)) {
        job.approvals.as_ref()
    } else {
        NO_APPROVALS
    };
    let label = match step {
        TaskStep::ManualDrain => "drain",
        other => other.as_str(),
    };
    Ok(
        match run_task(hr, rec, step, action, approvals, Vec::new()).await? {
            StepResult::Advance(s) if succeeded(&s) => StepResult::Advance(()),
            StepResult::Advance(s) => StepResult::Failed(Failure::new(
                step,
                FailureKind::TaskFailed,
                format!("{label} task ended {}: {}", state_name(s.state), s.message),
            )),
            StepResult::Failed(f) => StepResult::Failed(Failure {
                reason: format!("{label}: {}", f.reason),
                ..f
            }),
            StepResult::Halted => StepResult::Halted,
        },
    )
}

/// Patch toward `version` (a rollback when `rollback`), then validate the
/// host against `expect` (driver, CUDA). A failure's reason says which part
/// failed: `{patch step} ...` or `validation of {version}: ...`.
async fn patch_then_validate(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
    (patch_step, validate_name): (TaskStep, TaskStep),
    (version, rollback): (&str, bool),
    expect: (&str, &str),
) -> Result<StepResult<AttestationRecord>, HostRunError> {
    let HostRun { ctx, .. } = *hr;
    let action = Action::Patch(pb::Patch {
        profile: ctx.params.profile.clone(),
        version: version.to_string(),
        rollback,
    });
    advance!(task_succeeds(hr, rec, patch_step, action).await);
    Ok(match validate_step(hr, rec, validate_name, expect).await? {
        StepResult::Failed(f) => StepResult::Failed(Failure {
            reason: format!("validation of {version}: {}", f.reason),
            ..f
        }),
        other => other,
    })
}

/// The RollingBack phase: roll the host that failed validation back and
/// validate the old version; either way the host fails (left drained), its
/// failure saying how the rollback went.
pub(super) async fn rollback(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
) -> Result<StepResult, HostRunError> {
    let HostRun { ctx, .. } = *hr;
    let original = rec.failure.clone();
    let Some(previous) = rollback_target(ctx, rec) else {
        return Ok(match original {
            Some(f) => StepResult::Failed(f),
            None => StepResult::Advance(()),
        });
    };
    let mut failure = original.unwrap_or(Failure::new(
        TaskStep::Validate,
        FailureKind::Attestation,
        "validation failed",
    ));
    let cuda = cuda_before(rec);
    let steps = (TaskStep::Rollback, TaskStep::RollbackValidate);
    let expect = (previous.as_str(), cuda.as_str());
    match patch_then_validate(hr, rec, steps, (&previous, true), expect).await? {
        StepResult::Advance(after) => {
            failure.reason = format!(
                "{}; rolled back to {} and attested {} (left drained)",
                failure.reason, previous, after.verdict
            );
            rec.after = Some(after);
        }
        StepResult::Failed(why) => {
            failure.reason = format!("{}; rollback failed: {}", failure.reason, why.reason);
        }
        StepResult::Halted => return Ok(StepResult::Halted),
    }
    Ok(StepResult::Failed(failure))
}

/// Drill, first half: roll the freshly patched host back and prove the old
/// version healthy.
pub(super) async fn drill_rollback(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
) -> Result<StepResult, HostRunError> {
    let HostRun { ctx, .. } = *hr;
    let drill_failure = |reason: String| {
        StepResult::Failed(Failure::new(
            TaskStep::DrillRollback,
            FailureKind::Drill,
            reason,
        ))
    };
    let Some(previous) = rollback_target(ctx, rec) else {
        return Ok(drill_failure("no version to roll back to".into()));
    };
    let cuda = cuda_before(rec);
    let steps = (TaskStep::DrillRollback, TaskStep::DrillRollbackValidate);
    let expect = (previous.as_str(), cuda.as_str());
    Ok(
        match patch_then_validate(hr, rec, steps, (&previous, true), expect).await? {
            StepResult::Advance(att) => {
                rec.drill.push(att);
                ctx.set_phase(rec, Phase::DrillRepatch).await?;
                StepResult::Advance(())
            }
            StepResult::Failed(why) => drill_failure(why.reason),
            StepResult::Halted => StepResult::Halted,
        },
    )
}

/// Drill, second half: patch forward again and prove the new version healthy.
pub(super) async fn drill_repatch(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
) -> Result<StepResult, HostRunError> {
    let HostRun { ctx, .. } = *hr;
    let p = ctx.params.clone();
    let steps = (TaskStep::DrillRepatch, TaskStep::DrillRepatchValidate);
    let expect = (
        p.expect_driver_version.as_str(),
        p.expect_cuda_version.as_str(),
    );
    Ok(
        match patch_then_validate(hr, rec, steps, (&p.version, false), expect).await? {
            StepResult::Advance(att) => {
                rec.drill.push(att);
                ctx.set_phase(rec, Phase::Undraining).await?;
                StepResult::Advance(())
            }
            StepResult::Failed(why) => StepResult::Failed(Failure::new(
                TaskStep::DrillRepatch,
                FailureKind::Drill,
                why.reason,
            )),
            StepResult::Halted => StepResult::Halted,
        },
    )
}

/// `ringfence wave rollback`: patch one host back by hand. The host is
/// drained (a no-op if it already is), patched with `rollback = true` toward
/// the wave's `rollback_version` (else the driver version it attested before
/// the wave), validated against that version, and left drained for an
/// operator. Every task is recorded in the host's wave record, written ahead
/// like any other step. Returns the record and, if the rollback did not
/// prove the old version healthy, why.
pub async fn rollback_by_hand(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
) -> Result<(HostRecord, Option<Failure>), HostRunError> {
    let hr = &HostRun { ctx, job, api };
    let mut rec = ctx.record(job)?;
    let Some(target) = rollback_target(ctx, &rec).filter(|v| !v.is_empty()) else {
        return Ok((
            rec,
            Some(Failure::new(
                TaskStep::Rollback,
                FailureKind::ManualRollback,
                "no version to roll back to: the wave spec has no rollback_version and the host never attested before the wave",
            )),
        ));
    };
    if rec.started_at_ms == 0 {
        rec.started_at_ms = ctx.clock.now_ms();
    }
    let drain = Action::Drain(pb::Drain {
        reason: format!("ringfence wave {} rollback by hand", ctx.params.wave_id),
    });
    let outcome = match task_succeeds(hr, &mut rec, TaskStep::ManualDrain, drain).await? {
        StepResult::Advance(()) => {
            let cuda = cuda_before(&rec);
            let steps = (TaskStep::ManualRollback, TaskStep::ManualRollbackValidate);
            let expect = (target.as_str(), cuda.as_str());
            patch_then_validate(hr, &mut rec, steps, (&target, true), expect)
                .await?
                .map(|att| {
                    let verdict = att.verdict.clone();
                    rec.after = Some(att);
                    verdict
                })
        }
        other => other.map(|()| String::new()),
    };
    let failure = match outcome {
        StepResult::Advance(verdict) => Failure::new(
            TaskStep::Rollback,
            FailureKind::ManualRollback,
            format!(
                "rolled back by hand to {target} and attested {verdict}; left drained for an operator"
            ),
        ),
        failed => {
            let why = match failed {
                StepResult::Failed(f) => f.reason,
                // Only the wave's own drain and patch stop at a halt.
                _ => "the wave halted".to_string(),
            };
            Failure::new(
                TaskStep::Rollback,
                FailureKind::ManualRollbackFailed,
                format!("rollback by hand to {target} failed: {why}; left drained"),
            )
        }
    };
    let failed = failure.kind == FailureKind::ManualRollbackFailed;
    rec.failure = Some(failure.clone());
    rec.phase = Phase::Failed;
    rec.finished_at_ms = ctx.clock.now_ms();
    ctx.save(&rec).await?;
    Ok((rec, failed.then_some(failure)))
}

/// How `ringfence hosts undrain` ended.
#[derive(Debug, Clone, PartialEq)]
pub enum UndrainOutcome {
    /// Validated HEALTHY and back in service.
    Undrained,
    /// Validation failed; forced back into service with ring approvals.
    Forced {
        /// Why the validation failed.
        validation: String,
    },
    /// Left drained: why (a failed validation without `--force`, or the
    /// agent refused or failed the Undrain).
    Refused(Failure),
}

/// `ringfence hosts drain`: take one host out of service by hand, the
/// operator's note in the Drain's reason (the agent's drain mark keeps it).
pub async fn drain_by_hand(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    reason: &str,
) -> Result<(HostRecord, Option<Failure>), HostRunError> {
    let hr = &HostRun { ctx, job, api };
    let mut rec = ctx.record(job)?;
    let drain = Action::Drain(pb::Drain {
        reason: reason.to_string(),
    });
    let failure = match task_succeeds(hr, &mut rec, TaskStep::ManualDrain, drain).await? {
        StepResult::Advance(()) => None,
        StepResult::Failed(f) => Some(f),
        StepResult::Halted => None,
    };
    ctx.save(&rec).await?;
    Ok((rec, failure))
}

/// `ringfence hosts undrain`: validate the host (a Validate task, its
/// attestation verified with the enrolled key and a fresh nonce, as a wave
/// does) and undrain it only when HEALTHY. With `force`, a host that does
/// not validate is undrained with `force = true` and the job's ring
/// approvals attached (the agent accepts a forced Undrain only with them).
pub async fn undrain_by_hand(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    reason: &str,
    force: bool,
) -> Result<(HostRecord, UndrainOutcome), HostRunError> {
    let hr = &HostRun { ctx, job, api };
    let mut rec = ctx.record(job)?;
    let forced = match validate_step(hr, &mut rec, TaskStep::Validate, ("", "")).await? {
        StepResult::Advance(att) => {
            rec.after = Some(att);
            None
        }
        StepResult::Failed(f) if force => Some(f.reason),
        StepResult::Failed(f) => {
            ctx.save(&rec).await?;
            return Ok((rec, UndrainOutcome::Refused(f)));
        }
        StepResult::Halted => None,
    };
    let action = Action::Undrain(pb::Undrain {
        reason: reason.to_string(),
        force: forced.is_some(),
    });
    let approvals = if forced.is_some() {
        job.approvals.as_ref()
    } else {
        NO_APPROVALS
    };
    let outcome = match run_task(
        hr,
        &mut rec,
        TaskStep::Undrain,
        action,
        approvals,
        Vec::new(),
    )
    .await?
    {
        StepResult::Advance(s) if succeeded(&s) => match forced {
            Some(validation) => UndrainOutcome::Forced { validation },
            None => UndrainOutcome::Undrained,
        },
        StepResult::Advance(s) => UndrainOutcome::Refused(Failure::new(
            TaskStep::Undrain,
            FailureKind::TaskFailed,
            format!("undrain task ended {}: {}", state_name(s.state), s.message),
        )),
        StepResult::Failed(f) => UndrainOutcome::Refused(f),
        StepResult::Halted => UndrainOutcome::Refused(Failure::new(
            TaskStep::Undrain,
            FailureKind::Operator,
            "halted",
        )),
    };
    ctx.save(&rec).await?;
    Ok((rec, outcome))
}
