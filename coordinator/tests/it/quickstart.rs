//! README's "Your first real wave", run verbatim: every ```sh block between
//! the quickstart markers, in order, in one bash shell (`set -euo
//! pipefail`), in an empty directory, with the built `ringfence` and
//! `ringfenced` first on PATH. A command of the section that breaks fails
//! this test; what the agents recorded (the versions their patch profile
//! installed, once each) is checked after it.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringfence_coordinator::cli::{LAB_NEW_VERSION, LAB_OLD_VERSION};

const BEGIN: &str = "<!-- quickstart:begin -->";
const END: &str = "<!-- quickstart:end -->";
/// The whole section, agents included, finishes well within this.
const LIMIT: Duration = Duration::from_secs(240);

/// The ```sh blocks between the markers, in order.
fn quickstart_blocks(readme: &str) -> Vec<String> {
    let start = readme
        .find(BEGIN)
        .expect("README has the quickstart begin marker");
    let end = readme
        .find(END)
        .expect("README has the quickstart end marker");
    assert!(start < end, "quickstart markers out of order");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme[start + BEGIN.len()..end].lines() {
        match (&mut current, line.trim()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(b), "```") => {
                blocks.push(std::mem::take(b));
                current = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(
        current.is_none(),
        "an unterminated ```sh block in the quickstart"
    );
    blocks
}

/// A block of `n` ports on 127.0.0.1 that are free now.
fn free_ports(n: u16) -> u16 {
    for _ in 0..200 {
        let base = 20000 + u16::try_from(rand_below(20000)).unwrap();
        let held: Vec<_> = (0..n)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports on 127.0.0.1");
}

fn rand_below(n: u32) -> u32 {
    let r = ringfence::attest::new_nonce();
    u32::from_le_bytes([r[0], r[1], r[2], r[3]]) % n
}

fn bin_dir(bin: &Path) -> PathBuf {
    bin.parent().expect("binary has a directory").to_path_buf()
}

/// Every process of the script's group ends, whatever happened.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[test]
fn the_readme_quickstart_runs_verbatim_from_zero_to_verified_evidence() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let blocks = quickstart_blocks(&readme);
    assert!(blocks.len() >= 8, "{} quickstart blocks", blocks.len());
    let script = format!("set -euo pipefail\nexec 2>&1\n{}", blocks.concat());

    let ringfence = PathBuf::from(env!("CARGO_BIN_EXE_ringfence"));
    let ringfenced = super::common::artifact("ringfenced");
    let path = format!(
        "{}:{}:{}",
        bin_dir(&ringfence).display(),
        bin_dir(&ringfenced).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("quickstart.out");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&work)
        .env("PATH", path)
        .env_remove("RINGFENCE_CONFIG")
        .env_remove("RINGFENCED_CONFIG")
        .env("RINGFENCE_LAB_BASE_PORT", free_ports(4).to_string())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let group = Group(i32::try_from(child.id()).unwrap());
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&out_file).unwrap_or_default();
    let lab = work.join("lab");
    let pids: Vec<i32> = (1..=4)
        .filter_map(|i| std::fs::read_to_string(lab.join(format!("hosts/gpu-{i}/agent.pid"))).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    // The last block stopped the agents: none is left behind.
    let stopped_by = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < stopped_by {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    drop(group);
    let Some(status) = status else {
        panic!("the quickstart did not finish within {LIMIT:?}:\n{out}");
    };
    assert_eq!(
        status.code(),
        Some(0),
        "a quickstart command failed:\n{out}"
    );
    assert_eq!(pids.len(), 4, "one agent per host was started:\n{out}");
    assert!(
        left.is_empty(),
        "agents {left:?} still run after the last block"
    );

    // What the agents recorded: each installed the new driver, exactly once,
    // and its simulated GPUs report it.
    for i in 1..=4 {
        let host = lab.join(format!("hosts/gpu-{i}"));
        let runs = std::fs::read_to_string(host.join("patch_runs")).unwrap_or_default();
        assert_eq!(
            runs.lines().collect::<Vec<_>>(),
            [LAB_NEW_VERSION],
            "gpu-{i}"
        );
        let version = std::fs::read_to_string(host.join("driver_version")).unwrap();
        assert_eq!(
            version.trim(),
            LAB_NEW_VERSION,
            "gpu-{i}, was {LAB_OLD_VERSION}"
        );
        // Its log names the verdict and ends with a clean stop.
        let log = std::fs::read_to_string(host.join("agent.log")).unwrap_or_default();
        assert!(
            log.contains("ringfenced serving") && log.contains("verdict=\"HEALTHY\""),
            "gpu-{i}: {log}"
        );
        assert!(log.contains("journal synced"), "gpu-{i}: {log}");
    }

    // What the operator saw, step by step.
    for expected in [
        "wrote a lab of 4 hosts",
        "gpu-4: enrolled",
        "pre-flight: 4 host(s) asked",
        "approval 1 of 2 for ring 2 (alice)",
        "approval 2 of 2 for ring 2 (alice, bob)",
        "ring 2 (canary): running (AWAITING_APPROVAL: 0 of 2)",
        "ring 2 (canary): complete (approved: 2 of 2, alice, bob)",
        "HALTED by the operator in ring 3",
        "wave run exited 4",
        "a plain `ringfence wave resume --wave lab-1` continues",
        "approval 2 of 2 for ring 3 (alice, bob)",
        "wave completed: every ring promoted",
        "gpu-4: validated HEALTHY and back in service",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // The last health table: every host serving on the new driver.
    let table = out
        .rsplit("HOST             RING")
        .next()
        .unwrap_or_default()
        .to_string();
    for i in 1..=4 {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("gpu-{i} ")))
            .unwrap_or_else(|| panic!("gpu-{i} has no row in:\n{table}"));
        assert!(
            row.contains("HEALTHY") && row.contains(LAB_NEW_VERSION) && row.contains("serving"),
            "{row}"
        );
    }
    // Every packet verifies: rings 0-2 once, ring 3 halted then completed.
    let packets = std::fs::read_dir(lab.join("state/lab-1.evidence"))
        .unwrap()
        .count();
    assert_eq!(packets, 5, "{out}");
    assert_eq!(
        out.matches(": VALID, signed by lab-coordinator").count(),
        packets,
        "{out}"
    );
}

#[test]
fn the_quickstart_blocks_are_read_in_order_and_only_between_the_markers() {
    let text = format!(
        "```sh\nnot me\n```\n{BEGIN}\ntext\n```sh\na\nb\n```\n```toml\nx\n```\n  ```sh\nc\n  ```\n{END}\n```sh\nnor me\n```\n"
    );
    assert_eq!(quickstart_blocks(&text), ["a\nb\n", "c\n"]);
}
