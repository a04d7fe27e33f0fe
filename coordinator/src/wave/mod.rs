//! The wave engine: carries a patch wave through the fleet ring by ring,
//! doing what the pure sequencer ([`crate::plan::next_steps`]) says and
//! persisting everything to the wave store before acting on it.
//!
//! Files by concept, each importing only from those below it (the map
//! with its import graph: `docs/layout.md`):
//!
//! | file | concept |
//! |------|---------|
//! | `commands.rs` | `run`, `resume`, `rollback_host`, [`abort`] |
//! | `drive.rs` | the drive loop: observe, ask the sequencer, carry out, persist |
//! | `runs.rs` | the host tasks the loop runs beside itself, and how they end |
//! | `soak.rs` | soak watching; its news as facts of the wave state |
//! | `driver.rs` | [`Driver`], [`Outcome`], [`WaveError`], host jobs, evidence and status writing |
//! | [`status`] | the status snapshot (`status.json`, live view) |
//! | [`events`] | [`Event`]s and the [`EventSink`] the CLI renders them with |
//! | [`host`] | the per-host state machine ([`host::run`]) |
//! | `rollback.rs` | rollback after a failed validation, the drill, [`rollback_by_hand`] |
//! | `validate.rs` | attest-before, validation, [`regressions`] |
//! | `task.rs` | task signing, write-ahead, sending, waiting |
//! | [`model`] | host records, [`Ctx`], [`Params`], [`HostJob`], [`Signer`] |
//! | [`outcome`] | [`TaskStep`], [`Stage`], [`FailureKind`], [`Failure`], [`HaltReport`], [`StepResult`] |
//!
//! Evidence packets are assembled from the model's records by
//! [`crate::evidence`]; hosts are reached through [`crate::client`].

mod commands;
mod drive;
mod driver;
pub mod events;
pub mod host;
pub mod model;
pub mod outcome;
mod rollback;
mod runs;
mod soak;
pub mod status;
mod task;
mod validate;

pub use crate::client::{Connector, TlsConnector};
pub use commands::abort;
pub use driver::{Driver, JobError, META_SPEC_TEXT, Outcome, WaveError, load_signer};
pub use events::{Event, EventSink};
pub use model::{
    AttestationRecord, Ctx, HostJob, HostRecord, HostRunError, Params, Phase, Signer, TaskOutcome,
    TaskRef, state_name,
};
pub use outcome::{Failure, FailureKind, HaltReport, Stage, StepResult, TaskStep};
pub use ringfence::attest::verdict_name;
pub use rollback::{UndrainOutcome, drain_by_hand, rollback_by_hand, undrain_by_hand};
pub use status::{RingView, StatusSnapshot};
pub use validate::regressions;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    /// The engine's files, top to bottom (`docs/layout.md`), with their text.
    const LAYERS: [(&str, &str); 13] = [
        ("commands", include_str!("commands.rs")),
        ("drive", include_str!("drive.rs")),
        ("runs", include_str!("runs.rs")),
        ("soak", include_str!("soak.rs")),
        ("driver", include_str!("driver.rs")),
        ("events", include_str!("events.rs")),
        ("status", include_str!("status.rs")),
        ("host", include_str!("host.rs")),
        ("rollback", include_str!("rollback.rs")),
        ("validate", include_str!("validate.rs")),
        ("task", include_str!("task.rs")),
        ("model", include_str!("model.rs")),
        ("outcome", include_str!("outcome.rs")),
    ];

    /// The engine files a file's code (not its comments) names.
    fn uses(text: &str) -> Vec<String> {
        let code: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut out = Vec::new();
        for prefix in ["super::", "crate::wave::"] {
            for (i, _) in code.match_indices(prefix) {
                let rest = &code[i + prefix.len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
            }
        }
        out
    }

    #[test]
    fn engine_files_import_only_downwards() {
        let names: Vec<&str> = LAYERS.iter().map(|(n, _)| *n).collect();
        for (i, (file, text)) in LAYERS.iter().enumerate() {
            for used in uses(text) {
                // `super::super` (a test module's parent) and `super::*`.
                if used == "super" || used.is_empty() {
                    continue;
                }
                let at = names.iter().position(|n| *n == used);
                assert!(
                    at.is_some_and(|j| j > i) || used == *file,
                    "wave/{file}.rs imports wave/{used}.rs, which is not below it"
                );
            }
        }
    }

    #[test]
    fn evidence_uses_only_the_model_and_report_is_never_imported_by_the_engine() {
        for (file, text) in [
            ("mod", include_str!("../evidence/mod.rs")),
            ("packet", include_str!("../evidence/packet.rs")),
            ("chain", include_str!("../evidence/chain.rs")),
            ("verify", include_str!("../evidence/verify.rs")),
            ("attestations", include_str!("../evidence/attestations.rs")),
            (
                "approval_checks",
                include_str!("../evidence/approval_checks.rs"),
            ),
        ] {
            // `super::` in evidence/ is evidence itself: only `crate::wave::` counts.
            for used in uses(&text.replace("super::", "evidence::")) {
                assert!(
                    matches!(used.as_str(), "model" | "outcome"),
                    "evidence/{file}.rs imports wave::{used}"
                );
            }
        }
        for (file, text) in LAYERS {
            let code: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect();
            assert!(
                !code.iter().any(
                    |l| l.match_indices("crate::cli").any(|(i, m)| !l[i + m.len()..]
                        .starts_with(|c: char| c.is_alphanumeric() || c == '_'))
                ),
                "wave/{file}.rs imports the CLI"
            );
        }
    }
}
