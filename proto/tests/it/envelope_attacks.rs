//! The envelope attack matrix (issue 2, "Must show"): every attack on a
//! signed task is refused by the agent-side verifier with its own
//! `TaskRejection` variant, and the gRPC status built from it names the
//! failed check. Property tests cover sign→verify round trips and single-bit
//! flips anywhere in what is signed.
//!
//! The agent under test is configured in the ring of the fixture's task
//! (`verify`), unless a test says otherwise (`verify_as`): issue 13's ring
//! cases configure it explicitly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use prost::Message;
use ringfence::config::Source;
use ringfence::envelope::{
    self, APPROVAL_TYPE, ATTESTATION_TYPE, ActionPolicy, AllowAll, MAX_APPROVALS,
    MAX_SEQUENCE_JUMP, MAX_SIGNATURES, MAX_TASK_PAYLOAD, MAX_TYPE_LEN, ReplayGuard, TASK_TYPE,
    TaskRejection, TaskVerifier, Verified, VerifiedTask,
};
use ringfence::keys;
use ringfence::pb;
use ringfence::pb::task_payload::Action;
use ringfence::status;
use ringfence::time::ManualClock;
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};

/// The agent's "now" in every test, ms since the Unix epoch.
const NOW: i64 = 1_800_000_000_000;
/// The agent under test.
const HOST: &str = "gpu-17";
const WAVE: &str = "wave-2026-11";
const PROFILE: &str = "nvidia-driver";
const VERSION: &str = "550.54.15";
const ROLLBACK_VERSION: &str = "535.161.08";
/// Default policy values (see `trust::Policy::default`), in ms.
const SKEW_MS: i64 = 120_000;
const CAP_MS: i64 = 3_600_000;

/// Deterministic keys, so a failure reproduces exactly.
fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn coord() -> SigningKey {
    key(1)
}
fn coord_b() -> SigningKey {
    key(2)
}
fn alice() -> SigningKey {
    key(3)
}
fn bob() -> SigningKey {
    key(4)
}
fn carol() -> SigningKey {
    key(5)
}
/// Listed under `[[revoked]]`.
fn old_coord() -> SigningKey {
    key(6)
}
/// In no list at all.
fn stranger() -> SigningKey {
    key(7)
}

fn pk(k: &SigningKey) -> String {
    keys::public_key_text(&k.verifying_key())
}

/// The fixture's trust file: two coordinators, three approvers, one revoked
/// key, default policy (rings 2-4 protected, threshold 2, 120 s skew, 1 h cap).
fn trust_text() -> String {
    format!(
        "[[coordinator]]\nid = \"coord\"\nkey = \"{}\"\n\n\
         [[coordinator]]\nid = \"coord-b\"\nkey = \"{}\"\n\n\
         [[approver]]\nid = \"alice\"\nkey = \"{}\"\n\n\
         [[approver]]\nid = \"bob\"\nkey = \"{}\"\n\n\
         [[approver]]\nid = \"carol\"\nkey = \"{}\"\n\n\
         [[revoked]]\nid = \"old-coord\"\nkey = \"{}\"\n",
        pk(&coord()),
        pk(&coord_b()),
        pk(&alice()),
        pk(&bob()),
        pk(&carol()),
        pk(&old_coord()),
    )
}

fn trust() -> TrustSet {
    TrustSet::from_source(&Source::from_text("trust.toml", trust_text())).unwrap()
}

/// An in-memory stand-in for the agent's durable task journal.
#[derive(Debug, Default)]
struct MemJournal {
    seen: HashMap<String, pb::TaskStatus>,
    high_water: u64,
    broken: Option<String>,
    created_at: Option<i64>,
}

impl ReplayGuard for MemJournal {
    fn recorded(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, String> {
        if let Some(reason) = &self.broken {
            return Err(reason.clone());
        }
        Ok(self.seen.get(task_id).cloned())
    }
    fn high_water(&self) -> Result<u64, String> {
        if let Some(reason) = &self.broken {
            return Err(reason.clone());
        }
        Ok(self.high_water)
    }
    fn created_at_ms(&self) -> Result<Option<i64>, String> {
        Ok(self.created_at)
    }
}

/// A local config that knows one patch profile.
#[derive(Debug)]
struct OneProfile(&'static str);

impl ActionPolicy for OneProfile {
    fn allow(&self, task: &pb::TaskPayload) -> Result<(), String> {
        match &task.action {
            Some(Action::Patch(p)) if p.profile != self.0 => {
                Err(format!("patch profile `{}` is not configured", p.profile))
            }
            _ => Ok(()),
        }
    }
}

/// The ring the signed task names (unverified; the fixture's agent is
/// configured in it). `None` when the payload does not decode.
fn claimed_ring(signed: &pb::SignedTask) -> Option<u32> {
    signed
        .task
        .as_ref()
        .and_then(|e| pb::TaskPayload::decode(e.payload.as_slice()).ok())
        .map(|t| t.ring)
}

fn verify_with(
    trust: &TrustSet,
    clock: &ManualClock,
    signed: &pb::SignedTask,
    journal: &MemJournal,
) -> Result<Verified, TaskRejection> {
    TaskVerifier {
        trust,
        host_id: HOST,
        ring: claimed_ring(signed),
        clock,
    }
    .verify(signed, journal, &AllowAll)
}

/// Verify with the agent configured in `ring` (`None`: no ring configured).
fn verify_as(ring: Option<u32>, signed: &pb::SignedTask) -> Result<Verified, TaskRejection> {
    verify_as_with(ring, signed, &MemJournal::default(), &AllowAll)
}

fn verify_as_with(
    ring: Option<u32>,
    signed: &pb::SignedTask,
    journal: &MemJournal,
    actions: &dyn ActionPolicy,
) -> Result<Verified, TaskRejection> {
    TaskVerifier {
        trust: &trust(),
        host_id: HOST,
        ring,
        clock: &ManualClock::at(NOW),
    }
    .verify(signed, journal, actions)
}

/// Verify against the fixture trust file, at NOW, with an empty journal.
fn verify(signed: &pb::SignedTask) -> Result<Verified, TaskRejection> {
    verify_with(
        &trust(),
        &ManualClock::at(NOW),
        signed,
        &MemJournal::default(),
    )
}

/// Assert a rejection by `check`, and that the gRPC status built from it
/// names that check in its message and metadata.
#[track_caller]
fn rejected(res: Result<Verified, TaskRejection>, check: &str) -> TaskRejection {
    let err = match res {
        Ok(v) => panic!("expected rejection by check `{check}`, got {v:?}"),
        Err(e) => e,
    };
    assert_eq!(err.check(), check, "wrong check for: {err}");
    let st = status::task_rejection(&err);
    assert_ne!(st.code(), tonic::Code::Ok);
    assert!(
        st.message().contains(&format!("check `{check}`")),
        "status message does not name the check: {}",
        st.message()
    );
    assert!(st.message().contains(&err.to_string()), "{}", st.message());
    assert_eq!(status::rejected_check(&st).as_deref(), Some(check));
    err
}

/// `rejected!(result, Pattern, "check")`: the variant and the check name.
macro_rules! rejected {
    ($res:expr, $pat:pat, $check:literal) => {{
        let err = rejected($res, $check);
        assert!(
            matches!(err, $pat),
            "expected {}, got {err:?}",
            stringify!($pat)
        );
        err
    }};
}

#[track_caller]
fn accepted(res: Result<Verified, TaskRejection>) -> VerifiedTask {
    match res {
        Ok(Verified::New(v)) => *v,
        other => panic!("expected a new verified task, got {other:?}"),
    }
}

fn patch(version: &str, rollback: bool) -> Action {
    Action::Patch(pb::Patch {
        profile: PROFILE.into(),
        version: version.into(),
        rollback,
    })
}

fn drain() -> Action {
    Action::Drain(pb::Drain {
        reason: "patch wave".into(),
    })
}

fn task(ring: u32, action: Action) -> pb::TaskPayload {
    pb::TaskPayload {
        task_id: format!("{WAVE}/{HOST}/5/x"),
        host_id: HOST.into(),
        wave_id: WAVE.into(),
        ring,
        sequence: 5,
        issued_at_unix_ms: NOW - 1_000,
        expires_at_unix_ms: NOW + 600_000,
        action: Some(action),
    }
}

/// An approval that covers `task(ring, patch(..))` on this host.
fn approval(ring: u32) -> pb::RingApproval {
    pb::RingApproval {
        wave_id: WAVE.into(),
        ring,
        profile: PROFILE.into(),
        version: VERSION.into(),
        rollback_version: ROLLBACK_VERSION.into(),
        host_ids: vec!["gpu-16".into(), HOST.into()],
        issued_at_unix_ms: NOW - 60_000,
        // Within the default approval lifetime cap (24 h).
        expires_at_unix_ms: NOW + 82_800_000,
        approver: "ops/alice".into(),
        actions: vec![
            pb::ApprovedAction::Patch as i32,
            pb::ApprovedAction::Rollback as i32,
        ],
    }
}

fn sign_task(t: &pb::TaskPayload) -> pb::Envelope {
    envelope::sign_message(TASK_TYPE, t, &[("coord", &coord())])
}

fn sign_approval(a: &pb::RingApproval, signers: &[(&str, &SigningKey)]) -> pb::Envelope {
    envelope::sign_message(APPROVAL_TYPE, a, signers)
}

fn signed(task: pb::Envelope, approvals: Vec<pb::Envelope>) -> pb::SignedTask {
    pb::SignedTask {
        task: Some(task),
        approvals,
    }
}

/// A protected-ring task with approvals by alice and bob covering its
/// action: accepted as is.
fn approved_patch(t: &pb::TaskPayload) -> pb::SignedTask {
    let mut a = approval(t.ring);
    a.actions = envelope::approved_action(t)
        .map(|x| vec![x as i32])
        .unwrap_or_default();
    signed(
        sign_task(t),
        vec![
            sign_approval(&a, &[("alice", &alice())]),
            sign_approval(&a, &[("bob", &bob())]),
        ],
    )
}

/// Deterministic pseudo-random bytes (xorshift64*), no extra crate needed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

// ---------------------------------------------------------------- baseline

#[test]
fn valid_task_is_accepted_and_decoded_from_the_signed_bytes() {
    let t = task(0, drain());
    let v = accepted(verify(&signed(sign_task(&t), vec![])));
    assert_eq!(v.payload, t);
    assert_eq!(v.coordinator, "coord");
    assert!(v.approvers.is_empty());
}

// ------------------------------------------------------ changed bytes (1, 2)

#[test]
fn every_changed_payload_byte_is_rejected() {
    let env = sign_task(&task(0, drain()));
    assert!(verify(&signed(env.clone(), vec![])).is_ok());
    for i in 0..env.payload.len() {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
            let mut bad = env.clone();
            bad.payload[i] ^= mask;
            let err = rejected(verify(&signed(bad, vec![])), "signature");
            assert_eq!(
                err,
                TaskRejection::BadSignature {
                    index: 0,
                    on: "task".into(),
                    key_id: "coord".into()
                },
                "payload byte {i} mask {mask:#04x}"
            );
        }
    }
}

#[test]
fn every_changed_payload_type_byte_is_rejected() {
    let env = sign_task(&task(0, drain()));
    let type_bytes = TASK_TYPE.as_bytes();
    for i in 0..type_bytes.len() {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
            let mut changed = type_bytes.to_vec();
            changed[i] ^= mask;
            match String::from_utf8(changed.clone()) {
                Ok(t) => {
                    let mut bad = env.clone();
                    bad.payload_type = t;
                    rejected!(
                        verify(&signed(bad, vec![])),
                        TaskRejection::WrongPayloadType { .. },
                        "payload_type"
                    );
                }
                // Not UTF-8: the protobuf decoder refuses the envelope before
                // the verifier ever sees it.
                Err(_) => assert_invalid_utf8_type_is_undecodable(&changed, &env.payload),
            }
        }
    }
}

/// Wire-encode an Envelope whose payload_type field holds `type_bytes` and
/// check that decoding it fails (proto3 strings must be UTF-8).
#[track_caller]
fn assert_invalid_utf8_type_is_undecodable(type_bytes: &[u8], payload: &[u8]) {
    let mut wire = Vec::new();
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut wire);
    prost::encoding::encode_varint(type_bytes.len() as u64, &mut wire);
    wire.extend_from_slice(type_bytes);
    prost::encoding::encode_key(2, prost::encoding::WireType::LengthDelimited, &mut wire);
    prost::encoding::encode_varint(payload.len() as u64, &mut wire);
    wire.extend_from_slice(payload);
    assert!(
        pb::Envelope::decode(wire.as_slice()).is_err(),
        "an envelope with a non-UTF-8 type decoded"
    );
}

#[test]
fn every_changed_signature_byte_is_rejected() {
    let env = sign_task(&task(0, drain()));
    assert_eq!(env.signatures[0].sig.len(), 64);
    for i in 0..64 {
        for mask in [0x01u8, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xff] {
            let mut bad = env.clone();
            bad.signatures[0].sig[i] ^= mask;
            rejected!(
                verify(&signed(bad, vec![])),
                TaskRejection::BadSignature { index: 0, .. },
                "signature"
            );
        }
    }
    // Truncated, extended and missing signatures.
    let mut short = env.clone();
    short.signatures[0].sig.pop();
    rejected!(
        verify(&signed(short, vec![])),
        TaskRejection::BadSignature { .. },
        "signature"
    );
    let mut long = env.clone();
    long.signatures[0].sig.push(0);
    rejected!(
        verify(&signed(long, vec![])),
        TaskRejection::BadSignature { .. },
        "signature"
    );
    let mut none = env;
    none.signatures.clear();
    rejected!(
        verify(&signed(none, vec![])),
        TaskRejection::Unsigned { .. },
        "signature"
    );
}

#[test]
fn payload_type_is_covered_by_the_signature() {
    // The coordinator signed these bytes as an approval; relabelled as a task
    // the signature no longer verifies, because the type is inside the PAE.
    let t = task(0, drain());
    let mut env = envelope::sign_message(APPROVAL_TYPE, &t, &[("coord", &coord())]);
    env.payload_type = TASK_TYPE.into();
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::BadSignature { index: 0, .. },
        "signature"
    );
}

#[test]
fn attestation_or_approval_presented_as_task_is_wrong_payload_type() {
    // Even validly signed by a coordinator key.
    let att = pb::Attestation {
        host_id: HOST.into(),
        boot_id: "boot".into(),
        nonce: vec![7; 32],
        issued_at_unix_ms: NOW,
        ..Default::default()
    };
    let env = envelope::sign_message(ATTESTATION_TYPE, &att, &[("coord", &coord())]);
    let err = rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::WrongPayloadType { .. },
        "payload_type"
    );
    assert!(err.to_string().contains(ATTESTATION_TYPE), "{err}");

    // A task payload signed under the attestation type is still refused.
    let env = envelope::sign_message(ATTESTATION_TYPE, &task(0, drain()), &[("coord", &coord())]);
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::WrongPayloadType { .. },
        "payload_type"
    );

    let approval_env = sign_approval(&approval(2), &[("alice", &alice()), ("bob", &bob())]);
    let err = rejected!(
        verify(&signed(approval_env, vec![])),
        TaskRejection::WrongPayloadType { .. },
        "payload_type"
    );
    assert!(err.to_string().contains(APPROVAL_TYPE), "{err}");
}

// ------------------------------------------------------------- keys (2, 3)

#[test]
fn unknown_key_is_rejected() {
    let t = task(0, drain());
    let env = envelope::sign_message(TASK_TYPE, &t, &[("stranger", &stranger())]);
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::UnknownKey { index: 0, .. },
        "unknown_key"
    );
    // Claiming a trusted key's id does not help: the named key does not verify.
    let env = envelope::sign_message(TASK_TYPE, &t, &[("coord", &stranger())]);
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::BadSignature { index: 0, .. },
        "signature"
    );
    // One unknown signature beside a valid one still fails closed.
    let env = envelope::sign_message(
        TASK_TYPE,
        &t,
        &[("coord", &coord()), ("stranger", &stranger())],
    );
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::UnknownKey { index: 1, .. },
        "unknown_key"
    );
}

#[test]
fn approver_key_alone_cannot_sign_a_task() {
    let env = envelope::sign_message(TASK_TYPE, &task(0, drain()), &[("alice", &alice())]);
    let err = rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::NoCoordinatorSignature { .. },
        "coordinator_signature"
    );
    assert!(err.to_string().contains("alice"), "{err}");
}

#[test]
fn revoked_key_is_rejected_whatever_its_key_id_claims() {
    let t = task(0, drain());
    for hint in ["old-coord", "coord", "anything"] {
        let env = envelope::sign_message(TASK_TYPE, &t, &[(hint, &old_coord())]);
        let err = rejected!(
            verify(&signed(env, vec![])),
            TaskRejection::RevokedKey { .. },
            "revoked_key"
        );
        let TaskRejection::RevokedKey {
            key_id,
            fingerprint,
        } = err
        else {
            unreachable!()
        };
        assert_eq!(key_id, "old-coord");
        assert_eq!(fingerprint, keys::fingerprint(&old_coord().verifying_key()));
    }
    // Beside a valid coordinator signature.
    let env = envelope::sign_message(
        TASK_TYPE,
        &t,
        &[("coord", &coord()), ("old-coord", &old_coord())],
    );
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::RevokedKey { .. },
        "revoked_key"
    );
    // As an approver.
    let p = task(2, patch(VERSION, false));
    let st = signed(
        sign_task(&p),
        vec![
            sign_approval(&approval(2), &[("alice", &alice())]),
            sign_approval(&approval(2), &[("bob", &old_coord())]),
        ],
    );
    rejected!(verify(&st), TaskRejection::RevokedKey { .. }, "revoked_key");
}

#[test]
fn revoked_key_stays_rejected_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trust.toml");
    // The revoked key is still listed as a coordinator too (an operator forgot
    // to remove it) and `[[revoked]]` comes last: revocation still wins.
    let text = format!(
        "[[coordinator]]\nid = \"coord\"\nkey = \"{}\"\n\n\
         [[coordinator]]\nid = \"coord-2025\"\nkey = \"{}\"\n\n\
         [[revoked]]\nid = \"coord-2025-revoked\"\nkey = \"{}\"\n",
        pk(&coord()),
        pk(&old_coord()),
        pk(&old_coord()),
    );
    std::fs::write(&path, text).unwrap();
    let t = task(0, drain());
    let by_revoked = signed(
        envelope::sign_message(TASK_TYPE, &t, &[("coord-2025", &old_coord())]),
        vec![],
    );
    let by_valid = signed(sign_task(&t), vec![]);

    let check = |trust: &TrustSet| {
        let clock = ManualClock::at(NOW);
        let journal = MemJournal::default();
        rejected!(
            verify_with(trust, &clock, &by_revoked, &journal),
            TaskRejection::RevokedKey { .. },
            "revoked_key"
        );
        accepted(verify_with(trust, &clock, &by_valid, &journal));
    };
    let first = TrustSet::load(&path).unwrap();
    check(&first);
    drop(first);
    // A new process loads the same file from disk again.
    let second = TrustSet::load(&path).unwrap();
    let revoked: Vec<_> = second
        .keys()
        .iter()
        .filter(|k| k.role == KeyRole::Revoked)
        .collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].key, old_coord().verifying_key());
    check(&second);
}

/// The eight small-order points of edwards25519 (the libsodium blocklist,
/// canonical encodings).
const SMALL_ORDER: [&str; 8] = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
];

#[test]
fn small_order_key_in_trust_file_names_file_line_and_key() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    for (n, hex_key) in SMALL_ORDER.iter().enumerate() {
        let raw = hex::decode(hex_key).unwrap();
        let text = format!(
            "[[coordinator]]\nid = \"coord\"\nkey = \"{}\"\n\n[[approver]]\nid = \"weak\"\nkey = \"ed25519:{}\"\n",
            pk(&coord()),
            base64::engine::general_purpose::STANDARD.encode(&raw)
        );
        let path = dir.path().join(format!("trust-{n}.toml"));
        std::fs::write(&path, text).unwrap();
        let err = TrustSet::load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:7:", path.display())),
            "key {hex_key}: {err}"
        );
        assert!(err.contains("approver.key"), "key {hex_key}: {err}");
        assert!(err.contains("weak"), "key {hex_key}: {err}");
    }
}

#[test]
fn same_key_twice_in_trust_file_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trust.toml");
    let text = format!(
        "[[approver]]\nid = \"alice\"\nkey = \"{}\"\n\n[[approver]]\nid = \"alice-laptop\"\nkey = \"{}\"\n",
        pk(&alice()),
        pk(&alice())
    );
    std::fs::write(&path, text).unwrap();
    let err = TrustSet::load(&path).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:7:", path.display())), "{err}");
    assert!(err.contains("approver.key"), "{err}");
    assert!(err.contains("alice"), "{err}");
}

// -------------------------------------------------------- host and time (4)

#[test]
fn task_for_another_host_is_rejected() {
    let mut t = task(0, drain());
    t.host_id = "gpu-18".into();
    let err = rejected!(
        verify(&signed(sign_task(&t), vec![])),
        TaskRejection::WrongHost { .. },
        "host"
    );
    assert_eq!(
        err,
        TaskRejection::WrongHost {
            task_host: "gpu-18".into(),
            agent_host: HOST.into()
        }
    );
}

#[test]
fn expired_task_is_rejected_beyond_the_skew_only() {
    let t = task(0, drain());
    let st = signed(sign_task(&t), vec![]);
    let journal = MemJournal::default();
    let clock = ManualClock::at(t.expires_at_unix_ms + SKEW_MS);
    accepted(verify_with(&trust(), &clock, &st, &journal));
    clock.advance(1);
    rejected!(
        verify_with(&trust(), &clock, &st, &journal),
        TaskRejection::Expired { .. },
        "expired"
    );
    clock.advance(86_400_000);
    rejected!(
        verify_with(&trust(), &clock, &st, &journal),
        TaskRejection::Expired { .. },
        "expired"
    );
}

#[test]
fn task_from_the_future_is_accepted_within_the_skew_and_rejected_beyond() {
    for (ahead, ok) in [
        (0, true),
        (60_000, true),
        (SKEW_MS, true),
        (SKEW_MS + 1, false),
        (3_600_000, false),
    ] {
        let mut t = task(0, drain());
        t.issued_at_unix_ms = NOW + ahead;
        t.expires_at_unix_ms = NOW + ahead + 600_000;
        let res = verify(&signed(sign_task(&t), vec![]));
        if ok {
            accepted(res);
        } else {
            let err = rejected!(res, TaskRejection::NotYetValid { .. }, "not_yet_valid");
            assert!(err.to_string().contains("120 s"), "{err}");
        }
    }
}

#[test]
fn lifetime_over_the_cap_is_rejected_whatever_the_signer_claims() {
    let mut t = task(0, drain());
    t.issued_at_unix_ms = NOW - 1_000;
    t.expires_at_unix_ms = t.issued_at_unix_ms + CAP_MS;
    accepted(verify(&signed(sign_task(&t), vec![])));

    t.expires_at_unix_ms += 1;
    rejected!(
        verify(&signed(sign_task(&t), vec![])),
        TaskRejection::LifetimeTooLong { cap_s: 3600, .. },
        "lifetime"
    );
    t.expires_at_unix_ms = i64::MAX;
    rejected!(
        verify(&signed(sign_task(&t), vec![])),
        TaskRejection::LifetimeTooLong { .. },
        "lifetime"
    );
    // Expiring before it was issued is no valid lifetime either.
    t.issued_at_unix_ms = NOW;
    t.expires_at_unix_ms = NOW - 1;
    rejected!(
        verify(&signed(sign_task(&t), vec![])),
        TaskRejection::LifetimeTooLong { .. },
        "lifetime"
    );
}

// ---------------------------------------------------- replay, sequence (5)

fn recorded_status(t: &pb::TaskPayload) -> pb::TaskStatus {
    pb::TaskStatus {
        task_id: t.task_id.clone(),
        host_id: t.host_id.clone(),
        wave_id: t.wave_id.clone(),
        sequence: t.sequence,
        action: "drain".into(),
        state: pb::TaskState::Succeeded as i32,
        step: "done".into(),
        message: "drained".into(),
        exit_code: -1,
        accepted_at_unix_ms: NOW - 500,
        updated_at_unix_ms: NOW - 100,
        ..Default::default()
    }
}

#[test]
fn replayed_task_id_returns_the_recorded_outcome() {
    let t = task(0, drain());
    let st = signed(sign_task(&t), vec![]);
    let recorded = recorded_status(&t);
    let mut journal = MemJournal {
        high_water: t.sequence,
        ..Default::default()
    };
    journal.seen.insert(t.task_id.clone(), recorded.clone());
    let res = verify_with(&trust(), &ManualClock::at(NOW), &st, &journal).unwrap();
    assert_eq!(res, Verified::Replay(Box::new(recorded.clone())));

    // Later tasks raised the high-water mark: the retry still gets its
    // recorded outcome, not a sequence error, and never a New task.
    journal.high_water = t.sequence + 10;
    let res = verify_with(&trust(), &ManualClock::at(NOW), &st, &journal).unwrap();
    assert_eq!(res, Verified::Replay(Box::new(recorded.clone())));

    // Another payload reusing a recorded id does not run either.
    let mut other = t.clone();
    other.action = Some(patch(VERSION, false));
    other.sequence = t.sequence + 100;
    let res = verify_with(
        &trust(),
        &ManualClock::at(NOW),
        &signed(sign_task(&other), vec![]),
        &journal,
    )
    .unwrap();
    assert_eq!(res, Verified::Replay(Box::new(recorded)));
}

#[test]
fn sequence_at_or_below_the_high_water_mark_is_refused() {
    let journal = MemJournal {
        high_water: 5,
        ..Default::default()
    };
    let clock = ManualClock::at(NOW);
    for (seq, ok) in [
        (0, false),
        (4, false),
        (5, false),
        (6, true),
        (5 + MAX_SEQUENCE_JUMP, true),
    ] {
        let mut t = task(0, drain());
        t.sequence = seq;
        t.task_id = format!("{WAVE}/{HOST}/{seq}/drain");
        let res = verify_with(&trust(), &clock, &signed(sign_task(&t), vec![]), &journal);
        if ok {
            assert_eq!(accepted(res).payload.sequence, seq);
        } else {
            let err = rejected!(res, TaskRejection::SequenceNotIncreasing { .. }, "sequence");
            assert_eq!(
                err,
                TaskRejection::SequenceNotIncreasing {
                    sequence: seq,
                    high_water: 5
                }
            );
        }
    }
}

#[test]
fn unreadable_journal_fails_closed() {
    let journal = MemJournal {
        broken: Some("redb: disk I/O error".into()),
        ..Default::default()
    };
    let st = signed(sign_task(&task(0, drain())), vec![]);
    let err = rejected!(
        verify_with(&trust(), &ManualClock::at(NOW), &st, &journal),
        TaskRejection::Journal { .. },
        "journal"
    );
    assert!(err.to_string().contains("disk I/O error"), "{err}");
}

// ------------------------------------------------------------- action (6)

#[test]
fn action_not_in_local_config_is_refused() {
    let t = task(0, patch(VERSION, false));
    let st = signed(sign_task(&t), vec![]);
    let verifier = TaskVerifier {
        trust: &trust(),
        host_id: HOST,
        ring: Some(0),
        clock: &ManualClock::at(NOW),
    };
    let journal = MemJournal::default();
    accepted(verifier.verify(&st, &journal, &OneProfile(PROFILE)));
    let err = rejected!(
        verifier.verify(&st, &journal, &OneProfile("firmware")),
        TaskRejection::ActionRefused { .. },
        "action"
    );
    assert!(err.to_string().contains(PROFILE), "{err}");
}

// ------------------------------------------------ ring approvals (step 3)

#[test]
fn protected_ring_patch_without_approvals_is_refused() {
    let t = task(2, patch(VERSION, false));
    let err = rejected!(
        verify(&signed(sign_task(&t), vec![])),
        TaskRejection::ApprovalThreshold { .. },
        "approval_threshold"
    );
    assert_eq!(
        err,
        TaskRejection::ApprovalThreshold {
            ring: 2,
            have: 0,
            need: 2
        }
    );
}

#[test]
fn one_approval_is_below_the_threshold() {
    let t = task(2, patch(VERSION, false));
    let st = signed(
        sign_task(&t),
        vec![sign_approval(&approval(2), &[("alice", &alice())])],
    );
    rejected!(
        verify(&st),
        TaskRejection::ApprovalThreshold {
            ring: 2,
            have: 1,
            need: 2
        },
        "approval_threshold"
    );
}

#[test]
fn same_approver_key_twice_counts_once() {
    let t = task(2, patch(VERSION, false));
    // Two envelopes by the same key.
    let st = signed(
        sign_task(&t),
        vec![
            sign_approval(&approval(2), &[("alice", &alice())]),
            sign_approval(&approval(2), &[("alice", &alice())]),
        ],
    );
    rejected!(
        verify(&st),
        TaskRejection::ApprovalThreshold { have: 1, .. },
        "approval_threshold"
    );
    // Two signatures by the same key on one envelope.
    let st = signed(
        sign_task(&t),
        vec![sign_approval(
            &approval(2),
            &[("alice", &alice()), ("alice", &alice())],
        )],
    );
    rejected!(
        verify(&st),
        TaskRejection::ApprovalThreshold { have: 1, .. },
        "approval_threshold"
    );
    // The same key under another key id (a hint naming bob): still alice, once.
    let st = signed(
        sign_task(&t),
        vec![
            sign_approval(&approval(2), &[("alice", &alice())]),
            sign_approval(&approval(2), &[("bob", &alice())]),
        ],
    );
    rejected!(
        verify(&st),
        TaskRejection::ApprovalThreshold { have: 1, .. },
        "approval_threshold"
    );
}

#[test]
fn same_key_under_two_trusted_ids_counts_once() {
    // A trust file refuses this (see same_key_twice_in_trust_file_is_refused_at_load);
    // a trust set built in code must still count key bytes, not ids.
    let approver = |id: &str, k: &SigningKey| TrustedKey {
        id: id.into(),
        key: k.verifying_key(),
        role: KeyRole::Approver,
    };
    let trust = TrustSet::from_keys(
        vec![
            TrustedKey {
                id: "coord".into(),
                key: coord().verifying_key(),
                role: KeyRole::Coordinator,
            },
            approver("alice", &alice()),
            approver("alice-laptop", &alice()),
            approver("bob", &bob()),
        ],
        Policy::default(),
    );
    let t = task(2, patch(VERSION, false));
    let st = signed(
        sign_task(&t),
        vec![
            sign_approval(&approval(2), &[("alice", &alice())]),
            sign_approval(&approval(2), &[("alice-laptop", &alice())]),
        ],
    );
    let clock = ManualClock::at(NOW);
    let journal = MemJournal::default();
    rejected!(
        verify_with(&trust, &clock, &st, &journal),
        TaskRejection::ApprovalThreshold { have: 1, .. },
        "approval_threshold"
    );
    // A genuinely second key reaches the threshold.
    let st = signed(
        sign_task(&t),
        vec![
            sign_approval(&approval(2), &[("alice-laptop", &alice())]),
            sign_approval(&approval(2), &[("bob", &bob())]),
        ],
    );
    let v = accepted(verify_with(&trust, &clock, &st, &journal));
    assert_eq!(v.approvers, vec!["alice-laptop", "bob"]);
}

#[test]
fn coordinator_key_never_counts_as_approver() {
    let t = task(2, patch(VERSION, false));
    for (hint, k, want_id) in [
        ("coord", coord(), "coord"),
        ("coord-b", coord_b(), "coord-b"),
        // Hiding behind an approver's id does not launder it.
        ("bob", coord(), "coord"),
    ] {
        let st = signed(
            sign_task(&t),
            vec![
                sign_approval(&approval(2), &[("alice", &alice())]),
                sign_approval(&approval(2), &[(hint, &k)]),
            ],
        );
        let err = rejected!(
            verify(&st),
            TaskRejection::CoordinatorKeyAsApprover { index: 1, .. },
            "coordinator_as_approver"
        );
        assert_eq!(
            err,
            TaskRejection::CoordinatorKeyAsApprover {
                index: 1,
                key_id: want_id.into()
            }
        );
    }
    // A coordinator countersigning an otherwise valid approval.
    let st = signed(
        sign_task(&t),
        vec![sign_approval(
            &approval(2),
            &[("alice", &alice()), ("bob", &bob()), ("coord", &coord())],
        )],
    );
    rejected!(
        verify(&st),
        TaskRejection::CoordinatorKeyAsApprover { index: 0, .. },
        "coordinator_as_approver"
    );
}

#[test]
fn approval_for_another_scope_names_the_field() {
    let t = task(2, patch(VERSION, false));
    type Edit = fn(&mut pb::RingApproval);
    let cases: [(&str, Edit); 5] = [
        ("wave_id", |a| a.wave_id = "wave-other".into()),
        ("ring", |a| a.ring = 3),
        ("profile", |a| a.profile = "firmware".into()),
        ("version", |a| a.version = "560.28.03".into()),
        ("host_ids", |a| {
            a.host_ids = vec!["gpu-16".into(), "gpu-18".into()]
        }),
    ];
    for (field, edit) in cases {
        let mut a = approval(2);
        edit(&mut a);
        // Both approvers signed the out-of-scope approval.
        let st = signed(
            sign_task(&t),
            vec![sign_approval(&a, &[("alice", &alice()), ("bob", &bob())])],
        );
        let err = rejected!(
            verify(&st),
            TaskRejection::ApprovalScope { .. },
            "approval_scope"
        );
        let TaskRejection::ApprovalScope { field: got, .. } = &err else {
            unreachable!()
        };
        assert_eq!(*got, field);
        let msg = status::task_rejection(&err).message().to_string();
        assert!(msg.contains(field), "{msg}");
    }
}

#[test]
fn ring_3_patch_with_ring_2_approval_is_refused() {
    let t = task(3, patch(VERSION, false));
    let st = signed(
        sign_task(&t),
        vec![
            sign_approval(&approval(2), &[("alice", &alice())]),
            sign_approval(&approval(2), &[("bob", &bob())]),
        ],
    );
    let err = rejected!(
        verify(&st),
        TaskRejection::ApprovalScope { field: "ring", .. },
        "approval_scope"
    );
    assert!(
        err.to_string().contains("`2`") && err.to_string().contains("`3`"),
        "{err}"
    );
    // And the same approvals scoped to ring 3 are accepted.
    accepted(verify(&approved_patch(&t)));
}

#[test]
fn rollback_patch_is_checked_against_rollback_version() {
    // Approval: forward to VERSION, rollback to ROLLBACK_VERSION.
    let rollback = task(2, patch(ROLLBACK_VERSION, true));
    let v = accepted(verify(&approved_patch(&rollback)));
    assert_eq!(v.approvers, vec!["alice", "bob"]);

    // A "rollback" to the forward version is not what was approved.
    let bad = task(2, patch(VERSION, true));
    rejected!(
        verify(&approved_patch(&bad)),
        TaskRejection::ApprovalScope {
            field: "rollback_version",
            ..
        },
        "approval_scope"
    );
    // A forward patch to the rollback version is not approved either.
    let bad = task(2, patch(ROLLBACK_VERSION, false));
    rejected!(
        verify(&approved_patch(&bad)),
        TaskRejection::ApprovalScope {
            field: "version",
            ..
        },
        "approval_scope"
    );
    // An approval with no rollback_version approves no rollback at all, not
    // even one to an empty version.
    let mut a = approval(2);
    a.rollback_version.clear();
    let empty = task(2, patch("", true));
    let st = signed(
        sign_task(&empty),
        vec![sign_approval(&a, &[("alice", &alice()), ("bob", &bob())])],
    );
    rejected!(
        verify(&st),
        TaskRejection::ApprovalScope {
            field: "rollback_version",
            ..
        },
        "approval_scope"
    );
}

#[test]
fn expired_or_future_approval_is_refused() {
    let t = task(2, patch(VERSION, false));
    let mut expired = approval(2);
    expired.expires_at_unix_ms = NOW - SKEW_MS - 1;
    let mut future = approval(2);
    future.issued_at_unix_ms = NOW + SKEW_MS + 1;
    for a in [expired, future] {
        let st = signed(
            sign_task(&t),
            vec![
                sign_approval(&approval(2), &[("alice", &alice())]),
                sign_approval(&a, &[("bob", &bob())]),
            ],
        );
        rejected!(
            verify(&st),
            TaskRejection::ApprovalExpired { index: 1, .. },
            "approval_expired"
        );
    }
    // At the edge of the skew it still counts.
    let mut edge = approval(2);
    edge.expires_at_unix_ms = NOW - SKEW_MS;
    let st = signed(
        sign_task(&t),
        vec![sign_approval(
            &edge,
            &[("alice", &alice()), ("bob", &bob())],
        )],
    );
    accepted(verify(&st));
}

#[test]
fn two_distinct_approvers_are_accepted_and_credited() {
    let t = task(2, patch(VERSION, false));
    let v = accepted(verify(&approved_patch(&t)));
    assert_eq!(v.payload, t);
    assert_eq!(v.coordinator, "coord");
    assert_eq!(v.approvers, vec!["alice", "bob"]);

    // Both on one envelope, plus a third approver.
    let st = signed(
        sign_task(&t),
        vec![sign_approval(
            &approval(2),
            &[("bob", &bob()), ("alice", &alice()), ("carol", &carol())],
        )],
    );
    let v = accepted(verify(&st));
    assert_eq!(v.approvers, vec!["bob", "alice", "carol"]);
}

#[test]
fn unprotected_ring_patch_needs_no_approval() {
    for ring in [0, 1] {
        let v = accepted(verify(&signed(
            sign_task(&task(ring, patch(VERSION, false))),
            vec![],
        )));
        assert!(v.approvers.is_empty());
    }
    for ring in [2, 3, 4] {
        rejected!(
            verify(&signed(
                sign_task(&task(ring, patch(VERSION, false))),
                vec![]
            )),
            TaskRejection::ApprovalThreshold { have: 0, .. },
            "approval_threshold"
        );
    }
    // Non-patch actions on a protected ring need none either.
    accepted(verify(&signed(sign_task(&task(4, drain())), vec![])));
}

#[test]
fn forced_undrain_needs_approvals() {
    let undrain = |force| {
        Action::Undrain(pb::Undrain {
            reason: "back to service".into(),
            force,
        })
    };
    for ring in [0, 3] {
        accepted(verify(&signed(
            sign_task(&task(ring, undrain(false))),
            vec![],
        )));
        let forced = task(ring, undrain(true));
        rejected!(
            verify(&signed(sign_task(&forced), vec![])),
            TaskRejection::ApprovalThreshold { have: 0, .. },
            "approval_threshold"
        );
        let v = accepted(verify(&approved_patch(&forced)));
        assert_eq!(v.approvers, vec!["alice", "bob"]);
        // Approvals for another host do not cover it.
        let mut a = approval(ring);
        a.actions = vec![pb::ApprovedAction::ForceUndrain as i32];
        a.host_ids = vec!["gpu-18".into()];
        let st = signed(
            sign_task(&forced),
            vec![sign_approval(&a, &[("alice", &alice()), ("bob", &bob())])],
        );
        rejected!(
            verify(&st),
            TaskRejection::ApprovalScope {
                field: "host_ids",
                ..
            },
            "approval_scope"
        );
    }
}

#[test]
fn malformed_approvals_are_refused() {
    let t = task(2, patch(VERSION, false));
    let good = sign_approval(&approval(2), &[("alice", &alice())]);

    // An attestation offered as an approval.
    let att = envelope::sign_message(ATTESTATION_TYPE, &approval(2), &[("bob", &bob())]);
    rejected!(
        verify(&signed(sign_task(&t), vec![good.clone(), att])),
        TaskRejection::ApprovalWrongType { index: 1, .. },
        "approval_type"
    );
    // An unsigned approval.
    let mut unsigned = sign_approval(&approval(2), &[("bob", &bob())]);
    unsigned.signatures.clear();
    rejected!(
        verify(&signed(sign_task(&t), vec![good.clone(), unsigned])),
        TaskRejection::Unsigned { .. },
        "signature"
    );
    // An approval by a key nobody trusts.
    let unknown = sign_approval(&approval(2), &[("mallory", &stranger())]);
    rejected!(
        verify(&signed(sign_task(&t), vec![good.clone(), unknown])),
        TaskRejection::UnknownKey { .. },
        "unknown_key"
    );
    // A changed approval byte.
    let mut changed = sign_approval(&approval(2), &[("bob", &bob())]);
    changed.payload[3] ^= 0x20;
    rejected!(
        verify(&signed(sign_task(&t), vec![good.clone(), changed])),
        TaskRejection::BadSignature { .. },
        "signature"
    );
    // Validly signed bytes that are no RingApproval.
    let junk = envelope::sign(APPROVAL_TYPE, vec![0xff; 40], &[("bob", &bob())]);
    let err = rejected!(
        verify(&signed(sign_task(&t), vec![good, junk])),
        TaskRejection::Malformed { .. },
        "decode"
    );
    assert!(err.to_string().contains("approval 1"), "{err}");
}

// ------------------------------------------------- sizes and garbage (1)

#[test]
fn oversized_requests_are_refused() {
    let t = task(2, patch(VERSION, false));

    let big = envelope::sign(
        TASK_TYPE,
        vec![0; MAX_TASK_PAYLOAD + 1],
        &[("coord", &coord())],
    );
    rejected!(
        verify(&signed(big, vec![])),
        TaskRejection::Oversized {
            what: "task payload",
            ..
        },
        "size"
    );

    let mut long_type = sign_task(&t);
    long_type.payload_type = "x".repeat(MAX_TYPE_LEN + 1);
    rejected!(
        verify(&signed(long_type, vec![])),
        TaskRejection::Oversized {
            what: "payload type",
            ..
        },
        "size"
    );

    // A key id hint longer than the transport's size budget counts it
    // (tls::MAX_SIGNED_TASK_BYTES) is refused too.
    let mut long_key_id = sign_task(&t);
    long_key_id.signatures[0].key_id = "k".repeat(envelope::MAX_KEY_ID_LEN + 1);
    rejected!(
        verify(&signed(long_key_id, vec![])),
        TaskRejection::Oversized {
            what: "signature key id",
            ..
        },
        "size"
    );

    let coord_key = coord();
    let many: Vec<(&str, &SigningKey)> = vec![("coord", &coord_key); MAX_SIGNATURES + 1];
    let env = envelope::sign_message(TASK_TYPE, &t, &many);
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::Oversized {
            what: "signature count",
            ..
        },
        "size"
    );
    // At the limit, duplicates are merely redundant.
    let env = envelope::sign_message(TASK_TYPE, &task(0, drain()), &many[..MAX_SIGNATURES]);
    accepted(verify(&signed(env, vec![])));

    let one = sign_approval(&approval(2), &[("alice", &alice())]);
    rejected!(
        verify(&signed(sign_task(&t), vec![one; MAX_APPROVALS + 1])),
        TaskRejection::Oversized {
            what: "approval count",
            ..
        },
        "size"
    );

    let big_approval = envelope::sign(
        APPROVAL_TYPE,
        vec![0; envelope::MAX_APPROVAL_PAYLOAD + 1],
        &[("alice", &alice())],
    );
    rejected!(
        verify(&signed(sign_task(&t), vec![big_approval])),
        TaskRejection::Oversized {
            what: "approval payload",
            ..
        },
        "size"
    );
}

#[test]
fn missing_or_empty_task_is_malformed() {
    let err = rejected!(
        verify(&pb::SignedTask::default()),
        TaskRejection::Malformed { .. },
        "decode"
    );
    assert!(err.to_string().contains("no task envelope"), "{err}");

    // Validly signed but empty: no task id, no action.
    let env = envelope::sign(TASK_TYPE, Vec::new(), &[("coord", &coord())]);
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::Malformed { .. },
        "decode"
    );
    let mut no_action = task(0, drain());
    no_action.action = None;
    rejected!(
        verify(&signed(sign_task(&no_action), vec![])),
        TaskRejection::Malformed { .. },
        "decode"
    );
}

/// What the verifier must say about validly signed `bytes` as a task payload.
fn assert_garbage_payload_refused(bytes: Vec<u8>) {
    let decodes_to_task = pb::TaskPayload::decode(bytes.as_slice())
        .map(|p| !p.task_id.is_empty() && p.action.is_some())
        .unwrap_or(false);
    let res = verify(&signed(
        envelope::sign(TASK_TYPE, bytes, &[("coord", &coord())]),
        vec![],
    ));
    if decodes_to_task {
        // Astronomically unlikely; it would still be for no known host.
        assert!(res.is_err(), "{res:?}");
    } else {
        rejected!(res, TaskRejection::Malformed { .. }, "decode");
    }
}

#[test]
fn random_bytes_are_refused() {
    // Validly signed random payloads do not decode to a task.
    for seed in 1..=200u64 {
        let len = (seed as usize * 37) % 2048;
        assert_garbage_payload_refused(noise(seed, len));
    }
    // Random bytes as the signature.
    let t = task(0, drain());
    for seed in 1..=50u64 {
        let mut env = sign_task(&t);
        env.signatures[0].sig = noise(seed, 64);
        rejected!(
            verify(&signed(env.clone(), vec![])),
            TaskRejection::BadSignature { index: 0, .. },
            "signature"
        );
        env.signatures[0].key_id = "nobody".into();
        rejected!(
            verify(&signed(env.clone(), vec![])),
            TaskRejection::UnknownKey { index: 0, .. },
            "unknown_key"
        );
        // Random length too: not even a signature.
        env.signatures[0].sig = noise(seed, seed as usize % 200);
        if env.signatures[0].sig.len() != 64 {
            rejected!(
                verify(&signed(env, vec![])),
                TaskRejection::BadSignature { index: 0, .. },
                "signature"
            );
        }
    }
    // Random bytes as the whole request: either not a SignedTask at all, or
    // one the verifier refuses.
    for seed in 1..=200u64 {
        let wire = noise(seed, (seed as usize * 13) % 512);
        if let Ok(st) = pb::SignedTask::decode(wire.as_slice()) {
            assert!(verify(&st).is_err(), "seed {seed}");
        }
    }
}

// ------------------------------------------------------- key_id is a hint

/// `key_id` is deliberately outside the signature (DSSE puts it beside the
/// signed PAE): it is only a hint for which key to try first, and keys are
/// identified by their public key bytes. So a changed key_id is not expected
/// to be rejected; what must hold is that it never changes WHICH key is
/// credited, nor its role.
#[test]
fn changed_key_id_still_credits_the_real_signer() {
    let t = task(2, patch(VERSION, false));
    for hint in ["", "alice", "coord-b", "old-coord", "no-such-key"] {
        let mut st = approved_patch(&t);
        st.task.as_mut().unwrap().signatures[0].key_id = hint.into();
        let v = accepted(verify(&st));
        assert_eq!(v.coordinator, "coord", "hint `{hint}`");
        assert_eq!(v.approvers, vec!["alice", "bob"], "hint `{hint}`");
    }
    // Swapped approver hints: still alice then bob, by key bytes.
    let st = signed(
        sign_task(&t),
        vec![
            sign_approval(&approval(2), &[("bob", &alice())]),
            sign_approval(&approval(2), &[("alice", &bob())]),
        ],
    );
    assert_eq!(accepted(verify(&st)).approvers, vec!["alice", "bob"]);
    // An approver's signature claiming to be the coordinator neither signs
    // the task as coordinator nor is refused as one.
    let env = envelope::sign_message(TASK_TYPE, &t, &[("coord", &alice())]);
    rejected!(
        verify(&signed(env, vec![])),
        TaskRejection::NoCoordinatorSignature { .. },
        "coordinator_signature"
    );
    let st = signed(
        sign_task(&t),
        vec![
            sign_approval(&approval(2), &[("coord", &alice())]),
            sign_approval(&approval(2), &[("coord-b", &bob())]),
        ],
    );
    assert_eq!(accepted(verify(&st)).approvers, vec!["alice", "bob"]);
}

// ------------------------------------------------------------ properties

fn arb_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        ".{0,40}".prop_map(|reason| Action::Drain(pb::Drain { reason })),
        (".{0,20}", ".{1,20}", any::<bool>()).prop_map(|(profile, version, rollback)| {
            Action::Patch(pb::Patch {
                profile,
                version,
                rollback,
            })
        }),
        (
            ".{0,20}",
            ".{0,20}",
            prop::collection::vec(any::<u8>(), 16..=64),
            ".{0,20}"
        )
            .prop_map(|(driver, cuda, nonce, profile)| {
                Action::Validate(pb::Validate {
                    expect_driver_version: driver,
                    expect_cuda_version: cuda,
                    nonce,
                    profile,
                })
            }),
        (".{0,40}", any::<bool>())
            .prop_map(|(reason, force)| Action::Undrain(pb::Undrain { reason, force })),
        (
            prop::collection::vec(".{0,12}", 0..4),
            any::<i32>(),
            ".{0,20}",
            ".{0,40}"
        )
            .prop_map(|(codes, gpu_index, operator, reason)| {
                Action::AckFaults(pb::AckFaults {
                    codes,
                    gpu_index,
                    operator,
                    reason,
                })
            }),
    ]
}

/// Any task that is valid at NOW for its own host with an empty journal:
/// issued no later than NOW + skew, not expired beyond the skew, lifetime
/// within the cap.
fn arb_task() -> impl Strategy<Value = pb::TaskPayload> {
    let times = (-CAP_MS..=SKEW_MS).prop_flat_map(|issued| {
        let lo = issued.max(-SKEW_MS);
        (Just(issued), lo..=issued + CAP_MS)
    });
    (
        ".{1,60}",
        ".{0,40}",
        ".{0,40}",
        0u32..=4,
        1u64..=MAX_SEQUENCE_JUMP,
        times,
        arb_action(),
    )
        .prop_map(
            |(task_id, host_id, wave_id, ring, sequence, (issued, expires), action)| {
                pb::TaskPayload {
                    task_id,
                    host_id,
                    wave_id,
                    ring,
                    sequence,
                    issued_at_unix_ms: NOW + issued,
                    expires_at_unix_ms: NOW + expires,
                    action: Some(action),
                }
            },
        )
}

/// For an agent configured in the task's ring, with `AllowAll` (which takes
/// every AckFaults for one that touches an UNHEALTHY fault).
fn needs_approval(t: &pb::TaskPayload) -> bool {
    match &t.action {
        Some(Action::Patch(_) | Action::AckFaults(_)) => t.ring >= 2,
        Some(Action::Undrain(u)) => u.force,
        _ => false,
    }
}

/// The signed task, with approvals by alice and bob exactly covering it
/// where it needs them.
fn sign_with_approvals(t: &pb::TaskPayload) -> pb::SignedTask {
    let mut approvals = Vec::new();
    if needs_approval(t) {
        let mut a = pb::RingApproval {
            wave_id: t.wave_id.clone(),
            ring: t.ring,
            host_ids: vec![t.host_id.clone()],
            issued_at_unix_ms: NOW - 1_000,
            expires_at_unix_ms: NOW + 60_000,
            actions: envelope::approved_action(t)
                .map(|x| vec![x as i32])
                .unwrap_or_default(),
            ..Default::default()
        };
        if let Some(Action::Patch(p)) = &t.action {
            a.profile = p.profile.clone();
            if p.rollback {
                a.rollback_version = p.version.clone();
            } else {
                a.version = p.version.clone();
            }
        }
        approvals.push(sign_approval(&a, &[("alice", &alice())]));
        approvals.push(sign_approval(&a, &[("bob", &bob())]));
    }
    signed(sign_task(t), approvals)
}

fn verify_for_own_host(
    t: &pb::TaskPayload,
    st: &pb::SignedTask,
) -> Result<Verified, TaskRejection> {
    TaskVerifier {
        trust: &trust(),
        host_id: &t.host_id,
        ring: Some(t.ring),
        clock: &ManualClock::at(NOW),
    }
    .verify(st, &MemJournal::default(), &AllowAll)
}

/// Where a flipped bit landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Type,
    Payload,
    /// Signature number, on that envelope.
    Sig(usize),
}

/// The task envelope, then each approval envelope.
fn envelopes(st: &pb::SignedTask) -> impl Iterator<Item = &pb::Envelope> {
    st.task.iter().chain(st.approvals.iter())
}

/// Envelope index, part and offset within the part of byte `pos` of the
/// concatenation, over all envelopes, of payload_type ‖ payload ‖ signatures.
fn locate(st: &pb::SignedTask, mut pos: usize) -> (usize, Part, usize) {
    for (index, env) in envelopes(st).enumerate() {
        if pos < env.payload_type.len() {
            return (index, Part::Type, pos);
        }
        pos -= env.payload_type.len();
        if pos < env.payload.len() {
            return (index, Part::Payload, pos);
        }
        pos -= env.payload.len();
        for (n, sig) in env.signatures.iter().enumerate() {
            if pos < sig.sig.len() {
                return (index, Part::Sig(n), pos);
            }
            pos -= sig.sig.len();
        }
    }
    unreachable!("position past the signed bytes")
}

/// Flip bit `bit` of byte `pos` (see [`locate`]). Returns where it landed
/// and the changed request, or `None` for the request when the flip made a
/// payload type invalid UTF-8 (after checking that such an envelope does not
/// even decode).
fn flip(st: &pb::SignedTask, pos: usize, bit: u8) -> (usize, Part, Option<pb::SignedTask>) {
    let (index, part, offset) = locate(st, pos);
    let mask = 1u8 << bit;
    let mut out = st.clone();
    let env = if index == 0 {
        out.task.as_mut().unwrap()
    } else {
        &mut out.approvals[index - 1]
    };
    match part {
        Part::Type => {
            let mut bytes = env.payload_type.clone().into_bytes();
            bytes[offset] ^= mask;
            match String::from_utf8(bytes) {
                Ok(t) => env.payload_type = t,
                Err(e) => {
                    assert_invalid_utf8_type_is_undecodable(e.as_bytes(), &env.payload);
                    return (index, part, None);
                }
            }
        }
        Part::Payload => env.payload[offset] ^= mask,
        Part::Sig(n) => env.signatures[n].sig[offset] ^= mask,
    }
    (index, part, Some(out))
}

fn signed_len(st: &pb::SignedTask) -> usize {
    envelopes(st)
        .map(|e| {
            e.payload_type.len()
                + e.payload.len()
                + e.signatures.iter().map(|s| s.sig.len()).sum::<usize>()
        })
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn sign_verify_round_trips(t in arb_task()) {
        let st = sign_with_approvals(&t);
        let v = accepted(verify_for_own_host(&t, &st));
        prop_assert_eq!(&v.payload, &t);
        prop_assert_eq!(v.coordinator.as_str(), "coord");
        let want: Vec<String> = if needs_approval(&t) {
            vec!["alice".into(), "bob".into()]
        } else {
            Vec::new()
        };
        prop_assert_eq!(v.approvers, want);
    }

    #[test]
    fn any_single_bit_flip_is_rejected(
        t in arb_task(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let st = sign_with_approvals(&t);
        prop_assert!(verify_for_own_host(&t, &st).is_ok());
        let (index, part, changed) = flip(&st, at.index(signed_len(&st)), bit);
        let Some(changed) = changed else {
            // Invalid UTF-8 in a type: refused by the decoder (checked in flip).
            return Ok(());
        };
        let res = verify_for_own_host(&t, &changed);
        match (index, part) {
            (0, Part::Type) => {
                rejected!(res, TaskRejection::WrongPayloadType { .. }, "payload_type");
            }
            (_, Part::Type) => {
                rejected!(res, TaskRejection::ApprovalWrongType { .. }, "approval_type");
            }
            (_, Part::Payload | Part::Sig(_)) => {
                rejected!(res, TaskRejection::BadSignature { .. }, "signature");
            }
        }
    }

    #[test]
    fn any_key_id_credits_the_same_key(t in arb_task(), hint in ".{0,30}") {
        let mut st = sign_with_approvals(&t);
        st.task.as_mut().unwrap().signatures[0].key_id = hint;
        let v = accepted(verify_for_own_host(&t, &st));
        prop_assert_eq!(v.coordinator.as_str(), "coord");
    }

    #[test]
    fn validly_signed_random_payloads_are_malformed(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        assert_garbage_payload_refused(bytes);
    }
}

// ------------------------------------- issue 13: the agent's ring (step 3)

/// A coordinator-only `Patch{ring: 0}` to an agent configured in ring 3 is
/// refused by `ring`: the coordinator cannot move a host out of its
/// protected ring by saying so. Any action, with or without approvals.
#[test]
fn task_for_another_ring_than_the_agents_is_refused() {
    let t = task(0, patch(VERSION, false));
    let err = rejected!(
        verify_as(Some(3), &signed(sign_task(&t), vec![])),
        TaskRejection::WrongRing {
            task_ring: 0,
            agent_ring: Some(3)
        },
        "ring"
    );
    assert!(err.to_string().contains("configured in ring 3"), "{err}");
    assert_eq!(
        status::task_rejection(&err).code(),
        tonic::Code::PermissionDenied
    );
    // Even fully approved for ring 0, and for a harmless drain.
    rejected!(
        verify_as(Some(3), &approved_patch(&t)),
        TaskRejection::WrongRing { .. },
        "ring"
    );
    rejected!(
        verify_as(Some(3), &signed(sign_task(&task(2, drain())), vec![])),
        TaskRejection::WrongRing { .. },
        "ring"
    );
    // Its own ring: approvals decide.
    let own = task(3, patch(VERSION, false));
    rejected!(
        verify_as(Some(3), &signed(sign_task(&own), vec![])),
        TaskRejection::ApprovalThreshold { .. },
        "approval_threshold"
    );
    accepted(verify_as(Some(3), &approved_patch(&own)));
}

/// An agent with no ring configured accepts any ring 0-4 but is protected:
/// the same coordinator-only `Patch{ring: 0}` needs approvals, as do a
/// rollback and an AckFaults (a drain does not).
#[test]
fn an_agent_without_a_ring_is_protected() {
    for ring in 0..=4 {
        for action in [patch(VERSION, false), patch(ROLLBACK_VERSION, true)] {
            let t = task(ring, action);
            rejected!(
                verify_as(None, &signed(sign_task(&t), vec![])),
                TaskRejection::ApprovalThreshold { have: 0, .. },
                "approval_threshold"
            );
            let v = accepted(verify_as(None, &approved_patch(&t)));
            assert_eq!(v.approvers, vec!["alice", "bob"]);
        }
        accepted(verify_as(
            None,
            &signed(sign_task(&task(ring, drain())), vec![]),
        ));
    }
    // Configured in ring 0 (unprotected), the same patch needs none.
    accepted(verify_as(
        Some(0),
        &signed(sign_task(&task(0, patch(VERSION, false))), vec![]),
    ));
}

/// Rings above 4 are refused everywhere, with or without a configured ring
/// (before, `ring: 7` skipped approvals).
#[test]
fn ring_7_is_refused_everywhere() {
    let t = task(7, patch(VERSION, false));
    for agent in [None, Some(0), Some(3)] {
        let err = rejected!(
            verify_as(agent, &signed(sign_task(&t), vec![])),
            TaskRejection::WrongRing { task_ring: 7, .. },
            "ring"
        );
        assert!(err.to_string().contains("rings are 0-4"), "{err}");
    }
    rejected!(
        verify_as(Some(7), &signed(sign_task(&t), vec![])),
        TaskRejection::WrongRing { .. },
        "ring"
    );
}

// ------------------------------- issue 13: approvals bind to an action

#[test]
fn approval_without_the_tasks_action_is_refused() {
    let t = task(2, patch(VERSION, false));
    // No actions at all: covers nothing.
    let mut none = approval(2);
    none.actions.clear();
    // Every other action, but not PATCH.
    let mut others = approval(2);
    others.actions = vec![
        pb::ApprovedAction::Rollback as i32,
        pb::ApprovedAction::ForceUndrain as i32,
        pb::ApprovedAction::AckFaults as i32,
        pb::ApprovedAction::Unspecified as i32,
    ];
    for a in [none, others] {
        let st = signed(
            sign_task(&t),
            vec![sign_approval(&a, &[("alice", &alice()), ("bob", &bob())])],
        );
        let err = rejected!(
            verify(&st),
            TaskRejection::ApprovalScope {
                field: "actions",
                ..
            },
            "approval_scope"
        );
        assert!(err.to_string().contains("APPROVED_ACTION_PATCH"), "{err}");
    }
    // A rollback needs ROLLBACK, not PATCH.
    let mut patch_only = approval(2);
    patch_only.actions = vec![pb::ApprovedAction::Patch as i32];
    let rb = task(2, patch(ROLLBACK_VERSION, true));
    let st = signed(
        sign_task(&rb),
        vec![sign_approval(
            &patch_only,
            &[("alice", &alice()), ("bob", &bob())],
        )],
    );
    rejected!(
        verify(&st),
        TaskRejection::ApprovalScope {
            field: "actions",
            ..
        },
        "approval_scope"
    );
}

/// A patch approval does not authorise a forced undrain of the same host.
#[test]
fn patch_approval_used_for_a_forced_undrain_is_refused() {
    let forced = task(
        2,
        Action::Undrain(pb::Undrain {
            reason: "trust me".into(),
            force: true,
        }),
    );
    let st = signed(
        sign_task(&forced),
        vec![sign_approval(
            &approval(2),
            &[("alice", &alice()), ("bob", &bob())],
        )],
    );
    let err = rejected!(
        verify(&st),
        TaskRejection::ApprovalScope {
            field: "actions",
            ..
        },
        "approval_scope"
    );
    assert!(err.to_string().contains("FORCE_UNDRAIN"), "{err}");
}

/// Decides whether an AckFaults touches an UNHEALTHY fault.
struct Health {
    unhealthy: bool,
}

impl ActionPolicy for Health {
    fn allow(&self, _task: &pb::TaskPayload) -> Result<(), String> {
        Ok(())
    }
    fn acks_unhealthy(&self, _ack: &pb::AckFaults) -> Result<bool, String> {
        Ok(self.unhealthy)
    }
}

/// An AckFaults of an UNHEALTHY fault on a protected ring needs approvals
/// covering ACK_FAULTS; of DEGRADED faults only, or on an unprotected ring,
/// none.
#[test]
fn unhealthy_ack_on_a_protected_ring_needs_ack_approvals() {
    let ack = Action::AckFaults(pb::AckFaults {
        codes: vec![],
        gpu_index: -1,
        operator: String::new(),
        reason: "all of it".into(),
    });
    let journal = MemJournal::default();
    let sick = Health { unhealthy: true };
    let fine = Health { unhealthy: false };
    let t = task(3, ack.clone());
    let bare = signed(sign_task(&t), vec![]);
    for agent in [Some(3), None] {
        rejected!(
            verify_as_with(agent, &bare, &journal, &sick),
            TaskRejection::ApprovalThreshold { have: 0, .. },
            "approval_threshold"
        );
        accepted(verify_as_with(agent, &bare, &journal, &fine));
        // A patch approval does not cover it; an ACK_FAULTS one does.
        let st = signed(
            sign_task(&t),
            vec![sign_approval(
                &approval(3),
                &[("alice", &alice()), ("bob", &bob())],
            )],
        );
        rejected!(
            verify_as_with(agent, &st, &journal, &sick),
            TaskRejection::ApprovalScope {
                field: "actions",
                ..
            },
            "approval_scope"
        );
        let v = accepted(verify_as_with(agent, &approved_patch(&t), &journal, &sick));
        assert_eq!(v.approvers, vec!["alice", "bob"]);
    }
    let t0 = task(0, ack);
    accepted(verify_as_with(
        Some(0),
        &signed(sign_task(&t0), vec![]),
        &journal,
        &sick,
    ));
}

/// The trust policy caps an approval's lifetime, whatever its signers claim.
#[test]
fn over_long_approval_lifetime_is_refused() {
    let t = task(2, patch(VERSION, false));
    let mut long = approval(2);
    long.issued_at_unix_ms = NOW - 60_000;
    long.expires_at_unix_ms = long.issued_at_unix_ms + 86_400_000 + 1_000;
    let st = signed(
        sign_task(&t),
        vec![sign_approval(
            &long,
            &[("alice", &alice()), ("bob", &bob())],
        )],
    );
    let err = rejected!(
        verify(&st),
        TaskRejection::ApprovalLifetime {
            index: 0,
            cap_s: 86_400,
            ..
        },
        "approval_lifetime"
    );
    assert_eq!(
        status::task_rejection(&err).code(),
        tonic::Code::PermissionDenied
    );
    // At the cap it counts.
    long.expires_at_unix_ms = long.issued_at_unix_ms + 86_400_000;
    let st = signed(
        sign_task(&t),
        vec![sign_approval(
            &long,
            &[("alice", &alice()), ("bob", &bob())],
        )],
    );
    accepted(verify(&st));
    // A stricter policy refuses the fixture's 23 h approval.
    let text = format!("[policy]\nmax_approval_lifetime_s = 3600\n{}", trust_text());
    let strict = TrustSet::from_source(&Source::from_text("trust.toml", text)).unwrap();
    rejected!(
        verify_with(
            &strict,
            &ManualClock::at(NOW),
            &approved_patch(&t),
            &MemJournal::default()
        ),
        TaskRejection::ApprovalLifetime { cap_s: 3600, .. },
        "approval_lifetime"
    );
}

// ------------------------------ issue 13: sequence bound, journal creation

/// One signed task cannot lock the agent out for good by pushing the
/// high-water mark to the top.
#[test]
fn sequence_jump_above_the_bound_is_refused() {
    let journal = MemJournal {
        high_water: 5,
        ..Default::default()
    };
    let clock = ManualClock::at(NOW);
    for (seq, ok) in [
        (5 + MAX_SEQUENCE_JUMP, true),
        (6 + MAX_SEQUENCE_JUMP, false),
        (u64::MAX, false),
    ] {
        let mut t = task(0, drain());
        t.sequence = seq;
        let res = verify_with(&trust(), &clock, &signed(sign_task(&t), vec![]), &journal);
        if ok {
            accepted(res);
        } else {
            let err = rejected!(res, TaskRejection::SequenceJump { .. }, "sequence_jump");
            assert_eq!(
                err,
                TaskRejection::SequenceJump {
                    sequence: seq,
                    high_water: 5,
                    limit: MAX_SEQUENCE_JUMP
                }
            );
        }
    }
}

/// A task issued before the agent's journal was created (beyond the skew)
/// is refused: wiping the agent's state does not reopen replay.
#[test]
fn task_issued_before_the_journal_was_created_is_refused() {
    let journal = MemJournal {
        created_at: Some(NOW - 1_000),
        ..Default::default()
    };
    let clock = ManualClock::at(NOW);
    let mut t = task(0, drain());
    t.issued_at_unix_ms = NOW - 1_000 - SKEW_MS - 1;
    let err = rejected!(
        verify_with(&trust(), &clock, &signed(sign_task(&t), vec![]), &journal),
        TaskRejection::BeforeJournal { .. },
        "before_journal"
    );
    assert_eq!(
        status::task_rejection(&err).code(),
        tonic::Code::FailedPrecondition
    );
    t.issued_at_unix_ms = NOW - 1_000 - SKEW_MS;
    accepted(verify_with(
        &trust(),
        &clock,
        &signed(sign_task(&t), vec![]),
        &journal,
    ));
}

// --------------------- issue 13: cheap checks before approval signatures

/// Host, ring, time and sequence are checked before any approval signature
/// is verified: a task that fails them is refused by that check, however
/// many (here: forged) approvals it carries.
#[test]
fn cheap_checks_come_before_approval_signatures() {
    let mut forged = sign_approval(&approval(2), &[("alice", &alice())]);
    forged.signatures[0].sig[0] ^= 1;
    let approvals = vec![forged; MAX_APPROVALS];

    let mut other_host = task(2, patch(VERSION, false));
    other_host.host_id = "gpu-18".into();
    rejected!(
        verify(&signed(sign_task(&other_host), approvals.clone())),
        TaskRejection::WrongHost { .. },
        "host"
    );
    rejected!(
        verify_as(
            Some(3),
            &signed(
                sign_task(&task(2, patch(VERSION, false))),
                approvals.clone()
            )
        ),
        TaskRejection::WrongRing { .. },
        "ring"
    );
    let mut old = task(2, patch(VERSION, false));
    old.expires_at_unix_ms = NOW - SKEW_MS - 1;
    old.issued_at_unix_ms = old.expires_at_unix_ms - 1_000;
    rejected!(
        verify(&signed(sign_task(&old), approvals.clone())),
        TaskRejection::Expired { .. },
        "expired"
    );
    let journal = MemJournal {
        high_water: 9,
        ..Default::default()
    };
    rejected!(
        verify_with(
            &trust(),
            &ManualClock::at(NOW),
            &signed(
                sign_task(&task(2, patch(VERSION, false))),
                approvals.clone()
            ),
            &journal
        ),
        TaskRejection::SequenceNotIncreasing { .. },
        "sequence"
    );
    // Everything else right: the forged approval is what is refused.
    rejected!(
        verify(&signed(
            sign_task(&task(2, patch(VERSION, false))),
            approvals
        )),
        TaskRejection::BadSignature { .. },
        "signature"
    );
}
