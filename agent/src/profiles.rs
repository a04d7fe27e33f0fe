//! Patch profiles from the agent's local config, and the action policy
//! (check 6 of task verification) built on them: a task names a profile
//! and a version, never a command.
//!
//! ```toml
//! [patch.profiles.nvidia-driver]
//! argv = ["/usr/local/sbin/install-driver", "--version={version}"]  # {version} is the only substitution
//! version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'                      # anchored: ^...$
//! timeout_s = 1800          # default 1800
//! reboot = true             # default false
//! restarts_agent = false    # default false
//! require_drained = true    # default true
//! validate_command = ["/usr/local/bin/gpu-burn", "-d", "30"]        # optional smoke test
//! validate_timeout_s = 300  # default 300
//! ```

use std::collections::BTreeMap;

use regex::Regex;
use ringfence::envelope::{ActionPolicy, NONCE_LEN};
use ringfence::pb;
use ringfence::pb::task_payload::Action;
use serde::Deserialize;

use crate::command::unknown_placeholders;

/// Longest version string a task may carry.
pub const MAX_VERSION_LEN: usize = 128;
/// Longest free-text field (reason, operator) a task may carry.
pub const MAX_TEXT_LEN: usize = 1024;

/// The `[patch]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchConfig {
    /// `[patch.profiles.NAME]` tables.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// One patch profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Command template; `{version}` is the only substitution.
    pub argv: Vec<String>,
    /// Anchored regex (`^...$`) a task's version must match.
    pub version_pattern: String,
    /// Timeout of the command, seconds (default 1800).
    #[serde(default = "default_patch_timeout")]
    pub timeout_s: u64,
    /// Reboot after a successful command; the patch finishes on the next boot.
    #[serde(default)]
    pub reboot: bool,
    /// The command upgrades ringfenced itself; the patch finishes when the
    /// agent starts again on the task's version.
    #[serde(default)]
    pub restarts_agent: bool,
    /// Refuse to patch a host that is not drained (default true).
    #[serde(default = "default_true")]
    pub require_drained: bool,
    /// Optional smoke test run by Validate tasks naming this profile (no substitutions).
    #[serde(default)]
    pub validate_command: Option<Vec<String>>,
    /// Timeout of the smoke test, seconds (default 300).
    #[serde(default = "default_validate_timeout")]
    pub validate_timeout_s: u64,
}

fn default_patch_timeout() -> u64 {
    1800
}
fn default_validate_timeout() -> u64 {
    300
}
fn default_true() -> bool {
    true
}

/// A patch profile is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// a key of a profile has an unacceptable value
    #[error("patch profile `{profile}`: key `{key}`: {message}")]
    Invalid {
        /// The profile's name (its table under `[patch.profiles]`).
        profile: String,
        /// The key within the profile.
        key: &'static str,
        /// What is wrong with the value.
        message: String,
    },
}

impl ProfileError {
    fn new(profile: &str, key: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            profile: profile.to_string(),
            key,
            message: message.into(),
        }
    }

    /// The profile and the TOML key path (`patch.profiles.NAME.KEY`) at fault.
    pub fn key_path(&self) -> String {
        match self {
            Self::Invalid { profile, key, .. } => format!("patch.profiles.{profile}.{key}"),
        }
    }
}

impl Profile {
    /// Compile the version pattern, refusing patterns that are not anchored.
    pub fn compile_pattern(&self, name: &str) -> Result<Regex, ProfileError> {
        let p = &self.version_pattern;
        if !p.starts_with('^') || !p.ends_with('$') || p.ends_with("\\$") {
            return Err(ProfileError::new(
                name,
                "version_pattern",
                format!("`{p}` must be anchored: start with ^ and end with $"),
            ));
        }
        // Wrapped again so that an alternation like `^a|b$` stays anchored.
        Regex::new(&format!(r"\A(?:{p})\z"))
            .map_err(|e| ProfileError::new(name, "version_pattern", e.to_string()))
    }
}

impl PatchConfig {
    /// Check every profile; called at config load, before anything runs.
    pub fn validate(&self) -> Result<(), ProfileError> {
        for (name, p) in &self.profiles {
            if p.argv.is_empty() || p.argv[0].is_empty() {
                return Err(ProfileError::new(name, "argv", "must name a program"));
            }
            for arg in &p.argv {
                let bad = unknown_placeholders(arg, &["version"]);
                if !bad.is_empty() {
                    return Err(ProfileError::new(
                        name,
                        "argv",
                        format!(
                            "unknown substitution {} in `{arg}`; {{version}} is the only one",
                            bad.join(", ")
                        ),
                    ));
                }
            }
            p.compile_pattern(name)?;
            if p.timeout_s == 0 {
                return Err(ProfileError::new(name, "timeout_s", "must be at least 1"));
            }
            if p.reboot && p.restarts_agent {
                return Err(ProfileError::new(
                    name,
                    "restarts_agent",
                    "a profile either reboots the host or restarts the agent, not both (a reboot restarts the agent anyway)",
                ));
            }
            if let Some(cmd) = &p.validate_command
                && (cmd.is_empty() || cmd[0].is_empty())
            {
                return Err(ProfileError::new(
                    name,
                    "validate_command",
                    "must name a program",
                ));
            }
            if p.validate_timeout_s == 0 {
                return Err(ProfileError::new(
                    name,
                    "validate_timeout_s",
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

/// The action policy of check 6: which tasks this agent's config allows.
#[derive(Debug, Clone)]
pub struct ProfilePolicy {
    profiles: BTreeMap<String, (Profile, Regex)>,
}

impl ProfilePolicy {
    /// Build the policy, compiling every version pattern.
    pub fn new(config: &PatchConfig) -> Result<Self, ProfileError> {
        config.validate()?;
        let mut profiles = BTreeMap::new();
        for (name, p) in &config.profiles {
            profiles.insert(name.clone(), (p.clone(), p.compile_pattern(name)?));
        }
        Ok(Self { profiles })
    }

    /// The names of the configured profiles, sorted.
    pub fn names(&self) -> Vec<String> {
        self.profiles.keys().cloned().collect()
    }

    /// A configured profile.
    pub fn profile(&self, name: &str) -> Option<&Profile> {
        self.profiles.get(name).map(|(p, _)| p)
    }

    fn known(&self, name: &str) -> Result<&(Profile, Regex), String> {
        self.profiles.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            format!(
                "unknown patch profile `{}` (configured: {})",
                name.escape_debug(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
    }
}

fn text_ok(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_TEXT_LEN {
        return Err(format!(
            "{field} is {} bytes, limit {MAX_TEXT_LEN}",
            value.len()
        ));
    }
    if value.contains('\0') {
        return Err(format!("{field} contains a NUL byte"));
    }
    Ok(())
}

/// A task value that hooks receive as `{reason}`: text, and never an option.
fn hook_value_ok(field: &str, value: &str) -> Result<(), String> {
    text_ok(field, value)?;
    if value.starts_with('-') {
        return Err(format!(
            "{field} `{}` starts with `-`: hooks receive it as an argument, where it would be read as an option",
            value.chars().take(64).collect::<String>().escape_debug()
        ));
    }
    Ok(())
}

impl ActionPolicy for ProfilePolicy {
    fn allow(&self, task: &pb::TaskPayload) -> Result<(), String> {
        match &task.action {
            Some(Action::Patch(p)) => {
                let (profile, pattern) = self.known(&p.profile)?;
                if p.version.len() > MAX_VERSION_LEN || !pattern.is_match(&p.version) {
                    return Err(format!(
                        "version `{}` does not match the version_pattern `{}` of patch profile `{}`",
                        p.version
                            .chars()
                            .take(MAX_VERSION_LEN)
                            .collect::<String>()
                            .escape_debug(),
                        profile.version_pattern,
                        p.profile
                    ));
                }
                Ok(())
            }
            Some(Action::Validate(v)) => {
                if !NONCE_LEN.contains(&v.nonce.len()) {
                    return Err(format!(
                        "validate nonce is {} bytes, must be {} to {}",
                        v.nonce.len(),
                        NONCE_LEN.start(),
                        NONCE_LEN.end()
                    ));
                }
                if !v.profile.is_empty() {
                    self.known(&v.profile)?;
                }
                text_ok("expect_driver_version", &v.expect_driver_version)?;
                text_ok("expect_cuda_version", &v.expect_cuda_version)
            }
            Some(Action::Drain(d)) => hook_value_ok("drain reason", &d.reason),
            Some(Action::Undrain(u)) => hook_value_ok("undrain reason", &u.reason),
            Some(Action::AckFaults(a)) => {
                // `operator` is an informational note; the acknowledging
                // operators are the approver keys (recorded in the journal).
                text_ok("operator", &a.operator)?;
                text_ok("ack reason", &a.reason)
            }
            None => Err("task has no action".into()),
        }
    }
}
