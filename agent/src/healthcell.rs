//! The agent's current health: the last report, who is waiting for a change,
//! and the standard `grpc.health.v1` status derived from it.

use std::sync::{Arc, RwLock};

use ringfence::pb;
use tokio::sync::watch;

/// Produces a fresh health report (NVML or simulated backend + host facts +
/// verdict). Blocking: call it from a blocking thread.
pub trait ReportSource: Send + Sync {
    /// Collect a report now. `draining` is copied into it.
    fn collect(&self, draining: bool) -> pb::HealthReport;
    /// Stop counting these fault ids in the verdict (operator AckFaults).
    fn acknowledge(&self, fault_ids: &[String]);
}

/// The last report and a channel that fires when the verdict or any reason changes.
#[derive(Debug)]
pub struct HealthCell {
    last: RwLock<Arc<pb::HealthReport>>,
    changes: watch::Sender<Arc<pb::HealthReport>>,
}

/// What a change is judged by: verdict, reasons, draining.
fn signature(r: &pb::HealthReport) -> (i32, Vec<(String, i32, String)>, bool) {
    (
        r.verdict,
        r.reasons
            .iter()
            .map(|x| (x.code.clone(), x.gpu_index, x.observed.clone()))
            .collect(),
        r.draining,
    )
}

impl HealthCell {
    /// A cell holding `initial`.
    pub fn new(initial: pb::HealthReport) -> Self {
        let initial = Arc::new(initial);
        let (changes, _) = watch::channel(initial.clone());
        Self {
            last: RwLock::new(initial),
            changes,
        }
    }

    /// The last report.
    pub fn last(&self) -> Arc<pb::HealthReport> {
        match self.last.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Store a new report; watchers hear of it only if something that matters changed.
    pub fn publish(&self, report: pb::HealthReport) -> bool {
        let report = Arc::new(report);
        let changed = signature(&report) != signature(&self.last());
        match self.last.write() {
            Ok(mut g) => *g = report.clone(),
            Err(p) => *p.into_inner() = report.clone(),
        }
        if changed {
            self.changes.send_replace(report);
        }
        changed
    }

    /// A receiver that sees the report at each change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<pb::HealthReport>> {
        self.changes.subscribe()
    }

    /// Whether schedulers may place work here: HEALTHY and not draining.
    pub fn serving(&self) -> bool {
        let r = self.last();
        r.verdict == pb::Verdict::Healthy as i32 && !r.draining
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(verdict: pb::Verdict, codes: &[&str]) -> pb::HealthReport {
        pb::HealthReport {
            verdict: verdict as i32,
            reasons: codes
                .iter()
                .map(|c| pb::Reason {
                    code: (*c).to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_changes_of_verdict_or_reasons_notify() {
        let cell = HealthCell::new(report(pb::Verdict::Healthy, &[]));
        let mut rx = cell.subscribe();
        rx.mark_unchanged();
        let mut same = report(pb::Verdict::Healthy, &[]);
        same.collected_at_unix_ms = 5;
        assert!(!cell.publish(same));
        assert!(!rx.has_changed().unwrap());
        assert_eq!(cell.last().collected_at_unix_ms, 5);
        assert!(cell.publish(report(pb::Verdict::Unhealthy, &["xid_critical"])));
        assert!(rx.has_changed().unwrap());
        assert!(!cell.serving());
    }
}
