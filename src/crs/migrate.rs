//! `ims-crs migrate --from STORE --to STORE`: copies a directory from one
//! store to another (typically sled to PostgreSQL), with the CRS's key pair
//! so that the fingerprint clients know stays the same.
//!
//! The destination must be empty. Users are copied in pages: first every
//! record, then every contact and request (which name other users, so
//! they go in once all users are there). Then both sides are read again in
//! name order and compared: the user count and a SHA-256 over every whole
//! record (profile, keys, verifier, contacts, requests) must be equal, else
//! the migration fails.

use log::info;

use super::store::{PgStore, SledStore, Store, StoreSpec, User};
use crate::crypto::{self, RsaPrivateKey};

/// Users per page.
const PAGE: usize = 1000;

/// What a migration copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Users copied.
    pub users: u64,
    /// Contact pairs (each counted once per direction).
    pub contacts: u64,
    /// Pending buddy requests.
    pub requests: u64,
    /// The checksum both sides share, hex.
    pub checksum: String,
    /// Whether the CRS key went along.
    pub key_copied: bool,
}

/// An open store of either kind.
enum Opened {
    Sled(SledStore),
    Pg(Box<PgStore>),
}

impl Opened {
    fn open(spec: &StoreSpec) -> Result<Opened, String> {
        match spec {
            StoreSpec::Sled(dir) => SledStore::open(&dir.join("db"))
                .map(Opened::Sled)
                .map_err(|e| format!("{}: {e}", dir.display())),
            StoreSpec::Postgres(url) => PgStore::open(url)
                .map(|s| Opened::Pg(Box::new(s)))
                .map_err(|e| e.to_string()),
        }
    }

    fn store(&self) -> &dyn Store {
        match self {
            Opened::Sled(s) => s,
            Opened::Pg(s) => s.as_ref(),
        }
    }
}

/// Every user in name order, a page at a time, handed to `f`.
fn pages(s: &dyn Store, mut f: impl FnMut(Vec<User>) -> Result<(), String>) -> Result<(), String> {
    let mut after: Option<String> = None;
    loop {
        let names = s
            .list_users(after.as_deref(), PAGE)
            .map_err(|e| e.to_string())?;
        let Some(last) = names.last().cloned() else {
            return Ok(());
        };
        let mut page = Vec::with_capacity(names.len());
        for n in &names {
            match s.get_user(n).map_err(|e| e.to_string())? {
                Some(u) => page.push(u),
                None => return Err(format!("{n} vanished during the copy (is a CRS running?)")),
            }
        }
        f(page)?;
        after = Some(last);
    }
}

/// Counts and the checksum of a whole store.
fn summary(s: &dyn Store) -> Result<(u64, u64, u64, String), String> {
    let mut hash = crypto::Sha256::new();
    let (mut users, mut contacts, mut requests) = (0u64, 0u64, 0u64);
    pages(s, |page| {
        for u in page {
            users += 1;
            contacts += u.contacts.len() as u64;
            requests += u.requests.len() as u64;
            // JSON of a record is deterministic (ordered maps and sets).
            let json = serde_json::to_vec(&u).map_err(|e| e.to_string())?;
            hash.update(&(json.len() as u64).to_be_bytes());
            hash.update(&json);
        }
        Ok(())
    })?;
    Ok((
        users,
        contacts,
        requests,
        crate::keyfile::hex(&hash.finish()),
    ))
}

/// Copies `from` into the empty `to`, then verifies; `ms_key` wraps the
/// CRS key in a PostgreSQL destination.
pub fn migrate(from: &StoreSpec, to: &StoreSpec, ms_key: &[u8]) -> Result<Report, String> {
    if from == to {
        return Err("--from and --to are the same store".into());
    }
    let src = Opened::open(from)?;
    let dst = Opened::open(to)?;
    let existing = dst.store().user_count().map_err(|e| e.to_string())?;
    if existing > 0 {
        return Err(format!(
            "the destination already holds {existing} users; migrate into an empty store"
        ));
    }
    // Records first, then the relations between them.
    let mut copied = 0u64;
    pages(src.store(), |page| {
        match &dst {
            Opened::Pg(p) => p.bulk_records(&page).map_err(|e| e.to_string())?,
            Opened::Sled(s) => s
                .bulk_load(page.iter().cloned().map(|mut u| {
                    u.contacts.clear();
                    u.requests.clear();
                    u
                }))
                .map_err(|e| e.to_string())?,
        };
        copied += page.len() as u64;
        info!("copied {copied} users");
        Ok(())
    })?;
    pages(src.store(), |page| match &dst {
        Opened::Pg(p) => p.bulk_relations(&page).map_err(|e| e.to_string()),
        Opened::Sled(s) => s.bulk_load(page).map(|_| ()).map_err(|e| e.to_string()),
    })?;
    let key_copied = copy_key(from, &dst, ms_key)?;
    let want = summary(src.store())?;
    let got = summary(dst.store())?;
    if want != got {
        return Err(format!(
            "verification failed: source has {} users, {} contacts, {} requests, checksum {}; \
             the copy has {} users, {} contacts, {} requests, checksum {}",
            want.0, want.1, want.2, want.3, got.0, got.1, got.2, got.3
        ));
    }
    Ok(Report {
        users: got.0,
        contacts: got.1,
        requests: got.2,
        checksum: got.3,
        key_copied,
    })
}

/// Copies the CRS key of a sled directory (`DIR/crs-key.pem`) into a
/// PostgreSQL destination.
fn copy_key(from: &StoreSpec, dst: &Opened, ms_key: &[u8]) -> Result<bool, String> {
    match (from, dst) {
        (StoreSpec::Sled(dir), Opened::Pg(p)) => {
            let path = dir.join("crs-key.pem");
            let pem = match std::fs::read_to_string(&path) {
                Ok(pem) => pem,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(format!("{}: {e}", path.display())),
            };
            let key =
                RsaPrivateKey::from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
            super::identity::install(p.pool(), ms_key, &key)?;
            Ok(true)
        }
        // Into sled the key is not copied: a CRS on sled makes its own.
        _ => Ok(false),
    }
}
