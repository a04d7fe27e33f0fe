#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Multi-process fleet: real `ringfenced` processes, each on its own
//! 127.0.x.y address with its own copy of the fake NVML library, driven by the
//! real `ringfence` binary (`wave run/resume --json`). Every scenario is judged
//! by what the agents recorded: their journals (ListTasks over mTLS), their
//! health (GetHealth), the driver version files and the patch counter files
//! the patch profile appends to.
//!
//! Needs `cargo build --workspace --bins --lib` first (integration/test.sh does).

use crate::common;

use std::time::{Duration, Instant};

use common::{Coordinator, approve_all, health, host, is, journal, pacing, start};
use ringfence::pb;
use ringfence_devfleet::local_fleet::{self, HostSpec, LocalFleet};

const WAVE_LIMIT: Duration = Duration::from_secs(120);

/// A fleet over all five rings in one pool.
pub(crate) fn all_rings(n: usize, pool: &str) -> Vec<HostSpec> {
    let rings = [0u32, 1, 2, 3, 3, 4, 4, 3, 2, 1];
    (0..n)
        .map(|i| host(&format!("gpu-{i:02}"), rings[i % rings.len()], pool))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_wave_patches_every_ring_and_leaves_every_host_healthy_in_service() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(
        dir.path(),
        all_rings(7, "h100-train"),
        &[("h100-train", 50)],
    )
    .await;
    let spec = f.write_spec("happy", &pacing(2)).unwrap();
    approve_all(&f, &spec);

    let started = Instant::now();
    let c = Coordinator::run(&f, &spec);
    let (code, stderr) = c.finish(WAVE_LIMIT).await;
    assert_eq!(code, 0, "wave run failed: {stderr}");
    eprintln!("happy wave took {:?}", started.elapsed());

    for h in &f.hosts {
        let id = &h.spec.id;
        assert_eq!(
            h.driver_version(),
            local_fleet::NEW_VERSION,
            "{id} driver file"
        );
        assert_eq!(
            h.patch_runs(),
            vec![local_fleet::NEW_VERSION.to_string()],
            "{id} patched once"
        );
        let report = health(&f, id).await;
        assert_eq!(report.backend, "nvml", "{id} reads the (fake) NVML library");
        assert_eq!(
            report.driver_version,
            local_fleet::NEW_VERSION,
            "{id} as NVML reports it"
        );
        assert_eq!(
            report.verdict,
            pb::Verdict::Healthy as i32,
            "{id}: {:?}",
            report.reasons
        );
        assert!(!report.draining, "{id} is back in service");
        let tasks = journal(&f, id).await;
        assert_eq!(
            common::actions(&tasks),
            ["drain", "patch", "validate", "undrain"],
            "{id} journal"
        );
        assert!(
            tasks
                .iter()
                .all(|t| t.state == pb::TaskState::Succeeded as i32),
            "{id}: {tasks:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_with_uncorrected_ecc_after_the_patch_halts_the_wave_before_broad_production() {
    let dir = tempfile::tempdir().unwrap();
    let mut specs = vec![
        host("gpu-00", 0, "h100-train"),
        host("gpu-01", 1, "h100-train"),
        host("gpu-02", 2, "h100-train"),
        host("gpu-03", 2, "h100-train"),
        host("gpu-04", 3, "h100-train"),
        host("gpu-05", 3, "h100-train"),
        host("gpu-06", 4, "h100-train"),
    ];
    // The new driver brings uncorrected ECC errors on gpu-03's GPU 0.
    specs[3].faulty_version = Some(local_fleet::NEW_VERSION.to_string());
    let f = start(dir.path(), specs, &[("h100-train", 50)]).await;
    let spec = f.write_spec("ecc", &pacing(2)).unwrap();
    approve_all(&f, &spec);

    let (code, stderr) = Coordinator::run(&f, &spec).finish(WAVE_LIMIT).await;
    assert_eq!(code, 4, "a halted wave exits 4: {stderr}");
    for needle in ["HALTED in ring 2", "host gpu-03", "step validate"] {
        assert!(stderr.contains(needle), "report lacks `{needle}`: {stderr}");
    }

    // Broad production and sensitive tenants never heard of the wave.
    for id in ["gpu-04", "gpu-05", "gpu-06"] {
        let tasks = journal(&f, id).await;
        assert!(tasks.is_empty(), "{id} (ring 3-4) holds tasks: {tasks:?}");
        let h = f.hosts.iter().find(|h| h.spec.id == id).unwrap();
        assert_eq!(
            h.driver_version(),
            local_fleet::OLD_VERSION,
            "{id} untouched"
        );
        assert!(h.patch_runs().is_empty(), "{id} never ran the patch");
    }
    // The failed canary stays drained, out of service, with its fault visible.
    let tasks = journal(&f, "gpu-03").await;
    let acts = common::actions(&tasks);
    assert_eq!(acts, ["drain", "patch", "validate"], "gpu-03 journal");
    let report = health(&f, "gpu-03").await;
    assert!(report.draining, "the failed canary stays drained");
    assert_eq!(report.verdict, pb::Verdict::Unhealthy as i32);
    // Rings 0-1 were patched and are back in service.
    for id in ["gpu-00", "gpu-01"] {
        let report = health(&f, id).await;
        assert_eq!(report.driver_version, local_fleet::NEW_VERSION, "{id}");
        assert!(!report.draining, "{id} back in service");
    }
}

/// Out-of-service intervals from an agent journal: drain accepted ..
/// undrain last updated (or open-ended if never undrained).
pub(crate) async fn out_of_service(f: &LocalFleet, id: &str) -> Vec<(i64, i64)> {
    let tasks = journal(f, id).await;
    let mut out = Vec::new();
    let mut from = None;
    for t in &tasks {
        match t.action.as_str() {
            "drain" => from = Some(t.accepted_at_unix_ms),
            "undrain" => {
                let s = from.take().expect("undrain after a drain");
                out.push((s, t.updated_at_unix_ms));
            }
            _ => {}
        }
    }
    if let Some(s) = from {
        out.push((s, i64::MAX));
    }
    out
}

/// Most intervals overlapping at one instant (an end at t frees the slot
/// before a start at t).
pub(crate) fn max_overlap(intervals: &[(i64, i64)]) -> usize {
    let mut points: Vec<(i64, i32)> = Vec::new();
    for &(s, e) in intervals {
        points.push((s, 1));
        points.push((e, -1));
    }
    points.sort();
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in points {
        cur += d;
        max = max.max(cur);
    }
    usize::try_from(max).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_of_ten_at_fifteen_percent_never_has_two_hosts_out_of_service_as_agents_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let rings = [0u32, 0, 1, 1, 1, 2, 2, 2, 2, 2];
    let specs = (0..10)
        .map(|i| host(&format!("gpu-{i:02}"), rings[i], "pool10"))
        .collect();
    let f = start(dir.path(), specs, &[("pool10", 15)]).await;
    // Batches bigger than the reserve: only the reserve holds hosts back.
    let spec = f.write_spec("reserve", &pacing(5)).unwrap();
    approve_all(&f, &spec);

    let (code, stderr) = Coordinator::run(&f, &spec).finish(WAVE_LIMIT).await;
    assert_eq!(code, 0, "{stderr}");
    let mut all = Vec::new();
    for h in &f.hosts {
        let iv = out_of_service(&f, &h.spec.id).await;
        assert_eq!(
            iv.len(),
            1,
            "{} drained and undrained once: {iv:?}",
            h.spec.id
        );
        assert_eq!(
            h.driver_version(),
            local_fleet::NEW_VERSION,
            "{}",
            h.spec.id
        );
        all.extend(iv);
    }
    assert_eq!(
        max_overlap(&all),
        1,
        "floor(10 × 15%) = 1 host out of service at once; agent timelines: {all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_whose_reserve_is_used_up_by_an_unhealthy_host_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let specs = (0..5)
        .map(|i| {
            host(
                &format!("gpu-{i:02}"),
                u32::try_from(i % 2).unwrap(),
                "small",
            )
        })
        .collect();
    let mut f = start(dir.path(), specs, &[("small", 20)]).await;
    // gpu-03 has a GPU with a pending row remap from the start.
    let h = f.hosts.iter().find(|h| h.spec.id == "gpu-03").unwrap();
    let scenario = h.dir.join("scenario.toml");
    let mut text = std::fs::read_to_string(&scenario).unwrap();
    text.push_str(&format!(
        "\n[[when_driver]]\nversion = \"{}\"\ngpu = 1\nremapped_rows_pending = true\n",
        local_fleet::OLD_VERSION
    ));
    std::fs::write(&scenario, text).unwrap();
    f.restart("gpu-03").await.unwrap();
    let report = health(&f, "gpu-03").await;
    assert_eq!(report.verdict, pb::Verdict::Unhealthy as i32, "{report:?}");

    let spec = f.write_spec("nofit", &pacing(1)).unwrap();
    let (code, stderr) = Coordinator::run(&f, &spec).finish(WAVE_LIMIT).await;
    assert_eq!(code, 3, "refused as a config/input problem: {stderr}");
    assert!(stderr.contains("pool `small`"), "names the pool: {stderr}");
    assert!(stderr.contains("gpu-03"), "names the host: {stderr}");
    for h in &f.hosts {
        assert!(
            journal(&f, &h.spec.id).await.is_empty(),
            "{} got a task",
            h.spec.id
        );
        assert!(h.patch_runs().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_sigkilled_ten_times_and_resumed_patches_every_host_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(
        dir.path(),
        all_rings(7, "h100-train"),
        &[("h100-train", 50)],
    )
    .await;
    sigkilled_ten_times_and_resumed(&f).await;
}

/// The body of the kill-at-10-points test, for any `[store]` backend the
/// fleet's settings name (`etcd_waves` runs it on etcd).
pub(crate) async fn sigkilled_ten_times_and_resumed(f: &LocalFleet) {
    let spec = f.write_spec("crashy", &pacing(1)).unwrap();
    approve_all(f, &spec);

    // Progress milestones: each host's start, connected and done, over all runs.
    let milestones = 3 * f.hosts.len();
    let mut seen = std::collections::BTreeSet::new();
    let mut kills: Vec<String> = Vec::new();
    let mut reattached = 0;
    let mut c = Coordinator::run(f, &spec);
    while kills.len() < 10 {
        let i = kills.len();
        let target = (i + 1) * milestones / 11;
        let mut last;
        loop {
            let Some(ev) = c.next_event(Duration::from_secs(60)).await else {
                let (code, stderr) = c.finish(Duration::from_secs(10)).await;
                panic!(
                    "the wave ended (exit {code}) before kill {}: {stderr}",
                    i + 1
                );
            };
            if ev["kind"] == "host" {
                let what = ev["what"].as_str().unwrap_or_default();
                if ["start", "connected", "done"].contains(&what) {
                    seen.insert((ev["host"].to_string(), what.to_string()));
                }
            }
            last = ev.to_string();
            if seen.len() >= target {
                break;
            }
        }
        // Odd kills land a little later, in the middle of a host's task.
        if i % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        reattached += c
            .events
            .iter()
            .filter(|e| is(e, "host", Some("reattach")))
            .count();
        c.sigkill().await;
        kills.push(format!("after {} milestones: {last}", seen.len()));
        c = Coordinator::resume(f, "crashy");
    }
    let (code, stderr) = c.finish(WAVE_LIMIT).await;
    assert_eq!(
        code, 0,
        "final resume completes the wave: {stderr}\nkills: {kills:#?}"
    );
    assert!(
        reattached > 0,
        "some kills landed in the middle of a host, and a resume re-attached to it: {kills:#?}"
    );

    for h in &f.hosts {
        let id = &h.spec.id;
        assert_eq!(
            h.patch_runs(),
            vec![local_fleet::NEW_VERSION.to_string()],
            "{id}: the patch command ran exactly once; kills: {kills:#?}"
        );
        let tasks = journal(f, id).await;
        let patches: Vec<_> = tasks.iter().filter(|t| t.action == "patch").collect();
        assert_eq!(patches.len(), 1, "{id}: one patch task: {tasks:?}");
        assert_eq!(patches[0].state, pb::TaskState::Succeeded as i32, "{id}");
        let report = health(f, id).await;
        assert_eq!(report.driver_version, local_fleet::NEW_VERSION, "{id}");
        assert!(!report.draining, "{id} back in service");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_stops_answering_mid_wave_halts_it_as_unreachable_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut specs = vec![
        host("gpu-00", 0, "h100-train"),
        host("gpu-01", 1, "h100-train"),
        host("gpu-02", 3, "h100-train"),
    ];
    // gpu-01 has a job that keeps its drain busy for a while.
    specs[1].busy_for_s = Some(60.0);
    let f = start(dir.path(), specs, &[("h100-train", 50)]).await;
    common::set_timeouts(&f, 1, 1);
    let task_timeout_s = 4;
    let spec = f
        .write_spec(
            "frozen",
            &format!("task_timeout_s = {task_timeout_s}\n{}", pacing(1)),
        )
        .unwrap();
    approve_all(&f, &spec);

    let mut c = Coordinator::run(&f, &spec);
    c.until(WAVE_LIMIT, |e| {
        is(e, "host", Some("connected")) && e["host"] == "gpu-01"
    })
    .await
    .expect("the wave reaches gpu-01");
    // Once the agent has taken the drain, freeze it (SIGSTOP): it stops answering.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !common::actions(&journal(&f, "gpu-01").await).contains(&"drain".to_string()) {
        assert!(Instant::now() < deadline, "gpu-01 never got its drain task");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = f.hosts[1].pid().expect("agent process");
    let frozen_at = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let halting = c
        .until(WAVE_LIMIT, |e| is(e, "halting", None))
        .await
        .expect("the wave halts");
    let took = frozen_at.elapsed();
    eprintln!("halted {took:?} after gpu-01 froze");
    let (code, stderr) = c.finish(WAVE_LIMIT).await;
    // Let the agent run again so the fleet can shut it down cleanly.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGCONT,
    );

    assert_eq!(halting["what"], "unreachable", "{halting}");
    assert_eq!(halting["host"], "gpu-01", "{halting}");
    // task timeout + one RPC timeout + poll slack on a loaded machine.
    assert!(
        took < Duration::from_secs(task_timeout_s + 7),
        "halted {took:?} after the agent froze (task timeout {task_timeout_s} s)"
    );
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("host gpu-01"), "{stderr}");
    assert!(
        stderr.contains("(unreachable)"),
        "report says unreachable: {stderr}"
    );
    assert!(journal(&f, "gpu-02").await.is_empty(), "ring 3 untouched");
}
