//! How long each step of a host's run took (`ringfence_wave_step_duration_seconds`
//! by wave, step and result). The hook is one call from the per-host state
//! machine (`crate::wave::host`), which knows nothing of a registry: the
//! histogram family is process-wide, as one `ringfence` process drives one
//! wave. This file imports nothing from the wave engine.

use std::fmt::Debug;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Upper bounds (seconds) of the buckets: from an attestation that answers
/// at once to a patch that reboots the host, or a drain that waits for jobs.
pub const STEP_BUCKETS: [f64; 14] = [
    0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
];

/// Labels of one step series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StepLabels {
    pub(super) wave_id: String,
    /// The host's phase during the step (`attest_before`, `draining`, ...).
    pub(super) step: String,
    /// `advanced` (the step did its work) or `failed` (it failed the host).
    pub(super) result: String,
}

fn histogram() -> Histogram {
    Histogram::new(STEP_BUCKETS)
}

pub(super) type StepFamily = Family<StepLabels, Histogram, fn() -> Histogram>;

pub(super) static STEPS: LazyLock<StepFamily> =
    LazyLock::new(|| StepFamily::new_with_constructor(histogram));

/// `AttestBefore` -> `attest_before`.
fn snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Hook: one step of a host's run ended after `took`; `step` is the host's
/// phase during it (its `Debug` name, written in snake case), `failed`
/// whether it failed the host.
pub fn step_finished(wave_id: &str, step: impl Debug, failed: bool, took: Duration) {
    STEPS
        .get_or_create(&StepLabels {
            wave_id: super::label_value(wave_id),
            step: snake(&format!("{step:?}")),
            result: if failed { "failed" } else { "advanced" }.to_owned(),
        })
        .observe(took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum Phase {
        AttestBefore,
        Draining,
    }

    #[test]
    fn steps_are_named_in_snake_case_and_counted_by_result() {
        let wave = "test-steps-1";
        step_finished(wave, Phase::AttestBefore, false, Duration::from_millis(30));
        step_finished(wave, Phase::Draining, true, Duration::from_secs(2));
        step_finished(wave, Phase::Draining, true, Duration::from_secs(3));
        let mut r = prometheus_client::registry::Registry::default();
        r.register("steps", "Steps", STEPS.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &r).unwrap();
        let lbl = |step: &str, result: &str| {
            format!(r#"{{wave_id="{wave}",step="{step}",result="{result}"}}"#)
        };
        for want in [
            format!("steps_count{} 1\n", lbl("attest_before", "advanced")),
            format!("steps_count{} 2\n", lbl("draining", "failed")),
            format!("steps_sum{} 5.0\n", lbl("draining", "failed")),
        ] {
            assert!(text.contains(&want), "{want} in\n{text}");
        }
        assert!(!text.contains(&lbl("draining", "advanced")), "{text}");
    }
}
