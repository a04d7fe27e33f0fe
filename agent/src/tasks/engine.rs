//! The task engine: its state shared by every task (`Inner`), opening it
//! over the journal, reads of what it recorded (tasks, the drain mark,
//! activity), compaction and shutdown.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ringfence::pb::{self, TaskState};
use ringfence::time::Clock;
use ringfence::trust::TrustSet;
use tokio::sync::watch;

use super::HealthSource;
use super::config::{DrainConfig, RebootConfig, TaskConfigError};
use super::submit::verify_threads;
use crate::command::CommandRunner;
use crate::journal::{Journal, JournalError};
use crate::profiles::{PatchConfig, ProfileError, ProfilePolicy};
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

pub(super) struct Inner {
    pub(super) journal: Journal,
    pub(super) host_id: String,
    pub(super) ring: Option<u32>,
    /// Swapped whole by [`TaskEngine::set_trust`] (SIGHUP); each task is
    /// verified against the set current when it arrives.
    pub(super) trust: std::sync::RwLock<Arc<TrustSet>>,
    pub(super) drain: DrainConfig,
    pub(super) reboot: RebootConfig,
    pub(super) policy: ProfilePolicy,
    pub(super) health: Arc<dyn HealthSource>,
    pub(super) runner: Arc<dyn CommandRunner>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) boot_id: String,
    pub(super) agent_version: String,
    /// Serializes acceptance (the cheap replay/sequence re-check and the
    /// journal write; never a signature check); holds the running task's id.
    pub(super) gate: Mutex<Option<String>>,
    /// Signature verifications running at once (blocking threads).
    pub(super) verify_slots: tokio::sync::Semaphore,
    /// Submissions waiting for a verification slot.
    pub(super) verify_waiting: AtomicUsize,
    /// When the journal was last compacted (ms since the epoch).
    pub(super) compacted_at: AtomicI64,
    pub(super) watchers: Mutex<HashMap<String, watch::Sender<pb::TaskStatus>>>,
    /// The journalled drain mark (who, when, why), set before `draining`.
    pub(super) drain_mark: DrainMarkCell,
    pub(super) draining: watch::Sender<bool>,
    pub(super) activity: watch::Sender<String>,
    /// Set once a `restarts_agent` patch command succeeded: the process
    /// must exit so that systemd starts the new binary.
    pub(super) restart: watch::Sender<bool>,
    pub(super) shutting_down: AtomicBool,
    pub(super) job: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Inner {
    /// Publish the journalled drain mark: the mark first, then the draining
    /// flag (whoever sees the flag finds the mark).
    pub(super) fn sync_drain(&self) -> Result<(), JournalError> {
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
    pub(super) fn trust_now(&self) -> Arc<TrustSet> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The agent's task engine. Cheap to clone (shared state).
#[derive(Clone)]
pub struct TaskEngine {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for TaskEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskEngine")
            .field("host_id", &self.inner.host_id)
            .field("journal", &self.inner.journal.path())
            .finish_non_exhaustive()
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind;
    // keep going rather than wedge the agent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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

    pub(super) fn compact_if_due(&self) {
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
