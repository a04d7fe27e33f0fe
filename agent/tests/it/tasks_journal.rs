//! The journal: acceptance is one transaction that refuses duplicates and
//! old sequences; records survive reopening; drain/task config parsing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ringfence::envelope::ReplayGuard;
use ringfence::pb::{self, TaskState};
use ringfence::time::{Clock, SystemClock};
use ringfenced::journal::{DrainMark, Journal, JournalError, ValidationRecord};
use ringfenced::tasks::{DrainConfig, OnTimeout, RebootConfig};

fn status(id: &str, seq: u64) -> pb::TaskStatus {
    let mut s = pb::TaskStatus {
        task_id: id.into(),
        sequence: seq,
        action: "drain".into(),
        ..Default::default()
    };
    s.set_state(TaskState::Accepted);
    s
}

#[test]
fn accept_is_atomic_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let j = Journal::open(dir.path()).unwrap();
        j.accept(&status("a", 5)).unwrap();
        assert!(matches!(
            j.accept(&status("a", 6)),
            Err(JournalError::Duplicate { .. })
        ));
        assert!(matches!(
            j.accept(&status("b", 5)),
            Err(JournalError::Sequence {
                sequence: 5,
                high_water: 5
            })
        ));
        assert!(
            j.task("b").unwrap().is_none(),
            "a refused accept writes nothing"
        );
        j.write(|t| {
            t.set_drain_mark(Some(&DrainMark {
                task_id: "a".into(),
                wave_id: "w".into(),
                signed_by: "coord".into(),
                reason: "r".into(),
                since_unix_ms: 1,
                already_draining: false,
            }))?;
            t.set_last_validation(Some(&ValidationRecord {
                task_id: "v".into(),
                verdict: pb::Verdict::Degraded as i32,
                passed: false,
                reasons: vec!["verdict".into()],
                at_unix_ms: 2,
            }))
        })
        .unwrap();
    }
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(ReplayGuard::high_water(&j).unwrap(), 5);
    assert_eq!(
        j.recorded("a").unwrap().unwrap().state(),
        TaskState::Accepted
    );
    assert_eq!(j.drain_mark().unwrap().unwrap().task_id, "a");
    assert_eq!(
        j.last_validation().unwrap().unwrap().verdict_name(),
        "VERDICT_DEGRADED"
    );
    assert!(dir.path().join("journal.redb").exists());
}

#[test]
fn drain_and_reboot_config_defaults_and_errors() {
    let d: DrainConfig = toml::from_str("").unwrap();
    assert_eq!(
        (d.timeout_s, d.on_timeout, d.poll_ms),
        (1800, OnTimeout::Fail, 2000)
    );
    let d: DrainConfig =
        toml::from_str("drain_hook = [\"/bin/x\", \"{host_id}\"]\non_timeout = \"proceed\"")
            .unwrap();
    assert_eq!(d.hook, vec!["/bin/x".to_string(), "{host_id}".to_string()]);
    assert_eq!(d.on_timeout, OnTimeout::Proceed);
    let d: DrainConfig = toml::from_str("hook = [\"/bin/x\", \"{host}\"]").unwrap();
    let err = d.validate().unwrap_err().to_string();
    assert!(
        err.contains("key `hook`") && err.contains("{host}"),
        "{err}"
    );
    assert!(toml::from_str::<DrainConfig>("on_timeout = \"ignore\"").is_err());
    assert!(toml::from_str::<DrainConfig>("bogus = 1").is_err());
    let r: RebootConfig = toml::from_str("").unwrap();
    assert_eq!(
        r.command,
        vec!["/usr/bin/systemctl".to_string(), "reboot".to_string()]
    );
    let r: RebootConfig = toml::from_str("command = []").unwrap();
    assert!(
        r.validate()
            .unwrap_err()
            .to_string()
            .contains("key `command`")
    );
}

// ------------------------------------------------- compaction, pages, limits

use crate::tasks_common;

use std::time::Duration;

use ringfenced::tasks::SubmitError;

fn finished(id: &str, seq: u64, state: TaskState, at: i64) -> pb::TaskStatus {
    let mut s = status(id, seq);
    s.set_state(state);
    s.accepted_at_unix_ms = at;
    s.updated_at_unix_ms = at;
    s
}

/// Compaction removes finished tasks older than the cut-off and nothing
/// else: unfinished tasks stay whatever their age, the high-water mark
/// stays (a compacted task id sent again is still refused by `sequence`),
/// and the sequence index follows.
#[test]
fn compaction_keeps_high_water_unfinished_and_recent_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    let old = 1_000;
    let recent = 9_000;
    for s in [
        finished("old-ok", 1, TaskState::Succeeded, old),
        finished("old-running", 2, TaskState::Running, old),
        finished("old-failed", 3, TaskState::Failed, old),
        finished("recent-ok", 4, TaskState::Succeeded, recent),
        finished("old-interrupted", 5, TaskState::Interrupted, old),
        finished("old-awaiting", 6, TaskState::AwaitingReboot, old),
    ] {
        j.accept(&s).unwrap();
    }
    assert_eq!(j.compact(5_000).unwrap(), 3);
    let left: Vec<String> = j.tasks().unwrap().into_iter().map(|t| t.task_id).collect();
    assert_eq!(left, ["old-running", "recent-ok", "old-awaiting"]);
    let (page, more) = j.tasks_page("", 0, 10).unwrap();
    assert!(!more);
    assert_eq!(
        page.iter().map(|t| t.sequence).collect::<Vec<_>>(),
        [2, 4, 6]
    );
    assert_eq!(ReplayGuard::high_water(&j).unwrap(), 6);
    assert!(matches!(
        j.accept(&status("old-ok", 1)),
        Err(JournalError::Sequence { high_water: 6, .. })
    ));
    assert_eq!(j.compact(5_000).unwrap(), 0, "nothing more to remove");
    drop(j);
    // The removal is durable and the mark survives reopening.
    let j = Journal::open(dir.path()).unwrap();
    assert_eq!(j.tasks().unwrap().len(), 3);
    assert_eq!(ReplayGuard::high_water(&j).unwrap(), 6);
}

/// The Drain task the drain mark names stays whatever its age (a Patch
/// checks that it SUCCEEDED); once the mark is cleared it goes like any
/// other.
#[test]
fn compaction_keeps_the_drain_task_the_mark_names() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    for s in [
        finished("d-old", 1, TaskState::Failed, 1_000),
        finished("d-marked", 2, TaskState::Succeeded, 1_000),
    ] {
        j.accept(&s).unwrap();
    }
    let mark = DrainMark {
        task_id: "d-marked".into(),
        wave_id: String::new(),
        signed_by: String::new(),
        reason: "x".into(),
        since_unix_ms: 1_000,
        already_draining: true,
    };
    j.write(|t| t.set_drain_mark(Some(&mark))).unwrap();
    assert_eq!(j.compact(5_000).unwrap(), 1);
    let left: Vec<String> = j.tasks().unwrap().into_iter().map(|t| t.task_id).collect();
    assert_eq!(left, ["d-marked"]);
    j.write(|t| t.set_drain_mark(None)).unwrap();
    assert_eq!(j.compact(5_000).unwrap(), 1);
    assert!(j.tasks().unwrap().is_empty());
}

/// ListTasks pages: by sequence, bounded, resumable after the last
/// sequence of a page, and filtered by wave before counting.
#[test]
fn task_pages_are_bounded_ordered_and_filtered_by_wave() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(dir.path()).unwrap();
    for seq in 1..=25u64 {
        let mut s = status(&format!("t{seq:02}"), seq * 10);
        s.wave_id = if seq % 2 == 0 { "even" } else { "odd" }.into();
        j.accept(&s).unwrap();
    }
    let mut after = 0;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (page, more) = j.tasks_page("", after, 10).unwrap();
        assert!(page.len() <= 10);
        pages += 1;
        seen.extend(page.iter().map(|t| t.sequence));
        match page.last() {
            Some(last) if more => after = last.sequence,
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, (1..=25u64).map(|s| s * 10).collect::<Vec<_>>());
    let (even, more) = j.tasks_page("even", 0, 100).unwrap();
    assert!(!more);
    assert_eq!(even.len(), 12);
    assert!(even.iter().all(|t| t.wave_id == "even"));
    let (page, more) = j.tasks_page("odd", 100, 3).unwrap();
    assert_eq!(
        page.iter().map(|t| t.sequence).collect::<Vec<_>>(),
        [110, 130, 150]
    );
    assert!(more);
}

/// The engine compacts at open with its retention (at least a week, and at
/// least the task lifetime cap plus twice the skew), and a finished task
/// leaves the watcher map; watching it afterwards adds nothing to the map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_compacts_at_open_and_prunes_finished_watchers() {
    let h = tasks_common::Harness::new();
    let now = SystemClock.now_ms();
    let day = 24 * 3600 * 1000;
    {
        let j = Journal::open(&h.state_dir()).unwrap();
        j.accept(&finished(
            "eight-days",
            1,
            TaskState::Succeeded,
            now - 8 * day,
        ))
        .unwrap();
        j.accept(&finished("six-days", 2, TaskState::Failed, now - 6 * day))
            .unwrap();
    }
    let engine = h.engine("", DrainConfig::default());
    assert!(engine.retention() >= Duration::from_secs(7 * 24 * 3600));
    assert!(engine.get("eight-days").is_none(), "compacted at open");
    assert!(engine.get("six-days").is_some(), "within the retention");
    assert_eq!(engine.high_water(), 2);

    engine
        .submit(h.task_seq("d1", 3, tasks_common::drain("maintenance")))
        .await
        .unwrap();
    let s = tasks_common::wait_terminal(&engine, "d1", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert_eq!(engine.watched_tasks(), 0, "the finished task left the map");
    let rx = engine.watch("d1").unwrap();
    assert_eq!(rx.borrow().state(), TaskState::Succeeded);
    let rx_old = engine.watch("six-days").unwrap();
    assert_eq!(rx_old.borrow().state(), TaskState::Failed);
    assert_eq!(
        engine.watched_tasks(),
        0,
        "watching a finished task adds nothing"
    );
}

/// A drain reason that would reach the hook as an option (`--...`) is
/// refused by check `action` before anything runs or is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reason_that_would_become_a_hook_option_is_refused_by_check_action() {
    let h = tasks_common::Harness::new();
    let marker = h.file("hook-ran");
    let drain_cfg = DrainConfig {
        hook: vec![
            "/bin/sh".into(),
            "-c".into(),
            format!("touch {}", marker.display()),
            "hook".into(),
            "{reason}".into(),
        ],
        ..DrainConfig::default()
    };
    let engine = h.engine("", drain_cfg);
    for reason in ["--cancel-all-jobs", "-rf"] {
        let err = engine
            .submit(h.task(reason, tasks_common::drain(reason)))
            .await
            .unwrap_err();
        match &err {
            SubmitError::Rejected(r) => assert_eq!(r.check(), "action", "{r}"),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("starts with `-`"), "{err}");
        assert!(engine.get(reason).is_none(), "nothing recorded");
    }
    assert!(!marker.exists(), "the hook never ran");
    assert_eq!(engine.high_water(), 0);

    // Nor may a task value become the program: refused at config load.
    let bad = DrainConfig {
        hook: vec!["{reason}".into()],
        ..DrainConfig::default()
    };
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("key `hook`") && err.contains("program"),
        "{err}"
    );
}
