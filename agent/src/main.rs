//! ringfenced: parse arguments, find and load the config, run the command;
//! everything else lives in the library. Every failure is one
//! [`MainError`], and [`exit_code`] is the one place that turns how a
//! command ended into the process's exit status:
//!
//! | status | meaning |
//! |---|---|
//! | 0 | ok (`run`: stopped by SIGTERM/SIGINT) |
//! | 1 | `health --once`: the host is not HEALTHY (the report is printed) |
//! | 2 | usage error (clap: unknown command or option) |
//! | 3 | config or input error: no config file, a config, trust file, TLS, key, state directory or GPU backend problem; nothing was started |
//! | 4 | runtime failure: the runtime or listener could not start, the journal failed, output could not be written |
//! | 75 | `run` stopped after a `restarts_agent` patch installed a new agent; the unit's `RestartForceExitStatus=75` makes systemd start it |

#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use ringfence::config::ConfigError;
use ringfence::time::{Clock, SystemClock};
use ringfenced::cli::{CONFIG_ENV, Cli, Command};
use ringfenced::config::{AgentConfig, DEFAULT_CONFIG_PATH};
use ringfenced::daemon::{self, CollectorSource, DaemonError, ServeOptions, Stopped};
use ringfenced::healthcell::ReportSource;

const EXIT_OK: u8 = 0;
const EXIT_NOT_HEALTHY: u8 = 1;
const EXIT_CONFIG: u8 = 3;
const EXIT_RUNTIME: u8 = 4;
/// Clean stop after a self-upgrade, asking the service manager for a
/// restart (EX_TEMPFAIL). Must match `RestartForceExitStatus=` in
/// systemd/ringfenced.service.
const EXIT_RESTART: u8 = 75;

/// Why a command failed. [`exit_code`] maps each to the exit status.
#[derive(Debug, thiserror::Error)]
enum MainError {
    /// no `--config`, no `RINGFENCED_CONFIG`, and no default file
    #[error(
        "no config file: tried {tried} (the default); pass one with `ringfenced --config PATH` or the environment variable {CONFIG_ENV}=PATH",
        tried = tried.display()
    )]
    NoConfig { tried: PathBuf },
    /// the config file is unreadable or invalid
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// what `run` loads before serving is unusable (trust, TLS, key, state dir, backend)
    #[error(transparent)]
    Prepare(DaemonError),
    /// the health collector could not start
    #[error("health collector: {0}")]
    Collector(#[from] ringfenced::health::HealthError),
    /// the attestation key could not be read or created
    #[error("attestation key: {0}")]
    Key(#[from] ringfence::keys::KeyError),
    /// the async runtime could not start
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    /// the agent stopped with an error while serving
    #[error(transparent)]
    Serve(DaemonError),
    /// the report could not be written as JSON
    #[error("cannot write the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// How a command ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Done (for `run`: stopped by SIGTERM/SIGINT).
    Done,
    /// `health --once`: the host is not HEALTHY.
    NotHealthy,
    /// `run` stopped so that the service manager starts the upgraded agent.
    RestartRequested,
}

/// The exit status of every way a command can end (the only place).
fn exit_code(result: &Result<Outcome, MainError>) -> u8 {
    match result {
        Ok(Outcome::Done) => EXIT_OK,
        Ok(Outcome::NotHealthy) => EXIT_NOT_HEALTHY,
        Ok(Outcome::RestartRequested) => EXIT_RESTART,
        Err(
            MainError::NoConfig { .. }
            | MainError::Config(_)
            | MainError::Prepare(_)
            | MainError::Collector(_)
            | MainError::Key(_),
        ) => EXIT_CONFIG,
        Err(MainError::Runtime(_) | MainError::Serve(_) | MainError::Json(_)) => EXIT_RUNTIME,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ringfenced::logging::init();
    ringfence::tls::install_crypto_provider();
    let result = load_config(cli.config.as_deref()).and_then(|config| {
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => run(config),
            Command::Health { once: _, json } => health(&config, json),
            Command::Identity => identity(&config),
            Command::CheckConfig => check_config(&config),
        }
    });
    if let Err(e) = &result {
        eprintln!("ringfenced: {e}");
    }
    ExitCode::from(exit_code(&result))
}

/// The config at `path`, or at the default path when none was given.
fn load_config(path: Option<&Path>) -> Result<AgentConfig, MainError> {
    let path = match path {
        Some(p) => p,
        None => {
            let default = Path::new(DEFAULT_CONFIG_PATH);
            if !default.exists() {
                return Err(MainError::NoConfig {
                    tried: default.to_path_buf(),
                });
            }
            default
        }
    };
    Ok(AgentConfig::load(path)?)
}

fn check_config(config: &AgentConfig) -> Result<Outcome, MainError> {
    let notes = daemon::check(config).map_err(MainError::Prepare)?;
    for note in notes {
        eprintln!("ringfenced: note: {note}");
    }
    println!("config ok: host {} on {}", config.host_id, config.listen);
    Ok(Outcome::Done)
}

fn run(config: AgentConfig) -> Result<Outcome, MainError> {
    let prepared = daemon::prepare(config).map_err(MainError::Prepare)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    let stopped = runtime.block_on(async move {
        // The agent's one wall clock: reports, XIDs, tasks, attestations.
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let source: Arc<dyn ReportSource> =
            Arc::new(CollectorSource::start(&prepared.config, clock.clone())?);
        let poll = Duration::from_secs(prepared.config.gpu.poll_interval_s);
        let opts = ServeOptions::new(source, poll, clock);
        // Stops gracefully (journal synced) on SIGTERM/SIGINT, or when a
        // self-upgrade asks for a restart.
        daemon::serve(prepared, opts, shutdown_signal())
            .await
            .map_err(MainError::Serve)
    })?;
    Ok(match stopped {
        Stopped::Shutdown => Outcome::Done,
        Stopped::RestartRequested => {
            tracing::info!(
                "exiting with status {EXIT_RESTART} so that systemd starts the upgraded agent"
            );
            Outcome::RestartRequested
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

fn health(config: &AgentConfig, json: bool) -> Result<Outcome, MainError> {
    let report = CollectorSource::start(config, Arc::new(SystemClock))?.collect(false);
    if json {
        let text = serde_json::to_string_pretty(&ringfenced::healthcell::report_json(&report))?;
        println!("{text}");
    } else {
        print!("{}", ringfenced::healthcell::report_text(&report));
    }
    Ok(
        if report.verdict == ringfence::pb::Verdict::Healthy as i32 {
            Outcome::Done
        } else {
            Outcome::NotHealthy
        },
    )
}

fn identity(config: &AgentConfig) -> Result<Outcome, MainError> {
    let path = config.state_dir.join(daemon::HOST_KEY_FILE);
    let (key, _) = ringfence::keys::load_or_create(&path)?;
    let vk = key.verifying_key();
    println!("host_id: {}", config.host_id);
    println!("attestation_key: {}", ringfence::keys::public_key_text(&vk));
    println!("fingerprint: {}", ringfence::keys::fingerprint(&vk));
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Config errors are 3 and runtime errors 4, whatever their source.
    #[test]
    fn every_error_has_its_documented_exit_status() {
        let io = || std::io::Error::other("x");
        let config = [
            MainError::NoConfig {
                tried: DEFAULT_CONFIG_PATH.into(),
            },
            MainError::Config(ConfigError::Read {
                path: "a.toml".into(),
                source: io(),
            }),
            MainError::Prepare(DaemonError::StateDirUnusable {
                path: "/x".into(),
                reason: "r".into(),
            }),
            MainError::Key(ringfence::keys::KeyError::Io {
                path: "k".into(),
                source: io(),
            }),
        ];
        for e in config {
            assert_eq!(exit_code(&Err(e)), 3);
        }
        let runtime = [
            MainError::Runtime(io()),
            MainError::Serve(DaemonError::StateDir {
                path: "/x".into(),
                source: io(),
            }),
        ];
        for e in runtime {
            assert_eq!(exit_code(&Err(e)), 4);
        }
        assert_eq!(exit_code(&Ok(Outcome::Done)), 0);
        assert_eq!(exit_code(&Ok(Outcome::NotHealthy)), 1);
        assert_eq!(exit_code(&Ok(Outcome::RestartRequested)), 75);
    }

    #[test]
    fn no_config_names_the_default_and_how_to_pass_one() {
        let e = MainError::NoConfig {
            tried: DEFAULT_CONFIG_PATH.into(),
        }
        .to_string();
        for part in [
            DEFAULT_CONFIG_PATH,
            "--config PATH",
            "RINGFENCED_CONFIG=PATH",
        ] {
            assert!(e.contains(part), "`{part}` missing from: {e}");
        }
    }
}
