//! A tiny agent over real mTLS on 127.0.0.1 for the TLS tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::time::Duration;

use ringfence::pb;
use ringfence::pb::agent_server::{Agent, AgentServer};
use ringfence::pki::{IssuedPem, TestPki};
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::tls::{self, ClientIdentity, ReloadableServerConfig, ServerTlsPem};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

pub const TD: &str = "fleet.test";
pub const HOST: &str = "gpu-001";

/// Trivial bodies; GetIdentity echoes the caller's verified SPIFFE id.
pub struct TestAgent;

#[tonic::async_trait]
impl Agent for TestAgent {
    async fn get_identity(
        &self,
        request: Request<pb::GetIdentityRequest>,
    ) -> Result<Response<pb::Identity>, Status> {
        let peer =
            tls::peer_identity(&request).ok_or_else(|| Status::internal("no peer identity"))?;
        Ok(Response::new(pb::Identity {
            host_id: HOST.into(),
            spiffe_id: peer.id.to_string(),
            ..Default::default()
        }))
    }
    async fn get_health(
        &self,
        _: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::HealthReport>, Status> {
        Ok(Response::new(pb::HealthReport::default()))
    }
    type WatchHealthStream = tokio_stream::Empty<Result<pb::HealthReport, Status>>;
    async fn watch_health(
        &self,
        _: Request<pb::WatchHealthRequest>,
    ) -> Result<Response<Self::WatchHealthStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }
    async fn attest(
        &self,
        _: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::Envelope>, Status> {
        Ok(Response::new(pb::Envelope::default()))
    }
    async fn submit_task(
        &self,
        _: Request<pb::SignedTask>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        Ok(Response::new(pb::TaskStatus {
            task_id: "accepted".into(),
            ..Default::default()
        }))
    }
    async fn get_task(
        &self,
        _: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskStatus>, Status> {
        Ok(Response::new(pb::TaskStatus::default()))
    }
    type WatchTaskStream = tokio_stream::Empty<Result<pb::TaskStatus, Status>>;
    async fn watch_task(
        &self,
        _: Request<pb::GetTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }
    async fn list_tasks(
        &self,
        _: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        Ok(Response::new(pb::ListTasksResponse::default()))
    }
}

pub fn host_id() -> SpiffeId {
    SpiffeId::new(TD, Role::Host, HOST).unwrap()
}

pub fn server_pem(pki: &TestPki, host: &IssuedPem, crl: Option<String>) -> ServerTlsPem {
    ServerTlsPem {
        cert: host.cert_pem.clone().into_bytes(),
        key: host.key_pem.clone().into_bytes(),
        ca_bundle: pki.ca_pem().as_bytes().to_vec(),
        crl: crl.map(String::into_bytes),
    }
}

/// A running server; dropping it shuts the server down.
pub struct Running {
    pub addr: String,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<Result<(), tls::TlsError>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn start(config: ReloadableServerConfig) -> Running {
    start_with_limits(config, tls::ServeLimits::default()).await
}

/// [`start`] with explicit connection limits; the Agent service decodes
/// requests up to [`tls::MAX_SIGNED_TASK_BYTES`], as the real agent does.
pub async fn start_with_limits(
    config: ReloadableServerConfig,
    limits: tls::ServeLimits,
) -> Running {
    tls::install_crypto_provider();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let agent = AgentServer::new(TestAgent).max_decoding_message_size(tls::MAX_SIGNED_TASK_BYTES);
    let routes = tonic::service::Routes::new(agent).add_service(health);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(tls::serve_with_limits(
        listener,
        config,
        routes,
        limits,
        async {
            let _ = stopped.await;
        },
    ));
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

pub fn client(pki: &TestPki, who: &IssuedPem) -> ClientIdentity {
    ClientIdentity::from_pem(
        who.cert_pem.as_bytes(),
        who.key_pem.as_bytes(),
        pki.ca_pem().as_bytes(),
    )
    .unwrap()
}

/// Connect and make one GetIdentity call; Ok(caller id the server saw).
pub async fn call_identity(addr: &str, identity: &ClientIdentity) -> Result<String, String> {
    let channel = tls::connect_with_timeout(addr, &host_id(), identity, Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let mut c = pb::agent_client::AgentClient::new(channel);
    c.get_identity(pb::GetIdentityRequest::default())
        .await
        .map(|r| r.into_inner().spiffe_id)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// Sends raw bytes as a request message and returns the raw answer: lets a
/// test send what no generated client would (garbage, oversized frames).
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawEncoder;

#[derive(Debug, Clone, Copy, Default)]
pub struct RawDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        use prost::bytes::Buf;
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

/// One unary call of `path` with `body` as the raw request message.
pub async fn raw_unary(
    channel: tonic::transport::Channel,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        Request::new(body),
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(Response::into_inner)
}
