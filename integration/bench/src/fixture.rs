//! Fixtures shared by the benchmarks: a throwaway fleet CA with host and
//! scheduler certificates (the crate's own PKI code), a trust file, a
//! simulated-GPU scenario, an agent.toml (files as `ringfence-testkit`
//! writes them for the tests), and the real `ringfenced` binary started on
//! them. Everything lives in a temp dir removed on drop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringfence::pki::TestPki;
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::tls::ClientIdentity;
use ringfence_testkit as testkit;
use testkit::agent_config::{AgentToml, GpuSection};
use testkit::trust::TrustFile;
use tonic::transport::Channel;

/// Trust domain of the benchmark fleet.
pub const TRUST_DOMAIN: &str = "bench.test";
/// Host id of the benchmarked agent.
pub const HOST_ID: &str = "bench-host";
/// How long an agent may take to start on a loaded machine before we give up.
const START_LIMIT: Duration = Duration::from_secs(30);

/// One agent host's files and the scheduler identity that queries it.
pub struct AgentFixture {
    dir: tempfile::TempDir,
    /// Address the agent listens on.
    pub listen: SocketAddr,
    /// Address of the agent's `/metrics` endpoint (plain HTTP, loopback).
    pub metrics: SocketAddr,
    /// Client identity with a `scheduler` certificate (may read health).
    pub scheduler: ClientIdentity,
}

impl std::fmt::Debug for AgentFixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentFixture")
            .field("dir", &self.dir.path())
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// The scenario of a host with `gpus` healthy simulated H100s.
pub fn scenario(gpus: u32) -> String {
    let mut s = String::from("driver_version = \"550.54.15\"\ncuda_driver_version = \"12.4\"\n");
    for _ in 0..gpus {
        s.push_str("\n[[gpu]]\nname = \"NVIDIA H100 80GB HBM3 (simulated)\"\n");
    }
    s
}

impl AgentFixture {
    /// Files for one agent with `gpus` simulated GPUs polled every `poll_s` seconds.
    pub fn new(gpus: u32, poll_s: u64) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
        let root = dir.path();
        let pki = TestPki::new(TRUST_DOMAIN).map_err(|e| format!("test CA: {e}"))?;
        let host = pki
            .issue(Role::Host, HOST_ID)
            .map_err(|e| format!("host certificate: {e}"))?;
        let scheduler = pki
            .issue(Role::Scheduler, "bench")
            .map_err(|e| format!("scheduler certificate: {e}"))?;
        let scheduler = testkit::pki::identity(&pki, &scheduler).map_err(|e| e.to_string())?;
        testkit::pki::write_host_files(&host_tls_paths(root), &pki, &host)
            .map_err(|e| e.to_string())?;
        let coord = ringfence::keys::generate();
        TrustFile::coordinator("bench-coordinator", &coord.verifying_key())
            .write(&root.join("trust.toml"))
            .map_err(|e| e.to_string())?;
        let scenario_path = root.join("scenario.toml");
        testkit::write(&scenario_path, &scenario(gpus)).map_err(|e| e.to_string())?;
        let listen = testkit::net::free_loopback()
            .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
        let metrics = testkit::net::free_loopback()
            .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
        let mut gpu = GpuSection::simulated(&scenario_path, gpus);
        gpu.poll_interval_s = poll_s;
        let mut toml = AgentToml::in_dir(root, HOST_ID, &listen.to_string(), TRUST_DOMAIN, gpu);
        toml.extra = format!(
            "[metrics]
listen = \"{metrics}\"
"
        );
        toml.write(&root.join("agent.toml"))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            dir,
            listen,
            metrics,
            scheduler,
        })
    }

    /// The fixture's temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A file in the fixture's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's SPIFFE id, which clients insist on.
    pub fn spiffe(&self) -> Result<SpiffeId, String> {
        SpiffeId::new(TRUST_DOMAIN, Role::Host, HOST_ID).map_err(|e| e.to_string())
    }

    /// `ringfenced run` on this fixture, output to agent.log, no systemd
    /// variables inherited (callers add NOTIFY_SOCKET when they want it).
    pub fn command(&self) -> Result<Command, String> {
        let exe = ringfenced_exe()?;
        let log = std::fs::File::create(self.path("agent.log"))
            .map_err(|e| format!("cannot create the agent log: {e}"))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot share the agent log: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("--config")
            .arg(self.path("agent.toml"))
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("RINGFENCED_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        Ok(cmd)
    }

    /// The agent's log so far (for error messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// Start the agent and wait until its listener accepts connections.
    pub async fn start(&self) -> Result<Running, String> {
        let mut agent = Running::spawn(self.command()?)?;
        let deadline = Instant::now() + START_LIMIT;
        while tokio::net::TcpStream::connect(self.listen).await.is_err() {
            agent.check_alive(self)?;
            if Instant::now() > deadline {
                return Err(format!(
                    "ringfenced not listening on {} within {START_LIMIT:?}; log:\n{}",
                    self.listen,
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(agent)
    }

    /// An mTLS channel to `addr` as the scheduler, expecting this host's certificate.
    pub async fn channel(&self, addr: SocketAddr) -> Result<Channel, String> {
        ringfence::tls::connect(&addr.to_string(), &self.spiffe()?, &self.scheduler)
            .await
            .map_err(|e| format!("connect to {addr}: {e}"))
    }
}

/// The agent's TLS files in a fixture dir (a baseline server reuses them).
pub use ringfence_testkit::pki::host_tls_paths;

/// The `ringfenced` binary next to this benchmark's executable (so a release
/// bench measures a release agent).
pub fn ringfenced_exe() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot locate the bench binary: {e}"))?;
    if let Some(exe) = me.parent().map(|d| d.join("ringfenced"))
        && exe.is_file()
    {
        return Ok(exe);
    }
    Err(format!(
        "no ringfenced binary next to {}: build it with the bench, e.g. \
         `cargo build --release -p ringfenced -p ringfence-bench`",
        me.display()
    ))
}

/// A running child process (the agent, the bare server); killed and reaped on drop.
#[derive(Debug)]
pub struct Running {
    child: Child,
}

impl Running {
    /// Spawn `cmd` (returns once the new process has exec'd).
    pub fn spawn(mut cmd: Command) -> Result<Self, String> {
        cmd.spawn()
            .map(|child| Self { child })
            .map_err(|e| format!("cannot start {}: {e}", cmd.get_program().display()))
    }

    /// The child's piped stdout, if any (taken once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the agent's log if it has exited.
    pub fn check_alive(&mut self, fixture: &AgentFixture) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "ringfenced exited ({status}); log:\n{}",
                fixture.log()
            )),
            Err(e) => Err(format!("cannot check on ringfenced: {e}")),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
