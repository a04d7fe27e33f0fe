//! A local test fleet on this machine ([`LocalFleet`]; "fleet" alone means
//! the real one): a throwaway PKI, trust file,
//! coordinator and approver keys, and one real agent per host — either
//! in-process (`ringfence-demo`) or as separate `ringfenced` processes on
//! their own 127.0.0.x addresses with the fake NVML library (the
//! multi-process tests). Every agent has its own state dir, certificate,
//! attestation key and simulated GPUs whose driver version lives in a file
//! the patch profile rewrites.

use ringfence::time::{Clock, SystemClock};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ringfence::keys;
use ringfence::pki;
use ringfence::spiffe::Role;
use ringfence_testkit::agent_config::{AgentToml, DrainSection, GpuSection, TlsSection};
use ringfence_testkit::trust::TrustFile;

/// The driver version every simulated host starts on.
pub const OLD_VERSION: &str = "550.54.15";
/// The version the demo wave installs.
pub const NEW_VERSION: &str = "560.35.03";
/// The fleet's trust domain.
pub const TRUST_DOMAIN: &str = "demo.ringfence.test";

/// One host of the fleet.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Host id.
    pub id: String,
    /// Ring 0-4.
    pub ring: u32,
    /// Pool name.
    pub pool: String,
    /// Installing this version brings uncorrected ECC errors on GPU 0.
    pub faulty_version: Option<String>,
    /// Compute processes that keep running (drain waits for them).
    pub busy_for_s: Option<f64>,
    /// GPU 0 raises XID 79 (fallen off the bus) as soon as the file
    /// [`XID_TRIGGER_FILE`] exists in the host dir (see
    /// [`RunningHost::xid_trigger`]).
    pub xid_trigger: bool,
}

/// How agents run.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Inside this process, simulated GPU backend.
    InProcess,
    /// `ringfenced` processes with the fake NVML library.
    Processes {
        /// Path of the `ringfenced` binary.
        agent_bin: PathBuf,
        /// Path of the fake `libnvidia-ml.so.1`.
        fake_nvml: PathBuf,
    },
}

/// A running agent.
#[derive(Debug)]
pub struct RunningHost {
    /// Its spec.
    pub spec: HostSpec,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its directory (config, scenario, driver version file, state).
    pub dir: PathBuf,
    /// Its attestation public key.
    pub public_key: keys::VerifyingKey,
    process: Option<std::process::Child>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningHost {
    /// The state dir (journal, key).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    /// The installed driver version (as the simulated GPUs report it).
    pub fn driver_version(&self) -> String {
        std::fs::read_to_string(self.dir.join("driver_version"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }
    /// Every version the patch profile installed on this host, one per run
    /// of the patch command, oldest first (the agent-side patch counter).
    pub fn patch_runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(PATCH_COUNT_FILE))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }
    /// The file whose creation delivers XID 79 on GPU 0 (hosts with
    /// [`HostSpec::xid_trigger`]).
    pub fn xid_trigger(&self) -> PathBuf {
        self.dir.join(XID_TRIGGER_FILE)
    }
    /// The agent's process id (multi-process fleets only).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(std::process::Child::id)
    }
}

impl Drop for RunningHost {
    // An agent process never outlives its handle, also when the fleet fails
    // to start half way (the hosts started so far are dropped then).
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// File in a host dir whose creation delivers XID 79 ([`HostSpec::xid_trigger`]).
pub const XID_TRIGGER_FILE: &str = "xid79";
/// File in each host dir the patch profile appends the installed version to.
pub const PATCH_COUNT_FILE: &str = "patch_runs";
/// Name of the fake NVML library copied into each host dir (multi-process fleets).
pub const NVML_LIBRARY_NAME: &str = "libnvidia-ml.so.1";

/// A whole simulated fleet and its files.
#[derive(Debug)]
pub struct LocalFleet {
    /// Root directory of every file.
    pub root: PathBuf,
    /// The hosts.
    pub hosts: Vec<RunningHost>,
    /// Coordinator settings file (ringfence.toml).
    pub settings: PathBuf,
    /// Inventory file.
    pub inventory: PathBuf,
    /// Trust file (shared by agents and coordinator).
    pub trust: PathBuf,
    /// Approver key files.
    pub approver_keys: Vec<PathBuf>,
    /// Coordinator state dir.
    pub state_dir: PathBuf,
    /// Reserve percent per pool written by [`LocalFleet::write_inventory`]
    /// (pools not named here get 20%).
    pub pool_reserve: std::collections::BTreeMap<String, u32>,
    mode: Mode,
}

/// Something went wrong building or starting the fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// a fleet file could not be written
    #[error("{path}: {reason}")]
    Io {
        /// the file that could not be written
        path: PathBuf,
        /// the I/O error, as text
        reason: String,
    },
    /// the throwaway PKI failed
    #[error("PKI: {0}")]
    Pki(#[from] pki::PkiError),
    /// a key could not be made
    #[error("key: {0}")]
    Key(#[from] keys::KeyError),
    /// an agent did not start
    #[error("agent `{host}` did not start: {reason}")]
    Agent {
        /// the fleet host whose agent failed
        host: String,
        /// why it did not come up (config, preparation or start error)
        reason: String,
    },
    /// a fleet file (trust file, agent.toml) could not be built or written
    #[error(transparent)]
    Fixture(#[from] ringfence_testkit::FixtureError),
}

fn write(path: &Path, text: &str) -> Result<(), FleetError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| FleetError::Io {
            path: d.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    std::fs::write(path, text).map_err(|e| FleetError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The demo's 20 hosts: 5 rings, 2 pools.
pub fn demo_hosts(canary_fails: bool) -> Vec<HostSpec> {
    let mut hosts = Vec::new();
    let layout: &[(u32, usize)] = &[(0, 2), (1, 2), (2, 2), (3, 10), (4, 4)];
    let mut n = 0;
    for &(ring, count) in layout {
        for i in 0..count {
            n += 1;
            let pool = if i % 2 == 0 {
                "h100-train"
            } else {
                "a100-infer"
            };
            hosts.push(HostSpec {
                id: format!("gpu-{n:02}"),
                ring,
                pool: pool.to_string(),
                faulty_version: (canary_fails && ring == 2 && i == 1)
                    .then(|| NEW_VERSION.to_string()),
                busy_for_s: None,
                xid_trigger: false,
            });
        }
    }
    hosts
}

fn scenario(spec: &HostSpec, dir: &Path) -> String {
    let driver_file = dir.join("driver_version");
    let mut s = format!(
        "driver_version = \"{OLD_VERSION}\"\ndriver_version_file = \"{}\"\ncuda_driver_version = \"12.4\"\n",
        driver_file.display()
    );
    for g in 0..2 {
        let _ = write!(
            s,
            "\n[[gpu]]\nuuid = \"GPU-{}-{g}\"\nname = \"NVIDIA H100 80GB HBM3 (simulated)\"\n",
            spec.id
        );
        if g == 0
            && let Some(t) = spec.busy_for_s
        {
            let _ = write!(
                s,
                "[[gpu.processes]]\npid = 4242\nused_memory_bytes = 1073741824\nexit_after_s = {t}\n"
            );
        }
    }
    if let Some(v) = &spec.faulty_version {
        let _ = write!(
            s,
            "\n[[when_driver]]\nversion = \"{v}\"\ngpu = 0\necc_volatile_uncorrected = 2\necc_aggregate_uncorrected = 2\n"
        );
    }
    if spec.xid_trigger {
        let _ = write!(
            s,
            "\n[[xid]]\ngpu = 0\nxid = 79\ntrigger_file = \"{}\"\n",
            dir.join(XID_TRIGGER_FILE).display()
        );
    }
    s
}

/// The agent.toml of host `spec` in `dir` (the fleet root is two levels up,
/// its CA in `pki/`): the host's certificate from `ringfence pki issue`, the
/// simulated backend in-process or the fake NVML library as processes, and
/// a patch profile that writes the installed version where the simulated
/// GPUs read it.
fn agent_config(spec: &HostSpec, dir: &Path, listen: &str, mode: &Mode, trust: &Path) -> AgentToml {
    let gpu = match mode {
        Mode::InProcess => GpuSection::simulated(&dir.join("scenario.toml"), 2),
        Mode::Processes { .. } => GpuSection::nvml(&dir.join(NVML_LIBRARY_NAME), 2),
    };
    let ca = dir
        .parent()
        .and_then(Path::parent)
        .map(|r| r.join("pki/ca.pem"))
        .unwrap_or_default();
    let extra = format!(
        r#"
[reboot]
command = ["/bin/true"]

[patch.profiles.nvidia-driver]
argv = ["/bin/sh", "-c", "printf '%s' \"$1\" > \"$2\"; echo \"$1\" >> \"$3\"", "sh", "{{version}}", "{driver_file}", "{count_file}"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
timeout_s = 30
"#,
        driver_file = dir.join("driver_version").display(),
        count_file = dir.join(PATCH_COUNT_FILE).display(),
    );
    AgentToml {
        host_id: spec.id.clone(),
        ring: Some(spec.ring),
        listen: listen.into(),
        state_dir: dir.join("state"),
        trust_file: trust.to_path_buf(),
        tls: TlsSection {
            cert: dir.join(format!("host-{}.pem", spec.id)),
            key: dir.join(format!("host-{}.key", spec.id)),
            ca_bundle: ca,
            trust_domain: TRUST_DOMAIN.into(),
            crl: None,
        },
        gpu,
        drain: Some(DrainSection {
            timeout_s: 30,
            poll_ms: 100,
        }),
        extra,
    }
}

/// The coordinator key, approver keys and trust file of a simulated fleet.
#[derive(Debug, Clone)]
pub struct FleetKeys {
    /// Trust file (shared by agents and coordinator).
    pub trust: PathBuf,
    /// Coordinator signing key.
    pub coordinator_key: PathBuf,
    /// Approver key files (`approver-<i>.key`, trust ids `approver-<i>`).
    pub approver_keys: Vec<PathBuf>,
}

/// Make a coordinator key and `approvers` approver keys under `root` and a
/// trust file naming them (rings 2-4 protected, threshold `approvers`).
pub fn write_keys(root: &Path, approvers: usize) -> Result<FleetKeys, FleetError> {
    let coord_key_path = root.join("coordinator.key");
    let coord = keys::generate();
    keys::write_signing_key(&coord_key_path, &coord)?;
    let threshold = u32::try_from(approvers.clamp(1, 16)).unwrap_or(1);
    let mut trust = TrustFile::coordinator("coord-demo", &coord.verifying_key())
        .with_policy(&[2, 3, 4], threshold);
    let mut approver_keys = Vec::new();
    for i in 0..approvers {
        let k = keys::generate();
        let p = root.join(format!("approver-{i}.key"));
        keys::write_signing_key(&p, &k)?;
        trust = trust.with_approver(&format!("approver-{i}"), &k.verifying_key());
        approver_keys.push(p);
    }
    let trust_path = root.join("trust.toml");
    trust.write(&trust_path)?;
    Ok(FleetKeys {
        trust: trust_path,
        coordinator_key: coord_key_path,
        approver_keys,
    })
}

/// Write the coordinator settings file (`root/ringfence.toml`) and return its path.
pub fn write_settings(
    root: &Path,
    state_dir: &Path,
    keys: &FleetKeys,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<PathBuf, FleetError> {
    let settings = root.join("ringfence.toml");
    write(
        &settings,
        &format!(
            "state_dir = \"{}\"\ntrust_file = \"{}\"\n\n[signing]\nkey = \"{}\"\nkey_id = \"coord-demo\"\n\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca_bundle = \"{}\"\n\n[timeouts]\nconnect_s = 3\nrpc_s = 10\n",
            state_dir.display(),
            keys.trust.display(),
            keys.coordinator_key.display(),
            cert.display(),
            key.display(),
            ca.display()
        ),
    )?;
    Ok(settings)
}

impl LocalFleet {
    /// Build every file and start every agent. `approvers` approver keys
    /// are made (the demo uses 2 for protected rings).
    pub async fn start(
        root: &Path,
        specs: Vec<HostSpec>,
        mode: Mode,
        approvers: usize,
    ) -> Result<Self, FleetError> {
        let pki_dir = root.join("pki");
        pki::init(&pki_dir, TRUST_DOMAIN)?;
        let ops = pki::issue(&pki_dir, Role::Ops, "coordinator", root, 30)?;
        let keys = write_keys(root, approvers)?;
        let state_dir = root.join("coordinator-state");
        let settings = write_settings(
            root,
            &state_dir,
            &keys,
            &ops.cert,
            &ops.key,
            &pki_dir.join("ca.pem"),
        )?;
        let FleetKeys {
            trust: trust_path,
            approver_keys,
            ..
        } = keys;

        let subnet = random_subnet();
        let mut hosts = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let dir = root.join("hosts").join(&spec.id);
            std::fs::create_dir_all(dir.join("state")).map_err(|e| FleetError::Io {
                path: dir.clone(),
                reason: e.to_string(),
            })?;
            pki::issue(&pki_dir, Role::Host, &spec.id, &dir, 30)?;
            write(&dir.join("driver_version"), OLD_VERSION)?;
            write(&dir.join("scenario.toml"), &scenario(&spec, &dir))?;
            let listen = match &mode {
                Mode::InProcess => "127.0.0.1:0".to_string(),
                Mode::Processes { .. } => {
                    // Each fleet gets its own random 127.x.y.0/24-ish range, so
                    // fleets of tests running at the same time never share an
                    // address even when their ports collide.
                    let (b, c) = subnet;
                    format!("127.{b}.{}.{}:{}", c + i / 200, 10 + i % 200, free_port())
                }
            };
            if let Mode::Processes { fake_nvml, .. } = &mode {
                // A copy per host (the loader shares one instance per file),
                // under the name the real library has.
                let lib = dir.join(NVML_LIBRARY_NAME);
                std::fs::copy(fake_nvml, &lib).map_err(|e| FleetError::Io {
                    path: lib.clone(),
                    reason: format!("copying the fake NVML library {}: {e}", fake_nvml.display()),
                })?;
            }
            agent_config(&spec, &dir, &listen, &mode, &trust_path)
                .write(&dir.join("agent.toml"))?;
            let host = start_agent(spec, dir, &mode).await?;
            hosts.push(host);
        }

        let mut fleet = Self {
            root: root.to_path_buf(),
            hosts,
            settings,
            inventory: root.join("inventory.toml"),
            trust: trust_path,
            approver_keys,
            state_dir,
            pool_reserve: std::collections::BTreeMap::new(),
            mode,
        };
        fleet.write_inventory()?;
        Ok(fleet)
    }

    /// (Re)write the inventory with every host's address and enrolled key.
    pub fn write_inventory(&mut self) -> Result<(), FleetError> {
        let mut inv = format!("trust_domain = \"{TRUST_DOMAIN}\"\n");
        let mut pools: Vec<&str> = vec!["h100-train", "a100-infer"];
        for h in &self.hosts {
            if !pools.contains(&h.spec.pool.as_str()) {
                pools.push(&h.spec.pool);
            }
        }
        for p in pools {
            let reserve = self.pool_reserve.get(p).copied().unwrap_or(20);
            let _ = write!(
                inv,
                "\n[[pool]]\nname = \"{p}\"\nreserve_percent = {reserve}\n"
            );
        }
        for h in &self.hosts {
            let _ = write!(
                inv,
                "\n[[host]]\nid = \"{}\"\naddress = \"{}\"\npool = \"{}\"\nring = {}\nattestation_key = \"{}\"\nexpected_gpus = 2\n",
                h.spec.id,
                h.addr,
                h.spec.pool,
                h.spec.ring,
                keys::public_key_text(&h.public_key)
            );
        }
        write(&self.inventory, &inv)
    }

    /// Write a wave spec for this fleet and return its path.
    pub fn write_spec(&self, wave_id: &str, extra: &str) -> Result<PathBuf, FleetError> {
        let path = self.root.join(format!("{wave_id}.toml"));
        write(
            &path,
            &format!(
                "wave_id = \"{wave_id}\"\nprofile = \"nvidia-driver\"\nversion = \"{NEW_VERSION}\"\nexpect_driver_version = \"{NEW_VERSION}\"\nexpect_cuda_version = \"12.4\"\nrollback_version = \"{OLD_VERSION}\"\n{extra}"
            ),
        )?;
        Ok(path)
    }

    /// Stop one agent (SIGKILL for processes; abort for in-process agents).
    pub fn kill(&mut self, host: &str) {
        if let Some(h) = self.hosts.iter_mut().find(|h| h.spec.id == host) {
            if let Some(mut p) = h.process.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
            if let Some(t) = h.task.take() {
                t.abort();
            }
            h.stop.take();
        }
    }

    /// Start a stopped agent again on the same address and state.
    pub async fn restart(&mut self, host: &str) -> Result<(), FleetError> {
        let Some(idx) = self.hosts.iter().position(|h| h.spec.id == host) else {
            return Ok(());
        };
        self.kill(host);
        let spec = self.hosts[idx].spec.clone();
        let dir = self.hosts[idx].dir.clone();
        let fresh = start_agent(spec, dir, &self.mode).await?;
        self.hosts[idx] = fresh;
        Ok(())
    }

    /// Stop every agent.
    pub async fn shutdown(&mut self) {
        for h in &mut self.hosts {
            if let Some(stop) = h.stop.take() {
                let _ = stop.send(());
            }
            if let Some(mut p) = h.process.take() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(i32::try_from(p.id()).unwrap_or(0)),
                    nix::sys::signal::Signal::SIGTERM,
                );
                let _ = p.wait();
            }
            if let Some(t) = h.task.take() {
                let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
            }
        }
    }
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if let Some(mut p) = h.process.take() {
                let _ = p.kill();
                let _ = p.wait();
            }
            if let Some(t) = h.task.take() {
                t.abort();
            }
        }
    }
}

/// Second and third octet of a random loopback range (127.b.c.x).
fn random_subnet() -> (usize, usize) {
    let n = ringfence::attest::new_nonce();
    (1 + usize::from(n[0]) % 250, usize::from(n[1]) % 200)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(17443)
}

async fn start_agent(spec: HostSpec, dir: PathBuf, mode: &Mode) -> Result<RunningHost, FleetError> {
    let cfg_path = dir.join("agent.toml");
    let err = |reason: String| FleetError::Agent {
        host: spec.id.clone(),
        reason,
    };
    let config =
        ringfenced::config::AgentConfig::load(&cfg_path).map_err(|e| err(e.to_string()))?;
    let (key, _) = keys::load_or_create(&config.state_dir.join(ringfenced::daemon::HOST_KEY_FILE))?;
    let public_key = key.verifying_key();
    match mode {
        Mode::InProcess => {
            let prepared =
                ringfenced::daemon::prepare(config.clone()).map_err(|e| err(e.to_string()))?;
            // The in-process agent's wall clock (reports, tasks, attestations).
            let clock: Arc<dyn Clock> = Arc::new(SystemClock);
            let source: Arc<dyn ringfenced::healthcell::ReportSource> = Arc::new(
                ringfenced::daemon::CollectorSource::start(&config, clock.clone())
                    .map_err(|e| err(e.to_string()))?,
            );
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let opts = ringfenced::daemon::ServeOptions::in_process(
                source,
                Duration::from_millis(500),
                Duration::from_secs(2),
                Box::new(move |h: ringfenced::daemon::Handles| {
                    let _ = ready_tx.send(h.addr);
                }),
                clock,
            );
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let host = spec.id.clone();
            let task = tokio::spawn(async move {
                let stop = async move {
                    let _ = stop_rx.await;
                };
                if let Err(e) = ringfenced::daemon::serve(prepared, opts, stop).await {
                    tracing::error!(host = %host, error = %e, "agent stopped");
                }
            });
            let addr = tokio::time::timeout(Duration::from_secs(10), ready_rx)
                .await
                .map_err(|_| err("not ready within 10 s".into()))?
                .map_err(|_| err("exited before it was ready".into()))?;
            Ok(RunningHost {
                spec,
                addr,
                dir,
                public_key,
                process: None,
                stop: Some(stop_tx),
                task: Some(task),
            })
        }
        Mode::Processes { agent_bin, .. } => {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("agent.log"))
                .map_err(|e| err(e.to_string()))?;
            let log2 = log.try_clone().map_err(|e| err(e.to_string()))?;
            let child = std::process::Command::new(agent_bin)
                .arg("--config")
                .arg(&cfg_path)
                .env("FAKE_NVML_SCENARIO", dir.join("scenario.toml"))
                .env_remove("NOTIFY_SOCKET")
                .stdout(log)
                .stderr(log2)
                .spawn()
                .map_err(|e| err(format!("{}: {e}", agent_bin.display())))?;
            let addr = config.listen;
            // Ready when the port accepts connections (and our agent is the
            // one still running: a failed bind exits at once).
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            let mut child = child;
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(err(format!(
                        "exited with {status} before listening on {addr} (see {})",
                        dir.join("agent.log").display()
                    )));
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(err(format!(
                        "not listening on {addr} within 15 s (see {})",
                        dir.join("agent.log").display()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(RunningHost {
                spec,
                addr,
                dir,
                public_key,
                process: Some(child),
                stop: None,
                task: None,
            })
        }
    }
}

/// What the approvals of a wave cover: its patches, and the rollbacks to
/// `rollback_version` when the spec names one.
fn approved_actions(spec: &ringfence_coordinator::spec::WaveSpec) -> Vec<i32> {
    let mut actions = vec![ringfence::pb::ApprovedAction::Patch as i32];
    if !spec.rollback_version.is_empty() {
        actions.push(ringfence::pb::ApprovedAction::Rollback as i32);
    }
    actions
}

/// Have every approver key sign every protected ring of `plan` up front
/// (files in the wave's approvals directory under `state_dir`), valid for an hour.
pub fn approve_protected_rings(
    state_dir: &Path,
    spec: &ringfence_coordinator::spec::WaveSpec,
    plan: &ringfence_coordinator::plan::Plan,
    approver_keys: &[PathBuf],
) -> Result<(), String> {
    let dir = ringfence_coordinator::approvals::approvals_dir(state_dir, &spec.wave_id);
    for (i, key_path) in approver_keys.iter().enumerate() {
        let key = keys::read_signing_key(key_path).map_err(|e| e.to_string())?;
        let id = format!("approver-{i}");
        for r in &spec.protected_rings {
            let Some(rp) = plan.rings.get(r) else {
                continue;
            };
            let now = SystemClock.now_ms();
            let a = ringfence::pb::RingApproval {
                wave_id: spec.wave_id.clone(),
                ring: *r,
                profile: spec.profile.clone(),
                version: spec.version.clone(),
                rollback_version: spec.rollback_version.clone(),
                host_ids: rp.hosts.clone(),
                issued_at_unix_ms: now,
                expires_at_unix_ms: now + 3_600_000,
                approver: id.clone(),
                actions: approved_actions(spec),
            };
            let env = ringfence_coordinator::approvals::sign_ring(&a, &id, &key);
            ringfence_coordinator::approvals::write_file(
                &dir.join(format!("ring-{r}-{id}.json")),
                &env,
            )
            .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}
