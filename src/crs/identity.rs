//! The CRS's own key pair when several instances serve one directory.
//!
//! Clients encrypt registrations to the CRS's public key and pin its
//! fingerprint, so every instance must hold the same private key. It is
//! kept in the database, wrapped (AES-256-GCM) under a key derived from the
//! MSkey, rather than copied to each machine as a file: every instance
//! already needs the MSkey and the database, so a new instance needs
//! nothing more, the key cannot drift between machines, and a database
//! dump alone does not reveal it. The first instance to start makes it;
//! the others read it.
//!
//! The same row holds the directory's instance id, which every instance
//! reports to MSs, so an MS moving to another instance sees the same
//! directory and keeps its users.

use log::info;

use super::store::{PgPool, StoreError};
use crate::crypto::{self, RsaPrivateKey};

/// Binds the wrapped key to its purpose.
const WRAP_AAD: &[u8] = b"ims crs identity v1";

fn wrap_key(ms_key: &[u8]) -> [u8; 32] {
    crypto::hkdf_sha256_32(ms_key, b"ims-crs-identity", b"wrap")
}

fn store_err(e: StoreError) -> String {
    e.to_string()
}

fn wrap(key: &[u8; 32], der: &[u8]) -> Result<Vec<u8>, String> {
    let nonce = crypto::random_array::<12>();
    let mut wrapped = nonce.to_vec();
    wrapped.extend(crypto::aes_gcm_seal(key, &nonce, WRAP_AAD, der).map_err(|e| e.to_string())?);
    Ok(wrapped)
}

/// Puts `identity` in the database as the directory's key (a migration
/// from sled, so the fingerprint clients know stays the same). Refuses if
/// the database already holds a different key.
pub fn install(pool: &PgPool, ms_key: &[u8], identity: &RsaPrivateKey) -> Result<(), String> {
    let der = identity.to_der().map_err(|e| e.to_string())?;
    let wrapped = wrap(&wrap_key(ms_key), &der)?;
    let instance = crate::keyfile::hex(&crypto::random_array::<8>());
    {
        let mut conn = pool.get().map_err(store_err)?;
        conn.client()
            .execute(
                "INSERT INTO crs_identity (id, wrapped, instance) VALUES (1, $1, $2) \
                 ON CONFLICT (id) DO NOTHING",
                &[&wrapped, &instance],
            )
            .map_err(|e| super::store::describe(&e))?;
    }
    let (stored, _) = shared(pool, ms_key)?;
    if stored.public_key().fingerprint() != identity.public_key().fingerprint() {
        return Err("the database already holds a different CRS key".into());
    }
    Ok(())
}

/// Reads the shared key pair and instance id, making them at first start.
pub fn shared(pool: &PgPool, ms_key: &[u8]) -> Result<(RsaPrivateKey, String), String> {
    let key = wrap_key(ms_key);
    let mut conn = pool.get().map_err(store_err)?;
    let c = conn.client();
    let read = |c: &mut postgres::Client| -> Result<Option<(Vec<u8>, String)>, String> {
        Ok(c.query_opt(
            "SELECT wrapped, instance FROM crs_identity WHERE id = 1",
            &[],
        )
        .map_err(|e| super::store::describe(&e))?
        .map(|r| (r.get(0), r.get(1))))
    };
    let (wrapped, instance) = match read(c)? {
        Some(found) => found,
        None => {
            let made =
                RsaPrivateKey::generate(crypto::DEFAULT_RSA_BITS).map_err(|e| e.to_string())?;
            let der = made.to_der().map_err(|e| e.to_string())?;
            let wrapped = wrap(&key, &der)?;
            let instance = crate::keyfile::hex(&crypto::random_array::<8>());
            // Another instance starting at the same moment may win: then
            // its key is the one read back.
            let n = c
                .execute(
                    "INSERT INTO crs_identity (id, wrapped, instance) VALUES (1, $1, $2) \
                     ON CONFLICT (id) DO NOTHING",
                    &[&wrapped, &instance],
                )
                .map_err(|e| super::store::describe(&e))?;
            if n == 1 {
                info!("made the directory's CRS key (kept in the database)");
            }
            read(c)?.ok_or("the CRS key vanished from the database")?
        }
    };
    let Some((nonce, sealed)) = wrapped.split_at_checked(12) else {
        return Err("the stored CRS key is truncated".into());
    };
    let nonce: [u8; 12] = nonce.try_into().map_err(|_| "bad nonce")?;
    let der = crypto::aes_gcm_open(&key, &nonce, WRAP_AAD, sealed).map_err(|_| {
        "the CRS key in the database does not open with this MSkey (is it the same MSkey \
         as the other instances'?)"
            .to_string()
    })?;
    let key = RsaPrivateKey::from_der(&der).map_err(|e| e.to_string())?;
    Ok((key, instance))
}
