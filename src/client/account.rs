//! The password side of an account, all of it on the client: deriving the
//! SCRAM keys and the wrap key from the password, making the key pair, and
//! registering with the CRS (PROTOCOL.md §4).

use std::fmt;
use std::time::Duration;

use crate::crypto::{self, scram, KdfParams, KdfPolicy, RsaPrivateKey, RsaPublicKey};
use crate::proto::crs::{ClientRequest, Profile, Registration, Verifier, REGISTER_AAD};
use crate::wire::io::IoError;
use crate::wire::Message;

/// Fewest characters of a password.
pub const MIN_PASSWORD_LEN: usize = 8;

/// Why an account operation failed.
#[derive(Debug)]
pub enum AccountError {
    /// The password is too short.
    WeakPassword,
    /// The name is not 1-32 of `a-z 0-9 _ . -`.
    InvalidName,
    /// The server could not be reached or broke the connection.
    Io(IoError),
    /// The server said no (its reason).
    Refused(u16, String),
    /// A key operation failed (e.g. iterations below the policy).
    Crypto(crypto::Error),
    /// The CRS's key is not the one configured.
    WrongCrsKey(String),
}

impl fmt::Display for AccountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountError::WeakPassword => write!(f, "password must have at least {MIN_PASSWORD_LEN} characters"),
            AccountError::InvalidName => f.write_str("invalid name: use 1-32 of a-z 0-9 _ . -"),
            AccountError::Io(e) => write!(f, "cannot reach the server: {e}"),
            AccountError::Refused(_, r) => f.write_str(r),
            AccountError::Crypto(e) => write!(f, "{e}"),
            AccountError::WrongCrsKey(fp) => write!(
                f,
                "the CRS's key fingerprint is {fp}, not the configured one: refusing to send credentials"
            ),
        }
    }
}

impl std::error::Error for AccountError {}

impl From<IoError> for AccountError {
    fn from(e: IoError) -> Self {
        AccountError::Io(e)
    }
}

impl From<crypto::Error> for AccountError {
    fn from(e: crypto::Error) -> Self {
        AccountError::Crypto(e)
    }
}

/// What the password yields for one salt and iteration count.
pub struct PasswordKeys {
    /// ClientKey, StoredKey, ServerKey.
    pub scram: scram::Keys,
    /// Wraps the private key.
    pub wrap: [u8; 32],
}

impl PasswordKeys {
    /// PBKDF2 then the SCRAM and wrap derivations.
    pub fn derive(
        password: &str,
        params: &KdfParams,
        policy: KdfPolicy,
    ) -> Result<PasswordKeys, crypto::Error> {
        let salted = crypto::derive_salted_password(password.as_bytes(), params, policy)?;
        Ok(PasswordKeys {
            scram: scram::Keys::from_salted_password(&salted),
            wrap: scram::wrap_key(&salted),
        })
    }

    /// The verifier the CRS stores.
    pub fn verifier(&self, params: &KdfParams) -> Verifier {
        Verifier {
            salt: params.salt.clone(),
            iterations: params.iterations,
            stored_key: self.scram.stored_key.to_vec(),
            server_key: self.scram.server_key.to_vec(),
        }
    }
}

/// Associated data binding a wrapped private key to its owner.
pub fn wrap_aad(user: &str) -> Vec<u8> {
    crate::proto::transcript("ims private key v1", &[user.as_bytes()])
}

/// Checks the name rules of PROTOCOL.md §4 and lower-cases it.
pub fn normalize_name(name: &str) -> Result<String, AccountError> {
    let ok = (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(AccountError::InvalidName)
    }
}

/// One request to a server and its reply, on a fresh connection. `addr`
/// may list several instances of the CRS (`A,B,C`): the first that accepts
/// the connection gets the request (never resent once sent, so a
/// registration cannot be made twice).
pub fn exchange(addr: &str, m: &Message, timeout: Duration) -> Result<Message, IoError> {
    let mut last = None;
    for one in addr.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        match crate::client::connect(one, timeout) {
            Ok(stream) => return crate::client::Conn::new(stream, timeout).call(m),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| IoError::Io(std::io::ErrorKind::NotFound.into())))
}

/// Everything `register` needs.
pub struct NewAccount<'a> {
    /// The CRS's address.
    pub crs: &'a str,
    /// The name asked for.
    pub user: &'a str,
    /// The password.
    pub password: &'a str,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// Whether fewer than the production minimum are allowed.
    pub policy: KdfPolicy,
    /// RSA key size.
    pub rsa_bits: u32,
    /// Expected CRS key fingerprint, if pinned.
    pub crs_fingerprint: Option<&'a str>,
    /// Initial profile.
    pub profile: Profile,
    /// Bound on each exchange.
    pub timeout: Duration,
}

/// Creates an account: keys made and wrapped here; the password never
/// leaves this function.
pub fn register(a: &NewAccount<'_>) -> Result<String, AccountError> {
    let user = normalize_name(a.user)?;
    if a.password.chars().count() < MIN_PASSWORD_LEN {
        return Err(AccountError::WeakPassword);
    }
    let reply = exchange(a.crs, &ClientRequest::CrsKey.to_message(), a.timeout)?;
    if !reply.is_success() {
        return Err(refused(&reply));
    }
    let crs_key = RsaPublicKey::from_der(&reply.body)?;
    let fingerprint = crs_key.fingerprint();
    if let Some(expected) = a.crs_fingerprint {
        if !expected.eq_ignore_ascii_case(&fingerprint) {
            return Err(AccountError::WrongCrsKey(fingerprint));
        }
    }
    let params = KdfParams::generate(a.iterations);
    let keys = PasswordKeys::derive(a.password, &params, a.policy)?;
    let private = RsaPrivateKey::generate(a.rsa_bits)?;
    let wrapped_key = scram::wrap(&keys.wrap, &private.to_der()?, &wrap_aad(&user))?;
    let registration = Registration {
        user: user.clone(),
        verifier: keys.verifier(&params),
        public_key: private.public_key().to_der()?,
        wrapped_key,
        profile: a.profile.clone(),
    };
    let plain = serde_json::to_vec(&registration).map_err(|_| AccountError::InvalidName)?;
    let k = crypto::random_array::<32>();
    // A one-time key, so the all-zero nonce is used exactly once.
    let sealed = crypto::aes_gcm_seal(&k, &[0; 12], REGISTER_AAD, &plain)?;
    let key = crs_key.encrypt_oaep(&k)?;
    let reply = exchange(
        a.crs,
        &ClientRequest::Register { key, sealed }.to_message(),
        a.timeout,
    )?;
    if reply.is_success() {
        Ok(user)
    } else {
        Err(refused(&reply))
    }
}

/// An error reply as an [`AccountError`].
pub fn refused(reply: &Message) -> AccountError {
    AccountError::Refused(
        reply.code().unwrap_or(0),
        reply.reason().unwrap_or("refused").to_owned(),
    )
}
