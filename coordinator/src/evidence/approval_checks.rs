//! The approval checks of `evidence verify`: who signed an approval or
//! break-glass envelope, ring approvals, the approvals every protected
//! task needs, and break-glass scope.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use ringfence::envelope::{self, APPROVAL_TYPE, BREAKGLASS_TYPE};
use ringfence::pb::{self, task_payload::Action};
use ringfence::trust::{KeyRole, TrustSet};

use super::packet::Packet;
use super::verify::Task;
use super::{EvidenceError, ms};

/// Approver keys that signed an envelope: trust-file id and public key bytes.
type Signers = Vec<(String, [u8; 32])>;

/// Who signed an approval or break-glass envelope: trust-file ids and key
/// bytes of approver keys. A coordinator key, a revoked or unknown key, or a
/// bad signature is a finding.
fn approval_signers(
    what: &'static str,
    index: usize,
    env: &pb::Envelope,
    ty: &str,
    trust: &TrustSet,
) -> Result<Signers, EvidenceError> {
    let err = |reason: String| EvidenceError::Approval {
        what,
        index,
        reason,
    };
    if env.payload_type != ty {
        return Err(err(format!("payload type `{}`", env.payload_type)));
    }
    if env.signatures.is_empty() {
        return Err(err("unsigned".into()));
    }
    let msg = envelope::pae(&env.payload_type, &env.payload);
    let mut out = Vec::new();
    for s in &env.signatures {
        match trust.identify(&msg, s) {
            Ok(k) if k.role == KeyRole::Approver => out.push((k.id.clone(), k.key.to_bytes())),
            Ok(k) if k.role == KeyRole::Coordinator => {
                return Err(EvidenceError::ApprovalSigner {
                    what,
                    index,
                    key: k.id.clone(),
                });
            }
            Ok(k) => return Err(err(format!("signed by `{}` ({:?})", k.id, k.role))),
            Err(e) => return Err(err(format!("signature does not verify: {e:?}"))),
        }
    }
    Ok(out)
}

fn decode_envelope(
    what: &'static str,
    index: usize,
    b64: &str,
) -> Result<pb::Envelope, EvidenceError> {
    let err = |reason: String| EvidenceError::Approval {
        what,
        index,
        reason,
    };
    let raw = B64.decode(b64).map_err(|e| err(e.to_string()))?;
    pb::Envelope::decode(raw.as_slice()).map_err(|e| err(e.to_string()))
}

fn note_approvers(approvers: &mut Vec<String>, signers: &[(String, [u8; 32])]) {
    for (id, _) in signers {
        if !approvers.contains(id) {
            approvers.push(id.clone());
        }
    }
}

/// The ring approvals of the packet, each signed by approvers only and for
/// this wave, ring, profile and version.
pub(super) fn open_approvals(
    packet: &Packet,
    trust: &TrustSet,
    approvers: &mut Vec<String>,
) -> Result<Vec<(pb::RingApproval, Signers)>, EvidenceError> {
    let mut out = Vec::new();
    for (index, b64) in packet.approvals.iter().enumerate() {
        let env = decode_envelope("approval", index, b64)?;
        let signers = approval_signers("approval", index, &env, APPROVAL_TYPE, trust)?;
        let a = pb::RingApproval::decode(env.payload.as_slice()).map_err(|e| {
            EvidenceError::Approval {
                what: "approval",
                index,
                reason: e.to_string(),
            }
        })?;
        let scope = |field: &'static str, approved: String, expected: String| {
            if approved == expected {
                Ok(())
            } else {
                Err(EvidenceError::ApprovalScope {
                    what: "approval",
                    index,
                    field,
                    approved,
                    expected,
                })
            }
        };
        scope("wave_id", a.wave_id.clone(), packet.wave_id.clone())?;
        scope("ring", a.ring.to_string(), packet.ring.to_string())?;
        scope("profile", a.profile.clone(), packet.profile.clone())?;
        scope("version", a.version.clone(), packet.version.clone())?;
        note_approvers(approvers, &signers);
        out.push((a, signers));
    }
    Ok(out)
}

/// States of a task the agent never ran (it refused it, or it never left).
const NOT_RUN: &[&str] = &["NOT_SENT", "NOT_ACCEPTED", "NOT_DELIVERED"];

/// On a protected ring every Patch, rollback and forced Undrain the agent
/// took needs approvals that cover its host and action, were valid when it
/// was issued, and add up to the threshold of distinct approver keys (as the
/// agent itself counts them: every attached approval must cover the task).
pub(super) fn check_task_approvals(
    packet: &Packet,
    tasks_by_host: &BTreeMap<&str, Vec<Task>>,
    approvals: &[(pb::RingApproval, Signers)],
    trust: &TrustSet,
) -> Result<(), EvidenceError> {
    let policy = &trust.policy;
    if !policy.protected_rings.contains(&packet.ring) {
        return Ok(());
    }
    let skew = ms(policy.max_clock_skew_s);
    for (host, tasks) in tasks_by_host {
        for t in tasks {
            if NOT_RUN.contains(&t.state.as_str()) {
                continue;
            }
            let (action, version) = match &t.payload.action {
                Some(Action::Patch(p)) if p.rollback => {
                    (pb::ApprovedAction::Rollback, Some(p.version.as_str()))
                }
                Some(Action::Patch(_)) => (pb::ApprovedAction::Patch, None),
                Some(Action::Undrain(u)) if u.force => (pb::ApprovedAction::ForceUndrain, None),
                _ => continue,
            };
            let task = &t.payload.task_id;
            let at_ms = t.payload.issued_at_unix_ms;
            let mut distinct = BTreeSet::new();
            let mut out_of_time = None;
            for (index, (a, signers)) in approvals.iter().enumerate() {
                if !a.host_ids.iter().any(|h| h == host) {
                    return Err(EvidenceError::ApprovalScope {
                        what: "approval",
                        index,
                        field: "host_ids",
                        approved: a.host_ids.join(","),
                        expected: (*host).to_string(),
                    });
                }
                if !a.actions.contains(&(action as i32)) {
                    return Err(EvidenceError::ApprovalAction {
                        index,
                        task: task.clone(),
                        action: action.as_str_name(),
                        listed: a
                            .actions
                            .iter()
                            .map(|x| {
                                pb::ApprovedAction::try_from(*x)
                                    .map(|x| x.as_str_name())
                                    .unwrap_or("UNKNOWN")
                            })
                            .collect::<Vec<_>>()
                            .join(","),
                    });
                }
                if let Some(v) = version
                    && a.rollback_version != v
                {
                    return Err(EvidenceError::ApprovalScope {
                        what: "approval",
                        index,
                        field: "rollback_version",
                        approved: a.rollback_version.clone(),
                        expected: v.to_string(),
                    });
                }
                // As the agent: an approval living longer than the policy's
                // cap authorised nothing, whatever its signers say.
                let lifetime_ms = a.expires_at_unix_ms.saturating_sub(a.issued_at_unix_ms);
                let cap_ms = i64::try_from(policy.max_approval_lifetime_s.saturating_mul(1000))
                    .unwrap_or(i64::MAX);
                if lifetime_ms > cap_ms {
                    out_of_time.get_or_insert(EvidenceError::ApprovalLifetime {
                        index,
                        lifetime_s: lifetime_ms / 1000,
                        cap_s: policy.max_approval_lifetime_s,
                    });
                    continue;
                }
                if at_ms > a.expires_at_unix_ms.saturating_add(skew)
                    || a.issued_at_unix_ms > at_ms.saturating_add(skew)
                {
                    // The packet holds the ring's approvals as they are at
                    // its end; one signed after (or expired before) this
                    // task was issued did not authorise it, but others may.
                    out_of_time.get_or_insert(EvidenceError::ApprovalTime {
                        what: "approval",
                        index,
                        from_ms: a.issued_at_unix_ms,
                        to_ms: a.expires_at_unix_ms,
                        at: format!("the issue of task `{task}`"),
                        at_ms,
                    });
                    continue;
                }
                distinct.extend(signers.iter().map(|(_, k)| *k));
            }
            if distinct.len() < policy.approver_threshold {
                if let Some(e) = out_of_time {
                    return Err(e);
                }
                return Err(EvidenceError::ApprovalThreshold {
                    what: format!("task `{task}` on protected ring {}", packet.ring),
                    have: distinct.len(),
                    need: policy.approver_threshold,
                });
            }
        }
    }
    Ok(())
}

/// Every break-glass: approvers only, this wave, valid during the ring, and
/// the threshold of distinct approver keys. Returns how many were checked.
pub(super) fn check_break_glass(
    packet: &Packet,
    trust: &TrustSet,
    approvers: &mut Vec<String>,
) -> Result<usize, EvidenceError> {
    let skew = ms(trust.policy.max_clock_skew_s);
    for (index, b64) in packet.break_glass.iter().enumerate() {
        let what = "break-glass";
        let env = decode_envelope(what, index, b64)?;
        let signers = approval_signers(what, index, &env, BREAKGLASS_TYPE, trust)?;
        let bg = pb::BreakGlass::decode(env.payload.as_slice()).map_err(|e| {
            EvidenceError::Approval {
                what,
                index,
                reason: e.to_string(),
            }
        })?;
        if bg.wave_id != packet.wave_id {
            return Err(EvidenceError::ApprovalScope {
                what,
                index,
                field: "wave_id",
                approved: bg.wave_id,
                expected: packet.wave_id.clone(),
            });
        }
        // Valid at some point while the ring ran: issued before it ended,
        // not expired before it started.
        let start = packet.started_at_ms;
        let end = packet.finished_at_ms.max(start);
        if bg.expires_at_unix_ms < bg.issued_at_unix_ms
            || bg.issued_at_unix_ms > end.saturating_add(skew)
            || bg.expires_at_unix_ms.saturating_add(skew) < start
        {
            return Err(EvidenceError::ApprovalTime {
                what,
                index,
                from_ms: bg.issued_at_unix_ms,
                to_ms: bg.expires_at_unix_ms,
                at: "the ring's run".into(),
                at_ms: start,
            });
        }
        let distinct: BTreeSet<[u8; 32]> = signers.iter().map(|(_, k)| *k).collect();
        if distinct.len() < trust.policy.approver_threshold {
            return Err(EvidenceError::ApprovalThreshold {
                what: format!("break-glass {index} for pool `{}`", bg.pool),
                have: distinct.len(),
                need: trust.policy.approver_threshold,
            });
        }
        note_approvers(approvers, &signers);
    }
    Ok(packet.break_glass.len())
}
