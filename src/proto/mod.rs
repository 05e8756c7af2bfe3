//! Typed requests, replies and events of every link, over wire messages.
//!
//! Each link has its own module; this one holds what they share: the
//! error of this layer, header accessors, and the byte strings that both
//! sides of a proof or signature must build identically.

pub mod crs;
mod fields;
pub mod ms;
pub mod peer;
pub mod relay;
pub mod reply;
pub mod status;

pub use fields::{b64_serde, Fields};
pub use reply::{Answer, Refusal, Refused, Request};

use std::fmt;

use crate::wire::Message;

/// Why a message is not a valid request or reply of its link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtoError {
    /// A header the method needs is absent.
    Missing(&'static str),
    /// A header or the body does not hold a valid value.
    Invalid(&'static str),
    /// The method is not one this link knows.
    UnknownMethod(String),
    /// A reply was expected and a request came, or the other way round.
    NotAReply,
}

impl ProtoError {
    /// The error reply a server sends for this error.
    pub fn reply(&self) -> Message {
        Refused::from(self).to_message()
    }
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::Missing(h) => write!(f, "missing {h}"),
            ProtoError::Invalid(h) => write!(f, "invalid {h}"),
            ProtoError::UnknownMethod(m) => write!(f, "unknown method {m}"),
            ProtoError::NotAReply => f.write_str("expected a reply"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// Length-prefixed concatenation, so that no two different field lists
/// give the same bytes to sign or MAC.
pub fn transcript(label: &str, parts: &[&[u8]]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(label.len() + parts.iter().map(|p| p.len() + 4).sum::<usize>() + 4);
    for part in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// What the client proves and the MS signs at login (see PROTOCOL.md §6).
pub fn login_auth_message(
    user: &str,
    client_nonce: &[u8],
    server_nonce: &[u8],
    salt: &[u8],
    iterations: u32,
) -> Vec<u8> {
    transcript(
        "ims login v1",
        &[
            user.as_bytes(),
            client_nonce,
            server_nonce,
            salt,
            &iterations.to_be_bytes(),
        ],
    )
}

/// What an MS (or the operator's tool) proves at enrollment: every field
/// of its ENROLL, so that none can be changed on the way.
pub fn enroll_ms_transcript(
    ms_nonce: &[u8],
    crs_nonce: &[u8],
    listen: &str,
    capacity: u32,
    role: &str,
    instance: &str,
) -> Vec<u8> {
    transcript(
        "ims enroll ms v1",
        &[
            ms_nonce,
            crs_nonce,
            listen.as_bytes(),
            &capacity.to_be_bytes(),
            role.as_bytes(),
            instance.as_bytes(),
        ],
    )
}

/// What the CRS proves back at enrollment, with the id and CRS instance
/// it answers.
pub fn enroll_crs_transcript(
    ms_nonce: &[u8],
    crs_nonce: &[u8],
    ms_id: u64,
    crs_instance: &str,
) -> Vec<u8> {
    transcript(
        "ims enroll crs v1",
        &[
            ms_nonce,
            crs_nonce,
            &ms_id.to_be_bytes(),
            crs_instance.as_bytes(),
        ],
    )
}

/// What a buddy request's sender signs.
pub fn add_transcript(from: &str, to: &str, nonce: &[u8]) -> Vec<u8> {
    transcript("ims add v1", &[from.as_bytes(), to.as_bytes(), nonce])
}
