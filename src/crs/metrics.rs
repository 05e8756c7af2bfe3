//! The CRS's metrics (see [`crate::metrics`]), all named `ims_crs_*`:
//! users online and MSs enrolled, logins and refused login locks,
//! registrations, events queued for MSs (pushes), the worker pool, and the
//! store's latency as a histogram per operation.
//!
//! They are counted by wrapping the store ([`TimedStore`]) and the live
//! state ([`CountingLive`]), so the request handlers need not know.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::live::{LiveState, LiveTx, LockError, Online};
use super::store::{
    BuddyRequest, ContactView, SearchHit, StatusFields, Store, StoreError, User, Verifier,
};
use crate::metrics::PoolMetrics;
use crate::proto::crs::{EventBatch, EventKind, MsInfo, Presence};

/// Labels of the store histogram: the operation.
type OpLabels = Vec<(&'static str, &'static str)>;

fn store_histogram() -> Histogram {
    // 50 µs to about 1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Every CRS metric.
pub struct CrsMetrics {
    /// The registry the endpoint encodes.
    pub registry: Arc<Mutex<Registry>>,
    /// The worker pool's.
    pub pool: Arc<PoolMetrics>,
    online: Gauge,
    enrolled: Gauge,
    logins: Counter,
    lock_refusals: Counter,
    registrations: Counter,
    events: Counter,
    store_seconds: Family<OpLabels, Histogram, fn() -> Histogram>,
}

impl CrsMetrics {
    /// Registers everything.
    pub fn new() -> Arc<CrsMetrics> {
        let mut r = Registry::with_prefix("ims_crs");
        let pool = PoolMetrics::register(&mut r);
        let m = CrsMetrics {
            registry: Arc::new(Mutex::new(Registry::default())),
            pool,
            online: Gauge::default(),
            enrolled: Gauge::default(),
            logins: Counter::default(),
            lock_refusals: Counter::default(),
            registrations: Counter::default(),
            events: Counter::default(),
            store_seconds: Family::new_with_constructor(store_histogram),
        };
        r.register(
            "online_users",
            "Users online in the directory",
            m.online.clone(),
        );
        r.register(
            "enrolled_ms",
            "Messaging servers enrolled",
            m.enrolled.clone(),
        );
        r.register(
            "logins",
            "Logins completed (users set online)",
            m.logins.clone(),
        );
        r.register(
            "login_failures",
            "Login locks refused (already logging in or logged in)",
            m.lock_refusals.clone(),
        );
        r.register(
            "registrations",
            "Accounts registered",
            m.registrations.clone(),
        );
        r.register(
            "pushes",
            "Events queued for messaging servers to push to clients",
            m.events.clone(),
        );
        r.register(
            "store_seconds",
            "Latency of store operations, by operation",
            m.store_seconds.clone(),
        );
        *m.registry.lock() = r;
        Arc::new(m)
    }

    /// Sets the read-through gauges.
    pub fn set_live(&self, online: usize, enrolled: usize) {
        self.online.set(i64::try_from(online).unwrap_or(i64::MAX));
        self.enrolled
            .set(i64::try_from(enrolled).unwrap_or(i64::MAX));
    }

    fn observe(&self, op: &'static str, took: Duration) {
        self.store_seconds
            .get_or_create(&vec![("op", op)])
            .observe(took.as_secs_f64());
    }
}

/// The store, timed.
pub struct TimedStore {
    /// The store timed.
    pub inner: Arc<dyn Store>,
    /// Where the times go.
    pub metrics: Arc<CrsMetrics>,
}

impl TimedStore {
    pub(crate) fn time<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let v = f();
        self.metrics.observe(op, start.elapsed());
        v
    }
}

impl Store for TimedStore {
    fn create_user(&self, user: User) -> Result<(), StoreError> {
        let r = self.time("create_user", || self.inner.create_user(user));
        if r.is_ok() {
            self.metrics.registrations.inc();
        }
        r
    }
    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.time("get_user", || self.inner.get_user(name))
    }
    fn get_verifier(&self, name: &str) -> Result<Option<Verifier>, StoreError> {
        self.time("get_verifier", || self.inner.get_verifier(name))
    }
    fn contact_views(
        &self,
        viewer: &str,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, ContactView>, StoreError> {
        self.time("contact_views", || self.inner.contact_views(viewer, names))
    }
    fn status_fields(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, StatusFields>, StoreError> {
        self.time("status_fields", || self.inner.status_fields(names))
    }
    fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        self.time("delete_user", || self.inner.delete_user(name))
    }
    fn list_users(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        self.time("list_users", || self.inner.list_users(after, limit))
    }
    fn user_count(&self) -> Result<u64, StoreError> {
        self.time("user_count", || self.inner.user_count())
    }
    fn set_credentials(
        &self,
        name: &str,
        verifier: Verifier,
        wrapped_private_key: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.time("set_credentials", || {
            self.inner
                .set_credentials(name, verifier, wrapped_private_key)
        })
    }
    fn set_profile(&self, name: &str, profile: BTreeMap<String, String>) -> Result<(), StoreError> {
        self.time("set_profile", || self.inner.set_profile(name, profile))
    }
    fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, StoreError> {
        self.time("search", || self.inner.search(text, limit))
    }
    fn add_request(&self, to: &str, req: BuddyRequest) -> Result<(), StoreError> {
        self.time("add_request", || self.inner.add_request(to, req))
    }
    fn take_requests(&self, name: &str) -> Result<Vec<BuddyRequest>, StoreError> {
        self.time("take_requests", || self.inner.take_requests(name))
    }
    fn remove_request(&self, to: &str, from: &str) -> Result<bool, StoreError> {
        self.time("remove_request", || self.inner.remove_request(to, from))
    }
    fn make_buddies(&self, a: &str, b: &str) -> Result<(), StoreError> {
        self.time("make_buddies", || self.inner.make_buddies(a, b))
    }
    fn remove_buddies(&self, a: &str, b: &str) -> Result<bool, StoreError> {
        self.time("remove_buddies", || self.inner.remove_buddies(a, b))
    }
    fn contacts(&self, name: &str) -> Result<BTreeSet<String>, StoreError> {
        self.time("contacts", || self.inner.contacts(name))
    }
    fn set_blocked(&self, name: &str, who: &str, on: bool) -> Result<bool, StoreError> {
        self.time("set_blocked", || self.inner.set_blocked(name, who, on))
    }
    fn set_status(
        &self,
        name: &str,
        status: crate::proto::status::Status,
        message: &str,
    ) -> Result<(), StoreError> {
        self.time("set_status", || {
            self.inner.set_status(name, status, message)
        })
    }
}

/// The live state, counted.
pub struct CountingLive {
    /// The live state counted.
    pub inner: Box<dyn LiveState>,
    /// Where the counts go.
    pub metrics: Arc<CrsMetrics>,
}

impl LiveState for CountingLive {
    fn lock(&self) -> Box<dyn LiveTx + '_> {
        Box::new(CountingTx {
            inner: self.inner.lock(),
            metrics: &self.metrics,
        })
    }
    fn recheck(&self) -> Duration {
        self.inner.recheck()
    }
    fn shared_instance(&self) -> Option<String> {
        self.inner.shared_instance()
    }
    fn shared_guesses(&self, free: u32) -> Option<Box<dyn super::guesses::GuessCounter>> {
        self.inner.shared_guesses(free)
    }
}

struct CountingTx<'a> {
    inner: Box<dyn LiveTx + 'a>,
    metrics: &'a CrsMetrics,
}

impl LiveTx for CountingTx<'_> {
    fn enroll(&mut self, address: &str, capacity: u32, instance: &str) -> (u64, Vec<String>) {
        self.inner.enroll(address, capacity, instance)
    }
    fn notify_ms(&mut self, ms: u64, recipients: Vec<String>, kind: EventKind) {
        self.metrics.events.inc();
        self.inner.notify_ms(ms, recipients, kind)
    }
    fn touch(&mut self, id: u64) -> bool {
        self.inner.touch(id)
    }
    fn locate(&mut self, heartbeat_timeout: Duration) -> Option<String> {
        self.inner.locate(heartbeat_timeout)
    }
    fn lock(&mut self, user: &str, ms: u64, lease: Duration) -> Result<(), LockError> {
        let r = self.inner.lock(user, ms, lease);
        if r.is_err() {
            self.metrics.lock_refusals.inc();
        }
        r
    }
    fn unlock(&mut self, user: &str, ms: u64) {
        self.inner.unlock(user, ms)
    }
    fn holds_lock(&mut self, user: &str, ms: u64) -> bool {
        self.inner.holds_lock(user, ms)
    }
    fn set_online(&mut self, user: &str, ms: u64, presence: Presence) -> u64 {
        self.metrics.logins.inc();
        self.inner.set_online(user, ms, presence)
    }
    fn set_offline(&mut self, user: &str, ms: Option<u64>) -> bool {
        self.inner.set_offline(user, ms)
    }
    fn online(&mut self, user: &str) -> Option<Online> {
        self.inner.online(user)
    }
    fn online_many(
        &mut self,
        users: &BTreeSet<String>,
    ) -> std::collections::HashMap<String, Online> {
        self.inner.online_many(users)
    }
    fn notify_users(&mut self, users: &mut dyn Iterator<Item = &str>, kind: &EventKind) {
        // Counted per event, not per recipient: knowing who is online
        // would cost a look-up per user.
        self.metrics.events.inc();
        self.inner.notify_users(users, kind)
    }
    fn events(&mut self, ms: u64, ack: u64) -> Option<EventBatch> {
        self.inner.events(ms, ack)
    }
    fn reap(&mut self, timeout: Duration) -> Vec<String> {
        self.inner.reap(timeout)
    }
    fn ms_list(&mut self) -> Vec<MsInfo> {
        self.inner.ms_list()
    }
    fn online_count(&mut self) -> usize {
        self.inner.online_count()
    }
    fn address(&mut self, user: &str) -> Option<std::net::SocketAddr> {
        self.inner.address(user)
    }
    fn commit(self: Box<Self>) -> Result<(), String> {
        self.inner.commit()
    }
}
