//! The wave plan and the pure sequencer.
//!
//! [`Plan::build`] turns an inventory and a wave spec into rings of hosts,
//! per-pool out-of-service limits and (for the dry run) batches.
//! [`next_steps`] is the whole wave policy as a pure function of the plan
//! and the observed [`WaveState`]: rings strictly in order, protected rings
//! wait for approval, a ring is promoted only when all its hosts are done,
//! its soak has passed, every finished host was watched and then gave a
//! fresh signed attestation at the end of the soak, no pool ever
//! has more hosts out of service than its limit, and nothing new starts
//! once failures exceed the budget (a soak regression counts as a failure),
//! a halt is requested, or the maintenance window is closed. It is also the
//! one place that decides a halt ([`HaltCause`]), including a stalled wave:
//! no host can start and nothing that could change that is running. The
//! I/O loop (`crate::wave`) records what it observes as facts of the
//! [`WaveState`] and only carries out what this function says.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::inventory::Inventory;
use crate::spec::WaveSpec;

/// One ring of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPlan {
    /// Ring number.
    pub ring: u32,
    /// Hosts, in dispatch order (pool, then id).
    pub hosts: Vec<String>,
    /// Dry-run batches: hosts started together when everything succeeds.
    pub batches: Vec<Vec<String>>,
    /// Waits for approvals.
    pub protected: bool,
    /// Hosts of this ring in flight at once.
    pub batch_size: usize,
    /// Soak after the ring, seconds.
    pub soak_s: u64,
}

/// One pool's capacity arithmetic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolPlan {
    /// Pool name.
    pub name: String,
    /// Hosts in the pool.
    pub size: usize,
    /// Reserve, percent.
    pub reserve_percent: u32,
    /// floor(size × reserve%), or a break-glass override.
    pub max_out: usize,
    /// Set when a break-glass approval raised the limit.
    pub break_glass: bool,
    /// When the break-glass approval expires (ms since the epoch): from then
    /// on the limit falls back to the reserve.
    #[serde(default)]
    pub break_glass_expires_at_ms: Option<i64>,
    /// Hosts already out of service before the wave (host → why).
    pub out_before: BTreeMap<String, String>,
}

impl PoolPlan {
    /// Hosts the wave itself may have out of service at once.
    pub fn available(&self) -> usize {
        self.max_out.saturating_sub(self.out_before.len())
    }

    /// floor(size × reserve%): the limit without break-glass.
    pub fn reserve_limit(&self) -> usize {
        self.size * self.reserve_percent as usize / 100
    }

    /// Whether a break-glass raised this pool's limit and has expired at `now_ms`.
    pub fn break_glass_expired(&self, now_ms: i64) -> bool {
        self.break_glass && self.break_glass_expires_at_ms.is_some_and(|t| now_ms > t)
    }

    /// Most hosts out of service at once at `now_ms`: the break-glass limit
    /// while it holds, the reserve once it has expired.
    pub fn limit_at(&self, now_ms: i64) -> usize {
        if self.break_glass_expired(now_ms) {
            self.reserve_limit()
        } else {
            self.max_out
        }
    }

    /// Hosts the wave itself may have out of service at once at `now_ms`.
    pub fn available_at(&self, now_ms: i64) -> usize {
        self.limit_at(now_ms).saturating_sub(self.out_before.len())
    }
}

/// A pool limit raised by a verified break-glass approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakGlassLimit {
    /// New limit of hosts out of service at once.
    pub max_out: u32,
    /// Expiry of the approval, ms since the epoch.
    pub expires_at_ms: i64,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Wave id.
    pub wave_id: String,
    /// Rings 0-4 that have hosts.
    pub rings: BTreeMap<u32, RingPlan>,
    /// Pools by name.
    pub pools: BTreeMap<String, PoolPlan>,
    /// Host → pool.
    pub host_pool: BTreeMap<String, String>,
    /// Host → ring.
    pub host_ring: BTreeMap<String, u32>,
    /// Global cap on hosts in flight.
    pub max_parallel: usize,
    /// Failures tolerated.
    pub failure_budget: u32,
    /// The ring-0 host that proves rollback first, if the spec asks.
    pub drill_host: Option<String>,
}

/// The wave cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// no host in the inventory
    #[error("the inventory has no hosts")]
    Empty,
    /// a host has no enrolled attestation key
    #[error("host `{0}` has no enrolled attestation key; run `ringfence inventory enroll` first")]
    NotEnrolled(String),
    /// a pool's reserve leaves no room for the wave
    #[error(
        "pool `{pool}`: {size} hosts, reserve {percent}% = {max_out} host(s) out of service at once, already out of service: {out} ({who}) — the wave can never fit; fix those hosts or sign a break-glass approval"
    )]
    CannotFit {
        /// The pool's name.
        pool: String,
        /// Hosts in the pool.
        size: usize,
        /// The pool's `reserve_percent`.
        percent: u32,
        /// Hosts the pool may have out of service at once.
        max_out: usize,
        /// Hosts already out of service (drained or unhealthy) before the wave.
        out: usize,
        /// Which hosts those are.
        who: String,
    },
    /// the rollback drill needs a ring-0 host
    #[error("rollback_drill = true needs at least one ring-0 host")]
    NoDrillHost,
    /// a break-glass approval names a pool the inventory does not have
    #[error("break-glass names pool `{pool}`, which is not in the inventory (pools: {known})")]
    BreakGlassUnknownPool {
        /// The pool the break-glass names.
        pool: String,
        /// The inventory's pools, comma-separated.
        known: String,
    },
    /// a break-glass approval allows more hosts out than the pool has
    #[error(
        "break-glass for pool `{pool}`: max_out {max_out} is more than the pool's {size} host(s)"
    )]
    BreakGlassTooLarge {
        /// The pool the break-glass names.
        pool: String,
        /// The break-glass's `max_out`.
        max_out: u32,
        /// Hosts in the pool.
        size: usize,
    },
}

/// Check break-glass limits against the inventory: the pool must exist and
/// `max_out` may not exceed its size.
pub fn check_break_glass(inv: &Inventory, pool: &str, max_out: u32) -> Result<(), PlanError> {
    if !inv.pools.values().any(|p| p.name == pool) {
        return Err(PlanError::BreakGlassUnknownPool {
            pool: pool.to_string(),
            known: inv
                .pools
                .values()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let size = inv.hosts.iter().filter(|h| h.pool == pool).count();
    if max_out as usize > size {
        return Err(PlanError::BreakGlassTooLarge {
            pool: pool.to_string(),
            max_out,
            size,
        });
    }
    Ok(())
}

impl Plan {
    /// Build the plan. `out_before`: hosts already out of service (unhealthy
    /// or drained) and why; `overrides`: break-glass limits per pool (each
    /// pool must exist, and its `max_out` may not exceed the pool's size).
    pub fn build(
        inv: &Inventory,
        spec: &WaveSpec,
        out_before: &BTreeMap<String, String>,
        overrides: &BTreeMap<String, BreakGlassLimit>,
    ) -> Result<Self, PlanError> {
        if inv.hosts.is_empty() {
            return Err(PlanError::Empty);
        }
        for (pool, o) in overrides {
            check_break_glass(inv, pool, o.max_out)?;
        }
        if let Some(h) = inv.hosts.iter().find(|h| h.attestation_key.is_none()) {
            return Err(PlanError::NotEnrolled(h.id.clone()));
        }
        let mut pools: BTreeMap<String, PoolPlan> = BTreeMap::new();
        for p in inv.pools.values() {
            let size = inv.hosts.iter().filter(|h| h.pool == p.name).count();
            let floor = size * p.reserve_percent as usize / 100;
            let (max_out, break_glass, expires) = match overrides.get(&p.name) {
                Some(o) => ((o.max_out as usize).max(floor), true, Some(o.expires_at_ms)),
                None => (floor, false, None),
            };
            let out: BTreeMap<String, String> = inv
                .hosts
                .iter()
                .filter(|h| h.pool == p.name)
                .filter_map(|h| out_before.get(&h.id).map(|why| (h.id.clone(), why.clone())))
                .collect();
            pools.insert(
                p.name.clone(),
                PoolPlan {
                    name: p.name.clone(),
                    size,
                    reserve_percent: p.reserve_percent,
                    max_out,
                    break_glass,
                    break_glass_expires_at_ms: expires,
                    out_before: out,
                },
            );
        }
        for p in pools.values() {
            if p.size > 0 && p.available() == 0 {
                return Err(PlanError::CannotFit {
                    pool: p.name.clone(),
                    size: p.size,
                    percent: p.reserve_percent,
                    max_out: p.max_out,
                    out: p.out_before.len(),
                    who: if p.out_before.is_empty() {
                        "none".into()
                    } else {
                        p.out_before
                            .iter()
                            .map(|(h, w)| format!("{h} {w}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                });
            }
        }
        let mut rings = BTreeMap::new();
        let mut host_pool = BTreeMap::new();
        let mut host_ring = BTreeMap::new();
        for r in 0..=4u32 {
            let mut hosts: Vec<(&str, &str)> = inv
                .hosts
                .iter()
                .filter(|h| h.ring == r)
                .map(|h| (h.pool.as_str(), h.id.as_str()))
                .collect();
            if hosts.is_empty() {
                continue;
            }
            hosts.sort();
            let rs = spec
                .rings
                .get(&r)
                .copied()
                .unwrap_or_else(|| crate::spec::default_ring(r));
            let ids: Vec<String> = hosts.iter().map(|(_, id)| (*id).to_string()).collect();
            for (pool, id) in &hosts {
                host_pool.insert((*id).to_string(), (*pool).to_string());
                host_ring.insert((*id).to_string(), r);
            }
            let batches = batches(
                &ids,
                &host_pool,
                &pools,
                rs.batch_size.min(spec.max_parallel_hosts),
            );
            rings.insert(
                r,
                RingPlan {
                    ring: r,
                    hosts: ids,
                    batches,
                    protected: spec.protected_rings.contains(&r),
                    batch_size: rs.batch_size,
                    soak_s: rs.soak_s,
                },
            );
        }
        let drill_host = if spec.rollback_drill {
            Some(
                rings
                    .get(&0)
                    .and_then(|r| r.hosts.first().cloned())
                    .ok_or(PlanError::NoDrillHost)?,
            )
        } else {
            None
        };
        Ok(Self {
            wave_id: spec.wave_id.clone(),
            rings,
            pools,
            host_pool,
            host_ring,
            max_parallel: spec.max_parallel_hosts,
            failure_budget: spec.failure_budget,
            drill_host,
        })
    }

    /// Most hosts of `pool` the wave may have out of service at once.
    pub fn pool_limit(&self, pool: &str) -> usize {
        self.pools.get(pool).map_or(0, PoolPlan::available)
    }

    /// [`pool_limit`](Self::pool_limit) at `now_ms` (an expired break-glass
    /// no longer counts).
    pub fn pool_limit_at(&self, pool: &str, now_ms: i64) -> usize {
        self.pools.get(pool).map_or(0, |p| p.available_at(now_ms))
    }
}

/// Greedy batches: up to `size` hosts, never more of a pool than it allows.
fn batches(
    ids: &[String],
    host_pool: &BTreeMap<String, String>,
    pools: &BTreeMap<String, PoolPlan>,
    size: usize,
) -> Vec<Vec<String>> {
    let mut left: Vec<&String> = ids.iter().collect();
    let mut out = Vec::new();
    while !left.is_empty() {
        let mut batch = Vec::new();
        let mut per_pool: BTreeMap<&str, usize> = BTreeMap::new();
        left.retain(|id| {
            if batch.len() >= size.max(1) {
                return true;
            }
            let pool = host_pool.get(*id).map(String::as_str).unwrap_or("");
            let limit = pools.get(pool).map_or(1, PoolPlan::available).max(1);
            let n = per_pool.entry(pool).or_default();
            if *n < limit {
                *n += 1;
                batch.push((*id).clone());
                false
            } else {
                true
            }
        });
        out.push(batch);
    }
    out
}

/// What the coordinator knows about one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Not started.
    Pending,
    /// Started: draining, patching, validating, undraining (out of service).
    InFlight,
    /// Patched, attested healthy, back in service.
    Done,
    /// Failed; left drained (out of service).
    Failed,
    /// Skipped by an operator decision (not patched; out of service while
    /// it is in [`WaveState::left_drained`]).
    Skipped,
}

/// Where a ring is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum RingStatus {
    /// Not reached yet.
    Waiting,
    /// Every host finished; watched until `since_ms + soak`.
    Soaking {
        /// When the soak began.
        since_ms: i64,
    },
    /// Promoted.
    Complete,
}

/// Everything observed so far (persisted by the I/O loop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WaveState {
    /// Per host.
    pub hosts: BTreeMap<String, HostStatus>,
    /// Per ring.
    pub rings: BTreeMap<u32, RingStatus>,
    /// Failures counted against the budget.
    pub failures: u32,
    /// Rings whose approvals are in hand.
    pub approved: BTreeSet<u32>,
    /// An operator asked for a halt.
    pub halt_requested: bool,
    /// Whether the maintenance window is open now.
    pub window_open: bool,
    /// Now, ms since the epoch.
    pub now_ms: i64,
    /// Hosts other waves have out of service, per pool (from the pool ledger).
    #[serde(default)]
    pub others_out: BTreeMap<String, usize>,
    /// Failed hosts an operator skipped or retried, left drained by this
    /// wave: out of service while skipped or pending again, until seen
    /// undrained (checked on each resume).
    #[serde(default)]
    pub left_drained: BTreeSet<String>,
    /// Hosts of a soaking ring a watcher has had a health report from.
    /// Not stored: a resumed wave watches its soaking ring again.
    #[serde(skip)]
    pub watched: BTreeSet<String>,
    /// Hosts that regressed during their soak and that the wave is
    /// draining again now. Not stored.
    #[serde(skip)]
    pub redraining: BTreeSet<String>,
    /// Hosts of a soaking ring whose end-of-soak attestation (fresh nonce,
    /// enrolled key) verified and was not UNHEALTHY. Not stored: a resumed
    /// wave asks again.
    #[serde(skip)]
    pub soak_attested: BTreeSet<String>,
}

impl WaveState {
    /// Every host pending, every ring waiting, window open.
    pub fn new(plan: &Plan) -> Self {
        Self {
            hosts: plan
                .host_ring
                .keys()
                .map(|h| (h.clone(), HostStatus::Pending))
                .collect(),
            rings: plan
                .rings
                .keys()
                .map(|r| (*r, RingStatus::Waiting))
                .collect(),
            failures: 0,
            approved: BTreeSet::new(),
            halt_requested: false,
            window_open: true,
            now_ms: 0,
            others_out: BTreeMap::new(),
            left_drained: BTreeSet::new(),
            watched: BTreeSet::new(),
            redraining: BTreeSet::new(),
            soak_attested: BTreeSet::new(),
        }
    }

    fn status(&self, host: &str) -> HostStatus {
        self.hosts.get(host).copied().unwrap_or(HostStatus::Pending)
    }
}

/// One thing the I/O loop must do now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Start this host's pipeline.
    Start(String),
    /// The ring waits for approvals.
    AwaitApproval(u32),
    /// Every host of the ring finished: start watching it.
    StartSoak(u32),
    /// The ring's soak time passed and every finished host was watched:
    /// ask each finished host without one for a fresh signed attestation.
    AttestSoak(u32),
    /// Promote the ring (write its evidence).
    Promote(u32),
    /// Stop dispatching; in-flight hosts finish their step.
    Halt(HaltCause),
    /// Nothing starts until the maintenance window opens.
    WindowClosed,
    /// Nothing to do until something changes.
    Wait(String),
    /// Every ring is complete.
    Done,
}

/// Why the wave halts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HaltCause {
    /// More hosts failed (a soak regression included) than the budget allows.
    Budget {
        /// Failures counted.
        failures: u32,
        /// The failure budget.
        budget: u32,
    },
    /// An operator asked for a halt (`wave halt`).
    Requested,
    /// No host can start, and nothing running (no host in flight or being
    /// drained again, no soak, no other wave's host out) will change that.
    Stalled(String),
}

impl std::fmt::Display for HaltCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Budget { failures, budget } => write!(
                f,
                "{failures} failure(s) exceed the failure budget of {budget}"
            ),
            Self::Requested => f.write_str("an operator requested a halt"),
            Self::Stalled(why) => f.write_str(why),
        }
    }
}

/// Whether this wave has host `h` out of service: in flight, failed (left
/// drained), or skipped or retried while still drained.
pub fn is_out(state: &WaveState, h: &str, s: HostStatus) -> bool {
    match s {
        HostStatus::InFlight | HostStatus::Failed => true,
        HostStatus::Skipped | HostStatus::Pending => state.left_drained.contains(h),
        HostStatus::Done => false,
    }
}

/// Hosts out of service per pool: in flight, failed (left drained), skipped
/// or retried while still drained, or out before the wave.
pub fn out_of_service(plan: &Plan, state: &WaveState) -> BTreeMap<String, usize> {
    let mut out: BTreeMap<String, usize> = plan.pools.keys().map(|p| (p.clone(), 0)).collect();
    for (h, s) in &state.hosts {
        if is_out(state, h, *s)
            && let Some(p) = plan.host_pool.get(h)
        {
            *out.entry(p.clone()).or_default() += 1;
        }
    }
    out
}

/// The wave policy: what to do next, given the plan and what was observed.
pub fn next_steps(plan: &Plan, state: &WaveState) -> Vec<Step> {
    if state.failures > plan.failure_budget {
        return vec![Step::Halt(HaltCause::Budget {
            failures: state.failures,
            budget: plan.failure_budget,
        })];
    }
    if state.halt_requested {
        return vec![Step::Halt(HaltCause::Requested)];
    }
    let Some((&ring, rp)) = plan
        .rings
        .iter()
        .find(|(r, _)| state.rings.get(r) != Some(&RingStatus::Complete))
    else {
        return vec![Step::Done];
    };
    let statuses: Vec<HostStatus> = rp.hosts.iter().map(|h| state.status(h)).collect();
    let finished = statuses.iter().all(|s| {
        matches!(
            s,
            HostStatus::Done | HostStatus::Failed | HostStatus::Skipped
        )
    });
    let soaking = matches!(state.rings.get(&ring), Some(RingStatus::Soaking { .. }));
    if finished {
        return match state.rings.get(&ring) {
            Some(RingStatus::Soaking { since_ms }) => {
                let until = since_ms.saturating_add(
                    i64::try_from(rp.soak_s)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(1000),
                );
                // Every finished host must have been seen through its
                // health watch: an unwatched ring was not soaked.
                let unwatched = rp
                    .hosts
                    .iter()
                    .filter(|h| state.status(h) == HostStatus::Done && !state.watched.contains(*h))
                    .count();
                // Promotion rests on signed evidence: a fresh attestation
                // of every finished host at the end of the soak.
                let unattested = rp
                    .hosts
                    .iter()
                    .filter(|h| {
                        state.status(h) == HostStatus::Done && !state.soak_attested.contains(*h)
                    })
                    .count();
                if state.now_ms < until {
                    vec![Step::Wait(format!(
                        "ring {ring} soaking, {} s left",
                        (until - state.now_ms + 999) / 1000
                    ))]
                } else if unwatched > 0 {
                    vec![Step::Wait(format!(
                        "ring {ring} soak time passed; waiting for the first health report of {unwatched} host(s)"
                    ))]
                } else if unattested > 0 {
                    vec![Step::AttestSoak(ring)]
                } else {
                    vec![Step::Promote(ring)]
                }
            }
            _ if rp.soak_s == 0 => vec![Step::Promote(ring)],
            _ => vec![Step::StartSoak(ring)],
        };
    }
    if rp.protected && !state.approved.contains(&ring) {
        return vec![Step::AwaitApproval(ring)];
    }
    if !state.window_open {
        return vec![Step::WindowClosed];
    }
    // The rollback drill host goes alone, before anything else in ring 0.
    if ring == 0
        && let Some(d) = &plan.drill_host
    {
        match state.status(d) {
            HostStatus::Pending => return vec![Step::Start(d.clone())],
            HostStatus::InFlight => {
                return vec![Step::Wait(format!("rollback drill on {d}"))];
            }
            _ => {}
        }
    }
    let mut in_flight_total = state
        .hosts
        .values()
        .filter(|s| **s == HostStatus::InFlight)
        .count();
    let mut in_flight_ring = statuses
        .iter()
        .filter(|s| **s == HostStatus::InFlight)
        .count();
    // Out of service per pool: this wave's hosts and other waves' hosts
    // (the pool ledger), against the limit now (an expired break-glass
    // falls back to the reserve).
    let mut out = out_of_service(plan, state);
    for (p, n) in &state.others_out {
        *out.entry(p.clone()).or_default() += n;
    }
    let mut steps = Vec::new();
    let mut blocked: BTreeSet<String> = BTreeSet::new();
    for h in &rp.hosts {
        if state.status(h) != HostStatus::Pending {
            continue;
        }
        if in_flight_total >= plan.max_parallel || in_flight_ring >= rp.batch_size {
            break;
        }
        let pool = plan.host_pool.get(h).cloned().unwrap_or_default();
        let used = out.get(&pool).copied().unwrap_or(0);
        if used >= plan.pool_limit_at(&pool, state.now_ms) {
            blocked.insert(pool);
            continue;
        }
        *out.entry(pool).or_default() += 1;
        in_flight_total += 1;
        in_flight_ring += 1;
        steps.push(Step::Start(h.clone()));
    }
    if steps.is_empty() {
        let mut why = format!("ring {ring}: hosts in flight or pool reserves in use");
        for p in &blocked {
            let others = state.others_out.get(p).copied().unwrap_or(0);
            if others > 0 {
                why.push_str(&format!("; pool {p}: {others} host(s) out in other waves"));
            }
            if plan
                .pools
                .get(p)
                .is_some_and(|pp| pp.break_glass_expired(state.now_ms))
            {
                why.push_str(&format!(
                    "; pool {p}: break-glass expired, back to its reserve"
                ));
            }
        }
        // Nothing runs and nothing will change by itself: failed hosts
        // hold the pool reserve.
        let busy = in_flight_total > 0
            || !state.redraining.is_empty()
            || soaking
            || state.others_out.values().any(|n| *n > 0);
        if !busy {
            return vec![Step::Halt(HaltCause::Stalled(format!(
                "no host can start: {why} (failed hosts hold the pool reserve)"
            )))];
        }
        steps.push(Step::Wait(why));
    }
    steps
}

/// `wave plan` as text.
pub fn render_text(plan: &Plan) -> String {
    use std::fmt::Write;
    let mut s = format!("wave {}\n", plan.wave_id);
    for r in plan.rings.values() {
        let _ = writeln!(
            s,
            "ring {}{}: {} host(s), batch size {}, soak {} s{}",
            r.ring,
            ring_name(r.ring),
            r.hosts.len(),
            r.batch_size,
            r.soak_s,
            if r.protected {
                ", PROTECTED (waits for approvals)"
            } else {
                ""
            }
        );
        for (i, b) in r.batches.iter().enumerate() {
            let _ = writeln!(s, "  batch {}: {}", i + 1, b.join(", "));
        }
    }
    let _ = writeln!(s, "pools:");
    for p in plan.pools.values() {
        let _ = writeln!(
            s,
            "  {}: {} host(s), reserve {}% → at most {} out of service at once{}{}",
            p.name,
            p.size,
            p.reserve_percent,
            p.max_out,
            if p.break_glass { " (BREAK-GLASS)" } else { "" },
            if p.out_before.is_empty() {
                String::new()
            } else {
                format!(
                    "; already out: {}",
                    p.out_before.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            }
        );
    }
    let _ = writeln!(
        s,
        "failure budget: {}; max hosts in flight: {}{}",
        plan.failure_budget,
        plan.max_parallel,
        plan.drill_host
            .as_ref()
            .map(|d| format!("; rollback drill on {d}"))
            .unwrap_or_default()
    );
    s
}

/// `wave plan --json`.
pub fn render_json(plan: &Plan) -> serde_json::Value {
    serde_json::to_value(plan).unwrap_or(serde_json::Value::Null)
}

/// " (canary)" etc.
pub fn ring_name(r: u32) -> &'static str {
    match r {
        0 => " (internal)",
        1 => " (UAT/security)",
        2 => " (canary)",
        3 => " (broad production)",
        4 => " (sensitive tenants)",
        _ => "",
    }
}
