//! The agent's task settings: drain (scheduler hooks, the scheduler wait,
//! the process wait and what to do at its timeout) and reboot, and their
//! checks.

use serde::Deserialize;

use crate::command::unknown_placeholders;
/// What to do when a drain times out with compute processes left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The Drain task fails; the host stays drained (default).
    #[default]
    Fail,
    /// The Drain task succeeds anyway; its message names the processes left.
    Proceed,
}

/// Drain settings (scheduler hooks, the scheduler wait and the process wait).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrainConfig {
    /// Scheduler hook run when draining (argv; `{host_id}` and `{reason}` are
    /// substituted). Empty: none. Also accepted as `drain_hook`.
    #[serde(alias = "drain_hook")]
    pub hook: Vec<String>,
    /// Scheduler hook run when undraining (same substitutions). Empty: none.
    pub undrain_hook: Vec<String>,
    /// Scheduler wait (argv, same substitutions): after the hook, the drain
    /// runs it every `wait_interval_s` until it exits 0 (the scheduler
    /// reports no job on the host). Empty: no scheduler wait.
    pub wait_command: Vec<String>,
    /// Seconds between two runs of `wait_command` (default 10).
    pub wait_interval_s: u64,
    /// How long the drain waits for `wait_command` to exit 0, seconds
    /// (default 1800); then the Drain task fails and the host stays drained.
    pub wait_timeout_s: u64,
    /// How long a drain waits for GPU compute processes to exit, seconds
    /// (default 1800), counted from the drain's start or, with
    /// `wait_command`, from the end of the scheduler wait.
    pub timeout_s: u64,
    /// What happens at the timeout (default "fail").
    pub on_timeout: OnTimeout,
    /// How often the process list is read while waiting, ms (default 2000).
    pub poll_ms: u64,
    /// Timeout of each hook and of each run of `wait_command`, seconds (default 300).
    pub hook_timeout_s: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            hook: Vec::new(),
            undrain_hook: Vec::new(),
            wait_command: Vec::new(),
            wait_interval_s: 10,
            wait_timeout_s: 1800,
            timeout_s: 1800,
            on_timeout: OnTimeout::Fail,
            poll_ms: 2000,
            hook_timeout_s: 300,
        }
    }
}

/// How the host reboots after a `reboot = true` patch.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RebootConfig {
    /// The reboot command (default `["/usr/bin/systemctl", "reboot"]`).
    pub command: Vec<String>,
    /// Its timeout, seconds (default 300).
    pub timeout_s: u64,
}

impl Default for RebootConfig {
    fn default() -> Self {
        Self {
            command: vec!["/usr/bin/systemctl".into(), "reboot".into()],
            timeout_s: 300,
        }
    }
}

/// Task settings are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskConfigError {
    /// a drain or reboot key has an unacceptable value
    #[error("key `{key}`: {message}")]
    Invalid {
        /// The key under `[drain]` or `[reboot]`.
        key: &'static str,
        /// What is wrong with the value.
        message: String,
    },
}

impl DrainConfig {
    /// Check hooks and durations; called at config load.
    pub fn validate(&self) -> Result<(), TaskConfigError> {
        for (key, argv) in [
            ("hook", &self.hook),
            ("undrain_hook", &self.undrain_hook),
            ("wait_command", &self.wait_command),
        ] {
            if argv.first().is_some_and(String::is_empty) {
                return Err(TaskConfigError::Invalid {
                    key,
                    message: "must name a program".into(),
                });
            }
            if argv.first().is_some_and(|p| p.contains('{')) {
                return Err(TaskConfigError::Invalid {
                    key,
                    message: "the program (first element) may not contain a substitution".into(),
                });
            }
            for arg in argv {
                let bad = unknown_placeholders(arg, &["host_id", "reason"]);
                if !bad.is_empty() {
                    return Err(TaskConfigError::Invalid {
                        key,
                        message: format!(
                            "unknown substitution {} in `{arg}`; only {{host_id}} and {{reason}} exist",
                            bad.join(", ")
                        ),
                    });
                }
            }
        }
        for (key, v) in [
            ("timeout_s", self.timeout_s),
            ("poll_ms", self.poll_ms),
            ("hook_timeout_s", self.hook_timeout_s),
            ("wait_interval_s", self.wait_interval_s),
            ("wait_timeout_s", self.wait_timeout_s),
        ] {
            if v == 0 {
                return Err(TaskConfigError::Invalid {
                    key,
                    message: "must be at least 1".into(),
                });
            }
        }
        Ok(())
    }
}

impl RebootConfig {
    /// Check the reboot command; called at config load.
    pub fn validate(&self) -> Result<(), TaskConfigError> {
        if self.command.first().is_none_or(String::is_empty) {
            return Err(TaskConfigError::Invalid {
                key: "command",
                message: "must name a program".into(),
            });
        }
        if self.timeout_s == 0 {
            return Err(TaskConfigError::Invalid {
                key: "timeout_s",
                message: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}
