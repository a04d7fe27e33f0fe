//! `ringfence pki …` and `ringfence keys new`: argument structs and their
//! execution. [`run_pki`] / [`run_keys`] return the text to print; their
//! errors ([`PkiCliError`]) exit 3.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use ringfence::keys::{self, KeyError};
use ringfence::pki::{self, PkiError};
use ringfence::spiffe::Role;

/// `ringfence pki`: a small fleet CA for development and small fleets.
#[derive(Debug, Args)]
pub struct PkiArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: PkiCommand,
}

/// The `pki` subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA (ca.pem, ca.key 0600, trust-domain) in DIR; never overwrites.
    Init {
        /// CA directory (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain, e.g. gpu.example.com.
        #[arg(long)]
        trust_domain: String,
    },
    /// Issue a certificate and key: <role>-<name>.pem / .key (0600).
    Issue {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// host (an agent), ops (operator / coordinator) or scheduler (reads health).
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Host id or principal name.
        #[arg(long)]
        name: String,
        /// Output directory (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Revoke a certificate issued by this CA and rewrite crl.pem.
    Revoke {
        /// CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The certificate PEM to revoke.
        #[arg(long)]
        cert: PathBuf,
        /// Days until the CRL's nextUpdate (agents refuse an expired CRL).
        #[arg(long, default_value_t = 30)]
        crl_days: u64,
    },
}

/// Roles as a CLI value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    /// A GPU host running ringfenced.
    Host,
    /// An operator or the coordinator.
    Ops,
    /// A scheduler.
    Scheduler,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Host => Role::Host,
            RoleArg::Ops => Role::Ops,
            RoleArg::Scheduler => Role::Scheduler,
        }
    }
}

/// `ringfence keys`: ed25519 signing keys for coordinators and approvers.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// The `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an ed25519 key (PKCS#8 PEM, 0600); print its public key and fingerprint.
    New {
        /// Where to write the private key; never overwrites.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Errors of `pki` and `keys` commands.
#[derive(Debug, thiserror::Error)]
pub enum PkiCliError {
    /// The PKI operation failed (message from [`PkiError`]).
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The key operation failed (message from [`KeyError`]).
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Run a `pki` command; returns what to print on stdout.
pub fn run_pki(cmd: &PkiCommand) -> Result<String, PkiCliError> {
    match cmd {
        PkiCommand::Init { dir, trust_domain } => {
            let files = pki::init(dir, trust_domain)?;
            Ok(format!(
                "created CA for trust domain {trust_domain}\n  certificate: {}\n  key:         {} (0600, keep it offline)\n",
                files.cert.display(),
                files.key.display()
            ))
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            out,
            days,
        } => {
            let out = out.as_deref().unwrap_or(dir);
            let issued = pki::issue(dir, (*role).into(), name, out, *days)?;
            Ok(format!(
                "issued {} (serial {}, valid {days} days)\n  certificate: {}\n  key:         {} (0600)\n",
                issued.id,
                issued.serial,
                issued.cert.display(),
                issued.key.display()
            ))
        }
        PkiCommand::Revoke {
            dir,
            cert,
            crl_days,
        } => {
            let r = pki::revoke(dir, cert, *crl_days)?;
            Ok(format!(
                "revoked serial {} ({} revoked in total)\n  CRL: {} (next update in {crl_days} days; copy it to the agents and send SIGHUP)\n",
                r.serial,
                r.count,
                r.crl.display()
            ))
        }
    }
}

/// Run a `keys` command; returns what to print on stdout.
pub fn run_keys(cmd: &KeysCommand) -> Result<String, PkiCliError> {
    match cmd {
        KeysCommand::New { out } => {
            let key = keys::generate();
            keys::write_signing_key(out, &key)?;
            let public = key.verifying_key();
            Ok(format!(
                "wrote {} (0600)\npublic key:  {}\nfingerprint: {}\n",
                out.display(),
                keys::public_key_text(&public),
                keys::fingerprint(&public)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    enum Cli {
        Pki(PkiArgs),
        Keys(KeysArgs),
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ringfence").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn pki_and_keys_commands_run_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let ca_s = ca.to_str().unwrap();
        let Cli::Pki(init) = parse(&["pki", "init", "--dir", ca_s, "--trust-domain", "fleet.test"])
        else {
            panic!("parsed as keys")
        };
        assert!(run_pki(&init.command).unwrap().contains("fleet.test"));
        let again = run_pki(&init.command).unwrap_err().to_string();
        assert!(again.contains("already exists"), "{again}");

        let Cli::Pki(issue) = parse(&[
            "pki", "issue", "--dir", ca_s, "--role", "host", "--name", "gpu-7", "--days", "10",
        ]) else {
            panic!("parsed as keys")
        };
        let text = run_pki(&issue.command).unwrap();
        assert!(text.contains("spiffe://fleet.test/host/gpu-7"), "{text}");
        let cert = ca.join("host-gpu-7.pem");
        assert!(cert.exists());

        let Cli::Pki(revoke) = parse(&[
            "pki",
            "revoke",
            "--dir",
            ca_s,
            "--cert",
            cert.to_str().unwrap(),
        ]) else {
            panic!("parsed as keys")
        };
        assert!(run_pki(&revoke.command).unwrap().contains("1 revoked"));
        assert!(ca.join("crl.pem").exists());

        assert!(
            Cli::try_parse_from([
                "ringfence",
                "pki",
                "issue",
                "--dir",
                ca_s,
                "--role",
                "admin",
                "--name",
                "x"
            ])
            .is_err()
        );

        let key = dir.path().join("coordinator.key");
        let Cli::Keys(new) = parse(&["keys", "new", "--out", key.to_str().unwrap()]) else {
            panic!("parsed as pki")
        };
        let text = run_keys(&new.command).unwrap();
        let loaded = ringfence::keys::read_signing_key(&key).unwrap();
        assert!(
            text.contains(&ringfence::keys::public_key_text(&loaded.verifying_key())),
            "{text}"
        );
        assert!(
            text.contains(&ringfence::keys::fingerprint(&loaded.verifying_key())),
            "{text}"
        );
        assert!(run_keys(&new.command).is_err(), "must not overwrite a key");
    }
}
