//! The agent's current health: the last report, the watchers that receive
//! every report as it is published (WatchHealth: one per poll, a heartbeat
//! even when nothing changed), the standard `grpc.health.v1` status derived
//! from it, and the one log line an operator reads when health changes.
//!
//! The report is also kept protobuf-encoded, once per drain state, so that
//! GetHealth (asked often by schedulers) costs a copy of bytes, not an encode:
//! encoding happens once per poll instead of once per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
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

/// The last report and a channel that carries every published report.
#[derive(Debug)]
pub struct HealthCell {
    last: RwLock<Current>,
    reports: watch::Sender<Arc<pb::HealthReport>>,
    /// The next collection's ticket (see [`HealthCell::ticket`]).
    tickets: AtomicU64,
}

/// The last report, its collection's ticket, and its encoding with
/// `draining` false (`[0]`) and true (`[1]`), both without a drain mark.
#[derive(Debug, Clone)]
struct Current {
    report: Arc<pb::HealthReport>,
    ticket: u64,
    encoded: [Bytes; 2],
}

impl Current {
    fn new(report: Arc<pb::HealthReport>, ticket: u64) -> Self {
        let mut copy = (*report).clone();
        copy.drain_mark = None;
        let mut encode = |draining: bool| {
            copy.draining = draining;
            Bytes::from(copy.encode_to_vec())
        };
        let encoded = [encode(false), encode(true)];
        Self {
            report,
            ticket,
            encoded,
        }
    }
}

/// Field number of `HealthReport.drain_mark` (health.proto).
const DRAIN_MARK_FIELD: u32 = 16;

/// What a change of health is judged by: the verdict and the faults behind
/// it (code, GPU, severity). Observed values (a temperature moving by a
/// degree) and the drain mark (the task log says it) are not a change.
fn signature(r: &pb::HealthReport) -> (i32, Vec<(&str, i32, i32)>) {
    (
        r.verdict,
        r.reasons
            .iter()
            .map(|x| (x.code.as_str(), x.gpu_index, x.severity))
            .collect(),
    )
}

/// The reasons of a report on one line: `code (gpu N, observed X); …`.
fn reasons_line(r: &pb::HealthReport) -> String {
    if r.reasons.is_empty() {
        return "none".into();
    }
    r.reasons
        .iter()
        .map(|x| {
            let gpu = if x.gpu_index < 0 {
                "host".to_string()
            } else {
                format!("gpu {}", x.gpu_index)
            };
            format!("{} ({gpu}, observed {})", x.code, x.observed)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl HealthCell {
    /// A cell holding `initial`.
    pub fn new(initial: pb::HealthReport) -> Self {
        let initial = Arc::new(initial);
        let (reports, _) = watch::channel(initial.clone());
        Self {
            last: RwLock::new(Current::new(initial, 0)),
            reports,
            tickets: AtomicU64::new(1),
        }
    }

    /// The last report.
    pub fn last(&self) -> Arc<pb::HealthReport> {
        match self.last.read() {
            Ok(g) => g.report.clone(),
            Err(p) => p.into_inner().report.clone(),
        }
    }

    /// The last report, protobuf-encoded, with its `draining` field and
    /// drain mark set from `mark` (the engine's mark now: the drain state
    /// is current even when the report is up to one poll old). Cheap: the
    /// bytes encoded at publish, plus the mark's few bytes while draining.
    pub fn encoded(&self, mark: Option<&pb::DrainMark>) -> Bytes {
        let i = usize::from(mark.is_some());
        let base = match self.last.read() {
            Ok(g) => g.encoded[i].clone(),
            Err(p) => p.into_inner().encoded[i].clone(),
        };
        let Some(mark) = mark else {
            return base;
        };
        // Appending a field to an encoded message sets it: the base has
        // no drain mark, so the decoded report has exactly this one.
        let mut buf = BytesMut::with_capacity(base.len() + mark.encoded_len() + 8);
        buf.put_slice(&base);
        prost::encoding::message::encode(DRAIN_MARK_FIELD, mark, &mut buf);
        buf.freeze()
    }

    /// A ticket for a collection about to start. Tickets grow in the order
    /// collections start; [`HealthCell::publish_collected`] keeps a report
    /// out when a collection that started later was published first.
    pub fn ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::SeqCst)
    }

    /// Store a report collected just now and send it to every watcher.
    /// Returns whether health changed (see [`HealthCell::publish_collected`]).
    pub fn publish(&self, report: pb::HealthReport) -> bool {
        self.publish_collected(self.ticket(), report)
    }

    /// Store the report of the collection that took `ticket` and send it to
    /// every watcher, unless a collection that started later was already
    /// published (then the report is older than the cell's and is dropped).
    /// Logs "health changed" and returns true when the verdict or the faults
    /// behind it differ from the last report's; false otherwise.
    pub fn publish_collected(&self, ticket: u64, report: pb::HealthReport) -> bool {
        let report = Arc::new(report);
        // Encode outside the lock: readers never wait for an encode.
        let current = Current::new(report.clone(), ticket);
        let mut g = match self.last.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if ticket < g.ticket {
            return false;
        }
        let previous = std::mem::replace(&mut *g, current).report;
        // Sent under the lock: watchers see reports in the cell's order.
        self.reports.send_replace(report.clone());
        drop(g);
        let changed = signature(&report) != signature(&previous);
        if changed {
            let verdict = verdict_name(report.verdict);
            let was = verdict_name(previous.verdict);
            let reasons = reasons_line(&report);
            if report.verdict == pb::Verdict::Healthy as i32 {
                tracing::info!(%verdict, previous = %was, %reasons, "health changed");
            } else {
                tracing::warn!(%verdict, previous = %was, %reasons, "health changed");
            }
        }
        changed
    }

    /// A receiver of every published report (its current value is the last one).
    pub fn subscribe(&self) -> watch::Receiver<Arc<pb::HealthReport>> {
        self.reports.subscribe()
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

/// The name of a verdict value (HEALTHY, DEGRADED, UNHEALTHY).
pub use ringfence::attest::verdict_name;

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
    fn every_report_reaches_watchers_and_only_changes_count() {
        let cell = HealthCell::new(report(pb::Verdict::Healthy, &[]));
        let mut rx = cell.subscribe();
        rx.mark_unchanged();
        let mut same = report(pb::Verdict::Healthy, &[]);
        same.collected_at_unix_ms = 5;
        assert!(!cell.publish(same), "nothing changed");
        assert!(rx.has_changed().unwrap(), "a heartbeat is still sent");
        assert_eq!(rx.borrow_and_update().collected_at_unix_ms, 5);
        assert_eq!(cell.last().collected_at_unix_ms, 5);
        let mut drained = report(pb::Verdict::Healthy, &[]);
        drained.draining = true;
        assert!(
            !cell.publish(drained),
            "the drain mark is not a health change"
        );
        assert!(cell.publish(report(pb::Verdict::Unhealthy, &["xid_critical"])));
        assert!(rx.has_changed().unwrap());
        assert!(!cell.serving());
    }

    #[test]
    fn a_collection_that_started_earlier_never_replaces_a_later_one() {
        let cell = HealthCell::new(report(pb::Verdict::Healthy, &[]));
        let slow = cell.ticket();
        let fast = cell.ticket();
        let mut newer = report(pb::Verdict::Healthy, &[]);
        newer.collected_at_unix_ms = 20;
        cell.publish_collected(fast, newer);
        let mut older = report(pb::Verdict::Unhealthy, &["gpu_missing"]);
        older.collected_at_unix_ms = 10;
        assert!(!cell.publish_collected(slow, older));
        assert_eq!(cell.last().collected_at_unix_ms, 20);
        assert_eq!(cell.subscribe().borrow().collected_at_unix_ms, 20);
    }

    #[test]
    fn encoded_follows_the_last_report_and_the_drain_mark() {
        let cell = HealthCell::new(report(pb::Verdict::Healthy, &[]));
        let mut next = report(pb::Verdict::Degraded, &["link_degraded"]);
        next.host_id = "gpu-0001".into();
        let stale = pb::DrainMark {
            task_id: "old".into(),
            ..Default::default()
        };
        // A report collected while draining under an older mark.
        next.drain_mark = Some(stale);
        cell.publish(next.clone());
        let mark = pb::DrainMark {
            task_id: "w/gpu-0001/3/drain".into(),
            wave_id: "w".into(),
            signed_by: "coord-2026".into(),
            reason: "kernel update".into(),
            since_unix_ms: 1_700_000_000_000,
            already_draining: false,
        };
        for m in [None, Some(&mark)] {
            let decoded = pb::HealthReport::decode(cell.encoded(m)).unwrap();
            let mut want = next.clone();
            want.draining = m.is_some();
            want.drain_mark = m.cloned();
            assert_eq!(decoded, want);
        }
    }
}
