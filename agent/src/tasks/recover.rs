//! Recovery at [`super::TaskEngine::open`]: a task that was running
//! becomes INTERRUPTED, a patch awaiting a reboot or an agent restart
//! completes or fails.

use ringfence::pb::TaskState;

use super::engine::{TaskEngine, is_terminal};
use crate::journal::{JournalError, PendingKind, VersionRecord};
impl TaskEngine {
    pub(super) fn recover(&self) -> Result<(), JournalError> {
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
}
