//! The `ringfence` command line: the top-level [`Cli`], one module per
//! command group (argument structs beside their handlers), the operator's
//! files (`input`), text rendering (`render`) and the one map from an
//! error to an exit code (`error`). `main.rs` parses, calls [`run`] and
//! exits with [`CliError::exit_code`].
//!
//! Imports run one way: `mod.rs` → `error` → the command groups (`wave`
//! also uses `approve` and `inventory`) → `input`/`render` → the library
//! (`wave`, `store`, `approvals`, …). Each group returns its own error
//! enum (which wraps [`InputError`]); `error` wraps them all in
//! [`CliError`] and maps each to its exit code.

mod approve;
mod breakglass;
mod error;
mod evidence;
pub mod health_table;
mod hosts;
mod input;
mod inventory;
mod lab;
mod pki;
mod render;
pub mod report;
mod wave;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

pub use approve::ApproveError;
pub use breakglass::BreakglassError;
pub use error::{CliError, Exit};
pub use evidence::EvidenceCmdError;
pub use hosts::HostsCmdError;
pub use input::InputError;
pub use inventory::InventoryCmdError;
pub use lab::{LAB_NEW_VERSION, LAB_OLD_VERSION, LabError};
pub use pki::PkiCliError;
pub use wave::{WaveCmdError, driver};

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
    Pki(pki::PkiArgs),
    /// ed25519 keys for coordinators and approvers.
    Keys(pki::KeysArgs),
    /// Check or enroll an inventory.
    Inventory(inventory::InventoryArgs),
    /// Ask hosts about their health.
    Hosts(hosts::HostsArgs),
    /// Plan, run and steer patch waves.
    Wave(wave::WaveArgs),
    /// Break-glass approvals that raise a pool's out-of-service limit.
    Breakglass(breakglass::BreakglassArgs),
    /// Check evidence packets.
    Evidence(evidence::EvidenceArgs),
    /// A loopback fleet's files, to learn on (`lab init`).
    Lab(lab::LabArgs),
}

/// The whole command tree as a [`clap::Command`], for man pages and shell
/// completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Run a parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Pki(a) => print!("{}", pki::run_pki(&a.command)?),
        Command::Keys(a) => print!("{}", pki::run_keys(&a.command)?),
        Command::Inventory(a) => inventory::run(config, a.command).await?,
        Command::Hosts(a) => hosts::run(config, a.command).await?,
        Command::Wave(a) => wave::run(config, a.command).await?,
        Command::Breakglass(a) => breakglass::run(a.command)?,
        Command::Evidence(a) => evidence::run(config, a.command)?,
        Command::Lab(a) => lab::run(&a.command)?,
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_command_tree_is_consistent_and_has_every_group() {
        let cmd = command();
        cmd.clone().debug_assert();
        let groups: Vec<&str> = cmd.get_subcommands().map(|c| c.get_name()).collect();
        assert_eq!(
            groups,
            [
                "pki",
                "keys",
                "inventory",
                "hosts",
                "wave",
                "breakglass",
                "evidence",
                "lab"
            ]
        );
        let wave = cmd.find_subcommand("wave").unwrap();
        let wave_cmds: Vec<&str> = wave.get_subcommands().map(|c| c.get_name()).collect();
        assert_eq!(
            wave_cmds,
            [
                "plan", "run", "resume", "status", "list", "halt", "abort", "rollback", "approve"
            ]
        );
    }
}
