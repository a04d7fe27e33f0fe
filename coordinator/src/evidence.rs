//! Evidence packets: what happened in a ring, signed by the coordinator key
//! so an auditor can check it later without trusting the coordinator's disk.
//!
//! A packet file is the JSON form of a DSSE envelope whose payload (type
//! `application/vnd.ringfence.evidence.v1+json`) is the [`Packet`] as JSON.
//! It embeds the original signed attestation and approval envelopes, so
//! `ringfence evidence verify` re-checks each against the enrolled host keys
//! and the approver keys of the trust file.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use prost::Message;
use ringfence::envelope::{self, APPROVAL_TYPE, BREAKGLASS_TYPE, EVIDENCE_TYPE};
use ringfence::keys::VerifyingKey;
use ringfence::pb;
use ringfence::trust::{KeyRole, TrustSet};
use serde::{Deserialize, Serialize};

/// Largest evidence payload accepted, bytes.
pub const MAX_EVIDENCE_PAYLOAD: usize = 256 * 1024 * 1024;

/// One host in a packet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostEvidence {
    /// Host id.
    pub host_id: String,
    /// Pool.
    pub pool: String,
    /// Ring.
    pub ring: u32,
    /// Final phase ("done", "failed", ...).
    pub phase: String,
    /// Already drained before the wave (never undrained by it).
    pub already_drained: bool,
    /// Driver / CUDA versions before and after.
    pub driver_before: String,
    /// Driver version after.
    pub driver_after: String,
    /// CUDA before.
    pub cuda_before: String,
    /// CUDA after.
    pub cuda_after: String,
    /// Verdicts before / after.
    pub verdict_before: String,
    /// Verdict after.
    pub verdict_after: String,
    /// Task ids and their outcomes, in order: (step, task id, state).
    pub tasks: Vec<(String, String, String)>,
    /// Failure, if any: step, kind, reason.
    pub failure: Option<(String, String, String)>,
    /// The original signed attestation envelopes (protobuf, base64): before, after.
    pub attestations: Vec<String>,
    /// When work on the host started and ended, ms since the epoch.
    pub started_at_ms: i64,
    /// End.
    pub finished_at_ms: i64,
}

/// Proof that rollback works, from the ring-0 drill.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RollbackProof {
    /// The drilled host.
    pub host_id: String,
    /// Versions it went through: new → old → new.
    pub versions: Vec<String>,
    /// Task ids of the drill, in order.
    pub task_ids: Vec<String>,
    /// Signed attestations after each step (base64 protobuf envelopes).
    pub attestations: Vec<String>,
}

/// The content of an evidence packet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Packet {
    /// Wave id.
    pub wave_id: String,
    /// Ring this packet covers.
    pub ring: u32,
    /// "completed" or "halted".
    pub outcome: String,
    /// Why the wave halted, if it did.
    pub halt_reason: Option<String>,
    /// Patch profile and versions.
    pub profile: String,
    /// Target version.
    pub version: String,
    /// Expected driver version after the patch.
    pub expect_driver_version: String,
    /// Expected CUDA version after the patch.
    pub expect_cuda_version: String,
    /// Hosts of the ring.
    pub hosts: Vec<HostEvidence>,
    /// Ring approvals (base64 protobuf envelopes).
    pub approvals: Vec<String>,
    /// Break-glass approvals (base64 protobuf envelopes).
    pub break_glass: Vec<String>,
    /// Rollback drill proof (ring 0 only).
    pub rollback_proof: Option<RollbackProof>,
    /// Ring start, end and soak, ms.
    pub started_at_ms: i64,
    /// End.
    pub finished_at_ms: i64,
    /// Soak the ring observed, seconds.
    pub soak_s: u64,
    /// Coordinator key id that signed the packet.
    pub coordinator_key_id: String,
}

/// A packet file on disk (an envelope in JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacketFile {
    /// Always the evidence payload type.
    pub payload_type: String,
    /// base64 of the JSON payload.
    pub payload: String,
    /// Signatures: key id and base64 signature.
    pub signatures: Vec<SignatureJson>,
}

/// A signature in a packet file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureJson {
    /// Key id hint.
    pub key_id: String,
    /// base64 ed25519 signature.
    pub sig: String,
}

/// Evidence could not be written or verified.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// the packet file could not be read or written
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    /// the packet file is not a well-formed evidence envelope
    #[error("packet is malformed: {0}")]
    Malformed(String),
    /// the packet's signature is not by a coordinator key of the trust file
    #[error("packet signature does not verify against any coordinator key of the trust file: {0}")]
    PacketSignature(String),
    /// an attestation inside the packet does not verify against the host's enrolled key
    #[error(
        "host `{host}`: attestation {index} does not verify against the enrolled key: {reason}"
    )]
    Attestation {
        host: String,
        index: usize,
        reason: String,
    },
    /// a host in the packet is not in the inventory or has no enrolled key
    #[error("host `{0}` is not enrolled in the inventory")]
    UnknownHost(String),
    /// an approval inside the packet does not verify against the approver keys
    #[error("approval {index}: {reason}")]
    Approval { index: usize, reason: String },
}

/// Sign a packet with the coordinator key and encode it as a packet file.
pub fn seal(packet: &Packet, key_id: &str, key: &SigningKey) -> Result<Vec<u8>, EvidenceError> {
    let payload =
        serde_json::to_vec(packet).map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    let env = envelope::sign(EVIDENCE_TYPE, payload, &[(key_id, key)]);
    let file = PacketFile {
        payload_type: env.payload_type,
        payload: B64.encode(&env.payload),
        signatures: env
            .signatures
            .iter()
            .map(|s| SignatureJson {
                key_id: s.key_id.clone(),
                sig: B64.encode(&s.sig),
            })
            .collect(),
    };
    serde_json::to_vec_pretty(&file).map_err(|e| EvidenceError::Malformed(e.to_string()))
}

/// Write a sealed packet atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), EvidenceError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| EvidenceError::Io {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    crate::store::write_atomic(path, bytes).map_err(|e| EvidenceError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Base64 of an encoded protobuf envelope (as packets embed them).
pub fn embed(env: &pb::Envelope) -> String {
    B64.encode(env.encode_to_vec())
}

/// What `evidence verify` found.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    /// The packet content.
    pub packet: Packet,
    /// Coordinator key id (from the trust file) that signed it.
    pub signed_by: String,
    /// Attestations checked.
    pub attestations_checked: usize,
    /// Approvals checked, with their distinct approver key ids.
    pub approvals_checked: usize,
    /// Approver ids seen.
    pub approvers: Vec<String>,
}

/// Verify a packet file: the coordinator signature, every embedded
/// attestation against the host's enrolled key, and every approval against
/// the approver keys.
pub fn verify(
    bytes: &[u8],
    trust: &TrustSet,
    enrolled: &BTreeMap<String, VerifyingKey>,
) -> Result<Verified, EvidenceError> {
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
    let msg = envelope::pae(&file.payload_type, &payload);
    let mut signed_by = None;
    for s in &file.signatures {
        let sig = pb::Signature {
            key_id: s.key_id.clone(),
            sig: B64
                .decode(&s.sig)
                .map_err(|e| EvidenceError::Malformed(format!("signature: {e}")))?,
        };
        match trust.identify(&msg, &sig) {
            // The key id is outside what is signed; in evidence a hint that
            // names another key than the one that signed is tampering.
            Ok(k) if k.role == KeyRole::Coordinator && k.id != s.key_id => {
                return Err(EvidenceError::PacketSignature(format!(
                    "signature key_id `{}` does not name the key that signed (trust file id `{}`)",
                    s.key_id, k.id
                )));
            }
            Ok(k) if k.role == KeyRole::Coordinator => signed_by = Some(k.id.clone()),
            Ok(k) => {
                return Err(EvidenceError::PacketSignature(format!(
                    "signed by `{}` which is {:?}, not a coordinator key",
                    k.id, k.role
                )));
            }
            Err(e) => return Err(EvidenceError::PacketSignature(format!("{e:?}"))),
        }
    }
    let signed_by =
        signed_by.ok_or_else(|| EvidenceError::PacketSignature("packet is unsigned".into()))?;
    let packet: Packet =
        serde_json::from_slice(&payload).map_err(|e| EvidenceError::Malformed(e.to_string()))?;

    let mut attestations_checked = 0;
    for h in &packet.hosts {
        let key = enrolled
            .get(&h.host_id)
            .ok_or_else(|| EvidenceError::UnknownHost(h.host_id.clone()))?;
        for (index, a) in h.attestations.iter().enumerate() {
            let reason = |r: String| EvidenceError::Attestation {
                host: h.host_id.clone(),
                index,
                reason: r,
            };
            let raw = B64.decode(a).map_err(|e| reason(e.to_string()))?;
            let env = pb::Envelope::decode(raw.as_slice()).map_err(|e| reason(e.to_string()))?;
            let payload = envelope::verify_single(
                &env,
                envelope::ATTESTATION_TYPE,
                key,
                ringfence::attest::MAX_ATTESTATION_PAYLOAD,
            )
            .map_err(|e| reason(e.to_string()))?;
            let att = pb::Attestation::decode(payload).map_err(|e| reason(e.to_string()))?;
            if att.host_id != h.host_id {
                return Err(reason(format!("names host `{}`", att.host_id)));
            }
            attestations_checked += 1;
        }
    }
    if let Some(proof) = &packet.rollback_proof {
        let key = enrolled
            .get(&proof.host_id)
            .ok_or_else(|| EvidenceError::UnknownHost(proof.host_id.clone()))?;
        for (index, a) in proof.attestations.iter().enumerate() {
            let reason = |r: String| EvidenceError::Attestation {
                host: proof.host_id.clone(),
                index,
                reason: format!("rollback proof: {r}"),
            };
            let raw = B64.decode(a).map_err(|e| reason(e.to_string()))?;
            let env = pb::Envelope::decode(raw.as_slice()).map_err(|e| reason(e.to_string()))?;
            envelope::verify_single(
                &env,
                envelope::ATTESTATION_TYPE,
                key,
                ringfence::attest::MAX_ATTESTATION_PAYLOAD,
            )
            .map_err(|e| reason(e.to_string()))?;
            attestations_checked += 1;
        }
    }
    let mut approvers = Vec::new();
    let all = packet
        .approvals
        .iter()
        .map(|a| (a, APPROVAL_TYPE))
        .chain(packet.break_glass.iter().map(|b| (b, BREAKGLASS_TYPE)));
    let mut approvals_checked = 0;
    for (index, (a, ty)) in all.enumerate() {
        let err = |reason: String| EvidenceError::Approval { index, reason };
        let raw = B64.decode(a).map_err(|e| err(e.to_string()))?;
        let env = pb::Envelope::decode(raw.as_slice()).map_err(|e| err(e.to_string()))?;
        if env.payload_type != ty {
            return Err(err(format!("payload type `{}`", env.payload_type)));
        }
        if env.signatures.is_empty() {
            return Err(err("unsigned".into()));
        }
        let msg = envelope::pae(&env.payload_type, &env.payload);
        for s in &env.signatures {
            match trust.identify(&msg, s) {
                Ok(k) if k.role == KeyRole::Approver => {
                    if !approvers.contains(&k.id) {
                        approvers.push(k.id.clone());
                    }
                }
                Ok(k) => {
                    return Err(err(format!(
                        "signed by `{}` ({:?}), not an approver",
                        k.id, k.role
                    )));
                }
                Err(e) => return Err(err(format!("signature does not verify: {e:?}"))),
            }
        }
        approvals_checked += 1;
    }
    Ok(Verified {
        packet,
        signed_by,
        attestations_checked,
        approvals_checked,
        approvers,
    })
}

/// The evidence of one host, from its wave record.
pub fn host_evidence(rec: &crate::hostrun::HostRecord) -> HostEvidence {
    let b = rec.before.as_ref();
    let a = rec.after.as_ref();
    let s = |x: Option<&crate::hostrun::AttestationRecord>,
             f: fn(&crate::hostrun::AttestationRecord) -> String| {
        x.map(f).unwrap_or_default()
    };
    HostEvidence {
        host_id: rec.host_id.clone(),
        pool: rec.pool.clone(),
        ring: rec.ring,
        phase: serde_json::to_value(rec.phase)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        already_drained: rec.already_drained,
        driver_before: s(b, |r| r.driver_version.clone()),
        driver_after: s(a, |r| r.driver_version.clone()),
        cuda_before: s(b, |r| r.cuda_version.clone()),
        cuda_after: s(a, |r| r.cuda_version.clone()),
        verdict_before: s(b, |r| r.verdict.clone()),
        verdict_after: s(a, |r| r.verdict.clone()),
        tasks: rec
            .tasks
            .iter()
            .map(|t| {
                (
                    t.step.clone(),
                    t.task_id.clone(),
                    t.outcome
                        .as_ref()
                        .map(|o| o.state.clone())
                        .unwrap_or_else(|| "PENDING".into()),
                )
            })
            .collect(),
        failure: rec
            .failure
            .as_ref()
            .map(|f| (f.step.clone(), f.kind.clone(), f.reason.clone())),
        attestations: [b, a]
            .into_iter()
            .flatten()
            .map(|r| B64.encode(&r.envelope))
            .collect(),
        started_at_ms: rec.started_at_ms,
        finished_at_ms: rec.finished_at_ms,
    }
}

/// The rollback proof of a host that ran the drill (None if it did not finish it).
pub fn rollback_proof(rec: &crate::hostrun::HostRecord) -> Option<RollbackProof> {
    if rec.drill.len() < 2 {
        return None;
    }
    let after = rec.after.as_ref()?;
    let mut attestations = vec![B64.encode(&after.envelope)];
    attestations.extend(rec.drill.iter().map(|d| B64.encode(&d.envelope)));
    Some(RollbackProof {
        host_id: rec.host_id.clone(),
        versions: std::iter::once(after.driver_version.clone())
            .chain(rec.drill.iter().map(|d| d.driver_version.clone()))
            .collect(),
        task_ids: rec
            .tasks
            .iter()
            .filter(|t| t.step.starts_with("drill_") || t.step == "patch" || t.step == "validate")
            .map(|t| t.task_id.clone())
            .collect(),
        attestations,
    })
}
