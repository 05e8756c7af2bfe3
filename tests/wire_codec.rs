//! Tests of the wire codec (`ims::wire`): the parser, the encoder, the
//! limits and the deadline-bounded reader and writer.
//!
//! - one rejection case per [`Error`] variant (a coverage test fails when a
//!   new variant has no case);
//! - every limit at exactly its maximum is accepted and one over is refused;
//! - every strict prefix of a valid message is `Incomplete`, pipelined
//!   messages report `used` exactly, and the reader copes with any chunking;
//! - encode → parse round trips for thousands of generated messages;
//! - random and mutated byte strings never panic, and the parser, the
//!   reader and the encoder agree on them (a seeded, in-process fuzzer);
//! - reads and writes over real loopback sockets stop at their absolute
//!   deadline even when the peer trickles bytes or never reads.
//!
//! Everything random is seeded, so a failure reproduces exactly.

use std::io::{self, Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ims::wire::io::{write_all_by, write_message, Deadlines, IoError, MessageReader};
use ims::wire::{parse, parse_head, Error, Limits, Message, Start, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A deadline that never matters for in-memory streams.
fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// Limits so large that only the format itself can refuse a message.
const ROOMY: Limits = Limits {
    max_line: usize::MAX,
    max_headers: usize::MAX,
    max_header_bytes: usize::MAX,
    max_body: usize::MAX,
    max_file_body: usize::MAX,
};

/// Small limits that ordinary fuzz inputs run into.
const TIGHT: Limits = Limits {
    max_line: 32,
    max_headers: 4,
    max_header_bytes: 96,
    max_body: 16,
    max_file_body: 24,
};

/// Limits so small that almost nothing passes.
const TINY: Limits = Limits {
    max_line: 2,
    max_headers: 0,
    max_header_bytes: 3,
    max_body: 0,
    max_file_body: 0,
};

/// Every limit zero: degenerate, but it must not panic.
const ZERO: Limits = Limits {
    max_line: 0,
    max_headers: 0,
    max_header_bytes: 0,
    max_body: 0,
    max_file_body: 0,
};

fn parse_err(input: &[u8], limits: &Limits) -> Error {
    match parse(input, limits) {
        Err(e) => e,
        Ok(s) => panic!(
            "expected an error for {:?}, got {s:?}",
            String::from_utf8_lossy(input)
        ),
    }
}

fn parse_ok(input: &[u8], limits: &Limits) -> (Message, usize) {
    match parse(input, limits) {
        Ok(Status::Complete { message, used }) => (message, used),
        other => panic!(
            "expected a message from {:?}, got {other:?}",
            String::from_utf8_lossy(input)
        ),
    }
}

/// A stream that hands out at most one byte per read.
struct OneByte<R>(R);

impl<R: Read> Read for OneByte<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(1);
        self.0.read(&mut buf[..n])
    }
}

impl<R> Deadlines for OneByte<R> {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// A stream that hands out reads of random sizes (1..=max), and now and
/// then an `Interrupted` error that the reader must retry.
struct Chunky<R> {
    inner: R,
    rng: StdRng,
    max: usize,
}

impl<R: Read> Read for Chunky<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rng.gen_ratio(1, 16) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = buf.len().min(self.rng.gen_range(1..=self.max));
        self.inner.read(&mut buf[..n])
    }
}

impl<R> Deadlines for Chunky<R> {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// Reads messages until a clean end of stream or the first error.
fn read_all<S: Read + Deadlines>(
    reader: &mut MessageReader<S>,
    limits: &Limits,
) -> Result<Vec<Message>, IoError> {
    let mut out = Vec::new();
    while let Some(m) = reader.read_message(limits, far())? {
        out.push(m);
    }
    Ok(out)
}

fn first_from_cursor(input: &[u8], limits: &Limits) -> Result<Option<Message>, IoError> {
    MessageReader::new(Cursor::new(input.to_vec())).read_message(limits, far())
}

fn wire_err(r: Result<Option<Message>, IoError>) -> Error {
    match r {
        Err(IoError::Wire(e)) => e,
        Err(e) => panic!("expected a wire error, got {e}"),
        Ok(m) => panic!("expected a wire error, got {m:?}"),
    }
}

/// Distinct index of each variant. The match is exhaustive, so a new
/// variant does not compile until it is listed here, and then
/// `every_error_variant_has_a_case` fails until it has a case.
fn variant_index(e: &Error) -> usize {
    match e {
        Error::BareLf => 0,
        Error::BareCr => 1,
        Error::InvalidStartLine => 2,
        Error::HeaderWithoutColon => 3,
        Error::InvalidHeaderName => 4,
        Error::InvalidHeaderValue => 5,
        Error::MissingContentLength => 6,
        Error::DuplicateContentLength => 7,
        Error::NonNumericContentLength => 8,
        Error::NegativeContentLength => 9,
        Error::OverflowingContentLength => 10,
        Error::LineTooLong => 11,
        Error::TooManyHeaders => 12,
        Error::HeaderBlockTooLarge => 13,
        Error::BodyTooLarge => 14,
        Error::MissingBodyTerminator => 15,
        Error::EofInHeaders => 16,
        Error::TruncatedBody => 17,
    }
}
const VARIANTS: usize = 18;

// ---------------------------------------------------------------------------
// Rejections: one table, every variant
// ---------------------------------------------------------------------------

struct Case {
    name: &'static str,
    input: Vec<u8>,
    limits: Limits,
    want: Error,
}

fn case(name: &'static str, input: &[u8], want: Error) -> Case {
    Case {
        name,
        input: input.to_vec(),
        limits: Limits::DEFAULT,
        want,
    }
}

fn case_with(name: &'static str, input: &[u8], limits: Limits, want: Error) -> Case {
    Case {
        name,
        input: input.to_vec(),
        limits,
        want,
    }
}

/// Complete byte strings that `parse` must refuse with the given variant.
fn rejection_cases() -> Vec<Case> {
    use Error::*;
    vec![
        // Line endings.
        case("bare LF after start line", b"LOGIN\nContent-Length: 0\r\n\r\n\r\n", BareLf),
        case("bare LF after header", b"LOGIN\r\nA: b\nContent-Length: 0\r\n\r\n\r\n", BareLf),
        case("bare LF as blank line", b"LOGIN\r\nContent-Length: 0\r\n\n\r\n", BareLf),
        case("bare LF alone", b"\n", BareLf),
        case("bare CR in start line", b"LOG\rIN\r\nContent-Length: 0\r\n\r\n\r\n", BareCr),
        case("bare CR in header value", b"LOGIN\r\nA: b\rc\r\nContent-Length: 0\r\n\r\n\r\n", BareCr),
        case("CR CR LF", b"LOGIN\r\nA: b\r\r\nContent-Length: 0\r\n\r\n\r\n", BareCr),
        case("bare CR before blank line end", b"LOGIN\r\nContent-Length: 0\r\n\rx\r\n\r\n", BareCr),
        // Header syntax.
        case("header without colon", b"LOGIN\r\nNoColon\r\nContent-Length: 0\r\n\r\n\r\n", HeaderWithoutColon),
        case("header of spaces", b"LOGIN\r\n   \r\nContent-Length: 0\r\n\r\n\r\n", HeaderWithoutColon),
        case("space before colon", b"LOGIN\r\nName : x\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderName),
        case("space in name", b"LOGIN\r\nNa me: x\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderName),
        case("empty name", b"LOGIN\r\n: x\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderName),
        case("at sign in name", b"LOGIN\r\nA@b: x\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderName),
        case("leading space (obs-fold)", b"LOGIN\r\n A: x\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderName),
        case("non-ASCII name", b"LOGIN\r\nN\xc3\xa4me: x\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderName),
        case("control char in value", b"LOGIN\r\nA: b\x01c\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderValue),
        case("NUL in value", b"LOGIN\r\nA: \x00\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderValue),
        case("DEL in value", b"LOGIN\r\nA: x\x7f\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderValue),
        case("non-ASCII value", b"LOGIN\r\nA: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderValue),
        case("invalid UTF-8 value", b"LOGIN\r\nA: \xff\xfe\r\nContent-Length: 0\r\n\r\n\r\n", InvalidHeaderValue),
        // Start line.
        case("lowercase method", b"login\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("mixed-case method", b"LogIn\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("method with space", b"LOG IN\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("method with underscore", b"LOG_IN\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("method starting with dash", b"-LOGIN\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("two-digit code", b"20 OK\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("code below 100", b"099 x\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("four-digit code", b"2000 OK\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("code without reason separator", b"200\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("code glued to reason", b"200OK\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("digit then letters", b"2XX OK\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("control char in reason", b"200 O\x01K\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("tab in reason", b"200 O\tK\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("non-ASCII reason", b"200 \xc3\xa9\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("empty start line", b"\r\nContent-Length: 0\r\n\r\n\r\n", InvalidStartLine),
        case("empty start line alone", b"\r\n", InvalidStartLine),
        // Content-Length.
        case("missing Content-Length", b"LOGIN\r\nA: b\r\n\r\n\r\n", MissingContentLength),
        case("no headers at all", b"LOGIN\r\n\r\n\r\n", MissingContentLength),
        case("Content-Length only in body", b"LOGIN\r\n\r\nContent-Length: 0\r\n\r\n", MissingContentLength),
        case("duplicate Content-Length", b"LOGIN\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n\r\n", DuplicateContentLength),
        case("duplicate in other case", b"LOGIN\r\nContent-Length: 1\r\ncontent-LENGTH: 1\r\n\r\nx\r\n", DuplicateContentLength),
        case("Content-Length 12a", b"LOGIN\r\nContent-Length: 12a\r\n\r\n\r\n", NonNumericContentLength),
        case("Content-Length empty", b"LOGIN\r\nContent-Length:\r\n\r\n\r\n", NonNumericContentLength),
        case("Content-Length blank", b"LOGIN\r\nContent-Length:   \r\n\r\n\r\n", NonNumericContentLength),
        case("Content-Length +5", b"LOGIN\r\nContent-Length: +5\r\n\r\nabcde\r\n", NonNumericContentLength),
        case("Content-Length minus alone", b"LOGIN\r\nContent-Length: -\r\n\r\n\r\n", NonNumericContentLength),
        case("Content-Length hex", b"LOGIN\r\nContent-Length: 0x1\r\n\r\nx\r\n", NonNumericContentLength),
        case("Content-Length two numbers", b"LOGIN\r\nContent-Length: 1 1\r\n\r\nx\r\n", NonNumericContentLength),
        case("Content-Length -1", b"LOGIN\r\nContent-Length: -1\r\n\r\n\r\n", NegativeContentLength),
        case("Content-Length -0", b"LOGIN\r\nContent-Length: -0\r\n\r\n\r\n", NegativeContentLength),
        case("Content-Length 10^22", b"LOGIN\r\nContent-Length: 99999999999999999999999\r\n\r\n\r\n", OverflowingContentLength),
        case("Content-Length 2^64", b"LOGIN\r\nContent-Length: 18446744073709551616\r\n\r\n\r\n", OverflowingContentLength),
        // Body.
        case("body longer than claimed", b"LOGIN\r\nContent-Length: 2\r\n\r\nabc\r\n", MissingBodyTerminator),
        case("body shorter than claimed", b"LOGIN\r\nContent-Length: 4\r\n\r\nab\r\nPING\r\n", MissingBodyTerminator),
        case("LF-only terminator", b"LOGIN\r\nContent-Length: 1\r\n\r\nx\n\r", MissingBodyTerminator),
        case("no terminator, next message", b"LOGIN\r\nContent-Length: 0\r\n\r\nLOGIN\r\n", MissingBodyTerminator),
        // Limits (boundaries are tested precisely below).
        case("Content-Length 2^64-1", b"LOGIN\r\nContent-Length: 18446744073709551615\r\n\r\n\r\n", BodyTooLarge),
        case_with("body over the limit", b"LOGIN\r\nContent-Length: 17\r\n\r\n", TIGHT, BodyTooLarge),
        case_with("line over the limit", b"LOGIN-WITH-A-VERY-LONG-METHOD-NAME\r\n", TIGHT, LineTooLong),
        case_with(
            "too many headers",
            b"LOGIN\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nContent-Length: 0\r\n\r\n\r\n",
            TIGHT,
            TooManyHeaders,
        ),
        case_with(
            "header block too large",
            b"LOGIN\r\nAaaaaaaaaaaaaaaaaaaaaaaa: 1\r\nBbbbbbbbbbbbbbbbbbbbbbbb: 2\r\nCccccccccccccccccccccccc: 3\r\nContent-Length: 0\r\n\r\n\r\n",
            TIGHT,
            HeaderBlockTooLarge,
        ),
    ]
}

#[test]
fn rejections_by_parse_and_by_reader() {
    for c in rejection_cases() {
        let got = parse(&c.input, &c.limits);
        assert_eq!(got, Err(c.want.clone()), "parse: case {:?}", c.name);
        // A reader given the same bytes in one read refuses them the same way.
        let got = wire_err(first_from_cursor(&c.input, &c.limits));
        assert_eq!(got, c.want, "reader: case {:?}", c.name);
        // Given one byte at a time it still refuses them (the first rule a
        // prefix breaks may differ, so only the refusal is compared).
        let mut r = MessageReader::new(OneByte(Cursor::new(c.input.clone())));
        assert!(
            matches!(r.read_message(&c.limits, far()), Err(IoError::Wire(_))),
            "one-byte reader: case {:?}",
            c.name
        );
        // The reply a server would send before closing.
        let code = c.want.reply_code();
        assert!(code == 400 || code == 413, "case {:?}", c.name);
        assert!(!c.want.to_string().is_empty());
    }
}

#[test]
fn size_errors_answer_413_others_400() {
    for e in [
        Error::LineTooLong,
        Error::TooManyHeaders,
        Error::HeaderBlockTooLarge,
        Error::BodyTooLarge,
    ] {
        assert_eq!(e.reply_code(), 413, "{e:?}");
    }
    for e in [
        Error::BareLf,
        Error::MissingContentLength,
        Error::TruncatedBody,
    ] {
        assert_eq!(e.reply_code(), 400, "{e:?}");
    }
}

/// What a reader over an in-memory stream must do with inputs that end early.
fn reader_cases() -> Vec<(&'static str, &'static [u8], Result<usize, Error>)> {
    use Error::*;
    vec![
        ("empty stream", b"", Ok(0)),
        ("EOF in start line", b"LOG", Err(EofInHeaders)),
        ("EOF after CR of start line", b"LOGIN\r", Err(EofInHeaders)),
        (
            "EOF in header name",
            b"LOGIN\r\nContent-Len",
            Err(EofInHeaders),
        ),
        (
            "EOF before blank line",
            b"LOGIN\r\nContent-Length: 0\r\n",
            Err(EofInHeaders),
        ),
        (
            "EOF in blank line",
            b"LOGIN\r\nContent-Length: 0\r\n\r",
            Err(EofInHeaders),
        ),
        (
            "EOF before body",
            b"LOGIN\r\nContent-Length: 5\r\n\r\n",
            Err(TruncatedBody),
        ),
        (
            "EOF in body",
            b"LOGIN\r\nContent-Length: 5\r\n\r\nabc",
            Err(TruncatedBody),
        ),
        (
            "EOF before terminator",
            b"LOGIN\r\nContent-Length: 5\r\n\r\nabcde",
            Err(TruncatedBody),
        ),
        (
            "EOF in terminator",
            b"LOGIN\r\nContent-Length: 5\r\n\r\nabcde\r",
            Err(TruncatedBody),
        ),
        (
            "EOF in empty body terminator",
            b"LOGIN\r\nContent-Length: 0\r\n\r\n\r",
            Err(TruncatedBody),
        ),
        (
            "one message then clean EOF",
            b"LOGIN\r\nContent-Length: 0\r\n\r\n\r\n",
            Ok(1),
        ),
        (
            "two messages then clean EOF",
            b"LOGIN\r\nContent-Length: 0\r\n\r\n\r\n200 OK\r\nContent-Length: 1\r\n\r\nx\r\n",
            Ok(2),
        ),
        (
            "one message then EOF in the next head",
            b"LOGIN\r\nContent-Length: 0\r\n\r\n\r\n200 OK\r\n",
            Err(EofInHeaders),
        ),
        (
            "one message then EOF in the next body",
            b"LOGIN\r\nContent-Length: 0\r\n\r\n\r\n200 OK\r\nContent-Length: 9\r\n\r\nxx",
            Err(TruncatedBody),
        ),
    ]
}

#[test]
fn reader_at_end_of_stream() {
    for (name, input, want) in reader_cases() {
        // Whole input in one read, and one byte per read.
        let mut whole = MessageReader::new(Cursor::new(input.to_vec()));
        let mut bytewise = MessageReader::new(OneByte(Cursor::new(input.to_vec())));
        for got in [
            read_all(&mut whole, &Limits::DEFAULT),
            read_all(&mut bytewise, &Limits::DEFAULT),
        ] {
            match (&want, got) {
                (Ok(n), Ok(msgs)) => assert_eq!(msgs.len(), *n, "case {name:?}"),
                (Err(e), Err(IoError::Wire(got))) => assert_eq!(&got, e, "case {name:?}"),
                (want, got) => panic!("case {name:?}: want {want:?}, got {got:?}"),
            }
        }
        // Where the reader hits EOF, `parse` asks for more bytes.
        if want.is_err() {
            let mut rest = input;
            while let Ok(Status::Complete { used, .. }) = parse(rest, &Limits::DEFAULT) {
                rest = &rest[used..];
            }
            assert_eq!(
                parse(rest, &Limits::DEFAULT),
                Ok(Status::Incomplete),
                "case {name:?}"
            );
        }
    }
    // After a clean EOF the reader keeps reporting it.
    let mut r = MessageReader::new(Cursor::new(Vec::new()));
    assert!(matches!(r.read_message(&Limits::DEFAULT, far()), Ok(None)));
    assert!(matches!(r.read_message(&Limits::DEFAULT, far()), Ok(None)));
}

#[test]
fn every_error_variant_has_a_case() {
    let mut seen = [false; VARIANTS];
    for c in rejection_cases() {
        seen[variant_index(&c.want)] = true;
    }
    for (_, _, want) in reader_cases() {
        if let Err(e) = want {
            seen[variant_index(&e)] = true;
        }
    }
    let missing: Vec<usize> = (0..VARIANTS).filter(|&i| !seen[i]).collect();
    assert!(missing.is_empty(), "variants without a case: {missing:?}");
}

// ---------------------------------------------------------------------------
// Limits: exactly the maximum passes, one more fails
// ---------------------------------------------------------------------------

const CL0: &[u8] = b"Content-Length: 0\r\n";

/// A request whose start line is exactly `len` bytes, CRLF included.
fn start_line_of_len(len: usize) -> Vec<u8> {
    assert!(len >= 3);
    let mut line = vec![b'M'; len - 2];
    line.extend_from_slice(b"\r\n");
    line
}

/// A header line of exactly `len` bytes, CRLF included.
fn header_line_of_len(len: usize) -> Vec<u8> {
    assert!(len >= 5);
    let mut line = b"X: ".to_vec();
    line.resize(len - 2, b'v');
    line.extend_from_slice(b"\r\n");
    line
}

fn message_from_lines(lines: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut out = lines.concat();
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
    out
}

#[test]
fn max_line_counts_the_crlf() {
    for max in [CL0.len(), 20, 100, Limits::DEFAULT.max_line] {
        let limits = Limits {
            max_line: max,
            ..Limits::DEFAULT
        };
        // Start line: `max` bytes with its CRLF pass, `max + 1` fail.
        let ok = message_from_lines(&[&start_line_of_len(max), CL0], b"");
        let (m, used) = parse_ok(&ok, &limits);
        assert_eq!(used, ok.len());
        assert_eq!(m.method().map(str::len), Some(max - 2));
        let long = message_from_lines(&[&start_line_of_len(max + 1), CL0], b"");
        assert_eq!(parse_err(&long, &limits), Error::LineTooLong, "max {max}");
        assert_eq!(
            wire_err(first_from_cursor(&long, &limits)),
            Error::LineTooLong
        );

        // Header line: the same boundary.
        let ok = message_from_lines(&[b"LOGIN\r\n", &header_line_of_len(max), CL0], b"");
        let (m, _) = parse_ok(&ok, &limits);
        assert_eq!(m.header("X").map(str::len), Some(max - 5));
        let long = message_from_lines(&[b"LOGIN\r\n", &header_line_of_len(max + 1), CL0], b"");
        assert_eq!(parse_err(&long, &limits), Error::LineTooLong, "max {max}");

        // Detected before the line ends: `max` bytes without LF are already
        // too many, `max - 1` (the longest line but its LF) are not.
        let line = start_line_of_len(max + 1);
        assert_eq!(parse_err(&line[..max], &limits), Error::LineTooLong);
        assert_eq!(parse(&line[..max - 1], &limits), Ok(Status::Incomplete));
        let line = start_line_of_len(max);
        assert_eq!(parse(&line[..max - 1], &limits), Ok(Status::Incomplete));
    }
    // Reply start lines obey the same bound.
    let limits = Limits {
        max_line: 24,
        ..Limits::DEFAULT
    };
    let ok = message_from_lines(
        &[b"200 aaaaaaaaaaaaaaaaaa\r\n", b"Content-Length: 0\r\n"],
        b"",
    );
    assert_eq!(b"200 aaaaaaaaaaaaaaaaaa\r\n".len(), 24);
    parse_ok(&ok, &limits);
    let long = message_from_lines(
        &[b"200 aaaaaaaaaaaaaaaaaaa\r\n", b"Content-Length: 0\r\n"],
        b"",
    );
    assert_eq!(parse_err(&long, &limits), Error::LineTooLong);
    // The body is not made of lines: a long body line is fine.
    let body = vec![b'b'; 1000];
    let ok = message_from_lines(&[b"LOGIN\r\n", b"Content-Length: 1000\r\n"], &body);
    assert_eq!(parse_ok(&ok, &limits).0.body, body);
}

#[test]
fn max_headers_counts_content_length() {
    for max in [1usize, 2, 5, Limits::DEFAULT.max_headers] {
        let limits = Limits {
            max_headers: max,
            ..Limits::DEFAULT
        };
        let extra: Vec<Vec<u8>> = (0..max)
            .map(|i| format!("H{i}: v\r\n").into_bytes())
            .collect();
        for cl_first in [false, true] {
            let build = |n: usize| {
                let mut lines: Vec<&[u8]> = vec![b"LOGIN\r\n"];
                if cl_first {
                    lines.push(CL0);
                }
                lines.extend(extra[..n].iter().map(Vec::as_slice));
                if !cl_first {
                    lines.push(CL0);
                }
                message_from_lines(&lines, b"")
            };
            // `max - 1` others plus Content-Length: exactly `max` lines.
            let (m, _) = parse_ok(&build(max - 1), &limits);
            assert_eq!(m.headers.len(), max - 1);
            assert_eq!(
                parse_err(&build(max), &limits),
                Error::TooManyHeaders,
                "max {max}"
            );
        }
    }
    // With none allowed, not even Content-Length fits.
    let limits = Limits {
        max_headers: 0,
        ..Limits::DEFAULT
    };
    assert_eq!(
        parse_err(b"LOGIN\r\nContent-Length: 0\r\n\r\n\r\n", &limits),
        Error::TooManyHeaders
    );
}

/// A head (start line through blank line) of exactly `total` bytes whose
/// lines are at most `line` bytes long, with `Content-Length: 0`.
fn head_of_len(total: usize, line: usize) -> Vec<u8> {
    let fixed = b"LOGIN\r\n".len() + CL0.len() + 2;
    assert!(total >= fixed && line >= 10);
    let mut rest = total - fixed;
    let mut out = b"LOGIN".to_vec();
    if rest < 5 {
        // Too little for a header line: lengthen the method instead.
        out.resize(out.len() + rest, b'N');
        rest = 0;
    }
    out.extend_from_slice(b"\r\n");
    while rest > 0 {
        let mut len = rest.min(line);
        if rest - len > 0 && rest - len < 5 {
            len = rest - 5;
        }
        out.extend_from_slice(&header_line_of_len(len));
        rest -= len;
    }
    out.extend_from_slice(CL0);
    out.extend_from_slice(b"\r\n");
    assert_eq!(out.len(), total);
    out
}

#[test]
fn max_header_bytes_is_the_whole_block_through_the_blank_line() {
    for max in [28usize, 29, 33, 64, 1000, Limits::DEFAULT.max_header_bytes] {
        let limits = Limits {
            max_header_bytes: max,
            ..Limits::DEFAULT
        };
        let line = Limits::DEFAULT.max_line;
        let mut ok = head_of_len(max, line);
        assert_eq!(parse_head(&ok, &limits).unwrap().unwrap().len, max);
        ok.extend_from_slice(b"\r\n");
        assert_eq!(parse_ok(&ok, &limits).1, max + 2);

        let mut big = head_of_len(max + 1, line);
        assert_eq!(
            parse_head(&big, &limits),
            Err(Error::HeaderBlockTooLarge),
            "max {max}"
        );
        // Its first `max` bytes could still be the start of a valid head.
        assert_eq!(parse_head(&big[..max], &limits), Ok(None));
        big.extend_from_slice(b"\r\n");
        assert_eq!(parse_err(&big, &limits), Error::HeaderBlockTooLarge);
        assert_eq!(
            wire_err(first_from_cursor(&big, &limits)),
            Error::HeaderBlockTooLarge
        );
    }
    // A head that never ends is refused once it passes the bound, without
    // waiting for its blank line.
    let limits = Limits {
        max_header_bytes: 200,
        ..Limits::DEFAULT
    };
    let mut flood = b"LOGIN\r\n".to_vec();
    while flood.len() <= 200 {
        flood.extend_from_slice(b"A: b\r\n");
    }
    assert_eq!(parse_err(&flood, &limits), Error::HeaderBlockTooLarge);
    assert_eq!(
        parse_err(&flood[..201], &limits),
        Error::HeaderBlockTooLarge
    );
    assert_eq!(parse(&flood[..200], &limits), Ok(Status::Incomplete));
    let mut r = MessageReader::new(Cursor::new(flood.repeat(10)));
    assert_eq!(
        wire_err(r.read_message(&limits, far())),
        Error::HeaderBlockTooLarge
    );
}

fn head_claiming(len: usize) -> Vec<u8> {
    format!("PUT\r\nContent-Length: {len}\r\n\r\n").into_bytes()
}

#[test]
fn max_body_is_checked_from_the_head_alone() {
    for max in [0usize, 1, 100, Limits::DEFAULT.max_body] {
        let limits = Limits {
            max_body: max,
            ..Limits::DEFAULT
        };
        // Exactly `max` passes, with its body.
        let head = head_claiming(max);
        assert_eq!(
            parse_head(&head, &limits).unwrap().unwrap().content_length,
            max
        );
        assert_eq!(parse(&head, &limits), Ok(Status::Incomplete));
        let mut whole = head.clone();
        whole.resize(head.len() + max, 0xAB);
        whole.extend_from_slice(b"\r\n");
        assert_eq!(parse_ok(&whole, &limits).0.body.len(), max);
        assert_eq!(
            first_from_cursor(&whole, &limits)
                .unwrap()
                .unwrap()
                .body
                .len(),
            max
        );

        // One more is refused from the head alone: no body byte has arrived.
        let head = head_claiming(max + 1);
        assert_eq!(parse_head(&head, &limits), Err(Error::BodyTooLarge));
        assert_eq!(parse_err(&head, &limits), Error::BodyTooLarge);
        // ... even before the blank line.
        assert_eq!(
            parse_err(&head[..head.len() - 2], &limits),
            Error::BodyTooLarge
        );
        // A reader says BodyTooLarge, not TruncatedBody: it never waits for
        // (nor allocates) the body.
        assert_eq!(
            wire_err(first_from_cursor(&head, &limits)),
            Error::BodyTooLarge
        );
    }
}

#[test]
fn for_files_raises_only_the_body_limit() {
    let plain = Limits::DEFAULT;
    let files = plain.for_files();
    assert_eq!(files.max_body, plain.max_file_body);
    assert_eq!(
        Limits {
            max_body: plain.max_body,
            ..files
        },
        plain
    );
    assert_eq!(Limits::default(), Limits::DEFAULT);

    let at_max = head_claiming(plain.max_file_body);
    assert_eq!(parse_head(&at_max, &plain), Err(Error::BodyTooLarge));
    assert_eq!(
        parse_head(&at_max, &files).unwrap().unwrap().content_length,
        plain.max_file_body
    );
    let over = head_claiming(plain.max_file_body + 1);
    assert_eq!(parse_head(&over, &files), Err(Error::BodyTooLarge));
    assert_eq!(
        wire_err(first_from_cursor(&over, &files)),
        Error::BodyTooLarge
    );

    // A whole file frame of the largest size goes through the reader.
    let body = vec![7u8; plain.max_file_body];
    let frame = Message::request("FILE-DATA")
        .with_body(body.clone())
        .encode();
    let mut r = MessageReader::new(Cursor::new(frame.clone()));
    assert_eq!(r.read_message(&files, far()).unwrap().unwrap().body, body);
    assert_eq!(parse_err(&frame, &plain), Error::BodyTooLarge);

    // A body limit already above the file limit is kept.
    let generous = Limits {
        max_body: 10 * plain.max_file_body,
        ..plain
    };
    assert_eq!(generous.for_files(), generous);
}

/// Regression: with `max_body: usize::MAX` ("no limit") a Content-Length
/// near 2^64 made `parse` and the reader overflow `usize` arithmetic
/// (a panic in debug, a wrong slice index in release). A body that no
/// buffer can hold is now always BodyTooLarge.
#[test]
fn unlimited_body_cannot_overflow() {
    // The input cargo-fuzz found (target `parse`, crash-d04b79b4...).
    let found = b"OK\r\nContent-Length:018446744073709551615\r\n\r\n\0\0";
    assert_eq!(parse_err(found, &ROOMY), Error::BodyTooLarge);
    assert_eq!(parse_err(found, &Limits::DEFAULT), Error::BodyTooLarge);
    assert_eq!(
        wire_err(first_from_cursor(found, &ROOMY)),
        Error::BodyTooLarge
    );
    for claim in [
        u64::MAX,
        u64::MAX - 1,
        u64::MAX - 2,
        i64::MAX as u64,
        i64::MAX as u64 - 1,
    ] {
        let mut input = format!("PUT\r\nContent-Length: {claim}\r\n\r\n").into_bytes();
        input.extend_from_slice(b"\r\nxyz");
        assert_eq!(parse_err(&input, &ROOMY), Error::BodyTooLarge, "{claim}");
        assert_eq!(
            wire_err(first_from_cursor(&input, &ROOMY)),
            Error::BodyTooLarge
        );
    }
    // Large claims that a buffer could hold in principle still just wait.
    let input = b"PUT\r\nContent-Length: 1000000000000\r\n\r\nabc";
    assert_eq!(parse(input, &ROOMY), Ok(Status::Incomplete));
    assert_eq!(
        wire_err(first_from_cursor(input, &ROOMY)),
        Error::TruncatedBody
    );
}

// ---------------------------------------------------------------------------
// Incremental parsing and pipelining
// ---------------------------------------------------------------------------

/// A request whose body looks like wire syntax, to catch any parser that
/// looks into the body.
fn tricky_request() -> Message {
    Message::request("SEND-MSG")
        .with_header("From", "alice")
        .with_header("To", "bob")
        .with_header("X-Seal", "YWJjZGVmZ2hpamtsbW5vcA==")
        .with_body(&b"\r\n\r\nContent-Length: 3\r\n\r\nabc\r\n\0\xff\r"[..])
}

fn reply_with_body() -> Message {
    Message::reply(404, "no such user")
        .with_header("Retry", "never")
        .with_body("x")
}

#[test]
fn every_strict_prefix_is_incomplete() {
    for m in [
        tricky_request(),
        reply_with_body(),
        Message::ok(),
        Message::reply(200, ""),
    ] {
        let bytes = m.encode();
        for k in 0..bytes.len() {
            assert_eq!(
                parse(&bytes[..k], &Limits::DEFAULT),
                Ok(Status::Incomplete),
                "prefix of {k} bytes of {m:?}"
            );
        }
        let (got, used) = parse_ok(&bytes, &Limits::DEFAULT);
        assert_eq!(got, m);
        assert_eq!(used, bytes.len());

        // The head alone: `None` until the blank line, then its length.
        let head_len = bytes.len() - m.body.len() - 2;
        for k in 0..head_len {
            assert_eq!(parse_head(&bytes[..k], &Limits::DEFAULT), Ok(None));
        }
        let head = parse_head(&bytes[..head_len], &Limits::DEFAULT)
            .unwrap()
            .unwrap();
        assert_eq!(head.len, head_len);
        assert_eq!(head.content_length, m.body.len());
        assert_eq!(head.start, m.start);
        assert_eq!(head.into_message(m.body.clone()), m);
    }
}

#[test]
fn pipelined_messages_report_used() {
    let a = tricky_request().encode();
    let b = reply_with_body().encode();
    let mut both = a.clone();
    both.extend_from_slice(&b);

    let (m, used) = parse_ok(&both, &Limits::DEFAULT);
    assert_eq!(m, tricky_request());
    assert_eq!(used, a.len());
    let (m, used) = parse_ok(&both[a.len()..], &Limits::DEFAULT);
    assert_eq!(m, reply_with_body());
    assert_eq!(used, b.len());

    // Any prefix of the second message after the first changes nothing.
    for k in 0..b.len() {
        let (m, used) = parse_ok(&both[..a.len() + k], &Limits::DEFAULT);
        assert_eq!(m, tricky_request());
        assert_eq!(used, a.len());
    }
    // Nor does garbage after the first.
    let mut junk = a.clone();
    junk.extend_from_slice(b"\n\r\x00garbage");
    assert_eq!(parse_ok(&junk, &Limits::DEFAULT).1, a.len());
}

fn three_messages() -> (Vec<Message>, Vec<u8>) {
    let big = Message::request("FILE-DATA")
        .with_header("Offer", "7")
        .with_body((0..40_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let msgs = vec![tricky_request(), big, reply_with_body()];
    let bytes = msgs.iter().flat_map(Message::encode).collect();
    (msgs, bytes)
}

#[test]
fn reader_reads_three_pipelined_messages() {
    let (msgs, bytes) = three_messages();
    let mut r = MessageReader::new(Cursor::new(bytes.clone()));
    assert!(!r.has_buffered());
    for (i, want) in msgs.iter().enumerate() {
        let got = r.read_message(&Limits::DEFAULT, far()).unwrap().unwrap();
        assert_eq!(&got, want, "message {i}");
    }
    assert!(!r.has_buffered());
    assert!(r.read_message(&Limits::DEFAULT, far()).unwrap().is_none());
    let (cursor, rest) = r.into_parts();
    assert!(rest.is_empty());
    assert_eq!(cursor.position() as usize, bytes.len());

    // Two small messages arrive in one read: the second is kept buffered.
    let mut two = tricky_request().encode();
    two.extend(reply_with_body().encode());
    let mut r = MessageReader::new(Cursor::new(two));
    r.read_message(&Limits::DEFAULT, far()).unwrap().unwrap();
    assert!(r.has_buffered());
    assert_eq!(
        r.read_message(&Limits::DEFAULT, far()).unwrap().unwrap(),
        reply_with_body()
    );
    assert!(r.get_ref().position() > 0);
    let _ = r.get_mut();
}

#[test]
fn reader_reads_one_byte_per_read() {
    let (msgs, bytes) = three_messages();
    let mut r = MessageReader::new(OneByte(Cursor::new(bytes)));
    assert_eq!(read_all(&mut r, &Limits::DEFAULT).unwrap(), msgs);
}

#[test]
fn reader_reads_any_chunking() {
    let (msgs, bytes) = three_messages();
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for max in [2, 3, 7, 64, 1000, 20_000, 100_000] {
        let mut r = MessageReader::new(Chunky {
            inner: Cursor::new(bytes.clone()),
            rng: StdRng::seed_from_u64(rng.gen()),
            max,
        });
        assert_eq!(
            read_all(&mut r, &Limits::DEFAULT).unwrap(),
            msgs,
            "max {max}"
        );
    }
}

// ---------------------------------------------------------------------------
// Round trip
// ---------------------------------------------------------------------------

const TCHARS: &[u8] =
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

fn gen_method(rng: &mut StdRng) -> String {
    const REST: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-";
    let mut s = String::new();
    s.push(rng.gen_range(b'A'..=b'Z') as char);
    for _ in 0..rng.gen_range(0..16) {
        s.push(REST[rng.gen_range(0..REST.len())] as char);
    }
    s
}

fn gen_name(rng: &mut StdRng) -> String {
    loop {
        let len = rng.gen_range(1..=20);
        let s: String = (0..len)
            .map(|_| TCHARS[rng.gen_range(0..TCHARS.len())] as char)
            .collect();
        if !s.eq_ignore_ascii_case("content-length") {
            return s;
        }
    }
}

/// Printable ASCII; spaces only inside (the parser trims the edges).
fn gen_value(rng: &mut StdRng, max: usize) -> String {
    let len = rng.gen_range(0..=max);
    (0..len)
        .map(|i| {
            if i == 0 || i + 1 == len || rng.gen_ratio(4, 5) {
                rng.gen_range(0x21u8..=0x7e) as char
            } else {
                ' '
            }
        })
        .collect()
}

/// Printable ASCII with spaces anywhere (reasons are not trimmed).
fn gen_reason(rng: &mut StdRng) -> String {
    let len = rng.gen_range(0..40);
    (0..len)
        .map(|_| rng.gen_range(0x20u8..=0x7e) as char)
        .collect()
}

fn gen_body(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.gen_range(0..100) {
        0..=29 => 0,
        30..=94 => rng.gen_range(1..300),
        _ => rng.gen_range(1000..70_000),
    };
    let mut body: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
    // Sprinkle line endings and wire-looking text into the body.
    for _ in 0..rng.gen_range(0..4) {
        if body.is_empty() {
            break;
        }
        let at = rng.gen_range(0..body.len());
        let piece: &[u8] = match rng.gen_range(0..4) {
            0 => b"\r\n",
            1 => b"\r\n\r\n",
            2 => b"\r\nContent-Length: 9\r\n\r\n",
            _ => b"\n\r",
        };
        body.splice(at..at, piece.iter().copied());
    }
    body
}

fn gen_message(rng: &mut StdRng) -> Message {
    let mut m = if rng.gen_bool(0.5) {
        Message::request(&gen_method(rng))
    } else {
        Message::reply(rng.gen_range(100..=999), &gen_reason(rng))
    };
    let mut long_used = false;
    let mut names: Vec<String> = Vec::new();
    for _ in 0..rng.gen_range(0..12) {
        let name = if !names.is_empty() && rng.gen_ratio(1, 8) {
            // Repeated names are allowed; flip the case to test lookup.
            names[rng.gen_range(0..names.len())].to_ascii_uppercase()
        } else {
            gen_name(rng)
        };
        let max = if !long_used && rng.gen_ratio(1, 20) {
            long_used = true;
            1500
        } else {
            60
        };
        let value = gen_value(rng, max);
        m.headers.push(&name, &value);
        names.push(name);
    }
    m.body = gen_body(rng);
    m
}

#[test]
fn encode_then_parse_round_trips() {
    let mut rng = StdRng::seed_from_u64(0x0123_4567_89ab_cdef);
    let mut stream = Vec::new();
    let mut all = Vec::new();
    for i in 0..3000 {
        let m = gen_message(&mut rng);
        let bytes = m.encode();
        assert_eq!(m.encoded_len(), bytes.len(), "message {i}: {m:?}");
        let (got, used) = parse_ok(&bytes, &Limits::DEFAULT);
        assert_eq!(used, bytes.len());
        assert_eq!(got, m, "message {i}");
        // Lookup ignores case and finds the first of repeated names.
        for (name, value) in m.headers.iter() {
            let first = m.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name));
            assert_eq!(
                got.header(&name.to_ascii_lowercase()),
                first.map(|(_, v)| v)
            );
            assert!(got.headers.get_all(name).any(|v| v == value));
        }
        // encode_into appends.
        let mut out = b"prefix".to_vec();
        m.encode_into(&mut out);
        assert_eq!(&out[6..], &bytes[..]);
        stream.extend_from_slice(&bytes);
        all.push(m);
    }
    // The same messages back to back, through a reader with random reads.
    let mut r = MessageReader::new(Chunky {
        inner: Cursor::new(stream),
        rng: StdRng::seed_from_u64(7),
        max: 5000,
    });
    assert_eq!(read_all(&mut r, &Limits::DEFAULT).unwrap(), all);
}

#[test]
fn builders_cannot_inject_headers() {
    let m = Message::request("LOGIN")
        .with_header("User", "eve\r\nContent-Length: 99\r\n\r\nX")
        .with_header("Tab", "a\tb\u{e9}c");
    let (got, _) = parse_ok(&m.encode(), &Limits::DEFAULT);
    assert_eq!(got.headers.len(), 2);
    assert_eq!(got.header("user"), Some("eve  Content-Length: 99    X"));
    assert_eq!(got.header("TAB"), Some("a b c"));
    assert!(got.body.is_empty());

    let r = Message::reply(500, "oops\r\n\r\nINJECT");
    assert_eq!(r.reason(), Some("oops    INJECT"));
    assert_eq!(parse_ok(&r.encode(), &Limits::DEFAULT).0, r);
    assert_eq!(r.code(), Some(500));
    assert!(!r.is_success());
    assert!(Message::ok().is_success());
    assert_eq!(
        Message::ok().encode(),
        b"200 OK\r\nContent-Length: 0\r\n\r\n\r\n"
    );
    assert_eq!(
        Message::request("PING").encode(),
        b"PING\r\nContent-Length: 0\r\n\r\n\r\n"
    );
}

#[test]
fn parser_normalises_what_it_accepts() {
    // Optional whitespace around values and leading zeros in the length.
    let input = b"200 \r\nA:\t x y \t\r\nB:\r\ncontent-length: 003\r\n\r\nabc\r\n";
    let (m, used) = parse_ok(input, &Limits::DEFAULT);
    assert_eq!(used, input.len());
    assert_eq!(
        m.start,
        Start::Reply {
            code: 200,
            reason: String::new()
        }
    );
    assert_eq!(m.header("a"), Some("x y"));
    assert_eq!(m.header("b"), Some(""));
    assert_eq!(m.header("content-length"), None);
    assert_eq!(m.body, b"abc");
    assert_eq!(parse_ok(&m.encode(), &Limits::DEFAULT).0, m);
    // Headers::remove and friends.
    let mut h = m.headers.clone();
    assert!(h.remove("A"));
    assert!(!h.remove("A"));
    assert_eq!(h.len(), 1);
    assert!(!h.is_empty());
}

// ---------------------------------------------------------------------------
// Random and mutated input: no panic, and every layer agrees
// ---------------------------------------------------------------------------

/// Feeds `input` to `parse`, `parse_head` and readers under `limits`, and
/// checks that they agree with each other and that accepted messages round
/// trip.
fn check_input(input: &[u8], limits: &Limits, bytewise: bool) {
    let parsed = parse(input, limits);
    let head = parse_head(input, limits);
    match (&parsed, &head) {
        (Err(e), Err(h)) => assert_eq!(e, h),
        (Err(Error::MissingBodyTerminator), Ok(Some(_))) => {}
        (Ok(Status::Incomplete), Ok(_)) => {}
        (Ok(Status::Complete { used, message }), Ok(Some(h))) => {
            assert!(*used <= input.len());
            assert_eq!(*used, h.len + message.body.len() + 2);
            assert_eq!(&input[h.len..h.len + message.body.len()], &message.body[..]);
            // The encoder reproduces an accepted message exactly (its bytes
            // may differ: whitespace, leading zeros).
            let enc = message.encode();
            assert_eq!(enc.len(), message.encoded_len());
            let (again, used2) = parse_ok(&enc, &ROOMY);
            assert_eq!(&again, message);
            assert_eq!(used2, enc.len());
        }
        other => panic!("parse and parse_head disagree: {other:?}"),
    }

    // A reader that gets the whole input in one read sees exactly what
    // `parse` sees.
    if input.len() <= 16 * 1024 {
        let read = first_from_cursor(input, limits);
        match (&parsed, read) {
            (Ok(Status::Complete { message, .. }), Ok(Some(m))) => assert_eq!(&m, message),
            (_, Ok(None)) => assert!(input.is_empty()),
            (Err(e), Err(IoError::Wire(r))) => assert_eq!(e, &r),
            (Ok(Status::Incomplete), Err(IoError::Wire(r))) => {
                let want = if matches!(head, Ok(Some(_))) {
                    Error::TruncatedBody
                } else {
                    Error::EofInHeaders
                };
                assert_eq!(r, want);
            }
            (p, r) => panic!("parse {p:?} but reader {r:?}"),
        }
    }

    // Byte by byte a reader accepts the same message, or refuses.
    if bytewise {
        let mut r = MessageReader::new(OneByte(Cursor::new(input.to_vec())));
        let read = r.read_message(limits, far());
        match (&parsed, read) {
            (Ok(Status::Complete { message, .. }), Ok(Some(m))) => assert_eq!(&m, message),
            (_, Ok(None)) => assert!(input.is_empty()),
            (Ok(Status::Complete { .. }), Err(e)) => panic!("parse accepted, reader: {e}"),
            // A prefix never breaks a rule that the whole input keeps.
            (Ok(Status::Incomplete), Err(IoError::Wire(e))) => assert!(
                matches!(e, Error::EofInHeaders | Error::TruncatedBody),
                "one-byte reader refused with {e:?} what parse found incomplete"
            ),
            (Err(_), Err(IoError::Wire(_))) => {}
            (p, r) => panic!("parse {p:?} but one-byte reader {r:?}"),
        }
    }
}

const ALL_LIMITS: [Limits; 5] = [Limits::DEFAULT, TIGHT, TINY, ZERO, ROOMY];

/// Bytes that matter to the grammar, so random input reaches deep states.
const SPECIAL: &[u8] = b"\r\n\r\n:: -+0123456789\t\x00\x7f\xffAZaz@";

fn random_input(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.gen_range(0..160);
    match rng.gen_range(0..3) {
        0 => (0..len).map(|_| rng.gen()).collect(),
        1 => (0..len)
            .map(|_| SPECIAL[rng.gen_range(0..SPECIAL.len())])
            .collect(),
        _ => {
            // A plausible skeleton with random pieces.
            let mut v = Vec::new();
            v.extend_from_slice(if rng.gen() {
                b"LOGIN\r\n"
            } else {
                b"200 OK\r\n"
            });
            for _ in 0..rng.gen_range(0..4) {
                v.extend(
                    (0..rng.gen_range(0..12)).map(|_| SPECIAL[rng.gen_range(0..SPECIAL.len())]),
                );
                v.extend_from_slice(b"\r\n");
            }
            v.extend_from_slice(
                format!("Content-Length: {}\r\n\r\n", rng.gen_range(0..20)).as_bytes(),
            );
            v.extend((0..rng.gen_range(0..24)).map(|_| SPECIAL[rng.gen_range(0..SPECIAL.len())]));
            v
        }
    }
}

fn mutate(rng: &mut StdRng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.gen_range(1..=4) {
        let pick = |rng: &mut StdRng| -> u8 {
            if rng.gen() {
                SPECIAL[rng.gen_range(0..SPECIAL.len())]
            } else {
                rng.gen()
            }
        };
        match rng.gen_range(0..7) {
            0 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] = pick(rng);
            }
            1 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            2 => {
                let i = rng.gen_range(0..=v.len());
                let b = pick(rng);
                v.insert(i, b);
            }
            3 if !v.is_empty() => {
                let i = rng.gen_range(0..v.len());
                v.remove(i);
            }
            4 => {
                let i = rng.gen_range(0..=v.len());
                v.truncate(i);
            }
            5 if !v.is_empty() => {
                // Duplicate a slice (repeats a header line, say).
                let a = rng.gen_range(0..v.len());
                let b = rng.gen_range(a..=v.len().min(a + 40));
                let piece = v[a..b].to_vec();
                let at = rng.gen_range(0..=v.len());
                v.splice(at..at, piece);
            }
            _ => {
                let at = rng.gen_range(0..=v.len());
                let piece: &[u8] = match rng.gen_range(0..4) {
                    0 => b"Content-Length: 5\r\n",
                    1 => b"\r\n",
                    2 => b"X: y\r\n",
                    _ => b"Content-Length: -3\r\n",
                };
                v.splice(at..at, piece.iter().copied());
            }
        }
    }
    v
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = StdRng::seed_from_u64(0xf00d_cafe);
    for i in 0..20_000 {
        let input = random_input(&mut rng);
        for limits in &ALL_LIMITS {
            check_input(&input, limits, i % 16 == 0);
        }
    }
}

#[test]
fn mutated_messages_never_panic() {
    let mut rng = StdRng::seed_from_u64(0xbad_5eed);
    let seeds: Vec<Vec<u8>> = (0..64)
        .map(|_| {
            let mut m = gen_message(&mut rng);
            m.body.truncate(200);
            m.encode()
        })
        .chain([
            tricky_request().encode(),
            reply_with_body().encode(),
            Message::ok().encode(),
        ])
        .collect();
    let mut accepted = 0;
    for i in 0..6_000 {
        let base = seeds[rng.gen_range(0..seeds.len())].clone();
        let input = mutate(&mut rng, base);
        for limits in &ALL_LIMITS {
            check_input(&input, limits, i % 16 == 0 && input.len() < 600);
        }
        if matches!(parse(&input, &Limits::DEFAULT), Ok(Status::Complete { .. })) {
            accepted += 1;
        }
    }
    // The mutations keep a fair share valid, so the round-trip checks run.
    assert!(accepted > 300, "only {accepted} mutated inputs parsed");
}

/// Pipelined streams of random, valid and mutated messages never panic the
/// reader, whatever the chunking.
#[test]
fn random_streams_through_the_reader() {
    let mut rng = StdRng::seed_from_u64(0x57_4ea3);
    for _ in 0..300 {
        let mut stream = Vec::new();
        for _ in 0..rng.gen_range(1..6) {
            let mut m = gen_message(&mut rng);
            m.body.truncate(300);
            let bytes = m.encode();
            let bytes = if rng.gen_ratio(1, 3) {
                mutate(&mut rng, bytes)
            } else {
                bytes
            };
            stream.extend_from_slice(&bytes);
        }
        for limits in [Limits::DEFAULT, TIGHT] {
            // Chunked and whole reads end the same way.
            let mut whole = MessageReader::new(Cursor::new(stream.clone()));
            let mut chunky = MessageReader::new(Chunky {
                inner: Cursor::new(stream.clone()),
                rng: StdRng::seed_from_u64(rng.gen()),
                max: rng.gen_range(1..64),
            });
            let a = read_all(&mut whole, &limits);
            let b = read_all(&mut chunky, &limits);
            match (a, b) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(IoError::Wire(_)), Err(IoError::Wire(_))) => {}
                (a, b) => panic!("whole {a:?} vs chunked {b:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Deadlines on real sockets
// ---------------------------------------------------------------------------

fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

/// Writes `bytes` one at a time, `gap` apart, until done or told to stop.
fn trickle(mut to: TcpStream, bytes: Vec<u8>, gap: Duration, stop: Arc<AtomicBool>) {
    for b in bytes {
        if stop.load(Ordering::Relaxed) || to.write_all(&[b]).is_err() {
            return;
        }
        thread::sleep(gap);
    }
}

/// A peer that sends a byte every 50 ms keeps every single read short, yet
/// the message as a whole must be in by its deadline.
#[test]
fn trickling_peer_times_out_at_the_absolute_deadline() {
    let msg = tricky_request().encode();
    let head_len = msg.len() - tricky_request().body.len() - 2;
    // Trickle the head; then send the head at once and trickle the body.
    for (upfront, trickled) in [
        (Vec::new(), msg.clone()),
        (msg[..head_len].to_vec(), msg[head_len..].to_vec()),
    ] {
        let (mut writer, reader) = socket_pair();
        writer.write_all(&upfront).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let t = thread::spawn(move || trickle(writer, trickled, Duration::from_millis(50), s));

        let mut r = MessageReader::new(reader);
        let begin = Instant::now();
        let got = r.read_message(&Limits::DEFAULT, begin + Duration::from_millis(300));
        let took = begin.elapsed();
        stop.store(true, Ordering::Relaxed);
        assert!(matches!(got, Err(IoError::Timeout)), "got {got:?}");
        assert!(took >= Duration::from_millis(290), "took {took:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        drop(r);
        t.join().unwrap();
    }
}

#[test]
fn silent_peer_and_passed_deadline_time_out() {
    let (_writer, reader) = socket_pair();
    let mut r = MessageReader::new(reader);
    let begin = Instant::now();
    let got = r.read_message(&Limits::DEFAULT, begin + Duration::from_millis(100));
    assert!(matches!(got, Err(IoError::Timeout)), "got {got:?}");
    assert!(begin.elapsed() < Duration::from_secs(2));
    // A deadline already past fails at once.
    let got = r.read_message(&Limits::DEFAULT, Instant::now());
    assert!(matches!(got, Err(IoError::Timeout)), "got {got:?}");
    assert!(IoError::Timeout.to_string().contains("deadline"));
}

#[test]
fn message_over_a_socket_arrives_whole() {
    let (mut writer, reader) = socket_pair();
    let (msgs, _) = three_messages();
    let sent = msgs.clone();
    let t = thread::spawn(move || {
        for m in &sent {
            write_message(&mut writer, m, Instant::now() + Duration::from_secs(10)).unwrap();
        }
    });
    let mut r = MessageReader::new(reader);
    let got = read_all(&mut r, &Limits::DEFAULT).unwrap();
    assert_eq!(got, msgs);
    t.join().unwrap();
}

/// A peer that never reads fills the socket buffers; the writer must give up
/// at its deadline instead of blocking forever.
#[test]
fn writer_to_a_peer_that_never_reads_times_out() {
    let (mut writer, _silent) = socket_pair();
    // Far more than loopback socket buffers hold (send + receive).
    let big = Message::request("FILE-DATA").with_body(vec![b'z'; 64 << 20]);

    let begin = Instant::now();
    let got = write_message(&mut writer, &big, begin + Duration::from_millis(400));
    let took = begin.elapsed();
    assert!(matches!(got, Err(IoError::Timeout)), "got {got:?}");
    assert!(took >= Duration::from_millis(390), "took {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");

    // The buffers are full now: even a few bytes cannot go.
    let begin = Instant::now();
    let got = write_all_by(&mut writer, &big.body, begin + Duration::from_millis(200));
    assert!(matches!(got, Err(IoError::Timeout)), "got {got:?}");
    assert!(begin.elapsed() < Duration::from_secs(2));
}
