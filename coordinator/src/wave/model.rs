//! The wave engine's model, at the bottom of `wave/` (above only its typed
//! outcomes, `outcome.rs`): where a host is ([`Phase`]), what the
//! coordinator sent and was attested ([`TaskRef`], [`AttestationRecord`],
//! kept per host in a [`HostRecord`]), and what one host's run needs
//! ([`Ctx`], [`Params`], [`HostJob`], [`Signer`], together with its agent a
//! [`HostRun`]). Every step file of the
//! engine imports from here; this file imports no other part of it.
//!
//! Records are stored as JSON in the wave store: a store written before
//! steps and failures were typed reads unchanged.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ringfence::keys::VerifyingKey;
use ringfence::pb;
use ringfence::time::Clock;
use serde::{Deserialize, Serialize};

use super::outcome::{Failure, TaskStep};
use crate::approvals::ApprovalSet;
use crate::client::HostApi;
use crate::store::{StoreError, WaveStore};

/// Where a host is in the wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not started.
    Pending,
    /// Proving its health before anything changes.
    AttestBefore,
    /// Leaving service.
    Draining,
    /// Running the patch profile (including a reboot or agent restart).
    Patching,
    /// Proving its health after the patch.
    Validating,
    /// Rolling back after a failed validation (`on_failure = "rollback"`).
    RollingBack,
    /// Rollback drill: patched and validated; now rolling back and validating the old version.
    DrillRollback,
    /// Rollback drill: rolled back; now re-patching and validating the new version.
    DrillRepatch,
    /// Returning to service.
    Undraining,
    /// Patched, attested healthy, back in service (or left drained if it was before).
    Done,
    /// Stopped with a failure; left drained if it was drained.
    Failed,
}

impl Phase {
    /// Whether the host is out of service in this phase (counts against the reserve).
    pub fn out_of_service(self) -> bool {
        matches!(
            self,
            Phase::Draining
                | Phase::Patching
                | Phase::Validating
                | Phase::RollingBack
                | Phase::Undraining
        )
    }
}

/// A task the coordinator sent (or is about to send) to a host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskRef {
    /// The step that sent it.
    pub step: TaskStep,
    /// The task id.
    pub task_id: String,
    /// Its sequence number.
    pub sequence: u64,
    /// The encoded SignedTask, kept so a resumed coordinator resends the same bytes.
    pub signed: Vec<u8>,
    /// Nonce of a Validate task.
    pub nonce: Vec<u8>,
    /// Final state once known.
    pub outcome: Option<TaskOutcome>,
}

/// The recorded end of a task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TaskOutcome {
    /// Final TaskState name, or NOT_SENT / NOT_ACCEPTED / NOT_DELIVERED for
    /// a task the agent never ran.
    pub state: String,
    /// The agent's message.
    pub message: String,
    /// When the coordinator learned it (ms since the epoch).
    pub at_ms: i64,
}

/// What the coordinator keeps about an attestation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttestationRecord {
    /// Verdict name.
    pub verdict: String,
    /// Driver version reported.
    pub driver_version: String,
    /// CUDA driver version reported.
    pub cuda_version: String,
    /// Reason codes.
    pub reasons: Vec<String>,
    /// Whether the host was draining when it attested.
    pub draining: bool,
    /// The original signed envelope (encoded), for the evidence.
    pub envelope: Vec<u8>,
    /// When it was verified.
    pub at_ms: i64,
}

/// Why the coordinator asked a soaking host for a fresh attestation.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SoakAttestPurpose {
    /// The health stream broke and was reopened: the attestation covers the gap.
    Reconnect,
    /// The soak time passed: the ring is promoted on it.
    EndOfSoak,
}

/// A fresh attestation a soaking host gave to the coordinator's nonce.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SoakAttestation {
    /// Why it was asked for.
    pub purpose: SoakAttestPurpose,
    /// The coordinator's nonce.
    pub nonce: Vec<u8>,
    /// When the coordinator asked (ms since the epoch); `attestation.at_ms`
    /// is when it was verified.
    pub requested_at_ms: i64,
    /// The attestation, verified against the enrolled key and the nonce.
    pub attestation: AttestationRecord,
}

/// Everything the coordinator records about one host in one wave.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostRecord {
    /// Host id.
    pub host_id: String,
    /// Ring of the host.
    pub ring: u32,
    /// Pool of the host.
    pub pool: String,
    /// Current phase.
    pub phase: Phase,
    /// Attestation before the patch.
    pub before: Option<AttestationRecord>,
    /// Attestation after the patch.
    pub after: Option<AttestationRecord>,
    /// The host was already drained by someone else before the wave: never undrained by it.
    pub already_drained: bool,
    /// Tasks sent, in order.
    pub tasks: Vec<TaskRef>,
    /// Set when the host failed.
    pub failure: Option<Failure>,
    /// Attestations of the rollback drill (after rollback, after re-patch).
    #[serde(default)]
    pub drill: Vec<AttestationRecord>,
    /// Attestations taken while its ring soaked (after a reopened health
    /// stream, at the end of the soak), oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soak: Vec<SoakAttestation>,
    /// When work on the host started / ended (ms since the epoch).
    pub started_at_ms: i64,
    /// When work on the host ended.
    pub finished_at_ms: i64,
}

impl HostRecord {
    /// A host not started yet.
    pub fn new(host_id: &str, ring: u32, pool: &str) -> Self {
        Self {
            host_id: host_id.to_string(),
            ring,
            pool: pool.to_string(),
            phase: Phase::Pending,
            before: None,
            after: None,
            already_drained: false,
            tasks: Vec::new(),
            failure: None,
            drill: Vec::new(),
            soak: Vec::new(),
            started_at_ms: 0,
            finished_at_ms: 0,
        }
    }

    /// Whether this wave's own tasks left the host drained: a successful
    /// drain came after the last successful undrain.
    pub fn drained_by_this_wave(&self) -> bool {
        let mut drained = false;
        for t in &self.tasks {
            if t.outcome.as_ref().is_some_and(|o| o.state == "SUCCEEDED") {
                match t.step.action() {
                    "drain" => drained = true,
                    "undrain" => drained = false,
                    _ => {}
                }
            }
        }
        drained
    }
}

/// The coordinator's task-signing identity.
#[derive(Debug, Clone)]
pub struct Signer {
    /// Key id written into signatures (a hint for the agent).
    pub key_id: String,
    /// The coordinator key.
    pub key: SigningKey,
}

/// Wave-wide parameters of a host run.
#[derive(Debug, Clone)]
pub struct Params {
    /// The wave.
    pub wave_id: String,
    /// Patch profile name on the agents.
    pub profile: String,
    /// Version to install.
    pub version: String,
    /// Driver version every host must report after the patch ("" = unchecked).
    pub expect_driver_version: String,
    /// CUDA driver version every host must report after the patch ("" = unchecked).
    pub expect_cuda_version: String,
    /// Lifetime of a signed task, ms.
    pub task_lifetime_ms: i64,
    /// Longest wait for one task to end (including a reboot), ms.
    pub task_timeout_ms: i64,
    /// Oldest acceptable attestation, ms.
    pub attestation_max_age_ms: i64,
    /// Tolerated clock difference with the agents, ms (the trust policy's
    /// `max_clock_skew_s`, as the agents apply it to tasks).
    pub max_clock_skew_ms: i64,
    /// Interval between task status polls.
    pub poll_interval: Duration,
    /// Roll a host that fails validation back to its previous version.
    pub rollback_on_failure: bool,
    /// Version to roll back to ("" = the driver version the host attested before).
    pub rollback_version: String,
}

/// A host run stopped for a reason the wave must hear about.
#[derive(Debug, thiserror::Error)]
pub enum HostRunError {
    /// the wave store failed; the run cannot continue safely
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a host run needs.
#[derive(Clone)]
pub struct Ctx {
    /// Wave parameters.
    pub params: Arc<Params>,
    /// The coordinator key.
    pub signer: Arc<Signer>,
    /// The durable wave store.
    pub store: Arc<WaveStore>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Set when the wave halts: no new step starts.
    pub halt: Arc<AtomicBool>,
}

impl fmt::Debug for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx").field("params", &self.params).finish()
    }
}

impl Ctx {
    /// The host's record in this wave, or a new one for a host not started.
    pub fn record(&self, job: &HostJob) -> Result<HostRecord, StoreError> {
        Ok(self
            .store
            .get_host(&job.host_id)?
            .unwrap_or_else(|| HostRecord::new(&job.host_id, job.ring, &job.pool)))
    }

    /// Store the host's record (durable when this returns).
    pub async fn save(&self, rec: &HostRecord) -> Result<(), StoreError> {
        self.store.put_host_async(&rec.host_id, rec).await
    }

    /// Move the host to `phase` and store its record.
    pub async fn set_phase(&self, rec: &mut HostRecord, phase: Phase) -> Result<(), StoreError> {
        rec.phase = phase;
        self.save(rec).await
    }
}

/// One host's run as its steps see it: the shared context, the host's job
/// and its agent.
#[derive(Clone, Copy)]
pub struct HostRun<'a> {
    /// What every host run shares.
    pub ctx: &'a Ctx,
    /// The host.
    pub job: &'a HostJob,
    /// Its agent.
    pub api: &'a dyn HostApi,
}

impl fmt::Debug for HostRun<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRun").field("job", self.job).finish()
    }
}

/// One host to run.
#[derive(Debug, Clone)]
pub struct HostJob {
    /// Host id.
    pub host_id: String,
    /// Its ring.
    pub ring: u32,
    /// Its pool.
    pub pool: String,
    /// Its enrolled attestation key.
    pub key: VerifyingKey,
    /// GPUs the inventory says it has (`expected_gpus`); fewer in a report
    /// fails attest-before and validation. 0: not checked.
    pub expected_gpus: u32,
    /// The ring's verified approvals (one copy per ring, shared by its
    /// hosts); each task carries only those covering this host and its
    /// action ([`ApprovalSet::for_task`]).
    pub approvals: Arc<ApprovalSet>,
    /// Run the rollback drill on this host (patch, validate, roll back,
    /// validate, re-patch, validate) before returning it to service.
    pub drill: bool,
}

/// The name of a task state value.
pub fn state_name(s: i32) -> &'static str {
    match pb::TaskState::try_from(s) {
        Ok(pb::TaskState::Accepted) => "ACCEPTED",
        Ok(pb::TaskState::Running) => "RUNNING",
        Ok(pb::TaskState::AwaitingReboot) => "AWAITING_REBOOT",
        Ok(pb::TaskState::AwaitingRestart) => "AWAITING_RESTART",
        Ok(pb::TaskState::Succeeded) => "SUCCEEDED",
        Ok(pb::TaskState::Failed) => "FAILED",
        Ok(pb::TaskState::Interrupted) => "INTERRUPTED",
        _ => "UNSPECIFIED",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::outcome::{FailureKind, Stage};
    use super::*;

    /// A host record as the coordinator stored it before steps and kinds
    /// were typed (strings), byte for byte.
    const OLD_RECORD: &str = r#"{"host_id":"gpu-1","ring":2,"pool":"a","phase":"failed","before":null,"after":null,"already_drained":false,"tasks":[{"step":"drain","task_id":"w/gpu-1/1/drain","sequence":1,"signed":[1,2],"nonce":[],"outcome":{"state":"SUCCEEDED","message":"","at_ms":5}},{"step":"drill_rollback_validate","task_id":"w/gpu-1/2/drill_rollback_validate","sequence":2,"signed":[],"nonce":[9],"outcome":null},{"step":"soak_drain","task_id":"w/gpu-1/3/soak_drain","sequence":3,"signed":[],"nonce":[],"outcome":null}],"failure":{"step":"attest_before","kind":"unhealthy_before","reason":"r"},"drill":[],"started_at_ms":1,"finished_at_ms":2}"#;

    #[test]
    fn a_record_stored_before_the_enums_reads_and_writes_back_byte_for_byte() {
        let rec: HostRecord = serde_json::from_str(OLD_RECORD).unwrap();
        assert_eq!(rec.tasks[0].step, TaskStep::Drain);
        assert_eq!(rec.tasks[1].step, TaskStep::DrillRollbackValidate);
        assert_eq!(rec.tasks[2].step, TaskStep::SoakDrain);
        let f = rec.failure.as_ref().unwrap();
        assert_eq!(
            (f.step, f.kind),
            (Stage::AttestBefore, FailureKind::UnhealthyBefore)
        );
        assert!(rec.drained_by_this_wave());
        assert_eq!(serde_json::to_string(&rec).unwrap(), OLD_RECORD);
    }
}
