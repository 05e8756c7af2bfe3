//! Messages between two clients (PROTOCOL.md §7): the signed INIT that
//! agrees a session key, and the inner messages of the sealed channels.

use super::{transcript, Answer, Fields, ProtoError, Refusal, Refused, Request};
use crate::crypto;
use crate::wire::Message;

/// Outer method of the session-opening request.
pub const INIT: &str = "INIT";
/// Outer method of every sealed peer message.
pub const PEER: &str = "PEER";

/// What INIT's sender signs.
pub fn init_transcript(from: &str, to: &str, time: u64, nonce: &[u8], key: &[u8]) -> Vec<u8> {
    transcript(
        "ims init v1",
        &[
            from.as_bytes(),
            to.as_bytes(),
            &time.to_be_bytes(),
            nonce,
            key,
        ],
    )
}

/// What INIT-ACK's sender signs.
pub fn init_ack_transcript(
    from: &str,
    to: &str,
    initiator_nonce: &[u8],
    responder_nonce: &[u8],
) -> Vec<u8> {
    transcript(
        "ims init-ack v1",
        &[
            from.as_bytes(),
            to.as_bytes(),
            initiator_nonce,
            responder_nonce,
        ],
    )
}

/// The session id both sides derive from the two nonces (clear `Session`
/// header of sealed peer messages, so a stale session is noticed at once).
pub fn session_id(initiator_nonce: &[u8], responder_nonce: &[u8]) -> String {
    crate::keyfile::hex(
        &crypto::sha256(&transcript(
            "ims session id v1",
            &[initiator_nonce, responder_nonce],
        ))[..12],
    )
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
    /// The caller's fresh nonce.
    pub nonce: Vec<u8>,
    /// RSA-OAEP(callee's public key, session secret).
    pub key: Vec<u8>,
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
            .with_header("Key", crypto::b64_encode(&self.key))
            .with_header("Signature", crypto::b64_encode(&self.signature))
    }

    /// From a wire message.
    pub fn from_message(m: &Message) -> Result<Init, ProtoError> {
        Ok(Init {
            from: m.req("From")?.to_owned(),
            to: m.req("To")?.to_owned(),
            time: m.req_parse("Time")?,
            nonce: m.req_b64("Nonce")?,
            key: m.req_b64("Key")?,
            signature: m.req_b64("Signature")?,
        })
    }
}

/// The callee's acknowledgement (a `200` reply to INIT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitAck {
    /// The callee's fresh nonce.
    pub nonce: Vec<u8>,
    /// The caller's nonce, echoed.
    pub echo: Vec<u8>,
    /// RSA-PSS(callee's private key, [`init_ack_transcript`]).
    pub signature: Vec<u8>,
}

impl InitAck {
    /// As a `200` reply.
    pub fn to_message(&self) -> Message {
        Message::ok()
            .with_header("Nonce", crypto::b64_encode(&self.nonce))
            .with_header("Echo", crypto::b64_encode(&self.echo))
            .with_header("Signature", crypto::b64_encode(&self.signature))
    }

    /// From a `200` reply.
    pub fn from_message(m: &Message) -> Result<InitAck, ProtoError> {
        Ok(InitAck {
            nonce: m.req_b64("Nonce")?,
            echo: m.req_b64("Echo")?,
            signature: m.req_b64("Signature")?,
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
            | PeerRequest::FileCancel { id, .. } => *id,
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
        ];
        for r in reqs {
            assert_eq!(PeerRequest::from_message(r.to_message()).unwrap(), r);
        }
        let i = Init {
            from: "joe".into(),
            to: "alice".into(),
            time: 5,
            nonce: vec![1],
            key: vec![2],
            signature: vec![3],
        };
        assert_eq!(Init::from_message(&i.to_message()).unwrap(), i);
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
