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
    /// Something worth knowing that is no command's outcome.
    Notice {
        /// What.
        text: String,
    },
}

impl Event {
    /// The event as one JSON line (without the newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"event\":\"notice\",\"text\":\"unprintable\"}"))
    }

    /// The event as a line for people.
    pub fn to_text(&self) -> String {
        match self {
            Event::Registered { user } => format!("registered {user}; log in with /login {user}"),
            Event::LoggedIn { user } => format!("logged in as {user}"),
            Event::LoggedOut { user } => format!("{user} logged out"),
            Event::Buddies { buddies } if buddies.is_empty() => "no buddies yet; find people with /search and /add".into(),
            Event::Buddies { buddies } => {
                let mut s = String::from("buddies:");
                for b in buddies {
                    s.push_str(&format!("\n  {} {}", if b.online { "*" } else { " " }, b.user));
                    s.push_str(if b.online { " (online)" } else { "" });
                }
                s
            }
            Event::Online { user } => format!("* {user} is online"),
            Event::Offline { user } => format!("  {user} went offline"),
            Event::Request { from } => format!("{from} wants to be your buddy: /accept {from} or /deny {from}"),
            Event::BuddyAdded { user, online } => {
                format!("{user} is now your buddy{}", if *online { " (online)" } else { "" })
            }
            Event::BuddyRemoved { user } => format!("{user} is no longer your buddy"),
            Event::Denied { by } => format!("{by} denied your buddy request"),
            Event::SearchResults { results } if results.is_empty() => "no one found".into(),
            Event::SearchResults { results } => {
                let mut s = String::from("found:");
                for h in results {
                    let fields: Vec<String> = h.profile.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    s.push_str(&format!(
                        "\n  {}{} {}",
                        h.user,
                        if h.online { " (online)" } else { "" },
                        fields.join(", ")
                    ));
                }
                s
            }
            Event::Profile { profile } if profile.is_empty() => "profile is empty; set a field with /profile FIELD VALUE".into(),
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
            Event::Notice { text } => text.clone(),
        }
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
