//! The pre-threaded server pool behind every listener (CRS, MS, client).
//!
//! One acceptor thread blocks in `accept()` and hands each connection to a
//! fixed pool of named worker threads through a bounded channel. Nothing is
//! spawned per connection and nothing queues without bound: when the queue
//! is full the acceptor answers `503 busy` without blocking and closes.
//!
//! A worker serves one connection at a time: it calls [`Service::open`],
//! then reads one message at a time under an absolute deadline, passes it to
//! [`Service::handle`] and acts on the [`Outcome`], until the peer closes,
//! errs, times out or the server stops; then [`Service::close`].
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

mod server;
mod signals;
mod stats;
mod worker;

use std::fmt;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::wire::{Limits, Message};

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
    /// Escape hatch for links that need the raw socket: the closure runs on
    /// the worker thread with the stream (blocking, timeouts cleared) and
    /// the bytes already read past the request (a pipelined next message).
    /// The worker is busy until it returns; it must bound its own I/O with
    /// timeouts. When it returns, the connection is over and
    /// [`Service::close`] is called.
    Takeover(TakeoverFn),
}

impl fmt::Debug for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Reply(m) => f.debug_tuple("Reply").field(m).finish(),
            Outcome::ReplyAndClose(m) => f.debug_tuple("ReplyAndClose").field(m).finish(),
            Outcome::Silent => f.write_str("Silent"),
            Outcome::Close => f.write_str("Close"),
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

    /// A connection was handed to a worker; make its session.
    fn open(&self, peer: &Peer) -> Self::Session;

    /// One request arrived; say what to do about it.
    fn handle(&self, session: &mut Self::Session, request: Message) -> Outcome;

    /// The connection ended (cleanly, on an error, on a timeout or at
    /// shutdown), e.g. to log a user out.
    fn close(&self, _session: Self::Session) {}

    /// The limits for the next message of this session; `None` (the
    /// default) means [`Config::limits`]. A session that has agreed to a
    /// file transfer may return e.g. `Some(config_limits.for_files())`.
    fn limits(&self, _session: &Self::Session) -> Option<Limits> {
        None
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
    /// Accepted connections that may wait for a worker; beyond that the
    /// acceptor answers `503 busy`. 0 means a connection is accepted only
    /// when a worker is idle and waiting.
    pub queue: usize,
    /// Time a message has to arrive in full once it is due: the first
    /// message of a connection from when a worker picks it up, later ones
    /// from their first byte.
    pub message_deadline: Duration,
    /// How long a connection may stay silent between messages.
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
    /// Twice the CPUs in workers (4..=64), a queue of four per worker,
    /// 10 s per message, 30 s idle, 10 s per reply and 5 s of grace.
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let workers = (2 * cpus).clamp(4, 64);
        Config {
            name: "ims".to_owned(),
            workers,
            queue: 4 * workers,
            message_deadline: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_deadline: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            limits: Limits::DEFAULT,
        }
    }
}
