//! RSA keys: OAEP (SHA-256, MGF1-SHA-256) encryption and PSS (SHA-256,
//! salt = digest length) signatures; PKCS#8 / SubjectPublicKeyInfo encoding.

use super::hash::{hex, sha256};
use super::Error;
use openssl::encrypt::{Decrypter, Encrypter};
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPublic, Id, PKey, Private, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::{RsaPssSaltlen, Signer, Verifier};
use std::fmt;

/// Modulus size of keys created for real accounts.
pub const DEFAULT_RSA_BITS: u32 = 2048;
/// The smallest modulus generated or loaded. Below this RSA is breakable;
/// 1024 is allowed only so tests can generate keys quickly; accounts use
/// [`DEFAULT_RSA_BITS`].
pub const MIN_RSA_BITS: u32 = 1024;

/// An RSA private key. Cheap to clone (reference counted), shareable
/// between threads, and its `Debug` shows only the public fingerprint.
#[derive(Clone)]
pub struct RsaPrivateKey(PKey<Private>);

/// An RSA public key. Cheap to clone, shareable between threads.
#[derive(Clone)]
pub struct RsaPublicKey(PKey<Public>);

fn check_rsa<T: HasPublic>(key: &PKey<T>) -> Result<(), Error> {
    if key.id() != Id::RSA {
        return Err(Error::BadKey);
    }
    if key.bits() < MIN_RSA_BITS {
        return Err(Error::WeakParameters);
    }
    Ok(())
}

impl RsaPrivateKey {
    /// A fresh key with a `bits`-bit modulus and public exponent 65537.
    /// [`Error::WeakParameters`] below [`MIN_RSA_BITS`].
    pub fn generate(bits: u32) -> Result<RsaPrivateKey, Error> {
        if bits < MIN_RSA_BITS {
            return Err(Error::WeakParameters);
        }
        Ok(RsaPrivateKey(PKey::from_rsa(Rsa::generate(bits)?)?))
    }

    /// Unencrypted PKCS#8 DER. This is the secret itself: wrap it (see
    /// [`super::scram::wrap`]) before it leaves memory.
    pub fn to_der(&self) -> Result<Vec<u8>, Error> {
        Ok(self.0.private_key_to_pkcs8()?)
    }

    /// Parses unencrypted PKCS#8 DER and checks the key's consistency.
    pub fn from_der(der: &[u8]) -> Result<RsaPrivateKey, Error> {
        let key = PKey::private_key_from_pkcs8(der).map_err(|_| Error::BadKey)?;
        Self::checked(key)
    }

    /// Unencrypted PKCS#8 PEM (`BEGIN PRIVATE KEY`).
    pub fn to_pem(&self) -> Result<String, Error> {
        let pem = self.0.private_key_to_pem_pkcs8()?;
        String::from_utf8(pem).map_err(|_| Error::OpenSsl("PEM is not UTF-8".into()))
    }

    /// Parses an unencrypted private-key PEM. An encrypted PEM is refused
    /// ([`Error::BadKey`]) rather than prompting on the terminal.
    pub fn from_pem(pem: &str) -> Result<RsaPrivateKey, Error> {
        // An explicit (empty) passphrase stops OpenSSL's default callback
        // from reading one from the tty.
        let key = PKey::private_key_from_pem_passphrase(pem.as_bytes(), b"")
            .map_err(|_| Error::BadKey)?;
        Self::checked(key)
    }

    fn checked(key: PKey<Private>) -> Result<RsaPrivateKey, Error> {
        check_rsa(&key)?;
        // Rejects inconsistent CRT parameters, which would leak the key
        // through faulty signatures.
        let consistent = key.rsa().and_then(|r| r.check_key()).unwrap_or(false);
        if !consistent {
            return Err(Error::BadKey);
        }
        Ok(RsaPrivateKey(key))
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> u32 {
        self.0.bits()
    }

    /// The matching public key.
    pub fn public_key(&self) -> RsaPublicKey {
        let der = self
            .0
            .public_key_to_der()
            .expect("OpenSSL failed to encode an RSA public key");
        let key = PKey::public_key_from_der(&der).expect("OpenSSL failed to re-parse its own DER");
        RsaPublicKey(key)
    }

    /// Decrypts an RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) ciphertext.
    /// [`Error::Decrypt`] on any failure, so callers cannot tell padding
    /// errors apart from other ones.
    pub fn decrypt_oaep(&self, ct: &[u8]) -> Result<Vec<u8>, Error> {
        let run = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
            let mut d = Decrypter::new(&self.0)?;
            d.set_rsa_padding(Padding::PKCS1_OAEP)?;
            d.set_rsa_oaep_md(MessageDigest::sha256())?;
            d.set_rsa_mgf1_md(MessageDigest::sha256())?;
            let mut out = vec![0u8; d.decrypt_len(ct)?];
            let n = d.decrypt(ct, &mut out)?;
            out.truncate(n);
            Ok(out)
        };
        run().map_err(|_| Error::Decrypt)
    }

    /// RSA-PSS signature (SHA-256, MGF1-SHA-256, salt length 32) of `msg`.
    pub fn sign_pss(&self, msg: &[u8]) -> Result<Vec<u8>, Error> {
        let mut s = Signer::new(MessageDigest::sha256(), &self.0)?;
        s.set_rsa_padding(Padding::PKCS1_PSS)?;
        s.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
        s.set_rsa_mgf1_md(MessageDigest::sha256())?;
        Ok(s.sign_oneshot_to_vec(msg)?)
    }
}

impl fmt::Debug for RsaPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaPrivateKey")
            .field("bits", &self.bits())
            .field("public", &self.public_key().fingerprint())
            .finish_non_exhaustive()
    }
}

impl RsaPublicKey {
    /// SubjectPublicKeyInfo DER: the canonical form that is fingerprinted.
    pub fn to_der(&self) -> Result<Vec<u8>, Error> {
        Ok(self.0.public_key_to_der()?)
    }

    /// Parses SubjectPublicKeyInfo DER holding an RSA key of at least
    /// [`MIN_RSA_BITS`].
    pub fn from_der(der: &[u8]) -> Result<RsaPublicKey, Error> {
        let key = PKey::public_key_from_der(der).map_err(|_| Error::BadKey)?;
        check_rsa(&key)?;
        Ok(RsaPublicKey(key))
    }

    /// SubjectPublicKeyInfo PEM (`BEGIN PUBLIC KEY`).
    pub fn to_pem(&self) -> Result<String, Error> {
        let pem = self.0.public_key_to_pem()?;
        String::from_utf8(pem).map_err(|_| Error::OpenSsl("PEM is not UTF-8".into()))
    }

    /// Parses a `BEGIN PUBLIC KEY` PEM.
    pub fn from_pem(pem: &str) -> Result<RsaPublicKey, Error> {
        let key = PKey::public_key_from_pem(pem.as_bytes()).map_err(|_| Error::BadKey)?;
        check_rsa(&key)?;
        Ok(RsaPublicKey(key))
    }

    /// Modulus size in bits.
    pub fn bits(&self) -> u32 {
        self.0.bits()
    }

    /// Lower-case hex SHA-256 of the DER encoding, for people to compare.
    pub fn fingerprint(&self) -> String {
        match self.to_der() {
            Ok(der) => hex(&sha256(&der)),
            Err(_) => String::from("?"),
        }
    }

    /// RSA-OAEP (SHA-256, MGF1-SHA-256, empty label) encryption; at most
    /// `bits/8 - 66` bytes of plaintext (190 for 2048-bit keys).
    pub fn encrypt_oaep(&self, pt: &[u8]) -> Result<Vec<u8>, Error> {
        let mut e = Encrypter::new(&self.0)?;
        e.set_rsa_padding(Padding::PKCS1_OAEP)?;
        e.set_rsa_oaep_md(MessageDigest::sha256())?;
        e.set_rsa_mgf1_md(MessageDigest::sha256())?;
        let mut out = vec![0u8; e.encrypt_len(pt)?];
        let n = e.encrypt(pt, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Verifies an RSA-PSS signature made by [`RsaPrivateKey::sign_pss`];
    /// [`Error::BadSignature`] for any mismatch or malformed signature.
    pub fn verify_pss(&self, msg: &[u8], sig: &[u8]) -> Result<(), Error> {
        let run = || -> Result<bool, openssl::error::ErrorStack> {
            let mut v = Verifier::new(MessageDigest::sha256(), &self.0)?;
            v.set_rsa_padding(Padding::PKCS1_PSS)?;
            v.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
            v.set_rsa_mgf1_md(MessageDigest::sha256())?;
            v.verify_oneshot(sig, msg)
        };
        match run() {
            Ok(true) => Ok(()),
            _ => Err(Error::BadSignature),
        }
    }
}

impl PartialEq for RsaPublicKey {
    fn eq(&self, other: &RsaPublicKey) -> bool {
        self.0.public_eq(&other.0)
    }
}

impl Eq for RsaPublicKey {}

impl fmt::Debug for RsaPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaPublicKey")
            .field("bits", &self.bits())
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::OnceLock;

    /// Two small keys shared by the tests where size does not matter.
    pub(crate) fn keys() -> &'static (RsaPrivateKey, RsaPrivateKey) {
        static KEYS: OnceLock<(RsaPrivateKey, RsaPrivateKey)> = OnceLock::new();
        KEYS.get_or_init(|| {
            (
                RsaPrivateKey::generate(MIN_RSA_BITS).unwrap(),
                RsaPrivateKey::generate(MIN_RSA_BITS).unwrap(),
            )
        })
    }

    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}

    #[test]
    fn keys_are_send_sync_clone() {
        assert_send_sync_clone::<RsaPrivateKey>();
        assert_send_sync_clone::<RsaPublicKey>();
    }

    #[test]
    fn oaep_round_trip_and_wrong_key() {
        let (a, b) = keys();
        let ct = a.public_key().encrypt_oaep(b"session secret").unwrap();
        assert_eq!(ct.len(), 128);
        assert_eq!(a.decrypt_oaep(&ct).unwrap(), b"session secret");
        assert_eq!(b.decrypt_oaep(&ct), Err(Error::Decrypt));
        let mut bad = ct.clone();
        bad[10] ^= 1;
        assert_eq!(a.decrypt_oaep(&bad), Err(Error::Decrypt));
        assert_eq!(a.decrypt_oaep(b"short"), Err(Error::Decrypt));
        // Randomised padding: the same plaintext never encrypts the same way.
        assert_ne!(ct, a.public_key().encrypt_oaep(b"session secret").unwrap());
        // 1024-bit OAEP-SHA256 holds at most 128 - 66 = 62 bytes.
        assert!(a.public_key().encrypt_oaep(&[0; 62]).is_ok());
        assert!(a.public_key().encrypt_oaep(&[0; 63]).is_err());
    }

    #[test]
    fn pss_sign_verify_and_flipped_bit() {
        let (a, b) = keys();
        let sig = a.sign_pss(b"message").unwrap();
        let pk = a.public_key();
        pk.verify_pss(b"message", &sig).unwrap();
        assert_eq!(pk.verify_pss(b"messagE", &sig), Err(Error::BadSignature));
        for i in [0, sig.len() / 2, sig.len() - 1] {
            let mut bad = sig.clone();
            bad[i] ^= 0x01;
            assert_eq!(pk.verify_pss(b"message", &bad), Err(Error::BadSignature));
        }
        assert_eq!(
            b.public_key().verify_pss(b"message", &sig),
            Err(Error::BadSignature)
        );
        assert_eq!(pk.verify_pss(b"message", b""), Err(Error::BadSignature));
    }

    #[test]
    fn encodings_round_trip() {
        let (a, _) = keys();
        let der = a.to_der().unwrap();
        let a2 = RsaPrivateKey::from_der(&der).unwrap();
        assert_eq!(a2.public_key(), a.public_key());
        let pem = a.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(
            RsaPrivateKey::from_pem(&pem).unwrap().public_key(),
            a.public_key()
        );

        let pk = a.public_key();
        let pk_der = pk.to_der().unwrap();
        assert_eq!(RsaPublicKey::from_der(&pk_der).unwrap(), pk);
        let pk_pem = pk.to_pem().unwrap();
        assert!(pk_pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert_eq!(RsaPublicKey::from_pem(&pk_pem).unwrap(), pk);
        assert_eq!(pk.fingerprint(), hex(&sha256(&pk_der)));
        assert_eq!(pk.fingerprint().len(), 64);

        assert_eq!(RsaPrivateKey::from_der(b"junk").unwrap_err(), Error::BadKey);
        assert_eq!(RsaPublicKey::from_der(&der).unwrap_err(), Error::BadKey);
        assert_eq!(RsaPrivateKey::from_pem("junk").unwrap_err(), Error::BadKey);
        assert_eq!(RsaPublicKey::from_pem("junk").unwrap_err(), Error::BadKey);
    }

    #[test]
    fn debug_hides_private_material() {
        let (a, _) = keys();
        let shown = format!("{a:?}");
        assert!(shown.contains(&a.public_key().fingerprint()));
        let der = a.to_der().unwrap();
        assert!(!shown.contains(&hex(&der[der.len() - 16..])));
        assert!(!shown.contains("BEGIN"));
    }

    #[test]
    fn refuses_small_and_non_rsa_keys() {
        assert_eq!(
            RsaPrivateKey::generate(512).unwrap_err(),
            Error::WeakParameters
        );
        let small = PKey::from_rsa(Rsa::generate(512).unwrap()).unwrap();
        let der = small.private_key_to_pkcs8().unwrap();
        assert_eq!(
            RsaPrivateKey::from_der(&der).unwrap_err(),
            Error::WeakParameters
        );
        let ec = PKey::ec_gen("prime256v1").unwrap();
        let der = ec.private_key_to_pkcs8().unwrap();
        assert_eq!(RsaPrivateKey::from_der(&der).unwrap_err(), Error::BadKey);
    }

    #[test]
    fn default_size_key() {
        let k = RsaPrivateKey::generate(DEFAULT_RSA_BITS).unwrap();
        assert_eq!(k.bits(), 2048);
        assert_eq!(k.public_key().bits(), 2048);
        let sig = k.sign_pss(b"m").unwrap();
        assert_eq!(sig.len(), 256);
        k.public_key().verify_pss(b"m", &sig).unwrap();
    }
}
