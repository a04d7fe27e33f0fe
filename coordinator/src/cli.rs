//! The `ringfence` command line: argument structs and one function per
//! command. `main.rs` parses, calls [`run`], and maps errors to exit codes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ringfence::config::Source;
use ringfence::pb;
use ringfence::time::{Clock, SystemClock};
use ringfence::trust::TrustSet;

use crate::approvals;
use crate::inventory::Inventory;
use crate::pki_cli::{KeysArgs, PkiArgs};
use crate::plan::Plan;
use crate::report::Reporter;
use crate::settings::Settings;
use crate::spec::WaveSpec;
use crate::store::WaveStore;
use crate::wave::{self, Driver, Outcome, TlsConnector};

/// Exit code: bad usage (clap).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: a config, inventory, spec or key file is unusable.
pub const EXIT_CONFIG: u8 = 3;
/// Exit code: the wave halted.
pub const EXIT_HALTED: u8 = 4;
/// Exit code: anything else failed.
pub const EXIT_FAILED: u8 = 1;

/// ringfence — patch a GPU fleet ring by ring without breaking all of it at once.
#[derive(Debug, Parser)]
#[command(name = "ringfence", version, about)]
pub struct Cli {
    /// Coordinator settings (default: ./ringfence.toml, then /etc/ringfence/coordinator.toml).
    #[arg(long, global = true, env = "RINGFENCE_CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// A fleet CA for development and small fleets.
    Pki(PkiArgs),
    /// ed25519 keys for coordinators and approvers.
    Keys(KeysArgs),
    /// Check or enroll an inventory.
    Inventory(InventoryArgs),
    /// Ask hosts about their health.
    Hosts(HostsArgs),
    /// Plan, run and steer patch waves.
    Wave(WaveArgs),
    /// Break-glass approvals that raise a pool's out-of-service limit.
    Breakglass(BreakglassArgs),
    /// Check evidence packets.
    Evidence(EvidenceArgs),
}

/// `ringfence inventory`.
#[derive(Debug, Args)]
pub struct InventoryArgs {
    #[command(subcommand)]
    command: InventoryCommand,
}

#[derive(Debug, Subcommand)]
enum InventoryCommand {
    /// Validate an inventory file; print hosts per ring and pool.
    Check {
        /// Inventory file.
        file: PathBuf,
        /// Also ask every agent its ring (GetIdentity over mTLS) and report
        /// hosts whose agent is in another ring or has none configured.
        #[arg(long)]
        live: bool,
    },
    /// Fetch attestation keys of hosts that have none (GetIdentity over mTLS) and write them in.
    Enroll {
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// Accept a changed key for this host (after a reinstall).
        #[arg(long)]
        rekey: Vec<String>,
    },
}

/// `ringfence hosts`.
#[derive(Debug, Args)]
pub struct HostsArgs {
    #[command(subcommand)]
    command: HostsCommand,
}

#[derive(Debug, Subcommand)]
enum HostsCommand {
    /// Query every host concurrently and print a health table (or JSON lines).
    Health {
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// One JSON object per host.
        #[arg(long)]
        json: bool,
    },
    /// Call GetIdentity on one host.
    Identity {
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// Host id.
        #[arg(long)]
        host: String,
    },
}

/// `ringfence wave`.
#[derive(Debug, Args)]
pub struct WaveArgs {
    #[command(subcommand)]
    command: WaveCommand,
}

#[derive(Debug, Subcommand)]
enum WaveCommand {
    /// Dry run: rings, batches, reserve math, protected rings.
    Plan {
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// Wave spec file.
        #[arg(long)]
        spec: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a wave.
    Run {
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// Wave spec file.
        #[arg(long)]
        spec: PathBuf,
        /// JSON event stream on stdout.
        #[arg(long)]
        json: bool,
        /// Break-glass approval files.
        #[arg(long = "break-glass")]
        break_glass: Vec<PathBuf>,
    },
    /// Continue a wave after a crash or halt, with a decision per failed host.
    Resume {
        /// Wave id.
        #[arg(long)]
        wave: String,
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// Run a failed host again from the start.
        #[arg(long)]
        retry: Vec<String>,
        /// Skip a failed host (needs --reason).
        #[arg(long)]
        skip: Vec<String>,
        /// Why the skipped hosts are skipped.
        #[arg(long)]
        reason: Option<String>,
        /// JSON event stream on stdout.
        #[arg(long)]
        json: bool,
        /// Break-glass approval files.
        #[arg(long = "break-glass")]
        break_glass: Vec<PathBuf>,
    },
    /// Where a wave is (works while it runs, from another terminal).
    Status {
        /// Wave id.
        #[arg(long)]
        wave: String,
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Emergency stop: no new host starts; in-flight hosts finish their step.
    Halt {
        /// Wave id.
        #[arg(long)]
        wave: String,
    },
    /// End a wave for good (no resume).
    Abort {
        /// Wave id.
        #[arg(long)]
        wave: String,
    },
    /// Patch one host of the wave back by hand (toward the wave's rollback
    /// version, else the version it attested before), validate it, leave it drained.
    Rollback {
        /// Wave id.
        #[arg(long)]
        wave: String,
        /// Host to roll back.
        #[arg(long)]
        host: String,
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
    },
    /// Sign a ring approval built from the inventory and the wave spec (or
    /// import one signed elsewhere). Prints the whole scope first.
    Approve {
        /// Wave id.
        #[arg(long)]
        wave: String,
        /// Ring to approve.
        #[arg(long, required_unless_present = "import")]
        ring: Option<u32>,
        /// Approver key (PKCS#8 PEM).
        #[arg(long, required_unless_present = "import")]
        key: Option<PathBuf>,
        /// Inventory file: the ring's hosts.
        #[arg(long, required_unless_present = "import")]
        inventory: Option<PathBuf>,
        /// Wave spec file: profile, version, rollback version, approval_ttl_s.
        #[arg(long, required_unless_present = "import")]
        spec: Option<PathBuf>,
        /// Action approved (repeatable; default: patch, plus rollback when
        /// the spec has a rollback_version).
        #[arg(long = "action", value_enum)]
        actions: Vec<ActionArg>,
        /// Validity (e.g. 3600, 90m, 12h, 1d); at most the spec's approval_ttl_s (its default).
        #[arg(long)]
        ttl: Option<String>,
        /// Sign without asking (needed when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
        /// Write the signed approval here instead of into the wave's approvals.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Add an approval file signed elsewhere to the wave's approvals.
        #[arg(long)]
        import: Option<PathBuf>,
    },
}

/// An action a ring approval covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ActionArg {
    /// Patch toward the spec's version.
    Patch,
    /// Patch back to the spec's rollback_version.
    Rollback,
    /// Undrain without a HEALTHY validation.
    ForceUndrain,
    /// Acknowledge an UNHEALTHY-severity fault.
    AckFaults,
}

impl From<ActionArg> for pb::ApprovedAction {
    fn from(a: ActionArg) -> Self {
        match a {
            ActionArg::Patch => Self::Patch,
            ActionArg::Rollback => Self::Rollback,
            ActionArg::ForceUndrain => Self::ForceUndrain,
            ActionArg::AckFaults => Self::AckFaults,
        }
    }
}

/// `ringfence breakglass`.
#[derive(Debug, Args)]
pub struct BreakglassArgs {
    #[command(subcommand)]
    command: BreakglassCommand,
}

#[derive(Debug, Subcommand)]
enum BreakglassCommand {
    /// Sign (or countersign, with --add-to) a break-glass approval.
    Sign {
        /// Wave id.
        #[arg(long)]
        wave: String,
        /// Pool whose limit is raised.
        #[arg(long)]
        pool: String,
        /// New limit of hosts out of service at once.
        #[arg(long)]
        max_out: u32,
        /// Why (recorded in the evidence).
        #[arg(long)]
        reason: String,
        /// Approver key.
        #[arg(long)]
        key: PathBuf,
        /// Output file (with --add-to: the file to countersign in place).
        #[arg(long)]
        out: PathBuf,
        /// Countersign the existing file at --out.
        #[arg(long)]
        add_to: bool,
        /// Validity, hours.
        #[arg(long, default_value_t = 12)]
        ttl_h: u64,
        /// Inventory: refuse a pool it does not have, or a max-out above the pool's size.
        #[arg(long)]
        inventory: Option<PathBuf>,
    },
}

/// `ringfence evidence`.
#[derive(Debug, Args)]
pub struct EvidenceArgs {
    #[command(subcommand)]
    command: EvidenceCommand,
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Check a packet: its signer, tasks, attestations, approvals and break-glass.
    Verify {
        /// Packet file.
        packet: PathBuf,
        /// Inventory with the enrolled host keys.
        #[arg(long)]
        inventory: PathBuf,
        /// Trust file with coordinator and approver keys (default: from settings).
        #[arg(long)]
        trust: Option<PathBuf>,
        /// Trust-file id of the coordinator key that must have signed
        /// (default: `signing.key_id` of the settings, when they are read).
        #[arg(long)]
        coordinator_key: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A command failed; the exit code says how.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: u8,
    /// Message for stderr.
    pub message: String,
}

fn config_err(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: EXIT_CONFIG,
        message: e.to_string(),
    }
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure {
        code: EXIT_FAILED,
        message: e.to_string(),
    }
}

/// Run a parsed command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Pki(a) => crate::pki_cli::run_pki(&a.command)
            .map(|s| print!("{s}"))
            .map_err(config_err),
        Command::Keys(a) => crate::pki_cli::run_keys(&a.command)
            .map(|s| print!("{s}"))
            .map_err(config_err),
        Command::Inventory(a) => inventory(cli.config.as_deref(), a.command).await,
        Command::Hosts(a) => hosts(cli.config.as_deref(), a.command).await,
        Command::Wave(a) => wave_cmd(cli.config.as_deref(), a.command).await,
        Command::Breakglass(a) => breakglass(a.command),
        Command::Evidence(a) => evidence(cli.config.as_deref(), a.command),
    }
}

struct Env {
    settings: Settings,
    trust: TrustSet,
    identity: ringfence::tls::ClientIdentity,
}

fn env(config: Option<&Path>) -> Result<Env, Failure> {
    let settings = Settings::load(config).map_err(config_err)?;
    let trust = TrustSet::load(&settings.trust_file).map_err(config_err)?;
    let identity = settings.tls.client_identity().map_err(config_err)?;
    Ok(Env {
        settings,
        trust,
        identity,
    })
}

fn connector(env: &Env, inv: &Inventory) -> TlsConnector {
    TlsConnector {
        identity: env.identity.clone(),
        trust_domain: inv.trust_domain.clone(),
        connect_timeout: env.settings.timeouts.connect(),
        rpc_timeout: env.settings.timeouts.rpc(),
    }
}

/// Every host's ring as its agent reports it (GetIdentity, 64 hosts at
/// once), against the inventory; `Err` for a host that did not answer.
async fn agent_rings(
    inv: &Inventory,
    conn: Arc<TlsConnector>,
) -> Vec<(String, Result<crate::inventory::RingFinding, String>)> {
    use crate::wave::Connector;
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for h in inv.hosts.clone() {
        let (conn, sem) = (conn.clone(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = match conn.connect(&h).await {
                Ok(api) => api
                    .identity()
                    .await
                    .map(|id| h.ring_finding(id.ring))
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            (h.id, r)
        });
    }
    let mut out = Vec::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(x) = r {
            out.push(x);
        }
    }
    let order: BTreeMap<&str, usize> = inv
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.id.as_str(), i))
        .collect();
    out.sort_by_key(|(h, _)| order.get(h.as_str()).copied().unwrap_or(usize::MAX));
    out
}

/// `wave run` / `wave resume` refuse to start while any reachable host's
/// agent is configured in another ring than the inventory's, or in none
/// (exit 3, naming every such host). Unreachable hosts are left to the
/// wave, which fails them as unreachable.
async fn refuse_ring_mismatch(
    wave: &str,
    inv: &Inventory,
    conn: Arc<TlsConnector>,
) -> Result<(), Failure> {
    let blocking: Vec<String> = agent_rings(inv, conn)
        .await
        .into_iter()
        .filter_map(|(h, r)| match r {
            Ok(f) if f.blocks_wave() => Some(format!("{h}: {f}")),
            _ => None,
        })
        .collect();
    if blocking.is_empty() {
        return Ok(());
    }
    Err(config_err(crate::inventory::ring_mismatch_message(
        wave, &inv.path, &blocking,
    )))
}

async fn inventory(config: Option<&Path>, cmd: InventoryCommand) -> Result<(), Failure> {
    match cmd {
        InventoryCommand::Check { file, live } => {
            let inv = Inventory::load(&file).map_err(config_err)?;
            let s = inv.summary();
            println!(
                "{}: {} hosts, {} pools, trust domain {}",
                file.display(),
                inv.hosts.len(),
                inv.pools.len(),
                inv.trust_domain
            );
            for (r, n) in &s.per_ring {
                println!("  ring {r}{}: {n} host(s)", crate::plan::ring_name(*r));
            }
            for (p, n) in &s.per_pool {
                let pool = &inv.pools[p];
                println!(
                    "  pool {p}: {n} host(s), reserve {}% → {} out at once",
                    pool.reserve_percent,
                    n * pool.reserve_percent as usize / 100
                );
            }
            if !s.unenrolled.is_empty() {
                println!(
                    "  not enrolled (run `ringfence inventory enroll`): {}",
                    s.unenrolled.join(", ")
                );
            }
            if !live {
                return Ok(());
            }
            let env = env(config)?;
            let rings = agent_rings(&inv, Arc::new(connector(&env, &inv))).await;
            let mut blocking = Vec::new();
            for (host, r) in &rings {
                match r {
                    Ok(f) if f.blocks_wave() => {
                        println!("  {host}: {f}");
                        blocking.push(host.clone());
                    }
                    Ok(_) => {}
                    Err(e) => println!("  {host}: unreachable, ring not checked: {e}"),
                }
            }
            if blocking.is_empty() {
                println!(
                    "  live: every reachable agent is configured in its inventory ring ({} checked)",
                    rings.iter().filter(|(_, r)| r.is_ok()).count()
                );
                Ok(())
            } else {
                Err(config_err(format!(
                    "{}: the inventory's ring and the agent's own differ for {} host(s): {}; `wave run` refuses to start until they agree",
                    file.display(),
                    blocking.len(),
                    blocking.join(", ")
                )))
            }
        }
        InventoryCommand::Enroll { inventory, rekey } => {
            let env = env(config)?;
            let inv = Inventory::load(&inventory).map_err(config_err)?;
            let conn = connector(&env, &inv);
            let mut refused = Vec::new();
            let mut mismatched = Vec::new();
            for h in &inv.hosts {
                use crate::wave::Connector;
                let api = match conn.connect(h).await {
                    Ok(a) => a,
                    Err(e) => {
                        println!("{}: unreachable: {e}", h.id);
                        continue;
                    }
                };
                let id = match api.identity().await {
                    Ok(i) => i,
                    Err(e) => {
                        println!("{}: {e}", h.id);
                        continue;
                    }
                };
                match h.ring_finding(id.ring) {
                    f @ crate::inventory::RingFinding::Mismatch { .. } => {
                        eprintln!("{}: {f}", h.id);
                        mismatched.push(h.id.clone());
                    }
                    f @ crate::inventory::RingFinding::NotConfigured { .. } => {
                        eprintln!("{}: {f}", h.id);
                    }
                    crate::inventory::RingFinding::Agrees(_) => {}
                }
                let Ok(bytes) = <[u8; 32]>::try_from(id.attestation_public_key.as_slice()) else {
                    println!("{}: malformed attestation key", h.id);
                    continue;
                };
                let key = ringfence::keys::public_key_from_bytes(&bytes).map_err(config_err)?;
                let text = ringfence::keys::public_key_text(&key);
                match h.attestation_key {
                    Some(k) if k == key => println!(
                        "{}: enrolled, unchanged ({})",
                        h.id, id.attestation_key_fingerprint
                    ),
                    Some(k) if !rekey.contains(&h.id) => {
                        eprintln!(
                            "{}: KEY CHANGED: enrolled {} but the host presents {} — reinstall or impersonation; refused (accept with --rekey {})",
                            h.id,
                            ringfence::keys::fingerprint(&k),
                            id.attestation_key_fingerprint,
                            h.id
                        );
                        refused.push(h.id.clone());
                    }
                    _ => {
                        Inventory::set_attestation_key(&inventory, &h.id, &text)
                            .map_err(config_err)?;
                        println!("{}: enrolled {}", h.id, id.attestation_key_fingerprint);
                    }
                }
            }
            if !refused.is_empty() {
                Err(failed(format!(
                    "changed keys refused for: {}",
                    refused.join(", ")
                )))
            } else if !mismatched.is_empty() {
                Err(config_err(format!(
                    "{}: the inventory's ring differs from the agent's own for: {} (keys were enrolled; fix the inventory or the agents' `ring` before `wave run`)",
                    inventory.display(),
                    mismatched.join(", ")
                )))
            } else {
                Ok(())
            }
        }
    }
}

async fn hosts(config: Option<&Path>, cmd: HostsCommand) -> Result<(), Failure> {
    let env = env(config)?;
    match cmd {
        HostsCommand::Identity { inventory, host } => {
            let inv = Inventory::load(&inventory).map_err(config_err)?;
            let h = inv.host(&host).ok_or_else(|| {
                config_err(format!("no host `{host}` in {}", inventory.display()))
            })?;
            use crate::wave::Connector;
            let api = connector(&env, &inv).connect(h).await.map_err(failed)?;
            let id = api.identity().await.map_err(failed)?;
            println!(
                "host_id: {}\nspiffe_id: {}\nagent_version: {}\nboot_id: {}\nattestation_key_fingerprint: {}\nsequence_high_water: {}\ndraining: {}",
                id.host_id,
                id.spiffe_id,
                id.agent_version,
                id.boot_id,
                id.attestation_key_fingerprint,
                id.sequence_high_water,
                id.draining
            );
            Ok(())
        }
        HostsCommand::Health { inventory, json } => {
            let inv = Inventory::load(&inventory).map_err(config_err)?;
            let rows = crate::health_table::collect(
                &inv,
                Arc::new(connector(&env, &inv)),
                64,
                skew_ms(&env.trust),
            )
            .await;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                }
            } else {
                print!("{}", crate::health_table::render(&rows));
            }
            Ok(())
        }
    }
}

fn parse_spec(path: &Path) -> Result<(WaveSpec, String), Failure> {
    let src = Source::read(path).map_err(config_err)?;
    let spec = WaveSpec::from_source(&src).map_err(config_err)?;
    Ok((spec, src.text))
}

fn break_glass(
    files: &[PathBuf],
    trust: &TrustSet,
    wave: &str,
    inv: &Inventory,
) -> Result<Vec<(approvals::BreakGlassGrant, pb::Envelope)>, Failure> {
    let mut out = Vec::new();
    for f in files {
        let env = approvals::read_file(f).map_err(config_err)?;
        let grant = approvals::check_breakglass(&env, trust, wave, ringfence::time::now_ms())
            .map_err(|e| config_err(format!("break-glass {}: {e}", f.display())))?;
        crate::plan::check_break_glass(inv, &grant.pool, grant.max_out)
            .map_err(|e| config_err(format!("break-glass {}: {e}", f.display())))?;
        println!(
            "break-glass in force: pool {} max_out {} ({}; approvers {})",
            grant.pool,
            grant.max_out,
            grant.reason,
            grant.approvers.join(", ")
        );
        out.push((grant, env));
    }
    Ok(out)
}

/// Build a driver for a wave.
#[allow(clippy::too_many_arguments)]
pub fn driver(
    settings: &Settings,
    trust: TrustSet,
    inventory: Inventory,
    spec: WaveSpec,
    store: Arc<WaveStore>,
    connector: Arc<dyn wave::Connector>,
    reporter: Reporter,
    break_glass: Vec<(approvals::BreakGlassGrant, pb::Envelope)>,
) -> Result<Driver, Failure> {
    let signer =
        wave::load_signer(&settings.signing.key, &settings.signing.key_id).map_err(config_err)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    Ok(Driver {
        inventory,
        spec,
        trust,
        signer,
        store,
        connector,
        clock,
        reporter,
        poll_interval: Duration::from_millis(200),
        state_dir: settings.state_dir.clone(),
        break_glass,
    })
}

fn outcome(o: Result<Outcome, wave::WaveError>, reporter: &Reporter) -> Result<(), Failure> {
    reporter.finish();
    match o {
        Ok(Outcome::Completed) => {
            println!("wave completed: every ring promoted");
            Ok(())
        }
        Ok(Outcome::Halted(h)) => Err(Failure {
            code: EXIT_HALTED,
            message: format!(
                "wave {} HALTED in ring {}: host {} step {} ({}): {}\n{}; decide with `ringfence wave resume --wave {} --retry HOST | --skip HOST --reason ...` or `ringfence wave abort --wave {}`",
                h.wave_id,
                h.ring,
                h.host.as_deref().unwrap_or("-"),
                h.step,
                h.kind,
                h.reason,
                // A soak regression comes after validation and undrain; the
                // reason says whether the wave could drain the host again.
                if h.kind == "soak_regression" {
                    "the failed host regressed after it was back in service"
                } else {
                    "the failed host is left drained"
                },
                h.wave_id,
                h.wave_id
            ),
        }),
        Err(
            e @ (wave::WaveError::Plan(_)
            | wave::WaveError::Exists(_)
            | wave::WaveError::RingMismatch { .. }
            | wave::WaveError::NeedsDecision { .. }
            | wave::WaveError::BadDecision(_)
            | wave::WaveError::NoState(_)
            | wave::WaveError::Aborted(_)
            | wave::WaveError::BreakGlass { .. }
            | wave::WaveError::NotInWave { .. }
            | wave::WaveError::HostInFlight { .. }),
        ) => Err(config_err(e)),
        Err(e) => Err(failed(e)),
    }
}

async fn wave_cmd(config: Option<&Path>, cmd: WaveCommand) -> Result<(), Failure> {
    match cmd {
        WaveCommand::Plan {
            inventory,
            spec,
            json,
        } => {
            let inv = Inventory::load(&inventory).map_err(config_err)?;
            let (spec, _) = parse_spec(&spec)?;
            let plan =
                Plan::build(&inv, &spec, &BTreeMap::new(), &BTreeMap::new()).map_err(config_err)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::plan::render_json(&plan))
                        .unwrap_or_default()
                );
            } else {
                print!("{}", crate::plan::render_text(&plan));
            }
            Ok(())
        }
        WaveCommand::Run {
            inventory,
            spec,
            json,
            break_glass: bg,
        } => {
            let env = env(config)?;
            let inv = Inventory::load(&inventory).map_err(config_err)?;
            let (spec, text) = parse_spec(&spec)?;
            let bg = break_glass(&bg, &env.trust, &spec.wave_id, &inv)?;
            // The agents' rings are checked by the wave's own probe, over the
            // connection it opens to each host anyway (WaveError::RingMismatch).
            let store = Arc::new(
                WaveStore::open(&env.settings.state_dir, &spec.wave_id).map_err(config_err)?,
            );
            store
                .put_meta(wave::META_SPEC_TEXT, &text)
                .map_err(failed)?;
            let reporter = Reporter::new(json);
            let conn = Arc::new(connector(&env, &inv));
            let mut d = driver(
                &env.settings,
                env.trust,
                inv,
                spec,
                store,
                conn,
                reporter.clone(),
                bg,
            )?;
            outcome(d.run().await, &reporter)
        }
        WaveCommand::Resume {
            wave: w,
            inventory,
            retry,
            skip,
            reason,
            json,
            break_glass: bg,
        } => {
            let env = env(config)?;
            // The resume begins here: a halt requested from now on stands.
            let seen_halt = crate::store::halt_request(&crate::store::WavePaths::new(
                &env.settings.state_dir,
                &w,
            ));
            let inv = Inventory::load(&inventory).map_err(config_err)?;
            if !skip.is_empty() && reason.as_deref().is_none_or(str::is_empty) {
                return Err(config_err("--skip needs --reason \"...\""));
            }
            let store = Arc::new(WaveStore::open(&env.settings.state_dir, &w).map_err(config_err)?);
            let text: String = store
                .get_meta(wave::META_SPEC_TEXT)
                .map_err(failed)?
                .ok_or_else(|| {
                    config_err(format!(
                        "wave `{w}` has no state under {}",
                        env.settings.state_dir.display()
                    ))
                })?;
            let spec =
                WaveSpec::from_source(&Source::from_text(format!("<stored spec of {w}>"), text))
                    .map_err(config_err)?;
            let bg = break_glass(&bg, &env.trust, &w, &inv)?;
            refuse_ring_mismatch(&w, &inv, Arc::new(connector(&env, &inv))).await?;
            let reporter = Reporter::new(json);
            let conn = Arc::new(connector(&env, &inv));
            let skip: Vec<(String, String)> = skip
                .into_iter()
                .map(|h| (h, reason.clone().unwrap_or_default()))
                .collect();
            let mut d = driver(
                &env.settings,
                env.trust,
                inv,
                spec,
                store,
                conn,
                reporter.clone(),
                bg,
            )?;
            outcome(d.resume_after(&retry, &skip, seen_halt).await, &reporter)
        }
        WaveCommand::Rollback {
            wave: w,
            host,
            inventory,
        } => {
            let env = env(config)?;
            let inv = Inventory::load(&inventory).map_err(config_err)?;
            let store = Arc::new(WaveStore::open(&env.settings.state_dir, &w).map_err(config_err)?);
            let text: String = store
                .get_meta(wave::META_SPEC_TEXT)
                .map_err(failed)?
                .ok_or_else(|| {
                    config_err(format!(
                        "wave `{w}` has no state under {}",
                        env.settings.state_dir.display()
                    ))
                })?;
            let spec =
                WaveSpec::from_source(&Source::from_text(format!("<stored spec of {w}>"), text))
                    .map_err(config_err)?;
            let reporter = Reporter::new(false);
            let conn = Arc::new(connector(&env, &inv));
            let mut d = driver(
                &env.settings,
                env.trust,
                inv,
                spec,
                store,
                conn,
                reporter.clone(),
                Vec::new(),
            )?;
            let result = d.rollback_host(&host).await;
            reporter.finish();
            match result {
                Ok((rec, None)) => {
                    println!(
                        "{host}: rolled back to {} ({}); left drained — undrain it by hand when satisfied",
                        rec.after
                            .as_ref()
                            .map(|a| a.driver_version.as_str())
                            .unwrap_or("?"),
                        rec.after
                            .as_ref()
                            .map(|a| a.verdict.as_str())
                            .unwrap_or("?"),
                    );
                    Ok(())
                }
                Ok((_, Some(f))) => Err(failed(format!("{host}: {}", f.reason))),
                Err(
                    e @ (wave::WaveError::NotInWave { .. }
                    | wave::WaveError::HostInFlight { .. }
                    | wave::WaveError::NoState(_)),
                ) => Err(config_err(e)),
                Err(e) => Err(failed(e)),
            }
        }
        WaveCommand::Status { wave: w, json } => {
            let settings = Settings::load(config).map_err(config_err)?;
            let path = crate::store::WavePaths::new(&settings.state_dir, &w).status;
            let text = std::fs::read_to_string(&path).map_err(|e| {
                config_err(format!(
                    "{}: {e} (no such wave, or it never started)",
                    path.display()
                ))
            })?;
            if json {
                println!("{text}");
                return Ok(());
            }
            let s: wave::StatusSnapshot = serde_json::from_str(&text).map_err(failed)?;
            println!("{}", crate::report::summary(&s));
            for (r, v) in &s.rings {
                println!(
                    "  ring {r}{}: {} ({}) {:?}",
                    crate::plan::ring_name(*r),
                    v.status,
                    v.approval,
                    v.counts
                );
            }
            for (p, (out, max)) in &s.pools {
                println!("  pool {p}: {out} out of service, limit {max}");
            }
            for b in &s.break_glass {
                println!("  break-glass: {b}");
            }
            if let Some(n) = &s.next_window {
                println!("  next maintenance window opens {n}");
            }
            if let Some(h) = &s.halt {
                println!(
                    "  HALT: ring {} host {} step {} ({}): {}",
                    h.ring,
                    h.host.as_deref().unwrap_or("-"),
                    h.step,
                    h.kind,
                    h.reason
                );
            }
            Ok(())
        }
        WaveCommand::Halt { wave: w } => {
            let settings = Settings::load(config).map_err(config_err)?;
            if !WaveStore::exists(&settings.state_dir, &w) {
                return Err(config_err(crate::store::StoreError::NoSuchWave {
                    wave: w,
                    dir: settings.state_dir.clone(),
                }));
            }
            let paths = crate::store::WavePaths::new(&settings.state_dir, &w);
            crate::store::request_halt(&paths, ringfence::time::now_ms()).map_err(failed)?;
            println!(
                "halt requested for wave {w}: no new host starts; hosts in flight finish their current step"
            );
            Ok(())
        }
        WaveCommand::Abort { wave: w } => {
            let settings = Settings::load(config).map_err(config_err)?;
            let store = WaveStore::open(&settings.state_dir, &w).map_err(config_err)?;
            wave::abort(&store).map_err(failed)?;
            println!(
                "wave {w} aborted; hosts left drained stay drained until an operator undrains them"
            );
            Ok(())
        }
        WaveCommand::Approve {
            wave: w,
            ring,
            key,
            inventory,
            spec,
            actions,
            ttl,
            yes,
            out,
            import,
        } => {
            let settings = Settings::load(config).map_err(config_err)?;
            let trust = TrustSet::load(&settings.trust_file).map_err(config_err)?;
            let dir = approvals::approvals_dir(&settings.state_dir, &w);
            if let Some(file) = import {
                let env = approvals::read_file(&file).map_err(config_err)?;
                let a: pb::RingApproval =
                    prost::Message::decode(env.payload.as_slice()).map_err(config_err)?;
                if a.wave_id != w {
                    return Err(config_err(format!(
                        "{} approves wave `{}`, not `{w}`",
                        file.display(),
                        a.wave_id
                    )));
                }
                let name = format!("ring-{}-import-{}.json", a.ring, ringfence::time::now_ms());
                // Show what the imported approval covers (as signed).
                print!("{}", approvals::render(std::slice::from_ref(&a)));
                approvals::write_file(&dir.join(&name), &env).map_err(failed)?;
                println!(
                    "imported approval for wave {w} ring {} into {}",
                    a.ring,
                    dir.display()
                );
                return Ok(());
            }
            let (Some(ring), Some(key), Some(inventory), Some(spec)) = (ring, key, inventory, spec)
            else {
                return Err(config_err(
                    "--ring, --key, --inventory and --spec are required",
                ));
            };
            approve(ApproveArgs {
                settings: &settings,
                trust: &trust,
                dir: &dir,
                wave: &w,
                ring,
                key: &key,
                inventory: &inventory,
                spec: &spec,
                actions: &actions,
                ttl: ttl.as_deref(),
                yes,
                out,
            })
        }
    }
}

struct ApproveArgs<'a> {
    settings: &'a Settings,
    trust: &'a TrustSet,
    dir: &'a Path,
    wave: &'a str,
    ring: u32,
    key: &'a Path,
    inventory: &'a Path,
    spec: &'a Path,
    actions: &'a [ActionArg],
    ttl: Option<&'a str>,
    yes: bool,
    out: Option<PathBuf>,
}

/// `90`, `90s`, `15m`, `12h`, `2d` as seconds.
fn parse_ttl(text: &str) -> Result<u64, Failure> {
    let t = text.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => (t, 's'),
    };
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => 0,
    };
    match num.parse::<u64>() {
        Ok(n) if mult > 0 => Ok(n.saturating_mul(mult)),
        _ => Err(Failure {
            code: EXIT_USAGE,
            message: format!("--ttl `{text}`: expected seconds, or a number with s, m, h or d"),
        }),
    }
}

/// `ringfence wave approve`: build the scope from inventory + spec, refuse
/// when the coordinator's status disagrees, print all of it, confirm, sign.
fn approve(a: ApproveArgs<'_>) -> Result<(), Failure> {
    use std::io::{BufRead, IsTerminal, Write};
    let signing = ringfence::keys::read_signing_key(a.key).map_err(config_err)?;
    let own = wave::load_signer(&a.settings.signing.key, &a.settings.signing.key_id).ok();
    if own.is_some_and(|s| s.key.verifying_key() == signing.verifying_key()) {
        return Err(config_err(
            "this is the wave's coordinator key; a coordinator key can never approve",
        ));
    }
    let key_id = approvals::check_signing_key(a.trust, &signing).map_err(config_err)?;
    let inv = Inventory::load(a.inventory).map_err(config_err)?;
    let (spec, _) = parse_spec(a.spec)?;
    if spec.wave_id != a.wave {
        return Err(config_err(format!(
            "{} is the spec of wave `{}`, not `{}`",
            a.spec.display(),
            spec.wave_id,
            a.wave
        )));
    }
    // The lifetime: the spec's approval_ttl_s, or a shorter --ttl.
    let ttl_s = match a.ttl {
        Some(t) => parse_ttl(t)?,
        None => spec.approval_ttl_s,
    };
    // The cap: the spec's approval_ttl_s, and the agents' policy.
    let policy_cap = a.trust.policy.max_approval_lifetime_s;
    let (cap, why) = if policy_cap < spec.approval_ttl_s {
        (
            policy_cap,
            format!(
                "the cap is max_approval_lifetime_s of {}",
                a.settings.trust_file.display()
            ),
        )
    } else {
        (
            spec.approval_ttl_s,
            format!("the cap is approval_ttl_s of {}", a.spec.display()),
        )
    };
    approvals::check_ttl(ttl_s, cap, &why).map_err(config_err)?;
    let actions: Vec<pb::ApprovedAction> = if a.actions.is_empty() {
        let mut v = vec![pb::ApprovedAction::Patch];
        if !spec.rollback_version.is_empty() {
            v.push(pb::ApprovedAction::Rollback);
        }
        v
    } else {
        a.actions.iter().map(|x| (*x).into()).collect()
    };
    let req = approvals::Request {
        wave_id: spec.wave_id.clone(),
        ring: a.ring,
        profile: spec.profile.clone(),
        version: spec.version.clone(),
        rollback_version: spec.rollback_version.clone(),
        hosts: inv
            .hosts
            .iter()
            .filter(|h| h.ring == a.ring)
            .map(|h| h.id.clone())
            .collect(),
        actions,
        issued_at_ms: ringfence::time::now_ms(),
        ttl_s,
        approver: key_id.clone(),
    };
    // The coordinator's own view, when the wave has started, must be what
    // the approver is shown.
    let status_path = crate::store::WavePaths::new(&a.settings.state_dir, a.wave).status;
    if let Ok(text) = std::fs::read_to_string(&status_path) {
        let s: wave::StatusSnapshot = serde_json::from_str(&text)
            .map_err(|e| failed(format!("{}: {e}", status_path.display())))?;
        let diff = approvals::scope_differences(
            &req,
            s.ring_hosts.get(&a.ring).map(Vec::as_slice),
            &s.profile,
            &s.version,
            &s.rollback_version,
        );
        if !diff.is_empty() {
            return Err(config_err(format!(
                "not signed: the coordinator's view of wave {} ring {} ({}) differs from {} + {}:\n  {}",
                a.wave,
                a.ring,
                status_path.display(),
                a.inventory.display(),
                a.spec.display(),
                diff.join("\n  ")
            )));
        }
    }
    let threshold = spec
        .approver_threshold
        .max(a.trust.policy.approver_threshold);
    let limit = approvals::part_limit(threshold).map_err(config_err)?;
    let parts = approvals::build(&req, limit).map_err(config_err)?;
    print!("{}", approvals::render(&parts));
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure {
                code: EXIT_USAGE,
                message: "not signed: stdin is not a terminal, so nobody can confirm the scope above; pass --yes to sign it from a script".into(),
            });
        }
        print!("sign this approval as {key_id}? type `yes` to sign: ");
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if answer.trim() != "yes" {
            return Err(failed("not signed: not confirmed"));
        }
    }
    let n = parts.len();
    for (i, part) in parts.iter().enumerate() {
        let env = approvals::sign_ring(part, &key_id, &signing);
        let suffix = if n == 1 {
            String::new()
        } else {
            format!("-part{}of{n}", i + 1)
        };
        let path = match &a.out {
            Some(o) if n == 1 => o.clone(),
            Some(o) => o.with_file_name(format!(
                "{}{suffix}.json",
                o.file_stem().and_then(|x| x.to_str()).unwrap_or("approval")
            )),
            None => a.dir.join(format!("ring-{}-{key_id}{suffix}.json", a.ring)),
        };
        approvals::write_file(&path, &env).map_err(failed)?;
        println!("signed: {}", path.display());
    }
    println!(
        "approved wave {} ring {} ({} hosts, {} {}) as {key_id}",
        a.wave,
        a.ring,
        req.hosts.len(),
        spec.profile,
        spec.version
    );
    Ok(())
}

fn breakglass(cmd: BreakglassCommand) -> Result<(), Failure> {
    match cmd {
        BreakglassCommand::Sign {
            wave: w,
            pool,
            max_out,
            reason,
            key,
            out,
            add_to,
            ttl_h,
            inventory,
        } => {
            if let Some(inv) = &inventory {
                let inv = Inventory::load(inv).map_err(config_err)?;
                let (pool, max_out) = if add_to {
                    // Check what is countersigned, not the flags.
                    let env = approvals::read_file(&out).map_err(config_err)?;
                    let bg: pb::BreakGlass = prost::Message::decode(env.payload.as_slice())
                        .map_err(|e| config_err(format!("{}: {e}", out.display())))?;
                    (bg.pool, bg.max_out)
                } else {
                    (pool.clone(), max_out)
                };
                crate::plan::check_break_glass(&inv, &pool, max_out).map_err(config_err)?;
            }
            let signing = ringfence::keys::read_signing_key(&key).map_err(config_err)?;
            let key_id = ringfence::keys::fingerprint(&signing.verifying_key());
            if add_to {
                let mut env = approvals::read_file(&out).map_err(config_err)?;
                ringfence::envelope::add_signature(&mut env, &key_id, &signing);
                approvals::write_file(&out, &env).map_err(failed)?;
                println!("countersigned {}", out.display());
                return Ok(());
            }
            let now = ringfence::time::now_ms();
            let bg = pb::BreakGlass {
                wave_id: w,
                pool,
                max_out,
                reason,
                issued_at_unix_ms: now,
                expires_at_unix_ms: now + i64::try_from(ttl_h).unwrap_or(12) * 3600 * 1000,
                approver: key_id.clone(),
            };
            approvals::write_file(&out, &approvals::sign_breakglass(&bg, &key_id, &signing))
                .map_err(failed)?;
            println!(
                "signed break-glass {}; a second approver countersigns with --add-to",
                out.display()
            );
            Ok(())
        }
    }
}

fn evidence(config: Option<&Path>, cmd: EvidenceCommand) -> Result<(), Failure> {
    match cmd {
        EvidenceCommand::Verify {
            packet,
            inventory,
            trust,
            coordinator_key,
            json,
        } => {
            // The settings name the trust file and the coordinator key; they
            // are read unless --trust is given without --config.
            let settings = if trust.is_none() || config.is_some() {
                Some(Settings::load(config).map_err(config_err)?)
            } else {
                None
            };
            let trust_path = match (trust, &settings) {
                (Some(t), _) => t,
                (None, Some(s)) => s.trust_file.clone(),
                (None, None) => return Err(config_err("no trust file: pass --trust")),
            };
            let pinned = coordinator_key.or_else(|| settings.map(|s| s.signing.key_id));
            let trust = TrustSet::load(&trust_path).map_err(config_err)?;
            let inv = Inventory::load(&inventory).map_err(config_err)?;
            let bytes = std::fs::read(&packet)
                .map_err(|e| config_err(format!("{}: {e}", packet.display())))?;
            let enrolled = inv.enrolled_keys();
            let v = crate::evidence::verify_with(
                &bytes,
                &crate::evidence::VerifyWith {
                    trust: &trust,
                    enrolled: &enrolled,
                    coordinator_key_id: pinned.as_deref(),
                },
            )
            .map_err(|e| {
                failed(format!(
                    "{}: INVALID [{}]: {e}",
                    packet.display(),
                    e.check()
                ))
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print_verified(&packet, &v);
            }
            Ok(())
        }
    }
}

/// Print a verified packet: every verdict and version from the attestations.
fn print_verified(path: &Path, v: &crate::evidence::Verified) {
    let p = &v.packet;
    println!("{}: VALID, signed by {}", path.display(), v.signed_by);
    println!(
        "  wave {} ring {}{}: {} ({} hosts), {} {}",
        p.wave_id,
        p.ring,
        crate::plan::ring_name(p.ring),
        p.outcome,
        p.hosts.len(),
        p.profile,
        p.version
    );
    if let Some(r) = &p.halt_reason {
        println!("  halt: {r}");
    }
    let att = |a: Option<&crate::evidence::Attested>| {
        a.map(|a| format!("{} {}", a.verdict, a.driver_version))
            .unwrap_or_else(|| "(no attestation)".into())
    };
    for (h, e) in v.hosts.iter().zip(&p.hosts) {
        println!(
            "  {} [{}] {}: {} → {}{}",
            h.host_id,
            h.pool,
            h.phase,
            att(h.before.as_ref()),
            att(h.after.as_ref()),
            e.failure
                .as_ref()
                .map(|f| format!(" FAILED {} {}: {}", f.0, f.1, f.2))
                .unwrap_or_default()
        );
    }
    println!(
        "  verified: {} signed tasks, {} attestations, {} approvals (approvers: {})",
        v.tasks_checked,
        v.attestations_checked,
        v.approvals_checked,
        v.approvers.join(", ")
    );
    if let Some(rp) = &p.rollback_proof {
        println!(
            "  rollback proof: {} went {}",
            rp.host_id,
            v.rollback_versions.join(" → ")
        );
    }
}

/// The trust policy's `max_clock_skew_s` in ms: the clock difference with
/// the agents the coordinator tolerates, as the agents do.
fn skew_ms(trust: &TrustSet) -> i64 {
    i64::try_from(trust.policy.max_clock_skew_s)
        .unwrap_or(i64::MAX / 1000)
        .saturating_mul(1000)
}

/// Logs to stderr with the `RINGFENCE_LOG` filter (default `warn`); colour
/// codes only on a terminal, never in files or pipes. For `ringfence` and
/// the tools built on this library (`ringfence-demo`).
pub fn init_logging() {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGFENCE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
