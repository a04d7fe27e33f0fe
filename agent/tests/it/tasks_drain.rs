//! Drain waits for GPU compute processes; undrain needs a fresh, passing
//! validation since the last drain; an UNHEALTHY fault on a protected ring
//! is acknowledged only with ring approvals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::tasks_common;

use std::time::{Duration, Instant};

use ringfence::pb::{self, TaskState, task_payload::Action};
use ringfence::time::{Clock, ManualClock, SystemClock};
use ringfenced::tasks::{DrainConfig, SubmitError};
use tasks_common::*;

fn fast_drain(timeout_s: u64) -> DrainConfig {
    DrainConfig {
        timeout_s,
        poll_ms: 100,
        ..DrainConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_waits_for_processes_that_exit() {
    let h = Harness::new();
    let hook_out = h.file("hook-args");
    let mut cfg = fast_drain(30);
    cfg.hook = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("echo \"$1 $2\" > '{}'", hook_out.display()),
        "sh".into(),
        "{host_id}".into(),
        "{reason}".into(),
    ];
    let engine = h.engine("", cfg);
    let mut draining = engine.draining();
    assert!(!*draining.borrow_and_update());

    h.health
        .set_processes(vec![4242, 4243], Some(Duration::from_secs(2)));
    let started = Instant::now();
    let s = engine
        .submit(h.task("d1", drain("kernel patch")))
        .await
        .unwrap();
    assert_eq!(s.state(), TaskState::Accepted);
    // The mark is journalled first: draining flips before processes are gone.
    tokio::time::timeout(Duration::from_secs(2), draining.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(*draining.borrow());
    let mid = wait_for(&engine, "d1", Duration::from_secs(5), |s| {
        s.step == "wait_processes"
    })
    .await;
    assert_eq!(mid.state(), TaskState::Running);

    let s = wait_terminal(&engine, "d1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(s.message.contains("DRAINED"), "{}", s.message);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "drained before the processes exited"
    );
    assert_eq!(
        std::fs::read_to_string(&hook_out).unwrap().trim(),
        "gpu-1 kernel patch",
        "hook gets host id and reason as separate argv elements"
    );
    let mark = engine.journal().drain_mark().unwrap().unwrap();
    assert_eq!(mark.task_id, "d1");
    assert!(!mark.already_draining);
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_times_out_with_a_process_that_never_exits_and_stays_drained() {
    let h = Harness::new();
    let engine = h.engine("", fast_drain(1));
    h.health.set_processes(vec![777], None);
    let started = Instant::now();
    engine.submit(h.task("d1", drain("x"))).await.unwrap();
    let s = wait_terminal(&engine, "d1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Failed, "{s:?}");
    assert!(s.message.contains("timed out after 1 s"), "{}", s.message);
    assert!(s.message.contains("777"), "{}", s.message);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(*engine.draining().borrow(), "host stays drained");
    assert!(engine.journal().drain_mark().unwrap().is_some());
    // The engine is free again.
    assert!(engine.running_task().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_drain_hook_fails_the_task_and_keeps_the_mark() {
    let h = Harness::new();
    let mut cfg = fast_drain(30);
    cfg.hook = vec!["/bin/false".into()];
    let engine = h.engine("", cfg);
    engine.submit(h.task("d1", drain("x"))).await.unwrap();
    let s = wait_terminal(&engine, "d1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Failed);
    assert!(
        s.message
            .contains("drain hook `/bin/false` exited with status 1"),
        "{}",
        s.message
    );
    assert_eq!(s.exit_code, 1);
    assert!(*engine.draining().borrow());
}

#[tokio::test(flavor = "multi_thread")]
async fn undrain_needs_a_passing_validation() {
    let h = Harness::new();
    let undrain_out = h.file("undrained");
    let mut cfg = fast_drain(30);
    cfg.undrain_hook = vec!["/usr/bin/touch".into(), undrain_out.display().to_string()];
    let engine = h.engine("", cfg);
    drained(&h, &engine, "d1").await;

    // No validation yet.
    engine.submit(h.task("u1", undrain(false))).await.unwrap();
    let s = wait_terminal(&engine, "u1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Failed);
    assert!(
        s.message.contains("undrain refused by `no_validation`"),
        "{}",
        s.message
    );
    assert!(*engine.draining().borrow());

    // A validation with the wrong driver fails and names the mismatch.
    h.health.update(|st| {
        st.verdict = pb::Verdict::Unhealthy;
        st.reasons = vec![pb::Reason {
            code: "xid_critical".into(),
            severity: pb::Verdict::Unhealthy as i32,
            gpu_index: 0,
            fault_id: "xid_critical/GPU-fake-0/79".into(),
            ..Default::default()
        }];
    });
    engine
        .submit(h.task("v1", validate("560.1.1", "12.4", "")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "v1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Failed);
    assert!(
        s.message
            .contains("VERDICT_UNHEALTHY (xid_critical (gpu 0))"),
        "{}",
        s.message
    );
    assert!(
        s.message
            .contains("driver version is `550.54.15`, expected `560.1.1`"),
        "{}",
        s.message
    );
    assert_eq!(s.verdict, pb::Verdict::Unhealthy as i32);
    // The stored attestation verifies with the host key and carries the nonce.
    let key = h.health.verifying_key();
    let att = ringfence::attest::verify(
        s.attestation.as_ref().unwrap(),
        &ringfence::attest::Expect {
            key: &key,
            host_id: HOST,
            nonce: &[7u8; 32],
            now_ms: SystemClock.now_ms(),
            max_age_ms: 60_000,
            max_skew_ms: 5_000,
        },
    )
    .unwrap();
    assert!(att.report.unwrap().draining);

    engine.submit(h.task("u2", undrain(false))).await.unwrap();
    let s = wait_terminal(&engine, "u2", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Failed);
    assert!(
        s.message
            .contains("`validation_failed`: the last validation (task `v1`) was VERDICT_UNHEALTHY"),
        "{}",
        s.message
    );
    assert!(!undrain_out.exists());

    // An operator acknowledges the fault; validation passes; undrain works.
    let ack = pb::task_payload::Action::AckFaults(pb::AckFaults {
        codes: vec!["xid_critical".into()],
        gpu_index: -1,
        operator: "ops/alice".into(),
        reason: "historic XID, GPU reseated".into(),
    });
    let s = engine.submit(h.task("a1", ack)).await.unwrap();
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(
        s.message.contains("xid_critical/GPU-fake-0/79"),
        "{}",
        s.message
    );
    let acks = engine.journal().acks().unwrap();
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].operator, "ops/alice");
    assert_eq!(
        acks[0].fault_ids,
        vec!["xid_critical/GPU-fake-0/79".to_string()]
    );

    engine
        .submit(h.task("v2", validate("550.54.15", "12.4", "")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "v2", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");

    engine.submit(h.task("u3", undrain(false))).await.unwrap();
    let s = wait_terminal(&engine, "u3", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(!*engine.draining().borrow());
    assert!(engine.journal().drain_mark().unwrap().is_none());
    assert!(undrain_out.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_runs_the_profile_smoke_test() {
    let h = Harness::new();
    let profile = r#"
[patch.profiles.driver]
argv = ["/bin/true"]
version_pattern = '^[0-9.]+$'
validate_command = ["/bin/sh", "-c", "echo smoke broke; exit 4"]
validate_timeout_s = 5
"#;
    let engine = h.engine(profile, fast_drain(30));
    engine
        .submit(h.task("v1", validate("550.54.15", "", "driver")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "v1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Failed);
    assert!(
        s.message
            .contains("smoke test `/bin/sh` exited with status 4"),
        "{}",
        s.message
    );
    assert_eq!(s.output_tail, vec!["smoke broke".to_string()]);
    assert_eq!(s.verdict, pb::Verdict::Healthy as i32);
    assert!(s.attestation.is_some());
    assert!(!engine.journal().last_validation().unwrap().unwrap().passed);
}

fn unhealthy(h: &Harness) {
    h.health.update(|st| {
        st.verdict = pb::Verdict::Unhealthy;
        st.reasons = vec![
            pb::Reason {
                code: "xid_critical".into(),
                severity: pb::Verdict::Unhealthy as i32,
                gpu_index: 0,
                fault_id: "xid_critical/GPU-fake-0/79".into(),
                ..Default::default()
            },
            pb::Reason {
                code: "pcie_link_degraded".into(),
                severity: pb::Verdict::Degraded as i32,
                gpu_index: 0,
                fault_id: "pcie_link_degraded/GPU-fake-0/gen".into(),
                ..Default::default()
            },
        ];
    });
}

fn ack_all() -> Action {
    Action::AckFaults(pb::AckFaults {
        codes: vec![],
        gpu_index: -1,
        operator: String::new(),
        reason: "all of it".into(),
    })
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

/// Issue 13, 2(a): on a protected ring (ring 3, or no ring configured) an
/// AckFaults with empty codes on an UNHEALTHY host is refused without
/// approvals, so a coordinator key alone cannot ack → validate → undrain
/// an unhealthy host. With approvals covering ACK_FAULTS it runs and the
/// journal names the approver keys as the acknowledging operators.
#[tokio::test(flavor = "multi_thread")]
async fn ack_of_an_unhealthy_fault_on_a_protected_ring_needs_approvals() {
    for ring in [Some(3), None] {
        let mut h = Harness::new();
        h.ring = ring;
        let engine = h.engine("", fast_drain(30));
        let task_ring = ring.unwrap_or(3);
        unhealthy(&h);

        let err = rejected_by(
            engine
                .submit(h.task_ring("a1", h.next_seq(), task_ring, ack_all()))
                .await,
            "approval_threshold",
        );
        assert!(
            err.contains("needs 2 distinct approver keys, got 0"),
            "{err}"
        );
        assert!(engine.journal().acks().unwrap().is_empty());
        assert_eq!(
            h.health.state().reasons.len(),
            2,
            "nothing was acknowledged"
        );

        // Naming the code explicitly changes nothing.
        let named = Action::AckFaults(pb::AckFaults {
            codes: vec!["xid_critical".into()],
            gpu_index: 0,
            operator: "ops/alice".into(),
            reason: "historic".into(),
        });
        rejected_by(
            engine
                .submit(h.task_ring("a2", h.next_seq(), task_ring, named))
                .await,
            "approval_threshold",
        );

        // Approvals for a patch do not cover an acknowledgement.
        let patch_only = h.approved("a3", ack_all(), &[pb::ApprovedAction::Patch]);
        let err = rejected_by(engine.submit(patch_only).await, "approval_scope");
        assert!(err.contains("actions"), "{err}");

        // A DEGRADED fault alone needs no approval; "all" then reaches only
        // the codes that are there now.
        let degraded = Action::AckFaults(pb::AckFaults {
            codes: vec!["pcie_link_degraded".into()],
            gpu_index: -1,
            operator: String::new(),
            reason: "known slow slot".into(),
        });
        let s = engine
            .submit(h.task_ring("a4", h.next_seq(), task_ring, degraded))
            .await
            .unwrap();
        assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
        assert_eq!(h.health.state().reasons.len(), 1);

        let s = engine
            .submit(h.approved("a5", ack_all(), &[pb::ApprovedAction::AckFaults]))
            .await
            .unwrap();
        assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
        assert!(s.message.contains("approvers alice, bob"), "{}", s.message);
        assert!(h.health.state().reasons.is_empty());
        let acks = engine.journal().acks().unwrap();
        assert_eq!(acks.len(), 2);
        assert!(acks[0].approvers.is_empty());
        assert_eq!(acks[1].approvers, vec!["alice", "bob"]);
        assert_eq!(acks[1].fault_ids, vec!["xid_critical/GPU-fake-0/79"]);
    }
}

/// On an unprotected ring a coordinator-only AckFaults still works (and
/// needs no `operator` text).
#[tokio::test(flavor = "multi_thread")]
async fn ack_on_an_unprotected_ring_needs_no_approval() {
    let h = Harness::new();
    let engine = h.engine("", fast_drain(30));
    unhealthy(&h);
    let s = engine.submit(h.task("a1", ack_all())).await.unwrap();
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(h.health.state().reasons.is_empty());
}

/// Issue 13, 2(b): a host validated, then drained again (it regressed), is
/// not undrained by a plain Undrain on the strength of the old validation.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_drain_clears_the_last_validation() {
    let h = Harness::new();
    let engine = h.engine("", fast_drain(30));
    drained(&h, &engine, "d1").await;
    engine
        .submit(h.task("v1", validate("550.54.15", "12.4", "")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "v1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    engine.submit(h.task("u1", undrain(false))).await.unwrap();
    let s = wait_terminal(&engine, "u1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");

    // The host regresses and is drained again.
    unhealthy(&h);
    drained(&h, &engine, "d2").await;
    assert!(engine.journal().last_validation().unwrap().is_none());
    engine.submit(h.task("u2", undrain(false))).await.unwrap();
    let s = wait_terminal(&engine, "u2", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Failed, "{s:?}");
    assert!(
        s.message.contains("undrain refused by `no_validation`"),
        "{}",
        s.message
    );
    assert!(*engine.draining().borrow());
}

/// A passing validation older than the task lifetime cap no longer counts.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_validation_does_not_undrain() {
    let mut h = Harness::new();
    let clock = ManualClock::at(SystemClock.now_ms());
    h.clock = Some(clock.clone());
    let engine = h.engine("", fast_drain(30));
    drained(&h, &engine, "d1").await;
    engine
        .submit(h.task("v1", validate("550.54.15", "12.4", "")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "v1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");

    let cap_ms = i64::try_from(h.trust.policy.max_task_lifetime_s).unwrap() * 1000;
    clock.advance(cap_ms + 1_000);
    engine.submit(h.task("u1", undrain(false))).await.unwrap();
    let s = wait_terminal(&engine, "u1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Failed, "{s:?}");
    assert!(
        s.message.contains("undrain refused by `validation_stale`"),
        "{}",
        s.message
    );

    // A fresh validation does.
    engine
        .submit(h.task("v2", validate("550.54.15", "12.4", "")))
        .await
        .unwrap();
    wait_terminal(&engine, "v2", Duration::from_secs(5)).await;
    engine.submit(h.task("u2", undrain(false))).await.unwrap();
    let s = wait_terminal(&engine, "u2", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
}

/// Issue 21 §1: the drain mark says who drained the host (the task, its
/// wave, the trust-file id of the coordinator key that signed it), why and
/// since when; a second Drain names itself but keeps the first one's time;
/// the mark survives an agent restart, and the Undrain clears it.
#[tokio::test(flavor = "multi_thread")]
async fn the_drain_mark_names_who_why_and_since_when_and_survives_a_restart() {
    let mut h = Harness::new();
    let clock = ManualClock::at(SystemClock.now_ms());
    h.clock = Some(clock.clone());
    let engine = h.engine("", fast_drain(30));
    assert_eq!(engine.drain_mark(), None);
    let t0 = h.now_ms();
    engine
        .submit(h.task("d1", drain("kernel 6.8 rollout")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "d1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert_eq!(
        engine.drain_mark(),
        Some(pb::DrainMark {
            task_id: "d1".into(),
            wave_id: "wave-1".into(),
            signed_by: "coord".into(),
            reason: "kernel 6.8 rollout".into(),
            since_unix_ms: t0,
            already_draining: false,
        })
    );

    clock.advance(60_000);
    engine
        .submit(h.task("d2", drain("second opinion")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "d2", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    let mark = engine.drain_mark().unwrap();
    assert_eq!(
        (mark.task_id.as_str(), mark.reason.as_str()),
        ("d2", "second opinion")
    );
    assert_eq!(
        mark.since_unix_ms, t0,
        "out of service since the first drain"
    );
    assert!(mark.already_draining);

    // A restart: the driver of the last task lets go of the journal.
    assert!(engine.shutdown(Duration::from_secs(5)).await.unwrap());
    drop(engine);
    let engine = h.engine("", fast_drain(30));
    assert_eq!(
        engine.drain_mark(),
        Some(mark),
        "read back from the journal"
    );
    assert!(*engine.draining().borrow());

    engine
        .submit(h.task("v1", validate("550.54.15", "12.4", "")))
        .await
        .unwrap();
    wait_terminal(&engine, "v1", Duration::from_secs(5)).await;
    engine.submit(h.task("u1", undrain(false))).await.unwrap();
    let s = wait_terminal(&engine, "u1", Duration::from_secs(5)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert_eq!(engine.drain_mark(), None);
}

/// `[drain] wait_command` (issue 17): run after the hook, every
/// `wait_interval_s`, until it exits 0; its last line is the task's message
/// meanwhile; the process wait comes after it.
#[tokio::test(flavor = "multi_thread")]
async fn drain_polls_the_wait_command_until_it_exits_0() {
    let h = Harness::new();
    let hook_ran = h.file("hook-ran");
    let counter = h.file("polls");
    let mut cfg = fast_drain(30);
    cfg.hook = vec!["/usr/bin/touch".into(), hook_ran.display().to_string()];
    cfg.wait_command = vec![
        "/bin/sh".into(),
        "-c".into(),
        r#"if [ ! -e "$1" ]; then echo "the drain hook has not run"; exit 5; fi
n=$(( $(cat "$2" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$2"
if [ "$n" -ge 3 ]; then echo "node $3 is drained"; exit 0; fi
echo "node $3 is draining: poll $n"; exit 1"#
            .into(),
        "sh".into(),
        hook_ran.display().to_string(),
        counter.display().to_string(),
        "{host_id}".into(),
    ];
    cfg.wait_interval_s = 1;
    let engine = h.engine("", cfg);
    let started = Instant::now();
    engine.submit(h.task("d1", drain("x"))).await.unwrap();
    let mid = wait_for(&engine, "d1", Duration::from_secs(5), |s| {
        s.message.contains("poll 1")
    })
    .await;
    assert_eq!(mid.step, "wait_scheduler");
    assert_eq!(mid.state(), TaskState::Running);
    assert!(
        mid.message
            .contains("waiting for the scheduler: `/bin/sh` exited with status 1 (node gpu-1 is draining: poll 1)"),
        "{}",
        mid.message
    );
    let s = wait_terminal(&engine, "d1", Duration::from_secs(15)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(s.message.contains("DRAINED"), "{}", s.message);
    assert_eq!(std::fs::read_to_string(&counter).unwrap().trim(), "3");
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "three polls one second apart"
    );
    assert_eq!(s.output_tail, vec!["node gpu-1 is drained".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_command_that_never_exits_0_fails_the_drain_at_its_timeout() {
    let h = Harness::new();
    let mut cfg = fast_drain(30);
    cfg.wait_command = vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo \"node gpu-1 is draining: 2 job(s) still on it\"; exit 1".into(),
    ];
    cfg.wait_interval_s = 1;
    cfg.wait_timeout_s = 2;
    let engine = h.engine("", cfg);
    let started = Instant::now();
    engine.submit(h.task("d1", drain("x"))).await.unwrap();
    let s = wait_terminal(&engine, "d1", Duration::from_secs(15)).await;
    assert_eq!(s.state(), TaskState::Failed, "{s:?}");
    assert_eq!(s.step, "wait_scheduler");
    assert_eq!(
        s.message,
        "drain timed out after 2 s waiting for the scheduler: `/bin/sh` exited with status 1 (node gpu-1 is draining: 2 job(s) still on it); host stays drained"
    );
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert!(*engine.draining().borrow(), "never silently undrained");
    assert_eq!(
        engine.journal().drain_mark().unwrap().unwrap().task_id,
        "d1"
    );
    assert!(engine.running_task().is_none());
}
