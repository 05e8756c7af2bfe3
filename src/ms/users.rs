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

    /// `name`'s login here, to tell it `event`; or, while that login is
    /// arriving, `None` with the event held for it (see [`Users::finish`]);
    /// or `None` when `name` is not here at all (nobody to tell). One
    /// decision under the arriving logins' lock, so a login that finishes
    /// meanwhile is found, not missed: its held events were handed over,
    /// and a check of the table then a hold would drop the event.
    pub fn find_or_hold(
        &self,
        name: &str,
        event: impl FnOnce() -> crate::proto::crs::Event,
    ) -> Option<Arc<OnlineUser>> {
        // The common case without the arriving logins' lock.
        if let Some(user) = self.by_name(name) {
            return Some(user);
        }
        let mut arriving = self.arriving.lock();
        if let Some(held) = arriving.get_mut(name) {
            held.push(event());
            return None;
        }
        // `finish` inserts under the same lock: here it has, or has not
        // begun.
        self.by_name(name)
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
    use super::*;
    use crate::proto::crs::{Event, EventKind};
    use crate::seal::{Role, SessionKeys};

    fn user(name: &str) -> Arc<OnlineUser> {
        let keys = SessionKeys::derive(&[7; 32], b"test", Role::Responder);
        let push = SessionKeys::derive(&[8; 32], b"test", Role::Responder);
        Arc::new(OnlineUser {
            name: name.into(),
            login: format!("{name}-login"),
            address: "127.0.0.1:1".parse().unwrap(),
            held: None,
            contacts: Mutex::new(Names::default()),
            link: Mutex::new(Channel::new(keys, Vec::new())),
            push: Mutex::new(push.send),
            last_seen: AtomicU64::new(0),
            number: AtomicU64::new(1),
            ended: AtomicBool::new(false),
        })
    }

    fn event(n: u8) -> Event {
        Event {
            recipients: vec!["bob".into()],
            kind: EventKind::Offline {
                user: format!("u{n}"),
            },
        }
    }

    #[test]
    fn an_event_is_held_for_an_arriving_login_and_found_once_it_is_in() {
        let users = Users::default();
        // Not here at all: nobody to tell, nothing held.
        assert!(users.find_or_hold("bob", || event(0)).is_none());
        assert!(users.begin("bob"));
        assert!(users.find_or_hold("bob", || event(1)).is_none());
        assert!(users.find_or_hold("bob", || event(2)).is_none());
        let bob = user("bob");
        let held = users.finish("bob", Some(bob.clone()));
        assert_eq!(held, vec![event(1), event(2)]);
        // In the table now: found, nothing more held.
        let found = users.find_or_hold("bob", || panic!("held for a login that is in"));
        assert!(found.is_some_and(|u| Arc::ptr_eq(&u, &bob)));
        assert!(users.finish("bob", None).is_empty());
    }

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
