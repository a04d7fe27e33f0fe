//! The list-valued fields of a GPU: active throttle reasons (a set of
//! names), NVLinks (link → active, from `nvidia-smi nvlink -s`) and compute
//! processes (pid → memory); plus the rows for what nvidia-smi's XML cannot
//! show (NVLink error counters, XIDs).

use std::collections::{BTreeMap, BTreeSet};

use ringfenced::gpu::THROTTLE_REASON_NAMES;

use super::Outcome;
use super::fields::GpuRows;
use super::judge::{Ours, leading_u64};
use crate::smi::{NvLinkStatus, Reading};

/// The agent's names of the active throttle reasons, spelled as nvidia-smi
/// spells them (`display_clock_setting` is `display_clocks_setting` there).
fn smi_reason_name(agent_name: &str) -> &str {
    match agent_name {
        "display_clock_setting" => "display_clocks_setting",
        other => other,
    }
}

pub(super) fn throttle_row(g: &mut GpuRows<'_>) {
    let field = "throttle_reasons";
    let theirs = &g.theirs.throttle_reasons;
    let ours = Ours::of(
        g.ours.throttle_reasons_mask,
        g.ours,
        "throttle_reasons_mask",
    );
    let theirs_active: BTreeSet<&str> = theirs
        .iter()
        .filter(|(_, r)| r.value() == Some("Active"))
        .map(|(k, _)| k.as_str())
        .collect();
    let theirs_text = if theirs.is_empty() {
        "(absent)".to_owned()
    } else {
        names(&theirs_active)
    };
    let (ours_text, outcome) = match ours {
        _ if theirs.is_empty() => (
            ours.display(""),
            Outcome::NotComparable(
                "nvidia-smi's XML has no <clocks_event_reasons> or <clocks_throttle_reasons>"
                    .to_owned(),
            ),
        ),
        Ours::Unsupported | Ours::Failed => {
            let all_na = theirs
                .values()
                .all(|r| matches!(r, Reading::Unsupported(_)));
            let outcome = match (ours, all_na) {
                (Ours::Unsupported, true) => Outcome::Match("both not supported".to_owned()),
                _ => Outcome::Mismatch("nvidia-smi reads the reasons, we do not".to_owned()),
            };
            (ours.display(""), outcome)
        }
        Ours::Value(mask) => {
            let active: BTreeSet<&str> = THROTTLE_REASON_NAMES
                .iter()
                .filter(|(bit, _)| mask & bit != 0)
                .map(|(_, n)| smi_reason_name(n))
                .collect();
            let unknown_to_smi: Vec<&str> = active
                .iter()
                .copied()
                .filter(|n| !theirs.contains_key(*n))
                .collect();
            let comparable: BTreeSet<&str> = active
                .iter()
                .copied()
                .filter(|n| theirs.contains_key(*n))
                .collect();
            let text = format!("{} (mask {mask:#x})", names(&active));
            let outcome = if comparable == theirs_active {
                if unknown_to_smi.is_empty() {
                    Outcome::Match(String::new())
                } else {
                    Outcome::Match(format!(
                        "nvidia-smi does not list {}",
                        unknown_to_smi.join(", ")
                    ))
                }
            } else {
                let only_ours: Vec<&str> = comparable.difference(&theirs_active).copied().collect();
                let only_theirs: Vec<&str> =
                    theirs_active.difference(&comparable).copied().collect();
                Outcome::Mismatch(format!(
                    "only ours: [{}], only nvidia-smi's: [{}]",
                    only_ours.join(", "),
                    only_theirs.join(", ")
                ))
            };
            (text, outcome)
        }
    };
    g.row(field, ours_text, theirs_text, outcome);
}

fn names(set: &BTreeSet<&str>) -> String {
    if set.is_empty() {
        "none".to_owned()
    } else {
        set.iter().copied().collect::<Vec<_>>().join(", ")
    }
}

const MIB: u64 = 1024 * 1024;

pub(super) fn processes_row(g: &mut GpuRows<'_>) {
    let field = "processes";
    let ours_unsupported = g.ours.unsupported.iter().any(|u| u == field);
    let ours: BTreeMap<u32, u64> = g
        .ours
        .processes
        .iter()
        .map(|p| (p.pid, p.used_memory_bytes / MIB))
        .collect();
    let ours_text = if ours_unsupported {
        "not supported".to_owned()
    } else {
        process_text(ours.iter().map(|(p, m)| (p.to_string(), m.to_string())))
    };
    let Some(list) = &g.theirs.processes else {
        let outcome = if ours_unsupported {
            Outcome::Match("both not supported".to_owned())
        } else {
            Outcome::NotComparable("nvidia-smi lists no <processes>".to_owned())
        };
        g.row(field, ours_text, "(none listed)".to_owned(), outcome);
        return;
    };
    // The agent lists compute processes (NVML's compute list): types C, C+G, M+C.
    let mut theirs: BTreeMap<u32, Option<u64>> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for p in list {
        let compute = p.kind.value().is_some_and(|k| k.contains('C'));
        if !compute {
            continue;
        }
        match p.pid.value().and_then(|v| v.trim().parse::<u32>().ok()) {
            Some(pid) => {
                theirs.insert(pid, p.used_memory.value().and_then(leading_u64));
            }
            None => unreadable.push(p.pid.display()),
        }
    }
    let theirs_text = process_text(theirs.iter().map(|(p, m)| {
        (
            p.to_string(),
            m.map_or_else(|| "?".to_owned(), |m| m.to_string()),
        )
    }));
    let outcome = if !unreadable.is_empty() {
        Outcome::NotComparable(format!("unreadable pid {}", unreadable.join(", ")))
    } else if ours_unsupported {
        Outcome::Mismatch("we report NotSupported, nvidia-smi lists processes".to_owned())
    } else if ours.keys().ne(theirs.keys()) {
        Outcome::Mismatch("different process ids".to_owned())
    } else {
        let off: Vec<String> = ours
            .iter()
            .filter(|(pid, mib)| theirs[*pid].is_some_and(|t| t.abs_diff(**mib) > 1))
            .map(|(pid, _)| pid.to_string())
            .collect();
        if off.is_empty() {
            Outcome::Match(String::new())
        } else {
            Outcome::Mismatch(format!(
                "memory differs by more than 1 MiB for pid {}",
                off.join(", ")
            ))
        }
    };
    g.row(field, ours_text, theirs_text, outcome);
}

fn process_text(list: impl Iterator<Item = (String, String)>) -> String {
    let items: Vec<String> = list.map(|(p, m)| format!("{p} ({m} MiB)")).collect();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

fn link_text(links: &BTreeMap<u32, Option<bool>>) -> String {
    if links.is_empty() {
        return "none".to_owned();
    }
    let inactive: Vec<String> = links
        .iter()
        .filter(|(_, a)| **a == Some(false))
        .map(|(l, _)| l.to_string())
        .collect();
    let unknown = links.values().filter(|a| a.is_none()).count();
    let mut s = format!("{} links, inactive: [{}]", links.len(), inactive.join(", "));
    if unknown > 0 {
        s.push_str(&format!(", unreadable: {unknown}"));
    }
    s
}

pub(super) fn nvlink_rows(g: &mut GpuRows<'_>, status: Option<&BTreeMap<String, NvLinkStatus>>) {
    let field = "nvlinks";
    let ours_unsupported = g.ours.unsupported.iter().any(|u| u == field);
    let ours: BTreeMap<u32, Option<bool>> = g
        .ours
        .nvlinks
        .iter()
        .map(|l| (l.link, Some(l.active)))
        .collect();
    let ours_text = if ours_unsupported {
        "not supported".to_owned()
    } else {
        link_text(&ours)
    };
    let (theirs_text, outcome) = match status {
        None => (
            "(not captured)".to_owned(),
            Outcome::NotComparable(
                "`nvidia-smi -q -x` has no per-link NVLink state; pass `nvidia-smi nvlink -s` output"
                    .to_owned(),
            ),
        ),
        Some(map) => match map.get(&g.ours.uuid) {
            None if ours.is_empty() => (
                "(GPU not listed)".to_owned(),
                Outcome::Match("no NVLink on either side".to_owned()),
            ),
            None => (
                "(GPU not listed)".to_owned(),
                Outcome::Mismatch("nvidia-smi nvlink -s does not list this GPU".to_owned()),
            ),
            Some(s) => {
                let outcome = if s.all_inactive && s.links.is_empty() {
                    if ours.values().all(|a| *a == Some(false)) {
                        Outcome::Match("nvidia-smi: all links inactive".to_owned())
                    } else {
                        Outcome::Mismatch("nvidia-smi says all links are inactive".to_owned())
                    }
                } else if s.links.values().any(Option::is_none) {
                    Outcome::NotComparable("a link state nvidia-smi printed was not understood".to_owned())
                } else if s.links == ours {
                    if ours.is_empty() {
                        Outcome::Match("no NVLink on either side".to_owned())
                    } else {
                        Outcome::Match(String::new())
                    }
                } else {
                    Outcome::Mismatch(String::new())
                };
                let text = if s.all_inactive && s.links.is_empty() {
                    "all links inactive".to_owned()
                } else {
                    link_text(&s.links)
                };
                (text, outcome)
            }
        },
    };
    g.row(field, ours_text, theirs_text, outcome);
    let errors: u64 = g
        .ours
        .nvlinks
        .iter()
        .map(|l| {
            l.replay_errors.unwrap_or(0)
                + l.recovery_errors.unwrap_or(0)
                + l.crc_flit_errors.unwrap_or(0)
        })
        .sum();
    g.row(
        "nvlink_error_counters",
        format!("{errors} (replay + recovery + CRC, all links)"),
        "(not in -q -x)".to_owned(),
        Outcome::NotComparable(
            "nvidia-smi prints NVLink error counters only with `nvlink -e`".to_owned(),
        ),
    );
}
