//! The real `ringfenced` binary as an operator meets it: a child process on
//! the fake NVML library, talked to over mutual TLS like the coordinator and
//! a scheduler would. Crash safety under `kill -9`, systemd notifications,
//! grpc.health.v1, XIDs while running, a missing NVML library, the local
//! health dump, config errors, and certificate rotation on SIGHUP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::proc_common;
use ringfence::time::{Clock, SystemClock};

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use ringfence::pb::{self, TaskState, Verdict};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use proc_common::*;

const TASK_LIMIT: Duration = Duration::from_secs(20);

fn patch_profile(marker: &std::path::Path, pidfile: &std::path::Path) -> String {
    format!(
        r#"
[patch.profiles.driver]
argv = ["/bin/sh", "-c", "echo run >> {marker}; echo $$ > {pidfile}; sleep 30"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
timeout_s = 120
"#,
        marker = marker.display(),
        pidfile = pidfile.display(),
    )
}

async fn serving_status(host: &Host, service: &str) -> ServingStatus {
    let mut hc = host.health_client().await;
    let status = hc
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("grpc.health.v1 Check({service:?}): {e}"))
        .into_inner()
        .status;
    ServingStatus::try_from(status).unwrap()
}

async fn get_health(host: &Host, fresh: bool) -> pb::HealthReport {
    host.client()
        .await
        .get_health(pb::GetHealthRequest { fresh })
        .await
        .unwrap()
        .into_inner()
}

async fn watch_health(host: &Host) -> tonic::Streaming<pb::HealthReport> {
    host.client()
        .await
        .watch_health(pb::WatchHealthRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// kill -9 in the middle of a patch command, restart on the same state dir:
/// the journal says INTERRUPTED, the host is still drained, and the same
/// signed task sent again is answered from the journal, not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_patch_is_interrupted_after_restart_and_never_rerun() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("MARKER");
    let pidfile = marker_dir.path().join("patch.pid");
    let host = Host::new(
        "gpu-crash",
        HostOpts {
            extra: patch_profile(&marker, &pidfile),
            ..HostOpts::default()
        },
    );
    // The patch command outlives the killed agent; kill its group at the end.
    let _orphan = GroupGuard(pidfile.clone());

    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let mut client = host.client().await;

    client
        .submit_task(host.task("d1", 1, drain("kernel update")))
        .await
        .unwrap();
    wait_task(&mut client, "d1", TaskState::Succeeded, TASK_LIMIT).await;

    let patch_task = host.task("p1", 2, patch("driver", "560.35.3"));
    client.submit_task(patch_task.clone()).await.unwrap();
    poll("the patch command wrote its pid", TASK_LIMIT, || async {
        pidfile.exists().then_some(())
    })
    .await;
    let running = task_state(&mut client, "p1").await;
    assert_eq!(running.state(), TaskState::Running, "{running:?}");
    assert_eq!(running.step, "command");

    let status = agent.kill9();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    drop(client);

    // Second life, same config and state dir.
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let mut client = host.client().await;

    let p1 = task_state(&mut client, "p1").await;
    assert_eq!(p1.state(), TaskState::Interrupted, "{p1:?}");
    assert!(p1.message.contains("command"), "{}", p1.message);
    let id = host.identity().await;
    assert!(
        id.draining,
        "the host stays drained after the crash: {id:?}"
    );
    assert_eq!(id.sequence_high_water, 2);

    // The very same signed task again: the recorded state, not a new run.
    let again = client.submit_task(patch_task).await.unwrap().into_inner();
    assert_eq!(again.state(), TaskState::Interrupted, "{again:?}");
    // The engine is idle (a re-run would hold it busy for 30 s): a new task runs.
    client
        .submit_task(host.task("v1", 3, validate()))
        .await
        .unwrap();
    wait_task(&mut client, "v1", TaskState::Succeeded, TASK_LIMIT).await;
    assert_eq!(
        std::fs::read_to_string(&marker).unwrap(),
        "run\n",
        "the patch command ran exactly once"
    );

    let listed: Vec<(String, TaskState)> = client
        .list_tasks(pb::ListTasksRequest {
            wave_id: "wave-proc".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks
        .into_iter()
        .map(|t| (t.task_id.clone(), t.state()))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("d1".to_string(), TaskState::Succeeded),
            ("p1".to_string(), TaskState::Interrupted),
            ("v1".to_string(), TaskState::Succeeded),
        ]
    );
    assert!(host.identity().await.draining, "still drained");
}

/// Split datagrams into `KEY=VALUE` lines, stamped with their arrival.
async fn recv_lines(sock: &tokio::net::UnixDatagram, until: Instant) -> Option<Vec<String>> {
    let mut buf = vec![0u8; 4096];
    let left = until.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_owned)
                .collect(),
        ),
        Ok(Err(e)) => panic!("notify socket: {e}"),
        Err(_) => None,
    }
}

/// systemd Type=notify: READY=1 once the listener accepts, WATCHDOG=1 every
/// half WATCHDOG_USEC, STOPPING=1 on SIGTERM, and a clean exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_sees_ready_watchdog_and_stopping() {
    let host = Host::new("gpu-notify", HostOpts::default());
    let sock_path = host.path("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut agent = host.spawn_with(|c| {
        c.env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "400000");
    });

    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + START_LIMIT;
    while !seen.iter().any(|l| l == "READY=1") {
        match recv_lines(&sock, deadline).await {
            Some(lines) => seen.extend(lines),
            None => panic!(
                "no READY=1 within {START_LIMIT:?}; got {seen:?}; log:\n{}",
                host.log()
            ),
        }
    }
    // READY means the listener is up: one plain connect, no retry.
    let ready_at = Instant::now();
    std::net::TcpStream::connect_timeout(&host.listen, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("READY=1 sent but {} refuses: {e}", host.listen));

    // WATCHDOG_USEC=400000 → a ping every 200 ms; at least 3 within 2 s of READY.
    let mut pings = 0;
    let window = ready_at + Duration::from_secs(2);
    while pings < 3 {
        match recv_lines(&sock, window).await {
            Some(lines) => {
                pings += lines.iter().filter(|l| *l == "WATCHDOG=1").count();
                seen.extend(lines);
            }
            None => panic!("only {pings} WATCHDOG=1 within 2 s of READY=1: {seen:?}"),
        }
    }
    assert!(
        seen.iter().any(|l| l.starts_with("STATUS=")),
        "a STATUS line for systemctl status: {seen:?}"
    );
    let id = host.identity().await;
    assert_eq!(id.host_id, "gpu-notify");
    // GetIdentity reports the configured ring (proc_common sets `ring = 0`).
    assert_eq!((id.ring, id.protected_ring), (Some(0), false));

    agent.signal(Signal::SIGTERM);
    let deadline = Instant::now() + START_LIMIT;
    loop {
        match recv_lines(&sock, deadline).await {
            Some(lines) if lines.iter().any(|l| l == "STOPPING=1") => break,
            Some(_) => {}
            None => panic!("no STOPPING=1 after SIGTERM; log:\n{}", host.log()),
        }
    }
    let status = agent.wait_exit(START_LIMIT).await;
    assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
    let log = host.log();
    assert!(log.contains("journal synced"), "log:\n{log}");
}

/// A scheduler's standard grpc.health.v1 client: a GPU with a pending row
/// remap is NOT_SERVING, a healthy host SERVING until a Drain task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_follows_row_remap_and_drain() {
    let sick = Host::new(
        "gpu-remap",
        HostOpts {
            scenario: "[[gpu]]\n[[gpu]]\nremapped_rows_pending = true\n",
            expected_gpus: 2,
            ..HostOpts::default()
        },
    );
    let well = Host::new("gpu-well", HostOpts::default());
    let mut sick_agent = sick.spawn();
    let mut well_agent = well.spawn();
    sick.wait_listening(&mut sick_agent).await;
    well.wait_listening(&mut well_agent).await;

    assert_eq!(serving_status(&sick, "").await, ServingStatus::NotServing);
    assert_eq!(
        serving_status(&sick, "ringfence.v1.Agent").await,
        ServingStatus::NotServing
    );
    let report = get_health(&sick, false).await;
    assert_eq!(report.verdict(), Verdict::Unhealthy, "{report:?}");
    assert!(
        reason_codes(&report).contains(&("row_remap_pending".to_string(), 1)),
        "{:?}",
        reason_codes(&report)
    );

    assert_eq!(serving_status(&well, "").await, ServingStatus::Serving);
    assert_eq!(get_health(&well, false).await.verdict(), Verdict::Healthy);

    let mut client = well.client().await;
    client
        .submit_task(well.task("d1", 1, drain("maintenance")))
        .await
        .unwrap();
    poll("NOT_SERVING after a Drain task", TASK_LIMIT, || async {
        (serving_status(&well, "").await == ServingStatus::NotServing).then_some(())
    })
    .await;
    wait_task(&mut client, "d1", TaskState::Succeeded, TASK_LIMIT).await;
    assert!(well.identity().await.draining);
    // The cached answer carries the drain mark at once, not a poll later.
    assert!(get_health(&well, false).await.draining);
    // Still healthy GPUs: it is the drain mark that keeps it out of service.
    let report = get_health(&well, true).await;
    assert_eq!(report.verdict(), Verdict::Healthy, "{report:?}");
    assert!(report.draining);
    assert_eq!(serving_status(&well, "").await, ServingStatus::NotServing);
}

/// An XID 79 (GPU fallen off the bus) delivered while the agent runs flips
/// the verdict, and a WatchHealth subscriber has the report within two poll
/// intervals (poll_interval_s = 1). The agent logs the change once, by
/// verdict name, and not again while the host stays UNHEALTHY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xid_79_while_running_streams_unhealthy_within_two_polls() {
    let trig_dir = tempfile::tempdir().unwrap();
    let trigger = trig_dir.path().join("xid79");
    let scenario = format!(
        "[[gpu]]\n[[gpu]]\n\n[[xid]]\ngpu = 1\nxid = 79\ntrigger_file = \"{}\"\n",
        trigger.display()
    );
    let host = Host::new(
        "gpu-xid",
        HostOpts {
            scenario: &scenario,
            expected_gpus: 2,
            ..HostOpts::default()
        },
    );
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;

    let mut stream = watch_health(&host).await;
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.verdict(), Verdict::Healthy, "{first:?}");

    std::fs::write(&trigger, "").unwrap();
    let delivered = Instant::now();
    let limit = delivered + Duration::from_secs(2);
    let report = loop {
        let left = limit.saturating_duration_since(Instant::now());
        let next = tokio::time::timeout(left, stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no UNHEALTHY report within two poll intervals of the XID; log:\n{}",
                    host.log()
                )
            })
            .unwrap()
            .expect("stream ended");
        if next.verdict() == Verdict::Unhealthy {
            break next;
        }
    };
    let xid = report
        .reasons
        .iter()
        .find(|r| r.code == "xid_critical")
        .unwrap_or_else(|| panic!("{:?}", reason_codes(&report)));
    assert_eq!(xid.gpu_index, 1);
    assert!(xid.observed.contains("79"), "{xid:?}");
    eprintln!("XID 79 streamed after {:?}", delivered.elapsed());

    // Two more polls (heartbeats) of the same UNHEALTHY host: one log line.
    for _ in 0..2 {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("no heartbeat within 5 s")
            .unwrap()
            .expect("stream ended");
        assert_eq!(next.verdict(), Verdict::Unhealthy, "{next:?}");
    }
    let changed = poll("the change is logged", TASK_LIMIT, || async {
        let log = host.log();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("health changed"))
            .map(str::to_owned)
            .collect();
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    assert_eq!(changed.len(), 1, "one change, one line: {changed:#?}");
    for part in [
        "verdict=UNHEALTHY",
        "previous=HEALTHY",
        "xid_critical (gpu 1",
    ] {
        assert!(
            changed[0].contains(part),
            "`{part}` missing: {}",
            changed[0]
        );
    }

    // The agent keeps the event (with the boot id) in its state dir.
    let log =
        std::fs::read_to_string(host.state_dir().join(ringfenced::xidlog::FILE_NAME)).unwrap();
    assert!(
        log.contains("\"xid\":79") || log.contains("\"xid\": 79"),
        "{log}"
    );
    assert_eq!(serving_status(&host, "").await, ServingStatus::NotServing);
}

/// No NVML at the configured path: UNHEALTHY with `nvml_unavailable`, and
/// the agent still serves identity, health and grpc.health.v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_nvml_library_is_unhealthy_and_the_agent_keeps_serving() {
    let nowhere = tempfile::tempdir().unwrap();
    let host = Host::new(
        "gpu-nonvml",
        HostOpts {
            nvml_library: Some(nowhere.path().join("missing/libnvidia-ml.so.1")),
            ..HostOpts::default()
        },
    );
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;

    let report = get_health(&host, false).await;
    assert_eq!(report.verdict(), Verdict::Unhealthy, "{report:?}");
    assert!(
        report.reasons.iter().any(|r| r.code == "nvml_unavailable"),
        "{:?}",
        reason_codes(&report)
    );
    assert_eq!(host.identity().await.host_id, "gpu-nonvml");
    assert_eq!(serving_status(&host, "").await, ServingStatus::NotServing);
    // Still up after further polls, still answering fresh reads.
    let fresh = get_health(&host, true).await;
    assert!(
        fresh.reasons.iter().any(|r| r.code == "nvml_unavailable"),
        "{fresh:?}"
    );
    assert!(agent.try_status().is_none(), "ringfenced exited");
}

async fn health_once(host: &Host) -> (std::process::Output, serde_json::Value) {
    let mut cmd = tokio::process::Command::from(host.command());
    cmd.args(["health", "--once", "--json"]).kill_on_drop(true);
    let out = tokio::time::timeout(START_LIMIT, cmd.output())
        .await
        .expect("health --once did not finish")
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, json)
}

/// `ringfenced health --once --json`: the scenario's driver and GPUs, exit 0
/// when healthy and non-zero when not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_once_json_prints_driver_and_gpus_and_exits_by_verdict() {
    let gpus =
        "[[gpu]]\nname = \"NVIDIA A100-SXM4-80GB\"\n[[gpu]]\nname = \"NVIDIA A100-SXM4-80GB\"\n";
    let healthy = Host::new(
        "gpu-once",
        HostOpts {
            scenario: &format!("driver_version = \"535.183.01\"\n{gpus}"),
            expected_gpus: 2,
            ..HostOpts::default()
        },
    );
    let (out, json) = health_once(&healthy).await;
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["host_id"], "gpu-once");
    assert_eq!(json["driver_version"], "535.183.01");
    assert_eq!(json["verdict_name"], "HEALTHY");
    let listed = json["gpus"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1]["name"], "NVIDIA A100-SXM4-80GB");
    assert_eq!(
        listed[1]["uuid"],
        "GPU-fa4e0000-0000-0000-0000-000000000001"
    );

    let sick = Host::new(
        "gpu-once-ecc",
        HostOpts {
            scenario: &format!(
                "driver_version = \"535.183.01\"\n{gpus}ecc_volatile_uncorrected = 2\n"
            ),
            expected_gpus: 2,
            ..HostOpts::default()
        },
    );
    let (out, json) = health_once(&sick).await;
    assert_ne!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["verdict_name"], "UNHEALTHY");
    assert_eq!(json["driver_version"], "535.183.01");
    let reasons = json["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r["code"] == "ecc_uncorrected_volatile" && r["gpu_index"] == 1),
        "{reasons:?}"
    );
}

/// An unknown key in agent.toml: exit 3 naming file:line and the key, before
/// the agent creates its state dir, loads NVML or binds its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_config_key_exits_3_naming_file_line_and_key() {
    let host = Host::new("gpu-badcfg", HostOpts::default());
    let path = host.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace(
        "poll_interval_s = 1",
        "poll_interval_s = 1\npoll_intervall_s = 5",
    );
    std::fs::write(&path, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.starts_with("poll_intervall_s"))
        .unwrap()
        + 1;
    // Holding the port: an agent that got as far as binding would exit 4.
    let _port = std::net::TcpListener::bind(host.listen).unwrap();

    let mut agent = host.spawn();
    let status = agent.wait_exit(START_LIMIT).await;
    let log = host.log();
    assert_eq!(status.code(), Some(3), "{status}; log:\n{log}");
    assert!(
        log.contains(&format!("{}:{line}:", path.display())),
        "file:line {line} in:\n{log}"
    );
    assert!(log.contains("poll_intervall_s"), "{log}");
    assert!(
        !host.state_dir().exists(),
        "the state dir was created before the config was accepted"
    );
}

/// Certificate rotation: new files + SIGHUP → new connections get the new
/// certificate, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rotated_certificate_for_new_connections() {
    let host = Host::new("gpu-rotate", HostOpts::default());
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;

    let serial = || async {
        let chain = ringfence::tls::server_certificates(
            &host.listen.to_string(),
            &host.spiffe(),
            &host.ops,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        ringfence::tls::cert_identity(chain[0].as_ref(), TRUST_DOMAIN)
            .unwrap()
            .serial
    };
    assert_eq!(serial().await, host.host_serial);

    let rotated = host.rotate_host_cert();
    assert_ne!(rotated.serial, host.host_serial);
    agent.signal(Signal::SIGHUP);
    poll("the rotated certificate is served", TASK_LIMIT, || async {
        (serial().await == rotated.serial).then_some(())
    })
    .await;
    assert!(
        agent.try_status().is_none(),
        "SIGHUP must not stop the agent"
    );
    assert_eq!(host.identity().await.host_id, "gpu-rotate");
}

/// With stderr in a file (no terminal) the log has no ANSI colour codes,
/// even without `NO_COLOR` in the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_carry_no_colour_codes() {
    let host = Host::new("gpu-nocolour", HostOpts::default());
    let mut agent = host.spawn_with(|cmd| {
        cmd.env_remove("NO_COLOR");
    });
    host.wait_listening(&mut agent).await;
    poll("the agent logged that it serves", TASK_LIMIT, || async {
        host.log().contains("ringfenced serving").then_some(())
    })
    .await;
    agent.signal(Signal::SIGTERM);
    agent.wait_exit(TASK_LIMIT).await;
    let log = host.log();
    assert!(log.contains("INFO"), "levels are still written: {log}");
    assert!(
        !log.contains("\x1b["),
        "colour codes in a log file: {log:?}"
    );
}

/// A `restarts_agent` profile: after its command succeeds the agent exits
/// with 75 (systemd's RestartForceExitStatus restarts it); the next start
/// finishes the task: SUCCEEDED when it runs the task's version, FAILED
/// when it came back on the old one. The test binary's version is fixed,
/// so "the new version" is a patch toward the version it already runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_upgrade_exits_75_and_the_next_start_finishes_the_task() {
    let host = Host::new(
        "gpu-selfup",
        HostOpts {
            extra: r#"
[patch.profiles.agent]
argv = ["/bin/true", "{version}"]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
timeout_s = 30
restarts_agent = true
require_drained = false
"#
            .into(),
            ..HostOpts::default()
        },
    );
    let old_version = "9.9.9";
    assert_ne!(ringfence::VERSION, old_version);

    for (seq, (id, version, want)) in [
        ("up", ringfence::VERSION, TaskState::Succeeded),
        ("stale", old_version, TaskState::Failed),
    ]
    .into_iter()
    .enumerate()
    {
        let mut agent = host.spawn();
        host.wait_listening(&mut agent).await;
        let mut client = host.client().await;
        client
            .submit_task(host.task(id, seq as u64 + 1, patch("agent", version)))
            .await
            .unwrap();
        let status = agent.wait_exit(TASK_LIMIT).await;
        assert_eq!(status.code(), Some(75), "{status}; log:\n{}", host.log());
        drop(client);

        let mut agent = host.spawn();
        host.wait_listening(&mut agent).await;
        let mut client = host.client().await;
        let done = task_state(&mut client, id).await;
        assert_eq!(done.state(), want, "{done:?}");
        if want == TaskState::Succeeded {
            assert_eq!(done.step, "restart", "{done:?}");
            assert!(
                done.message.contains("restarted on version"),
                "{}",
                done.message
            );
        } else {
            assert!(
                done.message.contains(&format!("expected {version}")),
                "{}",
                done.message
            );
        }
        // A finished self-upgrade does not restart the agent again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(agent.try_status().is_none(), "the agent exited again");
        agent.signal(Signal::SIGTERM);
        assert_eq!(agent.wait_exit(TASK_LIMIT).await.code(), Some(0));
    }
}

/// `check-config` validates without writing: no state dir, no host.key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_writes_nothing_to_the_state_dir() {
    let host = Host::new("gpu-check", HostOpts::default());
    assert!(!host.state_dir().exists());
    let out = host.command().arg("check-config").output().unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config ok: host gpu-check"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !host.state_dir().exists(),
        "check-config created {}",
        host.state_dir().display()
    );

    // A broken TLS key is still reported (the check did not become a no-op).
    std::fs::write(host.path("host.key"), "not a key").unwrap();
    let out = host.command().arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", out.status);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------- issue 13: revocation and limits

/// A trust file with the test coordinator key and, optionally, that key revoked.
fn trust_toml(host: &Host, revoke_coordinator: bool) -> String {
    let key = ringfence::keys::public_key_text(&host.coord.verifying_key());
    let mut text = format!(
        "[policy]\nprotected_rings = [2, 3, 4]\napprover_threshold = 1\n\n[[coordinator]]\nid = \"coord-test\"\nkey = \"{key}\"\n"
    );
    if revoke_coordinator {
        text.push_str(&format!(
            "\n[[revoked]]\nid = \"coord-test-stolen\"\nkey = \"{key}\"\n"
        ));
    }
    text
}

/// SIGHUP reloads the trust file: a coordinator key revoked in it is refused
/// (`revoked_key`) without a restart; a broken file keeps the last good one
/// in force and says why in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_trust_file_and_a_revoked_coordinator_key_is_refused() {
    let host = Host::new("gpu-trust-reload", HostOpts::default());
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let mut client = host.client().await;
    client
        .submit_task(host.task("t-before", 1, drain("before")))
        .await
        .unwrap();

    // A broken trust file: the last good one stays in force.
    std::fs::write(host.path("trust.toml"), "[[coordinator]]\nid = 7\n").unwrap();
    agent.signal(Signal::SIGHUP);
    poll("the failed trust reload is logged", TASK_LIMIT, || async {
        host.log()
            .contains("trust file reload failed")
            .then_some(())
    })
    .await;
    assert!(host.log().contains("trust.toml"), "{}", host.log());
    client
        .submit_task(host.task("t-broken-file", 2, drain("still trusted")))
        .await
        .unwrap();

    // The coordinator key is revoked: the next task signed by it is refused.
    std::fs::write(host.path("trust.toml"), trust_toml(&host, true)).unwrap();
    agent.signal(Signal::SIGHUP);
    let mut seq = 3;
    let refused = poll("a task by the revoked key is refused", TASK_LIMIT, || {
        seq += 1;
        let task = host.task(&format!("t-revoked-{seq}"), seq, drain("revoked"));
        let mut c = client.clone();
        // "still running" (the previous drain) is no verdict on the key.
        async move {
            c.submit_task(task)
                .await
                .err()
                .filter(|e| ringfence::status::rejected_check(e).is_some())
        }
    })
    .await;
    assert_eq!(
        ringfence::status::rejected_check(&refused).as_deref(),
        Some("revoked_key"),
        "{refused:?}"
    );
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        agent.try_status().is_none(),
        "SIGHUP must not stop the agent"
    );
}

/// A client with an open connection, making calls, is revoked by a new CRL
/// and the agent gets SIGHUP: its next call on the same channel fails, and
/// another client's connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_new_crl_closes_a_revoked_clients_open_connection() {
    let host = Host::new("gpu-crl-reload", HostOpts::default());
    host.use_crl(&host.pki.fresh_crl(&[]).unwrap());
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let mallory = host
        .pki
        .issue(ringfence::spiffe::Role::Ops, "mallory")
        .unwrap();
    let mut m = host.client_as(&mallory).await;
    let mut ops = host.client().await;
    for _ in 0..3 {
        m.get_identity(pb::GetIdentityRequest {}).await.unwrap();
    }

    host.write_crl(&host.pki.fresh_crl(&[&mallory]).unwrap());
    agent.signal(Signal::SIGHUP);
    poll(
        "the revoked client's open channel fails",
        TASK_LIMIT,
        || {
            let mut m = m.clone();
            async move { m.get_identity(pb::GetIdentityRequest {}).await.err() }
        },
    )
    .await;
    assert!(m.get_identity(pb::GetIdentityRequest {}).await.is_err());
    ops.get_identity(pb::GetIdentityRequest {}).await.unwrap();
    assert!(host.log().contains("mallory"), "{}", host.log());
}

/// The agent's certificate must name its `host_id` (SPIFFE id and DNS
/// name): a certificate of another host stops the start with exit 3 (config
/// error), naming both, before anything binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_of_another_host_refuses_to_start_with_exit_3() {
    let host = Host::new("gpu-named", HostOpts::default());
    host.write_host_cert(
        &host
            .pki
            .issue(ringfence::spiffe::Role::Host, "gpu-other")
            .unwrap(),
    );
    let _port = std::net::TcpListener::bind(host.listen).unwrap();
    let mut agent = host.spawn();
    let status = agent.wait_exit(START_LIMIT).await;
    let log = host.log();
    assert_eq!(status.code(), Some(3), "{status}; log:\n{log}");
    assert!(log.contains("gpu-other"), "{log}");
    assert!(log.contains("not this host `gpu-named`"), "{log}");

    // `check-config` says the same.
    let out = host.command().arg("check-config").output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not this host"),
        "{out:?}"
    );
}

/// Malformed requests answer like the README's table says: bytes that are
/// not a SignedTask → INVALID_ARGUMENT (`decode`), a request over the size
/// budget → RESOURCE_EXHAUSTED (`size`); a SignedTask under the budget but
/// over tonic's default 4 MiB reaches the verifier (one budget end to end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_signed_tasks_answer_invalid_argument_and_resource_exhausted() {
    use prost::Message;
    const SUBMIT: &str = "/ringfence.v1.Agent/SubmitTask";
    let host = Host::new("gpu-limits", HostOpts::default());
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let channel = host.ops_channel().await;

    let st = raw_unary(channel.clone(), SUBMIT, vec![0x0a, 0x64, 0x01])
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert_eq!(
        ringfence::status::rejected_check(&st).as_deref(),
        Some("decode")
    );

    let st = raw_unary(
        channel.clone(),
        SUBMIT,
        vec![0u8; ringfence::tls::MAX_SIGNED_TASK_BYTES + 1],
    )
    .await
    .unwrap_err();
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert_eq!(
        ringfence::status::rejected_check(&st).as_deref(),
        Some("size")
    );

    // 5 MiB of approvals, each within the approval payload limit.
    let mut task = host.task("t-big", 1, drain("big"));
    task.approvals = (0..5)
        .map(|_| pb::Envelope {
            payload_type: ringfence::envelope::APPROVAL_TYPE.into(),
            payload: vec![0u8; 1024 * 1024],
            signatures: vec![],
        })
        .collect();
    let body = task.encode_to_vec();
    assert!(body.len() > 4 * 1024 * 1024);
    match raw_unary(channel, SUBMIT, body).await {
        Ok(_) => {}
        Err(st) => assert!(
            ringfence::status::rejected_check(&st).is_some()
                && !matches!(
                    st.code(),
                    tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
                ),
            "a SignedTask within the budget was refused by the transport: {st:?}"
        ),
    }
    assert!(agent.try_status().is_none());
}

// ------------------------------------------------------------------ limits

/// The agent's resident memory (VmRSS), in KiB.
fn rss_kib(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

/// Open a WatchHealth stream, read its first report, and drop it (the
/// client cancels the HTTP/2 stream), `cycles` times.
async fn watch_health_churn(
    mut client: pb::agent_client::AgentClient<tonic::transport::Channel>,
    cycles: usize,
) {
    for i in 0..cycles {
        let mut stream = loop {
            match client.watch_health(pb::WatchHealthRequest {}).await {
                Ok(s) => break s.into_inner(),
                // A cancelled stream is released a moment after the
                // client's RST_STREAM; at the per-peer cap, wait for it.
                Err(e) if e.code() == tonic::Code::ResourceExhausted => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => panic!("WatchHealth #{i}: {e}"),
            }
        };
        let first = stream.message().await.unwrap().expect("a first report");
        assert_eq!(first.host_id, "gpu-churn");
        drop(stream);
    }
}

/// Issue 13 §7: a scheduler that opens and cancels WatchHealth streams
/// grew the agent by gigabytes (every abandoned stream stayed allocated
/// until the report changed: on a healthy host, never). 100,000 open and
/// cancelled streams now leave the agent under 32 MiB, and the caps on open
/// streams (32 per peer) answer RESOURCE_EXHAUSTED beyond, per peer: the
/// cancelled streams' places are all free again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_watch_health_streams_are_released_and_capped_per_peer() {
    let host = Host::new("gpu-churn", HostOpts::default());
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let before = rss_kib(&agent);

    const CYCLES: usize = 100_000;
    const CONNECTIONS: usize = 4;
    const PER_CONNECTION: usize = 2;
    let started = Instant::now();
    let mut churn = Vec::new();
    for _ in 0..CONNECTIONS {
        let client = host.agent_client_as(&host.scheduler).await;
        for _ in 0..PER_CONNECTION {
            churn.push(tokio::spawn(watch_health_churn(
                client.clone(),
                CYCLES / (CONNECTIONS * PER_CONNECTION),
            )));
        }
    }
    for c in churn {
        c.await.unwrap();
    }
    let elapsed = started.elapsed();
    // Give the last RST_STREAMs a moment to be processed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(&agent);
    eprintln!(
        "{CYCLES} WatchHealth open/cancel cycles in {elapsed:?}: agent RSS {before} KiB -> {after} KiB"
    );
    assert!(
        after < 32 * 1024,
        "agent RSS {after} KiB after {CYCLES} cancelled WatchHealth streams (was {before} KiB)"
    );

    // Every cancelled stream gave its place back: the scheduler can open its
    // full quota of 32 again, and not one more.
    let mut client = host.agent_client_as(&host.scheduler).await;
    let mut open = Vec::new();
    for i in 0..ringfenced::server::DEFAULT_WATCH_STREAMS_PER_PEER {
        let mut s = client
            .watch_health(pb::WatchHealthRequest {})
            .await
            .unwrap_or_else(|e| panic!("stream {i} of the quota: {e}"))
            .into_inner();
        s.message().await.unwrap().unwrap();
        open.push(s);
    }
    let refused = client
        .watch_health(pb::WatchHealthRequest {})
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("per peer"),
        "{}",
        refused.message()
    );
    // Another peer is not starved by this one; its WatchTask streams count
    // against its own quota like its WatchHealth streams.
    let mut ops = host.client().await;
    let mut ops_open = Vec::new();
    for _ in 0..ringfenced::server::DEFAULT_WATCH_STREAMS_PER_PEER {
        let mut s = ops
            .watch_health(pb::WatchHealthRequest {})
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().unwrap();
        ops_open.push(s);
    }
    let refused = ops
        .watch_task(pb::GetTaskRequest {
            task_id: "none".into(),
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    drop(ops_open);
    // One cancelled stream frees one place.
    drop(open.pop());
    poll(
        "a cancelled stream's place is free again",
        TASK_LIMIT,
        || {
            let mut client = client.clone();
            async move {
                match client.watch_health(pb::WatchHealthRequest {}).await {
                    Ok(s) => Some(s),
                    Err(e) if e.code() == tonic::Code::ResourceExhausted => None,
                    Err(e) => panic!("{e}"),
                }
            }
        },
    )
    .await;
}

/// A ring-3 Patch for `host` signed by its coordinator key, carrying `approvals`.
fn protected_patch(
    host: &Host,
    id: &str,
    sequence: u64,
    approvals: &[pb::Envelope],
) -> pb::SignedTask {
    let now = SystemClock.now_ms();
    let payload = pb::TaskPayload {
        task_id: id.into(),
        host_id: host.id.clone(),
        wave_id: "wave-proc".into(),
        ring: 3,
        sequence,
        issued_at_unix_ms: now,
        expires_at_unix_ms: now + 600_000,
        action: Some(patch("driver", "560.35.3")),
    };
    pb::SignedTask {
        task: Some(ringfence::envelope::sign_message(
            ringfence::envelope::TASK_TYPE,
            &payload,
            &[("coord-test", &host.coord)],
        )),
        approvals: approvals.to_vec(),
    }
}

/// Issue 13 §7: no signature verification while holding a lock the
/// watchdog or health path needs. Signed protected-ring Patch tasks, each
/// with 32 approvals by 32 approver keys, from an ops certificate, at 400 a
/// second for 10 s. The issue asks for 200/s for 30 s; on this test's debug
/// build an agent that verifies under its lock on the runtime threads still
/// keeps up with 200/s (watchdog gaps ~0.4 s, GetHealth ~0.25 s: degraded,
/// not stopped), while at 400/s its backlog stalls both for seconds; 10 s
/// (50 watchdog intervals, 10 health polls) shows that and keeps the test
/// short on a shared 2-core CI machine. Meanwhile sd_notify WATCHDOG=1 keeps
/// arriving (every 200 ms, no gap over 1.5 s) and GetHealth keeps answering
/// (each within 1 s). Every task passes verification: the first runs, the
/// rest are refused as busy or, past the verification queue,
/// RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_heavily_signed_tasks_starves_neither_watchdog_nor_health() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("MARKER");
    let pidfile = marker_dir.path().join("patch.pid");
    let host = Host::new(
        "gpu-flood",
        HostOpts {
            extra: format!(
                "{}require_drained = false\n",
                patch_profile(&marker, &pidfile)
            ),
            ring: Some(3),
            ..HostOpts::default()
        },
    );
    let _orphan = GroupGuard(pidfile.clone());
    const APPROVERS: usize = 32;
    let approvers: Vec<ed25519_dalek::SigningKey> = (0..APPROVERS)
        .map(|_| ringfence::keys::generate())
        .collect();
    let mut trust = format!(
        "[policy]\nprotected_rings = [2, 3, 4]\napprover_threshold = 2\n\n[[coordinator]]\nid = \"coord-test\"\nkey = \"{}\"\n",
        ringfence::keys::public_key_text(&host.coord.verifying_key())
    );
    for (i, k) in approvers.iter().enumerate() {
        trust.push_str(&format!(
            "\n[[approver]]\nid = \"approver-{i}\"\nkey = \"{}\"\n",
            ringfence::keys::public_key_text(&k.verifying_key())
        ));
    }
    std::fs::write(host.path("trust.toml"), trust).unwrap();

    let now = SystemClock.now_ms();
    let approval = pb::RingApproval {
        wave_id: "wave-proc".into(),
        ring: 3,
        profile: "driver".into(),
        version: "560.35.3".into(),
        host_ids: vec![host.id.clone()],
        issued_at_unix_ms: now,
        expires_at_unix_ms: now + 600_000,
        actions: vec![pb::ApprovedAction::Patch as i32],
        ..Default::default()
    };
    let approvals: Vec<pb::Envelope> = approvers
        .iter()
        .enumerate()
        .map(|(i, k)| {
            ringfence::envelope::sign_message(
                ringfence::envelope::APPROVAL_TYPE,
                &approval,
                &[(&format!("approver-{i}"), k)],
            )
        })
        .collect();
    const RATE: u64 = 400;
    const SECONDS: u64 = 10;
    let tasks: Vec<pb::SignedTask> = (1..=RATE * SECONDS)
        .map(|i| protected_patch(&host, &format!("flood-{i}"), i, &approvals))
        .collect();

    let sock_path = host.path("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let mut agent = host.spawn_with(|c| {
        c.env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "400000");
    });
    let deadline = Instant::now() + START_LIMIT;
    loop {
        match recv_lines(&sock, deadline).await {
            Some(lines) if lines.iter().any(|l| l == "READY=1") => break,
            Some(_) => {}
            None => panic!("no READY=1; log:\n{}", host.log()),
        }
    }
    host.wait_listening(&mut agent).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Watchdog pings, stamped.
    let pings = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut at = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let until = Instant::now() + Duration::from_millis(500);
                if let Some(lines) = recv_lines(&sock, until).await
                    && lines.iter().any(|l| l == "WATCHDOG=1")
                {
                    at.push(Instant::now());
                }
            }
            at
        }
    });
    // GetHealth from a scheduler, every 100 ms, each timed.
    let mut scheduler = host.agent_client_as(&host.scheduler).await;
    let probes = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    scheduler.get_health(pb::GetHealthRequest { fresh: false }),
                )
                .await;
                match r {
                    Ok(Ok(_)) => latencies.push(t.elapsed()),
                    Ok(Err(e)) => panic!("GetHealth during the flood: {e}"),
                    Err(_) => latencies.push(Duration::from_secs(10)),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            latencies
        }
    });

    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(host.client().await);
    }
    // The first task runs (its command sleeps 30 s), so the flood meets a
    // busy engine. It goes alone: sent in the flood, a later sequence on
    // another connection could be accepted first on a loaded machine.
    let mut tasks = tasks.into_iter();
    let first = tasks.next().unwrap();
    clients[0].clone().submit_task(first).await.unwrap();
    let flood_started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut answers = Vec::new();
    for (i, task) in tasks.enumerate() {
        tick.tick().await;
        let mut client = clients[i % clients.len()].clone();
        answers.push(tokio::spawn(async move {
            client.submit_task(task).await.map(|_| ())
        }));
    }
    let sent_in = flood_started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let pings = pings.await.unwrap();
    let latencies = probes.await.unwrap();

    let (mut ok, mut busy, mut exhausted) = (0, 0, 0);
    for a in answers {
        match tokio::time::timeout(Duration::from_secs(120), a)
            .await
            .expect("a submission still unanswered 120 s after the flood")
            .unwrap()
        {
            Ok(()) => ok += 1,
            Err(e)
                if e.code() == tonic::Code::FailedPrecondition
                    && e.message().contains("still running") =>
            {
                busy += 1
            }
            Err(e) if e.code() == tonic::Code::ResourceExhausted => exhausted += 1,
            Err(e) => panic!("unexpected answer to a flood task: {e}"),
        }
    }
    let mut gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let max_gap = gaps.last().copied().unwrap_or(Duration::MAX);
    let max_latency = latencies.iter().max().copied().unwrap_or(Duration::MAX);
    eprintln!(
        "flood: {} tasks sent in {sent_in:?}: {ok} accepted, {busy} busy, {exhausted} over the verification queue; \
         {} watchdog pings, largest gap {max_gap:?}; {} GetHealth probes, slowest {max_latency:?}",
        RATE * SECONDS - 1,
        pings.len(),
        latencies.len()
    );
    assert_eq!(ok, 0, "the first task holds the engine: no flood task runs");
    assert!(busy > 0, "tasks passed every check up to the busy engine");
    assert!(
        pings.len() as u64 >= SECONDS * 2,
        "only {} watchdog pings during a {sent_in:?} flood; log:\n{}",
        pings.len(),
        host.log()
    );
    assert!(
        max_gap < Duration::from_millis(1500),
        "watchdog pings stalled for {max_gap:?} during the flood"
    );
    assert!(latencies.len() as u64 >= SECONDS * 3, "{latencies:?}");
    assert!(
        max_latency < Duration::from_secs(1),
        "GetHealth took {max_latency:?} during the flood"
    );
    assert!(agent.try_status().is_none(), "the agent exited");
}

/// An agent whose agent.toml names no ring treats itself as protected: it
/// says so at start and in GetIdentity, and a coordinator-only Patch (even
/// one naming ring 0) is refused for want of ring approvals, while a Drain
/// needs none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_a_ring_says_it_is_protected_and_asks_approvals() {
    let host = Host::new(
        "gpu-no-ring",
        HostOpts {
            ring: None,
            ..HostOpts::default()
        },
    );
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    assert!(
        host.log().contains("no `ring` configured"),
        "{}",
        host.log()
    );
    let id = host.identity().await;
    assert_eq!((id.ring, id.protected_ring), (None, true));

    let mut client = host.client().await;
    let refused = client
        .submit_task(host.task("p-no-ring", 1, patch("nvidia-driver", "560.35.03")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        ringfence::status::rejected_check(&refused).as_deref(),
        Some("approval_threshold"),
        "{refused:?}"
    );
    client
        .submit_task(host.task("d-no-ring", 2, drain("no ring")))
        .await
        .unwrap();
}

// ------------------------------- issues 20 and 21: what the agent tells

/// Issue 20 §2: on a steady, healthy host WatchHealth still sends a report
/// every poll interval (a heartbeat: silence means a stuck agent), each
/// collected later than the one before; nothing changed, so the agent logs
/// no "health changed".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_health_sends_a_heartbeat_every_poll_on_a_steady_host() {
    let host = Host::new("gpu-beat", HostOpts::default());
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let mut stream = watch_health(&host).await;
    let first = stream.message().await.unwrap().unwrap();

    // N + 1 poll intervals (poll_interval_s = 1): at least N more reports.
    const N: usize = 3;
    let until = tokio::time::Instant::now() + Duration::from_secs(N as u64 + 1);
    let mut reports = vec![first];
    while let Ok(next) = tokio::time::timeout_at(until, stream.message()).await {
        reports.push(next.unwrap().expect("stream ended"));
    }
    assert!(
        reports.len() > N,
        "{} reports after the first in {} s; log:\n{}",
        reports.len() - 1,
        N + 1,
        host.log()
    );
    for r in &reports {
        assert_eq!(r.verdict(), Verdict::Healthy, "{r:?}");
    }
    for pair in reports.windows(2) {
        assert!(
            pair[1].collected_at_unix_ms > pair[0].collected_at_unix_ms,
            "collection times must increase: {} then {}",
            pair[0].collected_at_unix_ms,
            pair[1].collected_at_unix_ms
        );
    }
    assert!(
        !host.log().contains("health changed"),
        "nothing changed: {}",
        host.log()
    );
}

/// Issue 21 §1 and §2: GetIdentity names the agent's patch profiles; after
/// a Drain, GetIdentity, GetHealth (cached and fresh), WatchHealth and a
/// signed attestation say who drained the host (task, wave, the signing
/// coordinator key's trust-file id), why and since when; the Undrain after
/// a passing validation clears the mark everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_names_patch_profiles_and_reports_carry_the_drain_mark() {
    let host = Host::new(
        "gpu-marked",
        HostOpts {
            extra: r#"
[patch.profiles.nvidia-driver]
argv = ["/bin/true", "{version}"]
version_pattern = '^[0-9.]+$'

[patch.profiles.cuda-toolkit]
argv = ["/bin/true", "{version}"]
version_pattern = '^[0-9.]+$'
"#
            .into(),
            ..HostOpts::default()
        },
    );
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let id = host.identity().await;
    assert_eq!(id.patch_profiles, vec!["cuda-toolkit", "nvidia-driver"]);
    assert_eq!(id.drain_mark, None);
    assert_eq!(get_health(&host, false).await.drain_mark, None);

    let mut client = host.client().await;
    let before = SystemClock.now_ms();
    client
        .submit_task(host.task("d1", 1, drain("kernel 6.8 rollout")))
        .await
        .unwrap();
    wait_task(&mut client, "d1", TaskState::Succeeded, TASK_LIMIT).await;
    let mark = host
        .identity()
        .await
        .drain_mark
        .expect("GetIdentity carries the drain mark");
    assert_eq!(mark.task_id, "d1");
    assert_eq!(mark.wave_id, "wave-proc");
    assert_eq!(mark.signed_by, "coord-test");
    assert_eq!(mark.reason, "kernel 6.8 rollout");
    assert!(!mark.already_draining);
    assert!(
        (before..=SystemClock.now_ms()).contains(&mark.since_unix_ms),
        "{mark:?}"
    );
    for fresh in [false, true] {
        let r = get_health(&host, fresh).await;
        assert!(r.draining);
        assert_eq!(
            r.drain_mark.as_ref(),
            Some(&mark),
            "GetHealth fresh={fresh}"
        );
    }
    let streamed = watch_health(&host).await.message().await.unwrap().unwrap();
    assert_eq!(streamed.drain_mark.as_ref(), Some(&mark), "WatchHealth");
    let nonce = vec![9u8; 32];
    let env = client
        .attest(pb::AttestRequest {
            nonce: nonce.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let key = ed25519_dalek::VerifyingKey::from_bytes(
        id.attestation_public_key.as_slice().try_into().unwrap(),
    )
    .unwrap();
    let att = ringfence::attest::verify(
        &env,
        &ringfence::attest::Expect {
            key: &key,
            host_id: &host.id,
            nonce: &nonce,
            now_ms: SystemClock.now_ms(),
            max_age_ms: 60_000,
            max_skew_ms: 5_000,
        },
    )
    .unwrap();
    assert_eq!(att.report.unwrap().drain_mark, Some(mark), "signed");

    client
        .submit_task(host.task("v1", 2, validate()))
        .await
        .unwrap();
    wait_task(&mut client, "v1", TaskState::Succeeded, TASK_LIMIT).await;
    let undrain = pb::task_payload::Action::Undrain(pb::Undrain {
        reason: "validated".into(),
        force: false,
    });
    client
        .submit_task(host.task("u1", 3, undrain))
        .await
        .unwrap();
    wait_task(&mut client, "u1", TaskState::Succeeded, TASK_LIMIT).await;
    assert_eq!(host.identity().await.drain_mark, None);
    let r = get_health(&host, false).await;
    assert!(!r.draining);
    assert_eq!(r.drain_mark, None);
}

/// `ringfenced check-config` and the start of `run`, on the same config:
/// exit status and stderr / log.
async fn check_and_run(host: &Host) -> ((Option<i32>, String), (Option<i32>, String)) {
    let out = host.command().arg("check-config").output().unwrap();
    let check = (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    // Holding the port: a `run` that got past its checks would exit 4.
    let _port = std::net::TcpListener::bind(host.listen).unwrap();
    let _ = std::fs::remove_file(host.log_path());
    let mut agent = host.spawn();
    let status = agent.wait_exit(START_LIMIT).await;
    (check, (status.code(), host.log()))
}

/// Issue 21 §6: `check-config` fails where `run` would, with exit 3 and
/// the same finding: the simulated backend's scenario file is missing, the
/// state directory cannot be created, the attestation key does not load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_fails_where_run_would() {
    let host = Host::new("gpu-precheck", HostOpts::default());
    let path = host.config_path();
    let good = std::fs::read_to_string(&path).unwrap();

    let scenario = host.path("no-such-scenario.toml");
    let blocker = host.path("a-file");
    std::fs::write(&blocker, "").unwrap();
    let state = blocker.join("state");
    let cases = [
        (
            "missing scenario file",
            good.replace(
                "backend = \"nvml\"",
                &format!(
                    "backend = \"simulated\"\nscenario = \"{}\"",
                    scenario.display()
                ),
            ),
            vec![scenario.display().to_string()],
        ),
        (
            "state directory under a file",
            good.replace(
                &format!("state_dir = \"{}\"", host.state_dir().display()),
                &format!("state_dir = \"{}\"", state.display()),
            ),
            vec![
                format!("state directory {}:", state.display()),
                "ot a directory".into(),
            ],
        ),
    ];
    for (what, text, expect) in cases {
        assert_ne!(text, good, "{what}: the config was not changed");
        std::fs::write(&path, &text).unwrap();
        let ((check_code, check_err), (run_code, run_log)) = check_and_run(&host).await;
        assert_eq!(run_code, Some(3), "{what}: run; log:\n{run_log}");
        assert_eq!(check_code, Some(3), "{what}: check-config: {check_err}");
        for part in &expect {
            assert!(
                run_log.contains(part.as_str()),
                "{what}: run: `{part}` missing:\n{run_log}"
            );
            assert!(
                check_err.contains(part.as_str()),
                "{what}: check-config: `{part}` missing:\n{check_err}"
            );
        }
    }

    // An attestation key that does not load.
    std::fs::write(&path, &good).unwrap();
    std::fs::create_dir_all(host.state_dir()).unwrap();
    let key = host.state_dir().join(ringfenced::daemon::HOST_KEY_FILE);
    std::fs::write(&key, "not a key").unwrap();
    let ((check_code, check_err), (run_code, run_log)) = check_and_run(&host).await;
    assert_eq!(run_code, Some(3), "run; log:\n{run_log}");
    assert_eq!(check_code, Some(3), "check-config: {check_err}");
    let part = key.display().to_string();
    assert!(run_log.contains(&part), "{run_log}");
    assert!(check_err.contains(&part), "{check_err}");

    // The good config passes again.
    std::fs::remove_file(&key).unwrap();
    let out = host.command().arg("check-config").output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Issue 21 §6: without `--config` and without the default file, the agent
/// says which path it tried and how to pass one (exit 3); a `--config` that
/// does not exist is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_config_the_agent_names_the_default_and_how_to_pass_one() {
    let bare = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ringfenced"));
        cmd.env_remove("RINGFENCED_CONFIG")
            .env_remove("JOURNAL_STREAM")
            .stdin(std::process::Stdio::null());
        cmd
    };
    let default = ringfenced::config::DEFAULT_CONFIG_PATH;
    let out = bare().arg("check-config").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if std::path::Path::new(default).exists() {
        // A host with the package installed: the default is what it reads.
        assert!(!err.contains("no config file"), "{err}");
    } else {
        assert_eq!(out.status.code(), Some(3), "{err}");
        for part in [
            format!("tried {default}"),
            "--config PATH".to_string(),
            "RINGFENCED_CONFIG=PATH".to_string(),
        ] {
            assert!(err.contains(&part), "`{part}` missing: {err}");
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("agent.toml");
    let out = bare()
        .arg("--config")
        .arg(&missing)
        .arg("check-config")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!("{}: cannot read", missing.display())),
        "{err}"
    );
}
