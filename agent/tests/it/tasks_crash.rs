//! Crash safety and the patch paths that finish across a restart: a crash
//! mid-patch is INTERRUPTED (never success) and not run again; a reboot
//! finishes on a new boot id; a self-upgrade finishes on the new version.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::tasks_common;

use std::time::Duration;

use ringfence::pb::TaskState;
use ringfence::time::{Clock, ManualClock, SystemClock};
use ringfenced::tasks::{DrainConfig, RebootConfig, SubmitError};
use tasks_common::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn crash_during_a_patch_is_interrupted_and_never_rerun() {
    let h = Harness::new();
    let count = h.file("runs");
    let profile = format!(
        r#"
[patch.profiles.driver]
argv = ["/bin/sh", "-c", "echo run >> {}; sleep 2", "sh", "{{version}}"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
"#,
        count.display()
    );

    // First life: drain, start the patch, then "crash": the runtime and the
    // engine are dropped while the command runs, with no shutdown.
    let rt = runtime();
    rt.block_on(async {
        let engine = h.engine(&profile, DrainConfig::default());
        drained(&h, &engine, "d1").await;
        engine
            .submit(h.task_seq("p1", 10, patch("driver", "560.35.3")))
            .await
            .unwrap();
        let s = wait_for(&engine, "p1", Duration::from_secs(5), |s| {
            s.step == "command"
        })
        .await;
        assert_eq!(s.state(), TaskState::Running);
        for _ in 0..100 {
            if count.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(count.exists(), "the patch command started");
    });
    // Dropping every task without running it further, as a kill would.
    rt.shutdown_timeout(Duration::from_secs(5));

    // Second life on the same state dir.
    let rt = runtime();
    rt.block_on(async {
        let engine = h.engine(&profile, DrainConfig::default());
        let s = engine.get("p1").unwrap();
        assert_eq!(s.state(), TaskState::Interrupted, "{s:?}");
        assert!(s.message.contains("step `command`"), "{}", s.message);
        assert!(*engine.draining().borrow(), "host is still draining");
        assert_eq!(engine.high_water(), 10);

        // The same task id again: its recorded state, not a second run.
        let again = engine
            .submit(h.task_seq("p1", 10, patch("driver", "560.35.3")))
            .await
            .unwrap();
        assert_eq!(again.state(), TaskState::Interrupted);
        // Let the first life's command finish, then count runs.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(std::fs::read_to_string(&count).unwrap(), "run\n");
        assert_eq!(engine.get("p1").unwrap().state(), TaskState::Interrupted);
        // An old sequence with a new id is refused by the high-water mark.
        let err = engine
            .submit(h.task_seq("p2", 9, patch("driver", "560.35.3")))
            .await
            .unwrap_err();
        assert!(
            matches!(err, SubmitError::Rejected(ref r) if r.check() == "sequence"),
            "{err}"
        );
        // The engine is free: a new task runs.
        engine
            .submit(h.task_seq("v1", 11, validate("", "", "")))
            .await
            .unwrap();
        let s = wait_terminal(&engine, "v1", Duration::from_secs(5)).await;
        assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
        let listed: Vec<String> = engine
            .list("wave-1")
            .into_iter()
            .map(|t| t.task_id)
            .collect();
        assert_eq!(listed, vec!["d1", "p1", "v1"]);
    });
}

fn reboot_profile(marker: &std::path::Path) -> String {
    format!(
        r#"
[patch.profiles.driver]
argv = ["/bin/sh", "-c", "echo $1 > {}", "sh", "{{version}}"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
reboot = true
"#,
        marker.display()
    )
}

fn fake_reboot(h: &Harness) -> RebootConfig {
    RebootConfig {
        command: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("touch {}", h.file("rebooted").display()),
        ],
        timeout_s: 5,
    }
}

async fn patch_and_await(
    h: &Harness,
    profile: &str,
    boot: &str,
    agent: &str,
    version: &str,
    want: TaskState,
    parked: &str,
) {
    let engine = h.engine_with(profile, DrainConfig::default(), fake_reboot(h), boot, agent);
    drained(h, &engine, "d1").await;
    engine
        .submit(h.task_seq("p1", 5, patch("driver", version)))
        .await
        .unwrap();
    let s = wait_for(&engine, "p1", Duration::from_secs(10), |s| {
        s.state() == want && s.message.contains(parked) || s.state() == TaskState::Failed
    })
    .await;
    assert_eq!(s.state(), want, "{s:?}");
    // Still parked: other mutating tasks are refused.
    let err = engine
        .submit(h.task_seq("d2", 6, drain("x")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::Busy { ref running_task_id } if running_task_id == "p1"),
        "{err}"
    );
    assert!(engine.shutdown(Duration::from_secs(5)).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn reboot_path_completes_on_a_new_boot_id() {
    let h = Harness::new();
    let marker = h.file("installed");
    let profile = reboot_profile(&marker);
    patch_and_await(
        &h,
        &profile,
        "boot-1",
        "0.1.0",
        "560.35.3",
        TaskState::AwaitingReboot,
        "reboot requested",
    )
    .await;
    assert!(h.file("rebooted").exists(), "the reboot command ran");
    assert!(
        pending_recorded(&h),
        "AWAITING_REBOOT is journalled with the boot id"
    );

    let engine = h.engine_with(
        &profile,
        DrainConfig::default(),
        fake_reboot(&h),
        "boot-2",
        "0.1.0",
    );
    let s = engine.get("p1").unwrap();
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(
        s.message.contains("boot id boot-1 -> boot-2"),
        "{}",
        s.message
    );
    let rec = engine.journal().installed("driver").unwrap().unwrap();
    assert_eq!(rec.after, "560.35.3");
    assert!(engine.journal().pending().unwrap().is_none());
    assert!(
        *engine.draining().borrow(),
        "still drained until an undrain"
    );
    assert!(engine.running_task().is_none());
}

/// Whether the journal (read directly, without recovery) holds the
/// reboot record of `p1` made on boot-1.
fn pending_recorded(h: &Harness) -> bool {
    let j = ringfenced::journal::Journal::open(&h.state_dir()).unwrap();
    j.pending()
        .unwrap()
        .is_some_and(|p| p.task_id == "p1" && p.boot_id == "boot-1")
}

#[tokio::test(flavor = "multi_thread")]
async fn reboot_path_with_the_same_boot_id_is_interrupted() {
    let h = Harness::new();
    let profile = reboot_profile(&h.file("installed"));
    patch_and_await(
        &h,
        &profile,
        "boot-1",
        "0.1.0",
        "560.35.3",
        TaskState::AwaitingReboot,
        "reboot requested",
    )
    .await;
    let engine = h.engine_with(
        &profile,
        DrainConfig::default(),
        fake_reboot(&h),
        "boot-1",
        "0.1.0",
    );
    let s = engine.get("p1").unwrap();
    assert_eq!(s.state(), TaskState::Interrupted, "{s:?}");
    assert!(s.message.contains("boot id is unchanged"), "{}", s.message);
    assert!(engine.journal().installed("driver").unwrap().is_none());
    assert!(*engine.draining().borrow());
}

fn upgrade_profile(marker: &std::path::Path) -> String {
    format!(
        r#"
[patch.profiles.ringfenced]
argv = ["/bin/sh", "-c", "echo $1 > {}", "sh", "{{version}}"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
restarts_agent = true
"#,
        marker.display()
    )
}

async fn upgrade(h: &Harness, profile: &str) {
    let engine = h.engine_with(
        profile,
        DrainConfig::default(),
        fake_reboot(h),
        "boot-1",
        "0.1.0",
    );
    drained(h, &engine, "d1").await;
    engine
        .submit(h.task_seq("p1", 5, patch("ringfenced", "0.2.0")))
        .await
        .unwrap();
    let s = wait_for(&engine, "p1", Duration::from_secs(10), |s| {
        s.step == "await_restart" || s.state() == TaskState::Failed
    })
    .await;
    assert_eq!(s.state(), TaskState::AwaitingRestart, "{s:?}");
    assert_eq!(
        (s.version_before.as_str(), s.version_after.as_str()),
        ("0.1.0", "0.2.0")
    );
    assert!(engine.shutdown(Duration::from_secs(5)).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn self_upgrade_completes_on_the_new_agent_version() {
    let h = Harness::new();
    let marker = h.file("agent-version");
    let profile = upgrade_profile(&marker);
    upgrade(&h, &profile).await;
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "0.2.0\n");
    let engine = h.engine_with(
        &profile,
        DrainConfig::default(),
        fake_reboot(&h),
        "boot-1",
        "0.2.0",
    );
    let s = engine.get("p1").unwrap();
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(
        s.message.contains("restarted on version 0.2.0 (was 0.1.0)"),
        "{}",
        s.message
    );
    assert_eq!(
        engine
            .journal()
            .installed("ringfenced")
            .unwrap()
            .unwrap()
            .before,
        "0.1.0"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn self_upgrade_fails_when_the_agent_comes_back_on_the_old_version() {
    let h = Harness::new();
    let profile = upgrade_profile(&h.file("agent-version"));
    upgrade(&h, &profile).await;
    let engine = h.engine_with(
        &profile,
        DrainConfig::default(),
        fake_reboot(&h),
        "boot-1",
        "0.1.0",
    );
    let s = engine.get("p1").unwrap();
    assert_eq!(s.state(), TaskState::Failed, "{s:?}");
    assert!(
        s.message
            .contains("came back on the old version 0.1.0, expected 0.2.0"),
        "{}",
        s.message
    );
    assert!(engine.journal().installed("ringfenced").unwrap().is_none());
    assert!(engine.running_task().is_none());
}

/// Issue 13, 7: wiping the agent's state does not reopen replay. A task
/// issued before the (new) journal was created, beyond the clock skew, is
/// refused by `before_journal`, even though it is otherwise valid.
#[tokio::test(flavor = "multi_thread")]
async fn a_task_issued_before_the_journal_was_created_is_refused() {
    let mut h = Harness::new();
    let clock = ManualClock::at(SystemClock.now_ms());
    h.clock = Some(clock.clone());
    let engine = h.engine("", DrainConfig::default());
    let old = h.task("d1", drain("maintenance"));
    engine.submit(old.clone()).await.unwrap();
    wait_terminal(&engine, "d1", Duration::from_secs(5)).await;
    let created = engine.journal().created_at().unwrap().unwrap();
    assert_eq!(created, clock.now_ms());
    drop(engine);
    // Let the finished task's driver drop its handle on the journal.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The state is wiped; the agent starts again 5 minutes later (the task
    // is still unexpired).
    std::fs::remove_dir_all(h.state_dir()).unwrap();
    clock.advance(300_000);
    let engine = h.engine("", DrainConfig::default());
    match engine.submit(old).await {
        Err(SubmitError::Rejected(r)) => assert_eq!(r.check(), "before_journal", "{r}"),
        other => panic!("replay after a wipe was not refused: {other:?}"),
    }
    assert!(engine.get("d1").is_none());
    // A fresh task is fine, and a reopen keeps the creation time.
    engine
        .submit(h.task("d2", drain("maintenance")))
        .await
        .unwrap();
    wait_terminal(&engine, "d2", Duration::from_secs(5)).await;
    drop(engine);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let engine = h.engine("", DrainConfig::default());
    assert_eq!(
        engine.journal().created_at().unwrap(),
        Some(created + 300_000)
    );
}
