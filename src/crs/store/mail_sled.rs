//! Offline messages in the sled store (see [`super::mail`]).
//!
//! Five trees, every change one transaction over all of them, flushed
//! before the call returns (as every sled write of the CRS):
//! - `mail`: recipient `0x00` seq (8 bytes, big-endian) -> JSON
//!   [`StoredMail`]; names hold no `0x00`, so a recipient's entries are one
//!   prefix, in order;
//! - `mail_ids`: recipient `0x00` id -> seq, to find a message by id;
//! - `mail_tally`: `r` `0x00` recipient, or `s` `0x00` sender -> JSON
//!   [`Tally`] of the messages waiting, for the bounds;
//! - `receipts`: owner `0x00` seq -> JSON [`Receipt`];
//! - `receipt_ids`: owner `0x00` id -> seq.
//!
//! Numbers come from a counter kept in `mail_tally` under the key
//! [`SEQ_KEY`] (no name starts with `0xff`), taken inside the transaction
//! that files the entry, so they increase across restarts and crashes
//! (sled's own id generator may hand out lower ids again after a kill).
//! The first is 1, so that `after = 0` means "from the start".

use std::collections::BTreeSet;

use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use super::mail::{
    now_unix, page, MailEntry, MailLimits, MailStore, Outcome, Queued, Receipt, StoredMail, Tally,
};
use super::{checked, SledStore, StoreError};

/// The trees; opened with the store.
#[derive(Debug)]
pub struct MailTrees {
    mail: sled::Tree,
    ids: sled::Tree,
    tally: sled::Tree,
    receipts: sled::Tree,
    receipt_ids: sled::Tree,
}

type Tx<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// Key of the last number given out, in `mail_tally`.
const SEQ_KEY: &[u8] = b"\xffseq";

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn abort<T>(e: StoreError) -> Tx<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn key(name: &str, tail: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 1 + tail.len());
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(tail);
    k
}

fn prefix(name: &str) -> Vec<u8> {
    key(name, &[])
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Backend(format!("encode: {e}")))
}

fn seq_of(bytes: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt("mail index".into()))
}

/// The trees inside one transaction.
struct T<'a> {
    mail: &'a TransactionalTree,
    ids: &'a TransactionalTree,
    tally: &'a TransactionalTree,
    receipts: &'a TransactionalTree,
    receipt_ids: &'a TransactionalTree,
}

impl T<'_> {
    /// The next number, taken in this transaction.
    fn next_seq(&self) -> Tx<u64> {
        let last = match self.tally.get(SEQ_KEY)? {
            None => 0,
            Some(v) => seq_of(&v).or_else(abort)?,
        };
        let Some(next) = last.checked_add(1) else {
            return abort(StoreError::Backend("mail numbers exhausted".into()));
        };
        self.tally.insert(SEQ_KEY, &next.to_be_bytes())?;
        Ok(next)
    }

    fn tally(&self, k: &[u8]) -> Tx<Tally> {
        match self.tally.get(k)? {
            None => Ok(Tally::default()),
            Some(v) => decode("mail tally", &v).or_else(abort),
        }
    }

    fn set_tally(&self, k: &[u8], t: Tally) -> Tx<()> {
        if t.count == 0 {
            self.tally.remove(k)?;
        } else {
            self.tally.insert(k, encode(&t).or_else(abort)?)?;
        }
        Ok(())
    }

    /// Adds (`sign` > 0) or takes away a message from both tallies.
    fn count(&self, m: &StoredMail, add: bool) -> Tx<()> {
        for k in [key("r", m.to.as_bytes()), key("s", m.from.as_bytes())] {
            let mut t = self.tally(&k)?;
            let size = m.blob.len() as u64;
            if add {
                t.count += 1;
                t.bytes = t.bytes.saturating_add(size);
            } else {
                t.count = t.count.saturating_sub(1);
                t.bytes = t.bytes.saturating_sub(size);
            }
            self.set_tally(&k, t)?;
        }
        Ok(())
    }

    /// Removes the message `to`/`id`; it, if it was there.
    fn take_mail(&self, to: &str, id: &str) -> Tx<Option<StoredMail>> {
        let Some(seq) = self.ids.remove(key(to, id.as_bytes()))? else {
            return Ok(None);
        };
        let seq = seq_of(&seq).or_else(abort)?;
        let Some(v) = self.mail.remove(key(to, &seq.to_be_bytes()))? else {
            return Ok(None);
        };
        let m: StoredMail = decode("mail", &v).or_else(abort)?;
        self.count(&m, false)?;
        Ok(Some(m))
    }

    fn drop_receipt(&self, owner: &str, id: &str) -> Tx<()> {
        if let Some(seq) = self.receipt_ids.remove(key(owner, id.as_bytes()))? {
            let seq = seq_of(&seq).or_else(abort)?;
            self.receipts.remove(key(owner, &seq.to_be_bytes()))?;
        }
        Ok(())
    }

    fn file_receipt(&self, m: &StoredMail, outcome: Outcome, now: u64) -> Tx<()> {
        self.drop_receipt(&m.from, &m.id)?;
        let seq = self.next_seq()?;
        let r = Receipt {
            seq,
            owner: m.from.clone(),
            to: m.to.clone(),
            id: m.id.clone(),
            number: m.number,
            outcome,
            stored_unix: now,
        };
        self.receipts.insert(
            key(&r.owner, &seq.to_be_bytes()),
            encode(&r).or_else(abort)?,
        )?;
        self.receipt_ids
            .insert(key(&r.owner, r.id.as_bytes()), &seq.to_be_bytes())?;
        Ok(())
    }
}

impl MailTrees {
    /// Opens (creating) the trees in `db`.
    pub fn open(db: &sled::Db) -> Result<MailTrees, StoreError> {
        let t = |n: &str| db.open_tree(n).map_err(backend);
        Ok(MailTrees {
            mail: t("mail")?,
            ids: t("mail_ids")?,
            tally: t("mail_tally")?,
            receipts: t("receipts")?,
            receipt_ids: t("receipt_ids")?,
        })
    }
}

impl SledStore {
    fn mail_write<R>(&self, f: impl Fn(&T<'_>) -> Tx<R>) -> Result<R, StoreError> {
        let m = &self.mail;
        let value = (&m.mail, &m.ids, &m.tally, &m.receipts, &m.receipt_ids)
            .transaction(|(mail, ids, tally, receipts, receipt_ids)| {
                f(&T {
                    mail,
                    ids,
                    tally,
                    receipts,
                    receipt_ids,
                })
            })
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => backend(e),
            })?;
        self.db.flush().map_err(backend)?;
        Ok(value)
    }
}

impl MailStore for SledStore {
    fn queue_mail(&self, mut m: StoredMail, l: &MailLimits) -> Result<Queued, StoreError> {
        m.from = checked(&m.from)?;
        m.to = checked(&m.to)?;
        self.mail_write(|t| {
            let mut m = m.clone();
            if t.ids.get(key(&m.to, m.id.as_bytes()))?.is_some() {
                return Ok(Queued::Duplicate);
            }
            let size = m.blob.len() as u64;
            if !t.tally(&key("r", m.to.as_bytes()))?.fits(
                size,
                l.per_recipient,
                l.bytes_per_recipient,
            ) {
                return Ok(Queued::RecipientFull);
            }
            if !t
                .tally(&key("s", m.from.as_bytes()))?
                .fits(size, l.per_sender, l.bytes_per_sender)
            {
                return Ok(Queued::SenderFull);
            }
            m.seq = t.next_seq()?;
            t.mail
                .insert(key(&m.to, &m.seq.to_be_bytes()), encode(&m).or_else(abort)?)?;
            t.ids
                .insert(key(&m.to, m.id.as_bytes()), &m.seq.to_be_bytes())?;
            t.count(&m, true)?;
            Ok(Queued::Stored)
        })
    }

    fn has_mail(&self, user: &str) -> Result<bool, StoreError> {
        let p = prefix(&checked(user)?);
        Ok(self.mail.mail.scan_prefix(&p).next().is_some()
            || self.mail.receipts.scan_prefix(&p).next().is_some())
    }

    fn mail_for(
        &self,
        user: &str,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<MailEntry>, StoreError> {
        let user = checked(user)?;
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let start = key(&user, &first.to_be_bytes());
        let end = key(&user, &[0xff; 9]);
        let mut all = Vec::new();
        // Each tree is in order; one page of each is enough for the merge.
        for kv in self
            .mail
            .mail
            .range(start.clone()..end.clone())
            .take(max_items)
        {
            let (_, v) = kv.map_err(backend)?;
            all.push(MailEntry::Mail(decode("mail", &v)?));
        }
        for kv in self.mail.receipts.range(start..end).take(max_items) {
            let (_, v) = kv.map_err(backend)?;
            all.push(MailEntry::Receipt(decode("receipt", &v)?));
        }
        all.sort_by_key(MailEntry::seq);
        Ok(page(all, max_items, max_bytes))
    }

    fn ack_mail(&self, user: &str, ids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        let user = checked(user)?;
        let now = now_unix();
        self.mail_write(|t| {
            let mut senders = BTreeSet::new();
            for id in ids {
                t.drop_receipt(&user, id)?;
                if let Some(m) = t.take_mail(&user, id)? {
                    t.file_receipt(&m, Outcome::Delivered, now)?;
                    senders.insert(m.from);
                }
            }
            Ok(senders)
        })
    }

    fn expire_mail(&self, before: u64) -> Result<BTreeSet<String>, StoreError> {
        let mut old = Vec::new();
        for kv in self.mail.mail.iter() {
            let (_, v) = kv.map_err(backend)?;
            let m: StoredMail = decode("mail", &v)?;
            if m.stored_unix < before {
                old.push((m.to, m.id));
            }
        }
        let mut old_receipts = Vec::new();
        for kv in self.mail.receipts.iter() {
            let (_, v) = kv.map_err(backend)?;
            let r: Receipt = decode("receipt", &v)?;
            if r.stored_unix < before {
                old_receipts.push((r.owner, r.id));
            }
        }
        let mut senders = BTreeSet::new();
        if !old_receipts.is_empty() {
            self.mail_write(|t| {
                for (owner, id) in &old_receipts {
                    t.drop_receipt(owner, id)?;
                }
                Ok(())
            })?;
        }
        let now = now_unix();
        for (to, id) in old {
            if let Some(from) = self.mail_write(|t| {
                // Acknowledged meanwhile: nothing to expire.
                let Some(m) = t.take_mail(&to, &id)? else {
                    return Ok(None);
                };
                t.file_receipt(&m, Outcome::Expired, now)?;
                Ok(Some(m.from))
            })? {
                senders.insert(from);
            }
        }
        Ok(senders)
    }
}
