//! Runs the real `ringfenced` binary as a child process: a throwaway PKI, a
//! trust file with a coordinator key, the fake NVML library with a scenario,
//! an agent config, and mTLS clients (an operator and a scheduler) to talk
//! to it. Every child is killed when its guard drops.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use ringfence::time::{Clock, SystemClock};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ringfence::pb::{self, TaskState, agent_client::AgentClient, task_payload::Action};
use ringfence::pki::{IssuedPem, TestPki};
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::tls::ClientIdentity;
use ringfence_testkit as testkit;
use testkit::agent_config::{AgentToml, DrainSection, GpuSection};
use testkit::tasks::Addressed;
use testkit::trust::TrustFile;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::nvml_common;

pub use testkit::grpc::raw_unary;
pub use testkit::tasks::{drain, patch};

/// Key id of the coordinator key in the host's trust file.
pub const COORDINATOR_ID: &str = "coord-test";

pub const TRUST_DOMAIN: &str = "gpu.test";

/// Generous limit for anything that involves a process start on a loaded machine.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// One host's files: PKI, trust file, fake NVML library + scenario, agent.toml.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub id: String,
    pub pki: TestPki,
    pub coord: SigningKey,
    pub listen: SocketAddr,
    pub ops: ClientIdentity,
    pub scheduler: ClientIdentity,
    pub lib: PathBuf,
    /// Serial (hex) of the host certificate written at setup.
    pub host_serial: String,
}

/// What goes into agent.toml besides the fixed parts.
pub struct HostOpts<'a> {
    /// Scenario of the fake NVML library.
    pub scenario: &'a str,
    /// `[gpu] expected_gpus`.
    pub expected_gpus: u32,
    /// Override of `[gpu] nvml_library` (default: the fake library's copy).
    pub nvml_library: Option<PathBuf>,
    /// Extra TOML appended to agent.toml (patch profiles, drain settings).
    pub extra: String,
    /// `ring` of agent.toml (None: the key is left out).
    pub ring: Option<u32>,
}

impl Default for HostOpts<'_> {
    fn default() -> Self {
        Self {
            scenario: "[[gpu]]\n",
            expected_gpus: 1,
            nvml_library: None,
            extra: String::new(),
            ring: Some(0),
        }
    }
}

/// A loopback address with a port that was free a moment ago, spread over
/// 127.0.0.0/8 so that parallel tests do not collide.
pub fn free_loopback() -> SocketAddr {
    ringfence_testkit::net::free_loopback().unwrap()
}

impl Host {
    pub fn new(id: &str, opts: HostOpts<'_>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let root = root.as_path();
        let pki = TestPki::new(TRUST_DOMAIN).unwrap();
        let host_cert = pki.issue(Role::Host, id).unwrap();
        testkit::pki::write_host_files(&testkit::pki::host_tls_paths(root), &pki, &host_cert)
            .unwrap();
        let identity =
            |role, name| testkit::pki::identity(&pki, &pki.issue(role, name).unwrap()).unwrap();
        let ops = identity(Role::Ops, "coordinator");
        let scheduler = identity(Role::Scheduler, "slurm");

        let coord = ringfence::keys::generate();
        TrustFile::coordinator(COORDINATOR_ID, &coord.verifying_key())
            .with_policy(&[2, 3, 4], 1)
            .write(&root.join("trust.toml"))
            .unwrap();

        let nvml_dir = root.join("nvml");
        std::fs::create_dir_all(&nvml_dir).unwrap();
        let lib = nvml_common::install(&nvml_dir, opts.scenario);
        let listen = free_loopback();
        let host = Self {
            dir,
            id: id.to_string(),
            pki,
            coord,
            listen,
            ops,
            scheduler,
            lib,
            host_serial: host_cert.serial.clone(),
        };
        let library = opts.nvml_library.unwrap_or_else(|| host.lib.clone());
        let gpu = GpuSection::nvml(&library, opts.expected_gpus);
        let mut config = AgentToml::in_dir(root, id, &listen.to_string(), TRUST_DOMAIN, gpu);
        config.ring = opts.ring;
        config.drain = Some(DrainSection {
            timeout_s: 10,
            poll_ms: 100,
        });
        config.extra = opts.extra;
        config.write(&host.config_path()).unwrap();
        host
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("agent.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    pub fn log_path(&self) -> PathBuf {
        self.path("agent.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The host's SPIFFE id, which clients insist on.
    pub fn spiffe(&self) -> SpiffeId {
        SpiffeId::new(TRUST_DOMAIN, Role::Host, &self.id).unwrap()
    }

    /// `ringfenced` with this host's config and a clean environment
    /// (no systemd variables unless the caller sets them).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringfenced"));
        cmd.arg("--config")
            .arg(self.config_path())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("FAKE_NVML_SCENARIO")
            .env_remove("RINGFENCED_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Start `ringfenced run`, output appended to agent.log.
    pub fn spawn(&self) -> Agent {
        self.spawn_with(|_| {})
    }

    pub fn spawn_with(&self, tweak: impl FnOnce(&mut Command)) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut cmd = self.command();
        cmd.arg("run").stdout(log.try_clone().unwrap()).stderr(log);
        tweak(&mut cmd);
        Agent {
            child: Some(cmd.spawn().expect("spawn ringfenced")),
        }
    }

    /// Wait until the listener accepts TCP connections (or the agent died).
    pub async fn wait_listening(&self, agent: &mut Agent) {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                return;
            }
            if let Some(status) = agent.try_status() {
                panic!(
                    "ringfenced exited ({status}) before listening on {}; log:\n{}",
                    self.listen,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ringfenced not listening on {} within {START_LIMIT:?}; log:\n{}",
                self.listen,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn channel(&self, identity: &ClientIdentity) -> Channel {
        ringfence::tls::connect(&self.listen.to_string(), &self.spiffe(), identity)
            .await
            .unwrap_or_else(|e| panic!("mTLS connect: {e}; log:\n{}", self.log()))
    }

    /// The coordinator's view (role ops).
    pub async fn client(&self) -> AgentClient<Channel> {
        AgentClient::new(self.channel(&self.ops).await)
    }

    /// The agent's GetIdentity answer (its ring, drain mark, profiles…).
    pub async fn identity(&self) -> pb::Identity {
        self.client()
            .await
            .get_identity(pb::GetIdentityRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// A scheduler's standard grpc.health.v1 client (role scheduler).
    pub async fn health_client(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel(&self.scheduler).await)
    }

    /// A task for this host signed by the trusted coordinator key.
    pub fn task(&self, id: &str, sequence: u64, action: Action) -> pb::SignedTask {
        let to = Addressed {
            host_id: &self.id,
            wave_id: "wave-proc",
            ring: 0,
            sequence,
            issued_at_ms: SystemClock.now_ms(),
        };
        testkit::tasks::signed(id, to, action, COORDINATOR_ID, &self.coord)
    }

    /// Replace the TLS certificate and key files with `cert`.
    pub fn write_host_cert(&self, cert: &IssuedPem) {
        write_host_cert(self.dir.path(), cert);
    }

    /// Set `[tls] crl` in agent.toml to `crl.pem` and write `pem` there.
    pub fn use_crl(&self, pem: &str) {
        self.write_crl(pem);
        let crl = self.path("crl.pem").display().to_string();
        testkit::set_key(&self.config_path(), "tls", "crl", crl).unwrap();
    }

    /// Replace `crl.pem` (by rename, as `ringfence pki revoke` does).
    pub fn write_crl(&self, pem: &str) {
        testkit::replace(&self.path("crl.pem"), pem).unwrap();
    }

    /// An mTLS client of this agent with the certificate `who`.
    pub async fn client_as(&self, who: &IssuedPem) -> AgentClient<Channel> {
        let id = testkit::pki::identity(&self.pki, who).unwrap();
        AgentClient::new(self.channel(&id).await)
    }

    /// A raw channel of the coordinator's identity (role ops).
    pub async fn ops_channel(&self) -> Channel {
        self.channel(&self.ops).await
    }

    /// Replace the TLS certificate and key files with a fresh certificate.
    pub fn rotate_host_cert(&self) -> IssuedPem {
        let cert = self.pki.issue(Role::Host, &self.id).unwrap();
        write_host_cert(self.dir.path(), &cert);
        cert
    }
}

fn write_host_cert(root: &Path, cert: &IssuedPem) {
    // Key first, then certificate, each by rename, so that a reload never
    // sees a half-written file.
    testkit::pki::write_host_cert(&testkit::pki::host_tls_paths(root), cert).unwrap();
}

/// A running `ringfenced`; killed (SIGKILL) and reaped on drop.
pub struct Agent {
    child: Option<Child>,
}

impl Agent {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap()
    }

    /// The exit status if the process has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Wait for the exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.try_status() {
                self.child = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "ringfenced still running after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills a process group (a patch command the killed agent left behind) on drop.
pub struct GroupGuard(pub PathBuf);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Ok(text) = std::fs::read_to_string(&self.0)
            && let Ok(pid) = text.trim().parse::<i32>()
            && pid > 1
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Poll `f` every 50 ms until it returns `Some`, or panic with `what` after `limit`.
pub async fn poll<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The task's state as the agent's journal reports it (GetTask).
pub async fn task_state(client: &mut AgentClient<Channel>, id: &str) -> pb::TaskStatus {
    client
        .get_task(pb::GetTaskRequest { task_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Poll GetTask until the task is in `want`.
pub async fn wait_task(
    client: &mut AgentClient<Channel>,
    id: &str,
    want: TaskState,
    limit: Duration,
) -> pb::TaskStatus {
    let deadline = Instant::now() + limit;
    loop {
        let s = task_state(client, id).await;
        if s.state() == want {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} not {want:?} within {limit:?}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Validate without expected versions or profile.
pub fn validate() -> Action {
    testkit::tasks::validate("", "", "")
}

pub fn reason_codes(r: &pb::HealthReport) -> Vec<(String, i32)> {
    r.reasons
        .iter()
        .map(|x| (x.code.clone(), x.gpu_index))
        .collect()
}

impl Host {
    /// An Agent client on its own connection with `identity` (e.g. the
    /// scheduler's certificate, whose role may read health).
    pub async fn agent_client_as(&self, identity: &ClientIdentity) -> AgentClient<Channel> {
        AgentClient::new(self.channel(identity).await)
    }
}
