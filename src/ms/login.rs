//! The MS's service: the login handshake as typed connection states
//! (PROTOCOL.md §6), then sealed requests of logged-in users.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use log::{info, warn};
use parking_lot::Mutex;

use super::users::{Names, OnlineUser};
use super::Ms;
use crate::crypto::{self, scram};
use crate::keyfile::hex;
use crate::prethread::{Outcome, Peer, Service};
use crate::proto::crs::{self as pc, CrsRequest, Verifier, Welcome, SEALED};
use crate::proto::ms::{Challenge, MsRequest};
use crate::proto::{self, Fields, ProtoError};
use crate::seal::{Role, SessionKeys};
use crate::wire::{code, Message};

/// Bytes of a login nonce.
const NONCE_LEN: usize = 24;

/// `LOGIN-HELLO` answered; the proof is due on this connection.
pub struct Challenged {
    user: String,
    /// `None` for a name that does not exist (a fake challenge was sent).
    verifier: Option<Verifier>,
    client_nonce: Vec<u8>,
    challenge: Challenge,
    peer: SocketAddr,
}

/// The state of one client connection to the MS.
pub enum ClientConn {
    /// Nothing yet: a login starts, or a logged-in user's sealed request.
    New(SocketAddr),
    /// Waiting for `LOGIN`.
    Challenged(Box<Challenged>),
}

/// The MS as a [`Service`].
pub struct MsService(pub Arc<Ms>);

impl Service for MsService {
    type Session = ClientConn;

    fn open(&self, peer: &Peer) -> ClientConn {
        ClientConn::New(peer.remote)
    }

    fn handle(&self, conn: &mut ClientConn, request: Message) -> Outcome {
        let ms = &self.0;
        match conn {
            ClientConn::New(peer) => match request.method() {
                Some("LOGIN-HELLO") => match MsRequest::from_message(&request) {
                    Ok(MsRequest::LoginHello { user, client_nonce }) => {
                        match ms.hello(&user, client_nonce, *peer) {
                            Ok(c) => {
                                let reply = c.challenge.to_message();
                                *conn = ClientConn::Challenged(Box::new(c));
                                Outcome::Reply(reply)
                            }
                            Err(reply) => Outcome::ReplyAndClose(reply),
                        }
                    }
                    Ok(_) => Outcome::ReplyAndClose(ProtoError::Invalid("request").reply()),
                    Err(e) => Outcome::ReplyAndClose(e.reply()),
                },
                Some(SEALED) => ms.sealed(&request),
                Some(m) => Outcome::ReplyAndClose(ProtoError::UnknownMethod(m.to_owned()).reply()),
                None => Outcome::Close,
            },
            ClientConn::Challenged(_) => {
                let ClientConn::Challenged(c) =
                    std::mem::replace(conn, ClientConn::New(([0, 0, 0, 0], 0).into()))
                else {
                    return Outcome::Close;
                };
                match MsRequest::from_message(&request) {
                    Ok(MsRequest::Login { proof, listen_port }) => {
                        Outcome::ReplyAndClose(ms.login(*c, &proof, listen_port))
                    }
                    Ok(_) => {
                        Outcome::ReplyAndClose(Message::reply(code::BAD_REQUEST, "expected LOGIN"))
                    }
                    Err(e) => Outcome::ReplyAndClose(e.reply()),
                }
            }
        }
    }
}

fn err(code: u16, reason: &str) -> Message {
    Message::reply(code, reason)
}

impl Ms {
    fn hello(
        &self,
        user: &str,
        client_nonce: Vec<u8>,
        peer: SocketAddr,
    ) -> Result<Challenged, Message> {
        if client_nonce.len() < 16 {
            return Err(ProtoError::Invalid("Client-Nonce").reply());
        }
        let user = user.to_ascii_lowercase();
        if !self.login_limit.take(&peer.ip()) {
            return Err(err(
                code::RATE_LIMITED,
                "too many login attempts from your address; try again shortly",
            ));
        }
        if let Some(wait) = self.failures.wait(&user, peer.ip()) {
            return Err(err(
                code::RATE_LIMITED,
                &format!(
                    "too many wrong passwords; try again in {} s",
                    wait.as_secs().max(1)
                ),
            ));
        }
        let verifier = match self
            .crs
            .call(&CrsRequest::GetVerifier { user: user.clone() })
        {
            Ok(r) if r.is_success() => Some(pc::read_verifier(&r).map_err(|e| e.reply())?),
            Ok(r) if r.code() == Some(code::NOT_FOUND) => None,
            Ok(r) => return Err(r),
            Err(e) => {
                warn!("login of {user}: {e}");
                return Err(err(code::BUSY, "directory unavailable, try again"));
            }
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

    fn login(self: &Arc<Self>, c: Challenged, proof: &[u8], listen_port: u16) -> Message {
        let Some(verifier) = &c.verifier else {
            self.failures.failed(&c.user, c.peer.ip());
            return err(code::AUTH_FAILED, "password failure");
        };
        // Step 3: the design's per-user lock at the CRS.
        let auth = proto::login_auth_message(
            &c.user,
            &c.client_nonce,
            &c.challenge.server_nonce,
            &c.challenge.salt,
            c.challenge.iterations,
        );
        let proof_ok = || {
            <&[u8; 32]>::try_from(verifier.stored_key.as_slice())
                .ok()
                .and_then(|stored| scram::verify_proof(stored, &auth, proof))
        };
        match self.lock(&c.user) {
            Ok(()) => {}
            Err(reply) if reply.reason() == Some("already logged in") => {
                // The design refuses a second login while the first is alive;
                // a login whose client is gone (crashed, lost its network)
                // must not lock its user out. With a good password, probe.
                let old = reply
                    .header("Address")
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                let alive = old.is_none_or(|a| super::probe(a, &c.user, self.config.push_timeout));
                if alive || proof_ok().is_none() {
                    return reply;
                }
                info!(
                    "{}'s old client does not answer; this login takes over",
                    c.user
                );
                if let Err(e) = self.crs.call(&CrsRequest::Takeover {
                    user: c.user.clone(),
                }) {
                    warn!("takeover of {}: {e}", c.user);
                    return err(code::BUSY, "directory unavailable, try again");
                }
                if let Err(reply) = self.lock(&c.user) {
                    return reply;
                }
            }
            Err(reply) => return reply,
        }
        let client_key = proof_ok();
        // Step 4: a wrong proof changes nothing (but slows its source down).
        let Some(client_key) = client_key else {
            self.failures.failed(&c.user, c.peer.ip());
            self.unlock(&c.user);
            info!("login of {}: password failure", c.user);
            return err(code::AUTH_FAILED, "password failure");
        };
        self.failures.succeeded(&c.user, c.peer.ip());
        let Ok(server_key) = <&[u8; 32]>::try_from(verifier.server_key.as_slice()) else {
            self.unlock(&c.user);
            return err(code::INTERNAL, "malformed verifier");
        };
        let address = SocketAddr::new(c.peer.ip(), listen_port);
        // Steps 5, 7-9: the CRS records the address, releases the lock,
        // pushes the change and gives us the user's record.
        // Events for this user may come before the user is in our table.
        self.users.begin(&c.user);
        let (welcome, number): (Welcome, u64) = match self.crs.call(&CrsRequest::Online {
            user: c.user.clone(),
            address,
        }) {
            Ok(r) if r.is_success() => match r.json() {
                Ok(w) => (w, r.req_parse("Login-Number").unwrap_or(0)),
                Err(e) => {
                    self.users.finish(&c.user, None);
                    return e.reply();
                }
            },
            Ok(r) => {
                self.users.finish(&c.user, None);
                self.unlock(&c.user);
                return r;
            }
            Err(e) => {
                warn!("login of {}: {e}", c.user);
                self.users.finish(&c.user, None);
                self.unlock(&c.user);
                return err(code::BUSY, "directory unavailable, try again");
            }
        };
        let mut context = c.client_nonce.clone();
        context.extend_from_slice(&c.challenge.server_nonce);
        let keys = SessionKeys::derive(&client_key, &context, Role::Responder);
        context.extend_from_slice(b"push");
        let push = SessionKeys::derive(&client_key, &context, Role::Responder);
        let login = hex(&crypto::random_array::<16>());
        let signature = scram::server_signature(server_key, &auth);
        let user = Arc::new(OnlineUser {
            name: c.user.clone(),
            login: login.clone(),
            address,
            contacts: Mutex::new(
                welcome
                    .contacts
                    .iter()
                    .map(|c| c.user.clone())
                    .collect::<Names>(),
            ),
            link: Mutex::new((keys.recv, keys.send)),
            push: Mutex::new(push.send),
            last_seen: AtomicU64::new(super::users::now_ms()),
            number: AtomicU64::new(number),
            ended: Default::default(),
        });
        let inner = pc::json_reply(&welcome);
        let sealed = user.link.lock().1.seal(
            SEALED,
            &[
                ("Login", &login),
                ("Server-Signature", &crypto::b64_encode(&signature)),
            ],
            &inner,
        );
        match sealed {
            Ok(m) => {
                for held in self.users.finish(&c.user, Some(user)) {
                    self.apply(held);
                }
                info!("{} logged in from {address}", c.user);
                m
            }
            Err(e) => {
                warn!("cannot seal the welcome: {e}");
                self.users.finish(&c.user, None);
                err(code::INTERNAL, "internal error")
            }
        }
    }

    /// Takes the login lock at the CRS; the CRS's refusal otherwise.
    fn lock(&self, user: &str) -> Result<(), Message> {
        match self.crs.call(&CrsRequest::Lock {
            user: user.to_owned(),
        }) {
            Ok(r) if r.is_success() => Ok(()),
            Ok(r) => Err(r),
            Err(e) => {
                warn!("login of {user}: {e}");
                Err(err(code::BUSY, "directory unavailable, try again"))
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
    fn sealed(&self, outer: &Message) -> Outcome {
        let Some(user) = outer.header("Login").and_then(|l| self.users.by_login(l)) else {
            return Outcome::ReplyAndClose(err(code::FORBIDDEN, "not logged in"));
        };
        let inner = match user.link.lock().0.open(outer) {
            Ok(m) => {
                user.touch();
                m
            }
            Err(e) => {
                warn!("request of {}: {e}", user.name);
                return Outcome::ReplyAndClose(err(code::BAD_REQUEST, "unreadable request"));
            }
        };
        let reply = match MsRequest::from_message(&inner) {
            Ok(req) => self.user_request(&user, req),
            Err(e) => e.reply(),
        };
        let sealed = user
            .link
            .lock()
            .1
            .seal(SEALED, &[("Login", &user.login)], &reply);
        match sealed {
            Ok(m) => Outcome::Reply(m),
            Err(e) => {
                warn!("cannot seal a reply: {e}");
                Outcome::Close
            }
        }
    }

    fn user_request(&self, user: &OnlineUser, req: MsRequest) -> Message {
        let name = user.name.clone();
        let to_crs = match req {
            MsRequest::LoginHello { .. } | MsRequest::Login { .. } => {
                return err(code::BAD_REQUEST, "already logged in")
            }
            MsRequest::Ping => return Message::ok(),
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
                    return err(code::RATE_LIMITED, "too many searches; try again shortly");
                }
                CrsRequest::Search { text, limit: 50 }
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
        };
        match self.crs.call(&to_crs) {
            Ok(reply) => reply,
            Err(e) => {
                warn!("request of {}: {e}", user.name);
                err(code::BUSY, "directory unavailable, try again")
            }
        }
    }
}
