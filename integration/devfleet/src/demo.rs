//! `ringfence-demo` (this crate's binary): a whole simulated fleet on loopback — 20 real agents
//! (in-process, simulated GPUs, real mTLS with a throwaway PKI, real
//! signatures), 5 rings, 2 pools — and a wave through it. By default one
//! ring-2 canary gets uncorrected ECC errors from the new driver: the wave
//! must halt there, rings 3 and 4 must be untouched (no task in any of
//! their agents' journals), and the failed canary must stay drained.
//! `--all-healthy` runs the wave to completion. Exits 0 only when the wave
//! behaved as the scenario expects.

use ringfence::time::{Clock, SystemClock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence::config::Source;
use ringfence::pb;
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::trust::TrustSet;

use crate::local_fleet::{self as fleet, LocalFleet, Mode};
use ringfence_coordinator::cli::report::Reporter;
use ringfence_coordinator::inventory::Inventory;
use ringfence_coordinator::plan::Plan;
use ringfence_coordinator::settings::Settings;
use ringfence_coordinator::spec::WaveSpec;
use ringfence_coordinator::store::WaveStore;
use ringfence_coordinator::wave::{Outcome, TlsConnector};

/// The demo could not run, or the wave did not behave as the scenario
/// expects (`ringfence-demo` exits 1).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failure(String);

fn fail(message: impl Into<String>) -> Failure {
    Failure(message.into())
}

/// Tasks recorded in a host's journal (asked over mTLS with ListTasks).
async fn journal(
    f: &LocalFleet,
    host: &str,
    id: &ringfence::tls::ClientIdentity,
) -> Result<Vec<pb::TaskStatus>, String> {
    let h = f
        .hosts
        .iter()
        .find(|h| h.spec.id == host)
        .ok_or("no such host")?;
    let expected =
        SpiffeId::new(fleet::TRUST_DOMAIN, Role::Host, host).map_err(|e| e.to_string())?;
    let ch = ringfence::tls::connect(&h.addr.to_string(), &expected, id)
        .await
        .map_err(|e| e.to_string())?;
    let mut c = pb::agent_client::AgentClient::new(ch);
    let mut tasks = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .list_tasks(pb::ListTasksRequest {
                page_token,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        tasks.extend(page.tasks);
        if page.next_page_token.is_empty() {
            return Ok(tasks);
        }
        page_token = page.next_page_token;
    }
}

/// `ringfence-demo`: the command line of the demo.
#[derive(Debug, clap::Parser)]
#[command(
    name = "ringfence-demo",
    version,
    about = "A simulated fleet of 20 real agents on loopback and a wave through it"
)]
pub struct DemoArgs {
    /// Run the whole wave to completion instead of failing a canary.
    #[arg(long)]
    pub all_healthy: bool,
    /// Keep the fleet's files in this directory (default: a temporary one).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// JSON event stream on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Run the demo.
pub async fn run(args: DemoArgs) -> Result<(), Failure> {
    let started = Instant::now();
    let root = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| fail(format!("{}: {e}", d.display())))?;
            d.clone()
        }
        None => tempdir().map_err(fail)?,
    };
    let say = |s: &str| {
        if !args.json {
            println!("demo: {s}");
        }
    };
    say(&format!("building a simulated fleet in {}", root.display()));
    let mut fleet = LocalFleet::start(
        &root,
        fleet::demo_hosts(!args.all_healthy),
        Mode::InProcess,
        2,
    )
    .await
    .map_err(|e| fail(e.to_string()))?;
    say(&format!(
        "{} agents up (real mTLS, throwaway CA, simulated GPUs on driver {})",
        fleet.hosts.len(),
        fleet::OLD_VERSION
    ));

    let spec_path = fleet
        .write_spec(
            "demo-wave",
            "[ring.0]\nbatch_size = 2\nsoak_s = 1\n[ring.1]\nbatch_size = 2\nsoak_s = 1\n[ring.2]\nbatch_size = 2\nsoak_s = 1\n[ring.3]\nbatch_size = 4\nsoak_s = 1\n[ring.4]\nbatch_size = 2\nsoak_s = 0\n",
        )
        .map_err(|e| fail(e.to_string()))?;
    let settings = Settings::load(Some(&fleet.settings)).map_err(|e| fail(e.to_string()))?;
    let trust = TrustSet::load(&settings.trust_file).map_err(|e| fail(e.to_string()))?;
    let inv = Inventory::load(&fleet.inventory).map_err(|e| fail(e.to_string()))?;
    let src = Source::read(&spec_path).map_err(|e| fail(e.to_string()))?;
    let spec = WaveSpec::from_source(&src).map_err(|e| fail(e.to_string()))?;

    // The two throwaway approvers sign the protected rings up front.
    let plan = Plan::build(&inv, &spec, &BTreeMap::new(), &BTreeMap::new())
        .map_err(|e| fail(e.to_string()))?;
    fleet::approve_protected_rings(&settings.state_dir, &spec, &plan, &fleet.approver_keys)
        .map_err(fail)?;
    say("two approvers signed rings 2, 3 and 4; starting the wave");

    let identity = ringfence::tls::ClientIdentity::load(
        &settings.tls.cert,
        &settings.tls.key,
        &settings.tls.ca_bundle,
    )
    .map_err(|e| fail(e.to_string()))?;
    let connector = Arc::new(TlsConnector {
        identity: identity.clone(),
        trust_domain: inv.trust_domain.clone(),
        connect_timeout: Duration::from_secs(3),
        rpc_timeout: Duration::from_secs(10),
    });
    let store = Arc::new(
        WaveStore::open(&settings.state_dir, &spec.wave_id, &SystemClock)
            .map_err(|e| fail(e.to_string()))?,
    );
    store
        .put_meta(ringfence_coordinator::wave::META_SPEC_TEXT, &src.text)
        .map_err(|e| fail(e.to_string()))?;
    let reporter = Reporter::new(args.json);
    let mut driver = ringfence_coordinator::cli::driver(
        &settings,
        trust,
        inv.clone(),
        spec.clone(),
        store,
        connector,
        reporter.clone(),
        Vec::new(),
    )
    .map_err(|e| fail(e.to_string()))?;
    driver.poll_interval = Duration::from_millis(50);
    let outcome = driver.run().await;
    reporter.finish();
    let outcome = outcome.map_err(|e| fail(e.to_string()))?;

    // Judge the wave by what the agents recorded.
    let mut problems = Vec::new();
    let mut tasks_by_ring: BTreeMap<u32, usize> = BTreeMap::new();
    for h in &fleet.hosts {
        let tasks = journal(&fleet, &h.spec.id, &identity).await.map_err(fail)?;
        *tasks_by_ring.entry(h.spec.ring).or_default() += tasks.len();
    }
    let evidence_dir =
        ringfence_coordinator::store::WavePaths::new(&settings.state_dir, &spec.wave_id)
            .evidence_dir;
    match (&outcome, args.all_healthy) {
        (Outcome::Halted(h), false) => {
            say(&format!(
                "wave HALTED in ring {} at host {} (step {}, {}): {}",
                h.ring,
                h.host.as_deref().unwrap_or("-"),
                h.step,
                h.kind,
                h.reason
            ));
            if h.ring != 2 {
                problems.push(format!("expected the halt in ring 2, got ring {}", h.ring));
            }
            for r in [3u32, 4] {
                let n = tasks_by_ring.get(&r).copied().unwrap_or(0);
                if n == 0 {
                    say(&format!(
                        "ring {r}: untouched — 0 tasks in its agents' journals"
                    ));
                } else {
                    problems.push(format!("ring {r} agents recorded {n} task(s)"));
                }
            }
            if let Some(failed) = &h.host {
                let still_drained = fleet
                    .hosts
                    .iter()
                    .find(|x| &x.spec.id == failed)
                    .map(|x| x.driver_version() == fleet::NEW_VERSION);
                let tasks = journal(&fleet, failed, &identity).await.map_err(fail)?;
                let undrained = tasks.iter().any(|t| t.action == "undrain");
                if undrained {
                    problems.push(format!("{failed} was undrained"));
                } else {
                    say(&format!(
                        "{failed}: left drained for a human (no undrain in its journal); on the new driver: {}",
                        still_drained.unwrap_or(false)
                    ));
                }
            }
        }
        (Outcome::Completed, true) => {
            say("wave COMPLETED: every ring promoted");
            for h in &fleet.hosts {
                if h.driver_version() != fleet::NEW_VERSION {
                    problems.push(format!("{} is on {}", h.spec.id, h.driver_version()));
                }
            }
            if problems.is_empty() {
                say(&format!(
                    "all {} hosts on {} and back in service",
                    fleet.hosts.len(),
                    fleet::NEW_VERSION
                ));
            }
        }
        (o, _) => problems.push(format!("unexpected outcome {o:?}")),
    }
    // Verify the evidence packets written.
    let enrolled = inv.enrolled_keys();
    let trust = TrustSet::load(&settings.trust_file).map_err(|e| fail(e.to_string()))?;
    if let Ok(entries) = std::fs::read_dir(&evidence_dir) {
        let mut paths: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let bytes = std::fs::read(&p).map_err(|e| fail(e.to_string()))?;
            match ringfence_coordinator::evidence::verify(&bytes, &trust, &enrolled) {
                Ok(v) => say(&format!(
                    "evidence {}: VALID ({} outcome, {} attestations, {} approvals)",
                    p.display(),
                    v.packet.outcome,
                    v.attestations_checked,
                    v.approvals_checked
                )),
                Err(e) => problems.push(format!("evidence {}: {e}", p.display())),
            }
        }
    }
    fleet.shutdown().await;
    drop(fleet);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    say(&format!(
        "finished in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    if problems.is_empty() {
        say("the wave behaved as the scenario expects");
        Ok(())
    } else {
        Err(fail(format!(
            "the wave did NOT behave as expected: {}",
            problems.join("; ")
        )))
    }
}

fn tempdir() -> Result<std::path::PathBuf, String> {
    let base = std::env::temp_dir().join(format!(
        "ringfence-demo-{}-{}",
        std::process::id(),
        SystemClock.now_ms()
    ));
    std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    Ok(base)
}
