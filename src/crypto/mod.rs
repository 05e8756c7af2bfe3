//! Cryptographic primitives: the only module that touches OpenSSL.
//!
//! Thin wrappers with names that say what they do, so that the rest of the
//! crate never chooses a padding, a digest or a nonce size by itself:
//! - randomness from the OS CSPRNG ([`random_bytes`], [`random_array`]);
//! - RSA keys with OAEP encryption and PSS signatures ([`RsaPrivateKey`],
//!   [`RsaPublicKey`]);
//! - ephemeral X25519 agreement ([`EphemeralKey`]) and self-wiping
//!   [`Secret`]s;
//! - AES-256-GCM ([`aes_gcm_seal`], [`aes_gcm_open`] and in-place variants);
//! - SHA-256, HMAC-SHA256, HKDF-SHA256 and a constant-time compare;
//! - PBKDF2 password keys under a [`KdfPolicy`];
//! - the SCRAM-SHA-256 arithmetic and private-key wrapping ([`scram`]);
//! - base64 for header values ([`b64_encode`], [`b64_decode`]);
//! - sealed offline messages ([`offline`]: RSA-OAEP-wrapped AES-256-GCM,
//!   signed with RSA-PSS).
//!
//! Nothing here logs, and no type that holds a secret prints it in `Debug`.

mod aead;
mod error;
mod hash;
mod kdf;
pub mod offline;
mod rsa;
pub mod scram;
mod x25519;

pub use aead::{
    aes_gcm_open, aes_gcm_open_in_place, aes_gcm_seal, aes_gcm_seal_in_place, GcmKey, AES_KEY_LEN,
    GCM_NONCE_LEN, GCM_TAG_LEN,
};
pub use error::Error;
pub use hash::{ct_eq, hkdf_sha256, hkdf_sha256_32, hmac_sha256, sha256, Sha256};
pub use kdf::{
    derive_salted_password, KdfParams, KdfPolicy, PBKDF2_MAX_ITERATIONS, PBKDF2_MIN_ITERATIONS,
    SALT_LEN,
};
pub use rsa::{RsaPrivateKey, RsaPublicKey, DEFAULT_RSA_BITS, MIN_RSA_BITS};
pub use x25519::{EphemeralKey, Secret, X25519_LEN};

/// Fills `buf` from OpenSSL's CSPRNG (seeded by the operating system).
///
/// # Panics
/// If the generator fails. Continuing with predictable bytes (nonces, salts,
/// keys) would be worse than stopping, so there is no error to ignore.
pub fn random_bytes(buf: &mut [u8]) {
    openssl::rand::rand_bytes(buf).expect("the OS-seeded CSPRNG failed");
}

/// `N` bytes from the CSPRNG; see [`random_bytes`] (same panic).
pub fn random_array<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    random_bytes(&mut out);
    out
}

/// Standard base64 (RFC 4648 alphabet, `=` padding, no line breaks).
pub fn b64_encode(data: &[u8]) -> String {
    openssl::base64::encode_block(data)
}

/// The 6-bit value of a character of the standard base64 alphabet (0 for
/// any other; callers check the alphabet first).
fn b64_value(c: u8) -> u8 {
    match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => 0,
    }
}

/// Decodes standard padded base64. Anything else (whitespace, a wrong
/// length, a foreign character, misplaced `=`) is
/// [`Error::InvalidInput`]: OpenSSL's decoder is lenient about whitespace,
/// so the strict shape is checked here before it runs.
pub fn b64_decode(text: &str) -> Result<Vec<u8>, Error> {
    const BAD: Error = Error::InvalidInput("invalid base64");
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 || bytes.len() > (i32::MAX as usize) / 2 {
        return Err(BAD);
    }
    let pad = bytes.iter().rev().take_while(|&&b| b == b'=').count();
    if pad > 2 {
        return Err(BAD);
    }
    let body = &bytes[..bytes.len() - pad];
    if !body
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return Err(BAD);
    }
    // EVP_DecodeBlock ignores the last group's stray bits; requiring them
    // to be zero (the canonical encoding) makes every byte string have one
    // spelling. With one `=` the last character carries 2 stray bits, with
    // two, 4.
    let stray_mask = match pad {
        1 => 0b11,
        2 => 0b1111,
        _ => 0,
    };
    if let Some(&last) = body.last() {
        if b64_value(last) & stray_mask != 0 {
            return Err(BAD);
        }
    }
    openssl::base64::decode_block(text).map_err(|_| BAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_is_not_constant() {
        let a: [u8; 32] = random_array();
        let b: [u8; 32] = random_array();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 32]);
    }

    #[test]
    fn base64_round_trip() {
        for len in 0..20 {
            let data: Vec<u8> = (0..len as u8).map(|i| i.wrapping_mul(37)).collect();
            let text = b64_encode(&data);
            assert_eq!(b64_decode(&text).unwrap(), data);
        }
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64_decode("Zm9vYg==").unwrap(), b"foob");
    }

    #[test]
    fn base64_rejects_invalid_input() {
        for bad in [
            "Zm9", "Zm9vY", "Zm9v\n", " Zm9v", "Zm9v ", "Zm-v", "Zm_v", "Z===", "Zm=v", "====",
            "Zm9vYh==", // non-zero stray bits: not the canonical spelling of "foob"
            "é123",
        ] {
            assert!(
                matches!(b64_decode(bad), Err(Error::InvalidInput(_))),
                "{bad:?} accepted"
            );
        }
        assert_eq!(b64_decode("").unwrap(), b"");
    }

    #[test]
    fn base64_has_one_spelling_per_byte_string() {
        // Every change of the last character before the padding decodes
        // to the same bytes in OpenSSL (stray bits) or to other bytes;
        // only the canonical spelling is accepted for these bytes.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for len in 0..40usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = b64_encode(&data);
            assert_eq!(b64_decode(&text).unwrap(), data);
            let pad = text.bytes().rev().take_while(|&b| b == b'=').count();
            let Some(at) = text.len().checked_sub(pad + 1) else {
                continue;
            };
            for &c in ALPHABET {
                let mut other = text.clone().into_bytes();
                other[at] = c;
                let other = String::from_utf8(other).unwrap();
                if other == text {
                    continue;
                }
                if let Ok(decoded) = b64_decode(&other) {
                    assert_ne!(decoded, data, "{other:?} also spells {text:?}");
                    assert_eq!(b64_encode(&decoded), other, "{other:?} is not canonical");
                }
            }
        }
    }
}
