//! ims: a hybrid peer-to-peer instant messaging system.
//!
//! Layers, lowest first; a layer never imports one above it and a role
//! (crs, ms, client) never imports another role:
//! - [`wire`]: the HTTP-like text codec and its bounded socket I/O;
//! - [`crypto`]: the only OpenSSL user;
//! - [`seal`]: the AEAD envelope every link uses;
//! - [`prethread`]: the fixed worker pool behind every listener;
//! - [`crs`]: the central repository server.
#![forbid(unsafe_code)]

pub mod crs;
pub mod crypto;
pub mod prethread;
pub mod seal;
pub mod wire;
