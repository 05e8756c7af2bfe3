//! The worker threads: take a connection from the channel, serve it to the
//! end, take the next.
//!
//! Every read has an absolute deadline, so a silent or trickling peer holds
//! a worker for at most `message_deadline` (or `idle_timeout` plus that
//! between messages); every write has one too. Waits for the first byte of
//! a message are cut into short slices so that a stop is noticed quickly.
//! A worker that panics is replaced by its [`Sentinel`].

use std::fmt;
use std::io::{self, ErrorKind, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, warn};

use super::server::{refuse, Shared};
use super::stats::Counters;
use super::{Outcome, Peer, Service};
use crate::wire::io::{write_all_by, write_message, IoError, MessageReader};
use crate::wire::{code, Message};

/// Longest single wait for the first byte of a message; bounds how long
/// an idle connection keeps a worker after a stop.
const WAIT_SLICE: Duration = Duration::from_millis(100);

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
    while let Ok(stream) = shared.rx.recv() {
        if shared.stopper.is_stopped() {
            // Accepted before the stop but not started: refuse, don't serve.
            refuse(stream, &shared.shutting_down);
            continue;
        }
        serve(&shared, index, stream);
    }
    drop(sentinel);
}

/// Counts a connection as active and keeps a clone of its socket in the
/// worker's slot while it is served; undone on drop, panics included
/// (which also closes the connection, as the clone is the last handle).
struct ActiveGuard<'a, S: Service> {
    shared: &'a Shared<S>,
    index: usize,
}

impl<'a, S: Service> ActiveGuard<'a, S> {
    fn new(shared: &'a Shared<S>, index: usize, stream: &TcpStream) -> Self {
        shared.counters.active.fetch_add(1, Ordering::Relaxed);
        // Without a clone the grace period cannot be enforced on this
        // connection, but it is still bounded by its deadlines.
        *shared.slots[index].lock() = stream.try_clone().ok();
        ActiveGuard { shared, index }
    }
}

impl<S: Service> Drop for ActiveGuard<'_, S> {
    fn drop(&mut self) {
        self.shared.slots[self.index].lock().take();
        self.shared.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection ended, for the debug log.
enum End {
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
    /// The peer sent bytes that are not a message.
    Malformed(crate::wire::Error),
    /// The socket failed.
    Io(io::Error),
    /// A handler took the socket over.
    TakenOver,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::PeerClosed => f.write_str("peer closed"),
            End::Closed => f.write_str("closed by handler"),
            End::Stopped => f.write_str("server stopping"),
            End::Idle => f.write_str("idle timeout"),
            End::ReadTimeout => f.write_str("message deadline passed"),
            End::WriteTimeout => f.write_str("write deadline passed"),
            End::Malformed(e) => write!(f, "malformed message: {e}"),
            End::Io(e) => write!(f, "i/o error: {e}"),
            End::TakenOver => f.write_str("taken over"),
        }
    }
}

/// Serves one connection from `open` to `close`.
fn serve<S: Service>(shared: &Shared<S>, index: usize, stream: TcpStream) {
    let picked_up = Instant::now();
    let peer = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(remote), Ok(local)) => Peer { remote, local },
        // Already reset by the peer: nothing to serve.
        _ => return,
    };
    // Replies are written whole in one call; don't let Nagle delay them.
    let _ = stream.set_nodelay(true);
    let _active = ActiveGuard::new(shared, index, &stream);
    let mut session = shared.service.open(&peer);
    let (end, requests) = converse(shared, &mut session, stream, picked_up);
    shared.service.close(session);
    debug!(
        "{}: {} served {requests} requests in {:?}, end: {end}",
        shared.config.name,
        peer.remote,
        picked_up.elapsed()
    );
}

/// The request loop of one connection; returns why it ended and how many
/// requests were handled.
fn converse<S: Service>(
    shared: &Shared<S>,
    session: &mut S::Session,
    stream: TcpStream,
    picked_up: Instant,
) -> (End, u64) {
    let config = &shared.config;
    let counters = &shared.counters;
    let mut reader = MessageReader::new(stream);
    let mut requests = 0u64;
    // Encoded replies held back while pipelined requests are buffered.
    let mut held: Vec<u8> = Vec::new();
    // Writes the held replies; why the connection must end if that failed.
    let write_held = |stream: &mut TcpStream, held: &mut Vec<u8>| -> Result<(), End> {
        if held.is_empty() {
            return Ok(());
        }
        let result = write_all_by(stream, held, Instant::now() + config.write_deadline);
        held.clear();
        result.map_err(|e| write_failed(e, counters))
    };
    loop {
        let limits = shared.service.limits(session).unwrap_or(config.limits);
        let deadline = if requests == 0 {
            // The first message is due from pickup, silent or not.
            let deadline = picked_up + config.message_deadline;
            if !reader.has_buffered() {
                match wait_for_data(reader.get_ref(), deadline, shared) {
                    Wait::Data => {}
                    Wait::Eof => return (End::PeerClosed, requests),
                    Wait::Stopped => return (End::Stopped, requests),
                    Wait::Timeout => {
                        Counters::bump(&counters.timed_out);
                        reply_timeout(reader.get_mut());
                        return (End::ReadTimeout, requests);
                    }
                    Wait::Failed(e) => return (End::Io(e), requests),
                }
            }
            deadline
        } else {
            // Keep-alive: no new request is started once stopping.
            if shared.stopper.is_stopped() {
                let end = write_held(reader.get_mut(), &mut held).err();
                return (end.unwrap_or(End::Stopped), requests);
            }
            if !reader.has_buffered() {
                if let Err(end) = write_held(reader.get_mut(), &mut held) {
                    return (end, requests);
                }
                let idle_end = Instant::now() + config.idle_timeout;
                match wait_for_data(reader.get_ref(), idle_end, shared) {
                    Wait::Data => {}
                    Wait::Eof => return (End::PeerClosed, requests),
                    Wait::Stopped => return (End::Stopped, requests),
                    Wait::Timeout => {
                        Counters::bump(&counters.timed_out);
                        return (End::Idle, requests);
                    }
                    Wait::Failed(e) => return (End::Io(e), requests),
                }
            }
            // From its first byte, the message has `message_deadline`.
            Instant::now() + config.message_deadline
        };

        // Held replies go out before the reader waits for more bytes.
        let mut held_failed = None;
        let read = reader.read_message_with(&limits, deadline, |stream| {
            write_held(stream, &mut held).map_err(|end| {
                held_failed = Some(end);
                IoError::Io(io::ErrorKind::BrokenPipe.into())
            })
        });
        if let Some(end) = held_failed {
            return (end, requests);
        }
        // Replies to requests before a malformed one still go first.
        if read.is_err() {
            if let Err(end) = write_held(reader.get_mut(), &mut held) {
                return (end, requests);
            }
        }
        let request = match read {
            Ok(Some(request)) => request,
            Ok(None) => return (End::PeerClosed, requests),
            Err(IoError::Timeout) => {
                Counters::bump(&counters.timed_out);
                reply_timeout(reader.get_mut());
                return (End::ReadTimeout, requests);
            }
            Err(IoError::Wire(e)) => {
                let reply = Message::reply(e.reply_code(), &e.to_string());
                let write_end = Instant::now() + config.write_deadline;
                if write_message(reader.get_mut(), &reply, write_end).is_ok() {
                    linger_close(reader.get_mut());
                }
                return (End::Malformed(e), requests);
            }
            Err(IoError::Io(e)) => return (End::Io(e), requests),
        };
        requests += 1;

        let (reply, close) = match shared.service.handle(session, request) {
            Outcome::Reply(reply) => (Some(reply), false),
            Outcome::ReplyAndClose(reply) => (Some(reply), true),
            Outcome::Silent => (None, false),
            Outcome::Close => (None, true),
            Outcome::Takeover(take) => {
                if let Err(end) = write_held(reader.get_mut(), &mut held) {
                    return (end, requests);
                }
                let (stream, buffered) = reader.into_parts();
                let _ = stream.set_read_timeout(None);
                let _ = stream.set_write_timeout(None);
                take(stream, buffered);
                return (End::TakenOver, requests);
            }
        };
        if let Some(reply) = reply {
            let pipelined = !close && reader.has_buffered();
            if (pipelined || !held.is_empty()) && reply.body.len() < MAX_HELD {
                reply.encode_into(&mut held);
                if !pipelined || held.len() >= MAX_HELD {
                    if let Err(end) = write_held(reader.get_mut(), &mut held) {
                        return (end, requests);
                    }
                }
            } else {
                if let Err(end) = write_held(reader.get_mut(), &mut held) {
                    return (end, requests);
                }
                let write_end = Instant::now() + config.write_deadline;
                if let Err(e) = write_message(reader.get_mut(), &reply, write_end) {
                    return (write_failed(e, counters), requests);
                }
            }
        }
        if close {
            if let Err(end) = write_held(reader.get_mut(), &mut held) {
                return (end, requests);
            }
            return (End::Closed, requests);
        }
    }
}

/// Why a connection ends when a reply could not be written.
fn write_failed(e: IoError, counters: &Counters) -> End {
    match e {
        IoError::Timeout => {
            Counters::bump(&counters.timed_out);
            End::WriteTimeout
        }
        IoError::Io(e) => End::Io(e),
        // Writing never parses; kept for completeness.
        IoError::Wire(e) => End::Malformed(e),
    }
}

/// What waiting for the first byte of a message found.
enum Wait {
    Data,
    Eof,
    Stopped,
    Timeout,
    Failed(io::Error),
}

/// Waits until a byte can be read, the peer closes, `until` passes or the
/// server stops, in slices of at most [`WAIT_SLICE`]. Peeking leaves the
/// bytes for the message reader.
fn wait_for_data<S: Service>(stream: &TcpStream, until: Instant, shared: &Shared<S>) -> Wait {
    let mut probe = [0u8; 1];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Wait::Timeout;
        }
        if let Err(e) = stream.set_read_timeout(Some(left.min(WAIT_SLICE))) {
            return Wait::Failed(e);
        }
        match stream.peek(&mut probe) {
            Ok(0) => return Wait::Eof,
            Ok(_) => return Wait::Data,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Wait::Failed(e),
        }
        if shared.stopper.is_stopped() {
            return Wait::Stopped;
        }
    }
}

/// Best effort `408` to a peer that was too slow; it is tiny, so it only
/// fails if the peer has stopped reading as well.
fn reply_timeout(stream: &mut TcpStream) {
    let reply = Message::reply(code::TIMEOUT, "timeout");
    let _ = write_message(stream, &reply, Instant::now() + TIMEOUT_REPLY_DEADLINE);
}

/// After an error reply: stop writing and read what the peer still sends,
/// briefly and boundedly, so that our close is not a reset that would
/// destroy the reply in the peer's receive buffer.
fn linger_close(stream: &mut TcpStream) {
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
