//! `ringfence-demo`: a simulated fleet of 20 real agents on loopback and a
//! wave through it (see [`ringfence_devfleet::demo`]). Exit codes as the
//! `ringfence` CLI: 0 the wave behaved as the scenario expects, 1 it did
//! not (or the demo could not run), 2 usage.
#![warn(missing_docs)]
use std::process::ExitCode;

use clap::Parser;
use ringfence_devfleet::demo::{self, DemoArgs};

fn main() -> ExitCode {
    let args = DemoArgs::parse();
    ringfence::tls::install_crypto_provider();
    ringfence_coordinator::cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringfence-demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ringfence-demo: {f}");
            ExitCode::FAILURE
        }
    }
}
