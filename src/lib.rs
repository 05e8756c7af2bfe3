//! ims: a hybrid peer-to-peer instant messaging system.
//!
//! Layers, lowest first; a layer never imports one above it and a role
//! (crs, ms, client) never imports another role:
//! - [`wire`]: the HTTP-like text codec and its bounded socket I/O;
//! - [`crypto`]: the only OpenSSL user; [`keyfile`]: secret files on disk;
//! - [`seal`]: the AEAD envelope every link uses;
//! - [`prethread`]: the fixed worker pool behind every listener;
//! - [`metrics`]: the Prometheus `/metrics` endpoint of the servers;
//! - [`proto`]: typed requests, replies, refusals and events of every link;
//! - [`link`]: connect, seal, call, open and decode for every link, and
//!   the key schedules both ends use;
//! - roles: [`crs`], [`ms`], [`client`];
//! - [`config`] and [`cli`]: one table of settings per program (files and
//!   flags), and what the binaries share.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod config;
pub mod crs;
pub mod crypto;
pub mod keyfile;
pub mod link;
pub mod metrics;
pub mod ms;
pub mod prethread;
pub mod proto;
pub mod seal;
pub mod wire;
