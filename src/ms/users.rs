//! The users logged in at this MS, with their contact lists and the keys
//! of their login; the only proof that a request is authenticated is an
//! [`OnlineUser`] found here by its login id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::link::Channel;
use crate::seal::Sealer;

/// A logged-in user: created only by a successful login.
pub struct OnlineUser {
    /// Canonical name.
    pub name: String,
    /// The login's id, the clear `Login` header of the client's requests.
    pub login: String,
    /// Where the client's listener takes its buddies' connections (told
    /// to buddies by the CRS; the MS itself never connects there).
    pub address: SocketAddr,
    /// The client's login connection, held for the whole login: pushes go
    /// out on it, and its close ends the login. `None` only for a login
    /// made without a socket (handler tests).
    pub held: Option<crate::prethread::Outbound>,
    /// Buddies (mutual), kept current by the CRS's events.
    pub contacts: Mutex<Names>,
    /// Opens the client's requests and seals our replies.
    pub link: Mutex<Channel>,
    /// Seals our pushes to the client.
    pub push: Mutex<Sealer>,
    /// Milliseconds (since the MS started) of the client's last sign of life.
    pub last_seen: AtomicU64,
    /// The CRS's number of this login (`Login-Number`), renewed when the
    /// login is announced again to a restarted CRS.
    pub number: AtomicU64,
    /// Set when this login ends (logout, or replaced by a newer login):
    /// pushes still queued for it are dropped instead of sent.
    pub ended: AtomicBool,
}

/// A fixed origin for [`OnlineUser::last_seen`], so it fits an atomic.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`].
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl OnlineUser {
    /// Whether this login has ended.
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    /// Notes a sign of life from the client.
    pub fn touch(&self) {
        self.last_seen.store(now_ms(), Ordering::Relaxed);
    }

    /// Ends the held connection (a push failed, or the client went
    /// silent): the pool then closes it and the login ends.
    pub fn drop_connection(&self) {
        if let Some(out) = &self.held {
            out.close();
        }
    }
}

/// A set of user names in a single allocation, for the contact list every
/// online user keeps here: a `BTreeSet<String>` of 20 names took about
/// 1.4 KB (tree nodes and an allocation per name), this about 150 bytes.
/// Lookups scan, which for a contact list is as fast as a tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names(String);

/// Separates the names; never part of one (names are `a-z 0-9 _ . -`).
const SEP: char = '\n';

impl Names {
    /// The names.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.split(SEP).filter(|n| !n.is_empty())
    }

    /// Whether `name` is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.iter().any(|n| n == name)
    }

    /// Adds `name`; false if it was there (or cannot be a name).
    pub fn insert(&mut self, name: String) -> bool {
        if name.is_empty() || name.contains(SEP) || self.contains(&name) {
            return false;
        }
        if !self.0.is_empty() {
            self.0.push(SEP);
        }
        self.0.push_str(&name);
        true
    }

    /// Removes `name`; false if it was not there.
    pub fn remove(&mut self, name: &str) -> bool {
        if !self.contains(name) {
            return false;
        }
        let rest: Vec<&str> = self.iter().filter(|n| *n != name).collect();
        self.0 = rest.join("\n");
        true
    }

    /// How many names.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<String> for Names {
    fn from_iter<I: IntoIterator<Item = String>>(names: I) -> Names {
        let mut all: Vec<String> = names
            .into_iter()
            .filter(|n| !n.is_empty() && !n.contains(SEP))
            .collect();
        all.sort_unstable();
        all.dedup();
        Names(all.join("\n"))
    }
}

/// Everyone online here, by name and by login id.
#[derive(Default)]
pub struct Users {
    by_name: RwLock<HashMap<String, Arc<OnlineUser>>>,
    by_login: RwLock<HashMap<String, Arc<OnlineUser>>>,
    /// Events that arrived for users whose login is between its `ONLINE`
    /// at the CRS and its entry here; applied when the entry is made.
    arriving: Mutex<HashMap<String, Vec<crate::proto::crs::Event>>>,
    /// Logins completed here (a metric).
    pub logins: prometheus_client::metrics::counter::Counter,
    /// Logins refused for a wrong password or an unknown name (a metric).
    pub failures: prometheus_client::metrics::counter::Counter,
}

impl Users {
    /// Adds a new login, replacing an older one of the same user.
    pub fn insert(&self, user: Arc<OnlineUser>) {
        let old = self.by_name.write().insert(user.name.clone(), user.clone());
        let mut by_login = self.by_login.write();
        if let Some(old) = old {
            old.ended.store(true, Ordering::Relaxed);
            by_login.remove(&old.login);
        }
        by_login.insert(user.login.clone(), user);
    }

    /// A login of `name` is about to go online at the CRS: hold its
    /// events. `false` (and nothing held) if another login of `name` is
    /// already arriving here: the CRS would refuse one of the two anyway,
    /// and each needs the events to itself.
    pub fn begin(&self, name: &str) -> bool {
        match self.arriving.lock().entry(name.to_owned()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Vec::new());
                true
            }
        }
    }

    /// Holds `event` if `name`'s login is arriving; gives it back otherwise.
    pub fn hold(
        &self,
        name: &str,
        event: crate::proto::crs::Event,
    ) -> Option<crate::proto::crs::Event> {
        match self.arriving.lock().get_mut(name) {
            Some(held) => {
                held.push(event);
                None
            }
            None => Some(event),
        }
    }

    /// Adds `user` (or, with `None`, abandons the arriving login) and
    /// returns the events held for it meanwhile.
    pub fn finish(
        &self,
        name: &str,
        user: Option<Arc<OnlineUser>>,
    ) -> Vec<crate::proto::crs::Event> {
        let mut arriving = self.arriving.lock();
        if let Some(user) = user {
            self.insert(user);
            self.logins.inc();
        }
        arriving.remove(name).unwrap_or_default()
    }

    /// Removes `name`'s login if it is `login` (or any, for `None`).
    pub fn remove(&self, name: &str, login: Option<&str>) -> Option<Arc<OnlineUser>> {
        let mut by_name = self.by_name.write();
        let matches = by_name
            .get(name)
            .is_some_and(|u| login.is_none_or(|l| u.login == l));
        if !matches {
            return None;
        }
        let user = by_name.remove(name)?;
        user.ended.store(true, Ordering::Relaxed);
        self.by_login.write().remove(&user.login);
        Some(user)
    }

    /// The user logged in with `login`.
    pub fn by_login(&self, login: &str) -> Option<Arc<OnlineUser>> {
        self.by_login.read().get(login).cloned()
    }

    /// The user called `name`, if online here.
    pub fn by_name(&self, name: &str) -> Option<Arc<OnlineUser>> {
        self.by_name.read().get(name).cloned()
    }

    /// How many are online here.
    pub fn len(&self) -> usize {
        self.by_name.read().len()
    }

    /// Whether nobody is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Users whose clients have been silent for `timeout`.
    pub fn silent(&self, timeout: Duration) -> Vec<Arc<OnlineUser>> {
        let now = now_ms();
        let limit = timeout.as_millis() as u64;
        self.by_name
            .read()
            .values()
            .filter(|u| now.saturating_sub(u.last_seen.load(Ordering::Relaxed)) >= limit)
            .cloned()
            .collect()
    }

    /// Everyone, for re-announcing after the CRS restarted.
    pub fn all(&self) -> Vec<Arc<OnlineUser>> {
        self.by_name.read().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Names;

    #[test]
    fn names_behave_as_a_set() {
        let mut n: Names = ["bob", "al", "bob", "", "x\ny"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(n.iter().collect::<Vec<_>>(), vec!["al", "bob"]);
        assert!(n.contains("al") && n.contains("bob"));
        assert!(!n.contains("a") && !n.contains("") && !n.contains("bob\nal"));
        assert!(n.insert("carol".into()));
        assert!(!n.insert("al".into()));
        assert_eq!(n.len(), 3);
        assert!(n.remove("al"));
        assert!(!n.remove("al"));
        assert_eq!(n.iter().collect::<Vec<_>>(), vec!["bob", "carol"]);
        assert!(n.remove("bob") && n.remove("carol"));
        assert!(n.is_empty() && !n.contains(""));
        assert!(n.insert("dee".into()));
        assert_eq!(n.iter().collect::<Vec<_>>(), vec!["dee"]);
    }
}
