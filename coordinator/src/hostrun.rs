//! One host's way through a wave: attest-before → drain → patch → (return
//! after reboot/restart) → validate → undrain. Every task is recorded in the
//! wave store before it is sent and its outcome after it is known, so a
//! resumed coordinator re-attaches to the same task ids instead of sending a
//! second patch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use prost::Message;
use ringfence::envelope::{self, TASK_TYPE};
use ringfence::keys::VerifyingKey;
use ringfence::pb::{self, task_payload::Action};
use ringfence::time::Clock;
use serde::{Deserialize, Serialize};

use crate::approvals::ApprovalSet;
use crate::client::{ClientError, HostApi};
use crate::store::{StoreError, WaveStore};

/// For tasks that never carry approvals (drain, validate, plain undrain).
const NO_APPROVALS: &ApprovalSet = &ApprovalSet::empty();

/// Where a host is in the wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not started.
    Pending,
    /// Proving its health before anything changes.
    AttestBefore,
    /// Leaving service.
    Draining,
    /// Running the patch profile (including a reboot or agent restart).
    Patching,
    /// Proving its health after the patch.
    Validating,
    /// Rolling back after a failed validation (`on_failure = "rollback"`).
    RollingBack,
    /// Rollback drill: patched and validated; now rolling back and validating the old version.
    DrillRollback,
    /// Rollback drill: rolled back; now re-patching and validating the new version.
    DrillRepatch,
    /// Returning to service.
    Undraining,
    /// Patched, attested healthy, back in service (or left drained if it was before).
    Done,
    /// Stopped with a failure; left drained if it was drained.
    Failed,
}

impl Phase {
    /// Whether the host is out of service in this phase (counts against the reserve).
    pub fn out_of_service(self) -> bool {
        matches!(
            self,
            Phase::Draining
                | Phase::Patching
                | Phase::Validating
                | Phase::RollingBack
                | Phase::Undraining
        )
    }
}

/// A task the coordinator sent (or is about to send) to a host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskRef {
    /// "drain", "patch", "validate", "undrain", "rollback", "rollback_validate".
    pub step: String,
    /// The task id.
    pub task_id: String,
    /// Its sequence number.
    pub sequence: u64,
    /// The encoded SignedTask, kept so a resumed coordinator resends the same bytes.
    pub signed: Vec<u8>,
    /// Nonce of a Validate task.
    pub nonce: Vec<u8>,
    /// Final state once known.
    pub outcome: Option<TaskOutcome>,
}

/// The recorded end of a task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskOutcome {
    /// Final TaskState name.
    pub state: String,
    /// The agent's message.
    pub message: String,
    /// When the coordinator learned it (ms since the epoch).
    pub at_ms: i64,
}

/// What the coordinator keeps about an attestation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttestationRecord {
    /// Verdict name.
    pub verdict: String,
    /// Driver version reported.
    pub driver_version: String,
    /// CUDA driver version reported.
    pub cuda_version: String,
    /// Reason codes.
    pub reasons: Vec<String>,
    /// Whether the host was draining when it attested.
    pub draining: bool,
    /// The original signed envelope (encoded), for the evidence.
    pub envelope: Vec<u8>,
    /// When it was verified.
    pub at_ms: i64,
}

/// Why a host failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    /// The step that failed ("attest_before", "drain", "patch", "validate", ...).
    pub step: String,
    /// Machine-readable class: "unhealthy_before", "task_failed", "attestation",
    /// "regression", "unreachable", "timeout", "rejected".
    pub kind: String,
    /// Human-readable reason.
    pub reason: String,
}

/// Everything the coordinator records about one host in one wave.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostRecord {
    /// Host id.
    pub host_id: String,
    /// Ring of the host.
    pub ring: u32,
    /// Pool of the host.
    pub pool: String,
    /// Current phase.
    pub phase: Phase,
    /// Attestation before the patch.
    pub before: Option<AttestationRecord>,
    /// Attestation after the patch.
    pub after: Option<AttestationRecord>,
    /// The host was already drained by someone else before the wave: never undrained by it.
    pub already_drained: bool,
    /// Tasks sent, in order.
    pub tasks: Vec<TaskRef>,
    /// Set when the host failed.
    pub failure: Option<Failure>,
    /// Attestations of the rollback drill (after rollback, after re-patch).
    #[serde(default)]
    pub drill: Vec<AttestationRecord>,
    /// When work on the host started / ended (ms since the epoch).
    pub started_at_ms: i64,
    /// When work on the host ended.
    pub finished_at_ms: i64,
}

impl HostRecord {
    /// A host not started yet.
    pub fn new(host_id: &str, ring: u32, pool: &str) -> Self {
        Self {
            host_id: host_id.to_string(),
            ring,
            pool: pool.to_string(),
            phase: Phase::Pending,
            before: None,
            after: None,
            already_drained: false,
            tasks: Vec::new(),
            failure: None,
            drill: Vec::new(),
            started_at_ms: 0,
            finished_at_ms: 0,
        }
    }
}

/// The coordinator's task-signing identity.
#[derive(Debug, Clone)]
pub struct Signer {
    /// Key id written into signatures (a hint for the agent).
    pub key_id: String,
    /// The coordinator key.
    pub key: SigningKey,
}

/// Wave-wide parameters of a host run.
#[derive(Debug, Clone)]
pub struct Params {
    /// The wave.
    pub wave_id: String,
    /// Patch profile name on the agents.
    pub profile: String,
    /// Version to install.
    pub version: String,
    /// Driver version every host must report after the patch ("" = unchecked).
    pub expect_driver_version: String,
    /// CUDA driver version every host must report after the patch ("" = unchecked).
    pub expect_cuda_version: String,
    /// Lifetime of a signed task, ms.
    pub task_lifetime_ms: i64,
    /// Longest wait for one task to end (including a reboot), ms.
    pub task_timeout_ms: i64,
    /// Oldest acceptable attestation, ms.
    pub attestation_max_age_ms: i64,
    /// Tolerated clock difference with the agents, ms (the trust policy's
    /// `max_clock_skew_s`, as the agents apply it to tasks).
    pub max_clock_skew_ms: i64,
    /// Interval between task status polls.
    pub poll_interval: Duration,
    /// Roll a host that fails validation back to its previous version.
    pub rollback_on_failure: bool,
    /// Version to roll back to ("" = the driver version the host attested before).
    pub rollback_version: String,
}

/// A host run stopped for a reason the wave must hear about.
#[derive(Debug, thiserror::Error)]
pub enum HostRunError {
    /// the wave store failed; the run cannot continue safely
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a host run needs.
#[derive(Clone)]
pub struct Ctx {
    /// Wave parameters.
    pub params: Arc<Params>,
    /// The coordinator key.
    pub signer: Arc<Signer>,
    /// The durable wave store.
    pub store: Arc<WaveStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Set when the wave halts: no new step starts.
    pub halt: Arc<AtomicBool>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("params", &self.params).finish()
    }
}

/// One host to run.
#[derive(Debug, Clone)]
pub struct HostJob {
    /// Host id.
    pub host_id: String,
    /// Its ring.
    pub ring: u32,
    /// Its pool.
    pub pool: String,
    /// Its enrolled attestation key.
    pub key: VerifyingKey,
    /// The ring's verified approvals (one copy per ring, shared by its
    /// hosts); each task carries only those covering this host and its
    /// action ([`ApprovalSet::for_task`]).
    pub approvals: Arc<ApprovalSet>,
    /// Run the rollback drill on this host (patch, validate, roll back,
    /// validate, re-patch, validate) before returning it to service.
    pub drill: bool,
}

/// Drive one host from wherever its record says it is to Done or Failed.
/// Returns the final record (also stored).
pub async fn run(ctx: &Ctx, job: &HostJob, api: &dyn HostApi) -> Result<HostRecord, HostRunError> {
    let mut rec: HostRecord = ctx
        .store
        .get_host(&job.host_id)?
        .unwrap_or_else(|| HostRecord::new(&job.host_id, job.ring, &job.pool));
    if rec.started_at_ms == 0 {
        rec.started_at_ms = ctx.clock.now_ms();
    }
    loop {
        if matches!(rec.phase, Phase::Done | Phase::Failed) {
            return Ok(rec);
        }
        let halted = ctx.halt.load(Ordering::SeqCst);
        let next = match rec.phase {
            Phase::Pending => {
                if halted {
                    return Ok(rec);
                }
                set_phase(ctx, &mut rec, Phase::AttestBefore).await?;
                continue;
            }
            Phase::AttestBefore => attest_before(ctx, job, api, &mut rec).await?,
            Phase::Draining => {
                if halted && !has_unfinished(&rec, "drain") {
                    return Ok(rec);
                }
                let reason = format!("ringfence wave {}", ctx.params.wave_id);
                let action = Action::Drain(pb::Drain { reason });
                task_step(
                    ctx,
                    job,
                    api,
                    &mut rec,
                    "drain",
                    action,
                    NO_APPROVALS,
                    Phase::Patching,
                )
                .await?
            }
            Phase::Patching => {
                if halted && !has_unfinished(&rec, "patch") {
                    return Ok(rec);
                }
                let action = Action::Patch(pb::Patch {
                    profile: ctx.params.profile.clone(),
                    version: ctx.params.version.clone(),
                    rollback: false,
                });
                task_step(
                    ctx,
                    job,
                    api,
                    &mut rec,
                    "patch",
                    action,
                    &job.approvals,
                    Phase::Validating,
                )
                .await?
            }
            Phase::Validating => validate(ctx, job, api, &mut rec).await?,
            Phase::RollingBack => rollback(ctx, job, api, &mut rec).await?,
            Phase::DrillRollback => drill_rollback(ctx, job, api, &mut rec).await?,
            Phase::DrillRepatch => drill_repatch(ctx, job, api, &mut rec).await?,
            Phase::Undraining => {
                if rec.already_drained {
                    // Someone else drained it before the wave; it stays drained.
                    set_phase(ctx, &mut rec, Phase::Done).await?;
                    continue;
                }
                let action = Action::Undrain(pb::Undrain {
                    reason: format!("ringfence wave {} validated", ctx.params.wave_id),
                    force: false,
                });
                task_step(
                    ctx,
                    job,
                    api,
                    &mut rec,
                    "undrain",
                    action,
                    NO_APPROVALS,
                    Phase::Done,
                )
                .await?
            }
            Phase::Done | Phase::Failed => return Ok(rec),
        };
        if let Some(failure) = next {
            if failure.kind == HALTED {
                // Not a failure of the host: stopped between steps.
                return Ok(rec);
            }
            rec.failure = Some(failure);
            rec.finished_at_ms = ctx.clock.now_ms();
            set_phase(ctx, &mut rec, Phase::Failed).await?;
        } else if rec.phase == Phase::Done {
            rec.finished_at_ms = ctx.clock.now_ms();
            ctx.store.put_host_async(&rec.host_id, &rec).await?;
        }
    }
}

/// [`Failure::kind`] of a task not sent because the wave halted; the host
/// run stops where it is instead of failing the host.
const HALTED: &str = "halted";

fn has_unfinished(rec: &HostRecord, step: &str) -> bool {
    rec.tasks
        .iter()
        .any(|t| t.step == step && t.outcome.is_none())
}

async fn set_phase(ctx: &Ctx, rec: &mut HostRecord, phase: Phase) -> Result<(), StoreError> {
    rec.phase = phase;
    ctx.store.put_host_async(&rec.host_id, rec).await
}

fn fail(step: &str, kind: &str, reason: impl Into<String>) -> Option<Failure> {
    Some(Failure {
        step: step.to_string(),
        kind: kind.to_string(),
        reason: reason.into(),
    })
}

fn client_failure(step: &str, e: &ClientError) -> Option<Failure> {
    Some(client_failure_of(step, e))
}

async fn attest_before(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
) -> Result<Option<Failure>, HostRunError> {
    let nonce = ringfence::attest::new_nonce();
    let env = match api.attest(nonce.clone()).await {
        Ok(e) => e,
        Err(e) => return Ok(client_failure("attest_before", &e)),
    };
    let att = match verify_attestation(ctx, job, &env, &nonce) {
        Ok(a) => a,
        Err(reason) => return Ok(fail("attest_before", "attestation", reason)),
    };
    let record = attestation_record(ctx, &att, &env);
    let unhealthy = att.verdict == pb::Verdict::Unhealthy as i32;
    // Drained by someone else, not by this wave's own earlier tasks (a host
    // retried after a failure is still drained by the wave: undrain it).
    rec.already_drained = record.draining && !drained_by_this_wave(rec);
    rec.before = Some(record);
    if unhealthy {
        return Ok(fail(
            "attest_before",
            "unhealthy_before",
            format!(
                "host was UNHEALTHY before the wave ({}); not patched",
                rec.before
                    .as_ref()
                    .map(|b| b.reasons.join(", "))
                    .unwrap_or_default()
            ),
        ));
    }
    set_phase(ctx, rec, Phase::Draining).await?;
    Ok(None)
}

fn verify_attestation(
    ctx: &Ctx,
    job: &HostJob,
    env: &pb::Envelope,
    nonce: &[u8],
) -> Result<pb::Attestation, String> {
    ringfence::attest::verify(
        env,
        &ringfence::attest::Expect {
            key: &job.key,
            host_id: &job.host_id,
            nonce,
            now_ms: ctx.clock.now_ms(),
            max_age_ms: ctx.params.attestation_max_age_ms,
            max_skew_ms: ctx.params.max_clock_skew_ms,
        },
    )
    .map_err(|e| e.to_string())
}

fn attestation_record(ctx: &Ctx, att: &pb::Attestation, env: &pb::Envelope) -> AttestationRecord {
    let report = att.report.clone().unwrap_or_default();
    AttestationRecord {
        verdict: verdict_name(att.verdict).to_string(),
        driver_version: report.driver_version.clone(),
        cuda_version: report.cuda_driver_version.clone(),
        reasons: report.reasons.iter().map(|r| r.code.clone()).collect(),
        draining: report.draining,
        envelope: env.encode_to_vec(),
        at_ms: ctx.clock.now_ms(),
    }
}

/// The name of a verdict value.
pub fn verdict_name(v: i32) -> &'static str {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Healthy) => "HEALTHY",
        Ok(pb::Verdict::Degraded) => "DEGRADED",
        Ok(pb::Verdict::Unhealthy) => "UNHEALTHY",
        _ => "UNSPECIFIED",
    }
}

/// Sign a new task for this host, record it (write-ahead), send it, and wait
/// for its end. On resume, an unfinished recorded task is re-attached by id.
#[allow(clippy::too_many_arguments)]
async fn task_step(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
    step: &str,
    action: Action,
    approvals: &ApprovalSet,
    next: Phase,
) -> Result<Option<Failure>, HostRunError> {
    let status = match run_task(ctx, job, api, rec, step, action, approvals, Vec::new()).await? {
        Ok(s) => s,
        Err(f) => return Ok(Some(f)),
    };
    if status.state == pb::TaskState::Succeeded as i32 {
        set_phase(ctx, rec, next).await?;
        Ok(None)
    } else {
        Ok(fail(
            step,
            "task_failed",
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
        ))
    }
}

/// Steps whose successful task takes the host out of service.
const DRAIN_STEPS: &[&str] = &["drain", "manual_drain", "soak_drain"];

/// Whether this wave's own tasks left the host drained: a successful drain
/// came after the last successful undrain.
pub fn drained_by_this_wave(rec: &HostRecord) -> bool {
    let mut drained = false;
    for t in &rec.tasks {
        if t.outcome.as_ref().is_some_and(|o| o.state == "SUCCEEDED") {
            if DRAIN_STEPS.contains(&t.step.as_str()) {
                drained = true;
            } else if t.step == "undrain" {
                drained = false;
            }
        }
    }
    drained
}

/// A host that regressed during its ring's soak had been undrained after
/// validation; a halt leaves the failed host out of service, so drain it
/// again. Records the outcome in the host's failure and returns whether
/// the host is drained.
pub async fn drain_after_soak(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    why: &str,
) -> Result<(HostRecord, bool), HostRunError> {
    let mut rec: HostRecord = ctx
        .store
        .get_host(&job.host_id)?
        .unwrap_or_else(|| HostRecord::new(&job.host_id, job.ring, &job.pool));
    let action = Action::Drain(pb::Drain {
        reason: format!("ringfence wave {}: soak regression", ctx.params.wave_id),
    });
    let outcome = run_task(
        ctx,
        job,
        api,
        &mut rec,
        "soak_drain",
        action,
        NO_APPROVALS,
        Vec::new(),
    )
    .await?;
    let (drained, reason) = match outcome {
        Ok(s) if s.state == pb::TaskState::Succeeded as i32 => (
            true,
            format!(
                "{why}; drained again by the wave (task {}) and left drained for an operator",
                s.task_id
            ),
        ),
        Ok(s) => (
            false,
            format!(
                "{why}; the wave's drain task {} ended {}: {}; drain it by hand",
                s.task_id,
                state_name(s.state),
                s.message
            ),
        ),
        Err(f) => (
            false,
            format!(
                "{why}; the wave could not drain it again ({}): drain it by hand",
                f.reason
            ),
        ),
    };
    rec.failure = Some(Failure {
        step: "soak".into(),
        kind: "soak_regression".into(),
        reason,
    });
    rec.phase = Phase::Failed;
    ctx.store.put_host_async(&rec.host_id, &rec).await?;
    Ok((rec, drained))
}

/// The name of a task state value.
pub fn state_name(s: i32) -> &'static str {
    match pb::TaskState::try_from(s) {
        Ok(pb::TaskState::Accepted) => "ACCEPTED",
        Ok(pb::TaskState::Running) => "RUNNING",
        Ok(pb::TaskState::AwaitingReboot) => "AWAITING_REBOOT",
        Ok(pb::TaskState::AwaitingRestart) => "AWAITING_RESTART",
        Ok(pb::TaskState::Succeeded) => "SUCCEEDED",
        Ok(pb::TaskState::Failed) => "FAILED",
        Ok(pb::TaskState::Interrupted) => "INTERRUPTED",
        _ => "UNSPECIFIED",
    }
}

fn terminal(s: &pb::TaskStatus) -> bool {
    matches!(
        pb::TaskState::try_from(s.state),
        Ok(pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Interrupted)
    )
}

/// Send (or re-attach to) the step's task and wait for its end.
#[allow(clippy::too_many_arguments)]
async fn run_task(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
    step: &str,
    action: Action,
    approvals: &ApprovalSet,
    nonce: Vec<u8>,
) -> Result<Result<pb::TaskStatus, Failure>, HostRunError> {
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
                Ok(None) => {
                    // Never reached the agent: send the recorded bytes again if
                    // still valid, else sign a fresh task.
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
                        ctx.store.put_host_async(&rec.host_id, rec).await?;
                        match new_task(ctx, job, api, rec, step, action, approvals, nonce).await? {
                            Ok(i) => i,
                            Err(f) => return Ok(Err(f)),
                        }
                    } else {
                        // Recorded without the ring approvals (see
                        // `new_task`): attach those covering it again.
                        if let Some(mut s) = signed {
                            s.approvals =
                                approvals.for_task(&job.host_id, &action, ctx.clock.now_ms());
                            if let Err(e) = api.submit(s).await {
                                return Ok(Err(client_failure_of(step, &e)));
                            }
                        }
                        i
                    }
                }
                Err(e) => {
                    return Ok(Err(Failure {
                        step: step.into(),
                        kind: "unreachable".into(),
                        reason: e.to_string(),
                    }));
                }
            }
        }
        None => match new_task(ctx, job, api, rec, step, action, approvals, nonce).await? {
            Ok(i) => i,
            Err(f) => return Ok(Err(f)),
        },
    };
    let task_id = rec.tasks[idx].task_id.clone();
    let status = match wait_task(ctx, api, &task_id).await {
        Ok(s) => s,
        Err(f) => {
            let f = Failure {
                step: step.to_string(),
                ..f
            };
            return Ok(Err(f));
        }
    };
    rec.tasks[idx].outcome = Some(TaskOutcome {
        state: state_name(status.state).to_string(),
        message: status.message.clone(),
        at_ms: ctx.clock.now_ms(),
    });
    ctx.store.put_host_async(&rec.host_id, rec).await?;
    Ok(Ok(status))
}

/// Sign a new task, record it, and send it. Returns its index in `rec.tasks`.
#[allow(clippy::too_many_arguments)]
async fn new_task(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
    step: &str,
    action: Action,
    approvals: &ApprovalSet,
    nonce: Vec<u8>,
) -> Result<Result<usize, Failure>, HostRunError> {
    let floor = api
        .identity()
        .await
        .map(|i| i.sequence_high_water)
        .unwrap_or(0);
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
        step: step.to_string(),
        task_id: payload.task_id.clone(),
        sequence,
        signed: signed.encode_to_vec(),
        nonce,
        outcome: None,
    });
    // Write ahead: the task is durable before it leaves.
    ctx.store.put_host_async(&rec.host_id, rec).await?;
    let idx = rec.tasks.len() - 1;
    // The wave may have halted while this task was signed and recorded:
    // nothing that takes a host out of service leaves after a halt.
    if matches!(step, "drain" | "patch") && ctx.halt.load(Ordering::SeqCst) {
        rec.tasks[idx].outcome = Some(TaskOutcome {
            state: "NOT_SENT".into(),
            message: "the wave halted before it was sent".into(),
            at_ms: ctx.clock.now_ms(),
        });
        ctx.store.put_host_async(&rec.host_id, rec).await?;
        return Ok(Err(Failure {
            step: step.to_string(),
            kind: HALTED.into(),
            reason: "the wave halted before the task was sent".into(),
        }));
    }
    signed.approvals = attach;
    if let Err(e) = api.submit(signed).await {
        // The agent did not take it (rejected, or unreachable before recording).
        rec.tasks[idx].outcome = Some(TaskOutcome {
            state: "NOT_ACCEPTED".into(),
            message: e.to_string(),
            at_ms: ctx.clock.now_ms(),
        });
        ctx.store.put_host_async(&rec.host_id, rec).await?;
        return Ok(Err(client_failure_of(step, &e)));
    }
    Ok(Ok(idx))
}

fn client_failure_of(step: &str, e: &ClientError) -> Failure {
    let kind = match e {
        ClientError::Unreachable { .. } => "unreachable",
        ClientError::Rejected { .. } => "rejected",
        ClientError::Status { .. } => "task_failed",
    };
    Failure {
        step: step.to_string(),
        kind: kind.to_string(),
        reason: e.to_string(),
    }
}

/// Poll the task until it ends. An unreachable host is tolerated (it may be
/// rebooting) until the task timeout.
async fn wait_task(ctx: &Ctx, api: &dyn HostApi, task_id: &str) -> Result<pb::TaskStatus, Failure> {
    let deadline = ctx.clock.now_ms() + ctx.params.task_timeout_ms;
    let mut last_err = String::new();
    loop {
        match api.get_task(task_id).await {
            Ok(Some(s)) if terminal(&s) => return Ok(s),
            Ok(Some(_)) => last_err.clear(),
            Ok(None) => {
                return Err(Failure {
                    step: String::new(),
                    kind: "task_failed".into(),
                    reason: format!("agent has no record of task {task_id}"),
                });
            }
            Err(e) if e.is_unreachable() => last_err = e.to_string(),
            Err(e) => return Err(client_failure_of("", &e)),
        }
        if ctx.clock.now_ms() >= deadline {
            let (kind, reason) = if last_err.is_empty() {
                (
                    "timeout",
                    format!(
                        "task {task_id} did not end within {} ms",
                        ctx.params.task_timeout_ms
                    ),
                )
            } else {
                ("unreachable", last_err)
            };
            return Err(Failure {
                step: String::new(),
                kind: kind.into(),
                reason,
            });
        }
        tokio::time::sleep(ctx.params.poll_interval).await;
    }
}

async fn validate(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
) -> Result<Option<Failure>, HostRunError> {
    let expect_driver = ctx.params.expect_driver_version.clone();
    let expect_cuda = ctx.params.expect_cuda_version.clone();
    match validate_step(ctx, job, api, rec, "validate", &expect_driver, &expect_cuda).await? {
        Ok(after) => {
            rec.after = Some(after);
            let next = if job.drill && rec.drill.is_empty() {
                Phase::DrillRollback
            } else {
                Phase::Undraining
            };
            set_phase(ctx, rec, next).await?;
            Ok(None)
        }
        Err(f) => {
            if ctx.params.rollback_on_failure && rec.before.is_some() {
                rec.failure = Some(f);
                set_phase(ctx, rec, Phase::RollingBack).await?;
                Ok(None)
            } else {
                Ok(Some(f))
            }
        }
    }
}

/// Run a Validate task, verify the attestation it returns, and compare it
/// with the expectation and with the attestation taken before the patch.
async fn validate_step(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
    step: &str,
    expect_driver: &str,
    expect_cuda: &str,
) -> Result<Result<AttestationRecord, Failure>, HostRunError> {
    let recorded_nonce = rec
        .tasks
        .iter()
        .rev()
        .find(|t| t.step == step && t.outcome.is_none())
        .map(|t| t.nonce.clone());
    let nonce = recorded_nonce.unwrap_or_else(ringfence::attest::new_nonce);
    let action = Action::Validate(pb::Validate {
        expect_driver_version: expect_driver.to_string(),
        expect_cuda_version: expect_cuda.to_string(),
        nonce: nonce.clone(),
        profile: ctx.params.profile.clone(),
    });
    let status = match run_task(
        ctx,
        job,
        api,
        rec,
        step,
        action,
        NO_APPROVALS,
        nonce.clone(),
    )
    .await?
    {
        Ok(s) => s,
        Err(f) => return Ok(Err(f)),
    };
    let Some(env) = status.attestation.clone() else {
        return Ok(Err(Failure {
            step: step.into(),
            kind: "task_failed".into(),
            reason: format!(
                "validate task {} ended {} without an attestation: {}",
                status.task_id,
                state_name(status.state),
                status.message
            ),
        }));
    };
    let att = match verify_attestation(ctx, job, &env, &nonce) {
        Ok(a) => a,
        Err(reason) => {
            return Ok(Err(Failure {
                step: step.into(),
                kind: "attestation".into(),
                reason,
            }));
        }
    };
    let after = attestation_record(ctx, &att, &env);
    let report = att.report.clone().unwrap_or_default();
    let mut problems = Vec::new();
    if att.verdict != pb::Verdict::Healthy as i32 {
        problems.push(format!(
            "verdict {} ({})",
            after.verdict,
            report
                .reasons
                .iter()
                .map(|r| format!("{} gpu {} observed {}", r.code, r.gpu_index, r.observed))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if !expect_driver.is_empty() && report.driver_version != expect_driver {
        problems.push(format!(
            "driver {} != expected {}",
            report.driver_version, expect_driver
        ));
    }
    if !expect_cuda.is_empty() && report.cuda_driver_version != expect_cuda {
        problems.push(format!(
            "CUDA {} != expected {}",
            report.cuda_driver_version, expect_cuda
        ));
    }
    if let Some(before) = rec.before.as_ref() {
        problems.extend(regressions(before, &report));
    }
    if status.state != pb::TaskState::Succeeded as i32 && problems.is_empty() {
        problems.push(format!(
            "validate task ended {}: {}",
            state_name(status.state),
            status.message
        ));
    }
    if problems.is_empty() {
        Ok(Ok(after))
    } else {
        let failed = Failure {
            step: step.into(),
            kind: "attestation".into(),
            reason: problems.join("; "),
        };
        if step == "validate" {
            rec.after = Some(after);
        }
        Ok(Err(failed))
    }
}

/// New hardware faults since the attestation before the patch.
pub fn regressions(before: &AttestationRecord, after: &pb::HealthReport) -> Vec<String> {
    let Some(before_report) = pb::Envelope::decode(before.envelope.as_slice())
        .ok()
        .and_then(|e| pb::Attestation::decode(e.payload.as_slice()).ok())
        .and_then(|a| a.report)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for gpu in &after.gpus {
        let prev = before_report.gpus.iter().find(|g| g.uuid == gpu.uuid);
        let grew = |name: &str, now: Option<u64>, then: Option<u64>| {
            let (n, t) = (now.unwrap_or(0), then.unwrap_or(0));
            (n > t).then(|| format!("gpu {} {name} {t} -> {n}", gpu.index))
        };
        let p = prev.cloned().unwrap_or_default();
        out.extend(grew(
            "uncorrected ECC (aggregate)",
            gpu.ecc_aggregate_uncorrected,
            p.ecc_aggregate_uncorrected,
        ));
        out.extend(grew(
            "uncorrected ECC (volatile)",
            gpu.ecc_volatile_uncorrected,
            p.ecc_volatile_uncorrected,
        ));
        out.extend(grew(
            "retired pages",
            gpu.retired_pages_double_bit
                .map(u64::from)
                .zip(gpu.retired_pages_single_bit.map(u64::from))
                .map(|(a, b)| a + b),
            p.retired_pages_double_bit
                .map(u64::from)
                .zip(p.retired_pages_single_bit.map(u64::from))
                .map(|(a, b)| a + b),
        ));
        out.extend(grew(
            "remapped rows",
            gpu.remapped_rows_uncorrectable
                .map(u64::from)
                .zip(gpu.remapped_rows_correctable.map(u64::from))
                .map(|(a, b)| a + b),
            p.remapped_rows_uncorrectable
                .map(u64::from)
                .zip(p.remapped_rows_correctable.map(u64::from))
                .map(|(a, b)| a + b),
        ));
        let old_xids: Vec<u64> = p.xids.iter().map(|x| x.xid).collect();
        for x in &gpu.xids {
            if CRITICAL_XIDS.contains(&x.xid) && !old_xids.contains(&x.xid) {
                out.push(format!("gpu {} new critical XID {}", gpu.index, x.xid));
            }
        }
    }
    out
}

/// XIDs that fail a host when they appear during a patch (reset/reboot class).
pub const CRITICAL_XIDS: &[u64] = &[48, 64, 74, 79, 95, 119, 120, 140];

async fn rollback(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
) -> Result<Option<Failure>, HostRunError> {
    let original = rec.failure.clone();
    let Some(previous) = rollback_target(ctx, rec) else {
        return Ok(original);
    };
    let mut failure = original.unwrap_or(Failure {
        step: "validate".into(),
        kind: "attestation".into(),
        reason: "validation failed".into(),
    });
    let cuda = cuda_before(rec);
    let steps = ("rollback", "rollback_validate");
    let expect = (previous.as_str(), cuda.as_str());
    match patch_then_validate(ctx, job, api, rec, steps, &previous, true, expect).await? {
        Ok(after) => {
            failure.reason = format!(
                "{}; rolled back to {} and attested {} (left drained)",
                failure.reason, previous, after.verdict
            );
            rec.after = Some(after);
        }
        Err(why) => failure.reason = format!("{}; rollback failed: {why}", failure.reason),
    }
    Ok(Some(failure))
}

/// Patch toward `version` (a rollback when `rollback`), then validate the
/// host against `expect_driver` / `expect_cuda`. `Err` says which part failed.
#[allow(clippy::too_many_arguments)]
async fn patch_then_validate(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
    (patch_step, validate_name): (&str, &str),
    version: &str,
    rollback: bool,
    (expect_driver, expect_cuda): (&str, &str),
) -> Result<Result<AttestationRecord, String>, HostRunError> {
    let action = Action::Patch(pb::Patch {
        profile: ctx.params.profile.clone(),
        version: version.to_string(),
        rollback,
    });
    match run_task(
        ctx,
        job,
        api,
        rec,
        patch_step,
        action,
        &job.approvals,
        Vec::new(),
    )
    .await?
    {
        Ok(s) if s.state == pb::TaskState::Succeeded as i32 => {}
        Ok(s) => {
            return Ok(Err(format!(
                "{patch_step} task ended {}: {}",
                state_name(s.state),
                s.message
            )));
        }
        Err(f) => return Ok(Err(format!("{patch_step}: {}", f.reason))),
    }
    Ok(validate_step(
        ctx,
        job,
        api,
        rec,
        validate_name,
        expect_driver,
        expect_cuda,
    )
    .await?
    .map_err(|f| format!("validation of {version}: {}", f.reason)))
}

fn cuda_before(rec: &HostRecord) -> String {
    rec.before
        .as_ref()
        .map(|b| b.cuda_version.clone())
        .unwrap_or_default()
}

/// The version a rollback returns to: the spec's `rollback_version`, else the
/// driver version the host attested before the patch.
fn rollback_target(ctx: &Ctx, rec: &HostRecord) -> Option<String> {
    if ctx.params.rollback_version.is_empty() {
        rec.before.as_ref().map(|b| b.driver_version.clone())
    } else {
        Some(ctx.params.rollback_version.clone())
    }
}

/// Drill, first half: roll the freshly patched host back and prove the old
/// version healthy.
async fn drill_rollback(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
) -> Result<Option<Failure>, HostRunError> {
    let Some(previous) = rollback_target(ctx, rec) else {
        return Ok(fail(
            "drill_rollback",
            "drill",
            "no version to roll back to",
        ));
    };
    let cuda = cuda_before(rec);
    let steps = ("drill_rollback", "drill_rollback_validate");
    let expect = (previous.as_str(), cuda.as_str());
    match patch_then_validate(ctx, job, api, rec, steps, &previous, true, expect).await? {
        Ok(att) => {
            rec.drill.push(att);
            set_phase(ctx, rec, Phase::DrillRepatch).await?;
            Ok(None)
        }
        Err(why) => Ok(fail("drill_rollback", "drill", why)),
    }
}

/// Drill, second half: patch forward again and prove the new version healthy.
async fn drill_repatch(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    rec: &mut HostRecord,
) -> Result<Option<Failure>, HostRunError> {
    let p = ctx.params.clone();
    let steps = ("drill_repatch", "drill_repatch_validate");
    let expect = (
        p.expect_driver_version.as_str(),
        p.expect_cuda_version.as_str(),
    );
    match patch_then_validate(ctx, job, api, rec, steps, &p.version, false, expect).await? {
        Ok(att) => {
            rec.drill.push(att);
            set_phase(ctx, rec, Phase::Undraining).await?;
            Ok(None)
        }
        Err(why) => Ok(fail("drill_repatch", "drill", why)),
    }
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
    let mut rec: HostRecord = ctx
        .store
        .get_host(&job.host_id)?
        .unwrap_or_else(|| HostRecord::new(&job.host_id, job.ring, &job.pool));
    let Some(target) = rollback_target(ctx, &rec).filter(|v| !v.is_empty()) else {
        return Ok((
            rec,
            fail(
                "rollback",
                "manual_rollback",
                "no version to roll back to: the wave spec has no rollback_version and the host never attested before the wave",
            ),
        ));
    };
    if rec.started_at_ms == 0 {
        rec.started_at_ms = ctx.clock.now_ms();
    }
    let drain = Action::Drain(pb::Drain {
        reason: format!("ringfence wave {} rollback by hand", ctx.params.wave_id),
    });
    let outcome: Result<Result<String, String>, HostRunError> = async {
        match run_task(
            ctx,
            job,
            api,
            &mut rec,
            "manual_drain",
            drain,
            NO_APPROVALS,
            Vec::new(),
        )
        .await?
        {
            Ok(s) if s.state == pb::TaskState::Succeeded as i32 => {}
            Ok(s) => {
                return Ok(Err(format!(
                    "drain task ended {}: {}",
                    state_name(s.state),
                    s.message
                )));
            }
            Err(f) => return Ok(Err(format!("drain: {}", f.reason))),
        }
        let cuda = cuda_before(&rec);
        let steps = ("manual_rollback", "manual_rollback_validate");
        let expect = (target.as_str(), cuda.as_str());
        match patch_then_validate(ctx, job, api, &mut rec, steps, &target, true, expect).await? {
            Ok(att) => {
                let verdict = att.verdict.clone();
                rec.after = Some(att);
                Ok(Ok(verdict))
            }
            Err(why) => Ok(Err(why)),
        }
    }
    .await;
    let outcome = outcome?;
    let failure = match &outcome {
        Ok(verdict) => Failure {
            step: "rollback".into(),
            kind: "manual_rollback".into(),
            reason: format!(
                "rolled back by hand to {target} and attested {verdict}; left drained for an operator"
            ),
        },
        Err(why) => Failure {
            step: "rollback".into(),
            kind: "manual_rollback_failed".into(),
            reason: format!("rollback by hand to {target} failed: {why}; left drained"),
        },
    };
    rec.failure = Some(failure.clone());
    rec.phase = Phase::Failed;
    rec.finished_at_ms = ctx.clock.now_ms();
    ctx.store.put_host_async(&rec.host_id, &rec).await?;
    Ok((rec, outcome.err().map(|_| failure)))
}
