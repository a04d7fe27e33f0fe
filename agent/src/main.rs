//! ringfenced: parse arguments, load config, run. Everything else lives in
//! the library. Exit codes: 0 ok, 2 usage, 3 config, 4 runtime failure,
//! 75 restart requested (a `restarts_agent` patch installed a new agent;
//! the unit's `RestartForceExitStatus=75` makes systemd start it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ringfenced::config::{AgentConfig, DEFAULT_CONFIG_PATH};
use ringfenced::daemon::{self, CollectorSource, ServeOptions, Stopped};
use ringfenced::healthcell::ReportSource;

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
        Command::CheckConfig => match daemon::check(&config) {
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
        let opts = ServeOptions::new(source, poll);
        // Stops gracefully (journal synced) on SIGTERM/SIGINT, or when a
        // self-upgrade asks for a restart.
        daemon::serve(prepared, opts, shutdown_signal())
            .await
            .map_err(|e| {
                eprintln!("ringfenced: {e}");
                EXIT_RUNTIME
            })
    });
    match result {
        Ok(Stopped::Shutdown) => ExitCode::SUCCESS,
        Ok(Stopped::RestartRequested) => {
            tracing::info!(
                "exiting with status {EXIT_RESTART} so that systemd starts the upgraded agent"
            );
            ExitCode::from(EXIT_RESTART)
        }
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
