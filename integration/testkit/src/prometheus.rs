//! The real Prometheus and `promtool` (Debian's `prometheus` package;
//! `.ci/run` installs it) for the metrics tests of the agent and the
//! coordinator: a server of its own on loopback, its HTTP query API, the
//! shipped rules and dashboard (`packaging/prometheus/`) read as it runs
//! them, and `promtool check metrics` on a scrape.
//!
//! HTTP here is blocking HTTP/1.0 over `std::net` (one exchange per
//! connection): call it from a multi-threaded test runtime.
//!
//! Used by tests only: a failed step (Prometheus does not start, promtool
//! is missing its input) panics, failing the test that called it.
#![allow(clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `packaging/prometheus/` of this checkout.
pub fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/prometheus")
}

/// `name` from PATH, or `None` (the caller skips) outside CI; under
/// `CI=true` a missing tool panics.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "`{name}` is not installed: CI must install Debian's `prometheus` package (.ci/run does)"
        );
        eprintln!("SKIPPED: `{name}` is not installed (apt-get install prometheus)");
    }
    found
}

/// One HTTP/1.0 GET: status and body, or why it failed.
pub fn http_get(addr: SocketAddr, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {target} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// Percent-encoding of a query parameter.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A Prometheus server of its own (loopback port, data dir under `dir`);
/// killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    /// Where its HTTP API listens.
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Start `binary` with `config` (written to `dir/prometheus.yml`).
    pub fn start(binary: &Path, dir: &Path, config: &str) -> Self {
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = crate::net::free_loopback().expect("a free loopback port");
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("create prometheus.log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("start prometheus");
        Self { child, addr, log }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until `/-/ready` answers 200 (panics after `limit`, or if it exited).
    pub fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if matches!(http_get(self.addr, "/-/ready"), Ok((200, _))) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET an API path; its JSON.
    pub fn api(&self, target: &str) -> Value {
        let (status, body) =
            http_get(self.addr, target).unwrap_or_else(|e| panic!("{target}: {e}"));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {status} {body}"))
    }

    /// An instant query: `Ok(result vector)` or `Err(Prometheus's error)`.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let v = self.api(&format!("/api/v1/query?query={}", url_encode(promql)));
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The single value of `promql`, if it has exactly one series.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).ok()?;
        match r.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Alerts now: (alertname, state, labels).
    pub fn alerts(&self) -> Vec<(String, String, Value)> {
        let v = self.api("/api/v1/alerts");
        v["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                    a["state"].as_str().unwrap_or("").to_owned(),
                    a["labels"].clone(),
                )
            })
            .collect()
    }

    /// The query of every rule Prometheus loaded.
    pub fn rule_queries(&self) -> Vec<String> {
        let rules = self.api("/api/v1/rules");
        let mut out = Vec::new();
        for g in rules["data"]["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                if let Some(q) = r["query"].as_str() {
                    out.push(q.to_owned());
                }
            }
        }
        out
    }
}

/// The shipped alert rules with every `for:` set to 0s, so that an alert
/// fires at the first evaluation that sees its condition (the `for`
/// clauses themselves are covered by `promtool test rules`).
pub fn rules_without_for() -> String {
    std::fs::read_to_string(packaging().join("ringfence-alerts.yml"))
        .expect("read ringfence-alerts.yml")
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}for: 0s")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every PromQL expression of the shipped dashboard, with Grafana's
/// variables replaced as the dashboard's "All" does.
pub fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(packaging().join("ringfence-dashboard.json"))
        .expect("read ringfence-dashboard.json");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push(
                    e.replace("$__rate_interval", "1m")
                        .replace("$job", ".*")
                        .replace("$instance", ".*")
                        .replace("$wave", ".*"),
                );
            }
        }
    }
    out
}

/// Series only the coordinator's `--metrics-listen` endpoint exports.
pub const COORDINATOR_PREFIXES: [&str; 3] =
    ["ringfence_wave_", "ringfence_ring_", "ringfence_pool_"];

/// Whether `expr` reads a coordinator series.
pub fn on_coordinator_series(expr: &str) -> bool {
    COORDINATOR_PREFIXES.iter().any(|p| expr.contains(p))
}

/// `promtool check metrics` on a scrape (classic text): clean, or a panic
/// naming `what` with promtool's words and the scrape.
pub fn promtool_check_metrics(promtool: &Path, scrape: &str, what: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(scrape.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on the {what} scrape: {}\n{said}\nscrape:\n{scrape}",
        out.status
    );
}

/// `promtool ARGS` in `packaging/prometheus/`: clean, or a panic with its output.
pub fn promtool_in_packaging(promtool: &Path, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(packaging())
        .output()
        .expect("start promtool");
    assert!(
        out.status.success(),
        "promtool {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
