//! Soak watching: while a ring soaks, one `WatchHealth` stream per finished
//! host. What the watchers say becomes facts of the wave state that the
//! sequencer reads: a host seen is `watched` (a ring is promoted only when
//! all its hosts were), a host whose end-of-soak attestation passed is
//! `soak_attested` (likewise), and a host that regressed has failed with a
//! soak regression — counted against the failure budget and drained again
//! by the wave.
//!
//! Silence is not health. The agent sends a report every poll interval
//! even when nothing changed (a heartbeat); a host with no new report
//! (another `collected_at_unix_ms` than the last one) for the report-age bound
//! (`[timeouts] soak_report_max_age_s`) regresses: "no health report for
//! N s". A broken stream is reopened (after 0.5 s, then backing off up to
//! 4 s) within that same bound; once reopened, the host must give a fresh
//! signed attestation, verified like Validate's, which covers the time the
//! stream was down. A break is tolerated [`MAX_SOAK_BREAKS`] times per
//! soak; one more is a regression, as is a reopened host whose attestation
//! is UNHEALTHY or does not verify. At the end of the soak every finished
//! host gives a fresh signed attestation (`Step::AttestSoak`); one that is
//! UNHEALTHY, does not verify, or cannot be had within the bound is a
//! regression. Every soak attestation is kept in the host's record, for
//! the ring's evidence.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ringfence::pb;
use ringfence::time::Clock;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::events::{Event, EventSink};
use super::model::{Ctx, HostJob, HostRecord, Phase, SoakAttestPurpose, SoakAttestation};
use super::outcome::{Failure, FailureKind, Stage};
use super::validate::{SoakAttestError, effective_verdict, soak_attestation};
use crate::client::{Connector, HealthStream, HostApi};
use crate::inventory::Host;
use crate::plan::{HostStatus, Plan, RingStatus, WaveState};
use crate::store::{StoreError, WaveStore};

/// First wait before reopening a broken health stream (or asking again
/// for an attestation); doubled on each failure up to [`SOAK_RETRY_MAX`].
const SOAK_REOPEN_AFTER: Duration = Duration::from_millis(500);
/// Longest wait between two tries.
const SOAK_RETRY_MAX: Duration = Duration::from_secs(4);
/// Breaks of a host's health stream tolerated during one soak (each
/// reopened within the report-age bound, with a healthy fresh
/// attestation); one more fails the host.
pub const MAX_SOAK_BREAKS: u32 = 3;

/// What a soak watcher tells the wave loop about its host.
#[derive(Debug)]
pub(super) enum SoakNews {
    /// The first report arrived: the host is being watched.
    Watching(String),
    /// The health stream broke: why (it is being reopened).
    Broke(String, String),
    /// A soak attestation passed (after a reopen, or at the end of the soak).
    Attested(String, Box<SoakAttestation>),
    /// The host regressed: why, and the attestation that showed it, if any.
    Regressed(String, String, Option<Box<SoakAttestation>>),
}

/// What every soak task shares: the host runs' context (parameters, clock,
/// store), the connections, and the report-age bound.
#[derive(Clone)]
pub(super) struct SoakCtx {
    /// The host runs' context.
    pub ctx: Ctx,
    /// Connections to the agents.
    pub connector: Arc<dyn Connector>,
    /// Longest time without a new health report (`soak_report_max_age_s`).
    pub max_age: Duration,
}

/// One host to watch or attest: its job (enrolled key) and where it is.
pub(super) type SoakHost = (HostJob, Host);

/// The attestation of the host's validation: new faults are judged against it.
fn baseline(ctx: &Ctx, host: &str) -> Option<super::model::AttestationRecord> {
    ctx.store
        .get_host::<HostRecord>(host)
        .ok()
        .flatten()
        .and_then(|r| r.after)
}

async fn open(sc: &SoakCtx, host: &Host) -> Result<(Arc<dyn HostApi>, HealthStream), String> {
    let api = sc.connector.connect(host).await?;
    let stream = api.watch_health().await.map_err(|e| e.to_string())?;
    Ok((api, stream))
}

/// Sleep `backoff` (but not past `deadline`) and double it.
async fn back_off(backoff: &mut Duration, deadline: Instant) {
    tokio::time::sleep_until((Instant::now() + *backoff).min(deadline)).await;
    *backoff = (*backoff * 2).min(SOAK_RETRY_MAX);
}

/// Why a host failed the report-age bound.
fn silent(since: Instant, err: Option<&str>) -> String {
    let mut why = format!("no health report for {} s", since.elapsed().as_secs());
    if let Some(e) = err {
        why.push_str(&format!("; unreachable during soak: {e}"));
    }
    why
}

/// Watch one host of a soaking ring until it regresses (or the task is
/// aborted when the ring is promoted or the wave ends).
async fn watch(sc: SoakCtx, (job, host): SoakHost, tx: mpsc::Sender<SoakNews>) {
    let id = host.id.clone();
    let regress = |why: String, att: Option<Box<SoakAttestation>>| {
        let tx = tx.clone();
        let id = id.clone();
        // The loop has ended if it does not listen.
        async move {
            let _ = tx.send(SoakNews::Regressed(id, why, att)).await;
        }
    };
    let baseline = baseline(&sc.ctx, &id);
    let mut last_new = Instant::now();
    let mut last_collected = i64::MIN;
    let mut breaks = 0u32;
    let mut reported = false;
    let mut backoff = SOAK_REOPEN_AFTER;
    // Why the last open or stream failed, until a reopen is attested.
    let mut last_err: Option<String> = None;
    loop {
        let deadline = last_new + sc.max_age;
        let (api, mut stream) = match tokio::time::timeout_at(deadline, open(&sc, &host)).await {
            Err(_) => return regress(silent(last_new, last_err.as_deref()), None).await,
            Ok(Err(e)) => {
                last_err = Some(e);
                back_off(&mut backoff, deadline).await;
                continue;
            }
            Ok(Ok(opened)) => opened,
        };
        if last_err.is_some() {
            // Reopened: a fresh signed attestation covers the gap.
            let purpose = SoakAttestPurpose::Reconnect;
            let asked = soak_attestation(&sc.ctx, &job, api.as_ref(), baseline.as_ref(), purpose);
            match tokio::time::timeout_at(deadline, asked).await {
                Err(_) => return regress(silent(last_new, last_err.as_deref()), None).await,
                Ok(Err(SoakAttestError::Unreachable(e))) => {
                    last_err = Some(e);
                    back_off(&mut backoff, deadline).await;
                    continue;
                }
                Ok(Err(SoakAttestError::Failed(why, att))) => {
                    let why = format!("after its health stream was reopened: {why}");
                    return regress(why, att).await;
                }
                Ok(Ok(att)) => {
                    let _ = tx.send(SoakNews::Attested(id.clone(), Box::new(att))).await;
                }
            }
        }
        let broke = loop {
            match tokio::time::timeout_at(last_new + sc.max_age, stream.next()).await {
                Err(_) => return regress(silent(last_new, None), None).await,
                Ok(Some(Ok(r))) => {
                    if effective_verdict(r.verdict, &r) == pb::Verdict::Unhealthy as i32 {
                        let codes = r
                            .reasons
                            .iter()
                            .filter(|x| x.severity == pb::Verdict::Unhealthy as i32)
                            .map(|x| crate::hosttext::field(&x.code))
                            .collect::<Vec<_>>()
                            .join(", ");
                        return regress(format!("UNHEALTHY during soak ({codes})"), None).await;
                    }
                    // Only a report of another collection than the last
                    // one is news: the same report sent again (a reopened
                    // stream's first, or a stuck agent's) is not a
                    // heartbeat. Not "later": an agent's clock may step back.
                    if r.collected_at_unix_ms != last_collected {
                        last_collected = r.collected_at_unix_ms;
                        last_new = Instant::now();
                        backoff = SOAK_REOPEN_AFTER;
                    }
                    if !reported {
                        reported = true;
                        let _ = tx.send(SoakNews::Watching(id.clone())).await;
                    }
                }
                Ok(Some(Err(e))) => break e.to_string(),
                Ok(None) => break "the health stream ended".to_string(),
            }
        };
        breaks += 1;
        if breaks > MAX_SOAK_BREAKS {
            let why = format!(
                "unreachable during soak: the health stream broke {breaks} times (at most {MAX_SOAK_BREAKS} tolerated; last: {broke})"
            );
            return regress(why, None).await;
        }
        let note = format!(
            "health stream broke ({broke}); reopening ({breaks} of {MAX_SOAK_BREAKS} breaks tolerated)"
        );
        let _ = tx.send(SoakNews::Broke(id.clone(), note)).await;
        last_err = Some(broke);
        back_off(&mut backoff, last_new + sc.max_age).await;
    }
}

/// The end-of-soak attestation of one host: asked again while the host
/// does not answer, for at most the report-age bound.
async fn attest_end(sc: SoakCtx, (job, host): SoakHost, tx: mpsc::Sender<SoakNews>) {
    let id = host.id.clone();
    let baseline = baseline(&sc.ctx, &id);
    let deadline = Instant::now() + sc.max_age;
    let mut backoff = SOAK_REOPEN_AFTER;
    let mut last_err = String::from("no answer");
    let news = loop {
        let tried = tokio::time::timeout_at(deadline, async {
            let api = sc
                .connector
                .connect(&host)
                .await
                .map_err(SoakAttestError::Unreachable)?;
            let purpose = SoakAttestPurpose::EndOfSoak;
            soak_attestation(&sc.ctx, &job, api.as_ref(), baseline.as_ref(), purpose).await
        })
        .await;
        match tried {
            Ok(Ok(att)) => break SoakNews::Attested(id, Box::new(att)),
            Ok(Err(SoakAttestError::Failed(why, att))) => {
                break SoakNews::Regressed(id, format!("end-of-soak attestation: {why}"), att);
            }
            Ok(Err(SoakAttestError::Unreachable(e))) => last_err = e,
            Err(_) => {}
        }
        if Instant::now() + backoff >= deadline {
            let why = format!(
                "end-of-soak attestation: unreachable for {} s: {last_err}",
                sc.max_age.as_secs()
            );
            break SoakNews::Regressed(id, why, None);
        }
        back_off(&mut backoff, deadline).await;
    };
    let _ = tx.send(news).await;
}

/// The soak watchers of a wave, by ring. Dropping it aborts them all, so
/// none outlives its ring's soak or the wave loop (any return path).
pub(super) struct SoakWatch {
    sc: SoakCtx,
    watchers: BTreeMap<u32, JoinSet<()>>,
    /// Hosts with a watcher.
    started: BTreeSet<String>,
    /// Hosts whose end-of-soak attestation was asked for.
    attesting: BTreeSet<String>,
    tx: mpsc::Sender<SoakNews>,
    /// What the watchers say.
    pub(super) news: mpsc::Receiver<SoakNews>,
}

impl SoakWatch {
    /// No watchers yet.
    pub(super) fn new(sc: SoakCtx) -> Self {
        let (tx, news) = mpsc::channel(1024);
        Self {
            sc,
            watchers: BTreeMap::new(),
            started: BTreeSet::new(),
            attesting: BTreeSet::new(),
            tx,
            news,
        }
    }

    /// Stop (and await) the watchers of rings no longer soaking, and all of
    /// them once the wave halts, before anything else starts.
    pub(super) async fn stop_unneeded(&mut self, plan: &Plan, state: &WaveState, halting: bool) {
        let stop: Vec<u32> = self
            .watchers
            .keys()
            .copied()
            .filter(|r| halting || !matches!(state.rings.get(r), Some(RingStatus::Soaking { .. })))
            .collect();
        for r in stop {
            if let Some(mut set) = self.watchers.remove(&r) {
                set.shutdown().await;
            }
        }
        let watchers = &self.watchers;
        let live = |h: &String| {
            plan.host_ring
                .get(h)
                .is_some_and(|r| watchers.contains_key(r))
        };
        self.started.retain(live);
        self.attesting.retain(live);
    }

    /// Spawn `task` for every finished host of `ring` not in `seen`; a host
    /// that cannot be run (`job` fails) regresses at once.
    fn spawn_for<F, Fut>(
        &mut self,
        (plan, state, ring): (&Plan, &WaveState, u32),
        job: &dyn Fn(&str) -> Result<SoakHost, String>,
        attest: bool,
        task: F,
    ) -> usize
    where
        F: Fn(SoakCtx, SoakHost, mpsc::Sender<SoakNews>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let Some(rp) = plan.rings.get(&ring) else {
            return 0;
        };
        let mut n = 0;
        for h in &rp.hosts {
            let seen = if attest {
                &mut self.attesting
            } else {
                &mut self.started
            };
            if state.hosts.get(h) != Some(&HostStatus::Done)
                || seen.contains(h)
                || (attest && state.soak_attested.contains(h))
            {
                continue;
            }
            seen.insert(h.clone());
            n += 1;
            let set = self.watchers.entry(ring).or_default();
            let tx = self.tx.clone();
            match job(h) {
                Ok(sh) => {
                    set.spawn(task(self.sc.clone(), sh, tx));
                }
                Err(e) => {
                    // Cannot be watched or attested, so it cannot pass the soak.
                    let id = h.clone();
                    set.spawn(async move {
                        let why = format!("cannot be watched: {e}");
                        let _ = tx.send(SoakNews::Regressed(id, why, None)).await;
                    });
                }
            }
        }
        n
    }

    /// Start a watcher for every finished host of a soaking ring that has
    /// none yet (on StartSoak, on resume, or when a retried host of a
    /// soaking ring finishes).
    pub(super) fn start(
        &mut self,
        plan: &Plan,
        state: &WaveState,
        job: &dyn Fn(&str) -> Result<SoakHost, String>,
    ) {
        let soaking: Vec<u32> = state
            .rings
            .iter()
            .filter(|(_, rs)| matches!(rs, RingStatus::Soaking { .. }))
            .map(|(r, _)| *r)
            .collect();
        for r in soaking {
            self.spawn_for((plan, state, r), job, false, watch);
        }
    }

    /// Ask every finished host of `ring` that has not attested at the end
    /// of its soak (and is not being asked) for a fresh attestation.
    /// Returns how many were asked now.
    pub(super) fn attest_end(
        &mut self,
        plan: &Plan,
        state: &WaveState,
        ring: u32,
        job: &dyn Fn(&str) -> Result<SoakHost, String>,
    ) -> usize {
        self.spawn_for((plan, state, ring), job, true, attest_end)
    }
}

/// Whether news about `h` still counts: its ring soaks and it is finished
/// (not late news from a promoted ring, or about a host already failed).
fn counts(plan: &Plan, state: &WaveState, h: &str) -> bool {
    let ring = plan.host_ring.get(h).copied().unwrap_or(0);
    matches!(state.rings.get(&ring), Some(RingStatus::Soaking { .. }))
        && state.hosts.get(h) == Some(&HostStatus::Done)
}

/// Make one watcher message a fact of the wave state: a first report marks
/// the host watched; a passed end-of-soak attestation marks it
/// soak-attested (every soak attestation is kept in its record); a
/// regression of a finished host of a soaking ring fails it (counted
/// against the budget, its record's failure stored) and marks it
/// redraining. Returns the host to drain again, and why.
pub(super) fn record(
    news: SoakNews,
    plan: &Plan,
    state: &mut WaveState,
    store: &WaveStore,
    events: &dyn EventSink,
    clock: &dyn Clock,
) -> Result<Option<(String, String)>, StoreError> {
    let (h, why, att) = match news {
        SoakNews::Watching(h) => {
            state.watched.insert(h);
            return Ok(None);
        }
        SoakNews::Broke(h, why) => {
            let ev = Event::host(clock, &h, "soak_stream_broke", &why);
            store.append_event(&ev)?;
            events.emit(&ev);
            return Ok(None);
        }
        SoakNews::Attested(h, att) => {
            if !counts(plan, state, &h) {
                return Ok(None);
            }
            let end = att.purpose == SoakAttestPurpose::EndOfSoak;
            let detail = format!(
                "{} attestation {}",
                if end { "end-of-soak" } else { "reconnect" },
                att.attestation.verdict
            );
            if let Some(mut rec) = store.get_host::<HostRecord>(&h)? {
                rec.soak.push(*att);
                store.put_host(&h, &rec)?;
            }
            if end {
                state.soak_attested.insert(h.clone());
            }
            events.emit(&Event::host(clock, &h, "soak_attested", &detail));
            return Ok(None);
        }
        SoakNews::Regressed(h, why, att) => (h, why, att),
    };
    if !counts(plan, state, &h) {
        return Ok(None);
    }
    // The host passed validation and was undrained: the wave drains it
    // again, as a halt leaves a failed host.
    state.hosts.insert(h.clone(), HostStatus::Failed);
    state.failures += 1;
    state.redraining.insert(h.clone());
    state.soak_attested.remove(&h);
    if let Some(mut rec) = store.get_host::<HostRecord>(&h)? {
        rec.soak.extend(att.map(|a| *a));
        rec.failure = Some(Failure::new(
            Stage::Soak,
            FailureKind::SoakRegression,
            why.clone(),
        ));
        rec.phase = Phase::Failed;
        store.put_host(&h, &rec)?;
    }
    events.emit(&Event::host(
        clock,
        &h,
        "failed",
        &format!("soak regression: {why}"),
    ));
    Ok(Some((h, why)))
}
