//! AckFaults: hand the acknowledgement to the health source (the faults no
//! longer count in the verdict) and record who acknowledged what, and why.

use ringfence::pb::{self, TaskState};

use super::Run;
use crate::journal::{AckRecord, JournalError};

pub(super) async fn run(run: &mut Run, a: &pb::AckFaults) -> Result<(), JournalError> {
    run.step("acknowledge", format!("{} acknowledges faults", a.operator))?;
    let health = run.inner.health.clone();
    let ack = a.clone();
    let ids = match tokio::task::spawn_blocking(move || health.acknowledge(&ack)).await {
        Ok(ids) => ids,
        Err(e) => return run.fail(format!("health source failed to acknowledge: {e}")),
    };
    let record = AckRecord {
        task_id: run.status.task_id.clone(),
        operator: a.operator.clone(),
        reason: a.reason.clone(),
        codes: a.codes.clone(),
        gpu_index: a.gpu_index,
        fault_ids: ids.clone(),
        at_unix_ms: run.inner.clock.now_ms(),
    };
    let message = if ids.is_empty() {
        format!("{} acknowledged no current fault", a.operator)
    } else {
        format!(
            "{} acknowledged {} fault(s): {}",
            a.operator,
            ids.len(),
            ids.join(", ")
        )
    };
    run.finish_with(TaskState::Succeeded, message, |t| t.add_ack(&record))
}
