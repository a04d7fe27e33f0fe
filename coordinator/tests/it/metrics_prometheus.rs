//! The coordinator's `--metrics-listen` endpoint as operators run it: the
//! real `ringfence wave run` driving a fleet of real `ringfenced` processes
//! (fake NVML), scraped by the real Prometheus together with the canary
//! agent's own `/metrics`, and checked by the real `promtool` (Debian's
//! `prometheus` package; `.ci/run` installs it). Without them the test fails
//! under `CI=true` and is skipped, saying so, elsewhere.
//!
//! The wave stops at protected ring 2 awaiting approval: the values
//! Prometheus stores equal the wave's status snapshot (`wave status
//! --json`). Approved, ring 2's canary fails validation (uncorrected ECC
//! after the patch), then raises XID 79, and the wave halts:
//! `ringfence_wave_halted` is 1; the shipped "wave halted", "pool at its
//! reserve", "host unhealthy" and "critical XID" alerts fire (the last two
//! for the canary, as GetHealth reports it); every expression of the
//! shipped dashboard and rules on coordinator series returns series, and
//! `promtool check metrics` passes on the scrapes. A taken address fails
//! `wave run` and `wave resume` before anything is drained; `wave resume`
//! (the canary skipped) serves the resumed wave's series.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Coordinator, health, host, is, journal, pacing, start};
use ringfence_coordinator::metrics::{HOST_STATES, RING_STATES};
use ringfence_coordinator::wave::StatusSnapshot;
use ringfence_devfleet::local_fleet::{self, LocalFleet};
use ringfence_testkit::prometheus::{
    Prometheus, dashboard_exprs, http_get, on_coordinator_series, promtool_check_metrics,
    promtool_in_packaging, rules_without_for, tool,
};

const LIMIT: Duration = Duration::from_secs(90);
const WAVE: &str = "metrics-wave";
const POOL: &str = "h100-train";

/// Poll `f` until it returns `Some` (panics after `limit`, naming `what`).
async fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `ringfence wave status --wave WAVE --json`, as an operator reads it.
fn wave_status(f: &LocalFleet) -> Option<StatusSnapshot> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringfence"))
        .arg("--config")
        .arg(&f.settings)
        .args(["wave", "status", "--wave", WAVE, "--json"])
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// `(PromQL selector, value)` for every series the snapshot determines.
fn expected_series(s: &StatusSnapshot) -> Vec<(String, f64)> {
    let w = format!(r#"wave_id="{}""#, s.wave_id);
    let flag = |b: bool| f64::from(u8::from(b));
    let mut out = vec![
        (
            format!(r#"ringfence_wave_phase{{{w},phase="{}"}}"#, s.phase),
            1.0,
        ),
        (
            format!("ringfence_wave_failed_hosts{{{w}}}"),
            f64::from(s.failures.0),
        ),
        (
            format!("ringfence_wave_failure_budget_hosts{{{w}}}"),
            f64::from(s.failures.1),
        ),
        (
            format!("ringfence_wave_halted{{{w}}}"),
            flag(s.halt.is_some() || s.phase == "halted"),
        ),
    ];
    if let Some(r) = s.ring {
        out.push((format!("ringfence_wave_current_ring{{{w}}}"), f64::from(r)));
    }
    for (r, v) in &s.rings {
        for st in HOST_STATES {
            let n = v.counts.get(st).copied().unwrap_or(0);
            out.push((
                format!(r#"ringfence_wave_hosts{{{w},ring="{r}",state="{st}"}}"#),
                n as f64,
            ));
        }
        for st in RING_STATES {
            out.push((
                format!(r#"ringfence_ring_state{{{w},ring="{r}",state="{st}"}}"#),
                flag(v.status == st),
            ));
        }
        out.push((
            format!(r#"ringfence_ring_awaiting_approval{{{w},ring="{r}"}}"#),
            flag(v.approval == "AWAITING_APPROVAL"),
        ));
    }
    for (p, (n, limit)) in &s.pools {
        out.push((
            format!(r#"ringfence_pool_out_of_service_hosts{{{w},pool="{p}"}}"#),
            *n as f64,
        ));
        out.push((
            format!(r#"ringfence_pool_reserve_hosts{{{w},pool="{p}"}}"#),
            *limit as f64,
        ));
    }
    out
}

/// Every series of `snapshot` has its value in Prometheus.
async fn prometheus_agrees(prom: &Prometheus, snapshot: &StatusSnapshot) -> usize {
    let expected = expected_series(snapshot);
    for (selector, want) in &expected {
        poll(&format!("{selector} == {want}"), LIMIT, || {
            (prom.value(selector) == Some(*want)).then_some(())
        })
        .await;
    }
    expected.len()
}

/// One classic-text scrape of the coordinator (what promtool reads): body,
/// time taken.
fn scrape(addr: SocketAddr) -> (String, Duration) {
    let t = Instant::now();
    let (status, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    (body, t.elapsed())
}

fn wave_run(f: &LocalFleet, spec: &Path, metrics: SocketAddr) -> Coordinator {
    let metrics = metrics.to_string();
    Coordinator::spawn(
        f,
        &[
            "wave",
            "run",
            "--inventory",
            f.inventory.to_str().unwrap(),
            "--spec",
            spec.to_str().unwrap(),
            "--json",
            "--metrics-listen",
            &metrics,
            "--metrics-linger",
            "300",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_follows_a_wave_to_its_halt_and_the_shipped_alerts_fire() {
    let (Some(prometheus), Some(promtool)) = (tool("prometheus"), tool("promtool")) else {
        return;
    };
    promtool_in_packaging(&promtool, &["check", "rules", "ringfence-alerts.yml"]);
    promtool_in_packaging(&promtool, &["test", "rules", "ringfence-alerts.test.yml"]);

    // Five hosts in one pool whose reserve lets one be out of service; the
    // new driver brings uncorrected ECC errors on gpu-03 (ring 2).
    let dir = tempfile::tempdir().unwrap();
    let mut specs = vec![
        host("gpu-00", 0, POOL),
        host("gpu-01", 1, POOL),
        host("gpu-02", 2, POOL),
        host("gpu-03", 2, POOL),
        host("gpu-04", 3, POOL),
    ];
    specs[3].faulty_version = Some(local_fleet::NEW_VERSION.to_string());
    specs[3].xid_trigger = true;
    let mut f = start(dir.path(), specs, &[(POOL, 20)]).await;
    // The canary's agent serves its own metrics.
    let canary_metrics = ringfence_testkit::net::free_loopback().unwrap();
    let canary_dir = f.hosts[3].dir.clone();
    let cfg = canary_dir.join("agent.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("\n[metrics]\nlisten = \"{canary_metrics}\"\n"));
    std::fs::write(&cfg, text).unwrap();
    f.restart("gpu-03").await.unwrap();
    let spec = f.write_spec(WAVE, &pacing(2)).unwrap();

    // An address already taken: the command says so and drains nothing.
    let taken =
        std::net::TcpListener::bind(ringfence_testkit::net::free_loopback().unwrap()).unwrap();
    let (code, stderr) = wave_run(&f, &spec, taken.local_addr().unwrap())
        .finish(LIMIT)
        .await;
    assert_eq!(
        code, 3,
        "a taken metrics address is a usage error: {stderr}"
    );
    assert!(
        stderr.contains("--metrics-listen") && stderr.contains("cannot listen"),
        "{stderr}"
    );
    assert!(journal(&f, "gpu-00").await.is_empty(), "nothing drained");
    assert!(wave_status(&f).is_none(), "the wave never started");
    drop(taken);

    // The wave runs rings 0 and 1, then waits for ring 2's approvals.
    let addr = ringfence_testkit::net::free_loopback().unwrap();
    let mut c = wave_run(&f, &spec, addr);
    c.until(LIMIT, |e| is(e, "ring", Some("promoted")) && e["ring"] == 1)
        .await
        .expect("ring 1 promoted");
    let waiting = poll("the wave awaits ring 2's approvals", LIMIT, || {
        wave_status(&f).filter(|s| s.phase == "awaiting_approval")
    })
    .await;

    let pdir = tempfile::tempdir().unwrap();
    std::fs::write(pdir.path().join("rules.yml"), rules_without_for()).unwrap();
    let config = format!(
        r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: ["{d}/rules.yml"]
scrape_configs:
  - job_name: ringfence-wave
    static_configs: [{{ targets: ["{addr}"] }}]
  - job_name: ringfenced
    static_configs: [{{ targets: ["{canary_metrics}"] }}]
"#,
        d = pdir.path().display()
    );
    let mut prom = Prometheus::start(&prometheus, pdir.path(), &config);
    prom.wait_ready(LIMIT);
    for (job, inst) in [("ringfence-wave", addr), ("ringfenced", canary_metrics)] {
        let up = format!(r#"up{{job="{job}",instance="{inst}"}}"#);
        poll(&format!("{up} == 1"), LIMIT, || {
            (prom.value(&up) == Some(1.0)).then_some(())
        })
        .await;
    }

    // Mid-wave: Prometheus holds what `wave status` says.
    let w = format!(r#"wave_id="{WAVE}""#);
    assert_eq!(waiting.rings[&2].approval, "AWAITING_APPROVAL");
    assert_eq!(waiting.rings[&0].counts.get("done"), Some(&1));
    let n = prometheus_agrees(&prom, &waiting).await;
    assert!(n > 40, "{n} series compared");
    assert_eq!(
        prom.value(&format!(
            r#"ringfence_ring_awaiting_approval{{{w},ring="2"}}"#
        )),
        Some(1.0)
    );
    assert_eq!(
        prom.value(&format!("ringfence_wave_halted{{{w}}}")),
        Some(0.0)
    );
    let (mid, took) = scrape(addr);
    eprintln!(
        "mid-wave scrape: {} bytes, {} lines, {took:?}",
        mid.len(),
        mid.lines().count()
    );
    promtool_check_metrics(&promtool, &mid, "mid-wave");
    let firing = prom.alerts();
    assert!(
        firing.is_empty(),
        "nothing alerts before ring 2: {firing:?}"
    );

    // Approved, ring 2 starts; gpu-03 fails validation and the wave halts.
    common::approve_all(&f, &spec);
    c.until(LIMIT, |e| is(e, "halting", None))
        .await
        .expect("the wave halts");
    let halted = poll("the halted snapshot", LIMIT, || {
        wave_status(&f).filter(|s| s.phase == "halted")
    })
    .await;
    let halt = halted.halt.clone().expect("a halt report");
    assert_eq!(halt.host.as_deref(), Some("gpu-03"), "{halt:?}");
    // The command has ended the wave and serves its final state.
    let q = format!("ringfence_wave_halted{{{w}}}");
    poll(&format!("{q} == 1"), LIMIT, || {
        (prom.value(&q) == Some(1.0)).then_some(())
    })
    .await;
    prometheus_agrees(&prom, &halted).await;
    assert_eq!(
        prom.value(&format!("ringfence_wave_halts_total{{{w}}}")),
        Some(1.0)
    );
    let q = format!(
        r#"ringfence_wave_halt_info{{{w},host="gpu-03",kind="{}"}}"#,
        halt.kind.as_str()
    );
    assert_eq!(prom.value(&q), Some(1.0), "{q}");
    // Every host run timed its steps; the canary's validation failed it.
    let steps = |step: &str, result: &str| {
        prom.value(&format!(
            r#"ringfence_wave_step_duration_seconds_count{{{w},step="{step}",result="{result}"}}"#
        ))
    };
    assert_eq!(steps("validating", "failed"), Some(1.0));
    let patched = steps("patching", "advanced").unwrap_or(0.0);
    assert!((3.0..=4.0).contains(&patched), "{patched} patches timed");
    assert!(steps("draining", "advanced") >= Some(3.0));

    // The failed canary is UNHEALTHY and left drained, as its agent says;
    // then its GPU 0 falls off the bus (XID 79).
    std::fs::write(canary_dir.join(local_fleet::XID_TRIGGER_FILE), "").unwrap();
    let deadline = Instant::now() + LIMIT;
    let report = loop {
        let r = health(&f, "gpu-03").await;
        if r.reasons.iter().any(|x| x.code == "xid_critical") {
            break r;
        }
        assert!(Instant::now() < deadline, "no XID 79 in {:?}", r.reasons);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(report.draining, "the failed canary stays drained");
    assert_eq!(report.verdict, ringfence::pb::Verdict::Unhealthy as i32);
    let c3 = format!(r#"instance="{canary_metrics}""#);
    for (selector, want) in [
        (
            format!(r#"ringfence_host_verdict{{{c3},verdict="unhealthy"}}"#),
            1.0,
        ),
        (format!("ringfence_host_draining{{{c3}}}"), 1.0),
        (
            format!("count(ringfence_host_reasons{{{c3}}})"),
            report.reasons.len() as f64,
        ),
    ] {
        poll(&format!("{selector} == {want}"), LIMIT, || {
            (prom.value(&selector) == Some(want)).then_some(())
        })
        .await;
    }

    // The shipped alerts fire: the wave halted, the failed canary left
    // drained holds the pool at its reserve, and the canary itself is
    // UNHEALTHY with a critical XID.
    let alerts = poll("the shipped alerts fire", LIMIT, || {
        let a = prom.alerts();
        let on = |name: &str, key: &str, value: &str| {
            a.iter()
                .any(|(n, state, l)| n == name && state == "firing" && l[key] == value)
        };
        (on("RingfenceWaveHalted", "wave_id", WAVE)
            && on("RingfencePoolAtReserve", "wave_id", WAVE)
            && on("RingfenceHostUnhealthy", "host_id", "gpu-03")
            && on("RingfenceCriticalXid", "host_id", "gpu-03"))
        .then_some(a)
    })
    .await;
    // Only the pool with a host out: the inventory's other pool has no
    // host in the wave (a reserve of 0, none out).
    assert!(
        alerts
            .iter()
            .filter(|(n, _, _)| n == "RingfencePoolAtReserve")
            .all(|(_, _, l)| l["pool"] == POOL),
        "{alerts:?}"
    );
    let names: std::collections::BTreeSet<&str> =
        alerts.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "RingfenceCriticalXid",
            "RingfenceHostUnhealthy",
            "RingfencePoolAtReserve",
            "RingfenceWaveHalted"
        ],
        "{alerts:?}"
    );

    // Every expression of the shipped dashboard and rules on coordinator
    // series parses and returns series.
    let exprs: Vec<String> = dashboard_exprs()
        .into_iter()
        .chain(prom.rule_queries())
        .filter(|e| on_coordinator_series(e))
        .collect();
    assert!(exprs.len() >= 14, "{exprs:#?}");
    for e in &exprs {
        poll(&format!("`{e}` returns series"), LIMIT, || {
            match prom.query(e) {
                Ok(r) if !r.is_empty() => Some(()),
                Ok(_) => None,
                Err(err) => panic!("`{e}` does not parse: {err}"),
            }
        })
        .await;
    }

    let (end, took) = scrape(addr);
    eprintln!(
        "halted-wave scrape: {} bytes, {} lines, {took:?}",
        end.len(),
        end.lines().count()
    );
    promtool_check_metrics(&promtool, &end, "halted-wave");

    // Ctrl-C ends the linger; the command exits as a halted wave does.
    interrupt(&c);
    let (code, stderr) = c.finish(LIMIT).await;
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("serving its final state") && stderr.contains("HALTED in ring 2"),
        "{stderr}"
    );
    drop(prom);

    // `wave resume` serves the same endpoint, bound first: a taken address
    // leaves the halted wave as it was.
    let tasks_before = tasks_of(&f, &["gpu-02", "gpu-04"]).await;
    let taken =
        std::net::TcpListener::bind(ringfence_testkit::net::free_loopback().unwrap()).unwrap();
    let (code, stderr) = wave_resume(&f, taken.local_addr().unwrap())
        .finish(LIMIT)
        .await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert_eq!(wave_status(&f).unwrap().phase, "halted");
    assert_eq!(
        tasks_of(&f, &["gpu-02", "gpu-04"]).await,
        tasks_before,
        "the refused resume sent nothing"
    );
    drop(taken);
    // Resumed with the canary skipped: left drained, it holds the pool at
    // its reserve, so once ring 2 is through no host of ring 3 can start and
    // the resumed wave halts as stalled (the sequencer's rule). The series
    // are the resumed process's own: the skip, and one halt — its stall,
    // not the canary's failure that the first process counted.
    let addr = ringfence_testkit::net::free_loopback().unwrap();
    let c = wave_resume(&f, addr);
    let w = format!(r#"wave_id="{WAVE}""#);
    let resumed = poll("the resumed wave's stall", LIMIT, || {
        let (status, body) = http_get(addr, "/metrics").ok()?;
        (status == 200
            && body.contains(&format!(
                "ringfence_wave_hosts{{{w},ring=\"2\",state=\"skipped\"}} 1\n"
            ))
            && body.contains(&format!("ringfence_wave_halted{{{w}}} 1\n"))
            && body.contains(r#"kind="stalled""#))
        .then_some(body)
    })
    .await;
    assert!(
        resumed.contains(&format!("ringfence_wave_halts_total{{{w}}} 1\n")),
        "{resumed}"
    );
    assert!(
        !resumed
            .lines()
            .any(|l| l.starts_with("ringfence_wave_halt_info") && l.contains("gpu-03")),
        "the resumed process reports its own halt, not the canary's: {resumed}"
    );
    interrupt(&c);
    drop(c);
}

/// Tasks in the journals of `hosts`.
async fn tasks_of(f: &LocalFleet, hosts: &[&str]) -> usize {
    let mut n = 0;
    for h in hosts {
        n += journal(f, h).await.len();
    }
    n
}

/// SIGINT to a coordinator (Ctrl-C).
fn interrupt(c: &Coordinator) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(c.child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
}

/// `wave resume --skip gpu-03` with the metrics endpoint on `metrics`.
fn wave_resume(f: &LocalFleet, metrics: SocketAddr) -> Coordinator {
    let metrics = metrics.to_string();
    Coordinator::spawn(
        f,
        &[
            "wave",
            "resume",
            "--wave",
            WAVE,
            "--inventory",
            f.inventory.to_str().unwrap(),
            "--skip",
            "gpu-03",
            "--reason",
            "uncorrected ECC after the patch; RMA",
            "--json",
            "--metrics-listen",
            &metrics,
        ],
    )
}
