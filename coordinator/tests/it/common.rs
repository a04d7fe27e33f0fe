//! Helpers for multi-process fleet tests: real `ringfenced` processes with
//! the fake NVML library, driven by the real `ringfence` binary.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ringfence::pb;
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::tls::ClientIdentity;
use ringfence_coordinator::inventory::Inventory;
use ringfence_coordinator::plan::Plan;
use ringfence_coordinator::settings::Settings;
use ringfence_coordinator::spec::WaveSpec;
use ringfence_devfleet::local_fleet::{self, HostSpec, LocalFleet, Mode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// Path of a built artifact, or a panic saying how to build it.
pub fn artifact(name: &str) -> PathBuf {
    ringfence_testkit::artifacts::built(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A host spec.
pub fn host(id: &str, ring: u32, pool: &str) -> HostSpec {
    HostSpec {
        id: id.into(),
        ring,
        pool: pool.into(),
        faulty_version: None,
        busy_for_s: None,
        xid_trigger: false,
    }
}

/// Start real agent processes for `specs`, with `reserve` percent per pool.
pub async fn start(dir: &Path, specs: Vec<HostSpec>, reserve: &[(&str, u32)]) -> LocalFleet {
    ringfence::tls::install_crypto_provider();
    let mode = Mode::Processes {
        agent_bin: artifact("ringfenced"),
        fake_nvml: artifact("libnvidia_ml.so"),
    };
    let mut f = LocalFleet::start(dir, specs, mode, 2)
        .await
        .expect("fleet of ringfenced processes starts");
    for (p, r) in reserve {
        f.pool_reserve.insert((*p).to_string(), *r);
    }
    f.write_inventory().expect("inventory written");
    f
}

/// Replace the settings' network timeouts.
pub fn set_timeouts(f: &LocalFleet, connect_s: i64, rpc_s: i64) {
    use ringfence_testkit::set_key;
    set_key(&f.settings, "timeouts", "connect_s", connect_s).unwrap();
    set_key(&f.settings, "timeouts", "rpc_s", rpc_s).unwrap();
}

/// Per-ring pacing for every ring: `batch` hosts at once, no soak.
pub fn pacing(batch: usize) -> String {
    (0..5)
        .map(|r| format!("[ring.{r}]\nbatch_size = {batch}\nsoak_s = 0\n"))
        .collect()
}

/// Both fleet approvers sign every protected ring of the wave, as operators
/// would with `ringfence wave approve` (the demo does the same).
pub fn approve_all(f: &LocalFleet, spec_path: &Path) {
    let settings = Settings::load(Some(&f.settings)).unwrap();
    let inv = Inventory::load(&f.inventory).unwrap();
    let src = ringfence::config::Source::read(spec_path).unwrap();
    let spec = WaveSpec::from_source(&src).unwrap();
    let plan = Plan::build(&inv, &spec, &BTreeMap::new(), &BTreeMap::new()).unwrap();
    local_fleet::approve_protected_rings(&settings.state_dir, &spec, &plan, &f.approver_keys)
        .unwrap();
}

/// The operator's mTLS identity.
pub fn identity(f: &LocalFleet) -> ClientIdentity {
    ClientIdentity::load(
        &f.root.join("ops-coordinator.pem"),
        &f.root.join("ops-coordinator.key"),
        &f.root.join("pki/ca.pem"),
    )
    .unwrap()
}

async fn client(
    f: &LocalFleet,
    host: &str,
) -> pb::agent_client::AgentClient<tonic::transport::Channel> {
    let h = f.hosts.iter().find(|h| h.spec.id == host).unwrap();
    let expected = SpiffeId::new(local_fleet::TRUST_DOMAIN, Role::Host, host).unwrap();
    let ch = ringfence::tls::connect_with_timeout(
        &h.addr.to_string(),
        &expected,
        &identity(f),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| panic!("connect to agent {host}: {e}"));
    pb::agent_client::AgentClient::new(ch)
}

/// Every task in a host's journal (ListTasks over mTLS), by sequence.
pub async fn journal(f: &LocalFleet, host: &str) -> Vec<pb::TaskStatus> {
    let mut c = client(f, host).await;
    let mut t = c
        .list_tasks(pb::ListTasksRequest {
            wave_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("ListTasks on {host}: {e}"))
        .into_inner()
        .tasks;
    t.sort_by_key(|t| t.sequence);
    t
}

/// A fresh health report from the agent (GetHealth over mTLS).
pub async fn health(f: &LocalFleet, host: &str) -> pb::HealthReport {
    let mut c = client(f, host).await;
    c.get_health(pb::GetHealthRequest { fresh: true })
        .await
        .unwrap_or_else(|e| panic!("GetHealth on {host}: {e}"))
        .into_inner()
}

/// One JSON event line of `--json`.
pub type Event = serde_json::Value;

/// A `ringfence` coordinator process (killed when dropped).
pub struct Coordinator {
    pub child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr: tokio::task::JoinHandle<String>,
    /// Every event line seen so far.
    pub events: Vec<Event>,
}

impl Coordinator {
    /// `ringfence --config <fleet>/ringfence.toml <args..>`.
    pub fn spawn(f: &LocalFleet, args: &[&str]) -> Self {
        // This package's own binary: cargo builds it fresh for its tests.
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ringfence"))
            .arg("--config")
            .arg(&f.settings)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("ringfence starts");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut err = child.stderr.take().unwrap();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s).await;
            s
        });
        Self {
            child,
            lines,
            stderr,
            events: Vec::new(),
        }
    }

    /// `wave run --inventory .. --spec .. --json`.
    pub fn run(f: &LocalFleet, spec: &Path) -> Self {
        Self::spawn(
            f,
            &[
                "wave",
                "run",
                "--inventory",
                f.inventory.to_str().unwrap(),
                "--spec",
                spec.to_str().unwrap(),
                "--json",
            ],
        )
    }

    /// `wave resume --wave W --inventory .. --json`.
    pub fn resume(f: &LocalFleet, wave: &str) -> Self {
        Self::spawn(
            f,
            &[
                "wave",
                "resume",
                "--wave",
                wave,
                "--inventory",
                f.inventory.to_str().unwrap(),
                "--json",
            ],
        )
    }

    /// The next event line, or None at end of output. Panics after `within`.
    pub async fn next_event(&mut self, within: Duration) -> Option<Event> {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .expect("coordinator printed nothing for too long")
            .expect("reading coordinator stdout")?;
        let ev: Event = serde_json::from_str(&line)
            .unwrap_or_else(|_| serde_json::json!({"kind":"text","what":line}));
        self.events.push(ev.clone());
        Some(ev)
    }

    /// Read events until one matches `pred` (returned) or output ends (None).
    pub async fn until(
        &mut self,
        within: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Option<Event> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = self.next_event(left.max(Duration::from_millis(1))).await?;
            if pred(&ev) {
                return Some(ev);
            }
        }
    }

    /// Wait for exit (draining stdout); exit code and stderr.
    pub async fn finish(mut self, within: Duration) -> (i32, String) {
        let deadline = Instant::now() + within;
        while let Ok(Ok(Some(line))) = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            self.lines.next_line(),
        )
        .await
        {
            let ev: Event = serde_json::from_str(&line)
                .unwrap_or_else(|_| serde_json::json!({"kind":"text","what":line}));
            self.events.push(ev);
        }
        let status = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1),
            self.child.wait(),
        )
        .await
        .expect("coordinator did not exit in time")
        .unwrap();
        let stderr = self.stderr.await.unwrap_or_default();
        (status.code().unwrap_or(-1), stderr)
    }

    /// SIGKILL the coordinator and reap it.
    pub async fn sigkill(mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

/// Whether `ev` has kind `kind` and (if given) what `what`.
pub fn is(ev: &Event, kind: &str, what: Option<&str>) -> bool {
    ev["kind"] == kind && what.is_none_or(|w| ev["what"] == w)
}

/// Names of the task actions in a journal, by sequence.
pub fn actions(tasks: &[pb::TaskStatus]) -> Vec<String> {
    tasks.iter().map(|t| t.action.clone()).collect()
}
