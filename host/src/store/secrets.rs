//! Provider keys at rest: sealed with XChaCha20-Poly1305 under the server
//! key before they reach the database, opened only when a run needs one.
//! The server key comes from `HANGAR_SECRET_KEY` or a file created with
//! mode 0600 on first start; a database copied without it holds no key.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

/// What a sealed value starts with (and the format's version).
const PREFIX: &str = "sealed1:";
const NONCE_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the secret key file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot create the secret key file {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("the secret key {from} must be 64 hex digits (32 bytes)")]
    Format { from: String },
    #[error("the secret key file {path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
}

/// The server key, and where it came from (to name it in errors).
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
    pub source: String,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox").field("source", &self.source).finish_non_exhaustive()
    }
}

impl SecretBox {
    /// The key in `HANGAR_SECRET_KEY` (hex) if given, else the one in
    /// `file`, created when missing.
    pub fn load(env: Option<&str>, file: &Path) -> Result<SecretBox, SecretError> {
        if let Some(hex_key) = env.filter(|k| !k.is_empty()) {
            return Self::from_hex(hex_key.trim(), "in HANGAR_SECRET_KEY".into());
        }
        let text = match std::fs::read_to_string(file) {
            Ok(text) => {
                let mode = std::fs::metadata(file).map_err(|source| SecretError::Read { path: file.into(), source })?.mode();
                if mode & 0o077 != 0 {
                    return Err(SecretError::Exposed { path: file.into(), mode: mode & 0o777 });
                }
                text
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(file)?,
            Err(source) => return Err(SecretError::Read { path: file.into(), source }),
        };
        Self::from_hex(text.trim(), format!("file {}", file.display()))
    }

    fn create(file: &Path) -> Result<String, SecretError> {
        let fail = |source| SecretError::Create { path: file.into(), source };
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let text = hex::encode(XChaCha20Poly1305::generate_key(&mut OsRng));
        // `create_new`: two servers starting at once cannot each write a key.
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file).map_err(fail)?;
        out.write_all(text.as_bytes()).and_then(|_| out.sync_all()).map_err(fail)?;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        tracing::info!(file = %file.display(), "created the secret key that seals stored provider keys; back it up with the database");
        Ok(text)
    }

    fn from_hex(text: &str, from: String) -> Result<SecretBox, SecretError> {
        let bytes = hex::decode(text).ok().filter(|b| b.len() == 32).ok_or_else(|| SecretError::Format { from: from.clone() })?;
        Ok(SecretBox { cipher: XChaCha20Poly1305::new(Key::from_slice(&bytes)), source: from })
    }

    /// A fresh random key that lives only in memory (tests).
    pub fn ephemeral() -> SecretBox {
        SecretBox { cipher: XChaCha20Poly1305::new(&XChaCha20Poly1305::generate_key(&mut OsRng)), source: "an in-memory key".into() }
    }

    pub fn is_sealed(text: &str) -> bool {
        text.starts_with(PREFIX)
    }

    pub fn seal(&self, plain: &str) -> String {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        // Encryption with a valid key and nonce cannot fail for inputs this small.
        let sealed = self.cipher.encrypt(&nonce, plain.as_bytes()).expect("XChaCha20-Poly1305 encryption");
        let mut bytes = nonce.to_vec();
        bytes.extend(sealed);
        format!("{PREFIX}{}", hex::encode(bytes))
    }

    /// The plain text, or `None` when it was sealed under another key (or
    /// is damaged).
    pub fn open(&self, sealed: &str) -> Option<String> {
        let bytes = hex::decode(sealed.strip_prefix(PREFIX)?).ok()?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = bytes.split_at(NONCE_LEN);
        let plain = self.cipher.decrypt(XNonce::from_slice(nonce), body).ok()?;
        String::from_utf8(plain).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_round_trips_and_another_key_cannot_open() {
        let a = SecretBox::ephemeral();
        let sealed = a.seal("sk-ant-123");
        assert!(SecretBox::is_sealed(&sealed) && !sealed.contains("sk-ant"));
        assert_ne!(sealed, a.seal("sk-ant-123"), "a fresh nonce each time");
        assert_eq!(a.open(&sealed).as_deref(), Some("sk-ant-123"));
        assert_eq!(SecretBox::ephemeral().open(&sealed), None);
        assert_eq!(a.open("sealed1:00"), None);
    }

    #[test]
    fn the_key_file_is_created_private_and_refused_when_exposed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/secret.key");
        let first = SecretBox::load(None, &file).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        let again = SecretBox::load(None, &file).unwrap();
        assert_eq!(again.open(&first.seal("x")).as_deref(), Some("x"), "the same key is read back");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(SecretBox::load(None, &file), Err(SecretError::Exposed { .. })));
        assert!(matches!(SecretBox::load(Some("abc"), &file), Err(SecretError::Format { .. })));
        let env = hex::encode([7u8; 32]);
        assert!(SecretBox::load(Some(&env), &file).is_ok(), "the environment wins over the file");
    }
}
