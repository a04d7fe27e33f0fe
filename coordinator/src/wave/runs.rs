//! The tasks the drive loop runs beside itself, at most one per host: a
//! host's run ([`host::run`], or the record of why it could not start:
//! not enrolled, not reachable) and the drain of a host that regressed
//! during its soak ([`host::drain_after_soak`]). Each tells the loop how it
//! ended ([`Report`]); a host stays in flight until then.

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
    in_flight: HashMap<String, JoinHandle<()>>,
}

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
        let key = id.clone();
        let handle = tokio::spawn(async move {
            let at = (id.as_str(), ring, pool.as_str());
            let report = match run(&ctx, start, at, connector.as_ref(), events.as_ref()).await {
                Ok(rec) => Report::Ran(id, Box::new(rec)),
                Err(e) => Report::Store(id, e),
            };
            // The loop has ended if it does not listen.
            let _ = tx.send(report).await;
        });
        self.in_flight.insert(key, handle);
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
        self.in_flight.insert(key, handle);
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
            events.emit(&Event::host(at.0, "connected", ""));
            host::run(ctx, &job, api.as_ref()).await
        }
    }
}
