//! The `ringfence.v1.Agent` gRPC service. Thin: health answers come from the
//! [`HealthCell`], tasks go to the [`TaskEngine`]; every error becomes a
//! status in [`submit_status`] or at the call site, once.
//!
//! GetHealth is the hot RPC (schedulers poll it), so [`AgentRouter`] answers
//! it with the report bytes the [`HealthCell`] encoded at the last poll,
//! through [`EncodedCodec`]; every other RPC goes to the generated server.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ed25519_dalek::SigningKey;
use futures_util::Stream;
use prost::Message;
use prost::bytes::{BufMut, Bytes};
use ringfence::pb::{self, agent_server::Agent, agent_server::AgentServer};
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
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

impl AgentService {
    /// The GetHealth answer, encoded: the report of the last poll (the drain
    /// mark is current, the rest up to one poll old), or a fresh one when asked.
    pub async fn health_bytes(&self, req: pb::GetHealthRequest) -> Result<Bytes, Status> {
        if req.fresh {
            let report = self.fresh().await?;
            self.health.publish(report);
        }
        Ok(self.health.encoded(*self.engine.draining().borrow()))
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
            ring: self.engine.ring(),
            protected_ring: self.engine.protected_ring(),
        }))
    }

    /// Decoded form of [`AgentService::health_bytes`]; [`AgentRouter`]
    /// answers GetHealth without coming here.
    async fn get_health(
        &self,
        req: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::HealthReport>, Status> {
        let bytes = self.health_bytes(req.into_inner()).await?;
        pb::HealthReport::decode(bytes)
            .map(Response::new)
            .map_err(|e| Status::internal(format!("cannot decode the cached health report: {e}")))
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
            ..Default::default()
        }))
    }
}

/// Path of the GetHealth RPC.
pub const GET_HEALTH_PATH: &str = "/ringfence.v1.Agent/GetHealth";

/// The `ringfence.v1.Agent` service as served: GetHealth from the cached
/// encoded report, everything else through the generated [`AgentServer`].
#[derive(Debug, Clone)]
pub struct AgentRouter {
    service: AgentService,
    generated: AgentServer<AgentService>,
}

impl AgentRouter {
    /// Route the RPCs of `service`.
    pub fn new(service: AgentService) -> Self {
        Self {
            // One size budget: the decode limit is the largest SignedTask
            // the verifier accepts (README "Transport limits").
            generated: AgentServer::new(service.clone())
                .max_decoding_message_size(ringfence::tls::MAX_SIGNED_TASK_BYTES),
            service,
        }
    }
}

impl NamedService for AgentRouter {
    const NAME: &'static str = pb::agent_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for AgentRouter
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == GET_HEALTH_PATH {
            let handler = CachedHealth(self.service.clone());
            Box::pin(async move { Ok(answer_encoded(handler, req).await) })
        } else {
            self.generated.call(req)
        }
    }
}

/// GetHealth answered with [`AgentService::health_bytes`].
struct CachedHealth(AgentService);

impl UnaryService<pb::GetHealthRequest> for CachedHealth {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, req: Request<pb::GetHealthRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move {
            service
                .health_bytes(req.into_inner())
                .await
                .map(Response::new)
        })
    }
}

/// Answer a unary gRPC request whose response is already protobuf-encoded.
/// The benchmark's bare baseline serves through this too, so both sides
/// share the same encode path.
pub async fn answer_encoded<Req, S, B>(
    handler: S,
    req: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    Req: Message + Default + Send + 'static,
    S: UnaryService<Req, Response = Bytes>,
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    tonic::server::Grpc::new(EncodedCodec::<Req>::default())
        .unary(handler, req)
        .await
}

/// A codec that decodes requests `Req` with prost and writes responses that
/// are already protobuf-encoded bytes as they are.
#[derive(Debug)]
pub struct EncodedCodec<Req>(PhantomData<Req>);

impl<Req> Default for EncodedCodec<Req> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Req: Message + Default + Send + 'static> Codec for EncodedCodec<Req> {
    type Encode = Bytes;
    type Decode = Req;
    type Encoder = EncodedWriter;
    type Decoder = tonic_prost::ProstDecoder<Req>;

    fn encoder(&mut self) -> EncodedWriter {
        EncodedWriter
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// Writes pre-encoded message bytes into the gRPC frame.
#[derive(Debug, Clone, Copy, Default)]
pub struct EncodedWriter;

impl Encoder for EncodedWriter {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
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
