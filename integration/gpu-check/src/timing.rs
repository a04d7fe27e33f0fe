//! Timing on the GPU host, all in one run: one full health collection for
//! all GPUs (the agent's `CollectorSource`, as the poll loop and
//! `health --once` run it; the first one, which initialises NVML, apart),
//! the rate of single NVML calls (`nvmlDeviceGetTemperature`, round robin
//! over the GPUs, through nvml-wrapper), and, as the baseline, how long one
//! `nvidia-smi -q` process takes from spawn to exit.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use ringfenced::config::AgentConfig;
use ringfenced::healthcell::ReportSource;
use serde::Serialize;

/// What to run, how often.
#[derive(Debug, Clone)]
pub struct TimingOptions {
    /// The agent config (`agent-config`): NVML library and GPU count.
    pub config: PathBuf,
    /// Timed health collections after the first.
    pub collections: u32,
    /// Seconds of single NVML calls.
    pub call_seconds: f64,
    /// The nvidia-smi program; `None` skips the baseline.
    pub smi: Option<PathBuf>,
    /// `nvidia-smi -q` runs.
    pub smi_runs: u32,
}

/// Milliseconds over several runs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stats {
    /// How many runs were timed.
    pub runs: usize,
    /// Arithmetic mean.
    pub mean_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Middle run (the upper one of an even count).
    pub median_ms: f64,
    /// Slowest run.
    pub max_ms: f64,
}

impl Stats {
    fn of(samples: &[Duration]) -> Option<Self> {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let (first, last) = (*ms.first()?, *ms.last()?);
        Some(Self {
            runs: n,
            mean_ms: ms.iter().sum::<f64>() / n as f64,
            min_ms: first,
            median_ms: ms[n / 2],
            max_ms: last,
        })
    }
}

/// Single NVML calls.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CallRate {
    /// The NVML function called in a loop over every GPU.
    pub function: &'static str,
    /// Calls made.
    pub calls: u64,
    /// Calls that returned an error (counted in `calls` too).
    pub failed: u64,
    /// Wall time the loop ran.
    pub seconds: f64,
    /// `calls / seconds`.
    pub calls_per_s: f64,
    /// Mean milliseconds per call.
    pub ms_per_call: f64,
}

/// The whole timing run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Timing {
    /// GPUs NVML reported.
    pub gpus: u32,
    /// The first collection, NVML initialisation included.
    pub first_collection_ms: f64,
    /// Each later collection of every GPU (NVML already initialised).
    pub collection: Stats,
    /// Raw NVML call rate, without the agent's collector around it.
    pub nvml_calls: CallRate,
    /// `nvidia-smi -q` from spawn to exit...
    pub nvidia_smi_q: Option<Stats>,
    /// ...or why it could not run.
    pub nvidia_smi_error: Option<String>,
    /// nvidia-smi's mean over the mean collection (how many times slower the baseline is).
    pub smi_over_collection: Option<f64>,
    /// nvidia-smi's mean over one NVML call.
    pub smi_over_call: Option<f64>,
}

/// Timing errors.
#[derive(Debug, thiserror::Error)]
pub enum TimingError {
    /// "{0}" (config or collector)
    #[error("{0}")]
    Start(#[from] crate::replay::ReplayError),
    /// "NVML: {0}"
    #[error("NVML: {0}")]
    Nvml(#[from] nvml_wrapper::error::NvmlError),
    /// "no GPU to call NVML on"
    #[error("no GPU to call NVML on")]
    NoGpu,
}

fn call_rate(library: Option<&Path>, seconds: f64) -> Result<(u32, CallRate), TimingError> {
    let mut builder = Nvml::builder();
    if let Some(p) = library {
        builder.lib_path(OsStr::new(p.as_os_str()));
    }
    let nvml = builder.init()?;
    let count = nvml.device_count()?;
    let devices = (0..count)
        .map(|i| nvml.device_by_index(i))
        .collect::<Result<Vec<_>, _>>()?;
    if devices.is_empty() {
        return Err(TimingError::NoGpu);
    }
    let budget = Duration::from_secs_f64(seconds.max(0.01));
    let (mut calls, mut failed) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < budget {
        for d in &devices {
            if d.temperature(TemperatureSensor::Gpu).is_err() {
                failed += 1;
            }
            calls += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok((
        count,
        CallRate {
            function: "nvmlDeviceGetTemperature",
            calls,
            failed,
            seconds: elapsed,
            calls_per_s: calls as f64 / elapsed,
            ms_per_call: elapsed * 1e3 / calls as f64,
        },
    ))
}

fn smi_runs(smi: &Path, runs: u32) -> Result<Stats, String> {
    let mut samples = Vec::new();
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let status = Command::new(smi)
            .arg("-q")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {} -q: {e}", smi.display()))?;
        samples.push(start.elapsed());
        if !status.success() {
            return Err(format!("{} -q exited with {status}", smi.display()));
        }
    }
    Stats::of(&samples).ok_or_else(|| "no runs".to_owned())
}

/// Runs every measurement.
pub fn run(opts: &TimingOptions) -> Result<Timing, TimingError> {
    let config = AgentConfig::load(&opts.config)
        .map_err(|e| crate::replay::ReplayError::Config(e.to_string()))?;
    let started = Instant::now();
    let source = crate::replay::start(&opts.config)?;
    source.collect(false);
    let first = started.elapsed();
    let mut samples = Vec::new();
    for _ in 0..opts.collections.max(1) {
        let t = Instant::now();
        source.collect(false);
        samples.push(t.elapsed());
    }
    drop(source);
    let collection = Stats::of(&samples).ok_or(TimingError::NoGpu)?;
    let (gpus, nvml_calls) = call_rate(config.gpu.nvml_library.as_deref(), opts.call_seconds)?;
    let smi = match &opts.smi {
        Some(smi) => smi_runs(smi, opts.smi_runs),
        None => Err("not run (no nvidia-smi given)".to_owned()),
    };
    let ratio = |d: f64| smi.as_ref().ok().map(|s| s.mean_ms / d);
    Ok(Timing {
        gpus,
        first_collection_ms: first.as_secs_f64() * 1e3,
        smi_over_collection: ratio(collection.mean_ms),
        smi_over_call: ratio(nvml_calls.ms_per_call),
        collection,
        nvml_calls,
        nvidia_smi_error: smi.as_ref().err().cloned(),
        nvidia_smi_q: smi.ok(),
    })
}

/// One line for a person.
pub fn summary(t: &Timing) -> String {
    let smi = match (&t.nvidia_smi_q, &t.nvidia_smi_error) {
        (Some(s), _) => format!(
            "nvidia-smi -q {:.1} ms per spawn (mean of {})",
            s.mean_ms, s.runs
        ),
        (None, e) => format!("nvidia-smi -q: {}", e.as_deref().unwrap_or("not run")),
    };
    format!(
        "{} GPU(s): one health collection {:.3} ms (mean of {}; first, with NVML init, {:.1} ms); \
         NVML {:.0} calls/s ({:.4} ms per call); {smi}",
        t.gpus,
        t.collection.mean_ms,
        t.collection.runs,
        t.first_collection_ms,
        t.nvml_calls.calls_per_s,
        t.nvml_calls.ms_per_call,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stats_of_samples() {
        let s = Stats::of(&[3, 1, 2].map(Duration::from_millis)).unwrap();
        assert_eq!(
            (s.runs, s.min_ms, s.median_ms, s.max_ms),
            (3, 1.0, 2.0, 3.0)
        );
        assert!((s.mean_ms - 2.0).abs() < 1e-9);
        assert_eq!(Stats::of(&[]), None);
    }

    #[test]
    fn a_missing_nvidia_smi_is_reported_not_fatal() {
        let e = smi_runs(Path::new("/nonexistent/nvidia-smi"), 2).unwrap_err();
        assert!(e.contains("cannot run /nonexistent/nvidia-smi -q"), "{e}");
    }
}
