//! `ringfence-docgen OUT_DIR`: writes the man pages and shell completions of
//! `ringfence` and `ringfenced` (see the library's layout table).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Writes the man pages and shell completions of ringfence and ringfenced.
#[derive(Debug, Parser)]
#[command(name = "ringfence-docgen", version, about)]
struct Args {
    /// Output directory (created if missing).
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match ringfence_docgen::generate(&args.out) {
        Ok(files) => {
            println!("wrote {} files under {}", files.len(), args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringfence-docgen: {e}");
            ExitCode::from(1)
        }
    }
}
