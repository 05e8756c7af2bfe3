//! AES-256-GCM, the one AEAD of the crate.
//!
//! The output layout is always `ciphertext || 16-byte tag`. The in-place
//! variants exist for file chunks (64 KiB to 1 MiB): they encrypt and
//! decrypt inside the caller's buffer, so a chunk is never copied.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use super::Error;
use openssl::cipher::{Cipher, CipherRef};
use openssl::cipher_ctx::CipherCtx;
use openssl::error::ErrorStack;

/// Key length of AES-256, in bytes.
pub const AES_KEY_LEN: usize = 32;
/// GCM nonce length: the 96-bit size GCM is designed for.
pub const GCM_NONCE_LEN: usize = 12;
/// GCM tag length: the full 128 bits, never truncated.
pub const GCM_TAG_LEN: usize = 16;

/// AES-256-GCM, fetched from the provider once. Naming the cipher by its
/// legacy constant makes OpenSSL 3 fetch it again at every init (a
/// lock, a name lookup and a parameter scan: about a third of the cost of
/// sealing a 100-byte message); a fetched cipher skips that.
fn aes_256_gcm() -> &'static CipherRef {
    static FETCHED: OnceLock<Option<Cipher>> = OnceLock::new();
    match FETCHED.get_or_init(|| Cipher::fetch(None, "AES-256-GCM", None).ok()) {
        Some(cipher) => cipher,
        None => Cipher::aes_256_gcm(),
    }
}

/// Encrypts `pt` and returns `ciphertext || tag`.
///
/// The caller guarantees that `nonce` is never reused with `key`.
pub fn aes_gcm_seal(
    key: &[u8; AES_KEY_LEN],
    nonce: &[u8; GCM_NONCE_LEN],
    aad: &[u8],
    pt: &[u8],
) -> Result<Vec<u8>, Error> {
    let mut buf = Vec::with_capacity(pt.len() + GCM_TAG_LEN);
    buf.extend_from_slice(pt);
    aes_gcm_seal_in_place(key, nonce, aad, &mut buf)?;
    Ok(buf)
}

/// Encrypts the whole of `buf` in place and appends the tag, so that `buf`
/// becomes `ciphertext || tag`. Reserve [`GCM_TAG_LEN`] spare bytes of
/// capacity to avoid a reallocation. On error `buf` is left truncated to
/// its original length but its contents are unspecified.
pub fn aes_gcm_seal_in_place(
    key: &[u8; AES_KEY_LEN],
    nonce: &[u8; GCM_NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), Error> {
    seal_in_place(key, ONE_SHOT, nonce, aad, buf)
}

/// [`aes_gcm_seal_in_place`] under the key numbered `id` ([`ONE_SHOT`]:
/// wipe the thread's context after).
fn seal_in_place(
    key: &[u8; AES_KEY_LEN],
    id: u64,
    nonce: &[u8; GCM_NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), Error> {
    let len = buf.len();
    let result = with_ctx(&SEAL_CTX, true, id, |ctx, loaded| {
        // A context that holds this key's schedule already only takes
        // the nonce: no key expansion, no GHASH table per message.
        ctx.encrypt_init(None, (!loaded).then_some(key), Some(nonce))?;
        if !aad.is_empty() {
            ctx.cipher_update(aad, None)?;
        }
        // GCM is a stream mode: output length equals input length, and
        // final writes nothing, so one in-place update covers everything.
        let written = ctx.cipher_update_inplace(buf, len)?;
        debug_assert_eq!(written, len);
        ctx.cipher_final(&mut [])?;
        let mut tag = [0u8; GCM_TAG_LEN];
        ctx.tag(&mut tag)?;
        Ok(tag)
    });
    match result {
        Ok(tag) => {
            buf.extend_from_slice(&tag);
            Ok(())
        }
        Err(e) => {
            buf.truncate(len);
            Err(e.into())
        }
    }
}

/// The number of a key used once ([`aes_gcm_seal`] and the like): the
/// context is wiped right after, since no [`GcmKey`] drop will do it.
const ONE_SHOT: u64 = 0;

/// Numbers of [`GcmKey`]s, so that a context knows whose schedule it
/// holds. Never reused (a u64 does not wrap in practice).
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// One thread's context for one direction, and the number of the key
/// whose schedule it holds ([`ONE_SHOT`]: none, or the zero key's).
struct Kept {
    ctx: CipherCtx,
    key: u64,
}

/// A thread's [`Kept`] context, shared with [`CONTEXTS`] so that
/// [`forget`] can reach it.
type Slot = Arc<Mutex<Option<Kept>>>;
/// What [`CONTEXTS`] keeps of a [`Slot`]: it, weakly, and whether it seals.
type Registered = (Weak<Mutex<Option<Kept>>>, bool);

thread_local! {
    /// Each thread's contexts for sealing and for opening, made at its
    /// first use and then only re-keyed: making a context for every
    /// message (an allocation, and a provider look-up under a lock) cost
    /// more than sealing a short one. Per thread, not per key, so that a
    /// server holding 100,000 links keeps two contexts per worker, not
    /// one per link direction.
    static SEAL_CTX: Slot = register(true);
    static OPEN_CTX: Slot = register(false);
}

/// Every thread's contexts (and whether each seals), so that no key
/// schedule outlives the key it came from: see [`forget`].
static CONTEXTS: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

fn register(seals: bool) -> Slot {
    let slot = Slot::default();
    let mut all = CONTEXTS.lock();
    // Threads that ended left their entries behind.
    all.retain(|(weak, _)| weak.strong_count() > 0);
    all.push((Arc::downgrade(&slot), seals));
    slot
}

/// Replaces the schedule of key `id` wherever a thread's context still
/// holds it with a zero key's. A context keeps the schedule of the key it
/// last used; when a key that its holder erases (a conversation's old
/// epoch, a link's key) is dropped, this makes sure no copy of it lives on
/// in a context. A context that cannot be re-keyed is freed (OpenSSL
/// wipes it).
fn forget(id: u64) {
    let slots: Vec<(Slot, bool)> = CONTEXTS
        .lock()
        .iter()
        .filter_map(|(weak, seals)| weak.upgrade().map(|s| (s, *seals)))
        .collect();
    for (slot, seals) in slots {
        let mut guard = slot.lock();
        if let Some(kept) = guard.as_mut().filter(|k| k.key == id) {
            if forget_key(&mut kept.ctx, seals).is_ok() {
                kept.key = ONE_SHOT;
            } else {
                *guard = None;
            }
        }
    }
}

/// Runs `f` on this thread's context in `slot` (made on first use with the
/// cipher set, no key), telling it whether the context holds key `id`'s
/// schedule already. A context that failed midway is dropped, not used
/// again. A [`ONE_SHOT`] key is wiped from the context right after.
fn with_ctx<T>(
    slot: &'static std::thread::LocalKey<Slot>,
    seals: bool,
    id: u64,
    f: impl FnOnce(&mut CipherCtx, bool) -> Result<T, ErrorStack>,
) -> Result<T, ErrorStack> {
    slot.with(|shared| {
        // Busy only while another thread wipes it (or on a re-entry, which
        // `f` does not make): a context of the moment serves then, freed
        // and wiped when it goes out of scope.
        let Some(mut guard) = shared.try_lock() else {
            let mut ctx = new_ctx(seals)?;
            return f(&mut ctx, false);
        };
        let kept = match guard.as_mut() {
            Some(kept) => kept,
            None => guard.insert(Kept {
                ctx: new_ctx(seals)?,
                key: ONE_SHOT,
            }),
        };
        let loaded = id != ONE_SHOT && kept.key == id;
        let result = f(&mut kept.ctx, loaded);
        kept.key = id;
        if result.is_err() || (id == ONE_SHOT && forget_key(&mut kept.ctx, seals).is_err()) {
            *guard = None;
        }
        result
    })
}

/// Re-keys `ctx` with an all-zero key, wiping the last real one's schedule.
fn forget_key(ctx: &mut CipherCtx, seals: bool) -> Result<(), ErrorStack> {
    const ZERO: [u8; AES_KEY_LEN] = [0; AES_KEY_LEN];
    if seals {
        ctx.encrypt_init(None, Some(&ZERO), None)
    } else {
        ctx.decrypt_init(None, Some(&ZERO), None)
    }
}

/// A context with AES-256-GCM set, for sealing or for opening.
fn new_ctx(seals: bool) -> Result<CipherCtx, ErrorStack> {
    let mut ctx = CipherCtx::new()?;
    if seals {
        ctx.encrypt_init(Some(aes_256_gcm()), None, None)?;
    } else {
        ctx.decrypt_init(Some(aes_256_gcm()), None, None)?;
    }
    Ok(ctx)
}

/// One AES-256-GCM key kept for many messages (a link's direction, a
/// history file), wiped when dropped, and with it every copy of its
/// schedule in the threads' contexts.
///
/// The caller guarantees, as for [`aes_gcm_seal`], that a nonce is never
/// used twice with one key.
pub struct GcmKey {
    key: [u8; AES_KEY_LEN],
    /// Its number among the keys of this process (see [`with_ctx`]).
    id: u64,
}

impl GcmKey {
    /// Keeps `key`.
    pub fn new(key: [u8; AES_KEY_LEN]) -> GcmKey {
        GcmKey {
            key,
            id: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// As [`aes_gcm_seal_in_place`] under this key.
    pub fn seal_in_place(
        &mut self,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), Error> {
        seal_in_place(&self.key, self.id, nonce, aad, buf)
    }

    /// As [`aes_gcm_open_in_place`] under this key: on any failure `buf`
    /// is cleared.
    pub fn open_in_place(
        &mut self,
        nonce: &[u8; GCM_NONCE_LEN],
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), Error> {
        open_in_place(&self.key, self.id, nonce, aad, buf)
    }
}

impl Drop for GcmKey {
    /// Wipes the key (best effort without unsafe code: the write goes
    /// through `black_box`, so it is not optimised away) and the copies of
    /// its schedule the threads' contexts may hold.
    fn drop(&mut self) {
        self.key = [0u8; AES_KEY_LEN];
        std::hint::black_box(&mut self.key);
        forget(self.id);
    }
}

/// Authenticates and decrypts `ciphertext || tag`; [`Error::Decrypt`] if
/// anything (key, nonce, aad, ciphertext, tag) is not what was sealed.
pub fn aes_gcm_open(
    key: &[u8; AES_KEY_LEN],
    nonce: &[u8; GCM_NONCE_LEN],
    aad: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, Error> {
    let mut buf = sealed.to_vec();
    aes_gcm_open_in_place(key, nonce, aad, &mut buf)?;
    Ok(buf)
}

/// Like [`aes_gcm_open`] but inside `buf`: on success `buf` holds exactly
/// the plaintext; on any failure `buf` is cleared, so unauthenticated
/// plaintext can never be used by mistake.
pub fn aes_gcm_open_in_place(
    key: &[u8; AES_KEY_LEN],
    nonce: &[u8; GCM_NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), Error> {
    open_in_place(key, ONE_SHOT, nonce, aad, buf)
}

/// [`aes_gcm_open_in_place`] under the key numbered `id` ([`ONE_SHOT`]:
/// wipe the thread's context after).
fn open_in_place(
    key: &[u8; AES_KEY_LEN],
    id: u64,
    nonce: &[u8; GCM_NONCE_LEN],
    aad: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), Error> {
    let Some(ct_len) = buf.len().checked_sub(GCM_TAG_LEN) else {
        buf.clear();
        return Err(Error::Decrypt);
    };
    let mut tag = [0u8; GCM_TAG_LEN];
    tag.copy_from_slice(&buf[ct_len..]);
    buf.truncate(ct_len);
    let result = with_ctx(&OPEN_CTX, false, id, |ctx, loaded| {
        ctx.decrypt_init(None, (!loaded).then_some(key), Some(nonce))?;
        if !aad.is_empty() {
            ctx.cipher_update(aad, None)?;
        }
        ctx.cipher_update_inplace(buf, ct_len)?;
        ctx.set_tag(&tag)?;
        // The tag is checked here; an error means "not authentic".
        ctx.cipher_final(&mut [])
    });
    if result.is_err() {
        buf.clear();
        return Err(Error::Decrypt);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];
    const NONCE: [u8; 12] = [9; 12];

    #[test]
    fn round_trip_and_layout() {
        for len in [0usize, 1, 15, 16, 17, 1000] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = aes_gcm_seal(&KEY, &NONCE, b"aad", &pt).unwrap();
            assert_eq!(sealed.len(), len + GCM_TAG_LEN);
            assert_eq!(aes_gcm_open(&KEY, &NONCE, b"aad", &sealed).unwrap(), pt);
        }
    }

    #[test]
    fn nist_vector_empty_plaintext() {
        // AES-256-GCM with all-zero key and nonce, empty plaintext and aad
        // (McGrew & Viega, test case 13): the tag alone.
        let sealed = aes_gcm_seal(&[0; 32], &[0; 12], b"", b"").unwrap();
        assert_eq!(hex(&sealed), "530f8afbc74536b9a963b4f1c4cb738b");
    }

    #[test]
    fn tag_failure_on_any_change() {
        let sealed = aes_gcm_seal(&KEY, &NONCE, b"aad", b"attack at dawn").unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(
                aes_gcm_open(&KEY, &NONCE, b"aad", &bad),
                Err(Error::Decrypt)
            );
        }
        let mut other_key = KEY;
        other_key[0] ^= 1;
        assert_eq!(
            aes_gcm_open(&other_key, &NONCE, b"aad", &sealed),
            Err(Error::Decrypt)
        );
        assert_eq!(
            aes_gcm_open(&KEY, &[0; 12], b"aad", &sealed),
            Err(Error::Decrypt)
        );
        assert_eq!(
            aes_gcm_open(&KEY, &NONCE, b"aaD", &sealed),
            Err(Error::Decrypt)
        );
        assert_eq!(
            aes_gcm_open(&KEY, &NONCE, b"aad", &sealed[..15]),
            Err(Error::Decrypt)
        );
    }

    #[test]
    fn in_place_failure_clears_buffer() {
        let mut buf = b"secret plaintext".to_vec();
        aes_gcm_seal_in_place(&KEY, &NONCE, b"", &mut buf).unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 0x80;
        assert_eq!(
            aes_gcm_open_in_place(&KEY, &NONCE, b"", &mut buf),
            Err(Error::Decrypt)
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn kept_key_matches_one_shot_and_survives_forgeries() {
        let mut sealer = GcmKey::new(KEY);
        let mut opener = GcmKey::new(KEY);
        for i in 0..50u8 {
            let nonce = [i; 12];
            let pt: Vec<u8> = (0..usize::from(i) * 3).map(|j| j as u8).collect();
            let mut buf = pt.clone();
            sealer.seal_in_place(&nonce, b"aad", &mut buf).unwrap();
            assert_eq!(buf, aes_gcm_seal(&KEY, &nonce, b"aad", &pt).unwrap());
            if i % 3 == 0 {
                // A forgery in between changes nothing for the next one.
                let mut bad = buf.clone();
                bad[0] ^= 1;
                assert_eq!(
                    opener.open_in_place(&nonce, b"aad", &mut bad),
                    Err(Error::Decrypt)
                );
                assert!(bad.is_empty());
                let mut wrong_aad = buf.clone();
                assert_eq!(
                    opener.open_in_place(&nonce, b"aaD", &mut wrong_aad),
                    Err(Error::Decrypt)
                );
            }
            opener.open_in_place(&nonce, b"aad", &mut buf).unwrap();
            assert_eq!(buf, pt);
        }
    }

    /// How many threads' contexts hold key `id`'s schedule.
    fn holders(id: u64) -> usize {
        CONTEXTS
            .lock()
            .iter()
            .filter_map(|(weak, _)| weak.upgrade())
            .filter(|slot| slot.lock().as_ref().is_some_and(|k| k.key == id))
            .count()
    }

    #[test]
    fn kept_keys_interleaved_on_one_thread_and_wiped_when_dropped() {
        let other = [8u8; 32];
        let mut a = GcmKey::new(KEY);
        let mut b = GcmKey::new(other);
        let (a_id, b_id) = (a.id, b.id);
        for i in 0..20u8 {
            let nonce = [i; 12];
            // Same key twice in a row (schedule kept), then a switch, and
            // a one-shot use in between that must not disturb either.
            for which in [0, 0, 1] {
                let (key, raw) = if which == 0 {
                    (&mut a, KEY)
                } else {
                    (&mut b, other)
                };
                let mut buf = vec![i; usize::from(i)];
                key.seal_in_place(&nonce, b"x", &mut buf).unwrap();
                assert_eq!(
                    buf,
                    aes_gcm_seal(&raw, &nonce, b"x", &[i; 20][..usize::from(i)]).unwrap()
                );
                key.open_in_place(&nonce, b"x", &mut buf).unwrap();
                assert_eq!(buf, vec![i; usize::from(i)]);
            }
        }
        // This thread's contexts last held b's schedule (sealing and
        // opening); a's was replaced.
        b.seal_in_place(&[99; 12], b"", &mut Vec::new()).unwrap();
        let mut probe = Vec::new();
        b.seal_in_place(&[98; 12], b"", &mut probe).unwrap();
        assert_eq!(probe, aes_gcm_seal(&other, &[98; 12], b"", b"").unwrap());
        b.seal_in_place(&[97; 12], b"", &mut probe).unwrap();
        probe.truncate(0);
        b.seal_in_place(&[98; 12], b"", &mut probe).unwrap();
        b.open_in_place(&[98; 12], b"", &mut probe).unwrap();
        assert_eq!(holders(b_id), 2);
        assert_eq!(holders(a_id), 0);
        drop(b);
        assert_eq!(
            holders(b_id),
            0,
            "a dropped key's schedule stayed in a context"
        );
        drop(a);
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
