//! Issue 17, schedulers: the shipped Slurm hooks (`packaging/hooks/`) as a
//! real `ringfenced` runs them against a real single-node Slurm (Debian's
//! `slurmctld`, `slurmd` and `munge`, started here as children with their
//! own munge key, socket, ports and state in a temp dir).
//!
//! A wave's drain sets the node DRAINING with ringfence's reason and waits
//! while a job runs; once the job ends the node is DRAINED and the drain
//! succeeds; a new job stays pending; validate + undrain return the node
//! to IDLE and the pending job runs. A node an admin drained stays drained
//! (the undrain fails and names the admin's reason), and a drain with
//! slurmctld down fails with Slurm's own words and the host marked
//! draining. Needs root (slurmd runs the jobs) and the Slurm packages of
//! `.ci/run`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::proc_common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ringfence::pb::{self, TaskState};

use proc_common::*;

/// Slurm start-up, job scheduling and hook runs on a loaded 2-core machine.
const LIMIT: Duration = Duration::from_secs(90);

/// A daemon in its own process group; the whole group (a health check or
/// client slurmd started, say) is killed and the daemon reaped on drop.
struct Daemon(Child);

impl Daemon {
    fn start(name: &'static str, cmd: &mut Command, log: &Path) -> Self {
        let out = std::fs::File::create(log).unwrap();
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {name}: {e}; install it: apt-get install slurmctld slurmd munge slurm-client (see .ci/run)")
            });
        Self(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A one-node Slurm cluster whose only node is this machine under its
/// short host name (the hooks' default node name).
struct Slurm {
    dir: tempfile::TempDir,
    conf: PathBuf,
    node: String,
    // Dropped in this order: slurmd, slurmctld, then munged.
    slurmd: Option<Daemon>,
    slurmctld: Option<Daemon>,
    _munged: Daemon,
}

/// A shipped hook, `packaging/hooks/NAME`.
fn hook(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/hooks")
        .join(name)
        .canonicalize()
        .unwrap()
}

/// A TCP port free on every address a moment ago (slurmctld and slurmd
/// bind the wildcard address).
fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let b = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

impl Slurm {
    fn start() -> Self {
        Self::start_with(|_| String::new())
    }

    /// Start with the lines `extra(path of slurm.conf)` added to slurm.conf.
    fn start_with(extra: impl FnOnce(&Path) -> String) -> Self {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the Slurm test runs slurmd, which runs jobs, and needs root"
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        // munged wants every directory above its socket searchable by all.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["munge", "state", "spool", "log", "jobs"] {
            std::fs::create_dir(root.join(sub)).unwrap();
        }
        std::fs::set_permissions(root.join("munge"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let mut key = vec![0u8; 1024];
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut key)
            .unwrap();
        let key_path = root.join("munge/munge.key");
        std::fs::write(&key_path, &key).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o400)).unwrap();
        let socket = root.join("munge/munge.socket");

        let node = String::from_utf8(Command::new("hostname").arg("-s").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        assert!(!node.is_empty(), "hostname -s printed nothing");
        let (ctld_port, slurmd_port) = free_ports();
        let conf = root.join("slurm.conf");
        let extra = extra(&conf);
        let p = |s: &str| root.join(s).display().to_string();
        let conf_text = format!(
            "ClusterName=rftest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={ctld_pid}
SlurmdPidFile={slurmd_pid}
SlurmctldLogFile={ctld_log}
SlurmdLogFile={slurmd_log}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
{extra}",
            socket = socket.display(),
            state = p("state"),
            spool = p("spool"),
            ctld_pid = p("slurmctld.pid"),
            slurmd_pid = p("slurmd.pid"),
            ctld_log = p("log/slurmctld.log"),
            slurmd_log = p("log/slurmd.log"),
        );
        std::fs::write(&conf, conf_text).unwrap();

        let munged = Daemon::start(
            "munged",
            Command::new("munged")
                .arg("--foreground")
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--key-file={}", key_path.display()))
                .arg(format!("--pid-file={}", p("munge/munged.pid")))
                .arg(format!("--log-file={}", p("munge/munged.log")))
                .arg(format!("--seed-file={}", p("munge/munged.seed"))),
            &root.join("log/munged.out"),
        );
        let mut slurm = Self {
            dir,
            conf,
            node,
            slurmd: None,
            slurmctld: None,
            _munged: munged,
        };
        slurm.wait_for("munged's socket", || socket.exists());
        let ctld = Daemon::start(
            "slurmctld",
            slurm.cmd("slurmctld").arg("-D").arg("-i"),
            &root.join("log/slurmctld.out"),
        );
        slurm.slurmctld = Some(ctld);
        let slurmd = Daemon::start(
            "slurmd",
            slurm.cmd("slurmd").arg("-D").arg("-N").arg(&slurm.node),
            &root.join("log/slurmd.out"),
        );
        slurm.slurmd = Some(slurmd);
        slurm.wait_for("the node up (IDLE)", || {
            slurm.node_state().0.starts_with("IDLE")
        });
        slurm
    }

    /// A Slurm command with this cluster's `SLURM_CONF`.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf).current_dir(self.dir.path());
        c
    }

    /// Run a Slurm client; its stdout, or `Err(stderr)`.
    fn try_run(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let out = self.cmd(program).args(args).output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{program} {args:?}: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        self.try_run(program, args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// The node's `State=` and `Reason=` (without the `[user@time]` suffix)
    /// as `scontrol show node` prints them; empty when unreadable.
    fn node_state(&self) -> (String, String) {
        let Ok(line) = self.try_run("scontrol", &["-o", "show", "node", &self.node]) else {
            return (String::new(), String::new());
        };
        let state = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("State="))
            .unwrap_or_default()
            .to_string();
        let reason = line.find(" Reason=").map_or_else(String::new, |at| {
            let r = line[at + " Reason=".len()..].trim_end();
            r.rfind(" [").map_or(r, |end| &r[..end]).to_string()
        });
        (state, reason)
    }

    /// Submit a batch job running `script` in the temp dir; its id.
    fn submit(&self, script: &str) -> String {
        let out = self.run(
            "sbatch",
            &["--parsable", "--output=/dev/null", "--wrap", script],
        );
        out.trim().split(';').next().unwrap().to_string()
    }

    /// `JobState=` and `Reason=` of a job.
    fn job(&self, id: &str) -> (String, String) {
        let line = self.run("scontrol", &["-o", "show", "job", id]);
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_default()
                .to_string()
        };
        (field("JobState="), field("Reason="))
    }

    /// Stop slurmctld (the node's slurmd keeps running).
    fn stop_slurmctld(&mut self) {
        self.slurmctld = None;
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for f in [
            "log/munged.out",
            "log/slurmctld.out",
            "log/slurmctld.log",
            "log/slurmd.out",
            "log/slurmd.log",
        ] {
            let text = std::fs::read_to_string(self.path(f)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s.push_str(&format!("--- {f} (last lines)\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Poll a synchronous condition every 200 ms for [`LIMIT`].
    fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + LIMIT;
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "Slurm: {what} not within {LIMIT:?}; {:?}\n{}",
                self.node_state(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// An agent on the fake NVML library whose `[drain]` runs the shipped
    /// Slurm hooks against this cluster.
    fn agent_host(&self, id: &str) -> Host {
        let hook = |name: &str| hook(name).display().to_string();
        let conf = self.conf.display().to_string();
        let extra = format!(
            r#"hook = ["{drain}", "--conf", "{conf}", "--", "{{reason}}"]
wait_command = ["{wait}", "--conf", "{conf}"]
undrain_hook = ["{resume}", "--conf", "{conf}"]
wait_interval_s = 1
wait_timeout_s = 120
hook_timeout_s = 60
"#,
            drain = hook("slurm-drain"),
            wait = hook("slurm-wait-drained"),
            resume = hook("slurm-resume"),
        );
        Host::new(
            id,
            HostOpts {
                extra,
                ..HostOpts::default()
            },
        )
    }
}

/// Send a signed task and wait for its end state.
async fn task_ends(
    host: &Host,
    id: &str,
    seq: u64,
    action: pb::task_payload::Action,
) -> pb::TaskStatus {
    let mut client = host.client().await;
    client
        .submit_task(host.task(id, seq, action))
        .await
        .unwrap();
    poll(&format!("task {id} ends"), LIMIT, || {
        let mut client = client.clone();
        async move {
            let s = task_state(&mut client, id).await;
            matches!(s.state(), TaskState::Succeeded | TaskState::Failed).then_some(s)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wave_drain_waits_for_the_running_job_and_undrain_returns_the_node_to_idle() {
    let slurm = Slurm::start();
    let release = slurm.path("jobs/release");
    let job1 = slurm.submit(&format!(
        "while [ ! -e '{}' ]; do sleep 0.2; done",
        release.display()
    ));
    slurm.wait_for("job 1 RUNNING", || slurm.job(&job1).0 == "RUNNING");

    let host = slurm.agent_host("gpu-slurm");
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let mut client = host.client().await;
    client
        .submit_task(host.task("drain-1", 1, drain("patch nvidia-driver 550.90")))
        .await
        .unwrap();

    // DRAINING under ringfence's reason; the drain task waits for the job.
    let waiting = poll("the drain waits for the scheduler", LIMIT, || {
        let mut client = client.clone();
        async move {
            let s = task_state(&mut client, "drain-1").await;
            (s.step == "wait_scheduler" && s.message.contains("is draining")).then_some(s)
        }
    })
    .await;
    assert_eq!(waiting.state(), TaskState::Running, "{waiting:?}");
    assert!(
        waiting.message.contains("1 job(s) still on it"),
        "{}",
        waiting.message
    );
    let (state, reason) = slurm.node_state();
    assert!(
        state == "ALLOCATED+DRAIN" || state == "MIXED+DRAIN",
        "DRAINING while the job runs: {state}"
    );
    assert_eq!(
        reason,
        "ringfence: wave wave-proc task drain-1: patch nvidia-driver 550.90"
    );
    // Several polls later it still waits: the job is still running.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = task_state(&mut client, "drain-1").await;
    assert_eq!(
        (s.state(), s.step.as_str()),
        (TaskState::Running, "wait_scheduler"),
        "{s:?}"
    );
    assert_eq!(slurm.job(&job1).0, "RUNNING");

    // The job ends: DRAINED, and only then the drain task succeeds.
    std::fs::write(&release, "").unwrap();
    let done = wait_task(&mut client, "drain-1", TaskState::Succeeded, LIMIT).await;
    assert!(done.message.contains("DRAINED"), "{}", done.message);
    assert!(
        done.output_tail.iter().any(|l| l.contains("is drained")),
        "the wait command's last words: {:?}",
        done.output_tail
    );
    assert_eq!(slurm.job(&job1).0, "COMPLETED");
    assert_eq!(slurm.node_state().0, "IDLE+DRAIN");
    assert!(host.identity().await.drain_mark.is_some());

    // A new job stays pending: the scheduler refuses the drained node.
    let marker = slurm.path("jobs/job2-ran");
    let job2 = slurm.submit(&format!("touch '{}'", marker.display()));
    slurm.wait_for("job 2 held back by the drain", || {
        let (st, why) = slurm.job(&job2);
        st == "PENDING" && why.contains("ReqNodeNotAvail")
    });
    assert!(!marker.exists());

    let v = task_ends(&host, "validate-1", 2, validate()).await;
    assert_eq!(v.state(), TaskState::Succeeded, "{v:?}");
    assert_eq!(slurm.job(&job2).0, "PENDING", "validation does not undrain");
    let u = task_ends(
        &host,
        "undrain-1",
        3,
        ringfence_testkit::tasks::undrain(false),
    )
    .await;
    assert_eq!(u.state(), TaskState::Succeeded, "{u:?}");
    assert!(host.identity().await.drain_mark.is_none());

    // Back in service: the pending job runs and the node ends IDLE.
    slurm.wait_for("job 2 COMPLETED", || slurm.job(&job2).0 == "COMPLETED");
    assert!(marker.exists(), "job 2 ran on the node");
    slurm.wait_for("the node IDLE without a reason", || {
        slurm.node_state() == ("IDLE".to_string(), String::new())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_an_admin_drained_stays_drained_and_the_undrain_says_so() {
    let slurm = Slurm::start();
    let host = slurm.agent_host("gpu-slurm-admin");
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;

    let d = task_ends(&host, "drain-1", 1, drain("kernel 6.8")).await;
    assert_eq!(d.state(), TaskState::Succeeded, "{d:?}");
    assert_eq!(
        slurm.node_state(),
        (
            "IDLE+DRAIN".to_string(),
            "ringfence: wave wave-proc task drain-1: kernel 6.8".to_string()
        )
    );
    // While ringfence works on the host, an admin finds a bad fan.
    slurm.run(
        "scontrol",
        &[
            "update",
            &format!("NodeName={}", slurm.node),
            "State=DRAIN",
            "Reason=admin: bad fan",
        ],
    );
    let v = task_ends(&host, "validate-1", 2, validate()).await;
    assert_eq!(v.state(), TaskState::Succeeded, "{v:?}");
    let u = task_ends(
        &host,
        "undrain-1",
        3,
        ringfence_testkit::tasks::undrain(false),
    )
    .await;
    assert_eq!(u.state(), TaskState::Failed, "{u:?}");
    for part in [
        "undrain hook `",
        "slurm-resume` exited with status 4",
        "admin: bad fan",
        "not by ringfence",
        "host stays drained",
    ] {
        assert!(u.message.contains(part), "{part:?} in {}", u.message);
    }
    assert_eq!(
        slurm.node_state(),
        ("IDLE+DRAIN".to_string(), "admin: bad fan".to_string()),
        "the admin's drain is left alone"
    );
    assert!(
        host.identity().await.drain_mark.is_some(),
        "host stays marked draining"
    );

    // A new drain keeps the admin's reason (the node is out of service either way).
    let d = task_ends(&host, "drain-2", 4, drain("retry")).await;
    assert_eq!(d.state(), TaskState::Succeeded, "{d:?}");
    assert_eq!(
        slurm.node_state(),
        ("IDLE+DRAIN".to_string(), "admin: bad fan".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_slurmctld_down_fails_naming_the_cause_and_the_host_stays_marked() {
    let mut slurm = Slurm::start();
    let host = slurm.agent_host("gpu-slurm-down");
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    slurm.stop_slurmctld();

    let d = task_ends(&host, "drain-1", 1, drain("kernel 6.8")).await;
    assert_eq!(d.state(), TaskState::Failed, "{d:?}");
    assert_eq!(d.step, "hook");
    for part in [
        "drain hook `",
        "slurm-drain` exited with status 1",
        "cannot read node",
        "Unable to contact slurm controller",
        "host stays drained",
    ] {
        assert!(d.message.contains(part), "{part:?} in {}", d.message);
    }
    let mark = host
        .identity()
        .await
        .drain_mark
        .expect("the host stays marked draining");
    assert_eq!(mark.task_id, "drain-1");
}

/// README "For scheduler authors", way 3: slurmd itself runs the shipped
/// `slurm-health-check` as its `HealthCheckProgram`, which acts on
/// `ringfenced health --once`'s exit status like NHC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_program_drains_an_unhealthy_node_and_resumes_it_when_healthy() {
    let sick = "[[gpu]]\necc_volatile_uncorrected = 2\n";
    let host = Host::new(
        "gpu-slurm-hc",
        HostOpts {
            scenario: sick,
            ..HostOpts::default()
        },
    );
    let scenario = host.path("nvml/fake-nvml-scenario.toml");
    assert!(scenario.exists(), "the fake NVML scenario file moved");
    // slurm.conf's HealthCheckProgram takes no arguments: a site sets the
    // environment in a wrapper (or relies on the defaults).
    let wrapper = host.path("ringfence-health-check");
    // slurmd runs the program in a process group of its own: kill the last
    // one after slurmd (declared first, dropped last).
    let pid_file = host.path("health-check.pid");
    let _last_check = GroupGuard(pid_file.clone());
    let slurm = Slurm::start_with(|conf| {
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\necho $$ > '{pid_file}'\nexport PATH='{path}' SLURM_CONF='{conf}' RINGFENCED_CONFIG='{config}' RINGFENCED='{bin}'\nexec '{hook}'\n",
                pid_file = pid_file.display(),
                path = std::env::var("PATH").unwrap(),
                conf = conf.display(),
                config = host.config_path().display(),
                bin = env!("CARGO_BIN_EXE_ringfenced"),
                hook = hook("slurm-health-check").display(),
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        format!(
            "HealthCheckProgram={}\nHealthCheckInterval=2\n",
            wrapper.display()
        )
    });

    slurm.wait_for("slurmd's health check drains the unhealthy node", || {
        slurm.node_state()
            == (
                "IDLE+DRAIN".to_string(),
                "ringfence-health: ecc_uncorrected_volatile".to_string(),
            )
    });
    std::fs::write(&scenario, "[[gpu]]\n").unwrap();
    slurm.wait_for("the HEALTHY node resumed by the health check", || {
        slurm.node_state() == ("IDLE".to_string(), String::new())
    });

    // Someone else's drain is never touched, healthy or not.
    std::fs::write(&scenario, sick).unwrap();
    slurm.run(
        "scontrol",
        &[
            "update",
            &format!("NodeName={}", slurm.node),
            "State=DRAIN",
            "Reason=admin: bad fan",
        ],
    );
    let out = Command::new(&wrapper).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("not HEALTHY (ecc_uncorrected_volatile) but already drained by root: admin: bad fan; left as it is"),
        "{said}"
    );
    std::fs::write(&scenario, "[[gpu]]\n").unwrap();
    let out = Command::new(&wrapper).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        slurm.node_state(),
        ("IDLE+DRAIN".to_string(), "admin: bad fan".to_string()),
        "the admin's drain is left alone"
    );
}

/// The hooks are POSIX sh, executable, and shellcheck-clean (shellcheck of
/// `.ci/run`), so that they run on any site's /bin/sh.
#[test]
fn shipped_hooks_are_executable_posix_sh_and_shellcheck_clean() {
    let dir = hook("slurm-common.sh").parent().unwrap().to_path_buf();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "slurm-common.sh",
            "slurm-drain",
            "slurm-health-check",
            "slurm-resume",
            "slurm-wait-drained"
        ]
    );
    for name in &names {
        let path = dir.join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        let text = std::fs::read_to_string(&path).unwrap();
        if name.ends_with(".sh") {
            assert_eq!(mode & 0o111, 0, "{name} is sourced, not run");
        } else {
            assert_eq!(mode & 0o111, 0o111, "{name} must be executable by all");
            assert!(text.starts_with("#!/bin/sh\n"), "{name}: POSIX sh");
        }
    }
    let out = Command::new("shellcheck")
        .arg("--shell=sh")
        .arg("--external-sources")
        .args(&names)
        .current_dir(&dir)
        .output()
        .expect("shellcheck (apt-get install shellcheck, see .ci/run)");
    assert!(
        out.status.success(),
        "shellcheck:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
