#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A single host's way through a wave, against simulated agents that verify
//! every task with the real verifier.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use ringfence::keys;
use ringfence::pb;
use ringfence::time::{Clock, SystemClock};
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};
use ringfence_coordinator::approvals::{self, ApprovalSet, RingScope};
use ringfence_coordinator::client::HostApi;
use ringfence_coordinator::store::WaveStore;
use ringfence_coordinator::wave::{
    self, Ctx, FailureKind, HostJob, HostRecord, Params, Phase, Signer, Stage, TaskStep,
};
use ringfence_devfleet::simhost::{SimHost, SimRing};

struct World {
    _dir: tempfile::TempDir,
    ctx: Ctx,
    trust: Arc<TrustSet>,
    clock: Arc<dyn Clock>,
    /// Approver keys "alice" and "bob" of the trust set.
    approvers: [keys::SigningKey; 2],
}

fn world(rollback: bool) -> World {
    let dir = tempfile::tempdir().unwrap();
    let coord = keys::generate();
    let approvers = [keys::generate(), keys::generate()];
    let trust = Arc::new(TrustSet::from_keys(
        vec![
            TrustedKey {
                id: "coord".into(),
                key: coord.verifying_key(),
                role: KeyRole::Coordinator,
            },
            TrustedKey {
                id: "alice".into(),
                key: approvers[0].verifying_key(),
                role: KeyRole::Approver,
            },
            TrustedKey {
                id: "bob".into(),
                key: approvers[1].verifying_key(),
                role: KeyRole::Approver,
            },
        ],
        Policy::default(),
    ));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = Arc::new(WaveStore::open(dir.path(), "wave-1", &SystemClock).unwrap());
    let ctx = Ctx {
        params: Arc::new(Params {
            wave_id: "wave-1".into(),
            profile: "nvidia-driver".into(),
            version: "560.35.03".into(),
            expect_driver_version: "560.35.03".into(),
            expect_cuda_version: String::new(),
            task_lifetime_ms: 600_000,
            task_timeout_ms: 5_000,
            attestation_max_age_ms: 60_000,
            max_clock_skew_ms: 120_000,
            poll_interval: Duration::from_millis(5),
            rollback_on_failure: rollback,
            rollback_version: String::new(),
        }),
        signer: Arc::new(Signer {
            key_id: "coord".into(),
            key: coord,
        }),
        store,
        clock: clock.clone(),
        halt: Arc::new(AtomicBool::new(false)),
    };
    World {
        _dir: dir,
        ctx,
        trust,
        clock,
        approvers,
    }
}

fn host(w: &World, id: &str, ring: u32) -> (SimHost, HostJob) {
    let sim = SimHost::new(
        id,
        keys::generate(),
        w.trust.clone(),
        w.clock.clone(),
        "550.54.15",
    );
    let job = HostJob {
        host_id: id.into(),
        ring,
        pool: "p".into(),
        key: sim.public_key(),
        expected_gpus: 0,
        approvals: Default::default(),
        drill: false,
    };
    (sim, job)
}

#[tokio::test]
async fn healthy_host_is_patched_once_validated_and_back_in_service() {
    let w = world(false);
    let (sim, job) = host(&w, "gpu-1", 0);
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Done, "{:?}", rec.failure);
    let s = sim.state();
    assert_eq!(s.patches, 1);
    assert_eq!(s.driver_version, "560.35.03");
    assert!(!s.draining);
    let actions: Vec<String> = s
        .order
        .iter()
        .map(|id| s.tasks[id].action.clone())
        .collect();
    assert_eq!(actions, ["drain", "patch", "validate", "undrain"]);
    assert_eq!(rec.after.as_ref().unwrap().verdict, "HEALTHY");
}

#[tokio::test]
async fn uncorrected_ecc_after_patch_fails_validation_and_host_stays_drained() {
    let w = world(false);
    let (sim, job) = host(&w, "gpu-2", 2);
    sim.state().faulty_version = Some("560.35.03".into());
    let mut job = job;
    job.ring = 1; // unprotected, so no approvals needed here
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Failed);
    let f = rec.failure.unwrap();
    assert_eq!(f.step, Stage::Task(TaskStep::Validate));
    assert!(
        f.reason.contains("ecc_uncorrected_volatile"),
        "{}",
        f.reason
    );
    assert!(f.reason.contains("uncorrected ECC"), "{}", f.reason);
    assert!(sim.state().draining, "failed host must stay drained");
}

#[tokio::test]
async fn rollback_on_failure_returns_host_to_previous_version_still_drained() {
    let w = world(true);
    let (sim, job) = host(&w, "gpu-3", 1);
    sim.state().faulty_version = Some("560.35.03".into());
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Failed);
    let s = sim.state();
    assert_eq!(s.driver_version, "550.54.15");
    assert_eq!(s.patches, 2);
    assert!(s.draining);
    assert!(
        rec.failure
            .unwrap()
            .reason
            .contains("rolled back to 550.54.15")
    );
}

#[tokio::test]
async fn unhealthy_before_is_not_patched() {
    let w = world(false);
    let (sim, job) = host(&w, "gpu-4", 0);
    sim.state().unhealthy = true;
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.failure.unwrap().kind, FailureKind::UnhealthyBefore);
    assert_eq!(sim.state().patches, 0);
    assert!(sim.state().tasks.is_empty());
}

#[tokio::test]
async fn protected_ring_without_approvals_is_refused_by_the_agent() {
    let w = world(false);
    let (sim, job) = host(&w, "gpu-5", 2);
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    let f = rec.failure.unwrap();
    assert_eq!((f.step.as_str(), f.kind.as_str()), ("patch", "rejected"));
    assert!(f.reason.contains("approval_threshold"), "{}", f.reason);
    assert_eq!(sim.state().patches, 0);
}

#[tokio::test]
async fn previously_drained_host_is_never_undrained_by_the_wave() {
    let w = world(false);
    let (sim, job) = host(&w, "gpu-6", 0);
    sim.state().draining = true;
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Done);
    assert!(rec.already_drained);
    assert!(sim.state().draining);
    assert!(!sim.state().order.iter().any(|t| t.ends_with("/undrain")));
}

/// An operator fixes a host that failed validation and retries it
/// (`wave resume --retry`, which starts the host over): the host is still
/// drained by the wave's own drain, so the wave undrains it once it passes.
#[tokio::test]
async fn a_retried_host_drained_by_this_wave_is_undrained_when_it_passes() {
    let w = world(false);
    let (sim, mut job) = host(&w, "gpu-7", 1);
    job.ring = 1;
    sim.state().faulty_version = Some("560.35.03".into());
    let mut rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Failed);
    assert!(sim.state().draining, "failed host stays drained");
    assert!(rec.drained_by_this_wave());

    // The operator's fix, then the retry (as `wave resume --retry` resets it).
    sim.state().faulty_version = None;
    rec.phase = Phase::Pending;
    rec.failure = None;
    rec.before = None;
    rec.after = None;
    w.ctx.store.put_host(&job.host_id, &rec).unwrap();
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Done, "{:?}", rec.failure);
    assert!(!rec.already_drained, "the drain was the wave's own");
    assert!(!sim.state().draining, "undrained after passing");
    assert!(!rec.drained_by_this_wave());
}

/// A host this wave broke, retried before it is fixed, is named for what
/// it is: unhealthy after the wave's own steps, not "before the wave".
#[tokio::test]
async fn a_retried_host_this_wave_broke_is_not_called_unhealthy_before_the_wave() {
    let w = world(false);
    let (sim, mut job) = host(&w, "gpu-8", 1);
    job.ring = 1;
    sim.state().faulty_version = Some("560.35.03".into());
    let mut rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Failed);
    // Retried as it is (no fix): the attestation before finds it UNHEALTHY.
    rec.phase = Phase::Pending;
    rec.failure = None;
    rec.before = None;
    rec.after = None;
    w.ctx.store.put_host(&job.host_id, &rec).unwrap();
    let patches = sim.state().patches;
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    let f = rec.failure.unwrap();
    assert_eq!(f.kind, FailureKind::UnhealthyBefore);
    assert!(
        f.reason
            .contains("UNHEALTHY on its retry, after this wave's own steps on it")
            && !f.reason.contains("before the wave"),
        "{}",
        f.reason
    );
    assert_eq!(sim.state().patches, patches, "not patched again");
    assert!(sim.state().draining, "still drained by the wave");
}

type ClientResult<T> = Result<T, ringfence_coordinator::client::ClientError>;

/// What a [`Hooked`] host does with a task instead of plain delivery.
#[tonic::async_trait]
trait SubmitHook: Send + Sync {
    async fn submit(&self, inner: &SimHost, t: pb::SignedTask) -> ClientResult<pb::TaskStatus>;
}

/// A simulated agent whose SubmitTask goes through a hook; every other call
/// reaches the agent as it is.
struct Hooked<K> {
    inner: SimHost,
    hook: K,
}

#[tonic::async_trait]
impl<K: SubmitHook> HostApi for Hooked<K> {
    async fn identity(&self) -> Result<pb::Identity, ringfence_coordinator::client::ClientError> {
        self.inner.identity().await
    }
    async fn attest(
        &self,
        n: Vec<u8>,
    ) -> Result<pb::Envelope, ringfence_coordinator::client::ClientError> {
        self.inner.attest(n).await
    }
    async fn health(&self) -> Result<pb::HealthReport, ringfence_coordinator::client::ClientError> {
        self.inner.health().await
    }
    async fn watch_health(
        &self,
    ) -> Result<
        ringfence_coordinator::client::HealthStream,
        ringfence_coordinator::client::ClientError,
    > {
        self.inner.watch_health().await
    }
    async fn submit(&self, t: pb::SignedTask) -> ClientResult<pb::TaskStatus> {
        self.hook.submit(&self.inner, t).await
    }
    async fn get_task(
        &self,
        id: &str,
    ) -> Result<Option<pb::TaskStatus>, ringfence_coordinator::client::ClientError> {
        self.inner.get_task(id).await
    }
}

/// A coordinator that dies around the moment it sends the patch: before the
/// agent gets it, or right after, before the outcome is recorded.
struct CrashAtPatch {
    deliver_first: bool,
}

#[tonic::async_trait]
impl SubmitHook for CrashAtPatch {
    async fn submit(&self, inner: &SimHost, t: pb::SignedTask) -> ClientResult<pb::TaskStatus> {
        use prost::Message;
        let payload = pb::TaskPayload::decode(t.task.as_ref().unwrap().payload.as_slice()).unwrap();
        if matches!(payload.action, Some(pb::task_payload::Action::Patch(_))) {
            if self.deliver_first {
                let _ = inner.submit(t).await;
            }
            panic!("coordinator killed while sending the patch");
        }
        inner.submit(t).await
    }
}

async fn crash_then_resume(deliver_first: bool) {
    let w = world(false);
    let (sim, job) = host(&w, "gpu-7", 0);
    let crashing = Hooked {
        inner: sim.clone(),
        hook: CrashAtPatch { deliver_first },
    };
    let (ctx, job2) = (w.ctx.clone(), job.clone());
    let died = tokio::spawn(async move { wave::host::run(&ctx, &job2, &crashing).await }).await;
    assert!(died.is_err(), "the first coordinator must have died");
    let rec: HostRecord = w.ctx.store.get_host("gpu-7").unwrap().unwrap();
    assert_eq!(rec.phase, Phase::Patching);
    assert!(
        rec.tasks.last().unwrap().outcome.is_none(),
        "patch recorded before sending"
    );
    assert_eq!(sim.state().patches, u32::from(deliver_first));

    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Done, "{:?}", rec.failure);
    assert_eq!(sim.state().patches, 1, "the patch must run exactly once");
    let patch_tasks = rec
        .tasks
        .iter()
        .filter(|t| t.step == TaskStep::Patch)
        .count();
    assert_eq!(patch_tasks, 1, "the same task id is reused, not re-signed");
}

#[tokio::test]
async fn coordinator_killed_before_the_patch_reached_the_agent_resends_it_once() {
    crash_then_resume(false).await;
}

#[tokio::test]
async fn coordinator_killed_after_sending_the_patch_reattaches_by_task_id() {
    crash_then_resume(true).await;
}

#[tokio::test]
async fn rollback_drill_patches_rolls_back_and_repatches_with_three_attestations() {
    let w = world(false);
    let (sim, mut job) = host(&w, "gpu-9", 0);
    job.drill = true;
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    assert_eq!(rec.phase, Phase::Done, "{:?}", rec.failure);
    let s = sim.state();
    assert_eq!(s.patches, 3, "patch, rollback, re-patch");
    assert_eq!(s.driver_version, "560.35.03");
    assert!(!s.draining);
    let steps: Vec<&str> = rec.tasks.iter().map(|t| t.step.as_str()).collect();
    assert_eq!(
        steps,
        [
            "drain",
            "patch",
            "validate",
            "drill_rollback",
            "drill_rollback_validate",
            "drill_repatch",
            "drill_repatch_validate",
            "undrain"
        ]
    );
    assert_eq!(rec.drill.len(), 2);
    assert_eq!(rec.drill[0].driver_version, "550.54.15");
    assert_eq!(rec.drill[1].driver_version, "560.35.03");
}

// ------------------------------------------------ whole waves over simulated hosts

/// Connects the wave engine to simulated hosts by id.
pub(crate) struct SimConnector(std::collections::BTreeMap<String, SimHost>);

#[tonic::async_trait]
impl ringfence_coordinator::wave::Connector for SimConnector {
    async fn connect(
        &self,
        host: &ringfence_coordinator::inventory::Host,
    ) -> Result<Arc<dyn HostApi>, String> {
        self.0
            .get(&host.id)
            .cloned()
            .map(|h| Arc::new(h) as Arc<dyn HostApi>)
            .ok_or_else(|| format!("host `{}` unreachable", host.id))
    }
}

/// `n` healthy simulated hosts `h0..` of pool `p` (reserve `reserve`%), all
/// in ring 0, and the coordinator key their trust file names.
pub(crate) struct SimFleet {
    pub(crate) hosts: Vec<SimHost>,
    inventory: String,
    coord: ed25519_dalek::SigningKey,
    trust: Arc<TrustSet>,
}

pub(crate) fn sim_fleet(n: usize, reserve: u32) -> SimFleet {
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
    let mut inventory =
        format!("trust_domain = \"t.test\"\n[[pool]]\nname = \"p\"\nreserve_percent = {reserve}\n");
    let mut hosts = Vec::new();
    for i in 0..n {
        let sim = SimHost::new(
            &format!("h{i}"),
            keys::generate(),
            trust.clone(),
            clock.clone(),
            "550.54.15",
        )
        // Configured in ring 0, as the inventory says (the wave's probe
        // refuses agents whose own ring differs, or is unset).
        .with_ring(ringfence_devfleet::simhost::SimRing::Configured(0));
        inventory.push_str(&format!(
            "[[host]]\nid = \"h{i}\"\naddress = \"127.0.0.1:1\"\npool = \"p\"\nring = 0\nattestation_key = \"{}\"\nexpected_gpus = 1\n",
            keys::public_key_text(&sim.public_key())
        ));
        hosts.push(sim);
    }
    SimFleet {
        hosts,
        inventory,
        coord,
        trust,
    }
}

/// A wave driver over the simulated fleet, as `wave run` builds one.
pub(crate) fn sim_driver(
    f: &SimFleet,
    state_dir: &std::path::Path,
    wave: &str,
    version: &str,
) -> ringfence_coordinator::wave::Driver {
    use ringfence::config::Source;
    let inventory = ringfence_coordinator::inventory::Inventory::from_source(&Source::from_text(
        "inv.toml",
        f.inventory.clone(),
    ))
    .unwrap();
    let spec = ringfence_coordinator::spec::WaveSpec::from_source(&Source::from_text(
        "wave.toml",
        format!(
            "wave_id = \"{wave}\"\nprofile = \"nvidia-driver\"\nversion = \"{version}\"\nexpect_driver_version = \"{version}\"\n[ring.0]\nbatch_size = 10\nsoak_s = 0\n"
        ),
    ))
    .unwrap();
    let connector = SimConnector(
        f.hosts
            .iter()
            .map(|h| (h.host_id.clone(), h.clone()))
            .collect(),
    );
    ringfence_coordinator::wave::Driver {
        inventory,
        spec,
        trust: (*f.trust).clone(),
        signer: Signer {
            key_id: "coord".into(),
            key: f.coord.clone(),
        },
        store: Arc::new(WaveStore::open(state_dir, wave, &SystemClock).unwrap()),
        connector: Arc::new(connector),
        clock: Arc::new(SystemClock),
        events: Arc::new(ringfence_coordinator::cli::report::Reporter::with_mode(
            ringfence_coordinator::cli::report::Mode::Quiet,
        )),
        poll_interval: Duration::from_millis(5),
        halt_grace: Duration::from_secs(60),
        soak_report_max_age: Duration::from_secs(30),
        state_dir: state_dir.to_path_buf(),
        break_glass: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_waves_over_one_pool_never_take_more_than_its_reserve_out_together() {
    use ringfence_coordinator::wave::Outcome;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    // 10 hosts, reserve 10%: one host of the pool out of service at a time,
    // whichever wave has it.
    let f = sim_fleet(10, 10);
    let mut a = sim_driver(&f, dir.path(), "wave-a", "560.35.03");
    let mut b = sim_driver(&f, dir.path(), "wave-b", "565.57.01");
    // What the hosts themselves say: how many are drained at once.
    let most = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (hosts, most, stop) = (f.hosts.clone(), most.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = hosts.iter().filter(|h| h.state().draining).count();
                most.fetch_max(out, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let (ra, rb) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(a.run(), b.run())
    })
    .await
    .expect("both waves end");
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "hosts of the pool out of service at once across both waves ({ra:?}, {rb:?})"
    );
    // A host belongs to one active wave: unless one wave ended before the
    // other claimed the hosts, the second is refused before it drains any.
    let completed = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Ok(Outcome::Completed)))
        .count();
    let refused = [&ra, &rb]
        .iter()
        .filter(|r| matches!(r, Err(e) if e.to_string().contains("already belong to active wave")))
        .count();
    assert!(
        completed == 2 || (completed == 1 && refused == 1),
        "{ra:?} {rb:?}"
    );
    for h in &f.hosts {
        let s = h.state();
        assert_eq!(
            s.patches, completed as u32,
            "{} patched by each wave that ran",
            h.host_id
        );
        assert!(!s.draining, "{} back in service", h.host_id);
    }
    // Both waves are done: nothing of theirs is left in the ledger.
    let ledger = ringfence_coordinator::store::PoolLedger::new(
        &ringfence_coordinator::store::WavePaths::new(dir.path(), "wave-c"),
    );
    assert!(ledger.lock().await.unwrap().others("wave-c").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_halt_requested_after_the_resume_began_stops_the_resumed_wave() {
    use ringfence_coordinator::store;
    use ringfence_coordinator::wave::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let f = sim_fleet(3, 50);
    let mut d = sim_driver(&f, dir.path(), "wave-r", "560.35.03");
    let paths = d.store.paths.clone();
    // Halted by an operator before any host started.
    store::request_halt(&paths, 1).unwrap();
    let Outcome::Halted(h) = d.run().await.unwrap() else {
        panic!("the wave ignored the halt");
    };
    assert_eq!(h.kind, FailureKind::Operator);
    // The operator resumes; while the resume is starting, someone (or the
    // same operator, on second thought) halts again.
    let seen = store::halt_request(&paths);
    store::request_halt(&paths, 1).unwrap();
    let out = d.resume_after(&[], &[], seen).await.unwrap();
    let Outcome::Halted(h) = out else {
        panic!("the resumed wave discarded a halt requested after it began: {out:?}");
    };
    assert_eq!(h.kind, FailureKind::Operator);
    assert!(paths.halt.exists(), "the later halt stands");
    assert!(
        f.hosts.iter().all(|h| h.state().patches == 0),
        "no host was patched"
    );
    // A resume that began after that halt clears it and finishes the wave.
    assert_eq!(d.resume(&[], &[]).await.unwrap(), Outcome::Completed);
    assert!(f.hosts.iter().all(|h| h.state().patches == 1));
}

/// A host whose enrolled key left the inventory between a halt and the
/// resume fails as not enrolled before anything is sent to it: its
/// attestations are never checked against some other key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_an_enrolled_key_fails_as_not_enrolled_before_any_task() {
    use ringfence_coordinator::store;
    use ringfence_coordinator::wave::Outcome;
    let dir = tempfile::tempdir().unwrap();
    let f = sim_fleet(3, 50);
    let mut d = sim_driver(&f, dir.path(), "wave-k", "560.35.03");
    store::request_halt(&d.store.paths, 1).unwrap();
    assert!(matches!(d.run().await.unwrap(), Outcome::Halted(_)));
    let h0 = d.inventory.hosts.iter_mut().find(|h| h.id == "h0").unwrap();
    h0.attestation_key = None;
    let out = d.resume(&[], &[]).await.unwrap();
    let Outcome::Halted(h) = out else {
        panic!("a host without a key ran: {out:?}");
    };
    assert_eq!(h.host.as_deref(), Some("h0"));
    assert_eq!((h.step, h.kind), (Stage::Connect, FailureKind::NotEnrolled));
    assert!(
        h.reason.contains("has no enrolled attestation key"),
        "{}",
        h.reason
    );
    let rec: HostRecord = d.store.get_host("h0").unwrap().unwrap();
    assert_eq!(rec.phase, Phase::Failed);
    assert!(rec.tasks.is_empty() && rec.before.is_none());
    assert!(f.hosts[0].state().tasks.is_empty(), "h0 got a task");
    assert!(
        f.hosts.iter().all(|h| h.state().patches == 0),
        "no host was patched"
    );
}

/// Per task sent: its step, and the actions listed by each attached approval.
type Sent = Arc<std::sync::Mutex<Vec<(String, Vec<Vec<i32>>)>>>;

/// Records what every task carried, then hands it to the simulated agent.
struct Recording {
    /// (step's action, the actions listed by each attached approval).
    sent: Sent,
}

#[tonic::async_trait]
impl SubmitHook for Recording {
    async fn submit(&self, inner: &SimHost, t: pb::SignedTask) -> ClientResult<pb::TaskStatus> {
        use prost::Message;
        let payload = pb::TaskPayload::decode(t.task.as_ref().unwrap().payload.as_slice()).unwrap();
        let step = payload.task_id.rsplit('/').next().unwrap().to_string();
        let listed = t
            .approvals
            .iter()
            .map(|e| {
                pb::RingApproval::decode(e.payload.as_slice())
                    .unwrap()
                    .actions
            })
            .collect();
        self.sent.lock().unwrap().push((step, listed));
        inner.submit(t).await
    }
}

/// The ring's approvals as `wave run` collects them: verified, with what each covers.
fn approval_set(w: &World, signed: &[(&[&str], &[pb::ApprovedAction], usize)]) -> ApprovalSet {
    let hosts: Vec<String> = Vec::new();
    let scope = RingScope {
        wave_id: "wave-1",
        ring: 2,
        profile: "nvidia-driver",
        version: "560.35.03",
        hosts: &hosts,
    };
    let now = w.clock.now_ms();
    let mut set = ApprovalSet::default();
    for (hosts, actions, who) in signed {
        let name = ["alice", "bob"][*who];
        let a = pb::RingApproval {
            wave_id: "wave-1".into(),
            ring: 2,
            profile: "nvidia-driver".into(),
            version: "560.35.03".into(),
            rollback_version: "550.54.15".into(),
            host_ids: hosts.iter().map(|h| h.to_string()).collect(),
            issued_at_unix_ms: now - 1_000,
            expires_at_unix_ms: now + 3_600_000,
            approver: name.into(),
            actions: actions.iter().map(|a| *a as i32).collect(),
        };
        let env = approvals::sign_ring(&a, name, &w.approvers[*who]);
        let covers = approvals::verify_ring(&env, &w.trust, &scope, now).unwrap();
        set.push(env, covers);
    }
    set
}

/// A protected-ring host whose patch fails validation and is rolled back:
/// the patch carries only the patch approvals naming this host, the
/// rollback only the rollback approvals, the other tasks none — never an
/// approval for another host or another action.
#[tokio::test]
async fn each_task_carries_only_the_approvals_for_its_host_and_action() {
    use pb::ApprovedAction as A;
    let w = world(true);
    let (sim, mut job) = host(&w, "gpu-5", 2);
    sim.state().faulty_version = Some("560.35.03".into());
    job.approvals = Arc::new(approval_set(
        &w,
        &[
            (&["gpu-5", "gpu-6"], &[A::Patch], 0),
            (&["gpu-6"], &[A::Patch, A::Rollback], 1),
            (&["gpu-5"], &[A::Patch], 1),
            (&["gpu-5"], &[A::Rollback], 0),
            (&["gpu-5"], &[A::Rollback], 1),
            (&["gpu-5"], &[A::ForceUndrain], 1),
        ],
    ));
    let rec_api = Hooked {
        inner: sim.clone(),
        hook: Recording {
            sent: Default::default(),
        },
    };
    let rec = wave::host::run(&w.ctx, &job, &rec_api).await.unwrap();
    assert_eq!(rec.phase, Phase::Failed);
    assert_eq!(
        sim.state().patches,
        2,
        "patch, then rollback: {:?}",
        rec.failure
    );
    assert_eq!(sim.state().driver_version, "550.54.15");
    let sent = rec_api.hook.sent.lock().unwrap().clone();
    let by_step = |step: &str| -> Vec<Vec<i32>> {
        sent.iter()
            .filter(|(s, _)| s == step)
            .flat_map(|(_, a)| a.clone())
            .collect()
    };
    assert_eq!(
        by_step("patch"),
        [vec![A::Patch as i32], vec![A::Patch as i32]]
    );
    assert_eq!(
        by_step("rollback"),
        [vec![A::Rollback as i32], vec![A::Rollback as i32]],
        "{sent:?}"
    );
    for (step, a) in &sent {
        if !matches!(step.as_str(), "patch" | "rollback") {
            assert!(a.is_empty(), "{step} carried approvals: {a:?}");
        }
    }
}

/// The simulated agent knows its own ring, as the real one does: a task
/// naming another ring is refused by check `ring`, whatever the coordinator
/// signed; with no ring configured, even a ring-0 patch needs approvals.
#[tokio::test]
async fn a_simulated_agent_refuses_another_ring_and_without_a_ring_is_protected() {
    let w = world(false);
    let (sim, job) = host(&w, "gpu-8", 0);
    let sim = sim.with_ring(SimRing::Configured(3));
    assert_eq!(sim.identity().await.unwrap().ring, Some(3));
    assert!(sim.identity().await.unwrap().protected_ring);
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    let f = rec.failure.unwrap();
    assert_eq!((f.step.as_str(), f.kind.as_str()), ("drain", "rejected"));
    assert!(f.reason.contains("`ring`"), "{}", f.reason);
    assert!(sim.state().tasks.is_empty());

    let w = world(false);
    let (sim, job) = host(&w, "gpu-9", 0);
    let sim = sim.with_ring(SimRing::NotConfigured);
    let id = sim.identity().await.unwrap();
    assert_eq!((id.ring, id.protected_ring), (None, true));
    let rec = wave::host::run(&w.ctx, &job, &sim).await.unwrap();
    let f = rec.failure.unwrap();
    assert_eq!((f.step.as_str(), f.kind.as_str()), ("patch", "rejected"));
    assert!(f.reason.contains("approval_threshold"), "{}", f.reason);
    assert_eq!(sim.state().patches, 0);
}

/// The coordinator tolerates the trust policy's clock skew with an agent
/// (`Params::max_clock_skew_ms`, from `max_clock_skew_s`), not a fixed
/// 120 s: an agent whose clock runs 200 s ahead passes under a 300 s policy
/// and fails validation under a 120 s one.
#[tokio::test]
async fn attestations_are_checked_with_the_policys_clock_skew() {
    let w = world(false);
    let ahead: Arc<dyn Clock> =
        Arc::new(ringfence::time::ManualClock::at(w.clock.now_ms() + 200_000));
    for (skew_ms, healthy) in [(300_000, true), (120_000, false)] {
        let id = format!("gpu-ahead-{skew_ms}");
        let sim = SimHost::new(
            &id,
            keys::generate(),
            w.trust.clone(),
            ahead.clone(),
            "550.54.15",
        );
        let job = HostJob {
            host_id: id.clone(),
            ring: 0,
            pool: "p".into(),
            key: sim.public_key(),
            expected_gpus: 0,
            approvals: Default::default(),
            drill: false,
        };
        let ctx = Ctx {
            params: Arc::new(Params {
                wave_id: format!("wave-skew-{skew_ms}"),
                max_clock_skew_ms: skew_ms,
                ..(*w.ctx.params).clone()
            }),
            ..w.ctx.clone()
        };
        let rec = wave::host::run(&ctx, &job, &sim).await.unwrap();
        if healthy {
            assert_eq!(rec.phase, Phase::Done, "{:?}", rec.failure);
        } else {
            assert_eq!(rec.phase, Phase::Failed);
            let f = rec.failure.unwrap();
            assert!(f.reason.contains("in the future"), "{f:?}");
        }
    }
}
