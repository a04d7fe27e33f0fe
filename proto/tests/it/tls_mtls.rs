//! Real mTLS over 127.0.0.1: who may connect, who may call what.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::sync::Arc;
use std::time::Duration;

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
    let now = ringfence::time::system_time();

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

    let now = ringfence::time::system_time();
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
    let now = ringfence::time::system_time();
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

// ------------------------------------------------- issue 13: revocation

/// A CRL without nextUpdate never goes stale: an attacker replaying an old
/// one could hide every later revocation. It is refused at load, naming it.
#[test]
fn crl_without_next_update_is_refused_at_load() {
    tls::install_crypto_provider();
    let pki = TestPki::new(TD).unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let mallory = pki.issue(Role::Ops, "mallory").unwrap();
    let crl = pki.crl_without_next_update(&[&mallory]).unwrap();
    let err = ReloadableServerConfig::from_pem(&server_pem(&pki, &host, Some(crl.clone())), TD)
        .unwrap_err();
    assert!(matches!(err, TlsError::CrlNoNextUpdate { .. }), "{err}");
    assert!(err.to_string().contains("CRL (in memory)"), "{err}");
    assert!(err.to_string().contains("nextUpdate"), "{err}");

    // The coordinator's side refuses it the same way.
    let ops = client(&pki, &pki.issue(Role::Ops, "alice").unwrap());
    let err = ops.with_crl_pem(crl.as_bytes()).unwrap_err();
    assert!(matches!(err, TlsError::CrlNoNextUpdate { .. }), "{err}");
}

/// The whole chain is checked: an intermediate CA revoked by the root's CRL
/// takes every client certificate under it along, although the
/// intermediate's own CRL revokes nothing.
#[tokio::test]
async fn a_revoked_intermediate_ca_refuses_the_clients_under_it() {
    let pki = TestPki::new(TD).unwrap();
    let bad_ca = pki.intermediate().unwrap();
    let good_ca = pki.intermediate().unwrap();
    let now = ringfence::time::system_time();
    let crls = [
        pki.crl_serials(&[bad_ca.ca_serial()], now - DAY, now + DAY)
            .unwrap(),
        bad_ca.fresh_crl(&[]).unwrap(),
        good_ca.fresh_crl(&[]).unwrap(),
    ]
    .concat();
    let srv = server(&pki, Some(crls.clone())).await;

    let under_bad = bad_ca.issue(Role::Ops, "mallory").unwrap();
    let got = call_identity(&srv.addr, &client(&pki, &under_bad)).await;
    assert!(got.is_err(), "client under a revoked intermediate: {got:?}");
    let err = server_side_refusal(&pki, Some(crls.clone()), &under_bad).await;
    assert!(err.contains("Revoked"), "{err}");

    // Control: a client under the other intermediate, same server.
    let under_good = good_ca.issue(Role::Ops, "alice").unwrap();
    assert_eq!(
        call_identity(&srv.addr, &client(&pki, &under_good))
            .await
            .unwrap(),
        "spiffe://fleet.test/ops/alice"
    );
}

/// The coordinator's client checks the agent's certificate against its CRL:
/// a revoked agent certificate is refused before any RPC.
#[tokio::test]
async fn client_with_a_crl_refuses_a_revoked_agent_certificate() {
    let pki = TestPki::new(TD).unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let cfg = ReloadableServerConfig::from_pem(&server_pem(&pki, &host, None), TD).unwrap();
    let srv = start(cfg).await;
    let ops = client(&pki, &pki.issue(Role::Ops, "alice").unwrap());

    let revoking = ops
        .clone()
        .with_crl_pem(pki.fresh_crl(&[&host]).unwrap().as_bytes())
        .unwrap();
    let err = tls::connect_with_timeout(&srv.addr, &host_id(), &revoking, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Revoked"), "{err}");

    // Control: a CRL that revokes someone else lets the same client in.
    let other = pki.issue(Role::Host, "gpu-009").unwrap();
    let fine = ops
        .with_crl_pem(pki.fresh_crl(&[&other]).unwrap().as_bytes())
        .unwrap();
    assert!(call_identity(&srv.addr, &fine).await.is_ok());
}

/// The agent's own certificate must name its host: another host's SPIFFE id
/// or a certificate without `DNS:<host_id>` is refused at load.
#[test]
fn agent_certificate_must_name_this_host() {
    tls::install_crypto_provider();
    let pki = TestPki::new(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let load = |cert: &ringfence::pki::IssuedPem| {
        std::fs::write(dir.path().join("c.pem"), &cert.cert_pem).unwrap();
        std::fs::write(dir.path().join("c.key"), &cert.key_pem).unwrap();
        std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
        ReloadableServerConfig::load_for_host(
            tls::ServerTlsPaths {
                cert: dir.path().join("c.pem"),
                key: dir.path().join("c.key"),
                ca_bundle: dir.path().join("ca.pem"),
                crl: None,
            },
            TD,
            HOST,
        )
    };
    let err = load(&pki.issue(Role::Host, "gpu-002").unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::OwnIdentity {
                source: tls::IdentityError::NotThisHost { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("c.pem"), "{err}");
    assert!(err.to_string().contains("gpu-002"), "{err}");

    let mut no_dns = LeafSpec::new(Role::Host, HOST, 1);
    no_dns.dns_names = Some(vec!["gpu-002".into()]);
    let err = load(&pki.issue_spec(&no_dns).unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            TlsError::OwnIdentity {
                source: tls::IdentityError::DnsName { .. },
                ..
            }
        ),
        "{err}"
    );

    // An ops certificate named like the host is not a host identity either.
    let err = load(&pki.issue(Role::Ops, HOST).unwrap()).unwrap_err();
    assert!(err.to_string().contains("not this host"), "{err}");

    assert!(load(&pki.issue(Role::Host, HOST).unwrap()).is_ok());
}

// ---------------------------------------------- issue 13: request limits

const SUBMIT: &str = "/ringfence.v1.Agent/SubmitTask";

/// Bytes that are not a SignedTask answer INVALID_ARGUMENT naming the
/// `decode` check (tonic alone answers INTERNAL); a request over the one
/// size budget answers RESOURCE_EXHAUSTED naming `size` (tonic alone:
/// OUT_OF_RANGE), before the server buffers it.
#[tokio::test]
async fn malformed_and_oversized_signed_tasks_get_the_documented_statuses() {
    let pki = TestPki::new(TD).unwrap();
    let srv = server(&pki, None).await;
    let ops = client(&pki, &pki.issue(Role::Ops, "alice").unwrap());
    let channel = tls::connect(&srv.addr, &host_id(), &ops).await.unwrap();

    // Field 1 (task), wire type 2, claiming 100 bytes that never come.
    let garbage = vec![0x0a, 0x64, 0x01, 0x02];
    let st = raw_unary(channel.clone(), SUBMIT, garbage)
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert_eq!(
        ringfence::status::rejected_check(&st).as_deref(),
        Some("decode")
    );
    assert!(st.message().contains("check `decode`"), "{}", st.message());

    let oversized = vec![0u8; tls::MAX_SIGNED_TASK_BYTES + 1];
    let st = raw_unary(channel.clone(), SUBMIT, oversized)
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert_eq!(
        ringfence::status::rejected_check(&st).as_deref(),
        Some("size")
    );

    // Control: a well-formed SignedTask on the same channel reaches the handler.
    use prost::Message;
    let ok = raw_unary(channel, SUBMIT, pb::SignedTask::default().encode_to_vec())
        .await
        .unwrap();
    assert_eq!(
        pb::TaskStatus::decode(ok.as_slice()).unwrap().task_id,
        "accepted"
    );
}

/// The connection cap: with one slot taken, the next client waits in the
/// backlog and gets in once the first connection is gone.
#[tokio::test]
async fn connection_cap_holds_new_clients_until_a_slot_frees() {
    let pki = TestPki::new(TD).unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let cfg = ReloadableServerConfig::from_pem(&server_pem(&pki, &host, None), TD).unwrap();
    let limits = tls::ServeLimits {
        max_connections: 1,
        ..tls::ServeLimits::default()
    };
    let srv = start_with_limits(cfg.clone(), limits).await;
    let ops = client(&pki, &pki.issue(Role::Ops, "alice").unwrap());

    let first = tls::connect(&srv.addr, &host_id(), &ops).await.unwrap();
    let mut first_client = pb::agent_client::AgentClient::new(first);
    first_client
        .get_identity(pb::GetIdentityRequest::default())
        .await
        .unwrap();
    assert_eq!(cfg.open_connections(), 1);
    let second =
        tls::connect_with_timeout(&srv.addr, &host_id(), &ops, Duration::from_millis(700)).await;
    assert!(second.is_err(), "a second connection got past the cap");

    drop(first_client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cfg.open_connections() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "first connection never closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(call_identity(&srv.addr, &ops).await.is_ok());
}

/// Handshakes in progress are capped and time out: silent TCP peers holding
/// every handshake slot delay a real client only until the timeout.
#[tokio::test]
async fn silent_peers_cannot_hold_the_handshake_slots() {
    let pki = TestPki::new(TD).unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let cfg = ReloadableServerConfig::from_pem(&server_pem(&pki, &host, None), TD).unwrap();
    let limits = tls::ServeLimits {
        max_handshakes: 2,
        handshake_timeout: Duration::from_millis(500),
        ..tls::ServeLimits::default()
    };
    let srv = start_with_limits(cfg, limits).await;
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(&srv.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ops = client(&pki, &pki.issue(Role::Ops, "alice").unwrap());
    let started = std::time::Instant::now();
    assert!(call_identity(&srv.addr, &ops).await.is_ok());
    // It had to wait for a slot: the silent peers held both.
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
}

/// Connections have a maximum age: after it (and the grace) the server
/// closes even an idle connection, so every client re-handshakes against
/// the current certificates and CRL.
#[tokio::test]
async fn connections_are_closed_after_their_maximum_age() {
    let pki = TestPki::new(TD).unwrap();
    let host = pki.issue(Role::Host, HOST).unwrap();
    let cfg = ReloadableServerConfig::from_pem(&server_pem(&pki, &host, None), TD).unwrap();
    let limits = tls::ServeLimits {
        max_connection_age: Duration::from_millis(500),
        max_connection_age_grace: Duration::from_millis(500),
        ..tls::ServeLimits::default()
    };
    let srv = start_with_limits(cfg.clone(), limits).await;
    let ops = client(&pki, &pki.issue(Role::Ops, "alice").unwrap());
    let channel = tls::connect(&srv.addr, &host_id(), &ops).await.unwrap();
    let mut c = pb::agent_client::AgentClient::new(channel);
    c.get_identity(pb::GetIdentityRequest::default())
        .await
        .unwrap();
    assert_eq!(cfg.open_connections(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cfg.open_connections() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection still open long after its maximum age"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The channel reconnects on its own for the next call.
    c.get_identity(pb::GetIdentityRequest::default())
        .await
        .unwrap();
}
