//! The I/O loop of `wave run` / `wave resume`: carries out what the pure
//! sequencer ([`crate::plan::next_steps`]) says, one host pipeline
//! ([`crate::hostrun`]) per started host, and persists everything to the
//! wave store before acting on it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use futures_util::StreamExt;
use ringfence::pb;
use ringfence::time::Clock;
use ringfence::trust::TrustSet;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::approvals::{self, BreakGlassGrant, RingScope};
use crate::client::HostApi;
use crate::evidence;
use crate::hostrun::{self, Ctx, HostJob, HostRecord, Params, Phase, Signer};
use crate::inventory::Inventory;
use crate::plan::{self, HostStatus, Plan, RingStatus, Step, WaveState};
use crate::report::{Event, Reporter};
use crate::spec::{OnFailure, WaveSpec};
use crate::store::{self, LedgerEntry, PoolLedger, StoreError, WaveStore};

/// Opens a connection to a host (the seam tests and the demo fill).
#[tonic::async_trait]
pub trait Connector: Send + Sync {
    /// A client for `host`, or why it cannot be reached.
    async fn connect(&self, host: &crate::inventory::Host) -> Result<Arc<dyn HostApi>, String>;
}

/// The real connector: mTLS to the host's address, pinned to its SPIFFE id.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    /// Operator identity.
    pub identity: ringfence::tls::ClientIdentity,
    /// Trust domain of the fleet.
    pub trust_domain: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Per-RPC timeout.
    pub rpc_timeout: Duration,
}

#[tonic::async_trait]
impl Connector for TlsConnector {
    async fn connect(&self, host: &crate::inventory::Host) -> Result<Arc<dyn HostApi>, String> {
        let expected = ringfence::spiffe::SpiffeId::new(
            &self.trust_domain,
            ringfence::spiffe::Role::Host,
            &host.id,
        )
        .map_err(|e| e.to_string())?;
        let ch = ringfence::tls::connect_with_timeout(
            &host.address,
            &expected,
            &self.identity,
            self.connect_timeout,
        )
        .await
        .map_err(|e| format!("host `{}` unreachable: {e}", host.id))?;
        Ok(Arc::new(crate::client::GrpcHost::new(
            &host.id,
            ch,
            self.rpc_timeout,
        )))
    }
}

/// Why the wave stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltReport {
    /// Wave id.
    pub wave_id: String,
    /// Ring in progress.
    pub ring: u32,
    /// Failed host, if a host failed.
    pub host: Option<String>,
    /// Step that failed.
    pub step: String,
    /// Failure class.
    pub kind: String,
    /// Why.
    pub reason: String,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every ring complete.
    Completed,
    /// Halted; hosts named in the report are left drained.
    Halted(HaltReport),
}

/// The wave could not run.
#[derive(Debug, thiserror::Error)]
pub enum WaveError {
    /// the wave store failed
    #[error(transparent)]
    Store(#[from] StoreError),
    /// the wave cannot be planned
    #[error(transparent)]
    Plan(#[from] plan::PlanError),
    /// the host pipeline failed to persist
    #[error(transparent)]
    HostRun(#[from] hostrun::HostRunError),
    /// the wave already has state
    #[error("wave `{0}` already has state; use `ringfence wave resume --wave {0}`")]
    Exists(String),
    /// agents are configured in another ring than the inventory's (or none)
    #[error("{}", crate::inventory::ring_mismatch_message(wave, inventory, hosts))]
    RingMismatch {
        wave: String,
        inventory: PathBuf,
        /// `host: finding` for every agent that blocks the wave.
        hosts: Vec<String>,
    },
    /// resume without state
    #[error("wave `{0}` has no state to resume")]
    NoState(String),
    /// resume needs a decision for each failed host
    #[error(
        "wave `{wave}` halted; decide for each failed host with --retry HOST or --skip HOST --reason TEXT (or `ringfence wave abort`): {hosts}"
    )]
    NeedsDecision { wave: String, hosts: String },
    /// a decision names a host that did not fail
    #[error("--retry/--skip `{0}`: that host has not failed in this wave")]
    BadDecision(String),
    /// the wave was aborted
    #[error("wave `{0}` was aborted")]
    Aborted(String),
    /// a break-glass file is not acceptable
    #[error("break-glass {path}: {reason}")]
    BreakGlass { path: PathBuf, reason: String },
    /// `wave rollback` names a host the wave does not cover
    #[error("host `{host}` is not part of wave `{wave}`")]
    NotInWave { wave: String, host: String },
    /// `wave rollback` on a host the wave still has in flight
    #[error(
        "host `{host}` is in flight in wave `{wave}` (phase {phase}); resume or abort the wave before rolling it back by hand"
    )]
    HostInFlight {
        wave: String,
        host: String,
        phase: String,
    },
    /// the host to roll back cannot be reached
    #[error("{0}")]
    Unreachable(String),
}

/// What the loop needs.
pub struct Driver {
    /// The inventory.
    pub inventory: Inventory,
    /// The spec.
    pub spec: WaveSpec,
    /// Trust file (approver and coordinator keys).
    pub trust: TrustSet,
    /// Coordinator key.
    pub signer: Signer,
    /// Store.
    pub store: Arc<WaveStore>,
    /// Connections.
    pub connector: Arc<dyn Connector>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Output.
    pub reporter: Reporter,
    /// Interval of task polls and loop ticks.
    pub poll_interval: Duration,
    /// Coordinator state dir (approvals directory lives there).
    pub state_dir: PathBuf,
    /// Verified break-glass grants.
    pub break_glass: Vec<(BreakGlassGrant, pb::Envelope)>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("wave", &self.spec.wave_id)
            .finish_non_exhaustive()
    }
}

/// Status snapshot written for `wave status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusSnapshot {
    /// Wave id.
    pub wave_id: String,
    /// "running", "awaiting_approval", "waiting_window", "soaking", "halted", "completed", "aborted".
    pub phase: String,
    /// Current ring.
    pub ring: Option<u32>,
    /// Per ring: status and host counts by status.
    pub rings: BTreeMap<u32, RingView>,
    /// Per pool: out of service now, and the limit.
    pub pools: BTreeMap<String, (usize, usize)>,
    /// Failures so far, and the budget.
    pub failures: (u32, u32),
    /// Halt report, if halted.
    pub halt: Option<HaltReport>,
    /// Next window opening, if waiting for one.
    pub next_window: Option<String>,
    /// Break-glass grants in force.
    pub break_glass: Vec<String>,
    /// Hosts of the current ring for `wave approve`.
    pub ring_hosts: BTreeMap<u32, Vec<String>>,
    /// Profile and version (for `wave approve`).
    pub profile: String,
    /// Version.
    pub version: String,
    /// Rollback version (for `wave approve`).
    pub rollback_version: String,
    /// Started / updated, ms since the epoch.
    pub started_at_ms: i64,
    /// Updated.
    pub updated_at_ms: i64,
    /// Per host phase and failure.
    pub hosts: BTreeMap<String, String>,
}

/// One ring in the status snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingView {
    /// Status name.
    pub status: String,
    /// Hosts by status.
    pub counts: BTreeMap<String, usize>,
    /// Protected and approved?
    pub approval: String,
}

/// Longest gap between writes of the wave state and status snapshot while
/// hosts progress (ring, halt and dispatch changes are written at once).
const PERSIST_EVERY: Duration = Duration::from_millis(250);

/// How long a soak watcher waits before reopening a broken health stream
/// (once; a second break in a row makes the host unreachable).
const SOAK_REOPEN_AFTER: Duration = Duration::from_millis(500);

/// What a soak watcher tells the wave loop about its host.
#[derive(Debug)]
enum SoakNews {
    /// The first report arrived: the host is being watched.
    Watching(String),
    /// The host regressed (UNHEALTHY, or its watch broke for good): why.
    Regressed(String, String),
}

/// Watch one host of a soaking ring until it regresses (or the task is
/// aborted when the ring is promoted or the wave ends).
async fn watch_soak(
    connector: Arc<dyn Connector>,
    host: crate::inventory::Host,
    tx: mpsc::Sender<SoakNews>,
) {
    let id = host.id.clone();
    let mut retried = false;
    loop {
        let opened = match connector.connect(&host).await {
            Ok(api) => api.watch_health().await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let broke = match opened {
            Err(e) => e,
            Ok(mut stream) => loop {
                match stream.next().await {
                    Some(Ok(r)) => {
                        // A report on this stream: a later break may be
                        // retried once more.
                        retried = false;
                        if r.verdict == pb::Verdict::Unhealthy as i32 {
                            let codes = r
                                .reasons
                                .iter()
                                .filter(|x| x.severity == pb::Verdict::Unhealthy as i32)
                                .map(|x| x.code.clone())
                                .collect::<Vec<_>>()
                                .join(", ");
                            let why = format!("UNHEALTHY during soak ({codes})");
                            let _ = tx.send(SoakNews::Regressed(id, why)).await;
                            return;
                        }
                        let _ = tx.send(SoakNews::Watching(id.clone())).await;
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the health stream ended".to_string(),
                }
            },
        };
        if retried {
            let why = format!("unreachable during soak: {broke}");
            let _ = tx.send(SoakNews::Regressed(id, why)).await;
            return;
        }
        retried = true;
        tokio::time::sleep(SOAK_REOPEN_AFTER).await;
    }
}

const META_SPEC: &str = "spec";
/// Meta key holding the wave spec's source text (re-parsed on resume).
pub const META_SPEC_TEXT: &str = "spec_text";
const META_PLAN: &str = "plan";
const META_STATE: &str = "state";
const META_STARTED: &str = "started_at_ms";
const META_ABORTED: &str = "aborted";
const META_HALT: &str = "halt";

/// What the probe before a new wave found.
#[derive(Debug, Default)]
struct Probe {
    /// Hosts out of service before the wave (host → why).
    out: BTreeMap<String, String>,
    /// `host: finding` for every agent whose own ring blocks the wave, in
    /// inventory order.
    ring_mismatch: Vec<String>,
}

impl Driver {
    /// Start a new wave: probe hosts, plan, persist, run.
    pub async fn run(&mut self) -> Result<Outcome, WaveError> {
        if self.store.get_meta::<Plan>(META_PLAN)?.is_some() {
            return Err(WaveError::Exists(self.spec.wave_id.clone()));
        }
        // Probe while holding the pool ledger: no other wave takes a host
        // out meanwhile, so every host another wave has drained is in its
        // ledger entry and counts as that wave's, not as out before.
        let out_before = {
            let guard = PoolLedger::new(&self.store.paths).lock().await?;
            let Probe {
                mut out,
                ring_mismatch,
            } = self.probe().await;
            if !ring_mismatch.is_empty() {
                return Err(WaveError::RingMismatch {
                    wave: self.spec.wave_id.clone(),
                    inventory: self.inventory.path.clone(),
                    hosts: ring_mismatch,
                });
            }
            let others = guard.others(&self.spec.wave_id);
            out.retain(|h, _| !others.values().any(|hosts| hosts.contains_key(h)));
            out
        };
        let overrides: BTreeMap<String, plan::BreakGlassLimit> = self
            .break_glass
            .iter()
            .map(|(g, _)| {
                (
                    g.pool.clone(),
                    plan::BreakGlassLimit {
                        max_out: g.max_out,
                        expires_at_ms: g.expires_at_ms,
                    },
                )
            })
            .collect();
        let plan = Plan::build(&self.inventory, &self.spec, &out_before, &overrides)?;
        self.store.put_meta(META_SPEC, &self.spec)?;
        self.store.put_meta(META_PLAN, &plan)?;
        self.store.put_meta(META_STARTED, &self.clock.now_ms())?;
        let state = WaveState::new(&plan);
        self.store.put_meta(META_STATE, &state)?;
        self.store
            .append_event(&Event::started(&self.spec.wave_id))?;
        self.reporter.emit(&Event::planned(&plan));
        self.drive(plan, state).await
    }

    /// Continue a wave after a crash or a halt, with operator decisions
    /// (the resume begins now: see [`resume_after`](Self::resume_after)).
    pub async fn resume(
        &mut self,
        retry: &[String],
        skip: &[(String, String)],
    ) -> Result<Outcome, WaveError> {
        let seen = store::halt_request(&self.store.paths);
        self.resume_after(retry, skip, seen).await
    }

    /// [`resume`](Self::resume) that began when the wave's halt request
    /// was `seen_halt` ([`store::halt_request`] then): that request is
    /// cleared, but a halt requested after it stands and halts the resumed
    /// wave.
    pub async fn resume_after(
        &mut self,
        retry: &[String],
        skip: &[(String, String)],
        seen_halt: Option<String>,
    ) -> Result<Outcome, WaveError> {
        let wave = self.spec.wave_id.clone();
        let Some(plan) = self.store.get_meta::<Plan>(META_PLAN)? else {
            return Err(WaveError::NoState(wave));
        };
        if self.store.get_meta::<bool>(META_ABORTED)?.unwrap_or(false) {
            return Err(WaveError::Aborted(wave));
        }
        let mut state: WaveState = self
            .store
            .get_meta(META_STATE)?
            .unwrap_or_else(|| WaveState::new(&plan));
        let failed: Vec<String> = state
            .hosts
            .iter()
            .filter(|(_, s)| **s == HostStatus::Failed)
            .map(|(h, _)| h.clone())
            .collect();
        for h in retry.iter().chain(skip.iter().map(|(h, _)| h)) {
            if !failed.contains(h) {
                return Err(WaveError::BadDecision(h.clone()));
            }
        }
        // A resume clears the record to `null`; read it as an Option so a
        // second resume (e.g. after another crash) still works.
        let halted = self
            .store
            .get_meta::<Option<HaltReport>>(META_HALT)?
            .flatten()
            .is_some();
        let undecided: Vec<&String> = failed
            .iter()
            .filter(|h| !retry.contains(h) && !skip.iter().any(|(s, _)| s == *h))
            .collect();
        if halted && state.failures > plan.failure_budget && !undecided.is_empty() {
            return Err(WaveError::NeedsDecision {
                wave,
                hosts: undecided
                    .iter()
                    .map(|h| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        for h in retry {
            if let Some(mut rec) = self.store.get_host::<HostRecord>(h)? {
                // Start over from attest-before; the agent's journal keeps
                // every earlier task id, so nothing already done reruns.
                rec.phase = Phase::Pending;
                rec.failure = None;
                rec.before = None;
                rec.after = None;
                rec.drill.clear();
                self.store.put_host(h, &rec)?;
            }
            state.hosts.insert(h.clone(), HostStatus::Pending);
            state.failures = state.failures.saturating_sub(1);
            self.store.append_event(&Event::decision(h, "retry", ""))?;
        }
        for (h, reason) in skip {
            state.hosts.insert(h.clone(), HostStatus::Skipped);
            state.failures = state.failures.saturating_sub(1);
            self.store
                .append_event(&Event::decision(h, "skip", reason))?;
        }
        // Only the halt this resume decided over is cleared; one requested
        // since the resume began stands.
        state.halt_requested = store::clear_halt(&self.store.paths, seen_halt.as_deref())?;
        self.store
            .put_meta::<Option<HaltReport>>(META_HALT, &None)?;
        self.store.put_meta(META_STATE, &state)?;
        self.reporter.emit(&Event::resumed(&wave));
        self.drive(plan, state).await
    }

    /// `ringfence wave rollback`: patch one host of this wave back by hand
    /// (see [`hostrun::rollback_by_hand`]), record it in the wave store and
    /// its events, and count a host that the wave had finished as failed
    /// again (it is drained and no longer on the wave's version).
    pub async fn rollback_host(
        &mut self,
        host: &str,
    ) -> Result<(HostRecord, Option<hostrun::Failure>), WaveError> {
        let wave = self.spec.wave_id.clone();
        let Some(plan) = self.store.get_meta::<Plan>(META_PLAN)? else {
            return Err(WaveError::NoState(wave));
        };
        let Some(&ring) = plan.host_ring.get(host) else {
            return Err(WaveError::NotInWave {
                wave,
                host: host.to_string(),
            });
        };
        if let Some(rec) = self.store.get_host::<HostRecord>(host)?
            && !matches!(rec.phase, Phase::Pending | Phase::Done | Phase::Failed)
        {
            return Err(WaveError::HostInFlight {
                wave,
                host: host.to_string(),
                phase: format!("{:?}", rec.phase),
            });
        }
        let mut approvals_by_ring = BTreeMap::new();
        if plan.rings.get(&ring).is_some_and(|r| r.protected) {
            approvals_by_ring.insert(ring, Arc::new(self.ring_approvals(&plan, ring).envelopes));
        }
        let job = self.job(&plan, host, &approvals_by_ring);
        let inv_host = self
            .inventory
            .host(host)
            .cloned()
            .ok_or_else(|| WaveError::NotInWave {
                wave: wave.clone(),
                host: host.to_string(),
            })?;
        let api = self
            .connector
            .connect(&inv_host)
            .await
            .map_err(WaveError::Unreachable)?;
        let ctx = Ctx {
            params: Arc::new(self.params()),
            signer: Arc::new(self.signer.clone()),
            store: self.store.clone(),
            clock: self.clock.clone(),
            halt: Arc::new(AtomicBool::new(false)),
        };
        self.store
            .append_event(&Event::host(host, "rollback", "rollback by hand started"))?;
        let (rec, failure) = hostrun::rollback_by_hand(&ctx, &job, api.as_ref()).await?;
        let detail = rec
            .failure
            .as_ref()
            .map(|f| f.reason.clone())
            .unwrap_or_default();
        let what = if failure.is_none() {
            "rolled_back"
        } else {
            "rollback_failed"
        };
        self.store.append_event(&Event::host(host, what, &detail))?;
        self.reporter.emit(&Event::host(host, what, &detail));
        let mut state: WaveState = self
            .store
            .get_meta(META_STATE)?
            .unwrap_or_else(|| WaveState::new(&plan));
        if state.hosts.get(host) == Some(&HostStatus::Done) {
            state.hosts.insert(host.to_string(), HostStatus::Failed);
            state.failures += 1;
            self.store.put_meta(META_STATE, &state)?;
        }
        Ok((rec, failure))
    }

    /// One connection to every host: its health (hosts already out of
    /// service count against the reserve) and its agent's own ring (a wave
    /// never starts while an agent's ring differs from the inventory's).
    async fn probe(&self) -> Probe {
        let mut probe = Probe::default();
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = Vec::new();
        for h in self.inventory.hosts.clone() {
            let c = self.connector.clone();
            let sem = sem.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire_owned().await;
                let r = match c.connect(&h).await {
                    Ok(api) => {
                        // An agent that does not answer GetIdentity is left
                        // to its own pipeline, as an unreachable one is.
                        let ring = api.identity().await.ok().map(|id| h.ring_finding(id.ring));
                        api.health()
                            .await
                            .map(|rep| (rep, ring))
                            .map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e),
                };
                (h.id, r)
            }));
        }
        for t in tasks {
            let Ok((id, r)) = t.await else { continue };
            let Ok((rep, ring)) = r else {
                // Unreachable hosts are found by their own pipeline.
                continue;
            };
            if let Some(f) = ring.filter(|f| f.blocks_wave()) {
                probe.ring_mismatch.push(format!("{id}: {f}"));
            }
            if rep.verdict == pb::Verdict::Unhealthy as i32 {
                let why = rep
                    .reasons
                    .first()
                    .map(|r| r.code.clone())
                    .unwrap_or_default();
                probe.out.insert(id, format!("UNHEALTHY ({why})"));
            } else if rep.draining {
                probe.out.insert(id, "already drained".into());
            }
        }
        probe
    }

    fn params(&self) -> Params {
        let s = &self.spec;
        Params {
            wave_id: s.wave_id.clone(),
            profile: s.profile.clone(),
            version: s.version.clone(),
            expect_driver_version: s.expect_driver_version.clone(),
            expect_cuda_version: s.expect_cuda_version.clone(),
            task_lifetime_ms: i64::try_from(s.task_lifetime_s).unwrap_or(900) * 1000,
            task_timeout_ms: i64::try_from(s.task_timeout_s).unwrap_or(1800) * 1000,
            attestation_max_age_ms: i64::try_from(s.attestation_max_age_s).unwrap_or(300) * 1000,
            max_clock_skew_ms: i64::try_from(self.trust.policy.max_clock_skew_s)
                .unwrap_or(120)
                .saturating_mul(1000),
            poll_interval: self.poll_interval,
            rollback_on_failure: s.on_failure == OnFailure::Rollback,
            rollback_version: s.rollback_version.clone(),
        }
    }

    fn ring_approvals(&self, plan: &Plan, ring: u32) -> approvals::RingApprovals {
        let hosts = plan
            .rings
            .get(&ring)
            .map(|r| r.hosts.clone())
            .unwrap_or_default();
        approvals::collect_ring(
            &approvals::approvals_dir(&self.state_dir, &self.spec.wave_id),
            &self.trust,
            &RingScope {
                wave_id: &self.spec.wave_id,
                ring,
                profile: &self.spec.profile,
                version: &self.spec.version,
                hosts: &hosts,
            },
            self.clock.now_ms(),
        )
    }

    async fn drive(&mut self, plan: Plan, mut state: WaveState) -> Result<Outcome, WaveError> {
        let halt_flag = Arc::new(AtomicBool::new(false));
        let ctx = Ctx {
            params: Arc::new(self.params()),
            signer: Arc::new(self.signer.clone()),
            store: self.store.clone(),
            clock: self.clock.clone(),
            halt: halt_flag.clone(),
        };
        let (tx, mut rx) = mpsc::channel::<(String, Result<HostRecord, String>)>(1024);
        let mut in_flight: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
        // Soak watchers by ring; dropping a JoinSet aborts its tasks, so
        // none outlives its ring's soak or this call (any return path).
        let (soak_tx, mut soak_rx) = mpsc::channel::<SoakNews>(1024);
        // Hosts that regressed during a soak, drained again (in `in_flight`
        // until their drain ends, so a halt waits for it).
        let (redrain_tx, mut redrain_rx) = mpsc::channel::<(String, Result<bool, String>)>(64);
        let mut redrained: BTreeMap<String, bool> = BTreeMap::new();
        let mut soak_watchers: BTreeMap<u32, JoinSet<()>> = BTreeMap::new();
        // Hosts with a watcher, and hosts a watcher has had a report from.
        let mut soak_started: BTreeSet<String> = BTreeSet::new();
        let mut soak_watched: BTreeSet<String> = BTreeSet::new();
        let mut approvals_by_ring: BTreeMap<u32, Arc<approvals::ApprovalSet>> = BTreeMap::new();
        let mut halt: Option<HaltReport> = None;
        let mut halt_recorded = false;
        let mut last_persist = Instant::now();
        let mut announced_wait = String::new();
        // The pool ledger: this wave's hosts out of service as last
        // recorded, and when the other waves' were last read.
        let ledger = PoolLedger::new(&self.store.paths);
        let mut ledger_written: LedgerEntry = {
            let mut guard = ledger.lock().await?;
            state.others_out = ledger_counts(&guard.others(&self.spec.wave_id));
            let own = own_out(&plan, &state);
            guard.set(&self.spec.wave_id, &own)?;
            own
        };
        let mut ledger_read = Instant::now();

        // Re-attach to hosts that were in flight when a coordinator died.
        let resuming: Vec<String> = state
            .hosts
            .iter()
            .filter(|(_, s)| **s == HostStatus::InFlight)
            .map(|(h, _)| h.clone())
            .collect();
        for h in resuming {
            let ring = plan.host_ring.get(&h).copied().unwrap_or(0);
            if plan.rings.get(&ring).is_some_and(|r| r.protected) {
                let got = self.ring_approvals(&plan, ring);
                approvals_by_ring.insert(ring, Arc::new(got.envelopes));
            }
            self.reporter.emit(&Event::host(&h, "reattach", ""));
            let job = self.job(&plan, &h, &approvals_by_ring);
            in_flight.insert(h.clone(), self.spawn_host(ctx.clone(), job, tx.clone()));
        }

        loop {
            state.now_ms = self.clock.now_ms();
            state.window_open = self
                .spec
                .window
                .as_ref()
                .is_none_or(|w| w.is_open(state.now_ms));
            if self.store.halt_requested() {
                state.halt_requested = true;
            }
            // Soak news that arrived since the last round counts before the
            // sequencer may promote the ring.
            while let Ok(news) = soak_rx.try_recv() {
                if let Some((h, why)) =
                    self.soak_news(&plan, &mut state, &mut soak_watched, news, &halt_flag)?
                {
                    let job = self.job(&plan, &h, &approvals_by_ring);
                    let drain = self.spawn_soak_drain(ctx.clone(), job, why, redrain_tx.clone());
                    in_flight.insert(h, drain);
                }
            }
            // Approvals that arrived as files.
            for (r, rp) in &plan.rings {
                if rp.protected
                    && !state.approved.contains(r)
                    && state.rings.get(r) != Some(&RingStatus::Complete)
                {
                    let got = self.ring_approvals(&plan, *r);
                    if got.approvers.len() >= self.spec.approver_threshold {
                        state.approved.insert(*r);
                        self.reporter.emit(&Event::approved(
                            *r,
                            &got.approvers.iter().cloned().collect::<Vec<_>>(),
                        ));
                        self.store.append_event(&Event::approved(
                            *r,
                            &got.approvers.iter().cloned().collect::<Vec<_>>(),
                        ))?;
                        approvals_by_ring.insert(*r, Arc::new(got.envelopes));
                    }
                } else if rp.protected
                    && !approvals_by_ring.contains_key(r)
                    && state.approved.contains(r)
                {
                    approvals_by_ring
                        .insert(*r, Arc::new(self.ring_approvals(&plan, *r).envelopes));
                }
            }

            let mut steps = if halt.is_some() {
                Vec::new()
            } else {
                plan::next_steps(&plan, &state)
            };
            // A dispatch is decided under the pool ledger, against the other
            // waves' hosts out of service as they are now, and recorded
            // there before any host starts. While other waves hold hosts,
            // the ledger is re-read every poll interval.
            let mut ledger_guard = None;
            let wants_start = steps.iter().any(|s| matches!(s, Step::Start(_)));
            let others_hold = state.others_out.values().any(|n| *n > 0);
            if halt.is_none()
                && (wants_start || (others_hold && ledger_read.elapsed() >= self.poll_interval))
            {
                let guard = ledger.lock().await?;
                let others_out = ledger_counts(&guard.others(&self.spec.wave_id));
                ledger_read = Instant::now();
                // next_steps is a pure function of plan and state: decided
                // again only when the other waves' hosts out changed.
                if others_out != state.others_out {
                    state.others_out = others_out;
                    steps = plan::next_steps(&plan, &state);
                }
                ledger_guard = Some(guard);
            }
            let mut done = false;
            let mut starts = Vec::new();
            // Ring and halt changes are written at once; host progress at
            // most every PERSIST_EVERY (each host run keeps its own record).
            let mut urgent = false;
            for step in &steps {
                match step {
                    Step::Start(h) => {
                        state.hosts.insert(h.clone(), HostStatus::InFlight);
                        starts.push(h);
                    }
                    Step::StartSoak(r) => {
                        urgent = true;
                        state.rings.insert(
                            *r,
                            RingStatus::Soaking {
                                since_ms: state.now_ms,
                            },
                        );
                        self.reporter.emit(&Event::ring(*r, "soak"));
                    }
                    Step::Promote(r) if soak_unwatched(&plan, &state, *r, &soak_watched) > 0 => {
                        // Soak time passed, but not every host was seen
                        // through WatchHealth yet: the ring was not watched.
                        let msg = format!(
                            "ring {r} soak time passed; waiting for the first health report of {} host(s)",
                            soak_unwatched(&plan, &state, *r, &soak_watched)
                        );
                        if announced_wait != msg {
                            self.reporter.emit(&Event::wait(&msg));
                            announced_wait = msg;
                        }
                    }
                    Step::Promote(r) => {
                        urgent = true;
                        self.write_evidence(
                            &plan,
                            *r,
                            "completed",
                            None,
                            approvals_by_ring.get(r).map(|a| a.as_slice()),
                        )?;
                        state.rings.insert(*r, RingStatus::Complete);
                        self.store.append_event(&Event::ring(*r, "promoted"))?;
                        self.reporter.emit(&Event::ring(*r, "promoted"));
                    }
                    Step::AwaitApproval(r) => {
                        let msg = format!(
                            "ring {r} waits for {} approvals (ringfence wave approve --wave {} --ring {r})",
                            self.spec.approver_threshold, self.spec.wave_id
                        );
                        if announced_wait != msg {
                            self.reporter.emit(&Event::wait(&msg));
                            announced_wait = msg;
                        }
                    }
                    Step::Wait(why) => {
                        if in_flight.is_empty()
                            && !state
                                .rings
                                .values()
                                .any(|s| matches!(s, RingStatus::Soaking { .. }))
                            && state.window_open
                            && state.others_out.values().all(|n| *n == 0)
                        {
                            // Nothing runs and nothing will change by itself.
                            let report = HaltReport {
                                wave_id: self.spec.wave_id.clone(),
                                ring: current_ring(&plan, &state),
                                host: None,
                                step: "dispatch".into(),
                                kind: "stalled".into(),
                                reason: format!(
                                    "no host can start: {why} (failed hosts hold the pool reserve)"
                                ),
                            };
                            halt = Some(report);
                        } else if announced_wait != *why {
                            let msg = if why.contains("window") {
                                let next =
                                    self.spec.window.as_ref().and_then(|w| {
                                        w.next_open(state.now_ms).map(|t| w.format(t))
                                    });
                                format!(
                                    "{why}; next opening {}",
                                    next.unwrap_or_else(|| "unknown".into())
                                )
                            } else {
                                why.clone()
                            };
                            self.reporter.emit(&Event::wait(&msg));
                            announced_wait = why.clone();
                        }
                    }
                    Step::Halt(why) => {
                        if halt.is_none() {
                            let last = self.last_failure(&state)?;
                            halt = Some(HaltReport {
                                wave_id: self.spec.wave_id.clone(),
                                ring: current_ring(&plan, &state),
                                host: last.as_ref().map(|(h, _)| h.clone()),
                                step: last
                                    .as_ref()
                                    .map(|(_, f)| f.step.clone())
                                    .unwrap_or_else(|| "dispatch".into()),
                                kind: last
                                    .as_ref()
                                    .map(|(_, f)| f.kind.clone())
                                    .unwrap_or_else(|| "operator".into()),
                                reason: last
                                    .map(|(_, f)| format!("{}; {why}", f.reason))
                                    .unwrap_or_else(|| why.clone()),
                            });
                        }
                    }
                    Step::Done => done = true,
                }
            }
            if let Some(mut guard) = ledger_guard.take()
                && !starts.is_empty()
            {
                // Write ahead: the started hosts are in the ledger before
                // the lock is released and before any of them starts.
                let own = own_out(&plan, &state);
                guard.set(&self.spec.wave_id, &own)?;
                ledger_written = own;
            }
            // Soak: one watcher per finished host of each soaking ring
            // (started on StartSoak, on resume, or when a retried host of a
            // soaking ring finishes). A promoted ring's watchers, and all of
            // them once the wave halts, are stopped (and awaited) here,
            // before anything else starts.
            let stop: Vec<u32> = soak_watchers
                .keys()
                .copied()
                .filter(|r| {
                    halt.is_some()
                        || !matches!(state.rings.get(r), Some(RingStatus::Soaking { .. }))
                })
                .collect();
            for r in stop {
                if let Some(mut set) = soak_watchers.remove(&r) {
                    set.shutdown().await;
                }
            }
            soak_started.retain(|h| {
                plan.host_ring
                    .get(h)
                    .is_some_and(|r| soak_watchers.contains_key(r))
            });
            if halt.is_none() {
                self.start_soak_watch(
                    &plan,
                    &state,
                    &mut soak_watchers,
                    &mut soak_started,
                    &soak_tx,
                );
            }
            if !starts.is_empty() {
                // Write ahead once for the whole dispatch round: every
                // started host is InFlight in the store before its run begins.
                self.store.put_meta(META_STATE, &state)?;
                last_persist = Instant::now();
                for h in starts {
                    self.reporter.emit(&Event::host(h, "start", ""));
                    let job = self.job(&plan, h, &approvals_by_ring);
                    in_flight.insert(h.clone(), self.spawn_host(ctx.clone(), job, tx.clone()));
                }
            }
            if let Some(h) = &halt
                && !halt_recorded
            {
                halt_recorded = true;
                urgent = true;
                halt_flag.store(true, Ordering::SeqCst);
                self.store.put_meta(META_HALT, h)?;
                self.reporter.emit(&Event::halting(h, in_flight.len()));
            }
            let finishing = done || (halt.is_some() && in_flight.is_empty());
            if urgent || finishing || last_persist.elapsed() >= PERSIST_EVERY {
                // Hosts back in service leave the ledger; a completed wave
                // leaves it entirely (a failed host it left drained is seen
                // drained by the next wave's probe).
                let own = if done {
                    LedgerEntry::new()
                } else {
                    own_out(&plan, &state)
                };
                if own != ledger_written {
                    ledger.lock().await?.set(&self.spec.wave_id, &own)?;
                    ledger_written = own;
                }
                self.store.put_meta(META_STATE, &state)?;
                self.write_status(
                    &plan,
                    &state,
                    halt.as_ref(),
                    if done { "completed" } else { "" },
                )?;
                last_persist = Instant::now();
            }
            if done {
                self.reporter.emit(&Event::done(&self.spec.wave_id));
                return Ok(Outcome::Completed);
            }
            if let Some(h) = &halt
                && in_flight.is_empty()
            {
                let mut h = h.clone();
                if h.kind == "soak_regression"
                    && let Some(drained) = h.host.as_ref().and_then(|x| redrained.get(x))
                {
                    h.reason.push_str(if *drained {
                        "; the host was drained again by the wave"
                    } else {
                        "; the wave could NOT drain the host again: drain it by hand"
                    });
                }
                let h = &h;
                let ring = h.ring;
                self.write_evidence(
                    &plan,
                    ring,
                    "halted",
                    Some(h.reason.clone()),
                    approvals_by_ring.get(&ring).map(|a| a.as_slice()),
                )?;
                self.write_status(&plan, &state, Some(h), "halted")?;
                return Ok(Outcome::Halted(h.clone()));
            }

            tokio::select! {
                msg = rx.recv() => {
                    if let Some((h, result)) = msg {
                        in_flight.remove(&h);
                        self.host_finished(&mut state, &h, result);
                        // Drain any other finished hosts without waiting.
                        while let Ok((h, result)) = rx.try_recv() {
                            in_flight.remove(&h);
                            self.host_finished(&mut state, &h, result);
                        }
                        // Trip at once: no host run sends another drain or
                        // patch while the sequencer is still catching up.
                        if state.failures > plan.failure_budget {
                            halt_flag.store(true, Ordering::SeqCst);
                        }
                    }
                }
                Some(news) = soak_rx.recv() => {
                    if let Some((h, why)) =
                        self.soak_news(&plan, &mut state, &mut soak_watched, news, &halt_flag)?
                    {
                        let job = self.job(&plan, &h, &approvals_by_ring);
                        let drain = self.spawn_soak_drain(ctx.clone(), job, why, redrain_tx.clone());
                        in_flight.insert(h, drain);
                    }
                }
                Some((h, result)) = redrain_rx.recv() => {
                    in_flight.remove(&h);
                    redrained.insert(h.clone(), matches!(result, Ok(true)));
                    let (what, detail) = match result {
                        Ok(true) => ("drained", "drained again after its soak regression".to_string()),
                        Ok(false) => ("drain_failed", "the wave could not drain it again: drain it by hand".to_string()),
                        Err(e) => ("drain_failed", format!("{e}: drain it by hand")),
                    };
                    self.store.append_event(&Event::host(&h, what, &detail))?;
                    self.reporter.emit(&Event::host(&h, what, &detail));
                }
                () = tokio::time::sleep(self.poll_interval) => {}
            }
        }
    }

    /// Start a watcher for every finished host of a soaking ring that has
    /// none yet.
    fn start_soak_watch(
        &self,
        plan: &Plan,
        state: &WaveState,
        watchers: &mut BTreeMap<u32, JoinSet<()>>,
        started: &mut BTreeSet<String>,
        tx: &mpsc::Sender<SoakNews>,
    ) {
        for (r, rs) in &state.rings {
            if !matches!(rs, RingStatus::Soaking { .. }) {
                continue;
            }
            let Some(rp) = plan.rings.get(r) else {
                continue;
            };
            for h in &rp.hosts {
                if state.hosts.get(h) != Some(&HostStatus::Done) || started.contains(h) {
                    continue;
                }
                started.insert(h.clone());
                let set = watchers.entry(*r).or_default();
                if let Some(host) = self.inventory.host(h) {
                    set.spawn(watch_soak(self.connector.clone(), host.clone(), tx.clone()));
                } else {
                    // Cannot be watched, so it cannot pass the soak.
                    let (tx, id) = (tx.clone(), h.clone());
                    set.spawn(async move {
                        let why = "not in the inventory, cannot be watched".to_string();
                        let _ = tx.send(SoakNews::Regressed(id, why)).await;
                    });
                }
            }
        }
    }

    /// Act on one soak watcher message: a regression fails the host (it
    /// counts against the failure budget and trips the halt at once) and
    /// returns the host and reason, to be drained again.
    fn soak_news(
        &self,
        plan: &Plan,
        state: &mut WaveState,
        watched: &mut BTreeSet<String>,
        news: SoakNews,
        halt_flag: &AtomicBool,
    ) -> Result<Option<(String, String)>, WaveError> {
        let (h, why) = match news {
            SoakNews::Watching(h) => {
                watched.insert(h);
                return Ok(None);
            }
            SoakNews::Regressed(h, why) => (h, why),
        };
        // Late news from a ring already promoted, or a host already failed.
        let ring = plan.host_ring.get(&h).copied().unwrap_or(0);
        if !matches!(state.rings.get(&ring), Some(RingStatus::Soaking { .. }))
            || state.hosts.get(&h) != Some(&HostStatus::Done)
        {
            return Ok(None);
        }
        // The host passed validation and was undrained: the wave drains it
        // again (spawned by the caller), as a halt leaves a failed host.
        state.hosts.insert(h.clone(), HostStatus::Failed);
        state.failures += 1;
        if let Some(mut rec) = self.store.get_host::<HostRecord>(&h)? {
            rec.failure = Some(hostrun::Failure {
                step: "soak".into(),
                kind: "soak_regression".into(),
                reason: why.clone(),
            });
            rec.phase = Phase::Failed;
            self.store.put_host(&h, &rec)?;
        }
        self.reporter.emit(&Event::host(
            &h,
            "failed",
            &format!("soak regression: {why}"),
        ));
        if state.failures > plan.failure_budget {
            halt_flag.store(true, Ordering::SeqCst);
        }
        Ok(Some((h, why)))
    }

    /// Drain again a host that regressed during its ring's soak (see
    /// [`hostrun::drain_after_soak`]); reports whether it is drained.
    fn spawn_soak_drain(
        &self,
        ctx: Ctx,
        job: HostJob,
        why: String,
        tx: mpsc::Sender<(String, Result<bool, String>)>,
    ) -> tokio::task::JoinHandle<()> {
        let connector = self.connector.clone();
        let host = self.inventory.host(&job.host_id).cloned();
        tokio::spawn(async move {
            let id = job.host_id.clone();
            let result = match host {
                None => Err(format!("host `{id}` is not in the inventory")),
                Some(h) => match connector.connect(&h).await {
                    Err(e) => Err(format!("unreachable: {e}")),
                    Ok(api) => hostrun::drain_after_soak(&ctx, &job, api.as_ref(), &why)
                        .await
                        .map(|(_, drained)| drained)
                        .map_err(|e| e.to_string()),
                },
            };
            let _ = tx.send((id, result)).await;
        })
    }

    fn host_finished(&self, state: &mut WaveState, h: &str, result: Result<HostRecord, String>) {
        match result {
            Ok(rec) if rec.phase == Phase::Done => {
                state.hosts.insert(h.to_string(), HostStatus::Done);
                self.reporter.emit(&Event::host(
                    h,
                    "done",
                    &rec.after
                        .as_ref()
                        .map(|a| a.driver_version.clone())
                        .unwrap_or_default(),
                ));
            }
            Ok(rec) if rec.phase == Phase::Failed => {
                state.hosts.insert(h.to_string(), HostStatus::Failed);
                state.failures += 1;
                let why = rec
                    .failure
                    .map(|f| format!("{} {}: {}", f.step, f.kind, f.reason))
                    .unwrap_or_default();
                self.reporter.emit(&Event::host(h, "failed", &why));
            }
            Ok(rec) => {
                // Stopped by the halt between steps: still in flight from
                // the pool's point of view (drained), recorded as failed-safe.
                if matches!(rec.phase, Phase::Pending) {
                    state.hosts.insert(h.to_string(), HostStatus::Pending);
                } else {
                    state.hosts.insert(h.to_string(), HostStatus::InFlight);
                }
                self.reporter
                    .emit(&Event::host(h, "stopped", &format!("{:?}", rec.phase)));
            }
            Err(e) => {
                state.hosts.insert(h.to_string(), HostStatus::Failed);
                state.failures += 1;
                self.reporter.emit(&Event::host(h, "failed", &e));
            }
        }
    }

    fn last_failure(
        &self,
        state: &WaveState,
    ) -> Result<Option<(String, hostrun::Failure)>, StoreError> {
        let mut best: Option<(i64, String, hostrun::Failure)> = None;
        for (h, s) in &state.hosts {
            if *s != HostStatus::Failed {
                continue;
            }
            if let Some(rec) = self.store.get_host::<HostRecord>(h)?
                && let Some(f) = rec.failure
            {
                let at = rec.finished_at_ms;
                if best.as_ref().is_none_or(|(t, _, _)| at < *t) {
                    best = Some((at, h.clone(), f));
                }
            } else if best.is_none() {
                best = Some((
                    i64::MAX,
                    h.clone(),
                    hostrun::Failure {
                        step: "connect".into(),
                        kind: "unreachable".into(),
                        reason: format!("host `{h}` could not be reached"),
                    },
                ));
            }
        }
        Ok(best.map(|(_, h, f)| (h, f)))
    }

    fn job(
        &self,
        plan: &Plan,
        host: &str,
        approvals: &BTreeMap<u32, Arc<approvals::ApprovalSet>>,
    ) -> HostJob {
        let inv = self.inventory.host(host);
        let ring = plan.host_ring.get(host).copied().unwrap_or(0);
        HostJob {
            host_id: host.to_string(),
            ring,
            pool: plan.host_pool.get(host).cloned().unwrap_or_default(),
            key: inv
                .and_then(|h| h.attestation_key)
                .unwrap_or_else(|| ringfence::keys::generate().verifying_key()),
            approvals: approvals.get(&ring).cloned().unwrap_or_default(),
            drill: plan.drill_host.as_deref() == Some(host),
        }
    }

    fn spawn_host(
        &self,
        ctx: Ctx,
        job: HostJob,
        tx: mpsc::Sender<(String, Result<HostRecord, String>)>,
    ) -> tokio::task::JoinHandle<()> {
        let connector = self.connector.clone();
        let host = self.inventory.host(&job.host_id).cloned();
        let reporter = self.reporter.clone();
        tokio::spawn(async move {
            let id = job.host_id.clone();
            let result = match host {
                None => Err(format!("host `{id}` is not in the inventory")),
                Some(h) => match connector.connect(&h).await {
                    Err(e) => {
                        // Record the failure durably, as a pipeline would.
                        let mut rec = ctx
                            .store
                            .get_host::<HostRecord>(&id)
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| HostRecord::new(&id, job.ring, &job.pool));
                        rec.phase = Phase::Failed;
                        rec.failure = Some(hostrun::Failure {
                            step: "connect".into(),
                            kind: "unreachable".into(),
                            reason: e.clone(),
                        });
                        rec.finished_at_ms = ctx.clock.now_ms();
                        let _ = ctx.store.put_host(&id, &rec);
                        Ok(rec)
                    }
                    Ok(api) => {
                        reporter.emit(&Event::host(&id, "connected", ""));
                        hostrun::run(&ctx, &job, api.as_ref())
                            .await
                            .map_err(|e| e.to_string())
                    }
                },
            };
            let _ = tx.send((id, result)).await;
        })
    }

    fn write_evidence(
        &self,
        plan: &Plan,
        ring: u32,
        outcome: &str,
        halt_reason: Option<String>,
        approvals: Option<&[pb::Envelope]>,
    ) -> Result<(), WaveError> {
        let Some(rp) = plan.rings.get(&ring) else {
            return Ok(());
        };
        let mut hosts = Vec::new();
        let mut proof = None;
        let (mut start, mut end) = (i64::MAX, 0);
        for h in &rp.hosts {
            if let Some(rec) = self.store.get_host::<HostRecord>(h)? {
                if rec.started_at_ms > 0 {
                    start = start.min(rec.started_at_ms);
                }
                end = end.max(rec.finished_at_ms);
                if plan.drill_host.as_deref() == Some(h.as_str()) {
                    proof = evidence::rollback_proof(&rec);
                }
                hosts.push(evidence::host_evidence(&rec));
            }
        }
        let packet = evidence::Packet {
            wave_id: self.spec.wave_id.clone(),
            ring,
            outcome: outcome.to_string(),
            halt_reason,
            profile: self.spec.profile.clone(),
            version: self.spec.version.clone(),
            expect_driver_version: self.spec.expect_driver_version.clone(),
            expect_cuda_version: self.spec.expect_cuda_version.clone(),
            hosts,
            approvals: approvals
                .map(|a| a.iter().map(evidence::embed).collect())
                .unwrap_or_default(),
            break_glass: self
                .break_glass
                .iter()
                .map(|(_, e)| evidence::embed(e))
                .collect(),
            rollback_proof: proof,
            started_at_ms: if start == i64::MAX { 0 } else { start },
            finished_at_ms: end,
            soak_s: rp.soak_s,
            coordinator_key_id: self.signer.key_id.clone(),
        };
        let bytes =
            evidence::seal(&packet, &self.signer.key_id, &self.signer.key).map_err(|e| {
                WaveError::Store(StoreError::Db {
                    path: self.store.paths.evidence_dir.clone(),
                    reason: e.to_string(),
                })
            })?;
        let path = self
            .store
            .paths
            .evidence_dir
            .join(format!("ring-{ring}.json"));
        evidence::write(&path, &bytes).map_err(|e| {
            WaveError::Store(StoreError::Db {
                path: path.clone(),
                reason: e.to_string(),
            })
        })?;
        self.reporter.emit(&Event::evidence(ring, &path));
        Ok(())
    }

    fn write_status(
        &self,
        plan: &Plan,
        state: &WaveState,
        halt: Option<&HaltReport>,
        phase: &str,
    ) -> Result<(), WaveError> {
        let ring = plan
            .rings
            .keys()
            .copied()
            .find(|r| state.rings.get(r) != Some(&RingStatus::Complete));
        let mut rings = BTreeMap::new();
        let mut ring_hosts = BTreeMap::new();
        for (r, rp) in &plan.rings {
            let mut counts = BTreeMap::new();
            for h in &rp.hosts {
                let s = state.hosts.get(h).copied().unwrap_or(HostStatus::Pending);
                *counts.entry(format!("{s:?}").to_lowercase()).or_insert(0) += 1;
            }
            let status = match state.rings.get(r) {
                Some(RingStatus::Complete) => "complete".to_string(),
                Some(RingStatus::Soaking { .. }) => "soaking".to_string(),
                _ if Some(*r) == ring => "running".to_string(),
                _ => "waiting".to_string(),
            };
            let approval = if !rp.protected {
                "not needed".to_string()
            } else if state.approved.contains(r) {
                "approved".to_string()
            } else {
                "AWAITING_APPROVAL".to_string()
            };
            rings.insert(
                *r,
                RingView {
                    status,
                    counts,
                    approval,
                },
            );
            ring_hosts.insert(*r, rp.hosts.clone());
        }
        let out = plan::out_of_service(plan, state);
        let pools = plan
            .pools
            .iter()
            .map(|(p, pp)| {
                (
                    p.clone(),
                    (
                        out.get(p).copied().unwrap_or(0)
                            + pp.out_before.len()
                            + state.others_out.get(p).copied().unwrap_or(0),
                        pp.limit_at(state.now_ms),
                    ),
                )
            })
            .collect();
        let mut phase = phase.to_string();
        if phase.is_empty() {
            phase = if halt.is_some() {
                "halting".into()
            } else if !state.window_open {
                "waiting_window".into()
            } else if ring.is_some_and(|r| {
                plan.rings.get(&r).is_some_and(|rp| rp.protected) && !state.approved.contains(&r)
            }) {
                "awaiting_approval".into()
            } else {
                "running".into()
            };
        }
        let mut hosts = BTreeMap::new();
        for h in plan.host_ring.keys() {
            let s = state.hosts.get(h).copied().unwrap_or(HostStatus::Pending);
            hosts.insert(h.clone(), format!("{s:?}").to_lowercase());
        }
        let snapshot = StatusSnapshot {
            wave_id: self.spec.wave_id.clone(),
            phase,
            ring,
            rings,
            pools,
            failures: (state.failures, plan.failure_budget),
            halt: halt.cloned(),
            next_window: if state.window_open {
                None
            } else {
                self.spec
                    .window
                    .as_ref()
                    .and_then(|w| w.next_open(state.now_ms).map(|t| w.format(t)))
            },
            break_glass: self
                .break_glass
                .iter()
                .map(|(g, _)| {
                    format!(
                        "pool {} max_out {} ({}; approvers {}){}",
                        g.pool,
                        g.max_out,
                        g.reason,
                        g.approvers.join(", "),
                        if state.now_ms > g.expires_at_ms {
                            "; EXPIRED: the pool is back to its reserve"
                        } else {
                            ""
                        }
                    )
                })
                .collect(),
            ring_hosts,
            profile: self.spec.profile.clone(),
            version: self.spec.version.clone(),
            rollback_version: self.spec.rollback_version.clone(),
            started_at_ms: self.store.get_meta(META_STARTED)?.unwrap_or(0),
            updated_at_ms: self.clock.now_ms(),
            hosts,
        };
        self.store.write_status(&snapshot)?;
        self.reporter.status(&snapshot);
        Ok(())
    }
}

/// This wave's hosts out of service (in flight, or failed and left
/// drained), per pool: its pool ledger entry.
fn own_out(plan: &Plan, state: &WaveState) -> LedgerEntry {
    let mut out = LedgerEntry::new();
    for (h, s) in &state.hosts {
        if matches!(s, HostStatus::InFlight | HostStatus::Failed)
            && let Some(p) = plan.host_pool.get(h)
        {
            out.entry(p.clone()).or_default().insert(h.clone());
        }
    }
    out
}

/// Other waves' hosts out of service, counted per pool.
fn ledger_counts(others: &BTreeMap<String, BTreeMap<String, String>>) -> BTreeMap<String, usize> {
    others
        .iter()
        .map(|(p, hosts)| (p.clone(), hosts.len()))
        .collect()
}

/// Finished hosts of soaking `ring` no watcher has reported on yet.
fn soak_unwatched(plan: &Plan, state: &WaveState, ring: u32, watched: &BTreeSet<String>) -> usize {
    if !matches!(state.rings.get(&ring), Some(RingStatus::Soaking { .. })) {
        return 0;
    }
    plan.rings.get(&ring).map_or(0, |rp| {
        rp.hosts
            .iter()
            .filter(|h| state.hosts.get(*h) == Some(&HostStatus::Done) && !watched.contains(*h))
            .count()
    })
}

fn current_ring(plan: &Plan, state: &WaveState) -> u32 {
    plan.rings
        .keys()
        .copied()
        .find(|r| state.rings.get(r) != Some(&RingStatus::Complete))
        .unwrap_or(0)
}

/// Mark a wave aborted (no further dispatch, ever) and take it out of the
/// pool ledger.
pub fn abort(store: &WaveStore) -> Result<(), StoreError> {
    store.put_meta(META_ABORTED, &true)?;
    store.append_event(&Event::wait("aborted by operator"))?;
    PoolLedger::new(&store.paths)
        .lock_blocking()?
        .set(&store.paths.wave, &LedgerEntry::new())
}

/// Read the coordinator key.
pub fn load_signer(
    key: &std::path::Path,
    key_id: &str,
) -> Result<Signer, ringfence::keys::KeyError> {
    let key: SigningKey = ringfence::keys::read_signing_key(key)?;
    Ok(Signer {
        key_id: key_id.to_string(),
        key,
    })
}
