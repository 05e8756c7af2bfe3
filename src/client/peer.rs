//! Direct conversations between clients (PROTOCOL.md §7): the signed
//! INIT / INIT-ACK that agree a session, the sealed channels derived from
//! it, and messages with acknowledgements.
//!
//! A session between two users yields one channel per direction and
//! purpose (`msg:joe>alice`, `msg:alice>joe`, `file:7:joe>alice`), each with
//! its own keys, so that acknowledgements, messages and file chunks on
//! different connections never share a sequence of numbers. The sender of
//! a channel is its initiator: it seals requests and opens replies.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, warn};
use parking_lot::Mutex;

use super::events::Event;
use super::Client;
use crate::crypto::{self, RsaPublicKey};
use crate::proto::peer::{
    init_ack_transcript, init_transcript, session_id, Ack, Init, InitAck, PeerRequest, PEER,
};
use crate::proto::{transcript, Refusal};
use crate::seal::{Opener, Role, Sealer, SessionKeys};
use crate::wire::io::{write_message, IoError, MessageReader};
use crate::wire::{code, Limits, Message};

/// How far an INIT's clock may be from ours.
const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// Bytes of an INIT nonce.
const NONCE_LEN: usize = 24;
/// How long an INIT from someone not (yet) an online buddy waits for the
/// push that would make them one.
const BUDDY_GRACE: Duration = Duration::from_secs(2);
/// Longest text message: well under the body limit once sealed.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Keys of one channel of a session.
pub fn channel(secret: &[u8; 32], ni: &[u8], nr: &[u8], label: &str, role: Role) -> SessionKeys {
    SessionKeys::derive(
        secret,
        &transcript("ims channel v1", &[ni, nr, label.as_bytes()]),
        role,
    )
}

/// The label of the message channel from `from` to `to`.
fn msg_label(from: &str, to: &str) -> String {
    format!("msg:{from}>{to}")
}

/// The label of transfer `id`'s channel from `from` to `to`.
pub fn file_label(id: u64, from: &str, to: &str) -> String {
    format!("file:{id}:{from}>{to}")
}

/// An agreed session with one buddy.
pub struct PeerSession {
    /// Both sides derive it from the nonces; it names the session on the wire.
    pub id: String,
    /// The buddy.
    pub peer: String,
    /// Where the buddy's client listens.
    pub address: SocketAddr,
    secret: [u8; 32],
    ni: Vec<u8>,
    nr: Vec<u8>,
    /// Our message channel to the buddy: the connection and its keys.
    out: Mutex<Outgoing>,
    /// The buddy's message channel to us: opens requests, seals replies.
    incoming: Mutex<(Opener, Sealer)>,
}

/// Our side of our message channel.
struct Outgoing {
    send: Sealer,
    /// Opens the buddy's acknowledgements; shared with the reader thread.
    acks: Arc<Mutex<Opener>>,
    /// The connection carrying our requests, while open.
    stream: Option<TcpStream>,
}

impl PeerSession {
    fn new(
        me: &str,
        peer: &str,
        address: SocketAddr,
        secret: [u8; 32],
        ni: Vec<u8>,
        nr: Vec<u8>,
    ) -> PeerSession {
        let out = channel(&secret, &ni, &nr, &msg_label(me, peer), Role::Initiator);
        let inc = channel(&secret, &ni, &nr, &msg_label(peer, me), Role::Responder);
        PeerSession {
            id: session_id(&ni, &nr),
            peer: peer.to_owned(),
            address,
            secret,
            ni,
            nr,
            out: Mutex::new(Outgoing {
                send: out.send,
                acks: Arc::new(Mutex::new(out.recv)),
                stream: None,
            }),
            incoming: Mutex::new((inc.recv, inc.send)),
        }
    }

    /// The keys of a file transfer's channel.
    pub fn file_channel(&self, id: u64, from: &str, to: &str, role: Role) -> SessionKeys {
        channel(
            &self.secret,
            &self.ni,
            &self.nr,
            &file_label(id, from, to),
            role,
        )
    }

    /// The clear headers of a sealed peer message on `chan`.
    pub fn clear<'a>(&'a self, me: &'a str, chan: &'a str) -> [(&'a str, &'a str); 4] {
        [
            ("From", me),
            ("To", &self.peer),
            ("Session", &self.id),
            ("Channel", chan),
        ]
    }

    /// Closes our connection (the reader thread then ends).
    fn close(&self) {
        if let Some(s) = self.out.lock().stream.take() {
            if let Err(e) = s.shutdown(std::net::Shutdown::Both) {
                debug!("closing the connection to {}: {e}", self.peer);
            }
        }
    }
}

/// A request that waits for its acknowledgement.
#[derive(Debug)]
pub struct Pending {
    /// When to give up.
    pub deadline: Instant,
    /// For what.
    pub kind: PendingKind,
}

/// What an acknowledgement settles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PendingKind {
    /// A text message: `delivered` or `send-failed`.
    Msg,
    /// Anything else on the channel (offers, answers): failures only.
    Control(String),
}

/// All sessions, the INIT replay cache and the waiting acknowledgements.
#[derive(Default)]
pub struct Peers {
    sessions: Mutex<HashMap<String, Arc<PeerSession>>>,
    /// One INIT at a time per buddy.
    opening: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// (from, nonce) of INITs seen, with their time, for replay refusal.
    seen: Mutex<HashMap<(String, Vec<u8>), u64>>,
    /// (peer, request id) → waiting.
    pub pending: Mutex<HashMap<(String, u64), Pending>>,
}

impl Peers {
    /// The session with `peer`, if any.
    pub fn get(&self, peer: &str) -> Option<Arc<PeerSession>> {
        self.sessions.lock().get(peer).cloned()
    }

    /// Ends the session with `peer` (logged out, went offline, removed).
    pub fn drop_session(&self, peer: &str) {
        if let Some(s) = self.sessions.lock().remove(peer) {
            s.close();
        }
    }

    /// Ends every session.
    pub fn clear(&self) {
        let all: Vec<_> = self.sessions.lock().drain().map(|(_, s)| s).collect();
        for s in all {
            s.close();
        }
        self.pending.lock().clear();
    }

    fn install(&self, s: Arc<PeerSession>) {
        if let Some(old) = self.sessions.lock().insert(s.peer.clone(), s) {
            old.close();
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a message could not be sent.
pub fn failure(to: &str, reason: impl Into<String>) -> Event {
    Event::SendFailed {
        to: to.to_owned(),
        id: 0,
        reason: reason.into(),
    }
}

impl Client {
    /// Our name and key, and `to`'s presence, if we may talk to `to`.
    fn peer_target(
        &self,
        to: &str,
    ) -> Result<(String, crypto::RsaPrivateKey, SocketAddr, Vec<u8>), String> {
        let guard = self.settled_session();
        let s = guard.session().ok_or("not logged in; /login NAME first")?;
        match s.buddies.get(to) {
            None => Err(format!("{to} is not your buddy; /add {to} first")),
            Some(None) => Err(format!("{to} is offline")),
            Some(Some(p)) => Ok((
                s.user.clone(),
                s.private_key.clone(),
                p.address,
                p.public_key.clone(),
            )),
        }
    }

    /// Waits up to `grace` for `who` to be an online buddy; then as
    /// [`Client::peer_target`].
    fn wait_for_buddy(
        &self,
        who: &str,
        grace: Duration,
    ) -> Result<(String, crypto::RsaPrivateKey, SocketAddr, Vec<u8>), String> {
        let end = Instant::now() + grace;
        let mut guard = self.state.lock();
        loop {
            let ready = guard
                .session()
                .is_some_and(|s| matches!(s.buddies.get(who), Some(Some(_))));
            if ready || Instant::now() >= end {
                break;
            }
            self.changed.wait_until(&mut guard, end);
        }
        drop(guard);
        self.peer_target(who)
    }

    /// The session with `to`, opening one (INIT) if there is none.
    pub(super) fn session_with(self: &Arc<Self>, to: &str) -> Result<Arc<PeerSession>, String> {
        if let Some(s) = self.peers.get(to) {
            return Ok(s);
        }
        let gate = self
            .peers
            .opening
            .lock()
            .entry(to.to_owned())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock();
        if let Some(s) = self.peers.get(to) {
            return Ok(s);
        }
        let (me, private, address, public) = self.peer_target(to)?;
        let their_key = RsaPublicKey::from_der(&public)
            .map_err(|_| format!("{to}'s public key is unusable"))?;
        let secret = crypto::random_array::<32>();
        let ni = crypto::random_array::<NONCE_LEN>().to_vec();
        let key = their_key.encrypt_oaep(&secret).map_err(|e| e.to_string())?;
        let time = now_unix();
        let signature = private
            .sign_pss(&init_transcript(&me, to, time, &ni, &key))
            .map_err(|e| e.to_string())?;
        let init = Init {
            from: me.clone(),
            to: to.to_owned(),
            time,
            nonce: ni.clone(),
            key,
            signature,
        };
        let timeout = self.config.timeout;
        let stream = super::connect(&address.to_string(), timeout)
            .map_err(|e| format!("{to} does not answer: {e}"))?;
        let mut reader = MessageReader::new(stream);
        write_message(
            reader.get_mut(),
            &init.to_message(),
            Instant::now() + timeout,
        )
        .map_err(|e| format!("{to} does not answer: {e}"))?;
        let reply = reader
            .read_message(&Limits::DEFAULT, Instant::now() + timeout)
            .map_err(|e| format!("no answer from {to}: {e}"))?
            .ok_or_else(|| format!("{to} closed the connection"))?;
        if !reply.is_success() {
            return Err(format!(
                "{to} refused the session: {}",
                reply.reason().unwrap_or("")
            ));
        }
        let ack =
            InitAck::from_message(&reply).map_err(|e| format!("bad INIT-ACK from {to}: {e}"))?;
        if !crypto::ct_eq(&ack.echo, &ni)
            || their_key
                .verify_pss(
                    &init_ack_transcript(to, &me, &ni, &ack.nonce),
                    &ack.signature,
                )
                .is_err()
        {
            warn!("INIT-ACK from {to} with a bad signature or echo; session refused");
            return Err(format!("{to}'s answer was not signed by {to}"));
        }
        let session = Arc::new(PeerSession::new(&me, to, address, secret, ni, ack.nonce));
        // The INIT connection becomes our message channel's connection.
        let (stream, _) = reader.into_parts();
        self.attach(&session, stream)?;
        self.peers.install(session.clone());
        debug!("session {} with {to} open", session.id);
        Ok(session)
    }

    /// Makes `stream` the session's outgoing connection and starts the
    /// thread that reads the acknowledgements arriving on it.
    fn attach(
        self: &Arc<Self>,
        session: &Arc<PeerSession>,
        stream: TcpStream,
    ) -> Result<(), String> {
        let reader = stream.try_clone().map_err(|e| e.to_string())?;
        let acks = {
            let mut out = session.out.lock();
            out.stream = Some(stream);
            out.acks.clone()
        };
        let client = Arc::downgrade(self);
        let session = session.clone();
        std::thread::Builder::new()
            .name(format!("acks-{}", session.peer))
            .spawn(move || read_acks(client, session, reader, acks))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Seals and writes one request on our channel to `to`; its
    /// acknowledgement will settle `pending`.
    pub(super) fn send_request(
        self: &Arc<Self>,
        to: &str,
        req: &PeerRequest,
        id: u64,
        kind: PendingKind,
    ) -> Result<(), String> {
        let me = self.user().ok_or("not logged in; /login NAME first")?;
        for attempt in 0..2 {
            let session = self.session_with(to)?;
            let timeout = self.config.timeout;
            let mut out = session.out.lock();
            if out.stream.is_none() {
                drop(out);
                let stream = super::connect(&session.address.to_string(), timeout)
                    .map_err(|e| format!("{to} does not answer: {e}"))?;
                self.attach(&session, stream)?;
                out = session.out.lock();
            }
            let sealed = out
                .send
                .seal(PEER, &session.clear(&me, "msg"), &req.to_message())
                .map_err(|e| e.to_string())?;
            self.peers.pending.lock().insert(
                (to.to_owned(), id),
                Pending {
                    deadline: Instant::now() + self.config.ack_timeout,
                    kind: kind.clone(),
                },
            );
            let Some(stream) = out.stream.as_mut() else {
                continue;
            };
            match write_message(stream, &sealed, Instant::now() + timeout) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // The buddy's listener closed an idle connection: reconnect once.
                    debug!("writing to {to}: {e}");
                    self.peers.pending.lock().remove(&(to.to_owned(), id));
                    out.stream = None;
                    if attempt == 1 {
                        return Err(format!("no answer from {to}: {e}"));
                    }
                }
            }
        }
        Err(format!("no answer from {to}"))
    }

    /// Sends a text message; `delivered` or `send-failed` follows.
    pub fn send_message(self: &Arc<Self>, to: &str, text: &str) -> Result<u64, String> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(format!(
                "message too long ({} bytes; at most {MAX_TEXT_BYTES})",
                text.len()
            ));
        }
        let to = to.to_ascii_lowercase();
        let id = self.next_id();
        self.send_request(
            &to,
            &PeerRequest::Msg {
                id,
                text: text.to_owned(),
            },
            id,
            PendingKind::Msg,
        )?;
        self.set_last_peer(&to);
        Ok(id)
    }

    /// Fails every acknowledgement past its deadline.
    pub(super) fn expire_pending(&self) {
        let now = Instant::now();
        let expired: Vec<((String, u64), Pending)> = {
            let mut pending = self.peers.pending.lock();
            let keys: Vec<(String, u64)> = pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| pending.remove_entry(&k))
                .collect()
        };
        for ((to, id), p) in expired {
            self.settle(&to, id, p.kind, Err(format!("no answer from {to}")));
        }
    }

    /// Reports the outcome of a request.
    fn settle(&self, to: &str, id: u64, kind: PendingKind, outcome: Result<(), String>) {
        match (kind, outcome) {
            (PendingKind::Msg, Ok(())) => self.emit(Event::Delivered {
                to: to.to_owned(),
                id,
            }),
            (PendingKind::Msg, Err(reason)) => self.emit(Event::SendFailed {
                to: to.to_owned(),
                id,
                reason,
            }),
            (PendingKind::Control(_), Ok(())) => {}
            (PendingKind::Control(what), Err(reason)) => self.emit(Event::Error {
                command: what,
                reason,
            }),
        }
    }

    /// An INIT from a buddy: checked, answered, and the session installed.
    pub(super) fn on_init(&self, m: &Message) -> Message {
        let init = match Init::from_message(m) {
            Ok(i) => i,
            Err(e) => return e.reply(),
        };
        // A new buddy may write before the push that makes them one (or
        // says they are online) has reached us: give it a moment.
        let target = self
            .peer_target(&init.from)
            .or_else(|_| self.wait_for_buddy(&init.from, BUDDY_GRACE));
        let (me, private, address, public) = match target {
            Ok(t) => t,
            Err(reason) => {
                warn!("INIT from {} refused: {reason}", init.from);
                return Message::reply(code::FORBIDDEN, "not an online buddy");
            }
        };
        if init.to != me {
            return Message::reply(code::NOT_FOUND, "not this user");
        }
        let now = now_unix();
        if init.time.abs_diff(now) > MAX_CLOCK_SKEW_SECS {
            warn!(
                "INIT from {} refused: clock off by {} s",
                init.from,
                init.time.abs_diff(now)
            );
            return Message::reply(code::AUTH_FAILED, "stale INIT");
        }
        let signed = RsaPublicKey::from_der(&public).and_then(|k| {
            k.verify_pss(
                &init_transcript(&init.from, &init.to, init.time, &init.nonce, &init.key),
                &init.signature,
            )
        });
        if signed.is_err() {
            warn!(
                "INIT claiming to be from {} has a bad signature; refused",
                init.from
            );
            return Message::reply(code::AUTH_FAILED, "bad signature");
        }
        {
            let mut seen = self.peers.seen.lock();
            seen.retain(|_, t| now.saturating_sub(*t) <= 2 * MAX_CLOCK_SKEW_SECS);
            if seen
                .insert((init.from.clone(), init.nonce.clone()), now)
                .is_some()
            {
                warn!("replayed INIT from {} refused", init.from);
                return Message::reply(code::AUTH_FAILED, "replayed INIT");
            }
        }
        let secret: [u8; 32] = match private.decrypt_oaep(&init.key).map(<[u8; 32]>::try_from) {
            Ok(Ok(k)) => k,
            _ => {
                warn!("INIT from {} does not decrypt; refused", init.from);
                return Message::reply(code::AUTH_FAILED, "undecryptable INIT");
            }
        };
        let nr = crypto::random_array::<NONCE_LEN>().to_vec();
        let signature =
            match private.sign_pss(&init_ack_transcript(&me, &init.from, &init.nonce, &nr)) {
                Ok(s) => s,
                Err(_) => return Message::reply(code::INTERNAL, "cannot sign"),
            };
        let session = PeerSession::new(
            &me,
            &init.from,
            address,
            secret,
            init.nonce.clone(),
            nr.clone(),
        );
        debug!("session {} with {} accepted", session.id, init.from);
        self.peers.install(Arc::new(session));
        InitAck {
            nonce: nr,
            echo: init.nonce,
            signature,
        }
        .to_message()
    }

    /// A sealed request on a buddy's message channel to us.
    pub(super) fn on_peer_msg(self: &Arc<Self>, m: &Message) -> Message {
        let (Some(from), Some(sid)) = (m.header("From"), m.header("Session")) else {
            return Message::reply(code::BAD_REQUEST, "missing From or Session");
        };
        let Some(session) = self.peers.get(from).filter(|s| s.id == sid) else {
            return Message::reply(code::NOT_FOUND, "unknown session");
        };
        let Some(me) = self.user() else {
            return Message::reply(code::FORBIDDEN, "not logged in");
        };
        let mut channel = session.incoming.lock();
        let inner = match channel.0.open(m) {
            Ok(i) => i,
            Err(e) => {
                warn!("refused a message from {from}: {e}");
                return Message::reply(code::BAD_REQUEST, &format!("refused: {e}"));
            }
        };
        let reply = match PeerRequest::from_message(inner) {
            Ok(req) => self.on_peer_request(&session.peer, req).to_message(),
            Err(e) => e.reply(),
        };
        match channel.1.seal(PEER, &session.clear(&me, "msg"), &reply) {
            Ok(sealed) => sealed,
            Err(e) => Message::reply(code::INTERNAL, &e.to_string()),
        }
    }

    fn on_peer_request(self: &Arc<Self>, from: &str, req: PeerRequest) -> Ack {
        match req {
            PeerRequest::Msg { id, text } => {
                self.set_last_peer(from);
                self.emit(Event::Message {
                    from: from.to_owned(),
                    text,
                    id,
                });
                Ack::done(id)
            }
            PeerRequest::FileOffer {
                id,
                name,
                size,
                content_type,
                sha256,
            } => self.on_file_offer(from, id, name, size, content_type, sha256),
            PeerRequest::FileAnswer { id, accept } => self.on_file_answer(from, id, accept),
            PeerRequest::FileCancel { id, from_sender } => {
                self.on_file_cancel(from, id, from_sender)
            }
            PeerRequest::FileChunk { id, .. } | PeerRequest::FileEnd { id } => Ack::refused(
                id,
                Refusal::BadRequest,
                "file data belongs on the transfer's channel",
            ),
        }
    }
}

/// The thread reading acknowledgements from one outgoing connection.
fn read_acks(
    client: std::sync::Weak<Client>,
    session: Arc<PeerSession>,
    stream: TcpStream,
    acks: Arc<Mutex<Opener>>,
) {
    let mut reader = MessageReader::new(stream);
    loop {
        // The buddy's listener closes an idle connection; a day bounds a silent one.
        let next = reader.read_message(
            &Limits::DEFAULT,
            Instant::now() + Duration::from_secs(86_400),
        );
        let Some(client) = client.upgrade() else {
            return;
        };
        let reply = match next {
            Ok(Some(r)) => r,
            Ok(None) | Err(IoError::Io(_)) | Err(IoError::Timeout) => break,
            Err(e) => {
                warn!("bad acknowledgement from {}: {e}", session.peer);
                break;
            }
        };
        if reply.method() != Some(PEER) {
            // An unsealed error: the buddy no longer knows this session.
            warn!(
                "{} refused our message: {}",
                session.peer,
                reply.reason().unwrap_or("")
            );
            client.peers.drop_session(&session.peer);
            fail_all(&client, &session.peer, "the session ended; send again");
            return;
        }
        let inner = match acks.lock().open(&reply) {
            Ok(i) => i,
            Err(e) => {
                warn!("unreadable acknowledgement from {}: {e}", session.peer);
                continue;
            }
        };
        let Ok(Ack { id, answer }) = Ack::from_message(&inner) else {
            continue;
        };
        let Some(p) = client
            .peers
            .pending
            .lock()
            .remove(&(session.peer.clone(), id))
        else {
            continue;
        };
        let outcome = answer.map_err(|refused| refused.reason);
        client.settle(&session.peer, id, p.kind, outcome);
    }
    // The connection ended: requests still waiting on it will not be answered.
    if let Some(client) = client.upgrade() {
        let mut out = session.out.lock();
        let ours = out.stream.as_ref().and_then(|s| s.local_addr().ok())
            == reader.get_ref().local_addr().ok();
        if ours {
            out.stream = None;
        }
        drop(out);
        if ours {
            fail_all(
                &client,
                &session.peer,
                &format!("no answer from {}", session.peer),
            );
        }
    }
}

fn fail_all(client: &Client, peer: &str, reason: &str) {
    let lost: Vec<(u64, Pending)> = {
        let mut pending = client.peers.pending.lock();
        let keys: Vec<(String, u64)> = pending.keys().filter(|(p, _)| p == peer).cloned().collect();
        keys.into_iter()
            .filter_map(|k| pending.remove(&k).map(|p| (k.1, p)))
            .collect()
    };
    for (id, p) in lost {
        client.settle(peer, id, p.kind, Err(reason.to_owned()));
    }
}
