//! ringfence, the coordinator CLI: parse arguments, start logging, run the
//! command, and exit with the code [`CliError::exit_code`] gives (0 ok,
//! 1 failed, 2 usage, 3 config/input, 4 wave halted; see README).

#![warn(missing_docs)]

use std::process::ExitCode;

use clap::Parser;
use ringfence_coordinator::cli::{self, Cli, CliError};

fn main() -> ExitCode {
    let args = Cli::parse();
    ringfence::tls::install_crypto_provider();
    cli::init_logging();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
        .and_then(|runtime| runtime.block_on(cli::run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfence: {e}");
            e.exit_code().into()
        }
    }
}
