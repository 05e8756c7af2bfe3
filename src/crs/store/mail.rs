//! Offline messages at the CRS: sealed blobs waiting for their recipient,
//! and receipts waiting for their sender (delivered, or expired unread).
//!
//! The CRS cannot read a blob (it is sealed end to end, see
//! [`crate::crypto::offline`]); it keeps it with the clear fields it needs
//! to route, bound and expire it. A blob is deleted only when its
//! recipient's client acknowledges it, and in the same atomic step a
//! receipt is filed for its sender; a receipt is deleted when the sender's
//! client acknowledges it. Every entry has a number (`seq`) from one
//! sequence, increasing in the order entries were filed, so a reader can
//! page through a user's entries in order and ask only for newer ones.
//!
//! No foreign keys to users: mail for or from an account deleted
//! meanwhile simply expires.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{checked, StoreError};

/// One sealed message waiting for its recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMail {
    /// Its number in the store (assigned when it is filed).
    pub seq: u64,
    /// The sender's message id, lower-case hex (unique per recipient).
    pub id: String,
    /// Canonical sender.
    pub from: String,
    /// Canonical recipient.
    pub to: String,
    /// The sender's number of the message (for its receipt).
    pub number: u64,
    /// When the CRS filed it, seconds since 1970 (expiry counts from it).
    pub stored_unix: u64,
    /// The sealed blob, as the sender made it.
    #[serde(with = "super::bytes")]
    pub blob: Vec<u8>,
}

/// What became of a message, told to its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The recipient's client acknowledged it.
    Delivered,
    /// It waited longer than the CRS keeps messages; nobody read it.
    Expired,
}

impl Outcome {
    /// As stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Expired => "expired",
        }
    }

    /// From its stored form.
    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "delivered" => Some(Outcome::Delivered),
            "expired" => Some(Outcome::Expired),
            _ => None,
        }
    }
}

/// A receipt waiting for the sender of a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Its number in the store.
    pub seq: u64,
    /// The sender of the message, to whom the receipt goes.
    pub owner: String,
    /// The message's recipient.
    pub to: String,
    /// The message id (hex).
    pub id: String,
    /// The sender's number of the message.
    pub number: u64,
    /// What happened.
    pub outcome: Outcome,
    /// When it was filed.
    pub stored_unix: u64,
}

/// One entry waiting for a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailEntry {
    /// A message for them.
    Mail(StoredMail),
    /// A receipt for a message of theirs.
    Receipt(Receipt),
}

impl MailEntry {
    /// Its number.
    pub fn seq(&self) -> u64 {
        match self {
            MailEntry::Mail(m) => m.seq,
            MailEntry::Receipt(r) => r.seq,
        }
    }

    /// Bytes it costs in a reply (the blob; a receipt is small).
    pub fn size(&self) -> usize {
        match self {
            MailEntry::Mail(m) => m.blob.len(),
            MailEntry::Receipt(_) => 64,
        }
    }
}

/// The bounds a new message must stay within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MailLimits {
    /// Messages waiting for one recipient.
    pub per_recipient: u64,
    /// Bytes of blobs waiting for one recipient.
    pub bytes_per_recipient: u64,
    /// Messages of one sender waiting (for anyone).
    pub per_sender: u64,
    /// Bytes of one sender's blobs waiting.
    pub bytes_per_sender: u64,
}

impl Default for MailLimits {
    fn default() -> Self {
        MailLimits {
            per_recipient: 1000,
            bytes_per_recipient: 16 << 20,
            per_sender: 1000,
            bytes_per_sender: 16 << 20,
        }
    }
}

/// What [`MailStore::queue_mail`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// Filed.
    Stored,
    /// A message with this id waits for this recipient already (a
    /// retried request): nothing changed.
    Duplicate,
    /// The recipient's bounds would be passed: refused.
    RecipientFull,
    /// The sender's bounds would be passed: refused.
    SenderFull,
}

/// Count and bytes of a mailbox, for the bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Messages.
    pub count: u64,
    /// Bytes of their blobs.
    pub bytes: u64,
}

impl Tally {
    /// Whether one more message of `size` bytes fits under `count`, `bytes`.
    pub fn fits(&self, size: u64, count: u64, bytes: u64) -> bool {
        self.count < count && self.bytes.saturating_add(size) <= bytes
    }
}

/// The offline-message operations every store has. Each mutating call is
/// atomic and, for durable stores, on disk when it returns.
pub trait MailStore: Send + Sync {
    /// Files `mail` (its `seq` is assigned here) if the bounds allow.
    /// Names are canonicalized; `InvalidName` for bad ones.
    fn queue_mail(&self, mail: StoredMail, limits: &MailLimits) -> Result<Queued, StoreError>;

    /// Whether anything (messages or receipts) waits for `user`.
    fn has_mail(&self, user: &str) -> Result<bool, StoreError>;

    /// Entries waiting for `user` numbered after `after`, in order: at most
    /// `max_items`, and no more than `max_bytes` of blobs (but at least one
    /// entry when any waits).
    fn mail_for(
        &self,
        user: &str,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<MailEntry>, StoreError>;

    /// `user` acknowledges entries by id: their messages with those ids are
    /// deleted and a `Delivered` receipt filed for each sender, in one
    /// step; their receipts with those ids are deleted. Unknown ids are
    /// ignored. Returns the senders who got a receipt.
    fn ack_mail(&self, user: &str, ids: &[String]) -> Result<BTreeSet<String>, StoreError>;

    /// Deletes messages filed before `before` (seconds since 1970), filing
    /// an `Expired` receipt for each sender, and receipts filed before it.
    /// Returns the senders who got a receipt.
    fn expire_mail(&self, before: u64) -> Result<BTreeSet<String>, StoreError>;
}

/// The reference model (and [`super::MemStore`]'s mail): plain maps.
#[derive(Debug, Default)]
pub struct MemMail {
    next: u64,
    /// recipient -> seq -> message.
    mail: BTreeMap<String, BTreeMap<u64, StoredMail>>,
    /// owner -> seq -> receipt.
    receipts: BTreeMap<String, BTreeMap<u64, Receipt>>,
}

impl MemMail {
    fn seq(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn tally(&self, pick: impl Fn(&StoredMail) -> bool) -> Tally {
        let mut t = Tally::default();
        for m in self
            .mail
            .values()
            .flat_map(|b| b.values())
            .filter(|m| pick(m))
        {
            t.count += 1;
            t.bytes += m.blob.len() as u64;
        }
        t
    }

    /// See [`MailStore::queue_mail`].
    pub fn queue(&mut self, mut m: StoredMail, l: &MailLimits) -> Result<Queued, StoreError> {
        m.from = checked(&m.from)?;
        m.to = checked(&m.to)?;
        if self
            .mail
            .get(&m.to)
            .is_some_and(|b| b.values().any(|o| o.id == m.id))
        {
            return Ok(Queued::Duplicate);
        }
        let size = m.blob.len() as u64;
        if !self
            .tally(|o| o.to == m.to)
            .fits(size, l.per_recipient, l.bytes_per_recipient)
        {
            return Ok(Queued::RecipientFull);
        }
        if !self
            .tally(|o| o.from == m.from)
            .fits(size, l.per_sender, l.bytes_per_sender)
        {
            return Ok(Queued::SenderFull);
        }
        m.seq = self.seq();
        self.mail.entry(m.to.clone()).or_default().insert(m.seq, m);
        Ok(Queued::Stored)
    }

    /// See [`MailStore::has_mail`].
    pub fn has(&self, user: &str) -> Result<bool, StoreError> {
        let user = checked(user)?;
        Ok(self.mail.get(&user).is_some_and(|b| !b.is_empty())
            || self.receipts.get(&user).is_some_and(|b| !b.is_empty()))
    }

    /// See [`MailStore::mail_for`].
    pub fn entries(
        &self,
        user: &str,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<MailEntry>, StoreError> {
        let user = checked(user)?;
        let mut all: Vec<MailEntry> = Vec::new();
        if let Some(b) = self.mail.get(&user) {
            all.extend(
                b.range(newer(after))
                    .map(|(_, m)| MailEntry::Mail(m.clone())),
            );
        }
        if let Some(b) = self.receipts.get(&user) {
            all.extend(
                b.range(newer(after))
                    .map(|(_, r)| MailEntry::Receipt(r.clone())),
            );
        }
        all.sort_by_key(MailEntry::seq);
        Ok(page(all, max_items, max_bytes))
    }

    /// See [`MailStore::ack_mail`].
    pub fn ack(
        &mut self,
        user: &str,
        ids: &[String],
        now: u64,
    ) -> Result<BTreeSet<String>, StoreError> {
        let user = checked(user)?;
        let mut senders = BTreeSet::new();
        // In the order given: receipts are numbered in that order.
        for id in ids {
            if let Some(b) = self.receipts.get_mut(&user) {
                b.retain(|_, r| &r.id != id);
            }
            let taken = self.mail.get_mut(&user).and_then(|b| {
                let seq = b.values().find(|m| &m.id == id)?.seq;
                b.remove(&seq)
            });
            if let Some(m) = taken {
                self.file_receipt(&m, Outcome::Delivered, now);
                senders.insert(m.from);
            }
        }
        Ok(senders)
    }

    fn file_receipt(&mut self, m: &StoredMail, outcome: Outcome, now: u64) {
        let seq = self.seq();
        let owner = self.receipts.entry(m.from.clone()).or_default();
        // One receipt per (owner, id).
        owner.retain(|_, r| r.id != m.id);
        owner.insert(
            seq,
            Receipt {
                seq,
                owner: m.from.clone(),
                to: m.to.clone(),
                id: m.id.clone(),
                number: m.number,
                outcome,
                stored_unix: now,
            },
        );
    }

    /// See [`MailStore::expire_mail`].
    pub fn expire(&mut self, before: u64, now: u64) -> BTreeSet<String> {
        let mut gone = Vec::new();
        for b in self.mail.values_mut() {
            b.retain(|_, m| {
                let old = m.stored_unix < before;
                if old {
                    gone.push(m.clone());
                }
                !old
            });
        }
        for b in self.receipts.values_mut() {
            b.retain(|_, r| r.stored_unix >= before);
        }
        let mut senders = BTreeSet::new();
        for m in gone {
            self.file_receipt(&m, Outcome::Expired, now);
            senders.insert(m.from);
        }
        senders
    }
}

/// The first entries of `all` (in order) within the page bounds; at least
/// one when there is any.
pub(crate) fn page(all: Vec<MailEntry>, max_items: usize, max_bytes: usize) -> Vec<MailEntry> {
    let mut bytes = 0usize;
    let mut out = Vec::new();
    for e in all {
        bytes = bytes.saturating_add(e.size());
        if !out.is_empty() && (out.len() >= max_items || bytes > max_bytes) {
            break;
        }
        out.push(e);
    }
    out
}

/// The numbers after `after`.
fn newer(after: u64) -> (std::ops::Bound<u64>, std::ops::Bound<u64>) {
    (std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)
}

/// Seconds since 1970.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl MailStore for super::MemStore {
    fn queue_mail(&self, mail: StoredMail, limits: &MailLimits) -> Result<Queued, StoreError> {
        self.mail.lock().queue(mail, limits)
    }

    fn has_mail(&self, user: &str) -> Result<bool, StoreError> {
        self.mail.lock().has(user)
    }

    fn mail_for(
        &self,
        user: &str,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<MailEntry>, StoreError> {
        self.mail.lock().entries(user, after, max_items, max_bytes)
    }

    fn ack_mail(&self, user: &str, ids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        self.mail.lock().ack(user, ids, now_unix())
    }

    fn expire_mail(&self, before: u64) -> Result<BTreeSet<String>, StoreError> {
        Ok(self.mail.lock().expire(before, now_unix()))
    }
}
