//! The command-runner seam (the Executor of ARCHITECTURE.md): every hook,
//! patch command, smoke test and the reboot command goes through
//! [`CommandRunner`]. Commands are argv vectors from the agent's local
//! config, run directly (never through a shell), each in its own process
//! group so that a timeout kills everything the command started.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::Instrument;

/// Longest output line kept or logged; longer lines are split.
pub const MAX_LINE_BYTES: usize = 4096;

/// One command to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// What the command is for, in logs and errors ("drain hook", "patch command").
    pub label: String,
    /// Program and arguments; `argv[0]` is an absolute path or found in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment variables (the task id, host id, version).
    pub env: Vec<(String, String)>,
    /// After this long the whole process group is terminated.
    pub timeout: Duration,
    /// How many of the last output lines to keep in the outcome.
    pub tail_lines: usize,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Exit code, if the command exited normally.
    pub exit_code: Option<i32>,
    /// Signal that ended the command, if any.
    pub signal: Option<i32>,
    /// True when the command outlived its timeout and its group was killed.
    pub timed_out: bool,
    /// The last `tail_lines` lines of stdout and stderr, in the order the
    /// command wrote them (both go to one pipe).
    pub tail: Vec<String>,
    /// How long it ran.
    pub elapsed: Duration,
}

impl CommandOutcome {
    /// Exited with status 0 within its timeout.
    pub fn success(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }

    /// The exit code for a task status: the code, or -1 for a signal/timeout.
    pub fn code_or_minus_one(&self) -> i32 {
        self.exit_code.unwrap_or(-1)
    }

    /// A sentence describing the end: "exited with status 3",
    /// "killed by signal 9", "killed after the 30 s timeout".
    pub fn describe(&self, timeout: Duration) -> String {
        if self.timed_out {
            format!(
                "killed with its process group after the {} s timeout",
                timeout.as_secs()
            )
        } else if let Some(code) = self.exit_code {
            format!("exited with status {code}")
        } else if let Some(sig) = self.signal {
            format!("killed by signal {sig}")
        } else {
            "ended without status".to_string()
        }
    }
}

/// A command could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// the argv is empty
    #[error("{label}: empty argv")]
    EmptyArgv {
        /// The step's label (hook or patch name, as logged).
        label: String,
    },
    /// the program could not be started
    #[error("{label}: cannot start `{program}`: {source}")]
    Spawn {
        /// The step's label (hook or patch name, as logged).
        label: String,
        /// `argv[0]`, the program that did not start.
        program: String,
        /// The spawn error (not found, permission denied, ...).
        #[source]
        source: std::io::Error,
    },
    /// waiting for the program failed
    #[error("{label}: waiting for `{program}` failed: {source}")]
    Wait {
        /// The step's label (hook or patch name, as logged).
        label: String,
        /// `argv[0]`, the program that was waited for.
        program: String,
        /// The wait error.
        #[source]
        source: std::io::Error,
    },
}

/// Runs commands. The real implementation is [`ProcessRunner`]; a
/// privileged executor process can implement the same seam later.
pub trait CommandRunner: Send + Sync {
    /// Run one command to completion (or until its timeout).
    fn run(&self, spec: CommandSpec) -> BoxFuture<'_, Result<CommandOutcome, CommandError>>;
}

/// Runs commands as child processes of the agent.
#[derive(Debug, Clone)]
pub struct ProcessRunner {
    /// Time between SIGTERM and SIGKILL to the process group on timeout.
    pub kill_grace: Duration,
}

impl Default for ProcessRunner {
    fn default() -> Self {
        Self {
            kill_grace: Duration::from_secs(10),
        }
    }
}

type Tail = Arc<Mutex<VecDeque<String>>>;

impl CommandRunner for ProcessRunner {
    fn run(&self, spec: CommandSpec) -> BoxFuture<'_, Result<CommandOutcome, CommandError>> {
        Box::pin(self.run_process(spec))
    }
}

impl ProcessRunner {
    async fn run_process(&self, spec: CommandSpec) -> Result<CommandOutcome, CommandError> {
        let Some((program, args)) = spec.argv.split_first() else {
            return Err(CommandError::EmptyArgv { label: spec.label });
        };
        let started = Instant::now();
        let spawn_err = |source| CommandError::Spawn {
            label: spec.label.clone(),
            program: program.clone(),
            source,
        };
        // stdout and stderr share one pipe, as `2>&1` would: the last lines
        // kept are then the last lines written (with two pipes a final
        // `dpkg: error` on stderr could be pushed out by stdout lines read
        // after it).
        let (output, writer) = std::io::pipe().map_err(spawn_err)?;
        let writer_for_stderr = writer.try_clone().map_err(spawn_err)?;
        let output =
            tokio::net::unix::pipe::Receiver::from_owned_fd(output.into()).map_err(spawn_err)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(command_env(&spec.env))
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer_for_stderr)
            // Its own process group, so that a timeout can kill all of it.
            .process_group(0);
        let spawned = cmd.spawn();
        // Close our copies of the pipe's write end, or the reader never
        // sees the end of the output.
        drop(cmd);
        let mut child = spawned.map_err(spawn_err)?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        tracing::info!(label = %spec.label, argv = ?spec.argv, pid = ?pgid, "command started");

        let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
        let reader = spawn_reader(output, &spec, tail.clone());

        let wait_err = |source| CommandError::Wait {
            label: spec.label.clone(),
            program: program.clone(),
            source,
        };
        let mut timed_out = false;
        let status = tokio::select! {
            status = child.wait() => status.map_err(wait_err)?,
            () = tokio::time::sleep(spec.timeout) => {
                timed_out = true;
                tracing::warn!(label = %spec.label, timeout_s = spec.timeout.as_secs(),
                    "command outlived its timeout; terminating its process group");
                signal_group(pgid, Signal::SIGTERM);
                match tokio::time::timeout(self.kill_grace, child.wait()).await {
                    Ok(status) => {
                        // The leader is gone; members that ignored SIGTERM are not.
                        signal_group(pgid, Signal::SIGKILL);
                        status.map_err(wait_err)?
                    }
                    Err(_) => {
                        signal_group(pgid, Signal::SIGKILL);
                        child.wait().await.map_err(wait_err)?
                    }
                }
            }
        };
        // A background child may still hold the pipe open: give the reader
        // a moment to drain what was written, then stop reading.
        let abort = reader.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .is_err()
        {
            abort.abort();
        }
        use std::os::unix::process::ExitStatusExt;
        let outcome = CommandOutcome {
            exit_code: status.code(),
            signal: status.signal(),
            timed_out,
            tail: tail
                .lock()
                .map(|t| t.iter().cloned().collect())
                .unwrap_or_default(),
            elapsed: started.elapsed(),
        };
        tracing::info!(label = %spec.label, exit_code = ?outcome.exit_code, signal = ?outcome.signal,
            timed_out, elapsed_ms = u64::try_from(outcome.elapsed.as_millis()).unwrap_or(u64::MAX),
            "command ended");
        Ok(outcome)
    }
}

fn signal_group(pgid: Option<Pid>, sig: Signal) {
    if let Some(pgid) = pgid {
        // ESRCH (group already gone) is the normal case after an exit.
        let _ = killpg(pgid, sig);
    }
}

/// Read the command's output: log every line (the current span carries the
/// task id) and keep the last `tail_lines` of them.
fn spawn_reader<R>(mut stream: R, spec: &CommandSpec, tail: Tail) -> tokio::task::JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let label = spec.label.clone();
    let keep = spec.tail_lines;
    let fut = async move {
        let mut buf = [0u8; 4096];
        let mut line: Vec<u8> = Vec::new();
        let emit = |line: &mut Vec<u8>| {
            let text = String::from_utf8_lossy(line)
                .trim_end_matches('\r')
                .to_string();
            line.clear();
            tracing::info!(label = %label, "{text}");
            if keep > 0
                && let Ok(mut t) = tail.lock()
            {
                if t.len() >= keep {
                    t.pop_front();
                }
                t.push_back(text);
            }
        };
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if b == b'\n' {
                    emit(&mut line);
                } else {
                    line.push(b);
                    if line.len() >= MAX_LINE_BYTES {
                        emit(&mut line);
                    }
                }
            }
        }
        if !line.is_empty() {
            emit(&mut line);
        }
    };
    tokio::spawn(fut.instrument(tracing::Span::current()))
}

/// A substituted value would become an option or the program.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubstitutionError {
    /// a value starting with `-` would start an argument: it would be read as an option
    #[error(
        "argument {index} `{template}` would start with `-` after substituting {{{name}}} = `{value}`; a substituted value may not become an option (put the placeholder after a fixed prefix such as `--reason=`, or after a `--` argument)"
    )]
    OptionLike {
        /// Position of the argument in the argv template (0 is the program).
        index: usize,
        /// The argument as configured, placeholders included.
        template: String,
        /// The placeholder whose value starts with `-`.
        name: String,
        /// The refused value.
        value: String,
    },
    /// the program itself would come from a substitution
    #[error("the program `{template}` (argv[0]) may not contain a substitution")]
    Program {
        /// The program as configured (`argv[0]` of the template).
        template: String,
    },
}

/// Replace `{name}` placeholders in an argv template. Only the given names
/// are known; the config loader has already refused any other placeholder.
///
/// Values can come from a task (a drain reason), so a value may never
/// become an option or the program: an argument that starts with `-` only
/// because of a substituted value is refused (unless it follows a literal
/// `--` argument), and so is a placeholder in `argv[0]`.
pub fn substitute(
    template: &[String],
    vars: &[(&str, &str)],
) -> Result<Vec<String>, SubstitutionError> {
    let mut after_double_dash = false;
    let mut out = Vec::with_capacity(template.len());
    for (index, arg) in template.iter().enumerate() {
        let mut value = arg.clone();
        for (name, v) in vars {
            value = value.replace(&format!("{{{name}}}"), v);
        }
        if index == 0 && value != *arg {
            return Err(SubstitutionError::Program {
                template: arg.clone(),
            });
        }
        if !after_double_dash && value.starts_with('-') && !arg.starts_with('-') {
            let (name, v) = vars
                .iter()
                .find(|(name, _)| arg.starts_with(&format!("{{{name}}}")))
                .copied()
                .unwrap_or(("?", ""));
            return Err(SubstitutionError::OptionLike {
                index,
                template: arg.clone(),
                name: name.to_string(),
                value: v.chars().take(64).collect(),
            });
        }
        if index > 0 && arg == "--" {
            after_double_dash = true;
        }
        out.push(value);
    }
    Ok(out)
}

/// Environment variables a command inherits from the agent (besides the
/// `RINGFENCE_*` variables of its [`CommandSpec`]): nothing else leaks
/// into hooks and patch commands (no `NOTIFY_SOCKET`, credentials, `LD_*`).
pub const INHERITED_ENV: &[&str] = &["PATH", "LANG"];

/// `PATH` of commands when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The whole environment of a command: `PATH` (the agent's, else
/// [`DEFAULT_PATH`]), `LANG` when the agent has one, and `extra`.
pub fn command_env(extra: &[(String, String)]) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for name in INHERITED_ENV {
        match std::env::var(name) {
            Ok(v) => env.push(((*name).to_string(), v)),
            Err(_) if *name == "PATH" => env.push(("PATH".to_string(), DEFAULT_PATH.to_string())),
            Err(_) => {}
        }
    }
    env.extend(extra.iter().cloned());
    env
}

/// The placeholders (`{...}`) in `arg` that are not in `allowed`.
pub fn unknown_placeholders(arg: &str, allowed: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) => {
                let name = &after[..end];
                if !allowed.contains(&name) {
                    bad.push(format!("{{{name}}}"));
                }
                rest = &after[end + 1..];
            }
            None => {
                bad.push(rest[start..].to_string());
                break;
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert!(unknown_placeholders("--version={version}", &["version"]).is_empty());
        assert_eq!(
            unknown_placeholders("{foo}-{version}", &["version"]),
            vec!["{foo}".to_string()]
        );
        assert_eq!(unknown_placeholders("a{b", &["version"]), vec!["{b"]);
        let argv =
            substitute(&["x".into(), "v={version}".into()], &[("version", "1.2.3")]).unwrap();
        assert_eq!(argv, vec!["x".to_string(), "v=1.2.3".to_string()]);
    }

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_string()).collect()
    }

    /// A task's reason `--force` / `-rf` substituted as a whole argument
    /// would be read as an option by the hook: refused. After a fixed
    /// prefix, or after `--`, it is plain data.
    #[test]
    fn a_value_never_becomes_an_option_or_the_program() {
        let vars = [("host_id", "gpu-1"), ("reason", "--delete-all-jobs")];
        let err = substitute(&argv(&["/bin/hook", "{host_id}", "{reason}"]), &vars).unwrap_err();
        assert!(
            matches!(&err, SubstitutionError::OptionLike { index: 2, name, .. } if name == "reason"),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("may not become an option"),
            "{err}"
        );
        let vars_short = [("reason", "-rf")];
        assert!(substitute(&argv(&["/bin/hook", "{reason}x"]), &vars_short).is_err());
        assert_eq!(
            substitute(&argv(&["/bin/hook", "--reason={reason}"]), &vars).unwrap(),
            argv(&["/bin/hook", "--reason=--delete-all-jobs"])
        );
        assert_eq!(
            substitute(&argv(&["/bin/hook", "--", "{reason}"]), &vars).unwrap(),
            argv(&["/bin/hook", "--", "--delete-all-jobs"])
        );
        // A literal option in the template stays allowed.
        assert!(substitute(&argv(&["/bin/hook", "-v", "{host_id}"]), &vars).is_ok());
        assert!(matches!(
            substitute(&argv(&["{reason}", "x"]), &[("reason", "/bin/evil")]),
            Err(SubstitutionError::Program { .. })
        ));
    }

    /// Commands see PATH, LANG and the spec's variables only: nothing of the
    /// agent's own environment (the test runner's CARGO_*, HOME, ...).
    #[tokio::test(flavor = "multi_thread")]
    async fn commands_run_with_a_cleaned_environment() {
        assert!(
            std::env::vars().any(|(k, _)| k.starts_with("CARGO") || k == "HOME"),
            "the test process itself has a rich environment"
        );
        let outcome = ProcessRunner::default()
            .run(CommandSpec {
                label: "env".into(),
                argv: vec!["/usr/bin/env".into()],
                env: vec![("RINGFENCE_TASK_ID".into(), "t-1".into())],
                timeout: Duration::from_secs(20),
                tail_lines: 1000,
            })
            .await
            .unwrap();
        assert!(outcome.success(), "{outcome:?}");
        let names: Vec<&str> = outcome
            .tail
            .iter()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        assert!(names.contains(&"PATH"), "{names:?}");
        assert!(outcome.tail.contains(&"RINGFENCE_TASK_ID=t-1".to_string()));
        for name in &names {
            assert!(
                INHERITED_ENV.contains(name) || name.starts_with("RINGFENCE_"),
                "`{name}` leaked into the command's environment: {:?}",
                outcome.tail
            );
        }
    }

    /// stdout and stderr lines keep the order they were written in, so the
    /// error a package manager prints last is the last line kept.
    #[tokio::test(flavor = "multi_thread")]
    async fn output_tail_keeps_the_written_order_of_stdout_and_stderr() {
        let script = "for i in $(seq 1 200); do echo out$i; echo err$i >&2; done; echo 'dpkg: error' >&2; exit 3";
        for _ in 0..5 {
            let outcome = ProcessRunner::default()
                .run(CommandSpec {
                    label: "test".into(),
                    argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                    env: Vec::new(),
                    timeout: Duration::from_secs(20),
                    tail_lines: 5,
                })
                .await
                .unwrap();
            assert_eq!(outcome.exit_code, Some(3));
            assert_eq!(
                outcome.tail,
                ["out199", "err199", "out200", "err200", "dpkg: error"]
            );
        }
    }
}
