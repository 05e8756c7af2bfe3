//! Header accessors that turn absent or malformed values into
//! [`ProtoError`]s, and the serde helper for binary fields in JSON bodies.

use super::ProtoError;
use crate::crypto;
use crate::wire::Message;

/// Typed reads of a message's headers.
pub trait Fields {
    /// A header that must be present.
    fn req(&self, name: &'static str) -> Result<&str, ProtoError>;
    /// A header that must be present and valid base64.
    fn req_b64(&self, name: &'static str) -> Result<Vec<u8>, ProtoError>;
    /// A header that must be present and parse as `T`.
    fn req_parse<T: std::str::FromStr>(&self, name: &'static str) -> Result<T, ProtoError>;
    /// The body as JSON of type `T`.
    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ProtoError>;
}

impl Fields for Message {
    fn req(&self, name: &'static str) -> Result<&str, ProtoError> {
        self.header(name).ok_or(ProtoError::Missing(name))
    }

    fn req_b64(&self, name: &'static str) -> Result<Vec<u8>, ProtoError> {
        crypto::b64_decode(self.req(name)?).map_err(|_| ProtoError::Invalid(name))
    }

    fn req_parse<T: std::str::FromStr>(&self, name: &'static str) -> Result<T, ProtoError> {
        self.req(name)?
            .parse()
            .map_err(|_| ProtoError::Invalid(name))
    }

    fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ProtoError> {
        serde_json::from_slice(&self.body).map_err(|_| ProtoError::Invalid("body"))
    }
}

/// `#[serde(with = "b64_serde")]` for `Vec<u8>` fields: base64 strings in
/// JSON instead of arrays of numbers.
pub mod b64_serde {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    /// Serializes bytes as a base64 string.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::crypto::b64_encode(bytes))
    }

    /// Reads a base64 string back into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        crate::crypto::b64_decode(&s).map_err(|_| D::Error::custom("invalid base64"))
    }
}
