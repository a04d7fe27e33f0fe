//! Process-wide counts of what a ringfence server refused: TLS handshakes
//! that failed (by reason), and signed tasks rejected (by the name of the
//! failed check, whether the transport refused them before decoding or the
//! verifier after). Plain atomics and a small map, no metrics library: the
//! agent exports these counts as Prometheus series (`ringfenced`'s `metrics`
//! module), and every other process that serves mTLS merely counts.
//!
//! Counts only grow, from zero at process start.

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::CertificateError;

/// Why a TLS handshake of a server failed. Bounded: one label value each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HandshakeFailure {
    /// The client did not finish the handshake in time.
    Timeout,
    /// The client presented no certificate.
    NoClientCertificate,
    /// The client's certificate does not chain to the CA bundle.
    UnknownCa,
    /// The client's certificate (or a CA above it) is revoked by the CRL,
    /// or its revocation status is unknown to the CRLs.
    Revoked,
    /// The client's certificate is expired or not yet valid.
    Expired,
    /// Any other certificate problem, the SPIFFE rules included.
    BadCertificate,
    /// The client aborted with a TLS alert (it refused our certificate).
    PeerAlert,
    /// Not TLS, or TLS the server does not speak (version, ALPN, garbage).
    Protocol,
    /// The connection failed underneath TLS (reset, early close).
    Io,
}

impl HandshakeFailure {
    /// Every reason, in label order.
    pub const ALL: [Self; 9] = [
        Self::Timeout,
        Self::NoClientCertificate,
        Self::UnknownCa,
        Self::Revoked,
        Self::Expired,
        Self::BadCertificate,
        Self::PeerAlert,
        Self::Protocol,
        Self::Io,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NoClientCertificate => "no_client_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::BadCertificate => "bad_certificate",
            Self::PeerAlert => "peer_alert",
            Self::Protocol => "protocol",
            Self::Io => "io",
        }
    }

    /// The reason of a failed `tokio_rustls` accept (rustls errors travel
    /// inside the `io::Error`).
    pub fn classify(e: &io::Error) -> Self {
        let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return Self::Io;
        };
        match tls {
            rustls::Error::NoCertificatesPresented => Self::NoClientCertificate,
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Self::UnknownCa,
                CertificateError::Revoked | CertificateError::UnknownRevocationStatus => {
                    Self::Revoked
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Self::Expired,
                _ => Self::BadCertificate,
            },
            rustls::Error::AlertReceived(_) => Self::PeerAlert,
            _ => Self::Protocol,
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

static HANDSHAKES: [AtomicU64; HandshakeFailure::ALL.len()] =
    [const { AtomicU64::new(0) }; HandshakeFailure::ALL.len()];

static TASKS: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Count one failed handshake.
pub fn handshake_failed(reason: HandshakeFailure) {
    HANDSHAKES[reason.slot()].fetch_add(1, Ordering::Relaxed);
}

/// Failed handshakes so far, for every reason (zeros included).
pub fn handshake_failures() -> [(HandshakeFailure, u64); HandshakeFailure::ALL.len()] {
    HandshakeFailure::ALL.map(|r| (r, HANDSHAKES[r.slot()].load(Ordering::Relaxed)))
}

/// The check names a task can be rejected by (`TaskRejection::check`,
/// and `size` / `decode` of the transport). Counted from zero so that a
/// first rejection is an increase.
pub const TASK_CHECKS: &[&str] = &[
    "size",
    "decode",
    "payload_type",
    "signature",
    "unknown_key",
    "revoked_key",
    "coordinator_signature",
    "approval_type",
    "coordinator_as_approver",
    "approval_scope",
    "approval_lifetime",
    "approval_expired",
    "approval_threshold",
    "host",
    "ring",
    "not_yet_valid",
    "expired",
    "lifetime",
    "sequence",
    "sequence_jump",
    "before_journal",
    "action",
    "journal",
];

/// Count one task rejected by `check`.
pub fn task_rejected(check: &'static str) {
    let mut tasks = TASKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *tasks.entry(check).or_insert(0) += 1;
}

/// Tasks rejected so far by check name: every name of [`TASK_CHECKS`]
/// (zeros included) and any other name that was counted.
pub fn task_rejections() -> BTreeMap<&'static str, u64> {
    let mut all: BTreeMap<&'static str, u64> = TASK_CHECKS.iter().map(|c| (*c, 0)).collect();
    let tasks = TASKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (check, n) in tasks.iter() {
        all.insert(check, *n);
    }
    all
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tls_error(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn rustls_errors_are_classified() {
        use HandshakeFailure as H;
        let cases = [
            (
                rustls::Error::NoCertificatesPresented,
                H::NoClientCertificate,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                H::UnknownCa,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Revoked),
                H::Revoked,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                H::Expired,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                H::BadCertificate,
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
                H::PeerAlert,
            ),
            (rustls::Error::DecryptError, H::Protocol),
        ];
        for (err, want) in cases {
            let shown = err.to_string();
            assert_eq!(H::classify(&tls_error(err)), want, "{shown}");
        }
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(H::classify(&eof), H::Io);
    }

    #[test]
    fn counts_grow_and_list_every_reason_and_check() {
        let before = handshake_failures();
        handshake_failed(HandshakeFailure::UnknownCa);
        let after = handshake_failures();
        assert_eq!(after.len(), HandshakeFailure::ALL.len());
        let idx = HandshakeFailure::UnknownCa.slot();
        assert!(after[idx].1 > before[idx].1);

        let before = task_rejections()["sequence"];
        task_rejected("sequence");
        let all = task_rejections();
        assert!(all["sequence"] > before);
        for check in TASK_CHECKS {
            assert!(all.contains_key(check), "{check} missing");
        }
    }

    /// Every name `TaskRejection::check` can return is pre-counted, so a
    /// first rejection by a new check is not missed by `increase()`.
    #[test]
    fn task_checks_list_every_check_of_the_verifier() {
        let src = include_str!("envelope.rs");
        let start = src.find("pub fn check(&self) -> &'static str").unwrap();
        let body = &src[start..];
        let body = &body[..body.find("\n    }\n").unwrap()];
        let mut found = 0;
        for line in body.lines() {
            if let Some((_, rest)) = line.split_once("=> \"") {
                let name = rest.split('"').next().unwrap();
                assert!(TASK_CHECKS.contains(&name), "`{name}` not in TASK_CHECKS");
                found += 1;
            }
        }
        assert!(found >= 20, "parsed only {found} checks from envelope.rs");
    }
}
