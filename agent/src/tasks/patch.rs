//! Patch: run a profile's argv (from local config, `{version}` substituted
//! with the verified version) in its own process group with its timeout;
//! the exit status decides. `reboot = true` parks the task in
//! AWAITING_REBOOT and runs the reboot command; `restarts_agent = true`
//! parks it in AWAITING_RESTART before the command runs and, once the
//! command succeeded, asks the process to exit for a restart
//! ([`super::TaskEngine::restart_requested`]; `ringfenced` exits 75 and
//! systemd starts the new binary). `TaskEngine::open` finishes either at
//! the next start. A rollback runs the same profile toward the version recorded
//! before the last patch.
//!
//! A profile with `require_drained` (the default) patches only a drained
//! host: marked draining by a Drain task that SUCCEEDED (see
//! `not_drained`); otherwise the task fails with a message
//! ``patch refused by `not_drained`: …``.

use std::time::Duration;

use ringfence::pb::{self, TaskState};

use super::Run;
use crate::command::substitute;
use crate::journal::{JournalError, PendingKind, VersionRecord};

pub(super) async fn run(run: &mut Run, p: &pb::Patch) -> Result<(), JournalError> {
    let Some(profile) = run.inner.policy.profile(&p.profile).cloned() else {
        return run.fail(format!("unknown patch profile `{}`", p.profile));
    };
    run.step("check", format!("checking patch profile `{}`", p.profile))?;
    if profile.require_drained
        && let Some(why) = not_drained(run)?
    {
        return run.fail(format!(
            "patch refused by `not_drained`: {why} (profile `{}` has require_drained = true); run a Drain task first",
            p.profile
        ));
    }
    let record = run.inner.journal.installed(&p.profile)?;
    let before = if p.rollback {
        match &record {
            None => {
                return run.fail(format!(
                    "rollback refused: no earlier patch with profile `{}` is recorded",
                    p.profile
                ));
            }
            Some(r) if r.before != p.version || r.before.is_empty() => {
                return run.fail(format!(
                    "rollback refused: the version recorded before the last patch with profile `{}` is `{}`, the task asks for `{}`",
                    p.profile, r.before, p.version
                ));
            }
            Some(r) => r.after.clone(),
        }
    } else if let Some(r) = &record {
        r.after.clone()
    } else if profile.restarts_agent {
        run.inner.agent_version.clone()
    } else {
        match run.fresh_report(run.draining_now()?).await {
            Ok(r) => r.driver_version,
            Err(e) => return run.fail(e),
        }
    };
    run.status.version_before = before.clone();
    run.status.version_after = p.version.clone();

    let argv = match substitute(&profile.argv, &[("version", &p.version)]) {
        Ok(a) => a,
        Err(e) => return run.fail(format!("patch command: {e}")),
    };
    let what = if p.rollback {
        "rolling back"
    } else {
        "patching"
    };
    let message = format!(
        "{what} profile `{}` from `{before}` to `{}`: running `{}`",
        p.profile, p.version, argv[0]
    );
    run.status.step = "command".into();
    run.status.message = message;
    // A patch invalidates the last validation: undrain needs a new one.
    if profile.restarts_agent {
        // The command will restart this agent: record the wait before it runs.
        let pending = run.pending(PendingKind::Restart, &p.profile);
        run.status.set_state(TaskState::AwaitingRestart);
        run.save_with(|t| {
            t.set_last_validation(None)?;
            t.set_pending(Some(&pending))
        })?;
    } else {
        run.status.set_state(TaskState::Running);
        run.save_with(|t| t.set_last_validation(None))?;
    }

    let timeout = Duration::from_secs(profile.timeout_s);
    let env = [("RINGFENCE_VERSION", p.version.as_str())];
    let outcome = run
        .command("patch command", argv.clone(), timeout, &env)
        .await;
    let failure = match outcome {
        Err(e) => Some(e.to_string()),
        Ok(o) if !o.success() => Some(format!(
            "patch command `{}` {}",
            argv[0],
            o.describe(timeout)
        )),
        Ok(_) => None,
    };
    if let Some(reason) = failure {
        return run.finish_with(TaskState::Failed, reason, |t| t.set_pending(None));
    }

    if profile.restarts_agent {
        run.status.step = "await_restart".into();
        run.status.message = format!(
            "patch command succeeded; waiting for ringfenced to restart on version `{}` (running `{}`)",
            p.version, run.inner.agent_version
        );
        run.save()?;
        // Journalled: now the old process must go so the new binary starts.
        tracing::info!(version = %p.version, "self-upgrade installed; asking the agent to restart");
        run.inner.restart.send_replace(true);
        return Ok(());
    }

    if profile.reboot {
        let pending = run.pending(PendingKind::Reboot, &p.profile);
        run.status.set_state(TaskState::AwaitingReboot);
        run.status.step = "reboot".into();
        run.status.message = format!(
            "patch command succeeded; rebooting (boot id {})",
            run.inner.boot_id
        );
        run.save_with(|t| t.set_pending(Some(&pending)))?;
        let reboot = run.inner.reboot.clone();
        let timeout = Duration::from_secs(reboot.timeout_s);
        let saved_tail = run.status.output_tail.clone();
        let saved_code = run.status.exit_code;
        let outcome = run
            .command("reboot command", reboot.command.clone(), timeout, &[])
            .await;
        let failure = match outcome {
            Err(e) => Some(e.to_string()),
            Ok(o) if !o.success() => Some(format!(
                "reboot command `{}` {}",
                reboot.command[0],
                o.describe(timeout)
            )),
            Ok(_) => None,
        };
        if let Some(reason) = failure {
            return run.finish_with(
                TaskState::Failed,
                format!("the patch command succeeded but the host did not reboot: {reason}"),
                |t| t.set_pending(None),
            );
        }
        // Keep the patch command's output and status in the record.
        run.status.output_tail = saved_tail;
        run.status.exit_code = saved_code;
        run.status.message = format!(
            "reboot requested; the patch finishes when the agent starts on a new boot (boot id now {})",
            run.inner.boot_id
        );
        return run.save();
    }

    let installed = VersionRecord {
        before: before.clone(),
        after: p.version.clone(),
        task_id: run.status.task_id.clone(),
        at_unix_ms: run.inner.clock.now_ms(),
    };
    let profile_name = p.profile.clone();
    run.finish_with(
        TaskState::Succeeded,
        format!(
            "profile `{}` {} from `{before}` to `{}`",
            p.profile,
            if p.rollback { "rolled back" } else { "patched" },
            p.version
        ),
        |t| t.set_installed(&profile_name, &installed),
    )
}

/// Why the host does not count as drained (None: it does). Drained means
/// marked draining AND the Drain task the mark names (the latest drain)
/// SUCCEEDED: a drain that failed or was interrupted (the scheduler wait
/// timed out, a hook failed, the agent restarted) leaves the mark, yet jobs
/// may still run. The journal keeps that task's record as long as the
/// mark names it ([`crate::journal::Journal::compact`]); a mark whose
/// record is gone was written, and the record removed, by an older agent,
/// and counts as drained, as it did then.
fn not_drained(run: &Run) -> Result<Option<String>, JournalError> {
    let Some(mark) = run.inner.journal.drain_mark()? else {
        return Ok(Some("the host is not drained".into()));
    };
    Ok(match run.inner.journal.task(&mark.task_id)? {
        Some(t) if t.state() != TaskState::Succeeded => Some(format!(
            "the drain of task `{}` did not complete ({}: {})",
            mark.task_id,
            t.state().as_str_name().trim_start_matches("TASK_STATE_"),
            t.message
        )),
        _ => None,
    })
}
