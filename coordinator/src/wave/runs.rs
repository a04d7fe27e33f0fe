//! The tasks the drive loop runs beside itself, at most one per host: a
//! host's run ([`host::run`], or the record of why it could not start:
//! not enrolled, not reachable) and the drain of a host that regressed
//! during its soak ([`host::drain_after_soak`]). Each tells the loop how it
//! ended ([`Report`]); a host stays in flight until then, or until the
//! loop abandons it after a halt's grace period ([`Runs::abandon`]): its
//! task is stopped and the host recorded `unreachable`, left as it is.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::driver::JobError;
use super::events::{Event, EventSink};
use super::host;
use super::model::{Ctx, HostJob, HostRecord, HostRunError};
use super::outcome::{Failure, FailureKind, Stage};
use crate::client::Connector;
use crate::inventory::Host;

/// How a task the loop spawned ended.
#[derive(Debug)]
pub(super) enum Report {
    /// A host run ended: done, failed, or stopped by the halt.
    Ran(String, Box<HostRecord>),
    /// A host that regressed during its soak was drained again, or why not.
    Redrained(String, Result<(), String>),
    /// A host task could not keep its record: the wave store failed.
    Store(String, HostRunError),
}

impl Report {
    fn host(&self) -> &str {
        match self {
            Self::Ran(h, _) | Self::Redrained(h, _) | Self::Store(h, _) => h,
        }
    }
}

/// A host's run as the loop hands it out: its job and inventory entry, or
/// why it cannot run.
pub(super) type Start = Result<(HostJob, Host), JobError>;

/// The host tasks in flight.
pub(super) struct Runs {
    /// What host runs share, with the halt flag.
    ctx: Ctx,
    connector: Arc<dyn Connector>,
    events: Arc<dyn EventSink>,
    tx: mpsc::Sender<Report>,
    rx: mpsc::Receiver<Report>,
    /// Each task, with the host's ring and pool for a host run (`None`
    /// for a soak regression's drain).
    in_flight: HashMap<String, InFlight>,
}

/// A task in flight: its handle, and the host's ring and pool for a host
/// run (`None` for a soak regression's drain).
type InFlight = (JoinHandle<()>, Option<(u32, String)>);

impl Runs {
    /// No host in flight yet.
    pub(super) fn new(ctx: Ctx, connector: Arc<dyn Connector>, events: Arc<dyn EventSink>) -> Self {
        let (tx, rx) = mpsc::channel(1024);
        Self {
            ctx,
            connector,
            events,
            tx,
            rx,
            in_flight: HashMap::new(),
        }
    }

    /// Host tasks not ended yet.
    pub(super) fn len(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether every host task has ended.
    pub(super) fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Run host `id` (of `ring` and `pool`).
    pub(super) fn host(&mut self, (id, ring, pool): (String, u32, String), start: Start) {
        let (ctx, tx) = (self.ctx.clone(), self.tx.clone());
        let (connector, events) = (self.connector.clone(), self.events.clone());
        let (key, at) = (id.clone(), Some((ring, pool.clone())));
        let handle = tokio::spawn(async move {
            let at = (id.as_str(), ring, pool.as_str());
            let report = match run(&ctx, start, at, connector.as_ref(), events.as_ref()).await {
                Ok(rec) => Report::Ran(id, Box::new(rec)),
                Err(e) => Report::Store(id, e),
            };
            // The loop has ended if it does not listen.
            let _ = tx.send(report).await;
        });
        self.in_flight.insert(key, (handle, at));
    }

    /// Drain again host `id`, which regressed during its ring's soak (`why`).
    pub(super) fn redrain(&mut self, id: String, why: String, start: Start) {
        let (ctx, tx, connector) = (self.ctx.clone(), self.tx.clone(), self.connector.clone());
        let key = id.clone();
        let handle = tokio::spawn(async move {
            let report = match start {
                Err(e) => Report::Redrained(id, Err(e.to_string())),
                Ok((job, host)) => match connector.connect(&host).await {
                    Err(e) => Report::Redrained(id, Err(format!("unreachable: {e}"))),
                    Ok(api) => match host::drain_after_soak(&ctx, &job, api.as_ref(), &why).await {
                        Ok((_, true)) => Report::Redrained(id, Ok(())),
                        Ok((_, false)) => {
                            Report::Redrained(id, Err("the wave could not drain it again".into()))
                        }
                        Err(e) => Report::Store(id, e),
                    },
                },
            };
            let _ = tx.send(report).await;
        });
        self.in_flight.insert(key, (handle, None));
    }

    /// Stop every host task still in flight (the halt's grace period is
    /// over) and report each as ended: a host run as failed `unreachable`
    /// (`why`), its record kept and the host left as it is; a drain as not
    /// done. Reports that arrived meanwhile come first.
    pub(super) async fn abandon(&mut self, why: &str) -> Vec<Report> {
        let mut reports = Vec::new();
        while let Some(r) = self.try_next() {
            reports.push(r);
        }
        let mut hosts: Vec<_> = self.in_flight.drain().collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, (handle, at)) in hosts {
            handle.abort();
            // Wait until it has stopped: nothing of it writes afterwards.
            let _ = handle.await;
            let Some((ring, pool)) = at else {
                reports.push(Report::Redrained(id, Err(why.to_string())));
                continue;
            };
            reports.push(
                match abandoned(&self.ctx, (id.as_str(), ring, pool.as_str()), why).await {
                    Ok(rec) => Report::Ran(id, Box::new(rec)),
                    Err(e) => Report::Store(id, e),
                },
            );
        }
        // A report sent just before its task was stopped.
        while let Ok(r) = self.rx.try_recv() {
            reports.retain(|x| x.host() != r.host());
            reports.push(r);
        }
        reports
    }

    /// The next host task to end (never `None`: the channel stays open
    /// while `self` lives).
    pub(super) async fn next(&mut self) -> Option<Report> {
        let r = self.rx.recv().await?;
        self.in_flight.remove(r.host());
        Some(r)
    }

    /// A host task that has ended already, if any.
    pub(super) fn try_next(&mut self) -> Option<Report> {
        let r = self.rx.try_recv().ok()?;
        self.in_flight.remove(r.host());
        Some(r)
    }
}

/// One host's task: its run, or the recorded failure of a host that cannot
/// start (not enrolled, not reachable).
async fn run(
    ctx: &Ctx,
    start: Start,
    at: (&str, u32, &str),
    connector: &dyn Connector,
    events: &dyn EventSink,
) -> Result<HostRecord, HostRunError> {
    let (job, host) = match start {
        Ok(s) => s,
        Err(e) => {
            let f = Failure::new(Stage::Connect, FailureKind::NotEnrolled, e.to_string());
            return host::fail_unstarted(ctx, at, f).await;
        }
    };
    match connector.connect(&host).await {
        Err(e) => {
            let f = Failure::new(Stage::Connect, FailureKind::Unreachable, e);
            host::fail_unstarted(ctx, at, f).await
        }
        Ok(api) => {
            events.emit(&Event::host(ctx.clock.as_ref(), at.0, "connected", ""));
            host::run(ctx, &job, api.as_ref()).await
        }
    }
}

/// Record a host run stopped after the halt's grace period: failed
/// `unreachable` at the step it was in (its unfinished task's, else
/// connecting), left as it is.
async fn abandoned(
    ctx: &Ctx,
    at: (&str, u32, &str),
    why: &str,
) -> Result<HostRecord, HostRunError> {
    let step = ctx
        .store
        .get_host::<HostRecord>(at.0)?
        .and_then(|rec| {
            rec.tasks
                .iter()
                .rev()
                .find(|t| t.outcome.is_none())
                .map(|t| t.step)
        })
        .map_or(Stage::Connect, Stage::Task);
    let f = Failure::new(step, FailureKind::Unreachable, why);
    host::fail_unstarted(ctx, at, f).await
}
