//! The users logged in at this MS, with their contact lists and the keys
//! of their login; the only proof that a request is authenticated is an
//! [`OnlineUser`] found here by its login id.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::seal::{Opener, Sealer};

/// A logged-in user: created only by a successful login.
pub struct OnlineUser {
    /// Canonical name.
    pub name: String,
    /// The login's id, the clear `Login` header of the client's requests.
    pub login: String,
    /// Where the client's listener takes pushes.
    pub address: SocketAddr,
    /// Buddies (mutual), kept current by the CRS's events.
    pub contacts: Mutex<BTreeSet<String>>,
    /// Opens the client's requests and seals our replies.
    pub link: Mutex<(Opener, Sealer)>,
    /// Seals our pushes to the client.
    pub push: Mutex<Sealer>,
    /// Set when this login ends (logout, or replaced by a newer login):
    /// pushes still queued for it are dropped instead of sent.
    pub ended: AtomicBool,
}

impl OnlineUser {
    /// Whether this login has ended.
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }
}

/// Everyone online here, by name and by login id.
#[derive(Default)]
pub struct Users {
    by_name: RwLock<HashMap<String, Arc<OnlineUser>>>,
    by_login: RwLock<HashMap<String, Arc<OnlineUser>>>,
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

    /// Removes `name`'s login if it is `login` (or any, for `None`).
    pub fn remove(&self, name: &str, login: Option<&str>) -> Option<Arc<OnlineUser>> {
        let mut by_name = self.by_name.write();
        let matches = by_name.get(name).is_some_and(|u| login.map_or(true, |l| u.login == l));
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

    /// Everyone, for re-announcing after the CRS restarted.
    pub fn all(&self) -> Vec<Arc<OnlineUser>> {
        self.by_name.read().values().cloned().collect()
    }
}
