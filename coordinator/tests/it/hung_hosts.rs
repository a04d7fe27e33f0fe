//! Hosts that hang: a misbehaving test agent that answers the gRPC
//! transport and then stops (response headers sent and the body stalled;
//! no headers at all; TCP accepted and TLS never completed). No such host
//! can keep a wave from ending: each fails `unreachable` within the
//! configured timeouts, the halt completes, `Driver::run` returns, and a
//! host still in flight after a halt's grace period is recorded
//! `unreachable`, named in the halt report and skipped on resume.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Bytes, Frame};
use ringfence_coordinator::client::{Connector, GrpcHost, HostApi};
use ringfence_coordinator::inventory::Host;
use ringfence_coordinator::store;
use ringfence_coordinator::wave::{FailureKind, HostRecord, Outcome, Phase, TlsConnector};
use tokio::net::TcpListener;

use crate::wave_engine::{sim_driver, sim_fleet};

/// How the test agent misbehaves.
#[derive(Clone, Copy, Debug)]
enum Hang {
    /// gRPC response headers, then a body that never comes.
    StallBody,
    /// Never a response.
    StallHeaders,
    /// TCP accepted, TLS never completed.
    NoTls,
}

/// A response body that never yields a frame.
struct Stalled;

impl hyper::body::Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}

/// Start the misbehaving agent on a local port.
async fn hung_agent(hang: Hang) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            if matches!(hang, Hang::NoTls) {
                // Keep the socket open and say nothing.
                held.push(tcp);
                continue;
            }
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    if matches!(hang, Hang::StallHeaders) {
                        std::future::pending::<()>().await;
                    }
                    let resp = hyper::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(Stalled)
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .http2_only()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    addr
}

/// Connects hosts to the simulated fleet, except `hung`: the first
/// connection to it (the wave's probe) reaches its simulated agent, every
/// later one the misbehaving agent (it hangs after the probe).
struct HangsAfterProbe {
    inner: Arc<dyn Connector>,
    hung: String,
    addr: SocketAddr,
    hang: Hang,
    probed: AtomicBool,
    rpc: Duration,
    tls: TlsConnector,
}

#[tonic::async_trait]
impl Connector for HangsAfterProbe {
    async fn connect(&self, host: &Host) -> Result<Arc<dyn HostApi>, String> {
        if host.id != self.hung || !self.probed.swap(true, Ordering::SeqCst) {
            return self.inner.connect(host).await;
        }
        if matches!(self.hang, Hang::NoTls) {
            let mut at = host.clone();
            at.address = self.addr.to_string();
            return self.tls.connect(&at).await;
        }
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(GrpcHost::new(&host.id, ch, self.rpc)))
    }
}

/// An operator TLS identity of a throwaway PKI (the hung agent never
/// gets far enough to check it).
fn tls(dir: &std::path::Path, timeout: Duration) -> TlsConnector {
    ringfence::tls::install_crypto_provider();
    let pki = ringfence::pki::TestPki::new("t.test").unwrap();
    let ops = pki.issue(ringfence::spiffe::Role::Ops, "coord").unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let identity = ringfence::tls::ClientIdentity::load(
        &file("ops.pem", &ops.cert_pem),
        &file("ops.key", &ops.key_pem),
        &file("ca.pem", pki.ca_pem()),
    )
    .unwrap();
    TlsConnector {
        identity,
        trust_domain: "t.test".into(),
        connect_timeout: timeout,
        rpc_timeout: timeout,
    }
}

/// A wave over 3 simulated hosts (at most `percent` % of the pool out at
/// once) where `h0` hangs after the probe the way `hang` says, with RPC
/// timeouts `rpc` and halt grace `grace`.
async fn wave_with_hung_host(
    dir: &std::path::Path,
    hang: Hang,
    percent: u32,
    rpc: Duration,
    grace: Duration,
) -> (
    ringfence_coordinator::wave::Driver,
    crate::wave_engine::SimFleet,
) {
    let f = sim_fleet(3, percent);
    let mut d = sim_driver(&f, dir, "wave-h", "560.35.03");
    d.halt_grace = grace;
    d.connector = Arc::new(HangsAfterProbe {
        inner: d.connector.clone(),
        hung: "h0".into(),
        addr: hung_agent(hang).await,
        hang,
        probed: AtomicBool::new(false),
        rpc,
        tls: tls(dir, rpc),
    });
    (d, f)
}

async fn hung_host_fails_unreachable_and_the_wave_halts(hang: Hang) {
    let dir = tempfile::tempdir().unwrap();
    let rpc = Duration::from_secs(1);
    let (mut d, _f) = wave_with_hung_host(dir.path(), hang, 50, rpc, Duration::from_secs(60)).await;
    let t0 = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(30), d.run())
        .await
        .unwrap_or_else(|_| panic!("{hang:?}: the wave never returned"))
        .unwrap();
    let Outcome::Halted(h) = out else {
        panic!("{hang:?}: the wave should halt on the hung host: {out:?}")
    };
    assert_eq!(h.host.as_deref(), Some("h0"), "{hang:?}: {h:?}");
    assert_eq!(h.kind, FailureKind::Unreachable, "{hang:?}: {h:?}");
    // One timeout per call it tried (attest before, then nothing else).
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "{hang:?}: took {:?}",
        t0.elapsed()
    );
    let rec: HostRecord = d.store.get_host("h0").unwrap().unwrap();
    assert_eq!(rec.phase, Phase::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stalls_the_body_fails_unreachable_and_the_wave_halts() {
    hung_host_fails_unreachable_and_the_wave_halts(Hang::StallBody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stalls_before_headers_fails_unreachable_and_the_wave_halts() {
    hung_host_fails_unreachable_and_the_wave_halts(Hang::StallHeaders).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_completes_tls_fails_unreachable_and_the_wave_halts() {
    hung_host_fails_unreachable_and_the_wave_halts(Hang::NoTls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_still_in_flight_after_the_halt_grace_is_abandoned_named_and_skippable() {
    let dir = tempfile::tempdir().unwrap();
    // RPCs may take a minute: only the halt grace (1 s) can end the wait.
    // An RPC may take 10 s: only the halt grace (1 s) ends the wait sooner.
    let (rpc, grace) = (Duration::from_secs(10), Duration::from_secs(1));
    let (mut d, f) = wave_with_hung_host(dir.path(), Hang::StallBody, 50, rpc, grace).await;
    let paths = d.store.paths.clone();
    // One host out at a time: h0 (first) hangs. The
    // operator halts the wave meanwhile.
    let halter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        store::request_halt(&paths, 0).unwrap();
    });
    let t0 = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(30), d.run())
        .await
        .expect("the halt completes within its grace")
        .unwrap();
    halter.await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    let Outcome::Halted(h) = out else {
        panic!("halted expected: {out:?}")
    };
    assert!(h.reason.contains("h0"), "the halt report names h0: {h:?}");
    let rec: HostRecord = d.store.get_host("h0").unwrap().unwrap();
    assert_eq!(rec.phase, Phase::Failed);
    assert_eq!(rec.failure.as_ref().unwrap().kind, FailureKind::Unreachable);

    // Resume skipping h0: it returns, h0 is left as it is.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        d.resume(&[], &[("h0".into(), "hung".into())]),
    )
    .await
    .expect("the resumed wave ends")
    .unwrap();
    // h0 is skipped but still drained (it never answered): it holds the
    // pool's one slot, so the resumed wave stops, saying so, instead of
    // taking a second host out.
    let Outcome::Halted(h) = out else {
        panic!("the reserve is held by h0: {out:?}")
    };
    assert_eq!(h.kind, FailureKind::Stalled, "{h:?}");
    assert!(f.hosts[1..].iter().all(|h| !h.state().draining));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_host_left_drained_still_counts_against_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    // 10 hosts at 20 %: two of the pool out of service at once.
    let f = sim_fleet(10, 20);
    // h0 fails validation after its drain and patch: left drained.
    f.hosts[0].state().faulty_version = Some("560.35.03".into());
    let mut d = sim_driver(&f, dir.path(), "wave-r", "560.35.03");
    // What the hosts themselves say: how many are drained at once.
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (hosts, most, stop) = (f.hosts.clone(), most.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let out = hosts.iter().filter(|h| h.state().draining).count();
                most.fetch_max(out, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let first = tokio::time::timeout(Duration::from_secs(30), d.run())
        .await
        .expect("the wave ends")
        .unwrap();
    assert!(
        matches!(&first, Outcome::Halted(h) if h.host.as_deref() == Some("h0")),
        "{first:?}"
    );
    assert!(f.hosts[0].state().draining, "h0 left drained");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        d.resume(&[], &[("h0".into(), "bad ECC".into())]),
    )
    .await
    .expect("the resumed wave ends")
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(out, Outcome::Completed);
    for h in &f.hosts[1..] {
        assert_eq!(h.state().patches, 1, "{} patched", h.host_id);
    }
    assert!(
        most.load(Ordering::SeqCst) <= 2,
        "{} hosts of the pool drained at once",
        most.load(Ordering::SeqCst)
    );
}
