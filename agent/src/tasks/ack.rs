//! AckFaults: hand the acknowledgement to the health source (the faults no
//! longer count in the verdict) and record who acknowledged what, and why.
//!
//! On a protected ring an AckFaults that touches an UNHEALTHY-severity fault
//! needs ring approvals covering `ACK_FAULTS` (the verifier asks for them);
//! the acknowledging operators recorded in the journal are those approvers'
//! keys, never the task's free-text `operator`. Without approvals the
//! acknowledgement is checked again here, against the host as it is now,
//! and narrowed to the codes it touches: a fault that turned UNHEALTHY after
//! verification is never acknowledged by a coordinator-only task.

use std::collections::BTreeSet;

use ringfence::pb::{self, TaskState};

use super::{Run, acked_by};
use crate::journal::{AckRecord, JournalError};

pub(super) async fn run(run: &mut Run, a: &pb::AckFaults) -> Result<(), JournalError> {
    let who = if run.approvers.is_empty() {
        "coordinator (no UNHEALTHY fault, no approvals needed)".to_string()
    } else {
        format!("approvers {}", run.approvers.join(", "))
    };
    run.step("acknowledge", format!("{who} acknowledge faults"))?;
    let mut ack = a.clone();
    let narrowed = run.approvers.is_empty() && protected(run);
    if narrowed {
        let report = match run.fresh_report(run.draining_now()?).await {
            Ok(r) => r,
            Err(e) => return run.fail(e),
        };
        let touched: Vec<&pb::Reason> = acked_by(&report, a).collect();
        let unhealthy: Vec<&str> = touched
            .iter()
            .filter(|r| r.severity == pb::Verdict::Unhealthy as i32)
            .map(|r| r.fault_id.as_str())
            .collect();
        if !unhealthy.is_empty() {
            return run.fail(format!(
                "ack refused: UNHEALTHY fault(s) {} need ring approvals covering ACK_FAULTS on this protected ring",
                unhealthy.join(", ")
            ));
        }
        // Only the codes seen now; "all" never reaches a fault that appears later.
        ack.codes = touched
            .iter()
            .map(|r| r.code.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
    }
    let ids = if narrowed && ack.codes.is_empty() {
        Vec::new()
    } else {
        let health = run.inner.health.clone();
        match tokio::task::spawn_blocking(move || health.acknowledge(&ack)).await {
            Ok(ids) => ids,
            Err(e) => return run.fail(format!("health source failed to acknowledge: {e}")),
        }
    };
    let record = AckRecord {
        task_id: run.status.task_id.clone(),
        operator: a.operator.clone(),
        approvers: run.approvers.clone(),
        reason: a.reason.clone(),
        codes: a.codes.clone(),
        gpu_index: a.gpu_index,
        fault_ids: ids.clone(),
        at_unix_ms: run.inner.clock.now_ms(),
    };
    let message = if ids.is_empty() {
        format!("{who}: no current fault acknowledged")
    } else {
        format!(
            "{who}: acknowledged {} fault(s): {}",
            ids.len(),
            ids.join(", ")
        )
    };
    run.finish_with(TaskState::Succeeded, message, |t| t.add_ack(&record))
}

fn protected(run: &Run) -> bool {
    run.inner
        .ring
        .is_none_or(|r| run.inner.trust_now().policy.protected_rings.contains(&r))
}
