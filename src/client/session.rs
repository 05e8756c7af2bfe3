//! A login: the client's half of PROTOCOL.md §6, and the sealed requests
//! of a logged-in user to their MS.

use std::collections::BTreeMap;
use std::time::Duration;

use super::account::{self, exchange, refused, wrap_aad, AccountError, PasswordKeys};
use crate::crypto::{self, scram, KdfParams, KdfPolicy, RsaPrivateKey, RsaPublicKey};
use crate::proto::crs::{BuddyRequest, ClientRequest, Presence, Profile, Welcome, SEALED};
use crate::proto::ms::{Challenge, MsRequest};
use crate::proto::{self, Fields};
use crate::seal::{Opener, Role, Sealer, SessionKeys};
use crate::wire::Message;

/// Bytes of our login nonce.
const NONCE_LEN: usize = 24;

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
    /// The PBKDF2 parameters and password keys of this login (to re-wrap
    /// on a password change we need the private key only).
    send: Sealer,
    recv: Opener,
    /// Opens the MS's pushes.
    pub push: Opener,
    /// Buddies and, for those online, where they are.
    pub buddies: BTreeMap<String, Option<Presence>>,
    /// Buddy requests waiting for our answer, checked.
    pub requests: BTreeMap<String, BuddyRequest>,
    /// Our profile.
    pub profile: Profile,
    /// The salt and iterations of the password this login used, and its
    /// StoredKey: a password change first checks the current password
    /// against them, without asking the servers.
    password_check: PasswordCheck,
}

/// A password's salt and iterations and its StoredKey.
pub type PasswordCheck = (KdfParams, [u8; 32]);

/// Whether `password` is the one `check` was made from (a PBKDF2
/// derivation: done outside any lock).
pub fn is_password(
    check: &PasswordCheck,
    password: &str,
    policy: KdfPolicy,
) -> Result<bool, AccountError> {
    let (params, stored) = check;
    let keys = PasswordKeys::derive(password, params, policy)?;
    Ok(crypto::ct_eq(&keys.scram.stored_key, stored))
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
    /// Asks the CRS for an MS and logs in there.
    pub fn login(c: &Credentials<'_>) -> Result<Session, AccountError> {
        let user = account::normalize_name(c.user)?;
        let reply = exchange(c.crs, &ClientRequest::Locate.to_message(), c.timeout)?;
        if !reply.is_success() {
            return Err(refused(&reply));
        }
        let ms = reply
            .req("Ms")
            .map_err(|e| AccountError::Refused(0, e.to_string()))?
            .to_owned();
        let stream = super::connect(&ms, c.timeout)?;
        let mut conn = super::Conn::new(stream, c.timeout);

        let client_nonce = crypto::random_array::<NONCE_LEN>().to_vec();
        let hello = MsRequest::LoginHello {
            user: user.clone(),
            client_nonce: client_nonce.clone(),
        };
        let reply = conn.call(&hello.to_message())?;
        if !reply.is_success() {
            return Err(refused(&reply));
        }
        let challenge =
            Challenge::from_message(&reply).map_err(|e| AccountError::Refused(0, e.to_string()))?;
        let params = KdfParams {
            salt: challenge.salt.clone(),
            iterations: challenge.iterations,
        };
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
        let reply = conn.call(&login.to_message())?;
        if reply.method() != Some(SEALED) {
            return Err(refused(&reply));
        }
        // The MS proves it holds our verifier: a fake MS stops here.
        let expected = scram::server_signature(&keys.scram.server_key, &auth);
        let signature = reply.req_b64("Server-Signature").unwrap_or_default();
        if !crypto::ct_eq(&expected, &signature) {
            // Not code::AUTH_FAILED: that one means a wrong name or password.
            return Err(AccountError::Refused(
                0,
                "the messaging server failed to prove itself".into(),
            ));
        }
        let login_id = reply
            .req("Login")
            .map_err(|e| AccountError::Refused(0, e.to_string()))?
            .to_owned();
        let mut context = client_nonce.clone();
        context.extend_from_slice(&challenge.server_nonce);
        let link = SessionKeys::derive(&keys.scram.client_key, &context, Role::Initiator);
        context.extend_from_slice(b"push");
        let push = SessionKeys::derive(&keys.scram.client_key, &context, Role::Initiator);
        let (send, mut recv) = (link.send, link.recv);
        let inner = recv
            .open(&reply)
            .map_err(|e| AccountError::Refused(0, format!("unreadable welcome: {e}")))?;
        let welcome: Welcome = inner
            .json()
            .map_err(|e| AccountError::Refused(0, e.to_string()))?;
        let private_der = scram::unwrap(&keys.wrap, &welcome.wrapped_key, &wrap_aad(&user))?;
        let private_key = RsaPrivateKey::from_der(&private_der)?;
        let public_key = RsaPublicKey::from_der(&welcome.public_key)?;
        if private_key.public_key().to_der()? != welcome.public_key {
            return Err(AccountError::Refused(
                0,
                "the stored key pair does not match".into(),
            ));
        }
        let requests = welcome
            .requests
            .into_iter()
            .filter(|r| request_is_genuine(r, &user))
            .map(|r| (r.from.clone(), r))
            .collect();
        Ok(Session {
            user,
            ms,
            login: login_id,
            private_key,
            public_key,
            send,
            recv,
            push: push.recv,
            buddies: welcome
                .contacts
                .into_iter()
                .map(|c| (c.user, c.online))
                .collect(),
            requests,
            profile: welcome.profile,
            password_check: (params, keys.scram.stored_key),
        })
    }

    /// Seals `req` for the MS; the reply must go through [`Session::open_reply`].
    pub fn seal_request(&mut self, req: &MsRequest) -> Result<Message, AccountError> {
        self.send
            .seal(SEALED, &[("Login", &self.login)], &req.to_message())
            .map_err(|e| AccountError::Refused(0, e.to_string()))
    }

    /// Opens the MS's sealed reply (an unsealed one is an error reply).
    pub fn open_reply(&mut self, reply: Message) -> Result<Message, AccountError> {
        if reply.method() != Some(SEALED) {
            return Err(refused(&reply));
        }
        self.recv
            .open(&reply)
            .map_err(|e| AccountError::Refused(0, format!("unreadable reply: {e}")))
    }

    /// The password is now the one `check` was made from.
    pub fn password_changed(&mut self, check: PasswordCheck) {
        self.password_check = check;
    }

    /// What tells whether a password is the one this login was made with
    /// (see [`is_password`]).
    pub fn password_check(&self) -> PasswordCheck {
        self.password_check.clone()
    }

    /// A new verifier and our private key re-wrapped for `password`.
    pub fn rewrap(
        &self,
        password: &str,
        iterations: u32,
        policy: KdfPolicy,
    ) -> Result<(MsRequest, PasswordCheck), AccountError> {
        if password.chars().count() < account::MIN_PASSWORD_LEN {
            return Err(AccountError::WeakPassword);
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
        Ok((request, (params, keys.scram.stored_key)))
    }

    /// A signed buddy request for `to`.
    pub fn add_request(&self, to: &str) -> Result<MsRequest, AccountError> {
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
