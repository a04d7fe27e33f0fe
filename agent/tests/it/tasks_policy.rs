//! Check 6: a task names a configured profile and a version matching its
//! anchored pattern; anything else is refused before anything runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::tasks_common;

use std::time::Duration;

use ringfence::pb::TaskState;
use ringfenced::profiles::{PatchConfig, ProfileError};
use ringfenced::tasks::{DrainConfig, SubmitError};
use tasks_common::*;

fn driver_profile(marker: &std::path::Path) -> String {
    format!(
        r#"
[patch.profiles.driver]
argv = ["/bin/sh", "-c", "touch '{}'", "sh", "{{version}}"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
timeout_s = 30
"#,
        marker.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_metacharacters_in_versions_are_refused_before_anything_runs() {
    let h = Harness::new();
    let marker = h.file("ran");
    let engine = h.engine(&driver_profile(&marker), DrainConfig::default());
    drained(&h, &engine, "d1").await;
    let high_water = engine.high_water();

    for (i, version) in ["550.1; rm -rf /", "$(id)", "550.54.15\n", "550.54", ""]
        .into_iter()
        .enumerate()
    {
        let id = format!("bad-{i}");
        let err = engine
            .submit(h.task(&id, patch("driver", version)))
            .await
            .unwrap_err();
        match &err {
            SubmitError::Rejected(r) => {
                assert_eq!(r.check(), "action", "{r}");
                assert!(r.to_string().contains("version_pattern"), "{r}");
            }
            other => panic!("expected a rejection, got {other}"),
        }
        assert!(
            engine.get(&id).is_none(),
            "refused task must not be recorded"
        );
    }
    assert_eq!(
        engine.high_water(),
        high_water,
        "refusals do not move the mark"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!marker.exists(), "the profile command must not have run");

    let err = engine
        .submit(h.task("unknown", patch("kernel", "1.2.3")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown patch profile `kernel`"),
        "{err}"
    );
    assert!(err.to_string().contains("configured: driver"), "{err}");

    // The same profile with a valid version does run.
    engine
        .submit(h.task("good", patch("driver", "550.54.15")))
        .await
        .unwrap();
    let s = wait_terminal(&engine, "good", Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
    assert!(marker.exists());
    assert_eq!(s.version_after, "550.54.15");
}

#[tokio::test(flavor = "multi_thread")]
async fn validate_nonce_length_and_profile_are_checked() {
    let h = Harness::new();
    let engine = h.engine(&driver_profile(&h.file("m")), DrainConfig::default());
    let mut bad = validate("", "", "");
    if let ringfence::pb::task_payload::Action::Validate(v) = &mut bad {
        v.nonce = vec![1; 8];
    }
    let err = engine.submit(h.task("v1", bad)).await.unwrap_err();
    assert!(err.to_string().contains("nonce is 8 bytes"), "{err}");
    let err = engine
        .submit(h.task("v2", validate("", "", "nope")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown patch profile `nope`"),
        "{err}"
    );
}

fn load(text: &str) -> Result<PatchConfig, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Top {
        patch: PatchConfig,
    }
    let top: Top = toml::from_str(text).map_err(|e| e.to_string())?;
    top.patch
        .validate()
        .map_err(|e: ProfileError| e.to_string())?;
    Ok(top.patch)
}

#[test]
fn profile_config_errors_name_profile_and_key() {
    let base = |argv: &str, pattern: &str, extra: &str| {
        format!("[patch.profiles.drv]\nargv = {argv}\nversion_pattern = '{pattern}'\n{extra}")
    };
    let ok = load(&base(r#"["/bin/x", "{version}"]"#, r"^[0-9.]+$", "")).unwrap();
    let p = &ok.profiles["drv"];
    assert_eq!(p.timeout_s, 1800);
    assert!(!p.reboot && !p.restarts_agent && p.require_drained);

    let err = load(&base(r#"["/bin/x", "{foo}"]"#, r"^[0-9.]+$", "")).unwrap_err();
    assert!(
        err.contains("patch profile `drv`: key `argv`") && err.contains("{foo}"),
        "{err}"
    );

    let err = load(&base(r#"["/bin/x"]"#, r"[0-9.]+", "")).unwrap_err();
    assert!(
        err.contains("patch profile `drv`: key `version_pattern`") && err.contains("anchored"),
        "{err}"
    );

    let err = load(&base(r#"["/bin/x"]"#, r"^([0-9$", "")).unwrap_err();
    assert!(err.contains("key `version_pattern`"), "{err}");

    let err = load(&base(
        r#"["/bin/x"]"#,
        r"^1$",
        "reboot = true\nrestarts_agent = true",
    ))
    .unwrap_err();
    assert!(err.contains("key `restarts_agent`"), "{err}");

    let err = load(&base(r#"["/bin/x"]"#, r"^1$", "shell = true")).unwrap_err();
    assert!(err.contains("shell"), "{err}");

    let err = load(&base("[]", r"^1$", "")).unwrap_err();
    assert!(err.contains("key `argv`"), "{err}");
}

#[test]
fn alternation_stays_anchored() {
    let cfg = load("[patch.profiles.p]\nargv = [\"/bin/x\"]\nversion_pattern = '^1|2$'\n").unwrap();
    let re = cfg.profiles["p"].compile_pattern("p").unwrap();
    assert!(re.is_match("1") && re.is_match("2"));
    assert!(
        !re.is_match("1; rm -rf /"),
        "`^1|2$` must not match a prefix"
    );
    assert!(!re.is_match("x2"));
}
