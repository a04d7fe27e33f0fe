#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Evidence packets: a real packet verifies; any changed byte of it, of an
//! attestation inside it, or of the enrolled key makes verification fail
//! and say why.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use base64::Engine;
use ringfence::keys;
use ringfence::time::{Clock, SystemClock};
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};
use ringfence_coordinator::evidence::{self, EvidenceError, Packet};
use ringfence_coordinator::hostrun::{self, Ctx, HostJob, Params, Signer};
use ringfence_coordinator::simhost::SimHost;
use ringfence_coordinator::store::WaveStore;

async fn packet() -> (Vec<u8>, TrustSet, BTreeMap<String, keys::VerifyingKey>) {
    let dir = tempfile::tempdir().unwrap();
    let coord = keys::generate();
    let trust = TrustSet::from_keys(
        vec![TrustedKey {
            id: "coord".into(),
            key: coord.verifying_key(),
            role: KeyRole::Coordinator,
        }],
        Policy::default(),
    );
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ctx = Ctx {
        params: Arc::new(Params {
            wave_id: "w".into(),
            profile: "nvidia-driver".into(),
            version: "560.35.03".into(),
            expect_driver_version: "560.35.03".into(),
            expect_cuda_version: String::new(),
            task_lifetime_ms: 600_000,
            task_timeout_ms: 5_000,
            attestation_max_age_ms: 60_000,
            poll_interval: Duration::from_millis(5),
            rollback_on_failure: false,
            rollback_version: String::new(),
        }),
        signer: Arc::new(Signer {
            key_id: "coord".into(),
            key: coord.clone(),
        }),
        store: Arc::new(WaveStore::open(dir.path(), "w").unwrap()),
        clock: clock.clone(),
        halt: Arc::new(AtomicBool::new(false)),
    };
    let sim = SimHost::new(
        "gpu-1",
        keys::generate(),
        Arc::new(trust.clone()),
        clock,
        "550.54.15",
    );
    let job = HostJob {
        host_id: "gpu-1".into(),
        ring: 0,
        pool: "p".into(),
        key: sim.public_key(),
        approvals: Default::default(),
        drill: false,
    };
    let rec = hostrun::run(&ctx, &job, &sim).await.unwrap();
    let p = Packet {
        wave_id: "w".into(),
        ring: 0,
        outcome: "completed".into(),
        halt_reason: None,
        profile: "nvidia-driver".into(),
        version: "560.35.03".into(),
        expect_driver_version: "560.35.03".into(),
        expect_cuda_version: String::new(),
        hosts: vec![evidence::host_evidence(&rec)],
        approvals: Vec::new(),
        break_glass: Vec::new(),
        rollback_proof: None,
        started_at_ms: 1,
        finished_at_ms: 2,
        soak_s: 0,
        coordinator_key_id: "coord".into(),
    };
    let bytes = evidence::seal(&p, "coord", &coord).unwrap();
    let mut enrolled = BTreeMap::new();
    enrolled.insert("gpu-1".to_string(), sim.public_key());
    (bytes, trust, enrolled)
}

#[tokio::test]
async fn a_real_packet_verifies_with_both_attestations() {
    let (bytes, trust, enrolled) = packet().await;
    let v = evidence::verify(&bytes, &trust, &enrolled).unwrap();
    assert_eq!(v.signed_by, "coord");
    assert_eq!(v.attestations_checked, 2);
    assert_eq!(v.packet.hosts[0].driver_after, "560.35.03");
    assert_eq!(v.packet.hosts[0].driver_before, "550.54.15");
}

#[tokio::test]
async fn any_changed_payload_byte_fails_the_packet_signature() {
    let (bytes, trust, enrolled) = packet().await;
    let file: evidence::PacketFile = serde_json::from_slice(&bytes).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&file.payload)
        .unwrap();
    for i in (0..payload.len()).step_by(97) {
        let mut p = payload.clone();
        p[i] ^= 0x01;
        let mut f = file.clone();
        f.payload = base64::engine::general_purpose::STANDARD.encode(&p);
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
    let (bytes, trust, enrolled) = packet().await;
    let file: evidence::PacketFile = serde_json::from_slice(&bytes).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&file.payload)
        .unwrap();
    let mut p: Packet = serde_json::from_slice(&payload).unwrap();
    // Flip one byte inside the embedded attestation, then re-sign the packet
    // with a coordinator key (as a compromised coordinator could).
    let mut att = base64::engine::general_purpose::STANDARD
        .decode(&p.hosts[0].attestations[1])
        .unwrap();
    let n = att.len();
    att[n / 2] ^= 0x01;
    p.hosts[0].attestations[1] = base64::engine::general_purpose::STANDARD.encode(&att);
    let coord = keys::generate();
    let trust2 = TrustSet::from_keys(
        vec![TrustedKey {
            id: "coord".into(),
            key: coord.verifying_key(),
            role: KeyRole::Coordinator,
        }],
        trust.policy.clone(),
    );
    let resealed = evidence::seal(&p, "coord", &coord).unwrap();
    let err = evidence::verify(&resealed, &trust2, &enrolled).unwrap_err();
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
