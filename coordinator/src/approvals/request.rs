//! What an approver signs with `ringfence wave approve`: the [`Request`]
//! built from inventory and wave spec, its split into parts within the
//! attach budget ([`build`], [`part_limit`]), the text shown for review
//! ([`render`], [`digest`]) and its differences from the coordinator's
//! view ([`scope_differences`]).

use std::collections::BTreeSet;

use prost::Message;
use ringfence::envelope::{MAX_APPROVAL_PAYLOAD, MAX_APPROVALS};
use ringfence::pb;

use super::{ATTACH_BUDGET, ApprovalError, action_name};

/// The scope an approver signs with `ringfence wave approve`, built from
/// the inventory (the ring's hosts) and the wave spec (profile, version,
/// rollback version, approval lifetime), never from the coordinator's own
/// status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Wave id.
    pub wave_id: String,
    /// Ring.
    pub ring: u32,
    /// Patch profile.
    pub profile: String,
    /// Version to install.
    pub version: String,
    /// Version a rollback may return to ("" = none).
    pub rollback_version: String,
    /// Every host of the ring, in inventory order.
    pub hosts: Vec<String>,
    /// Actions approved.
    pub actions: Vec<pb::ApprovedAction>,
    /// Signing time, ms since the epoch.
    pub issued_at_ms: i64,
    /// Lifetime, seconds.
    pub ttl_s: u64,
    /// Approver's trust-file id (informational; keys decide).
    pub approver: String,
}

/// Refuse a lifetime of zero or over `cap_s` (`why` names where the cap
/// comes from).
pub fn check_ttl(ttl_s: u64, cap_s: u64, why: &str) -> Result<(), ApprovalError> {
    if ttl_s == 0 || ttl_s > cap_s {
        return Err(ApprovalError::Lifetime {
            ttl_s,
            cap_s,
            why: why.to_string(),
        });
    }
    Ok(())
}

/// Largest approval payload `wave approve` signs when `threshold` approvers
/// each sign their own: a task carries one approval per approver, so their
/// sum must stay within [`ATTACH_BUDGET`], and each within
/// [`MAX_APPROVAL_PAYLOAD`].
pub fn part_limit(threshold: usize) -> Result<usize, ApprovalError> {
    let threshold = threshold.max(1);
    if threshold > MAX_APPROVALS {
        return Err(ApprovalError::TooLarge(format!(
            "an approver threshold of {threshold} can never be met: an agent accepts at most {MAX_APPROVALS} approvals with one task"
        )));
    }
    // Room for the envelope around each payload (type, signatures).
    Ok(MAX_APPROVAL_PAYLOAD.min(ATTACH_BUDGET / threshold) - 2048)
}

fn varint_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// The approvals to sign for `req`: one naming every host, or, when that
/// payload would exceed `limit` bytes (see [`part_limit`]), parts naming
/// consecutive hosts, each within the limit. Agents get only the part that
/// names them.
pub fn build(req: &Request, limit: usize) -> Result<Vec<pb::RingApproval>, ApprovalError> {
    if req.actions.is_empty() {
        return Err(ApprovalError::Actions("no action".into()));
    }
    if req.actions.contains(&pb::ApprovedAction::Rollback) && req.rollback_version.is_empty() {
        return Err(ApprovalError::NoRollbackVersion);
    }
    if req.hosts.is_empty() {
        return Err(ApprovalError::Scope {
            field: "ring",
            approved: req.ring.to_string(),
            expected: "a ring with hosts in the inventory".into(),
        });
    }
    let ttl_ms = i64::try_from(req.ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut actions: Vec<i32> = req.actions.iter().map(|a| *a as i32).collect();
    actions.sort_unstable();
    actions.dedup();
    let base = pb::RingApproval {
        wave_id: req.wave_id.clone(),
        ring: req.ring,
        profile: req.profile.clone(),
        version: req.version.clone(),
        rollback_version: req.rollback_version.clone(),
        host_ids: Vec::new(),
        issued_at_unix_ms: req.issued_at_ms,
        expires_at_unix_ms: req.issued_at_ms.saturating_add(ttl_ms),
        approver: req.approver.clone(),
        actions,
    };
    let base_len = base.encoded_len();
    let mut parts = Vec::new();
    let mut current = base.clone();
    let mut len = base_len;
    for h in &req.hosts {
        let add = 1 + varint_len(h.len()) + h.len();
        if base_len + add > limit {
            return Err(ApprovalError::TooLarge(format!(
                "host id `{h}` alone makes the approval larger than {limit} bytes"
            )));
        }
        if len + add > limit {
            parts.push(std::mem::replace(&mut current, base.clone()));
            len = base_len;
        }
        current.host_ids.push(h.clone());
        len += add;
    }
    parts.push(current);
    if let Some(p) = parts.iter().find(|p| p.encoded_len() > limit) {
        return Err(ApprovalError::TooLarge(format!(
            "an approval part of {} bytes exceeds {limit} bytes",
            p.encoded_len()
        )));
    }
    Ok(parts)
}

/// `sha256:<hex>` of the exact payload bytes an approver signs.
pub fn digest(payload: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(payload)))
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Everything an approver is about to sign, for a human: wave, ring,
/// profile, version, rollback version, actions, validity, every host, and
/// per signed part its size and payload digest.
pub fn render(parts: &[pb::RingApproval]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some(first) = parts.first() else {
        return out;
    };
    let hosts: usize = parts.iter().map(|p| p.host_ids.len()).sum();
    let _ = writeln!(
        out,
        "ring approval for wave {} ring {}{}",
        first.wave_id,
        first.ring,
        crate::plan::ring_name(first.ring)
    );
    let _ = writeln!(out, "  approver:         {}", first.approver);
    let _ = writeln!(out, "  profile:          {}", first.profile);
    let _ = writeln!(out, "  version:          {}", first.version);
    let _ = writeln!(
        out,
        "  rollback version: {}",
        if first.rollback_version.is_empty() {
            "(none: no rollback approved)"
        } else {
            first.rollback_version.as_str()
        }
    );
    let _ = writeln!(
        out,
        "  actions:          {}",
        first
            .actions
            .iter()
            .map(|a| action_name(*a))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "  valid:            {} until {} ({} s)",
        time_text(first.issued_at_unix_ms),
        time_text(first.expires_at_unix_ms),
        (first.expires_at_unix_ms - first.issued_at_unix_ms) / 1000
    );
    let _ = writeln!(out, "  hosts ({hosts}):");
    for p in parts {
        for h in &p.host_ids {
            let _ = writeln!(out, "    {h}");
        }
    }
    for (i, p) in parts.iter().enumerate() {
        let payload = p.encode_to_vec();
        let which = if parts.len() == 1 {
            "payload".to_string()
        } else {
            format!(
                "payload part {}/{} ({} hosts, {} .. {})",
                i + 1,
                parts.len(),
                p.host_ids.len(),
                p.host_ids.first().map(String::as_str).unwrap_or(""),
                p.host_ids.last().map(String::as_str).unwrap_or("")
            )
        };
        let _ = writeln!(
            out,
            "  {which}: {} bytes, {}",
            payload.len(),
            digest(&payload)
        );
    }
    out
}

/// What differs between the coordinator's view of a ring (its status
/// file: hosts, profile, version, rollback version) and the scope built
/// from inventory + spec. Empty when they agree.
pub fn scope_differences(
    req: &Request,
    view_hosts: Option<&[String]>,
    view_profile: &str,
    view_version: &str,
    view_rollback: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for (field, ours, theirs) in [
        ("profile", req.profile.as_str(), view_profile),
        ("version", req.version.as_str(), view_version),
        (
            "rollback_version",
            req.rollback_version.as_str(),
            view_rollback,
        ),
    ] {
        if ours != theirs {
            out.push(format!(
                "{field}: spec says `{ours}`, the coordinator's status says `{theirs}`"
            ));
        }
    }
    match view_hosts {
        None => out.push(format!(
            "hosts: the coordinator's status has no ring {}",
            req.ring
        )),
        Some(view) => {
            let ours: BTreeSet<&str> = req.hosts.iter().map(String::as_str).collect();
            let theirs: BTreeSet<&str> = view.iter().map(String::as_str).collect();
            let only_inv: Vec<&str> = ours.difference(&theirs).copied().collect();
            let only_status: Vec<&str> = theirs.difference(&ours).copied().collect();
            if !only_inv.is_empty() {
                out.push(format!(
                    "hosts in the inventory's ring {} but not in the coordinator's status: {}",
                    req.ring,
                    only_inv.join(", ")
                ));
            }
            if !only_status.is_empty() {
                out.push(format!(
                    "hosts in the coordinator's status for ring {} but not in the inventory's: {}",
                    req.ring,
                    only_status.join(", ")
                ));
            }
        }
    }
    out
}
