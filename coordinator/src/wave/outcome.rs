//! The engine's typed outcomes, at the very bottom of `wave/`: the steps
//! of a host's run that send a task ([`TaskStep`]), where a host or the
//! wave stopped ([`Stage`]) and why ([`FailureKind`], [`Failure`],
//! [`HaltReport`]), and how each step of a host's run ends
//! ([`StepResult`]: advance, failed, or halted). They serialize as the
//! snake_case strings earlier versions stored, so wave stores,
//! `status.json` and evidence read unchanged.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A step of a host's run that sends a task; its name is part of the task
/// id (`wave/host/sequence/step`) and of the evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStep {
    /// Take the host out of service.
    Drain,
    /// Install the wave's version.
    Patch,
    /// Prove the patched host healthy.
    Validate,
    /// Return the host to service.
    Undrain,
    /// Roll a host that failed validation back (`on_failure = "rollback"`).
    Rollback,
    /// Prove the rolled-back host healthy.
    RollbackValidate,
    /// Drill: roll the patched host back.
    DrillRollback,
    /// Drill: prove the old version healthy.
    DrillRollbackValidate,
    /// Drill: patch forward again.
    DrillRepatch,
    /// Drill: prove the new version healthy again.
    DrillRepatchValidate,
    /// `wave rollback`: drain the host first.
    ManualDrain,
    /// `wave rollback`: roll it back.
    ManualRollback,
    /// `wave rollback`: prove the old version healthy.
    ManualRollbackValidate,
    /// Drain again a host that regressed during its ring's soak.
    SoakDrain,
}

impl TaskStep {
    /// Every step, for parsing names.
    pub const ALL: [TaskStep; 14] = [
        Self::Drain,
        Self::Patch,
        Self::Validate,
        Self::Undrain,
        Self::Rollback,
        Self::RollbackValidate,
        Self::DrillRollback,
        Self::DrillRollbackValidate,
        Self::DrillRepatch,
        Self::DrillRepatchValidate,
        Self::ManualDrain,
        Self::ManualRollback,
        Self::ManualRollbackValidate,
        Self::SoakDrain,
    ];

    /// The step's name, as stored and as it ends a task id.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drain => "drain",
            Self::Patch => "patch",
            Self::Validate => "validate",
            Self::Undrain => "undrain",
            Self::Rollback => "rollback",
            Self::RollbackValidate => "rollback_validate",
            Self::DrillRollback => "drill_rollback",
            Self::DrillRollbackValidate => "drill_rollback_validate",
            Self::DrillRepatch => "drill_repatch",
            Self::DrillRepatchValidate => "drill_repatch_validate",
            Self::ManualDrain => "manual_drain",
            Self::ManualRollback => "manual_rollback",
            Self::ManualRollbackValidate => "manual_rollback_validate",
            Self::SoakDrain => "soak_drain",
        }
    }

    /// The step named `name`, if there is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The action its task carries: "drain", "patch", "rollback" (a patch
    /// with `rollback = true`), "validate" or "undrain".
    pub fn action(self) -> &'static str {
        match self {
            Self::Drain | Self::ManualDrain | Self::SoakDrain => "drain",
            Self::Patch | Self::DrillRepatch => "patch",
            Self::Rollback | Self::DrillRollback | Self::ManualRollback => "rollback",
            Self::Validate
            | Self::RollbackValidate
            | Self::DrillRollbackValidate
            | Self::DrillRepatchValidate
            | Self::ManualRollbackValidate => "validate",
            Self::Undrain => "undrain",
        }
    }
}

impl fmt::Display for TaskStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a host's run, or the wave, stopped: a step that sends a task, or
/// one of the stages around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "&'static str", try_from = "String")]
pub enum Stage {
    /// Reaching the host (and finding its enrolled key).
    Connect,
    /// The attestation before the wave touches the host.
    AttestBefore,
    /// A step with a task.
    Task(TaskStep),
    /// Watching the host during its ring's soak.
    Soak,
    /// Starting hosts (a halt that no host's failure caused).
    Dispatch,
}

impl Stage {
    /// The stage's name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::AttestBefore => "attest_before",
            Self::Task(t) => t.as_str(),
            Self::Soak => "soak",
            Self::Dispatch => "dispatch",
        }
    }
}

impl From<TaskStep> for Stage {
    fn from(t: TaskStep) -> Self {
        Self::Task(t)
    }
}

impl From<Stage> for &'static str {
    fn from(s: Stage) -> Self {
        s.as_str()
    }
}

impl TryFrom<String> for Stage {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        Ok(match name.as_str() {
            "connect" => Self::Connect,
            "attest_before" => Self::AttestBefore,
            "soak" => Self::Soak,
            "dispatch" => Self::Dispatch,
            other => Self::Task(
                TaskStep::parse(other).ok_or_else(|| format!("unknown wave stage `{other}`"))?,
            ),
        })
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a host failed, or the wave halted: the machine-readable class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The host was UNHEALTHY before the wave; not patched.
    UnhealthyBefore,
    /// A task ended other than SUCCEEDED (or the agent lost it).
    TaskFailed,
    /// An attestation did not verify, or did not show the expected health.
    Attestation,
    /// The host could not be reached.
    Unreachable,
    /// A task did not end within the task timeout.
    Timeout,
    /// The agent refused a task (its status names the failed check).
    Rejected,
    /// The rollback drill failed.
    Drill,
    /// Rolled back by hand (`wave rollback`); left drained.
    ManualRollback,
    /// A rollback by hand failed; left drained.
    ManualRollbackFailed,
    /// The host regressed during its ring's soak.
    SoakRegression,
    /// The host has no enrolled attestation key (or is not in the inventory).
    NotEnrolled,
    /// The wave halted: no host can start and nothing will change by itself.
    Stalled,
    /// The wave halted with no failed host to name (an operator's halt).
    Operator,
}

impl FailureKind {
    /// The kind's name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnhealthyBefore => "unhealthy_before",
            Self::TaskFailed => "task_failed",
            Self::Attestation => "attestation",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::Rejected => "rejected",
            Self::Drill => "drill",
            Self::ManualRollback => "manual_rollback",
            Self::ManualRollbackFailed => "manual_rollback_failed",
            Self::SoakRegression => "soak_regression",
            Self::NotEnrolled => "not_enrolled",
            Self::Stalled => "stalled",
            Self::Operator => "operator",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a host failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    /// Where it failed.
    pub step: Stage,
    /// The class of failure.
    pub kind: FailureKind,
    /// Human-readable reason.
    pub reason: String,
}

impl Failure {
    /// A failure at `step`.
    pub fn new(step: impl Into<Stage>, kind: FailureKind, reason: impl Into<String>) -> Self {
        Self {
            step: step.into(),
            kind,
            reason: crate::hosttext::message(&Into::<String>::into(reason)),
        }
    }
}

/// Why the wave stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaltReport {
    /// Wave id.
    pub wave_id: String,
    /// Ring in progress.
    pub ring: u32,
    /// Failed host, if a host failed.
    pub host: Option<String>,
    /// Where it stopped.
    pub step: Stage,
    /// Failure class.
    pub kind: FailureKind,
    /// Why.
    pub reason: String,
}

/// How one step of a host's run ended.
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub enum StepResult<T = ()> {
    /// The step did its work (with its result); the run goes on.
    Advance(T),
    /// The step failed the host.
    Failed(Failure),
    /// The wave halted before the step sent a task that takes the host
    /// out of service: the run stops where it is; the host has not failed.
    Halted,
}

impl<T> StepResult<T> {
    /// The same end with the advance's result mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> StepResult<U> {
        match self {
            Self::Advance(v) => StepResult::Advance(f(v)),
            Self::Failed(x) => StepResult::Failed(x),
            Self::Halted => StepResult::Halted,
        }
    }
}

/// `advance!(expr)`: the value of an `Ok(StepResult::Advance(v))`; an
/// error, a failure or a halt is returned from the enclosing step as it is.
macro_rules! advance {
    ($e:expr) => {
        match $e? {
            $crate::wave::outcome::StepResult::Advance(v) => v,
            $crate::wave::outcome::StepResult::Failed(f) => {
                return Ok($crate::wave::outcome::StepResult::Failed(f));
            }
            $crate::wave::outcome::StepResult::Halted => {
                return Ok($crate::wave::outcome::StepResult::Halted);
            }
        }
    };
}
pub(crate) use advance;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn an_old_halt_report_reads_and_writes_back_byte_for_byte() {
        for old in [
            r#"{"wave_id":"w","ring":0,"host":null,"step":"dispatch","kind":"stalled","reason":"no host can start"}"#,
            r#"{"wave_id":"w","ring":3,"host":"gpu-7","step":"soak","kind":"soak_regression","reason":"UNHEALTHY"}"#,
            r#"{"wave_id":"w","ring":1,"host":"gpu-2","step":"connect","kind":"unreachable","reason":"x"}"#,
            r#"{"wave_id":"w","ring":1,"host":"gpu-2","step":"manual_rollback_validate","kind":"manual_rollback_failed","reason":"x"}"#,
        ] {
            let h: HaltReport = serde_json::from_str(old).unwrap();
            assert_eq!(serde_json::to_string(&h).unwrap(), old);
        }
        let bad = r#"{"wave_id":"w","ring":1,"host":null,"step":"teleport","kind":"operator","reason":"x"}"#;
        let err = serde_json::from_str::<HaltReport>(bad).unwrap_err();
        assert!(
            err.to_string().contains("unknown wave stage `teleport`"),
            "{err}"
        );
    }

    #[test]
    fn names_are_the_serialized_strings_and_parse_back() {
        for s in TaskStep::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(TaskStep::parse(s.as_str()), Some(s));
            let stage = Stage::from(s);
            assert_eq!(serde_json::to_value(stage).unwrap(), s.as_str());
        }
        for s in [
            Stage::Connect,
            Stage::AttestBefore,
            Stage::Soak,
            Stage::Dispatch,
        ] {
            assert_eq!(Stage::try_from(s.as_str().to_string()), Ok(s));
        }
        for k in [
            FailureKind::UnhealthyBefore,
            FailureKind::TaskFailed,
            FailureKind::Attestation,
            FailureKind::Unreachable,
            FailureKind::Timeout,
            FailureKind::Rejected,
            FailureKind::Drill,
            FailureKind::ManualRollback,
            FailureKind::ManualRollbackFailed,
            FailureKind::SoakRegression,
            FailureKind::NotEnrolled,
            FailureKind::Stalled,
            FailureKind::Operator,
        ] {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        assert_eq!(TaskStep::parse("reboot"), None);
    }
}
