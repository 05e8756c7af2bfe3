//! The password side of an account, all of it on the client: deriving the
//! SCRAM keys and the wrap key from the password, making the key pair, and
//! registering with the CRS (PROTOCOL.md §4).

use std::time::Duration;

pub use super::error::{AccountError, ClientError, PeerStep};

use crate::crypto::{self, scram, KdfParams, KdfPolicy, RsaPrivateKey, RsaPublicKey};
use crate::link::Conn;
use crate::proto::crs::{
    ClientReply, ClientRequest, Profile, Registration, Verifier, REGISTER_AAD,
};

/// Fewest characters of a password.
pub const MIN_PASSWORD_LEN: usize = 8;

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
    let der = match Conn::connect(a.crs, a.timeout)?.call(&ClientRequest::CrsKey)? {
        ClientReply::CrsKey { der, .. } => der,
        _ => return Err(ClientError::UnexpectedReply("the CRS sent no key".into())),
    };
    let crs_key = RsaPublicKey::from_der(&der)?;
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
    Conn::connect(a.crs, a.timeout)?.call(&ClientRequest::Register { key, sealed })?;
    Ok(user)
}
