//! The content of an evidence packet (hosts, soak attestations, the
//! rollback proof) and its assembly from the wave engine's host records
//! ([`ring_packet`]).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use ringfence::pb;
use serde::{Deserialize, Serialize};

use crate::dsse::EnvelopeFile;
use crate::plan::RingPlan;
use crate::spec::WaveSpec;
use crate::wave::model::{AttestationRecord, HostRecord, SoakAttestPurpose, SoakAttestation};
use crate::wave::outcome::TaskStep;

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
    /// The coordinator-signed task envelopes (protobuf, base64), one per entry
    /// of `tasks`, in the same order: what each task authorised, and the
    /// nonce each Validate task bound its attestation to. Packets written
    /// before this field existed read with it empty (and do not verify).
    #[serde(default)]
    pub task_envelopes: Vec<String>,
    /// When work on the host started and ended, ms since the epoch.
    pub started_at_ms: i64,
    /// End.
    pub finished_at_ms: i64,
    /// Attestations the host gave to the coordinator's fresh nonces while
    /// its ring soaked, oldest first. Packets written before this field
    /// existed read with it empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soak_attestations: Vec<SoakEvidence>,
}

/// One attestation of a soaking host, with what the coordinator recorded
/// about asking for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SoakEvidence {
    /// `reconnect` (the health stream broke and was reopened) or
    /// `end_of_soak` (the ring is promoted on it).
    pub purpose: String,
    /// The coordinator's nonce (base64).
    pub nonce: String,
    /// When the coordinator asked, ms since the epoch.
    pub requested_at_ms: i64,
    /// When the coordinator verified the answer.
    pub received_at_ms: i64,
    /// Verdict as the coordinator recorded it (checked against the attestation).
    pub verdict: String,
    /// The signed attestation envelope (protobuf, base64).
    pub attestation: String,
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
    /// Digest (`sha256:<hex>` of the file's bytes) of the ring's packet
    /// before this one; absent on a ring's first packet ([`append`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
}

/// A packet file on disk: a DSSE JSON envelope ([`crate::dsse`]) of the
/// evidence payload type, its payload the [`Packet`] as JSON.
pub type PacketFile = EnvelopeFile;

/// Base64 of an encoded protobuf envelope (as packets embed them).
pub fn embed(env: &pb::Envelope) -> String {
    B64.encode(env.encode_to_vec())
}

/// What a ring's packet says besides its hosts' records.
#[derive(Debug, Clone, Copy)]
pub struct RingRun<'a> {
    /// The wave spec (profile, versions).
    pub spec: &'a WaveSpec,
    /// The ring.
    pub ring: &'a RingPlan,
    /// The host that ran the rollback drill, if the wave has one.
    pub drill_host: Option<&'a str>,
    /// "completed" or "halted".
    pub outcome: &'a str,
    /// Why the wave halted, if it did.
    pub halt_reason: Option<&'a str>,
    /// The ring's verified approvals.
    pub approvals: &'a [pb::Envelope],
    /// The wave's break-glass approvals.
    pub break_glass: &'a [pb::Envelope],
    /// The coordinator key id that signs the packet.
    pub coordinator_key_id: &'a str,
}

/// Assemble the packet of a ring from the wave records of its hosts (those
/// that have one): each host's evidence, the ring's timings, and the
/// rollback proof of the drill host.
pub fn ring_packet(run: &RingRun<'_>, records: &[HostRecord]) -> Packet {
    let mut hosts = Vec::new();
    let mut proof = None;
    let (mut start, mut end) = (i64::MAX, 0);
    for rec in records {
        if rec.started_at_ms > 0 {
            start = start.min(rec.started_at_ms);
        }
        end = end.max(rec.finished_at_ms);
        if run.drill_host == Some(rec.host_id.as_str()) {
            proof = rollback_proof(rec);
        }
        hosts.push(host_evidence(rec));
    }
    let spec = run.spec;
    Packet {
        wave_id: spec.wave_id.clone(),
        ring: run.ring.ring,
        outcome: run.outcome.to_string(),
        halt_reason: run.halt_reason.map(str::to_string),
        profile: spec.profile.clone(),
        version: spec.version.clone(),
        expect_driver_version: spec.expect_driver_version.clone(),
        expect_cuda_version: spec.expect_cuda_version.clone(),
        hosts,
        approvals: run.approvals.iter().map(embed).collect(),
        break_glass: run.break_glass.iter().map(embed).collect(),
        rollback_proof: proof,
        started_at_ms: if start == i64::MAX { 0 } else { start },
        finished_at_ms: end,
        soak_s: run.ring.soak_s,
        coordinator_key_id: run.coordinator_key_id.to_string(),
        previous: None,
    }
}

/// The evidence of one host, from its wave record.
pub fn host_evidence(rec: &HostRecord) -> HostEvidence {
    let b = rec.before.as_ref();
    let a = rec.after.as_ref();
    let s = |x: Option<&AttestationRecord>, f: fn(&AttestationRecord) -> String| {
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
                    t.step.to_string(),
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
            .map(|f| (f.step.to_string(), f.kind.to_string(), f.reason.clone())),
        task_envelopes: rec
            .tasks
            .iter()
            .map(|t| {
                pb::SignedTask::decode(t.signed.as_slice())
                    .ok()
                    .and_then(|s| s.task)
                    .map(|e| embed(&e))
                    .unwrap_or_default()
            })
            .collect(),
        attestations: [b, a]
            .into_iter()
            .flatten()
            .map(|r| B64.encode(&r.envelope))
            .collect(),
        started_at_ms: rec.started_at_ms,
        finished_at_ms: rec.finished_at_ms,
        soak_attestations: rec.soak.iter().map(soak_evidence).collect(),
    }
}

/// The evidence of one soak attestation.
pub fn soak_evidence(s: &SoakAttestation) -> SoakEvidence {
    SoakEvidence {
        purpose: match s.purpose {
            SoakAttestPurpose::Reconnect => "reconnect",
            SoakAttestPurpose::EndOfSoak => "end_of_soak",
        }
        .to_string(),
        nonce: B64.encode(&s.nonce),
        requested_at_ms: s.requested_at_ms,
        received_at_ms: s.attestation.at_ms,
        verdict: s.attestation.verdict.clone(),
        attestation: B64.encode(&s.attestation.envelope),
    }
}

/// The rollback proof of a host that ran the drill (None if it did not finish it).
pub fn rollback_proof(rec: &HostRecord) -> Option<RollbackProof> {
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
            .filter(|t| {
                matches!(
                    t.step,
                    TaskStep::Patch
                        | TaskStep::Validate
                        | TaskStep::DrillRollback
                        | TaskStep::DrillRollbackValidate
                        | TaskStep::DrillRepatch
                        | TaskStep::DrillRepatchValidate
                )
            })
            .map(|t| t.task_id.clone())
            .collect(),
        attestations,
    })
}
