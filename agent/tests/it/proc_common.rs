//! Runs the real `ringfenced` binary as a child process: a throwaway PKI, a
//! trust file with a coordinator key, the fake NVML library with a scenario,
//! an agent config, and mTLS clients (an operator and a scheduler) to talk
//! to it. Every child is killed when its guard drops.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ringfence::envelope::{TASK_TYPE, sign_message};
use ringfence::pb::{self, TaskState, agent_client::AgentClient, task_payload::Action};
use ringfence::pki::{IssuedPem, TestPki};
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::tls::ClientIdentity;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;

use crate::nvml_common;

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

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A loopback address with a port that was free a moment ago, spread over
/// 127.0.0.0/8 so that parallel tests do not collide.
pub fn free_loopback() -> SocketAddr {
    let mut b = [0u8; 2];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    let ip = std::net::Ipv4Addr::new(127, 0, 1 + b[0] % 250, 2 + b[1] % 250);
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap()
}

impl Host {
    pub fn new(id: &str, opts: HostOpts<'_>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let root = root.as_path();
        let pki = TestPki::new(TRUST_DOMAIN).unwrap();
        std::fs::write(root.join("ca.pem"), pki.ca_pem()).unwrap();
        let host_cert = pki.issue(Role::Host, id).unwrap();
        write_host_cert(root, &host_cert);
        let ops = pki.issue(Role::Ops, "coordinator").unwrap();
        let scheduler = pki.issue(Role::Scheduler, "slurm").unwrap();
        let identity = |c: &IssuedPem| {
            ClientIdentity::from_pem(
                c.cert_pem.as_bytes(),
                c.key_pem.as_bytes(),
                pki.ca_pem().as_bytes(),
            )
            .unwrap()
        };
        let (ops, scheduler) = (identity(&ops), identity(&scheduler));

        let coord = ringfence::keys::generate();
        std::fs::write(
            root.join("trust.toml"),
            format!(
                "[policy]\nprotected_rings = [2, 3, 4]\napprover_threshold = 1\n\n[[coordinator]]\nid = \"coord-test\"\nkey = \"{}\"\n",
                ringfence::keys::public_key_text(&coord.verifying_key())
            ),
        )
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
        std::fs::write(
            host.config_path(),
            format!(
                r#"host_id = "{id}"
{ring}
listen = "{listen}"
state_dir = "{state}"
trust_file = "{root}/trust.toml"

[tls]
cert = "{root}/host.pem"
key = "{root}/host.key"
ca_bundle = "{root}/ca.pem"
trust_domain = "{TRUST_DOMAIN}"

[gpu]
backend = "nvml"
nvml_library = "{library}"
expected_gpus = {expected}
poll_interval_s = 1

[drain]
timeout_s = 10
poll_ms = 100
{extra}"#,
                state = host.state_dir().display(),
                root = root.display(),
                library = library.display(),
                expected = opts.expected_gpus,
                ring = opts.ring.map(|r| format!("ring = {r}")).unwrap_or_default(),
                extra = opts.extra,
            ),
        )
        .unwrap();
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

    /// A scheduler's standard grpc.health.v1 client (role scheduler).
    pub async fn health_client(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel(&self.scheduler).await)
    }

    /// A task for this host signed by the trusted coordinator key.
    pub fn task(&self, id: &str, sequence: u64, action: Action) -> pb::SignedTask {
        let now = ringfence::time::now_ms();
        let payload = pb::TaskPayload {
            task_id: id.into(),
            host_id: self.id.clone(),
            wave_id: "wave-proc".into(),
            ring: 0,
            sequence,
            issued_at_unix_ms: now,
            expires_at_unix_ms: now + 600_000,
            action: Some(action),
        };
        pb::SignedTask {
            task: Some(sign_message(
                TASK_TYPE,
                &payload,
                &[("coord-test", &self.coord)],
            )),
            approvals: vec![],
        }
    }

    /// Replace the TLS certificate and key files with `cert`.
    pub fn write_host_cert(&self, cert: &IssuedPem) {
        write_host_cert(self.dir.path(), cert);
    }

    /// Set `[tls] crl` in agent.toml to `crl.pem` and write `pem` there.
    pub fn use_crl(&self, pem: &str) {
        self.write_crl(pem);
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).unwrap();
        let line = format!("trust_domain = \"{TRUST_DOMAIN}\"\n");
        assert!(text.contains(&line));
        let text = text.replacen(
            &line,
            &format!("{line}crl = \"{}\"\n", self.path("crl.pem").display()),
            1,
        );
        std::fs::write(&path, text).unwrap();
    }

    /// Replace `crl.pem` (by rename, as `ringfence pki revoke` does).
    pub fn write_crl(&self, pem: &str) {
        let tmp = self.path("crl.pem.tmp");
        std::fs::write(&tmp, pem).unwrap();
        std::fs::rename(&tmp, self.path("crl.pem")).unwrap();
    }

    /// An mTLS client of this agent with the certificate `who`.
    pub async fn client_as(&self, who: &IssuedPem) -> AgentClient<Channel> {
        let id = ClientIdentity::from_pem(
            who.cert_pem.as_bytes(),
            who.key_pem.as_bytes(),
            self.pki.ca_pem().as_bytes(),
        )
        .unwrap();
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
    let tmp_key = root.join("host.key.tmp");
    write_private(&tmp_key, &cert.key_pem);
    std::fs::rename(&tmp_key, root.join("host.key")).unwrap();
    let tmp_cert = root.join("host.pem.tmp");
    std::fs::write(&tmp_cert, &cert.cert_pem).unwrap();
    std::fs::rename(&tmp_cert, root.join("host.pem")).unwrap();
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

pub fn drain(reason: &str) -> Action {
    Action::Drain(pb::Drain {
        reason: reason.into(),
    })
}

pub fn patch(profile: &str, version: &str) -> Action {
    Action::Patch(pb::Patch {
        profile: profile.into(),
        version: version.into(),
        rollback: false,
    })
}

pub fn validate() -> Action {
    Action::Validate(pb::Validate {
        expect_driver_version: String::new(),
        expect_cuda_version: String::new(),
        nonce: vec![7u8; 32],
        profile: String::new(),
    })
}

pub fn reason_codes(r: &pb::HealthReport) -> Vec<(String, i32)> {
    r.reasons
        .iter()
        .map(|x| (x.code.clone(), x.gpu_index))
        .collect()
}

/// Sends raw bytes as a request message (what no generated client would
/// send: garbage, oversized frames) and returns the raw answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

/// One unary call of `path` with `body` as the raw request message.
pub async fn raw_unary(
    channel: Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}
impl Host {
    /// An Agent client on its own connection with `identity` (e.g. the
    /// scheduler's certificate, whose role may read health).
    pub async fn agent_client_as(&self, identity: &ClientIdentity) -> AgentClient<Channel> {
        AgentClient::new(self.channel(identity).await)
    }
}
