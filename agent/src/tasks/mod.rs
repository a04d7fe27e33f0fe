//! Task execution: verify a signed task, record it durably, run it.
//!
//! [`TaskEngine::submit`] verifies a task (the six checks of
//! `ringfence::envelope`, with the journal as replay guard and the patch
//! profiles as action policy), records it as ACCEPTED and raises the
//! sequence high-water mark in one journal transaction, then runs it.
//! Every later state change is journalled before the agent acts on it.
//! At most one mutating task (drain, patch, validate, undrain) runs at a
//! time; AckFaults runs inline. A task id seen before returns its recorded
//! status and never runs again.
//!
//! At [`TaskEngine::open`] the journal is recovered: a task that was running
//! (or accepted but not finished) becomes INTERRUPTED — never a success —
//! and the host stays draining; a patch awaiting a reboot completes when the
//! boot id changed (INTERRUPTED when it did not); a patch awaiting an agent
//! restart completes when this agent runs the task's version (FAILED when
//! it came back on another).

mod ack;
mod drain;
mod patch;
mod undrain;
mod validate;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ringfence::envelope::{ActionPolicy, TaskRejection, TaskVerifier, Verified};
use ringfence::pb::{self, TaskState, task_payload::Action};
use ringfence::time::Clock;
use ringfence::trust::TrustSet;
use serde::Deserialize;
use tokio::sync::watch;
use tracing::Instrument;

use crate::command::{
    CommandError, CommandOutcome, CommandRunner, CommandSpec, unknown_placeholders,
};
use crate::journal::{Journal, JournalError, Pending, PendingKind, Txn, VersionRecord};
use crate::profiles::{PatchConfig, ProfileError, ProfilePolicy};

/// Output lines kept in a task's status.
pub const TAIL_LINES: usize = 20;

/// What the task engine needs from the health collector.
pub trait HealthSource: Send + Sync {
    /// A freshly collected report (`draining` is copied into it).
    fn fresh_report(&self, draining: bool) -> pb::HealthReport;
    /// A signed Attestation envelope over a fresh report, bound to `nonce`.
    fn attest(&self, nonce: &[u8], draining: bool) -> pb::Envelope;
    /// Acknowledge faults so they no longer count; returns the fault ids acknowledged.
    fn acknowledge(&self, ack: &pb::AckFaults) -> Vec<String>;
    /// The UNHEALTHY-severity faults of the host now that `ack` would
    /// acknowledge (fault ids). Non-empty: on a protected ring the AckFaults
    /// needs ring approvals.
    fn unhealthy_faults(&self, ack: &pb::AckFaults) -> Vec<String> {
        acked_by(&self.fresh_report(false), ack)
            .filter(|r| r.severity == pb::Verdict::Unhealthy as i32)
            .map(|r| r.fault_id.clone())
            .collect()
    }
}

/// The reasons of `report` that `ack` names: every one for empty codes,
/// limited to one GPU unless `gpu_index` is negative.
pub fn acked_by<'a>(
    report: &'a pb::HealthReport,
    ack: &'a pb::AckFaults,
) -> impl Iterator<Item = &'a pb::Reason> + 'a {
    report
        .reasons
        .iter()
        .filter(|r| ack.codes.is_empty() || ack.codes.contains(&r.code))
        .filter(|r| ack.gpu_index < 0 || r.gpu_index == ack.gpu_index)
}

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

/// What to do when a drain times out with compute processes left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The Drain task fails; the host stays drained (default).
    #[default]
    Fail,
    /// The Drain task succeeds anyway; its message names the processes left.
    Proceed,
}

/// Drain settings (scheduler hooks, the scheduler wait and the process wait).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Scheduler hook run when draining (argv; `{host_id}` and `{reason}` are
    /// substituted). Empty: none. Also accepted as `drain_hook`.
    #[serde(alias = "drain_hook")]
    pub hook: Vec<String>,
    /// Scheduler hook run when undraining (same substitutions). Empty: none.
    pub undrain_hook: Vec<String>,
    /// Scheduler wait (argv, same substitutions): after the hook, the drain
    /// runs it every `wait_interval_s` until it exits 0 (the scheduler
    /// reports no job on the host). Empty: no scheduler wait.
    pub wait_command: Vec<String>,
    /// Seconds between two runs of `wait_command` (default 10).
    pub wait_interval_s: u64,
    /// How long the drain waits for `wait_command` to exit 0, seconds
    /// (default 1800); then the Drain task fails and the host stays drained.
    pub wait_timeout_s: u64,
    /// How long a drain waits for GPU compute processes to exit, seconds
    /// (default 1800), counted from the drain's start or, with
    /// `wait_command`, from the end of the scheduler wait.
    pub timeout_s: u64,
    /// What happens at the timeout (default "fail").
    pub on_timeout: OnTimeout,
    /// How often the process list is read while waiting, ms (default 2000).
    pub poll_ms: u64,
    /// Timeout of each hook and of each run of `wait_command`, seconds (default 300).
    pub hook_timeout_s: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            hook: Vec::new(),
            undrain_hook: Vec::new(),
            wait_command: Vec::new(),
            wait_interval_s: 10,
            wait_timeout_s: 1800,
            timeout_s: 1800,
            on_timeout: OnTimeout::Fail,
            poll_ms: 2000,
            hook_timeout_s: 300,
        }
    }
}

/// How the host reboots after a `reboot = true` patch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebootConfig {
    /// The reboot command (default `["/usr/bin/systemctl", "reboot"]`).
    pub command: Vec<String>,
    /// Its timeout, seconds (default 300).
    pub timeout_s: u64,
}

impl Default for RebootConfig {
    fn default() -> Self {
        Self {
            command: vec!["/usr/bin/systemctl".into(), "reboot".into()],
            timeout_s: 300,
        }
    }
}

/// Task settings are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskConfigError {
    /// a drain or reboot key has an unacceptable value
    #[error("key `{key}`: {message}")]
    Invalid {
        /// The key under `[drain]` or `[reboot]`.
        key: &'static str,
        /// What is wrong with the value.
        message: String,
    },
}

impl DrainConfig {
    /// Check hooks and durations; called at config load.
    pub fn validate(&self) -> Result<(), TaskConfigError> {
        for (key, argv) in [
            ("hook", &self.hook),
            ("undrain_hook", &self.undrain_hook),
            ("wait_command", &self.wait_command),
        ] {
            if argv.first().is_some_and(String::is_empty) {
                return Err(TaskConfigError::Invalid {
                    key,
                    message: "must name a program".into(),
                });
            }
            if argv.first().is_some_and(|p| p.contains('{')) {
                return Err(TaskConfigError::Invalid {
                    key,
                    message: "the program (first element) may not contain a substitution".into(),
                });
            }
            for arg in argv {
                let bad = unknown_placeholders(arg, &["host_id", "reason"]);
                if !bad.is_empty() {
                    return Err(TaskConfigError::Invalid {
                        key,
                        message: format!(
                            "unknown substitution {} in `{arg}`; only {{host_id}} and {{reason}} exist",
                            bad.join(", ")
                        ),
                    });
                }
            }
        }
        for (key, v) in [
            ("timeout_s", self.timeout_s),
            ("poll_ms", self.poll_ms),
            ("hook_timeout_s", self.hook_timeout_s),
            ("wait_interval_s", self.wait_interval_s),
            ("wait_timeout_s", self.wait_timeout_s),
        ] {
            if v == 0 {
                return Err(TaskConfigError::Invalid {
                    key,
                    message: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

impl RebootConfig {
    /// Check the reboot command; called at config load.
    pub fn validate(&self) -> Result<(), TaskConfigError> {
        if self.command.first().is_none_or(String::is_empty) {
            return Err(TaskConfigError::Invalid {
                key: "command",
                message: "must name a program".into(),
            });
        }
        if self.timeout_s == 0 {
            return Err(TaskConfigError::Invalid {
                key: "timeout_s",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
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

/// Task records are kept at least this long after their last change
/// (and never less than the trust policy's task lifetime cap plus twice
/// the clock skew); older finished tasks are compacted away.
pub const JOURNAL_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How often (at most) an accepted task triggers a journal compaction.
const COMPACT_EVERY_MS: i64 = 3600 * 1000;

/// The engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// the journal could not be opened or recovered
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// a patch profile is invalid
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// a drain or reboot setting is invalid
    #[error(transparent)]
    Config(#[from] TaskConfigError),
}

/// Everything [`TaskEngine::open`] needs.
pub struct EngineParts {
    /// State directory; the journal is `<state_dir>/journal.redb`.
    pub state_dir: std::path::PathBuf,
    /// This agent's host id.
    pub host_id: String,
    /// This agent's ring (`ring` in agent.toml); `None`: protected.
    pub ring: Option<u32>,
    /// The trust file.
    pub trust: TrustSet,
    /// Drain settings.
    pub drain: DrainConfig,
    /// Reboot settings.
    pub reboot: RebootConfig,
    /// Patch profiles.
    pub patch: PatchConfig,
    /// The health collector.
    pub health: Arc<dyn HealthSource>,
    /// The executor seam.
    pub runner: Arc<dyn CommandRunner>,
    /// Source of "now".
    pub clock: Arc<dyn Clock>,
    /// `/proc/sys/kernel/random/boot_id` now.
    pub boot_id: String,
    /// The running agent's version (`ringfence::VERSION`).
    pub agent_version: String,
    /// Where the engine publishes the drain mark it journals (the daemon
    /// shares it with the report source, so that reports collected while
    /// draining carry it).
    pub drain_mark: DrainMarkCell,
}

/// The host's drain mark as the engine last journalled it (`None`: in
/// service). Cheap to clone; every clone sees the same mark.
#[derive(Debug, Clone, Default)]
pub struct DrainMarkCell(Arc<std::sync::RwLock<Option<pb::DrainMark>>>);

impl DrainMarkCell {
    /// The mark now.
    pub fn get(&self) -> Option<pb::DrainMark> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, mark: Option<pb::DrainMark>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = mark;
    }
}

impl std::fmt::Debug for EngineParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineParts")
            .field("state_dir", &self.state_dir)
            .field("host_id", &self.host_id)
            .field("ring", &self.ring)
            .finish_non_exhaustive()
    }
}

struct Inner {
    journal: Journal,
    host_id: String,
    ring: Option<u32>,
    /// Swapped whole by [`TaskEngine::set_trust`] (SIGHUP); each task is
    /// verified against the set current when it arrives.
    trust: std::sync::RwLock<Arc<TrustSet>>,
    drain: DrainConfig,
    reboot: RebootConfig,
    policy: ProfilePolicy,
    health: Arc<dyn HealthSource>,
    runner: Arc<dyn CommandRunner>,
    clock: Arc<dyn Clock>,
    boot_id: String,
    agent_version: String,
    /// Serializes acceptance (the cheap replay/sequence re-check and the
    /// journal write; never a signature check); holds the running task's id.
    gate: Mutex<Option<String>>,
    /// Signature verifications running at once (blocking threads).
    verify_slots: tokio::sync::Semaphore,
    /// Submissions waiting for a verification slot.
    verify_waiting: AtomicUsize,
    /// When the journal was last compacted (ms since the epoch).
    compacted_at: AtomicI64,
    watchers: Mutex<HashMap<String, watch::Sender<pb::TaskStatus>>>,
    /// The journalled drain mark (who, when, why), set before `draining`.
    drain_mark: DrainMarkCell,
    draining: watch::Sender<bool>,
    activity: watch::Sender<String>,
    /// Set once a `restarts_agent` patch command succeeded: the process
    /// must exit so that systemd starts the new binary.
    restart: watch::Sender<bool>,
    shutting_down: AtomicBool,
    job: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Inner {
    /// Publish the journalled drain mark: the mark first, then the draining
    /// flag (whoever sees the flag finds the mark).
    fn sync_drain(&self) -> Result<(), JournalError> {
        let mark = self.journal.drain_mark()?;
        let drained = mark.is_some();
        self.drain_mark
            .set(mark.as_ref().map(crate::journal::DrainMark::to_pb));
        self.draining.send_if_modified(|d| {
            let changed = *d != drained;
            *d = drained;
            changed
        });
        Ok(())
    }

    /// The trust set current now (see [`TaskEngine::set_trust`]).
    fn trust_now(&self) -> Arc<TrustSet> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The agent's task engine. Cheap to clone (shared state).
#[derive(Clone)]
pub struct TaskEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for TaskEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskEngine")
            .field("host_id", &self.inner.host_id)
            .field("journal", &self.inner.journal.path())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // keep going rather than wedge the agent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

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

/// Whether a state is final.
pub fn is_terminal(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::Succeeded | TaskState::Failed | TaskState::Interrupted
    )
}

impl TaskEngine {
    /// Open the journal, recover from a crash or reboot, and get ready.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        state_dir: &Path,
        host_id: String,
        ring: Option<u32>,
        trust: TrustSet,
        drain: DrainConfig,
        reboot: RebootConfig,
        patch: PatchConfig,
        health: Arc<dyn HealthSource>,
        runner: Arc<dyn CommandRunner>,
        clock: Arc<dyn Clock>,
        boot_id: String,
        agent_version: String,
    ) -> Result<Self, EngineError> {
        Self::open_parts(EngineParts {
            state_dir: state_dir.to_path_buf(),
            host_id,
            ring,
            trust,
            drain,
            reboot,
            patch,
            health,
            runner,
            clock,
            boot_id,
            agent_version,
            drain_mark: DrainMarkCell::default(),
        })
    }

    /// [`TaskEngine::open`] with named parts.
    pub fn open_parts(p: EngineParts) -> Result<Self, EngineError> {
        p.drain.validate()?;
        p.reboot.validate()?;
        let policy = ProfilePolicy::new(&p.patch)?;
        let journal = Journal::open(&p.state_dir)?;
        journal.init_created_at(p.clock.now_ms())?;
        if p.ring.is_none() {
            tracing::warn!(
                host_id = %p.host_id,
                "no `ring` configured in agent.toml: this agent treats itself as protected (every Patch, rollback, forced Undrain and AckFaults of an UNHEALTHY fault needs ring approvals)"
            );
        }
        let (draining, _) = watch::channel(false);
        let (activity, _) = watch::channel("idle".to_string());
        let (restart, _) = watch::channel(false);
        let engine = Self {
            inner: Arc::new(Inner {
                journal,
                host_id: p.host_id,
                ring: p.ring,
                trust: std::sync::RwLock::new(Arc::new(p.trust)),
                drain: p.drain,
                reboot: p.reboot,
                policy,
                health: p.health,
                runner: p.runner,
                clock: p.clock,
                boot_id: p.boot_id,
                agent_version: p.agent_version,
                gate: Mutex::new(None),
                verify_slots: tokio::sync::Semaphore::new(verify_threads()),
                verify_waiting: AtomicUsize::new(0),
                compacted_at: AtomicI64::new(0),
                watchers: Mutex::new(HashMap::new()),
                drain_mark: p.drain_mark,
                draining,
                activity,
                restart,
                shutting_down: AtomicBool::new(false),
                job: Mutex::new(None),
            }),
        };
        engine.recover()?;
        engine.compact()?;
        engine.inner.sync_drain()?;
        Ok(engine)
    }

    fn recover(&self) -> Result<(), JournalError> {
        let inner = &self.inner;
        let pending = inner.journal.pending()?;
        let now = inner.clock.now_ms();
        for mut t in inner.journal.tasks()? {
            let state = t.state();
            if is_terminal(state) {
                continue;
            }
            let pend = pending.as_ref().filter(|p| p.task_id == t.task_id);
            let mut installed = None;
            match (state, pend) {
                (TaskState::AwaitingReboot, Some(p)) if p.kind == PendingKind::Reboot => {
                    if p.boot_id == inner.boot_id {
                        t.set_state(TaskState::Interrupted);
                        t.message = format!(
                            "the agent restarted but the boot id is unchanged ({}): the reboot after the patch did not happen",
                            p.boot_id
                        );
                    } else {
                        t.set_state(TaskState::Succeeded);
                        t.step = "reboot".into();
                        t.message = format!(
                            "rebooted (boot id {} -> {}); profile `{}` at version {} (was {})",
                            p.boot_id, inner.boot_id, p.profile, p.version_after, p.version_before
                        );
                        installed = Some(p);
                    }
                }
                (TaskState::AwaitingRestart, Some(p)) if p.kind == PendingKind::Restart => {
                    if inner.agent_version == p.version_after {
                        t.set_state(TaskState::Succeeded);
                        t.step = "restart".into();
                        t.message = format!(
                            "ringfenced restarted on version {} (was {})",
                            inner.agent_version, p.agent_version
                        );
                        installed = Some(p);
                    } else {
                        t.set_state(TaskState::Failed);
                        let old = if inner.agent_version == p.agent_version {
                            "the old version "
                        } else {
                            ""
                        };
                        t.message = format!(
                            "ringfenced came back on {old}{}, expected {}",
                            inner.agent_version, p.version_after
                        );
                    }
                }
                _ => {
                    t.set_state(TaskState::Interrupted);
                    t.message = format!(
                        "the agent stopped while this task was {} at step `{}`; it may be half done and is not resumed (host stays drained)",
                        state.as_str_name(),
                        t.step
                    );
                }
            }
            t.updated_at_unix_ms = now;
            tracing::warn!(task_id = %t.task_id, wave_id = %t.wave_id, host_id = %t.host_id,
                state = t.state().as_str_name(), "recovered task: {}", t.message);
            let clear_pending = pend.is_some();
            inner.journal.write(|tx| {
                tx.put_task(&t)?;
                if let Some(p) = installed {
                    tx.set_installed(
                        &p.profile,
                        &VersionRecord {
                            before: p.version_before.clone(),
                            after: p.version_after.clone(),
                            task_id: p.task_id.clone(),
                            at_unix_ms: now,
                        },
                    )?;
                }
                if clear_pending {
                    tx.set_pending(None)?;
                }
                Ok(())
            })?;
            crate::metrics::task_status(&t);
        }
        // A pending record whose task is already final is stale.
        if let Some(p) = pending
            && inner
                .journal
                .task(&p.task_id)?
                .is_none_or(|t| is_terminal(t.state()))
        {
            inner.journal.write(|tx| tx.set_pending(None))?;
        }
        Ok(())
    }

    /// The trust set tasks are verified against now.
    pub fn trust(&self) -> Arc<TrustSet> {
        self.inner.trust_now()
    }

    /// Replace the trust set (a reloaded trust file): tasks arriving from
    /// now on are verified against it, so a newly revoked coordinator or
    /// approver key is refused without a restart.
    pub fn set_trust(&self, trust: TrustSet) {
        *self
            .inner
            .trust
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(trust);
    }

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

    /// The recorded status of a task.
    pub fn get(&self, task_id: &str) -> Option<pb::TaskStatus> {
        if let Some(tx) = lock(&self.inner.watchers).get(task_id) {
            return Some(tx.borrow().clone());
        }
        match self.inner.journal.task(task_id) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("reading task `{task_id}`: {e}");
                None
            }
        }
    }

    /// The task's status now and every later change. `None` for an unknown id.
    /// Only unfinished tasks have an entry in the watcher map (removed when
    /// the task ends); a finished task's receiver holds its final status.
    pub fn watch(&self, task_id: &str) -> Option<watch::Receiver<pb::TaskStatus>> {
        let mut watchers = lock(&self.inner.watchers);
        if let Some(tx) = watchers.get(task_id) {
            return Some(tx.subscribe());
        }
        let status = match self.inner.journal.task(task_id) {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                tracing::error!("reading task `{task_id}`: {e}");
                return None;
            }
        };
        let terminal = is_terminal(status.state());
        let (tx, rx) = watch::channel(status);
        if !terminal {
            watchers.insert(task_id.to_string(), tx);
        }
        Some(rx)
    }

    /// Tasks with an entry in the watcher map (unfinished tasks only).
    pub fn watched_tasks(&self) -> usize {
        lock(&self.inner.watchers).len()
    }

    /// Every task of `wave` (all tasks when empty), oldest first.
    pub fn list(&self, wave: &str) -> Vec<pb::TaskStatus> {
        match self.inner.journal.tasks() {
            Ok(tasks) => tasks
                .into_iter()
                .filter(|t| wave.is_empty() || t.wave_id == wave)
                .collect(),
            Err(e) => {
                tracing::error!("listing tasks: {e}");
                Vec::new()
            }
        }
    }

    /// At most `limit` tasks of `wave` (all waves when empty) with a sequence
    /// above `after`, oldest first, and whether more follow.
    pub fn list_page(
        &self,
        wave: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<pb::TaskStatus>, bool), JournalError> {
        self.inner.journal.tasks_page(wave, after, limit)
    }

    /// How long finished task records are kept: [`JOURNAL_RETENTION`], and
    /// at least the task lifetime cap plus twice the clock skew, so that a
    /// task id is known for as long as any task bearing it could be valid.
    pub fn retention(&self) -> Duration {
        let trust = self.inner.trust_now();
        let p = &trust.policy;
        let floor = p
            .max_task_lifetime_s
            .saturating_add(p.max_clock_skew_s.saturating_mul(2));
        JOURNAL_RETENTION.max(Duration::from_secs(floor))
    }

    /// Remove finished task records older than [`TaskEngine::retention`]
    /// (never an unfinished task, never the sequence high-water mark).
    /// Runs at open and at most hourly after an accepted task.
    pub fn compact(&self) -> Result<usize, JournalError> {
        let now = self.inner.clock.now_ms();
        self.inner.compacted_at.store(now, Ordering::SeqCst);
        let keep_ms = i64::try_from(self.retention().as_millis()).unwrap_or(i64::MAX);
        let removed = self.inner.journal.compact(now.saturating_sub(keep_ms))?;
        if removed > 0 {
            tracing::info!(
                removed,
                retention_s = self.retention().as_secs(),
                "journal compacted"
            );
        }
        Ok(removed)
    }

    fn compact_if_due(&self) {
        let now = self.inner.clock.now_ms();
        if now.saturating_sub(self.inner.compacted_at.load(Ordering::SeqCst)) < COMPACT_EVERY_MS {
            return;
        }
        self.inner.compacted_at.store(now, Ordering::SeqCst);
        let engine = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = engine.compact() {
                tracing::error!("journal compaction failed: {e}");
            }
        });
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

    /// Whether the host is marked draining; changes as drains and undrains happen.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.inner.draining.subscribe()
    }

    /// Who drained the host, when and why (`None`: in service).
    pub fn drain_mark(&self) -> Option<pb::DrainMark> {
        self.inner.drain_mark.get()
    }

    /// The engine's clock (the [`EngineParts::clock`] it was opened with),
    /// for the agent's other timestamps (attestations).
    pub(crate) fn clock(&self) -> &dyn Clock {
        self.inner.clock.as_ref()
    }

    /// The names of the configured patch profiles, sorted.
    pub fn patch_profiles(&self) -> Vec<String> {
        self.inner.policy.names()
    }

    /// One line about what the engine is doing, for systemd STATUS.
    pub fn activity(&self) -> watch::Receiver<String> {
        self.inner.activity.subscribe()
    }

    /// Completes once a `restarts_agent` patch has installed a new agent and
    /// its task is journalled AWAITING_RESTART: the caller should shut down
    /// and exit so that the service manager starts the new binary.
    pub async fn restart_requested(&self) {
        let mut rx = self.inner.restart.subscribe();
        // The sender lives in the engine, so this only ends when it is set.
        let _ = rx.wait_for(|requested| *requested).await;
    }

    /// This agent's configured ring (`None`: not configured).
    pub fn ring(&self) -> Option<u32> {
        self.inner.ring
    }

    /// Whether this agent asks ring approvals (for Patch, rollback, forced
    /// Undrain and AckFaults of an UNHEALTHY fault): its ring is protected by
    /// the trust policy, or no ring is configured.
    pub fn protected_ring(&self) -> bool {
        self.inner
            .ring
            .is_none_or(|r| self.inner.trust_now().policy.protected_rings.contains(&r))
    }

    /// The highest task sequence accepted (0 if none or unreadable).
    pub fn high_water(&self) -> u64 {
        self.inner.journal.high_water().unwrap_or_else(|e| {
            tracing::error!("reading the high-water mark: {e}");
            0
        })
    }

    /// The id of the mutating task that holds the engine, if any.
    pub fn running_task(&self) -> Option<String> {
        lock(&self.inner.gate).clone()
    }

    /// The journal (for the drain mark, validation and version records).
    pub fn journal(&self) -> &Journal {
        &self.inner.journal
    }

    /// Graceful stop: refuse new tasks, give the running step up to `grace`
    /// to finish, then sync the journal. Returns false when the step was
    /// still running at the end of `grace` (it is INTERRUPTED at next start).
    pub async fn shutdown(&self, grace: Duration) -> Result<bool, JournalError> {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner
            .activity
            .send_replace("stopping: no new tasks".to_string());
        let job = lock(&self.inner.job).take();
        let finished = match job {
            Some(handle) if !handle.is_finished() => {
                tracing::info!(
                    grace_s = grace.as_secs(),
                    "waiting for the running task step"
                );
                tokio::time::timeout(grace, handle).await.is_ok()
            }
            _ => true,
        };
        if !finished {
            tracing::warn!("a task step was still running at shutdown; it will be INTERRUPTED");
        }
        self.inner.journal.sync()?;
        Ok(finished)
    }
}

/// One running task: its payload and its current status.
pub(crate) struct Run {
    inner: Arc<Inner>,
    status: pb::TaskStatus,
    payload: pb::TaskPayload,
    /// Trust-file id of the coordinator key that signed the task.
    coordinator: String,
    /// Trust-file ids of the approver keys whose ring approvals the task carried.
    approvers: Vec<String>,
}

impl Run {
    /// Journal the status (with extra records in the same transaction),
    /// then publish it to watchers.
    fn save_with(
        &mut self,
        extra: impl FnOnce(&mut Txn<'_>) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        self.status.updated_at_unix_ms = self.inner.clock.now_ms();
        let status = &self.status;
        self.inner.journal.write(|t| {
            t.put_task(status)?;
            extra(t)
        })?;
        crate::metrics::task_status(status);
        // The drain mark and flag follow the journal before anyone sees the
        // new status (health goes NOT_SERVING the moment the mark is written).
        self.inner.sync_drain()?;
        tracing::info!(
            state = status.state().as_str_name(),
            step = %status.step,
            "{}",
            status.message
        );
        if is_terminal(status.state()) {
            // Free the engine before anyone watching sees the end, so that
            // the next task submitted on that signal is not refused as busy.
            let mut gate = lock(&self.inner.gate);
            if gate.as_deref() == Some(status.task_id.as_str()) {
                *gate = None;
            }
        }
        let line = if is_terminal(status.state()) {
            format!(
                "idle; last task {} {}",
                status.task_id,
                status.state().as_str_name()
            )
        } else {
            format!(
                "{} {} {}: step {}",
                status.state().as_str_name(),
                status.action,
                status.task_id,
                status.step
            )
        };
        self.inner.activity.send_replace(line);
        // Watchers last: whoever reacts to this status sees the engine's
        // gate, draining flag and activity line already updated. A finished
        // task leaves the map (its receivers keep the final status).
        let mut watchers = lock(&self.inner.watchers);
        if is_terminal(status.state()) {
            if let Some(tx) = watchers.remove(&status.task_id) {
                tx.send_replace(status.clone());
            }
        } else if let Some(tx) = watchers.get(&status.task_id) {
            tx.send_replace(status.clone());
        }
        Ok(())
    }

    fn save(&mut self) -> Result<(), JournalError> {
        self.save_with(|_| Ok(()))
    }

    /// Enter a step (state RUNNING).
    fn step(&mut self, step: &str, message: impl Into<String>) -> Result<(), JournalError> {
        self.status.set_state(TaskState::Running);
        self.status.step = step.to_string();
        self.status.message = message.into();
        self.save()
    }

    /// End the task (or park it awaiting a reboot/restart).
    fn finish_with(
        &mut self,
        state: TaskState,
        message: impl Into<String>,
        extra: impl FnOnce(&mut Txn<'_>) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        self.status.set_state(state);
        self.status.message = message.into();
        self.save_with(extra)
    }

    fn fail(&mut self, message: impl Into<String>) -> Result<(), JournalError> {
        self.finish_with(TaskState::Failed, message, |_| Ok(()))
    }

    fn draining_now(&self) -> Result<bool, JournalError> {
        Ok(self.inner.journal.drain_mark()?.is_some())
    }

    /// Run a command through the executor, recording exit code and output tail.
    async fn command(
        &mut self,
        label: &str,
        argv: Vec<String>,
        timeout: Duration,
        extra_env: &[(&str, &str)],
    ) -> Result<CommandOutcome, CommandError> {
        let mut env = vec![
            ("RINGFENCE_TASK_ID".to_string(), self.status.task_id.clone()),
            ("RINGFENCE_WAVE_ID".to_string(), self.status.wave_id.clone()),
            ("RINGFENCE_HOST_ID".to_string(), self.status.host_id.clone()),
        ];
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string())),
        );
        let spec = CommandSpec {
            label: label.to_string(),
            argv,
            env,
            timeout,
            tail_lines: TAIL_LINES,
        };
        let outcome = self.inner.runner.run(spec).await?;
        self.status.exit_code = outcome.code_or_minus_one();
        self.status.output_tail = outcome.tail.clone();
        Ok(outcome)
    }

    /// A fresh health report, read off the async threads (NVML may block).
    async fn fresh_report(&self, draining: bool) -> Result<pb::HealthReport, String> {
        let health = self.inner.health.clone();
        tokio::task::spawn_blocking(move || health.fresh_report(draining))
            .await
            .map_err(|e| format!("health collection failed: {e}"))
    }

    fn pending(&self, kind: PendingKind, profile: &str) -> Pending {
        Pending {
            task_id: self.status.task_id.clone(),
            kind,
            profile: profile.to_string(),
            version_before: self.status.version_before.clone(),
            version_after: self.status.version_after.clone(),
            boot_id: self.inner.boot_id.clone(),
            agent_version: self.inner.agent_version.clone(),
            since_unix_ms: self.inner.clock.now_ms(),
        }
    }
}

/// Signature verifications that may run at once: one thread less than the
/// machine has (at least one), so that health and the runtime keep a core.
fn verify_threads() -> usize {
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
