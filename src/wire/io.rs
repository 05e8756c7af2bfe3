//! Reading and writing whole messages on a blocking stream, under limits
//! and an absolute deadline.
//!
//! A per-read timeout alone lets a peer that sends one byte a second hold a
//! thread forever; here every read gets only the time left until the
//! message's deadline, so a message arrives in full by then or not at all.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::error::Error;
use super::limits::Limits;
use super::message::Message;
use super::parse::parse_head;

/// Size of one read from the socket. Large enough that a typical request
/// arrives in one read, small enough to live in every connection.
const READ_CHUNK: usize = 16 * 1024;

/// What can go wrong reading or writing a message.
#[derive(Debug)]
pub enum IoError {
    /// The bytes are not a valid message (see [`Error`]).
    Wire(Error),
    /// The deadline passed before the message was read or written in full.
    Timeout,
    /// The operating system reported an error (reset, broken pipe, ...).
    Io(io::Error),
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::Wire(e) => write!(f, "malformed message: {e}"),
            IoError::Timeout => f.write_str("deadline passed"),
            IoError::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

impl std::error::Error for IoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IoError::Wire(e) => Some(e),
            IoError::Timeout => None,
            IoError::Io(e) => Some(e),
        }
    }
}

impl From<Error> for IoError {
    fn from(e: Error) -> Self {
        IoError::Wire(e)
    }
}

impl From<io::Error> for IoError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => IoError::Timeout,
            _ => IoError::Io(e),
        }
    }
}

/// A stream whose blocking reads and writes can be given a timeout.
pub trait Deadlines {
    /// Like [`TcpStream::set_read_timeout`].
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Like [`TcpStream::set_write_timeout`].
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Deadlines for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

impl Deadlines for &TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

/// In-memory streams never block; tests drive the reader with them.
impl<T> Deadlines for io::Cursor<T> {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// The time left until `deadline`, or `Timeout` if none is.
fn remaining(deadline: Instant) -> Result<Duration, IoError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(IoError::Timeout)
    } else {
        Ok(left)
    }
}

/// Reads messages one after another from a stream, keeping bytes that
/// arrived early (a pipelined next message) for the next call.
pub struct MessageReader<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: Read + Deadlines> MessageReader<S> {
    /// A reader over `stream`.
    pub fn new(stream: S) -> Self {
        MessageReader {
            stream,
            buf: Vec::new(),
        }
    }

    /// The stream, e.g. to write replies on it.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Whether bytes of a next message are already buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Gives back the stream and any bytes read past the last message.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        (self.stream, self.buf)
    }

    /// Reads one message that must be complete by `deadline`. `Ok(None)`
    /// means the peer closed the stream cleanly between messages.
    pub fn read_message(
        &mut self,
        limits: &Limits,
        deadline: Instant,
    ) -> Result<Option<Message>, IoError> {
        let head = loop {
            if !self.buf.is_empty() {
                if let Some(head) = parse_head(&self.buf, limits)? {
                    break head;
                }
            }
            if self.fill(deadline)? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::EofInHeaders.into())
                };
            }
        };
        // The body plus its CRLF; bounded because parse_head checked the limit.
        let need = head.content_length + 2;
        let buffered = self.buf.len() - head.len;
        let mut body;
        if buffered >= need {
            body = self.buf[head.len..head.len + need].to_vec();
            self.buf.drain(..head.len + need);
        } else {
            body = Vec::with_capacity(need.min(READ_CHUNK * 4));
            body.extend_from_slice(&self.buf[head.len..]);
            self.buf.clear();
            let mut rest = (&mut self.stream).take((need - buffered) as u64);
            let mut chunk = [0u8; READ_CHUNK];
            while body.len() < need {
                rest.get_ref()
                    .set_read_timeout(Some(remaining(deadline)?))?;
                match rest.read(&mut chunk) {
                    Ok(0) => return Err(Error::TruncatedBody.into()),
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if &body[need - 2..] != b"\r\n" {
            return Err(Error::MissingBodyTerminator.into());
        }
        body.truncate(need - 2);
        Ok(Some(head.into_message(body)))
    }

    /// One read into the buffer; returns how many bytes arrived (0 at EOF).
    fn fill(&mut self, deadline: Instant) -> Result<usize, IoError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            self.stream.set_read_timeout(Some(remaining(deadline)?))?;
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Writes all of `bytes` by `deadline`; a peer that stops reading cannot
/// hold the writer past it.
pub fn write_all_by<W: Write + Deadlines>(
    stream: &mut W,
    mut bytes: &[u8],
    deadline: Instant,
) -> Result<(), IoError> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(IoError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    stream.flush()?;
    Ok(())
}

/// Encodes and writes one message by `deadline`.
pub fn write_message<W: Write + Deadlines>(
    stream: &mut W,
    message: &Message,
    deadline: Instant,
) -> Result<(), IoError> {
    write_all_by(stream, &message.encode(), deadline)
}
