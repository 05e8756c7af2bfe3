//! The AEAD envelope every link uses.
//!
//! A sealed message is an ordinary [`wire::Message`] (the *outer* one) whose
//! body is another message (the *inner* one), encoded and encrypted with
//! AES-256-GCM:
//!
//! ```text
//! METHOD-or-"NNN reason"
//! <clear routing headers, e.g. From, To>    (readable by relays)
//! Dir: i2r | r2i
//! Seq: <decimal u64>
//! Content-Length: N
//!
//! AES-256-GCM(key[dir], nonce = tag(dir) || seq, aad = canonical(outer),
//!             inner.encode())
//! ```
//!
//! The start line and every outer header are authenticated as associated
//! data, so a relay can read the routing headers but not change, add,
//! remove or reorder them. Each direction has its own key and its own
//! nonce tag, and the sequence number makes each nonce unique; the
//! receiver accepts only increasing sequence numbers (gaps allowed), which
//! stops replays, reordering and reflection of a party's own messages.
//!
//! Keys come from [`SessionKeys::derive`]: HKDF-SHA256 over a secret shared
//! by the two parties with both parties' fresh nonces as salt, so every
//! session gets new keys and sequence numbers can safely restart at 0.

use crate::crypto::{self, hkdf_sha256_32, GcmKey};
use crate::wire::{self, Headers, Limits, Message, Start};
use std::fmt;
use std::ops::Range;

/// The outer header carrying the sender's direction.
pub const DIR_HEADER: &str = "Dir";
/// The outer header carrying the sender's sequence number.
pub const SEQ_HEADER: &str = "Seq";

/// HKDF info labels of the two directions' keys.
const I2R_INFO: &[u8] = b"ims seal i2r v1";
const R2I_INFO: &[u8] = b"ims seal r2i v1";
/// Domain separator at the front of the associated data.
const AAD_LABEL: &[u8] = b"ims seal aad v1\0";

/// Which end of the link this party is. The initiator is whoever opened
/// the connection (or sent the first handshake message); both sides must
/// agree, since it decides which key each one sends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sends with the i2r key, receives with the r2i key.
    Initiator,
    /// Sends with the r2i key, receives with the i2r key.
    Responder,
}

/// A direction of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    I2r,
    R2i,
}

impl Dir {
    fn label(self) -> &'static str {
        match self {
            Dir::I2r => "i2r",
            Dir::R2i => "r2i",
        }
    }

    fn parse(s: &str) -> Option<Dir> {
        match s {
            "i2r" => Some(Dir::I2r),
            "r2i" => Some(Dir::R2i),
            _ => None,
        }
    }

    /// The first 4 nonce bytes. The keys already differ per direction;
    /// distinct tags keep the nonces distinct even if they did not.
    fn nonce_tag(self) -> [u8; 4] {
        match self {
            Dir::I2r => [0, 0, 0, 1],
            Dir::R2i => [0, 0, 0, 2],
        }
    }

    fn nonce(self, seq: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.nonce_tag());
        n[4..].copy_from_slice(&seq.to_be_bytes());
        n
    }

    fn info(self) -> &'static [u8] {
        match self {
            Dir::I2r => I2R_INFO,
            Dir::R2i => R2I_INFO,
        }
    }
}

/// Why a message could not be sealed or opened. Every opening failure
/// means "drop this message"; none of them reveal plaintext.
#[derive(Debug, PartialEq, Eq)]
pub enum SealError {
    /// The outer message lacks exactly one valid `Dir` or `Seq` header, or
    /// (when sealing) a clear header uses a reserved name (`Dir`, `Seq`,
    /// `Content-Length`).
    Malformed(&'static str),
    /// The message carries the receiver's own sending direction: one of
    /// its own messages reflected back at it.
    Reflected,
    /// Authentication failed: wrong key, or the start line, a header or the
    /// body was altered.
    Tampered,
    /// An authentic message whose sequence number was already accepted.
    Replayed,
    /// An authentic message older than the newest one accepted and not
    /// seen before (or too old for the 64-message window to tell).
    OutOfOrder,
    /// The sender used every sequence number; the session must be rekeyed.
    Exhausted,
    /// The inner message is not a valid wire message (or, when sealing,
    /// would not be one under the limits the receiver applies).
    Inner(wire::Error),
    /// An unexpected failure of the crypto layer.
    Crypto(crypto::Error),
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealError::Malformed(what) => write!(f, "malformed sealed message: {what}"),
            SealError::Reflected => f.write_str("sealed message reflected back to its sender"),
            SealError::Tampered => f.write_str("sealed message failed authentication"),
            SealError::Replayed => f.write_str("sealed message replayed"),
            SealError::OutOfOrder => f.write_str("sealed message out of order"),
            SealError::Exhausted => f.write_str("sequence numbers exhausted"),
            SealError::Inner(e) => write!(f, "sealed inner message: {e}"),
            SealError::Crypto(e) => write!(f, "seal: {e}"),
        }
    }
}

impl std::error::Error for SealError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SealError::Inner(e) => Some(e),
            SealError::Crypto(e) => Some(e),
            _ => None,
        }
    }
}

impl From<crypto::Error> for SealError {
    fn from(e: crypto::Error) -> SealError {
        SealError::Crypto(e)
    }
}

/// Both halves of one party's end of a link.
pub struct SessionKeys {
    /// Seals what this party sends.
    pub send: Sealer,
    /// Opens what this party receives.
    pub recv: Opener,
}

impl SessionKeys {
    /// Derives this party's keys: HKDF-SHA256 with `ikm = secret`,
    /// `salt = context`, info `"ims seal i2r v1"` / `"ims seal r2i v1"`.
    ///
    /// `secret` is what the handshake established (e.g. an RSA-OAEP
    /// transported key, or SCRAM material); `context` must contain both
    /// parties' fresh nonces (and whatever else both sides agree on) so
    /// that each session has keys never used before.
    pub fn derive(secret: &[u8], context: &[u8], role: Role) -> SessionKeys {
        let (send, recv) = match role {
            Role::Initiator => (Dir::I2r, Dir::R2i),
            Role::Responder => (Dir::R2i, Dir::I2r),
        };
        SessionKeys {
            send: Sealer {
                key: GcmKey::new(hkdf_sha256_32(secret, context, send.info())),
                dir: send,
                next: Some(0),
            },
            recv: Opener {
                key: GcmKey::new(hkdf_sha256_32(secret, context, recv.info())),
                dir: recv,
                highest: None,
                seen: 0,
            },
        }
    }
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("send", &self.send)
            .field("recv", &self.recv)
            .finish()
    }
}

/// The sending half: turns inner messages into sealed outer ones with
/// sequence numbers 0, 1, 2, ...
pub struct Sealer {
    key: GcmKey,
    dir: Dir,
    /// The next sequence number; `None` once `u64::MAX` has been used.
    next: Option<u64>,
}

impl Sealer {
    /// Seals `inner` into a request `method` carrying the `clear` headers
    /// in order, then `Dir` and `Seq`.
    ///
    /// # Panics
    /// If `method` is not a method token or a clear header name is not a
    /// token (programming errors, as in [`Message::request`]).
    pub fn seal(
        &mut self,
        method: &str,
        clear: &[(&str, &str)],
        inner: &Message,
    ) -> Result<Message, SealError> {
        self.seal_outer(Message::request(method), clear, inner)
    }

    /// Seals `inner` into a reply `code reason`; otherwise as [`Sealer::seal`].
    pub fn seal_reply(
        &mut self,
        code: u16,
        reason: &str,
        clear: &[(&str, &str)],
        inner: &Message,
    ) -> Result<Message, SealError> {
        self.seal_outer(Message::reply(code, reason), clear, inner)
    }

    /// Seals `inner` under any outer start line.
    pub fn seal_start(
        &mut self,
        start: &Start,
        clear: &[(&str, &str)],
        inner: &Message,
    ) -> Result<Message, SealError> {
        // Rebuilt through the constructors so that their checks apply.
        let outer = match start {
            Start::Request(method) => Message::request(method),
            Start::Reply { code, reason } => Message::reply(*code, reason),
        };
        self.seal_outer(outer, clear, inner)
    }

    /// Seals an inner message that the caller has already encoded into
    /// `encoded` (exactly one whole message, as [`Message::encode`] makes
    /// it), encrypting it where it is: the returned request `method`
    /// carries `encoded` as its body, so a large inner body (a file chunk)
    /// is neither copied into a [`Message`] nor encoded again. Keep
    /// [`crypto::GCM_TAG_LEN`] bytes of spare capacity to spare a
    /// reallocation; take the buffer back from the result's body to reuse
    /// it. Refuses (and consumes no sequence number for) bytes that are not
    /// exactly one message under the limits receivers apply.
    pub fn seal_encoded(
        &mut self,
        method: &str,
        clear: &[(&str, &str)],
        encoded: Vec<u8>,
    ) -> Result<Message, SealError> {
        self.seal_body(Message::request(method), clear, encoded, |b| {
            check_whole(b).map(|_| ())
        })
    }

    /// The sequence number the next sealed message will carry; `None`
    /// once they are exhausted.
    pub fn next_seq(&self) -> Option<u64> {
        self.next
    }

    fn seal_outer(
        &mut self,
        outer: Message,
        clear: &[(&str, &str)],
        inner: &Message,
    ) -> Result<Message, SealError> {
        let mut body = Vec::with_capacity(inner.encoded_len() + crypto::GCM_TAG_LEN);
        inner.encode_into(&mut body);
        self.seal_body(outer, clear, body, |body| {
            match wire::parse_head(body, &inner_limits()) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(SealError::Malformed("inner message head incomplete")),
                Err(e) => Err(SealError::Inner(e)),
            }
        })
    }

    /// Adds the clear headers, `Dir` and `Seq` to `outer` and encrypts the
    /// encoded inner message `body` in place as its body, once `check`
    /// accepted it.
    fn seal_body(
        &mut self,
        mut outer: Message,
        clear: &[(&str, &str)],
        mut body: Vec<u8>,
        check: impl FnOnce(&[u8]) -> Result<(), SealError>,
    ) -> Result<Message, SealError> {
        let seq = self.next.ok_or(SealError::Exhausted)?;
        for &(name, value) in clear {
            if is_reserved(name) {
                return Err(SealError::Malformed(
                    "clear header may not be Dir, Seq or Content-Length",
                ));
            }
            outer.headers.push(name, value);
        }
        outer.headers.push(DIR_HEADER, self.dir.label());
        outer.headers.push(SEQ_HEADER, &seq.to_string());
        // Refuse here what the receiver would refuse after decrypting, so
        // that an oversized inner message fails at the sender.
        check(&body)?;
        let aad = aad(
            &outer.start,
            &outer.headers,
            body.len() + crypto::GCM_TAG_LEN,
        );
        self.key
            .seal_in_place(&self.dir.nonce(seq), &aad, &mut body)?;
        // Advance only once the nonce has really been used; after
        // u64::MAX there is no next nonce, never a wrap to 0.
        self.next = seq.checked_add(1);
        outer.body = body;
        Ok(outer)
    }
}

// The keys wipe themselves when dropped (see `GcmKey`).

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("dir", &self.dir.label())
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// The receiving half: authenticates, decrypts and orders sealed messages.
pub struct Opener {
    key: GcmKey,
    /// The direction this party receives (the peer's sending direction).
    dir: Dir,
    /// The highest accepted sequence number.
    highest: Option<u64>,
    /// Bit `i` set: sequence number `highest - i` was accepted.
    seen: u64,
}

/// How far back [`Opener`] remembers which sequence numbers it accepted.
pub const WINDOW: u64 = 64;

impl Opener {
    /// Opens a sealed message, returning the inner one.
    ///
    /// Order of checks: `Dir` (missing → `Malformed`, the receiver's own
    /// direction → `Reflected`), `Seq` (→ `Malformed`), authentication and
    /// decryption (→ `Tampered`), then the sequence window (→ `Replayed`,
    /// `OutOfOrder`), then the inner message (→ `Inner`, `Malformed`).
    /// The window changes only for authentic messages.
    pub fn open(&mut self, outer: &Message) -> Result<Message, SealError> {
        let (dir, seq) = self.check_header(outer)?;
        self.open_parts(dir, seq, &outer.start, &outer.headers, outer.body.clone())
            .map(Inner::into_message)
    }

    /// As [`Opener::open`], but decrypts inside the outer message's body
    /// instead of copying it first: the cheaper call for file chunks.
    pub fn open_owned(&mut self, outer: Message) -> Result<Message, SealError> {
        self.open_in_place(outer).map(Inner::into_message)
    }

    /// As [`Opener::open_owned`], but leaves the inner body where
    /// decryption put it, behind the inner head, instead of moving it to
    /// the front of the buffer: the cheapest call for file chunks.
    pub fn open_in_place(&mut self, outer: Message) -> Result<Inner, SealError> {
        let (dir, seq) = self.check_header(&outer)?;
        self.open_parts(dir, seq, &outer.start, &outer.headers, outer.body)
    }

    /// The highest sequence number accepted so far.
    pub fn highest_seq(&self) -> Option<u64> {
        self.highest
    }

    fn check_header(&self, outer: &Message) -> Result<(Dir, u64), SealError> {
        let dir = single(&outer.headers, DIR_HEADER)
            .ok_or(SealError::Malformed("need exactly one Dir header"))?;
        let dir = Dir::parse(dir).ok_or(SealError::Malformed("bad Dir header"))?;
        if dir != self.dir {
            return Err(SealError::Reflected);
        }
        let seq = single(&outer.headers, SEQ_HEADER)
            .ok_or(SealError::Malformed("need exactly one Seq header"))?;
        let seq = parse_seq(seq).ok_or(SealError::Malformed("bad Seq header"))?;
        Ok((dir, seq))
    }

    fn open_parts(
        &mut self,
        dir: Dir,
        seq: u64,
        start: &Start,
        headers: &Headers,
        mut body: Vec<u8>,
    ) -> Result<Inner, SealError> {
        let aad = aad(start, headers, body.len());
        match self.key.open_in_place(&dir.nonce(seq), &aad, &mut body) {
            Ok(()) => {}
            Err(crypto::Error::Decrypt) => return Err(SealError::Tampered),
            Err(e) => return Err(SealError::Crypto(e)),
        }
        self.check_window(seq)?;
        self.accept(seq);
        parse_inner(body)
    }

    fn check_window(&self, seq: u64) -> Result<(), SealError> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if seq > highest {
            return Ok(());
        }
        let back = highest - seq;
        if back < WINDOW && (self.seen >> back) & 1 == 1 {
            Err(SealError::Replayed)
        } else {
            Err(SealError::OutOfOrder)
        }
    }

    /// Records `seq`, which [`Opener::check_window`] found newer than
    /// everything accepted so far.
    fn accept(&mut self, seq: u64) {
        self.seen = match self.highest {
            Some(highest) => {
                let shift = seq - highest;
                if shift >= WINDOW {
                    1
                } else {
                    (self.seen << shift) | 1
                }
            }
            None => 1,
        };
        self.highest = Some(seq);
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("dir", &self.dir.label())
            .field("highest", &self.highest)
            .finish_non_exhaustive()
    }
}

/// The limits inner messages are parsed under: file chunks travel sealed.
fn inner_limits() -> Limits {
    Limits::DEFAULT.for_files()
}

fn is_reserved(name: &str) -> bool {
    [DIR_HEADER, SEQ_HEADER, "Content-Length"]
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
}

/// The value of the only header called `name`; `None` if absent or repeated.
fn single<'a>(headers: &'a Headers, name: &'a str) -> Option<&'a str> {
    let mut all = headers.get_all(name);
    let first = all.next()?;
    all.next().is_none().then_some(first)
}

/// Canonical decimal only ("0", "17"; not "017", "+1", " 1"), so that one
/// sequence number has one spelling.
fn parse_seq(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// The associated data: an unambiguous (length-prefixed) encoding of the
/// outer start line, every header in order with its name lowercased (names
/// are case-insensitive) and its value trimmed as the parser trims it, and
/// the body length.
fn aad(start: &Start, headers: &Headers, body_len: usize) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let fields: usize = headers.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
    let mut out = Vec::with_capacity(AAD_LABEL.len() + 64 + fields);
    out.extend_from_slice(AAD_LABEL);
    match start {
        Start::Request(method) => {
            out.push(b'Q');
            field(&mut out, method.as_bytes());
        }
        Start::Reply { code, reason } => {
            out.push(b'R');
            out.extend_from_slice(&code.to_be_bytes());
            field(&mut out, reason.as_bytes());
        }
    }
    out.extend_from_slice(&(headers.len() as u64).to_be_bytes());
    for (name, value) in headers.iter() {
        out.extend_from_slice(&(name.len() as u64).to_be_bytes());
        out.extend(name.bytes().map(|b| b.to_ascii_lowercase()));
        field(&mut out, value.trim_matches([' ', '\t']).as_bytes());
    }
    out.extend_from_slice(&(body_len as u64).to_be_bytes());
    out
}

/// An opened inner message whose body is still inside the decrypted
/// buffer, behind the inner head (see [`Opener::open_in_place`]).
#[derive(Debug)]
pub struct Inner {
    /// The start line and headers; its own body is empty.
    head: Message,
    /// The whole decrypted inner message.
    plain: Vec<u8>,
    /// Where the body is in `plain`.
    body: Range<usize>,
}

impl Inner {
    /// The start line and headers (with an empty body).
    pub fn head(&self) -> &Message {
        &self.head
    }

    /// The body.
    pub fn body(&self) -> &[u8] {
        &self.plain[self.body.clone()]
    }

    /// The whole message, its body moved to the front of the buffer (in
    /// place, not copied out).
    pub fn into_message(self) -> Message {
        let Inner {
            mut head,
            mut plain,
            body,
        } = self;
        plain.truncate(body.end);
        plain.drain(..body.start);
        head.body = plain;
        head
    }

    /// The head (with an empty body), the decrypted buffer, and where the
    /// body is in it.
    pub fn into_parts(self) -> (Message, Vec<u8>, Range<usize>) {
        (self.head, self.plain, self.body)
    }
}

/// Checks that `bytes` are exactly one whole message under the inner
/// limits, as the receiver will check them after decrypting; returns the
/// head and where the body is.
fn check_whole(bytes: &[u8]) -> Result<(wire::Head, Range<usize>), SealError> {
    const INCOMPLETE: SealError = SealError::Malformed("inner message incomplete");
    let head = wire::parse_head(bytes, &inner_limits())
        .map_err(SealError::Inner)?
        .ok_or(INCOMPLETE)?;
    // content_length is bounded by the limits, so this cannot overflow.
    let body_end = head.len + head.content_length;
    if bytes.len() < body_end + 2 {
        return Err(INCOMPLETE);
    }
    if &bytes[body_end..body_end + 2] != b"\r\n" {
        return Err(SealError::Inner(wire::Error::MissingBodyTerminator));
    }
    if bytes.len() != body_end + 2 {
        return Err(SealError::Malformed("bytes after the inner message"));
    }
    let body = head.len..body_end;
    Ok((head, body))
}

/// Parses the decrypted bytes as exactly one message, leaving the body
/// where it is.
fn parse_inner(plain: Vec<u8>) -> Result<Inner, SealError> {
    let (head, body) = check_whole(&plain)?;
    Ok(Inner {
        head: head.into_message(Vec::new()),
        plain,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SessionKeys, SessionKeys) {
        (
            SessionKeys::derive(b"secret", b"nonces", Role::Initiator),
            SessionKeys::derive(b"secret", b"nonces", Role::Responder),
        )
    }

    #[test]
    fn exhaustion_is_an_error_not_a_wrap() {
        let (mut a, mut b) = pair();
        a.send.next = Some(u64::MAX - 1);
        let inner = Message::request("PING");
        for seq in [u64::MAX - 1, u64::MAX] {
            let sealed = a.send.seal("DATA", &[], &inner).unwrap();
            assert_eq!(sealed.header("Seq"), Some(seq.to_string().as_str()));
            assert_eq!(b.recv.open(&sealed).unwrap(), inner);
        }
        assert_eq!(a.send.next_seq(), None);
        assert_eq!(a.send.seal("DATA", &[], &inner), Err(SealError::Exhausted));
        assert_eq!(a.send.seal("DATA", &[], &inner), Err(SealError::Exhausted));
    }

    #[test]
    fn seq_parsing_is_canonical() {
        assert_eq!(parse_seq("0"), Some(0));
        assert_eq!(parse_seq("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "00",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "18446744073709551616",
            "x",
        ] {
            assert_eq!(parse_seq(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn aad_is_unambiguous() {
        let mut h1 = Headers::new();
        h1.push("A", "bc");
        let mut h2 = Headers::new();
        h2.push("Ab", "c");
        let start = Start::Request("X".into());
        assert_ne!(aad(&start, &h1, 0), aad(&start, &h2, 0));
        assert_ne!(aad(&start, &h1, 0), aad(&start, &h1, 1));
        let reply = Start::Reply {
            code: 200,
            reason: "X".into(),
        };
        assert_ne!(aad(&start, &h1, 0), aad(&reply, &h1, 0));
    }

    #[test]
    fn aad_lowercases_names_and_trims_values() {
        let mut h = Headers::new();
        h.push("From", " alice\t");
        h.push("X-MiXeD", "Value");
        let start = Start::Request("PEER".into());
        let mut expected = AAD_LABEL.to_vec();
        expected.push(b'Q');
        expected.extend_from_slice(&4u64.to_be_bytes());
        expected.extend_from_slice(b"PEER");
        expected.extend_from_slice(&2u64.to_be_bytes());
        for part in [&b"from"[..], b"alice", b"x-mixed", b"Value"] {
            expected.extend_from_slice(&(part.len() as u64).to_be_bytes());
            expected.extend_from_slice(part);
        }
        expected.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(aad(&start, &h, 7), expected);
    }

    #[test]
    fn sealing_encoded_bytes_is_sealing_the_message() {
        let (mut a, mut b) = pair();
        let (mut c, _) = pair();
        let clear = [("From", "alice"), ("Channel", "file:1")];
        let inners = [
            Message::request("FILE-CHUNK")
                .with_header("Id", 1)
                .with_header("Offset", 0)
                .with_body(vec![9u8; 100_000]),
            Message::request("PING"),
        ];
        for inner in &inners {
            let mut encoded = Vec::new();
            inner.encode_head_for(inner.body.len(), &mut encoded);
            encoded.extend_from_slice(&inner.body);
            encoded.extend_from_slice(b"\r\n");
            let from_bytes = a.send.seal_encoded("PEER", &clear, encoded).unwrap();
            let from_message = c.send.seal("PEER", &clear, inner).unwrap();
            assert_eq!(from_bytes, from_message);
            let opened = b.recv.open_in_place(from_bytes).unwrap();
            assert_eq!(opened.head().method(), inner.method());
            assert_eq!(opened.head().headers, inner.headers);
            assert!(opened.head().body.is_empty());
            assert_eq!(opened.body(), &inner.body[..]);
            assert_eq!(&opened.into_message(), inner);
        }
    }

    #[test]
    fn encoded_bytes_must_be_exactly_one_message() {
        let (mut a, _) = pair();
        let whole = Message::request("PING").with_body("x").encode();
        let mut trailing = whole.clone();
        trailing.extend_from_slice(b"more");
        let mut unterminated = whole.clone();
        unterminated.truncate(whole.len() - 2);
        unterminated.extend_from_slice(b"xx");
        let too_big = {
            let m = Message::request("BIG").with_body(vec![0u8; 10]);
            let mut v = Vec::new();
            m.encode_head_for(Limits::DEFAULT.max_file_body + 1, &mut v);
            v
        };
        assert!(matches!(
            a.send.seal_encoded("DATA", &[], trailing),
            Err(SealError::Malformed(_))
        ));
        assert!(matches!(
            a.send
                .seal_encoded("DATA", &[], whole[..whole.len() - 1].to_vec()),
            Err(SealError::Malformed(_))
        ));
        assert_eq!(
            a.send.seal_encoded("DATA", &[], unterminated),
            Err(SealError::Inner(wire::Error::MissingBodyTerminator))
        );
        assert_eq!(
            a.send.seal_encoded("DATA", &[], too_big),
            Err(SealError::Inner(wire::Error::BodyTooLarge))
        );
        assert_eq!(
            a.send
                .seal_encoded("DATA", &[], b"not a message\r\n\r\n".to_vec()),
            Err(SealError::Inner(wire::Error::InvalidStartLine))
        );
        // Nothing was consumed by the refusals.
        assert_eq!(a.send.next_seq(), Some(0));
        assert!(a.send.seal_encoded("DATA", &[], whole).is_ok());
        assert_eq!(a.send.next_seq(), Some(1));
    }

    #[test]
    fn debug_shows_no_key() {
        let (a, _) = pair();
        let shown = format!("{a:?}");
        assert!(shown.contains("i2r"));
        assert!(!shown.contains("key"));
    }
}
