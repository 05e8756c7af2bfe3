//! The parser: bytes in, typed message out, no I/O.
//!
//! [`parse_head`] reads the start line and headers and stops at the blank
//! line, so that a reader can check the claimed body length before it reads
//! (or allocates) the body; [`parse`] does the whole message from one buffer.

use super::error::Error;
use super::limits::Limits;
use super::message::{is_method, is_token, Headers, Message, Start};

/// What [`parse`] found in a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Status {
    /// More bytes are needed; nothing seen so far breaks a rule or a limit.
    Incomplete,
    /// One whole message, and how many bytes of the buffer it used.
    Complete {
        /// The message.
        message: Message,
        /// Bytes consumed, the trailing CRLF included.
        used: usize,
    },
}

/// A parsed start line and headers, before the body.
#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    /// Method or reply status.
    pub start: Start,
    /// Headers without Content-Length.
    pub headers: Headers,
    /// The claimed body length, already checked against the body limit.
    pub content_length: usize,
    /// Bytes of the header block, blank line included.
    pub len: usize,
}

impl Head {
    /// Joins the head with its body.
    pub fn into_message(self, body: Vec<u8>) -> Message {
        Message {
            start: self.start,
            headers: self.headers,
            body,
        }
    }
}

/// Parses one whole message from the front of `buf`.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Status, Error> {
    let Some(head) = parse_head(buf, limits)? else {
        return Ok(Status::Incomplete);
    };
    let body_start = head.len;
    let body_end = body_start + head.content_length;
    if buf.len() < body_end + 2 {
        return Ok(Status::Incomplete);
    }
    if &buf[body_end..body_end + 2] != b"\r\n" {
        return Err(Error::MissingBodyTerminator);
    }
    let body = buf[body_start..body_end].to_vec();
    Ok(Status::Complete {
        message: head.into_message(body),
        used: body_end + 2,
    })
}

/// Parses the start line and headers at the front of `buf`; `Ok(None)`
/// when the blank line has not arrived yet and no limit is exceeded.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, Error> {
    let mut pos = 0;
    let Some(line) = next_line(buf, pos, limits)? else {
        return incomplete(buf, limits);
    };
    let start = parse_start(line)?;
    pos += line.len() + 2;

    let mut headers = Headers::new();
    let mut content_length: Option<usize> = None;
    let mut count = 0usize;
    loop {
        if pos > limits.max_header_bytes {
            return Err(Error::HeaderBlockTooLarge);
        }
        let Some(line) = next_line(buf, pos, limits)? else {
            return incomplete(buf, limits);
        };
        pos += line.len() + 2;
        if line.is_empty() {
            break;
        }
        count += 1;
        if count > limits.max_headers {
            return Err(Error::TooManyHeaders);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(Error::HeaderWithoutColon)?;
        let name = &line[..colon];
        if !is_token(name) {
            return Err(Error::InvalidHeaderName);
        }
        let value = trim(&line[colon + 1..]);
        if !value
            .iter()
            .all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
        {
            return Err(Error::InvalidHeaderValue);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            if content_length.is_some() {
                return Err(Error::DuplicateContentLength);
            }
            content_length = Some(parse_length(value, limits)?);
        } else {
            // Both slices are checked ASCII above, so these cannot fail.
            let name = ascii_string(name);
            let value = ascii_string(value);
            headers.push_unchecked(name, value);
        }
    }
    if pos > limits.max_header_bytes {
        return Err(Error::HeaderBlockTooLarge);
    }
    let content_length = content_length.ok_or(Error::MissingContentLength)?;
    Ok(Some(Head {
        start,
        headers,
        content_length,
        len: pos,
    }))
}

/// What an incomplete head means: fine, unless it is already too large.
fn incomplete(buf: &[u8], limits: &Limits) -> Result<Option<Head>, Error> {
    if buf.len() > limits.max_header_bytes {
        Err(Error::HeaderBlockTooLarge)
    } else {
        Ok(None)
    }
}

/// The line starting at `pos` without its CRLF; `None` if its end has not
/// arrived. Checks line length, bare LF and bare CR.
fn next_line<'a>(buf: &'a [u8], pos: usize, limits: &Limits) -> Result<Option<&'a [u8]>, Error> {
    let rest = &buf[pos.min(buf.len())..];
    let window = &rest[..rest.len().min(limits.max_line)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) => {
            if lf == 0 || window[lf - 1] != b'\r' {
                return Err(Error::BareLf);
            }
            let line = &window[..lf - 1];
            if line.contains(&b'\r') {
                return Err(Error::BareCr);
            }
            Ok(Some(line))
        }
        None if rest.len() >= limits.max_line => Err(Error::LineTooLong),
        None => {
            // A CR that is not the last byte so far can no longer be part of CRLF.
            if let Some(cr) = window.iter().position(|&b| b == b'\r') {
                if cr + 1 < window.len() {
                    return Err(Error::BareCr);
                }
            }
            Ok(None)
        }
    }
}

fn parse_start(line: &[u8]) -> Result<Start, Error> {
    if line.first().is_some_and(u8::is_ascii_digit) {
        if line.len() < 4 || line[3] != b' ' || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(Error::InvalidStartLine);
        }
        let reason = &line[4..];
        if !reason.iter().all(|&b| b == b' ' || b.is_ascii_graphic()) {
            return Err(Error::InvalidStartLine);
        }
        let code = line[..3]
            .iter()
            .fold(0u16, |acc, &d| acc * 10 + u16::from(d - b'0'));
        if code < 100 {
            return Err(Error::InvalidStartLine);
        }
        Ok(Start::Reply {
            code,
            reason: ascii_string(reason),
        })
    } else if is_method(line) {
        Ok(Start::Request(ascii_string(line)))
    } else {
        Err(Error::InvalidStartLine)
    }
}

/// The largest Content-Length any limit can allow: body and CRLF in one buffer.
const MAX_CONTENT_LENGTH: u64 = isize::MAX as u64 - 2;

fn parse_length(value: &[u8], limits: &Limits) -> Result<usize, Error> {
    let digits = match value.first() {
        Some(b'-') if value.len() > 1 && value[1..].iter().all(u8::is_ascii_digit) => {
            return Err(Error::NegativeContentLength)
        }
        _ => value,
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Error::NonNumericContentLength);
    }
    let mut n: u64 = 0;
    for &d in digits {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(Error::OverflowingContentLength)?;
    }
    // Whatever the limit says, a body plus its CRLF must fit in one buffer
    // (at most `isize::MAX` bytes), which also keeps `head + body + 2` from
    // overflowing `usize` when the limit is `usize::MAX`.
    if n > limits.max_body as u64 || n > MAX_CONTENT_LENGTH {
        return Err(Error::BodyTooLarge);
    }
    Ok(n as usize)
}

/// Bytes already checked to be ASCII as a string (lossy, should they not be).
fn ascii_string(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}
