//! Line mode (`--plain`, `--json`, or whenever stdin or stdout is not a
//! terminal): commands are stdin lines, and each event is printed whole,
//! ending with a newline, by one printer thread in the order the events
//! happened. Nothing is drawn over anything else; logs go to stderr or to
//! the log file, never between the parts of a line on stdout.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;

use super::{needs_secret, prompt_twice, Commands, Passwords, Secret};
use crate::client::error::ClientError;
use crate::client::events::Event;

/// Percent steps between progress lines in text mode: a line every 250 ms
/// would bury the conversation (JSON gets every event).
const PROGRESS_STEP: u64 = 10;

/// Runs line mode until `/quit` or end of input: the exit code, and the
/// printer, which ends once every sender of events is gone.
pub fn run(
    commands: Commands,
    rx: Receiver<Event>,
    json: bool,
    login: Option<String>,
    passwords: Passwords,
) -> (i32, JoinHandle<()>) {
    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive && !json {
        // Printed before anything else, so no prompt shares its line.
        println!("type /help for commands");
    }
    let printer = std::thread::spawn(move || print_events(rx, json));
    if let Some(user) = login {
        let password = passwords.get(&format!("password for {user}: "), false);
        if !commands.login(&user, password) && (json || !interactive) {
            // A script must be able to tell that it is not logged in (a
            // person can try /login again).
            return (1, printer);
        }
    }
    let mut input = stdin.lock().lines();
    // Set by /query: whom plain lines go to.
    let mut target: Option<String> = None;
    while let Some(Ok(line)) = input.next() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/quit" {
            break;
        }
        match needs_secret(line) {
            Some(Secret::Login(user)) => {
                let password = passwords.get(&format!("password for {user}: "), false);
                commands.login(&user, password);
            }
            Some(Secret::Passwd) if interactive => {
                let current = rpassword::prompt_password("current password: ")
                    .map_err(ClientError::Local)
                    .and_then(|c| prompt_twice("new password: ", true).map(|n| (c, n)));
                match current {
                    Ok((current, new)) => commands.passwd(&current, &new),
                    Err(e) => commands.error("passwd", e.to_string()),
                }
            }
            Some(Secret::Passwd) => {
                // Scripts give the current password and the new one on
                // the next two lines.
                let mut next = || input.next().and_then(Result::ok).unwrap_or_default();
                let current = next();
                let new = next();
                commands.passwd(&current, &new);
            }
            None => {
                let mut words = line.split_whitespace();
                match (words.next(), words.next(), words.next()) {
                    (Some("/query"), name, None) => {
                        target = name.map(str::to_ascii_lowercase);
                        let detail = match &target {
                            Some(name) => format!("lines without / now go to {name}"),
                            None => "lines without / go to whoever you last talked with".into(),
                        };
                        commands.emit(Event::Ok {
                            command: "query".into(),
                            detail: Some(detail),
                        });
                    }
                    (Some("/close"), None, _) => {
                        target = None;
                        commands.emit(Event::Ok {
                            command: "close".into(),
                            detail: None,
                        });
                    }
                    _ => {
                        commands.command(line, target.as_deref());
                    }
                }
            }
        }
    }
    if commands.client.is_logged_in() {
        commands.client.logout();
    }
    (0, printer)
}

/// Per transfer, the last percent step printed.
type Steps = HashMap<(String, u64, String), u64>;

/// Whether line mode prints `e`: every event but progress, which is
/// printed when it reaches the next [`PROGRESS_STEP`].
fn worth_a_line(steps: &mut Steps, e: &Event) -> bool {
    let Event::FileProgress {
        peer,
        id,
        direction,
        bytes,
        size,
        ..
    } = e
    else {
        return true;
    };
    let pct = bytes.saturating_mul(100).checked_div(*size).unwrap_or(100);
    let step = pct / PROGRESS_STEP;
    let key = (peer.clone(), *id, direction.clone());
    if steps.get(&key) == Some(&step) {
        return false;
    }
    if pct >= 100 {
        // Its last line: nothing more to remember.
        steps.remove(&key);
    } else {
        steps.insert(key, step);
    }
    true
}

/// Prints each event whole with its newline, flushing after each.
/// Prints one event whole and flushes it; `false` if stdout is gone.
pub(super) fn print_one(e: &Event, json: bool) -> bool {
    if let Event::Flush(_) = e {
        // Nothing to show; its sender waits on the channel, not here.
        return true;
    }
    let line = if json { e.to_json() } else { e.to_text() };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
}

pub(super) fn print_events(rx: Receiver<Event>, json: bool) {
    let stdout = std::io::stdout();
    let mut steps = Steps::new();
    for e in rx {
        if let Event::Flush(f) = e {
            // Everything before it is printed.
            f.answer();
            continue;
        }
        if !json && !worth_a_line(&mut steps, &e) {
            continue;
        }
        let line = if json { e.to_json() } else { e.to_text() };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_prints_every_tenth_and_other_events_always() {
        let mut steps = Steps::new();
        let p = |bytes| Event::FileProgress {
            peer: "bob".into(),
            id: 1,
            direction: "send".into(),
            bytes,
            size: 1000,
            rate: 0,
            resumed: 0,
        };
        let printed: Vec<u64> = (0..=40)
            .map(|i| i * 25)
            .filter(|&b| worth_a_line(&mut steps, &p(b)))
            .collect();
        assert_eq!(
            printed,
            [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
        );
        assert!(steps.is_empty());
        let note = Event::Notice { text: "x".into() };
        assert!(worth_a_line(&mut steps, &note) && worth_a_line(&mut steps, &note));
    }
}
