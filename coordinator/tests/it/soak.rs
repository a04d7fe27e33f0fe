#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The soak: while a ring soaks, its hosts are watched through WatchHealth
//! and a regression fails the ring. Real agents (in-process with simulated
//! GPUs playing the fake-NVML scenario format, or `ringfenced` processes on
//! the fake NVML where an agent must die), real mTLS and signatures, judged
//! by what the agents recorded.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ringfence::config::Source;
use ringfence::pb;
use ringfence::time::SystemClock;
use ringfence::trust::TrustSet;
use ringfence_coordinator::client::{ClientError, HealthStream, HostApi};
use ringfence_coordinator::inventory::{Host, Inventory};
use ringfence_coordinator::report::Reporter;
use ringfence_coordinator::settings::Settings;
use ringfence_coordinator::spec::WaveSpec;
use ringfence_coordinator::store::{WavePaths, WaveStore};
use ringfence_coordinator::wave::{Connector, Outcome, TlsConnector};
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
    let got = fail_during_soak(&mut f, &spec, "soak-lost", 0, "gpu-a", |f| f.kill("gpu-a")).await;
    assert!(
        got.detail.contains("unreachable during soak"),
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
    let store =
        Arc::new(WaveStore::open(&settings.state_dir, &spec.wave_id, &SystemClock).unwrap());
    let mut driver = ringfence_coordinator::cli::driver(
        &settings,
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
    let outcome = tokio::time::timeout(Duration::from_secs(30), driver.run())
        .await
        .expect("the wave finishes")
        .unwrap();
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
