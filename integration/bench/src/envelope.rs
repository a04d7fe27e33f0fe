//! Envelope verification (issue 8 item 5): tasks verified per second through
//! all agent-side checks vs raw ed25519 `verify_strict` on the same bytes.

use std::time::Instant;

use ed25519_dalek::Signature;
use ringfence::envelope::{self, AllowAll, ReplayGuard, TASK_TYPE, TaskVerifier};
use ringfence::keys;
use ringfence::pb;
use ringfence::time::{Clock, SystemClock};
use ringfence::trust::{KeyRole, Policy, TrustSet, TrustedKey};

use crate::{Args, Figure};

/// Default seconds per measurement.
const DEFAULT_SECONDS: f64 = 3.0;

struct NoJournal;
impl ReplayGuard for NoJournal {
    fn recorded(&self, _: &str) -> Result<Option<pb::TaskStatus>, String> {
        Ok(None)
    }
    fn high_water(&self) -> Result<u64, String> {
        Ok(0)
    }
}

/// Tasks verified per second through all checks vs raw `verify_strict`
/// over the same PAE bytes.
pub fn run(args: &Args) -> Result<Vec<Figure>, String> {
    let seconds = args.seconds.unwrap_or(DEFAULT_SECONDS);
    let coord = keys::generate();
    let trust = TrustSet::from_keys(
        vec![TrustedKey {
            id: "coord".into(),
            key: coord.verifying_key(),
            role: KeyRole::Coordinator,
        }],
        Policy::default(),
    );
    let now = SystemClock.now_ms();
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
        ring: Some(1),
        clock: &SystemClock,
    };
    let vk = coord.verifying_key();
    let pae = envelope::pae(&env.payload_type, &env.payload);
    let sig = env
        .signatures
        .first()
        .ok_or("the signed task has no signature")
        .and_then(|s| Signature::from_slice(&s.sig).map_err(|_| "the signature is not 64 bytes"))?;

    let raw = rate("raw verify_strict", seconds, || {
        vk.verify_strict(&pae, &sig).is_ok()
    })?;
    let full = rate("task verification", seconds, || {
        verifier.verify(&signed, &NoJournal, &AllowAll).is_ok()
    })?;
    let ratio = full / raw;
    Ok(vec![
        Figure::info("envelope", "raw verify_strict", raw, "ops/s", "baseline"),
        Figure::info(
            "envelope",
            "task verification (6 checks)",
            full,
            "tasks/s",
            "",
        ),
        Figure::check(
            "envelope",
            "ratio tasks/raw",
            ratio,
            "x",
            ">= 0.8",
            ratio >= 0.8,
        ),
    ])
}

/// Calls per second of `f` over `seconds`; every call must succeed.
fn rate(what: &str, seconds: f64, mut f: impl FnMut() -> bool) -> Result<f64, String> {
    let mut ok = true;
    // Warm up.
    for _ in 0..200 {
        ok &= f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..100 {
            ok &= f();
        }
        n += 100;
    }
    if !ok {
        return Err(format!("{what} failed on a valid task"));
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}
