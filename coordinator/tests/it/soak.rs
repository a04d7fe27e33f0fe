#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The soak: while a ring soaks, its hosts are watched through WatchHealth
//! and a regression fails the ring. Real agents (in-process with simulated
//! GPUs playing the fake-NVML scenario format, or `ringfenced` processes on
//! the fake NVML where an agent must die), real mTLS and signatures, judged
//! by what the agents recorded.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prost::Message;
use ringfence::config::Source;
use ringfence::pb;
use ringfence::time::SystemClock;
use ringfence::trust::TrustSet;
use ringfence_coordinator::cli::report::Reporter;
use ringfence_coordinator::client::{ClientError, HealthStream, HostApi};
use ringfence_coordinator::evidence;
use ringfence_coordinator::inventory::{Host, Inventory};
use ringfence_coordinator::settings::Settings;
use ringfence_coordinator::spec::WaveSpec;
use ringfence_coordinator::store::{WavePaths, WaveStore};
use ringfence_coordinator::wave::{
    Connector, FailureKind, HaltReport, Outcome, Stage, TlsConnector,
};
use ringfence_devfleet::local_fleet::{HostSpec, LocalFleet, Mode};

use common::{Coordinator, host, is};

async fn inprocess(dir: &Path, specs: Vec<HostSpec>) -> LocalFleet {
    ringfence::tls::install_crypto_provider();
    let mut f = LocalFleet::start(dir, specs, Mode::InProcess, 2)
        .await
        .unwrap();
    f.pool_reserve.insert("h100-train".into(), 50);
    f.pool_reserve.insert("a100-infer".into(), 50);
    f.write_inventory().unwrap();
    f
}

/// What a `wave run` (the CLI, `--json`) did after `act` hit `host` while
/// `ring` soaked.
struct SoakFailure {
    /// Detail of the host's `failed` event.
    detail: String,
    /// Its stderr.
    stderr: String,
    /// From `act` to the `failed` event.
    detected: Duration,
    /// From the soak's start to the coordinator's exit.
    halted_after: Duration,
}

fn status(f: &LocalFleet, wave_id: &str) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(WavePaths::new(&f.state_dir, wave_id).status).ok()?;
    serde_json::from_str(&text).ok()
}

/// Run the wave until `ring` soaks (its event, and `wave status` says so),
/// do `act`, and expect `host` to fail and the wave to halt (exit 4)
/// well within the ring's 20 s soak.
async fn fail_during_soak(
    f: &mut LocalFleet,
    spec: &Path,
    wave_id: &str,
    ring: u32,
    host: &str,
    act: impl FnOnce(&mut LocalFleet),
) -> SoakFailure {
    let mut c = Coordinator::run(f, spec);
    c.until(Duration::from_secs(30), |e| {
        is(e, "ring", Some("soak")) && e["ring"] == ring
    })
    .await
    .expect("the ring starts its soak");
    let soak_started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(f, wave_id).is_none_or(|s| s["rings"][ring.to_string()]["status"] != "soaking") {
        assert!(
            Instant::now() < deadline,
            "status never showed ring {ring} soaking"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    act(f);
    let acted = Instant::now();
    let failed = c
        .until(Duration::from_secs(15), |e| {
            is(e, "host", Some("failed")) && e["host"] == host
        })
        .await
        .expect("the host fails the soak");
    let detected = acted.elapsed();
    let (code, stderr) = c.finish(Duration::from_secs(15)).await;
    let halted_after = soak_started.elapsed();
    assert_eq!(code, 4, "exit code 4 (halted); stderr:\n{stderr}");
    assert!(
        halted_after < Duration::from_secs(15),
        "the wave must halt during the 20 s soak, not after it ({halted_after:?})"
    );
    SoakFailure {
        detail: failed["detail"].as_str().unwrap_or_default().to_string(),
        stderr,
        detected,
        halted_after,
    }
}

/// An operator's wave: a ring-2 canary's GPU raises XID 79 (fallen off the
/// bus) while ring 2 soaks. The wave must halt with a soak regression
/// naming `xid_critical` long before the soak would have ended, and no
/// ring-3 or ring-4 agent may hold any task. The canary had passed
/// validation and was undrained; the wave drains it again, as a halt
/// leaves a failed host out of service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xid_79_during_the_ring_2_soak_halts_the_wave_and_ring_3_is_never_touched() {
    let dir = tempfile::tempdir().unwrap();
    let mut f = inprocess(
        dir.path(),
        vec![
            host("gpu-r0", 0, "h100-train"),
            host("gpu-r1", 1, "a100-infer"),
            HostSpec {
                xid_trigger: true,
                ..host("gpu-canary", 2, "h100-train")
            },
            host("gpu-c2", 2, "a100-infer"),
            host("gpu-b1", 3, "h100-train"),
            host("gpu-b2", 3, "a100-infer"),
            host("gpu-s1", 4, "a100-infer"),
        ],
    )
    .await;
    let wave_id = "soak-xid";
    let spec = f
        .write_spec(
            wave_id,
            "[ring.0]\nbatch_size = 1\nsoak_s = 0\n[ring.1]\nbatch_size = 1\nsoak_s = 0\n[ring.2]\nbatch_size = 2\nsoak_s = 20\n[ring.3]\nbatch_size = 2\nsoak_s = 0\n[ring.4]\nbatch_size = 1\nsoak_s = 0\n",
        )
        .unwrap();
    common::approve_all(&f, &spec);

    let canary = f.hosts.iter().find(|h| h.spec.id == "gpu-canary").unwrap();
    let trigger = canary.xid_trigger();
    let got = fail_during_soak(&mut f, &spec, wave_id, 2, "gpu-canary", |_| {
        std::fs::write(&trigger, "").unwrap();
    })
    .await;
    assert!(
        got.detail.contains("soak regression") && got.detail.contains("xid_critical"),
        "{}",
        got.detail
    );
    assert!(
        got.stderr
            .contains("regressed after it was back in service")
            && got.stderr.contains("drained again by the wave"),
        "{}",
        got.stderr
    );
    eprintln!(
        "XID to failed event: {:?}; soak start to exit: {:?}",
        got.detected, got.halted_after
    );

    // The halt record names the host, the soak step and the regression.
    let st = status(&f, wave_id).unwrap();
    assert_eq!(st["phase"], "halted", "{st}");
    let halt = &st["halt"];
    assert_eq!(halt["ring"], 2, "{halt}");
    assert_eq!(halt["host"], "gpu-canary", "{halt}");
    assert_eq!(halt["step"], "soak", "{halt}");
    assert_eq!(halt["kind"], "soak_regression", "{halt}");
    assert!(
        halt["reason"].as_str().unwrap().contains("xid_critical"),
        "{halt}"
    );
    assert!(
        halt["reason"]
            .as_str()
            .unwrap()
            .contains("drained again by the wave"),
        "{halt}"
    );
    assert_eq!(
        st["rings"]["2"]["status"], "soaking",
        "ring 2 never promoted"
    );

    // The agents' own journals: rings 3 and 4 untouched, ring 2 done.
    for h in ["gpu-b1", "gpu-b2", "gpu-s1"] {
        let tasks = common::journal(&f, h).await;
        assert!(
            tasks.is_empty(),
            "{h} holds tasks: {:?}",
            common::actions(&tasks)
        );
    }
    let canary_tasks = common::actions(&common::journal(&f, "gpu-canary").await);
    assert_eq!(
        canary_tasks,
        ["drain", "patch", "validate", "undrain", "drain"],
        "the canary was patched and validated once, undrained, and drained again after its regression"
    );
    let health = common::health(&f, "gpu-canary").await;
    assert_eq!(health.verdict(), pb::Verdict::Unhealthy, "{health:?}");
    assert!(
        health.reasons.iter().any(|r| r.code == "xid_critical"),
        "{health:?}"
    );
    assert!(health.draining, "the wave drained it again");
    let other = common::health(&f, "gpu-c2").await;
    assert_eq!(other.verdict(), pb::Verdict::Healthy, "{other:?}");
}

/// An agent that dies while its ring soaks: the watcher's stream breaks, the
/// one reopen fails, and the wave halts with the host unreachable during
/// soak; the next ring is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_lost_during_the_soak_halts_the_wave_as_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut f, spec) = two_rings(dir.path(), "soak-lost", 20, true).await;
    // The stream breaks and no reopen succeeds: no new report for 3 s.
    ringfence_testkit::set_key(&f.settings, "timeouts", "soak_report_max_age_s", 3).unwrap();
    let got = fail_during_soak(&mut f, &spec, "soak-lost", 0, "gpu-a", |f| f.kill("gpu-a")).await;
    assert!(
        got.detail.contains("no health report for 3 s")
            && got.detail.contains("unreachable during soak"),
        "{}",
        got.detail
    );
    assert!(
        got.stderr
            .contains("could NOT drain the host again: drain it by hand"),
        "{}",
        got.stderr
    );
    assert!(
        common::journal(&f, "gpu-c").await.is_empty(),
        "ring 1 untouched"
    );
}

/// gpu-a and gpu-b in ring 0 (soaking `soak_s`, one at a time), gpu-c in
/// ring 1; the wave spec's path. `processes`: real `ringfenced` processes on
/// the fake NVML (a killed one drops its connections), else in-process.
async fn two_rings(
    dir: &Path,
    wave_id: &str,
    soak_s: u64,
    processes: bool,
) -> (LocalFleet, std::path::PathBuf) {
    let specs = vec![
        host("gpu-a", 0, "h100-train"),
        host("gpu-b", 0, "h100-train"),
        host("gpu-c", 1, "h100-train"),
    ];
    let f = if processes {
        common::start(dir, specs, &[("h100-train", 50)]).await
    } else {
        inprocess(dir, specs).await
    };
    let spec = f
        .write_spec(
            wave_id,
            &format!("[ring.0]\nbatch_size = 1\nsoak_s = {soak_s}\n[ring.1]\nbatch_size = 1\nsoak_s = 0\n"),
        )
        .unwrap();
    (f, spec)
}

/// Counts the health streams its hosts have open.
struct Counting {
    inner: TlsConnector,
    open: Arc<AtomicUsize>,
    opened: Arc<AtomicUsize>,
    /// Open streams when the first task was sent to a ring-1 host
    /// (`usize::MAX`: never).
    open_at_ring_1: Arc<AtomicUsize>,
}

struct CountingHost {
    inner: Arc<dyn HostApi>,
    ring: u32,
    open: Arc<AtomicUsize>,
    opened: Arc<AtomicUsize>,
    open_at_ring_1: Arc<AtomicUsize>,
}

/// Decrements the open count when the stream is dropped (its watcher ended
/// or was aborted).
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl Connector for Counting {
    async fn connect(&self, host: &Host) -> Result<Arc<dyn HostApi>, String> {
        let inner = self.inner.connect(host).await?;
        Ok(Arc::new(CountingHost {
            inner,
            ring: host.ring,
            open: self.open.clone(),
            opened: self.opened.clone(),
            open_at_ring_1: self.open_at_ring_1.clone(),
        }))
    }
}

#[tonic::async_trait]
impl HostApi for CountingHost {
    async fn identity(&self) -> Result<pb::Identity, ClientError> {
        self.inner.identity().await
    }
    async fn attest(&self, nonce: Vec<u8>) -> Result<pb::Envelope, ClientError> {
        self.inner.attest(nonce).await
    }
    async fn health(&self) -> Result<pb::HealthReport, ClientError> {
        self.inner.health().await
    }
    async fn watch_health(&self) -> Result<HealthStream, ClientError> {
        let s = self.inner.watch_health().await?;
        self.open.fetch_add(1, Ordering::SeqCst);
        self.opened.fetch_add(1, Ordering::SeqCst);
        let guard = OpenGuard(self.open.clone());
        Ok(s.map(move |r| {
            let _held = &guard;
            r
        })
        .boxed())
    }
    async fn submit(&self, task: pb::SignedTask) -> Result<pb::TaskStatus, ClientError> {
        if self.ring == 1 {
            let _ = self.open_at_ring_1.compare_exchange(
                usize::MAX,
                self.open.load(Ordering::SeqCst),
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        self.inner.submit(task).await
    }
    async fn get_task(&self, id: &str) -> Result<Option<pb::TaskStatus>, ClientError> {
        self.inner.get_task(id).await
    }
}

/// Ring 0 soaks 1 s with both its hosts watched; by the time ring 1's first
/// task is sent the watchers are gone, and none is left when the wave ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_watchers_stop_when_the_ring_is_promoted() {
    let dir = tempfile::tempdir().unwrap();
    let (f, spec_path) = two_rings(dir.path(), "soak-stop", 1, false).await;
    let settings = Settings::load(Some(&f.settings)).unwrap();
    let inv = Inventory::load(&f.inventory).unwrap();
    let spec = WaveSpec::from_source(&Source::read(&spec_path).unwrap()).unwrap();
    let identity = common::identity(&f);
    let open = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let open_at_ring_1 = Arc::new(AtomicUsize::new(usize::MAX));
    let connector = Arc::new(Counting {
        inner: TlsConnector {
            identity,
            trust_domain: inv.trust_domain.clone(),
            connect_timeout: Duration::from_secs(3),
            rpc_timeout: Duration::from_secs(10),
        },
        open: open.clone(),
        opened: opened.clone(),
        open_at_ring_1: open_at_ring_1.clone(),
    });
    let outcome = drive(&settings, inv, spec, connector, Duration::from_secs(30)).await;
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(
        opened.load(Ordering::SeqCst),
        2,
        "one watcher per ring-0 host"
    );
    assert_eq!(
        open_at_ring_1.load(Ordering::SeqCst),
        0,
        "ring 0's watchers stopped before ring 1 started"
    );
    // Aborted tasks drop their streams on the runtime; give it a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while open.load(Ordering::SeqCst) != 0 {
        assert!(
            Instant::now() < deadline,
            "a soak watcher outlived the wave"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What a scripted agent does to the coordinator's soak calls; everything
/// else goes to the real agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// WatchHealth: one report, then the stream stays open and silent (an
    /// agent hung after its first report, or a path that drops packets
    /// without resetting the connection).
    SilentAfterFirst,
    /// WatchHealth: the first stream breaks 1.5 s in, the first reopen
    /// fails (the network is still down), the next one succeeds.
    BreaksOnce,
    /// Attest: every attestation after the first (attest-before) is signed
    /// by a key that is not the host's enrolled one.
    WrongKeyAfterFirst,
}

/// Calls a scripted host has seen, across connections.
#[derive(Debug, Default)]
struct Calls {
    watches: usize,
    attests: usize,
}

struct Scripted {
    inner: TlsConnector,
    scripts: BTreeMap<String, Script>,
    calls: Arc<Mutex<BTreeMap<String, Calls>>>,
    wrong_key: Arc<ringfence::keys::SigningKey>,
}

struct ScriptedHost {
    inner: Arc<dyn HostApi>,
    id: String,
    script: Option<Script>,
    calls: Arc<Mutex<BTreeMap<String, Calls>>>,
    wrong_key: Arc<ringfence::keys::SigningKey>,
}

#[tonic::async_trait]
impl Connector for Scripted {
    async fn connect(&self, host: &Host) -> Result<Arc<dyn HostApi>, String> {
        let inner = self.inner.connect(host).await?;
        Ok(Arc::new(ScriptedHost {
            inner,
            id: host.id.clone(),
            script: self.scripts.get(&host.id).copied(),
            calls: self.calls.clone(),
            wrong_key: self.wrong_key.clone(),
        }))
    }
}

impl ScriptedHost {
    /// Count a call; returns how many of its kind came before.
    fn count(&self, f: impl Fn(&mut Calls) -> &mut usize) -> usize {
        let mut calls = self.calls.lock().unwrap();
        let n = f(calls.entry(self.id.clone()).or_default());
        *n += 1;
        *n - 1
    }
}

#[tonic::async_trait]
impl HostApi for ScriptedHost {
    async fn identity(&self) -> Result<pb::Identity, ClientError> {
        self.inner.identity().await
    }
    async fn attest(&self, nonce: Vec<u8>) -> Result<pb::Envelope, ClientError> {
        let n = self.count(|c| &mut c.attests);
        let env = self.inner.attest(nonce.clone()).await?;
        if self.script != Some(Script::WrongKeyAfterFirst) || n == 0 {
            return Ok(env);
        }
        // The same statement, signed by another key.
        let att = pb::Attestation::decode(env.payload.as_slice()).unwrap();
        Ok(ringfence::attest::attest(
            &self.id,
            &self.wrong_key,
            &nonce,
            att.issued_at_unix_ms,
            att.report.unwrap_or_default(),
        ))
    }
    async fn health(&self) -> Result<pb::HealthReport, ClientError> {
        self.inner.health().await
    }
    async fn watch_health(&self) -> Result<HealthStream, ClientError> {
        let n = self.count(|c| &mut c.watches);
        let cut = |reason: &str| ClientError::Unreachable {
            host: self.id.clone(),
            reason: reason.into(),
        };
        match (self.script, n) {
            (Some(Script::SilentAfterFirst), _) => {
                let s = self.inner.watch_health().await?;
                Ok(s.take(1).chain(futures_util::stream::pending()).boxed())
            }
            (Some(Script::BreaksOnce), 0) => {
                let s = self.inner.watch_health().await?;
                let reset = cut("simulated: connection reset");
                Ok(
                    s.take_until(tokio::time::sleep(Duration::from_millis(1500)))
                        .chain(futures_util::stream::iter([Err(reset)]))
                        .boxed(),
                )
            }
            (Some(Script::BreaksOnce), 1) => Err(cut("simulated: network still down")),
            _ => self.inner.watch_health().await,
        }
    }
    async fn submit(&self, task: pb::SignedTask) -> Result<pb::TaskStatus, ClientError> {
        self.inner.submit(task).await
    }
    async fn get_task(&self, id: &str) -> Result<Option<pb::TaskStatus>, ClientError> {
        self.inner.get_task(id).await
    }
}

/// Run the wave of `two_rings` (in-process agents; ring 0 soaking `soak_s`,
/// budget 0) through `ringfence`'s own driver, with `scripts` on the
/// agents' calls and a report-age bound of `max_age_s`.
async fn scripted_wave(
    dir: &Path,
    wave_id: &str,
    soak_s: u64,
    max_age_s: u64,
    scripts: &[(&str, Script)],
) -> (LocalFleet, Outcome) {
    let (f, spec_path) = two_rings(dir, wave_id, soak_s, false).await;
    ringfence_testkit::set_key(
        &f.settings,
        "timeouts",
        "soak_report_max_age_s",
        max_age_s as i64,
    )
    .unwrap();
    let settings = Settings::load(Some(&f.settings)).unwrap();
    assert_eq!(
        settings.timeouts.soak_report_max_age(),
        Duration::from_secs(max_age_s)
    );
    let inv = Inventory::load(&f.inventory).unwrap();
    let spec = WaveSpec::from_source(&Source::read(&spec_path).unwrap()).unwrap();
    assert_eq!(spec.failure_budget, 0);
    let connector = Arc::new(Scripted {
        inner: TlsConnector {
            identity: common::identity(&f),
            trust_domain: inv.trust_domain.clone(),
            connect_timeout: Duration::from_secs(3),
            rpc_timeout: Duration::from_secs(10),
        },
        scripts: scripts
            .iter()
            .map(|(h, s)| ((*h).to_string(), *s))
            .collect(),
        calls: Arc::default(),
        wrong_key: Arc::new(ringfence::keys::generate()),
    });
    let outcome = drive(&settings, inv, spec, connector, Duration::from_secs(60)).await;
    (f, outcome)
}

/// The halt of a scripted wave: a soak regression of `host` in ring 0.
fn soak_halt(outcome: &Outcome, host: &str) -> HaltReport {
    let Outcome::Halted(h) = outcome else {
        panic!("the wave must halt on a soak regression, it ended {outcome:?}");
    };
    assert_eq!(
        (h.ring, h.host.as_deref(), h.step, h.kind),
        (0, Some(host), Stage::Soak, FailureKind::SoakRegression),
        "{h:?}"
    );
    h.clone()
}

/// The packets of ring 0, oldest first, and the trust file and enrolled keys
/// they are verified against.
fn ring_0_evidence(
    f: &LocalFleet,
    wave_id: &str,
) -> (
    Vec<Vec<u8>>,
    TrustSet,
    BTreeMap<String, ringfence::keys::VerifyingKey>,
) {
    let dir = WavePaths::new(&f.state_dir, wave_id).evidence_dir;
    let files = evidence::series(&dir, 0);
    assert!(!files.is_empty(), "ring 0 has an evidence packet");
    let settings = Settings::load(Some(&f.settings)).unwrap();
    (
        files.iter().map(|p| std::fs::read(p).unwrap()).collect(),
        TrustSet::load(&settings.trust_file).unwrap(),
        Inventory::load(&f.inventory).unwrap().enrolled_keys(),
    )
}

fn packet_of(bytes: &[u8]) -> evidence::Packet {
    use base64::Engine;
    let file: evidence::PacketFile = serde_json::from_slice(bytes).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(file.payload)
        .unwrap();
    serde_json::from_slice(&payload).unwrap()
}

/// An agent that sends one HEALTHY report and then keeps its stream open
/// and silent is not healthy: the coordinator fails its soak once no new
/// report has come for the bound (3 s), long before the 10 s soak ends, and
/// with budget 0 the wave halts; ring 1 is never touched, and the silent
/// host is drained again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_silent_after_its_first_report_fails_the_soak_and_halts_the_wave() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (f, outcome) = scripted_wave(
        dir.path(),
        "soak-silent",
        10,
        3,
        &[("gpu-a", Script::SilentAfterFirst)],
    )
    .await;
    let h = soak_halt(&outcome, "gpu-a");
    assert!(
        h.reason.contains("no health report for 3 s"),
        "{}",
        h.reason
    );
    assert!(
        h.reason.contains("drained again by the wave"),
        "{}",
        h.reason
    );
    eprintln!("wave start to halt: {:?}", started.elapsed());
    // What the agents recorded: gpu-a patched, undrained, drained again;
    // gpu-b passed; ring 1 untouched.
    assert_eq!(
        common::actions(&common::journal(&f, "gpu-a").await),
        ["drain", "patch", "validate", "undrain", "drain"]
    );
    assert!(common::health(&f, "gpu-a").await.draining);
    assert!(!common::health(&f, "gpu-b").await.draining);
    assert!(
        common::journal(&f, "gpu-c").await.is_empty(),
        "ring 1 untouched"
    );
    // The halted ring's evidence verifies; nothing in it says gpu-a soaked.
    let (packets, trust, enrolled) = ring_0_evidence(&f, "soak-silent");
    let last = packets.last().unwrap();
    let v = evidence::verify(last, &trust, &enrolled).unwrap();
    assert_eq!(v.packet.outcome, "halted");
    let a = v.hosts.iter().find(|x| x.host_id == "gpu-a").unwrap();
    assert_eq!(a.phase, "failed");
    assert!(a.soak.is_none());
}

/// A one-second network blip during the soak: gpu-a's stream breaks, the
/// first reopen fails, the next succeeds and gpu-a attests HEALTHY to a
/// fresh nonce. The wave is not halted: every host attests at the end of
/// the soak, ring 0 is promoted and ring 1 is patched. The evidence lists
/// the reconnect and end-of-soak attestations and `evidence verify`
/// accepts it, and rejects each tampered copy with its named check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_once_and_reconnects_healthy_does_not_halt_the_wave() {
    let dir = tempfile::tempdir().unwrap();
    let (f, outcome) = scripted_wave(
        dir.path(),
        "soak-blip",
        6,
        5,
        &[("gpu-a", Script::BreaksOnce)],
    )
    .await;
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(
        common::actions(&common::journal(&f, "gpu-c").await),
        ["drain", "patch", "validate", "undrain"],
        "ring 1 was patched after ring 0's soak"
    );
    for h in ["gpu-a", "gpu-b"] {
        assert_eq!(
            common::actions(&common::journal(&f, h).await),
            ["drain", "patch", "validate", "undrain"],
            "{h} was never drained again"
        );
    }

    let (packets, trust, enrolled) = ring_0_evidence(&f, "soak-blip");
    assert_eq!(packets.len(), 1, "ring 0 completed once, never halted");
    let bytes = &packets[0];
    let v = evidence::verify(bytes, &trust, &enrolled).unwrap();
    assert_eq!(v.packet.outcome, "completed");
    let purposes = |host: &str| -> Vec<String> {
        v.packet
            .hosts
            .iter()
            .find(|x| x.host_id == host)
            .unwrap()
            .soak_attestations
            .iter()
            .map(|s| s.purpose.clone())
            .collect()
    };
    assert_eq!(purposes("gpu-a"), ["reconnect", "end_of_soak"]);
    assert_eq!(purposes("gpu-b"), ["end_of_soak"]);
    for h in &v.hosts {
        let soak = h.soak.as_ref().expect("an end-of-soak attestation");
        assert_eq!(soak.verdict, "HEALTHY", "{}", h.host_id);
    }
    // Every soak attestation was counted among those checked.
    assert!(
        v.attestations_checked >= 2 * 2 + 3,
        "{}",
        v.attestations_checked
    );

    // Tampered copies, re-signed with the coordinator key itself: each is
    // refused by its check.
    let settings = Settings::load(Some(&f.settings)).unwrap();
    let signer =
        ringfence_coordinator::wave::load_signer(&settings.signing.key, &settings.signing.key_id)
            .unwrap();
    let check = |edit: &dyn Fn(&mut evidence::Packet)| {
        let mut p = packet_of(bytes);
        edit(&mut p);
        let b = evidence::seal(&p, &signer.key_id, &signer.key).unwrap();
        evidence::verify(&b, &trust, &enrolled)
            .map(|_| ())
            .map_err(|e| e.check())
    };
    let host = |p: &mut evidence::Packet, id: &str| -> usize {
        p.hosts.iter().position(|x| x.host_id == id).unwrap()
    };
    assert_eq!(check(&|_| {}), Ok(()), "an untouched copy verifies");
    assert_eq!(
        check(&|p| {
            let i = host(p, "gpu-a");
            p.hosts[i].soak_attestations[1].nonce = base64_of(&[9; 32]);
        }),
        Err("soak_attestation_nonce")
    );
    assert_eq!(
        check(&|p| {
            let i = host(p, "gpu-a");
            p.hosts[i].soak_attestations[0].requested_at_ms += 3_600_000;
            p.hosts[i].soak_attestations[0].received_at_ms += 3_600_000;
        }),
        Err("soak_attestation_window")
    );
    assert_eq!(
        check(&|p| {
            // gpu-b's end-of-soak attestation put under gpu-a's name.
            let b = host(p, "gpu-b");
            let a = host(p, "gpu-a");
            let theirs = p.hosts[b].soak_attestations[0].clone();
            p.hosts[a].soak_attestations[1] = theirs;
        }),
        Err("soak_attestation_signature")
    );
    assert_eq!(
        check(&|p| {
            let i = host(p, "gpu-b");
            p.hosts[i].soak_attestations.clear();
        }),
        Err("host_soaked")
    );
    assert_eq!(
        check(&|p| {
            let i = host(p, "gpu-b");
            p.hosts[i].soak_attestations[0].verdict = "UNHEALTHY".into();
        }),
        Err("recorded_field")
    );
}

/// A host whose end-of-soak attestation is not signed by its enrolled key
/// cannot be promoted on it: a soak regression, and the wave halts (budget
/// 0) with ring 1 untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_of_soak_attestation_by_a_wrong_key_is_a_soak_regression() {
    let dir = tempfile::tempdir().unwrap();
    let (f, outcome) = scripted_wave(
        dir.path(),
        "soak-wrong-key",
        2,
        5,
        &[("gpu-b", Script::WrongKeyAfterFirst)],
    )
    .await;
    let h = soak_halt(&outcome, "gpu-b");
    assert!(
        h.reason
            .contains("end-of-soak attestation: attestation does not verify"),
        "{}",
        h.reason
    );
    assert!(
        common::journal(&f, "gpu-c").await.is_empty(),
        "ring 1 untouched"
    );
    assert_eq!(
        common::actions(&common::journal(&f, "gpu-b").await),
        ["drain", "patch", "validate", "undrain", "drain"]
    );
    // The halted ring's evidence verifies; gpu-a's end-of-soak attestation
    // is in it if it arrived before the halt stopped the soak.
    let (packets, trust, enrolled) = ring_0_evidence(&f, "soak-wrong-key");
    let v = evidence::verify(packets.last().unwrap(), &trust, &enrolled).unwrap();
    let a = v.hosts.iter().find(|x| x.host_id == "gpu-a").unwrap();
    if let Some(s) = &a.soak {
        assert_eq!(s.verdict, "HEALTHY");
    }
    let b = v.hosts.iter().find(|x| x.host_id == "gpu-b").unwrap();
    assert!(
        b.soak.is_none(),
        "an unverifiable attestation is not evidence"
    );
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The host simulator (tests, the scale bench) heartbeats like the agent:
/// simulated hosts whose health never changes pass a 4 s soak under a 2 s
/// report-age bound, and each gives an end-of-soak attestation the
/// coordinator keeps for the ring's evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_hosts_heartbeat_through_a_soak_and_attest_at_its_end() {
    use ringfence_coordinator::spec::RingSpec;
    use ringfence_coordinator::wave::model::{HostRecord, SoakAttestPurpose};
    let f = crate::wave_engine::sim_fleet(3, 50);
    let dir = tempfile::tempdir().unwrap();
    let mut d = crate::wave_engine::sim_driver(&f, dir.path(), "sim-soak", "560.1");
    d.spec.rings.insert(
        0,
        RingSpec {
            batch_size: 10,
            soak_s: 4,
        },
    );
    d.soak_report_max_age = Duration::from_secs(2);
    let store = d.store.clone();
    let outcome = tokio::time::timeout(Duration::from_secs(30), d.run())
        .await
        .expect("the wave ends")
        .unwrap();
    assert_eq!(outcome, Outcome::Completed);
    for h in &f.hosts {
        let rec: HostRecord = store.get_host(&h.host_id).unwrap().unwrap();
        let purposes: Vec<_> = rec.soak.iter().map(|s| s.purpose).collect();
        assert_eq!(purposes, [SoakAttestPurpose::EndOfSoak], "{}", h.host_id);
        assert_eq!(rec.soak[0].attestation.verdict, "HEALTHY");
    }
}

/// A simulated host whose health stream keeps saying HEALTHY (a fresh
/// report every 200 ms) while the host itself is UNHEALTHY by the end of
/// the soak: its end-of-soak attestation, signed by its own key, says so.
struct LyingStream {
    hosts: BTreeMap<String, ringfence_devfleet::simhost::SimHost>,
    liar: String,
    attests: Arc<AtomicUsize>,
}

struct LyingHost {
    sim: ringfence_devfleet::simhost::SimHost,
    liar: bool,
    attests: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Connector for LyingStream {
    async fn connect(&self, host: &Host) -> Result<Arc<dyn HostApi>, String> {
        let sim = self.hosts.get(&host.id).cloned().ok_or("no such host")?;
        Ok(Arc::new(LyingHost {
            sim,
            liar: host.id == self.liar,
            attests: self.attests.clone(),
        }))
    }
}

#[tonic::async_trait]
impl HostApi for LyingHost {
    async fn identity(&self) -> Result<pb::Identity, ClientError> {
        self.sim.identity().await
    }
    async fn attest(&self, nonce: Vec<u8>) -> Result<pb::Envelope, ClientError> {
        if self.liar && self.attests.fetch_add(1, Ordering::SeqCst) > 0 {
            // After attest-before: the GPU has an uncorrected ECC error now.
            self.sim.state().unhealthy = true;
        }
        self.sim.attest(nonce).await
    }
    async fn health(&self) -> Result<pb::HealthReport, ClientError> {
        self.sim.health().await
    }
    async fn watch_health(&self) -> Result<HealthStream, ClientError> {
        if !self.liar {
            return self.sim.watch_health().await;
        }
        let template = self.sim.health().await?;
        Ok(futures_util::stream::unfold(template, |mut r| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            r.collected_at_unix_ms = ringfence::time::Clock::now_ms(&SystemClock);
            Some((Ok(r.clone()), r))
        })
        .boxed())
    }
    async fn submit(&self, task: pb::SignedTask) -> Result<pb::TaskStatus, ClientError> {
        self.sim.submit(task).await
    }
    async fn get_task(&self, id: &str) -> Result<Option<pb::TaskStatus>, ClientError> {
        self.sim.get_task(id).await
    }
}

/// Promotion rests on signed evidence, not on the stream: a host whose
/// stream says HEALTHY but whose end-of-soak attestation (its own key, the
/// coordinator's fresh nonce) is UNHEALTHY fails the soak, and the wave
/// halts (budget 0). The UNHEALTHY attestation is kept: the halted ring's
/// evidence lists it and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_end_of_soak_attestation_is_a_soak_regression() {
    use ringfence_coordinator::spec::RingSpec;
    let f = crate::wave_engine::sim_fleet(2, 50);
    let dir = tempfile::tempdir().unwrap();
    let mut d = crate::wave_engine::sim_driver(&f, dir.path(), "sim-liar", "560.1");
    d.spec.rings.insert(
        0,
        RingSpec {
            batch_size: 10,
            soak_s: 2,
        },
    );
    d.soak_report_max_age = Duration::from_secs(5);
    d.connector = Arc::new(LyingStream {
        hosts: f
            .hosts
            .iter()
            .map(|h| (h.host_id.clone(), h.clone()))
            .collect(),
        liar: "h1".into(),
        attests: Arc::default(),
    });
    let (store, trust, enrolled) = (
        d.store.clone(),
        d.trust.clone(),
        d.inventory.enrolled_keys(),
    );
    let outcome = tokio::time::timeout(Duration::from_secs(30), d.run())
        .await
        .expect("the wave ends")
        .unwrap();
    let Outcome::Halted(h) = &outcome else {
        panic!("the wave must halt, it ended {outcome:?}");
    };
    assert_eq!(
        (h.host.as_deref(), h.step, h.kind),
        (Some("h1"), Stage::Soak, FailureKind::SoakRegression),
        "{h:?}"
    );
    assert!(
        h.reason
            .contains("end-of-soak attestation: attested UNHEALTHY (ecc_uncorrected_volatile)"),
        "{}",
        h.reason
    );
    let files = evidence::series(&store.paths.evidence_dir, 0);
    let v = evidence::verify(
        &std::fs::read(files.last().unwrap()).unwrap(),
        &trust,
        &enrolled,
    )
    .unwrap();
    assert_eq!(v.packet.outcome, "halted");
    let liar = v.packet.hosts.iter().find(|x| x.host_id == "h1").unwrap();
    assert_eq!(liar.phase, "failed");
    let kept: Vec<_> = liar
        .soak_attestations
        .iter()
        .map(|s| (s.purpose.as_str(), s.verdict.as_str()))
        .collect();
    assert_eq!(kept, [("end_of_soak", "UNHEALTHY")]);
}

/// The wave of `spec` driven in-process through `connector`, as `wave run`
/// builds it (the fleet's settings and trust file, a quiet live view), to
/// its outcome within `limit`.
async fn drive(
    settings: &Settings,
    inv: Inventory,
    spec: WaveSpec,
    connector: Arc<dyn Connector>,
    limit: Duration,
) -> Outcome {
    let store =
        Arc::new(WaveStore::open(&settings.state_dir, &spec.wave_id, &SystemClock).unwrap());
    let mut driver = ringfence_coordinator::cli::driver(
        settings,
        TrustSet::load(&settings.trust_file).unwrap(),
        inv,
        spec,
        store,
        connector,
        Reporter::new(true),
        Vec::new(),
    )
    .unwrap();
    driver.poll_interval = Duration::from_millis(50);
    tokio::time::timeout(limit, driver.run())
        .await
        .expect("the wave ends in time")
        .unwrap()
}
