//! The per-host state machine: one host's way through a wave, from wherever
//! its record says it is to Done or Failed — attest-before → drain → patch
//! → (return after reboot/restart) → validate → (rollback drill) →
//! undrain, or rollback after a failed validation. Each [`Phase`] is one
//! step (task, validate or rollback file); every task is recorded in the
//! wave store before it is sent and its outcome after it is known, so a
//! resumed coordinator re-attaches to the same task ids instead of sending
//! a second patch. Also the host-level work the wave loop starts outside a
//! run: recording a host that could not start, and draining again a host
//! that regressed during its soak.

use std::sync::atomic::Ordering;

use ringfence::pb::{self, task_payload::Action};

use super::model::{Ctx, HostJob, HostRecord, HostRun, HostRunError, Phase, state_name};
use super::outcome::{Failure, FailureKind, Stage, StepResult, TaskStep};
use super::rollback::{drill_repatch, drill_rollback, rollback};
use super::task::{NO_APPROVALS, has_unfinished, run_task, succeeded, task_step};
use super::validate::{attest_before, validate};
use crate::client::HostApi;

/// Drive one host from wherever its record says it is to Done or Failed
/// (or to where the wave's halt stopped it). Returns the final record (also
/// stored).
pub async fn run(ctx: &Ctx, job: &HostJob, api: &dyn HostApi) -> Result<HostRecord, HostRunError> {
    let hr = &HostRun { ctx, job, api };
    let mut rec = ctx.record(job)?;
    if rec.started_at_ms == 0 {
        rec.started_at_ms = ctx.clock.now_ms();
    }
    while !matches!(rec.phase, Phase::Done | Phase::Failed) {
        let (phase, began) = (rec.phase, std::time::Instant::now());
        let result = step(hr, &mut rec).await?;
        if phase != Phase::Pending && result != StepResult::Halted {
            let failed = matches!(result, StepResult::Failed(_));
            let wave = &ctx.params.wave_id;
            crate::metrics::steps::step_finished(wave, phase, failed, began.elapsed());
        }
        match result {
            StepResult::Advance(()) if rec.phase == Phase::Done => {
                rec.finished_at_ms = ctx.clock.now_ms();
                ctx.save(&rec).await?;
            }
            StepResult::Advance(()) => {}
            StepResult::Halted => break,
            StepResult::Failed(failure) => {
                rec.failure = Some(failure);
                rec.finished_at_ms = ctx.clock.now_ms();
                ctx.set_phase(&mut rec, Phase::Failed).await?;
            }
        }
    }
    Ok(rec)
}

/// Carry out the host's current phase. A halt stops a host between steps:
/// before it starts, and before a drain or patch that is not already out.
async fn step(hr: &HostRun<'_>, rec: &mut HostRecord) -> Result<StepResult, HostRunError> {
    let HostRun { ctx, job, .. } = *hr;
    let halted = ctx.halt.load(Ordering::SeqCst);
    let wave = &ctx.params.wave_id;
    match rec.phase {
        Phase::Pending if halted => Ok(StepResult::Halted),
        Phase::Pending => {
            ctx.set_phase(rec, Phase::AttestBefore).await?;
            Ok(StepResult::Advance(()))
        }
        Phase::AttestBefore => attest_before(hr, rec).await,
        Phase::Draining if halted && !has_unfinished(rec, TaskStep::Drain) => {
            Ok(StepResult::Halted)
        }
        Phase::Draining => {
            let action = Action::Drain(pb::Drain {
                reason: format!("ringfence wave {wave}"),
            });
            let step = TaskStep::Drain;
            task_step(hr, rec, step, action, NO_APPROVALS, Phase::Patching).await
        }
        Phase::Patching if halted && !has_unfinished(rec, TaskStep::Patch) => {
            Ok(StepResult::Halted)
        }
        Phase::Patching => {
            let action = Action::Patch(pb::Patch {
                profile: ctx.params.profile.clone(),
                version: ctx.params.version.clone(),
                rollback: false,
            });
            let (step, approvals) = (TaskStep::Patch, job.approvals.as_ref());
            task_step(hr, rec, step, action, approvals, Phase::Validating).await
        }
        Phase::Validating => validate(hr, rec).await,
        Phase::RollingBack => rollback(hr, rec).await,
        Phase::DrillRollback => drill_rollback(hr, rec).await,
        Phase::DrillRepatch => drill_repatch(hr, rec).await,
        Phase::Undraining if rec.already_drained => {
            // Someone else drained it before the wave; it stays drained.
            ctx.set_phase(rec, Phase::Done).await?;
            Ok(StepResult::Advance(()))
        }
        Phase::Undraining => {
            let action = Action::Undrain(pb::Undrain {
                reason: format!("ringfence wave {wave} validated"),
                force: false,
            });
            let step = TaskStep::Undrain;
            task_step(hr, rec, step, action, NO_APPROVALS, Phase::Done).await
        }
        Phase::Done | Phase::Failed => Ok(StepResult::Advance(())),
    }
}

/// Record, durably as a run would, a host that failed before its run could
/// start (not reachable, not enrolled); returns its record.
pub async fn fail_unstarted(
    ctx: &Ctx,
    (host_id, ring, pool): (&str, u32, &str),
    failure: Failure,
) -> Result<HostRecord, HostRunError> {
    let mut rec = ctx
        .store
        .get_host::<HostRecord>(host_id)?
        .unwrap_or_else(|| HostRecord::new(host_id, ring, pool));
    rec.phase = Phase::Failed;
    rec.failure = Some(failure);
    rec.finished_at_ms = ctx.clock.now_ms();
    ctx.save(&rec).await?;
    Ok(rec)
}

/// A host that regressed during its ring's soak had been undrained after
/// validation; a halt leaves the failed host out of service, so drain it
/// again. Records the outcome in the host's failure and returns the record
/// and whether the host is drained.
pub async fn drain_after_soak(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    why: &str,
) -> Result<(HostRecord, bool), HostRunError> {
    let hr = &HostRun { ctx, job, api };
    let mut rec = ctx.record(job)?;
    let action = Action::Drain(pb::Drain {
        reason: format!("ringfence wave {}: soak regression", ctx.params.wave_id),
    });
    let step = TaskStep::SoakDrain;
    let outcome = run_task(hr, &mut rec, step, action, NO_APPROVALS, Vec::new()).await?;
    let (drained, reason) = match outcome {
        StepResult::Advance(s) if succeeded(&s) => (
            true,
            format!(
                "{why}; drained again by the wave (task {}) and left drained for an operator",
                s.task_id
            ),
        ),
        StepResult::Advance(s) => (
            false,
            format!(
                "{why}; the wave's drain task {} ended {}: {}; drain it by hand",
                s.task_id,
                state_name(s.state),
                s.message
            ),
        ),
        StepResult::Failed(f) => (
            false,
            format!(
                "{why}; the wave could not drain it again ({}): drain it by hand",
                f.reason
            ),
        ),
        // A soak drain is sent whatever the halt: it puts a host out of
        // service that should be.
        StepResult::Halted => (
            false,
            format!("{why}; the wave halted before it drained it again: drain it by hand"),
        ),
    };
    rec.failure = Some(Failure::new(
        Stage::Soak,
        FailureKind::SoakRegression,
        reason,
    ));
    rec.phase = Phase::Failed;
    ctx.save(&rec).await?;
    Ok((rec, drained))
}
