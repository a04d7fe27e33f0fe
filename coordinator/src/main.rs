//! ringfenced: parse arguments, load config, run. Everything else lives in the library.
use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::SUCCESS
}
