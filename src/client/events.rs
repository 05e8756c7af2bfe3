//! What the client tells its user: one [`Event`] per thing that happened,
//! printed as a line of text on a terminal or as one JSON object per line
//! in `--json` mode (every object has an `"event"` key).

use serde::Serialize;

use crate::proto::crs::{Hit, Profile};

/// A buddy as listed by `/buddies`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BuddyView {
    /// Name.
    pub user: String,
    /// Online now.
    pub online: bool,
}

/// Everything the client reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// An account was created.
    Registered {
        /// Its name.
        user: String,
    },
    /// Login complete.
    LoggedIn {
        /// Who.
        user: String,
    },
    /// Logged out (by `/logout`, or the MS lost us).
    LoggedOut {
        /// Who.
        user: String,
    },
    /// The contact list.
    Buddies {
        /// Each buddy with presence.
        buddies: Vec<BuddyView>,
    },
    /// A buddy came online.
    Online {
        /// Who.
        user: String,
    },
    /// A buddy went offline.
    Offline {
        /// Who.
        user: String,
    },
    /// Someone asks to become our buddy (signature checked).
    Request {
        /// Who.
        from: String,
    },
    /// A new buddy (either side accepted).
    BuddyAdded {
        /// Who.
        user: String,
        /// Online now.
        online: bool,
    },
    /// A buddy is gone from the list (either side removed).
    BuddyRemoved {
        /// Who.
        user: String,
    },
    /// Our buddy request was denied.
    Denied {
        /// By whom.
        by: String,
    },
    /// Directory search results.
    SearchResults {
        /// The hits.
        results: Vec<Hit>,
    },
    /// Our profile.
    Profile {
        /// Its fields.
        profile: Profile,
    },
    /// A command succeeded.
    Ok {
        /// Which.
        command: String,
        /// More for people, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// A command failed.
    Error {
        /// Which.
        command: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A message from a buddy.
    Message {
        /// Who sent it.
        from: String,
        /// The text.
        text: String,
        /// The sender's id of the message.
        id: u64,
    },
    /// A message we sent arrived.
    Delivered {
        /// To whom.
        to: String,
        /// Our id of the message.
        id: u64,
    },
    /// A message we sent did not arrive.
    SendFailed {
        /// To whom.
        to: String,
        /// Our id of the message (0 if none was given).
        id: u64,
        /// Why.
        reason: String,
    },
    /// A buddy offers a file.
    FileOffer {
        /// Who.
        from: String,
        /// Their transfer id.
        id: u64,
        /// The file's name (as they have it; stored under a safe name).
        name: String,
        /// Bytes.
        size: u64,
        /// MIME type.
        content_type: String,
    },
    /// A transfer moved on.
    FileProgress {
        /// The other side.
        peer: String,
        /// Transfer id.
        id: u64,
        /// `send` or `receive`.
        direction: String,
        /// Bytes so far.
        bytes: u64,
        /// Bytes in all.
        size: u64,
        /// Bytes per second so far.
        rate: u64,
    },
    /// A file arrived, checked, in the download directory.
    FileReceived {
        /// Who sent it.
        from: String,
        /// The name it was stored under.
        name: String,
        /// Bytes.
        size: u64,
        /// Where it is.
        path: String,
        /// Hex SHA-256 (checked against the sender's).
        sha256: String,
    },
    /// A file we sent arrived and was checked.
    FileSent {
        /// To whom.
        to: String,
        /// Its name.
        name: String,
        /// Bytes.
        size: u64,
    },
    /// A transfer failed or was cancelled; no partial file is left.
    FileFailed {
        /// The other side.
        peer: String,
        /// Transfer id.
        id: u64,
        /// The file's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The safety number of our key and a buddy's (`/verify`).
    SafetyNumber {
        /// The buddy.
        user: String,
        /// Twelve groups of five digits, the same on both sides.
        number: String,
        /// Whether the user recorded comparing it (`/verify NAME ok`).
        verified: bool,
    },
    /// The servers hand out a key for a buddy that differs from the one
    /// remembered: nothing goes to them until `/verify NAME ok`.
    KeyChanged {
        /// The buddy.
        user: String,
    },
    /// Something worth knowing that is no command's outcome.
    Notice {
        /// What.
        text: String,
    },
}

impl Event {
    /// The event as one JSON line (without the newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self)
            .unwrap_or_else(|_| String::from("{\"event\":\"notice\",\"text\":\"unprintable\"}"))
    }

    /// The event as a line for people.
    pub fn to_text(&self) -> String {
        match self {
            Event::Registered { user } => format!("registered {user}; log in with /login {user}"),
            Event::LoggedIn { user } => format!("logged in as {user}"),
            Event::LoggedOut { user } => format!("{user} logged out"),
            Event::Buddies { buddies } if buddies.is_empty() => {
                "no buddies yet; find people with /search and /add".into()
            }
            Event::Buddies { buddies } => {
                let mut s = String::from("buddies:");
                for b in buddies {
                    s.push_str(&format!(
                        "\n  {} {}",
                        if b.online { "*" } else { " " },
                        b.user
                    ));
                    s.push_str(if b.online { " (online)" } else { "" });
                }
                s
            }
            Event::Online { user } => format!("* {user} is online"),
            Event::Offline { user } => format!("  {user} went offline"),
            Event::Request { from } => {
                format!("{from} wants to be your buddy: /accept {from} or /deny {from}")
            }
            Event::BuddyAdded { user, online } => {
                format!(
                    "{user} is now your buddy{}",
                    if *online { " (online)" } else { "" }
                )
            }
            Event::BuddyRemoved { user } => format!("{user} is no longer your buddy"),
            Event::Denied { by } => format!("{by} denied your buddy request"),
            Event::SearchResults { results } if results.is_empty() => "no one found".into(),
            Event::SearchResults { results } => {
                let mut s = String::from("found:");
                for h in results {
                    let fields: Vec<String> =
                        h.profile.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    s.push_str(&format!(
                        "\n  {}{} {}",
                        h.user,
                        if h.online { " (online)" } else { "" },
                        fields.join(", ")
                    ));
                }
                s
            }
            Event::Profile { profile } if profile.is_empty() => {
                "profile is empty; set a field with /profile FIELD VALUE".into()
            }
            Event::Profile { profile } => {
                let mut s = String::from("profile:");
                for (k, v) in profile {
                    s.push_str(&format!("\n  {k}: {v}"));
                }
                s
            }
            Event::Ok { command, detail } => match detail {
                Some(d) => format!("ok: {d}"),
                None => format!("ok ({command})"),
            },
            Event::Error { command, reason } => format!("error ({command}): {reason}"),
            Event::Message { from, text, .. } => format!("<{from}> {text}"),
            Event::Delivered { to, id } => format!("  (delivered to {to}, #{id})"),
            Event::SendFailed { to, reason, .. } => format!("! not delivered to {to}: {reason}"),
            Event::FileOffer {
                from, name, size, ..
            } => format!(
                "{from} offers the file '{name}' ({}): /accept {from} or /deny {from}",
                human_size(*size)
            ),
            Event::FileProgress {
                peer,
                direction,
                bytes,
                size,
                rate,
                ..
            } => {
                let pct = if *size == 0 { 100 } else { bytes * 100 / size };
                let filled = (pct / 5) as usize;
                let left = if *rate == 0 {
                    0
                } else {
                    size.saturating_sub(*bytes) / rate
                };
                format!(
                    "[{}{}] {pct:>3}% {} {peer}: {} of {}, {}/s, {left}s left",
                    "#".repeat(filled.min(20)),
                    "-".repeat(20 - filled.min(20)),
                    if direction == "send" { "to" } else { "from" },
                    human_size(*bytes),
                    human_size(*size),
                    human_size(*rate)
                )
            }
            Event::FileReceived {
                from, path, size, ..
            } => {
                format!("received {} from {from}: {path}", human_size(*size))
            }
            Event::FileSent { to, name, size } => {
                format!("sent '{name}' ({}) to {to}", human_size(*size))
            }
            Event::FileFailed {
                peer, name, reason, ..
            } => format!("! transfer of '{name}' with {peer} failed: {reason}"),
            Event::SafetyNumber {
                user,
                number,
                verified,
            } => format!(
                "safety number with {user}: {number}\n  {}",
                if *verified {
                    "verified".to_owned()
                } else {
                    format!("not verified: compare it with {user} in person or by a call, then /verify {user} ok")
                }
            ),
            Event::KeyChanged { user } => format!(
                "!! WARNING: the servers now give a different key for {user}. Nothing goes to {user} until you check: \
                 compare /verify {user} with {user} (in person or by a call) and accept with /verify {user} ok. \
                 Only {user} registering again explains this; otherwise someone may be listening."
            ),
            Event::Notice { text } => text.clone(),
        }
    }
}

/// Bytes for people.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes() {
        assert_eq!(
            Event::LoggedIn { user: "joe".into() }.to_json(),
            r#"{"event":"logged-in","user":"joe"}"#
        );
        assert_eq!(
            Event::Buddies {
                buddies: vec![BuddyView {
                    user: "alice".into(),
                    online: true
                }]
            }
            .to_json(),
            r#"{"event":"buddies","buddies":[{"user":"alice","online":true}]}"#
        );
        assert_eq!(
            Event::Ok {
                command: "add".into(),
                detail: None
            }
            .to_json(),
            r#"{"event":"ok","command":"add"}"#
        );
        assert_eq!(
            Event::Error {
                command: "login".into(),
                reason: "password failure".into()
            }
            .to_json(),
            r#"{"event":"error","command":"login","reason":"password failure"}"#
        );
    }
}
