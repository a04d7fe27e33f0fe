#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The operator's command line against real agents (in-process, real mTLS):
//! enrolment, the health table, and steering a running wave from another
//! terminal (`wave status`, a second coordinator, `wave halt`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringfence_devfleet::local_fleet::{self, HostSpec, LocalFleet, Mode};

fn ringfence(settings: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ringfence"));
    c.arg("--config").arg(settings);
    c
}

fn spec(id: &str, ring: u32, pool: &str) -> HostSpec {
    HostSpec {
        id: id.into(),
        ring,
        pool: pool.into(),
        faulty_version: None,
        busy_for_s: None,
        xid_trigger: false,
    }
}

async fn fleet(dir: &Path) -> LocalFleet {
    ringfence::tls::install_crypto_provider();
    let mut f = LocalFleet::start(
        dir,
        vec![
            spec("gpu-1", 0, "h100-train"),
            spec("gpu-2", 2, "h100-train"),
            spec("gpu-3", 2, "a100-infer"),
            spec("gpu-4", 3, "a100-infer"),
        ],
        Mode::InProcess,
        2,
    )
    .await
    .unwrap();
    // Small pools: 50% of 2 hosts lets one out at a time.
    f.pool_reserve.insert("h100-train".into(), 50);
    f.pool_reserve.insert("a100-infer".into(), 50);
    f.write_inventory().unwrap();
    f
}

async fn output(mut c: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_fills_missing_keys_and_refuses_a_changed_one() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path()).await;
    // Forget every key, as a fresh inventory would.
    let text = std::fs::read_to_string(&f.inventory).unwrap();
    let stripped: String = text
        .lines()
        .filter(|l| !l.starts_with("attestation_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&f.inventory, &stripped).unwrap();

    let mut c = ringfence(&f.settings);
    c.args(["inventory", "enroll", "--inventory"])
        .arg(&f.inventory);
    let out = output(c).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let enrolled = std::fs::read_to_string(&f.inventory).unwrap();
    for h in &f.hosts {
        assert!(
            enrolled.contains(&ringfence::keys::public_key_text(&h.public_key)),
            "{} not enrolled",
            h.spec.id
        );
    }

    // A host that presents another key (reinstall or impersonation) is refused loudly.
    let other = ringfence::keys::public_key_text(&ringfence::keys::generate().verifying_key());
    let swapped = enrolled.replacen(
        &ringfence::keys::public_key_text(&f.hosts[1].public_key),
        &other,
        1,
    );
    std::fs::write(&f.inventory, &swapped).unwrap();
    let mut c = ringfence(&f.settings);
    c.args(["inventory", "enroll", "--inventory"])
        .arg(&f.inventory);
    let out = output(c).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gpu-2") && err.contains("KEY CHANGED"),
        "{err}"
    );
    assert!(
        std::fs::read_to_string(&f.inventory)
            .unwrap()
            .contains(&other),
        "refused key left as it was"
    );

    // --rekey accepts it.
    let mut c = ringfence(&f.settings);
    c.args(["inventory", "enroll", "--rekey", "gpu-2", "--inventory"])
        .arg(&f.inventory);
    let out = output(c).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !std::fs::read_to_string(&f.inventory)
            .unwrap()
            .contains(&other)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_table_lists_every_host_and_never_hangs_on_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path()).await;
    // A host whose address answers nothing: a bound listener that never accepts TLS.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut inv = std::fs::read_to_string(&f.inventory).unwrap();
    inv.push_str(&format!(
        "\n[[host]]\nid = \"gpu-dead\"\naddress = \"{}\"\npool = \"h100-train\"\nring = 4\nexpected_gpus = 2\n",
        silent.local_addr().unwrap()
    ));
    std::fs::write(&f.inventory, inv).unwrap();
    let started = Instant::now();
    let mut c = ringfence(&f.settings);
    c.args(["hosts", "health", "--json", "--inventory"])
        .arg(&f.inventory);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1), "a dead host is a non-zero exit");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    for r in &rows {
        if r["host"] == "gpu-dead" {
            assert_eq!(r["verdict"], "UNREACHABLE");
        } else {
            assert_eq!(r["verdict"], "HEALTHY", "{r}");
            assert_eq!(r["driver"], local_fleet::OLD_VERSION);
            assert_eq!(r["attested"], true);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_wave_is_seen_from_another_terminal_and_halted_there() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path()).await;
    let spec_path = f
        .write_spec("w-status", "[ring.0]\nbatch_size = 1\nsoak_s = 0\n")
        .unwrap();
    let mut run = ringfence(&f.settings);
    run.args(["wave", "run", "--json", "--inventory"])
        .arg(&f.inventory)
        .arg("--spec")
        .arg(&spec_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = run.spawn().unwrap();

    // Ring 2 is protected and nobody approves: the wave waits there.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let mut c = ringfence(&f.settings);
        c.args(["wave", "status", "--json", "--wave", "w-status"]);
        let out = output(c).await;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["phase"] == "awaiting_approval" {
                break v;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "wave never reached the approval gate: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["rings"]["2"]["approval"], "AWAITING_APPROVAL");
    assert_eq!(status["hosts"]["gpu-1"], "done");

    // A second coordinator on the same wave is refused and told who holds it.
    let mut second = ringfence(&f.settings);
    second
        .args(["wave", "resume", "--wave", "w-status", "--inventory"])
        .arg(&f.inventory);
    let out = output(second).await;
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("held by another coordinator") && err.contains("pid"),
        "{err}"
    );

    // Abort while it runs is refused: halt it first; the holder's start is readable.
    let mut abort = ringfence(&f.settings);
    abort.args(["wave", "abort", "--wave", "w-status"]);
    let out = output(abort).await;
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("abort refused")
            && err.contains("`ringfence wave halt --wave w-status`")
            && err.contains("running since 20")
            && err.contains("Z)"),
        "{err}"
    );

    // Emergency stop from this terminal.
    let mut halt = ringfence(&f.settings);
    halt.args(["wave", "halt", "--wave", "w-status"]);
    assert!(output(halt).await.status.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HALTED") && err.contains("operator"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halting_a_wave_that_does_not_exist_is_an_error_not_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let settings = dir.path().join("ringfence.toml");
    std::fs::write(
        &settings,
        format!(
            "state_dir = \"{}\"\ntrust_file = \"/nonexistent/trust.toml\"\n[signing]\nkey = \"/nonexistent/c.key\"\nkey_id = \"c\"\n[tls]\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/c.key\"\nca_bundle = \"/nonexistent/ca.pem\"\n",
            state.display()
        ),
    )
    .unwrap();
    // A typo in the wave id: the operator must not believe the wave stops.
    let mut c = ringfence(&settings);
    c.args(["wave", "halt", "--wave", "w-typo"]);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no state for wave `w-typo`"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("halt requested"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        std::fs::read_dir(&state).unwrap().next().is_none(),
        "nothing written for a wave that does not exist"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_glass_for_an_unknown_pool_or_more_hosts_than_the_pool_has_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path()).await;
    let spec_path = f
        .write_spec("w-bg", "[ring.0]\nbatch_size = 1\nsoak_s = 0\n")
        .unwrap();
    let sign =
        |pool: &str, max_out: &str, out: &Path, inventory: bool, add_to: bool, key: usize| {
            let mut c = ringfence(&f.settings);
            c.args(["breakglass", "sign", "--wave", "w-bg", "--pool", pool])
                .args(["--max-out", max_out, "--reason", "tonight"])
                .arg("--key")
                .arg(&f.approver_keys[key])
                .arg("--out")
                .arg(out);
            if inventory {
                c.arg("--inventory").arg(&f.inventory);
            }
            if add_to {
                c.arg("--add-to");
            }
            c
        };
    // At signing time, with the inventory: a misspelt pool, and more hosts
    // than the pool has (h100-train has 2).
    let typo = f.root.join("bg-typo.json");
    let out = output(sign("h100-trian", "1", &typo, true, false, 0)).await;
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`h100-trian`") && err.contains("not in the inventory"),
        "{err}"
    );
    assert!(!typo.exists());
    let big = f.root.join("bg-big.json");
    let out = output(sign("h100-train", "3", &big, true, false, 0)).await;
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_out 3 is more than the pool's 2"), "{err}");

    // Signed without the inventory by both approvers: `wave run` refuses
    // it before anything starts.
    for (pool, max_out, file, why) in [
        ("h100-trian", "1", &typo, "not in the inventory"),
        (
            "h100-train",
            "3",
            &big,
            "max_out 3 is more than the pool's 2",
        ),
    ] {
        assert!(
            output(sign(pool, max_out, file, false, false, 0))
                .await
                .status
                .success()
        );
        // Countersigning with the inventory checks the file, not the flags.
        let out = output(sign("a100-infer", "1", file, true, true, 1)).await;
        assert_eq!(
            out.status.code(),
            Some(3),
            "countersigned {}",
            file.display()
        );
        assert!(
            output(sign(pool, max_out, file, false, true, 1))
                .await
                .status
                .success()
        );
        let mut run = ringfence(&f.settings);
        run.args(["wave", "run", "--inventory"])
            .arg(&f.inventory)
            .arg("--spec")
            .arg(&spec_path)
            .arg("--break-glass")
            .arg(file);
        let out = output(run).await;
        assert_eq!(out.status.code(), Some(3));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
        assert!(
            !f.state_dir.join("w-bg.redb").exists(),
            "the wave never started"
        );
    }
}

/// Simulated agents (real task verification, real signed identities) behind
/// one mTLS listener, each configured in its own ring, and an inventory
/// that may say otherwise: (host id, inventory ring, agent ring).
struct SimFleetRun {
    root: std::path::PathBuf,
    settings: std::path::PathBuf,
    inventory: std::path::PathBuf,
    hosts: ringfence_devfleet::simhost::MultiHost,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn sim_fleet(dir: &Path, hosts: &[(&str, u32, u32)]) -> SimFleetRun {
    use ringfence::pki;
    use ringfence::spiffe::Role;
    use ringfence_devfleet::simhost::{MultiHost, SimFleet, SimHostSpec};
    ringfence::tls::install_crypto_provider();
    let td = local_fleet::TRUST_DOMAIN;
    let pki_dir = dir.join("pki");
    pki::init(&pki_dir, td).unwrap();
    let ops = pki::issue(&pki_dir, Role::Ops, "coordinator", dir, 30).unwrap();
    let keys = local_fleet::write_keys(dir, 2).unwrap();
    let ca = pki_dir.join("ca.pem");
    let settings =
        local_fleet::write_settings(dir, &dir.join("state"), &keys, &ops.cert, &ops.key, &ca)
            .unwrap();
    let mut specs = Vec::new();
    let mut inv =
        format!("trust_domain = \"{td}\"\n\n[[pool]]\nname = \"p\"\nreserve_percent = 50\n");
    for (id, inv_ring, agent_ring) in hosts {
        let issued = pki::issue(&pki_dir, Role::Host, id, &dir.join("hosts"), 30).unwrap();
        let att = ringfence::keys::generate();
        specs.push(SimHostSpec {
            id: id.to_string(),
            ring: *agent_ring,
            cert_pem: std::fs::read_to_string(&issued.cert).unwrap(),
            key_pem: std::fs::read_to_string(&issued.key).unwrap(),
            attestation_seed: hex::encode(att.to_bytes()),
        });
        inv.push_str(&format!(
            "\n[[host]]\nid = \"{id}\"\naddress = \"ADDR\"\npool = \"p\"\nring = {inv_ring}\nattestation_key = \"{}\"\n",
            ringfence::keys::public_key_text(&att.verifying_key())
        ));
    }
    let sim = SimFleet {
        trust_domain: td.into(),
        driver_version: local_fleet::OLD_VERSION.into(),
        hosts: specs,
    };
    let trust = std::sync::Arc::new(ringfence::trust::TrustSet::load(&keys.trust).unwrap());
    let multi = MultiHost::new(&sim, trust, None).unwrap();
    let ids: Vec<ringfence::tls::SniIdentity> = sim
        .hosts
        .iter()
        .map(|h| ringfence::tls::SniIdentity {
            name: h.id.clone(),
            cert_pem: h.cert_pem.clone().into_bytes(),
            key_pem: h.key_pem.clone().into_bytes(),
        })
        .collect();
    let config =
        ringfence::tls::server_config_by_sni(&ids, &std::fs::read(&ca).unwrap(), td).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let routes =
        tonic::service::Routes::new(ringfence::pb::agent_server::AgentServer::new(multi.clone()));
    tokio::spawn(ringfence::tls::serve(
        listener,
        ringfence::tls::ReloadableServerConfig::fixed(config, td),
        routes,
        async {
            let _ = stopped.await;
        },
    ));
    let inventory = dir.join("inventory.toml");
    std::fs::write(&inventory, inv.replace("ADDR", &addr.to_string())).unwrap();
    SimFleetRun {
        root: dir.to_path_buf(),
        settings,
        inventory,
        hosts: multi,
        _stop: stop,
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The agents decide their ring; the inventory can only agree. A host whose
/// agent is in another ring, or in none, is shown by `inventory check
/// --live` and `inventory enroll`, and `wave run` refuses to start (exit 3)
/// naming every such host, before any host is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wave_run_refuses_to_start_while_an_agents_ring_differs_from_the_inventory() {
    use ringfence_devfleet::simhost::SimRing;
    let dir = tempfile::tempdir().unwrap();
    let f = sim_fleet(
        dir.path(),
        &[
            ("gpu-a", 0, 0),
            // The inventory says ring 1, the agent is configured in ring 3.
            ("gpu-b", 1, 3),
            ("gpu-c", 2, 2),
            ("gpu-d", 3, 3),
        ],
    )
    .await;
    // gpu-c's agent has no ring configured.
    f.hosts.host_by_id("gpu-c").unwrap().state().ring = SimRing::NotConfigured;

    let mut c = ringfence(&f.settings);
    c.args(["inventory", "check", "--live"]).arg(&f.inventory);
    let o = output(c).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("gpu-b: RING MISMATCH: inventory ring 1, agent configured in ring 3"),
        "{}",
        text(&o)
    );
    assert!(out.contains("gpu-c: NO RING CONFIGURED"), "{}", text(&o));
    assert!(
        !out.contains("gpu-a:") && !out.contains("gpu-d:"),
        "{}",
        text(&o)
    );
    // Without --live nothing is asked: the file itself is valid.
    let mut c = ringfence(&f.settings);
    c.args(["inventory", "check"]).arg(&f.inventory);
    assert!(output(c).await.status.success());

    let mut c = ringfence(&f.settings);
    c.args(["inventory", "enroll", "--inventory"])
        .arg(&f.inventory);
    let o = output(c).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("gpu-b: RING MISMATCH") && text(&o).contains("gpu-c: NO RING"),
        "{}",
        text(&o)
    );

    let spec = f.root.join("wave.toml");
    std::fs::write(
        &spec,
        "wave_id = \"w-rings\"\nprofile = \"nvidia-driver\"\nversion = \"560.35.03\"\n",
    )
    .unwrap();
    let mut c = ringfence(&f.settings);
    c.args(["wave", "run", "--inventory"])
        .arg(&f.inventory)
        .arg("--spec")
        .arg(&spec);
    let o = output(c).await;
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("wave w-rings refused"), "{}", text(&o));
    assert!(
        err.contains("gpu-b: RING MISMATCH: inventory ring 1, agent configured in ring 3"),
        "{}",
        text(&o)
    );
    assert!(err.contains("gpu-c: NO RING CONFIGURED"), "{}", text(&o));
    assert!(
        !err.contains("gpu-a") && !err.contains("gpu-d"),
        "{}",
        text(&o)
    );
    let seen = f.hosts.snapshot();
    assert!(
        seen.events.is_empty(),
        "a host was touched: {:?}",
        seen.events
    );
    assert!(seen.patches.values().all(|n| *n == 0));

    // Inventory and agents agree again: the live check passes.
    let fixed = std::fs::read_to_string(&f.inventory)
        .unwrap()
        .replacen("ring = 1", "ring = 3", 1);
    std::fs::write(&f.inventory, fixed).unwrap();
    f.hosts.host_by_id("gpu-c").unwrap().state().ring = SimRing::Configured(2);
    let mut c = ringfence(&f.settings);
    c.args(["inventory", "check", "--live"]).arg(&f.inventory);
    let o = output(c).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("4 checked"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_check_warns_when_a_pools_reserve_rounds_down_to_no_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut inv = String::from(
        "trust_domain = \"t.test\"\n[[pool]]\nname = \"small\"\nreserve_percent = 15\n[[pool]]\nname = \"big\"\nreserve_percent = 15\n",
    );
    for i in 0..4 {
        inv.push_str(&format!(
            "[[host]]\nid = \"s{i}\"\naddress = \"127.0.0.1:{}\"\npool = \"small\"\nring = {i}\n",
            7100 + i
        ));
    }
    for i in 0..7 {
        inv.push_str(&format!(
            "[[host]]\nid = \"b{i}\"\naddress = \"127.0.0.1:{}\"\npool = \"big\"\nring = 1\n",
            7200 + i
        ));
    }
    let file = dir.path().join("inventory.toml");
    std::fs::write(&file, inv).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_ringfence"));
    c.args(["inventory", "check"]).arg(&file);
    let out = output(c).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 4 × 15 % = 0.6 → 0 hosts: warned, with the percent that allows one.
    assert!(
        text.contains(
            "warning: pool `small`: 4 hosts at reserve_percent = 15 rounds down to 0 hosts"
        ) && text.contains("reserve_percent = 25 allows one"),
        "{text}"
    );
    // 7 × 15 % = 1.05 → 1 host: no warning.
    assert!(!text.contains("pool `big`: 7 hosts"), "{text}");
}

/// `ringfence … | head -1`: the reader is gone before the command writes;
/// the command ends as it would have (its exit code), without a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_a_closed_pipe_is_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab_init(dir.path(), 2).await;
    // A wave's status snapshot, as a running coordinator leaves it.
    std::fs::create_dir_all(lab.join("state")).unwrap();
    std::fs::write(
        lab.join("state/w-pipe.status.json"),
        serde_json::json!({
            "wave_id": "w-pipe", "phase": "running", "ring": 0, "rings": {}, "pools": {},
            "failures": [0, 0], "halt": null, "next_window": null, "break_glass": [],
            "ring_hosts": {}, "profile": "p", "version": "v", "rollback_version": "",
            "started_at_ms": 0, "updated_at_ms": 0, "hosts": {}
        })
        .to_string(),
    )
    .unwrap();
    let settings = lab.join("ringfence.toml");
    let inventory = lab.join("inventory.toml");
    let status = ["wave", "status", "--wave", "w-pipe"];
    let health = [
        "hosts",
        "health",
        "--inventory",
        inventory.to_str().unwrap(),
    ];
    // Ports 1 and 2 on loopback: nobody answers; the table says so (exit 1).
    for (args, code) in [(&status[..], 0), (&health[..], 1)] {
        let (read, write) = std::io::pipe().unwrap();
        drop(read);
        let mut c = ringfence(&settings);
        c.args(args).stdout(write).stderr(Stdio::piped());
        let out = output(c).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    }
}

/// `wave approve` refuses what it must not sign, and an aborted wave stays
/// ended: a second approval with the same key, a ring that is not
/// protected, an aborted wave; `wave run` with the aborted wave's id.
/// (A lab's files; no agent is needed for any of it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_that_cannot_count_and_a_reused_wave_id_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab_init(dir.path(), 4).await;
    let settings = lab.join("ringfence.toml");
    let approve = |ring: &str, key: &str| {
        let mut c = ringfence(&settings);
        c.current_dir(&lab).args([
            "wave",
            "approve",
            "--wave",
            "lab-1",
            "--ring",
            ring,
            "--key",
            key,
            "--inventory",
            "inventory.toml",
            "--spec",
            "wave.toml",
            "--yes",
        ]);
        c
    };
    let out = output(approve("2", "alice.key")).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("approval 1 of 2 for ring 2 (alice)"),
        "{}",
        text(&out)
    );

    let out = output(approve("2", "alice.key")).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("not signed: alice already approved wave lab-1 ring 2")
            && text(&out).contains("approvals need distinct keys"),
        "{}",
        text(&out)
    );
    let out = output(approve("1", "alice.key")).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("ring 1 is not protected in wave lab-1"),
        "{}",
        text(&out)
    );

    // The wave ran (its status snapshot), then an operator aborted it.
    std::fs::create_dir_all(lab.join("state")).unwrap();
    std::fs::write(
        lab.join("state/lab-1.status.json"),
        serde_json::json!({
            "wave_id": "lab-1", "phase": "halted", "ring": 2, "rings": {}, "pools": {},
            "failures": [0, 0], "halt": null, "next_window": null, "break_glass": [],
            "ring_hosts": {"2": ["gpu-3"]}, "profile": "nvidia-driver",
            "version": "560.35.03", "rollback_version": "550.54.15",
            "started_at_ms": 0, "updated_at_ms": 0, "hosts": {}
        })
        .to_string(),
    )
    .unwrap();
    let mut abort = ringfence(&settings);
    abort.args(["wave", "abort", "--wave", "lab-1"]);
    let out = output(abort).await;
    assert!(out.status.success(), "{}", text(&out));
    let mut status = ringfence(&settings);
    status.args(["wave", "status", "--wave", "lab-1"]);
    let out = output(status).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("lab-1 aborted"),
        "{}",
        text(&out)
    );

    let out = output(approve("2", "bob.key")).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(text(&out).contains("aborted"), "{}", text(&out));
    assert!(!lab.join("state/lab-1.approvals/ring-2-bob.json").exists());

    let mut run = ringfence(&settings);
    run.current_dir(&lab).args([
        "wave",
        "run",
        "--inventory",
        "inventory.toml",
        "--spec",
        "wave.toml",
    ]);
    let out = output(run).await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("wave `lab-1` is already aborted")
            && text(&out).contains("choose a new `wave_id`"),
        "{}",
        text(&out)
    );
}

/// A pool of 4 hosts at 15 %: floor(0.6) = 0 hosts may ever be out, so no
/// wave can drain one. `wave plan` and `wave run` refuse it and say which
/// `reserve_percent` allows one host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_and_run_name_the_reserve_percent_that_lets_one_host_out() {
    let dir = tempfile::tempdir().unwrap();
    let lab = lab_init(dir.path(), 4).await;
    let inventory = lab.join("inventory.toml");
    let text_of = std::fs::read_to_string(&inventory).unwrap();
    assert!(text_of.contains("reserve_percent = 25"), "{text_of}");
    // Enrolled, as `inventory enroll` would leave it (one key per host).
    let mut enrolled = String::new();
    for line in text_of
        .replace("reserve_percent = 25", "reserve_percent = 15")
        .lines()
    {
        enrolled.push_str(line);
        enrolled.push('\n');
        if line == "expected_gpus = 2" {
            let key = ringfence::keys::generate().verifying_key();
            enrolled.push_str(&format!(
                "attestation_key = \"{}\"\n",
                ringfence::keys::public_key_text(&key)
            ));
        }
    }
    std::fs::write(&inventory, enrolled).unwrap();
    for cmd in ["plan", "run"] {
        let mut c = ringfence(&lab.join("ringfence.toml"));
        c.current_dir(&lab).args([
            "wave",
            cmd,
            "--inventory",
            "inventory.toml",
            "--spec",
            "wave.toml",
        ]);
        let out = output(c).await;
        assert_eq!(out.status.code(), Some(3), "{cmd}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("pool `lab`: 4 hosts at reserve_percent = 15 rounds down to 0 hosts")
                && err.contains("reserve_percent = 25 allows one")
                && err.contains("nothing was drained"),
            "{cmd}: {err}"
        );
    }
    // Fixed as advised, the same wave id plans (its hosts unreachable here).
    let fixed = std::fs::read_to_string(&inventory)
        .unwrap()
        .replace("reserve_percent = 15", "reserve_percent = 25");
    std::fs::write(&inventory, fixed).unwrap();
    let mut c = ringfence(&lab.join("ringfence.toml"));
    c.current_dir(&lab).args([
        "wave",
        "plan",
        "--inventory",
        "inventory.toml",
        "--spec",
        "wave.toml",
    ]);
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("reserve 25% → at most 1 out of service at once"),
        "{}",
        text(&out)
    );
}

/// `ringfence lab init --hosts N` under `dir` (ports from 1: nothing is
/// started); the lab's directory.
async fn lab_init(dir: &std::path::Path, hosts: usize) -> std::path::PathBuf {
    let lab = dir.join("lab");
    let mut init = Command::new(env!("CARGO_BIN_EXE_ringfence"));
    init.args([
        "lab",
        "init",
        "--hosts",
        &hosts.to_string(),
        "--base-port",
        "1",
        "--dir",
    ])
    .arg(&lab);
    assert!(output(init).await.status.success());
    lab
}
