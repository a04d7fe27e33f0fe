#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The wave policy as table tests of a pure function, and a property test
//! that drives random fleets to completion and checks the invariants.

use std::collections::BTreeMap;

use proptest::prelude::*;
use ringfence::config::Source;
use ringfence_coordinator::inventory::Inventory;
use ringfence_coordinator::plan::{
    BreakGlassLimit, HaltCause, HostStatus, Plan, PlanError, RingStatus, Step, WaveState,
    next_steps, out_of_service,
};
use ringfence_coordinator::spec::WaveSpec;

const KEY: &str = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

/// `hosts`: (id, pool, ring).
fn inventory(pools: &[(&str, u32)], hosts: &[(&str, &str, u32)]) -> Inventory {
    let mut t = String::from("trust_domain = \"t.test\"\n");
    for (p, pct) in pools {
        t.push_str(&format!(
            "[[pool]]\nname = \"{p}\"\nreserve_percent = {pct}\n"
        ));
    }
    for (id, pool, ring) in hosts {
        t.push_str(&format!(
            "[[host]]\nid = \"{id}\"\naddress = \"10.0.0.1:7443\"\npool = \"{pool}\"\nring = {ring}\nattestation_key = \"{KEY}\"\n"
        ));
    }
    Inventory::from_source(&Source::from_text("inv.toml", t)).unwrap()
}

fn spec(extra: &str) -> WaveSpec {
    WaveSpec::from_source(&Source::from_text(
        "wave.toml",
        format!("wave_id = \"w\"\nprofile = \"p\"\nversion = \"1.0.0\"\n{extra}"),
    ))
    .unwrap()
}

fn plan(inv: &Inventory, extra: &str) -> Plan {
    Plan::build(inv, &spec(extra), &BTreeMap::new(), &BTreeMap::new()).unwrap()
}

fn starts(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::Start(h) => Some(h.clone()),
            _ => None,
        })
        .collect()
}

fn fleet_5_rings() -> Inventory {
    inventory(
        &[("a", 50), ("b", 50)],
        &[
            ("r0", "a", 0),
            ("r1", "b", 1),
            ("c1", "a", 2),
            ("c2", "b", 2),
            ("p1", "a", 3),
            ("p2", "b", 3),
            ("s1", "a", 4),
        ],
    )
}

#[test]
fn rings_go_strictly_in_order() {
    let inv = fleet_5_rings();
    let p = plan(
        &inv,
        "protected_rings = []\n[ring.2]\nbatch_size = 2\nsoak_s = 0\n[ring.3]\nbatch_size = 2\nsoak_s = 0\n[ring.4]\nbatch_size = 1\nsoak_s = 0\n",
    );
    let mut st = WaveState::new(&p);
    assert_eq!(starts(&next_steps(&p, &st)), ["r0"]);
    st.hosts.insert("r0".into(), HostStatus::InFlight);
    assert!(
        starts(&next_steps(&p, &st)).is_empty(),
        "ring 1 waits for ring 0"
    );
    st.hosts.insert("r0".into(), HostStatus::Done);
    assert_eq!(next_steps(&p, &st), [Step::Promote(0)]);
    st.rings.insert(0, RingStatus::Complete);
    assert_eq!(starts(&next_steps(&p, &st)), ["r1"]);
}

#[test]
fn canary_failure_halts_before_ring_3() {
    let inv = fleet_5_rings();
    let p = plan(
        &inv,
        "protected_rings = []\n[ring.2]\nbatch_size = 2\nsoak_s = 0\n",
    );
    let mut st = WaveState::new(&p);
    for h in ["r0", "r1"] {
        st.hosts.insert(h.into(), HostStatus::Done);
    }
    st.rings.insert(0, RingStatus::Complete);
    st.rings.insert(1, RingStatus::Complete);
    assert_eq!(starts(&next_steps(&p, &st)), ["c1", "c2"]);
    st.hosts.insert("c1".into(), HostStatus::Failed);
    st.hosts.insert("c2".into(), HostStatus::Done);
    st.failures = 1;
    let steps = next_steps(&p, &st);
    assert!(
        matches!(&steps[..], [Step::Halt(r @ HaltCause::Budget { failures: 1, budget: 0 })]
            if r.to_string().contains("failure budget of 0")),
        "{steps:?}"
    );
}

#[test]
fn failure_budget_of_one_tolerates_one_failure() {
    let inv = fleet_5_rings();
    let p = plan(&inv, "protected_rings = []\nfailure_budget = 1\n");
    let mut st = WaveState::new(&p);
    st.hosts.insert("r0".into(), HostStatus::Failed);
    st.failures = 1;
    assert_eq!(next_steps(&p, &st), [Step::Promote(0)]);
    st.failures = 2;
    assert!(matches!(next_steps(&p, &st)[0], Step::Halt(_)));
}

#[test]
fn reserve_15_percent_of_10_never_has_2_out_at_once() {
    let hosts: Vec<(String, &str, u32)> = (0..10).map(|i| (format!("h{i}"), "big", 3)).collect();
    let refs: Vec<(&str, &str, u32)> = hosts.iter().map(|(a, b, c)| (a.as_str(), *b, *c)).collect();
    let inv = inventory(&[("big", 15)], &refs);
    let p = plan(
        &inv,
        "protected_rings = []\n[ring.3]\nbatch_size = 5\nsoak_s = 0\n",
    );
    assert_eq!(p.pools["big"].max_out, 1);
    assert!(
        p.rings[&3].batches.iter().all(|b| b.len() == 1),
        "{:?}",
        p.rings[&3].batches
    );
    let st = WaveState::new(&p);
    assert_eq!(starts(&next_steps(&p, &st)).len(), 1);
}

#[test]
fn a_pool_whose_reserve_is_used_up_refuses_to_plan() {
    let inv = inventory(
        &[("big", 15)],
        &(0..10)
            .map(|i| {
                (
                    Box::leak(format!("h{i}").into_boxed_str()) as &str,
                    "big",
                    3,
                )
            })
            .collect::<Vec<_>>(),
    );
    let mut out = BTreeMap::new();
    out.insert(
        "h3".to_string(),
        "UNHEALTHY (row_remap_pending)".to_string(),
    );
    let err = Plan::build(&inv, &spec(""), &out, &BTreeMap::new()).unwrap_err();
    assert!(matches!(err, PlanError::CannotFit { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("pool `big`: 10 hosts, reserve 15% = 1"),
        "{msg}"
    );
    assert!(msg.contains("h3 UNHEALTHY"), "{msg}");
    // A break-glass override for that pool lets it fit.
    let mut bg = BTreeMap::new();
    bg.insert(
        "big".to_string(),
        BreakGlassLimit {
            max_out: 2,
            expires_at_ms: i64::MAX,
        },
    );
    let p = Plan::build(&inv, &spec(""), &out, &bg).unwrap();
    assert!(p.pools["big"].break_glass);
    assert_eq!(p.pool_limit("big"), 1);
}

#[test]
fn failed_hosts_stay_out_of_service_and_use_the_reserve() {
    let (p, st) = failed_host_holds_the_reserve();
    assert_eq!(out_of_service(&p, &st)["p"], 1);
    assert!(
        starts(&next_steps(&p, &st)).is_empty(),
        "the failed host holds the only slot"
    );
}

/// Five hosts of one pool (reserve 20%: one out at a time) in ring 3, and
/// host `a` failed (left drained), so it holds the only slot.
fn failed_host_holds_the_reserve() -> (Plan, WaveState) {
    let inv = inventory(
        &[("p", 20)],
        &[
            ("a", "p", 3),
            ("b", "p", 3),
            ("c", "p", 3),
            ("d", "p", 3),
            ("e", "p", 3),
        ],
    );
    let p = plan(
        &inv,
        "protected_rings = []\nfailure_budget = 5\n[ring.3]\nbatch_size = 5\nsoak_s = 0\n",
    );
    let mut st = WaveState::new(&p);
    st.hosts.insert("a".into(), HostStatus::Failed);
    st.failures = 1;
    (p, st)
}

#[test]
fn a_wave_stalls_only_when_nothing_running_can_free_a_slot() {
    // Each row: what else is going on, and whether the wave waits (true)
    // or halts as stalled (false).
    type Fact = fn(&mut WaveState);
    let rows: [(&str, Fact, bool); 5] = [
        ("nothing else", |_| {}, false),
        (
            "another host in flight",
            |st| {
                st.hosts.insert("b".into(), HostStatus::InFlight);
            },
            true,
        ),
        (
            "a soak regression being drained again",
            |st| {
                st.redraining.insert("e".into());
            },
            true,
        ),
        (
            "another wave holds a host of the pool",
            |st| {
                st.others_out.insert("p".into(), 1);
            },
            true,
        ),
        (
            "the ring soaks (a retried host waits)",
            |st| {
                st.rings.insert(3, RingStatus::Soaking { since_ms: 0 });
            },
            true,
        ),
    ];
    for (what, fact, waits) in rows {
        let (p, mut st) = failed_host_holds_the_reserve();
        fact(&mut st);
        let steps = next_steps(&p, &st);
        if waits {
            assert!(matches!(&steps[..], [Step::Wait(_)]), "{what}: {steps:?}");
        } else {
            assert!(
                matches!(&steps[..], [Step::Halt(HaltCause::Stalled(why))]
                    if why.contains("no host can start") && why.contains("failed hosts hold the pool reserve")),
                "{what}: {steps:?}"
            );
        }
    }
}

#[test]
fn a_soaking_ring_is_promoted_only_when_every_finished_host_was_watched() {
    let inv = fleet_5_rings();
    let p = plan(
        &inv,
        "protected_rings = []\nfailure_budget = 1\n[ring.2]\nbatch_size = 2\nsoak_s = 60\n",
    );
    let mut st = WaveState::new(&p);
    for h in ["r0", "r1"] {
        st.hosts.insert(h.into(), HostStatus::Done);
    }
    st.rings.insert(0, RingStatus::Complete);
    st.rings.insert(1, RingStatus::Complete);
    st.hosts.insert("c1".into(), HostStatus::Done);
    st.hosts.insert("c2".into(), HostStatus::Done);
    st.rings.insert(2, RingStatus::Soaking { since_ms: 0 });
    st.now_ms = 61_000;
    // Soak time passed, but no watcher has reported yet.
    let steps = next_steps(&p, &st);
    assert!(
        matches!(&steps[..], [Step::Wait(w)] if w.contains("first health report of 2 host(s)")),
        "{steps:?}"
    );
    st.watched.insert("c1".into());
    let steps = next_steps(&p, &st);
    assert!(
        matches!(&steps[..], [Step::Wait(w)] if w.contains("of 1 host(s)")),
        "{steps:?}"
    );
    st.watched.insert("c2".into());
    // Watched through the soak: each host attests at its end.
    assert_eq!(next_steps(&p, &st), [Step::AttestSoak(2)]);
    st.soak_attested.insert("c1".into());
    assert_eq!(next_steps(&p, &st), [Step::AttestSoak(2)]);
    st.soak_attested.insert("c2".into());
    assert_eq!(next_steps(&p, &st), [Step::Promote(2)]);
    // Attested but not watched (a resumed wave): wait for the watch.
    st.watched.remove("c1");
    assert!(matches!(&next_steps(&p, &st)[..], [Step::Wait(w)] if w.contains("of 1 host(s)")));
    st.watched.insert("c1".into());
    // Before the soak time passed, watching alone promotes nothing.
    st.now_ms = 30_000;
    assert!(matches!(&next_steps(&p, &st)[..], [Step::Wait(w)] if w.contains("s left")));
}

#[test]
fn a_soak_regression_is_a_failure_the_budget_decides_on() {
    let inv = fleet_5_rings();
    let soaking = |budget: u32| {
        let p = plan(
            &inv,
            &format!(
                "protected_rings = []\nfailure_budget = {budget}\n[ring.2]\nbatch_size = 2\nsoak_s = 60\n"
            ),
        );
        let mut st = WaveState::new(&p);
        for h in ["r0", "r1", "c1", "c2"] {
            st.hosts.insert(h.into(), HostStatus::Done);
        }
        st.rings.insert(0, RingStatus::Complete);
        st.rings.insert(1, RingStatus::Complete);
        st.rings.insert(2, RingStatus::Soaking { since_ms: 0 });
        st.watched.extend(["c1".to_string(), "c2".to_string()]);
        st.soak_attested.insert("c2".to_string());
        // c1 regressed: failed, counted, being drained again.
        st.hosts.insert("c1".into(), HostStatus::Failed);
        st.failures = 1;
        st.redraining.insert("c1".into());
        st.now_ms = 61_000;
        (p, st)
    };
    let (p, st) = soaking(0);
    assert_eq!(
        next_steps(&p, &st),
        [Step::Halt(HaltCause::Budget {
            failures: 1,
            budget: 0
        })]
    );
    // Within the budget the ring is promoted once the soak passed (the
    // failed host is left drained; only the finished host attests).
    let (p, mut st) = soaking(1);
    assert_eq!(next_steps(&p, &st), [Step::Promote(2)]);
    st.soak_attested.clear();
    assert_eq!(next_steps(&p, &st), [Step::AttestSoak(2)]);
    // An end-of-soak attestation that fails is a soak regression: c2 failed too.
    st.hosts.insert("c2".into(), HostStatus::Failed);
    st.failures = 2;
    assert_eq!(
        next_steps(&p, &st),
        [Step::Halt(HaltCause::Budget {
            failures: 2,
            budget: 1
        })]
    );
}

#[test]
fn runtime_facts_are_not_stored_with_the_wave_state() {
    let (_, mut st) = failed_host_holds_the_reserve();
    st.watched.insert("b".into());
    st.redraining.insert("a".into());
    st.soak_attested.insert("b".into());
    let json = serde_json::to_value(&st).unwrap();
    assert!(
        json.get("watched").is_none()
            && json.get("redraining").is_none()
            && json.get("soak_attested").is_none(),
        "{json}"
    );
    let back: WaveState = serde_json::from_value(json).unwrap();
    assert!(back.watched.is_empty() && back.redraining.is_empty() && back.soak_attested.is_empty());
    assert_eq!(back.hosts, st.hosts);
}

#[test]
fn protected_ring_waits_for_approval() {
    let inv = fleet_5_rings();
    let p = plan(&inv, "[ring.2]\nbatch_size = 2\nsoak_s = 0\n");
    let mut st = WaveState::new(&p);
    for h in ["r0", "r1"] {
        st.hosts.insert(h.into(), HostStatus::Done);
    }
    st.rings.insert(0, RingStatus::Complete);
    st.rings.insert(1, RingStatus::Complete);
    assert_eq!(next_steps(&p, &st), [Step::AwaitApproval(2)]);
    st.approved.insert(2);
    assert_eq!(starts(&next_steps(&p, &st)), ["c1", "c2"]);
}

#[test]
fn soak_must_pass_before_promotion() {
    let inv = fleet_5_rings();
    let p = plan(
        &inv,
        "protected_rings = []\n[ring.0]\nbatch_size = 1\nsoak_s = 60\n",
    );
    let mut st = WaveState::new(&p);
    st.hosts.insert("r0".into(), HostStatus::Done);
    st.now_ms = 1_000;
    assert_eq!(next_steps(&p, &st), [Step::StartSoak(0)]);
    st.rings.insert(0, RingStatus::Soaking { since_ms: 1_000 });
    st.now_ms = 30_000;
    assert!(matches!(next_steps(&p, &st)[0], Step::Wait(_)));
    st.now_ms = 61_000;
    st.watched.insert("r0".into());
    assert_eq!(next_steps(&p, &st), [Step::AttestSoak(0)]);
    st.soak_attested.insert("r0".into());
    assert_eq!(next_steps(&p, &st), [Step::Promote(0)]);
}

#[test]
fn closed_window_starts_nothing_and_halt_stops_dispatch() {
    let inv = fleet_5_rings();
    let p = plan(&inv, "protected_rings = []\n");
    let mut st = WaveState::new(&p);
    st.window_open = false;
    assert_eq!(next_steps(&p, &st), [Step::WindowClosed]);
    st.window_open = true;
    st.halt_requested = true;
    assert!(matches!(next_steps(&p, &st)[0], Step::Halt(_)));
}

#[test]
fn rollback_drill_host_goes_alone_first() {
    let inv = inventory(
        &[("a", 50)],
        &[
            ("r0a", "a", 0),
            ("r0b", "a", 0),
            ("r0c", "a", 0),
            ("r0d", "a", 0),
        ],
    );
    let p = plan(
        &inv,
        "rollback_drill = true\nprotected_rings = []\n[ring.0]\nbatch_size = 3\nsoak_s = 0\n",
    );
    assert_eq!(p.drill_host.as_deref(), Some("r0a"));
    let mut st = WaveState::new(&p);
    assert_eq!(starts(&next_steps(&p, &st)), ["r0a"]);
    st.hosts.insert("r0a".into(), HostStatus::InFlight);
    assert!(starts(&next_steps(&p, &st)).is_empty());
    st.hosts.insert("r0a".into(), HostStatus::Done);
    assert_eq!(starts(&next_steps(&p, &st)), ["r0b", "r0c"]);
}

#[test]
fn plan_is_deterministic_and_unenrolled_hosts_refuse() {
    let inv = fleet_5_rings();
    assert_eq!(plan(&inv, ""), plan(&inv, ""));
    let mut t = String::from("trust_domain = \"t.test\"\n[[pool]]\nname = \"a\"\n");
    t.push_str("[[host]]\nid = \"x\"\naddress = \"h:1\"\npool = \"a\"\nring = 0\n");
    let inv = Inventory::from_source(&Source::from_text("i", t)).unwrap();
    assert_eq!(
        Plan::build(&inv, &spec(""), &BTreeMap::new(), &BTreeMap::new()),
        Err(PlanError::NotEnrolled("x".into()))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Drive random fleets with random outcomes to the end: no pool ever
    /// exceeds its limit, and no host of ring N starts while a host of an
    /// earlier ring is unfinished.
    #[test]
    fn invariants_hold_for_random_fleets(
        hosts in prop::collection::vec((0u32..5, 0usize..3), 1..40),
        batch in 1usize..6,
        fail_mask in any::<u64>(),
        budget in 0u32..3,
    ) {
        let pools = [("p0", 20u32), ("p1", 30), ("p2", 50)];
        let named: Vec<(String, &str, u32)> = hosts
            .iter()
            .enumerate()
            .map(|(i, (ring, pool))| (format!("h{i:02}"), pools[*pool].0, *ring))
            .collect();
        let refs: Vec<(&str, &str, u32)> = named.iter().map(|(a, b, c)| (a.as_str(), *b, *c)).collect();
        let inv = inventory(&pools, &refs);
        let extra = format!(
            "protected_rings = []\nfailure_budget = {budget}\n{}",
            (0..5).map(|r| format!("[ring.{r}]\nbatch_size = {batch}\nsoak_s = 0\n")).collect::<String>()
        );
        let Ok(p) = Plan::build(&inv, &spec(&extra), &BTreeMap::new(), &BTreeMap::new()) else {
            // Pools too small for any host to leave: the plan refuses, fine.
            return Ok(());
        };
        let mut st = WaveState::new(&p);
        let mut i = 0u32;
        for _ in 0..1000 {
            let steps = next_steps(&p, &st);
            let mut progressed = false;
            for s in &steps {
                match s {
                    Step::Start(h) => {
                        let ring = p.host_ring[h];
                        for (other, r) in &p.host_ring {
                            if *r < ring {
                                prop_assert!(matches!(st.hosts[other], HostStatus::Done | HostStatus::Failed | HostStatus::Skipped));
                            }
                        }
                        st.hosts.insert(h.clone(), HostStatus::InFlight);
                        progressed = true;
                    }
                    Step::Promote(r) => { st.rings.insert(*r, RingStatus::Complete); progressed = true; }
                    Step::StartSoak(r) => { st.rings.insert(*r, RingStatus::Soaking { since_ms: 0 }); progressed = true; }
                    Step::Halt(_) | Step::Done => return Ok(()),
                    Step::AttestSoak(_) | Step::AwaitApproval(_) | Step::WindowClosed | Step::Wait(_) => {}
                }
            }
            for (pool, n) in out_of_service(&p, &st) {
                prop_assert!(n <= p.pool_limit(&pool), "pool {pool}: {n} out, limit {}", p.pool_limit(&pool));
            }
            // Finish one in-flight host.
            if let Some(h) = st.hosts.iter().find(|(_, s)| **s == HostStatus::InFlight).map(|(h, _)| h.clone()) {
                let fails = fail_mask & (1 << (i % 64)) != 0 && i.is_multiple_of(7);
                i += 1;
                st.hosts.insert(h, if fails { HostStatus::Failed } else { HostStatus::Done });
                if fails { st.failures += 1; }
                progressed = true;
            }
            if !progressed {
                // Stuck only when failed hosts hold every slot of a pool.
                let stuck_on_failures = st.hosts.values().any(|s| *s == HostStatus::Failed);
                prop_assert!(stuck_on_failures, "no progress without failures: {steps:?}");
                return Ok(());
            }
        }
        prop_assert!(false, "did not finish");
    }
}

#[test]
fn the_readme_example_files_load_and_plan() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples-config");
    let inv = Inventory::load(&dir.join("inventory.toml")).unwrap();
    let spec = WaveSpec::load(&dir.join("wave.toml")).unwrap();
    match Plan::build(&inv, &spec, &BTreeMap::new(), &BTreeMap::new()) {
        Ok(p) => assert!(!p.rings.is_empty()),
        Err(PlanError::NotEnrolled(_)) => {}
        Err(e) => panic!("{e}"),
    }
}

/// The keys the spec parser knows, as its own "unknown field" error lists
/// them for a probe key at the top level, in a `[ring.N]` table and in
/// `[window]`: the list follows the parser, whatever is added to it.
fn known_spec_keys() -> Vec<String> {
    let head = "wave_id = \"w\"\nprofile = \"p\"\nversion = \"1\"\n";
    let mut keys = Vec::new();
    for table in ["", "[ring.0]\n", "[window]\n"] {
        let text = format!("{head}{table}zz_probe = 1\n");
        let err = WaveSpec::from_source(&Source::from_text("probe.toml", text))
            .expect_err("an unknown key is refused")
            .to_string();
        let (_, expected) = err
            .split_once("expected")
            .unwrap_or_else(|| panic!("no key list in: {err}"));
        keys.extend(expected.split('`').skip(1).step_by(2).map(String::from));
    }
    keys
}

#[test]
fn the_example_wave_spec_names_every_key_the_parser_knows() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples-config/wave.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let keys = known_spec_keys();
    assert!(keys.len() > 20, "the probe found too few keys: {keys:?}");
    let named = |key: &str| {
        text.lines().any(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
                || l.starts_with(&format!("[{key}"))
        })
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !named(k)).collect();
    assert!(
        missing.is_empty(),
        "{} does not name {missing:?}",
        path.display()
    );
}

/// 10 hosts of pool `big` (reserve 15%: one out at a time) in ring 3,
/// unprotected, ten in flight at once if the pool allowed it.
fn big_pool_of_ten() -> (Inventory, WaveSpec) {
    let hosts: Vec<(String, &str, u32)> = (0..10).map(|i| (format!("h{i}"), "big", 3)).collect();
    let refs: Vec<(&str, &str, u32)> = hosts.iter().map(|(a, b, c)| (a.as_str(), *b, *c)).collect();
    (
        inventory(&[("big", 15)], &refs),
        spec("protected_rings = []\n[ring.3]\nbatch_size = 10\nsoak_s = 0\n"),
    )
}

#[test]
fn an_expired_break_glass_stops_allowing_the_extra_hosts_while_the_wave_runs() {
    let (inv, spec) = big_pool_of_ten();
    let mut bg = BTreeMap::new();
    bg.insert(
        "big".to_string(),
        BreakGlassLimit {
            max_out: 3,
            expires_at_ms: 10_000,
        },
    );
    let p = Plan::build(&inv, &spec, &BTreeMap::new(), &bg).unwrap();
    let mut st = WaveState::new(&p);
    // While it holds: three out at once.
    st.now_ms = 9_000;
    let first = starts(&next_steps(&p, &st));
    assert_eq!(first.len(), 3, "{first:?}");
    // Those three are done; the approval has expired meanwhile: back to
    // the reserve, one at a time.
    for h in &first {
        st.hosts.insert(h.clone(), HostStatus::Done);
    }
    st.now_ms = 10_001;
    let next = starts(&next_steps(&p, &st));
    assert_eq!(next.len(), 1, "{next:?}");
    st.hosts.insert(next[0].clone(), HostStatus::InFlight);
    let steps = next_steps(&p, &st);
    assert!(
        matches!(&steps[..], [Step::Wait(w)] if w.contains("break-glass expired")),
        "{steps:?}"
    );
    // Still in force at its last millisecond.
    st.now_ms = 10_000;
    assert_eq!(starts(&next_steps(&p, &st)).len(), 2);
}

#[test]
fn break_glass_for_a_pool_not_in_the_inventory_or_above_its_size_is_refused() {
    let (inv, spec) = big_pool_of_ten();
    let limit = |max_out| BreakGlassLimit {
        max_out,
        expires_at_ms: i64::MAX,
    };
    let mut bg = BTreeMap::new();
    bg.insert("bigg".to_string(), limit(3));
    let err = Plan::build(&inv, &spec, &BTreeMap::new(), &bg).unwrap_err();
    assert!(
        matches!(&err, PlanError::BreakGlassUnknownPool { pool, .. } if pool == "bigg"),
        "{err}"
    );
    assert!(err.to_string().contains("pools: big"), "{err}");
    let mut bg = BTreeMap::new();
    bg.insert("big".to_string(), limit(11));
    let err = Plan::build(&inv, &spec, &BTreeMap::new(), &bg).unwrap_err();
    assert!(
        matches!(
            err,
            PlanError::BreakGlassTooLarge {
                max_out: 11,
                size: 10,
                ..
            }
        ),
        "{err}"
    );
    // The whole pool is the most a break-glass may take out.
    bg.insert("big".to_string(), limit(10));
    assert_eq!(
        Plan::build(&inv, &spec, &BTreeMap::new(), &bg)
            .unwrap()
            .pool_limit("big"),
        10
    );
}

#[test]
fn hosts_other_waves_have_out_count_against_the_pool_reserve() {
    let (inv, spec) = big_pool_of_ten();
    let p = Plan::build(&inv, &spec, &BTreeMap::new(), &BTreeMap::new()).unwrap();
    let mut st = WaveState::new(&p);
    assert_eq!(starts(&next_steps(&p, &st)).len(), 1);
    // Another wave over the same pool holds its one host: nothing starts.
    st.others_out.insert("big".into(), 1);
    let steps = next_steps(&p, &st);
    assert!(
        matches!(&steps[..], [Step::Wait(w)] if w.contains("1 host(s) out in other waves")),
        "{steps:?}"
    );
    // Other pools' hosts do not count.
    st.others_out.clear();
    st.others_out.insert("elsewhere".into(), 5);
    assert_eq!(starts(&next_steps(&p, &st)).len(), 1);
}
