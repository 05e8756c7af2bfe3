//! The MS's metrics (see [`crate::metrics`]), all named `ims_ms_*`: users
//! online here, logins and failed logins, pushes delivered and failed,
//! relayed bytes and refused relay frames, and the worker pool. The counters live where they are counted (users,
//! pusher); this registers them.

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::Ms;
use crate::metrics::{Endpoint, PoolMetrics};
use crate::prethread::StatsSource;

/// Starts the `/metrics` endpoint of `ms` at `addr`.
pub fn serve(addr: &str, ms: &Arc<Ms>, pool: StatsSource) -> std::io::Result<Endpoint> {
    let mut r = Registry::with_prefix("ims_ms");
    let pool_metrics = PoolMetrics::register(&mut r);
    pool_metrics.attach(pool);
    let online = Gauge::<i64>::default();
    r.register("online_users", "Users logged in here", online.clone());
    r.register("logins", "Logins completed here", ms.users.logins.clone());
    r.register(
        "login_failures",
        "Logins refused for a wrong password or unknown name",
        ms.users.failures.clone(),
    );
    r.register(
        "pushes",
        "Events pushed to clients",
        ms.pusher.pushed.clone(),
    );
    r.register(
        "push_failures",
        "Pushes that failed or were dropped",
        ms.pusher.failed.clone(),
    );
    r.register(
        "relayed_bytes",
        "Connection bytes relayed between clients that cannot reach each other",
        ms.relay.relayed.clone(),
    );
    r.register(
        "relay_refused",
        "Relay frames refused or dropped (not a buddy, not online, over a bound)",
        ms.relay.refused.clone(),
    );
    let weak = Arc::downgrade(ms);
    let refresh = Box::new(move || {
        pool_metrics.refresh();
        if let Some(ms) = weak.upgrade() {
            online.set(i64::try_from(ms.load()).unwrap_or(i64::MAX));
        }
    });
    Endpoint::start(addr, Arc::new(Mutex::new(r)), refresh)
}
