//! The pre-threaded server pool behind every listener (CRS, MS, client).
//!
//! Three kinds of thread, all started with the server; nothing is spawned
//! per connection:
//! - the **acceptor** blocks in `accept()`, checks the connection limits
//!   (held per server, per source address) and hands the connection on;
//! - the **gate** holds every connection between messages in a readiness
//!   poller, reads what arrives without blocking into the connection's
//!   buffer and runs the no-I/O parser on it; only a whole message goes to
//!   a worker, with its connection. It enforces the per-message deadline
//!   (from the first byte) and the idle timeout;
//! - a fixed pool of **workers** runs the synchronous handlers: it gets a
//!   whole message, calls [`Service::handle`], writes the reply under the
//!   write deadline and gives the connection back to the gate. A worker
//!   never waits for a peer to send, so idle or trickling peers cost a
//!   buffer, not a thread, and the pool is sized by CPU work.
//!
//! [`Service::open`] runs when the gate takes a connection,
//! [`Service::close`] on a worker when it ends (the peer closed, an error,
//! a deadline, the server stopping).
//!
//! A handler with nothing to answer yet (a long poll) does not wait on its
//! worker: it returns [`Outcome::Park`], the connection waits in the gate
//! until a [`Parking`] wake-up or its deadline, and then a worker runs
//! [`Service::resume`] to answer (see `park`).
//!
//! Handlers see only messages, so they can be tested without sockets: call
//! `open` and `handle` directly.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ims::prethread::{Config, Outcome, Peer, Server, Service};
//! use ims::wire::Message;
//!
//! struct Echo;
//! impl Service for Echo {
//!     type Session = ();
//!     fn open(&self, _peer: &Peer) {}
//!     fn handle(&self, _session: &mut (), request: Message) -> Outcome {
//!         Outcome::Reply(Message::ok().with_body(request.body))
//!     }
//! }
//!
//! let server = Server::bind("127.0.0.1:0", Config::default(), Arc::new(Echo))?;
//! let _signals = ims::prethread::stop_on_signals(server.stopper())?;
//! server.join();
//! # Ok::<(), std::io::Error>(())
//! ```

mod gate;
mod inbuf;
mod limits;
mod outbound;
mod park;
mod server;
mod signals;
mod stats;
mod worker;

use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::wire::{Limits, Message};

pub use limits::{raise_open_files_limit, FD_RESERVE, MAX_PER_SOURCE};
pub use outbound::Outbound;
pub use park::{Park, Parking, MAX_PARK};
pub use server::{Server, Stopper};
pub use signals::{stop_on_signals, SignalWatch};
pub use stats::{Stats, StatsSource};

/// The two ends of a served connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer's address.
    pub remote: SocketAddr,
    /// Our address on this connection.
    pub local: SocketAddr,
}

/// A closure that takes over a connection; see [`Outcome::Takeover`].
pub type TakeoverFn = Box<dyn FnOnce(TcpStream, Vec<u8>) + Send + 'static>;

/// What a handler wants done after one request.
pub enum Outcome {
    /// Write the message, then wait for the next request on the connection.
    Reply(Message),
    /// Write the message, then close the connection.
    ReplyAndClose(Message),
    /// Write nothing and wait for the next message (e.g. one chunk of a
    /// streamed file).
    Silent,
    /// Close the connection without a reply.
    Close,
    /// Answer later: the connection waits in the gate, holding no worker,
    /// until the park's key is woken through the service's [`Parking`]
    /// or its deadline passes; then [`Service::resume`] runs on a worker.
    /// Bytes the peer sends meanwhile wait in the connection's buffer
    /// (replies stay in order); the peer closing ends it as usual. The
    /// idle timeout and message deadline do not run while it is parked.
    Park(Park),
    /// Escape hatch for links that need the raw socket: the closure runs on
    /// the worker thread with the stream (blocking, timeouts cleared) and
    /// the bytes already read past the request (a pipelined next message).
    /// The worker is busy until it returns; it must bound its own I/O with
    /// timeouts. When it returns, the connection is over and
    /// [`Service::close`] is called.
    ///
    /// This is the one way a peer can hold a worker, so it is bounded to
    /// links whose peer has already proved who it is. No link uses it
    /// today: file transfers stream as ordinary messages (each chunk a
    /// whole message under the session's file limits, answered
    /// [`Outcome::Silent`]), so they too wait in the gate between chunks.
    Takeover(TakeoverFn),
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reply(m) => f.debug_tuple("Reply").field(m).finish(),
            Outcome::ReplyAndClose(m) => f.debug_tuple("ReplyAndClose").field(m).finish(),
            Outcome::Silent => f.write_str("Silent"),
            Outcome::Close => f.write_str("Close"),
            Outcome::Park(p) => f.debug_tuple("Park").field(p).finish(),
            Outcome::Takeover(_) => f.write_str("Takeover(..)"),
        }
    }
}

/// The protocol logic of one listener, shared by every worker.
///
/// A panic in any method drops the connection being served (without
/// [`Service::close`]: the session is dropped during unwinding) and the
/// worker thread is replaced, so the pool keeps its size.
pub trait Service: Send + Sync + 'static {
    /// Per-connection state, e.g. sealed-link keys or login state.
    type Session: Send;

    /// A connection was accepted; make its session.
    fn open(&self, peer: &Peer) -> Self::Session;

    /// As [`Service::open`], with the handle that writes on the connection,
    /// for a service that pushes on held links (the default ignores it).
    fn open_with(&self, peer: &Peer, _out: &Outbound) -> Self::Session {
        self.open(peer)
    }

    /// One request arrived; say what to do about it.
    fn handle(&self, session: &mut Self::Session, request: Message) -> Outcome;

    /// The connection ended (cleanly, on an error, on a timeout or at
    /// shutdown), e.g. to log a user out.
    fn close(&self, _session: Self::Session) {}

    /// A connection parked by [`Outcome::Park`] is back: its key was
    /// woken (`woken`), or its deadline passed. Answer, park again, or
    /// close. The default closes: a service that never parks is never
    /// resumed.
    fn resume(&self, _session: &mut Self::Session, _woken: bool) -> Outcome {
        Outcome::Close
    }

    /// The wake-ups of the connections this service parks, if it parks
    /// any: the server attaches its gate to them when it starts.
    fn parking(&self) -> Option<Parking> {
        None
    }

    /// The limits for the next message of this session; `None` (the
    /// default) means [`Config::limits`]. A session that has agreed to a
    /// file transfer may return e.g. `Some(config_limits.for_files())`.
    fn limits(&self, _session: &Self::Session) -> Option<Limits> {
        None
    }

    /// Whether this session is a held link (e.g. a logged-in client's
    /// connection to its MS) that stays open while silent: the idle
    /// timeout does not apply to it; its own keepalives decide liveness.
    /// The default, `false`, closes it after [`Config::idle_timeout`].
    fn held(&self, _session: &Self::Session) -> bool {
        false
    }
}

/// How a [`Server`] runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Thread name prefix: workers are `{name}-w{i}`, the acceptor
    /// `{name}-acc`. Keep it short: Linux shows 15 bytes of a thread name.
    pub name: String,
    /// Worker threads, spawned at start and kept at this number. At least 1.
    pub workers: usize,
    /// Whole requests that may wait for a worker; a request beyond that is
    /// answered `503 busy` and its connection closed, so that a burst
    /// cannot build an unbounded backlog of work.
    pub queue: usize,
    /// Connections open at once (held by the gate or served by a worker);
    /// beyond that a new connection gets `503 busy` at once. Each costs a
    /// file descriptor, so the default is sized from the open-files limit.
    pub max_connections: usize,
    /// Connections open at once from one source address; beyond that a new
    /// one from that address gets `503 busy`.
    pub max_per_source: usize,
    /// Time a message has to arrive in full once it is due: the first
    /// message of a connection from the accept, later ones from their
    /// first byte. A slow sender is closed when it passes.
    pub message_deadline: Duration,
    /// How long a connection may stay silent between messages, unless its
    /// session is held (see [`Service::held`]).
    pub idle_timeout: Duration,
    /// Time a reply has to be written in full; a peer that stops reading
    /// cannot hold a worker longer.
    pub write_deadline: Duration,
    /// After [`Stopper::stop`], how long requests in flight may take before
    /// their sockets are shut down under them.
    pub shutdown_grace: Duration,
    /// Message limits, unless [`Service::limits`] says otherwise.
    pub limits: Limits,
}

impl Default for Config {
    /// Twice the CPUs in workers (4..=64), 256 requests waiting per
    /// worker, connections from the open-files limit (raised to its hard
    /// limit, less [`FD_RESERVE`]), [`MAX_PER_SOURCE`] per source, 10 s per
    /// message, 30 s idle, 10 s per reply and 5 s of grace.
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let workers = (2 * cpus).clamp(4, 64);
        let files = raise_open_files_limit();
        let max_connections = usize::try_from(files.saturating_sub(FD_RESERVE))
            .unwrap_or(usize::MAX)
            .max(1);
        Config {
            name: "ims".to_owned(),
            workers,
            queue: 256 * workers,
            max_connections,
            max_per_source: MAX_PER_SOURCE,
            message_deadline: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_deadline: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            limits: Limits::DEFAULT,
        }
    }
}
