//! The `ringfence.v1.Agent` gRPC service. Thin: health answers come from the
//! [`HealthCell`], tasks go to the [`TaskEngine`]; every error becomes a
//! status in [`submit_status`] or at the call site, once.
//!
//! GetHealth is the hot RPC (schedulers poll it), so [`AgentRouter`] answers
//! it with the report bytes the [`HealthCell`] encoded at the last poll
//! (plus the current drain mark while draining), through [`EncodedCodec`];
//! every other RPC goes to the generated server. WatchHealth sends every
//! report the cell publishes: one per poll even when nothing changed, so
//! a silent stream means a stuck agent. GetIdentity names the patch
//! profiles and the drain mark.
//!
//! Limits: WatchHealth / WatchTask streams are plain stream values (no
//! spawned task), so a stream whose client went away is dropped with its
//! HTTP/2 stream at once; each holds a [`WatchSlot`] of [`WatchSlots`]
//! (per peer SPIFFE id and in total). Fresh GetHealth / Attest collections
//! are coalesced by [`FreshReports`]. ListTasks answers in pages.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// Open WatchHealth / WatchTask streams, capped per peer and in total.
    pub watch_slots: Arc<WatchSlots>,
    /// Fresh collections for GetHealth(fresh) and Attest, coalesced.
    pub fresh: Arc<FreshReports>,
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
        SubmitError::Overloaded { .. } => Status::resource_exhausted(e.to_string()),
        SubmitError::Verifier { .. } => Status::internal(e.to_string()),
    }
}

impl AgentService {
    /// A report collected after this call began (coalesced with the callers
    /// waiting at the same moment; see [`FreshReports`]).
    async fn fresh(&self) -> Result<Arc<pb::HealthReport>, Status> {
        self.fresh
            .get(&self.source, &self.health, &self.engine)
            .await
            .map_err(|e| Status::internal(format!("health collection failed: {e}")))
    }

    /// The GetHealth answer, encoded: the report of the last poll (the drain
    /// mark is current, the rest up to one poll old), or a fresh one when asked.
    pub async fn health_bytes(&self, req: pb::GetHealthRequest) -> Result<Bytes, Status> {
        if req.fresh {
            // FreshReports published it; the cell's encoding is that report.
            self.fresh().await?;
        }
        Ok(self.health.encoded(self.engine.drain_mark().as_ref()))
    }

    /// A slot for one watch stream of the request's peer, or RESOURCE_EXHAUSTED.
    fn watch_slot<T>(&self, req: &Request<T>, rpc: &str) -> Result<WatchSlot, Status> {
        let peer = ringfence::tls::peer_identity(req)
            .map_or_else(|| "unauthenticated".to_string(), |p| p.id.to_string());
        self.watch_slots.acquire(&peer).map_err(|e| {
            tracing::warn!(peer = %peer, rpc, error = %e, "watch stream refused");
            Status::resource_exhausted(format!("{rpc}: {e}"))
        })
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
            drain_mark: self.engine.drain_mark(),
            patch_profiles: self.engine.patch_profiles(),
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
        req: Request<pb::WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        let slot = self.watch_slot(&req, "WatchHealth")?;
        // The last report now, then every published one (each poll, so a
        // heartbeat at least every poll interval, and fresh collections);
        // the receiver marks the first as seen, so none is sent twice.
        let mut rx = self.health.subscribe();
        let first = rx.borrow_and_update().clone();
        // A plain stream value, no spawned task: when the client goes away
        // hyper drops the response body, and with it the receiver and slot.
        let stream = futures_util::stream::unfold(
            (Some(first), rx, slot),
            |(first, mut rx, slot)| async move {
                let report = match first {
                    Some(r) => r,
                    None => {
                        rx.changed().await.ok()?;
                        rx.borrow_and_update().clone()
                    }
                };
                Some((Ok((*report).clone()), (None, rx, slot)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
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
        // One collection may serve several callers; each signs its own nonce.
        let report = (*self.fresh().await?).clone();
        Ok(Response::new(ringfence::attest::attest(
            &self.host_id,
            &self.key,
            &nonce,
            self.engine.clock().now_ms(),
            report,
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
        let slot = self.watch_slot(&req, "WatchTask")?;
        let id = req.into_inner().task_id;
        let Some(rx) = self.engine.watch(&id) else {
            return Err(Status::not_found(format!(
                "no task `{id}` in this agent's journal"
            )));
        };
        // The current status, then each change; ends after a final state.
        // No spawned task: a client that goes away drops all of it.
        let stream =
            futures_util::stream::unfold((Some(rx), true, slot), |(rx, first, slot)| async move {
                let mut rx = rx?;
                if !first {
                    rx.changed().await.ok()?;
                }
                let s = rx.borrow_and_update().clone();
                let done = pb::TaskState::try_from(s.state)
                    .map(crate::tasks::is_terminal)
                    .unwrap_or(true);
                let next = if done { None } else { Some(rx) };
                Some((Ok(s), (next, false, slot)))
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let req = req.into_inner();
        let after = parse_page_token(&req.page_token)?;
        let size = page_size(req.page_size);
        let (tasks, more) = self
            .engine
            .list_page(&req.wave_id, after, size)
            .map_err(|e| Status::internal(format!("listing tasks: {e}")))?;
        let next_page_token = match (more, tasks.last()) {
            (true, Some(last)) => format!("{PAGE_TOKEN_PREFIX}{}", last.sequence),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListTasksResponse {
            tasks,
            next_page_token,
        }))
    }
}

/// ListTasks page size when the request leaves it 0.
pub const DEFAULT_LIST_PAGE_SIZE: u32 = 100;
/// The largest ListTasks page; larger requests get this many.
pub const MAX_LIST_PAGE_SIZE: u32 = 1000;
const PAGE_TOKEN_PREFIX: &str = "seq:";

fn page_size(asked: u32) -> usize {
    let n = if asked == 0 {
        DEFAULT_LIST_PAGE_SIZE
    } else {
        asked.min(MAX_LIST_PAGE_SIZE)
    };
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The sequence after which a page starts (0: from the oldest).
fn parse_page_token(token: &str) -> Result<u64, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "page_token `{}` is not a token from a previous ListTasks answer",
                token.chars().take(64).collect::<String>().escape_debug()
            ))
        })
}

/// Open WatchHealth / WatchTask streams allowed to one peer (SPIFFE id) at once.
pub const DEFAULT_WATCH_STREAMS_PER_PEER: usize = 32;
/// Open WatchHealth / WatchTask streams allowed in total at once.
pub const DEFAULT_WATCH_STREAMS_TOTAL: usize = 256;

/// A watch stream was refused (answered RESOURCE_EXHAUSTED).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchLimitError {
    /// the peer already has its maximum of open streams
    #[error("{peer} already has {limit} open watch streams (the limit per peer)")]
    PerPeer {
        /// The peer's identity (its SPIFFE id, or "unauthenticated").
        peer: String,
        /// The most streams one peer may hold open at once.
        limit: usize,
    },
    /// the agent already has its maximum of open streams
    #[error("the agent already serves {limit} open watch streams (the total limit)")]
    Total {
        /// The most streams the agent holds open at once, all peers together.
        limit: usize,
    },
}

/// Counts open watch streams per peer and in total; a [`WatchSlot`] is
/// one open stream and gives its place back when dropped.
#[derive(Debug)]
pub struct WatchSlots {
    per_peer: usize,
    total: usize,
    open: Mutex<OpenStreams>,
}

#[derive(Debug, Default)]
struct OpenStreams {
    total: usize,
    by_peer: HashMap<String, usize>,
}

impl Default for WatchSlots {
    fn default() -> Self {
        Self::new(DEFAULT_WATCH_STREAMS_PER_PEER, DEFAULT_WATCH_STREAMS_TOTAL)
    }
}

impl WatchSlots {
    /// Caps of `per_peer` streams for one peer and `total` for all.
    pub fn new(per_peer: usize, total: usize) -> Self {
        Self {
            per_peer,
            total,
            open: Mutex::new(OpenStreams::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OpenStreams> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take a slot for `peer`, or say which limit is reached.
    pub fn acquire(self: &Arc<Self>, peer: &str) -> Result<WatchSlot, WatchLimitError> {
        let mut open = self.lock();
        if open.total >= self.total {
            return Err(WatchLimitError::Total { limit: self.total });
        }
        let n = open.by_peer.get(peer).copied().unwrap_or(0);
        if n >= self.per_peer {
            return Err(WatchLimitError::PerPeer {
                peer: peer.to_string(),
                limit: self.per_peer,
            });
        }
        open.by_peer.insert(peer.to_string(), n + 1);
        open.total += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            peer: peer.to_string(),
        })
    }

    /// Streams open now (all peers).
    pub fn open(&self) -> usize {
        self.lock().total
    }

    /// Peers with at least one open stream.
    pub fn peers(&self) -> usize {
        self.lock().by_peer.len()
    }
}

/// One open watch stream; dropping it frees the place.
#[derive(Debug)]
pub struct WatchSlot {
    slots: Arc<WatchSlots>,
    peer: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.by_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Coalesces fresh health collections: a caller is served by the first
/// collection that *starts after it arrived*, so every answer is fresh for
/// its caller, and callers arriving while one collection runs share the next
/// one. Many concurrent GetHealth(fresh) / Attest calls then cost two NVML
/// collections, not one each.
#[derive(Debug, Default)]
pub struct FreshReports {
    /// Callers that arrived so far (a ticket each).
    arrivals: AtomicU64,
    /// The last collection: how many callers had arrived when it started, and its report.
    last: tokio::sync::Mutex<Option<(u64, Arc<pb::HealthReport>)>>,
    /// Collections made (for tests and metrics).
    collections: AtomicU64,
}

impl FreshReports {
    /// A report collected after this call began; published to `health`.
    pub async fn get(
        &self,
        source: &Arc<dyn ReportSource>,
        health: &HealthCell,
        engine: &TaskEngine,
    ) -> Result<Arc<pb::HealthReport>, tokio::task::JoinError> {
        let ticket = self.arrivals.fetch_add(1, Ordering::SeqCst) + 1;
        // Fair (FIFO) lock: whoever waited during a collection gets it next.
        let mut last = self.last.lock().await;
        if let Some((started_after, report)) = last.as_ref()
            && *started_after >= ticket
        {
            return Ok(report.clone());
        }
        let started_after = self.arrivals.load(Ordering::SeqCst);
        let draining = *engine.draining().borrow();
        let src = source.clone();
        let ticket = health.ticket();
        let report = Arc::new(tokio::task::spawn_blocking(move || src.collect(draining)).await?);
        self.collections.fetch_add(1, Ordering::SeqCst);
        health.publish_collected(ticket, (*report).clone());
        *last = Some((started_after, report.clone()));
        Ok(report)
    }

    /// How many collections were made.
    pub fn collections(&self) -> u64 {
        self.collections.load(Ordering::SeqCst)
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use ringfence::time::SystemClock;
    use ringfence::trust::{Policy, TrustSet};

    use super::*;
    use crate::command::ProcessRunner;
    use crate::tasks::{DrainConfig, HealthSource, RebootConfig};

    /// The engine's health seam, unused by these tests.
    #[derive(Debug)]
    struct NoHealth;

    impl HealthSource for NoHealth {
        fn fresh_report(&self, draining: bool) -> pb::HealthReport {
            pb::HealthReport {
                draining,
                ..Default::default()
            }
        }
        fn attest(&self, _nonce: &[u8], _draining: bool) -> pb::Envelope {
            pb::Envelope::default()
        }
        fn acknowledge(&self, _ack: &pb::AckFaults) -> Vec<String> {
            Vec::new()
        }
    }

    /// A report source that takes 150 ms and counts its collections.
    #[derive(Debug, Default)]
    struct SlowSource {
        collections: AtomicU64,
    }

    impl ReportSource for SlowSource {
        fn collect(&self, draining: bool) -> pb::HealthReport {
            std::thread::sleep(Duration::from_millis(150));
            let n = self.collections.fetch_add(1, Ordering::SeqCst) + 1;
            pb::HealthReport {
                host_id: "gpu-1".into(),
                collected_at_unix_ms: i64::try_from(n).unwrap(),
                verdict: pb::Verdict::Healthy as i32,
                draining,
                ..Default::default()
            }
        }
        fn acknowledge(&self, _fault_ids: &[String]) {}
    }

    fn service(dir: &std::path::Path, source: Arc<SlowSource>) -> AgentService {
        let engine = TaskEngine::open(
            dir,
            "gpu-1".into(),
            Some(0),
            TrustSet::from_keys(vec![], Policy::default()),
            DrainConfig::default(),
            RebootConfig::default(),
            crate::profiles::PatchConfig::default(),
            Arc::new(NoHealth),
            Arc::new(ProcessRunner::default()),
            Arc::new(SystemClock),
            "boot-1".into(),
            "0.1.0".into(),
        )
        .unwrap();
        AgentService {
            host_id: "gpu-1".into(),
            spiffe_id: "spiffe://gpu.test/host/gpu-1".into(),
            key: Arc::new(ringfence::keys::generate()),
            boot_id: "boot-1".into(),
            health: Arc::new(HealthCell::new(pb::HealthReport::default())),
            source,
            engine,
            watch_slots: Arc::default(),
            fresh: Arc::default(),
        }
    }

    /// 24 concurrent fresh GetHealth and Attest calls cost two collections
    /// (the one running when they arrive is too old for them; the next one
    /// serves all), and every attestation still signs its caller's nonce.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_fresh_collections_are_coalesced() {
        let dir = tempfile::tempdir().unwrap();
        let source = Arc::new(SlowSource::default());
        let svc = service(dir.path(), source.clone());
        let mut calls = Vec::new();
        for i in 0..24u8 {
            let svc = svc.clone();
            calls.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    svc.health_bytes(pb::GetHealthRequest { fresh: true })
                        .await
                        .unwrap();
                    None
                } else {
                    let nonce = vec![i; 32];
                    let env = svc
                        .attest(Request::new(pb::AttestRequest {
                            nonce: nonce.clone(),
                        }))
                        .await
                        .unwrap()
                        .into_inner();
                    Some((nonce, env))
                }
            }));
        }
        let vk = svc.key.verifying_key();
        for c in calls {
            if let Some((nonce, env)) = c.await.unwrap() {
                let att = pb::Attestation::decode(env.payload.as_slice()).unwrap();
                assert_eq!(att.nonce, nonce, "each caller's own nonce");
                let msg = ringfence::envelope::pae(&env.payload_type, &env.payload);
                let sig = ed25519_dalek::Signature::from_slice(&env.signatures[0].sig).unwrap();
                vk.verify_strict(&msg, &sig).unwrap();
            }
        }
        let n = source.collections.load(Ordering::SeqCst);
        assert!(n <= 2, "{n} collections for 24 concurrent callers");
        assert_eq!(svc.fresh.collections(), n);

        // A caller arriving after a collection started never gets that one.
        let before = source.collections.load(Ordering::SeqCst);
        svc.health_bytes(pb::GetHealthRequest { fresh: true })
            .await
            .unwrap();
        svc.health_bytes(pb::GetHealthRequest { fresh: true })
            .await
            .unwrap();
        assert_eq!(source.collections.load(Ordering::SeqCst), before + 2);
        let last = svc.health.last();
        assert_eq!(
            last.collected_at_unix_ms,
            i64::try_from(before + 2).unwrap()
        );
    }

    #[test]
    fn watch_slots_cap_per_peer_and_in_total_and_free_on_drop() {
        let slots = Arc::new(WatchSlots::new(2, 3));
        let a1 = slots.acquire("a").unwrap();
        let _a2 = slots.acquire("a").unwrap();
        assert_eq!(
            slots.acquire("a").unwrap_err(),
            WatchLimitError::PerPeer {
                peer: "a".into(),
                limit: 2
            }
        );
        let _b1 = slots.acquire("b").unwrap();
        assert_eq!(
            slots.acquire("c").unwrap_err(),
            WatchLimitError::Total { limit: 3 }
        );
        drop(a1);
        assert_eq!(slots.open(), 2);
        let _c1 = slots.acquire("c").unwrap();
        assert_eq!(slots.peers(), 3);
    }

    #[test]
    fn page_tokens_and_sizes() {
        assert_eq!(parse_page_token("").unwrap(), 0);
        assert_eq!(parse_page_token("seq:42").unwrap(), 42);
        let e = parse_page_token("42").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(page_size(0), 100);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(1_000_000), 1000);
    }
}
