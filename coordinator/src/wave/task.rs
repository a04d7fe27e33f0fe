//! Tasks of a host's run: sign a task for a step with the coordinator key
//! ([`Signer`](super::model::Signer)), record it in the host's wave record
//! before it leaves (write-ahead), send it, and wait for its end. A resumed
//! coordinator re-attaches to the recorded, unfinished task of a step by
//! its id instead of signing a second one.

use std::sync::atomic::Ordering;

use prost::Message;
use ringfence::envelope::{self, TASK_TYPE};
use ringfence::pb::{self, task_payload::Action};

use super::model::{
    Ctx, HostRecord, HostRun, HostRunError, Phase, TaskOutcome, TaskRef, state_name,
};
use super::outcome::{Failure, FailureKind, Stage, StepResult, TaskStep, advance};
use crate::approvals::ApprovalSet;
use crate::client::{ClientError, HostApi};
use crate::hosttext;

/// For tasks that never carry approvals (drain, validate, plain undrain).
pub(super) const NO_APPROVALS: &ApprovalSet = &ApprovalSet::empty();

/// Whether a task ended SUCCEEDED.
pub(super) fn succeeded(s: &pb::TaskStatus) -> bool {
    s.state == pb::TaskState::Succeeded as i32
}

fn terminal(s: &pb::TaskStatus) -> bool {
    matches!(
        pb::TaskState::try_from(s.state),
        Ok(pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Interrupted)
    )
}

/// Whether the host's record holds a task of `step` not finished yet.
pub(super) fn has_unfinished(rec: &HostRecord, step: TaskStep) -> bool {
    rec.tasks
        .iter()
        .any(|t| t.step == step && t.outcome.is_none())
}

/// The failure of a call to the agent at `step`.
pub(super) fn client_failure(step: impl Into<Stage>, e: &ClientError) -> Failure {
    let kind = match e {
        ClientError::Unreachable { .. } => FailureKind::Unreachable,
        ClientError::Rejected { .. } => FailureKind::Rejected,
        ClientError::Status { .. } => FailureKind::TaskFailed,
    };
    Failure::new(step, kind, e.to_string())
}

/// Run the step's task and move the host to `next` when it succeeded; a
/// task that ended otherwise fails the host.
pub(super) async fn task_step(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
    step: TaskStep,
    action: Action,
    approvals: &ApprovalSet,
    next: Phase,
) -> Result<StepResult, HostRunError> {
    let HostRun { ctx, .. } = *hr;
    let status = advance!(run_task(hr, rec, step, action, approvals, Vec::new()).await);
    if succeeded(&status) {
        ctx.set_phase(rec, next).await?;
        return Ok(StepResult::Advance(()));
    }
    Ok(StepResult::Failed(Failure::new(
        step,
        FailureKind::TaskFailed,
        format!(
            "{} task {} ended {}: {}{}",
            step,
            status.task_id,
            state_name(status.state),
            status.message,
            if status.output_tail.is_empty() {
                String::new()
            } else {
                format!(" | {}", status.output_tail.join(" | "))
            }
        ),
    )))
}

/// Send (or re-attach to) the step's task and wait for its end: its final
/// status, whatever state it ended in.
pub(super) async fn run_task(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
    step: TaskStep,
    action: Action,
    approvals: &ApprovalSet,
    nonce: Vec<u8>,
) -> Result<StepResult<pb::TaskStatus>, HostRunError> {
    let HostRun { ctx, api, .. } = *hr;
    // Re-attach to a recorded, unfinished task of this step (coordinator resumed).
    let existing = rec
        .tasks
        .iter()
        .rposition(|t| t.step == step && t.outcome.is_none());
    let idx = match existing {
        Some(i) => {
            let task_id = rec.tasks[i].task_id.clone();
            match api.get_task(&task_id).await {
                Ok(Some(_)) => i,
                Ok(None) => advance!(resend(hr, rec, i, action, approvals, nonce).await),
                Err(e) => {
                    return Ok(StepResult::Failed(Failure::new(
                        step,
                        FailureKind::Unreachable,
                        e.to_string(),
                    )));
                }
            }
        }
        None => advance!(new_task(hr, rec, step, action, approvals, nonce).await),
    };
    let task_id = rec.tasks[idx].task_id.clone();
    let status = match wait_task(ctx, api, step, &task_id).await {
        Ok(s) => s,
        Err(f) => return Ok(StepResult::Failed(f)),
    };
    rec.tasks[idx].outcome = Some(TaskOutcome {
        state: state_name(status.state).to_string(),
        message: status.message.clone(),
        at_ms: ctx.clock.now_ms(),
    });
    ctx.save(rec).await?;
    Ok(StepResult::Advance(status))
}

/// A recorded task `rec.tasks[i]` never reached the agent: send the
/// recorded bytes again while they are valid, else supersede it with a
/// freshly signed task. Returns the index of the task sent.
async fn resend(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
    i: usize,
    action: Action,
    approvals: &ApprovalSet,
    nonce: Vec<u8>,
) -> Result<StepResult<usize>, HostRunError> {
    let HostRun { ctx, job, api } = *hr;
    let step = rec.tasks[i].step;
    let signed = pb::SignedTask::decode(rec.tasks[i].signed.as_slice()).ok();
    let expired = signed
        .as_ref()
        .and_then(|s| s.task.as_ref())
        .and_then(|e| pb::TaskPayload::decode(e.payload.as_slice()).ok())
        .is_none_or(|p| p.expires_at_unix_ms < ctx.clock.now_ms() + 5_000);
    if expired {
        rec.tasks[i].outcome = Some(TaskOutcome {
            state: "NOT_DELIVERED".into(),
            message: "never reached the agent; superseded".into(),
            at_ms: ctx.clock.now_ms(),
        });
        ctx.save(rec).await?;
        return new_task(hr, rec, step, action, approvals, nonce).await;
    }
    // Recorded without the ring approvals (see `new_task`): attach those
    // covering it again.
    if let Some(mut s) = signed {
        s.approvals = approvals.for_task(&job.host_id, &action, ctx.clock.now_ms());
        if let Err(e) = api.submit(s).await {
            return Ok(StepResult::Failed(client_failure(step, &e)));
        }
    }
    Ok(StepResult::Advance(i))
}

/// Sign a new task, record it, and send it. Returns its index in `rec.tasks`.
async fn new_task(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
    step: TaskStep,
    action: Action,
    approvals: &ApprovalSet,
    nonce: Vec<u8>,
) -> Result<StepResult<usize>, HostRunError> {
    let HostRun { ctx, job, api } = *hr;
    let floor = match api
        .identity()
        .await
        .map_err(|e| client_failure(step, &e))
        .and_then(|i| checked_identity(step, &job.host_id, i))
    {
        Ok(i) => i.sequence_high_water,
        Err(f) => return Ok(StepResult::Failed(f)),
    };
    let sequence = ctx.store.next_sequence_async(&job.host_id, floor).await?;
    let now = ctx.clock.now_ms();
    // Only the approvals that cover this host and this action, within what
    // the agent accepts with one request.
    let attach = approvals.for_task(&job.host_id, &action, now);
    let payload = pb::TaskPayload {
        task_id: format!(
            "{}/{}/{}/{}",
            ctx.params.wave_id, job.host_id, sequence, step
        ),
        host_id: job.host_id.clone(),
        wave_id: ctx.params.wave_id.clone(),
        ring: job.ring,
        sequence,
        issued_at_unix_ms: now,
        expires_at_unix_ms: now + ctx.params.task_lifetime_ms,
        action: Some(action),
    };
    let env = envelope::sign_message(
        TASK_TYPE,
        &payload,
        &[(ctx.signer.key_id.as_str(), &ctx.signer.key)],
    );
    // Recorded without the ring approvals: they are the same for every host
    // of the ring (and name all of them), so keeping a copy per task would
    // grow the store with the square of the ring size. A resend attaches them.
    let mut signed = pb::SignedTask {
        task: Some(env),
        approvals: Vec::new(),
    };
    rec.tasks.push(TaskRef {
        step,
        task_id: payload.task_id.clone(),
        sequence,
        signed: signed.encode_to_vec(),
        nonce,
        outcome: None,
    });
    // Write ahead: the task is durable before it leaves.
    ctx.save(rec).await?;
    let idx = rec.tasks.len() - 1;
    // The wave may have halted while this task was signed and recorded:
    // nothing that takes a host out of service leaves after a halt.
    if matches!(step, TaskStep::Drain | TaskStep::Patch) && ctx.halt.load(Ordering::SeqCst) {
        rec.tasks[idx].outcome = Some(TaskOutcome {
            state: "NOT_SENT".into(),
            message: "the wave halted before it was sent".into(),
            at_ms: ctx.clock.now_ms(),
        });
        ctx.save(rec).await?;
        return Ok(StepResult::Halted);
    }
    signed.approvals = attach;
    if let Err(e) = api.submit(signed).await {
        // The agent did not take it (rejected, or unreachable before recording).
        rec.tasks[idx].outcome = Some(TaskOutcome {
            state: "NOT_ACCEPTED".into(),
            message: e.to_string(),
            at_ms: ctx.clock.now_ms(),
        });
        ctx.save(rec).await?;
        return Ok(StepResult::Failed(client_failure(step, &e)));
    }
    Ok(StepResult::Advance(idx))
}

/// Poll the task until it ends. An unreachable host is tolerated (it may be
/// rebooting) until the task timeout.
async fn wait_task(
    ctx: &Ctx,
    api: &dyn HostApi,
    step: TaskStep,
    task_id: &str,
) -> Result<pb::TaskStatus, Failure> {
    let deadline = ctx.clock.now_ms() + ctx.params.task_timeout_ms;
    let mut last_err = String::new();
    loop {
        match api.get_task(task_id).await {
            Ok(Some(s)) if terminal(&s) => {
                return checked_status(step, task_id, s);
            }
            Ok(Some(_)) => last_err.clear(),
            Ok(None) => {
                return Err(Failure::new(
                    step,
                    FailureKind::TaskFailed,
                    format!("agent has no record of task {task_id}"),
                ));
            }
            Err(e) if e.is_unreachable() => last_err = e.to_string(),
            Err(e) => return Err(client_failure(step, &e)),
        }
        if ctx.clock.now_ms() >= deadline {
            return Err(if last_err.is_empty() {
                Failure::new(
                    step,
                    FailureKind::Timeout,
                    format!(
                        "task {task_id} did not end within {} ms",
                        ctx.params.task_timeout_ms
                    ),
                )
            } else {
                Failure::new(step, FailureKind::Unreachable, last_err)
            });
        }
        tokio::time::sleep(ctx.params.poll_interval).await;
    }
}

/// A finished task's status, checked against the task asked for: the
/// agent must answer for `task_id` (which names the wave, host, sequence
/// and step), or the status is not the task's. Its
/// message and output tail are escaped and bounded before anything keeps
/// them.
pub(super) fn checked_status(
    step: TaskStep,
    task_id: &str,
    mut s: pb::TaskStatus,
) -> Result<pb::TaskStatus, Failure> {
    if s.task_id != task_id {
        return Err(Failure::new(
            step,
            FailureKind::TaskFailed,
            format!(
                "asked for task {task_id}, the agent answered for task {}",
                hosttext::field(&s.task_id)
            ),
        ));
    }
    s.message = hosttext::message(&s.message);
    s.output_tail = hosttext::tail(&s.output_tail);
    Ok(s)
}

/// A host's identity, checked against the host asked for: an agent that
/// answers GetIdentity with another host's id does not speak for this one.
pub(super) fn checked_identity(
    step: impl Into<Stage>,
    host_id: &str,
    id: pb::Identity,
) -> Result<pb::Identity, Failure> {
    if id.host_id != host_id {
        return Err(Failure::new(
            step,
            FailureKind::Attestation,
            format!(
                "asked {host_id} for its identity, the agent answered as `{}`",
                hosttext::field(&id.host_id)
            ),
        ));
    }
    Ok(id)
}
