//! Keys a user can verify: the client remembers each buddy's public key
//! the first time it sees it (trust on first use), refuses to talk to a
//! buddy whose key the servers later hand out differently until the user
//! accepts it, and shows a safety number for a pair of keys that both
//! sides compute alike (PROTOCOL.md §7, "Verifying keys").
//!
//! The book lives in `STATE_DIR/USER/keys`, one line per buddy:
//! `NAME KEY-HEX verified|unverified [PENDING-HEX]`, rewritten whole
//! through a temporary file so a crash leaves the old or the new book.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::account;
use crate::crypto;
use crate::keyfile::hex;

/// Largest key book read back (bytes): about 1,000 buddies with a
/// changed key each; a bigger file is not ours and is refused.
pub const MAX_BOOK_BYTES: u64 = 4 << 20;

/// Largest public key (DER bytes) remembered: RSA-8192 fits.
pub const MAX_KEY_DER: usize = 2048;

/// Hash iterations per side of a safety number: makes searching for a
/// second key with the same number costly, as Signal does.
const SAFETY_ITERATIONS: u32 = 5200;

/// Digits each side contributes (6 groups of 5).
const SIDE_DIGITS: usize = 30;

/// What the book says about a buddy's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// Seen before (or seen now for the first time, and remembered).
    Trusted,
    /// Differs from the remembered one; `first` the first time this new
    /// key is seen (the user is told once).
    Changed {
        /// Whether this changed key is new to the book.
        first: bool,
    },
}

/// One buddy's entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// The accepted key (DER).
    key: Vec<u8>,
    /// The user compared the safety number of this key.
    verified: bool,
    /// A different key the servers handed out, not yet accepted.
    pending: Option<Vec<u8>>,
}

/// Why the book could not be read or written.
#[derive(Debug)]
pub enum TrustError {
    /// The file system refused.
    Io(std::io::Error),
    /// The file is not a key book (too big or malformed).
    Corrupt(String),
}

impl std::fmt::Display for TrustError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrustError::Io(e) => write!(f, "the key book cannot be used: {e}"),
            TrustError::Corrupt(why) => write!(f, "the key book is damaged: {why}"),
        }
    }
}

/// The remembered keys of one account's buddies.
#[derive(Debug)]
pub struct KeyBook {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() / 2 > MAX_KEY_DER {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

/// The directory of `user`'s state under `state_dir`.
pub fn account_dir(state_dir: &Path, user: &str) -> PathBuf {
    state_dir.join(user)
}

impl KeyBook {
    /// Opens (or starts) the book of `user` under `state_dir`.
    pub fn open(state_dir: &Path, user: &str) -> Result<KeyBook, TrustError> {
        let path = account_dir(state_dir, user).join("keys");
        let mut entries = BTreeMap::new();
        match fs::metadata(&path) {
            Ok(m) if m.len() > MAX_BOOK_BYTES => {
                return Err(TrustError::Corrupt("too big".into()));
            }
            Ok(_) => {
                let text = fs::read_to_string(&path).map_err(TrustError::Io)?;
                for (n, line) in text.lines().enumerate() {
                    let bad = || TrustError::Corrupt(format!("line {}", n + 1));
                    let parts: Vec<&str> = line.split(' ').collect();
                    let (name, key, state, pending) = match parts.as_slice() {
                        [a, b, c] => (*a, *b, *c, None),
                        [a, b, c, d] => (*a, *b, *c, Some(*d)),
                        _ => return Err(bad()),
                    };
                    let name = account::normalize_name(name).map_err(|_| bad())?;
                    let key = unhex(key).ok_or_else(bad)?;
                    let verified = match state {
                        "verified" => true,
                        "unverified" => false,
                        _ => return Err(bad()),
                    };
                    let pending = match pending {
                        Some(p) => Some(unhex(p).ok_or_else(bad)?),
                        None => None,
                    };
                    entries.insert(
                        name,
                        Entry {
                            key,
                            verified,
                            pending,
                        },
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(TrustError::Io(e)),
        }
        Ok(KeyBook { path, entries })
    }

    fn save(&self) -> Result<(), TrustError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(TrustError::Io)?;
        let mut text = String::new();
        for (name, e) in &self.entries {
            text.push_str(name);
            text.push(' ');
            text.push_str(&hex(&e.key));
            text.push_str(if e.verified {
                " verified"
            } else {
                " unverified"
            });
            if let Some(p) = &e.pending {
                text.push(' ');
                text.push_str(&hex(p));
            }
            text.push('\n');
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(TrustError::Io)?;
        f.write_all(text.as_bytes()).map_err(TrustError::Io)?;
        f.sync_all().map_err(TrustError::Io)?;
        fs::rename(&tmp, &self.path).map_err(TrustError::Io)
    }

    /// Checks the key the servers hand out for `buddy`; remembers it on
    /// first sight and records a changed one as pending.
    pub fn check(&mut self, buddy: &str, key: &[u8]) -> Result<Check, TrustError> {
        if key.len() > MAX_KEY_DER {
            return Ok(Check::Changed { first: false });
        }
        match self.entries.get_mut(buddy) {
            None => {
                self.entries.insert(
                    buddy.to_owned(),
                    Entry {
                        key: key.to_vec(),
                        verified: false,
                        pending: None,
                    },
                );
                self.save()?;
                Ok(Check::Trusted)
            }
            Some(e) if e.key == key => {
                if e.pending.take().is_some() {
                    self.save()?;
                }
                Ok(Check::Trusted)
            }
            Some(e) => {
                if e.pending.as_deref() == Some(key) {
                    return Ok(Check::Changed { first: false });
                }
                e.pending = Some(key.to_vec());
                self.save()?;
                Ok(Check::Changed { first: true })
            }
        }
    }

    /// The key a safety number for `buddy` is about (a pending one if
    /// the key changed) and whether it is verified; `presented` is the
    /// key the servers hand out now, if the buddy is online.
    pub fn shown(&self, buddy: &str, presented: Option<&[u8]>) -> Option<(Vec<u8>, bool)> {
        match self.entries.get(buddy) {
            Some(Entry {
                pending: Some(p), ..
            }) => Some((p.clone(), false)),
            Some(e) => Some((e.key.clone(), e.verified)),
            None => presented.map(|k| (k.to_vec(), false)),
        }
    }

    /// The user compared the safety number of the key [`KeyBook::shown`]
    /// gives: it becomes the accepted, verified key.
    pub fn accept(&mut self, buddy: &str, presented: Option<&[u8]>) -> Result<bool, TrustError> {
        let Some((key, _)) = self.shown(buddy, presented) else {
            return Ok(false);
        };
        self.entries.insert(
            buddy.to_owned(),
            Entry {
                key,
                verified: true,
                pending: None,
            },
        );
        self.save()?;
        Ok(true)
    }
}

/// One side's 30 digits: iterated SHA-256 over a version, the name and
/// the key, cut into six 5-byte chunks each taken modulo 100000.
fn side_digits(name: &str, key: &[u8]) -> String {
    let mut h = crypto::Sha256::new();
    h.update(b"ims safety number v1\0");
    h.update(&(name.len() as u32).to_be_bytes());
    h.update(name.as_bytes());
    h.update(key);
    let mut d = h.finish();
    for _ in 1..SAFETY_ITERATIONS {
        let mut h = crypto::Sha256::new();
        h.update(&d);
        h.update(key);
        d = h.finish();
    }
    let mut out = String::with_capacity(SIDE_DIGITS);
    for chunk in d.chunks(5).take(SIDE_DIGITS / 5) {
        let v = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        out.push_str(&format!("{:05}", v % 100_000));
    }
    out
}

/// The safety number of two (name, key) pairs: both sides' digits, the
/// smaller name's first, so both users see the same 60 digits, shown in
/// twelve groups of five.
pub fn safety_number(a: (&str, &[u8]), b: (&str, &[u8])) -> String {
    let (first, second) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let digits = side_digits(first.0, first.1) + &side_digits(second.0, second.1);
    digits
        .as_bytes()
        .chunks(5)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ims-trust-{}-{}",
            std::process::id(),
            hex(&crypto::random_array::<6>())
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn first_sight_is_remembered_and_a_change_is_caught_until_accepted() {
        let dir = temp();
        let mut book = KeyBook::open(&dir, "alice").unwrap();
        assert_eq!(book.check("bob", b"key-one").unwrap(), Check::Trusted);
        assert_eq!(book.check("bob", b"key-one").unwrap(), Check::Trusted);
        // Survives a restart.
        let mut book = KeyBook::open(&dir, "alice").unwrap();
        assert_eq!(
            book.check("bob", b"key-two").unwrap(),
            Check::Changed { first: true }
        );
        assert_eq!(
            book.check("bob", b"key-two").unwrap(),
            Check::Changed { first: false }
        );
        let mut book = KeyBook::open(&dir, "alice").unwrap();
        assert_eq!(
            book.check("bob", b"key-two").unwrap(),
            Check::Changed { first: false }
        );
        assert_eq!(book.shown("bob", None), Some((b"key-two".to_vec(), false)));
        assert!(book.accept("bob", None).unwrap());
        assert_eq!(book.check("bob", b"key-two").unwrap(), Check::Trusted);
        assert_eq!(book.shown("bob", None), Some((b"key-two".to_vec(), true)));
        let book = KeyBook::open(&dir, "alice").unwrap();
        assert_eq!(book.shown("bob", None), Some((b"key-two".to_vec(), true)));
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_damaged_book_is_refused() {
        let dir = temp();
        fs::create_dir_all(dir.join("alice")).unwrap();
        fs::write(dir.join("alice/keys"), "bob zz verified\n").unwrap();
        assert!(matches!(
            KeyBook::open(&dir, "alice"),
            Err(TrustError::Corrupt(_))
        ));
        fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn safety_numbers_agree_on_both_sides_and_differ_per_key() {
        let n1 = safety_number(("alice", b"ka"), ("bob", b"kb"));
        let n2 = safety_number(("bob", b"kb"), ("alice", b"ka"));
        assert_eq!(n1, n2);
        let groups: Vec<&str> = n1.split(' ').collect();
        assert_eq!(groups.len(), 12);
        assert!(groups
            .iter()
            .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit())));
        assert_ne!(n1, safety_number(("alice", b"ka"), ("bob", b"kc")));
    }
}
