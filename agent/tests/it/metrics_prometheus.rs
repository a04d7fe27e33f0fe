//! The agent's `/metrics` endpoint as operators run it: the real
//! `ringfenced` on the fake NVML library, scraped by the real Prometheus and
//! checked by the real `promtool` (Debian's `prometheus` package; `.ci/run`
//! installs it). Without them these tests fail under `CI=true` and are
//! skipped, saying so, elsewhere.
//!
//! - the shipped rules pass `promtool check rules` and `promtool test rules`;
//! - Prometheus scrapes one agent over plain loopback HTTP (injected faults:
//!   an uncorrected ECC error and critical XID 79) and one over mTLS with a
//!   scheduler certificate; the values it stores equal GetHealth's; every
//!   expression of the shipped dashboard and alert rules parses and returns
//!   series (except those on coordinator series, which the coordinator's
//!   test runs); the host alerts fire for the faulty agent and for none
//!   other; `promtool check metrics` passes on both scrapes;
//! - over mTLS only scheduler and ops certificates may scrape;
//! - a scrape shows the report of the last health poll and queries no GPU.
use crate::proc_common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ringfence::pb::{self, TaskState};
use ringfence::spiffe::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use proc_common::*;
use ringfence_testkit::prometheus::{
    Prometheus, dashboard_exprs, on_coordinator_series, promtool_check_metrics,
    promtool_in_packaging, rules_without_for, tool,
};

/// The alerts the faulty agent must fire.
const HOST_ALERTS: [&str; 3] = [
    "RingfenceHostUnhealthy",
    "RingfenceCriticalXid",
    "RingfenceTasksRejected",
];

const LIMIT: Duration = Duration::from_secs(60);

// ------------------------------------------------------------------ HTTP

/// One HTTP/1.0 exchange (the server closes after the answer: no chunking).
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

async fn exchange<S>(mut s: S, method: &str, target: &str, accept: Option<&str>) -> Answer
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("{method} {target} HTTP/1.0\r\nHost: test\r\n{accept}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {raw:?}"));
    Answer {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, target: &str, accept: Option<&str>) -> Answer {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(tcp, "GET", target, accept).await
}

/// A TLS 1.3 client of `host`'s metrics endpoint, with `identity` (or no
/// client certificate).
fn tls_client(
    host: &Host,
    identity: Option<&ringfence::tls::ClientIdentity>,
    alpn: &[u8],
) -> tokio_rustls::TlsConnector {
    let config = match identity {
        Some(id) => (*id.client_config(&host.spiffe()).unwrap()).clone(),
        None => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(host.pki.ca_pem().as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
        }
    };
    let mut config = config;
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// GET /metrics over mTLS; `Err` when the handshake or the exchange fails.
async fn get_tls(
    host: &Host,
    addr: SocketAddr,
    identity: Option<&ringfence::tls::ClientIdentity>,
    accept: Option<&str>,
) -> Result<Answer, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(host.id.clone()).unwrap();
    let mut tls = tls_client(host, identity, b"http/1.1")
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n")
        .await
        .map_err(|e| e.to_string())?;
    if let Some(a) = accept {
        tls.write_all(format!("Accept: {a}\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
    }
    tls.write_all(b"\r\n").await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no answer: {raw:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {raw:?}"))?;
    Ok(Answer {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    })
}

/// Value of the sample `line_start` (name and labels exactly) in a scrape.
fn sample(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(line_start)?.strip_prefix(' ')?;
        rest.parse().ok()
    })
}

// ------------------------------------------------------------ the agents

/// A host whose agent.toml has a `[metrics]` table; returns the endpoint.
fn host_with_metrics(id: &str, scenario: &str, gpus: u32, tls: bool) -> (Host, SocketAddr) {
    let metrics = free_loopback();
    let host = Host::new(
        id,
        HostOpts {
            scenario,
            expected_gpus: gpus,
            extra: format!("\n[metrics]\nlisten = \"{metrics}\"\ntls = {tls}\n"),
            ..HostOpts::default()
        },
    );
    (host, metrics)
}

async fn wait_port(addr: SocketAddr, host: &Host) {
    poll(&format!("metrics endpoint {addr}"), START_LIMIT, || async {
        tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;
    assert!(!host.log().contains("cannot listen"), "{}", host.log());
}

async fn get_health(host: &Host, fresh: bool) -> pb::HealthReport {
    host.client()
        .await
        .get_health(pb::GetHealthRequest { fresh })
        .await
        .unwrap()
        .into_inner()
}

/// Four GPUs: an uncorrected ECC error on GPU 0, a throttle reason that
/// does not count in the verdict on GPU 1, critical XID 79 on GPU 2, one
/// active NVLink each.
const FAULTY: &str = r#"
[[gpu]]
ecc_volatile_uncorrected = 1
nvlinks = [{ active = true, replay_errors = 0, recovery_errors = 0, crc_flit_errors = 0 }]
[[gpu]]
throttle_reasons_mask = 4
nvlinks = [{ active = true, replay_errors = 0, recovery_errors = 0, crc_flit_errors = 0 }]
[[gpu]]
nvlinks = [{ active = true, replay_errors = 0, recovery_errors = 0, crc_flit_errors = 0 }]
[[gpu]]
nvlinks = [{ active = true, replay_errors = 0, recovery_errors = 0, crc_flit_errors = 0 }]
[[xid]]
gpu = 2
xid = 79
at_s = 0.0
"#;

/// `(PromQL selector, value)` for every series the report of `instance`
/// must have: the contract between GetHealth and /metrics, restated.
fn expected_series(r: &pb::HealthReport, instance: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let flag = |b: bool| f64::from(u8::from(b));
    for g in &r.gpus {
        let l = format!(
            r#"instance="{instance}",gpu="{}",uuid="{}""#,
            g.index, g.uuid
        );
        let mut put = |name: &str, extra: &str, v: Option<f64>| {
            if let Some(v) = v {
                out.push((format!("{name}{{{l}{extra}}}"), v));
            }
        };
        put(
            "ringfence_gpu_temperature_celsius",
            "",
            g.temperature_c.map(f64::from),
        );
        put(
            "ringfence_gpu_slowdown_temperature_celsius",
            "",
            g.temperature_slowdown_c.map(f64::from),
        );
        put(
            "ringfence_gpu_shutdown_temperature_celsius",
            "",
            g.temperature_shutdown_c.map(f64::from),
        );
        put(
            "ringfence_gpu_power_usage_watts",
            "",
            g.power_usage_mw.map(|w| f64::from(w) / 1000.0),
        );
        put(
            "ringfence_gpu_power_limit_watts",
            "",
            g.power_limit_mw.map(|w| f64::from(w) / 1000.0),
        );
        for (scope, kind, v) in [
            ("volatile", "corrected", g.ecc_volatile_corrected),
            ("volatile", "uncorrected", g.ecc_volatile_uncorrected),
            ("aggregate", "corrected", g.ecc_aggregate_corrected),
            ("aggregate", "uncorrected", g.ecc_aggregate_uncorrected),
        ] {
            put(
                "ringfence_gpu_ecc_errors_total",
                &format!(r#",scope="{scope}",kind="{kind}""#),
                v.map(|n| n as f64),
            );
        }
        put(
            "ringfence_gpu_retired_pages",
            r#",cause="single_bit_ecc""#,
            g.retired_pages_single_bit.map(f64::from),
        );
        put(
            "ringfence_gpu_retired_pages",
            r#",cause="double_bit_ecc""#,
            g.retired_pages_double_bit.map(f64::from),
        );
        put(
            "ringfence_gpu_retired_pages_pending",
            "",
            g.retired_pages_pending.map(flag),
        );
        put(
            "ringfence_gpu_remapped_rows",
            r#",kind="correctable""#,
            g.remapped_rows_correctable.map(f64::from),
        );
        put(
            "ringfence_gpu_remapped_rows",
            r#",kind="uncorrectable""#,
            g.remapped_rows_uncorrectable.map(f64::from),
        );
        put(
            "ringfence_gpu_remapped_rows_pending",
            "",
            g.remapped_rows_pending.map(flag),
        );
        put(
            "ringfence_gpu_remapped_rows_failure",
            "",
            g.remapped_rows_failure.map(flag),
        );
        put(
            "ringfence_gpu_pcie_link_generation",
            "",
            g.pcie_link_gen_current.map(f64::from),
        );
        put(
            "ringfence_gpu_pcie_link_max_generation",
            "",
            g.pcie_link_gen_max.map(f64::from),
        );
        put(
            "ringfence_gpu_pcie_link_width_lanes",
            "",
            g.pcie_link_width_current.map(f64::from),
        );
        put(
            "ringfence_gpu_pcie_link_max_width_lanes",
            "",
            g.pcie_link_width_max.map(f64::from),
        );
        put(
            "ringfence_gpu_pcie_replays_total",
            "",
            g.pcie_replay_counter.map(|n| n as f64),
        );
        for reason in &g.throttle_reasons {
            put(
                "ringfence_gpu_throttle_reason_active",
                &format!(r#",reason="{reason}""#),
                Some(1.0),
            );
        }
        for link in &g.nvlinks {
            put(
                "ringfence_gpu_nvlink_active",
                &format!(r#",link="{}""#, link.link),
                Some(flag(link.active)),
            );
        }
        let mut xids: BTreeMap<u64, f64> = BTreeMap::new();
        for x in g.xids.iter().filter(|x| x.boot_id == r.boot_id) {
            *xids.entry(x.xid).or_default() += 1.0;
        }
        for (xid, n) in xids {
            put(
                "ringfence_gpu_xid_events_total",
                &format!(r#",xid="{xid}""#),
                Some(n),
            );
        }
    }
    let verdict = pb::Verdict::try_from(r.verdict).unwrap();
    for v in [
        pb::Verdict::Healthy,
        pb::Verdict::Degraded,
        pb::Verdict::Unhealthy,
    ] {
        let name = v
            .as_str_name()
            .trim_start_matches("VERDICT_")
            .to_ascii_lowercase();
        out.push((
            format!(r#"ringfence_host_verdict{{instance="{instance}",verdict="{name}"}}"#),
            flag(v == verdict),
        ));
    }
    let mut reasons: BTreeMap<String, f64> = BTreeMap::new();
    for x in &r.reasons {
        let sev = pb::Verdict::try_from(x.severity)
            .unwrap()
            .as_str_name()
            .trim_start_matches("VERDICT_")
            .to_ascii_lowercase();
        let gpu = if x.gpu_index < 0 {
            String::new()
        } else {
            x.gpu_index.to_string()
        };
        *reasons
            .entry(format!(
                r#"ringfence_host_reasons{{instance="{instance}",code="{}",verdict="{sev}",gpu="{gpu}",uuid="{}"}}"#,
                x.code, x.gpu_uuid
            ))
            .or_default() += 1.0;
    }
    out.extend(reasons);
    out.push((
        format!(r#"ringfence_host_draining{{instance="{instance}"}}"#),
        flag(r.draining),
    ));
    out.push((
        format!(r#"ringfence_host_gpus_found{{instance="{instance}"}}"#),
        f64::from(r.gpus_found),
    ));
    out.push((
        format!(r#"ringfence_host_gpus_expected{{instance="{instance}"}}"#),
        f64::from(r.gpus_expected),
    ));
    out.push((
        format!(
            r#"ringfence_build_info{{instance="{instance}",driver_version="{}",cuda_driver_version="{}"}}"#,
            r.driver_version, r.cuda_driver_version
        ),
        1.0,
    ));
    out
}

// ------------------------------------------------------------------ tests

#[test]
fn promtool_passes_the_shipped_rules_and_their_unit_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    promtool_in_packaging(&promtool, &["check", "rules", "ringfence-alerts.yml"]);
    promtool_in_packaging(&promtool, &["test", "rules", "ringfence-alerts.test.yml"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_agents_alerts_fire_and_every_shipped_expression_answers() {
    let (Some(prometheus), Some(promtool)) = (tool("prometheus"), tool("promtool")) else {
        return;
    };
    let (faulty, faulty_metrics) = host_with_metrics("gpu-met-a", FAULTY, 4, false);
    let (healthy, healthy_metrics) = host_with_metrics("gpu-met-b", "[[gpu]]\n[[gpu]]\n", 2, true);
    let mut a = faulty.spawn();
    let mut b = healthy.spawn();
    faulty.wait_listening(&mut a).await;
    healthy.wait_listening(&mut b).await;
    wait_port(faulty_metrics, &faulty).await;
    wait_port(healthy_metrics, &healthy).await;

    // The injected faults are in the agent's verdict.
    let report = poll(
        "GetHealth shows the ECC error and XID 79",
        LIMIT,
        || async {
            let r = get_health(&faulty, false).await;
            let codes = reason_codes(&r);
            (codes.contains(&("xid_critical".into(), 2))
                && codes.contains(&("ecc_uncorrected_volatile".into(), 0)))
            .then_some(r)
        },
    )
    .await;
    assert_eq!(report.verdict, pb::Verdict::Unhealthy as i32);
    assert_eq!(
        get_health(&healthy, false).await.verdict,
        pb::Verdict::Healthy as i32
    );

    // A task that ran (step durations, tasks by state).
    let mut client = faulty.client().await;
    client
        .submit_task(faulty.task("d1", 1, drain("metrics test")))
        .await
        .unwrap();
    wait_task(&mut client, "d1", TaskState::Succeeded, LIMIT).await;

    // Prometheus: the plain agent, and the mTLS one with a scheduler certificate.
    let dir = tempfile::tempdir().unwrap();
    let sched = healthy.pki.issue(Role::Scheduler, "prometheus").unwrap();
    std::fs::write(dir.path().join("ca.pem"), healthy.pki.ca_pem()).unwrap();
    std::fs::write(dir.path().join("scheduler.pem"), &sched.cert_pem).unwrap();
    std::fs::write(dir.path().join("scheduler.key"), &sched.key_pem).unwrap();
    std::fs::write(dir.path().join("rules.yml"), rules_without_for()).unwrap();
    let d = dir.path().display();
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: ["{d}/rules.yml"]
scrape_configs:
  - job_name: ringfenced
    static_configs: [{{ targets: ["{faulty_metrics}"] }}]
  - job_name: ringfenced-mtls
    scheme: https
    tls_config:
      ca_file: {d}/ca.pem
      cert_file: {d}/scheduler.pem
      key_file: {d}/scheduler.key
      server_name: {healthy_id}
    static_configs: [{{ targets: ["{healthy_metrics}"] }}]
"#,
        healthy_id = healthy.id,
    );
    let mut prom = Prometheus::start(&prometheus, dir.path(), &config);
    prom.wait_ready(START_LIMIT);
    let fa = faulty_metrics.to_string();
    let he = healthy_metrics.to_string();
    for (job, inst) in [("ringfenced", &fa), ("ringfenced-mtls", &he)] {
        let q = format!(r#"up{{job="{job}",instance="{inst}"}}"#);
        poll(&format!("{q} == 1"), LIMIT, || async {
            (prom.value(&q) == Some(1.0)).then_some(())
        })
        .await;
    }
    // The rejection counters were scraped at zero: a rejection is an increase.
    let q = format!(
        r#"count_over_time(ringfence_task_rejections_total{{instance="{fa}",check="sequence"}}[1m])"#
    );
    poll("two scrapes of the rejection counters", LIMIT, || async {
        prom.value(&q).filter(|n| *n >= 2.0).map(|_| ())
    })
    .await;
    // A replayed sequence number, and a TLS client of another CA.
    let err = client
        .submit_task(faulty.task("d2", 1, drain("replayed sequence")))
        .await
        .unwrap_err();
    assert!(err.message().contains("sequence"), "{err}");
    let stranger = ringfence::pki::TestPki::new(TRUST_DOMAIN).unwrap();
    let stranger = stranger.issue(Role::Ops, "stranger").unwrap();
    let stranger = ringfence::tls::ClientIdentity::from_pem(
        stranger.cert_pem.as_bytes(),
        stranger.key_pem.as_bytes(),
        faulty.pki.ca_pem().as_bytes(),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(faulty.listen).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(faulty.id.clone()).unwrap();
    if let Ok(mut tls) = tls_client(&faulty, Some(&stranger), b"h2")
        .connect(name, tcp)
        .await
    {
        let mut buf = [0u8; 16];
        assert!(
            !matches!(tls.read(&mut buf).await, Ok(n) if n > 0),
            "the agent talked to a client of another CA"
        );
    }

    // Values equal GetHealth's.
    let report = get_health(&faulty, false).await;
    assert!(report.draining, "the drain ran");
    let expected = expected_series(&report, &fa);
    assert!(expected.len() > 80, "{}", expected.len());
    for (selector, want) in &expected {
        poll(&format!("{selector} == {want}"), LIMIT, || async {
            (prom.value(selector) == Some(*want)).then_some(())
        })
        .await;
    }
    let q = format!(r#"ringfence_tasks_total{{instance="{fa}",action="drain",state="succeeded"}}"#);
    assert_eq!(prom.value(&q), Some(1.0));
    let q = format!(r#"ringfence_task_rejections_total{{instance="{fa}",check="sequence"}}"#);
    poll(&q, LIMIT, || async {
        (prom.value(&q) == Some(1.0)).then_some(())
    })
    .await;
    let q =
        format!(r#"ringfence_tls_handshake_failures_total{{instance="{fa}",reason="unknown_ca"}}"#);
    poll(&q, LIMIT, || async {
        prom.value(&q).filter(|n| *n >= 1.0).map(|_| ())
    })
    .await;

    // Every dashboard and alert expression parses and (except those on
    // coordinator series) returns series.
    let rules = prom.api("/api/v1/rules");
    let mut alert_exprs = Vec::new();
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            alert_exprs.push(r["query"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(alert_exprs.len(), 5, "{rules}");
    let dashboard = dashboard_exprs();
    assert!(
        dashboard.len() >= 20,
        "only {} dashboard expressions",
        dashboard.len()
    );
    let exprs: Vec<String> = dashboard.into_iter().chain(alert_exprs).collect();
    let mut exempt = Vec::new();
    for e in &exprs {
        if on_coordinator_series(e) {
            prom.query(e)
                .unwrap_or_else(|err| panic!("`{e}` does not parse: {err}"));
            exempt.push(e.clone());
            continue;
        }
        poll(&format!("`{e}` returns series"), LIMIT, || async {
            match prom.query(e) {
                Ok(r) if !r.is_empty() => Some(()),
                Ok(_) => None,
                Err(err) => panic!("`{e}` does not parse: {err}"),
            }
        })
        .await;
    }
    assert_eq!(exempt.len(), 14, "{exempt:#?}");

    // The host alerts fire for the faulty agent, and nothing for the healthy one.
    let firing = poll("the host alerts fire", LIMIT, || async {
        let v = prom.api("/api/v1/alerts");
        let alerts: Vec<(String, String, String)> = v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                    a["labels"]["instance"].as_str().unwrap_or("").to_owned(),
                    a["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        HOST_ALERTS
            .iter()
            .all(|name| alerts.contains(&((*name).into(), fa.clone(), "firing".into())))
            .then_some(alerts)
    })
    .await;
    assert!(
        firing.iter().all(|(_, inst, _)| *inst == fa),
        "only the faulty agent alerts: {firing:?}"
    );
    let v = prom.api("/api/v1/alerts");
    let xid = v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "RingfenceCriticalXid")
        .unwrap();
    assert_eq!(xid["labels"]["gpu"], "2", "{xid}");
    assert_eq!(xid["labels"]["host_id"], "gpu-met-a", "{xid}");

    // promtool lints both scrapes (classic text, as promtool reads).
    let plain = get(faulty_metrics, "/metrics", None).await;
    assert_eq!(plain.status, 200);
    promtool_check_metrics(&promtool, &plain.body, "plain");
    let sched_id = ringfence::tls::ClientIdentity::from_pem(
        sched.cert_pem.as_bytes(),
        sched.key_pem.as_bytes(),
        healthy.pki.ca_pem().as_bytes(),
    )
    .unwrap();
    let over_tls = get_tls(&healthy, healthy_metrics, Some(&sched_id), None)
        .await
        .unwrap();
    assert_eq!(over_tls.status, 200, "{}", over_tls.body);
    promtool_check_metrics(&promtool, &over_tls.body, "mTLS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_over_mtls_need_a_scheduler_or_ops_certificate() {
    let (host, metrics) = host_with_metrics("gpu-met-tls", "[[gpu]]\n", 1, true);
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    wait_port(metrics, &host).await;
    let om = Some("application/openmetrics-text; version=1.0.0");

    let scheduler = get_tls(&host, metrics, Some(&host.scheduler), om)
        .await
        .unwrap();
    assert_eq!(scheduler.status, 200, "{}", scheduler.body);
    assert!(
        scheduler
            .headers
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{}",
        scheduler.headers
    );
    assert!(scheduler.body.ends_with("# EOF\n"));
    let ops = get_tls(&host, metrics, Some(&host.ops), None)
        .await
        .unwrap();
    assert_eq!(ops.status, 200, "{}", ops.body);
    assert!(
        ops.headers.contains("text/plain; version=0.0.4"),
        "{}",
        ops.headers
    );

    // Another host's certificate: a valid identity of the fleet, refused.
    let other = host.pki.issue(Role::Host, "gpu-other").unwrap();
    let other = ringfence::tls::ClientIdentity::from_pem(
        other.cert_pem.as_bytes(),
        other.key_pem.as_bytes(),
        host.pki.ca_pem().as_bytes(),
    )
    .unwrap();
    let refused = get_tls(&host, metrics, Some(&other), None).await.unwrap();
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(refused.body.contains("role `host`"), "{}", refused.body);
    assert!(!refused.body.contains("ringfence_"), "{}", refused.body);

    // No client certificate, and plain HTTP on the TLS port: no metrics.
    assert!(get_tls(&host, metrics, None, None).await.is_err());
    let plain = tokio::net::TcpStream::connect(metrics).await.unwrap();
    let mut plain = plain;
    plain
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut back = Vec::new();
    let _ = plain.read_to_end(&mut back).await;
    assert!(
        !String::from_utf8_lossy(&back).contains("ringfence_"),
        "plain HTTP got metrics"
    );

    // Both failures are counted by reason.
    poll("the refusals are counted", LIMIT, || async {
        let s = get_tls(&host, metrics, Some(&host.scheduler), None)
            .await
            .ok()?
            .body;
        let n = |reason: &str| {
            sample(
                &s,
                &format!(r#"ringfence_tls_handshake_failures_total{{reason="{reason}"}}"#),
            )
            .unwrap_or(0.0)
        };
        (n("no_client_certificate") >= 1.0 && n("protocol") >= 1.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_shows_the_last_polled_report_and_queries_no_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let version_file = dir.path().join("driver-version");
    std::fs::write(&version_file, "550.54.15\n").unwrap();
    let scenario = format!(
        "driver_version_file = \"{}\"\n[[gpu]]\n",
        version_file.display()
    );
    let (host, metrics) = host_with_metrics("gpu-met-cache", &scenario, 1, false);
    // One poll an hour: after the start, only a fresh GetHealth reads NVML.
    let path = host.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("poll_interval_s = 1\n"));
    std::fs::write(
        &path,
        text.replace("poll_interval_s = 1\n", "poll_interval_s = 3600\n"),
    )
    .unwrap();
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    wait_port(metrics, &host).await;

    // The start's collections are over once the cached report stops changing.
    let mut last = get_health(&host, false).await.collected_at_unix_ms;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = get_health(&host, false).await.collected_at_unix_ms;
        if now == last {
            break;
        }
        last = now;
    }
    let driver = |text: &str, v: &str| {
        sample(
            text,
            &format!(
                r#"ringfence_build_info{{version="{}",driver_version="{v}",cuda_driver_version="12.4"}}"#,
                ringfence::VERSION
            ),
        ) == Some(1.0)
    };
    let stamp = |text: &str| sample(text, "ringfence_health_report_timestamp_seconds");

    // The driver changes underneath; scrapes keep showing the polled report.
    std::fs::write(&version_file, "560.35.3\n").unwrap();
    for _ in 0..5 {
        let s = get(metrics, "/metrics", None).await;
        assert_eq!(s.status, 200);
        assert!(driver(&s.body, "550.54.15"), "{}", s.body);
        assert_eq!(stamp(&s.body), Some(last as f64 / 1000.0), "{}", s.body);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(get_health(&host, false).await.driver_version, "550.54.15");
    // NVML says so when asked; the scrape follows the newly published report.
    assert_eq!(get_health(&host, true).await.driver_version, "560.35.3");
    let s = get(metrics, "/metrics", None).await;
    assert!(driver(&s.body, "560.35.3"), "{}", s.body);
    assert!(stamp(&s.body) > Some(last as f64 / 1000.0));

    // Only GET /metrics.
    assert_eq!(get(metrics, "/", None).await.status, 404);
    let tcp = tokio::net::TcpStream::connect(metrics).await.unwrap();
    let post = exchange(tcp, "POST", "/metrics", None).await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    assert_eq!(
        s.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
}
