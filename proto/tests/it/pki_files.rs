//! `ringfence pki` on disk: init, issue, revoke, and the files work for real mTLS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{HOST, TD, TestAgent};
use ringfence::pki::{self, PkiError};
use ringfence::spiffe::{Role, SpiffeId};
use ringfence::tls::{self, ClientIdentity, ReloadableServerConfig, ServerTlsPaths};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn sans(pem: &str) -> (Vec<String>, Vec<String>, bool, bool, bool) {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let (mut dns, mut uris, mut server, mut client, mut ca) = (vec![], vec![], false, false, false);
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(s) => {
                for n in &s.general_names {
                    match n {
                        GeneralName::DNSName(d) => dns.push(d.to_string()),
                        GeneralName::URI(u) => uris.push(u.to_string()),
                        _ => {}
                    }
                }
            }
            ParsedExtension::ExtendedKeyUsage(e) => {
                server = e.server_auth;
                client = e.client_auth;
            }
            ParsedExtension::BasicConstraints(b) => ca = b.ca,
            _ => {}
        }
    }
    (dns, uris, server, client, ca)
}

#[test]
fn init_issue_revoke_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let files = pki::init(&ca_dir, TD).unwrap();
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(
        std::fs::read_to_string(ca_dir.join(pki::TRUST_DOMAIN))
            .unwrap()
            .trim(),
        TD
    );
    let (_, _, _, _, ca) = sans(&std::fs::read_to_string(&files.cert).unwrap());
    assert!(ca, "the CA certificate must be CA:TRUE");
    assert!(matches!(
        pki::init(&ca_dir, TD),
        Err(PkiError::Exists { .. })
    ));
    assert!(pki::init(&dir.path().join("bad"), "Bad Domain").is_err());

    let out = dir.path().join("certs");
    let host = pki::issue(&ca_dir, Role::Host, "gpu-001", &out, 30).unwrap();
    assert_eq!(host.cert, out.join("host-gpu-001.pem"));
    assert_eq!(mode(&host.key), 0o600);
    let (dns, uris, server, client, ca) = sans(&std::fs::read_to_string(&host.cert).unwrap());
    assert_eq!(dns, vec!["gpu-001"]);
    assert_eq!(uris, vec!["spiffe://fleet.test/host/gpu-001"]);
    assert!(server && client && !ca);

    let ops = pki::issue(&ca_dir, Role::Ops, "alice", &out, 30).unwrap();
    let (dns, uris, ..) = sans(&std::fs::read_to_string(&ops.cert).unwrap());
    assert!(dns.is_empty());
    assert_eq!(uris, vec!["spiffe://fleet.test/ops/alice"]);
    let sched = pki::issue(&ca_dir, Role::Scheduler, "slurm", &out, 30).unwrap();
    assert_eq!(sched.id.to_string(), "spiffe://fleet.test/scheduler/slurm");
    assert!(matches!(
        pki::issue(&ca_dir, Role::Ops, "alice", &out, 30),
        Err(PkiError::Exists { .. })
    ));

    let r1 = pki::revoke(&ca_dir, &ops.cert, 7).unwrap();
    assert_eq!(r1.serial, ops.serial);
    assert_eq!(r1.count, 1);
    let r2 = pki::revoke(&ca_dir, &sched.cert, 7).unwrap();
    assert_eq!(r2.count, 2);
    // Revoking twice does not duplicate.
    assert_eq!(pki::revoke(&ca_dir, &sched.cert, 7).unwrap().count, 2);
    let crl_pem = std::fs::read(&r2.crl).unwrap();
    use rustls::pki_types::pem::PemObject;
    let crl = rustls::pki_types::CertificateRevocationListDer::from_pem_slice(&crl_pem).unwrap();
    let (_, parsed) =
        x509_parser::revocation_list::CertificateRevocationList::from_der(&crl).unwrap();
    let listed: Vec<String> = parsed
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    assert_eq!(listed, vec![ops.serial.clone(), sched.serial.clone()]);

    // A certificate from another CA is not ours to revoke.
    let other_dir = dir.path().join("other");
    pki::init(&other_dir, TD).unwrap();
    let foreign = pki::issue(&other_dir, Role::Ops, "eve", &dir.path().join("o"), 30).unwrap();
    let err = pki::revoke(&ca_dir, &foreign.cert, 7)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not by this CA"), "{err}");
}

#[tokio::test]
async fn issued_files_serve_real_mtls_and_revocation_bites() {
    tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    pki::init(&ca_dir, TD).unwrap();
    let out = dir.path().join("certs");
    let host = pki::issue(&ca_dir, Role::Host, HOST, &out, 30).unwrap();
    let alice = pki::issue(&ca_dir, Role::Ops, "alice", &out, 30).unwrap();
    let bob = pki::issue(&ca_dir, Role::Ops, "bob", &out, 30).unwrap();
    let revoked = pki::revoke(&ca_dir, &bob.cert, 7).unwrap();

    let cfg = ReloadableServerConfig::load(
        ServerTlsPaths {
            cert: host.cert.clone(),
            key: host.key.clone(),
            ca_bundle: ca_dir.join(pki::CA_CERT),
            crl: Some(revoked.crl.clone()),
        },
        TD,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_r, health) = tonic_health::server::health_reporter();
    let routes =
        tonic::service::Routes::new(ringfence::pb::agent_server::AgentServer::new(TestAgent))
            .add_service(health);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tls::serve(listener, cfg, routes, async {
        let _ = stopped.await;
    }));

    let expected = SpiffeId::new(TD, Role::Host, HOST).unwrap();
    let load = |f: &pki::IssuedFiles| {
        ClientIdentity::load(&f.cert, &f.key, &ca_dir.join(pki::CA_CERT)).unwrap()
    };
    let call = |id: ClientIdentity| {
        let addr = addr.clone();
        let expected = expected.clone();
        async move {
            let ch = tls::connect_with_timeout(&addr, &expected, &id, Duration::from_secs(5))
                .await
                .map_err(|e| e.to_string())?;
            ringfence::pb::agent_client::AgentClient::new(ch)
                .get_identity(ringfence::pb::GetIdentityRequest::default())
                .await
                .map(|r| r.into_inner().spiffe_id)
                .map_err(|s| s.to_string())
        }
    };
    assert_eq!(
        call(load(&alice)).await.unwrap(),
        "spiffe://fleet.test/ops/alice"
    );
    assert!(
        call(load(&bob)).await.is_err(),
        "revoked bob must be refused"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
