//! The server's ed25519 signing key: generated on first start, persisted in
//! the data directory, loaded on every later start.

use std::path::Path;

use ruma::signatures::Ed25519KeyPair;

/// The key file inside the data directory (PKCS#8 DER, mode 0600).
pub const KEY_FILE: &str = "signing.key";

/// Errors loading or creating the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write signing key {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("signing key {path} is invalid: {message}")]
    Invalid { path: String, message: String },
}

/// Loads `data_dir/signing.key`, creating it when absent. The key version
/// is derived from the key bytes so it is stable across restarts.
pub fn load_or_create(data_dir: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let path = data_dir.join(KEY_FILE);
    let shown = path.display().to_string();
    let io = |source| KeyError::Io { path: shown.clone(), source };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let der = match std::fs::read(&path) {
        Ok(der) => der,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let der = Ed25519KeyPair::generate();
            let tmp = data_dir.join("signing.key.tmp");
            write_private(&tmp, &der).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            der.to_vec()
        }
        Err(e) => return Err(io(e)),
    };
    let version = key_version(&der);
    Ed25519KeyPair::from_der(&der, version).map_err(|e| KeyError::Invalid { path: shown, message: e.to_string() })
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A short, stable key version: `a_` plus 4 base64-safe characters of the
/// key's hash, like other homeservers' `a_XXXX` versions.
fn key_version(der: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(der);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = digest.iter().take(4).map(|b| alphabet[(*b as usize) % alphabet.len()] as char).collect();
    format!("a_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("tessera-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = load_or_create(&dir).expect("create");
        let b = load_or_create(&dir).expect("reload");
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.version(), b.version());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
