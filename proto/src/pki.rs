//! A small fleet CA with rcgen: create it, issue host / ops / scheduler
//! certificates, revoke them into a CRL. Larger fleets may bring their own
//! CA instead: the TLS layer only takes PEM bundles.
//!
//! CA directory layout: `ca.pem`, `ca.key` (0600), `trust-domain`,
//! `revoked` (one `<serial-hex> <unix-time> <spiffe-id>` per line), `crl.pem`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{Role, SpiffeId};

/// CA certificate file in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file (0600).
pub const CA_KEY: &str = "ca.key";
/// The trust domain this CA issues for.
pub const TRUST_DOMAIN: &str = "trust-domain";
/// Revoked serials, one per line.
pub const REVOKED: &str = "revoked";
/// The CRL, rewritten on every revoke.
pub const CRL: &str = "crl.pem";

/// Validity of a new CA: about ten years.
pub const CA_VALIDITY_DAYS: u64 = 3650;

const DAY: Duration = Duration::from_secs(86_400);

/// Errors of the PKI helpers.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// "{path}: {source}"
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// "{path} already exists; refusing to overwrite it"
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// "invalid identity: {0}"
    #[error("invalid identity: {0}")]
    Identity(#[from] crate::spiffe::SpiffeError),
    /// "cannot {what}: {source}"
    #[error("cannot {what}: {source}")]
    Rcgen {
        /// What was being built.
        what: String,
        /// The rcgen error.
        source: rcgen::Error,
    },
    /// "{path}: {reason}"
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The offending file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// "validity must be at least 1 day, got {0}"
    #[error("validity must be at least 1 day, got {0}")]
    Validity(u64),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn rcgen_err(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> PkiError {
    let what = what.into();
    move |source| PkiError::Rcgen { what, source }
}

/// Write a new file with `mode`, refusing to overwrite.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io_err(path)(e)
            }
        })?;
    f.write_all(contents).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Replace a file atomically (temp file + rename), so a reader never sees half a CRL.
fn write_replace(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, contents, 0o644)?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_err(path))
}

/// A random positive 16-byte serial.
fn random_serial() -> SerialNumber {
    use rand_core::RngCore;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

fn ca_params(
    trust_domain: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ringfence");
    // A random suffix keeps two CAs of one trust domain apart by name
    // (rotation bundles hold both; webpki finds issuers by name).
    let tag = hex::encode(&random_serial().to_bytes()[..4]);
    dn.push(
        DnType::CommonName,
        format!("ringfence CA {trust_domain} {tag}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    params
}

/// What a leaf certificate should look like. Defaults are a well-formed
/// fleet certificate; the other knobs exist to make bad ones for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafSpec {
    /// The role in the SPIFFE id.
    pub role: Role,
    /// Host id or principal name.
    pub name: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Trust domain in the URI SAN; `None` = the CA's own.
    pub trust_domain: Option<String>,
    /// A second URI SAN (breaks the "exactly one" rule).
    pub extra_uri: Option<String>,
    /// Mark the leaf CA:TRUE (breaks the "leaf not a CA" rule).
    pub is_ca: bool,
    /// DNS SANs; `None` = hosts get `DNS:<name>`, others none.
    pub dns_names: Option<Vec<String>>,
}

impl LeafSpec {
    /// A normal certificate valid from 5 minutes ago for `days` days.
    pub fn new(role: Role, name: &str, days: u64) -> Self {
        let now = crate::time::system_time();
        Self {
            role,
            name: name.to_string(),
            not_before: now - Duration::from_secs(300),
            not_after: now + DAY * days as u32,
            trust_domain: None,
            extra_uri: None,
            is_ca: false,
            dns_names: None,
        }
    }
}

/// A freshly issued certificate and key in PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedPem {
    /// The SPIFFE id in the certificate.
    pub id: SpiffeId,
    /// Certificate PEM (leaf only).
    pub cert_pem: String,
    /// PKCS#8 private key PEM.
    pub key_pem: String,
    /// Serial, lowercase hex.
    pub serial: String,
}

impl std::fmt::Debug for IssuedPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedPem")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

fn issue_leaf(
    issuer: &Issuer<'_, KeyPair>,
    ca_trust_domain: &str,
    spec: &LeafSpec,
) -> Result<IssuedPem, PkiError> {
    let td = spec.trust_domain.as_deref().unwrap_or(ca_trust_domain);
    let id = SpiffeId::new(td, spec.role, &spec.name)?;
    let what = format!("issue a certificate for {id}");
    let ia5 = |s: String| rcgen::string::Ia5String::try_from(s).map_err(rcgen_err(what.clone()));

    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ringfence");
    dn.push(DnType::CommonName, spec.name.clone());
    params.distinguished_name = dn;
    let mut sans = Vec::new();
    match &spec.dns_names {
        Some(names) => {
            for n in names {
                sans.push(SanType::DnsName(ia5(n.clone())?));
            }
        }
        None if spec.role == Role::Host => sans.push(SanType::DnsName(ia5(spec.name.clone())?)),
        None => {}
    }
    sans.push(SanType::URI(ia5(id.to_string())?));
    if let Some(extra) = &spec.extra_uri {
        sans.push(SanType::URI(ia5(extra.clone())?));
    }
    params.subject_alt_names = sans;
    if spec.is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
    } else {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = spec.not_before.into();
    params.not_after = spec.not_after.into();
    let serial = random_serial();
    params.serial_number = Some(serial.clone());

    let key = KeyPair::generate().map_err(rcgen_err(what.clone()))?;
    let cert = params.signed_by(&key, issuer).map_err(rcgen_err(what))?;
    Ok(IssuedPem {
        id,
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        serial: hex::encode(serial.to_bytes()),
    })
}

fn crl_pem(
    issuer: &Issuer<'_, KeyPair>,
    revoked: &[(String, SystemTime)],
    this_update: SystemTime,
    next_update: SystemTime,
) -> Result<String, PkiError> {
    let mut revoked_certs = Vec::new();
    for (serial, at) in revoked {
        let bytes = hex::decode(serial).map_err(|e| PkiError::Invalid {
            path: PathBuf::from(REVOKED),
            reason: format!("serial `{serial}` is not hex: {e}"),
        })?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: (*at).into(),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let crl_number = this_update
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(1)
        .max(1);
    let params = CertificateRevocationListParams {
        this_update: this_update.into(),
        next_update: next_update.into(),
        crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params
        .signed_by(issuer)
        .map_err(rcgen_err("sign the CRL"))?;
    crl.pem().map_err(rcgen_err("encode the CRL"))
}

// --------------------------------------------------------------- on disk

/// What [`init`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// `ca.pem`.
    pub cert: PathBuf,
    /// `ca.key`.
    pub key: PathBuf,
}

/// Create a CA in `dir` (created if missing) for `trust_domain`. Refuses to
/// overwrite an existing CA.
pub fn init(dir: &Path, trust_domain: &str) -> Result<CaFiles, PkiError> {
    // Validates the trust domain with the same rules as every SPIFFE id.
    SpiffeId::new(trust_domain, Role::Ops, "ca")?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    let now = crate::time::system_time();
    let params = ca_params(
        trust_domain,
        now - Duration::from_secs(3600),
        now + DAY * CA_VALIDITY_DAYS as u32,
    );
    let key = KeyPair::generate().map_err(rcgen_err("generate the CA key"))?;
    let cert = params
        .self_signed(&key)
        .map_err(rcgen_err("self-sign the CA"))?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join(TRUST_DOMAIN),
        format!("{trust_domain}\n").as_bytes(),
        0o644,
    )?;
    Ok(CaFiles {
        cert: cert_path,
        key: key_path,
    })
}

/// A CA loaded from its directory.
struct DiskCa {
    issuer: Issuer<'static, KeyPair>,
    trust_domain: String,
    cert_der: Vec<u8>,
}

fn load_ca(dir: &Path) -> Result<DiskCa, PkiError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    let td_path = dir.join(TRUST_DOMAIN);
    let cert_pem = read_text(&cert_path)?;
    let key_pem = read_text(&key_path)?;
    let trust_domain = read_text(&td_path)?.trim().to_string();
    SpiffeId::new(&trust_domain, Role::Ops, "ca").map_err(|e| PkiError::Invalid {
        path: td_path.clone(),
        reason: e.to_string(),
    })?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Invalid {
        path: key_path,
        reason: e.to_string(),
    })?;
    let invalid = |reason: String| PkiError::Invalid {
        path: cert_path.clone(),
        reason,
    };
    let cert_der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
        .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid(e.to_string()))?;
    Ok(DiskCa {
        issuer,
        trust_domain,
        cert_der,
    })
}

/// What [`issue`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedFiles {
    /// `<role>-<name>.pem`.
    pub cert: PathBuf,
    /// `<role>-<name>.key` (0600).
    pub key: PathBuf,
    /// The SPIFFE id in the certificate.
    pub id: SpiffeId,
    /// Serial, lowercase hex.
    pub serial: String,
}

/// Issue a certificate for `role`/`name` from the CA in `ca_dir`, writing
/// `<role>-<name>.pem` and `<role>-<name>.key` (0600) into `out_dir`.
/// Hosts get `DNS:<name>` and the URI SAN; ops and schedulers only the URI SAN.
pub fn issue(
    ca_dir: &Path,
    role: Role,
    name: &str,
    out_dir: &Path,
    validity_days: u64,
) -> Result<IssuedFiles, PkiError> {
    if validity_days == 0 {
        return Err(PkiError::Validity(validity_days));
    }
    let ca = load_ca(ca_dir)?;
    let issued = issue_leaf(
        &ca.issuer,
        &ca.trust_domain,
        &LeafSpec::new(role, name, validity_days),
    )?;
    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let base = format!("{}-{}", role.as_str(), name);
    let cert = out_dir.join(format!("{base}.pem"));
    let key = out_dir.join(format!("{base}.key"));
    for p in [&cert, &key] {
        if p.exists() {
            return Err(PkiError::Exists { path: p.clone() });
        }
    }
    write_new(&key, issued.key_pem.as_bytes(), 0o600)?;
    write_new(&cert, issued.cert_pem.as_bytes(), 0o644)?;
    Ok(IssuedFiles {
        cert,
        key,
        id: issued.id,
        serial: issued.serial,
    })
}

/// What [`revoke`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The revoked serial, lowercase hex.
    pub serial: String,
    /// `crl.pem` in the CA dir.
    pub crl: PathBuf,
    /// How many serials the CRL now lists.
    pub count: usize,
}

/// Revoke the certificate at `cert_path` (must be issued by the CA in
/// `ca_dir`) and rewrite `crl.pem`, valid for `next_update_days`.
pub fn revoke(ca_dir: &Path, cert_path: &Path, next_update_days: u64) -> Result<Revoked, PkiError> {
    if next_update_days == 0 {
        return Err(PkiError::Validity(next_update_days));
    }
    let ca = load_ca(ca_dir)?;
    let pem = read_text(cert_path)?;
    let invalid = |reason: String| PkiError::Invalid {
        path: cert_path.to_path_buf(),
        reason,
    };
    let der: rustls::pki_types::CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
            .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| invalid(e.to_string()))?;
    let (_, ca_cert) = X509Certificate::from_der(&ca.cert_der).map_err(|e| PkiError::Invalid {
        path: ca_dir.join(CA_CERT),
        reason: e.to_string(),
    })?;
    if !signed_by(&der, &ca.cert_der, &cert) {
        return Err(invalid(format!(
            "was issued by `{}`, not by this CA (`{}`): its signature does not verify",
            cert.issuer(),
            ca_cert.subject()
        )));
    }
    let serial = hex::encode(cert.tbs_certificate.raw_serial());
    let subject = crate::tls::cert_identity(&der, &ca.trust_domain)
        .map(|c| c.id.to_string())
        .unwrap_or_else(|_| "-".to_string());

    let list_path = ca_dir.join(REVOKED);
    let mut entries = read_revoked(&list_path)?;
    let now = crate::time::system_time();
    if !entries.iter().any(|(s, _)| *s == serial) {
        entries.push((serial.clone(), now));
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&list_path)
            .map_err(io_err(&list_path))?;
        writeln!(f, "{serial} {secs} {subject}").map_err(io_err(&list_path))?;
        f.sync_all().map_err(io_err(&list_path))?;
    }
    let crl = crl_pem(
        &ca.issuer,
        &entries,
        now - Duration::from_secs(60),
        now + DAY * next_update_days as u32,
    )?;
    let crl_path = ca_dir.join(CRL);
    write_replace(&crl_path, crl.as_bytes())?;
    Ok(Revoked {
        serial,
        crl: crl_path,
        count: entries.len(),
    })
}

/// Whether `der` chains directly to the CA certificate `ca_der`. Checked at
/// the leaf's own notBefore, so an expired certificate can still be revoked.
fn signed_by(der: &[u8], ca_der: &[u8], cert: &X509Certificate<'_>) -> bool {
    use rustls::pki_types::{CertificateDer, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    if roots.add(CertificateDer::from(ca_der.to_vec())).is_err() {
        return false;
    }
    let leaf = CertificateDer::from(der.to_vec());
    let Ok(parsed) = rustls::server::ParsedCertificate::try_from(&leaf) else {
        return false;
    };
    let at = cert.validity().not_before.timestamp().max(0) as u64 + 1;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &[],
        UnixTime::since_unix_epoch(Duration::from_secs(at)),
        algs.all,
    )
    .is_ok()
}

fn read_revoked(path: &Path) -> Result<Vec<(String, SystemTime)>, PkiError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let serial = parts.next().unwrap_or_default();
        let secs = parts.next().and_then(|s| s.parse::<u64>().ok());
        let (Some(secs), true) = (secs, hex::decode(serial).is_ok()) else {
            return Err(PkiError::Invalid {
                path: path.to_path_buf(),
                reason: format!(
                    "line {}: expected `<serial-hex> <unix-seconds> [id]`",
                    i + 1
                ),
            });
        };
        out.push((
            serial.to_lowercase(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        ));
    }
    Ok(out)
}

// -------------------------------------------------------------- in memory

/// An in-memory CA for tests, the demo and the benchmarks.
pub struct TestPki {
    issuer: Issuer<'static, KeyPair>,
    /// The trust anchor (the root, also for an intermediate's TestPki).
    ca_pem: String,
    trust_domain: String,
    /// PEM of the CA certificates between the leaves and the root
    /// (empty for the root itself); appended to every issued certificate.
    chain_pem: String,
    /// Serial of this CA's own certificate, lowercase hex.
    ca_serial: String,
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl TestPki {
    /// A new CA for `trust_domain`, valid for ten years.
    pub fn new(trust_domain: &str) -> Result<Self, PkiError> {
        SpiffeId::new(trust_domain, Role::Ops, "ca")?;
        let now = crate::time::system_time();
        let mut params = ca_params(
            trust_domain,
            now - Duration::from_secs(3600),
            now + DAY * CA_VALIDITY_DAYS as u32,
        );
        // Room for one intermediate CA below (see `intermediate`).
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        let ca_serial = serial_hex(&params);
        let key = KeyPair::generate().map_err(rcgen_err("generate the CA key"))?;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("self-sign the CA"))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            ca_pem: cert.pem(),
            trust_domain: trust_domain.to_string(),
            chain_pem: String::new(),
            ca_serial,
        })
    }

    /// An intermediate CA signed by this one. Certificates it issues carry
    /// the intermediate in their PEM chain; [`ca_pem`](Self::ca_pem) stays
    /// the root (the bundle peers trust). Revoke it with this CA's
    /// [`crl_serials`](Self::crl_serials) and [`ca_serial`](Self::ca_serial)
    /// of the intermediate.
    pub fn intermediate(&self) -> Result<TestPki, PkiError> {
        let now = crate::time::system_time();
        let mut params = ca_params(
            &self.trust_domain,
            now - Duration::from_secs(3600),
            now + DAY * 365,
        );
        params.use_authority_key_identifier_extension = true;
        let ca_serial = serial_hex(&params);
        let key = KeyPair::generate().map_err(rcgen_err("generate the intermediate key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err("sign the intermediate CA"))?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            ca_pem: self.ca_pem.clone(),
            trust_domain: self.trust_domain.clone(),
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            ca_serial,
        })
    }

    /// The serial of this CA's own certificate, lowercase hex.
    pub fn ca_serial(&self) -> &str {
        &self.ca_serial
    }

    /// The CA certificate PEM (the CA bundle).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// A normal certificate for `role`/`name`, valid 30 days.
    pub fn issue(&self, role: Role, name: &str) -> Result<IssuedPem, PkiError> {
        self.issue_spec(&LeafSpec::new(role, name, 30))
    }

    /// A certificate shaped by `spec` (expired, two URI SANs, CA:TRUE, other trust domain…).
    pub fn issue_spec(&self, spec: &LeafSpec) -> Result<IssuedPem, PkiError> {
        let mut issued = issue_leaf(&self.issuer, &self.trust_domain, spec)?;
        issued.cert_pem.push_str(&self.chain_pem);
        Ok(issued)
    }

    /// A CRL of this CA revoking the given serials (lowercase hex), e.g. an
    /// intermediate's [`ca_serial`](Self::ca_serial).
    pub fn crl_serials(
        &self,
        serials: &[&str],
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<String, PkiError> {
        let entries: Vec<(String, SystemTime)> = serials
            .iter()
            .map(|s| (s.to_string(), this_update))
            .collect();
        crl_pem(&self.issuer, &entries, this_update, next_update)
    }

    /// A correctly signed CRL of this CA that has no nextUpdate field (such
    /// a CRL never goes stale, so ringfence refuses it).
    pub fn crl_without_next_update(&self, revoked: &[&IssuedPem]) -> Result<String, PkiError> {
        use base64::Engine;
        use rcgen::SigningKey;
        let pem = self.fresh_crl(revoked)?;
        let bad = |reason: &str| PkiError::Invalid {
            path: PathBuf::from("(in-memory CRL)"),
            reason: reason.to_string(),
        };
        let der: rustls::pki_types::CertificateRevocationListDer<'static> =
            rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
                .map_err(|e| bad(&e.to_string()))?;
        let outer = der_items(der_content(&der).ok_or_else(|| bad("outer SEQUENCE"))?)
            .ok_or_else(|| bad("CertificateList"))?;
        let [tbs, sig_alg, _sig] = outer.as_slice() else {
            return Err(bad("CertificateList must have 3 fields"));
        };
        let fields = der_items(der_content(tbs).ok_or_else(|| bad("tbsCertList"))?)
            .ok_or_else(|| bad("tbsCertList fields"))?;
        // version, signature, issuer, thisUpdate, [nextUpdate], ...: drop
        // the second time (UTCTime 0x17 / GeneralizedTime 0x18).
        let mut times = 0;
        let mut body = Vec::new();
        for f in fields {
            if matches!(f.first(), Some(0x17 | 0x18)) {
                times += 1;
                if times == 2 {
                    continue;
                }
            }
            body.extend_from_slice(f);
        }
        let tbs = der_tlv(0x30, &body);
        let sig = self
            .issuer
            .key()
            .sign(&tbs)
            .map_err(rcgen_err("sign the CRL"))?;
        let mut bits = vec![0u8];
        bits.extend_from_slice(&sig);
        let mut list = tbs;
        list.extend_from_slice(sig_alg);
        list.extend_from_slice(&der_tlv(0x03, &bits));
        let out = der_tlv(0x30, &list);
        let b64 = base64::engine::general_purpose::STANDARD.encode(out);
        let mut text = String::from("-----BEGIN X509 CRL-----\n");
        for line in b64.as_bytes().chunks(64) {
            text.push_str(&String::from_utf8_lossy(line));
            text.push('\n');
        }
        text.push_str("-----END X509 CRL-----\n");
        Ok(text)
    }

    /// A CRL PEM revoking `revoked`, with the given update times.
    pub fn crl(
        &self,
        revoked: &[&IssuedPem],
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<String, PkiError> {
        let entries: Vec<(String, SystemTime)> = revoked
            .iter()
            .map(|i| (i.serial.clone(), this_update))
            .collect();
        crl_pem(&self.issuer, &entries, this_update, next_update)
    }

    /// A CRL valid from a minute ago for a week.
    pub fn fresh_crl(&self, revoked: &[&IssuedPem]) -> Result<String, PkiError> {
        let now = crate::time::system_time();
        self.crl(revoked, now - Duration::from_secs(60), now + DAY * 7)
    }
}

fn serial_hex(params: &CertificateParams) -> String {
    params
        .serial_number
        .as_ref()
        .map(|s| hex::encode(s.to_bytes()))
        .unwrap_or_default()
}

/// The content of one DER TLV (which must span all of `tlv`).
fn der_content(tlv: &[u8]) -> Option<&[u8]> {
    let (hdr, len) = der_header(tlv)?;
    (hdr + len == tlv.len()).then(|| &tlv[hdr..])
}

/// Header length and content length of the TLV at the start of `b`.
fn der_header(b: &[u8]) -> Option<(usize, usize)> {
    let first = *b.get(1)?;
    if first < 0x80 {
        return Some((2, usize::from(first)));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return None;
    }
    let mut len = 0usize;
    for i in 0..n {
        len = (len << 8) | usize::from(*b.get(2 + i)?);
    }
    Some((2 + n, len))
}

/// The whole TLVs (header included) one after another in `content`.
fn der_items(mut content: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let (hdr, len) = der_header(content)?;
        let end = hdr.checked_add(len)?;
        if end > content.len() {
            return None;
        }
        out.push(&content[..end]);
        content = &content[end..];
    }
    Some(out)
}

/// Encode one DER TLV.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}
