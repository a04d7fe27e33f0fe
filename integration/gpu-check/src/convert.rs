//! A health report (`ringfenced health --once --json`) turned into a
//! fake-NVML scenario (integration/fake-nvml/README.md), so that a GPU
//! captured on real hardware becomes a fixture the agent's NVML backend can
//! replay on the fake library.
//!
//! Every `GpuReport` value becomes the scenario key of the same name; fields
//! the report lists in `unsupported` go to the scenario's `unsupported`;
//! NVLinks and processes become `nvlinks` / `processes` entries; XID events
//! become `[[xid]]` entries due at load (`at_s = 0`). What the fake library
//! cannot reproduce is returned as a [`Loss`] rather than silently dropped:
//! a field that is absent without being unsupported (a failed NVML query),
//! an NVLink error counter the GPU did not report, a GPU whose NVLink query
//! failed, a report without NVML.

use ringfence::pb;
use ringfenced::gpu::sim::scenario::Scenario;
use serde_json::Value;
use toml_edit::{Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value as TomlValue};

/// GpuReport fields that are not scenario keys of the same name.
const NOT_SCENARIO_KEYS: &[&str] = &[
    "index",
    "throttle_reasons",
    "nvlinks",
    "processes",
    "xids",
    "unsupported",
];

/// Something of the report the scenario cannot reproduce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// GPU index, `None` for the host.
    pub gpu: Option<u32>,
    /// The report's field name.
    pub field: String,
    /// Why the scenario cannot carry it.
    pub why: String,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.gpu {
            Some(g) => write!(f, "gpu {g} {}: {}", self.field, self.why),
            None => write!(f, "{}: {}", self.field, self.why),
        }
    }
}

/// A scenario and what it could not carry.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// Scenario TOML text, with a header comment naming its source.
    pub toml: String,
    /// The same scenario, parsed back with the fake library's own parser.
    pub scenario: Scenario,
    /// Every report field the scenario could not reproduce.
    pub losses: Vec<Loss>,
}

/// Conversion errors.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// "the report has no NVML data ({0}); there is nothing to replay"
    #[error("the report has no NVML data ({0}); there is nothing to replay")]
    NoNvml(String),
    /// "cannot convert the report: {0}"
    #[error("cannot convert the report: {0}")]
    Value(String),
    /// "the scenario written is not one the fake library reads: {0}"
    #[error("the scenario written is not one the fake library reads: {0}")]
    Invalid(String),
}

/// A JSON scalar of the report as a TOML value.
fn scalar(key: &str, v: &Value) -> Result<TomlValue, ConvertError> {
    match v {
        Value::Bool(b) => Ok(TomlValue::from(*b)),
        Value::String(s) => Ok(TomlValue::from(s.as_str())),
        Value::Number(n) => n
            .as_i64()
            .map(TomlValue::from)
            .ok_or_else(|| ConvertError::Value(format!("{key} = {n} does not fit a TOML integer"))),
        other => Err(ConvertError::Value(format!(
            "{key} = {other} is not a scalar"
        ))),
    }
}

fn int(key: &str, n: u64) -> Result<TomlValue, ConvertError> {
    scalar(key, &Value::from(n))
}

/// An array with one element per line (`nvlinks`, `processes`).
fn one_per_line(items: Vec<InlineTable>) -> TomlValue {
    let mut a = Array::new();
    let many = items.len() > 1;
    for item in items {
        a.push(item);
    }
    if many {
        for v in a.iter_mut() {
            v.decor_mut().set_prefix("\n    ");
        }
        a.set_trailing("\n");
        a.set_trailing_comma(true);
    }
    TomlValue::Array(a)
}

/// Identity first, then the rest in the report's (alphabetical) order.
const FIRST_KEYS: &[&str] = &["uuid", "name", "serial", "pci_bus_id"];

/// The scenario table of one GPU.
fn gpu_table(g: &pb::GpuReport, losses: &mut Vec<Loss>) -> Result<Table, ConvertError> {
    let lose = |losses: &mut Vec<Loss>, field: &str, why: &str| {
        losses.push(Loss {
            gpu: Some(g.index),
            field: field.to_owned(),
            why: why.to_owned(),
        });
    };
    let json = serde_json::to_value(g).map_err(|e| ConvertError::Value(e.to_string()))?;
    let Value::Object(fields) = json else {
        return Err(ConvertError::Value("a GPU is not a JSON object".to_owned()));
    };
    let mut keys: Vec<&String> = fields
        .keys()
        .filter(|k| !NOT_SCENARIO_KEYS.contains(&k.as_str()))
        .collect();
    keys.sort_by_key(|k| {
        FIRST_KEYS
            .iter()
            .position(|f| f == k)
            .unwrap_or(FIRST_KEYS.len())
    });
    let mut t = Table::new();
    for key in keys {
        let unsupported = g.unsupported.iter().any(|u| u == key);
        match &fields[key] {
            Value::Null if unsupported => {}
            Value::Null => lose(
                losses,
                key,
                "absent but not NotSupported (the NVML query failed); the fake can only answer a value or NotSupported",
            ),
            Value::String(s) if s.is_empty() && unsupported => {}
            v => {
                t.insert(key, Item::Value(scalar(key, v)?));
            }
        }
    }
    if g.unsupported.iter().any(|u| u == "nvlinks") {
        if !g.nvlinks.is_empty() {
            lose(
                losses,
                "nvlinks",
                "links listed although NVLink is NotSupported",
            );
        }
    } else if g.nvlinks.is_empty() {
        lose(
            losses,
            "nvlinks",
            "no links and not NotSupported (the NVLink query failed); the fake answers NotSupported for a GPU without links",
        );
    } else {
        let mut links = Vec::new();
        for (i, l) in g.nvlinks.iter().enumerate() {
            if usize::try_from(l.link).ok() != Some(i) {
                lose(
                    losses,
                    "nvlinks",
                    "link numbers are not 0, 1, 2, ...: the fake numbers links by position",
                );
            }
            let mut link = InlineTable::new();
            link.insert("active", TomlValue::from(l.active));
            for (name, counter) in [
                ("replay_errors", l.replay_errors),
                ("recovery_errors", l.recovery_errors),
                ("crc_flit_errors", l.crc_flit_errors),
            ] {
                match counter {
                    Some(n) => {
                        link.insert(name, int(name, n)?);
                    }
                    None => lose(
                        losses,
                        &format!("nvlinks[{}].{name}", l.link),
                        "not reported; the fake always answers the counter",
                    ),
                }
            }
            links.push(link);
        }
        t.insert("nvlinks", Item::Value(one_per_line(links)));
    }
    if !g.unsupported.iter().any(|u| u == "processes") {
        let mut procs = Vec::new();
        for p in &g.processes {
            let mut proc = InlineTable::new();
            proc.insert("pid", TomlValue::from(i64::from(p.pid)));
            proc.insert(
                "used_memory_bytes",
                int("used_memory_bytes", p.used_memory_bytes)?,
            );
            procs.push(proc);
        }
        t.insert("processes", Item::Value(one_per_line(procs)));
    }
    if !g.unsupported.is_empty() {
        let list: Array = g.unsupported.iter().map(String::as_str).collect();
        t.insert("unsupported", Item::Value(TomlValue::Array(list)));
    }
    Ok(t)
}

/// Converts a report. `source` names where it came from (the header comment).
pub fn to_scenario(report: &pb::HealthReport, source: &str) -> Result<Conversion, ConvertError> {
    if let Some(r) = report.reasons.iter().find(|r| r.code == "nvml_unavailable") {
        return Err(ConvertError::NoNvml(r.message.clone()));
    }
    let mut losses = Vec::new();
    for r in report
        .reasons
        .iter()
        .filter(|r| r.code == "nvml_query_failed")
    {
        losses.push(Loss {
            gpu: None,
            field: "reasons".to_owned(),
            why: format!(
                "an NVML query failed ({}); the fake cannot fail one",
                r.message
            ),
        });
    }
    let mut doc = DocumentMut::new();
    doc.insert(
        "driver_version",
        toml_edit::value(report.driver_version.as_str()),
    );
    doc.insert(
        "cuda_driver_version",
        toml_edit::value(report.cuda_driver_version.as_str()),
    );
    let mut gpus = ArrayOfTables::new();
    for (i, g) in report.gpus.iter().enumerate() {
        if usize::try_from(g.index).ok() != Some(i) {
            losses.push(Loss {
                gpu: Some(g.index),
                field: "index".to_owned(),
                why: "GPU indexes are not 0, 1, 2, ...: the fake numbers GPUs by position"
                    .to_owned(),
            });
        }
        gpus.push(gpu_table(g, &mut losses)?);
    }
    doc.insert("gpu", Item::ArrayOfTables(gpus));
    let mut xids = ArrayOfTables::new();
    for g in &report.gpus {
        for x in &g.xids {
            let mut t = Table::new();
            t.insert("gpu", toml_edit::value(i64::from(g.index)));
            t.insert("xid", Item::Value(int("xid", x.xid)?));
            t.insert("at_s", toml_edit::value(0.0));
            xids.push(t);
        }
    }
    if !xids.is_empty() {
        doc.insert("xid", Item::ArrayOfTables(xids));
    }
    let mut header = format!(
        "# fake-NVML scenario written by `ringfence-gpu-check to-scenario` from {source}\n\
         # host {}, {} GPU(s), collected at {} ms since the epoch, agent {}\n",
        report.host_id,
        report.gpus.len(),
        report.collected_at_unix_ms,
        report.agent_version
    );
    for l in &losses {
        header.push_str(&format!("# NOT REPRODUCED: {l}\n"));
    }
    let toml = format!("{header}\n{doc}");
    let scenario: Scenario =
        toml::from_str(&toml).map_err(|e: toml::de::Error| ConvertError::Invalid(e.to_string()))?;
    Ok(Conversion {
        toml,
        scenario,
        losses,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A GPU with every field answered, NVLink and processes NotSupported.
    fn gpu(index: u32) -> pb::GpuReport {
        pb::GpuReport {
            index,
            uuid: format!("GPU-{index}"),
            name: "NVIDIA H100 80GB HBM3".into(),
            serial: "1".into(),
            pci_bus_id: "00000000:18:00.0".into(),
            ecc_volatile_corrected: Some(1),
            ecc_volatile_uncorrected: Some(0),
            ecc_aggregate_corrected: Some(7),
            ecc_aggregate_uncorrected: Some(0),
            retired_pages_single_bit: Some(0),
            retired_pages_double_bit: Some(0),
            retired_pages_pending: Some(false),
            remapped_rows_correctable: Some(0),
            remapped_rows_uncorrectable: Some(0),
            remapped_rows_pending: Some(false),
            remapped_rows_failure: Some(false),
            temperature_c: Some(40),
            temperature_slowdown_c: Some(87),
            temperature_shutdown_c: Some(92),
            throttle_reasons_mask: Some(0),
            power_usage_mw: Some(70_000),
            power_limit_mw: Some(700_000),
            pcie_link_gen_current: Some(5),
            pcie_link_gen_max: Some(5),
            pcie_link_width_current: Some(16),
            pcie_link_width_max: Some(16),
            pcie_replay_counter: Some(0),
            unsupported: vec!["nvlinks".into(), "processes".into()],
            ..Default::default()
        }
    }

    #[test]
    fn values_unsupported_and_xids_carry_over() {
        let mut g = gpu(0);
        g.throttle_reasons_mask = Some(0x88);
        g.retired_pages_pending = None;
        g.unsupported.push("retired_pages_pending".into());
        g.xids.push(pb::XidEvent {
            xid: 79,
            at_unix_ms: 5,
            boot_id: "b".into(),
        });
        let report = pb::HealthReport {
            driver_version: "550.54.15".into(),
            cuda_driver_version: "12.4".into(),
            gpus: vec![g],
            ..Default::default()
        };
        let c = to_scenario(&report, "test").unwrap();
        assert!(c.losses.is_empty(), "{:?}", c.losses);
        let s = &c.scenario;
        assert_eq!(s.driver_version, "550.54.15");
        assert_eq!(s.gpus[0].temperature_c, Some(40));
        assert_eq!(s.gpus[0].throttle_reasons_mask, Some(0x88));
        assert_eq!(s.gpus[0].uuid.as_deref(), Some("GPU-0"));
        assert_eq!(s.gpus[0].nvlinks, None);
        assert!(
            s.gpus[0]
                .unsupported
                .as_ref()
                .unwrap()
                .contains(&"retired_pages_pending".to_owned())
        );
        assert_eq!(s.xid.len(), 1);
        assert_eq!(
            (s.xid[0].gpu, s.xid[0].xid, s.xid[0].at_s),
            (0, 79, Some(0.0))
        );
        assert!(c.toml.starts_with("# fake-NVML scenario"));
    }

    #[test]
    fn what_the_fake_cannot_answer_is_a_loss() {
        let mut g = gpu(0);
        // Absent but not unsupported: the query failed.
        g.temperature_c = None;
        g.unsupported.retain(|u| u != "nvlinks");
        g.nvlinks.push(pb::NvLink {
            link: 0,
            active: true,
            replay_errors: Some(1),
            recovery_errors: None,
            crc_flit_errors: Some(0),
        });
        let report = pb::HealthReport {
            gpus: vec![g],
            ..Default::default()
        };
        let c = to_scenario(&report, "test").unwrap();
        let fields: Vec<&str> = c.losses.iter().map(|l| l.field.as_str()).collect();
        assert_eq!(fields, ["temperature_c", "nvlinks[0].recovery_errors"]);
        assert!(c.toml.contains("# NOT REPRODUCED: gpu 0 temperature_c"));
    }

    #[test]
    fn a_report_without_nvml_is_refused() {
        let report = pb::HealthReport {
            reasons: vec![pb::Reason {
                code: "nvml_unavailable".into(),
                message: "NVML init failed".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(matches!(
            to_scenario(&report, "x"),
            Err(ConvertError::NoNvml(m)) if m == "NVML init failed"
        ));
    }
}
