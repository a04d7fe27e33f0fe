//! The seam between the coordinator and its agents. The wave engine talks to
//! hosts only through [`HostApi`], opened by a [`Connector`], so tests can
//! drive it against fakes; the real implementations ([`GrpcHost`],
//! [`TlsConnector`]) are a thin layer over the generated gRPC client and
//! the fleet's mTLS.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use ringfence::pb;
use tonic::Code;

/// A host's health as it changes: the current report first, then each
/// change; an error item means the watch broke (the stream may end after it).
pub type HealthStream = BoxStream<'static, Result<pb::HealthReport, ClientError>>;

/// A call to an agent failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// the host could not be reached (connect failure, transport error, timeout)
    #[error("host `{host}` unreachable: {reason}")]
    Unreachable {
        /// The inventory id of the host.
        host: String,
        /// The connect or transport error, or the timeout.
        reason: String,
    },
    /// the agent refused the task; `check` names the failed check
    #[error("host `{host}` rejected the task by check `{check}`: {message}")]
    Rejected {
        /// The inventory id of the host.
        host: String,
        /// The stable name of the failed check (e.g. `signature`, `sequence`, `expired`).
        check: String,
        /// The agent's explanation.
        message: String,
    },
    /// the agent answered with another error status
    #[error("host `{host}` answered {code:?}: {message}")]
    Status {
        /// The inventory id of the host.
        host: String,
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
}

impl ClientError {
    /// Classify a gRPC status from `host`.
    pub fn from_status(host: &str, s: &tonic::Status) -> Self {
        if let Some(check) = ringfence::status::rejected_check(s) {
            return Self::Rejected {
                host: host.to_string(),
                check,
                message: s.message().to_string(),
            };
        }
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                Self::Unreachable {
                    host: host.to_string(),
                    reason: format!("{:?}: {}", s.code(), s.message()),
                }
            }
            code => Self::Status {
                host: host.to_string(),
                code,
                message: s.message().to_string(),
            },
        }
    }

    /// Whether retrying later may help (the host may come back).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Unreachable { .. })
    }
}

/// What the coordinator needs from one agent.
#[tonic::async_trait]
pub trait HostApi: Send + Sync {
    /// Host id, attestation key, sequence high-water mark.
    async fn identity(&self) -> Result<pb::Identity, ClientError>;
    /// A signed attestation bound to `nonce`.
    async fn attest(&self, nonce: Vec<u8>) -> Result<pb::Envelope, ClientError>;
    /// The last health report.
    async fn health(&self) -> Result<pb::HealthReport, ClientError>;
    /// Watch the host's health (`WatchHealth`): the current report first,
    /// then each change. The soak watches a ring's hosts with this instead
    /// of polling each one.
    async fn watch_health(&self) -> Result<HealthStream, ClientError>;
    /// Submit a signed task (idempotent by task id).
    async fn submit(&self, task: pb::SignedTask) -> Result<pb::TaskStatus, ClientError>;
    /// The recorded status of a task; `None` if the agent never recorded it.
    async fn get_task(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, ClientError>;
}

/// Opens a connection to a host (the seam tests and the demo fill).
#[tonic::async_trait]
pub trait Connector: Send + Sync {
    /// A client for `host`, or why it cannot be reached.
    async fn connect(&self, host: &crate::inventory::Host) -> Result<Arc<dyn HostApi>, String>;
}

/// The real connector: mTLS to the host's address, pinned to its SPIFFE id.
#[derive(Debug, Clone)]
pub struct TlsConnector {
    /// Operator identity.
    pub identity: ringfence::tls::ClientIdentity,
    /// Trust domain of the fleet.
    pub trust_domain: String,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Per-RPC timeout.
    pub rpc_timeout: Duration,
}

#[tonic::async_trait]
impl Connector for TlsConnector {
    async fn connect(&self, host: &crate::inventory::Host) -> Result<Arc<dyn HostApi>, String> {
        let expected = ringfence::spiffe::SpiffeId::new(
            &self.trust_domain,
            ringfence::spiffe::Role::Host,
            &host.id,
        )
        .map_err(|e| e.to_string())?;
        let ch = ringfence::tls::connect_with_timeout(
            &host.address,
            &expected,
            &self.identity,
            self.connect_timeout,
        )
        .await
        .map_err(|e| format!("host `{}` unreachable: {e}", host.id))?;
        Ok(Arc::new(GrpcHost::new(&host.id, ch, self.rpc_timeout)))
    }
}

/// The real [`HostApi`]: the generated gRPC client over an mTLS channel.
/// Every unary call is bounded as a whole (headers, body and trailers) by
/// its timeout, not only until the response headers arrive: a host that
/// answers headers and then nothing fails `unreachable` when it runs out.
#[derive(Debug, Clone)]
pub struct GrpcHost {
    host: String,
    client: pb::agent_client::AgentClient<tonic::transport::Channel>,
    timeout: Duration,
}

impl GrpcHost {
    /// Wrap a connected channel to `host`; every call is bounded by `timeout`.
    pub fn new(host: &str, channel: tonic::transport::Channel, timeout: Duration) -> Self {
        Self {
            host: host.to_string(),
            client: pb::agent_client::AgentClient::new(channel),
            timeout,
        }
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    fn err(&self, s: &tonic::Status) -> ClientError {
        ClientError::from_status(&self.host, s)
    }

    /// Run the unary call `fut` (named `what`) within the whole-call deadline.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map(tonic::Response::into_inner).map_err(|s| self.err(&s)),
            Err(_) => Err(ClientError::Unreachable {
                host: self.host.clone(),
                reason: format!("{what} not answered within {:?}", self.timeout),
            }),
        }
    }
}

#[tonic::async_trait]
impl HostApi for GrpcHost {
    async fn identity(&self) -> Result<pb::Identity, ClientError> {
        let mut c = self.client.clone();
        let req = self.req(pb::GetIdentityRequest {});
        self.call("GetIdentity", c.get_identity(req)).await
    }

    async fn attest(&self, nonce: Vec<u8>) -> Result<pb::Envelope, ClientError> {
        let mut c = self.client.clone();
        let req = self.req(pb::AttestRequest { nonce });
        self.call("Attest", c.attest(req)).await
    }

    async fn health(&self) -> Result<pb::HealthReport, ClientError> {
        let mut c = self.client.clone();
        let req = self.req(pb::GetHealthRequest { fresh: false });
        self.call("GetHealth", c.get_health(req)).await
    }

    async fn watch_health(&self) -> Result<HealthStream, ClientError> {
        let mut c = self.client.clone();
        // No per-request deadline: it would end the stream after `timeout`.
        // Only opening the stream and its first report are bounded.
        let opened = tokio::time::timeout(
            self.timeout,
            c.watch_health(tonic::Request::new(pb::WatchHealthRequest {})),
        )
        .await
        .map_err(|_| ClientError::Unreachable {
            host: self.host.clone(),
            reason: format!("WatchHealth not answered within {:?}", self.timeout),
        })?
        .map_err(|s| self.err(&s))?;
        // The agent sends the current report at once: waiting for it (also
        // bounded) means a hung agent cannot look like a watched one.
        let mut stream = opened.into_inner();
        let first = tokio::time::timeout(self.timeout, stream.message())
            .await
            .map_err(|_| ClientError::Unreachable {
                host: self.host.clone(),
                reason: format!("no health report within {:?} of WatchHealth", self.timeout),
            })?
            .map_err(|s| self.err(&s))?
            .ok_or_else(|| ClientError::Unreachable {
                host: self.host.clone(),
                reason: "WatchHealth ended before the first report".into(),
            })?;
        let host = self.host.clone();
        Ok(futures_util::stream::once(async { Ok(first) })
            .chain(stream.map(move |r| r.map_err(|s| ClientError::from_status(&host, &s))))
            .boxed())
    }

    async fn submit(&self, task: pb::SignedTask) -> Result<pb::TaskStatus, ClientError> {
        let mut c = self.client.clone();
        let req = self.req(task);
        self.call("SubmitTask", c.submit_task(req)).await
    }

    async fn get_task(&self, task_id: &str) -> Result<Option<pb::TaskStatus>, ClientError> {
        let mut c = self.client.clone();
        let req = self.req(pb::GetTaskRequest {
            task_id: task_id.to_string(),
        });
        match self.call("GetTask", c.get_task(req)).await {
            Ok(s) => Ok(Some(s)),
            Err(ClientError::Status {
                code: Code::NotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
