//! The error of the wire layer: every way a byte stream can fail to be one
//! well-formed message.

use std::fmt;

/// Why bytes were refused as a message. Each variant is a distinct rejection
/// so that tests and logs can tell them apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A line ended in LF without the CR before it.
    BareLf,
    /// A CR not followed by LF inside the header block.
    BareCr,
    /// The start line is neither a method token nor `NNN reason`.
    InvalidStartLine,
    /// A header line without `:`.
    HeaderWithoutColon,
    /// A header name that is empty or not an RFC 9110 token.
    InvalidHeaderName,
    /// A header value with a control character or a non-ASCII byte.
    InvalidHeaderValue,
    /// No Content-Length header; every message carries one, even for 0.
    MissingContentLength,
    /// More than one Content-Length header.
    DuplicateContentLength,
    /// Content-Length is not a decimal number.
    NonNumericContentLength,
    /// Content-Length is negative.
    NegativeContentLength,
    /// Content-Length does not fit in 64 bits.
    OverflowingContentLength,
    /// A start or header line longer than `Limits::max_line`.
    LineTooLong,
    /// More header lines than `Limits::max_headers`.
    TooManyHeaders,
    /// A header block larger than `Limits::max_header_bytes`.
    HeaderBlockTooLarge,
    /// A claimed Content-Length larger than the body limit in force.
    BodyTooLarge,
    /// The body is not followed by the CRLF that ends every message.
    MissingBodyTerminator,
    /// The stream ended inside the header block.
    EofInHeaders,
    /// The stream ended before the claimed body had arrived.
    TruncatedBody,
}

impl Error {
    /// The reply code a server answers with before closing.
    pub fn reply_code(&self) -> u16 {
        match self {
            Error::LineTooLong
            | Error::TooManyHeaders
            | Error::HeaderBlockTooLarge
            | Error::BodyTooLarge => crate::wire::code::TOO_LARGE,
            _ => crate::wire::code::BAD_REQUEST,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Error::BareLf => "line ends in LF without CR",
            Error::BareCr => "CR not followed by LF",
            Error::InvalidStartLine => "invalid start line",
            Error::HeaderWithoutColon => "header line without colon",
            Error::InvalidHeaderName => "invalid header name",
            Error::InvalidHeaderValue => "invalid header value",
            Error::MissingContentLength => "missing Content-Length",
            Error::DuplicateContentLength => "duplicate Content-Length",
            Error::NonNumericContentLength => "non-numeric Content-Length",
            Error::NegativeContentLength => "negative Content-Length",
            Error::OverflowingContentLength => "Content-Length overflows",
            Error::LineTooLong => "line too long",
            Error::TooManyHeaders => "too many headers",
            Error::HeaderBlockTooLarge => "header block too large",
            Error::BodyTooLarge => "body too large",
            Error::MissingBodyTerminator => "body not followed by CRLF",
            Error::EofInHeaders => "connection closed inside the headers",
            Error::TruncatedBody => "connection closed inside the body",
        };
        f.write_str(s)
    }
}

impl std::error::Error for Error {}
