#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Multi-process fleet: real `ringfenced` processes, each on its own
//! 127.0.x.y address with its own copy of the fake NVML library, driven by the
//! real `ringfence` binary (`wave run/resume --json`). Every scenario is judged
//! by what the agents recorded: their journals (ListTasks over mTLS), their
//! health (GetHealth), the driver version files and the patch counter files
//! the patch profile appends to.
//!
//! Needs `cargo build --workspace --bins --lib` first (integration/test.sh does).

mod common;

use std::time::{Duration, Instant};

use common::{Coordinator, approve_all, health, host, is, journal, pacing, start};
use ringfence::pb;
use ringfence_coordinator::fleet::{self, Fleet, HostSpec};

const WAVE_LIMIT: Duration = Duration::from_secs(120);

/// A fleet over all five rings in one pool.
fn all_rings(n: usize, pool: &str) -> Vec<HostSpec> {
    let rings = [0u32, 1, 2, 3, 3, 4, 4, 3, 2, 1];
    (0..n)
        .map(|i| host(&format!("gpu-{i:02}"), rings[i % rings.len()], pool))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_wave_patches_every_ring_and_leaves_every_host_healthy_in_service() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(dir.path(), all_rings(7, "h100-train"), &[("h100-train", 50)]).await;
    let spec = f.write_spec("happy", &pacing(2)).unwrap();
    approve_all(&f, &spec);

    let started = Instant::now();
    let c = Coordinator::run(&f, &spec);
    let (code, stderr) = c.finish(WAVE_LIMIT).await;
    assert_eq!(code, 0, "wave run failed: {stderr}");
    eprintln!("happy wave took {:?}", started.elapsed());

    for h in &f.hosts {
        let id = &h.spec.id;
        assert_eq!(h.driver_version(), fleet::NEW_VERSION, "{id} driver file");
        assert_eq!(h.patch_runs(), vec![fleet::NEW_VERSION.to_string()], "{id} patched once");
        let report = health(&f, id).await;
        assert_eq!(report.backend, "nvml", "{id} reads the (fake) NVML library");
        assert_eq!(report.driver_version, fleet::NEW_VERSION, "{id} as NVML reports it");
        assert_eq!(report.verdict, pb::Verdict::Healthy as i32, "{id}: {:?}", report.reasons);
        assert!(!report.draining, "{id} is back in service");
        let tasks = journal(&f, id).await;
        assert_eq!(
            common::actions(&tasks),
            ["drain", "patch", "validate", "undrain"],
            "{id} journal"
        );
        assert!(
            tasks.iter().all(|t| t.state == pb::TaskState::Succeeded as i32),
            "{id}: {tasks:?}"
        );
    }
}
