//! The sending side of a served connection, shared by the worker that
//! replies and by anyone who pushes on a held link (e.g. an MS telling a
//! logged-in client about a buddy).
//!
//! The socket stays nonblocking for its whole life in the pool (the gate
//! reads it between messages), so a write that would block waits for the
//! socket to become writable with a short-lived poller, never longer than
//! the write deadline. One lock orders whole messages: a push never lands
//! in the middle of a reply.

use std::io::{self, ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use parking_lot::Mutex;

use crate::wire::Message;

/// A handle to write whole messages on one connection; clone it freely.
/// Once the connection has ended every write fails with `NotConnected`.
#[derive(Clone)]
pub struct Outbound {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` once the connection has ended.
    stream: Mutex<Option<Arc<TcpStream>>>,
    write_deadline: Duration,
}

impl std::fmt::Debug for Outbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outbound")
    }
}

impl Outbound {
    pub(crate) fn new(stream: Arc<TcpStream>, write_deadline: Duration) -> Outbound {
        Outbound {
            inner: Arc::new(Inner {
                stream: Mutex::new(Some(stream)),
                write_deadline,
            }),
        }
    }

    /// Writes `message` whole within the write deadline. An error means
    /// the connection can no longer be trusted to carry whole messages:
    /// the caller should [`Outbound::close`] it.
    pub fn send(&self, message: &Message) -> io::Result<()> {
        self.write_all(&message.encode())
    }

    /// Writes `messages` whole and in order, in one write when the socket
    /// takes them, within the write deadline.
    pub fn send_all(&self, messages: &[Message]) -> io::Result<()> {
        match messages {
            [] => Ok(()),
            [one] => self.send(one),
            many => {
                let mut bytes = Vec::new();
                for m in many {
                    m.encode_into(&mut bytes);
                }
                self.write_all(&bytes)
            }
        }
    }

    /// Writes `bytes` whole within the write deadline.
    pub(crate) fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        let guard = self.inner.stream.lock();
        let Some(stream) = guard.as_ref() else {
            return Err(ErrorKind::NotConnected.into());
        };
        write_nonblocking(stream, bytes, Instant::now() + self.inner.write_deadline)
    }

    /// Shuts the connection down: the gate sees it end and the service's
    /// `close` runs; every later write fails.
    pub fn close(&self) {
        if let Some(stream) = self.inner.stream.lock().take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Ends writes through this handle without shutting the socket down
    /// (the pool is about to write its last words and close it).
    pub(crate) fn detach(&self) {
        self.inner.stream.lock().take();
    }
}

/// Writes all of `bytes` to a nonblocking socket by `deadline`, waiting
/// for writability when the socket buffer is full.
fn write_nonblocking(stream: &TcpStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    let mut written = 0;
    let mut waiter: Option<(Poll, Events)> = None;
    let mut writer = stream;
    while written < bytes.len() {
        match writer.write(&bytes[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ErrorKind::TimedOut.into());
                }
                if waiter.is_none() {
                    let poll = Poll::new()?;
                    let fd = stream.as_raw_fd();
                    poll.registry()
                        .register(&mut SourceFd(&fd), Token(0), Interest::WRITABLE)?;
                    waiter = Some((poll, Events::with_capacity(1)));
                }
                if let Some((poll, events)) = waiter.as_mut() {
                    match poll.poll(events, Some(left)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
