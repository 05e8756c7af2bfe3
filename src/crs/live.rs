//! The CRS's live state: enrolled MSs, who is online where, login locks,
//! and the event queue of each MS.
//!
//! It sits behind two traits so that it can live in this process or in
//! PostgreSQL beside the durable store:
//! - [`LiveState::lock`] opens one atomic view ([`LiveTx`]): everything done
//!   through it happens at once, as under one lock (in memory it is a mutex
//!   guard; in PostgreSQL a transaction holding an advisory lock that every
//!   CRS instance on the database takes, see `live_pg`);
//! - [`Wakeup`] wakes the `EVENTS` long polls when events are queued (in
//!   PostgreSQL, also when another instance queued them: `LISTEN/NOTIFY`).
//!
//! In memory ([`MemLive`], the default with sled) none of this is durable
//! on purpose: after a restart it is stale anyway (MSs re-enroll and report
//! their users again), and keeping it in memory lets a login touch the disk
//! not at all. In PostgreSQL it is shared, so several instances serve one
//! directory and an MS may move from one to another.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use crate::prethread::Parking;
use crate::proto::crs::{Event, EventBatch, EventKind, MsInfo, Presence};

/// Most events kept for one MS that does not poll; past this the oldest
/// are dropped and the MS will be reaped for missing its heartbeats anyway.
pub const MAX_QUEUED_EVENTS: usize = 100_000;

/// Most events in one `EVENTS` reply, so a reply stays under the body limit.
pub const MAX_BATCH: usize = 256;

/// One enrolled MS.
#[derive(Debug)]
pub struct MsEntry {
    /// Where clients reach it.
    pub address: String,
    /// Most users it takes.
    pub capacity: u32,
    /// Last time it sent anything.
    pub last_seen: Instant,
    /// The MS process's random instance; a new one means it restarted.
    instance: String,
    /// Events not yet acknowledged, numbered from `first_seq`.
    queue: VecDeque<Event>,
    first_seq: u64,
}

impl MsEntry {
    fn new(address: String, capacity: u32, instance: String) -> MsEntry {
        MsEntry {
            address,
            capacity,
            last_seen: Instant::now(),
            instance,
            queue: VecDeque::new(),
            first_seq: 1,
        }
    }
}

/// Where an online user is.
#[derive(Clone, Debug)]
pub struct Online {
    /// Their MS.
    pub ms: u64,
    /// Their client's address and public key.
    pub presence: Presence,
    /// Numbers this login among all logins since the CRS started.
    pub login: u64,
}

/// A login lease.
#[derive(Clone, Copy, Debug)]
struct Lease {
    ms: u64,
    expires: Instant,
}

/// Why a lock attempt failed.
#[derive(Debug, PartialEq, Eq)]
pub enum LockError {
    /// Another login of this user is in progress.
    LoggingIn,
    /// The user is online.
    LoggedIn,
}

/// Wakes the `EVENTS` long polls. A poll with nothing to answer is parked
/// in the server's gate (it holds no worker) on its MS's id, through
/// [`Wakeup::parking`]; a wake is for every poll or for one MS's. A poll
/// prepares its park before looking at its queue, so a wake that comes
/// between the look and the park is not missed (see [`Parking`]).
///
/// Wakes are for one MS each ([`Wakeup::notify_ms`]), so that an event
/// does not make every MS's poll look at its queue: with the live state in
/// this process, [`Live`] wakes an MS's polls as it queues an event for it
/// ([`MemLive::waking`]); in PostgreSQL the wakes come from the database's
/// notifications, sent at commit (see `live_pg`).
#[derive(Debug, Default)]
pub struct Wakeup {
    parking: Parking,
}

impl Wakeup {
    /// Wakes every waiting poll, always (to stop, or after a lost
    /// connection to the database).
    pub fn notify_everyone(&self) {
        self.parking.wake_all();
    }

    /// Wakes the polls of MS `ms`.
    pub fn notify_ms(&self, ms: u64) {
        self.parking.wake(ms);
    }

    /// Where the polls park, keyed by MS id.
    pub fn parking(&self) -> &Parking {
        &self.parking
    }
}

/// One atomic view of the live state; see the module documentation. The
/// methods mirror [`Live`]'s. A backend that can fail (PostgreSQL) answers
/// with the safe default after a failure (not enrolled, lock refused,
/// nobody online) and reports the failure from [`LiveTx::commit`].
pub trait LiveTx {
    /// See [`Live::enroll`].
    fn enroll(&mut self, address: &str, capacity: u32, instance: &str) -> (u64, Vec<String>);
    /// See [`Live::notify_ms`].
    fn notify_ms(&mut self, ms: u64, recipients: Vec<String>, kind: EventKind);
    /// See [`Live::touch`].
    fn touch(&mut self, id: u64) -> bool;
    /// See [`Live::locate`].
    fn locate(&mut self, heartbeat_timeout: Duration) -> Option<String>;
    /// See [`Live::lock`].
    fn lock(&mut self, user: &str, ms: u64, lease: Duration) -> Result<(), LockError>;
    /// See [`Live::unlock`].
    fn unlock(&mut self, user: &str, ms: u64);
    /// See [`Live::holds_lock`].
    fn holds_lock(&mut self, user: &str, ms: u64) -> bool;
    /// See [`Live::set_online`].
    fn set_online(&mut self, user: &str, ms: u64, presence: Presence) -> u64;
    /// See [`Live::set_offline`].
    fn set_offline(&mut self, user: &str, ms: Option<u64>) -> bool;
    /// Where `user` is, if online.
    fn online(&mut self, user: &str) -> Option<Online>;
    /// Where each of `users` who is online is (one look-up for all).
    fn online_many(
        &mut self,
        users: &std::collections::BTreeSet<String>,
    ) -> HashMap<String, Online> {
        users
            .iter()
            .filter_map(|u| self.online(u).map(|o| (u.clone(), o)))
            .collect()
    }
    /// See [`Live::notify`] (called through the generic `notify`).
    fn notify_users(&mut self, users: &mut dyn Iterator<Item = &str>, kind: &EventKind);
    /// See [`Live::events`].
    fn events(&mut self, ms: u64, ack: u64) -> Option<EventBatch>;
    /// See [`Live::reap`].
    fn reap(&mut self, timeout: Duration) -> Vec<String>;
    /// See [`Live::ms_list`].
    fn ms_list(&mut self) -> Vec<MsInfo>;
    /// See [`Live::online_count`].
    fn online_count(&mut self) -> usize;
    /// See [`Live::address`].
    fn address(&mut self, user: &str) -> Option<SocketAddr>;
    /// Makes everything done through this view durable and visible to
    /// others; an error if any step failed (then nothing took effect).
    /// Dropping the view commits too, silently.
    fn commit(self: Box<Self>) -> Result<(), String>;
}

impl dyn LiveTx + '_ {
    /// Queues `kind` for each listed user who is online, grouped by MS.
    pub fn notify<'a>(&mut self, users: impl IntoIterator<Item = &'a str>, kind: &EventKind) {
        self.notify_users(&mut users.into_iter(), kind)
    }
}

/// Where the live state is kept.
pub trait LiveState: Send + Sync {
    /// One atomic view; others wait until it is dropped or committed.
    fn lock(&self) -> Box<dyn LiveTx + '_>;
    /// How often an idle long poll looks at its queue even without a wake
    /// (a lost notification is then late, never lost).
    fn recheck(&self) -> Duration;
    /// The directory's instance, if shared by every CRS instance on it (so
    /// an MS moving between them keeps its users); `None`: per process.
    fn shared_instance(&self) -> Option<String> {
        None
    }
    /// Password attempts counted beside this live state, `free` of them
    /// free, if it is shared; `None`: counted in this process.
    fn shared_guesses(&self, free: u32) -> Option<Box<dyn super::guesses::GuessCounter>> {
        let _ = free;
        None
    }
}

/// The live state in this process's memory.
#[derive(Debug, Default)]
pub struct MemLive(Mutex<Live>);

impl MemLive {
    /// Live state that wakes MS `ms`'s polls through `wakeup` whenever it
    /// queues an event for `ms`.
    pub fn waking(wakeup: Arc<Wakeup>) -> MemLive {
        MemLive(Mutex::new(Live {
            wakeup: Some(wakeup),
            ..Live::default()
        }))
    }
}

impl LiveState for MemLive {
    fn lock(&self) -> Box<dyn LiveTx + '_> {
        Box::new(self.0.lock())
    }

    /// Never: every change a poll waits for (an event queued for its MS,
    /// its MS dropped) wakes that MS's polls at once, in this same process
    /// (see [`MemLive::waking`]), so no wake can be lost; an idle poll
    /// waits for its whole time.
    fn recheck(&self) -> Duration {
        Duration::MAX
    }
}

impl LiveTx for MutexGuard<'_, Live> {
    fn enroll(&mut self, address: &str, capacity: u32, instance: &str) -> (u64, Vec<String>) {
        Live::enroll(self, address, capacity, instance)
    }
    fn notify_ms(&mut self, ms: u64, recipients: Vec<String>, kind: EventKind) {
        Live::notify_ms(self, ms, recipients, kind)
    }
    fn touch(&mut self, id: u64) -> bool {
        Live::touch(self, id)
    }
    fn locate(&mut self, heartbeat_timeout: Duration) -> Option<String> {
        Live::locate(self, heartbeat_timeout)
    }
    fn lock(&mut self, user: &str, ms: u64, lease: Duration) -> Result<(), LockError> {
        Live::lock(self, user, ms, lease)
    }
    fn unlock(&mut self, user: &str, ms: u64) {
        Live::unlock(self, user, ms)
    }
    fn holds_lock(&mut self, user: &str, ms: u64) -> bool {
        Live::holds_lock(self, user, ms)
    }
    fn set_online(&mut self, user: &str, ms: u64, presence: Presence) -> u64 {
        Live::set_online(self, user, ms, presence)
    }
    fn set_offline(&mut self, user: &str, ms: Option<u64>) -> bool {
        Live::set_offline(self, user, ms)
    }
    fn online(&mut self, user: &str) -> Option<Online> {
        Live::online(self, user).cloned()
    }
    fn notify_users(&mut self, users: &mut dyn Iterator<Item = &str>, kind: &EventKind) {
        Live::notify(self, users, kind)
    }
    fn events(&mut self, ms: u64, ack: u64) -> Option<EventBatch> {
        Live::events(self, ms, ack)
    }
    fn reap(&mut self, timeout: Duration) -> Vec<String> {
        Live::reap(self, timeout)
    }
    fn ms_list(&mut self) -> Vec<MsInfo> {
        Live::ms_list(self)
    }
    fn online_count(&mut self) -> usize {
        Live::online_count(self)
    }
    fn address(&mut self, user: &str) -> Option<SocketAddr> {
        Live::address(self, user)
    }
    fn commit(self: Box<Self>) -> Result<(), String> {
        Ok(())
    }
}

/// All live state of one process, behind one lock in [`MemLive`].
#[derive(Debug, Default)]
pub struct Live {
    next_ms: u64,
    next_login: u64,
    ms: HashMap<u64, MsEntry>,
    online: HashMap<String, Online>,
    /// Users online per MS, kept with `online` so that `LOCATE` need not
    /// count everyone online (logins in progress are few: those it counts).
    online_at: HashMap<u64, u32>,
    /// Wakes an MS's event polls when an event is queued for it.
    wakeup: Option<Arc<Wakeup>>,
    locks: HashMap<String, Lease>,
}

impl Live {
    /// Enrolls (or re-enrolls) the MS reachable at `address`: the address
    /// identifies an MS across its several links and across its restarts.
    /// Returns its id and, if it restarted (a new `instance`), the users
    /// that were online there, now offline.
    pub fn enroll(&mut self, address: &str, capacity: u32, instance: &str) -> (u64, Vec<String>) {
        let mut lost = Vec::new();
        if let Some((&id, entry)) = self.ms.iter_mut().find(|(_, e)| e.address == address) {
            entry.capacity = capacity;
            entry.last_seen = Instant::now();
            if entry.instance == instance {
                return (id, lost);
            }
            // A restarted MS is a new MS: links of the old one (a long poll
            // still waiting, say) find their id gone and end.
            lost = self.drop_users_of(id);
            self.ms.remove(&id);
            // Its waiting poll is told now, not at its deadline.
            self.queued(id);
        }
        self.next_ms += 1;
        let id = self.next_ms;
        self.ms.insert(
            id,
            MsEntry::new(address.to_owned(), capacity, instance.to_owned()),
        );
        (id, lost)
    }

    /// One user fewer online at `ms`.
    fn uncount(&mut self, ms: u64) {
        if let Some(n) = self.online_at.get_mut(&ms) {
            *n = n.saturating_sub(1);
        }
    }

    /// Takes every user of MS `id` offline and drops its locks.
    fn drop_users_of(&mut self, id: u64) -> Vec<String> {
        self.locks.retain(|_, l| l.ms != id);
        let users: Vec<String> = self
            .online
            .iter()
            .filter(|(_, o)| o.ms == id)
            .map(|(u, _)| u.clone())
            .collect();
        for u in &users {
            self.online.remove(u);
        }
        self.online_at.remove(&id);
        users
    }

    /// Queues `kind` for MS `ms` alone, for `recipients` there.
    pub fn notify_ms(&mut self, ms: u64, recipients: Vec<String>, kind: EventKind) {
        if let Some(entry) = self.ms.get_mut(&ms) {
            entry.queue.push_back(Event { recipients, kind });
            self.queued(ms);
        }
    }

    /// Wakes MS `ms`'s polls: an event was queued for it, or it is no
    /// longer enrolled. Under the lock, which a woken poll then waits for,
    /// so it sees the change.
    fn queued(&self, ms: u64) {
        if let Some(wakeup) = &self.wakeup {
            wakeup.notify_ms(ms);
        }
    }

    /// Notes that MS `id` is alive; false if it is not enrolled (reaped).
    pub fn touch(&mut self, id: u64) -> bool {
        match self.ms.get_mut(&id) {
            Some(e) => {
                e.last_seen = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Users online at MS `id` plus logins in progress there.
    pub fn load(&self, id: u64) -> u32 {
        let online = self.online_at.get(&id).copied().unwrap_or(0);
        let locking = self.locks.values().filter(|l| l.ms == id).count() as u32;
        online + locking
    }

    /// The live MS with the lowest load relative to capacity, not full.
    pub fn locate(&self, heartbeat_timeout: Duration) -> Option<String> {
        let mut loads = self.online_at.clone();
        for l in self.locks.values() {
            *loads.entry(l.ms).or_default() += 1;
        }
        self.ms
            .iter()
            .filter(|(_, e)| e.last_seen.elapsed() < heartbeat_timeout)
            .filter_map(|(id, e)| {
                let load = loads.get(id).copied().unwrap_or(0);
                (load < e.capacity)
                    .then(|| (f64::from(load) / f64::from(e.capacity.max(1)), *id, e))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map(|(_, _, e)| e.address.clone())
    }

    /// Takes `user`'s login lease for MS `ms`.
    pub fn lock(&mut self, user: &str, ms: u64, lease: Duration) -> Result<(), LockError> {
        if self.online.contains_key(user) {
            return Err(LockError::LoggedIn);
        }
        let now = Instant::now();
        if let Some(l) = self.locks.get(user) {
            if l.expires > now {
                return Err(LockError::LoggingIn);
            }
        }
        self.locks.insert(
            user.to_owned(),
            Lease {
                ms,
                expires: now + lease,
            },
        );
        Ok(())
    }

    /// Releases `user`'s lease if MS `ms` holds it.
    pub fn unlock(&mut self, user: &str, ms: u64) {
        if self.locks.get(user).is_some_and(|l| l.ms == ms) {
            self.locks.remove(user);
        }
    }

    /// Whether MS `ms` holds a live lease on `user`.
    pub fn holds_lock(&self, user: &str, ms: u64) -> bool {
        self.locks
            .get(user)
            .is_some_and(|l| l.ms == ms && l.expires > Instant::now())
    }

    /// Marks `user` online at `ms` and releases the lease; the login's number.
    pub fn set_online(&mut self, user: &str, ms: u64, presence: Presence) -> u64 {
        self.locks.remove(user);
        self.next_login += 1;
        let login = self.next_login;
        if let Some(old) = self.online.get(user) {
            let old_ms = old.ms;
            self.uncount(old_ms);
        }
        *self.online_at.entry(ms).or_default() += 1;
        self.online.insert(
            user.to_owned(),
            Online {
                ms,
                presence,
                login,
            },
        );
        login
    }

    /// Marks `user` offline if they are online at `ms` (or anywhere, for
    /// `None`); returns whether they were.
    pub fn set_offline(&mut self, user: &str, ms: Option<u64>) -> bool {
        match self.online.get(user) {
            Some(o) if ms.is_none_or(|m| m == o.ms) => {
                if let Some(o) = self.online.remove(user) {
                    self.uncount(o.ms);
                }
                true
            }
            _ => false,
        }
    }

    /// Where `user` is, if online.
    pub fn online(&self, user: &str) -> Option<&Online> {
        self.online.get(user)
    }

    /// Queues `kind` for each listed user who is online, grouped by MS.
    pub fn notify<'a>(&mut self, users: impl IntoIterator<Item = &'a str>, kind: &EventKind) {
        let mut by_ms: HashMap<u64, Vec<String>> = HashMap::new();
        for u in users {
            if let Some(o) = self.online.get(u) {
                by_ms.entry(o.ms).or_default().push(u.to_owned());
            }
        }
        for (ms, recipients) in by_ms {
            if let Some(entry) = self.ms.get_mut(&ms) {
                if entry.queue.len() >= MAX_QUEUED_EVENTS {
                    entry.queue.pop_front();
                    entry.first_seq += 1;
                }
                entry.queue.push_back(Event {
                    recipients,
                    kind: kind.clone(),
                });
                self.queued(ms);
            }
        }
    }

    /// Drops MS `ms`'s events up to `ack` and returns the rest (at most
    /// [`MAX_BATCH`]); `None` if the MS is not enrolled.
    pub fn events(&mut self, ms: u64, ack: u64) -> Option<EventBatch> {
        let entry = self.ms.get_mut(&ms)?;
        while entry.first_seq <= ack && entry.queue.pop_front().is_some() {
            entry.first_seq += 1;
        }
        Some(EventBatch {
            first: entry.first_seq,
            events: entry.queue.iter().take(MAX_BATCH).cloned().collect(),
        })
    }

    /// Removes MSs silent for `timeout`; returns the users who were online
    /// there (now offline) so their buddies can be told.
    pub fn reap(&mut self, timeout: Duration) -> Vec<String> {
        let dead: Vec<u64> = self
            .ms
            .iter()
            .filter(|(_, e)| e.last_seen.elapsed() >= timeout)
            .map(|(id, _)| *id)
            .collect();
        let mut lost = Vec::new();
        for id in dead {
            lost.extend(self.drop_users_of(id));
            self.ms.remove(&id);
            // A poll it left waiting learns at once that it must enroll
            // again (the MS may only have been cut off for a while).
            self.queued(id);
        }
        lost
    }

    /// The enrolled MSs, for the operator.
    pub fn ms_list(&self) -> Vec<MsInfo> {
        let mut list: Vec<MsInfo> = self
            .ms
            .iter()
            .map(|(id, e)| MsInfo {
                id: *id,
                address: e.address.clone(),
                capacity: e.capacity,
                load: self.load(*id),
                last_heartbeat_secs: e.last_seen.elapsed().as_secs(),
            })
            .collect();
        list.sort_by_key(|m| m.id);
        list
    }

    /// The client address of every online user (for tests and the operator).
    pub fn online_count(&self) -> usize {
        self.online.len()
    }

    /// The address of `user`'s client, if online.
    pub fn address(&self, user: &str) -> Option<SocketAddr> {
        self.online.get(user).map(|o| o.presence.address)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loads_are_counted_as_users_come_and_go() {
        let mut l = Live::default();
        let (a, _) = l.enroll("a:1", 10, "i");
        let (b, _) = l.enroll("b:1", 10, "i");
        l.set_online("joe", a, presence());
        l.set_online("ann", a, presence());
        assert_eq!((l.load(a), l.load(b)), (2, 0));
        l.set_online("joe", b, presence());
        assert_eq!((l.load(a), l.load(b)), (1, 1));
        l.set_offline("ann", None);
        l.lock("kim", b, Duration::from_secs(5)).unwrap();
        assert_eq!((l.load(a), l.load(b)), (0, 2));
        assert_eq!(l.locate(Duration::from_secs(30)).as_deref(), Some("a:1"));
        l.reap(Duration::ZERO);
        assert_eq!(l.load(b), 0);
    }

    #[test]
    fn a_restarted_ms_loses_its_users() {
        let mut l = Live::default();
        let (a, _) = l.enroll("a:1", 10, "first");
        l.set_online("joe", a, presence());
        assert_eq!(l.enroll("a:1", 10, "first"), (a, vec![]));
        let (b, lost) = l.enroll("a:1", 10, "second");
        assert_eq!(lost, vec!["joe".to_string()]);
        assert_ne!(a, b, "the restarted MS gets a new id");
        assert!(l.online("joe").is_none());
        assert!(
            l.events(a, 0).is_none(),
            "the old instance's links are dead"
        );
    }

    use super::*;

    fn presence() -> Presence {
        Presence {
            address: "127.0.0.1:1".parse().unwrap(),
            public_key: vec![1],
        }
    }

    #[test]
    fn lock_lease_and_online() {
        let mut l = Live::default();
        let (a, _) = l.enroll("a:1", 10, "i1");
        let (b, _) = l.enroll("b:1", 10, "i1");
        assert_eq!(l.enroll("a:1", 20, "i1").0, a);
        l.lock("joe", a, Duration::from_secs(5)).unwrap();
        assert_eq!(
            l.lock("joe", b, Duration::from_secs(5)),
            Err(LockError::LoggingIn)
        );
        assert_eq!(
            l.lock("joe", a, Duration::from_secs(5)),
            Err(LockError::LoggingIn)
        );
        l.set_online("joe", a, presence());
        assert_eq!(
            l.lock("joe", b, Duration::from_secs(5)),
            Err(LockError::LoggedIn)
        );
        assert!(!l.set_offline("joe", Some(b)));
        assert!(l.set_offline("joe", Some(a)));
        // An expired lease is no obstacle.
        l.lock("ann", a, Duration::ZERO).unwrap();
        l.lock("ann", b, Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn locate_prefers_lowest_relative_load_and_skips_full() {
        let mut l = Live::default();
        let (a, _) = l.enroll("a:1", 1, "i");
        l.enroll("b:1", 4, "i");
        l.set_online("joe", a, presence());
        assert_eq!(l.locate(Duration::from_secs(30)).as_deref(), Some("b:1"));
        assert_eq!(l.locate(Duration::ZERO), None);
    }

    #[test]
    fn events_are_numbered_and_acked() {
        let mut l = Live::default();
        let (a, _) = l.enroll("a:1", 10, "i");
        l.set_online("joe", a, presence());
        l.notify(["joe", "nobody"], &EventKind::Offline { user: "x".into() });
        l.notify(["joe"], &EventKind::Offline { user: "y".into() });
        let batch = l.events(a, 0).unwrap();
        assert_eq!(batch.first, 1);
        assert_eq!(batch.events.len(), 2);
        assert_eq!(batch.events[0].recipients, vec!["joe".to_string()]);
        let batch = l.events(a, 1).unwrap();
        assert_eq!((batch.first, batch.events.len()), (2, 1));
        assert!(l.events(a, 2).unwrap().events.is_empty());
    }

    #[test]
    fn reap_takes_users_offline_and_frees_locks() {
        let mut l = Live::default();
        let (a, _) = l.enroll("a:1", 10, "i");
        l.set_online("joe", a, presence());
        l.lock("ann", a, Duration::from_secs(60)).unwrap();
        assert_eq!(l.reap(Duration::ZERO), vec!["joe".to_string()]);
        assert!(l.online("joe").is_none());
        let (b, _) = l.enroll("b:1", 10, "i");
        l.lock("ann", b, Duration::from_secs(5)).unwrap();
    }
}
