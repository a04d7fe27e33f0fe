//! A tiny agent over real mTLS on 127.0.0.1 for the TLS tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::Path;
use std::time::Duration;

use ringfence::pb;
use ringfence::pb::agent_server::{Agent, AgentServer};
use ringfence::pki::{IssuedPem, TestPki};
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::tls::{self, ClientIdentity, ReloadableServerConfig, ServerTlsPaths, ServerTlsPem};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

/// Raw calls (garbage, oversized frames) for the TLS limit tests.
pub use ringfence_testkit::grpc::raw_unary;

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
    ringfence_testkit::pki::identity(pki, who).unwrap()
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

/// `host`'s certificate and key as `agent.pem` and `agent.key` in `dir`,
/// the CA as `ca.pem`, and `crl` (if any) as `crl.pem`.
pub fn write_server_files(
    dir: &Path,
    pki: &TestPki,
    host: &IssuedPem,
    crl: Option<&str>,
) -> ServerTlsPaths {
    std::fs::write(dir.join("agent.pem"), &host.cert_pem).unwrap();
    std::fs::write(dir.join("agent.key"), &host.key_pem).unwrap();
    std::fs::write(dir.join("ca.pem"), pki.ca_pem()).unwrap();
    if let Some(crl) = crl {
        std::fs::write(dir.join("crl.pem"), crl).unwrap();
    }
    ServerTlsPaths {
        cert: dir.join("agent.pem"),
        key: dir.join("agent.key"),
        ca_bundle: dir.join("ca.pem"),
        crl: crl.map(|_| dir.join("crl.pem")),
    }
}

/// The serial of the certificate the server at `addr` presents to a new connection.
pub async fn presented_serial(addr: &str, pki: &TestPki) -> String {
    let ops = client(pki, &pki.issue(Role::Ops, "probe").unwrap());
    let chain = tls::server_certificates(addr, &host_id(), &ops, Duration::from_secs(5))
        .await
        .unwrap();
    tls::cert_identity(&chain[0], TD).unwrap().serial
}
