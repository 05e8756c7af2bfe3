//! The typed message and its encoder.
//!
//! A message is a start line (a request's method, or a reply's code and
//! reason), ordered headers with case-insensitive lookup, and a body of any
//! bytes. Content-Length is not stored: the encoder writes it from the body
//! and the parser consumes it.

/// The first line of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// A request: one method token such as `LOGIN` or `INIT-ACK`.
    Request(String),
    /// A reply: a three-digit code (see [`crate::wire::code`]) and a reason.
    Reply {
        /// The status code, 100..=999.
        code: u16,
        /// Human-readable reason, printable ASCII.
        reason: String,
    },
}

/// Ordered headers; lookup ignores ASCII case as in HTTP.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// An empty header list.
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    /// The value of the first header called `name`, ignoring case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of headers called `name`, in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Appends a header. The name must be a token (a programming error
    /// otherwise: names are constants); CR, LF and other control characters
    /// in the value become spaces so that no value can inject a header.
    pub fn push(&mut self, name: &str, value: &str) {
        assert!(
            is_token(name.as_bytes()),
            "header name {name:?} is not a token"
        );
        // The encoder writes Content-Length from the body; a second one
        // would make the message invalid.
        assert!(
            !name.eq_ignore_ascii_case("content-length"),
            "Content-Length is written by the encoder"
        );
        self.0.push((name.to_owned(), printable(value)));
    }

    /// Appends a header already validated by the parser.
    pub(crate) fn push_unchecked(&mut self, name: String, value: String) {
        self.0.push((name, value));
    }

    /// Removes every header called `name`; returns whether any was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        before != self.0.len()
    }

    /// The headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// How many headers there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One message of any link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Request method or reply status.
    pub start: Start,
    /// Headers other than Content-Length.
    pub headers: Headers,
    /// The body; its length is the Content-Length on the wire.
    pub body: Vec<u8>,
}

impl Message {
    /// A request with the given method token.
    pub fn request(method: &str) -> Message {
        assert!(
            is_method(method.as_bytes()),
            "method {method:?} is not a token"
        );
        Message {
            start: Start::Request(method.to_owned()),
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// A reply with `code` and `reason` (control characters become spaces).
    pub fn reply(code: u16, reason: &str) -> Message {
        assert!(
            (100..=999).contains(&code),
            "reply code {code} out of range"
        );
        let reason = printable(reason);
        Message {
            start: Start::Reply { code, reason },
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// `200 OK`.
    pub fn ok() -> Message {
        Message::reply(super::code::OK, "OK")
    }

    /// Builder: appends a header (see [`Headers::push`]).
    pub fn with_header(mut self, name: &str, value: impl std::fmt::Display) -> Message {
        self.headers.push(name, &value.to_string());
        self
    }

    /// Builder: sets the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Message {
        self.body = body.into();
        self
    }

    /// The first value of header `name`, ignoring case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The method, if this is a request.
    pub fn method(&self) -> Option<&str> {
        match &self.start {
            Start::Request(m) => Some(m),
            Start::Reply { .. } => None,
        }
    }

    /// The code, if this is a reply.
    pub fn code(&self) -> Option<u16> {
        match &self.start {
            Start::Reply { code, .. } => Some(*code),
            Start::Request(_) => None,
        }
    }

    /// The reason, if this is a reply.
    pub fn reason(&self) -> Option<&str> {
        match &self.start {
            Start::Reply { reason, .. } => Some(reason),
            Start::Request(_) => None,
        }
    }

    /// Whether this is a reply with a 2xx code.
    pub fn is_success(&self) -> bool {
        matches!(self.code(), Some(200..=299))
    }

    /// The encoded message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded message to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode_head_for(self.body.len(), out);
        out.extend_from_slice(&self.body);
        out.extend_from_slice(b"\r\n");
    }

    /// Appends what precedes the body: the start line, the headers and a
    /// `Content-Length` of `body_len`, through the blank line. With the
    /// message's own body length, followed by the body and a CRLF, this is
    /// exactly [`Message::encode`]; with another length it lets a caller
    /// supply a body held elsewhere without copying it into the message.
    pub fn encode_head_for(&self, body_len: usize, out: &mut Vec<u8>) {
        match &self.start {
            Start::Request(m) => out.extend_from_slice(m.as_bytes()),
            Start::Reply { code, reason } => {
                push_decimal(out, usize::from(*code));
                out.push(b' ');
                out.extend_from_slice(reason.as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        for (n, v) in self.headers.iter() {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, body_len);
        out.extend_from_slice(b"\r\n\r\n");
    }

    /// Exact size of [`Message::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        self.head_len_for(self.body.len()) + self.body.len() + 2
    }

    /// Exact size of [`Message::encode_head_for`]'s output.
    pub fn head_len_for(&self, body_len: usize) -> usize {
        let start = match &self.start {
            Start::Request(m) => m.len(),
            Start::Reply { code, reason } => decimal_len(usize::from(*code)) + 1 + reason.len(),
        };
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 4)
            .sum();
        let cl = "Content-Length: ".len() + decimal_len(body_len) + 2;
        start + 2 + headers + cl + 2
    }
}

/// `s` with every character other than printable ASCII and space replaced
/// by a space (one per character), so that no value can break a line.
fn printable(s: &str) -> String {
    let keep = |b: u8| b.is_ascii_graphic() || b == b' ';
    if s.bytes().all(keep) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_ascii() && keep(c as u8) {
                c
            } else {
                ' '
            }
        })
        .collect()
}

/// Appends `n` in decimal without allocating.
fn push_decimal(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn decimal_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// RFC 9110 `tchar`: what a header name may contain.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A non-empty run of `tchar`s.
pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// A method: upper-case letters, digits and `-`, starting with a letter
/// (`LOGIN`, `INIT-ACK`), so that it can never be mistaken for a reply code.
pub(crate) fn is_method(s: &[u8]) -> bool {
    matches!(s.first(), Some(b) if b.is_ascii_uppercase())
        && s.iter()
            .all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_reasons_lose_what_could_break_a_line() {
        let mut h = Headers::new();
        h.push("A", "plain value ~!");
        h.push("B", "two\r\nInjected: yes");
        h.push("C", "caf\u{e9} \u{1f600}\t!");
        let values: Vec<&str> = h.iter().map(|(_, v)| v).collect();
        assert_eq!(values, ["plain value ~!", "two  Injected: yes", "caf    !"]);
        assert_eq!(Message::reply(200, "ok\nthen").reason(), Some("ok then"));
    }

    #[test]
    fn decimals_are_written_without_allocating() {
        for n in [0usize, 7, 10, 99, 100, 12345, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
            assert_eq!(decimal_len(n), out.len());
        }
    }
}
