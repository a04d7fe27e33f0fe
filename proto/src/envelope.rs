//! DSSE-style signed envelopes and the agent's task verification.
//!
//! Signatures are ed25519 over `PAE(type, payload) = "DSSEv1" SP len(type)
//! SP type SP len(payload) SP payload` (len as ASCII decimal). Any standard
//! DSSE/ed25519 library can produce an envelope ringfence accepts.
//!
//! [`TaskVerifier::verify`] runs six checks in order, the cheap ones first
//! so that a flood of tasks with large approvals costs one signature
//! verification each until everything else about the task is right:
//! 1. size limits and decoding;
//! 2. payload type and the task's signatures (`verify_strict` over the exact
//!    received bytes, keys identified by public key bytes, revoked keys
//!    refused), one of them by a coordinator key;
//! 3. host id, **ring** (the agent's own ring from its local config, never
//!    the task's word for it; rings are 0-4) and time (skew, capped lifetime);
//! 4. replay (recorded outcome returned), the sequence high-water mark, a
//!    bounded sequence jump ([`MAX_SEQUENCE_JUMP`]) and no task issued before
//!    the agent's journal was created;
//! 5. where the agent's ring is protected (or no ring is configured): a
//!    threshold of distinct approver keys on ring approvals covering the
//!    task's wave, ring, host, **action**, profile and version, within the
//!    policy's approval lifetime cap (a coordinator key never counts);
//! 6. whether the action is allowed by the agent's local config.
//!
//! Each failure is its own
//! [`TaskRejection`] variant; [`crate::status`] maps them to gRPC statuses.

use std::collections::HashSet;

use ed25519_dalek::{Signer, SigningKey};
use prost::Message;

use crate::keys;
use crate::pb;
use crate::time::Clock;
use crate::trust::{KeyRole, SigFailure, TrustSet};

/// Payload type of a [`pb::TaskPayload`].
pub const TASK_TYPE: &str = "application/vnd.ringfence.task.v1+protobuf";
/// Payload type of a [`pb::RingApproval`].
pub const APPROVAL_TYPE: &str = "application/vnd.ringfence.approval.v1+protobuf";
/// Payload type of a [`pb::BreakGlass`].
pub const BREAKGLASS_TYPE: &str = "application/vnd.ringfence.breakglass.v1+protobuf";
/// Payload type of a [`pb::Attestation`].
pub const ATTESTATION_TYPE: &str = "application/vnd.ringfence.attestation.v1+protobuf";
/// Payload type of an evidence packet (JSON).
pub const EVIDENCE_TYPE: &str = "application/vnd.ringfence.evidence.v1+json";

/// Largest task payload accepted, bytes.
pub const MAX_TASK_PAYLOAD: usize = 16 * 1024;
/// Largest approval payload accepted, bytes: a ring approval names every
/// host of the ring, and a ring of a 10,000-host fleet is that big.
pub const MAX_APPROVAL_PAYLOAD: usize = 1024 * 1024;
/// Most signatures accepted on one envelope.
pub const MAX_SIGNATURES: usize = 16;
/// Most approval envelopes accepted with one task.
pub const MAX_APPROVALS: usize = 32;
/// Longest payload type string accepted.
pub const MAX_TYPE_LEN: usize = 128;
/// Longest `key_id` hint accepted on a signature.
pub const MAX_KEY_ID_LEN: usize = MAX_TYPE_LEN;
/// Largest step a new task's sequence may take above the high-water mark:
/// one signed task can never push the mark out of reach of every later one.
pub const MAX_SEQUENCE_JUMP: u64 = 1_000_000;
/// Rings are 0 (internal) to 4 (sensitive tenants).
pub const MAX_RING: u32 = 4;
/// Nonces for validation/attestation are 16 to 64 bytes.
pub const NONCE_LEN: std::ops::RangeInclusive<usize> = 16..=64;

/// The DSSE pre-authentication encoding that signatures cover.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

/// Sign `payload` as `payload_type` with each `(key_id, key)`.
pub fn sign(payload_type: &str, payload: Vec<u8>, signers: &[(&str, &SigningKey)]) -> pb::Envelope {
    let mut env = pb::Envelope {
        payload_type: payload_type.to_string(),
        payload,
        signatures: Vec::new(),
    };
    for (id, key) in signers {
        add_signature(&mut env, id, key);
    }
    env
}

/// Encode and sign a protobuf message.
pub fn sign_message<M: Message>(
    payload_type: &str,
    msg: &M,
    signers: &[(&str, &SigningKey)],
) -> pb::Envelope {
    sign(payload_type, msg.encode_to_vec(), signers)
}

/// Add one more signature (e.g. a second approver countersigning).
pub fn add_signature(env: &mut pb::Envelope, key_id: &str, key: &SigningKey) {
    let sig = key.sign(&pae(&env.payload_type, &env.payload));
    env.signatures.push(pb::Signature {
        key_id: key_id.to_string(),
        sig: sig.to_bytes().to_vec(),
    });
}

/// Verify that `env` is of `payload_type` and signed by `key` (one known key,
/// as for attestations and evidence). Returns the payload bytes.
pub fn verify_single<'a>(
    env: &'a pb::Envelope,
    payload_type: &str,
    key: &keys::VerifyingKey,
    max_payload: usize,
) -> Result<&'a [u8], SingleKeyError> {
    if env.payload.len() > max_payload {
        return Err(SingleKeyError::Oversized {
            size: env.payload.len(),
            limit: max_payload,
        });
    }
    if env.payload_type != payload_type {
        return Err(SingleKeyError::WrongPayloadType {
            got: truncate(&env.payload_type),
            want: payload_type.to_string(),
        });
    }
    if env.signatures.is_empty() {
        return Err(SingleKeyError::Unsigned);
    }
    let msg = pae(&env.payload_type, &env.payload);
    let ok = env.signatures.iter().take(MAX_SIGNATURES).any(|s| {
        ed25519_dalek::Signature::from_slice(&s.sig)
            .map(|sig| key.verify_strict(&msg, &sig).is_ok())
            .unwrap_or(false)
    });
    if ok {
        Ok(&env.payload)
    } else {
        Err(SingleKeyError::BadSignature {
            fingerprint: keys::fingerprint(key),
        })
    }
}

/// An envelope expected to be signed by one known key failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SingleKeyError {
    /// the payload is larger than allowed
    #[error("payload is {size} bytes, limit {limit}")]
    Oversized {
        /// payload bytes received
        size: usize,
        /// the most bytes allowed
        limit: usize,
    },
    /// the envelope carries another kind of payload
    #[error("payload type is `{got}`, expected `{want}`")]
    WrongPayloadType {
        /// the envelope's payload type (truncated)
        got: String,
        /// the payload type expected
        want: String,
    },
    /// the envelope has no signature
    #[error("envelope is not signed")]
    Unsigned,
    /// no signature verifies against the expected key
    #[error("no valid signature by the expected key {fingerprint}")]
    BadSignature {
        /// fingerprint of the key the signature had to verify against
        fingerprint: String,
    },
}

fn truncate(s: &str) -> String {
    s.chars().take(MAX_TYPE_LEN).collect()
}

/// Why a task was refused. Each variant is one failed check; `check()` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskRejection {
    /// something in the request exceeds a size limit
    #[error("{what} is {size}, limit {limit}")]
    Oversized {
        /// the part that is too large (payload, signature count, ...)
        what: &'static str,
        /// its size
        size: usize,
        /// the most allowed
        limit: usize,
    },
    /// the request is not a well-formed signed task
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// the part that does not decode
        what: &'static str,
        /// the decoder's error
        reason: String,
    },
    /// the task envelope carries another kind of payload (e.g. an attestation)
    #[error("payload type is `{got}`, expected `{TASK_TYPE}`")]
    WrongPayloadType {
        /// the envelope's payload type (truncated)
        got: String,
    },
    /// the task envelope or an approval envelope has no signature
    #[error("{on} is not signed")]
    Unsigned {
        /// the envelope: `"task envelope"` or `"approval <n>"`
        on: String,
    },
    /// a signature names a trusted key but does not verify
    #[error(
        "signature {index} on the {on} (key id `{key_id}`) does not verify over the received bytes"
    )]
    BadSignature {
        /// position of the signature in its envelope
        index: usize,
        /// the envelope: `"task envelope"` or `"approval <n>"`
        on: String,
        /// the key id the signature claims
        key_id: String,
    },
    /// a signature was made by no key in the trust file
    #[error("signature {index} on the {on} (key id `{key_id}`) is by a key not in the trust file")]
    UnknownKey {
        /// position of the signature in its envelope
        index: usize,
        /// the envelope: `"task envelope"` or `"approval <n>"`
        on: String,
        /// the key id the signature claims
        key_id: String,
    },
    /// a signature was made by a revoked key
    #[error("signature by revoked key `{key_id}` ({fingerprint})")]
    RevokedKey {
        /// the revoked key's id
        key_id: String,
        /// the revoked key's fingerprint
        fingerprint: String,
    },
    /// no signature on the task is by a coordinator key
    #[error("task is not signed by a coordinator key (signed by: {signers})")]
    NoCoordinatorSignature {
        /// the key ids that did sign, comma-separated
        signers: String,
    },
    /// an approval envelope is not a ring approval
    #[error("approval {index}: payload type is `{got}`, expected `{APPROVAL_TYPE}`")]
    ApprovalWrongType {
        /// position of the approval in the request
        index: usize,
        /// its payload type (truncated)
        got: String,
    },
    /// an approval is signed by a coordinator key, which can never approve
    #[error(
        "approval {index} is signed by coordinator key `{key_id}`; a coordinator key never counts as an approver"
    )]
    CoordinatorKeyAsApprover {
        /// position of the approval in the request
        index: usize,
        /// the coordinator key that signed it
        key_id: String,
    },
    /// an approval does not cover this task
    #[error(
        "approval {index} does not cover this task: {field} is `{approved}`, task has `{task}`"
    )]
    ApprovalScope {
        /// position of the approval in the request
        index: usize,
        /// the task field that differs
        field: &'static str,
        /// the value the approval covers
        approved: String,
        /// the value the task carries
        task: String,
    },
    /// an approval's lifetime (expires - issued) exceeds the policy's cap
    #[error("approval {index} is valid for {lifetime_s} s, the policy allows at most {cap_s} s")]
    ApprovalLifetime {
        /// position of the approval in the request
        index: usize,
        /// its expires minus issued, in seconds
        lifetime_s: i64,
        /// the policy's cap in seconds
        cap_s: u64,
    },
    /// an approval has expired or is not yet valid
    #[error("approval {index} is outside its validity ({detail})")]
    ApprovalExpired {
        /// position of the approval in the request
        index: usize,
        /// its validity window against the agent's clock
        detail: String,
    },
    /// too few distinct approver keys
    #[error("ring {ring} needs {need} distinct approver keys, got {have}")]
    ApprovalThreshold {
        /// the task's ring
        ring: u32,
        /// distinct approver keys that verified
        have: usize,
        /// distinct approver keys the ring requires
        need: usize,
    },
    /// the task is for another host
    #[error("task is for host `{task_host}`, this agent is `{agent_host}`")]
    WrongHost {
        /// the host the task names
        task_host: String,
        /// this agent's host id
        agent_host: String,
    },
    /// the task names a ring that is not 0-4, or not the agent's configured ring
    #[error("{}", ring_message(*task_ring, *agent_ring))]
    WrongRing {
        /// the ring the task names
        task_ring: u32,
        /// this agent's configured ring, if any
        agent_ring: Option<u32>,
    },
    /// the task was issued in the future beyond the allowed clock skew
    #[error(
        "task issued at {issued_at_ms} ms, now is {now_ms} ms: beyond the {skew_s} s clock skew"
    )]
    NotYetValid {
        /// the task's issue time (Unix ms)
        issued_at_ms: i64,
        /// the agent's clock (Unix ms)
        now_ms: i64,
        /// the allowed clock skew in seconds
        skew_s: u64,
    },
    /// the task has expired
    #[error("task expired at {expires_at_ms} ms, now is {now_ms} ms")]
    Expired {
        /// the task's expiry (Unix ms)
        expires_at_ms: i64,
        /// the agent's clock (Unix ms)
        now_ms: i64,
    },
    /// the task's lifetime is longer than the agent allows
    #[error("task lifetime {lifetime_s} s exceeds the cap of {cap_s} s")]
    LifetimeTooLong {
        /// the task's expires minus issued, in seconds
        lifetime_s: i64,
        /// the agent's cap in seconds
        cap_s: u64,
    },
    /// the sequence number is not above the agent's high-water mark
    #[error("sequence {sequence} is not above the high-water mark {high_water}")]
    SequenceNotIncreasing {
        /// the task's sequence number
        sequence: u64,
        /// the highest sequence this agent has accepted
        high_water: u64,
    },
    /// the sequence jumps too far above the high-water mark
    #[error("sequence {sequence} is more than {limit} above the high-water mark {high_water}")]
    SequenceJump {
        /// the task's sequence number
        sequence: u64,
        /// the highest sequence this agent has accepted
        high_water: u64,
        /// the largest jump allowed
        limit: u64,
    },
    /// the task was issued before this agent's journal was created
    #[error(
        "task issued at {issued_at_ms} ms, before this agent's journal was created at {created_at_ms} ms (beyond the {skew_s} s clock skew)"
    )]
    BeforeJournal {
        /// the task's issue time (Unix ms)
        issued_at_ms: i64,
        /// when this agent's journal was created (Unix ms)
        created_at_ms: i64,
        /// the allowed clock skew in seconds
        skew_s: u64,
    },
    /// the action is not allowed by this agent's local configuration
    #[error("{reason}")]
    ActionRefused {
        /// which local setting refuses the action
        reason: String,
    },
    /// the agent's journal could not be read
    #[error("journal: {reason}")]
    Journal {
        /// the journal error
        reason: String,
    },
}

impl TaskRejection {
    /// The name of the failed check, stable for logs, metrics and clients.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "size",
            Self::Malformed { .. } => "decode",
            Self::WrongPayloadType { .. } => "payload_type",
            Self::Unsigned { .. } => "signature",
            Self::BadSignature { .. } => "signature",
            Self::UnknownKey { .. } => "unknown_key",
            Self::RevokedKey { .. } => "revoked_key",
            Self::NoCoordinatorSignature { .. } => "coordinator_signature",
            Self::ApprovalWrongType { .. } => "approval_type",
            Self::CoordinatorKeyAsApprover { .. } => "coordinator_as_approver",
            Self::ApprovalScope { .. } => "approval_scope",
            Self::ApprovalLifetime { .. } => "approval_lifetime",
            Self::ApprovalExpired { .. } => "approval_expired",
            Self::ApprovalThreshold { .. } => "approval_threshold",
            Self::WrongHost { .. } => "host",
            Self::WrongRing { .. } => "ring",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::Expired { .. } => "expired",
            Self::LifetimeTooLong { .. } => "lifetime",
            Self::SequenceNotIncreasing { .. } => "sequence",
            Self::SequenceJump { .. } => "sequence_jump",
            Self::BeforeJournal { .. } => "before_journal",
            Self::ActionRefused { .. } => "action",
            Self::Journal { .. } => "journal",
        }
    }
}

fn ring_message(task_ring: u32, agent_ring: Option<u32>) -> String {
    match agent_ring {
        _ if task_ring > MAX_RING => {
            format!("task ring {task_ring} is not a ring (rings are 0-{MAX_RING})")
        }
        Some(r) => format!("task is for ring {task_ring}, this agent is configured in ring {r}"),
        None => format!("task is for ring {task_ring}, which this agent does not accept"),
    }
}

/// What the verifier needs from the agent's durable task journal (check 4).
pub trait ReplayGuard {
    /// The recorded status of a task id, if it was seen before.
    fn recorded(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, String>;
    /// The highest task sequence accepted so far (0 if none).
    fn high_water(&self) -> Result<u64, String>;
    /// When the journal was created, ms since the Unix epoch; a task issued
    /// before it (beyond the clock skew) is refused, so that wiping the
    /// agent's state does not reopen replay. `None`: not known, not checked.
    fn created_at_ms(&self) -> Result<Option<i64>, String> {
        Ok(None)
    }
}

/// What the verifier needs from the agent's local config and state
/// (checks 5 and 6).
pub trait ActionPolicy {
    /// Whether this agent may run the task's action; the error says why not.
    fn allow(&self, task: &pb::TaskPayload) -> Result<(), String>;
    /// Whether `ack` would acknowledge an UNHEALTHY-severity fault of the
    /// host as it is now (empty codes: every current fault). On a protected
    /// ring such an AckFaults needs ring approvals covering `ACK_FAULTS`.
    /// The default answers yes: approvals are asked unless the policy knows
    /// better.
    fn acks_unhealthy(&self, ack: &pb::AckFaults) -> Result<bool, String> {
        let _ = ack;
        Ok(true)
    }
}

/// Allows every action (the action check is then the caller's job).
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl ActionPolicy for AllowAll {
    fn allow(&self, _task: &pb::TaskPayload) -> Result<(), String> {
        Ok(())
    }
}

/// A task that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedTask {
    /// The payload, decoded once from the verified bytes.
    pub payload: pb::TaskPayload,
    /// Key id (from the trust file) of the coordinator key that signed it.
    pub coordinator: String,
    /// Trust-file ids of the distinct approver keys whose approvals counted.
    pub approvers: Vec<String>,
}

/// The outcome of verification.
#[derive(Debug, Clone, PartialEq)]
pub enum Verified {
    /// A new task, to be recorded and run.
    New(Box<VerifiedTask>),
    /// A task id seen before: its recorded status (it does not run again).
    Replay(Box<pb::TaskStatus>),
}

/// Verifies signed tasks for one agent.
#[derive(Debug)]
pub struct TaskVerifier<'a> {
    /// Keys and policy from the trust file.
    pub trust: &'a TrustSet,
    /// This agent's host id.
    pub host_id: &'a str,
    /// This agent's ring from its local config (0-4). `None`: not
    /// configured; the agent then accepts a task for any ring 0-4 but treats
    /// itself as protected (approvals are asked whatever the task's ring).
    pub ring: Option<u32>,
    /// Source of "now".
    pub clock: &'a dyn Clock,
}

/// The approved action a task needs approvals for, if any kind of approval
/// could cover it: Patch → PATCH (ROLLBACK with `rollback`), a forced
/// Undrain → FORCE_UNDRAIN, AckFaults → ACK_FAULTS.
pub fn approved_action(task: &pb::TaskPayload) -> Option<pb::ApprovedAction> {
    match &task.action {
        Some(pb::task_payload::Action::Patch(p)) if p.rollback => {
            Some(pb::ApprovedAction::Rollback)
        }
        Some(pb::task_payload::Action::Patch(_)) => Some(pb::ApprovedAction::Patch),
        Some(pb::task_payload::Action::Undrain(u)) if u.force => {
            Some(pb::ApprovedAction::ForceUndrain)
        }
        Some(pb::task_payload::Action::AckFaults(_)) => Some(pb::ApprovedAction::AckFaults),
        _ => None,
    }
}

impl TaskVerifier<'_> {
    /// Whether this agent's ring is protected: its configured ring is in the
    /// policy's protected rings, or no ring is configured (secure default).
    pub fn protected(&self) -> bool {
        self.ring
            .is_none_or(|r| self.trust.policy.protected_rings.contains(&r))
    }

    /// Run all six checks, in order, on a received task.
    pub fn verify(
        &self,
        signed: &pb::SignedTask,
        journal: &dyn ReplayGuard,
        actions: &dyn ActionPolicy,
    ) -> Result<Verified, TaskRejection> {
        // 1. Size limits, then structure.
        let env = signed.task.as_ref().ok_or(TaskRejection::Malformed {
            what: "signed task",
            reason: "no task envelope".into(),
        })?;
        check_sizes(env, "task payload", MAX_TASK_PAYLOAD)?;
        if signed.approvals.len() > MAX_APPROVALS {
            return Err(TaskRejection::Oversized {
                what: "approval count",
                size: signed.approvals.len(),
                limit: MAX_APPROVALS,
            });
        }
        for a in &signed.approvals {
            check_sizes(a, "approval payload", MAX_APPROVAL_PAYLOAD)?;
        }

        // 2. Payload type, then the task's signatures over the exact
        //    received bytes; one of them by a coordinator key.
        if env.payload_type != TASK_TYPE {
            return Err(TaskRejection::WrongPayloadType {
                got: truncate(&env.payload_type),
            });
        }
        if env.signatures.is_empty() {
            return Err(TaskRejection::Unsigned {
                on: "task envelope".into(),
            });
        }
        let msg = pae(&env.payload_type, &env.payload);
        let mut coordinator = None;
        let mut signers = Vec::new();
        for (index, sig) in env.signatures.iter().enumerate() {
            let key = self.identify(&msg, sig, index, "task")?;
            signers.push(format!("{} ({:?})", key.id, key.role));
            if key.role == KeyRole::Coordinator && coordinator.is_none() {
                coordinator = Some(key.id.clone());
            }
        }
        let payload = pb::TaskPayload::decode(env.payload.as_slice()).map_err(|e| {
            TaskRejection::Malformed {
                what: "task payload",
                reason: e.to_string(),
            }
        })?;
        if payload.task_id.is_empty() || payload.action.is_none() {
            return Err(TaskRejection::Malformed {
                what: "task payload",
                reason: "task_id and action are required".into(),
            });
        }
        let coordinator = coordinator.ok_or_else(|| TaskRejection::NoCoordinatorSignature {
            signers: signers.join(", "),
        })?;

        // 3. Host, ring and time.
        if payload.host_id != self.host_id {
            return Err(TaskRejection::WrongHost {
                task_host: payload.host_id.clone(),
                agent_host: self.host_id.to_string(),
            });
        }
        if payload.ring > MAX_RING || self.ring.is_some_and(|r| r != payload.ring) {
            return Err(TaskRejection::WrongRing {
                task_ring: payload.ring,
                agent_ring: self.ring,
            });
        }
        self.check_time(&payload)?;

        // 4. Replay, sequence, journal creation.
        let journal_err = |reason| TaskRejection::Journal { reason };
        if let Some(status) = journal.recorded(&payload.task_id).map_err(journal_err)? {
            return Ok(Verified::Replay(Box::new(status)));
        }
        let high_water = journal.high_water().map_err(journal_err)?;
        if payload.sequence <= high_water {
            return Err(TaskRejection::SequenceNotIncreasing {
                sequence: payload.sequence,
                high_water,
            });
        }
        if payload.sequence - high_water > MAX_SEQUENCE_JUMP {
            return Err(TaskRejection::SequenceJump {
                sequence: payload.sequence,
                high_water,
                limit: MAX_SEQUENCE_JUMP,
            });
        }
        if let Some(created) = journal.created_at_ms().map_err(journal_err)? {
            let skew = self.trust.policy.max_clock_skew_s;
            if payload.issued_at_unix_ms.saturating_add(skew_ms(skew)) < created {
                return Err(TaskRejection::BeforeJournal {
                    issued_at_ms: payload.issued_at_unix_ms,
                    created_at_ms: created,
                    skew_s: skew,
                });
            }
        }

        // 5. Approvals where this agent's ring is protected.
        let approvers = if self.needs_approval(&payload, actions)? {
            self.check_approvals(&payload, &signed.approvals)?
        } else {
            Vec::new()
        };

        // 6. Action allowed by local config.
        actions
            .allow(&payload)
            .map_err(|reason| TaskRejection::ActionRefused { reason })?;

        Ok(Verified::New(Box::new(VerifiedTask {
            payload,
            coordinator,
            approvers,
        })))
    }

    fn identify(
        &self,
        msg: &[u8],
        sig: &pb::Signature,
        index: usize,
        on: &str,
    ) -> Result<&crate::trust::TrustedKey, TaskRejection> {
        match self.trust.identify(msg, sig) {
            Ok(k) if k.role == KeyRole::Revoked => Err(TaskRejection::RevokedKey {
                key_id: k.id.clone(),
                fingerprint: keys::fingerprint(&k.key),
            }),
            Ok(k) => Ok(k),
            Err(SigFailure::UnknownKey) => Err(TaskRejection::UnknownKey {
                index,
                on: on.to_string(),
                key_id: truncate(&sig.key_id),
            }),
            Err(SigFailure::Malformed | SigFailure::BadSignature) => {
                Err(TaskRejection::BadSignature {
                    index,
                    on: on.to_string(),
                    key_id: truncate(&sig.key_id),
                })
            }
        }
    }

    /// Decided by this agent's own ring, never by the task's.
    fn needs_approval(
        &self,
        task: &pb::TaskPayload,
        actions: &dyn ActionPolicy,
    ) -> Result<bool, TaskRejection> {
        let protected = self.protected();
        Ok(match &task.action {
            Some(pb::task_payload::Action::Patch(_)) => protected,
            Some(pb::task_payload::Action::Undrain(u)) => u.force,
            Some(pb::task_payload::Action::AckFaults(a)) => {
                protected
                    && actions
                        .acks_unhealthy(a)
                        .map_err(|reason| TaskRejection::ActionRefused { reason })?
            }
            _ => false,
        })
    }

    fn check_approvals(
        &self,
        task: &pb::TaskPayload,
        approvals: &[pb::Envelope],
    ) -> Result<Vec<String>, TaskRejection> {
        let mut distinct: HashSet<[u8; 32]> = HashSet::new();
        let mut ids = Vec::new();
        for (index, env) in approvals.iter().enumerate() {
            if env.payload_type != APPROVAL_TYPE {
                return Err(TaskRejection::ApprovalWrongType {
                    index,
                    got: truncate(&env.payload_type),
                });
            }
            if env.signatures.is_empty() {
                return Err(TaskRejection::Unsigned {
                    on: format!("approval {index}"),
                });
            }
            let msg = pae(&env.payload_type, &env.payload);
            let mut keys_here = Vec::new();
            let on = format!("approval {index}");
            for (sig_index, sig) in env.signatures.iter().enumerate() {
                let key = self.identify(&msg, sig, sig_index, &on)?;
                if key.role == KeyRole::Coordinator {
                    return Err(TaskRejection::CoordinatorKeyAsApprover {
                        index,
                        key_id: key.id.clone(),
                    });
                }
                keys_here.push(key);
            }
            let approval = pb::RingApproval::decode(env.payload.as_slice()).map_err(|e| {
                TaskRejection::Malformed {
                    what: "ring approval",
                    reason: format!("approval {index}: {e}"),
                }
            })?;
            check_scope(index, &approval, task)?;
            let now = self.clock.now_ms();
            let skew = skew_ms(self.trust.policy.max_clock_skew_s);
            if now > approval.expires_at_unix_ms.saturating_add(skew)
                || approval.issued_at_unix_ms > now.saturating_add(skew)
            {
                return Err(TaskRejection::ApprovalExpired {
                    index,
                    detail: format!(
                        "valid {}..{} ms, now {now} ms",
                        approval.issued_at_unix_ms, approval.expires_at_unix_ms
                    ),
                });
            }
            let cap_s = self.trust.policy.max_approval_lifetime_s;
            let lifetime_ms = approval
                .expires_at_unix_ms
                .saturating_sub(approval.issued_at_unix_ms);
            if lifetime_ms > skew_ms(cap_s) {
                return Err(TaskRejection::ApprovalLifetime {
                    index,
                    lifetime_s: lifetime_ms / 1000,
                    cap_s,
                });
            }
            for key in keys_here {
                if distinct.insert(key.key.to_bytes()) {
                    ids.push(key.id.clone());
                }
            }
        }
        let need = self.trust.policy.approver_threshold;
        if distinct.len() < need {
            return Err(TaskRejection::ApprovalThreshold {
                ring: task.ring,
                have: distinct.len(),
                need,
            });
        }
        Ok(ids)
    }

    fn check_time(&self, task: &pb::TaskPayload) -> Result<(), TaskRejection> {
        let now = self.clock.now_ms();
        let policy = &self.trust.policy;
        let skew = skew_ms(policy.max_clock_skew_s);
        if task.issued_at_unix_ms > now.saturating_add(skew) {
            return Err(TaskRejection::NotYetValid {
                issued_at_ms: task.issued_at_unix_ms,
                now_ms: now,
                skew_s: policy.max_clock_skew_s,
            });
        }
        if now > task.expires_at_unix_ms.saturating_add(skew) {
            return Err(TaskRejection::Expired {
                expires_at_ms: task.expires_at_unix_ms,
                now_ms: now,
            });
        }
        let lifetime_ms = task
            .expires_at_unix_ms
            .saturating_sub(task.issued_at_unix_ms);
        if lifetime_ms < 0 || lifetime_ms > skew_ms(policy.max_task_lifetime_s) {
            return Err(TaskRejection::LifetimeTooLong {
                lifetime_s: lifetime_ms / 1000,
                cap_s: policy.max_task_lifetime_s,
            });
        }
        Ok(())
    }
}

fn skew_ms(s: u64) -> i64 {
    i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)
}

fn check_sizes(
    env: &pb::Envelope,
    what: &'static str,
    max_payload: usize,
) -> Result<(), TaskRejection> {
    if env.payload.len() > max_payload {
        return Err(TaskRejection::Oversized {
            what,
            size: env.payload.len(),
            limit: max_payload,
        });
    }
    if env.payload_type.len() > MAX_TYPE_LEN {
        return Err(TaskRejection::Oversized {
            what: "payload type",
            size: env.payload_type.len(),
            limit: MAX_TYPE_LEN,
        });
    }
    if env.signatures.len() > MAX_SIGNATURES {
        return Err(TaskRejection::Oversized {
            what: "signature count",
            size: env.signatures.len(),
            limit: MAX_SIGNATURES,
        });
    }
    // The transport's size budget (`tls::MAX_SIGNED_TASK_BYTES`) counts each
    // key id hint at most this long (a signature of any other length than 64
    // bytes never verifies, so needs no cap here).
    for sig in &env.signatures {
        if sig.key_id.len() > MAX_KEY_ID_LEN {
            return Err(TaskRejection::Oversized {
                what: "signature key id",
                size: sig.key_id.len(),
                limit: MAX_KEY_ID_LEN,
            });
        }
    }
    Ok(())
}

fn check_scope(
    index: usize,
    a: &pb::RingApproval,
    task: &pb::TaskPayload,
) -> Result<(), TaskRejection> {
    let scope = |field: &'static str, approved: &str, task: &str| {
        if approved == task {
            Ok(())
        } else {
            Err(TaskRejection::ApprovalScope {
                index,
                field,
                approved: approved.to_string(),
                task: task.to_string(),
            })
        }
    };
    scope("wave_id", &a.wave_id, &task.wave_id)?;
    scope("ring", &a.ring.to_string(), &task.ring.to_string())?;
    // An approval covers only the actions it lists (none listed: nothing).
    if let Some(need) = approved_action(task)
        && !a.actions.contains(&(need as i32))
    {
        let listed: Vec<&str> = a
            .actions
            .iter()
            .map(|v| pb::ApprovedAction::try_from(*v).map_or("(unknown)", |x| x.as_str_name()))
            .collect();
        return Err(TaskRejection::ApprovalScope {
            index,
            field: "actions",
            approved: if listed.is_empty() {
                "(none)".into()
            } else {
                listed.join(",")
            },
            task: need.as_str_name().to_string(),
        });
    }
    if !a.host_ids.iter().any(|h| h == &task.host_id) {
        return Err(TaskRejection::ApprovalScope {
            index,
            field: "host_ids",
            approved: a.host_ids.join(","),
            task: task.host_id.clone(),
        });
    }
    if let Some(pb::task_payload::Action::Patch(p)) = &task.action {
        scope("profile", &a.profile, &p.profile)?;
        if p.rollback {
            // An empty rollback_version approves no rollback (see task.proto).
            if a.rollback_version.is_empty() {
                return Err(TaskRejection::ApprovalScope {
                    index,
                    field: "rollback_version",
                    approved: "(none approved)".into(),
                    task: p.version.clone(),
                });
            }
            scope("rollback_version", &a.rollback_version, &p.version)?;
        } else {
            scope("version", &a.version, &p.version)?;
        }
    }
    Ok(())
}
