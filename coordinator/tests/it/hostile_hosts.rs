//! A compromised host against the coordinator: it signs what it likes for
//! itself, but its verdict is judged by its own report's reasons, its GPUs
//! by the inventory, its identity and task statuses by what was asked for,
//! and its text cannot draw on the operator's screen.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use prost::Message;
use ringfence::config::Source;
use ringfence::keys::{self, SigningKey};
use ringfence::pb;
use ringfence::time::{Clock, SystemClock};
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};
use ringfence_coordinator::cli::health_table;
use ringfence_coordinator::client::{ClientError, HealthStream, HostApi};
use ringfence_coordinator::inventory::{Host, Inventory};
use ringfence_coordinator::store::WaveStore;
use ringfence_coordinator::wave::{
    self, Connector, Ctx, FailureKind, HostJob, Params, Phase, Signer, Stage, TaskStep,
};
use ringfence_devfleet::simhost::SimHost;

/// How the hostile agent lies.
#[derive(Default, Clone)]
struct Lies {
    /// Re-sign every attestation with the verdict HEALTHY.
    healthy_verdict: bool,
    /// Answer GetIdentity as this host.
    identity_as: Option<String>,
    /// Answer GetTask with the status of a task of this id.
    task_id_as: Option<String>,
}

/// A simulated agent whose owner holds its attestation key.
struct Hostile {
    sim: SimHost,
    key: SigningKey,
    lies: Lies,
}

impl Hostile {
    fn resign(&self, env: pb::Envelope) -> pb::Envelope {
        if !self.lies.healthy_verdict {
            return env;
        }
        let mut att = pb::Attestation::decode(env.payload.as_slice()).unwrap();
        att.verdict = pb::Verdict::Healthy as i32;
        if let Some(r) = att.report.as_mut() {
            r.verdict = pb::Verdict::Healthy as i32;
        }
        ringfence::attest::sign(&att, &self.sim.host_id, &self.key)
    }
}

#[tonic::async_trait]
impl HostApi for Hostile {
    async fn identity(&self) -> Result<pb::Identity, ClientError> {
        let mut id = self.sim.identity().await?;
        if let Some(other) = &self.lies.identity_as {
            id.host_id = other.clone();
        }
        Ok(id)
    }
    async fn attest(&self, nonce: Vec<u8>) -> Result<pb::Envelope, ClientError> {
        Ok(self.resign(self.sim.attest(nonce).await?))
    }
    async fn health(&self) -> Result<pb::HealthReport, ClientError> {
        self.sim.health().await
    }
    async fn watch_health(&self) -> Result<HealthStream, ClientError> {
        self.sim.watch_health().await
    }
    async fn submit(&self, task: pb::SignedTask) -> Result<pb::TaskStatus, ClientError> {
        self.sim.submit(task).await
    }
    async fn get_task(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, ClientError> {
        let Some(mut s) = self.sim.get_task(task_id).await? else {
            return Ok(None);
        };
        if let Some(other) = &self.lies.task_id_as {
            s.task_id = other.clone();
        }
        s.attestation = s.attestation.map(|e| self.resign(e));
        Ok(Some(s))
    }
}

fn ctx(dir: &std::path::Path) -> (Ctx, Arc<TrustSet>, Arc<dyn Clock>) {
    let coord = keys::generate();
    let trust = Arc::new(TrustSet::from_keys(
        vec![TrustedKey {
            id: "coord".into(),
            key: coord.verifying_key(),
            role: KeyRole::Coordinator,
        }],
        Policy::default(),
    ));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ctx = Ctx {
        params: Arc::new(Params {
            wave_id: "wave-h".into(),
            profile: "nvidia-driver".into(),
            version: "560.35.03".into(),
            expect_driver_version: "560.35.03".into(),
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
            key: coord,
        }),
        store: Arc::new(WaveStore::open(dir, "wave-h", &SystemClock).unwrap()),
        clock: clock.clone(),
        halt: Arc::new(AtomicBool::new(false)),
    };
    (ctx, trust, clock)
}

/// Run host `gpu-1` (ring 1: unprotected, no approvals needed) of one
/// wave against a hostile agent.
async fn run(lies: Lies, unhealthy: bool, expected_gpus: u32) -> (wave::HostRecord, SimHost) {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, trust, clock) = ctx(dir.path());
    let key = keys::generate();
    let sim = SimHost::new("gpu-1", key.clone(), trust, clock, "550.54.15");
    sim.state().unhealthy = unhealthy;
    let job = HostJob {
        host_id: "gpu-1".into(),
        ring: 1,
        pool: "p".into(),
        key: sim.public_key(),
        expected_gpus,
        approvals: Default::default(),
        drill: false,
    };
    let api = Hostile {
        sim: sim.clone(),
        key,
        lies,
    };
    let rec = wave::host::run(&ctx, &job, &api).await.unwrap();
    (rec, sim)
}

#[tokio::test]
async fn an_honest_host_still_goes_through() {
    let (rec, sim) = run(Lies::default(), false, 1).await;
    assert_eq!(rec.phase, Phase::Done, "{:?}", rec.failure);
    assert_eq!(sim.state().patches, 1);
}

#[tokio::test]
async fn a_healthy_verdict_over_an_unhealthy_reason_is_not_patched() {
    let lies = Lies {
        healthy_verdict: true,
        ..Default::default()
    };
    let (rec, sim) = run(lies, true, 0).await;
    assert_eq!(rec.phase, Phase::Failed);
    let f = rec.failure.unwrap();
    assert_eq!(f.step, Stage::AttestBefore);
    assert_eq!(f.kind, FailureKind::UnhealthyBefore);
    assert!(
        f.reason.contains("ecc_uncorrected_volatile"),
        "{}",
        f.reason
    );
    assert_eq!(sim.state().patches, 0);
}

#[tokio::test]
async fn fewer_gpus_than_the_inventory_says_are_not_patched() {
    // The agent expects 1 GPU and has it; the inventory says 2.
    let (rec, sim) = run(Lies::default(), false, 2).await;
    assert_eq!(rec.phase, Phase::Failed);
    let f = rec.failure.unwrap();
    assert_eq!(f.step, Stage::AttestBefore);
    assert!(
        f.reason
            .contains("1 GPUs reported, the inventory expects 2"),
        "{}",
        f.reason
    );
    assert_eq!(sim.state().patches, 0);
}

#[tokio::test]
async fn an_agent_answering_as_another_host_gets_no_task() {
    let lies = Lies {
        identity_as: Some("gpu-2".into()),
        ..Default::default()
    };
    let (rec, sim) = run(lies, false, 0).await;
    assert_eq!(rec.phase, Phase::Failed);
    let f = rec.failure.unwrap();
    assert_eq!(f.step, Stage::Task(TaskStep::Drain));
    assert!(f.reason.contains("answered as `gpu-2`"), "{}", f.reason);
    assert!(sim.state().tasks.is_empty());
}

#[tokio::test]
async fn a_status_of_another_task_does_not_end_the_task() {
    let lies = Lies {
        task_id_as: Some("wave-h/gpu-9/1/drain".into()),
        ..Default::default()
    };
    let (rec, _sim) = run(lies, false, 0).await;
    assert_eq!(rec.phase, Phase::Failed);
    let f = rec.failure.unwrap();
    assert_eq!(f.step, Stage::Task(TaskStep::Drain));
    assert!(
        f.reason.contains("answered for task wave-h/gpu-9/1/drain"),
        "{}",
        f.reason
    );
}

/// Hands out the hostile agents by host id.
struct Fixed(BTreeMap<String, Arc<dyn HostApi>>);

#[tonic::async_trait]
impl Connector for Fixed {
    async fn connect(&self, host: &Host) -> Result<Arc<dyn HostApi>, String> {
        self.0
            .get(&host.id)
            .cloned()
            .ok_or_else(|| "no such host".into())
    }
}

#[tokio::test]
async fn a_driver_string_cannot_overwrite_another_row_of_hosts_health() {
    let dir = tempfile::tempdir().unwrap();
    let (_ctx, trust, clock) = ctx(dir.path());
    let forged = "550.54.15\x1b[1A\x1b[2K\rgpu-0    0 p HEALTHY";
    let mut text = String::from("trust_domain = \"gpu.example.com\"\n[[pool]]\nname = \"p\"\n");
    let mut apis: BTreeMap<String, Arc<dyn HostApi>> = BTreeMap::new();
    for id in ["gpu-0", "gpu-1"] {
        let key = keys::generate();
        let sim = SimHost::new(id, key, trust.clone(), clock.clone(), "550.54.15");
        if id == "gpu-1" {
            sim.state().driver_version = forged.into();
            sim.state().unhealthy = true;
        }
        text.push_str(&format!(
            "[[host]]\nid = \"{id}\"\naddress = \"127.0.0.1:1\"\npool = \"p\"\nring = 0\nattestation_key = \"{}\"\nexpected_gpus = 1\n",
            keys::public_key_text(&sim.public_key())
        ));
        apis.insert(id.into(), Arc::new(sim));
    }
    let inv = Inventory::from_source(&Source::from_text("inv.toml", &text)).unwrap();
    let rows = health_table::collect(
        &inv,
        Arc::new(Fixed(apis)),
        4,
        120_000,
        Arc::new(SystemClock),
    )
    .await;
    let table = health_table::render(&rows);
    assert!(
        !table.contains('\x1b') && !table.contains('\r'),
        "{table:?}"
    );
    assert!(
        table.contains("550.54.15\\u{1b}[1A\\u{1b}[2K\\u{d}gpu-0"),
        "{table}"
    );
    // A header and one line per host: no row can break into another.
    assert_eq!(table.lines().count(), 3, "{table}");
}
