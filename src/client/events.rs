//! What the client tells its user: one [`Event`] per thing that happened,
//! printed as a line of text on a terminal or as one JSON object per line
//! in `--json` mode (every object has an `"event"` key).
//!
//! Most strings in an event came from another program (a buddy's message,
//! names, file names, profile fields, servers' reasons). A terminal acts on
//! control characters, so every such string goes through [`clean`] before
//! it is shown, in every mode: an escape sequence in a message is shown as
//! text and can neither clear the screen, retitle the terminal, move the
//! cursor nor forge a line. JSON escapes the same characters as `\uXXXX`.

use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;

pub use super::relay::Via;
use crate::proto::crs::{Hit, Profile};

/// A buddy as listed by `/buddies`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BuddyView {
    /// Name.
    pub user: String,
    /// Online now.
    pub online: bool,
    /// `available`, `away` or `busy` while online; `offline` otherwise
    /// (also for a buddy who is invisible).
    pub status: String,
    /// The buddy's personal message while online (may be empty).
    pub message: String,
    /// How we reach them, once a connection was made this login.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via: Option<Via>,
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
    /// An online buddy's status or personal message (not end to end:
    /// the servers carry it).
    Status {
        /// Who.
        user: String,
        /// `available`, `away` or `busy`.
        status: String,
        /// Their personal message (may be empty).
        message: String,
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
        /// When it was sent (RFC 3339, UTC), for a message that waited.
        #[serde(skip_serializing_if = "Option::is_none")]
        sent_at: Option<String>,
        /// It waited at the servers while we were offline.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        offline: bool,
    },
    /// A buddy started or stopped typing to us.
    Typing {
        /// Who.
        from: String,
        /// `on` or `off`.
        state: String,
    },
    /// A message we sent arrived.
    Delivered {
        /// To whom.
        to: String,
        /// Our id of the message.
        id: u64,
        /// Whether it went straight to them or through the relay (an
        /// offline message: `relay`, through the servers).
        via: Via,
        /// It was an offline message, read at the recipient's login.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        offline: bool,
    },
    /// A message to a buddy who is offline was sealed and filed at the
    /// servers; `delivered` (offline) follows when they read it.
    Queued {
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
        /// Where the transfer started: the bytes the receiver kept from
        /// a transfer of the same file that broke off (0: from the start).
        resumed: u64,
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
        /// Whether it came straight from them or through the relay.
        via: Via,
    },
    /// A file we sent arrived and was checked.
    FileSent {
        /// To whom.
        to: String,
        /// Its name.
        name: String,
        /// Bytes.
        size: u64,
        /// Bytes the receiver already had from a transfer that broke off
        /// (not sent again).
        resumed: u64,
        /// Whether it went straight to them or through the relay.
        via: Via,
    },
    /// A transfer failed or was cancelled; no partial file is left, but
    /// for the data of one that broke off, kept (hidden) to resume.
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
    /// The last lines of a conversation (`/history`).
    History {
        /// The buddy.
        with: String,
        /// Oldest first.
        messages: Vec<super::history::Entry>,
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
    /// Never shown: the client asks to learn when the interface has taken
    /// every event sent before this one. The interface answers it (or
    /// just drops it) when it reaches it; see [`Flush`].
    #[serde(skip)]
    Flush(Flush),
}

/// The answer to an [`Event::Flush`]: whoever takes the event from the
/// channel has taken everything before it, and says so with
/// [`Flush::answer`], or by dropping it (a consumer that shows nothing,
/// or one that is going away, does not keep the client waiting).
#[derive(Clone, Debug)]
pub struct Flush(Sender<()>);

impl Flush {
    /// A flush to send, and where its answer arrives (a disconnection
    /// counts as an answer: the flush was dropped).
    pub(crate) fn new() -> (Flush, Receiver<()>) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        (Flush(tx), rx)
    }

    /// Says that every event before this one was taken.
    pub fn answer(self) {
        let _ = self.0.try_send(());
    }
}

/// Flushes carry nothing to compare: any two are alike.
impl PartialEq for Flush {
    fn eq(&self, _: &Flush) -> bool {
        true
    }
}

impl Eq for Flush {}

impl Event {
    /// The event as one JSON line (without the newline).
    /// JSON escapes the C0 controls itself; the other characters a
    /// terminal would act on (DEL, C1, bidirectional overrides) are escaped
    /// here too, so that the line is safe to show as it is.
    pub fn to_json(&self) -> String {
        let json = serde_json::to_string(self)
            .unwrap_or_else(|_| String::from("{\"event\":\"notice\",\"text\":\"unprintable\"}"));
        if !json.chars().any(is_control) {
            return json;
        }
        // Such characters can only be inside strings (JSON's own syntax is
        // plain ASCII), where `\uXXXX` means the same character.
        let mut out = String::with_capacity(json.len() + 16);
        for ch in json.chars() {
            if is_control(ch) {
                out.push_str(&format!("\\u{:04x}", ch as u32));
            } else {
                out.push(ch);
            }
        }
        out
    }

    /// The event as a line for people (lines of our own making separated
    /// by `\n`; every remote string cleaned).
    pub fn to_text(&self) -> String {
        let c = clean;
        match self {
            // Never shown (interfaces answer it instead).
            Event::Flush(_) => String::new(),
            Event::Registered { user } => {
                let user = c(user);
                format!("registered {user}; log in with /login {user}")
            }
            Event::LoggedIn { user } => format!("logged in as {}", c(user)),
            Event::LoggedOut { user } => format!("{} logged out", c(user)),
            Event::Buddies { buddies } if buddies.is_empty() => {
                "no buddies yet; find people with /search and /add".into()
            }
            Event::Buddies { buddies } => {
                let mut s = String::from("buddies:");
                for b in buddies {
                    s.push_str(&format!(
                        "\n  {} {}",
                        if b.online { "*" } else { " " },
                        c(&b.user)
                    ));
                    if b.online && b.status != "available" {
                        s.push_str(&format!(" ({})", c(&b.status)));
                    } else if b.online {
                        s.push_str(" (online)");
                    }
                    if b.via == Some(Via::Relay) {
                        s.push_str(" through the relay");
                    }
                    if b.online && !b.message.is_empty() {
                        s.push_str(&format!(": {}", c(&b.message)));
                    }
                }
                s
            }
            Event::Online { user } => format!("* {} is online", c(user)),
            Event::Offline { user } => format!("  {} went offline", c(user)),
            Event::Status {
                user,
                status,
                message,
            } if message.is_empty() => format!("* {} is {}", c(user), c(status)),
            Event::Status {
                user,
                status,
                message,
            } => format!("* {} is {}: {}", c(user), c(status), c(message)),
            Event::Request { from } => {
                let from = c(from);
                format!("{from} wants to be your buddy: /accept {from} or /deny {from}")
            }
            Event::BuddyAdded { user, online } => {
                format!(
                    "{} is now your buddy{}",
                    c(user),
                    if *online { " (online)" } else { "" }
                )
            }
            Event::BuddyRemoved { user } => format!("{} is no longer your buddy", c(user)),
            Event::Denied { by } => format!("{} denied your buddy request", c(by)),
            Event::SearchResults { results } if results.is_empty() => "no one found".into(),
            Event::SearchResults { results } => {
                let mut s = String::from("found:");
                for h in results {
                    let fields: Vec<String> = h
                        .profile
                        .iter()
                        .map(|(k, v)| format!("{}={}", c(k), c(v)))
                        .collect();
                    s.push_str(&format!(
                        "\n  {}{} {}",
                        c(&h.user),
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
                    s.push_str(&format!("\n  {}: {}", c(k), c(v)));
                }
                s
            }
            Event::Ok { command, detail } => match detail {
                Some(d) => format!("ok: {}", c(d)),
                None => format!("ok ({})", c(command)),
            },
            Event::Error { command, reason } => format!("error ({}): {}", c(command), c(reason)),
            Event::Message {
                from,
                text,
                sent_at: Some(at),
                ..
            } => match action(text) {
                Some(act) => format!("[{}] * {} {}", c(at), c(from), c(act)),
                None => format!("[{}] <{}> {}", c(at), c(from), c(text)),
            },
            Event::Message { from, text, .. } => match action(text) {
                Some(act) => format!("* {} {}", c(from), c(act)),
                None => format!("<{}> {}", c(from), c(text)),
            },
            Event::Typing { from, state } if state == "on" => format!("  {} is typing…", c(from)),
            Event::Typing { from, .. } => format!("  {} stopped typing", c(from)),
            Event::Delivered {
                to,
                id,
                offline: true,
                ..
            } => format!("  (delivered to {} when they came online, #{id})", c(to)),
            Event::Delivered {
                to,
                id,
                via: Via::Direct,
                ..
            } => format!("  (delivered to {}, #{id})", c(to)),
            Event::Delivered { to, id, .. } => {
                format!("  (delivered to {} through the relay, #{id})", c(to))
            }
            Event::Queued { to, id } => format!("  queued for {} (offline), #{id}", c(to)),
            Event::SendFailed { to, id, reason } => {
                format!("! not delivered to {} (#{id}): {}", c(to), c(reason))
            }
            Event::FileOffer {
                from, name, size, ..
            } => {
                let from = c(from);
                format!(
                    "{from} offers the file '{}' ({}): /accept {from} or /deny {from}",
                    c(name),
                    human_size(*size)
                )
            }
            Event::FileProgress {
                peer,
                direction,
                bytes,
                size,
                rate,
                ..
            } => progress_text(&c(peer), direction, *bytes, *size, *rate),
            Event::FileReceived {
                from, path, size, ..
            } => {
                format!(
                    "received {} from {}: {}",
                    human_size(*size),
                    c(from),
                    c(path)
                )
            }
            Event::FileSent {
                to,
                name,
                size,
                via,
                ..
            } => format!(
                "sent '{}' ({}) to {}{}",
                c(name),
                human_size(*size),
                c(to),
                if *via == Via::Relay {
                    " through the relay"
                } else {
                    ""
                }
            ),
            Event::FileFailed {
                peer, name, reason, ..
            } => format!(
                "! transfer of '{}' with {} failed: {}",
                c(name),
                c(peer),
                c(reason)
            ),
            Event::History { with, messages } if messages.is_empty() => {
                format!("no history with {}", c(with))
            }
            Event::History { with, messages } => {
                let mut s = format!("history with {}:", c(with));
                for m in messages {
                    let who = if m.direction == "sent" { "me" } else { with.as_str() };
                    let state = match m.state.as_deref() {
                        Some("delivered") | None => "",
                        Some("failed") => " (not delivered)",
                        Some(_) => " (pending)",
                    };
                    s.push_str(&format!("\n  <{}> {}{state}", c(who), c(&m.text)));
                }
                s
            }
            Event::SafetyNumber {
                user,
                number,
                verified,
            } => format!(
                "safety number with {}: {}\n  {}",
                c(user),
                c(number),
                if *verified {
                    "verified".to_owned()
                } else {
                    format!(
                        "not verified: compare it with {0} in person or by a call, then /verify {0} ok",
                        c(user)
                    )
                }
            ),
            Event::KeyChanged { user } => format!(
                "!! WARNING: the servers now give a different key for {0}. Nothing goes to {0} until you check: \
                 compare /verify {0} with {0} (in person or by a call) and accept with /verify {0} ok. \
                 Only {0} registering again explains this; otherwise someone may be listening.",
                c(user)
            ),
            Event::Notice { text } => text.lines().map(clean).collect::<Vec<_>>().join("\n"),
        }
    }
}

/// The action of a `/me` message: its text after the `/me ` prefix.
pub fn action(text: &str) -> Option<&str> {
    text.strip_prefix("/me ")
}

/// A transfer's progress as one line: a bar, percent, bytes, the rate over
/// the last seconds and the time left (`?` while the rate is unknown).
pub fn progress_text(peer: &str, direction: &str, bytes: u64, size: u64, rate: u64) -> String {
    let pct = bytes
        .saturating_mul(100)
        .checked_div(size)
        .unwrap_or(100)
        .min(100);
    let filled = (pct / 5) as usize;
    let left = if bytes >= size {
        "done".to_owned()
    } else {
        match size.saturating_sub(bytes).checked_div(rate) {
            Some(secs) => format!("{} left", human_duration(secs)),
            None => "? left".to_owned(),
        }
    };
    let what = match direction {
        "send" => format!("to {peer}"),
        "hash" => format!("hashing for {peer}"),
        _ => format!("from {peer}"),
    };
    let rate = if rate == 0 {
        "-".to_owned()
    } else {
        format!("{}/s", human_size(rate))
    };
    format!(
        "[{}{}] {pct:>3}% {what}: {} of {}, {rate}, {left}",
        "#".repeat(filled.min(20)),
        "-".repeat(20 - filled.min(20)),
        human_size(bytes),
        human_size(size),
    )
}

/// Seconds for people: `42s`, `3m07s`, `2h05m`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// Whether the terminal would act on `ch` rather than show it: C0 and C1
/// controls, DEL, and the Unicode format characters that reorder or hide
/// text (bidirectional overrides, line and paragraph separators).
fn is_control(ch: char) -> bool {
    matches!(ch,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2066}'..='\u{2069}' | '\u{061c}' | '\u{feff}')
}

/// `s` made harmless for a terminal and kept on one line: a tab becomes a
/// space, other C0 controls and DEL are shown in caret notation (`^[` for
/// ESC, `^J` for a newline), and C1 controls and the format characters
/// that reorder or hide text (bidirectional overrides, zero-width and
/// line-separator characters) as `<U+XXXX>`. Everything else is kept.
pub fn clean(s: &str) -> String {
    if !s.chars().any(is_control) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for ch in s.chars() {
        match ch {
            '\t' => out.push(' '),
            '\u{0}'..='\u{1f}' => {
                out.push('^');
                out.push(char::from(ch as u8 ^ 0x40));
            }
            '\u{7f}' => out.push_str("^?"),
            ch if is_control(ch) => out.push_str(&format!("<U+{:04X}>", ch as u32)),
            ch => out.push(ch),
        }
    }
    out
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
    fn remote_strings_are_shown_inert() {
        let hostile =
            "\u{1b}[2J\u{1b}]0;pwned\u{7}\u{1b}[10;10H<alice> hi\nforged\u{9b}2J\u{202e}x\u{7f}\ty";
        let cleaned = clean(hostile);
        assert!(!cleaned.chars().any(|c| c.is_control()), "{cleaned:?}");
        assert_eq!(
            cleaned,
            "^[[2J^[]0;pwned^G^[[10;10H<alice> hi^Jforged<U+009B>2J<U+202E>x^? y"
        );
        let every = [
            Event::Message {
                from: "a\u{1b}b".into(),
                text: hostile.into(),
                id: 1,
                sent_at: None,
                offline: false,
            },
            Event::FileOffer {
                from: "a".into(),
                id: 1,
                name: hostile.into(),
                size: 1,
                content_type: "x".into(),
            },
            Event::SearchResults {
                results: vec![Hit {
                    user: "u".into(),
                    profile: [("f\u{1b}".to_owned(), hostile.to_owned())].into(),
                    online: true,
                }],
            },
            Event::Error {
                command: "c".into(),
                reason: hostile.into(),
            },
            Event::Notice {
                text: hostile.into(),
            },
            Event::Status {
                user: "a".into(),
                status: "away".into(),
                message: hostile.into(),
            },
            Event::Buddies {
                buddies: vec![BuddyView {
                    user: "a".into(),
                    online: true,
                    status: "busy".into(),
                    message: hostile.into(),
                    via: None,
                }],
            },
        ];
        for e in &every {
            let text = e.to_text();
            assert!(
                !text.chars().any(|c| c.is_control() && c != '\n'),
                "{text:?}"
            );
            let json = e.to_json();
            assert!(!json.chars().any(|c| c.is_control()), "{json:?}");
            assert!(!json.contains('\u{202e}'), "{json:?}");
            // Still the same value once parsed.
            let back: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert!(back.to_string().len() > 10);
        }
        // The text of a message stays on one line.
        assert_eq!(every[0].to_text().lines().count(), 1);
    }

    #[test]
    fn me_and_progress_lines() {
        let e = Event::Message {
            from: "bob".into(),
            text: "/me waves".into(),
            id: 3,
            sent_at: None,
            offline: false,
        };
        assert_eq!(e.to_text(), "* bob waves");
        let p = progress_text("bob", "send", 50, 100, 0);
        assert!(p.contains(" 50% to bob") && p.ends_with("? left"), "{p}");
        let p = progress_text("bob", "receive", 1024, 2048, 512);
        assert!(p.ends_with("512 B/s, 2s left"), "{p}");
    }

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
                    online: true,
                    status: "away".into(),
                    message: "at lunch".into(),
                    via: None,
                }]
            }
            .to_json(),
            r#"{"event":"buddies","buddies":[{"user":"alice","online":true,"status":"away","message":"at lunch"}]}"#
        );
        assert_eq!(
            Event::Status {
                user: "alice".into(),
                status: "away".into(),
                message: "at lunch".into(),
            }
            .to_json(),
            r#"{"event":"status","user":"alice","status":"away","message":"at lunch"}"#
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
