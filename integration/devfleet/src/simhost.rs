//! An in-memory agent for coordinator tests and the scale benchmark: it
//! verifies tasks with the real [`TaskVerifier`] (real signatures, real
//! replay and sequence checks), executes them instantly, and signs real
//! attestations — without processes, NVML or TLS.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ed25519_dalek::SigningKey;
use prost::Message;
use ringfence::envelope::{AllowAll, ReplayGuard, TaskVerifier, Verified};
use ringfence::pb::{self, task_payload::Action};
use ringfence::time::Clock;
use ringfence::trust::TrustSet;

use ringfence_coordinator::client::{ClientError, HealthStream, HostApi};

/// How often a simulated host's health watch re-reads its state (tests
/// change [`SimState`] directly, so there is no change signal to wait on).
const WATCH_PERIOD: std::time::Duration = std::time::Duration::from_millis(50);

/// A simulated host's poll interval: its health watch sends a report at
/// least this often even when nothing changed (a heartbeat), as the agent
/// does every `[gpu] poll_interval_s`.
pub const SIM_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// What makes two reports of a simulated host differ for a watcher (the
/// collection time alone does not).
fn watch_key(r: &pb::HealthReport) -> (i32, Vec<String>, bool, String) {
    (
        r.verdict,
        r.reasons.iter().map(|x| x.code.clone()).collect(),
        r.draining,
        r.driver_version.clone(),
    )
}

/// The mutable state of a simulated host.
#[derive(Debug, Clone, Default)]
pub struct SimState {
    /// Task journal.
    pub tasks: BTreeMap<String, pb::TaskStatus>,
    /// Order in which tasks were accepted.
    pub order: Vec<String>,
    /// Sequence high-water mark.
    pub high_water: u64,
    /// Out of service.
    pub draining: bool,
    /// Installed driver version.
    pub driver_version: String,
    /// Version before the last patch.
    pub previous_version: String,
    /// CUDA driver version.
    pub cuda_version: String,
    /// Patch executions (counted on the "agent").
    pub patches: u32,
    /// A driver version that brings an uncorrected ECC error when installed.
    pub faulty_version: Option<String>,
    /// Unhealthy regardless of version.
    pub unhealthy: bool,
    /// Calls fail as unreachable.
    pub unreachable: bool,
    /// Last validation verdict.
    pub last_verdict: i32,
    /// The ring this agent is configured in (`ring` in agent.toml).
    pub ring: SimRing,
}

/// The ring a simulated agent knows itself to be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimRing {
    /// Built without one (unit tests of the coordinator's host pipeline):
    /// reports no ring and, like agents before rings were local, goes by the
    /// task's ring.
    #[default]
    Untracked,
    /// Configured: reported by GetIdentity; a task naming another ring is
    /// refused by check `ring` (PERMISSION_DENIED), as the agent does.
    Configured(u32),
    /// Explicitly none configured: reported as no ring, protected (the
    /// agent's secure default: every Patch, rollback, forced Undrain and
    /// AckFaults needs approvals whatever ring the task names).
    NotConfigured,
}

/// A simulated agent.
#[derive(Debug, Clone)]
pub struct SimHost {
    /// Its host id.
    pub host_id: String,
    key: Arc<SigningKey>,
    trust: Arc<TrustSet>,
    clock: Arc<dyn Clock>,
    state: Arc<Mutex<SimState>>,
}

struct Journal<'a>(&'a SimState);

impl ReplayGuard for Journal<'_> {
    fn recorded(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, String> {
        Ok(self.0.tasks.get(task_id).cloned())
    }
    fn high_water(&self) -> Result<u64, String> {
        Ok(self.0.high_water)
    }
}

impl SimHost {
    /// A healthy host on `driver_version`.
    pub fn new(
        host_id: &str,
        key: SigningKey,
        trust: Arc<TrustSet>,
        clock: Arc<dyn Clock>,
        driver_version: &str,
    ) -> Self {
        Self {
            host_id: host_id.to_string(),
            key: Arc::new(key),
            trust,
            clock,
            state: Arc::new(Mutex::new(SimState {
                driver_version: driver_version.to_string(),
                cuda_version: "12.4".into(),
                last_verdict: pb::Verdict::Healthy as i32,
                ..Default::default()
            })),
        }
    }

    /// The host's attestation public key.
    pub fn public_key(&self) -> ringfence::keys::VerifyingKey {
        self.key.verifying_key()
    }

    /// The same host, configured in `ring` (see [`SimRing`]).
    pub fn with_ring(self, ring: SimRing) -> Self {
        self.state().ring = ring;
        self
    }

    /// Lock the state (tests inspect and change it).
    pub fn state(&self) -> MutexGuard<'_, SimState> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn unreachable(&self) -> Result<(), ClientError> {
        if self.state().unreachable {
            Err(ClientError::Unreachable {
                host: self.host_id.clone(),
                reason: "simulated: host does not answer".into(),
            })
        } else {
            Ok(())
        }
    }

    fn report(&self, s: &SimState) -> pb::HealthReport {
        let mut reasons = Vec::new();
        let faulty = s.faulty_version.as_deref() == Some(s.driver_version.as_str());
        if faulty || s.unhealthy {
            reasons.push(pb::Reason {
                code: "ecc_uncorrected_volatile".into(),
                severity: pb::Verdict::Unhealthy as i32,
                gpu_index: 0,
                gpu_uuid: format!("GPU-{}-0", self.host_id),
                observed: "2".into(),
                threshold: "0".into(),
                message: "uncorrected volatile ECC errors".into(),
                fault_id: format!("ecc_uncorrected_volatile/GPU-{}-0", self.host_id),
            });
        }
        let verdict = if reasons.is_empty() {
            pb::Verdict::Healthy
        } else {
            pb::Verdict::Unhealthy
        };
        pb::HealthReport {
            host_id: self.host_id.clone(),
            collected_at_unix_ms: self.clock.now_ms(),
            boot_id: "sim-boot".into(),
            driver_version: s.driver_version.clone(),
            cuda_driver_version: s.cuda_version.clone(),
            gpus_expected: 1,
            gpus_found: 1,
            gpus: vec![pb::GpuReport {
                index: 0,
                uuid: format!("GPU-{}-0", self.host_id),
                name: "Simulated GPU".into(),
                ecc_volatile_uncorrected: Some(if faulty { 2 } else { 0 }),
                ecc_aggregate_uncorrected: Some(if faulty { 2 } else { 0 }),
                ..Default::default()
            }],
            verdict: verdict as i32,
            reasons,
            agent_version: ringfence::VERSION.into(),
            draining: s.draining,
            backend: "simulated".into(),
            ..Default::default()
        }
    }

    fn attestation(&self, s: &SimState, nonce: &[u8]) -> pb::Envelope {
        let report = self.report(s);
        ringfence::attest::attest(&self.host_id, &self.key, nonce, self.clock.now_ms(), report)
    }

    /// Verify and run a task as the agent's `SubmitTask` does; a refused
    /// task is the agent's gRPC status (the check named in its metadata).
    pub fn submit_task(&self, task: &pb::SignedTask) -> Result<pb::TaskStatus, tonic::Status> {
        let mut s = self.state();
        // The ring the task names (a task that does not decode is refused
        // by the verifier).
        let asked = task
            .task
            .as_ref()
            .and_then(|e| pb::TaskPayload::decode(e.payload.as_slice()).ok())
            .map(|p| p.ring);
        // The agent's own ring, which the verifier checks the task against
        // (none: protected, as an agent without `ring` in its agent.toml).
        let ring = match s.ring {
            SimRing::Untracked => asked,
            SimRing::Configured(r) => Some(r),
            SimRing::NotConfigured => None,
        };
        let verifier = TaskVerifier {
            trust: &self.trust,
            host_id: &self.host_id,
            ring,
            clock: self.clock.as_ref(),
        };
        match verifier.verify(task, &Journal(&s), &AllowAll) {
            Ok(Verified::Replay(st)) => Ok(*st),
            Ok(Verified::New(v)) => {
                let st = self.execute(&mut s, &v.payload);
                s.high_water = v.payload.sequence;
                s.order.push(st.task_id.clone());
                s.tasks.insert(st.task_id.clone(), st.clone());
                Ok(st)
            }
            Err(r) => Err(ringfence::status::task_rejection(&r)),
        }
    }

    fn execute(&self, s: &mut SimState, p: &pb::TaskPayload) -> pb::TaskStatus {
        let now = self.clock.now_ms();
        let mut st = pb::TaskStatus {
            task_id: p.task_id.clone(),
            host_id: p.host_id.clone(),
            wave_id: p.wave_id.clone(),
            sequence: p.sequence,
            state: pb::TaskState::Succeeded as i32,
            accepted_at_unix_ms: now,
            updated_at_unix_ms: now,
            exit_code: -1,
            ..Default::default()
        };
        match &p.action {
            Some(Action::Drain(_)) => {
                st.action = "drain".into();
                s.draining = true;
            }
            Some(Action::Patch(patch)) => {
                st.action = "patch".into();
                s.patches += 1;
                st.version_before = s.driver_version.clone();
                s.previous_version = s.driver_version.clone();
                s.driver_version = patch.version.clone();
                st.version_after = patch.version.clone();
                st.exit_code = 0;
            }
            Some(Action::Validate(v)) => {
                st.action = "validate".into();
                let env = self.attestation(s, &v.nonce);
                let report = self.report(s);
                s.last_verdict = report.verdict;
                let ok = report.verdict == pb::Verdict::Healthy as i32
                    && (v.expect_driver_version.is_empty()
                        || v.expect_driver_version == report.driver_version);
                if !ok {
                    st.state = pb::TaskState::Failed as i32;
                    st.message = "validation failed".into();
                }
                st.verdict = report.verdict;
                st.attestation = Some(env);
            }
            Some(Action::Undrain(u)) => {
                st.action = "undrain".into();
                if s.last_verdict != pb::Verdict::Healthy as i32 && !u.force {
                    st.state = pb::TaskState::Failed as i32;
                    st.message = "last validation was not HEALTHY".into();
                } else {
                    s.draining = false;
                }
            }
            Some(Action::AckFaults(_)) => st.action = "ack_faults".into(),
            None => {}
        }
        st
    }
}

#[tonic::async_trait]
impl HostApi for SimHost {
    async fn identity(&self) -> Result<pb::Identity, ClientError> {
        self.unreachable()?;
        let s = self.state();
        Ok(pb::Identity {
            host_id: self.host_id.clone(),
            attestation_public_key: self.key.verifying_key().to_bytes().to_vec(),
            sequence_high_water: s.high_water,
            draining: s.draining,
            agent_version: ringfence::VERSION.into(),
            ring: match s.ring {
                SimRing::Configured(r) => Some(r),
                SimRing::Untracked | SimRing::NotConfigured => None,
            },
            protected_ring: match s.ring {
                SimRing::Configured(r) => self.trust.policy.protected_rings.contains(&r),
                SimRing::NotConfigured => true,
                SimRing::Untracked => false,
            },
            ..Default::default()
        })
    }

    async fn attest(&self, nonce: Vec<u8>) -> Result<pb::Envelope, ClientError> {
        self.unreachable()?;
        let s = self.state();
        Ok(self.attestation(&s, &nonce))
    }

    async fn health(&self) -> Result<pb::HealthReport, ClientError> {
        self.unreachable()?;
        let s = self.state();
        Ok(self.report(&s))
    }

    async fn watch_health(&self) -> Result<HealthStream, ClientError> {
        use futures_util::StreamExt;
        self.unreachable()?;
        // The current report first, then one whenever a re-read differs and
        // at least every SIM_POLL_INTERVAL (a heartbeat); an unreachable
        // host ends the stream with the error, as a broken connection would.
        type Last = Option<((i32, Vec<String>, bool, String), tokio::time::Instant)>;
        let host = self.clone();
        let stream = futures_util::stream::unfold(
            (host, Last::None, false),
            |(host, last, ended): (SimHost, Last, bool)| async move {
                if ended {
                    return None;
                }
                loop {
                    if last.is_some() {
                        tokio::time::sleep(WATCH_PERIOD).await;
                    }
                    if let Err(e) = host.unreachable() {
                        return Some((Err(e), (host, last, true)));
                    }
                    let report = host.report(&host.state());
                    let key = watch_key(&report);
                    let due = last
                        .as_ref()
                        .is_none_or(|(k, at)| *k != key || at.elapsed() >= SIM_POLL_INTERVAL);
                    if due {
                        let now = tokio::time::Instant::now();
                        return Some((Ok(report), (host, Some((key, now)), false)));
                    }
                }
            },
        );
        Ok(stream.boxed())
    }

    async fn submit(&self, task: pb::SignedTask) -> Result<pb::TaskStatus, ClientError> {
        self.unreachable()?;
        self.submit_task(&task)
            .map_err(|s| ClientError::from_status(&self.host_id, &s))
    }

    async fn get_task(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, ClientError> {
        self.unreachable()?;
        Ok(self.state().tasks.get(task_id).cloned())
    }
}

// ------------------------------------------------ many hosts on one listener

/// The fleet file the scale benchmark writes for `ringfence-hostsim`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimFleet {
    /// Trust domain of every certificate.
    pub trust_domain: String,
    /// Driver version every host starts on.
    pub driver_version: String,
    /// The hosts.
    pub hosts: Vec<SimHostSpec>,
}

/// One simulated host of a [`SimFleet`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimHostSpec {
    /// Host id (also its TLS server name).
    pub id: String,
    /// Ring the simulated agent is configured in (reported by GetIdentity;
    /// a task naming another ring is refused).
    pub ring: u32,
    /// Its mTLS certificate, PEM.
    pub cert_pem: String,
    /// Its mTLS key, PEM.
    pub key_pem: String,
    /// Its attestation key seed, hex (the inventory enrolls the public half).
    pub attestation_seed: String,
}

/// Something a simulated host received or answered, and when.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SimEvent {
    /// Microseconds since the Unix epoch.
    pub at_us: i64,
    /// Host id.
    pub host: String,
    /// "attest", a task action ("drain", "patch", "validate", "undrain"), or
    /// "validate_failed" when a failed validation is handed to the coordinator.
    pub what: String,
}

/// What a `ringfence-hostsim` run saw, written when it stops.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct SimRecord {
    /// Every attestation and accepted task, in arrival order.
    pub events: Vec<SimEvent>,
    /// Patch executions per host (the agent-side counter).
    pub patches: BTreeMap<String, u32>,
}

fn now_us() -> i64 {
    ringfence::time::system_time()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Many [`SimHost`]s behind one gRPC Agent service; each request goes to
/// the host the client named by TLS SNI.
#[derive(Debug, Clone)]
pub struct MultiHost {
    hosts: Arc<std::collections::HashMap<String, SimHost>>,
    events: Arc<Mutex<Vec<SimEvent>>>,
}

impl MultiHost {
    /// Build every host of `fleet`; `faulty` = (host, version whose install
    /// brings an uncorrected ECC error on that host).
    pub fn new(
        fleet: &SimFleet,
        trust: Arc<TrustSet>,
        faulty: Option<(&str, &str)>,
    ) -> Result<Self, String> {
        let clock: Arc<dyn Clock> = Arc::new(ringfence::time::SystemClock);
        let mut hosts = std::collections::HashMap::with_capacity(fleet.hosts.len());
        for h in &fleet.hosts {
            let seed: [u8; 32] = hex::decode(&h.attestation_seed)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| format!("host `{}`: attestation_seed is not 32 hex bytes", h.id))?;
            let sim = SimHost::new(
                &h.id,
                SigningKey::from_bytes(&seed),
                trust.clone(),
                clock.clone(),
                &fleet.driver_version,
            )
            .with_ring(SimRing::Configured(h.ring));
            if let Some((id, version)) = faulty
                && id == h.id
            {
                sim.state().faulty_version = Some(version.to_string());
            }
            hosts.insert(h.id.clone(), sim);
        }
        if let Some((id, _)) = faulty
            && !hosts.contains_key(id)
        {
            return Err(format!("faulty host `{id}` is not in the fleet"));
        }
        Ok(Self {
            hosts: Arc::new(hosts),
            events: Arc::new(Mutex::new(Vec::new())),
        })
    }

    fn host<T>(&self, req: &tonic::Request<T>) -> Result<&SimHost, tonic::Status> {
        let name = ringfence::tls::peer_identity(req)
            .and_then(|p| p.server_name.as_deref())
            .ok_or_else(|| tonic::Status::failed_precondition("no TLS server name (SNI) given"))?;
        self.hosts
            .get(name)
            .ok_or_else(|| tonic::Status::not_found(format!("no simulated host `{name}`")))
    }

    fn record(&self, host: &str, what: &str) {
        let e = SimEvent {
            at_us: now_us(),
            host: host.to_string(),
            what: what.to_string(),
        };
        match self.events.lock() {
            Ok(mut v) => v.push(e),
            Err(p) => p.into_inner().push(e),
        }
    }

    /// One of the simulated hosts (tests change its state, e.g. its ring).
    pub fn host_by_id(&self, id: &str) -> Option<&SimHost> {
        self.hosts.get(id)
    }

    /// Everything seen so far.
    pub fn snapshot(&self) -> SimRecord {
        let events = match self.events.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let patches = self
            .hosts
            .iter()
            .map(|(id, h)| (id.clone(), h.state().patches))
            .collect();
        SimRecord { events, patches }
    }
}

fn api_status(e: ClientError) -> tonic::Status {
    tonic::Status::unavailable(e.to_string())
}

type NoStream<T> = futures_util::stream::Empty<Result<T, tonic::Status>>;

#[tonic::async_trait]
impl pb::agent_server::Agent for MultiHost {
    async fn get_identity(
        &self,
        req: tonic::Request<pb::GetIdentityRequest>,
    ) -> Result<tonic::Response<pb::Identity>, tonic::Status> {
        let h = self.host(&req)?;
        h.identity()
            .await
            .map(tonic::Response::new)
            .map_err(api_status)
    }

    async fn get_health(
        &self,
        req: tonic::Request<pb::GetHealthRequest>,
    ) -> Result<tonic::Response<pb::HealthReport>, tonic::Status> {
        let h = self.host(&req)?;
        h.health()
            .await
            .map(tonic::Response::new)
            .map_err(api_status)
    }

    type WatchHealthStream =
        futures_util::stream::BoxStream<'static, Result<pb::HealthReport, tonic::Status>>;

    async fn watch_health(
        &self,
        req: tonic::Request<pb::WatchHealthRequest>,
    ) -> Result<tonic::Response<Self::WatchHealthStream>, tonic::Status> {
        use futures_util::StreamExt;
        let h = self.host(&req)?;
        let stream = h.watch_health().await.map_err(api_status)?;
        Ok(tonic::Response::new(
            stream.map(|r| r.map_err(api_status)).boxed(),
        ))
    }

    async fn attest(
        &self,
        req: tonic::Request<pb::AttestRequest>,
    ) -> Result<tonic::Response<pb::Envelope>, tonic::Status> {
        let h = self.host(&req)?;
        self.record(&h.host_id, "attest");
        h.attest(req.into_inner().nonce)
            .await
            .map(tonic::Response::new)
            .map_err(api_status)
    }

    async fn submit_task(
        &self,
        req: tonic::Request<pb::SignedTask>,
    ) -> Result<tonic::Response<pb::TaskStatus>, tonic::Status> {
        let h = self.host(&req)?;
        let st = h.submit_task(req.get_ref())?;
        self.record(&h.host_id, &st.action);
        Ok(tonic::Response::new(st))
    }

    async fn get_task(
        &self,
        req: tonic::Request<pb::GetTaskRequest>,
    ) -> Result<tonic::Response<pb::TaskStatus>, tonic::Status> {
        let h = self.host(&req)?;
        match h.get_task(&req.get_ref().task_id).await {
            Ok(Some(st)) => {
                if st.action == "validate" && st.state == pb::TaskState::Failed as i32 {
                    self.record(&h.host_id, "validate_failed");
                }
                Ok(tonic::Response::new(st))
            }
            Ok(None) => Err(tonic::Status::not_found("no such task")),
            Err(e) => Err(api_status(e)),
        }
    }

    type WatchTaskStream = NoStream<pb::TaskStatus>;

    async fn watch_task(
        &self,
        _req: tonic::Request<pb::GetTaskRequest>,
    ) -> Result<tonic::Response<Self::WatchTaskStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not simulated"))
    }

    async fn list_tasks(
        &self,
        _req: tonic::Request<pb::ListTasksRequest>,
    ) -> Result<tonic::Response<pb::ListTasksResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not simulated"))
    }
}
