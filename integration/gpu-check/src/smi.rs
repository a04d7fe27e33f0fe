//! What nvidia-smi says: its XML log (`nvidia-smi -q -x`, elements as in
//! NVIDIA's `nvsmi_device_v*.dtd`) and its NVLink status text
//! (`nvidia-smi nvlink -s`), read into plain values. Several element names
//! changed over driver generations (`clocks_throttle_reasons` became
//! `clocks_event_reasons`, `power_readings` became `gpu_power_readings`,
//! `power_draw` became `average_power_draw` / `instant_power_draw`, SRAM
//! uncorrectable ECC split into parity and SEC-DED); each reader tries the
//! names of every generation it knows, newest first.

use std::collections::BTreeMap;

/// One value as nvidia-smi printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// A value ("41 C", "Yes", "16x", ...).
    Value(String),
    /// "N/A" or "Not Supported": the GPU does not have this.
    Unsupported(String),
    /// Any other bracketed or error text ("[Insufficient Permissions]",
    /// "Unknown Error", "GPU requires reset"): nvidia-smi could not read it.
    Unavailable(String),
    /// The element is not in this XML (another driver generation's schema).
    Missing(String),
}

impl Reading {
    /// Classifies the text of an element.
    fn from_text(text: &str) -> Self {
        let t = text.trim();
        if t.is_empty() {
            return Self::Unavailable("(empty)".to_owned());
        }
        let bare = t.trim_start_matches('[').trim_end_matches(']');
        if bare.eq_ignore_ascii_case("N/A") || bare.eq_ignore_ascii_case("Not Supported") {
            Self::Unsupported(t.to_owned())
        } else if t.starts_with('[')
            || bare.eq_ignore_ascii_case("Unknown Error")
            || bare.eq_ignore_ascii_case("GPU requires reset")
            || bare.eq_ignore_ascii_case("Insufficient Permissions")
        {
            Self::Unavailable(t.to_owned())
        } else {
            Self::Value(t.to_owned())
        }
    }

    /// The raw text, for display.
    pub fn display(&self) -> String {
        match self {
            Self::Value(v) | Self::Unsupported(v) | Self::Unavailable(v) => v.clone(),
            Self::Missing(_) => "(absent)".to_owned(),
        }
    }

    /// The value text, if it is a value.
    pub fn value(&self) -> Option<&str> {
        match self {
            Self::Value(v) => Some(v),
            _ => None,
        }
    }
}

/// Reading an nvidia-smi capture can fail with these.
#[derive(Debug, thiserror::Error)]
pub enum SmiError {
    /// "not XML: {0}"
    #[error("not XML: {0}")]
    Xml(#[from] roxmltree::Error),
    /// "the root element is <{0}>, not <nvidia_smi_log>"
    #[error("the root element is <{0}>, not <nvidia_smi_log>")]
    Root(String),
}

/// One compute (or graphics) process nvidia-smi lists on a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmiProcess {
    /// `pid`.
    pub pid: Reading,
    /// "C", "G", "C+G", "M", "M+C".
    pub kind: Reading,
    /// "1024 MiB".
    pub used_memory: Reading,
}

/// Everything the comparison reads about one GPU. Field names follow the
/// agent's `GpuReport`; the comment on each names the XML path read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmiGpu {
    /// `<gpu id="...">`.
    pub id: String,
    /// `uuid`
    pub uuid: Reading,
    /// `product_name`
    pub name: Reading,
    /// `serial`
    pub serial: Reading,
    /// `pci/pci_bus_id`
    pub pci_bus_id: Reading,
    /// `ecc_errors/volatile/<children>`, corrected, totalled by [`ecc_total`]
    /// (as are the three below).
    pub ecc_volatile_corrected: Reading,
    /// `ecc_errors/volatile/<children>`, uncorrected.
    pub ecc_volatile_uncorrected: Reading,
    /// `ecc_errors/aggregate/<children>`, corrected.
    pub ecc_aggregate_corrected: Reading,
    /// `ecc_errors/aggregate/<children>`, uncorrected.
    pub ecc_aggregate_uncorrected: Reading,
    /// `retired_pages/multiple_single_bit_retirement/retired_count`
    pub retired_pages_single_bit: Reading,
    /// `retired_pages/double_bit_retirement/retired_count`
    pub retired_pages_double_bit: Reading,
    /// `retired_pages/pending_retirement`, older `retired_pages/pending_blacklist`
    pub retired_pages_pending: Reading,
    /// `remapped_rows/remapped_row_corr`
    pub remapped_rows_correctable: Reading,
    /// `remapped_rows/remapped_row_unc`
    pub remapped_rows_uncorrectable: Reading,
    /// `remapped_rows/remapped_row_pending`
    pub remapped_rows_pending: Reading,
    /// `remapped_rows/remapped_row_failure`
    pub remapped_rows_failure: Reading,
    /// `temperature/gpu_temp`
    pub temperature_c: Reading,
    /// `temperature/gpu_temp_slow_threshold`
    pub temperature_slowdown_c: Reading,
    /// `temperature/gpu_temp_max_threshold` (nvidia-smi's "GPU Shutdown Temp")
    pub temperature_shutdown_c: Reading,
    /// `clocks_event_reasons/clocks_event_reason_*`, older
    /// `clocks_throttle_reasons/clocks_throttle_reason_*`: reason name
    /// (the suffix) → "Active" / "Not Active". Empty when neither element exists.
    pub throttle_reasons: BTreeMap<String, Reading>,
    /// `gpu_power_readings/average_power_draw`, else `.../power_draw`, else
    /// `.../instant_power_draw`; older `power_readings/power_draw`.
    pub power_draw: Reading,
    /// `gpu_power_readings/current_power_limit`, older `power_readings/enforced_power_limit`.
    pub power_limit: Reading,
    /// `pci/pci_gpu_link_info/pcie_gen/current_link_gen`
    pub pcie_link_gen_current: Reading,
    /// `pci/pci_gpu_link_info/pcie_gen/max_link_gen`
    pub pcie_link_gen_max: Reading,
    /// `pci/pci_gpu_link_info/link_widths/current_link_width`
    pub pcie_link_width_current: Reading,
    /// `pci/pci_gpu_link_info/link_widths/max_link_width`
    pub pcie_link_width_max: Reading,
    /// `pci/replay_counter`
    pub pcie_replay_counter: Reading,
    /// `processes/process_info`; `None` when `<processes>` holds text (N/A, an
    /// error) instead of a list, or is absent.
    pub processes: Option<Vec<SmiProcess>>,
}

/// The whole XML log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmiLog {
    /// `driver_version`
    pub driver_version: Reading,
    /// `cuda_version`
    pub cuda_version: Reading,
    /// `attached_gpus`
    pub attached_gpus: Reading,
    /// Every `<gpu>` element, in document order.
    pub gpus: Vec<SmiGpu>,
}

type Node<'a, 'i> = roxmltree::Node<'a, 'i>;

/// The element at `path` (child names) below `node`.
fn find<'a, 'i>(node: Node<'a, 'i>, path: &[&str]) -> Option<Node<'a, 'i>> {
    path.iter().try_fold(node, |n, name| {
        n.children()
            .find(|c| c.is_element() && c.has_tag_name(*name))
    })
}

/// The reading at the first of `paths` that exists below `node`.
fn read(node: Node<'_, '_>, paths: &[&[&str]]) -> Reading {
    for path in paths {
        if let Some(n) = find(node, path) {
            return Reading::from_text(n.text().unwrap_or(""));
        }
    }
    Reading::Missing(
        paths
            .iter()
            .map(|p| p.join("/"))
            .collect::<Vec<_>>()
            .join(" or "),
    )
}

/// Whether an ECC counter element counts corrected (`true`) or uncorrected
/// (`false`) errors, by name: `sram_correctable`, `dram_correctable`,
/// `sram_uncorrectable`, `sram_uncorrectable_parity`,
/// `sram_uncorrectable_secded`, `dram_uncorrectable`. Older schemas nest
/// `single_bit/total` and `double_bit/total` instead.
fn ecc_kind(name: &str) -> Option<bool> {
    match name {
        "sram_correctable" | "dram_correctable" => Some(true),
        "sram_uncorrectable"
        | "sram_uncorrectable_parity"
        | "sram_uncorrectable_secded"
        | "dram_uncorrectable" => Some(false),
        _ => None,
    }
}

/// The total of corrected or uncorrected ECC errors under `ecc_errors/<period>`,
/// as NVML's `nvmlDeviceGetTotalEccErrors` counts them (every memory location):
/// the sum of the SRAM and DRAM counters, or `single_bit/total` /
/// `double_bit/total` in older schemas. N/A when every counter is N/A.
pub fn ecc_total(gpu: Node<'_, '_>, period: &str, corrected: bool) -> Reading {
    let Some(block) = find(gpu, &["ecc_errors", period]) else {
        return Reading::Missing(format!("ecc_errors/{period}"));
    };
    let old = if corrected {
        "single_bit"
    } else {
        "double_bit"
    };
    if let Some(total) = find(block, &[old, "total"]) {
        return Reading::from_text(total.text().unwrap_or(""));
    }
    let counters: Vec<Reading> = block
        .children()
        .filter(|c| c.is_element() && ecc_kind(c.tag_name().name()) == Some(corrected))
        .map(|c| Reading::from_text(c.text().unwrap_or("")))
        .collect();
    if counters.is_empty() {
        // `<volatile>N/A</volatile>` or an empty block.
        return Reading::from_text(block.text().unwrap_or("N/A"));
    }
    let mut sum = 0u64;
    let mut any = false;
    for c in &counters {
        match c {
            Reading::Value(v) => match v.parse::<u64>() {
                Ok(n) => {
                    sum += n;
                    any = true;
                }
                Err(_) => return Reading::Unavailable(format!("counter `{v}`")),
            },
            Reading::Unavailable(_) => return c.clone(),
            Reading::Unsupported(_) | Reading::Missing(_) => {}
        }
    }
    if any {
        Reading::Value(sum.to_string())
    } else {
        counters[0].clone()
    }
}

/// Active/inactive per clock event (throttle) reason, newest schema first.
fn throttle_reasons(gpu: Node<'_, '_>) -> BTreeMap<String, Reading> {
    for (block, prefix) in [
        ("clocks_event_reasons", "clocks_event_reason_"),
        ("clocks_throttle_reasons", "clocks_throttle_reason_"),
    ] {
        if let Some(b) = find(gpu, &[block]) {
            return b
                .children()
                .filter(|c| c.is_element())
                .filter_map(|c| {
                    let name = c.tag_name().name().strip_prefix(prefix)?;
                    Some((name.to_owned(), Reading::from_text(c.text().unwrap_or(""))))
                })
                .collect();
        }
    }
    BTreeMap::new()
}

fn processes(gpu: Node<'_, '_>) -> Option<Vec<SmiProcess>> {
    let block = find(gpu, &["processes"])?;
    let infos: Vec<SmiProcess> = block
        .children()
        .filter(|c| c.is_element() && c.has_tag_name("process_info"))
        .map(|p| SmiProcess {
            pid: read(p, &[&["pid"]]),
            kind: read(p, &[&["type"]]),
            used_memory: read(p, &[&["used_memory"]]),
        })
        .collect();
    // `<processes>N/A</processes>` (or an error text) rather than a list.
    let text = block.text().unwrap_or("").trim();
    if infos.is_empty() && !text.is_empty() {
        return None;
    }
    Some(infos)
}

fn gpu(node: Node<'_, '_>) -> SmiGpu {
    let link = ["pci", "pci_gpu_link_info"];
    SmiGpu {
        id: node.attribute("id").unwrap_or_default().to_owned(),
        uuid: read(node, &[&["uuid"]]),
        name: read(node, &[&["product_name"]]),
        serial: read(node, &[&["serial"]]),
        pci_bus_id: read(node, &[&["pci", "pci_bus_id"]]),
        ecc_volatile_corrected: ecc_total(node, "volatile", true),
        ecc_volatile_uncorrected: ecc_total(node, "volatile", false),
        ecc_aggregate_corrected: ecc_total(node, "aggregate", true),
        ecc_aggregate_uncorrected: ecc_total(node, "aggregate", false),
        retired_pages_single_bit: read(
            node,
            &[&[
                "retired_pages",
                "multiple_single_bit_retirement",
                "retired_count",
            ]],
        ),
        retired_pages_double_bit: read(
            node,
            &[&["retired_pages", "double_bit_retirement", "retired_count"]],
        ),
        retired_pages_pending: read(
            node,
            &[
                &["retired_pages", "pending_retirement"],
                &["retired_pages", "pending_blacklist"],
                &["retired_pages"],
            ],
        ),
        remapped_rows_correctable: read(
            node,
            &[&["remapped_rows", "remapped_row_corr"], &["remapped_rows"]],
        ),
        remapped_rows_uncorrectable: read(
            node,
            &[&["remapped_rows", "remapped_row_unc"], &["remapped_rows"]],
        ),
        remapped_rows_pending: read(
            node,
            &[
                &["remapped_rows", "remapped_row_pending"],
                &["remapped_rows"],
            ],
        ),
        remapped_rows_failure: read(
            node,
            &[
                &["remapped_rows", "remapped_row_failure"],
                &["remapped_rows"],
            ],
        ),
        temperature_c: read(node, &[&["temperature", "gpu_temp"]]),
        temperature_slowdown_c: read(node, &[&["temperature", "gpu_temp_slow_threshold"]]),
        temperature_shutdown_c: read(node, &[&["temperature", "gpu_temp_max_threshold"]]),
        throttle_reasons: throttle_reasons(node),
        power_draw: read(
            node,
            &[
                &["gpu_power_readings", "average_power_draw"],
                &["gpu_power_readings", "power_draw"],
                &["gpu_power_readings", "instant_power_draw"],
                &["power_readings", "power_draw"],
            ],
        ),
        power_limit: read(
            node,
            &[
                &["gpu_power_readings", "current_power_limit"],
                &["power_readings", "enforced_power_limit"],
            ],
        ),
        pcie_link_gen_current: read(node, &[&[link[0], link[1], "pcie_gen", "current_link_gen"]]),
        pcie_link_gen_max: read(node, &[&[link[0], link[1], "pcie_gen", "max_link_gen"]]),
        pcie_link_width_current: read(
            node,
            &[&[link[0], link[1], "link_widths", "current_link_width"]],
        ),
        pcie_link_width_max: read(
            node,
            &[&[link[0], link[1], "link_widths", "max_link_width"]],
        ),
        pcie_replay_counter: read(node, &[&["pci", "replay_counter"]]),
        processes: processes(node),
    }
}

/// Parses `nvidia-smi -q -x` output.
pub fn parse_log(xml: &str) -> Result<SmiLog, SmiError> {
    let opts = roxmltree::ParsingOptions {
        // nvidia-smi names its DTD in a DOCTYPE; roxmltree refuses DTDs unless asked.
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, opts)?;
    let root = doc.root_element();
    if !root.has_tag_name("nvidia_smi_log") {
        return Err(SmiError::Root(root.tag_name().name().to_owned()));
    }
    Ok(SmiLog {
        driver_version: read(root, &[&["driver_version"]]),
        cuda_version: read(root, &[&["cuda_version"]]),
        attached_gpus: read(root, &[&["attached_gpus"]]),
        gpus: root
            .children()
            .filter(|c| c.is_element() && c.has_tag_name("gpu"))
            .map(gpu)
            .collect(),
    })
}

/// One GPU of `nvidia-smi nvlink -s`: link number → active.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NvLinkStatus {
    /// Link number → `Some(active)`, or `None` when the line was not understood.
    pub links: BTreeMap<u32, Option<bool>>,
    /// nvidia-smi listed no link but said "... all links are inActive".
    pub all_inactive: bool,
}

/// Parses `nvidia-smi nvlink -s` text, keyed by GPU uuid. Its lines are
/// `GPU <n>: <name> (UUID: GPU-...)` followed by `Link <n>: <speed> GB/s`
/// for an active link or `Link <n>: <inactive>` for an inactive one; a GPU
/// whose links are all down may instead get one line ending in "all links
/// are inActive".
pub fn parse_nvlink_status(text: &str) -> BTreeMap<String, NvLinkStatus> {
    let mut out: BTreeMap<String, NvLinkStatus> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("GPU ") {
            current = line
                .split_once("(UUID: ")
                .map(|(_, rest)| rest.trim_end_matches(')').trim().to_owned());
            if let Some(uuid) = &current {
                out.entry(uuid.clone()).or_default();
            }
        } else if line.to_ascii_lowercase().contains("all links are inactive")
            && let Some(uuid) = &current
        {
            out.entry(uuid.clone()).or_default().all_inactive = true;
        } else if let Some(rest) = line.strip_prefix("Link ")
            && let Some((num, state)) = rest.split_once(':')
            && let Ok(link) = num.trim().parse::<u32>()
            && let Some(uuid) = &current
        {
            let state = state.trim().to_ascii_lowercase();
            let active = if state.contains("inactive") {
                Some(false)
            } else if state.ends_with("gb/s") {
                Some(true)
            } else {
                None
            };
            out.entry(uuid.clone())
                .or_default()
                .links
                .insert(link, active);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SMALL: &str = r#"<?xml version="1.0" ?>
<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v12.dtd">
<nvidia_smi_log>
  <driver_version>550.54.15</driver_version>
  <cuda_version>12.4</cuda_version>
  <attached_gpus>1</attached_gpus>
  <gpu id="00000000:18:00.0">
    <uuid>GPU-1</uuid>
    <ecc_errors>
      <volatile>
        <sram_correctable>1</sram_correctable>
        <sram_uncorrectable_parity>0</sram_uncorrectable_parity>
        <sram_uncorrectable_secded>2</sram_uncorrectable_secded>
        <dram_correctable>4</dram_correctable>
        <dram_uncorrectable>1</dram_uncorrectable>
      </volatile>
      <aggregate>
        <sram_correctable>N/A</sram_correctable>
        <dram_correctable>N/A</dram_correctable>
        <sram_uncorrectable>[Unknown Error]</sram_uncorrectable>
      </aggregate>
    </ecc_errors>
    <retired_pages>N/A</retired_pages>
    <remapped_rows>N/A</remapped_rows>
    <processes>
    </processes>
  </gpu>
</nvidia_smi_log>"#;

    #[test]
    fn sums_ecc_counters_and_classifies_na() {
        let log = parse_log(SMALL).unwrap();
        assert_eq!(log.driver_version, Reading::Value("550.54.15".into()));
        let g = &log.gpus[0];
        assert_eq!(g.id, "00000000:18:00.0");
        assert_eq!(g.ecc_volatile_corrected, Reading::Value("5".into()));
        assert_eq!(g.ecc_volatile_uncorrected, Reading::Value("3".into()));
        assert_eq!(
            g.ecc_aggregate_corrected,
            Reading::Unsupported("N/A".into())
        );
        assert_eq!(
            g.ecc_aggregate_uncorrected,
            Reading::Unavailable("[Unknown Error]".into())
        );
        assert_eq!(g.retired_pages_pending, Reading::Unsupported("N/A".into()));
        assert_eq!(g.remapped_rows_pending, Reading::Unsupported("N/A".into()));
        assert!(matches!(g.temperature_c, Reading::Missing(_)));
        assert_eq!(g.processes, Some(vec![]));
        assert!(g.throttle_reasons.is_empty());
    }

    #[test]
    fn refuses_other_documents() {
        assert!(matches!(parse_log("<html/>"), Err(SmiError::Root(r)) if r == "html"));
        assert!(matches!(
            parse_log("<nvidia_smi_log>"),
            Err(SmiError::Xml(_))
        ));
    }

    #[test]
    fn nvlink_status_lines() {
        let text = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-a)\n\t Link 0: 26.562 GB/s\n\t Link 1: <inactive>\n\t Link 2: ???\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-b)\nGPU 2: NVIDIA H100 80GB HBM3 (UUID: GPU-c)\nNVML: Unable to retrieve NVLink information as all links are inActive\n";
        let s = parse_nvlink_status(text);
        assert_eq!(s.len(), 3);
        assert!(!s["GPU-a"].all_inactive && !s["GPU-b"].all_inactive);
        assert!(s["GPU-c"].all_inactive && s["GPU-c"].links.is_empty());
        let a = &s["GPU-a"].links;
        assert_eq!(a[&0], Some(true));
        assert_eq!(a[&1], Some(false));
        assert_eq!(a[&2], None);
        assert!(s["GPU-b"].links.is_empty());
    }
}
