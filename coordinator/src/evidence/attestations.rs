//! The attestation checks of `evidence verify`: a host's attestations
//! (bound to its Validate tasks), its soak attestations, the coordinator's
//! own fields against them, and the rollback proof.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use ringfence::envelope;
use ringfence::keys::VerifyingKey;
use ringfence::pb::{self, task_payload::Action};

use super::packet::{HostEvidence, Packet, RollbackProof};
use super::verify::{Attested, Task, step_action};
use super::{EvidenceError, ms};

/// Verify a host's attestations: each by its enrolled key and naming it;
/// one bound by its nonce to a recorded Validate task was made while that
/// task was valid; the only unbound one is the first (before the wave's
/// tasks; its nonce is the coordinator's) and was made during the host's
/// recorded work. Returns before, after (the last bound one), and the count.
pub(super) fn host_attestations(
    h: &HostEvidence,
    tasks: &[Task],
    key: &VerifyingKey,
    policy: &ringfence::trust::Policy,
) -> Result<(Option<Attested>, Option<Attested>, usize), EvidenceError> {
    let skew = ms(policy.max_clock_skew_s);
    let lifetime_cap = ms(policy.max_task_lifetime_s);
    let mut checked = 0;
    let mut before = None;
    let mut after = None;
    for (index, a) in h.attestations.iter().enumerate() {
        let att = open_attestation(&h.host_id, index, a, key)?;
        let at = att.issued_at_unix_ms;
        let validates: Vec<&Task> = tasks
            .iter()
            .filter(
                |t| matches!(&t.payload.action, Some(Action::Validate(v)) if v.nonce == att.nonce),
            )
            .collect();
        let task_id = if let Some(first) = validates.first() {
            // Bound to a Validate task: made while that task was valid.
            let window = |t: &Task| {
                let p = &t.payload;
                let end = p
                    .expires_at_unix_ms
                    .min(p.issued_at_unix_ms.saturating_add(lifetime_cap));
                (
                    p.issued_at_unix_ms.saturating_sub(skew),
                    end.saturating_add(skew),
                )
            };
            match validates.iter().find(|t| {
                let (from, to) = window(t);
                (from..=to).contains(&at)
            }) {
                Some(t) => Some(t.payload.task_id.clone()),
                None => {
                    let (from_ms, to_ms) = window(first);
                    return Err(EvidenceError::AttestationWindow {
                        host: h.host_id.clone(),
                        index,
                        at_ms: at,
                        window: format!("the validity of task `{}`", first.payload.task_id),
                        from_ms,
                        to_ms,
                    });
                }
            }
        } else if index == 0 {
            // The attestation before the wave's tasks: its nonce is the
            // coordinator's, so it is bounded by the host's recorded work.
            // A host still under way (the wave halted around it) has no end yet.
            let from_ms = h.started_at_ms.saturating_sub(skew);
            let end = std::iter::once(h.finished_at_ms)
                .chain(tasks.iter().map(|t| t.payload.issued_at_unix_ms))
                .max()
                .unwrap_or(0);
            let to_ms = if matches!(h.phase.as_str(), "done" | "failed") && end > 0 {
                end.saturating_add(skew)
            } else {
                i64::MAX
            };
            if h.started_at_ms <= 0 || !(from_ms..=to_ms).contains(&at) {
                return Err(EvidenceError::AttestationWindow {
                    host: h.host_id.clone(),
                    index,
                    at_ms: at,
                    window: "the host's work in the wave".into(),
                    from_ms,
                    to_ms,
                });
            }
            None
        } else {
            return Err(EvidenceError::AttestationNonce {
                host: h.host_id.clone(),
                index,
            });
        };
        let proven = attested(&att, task_id);
        if proven.task_id.is_some() {
            after = Some(proven);
        } else {
            before = Some(proven);
        }
        checked += 1;
    }
    Ok((before, after, checked))
}

/// Verify a host's soak attestations: each by its enrolled key and naming
/// it, carrying the nonce recorded with it, made between the coordinator's
/// request and its verification (with clock skew), its recorded verdict the
/// attested one. Returns the last end-of-soak attestation.
/// A host's last end-of-soak attestation, as verified.
pub(super) struct EndOfSoak {
    pub(super) attested: Attested,
    /// Healthy enough to promote on: not UNHEALTHY by verdict or by any reason.
    pub(super) healthy: bool,
    /// When the coordinator asked for it.
    pub(super) requested_at_ms: i64,
}

pub(super) fn soak_attestations(
    h: &HostEvidence,
    key: &VerifyingKey,
    policy: &ringfence::trust::Policy,
) -> Result<Option<EndOfSoak>, EvidenceError> {
    let skew = ms(policy.max_clock_skew_s);
    let mut last_end = None;
    for (index, s) in h.soak_attestations.iter().enumerate() {
        let att = open_attestation(&h.host_id, index, &s.attestation, key).map_err(|e| {
            EvidenceError::SoakAttestation {
                host: h.host_id.clone(),
                index,
                reason: e.to_string(),
            }
        })?;
        let nonce = B64
            .decode(&s.nonce)
            .map_err(|e| EvidenceError::SoakAttestation {
                host: h.host_id.clone(),
                index,
                reason: format!("recorded nonce: {e}"),
            })?;
        if att.nonce != nonce || nonce.is_empty() {
            return Err(EvidenceError::SoakAttestationNonce {
                host: h.host_id.clone(),
                index,
            });
        }
        let at = att.issued_at_unix_ms;
        let (from_ms, to_ms) = (
            s.requested_at_ms.saturating_sub(skew),
            s.received_at_ms.saturating_add(skew),
        );
        if s.requested_at_ms <= 0
            || s.received_at_ms < s.requested_at_ms
            || !(from_ms..=to_ms).contains(&at)
        {
            return Err(EvidenceError::SoakAttestationWindow {
                host: h.host_id.clone(),
                index,
                at_ms: at,
                from_ms,
                to_ms,
            });
        }
        let attested = attested(&att, None);
        if s.verdict != attested.verdict {
            return Err(EvidenceError::Recorded {
                host: h.host_id.clone(),
                field: "soak_verdict",
                recorded: s.verdict.clone(),
                attested: attested.verdict,
            });
        }
        match s.purpose.as_str() {
            "end_of_soak" => {
                let unhealthy = pb::Verdict::Unhealthy as i32;
                let healthy = att.verdict != unhealthy
                    && att.report.as_ref().is_some_and(|r| {
                        r.reasons
                            .iter()
                            .all(|x| matches!(pb::Verdict::try_from(x.severity), Ok(v) if v != pb::Verdict::Unhealthy))
                    });
                last_end = Some(EndOfSoak {
                    attested,
                    healthy,
                    requested_at_ms: s.requested_at_ms,
                });
            }
            "reconnect" => {}
            other => {
                return Err(EvidenceError::Malformed(format!(
                    "host `{}`: soak attestation {index} has purpose `{other}`",
                    h.host_id
                )));
            }
        }
    }
    Ok(last_end)
}

/// A host done in a completed ring that soaked was attested, fresh and not
/// UNHEALTHY, at the end of the soak, after its work in the wave.
pub(super) fn check_soaked(
    h: &HostEvidence,
    soak: Option<&EndOfSoak>,
    policy: &ringfence::trust::Policy,
) -> Result<(), EvidenceError> {
    let not = |reason: String| EvidenceError::NotSoaked {
        host: h.host_id.clone(),
        reason,
    };
    let Some(EndOfSoak {
        attested: a,
        healthy,
        requested_at_ms,
    }) = soak
    else {
        return Err(not("no end-of-soak attestation is in the packet".into()));
    };
    if !healthy {
        return Err(not(format!(
            "its end-of-soak attestation is {} or lists an UNHEALTHY reason",
            a.verdict
        )));
    }
    if requested_at_ms.saturating_add(ms(policy.max_clock_skew_s)) < h.finished_at_ms {
        return Err(not(format!(
            "its end-of-soak attestation was asked for at {requested_at_ms} ms, before its work ended ({} ms)",
            h.finished_at_ms
        )));
    }
    Ok(())
}

/// Verify one embedded attestation against the host's enrolled key.
fn open_attestation(
    host: &str,
    index: usize,
    b64: &str,
    key: &VerifyingKey,
) -> Result<pb::Attestation, EvidenceError> {
    let reason = |r: String| EvidenceError::Attestation {
        host: host.to_string(),
        index,
        reason: r,
    };
    let raw = B64.decode(b64).map_err(|e| reason(e.to_string()))?;
    let env = pb::Envelope::decode(raw.as_slice()).map_err(|e| reason(e.to_string()))?;
    let payload = envelope::verify_single(
        &env,
        envelope::ATTESTATION_TYPE,
        key,
        ringfence::attest::MAX_ATTESTATION_PAYLOAD,
    )
    .map_err(|e| reason(e.to_string()))?;
    let att = pb::Attestation::decode(payload).map_err(|e| reason(e.to_string()))?;
    if att.host_id != host {
        return Err(EvidenceError::AttestationHost {
            host: host.to_string(),
            index,
            names: att.host_id,
        });
    }
    let report = att
        .report
        .as_ref()
        .ok_or_else(|| reason("no health report".into()))?;
    if report.host_id != att.host_id || report.verdict != att.verdict {
        return Err(reason(
            "the embedded report disagrees with the attestation (host or verdict)".into(),
        ));
    }
    Ok(att)
}

fn attested(att: &pb::Attestation, task_id: Option<String>) -> Attested {
    let report = att.report.clone().unwrap_or_default();
    Attested {
        verdict: ringfence::attest::verdict_name(att.verdict).to_string(),
        driver_version: report.driver_version,
        cuda_version: report.cuda_driver_version,
        issued_at_ms: att.issued_at_unix_ms,
        task_id,
    }
}

/// The coordinator's own fields must say what the attestations say.
pub(super) fn check_recorded(
    h: &HostEvidence,
    before: Option<&Attested>,
    after: Option<&Attested>,
) -> Result<(), EvidenceError> {
    let get = |a: Option<&Attested>, f: fn(&Attested) -> &str| a.map(f).unwrap_or("").to_string();
    let fields: [(&'static str, &str, String); 6] = [
        (
            "verdict_before",
            &h.verdict_before,
            get(before, |a| &a.verdict),
        ),
        (
            "driver_before",
            &h.driver_before,
            get(before, |a| &a.driver_version),
        ),
        (
            "cuda_before",
            &h.cuda_before,
            get(before, |a| &a.cuda_version),
        ),
        (
            "verdict_after",
            &h.verdict_after,
            get(after, |a| &a.verdict),
        ),
        (
            "driver_after",
            &h.driver_after,
            get(after, |a| &a.driver_version),
        ),
        ("cuda_after", &h.cuda_after, get(after, |a| &a.cuda_version)),
    ];
    for (field, recorded, attested) in fields {
        if recorded != attested {
            return Err(EvidenceError::Recorded {
                host: h.host_id.clone(),
                field,
                recorded: recorded.to_string(),
                attested,
            });
        }
    }
    Ok(())
}

/// A host recorded as done was validated HEALTHY on the target versions.
pub(super) fn check_done(
    packet: &Packet,
    h: &HostEvidence,
    after: Option<&Attested>,
) -> Result<(), EvidenceError> {
    let not = |reason: String| EvidenceError::NotValidated {
        host: h.host_id.clone(),
        reason,
    };
    let Some(a) = after else {
        return Err(not(
            "no attestation of a Validate task is in the packet".into()
        ));
    };
    if a.verdict != "HEALTHY" {
        return Err(not(format!("its validation attested {}", a.verdict)));
    }
    if !packet.expect_driver_version.is_empty() && a.driver_version != packet.expect_driver_version
    {
        return Err(not(format!(
            "its validation attested driver {}, expected {}",
            a.driver_version, packet.expect_driver_version
        )));
    }
    if !packet.expect_cuda_version.is_empty() && a.cuda_version != packet.expect_cuda_version {
        return Err(not(format!(
            "its validation attested CUDA {}, expected {}",
            a.cuda_version, packet.expect_cuda_version
        )));
    }
    Ok(())
}

/// The rollback proof: every attestation by the drilled host's key, bound to
/// one of its Validate tasks, HEALTHY, and the versions those attestations
/// report. Returns the attestations checked and the versions.
pub(super) fn check_rollback_proof(
    proof: &RollbackProof,
    tasks_by_host: &BTreeMap<&str, Vec<Task>>,
    enrolled: &BTreeMap<String, VerifyingKey>,
) -> Result<(usize, Vec<String>), EvidenceError> {
    let bad = |reason: String| EvidenceError::RollbackProof {
        host: proof.host_id.clone(),
        reason,
    };
    let key = enrolled
        .get(&proof.host_id)
        .ok_or_else(|| EvidenceError::UnknownHost(proof.host_id.clone()))?;
    let tasks = tasks_by_host
        .get(proof.host_id.as_str())
        .ok_or_else(|| bad("the host is not in the packet".into()))?;
    let mut versions = Vec::new();
    for (index, a) in proof.attestations.iter().enumerate() {
        let att = open_attestation(&proof.host_id, index, a, key)
            .map_err(|e| bad(format!("attestation {index}: {e}")))?;
        let bound = tasks.iter().any(|t| {
            matches!(&t.payload.action, Some(Action::Validate(v)) if v.nonce == att.nonce)
                && step_action(&t.step) == "validate"
        });
        if !bound {
            return Err(bad(format!(
                "attestation {index} carries a nonce of no Validate task recorded for the host"
            )));
        }
        if att.verdict != pb::Verdict::Healthy as i32 {
            return Err(bad(format!(
                "attestation {index} attested {}",
                ringfence::attest::verdict_name(att.verdict)
            )));
        }
        versions.push(
            att.report
                .as_ref()
                .map(|r| r.driver_version.clone())
                .unwrap_or_default(),
        );
    }
    if versions != proof.versions {
        return Err(bad(format!(
            "versions recorded as {} but attested {}",
            proof.versions.join(" → "),
            versions.join(" → ")
        )));
    }
    for id in &proof.task_ids {
        if !tasks.iter().any(|t| &t.payload.task_id == id) {
            return Err(bad(format!("task `{id}` is not recorded for the host")));
        }
    }
    Ok((proof.attestations.len(), versions))
}
