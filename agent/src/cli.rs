//! The `ringfenced` command line as clap types: `main.rs` parses and runs
//! them; `integration/docgen` renders man pages and shell completions from
//! [`command`].

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

/// Environment variable naming the config file (as `--config` does).
pub const CONFIG_ENV: &str = "RINGFENCED_CONFIG";

/// ringfenced — the ringfence GPU host agent.
///
/// Exit status: 0 ok; 1 `health --once` found the host not HEALTHY; 2 usage
/// error; 3 config or input error; 4 runtime failure; 75 `run` stopped
/// after a self-upgrade so that systemd starts the new agent.
#[derive(Debug, Parser)]
#[command(name = "ringfenced", version, about)]
pub struct Cli {
    /// Agent config file [default: /etc/ringfence/agent.toml].
    #[arg(long, short, global = true, env = CONFIG_ENV)]
    pub config: Option<PathBuf>,
    /// The command to run (none given: `run`).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The agent's commands (none given: `run`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (the default).
    Run,
    /// Collect health once and print it (for an operator on the host);
    /// exit 0 only when HEALTHY.
    Health {
        /// Collect once and exit (the only mode).
        #[arg(long)]
        once: bool,
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the host id and the attestation public key with its fingerprint
    /// (creates the key on first use).
    Identity,
    /// Check what `run` loads before it serves (config, trust file, TLS
    /// material, state directory, attestation key, scenario file), then
    /// exit; changes nothing.
    CheckConfig,
}

/// The whole command tree as a [`clap::Command`], for man pages and shell
/// completions.
pub fn command() -> clap::Command {
    Cli::command()
}
