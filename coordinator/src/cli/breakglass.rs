//! `ringfence breakglass sign`: sign, or countersign with `--add-to`, a
//! break-glass approval that raises one pool's out-of-service limit for
//! one wave.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ringfence::pb;

use super::input::{self, InputError};
use crate::approvals::{self, ApprovalError};
use crate::plan::PlanError;

/// `ringfence breakglass`.
#[derive(Debug, Args)]
pub struct BreakglassArgs {
    #[command(subcommand)]
    pub(super) command: BreakglassCommand,
}

#[derive(Debug, Subcommand)]
pub(super) enum BreakglassCommand {
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

/// Why `breakglass sign` failed.
#[derive(Debug, thiserror::Error)]
pub enum BreakglassError {
    /// An operator file is unusable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The inventory has no such pool, or fewer hosts than `--max-out`.
    #[error(transparent)]
    Refused(#[from] PlanError),
    /// The signed file could not be written.
    #[error(transparent)]
    Write(ApprovalError),
}

/// Run a `breakglass` command.
pub(super) fn run(cmd: BreakglassCommand) -> Result<(), BreakglassError> {
    let BreakglassCommand::Sign {
        wave,
        pool,
        max_out,
        reason,
        key,
        out,
        add_to,
        ttl_h,
        inventory,
    } = cmd;
    if let Some(inv) = &inventory {
        let inv = input::inventory(inv)?;
        let (pool, max_out) = if add_to {
            // Check what is countersigned, not the flags.
            let (_, bg) = input::signed_file::<pb::BreakGlass>(&out)?;
            (bg.pool, bg.max_out)
        } else {
            (pool.clone(), max_out)
        };
        crate::plan::check_break_glass(&inv, &pool, max_out)?;
    }
    let signing = ringfence::keys::read_signing_key(&key).map_err(InputError::from)?;
    let key_id = ringfence::keys::fingerprint(&signing.verifying_key());
    if add_to {
        let mut env = approvals::read_file(&out).map_err(InputError::from)?;
        ringfence::envelope::add_signature(&mut env, &key_id, &signing);
        approvals::write_file(&out, &env).map_err(BreakglassError::Write)?;
        println!("countersigned {}", out.display());
        return Ok(());
    }
    let now = input::clock().now_ms();
    let bg = pb::BreakGlass {
        wave_id: wave,
        pool,
        max_out,
        reason,
        issued_at_unix_ms: now,
        expires_at_unix_ms: now
            .saturating_add(i64::try_from(ttl_h).unwrap_or(12).saturating_mul(3_600_000)),
        approver: key_id.clone(),
    };
    approvals::write_file(&out, &approvals::sign_breakglass(&bg, &key_id, &signing))
        .map_err(BreakglassError::Write)?;
    println!(
        "signed break-glass {}; a second approver countersigns with --add-to",
        out.display()
    );
    Ok(())
}
