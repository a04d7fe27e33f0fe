//! `ringfence-hostsim`: one process, one mTLS listener, many simulated agents
//! for the coordinator scale benchmark. Each connection gets the certificate
//! of the host the coordinator names by SNI, and each request is answered by
//! that host's [`SimHost`](ringfence_devfleet::simhost::SimHost): real
//! task verification, real signed attestations, zero-time patches.
//!
//! Prints `listening <addr>` once it accepts connections; stops when stdin
//! closes, then writes what every host received (with timestamps) as JSON.
#![warn(missing_docs)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ringfence::pb;
use ringfence::tls::{ReloadableServerConfig, SniIdentity};
use ringfence::trust::TrustSet;
use ringfence_devfleet::simhost::{MultiHost, SimFleet};
use std::io::Read;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "ringfence-hostsim",
    about = "many simulated ringfence agents behind one mTLS listener"
)]
struct Args {
    /// Fleet file (JSON, written by ringfence-bench).
    #[arg(long)]
    fleet: PathBuf,
    /// Trust file (coordinator and approver keys, policy).
    #[arg(long)]
    trust: PathBuf,
    /// CA bundle client certificates must chain to.
    #[arg(long)]
    ca: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Where to write the record when stdin closes.
    #[arg(long)]
    record: PathBuf,
    /// A host whose validation fails once `--faulty-version` is installed.
    #[arg(long, requires = "faulty_version")]
    faulty_host: Option<String>,
    /// The version that brings the faulty host an uncorrected ECC error.
    #[arg(long)]
    faulty_version: Option<String>,
}

async fn run(args: Args) -> Result<(), String> {
    ringfence::tls::install_crypto_provider();
    let text = std::fs::read(&args.fleet).map_err(|e| format!("{}: {e}", args.fleet.display()))?;
    let fleet: SimFleet =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", args.fleet.display()))?;
    let trust = Arc::new(TrustSet::load(&args.trust).map_err(|e| e.to_string())?);
    let ca = std::fs::read(&args.ca).map_err(|e| format!("{}: {e}", args.ca.display()))?;
    let faulty = args
        .faulty_host
        .as_deref()
        .zip(args.faulty_version.as_deref());
    let hosts = MultiHost::new(&fleet, trust, faulty)?;
    let identities: Vec<SniIdentity> = fleet
        .hosts
        .iter()
        .map(|h| SniIdentity {
            name: h.id.clone(),
            cert_pem: h.cert_pem.clone().into_bytes(),
            key_pem: h.key_pem.clone().into_bytes(),
        })
        .collect();
    let config = ringfence::tls::server_config_by_sni(&identities, &ca, &fleet.trust_domain)
        .map_err(|e| e.to_string())?;
    drop(identities);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening {addr}");
    let routes = tonic::service::Routes::new(pb::agent_server::AgentServer::new(hosts.clone()));
    // A plain thread waits for EOF on stdin (the bench closes it to stop us).
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    let stdin_closed = async {
        let _ = closed_rx.await;
    };
    // One listener stands in for every simulated host, so it must take the
    // connections of the whole fleet at once, not one agent's share.
    let limits = ringfence::tls::ServeLimits {
        max_connections: fleet.hosts.len().saturating_mul(2).max(1024),
        max_handshakes: 1024,
        ..Default::default()
    };
    ringfence::tls::serve_with_limits(
        listener,
        ReloadableServerConfig::fixed(config, &fleet.trust_domain),
        routes,
        limits,
        stdin_closed,
    )
    .await
    .map_err(|e| e.to_string())?;
    let record = serde_json::to_vec(&hosts.snapshot()).map_err(|e| e.to_string())?;
    std::fs::write(&args.record, record).map_err(|e| format!("{}: {e}", args.record.display()))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ringfence-hostsim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfence-hostsim: {e}");
            ExitCode::from(1)
        }
    }
}
