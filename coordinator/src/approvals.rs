//! Human approvals: ring approvals that let Patch tasks reach a protected
//! ring, and break-glass approvals that raise one pool's out-of-service
//! limit for one wave. Both are DSSE envelopes signed by approver keys
//! (never a coordinator key), handed around as small JSON files so several
//! approvers can sign on their own machines.
//!
//! The agents check ring approvals themselves; the coordinator checks them
//! too, so that it never sends a Patch it knows will be refused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use prost::Message;
use ringfence::envelope::{self, APPROVAL_TYPE, BREAKGLASS_TYPE};
use ringfence::pb;
use ringfence::trust::{KeyRole, TrustSet};
use serde::{Deserialize, Serialize};

/// An envelope as a JSON file: standard DSSE JSON (`payloadType`, `payload`,
/// `signatures[{keyid, sig}]`); the older `payload_type` / `key_id` are read too.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeFile {
    /// The envelope's payload type.
    #[serde(rename = "payloadType", alias = "payload_type")]
    pub payload_type: String,
    /// base64 of the payload bytes.
    pub payload: String,
    /// Signatures.
    pub signatures: Vec<crate::evidence::SignatureJson>,
}

impl EnvelopeFile {
    /// From an envelope.
    pub fn from_envelope(env: &pb::Envelope) -> Self {
        Self {
            payload_type: env.payload_type.clone(),
            payload: B64.encode(&env.payload),
            signatures: env
                .signatures
                .iter()
                .map(|s| crate::evidence::SignatureJson {
                    key_id: s.key_id.clone(),
                    sig: B64.encode(&s.sig),
                })
                .collect(),
        }
    }

    /// Back to an envelope.
    pub fn to_envelope(&self) -> Result<pb::Envelope, ApprovalError> {
        let bad = |e: base64::DecodeError| ApprovalError::Malformed(e.to_string());
        Ok(pb::Envelope {
            payload_type: self.payload_type.clone(),
            payload: B64.decode(&self.payload).map_err(bad)?,
            signatures: self
                .signatures
                .iter()
                .map(|s| {
                    Ok(pb::Signature {
                        key_id: s.key_id.clone(),
                        sig: B64.decode(&s.sig).map_err(bad)?,
                    })
                })
                .collect::<Result<_, ApprovalError>>()?,
        })
    }
}

/// An approval could not be made, read or accepted.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// an approval file could not be read or written
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    /// the file is not a well-formed approval
    #[error("malformed approval: {0}")]
    Malformed(String),
    /// the signing key is a coordinator key, which can never approve
    #[error(
        "key `{0}` is a coordinator key in the trust file; a coordinator key can never approve"
    )]
    CoordinatorKey(String),
    /// the signing key is not an approver key in the trust file
    #[error("the signing key ({0}) is not an approver key in the trust file")]
    NotApprover(String),
    /// a signature does not verify against any approver key
    #[error("signature (key id `{key_id}`) does not verify against any approver key: {reason}")]
    BadSignature { key_id: String, reason: String },
    /// the approval is for something else
    #[error("approval is for {field} `{approved}`, expected `{expected}`")]
    Scope {
        field: &'static str,
        approved: String,
        expected: String,
    },
    /// the approval has expired
    #[error("approval expired at {expires_at_ms} ms (now {now_ms} ms)")]
    Expired { expires_at_ms: i64, now_ms: i64 },
    /// not enough distinct approver keys
    #[error("{what} needs {need} distinct approver keys, has {have}")]
    BelowThreshold {
        what: String,
        have: usize,
        need: usize,
    },
}

/// Read an envelope JSON file.
pub fn read_file(path: &Path) -> Result<pb::Envelope, ApprovalError> {
    let bytes = std::fs::read(path).map_err(|e| ApprovalError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let f: EnvelopeFile =
        serde_json::from_slice(&bytes).map_err(|e| ApprovalError::Malformed(e.to_string()))?;
    f.to_envelope()
}

/// Write an envelope JSON file (atomically).
pub fn write_file(path: &Path, env: &pb::Envelope) -> Result<(), ApprovalError> {
    let bytes = serde_json::to_vec_pretty(&EnvelopeFile::from_envelope(env))
        .map_err(|e| ApprovalError::Malformed(e.to_string()))?;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| ApprovalError::Io {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    crate::store::write_atomic(path, &bytes).map_err(|e| ApprovalError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Refuse to sign with a key the trust file lists as a coordinator key (or
/// any key not listed as an approver).
pub fn check_signing_key(trust: &TrustSet, key: &SigningKey) -> Result<String, ApprovalError> {
    let vk = key.verifying_key();
    match trust.keys().iter().find(|k| k.key == vk) {
        Some(k) if k.role == KeyRole::Coordinator => {
            Err(ApprovalError::CoordinatorKey(k.id.clone()))
        }
        Some(k) if k.role == KeyRole::Approver => Ok(k.id.clone()),
        _ => Err(ApprovalError::NotApprover(ringfence::keys::fingerprint(
            &vk,
        ))),
    }
}

/// Sign a ring approval (or add a signature to an existing one).
pub fn sign_ring(approval: &pb::RingApproval, key_id: &str, key: &SigningKey) -> pb::Envelope {
    envelope::sign_message(APPROVAL_TYPE, approval, &[(key_id, key)])
}

/// Sign a break-glass approval.
pub fn sign_breakglass(bg: &pb::BreakGlass, key_id: &str, key: &SigningKey) -> pb::Envelope {
    envelope::sign_message(BREAKGLASS_TYPE, bg, &[(key_id, key)])
}

/// The approver keys (trust-file ids) whose signatures on `env` verify.
/// Any signature that does not verify, or is by a non-approver, is an error.
fn approvers_of(env: &pb::Envelope, trust: &TrustSet) -> Result<Vec<String>, ApprovalError> {
    let msg = envelope::pae(&env.payload_type, &env.payload);
    let mut ids = Vec::new();
    if env.signatures.is_empty() {
        return Err(ApprovalError::Malformed("unsigned".into()));
    }
    for s in &env.signatures {
        match trust.identify(&msg, s) {
            Ok(k) if k.role == KeyRole::Approver => ids.push(k.id.clone()),
            Ok(k) if k.role == KeyRole::Coordinator => {
                return Err(ApprovalError::CoordinatorKey(k.id.clone()));
            }
            Ok(k) => {
                return Err(ApprovalError::BadSignature {
                    key_id: s.key_id.clone(),
                    reason: format!("key `{}` is revoked", k.id),
                });
            }
            Err(e) => {
                return Err(ApprovalError::BadSignature {
                    key_id: s.key_id.clone(),
                    reason: format!("{e:?}"),
                });
            }
        }
    }
    Ok(ids)
}

/// What a ring approval must cover.
#[derive(Debug, Clone)]
pub struct RingScope<'a> {
    /// Wave id.
    pub wave_id: &'a str,
    /// Ring.
    pub ring: u32,
    /// Profile.
    pub profile: &'a str,
    /// Version.
    pub version: &'a str,
    /// Hosts of the ring that must all be covered.
    pub hosts: &'a [String],
}

/// Check one ring approval: signatures by approvers, scope, expiry. Returns
/// the approver ids.
pub fn check_ring(
    env: &pb::Envelope,
    trust: &TrustSet,
    scope: &RingScope<'_>,
    now_ms: i64,
) -> Result<Vec<String>, ApprovalError> {
    if env.payload_type != APPROVAL_TYPE {
        return Err(ApprovalError::Malformed(format!(
            "payload type `{}`, expected `{APPROVAL_TYPE}`",
            env.payload_type
        )));
    }
    let ids = approvers_of(env, trust)?;
    let a = pb::RingApproval::decode(env.payload.as_slice())
        .map_err(|e| ApprovalError::Malformed(e.to_string()))?;
    let eq = |field: &'static str, approved: &str, expected: &str| {
        if approved == expected {
            Ok(())
        } else {
            Err(ApprovalError::Scope {
                field,
                approved: approved.to_string(),
                expected: expected.to_string(),
            })
        }
    };
    eq("wave", &a.wave_id, scope.wave_id)?;
    eq("ring", &a.ring.to_string(), &scope.ring.to_string())?;
    eq("profile", &a.profile, scope.profile)?;
    eq("version", &a.version, scope.version)?;
    for h in scope.hosts {
        if !a.host_ids.contains(h) {
            return Err(ApprovalError::Scope {
                field: "host",
                approved: a.host_ids.join(","),
                expected: h.clone(),
            });
        }
    }
    if now_ms > a.expires_at_unix_ms {
        return Err(ApprovalError::Expired {
            expires_at_ms: a.expires_at_unix_ms,
            now_ms,
        });
    }
    Ok(ids)
}

/// The approval files of a ring that pass [`check_ring`], the distinct
/// approvers they add up to, and why the others were refused.
#[derive(Debug, Default)]
pub struct RingApprovals {
    /// Valid approval envelopes to attach to the ring's Patch tasks.
    pub envelopes: Vec<pb::Envelope>,
    /// Distinct approver ids.
    pub approvers: BTreeSet<String>,
    /// Refused files and why.
    pub refused: Vec<(PathBuf, String)>,
}

/// Directory where approval files of `wave` are collected.
pub fn approvals_dir(state_dir: &Path, wave: &str) -> PathBuf {
    state_dir.join(format!("{wave}.approvals"))
}

/// Collect the ring's approvals from `dir` (`ring-<N>-*.json`).
pub fn collect_ring(
    dir: &Path,
    trust: &TrustSet,
    scope: &RingScope<'_>,
    now_ms: i64,
) -> RingApprovals {
    let mut out = RingApprovals::default();
    let prefix = format!("ring-{}-", scope.ring);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
        })
        .collect();
    paths.sort();
    for p in paths {
        match read_file(&p)
            .and_then(|env| check_ring(&env, trust, scope, now_ms).map(|ids| (env, ids)))
        {
            Ok((env, ids)) => {
                out.approvers.extend(ids);
                out.envelopes.push(env);
            }
            Err(e) => out.refused.push((p, e.to_string())),
        }
    }
    out
}

/// A verified break-glass approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassGrant {
    /// Pool whose limit is raised.
    pub pool: String,
    /// New limit of hosts out of service at once.
    pub max_out: u32,
    /// Why.
    pub reason: String,
    /// Distinct approvers.
    pub approvers: Vec<String>,
    /// Expiry, ms since the epoch (a running wave falls back to the reserve then).
    pub expires_at_ms: i64,
}

/// Verify a break-glass envelope for `wave`: approver signatures meeting the
/// threshold, the right wave, not expired.
pub fn check_breakglass(
    env: &pb::Envelope,
    trust: &TrustSet,
    wave: &str,
    now_ms: i64,
) -> Result<BreakGlassGrant, ApprovalError> {
    if env.payload_type != BREAKGLASS_TYPE {
        return Err(ApprovalError::Malformed(format!(
            "payload type `{}`, expected `{BREAKGLASS_TYPE}`",
            env.payload_type
        )));
    }
    let mut ids = approvers_of(env, trust)?;
    ids.sort();
    ids.dedup();
    let bg = pb::BreakGlass::decode(env.payload.as_slice())
        .map_err(|e| ApprovalError::Malformed(e.to_string()))?;
    if bg.wave_id != wave {
        return Err(ApprovalError::Scope {
            field: "wave",
            approved: bg.wave_id,
            expected: wave.to_string(),
        });
    }
    if now_ms > bg.expires_at_unix_ms {
        return Err(ApprovalError::Expired {
            expires_at_ms: bg.expires_at_unix_ms,
            now_ms,
        });
    }
    let need = trust.policy.approver_threshold;
    if ids.len() < need {
        return Err(ApprovalError::BelowThreshold {
            what: format!("break-glass for pool `{}`", bg.pool),
            have: ids.len(),
            need,
        });
    }
    Ok(BreakGlassGrant {
        pool: bg.pool,
        max_out: bg.max_out,
        reason: bg.reason,
        approvers: ids,
        expires_at_ms: bg.expires_at_unix_ms,
    })
}
