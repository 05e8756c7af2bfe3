//! Counters of a running server, kept as atomics and read as a snapshot.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// A snapshot of a server's counters (see [`super::Server::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections accepted, those then refused as busy included.
    pub accepted: u64,
    /// Connections answered `503 busy` because the queue was full.
    pub rejected_busy: u64,
    /// Connections dropped on a deadline: a message not in by its deadline,
    /// an idle timeout, or a reply not written by its deadline.
    pub timed_out: u64,
    /// Connections being served by a worker right now.
    pub active: u64,
    /// Connections waiting in the gate for their next message, or (the
    /// parked ones) for a wake-up.
    pub held: u64,
    /// Of `held`, connections parked by their handler until a wake-up
    /// (a deferred reply, e.g. an idle long poll): owed an answer, yet
    /// holding no worker.
    pub parked: u64,
    /// Connections open: held, being served, or queued for a worker.
    pub open: u64,
    /// Worker threads that panicked (and were replaced).
    pub panicked: u64,
    /// Whole requests waiting for a worker right now.
    pub queued: u64,
}

/// Reads a server's counters from anywhere, for as long as it runs (a
/// metrics endpoint); see [`super::Server::stats_source`].
#[derive(Clone, Debug)]
pub struct StatsSource {
    pub(crate) counters: Arc<Counters>,
}

impl StatsSource {
    /// A snapshot, queue depth included.
    pub fn snapshot(&self) -> Stats {
        self.counters.snapshot()
    }
}

/// The live counters, shared by the acceptor and the workers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub accepted: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub timed_out: AtomicU64,
    pub active: AtomicUsize,
    pub held: AtomicUsize,
    pub parked: AtomicUsize,
    pub open: AtomicUsize,
    /// Jobs sent by the gate and not yet taken by a worker.
    pub queued: AtomicUsize,
    /// Of those, requests (and resumptions) waiting for a worker: what the
    /// queue limit bounds. Ends of connections are not counted: a burst of
    /// them (many clients gone at once) must not make the server refuse
    /// new requests while they are handled.
    pub requests_waiting: AtomicUsize,
    pub panicked: AtomicU64,
}

impl Counters {
    /// Reads every counter. Each is exact; together they are only roughly
    /// simultaneous, which is all monitoring needs.
    pub fn snapshot(&self) -> Stats {
        Stats {
            accepted: self.accepted.load(Relaxed),
            rejected_busy: self.rejected_busy.load(Relaxed),
            timed_out: self.timed_out.load(Relaxed),
            active: self.active.load(Relaxed) as u64,
            held: self.held.load(Relaxed) as u64,
            parked: self.parked.load(Relaxed) as u64,
            open: self.open.load(Relaxed) as u64,
            panicked: self.panicked.load(Relaxed),
            queued: self.queued.load(Relaxed) as u64,
        }
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
