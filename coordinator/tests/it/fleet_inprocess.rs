#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real agents in-process (real mTLS, real signatures, simulated GPUs): one
//! host goes through the whole pipeline over gRPC and ends on the new
//! driver, as its own journal and GPUs say.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ringfence::spiffe::{Role, SpiffeId};
use ringfence::time::{Clock, SystemClock};
use ringfence::tls::ClientIdentity;
use ringfence_coordinator::client::{GrpcHost, HostApi};
use ringfence_coordinator::store::WaveStore;
use ringfence_coordinator::wave::{self, Ctx, HostJob, Params, Phase, Signer, Stage, TaskStep};
use ringfence_devfleet::local_fleet::{self, HostSpec, LocalFleet, Mode};

fn spec(id: &str, ring: u32, faulty: bool) -> HostSpec {
    HostSpec {
        id: id.into(),
        ring,
        pool: "h100-train".into(),
        faulty_version: faulty.then(|| local_fleet::NEW_VERSION.to_string()),
        busy_for_s: None,
        xid_trigger: false,
    }
}

async fn host_api(f: &LocalFleet, idx: usize) -> GrpcHost {
    let root = &f.root;
    let id = ClientIdentity::load(
        &root.join("ops-coordinator.pem"),
        &root.join("ops-coordinator.key"),
        &root.join("pki/ca.pem"),
    )
    .unwrap();
    let h = &f.hosts[idx];
    let expected = SpiffeId::new(local_fleet::TRUST_DOMAIN, Role::Host, &h.spec.id).unwrap();
    let ch = ringfence::tls::connect(&h.addr.to_string(), &expected, &id)
        .await
        .unwrap();
    GrpcHost::new(&h.spec.id, ch, Duration::from_secs(10))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_patched_over_mtls_ends_on_the_new_driver() {
    ringfence::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let fleet = LocalFleet::start(
        dir.path(),
        vec![spec("gpu-a", 0, false), spec("gpu-b", 1, true)],
        Mode::InProcess,
        2,
    )
    .await
    .unwrap();
    let coord = ringfence::keys::read_signing_key(&dir.path().join("coordinator.key")).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ctx = Ctx {
        params: Arc::new(Params {
            wave_id: "w".into(),
            profile: "nvidia-driver".into(),
            version: local_fleet::NEW_VERSION.into(),
            expect_driver_version: local_fleet::NEW_VERSION.into(),
            expect_cuda_version: "12.4".into(),
            task_lifetime_ms: 600_000,
            task_timeout_ms: 30_000,
            attestation_max_age_ms: 60_000,
            max_clock_skew_ms: 120_000,
            poll_interval: Duration::from_millis(50),
            rollback_on_failure: false,
            rollback_version: String::new(),
        }),
        signer: Arc::new(Signer {
            key_id: "coord-demo".into(),
            key: coord,
        }),
        store: Arc::new(WaveStore::open(&dir.path().join("cstate"), "w", &SystemClock).unwrap()),
        clock,
        halt: Arc::new(AtomicBool::new(false)),
    };

    let api = host_api(&fleet, 0).await;
    let identity = api.identity().await.unwrap();
    assert_eq!(identity.host_id, "gpu-a");
    let job = HostJob {
        host_id: "gpu-a".into(),
        ring: 0,
        pool: "h100-train".into(),
        key: fleet.hosts[0].public_key,
        expected_gpus: 0,
        approvals: Default::default(),
        drill: false,
    };
    let rec = wave::host::run(&ctx, &job, &api).await.unwrap();
    assert_eq!(rec.phase, Phase::Done, "{:?}", rec.failure);
    assert_eq!(fleet.hosts[0].driver_version(), local_fleet::NEW_VERSION);
    let health = api.health().await.unwrap();
    assert!(!health.draining);

    // The faulty host fails validation with uncorrected ECC and stays drained.
    let api_b = host_api(&fleet, 1).await;
    let job_b = HostJob {
        host_id: "gpu-b".into(),
        ring: 1,
        key: fleet.hosts[1].public_key,
        ..job.clone()
    };
    let rec = wave::host::run(&ctx, &job_b, &api_b).await.unwrap();
    assert_eq!(rec.phase, Phase::Failed);
    let f = rec.failure.unwrap();
    assert_eq!(f.step, Stage::Task(TaskStep::Validate));
    assert!(
        f.reason.contains("ecc_uncorrected_volatile"),
        "{}",
        f.reason
    );
    let id_b = api_b.identity().await.unwrap();
    assert!(id_b.draining, "a failed host stays drained");
}
