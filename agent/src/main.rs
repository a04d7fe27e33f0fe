//! ringfenced: parse arguments, load config, run. Everything else lives in
//! the library. Exit codes: 0 ok, 2 usage, 3 config, 4 runtime failure,
//! 75 restart requested (a `restarts_agent` patch installed a new agent;
//! the unit's `RestartForceExitStatus=75` makes systemd start it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringfence::tls::{ReloadableServerConfig, ServerTlsPaths};
use ringfence::trust::TrustSet;
use ringfenced::config::{AgentConfig, DEFAULT_CONFIG_PATH};
use ringfenced::daemon::{self, CollectorSource, ServeOptions};
use ringfenced::healthcell::ReportSource;
use ringfenced::tasks::TaskEngine;

const EXIT_CONFIG: u8 = 3;
const EXIT_RUNTIME: u8 = 4;
/// Clean stop after a self-upgrade, asking the service manager for a
/// restart (EX_TEMPFAIL). Must match `RestartForceExitStatus=` in
/// systemd/ringfenced.service.
const EXIT_RESTART: u8 = 75;

/// ringfenced — the ringfence GPU host agent.
#[derive(Debug, Parser)]
#[command(name = "ringfenced", version, about)]
struct Cli {
    /// Agent config file.
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG_PATH, env = "RINGFENCED_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Collect health once and print it (for an operator on the host).
    Health {
        /// Collect once and exit (the only mode).
        #[arg(long)]
        once: bool,
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the host id and the attestation public key with its fingerprint
    /// (creates the key on first use).
    Identity,
    /// Validate the config, trust file and TLS material, then exit.
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ringfenced::logging::init();
    ringfence::tls::install_crypto_provider();
    let config = match AgentConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringfenced: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config),
        Command::Health { once: _, json } => health(&config, json),
        Command::Identity => identity(&config),
        Command::CheckConfig => match check_config(&config) {
            Ok(()) => {
                println!("config ok: host {} on {}", config.host_id, config.listen);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ringfenced: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
    }
}

/// What `daemon::prepare` loads, read-only: the trust file, the TLS
/// material and an existing attestation key. Unlike `prepare` it creates
/// neither the state directory nor the key, so an operator can check a
/// config (or a package test can) without changing the host.
fn check_config(config: &AgentConfig) -> Result<(), String> {
    TrustSet::load(&config.trust_file).map_err(|e| format!("trust file: {e}"))?;
    let tls = &config.tls;
    ReloadableServerConfig::load(
        ServerTlsPaths {
            cert: tls.cert.clone(),
            key: tls.key.clone(),
            ca_bundle: tls.ca_bundle.clone(),
            crl: tls.crl.clone(),
        },
        &tls.trust_domain,
    )
    .map_err(|e| format!("TLS: {e}"))?;
    let key = config.state_dir.join(daemon::HOST_KEY_FILE);
    if key.exists() {
        ringfence::keys::read_signing_key(&key).map_err(|e| format!("attestation key: {e}"))?;
    }
    Ok(())
}

fn run(config: AgentConfig) -> ExitCode {
    let prepared = match daemon::prepare(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ringfenced: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringfenced: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let result = runtime.block_on(async move {
        let source: Arc<dyn ReportSource> = match CollectorSource::start(&prepared.config) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                eprintln!("ringfenced: health collector: {e}");
                return Err(EXIT_CONFIG);
            }
        };
        let poll = Duration::from_secs(prepared.config.gpu.poll_interval_s);
        let mut opts = ServeOptions::new(source, poll);
        let (engine_tx, engine_rx) = tokio::sync::oneshot::channel::<TaskEngine>();
        opts.on_ready = Some(Box::new(move |handles| {
            let _ = engine_tx.send(handles.engine);
        }));
        let restart = Arc::new(AtomicBool::new(false));
        let restart_flag = restart.clone();
        // Stop on SIGTERM/SIGINT, or when a self-upgrade asks for a restart;
        // either way `serve` drains gracefully and syncs the journal.
        let stop = async move {
            let restart_wanted = async {
                match engine_rx.await {
                    Ok(engine) => engine.restart_requested().await,
                    Err(_) => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = restart_wanted => {
                    tracing::info!("exiting with status {EXIT_RESTART} so that systemd starts the upgraded agent");
                    restart_flag.store(true, Ordering::SeqCst);
                }
            }
        };
        daemon::serve(prepared, opts, stop).await.map_err(|e| {
            eprintln!("ringfenced: {e}");
            EXIT_RUNTIME
        })?;
        Ok(restart.load(Ordering::SeqCst))
    });
    match result {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::from(EXIT_RESTART),
        Err(code) => ExitCode::from(code),
    }
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

fn health(config: &AgentConfig, json: bool) -> ExitCode {
    let source = match CollectorSource::start(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ringfenced: health collector: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let report = source.collect(false);
    if json {
        match serde_json::to_string_pretty(&ringfenced::healthcell::report_json(&report)) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("ringfenced: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
        }
    } else {
        print!("{}", ringfenced::healthcell::report_text(&report));
    }
    if report.verdict == ringfence::pb::Verdict::Healthy as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn identity(config: &AgentConfig) -> ExitCode {
    let path = config.state_dir.join(daemon::HOST_KEY_FILE);
    match ringfence::keys::load_or_create(&path) {
        Ok((key, _)) => {
            let vk = key.verifying_key();
            println!("host_id: {}", config.host_id);
            println!("attestation_key: {}", ringfence::keys::public_key_text(&vk));
            println!("fingerprint: {}", ringfence::keys::fingerprint(&vk));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringfenced: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}
