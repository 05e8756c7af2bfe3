//! A user's status (available, away, busy, invisible) and personal
//! message: set by the user's client through its MS, kept in the user's
//! record at the CRS, and carried to buddies with presence. Neither is end
//! to end: the servers see both.

use serde::{Deserialize, Serialize};

use super::ProtoError;

/// Longest personal message, in bytes: a line beside a name in a buddy
/// list, not a message; a login's contact list of a thousand buddies with
/// full messages stays far below the 1 MiB body limit.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 128;

/// What a user tells their buddies about being reachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The default.
    #[default]
    Available,
    /// Away from the keyboard (also set by the client after idle time).
    Away,
    /// Do not disturb.
    Busy,
    /// Looks offline to buddies, who are still reachable and may answer.
    Invisible,
}

impl Status {
    /// Every status, in the order the usage text lists them.
    pub const ALL: [Status; 4] = [
        Status::Available,
        Status::Away,
        Status::Busy,
        Status::Invisible,
    ];

    /// The wire (and command) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Available => "available",
            Status::Away => "away",
            Status::Busy => "busy",
            Status::Invisible => "invisible",
        }
    }

    /// The status named `s` (exactly, lower case).
    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status and personal message: the body of `STATUS` on the client's
/// and the MS's links.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// The status.
    #[serde(default)]
    pub status: Status,
    /// The personal message (may be empty).
    #[serde(default)]
    pub message: String,
}

impl StatusInfo {
    /// Refuses a personal message over [`MAX_STATUS_MESSAGE_BYTES`].
    pub fn checked(self) -> Result<StatusInfo, ProtoError> {
        if self.message.len() > MAX_STATUS_MESSAGE_BYTES {
            return Err(ProtoError::Invalid("message"));
        }
        Ok(self)
    }
}

/// `message` cut to at most [`MAX_STATUS_MESSAGE_BYTES`] (on a character
/// boundary): what a client keeps of a personal message another program
/// sent, whatever its size.
pub fn bounded(message: &str) -> String {
    if message.len() <= MAX_STATUS_MESSAGE_BYTES {
        return message.to_owned();
    }
    let mut end = MAX_STATUS_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_bounds() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(Status::parse("Away"), None);
        let long = "é".repeat(100);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_STATUS_MESSAGE_BYTES && long.starts_with(&cut));
        assert!(StatusInfo {
            status: Status::Away,
            message: long
        }
        .checked()
        .is_err());
        let parsed: StatusInfo = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, StatusInfo::default());
    }
}
