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
//! records (`crate::wave::model`, `crate::wave::outcome`); this module
//! imports nothing else of the engine.
//!
//! Files: `packet` (the packet's content and its assembly), `chain` (seal,
//! write, the append-only series), `verify` (the entry points and the
//! recorded tasks), `attestations` and `approval_checks` (the checks
//! `verify` runs); this file holds the one error type.

mod approval_checks;
mod attestations;
mod chain;
mod packet;
mod verify;

pub use chain::{append, seal, series, verify_chain, write};
pub use packet::{
    HostEvidence, Packet, PacketFile, RingRun, RollbackProof, SoakEvidence, embed, host_evidence,
    ring_packet, rollback_proof, soak_evidence,
};
pub use verify::{Attested, Verified, VerifiedHost, VerifyWith, verify, verify_with};

/// Largest evidence payload accepted, bytes.
pub const MAX_EVIDENCE_PAYLOAD: usize = 256 * 1024 * 1024;

fn ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

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
