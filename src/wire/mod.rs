//! The wire codec.
