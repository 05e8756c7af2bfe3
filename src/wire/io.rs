//! Reading and writing whole messages on a blocking stream, under limits
//! and an absolute deadline.
//!
//! A per-read timeout alone lets a peer that sends one byte a second hold a
//! thread forever; here every read gets only the time left until the
//! message's deadline, so a message arrives in full by then or not at all.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::error::Error;
use super::limits::Limits;
use super::message::Message;
use super::parse::parse_head;

/// Size of one read from the socket. Large enough that a typical request
/// arrives in one read, small enough to live in every connection.
const READ_CHUNK: usize = 16 * 1024;

/// A body is first given this much memory; only once that much of it has
/// arrived does it get all the memory its Content-Length claims, so that a
/// peer that announces a large body and then stalls holds little.
const BODY_FIRST_ALLOCATION: usize = 4 * READ_CHUNK;

/// Bodies up to this size are written in one buffer with their head (one
/// copy, one write); larger ones are written from where they are, head and
/// body gathered by one vectored write.
const INLINE_BODY: usize = 16 * 1024;

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
    /// Bytes read and not yet consumed start at `pos`; pipelined messages
    /// are consumed by moving `pos`, not by shifting the rest each time.
    buf: Vec<u8>,
    pos: usize,
}

impl<S: Read + Deadlines> MessageReader<S> {
    /// A reader over `stream`.
    pub fn new(stream: S) -> Self {
        MessageReader {
            stream,
            buf: Vec::new(),
            pos: 0,
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
        self.pos < self.buf.len()
    }

    /// Gives back the stream and any bytes read past the last message.
    pub fn into_parts(mut self) -> (S, Vec<u8>) {
        self.buf.drain(..self.pos);
        (self.stream, self.buf)
    }

    /// Forgets the consumed bytes.
    fn consume(&mut self, n: usize) {
        self.pos += n;
        if self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Reads one message that must be complete by `deadline`. `Ok(None)`
    /// means the peer closed the stream cleanly between messages.
    pub fn read_message(
        &mut self,
        limits: &Limits,
        deadline: Instant,
    ) -> Result<Option<Message>, IoError> {
        self.read_message_with(limits, deadline, |_| Ok(()))
    }

    /// As [`MessageReader::read_message`], but first calls `before_read`
    /// with the stream if the message is not whole in the buffer, before
    /// the first read from the stream (which may wait): e.g. to write
    /// replies held back while pipelined requests were still buffered.
    /// Its error is returned as is.
    pub fn read_message_with(
        &mut self,
        limits: &Limits,
        deadline: Instant,
        before_read: impl FnOnce(&mut S) -> Result<(), IoError>,
    ) -> Result<Option<Message>, IoError> {
        let mut before_read = Some(before_read);
        let head = loop {
            if self.has_buffered() {
                if let Some(head) = parse_head(&self.buf[self.pos..], limits)? {
                    break head;
                }
            }
            if let Some(f) = before_read.take() {
                f(&mut self.stream)?;
            }
            if self.fill(deadline)? == 0 {
                return if self.has_buffered() {
                    Err(Error::EofInHeaders.into())
                } else {
                    Ok(None)
                };
            }
        };
        // The body plus its CRLF; bounded because parse_head checked the limit.
        let need = head.content_length + 2;
        let start = self.pos + head.len;
        let buffered = self.buf.len() - start;
        let mut body;
        if buffered >= need {
            let end = start + need;
            if &self.buf[end - 2..end] != b"\r\n" {
                return Err(Error::MissingBodyTerminator.into());
            }
            body = self.buf[start..end - 2].to_vec();
            self.consume(head.len + need);
        } else {
            if let Some(f) = before_read.take() {
                f(&mut self.stream)?;
            }
            body = Vec::with_capacity(need.min(BODY_FIRST_ALLOCATION));
            body.extend_from_slice(&self.buf[start..]);
            self.buf.clear();
            self.pos = 0;
            // Read straight into the body, as much as the stream has.
            let mut filled = body.len();
            while filled < need {
                if filled == body.len() {
                    let grow = if body.capacity() > filled {
                        body.capacity()
                    } else {
                        need
                    };
                    body.resize(grow.min(need), 0);
                }
                self.stream.set_read_timeout(Some(remaining(deadline)?))?;
                match self.stream.read(&mut body[filled..]) {
                    Ok(0) => return Err(Error::TruncatedBody.into()),
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if &body[need - 2..] != b"\r\n" {
                return Err(Error::MissingBodyTerminator.into());
            }
            body.truncate(need - 2);
        }
        Ok(Some(head.into_message(body)))
    }

    /// One read into the buffer; returns how many bytes arrived (0 at EOF).
    fn fill(&mut self, deadline: Instant) -> Result<usize, IoError> {
        if self.pos > 0 {
            // What is left is the start of one message: move it to the front.
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
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

/// Writes all of `parts`, one after the other, by `deadline`, gathering
/// them into as few writes as the stream takes.
pub fn write_parts_by<W: Write + Deadlines>(
    stream: &mut W,
    parts: &[&[u8]],
    deadline: Instant,
) -> Result<(), IoError> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match stream.write_vectored(slices) {
            Ok(0) => return Err(IoError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    stream.flush()?;
    Ok(())
}

/// Encodes and writes one message by `deadline`. A large body is written
/// from the message itself, not copied behind its head first.
pub fn write_message<W: Write + Deadlines>(
    stream: &mut W,
    message: &Message,
    deadline: Instant,
) -> Result<(), IoError> {
    if message.body.len() <= INLINE_BODY {
        return write_all_by(stream, &message.encode(), deadline);
    }
    let mut head = Vec::with_capacity(message.head_len_for(message.body.len()));
    message.encode_head_for(message.body.len(), &mut head);
    write_parts_by(stream, &[&head, &message.body, b"\r\n"], deadline)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream that hands out at most `step` bytes per read.
    struct Trickle {
        data: Cursor<Vec<u8>>,
        step: usize,
        reads: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            let n = buf.len().min(self.step);
            self.data.read(&mut buf[..n])
        }
    }

    impl Deadlines for Trickle {
        fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
        fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
    }

    fn messages() -> Vec<Message> {
        let big: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        vec![
            Message::request("A").with_header("N", 1),
            Message::reply(200, "OK").with_body("small body"),
            Message::request("BIG").with_body(big.clone()),
            Message::request("B"),
            Message::request("BIG").with_body(big[..70_000].to_vec()),
            Message::reply(404, "no").with_body(vec![b'\r', b'\n', 0]),
        ]
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn pipelined_messages_come_out_whole_in_any_read_sizes() {
        let all = messages();
        let bytes: Vec<u8> = all.iter().flat_map(Message::encode).collect();
        for step in [1, 7, 100, 4096, 16 * 1024, 1 << 20] {
            let stream = Trickle {
                data: Cursor::new(bytes.clone()),
                step,
                reads: 0,
            };
            let mut reader = MessageReader::new(stream);
            let limits = Limits::DEFAULT;
            for m in &all {
                let got = reader.read_message(&limits, deadline()).unwrap();
                assert_eq!(got.as_ref(), Some(m), "read size {step}");
            }
            assert!(!reader.has_buffered());
            assert!(reader.read_message(&limits, deadline()).unwrap().is_none());
        }
    }

    #[test]
    fn large_bodies_are_read_in_few_reads() {
        let m = Message::request("BIG").with_body(vec![7u8; 1 << 20]);
        let stream = Trickle {
            data: Cursor::new(m.encode()),
            step: usize::MAX,
            reads: 0,
        };
        let mut reader = MessageReader::new(stream);
        let limits = Limits::DEFAULT;
        assert_eq!(reader.read_message(&limits, deadline()).unwrap(), Some(m));
        // The head's read, the body's first allocation, then the rest.
        assert!(reader.get_ref().reads <= 3, "{}", reader.get_ref().reads);
    }

    #[test]
    fn a_lying_content_length_is_still_caught() {
        let mut bytes = Message::request("X").with_body(vec![1u8; 100_000]).encode();
        let n = bytes.len();
        bytes[n - 2] = b'x';
        let mut reader = MessageReader::new(Cursor::new(bytes));
        assert!(matches!(
            reader.read_message(&Limits::DEFAULT, deadline()),
            Err(IoError::Wire(Error::MissingBodyTerminator))
        ));
        let mut bytes = Message::request("X").with_body("abc").encode();
        let n = bytes.len();
        bytes[n - 1] = b'x';
        bytes.extend_from_slice(&Message::request("Y").encode());
        let mut reader = MessageReader::new(Cursor::new(bytes));
        assert!(matches!(
            reader.read_message(&Limits::DEFAULT, deadline()),
            Err(IoError::Wire(Error::MissingBodyTerminator))
        ));
    }

    #[test]
    fn before_read_runs_only_when_the_stream_must_be_read() {
        let two: Vec<u8> = [Message::request("A"), Message::request("B")]
            .iter()
            .flat_map(Message::encode)
            .collect();
        let mut reader = MessageReader::new(Cursor::new(two));
        let limits = Limits::DEFAULT;
        let mut calls = 0;
        let a = reader
            .read_message_with(&limits, deadline(), |_| {
                calls += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(a, Some(Message::request("A")));
        assert_eq!(calls, 1, "the buffer was empty: read needed");
        let b = reader
            .read_message_with(&limits, deadline(), |_| {
                calls += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(b, Some(Message::request("B")));
        assert_eq!(calls, 1, "B was buffered whole: no read, no call");
        let refused = reader.read_message_with(&limits, deadline(), |_| Err(IoError::Timeout));
        assert!(matches!(refused, Err(IoError::Timeout)));
    }

    #[test]
    fn into_parts_gives_back_only_unread_bytes() {
        let bytes: Vec<u8> = [Message::request("A"), Message::request("B")]
            .iter()
            .flat_map(Message::encode)
            .collect();
        let mut reader = MessageReader::new(Cursor::new(bytes));
        reader.read_message(&Limits::DEFAULT, deadline()).unwrap();
        let (_, rest) = reader.into_parts();
        assert_eq!(rest, Message::request("B").encode());
    }

    #[test]
    fn written_messages_are_their_encoding() {
        for m in messages() {
            let mut out = Cursor::new(Vec::new());
            write_message(&mut out, &m, deadline()).unwrap();
            assert_eq!(out.into_inner(), m.encode());
            let mut head = Vec::new();
            m.encode_head_for(m.body.len(), &mut head);
            assert_eq!(head.len(), m.head_len_for(m.body.len()));
            assert_eq!(head.len() + m.body.len() + 2, m.encoded_len());
        }
    }
}
