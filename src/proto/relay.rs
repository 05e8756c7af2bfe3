//! Relay frames (PROTOCOL.md §7, "Relayed connections"): the bytes of a
//! connection between two clients that cannot reach each other, carried
//! in pieces through their MSs on the held login connections (and between
//! two MSs on a link authenticated by the MSkey).
//!
//! A relayed connection (a *circuit*) carries exactly the bytes a direct
//! connection would: the same INIT, INIT-ACK, CONFIRM and sealed peer
//! messages. The MS sees the frames' names, circuit numbers and sizes,
//! never a key: everything inside was sealed by the clients.

use super::{Fields, ProtoError};
use crate::wire::Message;

/// Method of every relay frame.
pub const RELAY: &str = "RELAY";

/// Most connection bytes in one frame: large enough that a frame's head
/// is a small fraction of it, small enough that one frame never delays
/// another conversation on the same held connection by much (256 KiB at
/// loopback speed is well under a millisecond) and fits the 1 MiB body
/// limit of the held connection.
pub const MAX_RELAY_DATA: usize = 256 * 1024;

/// Bytes a circuit's sender may have sent that the receiver has not yet
/// acknowledged (`Op: ack`): bounds what the MSs hold for one circuit,
/// and lets a relayed transfer keep several frames in flight.
pub const RELAY_WINDOW: u64 = 1024 * 1024;

/// What a frame does to its circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Opens the circuit (sent by its opener, first).
    Open,
    /// Connection bytes (the body).
    Data,
    /// The receiver consumed this many more bytes: the sender may send
    /// that many more.
    Ack(u64),
    /// The connection ended (either side; also the relay's refusal).
    Close,
}

/// One relay frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The sending user (set by the MS; never taken from a client).
    pub from: Option<String>,
    /// The receiving user (set by the sending client).
    pub to: Option<String>,
    /// The circuit's number, chosen by its opener.
    pub circuit: u64,
    /// Whether this frame's sender opened the circuit.
    pub opener: bool,
    /// What the frame does.
    pub op: Op,
    /// Connection bytes (`Op::Data` only), at most [`MAX_RELAY_DATA`].
    pub data: Vec<u8>,
}

impl Frame {
    /// A frame without names yet.
    pub fn new(circuit: u64, opener: bool, op: Op, data: Vec<u8>) -> Frame {
        Frame {
            from: None,
            to: None,
            circuit,
            opener,
            op,
            data,
        }
    }

    /// Bytes this frame weighs in the relay's queues: its body and a
    /// fixed allowance for its head, so that empty frames count too.
    pub fn weight(&self) -> u64 {
        self.data.len() as u64 + 128
    }

    /// Encodes into a wire message (the body moves, it is not copied).
    pub fn into_message(self) -> Message {
        let mut m = Message::request(RELAY);
        if let Some(f) = &self.from {
            m = m.with_header("From", f);
        }
        if let Some(t) = &self.to {
            m = m.with_header("To", t);
        }
        m = m
            .with_header("Circuit", self.circuit)
            .with_header("Side", if self.opener { "opener" } else { "acceptor" });
        m = match self.op {
            Op::Open => m.with_header("Op", "open"),
            Op::Data => m.with_header("Op", "data"),
            Op::Ack(n) => m.with_header("Op", "ack").with_header("Bytes", n),
            Op::Close => m.with_header("Op", "close"),
        };
        m.body = self.data;
        m
    }

    /// Decodes a wire message (its body moves into the frame).
    pub fn from_message(mut m: Message) -> Result<Frame, ProtoError> {
        if m.method() != Some(RELAY) {
            return Err(ProtoError::UnknownMethod(
                m.method().unwrap_or_default().to_owned(),
            ));
        }
        let name = |h: &'static str| -> Result<Option<String>, ProtoError> {
            match m.header(h) {
                None => Ok(None),
                Some(n) if is_name(n) => Ok(Some(n.to_owned())),
                Some(_) => Err(ProtoError::Invalid(h)),
            }
        };
        let from = name("From")?;
        let to = name("To")?;
        let circuit: u64 = m.req_parse("Circuit")?;
        let opener = match m.req("Side")? {
            "opener" => true,
            "acceptor" => false,
            _ => return Err(ProtoError::Invalid("Side")),
        };
        let op = match m.req("Op")? {
            "open" => Op::Open,
            "data" => Op::Data,
            "ack" => Op::Ack(m.req_parse("Bytes")?),
            "close" => Op::Close,
            _ => return Err(ProtoError::Invalid("Op")),
        };
        if op != Op::Data && !m.body.is_empty() {
            return Err(ProtoError::Invalid("body"));
        }
        if m.body.len() > MAX_RELAY_DATA {
            return Err(ProtoError::Invalid("body"));
        }
        // An open is the opener's; acknowledgements travel both ways.
        if op == Op::Open && !opener {
            return Err(ProtoError::Invalid("Side"));
        }
        Ok(Frame {
            from,
            to,
            circuit,
            opener,
            op,
            data: std::mem::take(&mut m.body),
        })
    }
}

/// Whether `n` has the form of a user name (1-32 of `a-z 0-9 _ . -`).
fn is_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut f = Frame::new(7, true, Op::Data, b"hello".to_vec());
        f.to = Some("bob".into());
        let back = Frame::from_message(f.clone().into_message()).unwrap();
        assert_eq!(back, f);
        let mut a = Frame::new(u64::MAX, false, Op::Ack(RELAY_WINDOW), Vec::new());
        a.from = Some("alice".into());
        assert_eq!(Frame::from_message(a.clone().into_message()).unwrap(), a);
        for op in [Op::Open, Op::Close] {
            let f = Frame::new(1, true, op, Vec::new());
            assert_eq!(Frame::from_message(f.clone().into_message()).unwrap(), f);
        }
        // An acceptor does not open; control frames carry no bytes; names
        // have their form; data has its bound.
        let bad = [
            Frame::new(1, false, Op::Open, Vec::new()).into_message(),
            Frame::new(1, true, Op::Close, b"x".to_vec()).into_message(),
            Frame::new(1, true, Op::Data, vec![0; MAX_RELAY_DATA + 1]).into_message(),
            Message::request(RELAY)
                .with_header("To", "Bob")
                .with_header("Circuit", 1)
                .with_header("Side", "opener")
                .with_header("Op", "data"),
            Message::request(RELAY)
                .with_header("Circuit", 1)
                .with_header("Side", "both")
                .with_header("Op", "data"),
            Message::request(RELAY).with_header("Circuit", "-1"),
        ];
        for m in bad {
            assert!(Frame::from_message(m.clone()).is_err(), "{m:?}");
        }
    }
}
