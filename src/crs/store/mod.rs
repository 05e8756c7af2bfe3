//! Durable storage of the CRS: registered users, their credentials, profiles,
//! key material, buddy lists and pending buddy requests.
//!
//! Everything the central repository server must remember across a restart
//! lives behind the [`Store`] trait (offline messages behind its part
//! [`MailStore`]). Volatile state (enrolled messaging
//! servers, presence, login locks) is deliberately not here.
//!
//! Three implementations:
//! - [`SledStore`]: the embedded default on sled; every mutating call returns
//!   only after the change has been flushed to disk;
//! - [`PgStore`]: PostgreSQL, for a directory that several CRS instances
//!   serve together (the live state then lives there too, see
//!   [`crate::crs::live`]);
//! - [`MemStore`]: a `BTreeMap` under a mutex, the reference model in tests
//!   and a cheap store for handler unit tests.
//!
//! Names: users are keyed by their canonical (lowercase) name, so uniqueness
//! ignoring case falls out of the key space and no separate index is needed.
//! Every method that takes a user name canonicalizes it and rejects invalid
//! ones with [`StoreError::InvalidName`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

mod cache;
pub mod mail;
mod mail_pg;
mod mail_sled;
mod memory;
mod pg;
pub mod schema;
mod sled_store;

pub use cache::{CachedStore, MAX_CACHED_RECORDS, MAX_CACHED_USERS};
pub use mail::{MailEntry, MailLimits, MailStore, Outcome, Queued, Receipt, StoredMail};
pub use memory::MemStore;
pub use pg::{describe, PgConn, PgPool, PgStore, TxError};
pub use sled_store::SledStore;

/// Where the CRS keeps its data: `--store` / `store =`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// `sled:DIR`: the embedded database in DIR.
    Sled(std::path::PathBuf),
    /// `postgres://...` (or `postgresql://...`): a PostgreSQL database.
    Postgres(String),
}

impl StoreSpec {
    /// Parses `sled:DIR` or a `postgres://` / `postgresql://` URL.
    pub fn parse(text: &str) -> Result<StoreSpec, String> {
        if let Some(dir) = text.strip_prefix("sled:") {
            if dir.is_empty() {
                return Err("store sled: needs a directory (sled:DIR)".into());
            }
            Ok(StoreSpec::Sled(dir.into()))
        } else if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(StoreSpec::Postgres(text.to_owned()))
        } else {
            Err(format!(
                "unknown store {text:?}: use sled:DIR or postgres://USER@HOST/DB"
            ))
        }
    }
}

/// Longest user name, in bytes (names are ASCII).
pub const MAX_NAME_LEN: usize = 32;

/// Whether `name` is an acceptable user name: 1 to 32 characters from
/// `a-z A-Z 0-9 _ . -`. Upper case is accepted here because names are
/// unique ignoring case; [`canonical`] folds it.
pub fn valid_username(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The canonical (lowercase) form of a name: the key users are stored under.
pub fn canonical(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// Validates and canonicalizes a name taken from a caller.
pub(crate) fn checked(name: &str) -> Result<String, StoreError> {
    if valid_username(name) {
        Ok(canonical(name))
    } else {
        Err(StoreError::InvalidName)
    }
}

/// Binary fields of stored records: base64 text in the JSON, not an array
/// of numbers (which took about four times the bytes on disk and was the
/// slowest part of decoding a record at login). Records written before, with
/// arrays, still read.
mod bytes {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::crypto::b64_encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("base64 text or an array of bytes")
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<Vec<u8>, E> {
            crate::crypto::b64_decode(v).map_err(|_| E::custom("invalid base64"))
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// SCRAM-SHA-256 style password verifier. Opaque to the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verifier {
    /// Per-user random salt.
    #[serde(with = "bytes")]
    pub salt: Vec<u8>,
    /// PBKDF2 iteration count.
    pub iterations: u32,
    /// `H(ClientKey)`.
    #[serde(with = "bytes")]
    pub stored_key: Vec<u8>,
    /// `HMAC(SaltedPassword, "Server Key")`.
    #[serde(with = "bytes")]
    pub server_key: Vec<u8>,
}

/// A buddy request waiting for its recipient.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuddyRequest {
    /// Canonical name of the sender.
    pub from: String,
    /// Sender's signature over the request (opaque to the store).
    #[serde(with = "bytes")]
    pub signature: Vec<u8>,
    /// Nonce the signature covers (opaque to the store).
    #[serde(with = "bytes")]
    pub nonce: Vec<u8>,
    /// When the request was made, seconds since the Unix epoch.
    pub created_unix: u64,
}

/// One registered user, as stored (JSON-encoded in sled).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Canonical (lowercase) name; the record's key.
    pub name: String,
    /// Password verifier.
    pub verifier: Verifier,
    /// Free-form profile fields (full name, email, company, ...).
    pub profile: BTreeMap<String, String>,
    /// Public key, DER.
    #[serde(with = "bytes")]
    pub public_key: Vec<u8>,
    /// Private key wrapped by the client under its password (opaque).
    #[serde(with = "bytes")]
    pub wrapped_private_key: Vec<u8>,
    /// Canonical names of buddies. Mutual: `b` is in `a`'s set iff `a` is in
    /// `b`'s.
    pub contacts: BTreeSet<String>,
    /// Buddy requests waiting for this user, oldest first, at most one per
    /// sender.
    pub requests: Vec<BuddyRequest>,
    /// Registration time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Canonical names of the users this user blocks.
    #[serde(default)]
    pub blocked: BTreeSet<String>,
    /// The status the user last set (kept across logins).
    #[serde(default)]
    pub status: crate::proto::status::Status,
    /// The personal message the user last set.
    #[serde(default)]
    pub status_message: String,
}

/// How one user shows to a buddy logging in: the only fields of its
/// record a login reads for each buddy ([`Store::contact_views`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContactView {
    /// The status the user last set.
    pub status: crate::proto::status::Status,
    /// The personal message the user last set.
    pub status_message: String,
    /// Whether the user blocks the viewer.
    pub blocks_viewer: bool,
}

impl ContactView {
    /// The view of `user` by `viewer`, from the whole record.
    pub fn of(user: &User, viewer: &str) -> ContactView {
        ContactView {
            status: user.status,
            status_message: user.status_message.clone(),
            blocks_viewer: user.blocked.contains(viewer),
        }
    }
}

/// The fields of a user's record that decide how the user shows to each
/// buddy ([`ContactView`]), whoever the buddy is: what
/// [`Store::status_fields`] reads, and what a cache keeps to answer
/// [`Store::contact_views`] for any viewer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusFields {
    /// The status the user last set.
    pub status: crate::proto::status::Status,
    /// The personal message the user last set.
    pub status_message: String,
    /// Canonical names of the users this user blocks.
    pub blocked: BTreeSet<String>,
}

impl StatusFields {
    /// The fields of `user`'s record.
    pub fn of(user: &User) -> StatusFields {
        StatusFields {
            status: user.status,
            status_message: user.status_message.clone(),
            blocked: user.blocked.clone(),
        }
    }

    /// How the user shows to `viewer` (canonical).
    pub fn view_by(&self, viewer: &str) -> ContactView {
        ContactView {
            status: self.status,
            status_message: self.status_message.clone(),
            blocks_viewer: self.blocked.contains(viewer),
        }
    }
}

/// One result of [`Store::search`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SearchHit {
    /// Canonical user name.
    pub name: String,
    /// The user's profile.
    pub profile: BTreeMap<String, String>,
}

/// Everything that can go wrong in a [`Store`] call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// A named user does not exist.
    NoSuchUser,
    /// `create_user`: the name (ignoring case) is already registered.
    NameTaken,
    /// `add_request`: the two users are already buddies.
    AlreadyBuddies,
    /// A two-user operation was given the same user twice.
    SameUser,
    /// A name is not a valid user name (see [`valid_username`]).
    InvalidName,
    /// A record read from disk could not be decoded; names the record.
    Corrupt(String),
    /// The storage backend (sled or the file system) failed.
    Backend(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NoSuchUser => f.write_str("no such user"),
            StoreError::NameTaken => f.write_str("name already taken"),
            StoreError::AlreadyBuddies => f.write_str("already buddies"),
            StoreError::SameUser => f.write_str("both names are the same user"),
            StoreError::InvalidName => f.write_str("invalid user name"),
            StoreError::Corrupt(what) => write!(f, "corrupt record: {what}"),
            StoreError::Backend(what) => write!(f, "storage backend error: {what}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Durable user data of the CRS. Object-safe; implementations are
/// thread-safe and every mutating method is atomic and, for durable
/// implementations, on disk when it returns.
///
/// All `name`-like parameters are validated ([`StoreError::InvalidName`]) and
/// compared in canonical form.
pub trait Store: Send + Sync + MailStore {
    /// Registers `user` under `canonical(user.name)`. The stored record starts
    /// with no contacts and no requests whatever `user` carries (buddies are
    /// made only through [`Store::make_buddies`]). `NameTaken` if the name
    /// exists ignoring case.
    fn create_user(&self, user: User) -> Result<(), StoreError>;

    /// The user's record, or `None` if not registered.
    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError>;

    /// The user's password verifier alone, or `None` if not registered
    /// (every login asks for it; backends skip the rest of the record).
    fn get_verifier(&self, name: &str) -> Result<Option<Verifier>, StoreError> {
        Ok(self.get_user(name)?.map(|u| u.verifier))
    }

    /// How each registered user of `names` shows to `viewer`
    /// (unregistered ones are left out; `InvalidName` for any invalid
    /// name). A login asks this for every
    /// buddy, so backends read only these fields: decoding whole records
    /// (keys, profile) for 20 buddies was most of a login's CPU at the CRS.
    fn contact_views(
        &self,
        viewer: &str,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, ContactView>, StoreError> {
        let viewer = checked(viewer)?;
        let mut views = BTreeMap::new();
        for name in names {
            if let Some(u) = self.get_user(name)? {
                views.insert(u.name.clone(), ContactView::of(&u, &viewer));
            }
        }
        Ok(views)
    }

    /// The [`StatusFields`] of each registered user of `names`
    /// (unregistered ones are left out; `InvalidName` for any invalid
    /// name). Backends read only these fields, as for
    /// [`Store::contact_views`].
    fn status_fields(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, StatusFields>, StoreError> {
        let mut fields = BTreeMap::new();
        for name in names {
            if let Some(u) = self.get_user(name)? {
                fields.insert(u.name.clone(), StatusFields::of(&u));
            }
        }
        Ok(fields)
    }

    /// Deletes a user, removing the name from every buddy's contacts and every
    /// request the user sent that is still pending. `false` if absent.
    fn delete_user(&self, name: &str) -> Result<bool, StoreError>;

    /// Up to `limit` canonical names in ascending order, starting strictly
    /// after `after` (compared in canonical form) when given.
    fn list_users(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Number of registered users.
    fn user_count(&self) -> Result<u64, StoreError>;

    /// Replaces verifier and wrapped private key (password change).
    fn set_credentials(
        &self,
        name: &str,
        verifier: Verifier,
        wrapped_private_key: Vec<u8>,
    ) -> Result<(), StoreError>;

    /// Replaces the whole profile.
    fn set_profile(&self, name: &str, profile: BTreeMap<String, String>) -> Result<(), StoreError>;

    /// Users whose canonical name starts with `text` (ignoring case) or any
    /// of whose profile values contains `text` ignoring case; at most `limit`
    /// hits, ordered by name.
    fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, StoreError>;

    /// Files a buddy request for `to`, replacing (and moving to the end) an
    /// earlier one from the same sender. `req.from` is canonicalized.
    /// `NoSuchUser` if either user is missing, `SameUser` if `to` is the
    /// sender, `AlreadyBuddies` if they are contacts already.
    fn add_request(&self, to: &str, req: BuddyRequest) -> Result<(), StoreError>;

    /// Returns and clears the requests waiting for `name` (used at login).
    fn take_requests(&self, name: &str) -> Result<Vec<BuddyRequest>, StoreError>;

    /// Drops the request from `from` waiting for `to`; `false` if there was
    /// none. `NoSuchUser` if `to` is missing.
    fn remove_request(&self, to: &str, from: &str) -> Result<bool, StoreError>;

    /// Makes `a` and `b` buddies of each other (idempotent) and drops any
    /// pending request between them in either direction, all at once.
    fn make_buddies(&self, a: &str, b: &str) -> Result<(), StoreError>;

    /// Removes `a` and `b` from each other's contacts at once; `false` if
    /// they were not buddies. `NoSuchUser` if either is missing.
    fn remove_buddies(&self, a: &str, b: &str) -> Result<bool, StoreError>;

    /// The user's buddies.
    fn contacts(&self, name: &str) -> Result<BTreeSet<String>, StoreError>;

    /// `name` blocks (`on`) or unblocks `who` (who need not exist: a
    /// block outlives an account's deletion); whether that changed
    /// anything. `NoSuchUser` if `name` does not exist.
    fn set_blocked(&self, name: &str, who: &str, on: bool) -> Result<bool, StoreError>;

    /// Sets the user's status and personal message; `NoSuchUser` if the
    /// user does not exist.
    fn set_status(
        &self,
        name: &str,
        status: crate::proto::status::Status,
        message: &str,
    ) -> Result<(), StoreError>;
}

/// The search predicate shared by both implementations. `needle` must
/// already be lowercase.
pub(crate) fn search_matches(needle: &str, user: &User) -> bool {
    user.name.starts_with(needle)
        || user
            .profile
            .values()
            .any(|v| v.to_lowercase().contains(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        assert!(valid_username("a"));
        assert!(valid_username("Alice_01.x-y"));
        assert!(valid_username(&"z".repeat(32)));
        assert!(!valid_username(""));
        assert!(!valid_username(&"z".repeat(33)));
        assert!(!valid_username("a b"));
        assert!(!valid_username("é"));
        assert!(!valid_username("a/b"));
        assert_eq!(canonical("AlIcE"), "alice");
        assert_eq!(checked("Bob"), Ok("bob".to_string()));
        assert_eq!(checked("b@b"), Err(StoreError::InvalidName));
    }

    #[test]
    fn binary_fields_are_base64_and_old_records_still_read() {
        let user = User {
            name: "ann".into(),
            verifier: Verifier {
                salt: vec![1, 2, 3],
                iterations: 1000,
                stored_key: vec![],
                server_key: vec![255; 4],
            },
            public_key: vec![0x30, 0x82],
            wrapped_private_key: vec![9; 5],
            requests: vec![BuddyRequest {
                from: "bob".into(),
                signature: vec![7],
                nonce: vec![8, 8],
                created_unix: 1,
            }],
            ..Default::default()
        };
        let json = serde_json::to_string(&user).unwrap();
        assert!(json.contains(r#""public_key":"MII=""#), "{json}");
        assert_eq!(serde_json::from_str::<User>(&json).unwrap(), user);
        // As records were written before: byte arrays as numbers.
        let old = r#"{"name":"ann","verifier":{"salt":[1,2,3],"iterations":1000,
            "stored_key":[],"server_key":[255,255,255,255]},"profile":{},
            "public_key":[48,130],"wrapped_private_key":[9,9,9,9,9],"contacts":[],
            "requests":[{"from":"bob","signature":[7],"nonce":[8,8],"created_unix":1}],
            "created_unix":0}"#;
        assert_eq!(serde_json::from_str::<User>(old).unwrap(), user);
        assert!(serde_json::from_str::<User>(&old.replace("[48,130]", "\"M!\"")).is_err());
        assert!(serde_json::from_str::<User>(&old.replace("[48,130]", "[48,300]")).is_err());
    }

    #[test]
    fn store_specs() {
        assert_eq!(
            StoreSpec::parse("sled:/var/lib/ims"),
            Ok(StoreSpec::Sled("/var/lib/ims".into()))
        );
        for url in ["postgres://ims@db/ims", "postgresql://a:b@h:5433/d"] {
            assert_eq!(StoreSpec::parse(url), Ok(StoreSpec::Postgres(url.into())));
        }
        for bad in ["sled:", "mysql://x", "/var/lib/ims", ""] {
            assert!(StoreSpec::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn error_display() {
        for e in [
            StoreError::NoSuchUser,
            StoreError::NameTaken,
            StoreError::AlreadyBuddies,
            StoreError::SameUser,
            StoreError::InvalidName,
            StoreError::Corrupt("x".into()),
            StoreError::Backend("y".into()),
        ] {
            assert!(!e.to_string().is_empty());
        }
    }
}
