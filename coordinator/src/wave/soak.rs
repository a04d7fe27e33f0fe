//! Soak watching: while a ring soaks, one `WatchHealth` stream per finished
//! host, opened again once if it breaks. What the watchers say becomes facts
//! of the wave state that the sequencer reads: a host seen is `watched` (a
//! ring is promoted only when all its hosts were), a host that turns
//! UNHEALTHY (or cannot be watched) has failed with a soak regression —
//! counted against the failure budget and drained again by the wave.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ringfence::pb;
use ringfence::time::Clock;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::events::{Event, EventSink};
use super::model::{HostRecord, Phase};
use super::outcome::{Failure, FailureKind, Stage};
use crate::client::Connector;
use crate::inventory::{Host, Inventory};
use crate::plan::{HostStatus, Plan, RingStatus, WaveState};
use crate::store::{StoreError, WaveStore};

/// How long a soak watcher waits before reopening a broken health stream
/// (once; a second break in a row makes the host unreachable).
const SOAK_REOPEN_AFTER: Duration = Duration::from_millis(500);

/// What a soak watcher tells the wave loop about its host.
#[derive(Debug)]
pub(super) enum SoakNews {
    /// The first report arrived: the host is being watched.
    Watching(String),
    /// The host regressed (UNHEALTHY, or its watch broke for good): why.
    Regressed(String, String),
}

/// Watch one host of a soaking ring until it regresses (or the task is
/// aborted when the ring is promoted or the wave ends).
async fn watch(connector: Arc<dyn Connector>, host: Host, tx: mpsc::Sender<SoakNews>) {
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
                            // The loop has ended if it does not listen.
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

/// The soak watchers of a wave, by ring. Dropping it aborts them all, so
/// none outlives its ring's soak or the wave loop (any return path).
pub(super) struct SoakWatch {
    watchers: BTreeMap<u32, JoinSet<()>>,
    /// Hosts with a watcher.
    started: BTreeSet<String>,
    tx: mpsc::Sender<SoakNews>,
    /// What the watchers say.
    pub(super) news: mpsc::Receiver<SoakNews>,
}

impl SoakWatch {
    /// No watchers yet.
    pub(super) fn new() -> Self {
        let (tx, news) = mpsc::channel(1024);
        Self {
            watchers: BTreeMap::new(),
            started: BTreeSet::new(),
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
        self.started.retain(|h| {
            plan.host_ring
                .get(h)
                .is_some_and(|r| watchers.contains_key(r))
        });
    }

    /// Start a watcher for every finished host of a soaking ring that has
    /// none yet (on StartSoak, on resume, or when a retried host of a
    /// soaking ring finishes).
    pub(super) fn start(
        &mut self,
        plan: &Plan,
        state: &WaveState,
        inventory: &Inventory,
        connector: &Arc<dyn Connector>,
    ) {
        for (r, rs) in &state.rings {
            if !matches!(rs, RingStatus::Soaking { .. }) {
                continue;
            }
            let Some(rp) = plan.rings.get(r) else {
                continue;
            };
            for h in &rp.hosts {
                if state.hosts.get(h) != Some(&HostStatus::Done) || self.started.contains(h) {
                    continue;
                }
                self.started.insert(h.clone());
                let set = self.watchers.entry(*r).or_default();
                let tx = self.tx.clone();
                if let Some(host) = inventory.host(h) {
                    set.spawn(watch(connector.clone(), host.clone(), tx));
                } else {
                    // Cannot be watched, so it cannot pass the soak.
                    let id = h.clone();
                    set.spawn(async move {
                        let why = "not in the inventory, cannot be watched".to_string();
                        let _ = tx.send(SoakNews::Regressed(id, why)).await;
                    });
                }
            }
        }
    }
}

/// Make one watcher message a fact of the wave state: a first report marks
/// the host watched; a regression of a finished host of a soaking ring
/// fails it (counted against the budget, its record's failure stored) and
/// marks it redraining. Returns the host to drain again, and why.
pub(super) fn record(
    news: SoakNews,
    plan: &Plan,
    state: &mut WaveState,
    store: &WaveStore,
    events: &dyn EventSink,
    clock: &dyn Clock,
) -> Result<Option<(String, String)>, StoreError> {
    let (h, why) = match news {
        SoakNews::Watching(h) => {
            state.watched.insert(h);
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
    // again, as a halt leaves a failed host.
    state.hosts.insert(h.clone(), HostStatus::Failed);
    state.failures += 1;
    state.redraining.insert(h.clone());
    if let Some(mut rec) = store.get_host::<HostRecord>(&h)? {
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
