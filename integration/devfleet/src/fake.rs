//! A [`HealthSource`] whose report the caller controls, for the agent's
//! task-engine tests (`agent/tests/tasks_*.rs`).

use ringfence::time::{Clock, SystemClock};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ringfence::pb;

use ringfenced::tasks::HealthSource;

/// What the fake reports.
#[derive(Debug, Clone)]
pub struct FakeState {
    /// Driver version in reports.
    pub driver_version: String,
    /// CUDA driver version in reports.
    pub cuda_version: String,
    /// Verdict in reports.
    pub verdict: pb::Verdict,
    /// Reasons in reports.
    pub reasons: Vec<pb::Reason>,
    /// Compute process pids on GPU 0.
    pub processes: Vec<u32>,
    /// When the processes exit (None: never).
    pub processes_exit_at: Option<Instant>,
    /// Boot id in reports.
    pub boot_id: String,
    /// Fault ids acknowledged so far.
    pub acknowledged: Vec<String>,
}

/// A controllable health source that signs attestations with its own key.
#[derive(Debug)]
pub struct FakeHealth {
    host_id: String,
    key: SigningKey,
    state: Mutex<FakeState>,
}

impl FakeHealth {
    /// A healthy host with driver 550.54.15 / CUDA 12.4 and no processes.
    pub fn new(host_id: &str) -> Self {
        Self {
            host_id: host_id.to_string(),
            key: ringfence::keys::generate(),
            state: Mutex::new(FakeState {
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                verdict: pb::Verdict::Healthy,
                reasons: Vec::new(),
                processes: Vec::new(),
                processes_exit_at: None,
                boot_id: "boot-1".into(),
                acknowledged: Vec::new(),
            }),
        }
    }

    /// The key that signs attestations.
    pub fn verifying_key(&self) -> ed25519_dalek::VerifyingKey {
        self.key.verifying_key()
    }

    /// Change the state.
    pub fn update(&self, f: impl FnOnce(&mut FakeState)) {
        f(&mut self.lock());
    }

    /// Compute processes that exit after `exit_after` (None: never).
    pub fn set_processes(&self, pids: Vec<u32>, exit_after: Option<Duration>) {
        self.update(|s| {
            s.processes = pids;
            s.processes_exit_at = exit_after.map(|d| Instant::now() + d);
        });
    }

    /// A copy of the state.
    pub fn state(&self) -> FakeState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl HealthSource for FakeHealth {
    fn fresh_report(&self, draining: bool) -> pb::HealthReport {
        let s = self.lock();
        let running = s.processes_exit_at.is_none_or(|t| Instant::now() < t);
        let processes = if running {
            s.processes
                .iter()
                .map(|&pid| pb::GpuProcess {
                    pid,
                    used_memory_bytes: 0,
                })
                .collect()
        } else {
            Vec::new()
        };
        pb::HealthReport {
            host_id: self.host_id.clone(),
            collected_at_unix_ms: SystemClock.now_ms(),
            boot_id: s.boot_id.clone(),
            driver_version: s.driver_version.clone(),
            cuda_driver_version: s.cuda_version.clone(),
            gpus_expected: 1,
            gpus_found: 1,
            gpus: vec![pb::GpuReport {
                index: 0,
                uuid: "GPU-fake-0".into(),
                name: "Fake GPU".into(),
                processes,
                ..Default::default()
            }],
            verdict: s.verdict as i32,
            reasons: s.reasons.clone(),
            agent_version: ringfence::VERSION.into(),
            draining,
            backend: "simulated".into(),
            acknowledged_faults: s.acknowledged.clone(),
            ..Default::default()
        }
    }

    fn attest(&self, nonce: &[u8], draining: bool) -> pb::Envelope {
        let report = self.fresh_report(draining);
        let at = report.collected_at_unix_ms;
        ringfence::attest::attest(&self.host_id, &self.key, nonce, at, report)
    }

    fn acknowledge(&self, ack: &pb::AckFaults) -> Vec<String> {
        let mut s = self.lock();
        let ids: Vec<String> = s
            .reasons
            .iter()
            .filter(|r| ack.codes.is_empty() || ack.codes.contains(&r.code))
            .filter(|r| ack.gpu_index < 0 || r.gpu_index == ack.gpu_index)
            .map(|r| r.fault_id.clone())
            .collect();
        s.reasons.retain(|r| !ids.contains(&r.fault_id));
        if s.reasons.is_empty() {
            s.verdict = pb::Verdict::Healthy;
        }
        s.acknowledged.extend(ids.iter().cloned());
        ids
    }
}
