//! Task execution: verify a signed task, record it durably, run it.
//!
//! [`TaskEngine::submit`] verifies a task (the six checks of
//! `ringfence::envelope`, with the journal as replay guard and the patch
//! profiles as action policy), records it as ACCEPTED and raises the
//! sequence high-water mark in one journal transaction, then runs it.
//! Every later state change is journalled before the agent acts on it.
//! At most one mutating task (drain, patch, validate, undrain) runs at a
//! time; AckFaults runs inline. A task id seen before returns its recorded
//! status and never runs again.
//!
//! At [`TaskEngine::open`] the journal is recovered: a task that was running
//! (or accepted but not finished) becomes INTERRUPTED — never a success —
//! and the host stays draining; a patch awaiting a reboot completes when the
//! boot id changed (INTERRUPTED when it did not); a patch awaiting an agent
//! restart completes when this agent runs the task's version (FAILED when
//! it came back on another).
//!
//! Files: `config` (drain and reboot settings), `engine` (the shared state,
//! opening, reads, compaction, shutdown), `submit` (verify and accept a
//! task, drive it), `recover` (recovery at open), `run` (a running task and
//! [`Run::save_with`], the order of its durable effects), and one file per
//! action (`drain`, `patch`, `validate`, `undrain`, `ack`).

mod ack;
mod config;
mod drain;
mod engine;
mod patch;
mod recover;
mod run;
mod submit;
mod undrain;
mod validate;

use ringfence::pb;

pub use config::{DrainConfig, OnTimeout, RebootConfig, TaskConfigError};
pub use engine::{
    DrainMarkCell, EngineError, EngineParts, JOURNAL_RETENTION, TaskEngine, is_terminal,
};
pub(crate) use run::Run;
pub use submit::{MAX_WAITING_VERIFICATIONS, SubmitError};

/// Output lines kept in a task's status.
pub const TAIL_LINES: usize = 20;

/// What the task engine needs from the health collector.
pub trait HealthSource: Send + Sync {
    /// A freshly collected report (`draining` is copied into it).
    fn fresh_report(&self, draining: bool) -> pb::HealthReport;
    /// A signed Attestation envelope over a fresh report, bound to `nonce`.
    fn attest(&self, nonce: &[u8], draining: bool) -> pb::Envelope;
    /// Acknowledge faults so they no longer count; returns the fault ids acknowledged.
    fn acknowledge(&self, ack: &pb::AckFaults) -> Vec<String>;
    /// The UNHEALTHY-severity faults of the host now that `ack` would
    /// acknowledge (fault ids). Non-empty: on a protected ring the AckFaults
    /// needs ring approvals.
    fn unhealthy_faults(&self, ack: &pb::AckFaults) -> Vec<String> {
        acked_by(&self.fresh_report(false), ack)
            .filter(|r| r.severity == pb::Verdict::Unhealthy as i32)
            .map(|r| r.fault_id.clone())
            .collect()
    }
}

/// The reasons of `report` that `ack` names: every one for empty codes,
/// limited to one GPU unless `gpu_index` is negative.
pub fn acked_by<'a>(
    report: &'a pb::HealthReport,
    ack: &'a pb::AckFaults,
) -> impl Iterator<Item = &'a pb::Reason> + 'a {
    report
        .reasons
        .iter()
        .filter(|r| ack.codes.is_empty() || ack.codes.contains(&r.code))
        .filter(|r| ack.gpu_index < 0 || r.gpu_index == ack.gpu_index)
}
