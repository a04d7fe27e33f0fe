//! `ringfence wave approve`: build a ring approval's scope from the
//! inventory and the wave spec, refuse when the coordinator's status
//! disagrees, print all of it, confirm, sign; or `--import` one signed
//! elsewhere into the wave's approvals.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use ringfence::pb;
use ringfence::trust::TrustSet;

use super::input::{self, InputError};
use crate::approvals::{self, ApprovalError};
use crate::settings::Settings;
use crate::wave;

/// `ringfence wave approve`.
#[derive(Debug, Args)]
pub struct ApproveArgs {
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

/// Why `wave approve` signed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ApproveError {
    /// An operator file is unusable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// `--key` is the coordinator's own signing key.
    #[error("this is the wave's coordinator key; a coordinator key can never approve")]
    CoordinatorKey,
    /// The key, the lifetime or the scope is not acceptable.
    #[error(transparent)]
    Refused(#[from] ApprovalError),
    /// `--import` names an approval of another wave.
    #[error("{} approves wave `{approves}`, not `{wave}`", file.display())]
    ImportOtherWave {
        /// The imported file.
        file: PathBuf,
        /// The wave it approves.
        approves: String,
        /// `--wave`.
        wave: String,
    },
    /// `--spec` is the spec of another wave.
    #[error("{} is the spec of wave `{spec_wave}`, not `{wave}`", spec.display())]
    SpecOtherWave {
        /// The spec file.
        spec: PathBuf,
        /// Its wave id.
        spec_wave: String,
        /// `--wave`.
        wave: String,
    },
    /// Without `--import`, the scope flags are all needed.
    #[error("--ring, --key, --inventory and --spec are required")]
    MissingScope,
    /// `--ttl` does not parse.
    #[error("--ttl `{0}`: expected seconds, or a number with s, m, h or d")]
    BadTtl(String),
    /// The coordinator's status shows another scope than inventory + spec.
    #[error(
        "not signed: the coordinator's view of wave {wave} ring {ring} ({}) differs from {} + {}:\n  {}",
        status.display(), inventory.display(), spec.display(), differences.join("\n  ")
    )]
    ScopeDiffers {
        /// Wave id.
        wave: String,
        /// Ring.
        ring: u32,
        /// The coordinator's status file.
        status: PathBuf,
        /// The inventory.
        inventory: PathBuf,
        /// The spec.
        spec: PathBuf,
        /// What differs, one line each.
        differences: Vec<String>,
    },
    /// The coordinator's status file does not parse.
    #[error("{}: {source}", path.display())]
    BadStatus {
        /// The status file.
        path: PathBuf,
        /// Why it does not parse.
        source: serde_json::Error,
    },
    /// Nobody can confirm: stdin is not a terminal and `--yes` is absent.
    #[error(
        "not signed: stdin is not a terminal, so nobody can confirm the scope above; pass --yes to sign it from a script"
    )]
    NotTerminal,
    /// The operator did not type `yes`.
    #[error("not signed: not confirmed")]
    NotConfirmed,
    /// The signed approval could not be written.
    #[error(transparent)]
    Write(ApprovalError),
    /// The ring needs no approval.
    #[error(
        "not signed: ring {ring} is not protected in wave {wave} (neither protected_rings of the spec nor of the trust policy); it needs no approval"
    )]
    NotProtected {
        /// Wave id.
        wave: String,
        /// Ring.
        ring: u32,
    },
    /// The wave was aborted: nothing of it runs again.
    #[error("not signed: wave {0} was aborted; approve a new wave instead")]
    WaveAborted(String),
    /// This key already approved this ring of this wave.
    #[error("not signed: {key_id} already approved wave {wave} ring {ring} ({}); approvals need distinct keys", path.display())]
    AlreadyApproved {
        /// Wave id.
        wave: String,
        /// Ring.
        ring: u32,
        /// The approver's key id.
        key_id: String,
        /// Its approval file.
        path: PathBuf,
    },
}

/// Run `wave approve`.
pub(super) fn run(config: Option<&Path>, a: ApproveArgs) -> Result<(), ApproveError> {
    let settings = input::settings(config)?;
    let trust = input::trust(&settings.trust_file)?;
    let dir = approvals::approvals_dir(&settings.state_dir, &a.wave);
    if let Some(file) = &a.import {
        return import(&a.wave, file, &dir);
    }
    let (Some(ring), Some(key), Some(inventory), Some(spec)) =
        (a.ring, &a.key, &a.inventory, &a.spec)
    else {
        return Err(ApproveError::MissingScope);
    };
    sign(&Scope {
        settings: &settings,
        trust: &trust,
        dir: &dir,
        ring,
        key,
        inventory,
        spec,
        args: &a,
    })
}

/// `--import FILE`: show what the approval covers (as signed) and copy it
/// into the wave's approvals.
fn import(wave: &str, file: &Path, dir: &Path) -> Result<(), ApproveError> {
    let (env, a) = input::signed_file::<pb::RingApproval>(file)?;
    if a.wave_id != wave {
        return Err(ApproveError::ImportOtherWave {
            file: file.to_path_buf(),
            approves: a.wave_id,
            wave: wave.to_string(),
        });
    }
    let name = format!("ring-{}-import-{}.json", a.ring, input::clock().now_ms());
    print!("{}", approvals::render(std::slice::from_ref(&a)));
    approvals::write_file(&dir.join(&name), &env).map_err(ApproveError::Write)?;
    println!(
        "imported approval for wave {wave} ring {} into {}",
        a.ring,
        dir.display()
    );
    Ok(())
}

/// Everything [`sign`] reads.
struct Scope<'a> {
    settings: &'a Settings,
    trust: &'a TrustSet,
    dir: &'a Path,
    ring: u32,
    key: &'a Path,
    inventory: &'a Path,
    spec: &'a Path,
    args: &'a ApproveArgs,
}

/// `90`, `90s`, `15m`, `12h`, `2d` as seconds.
fn parse_ttl(text: &str) -> Result<u64, ApproveError> {
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
        _ => Err(ApproveError::BadTtl(text.to_string())),
    }
}

/// Build the scope from inventory + spec, refuse when the coordinator's
/// status disagrees, print all of it, confirm, sign.
fn sign(s: &Scope<'_>) -> Result<(), ApproveError> {
    use std::io::{BufRead, IsTerminal, Write};
    let a = s.args;
    let signing = ringfence::keys::read_signing_key(s.key).map_err(InputError::from)?;
    let own = wave::load_signer(&s.settings.signing.key, &s.settings.signing.key_id).ok();
    if own.is_some_and(|o| o.key.verifying_key() == signing.verifying_key()) {
        return Err(ApproveError::CoordinatorKey);
    }
    let key_id = approvals::check_signing_key(s.trust, &signing)?;
    let inv = input::inventory(s.inventory)?;
    let (spec, _) = input::spec(s.spec)?;
    if spec.wave_id != a.wave {
        return Err(ApproveError::SpecOtherWave {
            spec: s.spec.to_path_buf(),
            spec_wave: spec.wave_id,
            wave: a.wave.clone(),
        });
    }
    // The lifetime: the spec's approval_ttl_s, or a shorter --ttl.
    let ttl_s = match &a.ttl {
        Some(t) => parse_ttl(t)?,
        None => spec.approval_ttl_s,
    };
    // The cap: the spec's approval_ttl_s, and the agents' policy.
    let policy_cap = s.trust.policy.max_approval_lifetime_s;
    let (cap, why) = if policy_cap < spec.approval_ttl_s {
        (
            policy_cap,
            format!(
                "the cap is max_approval_lifetime_s of {}",
                s.settings.trust_file.display()
            ),
        )
    } else {
        (
            spec.approval_ttl_s,
            format!("the cap is approval_ttl_s of {}", s.spec.display()),
        )
    };
    approvals::check_ttl(ttl_s, cap, &why)?;
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
        ring: s.ring,
        profile: spec.profile.clone(),
        version: spec.version.clone(),
        rollback_version: spec.rollback_version.clone(),
        hosts: inv
            .hosts
            .iter()
            .filter(|h| h.ring == s.ring)
            .map(|h| h.id.clone())
            .collect(),
        actions,
        issued_at_ms: input::clock().now_ms(),
        ttl_s,
        approver: key_id.clone(),
    };
    check_coordinator_view(s, &req)?;
    if !spec.protected_rings.contains(&s.ring) && !s.trust.policy.protected_rings.contains(&s.ring)
    {
        return Err(ApproveError::NotProtected {
            wave: a.wave.clone(),
            ring: s.ring,
        });
    }
    let own = s.dir.join(format!("ring-{}-{key_id}.json", s.ring));
    if a.out.is_none() && own.exists() {
        return Err(ApproveError::AlreadyApproved {
            wave: a.wave.clone(),
            ring: s.ring,
            key_id,
            path: own,
        });
    }
    let threshold = spec
        .approver_threshold
        .max(s.trust.policy.approver_threshold);
    let limit = approvals::part_limit(threshold)?;
    let parts = approvals::build(&req, limit)?;
    print!("{}", approvals::render(&parts));
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            return Err(ApproveError::NotTerminal);
        }
        print!("sign this approval as {key_id}? type `yes` to sign: ");
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if answer.trim() != "yes" {
            return Err(ApproveError::NotConfirmed);
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
            None => s.dir.join(format!("ring-{}-{key_id}{suffix}.json", s.ring)),
        };
        approvals::write_file(&path, &env).map_err(ApproveError::Write)?;
        println!("signed: {}", path.display());
    }
    println!(
        "approved wave {} ring {} ({} hosts, {} {}) as {key_id}",
        a.wave,
        s.ring,
        req.hosts.len(),
        spec.profile,
        spec.version
    );
    if a.out.is_none() {
        let scope = approvals::RingScope {
            wave_id: &spec.wave_id,
            ring: s.ring,
            profile: &spec.profile,
            version: &spec.version,
            hosts: &req.hosts,
        };
        let got = approvals::collect_ring(s.dir, s.trust, &scope, input::clock().now_ms());
        println!(
            "approval {} of {threshold} for ring {} ({})",
            got.approvers.len(),
            s.ring,
            got.approvers.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// The coordinator's own view, when the wave has started, must be what the
/// approver is shown.
fn check_coordinator_view(s: &Scope<'_>, req: &approvals::Request) -> Result<(), ApproveError> {
    let status_path = crate::store::WavePaths::new(&s.settings.state_dir, &s.args.wave).status;
    let Ok(text) = std::fs::read_to_string(&status_path) else {
        return Ok(());
    };
    let snapshot: wave::StatusSnapshot =
        serde_json::from_str(&text).map_err(|source| ApproveError::BadStatus {
            path: status_path.clone(),
            source,
        })?;
    if snapshot.phase == "aborted" {
        return Err(ApproveError::WaveAborted(s.args.wave.clone()));
    }
    let differences = approvals::scope_differences(
        req,
        snapshot.ring_hosts.get(&s.ring).map(Vec::as_slice),
        &snapshot.profile,
        &snapshot.version,
        &snapshot.rollback_version,
    );
    if differences.is_empty() {
        return Ok(());
    }
    Err(ApproveError::ScopeDiffers {
        wave: s.args.wave.clone(),
        ring: s.ring,
        status: status_path,
        inventory: s.inventory.to_path_buf(),
        spec: s.spec.to_path_buf(),
        differences,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn ttl_takes_seconds_or_a_unit_and_refuses_anything_else() {
        assert_eq!(parse_ttl("3600").unwrap(), 3600);
        assert_eq!(parse_ttl(" 90s ").unwrap(), 90);
        assert_eq!(parse_ttl("90m").unwrap(), 5400);
        assert_eq!(parse_ttl("12h").unwrap(), 43_200);
        assert_eq!(parse_ttl("1d").unwrap(), 86_400);
        assert_eq!(parse_ttl("99999999999999999999d").ok(), None);
        for bad in ["", "h", "12w", "1.5h", "-1", "12 h x"] {
            assert!(
                matches!(parse_ttl(bad), Err(ApproveError::BadTtl(t)) if t == bad),
                "{bad:?}"
            );
        }
    }
}
