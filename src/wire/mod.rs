//! The wire codec: the seed's HTTP-like text messages.
//!
//! ```text
//! METHOD-or-"NNN reason" CRLF
//! Name: value CRLF            (zero or more)
//! Content-Length: N CRLF      (always present)
//! CRLF
//! N bytes of body
//! CRLF
//! ```
//! [`parse`] and [`Message::encode`] do no I/O; [`io`] reads and writes
//! whole messages on a blocking stream under [`Limits`] and a deadline.

pub mod code;
mod error;
pub mod io;
mod limits;
mod message;
mod parse;

pub use error::Error;
pub use limits::Limits;
pub use message::{Headers, Message, Start};
pub use parse::{parse, parse_head, Head, Status};
