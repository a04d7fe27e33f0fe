//! The pre-flight a wave passes before anything is drained: what every
//! host answered (GetIdentity / GetHealth, collected by [`probe`]) checked
//! by pure functions ([`check`], [`missing_profiles`], [`ring_mismatches`],
//! [`out_of_service`]). `wave plan` runs all of them and `wave run` refuses
//! a patch profile missing on any host before its first drain, so `plan`
//! refuses what `run` would refuse, naming the hosts. Also the reserve
//! advice of `inventory check` ([`reserve_percent_for_one`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ringfence::pb;

use crate::client::Connector;
use crate::inventory::Inventory;
use crate::plan::{BreakGlassLimit, Plan, PlanError};
use crate::spec::WaveSpec;

/// What one host answered, or why it could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProbe {
    /// Host id (the inventory's).
    pub host: String,
    /// The answers; `Err` is why the host could not be reached.
    pub answer: Result<HostAnswer, String>,
}

/// A reachable host's answers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostAnswer {
    /// From GetIdentity; `None` when the agent did not answer it.
    pub identity: Option<IdentityFacts>,
    /// From GetHealth; `None` when the agent did not answer it.
    pub health: Option<HealthFacts>,
}

/// What GetIdentity says that a wave depends on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdentityFacts {
    /// The agent's own ring (`ring` in agent.toml), if configured.
    pub ring: Option<u32>,
    /// The patch profiles in the agent's config; empty from an agent that
    /// does not report them (older than `Identity.patch_profiles`).
    pub patch_profiles: Vec<String>,
}

/// What GetHealth says that a wave depends on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthFacts {
    /// The verdict is UNHEALTHY.
    pub unhealthy: bool,
    /// The first reason code (why UNHEALTHY).
    pub reason: String,
    /// The host is marked draining.
    pub draining: bool,
}

impl From<&pb::Identity> for IdentityFacts {
    fn from(id: &pb::Identity) -> Self {
        Self {
            ring: id.ring,
            patch_profiles: id.patch_profiles.clone(),
        }
    }
}

impl From<&pb::HealthReport> for HealthFacts {
    fn from(rep: &pb::HealthReport) -> Self {
        Self {
            unhealthy: rep.verdict == pb::Verdict::Unhealthy as i32,
            reason: rep
                .reasons
                .first()
                .map(|r| r.code.clone())
                .unwrap_or_default(),
            draining: rep.draining,
        }
    }
}

/// What the probe asks of each host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// GetIdentity only (ring and patch profiles).
    Identity,
    /// GetIdentity and GetHealth.
    IdentityAndHealth,
}

/// Ask every host of the inventory (64 at a time), in inventory order.
pub async fn probe(inv: &Inventory, connector: Arc<dyn Connector>, ask: Ask) -> Vec<HostProbe> {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for h in inv.hosts.clone() {
        let c = connector.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let answer = match c.connect(&h).await {
                Ok(api) => {
                    let identity = api.identity().await.ok().map(|id| IdentityFacts::from(&id));
                    let health = match ask {
                        Ask::Identity => None,
                        Ask::IdentityAndHealth => {
                            api.health().await.ok().map(|r| HealthFacts::from(&r))
                        }
                    };
                    Ok(HostAnswer { identity, health })
                }
                Err(e) => Err(e),
            };
            HostProbe { host: h.id, answer }
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(p) = t.await {
            out.push(p);
        }
    }
    out
}

/// `host: finding` for every agent whose own ring blocks the wave (another
/// ring than the inventory's, or none), in inventory order.
pub fn ring_mismatches(inv: &Inventory, probes: &[HostProbe]) -> Vec<String> {
    probes
        .iter()
        .filter_map(|p| {
            let id = p.answer.as_ref().ok()?.identity.as_ref()?;
            let host = inv.hosts.iter().find(|h| h.id == p.host)?;
            let f = host.ring_finding(id.ring);
            f.blocks_wave().then(|| format!("{}: {f}", p.host))
        })
        .collect()
}

/// Hosts whose agent reports its patch profiles and lacks `profile`.
pub fn missing_profiles(probes: &[HostProbe], profile: &str) -> Vec<String> {
    probes
        .iter()
        .filter(|p| {
            p.answer
                .as_ref()
                .ok()
                .and_then(|a| a.identity.as_ref())
                .is_some_and(|id| lacks_profile(&id.patch_profiles, profile))
        })
        .map(|p| p.host.clone())
        .collect()
}

/// Hosts out of service before the wave (UNHEALTHY, or drained) and why,
/// as `wave run` counts them against the pools' reserves; hosts that
/// `in_other_waves` holds count as those waves', not as out before.
pub fn out_of_service(
    probes: &[HostProbe],
    in_other_waves: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in probes {
        if in_other_waves.contains(&p.host) {
            continue;
        }
        let Some(h) = p.answer.as_ref().ok().and_then(|a| a.health.as_ref()) else {
            continue;
        };
        if h.unhealthy {
            out.insert(p.host.clone(), format!("UNHEALTHY ({})", h.reason));
        } else if h.draining {
            out.insert(p.host.clone(), "already drained".into());
        }
    }
    out
}

/// Hosts that could not be asked and why (the wave fails them as
/// unreachable when their turn comes; they do not refuse it).
pub fn unreachable(probes: &[HostProbe]) -> Vec<(String, String)> {
    probes
        .iter()
        .filter_map(|p| p.answer.as_ref().err().map(|e| (p.host.clone(), e.clone())))
        .collect()
}

/// One reason a wave is refused before anything is drained.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Agents configured in another ring than the inventory's (or none).
    #[error("{}", crate::inventory::ring_mismatch_message(wave, inventory, hosts))]
    RingMismatch {
        /// Wave id.
        wave: String,
        /// The inventory file.
        inventory: std::path::PathBuf,
        /// `host: finding` lines.
        hosts: Vec<String>,
    },
    /// Agents without the spec's patch profile.
    #[error(
        "wave `{wave}`: patch profile `{profile}` is not configured on {}: add `[patch.profiles.{profile}]` to their agent.toml or fix `profile` in the wave spec; nothing was drained",
        hosts.join(", ")
    )]
    MissingProfile {
        /// Wave id.
        wave: String,
        /// The spec's profile.
        profile: String,
        /// Hosts without it.
        hosts: Vec<String>,
    },
    /// A pool's reserve rounds down to 0 hosts: no host of it may ever be
    /// out of service ([`reserve_warning`]'s text).
    #[error("{warning}; raise it in the inventory or sign a break-glass approval")]
    ReserveRoundsToZero {
        /// What rounds to 0 and which `reserve_percent` allows one host.
        warning: String,
    },
    /// The plan cannot be built (a pool can never fit, a host not enrolled, ...).
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// Every reason a wave is refused (one or more).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct Refused(pub Vec<Refusal>);

/// What the pre-flight found when it does not refuse.
#[derive(Debug)]
pub struct Cleared {
    /// The plan `wave run` would start with.
    pub plan: Plan,
    /// Hosts that could not be asked, and why.
    pub unreachable: Vec<(String, String)>,
}

/// The whole pre-flight of `wave plan`: ring mismatches, missing patch
/// profiles and the plan over the hosts out of service, every refusal at
/// once.
pub fn check(
    inv: &Inventory,
    spec: &WaveSpec,
    probes: &[HostProbe],
    in_other_waves: &BTreeSet<String>,
    overrides: &BTreeMap<String, BreakGlassLimit>,
) -> Result<Cleared, Refused> {
    let mut refusals = Vec::new();
    let rings = ring_mismatches(inv, probes);
    if !rings.is_empty() {
        refusals.push(Refusal::RingMismatch {
            wave: spec.wave_id.clone(),
            inventory: inv.path.clone(),
            hosts: rings,
        });
    }
    if let Err(r) = check_profiles(spec, probes) {
        refusals.push(r);
    }
    let out = out_of_service(probes, in_other_waves);
    match Plan::build(inv, spec, &out, overrides) {
        Ok(plan) if refusals.is_empty() => Ok(Cleared {
            plan,
            unreachable: unreachable(probes),
        }),
        Ok(_) => Err(Refused(refusals)),
        Err(e) => {
            refusals.push(plan_refusal(e));
            Err(Refused(refusals))
        }
    }
}

/// A plan that cannot be built, as a refusal: a pool that cannot fit
/// because its reserve rounds down to 0 hosts says which `reserve_percent`
/// would allow one.
pub fn plan_refusal(e: PlanError) -> Refusal {
    if let PlanError::CannotFit {
        pool,
        size,
        percent,
        max_out: 0,
        ..
    } = &e
        && let Some(warning) = reserve_warning(pool, *size, *percent)
    {
        return Refusal::ReserveRoundsToZero { warning };
    }
    Refusal::Plan(e)
}

/// The profile check alone, as `wave run` makes it before its first drain.
pub fn check_profiles(spec: &WaveSpec, probes: &[HostProbe]) -> Result<(), Refusal> {
    let hosts = missing_profiles(probes, &spec.profile);
    if hosts.is_empty() {
        return Ok(());
    }
    Err(Refusal::MissingProfile {
        wave: spec.wave_id.clone(),
        profile: spec.profile.clone(),
        hosts,
    })
}

/// Whether an agent that reported `profiles` lacks `profile`: an agent
/// that lists no profiles is not judged here (the agent refuses the Patch
/// itself). The one rule `wave plan` and `wave run` share.
pub fn lacks_profile(profiles: &[String], profile: &str) -> bool {
    !profiles.is_empty() && !profiles.iter().any(|n| n == profile)
}

/// The smallest `reserve_percent` that lets one host of a pool of `size`
/// hosts out of service (floor(size × percent / 100) ≥ 1); `None` for an
/// empty pool.
pub fn reserve_percent_for_one(size: usize) -> Option<u32> {
    if size == 0 {
        return None;
    }
    u32::try_from(100usize.div_ceil(size)).ok()
}

/// `inventory check`'s warning for a pool whose reserve rounds down to 0
/// hosts, with the `reserve_percent` that would allow one; `None` when the
/// reserve allows at least one host.
pub fn reserve_warning(pool: &str, size: usize, percent: u32) -> Option<String> {
    if size == 0 || size * percent as usize / 100 > 0 {
        return None;
    }
    let one = reserve_percent_for_one(size)?;
    Some(format!(
        "pool `{pool}`: {size} hosts at reserve_percent = {percent} rounds down to 0 hosts out of service at once, so no wave can drain a host of it; reserve_percent = {one} allows one"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(
        host: &str,
        ring: Option<u32>,
        profiles: &[&str],
        health: HealthFacts,
    ) -> HostProbe {
        HostProbe {
            host: host.into(),
            answer: Ok(HostAnswer {
                identity: Some(IdentityFacts {
                    ring,
                    patch_profiles: profiles.iter().map(|s| s.to_string()).collect(),
                }),
                health: Some(health),
            }),
        }
    }

    fn healthy() -> HealthFacts {
        HealthFacts::default()
    }

    fn inv(text: &str) -> Inventory {
        let src = ringfence::config::Source::from_text("inv.toml", text.to_string());
        match Inventory::from_source(&src) {
            Ok(i) => i,
            Err(e) => panic!("{e}"),
        }
    }

    fn spec() -> WaveSpec {
        let src = ringfence::config::Source::from_text(
            "spec.toml",
            "wave_id = \"w1\"\nprofile = \"nvidia-driver\"\nversion = \"2\"\n".to_string(),
        );
        match WaveSpec::from_source(&src) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    const KEY: &str = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

    fn four_hosts(reserve: u32) -> Inventory {
        let mut t = format!(
            "trust_domain = \"t.test\"\n[[pool]]\nname = \"p\"\nreserve_percent = {reserve}\n"
        );
        for (i, ring) in [0, 1, 2, 3].iter().enumerate() {
            t.push_str(&format!(
                "[[host]]\nid = \"h{i}\"\naddress = \"127.0.0.1:{}\"\npool = \"p\"\nring = {ring}\nattestation_key = \"{KEY}\"\n",
                7000 + i
            ));
        }
        inv(&t)
    }

    #[test]
    fn missing_profiles_table() {
        let cases: &[(&[&str], bool)] = &[
            (&["nvidia-driver"], false),
            (&["cuda-toolkit", "nvidia-driver"], false),
            (&["cuda-toolkit"], true),
            // An agent that reports no profiles (older) is not judged.
            (&[], false),
        ];
        for (profiles, missing) in cases {
            let p = [answered("h0", Some(0), profiles, healthy())];
            assert_eq!(
                missing_profiles(&p, "nvidia-driver") == vec!["h0".to_string()],
                *missing,
                "{profiles:?}"
            );
        }
        let unreachable = [HostProbe {
            host: "h0".into(),
            answer: Err("connection refused".into()),
        }];
        assert!(missing_profiles(&unreachable, "nvidia-driver").is_empty());
    }

    #[test]
    fn out_of_service_table() {
        let unhealthy = HealthFacts {
            unhealthy: true,
            reason: "XID_79".into(),
            draining: true,
        };
        let drained = HealthFacts {
            draining: true,
            ..healthy()
        };
        let p = [
            answered("h0", Some(0), &[], healthy()),
            answered("h1", Some(1), &[], unhealthy),
            answered("h2", Some(2), &[], drained.clone()),
            answered("h3", Some(3), &[], drained),
        ];
        let others: BTreeSet<String> = ["h3".to_string()].into();
        let out = out_of_service(&p, &others);
        assert_eq!(
            out.into_iter().collect::<Vec<_>>(),
            vec![
                ("h1".to_string(), "UNHEALTHY (XID_79)".to_string()),
                ("h2".to_string(), "already drained".to_string()),
            ]
        );
    }

    #[test]
    fn check_refuses_every_problem_naming_hosts() {
        let inv = four_hosts(50);
        let drained = HealthFacts {
            draining: true,
            ..healthy()
        };
        let p = [
            answered("h0", Some(0), &["nvidia-driver"], healthy()),
            answered("h1", Some(2), &["nvidia-driver"], healthy()),
            answered("h2", Some(2), &["cuda"], drained),
            answered("h3", Some(3), &["nvidia-driver"], healthy()),
        ];
        let Err(Refused(r)) = check(&inv, &spec(), &p, &BTreeSet::new(), &BTreeMap::new()) else {
            panic!("not refused");
        };
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(
            matches!(&r[0], Refusal::RingMismatch { hosts, .. } if hosts.len() == 1 && hosts[0].starts_with("h1:"))
        );
        assert!(matches!(&r[1], Refusal::MissingProfile { hosts, .. } if hosts == &["h2"]));
        let text = Refused(r).to_string();
        assert!(
            text.contains("h1") && text.contains("`nvidia-driver` is not configured on h2"),
            "{text}"
        );
    }

    #[test]
    fn check_refuses_a_pool_that_can_never_fit_and_break_glass_lifts_it() {
        // 4 hosts at 25 %: one out at once; h2 already drained fills it.
        let inv = four_hosts(25);
        let drained = HealthFacts {
            draining: true,
            ..healthy()
        };
        let p = [
            answered("h0", Some(0), &[], healthy()),
            answered("h1", Some(1), &[], healthy()),
            answered("h2", Some(2), &[], drained),
            answered("h3", Some(3), &[], healthy()),
        ];
        let Err(Refused(r)) = check(&inv, &spec(), &p, &BTreeSet::new(), &BTreeMap::new()) else {
            panic!("not refused");
        };
        assert!(
            matches!(&r[..], [Refusal::Plan(PlanError::CannotFit { .. })]),
            "{r:?}"
        );
        assert!(Refused(r).to_string().contains("h2 already drained"));
        // The same host held by another wave counts as that wave's.
        let others: BTreeSet<String> = ["h2".to_string()].into();
        assert!(check(&inv, &spec(), &p, &others, &BTreeMap::new()).is_ok());
        let bg: BTreeMap<String, BreakGlassLimit> = [(
            "p".to_string(),
            BreakGlassLimit {
                max_out: 2,
                expires_at_ms: i64::MAX,
            },
        )]
        .into();
        let ok = check(&inv, &spec(), &p, &BTreeSet::new(), &bg);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn a_reserve_that_rounds_down_to_0_hosts_is_refused_with_the_percent_that_allows_one() {
        // 4 hosts at 15 %: floor(0.6) = 0 hosts may ever be out.
        let inv = four_hosts(15);
        let p: Vec<HostProbe> = (0..4)
            .map(|i| answered(&format!("h{i}"), Some(i), &[], healthy()))
            .collect();
        let Err(Refused(r)) = check(&inv, &spec(), &p, &BTreeSet::new(), &BTreeMap::new()) else {
            panic!("not refused");
        };
        assert!(
            matches!(&r[..], [Refusal::ReserveRoundsToZero { .. }]),
            "{r:?}"
        );
        let msg = Refused(r).to_string();
        assert!(
            msg.contains("pool `p`: 4 hosts at reserve_percent = 15 rounds down to 0")
                && msg.contains("reserve_percent = 25 allows one"),
            "{msg}"
        );
    }

    #[test]
    fn check_clears_a_healthy_fleet_and_lists_unreachable_hosts() {
        let inv = four_hosts(25);
        let p = [
            answered("h0", Some(0), &["nvidia-driver"], healthy()),
            answered("h1", Some(1), &["nvidia-driver"], healthy()),
            HostProbe {
                host: "h2".into(),
                answer: Err("connection refused".into()),
            },
            answered("h3", Some(3), &["nvidia-driver"], healthy()),
        ];
        let c = match check(&inv, &spec(), &p, &BTreeSet::new(), &BTreeMap::new()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            c.unreachable,
            vec![("h2".into(), "connection refused".into())]
        );
        assert_eq!(c.plan.host_ring.len(), 4);
    }

    #[test]
    fn reserve_percent_for_one_table() {
        for (size, want) in [
            (0, None),
            (1, Some(100)),
            (3, Some(34)),
            (4, Some(25)),
            (7, Some(15)),
            (200, Some(1)),
        ] {
            assert_eq!(reserve_percent_for_one(size), want, "{size}");
            if let Some(p) = want {
                assert!(size * p as usize / 100 >= 1);
                assert_eq!(size * (p as usize - 1) / 100, 0);
            }
        }
        let w = reserve_warning("gpu", 4, 15).unwrap_or_default();
        assert!(w.contains("reserve_percent = 25 allows one"), "{w}");
        assert_eq!(reserve_warning("gpu", 4, 25), None);
        assert_eq!(reserve_warning("gpu", 0, 0), None);
    }
}
