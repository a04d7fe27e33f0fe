//! The rows of one GPU: identity, ECC, retired pages, remapped rows,
//! temperatures, power, PCIe, then the list-valued fields (`lists`).

use std::collections::BTreeMap;
use std::fmt::Display;

use ringfence::pb;

use super::judge::{
    Ours, count, exact, judge, leading_u64, power_draw_close, power_limit_close, watts_to_mw,
    within, yes_no,
};
use super::lists::{nvlink_rows, processes_row, throttle_row};
use super::{Outcome, Row, TEMPERATURE_TOLERANCE_C};
use crate::smi::{NvLinkStatus, Reading, SmiGpu};

/// The rows of one GPU pair, as they are built.
pub(super) struct GpuRows<'a> {
    pub(super) label: String,
    pub(super) ours: &'a pb::GpuReport,
    pub(super) theirs: &'a SmiGpu,
    pub(super) rows: Vec<Row>,
}

impl GpuRows<'_> {
    /// Adds a row of this GPU.
    pub(super) fn row(&mut self, field: &str, ours: String, theirs: String, outcome: Outcome) {
        self.rows.push(Row {
            gpu: self.label.clone(),
            field: field.to_owned(),
            ours,
            theirs,
            outcome,
        });
    }

    pub(super) fn push(&mut self, field: &str, ours: String, theirs: &Reading, outcome: Outcome) {
        self.row(field, ours, theirs.display(), outcome);
    }

    pub(super) fn text(&mut self, field: &str, ours: &str, theirs: &Reading) {
        let value = if ours.is_empty() {
            Ours::Failed
        } else {
            Ours::Value(ours.to_owned())
        };
        let outcome = judge(&value, theirs, |t| Some(t.to_owned()), exact);
        self.push(field, ours.to_owned(), theirs, outcome);
    }

    fn number<T: Display + Copy>(
        &mut self,
        field: &str,
        ours: Option<T>,
        unit: &str,
        theirs: &Reading,
        parse: impl Fn(&str) -> Option<T>,
        same: impl Fn(&T, &T) -> Result<String, String>,
    ) {
        let o = Ours::of(ours, self.ours, field);
        let outcome = judge(&o, theirs, parse, same);
        self.push(field, o.display(unit), theirs, outcome);
    }

    pub(super) fn count(&mut self, field: &str, ours: Option<u64>, theirs: &Reading) {
        self.number(field, ours, "", theirs, count, exact);
    }

    pub(super) fn flag(&mut self, field: &str, ours: Option<bool>, theirs: &Reading) {
        self.number(field, ours, "", theirs, yes_no, exact);
    }
}

/// Every row of one GPU pair.
pub(super) fn gpu_rows(
    label: String,
    ours: &pb::GpuReport,
    theirs: &SmiGpu,
    nvlink: Option<&BTreeMap<String, NvLinkStatus>>,
) -> Vec<Row> {
    let mut g = GpuRows {
        label,
        ours,
        theirs,
        rows: Vec::new(),
    };
    let t = theirs;
    g.text("uuid", &ours.uuid, &t.uuid);
    g.text("name", &ours.name, &t.name);
    if ours.unsupported.iter().any(|u| u == "serial") {
        g.number::<u64>("serial", None, "", &t.serial, |_| None, exact);
    } else {
        g.text("serial", &ours.serial, &t.serial);
    }
    g.text("pci_bus_id", &ours.pci_bus_id, &t.pci_bus_id);
    g.count(
        "ecc_volatile_corrected",
        ours.ecc_volatile_corrected,
        &t.ecc_volatile_corrected,
    );
    g.count(
        "ecc_volatile_uncorrected",
        ours.ecc_volatile_uncorrected,
        &t.ecc_volatile_uncorrected,
    );
    g.count(
        "ecc_aggregate_corrected",
        ours.ecc_aggregate_corrected,
        &t.ecc_aggregate_corrected,
    );
    g.count(
        "ecc_aggregate_uncorrected",
        ours.ecc_aggregate_uncorrected,
        &t.ecc_aggregate_uncorrected,
    );
    g.count(
        "retired_pages_single_bit",
        ours.retired_pages_single_bit.map(u64::from),
        &t.retired_pages_single_bit,
    );
    g.count(
        "retired_pages_double_bit",
        ours.retired_pages_double_bit.map(u64::from),
        &t.retired_pages_double_bit,
    );
    g.flag(
        "retired_pages_pending",
        ours.retired_pages_pending,
        &t.retired_pages_pending,
    );
    g.count(
        "remapped_rows_correctable",
        ours.remapped_rows_correctable.map(u64::from),
        &t.remapped_rows_correctable,
    );
    g.count(
        "remapped_rows_uncorrectable",
        ours.remapped_rows_uncorrectable.map(u64::from),
        &t.remapped_rows_uncorrectable,
    );
    g.flag(
        "remapped_rows_pending",
        ours.remapped_rows_pending,
        &t.remapped_rows_pending,
    );
    g.flag(
        "remapped_rows_failure",
        ours.remapped_rows_failure,
        &t.remapped_rows_failure,
    );
    g.number(
        "temperature_c",
        ours.temperature_c.map(u64::from),
        " C",
        &t.temperature_c,
        leading_u64,
        within(TEMPERATURE_TOLERANCE_C, " C"),
    );
    g.number(
        "temperature_slowdown_c",
        ours.temperature_slowdown_c.map(u64::from),
        " C",
        &t.temperature_slowdown_c,
        leading_u64,
        exact,
    );
    g.number(
        "temperature_shutdown_c",
        ours.temperature_shutdown_c.map(u64::from),
        " C",
        &t.temperature_shutdown_c,
        leading_u64,
        exact,
    );
    throttle_row(&mut g);
    g.number(
        "power_usage_mw",
        ours.power_usage_mw.map(u64::from),
        " mW",
        &t.power_draw,
        watts_to_mw,
        power_draw_close,
    );
    g.number(
        "power_limit_mw",
        ours.power_limit_mw.map(u64::from),
        " mW",
        &t.power_limit,
        watts_to_mw,
        power_limit_close,
    );
    g.number(
        "pcie_link_gen_current",
        ours.pcie_link_gen_current.map(u64::from),
        "",
        &t.pcie_link_gen_current,
        leading_u64,
        exact,
    );
    g.number(
        "pcie_link_gen_max",
        ours.pcie_link_gen_max.map(u64::from),
        "",
        &t.pcie_link_gen_max,
        leading_u64,
        exact,
    );
    g.number(
        "pcie_link_width_current",
        ours.pcie_link_width_current.map(u64::from),
        "x",
        &t.pcie_link_width_current,
        leading_u64,
        exact,
    );
    g.number(
        "pcie_link_width_max",
        ours.pcie_link_width_max.map(u64::from),
        "x",
        &t.pcie_link_width_max,
        leading_u64,
        exact,
    );
    g.count(
        "pcie_replay_counter",
        ours.pcie_replay_counter,
        &t.pcie_replay_counter,
    );
    nvlink_rows(&mut g, nvlink);
    processes_row(&mut g);
    let xids: Vec<String> = ours.xids.iter().map(|x| x.xid.to_string()).collect();
    let ours_xids = if xids.is_empty() {
        "none".to_owned()
    } else {
        xids.join(", ")
    };
    g.row(
        "xids",
        ours_xids,
        "(not in -q -x)".to_owned(),
        Outcome::NotComparable(
            "nvidia-smi does not report XID events (the kernel log does)".to_owned(),
        ),
    );
    g.rows
}
