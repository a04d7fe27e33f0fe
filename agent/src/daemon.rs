//! Wires the agent together: trust file, TLS material, attestation key,
//! task engine, health poll loop, gRPC listener, systemd notifications.
//! Everything is loaded and validated before the listener binds, and
//! [`check`] (`ringfenced check-config`) checks the same without changing
//! anything. Reports collected while the host is draining carry the
//! engine's drain mark.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ringfence::pb;
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::time::Clock;
use ringfence::tls::{ReloadableServerConfig, ServerTlsPaths};
use ringfence::trust::TrustSet;
use tonic_health::ServingStatus;

use crate::command::{CommandRunner, ProcessRunner};
use crate::config::AgentConfig;
use crate::healthcell::{HealthCell, ReportSource};
use crate::notify::{self, Heartbeat, Notifier};
use crate::server::{AgentRouter, AgentService};
use crate::tasks::{DrainMarkCell, EngineParts, HealthSource, TaskEngine};

/// Name of the attestation key file under the state dir.
pub const HOST_KEY_FILE: &str = "host.key";

/// The agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// the trust file is unusable
    #[error("trust file: {0}")]
    Trust(#[from] ringfence::trust::TrustError),
    /// the TLS material is unusable
    #[error("TLS: {0}")]
    Tls(#[from] ringfence::tls::TlsError),
    /// the attestation key is unusable
    #[error("attestation key: {0}")]
    Key(#[from] ringfence::keys::KeyError),
    /// the task engine could not open its journal or recover
    #[error("task engine: {0}")]
    Engine(#[from] crate::tasks::EngineError),
    /// the listener could not bind
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured `listen` address.
        addr: SocketAddr,
        /// The bind error (address in use, permission denied, ...).
        #[source]
        source: std::io::Error,
    },
    /// the metrics endpoint could not start
    #[error("metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    /// the state directory could not be created
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The configured `state_dir`.
        path: PathBuf,
        /// The creation error.
        #[source]
        source: std::io::Error,
    },
    /// the state directory (or the directory it would be created in) is unusable
    #[error("state directory {path}: {reason}")]
    StateDirUnusable {
        /// The configured `state_dir`.
        path: PathBuf,
        /// Why it is unusable (not a directory, not writable, ...).
        reason: String,
    },
    /// the GPU backend cannot start (e.g. the simulated backend's scenario file)
    #[error("GPU backend: {0}")]
    Gpu(#[from] crate::gpu::GpuError),
}

/// Something `check-config` noticed that does not stop `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckNote {
    /// `[gpu] nvml_library` names a file that does not exist: the agent
    /// runs and reports UNHEALTHY (`nvml_unavailable`).
    NvmlLibraryMissing(PathBuf),
    /// No `ring` in the config: the agent treats itself as protected.
    NoRing,
}

impl std::fmt::Display for CheckNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NvmlLibraryMissing(p) => write!(
                f,
                "[gpu] nvml_library {} does not exist: the agent would run and report UNHEALTHY (nvml_unavailable)",
                p.display()
            ),
            Self::NoRing => write!(
                f,
                "no `ring` configured: the agent treats itself as protected (Patch, rollback, forced Undrain and AckFaults of an UNHEALTHY fault need ring approvals)"
            ),
        }
    }
}

/// Everything loaded and validated before anything binds.
#[derive(Debug)]
pub struct Prepared {
    /// The agent config.
    pub config: AgentConfig,
    /// The trust file.
    pub trust: TrustSet,
    /// TLS material (reloadable).
    pub tls: ReloadableServerConfig,
    /// Attestation key.
    pub key: SigningKey,
    /// Current boot id.
    pub boot_id: String,
}

/// Read the current boot id (empty if unreadable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Load and validate the trust file, TLS material and attestation key.
pub fn prepare(config: AgentConfig) -> Result<Prepared, DaemonError> {
    let (trust, tls) = load_trust_and_tls(&config)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| DaemonError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let (key, created) = ringfence::keys::load_or_create(&config.state_dir.join(HOST_KEY_FILE))?;
    if created {
        tracing::info!(
            fingerprint = %ringfence::keys::fingerprint(&key.verifying_key()),
            "created attestation key"
        );
    }
    Ok(Prepared {
        config,
        trust,
        tls,
        key,
        boot_id: boot_id(),
    })
}

/// `ringfenced check-config`: what `run` loads before it serves, read-only:
/// the trust file, the TLS material (for this host id), the state directory
/// (usable, or creatable), an existing attestation key, and the simulated
/// GPU backend's scenario file. It creates neither the state directory nor
/// the key and never loads NVML, so a config can be checked without
/// changing the host, also while the agent runs. Returns what it noticed
/// that would not stop `run`.
pub fn check(config: &AgentConfig) -> Result<Vec<CheckNote>, DaemonError> {
    load_trust_and_tls(config)?;
    check_state_dir(&config.state_dir)?;
    let key = config.state_dir.join(HOST_KEY_FILE);
    if key.exists() {
        ringfence::keys::read_signing_key(&key)?;
    }
    let mut notes = Vec::new();
    match config.gpu.backend {
        crate::gpu::BackendKind::Simulated => {
            crate::gpu::open(&config.gpu)?;
        }
        crate::gpu::BackendKind::Nvml => {
            if let Some(lib) = &config.gpu.nvml_library
                && !lib.exists()
            {
                notes.push(CheckNote::NvmlLibraryMissing(lib.clone()));
            }
        }
    }
    if config.ring.is_none() {
        notes.push(CheckNote::NoRing);
    }
    Ok(notes)
}

/// The state directory is a writable directory, or the nearest existing
/// directory above it is one (so that `run` can create it).
fn check_state_dir(path: &std::path::Path) -> Result<(), DaemonError> {
    use nix::unistd::{AccessFlags, access};
    let unusable = |reason: String| DaemonError::StateDirUnusable {
        path: path.to_path_buf(),
        reason,
    };
    let mut existing = path;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => return Ok(()),
        }
    }
    let what = if existing == path {
        String::new()
    } else {
        format!("cannot be created: {} ", existing.display())
    };
    if !existing.is_dir() {
        return Err(unusable(format!("{what}is not a directory")));
    }
    access(existing, AccessFlags::W_OK | AccessFlags::X_OK)
        .map_err(|e| unusable(format!("{what}is not writable ({e})")))
}

fn load_trust_and_tls(
    config: &AgentConfig,
) -> Result<(TrustSet, ReloadableServerConfig), DaemonError> {
    let trust = TrustSet::load(&config.trust_file)?;
    // The certificate must be this host's (SPIFFE id and DNS name), at
    // start and at every reload.
    let tls = ReloadableServerConfig::load_for_host(
        ServerTlsPaths {
            cert: config.tls.cert.clone(),
            key: config.tls.key.clone(),
            ca_bundle: config.tls.ca_bundle.clone(),
            crl: config.tls.crl.clone(),
        },
        &config.tls.trust_domain,
        &config.host_id,
    )?;
    Ok((trust, tls))
}

/// Why [`serve`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The `shutdown` future completed (SIGTERM, SIGINT, a test).
    Shutdown,
    /// A `restarts_agent` patch installed a new agent and its task is
    /// journalled AWAITING_RESTART: the process must exit so that the
    /// service manager starts the new binary.
    RestartRequested,
}

/// The engine's view of health: fresh reports and attestations over the
/// report source, plus acknowledged faults.
struct AgentHealth {
    host_id: String,
    key: Arc<SigningKey>,
    source: Arc<dyn ReportSource>,
    acked: Mutex<Vec<String>>,
    clock: Arc<dyn Clock>,
}

impl HealthSource for AgentHealth {
    fn fresh_report(&self, draining: bool) -> pb::HealthReport {
        self.source.collect(draining)
    }

    fn attest(&self, nonce: &[u8], draining: bool) -> pb::Envelope {
        let report = self.source.collect(draining);
        ringfence::attest::attest(&self.host_id, &self.key, nonce, self.clock.now_ms(), report)
    }

    fn acknowledge(&self, ack: &pb::AckFaults) -> Vec<String> {
        let report = self.source.collect(false);
        let ids: Vec<String> = report
            .reasons
            .iter()
            .filter(|r| ack.codes.is_empty() || ack.codes.contains(&r.code))
            .filter(|r| ack.gpu_index < 0 || r.gpu_index == ack.gpu_index)
            .map(|r| r.fault_id.clone())
            .collect();
        self.source.acknowledge(&ids);
        if let Ok(mut a) = self.acked.lock() {
            a.extend(ids.iter().cloned());
        }
        ids
    }
}

/// What a running agent exposes to its caller (tests, the demo).
#[derive(Debug, Clone)]
pub struct Handles {
    /// The bound address.
    pub addr: SocketAddr,
    /// The task engine.
    pub engine: TaskEngine,
    /// The health cell.
    pub health: Arc<HealthCell>,
    /// TLS material (call `reload()` as SIGHUP would).
    pub tls: ReloadableServerConfig,
}

/// Options of [`serve`] beyond the config. The daemon builds them with
/// [`ServeOptions::new`]; the in-process test fleet (crate
/// `ringfence-devfleet`) with [`ServeOptions::in_process`].
pub struct ServeOptions {
    /// Where reports come from.
    pub source: Arc<dyn ReportSource>,
    /// The executor seam for hooks, patches and reboots.
    pub runner: Arc<dyn CommandRunner>,
    /// Health poll interval.
    pub poll_interval: Duration,
    /// systemd notifications.
    pub notifier: Notifier,
    /// The wall clock of the task engine and of attestations (the one the
    /// caller built, shared with its [`CollectorSource`]).
    pub clock: Arc<dyn Clock>,
    /// Called once the listener is bound (before READY).
    on_ready: Option<Box<dyn FnOnce(Handles) + Send>>,
    /// Install the SIGHUP reloader (the real daemon; not in-process fleets).
    sighup: bool,
    /// Grace given to a running task step at shutdown.
    shutdown_grace: Duration,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("poll_interval", &self.poll_interval)
            .finish_non_exhaustive()
    }
}

impl ServeOptions {
    /// Real processes, real notifications.
    pub fn new(
        source: Arc<dyn ReportSource>,
        poll_interval: Duration,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            source,
            runner: Arc::new(ProcessRunner::default()),
            poll_interval,
            notifier: Notifier::from_env(),
            clock,
            on_ready: None,
            sighup: true,
            shutdown_grace: Duration::from_secs(30),
        }
    }

    /// An agent inside another process (the test fleet of
    /// `ringfence-devfleet`, nothing else): no systemd notifications, no
    /// SIGHUP reloader (the process is not the agent's), `shutdown_grace`
    /// for a running step at shutdown, and `on_ready` called once the
    /// listener is bound.
    #[doc(hidden)]
    pub fn in_process(
        source: Arc<dyn ReportSource>,
        poll_interval: Duration,
        shutdown_grace: Duration,
        on_ready: Box<dyn FnOnce(Handles) + Send>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            source,
            runner: Arc::new(ProcessRunner::default()),
            poll_interval,
            notifier: Notifier::default(),
            clock,
            on_ready: Some(on_ready),
            sighup: false,
            shutdown_grace,
        }
    }
}

/// Run the agent until `shutdown` completes or a self-upgrade asks for a
/// restart (see [`Stopped`]); then stop accepting tasks, give
/// a running step its bounded time, sync the journal and send STOPPING.
pub async fn serve(
    prep: Prepared,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Stopped, DaemonError> {
    let cfg = &prep.config;
    let key = Arc::new(prep.key);
    let clock = opts.clock.clone();
    // Every report collected while draining carries the engine's drain mark.
    let drain_mark = DrainMarkCell::default();
    let source: Arc<dyn ReportSource> = Arc::new(MarkedSource {
        inner: opts.source.clone(),
        mark: drain_mark.clone(),
    });
    let health_src = Arc::new(AgentHealth {
        host_id: cfg.host_id.clone(),
        key: key.clone(),
        source: source.clone(),
        acked: Mutex::new(Vec::new()),
        clock: clock.clone(),
    });
    let engine = TaskEngine::open_parts(EngineParts {
        state_dir: cfg.state_dir.clone(),
        host_id: cfg.host_id.clone(),
        ring: cfg.ring,
        trust: prep.trust,
        drain: cfg.drain.clone(),
        reboot: cfg.reboot.clone(),
        patch: cfg.patch.clone(),
        health: health_src,
        runner: opts.runner.clone(),
        clock,
        boot_id: prep.boot_id.clone(),
        agent_version: ringfence::VERSION.to_string(),
        drain_mark,
    })?;

    // First report before serving, so the first answer is real.
    let first_source = source.clone();
    let draining = *engine.draining().borrow();
    let first = tokio::task::spawn_blocking(move || first_source.collect(draining))
        .await
        .unwrap_or_default();
    let first_verdict = crate::healthcell::verdict_name(first.verdict);
    let health = Arc::new(HealthCell::new(first));

    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_serving(&reporter, health.serving()).await;

    let spiffe = SpiffeId::new(&cfg.tls.trust_domain, Role::Host, &cfg.host_id)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let service = AgentService {
        host_id: cfg.host_id.clone(),
        spiffe_id: spiffe,
        key,
        boot_id: prep.boot_id.clone(),
        health: health.clone(),
        source: source.clone(),
        engine: engine.clone(),
        watch_slots: Arc::default(),
        fresh: Arc::default(),
    };
    let mut routes = tonic::service::Routes::default();
    routes = routes
        .add_service(AgentRouter::new(service))
        .add_service(health_service);

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| DaemonError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let _metrics = crate::metrics::start(cfg, &health, &engine, &prep.tls).await?;
    if opts.sighup {
        spawn_reloader(prep.tls.clone(), engine.clone(), cfg.trust_file.clone())?;
    }

    // Poll loop: fresh report every interval and whenever draining changes;
    // each is sent to every WatchHealth stream (the heartbeat).
    let heartbeat = Heartbeat::new();
    let poll = tokio::spawn(poll_loop(
        source,
        health.clone(),
        engine.clone(),
        reporter,
        opts.poll_interval,
        heartbeat.clone(),
    ));
    if let Some(interval) = notify::watchdog_interval() {
        let stale = (opts.poll_interval * 3).max(interval * 2);
        notify::spawn_watchdog(opts.notifier.clone(), interval, heartbeat, stale);
    }
    notify::spawn_status_forwarder(opts.notifier.clone(), engine.activity());

    if let Some(cb) = opts.on_ready {
        cb(Handles {
            addr,
            engine: engine.clone(),
            health: health.clone(),
            tls: prep.tls.clone(),
        });
    }
    if let Err(e) = opts.notifier.ready() {
        tracing::warn!(error = %e, "READY notify failed");
    }
    tracing::info!(%addr, host_id = %cfg.host_id, verdict = first_verdict, "ringfenced serving");

    let notifier = opts.notifier.clone();
    let grace = opts.shutdown_grace;
    let engine_for_stop = engine.clone();
    let stopped = Arc::new(Mutex::new(Stopped::Shutdown));
    let stopped_by = stopped.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            () = engine_for_stop.restart_requested() => {
                tracing::info!("self-upgrade installed: stopping so that the new agent starts");
                if let Ok(mut s) = stopped_by.lock() {
                    *s = Stopped::RestartRequested;
                }
            }
        }
        tracing::info!("shutting down: no new tasks");
        let _ = notifier.stopping();
        match engine_for_stop.shutdown(grace).await {
            Ok(true) => tracing::info!("journal synced"),
            Ok(false) => tracing::warn!(
                "a task step was still running at shutdown; it will be reported INTERRUPTED"
            ),
            Err(e) => tracing::error!(error = %e, "journal sync failed at shutdown"),
        }
    };
    let result = ringfence::tls::serve_with_limits(
        listener,
        prep.tls,
        routes,
        ringfence::tls::ServeLimits::default(),
        stop,
    )
    .await;
    poll.abort();
    result?;
    Ok(stopped.lock().map(|s| *s).unwrap_or(Stopped::Shutdown))
}

/// On every SIGHUP: reload the TLS material (certificates, CA bundle, CRL;
/// open connections of clients the new CRL revokes are closed) and the trust
/// file (coordinator, approver and revoked keys; the next task is verified
/// against it). A file that fails to load keeps the last good one in force
/// and the error is logged. The handler is registered before this returns.
fn spawn_reloader(
    tls: ReloadableServerConfig,
    engine: TaskEngine,
    trust_file: PathBuf,
) -> Result<(), DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).map_err(ringfence::tls::TlsError::Signal)?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading TLS material and the trust file");
            // reload() logs its own failure; the old config keeps serving.
            let _ = tls.reload();
            let path = trust_file.clone();
            match tokio::task::spawn_blocking(move || TrustSet::load(&path)).await {
                Ok(Ok(trust)) => {
                    engine.set_trust(trust);
                    tracing::info!(path = %trust_file.display(), "trust file reloaded");
                }
                Ok(Err(e)) => tracing::error!(error = %e,
                    "trust file reload failed; still using the previous trust file"),
                Err(e) => tracing::error!(error = %e, "trust file reload panicked"),
            }
        }
    });
    Ok(())
}

async fn set_serving(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status("ringfence.v1.Agent", status)
        .await;
}

async fn poll_loop(
    source: Arc<dyn ReportSource>,
    health: Arc<HealthCell>,
    engine: TaskEngine,
    reporter: tonic_health::server::HealthReporter,
    interval: Duration,
    heartbeat: Heartbeat,
) {
    let mut draining_rx = engine.draining();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = draining_rx.changed() => {
                if r.is_err() { return; }
                // Draining flips NOT_SERVING at once, before the next poll.
                if *draining_rx.borrow_and_update() {
                    set_serving(&reporter, false).await;
                }
            }
        }
        heartbeat.beat();
        let draining = *engine.draining().borrow();
        let src = source.clone();
        let ticket = health.ticket();
        match tokio::task::spawn_blocking(move || src.collect(draining)).await {
            Ok(report) => {
                // Logs "health changed" when it did.
                health.publish_collected(ticket, report);
                set_serving(&reporter, health.serving()).await;
            }
            Err(e) => tracing::error!(error = %e, "health collection panicked"),
        }
    }
}

/// A report source whose reports, when collected while draining, carry the
/// engine's drain mark (who drained the host, when and why).
struct MarkedSource {
    inner: Arc<dyn ReportSource>,
    mark: DrainMarkCell,
}

impl ReportSource for MarkedSource {
    fn collect(&self, draining: bool) -> pb::HealthReport {
        let mut report = self.inner.collect(draining);
        if draining {
            report.drain_mark = self.mark.get();
        }
        report
    }

    fn acknowledge(&self, fault_ids: &[String]) {
        self.inner.acknowledge(fault_ids);
    }
}

/// The production [`ReportSource`]: the health collector over the configured
/// GPU backend, with the host's identity and acknowledged faults.
pub struct CollectorSource {
    collector: crate::health::Collector,
    host_id: String,
    acknowledged: Mutex<Vec<String>>,
}

impl std::fmt::Debug for CollectorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorSource")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

impl CollectorSource {
    /// Open the configured GPU backend and start the collector (XID watch).
    /// A backend that cannot load NVML still yields a source: its reports
    /// are UNHEALTHY with `nvml_unavailable`, and the agent keeps serving.
    /// `clock` stamps reports and recorded XIDs.
    pub fn start(
        config: &AgentConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, crate::health::HealthError> {
        let backend = crate::gpu::open(&config.gpu).map_err(crate::health::HealthError::from)?;
        let collector = crate::health::Collector::start(
            backend,
            config.health.clone(),
            config.gpu.expected_gpus,
            &config.state_dir,
            std::path::Path::new("/proc/sys/kernel/random/boot_id"),
            clock,
        )?;
        Ok(Self {
            collector,
            host_id: config.host_id.clone(),
            acknowledged: Mutex::new(Vec::new()),
        })
    }
}

impl ReportSource for CollectorSource {
    fn collect(&self, draining: bool) -> pb::HealthReport {
        let acknowledged = self
            .acknowledged
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        self.collector.collect(&crate::health::ReportContext {
            host_id: self.host_id.clone(),
            agent_version: ringfence::VERSION.to_string(),
            draining,
            acknowledged,
        })
    }

    fn acknowledge(&self, fault_ids: &[String]) {
        if let Ok(mut a) = self.acknowledged.lock() {
            for id in fault_ids {
                if !a.contains(id) {
                    a.push(id.clone());
                }
            }
        }
    }
}
