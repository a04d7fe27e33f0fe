//! Human approvals: ring approvals that let Patch tasks reach a protected
//! ring, and break-glass approvals that raise one pool's out-of-service
//! limit for one wave. Both are DSSE envelopes signed by approver keys
//! (never a coordinator key), handed around as small JSON files so several
//! approvers can sign on their own machines.
//!
//! The agents check ring approvals themselves; the coordinator checks them
//! too, so that it never sends a Patch it knows will be refused.
//!
//! `request` builds what an approver signs (`ringfence wave approve`).

mod request;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use crate::dsse::EnvelopeFile;
use ed25519_dalek::SigningKey;
use prost::Message;
use ringfence::envelope::{self, APPROVAL_TYPE, BREAKGLASS_TYPE, MAX_APPROVALS, MAX_TASK_PAYLOAD};
use ringfence::pb::{self, task_payload::Action};
use ringfence::trust::{KeyRole, TrustSet};

pub use request::{Request, build, check_ttl, digest, part_limit, render, scope_differences};

/// An approval could not be made, read or accepted.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// an approval file could not be read or written
    #[error("{path}: {reason}")]
    Io {
        /// The approval file.
        path: PathBuf,
        /// The I/O or encoding error.
        reason: String,
    },
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
    BadSignature {
        /// Key id the signature names.
        key_id: String,
        /// Why it does not verify (unknown key, wrong role, bad signature).
        reason: String,
    },
    /// the approval is for something else
    #[error("approval is for {field} `{approved}`, expected `{expected}`")]
    Scope {
        /// The scope field that differs (wave, ring, profile, version or hosts).
        field: &'static str,
        /// What the approval says.
        approved: String,
        /// What the wave needs.
        expected: String,
    },
    /// the approval has expired
    #[error("approval expired at {expires_at_ms} ms (now {now_ms} ms)")]
    Expired {
        /// When the approval stopped being valid, ms since the epoch.
        expires_at_ms: i64,
        /// The time of the check, ms since the epoch (from the caller's clock).
        now_ms: i64,
    },
    /// not enough distinct approver keys
    #[error("{what} needs {need} distinct approver keys, has {have}")]
    BelowThreshold {
        /// What needs the approvals (a ring, or a break-glass for a pool).
        what: String,
        /// Distinct approver keys whose signatures verify.
        have: usize,
        /// The trust policy's threshold.
        need: usize,
    },
    /// the approval lists no action, or an action this coordinator does not know
    #[error(
        "approval lists {0}; it must list at least one of patch, rollback, force-undrain, ack-faults"
    )]
    Actions(String),
    /// the approval does not cover an action the caller needs
    #[error("approval does not list the action `{0}`")]
    ActionNotApproved(&'static str),
    /// a rollback was asked for but the spec names no rollback version
    #[error(
        "the action `rollback` needs a rollback_version in the wave spec (an approval with an empty rollback_version approves no rollback)"
    )]
    NoRollbackVersion,
    /// the requested lifetime is zero or over the cap
    #[error("approval lifetime {ttl_s} s is outside 1..={cap_s} s ({why})")]
    Lifetime {
        /// The requested lifetime, seconds.
        ttl_s: u64,
        /// The largest lifetime allowed, seconds.
        cap_s: u64,
        /// Where the cap comes from (e.g. the trust policy's `max_approval_lifetime_s`).
        why: String,
    },
    /// the ring's approval can never fit what an agent accepts with one task
    #[error("{0}")]
    TooLarge(String),
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
        .map_err(|e| ApprovalError::Malformed(e.to_string()))
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

/// What one verified ring approval covers (decoded once, from the signed
/// bytes).
#[derive(Debug, Clone)]
pub struct Covers {
    /// Trust-file ids of the approver keys that signed it.
    pub approvers: Vec<String>,
    /// Hosts it names.
    pub hosts: HashSet<String>,
    /// Actions it lists.
    pub actions: BTreeSet<i32>,
    /// Profile.
    pub profile: String,
    /// Version a patch may install.
    pub version: String,
    /// Version a rollback may return to ("" = no rollback approved).
    pub rollback_version: String,
    /// Expiry, ms since the epoch.
    pub expires_at_ms: i64,
}

/// Verify one ring approval: signatures by approvers only, payload type,
/// wave, ring, profile, version, at least one known action, not expired.
/// Which hosts it covers is returned, not required (an approval of a large
/// ring may come in parts, each naming some of its hosts).
pub fn verify_ring(
    env: &pb::Envelope,
    trust: &TrustSet,
    scope: &RingScope<'_>,
    now_ms: i64,
) -> Result<Covers, ApprovalError> {
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
    let actions = known_actions(&a.actions)?;
    if now_ms > a.expires_at_unix_ms {
        return Err(ApprovalError::Expired {
            expires_at_ms: a.expires_at_unix_ms,
            now_ms,
        });
    }
    Ok(Covers {
        approvers: ids,
        hosts: a.host_ids.into_iter().collect(),
        actions,
        profile: a.profile,
        version: a.version,
        rollback_version: a.rollback_version,
        expires_at_ms: a.expires_at_unix_ms,
    })
}

/// The listed actions, all known and at least one.
fn known_actions(actions: &[i32]) -> Result<BTreeSet<i32>, ApprovalError> {
    let mut out = BTreeSet::new();
    for a in actions {
        match pb::ApprovedAction::try_from(*a) {
            Ok(pb::ApprovedAction::Unspecified) | Err(_) => {
                return Err(ApprovalError::Actions(format!("unknown action {a}")));
            }
            Ok(x) => {
                out.insert(x as i32);
            }
        }
    }
    if out.is_empty() {
        return Err(ApprovalError::Actions("no action".into()));
    }
    Ok(out)
}

/// Check one ring approval as a whole-ring patch approval: [`verify_ring`],
/// plus it lists `patch` and names every host of the scope. Returns the
/// approver ids.
pub fn check_ring(
    env: &pb::Envelope,
    trust: &TrustSet,
    scope: &RingScope<'_>,
    now_ms: i64,
) -> Result<Vec<String>, ApprovalError> {
    let c = verify_ring(env, trust, scope, now_ms)?;
    if !c.actions.contains(&(pb::ApprovedAction::Patch as i32)) {
        return Err(ApprovalError::ActionNotApproved("patch"));
    }
    for h in scope.hosts {
        if !c.hosts.contains(h) {
            let mut named: Vec<&String> = c.hosts.iter().collect();
            named.sort();
            return Err(ApprovalError::Scope {
                field: "host",
                approved: named
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                expected: h.clone(),
            });
        }
    }
    Ok(c.approvers)
}

/// The CLI name of an approved action.
pub fn action_name(a: i32) -> &'static str {
    match pb::ApprovedAction::try_from(a) {
        Ok(pb::ApprovedAction::Patch) => "patch",
        Ok(pb::ApprovedAction::Rollback) => "rollback",
        Ok(pb::ApprovedAction::ForceUndrain) => "force-undrain",
        Ok(pb::ApprovedAction::AckFaults) => "ack-faults",
        _ => "unspecified",
    }
}

/// The approval a task needs, by action: a Patch toward the wave's version
/// needs `patch`, a rollback Patch `rollback`, a forced Undrain
/// `force-undrain`, an AckFaults `ack-faults`; other tasks need none. The
/// agent decides whether its ring asks for approvals at all.
pub fn required_action(action: &Action) -> Option<pb::ApprovedAction> {
    match action {
        Action::Patch(p) if p.rollback => Some(pb::ApprovedAction::Rollback),
        Action::Patch(_) => Some(pb::ApprovedAction::Patch),
        Action::Undrain(u) if u.force => Some(pb::ApprovedAction::ForceUndrain),
        Action::AckFaults(_) => Some(pb::ApprovedAction::AckFaults),
        _ => None,
    }
}

/// The most bytes of approvals attached to one task: what an agent decodes
/// in one `SubmitTask` request ([`ringfence::tls::MAX_SIGNED_TASK_BYTES`],
/// the largest SignedTask its verifier accepts) less room for the task
/// envelope itself.
pub const ATTACH_BUDGET: usize =
    ringfence::tls::MAX_SIGNED_TASK_BYTES - MAX_TASK_PAYLOAD - 64 * 1024;

/// A ring's verified approvals, ready to attach: each task gets only the
/// approvals that cover its host and its action, one per distinct approver
/// set, within [`MAX_APPROVALS`] and [`ATTACH_BUDGET`].
#[derive(Debug, Clone, Default)]
pub struct ApprovalSet {
    envelopes: Vec<pb::Envelope>,
    covers: Vec<Covers>,
}

impl std::ops::Deref for ApprovalSet {
    type Target = Vec<pb::Envelope>;
    fn deref(&self) -> &Self::Target {
        &self.envelopes
    }
}

impl ApprovalSet {
    /// No approvals.
    pub const fn empty() -> Self {
        Self {
            envelopes: Vec::new(),
            covers: Vec::new(),
        }
    }

    /// Add a verified approval.
    pub fn push(&mut self, env: pb::Envelope, covers: Covers) {
        self.envelopes.push(env);
        self.covers.push(covers);
    }

    /// The approvals to attach to a task with `action` for `host`: those
    /// naming the host, listing the action, matching its profile and
    /// version (the rollback version for a rollback), unexpired at
    /// `now_ms`, each adding an approver not yet counted, and together no
    /// more than an agent accepts.
    pub fn for_task(&self, host: &str, action: &Action, now_ms: i64) -> Vec<pb::Envelope> {
        let Some(need) = required_action(action) else {
            return Vec::new();
        };
        let mut counted: BTreeSet<&str> = BTreeSet::new();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (env, c) in self.envelopes.iter().zip(&self.covers) {
            let fits_version = match action {
                Action::Patch(p) if p.rollback => {
                    !c.rollback_version.is_empty()
                        && c.rollback_version == p.version
                        && c.profile == p.profile
                }
                Action::Patch(p) => c.version == p.version && c.profile == p.profile,
                _ => true,
            };
            if !fits_version
                || !c.actions.contains(&(need as i32))
                || !c.hosts.contains(host)
                || now_ms > c.expires_at_ms
                || c.approvers.iter().all(|a| counted.contains(a.as_str()))
            {
                continue;
            }
            if out.len() >= MAX_APPROVALS {
                break;
            }
            let size = env.encoded_len();
            if bytes + size > ATTACH_BUDGET {
                // A smaller approval further on may still fit.
                continue;
            }
            bytes += size;
            counted.extend(c.approvers.iter().map(String::as_str));
            out.push(env.clone());
        }
        out
    }

    /// Distinct approvers who, together over their approvals, cover every
    /// host of `hosts` for `action`.
    pub fn approvers_covering(
        &self,
        hosts: &[String],
        action: pb::ApprovedAction,
    ) -> BTreeSet<String> {
        let mut by_approver: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
        for c in &self.covers {
            if !c.actions.contains(&(action as i32)) {
                continue;
            }
            for a in &c.approvers {
                by_approver
                    .entry(a.as_str())
                    .or_default()
                    .extend(c.hosts.iter().map(String::as_str));
            }
        }
        by_approver
            .into_iter()
            .filter(|(_, covered)| hosts.iter().all(|h| covered.contains(h.as_str())))
            .map(|(a, _)| a.to_string())
            .collect()
    }
}

/// The approval files of a ring that pass [`verify_ring`], the distinct
/// approvers whose approvals together cover every host of the ring for
/// `patch`, and why the other files were refused.
#[derive(Debug, Default)]
pub struct RingApprovals {
    /// Valid approval envelopes; each task gets those covering it
    /// ([`ApprovalSet::for_task`]).
    pub envelopes: ApprovalSet,
    /// Distinct approver ids covering the whole ring for `patch`.
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
            .and_then(|env| verify_ring(&env, trust, scope, now_ms).map(|c| (env, c)))
        {
            Ok((env, c)) => out.envelopes.push(env, c),
            Err(e) => out.refused.push((p, e.to_string())),
        }
    }
    out.approvers = out
        .envelopes
        .approvers_covering(scope.hosts, pb::ApprovedAction::Patch);
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
