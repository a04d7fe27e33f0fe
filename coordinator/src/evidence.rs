//! Evidence packets: what happened in a ring, signed by the coordinator key
//! so an auditor can check it later without trusting the coordinator's disk.
//!
//! A packet file is a standard DSSE JSON envelope (`payloadType`, `payload`,
//! `signatures[{keyid, sig}]`) whose payload (type
//! `application/vnd.ringfence.evidence.v1+json`) is the [`Packet`] as JSON.
//! It embeds the original coordinator-signed tasks, host-signed attestations
//! and approver-signed approvals, so `ringfence evidence verify` proves
//! everything it prints from signed material: the signer is the named
//! coordinator key; each task is the coordinator's and says what the packet
//! says; each attestation is by the host's enrolled key, carries the nonce of
//! a recorded Validate task and was made while that task was valid; every
//! verdict and version printed comes from the attestations (the
//! coordinator's own fields must agree with them); approvals and break-glass
//! cover the wave, ring, hosts, actions and time of what they authorised,
//! with enough distinct approver keys. The attestations a host gave while
//! its ring soaked (fresh coordinator nonces: after a reopened health
//! stream, and at the end of the soak) are checked the same way: the
//! enrolled key, the nonce recorded with each, made between the request and
//! its verification; a host done in a completed ring that soaked has a
//! passing end-of-soak attestation made after its work.
//!
//! Evidence is append-only ([`append`]): a ring's first packet is
//! `ring-N.json`, every later one (a halt, then the ring completed after a
//! resume) `ring-N.1.json`, `ring-N.2.json`, ..., each naming in its signed
//! `previous` the digest of the file before it; [`verify_chain`] checks
//! that nothing in a ring's series was altered, removed or reordered.
//!
//! [`ring_packet`] assembles a ring's packet from the wave engine's host
//! records (`crate::wave::model`, `crate::wave::outcome`); this file
//! imports nothing else of the engine.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use prost::Message;
use ringfence::envelope::{self, APPROVAL_TYPE, BREAKGLASS_TYPE, EVIDENCE_TYPE, TASK_TYPE};
use ringfence::keys::VerifyingKey;
use ringfence::pb::{self, task_payload::Action};
use ringfence::trust::{KeyRole, TrustSet};
use serde::{Deserialize, Serialize};

use crate::dsse::EnvelopeFile;
use crate::plan::RingPlan;
use crate::spec::WaveSpec;
use crate::wave::model::{AttestationRecord, HostRecord, SoakAttestPurpose, SoakAttestation};
use crate::wave::outcome::TaskStep;

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

/// Evidence could not be written, or a packet is INVALID. Every variant is
/// one finding; [`EvidenceError::check`] gives its stable name.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// the packet file could not be read or written
    #[error("{path}: {reason}")]
    Io {
        /// The packet file (or directory) concerned.
        path: String,
        /// The I/O or encoding error.
        reason: String,
    },
    /// the packet file is not a well-formed evidence envelope
    #[error("packet is malformed: {0}")]
    Malformed(String),
    /// the packet's signature is not by any trusted key
    #[error("packet signature does not verify against any coordinator key of the trust file: {0}")]
    PacketSignature(String),
    /// the packet is signed by a valid key that is not a coordinator key
    #[error("packet is signed by `{key}` ({role}), not by a coordinator key")]
    SignerRole {
        /// Key id of the signing key.
        key: String,
        /// The key's role in the trust file (approver, ...).
        role: String,
    },
    /// the coordinator key that signed is not the one named
    #[error("packet is signed by coordinator key `{signed_by}`, but {named_by} names `{named}`")]
    SignerNotNamed {
        /// Key id of the coordinator key that signed.
        signed_by: String,
        /// Key id named by `named_by`.
        named: String,
        /// What names the expected key (the packet's `coordinator_key_id`, or the caller).
        named_by: &'static str,
    },
    /// a host in the packet is not in the inventory or has no enrolled key
    #[error("host `{0}` is not enrolled in the inventory")]
    UnknownHost(String),
    /// a host is recorded in another ring than the packet's
    #[error("host `{host}` is recorded in ring {recorded}, the packet covers ring {ring}")]
    HostRing {
        /// The host's inventory id.
        host: String,
        /// The ring the host's record is in.
        recorded: u32,
        /// The ring the packet covers.
        ring: u32,
    },
    /// the signed tasks of a host are not in the packet (or not one per listed task)
    #[error(
        "host `{host}`: {listed} tasks listed but {recorded} signed tasks recorded; what the tasks authorised cannot be checked"
    )]
    TasksNotRecorded {
        /// The host's inventory id.
        host: String,
        /// Tasks the host's record lists.
        listed: usize,
        /// Signed tasks the packet carries for the host.
        recorded: usize,
    },
    /// a recorded task is not signed by a coordinator key of the trust file
    #[error("host `{host}`: task {index} (`{task}`) is not signed by a coordinator key: {reason}")]
    TaskSignature {
        /// The host's inventory id.
        host: String,
        /// Position of the task in the host's recorded tasks (0-based).
        index: usize,
        /// The task's id.
        task: String,
        /// Why its signature does not verify.
        reason: String,
    },
    /// a recorded task says something else than the packet around it
    #[error("host `{host}`: task `{task}` has {field} `{signed}`, the packet says `{expected}`")]
    TaskScope {
        /// The host's inventory id.
        host: String,
        /// The task's id.
        task: String,
        /// The field that differs (wave, host, version, ...).
        field: &'static str,
        /// What the signed task says.
        signed: String,
        /// What the packet says.
        expected: String,
    },
    /// an attestation inside the packet does not verify against the host's enrolled key
    #[error(
        "host `{host}`: attestation {index} does not verify against the enrolled key: {reason}"
    )]
    Attestation {
        /// The host's inventory id.
        host: String,
        /// Position of the attestation in the host's record (0-based).
        index: usize,
        /// Why it does not verify.
        reason: String,
    },
    /// an attestation names another host
    #[error("host `{host}`: attestation {index} names host `{names}`")]
    AttestationHost {
        /// The host's inventory id.
        host: String,
        /// Position of the attestation in the host's record (0-based).
        index: usize,
        /// The host the attestation names.
        names: String,
    },
    /// an attestation's nonce is not the nonce of a Validate task recorded for the host
    #[error(
        "host `{host}`: attestation {index} carries a nonce of no Validate task recorded for the host"
    )]
    AttestationNonce {
        /// The host's inventory id.
        host: String,
        /// Position of the attestation in the host's record (0-based).
        index: usize,
    },
    /// a soak attestation does not verify against the host's enrolled key (or names another host)
    #[error(
        "host `{host}`: soak attestation {index} does not verify against the enrolled key: {reason}"
    )]
    SoakAttestation {
        /// The host's inventory id.
        host: String,
        /// Position of the soak attestation in the host's record (0-based).
        index: usize,
        /// Why the signature or its content did not verify.
        reason: String,
    },
    /// a soak attestation carries another nonce than the one recorded with it
    #[error(
        "host `{host}`: soak attestation {index} carries another nonce than the coordinator recorded for it"
    )]
    SoakAttestationNonce {
        /// The host's inventory id.
        host: String,
        /// Position of the soak attestation in the host's record (0-based).
        index: usize,
    },
    /// a soak attestation was made outside the time between its request and its verification
    #[error(
        "host `{host}`: soak attestation {index} was made at {at_ms} ms, outside its request ({from_ms}..{to_ms} ms with clock skew)"
    )]
    SoakAttestationWindow {
        /// The host's inventory id.
        host: String,
        /// Position of the soak attestation in the host's record (0-based).
        index: usize,
        /// When the host says it made the attestation (Unix ms).
        at_ms: i64,
        /// Start of the accepted window (Unix ms, clock skew included).
        from_ms: i64,
        /// End of the accepted window (Unix ms, clock skew included).
        to_ms: i64,
    },
    /// a host done in a completed ring that soaked has no passing end-of-soak attestation
    #[error("host `{host}` is recorded as done after a soak but {reason}")]
    NotSoaked {
        /// The host's inventory id.
        host: String,
        /// What is missing or wrong in its end-of-soak record.
        reason: String,
    },
    /// an attestation was made outside its task's (or the host's) time window
    #[error(
        "host `{host}`: attestation {index} was made at {at_ms} ms, outside {window} ({from_ms}..{to_ms} ms with clock skew)"
    )]
    AttestationWindow {
        /// The host's inventory id.
        host: String,
        /// Position of the attestation in the host's record (0-based).
        index: usize,
        /// When the host made it, ms since the epoch (the host's clock).
        at_ms: i64,
        /// The window it had to fall in (its task's, or the host's run).
        window: String,
        /// Start of the window, skew included, ms since the epoch.
        from_ms: i64,
        /// End of the window, skew included, ms since the epoch.
        to_ms: i64,
    },
    /// a field the coordinator wrote disagrees with what the host attested
    #[error(
        "host `{host}`: {field} is recorded as `{recorded}` but the host attested `{attested}`"
    )]
    Recorded {
        /// The host's inventory id.
        host: String,
        /// The field concerned (driver version, CUDA version, verdict, ...).
        field: &'static str,
        /// What the coordinator recorded.
        recorded: String,
        /// What the host attested.
        attested: String,
    },
    /// a host recorded as done has no healthy validation of the target versions
    #[error("host `{host}` is recorded as done but {reason}")]
    NotValidated {
        /// The host's inventory id.
        host: String,
        /// What is missing (no attestation, not HEALTHY, other versions).
        reason: String,
    },
    /// an approval or break-glass envelope does not verify against the approver keys
    #[error("{what} {index}: {reason}")]
    Approval {
        /// "approval" or "break-glass".
        what: &'static str,
        /// Position of the envelope in the packet (0-based).
        index: usize,
        /// Why it does not verify.
        reason: String,
    },
    /// an approval or break-glass is signed by a coordinator key
    #[error(
        "{what} {index} is signed by coordinator key `{key}`; a coordinator key never approves"
    )]
    ApprovalSigner {
        /// "approval" or "break-glass".
        what: &'static str,
        /// Position of the envelope in the packet (0-based).
        index: usize,
        /// Key id of the coordinator key that signed it.
        key: String,
    },
    /// an approval is for another wave, ring, profile, version or host set
    #[error("{what} {index} is for {field} `{approved}`, the packet has `{expected}`")]
    ApprovalScope {
        /// "approval" or "break-glass".
        what: &'static str,
        /// Position of the envelope in the packet (0-based).
        index: usize,
        /// The scope field that differs (wave, ring, profile, version, hosts, pool).
        field: &'static str,
        /// What the approval says.
        approved: String,
        /// What the packet says.
        expected: String,
    },
    /// an approval does not list the action a task needed
    #[error(
        "approval {index} does not approve {action} (it lists {listed}), needed by task `{task}`"
    )]
    ApprovalAction {
        /// Position of the approval in the packet (0-based).
        index: usize,
        /// The id of the task that needed it.
        task: String,
        /// The action the task needed (patch, rollback, force-undrain, ack-faults).
        action: &'static str,
        /// The actions the approval lists.
        listed: String,
    },
    /// an approval was not valid when a task it authorised was issued (or a break-glass during the ring)
    #[error("{what} {index} is valid {from_ms}..{to_ms} ms, not at {at} ({at_ms} ms)")]
    ApprovalTime {
        /// "approval" or "break-glass".
        what: &'static str,
        /// Position of the envelope in the packet (0-based).
        index: usize,
        /// Start of its validity (issue time), ms since the epoch.
        from_ms: i64,
        /// End of its validity (expiry), ms since the epoch.
        to_ms: i64,
        /// What had to fall in the validity (a task's issue, the ring's run).
        at: String,
        /// That moment, ms since the epoch.
        at_ms: i64,
    },
    /// an approval lives longer than the trust policy allows (`max_approval_lifetime_s`)
    #[error(
        "approval {index} is valid for {lifetime_s} s, longer than max_approval_lifetime_s = {cap_s}"
    )]
    ApprovalLifetime {
        /// Position of the approval in the packet (0-based).
        index: usize,
        /// Its lifetime (expiry minus issue), seconds.
        lifetime_s: i64,
        /// The trust policy's `max_approval_lifetime_s`.
        cap_s: u64,
    },
    /// too few distinct approver keys
    #[error("{what} has {have} distinct approver keys, needs {need}")]
    ApprovalThreshold {
        /// What needs the approvals (a ring, or a break-glass for a pool).
        what: String,
        /// Distinct approver keys whose signatures verify.
        have: usize,
        /// The trust policy's threshold.
        need: usize,
    },
    /// the rollback proof does not follow from its attestations
    #[error("rollback proof of `{host}`: {reason}")]
    RollbackProof {
        /// The host's inventory id.
        host: String,
        /// What does not follow.
        reason: String,
    },
    /// a ring's series of packets is broken: one was altered, removed or reordered
    #[error("evidence chain of ring {ring}: {reason}")]
    Chain {
        /// The ring whose chain is broken.
        ring: u32,
        /// Which link is broken, and how.
        reason: String,
    },
}

impl EvidenceError {
    /// The stable name of the finding (README, Evidence packets).
    pub fn check(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Malformed(_) => "malformed",
            Self::PacketSignature(_) => "packet_signature",
            Self::SignerRole { .. } => "signer_role",
            Self::SignerNotNamed { .. } => "signer",
            Self::UnknownHost(_) => "host_enrolled",
            Self::HostRing { .. } => "host_ring",
            Self::TasksNotRecorded { .. } => "tasks_recorded",
            Self::TaskSignature { .. } => "task_signature",
            Self::TaskScope { .. } => "task_scope",
            Self::Attestation { .. } => "attestation_signature",
            Self::AttestationHost { .. } => "attestation_host",
            Self::AttestationNonce { .. } => "attestation_nonce",
            Self::AttestationWindow { .. } => "attestation_window",
            Self::SoakAttestation { .. } => "soak_attestation_signature",
            Self::SoakAttestationNonce { .. } => "soak_attestation_nonce",
            Self::SoakAttestationWindow { .. } => "soak_attestation_window",
            Self::NotSoaked { .. } => "host_soaked",
            Self::Recorded { .. } => "recorded_field",
            Self::NotValidated { .. } => "host_validated",
            Self::Approval { .. } => "approval_signature",
            Self::ApprovalSigner { .. } => "approval_signer",
            Self::ApprovalScope { .. } => "approval_scope",
            Self::ApprovalAction { .. } => "approval_action",
            Self::ApprovalTime { .. } => "approval_time",
            Self::ApprovalLifetime { .. } => "approval_lifetime",
            Self::ApprovalThreshold { .. } => "approval_threshold",
            Self::RollbackProof { .. } => "rollback_proof",
            Self::Chain { .. } => "chain",
        }
    }
}

/// Sign a packet with the coordinator key and encode it as a packet file.
pub fn seal(packet: &Packet, key_id: &str, key: &SigningKey) -> Result<Vec<u8>, EvidenceError> {
    let payload =
        serde_json::to_vec(packet).map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    let env = envelope::sign(EVIDENCE_TYPE, payload, &[(key_id, key)]);
    serde_json::to_vec_pretty(&EnvelopeFile::from_envelope(&env))
        .map_err(|e| EvidenceError::Malformed(e.to_string()))
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

/// The packet files of `ring` in `dir`, oldest first: `ring-N.json`, then
/// `ring-N.1.json`, `ring-N.2.json`, ... (up to the first number missing).
pub fn series(dir: &Path, ring: u32) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let first = dir.join(format!("ring-{ring}.json"));
    if !first.exists() {
        return out;
    }
    out.push(first);
    for k in 1.. {
        let p = dir.join(format!("ring-{ring}.{k}.json"));
        if !p.exists() {
            break;
        }
        out.push(p);
    }
    out
}

/// Seal `packet` and add it to its ring's series in `dir`, never replacing
/// a packet: the first is `ring-N.json`, a later one `ring-N.K.json`
/// naming the digest of the one before it. Returns the path written.
pub fn append(
    dir: &Path,
    mut packet: Packet,
    (key_id, key): (&str, &SigningKey),
) -> Result<std::path::PathBuf, EvidenceError> {
    let ring = packet.ring;
    let before = series(dir, ring);
    let path = match before.last() {
        None => dir.join(format!("ring-{ring}.json")),
        Some(last) => {
            let bytes = std::fs::read(last).map_err(|e| EvidenceError::Io {
                path: last.display().to_string(),
                reason: e.to_string(),
            })?;
            packet.previous = Some(crate::approvals::digest(&bytes));
            dir.join(format!("ring-{ring}.{}.json", before.len()))
        }
    };
    let bytes = seal(&packet, key_id, key)?;
    write(&path, &bytes)?;
    Ok(path)
}

/// Check the series of the ring of `packet` (any packet file of it): each
/// later packet names the digest of the file before it, the first names
/// none. Returns the series, oldest first. Signatures are checked by
/// [`verify_with`], packet by packet.
pub fn verify_chain(packet: &Path) -> Result<Vec<std::path::PathBuf>, EvidenceError> {
    let bytes = std::fs::read(packet).map_err(|e| EvidenceError::Io {
        path: packet.display().to_string(),
        reason: e.to_string(),
    })?;
    let ring = payload_of(&bytes)?.ring;
    let dir = packet.parent().unwrap_or(Path::new("."));
    let files = series(dir, ring);
    let mut prev: Option<String> = None;
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| EvidenceError::Io {
            path: f.display().to_string(),
            reason: e.to_string(),
        })?;
        let p = payload_of(&bytes).map_err(|e| EvidenceError::Chain {
            ring,
            reason: format!("{}: {e}", f.display()),
        })?;
        if p.previous != prev {
            return Err(EvidenceError::Chain {
                ring,
                reason: format!(
                    "{} names previous {} but the packet before it is {}: a packet was altered, removed or reordered",
                    f.display(),
                    p.previous.as_deref().unwrap_or("(none)"),
                    prev.as_deref().unwrap_or("(none)")
                ),
            });
        }
        prev = Some(crate::approvals::digest(&bytes));
    }
    Ok(files)
}

/// The packet inside a packet file, unverified (for the chain).
fn payload_of(bytes: &[u8]) -> Result<Packet, EvidenceError> {
    let file: EnvelopeFile =
        serde_json::from_slice(bytes).map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    let env = file
        .to_envelope()
        .map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    serde_json::from_slice(&env.payload).map_err(|e| EvidenceError::Malformed(e.to_string()))
}

/// Base64 of an encoded protobuf envelope (as packets embed them).
pub fn embed(env: &pb::Envelope) -> String {
    B64.encode(env.encode_to_vec())
}

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
struct Task {
    step: String,
    state: String,
    payload: pb::TaskPayload,
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

/// Verify a host's attestations: each by its enrolled key and naming it;
/// one bound by its nonce to a recorded Validate task was made while that
/// task was valid; the only unbound one is the first (before the wave's
/// tasks; its nonce is the coordinator's) and was made during the host's
/// recorded work. Returns before, after (the last bound one), and the count.
fn host_attestations(
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
struct EndOfSoak {
    attested: Attested,
    /// Healthy enough to promote on: not UNHEALTHY by verdict or by any reason.
    healthy: bool,
    /// When the coordinator asked for it.
    requested_at_ms: i64,
}

fn soak_attestations(
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
fn check_soaked(
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

fn ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
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
fn step_action(step: &str) -> &'static str {
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
fn check_recorded(
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
fn check_done(
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
fn check_rollback_proof(
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
fn open_approvals(
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
fn check_task_approvals(
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
fn check_break_glass(
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
