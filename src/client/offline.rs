//! Offline messages on the client (PROTOCOL.md §7, "Offline messages"):
//! a message to a buddy who is offline, or whose client cannot be
//! reached, is sealed to the buddy's key and filed at the CRS (`queued`);
//! messages that waited for us arrive from our MS after the login, are
//! checked, shown once with their original time, and only then
//! acknowledged; receipts tell us what became of ours (`delivered` with
//! `"offline":true`, or `send-failed` with reason `expired`).
//!
//! The order that keeps a message from being lost or shown twice when
//! anything is killed: (1) the message is shown and its id remembered on
//! disk (`STATE_DIR/USER/offline-seen`, written and synced), (2) it is
//! acknowledged, and only the acknowledgement lets the CRS delete it. A
//! kill before (1) leaves it at the CRS, to come again and be shown then;
//! after (1) it comes again but is recognised and only acknowledged.
//! In the line modes the message is printed in the receiving thread and
//! its id written right after, the seen-id file already open: only a kill
//! landing between those two system calls can show it twice. The full
//! screen draws on its own thread: there the id is written first and the
//! message handed over, and a kill in that hand-over leaves it in the
//! history (`/history`) but not drawn.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use log::{debug, warn};

use super::error::ClientError;
use super::events::{Event, Flush};
use super::peer::now_unix;
use super::trust::account_dir;
use super::Client;
use crate::crypto::{self, offline, RsaPublicKey};
use crate::keyfile::hex;
use crate::proto::crs::EventKind;
use crate::proto::ms::{MsReply, MsRequest};

/// How long seen ids are remembered, and the age past which an offline
/// message is refused whatever it holds: well past the longest a CRS
/// keeps one (a week), so that only a replay is ever that old.
pub const SEEN_KEEP_SECS: u64 = 30 * 24 * 3600;

/// Largest seen-id file read back: about 200,000 ids.
pub const MAX_SEEN_BYTES: u64 = 8 << 20;

/// Acknowledgements gathered before they are sent, at most.
const ACK_BATCH: usize = 64;

/// How long a shown message may wait for the interface to take it before
/// it is acknowledged anyway.
const SHOWN_WAIT: Duration = Duration::from_secs(2);

/// The ids this account has seen, and acknowledgements not yet sent.
pub struct Mailbox {
    path: PathBuf,
    /// Id (hex; receipts prefixed `r:`) -> when it was sent or received.
    seen: HashMap<String, u64>,
    /// Ids to acknowledge.
    pending: Vec<String>,
}

impl Mailbox {
    /// Opens (creating) `user`'s seen ids, forgetting those past
    /// [`SEEN_KEEP_SECS`].
    pub fn open(state_dir: &Path, user: &str) -> std::io::Result<Mailbox> {
        let dir = account_dir(state_dir, user);
        fs::create_dir_all(&dir)?;
        let path = dir.join("offline-seen");
        let mut seen = HashMap::new();
        match fs::metadata(&path) {
            Ok(m) if m.len() > MAX_SEEN_BYTES => {
                return Err(std::io::Error::other("offline-seen is too big"));
            }
            Ok(_) => {
                let text = fs::read_to_string(&path)?;
                let oldest = now_unix().saturating_sub(SEEN_KEEP_SECS);
                for line in text.lines() {
                    // A line cut short by a crash is ignored.
                    let Some((id, at)) = line.split_once(' ') else {
                        continue;
                    };
                    match at.parse::<u64>() {
                        Ok(at) if at >= oldest => {
                            seen.insert(id.to_owned(), at);
                        }
                        _ => {}
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut book = Mailbox {
            path,
            seen,
            pending: Vec::new(),
        };
        book.rewrite()?;
        Ok(book)
    }

    /// Writes the whole file anew (through a temporary file and a rename,
    /// so a crash leaves the old or the new one).
    fn rewrite(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        let mut text = String::new();
        for (id, at) in &self.seen {
            text.push_str(&format!("{id} {at}\n"));
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)
    }

    fn has(&self, id: &str) -> bool {
        self.seen.contains_key(id)
    }

    /// Remembers `id` on disk before anything is shown.
    fn remember(&mut self, id: &str, at: u64) -> std::io::Result<()> {
        self.remember_after(id, at, || true)
    }

    /// Remembers `id` on disk, calling `before` right before the write
    /// (with the file already open): a kill -9 after the write loses
    /// nothing of it, the page cache keeping it. Nothing is written if
    /// `before` says `false`.
    fn remember_after(
        &mut self,
        id: &str,
        at: u64,
        before: impl FnOnce() -> bool,
    ) -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().append(true).open(&self.path)?;
        let line = format!("{id} {at}\n");
        if !before() {
            return Err(std::io::Error::other("not shown"));
        }
        f.write_all(line.as_bytes())?;
        f.sync_data()?;
        self.seen.insert(id.to_owned(), at);
        Ok(())
    }
}

/// `secs` since 1970 as RFC 3339 in UTC (`2026-12-03T13:05:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days, on unsigned days from 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Why an offline message was refused, for the notice.
fn refused(from: &str, why: &str) -> Event {
    Event::Notice {
        text: format!("refused an offline message claiming to be from {from}: {why}"),
    }
}

impl Client {
    /// Opens the logged-in user's seen ids (at login).
    pub(super) fn open_mailbox(&self, user: &str) {
        match Mailbox::open(&self.config.state_dir, user) {
            Ok(m) => *self.mailbox.lock() = Some(m),
            Err(e) => {
                *self.mailbox.lock() = None;
                self.emit(Event::Notice {
                    text: format!(
                        "offline messages cannot be received in this login ({e}); they wait at the server"
                    ),
                });
            }
        }
    }

    /// Whether `to` is a buddy who is offline now.
    pub(super) fn buddy_is_offline(&self, to: &str) -> bool {
        let guard = self.settled_session();
        guard
            .session()
            .is_some_and(|s| matches!(s.buddies.get(to), Some(None)))
    }

    /// Whether `to` is an online buddy whose client cannot be reached.
    pub(super) fn buddy_unreachable(&self, to: &str) -> bool {
        let address = {
            let guard = self.state.lock();
            match guard.session().and_then(|s| s.buddies.get(to).cloned()) {
                Some(Some(p)) => p.address,
                Some(None) => return true,
                None => return false,
            }
        };
        super::connect(&address.to_string(), self.config.timeout).is_err()
    }

    /// Seals `text` to `to` and files it at the CRS: `queued` follows at
    /// once, `delivered` (offline) when they have read it.
    pub(super) fn send_offline(&self, to: &str, id: u64, text: &str) -> Result<u64, ClientError> {
        let (me, private) = {
            let guard = self.settled_session();
            let s = guard.session().ok_or(ClientError::NotLoggedIn)?;
            if !s.buddies.contains_key(to) {
                return Err(ClientError::NotABuddy(to.to_owned()));
            }
            (s.user.clone(), s.private_key.clone())
        };
        // A refusal of the servers shows as its reason alone.
        let der = match self.ms_call(&MsRequest::Key(to.to_owned()))? {
            MsReply::Key(der) => der,
            other => {
                return Err(ClientError::UnexpectedReply(format!(
                    "unexpected answer: {other:?}"
                )))
            }
        };
        self.key_is_trusted(&me, to, &der)?;
        let key =
            RsaPublicKey::from_der(&der).map_err(|_| ClientError::UnusableKey(to.to_owned()))?;
        let header = offline::Header {
            from: me,
            to: to.to_owned(),
            id: crypto::random_array::<{ offline::ID_LEN }>(),
            sent_at: now_unix(),
            number: id,
        };
        let blob = offline::seal(&header, text.as_bytes(), &private, &key)?;
        self.ms_call(&MsRequest::Queue(blob))?;
        self.emit(Event::Queued {
            to: to.to_owned(),
            id,
        });
        Ok(id)
    }

    /// An offline message or a receipt pushed by our MS.
    pub(super) fn on_mail_push(&self, kind: EventKind) {
        match kind {
            EventKind::Mail {
                blob, public_key, ..
            } => self.on_offline_message(&blob, &public_key),
            EventKind::Receipt {
                to,
                id,
                number,
                outcome,
                ..
            } => self.on_receipt(&to, &id, number, &outcome),
            _ => return,
        }
        // Acknowledged in batches: when no more pushes wait, or many did.
        let pending = self.mailbox.lock().as_ref().map_or(0, |m| m.pending.len());
        if pending >= ACK_BATCH || self.from_ms.1.is_empty() {
            self.flush_mail_acks();
        }
    }

    fn on_offline_message(&self, blob: &[u8], public_key: &[u8]) {
        let Ok(parsed) = offline::parse(blob) else {
            warn!("a malformed offline message");
            self.emit(refused("someone", "malformed"));
            return;
        };
        let h = parsed.header.clone();
        let Some((me, private, blocked)) = self.state.lock().session().map(|s| {
            (
                s.user.clone(),
                s.private_key.clone(),
                s.blocked.contains(&h.from),
            )
        }) else {
            return;
        };
        let id = hex(&h.id);
        // Refused ones stay at the CRS until they expire (their sender is
        // then told `expired`): never acknowledged, never shown.
        if h.to != me {
            warn!("an offline message for {} came to {me}", h.to);
            self.emit(refused(&h.from, &format!("addressed to {}", h.to)));
            return;
        }
        if public_key.is_empty() {
            self.emit(refused(&h.from, "no such user"));
            return;
        }
        if let Err(e) = self.key_is_trusted(&me, &h.from, public_key) {
            self.emit(refused(&h.from, &e.to_string()));
            return;
        }
        let text = RsaPublicKey::from_der(public_key)
            .and_then(|k| parsed.open(blob, &k, &private))
            .ok()
            .and_then(|t| String::from_utf8(t).ok());
        let Some(text) = text else {
            warn!("an offline message from {} that does not open", h.from);
            self.emit(refused(&h.from, "altered or not signed by them"));
            return;
        };
        if h.sent_at < now_unix().saturating_sub(SEEN_KEEP_SECS) {
            self.emit(refused(&h.from, "too old (a replay)"));
            return;
        }
        let mut guard = self.mailbox.lock();
        let Some(mailbox) = guard.as_mut() else {
            return;
        };
        if mailbox.has(&id) {
            // Shown before (a replay, or our acknowledgement was lost):
            // acknowledged again, not shown twice.
            mailbox.pending.push(id);
            drop(guard);
            self.emit(refused(&h.from, "already received (shown once only)"));
            return;
        }
        if blocked {
            mailbox.pending.push(id);
            return;
        }
        drop(guard);
        // Everything before it printed first.
        if !self.wait_shown() {
            debug!("the interface is slow to take events; showing anyway");
        }
        let e = Event::Message {
            from: h.from.clone(),
            text,
            id: h.number,
            sent_at: Some(rfc3339(h.sent_at)),
            offline: true,
        };
        let show = self.show_now.lock().clone();
        let mut guard = self.mailbox.lock();
        let Some(mailbox) = guard.as_mut() else {
            return;
        };
        let remembered = match &show {
            // Line modes: printed in this thread, and the id written right
            // after it with the file already open: a kill between the two
            // (two system calls apart) can only show it once more, never
            // lose it.
            // Not shown (the output is gone): not remembered, so it comes
            // again at the next login.
            Some(show) => mailbox.remember_after(&id, h.sent_at, || show(&e)),
            // The full screen takes it on its own thread: remembered first,
            // so that a kill in the hand-over cannot show it twice.
            None => mailbox.remember(&id, h.sent_at).map(|()| {
                let _ = self.events.send(e.clone());
            }),
        };
        if let Err(err) = remembered {
            warn!("offline-seen: {err}");
            return;
        }
        mailbox.pending.push(id);
        drop(guard);
        self.set_last_peer(&h.from);
        self.record(&e);
        // Taken before it is acknowledged.
        self.wait_shown();
    }

    fn on_receipt(&self, to: &str, id: &str, number: u64, outcome: &str) {
        let key = format!("r:{id}");
        let mut guard = self.mailbox.lock();
        let Some(mailbox) = guard.as_mut() else {
            return;
        };
        mailbox.pending.push(id.to_owned());
        if mailbox.has(&key) {
            return;
        }
        drop(guard);
        self.wait_shown();
        let mut guard = self.mailbox.lock();
        let Some(mailbox) = guard.as_mut() else {
            return;
        };
        if let Err(e) = mailbox.remember(&key, now_unix()) {
            warn!("offline-seen: {e}");
            mailbox.pending.pop();
            return;
        }
        drop(guard);
        let to = to.to_owned();
        self.emit(match outcome {
            "delivered" => Event::Delivered {
                to,
                id: number,
                // Through the servers.
                via: super::relay::Via::Relay,
                offline: true,
            },
            other => Event::SendFailed {
                to,
                id: number,
                reason: other.to_owned(),
            },
        });
        self.wait_shown();
    }

    /// Waits (at most [`SHOWN_WAIT`]) until the interface has taken every
    /// event so far: a flush goes behind them on the same channel, and
    /// the interface answers it when it gets there. `false` if it did not
    /// within the time.
    fn wait_shown(&self) -> bool {
        let (flush, answered) = Flush::new();
        if self.events.send(Event::Flush(flush)).is_err() {
            // No interface: nothing to wait for.
            return true;
        }
        // An answer, or the flush dropped (a disconnection): either way
        // everything before it was taken.
        !matches!(
            answered.recv_timeout(SHOWN_WAIT),
            Err(crossbeam_channel::RecvTimeoutError::Timeout)
        )
    }

    /// Sends the acknowledgements gathered; kept for the next try if the
    /// MS cannot take them now.
    pub(super) fn flush_mail_acks(&self) {
        let ids = match self.mailbox.lock().as_mut() {
            Some(m) if !m.pending.is_empty() => std::mem::take(&mut m.pending),
            _ => return,
        };
        if let Err(e) = self.ms_call(&MsRequest::MailAck(ids.clone())) {
            warn!("acknowledging offline messages: {e}; again later");
            if let Some(m) = self.mailbox.lock().as_mut() {
                m.pending.extend(ids);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_750_000), "2025-12-03T08:20:00Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn seen_ids_survive_a_reopen_and_old_ones_go() {
        let dir = std::env::temp_dir().join(format!("ims-seen-{}", std::process::id()));
        let mut m = Mailbox::open(&dir, "ann").unwrap();
        m.remember("aa", now_unix()).unwrap();
        m.remember("bb", 5).unwrap();
        let m = Mailbox::open(&dir, "ann").unwrap();
        assert!(m.has("aa"));
        assert!(!m.has("bb"));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A client with no listener whose events go to the returned channel.
    fn client() -> (Client, crossbeam_channel::Receiver<Event>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (
            Client::new(super::super::ClientConfig::default(), 0, tx),
            rx,
        )
    }

    #[test]
    fn waiting_for_the_interface_ends_when_it_took_everything_before() {
        let (c, rx) = client();
        let taken = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let interface = {
            let taken = taken.clone();
            std::thread::spawn(move || {
                for e in rx {
                    match e {
                        Event::Flush(f) => f.answer(),
                        e => {
                            // A slow interface: the wait must cover it.
                            std::thread::sleep(Duration::from_millis(100));
                            taken.lock().push(e);
                        }
                    }
                }
            })
        };
        for n in 0..3 {
            c.emit(Event::Notice {
                text: format!("n{n}"),
            });
        }
        assert!(c.wait_shown(), "answered, not timed out");
        assert_eq!(taken.lock().len(), 3, "all three taken before the answer");
        drop(c);
        interface.join().unwrap();
    }

    #[test]
    fn a_dropped_flush_ends_the_wait_and_no_interface_none() {
        let (c, rx) = client();
        let interface = std::thread::spawn(move || for _ in rx {});
        assert!(c.wait_shown(), "a consumer that drops the flush answers it");
        drop(c);
        interface.join().unwrap();
        let (c, rx) = client();
        drop(rx);
        assert!(c.wait_shown(), "no interface: nothing to wait for");
    }

    #[test]
    fn a_flush_is_never_shown() {
        let (f, _answer) = Flush::new();
        assert_eq!(Event::Flush(f).to_text(), "");
    }
}
