//! Deferred replies: a connection parked in the gate until a wake-up.
//!
//! A handler that has nothing to answer yet (a long poll finding no
//! events) returns [`Outcome::Park`](super::Outcome::Park) instead of
//! waiting on its worker. The connection then waits in the gate like any
//! idle connection, costing a poller entry and no thread, until its key
//! is woken ([`Parking::wake`], [`Parking::wake_all`]) or its deadline
//! passes; then a worker runs [`Service::resume`](super::Service::resume),
//! which answers, parks again, or closes.
//!
//! No wake-up is lost between a handler looking for work and its
//! connection reaching the gate: [`Parking::prepare`] reads the key's
//! generation *before* the handler looks, and the gate resumes at once a
//! connection whose key moved past it meanwhile (the same rule as a
//! condition variable's, without a thread asleep on it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use mio::Waker;
use parking_lot::Mutex;

/// Longest a connection may stay parked without a wake-up, whatever the
/// handler asks: a bound on a deadline computed from a configuration, so
/// that `Instant` arithmetic cannot overflow.
pub const MAX_PARK: Duration = Duration::from_secs(24 * 3600);

/// A connection's promise to answer later; made by [`Parking::prepare`]
/// and returned in [`Outcome::Park`](super::Outcome::Park).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Park {
    key: u64,
    /// The key's generation when the park was prepared.
    seen: u64,
    until: Instant,
}

impl Park {
    /// What wakes it (e.g. an MS's id).
    pub fn key(&self) -> u64 {
        self.key
    }

    /// When it is resumed without a wake-up.
    pub fn until(&self) -> Instant {
        self.until
    }
}

/// Wake-ups for parked connections: shared by a service (which wakes) and
/// the gate of each server running it (which resumes). Clone it freely.
#[derive(Clone, Default)]
pub struct Parking {
    inner: Arc<Mutex<Board>>,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Parking")
    }
}

#[derive(Default)]
struct Board {
    /// Bumped by every [`Parking::wake_all`].
    everyone: u64,
    /// Bumped by every [`Parking::wake`] of the key. One entry per key
    /// ever woken (a CRS: one per MS id), kept so that generations only
    /// ever move forward.
    keys: HashMap<u64, u64>,
    /// The gates to tell.
    gates: Vec<Arc<Mailbox>>,
}

impl Board {
    fn generation(&self, key: u64) -> u64 {
        self.everyone
            .wrapping_add(self.keys.get(&key).copied().unwrap_or(0))
    }
}

/// What one gate has to resume, and how to interrupt its poll.
pub(crate) struct Mailbox {
    pending: Mutex<Pending>,
    waker: Arc<Waker>,
}

/// Wake-ups a gate has not yet acted on.
#[derive(Default)]
pub(crate) struct Pending {
    /// Every parked connection.
    pub everyone: bool,
    /// The parked connections of these keys.
    pub keys: HashSet<u64>,
}

impl Mailbox {
    fn post(&self, key: Option<u64>) {
        let mut pending = self.pending.lock();
        let was_empty = !pending.everyone && pending.keys.is_empty();
        match key {
            None => {
                pending.everyone = true;
                pending.keys.clear();
            }
            Some(_) if pending.everyone => {}
            Some(key) => {
                pending.keys.insert(key);
            }
        }
        drop(pending);
        // A gate already told will look at everything pending anyway.
        if was_empty {
            if let Err(e) = self.waker.wake() {
                warn!("cannot wake a gate for a parked connection: {e}");
            }
        }
    }

    /// Takes what is pending.
    pub(crate) fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock())
    }
}

impl Parking {
    /// A board with no gates yet; a server attaches its gate when it
    /// starts (see [`Service::parking`](super::Service::parking)).
    pub fn new() -> Parking {
        Parking::default()
    }

    /// Starts a wait on `key` of at most `timeout` (capped at
    /// [`MAX_PARK`]). Call it *before* looking for work: a wake-up of
    /// `key` from then on resumes the park at once, even one that comes
    /// before the connection reaches the gate.
    pub fn prepare(&self, key: u64, timeout: Duration) -> Park {
        let seen = self.inner.lock().generation(key);
        Park {
            key,
            seen,
            until: Instant::now() + timeout.min(MAX_PARK),
        }
    }

    /// Resumes every connection parked on `key`.
    pub fn wake(&self, key: u64) {
        let mut board = self.inner.lock();
        let g = board.keys.entry(key).or_default();
        *g = g.wrapping_add(1);
        for gate in &board.gates {
            gate.post(Some(key));
        }
    }

    /// Resumes every parked connection (e.g. to stop, or after wake-ups
    /// may have been missed).
    pub fn wake_all(&self) {
        let mut board = self.inner.lock();
        board.everyone = board.everyone.wrapping_add(1);
        for gate in &board.gates {
            gate.post(None);
        }
    }

    /// Whether `park`'s key was woken since it was prepared.
    pub fn woken(&self, park: &Park) -> bool {
        self.inner.lock().generation(park.key) != park.seen
    }

    /// Registers a gate, woken through `waker`.
    pub(crate) fn attach(&self, waker: Arc<Waker>) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox {
            pending: Mutex::new(Pending::default()),
            waker,
        });
        self.inner.lock().gates.push(Arc::clone(&mailbox));
        mailbox
    }

    /// Forgets a gate (its server stopped).
    pub(crate) fn detach(&self, mailbox: &Arc<Mailbox>) {
        self.inner
            .lock()
            .gates
            .retain(|gate| !Arc::ptr_eq(gate, mailbox));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Poll, Token};

    fn gate() -> (Poll, Arc<Waker>) {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
        (poll, waker)
    }

    #[test]
    fn a_wake_after_prepare_is_seen() {
        let parking = Parking::new();
        let park = parking.prepare(7, Duration::from_secs(5));
        assert!(!parking.woken(&park));
        parking.wake(8);
        assert!(!parking.woken(&park), "another key");
        parking.wake(7);
        assert!(parking.woken(&park));
        let later = parking.prepare(7, Duration::from_secs(5));
        assert!(!parking.woken(&later), "a new park starts from now");
        parking.wake_all();
        assert!(parking.woken(&later), "everyone");
    }

    #[test]
    fn gates_hear_of_wakes_and_detach() {
        let parking = Parking::new();
        let (_poll, waker) = gate();
        let mailbox = parking.attach(waker);
        parking.wake(1);
        parking.wake(2);
        let pending = mailbox.take();
        assert!(!pending.everyone);
        assert_eq!(pending.keys, HashSet::from([1, 2]));
        assert!(mailbox.take().keys.is_empty(), "taken once");
        parking.wake(3);
        parking.wake_all();
        let pending = mailbox.take();
        assert!(pending.everyone && pending.keys.is_empty());
        parking.detach(&mailbox);
        parking.wake(4);
        assert!(mailbox.take().keys.is_empty(), "detached");
    }

    #[test]
    fn deadlines_are_capped() {
        let parking = Parking::new();
        let park = parking.prepare(1, Duration::MAX);
        assert!(park.until() <= Instant::now() + MAX_PARK);
        assert_eq!(park.key(), 1);
    }
}

/// The outcome end to end: real sockets, a real pool of one worker.
#[cfg(test)]
mod served {
    use std::io::Write;
    use std::net::TcpStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::prethread::{Config, Outcome, Parking, Peer, Server, Service, Stats};
    use crate::wire::io::MessageReader;
    use crate::wire::{Limits, Message};

    const LONG: Duration = Duration::from_secs(20);

    /// `WAIT` (headers `Key`, `Ms`) parks until its key is woken or `Ms`
    /// milliseconds pass, then answers `Woken: true/false`; `EARLY` wakes
    /// its own key between preparing and parking; `PING` answers at once.
    #[derive(Default)]
    struct Waiter {
        parking: Parking,
        closed: AtomicUsize,
    }

    impl Service for Waiter {
        type Session = Option<u64>;
        fn open(&self, _peer: &Peer) -> Option<u64> {
            None
        }
        fn handle(&self, session: &mut Option<u64>, request: Message) -> Outcome {
            let key = request
                .header("Key")
                .and_then(|k| k.parse().ok())
                .unwrap_or(0);
            let ms = request
                .header("Ms")
                .and_then(|k| k.parse().ok())
                .unwrap_or(60_000);
            match request.method() {
                Some("WAIT") | Some("EARLY") => {
                    let park = self.parking.prepare(key, Duration::from_millis(ms));
                    if request.method() == Some("EARLY") {
                        // As if the work came while this worker looked.
                        self.parking.wake(key);
                    }
                    *session = Some(key);
                    Outcome::Park(park)
                }
                _ => Outcome::Reply(
                    Message::ok().with_header("N", request.header("N").unwrap_or("-")),
                ),
            }
        }
        fn resume(&self, session: &mut Option<u64>, woken: bool) -> Outcome {
            match session.take() {
                Some(key) => Outcome::Reply(
                    Message::ok()
                        .with_header("Key", key)
                        .with_header("Woken", woken),
                ),
                None => Outcome::Close,
            }
        }
        fn close(&self, _session: Option<u64>) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
        fn parking(&self) -> Option<Parking> {
            Some(self.parking.clone())
        }
    }

    fn start(service: &Arc<Waiter>) -> Server {
        let config = Config {
            name: "park".into(),
            workers: 1,
            // Room for every request of a test to wait: a busy machine
            // may deliver them all while the one worker is busy.
            queue: 64,
            ..Config::default()
        };
        Server::bind("127.0.0.1:0", config, Arc::clone(service)).unwrap()
    }

    fn send(server: &Server, m: &Message) -> MessageReader<TcpStream> {
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream.write_all(&m.encode()).unwrap();
        MessageReader::new(stream)
    }

    fn wait(key: u64, ms: u64) -> Message {
        Message::request("WAIT")
            .with_header("Key", key)
            .with_header("Ms", ms)
    }

    fn read(reader: &mut MessageReader<TcpStream>) -> Message {
        reader
            .read_message(&Limits::DEFAULT, Instant::now() + LONG)
            .unwrap()
            .expect("a reply")
    }

    fn until(server: &Server, done: impl Fn(&Stats) -> bool) -> Stats {
        let end = Instant::now() + LONG;
        loop {
            let stats = server.stats();
            if done(&stats) || Instant::now() >= end {
                return stats;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn parked_requests_hold_no_worker_and_answer_when_woken() {
        let service = Arc::new(Waiter::default());
        let server = start(&service);
        let mut waiting: Vec<_> = (1..=5).map(|k| send(&server, &wait(k, 60_000))).collect();
        let stats = until(&server, |s| s.parked == 5 && s.active == 0);
        assert_eq!((stats.parked, stats.active), (5, 0), "{stats:?}");
        // One worker, five requests owed an answer: it is still free.
        let mut ping = send(&server, &Message::request("PING").with_header("N", 1));
        assert_eq!(read(&mut ping).header("N"), Some("1"));

        service.parking.wake(3);
        let woken = read(&mut waiting[2]);
        assert_eq!(woken.header("Key"), Some("3"));
        assert_eq!(woken.header("Woken"), Some("true"));
        let stats = until(&server, |s| s.parked == 4);
        assert_eq!(stats.parked, 4, "only key 3 was woken: {stats:?}");

        service.parking.wake_all();
        for (i, reader) in waiting.iter_mut().enumerate() {
            if i != 2 {
                assert_eq!(read(reader).header("Woken"), Some("true"));
            }
        }
        assert_eq!(until(&server, |s| s.parked == 0).parked, 0);
        server.stop_and_join();
    }

    #[test]
    fn a_parked_request_is_resumed_at_its_deadline() {
        let service = Arc::new(Waiter::default());
        let server = start(&service);
        let mut reader = send(&server, &wait(1, 200));
        let reply = read(&mut reader);
        assert_eq!(reply.header("Woken"), Some("false"));
        server.stop_and_join();
    }

    #[test]
    fn a_wake_before_the_park_reaches_the_gate_is_not_lost() {
        let service = Arc::new(Waiter::default());
        let server = start(&service);
        // Parked for a minute, but woken before it was parked: answered
        // at once, not at the deadline.
        let mut reader = send(
            &server,
            &Message::request("EARLY")
                .with_header("Key", 9)
                .with_header("Ms", 60_000),
        );
        let reply = read(&mut reader);
        assert_eq!(reply.header("Woken"), Some("true"));
        server.stop_and_join();
    }

    #[test]
    fn requests_behind_a_parked_one_wait_their_turn() {
        let service = Arc::new(Waiter::default());
        let server = start(&service);
        let mut burst = wait(2, 60_000).encode();
        burst.extend(Message::request("PING").with_header("N", 7).encode());
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream.write_all(&burst).unwrap();
        let mut reader = MessageReader::new(stream);
        until(&server, |s| s.parked == 1);
        service.parking.wake(2);
        assert_eq!(read(&mut reader).header("Key"), Some("2"), "in order");
        assert_eq!(read(&mut reader).header("N"), Some("7"));
        server.stop_and_join();
    }

    #[test]
    fn a_peer_closing_while_parked_ends_the_connection() {
        let service = Arc::new(Waiter::default());
        let server = start(&service);
        let reader = send(&server, &wait(4, 60_000));
        until(&server, |s| s.parked == 1);
        drop(reader);
        let stats = until(&server, |s| s.parked == 0 && s.open == 0);
        assert_eq!((stats.parked, stats.open), (0, 0), "{stats:?}");
        assert_eq!(service.closed.load(Ordering::SeqCst), 1);
        server.stop_and_join();
    }
}
