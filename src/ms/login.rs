//! The MS's service: the login handshake as typed connection states
//! (PROTOCOL.md §6), then sealed requests of logged-in users.
//!
//! A login's connection is held for the whole login: the MS pushes on it,
//! the client's keepalives and requests come on it, and its close ends the
//! login at once. The proof is checked before anything else happens, so a
//! wrong password learns nothing about whether its user is online.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use log::{info, warn};
use parking_lot::Mutex;

use super::users::{Names, OnlineUser};
use super::Ms;
use crate::crypto::{self, scram};
use crate::keyfile::hex;
use crate::link::{login_keys, push_keys, Channel, LinkError};
use crate::prethread::{Outbound, Outcome, Peer, Service};
use crate::proto::crs::{CrsReply, CrsRequest, OnlineForward, Verifier, SEALED};
use crate::proto::ms::{Challenge, MsReply, MsRequest};
use crate::proto::relay::RELAY;
use crate::proto::{self, Answer, ProtoError, Refusal, Refused};
use crate::seal::Role;
use crate::wire::Message;

/// Bytes of a login nonce.
pub const NONCE_LEN: usize = 24;
/// Fewest bytes of the client's login nonce the MS accepts.
pub const MIN_CLIENT_NONCE_LEN: usize = 16;

/// `LOGIN-HELLO` answered; the proof is due on this connection.
pub struct Challenged {
    user: String,
    /// `None` for a name that does not exist (a fake challenge was sent).
    verifier: Option<Verifier>,
    client_nonce: Vec<u8>,
    challenge: Challenge,
    peer: SocketAddr,
}

impl Challenged {
    /// The challenge sent to the client.
    pub fn challenge(&self) -> &Challenge {
        &self.challenge
    }
}

/// The state of one client connection to the MS.
pub enum ClientConn {
    /// Nothing yet: a login starts, or a logged-in user's sealed request.
    /// With the connection's writer when served over a socket.
    New(SocketAddr, Option<Outbound>),
    /// Waiting for `LOGIN`.
    Challenged(Box<Challenged>, Option<Outbound>),
    /// This connection carries the login: held until it closes.
    LoggedIn(Arc<OnlineUser>),
    /// Another MS's relay link (PROTOCOL.md §7): its frames for our users.
    Link(Box<super::mslink::Accepted>),
}

/// The MS as a [`Service`].
pub struct MsService(pub Arc<Ms>);

impl Service for MsService {
    type Session = ClientConn;

    fn open(&self, peer: &Peer) -> ClientConn {
        ClientConn::New(peer.remote, None)
    }

    fn open_with(&self, peer: &Peer, out: &Outbound) -> ClientConn {
        ClientConn::New(peer.remote, Some(out.clone()))
    }

    fn held(&self, conn: &ClientConn) -> bool {
        matches!(conn, ClientConn::LoggedIn(_) | ClientConn::Link(_))
    }

    fn close(&self, conn: ClientConn) {
        if let ClientConn::LoggedIn(user) = conn {
            self.0.connection_closed(&user);
        }
    }

    fn handle(&self, conn: &mut ClientConn, request: Message) -> Outcome {
        let ms = &self.0;
        match conn {
            ClientConn::LoggedIn(user) => match request.method() {
                // Only this login's requests ride its connection.
                Some(SEALED) if request.header("Login") == Some(user.login.as_str()) => {
                    ms.sealed(&request)
                }
                // A relayed connection's bytes: not answered (PROTOCOL.md §7).
                Some(RELAY) => {
                    user.touch();
                    ms.relay_from(user, request);
                    Outcome::Silent
                }
                _ => Outcome::ReplyAndClose(
                    Refused::new(
                        Refusal::BadRequest,
                        "expected a sealed request of this login",
                    )
                    .to_message(),
                ),
            },
            ClientConn::New(peer, out) => match request.method() {
                Some("LOGIN-HELLO") => match MsRequest::from_message(&request) {
                    Ok(MsRequest::LoginHello { user, client_nonce }) => {
                        match ms.hello(&user, client_nonce, *peer) {
                            Ok(c) => {
                                let reply = c.challenge.to_message();
                                *conn = ClientConn::Challenged(Box::new(c), out.take());
                                Outcome::Reply(reply)
                            }
                            Err(r) => Outcome::ReplyAndClose(r.to_message()),
                        }
                    }
                    Ok(_) => Outcome::ReplyAndClose(ProtoError::Invalid("request").reply()),
                    Err(e) => Outcome::ReplyAndClose(e.reply()),
                },
                Some(SEALED) => ms.sealed(&request),
                Some(super::mslink::HELLO) => match super::mslink::hello(&ms.ms_key, &request) {
                    Ok((reply, state)) => {
                        *conn = ClientConn::Link(Box::new(state));
                        Outcome::Reply(reply)
                    }
                    Err(r) => Outcome::ReplyAndClose(r.to_message()),
                },
                Some(m) => Outcome::ReplyAndClose(ProtoError::UnknownMethod(m.to_owned()).reply()),
                None => Outcome::Close,
            },
            ClientConn::Link(link) => match &mut **link {
                super::mslink::Accepted::Open(opener) => {
                    let frame = opener
                        .open_owned(request)
                        .map_err(|e| e.to_string())
                        .and_then(|inner| {
                            crate::proto::relay::Frame::from_message(inner)
                                .map_err(|e| e.to_string())
                        });
                    match frame {
                        Ok(f) => {
                            ms.relay_from_link(f);
                            Outcome::Silent
                        }
                        Err(e) => {
                            warn!("a relay link sent a bad frame ({e}); closed");
                            Outcome::Close
                        }
                    }
                }
                challenged => match super::mslink::prove(&ms.ms_key, challenged, &request) {
                    Ok(opener) => {
                        *challenged = super::mslink::Accepted::Open(Box::new(opener));
                        Outcome::Reply(Message::ok())
                    }
                    Err(r) => Outcome::ReplyAndClose(r.to_message()),
                },
            },
            ClientConn::Challenged(..) => {
                let ClientConn::Challenged(c, out) =
                    std::mem::replace(conn, ClientConn::New(([0, 0, 0, 0], 0).into(), None))
                else {
                    return Outcome::Close;
                };
                let reply = match MsRequest::from_message(&request) {
                    Ok(MsRequest::Login { proof, listen_port }) => {
                        let held = out.is_some();
                        match ms.login(*c, &proof, listen_port, out) {
                            // Over a socket the connection now carries the
                            // login; without one (handler tests) it ends.
                            // (The welcome was written by `login`.)
                            Ok((_, user)) if held => {
                                *conn = ClientConn::LoggedIn(user);
                                return Outcome::Silent;
                            }
                            Ok((sealed, _)) => sealed,
                            Err(r) => r.to_message(),
                        }
                    }
                    Ok(_) => Refused::new(Refusal::BadRequest, "expected LOGIN").to_message(),
                    Err(e) => e.reply(),
                };
                Outcome::ReplyAndClose(reply)
            }
        }
    }
}

/// The refusal a client sees when the CRS cannot be asked.
fn unavailable<T>(what: &str, e: &LinkError) -> Answer<T> {
    warn!("{what}: {e}");
    Err(Refused::new(
        Refusal::Unavailable,
        "directory unavailable, try again",
    ))
}

impl Ms {
    /// `LOGIN-HELLO`: the challenge for `user`, real or (for an unknown
    /// name) fake; the CRS counts the attempt.
    pub fn hello(&self, user: &str, client_nonce: Vec<u8>, peer: SocketAddr) -> Answer<Challenged> {
        if client_nonce.len() < MIN_CLIENT_NONCE_LEN {
            return Err(ProtoError::Invalid("Client-Nonce").into());
        }
        let user = user.to_ascii_lowercase();
        if !self.login_limit.take(&peer.ip()) {
            return Err(Refused::new(
                Refusal::RateLimited { retry_after: None },
                "too many login attempts from your address; try again shortly",
            ));
        }
        let verifier = match self.crs.call(&CrsRequest::GetVerifier {
            user: user.clone(),
            source: peer.ip(),
        }) {
            Ok(CrsReply::Verifier(v)) => Some(v),
            Ok(_) => return Err(ProtoError::NotAReply.into()),
            Err(LinkError::Refused(r)) if r.refusal == Refusal::NoSuchUser => None,
            Err(LinkError::Refused(r)) => return Err(r),
            Err(e) => return unavailable(&format!("login of {user}"), &e),
        };
        // An unknown name gets a salt derived from the MSkey and the name:
        // stable across attempts and MSs, so it looks like a real account.
        let (salt, iterations) = match &verifier {
            Some(v) => (v.salt.clone(), v.iterations),
            None => (
                crypto::hmac_sha256(
                    &self.ms_key,
                    &proto::transcript("ims fake salt v1", &[user.as_bytes()]),
                )[..16]
                    .to_vec(),
                self.config.fake_iterations,
            ),
        };
        Ok(Challenged {
            user,
            verifier,
            client_nonce,
            challenge: Challenge {
                salt,
                iterations,
                server_nonce: crypto::random_array::<NONCE_LEN>().to_vec(),
            },
            peer,
        })
    }

    /// `LOGIN`: checks the proof, then takes the login lock; the sealed
    /// welcome and the new login, or a refusal. `held` is the connection
    /// that will carry the login (pushes, keepalives, its close); the
    /// welcome is written on it here, before any push can be.
    pub fn login(
        self: &Arc<Self>,
        c: Challenged,
        proof: &[u8],
        listen_port: u16,
        held: Option<Outbound>,
    ) -> Result<(Message, Arc<OnlineUser>), Refused> {
        let failure = || {
            self.users.failures.inc();
            Refused::new(Refusal::PasswordFailure, "password failure")
        };
        let Some(verifier) = &c.verifier else {
            return Err(failure());
        };
        let auth = proto::login_auth_message(
            &c.user,
            &c.client_nonce,
            &c.challenge.server_nonce,
            &c.challenge.salt,
            c.challenge.iterations,
        );
        // Step 4 first: a wrong proof, for a user online or not, gets the
        // same answer, takes no lock and makes no one probe anyone (its
        // attempt was counted when the verifier was fetched).
        let Some(client_key) = <&[u8; 32]>::try_from(verifier.stored_key.as_slice())
            .ok()
            .and_then(|stored| scram::verify_proof(stored, &auth, proof))
        else {
            info!("login of {}: password failure", c.user);
            return Err(failure());
        };
        let Ok(server_key) = <&[u8; 32]>::try_from(verifier.server_key.as_slice()) else {
            return Err(Refused::new(Refusal::Internal, "malformed verifier"));
        };
        // Events for this user may come before the user is in our table:
        // they are held from here. A second login of the same user
        // arriving here meanwhile is refused at once.
        if !self.users.begin(&c.user) {
            return Err(Refused::new(
                Refusal::AlreadyLoggingIn,
                "already logging in",
            ));
        }
        let mut address = SocketAddr::new(c.peer.ip(), listen_port);
        // Once per login (over a socket), whether buddies can reach the
        // listener; port 0 tells them they cannot, so that they relay at
        // once (PROTOCOL.md §6, step 8).
        let probe = self.config.probe_timeout;
        if held.is_some() && !probe.is_zero() && !super::relay::reachable(address, probe) {
            info!(
                "{}'s listener at {address} cannot be reached; buddies will relay",
                c.user
            );
            address.set_port(0);
        }
        // Steps 3, 5, 7-9, in one call: the CRS takes the per-user lock
        // (a user online elsewhere is refused, "already logged in", for as
        // long as the MS holding that login holds its connection: only
        // that MS decides it has ended, from its own connection), records
        // the address, releases the lock, pushes the change and gives us
        // the user's record.
        let (welcome, number) = match self.crs.online(&OnlineForward {
            user: c.user.clone(),
            address,
        }) {
            Ok(answer) => answer,
            Err(e) => {
                self.users.finish(&c.user, None);
                // A lock the CRS took for us before it failed; none to
                // release when it refused because the user is elsewhere.
                if !matches!(
                    &e,
                    LinkError::Refused(r) if matches!(
                        r.refusal,
                        Refusal::AlreadyLoggedIn { .. } | Refusal::AlreadyLoggingIn
                    )
                ) {
                    self.unlock(&c.user);
                }
                return match e {
                    LinkError::Refused(r) => Err(r),
                    e => unavailable(&format!("login of {}", c.user), &e),
                };
            }
        };
        let login = hex(&crypto::random_array::<16>());
        let keys = login_keys(
            &client_key,
            &c.client_nonce,
            &c.challenge.server_nonce,
            Role::Responder,
        );
        let push = push_keys(
            &client_key,
            &c.client_nonce,
            &c.challenge.server_nonce,
            Role::Responder,
        );
        let signature = scram::server_signature(server_key, &auth);
        let user = Arc::new(OnlineUser {
            name: c.user.clone(),
            login: login.clone(),
            address,
            contacts: Mutex::new(welcome.contacts.iter().cloned().collect::<Names>()),
            link: Mutex::new(Channel::new(keys, vec![("Login", login.clone())])),
            push: Mutex::new(push.send),
            held,
            last_seen: AtomicU64::new(super::users::now_ms()),
            number: AtomicU64::new(number),
            ended: Default::default(),
        });
        let mail = welcome.mail;
        // The CRS's welcome as it wrote it (`MsReply::Welcome` to the client).
        let inner = welcome.to_message();
        let sealed = user.link.lock().seal_with(
            &[("Server-Signature", &crypto::b64_encode(&signature))],
            &inner,
        );
        match sealed {
            Ok(m) => {
                // On a held connection the welcome goes out here, before
                // the login is in the table: every push comes after it.
                if let Some(out) = &user.held {
                    if let Err(e) = out.send(&m) {
                        warn!("cannot send {}'s welcome: {e}", c.user);
                        self.users.finish(&c.user, None);
                        if let Err(e) = self.crs.call(&CrsRequest::Offline {
                            user: c.user.clone(),
                        }) {
                            warn!("telling the CRS {} is gone: {e}", c.user);
                        }
                        return Err(Refused::new(Refusal::Internal, "internal error"));
                    }
                }
                for held in self.users.finish(&c.user, Some(user.clone())) {
                    self.apply(held);
                }
                if mail {
                    self.want_mail(user.clone());
                }
                info!("{} logged in from {address}", c.user);
                Ok((m, user))
            }
            Err(e) => {
                warn!("cannot seal the welcome: {e}");
                self.users.finish(&c.user, None);
                Err(Refused::new(Refusal::Internal, "internal error"))
            }
        }
    }

    fn unlock(&self, user: &str) {
        if let Err(e) = self.crs.call(&CrsRequest::Unlock {
            user: user.to_owned(),
        }) {
            // The lease expires by itself.
            warn!("unlock of {user}: {e}");
        }
    }

    /// A logged-in user's sealed request.
    pub fn sealed(&self, outer: &Message) -> Outcome {
        let not_logged_in = || {
            Outcome::ReplyAndClose(Refused::new(Refusal::NotLoggedIn, "not logged in").to_message())
        };
        let Some(user) = outer.header("Login").and_then(|l| self.users.by_login(l)) else {
            return not_logged_in();
        };
        let inner = match user.link.lock().open(outer) {
            Ok(m) => {
                user.touch();
                m
            }
            Err(e) => {
                warn!("request of {}: {e}", user.name);
                return Outcome::ReplyAndClose(
                    Refused::new(Refusal::BadRequest, "unreadable request").to_message(),
                );
            }
        };
        let reply = match MsRequest::from_message(&inner) {
            Ok(req) => match self.user_request(&user, req) {
                Ok(r) => r.to_message(),
                Err(r) => r.to_message(),
            },
            Err(e) => e.reply(),
        };
        let sealed = user.link.lock().seal(&reply);
        match sealed {
            Ok(m) => Outcome::Reply(m),
            Err(e) => {
                warn!("cannot seal a reply: {e}");
                Outcome::Close
            }
        }
    }

    /// A logged-in user's request, typed.
    pub fn user_request(&self, user: &OnlineUser, req: MsRequest) -> Answer<MsReply> {
        let name = user.name.clone();
        let to_crs = match req {
            MsRequest::LoginHello { .. } | MsRequest::Login { .. } => {
                return Err(Refused::new(Refusal::BadRequest, "already logged in"))
            }
            MsRequest::Ping => return Ok(MsReply::Done),
            MsRequest::Logout => {
                self.users.remove(&name, Some(&user.login));
                info!("{name} logged out");
                CrsRequest::Offline { user: name }
            }
            MsRequest::Passwd {
                verifier,
                wrapped_key,
            } => CrsRequest::SetCredentials {
                user: name,
                verifier,
                wrapped_key,
            },
            MsRequest::SetProfile(profile) => CrsRequest::SetProfile {
                user: name,
                profile,
            },
            MsRequest::Search(text) => {
                if !self.search_limit.take(&name) {
                    return Err(Refused::new(
                        Refusal::RateLimited { retry_after: None },
                        "too many searches; try again shortly",
                    ));
                }
                CrsRequest::Search {
                    text,
                    limit: SEARCH_LIMIT,
                }
            }
            MsRequest::Add {
                to,
                nonce,
                signature,
            } => CrsRequest::Add {
                from: name,
                to,
                nonce,
                signature,
            },
            MsRequest::Accept(from) => CrsRequest::Accept { user: name, from },
            MsRequest::Deny(from) => CrsRequest::Deny { user: name, from },
            MsRequest::Remove(buddy) => CrsRequest::Remove { user: name, buddy },
            MsRequest::SetStatus(_) | MsRequest::Reveal(_) if !self.status_limit.take(&name) => {
                return Err(Refused::new(
                    Refusal::RateLimited { retry_after: None },
                    "too many status changes; try again shortly",
                ));
            }
            MsRequest::SetStatus(info) => CrsRequest::SetStatus { user: name, info },
            MsRequest::Reveal(to) => CrsRequest::Reveal { user: name, to },
            MsRequest::Block { who, on } => CrsRequest::Block {
                user: name,
                who,
                on,
            },
            MsRequest::Key(who) => CrsRequest::Key { user: name, who },
            MsRequest::Queue(blob) => CrsRequest::Queue { user: name, blob },
            MsRequest::MailAck(ids) => CrsRequest::MailAck { user: name, ids },
        };
        match self.crs.call(&to_crs) {
            Ok(CrsReply::Done) => Ok(MsReply::Done),
            Ok(CrsReply::Stored) => Ok(MsReply::Stored),
            Ok(CrsReply::Hits(h)) => Ok(MsReply::Hits(h)),
            Ok(CrsReply::Contact(c)) => Ok(MsReply::Contact(c)),
            Ok(CrsReply::Key(k)) => Ok(MsReply::Key(k)),
            Ok(other) => {
                warn!("the CRS answered {other:?} to a request of {}", user.name);
                Err(Refused::new(Refusal::Internal, "internal error"))
            }
            Err(LinkError::Refused(r)) => Err(r),
            Err(e) => unavailable(&format!("request of {}", user.name), &e),
        }
    }
}

/// Most results of a directory search asked of the CRS.
pub const SEARCH_LIMIT: u32 = 50;

/// `STATUS` and `REVEAL` requests a user may make at once: an invisible
/// user writing to a dozen buddies reveals to each.
pub const STATUS_BURST: u32 = 20;
/// `STATUS` and `REVEAL` requests per second after a burst: people do not
/// change their status more often, and each is a write at the CRS.
pub const STATUS_PER_SEC: f64 = 2.0;
