//! `ringfence hosts health|identity`: ask agents about themselves over
//! mTLS — every host's verified health as a table (or JSON lines), or one
//! host's identity.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::input::{self, Env, InputError};
use crate::client::ClientError;
use crate::wave::Connector;

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
            let rows = crate::health_table::collect(&inv, conn, 64, env.skew_ms()).await;
            if json {
                for r in &rows {
                    println!("{}", serde_json::to_string(r).unwrap_or_default());
                }
            } else {
                print!("{}", crate::health_table::render(&rows));
            }
        }
    }
    Ok(())
}
