//! The conversation history of one account, on disk under the state
//! directory (`STATE_DIR/USER/history`), every record sealed with
//! AES-256-GCM under a key derived from the same password derivation that
//! wraps the private key, so the file shows nothing without the password.
//!
//! The file is lines of hex: the first seals a fixed marker (so a wrong
//! key is told apart from damage at once), each further one seals one
//! record. A new password rewrites the whole file under the new key
//! through a temporary file, so a crash leaves the old or the new file.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::crypto::{self, GCM_NONCE_LEN};
use crate::keyfile::hex;

/// What the first line seals.
const MARKER: &[u8] = b"ims history v1";

/// Largest record line read back (hex characters): a message of
/// `MAX_TEXT_BYTES` with its fields, sealed, fits with room to spare.
const MAX_LINE: usize = 4 * 65_536;

/// HKDF label of the history key.
const KEY_LABEL: &[u8] = b"ims history key v1";

/// One line of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// `sent` or `received`.
    pub direction: String,
    /// The message id (the sender's).
    pub id: u64,
    /// Unix seconds when it was sent or received here.
    pub time: u64,
    /// The text.
    pub text: String,
    /// For sent messages: `pending`, `delivered` or `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Why the history cannot be used.
#[derive(Debug)]
pub enum HistoryError {
    /// The file system refused.
    Io(std::io::Error),
    /// The file was sealed under another password.
    WrongPassword,
    /// A line is not a sealed record of ours.
    Corrupt,
}

impl std::fmt::Display for HistoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HistoryError::Io(e) => write!(f, "the history cannot be used: {e}"),
            HistoryError::WrongPassword => f.write_str(
                "the history was written under another password and cannot be opened with this one",
            ),
            HistoryError::Corrupt => f.write_str("the history file is damaged"),
        }
    }
}

/// The history key for a password's wrap key.
pub fn history_key(wrap: &[u8; 32], user: &str) -> [u8; 32] {
    crypto::hkdf_sha256_32(wrap, user.as_bytes(), KEY_LABEL)
}

/// One kind of record on disk: `S` sent, `R` received, `D` delivered,
/// `F` failed; tab-separated with the peer, id, time, and text.
fn encode(kind: char, with: &str, id: u64, time: u64, text: &str) -> Vec<u8> {
    format!("{kind}\t{with}\t{id}\t{time}\t{text}").into_bytes()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect()
}

fn seal(key: &[u8; 32], user: &str, pt: &[u8]) -> Result<String, HistoryError> {
    let nonce = crypto::random_array::<GCM_NONCE_LEN>();
    let ct = crypto::aes_gcm_seal(key, &nonce, user.as_bytes(), pt)
        .map_err(|_| HistoryError::Corrupt)?;
    Ok(hex(&nonce) + &hex(&ct))
}

fn open(key: &[u8; 32], user: &str, line: &str) -> Option<Vec<u8>> {
    if line.len() > MAX_LINE {
        return None;
    }
    let raw = unhex(line)?;
    let (nonce, ct) = raw.split_at_checked(GCM_NONCE_LEN)?;
    let nonce: [u8; GCM_NONCE_LEN] = nonce.try_into().ok()?;
    crypto::aes_gcm_open(key, &nonce, user.as_bytes(), ct).ok()
}

/// An account's open history.
pub struct History {
    path: PathBuf,
    user: String,
    key: [u8; 32],
    /// Seals and writes appended records (a record per message sent,
    /// received and settled).
    appender: parking_lot::Mutex<Appender>,
}

/// What appending keeps between records: the file opened for appending
/// (reopened after a rewrite), the key's cipher context, and the nonce
/// counter. A record's nonce is an 8-byte prefix drawn at random when the
/// history opens (and again whenever the 4-byte counter runs out) and the
/// counter: unique without a call to the CSPRNG per record, which cost
/// as much as sealing the record. Two openings repeat a prefix with
/// probability about n²/2⁶⁵ after n openings.
struct Appender {
    file: Option<File>,
    key: crypto::GcmKey,
    prefix: [u8; 8],
    counter: u32,
}

impl Appender {
    fn new(key: [u8; 32]) -> Appender {
        Appender {
            file: None,
            key: crypto::GcmKey::new(key),
            prefix: crypto::random_array(),
            counter: 0,
        }
    }

    /// The next record's nonce, never one used before under this key.
    fn nonce(&mut self) -> [u8; GCM_NONCE_LEN] {
        if self.counter == u32::MAX {
            self.prefix = crypto::random_array();
            self.counter = 0;
        }
        let mut nonce = [0u8; GCM_NONCE_LEN];
        nonce[..8].copy_from_slice(&self.prefix);
        nonce[8..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter = self.counter.saturating_add(1);
        nonce
    }

    /// `record` sealed as one line of the file, newline included.
    fn seal_line(&mut self, user: &str, record: &[u8]) -> Result<String, HistoryError> {
        let nonce = self.nonce();
        let mut buf = Vec::with_capacity(record.len() + crypto::GCM_TAG_LEN);
        buf.extend_from_slice(record);
        self.key
            .seal_in_place(&nonce, user.as_bytes(), &mut buf)
            .map_err(|_| HistoryError::Corrupt)?;
        Ok(hex(&nonce) + &hex(&buf) + "\n")
    }
}

impl History {
    /// Opens (or starts) `user`'s history under `state_dir` with `key`.
    pub fn open(state_dir: &Path, user: &str, key: [u8; 32]) -> Result<History, HistoryError> {
        let dir = state_dir.join(user);
        fs::create_dir_all(&dir).map_err(HistoryError::Io)?;
        let path = dir.join("history");
        let h = History {
            path,
            user: user.to_owned(),
            key,
            appender: parking_lot::Mutex::new(Appender::new(key)),
        };
        match File::open(&h.path) {
            Ok(f) => {
                let mut first = String::new();
                BufReader::new(f)
                    .read_line(&mut first)
                    .map_err(HistoryError::Io)?;
                match open(&h.key, user, first.trim_end()) {
                    Some(m) if m == MARKER => {}
                    _ => return Err(HistoryError::WrongPassword),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                h.write_all(&h.key, &[])?;
            }
            Err(e) => return Err(HistoryError::Io(e)),
        }
        Ok(h)
    }

    fn write_all(&self, key: &[u8; 32], records: &[Vec<u8>]) -> Result<(), HistoryError> {
        let tmp = self.path.with_extension("tmp");
        let mut f = File::create(&tmp).map_err(HistoryError::Io)?;
        let mut text = seal(key, &self.user, MARKER)? + "\n";
        for r in records {
            text.push_str(&seal(key, &self.user, r)?);
            text.push('\n');
        }
        f.write_all(text.as_bytes()).map_err(HistoryError::Io)?;
        f.sync_all().map_err(HistoryError::Io)?;
        fs::rename(&tmp, &self.path).map_err(HistoryError::Io)
    }

    fn append(&self, record: &[u8]) -> Result<(), HistoryError> {
        let mut appender = self.appender.lock();
        let line = appender.seal_line(&self.user, record)?;
        if appender.file.is_none() {
            let f = OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(HistoryError::Io)?;
            appender.file = Some(f);
        }
        let written = match appender.file.as_mut() {
            Some(f) => f.write_all(line.as_bytes()),
            None => Ok(()),
        };
        if written.is_err() {
            // Opened again next time (the file may have been replaced).
            appender.file = None;
        }
        written.map_err(HistoryError::Io)
    }

    /// A message we sent (before its outcome).
    pub fn sent(&self, with: &str, id: u64, time: u64, text: &str) -> Result<(), HistoryError> {
        self.append(&encode('S', with, id, time, text))
    }

    /// A message we received.
    pub fn received(&self, with: &str, id: u64, time: u64, text: &str) -> Result<(), HistoryError> {
        self.append(&encode('R', with, id, time, text))
    }

    /// The outcome of a message we sent.
    pub fn outcome(&self, with: &str, id: u64, delivered: bool) -> Result<(), HistoryError> {
        self.append(&encode(if delivered { 'D' } else { 'F' }, with, id, 0, ""))
    }

    fn records(&self) -> Result<Vec<Vec<u8>>, HistoryError> {
        let f = File::open(&self.path).map_err(HistoryError::Io)?;
        let mut out = Vec::new();
        for (n, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(HistoryError::Io)?;
            let pt = open(&self.key, &self.user, &line).ok_or(if n == 0 {
                HistoryError::WrongPassword
            } else {
                HistoryError::Corrupt
            })?;
            if n > 0 {
                out.push(pt);
            }
        }
        Ok(out)
    }

    /// The last `n` lines of the conversation with `with`, oldest first.
    pub fn last(&self, with: &str, n: usize) -> Result<Vec<Entry>, HistoryError> {
        let mut entries: Vec<Entry> = Vec::new();
        for r in self.records()? {
            let text = String::from_utf8(r).map_err(|_| HistoryError::Corrupt)?;
            let parts: Vec<&str> = text.splitn(5, '\t').collect();
            let [kind, peer, id, time, body] = parts.as_slice() else {
                return Err(HistoryError::Corrupt);
            };
            if *peer != with {
                continue;
            }
            let id: u64 = id.parse().map_err(|_| HistoryError::Corrupt)?;
            let time: u64 = time.parse().map_err(|_| HistoryError::Corrupt)?;
            match *kind {
                "S" | "R" => entries.push(Entry {
                    direction: if *kind == "S" { "sent" } else { "received" }.into(),
                    id,
                    time,
                    text: (*body).to_owned(),
                    state: (*kind == "S").then(|| "pending".to_owned()),
                }),
                "D" | "F" => {
                    if let Some(e) = entries
                        .iter_mut()
                        .rev()
                        .find(|e| e.direction == "sent" && e.id == id)
                    {
                        e.state = Some(if *kind == "D" { "delivered" } else { "failed" }.into());
                    }
                }
                _ => return Err(HistoryError::Corrupt),
            }
        }
        let skip = entries.len().saturating_sub(n);
        Ok(entries.split_off(skip))
    }

    /// Re-seals everything under `key` (a new password).
    pub fn rekey(&mut self, key: [u8; 32]) -> Result<(), HistoryError> {
        let records = self.records()?;
        // Appends go to the new file, under the new key, from now on.
        let mut appender = self.appender.lock();
        appender.file = None;
        self.write_all(&key, &records)?;
        *appender = Appender::new(key);
        drop(appender);
        self.key = key;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_and_a_wrong_key_is_refused() {
        let dir = std::env::temp_dir().join(format!("ims-hist-{}", std::process::id()));
        let k1 = history_key(&[1; 32], "alice");
        let mut h = History::open(&dir, "alice", k1).unwrap();
        h.sent("bob", 1, 10, "plain words here").unwrap();
        h.received("bob", 7, 11, "an answer").unwrap();
        h.outcome("bob", 1, true).unwrap();
        let file = fs::read(dir.join("alice/history")).unwrap();
        assert!(!String::from_utf8_lossy(&file).contains("plain"));
        let got = h.last("bob", 10).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].state.as_deref(), Some("delivered"));
        assert_eq!(got[1].text, "an answer");
        let k2 = history_key(&[2; 32], "alice");
        assert!(matches!(
            History::open(&dir, "alice", k2),
            Err(HistoryError::WrongPassword)
        ));
        h.rekey(k2).unwrap();
        assert!(matches!(
            History::open(&dir, "alice", k1),
            Err(HistoryError::WrongPassword)
        ));
        let h = History::open(&dir, "alice", k2).unwrap();
        assert_eq!(h.last("bob", 1).unwrap()[0].text, "an answer");
        fs::remove_dir_all(dir).ok();
    }
}
