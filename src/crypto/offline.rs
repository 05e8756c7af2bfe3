//! Sealed offline messages: one message sealed end to end by its sender
//! for a recipient who is not there to agree a session (PROTOCOL.md §7,
//! "Offline messages").
//!
//! A fresh AES-256-GCM key encrypts the text; the key is wrapped with
//! RSA-OAEP to the recipient's long-term public key; the sender signs
//! everything (names, id, time, number, wrapped key, nonce, ciphertext)
//! with RSA-PSS. The blob is the signed transcript with the signature
//! appended as one more field, so the servers that store it can read its
//! addressing (and check its signature) but not its text.
//!
//! The encoding is the transcript of PROTOCOL.md §2: the label and each
//! field as a 4-byte big-endian length and its bytes. It is written here
//! rather than taken from the protocol layer because this layer is below
//! it; `tests/protocol_doc.rs`-style checks keep the two identical.

use super::{aes_gcm_open, aes_gcm_seal, random_array, Error, RsaPrivateKey, RsaPublicKey};

/// Label of the blob (and of its signed part).
pub const BLOB_LABEL: &str = "ims offline v1";
/// Label of the AES-GCM associated data.
pub const AAD_LABEL: &str = "ims offline aad v1";
/// Bytes of a message id.
pub const ID_LEN: usize = 16;
/// Longest text of one offline message: the same as a live message
/// (`MAX_TEXT_BYTES` of the peer protocol).
pub const MAX_TEXT: usize = 64 * 1024;
/// Longest name field (user names have at most 32 bytes).
const MAX_NAME: usize = 32;
/// Longest wrapped key or signature: an RSA-8192 modulus.
const MAX_RSA: usize = 1024;
/// Longest blob: the text, its tag, two RSA-8192 values and the framing.
pub const MAX_BLOB: usize = MAX_TEXT + 16 + 2 * MAX_RSA + 512;
/// Fields of a blob, the label not counted.
const FIELDS: usize = 9;

/// What the sender states in the signed part, readable by the servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The sender's name (canonical).
    pub from: String,
    /// The recipient's name (canonical).
    pub to: String,
    /// Random, unique per message: replays and duplicates are told by it.
    pub id: [u8; ID_LEN],
    /// When it was sent, seconds since 1970 (the sender's clock).
    pub sent_at: u64,
    /// The sender's own number of the message (its `queued` event's id),
    /// so its `delivered` names it.
    pub number: u64,
}

/// A blob split into its fields, nothing checked but the framing.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The clear fields.
    pub header: Header,
    wrapped_key: Vec<u8>,
    nonce: [u8; 12],
    ciphertext: Vec<u8>,
    signature: Vec<u8>,
    /// Bytes of the blob the signature covers (all but the last field).
    signed_len: usize,
}

fn put(out: &mut Vec<u8>, field: &[u8]) {
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

/// The associated data of the ciphertext: the clear fields again.
fn aad(h: &Header) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    put(&mut out, AAD_LABEL.as_bytes());
    put(&mut out, h.from.as_bytes());
    put(&mut out, h.to.as_bytes());
    put(&mut out, &h.id);
    put(&mut out, &h.sent_at.to_be_bytes());
    put(&mut out, &h.number.to_be_bytes());
    out
}

/// Seals `text` from `sender` (whose private key signs) to the holder of
/// `recipient`.
pub fn seal(
    header: &Header,
    text: &[u8],
    sender: &RsaPrivateKey,
    recipient: &RsaPublicKey,
) -> Result<Vec<u8>, Error> {
    if text.len() > MAX_TEXT {
        return Err(Error::InvalidInput("offline message too long"));
    }
    let key = random_array::<32>();
    let nonce = random_array::<12>();
    let wrapped = recipient.encrypt_oaep(&key)?;
    let ciphertext = aes_gcm_seal(&key, &nonce, &aad(header), text)?;
    let mut out = Vec::with_capacity(text.len() + 1024);
    put(&mut out, BLOB_LABEL.as_bytes());
    put(&mut out, header.from.as_bytes());
    put(&mut out, header.to.as_bytes());
    put(&mut out, &header.id);
    put(&mut out, &header.sent_at.to_be_bytes());
    put(&mut out, &header.number.to_be_bytes());
    put(&mut out, &wrapped);
    put(&mut out, &nonce);
    put(&mut out, &ciphertext);
    let signature = sender.sign_pss(&out)?;
    put(&mut out, &signature);
    Ok(out)
}

/// Splits a blob into its fields; `InvalidInput` for anything that is not
/// exactly one blob (wrong label, a field too long or of the wrong size,
/// bytes left over). Checks no signature and opens nothing.
pub fn parse(blob: &[u8]) -> Result<Parsed, Error> {
    const BAD: Error = Error::InvalidInput("malformed offline message");
    if blob.len() > MAX_BLOB {
        return Err(BAD);
    }
    let mut fields: Vec<&[u8]> = Vec::with_capacity(FIELDS + 1);
    let mut rest = blob;
    let mut signed_len = 0;
    while !rest.is_empty() {
        if fields.len() == FIELDS + 1 {
            return Err(BAD);
        }
        if fields.len() == FIELDS {
            signed_len = blob.len() - rest.len();
        }
        let (len, tail) = rest.split_first_chunk::<4>().ok_or(BAD)?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(BAD);
        }
        let (field, tail) = tail.split_at(len);
        fields.push(field);
        rest = tail;
    }
    let [label, from, to, id, sent_at, number, wrapped, nonce, ciphertext, signature] = fields[..]
    else {
        return Err(BAD);
    };
    if label != BLOB_LABEL.as_bytes()
        || from.is_empty()
        || from.len() > MAX_NAME
        || to.is_empty()
        || to.len() > MAX_NAME
        || wrapped.len() > MAX_RSA
        || signature.len() > MAX_RSA
        || ciphertext.len() > MAX_TEXT + 16
    {
        return Err(BAD);
    }
    let name = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| BAD);
    let u64_of = |b: &[u8]| {
        <[u8; 8]>::try_from(b)
            .map(u64::from_be_bytes)
            .map_err(|_| BAD)
    };
    Ok(Parsed {
        header: Header {
            from: name(from)?,
            to: name(to)?,
            id: id.try_into().map_err(|_| BAD)?,
            sent_at: u64_of(sent_at)?,
            number: u64_of(number)?,
        },
        wrapped_key: wrapped.to_vec(),
        nonce: nonce.try_into().map_err(|_| BAD)?,
        ciphertext: ciphertext.to_vec(),
        signature: signature.to_vec(),
        signed_len,
    })
}

impl Parsed {
    /// Checks the sender's signature over the blob it came from.
    pub fn verify(&self, blob: &[u8], sender: &RsaPublicKey) -> Result<(), Error> {
        let signed = blob
            .get(..self.signed_len)
            .ok_or(Error::InvalidInput("not the blob parsed"))?;
        sender.verify_pss(signed, &self.signature)
    }

    /// Checks the signature, then unwraps the key and decrypts the text:
    /// `BadSignature` or `Decrypt`, and no text, if anything was altered.
    pub fn open(
        &self,
        blob: &[u8],
        sender: &RsaPublicKey,
        recipient: &RsaPrivateKey,
    ) -> Result<Vec<u8>, Error> {
        self.verify(blob, sender)?;
        let key: [u8; 32] = recipient
            .decrypt_oaep(&self.wrapped_key)?
            .try_into()
            .map_err(|_| Error::Decrypt)?;
        aes_gcm_open(&key, &self.nonce, &aad(&self.header), &self.ciphertext)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            from: "alice".into(),
            to: "bob".into(),
            id: [7; ID_LEN],
            sent_at: 1_764_750_000,
            number: 3,
        }
    }

    #[test]
    fn seals_opens_and_refuses_alterations() {
        let alice = RsaPrivateKey::generate(2048).unwrap();
        let bob = RsaPrivateKey::generate(2048).unwrap();
        let carol = RsaPrivateKey::generate(2048).unwrap();
        let blob = seal(&header(), b"hello bob", &alice, &bob.public_key()).unwrap();
        let p = parse(&blob).unwrap();
        assert_eq!(p.header, header());
        assert_eq!(
            p.open(&blob, &alice.public_key(), &bob).unwrap(),
            b"hello bob"
        );
        // No text in the clear.
        assert!(!blob.windows(9).any(|w| w == b"hello bob"));
        // Another recipient cannot open it; another sender's key refuses it.
        assert!(p.open(&blob, &alice.public_key(), &carol).is_err());
        assert_eq!(
            p.verify(&blob, &carol.public_key()),
            Err(Error::BadSignature)
        );
        // Every byte is covered: flip each one in turn (a sample).
        for i in (0..blob.len()).step_by(17) {
            let mut bad = blob.clone();
            bad[i] ^= 1;
            let opened = parse(&bad).and_then(|p| p.open(&bad, &alice.public_key(), &bob));
            assert!(opened.is_err(), "byte {i} altered and still opened");
        }
        // Re-addressed: a new `to` breaks the signature.
        let readdressed = blob
            .windows(7)
            .position(|w| w == b"\0\0\0\x03bob")
            .map(|at| {
                let mut b = blob.clone();
                b[at + 4..at + 7].copy_from_slice(b"eve");
                b
            })
            .unwrap();
        let p = parse(&readdressed).unwrap();
        assert_eq!(p.header.to, "eve");
        assert_eq!(
            p.verify(&readdressed, &alice.public_key()),
            Err(Error::BadSignature)
        );
        // Framing: trailing bytes, truncation, too long.
        let mut longer = blob.clone();
        longer.push(0);
        assert!(parse(&longer).is_err());
        assert!(parse(&blob[..blob.len() - 1]).is_err());
        assert!(parse(&[]).is_err());
        assert!(seal(&header(), &vec![0; MAX_TEXT + 1], &alice, &bob.public_key()).is_err());
    }
}
