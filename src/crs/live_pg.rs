//! The live state in PostgreSQL ([`PgLive`]), shared by every CRS instance
//! on one database: enrolled MSs with their heartbeats, online sessions,
//! login leases and the numbered events waiting for each MS (tables
//! `live_*`, see `store::schema`).
//!
//! Atomicity: each [`LiveState::lock`] is one transaction that takes a
//! transaction-scoped advisory lock ([`LIVE_LOCK`]), the same for every
//! instance, before its first step that needs it, so live-state changes are
//! serialized across the whole directory exactly as the in-memory state is
//! under its mutex. Steps that touch one row on their own (a heartbeat's
//! `touch`, looking up where a user is, `LOCATE`'s counts) and an MS's
//! event poll do not wait for it: a view made only of those never
//! serializes. That is
//! what keeps the login lease's guarantee across instances: of many logins
//! of one user racing through several instances, one takes the lease.
//! Each view is a few short statements, so the lock is held briefly; it is
//! also the limit on how many live-state changes a second one database can
//! take, whatever the number of instances.
//!
//! Times (heartbeats, lease expiry) are the database server's clock, one
//! clock for all instances.
//!
//! Wake-ups: queuing an event sends `NOTIFY ims_events` with the MS's id
//! (delivered at commit); each instance `LISTEN`s on a connection of its
//! own and wakes the long polls of that MS, if it serves them. The events table is the truth: a poll also looks every
//! [`RECHECK`] without a wake, so a lost notification makes an event late,
//! never lost.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use super::guesses::{earned, GuessCounter};
use super::live::{LiveState, LiveTx, LockError, Online, Wakeup, MAX_BATCH, MAX_QUEUED_EVENTS};
use super::store::{PgConn, PgPool};
use crate::proto::crs::{Event, EventBatch, EventKind, MsInfo, Presence};

/// The advisory lock every live-state transaction takes ("ims-live").
pub const LIVE_LOCK: i64 = 0x696d_735f_6c69_7665;

/// The notification channel.
pub const CHANNEL: &str = "ims_events";

/// How often an idle poll looks at its queue without a wake.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The live state in PostgreSQL; see the module documentation.
pub struct PgLive {
    pool: Arc<PgPool>,
    instance: String,
    stopping: Arc<AtomicBool>,
    listener: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl PgLive {
    /// Live state on the database at `url`, which must already have the
    /// schema; `instance` is the directory's shared instance. Starts the
    /// `LISTEN` thread, which wakes `wakeup`.
    pub fn start(url: &str, instance: String, wakeup: Arc<Wakeup>) -> Result<PgLive, String> {
        let pool = PgPool::new(url).map_err(|e| e.to_string())?;
        let stopping = Arc::new(AtomicBool::new(false));
        let listen_pool = PgPool::new(url).map_err(|e| e.to_string())?;
        let stop = stopping.clone();
        let listener = std::thread::Builder::new()
            .name("crs-listen".into())
            .spawn(move || listen_loop(&listen_pool, &wakeup, &stop))
            .map_err(|e| e.to_string())?;
        Ok(PgLive {
            pool: Arc::new(pool),
            instance,
            stopping,
            listener: parking_lot::Mutex::new(Some(listener)),
        })
    }
}

impl Drop for PgLive {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(t) = self.listener.lock().take() {
            let _ = t.join();
        }
    }
}

/// Listens for event notifications for ever (until stopping), reconnecting
/// after a failure; every (re)connection also wakes the polls, in case a
/// notification was missed while away.
fn listen_loop(pool: &PgPool, wakeup: &Wakeup, stopping: &AtomicBool) {
    let mut backoff = Duration::from_millis(100);
    while !stopping.load(Ordering::Relaxed) {
        let mut client = match pool.connect() {
            Ok(c) => c,
            Err(e) => {
                warn!("event listener: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")) {
            warn!("event listener: LISTEN: {e}");
            continue;
        }
        backoff = Duration::from_millis(100);
        wakeup.notify_everyone();
        'conn: while !stopping.load(Ordering::Relaxed) {
            {
                let mut notes = client.notifications();
                let mut it = notes.timeout_iter(Duration::from_millis(250));
                loop {
                    match postgres::fallible_iterator::FallibleIterator::next(&mut it) {
                        Ok(Some(n)) => match n.payload().parse::<u64>() {
                            Ok(ms) => wakeup.notify_ms(ms),
                            Err(_) => wakeup.notify_everyone(),
                        },
                        Ok(None) => break,
                        Err(e) => {
                            warn!("event listener lost its connection: {e}");
                            break 'conn;
                        }
                    }
                }
            }
            if client.is_closed() {
                warn!("event listener lost its connection");
                break;
            }
        }
    }
}

impl LiveState for PgLive {
    fn lock(&self) -> Box<dyn LiveTx + '_> {
        let mut tx = PgLiveTx {
            conn: None,
            failed: None,
            locked: false,
        };
        match self.pool.get() {
            Ok(mut conn) => {
                // The advisory lock is taken by the first step that needs it.
                let begun = conn.client().batch_execute("BEGIN");
                match begun {
                    Ok(()) => tx.conn = Some(conn),
                    Err(e) => {
                        tx.failed = Some(format!("live state: {}", super::store::describe(&e)))
                    }
                }
            }
            Err(e) => tx.failed = Some(format!("live state: {e}")),
        }
        Box::new(tx)
    }

    fn recheck(&self) -> Duration {
        RECHECK
    }

    fn shared_instance(&self) -> Option<String> {
        Some(self.instance.clone())
    }

    fn shared_guesses(&self, free: u32) -> Option<Box<dyn GuessCounter>> {
        Some(Box::new(PgGuesses {
            pool: self.pool.clone(),
            free,
            calls: AtomicU64::new(0),
        }))
    }
}

/// Password attempts counted in PostgreSQL (table `live_guesses`), so a
/// guesser gains nothing by spreading attempts over CRS instances. Each
/// attempt is one short transaction on its (name, source) row.
pub struct PgGuesses {
    pool: Arc<PgPool>,
    free: u32,
    /// Attempts so far; every [`SWEEP_EVERY`] one sweeps out old rows.
    calls: AtomicU64,
}

/// How often (in attempts) rows idle longer than [`SWEEP_AFTER`] go.
const SWEEP_EVERY: u64 = 1000;
/// Rows idle this long are forgotten (well past the longest delay).
const SWEEP_AFTER: f64 = 3600.0;

impl GuessCounter for PgGuesses {
    fn attempt(&self, name: &str, ip: std::net::IpAddr) -> Result<(), Duration> {
        let source = ip.to_string();
        let free = self.free;
        let sweep = self.calls.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == 0;
        let result = self.pool.tx(|c| {
            if sweep {
                c.execute(
                    "DELETE FROM live_guesses \
                     WHERE last < clock_timestamp() - make_interval(secs => $1)",
                    &[&SWEEP_AFTER],
                )?;
            }
            c.execute(
                "INSERT INTO live_guesses (name, source) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&name, &source],
            )?;
            let row = c.query_one(
                "SELECT count, extract(epoch FROM clock_timestamp() - last)::float8 \
                 FROM live_guesses WHERE name = $1 AND source = $2 FOR UPDATE",
                &[&name, &source],
            )?;
            let count = u32::try_from(row.get::<_, i64>(0)).unwrap_or(u32::MAX);
            let since = Duration::from_secs_f64(row.get::<_, f64>(1).max(0.0));
            if let Some(left) = earned(count, free).checked_sub(since) {
                if !left.is_zero() {
                    return Ok(Err(left));
                }
            }
            c.execute(
                "UPDATE live_guesses SET count = count + 1, last = clock_timestamp() \
                 WHERE name = $1 AND source = $2",
                &[&name, &source],
            )?;
            Ok(Ok(()))
        });
        result.unwrap_or_else(|e| {
            // The login needs the database further on anyway.
            warn!("counting a login attempt: {e}");
            Ok(())
        })
    }

    fn succeeded(&self, name: &str, ip: std::net::IpAddr) {
        let source = ip.to_string();
        let done = self.pool.tx(|c| {
            c.execute(
                "DELETE FROM live_guesses WHERE name = $1 AND source = $2",
                &[&name, &source],
            )?;
            Ok(())
        });
        if let Err(e) = done {
            warn!("clearing login attempts: {e}");
        }
    }
}

/// One live-state transaction.
struct PgLiveTx<'a> {
    conn: Option<PgConn<'a>>,
    failed: Option<String>,
    /// Whether this transaction holds the advisory lock yet.
    locked: bool,
}

/// The secs argument of `make_interval`.
fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PgLiveTx<'_> {
    /// Runs `f` unless an earlier step failed; a failure is remembered
    /// (everything is rolled back at the end) and `fallback` returned.
    fn run<T>(&mut self, fallback: T, f: impl FnOnce(&mut PgConn<'_>) -> Result<T, Fail>) -> T {
        self.step(true, fallback, f)
    }

    /// As [`Self::run`], for a step that reads or writes one row on its
    /// own and so needs no serialization with other instances: it does not
    /// take the advisory lock (a later step that needs it takes it).
    fn run_free<T>(
        &mut self,
        fallback: T,
        f: impl FnOnce(&mut PgConn<'_>) -> Result<T, Fail>,
    ) -> T {
        self.step(false, fallback, f)
    }

    fn step<T>(
        &mut self,
        serialized: bool,
        fallback: T,
        f: impl FnOnce(&mut PgConn<'_>) -> Result<T, Fail>,
    ) -> T {
        if self.failed.is_some() {
            return fallback;
        }
        let Some(conn) = self.conn.as_mut() else {
            return fallback;
        };
        let c = conn;
        let result = (|| {
            if serialized && !self.locked {
                c.execute("SELECT pg_advisory_xact_lock($1)", &[&LIVE_LOCK])?;
                self.locked = true;
            }
            f(c)
        })();
        match result {
            Ok(v) => v,
            Err(e) => {
                warn!("live state: {e}");
                self.failed = Some(e.to_string());
                fallback
            }
        }
    }

    fn finish(&mut self) -> Result<(), String> {
        let Some(mut conn) = self.conn.take() else {
            return match self.failed.take() {
                Some(e) => Err(e),
                None => Ok(()),
            };
        };
        if let Some(e) = self.failed.take() {
            let _ = conn.client().batch_execute("ROLLBACK");
            return Err(e);
        }
        conn.client()
            .batch_execute("COMMIT")
            .map_err(|e| format!("live state: commit: {e}"))
    }
}

impl Drop for PgLiveTx<'_> {
    fn drop(&mut self) {
        if self.conn.is_some() {
            if let Err(e) = self.finish() {
                warn!("{e}");
            }
        }
    }
}

/// Queues one event for MS `ms` (if enrolled) and wakes whoever polls it.
fn push_event(
    c: &mut PgConn<'_>,
    ms: i64,
    recipients: &[String],
    kind: &EventKind,
) -> Result<(), Fail> {
    let Some(row) = c.query_opt(
        "UPDATE live_ms SET next_seq = next_seq + 1 WHERE id = $1 RETURNING next_seq - 1",
        &[&ms],
    )?
    else {
        return Ok(());
    };
    let seq: i64 = row.get(0);
    // Encoding these plain types cannot fail.
    let r = serde_json::to_string(recipients).unwrap_or_default();
    let k = serde_json::to_string(kind).unwrap_or_default();
    c.execute(
        "INSERT INTO live_events (ms, seq, recipients, kind) VALUES ($1, $2, $3, $4)",
        &[&ms, &seq, &r, &k],
    )?;
    let max = MAX_QUEUED_EVENTS as i64;
    if seq > max {
        c.execute(
            "DELETE FROM live_events WHERE ms = $1 AND seq <= $2",
            &[&ms, &(seq - max)],
        )?;
    }
    c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &ms.to_string()])?;
    Ok(())
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn online_row(row: &postgres::Row) -> Option<Online> {
    let address: String = row.get(1);
    Some(Online {
        ms: to_u64(row.get(0)),
        presence: Presence {
            address: address.parse::<SocketAddr>().ok()?,
            public_key: row.get(2),
        },
        login: to_u64(row.get(3)),
    })
}

/// Why a step failed.
enum Fail {
    /// The database failed (connection lost, ...).
    Db(postgres::Error),
    /// A stored event did not decode.
    Corrupt(String),
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Fail {
        Fail::Db(e)
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fail::Db(e) => f.write_str(&super::store::describe(e)),
            Fail::Corrupt(what) => write!(f, "corrupt record: {what}"),
        }
    }
}

impl LiveTx for PgLiveTx<'_> {
    fn enroll(&mut self, address: &str, capacity: u32, instance: &str) -> (u64, Vec<String>) {
        self.run((0, Vec::new()), |c| {
            let cap = i64::from(capacity);
            let mut lost = Vec::new();
            if let Some(row) = c.query_opt(
                "SELECT id, instance FROM live_ms WHERE address = $1",
                &[&address],
            )? {
                let id: i64 = row.get(0);
                let was: String = row.get(1);
                if was == instance {
                    c.execute(
                        "UPDATE live_ms SET capacity = $2, last_seen = clock_timestamp() \
                         WHERE id = $1",
                        &[&id, &cap],
                    )?;
                    return Ok((to_u64(id), lost));
                }
                // A restarted MS is a new MS (see `Live::enroll`).
                for r in c.query(
                    "SELECT name FROM live_online WHERE ms = $1 ORDER BY name",
                    &[&id],
                )? {
                    lost.push(r.get(0));
                }
                c.execute("DELETE FROM live_ms WHERE id = $1", &[&id])?;
            }
            let id: i64 = c
                .query_one(
                    "INSERT INTO live_ms (address, capacity, instance) VALUES ($1, $2, $3) \
                     RETURNING id",
                    &[&address, &cap, &instance],
                )?
                .get(0);
            Ok((to_u64(id), lost))
        })
    }

    fn notify_ms(&mut self, ms: u64, recipients: Vec<String>, kind: EventKind) {
        self.run((), |c| push_event(c, to_i64(ms), &recipients, &kind))
    }

    fn touch(&mut self, id: u64) -> bool {
        self.run_free(false, |c| {
            Ok(c.execute(
                "UPDATE live_ms SET last_seen = clock_timestamp() WHERE id = $1",
                &[&to_i64(id)],
            )? == 1)
        })
    }

    fn locate(&mut self, heartbeat_timeout: Duration) -> Option<String> {
        self.run_free(None, |c| {
            let rows = c.query(
                "SELECT m.id, m.address, m.capacity, \
                   (SELECT count(*) FROM live_online o WHERE o.ms = m.id) \
                 + (SELECT count(*) FROM live_locks l WHERE l.ms = m.id) \
                 FROM live_ms m \
                 WHERE m.last_seen > clock_timestamp() - make_interval(secs => $1)",
                &[&secs(heartbeat_timeout)],
            )?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let (id, cap, load): (i64, i64, i64) = (r.get(0), r.get(2), r.get(3));
                    (load < cap).then(|| (load as f64 / cap.max(1) as f64, id, r.get(1)))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                .map(|(_, _, addr): (f64, i64, String)| addr))
        })
    }

    fn lock(&mut self, user: &str, ms: u64, lease: Duration) -> Result<(), LockError> {
        self.run(Err(LockError::LoggingIn), |c| {
            if c.query_opt("SELECT 1 FROM live_online WHERE name = $1", &[&user])?
                .is_some()
            {
                return Ok(Err(LockError::LoggedIn));
            }
            if c.query_opt(
                "SELECT 1 FROM live_locks WHERE name = $1 AND expires > clock_timestamp()",
                &[&user],
            )?
            .is_some()
            {
                return Ok(Err(LockError::LoggingIn));
            }
            c.execute(
                "INSERT INTO live_locks (name, ms, expires) \
                 VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE SET ms = EXCLUDED.ms, expires = EXCLUDED.expires",
                &[&user, &to_i64(ms), &secs(lease)],
            )?;
            Ok(Ok(()))
        })
    }

    fn unlock(&mut self, user: &str, ms: u64) {
        self.run((), |c| {
            c.execute(
                "DELETE FROM live_locks WHERE name = $1 AND ms = $2",
                &[&user, &to_i64(ms)],
            )?;
            Ok(())
        })
    }

    fn holds_lock(&mut self, user: &str, ms: u64) -> bool {
        self.run(false, |c| {
            Ok(c.query_opt(
                "SELECT 1 FROM live_locks WHERE name = $1 AND ms = $2 \
                 AND expires > clock_timestamp()",
                &[&user, &to_i64(ms)],
            )?
            .is_some())
        })
    }

    fn set_online(&mut self, user: &str, ms: u64, presence: Presence) -> u64 {
        self.run(0, |c| {
            c.execute("DELETE FROM live_locks WHERE name = $1", &[&user])?;
            let login: i64 = c
                .query_one(
                    "INSERT INTO live_online (name, ms, address, public_key, login) \
                     VALUES ($1, $2, $3, $4, nextval('live_login_seq')) \
                     ON CONFLICT (name) DO UPDATE SET ms = EXCLUDED.ms, \
                     address = EXCLUDED.address, public_key = EXCLUDED.public_key, \
                     login = EXCLUDED.login RETURNING login",
                    &[
                        &user,
                        &to_i64(ms),
                        &presence.address.to_string(),
                        &presence.public_key,
                    ],
                )?
                .get(0);
            Ok(to_u64(login))
        })
    }

    fn set_offline(&mut self, user: &str, ms: Option<u64>) -> bool {
        self.run(false, |c| {
            let ms = ms.map(to_i64);
            Ok(c.execute(
                "DELETE FROM live_online WHERE name = $1 AND ($2::bigint IS NULL OR ms = $2)",
                &[&user, &ms],
            )? > 0)
        })
    }

    fn online(&mut self, user: &str) -> Option<Online> {
        self.run_free(None, |c| {
            Ok(c.query_opt(
                "SELECT ms, address, public_key, login FROM live_online WHERE name = $1",
                &[&user],
            )?
            .as_ref()
            .and_then(online_row))
        })
    }

    fn online_many(
        &mut self,
        users: &std::collections::BTreeSet<String>,
    ) -> std::collections::HashMap<String, Online> {
        if users.is_empty() {
            return Default::default();
        }
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        self.run_free(Default::default(), |c| {
            Ok(c.query(
                "SELECT ms, address, public_key, login, name FROM live_online \
                 WHERE name = ANY($1)",
                &[&names],
            )?
            .iter()
            .filter_map(|r| online_row(r).map(|o| (r.get::<_, String>(4), o)))
            .collect())
        })
    }

    fn notify_users(&mut self, users: &mut dyn Iterator<Item = &str>, kind: &EventKind) {
        let users: Vec<String> = users.map(str::to_owned).collect();
        if users.is_empty() {
            return;
        }
        self.run((), |c| {
            let mut at: BTreeMap<String, i64> = BTreeMap::new();
            for r in c.query(
                "SELECT name, ms FROM live_online WHERE name = ANY($1)",
                &[&users],
            )? {
                at.insert(r.get(0), r.get(1));
            }
            let mut by_ms: BTreeMap<i64, Vec<String>> = BTreeMap::new();
            for u in users {
                if let Some(ms) = at.get(&u) {
                    by_ms.entry(*ms).or_default().push(u);
                }
            }
            for (ms, recipients) in by_ms {
                push_event(c, ms, &recipients, kind)?;
            }
            Ok(())
        })
    }

    fn events(&mut self, ms: u64, ack: u64) -> Option<EventBatch> {
        // Without the directory-wide lock: only this MS's poll deletes its
        // acknowledged events, and events are added under the lock one
        // transaction after another, so a reader never sees a gap.
        self.run_free(None, |c| {
            let ms = to_i64(ms);
            let Some(row) = c.query_opt("SELECT next_seq FROM live_ms WHERE id = $1", &[&ms])?
            else {
                return Ok(None);
            };
            let next: i64 = row.get(0);
            c.execute(
                "DELETE FROM live_events WHERE ms = $1 AND seq <= $2",
                &[&ms, &to_i64(ack)],
            )?;
            let rows = c.query(
                "SELECT seq, recipients, kind FROM live_events WHERE ms = $1 \
                 ORDER BY seq LIMIT $2",
                &[&ms, &(MAX_BATCH as i64)],
            )?;
            let first = rows.first().map(|r| r.get::<_, i64>(0)).unwrap_or(next);
            let mut events = Vec::with_capacity(rows.len());
            for r in &rows {
                let recipients: String = r.get(1);
                let kind: String = r.get(2);
                match (
                    serde_json::from_str::<Vec<String>>(&recipients),
                    serde_json::from_str::<EventKind>(&kind),
                ) {
                    (Ok(recipients), Ok(kind)) => events.push(Event { recipients, kind }),
                    _ => return Err(Fail::Corrupt(format!("event {ms}/{}", r.get::<_, i64>(0)))),
                }
            }
            Ok(Some(EventBatch {
                first: to_u64(first),
                events,
            }))
        })
    }

    fn reap(&mut self, timeout: Duration) -> Vec<String> {
        // After the database was unreachable, heartbeats could not be
        // recorded: give every MS a whole timeout to be heard again rather
        // than take all their users offline.
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.pool().failed_within(timeout))
        {
            return Vec::new();
        }
        // Every instance reaps several times a second: look first without
        // the directory-wide lock, and take it only when there is work.
        let any = self.run_free(false, |c| {
            Ok(c.query_opt(
                "SELECT 1 FROM live_ms \
                 WHERE last_seen <= clock_timestamp() - make_interval(secs => $1) LIMIT 1",
                &[&secs(timeout)],
            )?
            .is_some())
        });
        if !any {
            return Vec::new();
        }
        self.run(Vec::new(), |c| {
            let mut lost = Vec::new();
            for r in c.query(
                "SELECT id FROM live_ms \
                 WHERE last_seen <= clock_timestamp() - make_interval(secs => $1)",
                &[&secs(timeout)],
            )? {
                let id: i64 = r.get(0);
                for u in c.query(
                    "SELECT name FROM live_online WHERE ms = $1 ORDER BY name",
                    &[&id],
                )? {
                    lost.push(u.get(0));
                }
                c.execute("DELETE FROM live_ms WHERE id = $1", &[&id])?;
                info!("dropped MS #{id}: no heartbeat");
            }
            Ok(lost)
        })
    }

    fn ms_list(&mut self) -> Vec<MsInfo> {
        self.run_free(Vec::new(), |c| {
            let rows = c.query(
                "SELECT m.id, m.address, m.capacity, \
                   (SELECT count(*) FROM live_online o WHERE o.ms = m.id) \
                 + (SELECT count(*) FROM live_locks l WHERE l.ms = m.id), \
                 extract(epoch FROM clock_timestamp() - m.last_seen)::float8 \
                 FROM live_ms m ORDER BY m.id",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| MsInfo {
                    id: to_u64(r.get(0)),
                    address: r.get(1),
                    capacity: u32::try_from(r.get::<_, i64>(2)).unwrap_or(u32::MAX),
                    load: u32::try_from(r.get::<_, i64>(3)).unwrap_or(u32::MAX),
                    last_heartbeat_secs: r.get::<_, f64>(4).max(0.0) as u64,
                })
                .collect())
        })
    }

    fn online_count(&mut self) -> usize {
        self.run_free(0, |c| {
            let n: i64 = c.query_one("SELECT count(*) FROM live_online", &[])?.get(0);
            Ok(usize::try_from(n).unwrap_or(0))
        })
    }

    fn address(&mut self, user: &str) -> Option<SocketAddr> {
        self.online(user).map(|o| o.presence.address)
    }

    fn commit(mut self: Box<Self>) -> Result<(), String> {
        self.finish()
    }
}
