//! `ringfence hosts health`: every host asked concurrently (bounded), each
//! answer a verified attestation where the host's key is enrolled; an
//! unreachable host is a row of its own and never holds up the table.
//! Every text a host sent (versions, reason, error) is escaped and bounded
//! ([`crate::hosttext`]) before it is a row, so no host can draw on the
//! operator's screen.

use std::sync::Arc;
use std::time::Duration;

use ringfence::pb;
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
}

/// Ask every host, at most `parallel` at once.
pub async fn collect(
    inv: &Inventory,
    conn: Arc<dyn Connector>,
    parallel: usize,
    max_skew_ms: i64,
) -> Vec<Row> {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::new();
    for h in inv.hosts.clone() {
        let conn = conn.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await;
            match tokio::time::timeout(PER_HOST_TIMEOUT, one(&h, conn.as_ref(), max_skew_ms)).await
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
    }
}

async fn one(h: &crate::inventory::Host, conn: &dyn Connector, max_skew_ms: i64) -> Row {
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
                    now_ms: ringfence::time::now_ms(),
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
            if r.draining { "drained" } else { "serving" },
            hosttext::escape(&r.top_reason),
            if r.attested || r.verdict == "UNREACHABLE" {
                ""
            } else {
                " (not attested: key not enrolled)"
            }
        ));
    }
    s
}
