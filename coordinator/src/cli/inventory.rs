//! `ringfence inventory check|enroll`: validate an inventory (and, with
//! `--live`, compare every agent's own ring with it), and enroll hosts'
//! attestation keys. Also [`agent_rings`], the ring check `wave resume`
//! runs before it starts.
//!
//! Enrollment takes nothing on an agent's word but the key it presents: the
//! fingerprint printed is the one computed from the key written, an agent
//! answering as another host is refused, and two hosts with one key (a
//! cloned image) are refused by `check` and `enroll`. Host text is printed
//! escaped ([`crate::hosttext`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use ringfence::config::ConfigError;
use ringfence::keys::KeyError;

use super::input::{self, Env, InputError};
use crate::hosttext;
use crate::inventory::{Inventory, RingFinding};
use crate::wave::{Connector, TlsConnector};

/// `ringfence inventory`.
#[derive(Debug, Args)]
pub struct InventoryArgs {
    #[command(subcommand)]
    pub(super) command: InventoryCommand,
}

#[derive(Debug, Subcommand)]
pub(super) enum InventoryCommand {
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

/// Why an `inventory` command failed.
#[derive(Debug, thiserror::Error)]
pub enum InventoryCmdError {
    /// An operator file is unusable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// `check --live`: agents configured in another ring than the inventory's (or none).
    #[error(
        "{}: the inventory's ring and the agent's own differ for {} host(s): {}; `wave run` refuses to start until they agree",
        file.display(), hosts.len(), hosts.join(", ")
    )]
    LiveRingMismatch {
        /// The inventory.
        file: PathBuf,
        /// Hosts whose agent disagrees.
        hosts: Vec<String>,
    },
    /// `enroll`: a host presents a key that is not a valid ed25519 key.
    #[error("{host}: {source}")]
    BadKey {
        /// Host id.
        host: String,
        /// Why the key is refused.
        source: KeyError,
    },
    /// `enroll`: the key could not be written into the inventory.
    #[error(transparent)]
    Write(ConfigError),
    /// `enroll`: hosts whose key changed, refused without `--rekey`.
    #[error("changed keys refused for: {}", .0.join(", "))]
    KeysRefused(Vec<String>),
    /// Hosts share one attestation key (a cloned image): any of them could
    /// sign for the others.
    #[error(
        "{}: hosts share one attestation key (a cloned image?): {}; give each host its own key (delete the agent's key file and restart it), then `ringfence inventory enroll --rekey HOST`",
        file.display(), groups.iter().map(|g| g.join(" = ")).collect::<Vec<_>>().join("; ")
    )]
    SharedKeys {
        /// The inventory.
        file: PathBuf,
        /// Groups of hosts with the same key.
        groups: Vec<Vec<String>>,
    },
    /// `enroll`: an agent answered GetIdentity as another host.
    #[error("identity refused for: {}", .0.join(", "))]
    WrongIdentity(Vec<String>),
    /// `enroll`: keys were enrolled, but agents disagree with the inventory's rings.
    #[error(
        "{}: the inventory's ring differs from the agent's own for: {} (keys were enrolled; fix the inventory or the agents' `ring` before `wave run`)",
        inventory.display(), hosts.join(", ")
    )]
    EnrolledRingMismatch {
        /// The inventory.
        inventory: PathBuf,
        /// Hosts whose agent disagrees.
        hosts: Vec<String>,
    },
}

/// Run an `inventory` command.
pub(super) async fn run(
    config: Option<&Path>,
    cmd: InventoryCommand,
) -> Result<(), InventoryCmdError> {
    match cmd {
        InventoryCommand::Check { file, live } => check(config, &file, live).await,
        InventoryCommand::Enroll { inventory, rekey } => enroll(config, &inventory, &rekey).await,
    }
}

/// Every host's ring as its agent reports it (GetIdentity, 64 hosts at
/// once), against the inventory; `Err` for a host that did not answer.
pub(super) async fn agent_rings(
    inv: &Inventory,
    conn: Arc<TlsConnector>,
) -> Vec<(String, Result<RingFinding, String>)> {
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
                Err(e) => Err(e.to_string()),
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

/// `inventory check [--live]`.
async fn check(config: Option<&Path>, file: &Path, live: bool) -> Result<(), InventoryCmdError> {
    let inv = input::inventory(file)?;
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
    for (p, n) in &s.per_pool {
        if let Some(w) = crate::preflight::reserve_warning(p, *n, inv.pools[p].reserve_percent) {
            println!("  warning: {w}");
        }
    }
    if !s.unenrolled.is_empty() {
        println!(
            "  not enrolled (run `ringfence inventory enroll`): {}",
            s.unenrolled.join(", ")
        );
    }
    let groups = inv.shared_keys();
    if !groups.is_empty() {
        return Err(InventoryCmdError::SharedKeys {
            file: file.to_path_buf(),
            groups,
        });
    }
    if !live {
        return Ok(());
    }
    let env = Env::load(config)?;
    let rings = agent_rings(&inv, Arc::new(env.connector(&inv))).await;
    let mut blocking = Vec::new();
    for (host, r) in &rings {
        match r {
            Ok(f) if f.blocks_wave() => {
                println!("  {host}: {f}");
                blocking.push(host.clone());
            }
            Ok(_) => {}
            Err(e) => println!(
                "  {host}: unreachable, ring not checked: {}",
                hosttext::message(e)
            ),
        }
    }
    if !blocking.is_empty() {
        return Err(InventoryCmdError::LiveRingMismatch {
            file: file.to_path_buf(),
            hosts: blocking,
        });
    }
    println!(
        "  live: every reachable agent is configured in its inventory ring ({} checked)",
        rings.iter().filter(|(_, r)| r.is_ok()).count()
    );
    Ok(())
}

/// `inventory enroll`.
async fn enroll(
    config: Option<&Path>,
    inventory: &Path,
    rekey: &[String],
) -> Result<(), InventoryCmdError> {
    let env = Env::load(config)?;
    let inv = input::inventory(inventory)?;
    let conn = env.connector(&inv);
    let mut refused = Vec::new();
    let mut mismatched = Vec::new();
    let mut impostors = Vec::new();
    // Every key enrolled (before and during this run), by host: a key a
    // second host presents is refused.
    let mut owners: BTreeMap<[u8; 32], Vec<String>> = BTreeMap::new();
    for h in &inv.hosts {
        if let Some(k) = h.attestation_key {
            owners.entry(k.to_bytes()).or_default().push(h.id.clone());
        }
    }
    for h in &inv.hosts {
        let api = match conn.connect(h).await {
            Ok(a) => a,
            Err(e) => {
                println!("{}: unreachable: {}", h.id, hosttext::message(&e));
                continue;
            }
        };
        let id = match api.identity().await {
            Ok(i) => i,
            Err(e) => {
                println!("{}: {}", h.id, hosttext::message(&e.to_string()));
                continue;
            }
        };
        if id.host_id != h.id {
            eprintln!(
                "{}: the agent answers as `{}`; not enrolled",
                h.id,
                hosttext::field(&id.host_id)
            );
            impostors.push(h.id.clone());
            continue;
        }
        match h.ring_finding(id.ring) {
            f @ RingFinding::Mismatch { .. } => {
                eprintln!("{}: {f}", h.id);
                mismatched.push(h.id.clone());
            }
            f @ RingFinding::NotConfigured { .. } => eprintln!("{}: {f}", h.id),
            RingFinding::Agrees(_) => {}
        }
        let Ok(bytes) = <[u8; 32]>::try_from(id.attestation_public_key.as_slice()) else {
            println!("{}: malformed attestation key", h.id);
            continue;
        };
        let key = ringfence::keys::public_key_from_bytes(&bytes).map_err(|source| {
            InventoryCmdError::BadKey {
                host: h.id.clone(),
                source,
            }
        })?;
        let text = ringfence::keys::public_key_text(&key);
        // The fingerprint of the key written, never the one the agent claims.
        let fingerprint = ringfence::keys::fingerprint(&key);
        if id.attestation_key_fingerprint != fingerprint {
            eprintln!(
                "{}: the agent claims fingerprint {} for a key whose fingerprint is {fingerprint}",
                h.id,
                hosttext::field(&id.attestation_key_fingerprint)
            );
        }
        let others: Vec<String> = owners
            .get(&key.to_bytes())
            .map(|hs| hs.iter().filter(|o| **o != h.id).cloned().collect())
            .unwrap_or_default();
        if !others.is_empty() {
            eprintln!(
                "{}: presents the attestation key {fingerprint} already enrolled for {} (a cloned image?); refused",
                h.id,
                others.join(", ")
            );
            refused.push(h.id.clone());
            continue;
        }
        match h.attestation_key {
            Some(k) if k == key => println!("{}: enrolled, unchanged ({fingerprint})", h.id),
            Some(k) if !rekey.contains(&h.id) => {
                eprintln!(
                    "{}: KEY CHANGED: enrolled {} but the host presents {fingerprint} — reinstall or impersonation; refused (accept with --rekey {})",
                    h.id,
                    ringfence::keys::fingerprint(&k),
                    h.id
                );
                refused.push(h.id.clone());
            }
            _ => {
                Inventory::set_attestation_key(inventory, &h.id, &text)
                    .map_err(InventoryCmdError::Write)?;
                owners.entry(key.to_bytes()).or_default().push(h.id.clone());
                println!("{}: enrolled {fingerprint}", h.id);
            }
        }
    }
    if !impostors.is_empty() {
        Err(InventoryCmdError::WrongIdentity(impostors))
    } else if !refused.is_empty() {
        Err(InventoryCmdError::KeysRefused(refused))
    } else if !mismatched.is_empty() {
        Err(InventoryCmdError::EnrolledRingMismatch {
            inventory: inventory.to_path_buf(),
            hosts: mismatched,
        })
    } else {
        Ok(())
    }
}
