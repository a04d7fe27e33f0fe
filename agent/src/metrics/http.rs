//! The `/metrics` HTTP/1.1 endpoint. Plain HTTP is accepted on loopback
//! only (config validation refuses anything else). With `tls = true` it
//! speaks TLS 1.3 with the agent's own certificate and the agent's current
//! [`ReloadableServerConfig`]: the client must present a certificate of the
//! fleet CA (CRL and SPIFFE rules as on the gRPC listener, reloaded on
//! SIGHUP) whose role is scheduler or ops; a host certificate is answered
//! 403. Failed handshakes count in `ringfence_tls_handshake_failures_total`.
//!
//! At most [`MAX_CONNECTIONS`] connections at once (further clients wait in
//! the listen backlog); a handshake or a request head that takes longer than
//! [`ringfence::tls::HANDSHAKE_TIMEOUT`] ends the connection.

use std::net::SocketAddr;
use std::sync::Arc;

use ringfence::refusals::{self, HandshakeFailure};
use ringfence::spiffe::Role;
use ringfence::tls::{HANDSHAKE_TIMEOUT, ReloadableServerConfig, cert_identity};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use ringfence::exposition;

use super::{Metrics, MetricsError, PATH};

/// Open connections at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Roles whose certificates may scrape over mTLS.
pub const SCRAPE_ROLES: [Role; 2] = [Role::Scheduler, Role::Ops];

/// A running endpoint; dropping it stops the listener.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    tls: bool,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it speaks mTLS.
    pub fn tls(&self) -> bool {
        self.tls
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind `addr` and serve `metrics` (over mTLS when `tls` is given).
pub(super) async fn start(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    tls: Option<ReloadableServerConfig>,
) -> Result<MetricsServer, MetricsError> {
    let bind_err = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(url = %format!("{scheme}://{bound}{PATH}"), "metrics endpoint serving");
    let is_tls = tls.is_some();
    let task = tokio::spawn(accept_loop(listener, metrics, tls));
    Ok(MetricsServer {
        addr: bound,
        tls: is_tls,
        task,
    })
}

async fn accept_loop(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    tls: Option<ReloadableServerConfig>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(tcp, metrics, None).await,
                Some(tls) => serve_tls(tcp, peer, metrics, &tls).await,
            }
            drop(slot);
        });
    }
}

/// TLS handshake with the agent's current config (HTTP/1.1 by ALPN), then
/// the role check: a refused role gets 403 on every request.
async fn serve_tls(
    tcp: TcpStream,
    peer: SocketAddr,
    metrics: Arc<Metrics>,
    tls: &ReloadableServerConfig,
) {
    let mut config = (*tls.current()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            refusals::handshake_failed(HandshakeFailure::classify(&e));
            tracing::warn!(%peer, error = %e, "metrics: TLS handshake failed");
            return;
        }
        Err(_) => {
            refusals::handshake_failed(HandshakeFailure::Timeout);
            tracing::warn!(%peer, "metrics: TLS handshake timed out");
            return;
        }
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|leaf| cert_identity(leaf, tls.trust_domain()));
    let refused = match identity {
        Some(Ok(id)) if SCRAPE_ROLES.contains(&id.id.role) => None,
        Some(Ok(id)) => {
            tracing::warn!(%peer, id = %id.id, "metrics: scrape refused for this role");
            Some(format!(
                "role `{}` ({}) may not read metrics: scrape with a scheduler or ops certificate\n",
                id.id.role, id.id
            ))
        }
        Some(Err(e)) => {
            refusals::handshake_failed(HandshakeFailure::BadCertificate);
            tracing::warn!(%peer, error = %e, "metrics: client certificate refused");
            return;
        }
        None => {
            refusals::handshake_failed(HandshakeFailure::NoClientCertificate);
            tracing::warn!(%peer, "metrics: TLS peer presented no certificate");
            return;
        }
    };
    serve_connection(stream, metrics, refused.map(Arc::from)).await;
}

async fn serve_connection<S>(io: S, metrics: Arc<Metrics>, refused: Option<Arc<str>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    exposition::serve_connection(io, HANDSHAKE_TIMEOUT, move |req| {
        exposition::respond(req, refused.as_deref(), |f| metrics.encode(f))
    })
    .await;
}
