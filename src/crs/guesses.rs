//! Password guesses per (name, source address), counted at the CRS so
//! that every MS sees the same counts: a guesser gains nothing by
//! spreading attempts over MSs.
//!
//! An attempt counts when it starts (the MS asks for the verifier at
//! `LOGIN-HELLO`), not when its proof is judged: concurrent handshakes
//! cannot all slip in before the first failure is recorded. A login that
//! succeeds clears its (name, source). The delay is kept per source so
//! that someone guessing a name's password slows down only themselves.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Entries kept before idle ones are swept out.
const SWEEP_AT: usize = 10_000;
/// Attempts from one source for one name before delays begin, by default.
pub const FREE_ATTEMPTS: u32 = 3;
/// The longest delay after repeated attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// Where attempts are counted: in this process ([`Guesses`]), or in
/// PostgreSQL so that every CRS instance on one directory sees the same
/// counts (`live_pg::PgGuesses`).
pub trait GuessCounter: Send + Sync {
    /// Counts an attempt of `name` from `ip`, unless it must still wait:
    /// then how long, and nothing is counted.
    fn attempt(&self, name: &str, ip: IpAddr) -> Result<(), Duration>;
    /// A login that proved its password clears the record.
    fn succeeded(&self, name: &str, ip: IpAddr);
}

/// The delay earned by `count` attempts with `free` of them free, as
/// [`Guesses::attempt`] applies it.
pub fn earned(count: u32, free: u32) -> Duration {
    if count < free {
        Duration::ZERO
    } else {
        delay((count - free).saturating_add(FREE_ATTEMPTS))
    }
}

impl GuessCounter for Guesses {
    fn attempt(&self, name: &str, ip: IpAddr) -> Result<(), Duration> {
        Guesses::attempt(self, name, ip)
    }
    fn succeeded(&self, name: &str, ip: IpAddr) {
        Guesses::succeeded(self, name, ip)
    }
}

/// Unfinished login attempts per (name, source) and when the last began.
#[derive(Debug)]
pub struct Guesses {
    free: u32,
    map: Mutex<HashMap<(String, IpAddr), (u32, Instant)>>,
}

impl Default for Guesses {
    fn default() -> Self {
        Guesses::new(FREE_ATTEMPTS)
    }
}

impl Guesses {
    /// `free` attempts per (name, source) before delays begin.
    pub fn new(free: u32) -> Guesses {
        Guesses {
            free,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt of `name` from `ip`, unless it must still wait:
    /// then how long, and nothing is counted.
    pub fn attempt(&self, name: &str, ip: IpAddr) -> Result<(), Duration> {
        let mut map = self.map.lock();
        if map.len() >= SWEEP_AT {
            map.retain(|_, (_, last)| last.elapsed() < MAX_DELAY);
        }
        let now = Instant::now();
        let e = map.entry((name.to_owned(), ip)).or_insert((0, now));
        if let Some(left) = earned(e.0, self.free).checked_sub(now.duration_since(e.1)) {
            if !left.is_zero() {
                return Err(left);
            }
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now;
        Ok(())
    }

    /// A login that proved its password clears the record.
    pub fn succeeded(&self, name: &str, ip: IpAddr) {
        self.map.lock().remove(&(name.to_owned(), ip));
    }
}

/// The delay after `n` attempts: none for the first few, then doubling
/// from one second up to [`MAX_DELAY`].
pub fn delay(n: u32) -> Duration {
    if n < FREE_ATTEMPTS {
        return Duration::ZERO;
    }
    let exp = (n - FREE_ATTEMPTS).min(16);
    Duration::from_secs(1u64 << exp).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_count_when_they_start_and_slow_one_source_only() {
        let g = Guesses::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        // Concurrent handshakes: none judged yet, yet only the free ones pass.
        for _ in 0..FREE_ATTEMPTS {
            assert!(g.attempt("joe", a).is_ok());
        }
        assert!(g.attempt("joe", a).is_err(), "the guesser waits");
        assert!(
            g.attempt("joe", b).is_ok(),
            "the real user elsewhere does not"
        );
        g.succeeded("joe", a);
        assert!(g.attempt("joe", a).is_ok());
        assert_eq!(delay(FREE_ATTEMPTS), Duration::from_secs(1));
        assert_eq!(delay(FREE_ATTEMPTS + 3), Duration::from_secs(8));
        assert_eq!(delay(100), MAX_DELAY);
    }
}
