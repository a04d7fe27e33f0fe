//! The `/metrics` HTTP/1.1 endpoint of `--metrics-listen` (plain HTTP, as
//! the agent's endpoint serves without `tls`): `GET`/`HEAD /metrics` only,
//! OpenMetrics for scrapers that ask for it, classic text otherwise. At most
//! [`MAX_CONNECTIONS`] connections at once (further clients wait in the
//! listen backlog); a request head slower than [`HEADER_TIMEOUT`] ends the
//! connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use ringfence::exposition;

use super::{MetricsError, PATH};

/// Open connections at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Longest wait for a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A running endpoint; dropping it stops the listener.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Bind `addr` and serve `registry`.
pub(super) async fn start(
    addr: SocketAddr,
    registry: Arc<Registry>,
) -> Result<MetricsServer, MetricsError> {
    let bind_err = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    tracing::info!(url = %format!("http://{bound}{PATH}"), "metrics endpoint serving");
    let task = tokio::spawn(accept_loop(listener, registry));
    Ok(MetricsServer { addr: bound, task })
}

async fn accept_loop(listener: TcpListener, registry: Arc<Registry>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            serve_connection(tcp, registry).await;
            drop(slot);
        });
    }
}

async fn serve_connection(tcp: TcpStream, registry: Arc<Registry>) {
    exposition::serve_connection(tcp, HEADER_TIMEOUT, move |req| {
        exposition::respond(req, None, |f| exposition::encode(&registry, f))
    })
    .await;
}
