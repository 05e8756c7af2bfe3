//! Size limits of the wire format, checked before anything is allocated.
//!
//! One struct so that a configuration file can override every limit in one
//! place; the defaults carry the reason they are what they are.

/// Upper bounds on one message. A peer that exceeds any of them gets an
/// error and the connection is closed: nothing is allocated for the excess.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest start or header line, CRLF included. Our longest header value
    /// is a base64 RSA-4096 signature (about 700 bytes); 2 KiB leaves room.
    pub max_line: usize,
    /// Most header lines in one message. Our richest message has about a
    /// dozen; 64 stops header floods long before they cost anything.
    pub max_headers: usize,
    /// Most bytes from the start line through the blank line. Bounds the
    /// memory of a header block independently of `max_line * max_headers`.
    pub max_header_bytes: usize,
    /// Largest body of an ordinary request or reply. A contact list with
    /// public keys of a few hundred buddies fits in 1 MiB.
    pub max_body: usize,
    /// Largest body of one file-transfer frame. Files are streamed in chunks
    /// of at most this size, so memory per transfer stays bounded.
    pub max_file_body: usize,
}

impl Limits {
    /// The defaults used by every listener unless configuration says otherwise.
    pub const DEFAULT: Limits = Limits {
        max_line: 2 * 1024,
        max_headers: 64,
        max_header_bytes: 16 * 1024,
        max_body: 1024 * 1024,
        max_file_body: 4 * 1024 * 1024,
    };

    /// The same limits with the body bound raised to the file-frame bound,
    /// for links that carry file chunks.
    pub fn for_files(self) -> Limits {
        Limits {
            max_body: self.max_body.max(self.max_file_body),
            ..self
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}
