//! Messages between a client and its MS: the login handshake in the clear,
//! the sealed requests after it, and the MS's sealed pushes to the client.

use super::crs::{json, json_reply, Contact, EventKind, Hit, Profile, Verifier, Welcome};
use super::reply::{done_answer, json_answer};
use super::status::StatusInfo;
use super::{Answer, Fields, ProtoError, Refused, Request};
use crate::crypto;
use crate::wire::{code, Message};

/// Outer method of a pushed event.
pub const PUSH: &str = "PUSH";

/// A client's request to its MS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MsRequest {
    /// Login step 1, in the clear.
    LoginHello {
        /// Who logs in.
        user: String,
        /// The client's fresh nonce.
        client_nonce: Vec<u8>,
    },
    /// Login step 2, in the clear, on the same connection.
    Login {
        /// ClientKey XOR HMAC(StoredKey, AuthMessage).
        proof: Vec<u8>,
        /// Where the client's listener takes pushes and peers.
        listen_port: u16,
    },
    /// Sealed from here on.
    Logout,
    /// New password: a new verifier and the private key re-wrapped.
    Passwd {
        /// The new verifier.
        verifier: Verifier,
        /// The re-wrapped private key.
        wrapped_key: Vec<u8>,
    },
    /// New profile fields.
    SetProfile(Profile),
    /// Directory search.
    Search(String),
    /// Signed buddy request.
    Add {
        /// Whom.
        to: String,
        /// Fresh nonce.
        nonce: Vec<u8>,
        /// RSA-PSS over [`super::add_transcript`].
        signature: Vec<u8>,
    },
    /// Accept a buddy request.
    Accept(String),
    /// Deny a buddy request.
    Deny(String),
    /// Remove a buddy.
    Remove(String),
    /// Block (`on`) or unblock a user.
    Block {
        /// Whom.
        who: String,
        /// Block or unblock.
        on: bool,
    },
    /// Our status and personal message.
    SetStatus(StatusInfo),
    /// We are invisible and about to write to this buddy: let them take
    /// our session (see `REVEAL` in PROTOCOL.md).
    Reveal(String),
    /// Still here (also answers the MS's question whether we are alive).
    Ping,
}

impl MsRequest {
    /// Encodes into a wire message (the inner one for sealed requests).
    pub fn to_message(&self) -> Message {
        use MsRequest::*;
        match self {
            LoginHello { user, client_nonce } => Message::request("LOGIN-HELLO")
                .with_header("User", user)
                .with_header("Client-Nonce", crypto::b64_encode(client_nonce)),
            Login { proof, listen_port } => Message::request("LOGIN")
                .with_header("Proof", crypto::b64_encode(proof))
                .with_header("Listen-Port", listen_port),
            Logout => Message::request("LOGOUT"),
            Passwd {
                verifier,
                wrapped_key,
            } => Message::request("PASSWD")
                .with_header("Wrapped-Key", crypto::b64_encode(wrapped_key))
                .with_body(json(verifier)),
            SetProfile(p) => Message::request("PROFILE").with_body(json(p)),
            Search(text) => Message::request("SEARCH").with_body(text.as_bytes().to_vec()),
            Add {
                to,
                nonce,
                signature,
            } => Message::request("ADD")
                .with_header("To", to)
                .with_header("Nonce", crypto::b64_encode(nonce))
                .with_header("Signature", crypto::b64_encode(signature)),
            Accept(from) => Message::request("ACCEPT").with_header("From", from),
            Deny(from) => Message::request("DENY").with_header("From", from),
            Remove(buddy) => Message::request("REMOVE").with_header("Buddy", buddy),
            Block { who, on } => Message::request("BLOCK")
                .with_header("Who", who)
                .with_header("Block", if *on { "on" } else { "off" }),
            SetStatus(info) => Message::request("STATUS")
                .with_header("Content-Type", "application/json")
                .with_body(json(info)),
            Reveal(to) => Message::request("REVEAL").with_header("To", to),
            Ping => Message::request("PING"),
        }
    }

    /// Decodes a wire message.
    pub fn from_message(m: &Message) -> Result<MsRequest, ProtoError> {
        use MsRequest::*;
        Ok(
            match m.method().ok_or(ProtoError::UnknownMethod(String::new()))? {
                "LOGIN-HELLO" => LoginHello {
                    user: m.req("User")?.to_owned(),
                    client_nonce: m.req_b64("Client-Nonce")?,
                },
                "LOGIN" => Login {
                    proof: m.req_b64("Proof")?,
                    listen_port: m.req_parse("Listen-Port")?,
                },
                "LOGOUT" => Logout,
                "PASSWD" => Passwd {
                    verifier: m.json()?,
                    wrapped_key: m.req_b64("Wrapped-Key")?,
                },
                "PROFILE" => SetProfile(m.json()?),
                "SEARCH" => Search(
                    String::from_utf8(m.body.clone()).map_err(|_| ProtoError::Invalid("body"))?,
                ),
                "ADD" => Add {
                    to: m.req("To")?.to_owned(),
                    nonce: m.req_b64("Nonce")?,
                    signature: m.req_b64("Signature")?,
                },
                "ACCEPT" => Accept(m.req("From")?.to_owned()),
                "DENY" => Deny(m.req("From")?.to_owned()),
                "REMOVE" => Remove(m.req("Buddy")?.to_owned()),
                "BLOCK" => Block {
                    who: m.req("Who")?.to_owned(),
                    on: match m.req("Block")? {
                        "on" => true,
                        "off" => false,
                        _ => return Err(ProtoError::Invalid("Block")),
                    },
                },
                "STATUS" => SetStatus(m.json::<StatusInfo>()?.checked()?),
                "REVEAL" => Reveal(m.req("To")?.to_owned()),
                "PING" => Ping,
                other => return Err(ProtoError::UnknownMethod(other.to_owned())),
            },
        )
    }
}

/// The MS's answer to `LOGIN-HELLO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The user's PBKDF2 salt (a plausible fake one for unknown names).
    pub salt: Vec<u8>,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// The MS's fresh nonce.
    pub server_nonce: Vec<u8>,
}

impl Challenge {
    /// As a `200` reply.
    pub fn to_message(&self) -> Message {
        Message::ok()
            .with_header("Salt", crypto::b64_encode(&self.salt))
            .with_header("Iterations", self.iterations)
            .with_header("Server-Nonce", crypto::b64_encode(&self.server_nonce))
    }

    /// From a `200` reply.
    pub fn from_message(m: &Message) -> Result<Challenge, ProtoError> {
        Ok(Challenge {
            salt: m.req_b64("Salt")?,
            iterations: m.req_parse("Iterations")?,
            server_nonce: m.req_b64("Server-Nonce")?,
        })
    }
}

/// The MS's answer to an [`MsRequest`]; which variant depends on the
/// request (see [`MsRequest::read_reply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MsReply {
    /// `LOGIN-HELLO`: the challenge.
    Challenge(Challenge),
    /// `LOGIN`: the inner message of the sealed welcome.
    Welcome(Box<Welcome>),
    /// `200`, nothing more.
    Done,
    /// `202`: a buddy request stored until its target logs in.
    Stored,
    /// `SEARCH`.
    Hits(Vec<Hit>),
    /// `ACCEPT`: the new buddy.
    Contact(Contact),
}

impl MsReply {
    /// As a success reply (the inner one on the sealed link).
    pub fn to_message(&self) -> Message {
        match self {
            MsReply::Challenge(c) => c.to_message(),
            MsReply::Welcome(w) => json_reply(w),
            MsReply::Done => Message::ok(),
            MsReply::Stored => Message::reply(code::STORED, "stored until they log in"),
            MsReply::Hits(h) => json_reply(h),
            MsReply::Contact(c) => json_reply(c),
        }
    }
}

impl Request for MsRequest {
    type Reply = MsReply;

    fn to_message(&self) -> Message {
        MsRequest::to_message(self)
    }

    fn read_reply(&self, m: &Message) -> Result<Answer<MsReply>, ProtoError> {
        use MsRequest::*;
        fn map<T>(
            a: Result<Answer<T>, ProtoError>,
            f: impl FnOnce(T) -> MsReply,
        ) -> Result<Answer<MsReply>, ProtoError> {
            a.map(|a| a.map(f))
        }
        match self {
            LoginHello { .. } => match Refused::from_message(m) {
                Some(r) => Ok(Err(r)),
                None => Challenge::from_message(m).map(|c| Ok(MsReply::Challenge(c))),
            },
            Login { .. } => map(json_answer(m), |w| MsReply::Welcome(Box::new(w))),
            Logout
            | Passwd { .. }
            | SetProfile(_)
            | Deny(_)
            | Remove(_)
            | Block { .. }
            | SetStatus(_)
            | Reveal(_)
            | Ping => map(done_answer(m), |()| MsReply::Done),
            Add { .. } => map(done_answer(m), |()| {
                if m.code() == Some(code::STORED) {
                    MsReply::Stored
                } else {
                    MsReply::Done
                }
            }),
            Search(_) => map(json_answer(m), MsReply::Hits),
            Accept(_) => map(json_answer(m), MsReply::Contact),
        }
    }
}

/// An event pushed to a client, as the inner message of a `PUSH`.
pub fn event_message(kind: &EventKind) -> Message {
    Message::request("EVENT")
        .with_header("Content-Type", "application/json")
        .with_body(json(kind))
}

/// Reads a pushed event.
pub fn read_event(m: &Message) -> Result<EventKind, ProtoError> {
    match m.method() {
        Some("EVENT") => m.json(),
        Some(other) => Err(ProtoError::UnknownMethod(other.to_owned())),
        None => Err(ProtoError::NotAReply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let reqs = vec![
            MsRequest::LoginHello {
                user: "joe".into(),
                client_nonce: vec![1; 24],
            },
            MsRequest::Login {
                proof: vec![2; 32],
                listen_port: 7300,
            },
            MsRequest::Logout,
            MsRequest::Passwd {
                verifier: Verifier {
                    salt: vec![1],
                    iterations: 5,
                    stored_key: vec![2],
                    server_key: vec![3],
                },
                wrapped_key: vec![4, 5],
            },
            MsRequest::Search("ali".into()),
            MsRequest::Add {
                to: "alice".into(),
                nonce: vec![1],
                signature: vec![2],
            },
            MsRequest::Accept("joe".into()),
            MsRequest::Remove("bob".into()),
            MsRequest::SetStatus(StatusInfo {
                status: crate::proto::status::Status::Busy,
                message: "in a meeting".into(),
            }),
            MsRequest::Reveal("bob".into()),
        ];
        for r in reqs {
            assert_eq!(MsRequest::from_message(&r.to_message()).unwrap(), r);
        }
        let c = Challenge {
            salt: vec![7; 16],
            iterations: 600_000,
            server_nonce: vec![8; 24],
        };
        assert_eq!(Challenge::from_message(&c.to_message()).unwrap(), c);
        let e = EventKind::Offline { user: "bob".into() };
        assert_eq!(read_event(&event_message(&e)).unwrap(), e);
    }
}
