//! `ringfence wave …`: plan, run, resume, status, halt, abort, rollback
//! and approve (in [`super::approve`]); [`driver`] builds the wave engine
//! from the settings, and [`WaveCmdError`] says why a wave command failed,
//! a halted wave included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use ringfence::pb;
use ringfence::trust::TrustSet;

use super::approve::{self, ApproveArgs, ApproveError};
use super::input::{self, Env, InputError};
use crate::approvals::{self, ApprovalError, BreakGlassGrant};
use crate::cli::report::Reporter;
use crate::inventory::Inventory;
use crate::plan::PlanError;
use crate::preflight;
use crate::settings::Settings;
use crate::spec::WaveSpec;
use crate::store::{StoreError, WavePaths, WaveStore};
use crate::wave::{self, Driver, HaltReport, Outcome, WaveError};

/// `ringfence wave`.
#[derive(Debug, Args)]
pub struct WaveArgs {
    #[command(subcommand)]
    pub(super) command: WaveCommand,
}

#[derive(Debug, Subcommand)]
pub(super) enum WaveCommand {
    /// Pre-flight: asks every host (identity, health) and refuses what
    /// `wave run` would refuse, naming hosts; else rings, batches, reserve
    /// math, protected rings. Drains nothing.
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
        /// Break-glass approval files (as `wave run` would get them).
        #[arg(long = "break-glass")]
        break_glass: Vec<PathBuf>,
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
        #[command(flatten)]
        metrics: MetricsArgs,
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
        #[command(flatten)]
        metrics: MetricsArgs,
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
    /// The waves in the configured store (`[store]`) with their state and
    /// the coordinator driving each (pid, host, since), if any.
    List,
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
    Approve(ApproveArgs),
}

/// `--metrics-listen` / `--metrics-linger` of `wave run` and `wave resume`.
#[derive(Debug, Clone, Args)]
pub(super) struct MetricsArgs {
    /// Serve the wave's progress as Prometheus metrics at
    /// http://ADDR/metrics while the command runs (plain HTTP, no
    /// authentication: a loopback or management address). Off by default.
    #[arg(long = "metrics-listen", value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// With --metrics-listen: after the wave ends (completed or halted),
    /// keep serving its final state this many seconds, so that Prometheus
    /// scrapes the end (a halt) before the command exits. Ctrl-C ends it.
    #[arg(
        long = "metrics-linger",
        value_name = "SECONDS",
        default_value_t = 60,
        requires = "metrics_listen"
    )]
    metrics_linger: u64,
}

/// A wave's metrics endpoint while a command drives it.
struct Serving {
    metrics: crate::metrics::Metrics,
    server: crate::metrics::MetricsServer,
    linger: Duration,
}

impl MetricsArgs {
    /// Bind the endpoint (before anything is drained); `None` when off.
    async fn serve(&self, wave: &str) -> Result<Option<Serving>, WaveCmdError> {
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        let metrics = crate::metrics::Metrics::new(wave);
        let server = metrics.serve(addr).await?;
        Ok(Some(Serving {
            metrics,
            server,
            linger: Duration::from_secs(self.metrics_linger),
        }))
    }
}

impl Serving {
    /// The engine's sink, teed to the metrics.
    fn attach(&self, d: &mut Driver) {
        let tee = crate::metrics::Tee(vec![d.events.clone(), Arc::new(self.metrics.sink())]);
        d.events = Arc::new(tee);
    }

    /// The wave ended: serve its final state `linger` longer (Ctrl-C ends it).
    async fn linger(self, result: &Result<(), WaveCmdError>) {
        if self.linger.is_zero() {
            return;
        }
        let how = match result {
            Ok(()) => "completed",
            Err(WaveCmdError::Halted(_)) => "halted",
            Err(_) => "stopped",
        };
        eprintln!(
            "wave {how}; metrics: serving its final state at http://{}{} for {} s more (--metrics-linger; Ctrl-C ends it)",
            self.server.addr(),
            crate::metrics::PATH,
            self.linger.as_secs()
        );
        tokio::select! {
            () = tokio::time::sleep(self.linger) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}

/// Why a `wave` command failed, or how a wave ended when not completed.
#[derive(Debug, thiserror::Error)]
pub enum WaveCmdError {
    /// An operator file is unusable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// `wave approve` signed nothing.
    #[error(transparent)]
    Approve(Box<ApproveError>),
    /// The wave engine refused or failed.
    #[error(transparent)]
    Engine(#[from] WaveError),
    /// The wave halted; the failed host is left drained.
    #[error("{}", halt_message(.0))]
    Halted(Box<HaltReport>),
    /// `wave plan`: the wave cannot be planned.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The wave's store cannot be opened (no such wave, held by another
    /// coordinator, unreadable).
    #[error(transparent)]
    OpenStore(StoreError),
    /// The wave's store failed while in use.
    #[error(transparent)]
    Store(StoreError),
    /// `resume` / `rollback`: the wave has no stored spec.
    #[error("wave `{wave}` has no state under {}", dir.display())]
    NoState {
        /// Wave id.
        wave: String,
        /// The settings' `state_dir`.
        dir: PathBuf,
    },
    /// `resume --skip` without a reason.
    #[error("--skip needs --reason \"...\"")]
    SkipWithoutReason,
    /// A `--break-glass` file is not signed, not in force, or not for this wave.
    #[error("break-glass {}: {source}", path.display())]
    BreakGlass {
        /// The file.
        path: PathBuf,
        /// Why it is refused.
        source: ApprovalError,
    },
    /// A `--break-glass` file names a pool the inventory lacks, or too many hosts.
    #[error("break-glass {}: {source}", path.display())]
    BreakGlassScope {
        /// The file.
        path: PathBuf,
        /// Why it is refused.
        source: PlanError,
    },
    /// `rollback`: the host was patched back but did not validate.
    #[error("{host}: {reason}")]
    RollbackFailed {
        /// The host.
        host: String,
        /// Why it failed.
        reason: String,
    },
    /// `status`: the wave has no status snapshot.
    #[error("{}: {source} (no such wave, or it never started)", path.display())]
    NoStatus {
        /// The status file.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// `run`: the wave id names a wave that already ended.
    #[error(
        "wave `{wave}` is already {phase}; a wave id is used once: choose a new `wave_id` in the spec"
    )]
    Finished {
        /// Wave id.
        wave: String,
        /// `completed` or `aborted`.
        phase: String,
    },
    /// `abort` while another coordinator drives the wave: it must halt first.
    #[error(
        "wave `{wave}` is being driven by another coordinator ({holder}); abort refused: stop it first with `ringfence wave halt --wave {wave}`, wait for it to exit, then `ringfence wave abort --wave {wave}`"
    )]
    AbortWhileRunning {
        /// Wave id.
        wave: String,
        /// Who holds the wave, its start time in RFC 3339.
        holder: String,
    },
    /// `run`: the wave cannot start, for a reason the pre-flight names
    /// (a pool's reserve that rounds down to 0 hosts); nothing was drained.
    #[error("{0}; nothing was drained")]
    Refused(Box<crate::preflight::Refusal>),
    /// `plan`: the pre-flight refuses the wave (each reason names its hosts).
    #[error("{0}\n`wave run` would refuse this wave; nothing was drained")]
    Preflight(crate::preflight::Refused),
    /// `--metrics-listen`: the endpoint could not start (nothing was drained).
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// `status`: the status snapshot does not parse.
    #[error("{}: {source}", path.display())]
    BadStatus {
        /// The status file.
        path: PathBuf,
        /// Why it does not parse.
        source: serde_json::Error,
    },
}

impl From<ApproveError> for WaveCmdError {
    fn from(e: ApproveError) -> Self {
        WaveCmdError::Approve(Box::new(e))
    }
}

/// What `wave run` / `wave resume` print when the wave halts: where, why,
/// and the ways on (an operator's halt has no failed host: a plain resume
/// continues it).
fn halt_message(h: &HaltReport) -> String {
    if h.kind == wave::FailureKind::Operator {
        return format!(
            "wave {} HALTED by the operator in ring {}: {}\nno host failed; continue with `ringfence wave resume --wave {}` or end it with `ringfence wave abort --wave {}`",
            h.wave_id, h.ring, h.reason, h.wave_id, h.wave_id
        );
    }
    format!(
        "wave {} HALTED in ring {}: host {} step {} ({}): {}\n{}; decide with `ringfence wave resume --wave {} --retry HOST | --skip HOST --reason ...` or `ringfence wave abort --wave {}`",
        h.wave_id,
        h.ring,
        h.host.as_deref().unwrap_or("-"),
        h.step,
        h.kind,
        h.reason,
        // A soak regression comes after validation and undrain; the
        // reason says whether the wave could drain the host again.
        if h.kind == wave::FailureKind::SoakRegression {
            "the failed host regressed after it was back in service"
        } else {
            "the failed host is left drained"
        },
        h.wave_id,
        h.wave_id
    )
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
    break_glass: Vec<(BreakGlassGrant, pb::Envelope)>,
) -> Result<Driver, InputError> {
    let signer = wave::load_signer(&settings.signing.key, &settings.signing.key_id)?;
    let clock = input::clock();
    Ok(Driver {
        inventory,
        spec,
        trust,
        signer,
        store,
        connector,
        clock,
        events: Arc::new(reporter),
        poll_interval: Duration::from_millis(200),
        halt_grace: settings.timeouts.halt_grace(),
        soak_report_max_age: settings.timeouts.soak_report_max_age(),
        state_dir: settings.state_dir.clone(),
        break_glass,
    })
}

/// The engine for one command: the settings' signer, mTLS to the
/// inventory's agents with the settings' timeouts.
fn engine(
    env: Env,
    inv: Inventory,
    spec: WaveSpec,
    store: Arc<WaveStore>,
    reporter: &Reporter,
    break_glass: Vec<(BreakGlassGrant, pb::Envelope)>,
) -> Result<Driver, InputError> {
    let conn = Arc::new(env.connector(&inv));
    let reporter = reporter.clone();
    driver(
        &env.settings,
        env.trust,
        inv,
        spec,
        store,
        conn,
        reporter,
        break_glass,
    )
}

/// Run a `wave` command.
pub(super) async fn run(config: Option<&Path>, cmd: WaveCommand) -> Result<(), WaveCmdError> {
    match cmd {
        WaveCommand::Plan {
            inventory,
            spec,
            json,
            break_glass,
        } => plan(config, &inventory, &spec, json, &break_glass).await,
        WaveCommand::Run {
            inventory,
            spec,
            json,
            break_glass,
            metrics,
        } => start(config, &inventory, &spec, json, &break_glass, &metrics).await,
        WaveCommand::Resume {
            wave,
            inventory,
            retry,
            skip,
            reason,
            json,
            break_glass,
            metrics,
        } => {
            let decisions = Decisions {
                retry,
                skip,
                reason,
            };
            let how = (json, break_glass.as_slice(), &metrics);
            resume(config, &wave, &inventory, decisions, how).await
        }
        WaveCommand::Rollback {
            wave,
            host,
            inventory,
        } => rollback(config, &wave, &host, &inventory).await,
        WaveCommand::Status { wave, json } => status(config, &wave, json),
        WaveCommand::List => {
            let settings = input::settings(config)?;
            let waves = crate::store::list_waves_in(&settings.store, &settings.state_dir)
                .map_err(WaveCmdError::Store)?;
            if waves.is_empty() {
                println!("no waves in the store");
            }
            for w in waves {
                println!(
                    "{}\t{}\t{}",
                    w.wave,
                    w.phase,
                    w.holder.as_deref().unwrap_or("not held")
                );
            }
            Ok(())
        }
        WaveCommand::Halt { wave } => {
            let settings = input::settings(config)?;
            if settings.store.backend == crate::settings::Backend::Redb
                && !WaveStore::exists(&settings.state_dir, &wave)
            {
                return Err(WaveCmdError::OpenStore(StoreError::NoSuchWave {
                    wave,
                    dir: settings.state_dir,
                }));
            }
            crate::store::request_halt_in(
                &settings.store,
                &settings.state_dir,
                &wave,
                input::clock().now_ms(),
            )
            .map_err(WaveCmdError::Store)?;
            println!(
                "halt requested for wave {wave}: no new host starts; hosts in flight finish their current step"
            );
            Ok(())
        }
        WaveCommand::Abort { wave } => {
            let settings = input::settings(config)?;
            let store = match WaveStore::open_in(
                &settings.store,
                &settings.state_dir,
                &wave,
                input::clock().as_ref(),
            ) {
                Ok(s) => s,
                Err(StoreError::Held { wave, holder }) => {
                    return Err(WaveCmdError::AbortWhileRunning {
                        wave,
                        holder: readable_holder(&holder),
                    });
                }
                Err(e) => return Err(WaveCmdError::OpenStore(e)),
            };
            wave::abort(&store, input::clock().as_ref()).map_err(WaveCmdError::Store)?;
            mark_aborted(&settings, &store).map_err(WaveCmdError::Store)?;
            println!(
                "wave {wave} aborted; hosts left drained stay drained until an operator undrains them"
            );
            Ok(())
        }
        WaveCommand::Approve(a) => Ok(approve::run(config, a)?),
    }
}

/// `wave plan`: the pre-flight over the same settings, trust file, TLS
/// identity and break-glass files as `wave run`, every host asked; the
/// plan as text or JSON when nothing refuses the wave.
async fn plan(
    config: Option<&Path>,
    inventory: &Path,
    spec: &Path,
    json: bool,
    break_glass_files: &[PathBuf],
) -> Result<(), WaveCmdError> {
    let env = Env::load(config)?;
    let inv = input::inventory(inventory)?;
    let (spec, _) = input::spec(spec)?;
    let wave_id = spec.wave_id.clone();
    // A wave that started has a status snapshot: `run` refuses its id.
    let paths = WavePaths::new(&env.settings.state_dir, &wave_id);
    if let Some(phase) = finished_at(&paths.status) {
        return Err(WaveCmdError::Finished {
            wave: wave_id,
            phase,
        });
    }
    if paths.status.exists() {
        return Err(WaveError::Exists(wave_id).into());
    }
    let bg = break_glass(break_glass_files, &env.trust, &wave_id, &inv)?;
    let overrides: BTreeMap<String, crate::plan::BreakGlassLimit> = bg
        .iter()
        .map(|(g, _)| {
            let limit = crate::plan::BreakGlassLimit {
                max_out: g.max_out,
                expires_at_ms: g.expires_at_ms,
            };
            (g.pool.clone(), limit)
        })
        .collect();
    // No state directory yet (a first wave): no other wave holds a host.
    let in_other_waves: BTreeSet<String> = if env.settings.state_dir.is_dir() {
        crate::store::PoolLedger::new(&paths)
            .lock()
            .await
            .map_err(WaveCmdError::Store)?
            .others(&wave_id)
            .into_values()
            .flat_map(BTreeMap::into_keys)
            .collect()
    } else {
        BTreeSet::new()
    };
    let conn: Arc<dyn wave::Connector> = Arc::new(env.connector(&inv));
    let probes = preflight::probe(&inv, conn, preflight::Ask::IdentityAndHealth).await;
    let cleared = preflight::check(&inv, &spec, &probes, &in_other_waves, &overrides)
        .map_err(WaveCmdError::Preflight)?;
    if json {
        let mut value = crate::plan::render_json(&cleared.plan);
        if let Some(o) = value.as_object_mut() {
            let unreachable: BTreeMap<&str, &str> = cleared
                .unreachable
                .iter()
                .map(|(h, why)| (h.as_str(), why.as_str()))
                .collect();
            o.insert("unreachable".into(), serde_json::json!(unreachable));
        }
        super::render::print_line(&serde_json::to_string_pretty(&value).unwrap_or_default());
    } else {
        let mut text = crate::plan::render_text(&cleared.plan);
        text.push_str(&format!(
            "pre-flight: {} host(s) asked: rings, patch profile `{}`, drain state and health agree with the wave\n",
            probes.len() - cleared.unreachable.len(),
            spec.profile
        ));
        for (h, why) in &cleared.unreachable {
            text.push_str(&format!(
                "warning: {h} unreachable ({why}); the wave fails it when its turn comes\n"
            ));
        }
        super::render::print_text(&text);
    }
    Ok(())
}

/// `wave run`.
async fn start(
    config: Option<&Path>,
    inventory: &Path,
    spec: &Path,
    json: bool,
    break_glass_files: &[PathBuf],
    metrics: &MetricsArgs,
) -> Result<(), WaveCmdError> {
    let env = Env::load(config)?;
    let inv = input::inventory(inventory)?;
    let (spec, text) = input::spec(spec)?;
    let serving = metrics.serve(&spec.wave_id).await?;
    let bg = break_glass(break_glass_files, &env.trust, &spec.wave_id, &inv)?;
    // The agents' rings are checked by the wave's own probe, over the
    // connection it opens to each host anyway (WaveError::RingMismatch).
    let store = Arc::new(open_store(&env.settings, &spec.wave_id)?);
    if let Some(phase) = finished(&store) {
        return Err(WaveCmdError::Finished {
            wave: spec.wave_id,
            phase,
        });
    }
    store
        .put_meta(wave::META_SPEC_TEXT, &text)
        .map_err(WaveCmdError::Store)?;
    let reporter = Reporter::new(json);
    let mut d = engine(env, inv, spec, store, &reporter, bg)?;
    if let Some(s) = &serving {
        s.attach(&mut d);
    }
    let result = outcome(d.run().await, &reporter);
    if let Some(s) = serving {
        s.linger(&result).await;
    }
    result
}

/// `wave resume`'s decisions for the failed hosts.
struct Decisions {
    retry: Vec<String>,
    skip: Vec<String>,
    reason: Option<String>,
}

impl Decisions {
    /// Each skipped host with the reason; refused without one.
    fn skips(self) -> Result<Vec<(String, String)>, WaveCmdError> {
        match self.reason {
            Some(r) if !r.is_empty() => Ok(self.skip.into_iter().map(|h| (h, r.clone())).collect()),
            _ if self.skip.is_empty() => Ok(Vec::new()),
            _ => Err(WaveCmdError::SkipWithoutReason),
        }
    }
}

/// `wave resume`.
async fn resume(
    config: Option<&Path>,
    wave: &str,
    inventory: &Path,
    mut decisions: Decisions,
    (json, break_glass_files, metrics): (bool, &[PathBuf], &MetricsArgs),
) -> Result<(), WaveCmdError> {
    let serving = metrics.serve(wave).await?;
    let env = Env::load(config)?;
    let inv = input::inventory(inventory)?;
    let retry = std::mem::take(&mut decisions.retry);
    let skip = decisions.skips()?;
    let store = Arc::new(open_store(&env.settings, wave)?);
    // The resume begins here: a halt requested from now on stands.
    let seen_halt = store.halt_request();
    let spec = stored_spec(&store, wave, &env.settings.state_dir)?;
    let bg = break_glass(break_glass_files, &env.trust, wave, &inv)?;
    refuse_ring_mismatch(wave, &inv, &env).await?;
    let reporter = Reporter::new(json);
    let mut d = engine(env, inv, spec, store, &reporter, bg)?;
    if let Some(s) = &serving {
        s.attach(&mut d);
    }
    let result = outcome(d.resume_after(&retry, &skip, seen_halt).await, &reporter);
    if let Some(s) = serving {
        s.linger(&result).await;
    }
    result
}

/// `wave rollback`: one host back by hand, left drained.
async fn rollback(
    config: Option<&Path>,
    wave: &str,
    host: &str,
    inventory: &Path,
) -> Result<(), WaveCmdError> {
    let env = Env::load(config)?;
    let inv = input::inventory(inventory)?;
    let store = Arc::new(open_store(&env.settings, wave)?);
    let spec = stored_spec(&store, wave, &env.settings.state_dir)?;
    let reporter = Reporter::new(false);
    let mut d = engine(env, inv, spec, store, &reporter, Vec::new())?;
    let result = d.rollback_host(host).await;
    reporter.finish();
    match result? {
        (rec, None) => {
            let after = rec.after.as_ref();
            println!(
                "{host}: rolled back to {} ({}); left drained — undrain it by hand when satisfied",
                after.map(|a| a.driver_version.as_str()).unwrap_or("?"),
                after.map(|a| a.verdict.as_str()).unwrap_or("?"),
            );
            Ok(())
        }
        (_, Some(f)) => Err(WaveCmdError::RollbackFailed {
            host: host.to_string(),
            reason: f.reason,
        }),
    }
}

/// `wave status`: the snapshot the running coordinator writes.
fn status(config: Option<&Path>, wave: &str, json: bool) -> Result<(), WaveCmdError> {
    let settings = input::settings(config)?;
    let path = WavePaths::new(&settings.state_dir, wave).status;
    let text = match crate::store::read_status_in(&settings.store, &settings.state_dir, wave) {
        Ok(t) => t,
        Err(StoreError::Io { source, .. }) => return Err(WaveCmdError::NoStatus { path, source }),
        Err(e) => return Err(WaveCmdError::Store(e)),
    };
    if json {
        super::render::print_line(&text);
        return Ok(());
    }
    let snapshot: wave::StatusSnapshot = match serde_json::from_str(&text) {
        Ok(s) => s,
        Err(source) => return Err(WaveCmdError::BadStatus { path, source }),
    };
    let approvers = ring_approvers(&settings, &snapshot);
    super::render::print_text(&super::render::status(&snapshot, &approvers));
    Ok(())
}

/// Who approved each protected ring of the wave so far: the approval
/// files under the wave's approvals directory that the trust file verifies
/// and that cover the ring's hosts, profile and version (as the wave
/// counts them). Empty when the trust file cannot be read.
fn ring_approvers(
    settings: &Settings,
    snapshot: &wave::StatusSnapshot,
) -> super::render::RingApprovers {
    let Ok(trust) = TrustSet::load(&settings.trust_file) else {
        return super::render::RingApprovers::new();
    };
    let dir = approvals::approvals_dir(&settings.state_dir, &snapshot.wave_id);
    let now_ms = input::clock().now_ms();
    snapshot
        .rings
        .iter()
        .filter(|(_, v)| v.approval != "not needed")
        .map(|(r, _)| {
            let hosts = snapshot.ring_hosts.get(r).cloned().unwrap_or_default();
            let scope = approvals::RingScope {
                wave_id: &snapshot.wave_id,
                ring: *r,
                profile: &snapshot.profile,
                version: &snapshot.version,
                hosts: &hosts,
            };
            let got = approvals::collect_ring(&dir, &trust, &scope, now_ms);
            (*r, got.approvers.into_iter().collect())
        })
        .collect()
}

/// `completed` or `aborted` when the wave's status snapshot says so.
fn finished(store: &WaveStore) -> Option<String> {
    finished_at(&store.paths.status)
}

/// [`finished`] of the status snapshot at `path`.
fn finished_at(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let snapshot: wave::StatusSnapshot = serde_json::from_str(&text).ok()?;
    matches!(snapshot.phase.as_str(), "completed" | "aborted").then_some(snapshot.phase)
}

/// After `abort`: the status snapshot says so (phase `aborted`, no next
/// step), so `wave status` no longer shows the wave halted.
fn mark_aborted(settings: &Settings, store: &WaveStore) -> Result<(), StoreError> {
    // The snapshot where `wave status` reads it: the local file, or the
    // etcd status key (an abort from another machine than the driver's).
    let Ok(text) =
        crate::store::read_status_in(&settings.store, &settings.state_dir, &store.paths.wave)
    else {
        // A wave that never wrote a snapshot has none to correct.
        return Ok(());
    };
    let Ok(mut snapshot) = serde_json::from_str::<wave::StatusSnapshot>(&text) else {
        return Ok(());
    };
    snapshot.phase = "aborted".into();
    snapshot.updated_at_ms = input::clock().now_ms();
    store.write_status(&snapshot)
}

/// A wave lock's holder (`pid N on HOST since MS`) with its start time in
/// RFC 3339; any other text as it is.
fn readable_holder(holder: &str) -> String {
    match holder.rsplit_once(" since ") {
        Some((who, ms)) => match ms.trim().parse::<i64>() {
            Ok(ms) => format!("{who}, running since {}", super::render::rfc3339(ms)),
            Err(_) => holder.to_string(),
        },
        None => holder.to_string(),
    }
}

fn open_store(settings: &Settings, wave: &str) -> Result<WaveStore, WaveCmdError> {
    WaveStore::open_in(
        &settings.store,
        &settings.state_dir,
        wave,
        input::clock().as_ref(),
    )
    .map_err(WaveCmdError::OpenStore)
}

/// The spec stored with the wave when it started.
fn stored_spec(store: &WaveStore, wave: &str, state_dir: &Path) -> Result<WaveSpec, WaveCmdError> {
    let text: Option<String> = store
        .get_meta(wave::META_SPEC_TEXT)
        .map_err(WaveCmdError::Store)?;
    let Some(text) = text else {
        return Err(WaveCmdError::NoState {
            wave: wave.to_string(),
            dir: state_dir.to_path_buf(),
        });
    };
    let src = ringfence::config::Source::from_text(format!("<stored spec of {wave}>"), text);
    Ok(WaveSpec::from_source(&src).map_err(InputError::Spec)?)
}

/// Read and check `--break-glass` files: signed by enough approvers, in
/// force, for this wave, for a pool the inventory has.
fn break_glass(
    files: &[PathBuf],
    trust: &TrustSet,
    wave: &str,
    inv: &Inventory,
) -> Result<Vec<(BreakGlassGrant, pb::Envelope)>, WaveCmdError> {
    let mut out = Vec::new();
    for f in files {
        let env = approvals::read_file(f).map_err(InputError::from)?;
        let grant = approvals::check_breakglass(&env, trust, wave, input::clock().now_ms())
            .map_err(|source| WaveCmdError::BreakGlass {
                path: f.clone(),
                source,
            })?;
        crate::plan::check_break_glass(inv, &grant.pool, grant.max_out).map_err(|source| {
            WaveCmdError::BreakGlassScope {
                path: f.clone(),
                source,
            }
        })?;
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

/// `wave resume` refuses to start while any reachable host's agent is
/// configured in another ring than the inventory's, or in none (exit 3,
/// naming every such host). Unreachable hosts are left to the wave, which
/// fails them as unreachable. (`wave run` has the engine's own probe.)
async fn refuse_ring_mismatch(wave: &str, inv: &Inventory, env: &Env) -> Result<(), WaveError> {
    let conn = Arc::new(env.connector(inv));
    let hosts: Vec<String> = super::inventory::agent_rings(inv, conn)
        .await
        .into_iter()
        .filter_map(|(h, r)| match r {
            Ok(f) if f.blocks_wave() => Some(format!("{h}: {f}")),
            _ => None,
        })
        .collect();
    if hosts.is_empty() {
        return Ok(());
    }
    Err(WaveError::RingMismatch {
        wave: wave.to_string(),
        inventory: inv.path.clone(),
        hosts,
    })
}

/// A wave that ran to its end: completed is `Ok`, halted is
/// [`WaveCmdError::Halted`].
fn outcome(o: Result<Outcome, WaveError>, reporter: &Reporter) -> Result<(), WaveCmdError> {
    reporter.finish();
    let o = o.map_err(|e| match e {
        // A pool whose reserve rounds down to 0 hosts: say which
        // `reserve_percent` allows one, as `wave plan` does.
        WaveError::Plan(p) => match preflight::plan_refusal(p) {
            preflight::Refusal::Plan(p) => WaveCmdError::Engine(WaveError::Plan(p)),
            r => WaveCmdError::Refused(Box::new(r)),
        },
        e => WaveCmdError::Engine(e),
    })?;
    match o {
        Outcome::Completed => {
            println!("wave completed: every ring promoted");
            Ok(())
        }
        Outcome::Halted(h) => Err(WaveCmdError::Halted(Box::new(h))),
    }
}
