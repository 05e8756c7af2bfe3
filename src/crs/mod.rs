//! The central repository server.
pub mod store;
