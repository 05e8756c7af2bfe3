//! SHA-256, HMAC-SHA256, HKDF-SHA256 and constant-time comparison.

use super::Error;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    openssl::sha::sha256(data)
}

/// Streaming SHA-256, for files hashed chunk by chunk.
#[derive(Clone, Default)]
pub struct Sha256(openssl::sha::Sha256);

impl Sha256 {
    /// A hasher that has seen nothing yet.
    pub fn new() -> Sha256 {
        Sha256(openssl::sha::Sha256::new())
    }

    /// Feeds more data.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> [u8; 32] {
        self.0.finish()
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256 { .. }")
    }
}

/// SHA-256's block size: HMAC pads its key to it.
const BLOCK: usize = 64;

/// HMAC-SHA256 (RFC 2104) as a running computation, built on OpenSSL's
/// SHA-256 without the EVP layer: OpenSSL 3 fetches a provider, builds an
/// `EVP_PKEY` and scans parameters for every HMAC made through it, which
/// cost about ten times the hashing for the short inputs of a login or a
/// key derivation (seen in the login bench's profile). Its two hash
/// states are as secret as the key; they live only for one call, and, as
/// for the crate's other keys, are not wiped (OpenSSL's low-level context
/// has no wipe of its own, and this crate has no unsafe code).
struct Hmac {
    inner: openssl::sha::Sha256,
    outer: openssl::sha::Sha256,
}

impl Hmac {
    fn new(key: &[u8]) -> Hmac {
        // A key longer than a block is hashed first; shorter ones are
        // zero-padded (the empty key included).
        let mut block = [0u8; BLOCK];
        if key.len() > BLOCK {
            block[..32].copy_from_slice(&sha256(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let mut pad = [0u8; BLOCK];
        let mut inner = openssl::sha::Sha256::new();
        for (p, k) in pad.iter_mut().zip(&block) {
            *p = k ^ 0x36;
        }
        inner.update(&pad);
        let mut outer = openssl::sha::Sha256::new();
        for (p, k) in pad.iter_mut().zip(&block) {
            *p = k ^ 0x5c;
        }
        outer.update(&pad);
        // Best effort without unsafe code (as for the crate's other keys).
        block = [0u8; BLOCK];
        pad = [0u8; BLOCK];
        std::hint::black_box((&mut block, &mut pad));
        Hmac { inner, outer }
    }

    fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
    }

    fn finish(self) -> [u8; 32] {
        let Hmac { inner, mut outer } = self;
        outer.update(&inner.finish());
        outer.finish()
    }
}

/// HMAC-SHA256 of `data` under `key` (any length, empty included).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::new(key);
    mac.update(data);
    mac.finish()
}

/// HKDF-SHA256 (RFC 5869, extract then expand) filling `out`. An empty
/// `salt` means the RFC's default of 32 zero bytes.
///
/// [`Error::InvalidInput`] if `out` is empty or longer than 255 * 32 bytes.
pub fn hkdf_sha256(ikm: &[u8], salt: &[u8], info: &[u8], out: &mut [u8]) -> Result<(), Error> {
    if out.is_empty() || out.len() > 255 * 32 {
        return Err(Error::InvalidInput(
            "HKDF-SHA256 output must be 1..=8160 bytes",
        ));
    }
    // HMAC zero-pads its key, so the empty salt and the RFC's 32 zero
    // bytes are the same key.
    let mut prk = hmac_sha256(salt, ikm);
    let mut block = [0u8; 32];
    for (i, chunk) in out.chunks_mut(32).enumerate() {
        let mut mac = Hmac::new(&prk);
        if i > 0 {
            mac.update(&block);
        }
        mac.update(info);
        // At most 255 blocks (checked above), counted from 1.
        mac.update(&[u8::try_from(i + 1).unwrap_or(u8::MAX)]);
        block = mac.finish();
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
    prk = [0u8; 32];
    block = [0u8; 32];
    std::hint::black_box((&mut prk, &mut block));
    Ok(())
}

/// A 32-byte HKDF-SHA256 output, for fixed-size keys (e.g. AES-256 keys).
///
/// # Panics
/// Only if OpenSSL itself fails (allocation failure): the length is valid.
pub fn hkdf_sha256_32(ikm: &[u8], salt: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    hkdf_sha256(ikm, salt, info, &mut out).expect("OpenSSL HKDF-SHA256 failed");
    out
}

/// Whether `a == b`, in time that depends only on the lengths. Use it for
/// every comparison of a MAC, proof or key.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Lengths are public; memcmp::eq panics on a length mismatch.
    a.len() == b.len() && openssl::memcmp::eq(a, b)
}

/// Lower-case hex, for fingerprints and test vectors.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn sha256_known_answers() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let mut h = Sha256::new();
        h.update(b"a");
        h.update(b"");
        h.update(b"bc");
        assert_eq!(h.finish(), sha256(b"abc"));
    }

    #[test]
    fn hmac_rfc4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Empty keys are legal HMAC keys (RFC 4231 has none; this is the
        // well-known HMAC-SHA256("", "") value).
        assert_eq!(
            hex(&hmac_sha256(b"", b"")),
            "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad"
        );
        assert_eq!(hmac_sha256(b"", b"x"), hmac_sha256(&[0u8; 64], b"x"));
    }

    #[test]
    fn hmac_rfc4231_long_keys() {
        // Cases 6 and 7: a 131-byte key, hashed before use.
        let key = [0xaa; 131];
        assert_eq!(
            hex(&hmac_sha256(
                &key,
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &key,
                b"This is a test using a larger than block-size key and a larger than \
                  block-size data. The key needs to be hashed before being used by the \
                  HMAC algorithm."
            )),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"
        );
    }

    #[test]
    fn hmac_and_hkdf_match_openssl_evp_for_all_short_lengths() {
        use openssl::hash::MessageDigest;
        use openssl::md::Md;
        use openssl::pkey::{Id, PKey};
        use openssl::pkey_ctx::PkeyCtx;
        use openssl::sign::Signer;
        for key_len in (1..=140).step_by(3) {
            let key: Vec<u8> = (0..key_len).map(|i| (i * 7 + 1) as u8).collect();
            for data_len in [0usize, 1, 55, 56, 63, 64, 65, 119, 120, 200] {
                let data: Vec<u8> = (0..data_len).map(|i| (i * 13) as u8).collect();
                let pkey = PKey::hmac(&key).unwrap();
                let mut signer = Signer::new(MessageDigest::sha256(), &pkey).unwrap();
                signer.update(&data).unwrap();
                assert_eq!(
                    hmac_sha256(&key, &data).to_vec(),
                    signer.sign_to_vec().unwrap()
                );
            }
            for out_len in [1usize, 31, 32, 33, 64, 100] {
                let mut ctx = PkeyCtx::new_id(Id::HKDF).unwrap();
                ctx.derive_init().unwrap();
                ctx.set_hkdf_md(Md::sha256()).unwrap();
                ctx.set_hkdf_key(&key[..key_len.min(40)]).unwrap();
                ctx.set_hkdf_salt(&key).unwrap();
                ctx.add_hkdf_info(b"some info").unwrap();
                let mut want = vec![0u8; out_len];
                ctx.derive(Some(&mut want)).unwrap();
                let mut got = vec![0u8; out_len];
                hkdf_sha256(&key[..key_len.min(40)], &key, b"some info", &mut got).unwrap();
                assert_eq!(got, want, "key {key_len} out {out_len}");
            }
        }
    }

    #[test]
    fn hkdf_rfc5869_case_1() {
        let ikm = [0x0b; 22];
        let salt = unhex("000102030405060708090a0b0c");
        let info = unhex("f0f1f2f3f4f5f6f7f8f9");
        let mut okm = [0u8; 42];
        hkdf_sha256(&ikm, &salt, &info, &mut okm).unwrap();
        assert_eq!(
            hex(&okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf\
             34007208d5b887185865"
        );
    }

    #[test]
    fn hkdf_rfc5869_case_3_empty_salt_and_info() {
        let mut okm = [0u8; 42];
        hkdf_sha256(&[0x0b; 22], b"", b"", &mut okm).unwrap();
        assert_eq!(
            hex(&okm),
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d\
             9d201395faa4b61a96c8"
        );
    }

    #[test]
    fn hkdf_matches_rfc5869_definition_for_empty_inputs() {
        // One block of RFC 5869 written out over HMAC, including the empty
        // IKM that OpenSSL might have refused.
        for (ikm, salt, info) in [(&b""[..], &b"salt"[..], &b"info"[..]), (b"", b"", b"")] {
            let prk = hmac_sha256(salt, ikm);
            let t1 = hmac_sha256(&prk, &[info, &[1u8]].concat());
            assert_eq!(hkdf_sha256_32(ikm, salt, info), t1);
        }
    }

    #[test]
    fn hkdf_rejects_impossible_lengths() {
        assert!(hkdf_sha256(b"k", b"s", b"i", &mut []).is_err());
        assert!(hkdf_sha256(b"k", b"s", b"i", &mut vec![0; 255 * 32 + 1]).is_err());
        assert!(hkdf_sha256(b"k", b"s", b"i", &mut vec![0; 255 * 32]).is_ok());
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
