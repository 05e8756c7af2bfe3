//! Relay links between MSs (PROTOCOL.md §7, "Relayed connections"): when
//! a relayed frame's receiver is logged in at another MS, the sender's MS
//! passes it there on a link of its own, authenticated both ways by an
//! HMAC challenge-response over the MSkey and sealed with keys from the
//! MSkey and both nonces, so that no one without the MSkey can put a name
//! on a frame. A link carries frames one way only (each MS opens its own
//! to the other), written by one thread per link from a queue, so a slow
//! MS holds up only the frames going to it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use log::{debug, info, warn};
use parking_lot::Mutex;

use crate::crypto;
use crate::link::Conn;
use crate::proto::relay::Frame;
use crate::proto::{self, Fields, ProtoError, Refusal, Refused};
use crate::seal::{Opener, Role, SessionKeys};
use crate::wire::io::write_message;
use crate::wire::Message;

/// The first request of a relay link (in the clear).
pub const HELLO: &str = "RELAY-HELLO";
/// The second (in the clear), proving the MSkey.
pub const PROVE: &str = "RELAY-LINK";
/// Bytes of each side's nonce.
pub const LINK_NONCE_LEN: usize = 32;
/// How long an idle link stays open.
const LINK_IDLE: Duration = Duration::from_secs(60);

/// The responder's proof.
fn responder_proof(ms_key: &[u8], a: &[u8], b: &[u8]) -> [u8; 32] {
    crypto::hmac_sha256(ms_key, &proto::transcript("ims relay link b v1", &[a, b]))
}

/// The initiator's proof.
fn initiator_proof(ms_key: &[u8], a: &[u8], b: &[u8]) -> [u8; 32] {
    crypto::hmac_sha256(ms_key, &proto::transcript("ims relay link a v1", &[a, b]))
}

/// The link's keys: the MSkey, both nonces and a label as context.
fn link_keys(ms_key: &[u8], a: &[u8], b: &[u8], role: Role) -> SessionKeys {
    let mut context = Vec::with_capacity(a.len() + b.len() + 5);
    context.extend_from_slice(a);
    context.extend_from_slice(b);
    context.extend_from_slice(b"relay");
    SessionKeys::derive(ms_key, &context, role)
}

/// The accepting side of a link, on the MS's listener.
pub enum Accepted {
    /// `RELAY-HELLO` answered; its proof is due.
    Challenged {
        /// The initiator's nonce.
        a: Vec<u8>,
        /// Ours.
        b: Vec<u8>,
    },
    /// Proven: sealed frames follow.
    Open(Box<Opener>),
}

/// `RELAY-HELLO`: our nonce and proof, and the state waiting for theirs.
pub fn hello(ms_key: &[u8], m: &Message) -> Result<(Message, Accepted), Refused> {
    let a = m.req_b64("Ms-Nonce")?;
    if a.len() != LINK_NONCE_LEN {
        return Err(ProtoError::Invalid("Ms-Nonce").into());
    }
    let b = crypto::random_array::<LINK_NONCE_LEN>().to_vec();
    let reply = Message::ok()
        .with_header("Ms-Nonce", crypto::b64_encode(&b))
        .with_header(
            "Proof",
            crypto::b64_encode(&responder_proof(ms_key, &a, &b)),
        );
    Ok((reply, Accepted::Challenged { a, b }))
}

/// `RELAY-LINK` on a challenged link: the opener of its frames, or a
/// refusal (and the link is closed).
pub fn prove(ms_key: &[u8], state: &Accepted, m: &Message) -> Result<Opener, Refused> {
    let Accepted::Challenged { a, b } = state else {
        return Err(Refused::new(Refusal::BadRequest, "link already proven"));
    };
    if m.method() != Some(PROVE) {
        return Err(Refused::new(Refusal::BadRequest, "expected RELAY-LINK"));
    }
    let proof = m.req_b64("Proof")?;
    if !crypto::ct_eq(&proof, &initiator_proof(ms_key, a, b)) {
        warn!("a relay link with a bad MSkey proof refused");
        return Err(Refused::new(Refusal::BadProof, "bad proof"));
    }
    Ok(link_keys(ms_key, a, b, Role::Responder).recv)
}

/// A frame waiting for a link, with what it weighs in its sender's budget.
pub type Queued = (Frame, Option<(Arc<super::relay::Budget>, u64)>);

/// The links this MS opened to others, by address.
#[derive(Default)]
pub struct Links {
    map: Arc<Mutex<HashMap<String, Sender<Queued>>>>,
}

impl Links {
    /// Queues `q` for the MS at `addr`, opening a link if there is none.
    pub fn send(&self, addr: &str, ms_key: &[u8], timeout: Duration, q: Queued) {
        let mut map = self.map.lock();
        if !map.contains_key(addr) {
            let (tx, rx) = unbounded();
            let (m, a, k) = (self.map.clone(), addr.to_owned(), ms_key.to_vec());
            let spawned = std::thread::Builder::new()
                .name("ms-relay-link".into())
                .spawn(move || writer(m, a, k, timeout, rx));
            if let Err(e) = spawned {
                warn!("cannot start a relay link: {e}");
                release(&q);
                return;
            }
            map.insert(addr.to_owned(), tx);
        }
        if let Some(tx) = map.get(addr) {
            if let Err(e) = tx.send(q) {
                release(&e.0);
            }
        }
    }
}

fn release(q: &Queued) {
    if let Some((b, w)) = &q.1 {
        b.release(*w);
    }
}

/// Opens a link to `addr`: the connection and the sealer of its frames.
fn open(
    addr: &str,
    ms_key: &[u8],
    timeout: Duration,
) -> Result<(Conn, crate::seal::Sealer), String> {
    let mut conn = Conn::connect(addr, timeout).map_err(|e| e.to_string())?;
    let a = crypto::random_array::<LINK_NONCE_LEN>().to_vec();
    let reply = conn
        .exchange(&Message::request(HELLO).with_header("Ms-Nonce", crypto::b64_encode(&a)))
        .map_err(|e| e.to_string())?;
    if !reply.is_success() {
        return Err(format!("refused: {}", reply.reason().unwrap_or("")));
    }
    let b = reply.req_b64("Ms-Nonce").map_err(|e| e.to_string())?;
    let proof = reply.req_b64("Proof").map_err(|e| e.to_string())?;
    if b.len() != LINK_NONCE_LEN || !crypto::ct_eq(&proof, &responder_proof(ms_key, &a, &b)) {
        return Err("the other MS did not prove the MSkey".into());
    }
    let prove = Message::request(PROVE).with_header(
        "Proof",
        crypto::b64_encode(&initiator_proof(ms_key, &a, &b)),
    );
    let reply = conn.exchange(&prove).map_err(|e| e.to_string())?;
    if !reply.is_success() {
        return Err(format!("refused: {}", reply.reason().unwrap_or("")));
    }
    Ok((conn, link_keys(ms_key, &a, &b, Role::Initiator).send))
}

/// A link's thread: opens it, then writes its frames sealed, until idle
/// or broken; frames it cannot write are dropped (their circuits end by
/// their windows' timeouts at the clients).
fn writer(
    map: Arc<Mutex<HashMap<String, Sender<Queued>>>>,
    addr: String,
    ms_key: Vec<u8>,
    timeout: Duration,
    rx: Receiver<Queued>,
) {
    let leave = |rx: &Receiver<Queued>| {
        let mut m = map.lock();
        while let Ok(q) = rx.try_recv() {
            release(&q);
        }
        m.remove(&addr);
    };
    let (conn, mut sealer) = match open(&addr, &ms_key, timeout) {
        Ok(c) => c,
        Err(e) => {
            warn!("relay link to {addr}: {e}");
            leave(&rx);
            return;
        }
    };
    info!("relay link to {addr} open");
    let mut stream = conn.into_stream();
    loop {
        let q = match rx.recv_timeout(LINK_IDLE) {
            Ok(q) => q,
            Err(RecvTimeoutError::Timeout) => {
                let mut m = map.lock();
                if rx.is_empty() {
                    m.remove(&addr);
                    debug!("relay link to {addr} idle; closed");
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        release(&q);
        let sealed = sealer.seal(crate::proto::crs::SEALED, &[], &q.0.into_message());
        let written = match sealed {
            Ok(m) => {
                write_message(&mut stream, &m, Instant::now() + timeout).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            warn!("relay link to {addr}: {e}; closed");
            leave(&rx);
            return;
        }
    }
}
