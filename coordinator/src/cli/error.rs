//! Every way a `ringfence` command fails ([`CliError`], wrapping each
//! command group's error enum) and the one place that decides its exit
//! code ([`CliError::exit_code`]). The codes are documented in README's
//! "`ringfence` commands" section; a test keeps the two in step.

use std::process::ExitCode;

use super::approve::ApproveError;
use super::breakglass::BreakglassError;
use super::evidence::EvidenceCmdError;
use super::hosts::HostsCmdError;
use super::input::InputError;
use super::inventory::InventoryCmdError;
use super::lab::LabError;
use super::pki::PkiCliError;
use super::wave::WaveCmdError;
use crate::wave::WaveError;

/// How `ringfence` exits when a command does not succeed (0 is success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// The command ran and failed: an agent unreachable or refusing, a store
    /// or file write failing, an evidence packet invalid, a changed host key
    /// refused, a rollback that did not validate, an approval not confirmed.
    Failed = 1,
    /// Bad usage: clap's own errors, `--ttl` that does not parse, `wave
    /// approve` without `--yes` when stdin is not a terminal.
    Usage = 2,
    /// A config or input the operator must fix: a settings, trust,
    /// inventory, spec, key or approval file, a wave that does not exist or
    /// already has state, a plan that cannot fit, an agent whose ring
    /// differs from the inventory's, an approval scope that differs from
    /// the coordinator's status.
    Config = 3,
    /// The wave halted: a host failed and is left drained (or regressed in
    /// soak); decide with `wave resume` or `wave abort`.
    Halted = 4,
}

impl Exit {
    /// Every exit code other than 0, in order.
    pub const ALL: [Exit; 4] = [Exit::Failed, Exit::Usage, Exit::Config, Exit::Halted];

    /// The process exit status.
    pub const fn code(self) -> u8 {
        self as u8
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}

/// A `ringfence` command failed; [`CliError::exit_code`] says how.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// An operator file is unusable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// `pki …` / `keys new`.
    #[error(transparent)]
    Pki(#[from] PkiCliError),
    /// `inventory …`.
    #[error(transparent)]
    Inventory(#[from] InventoryCmdError),
    /// `hosts …`.
    #[error(transparent)]
    Hosts(#[from] HostsCmdError),
    /// `wave …` (a halted wave included).
    #[error(transparent)]
    Wave(#[from] WaveCmdError),
    /// `breakglass sign`.
    #[error(transparent)]
    Breakglass(#[from] BreakglassError),
    /// `evidence verify`.
    #[error(transparent)]
    Evidence(#[from] EvidenceCmdError),
    /// `lab init`.
    #[error(transparent)]
    Lab(#[from] LabError),
}

impl CliError {
    /// The exit code for this error: the one map from every failure to
    /// [`Exit`]. Every match is exhaustive, so a new error variant cannot
    /// compile before it is given its code here.
    pub fn exit_code(&self) -> Exit {
        use Exit::{Config, Failed, Halted};
        match self {
            CliError::Runtime(_) => Failed,
            CliError::Input(e) => input(e),
            CliError::Pki(PkiCliError::Pki(_) | PkiCliError::Key(_)) => Config,
            CliError::Lab(e) => match e {
                LabError::NotEmpty(_) | LabError::Ports { .. } => Config,
                LabError::Io { .. } | LabError::Pki(_) | LabError::Key(_) => Failed,
            },
            CliError::Inventory(e) => match e {
                InventoryCmdError::Input(e) => input(e),
                InventoryCmdError::LiveRingMismatch { .. }
                | InventoryCmdError::BadKey { .. }
                | InventoryCmdError::Write(_)
                | InventoryCmdError::EnrolledRingMismatch { .. } => Config,
                InventoryCmdError::SharedKeys { .. } => Config,
                InventoryCmdError::KeysRefused(_) | InventoryCmdError::WrongIdentity(_) => Failed,
            },
            CliError::Hosts(e) => match e {
                HostsCmdError::Input(e) => input(e),
                HostsCmdError::NoHost { .. } => Config,
                HostsCmdError::Unreachable(_)
                | HostsCmdError::Agent(_)
                | HostsCmdError::Store(_)
                | HostsCmdError::Refused { .. }
                | HostsCmdError::NotHealthy { .. }
                | HostsCmdError::NoApprovals { .. } => Failed,
            },
            CliError::Wave(e) => match e {
                WaveCmdError::Input(e) => input(e),
                WaveCmdError::Approve(e) => approve(e),
                WaveCmdError::Engine(e) => engine(e),
                WaveCmdError::Halted(_) => Halted,
                WaveCmdError::Plan(_)
                | WaveCmdError::OpenStore(_)
                | WaveCmdError::NoState { .. }
                | WaveCmdError::SkipWithoutReason
                | WaveCmdError::BreakGlass { .. }
                | WaveCmdError::BreakGlassScope { .. }
                | WaveCmdError::Preflight(_)
                | WaveCmdError::Finished { .. }
                | WaveCmdError::AbortWhileRunning { .. }
                | WaveCmdError::Refused(_)
                | WaveCmdError::NoStatus { .. }
                | WaveCmdError::Metrics(_) => Config,
                WaveCmdError::Store(_)
                | WaveCmdError::RollbackFailed { .. }
                | WaveCmdError::BadStatus { .. } => Failed,
            },
            CliError::Breakglass(e) => match e {
                BreakglassError::Input(e) => input(e),
                BreakglassError::Refused(_) => Config,
                BreakglassError::Write(_) => Failed,
            },
            CliError::Evidence(e) => match e {
                EvidenceCmdError::Input(e) => input(e),
                EvidenceCmdError::ReadPacket { .. } => Config,
                EvidenceCmdError::Invalid { .. } => Failed,
            },
        }
    }
}

/// An unusable operator file is always for the operator to fix.
fn input(e: &InputError) -> Exit {
    match e {
        InputError::Settings(_)
        | InputError::Trust(_)
        | InputError::Identity(_)
        | InputError::Inventory(_)
        | InputError::Spec(_)
        | InputError::Key(_)
        | InputError::Approval(_)
        | InputError::Decode { .. }
        | InputError::NoTrustFile => Exit::Config,
    }
}

fn approve(e: &ApproveError) -> Exit {
    match e {
        ApproveError::Input(e) => input(e),
        ApproveError::CoordinatorKey
        | ApproveError::Refused(_)
        | ApproveError::ImportOtherWave { .. }
        | ApproveError::SpecOtherWave { .. }
        | ApproveError::MissingScope
        | ApproveError::NotProtected { .. }
        | ApproveError::WaveAborted(_)
        | ApproveError::AlreadyApproved { .. }
        | ApproveError::ScopeDiffers { .. } => Exit::Config,
        ApproveError::BadTtl(_) | ApproveError::NotTerminal => Exit::Usage,
        ApproveError::BadStatus { .. } | ApproveError::NotConfirmed | ApproveError::Write(_) => {
            Exit::Failed
        }
    }
}

/// The wave engine: what the operator must decide or fix is a config
/// error; a store, agent or host-run failure is a failure.
fn engine(e: &WaveError) -> Exit {
    match e {
        WaveError::Plan(_)
        | WaveError::Exists(_)
        | WaveError::RingMismatch { .. }
        | WaveError::NeedsDecision { .. }
        | WaveError::BadDecision(_)
        | WaveError::NoState(_)
        | WaveError::Aborted(_)
        | WaveError::BreakGlass { .. }
        | WaveError::NotInWave { .. }
        | WaveError::HostInFlight { .. }
        | WaveError::Preflight(_)
        | WaveError::Job(_) => Exit::Config,
        WaveError::Store(_)
        | WaveError::HostRun(_)
        | WaveError::Evidence(_)
        | WaveError::Unreachable(_) => Exit::Failed,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::PathBuf;

    use ringfence::config::ConfigError;
    use ringfence::keys::KeyError;

    use super::*;
    use crate::approvals::ApprovalError;
    use crate::client::ClientError;
    use crate::evidence::EvidenceError;
    use crate::plan::PlanError;
    use crate::store::StoreError;
    use crate::wave::{FailureKind, HaltReport, JobError, Stage, TaskStep};

    fn path() -> PathBuf {
        PathBuf::from("/etc/ringfence/x.toml")
    }
    fn io() -> std::io::Error {
        std::io::Error::other("boom")
    }
    fn config() -> ConfigError {
        ConfigError::Read {
            path: path(),
            source: io(),
        }
    }
    fn store() -> StoreError {
        StoreError::NoSuchWave {
            wave: "w".into(),
            dir: path(),
        }
    }
    fn approval() -> ApprovalError {
        ApprovalError::Malformed("x".into())
    }
    fn key() -> KeyError {
        KeyError::Io {
            path: path(),
            source: io(),
        }
    }
    fn json() -> serde_json::Error {
        serde_json::from_str::<u8>("x").unwrap_err()
    }
    fn halt() -> HaltReport {
        HaltReport {
            wave_id: "w-1".into(),
            ring: 2,
            host: Some("gpu-7".into()),
            step: Stage::Task(TaskStep::Validate),
            kind: FailureKind::Attestation,
            reason: "uncorrected ECC".into(),
        }
    }

    /// One of every error, with the exit code it must have.
    fn table() -> Vec<(CliError, Exit)> {
        use Exit::{Config, Failed, Halted, Usage};
        let decode =
            <ringfence::pb::RingApproval as prost::Message>::decode(&[0xff_u8][..]).unwrap_err();
        let inputs: Vec<InputError> = vec![
            InputError::Settings(config()),
            InputError::Trust(ringfence::trust::TrustError::Config(config())),
            InputError::Identity(ringfence::tls::TlsError::Read {
                what: "certificate",
                path: path(),
                source: io(),
            }),
            InputError::Inventory(config()),
            InputError::Spec(config()),
            InputError::Key(key()),
            InputError::Approval(approval()),
            InputError::Decode {
                path: path(),
                source: decode,
            },
            InputError::NoTrustFile,
        ];
        let mut t: Vec<(CliError, Exit)> = Vec::new();
        for i in inputs {
            t.push((CliError::Input(i), Config));
        }
        let wrapped: [fn(InputError) -> CliError; 6] = [
            |e| InventoryCmdError::Input(e).into(),
            |e| HostsCmdError::Input(e).into(),
            |e| WaveCmdError::Input(e).into(),
            |e| WaveCmdError::from(ApproveError::Input(e)).into(),
            |e| BreakglassError::Input(e).into(),
            |e| EvidenceCmdError::Input(e).into(),
        ];
        for w in wrapped {
            t.push((w(InputError::NoTrustFile), Config));
        }
        let pki = ringfence::pki::PkiError::Exists { path: path() };
        t.push((PkiCliError::Pki(pki).into(), Config));
        t.push((PkiCliError::Key(key()).into(), Config));
        let hosts = vec!["gpu-1".to_string()];
        for (e, code) in [
            (
                InventoryCmdError::LiveRingMismatch {
                    file: path(),
                    hosts: hosts.clone(),
                },
                Config,
            ),
            (
                InventoryCmdError::BadKey {
                    host: "gpu-1".into(),
                    source: key(),
                },
                Config,
            ),
            (InventoryCmdError::Write(config()), Config),
            (InventoryCmdError::KeysRefused(hosts.clone()), Failed),
            (
                InventoryCmdError::EnrolledRingMismatch {
                    inventory: path(),
                    hosts: hosts.clone(),
                },
                Config,
            ),
        ] {
            t.push((e.into(), code));
        }
        let unreachable = ClientError::Unreachable {
            host: "gpu-1".into(),
            reason: "refused".into(),
        };
        for (e, code) in [
            (
                HostsCmdError::NoHost {
                    host: "gpu-9".into(),
                    inventory: path(),
                },
                Config,
            ),
            (HostsCmdError::Unreachable("refused".into()), Failed),
            (HostsCmdError::Agent(unreachable), Failed),
        ] {
            t.push((e.into(), code));
        }
        let engine = [
            (WaveError::Plan(PlanError::Empty), Config),
            (WaveError::Exists("w".into()), Config),
            (
                WaveError::RingMismatch {
                    wave: "w".into(),
                    inventory: path(),
                    hosts: hosts.clone(),
                },
                Config,
            ),
            (
                WaveError::NeedsDecision {
                    wave: "w".into(),
                    hosts: "gpu-1".into(),
                },
                Config,
            ),
            (WaveError::BadDecision("gpu-1".into()), Config),
            (WaveError::NoState("w".into()), Config),
            (WaveError::Aborted("w".into()), Config),
            (
                WaveError::BreakGlass {
                    path: path(),
                    reason: "expired".into(),
                },
                Config,
            ),
            (
                WaveError::NotInWave {
                    wave: "w".into(),
                    host: "gpu-1".into(),
                },
                Config,
            ),
            (
                WaveError::HostInFlight {
                    wave: "w".into(),
                    host: "gpu-1".into(),
                    phase: "Patching".into(),
                },
                Config,
            ),
            (
                WaveError::Job(JobError::NotEnrolled {
                    host: "gpu-1".into(),
                    inventory: path(),
                }),
                Config,
            ),
            (WaveError::Store(store()), Failed),
            (
                WaveError::Evidence(EvidenceError::Malformed("x".into())),
                Failed,
            ),
            (WaveError::Unreachable("gpu-1: refused".into()), Failed),
        ];
        for (e, code) in engine {
            t.push((WaveCmdError::Engine(e).into(), code));
        }
        for (e, code) in [
            (WaveCmdError::Halted(Box::new(halt())), Halted),
            (WaveCmdError::Plan(PlanError::Empty), Config),
            (WaveCmdError::OpenStore(store()), Config),
            (WaveCmdError::Store(store()), Failed),
            (
                WaveCmdError::NoState {
                    wave: "w".into(),
                    dir: path(),
                },
                Config,
            ),
            (WaveCmdError::SkipWithoutReason, Config),
            (
                WaveCmdError::BreakGlass {
                    path: path(),
                    source: approval(),
                },
                Config,
            ),
            (
                WaveCmdError::BreakGlassScope {
                    path: path(),
                    source: PlanError::Empty,
                },
                Config,
            ),
            (
                WaveCmdError::RollbackFailed {
                    host: "gpu-1".into(),
                    reason: "UNHEALTHY".into(),
                },
                Failed,
            ),
            (
                WaveCmdError::NoStatus {
                    path: path(),
                    source: io(),
                },
                Config,
            ),
            (
                WaveCmdError::BadStatus {
                    path: path(),
                    source: json(),
                },
                Failed,
            ),
        ] {
            t.push((e.into(), code));
        }
        for (e, code) in [
            (ApproveError::CoordinatorKey, Config),
            (ApproveError::Refused(approval()), Config),
            (
                ApproveError::ImportOtherWave {
                    file: path(),
                    approves: "w-2".into(),
                    wave: "w".into(),
                },
                Config,
            ),
            (
                ApproveError::SpecOtherWave {
                    spec: path(),
                    spec_wave: "w-2".into(),
                    wave: "w".into(),
                },
                Config,
            ),
            (ApproveError::MissingScope, Config),
            (ApproveError::BadTtl("12w".into()), Usage),
            (
                ApproveError::ScopeDiffers {
                    wave: "w".into(),
                    ring: 1,
                    status: path(),
                    inventory: path(),
                    spec: path(),
                    differences: vec!["hosts: +gpu-9".into()],
                },
                Config,
            ),
            (
                ApproveError::BadStatus {
                    path: path(),
                    source: json(),
                },
                Failed,
            ),
            (ApproveError::NotTerminal, Usage),
            (ApproveError::NotConfirmed, Failed),
            (ApproveError::Write(approval()), Failed),
        ] {
            t.push((WaveCmdError::from(e).into(), code));
        }
        t.push((BreakglassError::Refused(PlanError::Empty).into(), Config));
        t.push((BreakglassError::Write(approval()).into(), Failed));
        t.push((
            EvidenceCmdError::ReadPacket {
                path: path(),
                source: io(),
            }
            .into(),
            Config,
        ));
        t.push((
            EvidenceCmdError::Invalid {
                path: path(),
                source: Box::new(EvidenceError::Malformed("not JSON".into())),
            }
            .into(),
            Failed,
        ));
        t.push((CliError::Runtime(io()), Failed));
        t
    }

    #[test]
    fn every_error_maps_to_its_documented_exit_code() {
        let table = table();
        for (e, code) in &table {
            assert_eq!(e.exit_code(), *code, "{e:?}");
        }
        // Every code is reached by some error.
        for code in Exit::ALL {
            assert!(table.iter().any(|(_, c)| *c == code), "{code:?} unused");
        }
        assert_eq!(
            Exit::ALL.map(Exit::code),
            [1, 2, 3, 4],
            "codes operators script against never change"
        );
    }

    #[test]
    fn a_halt_names_wave_ring_host_step_and_both_ways_on() {
        let msg = CliError::from(WaveCmdError::Halted(Box::new(halt()))).to_string();
        assert!(
            msg.starts_with(
                "wave w-1 HALTED in ring 2: host gpu-7 step validate (attestation): uncorrected ECC\nthe failed host is left drained;"
            ),
            "{msg}"
        );
        assert!(msg.contains("ringfence wave resume --wave w-1"), "{msg}");
        assert!(msg.contains("ringfence wave abort --wave w-1"), "{msg}");
        let soak = HaltReport {
            kind: FailureKind::SoakRegression,
            ..halt()
        };
        let msg = WaveCmdError::Halted(Box::new(soak)).to_string();
        assert!(
            msg.contains("regressed after it was back in service"),
            "{msg}"
        );
    }

    #[test]
    fn readme_documents_every_exit_code() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
        let start = readme
            .find("### `ringfence` commands")
            .expect("the section");
        let section = &readme[start..];
        let section = &section[..section[4..].find("\n### ").map_or(section.len(), |i| i + 4)];
        assert!(section.contains("\n| 0 | ok"), "{section}");
        for code in Exit::ALL {
            let row = format!(
                "\n| {} | {}",
                code.code(),
                format!("{code:?}").to_lowercase()
            );
            assert!(section.contains(&row), "README lacks `{}`", row.trim());
        }
        let rows = section.lines().filter(|l| {
            l.strip_prefix("| ")
                .and_then(|r| r.split(' ').next())
                .is_some_and(|n| n.parse::<u8>().is_ok())
        });
        assert_eq!(rows.count(), Exit::ALL.len() + 1, "one row per exit code");
    }
}
