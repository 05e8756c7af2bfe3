//! Ephemeral X25519 key agreement (RFC 7748) and secrets that are wiped
//! when dropped: what gives conversations forward secrecy.
//!
//! An [`EphemeralKey`] is made for one exchange and consumed by
//! [`EphemeralKey::agree`], so the type system keeps it from being used
//! twice or kept past the exchange; OpenSSL frees (and clears) the private
//! key when the `PKey` drops. Shared secrets and everything derived from
//! them travel as [`Secret`], which zeroes its bytes on drop.

use std::fmt;

use openssl::derive::Deriver;
use openssl::pkey::{Id, PKey, Private};

use super::Error;

/// Bytes of an X25519 public key (a "share") and of the shared secret.
pub const X25519_LEN: usize = 32;

/// 32 secret bytes, zeroed when dropped. Not `Clone` on purpose: every
/// copy of a session key is one more place it could outlive the session.
pub struct Secret([u8; 32]);

impl Secret {
    /// Wraps `bytes` (the caller's copy should be the only other one, and
    /// short-lived).
    pub fn new(bytes: [u8; 32]) -> Secret {
        Secret(bytes)
    }

    /// The bytes, for a KDF or a MAC.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort without unsafe code: the write goes through
        // black_box, so the optimiser cannot prove it dead and drop it.
        self.0 = [0u8; 32];
        std::hint::black_box(&mut self.0);
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A fresh X25519 private key for exactly one agreement.
pub struct EphemeralKey {
    key: PKey<Private>,
    public: [u8; X25519_LEN],
}

impl EphemeralKey {
    /// A new key pair from OpenSSL's CSPRNG.
    pub fn generate() -> Result<EphemeralKey, Error> {
        let key = PKey::generate_x25519()?;
        let public = key
            .raw_public_key()?
            .try_into()
            .map_err(|_| Error::BadKey)?;
        Ok(EphemeralKey { key, public })
    }

    /// The public half, sent to the other party.
    pub fn public(&self) -> [u8; X25519_LEN] {
        self.public
    }

    /// X25519 with the peer's public key; consumes (and so erases) the
    /// private key. A peer key of the wrong length or one that yields the
    /// all-zero secret (a low-order point: the peer would control the
    /// result) is [`Error::BadKey`].
    pub fn agree(self, peer_public: &[u8]) -> Result<Secret, Error> {
        if peer_public.len() != X25519_LEN {
            return Err(Error::BadKey);
        }
        let peer =
            PKey::public_key_from_raw_bytes(peer_public, Id::X25519).map_err(|_| Error::BadKey)?;
        let mut deriver = Deriver::new(&self.key)?;
        deriver.set_peer(&peer).map_err(|_| Error::BadKey)?;
        let mut out = [0u8; X25519_LEN];
        // OpenSSL itself refuses an all-zero result; checked again below.
        let n = deriver.derive(&mut out).map_err(|_| Error::BadKey)?;
        let secret = Secret::new(out);
        out = [0u8; X25519_LEN];
        std::hint::black_box(&mut out);
        if n != X25519_LEN || super::ct_eq(secret.expose(), &[0u8; X25519_LEN]) {
            return Err(Error::BadKey);
        }
        Ok(secret)
    }
}

impl fmt::Debug for EphemeralKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EphemeralKey")
            .field("public", &super::hash::hex(&self.public))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_agree_and_keys_are_fresh() {
        let a = EphemeralKey::generate().unwrap();
        let b = EphemeralKey::generate().unwrap();
        assert_ne!(a.public(), b.public());
        let (pa, pb) = (a.public(), b.public());
        let sa = a.agree(&pb).unwrap();
        let sb = b.agree(&pa).unwrap();
        assert_eq!(sa.expose(), sb.expose());
        assert_ne!(sa.expose(), &[0u8; 32]);
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn rfc7748_vector() {
        // RFC 7748 §6.1: Alice's private key, Bob's public key, the secret.
        let alice = unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let bob_pub = unhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let key = PKey::private_key_from_raw_bytes(&alice, Id::X25519).unwrap();
        let public = key.raw_public_key().unwrap().try_into().unwrap();
        let s = EphemeralKey { key, public }.agree(&bob_pub).unwrap();
        assert_eq!(
            super::super::hash::hex(s.expose()),
            "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
        );
    }

    #[test]
    fn bad_peer_keys_are_refused() {
        for bad in [vec![0u8; 31], vec![0u8; 32], {
            // A low-order point (order 8): the result would be all zero.
            let mut p = vec![0u8; 32];
            p[0] = 1;
            p
        }] {
            let k = EphemeralKey::generate().unwrap();
            assert_eq!(k.agree(&bad).unwrap_err(), Error::BadKey, "{bad:?}");
        }
    }
}
