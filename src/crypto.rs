//! Cryptographic primitives: the only module that touches OpenSSL.
