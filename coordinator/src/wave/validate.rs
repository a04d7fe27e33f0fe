//! Proving a host's health. Before the wave touches a host it attests
//! (UNHEALTHY: not patched); after each patch a Validate task returns an
//! attestation, verified with the host's enrolled key, the verifier's fresh
//! nonce and the trust policy's clock skew, then compared with the expected
//! versions and with the attestation before ([`regressions`]: new hardware
//! faults, and new XIDs the agent's own configuration names critical).

use prost::Message;
use ringfence::attest::verdict_name;
use ringfence::pb::{self, task_payload::Action};

use super::model::{
    AttestationRecord, Ctx, HostJob, HostRecord, HostRun, HostRunError, Phase, state_name,
};
use super::outcome::{Failure, FailureKind, Stage, StepResult, TaskStep, advance};
use super::task::{NO_APPROVALS, client_failure, run_task};

/// The attestation before the wave: an UNHEALTHY host is not patched; a
/// host drained by someone else is recorded as such (never undrained).
pub(super) async fn attest_before(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
) -> Result<StepResult, HostRunError> {
    let HostRun { ctx, job, api } = *hr;
    let nonce = ringfence::attest::new_nonce();
    let env = match api.attest(nonce.clone()).await {
        Ok(e) => e,
        Err(e) => return Ok(StepResult::Failed(client_failure(Stage::AttestBefore, &e))),
    };
    let att = match verify_attestation(ctx, job, &env, &nonce) {
        Ok(a) => a,
        Err(reason) => {
            return Ok(StepResult::Failed(Failure::new(
                Stage::AttestBefore,
                FailureKind::Attestation,
                reason,
            )));
        }
    };
    let record = attestation_record(ctx, &att, &env);
    let unhealthy = att.verdict == pb::Verdict::Unhealthy as i32;
    // Drained by someone else, not by this wave's own earlier tasks (a host
    // retried after a failure is still drained by the wave: undrain it).
    rec.already_drained = record.draining && !rec.drained_by_this_wave();
    let reasons = record.reasons.join(", ");
    rec.before = Some(record);
    if unhealthy {
        return Ok(StepResult::Failed(Failure::new(
            Stage::AttestBefore,
            FailureKind::UnhealthyBefore,
            format!("host was UNHEALTHY before the wave ({reasons}); not patched"),
        )));
    }
    ctx.set_phase(rec, Phase::Draining).await?;
    Ok(StepResult::Advance(()))
}

/// The Validating phase: on success the host goes on to the drill or to
/// undrain; on failure it is rolled back (`on_failure = "rollback"`, when
/// its version before is known) or fails.
pub(super) async fn validate(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
) -> Result<StepResult, HostRunError> {
    let HostRun { ctx, job, .. } = *hr;
    let p = ctx.params.clone();
    let expect = (
        p.expect_driver_version.as_str(),
        p.expect_cuda_version.as_str(),
    );
    match validate_step(hr, rec, TaskStep::Validate, expect).await? {
        StepResult::Advance(after) => {
            rec.after = Some(after);
            let next = if job.drill && rec.drill.is_empty() {
                Phase::DrillRollback
            } else {
                Phase::Undraining
            };
            ctx.set_phase(rec, next).await?;
            Ok(StepResult::Advance(()))
        }
        StepResult::Failed(f) if ctx.params.rollback_on_failure && rec.before.is_some() => {
            rec.failure = Some(f);
            ctx.set_phase(rec, Phase::RollingBack).await?;
            Ok(StepResult::Advance(()))
        }
        other => Ok(other.map(|_| ())),
    }
}

/// Run a Validate task, verify the attestation it returns, and compare it
/// with the expectation (`expect_driver`, `expect_cuda`; "" = unchecked)
/// and with the attestation taken before the patch.
pub(super) async fn validate_step(
    hr: &HostRun<'_>,
    rec: &mut HostRecord,
    step: TaskStep,
    (expect_driver, expect_cuda): (&str, &str),
) -> Result<StepResult<AttestationRecord>, HostRunError> {
    let HostRun { ctx, job, .. } = *hr;
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
    let status = advance!(run_task(hr, rec, step, action, NO_APPROVALS, nonce.clone()).await);
    let Some(env) = status.attestation.clone() else {
        return Ok(StepResult::Failed(Failure::new(
            step,
            FailureKind::TaskFailed,
            format!(
                "validate task {} ended {} without an attestation: {}",
                status.task_id,
                state_name(status.state),
                status.message
            ),
        )));
    };
    let att = match verify_attestation(ctx, job, &env, &nonce) {
        Ok(a) => a,
        Err(reason) => {
            return Ok(StepResult::Failed(Failure::new(
                step,
                FailureKind::Attestation,
                reason,
            )));
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
        return Ok(StepResult::Advance(after));
    }
    if step == TaskStep::Validate {
        rec.after = Some(after);
    }
    Ok(StepResult::Failed(Failure::new(
        step,
        FailureKind::Attestation,
        problems.join("; "),
    )))
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

/// New hardware faults since the attestation before the patch: more
/// uncorrected ECC errors, retired pages or remapped rows on a GPU, and
/// XIDs not seen before that the agent's configuration names critical
/// (`critical_xids` of either signed report; an agent that reports no
/// list is judged by its verdict alone, which a critical XID already
/// makes UNHEALTHY).
pub fn regressions(before: &AttestationRecord, after: &pb::HealthReport) -> Vec<String> {
    let Some(before_report) = pb::Envelope::decode(before.envelope.as_slice())
        .ok()
        .and_then(|e| pb::Attestation::decode(e.payload.as_slice()).ok())
        .and_then(|a| a.report)
    else {
        return Vec::new();
    };
    let critical =
        |xid: u64| after.critical_xids.contains(&xid) || before_report.critical_xids.contains(&xid);
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
        let pair = |a: Option<u32>, b: Option<u32>| {
            a.map(u64::from).zip(b.map(u64::from)).map(|(a, b)| a + b)
        };
        out.extend(grew(
            "retired pages",
            pair(gpu.retired_pages_double_bit, gpu.retired_pages_single_bit),
            pair(p.retired_pages_double_bit, p.retired_pages_single_bit),
        ));
        out.extend(grew(
            "remapped rows",
            pair(
                gpu.remapped_rows_uncorrectable,
                gpu.remapped_rows_correctable,
            ),
            pair(p.remapped_rows_uncorrectable, p.remapped_rows_correctable),
        ));
        let old_xids: Vec<u64> = p.xids.iter().map(|x| x.xid).collect();
        for x in &gpu.xids {
            if critical(x.xid) && !old_xids.contains(&x.xid) {
                out.push(format!("gpu {} new critical XID {}", gpu.index, x.xid));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn gpu(xids: &[u64]) -> pb::GpuReport {
        pb::GpuReport {
            uuid: "GPU-0".into(),
            xids: xids
                .iter()
                .map(|&xid| pb::XidEvent {
                    xid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn report(xids: &[u64], critical: &[u64]) -> pb::HealthReport {
        pb::HealthReport {
            gpus: vec![gpu(xids)],
            critical_xids: critical.to_vec(),
            ..Default::default()
        }
    }

    /// The attestation record before the patch, around `r`.
    fn before(r: pb::HealthReport) -> AttestationRecord {
        let key = ringfence::keys::generate();
        let env = ringfence::attest::attest("gpu-1", &key, &[7; 32], 0, r);
        AttestationRecord {
            verdict: "HEALTHY".into(),
            driver_version: String::new(),
            cuda_version: String::new(),
            reasons: Vec::new(),
            draining: false,
            envelope: env.encode_to_vec(),
            at_ms: 0,
        }
    }

    #[test]
    fn a_new_xid_counts_when_the_agent_reports_it_critical() {
        // XID 13 is an application XID in the agent's defaults; this agent
        // is configured to treat it as critical, and says so.
        let b = before(report(&[], &[13, 79]));
        let found = regressions(&b, &report(&[13], &[13, 79]));
        assert_eq!(found, ["gpu 0 new critical XID 13"]);
    }

    #[test]
    fn a_new_xid_the_agent_does_not_name_critical_is_no_regression() {
        // XID 79 is critical in the agent's defaults, but this agent's
        // configuration leaves it out: the coordinator follows the agent.
        let b = before(report(&[], &[48]));
        assert!(regressions(&b, &report(&[79], &[48])).is_empty());
        // An XID already there before the patch is not new.
        let b = before(report(&[48], &[48]));
        assert!(regressions(&b, &report(&[48], &[48])).is_empty());
    }

    #[test]
    fn more_uncorrected_ecc_errors_are_a_regression() {
        let mut r = report(&[], &[]);
        let b = before(r.clone());
        r.gpus[0].ecc_volatile_uncorrected = Some(2);
        assert_eq!(
            regressions(&b, &r),
            ["gpu 0 uncorrected ECC (volatile) 0 -> 2"]
        );
    }
}
