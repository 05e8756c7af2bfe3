//! The key schedule of direct conversations (PROTOCOL.md §7) without I/O:
//! the signed ephemeral X25519 exchange that opens a session, its key
//! confirmations, and the re-key exchange that starts a new epoch inside a
//! sealed session.
//!
//! Each side of each exchange is a type that is consumed when the exchange
//! ends, so an ephemeral private key is used for exactly one agreement and
//! dropped with it. What remains of a session is [`EpochKeys`]: its public
//! id and a [`Secret`] from which every channel's keys are derived, wiped
//! when the epoch ends.
//!
//! Forward secrecy comes from the ephemeral keys alone: nothing secret is
//! ever encrypted to a long-term key. The long-term RSA keys only sign the
//! transcripts, which authenticates the shares (and so the session) to
//! each side.

use std::fmt;

use crate::crypto::{
    self, ct_eq, hkdf_sha256_32, hmac_sha256, sha256, EphemeralKey, RsaPrivateKey, RsaPublicKey,
    Secret,
};
use crate::proto::peer::{
    init_ack_transcript, init_transcript, rekey_transcript, session_id, Confirm, Init, InitAck,
    RekeyAck, NONCE_LEN,
};
use crate::proto::transcript;
use crate::seal::{Role, SessionKeys};

/// HKDF info of an epoch's session secret.
const SECRET_INFO: &[u8] = b"ims session secret v2";
/// HKDF info of an exchange's confirmation key.
const CONFIRM_INFO: &[u8] = b"ims confirm v2";
/// What the answering side MACs to confirm it holds the keys.
const CONFIRM_RESPONDER: &[u8] = b"ims confirm responder v2";
/// What the starting side MACs to confirm it holds the keys.
const CONFIRM_INITIATOR: &[u8] = b"ims confirm initiator v2";

/// Why an exchange failed. Every variant means "no session": nothing of
/// the failed exchange is kept.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// A signature does not verify with the claimed sender's public key.
    BadSignature,
    /// The INIT-ACK does not echo our nonce.
    BadEcho,
    /// The other side's share is not a usable X25519 key.
    BadShare,
    /// A key confirmation does not match: the other side does not hold
    /// the keys (or names another session).
    BadConfirm,
    /// A local failure of the crypto layer.
    Crypto(crypto::Error),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::BadSignature => f.write_str("bad signature"),
            HandshakeError::BadEcho => f.write_str("nonce not echoed"),
            HandshakeError::BadShare => f.write_str("unusable key share"),
            HandshakeError::BadConfirm => f.write_str("key confirmation does not match"),
            HandshakeError::Crypto(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl From<crypto::Error> for HandshakeError {
    fn from(e: crypto::Error) -> HandshakeError {
        HandshakeError::Crypto(e)
    }
}

/// The keys of one epoch of a session: what both sides agreed, from which
/// every channel's keys are derived.
pub struct EpochKeys {
    id: String,
    secret: Secret,
}

impl EpochKeys {
    /// The epoch's public id (the `Session` header of its messages).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The keys of the channel `label` in this epoch:
    /// HKDF(secret, salt = transcript("ims channel v2", id, label)).
    pub fn channel(&self, label: &str, role: Role) -> SessionKeys {
        SessionKeys::derive(
            self.secret.expose(),
            &transcript("ims channel v2", &[self.id.as_bytes(), label.as_bytes()]),
            role,
        )
    }

    /// A copy of the epoch's secret, for tests that show what it opens.
    /// Exists only with the `test-hooks` feature, which no shipped build
    /// enables.
    #[cfg(feature = "test-hooks")]
    pub fn secret_for_test(&self) -> [u8; 32] {
        *self.secret.expose()
    }

    /// Rebuilds epoch keys from an exported secret (tests only).
    #[cfg(feature = "test-hooks")]
    pub fn from_secret_for_test(id: &str, secret: [u8; 32]) -> EpochKeys {
        EpochKeys {
            id: id.to_owned(),
            secret: Secret::new(secret),
        }
    }
}

#[cfg(test)]
impl EpochKeys {
    /// Epoch keys from given bytes, for unit tests of what holds them.
    pub(crate) fn fixed(id: &str, secret: [u8; 32]) -> EpochKeys {
        EpochKeys {
            id: id.to_owned(),
            secret: Secret::new(secret),
        }
    }
}

impl fmt::Debug for EpochKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochKeys")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// An exchange's outcome before confirmation: the epoch and the key both
/// sides MAC with to prove they hold it.
struct Agreed {
    keys: EpochKeys,
    confirm_key: Secret,
}

impl Agreed {
    /// secret = HKDF(ikm, salt = th, "ims session secret v2"),
    /// confirmation key = HKDF(ikm, salt = th, "ims confirm v2"),
    /// id = [`session_id`]`(th)`.
    fn schedule(ikm: &[u8], th: &[u8; 32]) -> Agreed {
        Agreed {
            keys: EpochKeys {
                id: session_id(th),
                secret: Secret::new(hkdf_sha256_32(ikm, th, SECRET_INFO)),
            },
            confirm_key: Secret::new(hkdf_sha256_32(ikm, th, CONFIRM_INFO)),
        }
    }

    fn mac(&self, label: &[u8]) -> [u8; 32] {
        hmac_sha256(self.confirm_key.expose(), label)
    }
}

/// The hash of a session-opening exchange: both signed transcripts.
fn handshake_hash(init_hash: &[u8], ack_transcript: &[u8]) -> [u8; 32] {
    sha256(&transcript(
        "ims handshake v2",
        &[init_hash, &sha256(ack_transcript)],
    ))
}

/// The caller's side between INIT and INIT-ACK.
pub struct Initiating {
    me: String,
    peer: String,
    nonce: Vec<u8>,
    init_hash: [u8; 32],
    ephemeral: EphemeralKey,
}

impl Initiating {
    /// A fresh ephemeral key and nonce, and the signed INIT carrying them.
    pub fn start(
        me: &str,
        to: &str,
        time: u64,
        private: &RsaPrivateKey,
    ) -> Result<(Initiating, Init), crypto::Error> {
        let ephemeral = EphemeralKey::generate()?;
        let nonce = crypto::random_array::<NONCE_LEN>().to_vec();
        let share = ephemeral.public().to_vec();
        let signed = init_transcript(me, to, time, &nonce, &share);
        let signature = private.sign_pss(&signed)?;
        let init = Init {
            from: me.to_owned(),
            to: to.to_owned(),
            time,
            nonce: nonce.clone(),
            share,
            signature,
        };
        Ok((
            Initiating {
                me: me.to_owned(),
                peer: to.to_owned(),
                nonce,
                init_hash: sha256(&signed),
                ephemeral,
            },
            init,
        ))
    }

    /// Checks the INIT-ACK (echo, the callee's signature with `their_key`,
    /// its key confirmation) and agrees the session; the ephemeral key is
    /// gone afterwards whatever the outcome. Returns the session's keys and
    /// the CONFIRM to send.
    pub fn finish(
        self,
        ack: &InitAck,
        their_key: &RsaPublicKey,
    ) -> Result<(EpochKeys, Confirm), HandshakeError> {
        if !ct_eq(&ack.echo, &self.nonce) {
            return Err(HandshakeError::BadEcho);
        }
        let signed = init_ack_transcript(
            &self.peer,
            &self.me,
            &self.init_hash,
            &ack.nonce,
            &ack.share,
        );
        their_key
            .verify_pss(&signed, &ack.signature)
            .map_err(|_| HandshakeError::BadSignature)?;
        let z = self
            .ephemeral
            .agree(&ack.share)
            .map_err(|_| HandshakeError::BadShare)?;
        let agreed = Agreed::schedule(z.expose(), &handshake_hash(&self.init_hash, &signed));
        if !ct_eq(&agreed.mac(CONFIRM_RESPONDER), &ack.confirm) {
            return Err(HandshakeError::BadConfirm);
        }
        let confirm = Confirm {
            from: self.me,
            to: self.peer,
            session: agreed.keys.id.clone(),
            confirm: agreed.mac(CONFIRM_INITIATOR).to_vec(),
        };
        Ok((agreed.keys, confirm))
    }
}

/// The callee's side between INIT-ACK and CONFIRM: keys agreed but not
/// yet proven to be held by the caller, so not yet usable.
pub struct Tentative {
    peer: String,
    keys: EpochKeys,
    expected: [u8; 32],
}

impl Tentative {
    /// The id the session will have.
    pub fn id(&self) -> &str {
        &self.keys.id
    }

    /// The caller's CONFIRM: the session's keys if it proves the caller
    /// holds them.
    pub fn confirm(self, c: &Confirm) -> Result<EpochKeys, HandshakeError> {
        if c.from != self.peer || c.session != self.keys.id || !ct_eq(&c.confirm, &self.expected) {
            return Err(HandshakeError::BadConfirm);
        }
        Ok(self.keys)
    }
}

/// The callee's answer to an INIT whose freshness and replay checks the
/// caller of this function already made: verifies the signature with
/// `their_key`, agrees with a fresh ephemeral key (dropped before this
/// returns) and signs the INIT-ACK.
pub fn respond(
    init: &Init,
    private: &RsaPrivateKey,
    their_key: &RsaPublicKey,
) -> Result<(InitAck, Tentative), HandshakeError> {
    let init_signed = init.transcript();
    their_key
        .verify_pss(&init_signed, &init.signature)
        .map_err(|_| HandshakeError::BadSignature)?;
    let init_hash = sha256(&init_signed);
    let ephemeral = EphemeralKey::generate()?;
    let share = ephemeral.public().to_vec();
    let nonce = crypto::random_array::<NONCE_LEN>().to_vec();
    let signed = init_ack_transcript(&init.to, &init.from, &init_hash, &nonce, &share);
    let signature = private.sign_pss(&signed)?;
    let z = ephemeral
        .agree(&init.share)
        .map_err(|_| HandshakeError::BadShare)?;
    let agreed = Agreed::schedule(z.expose(), &handshake_hash(&init_hash, &signed));
    let ack = InitAck {
        nonce,
        echo: init.nonce.clone(),
        share,
        signature,
        confirm: agreed.mac(CONFIRM_RESPONDER).to_vec(),
    };
    let expected = agreed.mac(CONFIRM_INITIATOR);
    Ok((
        ack,
        Tentative {
            peer: init.from.clone(),
            keys: agreed.keys,
            expected,
        },
    ))
}

/// The re-key schedule: ikm = old secret || X25519 secret, so the new
/// epoch is as authentic as the old (the exchange travels sealed under
/// it) and as forward-secret as the fresh ephemeral keys.
fn rekey_schedule(old: &EpochKeys, z: &Secret, th: &[u8; 32]) -> Agreed {
    let mut ikm = [0u8; 64];
    ikm[..32].copy_from_slice(old.secret.expose());
    ikm[32..].copy_from_slice(z.expose());
    let agreed = Agreed::schedule(&ikm, th);
    ikm = [0u8; 64];
    std::hint::black_box(&mut ikm);
    agreed
}

/// The starting side of a re-key between REKEY and its answer.
pub struct Rekeying {
    nonce: Vec<u8>,
    ephemeral: EphemeralKey,
}

impl Rekeying {
    /// A fresh ephemeral key and nonce; returns them for the REKEY too.
    pub fn start() -> Result<(Rekeying, Vec<u8>, Vec<u8>), crypto::Error> {
        let ephemeral = EphemeralKey::generate()?;
        let nonce = crypto::random_array::<NONCE_LEN>().to_vec();
        let share = ephemeral.public().to_vec();
        Ok((
            Rekeying {
                nonce: nonce.clone(),
                ephemeral,
            },
            nonce,
            share,
        ))
    }

    /// The answer: the new epoch's keys and our confirmation for the
    /// REKEYED that must be its first message.
    pub fn finish(
        self,
        old: &EpochKeys,
        me: &str,
        peer: &str,
        ack: &RekeyAck,
    ) -> Result<(EpochKeys, Vec<u8>), HandshakeError> {
        let xi = self.ephemeral.public();
        let th = sha256(&rekey_transcript(
            &old.id,
            me,
            peer,
            [&self.nonce, &xi, &ack.nonce, &ack.share],
        ));
        let z = self
            .ephemeral
            .agree(&ack.share)
            .map_err(|_| HandshakeError::BadShare)?;
        let agreed = rekey_schedule(old, &z, &th);
        if !ct_eq(&agreed.mac(CONFIRM_RESPONDER), &ack.confirm) {
            return Err(HandshakeError::BadConfirm);
        }
        let confirm = agreed.mac(CONFIRM_INITIATOR).to_vec();
        Ok((agreed.keys, confirm))
    }
}

/// The answering side of a re-key: the new epoch, to be confirmed by the
/// starter's REKEYED.
pub struct RekeyAnswered {
    keys: EpochKeys,
    expected: [u8; 32],
}

/// What the starter's REKEYED must carry.
pub struct RekeyConfirmation {
    expected: [u8; 32],
}

impl RekeyConfirmation {
    /// Checks the REKEYED confirmation.
    pub fn check(&self, confirm: &[u8]) -> Result<(), HandshakeError> {
        if ct_eq(confirm, &self.expected) {
            Ok(())
        } else {
            Err(HandshakeError::BadConfirm)
        }
    }
}

impl RekeyAnswered {
    /// The new epoch's id.
    pub fn id(&self) -> &str {
        &self.keys.id
    }

    /// What the starter's REKEYED must carry.
    pub fn confirmation(&self) -> RekeyConfirmation {
        RekeyConfirmation {
            expected: self.expected,
        }
    }

    /// The new epoch's keys.
    pub fn into_keys(self) -> EpochKeys {
        self.keys
    }
}

/// Answers a REKEY from `peer` received in epoch `old`.
pub fn rekey_respond(
    old: &EpochKeys,
    me: &str,
    peer: &str,
    id: u64,
    nonce: &[u8],
    share: &[u8],
) -> Result<(RekeyAck, RekeyAnswered), HandshakeError> {
    let ephemeral = EphemeralKey::generate()?;
    let xr = ephemeral.public();
    let nr = crypto::random_array::<NONCE_LEN>();
    let th = sha256(&rekey_transcript(
        &old.id,
        peer,
        me,
        [nonce, share, &nr, &xr],
    ));
    let z = ephemeral
        .agree(share)
        .map_err(|_| HandshakeError::BadShare)?;
    let agreed = rekey_schedule(old, &z, &th);
    let ack = RekeyAck {
        id,
        nonce: nr.to_vec(),
        share: xr.to_vec(),
        confirm: agreed.mac(CONFIRM_RESPONDER).to_vec(),
    };
    let expected = agreed.mac(CONFIRM_INITIATOR);
    Ok((
        ack,
        RekeyAnswered {
            keys: agreed.keys,
            expected,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Message;

    fn keys() -> (RsaPrivateKey, RsaPrivateKey) {
        (
            RsaPrivateKey::generate(1024).unwrap(),
            RsaPrivateKey::generate(1024).unwrap(),
        )
    }

    fn open_session(joe: &RsaPrivateKey, alice: &RsaPrivateKey) -> (EpochKeys, EpochKeys) {
        let (start, init) = Initiating::start("joe", "alice", 100, joe).unwrap();
        let (ack, tentative) = respond(&init, alice, &joe.public_key()).unwrap();
        let (jk, confirm) = start.finish(&ack, &alice.public_key()).unwrap();
        let ak = tentative.confirm(&confirm).unwrap();
        (jk, ak)
    }

    fn talks(a: &EpochKeys, b: &EpochKeys) -> bool {
        let mut s = a.channel("msg:joe>alice", Role::Initiator).send;
        let mut r = b.channel("msg:joe>alice", Role::Responder).recv;
        let sealed = s.seal("PEER", &[], &Message::request("HI")).unwrap();
        r.open(&sealed).is_ok()
    }

    #[test]
    fn both_sides_agree_and_sessions_differ() {
        let (joe, alice) = keys();
        let (j1, a1) = open_session(&joe, &alice);
        assert_eq!(j1.id(), a1.id());
        assert!(talks(&j1, &a1));
        let (j2, a2) = open_session(&joe, &alice);
        assert_ne!(j1.id(), j2.id());
        assert!(talks(&j2, &a2));
        assert!(!talks(&j1, &a2));
    }

    #[test]
    fn forged_and_tampered_exchanges_fail() {
        let (joe, alice) = keys();
        let mallory = RsaPrivateKey::generate(1024).unwrap();
        // INIT signed by someone else.
        let (_, init) = Initiating::start("joe", "alice", 100, &mallory).unwrap();
        assert_eq!(
            respond(&init, &alice, &joe.public_key()).err(),
            Some(HandshakeError::BadSignature)
        );
        // A share swapped in transit.
        let (_, mut init) = Initiating::start("joe", "alice", 100, &joe).unwrap();
        init.share = EphemeralKey::generate().unwrap().public().to_vec();
        assert_eq!(
            respond(&init, &alice, &joe.public_key()).err(),
            Some(HandshakeError::BadSignature)
        );
        // An INIT-ACK signed by someone else, or with a swapped share.
        let (start, init) = Initiating::start("joe", "alice", 100, &joe).unwrap();
        let (ack, _) = respond(&init, &mallory, &joe.public_key()).unwrap();
        assert_eq!(
            start.finish(&ack, &alice.public_key()).err(),
            Some(HandshakeError::BadSignature)
        );
        let (start, init) = Initiating::start("joe", "alice", 100, &joe).unwrap();
        let (mut ack, _) = respond(&init, &alice, &joe.public_key()).unwrap();
        ack.confirm[0] ^= 1;
        assert_eq!(
            start.finish(&ack, &alice.public_key()).err(),
            Some(HandshakeError::BadConfirm)
        );
        // A replayed INIT: the replayer cannot confirm.
        let (start, init) = Initiating::start("joe", "alice", 100, &joe).unwrap();
        let (ack, _) = respond(&init, &alice, &joe.public_key()).unwrap();
        let (_, confirm) = start.finish(&ack, &alice.public_key()).unwrap();
        let (_, replayed) = respond(&init, &alice, &joe.public_key()).unwrap();
        assert_eq!(
            replayed.confirm(&confirm).err(),
            Some(HandshakeError::BadConfirm)
        );
    }

    #[test]
    fn rekey_gives_a_new_epoch_both_sides_share() {
        let (joe, alice) = keys();
        let (j1, a1) = open_session(&joe, &alice);
        let (start, nonce, share) = Rekeying::start().unwrap();
        let (ack, answered) = rekey_respond(&a1, "alice", "joe", 7, &nonce, &share).unwrap();
        let (j2, confirm) = start.finish(&j1, "joe", "alice", &ack).unwrap();
        answered.confirmation().check(&confirm).unwrap();
        assert!(answered.confirmation().check(&[0u8; 32]).is_err());
        let a2 = answered.into_keys();
        assert_eq!(j2.id(), a2.id());
        assert_ne!(j1.id(), j2.id());
        assert!(talks(&j2, &a2));
        assert!(!talks(&j1, &a2));
        // A tampered answer is refused.
        let (start, nonce, share) = Rekeying::start().unwrap();
        let (mut ack, _) = rekey_respond(&a2, "alice", "joe", 8, &nonce, &share).unwrap();
        ack.nonce[0] ^= 1;
        assert_eq!(
            start.finish(&j2, "joe", "alice", &ack).err(),
            Some(HandshakeError::BadConfirm)
        );
    }
}
