//! The journal: acceptance is one transaction that refuses duplicates and
//! old sequences; records survive reopening; drain/task config parsing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ringfence::envelope::ReplayGuard;
use ringfence::pb::{self, TaskState};
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
