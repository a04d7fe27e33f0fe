//! Proving a host's health. Before the wave touches a host it attests
//! (UNHEALTHY: not patched); after each patch a Validate task returns an
//! attestation, verified with the host's enrolled key, the verifier's fresh
//! nonce and the trust policy's clock skew, then compared with the expected
//! versions and with the attestation before ([`regressions`]: new hardware
//! faults, and new XIDs the agent's own configuration names critical).
//!
//! The host's word is not taken for its verdict: the verdict is judged
//! against the report's own reasons ([`effective_verdict`]: a HEALTHY
//! report that carries an UNHEALTHY-severity reason is UNHEALTHY), the GPUs
//! it reports against the inventory's `expected_gpus` ([`gpu_shortfall`]),
//! and a finished task's status against the task asked for
//! (`task::checked_status`). Host text kept from a report or status is escaped
//! and bounded ([`crate::hosttext`]).

use prost::Message;
use ringfence::attest::verdict_name;
use ringfence::pb::{self, task_payload::Action};

use super::model::{
    AttestationRecord, Ctx, HostJob, HostRecord, HostRun, HostRunError, Phase, SoakAttestPurpose,
    SoakAttestation, state_name,
};
use super::outcome::{Failure, FailureKind, Stage, StepResult, TaskStep, advance};
use super::task::{NO_APPROVALS, client_failure, run_task};
use crate::client::HostApi;
use crate::hosttext;

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
    let report = att.report.clone().unwrap_or_default();
    let unhealthy = effective_verdict(att.verdict, &report) == pb::Verdict::Unhealthy as i32;
    let short = gpu_shortfall(&report, job.expected_gpus);
    // Drained by someone else, not by this wave's own earlier tasks (a host
    // retried after a failure is still drained by the wave: undrain it).
    let ours = rec.drained_by_this_wave();
    rec.already_drained = record.draining && !ours;
    let reasons = record.reasons.join(", ");
    rec.before = Some(record);
    // A retried host this wave drained (and patched) is not "before the
    // wave": say what the operator is looking at.
    let when = if ours {
        "on its retry, after this wave's own steps on it"
    } else {
        "before the wave"
    };
    if unhealthy {
        return Ok(StepResult::Failed(Failure::new(
            Stage::AttestBefore,
            FailureKind::UnhealthyBefore,
            format!("host was UNHEALTHY {when} ({reasons}); not patched"),
        )));
    }
    if let Some(short) = short {
        return Ok(StepResult::Failed(Failure::new(
            Stage::AttestBefore,
            FailureKind::UnhealthyBefore,
            format!("{short} {when}; not patched"),
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
                hosttext::field(&status.task_id),
                state_name(status.state),
                hosttext::message(&status.message)
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
    let judged = effective_verdict(att.verdict, &report);
    if judged != pb::Verdict::Healthy as i32 {
        let stated = if judged == att.verdict {
            String::new()
        } else {
            format!(" (the host said {})", after.verdict)
        };
        problems.push(format!(
            "verdict {}{stated} ({})",
            verdict_name(judged),
            report
                .reasons
                .iter()
                .map(|r| hosttext::field(&format!(
                    "{} {} gpu {} observed {}",
                    r.code,
                    verdict_name(r.severity),
                    r.gpu_index,
                    r.observed
                )))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    problems.extend(gpu_shortfall(&report, job.expected_gpus));
    if !expect_driver.is_empty() && report.driver_version != expect_driver {
        problems.push(format!(
            "driver {} != expected {}",
            after.driver_version, expect_driver
        ));
    }
    if !expect_cuda.is_empty() && report.cuda_driver_version != expect_cuda {
        problems.push(format!(
            "CUDA {} != expected {}",
            after.cuda_version, expect_cuda
        ));
    }
    if let Some(before) = rec.before.as_ref() {
        problems.extend(regressions(before, &report));
    }
    if status.state != pb::TaskState::Succeeded as i32 && problems.is_empty() {
        problems.push(format!(
            "validate task ended {}: {}",
            state_name(status.state),
            hosttext::message(&status.message)
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

/// A soak attestation that did not pass.
#[derive(Debug)]
pub(super) enum SoakAttestError {
    /// The host did not answer (the caller may ask again).
    Unreachable(String),
    /// It answered with an attestation that does not verify, or one that
    /// fails the checks (then kept, for the evidence).
    Failed(String, Option<Box<SoakAttestation>>),
}

/// A fresh attestation of a soaking host (after its health stream was
/// reopened, or at the end of the soak), verified like Validate's: by the
/// host's enrolled key, bound to a fresh nonce, made within the time
/// window; judged by its own reasons ([`effective_verdict`]: UNHEALTHY
/// fails, DEGRADED does not, as during the soak), the inventory's GPU
/// count, the wave's expected versions, and new faults since `baseline`
/// (the attestation of its validation; [`regressions`]).
pub(super) async fn soak_attestation(
    ctx: &Ctx,
    job: &HostJob,
    api: &dyn HostApi,
    baseline: Option<&AttestationRecord>,
    purpose: SoakAttestPurpose,
) -> Result<SoakAttestation, SoakAttestError> {
    let nonce = ringfence::attest::new_nonce();
    let requested_at_ms = ctx.clock.now_ms();
    let env = api
        .attest(nonce.clone())
        .await
        .map_err(|e| SoakAttestError::Unreachable(e.to_string()))?;
    let att = verify_attestation(ctx, job, &env, &nonce).map_err(|reason| {
        SoakAttestError::Failed(format!("attestation does not verify: {reason}"), None)
    })?;
    let record = attestation_record(ctx, &att, &env);
    let report = att.report.clone().unwrap_or_default();
    let mut problems = Vec::new();
    if effective_verdict(att.verdict, &report) == pb::Verdict::Unhealthy as i32 {
        problems.push(format!(
            "attested UNHEALTHY ({})",
            report
                .reasons
                .iter()
                .filter(|r| severity_rank(r.severity) == 3)
                .map(|r| hosttext::field(&r.code))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    problems.extend(gpu_shortfall(&report, job.expected_gpus));
    let p = &ctx.params;
    if !p.expect_driver_version.is_empty() && report.driver_version != p.expect_driver_version {
        problems.push(format!(
            "driver {} != expected {}",
            record.driver_version, p.expect_driver_version
        ));
    }
    if !p.expect_cuda_version.is_empty() && report.cuda_driver_version != p.expect_cuda_version {
        problems.push(format!(
            "CUDA {} != expected {}",
            record.cuda_version, p.expect_cuda_version
        ));
    }
    if let Some(b) = baseline {
        problems.extend(regressions(b, &report));
    }
    let soak = SoakAttestation {
        purpose,
        nonce,
        requested_at_ms,
        attestation: record,
    };
    if problems.is_empty() {
        Ok(soak)
    } else {
        Err(SoakAttestError::Failed(
            problems.join("; "),
            Some(Box::new(soak)),
        ))
    }
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
        driver_version: hosttext::field(&report.driver_version),
        cuda_version: hosttext::field(&report.cuda_driver_version),
        reasons: report
            .reasons
            .iter()
            .take(64)
            .map(|r| hosttext::field(&r.code))
            .collect(),
        draining: report.draining,
        envelope: env.encode_to_vec(),
        at_ms: ctx.clock.now_ms(),
    }
}

/// Rank of a verdict or reason severity, worst highest. A value this
/// coordinator does not know counts as UNHEALTHY; UNSPECIFIED forces nothing.
fn severity_rank(v: i32) -> u8 {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Unspecified) => 0,
        Ok(pb::Verdict::Healthy) => 1,
        Ok(pb::Verdict::Degraded) => 2,
        _ => 3,
    }
}

/// The verdict a report earns: the host's own verdict, or the worst
/// severity among the report's reasons when that is worse (each reason
/// forces its severity on its own, as the agent's rules say). A compromised
/// host that marks a report HEALTHY while listing an UNHEALTHY fault is
/// judged UNHEALTHY.
pub fn effective_verdict(stated: i32, report: &pb::HealthReport) -> i32 {
    report
        .reasons
        .iter()
        .map(|r| r.severity)
        .fold(stated, |worst, s| {
            if severity_rank(s) > severity_rank(worst) {
                if severity_rank(s) == 3 {
                    pb::Verdict::Unhealthy as i32
                } else {
                    s
                }
            } else {
                worst
            }
        })
}

/// Fewer GPUs in the report than the inventory's `expected_gpus` (0: not
/// checked), whatever the agent's own `gpus_expected` says. GPUs count once
/// per distinct UUID among those reported, and never more than the
/// report's `gpus_found`.
pub fn gpu_shortfall(report: &pb::HealthReport, expected: u32) -> Option<String> {
    let uuids: std::collections::BTreeSet<&str> =
        report.gpus.iter().map(|g| g.uuid.as_str()).collect();
    let found = u32::try_from(uuids.len())
        .unwrap_or(u32::MAX)
        .min(report.gpus_found);
    (found < expected).then(|| format!("{found} GPUs reported, the inventory expects {expected}"))
}

/// New hardware faults since the attestation before the patch, walking
/// the GPUs of both reports by UUID: a GPU there before and missing after;
/// more uncorrected ECC errors, retired pages or remapped rows on a GPU, or
/// such a counter reported before and missing after (a counter that goes
/// silent is not 0); and XIDs new this boot that the agent's configuration
/// names critical (`critical_xids` of either signed report; an agent that
/// reports no list is judged by its verdict alone, which a critical XID
/// already makes UNHEALTHY). An XID event is new unless the report before
/// holds the same event (code, boot and time): the same code seen in an
/// earlier boot, or earlier in this boot, does not excuse a new one.
pub fn regressions(before: &AttestationRecord, after: &pb::HealthReport) -> Vec<String> {
    let Some(before_report) = pb::Envelope::decode(before.envelope.as_slice())
        .ok()
        .and_then(|e| pb::Attestation::decode(e.payload.as_slice()).ok())
        .and_then(|a| a.report)
    else {
        return vec!["the attestation before the patch does not decode".to_string()];
    };
    let critical =
        |xid: u64| after.critical_xids.contains(&xid) || before_report.critical_xids.contains(&xid);
    let mut out = Vec::new();
    for prev in &before_report.gpus {
        if !after.gpus.iter().any(|g| g.uuid == prev.uuid) {
            out.push(format!(
                "gpu {} ({}) missing after the patch",
                prev.index,
                hosttext::field(&prev.uuid)
            ));
        }
    }
    for gpu in &after.gpus {
        let p = before_report
            .gpus
            .iter()
            .find(|g| g.uuid == gpu.uuid)
            .cloned()
            .unwrap_or_default();
        let grew = |name: &str, now: Option<u64>, then: Option<u64>| match (now, then) {
            (None, Some(t)) => Some(format!("gpu {} {name} {t} -> not reported", gpu.index)),
            (n, t) => {
                let (n, t) = (n.unwrap_or(0), t.unwrap_or(0));
                (n > t).then(|| format!("gpu {} {name} {t} -> {n}", gpu.index))
            }
        };
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
        let pair = |a: Option<u32>, b: Option<u32>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(u64::from(a.unwrap_or(0)) + u64::from(b.unwrap_or(0))),
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
        let this_boot = |x: &pb::XidEvent| x.boot_id.is_empty() || x.boot_id == after.boot_id;
        for x in gpu.xids.iter().filter(|x| this_boot(x)) {
            let seen = p
                .xids
                .iter()
                .any(|o| o.xid == x.xid && o.boot_id == x.boot_id && o.at_unix_ms == x.at_unix_ms);
            if critical(x.xid) && !seen {
                out.push(format!("gpu {} new critical XID {}", gpu.index, x.xid));
            }
        }
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::task::{checked_identity, checked_status};
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

    fn reason(code: &str, severity: pb::Verdict) -> pb::Reason {
        pb::Reason {
            code: code.into(),
            severity: severity as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_verdict_over_an_unhealthy_reason_is_unhealthy() {
        let mut r = report(&[], &[]);
        let healthy = pb::Verdict::Healthy as i32;
        assert_eq!(effective_verdict(healthy, &r), healthy);
        r.reasons = vec![
            reason("temp_high", pb::Verdict::Degraded),
            reason("ecc_uncorrected_volatile", pb::Verdict::Unhealthy),
        ];
        assert_eq!(
            effective_verdict(healthy, &r),
            pb::Verdict::Unhealthy as i32
        );
        r.reasons = vec![reason("temp_high", pb::Verdict::Degraded)];
        assert_eq!(effective_verdict(healthy, &r), pb::Verdict::Degraded as i32);
        // A severity this coordinator does not know is the worst.
        r.reasons[0].severity = 42;
        assert_eq!(
            effective_verdict(healthy, &r),
            pb::Verdict::Unhealthy as i32
        );
    }

    #[test]
    fn fewer_gpus_than_the_inventory_says_fall_short_whatever_the_agent_expects() {
        let mut r = report(&[], &[]);
        r.gpus_expected = 1;
        r.gpus_found = 8;
        // One distinct GPU, reported twice, is one GPU.
        r.gpus.push(r.gpus[0].clone());
        assert_eq!(
            gpu_shortfall(&r, 8).as_deref(),
            Some("1 GPUs reported, the inventory expects 8")
        );
        assert_eq!(gpu_shortfall(&r, 1), None);
        assert_eq!(gpu_shortfall(&r, 0), None);
    }

    #[test]
    fn a_gpu_missing_after_the_patch_is_a_regression() {
        let mut r = report(&[], &[]);
        let mut g1 = gpu(&[]);
        g1.uuid = "GPU-1".into();
        g1.index = 1;
        r.gpus.push(g1);
        let b = before(r.clone());
        r.gpus.remove(1);
        assert_eq!(
            regressions(&b, &r),
            ["gpu 1 (GPU-1) missing after the patch"]
        );
    }

    #[test]
    fn a_counter_that_goes_silent_after_the_patch_is_a_regression() {
        let mut r = report(&[], &[]);
        r.gpus[0].ecc_aggregate_uncorrected = Some(3);
        r.gpus[0].remapped_rows_uncorrectable = Some(1);
        r.gpus[0].remapped_rows_correctable = Some(0);
        let b = before(r.clone());
        r.gpus[0].ecc_aggregate_uncorrected = None;
        r.gpus[0].remapped_rows_uncorrectable = None;
        r.gpus[0].remapped_rows_correctable = None;
        assert_eq!(
            regressions(&b, &r),
            [
                "gpu 0 uncorrected ECC (aggregate) 3 -> not reported",
                "gpu 0 remapped rows 1 -> not reported"
            ]
        );
    }

    #[test]
    fn a_critical_xid_new_this_boot_counts_though_an_earlier_boot_had_it() {
        let xid = |boot: &str, at| pb::XidEvent {
            xid: 79,
            at_unix_ms: at,
            boot_id: boot.into(),
        };
        let mut r = report(&[], &[79]);
        r.boot_id = "boot-1".into();
        r.gpus[0].xids = vec![xid("boot-1", 10)];
        let b = before(r.clone());
        // The patch rebooted the host; XID 79 appears again in the new boot.
        r.boot_id = "boot-2".into();
        r.gpus[0].xids = vec![xid("boot-1", 10), xid("boot-2", 20)];
        assert_eq!(regressions(&b, &r), ["gpu 0 new critical XID 79"]);
        // The event seen before, in the same boot, is not new.
        r.boot_id = "boot-1".into();
        r.gpus[0].xids = vec![xid("boot-1", 10)];
        assert!(regressions(&b, &r).is_empty());
    }

    #[test]
    fn a_status_for_another_task_or_an_identity_of_another_host_is_refused() {
        let s = pb::TaskStatus {
            task_id: "w/gpu-2/7/validate".into(),
            message: "done\x1b[2K".into(),
            ..Default::default()
        };
        let f = checked_status(TaskStep::Validate, "w/gpu-1/7/validate", s.clone()).unwrap_err();
        assert!(
            f.reason.contains("answered for task w/gpu-2/7/validate"),
            "{}",
            f.reason
        );
        let ok = checked_status(TaskStep::Validate, "w/gpu-2/7/validate", s).unwrap();
        assert_eq!(ok.message, "done\\u{1b}[2K");
        let id = pb::Identity {
            host_id: "gpu-2".into(),
            ..Default::default()
        };
        assert!(checked_identity(TaskStep::Drain, "gpu-1", id.clone()).is_err());
        assert!(checked_identity(TaskStep::Drain, "gpu-2", id).is_ok());
    }
}
