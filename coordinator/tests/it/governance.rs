#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Governance scenarios on a real in-process fleet (real agents, real mTLS,
//! real signatures, simulated GPUs): ring approvals, the agent refusing an
//! approval for another ring, break-glass, signed evidence and its
//! verification, rollback (on failure, drill, and by hand), and maintenance
//! windows with an injected clock. Every scenario is judged by what the
//! agents recorded (their journals over mTLS, their driver_version files,
//! their health) and by the evidence files, not only by what the
//! coordinator says.

use crate::common;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use ringfence::config::Source;
use ringfence::pb;
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::time::{Clock, ManualClock, SystemClock};
use ringfence::tls::ClientIdentity;
use ringfence::trust::TrustSet;
use ringfence_coordinator::approvals;
use ringfence_coordinator::cli::report::{Mode as ReportMode, Reporter};
use ringfence_coordinator::evidence;
use ringfence_coordinator::inventory::Inventory;
use ringfence_coordinator::settings::Settings;
use ringfence_coordinator::spec::WaveSpec;
use ringfence_coordinator::store::{WavePaths, WaveStore};
use ringfence_coordinator::wave::{self, Outcome, TlsConnector};
use ringfence_devfleet::local_fleet::{self, HostSpec, LocalFleet};

const WAIT: Duration = Duration::from_secs(60);

fn host(id: &str, ring: u32) -> HostSpec {
    HostSpec {
        id: id.into(),
        ring,
        pool: "h100-train".into(),
        faulty_version: None,
        busy_for_s: None,
        xid_trigger: false,
    }
}

/// A fleet of real `ringfenced` processes on the fake NVML library whose
/// pools keep half their hosts in service (small test pools would otherwise
/// have no room at all under the default 20 %).
async fn fleet(dir: &Path, hosts: Vec<HostSpec>) -> LocalFleet {
    common::start(dir, hosts, &[("h100-train", 50), ("a100-infer", 50)]).await
}

fn identity(f: &LocalFleet) -> ClientIdentity {
    ClientIdentity::load(
        &f.root.join("ops-coordinator.pem"),
        &f.root.join("ops-coordinator.key"),
        &f.root.join("pki/ca.pem"),
    )
    .unwrap()
}

async fn agent(
    f: &LocalFleet,
    host: &str,
) -> pb::agent_client::AgentClient<tonic::transport::Channel> {
    let h = f.hosts.iter().find(|h| h.spec.id == host).unwrap();
    let expected = SpiffeId::new(local_fleet::TRUST_DOMAIN, Role::Host, host).unwrap();
    let ch = ringfence::tls::connect(&h.addr.to_string(), &expected, &identity(f))
        .await
        .unwrap();
    pb::agent_client::AgentClient::new(ch)
}

/// The tasks in a host's own journal (ListTasks over mTLS).
async fn journal(f: &LocalFleet, host: &str) -> Vec<pb::TaskStatus> {
    agent(f, host)
        .await
        .list_tasks(pb::ListTasksRequest {
            wave_id: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tasks
}

async fn patches(f: &LocalFleet, host: &str) -> Vec<pb::TaskStatus> {
    journal(f, host)
        .await
        .into_iter()
        .filter(|t| t.action == "patch")
        .collect()
}

/// A freshly collected report: the cached one may predate the last task
/// (e.g. a rollback that just cleared the ECC error).
async fn health(f: &LocalFleet, host: &str) -> pb::HealthReport {
    agent(f, host)
        .await
        .get_health(pb::GetHealthRequest { fresh: true })
        .await
        .unwrap()
        .into_inner()
}

fn driver_file(f: &LocalFleet, host: &str) -> String {
    f.hosts
        .iter()
        .find(|h| h.spec.id == host)
        .unwrap()
        .driver_version()
}

fn status(f: &LocalFleet, wave: &str) -> Option<serde_json::Value> {
    let path = WavePaths::new(&f.state_dir, wave).status;
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Poll `what` every 50 ms until it holds or `WAIT` passes.
async fn wait_until<F, Fut>(desc: &str, mut what: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !what().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {desc}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Run the `ringfence` binary against the fleet's settings.
fn cli(f: &LocalFleet, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ringfence"))
        .arg("--config")
        .arg(&f.settings)
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A driver built like `ringfence wave run` builds it, for in-process runs.
fn driver(f: &LocalFleet, spec_path: &Path) -> wave::Driver {
    let settings = Settings::load(Some(&f.settings)).unwrap();
    let trust = TrustSet::load(&settings.trust_file).unwrap();
    let inv = Inventory::load(&f.inventory).unwrap();
    let src = Source::read(spec_path).unwrap();
    let spec = WaveSpec::from_source(&src).unwrap();
    let store =
        Arc::new(WaveStore::open(&settings.state_dir, &spec.wave_id, &SystemClock).unwrap());
    store.put_meta(wave::META_SPEC_TEXT, &src.text).unwrap();
    let connector = Arc::new(TlsConnector {
        identity: identity(f),
        trust_domain: inv.trust_domain.clone(),
        connect_timeout: Duration::from_secs(5),
        rpc_timeout: Duration::from_secs(15),
    });
    let mut d = ringfence_coordinator::cli::driver(
        &settings,
        trust,
        inv,
        spec,
        store,
        connector,
        Reporter::with_mode(ReportMode::Plain),
        Vec::new(),
    )
    .unwrap();
    d.poll_interval = Duration::from_millis(50);
    d
}

fn packet_of(bytes: &[u8]) -> evidence::Packet {
    let file: evidence::PacketFile = serde_json::from_slice(bytes).unwrap();
    serde_json::from_slice(&B64.decode(file.payload).unwrap()).unwrap()
}

fn ring_approval(status: &serde_json::Value, wave: &str, ring: u32, who: &str) -> pb::RingApproval {
    let now = SystemClock.now_ms();
    pb::RingApproval {
        wave_id: wave.into(),
        ring,
        profile: status["profile"].as_str().unwrap().into(),
        version: status["version"].as_str().unwrap().into(),
        rollback_version: status["rollback_version"].as_str().unwrap().into(),
        host_ids: status["ring_hosts"][ring.to_string()]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string())
            .collect(),
        issued_at_unix_ms: now,
        expires_at_unix_ms: now + 3_600_000,
        approver: who.into(),
        actions: vec![pb::ApprovedAction::Patch as i32],
    }
}

/// Wait until the coordinator has been through several more loop ticks
/// (its status snapshot is rewritten every tick), so a file it should have
/// picked up has been seen.
async fn let_coordinator_look(f: &LocalFleet, wave: &str) {
    let since = SystemClock.now_ms() + 500;
    wait_until("the coordinator to tick past the new approval file", || {
        let s = status(f, wave);
        async move { s.is_some_and(|s| s["updated_at_ms"].as_i64().unwrap_or(0) > since) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_two_waits_for_two_distinct_approvers_and_a_ring_two_approval_cannot_patch_ring_three()
{
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(
        dir.path(),
        vec![
            host("gpu-r0", 0),
            host("gpu-c1", 2),
            host("gpu-c2", 2),
            host("gpu-p1", 3),
        ],
    )
    .await;
    let wave_id = "gov-approvals";
    let spec = f
        .write_spec(
            wave_id,
            "[ring.0]\nbatch_size = 1\nsoak_s = 0\n[ring.2]\nbatch_size = 2\nsoak_s = 0\n[ring.3]\nbatch_size = 1\nsoak_s = 0\n",
        )
        .unwrap();
    let mut d = driver(&f, &spec);
    let run = tokio::spawn(async move { d.run().await });

    // Ring 0 goes through; ring 2 waits for approval.
    wait_until("ring 2 awaiting approval", || {
        let s = status(&f, wave_id);
        async move {
            s.is_some_and(|s| {
                s["phase"] == "awaiting_approval"
                    && s["ring"] == 2
                    && s["rings"]["2"]["approval"] == "AWAITING_APPROVAL"
                    && s["rings"]["0"]["status"] == "complete"
            })
        }
    })
    .await;
    assert_eq!(driver_file(&f, "gpu-r0"), local_fleet::NEW_VERSION);
    for h in ["gpu-c1", "gpu-c2"] {
        assert!(
            patches(&f, h).await.is_empty(),
            "{h} got a patch unapproved"
        );
    }

    // The coordinator's own key can never approve.
    let coord_key = f.root.join("coordinator.key");
    let o = cli(
        &f,
        &[
            "wave",
            "approve",
            "--wave",
            wave_id,
            "--ring",
            "2",
            "--key",
            p(&coord_key),
            "--inventory",
            p(&f.inventory),
            "--spec",
            p(&spec),
            "--yes",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("coordinator key"), "{}", text(&o));

    // One approver of a threshold of two: not enough.
    let dir_a = approvals::approvals_dir(&f.state_dir, wave_id);
    let s = status(&f, wave_id).unwrap();
    let alice = ringfence::keys::read_signing_key(&f.approver_keys[0]).unwrap();
    approvals::write_file(
        &dir_a.join("ring-2-approver-0.json"),
        &approvals::sign_ring(
            &ring_approval(&s, wave_id, 2, "approver-0"),
            "approver-0",
            &alice,
        ),
    )
    .unwrap();
    let_coordinator_look(&f, wave_id).await;
    let s = status(&f, wave_id).unwrap();
    assert_eq!(s["phase"], "awaiting_approval", "{s}");
    assert_eq!(s["rings"]["2"]["approval"], "AWAITING_APPROVAL");
    for h in ["gpu-c1", "gpu-c2"] {
        assert!(
            patches(&f, h).await.is_empty(),
            "{h} patched on one approval"
        );
    }

    // The same approver again, in a second file under another key id: still one.
    approvals::write_file(
        &dir_a.join("ring-2-approver-0-again.json"),
        &approvals::sign_ring(
            &ring_approval(&s, wave_id, 2, "alice-again"),
            "alice-again",
            &alice,
        ),
    )
    .unwrap();
    let_coordinator_look(&f, wave_id).await;
    let s = status(&f, wave_id).unwrap();
    assert_eq!(s["rings"]["2"]["approval"], "AWAITING_APPROVAL", "{s}");
    for h in ["gpu-c1", "gpu-c2"] {
        assert!(
            patches(&f, h).await.is_empty(),
            "{h} patched on one approver counted twice"
        );
    }

    // A second, distinct approver signs on the command line: ring 2 runs.
    // First what an approver must be shown and what is refused.
    let approve = |extra: &[&str]| {
        let mut args = vec![
            "wave",
            "approve",
            "--wave",
            wave_id,
            "--ring",
            "2",
            "--key",
            p(&f.approver_keys[1]),
            "--inventory",
            p(&f.inventory),
            "--spec",
            p(&spec),
        ];
        args.extend_from_slice(extra);
        cli(&f, &args)
    };
    let signed_file = dir_a.join("ring-2-approver-1.json");
    // Off a terminal without --yes: the whole scope is printed, nothing signed.
    let o = approve(&[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout).to_string();
    for want in [
        "gpu-c1",
        "gpu-c2",
        "nvidia-driver",
        local_fleet::NEW_VERSION,
        local_fleet::OLD_VERSION,
        "patch, rollback",
        "sha256:",
    ] {
        assert!(shown.contains(want), "`{want}` not shown:\n{shown}");
    }
    assert!(!shown.contains("gpu-p1"), "a ring-3 host shown:\n{shown}");
    assert!(!signed_file.exists(), "signed without confirmation");
    // An inventory that puts another host in ring 2 differs from what the
    // coordinator runs: refused, naming the host.
    let moved = f.root.join("inventory-moved.toml");
    let inv_text = std::fs::read_to_string(&f.inventory).unwrap();
    let at = inv_text.find("id = \"gpu-p1\"").unwrap();
    let (head, tail) = inv_text.split_at(at);
    std::fs::write(
        &moved,
        format!("{head}{}", tail.replacen("ring = 3", "ring = 2", 1)),
    )
    .unwrap();
    let o = cli(
        &f,
        &[
            "wave",
            "approve",
            "--wave",
            wave_id,
            "--ring",
            "2",
            "--key",
            p(&f.approver_keys[1]),
            "--inventory",
            p(&moved),
            "--spec",
            p(&spec),
            "--yes",
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("differs") && text(&o).contains("gpu-p1"),
        "{}",
        text(&o)
    );
    assert!(!signed_file.exists());
    // A lifetime over the spec's approval_ttl_s (default 24 h) is refused.
    let o = approve(&["--yes", "--ttl", "2d"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("approval_ttl_s"), "{}", text(&o));
    assert!(!signed_file.exists());
    let o = approve(&["--yes", "--action", "patch", "--ttl", "2h"]);
    assert!(o.status.success(), "{}", text(&o));
    // What was signed is what was asked, and what was shown.
    let env = approvals::read_file(&signed_file).unwrap();
    let a = pb::RingApproval::decode(env.payload.as_slice()).unwrap();
    assert_eq!(a.actions, [pb::ApprovedAction::Patch as i32]);
    assert_eq!(a.expires_at_unix_ms - a.issued_at_unix_ms, 7_200_000);
    assert_eq!(a.host_ids, ["gpu-c1", "gpu-c2"]);
    assert_eq!(a.version, local_fleet::NEW_VERSION);
    let shown = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        shown.contains(&approvals::digest(&env.payload)),
        "the digest of the signed payload was not shown:\n{shown}"
    );
    wait_until("ring 2 complete, ring 3 awaiting approval", || {
        let s = status(&f, wave_id);
        async move {
            s.is_some_and(|s| {
                s["rings"]["2"]["status"] == "complete"
                    && s["rings"]["3"]["approval"] == "AWAITING_APPROVAL"
                    && s["phase"] == "awaiting_approval"
            })
        }
    })
    .await;
    for h in ["gpu-c1", "gpu-c2"] {
        let p = patches(&f, h).await;
        assert_eq!(p.len(), 1, "{h}: {p:?}");
        assert_eq!(p[0].state, pb::TaskState::Succeeded as i32);
        assert_eq!(driver_file(&f, h), local_fleet::NEW_VERSION);
    }

    // Ring 3 is not approved. Even a coordinator that sends a ring-3 host a
    // Patch carrying the ring-2 approvals gets refused by the agent itself.
    let ring2: Vec<pb::Envelope> = std::fs::read_dir(&dir_a)
        .unwrap()
        .map(|e| approvals::read_file(&e.unwrap().path()).unwrap())
        .collect();
    assert!(ring2.len() >= 3);
    let coord = ringfence::keys::read_signing_key(&coord_key).unwrap();
    let mut c = agent(&f, "gpu-p1").await;
    let high = c
        .get_identity(pb::GetIdentityRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sequence_high_water;
    let now = SystemClock.now_ms();
    let payload = pb::TaskPayload {
        task_id: format!("{wave_id}/gpu-p1/{}/patch", high + 1),
        host_id: "gpu-p1".into(),
        wave_id: wave_id.into(),
        ring: 3,
        sequence: high + 1,
        issued_at_unix_ms: now,
        expires_at_unix_ms: now + 600_000,
        action: Some(pb::task_payload::Action::Patch(pb::Patch {
            profile: "nvidia-driver".into(),
            version: local_fleet::NEW_VERSION.into(),
            rollback: false,
        })),
    };
    let task = ringfence::envelope::sign_message(
        ringfence::envelope::TASK_TYPE,
        &payload,
        &[("coord-demo", &coord)],
    );
    let err = c
        .submit_task(pb::SignedTask {
            task: Some(task),
            approvals: ring2,
        })
        .await
        .expect_err("the agent must refuse a ring-3 patch under ring-2 approvals");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("approval_scope"), "{err:?}");
    assert!(
        journal(&f, "gpu-p1")
            .await
            .iter()
            .all(|t| t.action != "patch"),
        "the ring-3 agent journaled a patch"
    );
    assert_eq!(driver_file(&f, "gpu-p1"), local_fleet::OLD_VERSION);
    run.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_raises_one_pool_only_is_in_the_evidence_and_a_tampered_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut hosts: Vec<HostSpec> = (0..4).map(|i| host(&format!("gpu-h{i}"), 0)).collect();
    for i in 0..2 {
        hosts.push(HostSpec {
            pool: "a100-infer".into(),
            ..host(&format!("gpu-a{i}"), 1)
        });
    }
    let f = fleet(dir.path(), hosts).await;
    let wave_id = "gov-breakglass";
    let spec = f
        .write_spec(
            wave_id,
            "[ring.0]\nbatch_size = 4\nsoak_s = 0\n[ring.1]\nbatch_size = 2\nsoak_s = 0\n",
        )
        .unwrap();
    let bg = f.root.join("bg.json");
    let reason = "security fix must land tonight";
    let o = cli(
        &f,
        &[
            "breakglass",
            "sign",
            "--wave",
            wave_id,
            "--pool",
            "h100-train",
            "--max-out",
            "3",
            "--reason",
            reason,
            "--key",
            p(&f.approver_keys[0]),
            "--out",
            p(&bg),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = cli(
        &f,
        &[
            "breakglass",
            "sign",
            "--wave",
            wave_id,
            "--pool",
            "h100-train",
            "--max-out",
            "3",
            "--reason",
            reason,
            "--key",
            p(&f.approver_keys[1]),
            "--out",
            p(&bg),
            "--add-to",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));

    // Someone edits max_out in the signed file: refused, exit 3, nothing started.
    let mut file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&bg).unwrap()).unwrap();
    let mut grant = pb::BreakGlass::decode(
        B64.decode(file["payload"].as_str().unwrap())
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!(grant.max_out, 3);
    grant.max_out = 4;
    file["payload"] = B64.encode(grant.encode_to_vec()).into();
    let tampered = f.root.join("bg-tampered.json");
    std::fs::write(&tampered, file.to_string()).unwrap();
    let inv = f.inventory.clone();
    let o = cli(
        &f,
        &[
            "wave",
            "run",
            "--inventory",
            p(&inv),
            "--spec",
            p(&spec),
            "--break-glass",
            p(&tampered),
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("break-glass"), "{}", text(&o));
    assert!(!WavePaths::new(&f.state_dir, wave_id).db.exists());
    for h in &f.hosts {
        assert!(
            journal(&f, &h.spec.id).await.is_empty(),
            "{} touched",
            h.spec.id
        );
    }

    // The genuine file: the wave runs with the h100 pool raised to 3.
    let o = cli(
        &f,
        &[
            "wave",
            "run",
            "--inventory",
            p(&inv),
            "--spec",
            p(&spec),
            "--break-glass",
            p(&bg),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let s = status(&f, wave_id).unwrap();
    assert_eq!(s["phase"], "completed", "{s}");
    assert_eq!(s["pools"]["h100-train"][1], 3, "raised limit: {s}");
    assert_eq!(s["pools"]["a100-infer"][1], 1, "other pool unchanged: {s}");
    assert!(
        s["break_glass"][0].as_str().unwrap().contains(reason),
        "{s}"
    );
    for h in &f.hosts {
        assert_eq!(
            driver_file(&f, &h.spec.id),
            local_fleet::NEW_VERSION,
            "{}",
            h.spec.id
        );
        assert_eq!(patches(&f, &h.spec.id).await.len(), 1, "{}", h.spec.id);
    }

    // The ring-0 evidence carries the break-glass record, and verifies.
    let packet_path = WavePaths::new(&f.state_dir, wave_id)
        .evidence_dir
        .join("ring-0.json");
    let bytes = std::fs::read(&packet_path).unwrap();
    let packet = packet_of(&bytes);
    assert_eq!(packet.break_glass.len(), 1);
    let embedded =
        pb::Envelope::decode(B64.decode(&packet.break_glass[0]).unwrap().as_slice()).unwrap();
    assert_eq!(
        pb::BreakGlass::decode(embedded.payload.as_slice())
            .unwrap()
            .max_out,
        3
    );
    let o = cli(
        &f,
        &[
            "evidence",
            "verify",
            p(&packet_path),
            "--inventory",
            p(&inv),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("VALID"), "{}", text(&o));
    let trust = TrustSet::load(&f.trust).unwrap();
    let v = evidence::verify(
        &bytes,
        &trust,
        &Inventory::load(&inv).unwrap().enrolled_keys(),
    )
    .unwrap();
    assert_eq!(
        v.approvers.len(),
        2,
        "both break-glass signers: {:?}",
        v.approvers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_verify_fails_naming_the_cause_when_packet_attestation_or_inventory_key_change() {
    let dir = tempfile::tempdir().unwrap();
    let hosts: Vec<HostSpec> = (0..2).map(|i| host(&format!("gpu-e{i}"), 0)).collect();
    let f = fleet(dir.path(), hosts).await;
    let wave_id = "gov-evidence";
    let spec = f
        .write_spec(wave_id, "[ring.0]\nbatch_size = 1\nsoak_s = 0\n")
        .unwrap();
    let inv = f.inventory.clone();
    let o = cli(
        &f,
        &["wave", "run", "--inventory", p(&inv), "--spec", p(&spec)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let packet_path = WavePaths::new(&f.state_dir, wave_id)
        .evidence_dir
        .join("ring-0.json");
    let bytes = std::fs::read(&packet_path).unwrap();
    let trust = TrustSet::load(&f.trust).unwrap();
    let enrolled = Inventory::load(&inv).unwrap().enrolled_keys();
    let v = evidence::verify(&bytes, &trust, &enrolled).unwrap();
    assert!(v.attestations_checked >= 4, "before and after per host");
    let o = cli(
        &f,
        &[
            "evidence",
            "verify",
            p(&packet_path),
            "--inventory",
            p(&inv),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));

    // Any byte of the packet file: every byte around the payload (type,
    // signature, key id, JSON framing) and a sample of the payload's bytes.
    let file: evidence::PacketFile = serde_json::from_slice(&bytes).unwrap();
    let start = bytes
        .windows(file.payload.len())
        .position(|w| w == file.payload.as_bytes())
        .unwrap();
    let end = start + file.payload.len();
    let step = (file.payload.len() / 300).max(1);
    let positions = (0..start)
        .chain((start..end).step_by(step))
        .chain(end..bytes.len());
    for i in positions {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        assert!(
            evidence::verify(&b, &trust, &enrolled).is_err(),
            "byte {i} ({:?}) changed and the packet still verified",
            bytes[i] as char
        );
    }
    let mut b = bytes.clone();
    let mid = start + file.payload.len() / 2;
    b[mid] = if b[mid] == b'A' { b'B' } else { b'A' };
    let flipped = f.root.join("flipped.json");
    std::fs::write(&flipped, &b).unwrap();
    let o = cli(
        &f,
        &["evidence", "verify", p(&flipped), "--inventory", p(&inv)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("INVALID"), "{}", text(&o));
    assert!(text(&o).contains("signature"), "{}", text(&o));

    // A byte of an attestation inside it (the packet re-signed by the
    // coordinator key, so only the attestation is wrong).
    let mut packet = packet_of(&bytes);
    let host_id = packet.hosts[0].host_id.clone();
    let mut env = pb::Envelope::decode(
        B64.decode(&packet.hosts[0].attestations[0])
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let last = env.payload.len() - 1;
    env.payload[last] ^= 0x01;
    packet.hosts[0].attestations[0] = B64.encode(env.encode_to_vec());
    let coord = ringfence::keys::read_signing_key(&f.root.join("coordinator.key")).unwrap();
    let resealed = evidence::seal(&packet, "coord-demo", &coord).unwrap();
    let bad_att = f.root.join("bad-attestation.json");
    std::fs::write(&bad_att, &resealed).unwrap();
    let o = cli(
        &f,
        &["evidence", "verify", p(&bad_att), "--inventory", p(&inv)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("attestation"), "{}", text(&o));
    assert!(text(&o).contains(&host_id), "{}", text(&o));

    // A byte of the inventory's enrolled key.
    let inv_text = std::fs::read_to_string(&inv).unwrap();
    let key_text = ringfence::keys::public_key_text(&f.hosts[0].public_key);
    let other = ringfence::keys::public_key_text(&ringfence::keys::generate().verifying_key());
    let bad_inv = f.root.join("inventory-bad-key.toml");
    std::fs::write(&bad_inv, inv_text.replace(&key_text, &other)).unwrap();
    let o = cli(
        &f,
        &[
            "evidence",
            "verify",
            p(&packet_path),
            "--inventory",
            p(&bad_inv),
        ],
    );
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains(&f.hosts[0].spec.id), "{}", text(&o));
    // Flipping a character of the key text itself is refused too.
    let mut chars: Vec<char> = key_text.chars().collect();
    let i = chars.len() - 10;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let flipped_key: String = chars.into_iter().collect();
    std::fs::write(&bad_inv, inv_text.replace(&key_text, &flipped_key)).unwrap();
    let o = cli(
        &f,
        &[
            "evidence",
            "verify",
            p(&packet_path),
            "--inventory",
            p(&bad_inv),
        ],
    );
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_on_failure_drill_on_ring_zero_and_rollback_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(
        dir.path(),
        vec![
            host("gpu-d0", 0),
            host("gpu-d1", 0),
            HostSpec {
                faulty_version: Some(local_fleet::NEW_VERSION.into()),
                ..host("gpu-bad", 1)
            },
            host("gpu-ok", 1),
        ],
    )
    .await;
    let wave_id = "gov-rollback";
    let spec = f
        .write_spec(
            wave_id,
            "on_failure = \"rollback\"\nrollback_drill = true\n[ring.0]\nbatch_size = 1\nsoak_s = 0\n[ring.1]\nbatch_size = 1\nsoak_s = 0\n",
        )
        .unwrap();
    let inv = f.inventory.clone();
    let o = cli(
        &f,
        &["wave", "run", "--inventory", p(&inv), "--spec", p(&spec)],
    );
    assert_eq!(o.status.code(), Some(4), "halted on gpu-bad: {}", text(&o));
    assert!(text(&o).contains("gpu-bad"), "{}", text(&o));

    // The failed host is back on its previous driver, healthy, still drained.
    assert_eq!(driver_file(&f, "gpu-bad"), local_fleet::OLD_VERSION);
    let h = health(&f, "gpu-bad").await;
    assert_eq!(h.verdict, pb::Verdict::Healthy as i32, "{h:?}");
    assert!(h.draining, "a rolled-back host stays drained");
    let p_bad = patches(&f, "gpu-bad").await;
    assert_eq!(p_bad.len(), 2, "{p_bad:?}");
    assert_eq!(p_bad[0].version_after, local_fleet::NEW_VERSION);
    assert_eq!(p_bad[1].version_after, local_fleet::OLD_VERSION);
    assert!(
        journal(&f, "gpu-bad")
            .await
            .iter()
            .all(|t| t.action != "undrain"),
        "never undrained"
    );

    // The drill ran on ring 0 and its proof is in the ring-0 evidence.
    let ev = WavePaths::new(&f.state_dir, wave_id).evidence_dir;
    let bytes = std::fs::read(ev.join("ring-0.json")).unwrap();
    let trust = TrustSet::load(&f.trust).unwrap();
    let v = evidence::verify(
        &bytes,
        &trust,
        &Inventory::load(&inv).unwrap().enrolled_keys(),
    )
    .unwrap();
    let proof = v.packet.rollback_proof.expect("rollback proof in ring 0");
    assert_eq!(
        proof.versions,
        vec![
            local_fleet::NEW_VERSION.to_string(),
            local_fleet::OLD_VERSION.to_string(),
            local_fleet::NEW_VERSION.to_string()
        ]
    );
    let drilled: Vec<String> = patches(&f, &proof.host_id)
        .await
        .iter()
        .map(|t| t.version_after.clone())
        .collect();
    assert_eq!(
        drilled,
        vec![
            local_fleet::NEW_VERSION,
            local_fleet::OLD_VERSION,
            local_fleet::NEW_VERSION
        ],
        "the drill host's own journal"
    );
    assert_eq!(driver_file(&f, &proof.host_id), local_fleet::NEW_VERSION);
    assert!(ev.join("ring-1.json").exists(), "halt evidence for ring 1");

    // By hand: roll a patched, in-service ring-0 host back.
    let target = if proof.host_id == "gpu-d0" {
        "gpu-d1"
    } else {
        "gpu-d0"
    };
    assert!(!health(&f, target).await.draining);
    let o = cli(
        &f,
        &[
            "wave",
            "rollback",
            "--wave",
            wave_id,
            "--host",
            target,
            "--inventory",
            p(&inv),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(driver_file(&f, target), local_fleet::OLD_VERSION);
    let h = health(&f, target).await;
    assert_eq!(h.verdict, pb::Verdict::Healthy as i32, "{h:?}");
    assert!(h.draining, "left drained after a rollback by hand");
    let last = patches(&f, target).await.pop().unwrap();
    assert_eq!(last.version_after, local_fleet::OLD_VERSION);
    assert_eq!(last.state, pb::TaskState::Succeeded as i32);
    let validated = journal(&f, target).await.pop().unwrap();
    assert_eq!(validated.action, "validate");
    assert_eq!(validated.verdict, pb::Verdict::Healthy as i32);

    // Recorded in the wave store: the host's record and the events.
    let store = WaveStore::open(&f.state_dir, wave_id, &SystemClock).unwrap();
    let rec: ringfence_coordinator::wave::HostRecord = store.get_host(target).unwrap().unwrap();
    assert_eq!(
        rec.failure.as_ref().unwrap().kind,
        wave::FailureKind::ManualRollback
    );
    assert!(
        rec.tasks
            .iter()
            .any(|t| t.step == wave::TaskStep::ManualRollback)
    );
    let events: Vec<serde_json::Value> = store.events().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e["host"] == target && e["what"] == "rolled_back"),
        "{events:?}"
    );
    drop(store);

    // A host that is not in the wave is refused with a config error.
    let o = cli(
        &f,
        &[
            "wave",
            "rollback",
            "--wave",
            wave_id,
            "--host",
            "gpu-nope",
            "--inventory",
            p(&inv),
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_that_closes_mid_wave_stops_new_hosts_and_the_wave_resumes_at_the_next_opening() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(
        dir.path(),
        vec![
            HostSpec {
                busy_for_s: Some(6.0),
                ..host("gpu-w1", 0)
            },
            host("gpu-w2", 0),
            host("gpu-w3", 0),
        ],
    )
    .await;
    // The window is closed for one minute, [close, close + 1 min), close
    // being the current real minute; the injected clock stands just before
    // it. Every instant used stays within the agents' clock-skew tolerance.
    let real = SystemClock.now_ms();
    let close = real - real.rem_euclid(60_000);
    let reopen = close + 60_000;
    let hhmm = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .format("%H:%M")
            .to_string()
    };
    let wave_id = "gov-window";
    let spec = f
        .write_spec(
            wave_id,
            &format!(
                "[ring.0]\nbatch_size = 3\nsoak_s = 0\n[window]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\nstart = \"{}\"\nend = \"{}\"\ntimezone = \"UTC\"\n",
                hhmm(reopen),
                hhmm(close)
            ),
        )
        .unwrap();
    let window = WaveSpec::load(&spec).unwrap().window.unwrap();
    assert!(window.is_open(close - 1_000) && !window.is_open(close) && window.is_open(reopen));
    let clock = ManualClock::at(close - 1_000);
    let mut d = driver(&f, &spec);
    d.clock = Arc::new(clock.clone());
    let run = tokio::spawn(async move { d.run().await });

    // The first host starts (the pool lets one out at a time).
    let mut started: Vec<String> = Vec::new();
    wait_until("a first host to start", || {
        let s = status(&f, wave_id);
        async move {
            s.is_some_and(|s| {
                s["hosts"]
                    .as_object()
                    .unwrap()
                    .values()
                    .any(|v| v == "inflight")
            })
        }
    })
    .await;
    clock.set(close);
    for h in &f.hosts {
        if !journal(&f, &h.spec.id).await.is_empty() {
            started.push(h.spec.id.clone());
        }
    }
    let s = status(&f, wave_id).unwrap();
    for (h, st) in s["hosts"].as_object().unwrap() {
        if st != "pending" && !started.contains(h) {
            started.push(h.clone());
        }
    }
    assert!(started.len() < 3, "no host left to hold back: {started:?}");

    // In-flight hosts finish; the wave waits for the window and says when.
    wait_until("waiting_window with the in-flight hosts done", || {
        let s = status(&f, wave_id);
        let started = started.clone();
        async move {
            s.is_some_and(|s| {
                s["phase"] == "waiting_window" && started.iter().all(|h| s["hosts"][h] == "done")
            })
        }
    })
    .await;
    let s = status(&f, wave_id).unwrap();
    assert_eq!(s["next_window"], window.format(reopen), "{s}");
    for h in &started {
        assert_eq!(driver_file(&f, h), local_fleet::NEW_VERSION, "{h} finished");
    }
    // Give the coordinator many ticks: still nobody new.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for h in &f.hosts {
        if !started.contains(&h.spec.id) {
            assert!(
                journal(&f, &h.spec.id).await.is_empty(),
                "{} started while the window was closed",
                h.spec.id
            );
        }
    }
    assert_eq!(status(&f, wave_id).unwrap()["phase"], "waiting_window");

    // The window opens again: the wave continues and completes.
    clock.set(reopen);
    let outcome = tokio::time::timeout(WAIT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Completed);
    for h in &f.hosts {
        assert_eq!(
            driver_file(&f, &h.spec.id),
            local_fleet::NEW_VERSION,
            "{}",
            h.spec.id
        );
        assert_eq!(patches(&f, &h.spec.id).await.len(), 1, "{}", h.spec.id);
    }
}
