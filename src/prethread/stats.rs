//! Counters of a running server, kept as atomics and read as a snapshot.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

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
    /// Connections waiting in the gate for their next message.
    pub held: u64,
    /// Connections open: held, being served, or queued for a worker.
    pub open: u64,
    /// Worker threads that panicked (and were replaced).
    pub panicked: u64,
}

/// The live counters, shared by the acceptor and the workers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub accepted: AtomicU64,
    pub rejected_busy: AtomicU64,
    pub timed_out: AtomicU64,
    pub active: AtomicUsize,
    pub held: AtomicUsize,
    pub open: AtomicUsize,
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
            open: self.open.load(Relaxed) as u64,
            panicked: self.panicked.load(Relaxed),
        }
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}
