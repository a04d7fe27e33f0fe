//! Verifying a packet file ([`verify`], [`verify_with`]): the signer, the
//! recorded tasks, and what the verification found ([`Verified`]); the
//! attestation and approval checks it runs are in `attestations` and
//! `approval_checks`.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use ringfence::envelope::{self, EVIDENCE_TYPE, TASK_TYPE};
use ringfence::keys::VerifyingKey;
use ringfence::pb::{self, task_payload::Action};
use ringfence::trust::{KeyRole, TrustSet};
use serde::Serialize;

use super::approval_checks::{check_break_glass, check_task_approvals, open_approvals};
use super::attestations::{
    check_done, check_recorded, check_rollback_proof, check_soaked, host_attestations,
    soak_attestations,
};
use super::packet::{HostEvidence, Packet, PacketFile};
use super::{EvidenceError, MAX_EVIDENCE_PAYLOAD};
use crate::wave::outcome::TaskStep;

/// What one attestation proves, derived from the signed attestation itself.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Attested {
    /// Verdict the host signed.
    pub verdict: String,
    /// Driver version in the signed report.
    pub driver_version: String,
    /// CUDA driver version in the signed report.
    pub cuda_version: String,
    /// When the host signed it, ms since the epoch.
    pub issued_at_ms: i64,
    /// The Validate task whose nonce it carries (None: the attestation before the wave's tasks).
    pub task_id: Option<String>,
}

/// A host as its attestations prove it.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedHost {
    /// Host id.
    pub host_id: String,
    /// Pool (from the packet).
    pub pool: String,
    /// Phase (from the packet; "done" is checked against the attestations).
    pub phase: String,
    /// The attestation before the wave's tasks.
    pub before: Option<Attested>,
    /// The latest attestation bound to a Validate task.
    pub after: Option<Attested>,
    /// The latest end-of-soak attestation, if the host has one.
    pub soak: Option<Attested>,
}

/// What `evidence verify` found. Everything here is derived from signed
/// material; `packet` is the coordinator's own account, checked against it.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    /// The packet content.
    pub packet: Packet,
    /// Coordinator key id (from the trust file) that signed it.
    pub signed_by: String,
    /// Per host, what its attestations prove.
    pub hosts: Vec<VerifiedHost>,
    /// Driver versions of the rollback proof, from its attestations.
    pub rollback_versions: Vec<String>,
    /// Signed tasks checked.
    pub tasks_checked: usize,
    /// Attestations checked.
    pub attestations_checked: usize,
    /// Ring approvals and break-glass approvals checked.
    pub approvals_checked: usize,
    /// Distinct approver ids (trust file) of the approvals and break-glass approvals.
    pub approvers: Vec<String>,
}

/// What a packet is verified against.
#[derive(Debug, Clone, Copy)]
pub struct VerifyWith<'a> {
    /// Coordinator and approver keys, and the policy (skew, task lifetime,
    /// protected rings, approver threshold).
    pub trust: &'a TrustSet,
    /// Enrolled host attestation keys (inventory).
    pub enrolled: &'a BTreeMap<String, VerifyingKey>,
    /// The coordinator key id that must have signed (settings or
    /// `--coordinator-key`); None: the one the packet names.
    pub coordinator_key_id: Option<&'a str>,
}

/// Verify a packet file against the trust file and the enrolled host keys,
/// with the signer the packet names.
pub fn verify(
    bytes: &[u8],
    trust: &TrustSet,
    enrolled: &BTreeMap<String, VerifyingKey>,
) -> Result<Verified, EvidenceError> {
    verify_with(
        bytes,
        &VerifyWith {
            trust,
            enrolled,
            coordinator_key_id: None,
        },
    )
}

/// A task recorded in a packet, verified and decoded.
pub(super) struct Task {
    pub(super) step: String,
    pub(super) state: String,
    pub(super) payload: pb::TaskPayload,
}

/// Verify a packet file: the signer, every recorded task, every attestation
/// (key, host, nonce bound to a recorded Validate task, time window), every
/// field derived from attestations, every approval and break-glass (scope,
/// action, time, distinct approvers), and the rollback proof.
pub fn verify_with(bytes: &[u8], with: &VerifyWith<'_>) -> Result<Verified, EvidenceError> {
    let file: PacketFile =
        serde_json::from_slice(bytes).map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    if file.payload_type != EVIDENCE_TYPE {
        return Err(EvidenceError::Malformed(format!(
            "payload type `{}`, expected `{EVIDENCE_TYPE}`",
            file.payload_type
        )));
    }
    let payload = B64
        .decode(&file.payload)
        .map_err(|e| EvidenceError::Malformed(format!("payload: {e}")))?;
    if payload.len() > MAX_EVIDENCE_PAYLOAD {
        return Err(EvidenceError::Malformed("payload too large".into()));
    }
    let signed_by = packet_signer(&file, &payload, with)?;
    let packet: Packet =
        serde_json::from_slice(&payload).map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    if let Some(pinned) = with.coordinator_key_id
        && pinned != signed_by
    {
        return Err(EvidenceError::SignerNotNamed {
            signed_by,
            named: pinned.to_string(),
            named_by: "the settings (or --coordinator-key)",
        });
    }
    if packet.coordinator_key_id != signed_by {
        return Err(EvidenceError::SignerNotNamed {
            signed_by,
            named: packet.coordinator_key_id.clone(),
            named_by: "the packet's coordinator_key_id",
        });
    }
    let policy = &with.trust.policy;

    let mut out = Verified {
        packet: packet.clone(),
        signed_by,
        hosts: Vec::new(),
        rollback_versions: Vec::new(),
        tasks_checked: 0,
        attestations_checked: 0,
        approvals_checked: 0,
        approvers: Vec::new(),
    };
    let mut tasks_by_host: BTreeMap<&str, Vec<Task>> = BTreeMap::new();
    for h in &packet.hosts {
        let key = with
            .enrolled
            .get(&h.host_id)
            .ok_or_else(|| EvidenceError::UnknownHost(h.host_id.clone()))?;
        if h.ring != packet.ring {
            return Err(EvidenceError::HostRing {
                host: h.host_id.clone(),
                recorded: h.ring,
                ring: packet.ring,
            });
        }
        let tasks = host_tasks(&packet, h, with.trust)?;
        out.tasks_checked += tasks.len();
        let (before, after, n) = host_attestations(h, &tasks, key, policy)?;
        out.attestations_checked += n;
        check_recorded(h, before.as_ref(), after.as_ref())?;
        if h.phase == "done" {
            check_done(&packet, h, after.as_ref())?;
        }
        let soak = soak_attestations(h, key, policy)?;
        out.attestations_checked += h.soak_attestations.len();
        if h.phase == "done" && packet.outcome == "completed" && packet.soak_s > 0 {
            check_soaked(h, soak.as_ref(), policy)?;
        }
        out.hosts.push(VerifiedHost {
            host_id: h.host_id.clone(),
            pool: h.pool.clone(),
            phase: h.phase.clone(),
            before,
            after,
            soak: soak.map(|e| e.attested),
        });
        tasks_by_host.insert(&h.host_id, tasks);
    }
    if let Some(proof) = &packet.rollback_proof {
        let (n, versions) = check_rollback_proof(proof, &tasks_by_host, with.enrolled)?;
        out.attestations_checked += n;
        out.rollback_versions = versions;
    }
    let mut approvers = Vec::new();
    let approvals = open_approvals(&packet, with.trust, &mut approvers)?;
    out.approvals_checked += approvals.len();
    check_task_approvals(&packet, &tasks_by_host, &approvals, with.trust)?;
    out.approvals_checked += check_break_glass(&packet, with.trust, &mut approvers)?;
    out.approvers = approvers;
    Ok(out)
}

/// The trust-file id of the coordinator key that signed the packet.
fn packet_signer(
    file: &PacketFile,
    payload: &[u8],
    with: &VerifyWith<'_>,
) -> Result<String, EvidenceError> {
    let msg = envelope::pae(&file.payload_type, payload);
    let mut signed_by = None;
    for s in &file.signatures {
        let sig = pb::Signature {
            key_id: s.key_id.clone(),
            sig: B64
                .decode(&s.sig)
                .map_err(|e| EvidenceError::Malformed(format!("signature: {e}")))?,
        };
        match with.trust.identify(&msg, &sig) {
            // The key id is outside what is signed; in evidence a hint that
            // names another key than the one that signed is tampering.
            Ok(k) if k.role == KeyRole::Coordinator && k.id != s.key_id => {
                return Err(EvidenceError::PacketSignature(format!(
                    "signature keyid `{}` does not name the key that signed (trust file id `{}`)",
                    s.key_id, k.id
                )));
            }
            Ok(k) if k.role == KeyRole::Coordinator => {
                if signed_by.is_none() {
                    signed_by = Some(k.id.clone());
                }
            }
            Ok(k) => {
                return Err(EvidenceError::SignerRole {
                    key: k.id.clone(),
                    role: format!("{:?} key", k.role).to_lowercase(),
                });
            }
            Err(e) => {
                // Name a host key that made it: a host cannot sign evidence.
                if let Ok(signature) = ed25519_dalek::Signature::from_slice(&sig.sig)
                    && let Some((host, _)) = with
                        .enrolled
                        .iter()
                        .find(|(_, k)| k.verify_strict(&msg, &signature).is_ok())
                {
                    return Err(EvidenceError::SignerRole {
                        key: host.clone(),
                        role: "host attestation key".into(),
                    });
                }
                return Err(EvidenceError::PacketSignature(format!("{e:?}")));
            }
        }
    }
    signed_by.ok_or_else(|| EvidenceError::PacketSignature("packet is unsigned".into()))
}

/// The kind of action a recorded step must carry.
pub(super) fn step_action(step: &str) -> &'static str {
    TaskStep::parse(step).map_or("unknown", TaskStep::action)
}

fn action_kind(a: Option<&Action>) -> &'static str {
    match a {
        Some(Action::Drain(_)) => "drain",
        Some(Action::Patch(p)) if p.rollback => "rollback",
        Some(Action::Patch(_)) => "patch",
        Some(Action::Validate(_)) => "validate",
        Some(Action::Undrain(_)) => "undrain",
        Some(Action::AckFaults(_)) => "ack_faults",
        None => "none",
    }
}

/// Verify and decode the recorded tasks of a host, and check each against
/// the packet: coordinator signature, id, host, wave, ring, action of the
/// step, profile and versions.
fn host_tasks(
    packet: &Packet,
    h: &HostEvidence,
    trust: &TrustSet,
) -> Result<Vec<Task>, EvidenceError> {
    if h.task_envelopes.len() != h.tasks.len() {
        return Err(EvidenceError::TasksNotRecorded {
            host: h.host_id.clone(),
            listed: h.tasks.len(),
            recorded: h.task_envelopes.len(),
        });
    }
    let mut out = Vec::new();
    for (index, ((step, task_id, state), raw)) in h.tasks.iter().zip(&h.task_envelopes).enumerate()
    {
        let sig_err = |reason: String| EvidenceError::TaskSignature {
            host: h.host_id.clone(),
            index,
            task: task_id.clone(),
            reason,
        };
        let bytes = B64.decode(raw).map_err(|e| sig_err(e.to_string()))?;
        let env = pb::Envelope::decode(bytes.as_slice()).map_err(|e| sig_err(e.to_string()))?;
        if env.payload_type != TASK_TYPE {
            return Err(sig_err(format!("payload type `{}`", env.payload_type)));
        }
        if env.signatures.is_empty() {
            return Err(sig_err("unsigned".into()));
        }
        let msg = envelope::pae(&env.payload_type, &env.payload);
        for s in &env.signatures {
            match trust.identify(&msg, s) {
                Ok(k) if k.role == KeyRole::Coordinator => {}
                Ok(k) => return Err(sig_err(format!("signed by `{}` ({:?})", k.id, k.role))),
                Err(e) => return Err(sig_err(format!("{e:?}"))),
            }
        }
        let payload = pb::TaskPayload::decode(env.payload.as_slice())
            .map_err(|e| sig_err(format!("payload: {e}")))?;
        let scope = |field: &'static str, signed: &str, expected: &str| {
            if signed == expected {
                Ok(())
            } else {
                Err(EvidenceError::TaskScope {
                    host: h.host_id.clone(),
                    task: task_id.clone(),
                    field,
                    signed: signed.to_string(),
                    expected: expected.to_string(),
                })
            }
        };
        scope("task_id", &payload.task_id, task_id)?;
        scope("host_id", &payload.host_id, &h.host_id)?;
        scope("wave_id", &payload.wave_id, &packet.wave_id)?;
        scope("ring", &payload.ring.to_string(), &packet.ring.to_string())?;
        scope(
            "action",
            action_kind(payload.action.as_ref()),
            step_action(step),
        )?;
        match &payload.action {
            Some(Action::Patch(p)) => {
                scope("profile", &p.profile, &packet.profile)?;
                if !p.rollback {
                    scope("version", &p.version, &packet.version)?;
                }
            }
            Some(Action::Validate(v)) if step == "validate" => {
                scope(
                    "expect_driver_version",
                    &v.expect_driver_version,
                    &packet.expect_driver_version,
                )?;
                scope(
                    "expect_cuda_version",
                    &v.expect_cuda_version,
                    &packet.expect_cuda_version,
                )?;
            }
            _ => {}
        }
        out.push(Task {
            step: step.clone(),
            state: state.clone(),
            payload,
        });
    }
    Ok(out)
}
