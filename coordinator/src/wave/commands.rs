//! The wave commands, on top of the engine: `run` (probe the fleet, plan,
//! persist, drive), `resume` (apply the operator's decisions, then drive),
//! `rollback` of one host by hand, and `abort`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use ringfence::pb;
use ringfence::time::Clock;

use super::driver::{
    Driver, META_ABORTED, META_HALT, META_PLAN, META_SPEC, META_STARTED, META_STATE, Outcome,
    WaveError,
};
use super::events::Event;
use super::model::{Ctx, HostRecord, Phase};
use super::outcome::{Failure, HaltReport};
use super::rollback::rollback_by_hand;
use crate::plan::{self, HostStatus, Plan, WaveState};
use crate::store::{LedgerEntry, StoreError, WaveStore};

/// What the probe before a new wave found.
#[derive(Debug, Default)]
struct Probe {
    /// Hosts out of service before the wave (host → why).
    out: BTreeMap<String, String>,
    /// `host: finding` for every agent whose own ring blocks the wave, in
    /// inventory order.
    ring_mismatch: Vec<String>,
    /// Hosts whose agent lists its patch profiles without the spec's
    /// (the same rule as `wave plan`'s pre-flight).
    missing_profile: Vec<String>,
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
            let guard = self.store.ledger().lock().await?;
            let Probe {
                mut out,
                ring_mismatch,
                missing_profile,
            } = self.probe().await;
            // Before the first drain: a profile missing on any host refuses
            // the wave (the probe's GetIdentity says which profiles it has).
            if !missing_profile.is_empty() {
                return Err(crate::preflight::Refusal::MissingProfile {
                    wave: self.spec.wave_id.clone(),
                    profile: self.spec.profile.clone(),
                    hosts: missing_profile,
                }
                .into());
            }
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
        self.store.claim_hosts(plan.host_ring.keys())?;
        self.store.put_meta(META_SPEC, &self.spec)?;
        self.store.put_meta(META_PLAN, &plan)?;
        self.store.put_meta(META_STARTED, &self.clock.now_ms())?;
        let state = WaveState::new(&plan);
        self.store.put_meta(META_STATE, &state)?;
        self.store
            .append_event(&Event::started(self.clock.as_ref(), &self.spec.wave_id))?;
        self.events
            .emit(&Event::planned(self.clock.as_ref(), &plan));
        self.drive(plan, state).await
    }

    /// Continue a wave after a crash or a halt, with operator decisions
    /// (the resume begins now: see [`resume_after`](Self::resume_after)).
    pub async fn resume(
        &mut self,
        retry: &[String],
        skip: &[(String, String)],
    ) -> Result<Outcome, WaveError> {
        let seen = self.store.halt_request();
        self.resume_after(retry, skip, seen).await
    }

    /// [`resume`](Self::resume) that began when the wave's halt request
    /// was `seen_halt` ([`WaveStore::halt_request`] then): that request is
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
            state.left_drained.insert(h.clone());
            state.failures = state.failures.saturating_sub(1);
            self.store
                .append_event(&Event::decision(self.clock.as_ref(), h, "retry", ""))?;
        }
        for (h, reason) in skip {
            state.hosts.insert(h.clone(), HostStatus::Skipped);
            state.left_drained.insert(h.clone());
            state.failures = state.failures.saturating_sub(1);
            self.store
                .append_event(&Event::decision(self.clock.as_ref(), h, "skip", reason))?;
        }
        // Only the halt this resume decided over is cleared; one requested
        // since the resume began stands.
        state.halt_requested = self.store.clear_halt(seen_halt.as_deref())?;
        self.refresh_left_drained(&mut state).await;
        self.store
            .put_meta::<Option<HaltReport>>(META_HALT, &None)?;
        self.store.put_meta(META_STATE, &state)?;
        self.events
            .emit(&Event::resumed(self.clock.as_ref(), &wave));
        self.drive(plan, state).await
    }

    /// `ringfence wave rollback`: patch one host of this wave back by hand
    /// (see [`rollback_by_hand`]), record it in the wave store and its
    /// events, and count a host that the wave had finished as failed again
    /// (it is drained and no longer on the wave's version).
    pub async fn rollback_host(
        &mut self,
        host: &str,
    ) -> Result<(HostRecord, Option<Failure>), WaveError> {
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
        let (job, inv_host) = self.job(&plan, host, &approvals_by_ring)?;
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
        self.store.append_event(&Event::host(
            self.clock.as_ref(),
            host,
            "rollback",
            "rollback by hand started",
        ))?;
        let (rec, failure) = rollback_by_hand(&ctx, &job, api.as_ref()).await?;
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
        self.store
            .append_event(&Event::host(self.clock.as_ref(), host, what, &detail))?;
        self.events
            .emit(&Event::host(self.clock.as_ref(), host, what, &detail));
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
    /// Hosts this wave left drained and an operator skipped or retried
    /// count as out of service until seen undrained: ask each (bounded by
    /// the RPC deadline); one that cannot be asked stays counted.
    async fn refresh_left_drained(&self, state: &mut WaveState) {
        let mut back = Vec::new();
        for h in &state.left_drained {
            let Some(host) = self.inventory.host(h) else {
                continue;
            };
            if let Ok(api) = self.connector.connect(host).await
                && let Ok(rep) = api.health().await
                && !rep.draining
            {
                back.push(h.clone());
            }
        }
        for h in back {
            state.left_drained.remove(&h);
        }
    }

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
                        let identity = api.identity().await.ok();
                        let ring = identity
                            .as_ref()
                            .map(|id| (h.ring_finding(id.ring), id.patch_profiles.clone()));
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
            let (rep, ring) = match r {
                Ok(found) => found,
                Err(e) => {
                    // Out of service as far as the reserve goes; its own
                    // pipeline finds it unreachable too.
                    probe
                        .out
                        .insert(id, format!("unreachable at the probe ({e})"));
                    continue;
                }
            };
            if let Some((f, profiles)) = ring {
                if f.blocks_wave() {
                    probe.ring_mismatch.push(format!("{id}: {f}"));
                }
                if crate::preflight::lacks_profile(&profiles, &self.spec.profile) {
                    probe.missing_profile.push(id.clone());
                }
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
}

/// Mark a wave aborted (no further dispatch, ever) and take it out of the
/// pool ledger; `clock` stamps the audit log's event.
pub fn abort(store: &WaveStore, clock: &dyn Clock) -> Result<(), StoreError> {
    store.put_meta(META_ABORTED, &true)?;
    store.append_event(&Event::wait(clock, "aborted by operator"))?;
    store.release_hosts()?;
    store
        .ledger()
        .lock_blocking()?
        .set(&store.paths.wave, &LedgerEntry::new())
}
