//! The user's side of the client: commands in, events out, in one of three
//! modes chosen at start:
//! - [`screen`]: full-screen, in the manner of irssi and weechat (when
//!   stdin and stdout are terminals and neither `--plain` nor `--json`);
//! - [`plain`]: one line of text per event on stdout, commands from stdin
//!   lines (`--plain`, or when stdin or stdout is not a terminal);
//! - `--json`: [`plain`]'s loop with one JSON object per event.
//!
//! Every mode runs commands through [`Commands`] and shows only what comes
//! out of the client's [`Event`] channel, so nothing a command or a buddy
//! says can go missing in one mode and not in another; every remote string
//! is cleaned by [`super::events::clean`] on its way to the screen.

pub mod history;
pub mod plain;
pub mod screen;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::{unbounded, Sender};

use super::error::ClientError;
use super::events::Event;
use super::{start, Client, ClientConfig};
use crate::proto::crs::Profile;
use crate::proto::status::Status;
use crate::proto::Refusal;

/// Where passwords come from when not typed at a prompt.
#[derive(Clone, Debug, Default)]
pub struct Passwords {
    /// First line of this file.
    pub file: Option<PathBuf>,
}

impl Passwords {
    /// The password given ahead of time: `--password-file`, then
    /// `IMS_PASSWORD`; `None` if neither is set.
    pub fn preset(&self) -> Option<Result<String, ClientError>> {
        if let Some(path) = &self.file {
            return Some(
                std::fs::read_to_string(path)
                    .map(|text| text.lines().next().unwrap_or("").to_owned())
                    .map_err(|e| ClientError::reading(path, e)),
            );
        }
        std::env::var("IMS_PASSWORD").ok().map(Ok)
    }

    /// The password: [`Passwords::preset`], then a no-echo prompt on a
    /// terminal (twice with `confirm`).
    pub fn get(&self, prompt: &str, confirm: bool) -> Result<String, ClientError> {
        if let Some(p) = self.preset() {
            return p;
        }
        if !std::io::stdin().is_terminal() {
            return Err(ClientError::NoPassword);
        }
        prompt_twice(prompt, confirm)
    }
}

/// A no-echo prompt on the terminal, twice with `confirm`.
fn prompt_twice(prompt: &str, confirm: bool) -> Result<String, ClientError> {
    let first = rpassword::prompt_password(prompt).map_err(ClientError::Local)?;
    if confirm {
        let again = rpassword::prompt_password("again: ").map_err(ClientError::Local)?;
        if again != first {
            return Err(ClientError::PasswordsDiffer);
        }
    }
    Ok(first)
}

/// One line of help per command.
pub const HELP: &[(&str, &str)] = &[
    ("/login NAME", "log in (asks for the password)"),
    (
        "/msg NAME[,NAME...] TEXT",
        "send TEXT to one or more buddies",
    ),
    (
        "TEXT",
        "a line without / goes to this window's buddy, or whoever you last wrote to or heard from",
    ),
    (
        "/me ACTION",
        "send an action (* you ACTION) to the same buddy",
    ),
    (
        "/query [NAME]",
        "talk to NAME: go to (or open) their window; alone: the main window",
    ),
    ("/window N", "go to window N (full screen; also Alt-N)"),
    (
        "/close",
        "close this buddy window (line mode: forget /query)",
    ),
    ("/send NAME PATH", "offer a file to NAME"),
    ("/cancel NAME", "stop every file transfer with NAME"),
    (
        "/typing NAME on|off",
        "tell NAME you started or stopped typing",
    ),
    (
        "/block NAME",
        "refuse everything from NAME and look offline to them",
    ),
    ("/unblock NAME", "stop blocking NAME"),
    ("/blocked", "list whom you block"),
    (
        "/status [available|away|busy|invisible [MESSAGE]]",
        "show or set your status and personal message (the servers see both)",
    ),
    ("/logout", "log out; buddies see you go offline"),
    ("/buddies", "list your buddies and who is online"),
    ("/search TEXT", "find people by name prefix or profile text"),
    ("/add NAME", "ask NAME to be your buddy"),
    (
        "/accept NAME",
        "accept NAME's oldest file offer, or else NAME's buddy request",
    ),
    (
        "/deny NAME",
        "deny NAME's oldest file offer, or else NAME's buddy request",
    ),
    ("/remove NAME", "remove NAME from your buddies (both ways)"),
    (
        "/profile [set] [FIELD VALUE]",
        "show your profile, or set FIELD (empty VALUE clears it)",
    ),
    (
        "/history NAME [N]",
        "show the last N (default 20) lines of your conversation with NAME",
    ),
    (
        "/verify NAME [ok]",
        "show the safety number with NAME; 'ok' records that you compared it (and accepts a changed key)",
    ),
    (
        "/passwd",
        "change your password (asks for the current one, then the new one twice)",
    ),
    ("/help", "this list"),
    ("/quit", "log out and exit"),
];

/// The help text, one command a line.
pub fn help_text() -> String {
    let mut s = String::from("commands:");
    for (c, what) in HELP {
        s.push_str(&format!("\n  {c:<28} {what}"));
    }
    s
}

/// The command words, for completion.
pub fn command_words() -> Vec<&'static str> {
    HELP.iter()
        .filter_map(|(c, _)| c.split(' ').next())
        .filter(|c| c.starts_with('/'))
        .collect()
}

/// How the interface looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Full screen.
    Screen,
    /// One line of text per event.
    Plain,
    /// One JSON object per event.
    Json,
}

impl Mode {
    /// The mode for these flags and this stdin and stdout.
    pub fn choose(plain: bool, json: bool) -> Mode {
        if json {
            Mode::Json
        } else if plain || !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
            Mode::Plain
        } else {
            Mode::Screen
        }
    }
}

/// Runs the interface until `/quit` or end of input; the exit code.
pub fn run(config: ClientConfig, mode: Mode, login: Option<String>, passwords: Passwords) -> i32 {
    let (tx, rx) = unbounded();
    let running = match start(config, tx.clone()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ims-client: cannot listen: {e}");
            return 1;
        }
    };
    let commands = Commands {
        client: running.client.clone(),
        tx,
    };
    let (code, printer) = match mode {
        Mode::Screen => screen::run(commands, rx, login, passwords),
        Mode::Plain | Mode::Json => {
            let json = mode == Mode::Json;
            running
                .client
                .show_directly(Arc::new(move |e: &Event| plain::print_one(e, json)));
            plain::run(commands, rx, json, login, passwords)
        }
    };
    running.shutdown();
    // Every sender is gone now, so the printer prints what is left and ends.
    printer.join().ok();
    code
}

/// What a command line asks for that needs a secret first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Secret {
    /// `/login NAME`: the password.
    Login(String),
    /// `/passwd`: the current password and the new one.
    Passwd,
}

/// Whether `line` is a command that needs a password typed (or read).
pub fn needs_secret(line: &str) -> Option<Secret> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("/login"), Some(name), None) => Some(Secret::Login(name.to_owned())),
        (Some("/passwd"), None, None) => Some(Secret::Passwd),
        _ => None,
    }
}

/// A message handed to the client by a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// To whom.
    pub to: String,
    /// Its id (its `delivered` or `send-failed` carries the same).
    pub id: u64,
    /// The text as sent.
    pub text: String,
}

/// Runs commands against the client; every outcome is an event on the
/// same channel as the client's own.
#[derive(Clone)]
pub struct Commands {
    /// The client.
    pub client: Arc<Client>,
    tx: Sender<Event>,
}

impl Commands {
    /// Puts `e` in line with the client's events.
    pub fn emit(&self, e: Event) {
        self.tx.send(e).ok();
    }

    fn error(&self, command: &str, reason: impl Into<String>) {
        self.emit(Event::Error {
            command: command.into(),
            reason: reason.into(),
        });
    }

    fn outcome(&self, command: &str, r: Result<Option<String>, ClientError>) {
        match r {
            Ok(detail) => self.emit(Event::Ok {
                command: command.into(),
                detail,
            }),
            Err(e) => self.error(command, e.to_string()),
        }
    }

    fn usage(&self, command: &str, usage: &str) {
        self.error(command, format!("usage: {usage}"));
    }

    /// Logs in; whether it worked. A wrong name and a wrong password look
    /// the same (the servers do not say which, so that names cannot be
    /// probed), and the message says so.
    pub fn login(&self, user: &str, password: Result<String, ClientError>) -> bool {
        let password = match password {
            Ok(p) => p,
            Err(e) => {
                self.error("login", e.to_string());
                return false;
            }
        };
        match self.client.login(user, &password) {
            Ok(()) => true,
            Err(e) if e.refusal() == Some(&Refusal::PasswordFailure) => {
                self.error("login", "wrong name or password");
                false
            }
            Err(e) => {
                self.error("login", e.to_string());
                false
            }
        }
    }

    /// Changes the password from `current` to `new`.
    pub fn passwd(&self, current: &str, new: &str) {
        self.outcome("passwd", self.client.passwd(current, new).map(|()| None));
    }

    fn send_text(&self, names: &str, text: &str) -> Vec<Sent> {
        let mut sent = Vec::new();
        for to in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let to = to.to_ascii_lowercase();
            match self.client.send_message(&to, text) {
                Ok(id) => sent.push(Sent {
                    to,
                    id,
                    text: text.to_owned(),
                }),
                Err((id, e)) => self.emit(Event::SendFailed {
                    to,
                    id,
                    reason: e.to_string(),
                }),
            }
        }
        sent
    }

    /// Offers a file (hashing it first, which may take a while: full-screen
    /// mode calls this off its drawing thread).
    pub fn send_file(&self, name: &str, path: &Path) {
        let r = self.client.send_file(name, path).map(|_| {
            Some(format!(
                "offered {} to {name}; waiting for them to accept",
                path.display()
            ))
        });
        self.outcome("send", r);
    }

    /// `/status [STATUS [MESSAGE]]`: shows ours, or sets it.
    fn status_command(&self, rest: &str) {
        let c = &self.client;
        if !c.is_logged_in() {
            self.error("status", "not logged in; /login NAME first");
            return;
        }
        if rest.is_empty() {
            let now = c.status();
            let text = if now.message.is_empty() {
                format!("your status: {}", now.status)
            } else {
                format!("your status: {}: {}", now.status, now.message)
            };
            self.emit(Event::Notice { text });
            return;
        }
        let (word, message) = rest.split_once(' ').unwrap_or((rest, ""));
        let Some(status) = Status::parse(word) else {
            self.usage("status", "/status available|away|busy|invisible [MESSAGE]");
            return;
        };
        let message = message.trim();
        let r = c.set_status(status, message).map(|()| {
            Some(if message.is_empty() {
                format!("status {status}")
            } else {
                format!("status {status}: {message}")
            })
        });
        self.outcome("status", r);
    }

    /// Runs one command line (one that needs no secret); a line without
    /// `/` is a message to `to`, or else to whoever we last talked with.
    /// The messages handed to the client.
    pub fn command(&self, line: &str, to: Option<&str>) -> Vec<Sent> {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let arg = |usage: &str| -> Option<String> {
            if rest.is_empty() || rest.contains(' ') {
                self.usage(cmd.trim_start_matches('/'), usage);
                None
            } else {
                Some(rest.to_owned())
            }
        };
        let c = &self.client;
        // Any line is input: the idle clock restarts and auto-away ends.
        c.note_line();
        let not_logged_in = |command: &str| {
            self.error(command, "not logged in; /login NAME first");
        };
        match cmd {
            "/help" => self.emit(Event::Notice { text: help_text() }),
            "/login" => self.usage("login", "/login NAME"),
            "/passwd" => self.usage("passwd", "/passwd"),
            "/logout" => {
                if c.is_logged_in() {
                    c.logout();
                } else {
                    self.error("logout", "not logged in");
                }
            }
            "/buddies" => {
                if c.is_logged_in() {
                    self.emit(Event::Buddies {
                        buddies: c.buddies(),
                    });
                    for from in c.pending_requests() {
                        self.emit(Event::Request { from });
                    }
                } else {
                    not_logged_in("buddies");
                }
            }
            "/search" => {
                if rest.is_empty() {
                    self.usage("search", "/search TEXT");
                    return Vec::new();
                }
                match c.search(rest) {
                    Ok(results) => self.emit(Event::SearchResults { results }),
                    Err(e) => self.outcome("search", Err(e)),
                }
            }
            "/add" => {
                let Some(name) = arg("/add NAME") else {
                    return Vec::new();
                };
                let r = c.add(&name).map(|now| {
                    Some(if now {
                        format!("request sent to {name}")
                    } else {
                        format!("{name} is offline; they will see your request when they log in")
                    })
                });
                self.outcome("add", r);
            }
            "/accept" => {
                let Some(name) = arg("/accept NAME") else {
                    return Vec::new();
                };
                if c.has_file_offer_from(&name) {
                    let r = c
                        .accept_file(&name)
                        .map(|_| Some(format!("receiving the file from {name}")));
                    self.outcome("accept", r);
                } else {
                    let r = c
                        .accept(&name)
                        .map(|()| Some(format!("{name} is now your buddy")));
                    self.outcome("accept", r);
                }
            }
            "/deny" => {
                let Some(name) = arg("/deny NAME") else {
                    return Vec::new();
                };
                if c.has_file_offer_from(&name) {
                    let r = c
                        .deny_file(&name)
                        .map(|_| Some(format!("declined the file from {name}")));
                    self.outcome("deny", r);
                } else {
                    let r = c
                        .deny(&name)
                        .map(|()| Some(format!("denied {name}'s request")));
                    self.outcome("deny", r);
                }
            }
            "/msg" => {
                let Some((names, text)) = rest.split_once(' ') else {
                    self.usage("msg", "/msg NAME[,NAME...] TEXT");
                    return Vec::new();
                };
                return self.send_text(names, text.trim());
            }
            "/me" => {
                if rest.is_empty() {
                    self.usage("me", "/me ACTION");
                    return Vec::new();
                }
                return self.to_someone(&format!("/me {rest}"), to);
            }
            "/send" => {
                let Some((name, path)) = rest.split_once(' ') else {
                    self.usage("send", "/send NAME PATH");
                    return Vec::new();
                };
                self.send_file(name, Path::new(path.trim()));
            }
            "/cancel" => {
                let Some(name) = arg("/cancel NAME") else {
                    return Vec::new();
                };
                match c.cancel_transfers(&name) {
                    0 => self.error("cancel", format!("no transfer with {name}")),
                    n => self.outcome(
                        "cancel",
                        Ok(Some(format!("cancelled {n} transfer(s) with {name}"))),
                    ),
                }
            }
            "/typing" => {
                let on = match rest.split_once(' ') {
                    Some((name, "on")) => Some((name, true)),
                    Some((name, "off")) => Some((name, false)),
                    _ => None,
                };
                let Some((name, on)) = on else {
                    self.usage("typing", "/typing NAME on|off");
                    return Vec::new();
                };
                let r = c.send_typing(name, on).map(|sent| {
                    (!sent).then(|| "not sent: no change, or too many at once".to_owned())
                });
                self.outcome("typing", r);
            }
            "/block" | "/unblock" => {
                let on = cmd == "/block";
                let Some(name) = arg(if on { "/block NAME" } else { "/unblock NAME" }) else {
                    return Vec::new();
                };
                self.outcome(&cmd[1..], c.block(&name, on).map(|()| None));
            }
            "/status" => self.status_command(rest),
            "/blocked" => {
                if c.is_logged_in() {
                    let list = c.blocked();
                    let text = if list.is_empty() {
                        "you block nobody".to_owned()
                    } else {
                        format!("blocked: {}", list.join(" "))
                    };
                    self.emit(Event::Notice { text });
                } else {
                    not_logged_in("blocked");
                }
            }
            "/history" => {
                let (name, n) = match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
                    [name] => (name.to_string(), Some(20)),
                    [name, n] => (name.to_string(), n.parse::<usize>().ok()),
                    _ => (String::new(), None),
                };
                let Some(n) = n.filter(|_| !name.is_empty()) else {
                    self.usage("history", "/history NAME [N]");
                    return Vec::new();
                };
                match c.history(&name, n) {
                    Ok(e) => self.emit(e),
                    Err(e) => self.outcome("history", Err(e)),
                }
            }
            "/verify" => {
                let (name, accept) = match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
                    [name] => (name.to_string(), false),
                    [name, "ok"] => (name.to_string(), true),
                    _ => {
                        self.usage("verify", "/verify NAME [ok]");
                        return Vec::new();
                    }
                };
                match c.verify(&name, accept) {
                    Ok(e) => {
                        self.emit(e);
                        if accept {
                            self.outcome("verify", Ok(Some(format!("{name}'s key is verified"))));
                        }
                    }
                    Err(e) => self.outcome("verify", Err(e)),
                }
            }
            "/remove" => {
                let Some(name) = arg("/remove NAME") else {
                    return Vec::new();
                };
                self.outcome("remove", c.remove(&name).map(|()| None));
            }
            "/profile" => {
                // `/profile set FIELD VALUE` is `/profile FIELD VALUE`.
                let rest = match rest.split_once(' ') {
                    Some(("set", more)) => more.trim(),
                    _ if rest == "set" => "",
                    _ => rest,
                };
                if rest.is_empty() {
                    match c.profile() {
                        Some(profile) => self.emit(Event::Profile { profile }),
                        None => not_logged_in("profile"),
                    }
                    return Vec::new();
                }
                let (field, value) = rest.split_once(' ').unwrap_or((rest, ""));
                match c.set_profile_field(field, value.trim()) {
                    Ok(profile) => self.emit(Event::Profile { profile }),
                    Err(e) => self.outcome("profile", Err(e)),
                }
            }
            other if other.starts_with('/') => {
                self.error(&other[1..], "unknown command; /help lists them")
            }
            _ => return self.to_someone(line, to),
        }
        Vec::new()
    }

    /// `text` to `to`, or else to whoever we last talked with.
    fn to_someone(&self, text: &str, to: Option<&str>) -> Vec<Sent> {
        match to.map(str::to_owned).or_else(|| self.client.last_peer()) {
            Some(to) => self.send_text(&to, text),
            None => {
                self.error("msg", "who to? use /msg NAME TEXT or /query NAME first");
                Vec::new()
            }
        }
    }
}

/// `ims-client register NAME`: the exit code.
pub fn register(
    config: ClientConfig,
    user: &str,
    passwords: &Passwords,
    profile: Profile,
    json: bool,
) -> i32 {
    let password = match passwords.get(&format!("new password for {user}: "), true) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ims-client: {e}");
            return 2;
        }
    };
    let (tx, _rx) = unbounded();
    let client = Client::new(config, 0, tx);
    match client.register(user, &password, profile) {
        Ok(user) => {
            let e = Event::Registered { user };
            println!("{}", if json { e.to_json() } else { e.to_text() });
            0
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    Event::Error {
                        command: "register".into(),
                        reason: e.to_string()
                    }
                    .to_json()
                );
            }
            eprintln!(
                "ims-client: registration failed: {}",
                super::events::clean(&e.to_string())
            );
            1
        }
    }
}
