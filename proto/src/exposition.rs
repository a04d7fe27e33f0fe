//! The two exposition formats of one scrape. `prometheus-client` writes
//! OpenMetrics text; the classic Prometheus text format 0.0.4 carries the
//! same sample lines and differs only in family metadata: a counter family
//! is named with its `_total` suffix, an info family is a gauge named with
//! `_info`, and there are no `# UNIT` or `# EOF` lines. [`Format::Classic`]
//! rewrites just those metadata lines; samples pass through untouched.
//!
//! Shared by the agent's `/metrics` endpoint and the coordinator's
//! `--metrics-listen` (which must not link the agent): the formats, and the
//! one answer both give to an HTTP request ([`respond`]) over one HTTP/1.1
//! connection ([`serve_connection`]).

use std::convert::Infallible;
use std::fmt::Write;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::text::encode as encode_openmetrics;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where the series are served.
pub const PATH: &str = "/metrics";

/// OpenMetrics 1.0 text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Prometheus text format 0.0.4.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text` (what Prometheus asks for first).
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Classic,
}

impl Format {
    /// OpenMetrics when the `Accept` header lists it (with a non-zero
    /// quality), classic text otherwise.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let wants = accept.is_some_and(|a| {
            a.split(',').any(|item| {
                let mut parts = item.split(';').map(str::trim);
                let media = parts.next().unwrap_or("");
                let refused = parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants {
            Self::OpenMetrics
        } else {
            Self::Classic
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Self::Classic => CLASSIC_CONTENT_TYPE,
        }
    }
}

/// The registry's series in `format`.
pub fn encode(registry: &Registry, format: Format) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(16 * 1024);
    encode_openmetrics(&mut text, registry)?;
    Ok(match format {
        Format::OpenMetrics => text,
        Format::Classic => classic(&text),
    })
}

/// OpenMetrics text as produced by `prometheus-client` (each family: HELP,
/// TYPE, optional UNIT, samples) in the classic format.
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            if let Some((_, text)) = help.take() {
                let _ = writeln!(out, "# HELP {name}{suffix} {text}");
            }
            let _ = writeln!(out, "# TYPE {name}{suffix} {kind}");
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A plain-text answer with `status`.
fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to one request: 403 with `refused` when the peer may not
/// read metrics; 404 off [`PATH`]; 405 for anything but `GET`/`HEAD`; else
/// the series `encode` writes in the format the `Accept` header negotiates
/// (500 if encoding fails).
pub fn respond<B>(
    req: &Request<B>,
    refused: Option<&str>,
    encode: impl FnOnce(Format) -> Result<String, std::fmt::Error>,
) -> Response<Full<Bytes>> {
    if let Some(why) = refused {
        return text(StatusCode::FORBIDDEN, why.to_owned());
    }
    if req.uri().path() != PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found: metrics are at {PATH}\n"),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let format = Format::negotiate(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    match encode(format) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "metrics: encoding failed");
            text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
        }
    }
}

/// Serve one HTTP/1.1 connection with `answer` until the peer closes it; a
/// request head slower than `header_timeout` ends the connection.
pub async fn serve_connection<S, F>(io: S, header_timeout: Duration, answer: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let service = service_fn(move |req| {
        let r = answer(&req);
        async move { Ok::<_, Infallible>(r) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "metrics: connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::Unit;

    #[test]
    fn negotiation_follows_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Classic
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0")),
            Format::Classic
        );
    }

    fn registry() -> Registry {
        let mut r = Registry::default();
        let c: Counter = Counter::default();
        c.inc_by(3);
        r.register("rf_things", "Things done", c);
        let g: Gauge = Gauge::default();
        g.set(41);
        r.register_with_unit("rf_temp", "A temperature", Unit::Celsius, g);
        r.register("rf_build", "Build", Info::new(vec![("version", "1.2.3")]));
        let h = Histogram::new([1.0, 2.0]);
        h.observe(1.5);
        r.register_with_unit("rf_step", "Steps", Unit::Seconds, h);
        r
    }

    #[test]
    fn classic_renames_counter_and_info_families_and_keeps_samples() {
        let r = registry();
        let om = encode(&r, Format::OpenMetrics).unwrap();
        let text = encode(&r, Format::Classic).unwrap();
        assert!(om.contains("# TYPE rf_things counter\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(
            text.contains("# HELP rf_things_total Things done.\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE rf_things_total counter\n"), "{text}");
        assert!(text.contains("# TYPE rf_build_info gauge\n"), "{text}");
        assert!(text.contains("# TYPE rf_temp_celsius gauge\n"), "{text}");
        assert!(
            text.contains("# TYPE rf_step_seconds histogram\n"),
            "{text}"
        );
        assert!(
            !text.contains("# UNIT") && !text.contains("# EOF"),
            "{text}"
        );
        let samples = |s: &str| -> Vec<String> {
            s.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&om), samples(&text));
        assert!(text.contains("rf_things_total 3\n"), "{text}");
        assert!(
            text.contains("rf_build_info{version=\"1.2.3\"} 1\n"),
            "{text}"
        );
    }
}
