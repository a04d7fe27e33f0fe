//! `ringfence-bench`: measures what an operator and a tenant would notice,
//! each figure beside a baseline measured in the same run, printed with its
//! target and PASS/MISS, and written as JSON and a Markdown table.

mod scale;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use ed25519_dalek::Signature;
use prost::Message;
use ringfence::envelope::{self, AllowAll, ReplayGuard, TASK_TYPE, TaskVerifier};
use ringfence::keys;
use ringfence::pb;
use ringfence::time::SystemClock;
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};
use serde::Serialize;

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "ringfence-bench",
    about = "ringfence benchmarks with in-run baselines"
)]
struct Args {
    /// Which benchmarks to run (comma separated): envelope, scale.
    #[arg(long, default_value = "envelope")]
    only: String,
    /// Where to write results.json and results.md.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

/// One measured figure.
#[derive(Debug, Serialize)]
struct Figure {
    bench: String,
    name: String,
    value: f64,
    unit: String,
    target: String,
    pass: Option<bool>,
}

struct NoJournal;
impl ReplayGuard for NoJournal {
    fn recorded(&self, _: &str) -> Result<Option<pb::TaskStatus>, String> {
        Ok(None)
    }
    fn high_water(&self) -> Result<u64, String> {
        Ok(0)
    }
}

/// Tasks verified per second through all six checks vs raw `verify_strict`
/// over the same PAE bytes.
fn bench_envelope(seconds: f64) -> Vec<Figure> {
    let coord = keys::generate();
    let trust = TrustSet::from_keys(
        vec![TrustedKey {
            id: "coord".into(),
            key: coord.verifying_key(),
            role: KeyRole::Coordinator,
        }],
        Policy::default(),
    );
    let now = ringfence::time::now_ms();
    let payload = pb::TaskPayload {
        task_id: "wave/gpu-0001/7/drain".into(),
        host_id: "gpu-0001".into(),
        wave_id: "wave".into(),
        ring: 1,
        sequence: 7,
        issued_at_unix_ms: now,
        expires_at_unix_ms: now + 600_000,
        action: Some(pb::task_payload::Action::Drain(pb::Drain {
            reason: "bench".into(),
        })),
    };
    let env = envelope::sign_message(TASK_TYPE, &payload, &[("coord", &coord)]);
    let signed = pb::SignedTask {
        task: Some(env.clone()),
        approvals: Vec::new(),
    };
    let verifier = TaskVerifier {
        trust: &trust,
        host_id: "gpu-0001",
        clock: &SystemClock,
    };
    let vk = coord.verifying_key();
    let pae = envelope::pae(&env.payload_type, &env.payload);
    let sig =
        Signature::from_slice(&env.signatures[0].sig).unwrap_or(Signature::from_bytes(&[0; 64]));

    let raw = rate(seconds, || vk.verify_strict(&pae, &sig).is_ok());
    let full = rate(seconds, || {
        verifier.verify(&signed, &NoJournal, &AllowAll).is_ok()
    });
    let ratio = full / raw;
    let _ = payload.encoded_len();
    vec![
        Figure {
            bench: "envelope".into(),
            name: "raw verify_strict".into(),
            value: raw,
            unit: "ops/s".into(),
            target: "baseline".into(),
            pass: None,
        },
        Figure {
            bench: "envelope".into(),
            name: "task verification (6 checks)".into(),
            value: full,
            unit: "tasks/s".into(),
            target: String::new(),
            pass: None,
        },
        Figure {
            bench: "envelope".into(),
            name: "ratio tasks/raw".into(),
            value: ratio,
            unit: "x".into(),
            target: ">= 0.8".into(),
            pass: Some(ratio >= 0.8),
        },
    ]
}

/// Calls per second of `f` over `seconds` (every call must succeed).
fn rate(seconds: f64, mut f: impl FnMut() -> bool) -> f64 {
    // Warm up.
    for _ in 0..200 {
        let _ = f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    let mut ok = true;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..100 {
            ok &= f();
        }
        n += 100;
    }
    if !ok {
        return 0.0;
    }
    n as f64 / start.elapsed().as_secs_f64()
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

fn main() -> ExitCode {
    let args = Args::parse();
    let mut figures = Vec::new();
    for bench in args.only.split(',').map(str::trim) {
        match bench {
            "envelope" => figures.extend(bench_envelope(args.seconds)),
            "scale" => match scale::host_count().and_then(scale::run) {
                Ok(f) => figures.extend(f),
                Err(e) => {
                    eprintln!("ringfence-bench: scale: {e}");
                    return ExitCode::from(1);
                }
            },
            other => {
                eprintln!("ringfence-bench: unknown benchmark `{other}` (known: envelope, scale)");
                return ExitCode::from(2);
            }
        }
    }
    let md = markdown(&figures);
    print!("{md}");
    if let Err(e) = std::fs::create_dir_all(&args.out)
        .and_then(|()| std::fs::write(args.out.join("results.md"), &md))
        .and_then(|()| {
            std::fs::write(
                args.out.join("results.json"),
                serde_json::to_vec_pretty(&figures).unwrap_or_default(),
            )
        })
    {
        eprintln!(
            "ringfence-bench: cannot write results to {}: {e}",
            args.out.display()
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
