//! `PgStore`: the [`Store`] on PostgreSQL, for directories served by several
//! CRS instances (see `schema` for the tables).
//!
//! Connections: a small pool of synchronous `postgres::Client`s ([`PgPool`]),
//! one taken per call and given back after; a connection found broken is
//! dropped and a new one made on the next call, so the CRS reconnects by
//! itself after the database restarts (the call that met the failure gets
//! `Backend`, and the client retries as for any storage error).
//!
//! Atomicity: every mutation is one transaction. Calls that touch two users
//! first lock both user rows (`FOR UPDATE`, in name order so two calls cannot
//! wait on each other), which serializes them against each other and against
//! deletion exactly as sled's transactions do. A serialization failure or a
//! deadlock the server detects anyway is retried a few times.
//! Durability: a commit returns once PostgreSQL has the change in its WAL on
//! disk (`synchronous_commit` as the server is set; on by default).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use log::{info, warn};
use parking_lot::Mutex;
use postgres::error::SqlState;
use postgres::{Client, NoTls};

use super::schema;
use super::{
    checked, search_matches, BuddyRequest, ContactView, SearchHit, Store, StoreError, User,
    Verifier,
};

/// Most connections one pool opens; a call finding them all busy waits for
/// one (up to [`POOL_WAIT`]). Each CRS instance has two pools (store, live
/// state) and one `LISTEN` connection, so PostgreSQL's `max_connections`
/// must exceed `(2 * POOL_MAX + 1)` times the number of instances.
pub const POOL_MAX: usize = 16;

/// How long a call waits for a connection of a full pool.
pub const POOL_WAIT: Duration = Duration::from_secs(10);

/// Times a transaction is retried after a serialization failure or deadlock.
const RETRIES: usize = 8;

/// How long a new connection may take to establish.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Users read per round trip by scans (`search`).
const SCAN_BATCH: i64 = 512;

/// A pool of connections to one database.
pub struct PgPool {
    config: postgres::Config,
    url_shown: String,
    /// Idle connections, and how many are open (idle or in use).
    state: Mutex<(Vec<Pooled>, usize)>,
    returned: parking_lot::Condvar,
    /// Set after a connection failed, so the next success says "reconnected".
    lost: std::sync::atomic::AtomicBool,
    /// When a connection last failed.
    last_failure: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for PgPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgPool({})", self.url_shown)
    }
}

/// The URL without its password, for logs.
fn shown(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A database error with the server's own message when there is one
/// (the error's `Display` alone says only "db error").
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "postgres: {}: {} ({})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        None => format!("postgres: {e}"),
    }
}

pub(crate) fn pg_err(e: postgres::Error) -> StoreError {
    StoreError::Backend(describe(&e))
}

/// Whether the error is one a retry of the whole transaction can cure.
fn retryable(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// A connection with the statements prepared on it so far.
struct Pooled {
    client: Client,
    prepared: std::collections::HashMap<&'static str, postgres::Statement>,
}

/// A pooled connection, given back to the pool when dropped unless broken.
/// Its `query`-like methods prepare each statement once per connection
/// (a statement given as text is otherwise parsed at every call, a round
/// trip of its own).
pub struct PgConn<'a> {
    pool: &'a PgPool,
    conn: Option<Pooled>,
}

type Params<'p> = &'p [&'p (dyn postgres::types::ToSql + Sync)];

impl PgConn<'_> {
    /// The pool it came from.
    pub fn pool(&self) -> &PgPool {
        self.pool
    }

    /// The connection.
    pub fn client(&mut self) -> &mut Client {
        // Present from creation until drop.
        &mut self
            .conn
            .as_mut()
            .expect("a pooled connection is present")
            .client
    }

    fn statement(&mut self, sql: &'static str) -> Result<postgres::Statement, postgres::Error> {
        let p = self.conn.as_mut().expect("a pooled connection is present");
        if let Some(s) = p.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = p.client.prepare(sql)?;
        p.prepared.insert(sql, s.clone());
        Ok(s)
    }

    /// `Client::query` with the statement prepared once.
    pub fn query(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Vec<postgres::Row>, postgres::Error> {
        let s = self.statement(sql)?;
        self.client().query(&s, params)
    }

    /// `Client::query_opt` with the statement prepared once.
    pub fn query_opt(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<Option<postgres::Row>, postgres::Error> {
        let s = self.statement(sql)?;
        self.client().query_opt(&s, params)
    }

    /// `Client::query_one` with the statement prepared once.
    pub fn query_one(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<postgres::Row, postgres::Error> {
        let s = self.statement(sql)?;
        self.client().query_one(&s, params)
    }

    /// `Client::execute` with the statement prepared once.
    pub fn execute(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
    ) -> Result<u64, postgres::Error> {
        let s = self.statement(sql)?;
        self.client().execute(&s, params)
    }
}

impl Drop for PgConn<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            let mut state = self.pool.state.lock();
            if c.client.is_closed() {
                state.1 = state.1.saturating_sub(1);
                drop(state);
                self.pool.note_lost();
            } else {
                state.0.push(c);
            }
            self.pool.returned.notify_one();
        }
    }
}

impl PgPool {
    /// A pool for `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, or the
    /// key=value form); no connection is made yet.
    pub fn new(url: &str) -> Result<PgPool, StoreError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("bad database URL: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("ims-crs");
        }
        Ok(PgPool {
            config,
            url_shown: shown(url),
            state: Mutex::new((Vec::new(), 0)),
            returned: parking_lot::Condvar::new(),
            lost: std::sync::atomic::AtomicBool::new(false),
            last_failure: Mutex::new(None),
        })
    }

    /// The URL, password hidden.
    pub fn shown(&self) -> &str {
        &self.url_shown
    }

    /// Whether a connection failed within `within`.
    pub fn failed_within(&self, within: Duration) -> bool {
        self.last_failure
            .lock()
            .is_some_and(|at| at.elapsed() < within)
    }

    fn note_lost(&self) {
        *self.last_failure.lock() = Some(std::time::Instant::now());
        if !self.lost.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn!("lost a connection to the database {}", self.url_shown);
        }
    }

    /// A fresh connection, not from the pool (for `LISTEN`).
    pub fn connect(&self) -> Result<Client, StoreError> {
        match self.config.connect(NoTls) {
            Ok(c) => {
                if self.lost.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    info!("reconnected to the database {}", self.url_shown);
                }
                Ok(c)
            }
            Err(e) => {
                self.note_lost();
                Err(pg_err(e))
            }
        }
    }

    /// A connection: an idle one if any, else a new one if the pool is not
    /// full, else the next one given back.
    pub fn get(&self) -> Result<PgConn<'_>, StoreError> {
        let deadline = std::time::Instant::now() + POOL_WAIT;
        let mut state = self.state.lock();
        loop {
            while let Some(c) = state.0.pop() {
                if !c.client.is_closed() {
                    return Ok(PgConn {
                        pool: self,
                        conn: Some(c),
                    });
                }
                state.1 = state.1.saturating_sub(1);
            }
            if state.1 < POOL_MAX {
                state.1 += 1;
                drop(state);
                return match self.connect() {
                    Ok(client) => Ok(PgConn {
                        pool: self,
                        conn: Some(Pooled {
                            client,
                            prepared: Default::default(),
                        }),
                    }),
                    Err(e) => {
                        let mut state = self.state.lock();
                        state.1 = state.1.saturating_sub(1);
                        self.returned.notify_one();
                        Err(e)
                    }
                };
            }
            if self.returned.wait_until(&mut state, deadline).timed_out() {
                return Err(StoreError::Backend(
                    "every database connection stayed busy".into(),
                ));
            }
        }
    }

    /// Runs `f` in one transaction, committing if it returns `Ok`; retried
    /// on serialization failures and deadlocks. `f` reports two kinds of
    /// error: a store error to return as is, or a database error.
    pub fn tx<T>(
        &self,
        mut f: impl FnMut(&mut PgConn<'_>) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.get()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // BEGIN and COMMIT by hand, so that the statements inside use
            // the connection's prepared ones.
            let result = (|| {
                conn.client().batch_execute("BEGIN").map_err(TxError::Db)?;
                let value = f(&mut conn)?;
                conn.client().batch_execute("COMMIT").map_err(TxError::Db)?;
                Ok(value)
            })();
            if result.is_err() && !conn.client().is_closed() {
                // Harmless if the COMMIT itself failed (nothing is open).
                let _ = conn.client().batch_execute("ROLLBACK");
            }
            match result {
                Ok(v) => return Ok(v),
                Err(TxError::Store(e)) => return Err(e),
                Err(TxError::Db(e)) if retryable(&e) && attempt < RETRIES => {
                    std::thread::sleep(Duration::from_millis(2 * attempt as u64));
                }
                Err(TxError::Db(e)) => return Err(pg_err(e)),
            }
        }
    }

    /// Creates or upgrades the schema to [`schema::CURRENT`]; refuses a
    /// database at a newer version.
    pub fn migrate(&self) -> Result<i32, StoreError> {
        let mut conn = self.get()?;
        let c = conn.client();
        // Instances starting together take turns: the lock first, then even
        // the version table is made inside the one transaction.
        let mut tx = c.transaction().map_err(pg_err)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&schema::MIGRATION_LOCK],
        )
        .map_err(pg_err)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS ims_schema (version int NOT NULL)")
            .map_err(pg_err)?;
        let row = tx
            .query_opt("SELECT version FROM ims_schema", &[])
            .map_err(pg_err)?;
        let mut version: i32 = match row {
            Some(r) => r.get(0),
            None => {
                tx.execute("INSERT INTO ims_schema (version) VALUES (0)", &[])
                    .map_err(pg_err)?;
                0
            }
        };
        if version > schema::CURRENT {
            return Err(StoreError::Backend(format!(
                "the database schema is version {version}, newer than this ims-crs knows \
                 ({}); upgrade ims-crs",
                schema::CURRENT
            )));
        }
        while version < schema::CURRENT {
            let step = schema::MIGRATIONS
                .get(version as usize)
                .ok_or_else(|| StoreError::Backend("no such migration".into()))?;
            tx.batch_execute(step).map_err(pg_err)?;
            version += 1;
            tx.execute("UPDATE ims_schema SET version = $1", &[&version])
                .map_err(pg_err)?;
            info!("database schema migrated to version {version}");
        }
        tx.commit().map_err(pg_err)?;
        Ok(version)
    }
}

/// An error inside [`PgPool::tx`].
pub enum TxError {
    /// A store-level answer (no such user, ...): returned, not retried.
    Store(StoreError),
    /// The database failed; retried if it was a serialization failure.
    Db(postgres::Error),
}

impl From<postgres::Error> for TxError {
    fn from(e: postgres::Error) -> TxError {
        TxError::Db(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> TxError {
        TxError::Store(e)
    }
}

/// Durable store on PostgreSQL; see the module documentation.
#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
}

/// The columns of a user record, in the order `user_from_row` reads them.
macro_rules! user_columns {
    () => {
        "name, salt, iterations, stored_key, server_key, profile, public_key, wrapped_key, \
         created_unix, status, status_message"
    };
}

/// Decodes a `users` row (without contacts and requests).
fn user_from_row(row: &postgres::Row) -> Result<User, StoreError> {
    let name: String = row.get(0);
    let profile: String = row.get(5);
    let profile: BTreeMap<String, String> = serde_json::from_str(&profile)
        .map_err(|e| StoreError::Corrupt(format!("user {name:?}: profile: {e}")))?;
    let iterations: i64 = row.get(2);
    let created: i64 = row.get(8);
    let status: String = row.get(9);
    let status = crate::proto::status::Status::parse(&status)
        .ok_or_else(|| StoreError::Corrupt(format!("user {name:?}: status")))?;
    Ok(User {
        verifier: Verifier {
            salt: row.get(1),
            iterations: u32::try_from(iterations)
                .map_err(|_| StoreError::Corrupt(format!("user {name:?}: iterations")))?,
            stored_key: row.get(3),
            server_key: row.get(4),
        },
        profile,
        public_key: row.get(6),
        wrapped_private_key: row.get(7),
        created_unix: u64::try_from(created)
            .map_err(|_| StoreError::Corrupt(format!("user {name:?}: created")))?,
        contacts: BTreeSet::new(),
        requests: Vec::new(),
        blocked: BTreeSet::new(),
        status,
        status_message: row.get(10),
        name,
    })
}

fn encode_profile(p: &BTreeMap<String, String>) -> Result<String, StoreError> {
    serde_json::to_string(p).map_err(|e| StoreError::Backend(format!("encode: {e}")))
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Backend(format!("{what} out of range")))
}

/// Locks the named users' rows in name order; `NoSuchUser` if one is missing.
fn lock_users(tx: &mut PgConn<'_>, names: &[&str]) -> Result<(), TxError> {
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    for n in &sorted {
        if tx
            .query_opt("SELECT 1 FROM users WHERE name = $1 FOR UPDATE", &[n])?
            .is_none()
        {
            return Err(TxError::Store(StoreError::NoSuchUser));
        }
    }
    Ok(())
}

/// Reads one whole user record (contacts and requests included) in one
/// statement, so one snapshot.
fn read_user(c: &mut PgConn<'_>, name: &str) -> Result<Option<User>, TxError> {
    let Some(row) = c.query_opt(
        concat!(
            "SELECT ",
            user_columns!(),
            ", ARRAY(SELECT buddy FROM contacts WHERE owner = $1 ORDER BY buddy), \
             ARRAY(SELECT sender FROM requests WHERE recipient = $1 ORDER BY seq), \
             ARRAY(SELECT signature FROM requests WHERE recipient = $1 ORDER BY seq), \
             ARRAY(SELECT nonce FROM requests WHERE recipient = $1 ORDER BY seq), \
             ARRAY(SELECT created_unix FROM requests WHERE recipient = $1 ORDER BY seq), \
             ARRAY(SELECT blocked FROM blocks WHERE owner = $1 ORDER BY blocked) \
             FROM users WHERE name = $1"
        ),
        &[&name],
    )?
    else {
        return Ok(None);
    };
    let mut user = user_from_row(&row)?;
    let contacts: Vec<String> = row.get(11);
    user.contacts = contacts.into_iter().collect();
    let senders: Vec<String> = row.get(12);
    let signatures: Vec<Vec<u8>> = row.get(13);
    let nonces: Vec<Vec<u8>> = row.get(14);
    let created: Vec<i64> = row.get(15);
    let blocked: Vec<String> = row.get(16);
    user.blocked = blocked.into_iter().collect();
    if signatures.len() != senders.len()
        || nonces.len() != senders.len()
        || created.len() != senders.len()
    {
        // Only a concurrent change between the sub-selects could do this,
        // and one statement sees one snapshot.
        return Err(StoreError::Corrupt(format!("requests to {name:?}")).into());
    }
    for (((from, signature), nonce), created) in
        senders.into_iter().zip(signatures).zip(nonces).zip(created)
    {
        user.requests.push(BuddyRequest {
            from,
            signature,
            nonce,
            created_unix: u64::try_from(created)
                .map_err(|_| StoreError::Corrupt(format!("request to {name:?}: created")))?,
        });
    }
    Ok(Some(user))
}

fn read_requests(c: &mut PgConn<'_>, name: &str) -> Result<Vec<BuddyRequest>, TxError> {
    let mut out = Vec::new();
    for r in c.query(
        "SELECT sender, signature, nonce, created_unix FROM requests \
         WHERE recipient = $1 ORDER BY seq",
        &[&name],
    )? {
        let created: i64 = r.get(3);
        out.push(BuddyRequest {
            from: r.get(0),
            signature: r.get(1),
            nonce: r.get(2),
            created_unix: u64::try_from(created)
                .map_err(|_| StoreError::Corrupt(format!("request to {name:?}: created")))?,
        });
    }
    Ok(out)
}

fn insert_user(tx: &mut PgConn<'_>, u: &User) -> Result<u64, TxError> {
    Ok(tx.execute(
        concat!(
            "INSERT INTO users (",
            user_columns!(),
            ") VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) ON CONFLICT (name) DO NOTHING"
        ),
        &[
            &u.name,
            &u.verifier.salt,
            &i64::from(u.verifier.iterations),
            &u.verifier.stored_key,
            &u.verifier.server_key,
            &encode_profile(&u.profile)?,
            &u.public_key,
            &u.wrapped_private_key,
            &to_i64(u.created_unix, "created_unix")?,
            &u.status.as_str(),
            &u.status_message,
        ],
    )?)
}

impl PgStore {
    /// Connects to `url` and creates or upgrades the schema.
    pub fn open(url: &str) -> Result<PgStore, StoreError> {
        let pool = PgPool::new(url)?;
        pool.migrate()?;
        Ok(PgStore { pool })
    }

    /// The connection pool (shared with the live state).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Full consistency check, as [`super::SledStore::check_integrity`]:
    /// contacts are mutual, requests come from non-buddies, every record
    /// decodes. Reads the whole store.
    pub fn check_integrity(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.get()?;
        let c = conn.client();
        if let Some(r) = c
            .query_opt(
                "SELECT a.owner, a.buddy FROM contacts a LEFT JOIN contacts b \
                 ON b.owner = a.buddy AND b.buddy = a.owner WHERE b.owner IS NULL LIMIT 1",
                &[],
            )
            .map_err(pg_err)?
        {
            let (a, b): (String, String) = (r.get(0), r.get(1));
            return Err(StoreError::Corrupt(format!(
                "contact {a:?} -> {b:?} is not mutual"
            )));
        }
        if let Some(r) = c
            .query_opt(
                "SELECT r.sender, r.recipient FROM requests r JOIN contacts c \
                 ON c.owner = r.recipient AND c.buddy = r.sender LIMIT 1",
                &[],
            )
            .map_err(pg_err)?
        {
            let (a, b): (String, String) = (r.get(0), r.get(1));
            return Err(StoreError::Corrupt(format!(
                "request {a:?} -> {b:?} is stale"
            )));
        }
        for row in c
            .query(concat!("SELECT ", user_columns!(), " FROM users"), &[])
            .map_err(pg_err)?
        {
            user_from_row(&row)?;
        }
        Ok(())
    }

    /// Loads many users at once, contacts and requests as given, in one
    /// transaction (an import: see [`super::SledStore::bulk_load`] for what
    /// the caller guarantees). Replaces users of the same name.
    pub fn bulk_load(&self, users: impl IntoIterator<Item = User>) -> Result<u64, StoreError> {
        let all = checked_all(users)?;
        self.pool.tx(|tx| {
            insert_records(tx, &all)?;
            insert_relations(tx, &all)?;
            Ok(all.len() as u64)
        })
    }

    /// The first half of a load in several batches: the user records alone
    /// (contacts and requests ignored), in one transaction.
    pub fn bulk_records(&self, users: &[User]) -> Result<u64, StoreError> {
        let all = checked_all(users.iter().cloned())?;
        self.pool.tx(|tx| {
            insert_records(tx, &all)?;
            Ok(all.len() as u64)
        })
    }

    /// The second half: the contacts and requests of users already loaded
    /// (every user they name must be loaded by now), in one transaction.
    pub fn bulk_relations(&self, users: &[User]) -> Result<(), StoreError> {
        let all = checked_all(users.iter().cloned())?;
        self.pool.tx(|tx| insert_relations(tx, &all))
    }
}

fn checked_all(users: impl IntoIterator<Item = User>) -> Result<Vec<User>, StoreError> {
    let mut all = Vec::new();
    for mut u in users {
        u.name = checked(&u.name)?;
        for r in &mut u.requests {
            r.from = checked(&r.from)?;
        }
        all.push(u);
    }
    Ok(all)
}

fn insert_records(tx: &mut PgConn<'_>, all: &[User]) -> Result<(), TxError> {
    for u in all {
        tx.execute("DELETE FROM users WHERE name = $1", &[&u.name])?;
        insert_user(tx, u)?;
    }
    Ok(())
}

fn insert_relations(tx: &mut PgConn<'_>, all: &[User]) -> Result<(), TxError> {
    for u in all {
        for c in &u.contacts {
            tx.execute(
                "INSERT INTO contacts (owner, buddy) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&u.name, c],
            )?;
        }
        for r in &u.requests {
            tx.execute(
                "INSERT INTO requests (recipient, sender, signature, nonce, created_unix) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &u.name,
                    &r.from,
                    &r.signature,
                    &r.nonce,
                    &to_i64(r.created_unix, "created_unix")?,
                ],
            )?;
        }
    }
    Ok(())
}

impl Store for PgStore {
    fn create_user(&self, mut user: User) -> Result<(), StoreError> {
        user.name = checked(&user.name)?;
        self.pool.tx(|tx| {
            if insert_user(tx, &user)? == 0 {
                return Err(StoreError::NameTaken.into());
            }
            for who in &user.blocked {
                tx.execute(
                    "INSERT INTO blocks (owner, blocked) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&user.name, who],
                )?;
            }
            Ok(())
        })
    }

    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        let name = checked(name)?;
        let mut conn = self.pool.get()?;
        match read_user(&mut conn, &name) {
            Ok(u) => Ok(u),
            Err(TxError::Store(e)) => Err(e),
            Err(TxError::Db(e)) => Err(pg_err(e)),
        }
    }

    fn get_verifier(&self, name: &str) -> Result<Option<Verifier>, StoreError> {
        let name = checked(name)?;
        let mut conn = self.pool.get()?;
        let Some(row) = conn
            .query_opt(
                "SELECT salt, iterations, stored_key, server_key FROM users WHERE name = $1",
                &[&name],
            )
            .map_err(pg_err)?
        else {
            return Ok(None);
        };
        let iterations: i64 = row.get(1);
        Ok(Some(Verifier {
            salt: row.get(0),
            iterations: u32::try_from(iterations)
                .map_err(|_| StoreError::Corrupt(format!("user {name:?}: iterations")))?,
            stored_key: row.get(2),
            server_key: row.get(3),
        }))
    }

    fn contact_views(
        &self,
        viewer: &str,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, ContactView>, StoreError> {
        let viewer = checked(viewer)?;
        let names = names
            .iter()
            .map(|n| checked(n))
            .collect::<Result<Vec<String>, StoreError>>()?;
        let mut conn = self.pool.get()?;
        // One statement for every buddy, not a whole record each.
        let rows = conn
            .query(
                "SELECT u.name, u.status, u.status_message, \
                 EXISTS(SELECT 1 FROM blocks b WHERE b.owner = u.name AND b.blocked = $2) \
                 FROM users u WHERE u.name = ANY($1)",
                &[&names, &viewer],
            )
            .map_err(pg_err)?;
        let mut views = BTreeMap::new();
        for row in rows {
            let name: String = row.get(0);
            let status: String = row.get(1);
            let status = crate::proto::status::Status::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("user {name:?}: status")))?;
            views.insert(
                name,
                ContactView {
                    status,
                    status_message: row.get(2),
                    blocks_viewer: row.get(3),
                },
            );
        }
        Ok(views)
    }

    fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        let name = checked(name)?;
        // Contacts and requests in both directions go with the row (cascade).
        self.pool
            .tx(|tx| Ok(tx.execute("DELETE FROM users WHERE name = $1", &[&name])? == 1))
    }

    fn list_users(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let after = after.map(super::canonical);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut conn = self.pool.get()?;
        let rows = conn
            .query(
                "SELECT name FROM users WHERE $1::text IS NULL OR name > $1 \
                 ORDER BY name LIMIT $2",
                &[&after, &limit],
            )
            .map_err(pg_err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn user_count(&self) -> Result<u64, StoreError> {
        let mut conn = self.pool.get()?;
        let n: i64 = conn
            .query_one("SELECT count(*) FROM users", &[])
            .map_err(pg_err)?
            .get(0);
        Ok(n.max(0) as u64)
    }

    fn set_credentials(
        &self,
        name: &str,
        verifier: Verifier,
        wrapped_private_key: Vec<u8>,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        self.pool.tx(|tx| {
            let n = tx.execute(
                "UPDATE users SET salt = $2, iterations = $3, stored_key = $4, \
                 server_key = $5, wrapped_key = $6 WHERE name = $1",
                &[
                    &name,
                    &verifier.salt,
                    &i64::from(verifier.iterations),
                    &verifier.stored_key,
                    &verifier.server_key,
                    &wrapped_private_key,
                ],
            )?;
            if n == 0 {
                return Err(StoreError::NoSuchUser.into());
            }
            Ok(())
        })
    }

    fn set_blocked(&self, name: &str, who: &str, on: bool) -> Result<bool, StoreError> {
        let name = checked(name)?;
        let who = checked(who)?;
        if name == who {
            return Err(StoreError::SameUser);
        }
        self.pool.tx(|tx| {
            if tx
                .query_opt("SELECT 1 FROM users WHERE name = $1 FOR UPDATE", &[&name])?
                .is_none()
            {
                return Err(StoreError::NoSuchUser.into());
            }
            let n = if on {
                tx.execute(
                    "INSERT INTO blocks (owner, blocked) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&name, &who],
                )?
            } else {
                tx.execute(
                    "DELETE FROM blocks WHERE owner = $1 AND blocked = $2",
                    &[&name, &who],
                )?
            };
            Ok(n == 1)
        })
    }

    fn set_status(
        &self,
        name: &str,
        status: crate::proto::status::Status,
        message: &str,
    ) -> Result<(), StoreError> {
        let name = checked(name)?;
        self.pool.tx(|tx| {
            let n = tx.execute(
                "UPDATE users SET status = $2, status_message = $3 WHERE name = $1",
                &[&name, &status.as_str(), &message],
            )?;
            if n == 0 {
                return Err(StoreError::NoSuchUser.into());
            }
            Ok(())
        })
    }

    fn set_profile(&self, name: &str, profile: BTreeMap<String, String>) -> Result<(), StoreError> {
        let name = checked(name)?;
        let text = encode_profile(&profile)?;
        self.pool.tx(|tx| {
            let n = tx.execute(
                "UPDATE users SET profile = $2 WHERE name = $1",
                &[&name, &text],
            )?;
            if n == 0 {
                return Err(StoreError::NoSuchUser.into());
            }
            Ok(())
        })
    }

    fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, StoreError> {
        // Filtered here rather than with SQL's lower()/ILIKE, whose case
        // folding depends on the database's locale: the match must be the
        // same as sled's. A scan in name order, in batches.
        let needle = text.to_lowercase();
        let mut hits = Vec::new();
        let mut after: Option<String> = None;
        let mut conn = self.pool.get()?;
        while hits.len() < limit {
            let rows = conn
                .query(
                    concat!(
                        "SELECT ",
                        user_columns!(),
                        " FROM users WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2"
                    ),
                    &[&after, &SCAN_BATCH],
                )
                .map_err(pg_err)?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                let user = user_from_row(row)?;
                after = Some(user.name.clone());
                if hits.len() < limit && search_matches(&needle, &user) {
                    hits.push(SearchHit {
                        name: user.name,
                        profile: user.profile,
                    });
                }
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
        let created = to_i64(req.created_unix, "created_unix")?;
        self.pool.tx(|tx| {
            lock_users(tx, &[&to, &from])?;
            if tx
                .query_opt(
                    "SELECT 1 FROM contacts WHERE owner = $1 AND buddy = $2",
                    &[&to, &from],
                )?
                .is_some()
            {
                return Err(StoreError::AlreadyBuddies.into());
            }
            // A new request from the same sender replaces the old one and
            // moves to the end: a fresh `seq`.
            tx.execute(
                "INSERT INTO requests (recipient, sender, signature, nonce, created_unix) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (recipient, sender) DO UPDATE SET \
                 seq = nextval(pg_get_serial_sequence('requests', 'seq')), \
                 signature = EXCLUDED.signature, nonce = EXCLUDED.nonce, \
                 created_unix = EXCLUDED.created_unix",
                &[&to, &from, &req.signature, &req.nonce, &created],
            )?;
            Ok(())
        })
    }

    fn take_requests(&self, name: &str) -> Result<Vec<BuddyRequest>, StoreError> {
        let name = checked(name)?;
        self.pool.tx(|tx| {
            lock_users(tx, &[&name])?;
            let taken = read_requests(tx, &name)?;
            tx.execute("DELETE FROM requests WHERE recipient = $1", &[&name])?;
            Ok(taken)
        })
    }

    fn remove_request(&self, to: &str, from: &str) -> Result<bool, StoreError> {
        let to = checked(to)?;
        let from = checked(from)?;
        self.pool.tx(|tx| {
            lock_users(tx, &[&to])?;
            Ok(tx.execute(
                "DELETE FROM requests WHERE recipient = $1 AND sender = $2",
                &[&to, &from],
            )? == 1)
        })
    }

    fn make_buddies(&self, a: &str, b: &str) -> Result<(), StoreError> {
        let a = checked(a)?;
        let b = checked(b)?;
        if a == b {
            return Err(StoreError::SameUser);
        }
        self.pool.tx(|tx| {
            lock_users(tx, &[&a, &b])?;
            tx.execute(
                "INSERT INTO contacts (owner, buddy) VALUES ($1, $2), ($2, $1) \
                 ON CONFLICT DO NOTHING",
                &[&a, &b],
            )?;
            tx.execute(
                "DELETE FROM requests WHERE (recipient = $1 AND sender = $2) \
                 OR (recipient = $2 AND sender = $1)",
                &[&a, &b],
            )?;
            Ok(())
        })
    }

    fn remove_buddies(&self, a: &str, b: &str) -> Result<bool, StoreError> {
        let a = checked(a)?;
        let b = checked(b)?;
        if a == b {
            return Err(StoreError::SameUser);
        }
        self.pool.tx(|tx| {
            lock_users(tx, &[&a, &b])?;
            Ok(tx.execute(
                "DELETE FROM contacts WHERE (owner = $1 AND buddy = $2) \
                 OR (owner = $2 AND buddy = $1)",
                &[&a, &b],
            )? > 0)
        })
    }

    fn contacts(&self, name: &str) -> Result<BTreeSet<String>, StoreError> {
        let name = checked(name)?;
        // One statement: one snapshot.
        let mut conn = self.pool.get()?;
        let row = conn
            .query_opt(
                "SELECT ARRAY(SELECT buddy FROM contacts WHERE owner = $1 ORDER BY buddy) \
                 FROM users WHERE name = $1",
                &[&name],
            )
            .map_err(pg_err)?
            .ok_or(StoreError::NoSuchUser)?;
        let buddies: Vec<String> = row.get(0);
        Ok(buddies.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_logged_without_their_password() {
        assert_eq!(
            shown("postgres://ims:secret@db:5432/ims"),
            "postgres://ims:***@db:5432/ims"
        );
        assert_eq!(shown("postgres://ims@db/ims"), "postgres://ims@db/ims");
        assert!(PgPool::new("postgres://ims@db:notaport/ims").is_err());
    }
}
