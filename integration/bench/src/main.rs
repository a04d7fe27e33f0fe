//! `ringfence-bench`: measures what an operator and a tenant would notice,
//! each figure beside a baseline measured in the same run, printed with its
//! target and PASS/MISS, and written as JSON and a Markdown table.
//!
//! Each benchmark is a module with `pub fn run(&Args) -> Result<Vec<Figure>, String>`,
//! named in [`KNOWN`] and dispatched in [`run_bench`].
#![warn(missing_docs)]

mod envelope;
mod fixture;
mod footprint;
mod health;
mod scale;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use serde::Serialize;

/// Benchmarks this binary knows, in the order they run by default.
const KNOWN: &[&str] = &["envelope", "health", "footprint", "scale"];

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "ringfence-bench",
    about = "ringfence benchmarks with in-run baselines"
)]
pub struct Args {
    /// Which benchmarks to run (comma separated; default all): envelope,
    /// health, footprint, scale.
    #[arg(long, default_value = "envelope,health,footprint,scale")]
    pub only: String,
    /// Where to write results.json and results.md.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Seconds per measurement (default per bench: envelope 3, health 10, footprint 60).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Internal: run the health bench's bare baseline server on the fixture in DIR.
    #[arg(long, hide = true, value_name = "DIR")]
    pub serve_bare: Option<PathBuf>,
}

/// One measured figure.
#[derive(Debug, Serialize)]
pub struct Figure {
    bench: String,
    name: String,
    value: f64,
    unit: String,
    target: String,
    pass: Option<bool>,
}

impl Figure {
    /// A figure without a target (a baseline or a context number).
    pub fn info(bench: &str, name: &str, value: f64, unit: &str, note: &str) -> Self {
        Self {
            bench: bench.into(),
            name: name.into(),
            value,
            unit: unit.into(),
            target: note.into(),
            pass: None,
        }
    }

    /// A figure checked against `target`; `pass` says whether it met it.
    pub fn check(
        bench: &str,
        name: &str,
        value: f64,
        unit: &str,
        target: &str,
        pass: bool,
    ) -> Self {
        Self {
            pass: Some(pass),
            ..Self::info(bench, name, value, unit, target)
        }
    }
}

/// Run one benchmark by name.
fn run_bench(name: &str, args: &Args) -> Result<Vec<Figure>, String> {
    match name {
        "envelope" => envelope::run(args),
        "health" => health::run(args),
        "footprint" => footprint::run(args),
        "scale" => scale::run(args),
        other => Err(format!(
            "unknown benchmark `{other}` (known: {})",
            KNOWN.join(", ")
        )),
    }
}

fn markdown(figures: &[Figure]) -> String {
    let mut s = String::from(
        "| bench | figure | value | unit | target | result |\n|---|---|---:|---|---|---|\n",
    );
    for f in figures {
        let result = match f.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "",
        };
        s.push_str(&format!(
            "| {} | {} | {:.3} | {} | {} | {} |\n",
            f.bench, f.name, f.value, f.unit, f.target, result
        ));
    }
    s
}

fn write_results(args: &Args, figures: &[Figure]) -> Result<(), String> {
    let md = markdown(figures);
    print!("{md}");
    let json = serde_json::to_vec_pretty(figures).map_err(|e| format!("results as JSON: {e}"))?;
    std::fs::create_dir_all(&args.out)
        .and_then(|()| std::fs::write(args.out.join("results.md"), &md))
        .and_then(|()| std::fs::write(args.out.join("results.json"), json))
        .map_err(|e| format!("cannot write results to {}: {e}", args.out.display()))
}

fn main() -> ExitCode {
    ringfence::tls::install_crypto_provider();
    let args = Args::parse();
    if let Some(dir) = &args.serve_bare {
        return match health::serve_bare(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ringfence-bench --serve-bare: {e}");
                ExitCode::from(1)
            }
        };
    }
    let benches: Vec<&str> = args.only.split(',').map(str::trim).collect();
    if let Some(bad) = benches.iter().find(|b| !KNOWN.contains(b)) {
        eprintln!(
            "ringfence-bench: unknown benchmark `{bad}` (known: {})",
            KNOWN.join(", ")
        );
        return ExitCode::from(2);
    }
    if let Some(s) = args.seconds
        && !(s.is_finite() && s > 0.0)
    {
        eprintln!("ringfence-bench: --seconds must be a positive number, got {s}");
        return ExitCode::from(2);
    }
    let mut figures = Vec::new();
    let mut failed = false;
    for bench in benches {
        eprintln!("ringfence-bench: running {bench}");
        match run_bench(bench, &args) {
            Ok(f) => figures.extend(f),
            Err(e) => {
                eprintln!("ringfence-bench: {bench}: {e}");
                failed = true;
            }
        }
    }
    if let Err(e) = write_results(&args, &figures) {
        eprintln!("ringfence-bench: {e}");
        return ExitCode::from(1);
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
