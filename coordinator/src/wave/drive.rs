//! The drive loop of `wave run` / `wave resume`, on top of the engine. Each
//! round it records what it observed as facts of the [`WaveState`] (time,
//! window, halt request, approvals, soak news, finished hosts), asks the
//! pure sequencer ([`plan::next_steps`]) what to do, and carries that out:
//! start host runs ([`super::host::run`], one task per host), start and end soaks,
//! promote rings (writing their evidence), halt. Everything is persisted to
//! the wave store before it is acted on; dispatch is decided under the pool
//! ledger shared with other waves.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::driver::{Driver, META_HALT, META_STATE, Outcome, WaveError};
use super::events::Event;
use super::model::{Ctx, HostRecord, HostRunError, Phase};
use super::outcome::{Failure, FailureKind, HaltReport, Stage};
use super::runs::{Report, Runs, Start};
use super::soak::{self, SoakCtx, SoakNews, SoakWatch};
use crate::approvals::ApprovalSet;
use crate::plan::{self, HaltCause, HostStatus, Plan, RingStatus, Step, WaveState};
use crate::store::{LedgerEntry, LedgerGuard, PoolLedger, StoreError};

/// Longest gap between writes of the wave state and status snapshot while
/// hosts progress (ring, halt and dispatch changes are written at once).
const PERSIST_EVERY: Duration = Duration::from_millis(250);

/// What woke the loop.
enum Woke {
    Report(Report),
    Soak(SoakNews),
    Tick,
}

/// What one round of steps asks for besides the state changes.
#[derive(Default)]
struct Round {
    /// Hosts to start, in order.
    starts: Vec<String>,
    /// Rings whose soak passed: ask their hosts for end-of-soak attestations.
    attest: Vec<u32>,
    /// Every ring is complete.
    done: bool,
    /// Ring or halt changes: persist now.
    urgent: bool,
}

/// This wave's entry in the pool ledger.
struct Ledger {
    ledger: PoolLedger,
    /// This wave's hosts out of service as last recorded.
    written: LedgerEntry,
    /// When the other waves' entries were last read.
    read_at: Instant,
}

/// The drive loop's state.
struct Drive<'d> {
    d: &'d Driver,
    plan: Plan,
    state: WaveState,
    /// Set when the wave halts: no host run sends another drain or patch.
    halt_flag: Arc<AtomicBool>,
    /// Host runs and soak drains not ended yet.
    runs: Runs,
    soak: SoakWatch,
    /// Soak regressions drained again (true) or not.
    redrained: BTreeMap<String, bool>,
    approvals: BTreeMap<u32, Arc<ApprovalSet>>,
    halt: Option<HaltReport>,
    halt_recorded: bool,
    /// A host task's store failure: nothing new starts, the loop ends with
    /// it once the hosts in flight have stopped.
    store_failure: Option<HostRunError>,
    ledger: Ledger,
    last_persist: Instant,
    announced_wait: String,
    /// When the halt was recorded: hosts still in flight a grace period
    /// later are abandoned.
    halt_since: Option<Instant>,
    /// Hosts abandoned after the halt's grace period.
    abandoned: Vec<String>,
}

impl Driver {
    /// Drive the wave from `state` to its end (completed or halted).
    pub(super) async fn drive(&self, plan: Plan, state: WaveState) -> Result<Outcome, WaveError> {
        Drive::start(self, plan, state).await?.run().await
    }
}

/// This wave's hosts out of service (in flight, failed and left drained,
/// or skipped or retried while still drained), per pool: its pool ledger entry.
fn own_out(plan: &Plan, state: &WaveState) -> LedgerEntry {
    let mut out = LedgerEntry::new();
    for (h, s) in &state.hosts {
        if plan::is_out(state, h, *s)
            && let Some(p) = plan.host_pool.get(h)
        {
            out.entry(p.clone()).or_default().insert(h.clone());
        }
    }
    out
}

/// Other waves' hosts out of service, counted per pool.
fn ledger_counts(guard: &LedgerGuard, wave: &str) -> BTreeMap<String, usize> {
    guard
        .others(wave)
        .iter()
        .map(|(p, hosts)| (p.clone(), hosts.len()))
        .collect()
}

fn current_ring(plan: &Plan, state: &WaveState) -> u32 {
    plan.rings
        .keys()
        .copied()
        .find(|r| state.rings.get(r) != Some(&RingStatus::Complete))
        .unwrap_or(0)
}

impl<'d> Drive<'d> {
    async fn start(d: &'d Driver, plan: Plan, mut state: WaveState) -> Result<Self, WaveError> {
        let halt_flag = Arc::new(AtomicBool::new(false));
        let ctx = Ctx {
            params: Arc::new(d.params()),
            signer: Arc::new(d.signer.clone()),
            store: d.store.clone(),
            clock: d.clock.clone(),
            halt: halt_flag.clone(),
        };
        let ledger = d.store.ledger();
        let written = {
            let mut guard = ledger.lock().await?;
            state.others_out = ledger_counts(&guard, &d.spec.wave_id);
            let own = own_out(&plan, &state);
            guard.set(&d.spec.wave_id, &own)?;
            own
        };
        let soak = SoakWatch::new(SoakCtx {
            ctx: ctx.clone(),
            connector: d.connector.clone(),
            max_age: d.soak_report_max_age,
        });
        let mut drive = Self {
            d,
            plan,
            state,
            halt_flag,
            runs: Runs::new(ctx, d.connector.clone(), d.events.clone()),
            soak,
            redrained: BTreeMap::new(),
            approvals: BTreeMap::new(),
            halt: None,
            halt_recorded: false,
            store_failure: None,
            ledger: Ledger {
                ledger,
                written,
                read_at: Instant::now(),
            },
            last_persist: Instant::now(),
            announced_wait: String::new(),
            halt_since: None,
            abandoned: Vec::new(),
        };
        drive.reattach();
        Ok(drive)
    }

    /// Re-attach to hosts that were in flight when a coordinator died.
    fn reattach(&mut self) {
        let resuming: Vec<String> = self
            .state
            .hosts
            .iter()
            .filter(|(_, s)| **s == HostStatus::InFlight)
            .map(|(h, _)| h.clone())
            .collect();
        for h in resuming {
            let ring = self.plan.host_ring.get(&h).copied().unwrap_or(0);
            if self.plan.rings.get(&ring).is_some_and(|r| r.protected) {
                let got = self.d.ring_approvals(&self.plan, ring);
                self.approvals.insert(ring, Arc::new(got.envelopes));
            }
            self.d
                .events
                .emit(&Event::host(self.d.clock.as_ref(), &h, "reattach", ""));
            self.spawn_host(&h);
        }
    }

    async fn run(mut self) -> Result<Outcome, WaveError> {
        loop {
            self.observe()?;
            let (steps, guard) = self.decide().await?;
            let mut round = self.carry_out(&steps)?;
            if let Some(mut guard) = guard
                && !round.starts.is_empty()
            {
                // Write ahead: the started hosts are in the ledger before
                // the lock is released and before any of them starts.
                let own = own_out(&self.plan, &self.state);
                guard.set(&self.d.spec.wave_id, &own)?;
                self.ledger.written = own;
            }
            // A promoted ring's watchers, and all of them once the wave
            // halts, are stopped (and awaited) before anything else starts.
            let halting = self.halt.is_some();
            self.soak
                .stop_unneeded(&self.plan, &self.state, halting)
                .await;
            if !halting {
                let (d, plan, state, approvals) =
                    (self.d, &self.plan, &self.state, &self.approvals);
                let job = |h: &str| d.job(plan, h, approvals).map_err(|e| e.to_string());
                self.soak.start(plan, state, &job);
                for r in &round.attest {
                    if self.soak.attest_end(plan, state, *r, &job) > 0 {
                        d.events
                            .emit(&Event::ring(d.clock.as_ref(), *r, "soak_attest"));
                    }
                }
            }
            self.dispatch(&round.starts)?;
            round.urgent |= self.record_halt()?;
            self.persist(&round).await?;
            if round.done {
                self.d
                    .events
                    .emit(&Event::done(self.d.clock.as_ref(), &self.d.spec.wave_id));
                return Ok(Outcome::Completed);
            }
            if self.runs.is_empty() {
                if let Some(e) = self.store_failure.take() {
                    return Err(e.into());
                }
                if let Some(h) = self.halt.clone() {
                    return self.halted(h);
                }
            }
            if self
                .halt_since
                .is_some_and(|t| t.elapsed() >= self.d.halt_grace)
            {
                self.abandon().await;
                continue;
            }
            self.wait().await?;
        }
    }

    /// Record what changed by itself: time, window, halt request, soak
    /// news, approvals that arrived as files.
    fn observe(&mut self) -> Result<(), WaveError> {
        let d = self.d;
        self.state.now_ms = d.clock.now_ms();
        self.state.window_open = d
            .spec
            .window
            .as_ref()
            .is_none_or(|w| w.is_open(self.state.now_ms));
        if d.store.halt_requested() {
            self.state.halt_requested = true;
        }
        // Soak news that arrived since the last round counts before the
        // sequencer may promote the ring.
        while let Ok(news) = self.soak.news.try_recv() {
            self.soak_news(news)?;
        }
        for (r, rp) in &self.plan.rings {
            if !rp.protected {
                continue;
            }
            if !self.state.approved.contains(r)
                && self.state.rings.get(r) != Some(&RingStatus::Complete)
            {
                let got = d.ring_approvals(&self.plan, *r);
                if got.approvers.len() >= d.spec.approver_threshold {
                    self.state.approved.insert(*r);
                    let approvers: Vec<String> = got.approvers.iter().cloned().collect();
                    d.events
                        .emit(&Event::approved(d.clock.as_ref(), *r, &approvers));
                    d.store
                        .append_event(&Event::approved(d.clock.as_ref(), *r, &approvers))?;
                    self.approvals.insert(*r, Arc::new(got.envelopes));
                }
            } else if !self.approvals.contains_key(r) && self.state.approved.contains(r) {
                let got = d.ring_approvals(&self.plan, *r);
                self.approvals.insert(*r, Arc::new(got.envelopes));
            }
        }
        Ok(())
    }

    /// What the sequencer says now. A dispatch is decided under the pool
    /// ledger, against the other waves' hosts out of service as they are
    /// now, and recorded there before any host starts (the guard returned).
    /// While other waves hold hosts, the ledger is re-read every poll
    /// interval.
    async fn decide(&mut self) -> Result<(Vec<Step>, Option<LedgerGuard>), WaveError> {
        if self.halt.is_some() || self.store_failure.is_some() {
            return Ok((Vec::new(), None));
        }
        let mut steps = plan::next_steps(&self.plan, &self.state);
        let wants_start = steps.iter().any(|s| matches!(s, Step::Start(_)));
        let others_hold = self.state.others_out.values().any(|n| *n > 0);
        if !(wants_start || (others_hold && self.ledger.read_at.elapsed() >= self.d.poll_interval))
        {
            return Ok((steps, None));
        }
        let guard = self.ledger.ledger.lock().await?;
        let others_out = ledger_counts(&guard, &self.d.spec.wave_id);
        self.ledger.read_at = Instant::now();
        // next_steps is a pure function of plan and state: decided again
        // only when the other waves' hosts out changed.
        if others_out != self.state.others_out {
            self.state.others_out = others_out;
            steps = plan::next_steps(&self.plan, &self.state);
        }
        Ok((steps, Some(guard)))
    }

    /// Carry out the sequencer's steps on the state.
    fn carry_out(&mut self, steps: &[Step]) -> Result<Round, WaveError> {
        let d = self.d;
        let mut round = Round::default();
        for step in steps {
            match step {
                Step::Start(h) => {
                    self.state.hosts.insert(h.clone(), HostStatus::InFlight);
                    round.starts.push(h.clone());
                }
                Step::StartSoak(r) => {
                    round.urgent = true;
                    let since_ms = self.state.now_ms;
                    self.state
                        .rings
                        .insert(*r, RingStatus::Soaking { since_ms });
                    d.events.emit(&Event::ring(d.clock.as_ref(), *r, "soak"));
                }
                Step::AttestSoak(r) => round.attest.push(*r),
                Step::Promote(r) => {
                    round.urgent = true;
                    let approvals = &self.approvals;
                    d.write_evidence(&self.plan, approvals, *r, ("completed", None))?;
                    self.state.rings.insert(*r, RingStatus::Complete);
                    d.store
                        .append_event(&Event::ring(d.clock.as_ref(), *r, "promoted"))?;
                    d.events
                        .emit(&Event::ring(d.clock.as_ref(), *r, "promoted"));
                }
                Step::AwaitApproval(r) => {
                    let msg = format!(
                        "ring {r} waits for {} approvals (ringfence wave approve --wave {} --ring {r})",
                        d.spec.approver_threshold, d.spec.wave_id
                    );
                    self.announce(&msg.clone(), msg);
                }
                Step::WindowClosed => {
                    let why = "maintenance window closed";
                    let next = d
                        .spec
                        .window
                        .as_ref()
                        .and_then(|w| w.next_open(self.state.now_ms).map(|t| w.format(t)));
                    let next = next.unwrap_or_else(|| "unknown".into());
                    self.announce(why, format!("{why}; next opening {next}"));
                }
                Step::Wait(why) => self.announce(why, why.clone()),
                Step::Halt(cause) => {
                    if self.halt.is_none() {
                        self.halt = Some(self.halt_report(cause)?);
                    }
                }
                Step::Done => round.done = true,
            }
        }
        Ok(round)
    }

    /// Tell the operator what the wave waits for, once per reason `key`.
    fn announce(&mut self, key: &str, msg: String) {
        if self.announced_wait != key {
            self.d
                .events
                .emit(&Event::wait(self.d.clock.as_ref(), &msg));
            self.announced_wait = key.to_string();
        }
    }

    /// The halt report of the sequencer's halt: a stall names no host; any
    /// other halt names the earliest failed host, if there is one.
    fn halt_report(&self, cause: &HaltCause) -> Result<HaltReport, StoreError> {
        let (wave_id, ring) = (
            self.d.spec.wave_id.clone(),
            current_ring(&self.plan, &self.state),
        );
        if let HaltCause::Stalled(reason) = cause {
            return Ok(HaltReport {
                wave_id,
                ring,
                host: None,
                step: Stage::Dispatch,
                kind: FailureKind::Stalled,
                reason: reason.clone(),
            });
        }
        let why = cause.to_string();
        Ok(match self.first_failure()? {
            Some((host, f)) => HaltReport {
                wave_id,
                ring,
                host: Some(host),
                step: f.step,
                kind: f.kind,
                reason: format!("{}; {why}", f.reason),
            },
            None => HaltReport {
                wave_id,
                ring,
                host: None,
                step: Stage::Dispatch,
                kind: FailureKind::Operator,
                reason: why,
            },
        })
    }

    /// The failed host that finished first, and its failure.
    fn first_failure(&self) -> Result<Option<(String, Failure)>, StoreError> {
        let mut best: Option<(i64, String, Failure)> = None;
        for (h, s) in &self.state.hosts {
            if *s != HostStatus::Failed {
                continue;
            }
            if let Some(rec) = self.d.store.get_host::<HostRecord>(h)?
                && let Some(f) = rec.failure
            {
                let at = rec.finished_at_ms;
                if best.as_ref().is_none_or(|(t, _, _)| at < *t) {
                    best = Some((at, h.clone(), f));
                }
            } else if best.is_none() {
                let reason = format!("host `{h}` could not be reached");
                let f = Failure::new(Stage::Connect, FailureKind::Unreachable, reason);
                best = Some((i64::MAX, h.clone(), f));
            }
        }
        Ok(best.map(|(_, h, f)| (h, f)))
    }

    /// Start the round's hosts; every started host is InFlight in the
    /// store before its run begins (one write ahead for the round).
    fn dispatch(&mut self, starts: &[String]) -> Result<(), WaveError> {
        if starts.is_empty() {
            return Ok(());
        }
        self.d.store.put_meta(META_STATE, &self.state)?;
        self.last_persist = Instant::now();
        for h in starts {
            self.d
                .events
                .emit(&Event::host(self.d.clock.as_ref(), h, "start", ""));
            self.spawn_host(h);
        }
        Ok(())
    }

    /// The run of `h`, where it stands (or why it cannot start).
    fn start_of(&self, h: &str) -> Start {
        self.d.job(&self.plan, h, &self.approvals)
    }

    fn spawn_host(&mut self, h: &str) {
        let at = (
            h.to_string(),
            self.plan.host_ring.get(h).copied().unwrap_or(0),
            self.plan.host_pool.get(h).cloned().unwrap_or_default(),
        );
        let start = self.start_of(h);
        self.runs.host(at, start);
    }

    /// Record the halt once: no host run sends another drain or patch.
    fn record_halt(&mut self) -> Result<bool, WaveError> {
        let Some(h) = &self.halt else {
            return Ok(false);
        };
        if self.halt_recorded {
            return Ok(false);
        }
        self.halt_recorded = true;
        self.halt_since = Some(Instant::now());
        self.halt_flag.store(true, Ordering::SeqCst);
        self.d.store.put_meta(META_HALT, h)?;
        self.d
            .events
            .emit(&Event::halting(self.d.clock.as_ref(), h, self.runs.len()));
        Ok(true)
    }

    /// Write the state, the status snapshot and this wave's ledger entry
    /// when something urgent changed, at the end, or every PERSIST_EVERY.
    async fn persist(&mut self, round: &Round) -> Result<(), WaveError> {
        let finishing = round.done || (self.halt.is_some() && self.runs.is_empty());
        if !(round.urgent || finishing || self.last_persist.elapsed() >= PERSIST_EVERY) {
            return Ok(());
        }
        // Hosts back in service leave the ledger; a completed wave leaves
        // it entirely (a failed host it left drained is seen drained by the
        // next wave's probe).
        let own = if round.done {
            LedgerEntry::new()
        } else {
            own_out(&self.plan, &self.state)
        };
        if own != self.ledger.written {
            self.ledger
                .ledger
                .lock()
                .await?
                .set(&self.d.spec.wave_id, &own)?;
            self.ledger.written = own;
        }
        self.d.store.put_meta(META_STATE, &self.state)?;
        let phase = round.done.then_some("completed");
        let halt = self.halt.as_ref();
        self.d.write_status(&self.plan, &self.state, halt, phase)?;
        self.last_persist = Instant::now();
        Ok(())
    }

    /// The halt's grace period is over: the hosts still in flight are
    /// recorded failed `unreachable` and left as they are (drained); the
    /// halt report names them.
    async fn abandon(&mut self) {
        let grace = self.d.halt_grace;
        let why = format!(
            "still in flight {} s after the halt; left as it is (drained)",
            grace.as_secs()
        );
        for r in self.runs.abandon(&why).await {
            if let Report::Ran(h, rec) = &r
                && rec.phase == Phase::Failed
                && rec.failure.as_ref().is_some_and(|f| f.reason == why)
            {
                self.abandoned.push(h.clone());
            }
            self.on_report(r);
        }
    }

    /// Every host has stopped after the halt: the halted ring's evidence,
    /// the final status, and the outcome.
    fn halted(&self, mut h: HaltReport) -> Result<Outcome, WaveError> {
        if !self.abandoned.is_empty() {
            h.reason.push_str(&format!(
                "; hosts still in flight {} s after the halt, recorded unreachable and left drained (resume with --skip or --retry): {}",
                self.d.halt_grace.as_secs(),
                self.abandoned.join(", ")
            ));
        }
        if h.kind == FailureKind::SoakRegression
            && let Some(drained) = h.host.as_ref().and_then(|x| self.redrained.get(x))
        {
            h.reason.push_str(if *drained {
                "; the host was drained again by the wave"
            } else {
                "; the wave could NOT drain the host again: drain it by hand"
            });
        }
        let outcome = ("halted", Some(h.reason.as_str()));
        let d = self.d;
        d.write_evidence(&self.plan, &self.approvals, h.ring, outcome)?;
        d.write_status(&self.plan, &self.state, Some(&h), Some("halted"))?;
        Ok(Outcome::Halted(h))
    }

    /// Wait for a host task, a soak watcher or the next tick.
    async fn wait(&mut self) -> Result<(), WaveError> {
        let woke = tokio::select! {
            Some(r) = self.runs.next() => Woke::Report(r),
            Some(news) = self.soak.news.recv() => Woke::Soak(news),
            () = tokio::time::sleep(self.d.poll_interval) => Woke::Tick,
        };
        match woke {
            Woke::Report(r) => {
                self.on_report(r);
                // Take any other finished hosts without waiting.
                while let Some(r) = self.runs.try_next() {
                    self.on_report(r);
                }
                self.trip();
            }
            Woke::Soak(news) => self.soak_news(news)?,
            Woke::Tick => {}
        }
        Ok(())
    }

    /// Trip the halt flag at once when the sequencer would halt: no host
    /// run sends another drain or patch while the loop catches up.
    fn trip(&self) {
        if plan::next_steps(&self.plan, &self.state)
            .iter()
            .any(|s| matches!(s, Step::Halt(_)))
        {
            self.halt_flag.store(true, Ordering::SeqCst);
        }
    }

    /// A soak watcher's message, made a fact of the state; a regression is
    /// drained again.
    fn soak_news(&mut self, news: SoakNews) -> Result<(), WaveError> {
        let d = self.d;
        let regressed = soak::record(
            news,
            &self.plan,
            &mut self.state,
            &d.store,
            d.events.as_ref(),
            d.clock.as_ref(),
        )?;
        if let Some((h, why)) = regressed {
            let start = self.start_of(&h);
            self.runs.redrain(h, why, start);
            self.trip();
        }
        Ok(())
    }

    fn on_report(&mut self, report: Report) {
        let d = self.d;
        match report {
            Report::Ran(h, rec) => {
                self.host_finished(&h, *rec);
            }
            Report::Redrained(h, outcome) => {
                self.state.redraining.remove(&h);
                self.redrained.insert(h.clone(), outcome.is_ok());
                let (what, detail) = match outcome {
                    Ok(()) => ("drained", "drained again after its soak regression".into()),
                    Err(e) => ("drain_failed", format!("{e}: drain it by hand")),
                };
                // Also in the wave's audit log; a store failure here stops
                // the wave like any other.
                if let Err(e) =
                    d.store
                        .append_event(&Event::host(d.clock.as_ref(), &h, what, &detail))
                {
                    self.store_failed(&h, e.into());
                }
                d.events
                    .emit(&Event::host(d.clock.as_ref(), &h, what, &detail));
            }
            Report::Store(h, e) => {
                self.state.redraining.remove(&h);
                self.store_failed(&h, e);
            }
        }
    }

    /// A host task could not keep its record: stop every host between
    /// steps; the loop ends with the error once they have. The host stays
    /// in flight in the state, so a resume re-attaches to it.
    fn store_failed(&mut self, h: &str, e: HostRunError) {
        self.d.events.emit(&Event::host(
            self.d.clock.as_ref(),
            h,
            "stopped",
            &format!("wave store: {e}"),
        ));
        self.halt_flag.store(true, Ordering::SeqCst);
        self.store_failure.get_or_insert(e);
    }

    fn host_finished(&mut self, h: &str, rec: HostRecord) {
        let events = &self.d.events;
        match rec.phase {
            Phase::Done => {
                self.state.hosts.insert(h.to_string(), HostStatus::Done);
                let driver = rec.after.as_ref().map(|a| a.driver_version.as_str());
                events.emit(&Event::host(
                    self.d.clock.as_ref(),
                    h,
                    "done",
                    driver.unwrap_or_default(),
                ));
            }
            Phase::Failed => {
                self.state.hosts.insert(h.to_string(), HostStatus::Failed);
                self.state.failures += 1;
                let why = rec
                    .failure
                    .map(|f| format!("{} {}: {}", f.step, f.kind, f.reason))
                    .unwrap_or_default();
                events.emit(&Event::host(self.d.clock.as_ref(), h, "failed", &why));
            }
            phase => {
                // Stopped by the halt between steps: still in flight from
                // the pool's point of view (drained), recorded as failed-safe.
                let status = if phase == Phase::Pending {
                    HostStatus::Pending
                } else {
                    HostStatus::InFlight
                };
                self.state.hosts.insert(h.to_string(), status);
                events.emit(&Event::host(
                    self.d.clock.as_ref(),
                    h,
                    "stopped",
                    &format!("{phase:?}"),
                ));
            }
        }
    }
}
