//! The line-based interface: commands in, events out. On a terminal events
//! print as text; with `--json` each event is one JSON object per line.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver};

use super::account::AccountError;
use super::events::Event;
use super::{start, Client, ClientConfig};
use crate::proto::crs::Profile;

/// Where passwords come from when not typed at a prompt.
#[derive(Clone, Debug, Default)]
pub struct Passwords {
    /// First line of this file.
    pub file: Option<PathBuf>,
}

impl Passwords {
    /// The password: `--password-file`, then `IMS_PASSWORD`, then a no-echo
    /// prompt on a terminal (twice with `confirm`).
    pub fn get(&self, prompt: &str, confirm: bool) -> Result<String, String> {
        if let Some(path) = &self.file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            return Ok(text.lines().next().unwrap_or("").to_owned());
        }
        if let Ok(p) = std::env::var("IMS_PASSWORD") {
            return Ok(p);
        }
        if !std::io::stdin().is_terminal() {
            return Err("no password: use --password-file FILE or IMS_PASSWORD".into());
        }
        let first = rpassword::prompt_password(prompt).map_err(|e| e.to_string())?;
        if confirm {
            let again = rpassword::prompt_password("again: ").map_err(|e| e.to_string())?;
            if again != first {
                return Err("the passwords differ".into());
            }
        }
        Ok(first)
    }
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
        "a line without / goes to whoever you last wrote to or heard from",
    ),
    ("/send NAME PATH", "offer a file to NAME"),
    ("/cancel NAME", "stop every file transfer with NAME"),
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
        "/profile [FIELD VALUE]",
        "show your profile, or set FIELD (empty VALUE clears it)",
    ),
    (
        "/verify NAME [ok]",
        "show the safety number with NAME; 'ok' records that you compared it (and accepts a changed key)",
    ),
    ("/passwd", "change your password"),
    ("/help", "this list"),
    ("/quit", "log out and exit"),
];

fn help_text() -> String {
    let mut s = String::from("commands:");
    for (c, what) in HELP {
        s.push_str(&format!("\n  {c:<24} {what}"));
    }
    s
}

/// Runs the interface until `/quit` or end of input; the exit code.
pub fn run(config: ClientConfig, json: bool, login: Option<String>, passwords: Passwords) -> i32 {
    let (tx, rx) = unbounded();
    let running = match start(config, tx.clone()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ims-client: cannot listen: {e}");
            return 1;
        }
    };
    let client = running.client.clone();
    let interactive = std::io::stdin().is_terminal() && !json;
    let ui = Ui {
        client: client.clone(),
        tx,
        passwords,
    };
    let (code, printer) = if interactive {
        terminal(ui, rx, login)
    } else {
        lines(ui, rx, json, login)
    };
    drop(client);
    running.shutdown();
    // Every sender is gone now, so the printer drains and ends.
    printer.join().ok();
    code
}

/// Commands from stdin lines, events on stdout (scripts, `--json`).
fn lines(ui: Ui, rx: Receiver<Event>, json: bool, login: Option<String>) -> (i32, JoinHandle<()>) {
    let printer = std::thread::spawn(move || print_events(rx, json));
    if let Some(user) = login {
        ui.command(&format!("/login {user}"));
    }
    let stdin = std::io::stdin();
    let mut input = stdin.lock().lines();
    while let Some(Ok(line)) = input.next() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" {
            break;
        }
        if line == "/passwd" {
            // Scripts give the new password on the next line.
            let new = input.next().and_then(Result::ok).unwrap_or_default();
            ui.outcome("passwd", ui.client.passwd(&new).map(|()| None));
            continue;
        }
        ui.command(line);
    }
    if ui.client.is_logged_in() {
        ui.client.logout();
    }
    (0, printer)
}

/// Tab completion: commands, then buddy names.
#[derive(rustyline::Helper, rustyline::Hinter, rustyline::Highlighter, rustyline::Validator)]
struct Completion {
    client: Arc<Client>,
}

impl rustyline::completion::Completer for Completion {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let before = &line[..pos];
        let start = before.rfind([' ', ',']).map(|i| i + 1).unwrap_or(0);
        let word = &before[start..];
        if start == 0 && word.starts_with('/') {
            let cmds = HELP
                .iter()
                .filter_map(|(c, _)| c.split(' ').next())
                .filter(|c| c.starts_with('/') && c.starts_with(word))
                .map(|c| format!("{c} "))
                .collect();
            return Ok((0, cmds));
        }
        let mut names: Vec<String> = self.client.buddies().into_iter().map(|b| b.user).collect();
        names.extend(self.client.pending_requests());
        names.sort();
        names.dedup();
        Ok((
            start,
            names
                .into_iter()
                .filter(|n| n.starts_with(word))
                .map(|n| format!("{n} "))
                .collect(),
        ))
    }
}

fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("ims").join("history"))
}

/// The terminal: line editing with history and completion; events print
/// above the line being typed.
fn terminal(ui: Ui, rx: Receiver<Event>, login: Option<String>) -> (i32, JoinHandle<()>) {
    use rustyline::error::ReadlineError;
    use rustyline::ExternalPrinter;

    let mut rl: rustyline::Editor<Completion, rustyline::history::DefaultHistory> =
        match rustyline::Editor::new() {
            Ok(rl) => rl,
            Err(e) => {
                eprintln!("ims-client: terminal: {e}");
                return (1, std::thread::spawn(move || drop(rx)));
            }
        };
    rl.set_helper(Some(Completion {
        client: ui.client.clone(),
    }));
    let history = history_path();
    if let Some(h) = &history {
        // No history yet is fine.
        rl.load_history(h).ok();
    }
    let printer = match rl.create_external_printer() {
        Ok(mut p) => std::thread::spawn(move || {
            for e in rx {
                if p.print(e.to_text()).is_err() {
                    return;
                }
            }
        }),
        Err(_) => std::thread::spawn(move || print_events(rx, false)),
    };
    ui.emit(Event::Notice {
        text: "type /help for commands; Tab completes commands and names".into(),
    });
    if let Some(user) = login {
        ui.command(&format!("/login {user}"));
    }
    loop {
        let prompt = match ui.client.user() {
            Some(u) => format!("{u}> "),
            None => "ims> ".to_owned(),
        };
        match rl.readline(&prompt) {
            Ok(line) => {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                if rl.add_history_entry(line).is_err() {
                    log::debug!("history entry not kept");
                }
                if line == "/quit" {
                    break;
                }
                ui.command(line);
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("ims-client: terminal: {e}");
                break;
            }
        }
    }
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            std::fs::create_dir_all(dir).ok();
        }
        if let Err(e) = rl.save_history(h) {
            log::debug!("history not saved: {e}");
        }
    }
    if ui.client.is_logged_in() {
        ui.client.logout();
    }
    (0, printer)
}

struct Ui {
    client: Arc<Client>,
    tx: crossbeam_channel::Sender<Event>,
    passwords: Passwords,
}

impl Ui {
    fn send_text(&self, names: &str, text: &str) {
        for to in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match self.client.send_message(to, text) {
                Ok(_) => {}
                Err(reason) => self.emit(Event::SendFailed {
                    to: to.to_ascii_lowercase(),
                    id: 0,
                    reason,
                }),
            }
        }
    }

    fn emit(&self, e: Event) {
        self.tx.send(e).ok();
    }

    fn outcome(&self, command: &str, r: Result<Option<String>, AccountError>) {
        match r {
            Ok(detail) => self.emit(Event::Ok {
                command: command.into(),
                detail,
            }),
            Err(e) => self.emit(Event::Error {
                command: command.into(),
                reason: e.to_string(),
            }),
        }
    }

    fn usage(&self, command: &str, usage: &str) {
        self.emit(Event::Error {
            command: command.into(),
            reason: format!("usage: {usage}"),
        });
    }

    fn command(&self, line: &str) {
        let (cmd, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let arg = |usage: &str| -> Option<String> {
            if rest.is_empty() || rest.contains(' ') {
                self.usage(&cmd[1..], usage);
                None
            } else {
                Some(rest.to_owned())
            }
        };
        let c = &self.client;
        match cmd {
            "/help" => self.emit(Event::Notice { text: help_text() }),
            "/login" => {
                let Some(user) = arg("/login NAME") else {
                    return;
                };
                match self.passwords.get(&format!("password for {user}: "), false) {
                    Ok(p) => {
                        if let Err(e) = c.login(&user, &p) {
                            self.emit(Event::Error {
                                command: "login".into(),
                                reason: e.to_string(),
                            });
                        }
                    }
                    Err(e) => self.emit(Event::Error {
                        command: "login".into(),
                        reason: e,
                    }),
                }
            }
            "/logout" => {
                if c.is_logged_in() {
                    c.logout();
                } else {
                    self.emit(Event::Error {
                        command: "logout".into(),
                        reason: "not logged in".into(),
                    });
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
                    self.emit(Event::Error {
                        command: "buddies".into(),
                        reason: "not logged in; /login NAME first".into(),
                    });
                }
            }
            "/search" => {
                if rest.is_empty() {
                    return self.usage("search", "/search TEXT");
                }
                match c.search(rest) {
                    Ok(results) => self.emit(Event::SearchResults { results }),
                    Err(e) => self.outcome("search", Err(e)),
                }
            }
            "/add" => {
                let Some(name) = arg("/add NAME") else { return };
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
                    return;
                };
                if c.has_file_offer_from(&name) {
                    let r = c
                        .accept_file(&name)
                        .map(|_| Some(format!("receiving the file from {name}")));
                    self.outcome("accept", r.map_err(AccountError::Failed));
                } else {
                    self.outcome("accept", c.accept(&name).map(|()| None));
                }
            }
            "/deny" => {
                let Some(name) = arg("/deny NAME") else {
                    return;
                };
                if c.has_file_offer_from(&name) {
                    let r = c
                        .deny_file(&name)
                        .map(|_| Some(format!("declined the file from {name}")));
                    self.outcome("deny", r.map_err(AccountError::Failed));
                } else {
                    self.outcome("deny", c.deny(&name).map(|()| None));
                }
            }
            "/msg" => {
                let Some((names, text)) = rest.split_once(' ') else {
                    return self.usage("msg", "/msg NAME[,NAME...] TEXT");
                };
                self.send_text(names, text.trim());
            }
            "/send" => {
                let Some((name, path)) = rest.split_once(' ') else {
                    return self.usage("send", "/send NAME PATH");
                };
                let r = c
                    .send_file(name, std::path::Path::new(path.trim()))
                    .map(|_| {
                        Some(format!(
                            "offered {} to {name}; waiting for them to accept",
                            path.trim()
                        ))
                    });
                self.outcome("send", r.map_err(AccountError::Failed));
            }
            "/cancel" => {
                let Some(name) = arg("/cancel NAME") else {
                    return;
                };
                match c.cancel_transfers(&name) {
                    0 => self.emit(Event::Error {
                        command: "cancel".into(),
                        reason: format!("no transfer with {name}"),
                    }),
                    n => self.outcome(
                        "cancel",
                        Ok(Some(format!("cancelled {n} transfer(s) with {name}"))),
                    ),
                }
            }
            "/verify" => {
                let (name, accept) = match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
                    [name] => (name.to_string(), false),
                    [name, "ok"] => (name.to_string(), true),
                    _ => return self.usage("verify", "/verify NAME [ok]"),
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
                    return;
                };
                self.outcome("remove", c.remove(&name).map(|()| None));
            }
            "/profile" => {
                if rest.is_empty() {
                    match c.profile() {
                        Some(profile) => self.emit(Event::Profile { profile }),
                        None => self.emit(Event::Error {
                            command: "profile".into(),
                            reason: "not logged in; /login NAME first".into(),
                        }),
                    }
                    return;
                }
                let (field, value) = rest.split_once(' ').unwrap_or((rest, ""));
                match c.set_profile_field(field, value.trim()) {
                    Ok(profile) => self.emit(Event::Profile { profile }),
                    Err(e) => self.outcome("profile", Err(e)),
                }
            }
            "/passwd" => match self.passwords.get("new password: ", true) {
                Ok(p) => self.outcome("passwd", c.passwd(&p).map(|()| None)),
                Err(e) => self.emit(Event::Error {
                    command: "passwd".into(),
                    reason: e,
                }),
            },
            other if other.starts_with('/') => self.emit(Event::Error {
                command: other[1..].to_owned(),
                reason: "unknown command; /help lists them".into(),
            }),
            _ => match c.last_peer() {
                Some(to) => self.send_text(&to, line),
                None => self.emit(Event::Error {
                    command: "msg".into(),
                    reason: "who to? use /msg NAME TEXT first".into(),
                }),
            },
        }
    }
}

fn print_events(rx: Receiver<Event>, json: bool) {
    let stdout = std::io::stdout();
    for e in rx {
        let mut out = stdout.lock();
        let line = if json { e.to_json() } else { e.to_text() };
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return;
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
            eprintln!("ims-client: registration failed: {e}");
            1
        }
    }
}
