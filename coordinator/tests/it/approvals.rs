#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Approvals and break-glass: signed by distinct approvers, for this wave,
//! unexpired; a coordinator key never approves; a tampered file is refused.

use ringfence::keys;
use ringfence::pb;
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};
use ringfence_coordinator::approvals::{self, ApprovalError, RingScope};

struct Keys {
    coord: keys::SigningKey,
    alice: keys::SigningKey,
    bob: keys::SigningKey,
    trust: TrustSet,
}

fn keys() -> Keys {
    let (coord, alice, bob) = (keys::generate(), keys::generate(), keys::generate());
    let tk = |id: &str, k: &keys::SigningKey, role| TrustedKey {
        id: id.into(),
        key: k.verifying_key(),
        role,
    };
    let trust = TrustSet::from_keys(
        vec![
            tk("coord", &coord, KeyRole::Coordinator),
            tk("alice", &alice, KeyRole::Approver),
            tk("bob", &bob, KeyRole::Approver),
        ],
        Policy::default(),
    );
    Keys {
        coord,
        alice,
        bob,
        trust,
    }
}

fn bg(wave: &str) -> pb::BreakGlass {
    pb::BreakGlass {
        wave_id: wave.into(),
        pool: "h100".into(),
        max_out: 3,
        reason: "CVE fix must land tonight".into(),
        issued_at_unix_ms: 1_000,
        expires_at_unix_ms: 100_000,
        approver: "alice".into(),
    }
}

#[test]
fn break_glass_needs_two_distinct_approvers_for_this_wave() {
    let k = keys();
    let mut env = approvals::sign_breakglass(&bg("w1"), "alice", &k.alice);
    assert!(matches!(
        approvals::check_breakglass(&env, &k.trust, "w1", 2_000),
        Err(ApprovalError::BelowThreshold {
            have: 1,
            need: 2,
            ..
        })
    ));
    // The same approver twice (under another id) still counts once.
    ringfence::envelope::add_signature(&mut env, "alice-again", &k.alice);
    assert!(matches!(
        approvals::check_breakglass(&env, &k.trust, "w1", 2_000),
        Err(ApprovalError::BelowThreshold { have: 1, .. })
    ));
    ringfence::envelope::add_signature(&mut env, "bob", &k.bob);
    let grant = approvals::check_breakglass(&env, &k.trust, "w1", 2_000).unwrap();
    assert_eq!(grant.max_out, 3);
    assert_eq!(grant.approvers, ["alice", "bob"]);
    assert!(matches!(
        approvals::check_breakglass(&env, &k.trust, "w2", 2_000),
        Err(ApprovalError::Scope { field: "wave", .. })
    ));
    assert!(matches!(
        approvals::check_breakglass(&env, &k.trust, "w1", 200_000),
        Err(ApprovalError::Expired { .. })
    ));
}

#[test]
fn tampered_break_glass_file_is_refused() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bg.json");
    let mut env = approvals::sign_breakglass(&bg("w1"), "alice", &k.alice);
    ringfence::envelope::add_signature(&mut env, "bob", &k.bob);
    approvals::write_file(&path, &env).unwrap();
    let good = approvals::read_file(&path).unwrap();
    assert!(approvals::check_breakglass(&good, &k.trust, "w1", 2_000).is_ok());
    // Raise max_out by editing the payload: the signatures no longer verify.
    let mut bad = good.clone();
    let mut msg: pb::BreakGlass = prost::Message::decode(bad.payload.as_slice()).unwrap();
    msg.max_out = 50;
    bad.payload = prost::Message::encode_to_vec(&msg);
    approvals::write_file(&path, &bad).unwrap();
    let err =
        approvals::check_breakglass(&approvals::read_file(&path).unwrap(), &k.trust, "w1", 2_000)
            .unwrap_err();
    assert!(matches!(err, ApprovalError::BadSignature { .. }), "{err}");
}

#[test]
fn coordinator_key_can_never_approve() {
    let k = keys();
    let err = approvals::check_signing_key(&k.trust, &k.coord).unwrap_err();
    assert!(err.to_string().contains("can never approve"), "{err}");
    assert_eq!(
        approvals::check_signing_key(&k.trust, &k.alice).unwrap(),
        "alice"
    );
    assert!(matches!(
        approvals::check_signing_key(&k.trust, &keys::generate()),
        Err(ApprovalError::NotApprover(_))
    ));
    let env = approvals::sign_breakglass(&bg("w1"), "coord", &k.coord);
    assert!(matches!(
        approvals::check_breakglass(&env, &k.trust, "w1", 2_000),
        Err(ApprovalError::CoordinatorKey(_))
    ));
}

#[test]
fn ring_approvals_are_collected_per_ring_and_checked_for_scope() {
    let k = keys();
    let dir = tempfile::tempdir().unwrap();
    let hosts = vec!["gpu-1".to_string(), "gpu-2".to_string()];
    let approval = |ring: u32, version: &str| pb::RingApproval {
        wave_id: "w1".into(),
        ring,
        profile: "nvidia-driver".into(),
        version: version.into(),
        rollback_version: "550.54.15".into(),
        host_ids: hosts.clone(),
        issued_at_unix_ms: 1_000,
        expires_at_unix_ms: 100_000,
        approver: String::new(),
        actions: vec![pb::ApprovedAction::Patch as i32],
    };
    let scope = RingScope {
        wave_id: "w1",
        ring: 2,
        profile: "nvidia-driver",
        version: "560.35.03",
        hosts: &hosts,
    };
    approvals::write_file(
        &dir.path().join("ring-2-alice.json"),
        &approvals::sign_ring(&approval(2, "560.35.03"), "alice", &k.alice),
    )
    .unwrap();
    let got = approvals::collect_ring(dir.path(), &k.trust, &scope, 2_000);
    assert_eq!(got.approvers.len(), 1);
    approvals::write_file(
        &dir.path().join("ring-2-bob.json"),
        &approvals::sign_ring(&approval(2, "999.0.0"), "bob", &k.bob),
    )
    .unwrap();
    let got = approvals::collect_ring(dir.path(), &k.trust, &scope, 2_000);
    assert_eq!(got.approvers.len(), 1, "wrong version does not count");
    assert!(got.refused[0].1.contains("version"), "{:?}", got.refused);
    approvals::write_file(
        &dir.path().join("ring-2-bob.json"),
        &approvals::sign_ring(&approval(2, "560.35.03"), "bob", &k.bob),
    )
    .unwrap();
    approvals::write_file(
        &dir.path().join("ring-3-bob.json"),
        &approvals::sign_ring(&approval(3, "560.35.03"), "bob", &k.bob),
    )
    .unwrap();
    let got = approvals::collect_ring(dir.path(), &k.trust, &scope, 2_000);
    assert_eq!(got.approvers.len(), 2);
    assert_eq!(got.envelopes.len(), 2);
}

fn ring2_approval(hosts: &[&str], actions: &[pb::ApprovedAction], who: &str) -> pb::RingApproval {
    pb::RingApproval {
        wave_id: "w1".into(),
        ring: 2,
        profile: "nvidia-driver".into(),
        version: "560.35.03".into(),
        rollback_version: "550.54.15".into(),
        host_ids: hosts.iter().map(|h| h.to_string()).collect(),
        issued_at_unix_ms: 1_000,
        expires_at_unix_ms: 100_000,
        approver: who.into(),
        actions: actions.iter().map(|a| *a as i32).collect(),
    }
}

fn set_of(
    k: &Keys,
    signed: &[(pb::RingApproval, &str)],
    hosts: &[String],
) -> approvals::ApprovalSet {
    let scope = RingScope {
        wave_id: "w1",
        ring: 2,
        profile: "nvidia-driver",
        version: "560.35.03",
        hosts,
    };
    let mut set = approvals::ApprovalSet::default();
    for (a, who) in signed {
        let key = if *who == "alice" { &k.alice } else { &k.bob };
        let env = approvals::sign_ring(a, who, key);
        let covers = approvals::verify_ring(&env, &k.trust, &scope, 2_000).unwrap();
        set.push(env, covers);
    }
    set
}

fn patch(rollback: bool, version: &str) -> pb::task_payload::Action {
    pb::task_payload::Action::Patch(pb::Patch {
        profile: "nvidia-driver".into(),
        version: version.into(),
        rollback,
    })
}

#[test]
fn a_task_carries_only_the_approvals_covering_its_host_and_its_action() {
    use pb::ApprovedAction as A;
    let k = keys();
    let hosts = vec!["gpu-1".to_string(), "gpu-2".to_string()];
    let set = set_of(
        &k,
        &[
            (ring2_approval(&["gpu-1"], &[A::Patch], "alice"), "alice"),
            (ring2_approval(&["gpu-2"], &[A::Patch], "alice"), "alice"),
            (
                ring2_approval(&["gpu-1", "gpu-2"], &[A::Patch], "bob"),
                "bob",
            ),
            // The same approver again for gpu-1: adds no approver, not attached.
            (ring2_approval(&["gpu-1"], &[A::Patch], "bob"), "bob"),
            (
                ring2_approval(&["gpu-1"], &[A::ForceUndrain], "alice"),
                "alice",
            ),
        ],
        &hosts,
    );
    let names = |envs: Vec<pb::Envelope>| -> Vec<(String, Vec<String>, Vec<i32>)> {
        envs.iter()
            .map(|e| {
                let a: pb::RingApproval = prost::Message::decode(e.payload.as_slice()).unwrap();
                (a.approver, a.host_ids, a.actions)
            })
            .collect()
    };
    let got = names(set.for_task("gpu-1", &patch(false, "560.35.03"), 2_000));
    assert_eq!(
        got,
        [
            ("alice".into(), vec!["gpu-1".into()], vec![A::Patch as i32]),
            (
                "bob".into(),
                vec!["gpu-1".into(), "gpu-2".into()],
                vec![A::Patch as i32]
            ),
        ]
    );
    // A patch approval never rides along with a forced undrain, nor with a
    // rollback (none was approved here), nor with another version.
    let undrain = pb::task_payload::Action::Undrain(pb::Undrain {
        force: true,
        ..Default::default()
    });
    let got = names(set.for_task("gpu-1", &undrain, 2_000));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].2, [A::ForceUndrain as i32]);
    assert!(set.for_task("gpu-2", &undrain, 2_000).is_empty());
    assert!(
        set.for_task("gpu-1", &patch(true, "550.54.15"), 2_000)
            .is_empty()
    );
    assert!(
        set.for_task("gpu-1", &patch(false, "999.1"), 2_000)
            .is_empty()
    );
    // Other hosts, expired approvals, and tasks that need none get nothing.
    assert!(
        set.for_task("gpu-9", &patch(false, "560.35.03"), 2_000)
            .is_empty()
    );
    assert!(
        set.for_task("gpu-1", &patch(false, "560.35.03"), 200_000)
            .is_empty()
    );
    let drain = pb::task_payload::Action::Drain(pb::Drain::default());
    assert!(set.for_task("gpu-1", &drain, 2_000).is_empty());
    // Alice covers the ring in two files, bob in one: both count.
    assert_eq!(
        set.approvers_covering(&hosts, A::Patch)
            .into_iter()
            .collect::<Vec<_>>(),
        ["alice", "bob"]
    );
    assert_eq!(
        set.approvers_covering(&hosts, A::ForceUndrain).len(),
        0,
        "alice's force-undrain names gpu-1 only"
    );
}

#[test]
fn an_approval_without_actions_or_with_an_unknown_one_is_refused() {
    let k = keys();
    let hosts = vec!["gpu-1".to_string()];
    let scope = RingScope {
        wave_id: "w1",
        ring: 2,
        profile: "nvidia-driver",
        version: "560.35.03",
        hosts: &hosts,
    };
    let mut a = ring2_approval(&["gpu-1"], &[], "alice");
    let env = approvals::sign_ring(&a, "alice", &k.alice);
    let e = approvals::verify_ring(&env, &k.trust, &scope, 2_000).unwrap_err();
    assert!(matches!(e, ApprovalError::Actions(_)), "{e}");
    a.actions = vec![77];
    let env = approvals::sign_ring(&a, "alice", &k.alice);
    let e = approvals::verify_ring(&env, &k.trust, &scope, 2_000).unwrap_err();
    assert!(e.to_string().contains("unknown action 77"), "{e}");
    // A force-undrain-only approval does not approve the ring's patch.
    a.actions = vec![pb::ApprovedAction::ForceUndrain as i32];
    let env = approvals::sign_ring(&a, "alice", &k.alice);
    assert!(matches!(
        approvals::check_ring(&env, &k.trust, &scope, 2_000),
        Err(ApprovalError::ActionNotApproved("patch"))
    ));
}

fn request(hosts: Vec<String>, actions: Vec<pb::ApprovedAction>) -> approvals::Request {
    approvals::Request {
        wave_id: "w1".into(),
        ring: 2,
        profile: "nvidia-driver".into(),
        version: "560.35.03".into(),
        rollback_version: "550.54.15".into(),
        hosts,
        actions,
        issued_at_ms: 1_000,
        ttl_s: 3_600,
        approver: "alice".into(),
    }
}

#[test]
fn what_wave_approve_signs_is_what_was_asked_and_what_it_shows() {
    use pb::ApprovedAction as A;
    let hosts: Vec<String> = (1..=3).map(|i| format!("gpu-{i}")).collect();
    let parts = approvals::build(
        &request(hosts.clone(), vec![A::Rollback, A::Patch]),
        approvals::part_limit(2).unwrap(),
    )
    .unwrap();
    assert_eq!(parts.len(), 1);
    let a = &parts[0];
    assert_eq!(a.host_ids, hosts);
    assert_eq!(a.actions, [A::Patch as i32, A::Rollback as i32]);
    assert_eq!(a.expires_at_unix_ms - a.issued_at_unix_ms, 3_600_000);
    let shown = approvals::render(&parts);
    let digest = approvals::digest(&prost::Message::encode_to_vec(a));
    for want in [
        "gpu-1",
        "gpu-2",
        "gpu-3",
        "560.35.03",
        "550.54.15",
        "patch, rollback",
        "(3600 s)",
        digest.as_str(),
    ] {
        assert!(shown.contains(want), "`{want}` not shown:\n{shown}");
    }
    // A rollback cannot be approved without a rollback version; a lifetime
    // over the cap or an approver threshold no task can carry is refused.
    let mut r = request(hosts.clone(), vec![A::Rollback]);
    r.rollback_version.clear();
    assert!(matches!(
        approvals::build(&r, 1 << 20),
        Err(ApprovalError::NoRollbackVersion)
    ));
    assert!(approvals::check_ttl(86_401, 86_400, "spec").is_err());
    assert!(approvals::check_ttl(0, 86_400, "spec").is_err());
    assert!(approvals::check_ttl(86_400, 86_400, "spec").is_ok());
    assert!(matches!(
        approvals::part_limit(ringfence::envelope::MAX_APPROVALS + 1),
        Err(ApprovalError::TooLarge(_))
    ));
    // The coordinator's view must be what is signed.
    let r = request(hosts.clone(), vec![A::Patch]);
    assert!(
        approvals::scope_differences(&r, Some(&hosts), "nvidia-driver", "560.35.03", "550.54.15")
            .is_empty()
    );
    let other = vec![
        "gpu-1".to_string(),
        "gpu-2".to_string(),
        "gpu-7".to_string(),
    ];
    let d = approvals::scope_differences(&r, Some(&other), "nvidia-driver", "561.0", "550.54.15");
    assert_eq!(d.len(), 3, "{d:?}");
    assert!(
        d.iter()
            .any(|x| x.contains("version") && x.contains("561.0")),
        "{d:?}"
    );
    assert!(d.iter().any(|x| x.contains("gpu-3")), "{d:?}");
    assert!(d.iter().any(|x| x.contains("gpu-7")), "{d:?}");
}

#[test]
fn a_large_rings_approval_is_signed_in_parts_and_every_task_fits_what_the_agent_accepts() {
    use ringfence::time::{Clock, ManualClock};
    use ringfence_devfleet::simhost::{SimHost, SimRing};
    use std::sync::Arc;
    let k = keys();
    // 6,000 hosts with long ids: one approval naming all of them would be
    // over the agent's per-approval limit.
    let hosts: Vec<String> = (0..6_000)
        .map(|i| format!("gpu-{i:05}-{}", "x".repeat(240)))
        .collect();
    let whole: usize = hosts.iter().map(|h| h.len() + 3).sum();
    assert!(whole > ringfence::envelope::MAX_APPROVAL_PAYLOAD);
    let limit = approvals::part_limit(2).unwrap();
    let mut signed = Vec::new();
    for who in ["alice", "bob"] {
        let mut r = request(hosts.clone(), vec![pb::ApprovedAction::Patch]);
        r.approver = who.into();
        let parts = approvals::build(&r, limit).unwrap();
        assert!(parts.len() >= 2, "{} part(s)", parts.len());
        let named: Vec<&String> = parts.iter().flat_map(|p| &p.host_ids).collect();
        assert_eq!(named.len(), hosts.len(), "every host in exactly one part");
        for p in &parts {
            assert!(prost::Message::encoded_len(p) <= ringfence::envelope::MAX_APPROVAL_PAYLOAD);
            signed.push((p.clone(), who));
        }
    }
    let set = set_of(&k, &signed, &hosts);
    assert_eq!(
        set.approvers_covering(&hosts, pb::ApprovedAction::Patch)
            .len(),
        2
    );
    // The last host's patch, signed by the coordinator, carries one part
    // per approver and is accepted by an agent in ring 2.
    let host = hosts.last().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at(2_000));
    let attach = set.for_task(host, &patch(false, "560.35.03"), 2_000);
    assert_eq!(attach.len(), 2);
    let payload = pb::TaskPayload {
        task_id: "w1/last/1/patch".into(),
        host_id: host.clone(),
        wave_id: "w1".into(),
        ring: 2,
        sequence: 1,
        issued_at_unix_ms: clock.now_ms(),
        expires_at_unix_ms: clock.now_ms() + 60_000,
        action: Some(patch(false, "560.35.03")),
    };
    let task = pb::SignedTask {
        task: Some(ringfence::envelope::sign_message(
            ringfence::envelope::TASK_TYPE,
            &payload,
            &[("coord", &k.coord)],
        )),
        approvals: attach,
    };
    assert!(prost::Message::encoded_len(&task) <= 4 * 1024 * 1024);
    let sim = SimHost::new(
        host,
        keys::generate(),
        Arc::new(k.trust),
        clock,
        "550.54.15",
    )
    .with_ring(SimRing::Configured(2));
    let st = sim.submit_task(&task).unwrap();
    assert_eq!(st.state, pb::TaskState::Succeeded as i32);
}
