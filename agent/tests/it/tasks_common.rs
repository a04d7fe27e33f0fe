//! Shared helpers of the `tasks_*` tests: a coordinator key, signed tasks,
//! a fake health source and an engine over a temporary state dir (keys,
//! task actions and signing from `ringfence_testkit`).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ringfence::envelope::{APPROVAL_TYPE, sign_message};
use ringfence::pb::{self, TaskState, task_payload::Action};
use ringfence::time::{Clock, ManualClock, SystemClock};
use ringfence::trust::{Policy, TrustSet};
use ringfence_devfleet::fake::FakeHealth;
use ringfence_testkit::tasks::{self, Addressed};
use ringfence_testkit::trust::{APPROVER_IDS, COORDINATOR_ID, Signers};
use ringfenced::command::ProcessRunner;
use ringfenced::profiles::PatchConfig;
use ringfenced::tasks::{DrainConfig, RebootConfig, TaskEngine};

pub use ringfence_testkit::tasks::{drain, patch, rollback, undrain, validate};

pub const HOST: &str = "gpu-1";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub coord: SigningKey,
    /// Approver keys `alice` and `bob` (in the trust file).
    pub approvers: [SigningKey; 2],
    pub trust: TrustSet,
    /// The agent's configured ring (default `Some(0)`, the ring of `task`).
    pub ring: Option<u32>,
    /// The engine's clock and the tasks' signing time (default: the system clock).
    pub clock: Option<ManualClock>,
    pub health: Arc<FakeHealth>,
    seq: AtomicU64,
}

impl Harness {
    pub fn new() -> Self {
        let signers = Signers::generate();
        Self {
            dir: tempfile::tempdir().unwrap(),
            trust: signers.trust_set(Policy::default()),
            coord: signers.coordinator,
            approvers: signers.approvers,
            ring: Some(0),
            clock: None,
            health: Arc::new(FakeHealth::new(HOST)),
            seq: AtomicU64::new(0),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A path for test files (markers, counters) outside the state dir.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn engine(&self, patch: &str, drain: DrainConfig) -> TaskEngine {
        self.engine_with(patch, drain, RebootConfig::default(), "boot-1", "0.1.0")
    }

    pub fn engine_with(
        &self,
        patch: &str,
        drain: DrainConfig,
        reboot: RebootConfig,
        boot_id: &str,
        agent_version: &str,
    ) -> TaskEngine {
        TaskEngine::open(
            &self.state_dir(),
            HOST.into(),
            self.ring,
            self.trust.clone(),
            drain,
            reboot,
            patch_config(patch),
            self.health.clone(),
            Arc::new(ProcessRunner {
                kill_grace: Duration::from_secs(1),
            }),
            match &self.clock {
                Some(c) => Arc::new(c.clone()),
                None => Arc::new(SystemClock),
            },
            boot_id.into(),
            agent_version.into(),
        )
        .unwrap()
    }

    /// The next sequence number (as `task` uses them).
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Now, by the harness clock.
    pub fn now_ms(&self) -> i64 {
        self.clock
            .as_ref()
            .map_or_else(|| SystemClock.now_ms(), |c| c.now_ms())
    }

    /// A task signed by the coordinator, ring 0, with the next sequence.
    pub fn task(&self, id: &str, action: Action) -> pb::SignedTask {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.task_seq(id, seq, action)
    }

    pub fn task_seq(&self, id: &str, seq: u64, action: Action) -> pb::SignedTask {
        self.task_ring(id, seq, self.ring.unwrap_or(0), action)
    }

    /// A coordinator-signed task for `ring`, without approvals.
    pub fn task_ring(&self, id: &str, seq: u64, ring: u32, action: Action) -> pb::SignedTask {
        let to = Addressed {
            host_id: HOST,
            wave_id: "wave-1",
            ring,
            sequence: seq,
            issued_at_ms: self.now_ms(),
        };
        tasks::signed(id, to, action, COORDINATOR_ID, &self.coord)
    }

    /// The next task for the agent's ring, with ring approvals by alice and
    /// bob covering it for `actions`.
    pub fn approved(
        &self,
        id: &str,
        action: Action,
        actions: &[pb::ApprovedAction],
    ) -> pb::SignedTask {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let ring = self.ring.unwrap_or(3);
        let mut st = self.task_ring(id, seq, ring, action.clone());
        let now = self.now_ms();
        let (profile, version, rollback_version) = match &action {
            Action::Patch(p) if p.rollback => (p.profile.clone(), String::new(), p.version.clone()),
            Action::Patch(p) => (p.profile.clone(), p.version.clone(), String::new()),
            _ => Default::default(),
        };
        let approval = pb::RingApproval {
            wave_id: "wave-1".into(),
            ring,
            profile,
            version,
            rollback_version,
            host_ids: vec![HOST.into()],
            issued_at_unix_ms: now,
            expires_at_unix_ms: now + 3_600_000,
            approver: "ops".into(),
            actions: actions.iter().map(|a| *a as i32).collect(),
        };
        for (id, key) in APPROVER_IDS.into_iter().zip(&self.approvers) {
            st.approvals
                .push(sign_message(APPROVAL_TYPE, &approval, &[(id, key)]));
        }
        st
    }
}

pub fn patch_config(toml_text: &str) -> PatchConfig {
    #[derive(serde::Deserialize)]
    struct Top {
        #[serde(default)]
        patch: PatchConfig,
    }
    let top: Top = toml::from_str(toml_text).unwrap();
    top.patch.validate().unwrap();
    top.patch
}

/// Wait until the task reaches `pred`, or panic after `limit`.
pub async fn wait_for(
    engine: &TaskEngine,
    id: &str,
    limit: Duration,
    pred: impl Fn(&pb::TaskStatus) -> bool,
) -> pb::TaskStatus {
    let mut rx = engine.watch(id).expect("task is known");
    let fut = async {
        loop {
            let s = rx.borrow_and_update().clone();
            if pred(&s) {
                return s;
            }
            rx.changed().await.expect("watch closed");
        }
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(s) => s,
        Err(_) => panic!(
            "task {id} did not get there in {limit:?}: {:?}",
            engine.get(id)
        ),
    }
}

pub async fn wait_terminal(engine: &TaskEngine, id: &str, limit: Duration) -> pb::TaskStatus {
    wait_for(engine, id, limit, |s| {
        matches!(
            s.state(),
            TaskState::Succeeded | TaskState::Failed | TaskState::Interrupted
        )
    })
    .await
}

/// Submit a drain and wait until it succeeds (no processes).
pub async fn drained(h: &Harness, engine: &TaskEngine, id: &str) {
    engine
        .submit(h.task(id, drain("maintenance")))
        .await
        .unwrap();
    let s = wait_terminal(engine, id, Duration::from_secs(10)).await;
    assert_eq!(s.state(), TaskState::Succeeded, "{s:?}");
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}
