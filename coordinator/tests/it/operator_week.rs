//! The operator's first week, on the command line against real agents
//! (in-process, real mTLS), judged by the agents' own records: returning a
//! host a failed wave left drained (`hosts undrain` validates first), and
//! the health table naming who drained a host and why.

use std::path::Path;
use std::process::Command;

use ringfence_devfleet::local_fleet::{self, HostSpec, LocalFleet, Mode};

use crate::common::{actions, health, journal};

fn ringfence(settings: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ringfence"));
    c.arg("--config").arg(settings);
    c
}

async fn output(mut c: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// gpu-1 (ring 0) breaks on the new version; gpu-2 (ring 1) is fine.
async fn fleet(dir: &Path) -> LocalFleet {
    ringfence::tls::install_crypto_provider();
    let host = |id: &str, ring: u32, faulty: bool| HostSpec {
        id: id.into(),
        ring,
        pool: "h100-train".into(),
        faulty_version: faulty.then(|| local_fleet::NEW_VERSION.to_string()),
        busy_for_s: None,
        xid_trigger: false,
    };
    let mut f = LocalFleet::start(
        dir,
        vec![host("gpu-1", 0, true), host("gpu-2", 1, false)],
        Mode::InProcess,
        2,
    )
    .await
    .unwrap();
    f.pool_reserve.insert("h100-train".into(), 50);
    f.write_inventory().unwrap();
    f
}

/// `hosts health --json`, its exit code and rows by host.
async fn health_rows(f: &LocalFleet) -> (Option<i32>, Vec<serde_json::Value>) {
    let mut c = ringfence(&f.settings);
    c.args(["hosts", "health", "--json", "--inventory"])
        .arg(&f.inventory);
    let out = output(c).await;
    let rows = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out.status.code(), rows)
}

fn row<'a>(rows: &'a [serde_json::Value], host: &str) -> &'a serde_json::Value {
    rows.iter().find(|r| r["host"] == host).unwrap()
}

fn undrain(f: &LocalFleet, host: &str, reason: &str) -> Command {
    let mut c = ringfence(&f.settings);
    c.args(["hosts", "undrain", "--host", host, "--reason", reason])
        .arg("--inventory")
        .arg(&f.inventory);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_left_drained_is_undrained_by_hand_only_once_it_validates() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path()).await;
    let spec = f
        .write_spec("w-week", "[ring.0]\nbatch_size = 1\nsoak_s = 0\n")
        .unwrap();
    let mut run = ringfence(&f.settings);
    run.args(["wave", "run", "--inventory"])
        .arg(&f.inventory)
        .arg("--spec")
        .arg(&spec);
    let out = output(run).await;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        health(&f, "gpu-1").await.draining,
        "the canary is left drained"
    );

    // The health table says who drained it and why, and exits non-zero.
    let (code, rows) = health_rows(&f).await;
    assert_eq!(code, Some(1));
    let g1 = row(&rows, "gpu-1");
    assert_eq!(g1["verdict"], "UNHEALTHY", "{g1}");
    assert_eq!(g1["drain_mark"]["wave"], "w-week", "{g1}");
    assert!(!g1["drain_mark"]["signed_by"].as_str().unwrap().is_empty());
    let mut c = ringfence(&f.settings);
    c.args(["hosts", "health", "--inventory"]).arg(&f.inventory);
    let table = text(&output(c).await.stdout);
    assert!(
        table.contains("drained since") && table.contains("wave w-week"),
        "{table}"
    );

    // While it is unhealthy, undrain validates and refuses.
    let out = output(undrain(&f, "gpu-1", "ticket 42")).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("left drained") && err.contains("UNHEALTHY"),
        "{err}"
    );
    assert!(health(&f, "gpu-1").await.draining);
    let tasks = journal(&f, "gpu-1").await;
    assert_eq!(actions(&tasks).last().map(String::as_str), Some("validate"));
    assert!(!actions(&tasks).contains(&"undrain".to_string()));

    // The fault clears (the old driver is back): it validates and undrains.
    let h1 = f.hosts.iter().find(|h| h.spec.id == "gpu-1").unwrap();
    std::fs::write(h1.dir.join("driver_version"), local_fleet::OLD_VERSION).unwrap();
    let out = output(undrain(&f, "gpu-1", "ticket 42: driver reverted")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("validated HEALTHY"));
    let rep = health(&f, "gpu-1").await;
    assert!(!rep.draining && rep.drain_mark.is_none(), "{rep:?}");

    // The agent's journal: a validate that passed, then the undrain with
    // the operator's reason, both signed outside the wave.
    let tasks = journal(&f, "gpu-1").await;
    let n = tasks.len();
    assert_eq!(actions(&tasks[n - 2..]), ["validate", "undrain"]);
    let last = &tasks[n - 1];
    assert_eq!(last.state, ringfence::pb::TaskState::Succeeded as i32);
    assert_eq!(last.wave_id, "hosts-by-hand");
    assert!(tasks[n - 2].sequence < last.sequence);
    let (code, rows) = health_rows(&f).await;
    assert_eq!(code, Some(0), "{rows:?}");
    assert_eq!(row(&rows, "gpu-1")["draining"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_by_hand_is_marked_with_the_operators_reason() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path()).await;
    let mut c = ringfence(&f.settings);
    c.args(["hosts", "drain", "--host", "gpu-2", "--reason", "rack move"])
        .arg("--inventory")
        .arg(&f.inventory);
    let out = output(c).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rep = health(&f, "gpu-2").await;
    let mark = rep.drain_mark.unwrap();
    assert!(
        mark.reason
            .starts_with("rack move (ringfence hosts drain by "),
        "{mark:?}"
    );
    assert_eq!(mark.wave_id, "hosts-by-hand");
    let (code, rows) = health_rows(&f).await;
    assert_eq!(code, Some(0), "a drained HEALTHY host is healthy: {rows:?}");
    assert!(
        row(&rows, "gpu-2")["drain_mark"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("rack move")
    );
    // Healthy: undrain puts it back without approvals.
    let out = output(undrain(&f, "gpu-2", "moved")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!health(&f, "gpu-2").await.draining);
}

fn wave_run(f: &LocalFleet, spec: &Path) -> Command {
    let mut c = ringfence(&f.settings);
    c.args(["wave", "run", "--inventory"])
        .arg(&f.inventory)
        .arg("--spec")
        .arg(spec);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_belongs_to_one_active_wave_until_that_wave_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path()).await;
    let pacing = "[ring.0]\nbatch_size = 1\nsoak_s = 0\n";
    let a = f.write_spec("w-a", pacing).unwrap();
    let out = output(wave_run(&f, &a)).await;
    assert_eq!(
        out.status.code(),
        Some(4),
        "w-a halts: {}",
        text(&out.stderr)
    );

    // w-a is halted, still active: a second wave over its hosts is refused
    // before it drains anything, naming w-a.
    let before = journal(&f, "gpu-2").await.len();
    let b = f.write_spec("w-b", pacing).unwrap();
    let out = output(wave_run(&f, &b)).await;
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(
        err.contains("already belong to active wave `w-a`") && err.contains("gpu-2"),
        "{err}"
    );
    assert_eq!(journal(&f, "gpu-2").await.len(), before, "w-b sent nothing");
    assert!(!health(&f, "gpu-2").await.draining);

    // Aborted, w-a releases its hosts.
    let mut c = ringfence(&f.settings);
    c.args(["wave", "abort", "--wave", "w-a"]);
    let out = output(c).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = output(wave_run(&f, &b)).await;
    let err = text(&out.stderr);
    assert!(!err.contains("already belong to active wave"), "{err}");
    let claims: serde_json::Value =
        serde_json::from_slice(&std::fs::read(f.state_dir.join("hosts.json")).unwrap()).unwrap();
    assert!(claims.get("w-a").is_none(), "{claims}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_evidence_packet_stays_and_the_chain_shows_an_altered_one() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path()).await;
    let spec = f
        .write_spec("w-ev", "[ring.0]\nbatch_size = 1\nsoak_s = 0\n")
        .unwrap();
    let out = output(wave_run(&f, &spec)).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let ev = f.state_dir.join("w-ev.evidence");
    let first = ev.join("ring-0.json");
    let halted = std::fs::read(&first).unwrap();

    // Retried, the canary fails again: a second packet, the first untouched.
    let mut c = ringfence(&f.settings);
    c.args(["wave", "resume", "--wave", "w-ev", "--retry", "gpu-1"])
        .arg("--inventory")
        .arg(&f.inventory);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let second = ev.join("ring-0.1.json");
    assert_eq!(std::fs::read(&first).unwrap(), halted, "never rewritten");
    let chain = ringfence_coordinator::evidence::verify_chain(&second).unwrap();
    assert_eq!(chain, [first.clone(), second.clone()]);
    let file: ringfence_coordinator::evidence::PacketFile =
        serde_json::from_slice(&std::fs::read(&second).unwrap()).unwrap();
    let p: ringfence_coordinator::evidence::Packet =
        serde_json::from_slice(&file.to_envelope().unwrap().payload).unwrap();
    assert_eq!(p.outcome, "halted");
    assert_eq!(
        p.previous.as_deref(),
        Some(ringfence_coordinator::approvals::digest(&halted).as_str())
    );
    let verify = |packet: &Path| {
        let mut c = ringfence(&f.settings);
        c.args(["evidence", "verify"])
            .arg(packet)
            .arg("--inventory")
            .arg(&f.inventory);
        c
    };
    let out = output(verify(&second)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Altering the first packet (even outside its signed payload) breaks the chain.
    let mut altered = halted.clone();
    altered.push(b'\n');
    std::fs::write(&first, &altered).unwrap();
    let out = output(verify(&second)).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("[chain]") && err.contains("ring-0.1.json"),
        "{err}"
    );
}
