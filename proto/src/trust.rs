//! The agent's trust file: which ed25519 keys may sign tasks (coordinators),
//! which may approve protected-ring work (approvers), which are revoked, and
//! the verification policy.
//!
//! ```toml
//! # /etc/ringfence/trust.toml
//! [policy]
//! protected_rings = [2, 3, 4]   # Patch, rollback, forced Undrain, unhealthy AckFaults need approvals
//! approver_threshold = 2        # distinct approver keys needed
//! max_clock_skew_s = 120        # tolerated clock difference with the signer
//! max_task_lifetime_s = 3600    # cap on expires_at - issued_at, whatever the signer claims
//! max_approval_lifetime_s = 86400  # cap on an approval's expires_at - issued_at
//!
//! [[coordinator]]
//! id = "coord-2026"
//! key = "ed25519:BASE64..."
//!
//! [[approver]]
//! id = "alice"
//! key = "ed25519:BASE64..."
//!
//! [[revoked]]
//! id = "coord-2025"
//! key = "ed25519:BASE64..."
//! ```
//! Keys are identified by their public key bytes; `id` is a label and a
//! lookup hint. Weak keys, a key listed twice, and a key that is both
//! coordinator and approver are refused when the file is loaded. A key that
//! is listed as revoked is revoked, whatever other list also names it.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use ed25519_dalek::{Signature as DalekSignature, VerifyingKey};
use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, Source};
use crate::keys;
use crate::pb;

/// What a trusted key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRole {
    /// Signs tasks.
    Coordinator,
    /// Signs ring approvals and break-glass approvals.
    Approver,
    /// Once trusted, now refused everywhere.
    Revoked,
}

/// One key from the trust file.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// Label from the trust file.
    pub id: String,
    /// The public key.
    pub key: VerifyingKey,
    /// What it may do.
    pub role: KeyRole,
}

/// Verification policy (the `[policy]` table).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Rings whose agents need ring approvals for Patch, rollback, forced
    /// Undrain and AckFaults of an UNHEALTHY fault (an agent with no ring
    /// configured counts as protected).
    pub protected_rings: BTreeSet<u32>,
    /// Distinct approver keys a ring approval needs.
    pub approver_threshold: usize,
    /// Tolerated clock difference between signer and agent, seconds.
    pub max_clock_skew_s: u64,
    /// Longest accepted task lifetime (expires_at - issued_at), seconds.
    pub max_task_lifetime_s: u64,
    /// Longest accepted ring approval lifetime (expires_at - issued_at), seconds.
    pub max_approval_lifetime_s: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            protected_rings: [2, 3, 4].into_iter().collect(),
            approver_threshold: 2,
            max_clock_skew_s: 120,
            max_task_lifetime_s: 3600,
            max_approval_lifetime_s: 86_400,
        }
    }
}

/// A trust file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// the trust file could not be read or parsed
    #[error(transparent)]
    Config(#[from] ConfigError),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    #[serde(default)]
    policy: Option<Spanned<Policy>>,
    #[serde(default)]
    coordinator: Vec<KeyEntry>,
    #[serde(default)]
    approver: Vec<KeyEntry>,
    #[serde(default)]
    revoked: Vec<KeyEntry>,
}

/// The loaded trust file: keys and policy.
#[derive(Debug, Clone, Default)]
pub struct TrustSet {
    keys: Vec<TrustedKey>,
    /// The verification policy.
    pub policy: Policy,
}

/// Why a signature did not identify a trusted, unrevoked key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigFailure {
    /// The signature bytes are not a 64-byte ed25519 signature.
    Malformed,
    /// The key named by key_id is known but the signature does not verify.
    BadSignature,
    /// No trusted key made this signature.
    UnknownKey,
}

impl TrustSet {
    /// Load and validate a trust file.
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let src = Source::read(path)?;
        Ok(Self::from_source(&src)?)
    }

    /// Parse and validate trust-file text (`src.path` is used in errors).
    pub fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let file: TrustFile = src.parse()?;
        let policy = match file.policy {
            Some(p) => {
                let span = p.span();
                let p = p.into_inner();
                if p.approver_threshold == 0 {
                    return Err(src.invalid(
                        span,
                        "policy.approver_threshold",
                        "must be at least 1",
                    ));
                }
                if p.max_approval_lifetime_s == 0 {
                    return Err(src.invalid(
                        span,
                        "policy.max_approval_lifetime_s",
                        "must be at least 1",
                    ));
                }
                if p.protected_rings.iter().any(|r| *r > 4) {
                    return Err(src.invalid(span, "policy.protected_rings", "rings are 0-4"));
                }
                p
            }
            None => Policy::default(),
        };
        let mut keys = Vec::new();
        let mut ids = HashSet::new();
        for (list, role, name) in [
            (&file.revoked, KeyRole::Revoked, "revoked"),
            (&file.coordinator, KeyRole::Coordinator, "coordinator"),
            (&file.approver, KeyRole::Approver, "approver"),
        ] {
            for entry in list {
                let id = entry.id.get_ref();
                if id.is_empty() {
                    return Err(src.invalid(entry.id.span(), &format!("{name}.id"), "empty id"));
                }
                if !ids.insert(id.clone()) {
                    return Err(src.invalid(
                        entry.id.span(),
                        &format!("{name}.id"),
                        format!("key id `{id}` is used twice"),
                    ));
                }
                let key = keys::parse_public_key(entry.key.get_ref()).map_err(|e| {
                    src.invalid(entry.key.span(), &format!("{name}.key"), e.to_string())
                })?;
                if let Some(prev) = keys.iter().find(|k: &&TrustedKey| k.key == key) {
                    // A revoked key stays revoked even if another list names it.
                    if prev.role == KeyRole::Revoked {
                        continue;
                    }
                    return Err(src.invalid(
                        entry.key.span(),
                        &format!("{name}.key"),
                        format!(
                            "this key is already listed as `{}` ({:?}); one key has one role — a coordinator key can never be an approver",
                            prev.id, prev.role
                        ),
                    ));
                }
                keys.push(TrustedKey {
                    id: id.clone(),
                    key,
                    role,
                });
            }
        }
        Ok(Self { keys, policy })
    }

    /// Build a trust set in code (tests, the in-process demo).
    pub fn from_keys(keys: Vec<TrustedKey>, policy: Policy) -> Self {
        Self { keys, policy }
    }

    /// Every key, in file order (revoked first).
    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// The key that made `sig` over `msg`, trying the key named by the
    /// key_id hint first and then every other key. Uses `verify_strict`.
    pub fn identify(&self, msg: &[u8], sig: &pb::Signature) -> Result<&TrustedKey, SigFailure> {
        let Ok(signature) = DalekSignature::from_slice(&sig.sig) else {
            return Err(SigFailure::Malformed);
        };
        let hinted = self.keys.iter().find(|k| k.id == sig.key_id);
        if let Some(k) = hinted
            && k.key.verify_strict(msg, &signature).is_ok()
        {
            return Ok(k);
        }
        for k in &self.keys {
            if k.id != sig.key_id && k.key.verify_strict(msg, &signature).is_ok() {
                return Ok(k);
            }
        }
        if hinted.is_some() {
            Err(SigFailure::BadSignature)
        } else {
            Err(SigFailure::UnknownKey)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn k() -> String {
        keys::public_key_text(&keys::generate().verifying_key())
    }

    #[test]
    fn loads_keys_and_policy() {
        let text = format!(
            "[policy]\napprover_threshold = 3\nprotected_rings = [3]\n\n[[coordinator]]\nid = \"c\"\nkey = \"{}\"\n[[approver]]\nid = \"a\"\nkey = \"{}\"\n",
            k(),
            k()
        );
        let t = TrustSet::from_source(&Source::from_text("trust.toml", text)).unwrap();
        assert_eq!(t.policy.approver_threshold, 3);
        assert_eq!(t.keys().len(), 2);
        assert_eq!(t.policy.max_clock_skew_s, 120);
    }

    #[test]
    fn weak_key_is_refused_with_line_and_key() {
        let mut weak = [0u8; 32];
        weak[0] = 1;
        use base64::Engine;
        let text = format!(
            "[[coordinator]]\nid = \"c\"\nkey = \"{}\"\n\n[[approver]]\nid = \"bad\"\nkey = \"ed25519:{}\"\n",
            k(),
            base64::engine::general_purpose::STANDARD.encode(weak)
        );
        let err = TrustSet::from_source(&Source::from_text("/etc/ringfence/trust.toml", text))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/ringfence/trust.toml:7:"), "{err}");
        assert!(err.contains("approver.key"), "{err}");
        assert!(err.contains("weak"), "{err}");
    }

    #[test]
    fn coordinator_key_cannot_also_be_approver() {
        let key = k();
        let text = format!(
            "[[coordinator]]\nid = \"c\"\nkey = \"{key}\"\n[[approver]]\nid = \"a\"\nkey = \"{key}\"\n"
        );
        let err = TrustSet::from_source(&Source::from_text("t", text))
            .unwrap_err()
            .to_string();
        assert!(err.contains("never be an approver"), "{err}");
    }

    #[test]
    fn revoked_wins_over_other_lists() {
        let key = k();
        let text = format!(
            "[[coordinator]]\nid = \"c\"\nkey = \"{key}\"\n[[revoked]]\nid = \"r\"\nkey = \"{key}\"\n"
        );
        let t = TrustSet::from_source(&Source::from_text("t", text)).unwrap();
        assert_eq!(t.keys().len(), 1);
        assert_eq!(t.keys()[0].role, KeyRole::Revoked);
    }

    #[test]
    fn approval_lifetime_cap_defaults_and_zero_is_refused() {
        let t = TrustSet::from_source(&Source::from_text("t", "[policy]\n")).unwrap();
        assert_eq!(t.policy.max_approval_lifetime_s, 86_400);
        let t = TrustSet::from_source(&Source::from_text(
            "t",
            "[policy]\nmax_approval_lifetime_s = 3600\n",
        ))
        .unwrap();
        assert_eq!(t.policy.max_approval_lifetime_s, 3600);
        let err = TrustSet::from_source(&Source::from_text(
            "trust.toml",
            "[policy]\nmax_approval_lifetime_s = 0\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("trust.toml:1:"), "{err}");
        assert!(err.contains("policy.max_approval_lifetime_s"), "{err}");
    }

    #[test]
    fn unknown_key_in_file_is_refused() {
        let err = TrustSet::from_source(&Source::from_text(
            "t",
            "[[coordinator]]\nid=\"c\"\nkey=\"x\"\nextra=1\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("extra"), "{err}");
    }
}
