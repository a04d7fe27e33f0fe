//! ringfence, the coordinator CLI: parse arguments, run, map errors to exit
//! codes (0 ok, 1 failed, 2 usage, 3 config/input, 4 wave halted).
use std::process::ExitCode;

use clap::Parser;
use ringfence_coordinator::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    ringfence::tls::install_crypto_provider();
    cli::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ringfence: cannot start the runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILED);
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("ringfence: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
