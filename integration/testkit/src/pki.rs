//! A host's mTLS files from a throwaway CA ([`TestPki`]): the CA bundle, the
//! host certificate and its key (0600), each replaced by rename so that a
//! reloading agent never reads half a file; and client identities of
//! certificates the same CA issued.

use std::path::Path;

use ringfence::pki::{IssuedPem, TestPki};
use ringfence::tls::{ClientIdentity, ServerTlsPaths};

use crate::FixtureError;

/// The TLS files of an agent whose files all live in `dir`:
/// `host.pem`, `host.key`, `ca.pem`, no CRL.
pub fn host_tls_paths(dir: &Path) -> ServerTlsPaths {
    ServerTlsPaths {
        cert: dir.join("host.pem"),
        key: dir.join("host.key"),
        ca_bundle: dir.join("ca.pem"),
        crl: None,
    }
}

/// Write `pki`'s CA certificate to `paths.ca_bundle` and `cert` as the
/// host certificate and key.
pub fn write_host_files(
    paths: &ServerTlsPaths,
    pki: &TestPki,
    cert: &IssuedPem,
) -> Result<(), FixtureError> {
    crate::write(&paths.ca_bundle, pki.ca_pem())?;
    write_host_cert(paths, cert)
}

/// Replace the host certificate and key with `cert`: the key first, then
/// the certificate, each by rename.
pub fn write_host_cert(paths: &ServerTlsPaths, cert: &IssuedPem) -> Result<(), FixtureError> {
    crate::write_private(&paths.key, &cert.key_pem)?;
    crate::replace(&paths.cert, &cert.cert_pem)
}

/// The mTLS client identity of `who`, a certificate `pki` issued.
pub fn identity(pki: &TestPki, who: &IssuedPem) -> Result<ClientIdentity, FixtureError> {
    Ok(ClientIdentity::from_pem(
        who.cert_pem.as_bytes(),
        who.key_pem.as_bytes(),
        pki.ca_pem().as_bytes(),
    )?)
}
