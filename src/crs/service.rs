//! The CRS's request handlers: one [`Service`] for its single port, which
//! clients (in the clear), MSs and the operator (sealed) all use.
//!
//! A connection starts [`Conn::Fresh`]; only a proven MSkey turns it into
//! [`Conn::Enrolled`], the only state whose requests touch accounts.
//!
//! An MS's `EVENTS` long poll that finds no events is parked in the pool's
//! gate ([`Outcome::Park`]) on the MS's id: it holds no worker while it
//! waits. Queuing an event for that MS (here, or in PostgreSQL at another
//! instance, through `LISTEN/NOTIFY`) wakes it; a worker then answers it
//! with the events. So any number of MSs can keep a poll open on a CRS
//! with a handful of workers.

use std::sync::Arc;
use std::time::Instant;

use log::{debug, info, warn};

use super::live::LockError;
use super::store::{self, StoreError};
use super::Crs;
use crate::crypto::{self, RsaPublicKey};
use crate::link::{enrollment_keys, Channel, ENROLL_NONCE_LEN, MIN_ENROLL_NONCE_LEN};
use crate::prethread::{Outcome, Park, Parking, Peer, Service};
use crate::proto::crs::{
    self as pc, BuddyRequest, ClientReply, ClientRequest, Contact, CrsReply, CrsRequest, EventKind,
    Hit, Presence, Profile, Registration, Status, StatusInfo, UserView, Verifier, Welcome,
};
use crate::proto::{self, Answer, Fields, ProtoError, Refusal, Refused};
use crate::seal::Role;
use crate::wire::Message;

/// Who is at the other end of an enrolled link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer2 {
    /// A messaging server with this id.
    Ms(u64),
    /// The operator's command-line tool.
    Admin,
}

/// A link whose MSkey proof checked out: the only way to get one.
pub struct Enrolled {
    who: Peer2,
    link: Channel,
    /// The `EVENTS` poll owed an answer, while it is parked.
    poll: Option<Poll>,
}

/// An `EVENTS` poll waiting for events.
#[derive(Clone, Copy, Debug)]
struct Poll {
    ms: u64,
    ack: u64,
    /// When it is answered, with events or without.
    deadline: Instant,
}

/// The state of one connection to the CRS.
pub enum Conn {
    /// Nothing proven yet: client requests and the start of enrollment.
    Fresh,
    /// `ENROLL-HELLO` answered; waiting for the proof.
    Challenged {
        /// The MS's nonce.
        ms_nonce: Vec<u8>,
        /// Ours.
        crs_nonce: [u8; 32],
    },
    /// MSkey proven; everything is sealed.
    Enrolled(Box<Enrolled>),
    /// The link failed; the connection is closing.
    Dead,
}

/// The CRS as a [`Service`].
pub struct CrsService(pub Arc<Crs>);

impl Service for CrsService {
    type Session = Conn;

    fn open(&self, _peer: &Peer) -> Conn {
        Conn::Fresh
    }

    fn handle(&self, conn: &mut Conn, request: Message) -> Outcome {
        let crs = &self.0;
        match std::mem::replace(conn, Conn::Dead) {
            Conn::Fresh => match request.method() {
                Some("ENROLL-HELLO") => match request.req_b64("Ms-Nonce") {
                    Ok(ms_nonce) if ms_nonce.len() >= MIN_ENROLL_NONCE_LEN => {
                        let crs_nonce = crypto::random_array::<ENROLL_NONCE_LEN>();
                        *conn = Conn::Challenged {
                            ms_nonce,
                            crs_nonce,
                        };
                        Outcome::Reply(
                            Message::ok().with_header("Crs-Nonce", crypto::b64_encode(&crs_nonce)),
                        )
                    }
                    _ => Outcome::ReplyAndClose(ProtoError::Invalid("Ms-Nonce").reply()),
                },
                _ => {
                    *conn = Conn::Fresh;
                    Outcome::Reply(crs.client_request(&request))
                }
            },
            Conn::Challenged {
                ms_nonce,
                crs_nonce,
            } => match crs.enroll(&request, &ms_nonce, &crs_nonce) {
                Ok((enrolled, reply)) => {
                    *conn = Conn::Enrolled(Box::new(enrolled));
                    Outcome::Reply(reply)
                }
                Err(reply) => Outcome::ReplyAndClose(reply),
            },
            Conn::Enrolled(mut link) => {
                let inner = match link.link.open(&request) {
                    Ok(inner) => inner,
                    Err(e) => {
                        warn!("sealed link from {:?}: {e}; closing", link.who);
                        return Outcome::Close;
                    }
                };
                if let (Peer2::Ms(ms), Some("EVENTS")) = (link.who, inner.method()) {
                    if let Ok(CrsRequest::Events { ack }) = CrsRequest::from_message(&inner) {
                        let poll = Poll {
                            ms,
                            ack,
                            deadline: Instant::now() + crs.config.poll_timeout,
                        };
                        return answer_poll(crs, conn, link, poll, crs.heard_from(ms));
                    }
                }
                let reply = crs.sealed_request(link.who, &inner);
                seal_reply(conn, link, &reply)
            }
            Conn::Dead => Outcome::Close,
        }
    }

    fn resume(&self, conn: &mut Conn, _woken: bool) -> Outcome {
        let crs = &self.0;
        match std::mem::replace(conn, Conn::Dead) {
            Conn::Enrolled(mut link) => match link.poll.take() {
                // Woken or not, the queue is the truth: look again.
                Some(poll) => answer_poll(crs, conn, link, poll, Ok(())),
                None => Outcome::Close,
            },
            _ => Outcome::Close,
        }
    }

    fn parking(&self) -> Option<Parking> {
        Some(self.0.events_ready.parking().clone())
    }
}

/// Seals `reply` on an enrolled link and keeps the link.
fn seal_reply(conn: &mut Conn, mut link: Box<Enrolled>, reply: &Message) -> Outcome {
    match link.link.seal(reply) {
        Ok(sealed) => {
            *conn = Conn::Enrolled(link);
            Outcome::Reply(sealed)
        }
        Err(e) => {
            warn!("cannot seal a reply: {e}");
            Outcome::Close
        }
    }
}

/// Answers an `EVENTS` poll if it can be now (`started` refused it, there
/// are events, or its time is up), else parks it until a wake-up.
fn answer_poll(
    crs: &Crs,
    conn: &mut Conn,
    mut link: Box<Enrolled>,
    poll: Poll,
    started: Answer<()>,
) -> Outcome {
    let answer = match started {
        Err(refused) => Err(refused),
        Ok(()) => match crs.poll_once(poll.ms, poll.ack, poll.deadline) {
            Ok(answer) => answer,
            Err(park) => {
                link.poll = Some(poll);
                *conn = Conn::Enrolled(link);
                return Outcome::Park(park);
            }
        },
    };
    seal_reply(conn, link, &to_message(answer, CrsReply::to_message))
}

pub(super) fn refuse<T>(refusal: Refusal, reason: &str) -> Answer<T> {
    Err(Refused::new(refusal, reason))
}

fn store_err(e: StoreError) -> Refused {
    match e {
        StoreError::NoSuchUser => Refused::new(Refusal::NoSuchUser, "no such user"),
        StoreError::NameTaken => Refused::new(Refusal::NameTaken, "name taken"),
        StoreError::AlreadyBuddies => Refused::new(Refusal::AlreadyBuddies, "already buddies"),
        StoreError::SameUser => Refused::new(Refusal::SameUser, "that is yourself"),
        StoreError::InvalidName => Refused::new(Refusal::BadRequest, "invalid name"),
        StoreError::Corrupt(_) | StoreError::Backend(_) => {
            warn!("store: {e}");
            Refused::new(Refusal::Internal, "storage error")
        }
    }
}

/// A store error where a missing or invalid name means "no such user".
pub(super) fn user_err(e: StoreError) -> Refused {
    match e {
        StoreError::NoSuchUser | StoreError::InvalidName => {
            Refused::new(Refusal::NoSuchUser, "no such user")
        }
        e => store_err(e),
    }
}

fn done(r: Result<(), StoreError>) -> Answer<CrsReply> {
    r.map(|()| CrsReply::Done).map_err(store_err)
}

fn to_message<T>(a: Answer<T>, ok: impl FnOnce(&T) -> Message) -> Message {
    match a {
        Ok(r) => ok(&r),
        Err(r) => r.to_message(),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl From<store::Verifier> for Verifier {
    fn from(v: store::Verifier) -> Verifier {
        Verifier {
            salt: v.salt,
            iterations: v.iterations,
            stored_key: v.stored_key,
            server_key: v.server_key,
        }
    }
}

impl From<Verifier> for store::Verifier {
    fn from(v: Verifier) -> store::Verifier {
        store::Verifier {
            salt: v.salt,
            iterations: v.iterations,
            stored_key: v.stored_key,
            server_key: v.server_key,
        }
    }
}

impl Crs {
    /// A request from a client, in the clear, as wire messages.
    pub fn client_request(&self, m: &Message) -> Message {
        match ClientRequest::from_message(m) {
            Ok(Some(req)) => to_message(self.client_call(req), ClientReply::to_message),
            Ok(None) => ProtoError::UnknownMethod(m.method().unwrap_or("").to_owned()).reply(),
            Err(e) => e.reply(),
        }
    }

    /// A request from a client, typed.
    pub fn client_call(&self, req: ClientRequest) -> Answer<ClientReply> {
        match req {
            ClientRequest::Locate => match self.live.lock().locate(self.config.heartbeat_timeout) {
                Some(addr) => Ok(ClientReply::Ms(addr)),
                None => refuse(Refusal::NoMs, "no messaging server available"),
            },
            ClientRequest::CrsKey => match self.identity_public.to_der() {
                Ok(der) => Ok(ClientReply::CrsKey {
                    fingerprint: self.identity_public.fingerprint(),
                    der,
                }),
                Err(_) => refuse(Refusal::Internal, "no key"),
            },
            ClientRequest::Register { key, sealed } => self
                .register(&key, &sealed)
                .map(|()| ClientReply::Registered),
        }
    }

    /// The checks every verifier passes, at registration and at a
    /// password change alike.
    fn check_verifier(&self, v: &Verifier) -> Answer<()> {
        if v.stored_key.len() != 32
            || v.server_key.len() != 32
            || !(16..=64).contains(&v.salt.len())
        {
            return refuse(Refusal::BadRequest, "malformed verifier");
        }
        if v.iterations < self.config.min_iterations {
            return refuse(Refusal::BadRequest, "too few password iterations");
        }
        if v.iterations > crypto::PBKDF2_MAX_ITERATIONS {
            return refuse(Refusal::BadRequest, "too many password iterations");
        }
        Ok(())
    }

    fn check_profile(profile: &Profile) -> Answer<()> {
        match pc::profile_problem(profile) {
            Some(why) => refuse(Refusal::TooLarge, &why),
            None => Ok(()),
        }
    }

    fn register(&self, key: &[u8], sealed: &[u8]) -> Answer<()> {
        if !self.config.registration_open {
            return refuse(Refusal::RegistrationClosed, "registration closed");
        }
        let Ok(k) = self.identity.decrypt_oaep(key) else {
            return refuse(Refusal::BadRequest, "undecryptable registration");
        };
        let Ok(k): Result<[u8; 32], _> = k.try_into() else {
            return refuse(Refusal::BadRequest, "bad registration key");
        };
        let Ok(plain) = crypto::aes_gcm_open(&k, &[0; 12], pc::REGISTER_AAD, sealed) else {
            return refuse(Refusal::BadRequest, "undecryptable registration");
        };
        let Ok(reg) = serde_json::from_slice::<Registration>(&plain) else {
            return refuse(Refusal::BadRequest, "malformed registration");
        };
        if !store::valid_username(&reg.user) {
            return refuse(
                Refusal::BadRequest,
                "invalid name: use 1-32 of a-z 0-9 _ . -",
            );
        }
        self.check_verifier(&reg.verifier)?;
        Self::check_profile(&reg.profile)?;
        if RsaPublicKey::from_der(&reg.public_key).is_err() {
            return refuse(Refusal::BadRequest, "invalid public key");
        }
        let user = store::User {
            name: store::canonical(&reg.user),
            verifier: reg.verifier.into(),
            profile: reg.profile,
            public_key: reg.public_key,
            wrapped_private_key: reg.wrapped_key,
            created_unix: now_unix(),
            ..Default::default()
        };
        let name = user.name.clone();
        self.store.create_user(user).map_err(store_err)?;
        info!("registered {name}");
        Ok(())
    }

    /// Checks an `ENROLL` proof; on success the sealed link and the reply.
    fn enroll(
        &self,
        m: &Message,
        ms_nonce: &[u8],
        crs_nonce: &[u8; 32],
    ) -> Result<(Enrolled, Message), Message> {
        if m.method() != Some("ENROLL") {
            return Err(Refused::new(Refusal::BadRequest, "expected ENROLL").to_message());
        }
        let fields = (|| -> Result<_, ProtoError> {
            Ok((
                m.req("Listen")?.to_owned(),
                m.req_parse::<u32>("Capacity")?,
                m.req_b64("Proof")?,
                m.header("Role").unwrap_or("ms").to_owned(),
                m.header("Instance").unwrap_or("").to_owned(),
            ))
        })();
        let (listen, capacity, proof, role, instance) = fields.map_err(|e| e.reply())?;
        let expected = crypto::hmac_sha256(
            &self.ms_key,
            &proto::enroll_ms_transcript(ms_nonce, crs_nonce, &listen, capacity, &role, &instance),
        );
        if !crypto::ct_eq(&expected, &proof) {
            warn!(
                "enrollment of {listen} refused: bad MSkey proof (is its MSkey the same as ours?)"
            );
            return Err(Refused::new(Refusal::BadProof, "bad MSkey proof").to_message());
        }
        let who = if role == "admin" {
            Peer2::Admin
        } else {
            match self.try_enroll_ms(&listen, capacity, &instance) {
                Ok(id) => Peer2::Ms(id),
                Err(r) => return Err(r.to_message()),
            }
        };
        let keys = enrollment_keys(&self.ms_key, ms_nonce, crs_nonce, Role::Responder);
        let id = match who {
            Peer2::Ms(id) => id,
            Peer2::Admin => 0,
        };
        let crs_proof = crypto::hmac_sha256(
            &self.ms_key,
            &proto::enroll_crs_transcript(ms_nonce, crs_nonce, id, &self.instance),
        );
        let reply = Message::ok()
            .with_header("Ms-Id", id)
            .with_header("Crs-Instance", &self.instance)
            .with_header("Proof", crypto::b64_encode(&crs_proof));
        Ok((
            Enrolled {
                who,
                link: Channel::new(keys, Vec::new()),
                poll: None,
            },
            reply,
        ))
    }

    /// Records an MS whose MSkey proof checked out; its id. Also the way
    /// handler tests enroll an MS without a socket.
    pub fn enroll_ms(&self, listen: &str, capacity: u32, instance: &str) -> u64 {
        self.try_enroll_ms(listen, capacity, instance).unwrap_or(0)
    }

    /// As [`Crs::enroll_ms`]; refused when the live state cannot be written
    /// (its database is unreachable).
    pub fn try_enroll_ms(
        &self,
        listen: &str,
        capacity: u32,
        instance: &str,
    ) -> Result<u64, Refused> {
        let mut live = self.live.lock();
        let (id, lost) = live.enroll(listen, capacity, instance);
        if let Err(e) = live.commit() {
            warn!("enrollment of {listen}: {e}");
            return Err(Refused::new(Refusal::Unavailable, "live state unavailable"));
        }
        if lost.is_empty() {
            debug!("MS {listen} (#{id}) opened a link");
        } else {
            warn!(
                "MS {listen} restarted; its {} users are offline",
                lost.len()
            );
            self.tell_lost(lost);
        }
        Ok(id)
    }

    /// An inner request of an enrolled link, as wire messages.
    pub fn sealed_request(&self, who: Peer2, inner: &Message) -> Message {
        let req = match CrsRequest::from_message(inner) {
            Ok(r) => r,
            Err(e) => return e.reply(),
        };
        debug!("{who:?}: {}", inner.method().unwrap_or(""));
        to_message(self.call(who, req), CrsReply::to_message)
    }

    /// An inner request of an enrolled link, typed. An `EVENTS` poll is
    /// answered at once here, with the events queued now (none or some);
    /// only on a link does it wait for them.
    pub fn call(&self, who: Peer2, req: CrsRequest) -> Answer<CrsReply> {
        match who {
            Peer2::Ms(ms) => {
                self.heard_from(ms)?;
                self.ms_request(ms, req)
            }
            Peer2::Admin => self.admin_request(req),
        }
    }

    /// What every request of an MS starts with: it counts as a sign of
    /// life, unless the MS was reaped while it was away.
    fn heard_from(&self, ms: u64) -> Answer<()> {
        if self.live.lock().touch(ms) {
            Ok(())
        } else {
            // Reaped while it was away: it must enroll again.
            refuse(Refusal::NotEnrolled, "not enrolled")
        }
    }

    fn ms_request(&self, ms: u64, req: CrsRequest) -> Answer<CrsReply> {
        use CrsRequest::*;
        match req {
            Heartbeat { .. } => Ok(CrsReply::Done),
            GetVerifier { user, source } => {
                let user = store::canonical(&user);
                // The attempt counts now, before its proof is judged.
                if let Err(wait) = self.guesses.attempt(&user, source) {
                    let secs = wait.as_secs().max(1);
                    return refuse(
                        Refusal::RateLimited {
                            retry_after: Some(secs),
                        },
                        &format!("too many wrong passwords; try again in {secs} s"),
                    );
                }
                match self.store.get_verifier(&user) {
                    Ok(Some(v)) => Ok(CrsReply::Verifier(v.into())),
                    Ok(None) => refuse(Refusal::NoSuchUser, "no such user"),
                    Err(e) => Err(user_err(e)),
                }
            }
            Lock { user } => {
                let user = store::canonical(&user);
                let mut live = self.live.lock();
                match live.lock(&user, ms, self.config.lock_lease) {
                    Ok(()) => match live.commit() {
                        Ok(()) => Ok(CrsReply::Done),
                        Err(_) => refuse(Refusal::Unavailable, "live state unavailable"),
                    },
                    Err(LockError::LoggingIn) => {
                        refuse(Refusal::AlreadyLoggingIn, "already logging in")
                    }
                    // The MS may probe the old client and take over if it is gone.
                    Err(LockError::LoggedIn) => refuse(
                        Refusal::AlreadyLoggedIn {
                            address: live.address(&user),
                        },
                        "already logged in",
                    ),
                }
            }
            Takeover { user } => {
                let user = store::canonical(&user);
                let old = self.live.lock().online(&user).map(|o| (o.ms, o.login));
                if let Some((old_ms, login)) = old {
                    self.live.lock().notify_ms(
                        old_ms,
                        vec![user.clone()],
                        EventKind::Evicted {
                            user: user.clone(),
                            login,
                        },
                    );
                    self.offline(&user, None);
                    info!("{user}'s old login at MS #{old_ms} is gone; a new login takes over");
                }
                Ok(CrsReply::Done)
            }
            Unlock { user } => {
                self.live.lock().unlock(&store::canonical(&user), ms);
                Ok(CrsReply::Done)
            }
            Online { user, address } => self.online(ms, &store::canonical(&user), address),
            Offline { user } => {
                self.offline(&store::canonical(&user), Some(ms));
                Ok(CrsReply::Done)
            }
            SetCredentials {
                user,
                verifier,
                wrapped_key,
            } => {
                self.check_verifier(&verifier)?;
                done(
                    self.store
                        .set_credentials(&user, verifier.into(), wrapped_key),
                )
            }
            SetProfile { user, profile } => {
                Self::check_profile(&profile)?;
                done(self.store.set_profile(&user, profile))
            }
            Search { text, limit } => self.search(&text, limit),
            Add {
                from,
                to,
                nonce,
                signature,
            } => self.add(&from, &to, nonce, signature),
            Accept { user, from } => {
                self.accept(&store::canonical(&user), &store::canonical(&from))
            }
            Deny { user, from } => self.deny(&store::canonical(&user), &store::canonical(&from)),
            Remove { user, buddy } => {
                self.remove(&store::canonical(&user), &store::canonical(&buddy))
            }
            Block { user, who, on } => {
                self.block(&store::canonical(&user), &store::canonical(&who), on)
            }
            SetStatus { user, info } => self.set_status(&user, info),
            Reveal { user, to } => self.reveal(&user, &to),
            // Answered at once: only a poll on a link waits (see `handle`).
            Events { ack } => {
                let batch = self.live.lock().events(ms, ack);
                match batch {
                    Some(batch) => Ok(CrsReply::Events(batch)),
                    None => refuse(Refusal::NotEnrolled, "not enrolled"),
                }
            }
            FindMs { user } => {
                let mut live = self.live.lock();
                let at = live.online(&store::canonical(&user)).map(|o| o.ms);
                match at.and_then(|id| live.ms_list().into_iter().find(|m| m.id == id)) {
                    Some(m) => Ok(CrsReply::MsAddress(m.address)),
                    None => refuse(Refusal::NoSuchUser, "not online"),
                }
            }
            Key { user, who } => self.buddy_key(&store::canonical(&user), &store::canonical(&who)),
            Queue { user, blob } => self.queue_mail(&store::canonical(&user), blob),
            Mail { user, after } => self.mail_page(&store::canonical(&user), after),
            MailAck { user, ids } => self.mail_ack(&store::canonical(&user), &ids),
            ListUsers { .. } | ShowUser { .. } | DeleteUser { .. } | ListMs => refuse(
                Refusal::WrongLink,
                "operator requests need an operator link",
            ),
        }
    }

    fn admin_request(&self, req: CrsRequest) -> Answer<CrsReply> {
        use CrsRequest::*;
        match req {
            ListUsers { after, limit } => self
                .store
                .list_users(after.as_deref(), limit.min(10_000) as usize)
                .map(CrsReply::Users)
                .map_err(store_err),
            ShowUser { user } => match self.store.get_user(&user) {
                Ok(Some(u)) => {
                    let online = self.live.lock().address(&u.name);
                    Ok(CrsReply::User(Box::new(UserView {
                        user: u.name,
                        profile: u.profile,
                        contacts: u.contacts.into_iter().collect(),
                        requests_from: u.requests.iter().map(|r| r.from.clone()).collect(),
                        public_key_fingerprint: RsaPublicKey::from_der(&u.public_key)
                            .map(|k| k.fingerprint())
                            .unwrap_or_default(),
                        online: online.map(|a| a.to_string()),
                        created_unix: u.created_unix,
                    })))
                }
                Ok(None) => refuse(Refusal::NoSuchUser, "no such user"),
                Err(e) => Err(user_err(e)),
            },
            DeleteUser { user } => {
                let name = store::canonical(&user);
                let contacts = self.store.contacts(&name).unwrap_or_default();
                match self.store.delete_user(&name) {
                    Ok(true) => {
                        let mut live = self.live.lock();
                        // A deleted user who is online is logged out at once.
                        if let Some((ms, login)) = live.online(&name).map(|o| (o.ms, o.login)) {
                            live.notify_ms(
                                ms,
                                vec![name.clone()],
                                EventKind::Evicted {
                                    user: name.clone(),
                                    login,
                                },
                            );
                        }
                        live.set_offline(&name, None);
                        live.notify(
                            contacts.iter().map(String::as_str),
                            &EventKind::BuddyRemoved {
                                buddy: name.clone(),
                            },
                        );
                        drop(live);
                        info!("operator deleted {name}");
                        Ok(CrsReply::Done)
                    }
                    Ok(false) => refuse(Refusal::NoSuchUser, "no such user"),
                    Err(e) => Err(user_err(e)),
                }
            }
            ListMs => Ok(CrsReply::MsList(self.live.lock().ms_list())),
            _ => refuse(Refusal::WrongLink, "not an operator request"),
        }
    }

    fn online(&self, ms: u64, user: &str, address: std::net::SocketAddr) -> Answer<CrsReply> {
        let lost_lock = || refuse(Refusal::LockNotHeld, "login lock not held (expired?)");
        // A login's `ONLINE` takes the lock itself when its MS did not
        // take it first with `LOCK`: one round trip instead of two. Of
        // logins racing for one user, through any MSs, the first to get
        // here wins and the others are refused as with `LOCK`.
        {
            let mut live = self.live.lock();
            if !live.holds_lock(user, ms) {
                match live.lock(user, ms, self.config.lock_lease) {
                    Ok(()) => {
                        if live.commit().is_err() {
                            return refuse(Refusal::Unavailable, "live state unavailable");
                        }
                    }
                    Err(LockError::LoggingIn) => {
                        return refuse(Refusal::AlreadyLoggingIn, "already logging in")
                    }
                    Err(LockError::LoggedIn) => {
                        return refuse(
                            Refusal::AlreadyLoggedIn {
                                address: live.address(user),
                            },
                            "already logged in",
                        )
                    }
                }
            }
        }
        let record = match self.store.get_user(user) {
            Ok(Some(u)) => u,
            Ok(None) => return refuse(Refusal::NoSuchUser, "no such user"),
            Err(e) => return Err(user_err(e)),
        };
        // The password was proved from this address: its guesses are forgiven.
        self.guesses.succeeded(user, address.ip());
        let requests = self.pending_requests(&record);
        // On a failed look-up the MS asks anyway: an empty answer costs little.
        let mail = self.store.has_mail(user).unwrap_or(true);
        let presence = Presence {
            address,
            public_key: record.public_key.clone(),
        };
        // A buddy who blocks this user, or is invisible, looks offline to them.
        let view = self.contacts_view(user, &record.contacts);
        let mut live = self.live.lock();
        if !live.holds_lock(user, ms) {
            return lost_lock();
        }
        let online = live.online_many(&record.contacts);
        let contacts: Vec<Contact> = record
            .contacts
            .iter()
            .map(|c| {
                let online = online
                    .get(c)
                    .filter(|_| !view.hidden.contains(c))
                    .map(|o| o.presence.clone());
                let info = view
                    .status
                    .get(c)
                    .filter(|_| online.is_some())
                    .cloned()
                    .unwrap_or_default();
                Contact {
                    user: c.clone(),
                    online,
                    status: info.status,
                    message: info.message,
                }
            })
            .collect();
        let login = live.set_online(user, ms, presence.clone());
        // An invisible user's buddies hear nothing.
        if record.status != Status::Invisible {
            live.notify(
                record
                    .contacts
                    .iter()
                    .filter(|c| !record.blocked.contains(*c))
                    .map(String::as_str),
                &EventKind::Online {
                    user: user.to_owned(),
                    presence,
                    status: record.status,
                    message: record.status_message.clone(),
                },
            );
        }
        if live.commit().is_err() {
            return refuse(Refusal::Unavailable, "live state unavailable");
        }
        info!("{user} online at {address}");
        Ok(CrsReply::Welcome {
            welcome: Welcome {
                user: record.name,
                public_key: record.public_key,
                wrapped_key: record.wrapped_private_key,
                contacts,
                requests,
                profile: record.profile,
                blocked: record.blocked.iter().cloned().collect(),
                status: record.status,
                message: record.status_message,
                mail,
            },
            login,
        })
    }

    /// Whether `by` blocks `whom` (false when unknown).
    fn blocks(&self, by: &str, whom: &str) -> bool {
        matches!(self.store.get_user(by), Ok(Some(u)) if u.blocked.contains(whom))
    }

    /// `user` blocks or unblocks `who`; a buddy among them sees `user` go
    /// offline or come back.
    fn block(&self, user: &str, who: &str, on: bool) -> Answer<CrsReply> {
        let changed = match self.store.set_blocked(user, who, on) {
            Ok(c) => c,
            Err(StoreError::SameUser) => {
                return refuse(Refusal::SameUser, "you cannot block yourself")
            }
            Err(e) => return Err(user_err(e)),
        };
        if !changed || !self.store.contacts(user).is_ok_and(|c| c.contains(who)) {
            return Ok(CrsReply::Done);
        }
        let info = self.status_of(user);
        if !on && info.status == Status::Invisible {
            // Unblocked, but still looking offline to everyone.
            return Ok(CrsReply::Done);
        }
        let mut live = self.live.lock();
        let Some(presence) = live.online(user).map(|o| o.presence.clone()) else {
            return Ok(CrsReply::Done);
        };
        let event = if on {
            EventKind::Offline {
                user: user.to_owned(),
            }
        } else {
            EventKind::Online {
                user: user.to_owned(),
                presence,
                status: info.status,
                message: info.message,
            }
        };
        live.notify([who], &event);
        drop(live);
        Ok(CrsReply::Done)
    }

    fn pending_requests(&self, record: &store::User) -> Vec<BuddyRequest> {
        record
            .requests
            .iter()
            .filter_map(|r| {
                let from = self.store.get_user(&r.from).ok().flatten()?;
                Some(BuddyRequest {
                    from: r.from.clone(),
                    public_key: from.public_key,
                    nonce: r.nonce.clone(),
                    signature: r.signature.clone(),
                })
            })
            .collect()
    }

    /// Takes `user` offline (if at `ms`, or anywhere for `None`) and tells
    /// their online buddies.
    pub fn offline(&self, user: &str, ms: Option<u64>) {
        let contacts = self.store.contacts(user).unwrap_or_default();
        let mut live = self.live.lock();
        if live.set_offline(user, ms) {
            live.notify(
                contacts.iter().map(String::as_str),
                &EventKind::Offline {
                    user: user.to_owned(),
                },
            );
            drop(live);
            info!("{user} offline");
        }
    }

    fn search(&self, text: &str, limit: u32) -> Answer<CrsReply> {
        let limit = limit.clamp(1, self.config.max_search_results) as usize;
        let found = self.store.search(text, limit).map_err(store_err)?;
        let mut live = self.live.lock();
        let mut bytes = 0usize;
        let mut hits = Vec::new();
        for h in found {
            // Capped by bytes too: a few huge profiles must not push the
            // reply past the body limit and fail every matching search.
            let size = h.profile.iter().fold(h.name.len(), |n, (k, v)| {
                n.saturating_add(k.len() + v.len())
            });
            bytes = bytes.saturating_add(size);
            if bytes > pc::MAX_SEARCH_REPLY_BYTES {
                break;
            }
            hits.push(Hit {
                online: live.online(&h.name).is_some(),
                user: h.name,
                profile: h.profile,
            });
        }
        drop(live);
        // Someone invisible is offline to the directory too.
        for h in hits.iter_mut().filter(|h| h.online) {
            h.online = self.status_of(&h.user).status != Status::Invisible;
        }
        Ok(CrsReply::Hits(hits))
    }

    fn add(&self, from: &str, to: &str, nonce: Vec<u8>, signature: Vec<u8>) -> Answer<CrsReply> {
        let (from, to) = (store::canonical(from), store::canonical(to));
        if from == to {
            return refuse(Refusal::SameUser, "you cannot add yourself");
        }
        let sender = match self.store.get_user(&from) {
            Ok(Some(u)) => u,
            Ok(None) => return refuse(Refusal::NoSuchUser, "no such user"),
            Err(e) => return Err(user_err(e)),
        };
        if sender.contacts.contains(&to) {
            return refuse(Refusal::AlreadyBuddies, "already buddies");
        }
        if self.blocks(&to, &from) {
            // Dropped, answered as for a recipient who is offline: the
            // sender learns nothing.
            info!("buddy request {from} -> {to} dropped: blocked");
            return Ok(CrsReply::Stored);
        }
        let signed = RsaPublicKey::from_der(&sender.public_key)
            .and_then(|k| k.verify_pss(&proto::add_transcript(&from, &to, &nonce), &signature));
        if signed.is_err() {
            warn!("buddy request {from} -> {to} with a bad signature");
            return refuse(Refusal::BadSignature, "bad signature");
        }
        let stored = store::BuddyRequest {
            from: from.clone(),
            signature: signature.clone(),
            nonce: nonce.clone(),
            created_unix: now_unix(),
        };
        self.store.add_request(&to, stored).map_err(user_err)?;
        let mut live = self.live.lock();
        if live.online(&to).is_some() {
            live.notify(
                [to.as_str()],
                &EventKind::Request(BuddyRequest {
                    from,
                    public_key: sender.public_key,
                    nonce,
                    signature,
                }),
            );
            drop(live);
            Ok(CrsReply::Done)
        } else {
            Ok(CrsReply::Stored)
        }
    }

    fn accept(&self, user: &str, from: &str) -> Answer<CrsReply> {
        let no_request = || refuse(Refusal::NoSuchRequest, "no such request");
        match self.store.get_user(user) {
            Ok(Some(u)) if u.requests.iter().any(|r| r.from == from) => {}
            Ok(_) | Err(StoreError::InvalidName) => return no_request(),
            Err(e) => return Err(store_err(e)),
        }
        self.store.make_buddies(user, from).map_err(store_err)?;
        let (user_s, from_s) = (self.status_of(user), self.status_of(from));
        let mut live = self.live.lock();
        // An invisible one of the two shows offline to the other.
        let user_p = live
            .online(user)
            .map(|o| o.presence.clone())
            .filter(|_| user_s.status != Status::Invisible);
        let from_p = live
            .online(from)
            .map(|o| o.presence.clone())
            .filter(|_| from_s.status != Status::Invisible);
        // Each sees the other's status while the other shows online.
        let shown = |p: &Option<Presence>, s: &StatusInfo| {
            if p.is_some() {
                s.clone()
            } else {
                StatusInfo::default()
            }
        };
        let (user_s, from_s) = (shown(&user_p, &user_s), shown(&from_p, &from_s));
        live.notify(
            [user],
            &EventKind::BuddyAdded {
                buddy: from.to_owned(),
                online: from_p.clone(),
                status: from_s.status,
                message: from_s.message.clone(),
            },
        );
        live.notify(
            [from],
            &EventKind::BuddyAdded {
                buddy: user.to_owned(),
                online: user_p,
                status: user_s.status,
                message: user_s.message,
            },
        );
        drop(live);
        // The new buddy, so the accepting client can talk at once, without
        // waiting for its own push.
        Ok(CrsReply::Contact(Contact {
            user: from.to_owned(),
            online: from_p,
            status: from_s.status,
            message: from_s.message,
        }))
    }

    fn deny(&self, user: &str, from: &str) -> Answer<CrsReply> {
        match self.store.remove_request(user, from) {
            Ok(true) => {
                self.live.lock().notify(
                    [from],
                    &EventKind::Denied {
                        by: user.to_owned(),
                    },
                );
                Ok(CrsReply::Done)
            }
            Ok(false) | Err(StoreError::InvalidName) => {
                refuse(Refusal::NoSuchRequest, "no such request")
            }
            Err(e) => Err(store_err(e)),
        }
    }

    fn remove(&self, user: &str, buddy: &str) -> Answer<CrsReply> {
        match self.store.remove_buddies(user, buddy) {
            Ok(true) => {
                let mut live = self.live.lock();
                live.notify(
                    [user],
                    &EventKind::BuddyRemoved {
                        buddy: buddy.to_owned(),
                    },
                );
                live.notify(
                    [buddy],
                    &EventKind::BuddyRemoved {
                        buddy: user.to_owned(),
                    },
                );
                drop(live);
                Ok(CrsReply::Done)
            }
            Ok(false) => refuse(Refusal::NotABuddy, "not a buddy"),
            Err(e) => Err(store_err(e)),
        }
    }

    /// One look at MS `ms`'s events for a long poll due at `deadline`:
    /// the answer if there are events, the MS is unknown or the time is up
    /// (an empty batch doubling as a heartbeat); else the park to wait in
    /// until MS `ms` is woken, or at most the live state's recheck time.
    fn poll_once(&self, ms: u64, ack: u64, deadline: Instant) -> Result<Answer<CrsReply>, Park> {
        let now = Instant::now();
        let wait = deadline
            .saturating_duration_since(now)
            .min(self.live.recheck());
        // Prepared before looking, so a wake in between is not missed.
        let park = self.events_ready.parking().prepare(ms, wait);
        // Bound first: the view is closed (the lock let go) at once.
        let batch = self.live.lock().events(ms, ack);
        match batch {
            None => Ok(refuse(Refusal::NotEnrolled, "not enrolled")),
            Some(batch) if !batch.events.is_empty() || now >= deadline || self.stopping() => {
                Ok(Ok(CrsReply::Events(batch)))
            }
            Some(_) => Err(park),
        }
    }

    /// Drops MSs that missed their heartbeats and tells their users'
    /// buddies that those users are gone.
    pub fn reap(&self) {
        let lost = self.live.lock().reap(self.config.heartbeat_timeout);
        if !lost.is_empty() {
            warn!(
                "an MS missed its heartbeats; its {} users are offline",
                lost.len()
            );
        }
        self.tell_lost(lost);
    }

    /// Tells the buddies of users lost with their MS.
    fn tell_lost(&self, lost: Vec<String>) {
        if lost.is_empty() {
            return;
        }
        for user in lost {
            let contacts = self.store.contacts(&user).unwrap_or_default();
            self.live.lock().notify(
                contacts.iter().map(String::as_str),
                &EventKind::Offline { user: user.clone() },
            );
        }
    }
}
