//! `ringfence lab init`: the files of a small loopback fleet, ready for a
//! first real wave — a fleet CA, one host certificate per agent, the
//! coordinator's mTLS identity and signing key, two approver keys, the
//! trust file, one `agent.toml` per host on the simulated GPU backend (a
//! scenario file per host, a patch profile that writes the version the
//! simulated GPUs report), the inventory, a wave spec and `ringfence.toml`.
//! It starts nothing; it prints the commands that do (README: "Your first
//! real wave").
//!
//! Built from `ringfence::pki` and `ringfence::keys` only: the packaged
//! `ringfence` links neither the agent nor the test fleet.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use ringfence::keys::{self, KeyError};
use ringfence::pki::{self, PkiError};
use ringfence::spiffe::Role;

/// The driver version the lab's simulated GPUs start on.
pub const LAB_OLD_VERSION: &str = "550.54.15";
/// The driver version the lab's wave installs.
pub const LAB_NEW_VERSION: &str = "560.35.03";
/// The lab wave's id.
pub const LAB_WAVE_ID: &str = "lab-1";
/// The most hosts a lab has (one loopback port each).
pub const MAX_LAB_HOSTS: u16 = 200;

/// `ringfence lab`: a loopback fleet to learn on.
#[derive(Debug, Args)]
pub struct LabArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: LabCommand,
}

/// The `lab` subcommands.
#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Write a loopback fleet's files into an empty DIR (CA, host
    /// certificates, coordinator and approver keys, trust file, agent
    /// configs on the simulated GPU backend, inventory, wave spec,
    /// ringfence.toml); starts nothing, prints the next commands.
    Init {
        /// Number of hosts (agents), 2-200: the first in ring 0, the second
        /// in ring 1, the third in ring 2, the rest in ring 3.
        #[arg(long, value_parser = clap::value_parser!(u16).range(2..=i64::from(MAX_LAB_HOSTS)))]
        hosts: u16,
        /// Directory to write (created; refused when not empty).
        #[arg(long)]
        dir: PathBuf,
        /// Port of the first agent on 127.0.0.1; host i listens on PORT + i - 1.
        #[arg(long, default_value_t = 17401, env = "RINGFENCE_LAB_BASE_PORT")]
        base_port: u16,
        /// SPIFFE trust domain of the lab's CA.
        #[arg(long, default_value = "lab.ringfence.test")]
        trust_domain: String,
    },
}

/// Why `lab init` wrote no lab (or only part of one).
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The directory already holds files.
    #[error("{}: not empty; `lab init` writes a new lab into an empty or missing directory", .0.display())]
    NotEmpty(PathBuf),
    /// The ports of the hosts run past 65535.
    #[error("--base-port {base_port} with {hosts} hosts runs past port 65535")]
    Ports {
        /// The first port.
        base_port: u16,
        /// Hosts asked for.
        hosts: u16,
    },
    /// A file or directory could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA or a certificate could not be made.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A signing key could not be written.
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Run a `lab` command.
pub(super) fn run(cmd: &LabCommand) -> Result<(), LabError> {
    match cmd {
        LabCommand::Init {
            hosts,
            dir,
            base_port,
            trust_domain,
        } => {
            let lab = init(dir, *hosts, *base_port, trust_domain)?;
            super::render::print_text(&next_steps(&lab));
            Ok(())
        }
    }
}

/// What `lab init` wrote.
#[derive(Debug, Clone)]
pub struct Lab {
    /// The lab directory (absolute).
    pub dir: PathBuf,
    /// Host ids, in inventory order.
    pub hosts: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `text` to a new file `path` (never over an existing one).
fn write_new(path: &Path, text: &str) -> Result<(), LabError> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))
}

/// A TOML basic string of `s` (quotes and backslashes escaped).
fn q(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

/// A path as a TOML string.
fn qp(p: &Path) -> String {
    q(p.to_string_lossy())
}

/// The ring of the `i`-th host (0-based).
fn ring_of(i: usize) -> u32 {
    u32::try_from(i.min(3)).unwrap_or(3)
}

/// Write a lab of `hosts` agents into `dir` (empty or missing).
pub fn init(dir: &Path, hosts: u16, base_port: u16, trust_domain: &str) -> Result<Lab, LabError> {
    if hosts == 0 || base_port.checked_add(hosts - 1).is_none() {
        return Err(LabError::Ports { base_port, hosts });
    }
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io(dir))?;
        if entries.next().is_some() {
            return Err(LabError::NotEmpty(dir.to_path_buf()));
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let root = std::fs::canonicalize(dir).map_err(io(dir))?;

    // The fleet CA and the coordinator's mTLS identity.
    let pki_dir = root.join("pki");
    let ca = pki::init(&pki_dir, trust_domain)?;
    let ops = pki::issue(&pki_dir, Role::Ops, "coordinator", &root, 365)?;

    // Signing keys and the trust file the agents and the coordinator share.
    let coordinator = keys::generate();
    let coordinator_key = root.join("coordinator.key");
    keys::write_signing_key(&coordinator_key, &coordinator)?;
    let mut trust = format!(
        "# The lab's trust file: who may sign tasks and approvals.\n[policy]\nprotected_rings = [2, 3, 4]\napprover_threshold = 2\n\n[[coordinator]]\nid = \"lab-coordinator\"\nkey = {}\n",
        q(keys::public_key_text(&coordinator.verifying_key()))
    );
    for name in ["alice", "bob"] {
        let k = keys::generate();
        keys::write_signing_key(&root.join(format!("{name}.key")), &k)?;
        let _ = write!(
            trust,
            "\n[[approver]]\nid = {}\nkey = {}\n",
            q(name),
            q(keys::public_key_text(&k.verifying_key()))
        );
    }
    let trust_file = root.join("trust.toml");
    write_new(&trust_file, &trust)?;

    let state_dir = root.join("state");
    write_new(
        &root.join("ringfence.toml"),
        &format!(
            "# The lab coordinator's settings (`ringfence` reads ./ringfence.toml).\nstate_dir = {}\ntrust_file = {}\n\n[signing]\nkey = {}\nkey_id = \"lab-coordinator\"\n\n[tls]\ncert = {}\nkey = {}\nca_bundle = {}\n\n[timeouts]\nconnect_s = 3\nrpc_s = 10\n",
            qp(&state_dir),
            qp(&trust_file),
            qp(&coordinator_key),
            qp(&ops.cert),
            qp(&ops.key),
            qp(&ca.cert),
        ),
    )?;

    // One directory per host: certificate, scenario, agent.toml.
    let reserve = crate::preflight::reserve_percent_for_one(usize::from(hosts))
        .unwrap_or(50)
        .max(25);
    let mut inventory = format!(
        "# The lab's inventory; `ringfence inventory enroll` writes each host's attestation_key.\ntrust_domain = {}\n\n[[pool]]\nname = \"lab\"\nreserve_percent = {reserve}\n",
        q(trust_domain)
    );
    let mut ids = Vec::new();
    for i in 0..usize::from(hosts) {
        let id = format!("gpu-{}", i + 1);
        let ring = ring_of(i);
        let port = base_port + u16::try_from(i).unwrap_or(0);
        let listen = format!("127.0.0.1:{port}");
        let hdir = root.join("hosts").join(&id);
        let hstate = hdir.join("state");
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&hstate)
                .map_err(io(&hstate))?;
        }
        let cert = pki::issue(&pki_dir, Role::Host, &id, &hdir, 365)?;
        let driver_file = hdir.join("driver_version");
        write_new(&driver_file, LAB_OLD_VERSION)?;
        let mut scenario = format!(
            "# Simulated GPUs: they report the driver version written in driver_version.\ndriver_version = {}\ndriver_version_file = {}\ncuda_driver_version = \"12.4\"\n",
            q(LAB_OLD_VERSION),
            qp(&driver_file)
        );
        for g in 0..2 {
            let _ = write!(
                scenario,
                "\n[[gpu]]\nuuid = \"GPU-{id}-{g}\"\nname = \"NVIDIA H100 80GB HBM3 (simulated)\"\n"
            );
        }
        let scenario_file = hdir.join("scenario.toml");
        write_new(&scenario_file, &scenario)?;
        let agent = format!(
            r#"# {id}'s agent: `ringfenced --config {config} run`.
host_id = {qid}
ring = {ring}
listen = {qlisten}
state_dir = {state}
trust_file = {trust}

[tls]
cert = {cert}
key = {key}
ca_bundle = {ca}
trust_domain = {td}

[gpu]
backend = "simulated"
scenario = {scenario}
expected_gpus = 2
poll_interval_s = 1

[drain]
timeout_s = 30
poll_ms = 100

[reboot]
command = ["/bin/true"]

# The "patch": write the version where the simulated GPUs read it, and count the runs.
[patch.profiles.nvidia-driver]
argv = ["/bin/sh", "-c", "printf '%s' \"$1\" > \"$2\"; echo \"$1\" >> \"$3\"", "sh", "{{version}}", {driver}, {runs}]
version_pattern = '^[0-9]+\.[0-9]+\.[0-9]+$'
timeout_s = 30
"#,
            config = hdir.join("agent.toml").display(),
            qid = q(&id),
            qlisten = q(&listen),
            state = qp(&hstate),
            trust = qp(&trust_file),
            cert = qp(&cert.cert),
            key = qp(&cert.key),
            ca = qp(&ca.cert),
            td = q(trust_domain),
            scenario = qp(&scenario_file),
            driver = qp(&driver_file),
            runs = qp(&hdir.join("patch_runs")),
        );
        write_new(&hdir.join("agent.toml"), &agent)?;
        let _ = write!(
            inventory,
            "\n[[host]]\nid = {}\naddress = {}\npool = \"lab\"\nring = {ring}\nexpected_gpus = 2\n",
            q(&id),
            q(&listen)
        );
        ids.push(id);
    }
    write_new(&root.join("inventory.toml"), &inventory)?;
    write_new(
        &root.join("wave.toml"),
        &format!(
            "# The lab's wave: every host from {LAB_OLD_VERSION} to {LAB_NEW_VERSION}, ring by ring.\nwave_id = {}\nprofile = \"nvidia-driver\"\nversion = {}\nexpect_driver_version = {}\nexpect_cuda_version = \"12.4\"\nrollback_version = {}\n\n[ring.0]\nsoak_s = 0\n\n[ring.1]\nsoak_s = 0\n\n[ring.2]\nsoak_s = 3\n\n[ring.3]\nbatch_size = 2\nsoak_s = 0\n",
            q(LAB_WAVE_ID),
            q(LAB_NEW_VERSION),
            q(LAB_NEW_VERSION),
            q(LAB_OLD_VERSION)
        ),
    )?;
    Ok(Lab {
        dir: root,
        hosts: ids,
    })
}

/// What to do next, printed after `lab init`.
fn next_steps(lab: &Lab) -> String {
    let d = lab.dir.display();
    let mut s = format!(
        "wrote a lab of {} hosts in {d}\n  pki/ (the CA), ops-coordinator.pem/.key, coordinator.key, alice.key, bob.key (approvers),\n  trust.toml, ringfence.toml, inventory.toml, wave.toml, hosts/<id>/agent.toml\n",
        lab.hosts.len()
    );
    let _ = write!(
        s,
        "next (README: \"Your first real wave\"):\n  cd {d}\n  for h in hosts/*; do ringfenced --config \"$h/agent.toml\" run > \"$h/agent.log\" 2>&1 & echo $! > \"$h/agent.pid\"; done\n  ringfence inventory enroll --inventory inventory.toml\n  ringfence wave plan --inventory inventory.toml --spec wave.toml\n  ringfence wave run --inventory inventory.toml --spec wave.toml\n  ringfence wave approve --wave {LAB_WAVE_ID} --ring 2 --key alice.key --inventory inventory.toml --spec wave.toml   (and bob.key)\n  kill $(cat hosts/*/agent.pid)   # stop the agents\n"
    );
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_lab_is_a_valid_fleet_and_a_second_init_into_it_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lab");
        let lab = init(&dir, 5, 20000, "lab.test").unwrap();
        assert_eq!(lab.hosts, ["gpu-1", "gpu-2", "gpu-3", "gpu-4", "gpu-5"]);
        let inv = crate::inventory::Inventory::load(&dir.join("inventory.toml")).unwrap();
        let rings: Vec<(String, u32, String)> = inv
            .hosts
            .iter()
            .map(|h| (h.id.clone(), h.ring, h.address.clone()))
            .collect();
        assert_eq!(
            rings,
            [
                ("gpu-1".into(), 0, "127.0.0.1:20000".into()),
                ("gpu-2".into(), 1, "127.0.0.1:20001".into()),
                ("gpu-3".into(), 2, "127.0.0.1:20002".into()),
                ("gpu-4".into(), 3, "127.0.0.1:20003".into()),
                ("gpu-5".into(), 3, "127.0.0.1:20004".into()),
            ]
        );
        // Every pool lets at least one host out at a time.
        for p in inv.pools.values() {
            assert_eq!(
                crate::preflight::reserve_warning(&p.name, 5, p.reserve_percent),
                None
            );
        }
        let settings = crate::settings::Settings::load(Some(&dir.join("ringfence.toml"))).unwrap();
        let trust = ringfence::trust::TrustSet::load(&settings.trust_file).unwrap();
        let ids: Vec<&str> = trust.keys().iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["lab-coordinator", "alice", "bob"]);
        assert_eq!(trust.policy.approver_threshold, 2);
        let src = ringfence::config::Source::read(&dir.join("wave.toml")).unwrap();
        let spec = crate::spec::WaveSpec::from_source(&src).unwrap();
        assert_eq!(spec.wave_id, LAB_WAVE_ID);
        let agent = std::fs::read_to_string(dir.join("hosts/gpu-3/agent.toml")).unwrap();
        assert!(agent.contains("ring = 2") && agent.contains("backend = \"simulated\""));
        assert!(dir.join("hosts/gpu-3/host-gpu-3.pem").exists());

        let again = init(&dir, 2, 20000, "lab.test").unwrap_err().to_string();
        assert!(again.contains("not empty"), "{again}");
        let ports = init(&tmp.path().join("x"), 3, 65534, "lab.test")
            .unwrap_err()
            .to_string();
        assert!(ports.contains("past port 65535"), "{ports}");
    }
}
