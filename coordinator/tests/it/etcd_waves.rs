//! Waves on etcd (`[store] backend = "etcd"`) with real `ringfenced`
//! processes and real `ringfence` coordinators, each coordinator with its
//! own state dir (as on separate machines), all sharing one real etcd
//! member on loopback. Judged by what the agents recorded.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{host, journal, pacing, start};
use ringfence::pb;
use ringfence_devfleet::local_fleet::{self, HostSpec, LocalFleet};
use ringfence_testkit::etcd::EtcdCluster;

const WAVE_LIMIT: Duration = Duration::from_secs(120);

/// Unprotected rings only (no approvals to share between state dirs),
/// each host busy for a while so that the wave lasts a few seconds.
fn slow_hosts(n: usize) -> Vec<HostSpec> {
    (0..n)
        .map(|i| {
            let mut h = host(&format!("gpu-{i:02}"), (i % 2) as u32, "h100-train");
            h.busy_for_s = Some(1.0);
            h
        })
        .collect()
}

/// A coordinator's settings on another "machine": the fleet's settings
/// with its own state dir and the shared etcd store.
fn coordinator_settings(f: &LocalFleet, etcd: &EtcdCluster, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(&f.settings).unwrap();
    let state = f.root.join(format!("{name}-state"));
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("state_dir") {
            out.push_str(&format!("state_dir = \"{}\"\n", state.display()));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&store_section(etcd));
    let path = f.root.join(format!("{name}.toml"));
    std::fs::write(&path, out).unwrap();
    path
}

/// `[store]` on `etcd`.
fn store_section(etcd: &EtcdCluster) -> String {
    let endpoints: Vec<String> = etcd
        .endpoints()
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect();
    format!(
        "\n[store]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/fleet-test\"\n",
        endpoints.join(", ")
    )
}

/// One etcd cluster of `members` and a fleet of four slow hosts in one pool
/// (reserve 50 %), under `dir`.
async fn four_slow_hosts_on_etcd(dir: &Path, members: usize) -> (EtcdCluster, LocalFleet) {
    let etcd = EtcdCluster::start(&dir.join("etcd").tap_mkdir(), members).unwrap();
    let f = start(
        &dir.join("fleet").tap_mkdir(),
        slow_hosts(4),
        &[("h100-train", 50)],
    )
    .await;
    (etcd, f)
}

/// `ringfence --config CFG ARGS..` run to its end: it must succeed; its
/// standard output.
fn ringfence_ok(cfg: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringfence"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ringfence {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `ringfence` process with its output in files.
struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(settings: &Path, args: &[&str], name: &str) -> Self {
        let dir = settings.parent().unwrap();
        let out = dir.join(format!("{name}.stdout"));
        let err = dir.join(format!("{name}.stderr"));
        let child = Command::new(env!("CARGO_BIN_EXE_ringfence"))
            .arg("--config")
            .arg(settings)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        Self { child, out, err }
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Wait until an event matches `pred`.
    async fn until(&mut self, within: Duration, pred: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if self.events().iter().any(&pred) {
                return;
            }
            if let Ok(Some(code)) = self.child.try_wait() {
                panic!("coordinator exited ({code}) first: {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no such event: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait for exit: its code.
    async fn exit(&mut self, within: Duration) -> i32 {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("coordinator did not exit in time: {}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_args<'a>(f: &'a LocalFleet, spec: &'a Path) -> [&'a str; 7] {
    [
        "wave",
        "run",
        "--inventory",
        f.inventory.to_str().unwrap(),
        "--spec",
        spec.to_str().unwrap(),
        "--json",
    ]
}

fn host_event(what: &'static str) -> impl Fn(&serde_json::Value) -> bool {
    move |e| e["kind"] == "host" && e["what"] == what
}

/// Every agent's journal.
async fn journals(f: &LocalFleet) -> Vec<(String, Vec<pb::TaskStatus>)> {
    let mut out = Vec::new();
    for h in &f.hosts {
        out.push((h.spec.id.clone(), journal(f, &h.spec.id).await));
    }
    out
}

async fn assert_each_host_patched_once(f: &LocalFleet) {
    for h in &f.hosts {
        let id = &h.spec.id;
        assert_eq!(
            h.patch_runs(),
            vec![local_fleet::NEW_VERSION.to_string()],
            "{id}: the patch command ran exactly once"
        );
        let tasks = journal(f, id).await;
        let patches: Vec<_> = tasks.iter().filter(|t| t.action == "patch").collect();
        assert_eq!(patches.len(), 1, "{id}: one patch task: {tasks:?}");
        assert_eq!(patches[0].state, pb::TaskState::Succeeded as i32, "{id}");
    }
}

/// Scenarios 2 and 3 of the etcd store: a second coordinator (own state
/// dir) is refused while the first drives, and told who holds the wave;
/// the first is then frozen (SIGSTOP) past its lease, the second resumes
/// and finishes, and once the first is thawed (SIGCONT) it dispatches
/// nothing: the agents' journals do not change and it stops, saying it
/// lost the wave's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_frozen_driver_is_taken_over_and_dispatches_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let (etcd, f) = four_slow_hosts_on_etcd(dir.path(), 1).await;
    let spec = f.write_spec("takeover", &pacing(1)).unwrap();
    let a_cfg = coordinator_settings(&f, &etcd, "a");
    let b_cfg = coordinator_settings(&f, &etcd, "b");

    let mut a = Proc::spawn(&a_cfg, &run_args(&f, &spec), "a-run");
    a.until(Duration::from_secs(60), host_event("start")).await;

    // Scenario 2: B, on its own state dir, is refused and told who drives.
    let mut b_refused = Proc::spawn(&b_cfg, &run_args(&f, &spec), "b-run");
    assert_eq!(b_refused.exit(Duration::from_secs(30)).await, 3);
    let err = b_refused.stderr();
    assert!(
        err.contains("held by another coordinator")
            && err.contains(&format!("pid {}", a.child.id())),
        "{err}"
    );

    // Let A finish one host, then freeze it past its 5 s lease.
    a.until(Duration::from_secs(60), host_event("done")).await;
    nix::sys::signal::kill(a.pid(), nix::sys::signal::Signal::SIGSTOP).unwrap();
    tokio::time::sleep(Duration::from_secs(8)).await;

    // B resumes from its own state dir and finishes the wave.
    let mut b = Proc::spawn(
        &b_cfg,
        &[
            "wave",
            "resume",
            "--wave",
            "takeover",
            "--inventory",
            f.inventory.to_str().unwrap(),
            "--json",
        ],
        "b-resume",
    );
    let code = b.exit(WAVE_LIMIT).await;
    assert_eq!(code, 0, "B completes the wave: {}", b.stderr());
    let a_done = a.events().iter().filter(|e| host_event("done")(e)).count();
    let b_done = b.events().iter().filter(|e| host_event("done")(e)).count();
    assert!(
        a_done < f.hosts.len() && b_done > 0,
        "A was frozen mid-wave ({a_done} done) and B drove the rest ({b_done} done)"
    );
    let before = journals(&f).await;

    // A thaws: its next write fails, it stops, and no agent accepted
    // anything more.
    let a_events_before = a.events().len();
    nix::sys::signal::kill(a.pid(), nix::sys::signal::Signal::SIGCONT).unwrap();
    let code = a.exit(Duration::from_secs(60)).await;
    assert_ne!(code, 0, "A does not complete: {}", a.stderr());
    eprintln!("A after thawing: {}", a.stderr().trim());
    assert!(
        a.stderr().contains("lost the wave's lock"),
        "A says why it stopped: {}",
        a.stderr()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = journals(&f).await;
    assert_eq!(before, after, "no agent accepted a task after the takeover");
    let late_starts: Vec<_> = a.events()[a_events_before..]
        .iter()
        .filter(|e| host_event("start")(e))
        .cloned()
        .collect();
    assert!(
        late_starts.is_empty(),
        "A started no host after thawing: {late_starts:?}"
    );
    assert_each_host_patched_once(&f).await;

    // `wave list` from a third machine shows the wave, completed, not held.
    let c_cfg = coordinator_settings(&f, &etcd, "c");
    let text = ringfence_ok(&c_cfg, &["wave", "list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("takeover\tcompleted\tnot held")),
        "{text}"
    );
}

/// Scenario 5: `wave halt` from a third process (its own state dir) stops
/// the wave the first coordinator drives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_wave_halt_from_another_machine_stops_the_wave() {
    let dir = tempfile::tempdir().unwrap();
    let (etcd, f) = four_slow_hosts_on_etcd(dir.path(), 1).await;
    let spec = f.write_spec("halted", &pacing(1)).unwrap();
    let a_cfg = coordinator_settings(&f, &etcd, "a");
    let c_cfg = coordinator_settings(&f, &etcd, "c");

    let mut a = Proc::spawn(&a_cfg, &run_args(&f, &spec), "a-run");
    a.until(Duration::from_secs(60), host_event("start")).await;
    ringfence_ok(&c_cfg, &["wave", "halt", "--wave", "halted"]);
    let code = a.exit(WAVE_LIMIT).await;
    assert_eq!(code, 4, "halted: {}", a.stderr());
    let err = a.stderr();
    assert!(err.contains("HALTED") && err.contains("operator"), "{err}");
    // Not every host was patched: the halt stopped the wave early.
    let patched = f
        .hosts
        .iter()
        .filter(|h| !h.patch_runs().is_empty())
        .count();
    assert!(
        patched < f.hosts.len(),
        "the halt stopped the wave before its end"
    );
    // The third machine ends the wave for good: `wave status` says aborted
    // on every machine of the store, the driver's included.
    ringfence_ok(&c_cfg, &["wave", "abort", "--wave", "halted"]);
    for cfg in [&a_cfg, &c_cfg] {
        let text = ringfence_ok(cfg, &["wave", "status", "--wave", "halted", "--json"]);
        let status: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status["phase"], "aborted", "{status}");
    }
}

/// Scenario 1: the kill-at-10-points exactly-once test, on etcd: the same
/// body as `fleet_processes`, with the fleet's settings on an etcd store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_coordinator_sigkilled_ten_times_and_resumed_patches_every_host_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(&dir.path().join("etcd").tap_mkdir(), 1).unwrap();
    let f = start(
        &dir.path().join("fleet").tap_mkdir(),
        crate::fleet_processes::all_rings(7, "h100-train"),
        &[("h100-train", 50)],
    )
    .await;
    let mut text = std::fs::read_to_string(&f.settings).unwrap();
    text.push_str(&store_section(&etcd));
    std::fs::write(&f.settings, text).unwrap();
    crate::fleet_processes::sigkilled_ten_times_and_resumed(&f).await;
    // The wave's state is in etcd, not in a local redb file.
    assert!(!f.state_dir.join("crashy.redb").exists());
}

/// The fleet's inventory with only the hosts `keep` names.
fn inventory_of(f: &LocalFleet, name: &str, keep: &[String]) -> PathBuf {
    let text = std::fs::read_to_string(&f.inventory).unwrap();
    let mut parts = text.split("\n[[host]]\n");
    let mut out = parts.next().unwrap().to_string();
    for h in parts {
        if keep
            .iter()
            .any(|id| h.contains(&format!("id = \"{id}\"\n")))
        {
            out.push_str("\n[[host]]\n");
            out.push_str(h);
        }
    }
    let path = f.root.join(format!("{name}.inventory.toml"));
    std::fs::write(&path, out).unwrap();
    path
}

/// Scenario 6: two waves over one pool, driven at once by two
/// coordinators on two "machines" (own state dirs, one etcd), never take
/// more of the pool out of service together than its reserve allows —
/// from the agents' own task timelines (drain accepted → undrain done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_two_waves_over_one_pool_from_two_machines_stay_within_its_reserve_together() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(&dir.path().join("etcd").tap_mkdir(), 1).unwrap();
    let hosts: Vec<HostSpec> = (0..10)
        .map(|i| {
            let mut h = host(&format!("gpu-{i:02}"), (i % 2) as u32, "p");
            h.busy_for_s = Some(0.3);
            h
        })
        .collect();
    let f = start(&dir.path().join("fleet").tap_mkdir(), hosts, &[("p", 20)]).await;
    let ids: Vec<String> = f.hosts.iter().map(|h| h.spec.id.clone()).collect();
    // Each wave's inventory names half the pool: 5 hosts at 20 % = 1 out
    // at a time, counting the other wave's hosts out of service.
    let inv_a = inventory_of(&f, "a", &ids[..5]);
    let inv_b = inventory_of(&f, "b", &ids[5..]);
    // Batches bigger than the reserve: only the reserve holds hosts back.
    let spec_a = f.write_spec("pool-a", &pacing(5)).unwrap();
    let spec_b = f.write_spec("pool-b", &pacing(5)).unwrap();
    let run = |inv: &Path, spec: &Path| -> Vec<String> {
        [
            "wave",
            "run",
            "--inventory",
            inv.to_str().unwrap(),
            "--spec",
            spec.to_str().unwrap(),
            "--json",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
    };
    let args_a = run(&inv_a, &spec_a);
    let args_b = run(&inv_b, &spec_b);
    let a_args: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let b_args: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let mut a = Proc::spawn(&coordinator_settings(&f, &etcd, "a"), &a_args, "a-run");
    let mut b = Proc::spawn(&coordinator_settings(&f, &etcd, "b"), &b_args, "b-run");
    assert_eq!(a.exit(WAVE_LIMIT).await, 0, "wave a: {}", a.stderr());
    assert_eq!(b.exit(WAVE_LIMIT).await, 0, "wave b: {}", b.stderr());
    // Both waves ran at the same time: each waited on the other's hosts.
    let waited = |p: &Proc| {
        p.events().iter().any(|e| {
            e["kind"] == "wait" && e["detail"].as_str().unwrap_or("").contains("other wave")
        }) || p.events().iter().any(|e| {
            e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("in other waves")
        })
    };
    let mut all = Vec::new();
    for h in &f.hosts {
        let iv = crate::fleet_processes::out_of_service(&f, &h.spec.id).await;
        assert_eq!(
            iv.len(),
            1,
            "{} drained and undrained once: {iv:?}",
            h.spec.id
        );
        all.extend(iv);
    }
    assert_eq!(
        crate::fleet_processes::max_overlap(&all),
        1,
        "one host of the pool out of service at once across both waves; agent timelines: {all:?}"
    );
    assert!(
        waited(&a) || waited(&b),
        "the waves overlapped in time and one waited for the other's host"
    );
    assert_each_host_patched_once(&f).await;
}

/// The member that leads the cluster now.
async fn leader(etcd: &EtcdCluster) -> usize {
    for (i, m) in etcd.members.iter().enumerate() {
        let mut c = etcd_client::Client::connect([m.client_url.as_str()], None)
            .await
            .unwrap();
        let st = c.status().await.unwrap();
        if st.header().map(|h| h.member_id()) == Some(st.leader()) {
            return i;
        }
    }
    panic!("no member leads");
}

/// Scenario 4: the leader of a 3-member cluster dies mid-wave; the wave
/// pauses briefly (its requests are retried while a new leader is elected;
/// the lease survives) and finishes with every host patched exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_three_member_cluster_losing_its_leader_mid_wave_still_patches_every_host_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut etcd, f) = four_slow_hosts_on_etcd(dir.path(), 3).await;
    let spec = f.write_spec("leaderless", &pacing(1)).unwrap();
    let a_cfg = coordinator_settings(&f, &etcd, "a");
    let mut a = Proc::spawn(&a_cfg, &run_args(&f, &spec), "a-run");
    a.until(Duration::from_secs(60), host_event("done")).await;
    let killed = leader(&etcd).await;
    etcd.members[killed].kill();
    let before_kill = a.events().len();
    let code = a.exit(WAVE_LIMIT).await;
    assert_eq!(code, 0, "the wave completes: {}", a.stderr());
    let events = a.events();
    assert!(
        events[before_kill..].iter().any(|e| host_event("done")(e)),
        "hosts were patched after the leader died"
    );
    let at: Vec<i64> = events.iter().filter_map(|e| e["at_ms"].as_i64()).collect();
    let gap = at.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    eprintln!("largest pause between events: {gap} ms");

    // A host's run takes about 1 s here; the election and a retried
    // request add about as much, never the 5 s a lost proposal waits.
    assert!(gap < 3_000, "the wave paused {gap} ms");
    assert_each_host_patched_once(&f).await;
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
