//! `ringfence hosts health|identity|drain|undrain`: ask agents about
//! themselves over mTLS — every host's verified health as a table (or JSON
//! lines; non-zero exit when a host is unreachable or not HEALTHY), or one
//! host's identity — and take one host out of service or back into it by
//! hand (`undrain` validates first; see [`crate::wave::undrain_by_hand`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Args, Subcommand};
use prost::Message;
use ringfence::pb;

use super::input::{self, Env, InputError};
use crate::approvals::{self, ApprovalSet, RingScope};
use crate::client::ClientError;
use crate::inventory::{Host, Inventory};
use crate::store::{StoreError, WaveStore};
use crate::wave::{Connector, Ctx, HostJob, Params, UndrainOutcome};

/// The wave store (under the settings' `state_dir`) that records the tasks
/// of `hosts drain` and `hosts undrain`, and the wave id their tasks carry
/// unless `--wave` names the wave whose approvals a forced undrain uses.
pub const BY_HAND: &str = "hosts-by-hand";

/// `ringfence hosts`.
#[derive(Debug, Args)]
pub struct HostsArgs {
    #[command(subcommand)]
    pub(super) command: HostsCommand,
}

#[derive(Debug, Subcommand)]
pub(super) enum HostsCommand {
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
    /// Take one host out of service by hand (a signed Drain task; the
    /// agent's drain mark keeps who and why).
    Drain {
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// Host id.
        #[arg(long)]
        host: String,
        /// Why (kept by the agent in its drain mark).
        #[arg(long)]
        reason: String,
    },
    /// Validate one host (fresh attestation) and put it back into service
    /// only when HEALTHY.
    Undrain {
        /// Inventory file.
        #[arg(long)]
        inventory: PathBuf,
        /// Host id.
        #[arg(long)]
        host: String,
        /// Why (kept by the agent in its journal).
        #[arg(long)]
        reason: String,
        /// Undrain even when the host does not validate HEALTHY: needs ring
        /// approvals for the host's ring listing `force-undrain`, collected
        /// for `--wave` (`ringfence wave approve --action force-undrain`).
        #[arg(long, requires = "wave")]
        force: bool,
        /// The wave whose ring approvals cover a forced undrain.
        #[arg(long)]
        wave: Option<String>,
    },
}

/// Why a `hosts` command failed.
#[derive(Debug, thiserror::Error)]
pub enum HostsCmdError {
    /// An operator file is unusable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// `--host` names a host the inventory does not have.
    #[error("no host `{host}` in {}", inventory.display())]
    NoHost {
        /// The host asked for.
        host: String,
        /// The inventory.
        inventory: PathBuf,
    },
    /// The host could not be connected to.
    #[error("{0}")]
    Unreachable(String),
    /// The agent's answer was an error.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// The by-hand wave store could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `hosts drain` or `hosts undrain` did not change the host.
    #[error("host `{host}` {what}: {reason}")]
    Refused {
        /// The host.
        host: String,
        /// What was not done ("left drained", "not drained").
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A forced undrain without usable ring approvals.
    #[error(
        "forced undrain of `{host}` needs ring {ring} approvals listing force-undrain for it in {}: {why}",
        dir.display()
    )]
    NoApprovals {
        /// The host.
        host: String,
        /// Its ring.
        ring: u32,
        /// Where the approvals were looked for.
        dir: PathBuf,
        /// What was found instead.
        why: String,
    },
    /// `hosts health`: some hosts are unreachable or not HEALTHY.
    #[error("{bad} of {total} hosts unreachable or not HEALTHY")]
    NotHealthy {
        /// Hosts unreachable or not HEALTHY.
        bad: usize,
        /// Hosts asked.
        total: usize,
    },
}

/// Run a `hosts` command.
pub(super) async fn run(config: Option<&Path>, cmd: HostsCommand) -> Result<(), HostsCmdError> {
    let env = Env::load(config)?;
    match cmd {
        HostsCommand::Identity { inventory, host } => {
            let inv = input::inventory(&inventory)?;
            let Some(h) = inv.host(&host) else {
                return Err(HostsCmdError::NoHost { host, inventory });
            };
            let api = env
                .connector(&inv)
                .connect(h)
                .await
                .map_err(|e| HostsCmdError::Unreachable(e.to_string()))?;
            let id = api.identity().await?;
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
        }
        HostsCommand::Health { inventory, json } => {
            let inv = input::inventory(&inventory)?;
            let conn = Arc::new(env.connector(&inv));
            let rows =
                crate::cli::health_table::collect(&inv, conn, 64, env.skew_ms(), input::clock())
                    .await;
            if json {
                let lines: String = rows
                    .iter()
                    .map(|r| format!("{}\n", serde_json::to_string(r).unwrap_or_default()))
                    .collect();
                super::render::print_text(&lines);
            } else {
                // A reader that went away (`| head -1`) is no panic.
                super::render::print_text(&crate::cli::health_table::render(&rows));
            }
            let bad = rows.iter().filter(|r| r.verdict != "HEALTHY").count();
            if bad > 0 {
                return Err(HostsCmdError::NotHealthy {
                    bad,
                    total: rows.len(),
                });
            }
        }
        HostsCommand::Drain {
            inventory,
            host,
            reason,
        } => {
            let h = ByHand::open(&env, &inventory, &host, BY_HAND, ApprovalSet::empty()).await?;
            let (ctx, job, api) = (&h.ctx, &h.job, h.api.as_ref());
            let note = operator_note("drain", &reason);
            let (_, failure) = crate::wave::drain_by_hand(ctx, job, api, &note)
                .await
                .map_err(|crate::wave::HostRunError::Store(e)| e)?;
            if let Some(f) = failure {
                return Err(HostsCmdError::Refused {
                    host,
                    what: "not drained",
                    reason: f.reason,
                });
            }
            println!("{host}: drained ({note})");
        }
        HostsCommand::Undrain {
            inventory,
            host,
            reason,
            force,
            wave,
        } => {
            let inv = input::inventory(&inventory)?;
            let (wave_id, approvals) = match (force, wave) {
                (true, Some(w)) => {
                    let ring = find(&inv, &inventory, &host)?.ring;
                    let set = force_approvals(&env, &w, &host, ring)?;
                    (w, set)
                }
                _ => (BY_HAND.to_string(), ApprovalSet::empty()),
            };
            let h = ByHand::open(&env, &inventory, &host, &wave_id, approvals).await?;
            let (ctx, job, api) = (&h.ctx, &h.job, h.api.as_ref());
            let note = operator_note("undrain", &reason);
            let (_, outcome) = crate::wave::undrain_by_hand(ctx, job, api, &note, force)
                .await
                .map_err(|crate::wave::HostRunError::Store(e)| e)?;
            match outcome {
                UndrainOutcome::Undrained => {
                    println!("{host}: validated HEALTHY and back in service ({note})");
                }
                UndrainOutcome::Forced { validation } => println!(
                    "{host}: FORCED back into service with ring approvals despite: {validation} ({note})"
                ),
                UndrainOutcome::Refused(f) => {
                    return Err(HostsCmdError::Refused {
                        host,
                        what: "left drained",
                        reason: if force {
                            f.reason
                        } else {
                            format!(
                                "{}; fix the host and run `hosts undrain` again, or force it with ring approvals (--force --wave W)",
                                f.reason
                            )
                        },
                    });
                }
            }
        }
    }
    Ok(())
}

/// The operator's note for the agent: who (the login name) and why.
fn operator_note(what: &str, reason: &str) -> String {
    let who = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown operator".into());
    format!("{reason} (ringfence hosts {what} by {who})")
}

fn find<'a>(inv: &'a Inventory, path: &Path, host: &str) -> Result<&'a Host, HostsCmdError> {
    inv.host(host).ok_or_else(|| HostsCmdError::NoHost {
        host: host.to_string(),
        inventory: path.to_path_buf(),
    })
}

/// The verified approvals of `wave` for `host`'s ring that list
/// force-undrain and name the host (the agent counts their approvers).
fn force_approvals(
    env: &Env,
    wave: &str,
    host: &str,
    ring: u32,
) -> Result<ApprovalSet, HostsCmdError> {
    let dir = approvals::approvals_dir(&env.settings.state_dir, wave);
    let now = input::clock().now_ms();
    let mut set = ApprovalSet::empty();
    let mut why = Vec::new();
    let prefix = format!("ring-{ring}-");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".json"))
    });
    files.sort();
    for p in files {
        let checked = approvals::read_file(&p).and_then(|env_| {
            let a = pb::RingApproval::decode(env_.payload.as_slice()).unwrap_or_default();
            let scope = RingScope {
                wave_id: wave,
                ring,
                profile: &a.profile,
                version: &a.version,
                hosts: &[],
            };
            approvals::verify_ring(&env_, &env.trust, &scope, now).map(|c| (env_, c))
        });
        match checked {
            Ok((e, c))
                if c.hosts.contains(host)
                    && c.actions
                        .contains(&(pb::ApprovedAction::ForceUndrain as i32)) =>
            {
                set.push(e, c);
            }
            Ok(_) => why.push(format!(
                "{}: does not list force-undrain for {host}",
                p.display()
            )),
            Err(e) => why.push(format!("{}: {e}", p.display())),
        }
    }
    if set.is_empty() {
        return Err(HostsCmdError::NoApprovals {
            host: host.to_string(),
            ring,
            dir,
            why: if why.is_empty() {
                "no approval files".into()
            } else {
                why.join("; ")
            },
        });
    }
    Ok(set)
}

/// What a drain or undrain by hand needs: the by-hand store, the settings'
/// signer, the host's job (enrolled key, ring approvals) and its agent.
struct ByHand {
    ctx: Ctx,
    job: HostJob,
    api: Arc<dyn crate::client::HostApi>,
}

impl ByHand {
    async fn open(
        env: &Env,
        inventory: &Path,
        host: &str,
        wave_id: &str,
        approvals: ApprovalSet,
    ) -> Result<Self, HostsCmdError> {
        let inv = input::inventory(inventory)?;
        let h = find(&inv, inventory, host)?;
        let Some(key) = h.attestation_key else {
            return Err(HostsCmdError::Refused {
                host: host.to_string(),
                what: "not changed",
                reason: format!(
                    "no enrolled attestation_key in {}: run `ringfence inventory enroll` first",
                    inventory.display()
                ),
            });
        };
        let signer =
            crate::wave::load_signer(&env.settings.signing.key, &env.settings.signing.key_id)
                .map_err(InputError::Key)?;
        let api = env
            .connector(&inv)
            .connect(h)
            .await
            .map_err(HostsCmdError::Unreachable)?;
        let clock = input::clock();
        let store = Arc::new(WaveStore::open(
            &env.settings.state_dir,
            BY_HAND,
            clock.as_ref(),
        )?);
        let params = Params {
            wave_id: wave_id.to_string(),
            profile: String::new(),
            version: String::new(),
            expect_driver_version: String::new(),
            expect_cuda_version: String::new(),
            task_lifetime_ms: 900_000,
            task_timeout_ms: 1_800_000,
            attestation_max_age_ms: 300_000,
            max_clock_skew_ms: env.skew_ms(),
            poll_interval: Duration::from_millis(200),
            rollback_on_failure: false,
            rollback_version: String::new(),
        };
        Ok(Self {
            ctx: Ctx {
                params: Arc::new(params),
                signer: Arc::new(signer),
                store,
                clock,
                halt: Arc::new(AtomicBool::new(false)),
            },
            job: HostJob {
                host_id: h.id.clone(),
                ring: h.ring,
                pool: h.pool.clone(),
                key,
                approvals: Arc::new(approvals),
                drill: false,
                expected_gpus: h.expected_gpus,
            },
            api,
        })
    }
}
