//! The status snapshot: where a wave stands — its phase, each ring's hosts
//! by status and approval, each pool's hosts out of service against its
//! limit, failures against the budget, the halt — built from the plan and
//! the wave state, written to `status.json` for `wave status` and other
//! terminals, and shown live.

use std::collections::BTreeMap;

use ringfence::pb;
use serde::{Deserialize, Serialize};

use super::outcome::HaltReport;
use crate::approvals::BreakGlassGrant;
use crate::plan::{self, HostStatus, Plan, RingStatus, WaveState};
use crate::spec::WaveSpec;

/// Status snapshot written for `wave status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusSnapshot {
    /// Wave id.
    pub wave_id: String,
    /// "running", "awaiting_approval", "waiting_window", "soaking", "halted", "completed", "aborted".
    pub phase: String,
    /// Current ring.
    pub ring: Option<u32>,
    /// Per ring: status and host counts by status.
    pub rings: BTreeMap<u32, RingView>,
    /// Per pool: out of service now, and the limit.
    pub pools: BTreeMap<String, (usize, usize)>,
    /// Failures so far, and the budget.
    pub failures: (u32, u32),
    /// Halt report, if halted.
    pub halt: Option<HaltReport>,
    /// Next window opening, if waiting for one.
    pub next_window: Option<String>,
    /// Break-glass grants in force.
    pub break_glass: Vec<String>,
    /// Hosts of the current ring for `wave approve`.
    pub ring_hosts: BTreeMap<u32, Vec<String>>,
    /// Profile and version (for `wave approve`).
    pub profile: String,
    /// Version.
    pub version: String,
    /// Rollback version (for `wave approve`).
    pub rollback_version: String,
    /// Started / updated, ms since the epoch.
    pub started_at_ms: i64,
    /// Updated.
    pub updated_at_ms: i64,
    /// Per host phase and failure.
    pub hosts: BTreeMap<String, String>,
    /// Distinct approvers a protected ring needs (the spec's
    /// `approver_threshold`); 0 in snapshots of earlier versions.
    #[serde(default)]
    pub approver_threshold: usize,
}

/// One ring in the status snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingView {
    /// Status name.
    pub status: String,
    /// Hosts by status.
    pub counts: BTreeMap<String, usize>,
    /// Protected and approved?
    pub approval: String,
}

/// What a snapshot is made of.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The wave's plan.
    pub plan: &'a Plan,
    /// What was observed so far.
    pub state: &'a WaveState,
    /// The halt, once decided.
    pub halt: Option<&'a HaltReport>,
    /// The phase to show ("completed", "halted"), or `None` to derive it
    /// from the state.
    pub phase: Option<&'a str>,
    /// The wave spec.
    pub spec: &'a WaveSpec,
    /// Verified break-glass grants.
    pub break_glass: &'a [(BreakGlassGrant, pb::Envelope)],
    /// When the wave started, ms since the epoch.
    pub started_at_ms: i64,
    /// Now, ms since the epoch.
    pub now_ms: i64,
}

/// The name of a host status in counts and per host ("pending", "inflight", ...).
fn status_name(s: HostStatus) -> String {
    format!("{s:?}").to_lowercase()
}

/// The snapshot of a wave.
pub fn snapshot(i: &Inputs<'_>) -> StatusSnapshot {
    let (plan, state) = (i.plan, i.state);
    let ring = plan
        .rings
        .keys()
        .copied()
        .find(|r| state.rings.get(r) != Some(&RingStatus::Complete));
    let mut rings = BTreeMap::new();
    let mut ring_hosts = BTreeMap::new();
    for (r, rp) in &plan.rings {
        let mut counts = BTreeMap::new();
        for h in &rp.hosts {
            let s = state.hosts.get(h).copied().unwrap_or(HostStatus::Pending);
            *counts.entry(status_name(s)).or_insert(0) += 1;
        }
        let status = match state.rings.get(r) {
            Some(RingStatus::Complete) => "complete",
            Some(RingStatus::Soaking { .. }) => "soaking",
            _ if Some(*r) == ring => "running",
            _ => "waiting",
        };
        let approval = if !rp.protected {
            "not needed"
        } else if state.approved.contains(r) {
            "approved"
        } else {
            "AWAITING_APPROVAL"
        };
        rings.insert(
            *r,
            RingView {
                status: status.to_string(),
                counts,
                approval: approval.to_string(),
            },
        );
        ring_hosts.insert(*r, rp.hosts.clone());
    }
    let out = plan::out_of_service(plan, state);
    let pools = plan
        .pools
        .iter()
        .map(|(p, pp)| {
            (
                p.clone(),
                (
                    out.get(p).copied().unwrap_or(0)
                        + pp.out_before.len()
                        + state.others_out.get(p).copied().unwrap_or(0),
                    pp.limit_at(state.now_ms),
                ),
            )
        })
        .collect();
    let phase = match i.phase {
        Some(p) => p,
        None if i.halt.is_some() => "halting",
        None if !state.window_open => "waiting_window",
        None if ring.is_some_and(|r| {
            plan.rings.get(&r).is_some_and(|rp| rp.protected) && !state.approved.contains(&r)
        }) =>
        {
            "awaiting_approval"
        }
        None => "running",
    };
    let hosts = plan
        .host_ring
        .keys()
        .map(|h| {
            let s = state.hosts.get(h).copied().unwrap_or(HostStatus::Pending);
            (h.clone(), status_name(s))
        })
        .collect();
    let spec = i.spec;
    StatusSnapshot {
        wave_id: spec.wave_id.clone(),
        phase: phase.to_string(),
        ring,
        rings,
        pools,
        failures: (state.failures, plan.failure_budget),
        halt: i.halt.cloned(),
        next_window: if state.window_open {
            None
        } else {
            spec.window
                .as_ref()
                .and_then(|w| w.next_open(state.now_ms).map(|t| w.format(t)))
        },
        break_glass: i
            .break_glass
            .iter()
            .map(|(g, _)| {
                format!(
                    "pool {} max_out {} ({}; approvers {}){}",
                    g.pool,
                    g.max_out,
                    g.reason,
                    g.approvers.join(", "),
                    if state.now_ms > g.expires_at_ms {
                        "; EXPIRED: the pool is back to its reserve"
                    } else {
                        ""
                    }
                )
            })
            .collect(),
        ring_hosts,
        profile: spec.profile.clone(),
        version: spec.version.clone(),
        rollback_version: spec.rollback_version.clone(),
        started_at_ms: i.started_at_ms,
        updated_at_ms: i.now_ms,
        hosts,
        approver_threshold: spec.approver_threshold,
    }
}
