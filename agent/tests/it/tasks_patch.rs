//! Patch commands: exit status decides, output tail is kept, a timeout kills
//! the whole process group, one mutating task at a time, rollback bookkeeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::tasks_common;

use std::time::Duration;

use ringfence::pb::{self, TaskState};
use ringfenced::tasks::{DrainConfig, SubmitError};
use tasks_common::*;

fn profile(name: &str, script: &str, timeout_s: u64) -> String {
    format!(
        r#"
[patch.profiles.{name}]
argv = ["/bin/sh", "-c", '{script}', "sh", "{{version}}"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
timeout_s = {timeout_s}
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_patch_reports_exit_status_and_last_lines() {
    let h = Harness::new();
    let script = r#"for i in $(seq 1 30); do echo "line$i"; done; echo "dpkg: error installing $1" >&2; exit 3"#;
    let engine = h.engine(&profile("driver", script, 30), DrainConfig::default());
    drained(&h, &engine, "d1").await;
    engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "p1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Failed, "{s:?}");
    assert_eq!(s.exit_code, 3);
    assert!(s.message.contains("exited with status 3"), "{}", s.message);
    assert_eq!(s.output_tail.len(), 20, "{:?}", s.output_tail);
    assert!(
        s.output_tail.contains(&"line30".to_string()),
        "{:?}",
        s.output_tail
    );
    assert!(
        !s.output_tail.contains(&"line1".to_string()),
        "only the last lines are kept"
    );
    assert!(
        s.output_tail
            .contains(&"dpkg: error installing 560.35.3".to_string()),
        "{:?}",
        s.output_tail
    );
    assert!(
        *engine.draining().borrow(),
        "a failed patch leaves the host drained"
    );
    assert!(engine.journal().installed("driver").unwrap().is_none());
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited; only its parent has not reaped it yet.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_that_outlives_its_timeout_is_killed_with_its_process_group() {
    let h = Harness::new();
    let pidfile = h.file("grandchild.pid");
    let script = format!(
        "sleep 300 & echo $! > {}; echo started; wait",
        pidfile.display()
    );
    let engine = h.engine(&profile("driver", &script, 1), DrainConfig::default());
    drained(&h, &engine, "d1").await;
    engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "p1", Duration::from_secs(15)).await;
    assert_eq!(s.state(), TaskState::Failed, "{s:?}");
    assert!(s.message.contains("after the 1 s timeout"), "{}", s.message);
    assert_eq!(s.exit_code, -1);
    assert_eq!(s.output_tail, vec!["started".to_string()]);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut gone = false;
    for _ in 0..40 {
        if !alive(pid) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "grandchild sleep {pid} survived the timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_mutating_task_at_a_time() {
    let h = Harness::new();
    let engine = h.engine(&profile("driver", "sleep 2", 30), DrainConfig::default());
    drained(&h, &engine, "d1").await;
    engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    wait_for(&engine, "p1", Duration::from_secs(5), |s| {
        s.step == "command"
    })
    .await;
    let err = engine
        .submit(h.task("d2", drain("again")))
        .await
        .unwrap_err();
    match err {
        SubmitError::Busy { running_task_id } => assert_eq!(running_task_id, "p1"),
        other => panic!("expected Busy, got {other}"),
    }
    assert!(engine.get("d2").is_none(), "a busy refusal records nothing");
    // A resubmission of the running task returns its status, not Busy.
    let again = engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    assert_eq!(again.task_id, "p1");
    let s = wait_terminal(&engine, "p1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    // Free again: the refused task can be sent again (new sequence).
    engine.submit(h.task("d2", drain("again"))).await.unwrap();
    let s = wait_terminal(&engine, "d2", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    let mark = engine.journal().drain_mark().unwrap().unwrap();
    assert!(mark.already_draining);
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_requires_a_drained_host() {
    let h = Harness::new();
    let marker = h.file("ran");
    let script = format!("touch {}", marker.display());
    let engine = h.engine(&profile("driver", &script, 30), DrainConfig::default());
    engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "p1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Failed);
    assert!(s.message.contains("not drained"), "{}", s.message);
    assert!(!marker.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn rollback_returns_to_the_recorded_version_only() {
    let h = Harness::new();
    let log = h.file("installs");
    let script = format!("echo $1 >> {}", log.display());
    let engine = h.engine(&profile("driver", &script, 30), DrainConfig::default());
    drained(&h, &engine, "d1").await;

    // Nothing recorded yet: no rollback.
    engine
        .submit(h.task("r0", rollback("driver", "550.54.15")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "r0", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Failed);
    assert!(s.message.contains("no earlier patch"), "{}", s.message);

    engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "p1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    // The version before comes from the health report's driver version.
    assert_eq!(s.version_before, "550.54.15");
    let rec = engine.journal().installed("driver").unwrap().unwrap();
    assert_eq!(
        (rec.before.as_str(), rec.after.as_str()),
        ("550.54.15", "560.35.3")
    );

    engine
        .submit(h.task("r1", rollback("driver", "535.1.1")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "r1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Failed);
    assert!(
        s.message
            .contains("recorded before the last patch with profile `driver` is `550.54.15`"),
        "{}",
        s.message
    );

    engine
        .submit(h.task("r2", rollback("driver", "550.54.15")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "r2", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert_eq!(
        (s.version_before.as_str(), s.version_after.as_str()),
        ("560.35.3", "550.54.15")
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "560.35.3\n550.54.15\n",
        "only the valid patch and rollback ran"
    );
}

#[track_caller]
fn rejected_by(res: Result<pb::TaskStatus, SubmitError>, check: &str) -> String {
    match res {
        Err(SubmitError::Rejected(r)) => {
            assert_eq!(r.check(), check, "{r}");
            r.to_string()
        }
        other => panic!("expected a rejection by `{check}`, got {other:?}"),
    }
}

/// Issue 13, 1: the agent knows its own ring. A coordinator-only
/// `Patch{ring: 0}` to an agent configured in ring 3 is refused by `ring`
/// (the coordinator cannot move the host out of its protected ring by saying
/// so); ring 7 is refused everywhere; with no ring configured the agent is
/// protected and the same patch needs approvals.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_decides_its_ring_and_an_unset_ring_is_protected() {
    let mut h = Harness::new();
    let marker = h.file("ran");
    let script = format!("touch {}", marker.display());
    h.ring = Some(3);
    let engine = h.engine(&profile("driver", &script, 30), DrainConfig::default());
    assert_eq!(engine.ring(), Some(3));
    assert!(engine.protected_ring());
    drained(&h, &engine, "d1").await;

    let err = rejected_by(
        engine
            .submit(h.task_ring("p0", h.next_seq(), 0, patch("driver", "560.35.3")))
            .await,
        "ring",
    );
    assert!(err.contains("configured in ring 3"), "{err}");
    rejected_by(
        engine
            .submit(h.task_ring("p7", h.next_seq(), 7, patch("driver", "560.35.3")))
            .await,
        "ring",
    );
    // Its own ring: approvals needed, and with them it runs.
    rejected_by(
        engine
            .submit(h.task_ring("p3", h.next_seq(), 3, patch("driver", "560.35.3")))
            .await,
        "approval_threshold",
    );
    engine
        .submit(h.approved(
            "p3a",
            patch("driver", "560.35.3"),
            &[pb::ApprovedAction::Patch],
        ))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "p3a", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    drop(engine);
    std::fs::remove_file(&marker).unwrap();

    // No ring configured: every ring 0-4 is accepted, and every patch needs
    // approvals, ring 0 included; ring 7 is still refused.
    let mut h = Harness::new();
    h.ring = None;
    let engine = h.engine(&profile("driver", &script, 30), DrainConfig::default());
    assert_eq!(engine.ring(), None);
    assert!(engine.protected_ring());
    drained(&h, &engine, "d1").await;
    for ring in [0, 1] {
        rejected_by(
            engine
                .submit(h.task_ring(
                    &format!("p{ring}"),
                    h.next_seq(),
                    ring,
                    patch("driver", "560.35.3"),
                ))
                .await,
            "approval_threshold",
        );
    }
    rejected_by(
        engine
            .submit(h.task_ring("p7", h.next_seq(), 7, patch("driver", "560.35.3")))
            .await,
        "ring",
    );
    assert!(!marker.exists(), "no unapproved patch ran");
    // A forced undrain approved for patches only is not covered.
    let force = ringfence::pb::task_payload::Action::Undrain(pb::Undrain {
        reason: "trust me".into(),
        force: true,
    });
    let err = rejected_by(
        engine
            .submit(h.approved("u1", force, &[pb::ApprovedAction::Patch]))
            .await,
        "approval_scope",
    );
    assert!(err.contains("FORCE_UNDRAIN"), "{err}");
}

/// Issue 17: a patch waits for DRAINED, not DRAINING. A Drain whose
/// scheduler wait timed out leaves the host marked draining (jobs may still
/// run there): a Patch sent after it, by hand or otherwise, is refused by
/// `not_drained` and the host stays drained. Once a Drain completes, the
/// same patch runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_patch_after_a_drain_that_timed_out_is_refused_until_a_drain_completes() {
    let h = Harness::new();
    let installed = h.file("installed");
    let no_jobs = h.file("no-jobs");
    let script = format!("echo $1 > {}", installed.display());
    let mut cfg = DrainConfig {
        poll_ms: 100,
        ..DrainConfig::default()
    };
    // The scheduler reports jobs on the host until `no-jobs` exists.
    cfg.wait_command = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "if test -e {}; then exit 0; fi; echo \"node gpu-1 is draining: 2 job(s) still on it\"; exit 1",
            no_jobs.display()
        ),
    ];
    cfg.wait_interval_s = 1;
    cfg.wait_timeout_s = 1;
    let engine = h.engine(&profile("driver", &script, 30), cfg);

    engine.submit(h.task("d1", drain("x"))).await.unwrap();
    let d1 = wait_terminal(&engine, "d1", Duration::from_secs(15)).await;
    assert_eq!(d1.state(), TaskState::Failed, "{d1:?}");
    assert!(
        *engine.draining().borrow(),
        "the failed drain keeps the mark"
    );

    engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    let p1 = wait_terminal(&engine, "p1", Duration::from_secs(10)).await;
    assert_eq!(p1.state(), TaskState::Failed, "{p1:?}");
    assert_eq!(
        p1.message,
        format!(
            "patch refused by `not_drained`: the drain of task `d1` did not complete (FAILED: {}) (profile `driver` has require_drained = true); run a Drain task first",
            d1.message
        )
    );
    assert!(
        d1.message
            .starts_with("drain timed out after 1 s waiting for the scheduler"),
        "{}",
        d1.message
    );
    assert!(!installed.exists(), "the patch command never ran");
    assert!(*engine.draining().borrow(), "the host stays drained");
    assert_eq!(
        engine.journal().drain_mark().unwrap().unwrap().task_id,
        "d1"
    );
    assert!(engine.journal().installed("driver").unwrap().is_none());

    // The jobs are gone; a new Drain completes, and the patch runs.
    std::fs::write(&no_jobs, "").unwrap();
    drained(&h, &engine, "d2").await;
    let mark = engine.journal().drain_mark().unwrap().unwrap();
    assert_eq!((mark.task_id.as_str(), mark.already_draining), ("d2", true));
    engine
        .submit(h.task("p2", patch("driver", "560.35.3")))
        .await
        .unwrap();
    let p2 = wait_terminal(&engine, "p2", Duration::from_secs(10)).await;
    assert_eq!(p2.state(), TaskState::Succeeded, "{p2:?}");
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), "560.35.3\n");
}

/// A journal written before issue 17 whose drain mark names a task whose
/// record an older agent compacted away still allows a patch (nothing says
/// that drain failed); this agent keeps the record the mark names.
#[tokio::test(flavor = "multi_thread")]
async fn a_mark_whose_drain_record_an_older_agent_removed_still_allows_a_patch() {
    let h = Harness::new();
    {
        let j = ringfenced::journal::Journal::open(&h.state_dir()).unwrap();
        j.write(|t| {
            t.set_drain_mark(Some(&ringfenced::journal::DrainMark {
                task_id: "d-compacted".into(),
                wave_id: String::new(),
                signed_by: String::new(),
                reason: "maintenance".into(),
                since_unix_ms: 1_000,
                already_draining: false,
            }))
        })
        .unwrap();
    }
    let installed = h.file("installed");
    let script = format!("echo $1 > {}", installed.display());
    let engine = h.engine(&profile("driver", &script, 30), DrainConfig::default());
    assert!(*engine.draining().borrow());
    engine
        .submit(h.task("p1", patch("driver", "560.35.3")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "p1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(installed.exists());
}
