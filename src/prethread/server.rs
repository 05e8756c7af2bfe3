//! The server: binding, the acceptor thread, stopping and joining.
//!
//! The acceptor blocks in `accept()`, checks the connection against the
//! limits (connections held, connections per source address) and hands it
//! to the gate (see `gate`), which holds it until a whole message has
//! arrived. A refused connection gets `503 busy` at once and each source
//! is named in the log at most once a minute, so that a flood cannot flood
//! the log. [`Stopper::stop`] wakes the acceptor by connecting to the
//! listener; the gate then ends every connection it holds and waits for
//! the workers to give back theirs; the acceptor waits up to the grace
//! period for the requests in flight and shuts down the sockets of any
//! still running so that no peer can delay the stop.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{info, warn};
use mio::unix::SourceFd;
use mio::{Poll, Registry, Waker};
use parking_lot::Mutex;

use super::gate::{gate_loop, Back, Job, WAKER};
use super::stats::{Counters, Stats, StatsSource};
use super::worker::spawn_worker;
use super::{Config, Service};
use crate::wire::{code, Message};

/// How long [`Stopper::stop`] tries to connect to the listener to wake the
/// acceptor; past that the acceptor stops at its next connection anyway.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often the acceptor checks, during the grace period, whether every
/// worker has finished.
const GRACE_POLL: Duration = Duration::from_millis(10);

/// Pause after an `accept()` error such as EMFILE, so that a persistent
/// error does not spin the acceptor.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A refused source is named in the log at most this often, so that a
/// flood of connections costs one log line a minute, not one each.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Sources remembered for [`REFUSAL_LOG_EVERY`]; past this many the old
/// entries are dropped (a spoofed spread of sources cannot grow it).
const REFUSAL_LOG_SOURCES: usize = 4096;

/// The stop flag and how to wake the acceptor; shared by every [`Stopper`].
#[derive(Debug)]
struct StopState {
    name: String,
    stopped: AtomicBool,
    /// Where to connect to wake a blocked `accept()`.
    wake: SocketAddr,
}

/// A handle that stops a [`Server`]; clone it freely, e.g. into a signal
/// thread or a handler.
#[derive(Clone, Debug)]
pub struct Stopper {
    state: Arc<StopState>,
}

impl Stopper {
    /// Asks the server to stop: no new connections, requests in flight
    /// finish within the grace period, idle connections are closed.
    /// Returns at once (after at most a short loopback connect); call
    /// [`Server::join`] to wait. Calling it again does nothing.
    pub fn stop(&self) {
        if self.state.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        info!("{}: stopping", self.state.name);
        // A blocked accept() returns only for a connection: make one.
        if let Err(e) = TcpStream::connect_timeout(&self.state.wake, WAKE_TIMEOUT) {
            warn!(
                "{}: could not wake the acceptor ({e}); it stops at its next connection",
                self.state.name
            );
        }
    }

    /// Whether [`Stopper::stop`] has been called.
    pub fn is_stopped(&self) -> bool {
        self.state.stopped.load(Ordering::SeqCst)
    }
}

/// State shared by the acceptor and the workers of one server.
pub(crate) struct Shared<S: Service> {
    pub config: Config,
    pub service: Arc<S>,
    /// Jobs from the gate.
    pub rx: Receiver<Job<S>>,
    /// To the gate: new connections, connections to hold again, ends.
    pub back: Sender<Back<S>>,
    /// Wakes the gate's poll when something is sent on `back` (and, for
    /// a service that parks connections, on a wake-up).
    pub waker: Arc<Waker>,
    /// The gate's poller, to stop watching a connection that ends or is
    /// taken over.
    pub registry: Registry,
    /// Connections open, per source address, for the per-source limit.
    pub sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    pub stopper: Stopper,
    pub counters: Arc<Counters>,
    /// Every worker thread ever spawned and not yet joined, replacements
    /// included; [`Server::join`] empties it.
    pub handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Per worker, the socket it is serving (shared, not duplicated: a
    /// `dup` and a `close` per request would cost two system calls), so
    /// that the acceptor can shut it down when the grace period is over.
    pub slots: Vec<Mutex<Option<Arc<TcpStream>>>>,
    /// Worker threads alive; the acceptor waits for 0 after a stop.
    pub live_workers: AtomicUsize,
    /// The encoded `503` sent to connections refused by a worker after stop.
    pub shutting_down: Vec<u8>,
    /// The encoded `503` sent when too many requests wait for a worker.
    pub busy: Vec<u8>,
}

impl<S: Service> Shared<S> {
    /// Sends to the gate and wakes it.
    pub fn send_back(&self, msg: Back<S>) {
        if self.back.send(msg).is_ok() {
            self.wake_gate();
        }
    }

    /// Sends to the gate without waking it: it takes the message when it
    /// next wakes (see [`super::gate::Conn::comes_back`]).
    pub fn send_back_quietly(&self, msg: Back<S>) {
        let _ = self.back.send(msg);
    }

    /// Wakes the gate.
    pub fn wake_gate(&self) {
        if let Err(e) = self.waker.wake() {
            warn!("{}: cannot wake the gate: {e}", self.config.name);
        }
    }

    /// Stops watching a connection (it ends, or a handler takes it).
    pub fn unwatch(&self, stream: &TcpStream) {
        let fd = stream.as_raw_fd();
        let _ = self.registry.deregister(&mut SourceFd(&fd));
    }
}

/// Counts one open connection against its source and the server's total
/// until dropped, wherever the connection ends.
pub(crate) struct Ticket {
    source: IpAddr,
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    counters: Arc<Counters>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut sources = self.sources.lock();
        if let Some(n) = sources.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                sources.remove(&self.source);
            }
        }
        drop(sources);
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running pre-threaded server. Dropping it stops it and waits for its
/// threads, like [`Server::stop_and_join`].
pub struct Server {
    local_addr: SocketAddr,
    stopper: Stopper,
    counters: Arc<Counters>,
    acceptor: Option<JoinHandle<()>>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and starts the acceptor and
    /// `config.workers` workers.
    pub fn bind<S: Service>(
        addr: impl ToSocketAddrs,
        config: Config,
        service: Arc<S>,
    ) -> io::Result<Server> {
        Server::from_listener(TcpListener::bind(addr)?, config, service)
    }

    /// Starts on an already bound listener (e.g. from socket activation).
    pub fn from_listener<S: Service>(
        listener: TcpListener,
        config: Config,
        service: Arc<S>,
    ) -> io::Result<Server> {
        if config.workers == 0 {
            return Err(io::Error::new(
                ErrorKind::InvalidInput,
                "workers must be at least 1",
            ));
        }
        // The acceptor relies on a blocking accept().
        listener.set_nonblocking(false)?;
        let local_addr = listener.local_addr()?;
        let stopper = Stopper {
            state: Arc::new(StopState {
                name: config.name.clone(),
                stopped: AtomicBool::new(false),
                wake: wake_addr(local_addr),
            }),
        };
        // Jobs are bounded by the connections held (one each at most);
        // `config.queue` bounds how many may wait (see the gate).
        let (tx, rx) = crossbeam_channel::unbounded();
        let (back, back_rx) = crossbeam_channel::unbounded();
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let registry = poll.registry().try_clone()?;
        let counters = Arc::new(Counters::default());
        let handles = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            slots: (0..config.workers).map(|_| Mutex::new(None)).collect(),
            config,
            service,
            rx,
            back,
            waker,
            registry,
            sources: Arc::new(Mutex::new(HashMap::new())),
            busy: Message::reply(code::BUSY, "busy").encode(),
            stopper: stopper.clone(),
            counters: Arc::clone(&counters),
            handles: Arc::clone(&handles),
            live_workers: AtomicUsize::new(0),
            shutting_down: Message::reply(code::BUSY, "shutting down").encode(),
        });
        let mut server = Server {
            local_addr,
            stopper,
            counters,
            acceptor: None,
            handles,
        };
        for i in 0..shared.config.workers {
            if let Err(e) = spawn_worker(&shared, i) {
                // Without a sender the started workers exit; then `server`
                // is dropped, which joins them.
                drop(tx);
                return Err(e);
            }
        }
        let gate_shared = Arc::clone(&shared);
        let gate = thread::Builder::new()
            .name(format!("{}-gate", shared.config.name))
            .spawn(move || gate_loop(poll, back_rx, tx, gate_shared))?;
        server.handles.lock().push(gate);
        let name = format!("{}-acc", shared.config.name);
        let workers = shared.config.workers;
        let acc_shared = Arc::clone(&shared);
        server.acceptor = Some(
            thread::Builder::new()
                .name(name)
                .spawn(move || accept_loop(listener, acc_shared))?,
        );
        info!(
            "{}: listening on {local_addr} with {workers} workers, up to {} connections ({} per source); open-files limit {}",
            shared.config.name,
            shared.config.max_connections,
            shared.config.max_per_source,
            super::raise_open_files_limit()
        );
        Ok(server)
    }

    /// The address the server listens on (with the real port if bound to 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.stats_source().snapshot()
    }

    /// A handle that reads the counters from another thread.
    pub fn stats_source(&self) -> StatsSource {
        StatsSource {
            counters: Arc::clone(&self.counters),
        }
    }

    /// A handle that stops the server.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Blocks until the server has been stopped (through a [`Stopper`])
    /// and every thread it started, replacements included, has ended.
    pub fn join(mut self) {
        self.join_threads();
    }

    /// Stops the server and waits for every thread: returns within about
    /// `shutdown_grace` unless a handler itself blocks longer.
    pub fn stop_and_join(self) {
        self.stopper.stop();
        self.join();
    }

    fn join_threads(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            if acceptor.join().is_err() {
                warn!("{}: the acceptor panicked", self.stopper.state.name);
            }
        }
        // A worker that panics pushes its replacement before it ends, so
        // popping until empty also joins replacements. The lock is not
        // held while joining.
        loop {
            let next = self.handles.lock().pop();
            match next {
                Some(handle) => {
                    // A panicked worker was already counted and replaced.
                    let _ = handle.join();
                }
                None => break,
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stopper.stop();
        self.join_threads();
    }
}

/// Where to connect to reach a listener on `local`: the loopback address
/// of the same family when it is bound to the unspecified address.
fn wake_addr(local: SocketAddr) -> SocketAddr {
    let ip = match local.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, local.port())
}

/// The acceptor thread: accept, hand over or refuse, and after a stop,
/// supervise the grace period.
fn accept_loop<S: Service>(listener: TcpListener, shared: Arc<Shared<S>>) {
    let name = &shared.config.name;
    let mut last_error_log: Option<Instant> = None;
    let mut refusals = RefusalLog::default();
    loop {
        match listener.accept() {
            Ok((stream, remote)) => {
                if shared.stopper.is_stopped() {
                    break;
                }
                Counters::bump(&shared.counters.accepted);
                match admit(&shared, remote.ip()) {
                    Ok(ticket) => shared.send_back(Back::New(stream, ticket)),
                    Err(why) => {
                        Counters::bump(&shared.counters.rejected_busy);
                        if refusals.should_log(remote.ip()) {
                            warn!(
                                "{name}: refusing connections from {}: {why} (logged once a minute per source)",
                                remote.ip()
                            );
                        }
                        refuse(stream, &shared.busy);
                    }
                }
            }
            Err(e) => {
                if shared.stopper.is_stopped() {
                    break;
                }
                match e.kind() {
                    // The peer gave up before we accepted: nothing to do.
                    ErrorKind::Interrupted
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::ConnectionReset => {}
                    // E.g. out of file descriptors: log once a second at
                    // most, and pause so that the error does not spin.
                    _ => {
                        if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            warn!("{name}: accept failed: {e}");
                            last_error_log = Some(Instant::now());
                        }
                        thread::sleep(ACCEPT_ERROR_PAUSE);
                    }
                }
            }
        }
    }
    // No new connections: close the listener (peers are refused from now
    // on) and let the workers see the end of the channel.
    drop(listener);
    // The gate has seen the stop flag; wake it so that it acts at once.
    let _ = shared.waker.wake();
    let grace_end = Instant::now() + shared.config.shutdown_grace;
    while shared.live_workers.load(Ordering::SeqCst) > 0 && Instant::now() < grace_end {
        thread::sleep(GRACE_POLL);
    }
    // Requests still in flight had their grace: pull the sockets from
    // under them so that blocked reads and writes return at once.
    let mut cut = 0;
    for slot in &shared.slots {
        if let Some(stream) = slot.lock().as_ref() {
            let _ = stream.shutdown(Shutdown::Both);
            cut += 1;
        }
    }
    if cut > 0 {
        warn!("{name}: grace period over, shut down {cut} connections in flight");
    }
    info!("{name}: stopped accepting");
}

/// Counts a new connection from `source`, or says which limit refuses it.
fn admit<S: Service>(shared: &Shared<S>, source: IpAddr) -> Result<Ticket, &'static str> {
    let config = &shared.config;
    let mut sources = shared.sources.lock();
    if shared.counters.open.load(Ordering::Relaxed) >= config.max_connections {
        return Err("connections held at the limit");
    }
    let n = sources.entry(source).or_insert(0);
    if *n >= config.max_per_source {
        return Err("connections from this source at the limit");
    }
    *n += 1;
    shared.counters.open.fetch_add(1, Ordering::Relaxed);
    Ok(Ticket {
        source,
        sources: Arc::clone(&shared.sources),
        counters: Arc::clone(&shared.counters),
    })
}

/// When each refused source was last named in the log.
#[derive(Default)]
struct RefusalLog {
    last: HashMap<IpAddr, Instant>,
}

impl RefusalLog {
    /// Whether a refusal of `source` should be logged now.
    fn should_log(&mut self, source: IpAddr) -> bool {
        let now = Instant::now();
        if self.last.len() >= REFUSAL_LOG_SOURCES {
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < REFUSAL_LOG_EVERY);
            if self.last.len() >= REFUSAL_LOG_SOURCES {
                self.last.clear();
            }
        }
        match self.last.get(&source) {
            Some(t) if now.saturating_duration_since(*t) < REFUSAL_LOG_EVERY => false,
            _ => {
                self.last.insert(source, now);
                true
            }
        }
    }
}

/// Refuses a connection without ever blocking: one nonblocking write of
/// `reply`, then close. The request the peer may have sent is read and
/// discarded first (as far as it has arrived) so that the close is a FIN,
/// not a reset that could destroy the reply before the peer reads it.
pub(crate) fn refuse(mut stream: TcpStream, reply: &[u8]) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let _ = stream.write(reply);
    let _ = stream.shutdown(Shutdown::Write);
    let mut sink = [0u8; 4096];
    for _ in 0..4 {
        match stream.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}
