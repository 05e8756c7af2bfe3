//! Durable storage of the CRS.
