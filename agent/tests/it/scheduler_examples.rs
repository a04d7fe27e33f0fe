//! README "For scheduler authors": the Python examples, taken from README.md
//! as they stand there and run against a real `ringfenced` with a scheduler
//! certificate (Debian's python3-grpcio, python3-protobuf and protoc).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::proc_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ringfence::pb::TaskState;
use ringfence::spiffe::Role;

use proc_common::*;

const LIMIT: Duration = Duration::from_secs(30);

/// The fenced block after `<!-- example: NAME -->` in README.md, its
/// indentation removed.
pub fn readme_example(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let marker = format!("<!-- example: {name} -->");
    let after = &readme[readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no `{marker}`"))..];
    let mut lines = after.lines().skip(1);
    let fence = lines.next().unwrap();
    let indent = fence.len() - fence.trim_start().len();
    assert!(fence.trim_start().starts_with("```"), "{fence}");
    let mut out = String::new();
    for line in lines {
        if line.trim_start().starts_with("```") {
            return out;
        }
        out.push_str(line.get(indent..).unwrap_or("").trim_end());
        out.push('\n');
    }
    panic!("README example `{name}` has no closing fence");
}

/// The README example `name` in `dir`, and a scheduler's TLS files in
/// `dir/tls` (`ca.pem`, `scheduler.pem`, `scheduler.key`) as it expects them.
fn example_files(host: &Host, dir: &Path, name: &str) -> PathBuf {
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    let cert = host.pki.issue(Role::Scheduler, "slurm").unwrap();
    std::fs::write(tls.join("ca.pem"), host.pki.ca_pem()).unwrap();
    std::fs::write(tls.join("scheduler.pem"), &cert.cert_pem).unwrap();
    std::fs::write(tls.join("scheduler.key"), &cert.key_pem).unwrap();
    let script = dir.join(name);
    std::fs::write(&script, readme_example(name)).unwrap();
    script
}

fn python(script: &Path, tls: &Path, pb: Option<&Path>, args: &[&str]) -> Output {
    // Debian's interpreter, where python3-grpcio lives (not a pyenv in PATH).
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg(script).args(args).env("RINGFENCE_TLS", tls);
    if let Some(pb) = pb {
        cmd.env("RINGFENCE_PB", pb);
    }
    cmd.output()
        .expect("python3 (apt-get install python3-grpcio python3-protobuf, see .ci/run)")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_grpc_health_check_exits_0_only_while_serving() {
    let host = Host::new("gpu-sched", HostOpts::default());
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let dir = tempfile::tempdir().unwrap();
    let script = example_files(&host, dir.path(), "ringfence-serving");
    let tls = dir.path().join("tls");
    let address = host.listen.to_string();

    let out = python(&script, &tls, None, &[&address, &host.id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");

    let mut client = host.client().await;
    client
        .submit_task(host.task("d1", 1, drain("kernel 6.8")))
        .await
        .unwrap();
    wait_task(&mut client, "d1", TaskState::Succeeded, LIMIT).await;
    let out = python(&script, &tls, None, &[&address, &host.id]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "NOT_SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_get_and_watch_health_print_verdict_and_drain() {
    let host = Host::new(
        "gpu-watch",
        HostOpts {
            scenario: "[[gpu]]\n[[gpu]]\necc_volatile_uncorrected = 2\n",
            expected_gpus: 2,
            ..HostOpts::default()
        },
    );
    let mut agent = host.spawn();
    host.wait_listening(&mut agent).await;
    let dir = tempfile::tempdir().unwrap();
    let script = example_files(&host, dir.path(), "ringfence-watch");
    let tls = dir.path().join("tls");
    // The README's protoc line, from the repository root.
    let pb = dir.path().join("pb");
    std::fs::create_dir_all(&pb).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let protos: Vec<PathBuf> = std::fs::read_dir(root.join("proto/ringfence/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .map(|p| p.strip_prefix(&root).unwrap().to_path_buf())
        .collect();
    let out = Command::new("protoc")
        .current_dir(&root)
        .arg("-I")
        .arg("proto")
        .arg(format!("--python_out={}", pb.display()))
        .args(&protos)
        .output()
        .expect("protoc (apt-get install protobuf-compiler, see .ci/run)");
    assert!(out.status.success(), "protoc: {}", text(&out));

    let mut client = host.client().await;
    client
        .submit_task(host.task("d1", 1, drain("kernel 6.8")))
        .await
        .unwrap();
    wait_task(&mut client, "d1", TaskState::Succeeded, LIMIT).await;

    let address = host.listen.to_string();
    let out = python(&script, &tls, Some(&pb), &[&address, &host.id, "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "GetHealth, then two streamed reports: {stdout}"
    );
    for line in lines {
        assert_eq!(
            line, "gpu-watch VERDICT_UNHEALTHY draining (kernel 6.8) ecc_uncorrected_volatile",
            "{stdout}"
        );
    }
}
