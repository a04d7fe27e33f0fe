//! ringfence-gpu-check: parse arguments, read files, run one step of the kit.
//! Exit codes: 0 ok, 1 a mismatch / difference / loss was found, 2 bad
//! input or usage.
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringfence_gpu_check::{compare, convert, render, replay, smi, timing};
use ringfenced::gpu::sim::scenario::Scenario;

const EXIT_FOUND: u8 = 1;
const EXIT_INPUT: u8 = 2;

/// Real-GPU check kit for ringfenced (integration/gpu-check).
#[derive(Debug, Parser)]
#[command(name = "ringfence-gpu-check", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Compare `ringfenced health --once --json` with `nvidia-smi -q -x`:
    /// one row per field per GPU; exit 1 on any mismatch.
    Compare {
        /// The agent's report (JSON).
        #[arg(long)]
        health: PathBuf,
        /// nvidia-smi's XML log.
        #[arg(long)]
        smi: PathBuf,
        /// `nvidia-smi nvlink -s` output (the XML has no per-link NVLink state).
        #[arg(long)]
        nvlink_status: Option<PathBuf>,
        /// Also write the table as Markdown here.
        #[arg(long)]
        markdown: Option<PathBuf>,
    },
    /// Turn a health report into a fake-NVML scenario (stdout, or --out).
    /// Exit 1 when the scenario cannot reproduce everything, unless --allow-lossy.
    ToScenario {
        #[arg(long)]
        health: PathBuf,
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write the scenario even when some fields cannot be reproduced
        /// (they are listed in its header and on stderr).
        #[arg(long)]
        allow_lossy: bool,
    },
    /// Run the agent's NVML backend on a copy of the fake library playing a
    /// scenario; print the report, or compare it with a capture (exit 1 if
    /// they differ in anything but times and host facts).
    Replay {
        #[arg(long)]
        scenario: PathBuf,
        /// The fake library (target/<profile>/libnvidia_ml.so).
        #[arg(long)]
        fake_nvml: PathBuf,
        /// A captured report the replay must equal; its host id and expected
        /// GPU count are used.
        #[arg(long)]
        expect: Option<PathBuf>,
        /// Host id of the replay (without --expect).
        #[arg(long, default_value = "gpu-check")]
        host_id: String,
        /// Expected GPU count of the replay (without --expect; default: the scenario's GPUs).
        #[arg(long)]
        expected_gpus: Option<u32>,
    },
    /// Print the minimal agent config `ringfenced health --once` needs.
    AgentConfig {
        #[arg(long)]
        state_dir: PathBuf,
        /// NVML library override (default: the system's libnvidia-ml.so.1).
        #[arg(long)]
        nvml_library: Option<PathBuf>,
        #[arg(long)]
        expected_gpus: u32,
        #[arg(long, default_value = "gpu-check")]
        host_id: String,
    },
    /// Time one health collection, single NVML calls, and `nvidia-smi -q`; JSON on stdout.
    Time {
        /// Agent config (from `agent-config`).
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 20)]
        collections: u32,
        #[arg(long, default_value_t = 2.0)]
        call_seconds: f64,
        /// nvidia-smi program for the baseline; omit to skip it.
        #[arg(long)]
        smi: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        smi_runs: u32,
    },
}

/// An error that ends the command with exit 2.
type Fail = String;

fn read(path: &Path) -> Result<String, Fail> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<(), Fail> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn report(path: &Path) -> Result<(serde_json::Value, ringfence::pb::HealthReport), Fail> {
    let text = read(path)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let report = replay::parse_report(&json)
        .map_err(|e| format!("{} is not a health report: {e}", path.display()))?;
    Ok((json, report))
}

fn pretty(v: &impl serde::Serialize) -> Result<String, Fail> {
    serde_json::to_string_pretty(v).map_err(|e| e.to_string())
}

fn run(cmd: Cmd) -> Result<bool, Fail> {
    match cmd {
        Cmd::Compare {
            health,
            smi: smi_path,
            nvlink_status,
            markdown,
        } => {
            let (_, rep) = report(&health)?;
            let log = smi::parse_log(&read(&smi_path)?)
                .map_err(|e| format!("{}: {e}", smi_path.display()))?;
            let links = match &nvlink_status {
                Some(p) => Some(smi::parse_nvlink_status(&read(p)?)),
                None => None,
            };
            let c = compare::compare(&rep, &log, links.as_ref());
            print!("{}", render::render_text(&c));
            if let Some(p) = markdown {
                write(&p, &render::render_markdown(&c))?;
            }
            Ok(c.mismatches().next().is_none())
        }
        Cmd::ToScenario {
            health,
            out,
            allow_lossy,
        } => {
            let (_, rep) = report(&health)?;
            let c = convert::to_scenario(&rep, &health.display().to_string())
                .map_err(|e| e.to_string())?;
            for l in &c.losses {
                eprintln!("ringfence-gpu-check: not reproduced: {l}");
            }
            if !c.losses.is_empty() && !allow_lossy {
                eprintln!(
                    "ringfence-gpu-check: {} field(s) cannot be reproduced; no scenario written (--allow-lossy writes it anyway)",
                    c.losses.len()
                );
                return Ok(false);
            }
            match out {
                Some(p) => write(&p, &c.toml)?,
                None => print!("{}", c.toml),
            }
            Ok(true)
        }
        Cmd::Replay {
            scenario,
            fake_nvml,
            expect,
            host_id,
            expected_gpus,
        } => {
            let text = read(&scenario)?;
            let parsed = Scenario::load(&scenario).map_err(|e| e.to_string())?;
            let expected = expect.as_deref().map(report).transpose()?;
            let (host, gpus, xids) = match &expected {
                Some((_, r)) => (
                    r.host_id.clone(),
                    r.gpus_expected,
                    r.gpus.iter().map(|g| g.xids.len()).sum(),
                ),
                None => (
                    host_id,
                    expected_gpus
                        .unwrap_or_else(|| u32::try_from(parsed.gpus.len()).unwrap_or(u32::MAX)),
                    0,
                ),
            };
            let json =
                replay::replay(&text, &fake_nvml, &host, gpus, xids).map_err(|e| e.to_string())?;
            let Some((_, want)) = expected else {
                println!("{}", pretty(&json)?);
                return Ok(true);
            };
            let got = replay::parse_report(&json).map_err(|e| e.to_string())?;
            let diffs = replay::differences(&want, &got);
            for d in &diffs {
                println!("differs: {d}");
            }
            if diffs.is_empty() {
                println!("same health as the capture (times and host facts aside)");
            }
            Ok(diffs.is_empty())
        }
        Cmd::AgentConfig {
            state_dir,
            nvml_library,
            expected_gpus,
            host_id,
        } => {
            print!(
                "{}",
                replay::agent_config(&host_id, &state_dir, nvml_library.as_deref(), expected_gpus)
            );
            Ok(true)
        }
        Cmd::Time {
            config,
            collections,
            call_seconds,
            smi,
            smi_runs,
        } => {
            let t = timing::run(&timing::TimingOptions {
                config,
                collections,
                call_seconds,
                smi,
                smi_runs,
            })
            .map_err(|e| e.to_string())?;
            eprintln!("{}", timing::summary(&t));
            println!("{}", pretty(&t)?);
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FOUND),
        Err(e) => {
            eprintln!("ringfence-gpu-check: {e}");
            ExitCode::from(EXIT_INPUT)
        }
    }
}
