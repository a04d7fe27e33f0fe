//! Hot reload: new connections get the new certificate, the listener keeps
//! running, and a corrupt file keeps the last good config serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::time::Duration;

use common::*;
use ringfence::pki::{IssuedPem, TestPki};
use ringfence::spiffe::Role;
use ringfence::tls::{self, ReloadableServerConfig};

#[tokio::test]
async fn reload_serves_new_cert_to_new_connections_and_keeps_old_on_corrupt_file() {
    let pki = TestPki::new(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = pki.issue(Role::Host, HOST).unwrap();
    let paths = write_server_files(dir.path(), &pki, &first, None);
    let cfg = ReloadableServerConfig::load(paths.clone(), TD).unwrap();
    let srv = start(cfg.clone()).await;
    let ops = client(&pki, &pki.issue(Role::Ops, "alice").unwrap());

    assert_eq!(presented_serial(&srv.addr, &pki).await, first.serial);
    // A connection opened before the reload.
    let before = tls::connect(&srv.addr, &host_id(), &ops).await.unwrap();

    let second = pki.issue(Role::Host, HOST).unwrap();
    assert_ne!(first.serial, second.serial);
    write_server_files(dir.path(), &pki, &second, None);
    cfg.reload().unwrap();
    assert_eq!(cfg.generation(), 1);
    assert_eq!(presented_serial(&srv.addr, &pki).await, second.serial);
    assert!(call_identity(&srv.addr, &ops).await.is_ok());
    // The old connection still works too.
    let mut old = ringfence::pb::agent_client::AgentClient::new(before);
    old.get_health(ringfence::pb::GetHealthRequest::default())
        .await
        .unwrap();

    // Corrupt new cert: reload fails naming the file, old config keeps serving.
    std::fs::write(
        &paths.cert,
        "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = cfg.reload().unwrap_err().to_string();
    assert!(err.contains("agent.pem"), "{err}");
    assert_eq!(cfg.generation(), 1);
    assert_eq!(presented_serial(&srv.addr, &pki).await, second.serial);

    // A key that does not match the certificate is also refused.
    let third = pki.issue(Role::Host, HOST).unwrap();
    std::fs::write(&paths.cert, &third.cert_pem).unwrap();
    assert!(cfg.reload().is_err());
    assert_eq!(presented_serial(&srv.addr, &pki).await, second.serial);

    // A missing file, too.
    std::fs::remove_file(&paths.key).unwrap();
    let err = cfg.reload().unwrap_err().to_string();
    assert!(err.contains("agent.key"), "{err}");
    assert!(call_identity(&srv.addr, &ops).await.is_ok());
    assert!(!srv.task.is_finished(), "listener must keep running");
}

#[tokio::test]
async fn reload_picks_up_a_new_crl() {
    let pki = TestPki::new(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let mallory = pki.issue(Role::Ops, "mallory").unwrap();
    let crl = pki.fresh_crl(&[]).unwrap();
    let paths = write_server_files(dir.path(), &pki, &host, Some(&crl));
    let cfg = ReloadableServerConfig::load(paths.clone(), TD).unwrap();
    let srv = start(cfg.clone()).await;
    assert!(
        call_identity(&srv.addr, &client(&pki, &mallory))
            .await
            .is_ok()
    );

    std::fs::write(
        paths.crl.as_ref().unwrap(),
        pki.fresh_crl(&[&mallory]).unwrap(),
    )
    .unwrap();
    cfg.reload().unwrap();
    assert!(
        call_identity(&srv.addr, &client(&pki, &mallory))
            .await
            .is_err()
    );
    let alice = pki.issue(Role::Ops, "alice").unwrap();
    assert!(
        call_identity(&srv.addr, &client(&pki, &alice))
            .await
            .is_ok()
    );

    // An expired CRL on reload is refused; the fresh one stays in force.
    let now = ringfence::time::system_time();
    let day = Duration::from_secs(86_400);
    std::fs::write(
        paths.crl.as_ref().unwrap(),
        pki.crl(&[], now - day * 9, now - day).unwrap(),
    )
    .unwrap();
    let err = cfg.reload().unwrap_err();
    assert!(matches!(err, tls::TlsError::CrlExpired { .. }), "{err}");
    assert!(
        call_identity(&srv.addr, &client(&pki, &mallory))
            .await
            .is_err()
    );
}

#[test]
fn in_memory_config_is_not_reloadable() {
    tls::install_crypto_provider();
    let pki = TestPki::new(TD).unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let cfg = ReloadableServerConfig::from_pem(&server_pem(&pki, &host, None), TD).unwrap();
    assert!(matches!(cfg.reload(), Err(tls::TlsError::NotReloadable)));
}

/// Revocation takes effect at once: a client with an open HTTP/2
/// connection, making calls, is revoked and the CRL reloaded; its next call
/// on the same channel fails (the connection is closed and the reconnect is
/// refused). Another client's open connection keeps working.
#[tokio::test]
async fn reload_closes_the_open_connections_of_a_revoked_client() {
    let pki = TestPki::new(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let mallory = pki.issue(Role::Ops, "mallory").unwrap();
    let alice = pki.issue(Role::Ops, "alice").unwrap();
    let paths = write_server_files(dir.path(), &pki, &host, Some(&pki.fresh_crl(&[]).unwrap()));
    let cfg = ReloadableServerConfig::load(paths.clone(), TD).unwrap();
    let srv = start(cfg.clone()).await;

    let open = |who: &IssuedPem| {
        let id = client(&pki, who);
        let addr = srv.addr.clone();
        async move {
            let ch = tls::connect(&addr, &host_id(), &id).await.unwrap();
            ringfence::pb::agent_client::AgentClient::new(ch)
        }
    };
    let mut m = open(&mallory).await;
    let mut a = open(&alice).await;
    for _ in 0..3 {
        m.get_health(ringfence::pb::GetHealthRequest::default())
            .await
            .unwrap();
        a.get_health(ringfence::pb::GetHealthRequest::default())
            .await
            .unwrap();
    }
    assert_eq!(cfg.open_connections(), 2);

    std::fs::write(
        paths.crl.as_ref().unwrap(),
        pki.fresh_crl(&[&mallory]).unwrap(),
    )
    .unwrap();
    cfg.reload().unwrap();

    let got = m
        .get_health(ringfence::pb::GetHealthRequest::default())
        .await;
    assert!(
        got.is_err(),
        "revoked client's open channel still works: {got:?}"
    );
    // And it stays out: the channel's reconnect is refused too.
    assert!(
        m.get_health(ringfence::pb::GetHealthRequest::default())
            .await
            .is_err()
    );
    a.get_health(ringfence::pb::GetHealthRequest::default())
        .await
        .unwrap();
    assert_eq!(cfg.open_connections(), 1);
}

/// A reload to another host's certificate is refused (the agent's config is
/// loaded for its host id); the last good certificate keeps serving.
#[tokio::test]
async fn reload_refuses_a_certificate_of_another_host() {
    let pki = TestPki::new(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let paths = write_server_files(dir.path(), &pki, &host, None);
    let cfg = ReloadableServerConfig::load_for_host(paths.clone(), TD, HOST).unwrap();
    let srv = start(cfg.clone()).await;
    let other = pki.issue(Role::Host, "gpu-002").unwrap();
    write_server_files(dir.path(), &pki, &other, None);
    let err = cfg.reload().unwrap_err();
    assert!(
        matches!(
            err,
            tls::TlsError::OwnIdentity {
                source: tls::IdentityError::NotThisHost { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cfg.generation(), 0);
    assert_eq!(presented_serial(&srv.addr, &pki).await, host.serial);
}
