//! SCRAM-SHA-256 arithmetic (RFC 5802 section 3, RFC 7677) and the
//! password-derived wrapping of a client's private key.
//!
//! Only the math lives here; message syntax and the stored verifier belong
//! to the protocol and store layers. Starting from the SaltedPassword (see
//! [`super::derive_salted_password`]):
//!
//! ```text
//! ClientKey       = HMAC(SaltedPassword, "Client Key")
//! StoredKey       = SHA256(ClientKey)
//! ServerKey       = HMAC(SaltedPassword, "Server Key")
//! ClientSignature = HMAC(StoredKey, AuthMessage)
//! ClientProof     = ClientKey XOR ClientSignature
//! ServerSignature = HMAC(ServerKey, AuthMessage)
//! ```
//!
//! The wrap key is derived from the SaltedPassword too, but by HKDF with
//! its own label, so it is independent of everything the server stores
//! (StoredKey, ServerKey): the server can keep the wrapped private key
//! without being able to open it.

use super::aead::{aes_gcm_open, aes_gcm_seal, GCM_NONCE_LEN, GCM_TAG_LEN};
use super::hash::{ct_eq, hkdf_sha256_32, hmac_sha256, sha256};
use super::{random_array, Error};
use std::fmt;

/// HKDF info label of [`wrap_key`].
const WRAP_INFO: &[u8] = b"ims private-key wrap v1";

/// The three keys SCRAM derives from a SaltedPassword. The client keeps
/// all of them for one login; the server stores only `stored_key` and
/// `server_key`.
///
/// No `PartialEq`: compare secrets with [`super::ct_eq`] only.
#[derive(Clone)]
pub struct Keys {
    /// `HMAC(SaltedPassword, "Client Key")`; secret, never stored.
    pub client_key: [u8; 32],
    /// `SHA256(ClientKey)`; what the server verifies proofs against.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`; proves the server to the client.
    pub server_key: [u8; 32],
}

impl Keys {
    /// Derives the three keys from a SaltedPassword.
    pub fn from_salted_password(salted_password: &[u8; 32]) -> Keys {
        let client_key = client_key(salted_password);
        Keys {
            client_key,
            stored_key: stored_key(&client_key),
            server_key: server_key(salted_password),
        }
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("scram::Keys { .. }")
    }
}

/// `HMAC(SaltedPassword, "Client Key")`.
pub fn client_key(salted_password: &[u8; 32]) -> [u8; 32] {
    hmac_sha256(salted_password, b"Client Key")
}

/// `SHA256(ClientKey)`.
pub fn stored_key(client_key: &[u8; 32]) -> [u8; 32] {
    sha256(client_key)
}

/// `HMAC(SaltedPassword, "Server Key")`.
pub fn server_key(salted_password: &[u8; 32]) -> [u8; 32] {
    hmac_sha256(salted_password, b"Server Key")
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// The client's proof: `ClientKey XOR HMAC(StoredKey, AuthMessage)`.
pub fn client_proof(client_key: &[u8; 32], stored_key: &[u8; 32], auth_message: &[u8]) -> [u8; 32] {
    xor(client_key, &hmac_sha256(stored_key, auth_message))
}

/// The server's check of a client proof. Recovers
/// `ClientKey = proof XOR HMAC(StoredKey, AuthMessage)` and returns it
/// when `SHA256(ClientKey)` equals `stored_key` (compared in constant
/// time); `None` otherwise. A proof of the wrong length is `None`.
pub fn verify_proof(stored_key: &[u8; 32], auth_message: &[u8], proof: &[u8]) -> Option<[u8; 32]> {
    let proof: &[u8; 32] = proof.try_into().ok()?;
    let client_key = xor(proof, &hmac_sha256(stored_key, auth_message));
    ct_eq(&sha256(&client_key), stored_key).then_some(client_key)
}

/// `HMAC(ServerKey, AuthMessage)`: sent by the server, checked by the
/// client with [`super::ct_eq`].
pub fn server_signature(server_key: &[u8; 32], auth_message: &[u8]) -> [u8; 32] {
    hmac_sha256(server_key, auth_message)
}

/// The key a client wraps its private key with:
/// `HKDF-SHA256(ikm = SaltedPassword, no salt, info = "ims private-key wrap v1")`.
pub fn wrap_key(salted_password: &[u8; 32]) -> [u8; 32] {
    hkdf_sha256_32(salted_password, b"", WRAP_INFO)
}

/// Encrypts `plaintext` under `key` with a fresh random nonce:
/// returns `nonce (12) || ciphertext || tag (16)`. `aad` binds context
/// (e.g. the user name) that must match at [`unwrap`].
pub fn wrap(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
    // A random 96-bit nonce is safe here: one key wraps a handful of
    // blobs over its life, far from the 2^32 birthday bound.
    let nonce: [u8; GCM_NONCE_LEN] = random_array();
    let sealed = aes_gcm_seal(key, &nonce, aad, plaintext)?;
    let mut out = Vec::with_capacity(GCM_NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens what [`wrap`] produced. [`Error::Decrypt`] for a wrong key
/// (i.e. a wrong password), wrong `aad` or altered bytes;
/// [`Error::InvalidInput`] if it is too short to be a wrapped blob.
pub fn unwrap(key: &[u8; 32], wrapped: &[u8], aad: &[u8]) -> Result<Vec<u8>, Error> {
    if wrapped.len() < GCM_NONCE_LEN + GCM_TAG_LEN {
        return Err(Error::InvalidInput("wrapped key too short"));
    }
    let (nonce, sealed) = wrapped.split_at(GCM_NONCE_LEN);
    let nonce: &[u8; GCM_NONCE_LEN] = nonce.try_into().expect("split at the nonce length");
    aes_gcm_open(key, nonce, aad, sealed)
}

#[cfg(test)]
mod tests {
    use super::super::{b64_decode, b64_encode, derive_salted_password, KdfParams, KdfPolicy};
    use super::*;

    const CLIENT_FIRST_BARE: &str = "n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL_NO_PROOF: &str =
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";

    fn rfc7677() -> (Keys, String) {
        let params = KdfParams {
            salt: b64_decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap(),
            iterations: 4096,
        };
        let salted = derive_salted_password(b"pencil", &params, KdfPolicy::Insecure).unwrap();
        let auth = format!("{CLIENT_FIRST_BARE},{SERVER_FIRST},{CLIENT_FINAL_NO_PROOF}");
        (Keys::from_salted_password(&salted), auth)
    }

    #[test]
    fn rfc7677_example() {
        let (keys, auth) = rfc7677();
        let proof = client_proof(&keys.client_key, &keys.stored_key, auth.as_bytes());
        assert_eq!(
            b64_encode(&proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let sig = server_signature(&keys.server_key, auth.as_bytes());
        assert_eq!(
            b64_encode(&sig),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );

        // The server, holding only StoredKey, accepts the proof and
        // recovers the ClientKey.
        let recovered = verify_proof(&keys.stored_key, auth.as_bytes(), &proof).unwrap();
        assert_eq!(recovered, keys.client_key);
    }

    #[test]
    fn verify_proof_rejects_wrong_proofs() {
        let (keys, auth) = rfc7677();
        let proof = client_proof(&keys.client_key, &keys.stored_key, auth.as_bytes());
        for i in 0..32 {
            let mut bad = proof;
            bad[i] ^= 1;
            assert_eq!(verify_proof(&keys.stored_key, auth.as_bytes(), &bad), None);
        }
        // Same proof, different conversation (e.g. a replayed proof).
        assert_eq!(verify_proof(&keys.stored_key, b"other", &proof), None);
        assert_eq!(
            verify_proof(&keys.stored_key, auth.as_bytes(), &proof[..31]),
            None
        );
        assert_eq!(verify_proof(&keys.stored_key, auth.as_bytes(), b""), None);
    }

    #[test]
    fn wrap_unwrap_and_wrong_key() {
        let (keys, _) = rfc7677();
        let salted = [3u8; 32];
        let key = wrap_key(&salted);
        assert_ne!(key, salted);
        assert_ne!(key, keys.client_key);
        let wrapped = wrap(&key, b"PKCS#8 bytes", b"user").unwrap();
        assert_eq!(wrapped.len(), 12 + 12 + 16);
        assert_eq!(unwrap(&key, &wrapped, b"user").unwrap(), b"PKCS#8 bytes");
        // Fresh nonce each time.
        assert_ne!(wrapped, wrap(&key, b"PKCS#8 bytes", b"user").unwrap());

        let wrong = wrap_key(&[4u8; 32]);
        assert_eq!(unwrap(&wrong, &wrapped, b"user"), Err(Error::Decrypt));
        assert_eq!(unwrap(&key, &wrapped, b"mallory"), Err(Error::Decrypt));
        let mut bad = wrapped.clone();
        bad[0] ^= 1; // the nonce is authenticated too
        assert_eq!(unwrap(&key, &bad, b"user"), Err(Error::Decrypt));
        assert!(matches!(
            unwrap(&key, &wrapped[..27], b"user"),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn debug_hides_keys() {
        let (keys, _) = rfc7677();
        assert_eq!(format!("{keys:?}"), "scram::Keys { .. }");
    }
}
