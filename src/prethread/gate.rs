//! The gate: one thread that holds every connection between messages.
//!
//! Connections wait here, registered with a readiness poller (`mio`, edge
//! triggered), not on a worker. When a socket becomes readable the gate
//! reads what is there without blocking into that connection's buffer and
//! runs the no-I/O parser on it; only a whole message is handed to a
//! worker, together with its connection. The worker writes the reply and
//! sends the connection back. So a peer that is silent or sends a byte a
//! second costs a buffer and a poller entry, never a thread.
//!
//! The gate also enforces the time limits of waiting connections: the
//! first message is due `message_deadline` after the accept, every later
//! one `message_deadline` after its first byte, and a connection silent
//! between messages is closed after `idle_timeout` unless its session is
//! held (see [`Service::held`]). It scans for these every [`TICK`], which
//! is also how precise they are.
//!
//! A connection whose handler parked it ([`Outcome::Park`]) waits here
//! too, for a wake-up of its key or its deadline; then it goes to a worker
//! to be resumed. Its timers do not run meanwhile, and bytes it receives
//! are buffered, not handed on, until it has been answered.
//!
//! [`Outcome::Park`]: super::Outcome::Park
//!
//! Anything that may block or take time (a handler, `Service::close`, a
//! `408` to a slow peer) runs on a worker: the gate only reads and parses.

use std::collections::{HashMap, HashSet};
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::inbuf::InBuf;
use super::outbound::Outbound;
use super::park::{Mailbox, Park, Parking};
use super::server::{refuse, Shared};
use super::stats::Counters;
use super::{Peer, Service};
use crate::wire::{parse, Limits, Message, Status};

/// How often the gate checks the deadlines of the connections it holds:
/// the precision of every time limit. A scan costs about 10 ns per held
/// connection, so 100,000 connections cost 1 ms every tick.
pub(crate) const TICK: Duration = Duration::from_millis(100);

/// Size of one nonblocking read into a connection's buffer. Only what was
/// read is kept, so an idle connection holds no buffer at all.
const READ_CHUNK: usize = 16 * 1024;

/// Readiness events handled per poll; more simply wait for the next one.
const EVENTS: usize = 1024;

/// The token of the waker: connections use their id, which never is 0.
pub(crate) const WAKER: Token = Token(0);

/// One connection and everything it carries between messages.
pub(crate) struct Conn<S: Service> {
    /// Its token in the poller; ids are never reused, so a late event for
    /// a closed connection cannot reach a new one.
    pub id: usize,
    /// Shared with `out`: the gate reads it, replies and pushes write it.
    pub stream: Arc<TcpStream>,
    /// Where replies and pushes are written.
    pub out: Outbound,
    pub peer: Peer,
    /// Bytes read and not yet parsed into a message.
    pub buf: InBuf,
    pub session: S::Session,
    /// Requests handled so far.
    pub requests: u64,
    /// When it was accepted, or last came back from a worker: the start of
    /// the first message's deadline, or of the idle time.
    pub since: Instant,
    /// When the first byte of the message being read arrived.
    pub first_byte: Option<Instant>,
    /// The peer has closed its sending half.
    pub eof: bool,
    /// The last read found the socket empty (it stopped at `WouldBlock`,
    /// or at a read shorter than asked; not at the buffer's cap): nothing
    /// is left to read until a new readiness event.
    pub drained: bool,
    /// What the gate and the worker tell each other while the connection
    /// is with a worker ([`STIRRED`], [`RETURNED`]); see [`Conn::comes_back`].
    pub away: Arc<AtomicU8>,
    /// Set while the connection waits for a wake-up (a deferred reply).
    pub park: Option<Park>,
    /// Counts the connection against the server's and its source's limits
    /// until it is dropped.
    pub _ticket: super::server::Ticket,
}

/// Set in [`Conn::away`] by the gate: the socket became readable while a
/// worker had the connection (edge triggered: there will be no second
/// event for those bytes).
pub(crate) const STIRRED: u8 = 1;
/// Set in [`Conn::away`] by the worker once the connection is on its way
/// back to the gate.
pub(crate) const RETURNED: u8 = 2;

impl<S: Service> Conn<S> {
    /// Whether the gate must look at this connection as soon as it is back
    /// (so the worker wakes it): it is parked, has unparsed bytes, its last
    /// read stopped at the buffer's cap, or its peer closed. Otherwise it
    /// can wait in the gate's queue until the gate next wakes, which it
    /// does for the connection's next bytes anyway: the gate's wake-up for
    /// every reply written was a system call and a context switch per
    /// request for nothing.
    pub(crate) fn comes_back(&self) -> bool {
        self.park.is_some() || !self.drained || !self.buf.is_empty() || self.eof
    }
}

/// Why a connection ended, for the debug log and for what to send last.
#[derive(Debug)]
pub(crate) enum End {
    /// The peer closed between messages.
    PeerClosed,
    /// The handler asked to close.
    Closed,
    /// The server is stopping.
    Stopped,
    /// Silent between messages for longer than `idle_timeout`.
    Idle,
    /// A message did not arrive in full by its deadline.
    ReadTimeout,
    /// A reply could not be written by its deadline.
    WriteTimeout,
    /// Too many requests were waiting for a worker.
    Busy,
    /// The peer sent bytes that are not a message.
    Malformed(crate::wire::Error),
    /// The socket failed.
    Io(io::Error),
    /// A handler took the socket over.
    TakenOver,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::PeerClosed => f.write_str("peer closed"),
            End::Closed => f.write_str("closed by handler"),
            End::Stopped => f.write_str("server stopping"),
            End::Idle => f.write_str("idle timeout"),
            End::ReadTimeout => f.write_str("message deadline passed"),
            End::WriteTimeout => f.write_str("write deadline passed"),
            End::Busy => f.write_str("busy"),
            End::Malformed(e) => write!(f, "malformed message: {e}"),
            End::Io(e) => write!(f, "i/o error: {e}"),
            End::TakenOver => f.write_str("taken over"),
        }
    }
}

/// Work for a worker.
pub(crate) enum Job<S: Service> {
    /// Handle this whole message of this connection.
    Request(Box<Conn<S>>, Message),
    /// End this connection: a last reply if `end` calls for one, then
    /// [`Service::close`].
    End(Box<Conn<S>>, End),
    /// Resume this parked connection ([`Service::resume`]); `true` when
    /// its key was woken, `false` when its deadline passed.
    Resume(Box<Conn<S>>, bool),
}

/// What the acceptor and the workers tell the gate.
pub(crate) enum Back<S: Service> {
    /// A newly accepted connection.
    New(TcpStream, super::server::Ticket),
    /// A connection whose reply is written; hold it until its next message.
    Return(Box<Conn<S>>),
    /// The connection with this id, handed to a worker, has ended there.
    Done(usize),
}

/// The gate thread's loop; returns once the server is stopped and no
/// connection is left with a worker.
pub(crate) fn gate_loop<S: Service>(
    mut poll: Poll,
    back: Receiver<Back<S>>,
    jobs: Sender<Job<S>>,
    shared: Arc<Shared<S>>,
) {
    // Wake-ups of the connections the service parks come to this gate
    // for as long as it runs.
    let parking = shared.service.parking().map(|parking| {
        let mailbox = parking.attach(Arc::clone(&shared.waker));
        (parking, mailbox)
    });
    let mut gate = Gate {
        conns: HashMap::new(),
        away: HashMap::new(),
        parked: HashMap::new(),
        next_id: 1,
        out: 0,
        jobs,
        shared,
        parking,
    };
    let mut events = Events::with_capacity(EVENTS);
    let mut last_scan = Instant::now();
    let mut stopping = false;
    loop {
        if let Err(e) = poll.poll(&mut events, Some(TICK)) {
            if e.kind() != ErrorKind::Interrupted {
                warn!("{}: poll failed: {e}", gate.shared.config.name);
                std::thread::sleep(TICK);
            }
        }
        for event in events.iter() {
            if event.token() != WAKER {
                // A short read may be trusted to have emptied the socket
                // unless the peer's close or an error came with this event
                // (there will be no later event for those).
                let short_ends = !event.is_read_closed() && !event.is_error();
                gate.read_ready(event.token().0, short_ends);
            }
        }
        while let Ok(msg) = back.try_recv() {
            match msg {
                Back::New(stream, ticket) => gate.admit(&poll, stream, ticket),
                Back::Return(conn) => {
                    gate.out = gate.out.saturating_sub(1);
                    let id = conn.id;
                    gate.away.remove(&id);
                    // Read again only if something may be there: bytes
                    // came while the worker had it (their edge was seen
                    // here), or one of [`Conn::comes_back`]'s reasons (a
                    // read that finds nothing is a system call for
                    // nothing, on every request).
                    let look =
                        conn.away.swap(0, Ordering::AcqRel) & STIRRED != 0 || conn.comes_back();
                    let woken = gate.hold(conn);
                    if woken {
                        // Woken on its way here: answer at once.
                        gate.resume(id, true);
                    } else if look {
                        gate.readable(id);
                    }
                }
                Back::Done(id) => {
                    gate.out = gate.out.saturating_sub(1);
                    gate.away.remove(&id);
                }
            }
        }
        gate.wake_parked();
        if gate.shared.stopper.is_stopped() {
            if !stopping {
                stopping = true;
                debug!(
                    "{}: gate closing {} held connections",
                    gate.shared.config.name,
                    gate.conns.len()
                );
            }
            let ids: Vec<usize> = gate.conns.keys().copied().collect();
            for id in ids {
                gate.end(id, End::Stopped);
            }
            if gate.out == 0 {
                break;
            }
            // Wait for the workers to send back or finish what they hold.
            match back.recv_timeout(TICK) {
                Ok(Back::New(stream, _ticket)) => refuse(stream, &gate.shared.shutting_down),
                Ok(Back::Return(conn)) => {
                    gate.out = gate.out.saturating_sub(1);
                    gate.away.remove(&conn.id);
                    gate.hold(conn);
                }
                Ok(Back::Done(id)) => {
                    gate.out = gate.out.saturating_sub(1);
                    gate.away.remove(&id);
                }
                Err(_) => {}
            }
            continue;
        }
        if last_scan.elapsed() >= TICK {
            last_scan = Instant::now();
            gate.scan(last_scan);
        }
    }
    gate.shared.counters.held.store(0, Ordering::Relaxed);
    gate.shared.counters.parked.store(0, Ordering::Relaxed);
    if let Some((parking, mailbox)) = &gate.parking {
        parking.detach(mailbox);
    }
}

struct Gate<S: Service> {
    /// Every connection held here, parked ones included.
    conns: HashMap<usize, Box<Conn<S>>>,
    /// The connections with a worker, and what the gate and the worker
    /// tell each other meanwhile (see [`STIRRED`]).
    away: HashMap<usize, Arc<AtomicU8>>,
    /// The parked connections by key.
    parked: HashMap<u64, HashSet<usize>>,
    next_id: usize,
    /// Connections handed to workers and not yet back or done.
    out: usize,
    jobs: Sender<Job<S>>,
    shared: Arc<Shared<S>>,
    /// The service's wake-ups and this gate's mailbox in them.
    parking: Option<(Parking, Arc<Mailbox>)>,
}

impl<S: Service> Gate<S> {
    /// Holds a connection back from a worker; parks it if its handler
    /// asked to. Returns whether it is parked and was already woken.
    fn hold(&mut self, conn: Box<Conn<S>>) -> bool {
        let id = conn.id;
        let woken = match &conn.park {
            Some(park) => {
                self.parked.entry(park.key()).or_default().insert(id);
                self.shared.counters.parked.fetch_add(1, Ordering::Relaxed);
                // A service that parks without wake-ups only has deadlines.
                self.parking
                    .as_ref()
                    .is_some_and(|(parking, _)| parking.woken(park))
            }
            None => false,
        };
        self.conns.insert(id, conn);
        self.shared.counters.held.fetch_add(1, Ordering::Relaxed);
        woken
    }

    /// Takes a connection out of the gate (to a worker).
    fn take(&mut self, id: usize) -> Option<Box<Conn<S>>> {
        let mut conn = self.conns.remove(&id)?;
        conn.away.store(0, Ordering::Release);
        self.away.insert(id, Arc::clone(&conn.away));
        self.shared.counters.held.fetch_sub(1, Ordering::Relaxed);
        if let Some(park) = conn.park.take() {
            self.shared.counters.parked.fetch_sub(1, Ordering::Relaxed);
            if let Some(ids) = self.parked.get_mut(&park.key()) {
                ids.remove(&id);
                if ids.is_empty() {
                    self.parked.remove(&park.key());
                }
            }
        }
        Some(conn)
    }

    /// Hands a parked connection to a worker to be resumed.
    fn resume(&mut self, id: usize, woken: bool) {
        if let Some(conn) = self.take(id) {
            // Not counted against the queue: it is the answer owed to a
            // request already taken.
            self.send(Job::Resume(conn, woken));
        }
    }

    /// Resumes the parked connections whose keys were woken.
    fn wake_parked(&mut self) {
        let Some((_, mailbox)) = &self.parking else {
            return;
        };
        let pending = mailbox.take();
        let ids: Vec<usize> = if pending.everyone {
            self.parked.values().flatten().copied().collect()
        } else {
            pending
                .keys
                .iter()
                .filter_map(|key| self.parked.get(key))
                .flatten()
                .copied()
                .collect()
        };
        for id in ids {
            self.resume(id, true);
        }
    }

    /// Registers a new connection and opens its session.
    fn admit(&mut self, poll: &Poll, stream: TcpStream, ticket: super::server::Ticket) {
        let peer = match (stream.peer_addr(), stream.local_addr()) {
            (Ok(remote), Ok(local)) => Peer { remote, local },
            // Already reset by the peer: nothing to serve.
            _ => return,
        };
        // Replies are written whole in one call; don't let Nagle delay them.
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let id = self.next_id;
        // Ids are never reused within a run; WAKER's 0 is skipped.
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let fd = stream.as_raw_fd();
        if let Err(e) = poll
            .registry()
            .register(&mut SourceFd(&fd), Token(id), Interest::READABLE)
        {
            warn!(
                "{}: cannot watch a connection: {e}",
                self.shared.config.name
            );
            return;
        }
        let stream = Arc::new(stream);
        let out = Outbound::new(Arc::clone(&stream), self.shared.config.write_deadline);
        let session = self.shared.service.open_with(&peer, &out);
        self.conns.insert(
            id,
            Box::new(Conn {
                id,
                stream,
                out,
                peer,
                buf: InBuf::default(),
                session,
                requests: 0,
                since: Instant::now(),
                first_byte: None,
                eof: false,
                drained: false,
                away: Arc::default(),
                park: None,
                _ticket: ticket,
            }),
        );
        self.shared.counters.held.fetch_add(1, Ordering::Relaxed);
        // Bytes may already be there (edge triggered: no event for them).
        self.readable(id);
    }

    /// Reads what connection `id` has without blocking; hands it on if a
    /// message is whole, the peer closed, or it broke a rule.
    fn readable(&mut self, id: usize) {
        self.read_ready(id, false);
    }

    /// As [`Gate::readable`]; with `short_ends`, a read shorter than asked
    /// ends the reading (the socket is empty, and what arrives later raises
    /// a new event, edge triggered) instead of a further read that would
    /// only find `WouldBlock`: a system call per message saved.
    fn read_ready(&mut self, id: usize, short_ends: bool) {
        let Some(conn) = self.conns.get_mut(&id) else {
            // With a worker: read when it comes back. If the worker has
            // already sent it back quietly, it is in the queue this loop
            // drains next; if not, the worker sees the mark and wakes us.
            if let Some(away) = self.away.get(&id) {
                away.fetch_or(STIRRED, Ordering::AcqRel);
            }
            return;
        };
        let limits = self
            .shared
            .service
            .limits(&conn.session)
            .unwrap_or(self.shared.config.limits);
        let cap = buffer_cap(&limits);
        let mut chunk = [0u8; READ_CHUNK];
        let mut failed = None;
        conn.drained = false;
        while conn.buf.len() < cap && !conn.eof {
            let want = (cap - conn.buf.len()).min(READ_CHUNK);
            match (&*conn.stream).read(&mut chunk[..want]) {
                Ok(0) => conn.eof = true,
                Ok(n) => {
                    if conn.buf.is_empty() {
                        conn.first_byte = Some(Instant::now());
                    }
                    conn.buf.extend(&chunk[..n]);
                    if short_ends && n < want {
                        conn.drained = true;
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    conn.drained = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            self.end(id, End::Io(e));
            return;
        }
        if conn.park.is_some() {
            // Owed an answer first: whatever came waits in the buffer.
            if conn.eof {
                self.end(id, End::PeerClosed);
            }
            return;
        }
        match next_message(&mut conn.buf, &limits) {
            Ok(Some(message)) => self.dispatch(id, message),
            Ok(None) if conn.eof => self.end(id, End::PeerClosed),
            Ok(None) => {}
            Err(e) => self.end(id, End::Malformed(e)),
        }
    }

    /// Hands a whole message to the workers, or refuses it when too many
    /// are already waiting.
    fn dispatch(&mut self, id: usize, message: Message) {
        let Some(conn) = self.take(id) else {
            return;
        };
        let queue = self.shared.config.queue;
        let waiting = self
            .shared
            .counters
            .requests_waiting
            .load(Ordering::Relaxed);
        if waiting >= queue.max(1) && queue < usize::MAX {
            Counters::bump(&self.shared.counters.rejected_busy);
            // Answered here, at once: a worker may not be free for long.
            conn.out.detach();
            refuse_on(&conn.stream, &self.shared.busy);
            self.send(Job::End(conn, End::Busy));
            return;
        }
        // The worker restarts the clock of any bytes it leaves over.
        self.send(Job::Request(conn, message));
    }

    /// Ends a held connection on a worker.
    fn end(&mut self, id: usize, end: End) {
        if let Some(conn) = self.take(id) {
            self.send(Job::End(conn, end));
        }
    }

    fn send(&mut self, job: Job<S>) {
        // The workers' receiver lives as long as the server: never fails
        // before the gate itself is gone.
        let request = !matches!(job, Job::End(..));
        if request {
            // Counted before the send: the worker's decrement cannot come
            // first.
            self.shared
                .counters
                .requests_waiting
                .fetch_add(1, Ordering::Relaxed);
        }
        if self.jobs.send(job).is_ok() {
            self.out += 1;
            self.shared.counters.queued.fetch_add(1, Ordering::Relaxed);
        } else if request {
            self.shared
                .counters
                .requests_waiting
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Closes connections whose message or idle time is up, and resumes
    /// parked ones whose deadline passed.
    fn scan(&mut self, now: Instant) {
        let config = &self.shared.config;
        let mut due = Vec::new();
        let mut expired = Vec::new();
        for (id, conn) in &self.conns {
            if let Some(park) = &conn.park {
                if now >= park.until() {
                    expired.push(*id);
                }
            } else if let Some(first) = conn.first_byte {
                if now.saturating_duration_since(first) >= config.message_deadline {
                    due.push((*id, true));
                }
            } else if conn.requests == 0 {
                if now.saturating_duration_since(conn.since) >= config.message_deadline {
                    due.push((*id, true));
                }
            } else if !self.shared.service.held(&conn.session)
                && now.saturating_duration_since(conn.since) >= config.idle_timeout
            {
                due.push((*id, false));
            }
        }
        for (id, late) in due {
            Counters::bump(&self.shared.counters.timed_out);
            self.end(id, if late { End::ReadTimeout } else { End::Idle });
        }
        for id in expired {
            self.resume(id, false);
        }
    }
}

/// One nonblocking write of a short refusal and the end of our sending
/// half; never waits on the peer.
pub(crate) fn refuse_on(stream: &TcpStream, reply: &[u8]) {
    if stream.set_nonblocking(true).is_ok() {
        let _ = (&*stream).write(reply);
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

/// Most bytes buffered for one connection: one whole message at the
/// session's limits (a pipelined burst is read in parts of this size).
pub(crate) fn buffer_cap(limits: &Limits) -> usize {
    limits
        .max_header_bytes
        .saturating_add(limits.max_body)
        .saturating_add(2)
}

/// Takes one whole message off the front of `buf`, if there is one.
pub(crate) fn next_message(
    buf: &mut InBuf,
    limits: &Limits,
) -> Result<Option<Message>, crate::wire::Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    match parse(buf.unread(), limits)? {
        Status::Incomplete => Ok(None),
        Status::Complete { message, used } => {
            buf.consume(used);
            Ok(Some(message))
        }
    }
}
