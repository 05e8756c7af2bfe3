//! Password-derived keys: PBKDF2-HMAC-SHA256 under an explicit policy.

use super::Error;
use openssl::hash::MessageDigest;

/// The fewest PBKDF2-HMAC-SHA256 iterations [`KdfPolicy::Production`]
/// accepts (OWASP's 2023 recommendation for this hash).
pub const PBKDF2_MIN_ITERATIONS: u32 = 600_000;

/// The most PBKDF2 iterations a client derives for, and a server
/// accepts in a verifier: about 15 times the minimum, seconds of CPU on a
/// slow machine. The count comes in an unauthenticated login challenge; a
/// hostile or broken server sending four billion must not pin the client.
pub const PBKDF2_MAX_ITERATIONS: u32 = 10_000_000;

/// Salt length of [`KdfParams::generate`], and the minimum that
/// [`KdfPolicy::Production`] accepts.
pub const SALT_LEN: usize = 16;

/// The public inputs of a password derivation, stored next to the account
/// and sent to the client in the SCRAM server-first message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KdfParams {
    /// Per-account random salt.
    pub salt: Vec<u8>,
    /// PBKDF2 iteration count.
    pub iterations: u32,
}

impl KdfParams {
    /// Fresh parameters with a random [`SALT_LEN`]-byte salt. Whether the
    /// iteration count is acceptable is decided when deriving.
    pub fn generate(iterations: u32) -> KdfParams {
        KdfParams {
            salt: super::random_array::<SALT_LEN>().to_vec(),
            iterations,
        }
    }
}

/// How strict [`derive_salted_password`] is about its parameters. There is
/// no default: weakening must be spelled out at the call site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KdfPolicy {
    /// Real accounts: at least [`PBKDF2_MIN_ITERATIONS`] iterations and a
    /// salt of at least [`SALT_LEN`] bytes.
    Production,
    /// Tests, benchmarks and published test vectors only: any iteration
    /// count of at least 1 and any salt.
    Insecure,
}

/// SCRAM's SaltedPassword: PBKDF2-HMAC-SHA256(password, salt, iterations),
/// 32 bytes. [`Error::WeakParameters`] if `params` break `policy`.
///
/// Passwords are bytes; normalising them (SASLprep) is the caller's choice.
pub fn derive_salted_password(
    password: &[u8],
    params: &KdfParams,
    policy: KdfPolicy,
) -> Result<[u8; 32], Error> {
    let strong_enough = match policy {
        KdfPolicy::Production => {
            params.iterations >= PBKDF2_MIN_ITERATIONS && params.salt.len() >= SALT_LEN
        }
        KdfPolicy::Insecure => params.iterations >= 1,
    };
    if !strong_enough {
        return Err(Error::WeakParameters);
    }
    let mut out = [0u8; 32];
    openssl::pkcs5::pbkdf2_hmac(
        password,
        &params.salt,
        params.iterations as usize,
        MessageDigest::sha256(),
        &mut out,
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_makes_random_salts() {
        let a = KdfParams::generate(PBKDF2_MIN_ITERATIONS);
        let b = KdfParams::generate(PBKDF2_MIN_ITERATIONS);
        assert_eq!(a.salt.len(), SALT_LEN);
        assert_ne!(a.salt, b.salt);
        assert_eq!(a.iterations, PBKDF2_MIN_ITERATIONS);
    }

    #[test]
    fn production_refuses_weak_parameters() {
        let weak = KdfParams {
            salt: vec![1; SALT_LEN],
            iterations: PBKDF2_MIN_ITERATIONS - 1,
        };
        assert_eq!(
            derive_salted_password(b"pw", &weak, KdfPolicy::Production),
            Err(Error::WeakParameters)
        );
        let short_salt = KdfParams {
            salt: vec![1; SALT_LEN - 1],
            iterations: PBKDF2_MIN_ITERATIONS,
        };
        assert_eq!(
            derive_salted_password(b"pw", &short_salt, KdfPolicy::Production),
            Err(Error::WeakParameters)
        );
        let zero = KdfParams {
            salt: vec![1; SALT_LEN],
            iterations: 0,
        };
        assert_eq!(
            derive_salted_password(b"pw", &zero, KdfPolicy::Insecure),
            Err(Error::WeakParameters)
        );
        assert!(derive_salted_password(b"pw", &weak, KdfPolicy::Insecure).is_ok());
    }

    #[test]
    fn pbkdf2_known_answer() {
        // RFC 7914 section 11: PBKDF2-HMAC-SHA256("passwd", "salt", 1), first 32 bytes.
        let params = KdfParams {
            salt: b"salt".to_vec(),
            iterations: 1,
        };
        let out = derive_salted_password(b"passwd", &params, KdfPolicy::Insecure).unwrap();
        assert_eq!(
            super::super::hash::hex(&out),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }
}
