//! The [`Driver`]: everything a wave run needs (inventory, spec, trust,
//! coordinator key, store, connections, clock, event sink), how a run ends
//! ([`Outcome`], [`WaveError`]), the wave store's meta keys, what the
//! driver derives for each host run (its [`Params`], a host's [`HostJob`],
//! never without the host's enrolled key, and a ring's approvals), and what
//! it writes besides the store: a ring's evidence and the status snapshot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use ringfence::pb;
use ringfence::time::Clock;
use ringfence::trust::TrustSet;

use super::events::{Event, EventSink};
use super::model::{HostJob, HostRecord, HostRunError, Params, Signer};
use super::outcome::HaltReport;
use super::status;
use crate::approvals::{self, ApprovalSet, BreakGlassGrant, RingScope};
use crate::client::Connector;
use crate::evidence::{self, EvidenceError};
use crate::inventory::{Host, Inventory};
use crate::plan::{self, Plan, WaveState};
use crate::spec::{OnFailure, WaveSpec};
use crate::store::StoreError;

pub(super) const META_SPEC: &str = "spec";
/// Meta key holding the wave spec's source text (re-parsed on resume).
pub const META_SPEC_TEXT: &str = "spec_text";
pub(super) const META_PLAN: &str = "plan";
pub(super) const META_STATE: &str = "state";
pub(super) const META_STARTED: &str = "started_at_ms";
pub(super) const META_ABORTED: &str = "aborted";
pub(super) const META_HALT: &str = "halt";

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every ring complete.
    Completed,
    /// Halted; hosts named in the report are left drained.
    Halted(HaltReport),
}

/// A host cannot be run: it would have no key to verify its attestations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// the host is not in the inventory
    #[error("host `{host}` is not in the inventory {}", inventory.display())]
    NotInInventory {
        /// The host id.
        host: String,
        /// The inventory file.
        inventory: PathBuf,
    },
    /// the host has no enrolled attestation key
    #[error(
        "host `{host}` has no enrolled attestation key in {}; run `ringfence inventory enroll` (its attestations are never checked against any other key)",
        inventory.display()
    )]
    NotEnrolled {
        /// The host id.
        host: String,
        /// The inventory file.
        inventory: PathBuf,
    },
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
    HostRun(#[from] HostRunError),
    /// a ring's evidence could not be sealed or written
    #[error("evidence: {0}")]
    Evidence(#[from] EvidenceError),
    /// a host cannot be run (`wave rollback`)
    #[error(transparent)]
    Job(#[from] JobError),
    /// the wave already has state
    #[error("wave `{0}` already has state; use `ringfence wave resume --wave {0}`")]
    Exists(String),
    /// agents are configured in another ring than the inventory's (or none)
    #[error("{}", crate::inventory::ring_mismatch_message(wave, inventory, hosts))]
    RingMismatch {
        /// The wave id.
        wave: String,
        /// The inventory file.
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
    NeedsDecision {
        /// The wave id.
        wave: String,
        /// The failed hosts, comma-separated.
        hosts: String,
    },
    /// a decision names a host that did not fail
    #[error("--retry/--skip `{0}`: that host has not failed in this wave")]
    BadDecision(String),
    /// the wave was aborted
    #[error("wave `{0}` was aborted")]
    Aborted(String),
    /// a break-glass file is not acceptable
    #[error("break-glass {path}: {reason}")]
    BreakGlass {
        /// The `--break-glass` file.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// `wave rollback` names a host the wave does not cover
    #[error("host `{host}` is not part of wave `{wave}`")]
    NotInWave {
        /// The wave id.
        wave: String,
        /// The host named by `--host`.
        host: String,
    },
    /// `wave rollback` on a host the wave still has in flight
    #[error(
        "host `{host}` is in flight in wave `{wave}` (phase {phase}); resume or abort the wave before rolling it back by hand"
    )]
    HostInFlight {
        /// The wave id.
        wave: String,
        /// The host named by `--host`.
        host: String,
        /// The host's current phase.
        phase: String,
    },
    /// the host to roll back cannot be reached
    #[error("{0}")]
    Unreachable(String),
    /// the pre-flight refused the wave before anything was drained
    #[error(transparent)]
    Preflight(#[from] crate::preflight::Refusal),
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
    pub store: Arc<crate::store::WaveStore>,
    /// Connections.
    pub connector: Arc<dyn Connector>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Where events and status snapshots go (the CLI's reporter).
    pub events: Arc<dyn EventSink>,
    /// Interval of task polls and loop ticks.
    pub poll_interval: Duration,
    /// After a halt, how long the loop waits for hosts in flight to stop;
    /// those still in flight then are recorded `unreachable`, left as they
    /// are (drained) and named in the halt report.
    pub halt_grace: Duration,
    /// During a soak, longest time a host may go without a new health
    /// report (`[timeouts] soak_report_max_age_s`); also how long a broken
    /// stream is reopened and an end-of-soak attestation asked for.
    pub soak_report_max_age: Duration,
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

impl Driver {
    /// The wave-wide parameters of every host run.
    pub(super) fn params(&self) -> Params {
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

    /// The verified approvals of `ring` found in the approvals directory now.
    pub(super) fn ring_approvals(&self, plan: &Plan, ring: u32) -> approvals::RingApprovals {
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

    /// The run of `host`: its ring, pool, enrolled key and ring approvals,
    /// and its inventory entry (where to reach it). A host missing from the
    /// inventory, or without an enrolled key, is an error: its
    /// attestations could not be checked.
    pub(super) fn job(
        &self,
        plan: &Plan,
        host: &str,
        approvals: &BTreeMap<u32, Arc<ApprovalSet>>,
    ) -> Result<(HostJob, Host), JobError> {
        let inventory = self.inventory.path.clone();
        let inv = self
            .inventory
            .host(host)
            .ok_or_else(|| JobError::NotInInventory {
                host: host.to_string(),
                inventory: inventory.clone(),
            })?;
        let key = inv.attestation_key.ok_or_else(|| JobError::NotEnrolled {
            host: host.to_string(),
            inventory,
        })?;
        let ring = plan.host_ring.get(host).copied().unwrap_or(0);
        let job = HostJob {
            host_id: host.to_string(),
            ring,
            pool: plan.host_pool.get(host).cloned().unwrap_or_default(),
            key,
            expected_gpus: inv.expected_gpus,
            approvals: approvals.get(&ring).cloned().unwrap_or_default(),
            drill: plan.drill_host.as_deref() == Some(host),
        };
        Ok((job, inv.clone()))
    }
}

impl Driver {
    /// Seal and write the evidence packet of `ring`, from the wave records
    /// of its hosts.
    pub(super) fn write_evidence(
        &self,
        plan: &Plan,
        approvals: &BTreeMap<u32, Arc<ApprovalSet>>,
        ring: u32,
        (outcome, halt_reason): (&str, Option<&str>),
    ) -> Result<(), WaveError> {
        let Some(rp) = plan.rings.get(&ring) else {
            return Ok(());
        };
        let mut records = Vec::new();
        for h in &rp.hosts {
            records.extend(self.store.get_host::<HostRecord>(h)?);
        }
        let break_glass: Vec<_> = self.break_glass.iter().map(|(_, e)| e.clone()).collect();
        let run = evidence::RingRun {
            spec: &self.spec,
            ring: rp,
            drill_host: plan.drill_host.as_deref(),
            outcome,
            halt_reason,
            approvals: approvals
                .get(&ring)
                .map(|a| a.as_slice())
                .unwrap_or_default(),
            break_glass: &break_glass,
            coordinator_key_id: &self.signer.key_id,
        };
        let packet = evidence::ring_packet(&run, &records);
        let path = evidence::append(
            &self.store.paths.evidence_dir,
            packet,
            (&self.signer.key_id, &self.signer.key),
        )?;
        self.events
            .emit(&Event::evidence(self.clock.as_ref(), ring, &path));
        Ok(())
    }

    /// Write the status snapshot (`phase`: "completed", "halted", or
    /// `None` to derive it) and show it.
    pub(super) fn write_status(
        &self,
        plan: &Plan,
        state: &WaveState,
        halt: Option<&HaltReport>,
        phase: Option<&str>,
    ) -> Result<(), WaveError> {
        let snapshot = status::snapshot(&status::Inputs {
            plan,
            state,
            halt,
            phase,
            spec: &self.spec,
            break_glass: &self.break_glass,
            started_at_ms: self.store.get_meta(META_STARTED)?.unwrap_or(0),
            now_ms: self.clock.now_ms(),
        });
        self.store.write_status(&snapshot)?;
        self.events.status(&snapshot);
        Ok(())
    }
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
