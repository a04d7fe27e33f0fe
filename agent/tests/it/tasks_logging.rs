//! Every task log line (including captured command output) carries the
//! task id, wave id and host id; the engine's activity line (systemd STATUS)
//! names the running task and step; shutdown refuses new tasks and waits
//! for the running step. Health changes are logged once, by verdict name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::tasks_common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringfence::pb::{self, TaskState};
use ringfenced::healthcell::HealthCell;
use ringfenced::tasks::{DrainConfig, SubmitError};
use tasks_common::*;

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buf {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// A subscriber writing plain lines (no colour) into the returned buffer.
fn capture() -> (Buf, impl tracing::Subscriber + Send + Sync + 'static) {
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (buf, subscriber)
}

const PROFILE: &str = r#"
[patch.profiles.driver]
argv = ["/bin/sh", "-c", "echo hello-from-patch $1; sleep 1", "sh", "{version}"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
"#;

#[tokio::test(flavor = "multi_thread")]
async fn task_lines_carry_ids_status_line_and_graceful_shutdown() {
    let (buf, subscriber) = capture();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let h = Harness::new();
    let engine = h.engine(PROFILE, DrainConfig::default());
    drained(&h, &engine, "d1").await;
    engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    wait_for(&engine, "p1", Duration::from_secs(5), |s| {
        s.step == "command"
    })
    .await;
    let activity = engine.activity().borrow().clone();
    assert!(activity.contains("patch p1: step command"), "{activity}");

    // SIGTERM path: no new task, the running step finishes, journal synced.
    let stopper = engine.clone();
    let stop = tokio::spawn(async move { stopper.shutdown(Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = engine
        .submit(h.task("v1", validate("", "", "")))
        .await
        .unwrap_err();
    assert!(matches!(err, SubmitError::ShuttingDown), "{err}");
    assert!(
        stop.await.unwrap().unwrap(),
        "the step finished within the grace"
    );
    assert_eq!(engine.get("p1").unwrap().state(), TaskState::Succeeded);

    let text = buf.text();
    let line = text
        .lines()
        .find(|l| l.contains("hello-from-patch 560.35.3"))
        .unwrap_or_else(|| panic!("command output not logged:\n{text}"));
    for field in ["task_id=p1", "wave_id=wave-1", "host_id=gpu-1"] {
        assert!(line.contains(field), "`{field}` missing from {line}");
    }
    let done = text
        .lines()
        .find(|l| l.contains("TASK_STATE_SUCCEEDED") && l.contains("task_id=p1"))
        .unwrap_or_else(|| panic!("no success line for p1:\n{text}"));
    assert!(done.contains("host_id=gpu-1"), "{done}");
}

fn report(verdict: pb::Verdict, xid_observed: Option<&str>, draining: bool) -> pb::HealthReport {
    pb::HealthReport {
        verdict: verdict as i32,
        reasons: xid_observed
            .map(|o| pb::Reason {
                code: "xid_critical".into(),
                severity: pb::Verdict::Unhealthy as i32,
                gpu_index: 1,
                observed: o.into(),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        draining,
        ..Default::default()
    }
}

/// Issue 21 §5: "health changed" is logged once per change of the verdict
/// or the faults behind it, naming verdicts (`UNHEALTHY`, never `3`), and
/// not for a heartbeat, a drain, or a fault whose observed value moved.
#[test]
fn health_changes_are_logged_once_each_by_verdict_name() {
    let (buf, subscriber) = capture();
    let published = tracing::subscriber::with_default(subscriber, || {
        let cell = HealthCell::new(report(pb::Verdict::Healthy, None, false));
        [
            cell.publish(report(pb::Verdict::Healthy, None, false)),
            cell.publish(report(pb::Verdict::Healthy, None, true)),
            cell.publish(report(pb::Verdict::Unhealthy, Some("79"), true)),
            cell.publish(report(pb::Verdict::Unhealthy, Some("79, 79"), true)),
            cell.publish(report(pb::Verdict::Healthy, None, true)),
        ]
    });
    assert_eq!(published, [false, false, true, false, true]);
    let text = buf.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("health changed"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let want = [
        [
            "WARN",
            "verdict=UNHEALTHY",
            "previous=HEALTHY",
            "xid_critical (gpu 1, observed 79)",
        ],
        [
            "INFO",
            "verdict=HEALTHY",
            "previous=UNHEALTHY",
            "reasons=none",
        ],
    ];
    for (line, parts) in lines.iter().zip(want) {
        for part in parts {
            assert!(line.contains(part), "`{part}` missing: {line}");
        }
    }
    assert!(
        !text.contains("verdict=3") && !text.contains("verdict=1"),
        "{text}"
    );
}
