//! The agent's current health: the last report, who is waiting for a change,
//! and the standard `grpc.health.v1` status derived from it.
//!
//! The report is also kept protobuf-encoded, once per drain state, so that
//! GetHealth (asked often by schedulers) costs a copy of bytes, not an encode:
//! encoding happens once per poll instead of once per request.

use std::sync::{Arc, RwLock};

use prost::Message;
use prost::bytes::Bytes;
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
    last: RwLock<Current>,
    changes: watch::Sender<Arc<pb::HealthReport>>,
}

/// The last report, and its encoding with `draining` false (`[0]`) and true (`[1]`).
#[derive(Debug, Clone)]
struct Current {
    report: Arc<pb::HealthReport>,
    encoded: [Bytes; 2],
}

impl Current {
    fn new(report: Arc<pb::HealthReport>) -> Self {
        let mut copy = (*report).clone();
        let mut encode = |draining: bool| {
            copy.draining = draining;
            Bytes::from(copy.encode_to_vec())
        };
        let encoded = [encode(false), encode(true)];
        Self { report, encoded }
    }
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
            last: RwLock::new(Current::new(initial)),
            changes,
        }
    }

    /// The last report.
    pub fn last(&self) -> Arc<pb::HealthReport> {
        match self.last.read() {
            Ok(g) => g.report.clone(),
            Err(p) => p.into_inner().report.clone(),
        }
    }

    /// The last report, protobuf-encoded, with its `draining` field set to
    /// `draining` (the drain mark is current even when the report is up to
    /// one poll old). Cheap: a reference-counted copy of bytes encoded at publish.
    pub fn encoded(&self, draining: bool) -> Bytes {
        let i = usize::from(draining);
        match self.last.read() {
            Ok(g) => g.encoded[i].clone(),
            Err(p) => p.into_inner().encoded[i].clone(),
        }
    }

    /// Store a new report; watchers hear of it only if something that matters changed.
    pub fn publish(&self, report: pb::HealthReport) -> bool {
        let report = Arc::new(report);
        let changed = signature(&report) != signature(&self.last());
        // Encode outside the lock: readers never wait for an encode.
        let current = Current::new(report.clone());
        match self.last.write() {
            Ok(mut g) => *g = current,
            Err(p) => *p.into_inner() = current,
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

/// A report as JSON (field names as in the .proto; verdicts by name).
pub fn report_json(r: &pb::HealthReport) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.insert("verdict_name".into(), verdict_name(r.verdict).into());
    }
    v
}

/// The name of a verdict value.
pub fn verdict_name(v: i32) -> &'static str {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Healthy) => "HEALTHY",
        Ok(pb::Verdict::Degraded) => "DEGRADED",
        Ok(pb::Verdict::Unhealthy) => "UNHEALTHY",
        _ => "UNSPECIFIED",
    }
}

/// A report as a few human lines.
pub fn report_text(r: &pb::HealthReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "host {}  verdict {}  driver {}  CUDA {}  GPUs {}/{}  backend {}{}",
        r.host_id,
        verdict_name(r.verdict),
        r.driver_version,
        r.cuda_driver_version,
        r.gpus_found,
        r.gpus_expected,
        r.backend,
        if r.draining { "  DRAINING" } else { "" }
    );
    for g in &r.gpus {
        let _ = writeln!(
            s,
            "  gpu {} {} {} {}  temp {}  ecc uncorrected {}",
            g.index,
            g.name,
            g.uuid,
            g.pci_bus_id,
            g.temperature_c.map_or("n/a".into(), |t| format!("{t} C")),
            g.ecc_volatile_uncorrected
                .map_or("n/a".into(), |e| e.to_string())
        );
    }
    for reason in &r.reasons {
        let _ = writeln!(
            s,
            "  {} {} gpu {}: {} (observed {}, threshold {})",
            verdict_name(reason.severity),
            reason.code,
            reason.gpu_index,
            reason.message,
            reason.observed,
            reason.threshold
        );
    }
    s
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

    #[test]
    fn encoded_follows_the_last_report_and_the_drain_mark() {
        let cell = HealthCell::new(report(pb::Verdict::Healthy, &[]));
        let mut next = report(pb::Verdict::Degraded, &["link_degraded"]);
        next.host_id = "gpu-0001".into();
        cell.publish(next.clone());
        for draining in [false, true] {
            let decoded = pb::HealthReport::decode(cell.encoded(draining)).unwrap();
            let mut want = next.clone();
            want.draining = draining;
            assert_eq!(decoded, want);
        }
    }
}
