//! Fuzz target: `wire::io::MessageReader` over an in-memory stream. The
//! first input byte picks the limits (unbounded ones included) and the
//! largest read size (so heads and bodies are split at every possible
//! place); the rest is the stream.
//! The reader must never panic, and the messages it returns must be exactly
//! those that repeated `parse` calls find in the same bytes.
#![no_main]

use std::io::{self, Cursor, Read};
use std::time::{Duration, Instant};

use ims::wire::io::{Deadlines, IoError, MessageReader};
use ims::wire::{parse, Error, Limits, Status};
use libfuzzer_sys::fuzz_target;

const TIGHT: Limits = Limits {
    max_line: 32,
    max_headers: 4,
    max_header_bytes: 96,
    max_body: 16,
    max_file_body: 24,
};

/// Only the format itself refuses anything under these.
const ROOMY: Limits = Limits {
    max_line: usize::MAX,
    max_headers: usize::MAX,
    max_header_bytes: usize::MAX,
    max_body: usize::MAX,
    max_file_body: usize::MAX,
};

/// Hands out at most `max` bytes per read.
struct Chunks {
    inner: Cursor<Vec<u8>>,
    max: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.max);
        self.inner.read(&mut buf[..n])
    }
}

impl Deadlines for Chunks {
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, stream)) = data.split_first() else {
        return;
    };
    let limits = match control & 7 {
        0 | 5 => Limits::DEFAULT,
        1 | 6 => TIGHT,
        2 => Limits::DEFAULT.for_files(),
        3 => ROOMY,
        _ => Limits {
            max_line: 8,
            max_headers: 1,
            max_header_bytes: 24,
            max_body: 4,
            max_file_body: 4,
        },
    };
    let max = match control >> 3 {
        0 => usize::MAX,
        n => usize::from(n),
    };
    let mut reader = MessageReader::new(Chunks {
        inner: Cursor::new(stream.to_vec()),
        max,
    });

    // What parse finds, message after message.
    let mut expected = Vec::new();
    let mut rest = stream;
    let end = loop {
        match parse(rest, &limits) {
            Ok(Status::Complete { message, used }) => {
                expected.push(message);
                rest = &rest[used..];
            }
            Ok(Status::Incomplete) => break None,
            Err(e) => break Some(e),
        }
    };

    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut got = Vec::new();
    let outcome = loop {
        match reader.read_message(&limits, deadline) {
            Ok(Some(m)) => got.push(m),
            Ok(None) => break None,
            Err(IoError::Wire(e)) => break Some(e),
            Err(e) => panic!("in-memory stream failed: {e}"),
        }
    };
    assert_eq!(got, expected);
    match (end, outcome) {
        // Clean end: nothing left over.
        (None, None) => assert!(rest.is_empty()),
        // The stream ended inside a message.
        (None, Some(e)) => assert!(
            matches!(e, Error::EofInHeaders | Error::TruncatedBody),
            "reader refused with {e:?} what parse found incomplete"
        ),
        // A message broke a rule; a reader that saw it in pieces may name
        // another rule it broke first, but it refuses too.
        (Some(_), Some(_)) => {}
        (Some(e), None) => panic!("parse refused with {e:?}, reader reached a clean end"),
    }
});
