//! `MemStore`: an in-memory [`Store`] on a `BTreeMap` behind one mutex.
//!
//! Written to be obviously correct rather than fast: every call holds the
//! lock for its whole duration, so each is trivially atomic. It is the model
//! the sled store is checked against, and a convenient store for handler
//! unit tests. Nothing survives the process.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use parking_lot::Mutex;

use super::{checked, search_matches, BuddyRequest, SearchHit, Store, StoreError, User, Verifier};

/// In-memory store; see the module documentation.
#[derive(Debug, Default)]
pub struct MemStore {
    users: Mutex<BTreeMap<String, User>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

/// Looks a user up mutably, `NoSuchUser` if absent.
fn user_mut<'a>(
    users: &'a mut BTreeMap<String, User>,
    name: &str,
) -> Result<&'a mut User, StoreError> {
    users.get_mut(name).ok_or(StoreError::NoSuchUser)
}

impl Store for MemStore {
    fn create_user(&self, mut user: User) -> Result<(), StoreError> {
        let name = checked(&user.name)?;
        let mut users = self.users.lock();
        if users.contains_key(&name) {
            return Err(StoreError::NameTaken);
        }
        user.name = name.clone();
        user.contacts.clear();
        user.requests.clear();
        users.insert(name, user);
        Ok(())
    }

    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        let name = checked(name)?;
        Ok(self.users.lock().get(&name).cloned())
    }

    fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        let name = checked(name)?;
        let mut users = self.users.lock();
        if users.remove(&name).is_none() {
            return Ok(false);
        }
        for u in users.values_mut() {
            u.contacts.remove(&name);
            u.requests.retain(|r| r.from != name);
        }
        Ok(true)
    }

    fn list_users(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let users = self.users.lock();
        let start = match after {
            Some(a) => Bound::Excluded(super::canonical(a)),
            None => Bound::Unbounded,
        };
        Ok(users
            .range((start, Bound::Unbounded))
            .take(limit)
            .map(|(k, _)| k.clone())
            .collect())
    }

    fn user_count(&self) -> Result<u64, StoreError> {
        Ok(self.users.lock().len() as u64)
    }

    fn set_credentials(
        &self,
        name: &str,
        verifier: Verifier,
        wrapped_private_key: Vec<u8>,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        let mut users = self.users.lock();
        let u = user_mut(&mut users, &name)?;
        u.verifier = verifier;
        u.wrapped_private_key = wrapped_private_key;
        Ok(())
    }

    fn set_blocked(&self, name: &str, who: &str, on: bool) -> Result<bool, StoreError> {
        let name = checked(name)?;
        let who = checked(who)?;
        if name == who {
            return Err(StoreError::SameUser);
        }
        let mut users = self.users.lock();
        let user = user_mut(&mut users, &name)?;
        Ok(if on {
            user.blocked.insert(who)
        } else {
            user.blocked.remove(&who)
        })
    }

    fn set_status(
        &self,
        name: &str,
        status: crate::proto::status::Status,
        message: &str,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        let mut users = self.users.lock();
        let user = user_mut(&mut users, &name)?;
        user.status = status;
        user.status_message = message.to_owned();
        Ok(())
    }

    fn set_profile(&self, name: &str, profile: BTreeMap<String, String>) -> Result<(), StoreError> {
        let name = checked(name)?;
        let mut users = self.users.lock();
        user_mut(&mut users, &name)?.profile = profile;
        Ok(())
    }

    fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, StoreError> {
        let needle = text.to_lowercase();
        let users = self.users.lock();
        Ok(users
            .values()
            .filter(|u| search_matches(&needle, u))
            .take(limit)
            .map(|u| SearchHit {
                name: u.name.clone(),
                profile: u.profile.clone(),
            })
            .collect())
    }

    fn add_request(&self, to: &str, mut req: BuddyRequest) -> Result<(), StoreError> {
        let to = checked(to)?;
        let from = checked(&req.from)?;
        if to == from {
            return Err(StoreError::SameUser);
        }
        let mut users = self.users.lock();
        if !users.contains_key(&from) {
            return Err(StoreError::NoSuchUser);
        }
        let u = user_mut(&mut users, &to)?;
        if u.contacts.contains(&from) {
            return Err(StoreError::AlreadyBuddies);
        }
        u.requests.retain(|r| r.from != from);
        req.from = from;
        u.requests.push(req);
        Ok(())
    }

    fn take_requests(&self, name: &str) -> Result<Vec<BuddyRequest>, StoreError> {
        let name = checked(name)?;
        let mut users = self.users.lock();
        Ok(std::mem::take(&mut user_mut(&mut users, &name)?.requests))
    }

    fn remove_request(&self, to: &str, from: &str) -> Result<bool, StoreError> {
        let to = checked(to)?;
        let from = checked(from)?;
        let mut users = self.users.lock();
        let u = user_mut(&mut users, &to)?;
        let before = u.requests.len();
        u.requests.retain(|r| r.from != from);
        Ok(u.requests.len() != before)
    }

    fn make_buddies(&self, a: &str, b: &str) -> Result<(), StoreError> {
        let a = checked(a)?;
        let b = checked(b)?;
        if a == b {
            return Err(StoreError::SameUser);
        }
        let mut users = self.users.lock();
        if !users.contains_key(&a) || !users.contains_key(&b) {
            return Err(StoreError::NoSuchUser);
        }
        for (me, other) in [(&a, &b), (&b, &a)] {
            let u = user_mut(&mut users, me)?;
            u.contacts.insert(other.clone());
            u.requests.retain(|r| &r.from != other);
        }
        Ok(())
    }

    fn remove_buddies(&self, a: &str, b: &str) -> Result<bool, StoreError> {
        let a = checked(a)?;
        let b = checked(b)?;
        if a == b {
            return Err(StoreError::SameUser);
        }
        let mut users = self.users.lock();
        if !users.contains_key(&a) || !users.contains_key(&b) {
            return Err(StoreError::NoSuchUser);
        }
        let mut removed = false;
        for (me, other) in [(&a, &b), (&b, &a)] {
            removed |= user_mut(&mut users, me)?.contacts.remove(other);
        }
        Ok(removed)
    }

    fn contacts(&self, name: &str) -> Result<BTreeSet<String>, StoreError> {
        let name = checked(name)?;
        let users = self.users.lock();
        Ok(users
            .get(&name)
            .ok_or(StoreError::NoSuchUser)?
            .contacts
            .clone())
    }
}
