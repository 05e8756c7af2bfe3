//! Rate limits of an MS: login attempts per source address, a growing
//! delay after wrong passwords per (name, source), and searches per user.
//!
//! The delay is kept per source so that someone guessing a name's password
//! slows down only themselves: the real user, coming from elsewhere, is not
//! locked out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Entries kept per table before idle ones are swept out.
const SWEEP_AT: usize = 10_000;
/// Wrong passwords from one source for one name before delays begin.
pub const FREE_FAILURES: u32 = 3;
/// The longest delay after repeated wrong passwords.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// A token bucket: `burst` at once, then `per_sec` a second.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets by key.
#[derive(Debug)]
pub struct Buckets<K> {
    burst: f64,
    per_sec: f64,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    /// `burst` tokens, refilled at `per_sec`; `per_sec == 0` means no limit.
    pub fn new(burst: u32, per_sec: f64) -> Buckets<K> {
        Buckets {
            burst: f64::from(burst.max(1)),
            per_sec,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`; false if there is none left.
    pub fn take(&self, key: &K) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut map = self.map.lock();
        if map.len() >= SWEEP_AT {
            let full = self.burst / self.per_sec;
            map.retain(|_, b| now.duration_since(b.at).as_secs_f64() < full);
        }
        let b = map.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens =
            (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Wrong passwords per (name, source) and the delay they earn.
#[derive(Debug, Default)]
pub struct Failures {
    map: Mutex<HashMap<(String, IpAddr), (u32, Instant)>>,
    /// Failed logins counted (a metric).
    pub count: prometheus_client::metrics::counter::Counter,
}

impl Failures {
    /// How long `name` from `ip` must still wait, if at all.
    pub fn wait(&self, name: &str, ip: IpAddr) -> Option<Duration> {
        let map = self.map.lock();
        let (n, last) = map.get(&(name.to_owned(), ip))?;
        let left = delay(*n).checked_sub(last.elapsed())?;
        (!left.is_zero()).then_some(left)
    }

    /// Notes a wrong password.
    pub fn failed(&self, name: &str, ip: IpAddr) {
        self.count.inc();
        let mut map = self.map.lock();
        if map.len() >= SWEEP_AT {
            map.retain(|_, (_, last)| last.elapsed() < MAX_DELAY);
        }
        let e = map
            .entry((name.to_owned(), ip))
            .or_insert((0, Instant::now()));
        e.0 = e.0.saturating_add(1);
        e.1 = Instant::now();
    }

    /// A right password clears the record.
    pub fn succeeded(&self, name: &str, ip: IpAddr) {
        self.map.lock().remove(&(name.to_owned(), ip));
    }
}

/// The delay after `n` wrong passwords: none for the first few, then
/// doubling from one second up to [`MAX_DELAY`].
pub fn delay(n: u32) -> Duration {
    if n < FREE_FAILURES {
        return Duration::ZERO;
    }
    let exp = (n - FREE_FAILURES).min(16);
    Duration::from_secs(1u64 << exp).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_refuse_past_the_burst() {
        let b: Buckets<u8> = Buckets::new(3, 0.001);
        assert!(b.take(&1) && b.take(&1) && b.take(&1));
        assert!(!b.take(&1));
        assert!(b.take(&2), "keys are independent");
        let off: Buckets<u8> = Buckets::new(1, 0.0);
        assert!((0..100).all(|_| off.take(&1)));
    }

    #[test]
    fn failures_slow_one_source_only() {
        let f = Failures::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..FREE_FAILURES {
            assert!(f.wait("joe", a).is_none());
            f.failed("joe", a);
        }
        assert!(f.wait("joe", a).is_some(), "the guesser waits");
        assert!(
            f.wait("joe", b).is_none(),
            "the real user elsewhere does not"
        );
        f.succeeded("joe", a);
        assert!(f.wait("joe", a).is_none());
        assert_eq!(delay(FREE_FAILURES), Duration::from_secs(1));
        assert_eq!(delay(FREE_FAILURES + 3), Duration::from_secs(8));
        assert_eq!(delay(100), MAX_DELAY);
    }
}
