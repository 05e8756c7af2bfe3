//! The error of the crypto layer.

use std::fmt;

/// Why a cryptographic operation failed. Variants never carry secret
/// material, so they are safe to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// OpenSSL reported an unexpected failure (its error stack, as text).
    OpenSsl(String),
    /// Authenticated decryption failed: wrong key, wrong associated data or
    /// altered ciphertext. No plaintext is ever returned with this error.
    Decrypt,
    /// A signature did not verify against the message and public key.
    BadSignature,
    /// Key bytes could not be parsed, are not an RSA key, or are inconsistent.
    BadKey,
    /// Parameters below the policy minimum: PBKDF2 iterations or salt
    /// length under [`crate::crypto::KdfPolicy::Production`], or an RSA
    /// modulus shorter than [`crate::crypto::MIN_RSA_BITS`].
    WeakParameters,
    /// Input of the wrong shape: invalid base64, an impossible HKDF output
    /// length, a wrapped key too short to hold a nonce and a tag.
    InvalidInput(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::OpenSsl(e) => write!(f, "OpenSSL error: {e}"),
            Error::Decrypt => f.write_str("decryption failed: message not authentic"),
            Error::BadSignature => f.write_str("bad signature"),
            Error::BadKey => f.write_str("invalid or unsupported key"),
            Error::WeakParameters => f.write_str("parameters below the security minimum"),
            Error::InvalidInput(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for Error {}

impl From<openssl::error::ErrorStack> for Error {
    fn from(e: openssl::error::ErrorStack) -> Error {
        Error::OpenSsl(e.to_string())
    }
}
