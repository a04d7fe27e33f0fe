//! Mutual TLS for every ringfence RPC: our own certificate verifiers (chain
//! via webpki, then SPIFFE rules), a role layer in front of all services, hot
//! reload of certs / CA bundle / CRL, and a client connector that pins the
//! server's SPIFFE id.
//!
//! TLS 1.3 only, rustls with the ring provider. There is no plaintext mode.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use futures_util::future::{Either, Ready, ready};
use futures_util::task::AtomicWaker;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::Status;
use tonic::service::Routes;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};
use tower::{Layer, Service};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::refusals::HandshakeFailure;
use crate::spiffe::{SpiffeError, SpiffeId};

/// How long a client waits for TCP + TLS + HTTP/2 setup by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the server waits for a TLS handshake before dropping the socket,
/// so a silent peer cannot hold an accept slot forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Protobuf framing allowance per length-delimited field: a tag byte and a
/// length varint of at most 10 bytes.
const FIELD_OVERHEAD: usize = 11;
/// Longest `key_id` hint counted per signature in [`MAX_SIGNED_TASK_BYTES`]
/// (the same bound as a payload type).
const KEY_ID_BUDGET: usize = crate::envelope::MAX_KEY_ID_LEN;
/// One signature: key id, the 64-byte ed25519 signature, framing.
const SIGNATURE_BUDGET: usize = 3 * FIELD_OVERHEAD + KEY_ID_BUDGET + 64;

/// The largest envelope the verifier accepts with a payload of at most `max_payload` bytes.
const fn envelope_budget(max_payload: usize) -> usize {
    FIELD_OVERHEAD
        + FIELD_OVERHEAD
        + crate::envelope::MAX_TYPE_LEN
        + FIELD_OVERHEAD
        + max_payload
        + crate::envelope::MAX_SIGNATURES * SIGNATURE_BUDGET
}

/// The largest encoded `SignedTask` the verifier can accept: one task
/// envelope and [`MAX_APPROVALS`](crate::envelope::MAX_APPROVALS) approval
/// envelopes, each at its payload limit with
/// [`MAX_SIGNATURES`](crate::envelope::MAX_SIGNATURES) signatures. The
/// agent's gRPC decode limit (`max_decoding_message_size`) is exactly this,
/// so the transport and the verifier share one size budget: a request over
/// it is answered `RESOURCE_EXHAUSTED` (check `size`) before it is buffered.
pub const MAX_SIGNED_TASK_BYTES: usize = envelope_budget(crate::envelope::MAX_TASK_PAYLOAD)
    + crate::envelope::MAX_APPROVALS * envelope_budget(crate::envelope::MAX_APPROVAL_PAYLOAD);

/// Connection-level limits of [`serve_with_limits`]. The defaults are the
/// agent's (README "Transport limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Open connections at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// TLS handshakes in progress at once; the accept loop waits for a slot.
    pub max_handshakes: usize,
    /// A handshake not finished within this is dropped.
    pub handshake_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` of each connection.
    pub max_concurrent_streams: u32,
    /// After this a connection gets a graceful GOAWAY (the client reconnects
    /// and so passes the current certificate, CA bundle and CRL checks again).
    pub max_connection_age: Duration,
    /// How long calls still running on a connection past its age may finish
    /// before the connection is closed.
    pub max_connection_age_grace: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_handshakes: 64,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            max_concurrent_streams: 128,
            max_connection_age: Duration::from_secs(3600),
            max_connection_age_grace: Duration::from_secs(300),
        }
    }
}

/// Errors of the TLS layer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// "cannot read {what} {path}: {source}"
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file (certificate, key, CA bundle, CRL).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// "{what}: {reason}" — a PEM file that holds nothing usable.
    #[error("{what}: {reason}")]
    Pem {
        /// Which input (e.g. `certificate /etc/ringfence/agent.pem`).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// "CRL {what} expired at {next_update}: publish a fresh CRL (ringfence pki revoke)"
    #[error("CRL {what} expired at {next_update}: publish a fresh CRL (ringfence pki revoke)")]
    CrlExpired {
        /// Which CRL input.
        what: String,
        /// Its nextUpdate time.
        next_update: String,
    },
    /// "CRL {what} has no nextUpdate: a CRL must say until when it is current"
    #[error(
        "CRL {what} has no nextUpdate: a CRL must say until when it is current (ringfence pki revoke writes one)"
    )]
    CrlNoNextUpdate {
        /// Which CRL input.
        what: String,
    },
    /// "own certificate {what} is unusable: {source}"
    #[error("own certificate {what} is unusable: {source}")]
    OwnIdentity {
        /// Which certificate.
        what: String,
        /// Which SPIFFE rule it breaks.
        source: IdentityError,
    },
    /// "cannot build the TLS configuration: {reason}"
    #[error("cannot build the TLS configuration: {reason}")]
    Config {
        /// The rustls / webpki error.
        reason: String,
    },
    /// "endpoint `{endpoint}` is invalid: {reason}"
    #[error("endpoint `{endpoint}` is invalid: {reason}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// "cannot connect to {endpoint} (expecting {expected}): {reason}"
    #[error("cannot connect to {endpoint} (expecting {expected}): {reason}")]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The SPIFFE id the server had to present.
        expected: String,
        /// The whole error chain, e.g. the refused certificate.
        reason: String,
    },
    /// "connecting to {endpoint} timed out after {timeout:?}"
    #[error("connecting to {endpoint} timed out after {timeout:?}")]
    ConnectTimeout {
        /// The endpoint.
        endpoint: String,
        /// The limit that was hit.
        timeout: Duration,
    },
    /// "this TLS configuration was built from memory and has no files to reload"
    #[error("this TLS configuration was built from memory and has no files to reload")]
    NotReloadable,
    /// "cannot install the SIGHUP handler: {0}"
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(io::Error),
    /// "gRPC server failed: {0}"
    #[error("gRPC server failed: {0}")]
    Serve(String),
}

/// A certificate breaks a SPIFFE rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// "certificate is not valid X.509: {0}"
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    /// "certificate must carry exactly one URI SAN, found {0}"
    #[error("certificate must carry exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a ringfence SPIFFE id (message from [`SpiffeError`]).
    #[error(transparent)]
    Spiffe(#[from] SpiffeError),
    /// "{id} is outside trust domain `{expected}`"
    #[error("{id} is outside trust domain `{expected}`")]
    TrustDomain {
        /// The id found.
        id: SpiffeId,
        /// Our trust domain.
        expected: String,
    },
    /// "{0} is a CA certificate (basicConstraints CA:TRUE) and cannot be a leaf identity"
    #[error("{0} is a CA certificate (basicConstraints CA:TRUE) and cannot be a leaf identity")]
    IsCa(String),
    /// "certificate names {id}, not this host `{host_id}`"
    #[error(
        "certificate names {id}, not this host `{host_id}` (spiffe://<trust-domain>/host/{host_id} expected)"
    )]
    NotThisHost {
        /// The id in the certificate.
        id: SpiffeId,
        /// The configured host id.
        host_id: String,
    },
    /// "certificate has no DNS name `{host_id}` (it has: {found})"
    #[error("certificate has no DNS name `{host_id}` (DNS SANs: {found})")]
    DnsName {
        /// The configured host id.
        host_id: String,
        /// The DNS SANs it has, comma separated, or `none`.
        found: String,
    },
    /// "server presented {presented} but {expected} was expected"
    #[error("server presented {presented} but {expected} was expected")]
    WrongServer {
        /// The id in the server's certificate.
        presented: String,
        /// The id the client asked for.
        expected: String,
    },
}

/// Install the ring crypto provider as the process default. Idempotent: a
/// second call (or a provider installed elsewhere) is fine.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Our configs always use ring explicitly, so they work whatever the default is.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE identity and serial of a verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The single URI SAN, parsed.
    pub id: SpiffeId,
    /// The serial number, lowercase hex (as `openssl x509 -serial`, lowercased).
    pub serial: String,
}

/// Who is on the other end of an accepted connection. Inserted into every
/// request's extensions by [`serve`]; read it with [`peer_identity`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The client's SPIFFE id.
    pub id: SpiffeId,
    /// The client certificate's serial, lowercase hex.
    pub serial: String,
    /// The TCP peer address.
    pub remote_addr: Option<SocketAddr>,
    /// The TLS server name (SNI) the client asked for: lets one listener
    /// serve several host identities (the scale benchmark's simulator).
    pub server_name: Option<String>,
}

/// The verified peer of a request handled behind [`serve`].
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<&PeerIdentity> {
    request.extensions().get::<PeerIdentity>()
}

/// Apply the SPIFFE rules to a DER certificate: exactly one URI SAN, a
/// ringfence SPIFFE id in `trust_domain`, not a CA. Does NOT check the chain.
pub fn cert_identity(der: &[u8], trust_domain: &str) -> Result<CertIdentity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let id = spiffe_id_in(&cert)?;
    if id.trust_domain != trust_domain {
        return Err(IdentityError::TrustDomain {
            id,
            expected: trust_domain.to_string(),
        });
    }
    Ok(CertIdentity {
        id,
        serial: hex::encode(cert.tbs_certificate.raw_serial()),
    })
}

/// Whether a DER certificate is the identity of host `host_id`: the SPIFFE
/// rules of [`cert_identity`], the id `spiffe://<trust_domain>/host/<host_id>`
/// and a DNS SAN equal to `host_id` (ASCII case-insensitive). The agent refuses
/// to start, and a reload is refused, when its own certificate fails this.
pub fn check_host_certificate(
    der: &[u8],
    trust_domain: &str,
    host_id: &str,
) -> Result<CertIdentity, IdentityError> {
    let identity = cert_identity(der, trust_domain)?;
    if identity.id.role != crate::spiffe::Role::Host || identity.id.name != host_id {
        return Err(IdentityError::NotThisHost {
            id: identity.id,
            host_id: host_id.to_string(),
        });
    }
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut dns = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::DNSName(d) = name {
                    dns.push((*d).to_string());
                }
            }
        }
    }
    if !dns.iter().any(|d| d.eq_ignore_ascii_case(host_id)) {
        return Err(IdentityError::DnsName {
            host_id: host_id.to_string(),
            found: if dns.is_empty() {
                "none".to_string()
            } else {
                dns.join(", ")
            },
        });
    }
    Ok(identity)
}

/// The single SPIFFE URI SAN of a leaf that is not a CA, any trust domain.
fn spiffe_id_in(cert: &X509Certificate<'_>) -> Result<SpiffeId, IdentityError> {
    let mut uris = Vec::new();
    let mut is_ca = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    if let GeneralName::URI(uri) = name {
                        uris.push(uri.to_string());
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
            _ => {}
        }
    }
    if uris.len() != 1 {
        return Err(IdentityError::UriSanCount(uris.len()));
    }
    let id = SpiffeId::parse(&uris[0])?;
    if is_ca {
        return Err(IdentityError::IsCa(id.to_string()));
    }
    Ok(id)
}

/// rustls prints `OtherError` with `{:?}`: make that the readable message.
struct Refusal(IdentityError);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {}

/// A bad certificate alert carrying which SPIFFE rule failed.
fn rejected(e: IdentityError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(e)))))
}

// ---------------------------------------------------------------- PEM input

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn parse_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_string(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_string(),
            reason: "no CERTIFICATE block found".to_string(),
        });
    }
    for (i, c) in certs.iter().enumerate() {
        X509Certificate::from_der(c).map_err(|e| TlsError::Pem {
            what: what.to_string(),
            reason: format!("certificate #{} is not valid X.509: {e}", i + 1),
        })?;
    }
    Ok(certs)
}

fn parse_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        what: what.to_string(),
        reason: format!("no usable private key: {e}"),
    })
}

fn parse_roots(what: &str, pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in parse_certs(what, pem)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::Pem {
            what: what.to_string(),
            reason: format!("certificate #{} is not a usable trust anchor: {e}", i + 1),
        })?;
    }
    Ok(Arc::new(roots))
}

/// Parse a PEM CRL file and refuse it if any CRL in it is past its nextUpdate.
fn parse_crls(
    what: &str,
    pem: &[u8],
    now: SystemTime,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_string(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if crls.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_string(),
            reason: "no X509 CRL block found".to_string(),
        });
    }
    let now_secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for crl in &crls {
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl)
            .map_err(|e| TlsError::Pem {
                what: what.to_string(),
                reason: format!("not a valid X.509 CRL: {e}"),
            })?;
        // A CRL without nextUpdate would never expire: a stolen copy of an
        // old one could hide every later revocation.
        let Some(next) = parsed.next_update() else {
            return Err(TlsError::CrlNoNextUpdate {
                what: what.to_string(),
            });
        };
        let next_secs = next.timestamp();
        if next_secs < 0 || (next_secs as u64) < now_secs {
            return Err(TlsError::CrlExpired {
                what: what.to_string(),
                next_update: next.to_string(),
            });
        }
    }
    Ok(crls)
}

// ------------------------------------------------------------ server config

/// Where the agent's TLS material lives; everything is re-read on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsPaths {
    /// PEM chain: the agent's leaf first, then any intermediates.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM bundle of CAs that client certificates must chain to.
    pub ca_bundle: PathBuf,
    /// PEM CRL file(s); with a CRL, a client whose issuer it does not cover is refused.
    pub crl: Option<PathBuf>,
}

/// The same material as [`ServerTlsPaths`], already in memory (demo, benchmarks, tests).
#[derive(Clone, PartialEq, Eq)]
pub struct ServerTlsPem {
    /// PEM chain, leaf first.
    pub cert: Vec<u8>,
    /// PEM private key.
    pub key: Vec<u8>,
    /// PEM CA bundle for client certificates.
    pub ca_bundle: Vec<u8>,
    /// Optional PEM CRL.
    pub crl: Option<Vec<u8>>,
}

impl fmt::Debug for ServerTlsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTlsPem")
            .field("cert_bytes", &self.cert.len())
            .field("key", &"<redacted>")
            .field("crl", &self.crl.is_some())
            .finish()
    }
}

impl ServerTlsPaths {
    /// Read all files.
    pub fn read(&self) -> Result<ServerTlsPem, TlsError> {
        Ok(ServerTlsPem {
            cert: read_file("certificate", &self.cert)?,
            key: read_file("private key", &self.key)?,
            ca_bundle: read_file("CA bundle", &self.ca_bundle)?,
            crl: match &self.crl {
                Some(p) => Some(read_file("CRL", p)?),
                None => None,
            },
        })
    }

    fn labels(&self) -> Labels {
        Labels {
            cert: format!("certificate {}", self.cert.display()),
            key: format!("private key {}", self.key.display()),
            ca: format!("CA bundle {}", self.ca_bundle.display()),
            crl: self
                .crl
                .as_ref()
                .map(|p| format!("CRL {}", p.display()))
                .unwrap_or_default(),
        }
    }
}

/// Names for inputs in error messages.
struct Labels {
    cert: String,
    key: String,
    ca: String,
    crl: String,
}

impl Labels {
    fn memory() -> Self {
        Self {
            cert: "certificate (in memory)".into(),
            key: "private key (in memory)".into(),
            ca: "CA bundle (in memory)".into(),
            crl: "CRL (in memory)".into(),
        }
    }
}

/// Build a TLS 1.3 server config that requires a client certificate chained
/// to the CA bundle, not revoked by the CRL, and obeying the SPIFFE rules.
pub fn server_config(
    pem: &ServerTlsPem,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    build_server_config(pem, trust_domain, None, &Labels::memory()).map(|b| b.config)
}

/// A server config and the client verifier inside it (kept to re-check
/// open connections after a reload).
struct Built {
    config: Arc<ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
}

fn build_server_config(
    pem: &ServerTlsPem,
    trust_domain: &str,
    host_id: Option<&str>,
    labels: &Labels,
) -> Result<Built, TlsError> {
    let certs = parse_certs(&labels.cert, &pem.cert)?;
    let own = match host_id {
        Some(host) => check_host_certificate(&certs[0], trust_domain, host),
        None => cert_identity(&certs[0], trust_domain),
    };
    own.map_err(|source| TlsError::OwnIdentity {
        what: labels.cert.clone(),
        source,
    })?;
    let key = parse_key(&labels.key, &pem.key)?;
    let verifier = client_verifier(&pem.ca_bundle, pem.crl.as_deref(), trust_domain, labels)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config {
            reason: e.to_string(),
        })?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config {
            reason: format!("{} with {}: {e}", labels.cert, labels.key),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Built {
        config: Arc::new(config),
        verifier,
    })
}

/// The client verifier every server config uses: chain to the CA bundle,
/// optional CRL, then the SPIFFE rules.
fn client_verifier(
    ca_bundle: &[u8],
    crl: Option<&[u8]>,
    trust_domain: &str,
    labels: &Labels,
) -> Result<Arc<SpiffeClientVerifier>, TlsError> {
    let roots = parse_roots(&labels.ca, ca_bundle)?;
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    if let Some(crl) = crl {
        let crls = parse_crls(&labels.crl, crl, crate::time::system_time())?;
        // The whole chain: an intermediate CA revoked by its issuer's CRL
        // takes every certificate under it along. A certificate whose
        // issuer no CRL covers is refused (unknown revocation status).
        builder = builder.with_crls(crls).enforce_revocation_expiration();
    }
    let inner = builder.build().map_err(|e| TlsError::Config {
        reason: format!("client verifier from {}: {e}", labels.ca),
    })?;
    Ok(Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: trust_domain.to_string(),
    }))
}

/// One identity of a [`server_config_by_sni`] listener.
#[derive(Debug, Clone)]
pub struct SniIdentity {
    /// The TLS server name clients ask for (a host id).
    pub name: String,
    /// PEM chain, leaf first.
    pub cert_pem: Vec<u8>,
    /// PEM private key.
    pub key_pem: Vec<u8>,
}

/// A TLS 1.3 server config like [`server_config`] that presents the
/// certificate of whichever identity the client names by SNI: one listener
/// for many simulated hosts (the coordinator scale benchmark). Every
/// certificate must obey the SPIFFE rules and be valid for its name.
pub fn server_config_by_sni(
    identities: &[SniIdentity],
    ca_bundle: &[u8],
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let labels = Labels::memory();
    let mut resolver = rustls::server::ResolvesServerCertUsingSni::new();
    let provider = provider();
    for ident in identities {
        let what = format!("certificate of `{}`", ident.name);
        let certs = parse_certs(&what, &ident.cert_pem)?;
        cert_identity(&certs[0], trust_domain).map_err(|source| TlsError::OwnIdentity {
            what: what.clone(),
            source,
        })?;
        let key = parse_key(&format!("private key of `{}`", ident.name), &ident.key_pem)?;
        let signing =
            provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| TlsError::Config {
                    reason: format!("private key of `{}`: {e}", ident.name),
                })?;
        resolver
            .add(&ident.name, rustls::sign::CertifiedKey::new(certs, signing))
            .map_err(|e| TlsError::Config {
                reason: format!("{what}: {e}"),
            })?;
    }
    let verifier = client_verifier(ca_bundle, None, trust_domain, &labels)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config {
            reason: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// webpki chain + CRL checks, then the SPIFFE rules.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            tracing::warn!(error = %e, "client certificate refused");
            return Err(e);
        }
        if let Err(e) = cert_identity(end_entity, &self.trust_domain) {
            tracing::warn!(error = %e, "client certificate refused");
            return Err(rejected(e));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// -------------------------------------------------------------- hot reload

/// The agent's current server config, swappable at run time. Cloning shares it.
///
/// It also knows every connection accepted with it (see [`serve`]): a reload
/// checks each open connection's client certificate chain again with the new
/// CA bundle and CRL, and closes the connections that no longer pass, so a
/// revoked client loses its open HTTP/2 connection at once.
#[derive(Clone)]
pub struct ReloadableServerConfig {
    inner: Arc<ReloadInner>,
}

struct ReloadInner {
    paths: Option<ServerTlsPaths>,
    trust_domain: String,
    /// Set by [`ReloadableServerConfig::load_for_host`]: every (re)load
    /// checks that the certificate is this host's.
    host_id: Option<String>,
    current: RwLock<Arc<ServerConfig>>,
    generation: AtomicU64,
    conns: Mutex<HashMap<u64, LiveConn>>,
    next_conn: AtomicU64,
}

/// An open connection, as the registry sees it.
struct LiveConn {
    chain: Vec<CertificateDer<'static>>,
    id: SpiffeId,
    addr: SocketAddr,
    kill: Arc<KillSwitch>,
}

/// Closes one connection from outside: its reads and writes fail from then on.
#[derive(Debug, Default)]
struct KillSwitch {
    killed: AtomicBool,
    waker: AtomicWaker,
}

impl KillSwitch {
    fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        self.waker.register(cx.waker());
        if self.killed.load(Ordering::SeqCst) {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed: the client certificate no longer passes the reloaded CA bundle / CRL",
            ))
        } else {
            Ok(())
        }
    }
}

/// Removes a connection from the registry when it ends.
struct ConnGuard {
    tls: Weak<ReloadInner>,
    key: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.tls.upgrade() {
            inner
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.key);
        }
    }
}

impl fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnGuard").field("key", &self.key).finish()
    }
}

impl fmt::Debug for ReloadableServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableServerConfig")
            .field("paths", &self.inner.paths)
            .field("trust_domain", &self.inner.trust_domain)
            .field("host_id", &self.inner.host_id)
            .field("generation", &self.generation())
            .field("open_connections", &self.open_connections())
            .finish()
    }
}

impl ReloadableServerConfig {
    /// Load from files; fails (naming the file) if anything is wrong.
    pub fn load(paths: ServerTlsPaths, trust_domain: &str) -> Result<Self, TlsError> {
        let built = build_server_config(&paths.read()?, trust_domain, None, &paths.labels())?;
        Ok(Self::with(Some(paths), trust_domain, None, built))
    }

    /// [`load`](Self::load) for the agent of host `host_id`: its certificate
    /// must name `spiffe://<trust_domain>/host/<host_id>` and carry
    /// `DNS:<host_id>` ([`check_host_certificate`]), at load and at every
    /// reload (a reload to another host's certificate is refused).
    pub fn load_for_host(
        paths: ServerTlsPaths,
        trust_domain: &str,
        host_id: &str,
    ) -> Result<Self, TlsError> {
        let built =
            build_server_config(&paths.read()?, trust_domain, Some(host_id), &paths.labels())?;
        Ok(Self::with(
            Some(paths),
            trust_domain,
            Some(host_id.to_string()),
            built,
        ))
    }

    /// Build from PEM in memory; [`reload`](Self::reload) then has nothing to re-read.
    pub fn from_pem(pem: &ServerTlsPem, trust_domain: &str) -> Result<Self, TlsError> {
        let built = build_server_config(pem, trust_domain, None, &Labels::memory())?;
        Ok(Self::with(None, trust_domain, None, built))
    }

    /// Wrap a config built elsewhere (e.g. [`server_config_by_sni`]); it
    /// cannot be reloaded.
    pub fn fixed(config: Arc<ServerConfig>, trust_domain: &str) -> Self {
        Self::with_config(None, trust_domain, None, config)
    }

    fn with(
        paths: Option<ServerTlsPaths>,
        trust_domain: &str,
        host_id: Option<String>,
        built: Built,
    ) -> Self {
        Self::with_config(paths, trust_domain, host_id, built.config)
    }

    fn with_config(
        paths: Option<ServerTlsPaths>,
        trust_domain: &str,
        host_id: Option<String>,
        current: Arc<ServerConfig>,
    ) -> Self {
        Self {
            inner: Arc::new(ReloadInner {
                paths,
                trust_domain: trust_domain.to_string(),
                host_id,
                current: RwLock::new(current),
                generation: AtomicU64::new(0),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
            }),
        }
    }

    /// The config new connections get.
    pub fn current(&self) -> Arc<ServerConfig> {
        // A poisoned lock still holds a valid Arc: keep serving with it.
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The trust domain client certificates must belong to.
    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// How many successful reloads happened (0 after load).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    /// How many accepted connections are open now.
    pub fn open_connections(&self) -> usize {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Re-read every file and swap the new config in, then close every open
    /// connection whose client certificate chain the new config refuses
    /// (revoked by the new CRL, CA removed from the bundle, expired). On any
    /// error the last good config keeps serving and the error is logged and
    /// returned.
    pub fn reload(&self) -> Result<(), TlsError> {
        let Some(paths) = &self.inner.paths else {
            return Err(TlsError::NotReloadable);
        };
        let built = paths.read().and_then(|pem| {
            build_server_config(
                &pem,
                &self.inner.trust_domain,
                self.inner.host_id.as_deref(),
                &paths.labels(),
            )
        });
        match built {
            Ok(built) => {
                *self
                    .inner
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = built.config;
                let generation = self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1;
                tracing::info!(generation, "TLS certificates, CA bundle and CRL reloaded");
                let closed = self.recheck_connections(built.verifier.as_ref());
                if closed > 0 {
                    tracing::warn!(
                        closed,
                        "closed open connections whose client certificate the reload refuses"
                    );
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; still serving the previous certificates");
                Err(e)
            }
        }
    }

    /// Check every open connection's client chain with `verifier`; close
    /// those it refuses. Returns how many were closed.
    fn recheck_connections(&self, verifier: &dyn ClientCertVerifier) -> usize {
        let now = UnixTime::now();
        let conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for conn in conns.values() {
            let Some((leaf, intermediates)) = conn.chain.split_first() else {
                continue;
            };
            if let Err(e) = verifier.verify_client_cert(leaf, intermediates, now) {
                tracing::warn!(peer = %conn.addr, id = %conn.id, error = %e,
                    "closing the connection: its client certificate is refused after the reload");
                conn.kill.kill();
                closed += 1;
            }
        }
        closed
    }

    /// Record an accepted connection; it is forgotten when the guard drops.
    fn register(
        &self,
        chain: Vec<CertificateDer<'static>>,
        id: SpiffeId,
        addr: SocketAddr,
    ) -> (Arc<KillSwitch>, ConnGuard) {
        let kill = Arc::new(KillSwitch::default());
        let key = self.inner.next_conn.fetch_add(1, Ordering::SeqCst);
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key,
                LiveConn {
                    chain,
                    id,
                    addr,
                    kill: kill.clone(),
                },
            );
        (
            kill,
            ConnGuard {
                tls: Arc::downgrade(&self.inner),
                key,
            },
        )
    }
}

/// Reload `tls` on every SIGHUP for the life of the process. The handler is
/// registered before this returns, so a SIGHUP sent right after is not lost.
/// Must be called inside a tokio runtime.
pub fn spawn_sighup_reloader(
    tls: ReloadableServerConfig,
) -> Result<tokio::task::JoinHandle<()>, TlsError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).map_err(TlsError::Signal)?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading TLS material");
            // reload() logs its own failure; the old config keeps serving.
            let _ = tls.reload();
        }
    }))
}

// ------------------------------------------------------------------ serving

/// An accepted, verified TLS connection carrying its peer's identity to tonic.
#[derive(Debug)]
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    identity: PeerIdentity,
    kill: Arc<KillSwitch>,
    _registered: ConnGuard,
    _slot: OwnedSemaphorePermit,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        self.identity.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.kill.check(cx)?;
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.kill.check(cx)?;
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.kill.check(cx)?;
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serve `routes` (e.g. the Agent service plus `grpc.health.v1`) over mTLS on
/// `listener` until `shutdown` completes, with the default [`ServeLimits`].
/// Every request passes [`RoleLayer`] and [`RequestErrorLayer`].
/// Each new connection uses `tls.current()`, so reloads apply without
/// dropping the listener; failed handshakes are logged and never stop it.
pub async fn serve<F>(
    listener: TcpListener,
    tls: ReloadableServerConfig,
    routes: Routes,
    shutdown: F,
) -> Result<(), TlsError>
where
    F: Future<Output = ()>,
{
    serve_with_limits(listener, tls, routes, ServeLimits::default(), shutdown).await
}

/// [`serve`] with explicit connection limits.
pub async fn serve_with_limits<F>(
    listener: TcpListener,
    tls: ReloadableServerConfig,
    routes: Routes,
    limits: ServeLimits,
    shutdown: F,
) -> Result<(), TlsError>
where
    F: Future<Output = ()>,
{
    let (tx, rx) = mpsc::channel::<TlsConn>(64);
    let accept = tokio::spawn(accept_loop(listener, tls, tx, limits));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, io::Error>);
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_connection_age(limits.max_connection_age)
        .max_connection_age_grace(limits.max_connection_age_grace)
        .layer(RoleLayer)
        .layer(RequestErrorLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    accept.abort();
    result.map_err(|e| TlsError::Serve(error_chain(&e)))
}

async fn accept_loop(
    listener: TcpListener,
    tls: ReloadableServerConfig,
    tx: mpsc::Sender<TlsConn>,
    limits: ServeLimits,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    loop {
        // A connection slot first (held for the connection's life), then a
        // handshake slot (held until the handshake ends): at the caps new
        // clients wait in the listen backlog instead of costing memory.
        let slots = async {
            let conn = connections.clone().acquire_owned().await.ok()?;
            let hs = handshakes.clone().acquire_owned().await.ok()?;
            Some((conn, hs))
        };
        let Some((conn_slot, hs_slot)) = (tokio::select! {
            s = slots => s,
            () = tx.closed() => return,
        }) else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        let (tcp, addr) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // e.g. EMFILE: back off briefly, keep the listener.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = TlsAcceptor::from(tls.current());
        let tls = tls.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    crate::refusals::handshake_failed(HandshakeFailure::classify(&e));
                    tracing::warn!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    crate::refusals::handshake_failed(HandshakeFailure::Timeout);
                    tracing::warn!(peer = %addr, "TLS handshake timed out");
                    return;
                }
            };
            drop(hs_slot);
            let chain: Vec<CertificateDer<'static>> = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
                .unwrap_or_default();
            let Some(leaf) = chain.first() else {
                crate::refusals::handshake_failed(HandshakeFailure::NoClientCertificate);
                tracing::warn!(peer = %addr, "TLS peer presented no certificate");
                return;
            };
            let identity = match cert_identity(leaf, tls.trust_domain()) {
                Ok(c) => PeerIdentity {
                    id: c.id,
                    serial: c.serial,
                    remote_addr: Some(addr),
                    server_name: stream.get_ref().1.server_name().map(str::to_string),
                },
                Err(e) => {
                    crate::refusals::handshake_failed(HandshakeFailure::BadCertificate);
                    tracing::warn!(peer = %addr, error = %e, "client certificate refused");
                    return;
                }
            };
            tracing::debug!(peer = %addr, id = %identity.id, "mTLS connection accepted");
            let (kill, registered) = tls.register(chain, identity.id.clone(), addr);
            let _ = tx
                .send(TlsConn {
                    stream,
                    identity,
                    kill,
                    _registered: registered,
                    _slot: conn_slot,
                })
                .await;
        });
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let msg = inner.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = inner.source();
    }
    s
}

// -------------------------------------------------------------- role layer

/// Rejects callers whose role may not call the RPC path with `PERMISSION_DENIED`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoleLayer;

impl<S> Layer<S> for RoleLayer {
    type Service = RoleService<S>;

    fn layer(&self, inner: S) -> RoleService<S> {
        RoleService { inner }
    }
}

/// The service made by [`RoleLayer`].
#[derive(Debug, Clone)]
pub struct RoleService<S> {
    inner: S,
}

/// Whether `peer` may call `path`. The status names role, id and RPC.
pub fn authorize(peer: Option<&PeerIdentity>, path: &str) -> Result<(), Status> {
    let Some(peer) = peer else {
        return Err(Status::unauthenticated(format!(
            "no verified client identity for {path}"
        )));
    };
    if peer.id.role.may_call(path) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "role `{}` ({}) may not call {path}",
            peer.id.role, peer.id
        )))
    }
}

impl<S, B> Service<http::Request<B>> for RoleService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<Self::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match authorize(req.extensions().get::<PeerIdentity>(), req.uri().path()) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(status) => {
                tracing::warn!(
                    rpc = req.uri().path(),
                    reason = status.message(),
                    "RPC refused"
                );
                Either::Right(ready(Ok(status.into_http())))
            }
        }
    }
}

// ------------------------------------------------------- request errors

/// The RPC whose request decode errors name a task check.
const SUBMIT_TASK_PATH: &str = "/ringfence.v1.Agent/SubmitTask";

/// Maps tonic's answers to requests it could not decode to the statuses the
/// README's table promises: a request over the decode limit is
/// `RESOURCE_EXHAUSTED` (tonic says `OUT_OF_RANGE`), one that is not valid
/// protobuf, or has no message, is `INVALID_ARGUMENT` (tonic says
/// `INTERNAL`). On `SubmitTask` the status names the task check (`size`,
/// `decode`) like any other rejected task, in its message and in the
/// `ringfence-check` metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestErrorLayer;

impl<S> Layer<S> for RequestErrorLayer {
    type Service = RequestErrorService<S>;

    fn layer(&self, inner: S) -> RequestErrorService<S> {
        RequestErrorService { inner }
    }
}

/// The service made by [`RequestErrorLayer`].
#[derive(Debug, Clone)]
pub struct RequestErrorService<S> {
    inner: S,
}

/// Which malformed-request status a response carries, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestError {
    Oversized,
    Undecodable,
}

fn classify_request_error(status: &Status) -> Option<RequestError> {
    let msg = status.message();
    match status.code() {
        tonic::Code::OutOfRange if msg.starts_with("Error, decoded message length too large") => {
            Some(RequestError::Oversized)
        }
        tonic::Code::Internal
            if msg.starts_with("failed to decode Protobuf message")
                || msg == "Missing request message." =>
        {
            Some(RequestError::Undecodable)
        }
        _ => None,
    }
}

/// The status a malformed request is answered with on `path`; on
/// `SubmitTask` the rejection is also counted ([`crate::refusals`]).
fn request_error_status(kind: RequestError, original: &Status, path: &str) -> Status {
    let (code, check, what) = match kind {
        RequestError::Oversized => (
            tonic::Code::ResourceExhausted,
            "size",
            format!("request over the {MAX_SIGNED_TASK_BYTES}-byte limit"),
        ),
        RequestError::Undecodable => (
            tonic::Code::InvalidArgument,
            "decode",
            "request is not a valid protobuf message".to_string(),
        ),
    };
    if path == SUBMIT_TASK_PATH {
        crate::refusals::task_rejected(check);
        let mut status = Status::new(
            code,
            format!(
                "task rejected by check `{check}`: {what} ({})",
                original.message()
            ),
        );
        if let Ok(v) = check.parse() {
            status
                .metadata_mut()
                .insert(crate::status::CHECK_METADATA_KEY, v);
        }
        status
    } else {
        Status::new(code, format!("{what} ({})", original.message()))
    }
}

impl<S, B> Service<http::Request<B>> for RequestErrorService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            // Decode failures of unary requests are trailers-only answers:
            // the status is in the response headers.
            let Some(status) = Status::from_header_map(response.headers()) else {
                return Ok(response);
            };
            let Some(kind) = classify_request_error(&status) else {
                return Ok(response);
            };
            let mapped = request_error_status(kind, &status, &path);
            tracing::warn!(rpc = %path, code = ?mapped.code(), reason = mapped.message(),
                "malformed request refused");
            Ok(mapped.into_http())
        })
    }
}

// ------------------------------------------------------------------ client

/// A client's certificate chain, key and the CA bundle it trusts servers by.
pub struct ClientIdentity {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    /// With CRLs, a server certificate (and each CA above it) must be
    /// covered by one and not revoked.
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        Self {
            certs: self.certs.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
            crls: self.crls.clone(),
        }
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certs", &self.certs.len())
            .field("key", &"<redacted>")
            .field("roots", &self.roots.len())
            .field("crls", &self.crls.len())
            .finish()
    }
}

impl ClientIdentity {
    /// Load PEM files: certificate chain (leaf first), private key, CA bundle.
    pub fn load(cert: &Path, key: &Path, ca_bundle: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            certs: parse_certs(
                &format!("certificate {}", cert.display()),
                &read_file("certificate", cert)?,
            )?,
            key: parse_key(
                &format!("private key {}", key.display()),
                &read_file("private key", key)?,
            )?,
            roots: parse_roots(
                &format!("CA bundle {}", ca_bundle.display()),
                &read_file("CA bundle", ca_bundle)?,
            )?,
            crls: Vec::new(),
        })
    }

    /// Also check servers' certificates against the CRL file at `path`
    /// (refused when expired or without nextUpdate, like the agent's).
    pub fn with_crl_file(self, path: &Path) -> Result<Self, TlsError> {
        let pem = read_file("CRL", path)?;
        self.with_crl_labelled(&format!("CRL {}", path.display()), &pem)
    }

    /// [`with_crl_file`](Self::with_crl_file) from PEM in memory.
    pub fn with_crl_pem(self, pem: &[u8]) -> Result<Self, TlsError> {
        self.with_crl_labelled("CRL (in memory)", pem)
    }

    fn with_crl_labelled(mut self, what: &str, pem: &[u8]) -> Result<Self, TlsError> {
        self.crls = parse_crls(what, pem, crate::time::system_time())?;
        Ok(self)
    }

    /// The same from PEM bytes in memory.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], ca_pem: &[u8]) -> Result<Self, TlsError> {
        Ok(Self {
            certs: parse_certs("certificate (in memory)", cert_pem)?,
            key: parse_key("private key (in memory)", key_pem)?,
            roots: parse_roots("CA bundle (in memory)", ca_pem)?,
            crls: Vec::new(),
        })
    }

    /// A TLS 1.3 client config that only accepts a server presenting `expected`.
    pub fn client_config(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, TlsError> {
        let mut builder =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider());
        if !self.crls.is_empty() {
            builder = builder
                .with_crls(self.crls.clone())
                .enforce_revocation_expiration();
        }
        let inner = builder.build().map_err(|e| TlsError::Config {
            reason: format!("server verifier: {e}"),
        })?;
        let verifier = Arc::new(SpiffeServerVerifier {
            inner,
            expected: expected.clone(),
        });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config {
                reason: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.certs.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config {
                reason: format!("client certificate and key: {e}"),
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        // One config per connection target: a session cache per config would
        // only hold tickets nobody reuses (memory at fleet scale).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// Checks the server's SPIFFE id against the expected one (so the error names
/// both), then the chain and DNS name via webpki.
#[derive(Debug)]
struct SpiffeServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let (_, cert) = X509Certificate::from_der(end_entity)
            .map_err(|e| rejected(IdentityError::Parse(e.to_string())))?;
        let presented = spiffe_id_in(&cert).map_err(rejected)?;
        if presented != self.expected {
            return Err(rejected(IdentityError::WrongServer {
                presented: presented.to_string(),
                expected: self.expected.to_string(),
            }));
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `host:port` out of `host:port`, `https://host:port[/]` or `http://host:port`.
fn authority_of(endpoint: &str) -> Result<String, TlsError> {
    let bad = |reason: &str| TlsError::Endpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let rest = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"))
        .unwrap_or(endpoint)
        .trim_end_matches('/');
    let uri: http::Uri = format!("https://{rest}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad("must be host:port without a path"));
    }
    let authority = uri.authority().ok_or_else(|| bad("missing host"))?;
    if authority.port_u16().is_none() {
        return Err(bad("missing port (host:port)"));
    }
    Ok(authority.as_str().to_string())
}

fn server_name_for(expected: &SpiffeId) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(expected.name.clone()).map_err(|e| TlsError::Config {
        reason: format!(
            "`{}` is not usable as a TLS server name: {e}",
            expected.name
        ),
    })
}

async fn tls_connect(
    authority: &str,
    connector: &TlsConnector,
    name: ServerName<'static>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(authority).await?;
    tcp.set_nodelay(true)?;
    connector.connect(name, tcp).await
}

/// Connect with [`DEFAULT_CONNECT_TIMEOUT`]; see [`connect_with_timeout`].
pub async fn connect(
    endpoint: &str,
    expected_server: &SpiffeId,
    identity: &ClientIdentity,
) -> Result<Channel, TlsError> {
    connect_with_timeout(endpoint, expected_server, identity, DEFAULT_CONNECT_TIMEOUT).await
}

/// Open an mTLS gRPC channel to `endpoint` (`host:port` or `https://host:port`)
/// that only talks to a server whose certificate chains to the client's CA
/// bundle, carries `expected_server` as its single URI SAN and
/// `DNS:<expected_server.name>`. Reconnects use the same checks.
pub async fn connect_with_timeout(
    endpoint: &str,
    expected_server: &SpiffeId,
    identity: &ClientIdentity,
    timeout: Duration,
) -> Result<Channel, TlsError> {
    let authority = authority_of(endpoint)?;
    let connector = TlsConnector::from(identity.client_config(expected_server)?);
    let name = server_name_for(expected_server)?;
    let ep = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| TlsError::Endpoint {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(timeout)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true);
    let target = authority.clone();
    let make = tower::service_fn(move |_uri: http::Uri| {
        let connector = connector.clone();
        let name = name.clone();
        let target = target.clone();
        async move {
            let tls = tokio::time::timeout(timeout, tls_connect(&target, &connector, name))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS connect timed out"))??;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    match tokio::time::timeout(timeout, ep.connect_with_connector(make)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(TlsError::Connect {
            endpoint: endpoint.to_string(),
            expected: expected_server.to_string(),
            reason: error_chain(&e),
        }),
        Err(_) => Err(TlsError::ConnectTimeout {
            endpoint: endpoint.to_string(),
            timeout,
        }),
    }
}

/// Do only the TLS handshake and return the server's certificate chain as
/// presented (leaf first): for `ringfence hosts` diagnostics and rotation checks.
pub async fn server_certificates(
    endpoint: &str,
    expected_server: &SpiffeId,
    identity: &ClientIdentity,
    timeout: Duration,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let authority = authority_of(endpoint)?;
    let connector = TlsConnector::from(identity.client_config(expected_server)?);
    let name = server_name_for(expected_server)?;
    let stream =
        match tokio::time::timeout(timeout, tls_connect(&authority, &connector, name)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(TlsError::Connect {
                    endpoint: endpoint.to_string(),
                    expected: expected_server.to_string(),
                    reason: error_chain(&e),
                });
            }
            Err(_) => {
                return Err(TlsError::ConnectTimeout {
                    endpoint: endpoint.to_string(),
                    timeout,
                });
            }
        };
    Ok(stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.to_vec())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// The one size budget holds a SignedTask at every verifier limit: a
    /// task and MAX_APPROVALS approvals at their payload limits, each with
    /// MAX_SIGNATURES signatures whose key ids are as long as a payload type.
    #[test]
    fn size_budget_fits_the_largest_acceptable_signed_task() {
        use crate::envelope::{
            APPROVAL_TYPE, MAX_APPROVAL_PAYLOAD, MAX_APPROVALS, MAX_SIGNATURES, MAX_TASK_PAYLOAD,
            MAX_TYPE_LEN,
        };
        use prost::Message;
        let env = |payload: usize| crate::pb::Envelope {
            payload_type: "t".repeat(MAX_TYPE_LEN),
            payload: vec![0xff; payload],
            signatures: (0..MAX_SIGNATURES)
                .map(|_| crate::pb::Signature {
                    key_id: "k".repeat(MAX_TYPE_LEN),
                    sig: vec![0xff; 64],
                })
                .collect(),
        };
        let largest = crate::pb::SignedTask {
            task: Some(env(MAX_TASK_PAYLOAD)),
            approvals: (0..MAX_APPROVALS)
                .map(|_| env(MAX_APPROVAL_PAYLOAD))
                .collect(),
        };
        let len = largest.encoded_len();
        assert!(
            len <= MAX_SIGNED_TASK_BYTES,
            "{len} > {MAX_SIGNED_TASK_BYTES}"
        );
        // ...and not far above it: the budget is the verifier's, not a guess.
        assert!(
            MAX_SIGNED_TASK_BYTES - len < 64 * 1024,
            "{len} vs {MAX_SIGNED_TASK_BYTES}"
        );
        assert!(APPROVAL_TYPE.len() <= MAX_TYPE_LEN);
    }

    #[test]
    fn malformed_request_statuses_are_mapped() {
        let decode = Status::internal("failed to decode Protobuf message: buffer underflow");
        let kind = classify_request_error(&decode).unwrap();
        let s = request_error_status(kind, &decode, SUBMIT_TASK_PATH);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(crate::status::rejected_check(&s).as_deref(), Some("decode"));
        let big = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 1 bytes",
        );
        let kind = classify_request_error(&big).unwrap();
        let s = request_error_status(kind, &big, "/ringfence.v1.Agent/GetTask");
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(crate::status::rejected_check(&s), None);
        // A handler's own statuses pass untouched.
        assert_eq!(classify_request_error(&Status::internal("journal")), None);
        assert_eq!(classify_request_error(&Status::out_of_range("page")), None);
    }

    #[test]
    fn endpoints_parse_to_authority() {
        assert_eq!(authority_of("10.0.0.1:7443").unwrap(), "10.0.0.1:7443");
        assert_eq!(authority_of("https://gpu-1:7443/").unwrap(), "gpu-1:7443");
        assert!(authority_of("gpu-1").is_err());
        assert!(authority_of("https://gpu-1:7443/x").is_err());
    }
}
