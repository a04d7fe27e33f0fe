//! Accepting a task: verify it on a blocking thread (bounded), re-check
//! replay and sequence under the gate, journal it as ACCEPTED, then drive
//! it to its end.

use std::sync::atomic::Ordering;

use ringfence::envelope::{ActionPolicy, TaskRejection, TaskVerifier, Verified};
use ringfence::pb::{self, TaskState, task_payload::Action};
use tokio::sync::watch;
use tracing::Instrument;

use super::engine::{TaskEngine, lock};
use super::run::Run;
use super::{HealthSource, ack, drain, patch, undrain, validate};
use crate::journal::JournalError;
use crate::profiles::ProfilePolicy;
/// The action policy the verifier sees: the patch profiles, and the health
/// source for whether an AckFaults touches an UNHEALTHY fault.
struct AgentPolicy<'a> {
    profiles: &'a ProfilePolicy,
    health: &'a dyn HealthSource,
}

impl ActionPolicy for AgentPolicy<'_> {
    fn allow(&self, task: &pb::TaskPayload) -> Result<(), String> {
        self.profiles.allow(task)
    }

    fn acks_unhealthy(&self, ack: &pb::AckFaults) -> Result<bool, String> {
        Ok(!self.health.unhealthy_faults(ack).is_empty())
    }
}

/// A task was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// the task failed one of the six verification checks
    #[error("task rejected by check `{check}`: {rejection}", check = .0.check(), rejection = .0)]
    Rejected(TaskRejection),
    /// another mutating task is running (or awaiting a reboot/restart)
    #[error("task `{running_task_id}` is still running; one mutating task at a time")]
    Busy {
        /// The id of the task in the way.
        running_task_id: String,
    },
    /// the agent is shutting down and accepts no new task
    #[error("the agent is shutting down and accepts no new task")]
    ShuttingDown,
    /// the journal could not record the task
    #[error("cannot record the task: {0}")]
    Journal(#[from] JournalError),
    /// too many submissions are already waiting for signature verification
    #[error(
        "{waiting} task submissions are already waiting for signature verification (limit {MAX_WAITING_VERIFICATIONS}); retry later"
    )]
    Overloaded {
        /// Submissions already queued for verification.
        waiting: usize,
    },
    /// the verification thread failed (a panic); nothing was recorded
    #[error("task verification failed: {reason}")]
    Verifier {
        /// Why the verification thread ended without an answer (its panic).
        reason: String,
    },
}

/// Submissions allowed to wait for a verification thread; more are
/// answered RESOURCE_EXHAUSTED at once (memory stays bounded under a flood).
pub const MAX_WAITING_VERIFICATIONS: usize = 256;

fn action_name(a: Option<&Action>) -> &'static str {
    match a {
        Some(Action::Drain(_)) => "drain",
        Some(Action::Patch(_)) => "patch",
        Some(Action::Validate(_)) => "validate",
        Some(Action::Undrain(_)) => "undrain",
        Some(Action::AckFaults(_)) => "ack_faults",
        None => "none",
    }
}

impl TaskEngine {
    /// Verify, record and start a signed task. A task id seen before returns
    /// its recorded status and does not run again.
    pub async fn submit(&self, signed: pb::SignedTask) -> Result<pb::TaskStatus, SubmitError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        // All six checks, signatures included, on a blocking thread and
        // without any lock: a flood of heavily signed tasks never holds a
        // runtime thread or a lock that health, the watchdog or a running
        // task needs.
        let verified = match self.verify(signed).await? {
            Ok(v) => v,
            Err(r) => {
                ringfence::refusals::task_rejected(r.check());
                tracing::warn!(check = r.check(), host_id = %inner.host_id, "task rejected: {r}");
                return Err(SubmitError::Rejected(r));
            }
        };
        let task = match verified {
            Verified::Replay(status) => {
                tracing::info!(task_id = %status.task_id, state = status.state().as_str_name(),
                    "task resubmitted; returning its recorded status");
                return Ok(*status);
            }
            Verified::New(task) => task,
        };
        let approvers = task.approvers.clone();
        let coordinator = task.coordinator.clone();
        let (payload, status, exclusive, approvers) = {
            let mut gate = lock(&inner.gate);
            // Check 5 again under the gate: another task may have been
            // accepted while this one was verified.
            if let Some(recorded) = inner.journal.task(&task.payload.task_id)? {
                tracing::info!(task_id = %recorded.task_id, state = recorded.state().as_str_name(),
                    "task resubmitted; returning its recorded status");
                return Ok(recorded);
            }
            let high_water = inner.journal.high_water()?;
            if task.payload.sequence <= high_water {
                let r = TaskRejection::SequenceNotIncreasing {
                    sequence: task.payload.sequence,
                    high_water,
                };
                ringfence::refusals::task_rejected(r.check());
                tracing::warn!(check = r.check(), host_id = %inner.host_id, "task rejected: {r}");
                return Err(SubmitError::Rejected(r));
            }
            let payload = task.payload;
            let exclusive = !matches!(payload.action, Some(Action::AckFaults(_)));
            if exclusive && let Some(running) = gate.as_ref() {
                return Err(SubmitError::Busy {
                    running_task_id: running.clone(),
                });
            }
            if inner.shutting_down.load(Ordering::SeqCst) {
                return Err(SubmitError::ShuttingDown);
            }
            let now = inner.clock.now_ms();
            let mut status = pb::TaskStatus {
                task_id: payload.task_id.clone(),
                host_id: payload.host_id.clone(),
                wave_id: payload.wave_id.clone(),
                sequence: payload.sequence,
                action: action_name(payload.action.as_ref()).to_string(),
                step: "accepted".into(),
                message: format!("accepted (signed by `{}`)", task.coordinator),
                exit_code: -1,
                accepted_at_unix_ms: now,
                updated_at_unix_ms: now,
                ..Default::default()
            };
            status.set_state(TaskState::Accepted);
            inner.journal.accept(&status)?;
            if exclusive {
                *gate = Some(status.task_id.clone());
            }
            let (tx, _) = watch::channel(status.clone());
            lock(&inner.watchers).insert(status.task_id.clone(), tx);
            (payload, status, exclusive, approvers)
        };
        let span = tracing::info_span!("task", task_id = %payload.task_id, wave_id = %payload.wave_id,
            host_id = %payload.host_id, action = %status.action);
        span.in_scope(|| tracing::info!(sequence = payload.sequence, "task accepted"));
        self.compact_if_due();
        let run = Run {
            inner: inner.clone(),
            status: status.clone(),
            payload,
            coordinator,
            approvers,
        };
        if exclusive {
            let handle = tokio::spawn(drive(run).instrument(span));
            *lock(&inner.job) = Some(handle);
            Ok(status)
        } else {
            let id = status.task_id.clone();
            drive(run).instrument(span).await;
            Ok(self.get(&id).unwrap_or(status))
        }
    }

    /// Run the verifier on a blocking thread, at most [`verify_threads`] at
    /// once and at most [`MAX_WAITING_VERIFICATIONS`] waiting.
    async fn verify(
        &self,
        signed: pb::SignedTask,
    ) -> Result<Result<Verified, TaskRejection>, SubmitError> {
        let inner = &self.inner;
        let waiting = inner.verify_waiting.fetch_add(1, Ordering::SeqCst);
        let permit = if waiting >= MAX_WAITING_VERIFICATIONS {
            Err(SubmitError::Overloaded { waiting })
        } else {
            inner
                .verify_slots
                .acquire()
                .await
                .map_err(|e| SubmitError::Verifier {
                    reason: e.to_string(),
                })
        };
        inner.verify_waiting.fetch_sub(1, Ordering::SeqCst);
        let permit = permit?;
        let inner = inner.clone();
        let trust = self.trust();
        let verified = tokio::task::spawn_blocking(move || {
            let verifier = TaskVerifier {
                trust: &trust,
                host_id: &inner.host_id,
                ring: inner.ring,
                clock: inner.clock.as_ref(),
            };
            let policy = AgentPolicy {
                profiles: &inner.policy,
                health: inner.health.as_ref(),
            };
            verifier.verify(&signed, &inner.journal, &policy)
        })
        .await
        .map_err(|e| SubmitError::Verifier {
            reason: e.to_string(),
        });
        drop(permit);
        verified
    }
}

/// Signature verifications that may run at once: one thread less than the
/// machine has (at least one), so that health and the runtime keep a core.
pub(super) fn verify_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get().saturating_sub(1))
        .max(1)
}

/// Run a task to its end and release the engine (unless it now awaits a
/// reboot or an agent restart, which keeps other mutating tasks out).
async fn drive(mut run: Run) {
    run.status.set_state(TaskState::Running);
    let action = run.payload.action.clone();
    let result = match &action {
        Some(Action::Drain(d)) => drain::run(&mut run, d).await,
        Some(Action::Patch(p)) => patch::run(&mut run, p).await,
        Some(Action::Validate(v)) => validate::run(&mut run, v).await,
        Some(Action::Undrain(u)) => undrain::run(&mut run, u).await,
        Some(Action::AckFaults(a)) => ack::run(&mut run, a).await,
        None => run.fail("task has no action"),
    };
    if let Err(e) = result {
        tracing::error!("journal write failed: {e}");
        let _ = run.fail(format!("journal write failed: {e}"));
    }
    let state = run.status.state();
    let mut gate = lock(&run.inner.gate);
    if gate.as_deref() == Some(run.status.task_id.as_str())
        && !matches!(
            state,
            TaskState::AwaitingReboot | TaskState::AwaitingRestart
        )
    {
        *gate = None;
    }
}
