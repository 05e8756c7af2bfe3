//! Rate limits of an MS: login attempts per source address and searches
//! per user. Password guesses per (name, source) are counted at the CRS,
//! where every MS sees them.

use std::collections::HashMap;
use std::time::Instant;

use parking_lot::Mutex;

/// Entries kept per table before idle ones are swept out.
const SWEEP_AT: usize = 10_000;

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
}
