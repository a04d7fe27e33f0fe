//! Signing keys and what trusts them: a coordinator key and two approver
//! keys as an in-memory [`TrustSet`] ([`Signers`]), and trust files
//! (`trust.toml`, as agents and the coordinator read them) with one
//! coordinator key and any approvers ([`TrustFile`]).

use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use ringfence::keys;
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};
use serde::Serialize;

use crate::FixtureError;

/// Key id of [`Signers::coordinator`] in [`Signers::trust_set`].
pub const COORDINATOR_ID: &str = "coord";
/// Key ids of [`Signers::approvers`] in [`Signers::trust_set`].
pub const APPROVER_IDS: [&str; 2] = ["alice", "bob"];

/// A fresh coordinator key and two approver keys.
#[derive(Debug, Clone)]
pub struct Signers {
    /// Signs tasks; trusted as [`COORDINATOR_ID`].
    pub coordinator: SigningKey,
    /// Sign approvals; trusted as [`APPROVER_IDS`], in that order.
    pub approvers: [SigningKey; 2],
}

impl Signers {
    /// New random keys.
    pub fn generate() -> Self {
        Self {
            coordinator: keys::generate(),
            approvers: [keys::generate(), keys::generate()],
        }
    }

    /// The trust set of an agent that trusts these keys under `policy`.
    pub fn trust_set(&self, policy: Policy) -> TrustSet {
        let key = |id: &str, k: &SigningKey, role| TrustedKey {
            id: id.into(),
            key: k.verifying_key(),
            role,
        };
        TrustSet::from_keys(
            vec![
                key(COORDINATOR_ID, &self.coordinator, KeyRole::Coordinator),
                key(APPROVER_IDS[0], &self.approvers[0], KeyRole::Approver),
                key(APPROVER_IDS[1], &self.approvers[1], KeyRole::Approver),
            ],
            policy,
        )
    }

    /// Both approvers as signers of one envelope (`sign_message`'s argument).
    pub fn approver_signers(&self) -> [(&'static str, &SigningKey); 2] {
        [
            (APPROVER_IDS[0], &self.approvers[0]),
            (APPROVER_IDS[1], &self.approvers[1]),
        ]
    }
}

/// A trust file: an optional `[policy]`, coordinator and approver keys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TrustFile {
    /// `[policy]`; without it the agent's defaults apply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<TrustPolicy>,
    /// `[[coordinator]]` entries.
    #[serde(rename = "coordinator", skip_serializing_if = "Vec::is_empty")]
    pub coordinators: Vec<TrustEntry>,
    /// `[[approver]]` entries.
    #[serde(rename = "approver", skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<TrustEntry>,
}

/// The `[policy]` keys tests set.
#[derive(Debug, Clone, Serialize)]
pub struct TrustPolicy {
    /// Rings whose tasks need approvals.
    pub protected_rings: Vec<u32>,
    /// Distinct approvers a protected ring needs.
    pub approver_threshold: u32,
}

/// One key of a trust file.
#[derive(Debug, Clone, Serialize)]
pub struct TrustEntry {
    /// The key id signatures name.
    pub id: String,
    /// The public key as `ringfence keys` prints it.
    pub key: String,
}

impl TrustEntry {
    /// The entry for `key` under `id`.
    pub fn new(id: &str, key: &VerifyingKey) -> Self {
        Self {
            id: id.into(),
            key: keys::public_key_text(key),
        }
    }
}

impl TrustFile {
    /// A trust file with one coordinator key and no policy.
    pub fn coordinator(id: &str, key: &VerifyingKey) -> Self {
        Self {
            coordinators: vec![TrustEntry::new(id, key)],
            ..Self::default()
        }
    }

    /// With `[policy]`: `protected_rings` need `approver_threshold` approvers.
    #[must_use]
    pub fn with_policy(mut self, protected_rings: &[u32], approver_threshold: u32) -> Self {
        self.policy = Some(TrustPolicy {
            protected_rings: protected_rings.to_vec(),
            approver_threshold,
        });
        self
    }

    /// With one more approver key.
    #[must_use]
    pub fn with_approver(mut self, id: &str, key: &VerifyingKey) -> Self {
        self.approvers.push(TrustEntry::new(id, key));
        self
    }

    /// The file's text.
    pub fn render(&self) -> Result<String, FixtureError> {
        toml::to_string(self).map_err(|source| FixtureError::Render {
            what: "trust file",
            source,
        })
    }

    /// Write the file to `path`.
    pub fn write(&self, path: &Path) -> Result<(), FixtureError> {
        crate::write(path, &self.render()?)
    }
}
