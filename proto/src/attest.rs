//! Health attestations: a host's signed statement about its own health,
//! bound to the verifier's fresh nonce.

use ed25519_dalek::SigningKey;
use prost::Message;

use crate::envelope::{self, ATTESTATION_TYPE, NONCE_LEN, SingleKeyError};
use crate::keys::VerifyingKey;
use crate::pb;

/// Largest attestation payload accepted (a report of many GPUs), bytes.
pub const MAX_ATTESTATION_PAYLOAD: usize = 1024 * 1024;

/// Sign an attestation with the host key.
pub fn sign(att: &pb::Attestation, key_id: &str, key: &SigningKey) -> pb::Envelope {
    envelope::sign_message(ATTESTATION_TYPE, att, &[(key_id, key)])
}

/// What a host states about itself, bound to a verifier's nonce: the
/// attestation of `report` by `host_id` at `issued_at_ms`, made by this
/// version of ringfence. Its boot id and verdict are the report's, so
/// [`verify`] finds them consistent.
pub fn statement(
    host_id: &str,
    nonce: &[u8],
    issued_at_ms: i64,
    report: pb::HealthReport,
) -> pb::Attestation {
    pb::Attestation {
        host_id: host_id.to_string(),
        boot_id: report.boot_id.clone(),
        nonce: nonce.to_vec(),
        issued_at_unix_ms: issued_at_ms,
        verdict: report.verdict,
        agent_version: crate::VERSION.to_string(),
        report: Some(report),
    }
}

/// Attest `report`: the [`statement`] of `host_id`, signed with the host
/// key under the key id `host_id`. The one builder of attestations, for the
/// agent and for every simulated host.
pub fn attest(
    host_id: &str,
    key: &SigningKey,
    nonce: &[u8],
    issued_at_ms: i64,
    report: pb::HealthReport,
) -> pb::Envelope {
    sign(
        &statement(host_id, nonce, issued_at_ms, report),
        host_id,
        key,
    )
}

/// The name of a verdict value, as attestations are shown and recorded
/// (HEALTHY, DEGRADED, UNHEALTHY; UNSPECIFIED for any other value).
pub fn verdict_name(v: i32) -> &'static str {
    match pb::Verdict::try_from(v) {
        Ok(pb::Verdict::Healthy) => "HEALTHY",
        Ok(pb::Verdict::Degraded) => "DEGRADED",
        Ok(pb::Verdict::Unhealthy) => "UNHEALTHY",
        _ => "UNSPECIFIED",
    }
}

/// What a verifier expects of an attestation.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The host's enrolled attestation key.
    pub key: &'a VerifyingKey,
    /// The host id the attestation must name.
    pub host_id: &'a str,
    /// The nonce the verifier sent.
    pub nonce: &'a [u8],
    /// Now, ms since the Unix epoch.
    pub now_ms: i64,
    /// Oldest acceptable attestation, ms.
    pub max_age_ms: i64,
    /// Tolerated clock skew into the future, ms.
    pub max_skew_ms: i64,
}

/// An attestation did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// the envelope's signature, type or size is wrong
    #[error("attestation envelope: {0}")]
    Envelope(#[from] SingleKeyError),
    /// the payload is not an attestation
    #[error("attestation payload does not decode: {0}")]
    Malformed(String),
    /// the attestation names another host
    #[error("attestation is for host `{got}`, expected `{want}`")]
    WrongHost {
        /// the host the attestation names
        got: String,
        /// the host the verifier asked
        want: String,
    },
    /// the nonce is not the one the verifier sent
    #[error("attestation nonce does not match the nonce sent")]
    WrongNonce,
    /// the attestation is older than allowed
    #[error("attestation is {age_ms} ms old, limit {max_age_ms} ms")]
    Stale {
        /// how old the attestation is
        age_ms: i64,
        /// the oldest the verifier accepts
        max_age_ms: i64,
    },
    /// the attestation claims a time in the future
    #[error("attestation is dated {ahead_ms} ms in the future")]
    FromFuture {
        /// how far past the verifier's clock it is dated
        ahead_ms: i64,
    },
    /// the embedded report disagrees with the attestation
    #[error("embedded report disagrees with the attestation: {0}")]
    Inconsistent(String),
}

/// A fresh random nonce of 32 bytes.
pub fn new_nonce() -> Vec<u8> {
    use rand_core::RngCore;
    let mut n = vec![0u8; 32];
    rand_core::OsRng.fill_bytes(&mut n);
    n
}

/// Check the nonce length an agent accepts.
pub fn nonce_ok(nonce: &[u8]) -> bool {
    NONCE_LEN.contains(&nonce.len())
}

/// Verify an attestation envelope: signature by the enrolled key, host,
/// nonce, freshness, and that the embedded report agrees.
pub fn verify(env: &pb::Envelope, expect: &Expect<'_>) -> Result<pb::Attestation, AttestError> {
    let payload =
        envelope::verify_single(env, ATTESTATION_TYPE, expect.key, MAX_ATTESTATION_PAYLOAD)?;
    let att =
        pb::Attestation::decode(payload).map_err(|e| AttestError::Malformed(e.to_string()))?;
    if att.host_id != expect.host_id {
        return Err(AttestError::WrongHost {
            got: att.host_id,
            want: expect.host_id.to_string(),
        });
    }
    if att.nonce != expect.nonce {
        return Err(AttestError::WrongNonce);
    }
    let age = expect.now_ms - att.issued_at_unix_ms;
    if age > expect.max_age_ms {
        return Err(AttestError::Stale {
            age_ms: age,
            max_age_ms: expect.max_age_ms,
        });
    }
    if -age > expect.max_skew_ms {
        return Err(AttestError::FromFuture { ahead_ms: -age });
    }
    let report = att
        .report
        .as_ref()
        .ok_or_else(|| AttestError::Inconsistent("no report".into()))?;
    if report.host_id != att.host_id {
        return Err(AttestError::Inconsistent(format!(
            "report host `{}`",
            report.host_id
        )));
    }
    if report.verdict != att.verdict {
        return Err(AttestError::Inconsistent("report verdict differs".into()));
    }
    if report.boot_id != att.boot_id {
        return Err(AttestError::Inconsistent("report boot id differs".into()));
    }
    Ok(att)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::keys;

    fn attestation(nonce: &[u8], at: i64) -> pb::Attestation {
        pb::Attestation {
            host_id: "gpu-1".into(),
            boot_id: "boot-a".into(),
            nonce: nonce.to_vec(),
            issued_at_unix_ms: at,
            verdict: pb::Verdict::Healthy as i32,
            report: Some(pb::HealthReport {
                host_id: "gpu-1".into(),
                boot_id: "boot-a".into(),
                verdict: pb::Verdict::Healthy as i32,
                driver_version: "550.54.15".into(),
                ..Default::default()
            }),
            agent_version: "0.1.0".into(),
        }
    }

    fn expect<'a>(key: &'a VerifyingKey, nonce: &'a [u8], now: i64) -> Expect<'a> {
        Expect {
            key,
            host_id: "gpu-1",
            nonce,
            now_ms: now,
            max_age_ms: 60_000,
            max_skew_ms: 5_000,
        }
    }

    #[test]
    fn valid_attestation_verifies() {
        let k = keys::generate();
        let vk = k.verifying_key();
        let nonce = new_nonce();
        let env = sign(&attestation(&nonce, 1_000_000), "gpu-1", &k);
        let att = verify(&env, &expect(&vk, &nonce, 1_000_500)).unwrap();
        assert_eq!(att.host_id, "gpu-1");
    }

    #[test]
    fn wrong_nonce_other_key_stale_and_changed_bytes_fail() {
        let k = keys::generate();
        let vk = k.verifying_key();
        let nonce = new_nonce();
        let env = sign(&attestation(&nonce, 1_000_000), "gpu-1", &k);

        let other = new_nonce();
        assert_eq!(
            verify(&env, &expect(&vk, &other, 1_000_000)),
            Err(AttestError::WrongNonce)
        );

        let other_key = keys::generate().verifying_key();
        assert!(matches!(
            verify(&env, &expect(&other_key, &nonce, 1_000_000)),
            Err(AttestError::Envelope(SingleKeyError::BadSignature { .. }))
        ));

        assert!(matches!(
            verify(&env, &expect(&vk, &nonce, 1_000_000 + 61_000)),
            Err(AttestError::Stale { .. })
        ));

        for i in 0..env.payload.len() {
            let mut bad = env.clone();
            bad.payload[i] ^= 0x01;
            assert!(
                verify(&bad, &expect(&vk, &nonce, 1_000_000)).is_err(),
                "byte {i}"
            );
        }
        let mut bad = env.clone();
        bad.signatures[0].sig[10] ^= 0x80;
        assert!(verify(&bad, &expect(&vk, &nonce, 1_000_000)).is_err());
    }

    #[test]
    fn built_attestation_verifies_and_carries_the_report() {
        let k = keys::generate();
        let vk = k.verifying_key();
        let nonce = new_nonce();
        let report = attestation(&nonce, 0).report.unwrap();
        let env = attest("gpu-1", &k, &nonce, 1_000_000, report.clone());
        assert_eq!(env.signatures[0].key_id, "gpu-1");
        let att = verify(&env, &expect(&vk, &nonce, 1_000_100)).unwrap();
        assert_eq!(att.issued_at_unix_ms, 1_000_000);
        assert_eq!(att.boot_id, report.boot_id);
        assert_eq!(att.verdict, report.verdict);
        assert_eq!(att.agent_version, crate::VERSION);
        assert_eq!(att.report, Some(report));
    }

    #[test]
    fn attestation_for_another_host_fails() {
        let k = keys::generate();
        let vk = k.verifying_key();
        let nonce = new_nonce();
        let env = sign(&attestation(&nonce, 1_000_000), "gpu-1", &k);
        let mut e = expect(&vk, &nonce, 1_000_000);
        e.host_id = "gpu-2";
        assert!(matches!(
            verify(&env, &e),
            Err(AttestError::WrongHost { .. })
        ));
    }
}
