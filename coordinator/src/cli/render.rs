//! Text the operator reads: a wave's status snapshot (`wave status`) and a
//! verified evidence packet (`evidence verify`). Each function returns the
//! lines to print, newline-terminated.

use std::fmt::Write as _;
use std::path::Path;

use crate::evidence::{Attested, Verified};
use crate::plan::ring_name;
use crate::wave::StatusSnapshot;

/// `wave status` without `--json`: the summary line, then rings, pools,
/// break-glass grants, the next window and the halt, one per line.
pub fn status(s: &StatusSnapshot) -> String {
    let mut out = format!("{}\n", crate::report::summary(s));
    for (r, v) in &s.rings {
        let _ = writeln!(
            out,
            "  ring {r}{}: {} ({}) {:?}",
            ring_name(*r),
            v.status,
            v.approval,
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
    if let Some(h) = &s.halt {
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
        let text = status(&s);
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
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
}
