//! `CachedStore`: an in-memory read cache in front of a [`Store`] that this
//! process alone writes (the sled store: one process owns a sled database).
//! With PostgreSQL several CRS instances write one database, and a cache in
//! one of them would miss the others' writes, so none is used there.
//!
//! What it keeps is what logins read, so that a login decodes no record:
//! per user, the fields that decide how the user shows to a buddy (status,
//! personal message and the set of users blocked, [`StatusFields`], from
//! which [`Store::contact_views`] is answered for any viewer), the buddy
//! set ([`Store::contacts`]) and the password verifier
//! ([`Store::get_verifier`]); and whole records ([`Store::get_user`]), fewer
//! of them since each carries about 2 KB of keys. Nothing is kept of an
//! unregistered name (a miss asks the backend every time), so probing
//! names cannot fill the cache with nothing.
//!
//! The rule that keeps it right: **a read never returns, nor caches, a
//! value older than a write that has returned.**
//! - Every mutating call names the users whose records it may change
//!   ([`Touched`]) and brackets the backend write with two marks on each
//!   (for `delete_user`, whose changes reach the deleted user's buddies
//!   and the recipients of its pending requests, which only the backend
//!   knows: on every user). Before the write it marks them as being
//!   written and drops what is cached of them; after it (whatever the
//!   outcome, even on a panic) it unmarks them and drops it again. Each
//!   mark bumps the epoch of the user's shard.
//! - A reader first looks in the cache under the shard's lock. A user
//!   being written is not served from the cache (the backend's own
//!   atomicity then decides what the reader sees). On a miss it notes the
//!   shard's epoch, reads the backend without any lock, and inserts what
//!   it read only if the epoch is still the one noted. So a value read
//!   before a write can be inserted only before that write's first mark
//!   (and is dropped by its second), never after: a stale value cannot
//!   outlive the write. A write to another user of the same shard also
//!   stops the insert; that costs only a later miss.
//!
//! Bounds: at most [`MAX_CACHED_USERS`] users' small fields and
//! [`MAX_CACHED_RECORDS`] whole records, spread over [`SHARDS`] shards that
//! each take their share (rounded up). A full shard evicts the quarter of
//! its entries least recently used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{
    checked, BuddyRequest, ContactView, MailEntry, MailLimits, MailStore, Queued, SearchHit,
    StatusFields, Store, StoreError, StoredMail, User, Verifier,
};

/// Most users whose small fields are cached: every account of a directory
/// of 100,000 users. An entry takes about 1.5 KB for a user with 20
/// buddies (the buddy set is most of it; status fields and verifier about
/// 300 bytes), so about 150 MB when full.
pub const MAX_CACHED_USERS: usize = 100_000;

/// Most whole records cached: a record takes about 5 KB in memory (public
/// key and wrapped private key, profile, buddies, requests), so about
/// 80 MB when full; enough for the users active at once in a busy
/// directory, whose own record every login reads.
pub const MAX_CACHED_RECORDS: usize = 16_384;

/// Shards of the cache, each under its own lock: the pool's workers read
/// it at once (a login looks up each of 20 buddies).
pub const SHARDS: usize = 64;

/// The small fields kept of one user; each filled by the read that needs
/// it (or all at once from a whole record).
#[derive(Debug, Default)]
struct Small {
    status: Option<StatusFields>,
    contacts: Option<BTreeSet<String>>,
    verifier: Option<Verifier>,
}

impl Small {
    /// Fills every field from a whole record.
    fn fill_from(&mut self, user: &User) {
        self.status = Some(StatusFields::of(user));
        self.contacts = Some(user.contacts.clone());
        self.verifier = Some(user.verifier.clone());
    }
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    /// The shard's tick at the last use.
    used: u64,
}

/// A map bounded by `cap` entries that evicts the least recently used.
#[derive(Debug)]
struct Lru<V> {
    map: HashMap<String, Slot<V>>,
    cap: usize,
}

impl<V> Lru<V> {
    fn new(cap: usize) -> Lru<V> {
        Lru {
            map: HashMap::new(),
            cap,
        }
    }

    fn get(&mut self, name: &str, tick: u64) -> Option<&mut V> {
        let slot = self.map.get_mut(name)?;
        slot.used = tick;
        Some(&mut slot.value)
    }

    /// The entry of `name`, made if missing (evicting to make room);
    /// `None` if nothing may be kept.
    fn entry(&mut self, name: &str, tick: u64) -> Option<&mut V>
    where
        V: Default,
    {
        if self.cap == 0 {
            return None;
        }
        if !self.map.contains_key(name) && self.map.len() >= self.cap {
            self.evict();
        }
        let slot = self.map.entry(name.to_owned()).or_insert_with(|| Slot {
            value: V::default(),
            used: tick,
        });
        slot.used = tick;
        Some(&mut slot.value)
    }

    /// Drops the least recently used quarter (at least one entry). Ticks
    /// are distinct, so exactly that many go; a quarter at a time keeps
    /// the cost of finding them (linear) small per insert.
    fn evict(&mut self) {
        let mut used: Vec<u64> = self.map.values().map(|s| s.used).collect();
        if used.is_empty() {
            return;
        }
        let k = used.len() / 4;
        let (_, cut, _) = used.select_nth_unstable(k);
        let cut = *cut;
        self.map.retain(|_, s| s.used > cut);
    }

    fn remove(&mut self, name: &str) {
        self.map.remove(name);
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

/// One shard: the entries of the users hashed to it, and the marks of the
/// writes in progress on them.
#[derive(Debug)]
struct Shard {
    /// Bumped by every write mark in this shard; see the module docs.
    epoch: u64,
    /// Counts uses, for the least-recently-used order.
    tick: u64,
    small: Lru<Small>,
    records: Lru<Arc<User>>,
    /// Users being written, with how many writes each.
    writing: HashMap<String, u32>,
    /// Writes in progress that may touch any user (`delete_user`).
    writing_all: u32,
}

impl Shard {
    fn busy(&self, name: &str) -> bool {
        self.writing_all > 0 || self.writing.contains_key(name)
    }

    fn tick(&mut self) -> u64 {
        self.tick = self.tick.wrapping_add(1);
        self.tick
    }
}

/// What a reader that missed may do with what it reads from the backend.
#[derive(Clone, Copy, Debug)]
struct Ticket {
    shard: usize,
    /// The shard's epoch before the backend was read; `None`: the user was
    /// being written, so what is read is not cached.
    epoch: Option<u64>,
}

/// The users a write may change.
enum Touched {
    /// These (canonical, valid) names.
    Users(Vec<String>),
    /// Anyone.
    All,
}

/// A write in progress: its users are marked until it is dropped.
struct Writing<'a, S> {
    cache: &'a CachedStore<S>,
    touched: Touched,
}

impl<S> Drop for Writing<'_, S> {
    fn drop(&mut self) {
        self.cache.unmark(&self.touched);
    }
}

/// The read cache over `S`; see the module documentation.
pub struct CachedStore<S> {
    inner: S,
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

impl<S> std::fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (users, records) = self.cached();
        f.debug_struct("CachedStore")
            .field("users", &users)
            .field("records", &records)
            .finish_non_exhaustive()
    }
}

/// The valid names among `names`, canonical (an invalid one is refused by
/// the backend and changes nothing).
fn valid(names: &[&str]) -> Touched {
    Touched::Users(names.iter().filter_map(|n| checked(n).ok()).collect())
}

impl<S> CachedStore<S> {
    /// A cache of the default size over `inner`, which nothing else may
    /// write while the cache is in use.
    pub fn new(inner: S) -> CachedStore<S> {
        CachedStore::with_capacity(inner, MAX_CACHED_USERS, MAX_CACHED_RECORDS)
    }

    /// A cache of at most `users` users' small fields and `records` whole
    /// records (each rounded up to a multiple of [`SHARDS`]; 0 keeps
    /// none).
    pub fn with_capacity(inner: S, users: usize, records: usize) -> CachedStore<S> {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    epoch: 0,
                    tick: 0,
                    small: Lru::new(users.div_ceil(SHARDS)),
                    records: Lru::new(records.div_ceil(SHARDS)),
                    writing: HashMap::new(),
                    writing_all: 0,
                })
            })
            .collect();
        CachedStore {
            inner,
            shards,
            hasher: RandomState::new(),
        }
    }

    /// The store behind the cache (reading it bypasses the cache; writing
    /// it would leave the cache stale).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// How many users' small fields and whole records are cached now.
    pub fn cached(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(u, r), s| {
            let s = s.lock();
            (u + s.small.map.len(), r + s.records.map.len())
        })
    }

    fn shard_of(&self, name: &str) -> usize {
        // The remainder is below SHARDS, so it fits any usize.
        (self.hasher.hash_one(name) % SHARDS as u64) as usize
    }

    /// Looks `name` (canonical) up with `hit`; on a miss, the ticket for
    /// filling in what the backend will say.
    fn probe<T>(
        &self,
        name: &str,
        hit: impl FnOnce(&mut Shard, u64) -> Option<T>,
    ) -> Result<T, Ticket> {
        let shard = self.shard_of(name);
        let mut s = self.shards[shard].lock();
        if s.busy(name) {
            return Err(Ticket { shard, epoch: None });
        }
        let tick = s.tick();
        match hit(&mut s, tick) {
            Some(v) => Ok(v),
            None => Err(Ticket {
                shard,
                epoch: Some(s.epoch),
            }),
        }
    }

    /// Caches what the backend said after `ticket`, unless a write mark
    /// came in between.
    fn fill(&self, ticket: Ticket, f: impl FnOnce(&mut Shard, u64)) {
        let Some(epoch) = ticket.epoch else {
            return;
        };
        let mut s = self.shards[ticket.shard].lock();
        if s.epoch == epoch {
            let tick = s.tick();
            f(&mut s, tick);
        }
    }

    /// Marks the users of a write about to start; see the module docs.
    fn begin(&self, touched: Touched) -> Writing<'_, S> {
        match &touched {
            Touched::Users(names) => {
                for name in names {
                    let mut s = self.shards[self.shard_of(name)].lock();
                    s.epoch = s.epoch.wrapping_add(1);
                    *s.writing.entry(name.clone()).or_insert(0) += 1;
                    s.small.remove(name);
                    s.records.remove(name);
                }
            }
            Touched::All => {
                for s in self.shards.iter() {
                    let mut s = s.lock();
                    s.epoch = s.epoch.wrapping_add(1);
                    s.writing_all += 1;
                    s.small.clear();
                    s.records.clear();
                }
            }
        }
        Writing {
            cache: self,
            touched,
        }
    }

    /// Unmarks the users of a finished write and drops what was cached of
    /// them meanwhile (nothing should have been; kept as a second guard).
    fn unmark(&self, touched: &Touched) {
        match touched {
            Touched::Users(names) => {
                for name in names {
                    let mut s = self.shards[self.shard_of(name)].lock();
                    s.epoch = s.epoch.wrapping_add(1);
                    if let Some(n) = s.writing.get_mut(name) {
                        *n -= 1;
                        if *n == 0 {
                            s.writing.remove(name);
                        }
                    }
                    s.small.remove(name);
                    s.records.remove(name);
                }
            }
            Touched::All => {
                for s in self.shards.iter() {
                    let mut s = s.lock();
                    s.epoch = s.epoch.wrapping_add(1);
                    s.writing_all = s.writing_all.saturating_sub(1);
                    s.small.clear();
                    s.records.clear();
                }
            }
        }
    }
}

impl<S: Store> CachedStore<S> {
    /// One of a user's small fields (`field` of its entry): from the cache
    /// (the entry, or a cached whole record through `of_record`), else
    /// from the backend through `read`, and then kept (unless a write came
    /// meanwhile: see [`CachedStore::fill`]).
    fn small_field<T: Clone>(
        &self,
        name: &str,
        field: fn(&mut Small) -> &mut Option<T>,
        of_record: fn(&User) -> T,
        read: impl FnOnce(&str) -> Result<Option<T>, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        let hit = self.probe(name, |s, tick| {
            if let Some(v) = s.small.get(name, tick).and_then(|e| field(e).clone()) {
                return Some(v);
            }
            s.records.get(name, tick).map(|u| of_record(u))
        });
        let ticket = match hit {
            Ok(v) => return Ok(Some(v)),
            Err(ticket) => ticket,
        };
        let value = read(name)?;
        if let Some(v) = &value {
            self.fill(ticket, |s, tick| {
                if let Some(e) = s.small.entry(name, tick) {
                    *field(e) = Some(v.clone());
                }
            });
        }
        Ok(value)
    }

    /// The status fields of the registered users of `names`, each made
    /// into what the caller wants by `make`, from the cache or else read
    /// at once from the backend.
    fn with_status_fields<T>(
        &self,
        names: &BTreeSet<String>,
        make: impl Fn(&StatusFields) -> T,
    ) -> Result<BTreeMap<String, T>, StoreError> {
        let names = names
            .iter()
            .map(|n| checked(n))
            .collect::<Result<BTreeSet<String>, _>>()?;
        let mut out = BTreeMap::new();
        let mut missed = Vec::new();
        for name in names {
            let hit = self.probe(&name, |s, tick| {
                s.small
                    .get(&name, tick)
                    .and_then(|e| e.status.as_ref().map(&make))
            });
            match hit {
                Ok(v) => {
                    out.insert(name, v);
                }
                Err(ticket) => missed.push((name, ticket)),
            }
        }
        if missed.is_empty() {
            return Ok(out);
        }
        let wanted: BTreeSet<String> = missed.iter().map(|(n, _)| n.clone()).collect();
        let mut read = self.inner.status_fields(&wanted)?;
        for (name, ticket) in missed {
            let Some(fields) = read.remove(&name) else {
                continue;
            };
            out.insert(name.clone(), make(&fields));
            self.fill(ticket, |s, tick| {
                if let Some(e) = s.small.entry(&name, tick) {
                    e.status = Some(fields);
                }
            });
        }
        Ok(out)
    }
}

impl<S: Store> Store for CachedStore<S> {
    fn create_user(&self, user: User) -> Result<(), StoreError> {
        let _w = self.begin(valid(&[&user.name]));
        self.inner.create_user(user)
    }

    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        let name = checked(name)?;
        let ticket = match self.probe(&name, |s, tick| s.records.get(&name, tick).cloned()) {
            Ok(user) => return Ok(Some(User::clone(&user))),
            Err(ticket) => ticket,
        };
        let user = self.inner.get_user(&name)?;
        if let Some(u) = &user {
            self.fill(ticket, |s, tick| {
                if let Some(e) = s.small.entry(&name, tick) {
                    e.fill_from(u);
                }
                if let Some(r) = s.records.entry(&name, tick) {
                    *r = Arc::new(u.clone());
                }
            });
        }
        Ok(user)
    }

    fn get_verifier(&self, name: &str) -> Result<Option<Verifier>, StoreError> {
        self.small_field(
            &checked(name)?,
            |e| &mut e.verifier,
            |u| u.verifier.clone(),
            |n| self.inner.get_verifier(n),
        )
    }

    fn contact_views(
        &self,
        viewer: &str,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, ContactView>, StoreError> {
        let viewer = checked(viewer)?;
        self.with_status_fields(names, |f| f.view_by(&viewer))
    }

    fn status_fields(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, StatusFields>, StoreError> {
        self.with_status_fields(names, StatusFields::clone)
    }

    fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        // The deleted user's buddies lose a contact and the recipients of
        // its requests lose a request: users only the backend knows.
        // Deletions are rare; the whole cache goes.
        let _w = self.begin(Touched::All);
        self.inner.delete_user(name)
    }

    fn list_users(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.list_users(after, limit)
    }

    fn user_count(&self) -> Result<u64, StoreError> {
        self.inner.user_count()
    }

    fn set_credentials(
        &self,
        name: &str,
        verifier: Verifier,
        wrapped_private_key: Vec<u8>,
    ) -> Result<(), StoreError> {
        let _w = self.begin(valid(&[name]));
        self.inner
            .set_credentials(name, verifier, wrapped_private_key)
    }

    fn set_profile(&self, name: &str, profile: BTreeMap<String, String>) -> Result<(), StoreError> {
        let _w = self.begin(valid(&[name]));
        self.inner.set_profile(name, profile)
    }

    fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, StoreError> {
        self.inner.search(text, limit)
    }

    fn add_request(&self, to: &str, req: BuddyRequest) -> Result<(), StoreError> {
        // The sender's record does not change (only the backend's index
        // of who holds its requests).
        let _w = self.begin(valid(&[to]));
        self.inner.add_request(to, req)
    }

    fn take_requests(&self, name: &str) -> Result<Vec<BuddyRequest>, StoreError> {
        let _w = self.begin(valid(&[name]));
        self.inner.take_requests(name)
    }

    fn remove_request(&self, to: &str, from: &str) -> Result<bool, StoreError> {
        let _w = self.begin(valid(&[to]));
        self.inner.remove_request(to, from)
    }

    fn make_buddies(&self, a: &str, b: &str) -> Result<(), StoreError> {
        let _w = self.begin(valid(&[a, b]));
        self.inner.make_buddies(a, b)
    }

    fn remove_buddies(&self, a: &str, b: &str) -> Result<bool, StoreError> {
        let _w = self.begin(valid(&[a, b]));
        self.inner.remove_buddies(a, b)
    }

    fn contacts(&self, name: &str) -> Result<BTreeSet<String>, StoreError> {
        // The backend answers every valid name, so there is always one.
        let contacts = self.small_field(
            &checked(name)?,
            |e| &mut e.contacts,
            |u| u.contacts.clone(),
            |n| self.inner.contacts(n).map(Some),
        )?;
        Ok(contacts.unwrap_or_default())
    }

    fn set_blocked(&self, name: &str, who: &str, on: bool) -> Result<bool, StoreError> {
        // Only `name`'s record changes: a block names its target, which
        // need not even exist.
        let _w = self.begin(valid(&[name]));
        self.inner.set_blocked(name, who, on)
    }

    fn set_status(
        &self,
        name: &str,
        status: crate::proto::status::Status,
        message: &str,
    ) -> Result<(), StoreError> {
        let _w = self.begin(valid(&[name]));
        self.inner.set_status(name, status, message)
    }
}

/// Offline messages are not cached: forwarded as they are (they live
/// apart from the user records, so they invalidate nothing).
impl<S: Store> MailStore for CachedStore<S> {
    fn queue_mail(&self, mail: StoredMail, limits: &MailLimits) -> Result<Queued, StoreError> {
        self.inner.queue_mail(mail, limits)
    }

    fn has_mail(&self, user: &str) -> Result<bool, StoreError> {
        self.inner.has_mail(user)
    }

    fn mail_for(
        &self,
        user: &str,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<MailEntry>, StoreError> {
        self.inner.mail_for(user, after, max_items, max_bytes)
    }

    fn ack_mail(&self, user: &str, ids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        self.inner.ack_mail(user, ids)
    }

    fn expire_mail(&self, before: u64) -> Result<BTreeSet<String>, StoreError> {
        self.inner.expire_mail(before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crs::store::MemStore;

    #[test]
    fn lru_evicts_the_least_recently_used_quarter() {
        let mut lru: Lru<u32> = Lru::new(8);
        let mut tick = 0;
        for i in 0..8u32 {
            tick += 1;
            *lru.entry(&format!("n{i}"), tick).expect("room") = i;
        }
        // n0 and n1 are used again: n2, n3 are now the oldest.
        for n in ["n0", "n1"] {
            tick += 1;
            assert!(lru.get(n, tick).is_some());
        }
        tick += 1;
        lru.entry("new", tick).expect("room");
        // A quarter of 8 plus one went: the three least recently used.
        assert_eq!(lru.map.len(), 6);
        for gone in ["n2", "n3", "n4"] {
            assert!(!lru.map.contains_key(gone), "{gone}");
        }
        for kept in ["n0", "n1", "n5", "n6", "n7", "new"] {
            assert!(lru.map.contains_key(kept), "{kept}");
        }
        let mut none: Lru<u32> = Lru::new(0);
        assert!(none.entry("x", 1).is_none());
        let mut one: Lru<u32> = Lru::new(1);
        one.entry("a", 1).expect("room");
        one.entry("b", 2).expect("room");
        assert!(one.map.contains_key("b") && one.map.len() == 1);
    }

    #[test]
    fn the_cache_stays_within_its_bounds() {
        let mem = MemStore::new();
        for i in 0..500 {
            mem.create_user(User {
                name: format!("u{i}"),
                ..Default::default()
            })
            .expect("create");
        }
        let cached = CachedStore::with_capacity(mem, 2 * SHARDS, SHARDS);
        let all: BTreeSet<String> = (0..500).map(|i| format!("u{i}")).collect();
        for round in 0..2 {
            for n in &all {
                assert!(cached.get_user(n).expect("get").is_some());
                assert!(cached.get_verifier(n).expect("verifier").is_some());
                assert!(cached.contacts(n).expect("contacts").is_empty());
            }
            assert_eq!(cached.contact_views("u0", &all).expect("views").len(), 500);
            let (users, records) = cached.cached();
            assert!(users <= 2 * SHARDS && records <= SHARDS, "round {round}");
            assert!(users > 0 && records > 0, "round {round}");
        }
        // Nothing is kept of a name nobody holds.
        let empty = CachedStore::new(MemStore::new());
        assert_eq!(empty.get_user("ghost"), Ok(None));
        assert_eq!(empty.get_verifier("ghost"), Ok(None));
        assert_eq!(empty.contacts("ghost"), Err(StoreError::NoSuchUser));
        assert_eq!(empty.cached(), (0, 0));
        assert_eq!(empty.get_user("bad name"), Err(StoreError::InvalidName));
        let names = BTreeSet::from(["ok".to_string(), "not ok".to_string()]);
        assert_eq!(
            empty.contact_views("ok", &names),
            Err(StoreError::InvalidName)
        );
    }

    #[test]
    fn a_write_in_progress_is_not_served_from_the_cache() {
        let mem = MemStore::new();
        mem.create_user(User {
            name: "ann".into(),
            ..Default::default()
        })
        .expect("create");
        let cached = CachedStore::new(mem);
        assert!(cached.get_user("ann").expect("get").is_some());
        assert_eq!(cached.cached(), (1, 1));
        let w = cached.begin(valid(&["ANN"]));
        assert_eq!(cached.cached(), (0, 0), "dropped before the write");
        // Read while the write is marked: from the backend, not kept.
        assert!(cached.get_user("ann").expect("get").is_some());
        assert_eq!(cached.cached(), (0, 0));
        drop(w);
        assert!(cached.get_user("ann").expect("get").is_some());
        assert_eq!(cached.cached(), (1, 1));
        let all = cached.begin(Touched::All);
        assert_eq!(cached.cached(), (0, 0));
        assert!(cached.get_verifier("ann").expect("get").is_some());
        assert_eq!(cached.cached(), (0, 0));
        drop(all);
        assert!(cached.get_verifier("ann").expect("get").is_some());
        assert_eq!(cached.cached(), (1, 0));
    }
}
