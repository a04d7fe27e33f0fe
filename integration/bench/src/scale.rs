//! Coordinator scale and halt latency (issue 8, items 3 and 4): a fleet of
//! simulated hosts (default 10,000; `RINGFENCE_BENCH_HOSTS`) in 5 rings and
//! 10 pools behind one `ringfence-hostsim` process, driven by the real
//! `ringfence wave run` process over real mTLS with real signatures.
//!
//! Run 1 patches the whole fleet and measures the coordinator: wall time,
//! CPU time, peak RSS, state-store size. Run 2 starts a fresh fleet in which
//! one ring-2 host fails validation and measures, from the simulator's own
//! timestamps, how long dispatch went on after the failed validation was
//! handed to the coordinator, and whether any host that had not started yet,
//! or any ring 3/4 host, got a task.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringfence::keys;
use ringfence::pki::TestPki;
use ringfence::spiffe::Role;
use ringfence_devfleet::local_fleet::{self, NEW_VERSION, OLD_VERSION, TRUST_DOMAIN};
use ringfence_devfleet::simhost::{SimFleet, SimHostSpec, SimRecord};

use crate::{Args, Figure};

/// Hosts when `RINGFENCE_BENCH_HOSTS` is not set.
pub const DEFAULT_HOSTS: usize = 10_000;
/// Share of the fleet per ring 0-4, in per mille.
const RING_PER_MILLE: [usize; 5] = [10, 40, 100, 600, 250];
/// Pools the fleet is spread over.
const POOLS: usize = 10;
/// Wall time target for the whole fleet, seconds.
const WALL_TARGET_S: f64 = 60.0;
/// Peak coordinator RSS target, MiB.
const RSS_TARGET_MIB: f64 = 300.0;
/// Dispatch after a failure must stop within this, ms.
const HALT_TARGET_MS: f64 = 50.0;
/// Exit code of `ringfence wave run` for a halted wave.
const EXIT_HALTED: i32 = 4;

/// The host count: `RINGFENCE_BENCH_HOSTS` or [`DEFAULT_HOSTS`].
pub fn host_count() -> Result<usize, String> {
    match std::env::var("RINGFENCE_BENCH_HOSTS") {
        Err(_) => Ok(DEFAULT_HOSTS),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n >= 50 => Ok(n),
            _ => Err(format!(
                "RINGFENCE_BENCH_HOSTS=`{v}`: expected a host count of at least 50"
            )),
        },
    }
}

fn figure(name: &str, value: f64, unit: &str, target: &str, pass: Option<bool>) -> Figure {
    match pass {
        Some(p) => Figure::check("scale", name, value, unit, target, p),
        None => Figure::info("scale", name, value, unit, target),
    }
}

/// Run both waves over [`host_count`] simulated hosts (`--seconds` does not apply).
pub fn run(_args: &Args) -> Result<Vec<Figure>, String> {
    let hosts = host_count()?;
    let bins = Binaries::find()?;
    let root = std::env::temp_dir().join(format!("ringfence-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let result = run_in(&root, &bins, hosts);
    // Kept after a failure: the error names logs in it.
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

fn run_in(root: &Path, bins: &Binaries, hosts: usize) -> Result<Vec<Figure>, String> {
    let t = Instant::now();
    let fleet = Generated::new(root, hosts)?;
    eprintln!(
        "scale: generated {hosts} hosts (certificates, keys) in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut figures = Vec::new();

    let full = fleet.wave(bins, "scale", None)?;
    if full.exit != Some(0) {
        return Err(format!(
            "wave over {hosts} hosts did not complete (exit {:?}); see {}",
            full.exit,
            full.log_tail()
        ));
    }
    let patched_once = full.record.patches.values().filter(|&&n| n == 1).count();
    let n = hosts as f64;
    figures.push(figure("hosts", n, "hosts", "", None));
    figures.push(figure(
        "hosts patched exactly once",
        patched_once as f64,
        "hosts",
        &format!("= {hosts}"),
        Some(patched_once == hosts),
    ));
    figures.push(figure(
        "total wall time",
        full.wall_s,
        "s",
        &format!("<= {WALL_TARGET_S}"),
        Some(full.wall_s <= WALL_TARGET_S),
    ));
    figures.push(figure(
        "wall time per host",
        full.wall_s * 1000.0 / n,
        "ms",
        "",
        None,
    ));
    figures.push(figure(
        "coordinator CPU per host",
        full.cpu_s * 1000.0 / n,
        "ms",
        "",
        None,
    ));
    figures.push(figure(
        "peak coordinator RSS",
        full.peak_rss_mib,
        "MiB",
        &format!("<= {RSS_TARGET_MIB}"),
        Some(full.peak_rss_mib <= RSS_TARGET_MIB),
    ));
    figures.push(figure("state store size", full.store_mib, "MiB", "", None));

    let faulty = fleet.halt_host()?;
    let halted = fleet.wave(bins, "halt", Some(&faulty))?;
    if halted.exit != Some(EXIT_HALTED) {
        return Err(format!(
            "wave with failing host {faulty} did not halt (exit {:?}, expected {EXIT_HALTED}); see {}",
            halted.exit,
            halted.log_tail()
        ));
    }
    let h = HaltFigures::of(&halted.record, &faulty, &fleet.ring_of)?;
    figures.push(figure(
        "halt: last drain/patch after the failure",
        h.last_dispatch_ms,
        "ms",
        &format!("<= {HALT_TARGET_MS}"),
        Some(h.last_dispatch_ms <= HALT_TARGET_MS),
    ));
    figures.push(figure(
        "halt: hosts in flight at the failure",
        h.in_flight as f64,
        "hosts",
        "",
        None,
    ));
    figures.push(figure(
        "halt: drain/patch tasks after the failure (in-flight hosts)",
        h.dispatched_after as f64,
        "tasks",
        "",
        None,
    ));
    figures.push(figure(
        "halt: tasks to hosts not started before the failure",
        h.to_unstarted as f64,
        "tasks",
        "= 0",
        Some(h.to_unstarted == 0),
    ));
    figures.push(figure(
        "halt: tasks to rings 3-4",
        h.to_later_rings as f64,
        "tasks",
        "= 0",
        Some(h.to_later_rings == 0),
    ));
    figures.push(figure("halt: wave wall time", halted.wall_s, "s", "", None));
    Ok(figures)
}

/// The `ringfence` and `ringfence-hostsim` binaries next to this one.
struct Binaries {
    coordinator: PathBuf,
    hostsim: PathBuf,
}

impl Binaries {
    fn find() -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
        let dir = exe
            .parent()
            .ok_or_else(|| format!("{} has no directory", exe.display()))?;
        let bins = Self {
            coordinator: dir.join("ringfence"),
            hostsim: dir.join("ringfence-hostsim"),
        };
        for b in [&bins.coordinator, &bins.hostsim] {
            if !b.is_file() {
                return Err(format!(
                    "{} not found: build it beside the bench (cargo build --release -p ringfence-bench -p ringfence-coordinator)",
                    b.display()
                ));
            }
        }
        Ok(bins)
    }
}

/// The generated PKI, keys, fleet file and wave spec.
struct Generated {
    root: PathBuf,
    hosts: usize,
    keys: local_fleet::FleetKeys,
    ca: PathBuf,
    ops_cert: PathBuf,
    ops_key: PathBuf,
    fleet_file: PathBuf,
    /// (id, ring, pool, attestation public key text), inventory order.
    inventory: Vec<(String, u32, String, String)>,
    ring_of: BTreeMap<String, u32>,
}

fn write(path: &Path, bytes: impl AsRef<[u8]>) -> Result<(), String> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Ring of the `i`-th of `hosts` hosts: contiguous blocks by [`RING_PER_MILLE`].
fn ring_of_index(i: usize, hosts: usize) -> u32 {
    let mut upto = 0;
    for (r, pm) in RING_PER_MILLE.iter().enumerate() {
        upto += hosts * pm / 1000;
        if i < upto {
            return r as u32;
        }
    }
    4
}

impl Generated {
    fn new(root: &Path, hosts: usize) -> Result<Self, String> {
        std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let pki = TestPki::new(TRUST_DOMAIN).map_err(|e| e.to_string())?;
        let ca = root.join("ca.pem");
        write(&ca, pki.ca_pem())?;
        let ops = pki
            .issue(Role::Ops, "coordinator")
            .map_err(|e| e.to_string())?;
        let (ops_cert, ops_key) = (root.join("ops.pem"), root.join("ops.key"));
        write(&ops_cert, &ops.cert_pem)?;
        write(&ops_key, &ops.key_pem)?;
        let keys = local_fleet::write_keys(root, 2).map_err(|e| e.to_string())?;

        let mut sim = SimFleet {
            trust_domain: TRUST_DOMAIN.into(),
            driver_version: OLD_VERSION.into(),
            hosts: Vec::with_capacity(hosts),
        };
        let mut inventory = Vec::with_capacity(hosts);
        let mut ring_of = BTreeMap::new();
        for i in 0..hosts {
            let id = format!("h{i:05}");
            let ring = ring_of_index(i, hosts);
            let cert = pki.issue(Role::Host, &id).map_err(|e| e.to_string())?;
            let attestation = keys::generate();
            inventory.push((
                id.clone(),
                ring,
                format!("pool-{}", i % POOLS),
                keys::public_key_text(&attestation.verifying_key()),
            ));
            ring_of.insert(id.clone(), ring);
            sim.hosts.push(SimHostSpec {
                id,
                ring,
                cert_pem: cert.cert_pem.clone(),
                key_pem: cert.key_pem.clone(),
                attestation_seed: hex::encode(attestation.to_bytes()),
            });
        }
        let fleet_file = root.join("fleet.json");
        write(
            &fleet_file,
            serde_json::to_vec(&sim).map_err(|e| e.to_string())?,
        )?;
        Ok(Self {
            root: root.to_path_buf(),
            hosts,
            keys,
            ca,
            ops_cert,
            ops_key,
            fleet_file,
            inventory,
            ring_of,
        })
    }

    /// The ring-2 host in the middle of its ring (hosts before it are done
    /// or in flight when it fails).
    fn halt_host(&self) -> Result<String, String> {
        let ring2: Vec<&String> = self
            .inventory
            .iter()
            .filter(|h| h.1 == 2)
            .map(|h| &h.0)
            .collect();
        ring2
            .get(ring2.len() / 2)
            .map(|s| (*s).clone())
            .ok_or_else(|| "the fleet has no ring-2 host".to_string())
    }

    fn inventory_text(&self, addr: &str) -> String {
        let mut inv = format!("trust_domain = \"{TRUST_DOMAIN}\"\n");
        for p in 0..POOLS {
            let _ = write!(
                inv,
                "\n[[pool]]\nname = \"pool-{p}\"\nreserve_percent = 15\n"
            );
        }
        for (id, ring, pool, key) in &self.inventory {
            let _ = write!(
                inv,
                "\n[[host]]\nid = \"{id}\"\naddress = \"{addr}\"\npool = \"{pool}\"\nring = {ring}\nattestation_key = \"{key}\"\nexpected_gpus = 1\n"
            );
        }
        inv
    }

    fn spec_text(&self, wave: &str) -> String {
        let mut s = format!(
            "wave_id = \"{wave}\"\nprofile = \"nvidia-driver\"\nversion = \"{NEW_VERSION}\"\nexpect_driver_version = \"{NEW_VERSION}\"\nexpect_cuda_version = \"12.4\"\nrollback_version = \"{OLD_VERSION}\"\nfailure_budget = 0\nprotected_rings = [2, 3, 4]\napprover_threshold = 2\nmax_parallel_hosts = {}\n",
            self.hosts.min(256)
        );
        for r in 0..5 {
            let _ = write!(s, "\n[ring.{r}]\nbatch_size = {}\nsoak_s = 0\n", self.hosts);
        }
        s
    }

    /// One wave over a fresh simulator and a fresh coordinator state dir.
    fn wave(&self, bins: &Binaries, wave: &str, faulty: Option<&str>) -> Result<WaveRun, String> {
        let dir = self.root.join(wave);
        let state_dir = dir.join("coordinator-state");
        let settings = local_fleet::write_settings(
            &dir,
            &state_dir,
            &self.keys,
            &self.ops_cert,
            &self.ops_key,
            &self.ca,
        )
        .map_err(|e| e.to_string())?;
        let record_path = dir.join("hostsim-record.json");
        let mut sim = Command::new(&bins.hostsim);
        sim.arg("--fleet")
            .arg(&self.fleet_file)
            .arg("--trust")
            .arg(&self.keys.trust)
            .arg("--ca")
            .arg(&self.ca)
            .arg("--record")
            .arg(&record_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file(&dir.join("hostsim.log"))?);
        if let Some(h) = faulty {
            sim.args(["--faulty-host", h, "--faulty-version", NEW_VERSION]);
        }
        let mut sim = Guard(
            sim.spawn()
                .map_err(|e| format!("{}: {e}", bins.hostsim.display()))?,
        );
        let addr = listening_addr(&mut sim.0)?;

        let inventory = dir.join("inventory.toml");
        write(&inventory, self.inventory_text(&addr))?;
        let spec_path = dir.join(format!("{wave}.toml"));
        write(&spec_path, self.spec_text(wave))?;
        self.approve(&state_dir, &inventory, &spec_path)?;

        let log = dir.join("coordinator.log");
        let before = children_cpu_s();
        let start = Instant::now();
        let mut coord = Guard(
            Command::new(&bins.coordinator)
                .arg("--config")
                .arg(&settings)
                .args(["wave", "run", "--json", "--inventory"])
                .arg(&inventory)
                .arg("--spec")
                .arg(&spec_path)
                .stdin(Stdio::null())
                .stdout(log_file(&log)?)
                .stderr(log_file(&dir.join("coordinator.err"))?)
                .spawn()
                .map_err(|e| format!("{}: {e}", bins.coordinator.display()))?,
        );
        let mut peak_kib = 0u64;
        let status = loop {
            peak_kib = peak_kib.max(vm_hwm_kib(coord.0.id()).unwrap_or(0));
            match coord.0.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for the coordinator: {e}")),
            }
        };
        let wall_s = start.elapsed().as_secs_f64();
        let cpu_s = children_cpu_s() - before;

        // Closing stdin stops the simulator, which then writes its record.
        drop(sim.0.stdin.take());
        let sim_status = sim
            .0
            .wait()
            .map_err(|e| format!("waiting for the simulator: {e}"))?;
        if !sim_status.success() {
            return Err(format!(
                "ringfence-hostsim exited {sim_status}; see {}",
                dir.join("hostsim.log").display()
            ));
        }
        let record: SimRecord = serde_json::from_slice(
            &std::fs::read(&record_path).map_err(|e| format!("{}: {e}", record_path.display()))?,
        )
        .map_err(|e| format!("{}: {e}", record_path.display()))?;
        Ok(WaveRun {
            exit: status.code(),
            wall_s,
            cpu_s,
            peak_rss_mib: peak_kib as f64 / 1024.0,
            store_mib: dir_bytes(&state_dir) as f64 / (1024.0 * 1024.0),
            record,
            log: dir.join("coordinator.err"),
        })
    }

    /// Both approvers sign every protected ring, as `wave approve` would.
    fn approve(&self, state_dir: &Path, inventory: &Path, spec: &Path) -> Result<(), String> {
        let inv = ringfence_coordinator::inventory::Inventory::load(inventory)
            .map_err(|e| e.to_string())?;
        let spec = ringfence_coordinator::spec::WaveSpec::load(spec).map_err(|e| e.to_string())?;
        let plan = ringfence_coordinator::plan::Plan::build(
            &inv,
            &spec,
            &BTreeMap::new(),
            &BTreeMap::new(),
        )
        .map_err(|e| e.to_string())?;
        local_fleet::approve_protected_rings(state_dir, &spec, &plan, &self.keys.approver_keys)
    }
}

/// Kills its child if the bench bails out early.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn log_file(path: &Path) -> Result<std::fs::File, String> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Read the simulator's `listening <addr>` line.
fn listening_addr(child: &mut Child) -> Result<String, String> {
    let out = child
        .stdout
        .take()
        .ok_or("ringfence-hostsim has no stdout")?;
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| format!("reading ringfence-hostsim: {e}"))?;
    line.trim()
        .strip_prefix("listening ")
        .map(str::to_string)
        .ok_or_else(|| format!("ringfence-hostsim did not start (said `{}`)", line.trim()))
}

/// Peak resident set (VmHWM) of a running process, KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU seconds of every waited-for child so far.
fn children_cpu_s() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0.0)
}

/// Total size of the files under `dir`, bytes.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// What one wave run measured.
struct WaveRun {
    exit: Option<i32>,
    wall_s: f64,
    cpu_s: f64,
    peak_rss_mib: f64,
    store_mib: f64,
    record: SimRecord,
    log: PathBuf,
}

impl WaveRun {
    /// The coordinator's stderr, last lines.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "{}:\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }
}

/// The halt figures, from the simulator's timestamps.
#[derive(Debug, PartialEq)]
struct HaltFigures {
    /// From the failed validation handed to the coordinator to the last
    /// drain or patch any host received after it (0 if none).
    last_dispatch_ms: f64,
    /// Drain and patch tasks received after the failure.
    dispatched_after: usize,
    /// Tasks received after the failure by hosts that had not attested before it.
    to_unstarted: usize,
    /// Tasks received by ring 3 and 4 hosts.
    to_later_rings: usize,
    /// Other hosts that had attested but not been undrained at the failure.
    in_flight: usize,
}

const TASK_ACTIONS: [&str; 4] = ["drain", "patch", "validate", "undrain"];

impl HaltFigures {
    fn of(
        record: &SimRecord,
        faulty: &str,
        ring_of: &BTreeMap<String, u32>,
    ) -> Result<Self, String> {
        let t_fail = record
            .events
            .iter()
            .filter(|e| e.host == faulty && e.what == "validate_failed")
            .map(|e| e.at_us)
            .min()
            .ok_or_else(|| {
                format!("host {faulty} never handed its failed validation to the coordinator")
            })?;
        let started: BTreeSet<&str> = record
            .events
            .iter()
            .filter(|e| e.what == "attest" && e.at_us <= t_fail)
            .map(|e| e.host.as_str())
            .collect();
        let undrained: BTreeSet<&str> = record
            .events
            .iter()
            .filter(|e| e.what == "undrain" && e.at_us <= t_fail)
            .map(|e| e.host.as_str())
            .collect();
        let in_flight = started
            .iter()
            .filter(|h| **h != faulty && !undrained.contains(*h))
            .count();
        let mut last = t_fail;
        let (mut dispatched_after, mut to_unstarted, mut to_later_rings) = (0, 0, 0);
        for e in &record.events {
            if !TASK_ACTIONS.contains(&e.what.as_str()) {
                continue;
            }
            if ring_of.get(&e.host).is_some_and(|&r| r >= 3) {
                to_later_rings += 1;
            }
            if e.at_us <= t_fail {
                continue;
            }
            if !started.contains(e.host.as_str()) {
                to_unstarted += 1;
            }
            if e.what == "drain" || e.what == "patch" {
                dispatched_after += 1;
                last = last.max(e.at_us);
            }
        }
        Ok(Self {
            last_dispatch_ms: (last - t_fail) as f64 / 1000.0,
            dispatched_after,
            to_unstarted,
            to_later_rings,
            in_flight,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ringfence_devfleet::simhost::SimEvent;

    fn ev(at_us: i64, host: &str, what: &str) -> SimEvent {
        SimEvent {
            at_us,
            host: host.into(),
            what: what.into(),
        }
    }

    #[test]
    fn rings_follow_the_per_mille_layout() {
        let rings: Vec<u32> = (0..1000).map(|i| ring_of_index(i, 1000)).collect();
        for (r, pm) in RING_PER_MILLE.iter().enumerate() {
            assert_eq!(rings.iter().filter(|&&x| x == r as u32).count(), *pm);
        }
    }

    #[test]
    fn halt_figures_count_only_what_came_after_the_failure() {
        let ring_of: BTreeMap<String, u32> = [("a", 2), ("b", 2), ("c", 2), ("d", 3)]
            .into_iter()
            .map(|(h, r)| (h.to_string(), r))
            .collect();
        let record = SimRecord {
            events: vec![
                ev(100, "a", "attest"),
                ev(110, "b", "attest"),
                ev(120, "a", "validate_failed"),
                ev(2_120, "b", "drain"),
                ev(5_120, "b", "patch"),
                ev(6_000, "c", "attest"),
                ev(7_000, "c", "drain"),
            ],
            patches: BTreeMap::new(),
        };
        let h = HaltFigures::of(&record, "a", &ring_of).unwrap();
        assert_eq!(
            h,
            HaltFigures {
                last_dispatch_ms: 6.88,
                dispatched_after: 3,
                to_unstarted: 1,
                to_later_rings: 0,
                in_flight: 1,
            }
        );
        assert!(HaltFigures::of(&record, "b", &ring_of).is_err());
    }
}
