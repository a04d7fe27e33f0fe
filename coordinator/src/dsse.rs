//! Signed envelopes as JSON files: the standard DSSE JSON form
//! (`{"payloadType", "payload", "signatures": [{"keyid", "sig"}]}`, payload
//! and signatures in standard base64) of the evidence packets and the
//! approval files ringfence writes. Files written before the switch used
//! `payload_type` / `key_id`; those names are still read.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ringfence::pb;
use serde::{Deserialize, Serialize};

/// An envelope as a JSON file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeFile {
    /// The envelope's payload type.
    #[serde(rename = "payloadType", alias = "payload_type")]
    pub payload_type: String,
    /// base64 of the payload bytes.
    pub payload: String,
    /// Signatures: key id and base64 signature.
    pub signatures: Vec<SignatureJson>,
}

/// A signature in a DSSE JSON envelope (`keyid` is optional in DSSE).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureJson {
    /// Key id hint.
    #[serde(rename = "keyid", alias = "key_id", default)]
    pub key_id: String,
    /// base64 ed25519 signature.
    pub sig: String,
}

/// A JSON envelope's payload or a signature is not base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is not base64: {reason}")]
pub struct DsseError {
    /// "payload" or "signature".
    pub what: &'static str,
    /// The decoder's error.
    pub reason: String,
}

impl EnvelopeFile {
    /// The JSON form of an envelope.
    pub fn from_envelope(env: &pb::Envelope) -> Self {
        Self {
            payload_type: env.payload_type.clone(),
            payload: B64.encode(&env.payload),
            signatures: env
                .signatures
                .iter()
                .map(|s| SignatureJson {
                    key_id: s.key_id.clone(),
                    sig: B64.encode(&s.sig),
                })
                .collect(),
        }
    }

    /// Back to an envelope.
    pub fn to_envelope(&self) -> Result<pb::Envelope, DsseError> {
        let bad = |what| {
            move |e: base64::DecodeError| DsseError {
                what,
                reason: e.to_string(),
            }
        };
        Ok(pb::Envelope {
            payload_type: self.payload_type.clone(),
            payload: B64.decode(&self.payload).map_err(bad("payload"))?,
            signatures: self
                .signatures
                .iter()
                .map(|s| {
                    Ok(pb::Signature {
                        key_id: s.key_id.clone(),
                        sig: B64.decode(&s.sig).map_err(bad("signature"))?,
                    })
                })
                .collect::<Result<_, DsseError>>()?,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn an_envelope_survives_the_json_form_and_old_names_read() {
        let env = pb::Envelope {
            payload_type: "t".into(),
            payload: vec![1, 2, 3],
            signatures: vec![pb::Signature {
                key_id: "k".into(),
                sig: vec![9; 64],
            }],
        };
        let json = serde_json::to_string(&EnvelopeFile::from_envelope(&env)).unwrap();
        assert!(
            json.contains("\"payloadType\"") && json.contains("\"keyid\""),
            "{json}"
        );
        let back: EnvelopeFile = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_envelope().unwrap(), env);
        let old = json
            .replace("payloadType", "payload_type")
            .replace("keyid", "key_id");
        let back: EnvelopeFile = serde_json::from_str(&old).unwrap();
        assert_eq!(back.to_envelope().unwrap(), env);
        let mut bad = back;
        bad.signatures[0].sig = "not base64!".into();
        assert_eq!(bad.to_envelope().unwrap_err().what, "signature");
    }
}
