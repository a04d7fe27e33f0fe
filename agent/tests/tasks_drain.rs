//! Drain waits for GPU compute processes; undrain needs a passing validation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod tasks_common;

use std::time::{Duration, Instant};

use ringfence::pb::{self, TaskState};
use ringfenced::tasks::DrainConfig;
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
    assert!(s.message.contains("no passing validation"), "{}", s.message);
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
            now_ms: ringfence::time::now_ms(),
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
        s.message.contains("task `v1`) was VERDICT_UNHEALTHY"),
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
