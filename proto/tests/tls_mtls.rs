//! Real mTLS over 127.0.0.1: who may connect, who may call what.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use ringfence::pb;
use ringfence::pki::{LeafSpec, TestPki};
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::tls::{self, ReloadableServerConfig, TlsError};
use rustls::pki_types::ServerName;
use tonic::Code;

const DAY: Duration = Duration::from_secs(86_400);

async fn server(pki: &TestPki, crl: Option<String>) -> Running {
    let host = pki.issue(Role::Host, HOST).unwrap();
    let cfg = ReloadableServerConfig::from_pem(&server_pem(pki, &host, crl), TD).unwrap();
    start(cfg).await
}

#[tokio::test]
async fn ops_client_calls_and_handler_sees_its_spiffe_id() {
    let pki = TestPki::new(TD).unwrap();
    let srv = server(&pki, None).await;
    let ops = pki.issue(Role::Ops, "alice").unwrap();
    let seen = call_identity(&srv.addr, &client(&pki, &ops)).await.unwrap();
    assert_eq!(seen, "spiffe://fleet.test/ops/alice");

    let channel = tls::connect(&srv.addr, &host_id(), &client(&pki, &ops))
        .await
        .unwrap();
    let mut c = pb::agent_client::AgentClient::new(channel);
    let st = c.submit_task(pb::SignedTask::default()).await.unwrap();
    assert_eq!(st.into_inner().task_id, "accepted");
}

async fn assert_refused(addr: &str, pki: &TestPki, who: &ringfence::pki::IssuedPem, what: &str) {
    let got = call_identity(addr, &client(pki, who)).await;
    assert!(got.is_err(), "{what}: call should fail, got {got:?}");
}

#[tokio::test]
async fn client_cert_from_another_ca_is_refused() {
    let pki = TestPki::new(TD).unwrap();
    let other = TestPki::new(TD).unwrap();
    let srv = server(&pki, None).await;
    let mallory = other.issue(Role::Ops, "alice").unwrap();
    // The client trusts our CA (so the server is fine) but its cert is foreign.
    let id = tls::ClientIdentity::from_pem(
        mallory.cert_pem.as_bytes(),
        mallory.key_pem.as_bytes(),
        pki.ca_pem().as_bytes(),
    )
    .unwrap();
    assert!(call_identity(&srv.addr, &id).await.is_err());
    // Control: a legit cert on the same server works.
    let ok = pki.issue(Role::Ops, "alice").unwrap();
    assert!(call_identity(&srv.addr, &client(&pki, &ok)).await.is_ok());
}

#[tokio::test]
async fn expired_two_uri_other_domain_and_ca_leaf_certs_are_refused() {
    let pki = TestPki::new(TD).unwrap();
    let srv = server(&pki, None).await;
    let now = SystemTime::now();

    let mut expired = LeafSpec::new(Role::Ops, "old", 1);
    expired.not_before = now - DAY * 10;
    expired.not_after = now - DAY;
    assert_refused(
        &srv.addr,
        &pki,
        &pki.issue_spec(&expired).unwrap(),
        "expired",
    )
    .await;

    let mut two = LeafSpec::new(Role::Ops, "two", 1);
    two.extra_uri = Some("spiffe://fleet.test/ops/other".into());
    assert_refused(
        &srv.addr,
        &pki,
        &pki.issue_spec(&two).unwrap(),
        "two URI SANs",
    )
    .await;

    let mut foreign = LeafSpec::new(Role::Ops, "alice", 1);
    foreign.trust_domain = Some("evil.test".into());
    assert_refused(
        &srv.addr,
        &pki,
        &pki.issue_spec(&foreign).unwrap(),
        "other domain",
    )
    .await;

    let mut ca = LeafSpec::new(Role::Ops, "ca-leaf", 1);
    ca.is_ca = true;
    assert_refused(
        &srv.addr,
        &pki,
        &pki.issue_spec(&ca).unwrap(),
        "CA:TRUE leaf",
    )
    .await;

    // The listener survived all of that.
    let ok = pki.issue(Role::Ops, "alice").unwrap();
    assert!(call_identity(&srv.addr, &client(&pki, &ok)).await.is_ok());
}

#[test]
fn spiffe_rules_name_the_broken_rule() {
    let pki = TestPki::new(TD).unwrap();
    let der = |p: &ringfence::pki::IssuedPem| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(p.cert_pem.as_bytes()).unwrap()
    };
    let mut two = LeafSpec::new(Role::Ops, "two", 1);
    two.extra_uri = Some("spiffe://fleet.test/ops/other".into());
    let e = tls::cert_identity(&der(&pki.issue_spec(&two).unwrap()), TD).unwrap_err();
    assert_eq!(
        e.to_string(),
        "certificate must carry exactly one URI SAN, found 2"
    );

    let mut foreign = LeafSpec::new(Role::Ops, "alice", 1);
    foreign.trust_domain = Some("evil.test".into());
    let e = tls::cert_identity(&der(&pki.issue_spec(&foreign).unwrap()), TD).unwrap_err();
    assert!(
        e.to_string().contains("outside trust domain `fleet.test`"),
        "{e}"
    );

    let mut ca = LeafSpec::new(Role::Ops, "x", 1);
    ca.is_ca = true;
    let e = tls::cert_identity(&der(&pki.issue_spec(&ca).unwrap()), TD).unwrap_err();
    assert!(e.to_string().contains("is a CA certificate"), "{e}");

    let ok = tls::cert_identity(&der(&pki.issue(Role::Host, "gpu-9").unwrap()), TD).unwrap();
    assert_eq!(ok.id.to_string(), "spiffe://fleet.test/host/gpu-9");
}

/// A client that offers no certificate at all (plain rustls config).
#[tokio::test]
async fn client_without_certificate_cannot_call() {
    let pki = TestPki::new(TD).unwrap();
    let srv = server(&pki, None).await;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let addr = srv.addr.clone();
    let make = tower::service_fn(move |_u: http::Uri| {
        let connector = connector.clone();
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = connector
                .connect(ServerName::try_from(HOST).unwrap(), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let result = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", srv.addr))
            .unwrap()
            .connect_with_connector(make)
            .await
            .map_err(|e| e.to_string())?;
        let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
        h.check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(|s| s.to_string())
    };
    let got = tokio::time::timeout(Duration::from_secs(10), result)
        .await
        .unwrap();
    assert!(got.is_err(), "a client without a certificate got {got:?}");
}

#[tokio::test]
async fn revoked_client_is_refused_and_expired_crl_is_refused_at_load() {
    let pki = TestPki::new(TD).unwrap();
    let revoked = pki.issue(Role::Ops, "mallory").unwrap();
    let good = pki.issue(Role::Ops, "alice").unwrap();
    let crl = pki.fresh_crl(&[&revoked]).unwrap();
    let srv = server(&pki, Some(crl)).await;
    assert_refused(&srv.addr, &pki, &revoked, "revoked").await;
    assert_eq!(
        call_identity(&srv.addr, &client(&pki, &good))
            .await
            .unwrap(),
        "spiffe://fleet.test/ops/alice"
    );

    let now = SystemTime::now();
    let stale = pki.crl(&[&revoked], now - DAY * 10, now - DAY).unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let err =
        ReloadableServerConfig::from_pem(&server_pem(&pki, &host, Some(stale)), TD).unwrap_err();
    assert!(matches!(err, TlsError::CrlExpired { .. }), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
}

#[tokio::test]
async fn scheduler_reads_health_but_cannot_submit_tasks() {
    let pki = TestPki::new(TD).unwrap();
    let srv = server(&pki, None).await;
    let slurm = client(&pki, &pki.issue(Role::Scheduler, "slurm").unwrap());
    let channel = tls::connect(&srv.addr, &host_id(), &slurm).await.unwrap();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(
        resp.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let mut agent = pb::agent_client::AgentClient::new(channel);
    agent
        .get_health(pb::GetHealthRequest::default())
        .await
        .unwrap();
    let denied = agent
        .submit_task(pb::SignedTask::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "role `scheduler` (spiffe://fleet.test/scheduler/slurm) may not call /ringfence.v1.Agent/SubmitTask"
    );
    let denied = agent
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn client_refuses_server_naming_another_host() {
    let pki = TestPki::new(TD).unwrap();
    let wrong = pki.issue(Role::Host, "gpu-002").unwrap();
    let cfg = ReloadableServerConfig::from_pem(&server_pem(&pki, &wrong, None), TD).unwrap();
    let srv = start(cfg).await;
    let ops = client(&pki, &pki.issue(Role::Ops, "alice").unwrap());
    let err = tls::connect_with_timeout(&srv.addr, &host_id(), &ops, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("spiffe://fleet.test/host/gpu-002"), "{err}");
    assert!(err.contains("spiffe://fleet.test/host/gpu-001"), "{err}");

    // Control: expecting the right id works against the same server.
    let right = SpiffeId::new(TD, Role::Host, "gpu-002").unwrap();
    let ch = tls::connect(&format!("https://{}", srv.addr), &right, &ops)
        .await
        .unwrap();
    let mut agent = pb::agent_client::AgentClient::new(ch);
    agent
        .get_identity(pb::GetIdentityRequest::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn server_refuses_to_load_a_certificate_without_our_spiffe_id() {
    tls::install_crypto_provider();
    let pki = TestPki::new(TD).unwrap();
    let mut foreign = LeafSpec::new(Role::Host, HOST, 1);
    foreign.trust_domain = Some("evil.test".into());
    let host = pki.issue_spec(&foreign).unwrap();
    let err = ReloadableServerConfig::from_pem(&server_pem(&pki, &host, None), TD).unwrap_err();
    assert!(matches!(err, TlsError::OwnIdentity { .. }), "{err}");
}

/// The server-side handshake error for `who`, over an in-memory pipe, so the
/// test can see WHICH check refused the certificate.
async fn server_side_refusal(
    pki: &TestPki,
    crl: Option<String>,
    who: &ringfence::pki::IssuedPem,
) -> String {
    let host = pki.issue(Role::Host, HOST).unwrap();
    let server_cfg = tls::server_config(&server_pem(pki, &host, crl), TD).unwrap();
    let client_cfg = client(pki, who).client_config(&host_id()).unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(a)
            .await
            .map(|_| ())
    });
    let client = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = tokio_rustls::TlsConnector::from(client_cfg)
            .connect(ServerName::try_from(HOST).unwrap(), b)
            .await?;
        let mut buf = [0u8; 1];
        s.read(&mut buf).await.map(|_| ())
    });
    let server_result = server.await.unwrap();
    let _ = client.await;
    server_result
        .expect_err("server accepted the certificate")
        .to_string()
}

#[tokio::test]
async fn each_bad_certificate_is_refused_by_the_right_check() {
    let pki = TestPki::new(TD).unwrap();
    let other = TestPki::new(TD).unwrap();
    let now = SystemTime::now();
    let cases: Vec<(LeafSpec, &str)> = {
        let mut expired = LeafSpec::new(Role::Ops, "old", 1);
        expired.not_before = now - DAY * 10;
        expired.not_after = now - DAY;
        let mut two = LeafSpec::new(Role::Ops, "two", 1);
        two.extra_uri = Some("spiffe://fleet.test/ops/other".into());
        let mut foreign = LeafSpec::new(Role::Ops, "alice", 1);
        foreign.trust_domain = Some("evil.test".into());
        let mut ca = LeafSpec::new(Role::Ops, "ca-leaf", 1);
        ca.is_ca = true;
        vec![
            (expired, "certificate expired"),
            (two, "exactly one URI SAN, found 2"),
            (foreign, "outside trust domain `fleet.test`"),
            (ca, "CaUsedAsEndEntity"),
        ]
    };
    for (spec, want) in cases {
        let err = server_side_refusal(&pki, None, &pki.issue_spec(&spec).unwrap()).await;
        assert!(
            err.contains(want),
            "{}: want `{want}` in `{err}`",
            spec.name
        );
    }
    let foreign_ca = other.issue(Role::Ops, "alice").unwrap();
    let err = server_side_refusal(&pki, None, &foreign_ca).await;
    // Same CA subject name, other key: webpki finds our CA by name and the
    // signature does not verify.
    assert!(
        err.contains("BadSignature") || err.contains("UnknownIssuer"),
        "{err}"
    );

    let revoked = pki.issue(Role::Ops, "mallory").unwrap();
    let crl = pki.fresh_crl(&[&revoked]).unwrap();
    let err = server_side_refusal(&pki, Some(crl), &revoked).await;
    assert!(err.contains("Revoked"), "{err}");
}
