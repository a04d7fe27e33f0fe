//! A real SIGHUP to this process reloads the server certificate. The signal
//! handler is process-wide: nextest runs each test in a process of its own
//! (integration/test.sh's `cargo test` fallback runs one test at a time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use ringfence::pki::TestPki;
use ringfence::spiffe::Role;
use ringfence::tls::{self, ReloadableServerConfig};

#[tokio::test]
async fn sighup_reloads_certificates() {
    let pki = TestPki::new(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = pki.issue(Role::Host, HOST).unwrap();
    let paths = write_server_files(dir.path(), &pki, &first, None);
    let cfg = ReloadableServerConfig::load(paths.clone(), TD).unwrap();
    let _reloader = tls::spawn_sighup_reloader(cfg.clone()).unwrap();
    let srv = start(cfg.clone()).await;
    assert_eq!(presented_serial(&srv.addr, &pki).await, first.serial);

    let second = pki.issue(Role::Host, HOST).unwrap();
    write_server_files(dir.path(), &pki, &second, None);
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cfg.generation() < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "SIGHUP did not reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(presented_serial(&srv.addr, &pki).await, second.serial);

    // A corrupt file on the next SIGHUP: still the second cert.
    std::fs::write(&paths.key, "not a key").unwrap();
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cfg.generation(), 1);
    assert_eq!(presented_serial(&srv.addr, &pki).await, second.serial);
    assert!(!srv.task.is_finished());
}
