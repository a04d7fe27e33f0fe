//! The `ringfence.v1.Agent` gRPC service. Thin: health answers come from the
//! [`HealthCell`], tasks go to the [`TaskEngine`]; every error becomes a
//! status in [`submit_status`] or at the call site, once.

use std::pin::Pin;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use futures_util::Stream;
use ringfence::pb::{self, agent_server::Agent};
use tonic::{Request, Response, Status};

use crate::healthcell::{HealthCell, ReportSource};
use crate::tasks::{SubmitError, TaskEngine};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Everything the RPCs need.
#[derive(Clone)]
pub struct AgentService {
    /// This host's id.
    pub host_id: String,
    /// SPIFFE id of this agent's certificate.
    pub spiffe_id: String,
    /// Attestation key.
    pub key: Arc<SigningKey>,
    /// Boot id at start.
    pub boot_id: String,
    /// The last health report.
    pub health: Arc<HealthCell>,
    /// Fresh reports on demand.
    pub source: Arc<dyn ReportSource>,
    /// The task engine.
    pub engine: TaskEngine,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("host_id", &self.host_id)
            .finish_non_exhaustive()
    }
}

/// A refused or failed submission as a gRPC status (the one place).
pub fn submit_status(e: &SubmitError) -> Status {
    match e {
        SubmitError::Rejected(r) => ringfence::status::task_rejection(r),
        SubmitError::Busy { running_task_id } => Status::failed_precondition(format!(
            "task `{running_task_id}` is still running; one mutating task at a time"
        )),
        SubmitError::ShuttingDown => {
            Status::unavailable("the agent is shutting down and accepts no new task")
        }
        SubmitError::Journal(j) => Status::internal(format!("cannot record the task: {j}")),
    }
}

impl AgentService {
    /// A fresh report, collected on a blocking thread.
    async fn fresh(&self) -> Result<pb::HealthReport, Status> {
        let source = self.source.clone();
        let draining = *self.engine.draining().borrow();
        tokio::task::spawn_blocking(move || source.collect(draining))
            .await
            .map_err(|e| Status::internal(format!("health collection failed: {e}")))
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn get_identity(
        &self,
        _req: Request<pb::GetIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let vk = self.key.verifying_key();
        Ok(Response::new(pb::Identity {
            host_id: self.host_id.clone(),
            spiffe_id: self.spiffe_id.clone(),
            attestation_public_key: vk.to_bytes().to_vec(),
            attestation_key_fingerprint: ringfence::keys::fingerprint(&vk),
            agent_version: ringfence::VERSION.to_string(),
            boot_id: self.boot_id.clone(),
            sequence_high_water: self.engine.high_water(),
            draining: *self.engine.draining().borrow(),
        }))
    }

    async fn get_health(
        &self,
        req: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::HealthReport>, Status> {
        if req.get_ref().fresh {
            let report = self.fresh().await?;
            self.health.publish(report.clone());
            return Ok(Response::new(report));
        }
        // The cached report is up to one poll old; the drain mark is not.
        let mut report = (*self.health.last()).clone();
        report.draining = *self.engine.draining().borrow();
        Ok(Response::new(report))
    }

    type WatchHealthStream = BoxStream<pb::HealthReport>;

    async fn watch_health(
        &self,
        _req: Request<pb::WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        let mut rx = self.health.subscribe();
        let first = self.health.last();
        let stream = async_stream(move |tx| async move {
            if tx.send(Ok((*first).clone())).await.is_err() {
                return;
            }
            rx.mark_unchanged();
            while rx.changed().await.is_ok() {
                let r = rx.borrow_and_update().clone();
                if tx.send(Ok((*r).clone())).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn attest(
        &self,
        req: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::Envelope>, Status> {
        let nonce = req.into_inner().nonce;
        if !ringfence::attest::nonce_ok(&nonce) {
            return Err(Status::invalid_argument(format!(
                "nonce must be 16 to 64 bytes, got {}",
                nonce.len()
            )));
        }
        let report = self.fresh().await?;
        self.health.publish(report.clone());
        let att = pb::Attestation {
            host_id: self.host_id.clone(),
            boot_id: report.boot_id.clone(),
            nonce,
            issued_at_unix_ms: ringfence::time::now_ms(),
            verdict: report.verdict,
            agent_version: ringfence::VERSION.to_string(),
            report: Some(report),
        };
        Ok(Response::new(ringfence::attest::sign(
            &att,
            &self.host_id,
            &self.key,
        )))
    }

    async fn submit_task(
        &self,
        req: Request<pb::SignedTask>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        match self.engine.submit(req.into_inner()).await {
            Ok(s) => Ok(Response::new(s)),
            Err(e) => {
                tracing::warn!(host_id = %self.host_id, error = %e, "task refused");
                Err(submit_status(&e))
            }
        }
    }

    async fn get_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        let id = req.into_inner().task_id;
        self.engine
            .get(&id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no task `{id}` in this agent's journal")))
    }

    type WatchTaskStream = BoxStream<pb::TaskStatus>;

    async fn watch_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let id = req.into_inner().task_id;
        let Some(mut rx) = self.engine.watch(&id) else {
            return Err(Status::not_found(format!(
                "no task `{id}` in this agent's journal"
            )));
        };
        let stream = async_stream(move |tx| async move {
            loop {
                let s = rx.borrow_and_update().clone();
                let done = pb::TaskState::try_from(s.state)
                    .map(crate::tasks::is_terminal)
                    .unwrap_or(true);
                if tx.send(Ok(s)).await.is_err() || done {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let wave = req.into_inner().wave_id;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: self.engine.list(&wave),
        }))
    }
}

/// A stream fed by a spawned task through a bounded channel.
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
