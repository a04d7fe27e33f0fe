//! `ringfence evidence verify`: prove an evidence packet against the trust
//! file and the inventory's enrolled keys, and print what it proves. What
//! is printed is escaped ([`crate::hosttext`]): host text a packet carries
//! cannot draw on the operator's terminal.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::input::{self, InputError};
use crate::evidence::{EvidenceError, VerifyWith};

/// `ringfence evidence`.
#[derive(Debug, Args)]
pub struct EvidenceArgs {
    #[command(subcommand)]
    pub(super) command: EvidenceCommand,
}

#[derive(Debug, Subcommand)]
pub(super) enum EvidenceCommand {
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

/// Why `evidence verify` failed.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceCmdError {
    /// An operator file is unusable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The packet file cannot be read.
    #[error("{}: {source}", path.display())]
    ReadPacket {
        /// The packet file.
        path: PathBuf,
        /// Why it cannot be read.
        source: std::io::Error,
    },
    /// The packet does not prove what it claims: the first finding.
    #[error("{}: INVALID [{}]: {}", path.display(), source.check(), crate::hosttext::escape(&source.to_string()))]
    Invalid {
        /// The packet file.
        path: PathBuf,
        /// The finding; its `check()` names the failed check.
        source: Box<EvidenceError>,
    },
}

/// Run an `evidence` command.
pub(super) fn run(config: Option<&Path>, cmd: EvidenceCommand) -> Result<(), EvidenceCmdError> {
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
                Some(input::settings(config)?)
            } else {
                None
            };
            let trust_path = match (trust, &settings) {
                (Some(t), _) => t,
                (None, Some(s)) => s.trust_file.clone(),
                (None, None) => return Err(InputError::NoTrustFile.into()),
            };
            let pinned = coordinator_key.or_else(|| settings.map(|s| s.signing.key_id));
            let trust = input::trust(&trust_path)?;
            let inv = input::inventory(&inventory)?;
            let bytes = match std::fs::read(&packet) {
                Ok(b) => b,
                Err(source) => {
                    return Err(EvidenceCmdError::ReadPacket {
                        path: packet,
                        source,
                    });
                }
            };
            let enrolled = inv.enrolled_keys();
            let with = VerifyWith {
                trust: &trust,
                enrolled: &enrolled,
                coordinator_key_id: pinned.as_deref(),
            };
            let v = match crate::evidence::verify_with(&bytes, &with) {
                Ok(v) => v,
                Err(source) => {
                    return Err(EvidenceCmdError::Invalid {
                        path: packet,
                        source: Box::new(source),
                    });
                }
            };
            // The chain after the packet's own signature: a packet that does
            // not verify is named for what is wrong with it, not for the chain.
            crate::evidence::verify_chain(&packet).map_err(|e| EvidenceCmdError::Invalid {
                path: packet.clone(),
                source: Box::new(e),
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let text = super::render::verified(&packet, &v);
                print!("{}", crate::hosttext::escape_lines(&text));
            }
            Ok(())
        }
    }
}
