//! Offline messages in the PostgreSQL store (see [`super::mail`] and the
//! tables of schema version 6).
//!
//! Each call is one transaction. The bounds of a new message are checked
//! under two advisory locks, its recipient's and its sender's (always in
//! that order, so two calls never wait on each other in a cycle), so that
//! several CRS instances filing at once cannot pass them together.

use std::collections::BTreeSet;

use super::mail::{
    now_unix, page, MailEntry, MailLimits, MailStore, Outcome, Queued, Receipt, StoredMail,
};
use super::pg::{PgConn, TxError};
use super::{checked, PgStore, StoreError};

/// Advisory-lock namespace of mailbox bounds ("ims-mail").
const MAIL_LOCK: i32 = 0x696d_6d6c;

fn i64_of(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{what} out of range")))
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn tally(tx: &mut PgConn<'_>, column: &'static str, name: &str) -> Result<(u64, u64), TxError> {
    let sql = match column {
        "recipient" => {
            "SELECT count(*), coalesce(sum(length(blob)), 0)::bigint FROM mail WHERE recipient = $1"
        }
        _ => "SELECT count(*), coalesce(sum(length(blob)), 0)::bigint FROM mail WHERE sender = $1",
    };
    let row = tx.query_one(sql, &[&name])?;
    Ok((u64_of(row.get(0)), u64_of(row.get(1))))
}

fn next_seq(tx: &mut PgConn<'_>) -> Result<i64, TxError> {
    Ok(tx.query_one("SELECT nextval('mail_seq')", &[])?.get(0))
}

/// Deletes the message `to`/`id` and files `outcome` for its sender;
/// the sender, if there was such a message.
fn settle(
    tx: &mut PgConn<'_>,
    to: &str,
    id: &str,
    outcome: Outcome,
    now: i64,
) -> Result<Option<String>, TxError> {
    let Some(row) = tx.query_opt(
        "DELETE FROM mail WHERE recipient = $1 AND id = $2 RETURNING sender, number",
        &[&to, &id],
    )?
    else {
        return Ok(None);
    };
    let sender: String = row.get(0);
    let number: i64 = row.get(1);
    let seq = next_seq(tx)?;
    tx.execute(
        "INSERT INTO receipts (seq, owner, recipient, id, number, outcome, stored_unix) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (owner, id) DO UPDATE SET seq = excluded.seq, outcome = excluded.outcome, \
         stored_unix = excluded.stored_unix",
        &[&seq, &sender, &to, &id, &number, &outcome.as_str(), &now],
    )?;
    Ok(Some(sender))
}

impl MailStore for PgStore {
    fn queue_mail(&self, mut m: StoredMail, l: &MailLimits) -> Result<Queued, StoreError> {
        m.from = checked(&m.from)?;
        m.to = checked(&m.to)?;
        let number = i64_of(m.number, "number")?;
        let stored = i64_of(m.stored_unix, "time")?;
        self.pool().tx(|tx| {
            for who in [format!("r:{}", m.to), format!("s:{}", m.from)] {
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                    &[&MAIL_LOCK, &who],
                )?;
            }
            if tx
                .query_opt(
                    "SELECT 1 FROM mail WHERE recipient = $1 AND id = $2",
                    &[&m.to, &m.id],
                )?
                .is_some()
            {
                return Ok(Queued::Duplicate);
            }
            let size = m.blob.len() as u64;
            let (count, bytes) = tally(tx, "recipient", &m.to)?;
            if count >= l.per_recipient || bytes.saturating_add(size) > l.bytes_per_recipient {
                return Ok(Queued::RecipientFull);
            }
            let (count, bytes) = tally(tx, "sender", &m.from)?;
            if count >= l.per_sender || bytes.saturating_add(size) > l.bytes_per_sender {
                return Ok(Queued::SenderFull);
            }
            let seq = next_seq(tx)?;
            tx.execute(
                "INSERT INTO mail (seq, id, recipient, sender, number, stored_unix, blob) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&seq, &m.id, &m.to, &m.from, &number, &stored, &m.blob],
            )?;
            Ok(Queued::Stored)
        })
    }

    fn has_mail(&self, user: &str) -> Result<bool, StoreError> {
        let user = checked(user)?;
        self.pool().tx(|tx| {
            Ok(tx
                .query_opt(
                    "SELECT 1 WHERE EXISTS (SELECT 1 FROM mail WHERE recipient = $1) \
                     OR EXISTS (SELECT 1 FROM receipts WHERE owner = $1)",
                    &[&user],
                )?
                .is_some())
        })
    }

    fn mail_for(
        &self,
        user: &str,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<MailEntry>, StoreError> {
        let user = checked(user)?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(max_items).unwrap_or(i64::MAX);
        let mut all = self.pool().tx(|tx| {
            let mut all = Vec::new();
            for row in tx.query(
                "SELECT seq, id, sender, number, stored_unix, blob FROM mail \
                 WHERE recipient = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&user, &after, &limit],
            )? {
                all.push(MailEntry::Mail(StoredMail {
                    seq: u64_of(row.get(0)),
                    id: row.get(1),
                    from: row.get(2),
                    to: user.clone(),
                    number: u64_of(row.get(3)),
                    stored_unix: u64_of(row.get(4)),
                    blob: row.get(5),
                }));
            }
            for row in tx.query(
                "SELECT seq, recipient, id, number, outcome, stored_unix FROM receipts \
                 WHERE owner = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[&user, &after, &limit],
            )? {
                let outcome: String = row.get(4);
                all.push(MailEntry::Receipt(Receipt {
                    seq: u64_of(row.get(0)),
                    owner: user.clone(),
                    to: row.get(1),
                    id: row.get(2),
                    number: u64_of(row.get(3)),
                    outcome: Outcome::parse(&outcome).ok_or_else(|| {
                        StoreError::Corrupt(format!("receipt outcome {outcome:?}"))
                    })?,
                    stored_unix: u64_of(row.get(5)),
                }));
            }
            Ok(all)
        })?;
        all.sort_by_key(MailEntry::seq);
        Ok(page(all, max_items, max_bytes))
    }

    fn ack_mail(&self, user: &str, ids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        let user = checked(user)?;
        let now = i64_of(now_unix(), "time")?;
        self.pool().tx(|tx| {
            let mut senders = BTreeSet::new();
            for id in ids {
                tx.execute(
                    "DELETE FROM receipts WHERE owner = $1 AND id = $2",
                    &[&user, id],
                )?;
                if let Some(s) = settle(tx, &user, id, Outcome::Delivered, now)? {
                    senders.insert(s);
                }
            }
            Ok(senders)
        })
    }

    fn expire_mail(&self, before: u64) -> Result<BTreeSet<String>, StoreError> {
        let before = i64::try_from(before).unwrap_or(i64::MAX);
        let now = i64_of(now_unix(), "time")?;
        self.pool().tx(|tx| {
            tx.execute("DELETE FROM receipts WHERE stored_unix < $1", &[&before])?;
            let old = tx.query(
                "SELECT recipient, id FROM mail WHERE stored_unix < $1 ORDER BY recipient, seq",
                &[&before],
            )?;
            let mut senders = BTreeSet::new();
            for row in old {
                let (to, id): (String, String) = (row.get(0), row.get(1));
                if let Some(s) = settle(tx, &to, &id, Outcome::Expired, now)? {
                    senders.insert(s);
                }
            }
            Ok(senders)
        })
    }
}
