//! The append-only chain of a ring's packets: seal, write, the series
//! `ring-N.json`, `ring-N.1.json`, ... ([`append`]) and its check
//! ([`verify_chain`]).

use std::path::Path;

use ed25519_dalek::SigningKey;
use ringfence::envelope::{self, EVIDENCE_TYPE};

use super::EvidenceError;
use super::packet::Packet;
use crate::dsse::EnvelopeFile;

/// Sign a packet with the coordinator key and encode it as a packet file.
pub fn seal(packet: &Packet, key_id: &str, key: &SigningKey) -> Result<Vec<u8>, EvidenceError> {
    let payload =
        serde_json::to_vec(packet).map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    let env = envelope::sign(EVIDENCE_TYPE, payload, &[(key_id, key)]);
    serde_json::to_vec_pretty(&EnvelopeFile::from_envelope(&env))
        .map_err(|e| EvidenceError::Malformed(e.to_string()))
}

/// Write a sealed packet atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), EvidenceError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| EvidenceError::Io {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    crate::store::write_atomic(path, bytes).map_err(|e| EvidenceError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// The packet files of `ring` in `dir`, oldest first: `ring-N.json`, then
/// `ring-N.1.json`, `ring-N.2.json`, ... (up to the first number missing).
pub fn series(dir: &Path, ring: u32) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let first = dir.join(format!("ring-{ring}.json"));
    if !first.exists() {
        return out;
    }
    out.push(first);
    for k in 1.. {
        let p = dir.join(format!("ring-{ring}.{k}.json"));
        if !p.exists() {
            break;
        }
        out.push(p);
    }
    out
}

/// Seal `packet` and add it to its ring's series in `dir`, never replacing
/// a packet: the first is `ring-N.json`, a later one `ring-N.K.json`
/// naming the digest of the one before it. Returns the path written.
pub fn append(
    dir: &Path,
    mut packet: Packet,
    (key_id, key): (&str, &SigningKey),
) -> Result<std::path::PathBuf, EvidenceError> {
    let ring = packet.ring;
    let before = series(dir, ring);
    let path = match before.last() {
        None => dir.join(format!("ring-{ring}.json")),
        Some(last) => {
            let bytes = std::fs::read(last).map_err(|e| EvidenceError::Io {
                path: last.display().to_string(),
                reason: e.to_string(),
            })?;
            packet.previous = Some(crate::approvals::digest(&bytes));
            dir.join(format!("ring-{ring}.{}.json", before.len()))
        }
    };
    let bytes = seal(&packet, key_id, key)?;
    write(&path, &bytes)?;
    Ok(path)
}

/// Check the series of the ring of `packet` (any packet file of it): each
/// later packet names the digest of the file before it, the first names
/// none. Returns the series, oldest first. Signatures are checked by
/// [`verify_with`], packet by packet.
pub fn verify_chain(packet: &Path) -> Result<Vec<std::path::PathBuf>, EvidenceError> {
    let bytes = std::fs::read(packet).map_err(|e| EvidenceError::Io {
        path: packet.display().to_string(),
        reason: e.to_string(),
    })?;
    let ring = payload_of(&bytes)?.ring;
    let dir = packet.parent().unwrap_or(Path::new("."));
    let files = series(dir, ring);
    let mut prev: Option<String> = None;
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| EvidenceError::Io {
            path: f.display().to_string(),
            reason: e.to_string(),
        })?;
        let p = payload_of(&bytes).map_err(|e| EvidenceError::Chain {
            ring,
            reason: format!("{}: {e}", f.display()),
        })?;
        if p.previous != prev {
            return Err(EvidenceError::Chain {
                ring,
                reason: format!(
                    "{} names previous {} but the packet before it is {}: a packet was altered, removed or reordered",
                    f.display(),
                    p.previous.as_deref().unwrap_or("(none)"),
                    prev.as_deref().unwrap_or("(none)")
                ),
            });
        }
        prev = Some(crate::approvals::digest(&bytes));
    }
    Ok(files)
}

/// The packet inside a packet file, unverified (for the chain).
fn payload_of(bytes: &[u8]) -> Result<Packet, EvidenceError> {
    let file: EnvelopeFile =
        serde_json::from_slice(bytes).map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    let env = file
        .to_envelope()
        .map_err(|e| EvidenceError::Malformed(e.to_string()))?;
    serde_json::from_slice(&env.payload).map_err(|e| EvidenceError::Malformed(e.to_string()))
}
