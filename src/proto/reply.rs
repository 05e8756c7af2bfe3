//! Typed refusals, shared by every link, and the [`Request`] trait that
//! ties each link's request enum to its typed reply.
//!
//! A refusal travels as an error reply (`NNN reason`) with a `Refusal`
//! header naming its kind in a token: the code tells a program the class
//! of failure, the token which one, and the reason is for people only.
//! Programs act on [`Refusal`], never on the reason text.

use std::fmt;
use std::net::SocketAddr;

use super::{Fields, ProtoError};
use crate::wire::{code, Message};

/// Header naming the kind of a refusal.
pub const REFUSAL_HEADER: &str = "Refusal";

/// Why a request was refused: one variant per distinct case a program
/// acts on. Each has one reply code ([`Refusal::code`]) and one token
/// ([`Refusal::token`]) on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `400 bad-request`: malformed, or a header is missing or invalid.
    BadRequest,
    /// `405 unknown-method`: not a method of this link.
    UnknownMethod,
    /// `401 password-failure`: wrong password or unknown name (never told apart).
    PasswordFailure,
    /// `401 bad-proof`: an MSkey proof or a server's proof did not check out.
    BadProof,
    /// `401 bad-signature`: a signed request's signature is wrong.
    BadSignature,
    /// `403 not-logged-in`: a sealed request with no live login behind it.
    NotLoggedIn,
    /// `403 registration-closed`: the CRS does not take registrations.
    RegistrationClosed,
    /// `403 not-enrolled`: the MS's link is no longer known; enroll again.
    NotEnrolled,
    /// `403 wrong-link`: an operator request on an MS link or the other way round.
    WrongLink,
    /// `404 no-such-user`.
    NoSuchUser,
    /// `404 no-such-request`: no buddy request from that name.
    NoSuchRequest,
    /// `404 not-a-buddy`.
    NotABuddy,
    /// `404 no-such-transfer`: no file offer or transfer with that id.
    NoSuchTransfer,
    /// `409 logged-in`: the user is logged in; where their client listens,
    /// when the CRS knows it (the MS may probe it and take over).
    AlreadyLoggedIn {
        /// The old login's client address (`Address` header).
        address: Option<SocketAddr>,
    },
    /// `409 logging-in`: another login of the user is under way.
    AlreadyLoggingIn,
    /// `409 name-taken`.
    NameTaken,
    /// `409 already-buddies`.
    AlreadyBuddies,
    /// `400 same-user`: a buddy request to oneself.
    SameUser,
    /// `409 lock-not-held`: ONLINE after the login lock expired.
    LockNotHeld,
    /// `413 too-large`: a field, a profile or a message over its limit.
    TooLarge,
    /// `429 rate-limited`: try again in `retry_after` seconds (`Retry-After`).
    RateLimited {
        /// Seconds to wait, when the server says.
        retry_after: Option<u64>,
    },
    /// `500 internal`: a fault on the server's side.
    Internal,
    /// `503 unavailable`: overloaded, or a server it needs does not answer.
    Unavailable,
    /// `503 no-ms`: no messaging server is available.
    NoMs,
    /// A refusal this program has no variant for (a newer peer): its code.
    Other(u16),
}

impl Refusal {
    /// The reply code.
    pub fn code(&self) -> u16 {
        use Refusal::*;
        match self {
            BadRequest => code::BAD_REQUEST,
            UnknownMethod => code::UNKNOWN_METHOD,
            PasswordFailure | BadProof | BadSignature => code::AUTH_FAILED,
            SameUser => code::BAD_REQUEST,
            NotLoggedIn | RegistrationClosed | NotEnrolled | WrongLink => code::FORBIDDEN,
            NoSuchUser | NoSuchRequest | NotABuddy | NoSuchTransfer => code::NOT_FOUND,
            AlreadyLoggedIn { .. }
            | AlreadyLoggingIn
            | NameTaken
            | AlreadyBuddies
            | LockNotHeld => code::CONFLICT,
            TooLarge => code::TOO_LARGE,
            RateLimited { .. } => code::RATE_LIMITED,
            Internal => code::INTERNAL,
            Unavailable | NoMs => code::BUSY,
            Other(c) => *c,
        }
    }

    /// The token of the `Refusal` header (`None` for [`Refusal::Other`]).
    pub fn token(&self) -> Option<&'static str> {
        use Refusal::*;
        Some(match self {
            BadRequest => "bad-request",
            UnknownMethod => "unknown-method",
            PasswordFailure => "password-failure",
            BadProof => "bad-proof",
            BadSignature => "bad-signature",
            NotLoggedIn => "not-logged-in",
            RegistrationClosed => "registration-closed",
            NotEnrolled => "not-enrolled",
            WrongLink => "wrong-link",
            NoSuchUser => "no-such-user",
            NoSuchRequest => "no-such-request",
            NotABuddy => "not-a-buddy",
            NoSuchTransfer => "no-such-transfer",
            AlreadyLoggedIn { .. } => "logged-in",
            AlreadyLoggingIn => "logging-in",
            NameTaken => "name-taken",
            AlreadyBuddies => "already-buddies",
            SameUser => "same-user",
            LockNotHeld => "lock-not-held",
            TooLarge => "too-large",
            RateLimited { .. } => "rate-limited",
            Internal => "internal",
            Unavailable => "unavailable",
            NoMs => "no-ms",
            Other(_) => return None,
        })
    }

    /// Every token with the code it goes with (for the protocol document
    /// and its test).
    pub const TOKENS: &'static [(&'static str, u16)] = &[
        ("bad-request", code::BAD_REQUEST),
        ("unknown-method", code::UNKNOWN_METHOD),
        ("password-failure", code::AUTH_FAILED),
        ("bad-proof", code::AUTH_FAILED),
        ("bad-signature", code::AUTH_FAILED),
        ("not-logged-in", code::FORBIDDEN),
        ("registration-closed", code::FORBIDDEN),
        ("not-enrolled", code::FORBIDDEN),
        ("wrong-link", code::FORBIDDEN),
        ("no-such-user", code::NOT_FOUND),
        ("no-such-request", code::NOT_FOUND),
        ("not-a-buddy", code::NOT_FOUND),
        ("no-such-transfer", code::NOT_FOUND),
        ("logged-in", code::CONFLICT),
        ("logging-in", code::CONFLICT),
        ("name-taken", code::CONFLICT),
        ("already-buddies", code::CONFLICT),
        ("same-user", code::BAD_REQUEST),
        ("lock-not-held", code::CONFLICT),
        ("too-large", code::TOO_LARGE),
        ("rate-limited", code::RATE_LIMITED),
        ("internal", code::INTERNAL),
        ("unavailable", code::BUSY),
        ("no-ms", code::BUSY),
    ];

    fn from_token(token: &str, m: &Message) -> Option<Refusal> {
        use Refusal::*;
        Some(match token {
            "bad-request" => BadRequest,
            "unknown-method" => UnknownMethod,
            "password-failure" => PasswordFailure,
            "bad-proof" => BadProof,
            "bad-signature" => BadSignature,
            "not-logged-in" => NotLoggedIn,
            "registration-closed" => RegistrationClosed,
            "not-enrolled" => NotEnrolled,
            "wrong-link" => WrongLink,
            "no-such-user" => NoSuchUser,
            "no-such-request" => NoSuchRequest,
            "not-a-buddy" => NotABuddy,
            "no-such-transfer" => NoSuchTransfer,
            "logged-in" => AlreadyLoggedIn {
                address: m.header("Address").and_then(|a| a.parse().ok()),
            },
            "logging-in" => AlreadyLoggingIn,
            "name-taken" => NameTaken,
            "already-buddies" => AlreadyBuddies,
            "same-user" => SameUser,
            "lock-not-held" => LockNotHeld,
            "too-large" => TooLarge,
            "rate-limited" => RateLimited {
                retry_after: m.header("Retry-After").and_then(|s| s.parse().ok()),
            },
            "internal" => Internal,
            "unavailable" => Unavailable,
            "no-ms" => NoMs,
            _ => return None,
        })
    }

    /// The kind a bare code stands for when no token came with it (the
    /// framing layer's own error replies carry none).
    fn from_code(c: u16) -> Refusal {
        match c {
            code::BAD_REQUEST => Refusal::BadRequest,
            code::UNKNOWN_METHOD => Refusal::UnknownMethod,
            code::TOO_LARGE => Refusal::TooLarge,
            code::RATE_LIMITED => Refusal::RateLimited { retry_after: None },
            code::INTERNAL => Refusal::Internal,
            code::BUSY => Refusal::Unavailable,
            other => Refusal::Other(other),
        }
    }
}

/// A refusal with its reason for people.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// What programs act on.
    pub refusal: Refusal,
    /// What people read (never acted on); untrusted when it came from afar.
    pub reason: String,
}

impl Refused {
    /// A refusal with a reason.
    pub fn new(refusal: Refusal, reason: impl Into<String>) -> Refused {
        Refused {
            refusal,
            reason: reason.into(),
        }
    }

    /// The reply code.
    pub fn code(&self) -> u16 {
        self.refusal.code()
    }

    /// As an error reply.
    pub fn to_message(&self) -> Message {
        let mut m = Message::reply(self.code(), &self.reason);
        if let Some(t) = self.refusal.token() {
            m = m.with_header(REFUSAL_HEADER, t);
        }
        match &self.refusal {
            Refusal::AlreadyLoggedIn { address: Some(a) } => m.with_header("Address", a),
            Refusal::RateLimited {
                retry_after: Some(s),
            } => m.with_header("Retry-After", s),
            _ => m,
        }
    }

    /// From an error reply; `None` for a success or a request.
    pub fn from_message(m: &Message) -> Option<Refused> {
        let c = m.code()?;
        if (200..300).contains(&c) {
            return None;
        }
        let refusal = m
            .header(REFUSAL_HEADER)
            .and_then(|t| Refusal::from_token(t, m))
            .filter(|r| r.code() == c)
            .unwrap_or_else(|| Refusal::from_code(c));
        Some(Refused {
            refusal,
            reason: m.reason().unwrap_or("").to_owned(),
        })
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Refused {}

impl From<&ProtoError> for Refused {
    fn from(e: &ProtoError) -> Refused {
        match e {
            ProtoError::UnknownMethod(_) => Refused::new(Refusal::UnknownMethod, e.to_string()),
            _ => Refused::new(Refusal::BadRequest, e.to_string()),
        }
    }
}

impl From<ProtoError> for Refused {
    fn from(e: ProtoError) -> Refused {
        Refused::from(&e)
    }
}

/// What a server answers: a typed reply or a typed refusal.
pub type Answer<T> = Result<T, Refused>;

/// A request of some link: its encoding, and the decoding of its reply,
/// which depends on which request it answers.
pub trait Request {
    /// The typed success reply.
    type Reply;
    /// The wire message (the inner one on a sealed link).
    fn to_message(&self) -> Message;
    /// Decodes the reply to this request: `Ok(Err(_))` for a refusal,
    /// `Err(_)` for a reply that is neither a valid answer nor a refusal.
    fn read_reply(&self, m: &Message) -> Result<Answer<Self::Reply>, ProtoError>;
}

/// A success reply's JSON body, or a refusal.
pub(crate) fn json_answer<T: serde::de::DeserializeOwned>(
    m: &Message,
) -> Result<Answer<T>, ProtoError> {
    match Refused::from_message(m) {
        Some(r) => Ok(Err(r)),
        None if m.code().is_some() => m.json().map(Ok),
        None => Err(ProtoError::NotAReply),
    }
}

/// A success reply with nothing in it, or a refusal.
pub(crate) fn done_answer(m: &Message) -> Result<Answer<()>, ProtoError> {
    match Refused::from_message(m) {
        Some(r) => Ok(Err(r)),
        None if m.code().is_some() => Ok(Ok(())),
        None => Err(ProtoError::NotAReply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_round_trips_with_its_code() {
        for (token, c) in Refusal::TOKENS {
            let m = Message::reply(*c, "why").with_header(REFUSAL_HEADER, token);
            let r = Refused::from_message(&m).unwrap();
            assert_eq!(r.refusal.token(), Some(*token));
            assert_eq!(r.code(), *c);
            assert_eq!(Refused::from_message(&r.to_message()).unwrap(), r);
        }
    }

    #[test]
    fn fields_and_fallbacks() {
        let r = Refused::new(
            Refusal::AlreadyLoggedIn {
                address: Some("10.0.0.1:7300".parse().unwrap()),
            },
            "already logged in",
        );
        assert_eq!(Refused::from_message(&r.to_message()).unwrap(), r);
        let r = Refused::new(
            Refusal::RateLimited {
                retry_after: Some(4),
            },
            "slow down",
        );
        assert_eq!(Refused::from_message(&r.to_message()).unwrap(), r);
        // No token: the code decides; a token with the wrong code is ignored.
        let m = Message::reply(503, "busy");
        assert_eq!(
            Refused::from_message(&m).unwrap().refusal,
            Refusal::Unavailable
        );
        let m = Message::reply(404, "x").with_header(REFUSAL_HEADER, "name-taken");
        assert_eq!(
            Refused::from_message(&m).unwrap().refusal,
            Refusal::Other(404)
        );
        assert!(Refused::from_message(&Message::ok()).is_none());
    }
}
