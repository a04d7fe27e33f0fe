//! One running task ([`Run`]): its status, journalled before the agent acts
//! on it ([`Run::save_with`] orders the durable effects), its steps and
//! commands.

use std::sync::Arc;
use std::time::Duration;

use ringfence::pb::{self, TaskState};

use super::TAIL_LINES;
use super::engine::{Inner, is_terminal, lock};
use crate::command::{CommandError, CommandOutcome, CommandSpec};
use crate::journal::{JournalError, Pending, PendingKind, Txn};
/// One running task: its payload and its current status.
pub(crate) struct Run {
    pub(super) inner: Arc<Inner>,
    pub(super) status: pb::TaskStatus,
    pub(super) payload: pb::TaskPayload,
    /// Trust-file id of the coordinator key that signed the task.
    pub(super) coordinator: String,
    /// Trust-file ids of the approver keys whose ring approvals the task carried.
    pub(super) approvers: Vec<String>,
}

impl Run {
    /// Journal the status (with extra records in the same transaction),
    /// then publish it to watchers.
    pub(super) fn save_with(
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

    pub(super) fn save(&mut self) -> Result<(), JournalError> {
        self.save_with(|_| Ok(()))
    }

    /// Enter a step (state RUNNING).
    pub(super) fn step(
        &mut self,
        step: &str,
        message: impl Into<String>,
    ) -> Result<(), JournalError> {
        self.status.set_state(TaskState::Running);
        self.status.step = step.to_string();
        self.status.message = message.into();
        self.save()
    }

    /// End the task (or park it awaiting a reboot/restart).
    pub(super) fn finish_with(
        &mut self,
        state: TaskState,
        message: impl Into<String>,
        extra: impl FnOnce(&mut Txn<'_>) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        self.status.set_state(state);
        self.status.message = message.into();
        self.save_with(extra)
    }

    pub(super) fn fail(&mut self, message: impl Into<String>) -> Result<(), JournalError> {
        self.finish_with(TaskState::Failed, message, |_| Ok(()))
    }

    pub(super) fn draining_now(&self) -> Result<bool, JournalError> {
        Ok(self.inner.journal.drain_mark()?.is_some())
    }

    /// Run a command through the executor, recording exit code and output tail.
    pub(super) async fn command(
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
    pub(super) async fn fresh_report(&self, draining: bool) -> Result<pb::HealthReport, String> {
        let health = self.inner.health.clone();
        tokio::task::spawn_blocking(move || health.fresh_report(draining))
            .await
            .map_err(|e| format!("health collection failed: {e}"))
    }

    pub(super) fn pending(&self, kind: PendingKind, profile: &str) -> Pending {
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
