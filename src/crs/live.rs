//! The CRS's volatile state: enrolled MSs, who is online where, login
//! locks, and the event queue of each MS.
//!
//! None of this is durable on purpose: after a restart it is stale anyway
//! (MSs re-enroll and report their users again), and keeping it in memory
//! lets a login touch the disk not at all.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

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
    /// Users online there and leases it holds (expired ones until they are
    /// replaced), kept as counts so that `LOCATE` need not scan everyone.
    online: u32,
    leases: u32,
    /// Events not yet acknowledged, numbered from `first_seq`.
    queue: VecDeque<Event>,
    first_seq: u64,
}

impl MsEntry {
    fn new(address: String, capacity: u32) -> MsEntry {
        MsEntry {
            address,
            capacity,
            last_seen: Instant::now(),
            online: 0,
            leases: 0,
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

/// All volatile state, behind one lock in [`super::Crs`].
#[derive(Debug, Default)]
pub struct Live {
    next_ms: u64,
    ms: HashMap<u64, MsEntry>,
    online: HashMap<String, Online>,
    locks: HashMap<String, Lease>,
}

impl Live {
    /// Enrolls (or re-enrolls) the MS reachable at `address`: the address
    /// identifies an MS across its several links and across its restarts.
    pub fn enroll(&mut self, address: &str, capacity: u32) -> u64 {
        if let Some((&id, entry)) = self.ms.iter_mut().find(|(_, e)| e.address == address) {
            entry.capacity = capacity;
            entry.last_seen = Instant::now();
            return id;
        }
        self.next_ms += 1;
        let id = self.next_ms;
        self.ms.insert(id, MsEntry::new(address.to_owned(), capacity));
        id
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
        self.ms.get(&id).map_or(0, |e| e.online + e.leases)
    }

    /// Counts one more (`up`) or one less online user or lease at `ms`.
    fn count(&mut self, ms: u64, lease: bool, up: bool) {
        if let Some(e) = self.ms.get_mut(&ms) {
            let n = if lease { &mut e.leases } else { &mut e.online };
            *n = if up {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            };
        }
    }

    /// Drops `user`'s lease, if any.
    fn drop_lease(&mut self, user: &str) {
        if let Some(l) = self.locks.remove(user) {
            self.count(l.ms, true, false);
        }
    }

    /// The live MS with the lowest load relative to capacity, not full.
    /// (Called for every login: counts per MS, no scan of the users.)
    pub fn locate(&self, heartbeat_timeout: Duration) -> Option<String> {
        self.ms
            .iter()
            .filter(|(_, e)| e.last_seen.elapsed() < heartbeat_timeout)
            .filter_map(|(id, e)| {
                let load = e.online + e.leases;
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
        self.drop_lease(user);
        self.locks.insert(user.to_owned(), Lease { ms, expires: now + lease });
        self.count(ms, true, true);
        Ok(())
    }

    /// Releases `user`'s lease if MS `ms` holds it.
    pub fn unlock(&mut self, user: &str, ms: u64) {
        if self.locks.get(user).is_some_and(|l| l.ms == ms) {
            self.drop_lease(user);
        }
    }

    /// Whether MS `ms` holds a live lease on `user`.
    pub fn holds_lock(&self, user: &str, ms: u64) -> bool {
        self.locks
            .get(user)
            .is_some_and(|l| l.ms == ms && l.expires > Instant::now())
    }

    /// Marks `user` online at `ms` and releases the lease.
    pub fn set_online(&mut self, user: &str, ms: u64, presence: Presence) {
        self.drop_lease(user);
        if let Some(old) = self.online.insert(user.to_owned(), Online { ms, presence }) {
            self.count(old.ms, false, false);
        }
        self.count(ms, false, true);
    }

    /// Marks `user` offline if they are online at `ms` (or anywhere, for
    /// `None`); returns whether they were.
    pub fn set_offline(&mut self, user: &str, ms: Option<u64>) -> bool {
        match self.online.get(user) {
            Some(o) if ms.map_or(true, |m| m == o.ms) => {
                let at = o.ms;
                self.online.remove(user);
                self.count(at, false, false);
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
            self.ms.remove(&id);
            self.locks.retain(|_, l| l.ms != id);
            let users: Vec<String> = self
                .online
                .iter()
                .filter(|(_, o)| o.ms == id)
                .map(|(u, _)| u.clone())
                .collect();
            for u in users {
                self.online.remove(&u);
                lost.push(u);
            }
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
        let a = l.enroll("a:1", 10);
        let b = l.enroll("b:1", 10);
        assert_eq!(l.enroll("a:1", 20), a);
        l.lock("joe", a, Duration::from_secs(5)).unwrap();
        assert_eq!(l.lock("joe", b, Duration::from_secs(5)), Err(LockError::LoggingIn));
        assert_eq!(l.lock("joe", a, Duration::from_secs(5)), Err(LockError::LoggingIn));
        l.set_online("joe", a, presence());
        assert_eq!(l.lock("joe", b, Duration::from_secs(5)), Err(LockError::LoggedIn));
        assert!(!l.set_offline("joe", Some(b)));
        assert!(l.set_offline("joe", Some(a)));
        // An expired lease is no obstacle.
        l.lock("ann", a, Duration::ZERO).unwrap();
        l.lock("ann", b, Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn locate_prefers_lowest_relative_load_and_skips_full() {
        let mut l = Live::default();
        let a = l.enroll("a:1", 1);
        let _b = l.enroll("b:1", 4);
        l.set_online("joe", a, presence());
        assert_eq!(l.locate(Duration::from_secs(30)).as_deref(), Some("b:1"));
        assert_eq!(l.locate(Duration::ZERO), None);
    }

    /// The load as it was computed before the counts: a scan of everyone.
    fn scanned_load(l: &Live, id: u64) -> u32 {
        let online = l.online.values().filter(|o| o.ms == id).count();
        let locking = l.locks.values().filter(|x| x.ms == id).count();
        (online + locking) as u32
    }

    #[test]
    fn load_counts_match_a_scan() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut l = Live::default();
        let ids = [
            l.enroll("a:1", 100),
            l.enroll("b:1", 100),
            l.enroll("c:1", 100),
        ];
        let users = ["u0", "u1", "u2", "u3", "u4", "u5"];
        for step in 0..5000 {
            let user = users[rng.gen_range(0..users.len())];
            let ms = ids[rng.gen_range(0..ids.len())];
            match rng.gen_range(0..6) {
                0 => drop(l.lock(user, ms, Duration::from_secs(60))),
                // An expired lease, replaced by the next lock.
                1 => drop(l.lock(user, ms, Duration::ZERO)),
                2 => l.unlock(user, ms),
                3 => {
                    if l.holds_lock(user, ms) {
                        l.set_online(user, ms, presence());
                    }
                }
                4 => drop(l.set_offline(user, Some(ms))),
                _ => drop(l.set_offline(user, None)),
            }
            for id in ids {
                assert_eq!(l.load(id), scanned_load(&l, id), "step {step}");
            }
        }
    }

    #[test]
    fn events_are_numbered_and_acked() {
        let mut l = Live::default();
        let a = l.enroll("a:1", 10);
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
        let a = l.enroll("a:1", 10);
        l.set_online("joe", a, presence());
        l.lock("ann", a, Duration::from_secs(60)).unwrap();
        assert_eq!(l.reap(Duration::ZERO), vec!["joe".to_string()]);
        assert!(l.online("joe").is_none());
        let b = l.enroll("b:1", 10);
        l.lock("ann", b, Duration::from_secs(5)).unwrap();
    }
}
