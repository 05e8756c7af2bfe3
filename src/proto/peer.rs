//! Messages between two clients (PROTOCOL.md §7): the signed INIT /
//! INIT-ACK / CONFIRM exchange that agrees a session key by ephemeral
//! X25519, and the inner messages of the sealed channels (including the
//! re-key exchange).

use super::{transcript, Answer, Fields, ProtoError, Refusal, Refused, Request};
use crate::crypto;
use crate::wire::Message;

/// Outer method of the session-opening request.
pub const INIT: &str = "INIT";
/// Outer method of the caller's key confirmation, the third flight.
pub const CONFIRM: &str = "CONFIRM";
/// Outer method of every sealed peer message.
pub const PEER: &str = "PEER";

/// Bytes of an INIT or REKEY nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes of a key confirmation (an HMAC-SHA256).
pub const CONFIRM_LEN: usize = 32;

/// What INIT's sender signs: both names, its clock, its nonce and its
/// ephemeral X25519 share.
pub fn init_transcript(from: &str, to: &str, time: u64, nonce: &[u8], share: &[u8]) -> Vec<u8> {
    transcript(
        "ims init v2",
        &[
            from.as_bytes(),
            to.as_bytes(),
            &time.to_be_bytes(),
            nonce,
            share,
        ],
    )
}

/// What INIT-ACK's sender signs: both names, the hash of the INIT's
/// transcript (so the caller's time, nonce and share), its own nonce and
/// its own share.
pub fn init_ack_transcript(
    from: &str,
    to: &str,
    init_hash: &[u8],
    responder_nonce: &[u8],
    responder_share: &[u8],
) -> Vec<u8> {
    transcript(
        "ims init-ack v2",
        &[
            from.as_bytes(),
            to.as_bytes(),
            init_hash,
            responder_nonce,
            responder_share,
        ],
    )
}

/// The transcript of a re-key inside a session: the epoch it replaces,
/// who started it, and both sides' nonces and shares.
pub fn rekey_transcript(
    old_session: &str,
    initiator: &str,
    responder: &str,
    parts: [&[u8]; 4],
) -> Vec<u8> {
    let [ni, xi, nr, xr] = parts;
    transcript(
        "ims rekey v2",
        &[
            old_session.as_bytes(),
            initiator.as_bytes(),
            responder.as_bytes(),
            ni,
            xi,
            nr,
            xr,
        ],
    )
}

/// The session id both sides derive from the hash of the exchange's
/// transcript (clear `Session` header of sealed peer messages, so a stale
/// session is noticed at once). Public: it is a hash of public values.
pub fn session_id(transcript_hash: &[u8]) -> String {
    crate::keyfile::hex(&crypto::sha256(&transcript("ims session id v2", &[transcript_hash]))[..12])
}

/// A session-opening request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Init {
    /// The caller.
    pub from: String,
    /// The callee.
    pub to: String,
    /// Seconds since the Unix epoch at the caller.
    pub time: u64,
    /// The caller's fresh nonce ([`NONCE_LEN`] bytes).
    pub nonce: Vec<u8>,
    /// The caller's ephemeral X25519 public key (32 bytes).
    pub share: Vec<u8>,
    /// RSA-PSS(caller's private key, [`init_transcript`]).
    pub signature: Vec<u8>,
}

impl Init {
    /// As a wire message.
    pub fn to_message(&self) -> Message {
        Message::request(INIT)
            .with_header("From", &self.from)
            .with_header("To", &self.to)
            .with_header("Time", self.time)
            .with_header("Nonce", crypto::b64_encode(&self.nonce))
            .with_header("Share", crypto::b64_encode(&self.share))
            .with_header("Signature", crypto::b64_encode(&self.signature))
    }

    /// From a wire message; nonce and share must have their exact lengths.
    pub fn from_message(m: &Message) -> Result<Init, ProtoError> {
        Ok(Init {
            from: m.req("From")?.to_owned(),
            to: m.req("To")?.to_owned(),
            time: m.req_parse("Time")?,
            nonce: exact(m.req_b64("Nonce")?, NONCE_LEN, "Nonce")?,
            share: exact(m.req_b64("Share")?, crypto::X25519_LEN, "Share")?,
            signature: m.req_b64("Signature")?,
        })
    }

    /// The transcript its signature covers.
    pub fn transcript(&self) -> Vec<u8> {
        init_transcript(&self.from, &self.to, self.time, &self.nonce, &self.share)
    }
}

/// `bytes` if it is exactly `len` long.
fn exact(bytes: Vec<u8>, len: usize, what: &'static str) -> Result<Vec<u8>, ProtoError> {
    if bytes.len() == len {
        Ok(bytes)
    } else {
        Err(ProtoError::Invalid(what))
    }
}

/// The callee's acknowledgement (a `200` reply to INIT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitAck {
    /// The callee's fresh nonce.
    pub nonce: Vec<u8>,
    /// The caller's nonce, echoed.
    pub echo: Vec<u8>,
    /// The callee's ephemeral X25519 public key.
    pub share: Vec<u8>,
    /// RSA-PSS(callee's private key, [`init_ack_transcript`]).
    pub signature: Vec<u8>,
    /// The callee's key confirmation: HMAC(confirmation key, "ims confirm responder v2").
    pub confirm: Vec<u8>,
}

impl InitAck {
    /// As a `200` reply.
    pub fn to_message(&self) -> Message {
        Message::ok()
            .with_header("Nonce", crypto::b64_encode(&self.nonce))
            .with_header("Echo", crypto::b64_encode(&self.echo))
            .with_header("Share", crypto::b64_encode(&self.share))
            .with_header("Signature", crypto::b64_encode(&self.signature))
            .with_header("Confirm", crypto::b64_encode(&self.confirm))
    }

    /// From a `200` reply.
    pub fn from_message(m: &Message) -> Result<InitAck, ProtoError> {
        Ok(InitAck {
            nonce: exact(m.req_b64("Nonce")?, NONCE_LEN, "Nonce")?,
            echo: m.req_b64("Echo")?,
            share: exact(m.req_b64("Share")?, crypto::X25519_LEN, "Share")?,
            signature: m.req_b64("Signature")?,
            confirm: exact(m.req_b64("Confirm")?, CONFIRM_LEN, "Confirm")?,
        })
    }
}

/// The caller's key confirmation, sent on the INIT connection right after
/// INIT-ACK: only now may the callee let the new session replace one it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confirm {
    /// The caller.
    pub from: String,
    /// The callee.
    pub to: String,
    /// The new session's id.
    pub session: String,
    /// HMAC(confirmation key, "ims confirm initiator v2").
    pub confirm: Vec<u8>,
}

impl Confirm {
    /// As a wire message.
    pub fn to_message(&self) -> Message {
        Message::request(CONFIRM)
            .with_header("From", &self.from)
            .with_header("To", &self.to)
            .with_header("Session", &self.session)
            .with_header("Confirm", crypto::b64_encode(&self.confirm))
    }

    /// From a wire message.
    pub fn from_message(m: &Message) -> Result<Confirm, ProtoError> {
        Ok(Confirm {
            from: m.req("From")?.to_owned(),
            to: m.req("To")?.to_owned(),
            session: m.req("Session")?.to_owned(),
            confirm: exact(m.req_b64("Confirm")?, CONFIRM_LEN, "Confirm")?,
        })
    }
}

/// The answer to a REKEY (a sealed `200` on the same channel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyAck {
    /// The REKEY's id, echoed.
    pub id: u64,
    /// The answering side's fresh nonce.
    pub nonce: Vec<u8>,
    /// The answering side's ephemeral X25519 public key.
    pub share: Vec<u8>,
    /// Its key confirmation for the new epoch.
    pub confirm: Vec<u8>,
}

impl RekeyAck {
    /// As an inner `200` reply.
    pub fn to_message(&self) -> Message {
        Message::ok()
            .with_header("Id", self.id)
            .with_header("Nonce", crypto::b64_encode(&self.nonce))
            .with_header("Share", crypto::b64_encode(&self.share))
            .with_header("Confirm", crypto::b64_encode(&self.confirm))
    }

    /// From an inner `200` reply.
    pub fn from_message(m: &Message) -> Result<RekeyAck, ProtoError> {
        Ok(RekeyAck {
            id: m.req_parse("Id")?,
            nonce: exact(m.req_b64("Nonce")?, NONCE_LEN, "Nonce")?,
            share: exact(m.req_b64("Share")?, crypto::X25519_LEN, "Share")?,
            confirm: exact(m.req_b64("Confirm")?, CONFIRM_LEN, "Confirm")?,
        })
    }
}

/// Inner messages of a sealed channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRequest {
    /// A text message.
    Msg {
        /// Sender's id of the message, echoed in the acknowledgement.
        id: u64,
        /// UTF-8 text.
        text: String,
    },
    /// Offer of a file.
    FileOffer {
        /// Transfer id (unique per sender).
        id: u64,
        /// The file's name as the sender has it (never trusted as a path).
        name: String,
        /// Bytes.
        size: u64,
        /// MIME type.
        content_type: String,
        /// Hex SHA-256 of the content.
        sha256: String,
    },
    /// The receiver's answer to an offer.
    FileAnswer {
        /// Transfer id.
        id: u64,
        /// Accepted?
        accept: bool,
    },
    /// One chunk, on the transfer's own channel; no reply.
    FileChunk {
        /// Transfer id.
        id: u64,
        /// Where in the file.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// All chunks sent; the receiver checks and answers.
    FileEnd {
        /// Transfer id.
        id: u64,
    },
    /// Either side stops a transfer.
    FileCancel {
        /// Transfer id.
        id: u64,
        /// Whose transfer: true if the transfer is the sender's own offer.
        from_sender: bool,
    },
    /// Starts a new key epoch (PROTOCOL.md §7, re-keying); answered by a
    /// [`RekeyAck`] under the old keys.
    Rekey {
        /// Request id.
        id: u64,
        /// The starter's fresh nonce.
        nonce: Vec<u8>,
        /// The starter's ephemeral X25519 public key.
        share: Vec<u8>,
    },
    /// The first message of the new epoch, sealed with its keys: the
    /// starter's key confirmation. After it the old keys of this channel
    /// are erased.
    Rekeyed {
        /// Request id.
        id: u64,
        /// The starter's key confirmation for the new epoch.
        confirm: Vec<u8>,
    },
}

impl PeerRequest {
    /// As an inner wire message.
    pub fn to_message(&self) -> Message {
        match self {
            PeerRequest::Msg { id, text } => Message::request("MSG")
                .with_header("Id", id)
                .with_header("Content-Type", "text/plain; charset=utf-8")
                .with_body(text.as_bytes().to_vec()),
            PeerRequest::FileOffer {
                id,
                name,
                size,
                content_type,
                sha256,
            } => Message::request("FILE-OFFER")
                .with_header("Id", id)
                .with_header("Size", size)
                .with_header("Content-Type", content_type)
                .with_header("Sha256", sha256)
                // The name may be any UTF-8: it travels in the body.
                .with_body(name.as_bytes().to_vec()),
            PeerRequest::FileAnswer { id, accept } => Message::request("FILE-ANSWER")
                .with_header("Id", id)
                .with_header("Answer", if *accept { "accept" } else { "deny" }),
            PeerRequest::FileChunk { id, offset, data } => Message::request("FILE-CHUNK")
                .with_header("Id", id)
                .with_header("Offset", offset)
                .with_body(data.clone()),
            PeerRequest::FileEnd { id } => Message::request("FILE-END").with_header("Id", id),
            PeerRequest::FileCancel { id, from_sender } => Message::request("FILE-CANCEL")
                .with_header("Id", id)
                .with_header("Side", if *from_sender { "sender" } else { "receiver" }),
            PeerRequest::Rekey { id, nonce, share } => Message::request("REKEY")
                .with_header("Id", id)
                .with_header("Nonce", crypto::b64_encode(nonce))
                .with_header("Share", crypto::b64_encode(share)),
            PeerRequest::Rekeyed { id, confirm } => Message::request("REKEYED")
                .with_header("Id", id)
                .with_header("Confirm", crypto::b64_encode(confirm)),
        }
    }

    /// From an inner wire message (takes the body without copying).
    pub fn from_message(m: Message) -> Result<PeerRequest, ProtoError> {
        let method = m.method().ok_or(ProtoError::NotAReply)?.to_owned();
        let id = m.req_parse("Id")?;
        Ok(match method.as_str() {
            "MSG" => PeerRequest::Msg {
                id,
                text: String::from_utf8(m.body).map_err(|_| ProtoError::Invalid("body"))?,
            },
            "FILE-OFFER" => PeerRequest::FileOffer {
                id,
                size: m.req_parse("Size")?,
                content_type: m.req("Content-Type")?.to_owned(),
                sha256: m.req("Sha256")?.to_owned(),
                name: String::from_utf8(m.body).map_err(|_| ProtoError::Invalid("body"))?,
            },
            "FILE-ANSWER" => PeerRequest::FileAnswer {
                id,
                accept: match m.req("Answer")? {
                    "accept" => true,
                    "deny" => false,
                    _ => return Err(ProtoError::Invalid("Answer")),
                },
            },
            "FILE-CHUNK" => PeerRequest::FileChunk {
                id,
                offset: m.req_parse("Offset")?,
                data: m.body,
            },
            "FILE-END" => PeerRequest::FileEnd { id },
            "FILE-CANCEL" => PeerRequest::FileCancel {
                id,
                from_sender: m.req("Side")? == "sender",
            },
            "REKEY" => PeerRequest::Rekey {
                id,
                nonce: exact(m.req_b64("Nonce")?, NONCE_LEN, "Nonce")?,
                share: exact(m.req_b64("Share")?, crypto::X25519_LEN, "Share")?,
            },
            "REKEYED" => PeerRequest::Rekeyed {
                id,
                confirm: exact(m.req_b64("Confirm")?, CONFIRM_LEN, "Confirm")?,
            },
            other => return Err(ProtoError::UnknownMethod(other.to_owned())),
        })
    }
}

/// The answer to a [`PeerRequest`] (every one but `FILE-CHUNK`): which
/// request it answers (`Id`), and whether it was done or refused. Answers
/// come back in order on their channel, so the receiver of an answer
/// finds the request it settles by its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    /// The request's `Id`.
    pub id: u64,
    /// Done, or why not.
    pub answer: Answer<()>,
}

impl Ack {
    /// Done.
    pub fn done(id: u64) -> Ack {
        Ack { id, answer: Ok(()) }
    }

    /// Refused, for people: `reason`.
    pub fn refused(id: u64, refusal: Refusal, reason: impl Into<String>) -> Ack {
        Ack {
            id,
            answer: Err(Refused::new(refusal, reason)),
        }
    }

    /// As a reply (the inner one of the channel).
    pub fn to_message(&self) -> Message {
        match &self.answer {
            Ok(()) => Message::ok(),
            Err(r) => r.to_message(),
        }
        .with_header("Id", self.id)
    }

    /// From a reply.
    pub fn from_message(m: &Message) -> Result<Ack, ProtoError> {
        m.code().ok_or(ProtoError::NotAReply)?;
        Ok(Ack {
            id: m.req_parse("Id")?,
            answer: match Refused::from_message(m) {
                Some(r) => Err(r),
                None => Ok(()),
            },
        })
    }
}

impl PeerRequest {
    /// The request's `Id`.
    pub fn id(&self) -> u64 {
        match self {
            PeerRequest::Msg { id, .. }
            | PeerRequest::FileOffer { id, .. }
            | PeerRequest::FileAnswer { id, .. }
            | PeerRequest::FileChunk { id, .. }
            | PeerRequest::FileEnd { id }
            | PeerRequest::FileCancel { id, .. }
            | PeerRequest::Rekey { id, .. }
            | PeerRequest::Rekeyed { id, .. } => *id,
        }
    }
}

impl Request for PeerRequest {
    /// The id the answer acknowledges.
    type Reply = u64;

    fn to_message(&self) -> Message {
        PeerRequest::to_message(self)
    }

    fn read_reply(&self, m: &Message) -> Result<Answer<u64>, ProtoError> {
        if matches!(self, PeerRequest::FileChunk { .. }) {
            // Chunks are streamed: nothing answers one.
            return Err(ProtoError::NotAReply);
        }
        let ack = Ack::from_message(m)?;
        if ack.id != self.id() {
            return Err(ProtoError::Invalid("Id"));
        }
        Ok(ack.answer.map(|()| ack.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let reqs = vec![
            PeerRequest::Msg {
                id: 7,
                text: "héllo\r\nworld".into(),
            },
            PeerRequest::FileOffer {
                id: 1,
                name: "../../etc/passwd".into(),
                size: 10,
                content_type: "text/plain".into(),
                sha256: "ab".into(),
            },
            PeerRequest::FileAnswer {
                id: 1,
                accept: true,
            },
            PeerRequest::FileChunk {
                id: 1,
                offset: 4,
                data: vec![0, 1, 13, 10],
            },
            PeerRequest::FileEnd { id: 1 },
            PeerRequest::FileCancel {
                id: 1,
                from_sender: false,
            },
            PeerRequest::Rekey {
                id: 2,
                nonce: vec![4; NONCE_LEN],
                share: vec![5; 32],
            },
            PeerRequest::Rekeyed {
                id: 3,
                confirm: vec![6; CONFIRM_LEN],
            },
        ];
        for r in reqs {
            assert_eq!(PeerRequest::from_message(r.to_message()).unwrap(), r);
        }
        let i = Init {
            from: "joe".into(),
            to: "alice".into(),
            time: 5,
            nonce: vec![1; NONCE_LEN],
            share: vec![2; 32],
            signature: vec![3],
        };
        assert_eq!(Init::from_message(&i.to_message()).unwrap(), i);
        let mut short = i.clone();
        short.share.pop();
        assert_eq!(
            Init::from_message(&short.to_message()),
            Err(ProtoError::Invalid("Share"))
        );
        let a = InitAck {
            nonce: vec![1; NONCE_LEN],
            echo: vec![1; NONCE_LEN],
            share: vec![2; 32],
            signature: vec![3],
            confirm: vec![4; CONFIRM_LEN],
        };
        assert_eq!(InitAck::from_message(&a.to_message()).unwrap(), a);
        let c = Confirm {
            from: "joe".into(),
            to: "alice".into(),
            session: "abc".into(),
            confirm: vec![4; CONFIRM_LEN],
        };
        assert_eq!(Confirm::from_message(&c.to_message()).unwrap(), c);
        let r = RekeyAck {
            id: 9,
            nonce: vec![1; NONCE_LEN],
            share: vec![2; 32],
            confirm: vec![4; CONFIRM_LEN],
        };
        assert_eq!(RekeyAck::from_message(&r.to_message()).unwrap(), r);
    }

    #[test]
    fn acks_are_typed() {
        let msg = PeerRequest::Msg {
            id: 7,
            text: "hi".into(),
        };
        assert_eq!(msg.read_reply(&Ack::done(7).to_message()), Ok(Ok(7)));
        assert_eq!(
            msg.read_reply(&Ack::done(8).to_message()),
            Err(ProtoError::Invalid("Id"))
        );
        let no = Ack::refused(7, Refusal::NotABuddy, "not a buddy");
        assert_eq!(Ack::from_message(&no.to_message()).unwrap(), no);
        assert_eq!(
            msg.read_reply(&no.to_message())
                .unwrap()
                .unwrap_err()
                .refusal,
            Refusal::NotABuddy
        );
    }
}
