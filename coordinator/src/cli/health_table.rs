//! `ringfence hosts health`: every host asked concurrently (bounded), each
//! answer a verified attestation where the host's key is enrolled; an
//! unreachable host is a row of its own (state `unreachable`, never
//! `serving`) and never holds up the table. A drained host's row is
//! followed by its drain mark: who drained it, when and why. Every text
//! a host sent (versions, reason, error, drain mark) is escaped and
//! bounded ([`crate::hosttext`]) before it is a row, so no host can draw
//! on the operator's screen.

use std::sync::Arc;
use std::time::Duration;

use ringfence::pb;
use ringfence::time::Clock;
use serde::Serialize;

use crate::hosttext;
use crate::inventory::Inventory;
use crate::wave::Connector;

/// Longest wait for one host.
pub const PER_HOST_TIMEOUT: Duration = Duration::from_secs(10);

/// One row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    /// Host id.
    pub host: String,
    /// Ring.
    pub ring: u32,
    /// Pool.
    pub pool: String,
    /// HEALTHY / DEGRADED / UNHEALTHY / UNREACHABLE / INVALID.
    pub verdict: String,
    /// Driver version.
    pub driver: String,
    /// CUDA version.
    pub cuda: String,
    /// GPUs found.
    pub gpus_found: u32,
    /// GPUs expected.
    pub gpus_expected: u32,
    /// The first reason, or the error.
    pub top_reason: String,
    /// Whether the answer was a verified attestation.
    pub attested: bool,
    /// Out of service.
    pub draining: bool,
    /// Who took the host out of service, when and why (the agent's drain
    /// mark); absent while it serves or when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_mark: Option<DrainMark>,
}

/// The agent's drain mark, as the table shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DrainMark {
    /// The wave (or by-hand id) of the Drain task.
    pub wave: String,
    /// The Drain task.
    pub task: String,
    /// Trust-file id of the coordinator key that signed it.
    pub signed_by: String,
    /// The Drain's reason (the operator's note for a drain by hand).
    pub reason: String,
    /// Out of service since, ms since the Unix epoch.
    pub since_ms: i64,
}

impl From<&pb::DrainMark> for DrainMark {
    fn from(m: &pb::DrainMark) -> Self {
        Self {
            wave: hosttext::field(&m.wave_id),
            task: hosttext::field(&m.task_id),
            signed_by: hosttext::field(&m.signed_by),
            reason: hosttext::message(&m.reason),
            since_ms: m.since_unix_ms,
        }
    }
}

/// Ask every host, at most `parallel` at once; attestations are checked
/// for age and skew against `clock`.
pub async fn collect(
    inv: &Inventory,
    conn: Arc<dyn Connector>,
    parallel: usize,
    max_skew_ms: i64,
    clock: Arc<dyn Clock>,
) -> Vec<Row> {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::new();
    for h in inv.hosts.clone() {
        let conn = conn.clone();
        let sem = sem.clone();
        let clock = clock.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            match tokio::time::timeout(
                PER_HOST_TIMEOUT,
                one(&h, conn.as_ref(), max_skew_ms, clock.as_ref()),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => failed_row(&h, "UNREACHABLE", "no answer within 10 s"),
            }
        }));
    }
    let mut rows = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await {
            rows.push(r);
        }
    }
    rows
}

fn failed_row(h: &crate::inventory::Host, verdict: &str, why: &str) -> Row {
    Row {
        host: h.id.clone(),
        ring: h.ring,
        pool: h.pool.clone(),
        verdict: verdict.into(),
        driver: String::new(),
        cuda: String::new(),
        gpus_found: 0,
        gpus_expected: h.expected_gpus,
        top_reason: hosttext::message(why),
        attested: false,
        draining: false,
        drain_mark: None,
    }
}

async fn one(
    h: &crate::inventory::Host,
    conn: &dyn Connector,
    max_skew_ms: i64,
    clock: &dyn Clock,
) -> Row {
    let api = match conn.connect(h).await {
        Ok(a) => a,
        Err(e) => return failed_row(h, "UNREACHABLE", &e),
    };
    let (report, attested) = if let Some(key) = h.attestation_key {
        let nonce = ringfence::attest::new_nonce();
        match api.attest(nonce.clone()).await {
            Ok(env) => match ringfence::attest::verify(
                &env,
                &ringfence::attest::Expect {
                    key: &key,
                    host_id: &h.id,
                    nonce: &nonce,
                    now_ms: clock.now_ms(),
                    max_age_ms: 60_000,
                    max_skew_ms,
                },
            ) {
                Ok(a) => (a.report.unwrap_or_default(), true),
                Err(e) => return failed_row(h, "INVALID", &format!("attestation: {e}")),
            },
            Err(e) => return failed_row(h, "UNREACHABLE", &e.to_string()),
        }
    } else {
        match api.health().await {
            Ok(r) => (r, false),
            Err(e) => return failed_row(h, "UNREACHABLE", &e.to_string()),
        }
    };
    Row {
        host: h.id.clone(),
        ring: h.ring,
        pool: h.pool.clone(),
        verdict: crate::wave::verdict_name(report.verdict).into(),
        driver: hosttext::field(&report.driver_version),
        cuda: hosttext::field(&report.cuda_driver_version),
        gpus_found: report.gpus_found,
        gpus_expected: report.gpus_expected,
        top_reason: report
            .reasons
            .first()
            .map(|r: &pb::Reason| {
                hosttext::field(&format!("{} (gpu {}, {})", r.code, r.gpu_index, r.observed))
            })
            .unwrap_or_default(),
        attested,
        draining: report.draining,
        drain_mark: report.drain_mark.as_ref().map(DrainMark::from),
    }
}

/// The table for humans.
pub fn render(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<16} {:>4} {:<14} {:<11} {:<12} {:<6} {:>7} {:<8} {}\n",
        "HOST", "RING", "POOL", "VERDICT", "DRIVER", "CUDA", "GPUS", "STATE", "TOP REASON"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<16} {:>4} {:<14} {:<11} {:<12} {:<6} {:>7} {:<8} {}{}\n",
            r.host,
            r.ring,
            r.pool,
            r.verdict,
            hosttext::escape(&r.driver),
            hosttext::escape(&r.cuda),
            format!("{}/{}", r.gpus_found, r.gpus_expected),
            state(r),
            hosttext::escape(&r.top_reason),
            if r.attested || r.verdict == "UNREACHABLE" {
                ""
            } else {
                " (not attested: key not enrolled)"
            }
        ));
        if let Some(m) = &r.drain_mark {
            s.push_str(&format!(
                "{:<16} drained since {} by {} (wave {}, task {}): {}\n",
                "",
                rfc3339(m.since_ms),
                hosttext::escape(&m.signed_by),
                hosttext::escape(&m.wave),
                hosttext::escape(&m.task),
                hosttext::escape(&m.reason)
            ));
        }
    }
    s
}

/// The STATE column: a host that did not answer is never "serving".
fn state(r: &Row) -> &'static str {
    match r.verdict.as_str() {
        "UNREACHABLE" => "unreachable",
        "INVALID" => "unknown",
        _ if r.draining => "drained",
        _ => "serving",
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(verdict: &str, draining: bool, mark: Option<DrainMark>) -> Row {
        Row {
            host: "gpu-1".into(),
            ring: 0,
            pool: "p".into(),
            verdict: verdict.into(),
            driver: String::new(),
            cuda: String::new(),
            gpus_found: 0,
            gpus_expected: 2,
            top_reason: "connection refused".into(),
            attested: false,
            draining,
            drain_mark: mark,
        }
    }

    #[test]
    fn an_unreachable_host_is_never_shown_serving_and_a_drain_mark_is_shown() {
        let t = render(&[row("UNREACHABLE", false, None)]);
        assert!(t.contains("unreachable") && !t.contains("serving"), "{t}");
        assert!(t.contains("connection refused"), "{t}");
        let mark = DrainMark {
            wave: "w-1".into(),
            task: "w-1/gpu-1/3/drain".into(),
            signed_by: "coord-2026".into(),
            reason: "canary failed".into(),
            since_ms: 1_767_225_600_000,
        };
        let t = render(&[row("UNHEALTHY", true, Some(mark))]);
        assert!(
            t.contains("drained since 2026-01-01T00:00:00Z by coord-2026 (wave w-1, task w-1/gpu-1/3/drain): canary failed"),
            "{t}"
        );
    }
}
