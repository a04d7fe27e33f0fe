//! The comparison: every field of the agent's health report beside what
//! nvidia-smi says about it, one row per field per GPU, each judged match,
//! mismatch or not comparable (with the reason). GPUs are paired by uuid
//! (by PCI bus id when nvidia-smi has no uuid).
//!
//! Live readings are compared within a tolerance, because the two tools read
//! them moments apart: temperature within [`TEMPERATURE_TOLERANCE_C`], power
//! draw within [`POWER_DRAW_TOLERANCE_MW`] or [`POWER_DRAW_TOLERANCE_REL`] of
//! nvidia-smi's value (whichever is larger), process memory within 1 MiB.
//! Everything else must be equal. A field the agent reports as NotSupported
//! matches nvidia-smi's "N/A" / "Not Supported"; a value on one side and
//! "N/A" on the other is a mismatch.

use std::collections::BTreeMap;

use ringfence::pb;

mod fields;
mod judge;
mod lists;

use crate::smi::{NvLinkStatus, Reading, SmiGpu, SmiLog};
use fields::gpu_rows;
use judge::{Ours, count, exact, judge};

/// Degrees C the GPU temperature may move between the two reads.
pub const TEMPERATURE_TOLERANCE_C: u64 = 3;
/// Milliwatts the power draw may move between the two reads...
pub const POWER_DRAW_TOLERANCE_MW: u64 = 10_000;
/// ...or this fraction of nvidia-smi's reading, whichever is larger.
pub const POWER_DRAW_TOLERANCE_REL: f64 = 0.10;

/// The judgement of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Equal (the text says how, when not plainly: "within ±3 C", "both not supported").
    Match(String),
    /// Different; the text says how.
    Mismatch(String),
    /// Cannot be judged from these captures; the text says why.
    NotComparable(String),
}

/// One field of one GPU (or of the host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `"host"` or `"gpu<index>"` (the agent's index; nvidia-smi's own GPUs
    /// that the agent lacks are named by their bus id).
    pub gpu: String,
    /// The agent's field name (`HealthReport` / `GpuReport`).
    pub field: String,
    /// The value the agent reported, as text.
    pub ours: String,
    /// The value nvidia-smi reported, as text.
    pub theirs: String,
    /// Whether the two agree, with the reason.
    pub outcome: Outcome,
}

/// All rows of one comparison.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Comparison {
    /// One row per compared field, host fields first, then GPU by GPU.
    pub rows: Vec<Row>,
}

impl Comparison {
    /// Rows that are mismatches.
    pub fn mismatches(&self) -> impl Iterator<Item = &Row> {
        self.rows
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Mismatch(_)))
    }

    /// The row of `field` on `gpu`, if any.
    pub fn row(&self, gpu: &str, field: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.gpu == gpu && r.field == field)
    }

    /// Counts of (match, mismatch, not comparable).
    pub fn counts(&self) -> (usize, usize, usize) {
        self.rows
            .iter()
            .fold((0, 0, 0), |(m, x, n), r| match r.outcome {
                Outcome::Match(_) => (m + 1, x, n),
                Outcome::Mismatch(_) => (m, x + 1, n),
                Outcome::NotComparable(_) => (m, x, n + 1),
            })
    }
}

/// Pairs each GPU of the report with nvidia-smi's by uuid, else by bus id.
fn pair(ours: &pb::GpuReport, smi: &[SmiGpu]) -> Option<usize> {
    smi.iter()
        .position(|s| s.uuid.value() == Some(ours.uuid.as_str()))
        .or_else(|| {
            smi.iter().position(|s| {
                s.pci_bus_id
                    .value()
                    .is_some_and(|b| b.eq_ignore_ascii_case(&ours.pci_bus_id))
            })
        })
}

/// Compares a health report with nvidia-smi's XML log and, when given, its
/// `nvlink -s` status (keyed by uuid).
pub fn compare(
    report: &pb::HealthReport,
    smi: &SmiLog,
    nvlink: Option<&BTreeMap<String, NvLinkStatus>>,
) -> Comparison {
    let mut rows = Vec::new();
    let host = |field: &str, ours: String, theirs: &Reading, outcome: Outcome| Row {
        gpu: "host".to_owned(),
        field: field.to_owned(),
        ours,
        theirs: theirs.display(),
        outcome,
    };
    let text_outcome = |ours: &str, theirs: &Reading| {
        let o = if ours.is_empty() {
            Ours::Failed
        } else {
            Ours::Value(ours.to_owned())
        };
        judge(&o, theirs, |t| Some(t.to_owned()), exact)
    };
    rows.push(host(
        "driver_version",
        report.driver_version.clone(),
        &smi.driver_version,
        text_outcome(&report.driver_version, &smi.driver_version),
    ));
    rows.push(host(
        "cuda_driver_version",
        report.cuda_driver_version.clone(),
        &smi.cuda_version,
        text_outcome(&report.cuda_driver_version, &smi.cuda_version),
    ));
    rows.push(host(
        "gpus_found",
        report.gpus_found.to_string(),
        &smi.attached_gpus,
        judge(
            &Ours::Value(u64::from(report.gpus_found)),
            &smi.attached_gpus,
            count,
            exact,
        ),
    ));
    let mut paired = vec![false; smi.gpus.len()];
    for g in &report.gpus {
        let label = format!("gpu{}", g.index);
        match pair(g, &smi.gpus) {
            Some(i) => {
                paired[i] = true;
                rows.extend(gpu_rows(label, g, &smi.gpus[i], nvlink));
            }
            None => rows.push(Row {
                gpu: label,
                field: "gpu".to_owned(),
                ours: format!("{} {}", g.uuid, g.pci_bus_id),
                theirs: "(not listed)".to_owned(),
                outcome: Outcome::Mismatch("nvidia-smi does not list this GPU".to_owned()),
            }),
        }
    }
    for (s, _) in smi.gpus.iter().zip(&paired).filter(|(_, p)| !**p) {
        rows.push(Row {
            gpu: s.id.clone(),
            field: "gpu".to_owned(),
            ours: "(not reported)".to_owned(),
            theirs: s.uuid.display(),
            outcome: Outcome::Mismatch("the agent does not report this GPU".to_owned()),
        });
    }
    Comparison { rows }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::smi::{parse_log, parse_nvlink_status};

    const XML: &str = "<nvidia_smi_log><driver_version>550.54.15</driver_version>\
        <gpu id=\"00000000:18:00.0\"><uuid>GPU-a</uuid></gpu></nvidia_smi_log>";

    fn report(links: &[bool]) -> pb::HealthReport {
        pb::HealthReport {
            driver_version: "550.54.15".into(),
            gpus: vec![pb::GpuReport {
                uuid: "GPU-a".into(),
                nvlinks: links
                    .iter()
                    .enumerate()
                    .map(|(i, a)| pb::NvLink {
                        link: u32::try_from(i).unwrap(),
                        active: *a,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn nvlink_outcome(links: &[bool], status: &str) -> Outcome {
        let log = parse_log(XML).unwrap();
        let status = parse_nvlink_status(status);
        let c = compare(&report(links), &log, Some(&status));
        c.row("gpu0", "nvlinks").unwrap().outcome.clone()
    }

    #[test]
    fn nvlink_states_from_nvlink_status() {
        let all_down = "GPU 0: X (UUID: GPU-a)\nNVML: Unable to retrieve NVLink information as all links are inActive\n";
        assert!(matches!(
            nvlink_outcome(&[false, false], all_down),
            Outcome::Match(_)
        ));
        assert!(matches!(
            nvlink_outcome(&[false, true], all_down),
            Outcome::Mismatch(_)
        ));
        let listed = "GPU 0: X (UUID: GPU-a)\n\t Link 0: <inactive>\n\t Link 1: 26.562 GB/s\n";
        assert_eq!(
            nvlink_outcome(&[false, true], listed),
            Outcome::Match(String::new())
        );
        assert!(matches!(
            nvlink_outcome(&[true, true], listed),
            Outcome::Mismatch(_)
        ));
        // Another GPU's section only: ours has links, nvidia-smi does not list this GPU.
        assert!(matches!(
            nvlink_outcome(&[true], "GPU 1: X (UUID: GPU-b)\n"),
            Outcome::Mismatch(_)
        ));
        assert!(matches!(
            nvlink_outcome(&[], "GPU 1: X (UUID: GPU-b)\n"),
            Outcome::Match(_)
        ));
    }
}
