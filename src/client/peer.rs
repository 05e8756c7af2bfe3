//! Direct conversations between clients (PROTOCOL.md §7): the signed
//! ephemeral X25519 exchange (INIT / INIT-ACK / CONFIRM) that agrees a
//! session, the sealed channels derived from it, messages with
//! acknowledgements, and re-keying inside the session.
//!
//! A session between two users yields one channel per direction and
//! purpose (`msg:joe>alice`, `msg:alice>joe`, `file:7:joe>alice`), each with
//! its own keys, so that acknowledgements, messages and file chunks on
//! different connections never share a sequence of numbers. The sender of
//! a channel is its initiator: it seals requests and opens replies.
//!
//! A session lives through *epochs*: the exchange that opens it is the
//! first, and each re-key (REKEY / REKEYED on a message channel) starts
//! another whose keys come from a fresh X25519 agreement mixed with the
//! previous secret. Every sealed message names its epoch in the clear
//! `Session` header, so messages sealed just before a switch still open
//! after it; an epoch's keys are erased once nothing more can arrive under
//! them, and at the latest [`EPOCH_GRACE`] after the switch.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use parking_lot::Mutex;

use super::error::{ClientError, PeerStep};
use super::events::Event;
use super::handshake::{
    self, EpochKeys, HandshakeError, Initiating, RekeyConfirmation, Rekeying, Tentative,
};
use super::trust::Check;
use super::Client;
use crate::crypto::{self, RsaPublicKey};
use crate::proto::peer::{Ack, Confirm, Init, InitAck, PeerRequest, RekeyAck, PEER};
use crate::proto::{Fields, Refusal, Refused};
use crate::seal::{Opener, Role, Sealer, SessionKeys};
use crate::wire::io::{write_message, IoError, MessageReader};
use crate::wire::{code, Limits, Message};

/// How far an INIT's clock may be from ours. An INIT older than this is
/// refused whatever the replay cache holds (the cache is empty after a
/// restart, the clock check is not).
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// How long an INIT from someone not (yet) an online buddy waits for the
/// push that would make them one.
const BUDDY_GRACE: Duration = Duration::from_secs(2);
/// Longest text message: well under the body limit once sealed.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// How long a retired epoch's keys are kept for messages and
/// acknowledgements still in flight on the other connection, and how long
/// a re-key may wait for its answer or its confirmation before it is
/// abandoned (the old epoch then stays).
pub const EPOCH_GRACE: Duration = Duration::from_secs(30);
/// Retired epochs kept at most: each is erased as soon as nothing more can
/// arrive under it, so more than this means a peer re-keying abusively.
const MAX_RETIRED: usize = 8;
/// How long a retired epoch's secret outlives its drained channels: a file
/// transfer whose sender derived its channel in that epoch just before the
/// switch opens it with the secret when its first chunk arrives.
pub const DRAINED_HOLD: Duration = Duration::from_secs(10);
/// How long opening a session waits for the buddy's own INIT, answered a
/// moment ago, to be confirmed, rather than opening a second session that
/// would replace it (and lose what the buddy sends on it meanwhile).
pub const CONFIRM_WAIT: Duration = Duration::from_secs(2);

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
    /// The buddy.
    pub peer: String,
    /// Where the buddy's client listens.
    pub address: SocketAddr,
    /// Us.
    me: String,
    /// Our message channel to the buddy: the connection and its sealer.
    /// Locked before `epochs` when both are needed.
    out: Mutex<Outgoing>,
    /// The keys of every epoch still open.
    epochs: Mutex<Epochs>,
}

/// Our side of our message channel.
struct Outgoing {
    send: Sealer,
    /// The epoch `send` seals in.
    epoch: String,
    /// The connection carrying our requests, while open.
    stream: Option<TcpStream>,
}

/// One epoch's keys, as far as they are still needed.
struct Epoch {
    keys: EpochKeys,
    /// Our sealer for this epoch until our channel switches to it.
    send: Option<Sealer>,
    /// Opens the buddy's acknowledgements of what we sent in this epoch.
    acks: Option<Opener>,
    /// Opens the buddy's requests in this epoch and seals our replies.
    incoming: Option<(Opener, Sealer)>,
    /// When a retired epoch is erased whatever remains of it.
    erase_at: Option<Instant>,
    /// Requests we sealed in this epoch, once our channel left it: when
    /// that many acknowledgements opened, `acks` goes.
    sent: Option<u64>,
    /// Requests the buddy sealed in this epoch, once they said (in their
    /// answer to our REKEYED): when that many were answered, `incoming` goes.
    their_sent: Option<u64>,
}

impl Epoch {
    /// A new epoch whose sealer for our channel it keeps until we switch.
    fn new(keys: EpochKeys, me: &str, peer: &str) -> Epoch {
        let (mut epoch, send) = Epoch::with_sender(keys, me, peer);
        epoch.send = Some(send);
        epoch
    }

    /// A new epoch and, apart, the sealer for our channel in it.
    fn with_sender(keys: EpochKeys, me: &str, peer: &str) -> (Epoch, Sealer) {
        let out = keys.channel(&msg_label(me, peer), Role::Initiator);
        let inc = keys.channel(&msg_label(peer, me), Role::Responder);
        let epoch = Epoch {
            keys,
            send: None,
            acks: Some(out.recv),
            incoming: Some((inc.recv, inc.send)),
            erase_at: None,
            sent: None,
            their_sent: None,
        };
        (epoch, out.send)
    }

    /// Drops the halves that nothing more can arrive for.
    fn drain(&mut self) {
        let done = |opener: &Opener, n: Option<u64>| {
            n.is_some_and(|n| n == 0 || opener.highest_seq().is_some_and(|h| h + 1 >= n))
        };
        if self.acks.as_ref().is_some_and(|o| done(o, self.sent)) {
            self.acks = None;
        }
        // Their requests: gone once all of them were answered (each gets
        // exactly one reply, sealed here).
        let answered = |replies: &Sealer, n: Option<u64>| {
            n.is_some_and(|n| replies.next_seq().is_none_or(|next| next >= n))
        };
        if self
            .incoming
            .as_ref()
            .is_some_and(|(_, r)| answered(r, self.their_sent))
        {
            self.incoming = None;
        }
    }

    fn id(&self) -> &str {
        self.keys.id()
    }
}

/// Where a re-key stands.
enum Rekey {
    /// None under way.
    Idle,
    /// We sent REKEY `id` and wait for its answer.
    Started {
        id: u64,
        at: Instant,
        rekeying: Rekeying,
    },
    /// We answered the buddy's REKEY; the new epoch is current but our
    /// channel switches only on their REKEYED (their key confirmation).
    Answered {
        at: Instant,
        confirm: RekeyConfirmation,
    },
}

/// The epochs of a session.
struct Epochs {
    current: Epoch,
    /// Older epochs whose in-flight messages may still arrive; newest first.
    retired: Vec<Epoch>,
    rekey: Rekey,
    /// Messages sent and received in the current epoch.
    messages: u64,
    /// The id of our last REKEYED, whose answer says how much the buddy
    /// still has in flight in the old epoch.
    rekeyed: Option<u64>,
    /// When the current epoch began.
    since: Instant,
}

impl Epochs {
    fn find(&mut self, id: &str) -> Option<&mut Epoch> {
        if self.current.id() == id {
            return Some(&mut self.current);
        }
        self.retired.iter_mut().find(|e| e.id() == id)
    }

    /// Makes `keys` the current epoch; the old one is retired.
    fn advance(&mut self, keys: EpochKeys, me: &str, peer: &str) {
        let mut old = std::mem::replace(&mut self.current, Epoch::new(keys, me, peer));
        // Our channel never goes back to an old epoch.
        old.send = None;
        old.erase_at = Some(Instant::now() + EPOCH_GRACE);
        self.retired.insert(0, old);
        self.retired.truncate(MAX_RETIRED);
        self.messages = 0;
        self.since = Instant::now();
    }

    /// Erases what is no longer needed: retired epochs past their time or
    /// with nothing left; re-keys that got no answer or confirmation in
    /// time (an unconfirmed new epoch is dropped and the old one stays).
    fn tidy(&mut self) {
        let now = Instant::now();
        let stale = match &self.rekey {
            Rekey::Started { at, .. } | Rekey::Answered { at, .. } => *at + EPOCH_GRACE <= now,
            Rekey::Idle => false,
        };
        if stale {
            if let Rekey::Answered { .. } = std::mem::replace(&mut self.rekey, Rekey::Idle) {
                if !self.retired.is_empty() {
                    let mut old = self.retired.remove(0);
                    old.erase_at = None;
                    self.current = old;
                }
                warn!("a re-key was never confirmed; keeping the old keys");
            }
        }
        // While a re-key we answered is unconfirmed, our channel still
        // seals in the newest retired epoch: it stays whole.
        let keep_newest = matches!(self.rekey, Rekey::Answered { .. });
        for e in self.retired.iter_mut().skip(usize::from(keep_newest)) {
            e.drain();
        }
        for e in self.retired.iter_mut() {
            if e.acks.is_none() && e.incoming.is_none() {
                let hold = now + DRAINED_HOLD;
                e.erase_at = Some(e.erase_at.map_or(hold, |t| t.min(hold)));
            }
        }
        let mut index = 0;
        self.retired.retain(|e| {
            let kept = keep_newest && index == 0;
            index += 1;
            kept || e.erase_at.is_none_or(|t| t > now)
        });
    }

    /// Whether we should start a re-key now.
    fn due(&self, messages: u64, interval: Duration) -> bool {
        matches!(self.rekey, Rekey::Idle)
            && ((messages > 0 && self.messages >= messages) || self.since.elapsed() >= interval)
    }
}

impl PeerSession {
    fn new(me: &str, peer: &str, address: SocketAddr, keys: EpochKeys) -> PeerSession {
        let (first, send) = Epoch::with_sender(keys, me, peer);
        PeerSession {
            peer: peer.to_owned(),
            address,
            me: me.to_owned(),
            out: Mutex::new(Outgoing {
                send,
                epoch: first.id().to_owned(),
                stream: None,
            }),
            epochs: Mutex::new(Epochs {
                current: first,
                retired: Vec::new(),
                rekey: Rekey::Idle,
                messages: 0,
                rekeyed: None,
                since: Instant::now(),
            }),
        }
    }

    /// The current epoch's id.
    pub fn id(&self) -> String {
        self.epochs.lock().current.id().to_owned()
    }

    /// Whether `id` names an epoch of this session still open.
    pub fn has_epoch(&self, id: &str) -> bool {
        let mut e = self.epochs.lock();
        e.tidy();
        e.find(id).is_some()
    }

    /// The keys of a new file transfer's channel and its epoch's id: the
    /// epoch our message channel seals in. While a re-key we answered is
    /// unconfirmed that is the newest retired one, not the current: the
    /// buddy may not hold the new epoch yet, and would refuse the
    /// transfer's first chunk as of an unknown session.
    pub fn file_channel(&self, id: u64, from: &str, to: &str, role: Role) -> (SessionKeys, String) {
        let e = self.epochs.lock();
        let epoch = match (&e.rekey, e.retired.first()) {
            (Rekey::Answered { .. }, Some(old)) => old,
            _ => &e.current,
        };
        (
            epoch.keys.channel(&file_label(id, from, to), role),
            epoch.id().to_owned(),
        )
    }

    /// The keys of a transfer's channel in epoch `epoch`, if still open.
    pub fn file_channel_in(
        &self,
        epoch: &str,
        id: u64,
        from: &str,
        to: &str,
        role: Role,
    ) -> Option<SessionKeys> {
        let mut e = self.epochs.lock();
        e.tidy();
        e.find(epoch)
            .map(|ep| ep.keys.channel(&file_label(id, from, to), role))
    }

    /// The clear headers of a sealed peer message of epoch `epoch` on `chan`.
    pub fn clear<'a>(
        &'a self,
        me: &'a str,
        epoch: &'a str,
        chan: &'a str,
    ) -> [(&'a str, &'a str); 4] {
        [
            ("From", me),
            ("To", &self.peer),
            ("Session", epoch),
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

    /// Every open epoch's id and secret, current first (tests only: the
    /// `test-hooks` feature is never enabled in a shipped build).
    #[cfg(feature = "test-hooks")]
    pub fn secrets_for_test(&self) -> Vec<(String, [u8; 32])> {
        let e = self.epochs.lock();
        std::iter::once(&e.current)
            .chain(e.retired.iter())
            .map(|ep| (ep.id().to_owned(), ep.keys.secret_for_test()))
            .collect()
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

/// An INIT answered on this connection whose sender has not yet proven
/// (CONFIRM) that it holds the keys: until then it replaces nothing.
pub struct Accepting {
    tentative: Tentative,
    me: String,
    peer: String,
    address: SocketAddr,
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
    /// Signalled when a session is installed (a simultaneous open waits
    /// for the other side's).
    installed: parking_lot::Condvar,
    /// Buddies whose INIT we answered and whose CONFIRM has not come yet,
    /// with when we answered.
    accepting: Mutex<HashMap<String, Instant>>,
    /// When our last INIT to each buddy succeeded: an INIT of theirs
    /// that crossed it is refused as a simultaneous open.
    opened: Mutex<HashMap<String, Instant>>,
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
        self.accepting.lock().clear();
        self.opened.lock().clear();
    }

    /// Erases what every session no longer needs (retired epochs past
    /// their time, re-keys that went unanswered); called periodically so
    /// that this happens on idle sessions too.
    pub fn tidy(&self) {
        let all: Vec<_> = self.sessions.lock().values().cloned().collect();
        for s in all {
            s.epochs.lock().tidy();
        }
    }

    fn install(&self, s: Arc<PeerSession>) {
        let old = self.sessions.lock().insert(s.peer.clone(), s);
        self.installed.notify_all();
        if let Some(old) = old {
            old.close();
        }
    }

    /// Waits until `until` for a session with `peer` to be installed.
    fn wait_installed(&self, peer: &str, until: Instant) -> Option<Arc<PeerSession>> {
        let mut sessions = self.sessions.lock();
        loop {
            if let Some(s) = sessions.get(peer) {
                return Some(s.clone());
            }
            if self.installed.wait_until(&mut sessions, until).timed_out() {
                return sessions.get(peer).cloned();
            }
        }
    }
}

pub(super) fn now_unix() -> u64 {
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
    ) -> Result<(String, crypto::RsaPrivateKey, SocketAddr, Vec<u8>), ClientError> {
        let guard = self.settled_session();
        let s = guard.session().ok_or(ClientError::NotLoggedIn)?;
        match s.buddies.get(to) {
            None => Err(ClientError::NotABuddy(to.to_owned())),
            Some(None) => Err(ClientError::BuddyOffline(to.to_owned())),
            Some(Some(p)) => {
                self.key_is_trusted(&s.user, to, &p.public_key)?;
                Ok((
                    s.user.clone(),
                    s.private_key.clone(),
                    p.address,
                    p.public_key.clone(),
                ))
            }
        }
    }

    /// Whether `key`, handed out by the servers for `buddy`, is the one
    /// remembered (or seen for the first time); a changed key is reported
    /// once and refused until the user accepts it with `/verify`.
    pub(super) fn key_is_trusted(
        &self,
        me: &str,
        buddy: &str,
        key: &[u8],
    ) -> Result<(), ClientError> {
        let mut keys = self.keys.lock();
        let Some((_, book)) = keys.as_mut().filter(|(u, _)| u == me) else {
            return Err(ClientError::KeysNotOpen);
        };
        match book.check(buddy, key) {
            Ok(Check::Trusted) => Ok(()),
            Ok(Check::Changed { first }) => {
                if first {
                    warn!("the servers hand out a new key for {buddy}");
                    self.emit(Event::KeyChanged {
                        user: buddy.to_owned(),
                    });
                }
                Err(ClientError::KeyChanged(buddy.to_owned()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `grace` for `who` to be an online buddy; then as
    /// [`Client::peer_target`].
    fn wait_for_buddy(
        &self,
        who: &str,
        grace: Duration,
    ) -> Result<(String, crypto::RsaPrivateKey, SocketAddr, Vec<u8>), ClientError> {
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

    /// The session with `to`, opening one (INIT, INIT-ACK, CONFIRM) if
    /// there is none.
    pub(super) fn session_with(
        self: &Arc<Self>,
        to: &str,
    ) -> Result<Arc<PeerSession>, ClientError> {
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
        // Invisible, we show offline to `to`, whose client would refuse us.
        self.reveal_if_invisible(to);
        // The buddy is opening one with us right now: use theirs. Checked
        // under the `opening` lock, which on_init holds while it decides
        // between answering and refusing, so that one of the two sides
        // always sees the other.
        let answered = {
            let _decisions = self.peers.opening.lock();
            self.peers.accepting.lock().get(to).copied()
        };
        if let Some(at) = answered.filter(|at| at.elapsed() < CONFIRM_WAIT) {
            if let Some(s) = self.peers.wait_installed(to, at + CONFIRM_WAIT) {
                return Ok(s);
            }
        }
        // A second attempt only after a simultaneous open whose winning
        // session never came (the buddy had one it had just opened).
        for attempt in 0..2 {
            let (me, private, address, public) = self.peer_target(to)?;
            let their_key = RsaPublicKey::from_der(&public)
                .map_err(|_| ClientError::UnusableKey(to.to_owned()))?;
            let (starting, init) = Initiating::start(&me, to, now_unix(), &private)?;
            let no_answer = |e| ClientError::NoAnswer {
                peer: to.to_owned(),
                error: Some(e),
            };
            let timeout = self.config.timeout;
            let (stream, _) = self.peer_connect(to, address)?;
            let mut reader = MessageReader::new(stream);
            write_message(
                reader.get_mut(),
                &init.to_message(),
                Instant::now() + timeout,
            )
            .map_err(no_answer)?;
            let reply = reader
                .read_message(&Limits::DEFAULT, Instant::now() + timeout)
                .map_err(no_answer)?
                .ok_or_else(|| ClientError::PeerClosed(to.to_owned()))?;
            if reply.code() == Some(code::CONFLICT) {
                // Both opened at once and theirs wins (PROTOCOL.md §7): use
                // the session their INIT is opening with us.
                if let Some(s) = self.peers.wait_installed(to, Instant::now() + CONFIRM_WAIT) {
                    return Ok(s);
                }
                if attempt == 0 {
                    continue;
                }
                return Err(ClientError::OpenRaced(to.to_owned()));
            }
            if reply.code() == Some(code::FORBIDDEN) {
                // Not an online buddy of theirs, or blocked: they do not say which.
                return Err(ClientError::NotDelivered);
            }
            if let Some(refused) = Refused::from_message(&reply) {
                return Err(ClientError::PeerRefused {
                    peer: to.to_owned(),
                    step: PeerStep::Session,
                    refused,
                });
            }
            let ack = InitAck::from_message(&reply).map_err(|error| ClientError::BadAnswer {
                peer: to.to_owned(),
                error,
            })?;
            let (keys, confirm) = match starting.finish(&ack, &their_key) {
                Ok(done) => done,
                Err(error) => {
                    warn!("INIT-ACK from {to} refused: {error}");
                    return Err(ClientError::PeerUnproven {
                        peer: to.to_owned(),
                        error,
                    });
                }
            };
            let session = Arc::new(PeerSession::new(&me, to, address, keys));
            // The INIT connection becomes our message channel's connection.
            let (stream, _) = reader.into_parts();
            let mut out = session.out.lock();
            self.attach_to(&session, &mut out, stream)?;
            // Installed before our CONFIRM goes: once the buddy has it, it may
            // write to us in the session at once. Our key confirmation is the
            // first thing on our channel (the callee answers only a bad one,
            // and closes); our first message follows it.
            self.peers.install(session.clone());
            self.peers
                .opened
                .lock()
                .insert(to.to_owned(), Instant::now());
            let written = match out.stream.as_mut() {
                Some(s) => write_message(s, &confirm.to_message(), Instant::now() + timeout)
                    .map_err(no_answer),
                None => Err(ClientError::NoAnswer {
                    peer: to.to_owned(),
                    error: None,
                }),
            };
            drop(out);
            if let Err(e) = written {
                self.peers.drop_session(to);
                return Err(e);
            }
            debug!("session {} with {to} open", session.id());
            return Ok(session);
        }
        // Both attempts end above; this is for the compiler.
        Err(ClientError::OpenRaced(to.to_owned()))
    }

    /// Makes `stream` the session's outgoing connection (the caller holds
    /// its lock) and starts the thread that reads the acknowledgements
    /// arriving on it.
    fn attach_to(
        self: &Arc<Self>,
        session: &Arc<PeerSession>,
        out: &mut Outgoing,
        stream: TcpStream,
    ) -> Result<(), ClientError> {
        let reader = stream.try_clone().map_err(ClientError::Local)?;
        out.stream = Some(stream);
        let client = Arc::downgrade(self);
        let session = session.clone();
        std::thread::Builder::new()
            .name(format!("acks-{}", session.peer))
            .spawn(move || read_acks(client, session, reader))
            .map(|_| ())
            .map_err(ClientError::Local)
    }

    /// Seals and writes one request on our channel to `to`; its
    /// acknowledgement will settle `pending`. Starts a re-key after it
    /// when one is due.
    pub(super) fn send_request(
        self: &Arc<Self>,
        to: &str,
        req: &PeerRequest,
        id: u64,
        kind: PendingKind,
    ) -> Result<(), ClientError> {
        let me = self.user().ok_or(ClientError::NotLoggedIn)?;
        for attempt in 0..2 {
            let session = self.session_with(to)?;
            let timeout = self.config.timeout;
            let mut out = session.out.lock();
            if out.stream.is_none() {
                // Connected under the lock: two senders must not each open
                // a connection, whose messages the buddy would then read
                // in parallel and so out of order.
                let (stream, _) = self.peer_connect(to, session.address)?;
                self.attach_to(&session, &mut out, stream)?;
            }
            let epoch = out.epoch.clone();
            let sealed =
                out.send
                    .seal(PEER, &session.clear(&me, &epoch, "msg"), &req.to_message())?;
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
                Ok(()) => {
                    let due = {
                        let mut e = session.epochs.lock();
                        e.messages += 1;
                        e.due(self.config.rekey_messages, self.config.rekey_interval)
                    };
                    if due {
                        self.start_rekey(&session, &mut out);
                    }
                    return Ok(());
                }
                Err(e) => {
                    // The buddy's listener closed an idle connection: reconnect once.
                    debug!("writing to {to}: {e}");
                    self.peers.pending.lock().remove(&(to.to_owned(), id));
                    out.stream = None;
                    if attempt == 1 {
                        return Err(ClientError::NoAnswer {
                            peer: to.to_owned(),
                            error: Some(e),
                        });
                    }
                }
            }
        }
        Err(ClientError::NoAnswer {
            peer: to.to_owned(),
            error: None,
        })
    }

    /// Sends REKEY on our channel (whose lock the caller holds). Messages
    /// keep flowing under the current keys meanwhile; a failure leaves
    /// them in place and is retried with a later message.
    fn start_rekey(&self, session: &PeerSession, out: &mut Outgoing) {
        let (rekeying, nonce, share) = match Rekeying::start() {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot start a re-key with {}: {e}", session.peer);
                return;
            }
        };
        let id = self.next_id();
        let epoch = out.epoch.clone();
        let sealed = match out.send.seal(
            PEER,
            &session.clear(&session.me, &epoch, "msg"),
            &PeerRequest::Rekey { id, nonce, share }.to_message(),
        ) {
            Ok(s) => s,
            Err(e) => {
                warn!("cannot seal a re-key for {}: {e}", session.peer);
                return;
            }
        };
        {
            // The buddy may have started one meanwhile (we answered it):
            // theirs stands, and this REKEY is never sent.
            let mut epochs = session.epochs.lock();
            if !matches!(epochs.rekey, Rekey::Idle) || epochs.current.id() != epoch {
                return;
            }
            epochs.rekey = Rekey::Started {
                id,
                at: Instant::now(),
                rekeying,
            };
        }
        if let Some(stream) = out.stream.as_mut() {
            if let Err(e) = write_message(stream, &sealed, Instant::now() + self.config.timeout) {
                debug!("writing a re-key to {}: {e}", session.peer);
                session.epochs.lock().rekey = Rekey::Idle;
                out.stream = None;
            }
        }
        debug!("re-key {id} with {} started", session.peer);
    }

    /// The answer to our REKEY `id` (opened by the acknowledgement
    /// reader): switches our channel to the new epoch and sends REKEYED,
    /// its first message.
    fn finish_rekey(&self, session: &Arc<PeerSession>, id: u64, inner: &Message) {
        let mut out = session.out.lock();
        let mut epochs = session.epochs.lock();
        let rekeying = match std::mem::replace(&mut epochs.rekey, Rekey::Idle) {
            Rekey::Started {
                id: started,
                rekeying,
                ..
            } if started == id => rekeying,
            other => {
                epochs.rekey = other;
                return;
            }
        };
        if !inner.is_success() {
            // The buddy is re-keying itself (and won the tie) or refused.
            debug!(
                "{} declined re-key {id}: {}",
                session.peer,
                inner.reason().unwrap_or("")
            );
            return;
        }
        let finished = RekeyAck::from_message(inner)
            .map_err(|e| e.to_string())
            .and_then(|ack| {
                rekeying
                    .finish(&epochs.current.keys, &session.me, &session.peer, &ack)
                    .map_err(|e| e.to_string())
            });
        let (keys, confirm) = match finished {
            Ok(f) => f,
            Err(e) => {
                warn!(
                    "re-key with {} failed: {e}; keeping the old keys",
                    session.peer
                );
                return;
            }
        };
        epochs.advance(keys, &session.me, &session.peer);
        let Some(send) = epochs.current.send.take() else {
            return;
        };
        let old = std::mem::replace(&mut out.send, send);
        if let Some(retired) = epochs.retired.first_mut() {
            retired.sent = Some(old.next_seq().unwrap_or(u64::MAX));
        }
        drop(old);
        out.epoch = epochs.current.id().to_owned();
        let rekeyed = PeerRequest::Rekeyed {
            id: self.next_id(),
            confirm,
        };
        if let PeerRequest::Rekeyed { id, .. } = &rekeyed {
            epochs.rekeyed = Some(*id);
        }
        drop(epochs);
        info!(
            "session with {} re-keyed (epoch {})",
            session.peer, out.epoch
        );
        drop(out);
        // Written by another thread: this one reads the acknowledgements,
        // and a writer that stopped reading could block on a buddy that is
        // itself blocked writing acknowledgements to us. Sealed and written
        // under one lock, so that sequence numbers go out in order.
        let session = session.clone();
        let timeout = self.config.timeout;
        let spawned = std::thread::Builder::new()
            .name(format!("rekeyed-{}", session.peer))
            .spawn(move || {
                let mut out = session.out.lock();
                let epoch = out.epoch.clone();
                let sealed = out.send.seal(
                    PEER,
                    &session.clear(&session.me, &epoch, "msg"),
                    &rekeyed.to_message(),
                );
                match (sealed, out.stream.as_mut()) {
                    (Ok(sealed), Some(stream)) => {
                        if let Err(e) = write_message(stream, &sealed, Instant::now() + timeout) {
                            debug!("writing REKEYED to {}: {e}", session.peer);
                            out.stream = None;
                        }
                    }
                    (Err(e), _) => warn!("cannot seal REKEYED for {}: {e}", session.peer),
                    (Ok(_), None) => {}
                }
            });
        if let Err(e) = spawned {
            warn!("cannot send REKEYED: {e}");
        }
    }

    /// Every open epoch's id and secret of the session with `peer` (tests
    /// only: needs the `test-hooks` feature, never enabled in a shipped
    /// build, and nothing but a test calls it).
    #[cfg(feature = "test-hooks")]
    pub fn session_secrets_for_test(&self, peer: &str) -> Vec<(String, [u8; 32])> {
        self.peers
            .get(peer)
            .map(|s| s.secrets_for_test())
            .unwrap_or_default()
    }

    /// Our long-term private key (tests only, as above).
    #[cfg(feature = "test-hooks")]
    pub fn private_key_for_test(&self) -> Option<crypto::RsaPrivateKey> {
        self.state.lock().session().map(|s| s.private_key.clone())
    }

    /// Sends a text message: its id, and `delivered` or `send-failed`
    /// follows; or the id it was given and why it could not be sent (then
    /// no event follows).
    pub fn send_message(self: &Arc<Self>, to: &str, text: &str) -> Result<u64, (u64, ClientError)> {
        // The id comes first so that a failure names the message it is about.
        let id = self.next_id();
        if text.len() > MAX_TEXT_BYTES {
            return Err((id, ClientError::MessageTooLong(text.len())));
        }
        let to = to.to_ascii_lowercase();
        self.record_sent(&to, id, text);
        // A buddy who is offline, or whose client cannot be reached, gets
        // it sealed through the servers (PROTOCOL.md §7, "Offline messages").
        let offline = self.buddy_is_offline(&to);
        let sent = if offline {
            Err(ClientError::BuddyOffline(to.clone()))
        } else {
            self.send_request(
                &to,
                &PeerRequest::Msg {
                    id,
                    text: text.to_owned(),
                },
                id,
                PendingKind::Msg,
            )
        };
        let sent = match sent {
            // Not even the relay reaches them: through the servers too.
            Err(e)
                if offline
                    || matches!(e, ClientError::Unreachable { .. })
                    || self.buddy_unreachable(&to) =>
            {
                self.send_offline(&to, id, text).map(|_| ())
            }
            other => other,
        };
        sent.map_err(|e| {
            // No event follows this failure: the history is told here.
            self.record(&Event::SendFailed {
                to: to.clone(),
                id,
                reason: String::new(),
            });
            (id, e)
        })?;
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
            let late = ClientError::TimedOut(to.clone());
            self.settle(&to, id, p.kind, Err(late));
        }
    }

    /// Reports the outcome of a request.
    fn settle(&self, to: &str, id: u64, kind: PendingKind, outcome: Result<(), ClientError>) {
        match (kind, outcome) {
            (PendingKind::Msg, Ok(())) => self.emit(Event::Delivered {
                to: to.to_owned(),
                id,
                via: self.relays.route(to),
                offline: false,
            }),
            (PendingKind::Msg, Err(e)) => self.emit(Event::SendFailed {
                to: to.to_owned(),
                id,
                reason: e.to_string(),
            }),
            (PendingKind::Control(_), Ok(())) => {}
            (PendingKind::Control(what), Err(e)) => self.emit(Event::Error {
                command: what,
                reason: e.to_string(),
            }),
        }
    }

    /// An INIT from a buddy: checked and answered. The session it offers
    /// is returned to be kept with the connection until the caller's
    /// CONFIRM proves it holds the keys; a live session stays until then.
    pub(super) fn on_init(&self, m: &Message) -> (Message, Option<Accepting>) {
        let init = match Init::from_message(m) {
            Ok(i) => i,
            Err(e) => return (e.reply(), None),
        };
        // A new buddy may write before the push that makes them one (or
        // says they are online) has reached us: give it a moment.
        if self.is_blocked(&init.from) {
            // Told nothing more than anyone who is not an online buddy.
            return (Message::reply(code::FORBIDDEN, "not delivered"), None);
        }
        let target = self
            .peer_target(&init.from)
            .or_else(|_| self.wait_for_buddy(&init.from, BUDDY_GRACE));
        let (me, private, address, public) = match target {
            Ok(t) => t,
            Err(reason) => {
                warn!("INIT from {} refused: {reason}", init.from);
                return (Message::reply(code::FORBIDDEN, "not an online buddy"), None);
            }
        };
        if init.to != me {
            return (Message::reply(code::NOT_FOUND, "not this user"), None);
        }
        let now = now_unix();
        if init.time.abs_diff(now) > MAX_CLOCK_SKEW_SECS {
            warn!(
                "INIT from {} refused: clock off by {} s",
                init.from,
                init.time.abs_diff(now)
            );
            return (Message::reply(code::AUTH_FAILED, "stale INIT"), None);
        }
        let Ok(their_key) = RsaPublicKey::from_der(&public) else {
            return (Message::reply(code::AUTH_FAILED, "bad signature"), None);
        };
        if their_key
            .verify_pss(&init.transcript(), &init.signature)
            .is_err()
        {
            warn!(
                "INIT claiming to be from {} has a bad signature; refused",
                init.from
            );
            return (Message::reply(code::AUTH_FAILED, "bad signature"), None);
        }
        {
            let mut seen = self.peers.seen.lock();
            seen.retain(|_, t| now.saturating_sub(*t) <= 2 * MAX_CLOCK_SKEW_SECS);
            if seen
                .insert((init.from.clone(), init.nonce.clone()), now)
                .is_some()
            {
                warn!("replayed INIT from {} refused", init.from);
                return (Message::reply(code::AUTH_FAILED, "replayed INIT"), None);
            }
        }
        // Both opening at once: the session the smaller name opens wins,
        // so that both end up with the same one. Otherwise, mark the
        // answer as under way (in the same critical section: see
        // session_with) so that we do not open a second one meanwhile.
        {
            let opening = self.peers.opening.lock();
            let ours = opening.get(&init.from).is_some_and(|gate| gate.is_locked())
                || self
                    .peers
                    .opened
                    .lock()
                    .get(&init.from)
                    .is_some_and(|at| at.elapsed() < CONFIRM_WAIT);
            if me < init.from && ours {
                debug!("simultaneous open with {}: ours wins", init.from);
                return (Message::reply(code::CONFLICT, "simultaneous open"), None);
            }
            self.peers
                .accepting
                .lock()
                .insert(init.from.clone(), Instant::now());
        }
        match handshake::respond(&init, &private, &their_key) {
            Ok((ack, tentative)) => {
                debug!(
                    "INIT {} from {} answered; waiting for its confirmation",
                    tentative.id(),
                    init.from
                );
                (
                    ack.to_message(),
                    Some(Accepting {
                        tentative,
                        me,
                        peer: init.from,
                        address,
                    }),
                )
            }
            Err(HandshakeError::BadShare) => {
                self.peers.accepting.lock().remove(&init.from);
                warn!("INIT from {} has an unusable key share", init.from);
                (Message::reply(code::AUTH_FAILED, "bad key share"), None)
            }
            Err(e) => {
                self.peers.accepting.lock().remove(&init.from);
                warn!("INIT from {} refused: {e}", init.from);
                (Message::reply(code::AUTH_FAILED, &e.to_string()), None)
            }
        }
    }

    /// The caller's CONFIRM after our INIT-ACK on the same connection:
    /// only now does the new session replace any live one. `None` (no
    /// reply) when it succeeds; the error reply otherwise.
    pub(super) fn on_confirm(&self, accepting: Option<Accepting>, m: &Message) -> Option<Message> {
        let Some(a) = accepting else {
            return Some(Message::reply(code::BAD_REQUEST, "CONFIRM without INIT"));
        };
        self.peers.accepting.lock().remove(&a.peer);
        let confirmed = Confirm::from_message(m)
            .map_err(|e| e.to_string())
            .and_then(|c| a.tentative.confirm(&c).map_err(|e| e.to_string()));
        match confirmed {
            Ok(keys) => {
                let session = PeerSession::new(&a.me, &a.peer, a.address, keys);
                debug!("session {} with {} confirmed", session.id(), a.peer);
                self.peers.install(Arc::new(session));
                None
            }
            Err(e) => {
                warn!("CONFIRM from {} refused: {e}", a.peer);
                Some(Message::reply(code::AUTH_FAILED, "key confirmation failed"))
            }
        }
    }

    /// A sealed request on a buddy's message channel to us.
    pub(super) fn on_peer_msg(self: &Arc<Self>, m: &Message) -> Message {
        let (Some(from), Some(sid)) = (m.header("From"), m.header("Session")) else {
            return Message::reply(code::BAD_REQUEST, "missing From or Session");
        };
        let Some(session) = self.peers.get(from) else {
            return Message::reply(code::NOT_FOUND, "unknown session");
        };
        let Some(me) = self.user() else {
            return Message::reply(code::FORBIDDEN, "not logged in");
        };
        let opened = {
            let mut epochs = session.epochs.lock();
            epochs.tidy();
            let current = epochs.current.id() == sid;
            let Some((opener, _)) = epochs.find(sid).and_then(|e| e.incoming.as_mut()) else {
                debug!(
                    "message from {from} in epoch {sid}, which is not (or no longer) open: current {}, retired {:?}",
                    epochs.current.id(),
                    epochs.retired.iter().map(|e| (e.id(), e.incoming.is_some())).collect::<Vec<_>>()
                );
                return Message::reply(code::NOT_FOUND, "unknown session");
            };
            let opened = opener.open(m);
            if opened.is_ok() && current {
                // Their channel moved to this epoch, and it is one
                // ordered connection: nothing older can follow.
                for old in epochs.retired.iter_mut() {
                    old.incoming = None;
                }
                epochs.messages += 1;
            }
            epochs.tidy();
            opened
        };
        let inner = match opened {
            Ok(i) => i,
            Err(e) => {
                warn!("refused a message from {from}: {e}");
                return Message::reply(code::BAD_REQUEST, &format!("refused: {e}"));
            }
        };
        let reply = match PeerRequest::from_message(inner) {
            Ok(PeerRequest::Rekey { id, nonce, share }) => {
                self.on_rekey(&session, sid, id, &nonce, &share)
            }
            Ok(PeerRequest::Rekeyed { id, confirm }) => {
                self.on_rekeyed(&session, sid, id, &confirm)
            }
            Ok(req) => self.on_peer_request(&session.peer, req).to_message(),
            Err(e) => e.reply(),
        };
        // The reply is sealed in the request's epoch.
        let mut epochs = session.epochs.lock();
        let Some((_, sealer)) = epochs.find(sid).and_then(|e| e.incoming.as_mut()) else {
            return Message::reply(code::NOT_FOUND, "unknown session");
        };
        match sealer.seal(PEER, &session.clear(&me, sid, "msg"), &reply) {
            Ok(sealed) => sealed,
            Err(e) => Message::reply(code::INTERNAL, &e.to_string()),
        }
    }

    /// The buddy's REKEY, opened in epoch `sid`: answers it and makes the
    /// new epoch current for what they send; our own channel follows at
    /// their REKEYED.
    fn on_rekey(
        &self,
        session: &PeerSession,
        sid: &str,
        id: u64,
        nonce: &[u8],
        share: &[u8],
    ) -> Message {
        let mut epochs = session.epochs.lock();
        if epochs.current.id() != sid {
            return Message::reply(code::CONFLICT, "re-key of an old epoch").with_header("Id", id);
        }
        match &epochs.rekey {
            Rekey::Idle => {}
            // Both started at once: the one from the smaller name wins.
            Rekey::Started { .. } if session.me > session.peer => {
                debug!("both sides re-keyed at once; {}'s wins", session.peer);
                epochs.rekey = Rekey::Idle;
            }
            _ => return Message::reply(code::CONFLICT, "re-key in progress").with_header("Id", id),
        }
        // An earlier unconfirmed switch of ours would be lost: refuse.
        if epochs.current.send.is_some() {
            return Message::reply(code::CONFLICT, "re-key in progress").with_header("Id", id);
        }
        match handshake::rekey_respond(
            &epochs.current.keys,
            &session.me,
            &session.peer,
            id,
            nonce,
            share,
        ) {
            Ok((ack, answered)) => {
                epochs.rekey = Rekey::Answered {
                    at: Instant::now(),
                    confirm: answered.confirmation(),
                };
                epochs.advance(answered.into_keys(), &session.me, &session.peer);
                ack.to_message()
            }
            Err(e) => {
                warn!("REKEY from {} refused: {e}", session.peer);
                Message::reply(code::BAD_REQUEST, &e.to_string()).with_header("Id", id)
            }
        }
    }

    /// The buddy's REKEYED, the first message of the new epoch: checks
    /// their confirmation and switches our channel to it.
    fn on_rekeyed(&self, session: &PeerSession, sid: &str, id: u64, confirm: &[u8]) -> Message {
        let mut out = session.out.lock();
        let mut epochs = session.epochs.lock();
        if epochs.current.id() != sid {
            return Message::reply(code::CONFLICT, "not the current epoch").with_header("Id", id);
        }
        let confirmed = match &epochs.rekey {
            Rekey::Answered { confirm: c, .. } => c.check(confirm).is_ok(),
            _ => false,
        };
        if !confirmed {
            warn!("REKEYED from {} does not confirm the re-key", session.peer);
            return Message::reply(code::AUTH_FAILED, "key confirmation failed")
                .with_header("Id", id);
        }
        epochs.rekey = Rekey::Idle;
        let mut sent = 0;
        if let Some(send) = epochs.current.send.take() {
            let old = std::mem::replace(&mut out.send, send);
            sent = old.next_seq().unwrap_or(u64::MAX);
            out.epoch = epochs.current.id().to_owned();
            if let Some(retired) = epochs.retired.first_mut() {
                retired.sent = Some(sent);
                retired.drain();
            }
        }
        epochs.tidy();
        info!("session with {} re-keyed (epoch {sid})", session.peer);
        // How many requests we sealed in the old epoch: the buddy keeps
        // its keys until that many arrived, then erases them.
        Message::ok()
            .with_header("Id", id)
            .with_header("Sent", sent)
    }

    fn on_peer_request(self: &Arc<Self>, from: &str, req: PeerRequest) -> Ack {
        if self.is_blocked(from) {
            return Ack::refused(req.id(), Refusal::NotABuddy, "not delivered");
        }
        match req {
            PeerRequest::Msg { id, text } => {
                self.set_last_peer(from);
                self.emit(Event::Message {
                    from: from.to_owned(),
                    text,
                    id,
                    sent_at: None,
                    offline: false,
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
            PeerRequest::Typing { id, on } => self.on_typing(from, id, on),
            PeerRequest::FileAnswer { id, accept, offset } => {
                self.on_file_answer(from, id, accept, offset)
            }
            PeerRequest::FileCancel { id, from_sender } => {
                self.on_file_cancel(from, id, from_sender)
            }
            PeerRequest::FileChunk { id, .. } | PeerRequest::FileEnd { id } => Ack::refused(
                id,
                Refusal::BadRequest,
                "file data belongs on the transfer's channel",
            ),
            // Handled by on_peer_msg, which holds the session.
            PeerRequest::Rekey { id, .. } | PeerRequest::Rekeyed { id, .. } => Ack::refused(
                id,
                Refusal::BadRequest,
                "re-keying belongs on the message channel",
            ),
        }
    }
}

/// The thread reading acknowledgements from one outgoing connection.
fn read_acks(client: std::sync::Weak<Client>, session: Arc<PeerSession>, stream: TcpStream) {
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
            fail_all(&client, &session.peer, || ClientError::SessionEnded);
            return;
        }
        let opened = {
            let sid = reply.header("Session").unwrap_or("");
            let mut epochs = session.epochs.lock();
            epochs.tidy();
            let current = epochs.current.id() == sid;
            match epochs.find(sid).and_then(|e| e.acks.as_mut()) {
                None => Err("unknown epoch".to_owned()),
                Some(acks) => {
                    let opened = acks.open(&reply).map_err(|e| e.to_string());
                    if opened.is_ok() && current {
                        // Replies come in order: none of an older epoch follows.
                        for old in epochs.retired.iter_mut() {
                            old.acks = None;
                        }
                    }
                    opened
                }
            }
        };
        let inner = match opened {
            Ok(i) => i,
            Err(e) => {
                warn!("unreadable acknowledgement from {}: {e}", session.peer);
                continue;
            }
        };
        let Ok(Ack { id, answer }) = Ack::from_message(&inner) else {
            continue;
        };
        let is_rekey = {
            let mut epochs = session.epochs.lock();
            if epochs.rekeyed == Some(id) {
                // The answer to our REKEYED: what the buddy still has in
                // flight in the old epoch.
                epochs.rekeyed = None;
                let sent = inner.req_parse::<u64>("Sent").ok();
                if let Some(retired) = epochs.retired.first_mut() {
                    retired.their_sent = sent;
                }
            }
            epochs.tidy();
            matches!(&epochs.rekey, Rekey::Started { id: r, .. } if *r == id)
        };
        if is_rekey {
            client.finish_rekey(&session, id, &inner);
            continue;
        }
        let Some(p) = client
            .peers
            .pending
            .lock()
            .remove(&(session.peer.clone(), id))
        else {
            continue;
        };
        let outcome = answer.map_err(|refused| ClientError::PeerRefused {
            peer: session.peer.clone(),
            step: PeerStep::Request,
            refused,
        });
        client.settle(&session.peer, id, p.kind, outcome);
    }
    // The connection ended: requests still waiting on it will not be answered.
    if let Some(client) = client.upgrade() {
        let mut out = session.out.lock();
        let ours = out.stream.as_ref().and_then(|s| s.local_addr().ok())
            == reader.get_ref().local_addr().ok();
        if ours {
            out.stream = None;
            // A re-key whose answer was on this connection is abandoned.
            let mut epochs = session.epochs.lock();
            if matches!(epochs.rekey, Rekey::Started { .. }) {
                epochs.rekey = Rekey::Idle;
            }
        }
        drop(out);
        if ours {
            fail_all(&client, &session.peer, || ClientError::NoAnswer {
                peer: session.peer.clone(),
                error: None,
            });
        }
    }
}

fn fail_all(client: &Client, peer: &str, why: impl Fn() -> ClientError) {
    let lost: Vec<(u64, Pending)> = {
        let mut pending = client.peers.pending.lock();
        let keys: Vec<(String, u64)> = pending.keys().filter(|(p, _)| p == peer).cloned().collect();
        keys.into_iter()
            .filter_map(|k| pending.remove(&k).map(|p| (k.1, p)))
            .collect()
    };
    for (id, p) in lost {
        client.settle(peer, id, p.kind, Err(why()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epochs() -> Epochs {
        Epochs {
            current: Epoch::new(EpochKeys::fixed("e0", [0; 32]), "joe", "alice"),
            retired: Vec::new(),
            rekey: Rekey::Idle,
            messages: 0,
            rekeyed: None,
            since: Instant::now(),
        }
    }

    /// Seals `n` requests with alice's sealer `theirs` of epoch `e` and
    /// opens them with joe's keys of it, answering each.
    fn traffic(theirs: &mut Sealer, e: &mut Epoch, n: u64) {
        let (opener, replies) = e.incoming.as_mut().unwrap();
        for _ in 0..n {
            let m = theirs.seal(PEER, &[], &Message::request("MSG")).unwrap();
            opener.open(&m).unwrap();
            replies.seal(PEER, &[], &Message::ok()).unwrap();
        }
    }

    #[test]
    fn a_retired_epoch_goes_once_drained() {
        let mut e = epochs();
        e.current.send = None;
        let mut alice = e
            .current
            .keys
            .channel("msg:alice>joe", Role::Initiator)
            .send;
        traffic(&mut alice, &mut e.current, 3);
        e.advance(EpochKeys::fixed("e1", [1; 32]), "joe", "alice");
        assert_eq!(e.current.id(), "e1");
        assert_eq!(e.retired.len(), 1);
        assert!(e.find("e0").is_some() && e.find("e1").is_some());
        // Nothing known yet about what is in flight: kept.
        e.tidy();
        assert_eq!(e.retired.len(), 1);
        // They sent 5 in e0, we have answered 3: their half stays.
        e.retired[0].their_sent = Some(5);
        e.retired[0].sent = Some(0);
        e.tidy();
        assert_eq!(e.retired.len(), 1);
        assert!(e.retired[0].acks.is_none(), "nothing of ours to wait for");
        assert!(e.retired[0].incoming.is_some());
        traffic(&mut alice, &mut e.retired[0], 2);
        e.tidy();
        // All answered: the channels go at once, the secret (for a file
        // transfer that started in e0) within DRAINED_HOLD.
        assert!(e.retired[0].incoming.is_none() && e.retired[0].acks.is_none());
        let hold = e.retired[0].erase_at.unwrap();
        assert!(hold <= Instant::now() + DRAINED_HOLD);
        e.retired[0].erase_at = Some(Instant::now());
        e.tidy();
        assert!(e.retired.is_empty(), "erased");
        assert!(e.find("e0").is_none());
    }

    #[test]
    fn an_answered_rekey_keeps_the_old_epoch_and_rolls_back_unconfirmed() {
        let mut e = epochs();
        e.current.send = None;
        e.advance(EpochKeys::fixed("e1", [1; 32]), "joe", "alice");
        let (_, answered) = {
            let (start, nonce, share) = Rekeying::start().unwrap();
            drop(start);
            handshake::rekey_respond(
                &EpochKeys::fixed("x", [2; 32]),
                "joe",
                "alice",
                1,
                &nonce,
                &share,
            )
            .unwrap()
        };
        e.rekey = Rekey::Answered {
            at: Instant::now(),
            confirm: answered.confirmation(),
        };
        // Even empty and past its time, the epoch our channel still seals
        // in stays while the re-key is unconfirmed.
        e.retired[0].acks = None;
        e.retired[0].incoming = None;
        e.retired[0].erase_at = Some(Instant::now());
        e.tidy();
        assert_eq!(e.retired.len(), 1);
        // Unconfirmed past the grace period: back to the old epoch.
        e.rekey = Rekey::Answered {
            at: Instant::now() - EPOCH_GRACE,
            confirm: answered.confirmation(),
        };
        e.tidy();
        assert_eq!(e.current.id(), "e0");
        assert!(e.retired.is_empty());
        assert!(matches!(e.rekey, Rekey::Idle));
    }

    #[test]
    fn retired_epochs_are_bounded_and_expire() {
        let mut e = epochs();
        for i in 1..10u8 {
            e.advance(EpochKeys::fixed(&format!("e{i}"), [i; 32]), "joe", "alice");
        }
        assert_eq!(e.retired.len(), MAX_RETIRED);
        for r in e.retired.iter_mut() {
            r.erase_at = Some(Instant::now());
        }
        e.tidy();
        assert!(e.retired.is_empty());
        assert_eq!(e.current.id(), "e9");
    }

    #[test]
    fn a_failed_message_shows_the_buddys_reason_or_ours() {
        let dir = tempfile::tempdir().unwrap();
        let (c, events) = crate::client::testing::client(dir.path(), true);
        let refused = ClientError::PeerRefused {
            peer: "bob".into(),
            step: PeerStep::Request,
            refused: Refused::new(Refusal::NotABuddy, "not delivered"),
        };
        c.settle("bob", 7, PendingKind::Msg, Err(refused));
        c.settle(
            "bob",
            8,
            PendingKind::Msg,
            Err(ClientError::TimedOut("bob".into())),
        );
        c.settle(
            "bob",
            9,
            PendingKind::Control("send".into()),
            Err(ClientError::SessionEnded),
        );
        let got: Vec<Event> = events.try_iter().collect();
        assert_eq!(
            got,
            [
                Event::SendFailed {
                    to: "bob".into(),
                    id: 7,
                    reason: "not delivered".into()
                },
                Event::SendFailed {
                    to: "bob".into(),
                    id: 8,
                    reason: "no answer from bob".into()
                },
                Event::Error {
                    command: "send".into(),
                    reason: "the session ended; send again".into()
                },
            ]
        );
    }

    #[test]
    fn rekeys_are_due_by_count_or_age() {
        let mut e = epochs();
        assert!(!e.due(10, Duration::from_secs(60)));
        e.messages = 10;
        assert!(e.due(10, Duration::from_secs(60)));
        assert!(!e.due(0, Duration::from_secs(60)), "0: by time only");
        e.since = Instant::now() - Duration::from_secs(61);
        assert!(e.due(0, Duration::from_secs(60)));
        e.rekey = Rekey::Started {
            id: 1,
            at: Instant::now(),
            rekeying: Rekeying::start().unwrap().0,
        };
        assert!(!e.due(10, Duration::from_secs(60)), "one at a time");
    }
}
