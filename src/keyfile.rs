//! Secret files on disk: the MSkey and private keys, written 0600 and
//! refused when readable by others.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::crypto;

/// Bytes of a new MSkey: a full AES-256/HMAC-SHA-256 key.
pub const MS_KEY_LEN: usize = 32;

/// Why a key file could not be used.
#[derive(Debug)]
pub enum KeyFileError {
    /// It could not be read or written.
    Io(PathBuf, std::io::Error),
    /// Group or others may read it; a shared secret must be private.
    LoosePermissions(PathBuf, u32),
    /// It does not hold at least 32 bytes as hexadecimal.
    Malformed(PathBuf),
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFileError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            KeyFileError::LoosePermissions(p, mode) => write!(
                f,
                "{}: mode {mode:o} lets others read the key; run chmod 600 on it",
                p.display()
            ),
            KeyFileError::Malformed(p) => {
                write!(
                    f,
                    "{}: expected at least 64 hexadecimal digits (make one with `ims-crs genkey`)",
                    p.display()
                )
            }
        }
    }
}

impl std::error::Error for KeyFileError {}

/// Writes `data` to a new file only the owner can read (0600).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its old mode through open(); force it.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()
}

/// Makes a new random MSkey file.
pub fn generate_ms_key(path: &Path) -> Result<(), KeyFileError> {
    let key = crypto::random_array::<MS_KEY_LEN>();
    let mut text = hex(&key);
    text.push('\n');
    write_private(path, text.as_bytes()).map_err(|e| KeyFileError::Io(path.to_owned(), e))
}

/// Reads an MSkey file: hexadecimal, at least 32 bytes, mode 0600 or stricter.
pub fn read_ms_key(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    let meta = fs::metadata(path).map_err(|e| KeyFileError::Io(path.to_owned(), e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::LoosePermissions(path.to_owned(), mode));
    }
    let text = fs::read_to_string(path).map_err(|e| KeyFileError::Io(path.to_owned(), e))?;
    let key = unhex(text.trim()).ok_or_else(|| KeyFileError::Malformed(path.to_owned()))?;
    if key.len() < MS_KEY_LEN {
        return Err(KeyFileError::Malformed(path.to_owned()));
    }
    Ok(key)
}

/// Lower-case hexadecimal.
pub fn hex(bytes: &[u8]) -> String {
    // Called for every history line and sealed header: no allocation per
    // byte.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len().saturating_mul(2));
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_read_and_refuse_loose() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        generate_ms_key(&p).unwrap();
        assert_eq!(read_ms_key(&p).unwrap().len(), MS_KEY_LEN);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            read_ms_key(&p),
            Err(KeyFileError::LoosePermissions(..))
        ));
        write_private(&p, b"zz").unwrap();
        assert!(matches!(read_ms_key(&p), Err(KeyFileError::Malformed(_))));
        assert!(matches!(
            read_ms_key(&dir.path().join("none")),
            Err(KeyFileError::Io(..))
        ));
    }
}
