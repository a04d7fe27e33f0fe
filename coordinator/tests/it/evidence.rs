#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Evidence packets: a real packet verifies; any changed byte of it, of an
//! attestation inside it, or of the enrolled key makes verification fail
//! and say why. Then, as a compromised coordinator would try it: a packet
//! altered and RESEALED with a valid coordinator key (so its own signature
//! is fine) is INVALID, naming what is wrong — every verdict and version
//! `evidence verify` prints is proven by the signed tasks, attestations and
//! approvals inside it, not by the coordinator's word.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::SigningKey;
use prost::Message;
use ringfence::envelope::{self, APPROVAL_TYPE, BREAKGLASS_TYPE};
use ringfence::keys;
use ringfence::pb;
use ringfence::time::{Clock, SystemClock};
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};
use ringfence_coordinator::approvals::{self, ApprovalSet, RingScope};
use ringfence_coordinator::evidence::{self, EvidenceError, Packet, VerifyWith};
use ringfence_coordinator::store::WaveStore;
use ringfence_coordinator::wave::{self, Ctx, HostJob, Params, Signer};
use ringfence_devfleet::simhost::SimHost;

const OLD: &str = "550.54.15";
const NEW: &str = "560.35.03";

/// A real packet of one host run through a simulated agent, and every key
/// an attacker (or the test) needs to alter it.
struct Fx {
    packet: Packet,
    bytes: Vec<u8>,
    trust: TrustSet,
    enrolled: BTreeMap<String, keys::VerifyingKey>,
    coord: SigningKey,
    coord2: SigningKey,
    alice: SigningKey,
    bob: SigningKey,
    host_key: SigningKey,
    other_host_key: SigningKey,
    now: i64,
}

fn key(id: &str, k: &SigningKey, role: KeyRole) -> TrustedKey {
    TrustedKey {
        id: id.into(),
        key: k.verifying_key(),
        role,
    }
}

fn ring_approval(now: i64, ring: u32) -> pb::RingApproval {
    pb::RingApproval {
        wave_id: "w".into(),
        ring,
        profile: "nvidia-driver".into(),
        version: NEW.into(),
        rollback_version: String::new(),
        host_ids: vec!["gpu-1".into()],
        issued_at_unix_ms: now - 60_000,
        expires_at_unix_ms: now + 3_600_000,
        approver: "alice".into(),
        actions: vec![pb::ApprovedAction::Patch as i32],
    }
}

fn sign_approval(a: &pb::RingApproval, signers: &[(&str, &SigningKey)]) -> pb::Envelope {
    envelope::sign_message(APPROVAL_TYPE, a, signers)
}

/// The coordinator's view of `envs`: each verified for gpu-1's ring.
fn approval_set(envs: &[pb::Envelope], trust: &TrustSet, ring: u32, now: i64) -> ApprovalSet {
    let hosts = vec!["gpu-1".to_string()];
    let scope = RingScope {
        wave_id: "w",
        ring,
        profile: "nvidia-driver",
        version: NEW,
        hosts: &hosts,
    };
    let mut set = ApprovalSet::default();
    for env in envs {
        let covers = approvals::verify_ring(env, trust, &scope, now).unwrap();
        set.push(env.clone(), covers);
    }
    set
}

/// Run gpu-1 (ring `ring`) through a whole host run and seal its packet.
/// On a protected ring the run carries a real approval by alice and bob.
async fn fixture(ring: u32, faulty: bool) -> Fx {
    fixture_with(ring, faulty, false).await
}

/// As [`fixture`]; with `drill`, gpu-1 also runs the rollback drill and the
/// packet carries its rollback proof.
async fn fixture_with(ring: u32, faulty: bool, drill: bool) -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let (coord, coord2, alice, bob) = (
        keys::generate(),
        keys::generate(),
        keys::generate(),
        keys::generate(),
    );
    let trust = TrustSet::from_keys(
        vec![
            key("coord", &coord, KeyRole::Coordinator),
            key("coord2", &coord2, KeyRole::Coordinator),
            key("alice", &alice, KeyRole::Approver),
            key("bob", &bob, KeyRole::Approver),
        ],
        Policy::default(),
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now_ms();
    let ctx = Ctx {
        params: Arc::new(Params {
            wave_id: "w".into(),
            profile: "nvidia-driver".into(),
            version: NEW.into(),
            expect_driver_version: NEW.into(),
            expect_cuda_version: String::new(),
            task_lifetime_ms: 600_000,
            task_timeout_ms: 5_000,
            attestation_max_age_ms: 60_000,
            max_clock_skew_ms: 120_000,
            poll_interval: Duration::from_millis(5),
            rollback_on_failure: false,
            rollback_version: String::new(),
        }),
        signer: Arc::new(Signer {
            key_id: "coord".into(),
            key: coord.clone(),
        }),
        store: Arc::new(WaveStore::open(dir.path(), "w", &SystemClock).unwrap()),
        clock: clock.clone(),
        halt: Arc::new(AtomicBool::new(false)),
    };
    let host_key = keys::generate();
    let sim = SimHost::new(
        "gpu-1",
        host_key.clone(),
        Arc::new(trust.clone()),
        clock,
        OLD,
    );
    if faulty {
        sim.state().faulty_version = Some(NEW.into());
    }
    let approvals = if trust.policy.protected_rings.contains(&ring) {
        vec![sign_approval(
            &ring_approval(now, ring),
            &[("alice", &alice), ("bob", &bob)],
        )]
    } else {
        Vec::new()
    };
    let job = HostJob {
        host_id: "gpu-1".into(),
        ring,
        pool: "p".into(),
        key: sim.public_key(),
        expected_gpus: 0,
        approvals: Arc::new(approval_set(&approvals, &trust, ring, now)),
        drill,
    };
    let rec = wave::host::run(&ctx, &job, &sim).await.unwrap();
    let host = evidence::host_evidence(&rec);
    let packet = Packet {
        wave_id: "w".into(),
        ring,
        outcome: if faulty { "halted" } else { "completed" }.into(),
        halt_reason: None,
        profile: "nvidia-driver".into(),
        version: NEW.into(),
        expect_driver_version: NEW.into(),
        expect_cuda_version: String::new(),
        started_at_ms: host.started_at_ms,
        finished_at_ms: host.finished_at_ms,
        hosts: vec![host],
        approvals: approvals.iter().map(evidence::embed).collect(),
        break_glass: Vec::new(),
        rollback_proof: if drill {
            Some(evidence::rollback_proof(&rec).expect("the drill finished"))
        } else {
            None
        },
        soak_s: 0,
        coordinator_key_id: "coord".into(),
        previous: None,
    };
    let bytes = evidence::seal(&packet, "coord", &coord).unwrap();
    let other_host_key = keys::generate();
    let mut enrolled = BTreeMap::new();
    enrolled.insert("gpu-1".to_string(), sim.public_key());
    enrolled.insert("gpu-2".to_string(), other_host_key.verifying_key());
    Fx {
        packet,
        bytes,
        trust,
        enrolled,
        coord,
        coord2,
        alice,
        bob,
        host_key,
        other_host_key,
        now,
    }
}

async fn packet() -> (Vec<u8>, TrustSet, BTreeMap<String, keys::VerifyingKey>) {
    let fx = fixture(0, false).await;
    (fx.bytes, fx.trust, fx.enrolled)
}

impl Fx {
    /// Alter the packet and reseal it with the valid coordinator key it names.
    fn resealed(
        &self,
        alter: impl FnOnce(&mut Packet),
    ) -> Result<evidence::Verified, EvidenceError> {
        let mut p = self.packet.clone();
        alter(&mut p);
        let bytes = evidence::seal(&p, "coord", &self.coord).unwrap();
        evidence::verify(&bytes, &self.trust, &self.enrolled)
    }

    /// The attestation the host made for its Validate task, decoded.
    fn after(&self) -> pb::Attestation {
        let env = pb::Envelope::decode(
            B64.decode(&self.packet.hosts[0].attestations[1])
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        pb::Attestation::decode(env.payload.as_slice()).unwrap()
    }

    /// A task envelope recorded for gpu-1, by step.
    fn task(&self, step: &str) -> (usize, pb::Envelope, pb::TaskPayload) {
        let h = &self.packet.hosts[0];
        let i = h.tasks.iter().position(|t| t.0 == step).unwrap();
        let env =
            pb::Envelope::decode(B64.decode(&h.task_envelopes[i]).unwrap().as_slice()).unwrap();
        let p = pb::TaskPayload::decode(env.payload.as_slice()).unwrap();
        (i, env, p)
    }
}

fn embed_att(att: &pb::Attestation, key: &SigningKey) -> String {
    evidence::embed(&ringfence::attest::sign(att, &att.host_id, key))
}

#[tokio::test]
async fn a_real_packet_verifies_with_both_attestations() {
    let (bytes, trust, enrolled) = packet().await;
    let v = evidence::verify(&bytes, &trust, &enrolled).unwrap();
    assert_eq!(v.signed_by, "coord");
    assert_eq!(v.attestations_checked, 2);
    assert_eq!(v.packet.hosts[0].driver_after, NEW);
    assert_eq!(v.packet.hosts[0].driver_before, OLD);
}

#[tokio::test]
async fn a_real_protected_ring_packet_verifies_and_what_it_prints_comes_from_the_attestations() {
    let fx = fixture(2, false).await;
    let v = evidence::verify(&fx.bytes, &fx.trust, &fx.enrolled).unwrap();
    assert_eq!(v.tasks_checked, 4, "drain, patch, validate, undrain");
    assert_eq!(v.approvals_checked, 1);
    assert_eq!(v.approvers, vec!["alice".to_string(), "bob".to_string()]);
    let h = &v.hosts[0];
    let before = h.before.as_ref().unwrap();
    let after = h.after.as_ref().unwrap();
    assert_eq!(
        (before.verdict.as_str(), before.driver_version.as_str()),
        ("HEALTHY", OLD)
    );
    assert_eq!(
        (after.verdict.as_str(), after.driver_version.as_str()),
        ("HEALTHY", NEW)
    );
    assert!(before.task_id.is_none());
    assert_eq!(
        after.task_id.as_deref(),
        Some(fx.task("validate").2.task_id.as_str())
    );
    // The file on disk is standard DSSE JSON.
    let json: serde_json::Value = serde_json::from_slice(&fx.bytes).unwrap();
    assert_eq!(json["payloadType"], envelope::EVIDENCE_TYPE);
    assert_eq!(json["signatures"][0]["keyid"], "coord");
    assert!(json.get("payload_type").is_none(), "{json}");
    assert!(json["signatures"][0].get("key_id").is_none(), "{json}");
}

#[tokio::test]
async fn a_packet_written_with_the_old_field_names_still_reads() {
    let fx = fixture(2, false).await;
    let old = String::from_utf8(fx.bytes.clone())
        .unwrap()
        .replace("\"payloadType\"", "\"payload_type\"")
        .replace("\"keyid\"", "\"key_id\"");
    assert!(old.contains("\"payload_type\""));
    let v = evidence::verify(old.as_bytes(), &fx.trust, &fx.enrolled).unwrap();
    assert_eq!(v.signed_by, "coord");
}

#[tokio::test]
async fn any_changed_payload_byte_fails_the_packet_signature() {
    let (bytes, trust, enrolled) = packet().await;
    let file: evidence::PacketFile = serde_json::from_slice(&bytes).unwrap();
    let payload = B64.decode(&file.payload).unwrap();
    for i in (0..payload.len()).step_by(97) {
        let mut p = payload.clone();
        p[i] ^= 0x01;
        let mut f = file.clone();
        f.payload = B64.encode(&p);
        let err =
            evidence::verify(&serde_json::to_vec(&f).unwrap(), &trust, &enrolled).unwrap_err();
        assert!(
            matches!(err, EvidenceError::PacketSignature(_)),
            "byte {i}: {err}"
        );
    }
}

#[tokio::test]
async fn a_changed_attestation_inside_a_resealed_packet_is_caught() {
    let fx = fixture(0, false).await;
    // Flip one byte inside the embedded attestation, then re-sign the packet
    // with the coordinator key (as a compromised coordinator could).
    let err = fx
        .resealed(|p| {
            let mut att = B64.decode(&p.hosts[0].attestations[1]).unwrap();
            let n = att.len();
            att[n / 2] ^= 0x01;
            p.hosts[0].attestations[1] = B64.encode(&att);
        })
        .unwrap_err();
    assert!(
        matches!(err, EvidenceError::Attestation { index: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("gpu-1"), "{err}");
}

#[tokio::test]
async fn a_changed_inventory_key_fails_the_attestations() {
    let (bytes, trust, mut enrolled) = packet().await;
    enrolled.insert("gpu-1".into(), keys::generate().verifying_key());
    let err = evidence::verify(&bytes, &trust, &enrolled).unwrap_err();
    assert!(
        matches!(err, EvidenceError::Attestation { index: 0, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_packet_signed_by_an_unknown_key_fails() {
    let (bytes, _trust, enrolled) = packet().await;
    let other = TrustSet::from_keys(
        vec![TrustedKey {
            id: "coord".into(),
            key: keys::generate().verifying_key(),
            role: KeyRole::Coordinator,
        }],
        Policy::default(),
    );
    let err = evidence::verify(&bytes, &other, &enrolled).unwrap_err();
    assert!(matches!(err, EvidenceError::PacketSignature(_)), "{err}");
}

#[tokio::test]
async fn a_packet_not_signed_by_the_named_coordinator_key_is_invalid() {
    let fx = fixture(2, false).await;
    // Another valid coordinator key of the trust file, packet naming `coord`.
    let bytes = evidence::seal(&fx.packet, "coord2", &fx.coord2).unwrap();
    let err = evidence::verify(&bytes, &fx.trust, &fx.enrolled).unwrap_err();
    assert!(
        matches!(&err, EvidenceError::SignerNotNamed { signed_by, named, .. } if signed_by == "coord2" && named == "coord"),
        "{err}"
    );
    assert_eq!(err.check(), "signer");
    // The packet names coord2 too, but the settings name `coord`.
    let mut p = fx.packet.clone();
    p.coordinator_key_id = "coord2".into();
    let bytes = evidence::seal(&p, "coord2", &fx.coord2).unwrap();
    assert!(evidence::verify(&bytes, &fx.trust, &fx.enrolled).is_ok());
    let pinned = VerifyWith {
        trust: &fx.trust,
        enrolled: &fx.enrolled,
        coordinator_key_id: Some("coord"),
    };
    let err = evidence::verify_with(&bytes, &pinned).unwrap_err();
    assert!(
        matches!(&err, EvidenceError::SignerNotNamed { named_by, .. } if named_by.contains("settings")),
        "{err}"
    );
    // Valid keys of the wrong kind: an approver key, a host key.
    for (id, k, role) in [
        ("alice", &fx.alice, "approver"),
        ("gpu-1", &fx.host_key, "host attestation key"),
    ] {
        let bytes = evidence::seal(&fx.packet, id, k).unwrap();
        let err = evidence::verify(&bytes, &fx.trust, &fx.enrolled).unwrap_err();
        assert!(
            matches!(&err, EvidenceError::SignerRole { key, role: r } if key == id && r.contains(role)),
            "{id}: {err}"
        );
        assert_eq!(err.check(), "signer_role");
    }
}

#[tokio::test]
async fn an_altered_approval_scope_is_invalid() {
    let fx = fixture(2, false).await;
    let signers: &[(&str, &SigningKey)] = &[("alice", &fx.alice), ("bob", &fx.bob)];
    // A genuine approval by both approvers — for another wave.
    let other_wave = pb::RingApproval {
        wave_id: "other-wave".into(),
        ..ring_approval(fx.now, 2)
    };
    let err = fx
        .resealed(|p| p.approvals = vec![evidence::embed(&sign_approval(&other_wave, signers))])
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::ApprovalScope { field: "wave_id", approved, .. } if approved == "other-wave"),
        "{err}"
    );
    // For another version.
    let other_version = pb::RingApproval {
        version: "999.0".into(),
        ..ring_approval(fx.now, 2)
    };
    let err = fx
        .resealed(|p| p.approvals = vec![evidence::embed(&sign_approval(&other_version, signers))])
        .unwrap_err();
    assert!(
        matches!(
            &err,
            EvidenceError::ApprovalScope {
                field: "version",
                ..
            }
        ),
        "{err}"
    );
    // For other hosts.
    let other_hosts = pb::RingApproval {
        host_ids: vec!["gpu-2".into()],
        ..ring_approval(fx.now, 2)
    };
    let err = fx
        .resealed(|p| p.approvals = vec![evidence::embed(&sign_approval(&other_hosts, signers))])
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::ApprovalScope { field: "host_ids", expected, .. } if expected == "gpu-1"),
        "{err}"
    );
    assert_eq!(err.check(), "approval_scope");
    // No approval at all for a Patch on a protected ring.
    let err = fx.resealed(|p| p.approvals.clear()).unwrap_err();
    assert!(
        matches!(
            err,
            EvidenceError::ApprovalThreshold {
                have: 0,
                need: 2,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn an_approval_without_the_patch_action_is_invalid() {
    let fx = fixture(2, false).await;
    let force_only = pb::RingApproval {
        actions: vec![pb::ApprovedAction::ForceUndrain as i32],
        ..ring_approval(fx.now, 2)
    };
    let env = sign_approval(&force_only, &[("alice", &fx.alice), ("bob", &fx.bob)]);
    let err = fx
        .resealed(|p| p.approvals = vec![evidence::embed(&env)])
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::ApprovalAction { action: "APPROVED_ACTION_PATCH", task, .. } if task.ends_with("/patch")),
        "{err}"
    );
    assert_eq!(err.check(), "approval_action");
}

#[tokio::test]
async fn an_approval_signed_after_the_patch_was_issued_is_invalid() {
    let fx = fixture(2, false).await;
    let later = pb::RingApproval {
        issued_at_unix_ms: fx.now + 3_600_000,
        expires_at_unix_ms: fx.now + 7_200_000,
        ..ring_approval(fx.now, 2)
    };
    let env = sign_approval(&later, &[("alice", &fx.alice), ("bob", &fx.bob)]);
    let err = fx
        .resealed(|p| p.approvals = vec![evidence::embed(&env)])
        .unwrap_err();
    assert!(
        matches!(err, EvidenceError::ApprovalTime { index: 0, .. }),
        "{err}"
    );
    // Next to the approval that did authorise the patch (a ring re-approved
    // later, e.g. before a resume), the later one is no finding.
    let original = fx.packet.approvals[0].clone();
    fx.resealed(|p| p.approvals = vec![original, evidence::embed(&env)])
        .unwrap();
}

#[tokio::test]
async fn one_approver_key_twice_is_too_few_distinct_approvers() {
    let fx = fixture(2, false).await;
    let a = ring_approval(fx.now, 2);
    // Alice under two key ids, and alice's approval twice.
    let twice = sign_approval(&a, &[("alice", &fx.alice), ("alice-2", &fx.alice)]);
    let err = fx
        .resealed(|p| p.approvals = vec![evidence::embed(&twice)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvidenceError::ApprovalThreshold {
                have: 1,
                need: 2,
                ..
            }
        ),
        "{err}"
    );
    let one = evidence::embed(&sign_approval(&a, &[("alice", &fx.alice)]));
    let err = fx
        .resealed(|p| p.approvals = vec![one.clone(), one.clone()])
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvidenceError::ApprovalThreshold {
                have: 1,
                need: 2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.check(), "approval_threshold");
}

#[tokio::test]
async fn an_approval_living_longer_than_the_policy_allows_is_invalid() {
    let fx = fixture(2, false).await;
    // The same packet, checked against a policy whose approvals may live 10
    // minutes: the fixture's approvals (about an hour) authorised nothing.
    let mut policy = fx.trust.policy.clone();
    policy.max_approval_lifetime_s = 600;
    let strict = TrustSet::from_keys(fx.trust.keys().to_vec(), policy);
    let err = evidence::verify_with(
        &fx.bytes,
        &VerifyWith {
            trust: &strict,
            enrolled: &fx.enrolled,
            coordinator_key_id: None,
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            EvidenceError::ApprovalLifetime {
                cap_s: 600,
                lifetime_s: 3660,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.check(), "approval_lifetime");
    // Under the default policy the same packet is valid.
    evidence::verify_with(
        &fx.bytes,
        &VerifyWith {
            trust: &fx.trust,
            enrolled: &fx.enrolled,
            coordinator_key_id: None,
        },
    )
    .unwrap();
}

#[tokio::test]
async fn an_approval_signed_by_a_coordinator_key_is_invalid() {
    let fx = fixture(2, false).await;
    let env = sign_approval(
        &ring_approval(fx.now, 2),
        &[("alice", &fx.alice), ("coord2", &fx.coord2)],
    );
    let err = fx
        .resealed(|p| p.approvals = vec![evidence::embed(&env)])
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::ApprovalSigner { what: "approval", key, .. } if key == "coord2"),
        "{err}"
    );
    assert_eq!(err.check(), "approval_signer");
}

#[tokio::test]
async fn break_glass_is_checked_for_wave_signers_time_and_threshold() {
    let fx = fixture(2, false).await;
    let bg = pb::BreakGlass {
        wave_id: "w".into(),
        pool: "p".into(),
        max_out: 2,
        reason: "capacity".into(),
        issued_at_unix_ms: fx.now - 60_000,
        expires_at_unix_ms: fx.now + 3_600_000,
        approver: "alice".into(),
    };
    let sign = |b: &pb::BreakGlass, s: &[(&str, &SigningKey)]| {
        evidence::embed(&envelope::sign_message(BREAKGLASS_TYPE, b, s))
    };
    let both: &[(&str, &SigningKey)] = &[("alice", &fx.alice), ("bob", &fx.bob)];
    let good = sign(&bg, both);
    fx.resealed(|p| p.break_glass = vec![good.clone()]).unwrap();
    let other = pb::BreakGlass {
        wave_id: "other".into(),
        ..bg.clone()
    };
    let err = fx
        .resealed(|p| p.break_glass = vec![sign(&other, both)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvidenceError::ApprovalScope {
                what: "break-glass",
                field: "wave_id",
                ..
            }
        ),
        "{err}"
    );
    let expired = pb::BreakGlass {
        issued_at_unix_ms: fx.now - 7_200_000,
        expires_at_unix_ms: fx.now - 3_600_000,
        ..bg.clone()
    };
    let err = fx
        .resealed(|p| p.break_glass = vec![sign(&expired, both)])
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvidenceError::ApprovalTime {
                what: "break-glass",
                ..
            }
        ),
        "{err}"
    );
    let err = fx
        .resealed(|p| p.break_glass = vec![sign(&bg, &[("alice", &fx.alice), ("a2", &fx.alice)])])
        .unwrap_err();
    assert!(
        matches!(err, EvidenceError::ApprovalThreshold { have: 1, .. }),
        "{err}"
    );
    let err = fx
        .resealed(|p| {
            p.break_glass = vec![sign(&bg, &[("alice", &fx.alice), ("coord", &fx.coord)])]
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvidenceError::ApprovalSigner {
                what: "break-glass",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn an_attestation_by_the_wrong_host_key_is_invalid() {
    let fx = fixture(2, false).await;
    // The same content, signed by another enrolled host's key.
    let forged = embed_att(&fx.after(), &fx.other_host_key);
    let err = fx
        .resealed(|p| p.hosts[0].attestations[1] = forged)
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::Attestation { host, index: 1, .. } if host == "gpu-1"),
        "{err}"
    );
    assert_eq!(err.check(), "attestation_signature");
    // A genuine attestation of gpu-2 under gpu-1.
    let gpu2 = pb::Attestation {
        host_id: "gpu-2".into(),
        ..fx.after()
    };
    let err = fx
        .resealed(|p| p.hosts[0].attestations[1] = embed_att(&gpu2, &fx.other_host_key))
        .unwrap_err();
    assert!(
        matches!(err, EvidenceError::Attestation { index: 1, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn an_attestation_whose_nonce_is_not_the_validate_tasks_is_invalid() {
    let fx = fixture(2, false).await;
    // A genuine, healthy attestation the host gave for another nonce (any
    // Attest call), in place of the Validate task's.
    let other = pb::Attestation {
        nonce: ringfence::attest::new_nonce(),
        ..fx.after()
    };
    let err = fx
        .resealed(|p| p.hosts[0].attestations[1] = embed_att(&other, &fx.host_key))
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::AttestationNonce { host, index: 1 } if host == "gpu-1"),
        "{err}"
    );
    assert_eq!(err.check(), "attestation_nonce");
    // The before attestation offered as the validation.
    let err = fx
        .resealed(|p| p.hosts[0].attestations[1] = p.hosts[0].attestations[0].clone())
        .unwrap_err();
    assert!(
        matches!(err, EvidenceError::AttestationNonce { index: 1, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn an_attestation_outside_its_tasks_window_is_invalid() {
    let fx = fixture(2, false).await;
    let (_, _, validate) = fx.task("validate");
    // The Validate task's nonce, but signed two hours after the task expired.
    let late = pb::Attestation {
        issued_at_unix_ms: validate.expires_at_unix_ms + 7_200_000,
        ..fx.after()
    };
    let err = fx
        .resealed(|p| p.hosts[0].attestations[1] = embed_att(&late, &fx.host_key))
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::AttestationWindow { index: 1, window, .. } if window.contains(&validate.task_id)),
        "{err}"
    );
    assert_eq!(err.check(), "attestation_window");
    // A before attestation from long before the host's work in the wave.
    let before = pb::Envelope::decode(
        B64.decode(&fx.packet.hosts[0].attestations[0])
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let old = pb::Attestation {
        issued_at_unix_ms: fx.now - 86_400_000,
        ..pb::Attestation::decode(before.payload.as_slice()).unwrap()
    };
    let err = fx
        .resealed(|p| p.hosts[0].attestations[0] = embed_att(&old, &fx.host_key))
        .unwrap_err();
    assert!(
        matches!(err, EvidenceError::AttestationWindow { index: 0, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn an_unhealthy_validation_recorded_as_healthy_is_invalid() {
    // The host genuinely attested UNHEALTHY after the patch.
    let fx = fixture(2, true).await;
    let v = evidence::verify(&fx.bytes, &fx.trust, &fx.enrolled).unwrap();
    assert_eq!(v.hosts[0].after.as_ref().unwrap().verdict, "UNHEALTHY");
    assert_eq!(fx.packet.hosts[0].phase, "failed");
    let err = fx
        .resealed(|p| p.hosts[0].verdict_after = "HEALTHY".into())
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::Recorded { field: "verdict_after", recorded, attested, .. } if recorded == "HEALTHY" && attested == "UNHEALTHY"),
        "{err}"
    );
    assert_eq!(err.check(), "recorded_field");
    // Recorded honestly as UNHEALTHY, but the host claimed done.
    let err = fx
        .resealed(|p| {
            p.hosts[0].phase = "done".into();
            p.hosts[0].failure = None;
        })
        .unwrap_err();
    assert!(matches!(err, EvidenceError::NotValidated { .. }), "{err}");
    assert!(err.to_string().contains("UNHEALTHY"), "{err}");
}

#[tokio::test]
async fn an_altered_driver_version_is_invalid() {
    let fx = fixture(2, false).await;
    for field in [
        "driver_after",
        "driver_before",
        "cuda_after",
        "verdict_before",
    ] {
        let err = fx
            .resealed(|p| {
                let h = &mut p.hosts[0];
                match field {
                    "driver_after" => h.driver_after = "999.99".into(),
                    "driver_before" => h.driver_before = NEW.into(),
                    "cuda_after" => h.cuda_after = "13.0".into(),
                    _ => h.verdict_before = "DEGRADED".into(),
                }
            })
            .unwrap_err();
        assert!(
            matches!(&err, EvidenceError::Recorded { field: f, .. } if *f == field),
            "{field}: {err}"
        );
    }
}

#[tokio::test]
async fn an_altered_or_missing_task_is_invalid() {
    let fx = fixture(2, false).await;
    // The patch task of another version, genuinely coordinator-signed.
    let (i, _, mut patch) = fx.task("patch");
    patch.action = Some(pb::task_payload::Action::Patch(pb::Patch {
        profile: "nvidia-driver".into(),
        version: "999.0".into(),
        rollback: false,
    }));
    let env = envelope::sign_message(envelope::TASK_TYPE, &patch, &[("coord", &fx.coord)]);
    let err = fx
        .resealed(|p| p.hosts[0].task_envelopes[i] = evidence::embed(&env))
        .unwrap_err();
    assert!(
        matches!(&err, EvidenceError::TaskScope { field: "version", signed, .. } if signed == "999.0"),
        "{err}"
    );
    // The Validate task recorded as the patch step.
    let (_, validate, _) = fx.task("validate");
    let err = fx
        .resealed(|p| p.hosts[0].task_envelopes[i] = evidence::embed(&validate))
        .unwrap_err();
    assert!(matches!(err, EvidenceError::TaskScope { .. }), "{err}");
    // A task signed by an approver key.
    let (_, _, drain) = fx.task("drain");
    let env = envelope::sign_message(envelope::TASK_TYPE, &drain, &[("alice", &fx.alice)]);
    let err = fx
        .resealed(|p| p.hosts[0].task_envelopes[0] = evidence::embed(&env))
        .unwrap_err();
    assert!(
        matches!(err, EvidenceError::TaskSignature { index: 0, .. }),
        "{err}"
    );
    // Signed tasks dropped (as in packets written before they were recorded).
    let err = fx
        .resealed(|p| p.hosts[0].task_envelopes.clear())
        .unwrap_err();
    assert!(
        matches!(
            err,
            EvidenceError::TasksNotRecorded {
                listed: 4,
                recorded: 0,
                ..
            }
        ),
        "{err}"
    );
}

/// The Python snippet of README's "Evidence packets", as written there.
fn readme_python_snippet() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let at = readme
        .find("<!-- dsse-python -->")
        .expect("README marks the DSSE snippet");
    let rest = &readme[at..];
    let start = rest.find("```python\n").expect("a python block") + "```python\n".len();
    let len = rest[start..].find("```").expect("the block ends");
    rest[start..start + len].to_string()
}

#[tokio::test]
async fn an_auditor_verifies_a_real_packet_with_python_cryptography_and_the_public_key_alone() {
    let have_python = std::process::Command::new("python3")
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_python {
        // Never a silent pass: only an explicit opt-out skips this check.
        assert!(
            std::env::var_os("RINGFENCE_SKIP_PYTHON_DSSE").is_some(),
            "this test runs README's DSSE snippet and needs python3 with the `cryptography` \
             package (Debian: python3-cryptography); set RINGFENCE_SKIP_PYTHON_DSSE=1 to skip it"
        );
        eprintln!("SKIPPED: python3 with `cryptography` is not installed");
        return;
    }
    let fx = fixture(2, false).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("verify_dsse.py");
    std::fs::write(&script, readme_python_snippet()).unwrap();
    let run = |bytes: &[u8], key: &SigningKey| {
        let packet = dir.path().join("ring-2.json");
        std::fs::write(&packet, bytes).unwrap();
        std::process::Command::new("python3")
            .arg(&script)
            .arg(&packet)
            .arg(keys::public_key_text(&key.verifying_key()))
            .output()
            .unwrap()
    };
    let o = run(&fx.bytes, &fx.coord);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("signature OK: w ring 2 completed"), "{out}");
    // Another coordinator key, a changed payload: refused.
    let o = run(&fx.bytes, &fx.coord2);
    assert!(!o.status.success());
    let mut file: serde_json::Value = serde_json::from_slice(&fx.bytes).unwrap();
    let mut packet = fx.packet.clone();
    packet.hosts[0].driver_after = "999.99".into();
    file["payload"] = B64.encode(serde_json::to_vec(&packet).unwrap()).into();
    let o = run(&serde_json::to_vec(&file).unwrap(), &fx.coord);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("INVALID"));
}

#[tokio::test]
async fn a_rollback_proof_is_derived_from_its_attestations() {
    let fx = fixture_with(0, false, true).await;
    let v = evidence::verify(&fx.bytes, &fx.trust, &fx.enrolled).unwrap();
    assert_eq!(v.rollback_versions, vec![NEW, OLD, NEW]);
    // The coordinator claims the drill went elsewhere.
    let err = fx
        .resealed(|p| {
            if let Some(r) = p.rollback_proof.as_mut() {
                r.versions[1] = "549.00.00".into();
            }
        })
        .unwrap_err();
    assert!(matches!(err, EvidenceError::RollbackProof { .. }), "{err}");
    assert!(err.to_string().contains("549.00.00"), "{err}");
    // An attestation of the host not bound to a drill task (the one before).
    let err = fx
        .resealed(|p| {
            let before = p.hosts[0].attestations[0].clone();
            if let Some(r) = p.rollback_proof.as_mut() {
                r.attestations[1] = before;
            }
        })
        .unwrap_err();
    assert!(matches!(err, EvidenceError::RollbackProof { .. }), "{err}");
    assert_eq!(err.check(), "rollback_proof");
}

/// `ringfence evidence verify` on a packet file, with a trust file and an
/// inventory written for the fixture's keys.
fn cli_verify(fx: &Fx, bytes: &[u8], extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let k = |k: &SigningKey| keys::public_key_text(&k.verifying_key());
    let trust = dir.path().join("trust.toml");
    std::fs::write(
        &trust,
        format!(
            "[[coordinator]]\nid = \"coord\"\nkey = \"{}\"\n[[coordinator]]\nid = \"coord2\"\nkey = \"{}\"\n\
             [[approver]]\nid = \"alice\"\nkey = \"{}\"\n[[approver]]\nid = \"bob\"\nkey = \"{}\"\n",
            k(&fx.coord),
            k(&fx.coord2),
            k(&fx.alice),
            k(&fx.bob)
        ),
    )
    .unwrap();
    let inv = dir.path().join("inventory.toml");
    std::fs::write(
        &inv,
        format!(
            "trust_domain = \"gpu.example.com\"\n[[pool]]\nname = \"p\"\n\
             [[host]]\nid = \"gpu-1\"\naddress = \"127.0.0.1:7443\"\npool = \"p\"\nring = {}\nattestation_key = \"{}\"\n",
            fx.packet.ring,
            k(&fx.host_key)
        ),
    )
    .unwrap();
    let packet = dir.path().join("ring.json");
    std::fs::write(&packet, bytes).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_ringfence"))
        .args(["evidence", "verify"])
        .arg(&packet)
        .arg("--inventory")
        .arg(&inv)
        .arg("--trust")
        .arg(&trust)
        .args(extra)
        .output()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

#[tokio::test]
async fn the_cli_prints_what_the_attestations_prove_and_names_the_failed_check() {
    let fx = fixture(2, true).await;
    let o = cli_verify(&fx, &fx.bytes, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("HEALTHY {OLD} → UNHEALTHY {NEW}")),
        "{}",
        text(&o)
    );
    // The coordinator's fields rewritten to a healthy host: refused, naming
    // the check and the field.
    let mut p = fx.packet.clone();
    p.hosts[0].verdict_after = "HEALTHY".into();
    p.hosts[0].phase = "done".into();
    p.hosts[0].failure = None;
    let forged = evidence::seal(&p, "coord", &fx.coord).unwrap();
    let o = cli_verify(&fx, &forged, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("INVALID [recorded_field]"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("verdict_after"), "{}", text(&o));
    assert!(!text(&o).contains("VALID,"), "{}", text(&o));
    // The signer pinned to another coordinator key.
    let o = cli_verify(&fx, &fx.bytes, &["--coordinator-key", "coord2"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("INVALID [signer]"), "{}", text(&o));
}

#[test]
fn approval_files_are_standard_dsse_json_and_the_old_names_still_read() {
    let alice = keys::generate();
    let env = sign_approval(&ring_approval(1, 2), &[("alice", &alice)]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring-2-alice.json");
    ringfence_coordinator::approvals::write_file(&path, &env).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["payloadType"], APPROVAL_TYPE, "{text}");
    assert_eq!(json["signatures"][0]["keyid"], "alice", "{text}");
    assert_eq!(
        ringfence_coordinator::approvals::read_file(&path).unwrap(),
        env
    );
    let old = text
        .replace("\"payloadType\"", "\"payload_type\"")
        .replace("\"keyid\"", "\"key_id\"");
    std::fs::write(&path, old).unwrap();
    assert_eq!(
        ringfence_coordinator::approvals::read_file(&path).unwrap(),
        env
    );
}
