//! Offline messages at the CRS (PROTOCOL.md §5 `KEY`, `QUEUE`, `MAIL`,
//! `MAIL-ACK`; §7 "Offline messages"): a sender's client seals a message
//! to a buddy who is offline, the CRS files the blob (which it cannot
//! read) within the bounds, the recipient's MS fetches and pushes it at
//! their login (or at once when they are online), and only the
//! recipient's acknowledgement deletes it, filing a receipt for the
//! sender in the same step.
//!
//! Whenever something is filed for a user who is online, their MS is told
//! (`mail-waiting`) and fetches it; the event itself carries no data, so a
//! lost event costs only time: the user's next login fetches everything.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use log::{info, warn};

use super::metrics::TimedStore;
use super::store::{self, MailEntry, MailLimits, MailStore, Queued, StoreError, StoredMail};
use super::Crs;
use crate::crypto::{offline, RsaPublicKey};
use crate::keyfile::hex;
use crate::proto::crs::{CrsReply, EventKind};
use crate::proto::status::Status;
use crate::proto::{Answer, Refusal, Refused};

/// Default of `mail_max_age_secs`: the longest the settings allow.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Most entries in one `MAIL` answer.
pub const MAIL_PAGE_ITEMS: usize = 256;

/// Most bytes of blobs in one `MAIL` answer: in base64 they stay well
/// under the 1 MiB body limit (one blob alone is at most about 70 KiB).
pub const MAIL_PAGE_BYTES: usize = 512 * 1024;

/// Most ids one `MAIL-ACK` may name: a few pages.
pub const MAX_ACK_IDS: usize = 4 * MAIL_PAGE_ITEMS;

/// How often expired messages are looked for, at most (and at least every
/// quarter of the maximum age).
const EXPIRY_EVERY: Duration = Duration::from_secs(60);

fn refuse<T>(refusal: Refusal, reason: &str) -> Answer<T> {
    Err(Refused::new(refusal, reason))
}

fn store_err(e: StoreError) -> Refused {
    match e {
        StoreError::NoSuchUser | StoreError::InvalidName => {
            Refused::new(Refusal::NoSuchUser, "no such user")
        }
        e => {
            warn!("store: {e}");
            Refused::new(Refusal::Internal, "storage error")
        }
    }
}

/// Whether `id` is a message id as clients make them (hex of 16 bytes).
fn valid_id(id: &str) -> bool {
    id.len() == 2 * offline::ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Crs {
    /// `KEY`: `who`'s public key, for `user` who has them as a buddy.
    pub(super) fn buddy_key(&self, user: &str, who: &str) -> Answer<CrsReply> {
        let me = match self.store.get_user(user) {
            Ok(Some(u)) => u,
            Ok(None) => return refuse(Refusal::NoSuchUser, "no such user"),
            Err(e) => return Err(store_err(e)),
        };
        if !me.contacts.contains(who) {
            return refuse(Refusal::NotABuddy, "not your buddy");
        }
        match self.store.get_user(who) {
            Ok(Some(u)) => Ok(CrsReply::Key(u.public_key)),
            Ok(None) => refuse(Refusal::NotABuddy, "not your buddy"),
            Err(e) => Err(store_err(e)),
        }
    }

    /// `QUEUE`: files `user`'s sealed message for its recipient.
    pub(super) fn queue_mail(&self, user: &str, blob: Vec<u8>) -> Answer<CrsReply> {
        if blob.len() > offline::MAX_BLOB {
            return refuse(Refusal::TooLarge, "offline message too large");
        }
        let Ok(parsed) = offline::parse(&blob) else {
            return refuse(Refusal::BadRequest, "malformed offline message");
        };
        let h = &parsed.header;
        if h.from != user {
            return refuse(
                Refusal::BadRequest,
                "an offline message not from its sender",
            );
        }
        if !store::valid_username(&h.to) || store::canonical(&h.to) != h.to {
            return refuse(Refusal::BadRequest, "malformed offline message");
        }
        let sender = match self.store.get_user(user) {
            Ok(Some(u)) => u,
            Ok(None) => return refuse(Refusal::NoSuchUser, "no such user"),
            Err(e) => return Err(store_err(e)),
        };
        if !sender.contacts.contains(&h.to) {
            return refuse(Refusal::NotABuddy, "not your buddy");
        }
        // As for a message sent directly: the sender learns only this.
        if matches!(self.store.get_user(&h.to), Ok(Some(u)) if u.blocked.contains(user)) {
            return refuse(Refusal::NotABuddy, "not delivered");
        }
        let signed =
            RsaPublicKey::from_der(&sender.public_key).and_then(|k| parsed.verify(&blob, &k));
        if signed.is_err() {
            warn!("an offline message from {user} with a bad signature");
            return refuse(Refusal::BadSignature, "bad signature");
        }
        let to = h.to.clone();
        let mail = StoredMail {
            seq: 0,
            id: hex(&h.id),
            from: user.to_owned(),
            to: to.clone(),
            number: h.number,
            stored_unix: store::mail::now_unix(),
            blob,
        };
        match self
            .store
            .queue_mail(mail, &self.config.mail_limits)
            .map_err(store_err)?
        {
            Queued::Stored | Queued::Duplicate => {}
            Queued::RecipientFull => {
                return refuse(
                    Refusal::TooLarge,
                    &format!("too many offline messages wait for {to}"),
                )
            }
            Queued::SenderFull => {
                return refuse(
                    Refusal::TooLarge,
                    "too many of your offline messages wait; try again when some are read",
                )
            }
        }
        self.tell_mail_waiting([to]);
        Ok(CrsReply::Done)
    }

    /// `MAIL`: a page of what waits for `user`, after `after`.
    pub(super) fn mail_page(&self, user: &str, after: u64) -> Answer<CrsReply> {
        let entries = self
            .store
            .mail_for(user, after, MAIL_PAGE_ITEMS, MAIL_PAGE_BYTES)
            .map_err(store_err)?;
        let mut keys: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut items = Vec::with_capacity(entries.len());
        for e in entries {
            items.push(match e {
                MailEntry::Mail(m) => {
                    if !keys.contains_key(&m.from) {
                        // A sender deleted meanwhile: no key, and the
                        // recipient's client refuses (and drops) the blob.
                        let key = match self.store.get_user(&m.from) {
                            Ok(Some(u)) => u.public_key,
                            Ok(None) => Vec::new(),
                            Err(e) => return Err(store_err(e)),
                        };
                        keys.insert(m.from.clone(), key);
                    }
                    EventKind::Mail {
                        seq: m.seq,
                        public_key: keys.get(&m.from).cloned().unwrap_or_default(),
                        blob: m.blob,
                    }
                }
                MailEntry::Receipt(r) => EventKind::Receipt {
                    seq: r.seq,
                    to: r.to,
                    id: r.id,
                    number: r.number,
                    outcome: r.outcome.as_str().to_owned(),
                },
            });
        }
        Ok(CrsReply::Mail(items))
    }

    /// `MAIL-ACK`: `user`'s client has shown (or refused) these.
    pub(super) fn mail_ack(&self, user: &str, ids: &[String]) -> Answer<CrsReply> {
        if ids.len() > MAX_ACK_IDS || !ids.iter().all(|i| valid_id(i)) {
            return refuse(Refusal::BadRequest, "bad message ids");
        }
        let ids: Vec<String> = ids.iter().map(|i| i.to_ascii_lowercase()).collect();
        let senders = self.store.ack_mail(user, &ids).map_err(store_err)?;
        self.tell_mail_waiting(senders);
        Ok(CrsReply::Done)
    }

    /// Tells the MSs of those of `users` who are online that something
    /// waits for them. Not an invisible user: a message they read at once
    /// would tell its sender (by its receipt) that they are online; theirs
    /// come when they show themselves, or at their next login.
    pub(super) fn tell_mail_waiting(&self, users: impl IntoIterator<Item = String>) {
        let users: Vec<String> = users
            .into_iter()
            .filter(
                |u| !matches!(self.store.get_user(u), Ok(Some(r)) if r.status == Status::Invisible),
            )
            .collect();
        // The live state wakes the MSs' polls itself.
        let mut live = self.live.lock();
        for u in users {
            if live.online(&u).is_some() {
                live.notify([u.as_str()], &EventKind::MailWaiting { user: u.clone() });
            }
        }
    }

    /// Deletes the messages older than `mail_max_age`; their senders get
    /// an `expired` receipt.
    pub fn expire_mail(&self) {
        let now = store::mail::now_unix();
        let before = now.saturating_sub(self.config.mail_max_age.as_secs());
        match self.store.expire_mail(before) {
            Ok(senders) => {
                if !senders.is_empty() {
                    info!("offline messages of {} senders expired", senders.len());
                }
                self.tell_mail_waiting(senders);
            }
            Err(e) => warn!("expiring offline messages: {e}"),
        }
    }
}

/// When the reaper thread last looked for expired messages.
#[derive(Default)]
pub struct Expiry {
    last: Option<Instant>,
}

impl Expiry {
    /// Looks for expired messages when it is time to.
    pub fn tick(&mut self, crs: &Crs) {
        let every = (crs.config.mail_max_age / 4).clamp(Duration::from_secs(1), EXPIRY_EVERY);
        if self.last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        crs.expire_mail();
    }
}

impl MailStore for TimedStore {
    fn queue_mail(&self, mail: StoredMail, limits: &MailLimits) -> Result<Queued, StoreError> {
        self.time("queue_mail", || self.inner.queue_mail(mail, limits))
    }
    fn has_mail(&self, user: &str) -> Result<bool, StoreError> {
        self.time("has_mail", || self.inner.has_mail(user))
    }
    fn mail_for(
        &self,
        user: &str,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<MailEntry>, StoreError> {
        self.time("mail_for", || {
            self.inner.mail_for(user, after, max_items, max_bytes)
        })
    }
    fn ack_mail(&self, user: &str, ids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        self.time("ack_mail", || self.inner.ack_mail(user, ids))
    }
    fn expire_mail(&self, before: u64) -> Result<BTreeSet<String>, StoreError> {
        self.time("expire_mail", || self.inner.expire_mail(before))
    }
}
