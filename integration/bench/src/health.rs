//! Health query latency (issue 8 item 1): GetHealth against the real
//! `ringfenced` (simulated GPUs, mTLS on loopback) at concurrency 1 and 64,
//! beside a bare tonic server in the same run. The bare server is a process
//! of its own like the agent (this binary with `--serve-bare`, a runtime with
//! as many workers as the agent's), uses the same TLS material and serving
//! path (`ringfence::tls::serve`), and answers every request with the
//! agent's own report, pre-encoded, so both messages are the same size and
//! the client decodes the same bytes. What the ratio shows is the agent's
//! own cost per query.

use std::convert::Infallible;
use std::future::Ready;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prost::Message;
use prost::bytes::Bytes;
use ringfence::pb::{self, agent_client::AgentClient};
use ringfence::tls::ReloadableServerConfig;
use ringfenced::server::{GET_HEALTH_PATH, answer_encoded};
use tokio::runtime::Runtime;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::fixture::{AgentFixture, Running, TRUST_DOMAIN, host_tls_paths};
use crate::{Args, Figure};

/// Default seconds per concurrency per server (the issue asks for 10 s each).
const DEFAULT_SECONDS: f64 = 10.0;
/// Concurrent callers on one HTTP/2 connection.
const CONCURRENCY: &[usize] = &[1, 64];
/// GPUs of the simulated host (sets the report size).
const GPUS: u32 = 8;
/// Agent/bare latency ratio the issue asks for.
const MAX_RATIO: f64 = 1.25;
/// Worker threads of the bare server's runtime: as many as the agent's.
const SERVER_WORKERS: usize = 2;
/// The agent's report, encoded, in the fixture dir (what the bare server answers).
const REPORT_FILE: &str = "report.bin";

pub fn run(args: &Args) -> Result<Vec<Figure>, String> {
    let seconds = args.seconds.unwrap_or(DEFAULT_SECONDS);
    let fixture = AgentFixture::new(GPUS, 1)?;
    let client_rt = runtime(None)?;
    let (_agent, report) = client_rt.block_on(async {
        let agent = fixture.start().await?;
        let report = get_health(&fixture.channel(fixture.listen).await?).await?;
        Ok::<_, String>((agent, report))
    })?;
    if report.gpus.len() != GPUS as usize {
        return Err(format!(
            "the agent reports {} GPUs, the scenario has {GPUS}",
            report.gpus.len()
        ));
    }
    let report_path = fixture.path(REPORT_FILE);
    std::fs::write(&report_path, report.encode_to_vec())
        .map_err(|e| format!("cannot write {}: {e}", report_path.display()))?;
    let (_bare, bare_addr) = spawn_bare(fixture.dir())?;
    client_rt.block_on(measure(&fixture, &report, bare_addr, seconds))
}

fn runtime(workers: Option<usize>) -> Result<Runtime, String> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))
}

async fn measure(
    fixture: &AgentFixture,
    report: &pb::HealthReport,
    bare_addr: SocketAddr,
    seconds: f64,
) -> Result<Vec<Figure>, String> {
    let agent = fixture.channel(fixture.listen).await?;
    let bare = fixture.channel(bare_addr).await?;
    if get_health(&bare).await? != *report {
        return Err("the bare server's answer differs from the agent's report".into());
    }

    let mut figures = vec![Figure::info(
        "health",
        &format!("HealthReport size ({GPUS} GPUs)"),
        report.encoded_len() as f64,
        "bytes",
        "same for both",
    )];
    for &c in CONCURRENCY {
        let warmup = (seconds * 0.1).clamp(0.05, 1.0);
        load(&agent, c, warmup).await?;
        load(&bare, c, warmup).await?;
        // Agent, bare, bare, agent: drift on a shared machine hits both alike.
        let half = seconds / 2.0;
        let mut a = load(&agent, c, half).await?;
        let mut b = load(&bare, c, half).await?;
        b.merge(load(&bare, c, half).await?);
        a.merge(load(&agent, c, half).await?);
        figures.extend(compare(c, &mut a, &mut b));
    }
    Ok(figures)
}

async fn get_health(channel: &Channel) -> Result<pb::HealthReport, String> {
    AgentClient::new(channel.clone())
        .get_health(pb::GetHealthRequest { fresh: false })
        .await
        .map(Response::into_inner)
        .map_err(|e| format!("GetHealth failed: {e}"))
}

/// Latencies (µs) of one or more runs, and their total wall time.
#[derive(Debug, Default)]
struct Samples {
    latencies_us: Vec<f64>,
    elapsed_s: f64,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latencies_us.extend(other.latencies_us);
        self.elapsed_s += other.elapsed_s;
    }

    /// The `q` quantile in milliseconds (sorts in place).
    fn quantile_ms(&mut self, q: f64) -> f64 {
        self.latencies_us.sort_by(f64::total_cmp);
        let n = self.latencies_us.len();
        if n == 0 {
            return f64::NAN;
        }
        let i = ((n - 1) as f64 * q).round() as usize;
        self.latencies_us[i.min(n - 1)] / 1000.0
    }

    fn rate(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed_s
    }
}

/// `concurrency` callers sharing `channel`, each calling GetHealth back to
/// back for `seconds`. Any failed call fails the run.
async fn load(channel: &Channel, concurrency: usize, seconds: f64) -> Result<Samples, String> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let callers: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut client = AgentClient::new(channel.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    client
                        .get_health(pb::GetHealthRequest { fresh: false })
                        .await
                        .map_err(|e| format!("GetHealth failed under load: {e}"))?;
                    latencies.push(t.elapsed().as_secs_f64() * 1e6);
                }
                Ok::<_, String>(latencies)
            })
        })
        .collect();
    let mut samples = Samples::default();
    for caller in callers {
        let latencies = caller
            .await
            .map_err(|e| format!("a caller task failed: {e}"))??;
        samples.latencies_us.extend(latencies);
    }
    samples.elapsed_s = start.elapsed().as_secs_f64();
    Ok(samples)
}

fn compare(c: usize, agent: &mut Samples, bare: &mut Samples) -> Vec<Figure> {
    let mut figures = Vec::new();
    let mut ratios = Vec::new();
    for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
        let (a, b) = (agent.quantile_ms(q), bare.quantile_ms(q));
        figures.push(Figure::info(
            "health",
            &format!("agent {label} c={c}"),
            a,
            "ms",
            "",
        ));
        figures.push(Figure::info(
            "health",
            &format!("bare {label} c={c}"),
            b,
            "ms",
            "baseline",
        ));
        ratios.push((label, a / b));
    }
    figures.push(Figure::info(
        "health",
        &format!("agent req/s c={c}"),
        agent.rate(),
        "req/s",
        "",
    ));
    figures.push(Figure::info(
        "health",
        &format!("bare req/s c={c}"),
        bare.rate(),
        "req/s",
        "baseline",
    ));
    for (label, r) in ratios {
        figures.push(Figure::check(
            "health",
            &format!("{label} ratio agent/bare c={c}"),
            r,
            "x",
            &format!("<= {MAX_RATIO}"),
            r <= MAX_RATIO,
        ));
    }
    figures
}

/// Start `--serve-bare` on the fixture dir; returns the process and its address.
fn spawn_bare(dir: &Path) -> Result<(Running, SocketAddr), String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot locate the bench binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("--serve-bare")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut bare = Running::spawn(cmd)?;
    let stdout = bare
        .take_stdout()
        .ok_or("the bare server has no stdout pipe")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| format!("bare server: {e}"))?;
    let addr = line.trim().parse().map_err(|e| {
        format!(
            "bare server printed `{}`, not its address: {e}",
            line.trim()
        )
    })?;
    Ok((bare, addr))
}

/// The bare server (`ringfence-bench --serve-bare DIR`): the agent's TLS
/// files and encoded report from DIR, a loopback port printed on stdout,
/// served until stdin closes (the bench exited).
pub fn serve_bare(dir: &Path) -> Result<(), String> {
    let report_path = dir.join(REPORT_FILE);
    let report = std::fs::read(&report_path)
        .map_err(|e| format!("cannot read {}: {e}", report_path.display()))?;
    let tls = ReloadableServerConfig::load(host_tls_paths(dir), TRUST_DOMAIN)
        .map_err(|e| format!("bare server TLS: {e}"))?;
    runtime(Some(SERVER_WORKERS))?.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("bare server bind: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("bare server address: {e}"))?;
        let mut out = std::io::stdout();
        writeln!(out, "{addr}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot print the address: {e}"))?;
        let routes = tonic::service::Routes::new(Bare {
            report: Bytes::from(report),
        });
        let stdin_closed = async {
            let _ = tokio::task::spawn_blocking(|| {
                std::io::copy(&mut std::io::stdin(), &mut std::io::sink())
            })
            .await;
        };
        ringfence::tls::serve(listener, tls, routes, stdin_closed)
            .await
            .map_err(|e| format!("bare server: {e}"))
    })
}

/// A `ringfence.v1.Agent` that only answers GetHealth, always with the same bytes.
#[derive(Debug, Clone)]
struct Bare {
    report: Bytes,
}

impl NamedService for Bare {
    const NAME: &'static str = pb::agent_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for Bare
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() == GET_HEALTH_PATH {
            let handler = Fixed(self.report.clone());
            Box::pin(async move { Ok(answer_encoded(handler, req).await) })
        } else {
            let status = Status::unimplemented(format!(
                "the bare benchmark server only answers {GET_HEALTH_PATH}"
            ));
            Box::pin(async move { Ok(status.into_http()) })
        }
    }
}

/// Answers with a fixed pre-encoded report.
struct Fixed(Bytes);

impl UnaryService<pb::GetHealthRequest> for Fixed {
    type Response = Bytes;
    type Future = Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, _req: Request<pb::GetHealthRequest>) -> Self::Future {
        std::future::ready(Ok(Response::new(self.0.clone())))
    }
}
