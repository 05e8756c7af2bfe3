//! The AEAD envelope used on every link.
