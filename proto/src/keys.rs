//! ed25519 signing keys (coordinator, approver, host attestation keys).
//!
//! Formats, documented for operators and for any other DSSE/ed25519 tool:
//! - private key: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), file mode 0600;
//! - public key: the text `ed25519:` followed by standard base64 of the
//!   32 raw public key bytes, as written in trust files and inventories;
//! - fingerprint: `SHA256:` followed by lowercase hex of SHA-256 of those bytes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// The prefix of a public key in text form.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";

/// A key could not be read, written or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// the key file could not be read or written
    #[error("{path}: {source}")]
    Io {
        /// the key file
        path: PathBuf,
        /// the I/O error
        #[source]
        source: std::io::Error,
    },
    /// the private key file is not an ed25519 PKCS#8 PEM key
    #[error("{path}: not an ed25519 PKCS#8 PEM private key: {reason}")]
    BadPrivateKey {
        /// the key file
        path: PathBuf,
        /// what the PEM/PKCS#8 decoder said
        reason: String,
    },
    /// the private key file is readable by group or others
    #[error(
        "{path}: private key file has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    InsecureMode {
        /// the key file
        path: PathBuf,
        /// its permission bits
        mode: u32,
    },
    /// a public key is not `ed25519:` + base64 of 32 bytes
    #[error("public key `{text}` is not `ed25519:` followed by base64 of 32 bytes: {reason}")]
    BadPublicKey {
        /// the public key as given
        text: String,
        /// what is wrong with it
        reason: String,
    },
    /// a public key is of small order (weak): signatures by it prove nothing
    #[error("public key `{text}` is a weak (small-order) ed25519 key and is refused")]
    WeakPublicKey {
        /// the public key as given
        text: String,
    },
    /// refusing to overwrite an existing key file
    #[error("{path}: already exists; refusing to overwrite a key")]
    Exists {
        /// the key file that already exists
        path: PathBuf,
    },
}

/// A new random signing key from the OS random source.
pub fn generate() -> SigningKey {
    SigningKey::generate(&mut rand_core::OsRng)
}

/// Write a private key as PKCS#8 PEM with mode 0600. Refuses to overwrite.
pub fn write_signing_key(path: &Path, key: &SigningKey) -> Result<(), KeyError> {
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| KeyError::BadPrivateKey {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io(e)
            }
        })?;
    f.write_all(pem.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// Read a PKCS#8 PEM private key. A key readable by group or others is refused.
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::InsecureMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::BadPrivateKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Read the key at `path`, creating it (0600) on first use. Returns whether it was created.
pub fn load_or_create(path: &Path) -> Result<(SigningKey, bool), KeyError> {
    match std::fs::metadata(path) {
        Ok(_) => Ok((read_signing_key(path)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| KeyError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
            }
            let key = generate();
            write_signing_key(path, &key)?;
            Ok((key, true))
        }
        Err(source) => Err(KeyError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// `ed25519:` + base64 of the public key bytes.
pub fn public_key_text(key: &VerifyingKey) -> String {
    format!(
        "{PUBLIC_KEY_PREFIX}{}",
        base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
    )
}

/// Parse `ed25519:<base64>`; weak (small-order) keys are refused.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    let bad = |reason: &str| KeyError::BadPublicKey {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let b64 = text
        .trim()
        .strip_prefix(PUBLIC_KEY_PREFIX)
        .ok_or_else(|| bad("missing `ed25519:` prefix"))?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| bad(&e.to_string()))?;
    let bytes: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| bad(&format!("{} bytes, expected 32", raw.len())))?;
    public_key_from_bytes(&bytes).map_err(|e| match e {
        KeyError::WeakPublicKey { .. } => KeyError::WeakPublicKey {
            text: text.to_string(),
        },
        other => other,
    })
}

/// A public key from raw bytes; invalid points and weak keys are refused.
pub fn public_key_from_bytes(bytes: &[u8; 32]) -> Result<VerifyingKey, KeyError> {
    let text = || {
        format!(
            "{PUBLIC_KEY_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    };
    let key = VerifyingKey::from_bytes(bytes).map_err(|e| KeyError::BadPublicKey {
        text: text(),
        reason: e.to_string(),
    })?;
    if key.is_weak() {
        return Err(KeyError::WeakPublicKey { text: text() });
    }
    Ok(key)
}

/// `SHA256:` + hex of SHA-256 over the raw public key bytes.
pub fn fingerprint(key: &VerifyingKey) -> String {
    format!("SHA256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn public_key_text_round_trips() {
        let k = generate();
        let text = public_key_text(&k.verifying_key());
        assert_eq!(parse_public_key(&text).unwrap(), k.verifying_key());
    }

    #[test]
    fn small_order_key_is_refused() {
        // The identity point (0, 1) encodes as 0x01 followed by zeros: small order.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        let text = format!(
            "ed25519:{}",
            base64::engine::general_purpose::STANDARD.encode(weak)
        );
        assert!(matches!(
            parse_public_key(&text),
            Err(KeyError::WeakPublicKey { .. })
        ));
    }

    #[test]
    fn private_key_file_is_0600_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        let (k, created) = load_or_create(&p).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(k.to_bytes(), k2.to_bytes());
        assert!(matches!(
            write_signing_key(&p, &k),
            Err(KeyError::Exists { .. })
        ));
    }

    #[test]
    fn group_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_signing_key(&p, &generate()).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_signing_key(&p),
            Err(KeyError::InsecureMode { .. })
        ));
    }
}
