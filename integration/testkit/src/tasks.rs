//! Task actions and coordinator-signed tasks as the agent receives them.

use ed25519_dalek::SigningKey;
use ringfence::envelope::{TASK_TYPE, sign_message};
use ringfence::pb::{self, task_payload::Action};

/// How long a test task stays valid after it is issued (10 minutes).
pub const TASK_LIFETIME_MS: i64 = 600_000;

/// Drain for `reason`.
pub fn drain(reason: &str) -> Action {
    Action::Drain(pb::Drain {
        reason: reason.into(),
    })
}

/// Install `version` with patch profile `profile`.
pub fn patch(profile: &str, version: &str) -> Action {
    Action::Patch(pb::Patch {
        profile: profile.into(),
        version: version.into(),
        rollback: false,
    })
}

/// Roll back to `version` with patch profile `profile`.
pub fn rollback(profile: &str, version: &str) -> Action {
    Action::Patch(pb::Patch {
        profile: profile.into(),
        version: version.into(),
        rollback: true,
    })
}

/// Validate, expecting `driver` and `cuda` (empty: not checked) after
/// `profile` (empty: none), with a fixed nonce.
pub fn validate(driver: &str, cuda: &str, profile: &str) -> Action {
    Action::Validate(pb::Validate {
        expect_driver_version: driver.into(),
        expect_cuda_version: cuda.into(),
        nonce: vec![7u8; 32],
        profile: profile.into(),
    })
}

/// Undrain after validation (`force`: also a drain the wave did not make).
pub fn undrain(force: bool) -> Action {
    Action::Undrain(pb::Undrain {
        reason: "validated".into(),
        force,
    })
}

/// Where a task goes and when it was issued.
#[derive(Debug, Clone, Copy)]
pub struct Addressed<'a> {
    /// `host_id`.
    pub host_id: &'a str,
    /// `wave_id`.
    pub wave_id: &'a str,
    /// `ring`.
    pub ring: u32,
    /// `sequence`.
    pub sequence: u64,
    /// `issued_at_unix_ms`; the task expires [`TASK_LIFETIME_MS`] later.
    pub issued_at_ms: i64,
}

/// Task `task_id` doing `action`, addressed as `to`, signed by `key` under
/// key id `key_id`, without approvals.
pub fn signed(
    task_id: &str,
    to: Addressed<'_>,
    action: Action,
    key_id: &str,
    key: &SigningKey,
) -> pb::SignedTask {
    let payload = pb::TaskPayload {
        task_id: task_id.into(),
        host_id: to.host_id.into(),
        wave_id: to.wave_id.into(),
        ring: to.ring,
        sequence: to.sequence,
        issued_at_unix_ms: to.issued_at_ms,
        expires_at_unix_ms: to.issued_at_ms + TASK_LIFETIME_MS,
        action: Some(action),
    };
    pb::SignedTask {
        task: Some(sign_message(TASK_TYPE, &payload, &[(key_id, key)])),
        approvals: vec![],
    }
}
