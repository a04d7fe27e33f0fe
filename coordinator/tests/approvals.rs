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
