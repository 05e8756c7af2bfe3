//! The worker threads: take a job from the gate, run it, take the next.
//!
//! A job is a whole message with its connection, a parked connection to
//! resume, or a connection to end.
//! A worker never waits for a peer to send: it runs the handler, writes
//! the reply under the write deadline, handles any whole messages that
//! were pipelined behind it, and sends the connection back to the gate.
//! A worker that panics is replaced by its [`Sentinel`].

use std::io::{self, ErrorKind, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, warn};

use super::gate::{next_message, refuse_on, Back, Conn, End, Job, RETURNED, STIRRED};
use super::outbound::Outbound;
use super::server::Shared;
use super::stats::Counters;
use super::{Outcome, Service};
use crate::wire::io::write_message;
use crate::wire::{code, Message};

/// Longest time spent writing a `408` to a peer that was too slow.
const TIMEOUT_REPLY_DEADLINE: Duration = Duration::from_secs(1);

/// Replies to pipelined requests wait, encoded, while the next request is
/// already in the read buffer, and go out together before the worker next
/// reads from the socket: one write for a burst of requests instead of one
/// each. At most this many bytes wait; a larger reply is written at once.
const MAX_HELD: usize = 64 * 1024;

/// After an error reply, how long to read and discard what the peer still
/// sends, and how much at most, so that closing does not reset the
/// connection and destroy the reply before the peer has read it.
const LINGER_TIME: Duration = Duration::from_millis(100);
const LINGER_BYTES: usize = 1024 * 1024;

/// Spawns worker number `index` and records its handle.
pub(crate) fn spawn_worker<S: Service>(shared: &Arc<Shared<S>>, index: usize) -> io::Result<()> {
    let name = format!("{}-w{index}", shared.config.name);
    let for_thread = Arc::clone(shared);
    // Counted before it runs so that the count never dips to 0 while a
    // panicked worker is being replaced.
    shared.live_workers.fetch_add(1, Ordering::SeqCst);
    match thread::Builder::new()
        .name(name)
        .spawn(move || worker_main(for_thread, index))
    {
        Ok(handle) => {
            shared.handles.lock().push(handle);
            Ok(())
        }
        Err(e) => {
            shared.live_workers.fetch_sub(1, Ordering::SeqCst);
            Err(e)
        }
    }
}

/// Lives on a worker's stack; when the worker unwinds from a panic, its
/// drop spawns a replacement so the pool keeps its size.
struct Sentinel<S: Service> {
    shared: Arc<Shared<S>>,
    index: usize,
}

impl<S: Service> Drop for Sentinel<S> {
    fn drop(&mut self) {
        if thread::panicking() {
            Counters::bump(&self.shared.counters.panicked);
            warn!(
                "{}: worker {} panicked; its connection is dropped and the worker replaced",
                self.shared.config.name, self.index
            );
            // Never panic here: a panic while panicking aborts.
            if let Err(e) = spawn_worker(&self.shared, self.index) {
                error!(
                    "{}: could not replace worker {}: {e}",
                    self.shared.config.name, self.index
                );
            }
        }
        self.shared.live_workers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A worker thread: serve connections until the channel is closed.
fn worker_main<S: Service>(shared: Arc<Shared<S>>, index: usize) {
    let sentinel = Sentinel {
        shared: Arc::clone(&shared),
        index,
    };
    while let Ok(job) = shared.rx.recv() {
        shared.counters.queued.fetch_sub(1, Ordering::Relaxed);
        if !matches!(job, Job::End(..)) {
            shared
                .counters
                .requests_waiting
                .fetch_sub(1, Ordering::Relaxed);
        }
        run_job(&shared, index, job);
    }
    drop(sentinel);
}

/// Counts a connection as active and keeps a clone of its socket in the
/// worker's slot while it is served; undone on drop, panics included.
struct ActiveGuard<'a, S: Service> {
    shared: &'a Shared<S>,
    index: usize,
}

impl<'a, S: Service> ActiveGuard<'a, S> {
    fn new(shared: &'a Shared<S>, index: usize, stream: &Arc<TcpStream>) -> Self {
        shared.counters.active.fetch_add(1, Ordering::Relaxed);
        *shared.slots[index].lock() = Some(Arc::clone(stream));
        ActiveGuard { shared, index }
    }
}

impl<S: Service> Drop for ActiveGuard<'_, S> {
    fn drop(&mut self) {
        self.shared.slots[self.index].lock().take();
        self.shared.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells the gate that a connection it handed out will not come back,
/// when dropped without being disarmed: also when a handler panics, so
/// that the gate's count of connections out stays right and a stop ends.
struct DoneGuard<'a, S: Service> {
    shared: &'a Shared<S>,
    /// The connection's id in the gate.
    id: usize,
    armed: bool,
}

impl<S: Service> Drop for DoneGuard<'_, S> {
    fn drop(&mut self) {
        if self.armed {
            // Nothing for the gate to do at once: it counts it when it
            // next wakes (while stopping, it waits on the queue itself).
            self.shared.send_back_quietly(Back::Done(self.id));
        }
    }
}

/// Runs one job: a request (and any whole requests pipelined behind it),
/// or the end of a connection.
fn run_job<S: Service>(shared: &Shared<S>, index: usize, job: Job<S>) {
    let id = match &job {
        Job::Request(conn, _) | Job::Resume(conn, _) | Job::End(conn, _) => conn.id,
    };
    let mut done = DoneGuard {
        shared,
        id,
        armed: true,
    };
    let (conn, step) = match job {
        Job::Request(conn, request) => (conn, Step::Request(request)),
        Job::Resume(conn, woken) => (conn, Step::Resume(woken)),
        Job::End(conn, end) => {
            finish(shared, conn, end);
            return;
        }
    };
    let _active = ActiveGuard::new(shared, index, &conn.stream);
    if let Some(mut conn) = converse(shared, conn, step) {
        let now = Instant::now();
        conn.since = now;
        // The clock of a message runs from its first byte: bytes left
        // over are the start of the next one, whose clock starts now (the
        // worker kept it meanwhile); none, none.
        conn.first_byte = (!conn.buf.is_empty()).then_some(now);
        done.armed = false;
        let away = Arc::clone(&conn.away);
        let urgent = conn.comes_back();
        shared.send_back_quietly(Back::Return(conn));
        // Marked after the send: a gate that sees the mark finds the
        // connection in its queue. A gate that marked it stirred first
        // may be asleep already, so it is woken.
        if away.fetch_or(RETURNED, Ordering::AcqRel) & STIRRED != 0 || urgent {
            shared.wake_gate();
        }
    }
}

/// What a worker is to do with a connection first.
enum Step {
    /// Handle this request.
    Request(Message),
    /// Resume the parked connection (woken, or its deadline passed).
    Resume(bool),
}

/// Handles a request (or resumes a parked connection) and then any whole
/// requests already buffered behind it. Returns the connection when it
/// should go back to the gate (parked or not), `None` when it has been
/// ended here.
fn converse<S: Service>(
    shared: &Shared<S>,
    mut conn: Box<Conn<S>>,
    mut step: Step,
) -> Option<Box<Conn<S>>> {
    let config = &shared.config;
    // Encoded replies held back while pipelined requests are buffered.
    let mut held: Vec<u8> = Vec::new();
    loop {
        let outcome = match step {
            Step::Request(request) => {
                conn.requests += 1;
                shared.service.handle(&mut conn.session, request)
            }
            Step::Resume(woken) => shared.service.resume(&mut conn.session, woken),
        };
        let (reply, close) = match outcome {
            Outcome::Reply(reply) => (Some(reply), false),
            Outcome::ReplyAndClose(reply) => (Some(reply), true),
            Outcome::Silent => (None, false),
            Outcome::Close => (None, true),
            Outcome::Park(park) => {
                // The replies before it go now; its own comes on resume,
                // and requests behind it wait in the buffer until then.
                if let Err(end) = write_held(&conn.out, &mut held, shared) {
                    finish(shared, conn, end);
                    return None;
                }
                conn.park = Some(park);
                return Some(conn);
            }
            Outcome::Takeover(take) => {
                if let Err(end) = write_held(&conn.out, &mut held, shared) {
                    finish(shared, conn, end);
                    return None;
                }
                conn.out.detach();
                shared.unwatch(&conn.stream);
                let stream = match conn.stream.try_clone() {
                    Ok(stream) => stream,
                    Err(e) => {
                        finish(shared, conn, End::Io(e));
                        return None;
                    }
                };
                let buffered = conn.buf.take();
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(None);
                let _ = stream.set_write_timeout(None);
                take(stream, buffered);
                finish(shared, conn, End::TakenOver);
                return None;
            }
        };
        let limits = shared
            .service
            .limits(&conn.session)
            .unwrap_or(config.limits);
        let next = if close {
            Ok(None)
        } else {
            next_message(&mut conn.buf, &limits)
        };
        if let Some(reply) = reply {
            let pipelined = matches!(next, Ok(Some(_)));
            if (pipelined || !held.is_empty()) && reply.body.len() < MAX_HELD {
                reply.encode_into(&mut held);
                if (!pipelined || held.len() >= MAX_HELD)
                    && write_held(&conn.out, &mut held, shared).is_err()
                {
                    finish(shared, conn, End::WriteTimeout);
                    return None;
                }
            } else {
                if let Err(end) = write_held(&conn.out, &mut held, shared) {
                    finish(shared, conn, end);
                    return None;
                }
                if let Err(e) = conn.out.send(&reply) {
                    let end = write_failed(e, &shared.counters);
                    finish(shared, conn, end);
                    return None;
                }
            }
        }
        if let Err(end) = match next {
            Ok(Some(_)) => Ok(()),
            _ => write_held(&conn.out, &mut held, shared),
        } {
            finish(shared, conn, end);
            return None;
        }
        if close {
            finish(shared, conn, End::Closed);
            return None;
        }
        match next {
            Ok(Some(message)) => {
                // Keep-alive: no new request is started once stopping.
                if shared.stopper.is_stopped() {
                    finish(shared, conn, End::Stopped);
                    return None;
                }
                step = Step::Request(message);
            }
            Ok(None) => return Some(conn),
            Err(e) => {
                finish(shared, conn, End::Malformed(e));
                return None;
            }
        }
    }
}

/// Writes the held replies; why the connection must end if that failed.
fn write_held<S: Service>(
    out: &Outbound,
    held: &mut Vec<u8>,
    shared: &Shared<S>,
) -> Result<(), End> {
    if held.is_empty() {
        return Ok(());
    }
    let result = out.write_all(held);
    held.clear();
    result.map_err(|e| write_failed(e, &shared.counters))
}

/// Ends a connection: its last words if `end` calls for them, then
/// [`Service::close`] and the close of the socket.
// Connections travel boxed (small channel messages); unboxing each just
// to end it would copy it for nothing.
#[allow(clippy::boxed_local)]
fn finish<S: Service>(shared: &Shared<S>, conn: Box<Conn<S>>, end: End) {
    // No push may start now: these are the connection's last words.
    conn.out.detach();
    shared.unwatch(&conn.stream);
    let mut stream: &TcpStream = &conn.stream;
    match &end {
        End::ReadTimeout => {
            let _ = stream.set_nonblocking(false);
            reply_timeout(&mut stream);
        }
        End::Stopped if conn.requests == 0 => {
            refuse_on(stream, &shared.shutting_down);
        }
        End::Malformed(e) => {
            let _ = stream.set_nonblocking(false);
            let reply = Message::reply(e.reply_code(), &e.to_string());
            let write_end = Instant::now() + shared.config.write_deadline;
            if write_message(&mut stream, &reply, write_end).is_ok() {
                linger_close(&mut stream);
            }
        }
        _ => {}
    }
    let Conn {
        session,
        peer,
        requests,
        since,
        ..
    } = *conn;
    shared.service.close(session);
    debug!(
        "{}: {} served {requests} requests, last {:?} ago, end: {end}",
        shared.config.name,
        peer.remote,
        since.elapsed()
    );
}

/// Why a connection ends when a reply could not be written.
fn write_failed(e: io::Error, counters: &Counters) -> End {
    if e.kind() == ErrorKind::TimedOut {
        Counters::bump(&counters.timed_out);
        End::WriteTimeout
    } else {
        End::Io(e)
    }
}

/// Best effort `408` to a peer that was too slow; it is tiny, so it only
/// fails if the peer has stopped reading as well.
fn reply_timeout(stream: &mut &TcpStream) {
    let reply = Message::reply(code::TIMEOUT, "timeout");
    let _ = write_message(stream, &reply, Instant::now() + TIMEOUT_REPLY_DEADLINE);
}

/// After an error reply: stop writing and read what the peer still sends,
/// briefly and boundedly, so that our close is not a reset that would
/// destroy the reply in the peer's receive buffer.
fn linger_close(stream: &mut &TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let end = Instant::now() + LINGER_TIME;
    let mut sink = [0u8; 16 * 1024];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use crate::prethread::{Config, Outcome, Peer, Server, Service};
    use crate::wire::io::MessageReader;
    use crate::wire::{Limits, Message};

    /// Echoes `N`; `CLOSE` gets a last reply and the connection closes.
    struct Echo;

    impl Service for Echo {
        type Session = ();
        fn open(&self, _peer: &Peer) {}
        fn handle(&self, _session: &mut (), request: Message) -> Outcome {
            let reply = Message::ok().with_header("N", request.header("N").unwrap_or("-"));
            match request.method() {
                Some("CLOSE") => Outcome::ReplyAndClose(reply),
                Some("QUIET") => Outcome::Silent,
                _ => Outcome::Reply(reply),
            }
        }
    }

    fn server() -> Server {
        let config = Config {
            name: "pipe".into(),
            workers: 1,
            queue: 1,
            ..Config::default()
        };
        Server::bind("127.0.0.1:0", config, Arc::new(Echo)).unwrap()
    }

    fn read_n(reader: &mut MessageReader<TcpStream>) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let m = reader.read_message(&Limits::DEFAULT, deadline).unwrap()?;
        Some(m.header("N").unwrap().to_owned())
    }

    #[test]
    fn pipelined_requests_get_every_reply_in_order() {
        let server = server();
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        // 300 requests in one write, a silent one among them, and the
        // start of one more: the replies to the whole ones must come
        // although the last one is still incomplete.
        let mut burst = Vec::new();
        for i in 0..300 {
            let method = if i == 150 { "QUIET" } else { "ECHO" };
            burst.extend(Message::request(method).with_header("N", i).encode());
        }
        let last = Message::request("CLOSE").with_header("N", "last").encode();
        burst.extend_from_slice(&last[..10]);
        stream.write_all(&burst).unwrap();
        let mut reader = MessageReader::new(stream.try_clone().unwrap());
        for i in (0..300).filter(|&i| i != 150) {
            assert_eq!(read_n(&mut reader).as_deref(), Some(i.to_string().as_str()));
        }
        stream.write_all(&last[10..]).unwrap();
        assert_eq!(read_n(&mut reader).as_deref(), Some("last"));
        assert_eq!(read_n(&mut reader), None, "closed after CLOSE");
        server.stopper().stop();
        server.join();
    }

    /// A request and the sender's close, arriving together, take one
    /// readiness event: the gate must not take its short read for "nothing
    /// more to come", or the close waits for the idle timeout.
    #[test]
    fn a_request_sent_with_the_close_is_answered_and_the_close_seen() {
        let config = Config {
            name: "halfclose".into(),
            workers: 1,
            idle_timeout: Duration::from_secs(600),
            ..Config::default()
        };
        let server = Server::bind("127.0.0.1:0", config, Arc::new(Echo)).unwrap();
        for round in 0..20 {
            let mut stream = TcpStream::connect(server.local_addr()).unwrap();
            let mut reader = MessageReader::new(stream.try_clone().unwrap());
            // First a request of its own, so that the connection already
            // waits in the gate (a new one is read whole when admitted).
            let first = Message::request("ECHO").with_header("N", "first").encode();
            stream.write_all(&first).unwrap();
            assert_eq!(read_n(&mut reader).as_deref(), Some("first"));
            // Back in the gate once its reply is out; give it that moment.
            std::thread::sleep(Duration::from_millis(20));
            let request = Message::request("ECHO").with_header("N", round).encode();
            stream.write_all(&request).unwrap();
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(
                read_n(&mut reader).as_deref(),
                Some(round.to_string().as_str())
            );
            // Closed by the server long before the idle timeout.
            assert_eq!(read_n(&mut reader), None, "round {round}: not closed");
        }
        server.stopper().stop();
        server.join();
    }

    #[test]
    fn replies_before_a_malformed_request_come_first() {
        let server = server();
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        let mut burst = Vec::new();
        for i in 0..3 {
            burst.extend(Message::request("ECHO").with_header("N", i).encode());
        }
        burst.extend_from_slice(b"bad request line\r\nContent-Length: 0\r\n\r\n\r\n");
        stream.write_all(&burst).unwrap();
        let mut reader = MessageReader::new(stream);
        for i in 0..3 {
            assert_eq!(read_n(&mut reader).as_deref(), Some(i.to_string().as_str()));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let error = reader
            .read_message(&Limits::DEFAULT, deadline)
            .unwrap()
            .unwrap();
        assert_eq!(error.code(), Some(400));
        server.stopper().stop();
        server.join();
    }
}
