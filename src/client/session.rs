//! A login: the client's half of PROTOCOL.md §6, and the sealed requests
//! of a logged-in user to their MS.

use std::collections::BTreeMap;
use std::time::Duration;

use super::account::{self, wrap_aad, ClientError, PasswordKeys};
use crate::crypto::{self, scram, KdfParams, KdfPolicy, RsaPrivateKey, RsaPublicKey};
use crate::link::{login_keys, push_keys, Channel, Conn, LinkError};
use crate::proto::crs::{BuddyRequest, ClientReply, ClientRequest, Presence, Profile};
use crate::proto::ms::{MsReply, MsRequest};
use crate::proto::{self, Fields, ProtoError, Request};
use crate::seal::{Opener, Role};
use crate::wire::Message;

/// Bytes of our login nonce.
const NONCE_LEN: usize = 24;

/// How long the MS of the last login may take to answer `LOGIN-HELLO`
/// before the client asks the CRS for another: a host that went away
/// costs this much, not a whole exchange timeout.
const REMEMBERED_MS_WAIT: Duration = Duration::from_secs(3);

/// A logged-in user: exists only after the MS proved itself and our
/// private key unwrapped.
pub struct Session {
    /// Our name.
    pub user: String,
    /// The MS we logged in at.
    pub ms: String,
    /// The login id the MS gave us.
    pub login: String,
    /// Our private key, unwrapped locally.
    pub private_key: RsaPrivateKey,
    /// Our public key.
    pub public_key: RsaPublicKey,
    /// Seals our requests to the MS and opens its replies.
    link: Channel,
    /// Opens the MS's pushes.
    pub push: Opener,
    /// Buddies and, for those online, where they are.
    pub buddies: BTreeMap<String, Option<Presence>>,
    /// Buddy requests waiting for our answer, checked.
    pub requests: BTreeMap<String, BuddyRequest>,
    /// Our profile.
    pub profile: Profile,
    /// The users we block, as kept at the CRS.
    pub blocked: std::collections::BTreeSet<String>,
    /// Our status and personal message, as kept at the CRS.
    pub status: crate::proto::status::StatusInfo,
    /// The status of buddies the servers said are online (`invisible`:
    /// one who wrote to us while invisible, shown offline).
    pub buddy_status: BTreeMap<String, crate::proto::status::StatusInfo>,
    /// The key of this account's history on disk (from the password).
    pub history_key: [u8; 32],
    /// The salt and iteration count this login derived with.
    pub kdf: KdfParams,
    /// The StoredKey of this login's password: with `kdf`, a password
    /// change checks the current password without asking the servers.
    stored_key: [u8; 32],
}

/// A password's salt and iterations and its StoredKey.
pub type PasswordCheck = (KdfParams, [u8; 32]);

/// Whether `password` is the one `check` was made from (a PBKDF2
/// derivation: done outside any lock).
pub fn is_password(
    check: &PasswordCheck,
    password: &str,
    policy: KdfPolicy,
) -> Result<bool, ClientError> {
    let (params, stored) = check;
    let keys = PasswordKeys::derive(password, params, policy)?;
    Ok(crypto::ct_eq(&keys.scram.stored_key, stored))
}

/// Where the client is: the one place its login lives. A push or a peer
/// that arrives while a login is under way waits for it to end.
#[derive(Default)]
pub enum State {
    /// No login.
    #[default]
    LoggedOut,
    /// A login between its `LOGIN-HELLO` and its outcome.
    LoggingIn,
    /// Logged in.
    LoggedIn(Box<Session>),
}

impl State {
    /// The login, if logged in.
    pub fn session(&self) -> Option<&Session> {
        match self {
            State::LoggedIn(s) => Some(s),
            _ => None,
        }
    }

    /// The login, if logged in, to change.
    pub fn session_mut(&mut self) -> Option<&mut Session> {
        match self {
            State::LoggedIn(s) => Some(s),
            _ => None,
        }
    }

    /// Whether a login is under way.
    pub fn logging_in(&self) -> bool {
        matches!(self, State::LoggingIn)
    }

    /// Ends a login (logged out); the session it ended, if any. A login
    /// under way is left to end by itself.
    pub fn log_out(&mut self) -> Option<Box<Session>> {
        match std::mem::take(self) {
            State::LoggedIn(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }
}

/// Everything a login needs.
pub struct Credentials<'a> {
    /// The CRS's address.
    pub crs: &'a str,
    /// Who.
    pub user: &'a str,
    /// The password.
    pub password: &'a str,
    /// KDF policy (production unless explicitly relaxed).
    pub policy: KdfPolicy,
    /// The port of our listener.
    pub listen_port: u16,
    /// Bound on each exchange.
    pub timeout: Duration,
    /// The iteration count this client uses for new passwords: a
    /// challenge asking for more is derived only after telling the user.
    pub usual_iterations: u32,
    /// The salt and count of this user's last login from this client, if
    /// any: a challenge with others is derived only after telling the user.
    pub known: Option<&'a KdfParams>,
    /// Tells the user something (before a long derivation).
    pub notice: &'a dyn Fn(String),
    /// The MS of this client's last login, if any: tried first, so that a
    /// login again (a reconnection, another user) costs no connection to
    /// the CRS. `LOCATE` when it cannot be reached or will not log us in.
    pub last_ms: Option<&'a str>,
}

/// Checks a buddy request's signature: `from` signed (from, to, nonce).
pub fn request_is_genuine(req: &BuddyRequest, to: &str) -> bool {
    RsaPublicKey::from_der(&req.public_key)
        .and_then(|k| {
            k.verify_pss(
                &proto::add_transcript(&req.from, to, &req.nonce),
                &req.signature,
            )
        })
        .is_ok()
}

impl Session {
    /// Whether `buddy`, though reachable, shows offline (invisible).
    pub fn status_hidden(&self, buddy: &str) -> bool {
        matches!(self.buddy_status.get(buddy), Some(i) if i.status == crate::proto::status::Status::Invisible)
    }

    /// Asks the CRS for an MS and logs in there.
    pub fn login(c: &Credentials<'_>) -> Result<Session, ClientError> {
        Session::login_held(c).map(|(s, _)| s)
    }

    /// As [`Session::login`], and the login's connection, which carries
    /// the login from now on: the MS pushes on it, requests and keepalives
    /// go on it, and its close ends the login.
    pub fn login_held(c: &Credentials<'_>) -> Result<(Session, Conn), ClientError> {
        let user = account::normalize_name(c.user)?;
        let client_nonce = crypto::random_array::<NONCE_LEN>().to_vec();
        let hello = MsRequest::LoginHello {
            user: user.clone(),
            client_nonce: client_nonce.clone(),
        };
        let at = |ms: &str, timeout: Duration| -> Result<_, ClientError> {
            let mut conn = Conn::connect(ms, timeout)?;
            let MsReply::Challenge(challenge) = conn.call(&hello)? else {
                return Err(LinkError::Proto(ProtoError::NotAReply).into());
            };
            Ok((conn, challenge))
        };
        let remembered = match c.last_ms {
            // Whatever went wrong there (gone, busy, no longer enrolled),
            // the CRS knows where to go instead.
            Some(ms) => at(ms, c.timeout.min(REMEMBERED_MS_WAIT))
                .ok()
                .map(|x| (ms.to_owned(), x)),
            None => None,
        };
        let (ms, (mut conn, challenge)) = match remembered {
            Some(found) => found,
            None => {
                let ms = match Conn::connect(c.crs, c.timeout)?.call(&ClientRequest::Locate)? {
                    ClientReply::Ms(ms) => ms,
                    _ => return Err(LinkError::Proto(ProtoError::Missing("Ms")).into()),
                };
                let found = at(&ms, c.timeout)?;
                (ms, found)
            }
        };
        // The challenge is not authenticated: its count bounds our CPU.
        if challenge.iterations > crypto::PBKDF2_MAX_ITERATIONS {
            return Err(ClientError::TooManyIterations(challenge.iterations));
        }
        if challenge.iterations > c.usual_iterations {
            (c.notice)(format!(
                "this account's password uses {} iterations (this client uses {}); deriving its key takes longer",
                challenge.iterations, c.usual_iterations
            ));
        }
        let params = KdfParams {
            salt: challenge.salt.clone(),
            iterations: challenge.iterations,
        };
        if c.known.is_some_and(|k| *k != params) {
            (c.notice)(format!(
                "the server gives {user} other password parameters than at the last login here \
                 (a changed password, or not your servers)"
            ));
        }
        let keys = PasswordKeys::derive(c.password, &params, c.policy)?;
        let auth = proto::login_auth_message(
            &user,
            &client_nonce,
            &challenge.server_nonce,
            &challenge.salt,
            challenge.iterations,
        );
        let proof = scram::client_proof(&keys.scram.client_key, &keys.scram.stored_key, &auth);
        let login = MsRequest::Login {
            proof: proof.to_vec(),
            listen_port: c.listen_port,
        };
        let reply = conn.exchange(&login.to_message())?;
        if let Some(r) = proto::Refused::from_message(&reply) {
            return Err(r.into());
        }
        // The MS proves it holds our verifier: a fake MS stops here.
        let expected = scram::server_signature(&keys.scram.server_key, &auth);
        let signature = reply.req_b64("Server-Signature").unwrap_or_default();
        if !crypto::ct_eq(&expected, &signature) {
            return Err(ClientError::ServerUnproven);
        }
        let login_id = reply
            .req("Login")
            .map_err(|e| ClientError::Io(e.into()))?
            .to_owned();
        let keys_link = login_keys(
            &keys.scram.client_key,
            &client_nonce,
            &challenge.server_nonce,
            Role::Initiator,
        );
        let push = push_keys(
            &keys.scram.client_key,
            &client_nonce,
            &challenge.server_nonce,
            Role::Initiator,
        );
        let mut link = Channel::new(keys_link, vec![("Login", login_id.clone())]);
        let inner = link.open(&reply)?;
        let MsReply::Welcome(welcome) = login.read_reply(&inner).map_err(LinkError::from)?? else {
            return Err(LinkError::Proto(ProtoError::NotAReply).into());
        };
        let private_der = scram::unwrap(&keys.wrap, &welcome.wrapped_key, &wrap_aad(&user))?;
        let private_key = RsaPrivateKey::from_der(&private_der)?;
        let public_key = RsaPublicKey::from_der(&welcome.public_key)?;
        if private_key.public_key().to_der()? != welcome.public_key {
            return Err(ClientError::KeyMismatch);
        }
        let requests = welcome
            .requests
            .into_iter()
            .filter(|r| request_is_genuine(r, &user))
            .map(|r| (r.from.clone(), r))
            .collect();
        let history_key = super::history::history_key(&keys.wrap, &user);
        let session = Session {
            user,
            ms,
            login: login_id,
            private_key,
            public_key,
            link,
            push: push.recv,
            buddy_status: welcome
                .contacts
                .iter()
                .filter(|c| c.online.is_some())
                .map(|c| {
                    let info = super::status::received(c.status, &c.message);
                    (c.user.clone(), info)
                })
                .collect(),
            status: super::status::received(welcome.status, &welcome.message),
            buddies: welcome
                .contacts
                .into_iter()
                .map(|c| (c.user, c.online))
                .collect(),
            requests,
            profile: welcome.profile,
            blocked: welcome.blocked.into_iter().collect(),
            kdf: params,
            stored_key: keys.scram.stored_key,
            history_key,
        };
        Ok((session, conn))
    }

    /// Seals `req` for the MS; its reply goes through [`Session::open_reply`].
    pub fn seal_request(&mut self, req: &MsRequest) -> Result<Message, ClientError> {
        Ok(self.link.seal(&req.to_message())?)
    }

    /// Opens and decodes the MS's reply to `req` (an unsealed one is a
    /// refusal in the clear).
    pub fn open_reply(&mut self, req: &MsRequest, reply: &Message) -> Result<MsReply, ClientError> {
        let inner = self.link.open(reply)?;
        Ok(req.read_reply(&inner).map_err(LinkError::from)??)
    }

    /// What tells whether a password is the one this login was made with
    /// (see [`is_password`]).
    pub fn password_check(&self) -> PasswordCheck {
        (self.kdf.clone(), self.stored_key)
    }

    /// The password is now the one `check` was made from.
    pub fn password_changed(&mut self, (kdf, stored_key): PasswordCheck) {
        self.kdf = kdf;
        self.stored_key = stored_key;
    }

    /// A new verifier and our private key re-wrapped for `password`, and
    /// what checks the new password.
    pub fn rewrap(
        &self,
        password: &str,
        iterations: u32,
        policy: KdfPolicy,
    ) -> Result<(MsRequest, PasswordCheck, [u8; 32]), ClientError> {
        if password.chars().count() < account::MIN_PASSWORD_LEN {
            return Err(ClientError::WeakPassword);
        }
        let params = KdfParams::generate(iterations);
        let keys = PasswordKeys::derive(password, &params, policy)?;
        let wrapped_key = scram::wrap(
            &keys.wrap,
            &self.private_key.to_der()?,
            &wrap_aad(&self.user),
        )?;
        let request = MsRequest::Passwd {
            verifier: keys.verifier(&params),
            wrapped_key,
        };
        let history_key = super::history::history_key(&keys.wrap, &self.user);
        Ok((request, (params, keys.scram.stored_key), history_key))
    }

    /// A signed buddy request for `to`.
    pub fn add_request(&self, to: &str) -> Result<MsRequest, ClientError> {
        let nonce = crypto::random_array::<16>().to_vec();
        let signature = self
            .private_key
            .sign_pss(&proto::add_transcript(&self.user, to, &nonce))?;
        Ok(MsRequest::Add {
            to: to.to_owned(),
            nonce,
            signature,
        })
    }
}

/// A logged-in session with no server behind it, for the client's unit
/// tests: `buddies` with their presence, nothing else.
#[cfg(test)]
pub(crate) fn session_for_test(user: &str, buddies: &[(&str, Option<Presence>)]) -> Session {
    let private_key = RsaPrivateKey::generate(crypto::MIN_RSA_BITS).unwrap();
    let public_key = private_key.public_key();
    let keys = |role| login_keys(&[1; 32], &[2; 24], &[3; 24], role);
    Session {
        user: user.to_owned(),
        ms: "127.0.0.1:9".into(),
        login: "test".into(),
        private_key,
        public_key,
        link: Channel::new(keys(Role::Initiator), Vec::new()),
        push: push_keys(&[1; 32], &[2; 24], &[3; 24], Role::Initiator).recv,
        buddies: buddies
            .iter()
            .map(|(u, p)| ((*u).to_owned(), p.clone()))
            .collect(),
        requests: BTreeMap::new(),
        profile: Profile::new(),
        blocked: Default::default(),
        status: Default::default(),
        buddy_status: BTreeMap::new(),
        history_key: [0; 32],
        kdf: KdfParams {
            salt: vec![1; 16],
            iterations: 1,
        },
        stored_key: [0; 32],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ms::Challenge;
    use crate::wire::io::{write_message, MessageReader};
    use crate::wire::Limits;
    use std::net::TcpListener;
    use std::time::Instant;

    /// A server answering each request on each connection with `answer`.
    fn serve(answer: impl Fn(&Message) -> Message + Send + 'static) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { return };
                let mut r = MessageReader::new(s);
                let deadline = || Instant::now() + Duration::from_secs(5);
                while let Ok(Some(m)) = r.read_message(&Limits::DEFAULT, deadline()) {
                    if write_message(r.get_mut(), &answer(&m), deadline()).is_err() {
                        break;
                    }
                }
            }
        });
        addr
    }

    /// Logs in with `last_ms` remembered; which servers were asked:
    /// (`LOCATE`s at the CRS, `LOGIN-HELLO`s at the MS it names, at the
    /// remembered one).
    fn login_remembering(last_ms: Option<&str>) -> (usize, usize, usize) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let count = |n: &Arc<AtomicUsize>, m: &Message| {
            if m.method() == Some("LOGIN-HELLO") || m.method() == Some("LOCATE") {
                n.fetch_add(1, Ordering::SeqCst);
            }
        };
        let challenge = || {
            Challenge {
                salt: vec![1; 16],
                iterations: 1,
                server_nonce: vec![2; 24],
            }
            .to_message()
        };
        let (at_crs, at_located) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let n = at_located.clone();
        let located = serve(move |m| {
            count(&n, m);
            challenge()
        });
        let n = at_crs.clone();
        let crs = serve(move |m| {
            count(&n, m);
            ClientReply::Ms(located.clone()).to_message()
        });
        let at_remembered = Arc::new(AtomicUsize::new(0));
        let n = at_remembered.clone();
        let remembered = serve(move |m| {
            count(&n, m);
            challenge()
        });
        let last_ms = last_ms.map(|m| {
            if m == "alive" {
                remembered.clone()
            } else {
                m.to_owned()
            }
        });
        // The fake MSs answer LOGIN with a challenge: the login fails
        // after the hello, which is all this looks at.
        let _ = Session::login(&Credentials {
            crs: &crs,
            user: "joe",
            password: "correct horse",
            policy: KdfPolicy::Insecure,
            listen_port: 7300,
            timeout: Duration::from_secs(5),
            usual_iterations: 10,
            known: None,
            notice: &|_| {},
            last_ms: last_ms.as_deref(),
        });
        let get = |n: &Arc<AtomicUsize>| n.load(Ordering::SeqCst);
        (get(&at_crs), get(&at_located), get(&at_remembered))
    }

    #[test]
    fn a_login_goes_to_the_last_ms_first_and_locates_only_without_it() {
        // Nothing remembered: LOCATE, then the MS it names.
        assert_eq!(login_remembering(None), (1, 1, 0));
        // The last MS answers: the CRS is not asked.
        assert_eq!(login_remembering(Some("alive")), (0, 0, 1));
        // The last MS is gone: LOCATE after all.
        let gone = TcpListener::bind("127.0.0.1:0").unwrap();
        let gone_at = gone.local_addr().unwrap().to_string();
        drop(gone);
        assert_eq!(login_remembering(Some(&gone_at)), (1, 1, 0));
    }

    fn login_against(iterations: u32) -> (Result<Session, ClientError>, Vec<String>) {
        login_knowing(iterations, None)
    }

    fn login_knowing(
        iterations: u32,
        known: Option<KdfParams>,
    ) -> (Result<Session, ClientError>, Vec<String>) {
        let ms = serve(move |_| {
            Challenge {
                salt: vec![1; 16],
                iterations,
                server_nonce: vec![2; 24],
            }
            .to_message()
        });
        let crs = serve(move |_| ClientReply::Ms(ms.clone()).to_message());
        let notices = std::sync::Mutex::new(Vec::new());
        let notice = |t: String| notices.lock().unwrap().push(t);
        let r = Session::login(&Credentials {
            crs: &crs,
            user: "joe",
            password: "correct horse",
            policy: KdfPolicy::Insecure,
            listen_port: 7300,
            timeout: Duration::from_secs(5),
            usual_iterations: 10,
            known: known.as_ref(),
            notice: &notice,
            last_ms: None,
        });
        (r, notices.into_inner().unwrap())
    }

    #[test]
    fn a_challenge_past_the_iteration_maximum_is_refused_at_once() {
        let t = Instant::now();
        let (r, notices) = login_against(4_000_000_000);
        match r {
            Err(ClientError::TooManyIterations(4_000_000_000)) => {}
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("logged in"),
        }
        assert!(notices.is_empty(), "{notices:?}");
        // Refused before deriving anything (four billion would take hours).
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let e = login_against(crypto::PBKDF2_MAX_ITERATIONS + 1)
            .0
            .err()
            .unwrap();
        assert!(e.to_string().contains("iterations"), "{e}");
    }

    #[test]
    fn an_unusual_count_is_told_before_deriving() {
        // 500 is more than the usual 10: the user hears of it; the fake MS
        // then fails the login, which is not what is tested here.
        let (r, notices) = login_against(500);
        assert!(r.is_err());
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(notices[0].contains("500"), "{notices:?}");
        // Other parameters than this user's last login here: told too.
        let known = KdfParams {
            salt: vec![9; 16],
            iterations: 5,
        };
        let (_, notices) = login_knowing(5, Some(known));
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(
            notices[0].contains("other password parameters"),
            "{notices:?}"
        );
        let same = KdfParams {
            salt: vec![1; 16],
            iterations: 5,
        };
        assert!(login_knowing(5, Some(same)).1.is_empty());
    }
}
