//! `SledStore`: the durable [`Store`] on sled 0.34.
//!
//! Layout, two trees:
//! - `users`: canonical name -> JSON-encoded [`User`]. Keys are canonical, so
//!   case-insensitive uniqueness needs no extra index;
//! - `outbox`: sender name -> JSON set of the users holding a pending request
//!   from that sender. It is the reverse index of `User::requests`, kept so
//!   `delete_user` can withdraw a user's outstanding requests inside one
//!   transaction (sled transactions cannot scan). Invariant: `r` is in
//!   `outbox[s]` iff `users[r].requests` holds a request from `s`; empty sets
//!   are not stored.
//!
//! Every mutation is a single multi-tree sled transaction over both trees, so
//! a two-user change (buddies, requests, deletion) lands entirely or not at
//! all, and concurrent callers cannot lose updates (in sled 0.34 transactions
//! are serialized by a global lock and retried on conflict). After the
//! transaction commits, `Db::flush` is called before returning, so an
//! acknowledged write survives kill -9.
//!
//! Reads never panic on bad bytes: an undecodable record is
//! [`StoreError::Corrupt`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::path::Path;

use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError,
    TransactionalTree,
};
use sled::Transactional;

use super::{
    checked, search_matches, BuddyRequest, ContactView, SearchHit, StatusFields, Store, StoreError,
    User, Verifier,
};

/// Durable store on sled; see the module documentation.
#[derive(Debug)]
pub struct SledStore {
    pub(super) db: sled::Db,
    users: sled::Tree,
    outbox: sled::Tree,
    /// Offline messages and receipts (see [`super::mail_sled`]).
    pub(super) mail: super::mail_sled::MailTrees,
}

/// Result type inside a transaction closure.
type TxResult<T> = ConflictableTransactionResult<T, StoreError>;

fn backend(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// A `users` record, whole or some of its fields: it names its user.
trait UserRecord: serde::de::DeserializeOwned {
    fn name(&self) -> &str;
}

impl UserRecord for User {
    fn name(&self) -> &str {
        &self.name
    }
}

/// Decodes a `users` record (or the fields `T` takes of it), checking it
/// belongs under `key`.
fn decode_record<T: UserRecord>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let shown = String::from_utf8_lossy(key);
    let record: T = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("user {shown:?}: {e}")))?;
    if record.name().as_bytes() != key {
        return Err(StoreError::Corrupt(format!(
            "user {shown:?}: record names {:?}",
            record.name()
        )));
    }
    Ok(record)
}

/// Decodes a whole `users` record, checking it belongs under `key`.
fn decode_user(key: &[u8], bytes: &[u8]) -> Result<User, StoreError> {
    decode_record(key, bytes)
}

/// The fields of a user record that [`Store::contact_views`] needs; the
/// others (keys, profile, contacts) are skipped by the parser, not
/// decoded.
#[derive(serde::Deserialize)]
struct ViewFields {
    name: String,
    #[serde(default)]
    blocked: BTreeSet<String>,
    #[serde(default)]
    status: crate::proto::status::Status,
    #[serde(default)]
    status_message: String,
}

/// The fields of a user record that [`Store::get_verifier`] needs.
#[derive(serde::Deserialize)]
struct VerifierFields {
    name: String,
    verifier: Verifier,
}

impl UserRecord for ViewFields {
    fn name(&self) -> &str {
        &self.name
    }
}

impl UserRecord for VerifierFields {
    fn name(&self) -> &str {
        &self.name
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    // Cannot fail for these plain types; mapped rather than unwrapped anyway.
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("encode: {e}")))
}

fn tx_get_user(users: &TransactionalTree, name: &str) -> TxResult<Option<User>> {
    match users.get(name.as_bytes())? {
        None => Ok(None),
        Some(v) => match decode_user(name.as_bytes(), &v) {
            Ok(u) => Ok(Some(u)),
            Err(e) => abort(e),
        },
    }
}

fn tx_need_user(users: &TransactionalTree, name: &str) -> TxResult<User> {
    match tx_get_user(users, name)? {
        Some(u) => Ok(u),
        None => abort(StoreError::NoSuchUser),
    }
}

fn tx_put_user(users: &TransactionalTree, user: &User) -> TxResult<()> {
    let bytes = match encode(user) {
        Ok(b) => b,
        Err(e) => return abort(e),
    };
    users.insert(user.name.as_bytes(), bytes)?;
    Ok(())
}

/// Applies `edit` to `outbox[from]`, dropping the entry when it empties.
fn tx_edit_outbox(
    outbox: &TransactionalTree,
    from: &str,
    edit: impl FnOnce(&mut BTreeSet<String>),
) -> TxResult<()> {
    let mut set: BTreeSet<String> = match outbox.get(from.as_bytes())? {
        None => BTreeSet::new(),
        Some(v) => match serde_json::from_slice(&v) {
            Ok(s) => s,
            Err(e) => return abort(StoreError::Corrupt(format!("outbox {from:?}: {e}"))),
        },
    };
    edit(&mut set);
    if set.is_empty() {
        outbox.remove(from.as_bytes())?;
    } else {
        let bytes = match encode(&set) {
            Ok(b) => b,
            Err(e) => return abort(e),
        };
        outbox.insert(from.as_bytes(), bytes)?;
    }
    Ok(())
}

/// Removes the request from `from` out of `user`; whether there was one.
fn drop_request(user: &mut User, from: &str) -> bool {
    let before = user.requests.len();
    user.requests.retain(|r| r.from != from);
    user.requests.len() != before
}

/// How long `open` waits for the database lock: a handle dropped in this
/// process releases it only when sled's flusher thread has finished.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether sled refused to open because another handle holds the lock
/// (sled reports it as an `Other` I/O error, so its text is all there is).
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Opens the database, waiting briefly for a lock that is being released.
fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let start = std::time::Instant::now();
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(e) if is_locked(&e) && start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) if is_locked(&e) => {
                return Err(StoreError::Backend(format!(
                    "{} is in use by another process (is a CRS already running?)",
                    dir.display()
                )));
            }
            Err(e) => return Err(backend(e)),
        }
    }
}

impl SledStore {
    /// Opens (creating if needed) the store in directory `dir`. Fails with
    /// `Backend` if the directory is unusable or already open (sled holds a
    /// file lock).
    pub fn open(dir: &Path) -> Result<SledStore, StoreError> {
        // Default (LowSpace) mode: the CRS write rate is low, and durability
        // comes from the explicit flush after each mutation either way.
        let db = open_db(dir)?;
        let users = db.open_tree("users").map_err(backend)?;
        let outbox = db.open_tree("outbox").map_err(backend)?;
        let mail = super::mail_sled::MailTrees::open(&db)?;
        Ok(SledStore {
            db,
            users,
            outbox,
            mail,
        })
    }

    /// Runs `f` as one transaction over both trees, then flushes to disk.
    fn write<T>(
        &self,
        f: impl Fn(&TransactionalTree, &TransactionalTree) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        let value = (&self.users, &self.outbox)
            .transaction(|(users, outbox)| f(users, outbox))
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => backend(e),
            })?;
        self.db.flush().map_err(backend)?;
        Ok(value)
    }

    /// Full consistency check (an fsck; reads the whole store, not for hot
    /// paths): every record decodes under its key, contacts are mutual and
    /// name existing users, requests come from existing non-buddies, at most
    /// one per sender, and the `outbox` index matches the requests exactly.
    /// The first violation found is reported as `Corrupt`. Not atomic with
    /// respect to concurrent writers: run it on a quiet store.
    pub fn check_integrity(&self) -> Result<(), StoreError> {
        let mut users = BTreeMap::new();
        for kv in self.users.iter() {
            let (k, v) = kv.map_err(backend)?;
            let user = decode_user(&k, &v)?;
            users.insert(user.name.clone(), user);
        }
        let bad = |what: String| Err(StoreError::Corrupt(what));
        let mut derived: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, user) in &users {
            for c in &user.contacts {
                if !users.get(c).is_some_and(|o| o.contacts.contains(name)) {
                    return bad(format!("contact {name:?} -> {c:?} is not mutual"));
                }
            }
            for r in &user.requests {
                if !users.contains_key(&r.from) || user.contacts.contains(&r.from) {
                    return bad(format!("request {:?} -> {name:?} is stale", r.from));
                }
                if !derived
                    .entry(r.from.clone())
                    .or_default()
                    .insert(name.clone())
                {
                    return bad(format!("two requests {:?} -> {name:?}", r.from));
                }
            }
        }
        let mut stored = BTreeMap::new();
        for kv in self.outbox.iter() {
            let (k, v) = kv.map_err(backend)?;
            let from = String::from_utf8_lossy(&k).into_owned();
            let set: BTreeSet<String> = serde_json::from_slice(&v)
                .map_err(|e| StoreError::Corrupt(format!("outbox {from:?}: {e}")))?;
            stored.insert(from, set);
        }
        if stored != derived {
            return bad(format!(
                "request index {stored:?} does not match requests {derived:?}"
            ));
        }
        Ok(())
    }

    /// Loads many users at once into a store nobody else uses yet (an
    /// import, or a benchmark's data set): the records are written in one
    /// batch, without transactions, with one flush at the end. Records are
    /// stored as given, contacts and requests included, replacing any of the
    /// same name; the `outbox` index is rebuilt for the requests loaded. The
    /// caller guarantees what the transactional calls would: contacts are
    /// mutual and name loaded users, requests come from loaded non-buddies
    /// (see [`SledStore::check_integrity`]). Names are validated and
    /// canonicalized; on an invalid one nothing is written.
    pub fn bulk_load(&self, users: impl IntoIterator<Item = User>) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let mut outbox: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut count = 0u64;
        for mut user in users {
            user.name = checked(&user.name)?;
            for r in &mut user.requests {
                r.from = checked(&r.from)?;
                outbox
                    .entry(r.from.clone())
                    .or_default()
                    .insert(user.name.clone());
            }
            batch.insert(user.name.as_bytes(), encode(&user)?);
            count += 1;
        }
        self.users.apply_batch(batch).map_err(backend)?;
        let mut index = sled::Batch::default();
        for (from, to) in &outbox {
            index.insert(from.as_bytes(), encode(to)?);
        }
        self.outbox.apply_batch(index).map_err(backend)?;
        self.db.flush().map_err(backend)?;
        Ok(count)
    }

    /// Decodes the [`ViewFields`] of each registered user of `names` (in
    /// name order), skipping the rest of each record.
    fn read_status_fields(
        &self,
        names: &BTreeSet<String>,
        mut each: impl FnMut(ViewFields),
    ) -> Result<(), StoreError> {
        for name in names {
            let name = checked(name)?;
            let Some(v) = self.users.get(name.as_bytes()).map_err(backend)? else {
                continue;
            };
            each(decode_record(name.as_bytes(), &v)?);
        }
        Ok(())
    }

    /// Reads one user outside a transaction.
    fn read_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        match self.users.get(name.as_bytes()).map_err(backend)? {
            None => Ok(None),
            Some(v) => decode_user(name.as_bytes(), &v).map(Some),
        }
    }
}

impl Store for SledStore {
    fn get_verifier(&self, name: &str) -> Result<Option<Verifier>, StoreError> {
        let name = checked(name)?;
        let Some(v) = self.users.get(name.as_bytes()).map_err(backend)? else {
            return Ok(None);
        };
        let f: VerifierFields = decode_record(name.as_bytes(), &v)?;
        Ok(Some(f.verifier))
    }

    fn contact_views(
        &self,
        viewer: &str,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, ContactView>, StoreError> {
        let viewer = checked(viewer)?;
        let mut views = BTreeMap::new();
        self.read_status_fields(names, |f| {
            let view = ContactView {
                status: f.status,
                status_message: f.status_message,
                blocks_viewer: f.blocked.contains(&viewer),
            };
            views.insert(f.name, view);
        })?;
        Ok(views)
    }

    fn status_fields(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, StatusFields>, StoreError> {
        let mut fields = BTreeMap::new();
        self.read_status_fields(names, |f| {
            let status = StatusFields {
                status: f.status,
                status_message: f.status_message,
                blocked: f.blocked,
            };
            fields.insert(f.name, status);
        })?;
        Ok(fields)
    }

    fn create_user(&self, mut user: User) -> Result<(), StoreError> {
        let name = checked(&user.name)?;
        user.name = name.clone();
        user.contacts.clear();
        user.requests.clear();
        self.write(|users, outbox| {
            if users.get(name.as_bytes())?.is_some() {
                return abort(StoreError::NameTaken);
            }
            tx_put_user(users, &user)?;
            // By the invariant there is no outbox entry for an absent user;
            // clear one anyway so a new owner of the name never inherits it.
            outbox.remove(name.as_bytes())?;
            Ok(())
        })
    }

    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.read_user(&checked(name)?)
    }

    fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        let name = checked(name)?;
        self.write(|users, outbox| {
            let Some(user) = tx_get_user(users, &name)? else {
                return Ok(false);
            };
            for c in &user.contacts {
                if let Some(mut buddy) = tx_get_user(users, c)? {
                    buddy.contacts.remove(&name);
                    tx_put_user(users, &buddy)?;
                }
            }
            // Withdraw the requests this user sent.
            let mut sent = BTreeSet::new();
            tx_edit_outbox(outbox, &name, |set| sent = std::mem::take(set))?;
            for r in &sent {
                if let Some(mut recipient) = tx_get_user(users, r)? {
                    drop_request(&mut recipient, &name);
                    tx_put_user(users, &recipient)?;
                }
            }
            // And forget the requests it received.
            for req in &user.requests {
                tx_edit_outbox(outbox, &req.from, |set| {
                    set.remove(&name);
                })?;
            }
            users.remove(name.as_bytes())?;
            Ok(true)
        })
    }

    fn list_users(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let start = match after {
            Some(a) => Bound::Excluded(super::canonical(a).into_bytes()),
            None => Bound::Unbounded,
        };
        let mut names = Vec::new();
        for kv in self.users.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            if names.len() >= limit {
                break;
            }
            let (k, _) = kv.map_err(backend)?;
            let name = String::from_utf8(k.to_vec())
                .map_err(|_| StoreError::Corrupt(format!("user key {:?}", k.as_ref())))?;
            names.push(name);
        }
        Ok(names)
    }

    fn user_count(&self) -> Result<u64, StoreError> {
        // sled's len() walks the tree; fine at CRS scale.
        Ok(self.users.len() as u64)
    }

    fn set_credentials(
        &self,
        name: &str,
        verifier: Verifier,
        wrapped_private_key: Vec<u8>,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        self.write(|users, _| {
            let mut user = tx_need_user(users, &name)?;
            user.verifier = verifier.clone();
            user.wrapped_private_key = wrapped_private_key.clone();
            tx_put_user(users, &user)
        })
    }

    fn set_blocked(&self, name: &str, who: &str, on: bool) -> Result<bool, StoreError> {
        let name = checked(name)?;
        let who = checked(who)?;
        if name == who {
            return Err(StoreError::SameUser);
        }
        self.write(|users, _| {
            let mut user = tx_need_user(users, &name)?;
            let changed = if on {
                user.blocked.insert(who.clone())
            } else {
                user.blocked.remove(&who)
            };
            tx_put_user(users, &user)?;
            Ok(changed)
        })
    }

    fn set_status(
        &self,
        name: &str,
        status: crate::proto::status::Status,
        message: &str,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        self.write(|users, _| {
            let mut user = tx_need_user(users, &name)?;
            user.status = status;
            user.status_message = message.to_owned();
            tx_put_user(users, &user)
        })
    }

    fn set_profile(&self, name: &str, profile: BTreeMap<String, String>) -> Result<(), StoreError> {
        let name = checked(name)?;
        self.write(|users, _| {
            let mut user = tx_need_user(users, &name)?;
            user.profile = profile.clone();
            tx_put_user(users, &user)
        })
    }

    fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, StoreError> {
        // A full scan in key (name) order, stopping at `limit` hits. Good
        // enough for the expected user counts; an index over profile words
        // would be the next step if searches get slow.
        let needle = text.to_lowercase();
        let mut hits = Vec::new();
        for kv in self.users.iter() {
            if hits.len() >= limit {
                break;
            }
            let (k, v) = kv.map_err(backend)?;
            let user = decode_user(&k, &v)?;
            if search_matches(&needle, &user) {
                hits.push(SearchHit {
                    name: user.name,
                    profile: user.profile,
                });
            }
        }
        Ok(hits)
    }

    fn add_request(&self, to: &str, req: BuddyRequest) -> Result<(), StoreError> {
        let to = checked(to)?;
        let from = checked(&req.from)?;
        if to == from {
            return Err(StoreError::SameUser);
        }
        let req = BuddyRequest {
            from: from.clone(),
            ..req
        };
        self.write(|users, outbox| {
            let mut recipient = tx_need_user(users, &to)?;
            if users.get(from.as_bytes())?.is_none() {
                return abort(StoreError::NoSuchUser);
            }
            if recipient.contacts.contains(&from) {
                return abort(StoreError::AlreadyBuddies);
            }
            drop_request(&mut recipient, &from);
            recipient.requests.push(req.clone());
            tx_put_user(users, &recipient)?;
            tx_edit_outbox(outbox, &from, |set| {
                set.insert(to.clone());
            })
        })
    }

    fn take_requests(&self, name: &str) -> Result<Vec<BuddyRequest>, StoreError> {
        let name = checked(name)?;
        self.write(|users, outbox| {
            let mut user = tx_need_user(users, &name)?;
            let taken = std::mem::take(&mut user.requests);
            if taken.is_empty() {
                return Ok(taken);
            }
            tx_put_user(users, &user)?;
            for req in &taken {
                tx_edit_outbox(outbox, &req.from, |set| {
                    set.remove(&name);
                })?;
            }
            Ok(taken)
        })
    }

    fn remove_request(&self, to: &str, from: &str) -> Result<bool, StoreError> {
        let to = checked(to)?;
        let from = checked(from)?;
        self.write(|users, outbox| {
            let mut user = tx_need_user(users, &to)?;
            if !drop_request(&mut user, &from) {
                return Ok(false);
            }
            tx_put_user(users, &user)?;
            tx_edit_outbox(outbox, &from, |set| {
                set.remove(&to);
            })?;
            Ok(true)
        })
    }

    fn make_buddies(&self, a: &str, b: &str) -> Result<(), StoreError> {
        let a = checked(a)?;
        let b = checked(b)?;
        if a == b {
            return Err(StoreError::SameUser);
        }
        self.write(|users, outbox| {
            let mut ua = tx_need_user(users, &a)?;
            let mut ub = tx_need_user(users, &b)?;
            for (me, user, other) in [(&a, &mut ua, &b), (&b, &mut ub, &a)] {
                user.contacts.insert(other.clone());
                if drop_request(user, other) {
                    tx_edit_outbox(outbox, other, |set| {
                        set.remove(me);
                    })?;
                }
                tx_put_user(users, user)?;
            }
            Ok(())
        })
    }

    fn remove_buddies(&self, a: &str, b: &str) -> Result<bool, StoreError> {
        let a = checked(a)?;
        let b = checked(b)?;
        if a == b {
            return Err(StoreError::SameUser);
        }
        self.write(|users, _| {
            let mut ua = tx_need_user(users, &a)?;
            let mut ub = tx_need_user(users, &b)?;
            let mut removed = false;
            for (user, other) in [(&mut ua, &b), (&mut ub, &a)] {
                if user.contacts.remove(other) {
                    removed = true;
                    tx_put_user(users, user)?;
                }
            }
            Ok(removed)
        })
    }

    fn contacts(&self, name: &str) -> Result<BTreeSet<String>, StoreError> {
        let name = checked(name)?;
        self.read_user(&name)?
            .map(|u| u.contacts)
            .ok_or(StoreError::NoSuchUser)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, contacts: &[&str], requests_from: &[&str]) -> User {
        User {
            name: name.to_owned(),
            verifier: Verifier {
                salt: vec![1; 16],
                iterations: 1000,
                stored_key: vec![2; 32],
                server_key: vec![3; 32],
            },
            public_key: vec![4; 8],
            contacts: contacts.iter().map(|c| c.to_string()).collect(),
            requests: requests_from
                .iter()
                .map(|f| BuddyRequest {
                    from: f.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn bulk_load_keeps_the_invariants_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let n = s
                .bulk_load([
                    user("Ann", &["bob"], &[]),
                    user("bob", &["ann"], &[]),
                    user("cy", &[], &["ann", "bob"]),
                ])
                .unwrap();
            assert_eq!(n, 3);
            s.check_integrity().unwrap();
            assert_eq!(s.contacts("ann").unwrap().len(), 1);
            // The index works for the transactional calls that follow.
            assert!(s.remove_request("cy", "bob").unwrap());
            s.delete_user("ann").unwrap();
            s.check_integrity().unwrap();
            assert!(s.get_user("cy").unwrap().unwrap().requests.is_empty());
            assert_eq!(
                s.bulk_load([user("x y", &[], &[])]),
                Err(StoreError::InvalidName)
            );
        }
        let s = SledStore::open(dir.path()).unwrap();
        assert_eq!(s.list_users(None, 10).unwrap(), vec!["bob", "cy"]);
        s.check_integrity().unwrap();
    }
}
