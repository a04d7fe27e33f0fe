//! Agent footprint (issue 8 item 2): the real `ringfenced` with 8 simulated
//! GPUs polled every second. Time from exec to `READY=1` on a NOTIFY_SOCKET
//! bound here (as systemd would), then over the window: peak RSS (VmHWM),
//! steady RSS (median of per-second VmRSS samples), and CPU as a percentage
//! of one core (utime + stime from /proc/PID/stat).
//!
//! The agent serves `/metrics` ([metrics] on loopback) throughout; after the
//! window [`SCRAPES`] scrapes of it give the median time and the size of one
//! response (OpenMetrics, 8 GPUs).
//!
//! Then WatchHealth churn (issue 13 §7): a scheduler opens a WatchHealth
//! stream, reads the first report and cancels it, [`CHURN_CYCLES`] times
//! (8 at a time over 4 connections; fewer with a short `--seconds`, at
//! least 800); the agent's RSS after the churn must
//! stay within the same budget (an abandoned stream that stayed allocated
//! grew the agent by gigabytes before).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use ringfence::pb::{self, agent_client::AgentClient};

use crate::fixture::{AgentFixture, Running};
use crate::{Args, Figure};

/// Default measurement window (the issue asks for 60 s).
const DEFAULT_SECONDS: f64 = 60.0;
/// GPUs of the simulated host.
const GPUS: u32 = 8;
/// Health poll interval, seconds.
const POLL_S: u64 = 1;
/// How long the agent may take to say READY before the bench gives up.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// Targets from the issue.
const MAX_RSS_MIB: f64 = 20.0;
const MAX_CPU_PCT: f64 = 0.5;
const MAX_READY_MS: f64 = 100.0;
/// `/metrics` scrapes timed after the window, one connection each.
const SCRAPES: usize = 200;
/// WatchHealth streams opened and cancelled after the window.
pub const CHURN_CYCLES: usize = 100_000;
/// Connections and concurrent streams per connection of the churn.
const CHURN_CONNECTIONS: usize = 4;
const CHURN_PER_CONNECTION: usize = 2;

pub fn run(args: &Args) -> Result<Vec<Figure>, String> {
    let seconds = args.seconds.unwrap_or(DEFAULT_SECONDS);
    let fixture = AgentFixture::new(GPUS, POLL_S)?;
    let notify_path = fixture.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)
        .map_err(|e| format!("cannot bind {}: {e}", notify_path.display()))?;
    notify
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| format!("notify socket: {e}"))?;
    let mut cmd = fixture.command()?;
    cmd.env("NOTIFY_SOCKET", &notify_path);

    let exec = Instant::now();
    let mut agent = Running::spawn(cmd)?;
    wait_ready(&notify, &mut agent, &fixture)?;
    let ready_ms = exec.elapsed().as_secs_f64() * 1000.0;

    let pid = agent.pid();
    let tick_s = clock_tick_s()?;
    let cpu_start = cpu_ticks(pid)?;
    let start = Instant::now();
    let window = Duration::from_secs_f64(seconds);
    let mut rss_kib = Vec::new();
    loop {
        // Sample about once a second, and at the end of the window.
        let left = window.saturating_sub(start.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(1)));
        agent.check_alive(&fixture)?;
        rss_kib.push(status_kib(pid, "VmRSS")?);
        if start.elapsed() >= window {
            break;
        }
    }
    let cpu_s = (cpu_ticks(pid)? - cpu_start) as f64 * tick_s;
    let wall_s = start.elapsed().as_secs_f64();
    let peak_kib = status_kib(pid, "VmHWM")?;
    rss_kib.sort_unstable();
    let steady_kib = rss_kib[rss_kib.len() / 2];
    let (peak_mib, steady_mib) = (peak_kib as f64 / 1024.0, steady_kib as f64 / 1024.0);
    let cpu_pct = cpu_s / wall_s * 100.0;

    let (scrape_ms, scrape_bytes) = scrape_cost(fixture.metrics, SCRAPES)?;

    // A short window (`--seconds`, the smoke test) churns less.
    let cycles = match args.seconds {
        None => CHURN_CYCLES,
        Some(s) => ((s * 1000.0) as usize).clamp(800, CHURN_CYCLES),
    };
    let churn_start = Instant::now();
    watch_health_churn(&fixture, cycles)?;
    let churn_s = churn_start.elapsed().as_secs_f64();
    agent.check_alive(&fixture)?;
    // Let the last cancellations land before reading RSS.
    std::thread::sleep(Duration::from_millis(500));
    let churn_mib = status_kib(pid, "VmRSS")? as f64 / 1024.0;
    Ok(vec![
        Figure::check(
            "footprint",
            "peak RSS (VmHWM)",
            peak_mib,
            "MiB",
            &format!("<= {MAX_RSS_MIB}"),
            peak_mib <= MAX_RSS_MIB,
        ),
        Figure::check(
            "footprint",
            "steady RSS (median VmRSS)",
            steady_mib,
            "MiB",
            &format!("<= {MAX_RSS_MIB}"),
            steady_mib <= MAX_RSS_MIB,
        ),
        Figure::check(
            "footprint",
            &format!("CPU of one core ({GPUS} GPUs, {POLL_S} s poll)"),
            cpu_pct,
            "%",
            &format!("<= {MAX_CPU_PCT}"),
            cpu_pct <= MAX_CPU_PCT,
        ),
        Figure::check(
            "footprint",
            "exec to READY=1",
            ready_ms,
            "ms",
            &format!("<= {MAX_READY_MS}"),
            ready_ms <= MAX_READY_MS,
        ),
        Figure::check(
            "footprint",
            "RSS after WatchHealth open/cancel churn",
            churn_mib,
            "MiB",
            &format!("<= {MAX_RSS_MIB}"),
            churn_mib <= MAX_RSS_MIB,
        ),
        Figure::info(
            "footprint",
            &format!("GET /metrics median time ({GPUS} GPUs)"),
            scrape_ms,
            "ms",
            &format!("{SCRAPES} scrapes, a new loopback connection each"),
        ),
        Figure::info(
            "footprint",
            &format!("GET /metrics response size ({GPUS} GPUs)"),
            scrape_bytes as f64,
            "bytes",
            "OpenMetrics text, body only",
        ),
        Figure::info(
            "footprint",
            "WatchHealth open/cancel cycles per second",
            cycles as f64 / churn_s,
            "/s",
            &format!("{cycles} cycles, 8 at a time over 4 mTLS connections"),
        ),
    ])
}

/// `n` scrapes of `/metrics` as Prometheus asks (OpenMetrics): the median
/// time of one (connect to last byte, ms) and the size of the last body.
fn scrape_cost(addr: std::net::SocketAddr, n: usize) -> Result<(f64, usize), String> {
    use std::io::{Read, Write};
    let mut ms = Vec::with_capacity(n);
    let mut bytes = 0;
    for _ in 0..n {
        let start = Instant::now();
        let mut s = std::net::TcpStream::connect(addr)
            .map_err(|e| format!("metrics endpoint {addr}: {e}"))?;
        s.write_all(
            b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
        )
        .map_err(|e| format!("metrics endpoint {addr}: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| format!("metrics endpoint {addr}: {e}"))?;
        ms.push(start.elapsed().as_secs_f64() * 1000.0);
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("metrics endpoint {addr}: no HTTP answer"))?;
        if !head.starts_with("HTTP/1.0 200") || !body.ends_with("# EOF\n") {
            return Err(format!("metrics endpoint {addr} answered: {head}"));
        }
        bytes = body.len();
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], bytes))
}

/// Open a WatchHealth stream, read one report, cancel it: `cycles` times.
fn watch_health_churn(fixture: &AgentFixture, cycles: usize) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    rt.block_on(async {
        let per_task = cycles / (CHURN_CONNECTIONS * CHURN_PER_CONNECTION);
        let mut tasks = Vec::new();
        for _ in 0..CHURN_CONNECTIONS {
            let client = AgentClient::new(fixture.channel(fixture.listen).await?);
            for _ in 0..CHURN_PER_CONNECTION {
                let mut client = client.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..per_task {
                        let mut stream = loop {
                            match client.watch_health(pb::WatchHealthRequest {}).await {
                                Ok(s) => break s.into_inner(),
                                // At the per-peer cap until a cancellation lands.
                                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                                    tokio::time::sleep(Duration::from_millis(2)).await;
                                }
                                Err(e) => return Err(format!("WatchHealth: {e}")),
                            }
                        };
                        stream
                            .message()
                            .await
                            .map_err(|e| format!("WatchHealth first report: {e}"))?;
                    }
                    Ok::<(), String>(())
                }));
            }
        }
        for t in tasks {
            t.await.map_err(|e| format!("churn task: {e}"))??;
        }
        Ok(())
    })
}

/// Read datagrams until one carries `READY=1`.
fn wait_ready(
    notify: &UnixDatagram,
    agent: &mut Running,
    fixture: &AgentFixture,
) -> Result<(), String> {
    let deadline = Instant::now() + READY_LIMIT;
    let mut buf = [0u8; 4096];
    loop {
        match notify.recv(&mut buf) {
            Ok(n) => {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return Ok(());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("notify socket: {e}")),
        }
        agent.check_alive(fixture)?;
        if Instant::now() > deadline {
            return Err(format!(
                "ringfenced sent no READY=1 within {READY_LIMIT:?}; log:\n{}",
                fixture.log()
            ));
        }
    }
}

/// Seconds per clock tick (the unit of utime and stime).
fn clock_tick_s() -> Result<f64, String> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => Ok(1.0 / t as f64),
        other => Err(format!("cannot read the clock tick rate: {other:?}")),
    }
}

/// utime + stime of `pid`, in clock ticks, over all its threads.
fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_cpu_ticks(&text).ok_or_else(|| format!("{path}: no utime/stime in `{text}`"))
}

/// utime (field 14) + stime (field 15) of a /proc/PID/stat line. Fields are
/// counted after the command name, which is in parentheses and may hold spaces.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A `Vm*` line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, key: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse().ok())
        .ok_or_else(|| format!("{path}: no `{key}: N kB` line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
        let line = "42 (ring fenced) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(line), Some(12));
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
    }
}
