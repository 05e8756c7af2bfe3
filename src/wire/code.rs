//! Reply codes, one convention for every request of every link.
//!
//! A reply's start line is `NNN reason`, as in HTTP; the reason is for
//! people and logs, the code is what programs act on.

/// Done.
pub const OK: u16 = 200;
/// Accepted for later: e.g. a buddy request stored for an offline user.
pub const STORED: u16 = 202;
/// Malformed, or a header the method needs is missing or invalid.
pub const BAD_REQUEST: u16 = 400;
/// Authentication failed ("password failure", bad proof, bad MSkey).
pub const AUTH_FAILED: u16 = 401;
/// Understood but not allowed (not a buddy, registration closed, not logged in).
pub const FORBIDDEN: u16 = 403;
/// No such user, file offer or session.
pub const NOT_FOUND: u16 = 404;
/// The method is not one this link knows.
pub const UNKNOWN_METHOD: u16 = 405;
/// The message did not arrive in full before its deadline.
pub const TIMEOUT: u16 = 408;
/// Conflicts with the current state (already logged in, already logging
/// in, name taken, already buddies).
pub const CONFLICT: u16 = 409;
/// A line, the header block or the body exceeded a limit.
pub const TOO_LARGE: u16 = 413;
/// Too many attempts; try again later.
pub const RATE_LIMITED: u16 = 429;
/// A fault on the server's side; the request may be retried.
pub const INTERNAL: u16 = 500;
/// The server is overloaded or has nothing to offer (no MS available).
pub const BUSY: u16 = 503;
