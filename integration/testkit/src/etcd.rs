//! Real etcd members for tests (Debian's `etcd-server` package, `etcd` on
//! the PATH): each member listens on free loopback addresses with its own
//! data dir, and is killed when dropped. No mocks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::net::free_loopback;

/// How long a cluster may take to report healthy.
const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

/// Server TLS of a member: it then serves `https://localhost:PORT`
/// (listening on 127.0.0.1) and requires client certificates from `ca`.
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// PEM server certificate with the DNS name `localhost`.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// PEM CA that client certificates must chain to.
    pub ca: PathBuf,
}

/// One running `etcd` process.
#[derive(Debug)]
pub struct EtcdMember {
    /// The member's name in the cluster.
    pub name: String,
    /// Its client URL (`http://127.x.y.z:port`, or `https://localhost:port`).
    pub client_url: String,
    /// Where `GET /health` answers over plain HTTP.
    health: SocketAddr,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl EtcdMember {
    /// Kill the process (SIGKILL) and wait for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the process again with its data dir (after [`kill`](Self::kill)).
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.child = Some(spawn(&self.args, &self.log)?);
        Ok(())
    }

    /// Whether `GET /health` answers `"health":"true"` now.
    pub fn healthy(&self) -> bool {
        health(self.health)
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of real etcd members on loopback.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members, in the order they were started.
    pub members: Vec<EtcdMember>,
}

fn spawn(args: &[String], log: &Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Command::new("etcd")
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
}

fn health(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl EtcdCluster {
    /// Start `n` members (1 or 3, typically) with data dirs under `dir`
    /// and wait until every one reports healthy; the output of member `i`
    /// goes to `dir/etcd-i.log`.
    pub fn start(dir: &Path, n: usize) -> std::io::Result<Self> {
        Self::start_with(dir, n, None)
    }

    /// One member serving client TLS with `tls` and requiring client
    /// certificates (`--client-cert-auth`).
    pub fn start_tls(dir: &Path, tls: &EtcdServerTls) -> std::io::Result<Self> {
        Self::start_with(dir, 1, Some(tls))
    }

    fn start_with(dir: &Path, n: usize, tls: Option<&EtcdServerTls>) -> std::io::Result<Self> {
        let mut addrs = Vec::new();
        for i in 0..n {
            let client = match tls {
                // `localhost` is what the certificate names.
                Some(_) => std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()?,
                None => free_loopback()?,
            };
            addrs.push((format!("m{i}"), client, free_loopback()?));
        }
        let initial: Vec<String> = addrs
            .iter()
            .map(|(name, _, peer)| format!("{name}=http://{peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        for (i, (name, client, peer)) in addrs.into_iter().enumerate() {
            let data = dir.join(format!("etcd-{i}.data"));
            let log = dir.join(format!("etcd-{i}.log"));
            let (listen_url, client_url) = match tls {
                Some(_) => (
                    format!("https://{client}"),
                    format!("https://localhost:{}", client.port()),
                ),
                None => (format!("http://{client}"), format!("http://{client}")),
            };
            let mut args: Vec<String> = vec![
                format!("--name={name}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls={listen_url}"),
                format!("--advertise-client-urls={client_url}"),
                format!("--listen-peer-urls=http://{peer}"),
                format!("--initial-advertise-peer-urls=http://{peer}"),
                format!("--initial-cluster={initial}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=ringfence-test".into(),
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
                "--logger=zap".into(),
                "--log-level=warn".into(),
            ];
            let health = match tls {
                Some(t) => {
                    let metrics = free_loopback()?;
                    args.extend([
                        format!("--cert-file={}", t.cert.display()),
                        format!("--key-file={}", t.key.display()),
                        format!("--trusted-ca-file={}", t.ca.display()),
                        "--client-cert-auth".into(),
                        format!("--listen-metrics-urls=http://{metrics}"),
                    ]);
                    metrics
                }
                None => client,
            };
            let child = spawn(&args, &log)?;
            members.push(EtcdMember {
                name,
                client_url,
                health,
                child: Some(child),
                args,
                log,
            });
        }
        let cluster = Self { members };
        let deadline = Instant::now() + HEALTHY_WITHIN;
        while !cluster.members.iter().all(EtcdMember::healthy) {
            if Instant::now() > deadline {
                let logs: Vec<String> = cluster
                    .members
                    .iter()
                    .map(|m| std::fs::read_to_string(&m.log).unwrap_or_default())
                    .collect();
                return Err(std::io::Error::other(format!(
                    "etcd did not become healthy within {HEALTHY_WITHIN:?}:\n{}",
                    logs.join("\n")
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(cluster)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }
}
