//! Validate: run the profile's smoke test (if any, bounded by its own
//! timeout), then take a signed attestation over a fresh health report
//! bound to the task's nonce, and compare the attested driver and CUDA
//! versions with the task's expectation. SUCCEEDED iff the verdict is
//! HEALTHY, the versions match and the smoke test passed. The outcome is
//! the "last validation" an Undrain checks.

use std::time::Duration;

use prost::Message;
use ringfence::pb::{self, TaskState, Verdict};

use super::Run;
use crate::journal::{JournalError, ValidationRecord};

pub(super) async fn run(run: &mut Run, v: &pb::Validate) -> Result<(), JournalError> {
    let mut problems = Vec::new();
    let draining = run.draining_now()?;

    let smoke = if v.profile.is_empty() {
        None
    } else {
        run.inner.policy.profile(&v.profile).and_then(|p| {
            p.validate_command
                .clone()
                .map(|c| (c, p.validate_timeout_s))
        })
    };
    if let Some((argv, timeout_s)) = smoke {
        run.step("smoke", format!("running smoke test `{}`", argv[0]))?;
        let timeout = Duration::from_secs(timeout_s);
        match run.command("smoke test", argv.clone(), timeout, &[]).await {
            Ok(o) if o.success() => {}
            Ok(o) => problems.push(format!("smoke test `{}` {}", argv[0], o.describe(timeout))),
            Err(e) => problems.push(e.to_string()),
        }
    }

    run.step("attest", "collecting a fresh health report")?;
    let health = run.inner.health.clone();
    let nonce = v.nonce.clone();
    let env = match tokio::task::spawn_blocking(move || health.attest(&nonce, draining)).await {
        Ok(env) => env,
        Err(e) => return run.fail(format!("health attestation failed: {e}")),
    };
    let att = match pb::Attestation::decode(env.payload.as_slice()) {
        Ok(a) => a,
        Err(e) => {
            return run.fail(format!(
                "the health source produced an undecodable attestation: {e}"
            ));
        }
    };
    let report = att.report.clone().unwrap_or_default();
    let verdict = Verdict::try_from(att.verdict).unwrap_or(Verdict::Unspecified);
    if verdict != Verdict::Healthy {
        let codes: Vec<String> = report
            .reasons
            .iter()
            .filter(|r| r.severity != Verdict::Healthy as i32)
            .map(|r| {
                if r.gpu_index >= 0 {
                    format!("{} (gpu {})", r.code, r.gpu_index)
                } else {
                    r.code.clone()
                }
            })
            .collect();
        problems.insert(
            0,
            format!(
                "verdict is {}{}",
                verdict.as_str_name(),
                if codes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", codes.join(", "))
                }
            ),
        );
    }
    if !v.expect_driver_version.is_empty() && report.driver_version != v.expect_driver_version {
        problems.push(format!(
            "driver version is `{}`, expected `{}`",
            report.driver_version, v.expect_driver_version
        ));
    }
    if !v.expect_cuda_version.is_empty() && report.cuda_driver_version != v.expect_cuda_version {
        problems.push(format!(
            "CUDA driver version is `{}`, expected `{}`",
            report.cuda_driver_version, v.expect_cuda_version
        ));
    }

    run.status.attestation = Some(env);
    run.status.verdict = verdict as i32;
    let record = ValidationRecord {
        task_id: run.status.task_id.clone(),
        verdict: verdict as i32,
        passed: problems.is_empty(),
        reasons: problems.clone(),
        at_unix_ms: run.inner.clock.now_ms(),
    };
    let (state, message) = if problems.is_empty() {
        (
            TaskState::Succeeded,
            format!(
                "HEALTHY; driver {} CUDA {}",
                report.driver_version, report.cuda_driver_version
            ),
        )
    } else {
        (
            TaskState::Failed,
            format!("validation failed: {}", problems.join("; ")),
        )
    };
    run.finish_with(state, message, |t| t.set_last_validation(Some(&record)))
}
