//! Text the operator reads: a wave's status snapshot (`wave status`) and a
//! verified evidence packet (`evidence verify`). Each function returns the
//! lines to print, newline-terminated; [`print_text`] prints them to a
//! stdout that may be a closed pipe (`wave status | head -1`).

use std::fmt::Write as _;
use std::path::Path;

use crate::evidence::{Attested, Verified};
use crate::plan::ring_name;
use crate::wave::{FailureKind, StatusSnapshot};

/// `ms` since the epoch as RFC 3339 (UTC, seconds), or the number when out
/// of range.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(
        || format!("{ms} ms"),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// Print `text` to stdout as is. A reader that went away (a closed pipe)
/// is not an error: the rest is dropped, nothing panics.
pub fn print_text(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// [`print_text`] of one line (a newline is added).
pub fn print_line(line: &str) {
    print_text(&format!("{line}\n"));
}

/// Who approved each protected ring so far (`wave status`).
pub type RingApprovers = std::collections::BTreeMap<u32, Vec<String>>;

/// `wave status` without `--json`: the summary line, then rings (a
/// protected ring with its approvers, N of M), pools, break-glass grants,
/// the next window and the halt, one per line.
pub fn status(s: &StatusSnapshot, approvers: &RingApprovers) -> String {
    let mut out = format!("{}\n", crate::cli::report::summary(s));
    let _ = writeln!(
        out,
        "  started {}, updated {}",
        rfc3339(s.started_at_ms),
        rfc3339(s.updated_at_ms)
    );
    for (r, v) in &s.rings {
        let approval = match approvers.get(r) {
            Some(who) if v.approval != "not needed" && s.approver_threshold > 0 => format!(
                "{}: {} of {}{}",
                v.approval,
                who.len(),
                s.approver_threshold,
                if who.is_empty() {
                    String::new()
                } else {
                    format!(", {}", who.join(", "))
                }
            ),
            _ => v.approval.clone(),
        };
        let _ = writeln!(
            out,
            "  ring {r}{}: {} ({approval}) {:?}",
            ring_name(*r),
            v.status,
            v.counts
        );
    }
    for (p, (n, max)) in &s.pools {
        let _ = writeln!(out, "  pool {p}: {n} out of service, limit {max}");
    }
    for b in &s.break_glass {
        let _ = writeln!(out, "  break-glass: {b}");
    }
    if let Some(n) = &s.next_window {
        let _ = writeln!(out, "  next maintenance window opens {n}");
    }
    if s.phase == "aborted" {
        let _ = writeln!(
            out,
            "  ABORTED: no host starts again; hosts the wave left drained stay drained until undrained"
        );
    } else if let Some(h) = s.halt.as_ref().filter(|h| h.kind == FailureKind::Operator) {
        let _ = writeln!(
            out,
            "  HALTED by the operator in ring {}: {}; no host failed: a plain `ringfence wave resume --wave {}` continues",
            h.ring, h.reason, s.wave_id
        );
    } else if let Some(h) = &s.halt {
        let _ = writeln!(
            out,
            "  HALT: ring {} host {} step {} ({}): {}",
            h.ring,
            h.host.as_deref().unwrap_or("-"),
            h.step,
            h.kind,
            h.reason
        );
    }
    out
}

/// `evidence verify` without `--json`: every verdict and version from the
/// attestations, what was checked, and the rollback proof.
pub fn verified(path: &Path, v: &Verified) -> String {
    let p = &v.packet;
    let mut out = format!("{}: VALID, signed by {}\n", path.display(), v.signed_by);
    let _ = writeln!(
        out,
        "  wave {} ring {}{}: {} ({} hosts), {} {}",
        p.wave_id,
        p.ring,
        ring_name(p.ring),
        p.outcome,
        p.hosts.len(),
        p.profile,
        p.version
    );
    if let Some(r) = &p.halt_reason {
        let _ = writeln!(out, "  halt: {r}");
    }
    let att = |a: Option<&Attested>| {
        a.map(|a| format!("{} {}", a.verdict, a.driver_version))
            .unwrap_or_else(|| "(no attestation)".into())
    };
    for (h, e) in v.hosts.iter().zip(&p.hosts) {
        let _ = writeln!(
            out,
            "  {} [{}] {}: {} → {}{}",
            h.host_id,
            h.pool,
            h.phase,
            att(h.before.as_ref()),
            att(h.after.as_ref()),
            e.failure
                .as_ref()
                .map(|f| format!(" FAILED {} {}: {}", f.0, f.1, f.2))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(
        out,
        "  verified: {} signed tasks, {} attestations, {} approvals (approvers: {})",
        v.tasks_checked,
        v.attestations_checked,
        v.approvals_checked,
        v.approvers.join(", ")
    );
    if let Some(rp) = &p.rollback_proof {
        let _ = writeln!(
            out,
            "  rollback proof: {} went {}",
            rp.host_id,
            v.rollback_versions.join(" → ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn status_shows_rings_pools_break_glass_window_and_the_halt() {
        let s: StatusSnapshot = serde_json::from_value(serde_json::json!({
            "wave_id": "w-1", "phase": "halted", "ring": 2,
            "rings": {"2": {"status": "halted", "counts": {"failed": 1}, "approval": "approved"}},
            "pools": {"h100": [1, 2]}, "failures": [1, 1],
            "halt": {"wave_id": "w-1", "ring": 2, "host": "gpu-7", "step": "validate",
                     "kind": "attestation", "reason": "uncorrected ECC"},
            "next_window": "2026-01-01T02:00:00Z", "break_glass": ["pool h100 max_out 2"],
            "ring_hosts": {}, "profile": "p", "version": "v", "rollback_version": "",
            "started_at_ms": 0, "updated_at_ms": 0, "hosts": {}
        }))
        .unwrap();
        let text = status(&s, &RingApprovers::new());
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
                "  started 1970-01-01T00:00:00Z, updated 1970-01-01T00:00:00Z",
                &format!(
                    "  ring 2{}: halted (approved) {{\"failed\": 1}}",
                    ring_name(2)
                ),
                "  pool h100: 1 out of service, limit 2",
                "  break-glass: pool h100 max_out 2",
                "  next maintenance window opens 2026-01-01T02:00:00Z",
                "  HALT: ring 2 host gpu-7 step validate (attestation): uncorrected ECC",
            ]
        );
    }

    fn snapshot(phase: &str, halt: serde_json::Value) -> StatusSnapshot {
        serde_json::from_value(serde_json::json!({
            "wave_id": "w-1", "phase": phase, "ring": 2, "rings": {}, "pools": {},
            "failures": [0, 1], "halt": halt, "next_window": null, "break_glass": [],
            "ring_hosts": {}, "profile": "p", "version": "v", "rollback_version": "",
            "started_at_ms": 1_790_000_000_000_i64, "updated_at_ms": 1_790_000_061_500_i64,
            "hosts": {}
        }))
        .unwrap()
    }

    #[test]
    fn status_after_an_operator_halt_says_a_plain_resume_continues() {
        let halt = serde_json::json!({"wave_id": "w-1", "ring": 2, "host": null,
            "step": "dispatch", "kind": "operator", "reason": "halt requested by operator"});
        let text = status(&snapshot("halted", halt), &RingApprovers::new());
        assert!(
            text.contains("no host failed: a plain `ringfence wave resume --wave w-1` continues"),
            "{text}"
        );
        assert!(!text.contains("HALT: ring"), "{text}");
        assert!(
            text.contains("started 2026-09-21T14:13:20Z, updated 2026-09-21T14:14:21Z"),
            "{text}"
        );
    }

    #[test]
    fn status_after_abort_says_aborted_not_halted() {
        let halt = serde_json::json!({"wave_id": "w-1", "ring": 2, "host": "gpu-7",
            "step": "validate", "kind": "attestation", "reason": "uncorrected ECC"});
        let text = status(&snapshot("aborted", halt), &RingApprovers::new());
        assert!(text.starts_with("w-1 aborted"), "{text}");
        assert!(text.contains("ABORTED: no host starts again"), "{text}");
        assert!(!text.contains("HALT"), "{text}");
    }

    #[test]
    fn status_shows_who_approved_each_protected_ring_n_of_m() {
        let mut v =
            serde_json::to_value(snapshot("awaiting_approval", serde_json::Value::Null)).unwrap();
        v["approver_threshold"] = 2.into();
        v["rings"] = serde_json::json!({
            "1": {"status": "complete", "counts": {"done": 1}, "approval": "not needed"},
            "2": {"status": "running", "counts": {"pending": 1}, "approval": "AWAITING_APPROVAL"},
            "3": {"status": "waiting", "counts": {"pending": 1}, "approval": "AWAITING_APPROVAL"}
        });
        let s: StatusSnapshot = serde_json::from_value(v).unwrap();
        let who: RingApprovers = [(1, vec![]), (2, vec!["alice".to_string()]), (3, vec![])].into();
        let text = status(&s, &who);
        assert!(
            text.contains(": complete (not needed) {\"done\": 1}"),
            "{text}"
        );
        assert!(
            text.contains(": running (AWAITING_APPROVAL: 1 of 2, alice) {"),
            "{text}"
        );
        assert!(
            text.contains(": waiting (AWAITING_APPROVAL: 0 of 2) {"),
            "{text}"
        );
    }

    #[test]
    fn rfc3339_of_ms() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(i64::MAX), format!("{} ms", i64::MAX));
    }
}
