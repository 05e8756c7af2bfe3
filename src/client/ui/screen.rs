//! Full-screen mode, in the manner of irssi and weechat: a conversation
//! pane per window (a main window for notices and one per buddy), one line
//! per file transfer in progress, a status bar, and one input line.
//!
//! ```text
//! 12:00:01 logged in as alice                      <- conversation pane
//! 12:00:09 <bob> hello                                (the active window)
//! 12:00:12 <alice> hi bob ✓                        <- ✓: delivered
//! [#########-----------]  45% to bob: 90.0 MiB ... <- one line per transfer
//! [12:00] [alice @ 127.0.0.1:7201] [1:main 2:bob 3:carol(2)] [online: bob carol]
//! [bob] how are you_                               <- input line
//! ```
//!
//! One thread owns the screen. It waits on three channels: the client's
//! events, the terminal's keys (read by a thread of their own, so a paste
//! or a burst of keys is taken as fast as it comes), and what the command
//! thread reports. Commands run on that command thread (and a file offer,
//! which hashes the file first, on one of its own), so the screen keeps
//! drawing while they wait on the network or the disk. A line, once added
//! to a window, is only ever added to (a ✓ when delivered), never removed
//! or redrawn over: the screen is drawn whole from the windows' lines each
//! time, so a resize or Ctrl-L redraws everything.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{select, unbounded, Receiver, Sender};
use crossterm::event::{
    DisableBracketedPaste, EnableBracketedPaste, Event as TermEvent, KeyCode, KeyEvent,
    KeyEventKind, KeyModifiers,
};
use ratatui::backend::Backend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line as TextLine, Span};
use ratatui::widgets::Paragraph;
use ratatui::{DefaultTerminal, Frame, Terminal};
use unicode_width::UnicodeWidthChar;

use super::super::history::Entry as HistoryEntry;
use super::history::History;
use super::plain::print_events;
use super::{command_words, needs_secret, Commands, Passwords, Secret, Sent};
use crate::client::error::ClientError;
use crate::client::events::{action, clean, progress_text, Event};

/// Lines a window keeps; older ones go (a day of busy chat).
const MAX_LINES: usize = 10_000;
/// Transfers shown at once (the rest are counted in the status bar).
const MAX_TRANSFER_LINES: usize = 6;
/// Width of a line's time stamp and the space after it; wrapped lines are
/// indented by as much, so nothing can pass for a line of its own.
const STAMP_WIDTH: usize = 9;
/// Characters the input line holds: a message may have at most
/// `MAX_TEXT_BYTES` bytes, so a longer line could never be sent.
const MAX_INPUT: usize = crate::client::peer::MAX_TEXT_BYTES;
/// The clock in the status bar moves this often.
const TICK: Duration = Duration::from_secs(1);

/// What the other threads tell the screen.
enum Note {
    /// A key, a paste, a resize.
    Term(TermEvent),
    /// The terminal cannot be read any more.
    TermGone,
    /// Messages a command handed to the client, for the lines shown with
    /// `token` when it was typed (0: none were).
    Sent(u64, Vec<Sent>),
}

/// What the command thread runs.
enum Job {
    /// A command line (or text for `to`), and the token of the lines that
    /// show it already (0: none).
    Line(String, Option<String>, u64),
    /// `/login NAME` with its password.
    Login(String, Result<String, ClientError>),
    /// `/passwd` with the current and the new password.
    Passwd(String, String),
    /// Tell a buddy we started (true) or stopped typing to them.
    Typing(String, bool),
}

/// Typing stops counting after this long without a key: the buddy is
/// told so.
const TYPING_IDLE: Duration = Duration::from_secs(5);
/// A buddy shown typing who has said nothing more for this long is taken
/// to have stopped (their `off` may have been lost to the rate limit or
/// the network; an `on` is repeated every few seconds while typing).
const TYPIST_FORGOTTEN: Duration = Duration::from_secs(12);

/// How a line looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Notices and command outcomes.
    Info,
    /// Failures.
    Error,
    /// A buddy's message.
    Theirs,
    /// Our message.
    Ours,
    /// Presence changes.
    Presence,
}

/// One line of a window.
struct Line {
    stamp: String,
    kind: Kind,
    /// The sender, for messages (shown as `<nick>`).
    nick: Option<String>,
    text: String,
    /// Our message: its id (0 until the client took it), and whether it
    /// was delivered (`Some(true)`), failed (`Some(false)`) or is on its way.
    sent: Option<(u64, Option<bool>)>,
    /// Our message shown as it was typed: the token of its command (0: none).
    token: u64,
}

/// A window: main (no buddy) or one buddy's conversation.
struct Window {
    buddy: Option<String>,
    lines: Vec<Line>,
    unread: usize,
    /// A buddy's message is among the unread lines.
    spoken: bool,
    /// Rows scrolled back from the bottom.
    scroll: usize,
    /// The first line that arrived while the window was not in view: a
    /// marker row goes above it until the window is left again.
    first_unread: Option<usize>,
}

impl Window {
    fn new(buddy: Option<String>) -> Window {
        Window {
            buddy,
            lines: Vec::new(),
            unread: 0,
            spoken: false,
            scroll: 0,
            first_unread: None,
        }
    }

    fn title(&self) -> &str {
        self.buddy.as_deref().unwrap_or("main")
    }
}

/// A secret being typed at the input line.
enum Prompt {
    Login(String),
    PasswdCurrent,
    PasswdNew(String),
    PasswdAgain(String, String),
}

impl Prompt {
    fn label(&self) -> String {
        match self {
            Prompt::Login(u) => format!("password for {u}:"),
            Prompt::PasswdCurrent => "current password:".into(),
            Prompt::PasswdNew(_) => "new password:".into(),
            Prompt::PasswdAgain(..) => "new password again:".into(),
        }
    }
}

/// Tab completion in progress: pressing Tab again takes the next candidate.
struct Completion {
    start: usize,
    candidates: Vec<String>,
    next: usize,
}

/// Colours (the eight the terminal's theme defines, so they suit light and
/// dark backgrounds alike) or, with `NO_COLOR`, attributes only.
struct Palette {
    color: bool,
}

impl Palette {
    fn fg(&self, c: Color) -> Style {
        if self.color {
            Style::default().fg(c)
        } else {
            Style::default()
        }
    }

    fn stamp(&self) -> Style {
        Style::default().add_modifier(Modifier::DIM)
    }

    fn kind(&self, k: Kind) -> Style {
        match k {
            Kind::Info => Style::default(),
            Kind::Error => self.fg(Color::Red).add_modifier(Modifier::BOLD),
            Kind::Theirs | Kind::Ours => Style::default(),
            Kind::Presence => self.fg(Color::Blue),
        }
    }

    fn nick(&self, k: Kind) -> Style {
        match k {
            Kind::Ours => self.fg(Color::Green).add_modifier(Modifier::BOLD),
            _ => self.fg(Color::Cyan).add_modifier(Modifier::BOLD),
        }
    }

    fn bar(&self) -> Style {
        if self.color {
            Style::default().fg(Color::White).bg(Color::Blue)
        } else {
            Style::default().add_modifier(Modifier::REVERSED)
        }
    }

    fn transfer(&self) -> Style {
        self.fg(Color::Yellow)
    }
}

/// The screen's state.
struct Screen {
    commands: Commands,
    passwords: Passwords,
    jobs: Sender<Job>,
    windows: Vec<Window>,
    active: usize,
    input: Vec<char>,
    cursor: usize,
    history: History,
    prompt: Option<Prompt>,
    completion: Option<Completion>,
    /// Progress per transfer: (peer, id, direction) -> the last event.
    transfers: BTreeMap<(String, u64, String), (u64, u64, u64)>,
    /// Deliveries that arrived before the line of the message they confirm.
    early: HashSet<(String, u64)>,
    /// Failures likewise.
    early_failed: HashSet<(String, u64)>,
    me: Option<String>,
    /// Our MS and our buddies online, as of the last batch of events (the
    /// drawing never waits on the client's locks).
    ms: Option<String>,
    online: Vec<String>,
    /// Our own status, shown beside our name unless `available`.
    my_status: crate::proto::status::Status,
    palette: Palette,
    /// The last token of a typed message.
    next_token: u64,
    quit: bool,
    /// As last drawn: rows the active window is scrolled back, whether
    /// that shows its first line (PageUp stops there), and whether it is
    /// scrolled back at all.
    view: std::cell::Cell<(usize, bool, bool)>,
    /// The conversation pane's width as last drawn.
    width: std::cell::Cell<usize>,
    /// Buddies typing to us, and when they last said so.
    typists: BTreeMap<String, Instant>,
    /// The buddy we told we are typing to, and when we last typed.
    typing_to: Option<(String, Instant)>,
}

/// Runs full-screen mode until `/quit`; the exit code.
/// Runs full-screen mode until `/quit`: the exit code, and a printer that
/// prints what happens after the screen is gone (the logout) as line mode
/// does, until every sender of events is gone.
pub fn run(
    commands: Commands,
    rx: Receiver<Event>,
    login: Option<String>,
    passwords: Passwords,
) -> (i32, JoinHandle<()>) {
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ims-client: cannot use the terminal: {e}; try --plain");
            return (1, std::thread::spawn(move || drop(rx)));
        }
    };
    let mut stdout = std::io::stdout();
    if let Err(e) = crossterm::execute!(stdout, EnableBracketedPaste) {
        log::debug!("bracketed paste: {e}");
    }
    let (notes_tx, notes) = unbounded();
    let keys = notes_tx.clone();
    std::thread::Builder::new()
        .name("keys".into())
        .spawn(move || loop {
            match crossterm::event::read() {
                Ok(e) => {
                    if keys.send(Note::Term(e)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::warn!("reading the terminal: {e}");
                    keys.send(Note::TermGone).ok();
                    return;
                }
            }
        })
        .ok();
    // SIGTERM and SIGHUP (the terminal went away) end the client as
    // /quit does, so the terminal is put back as it was.
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(mut signals) => {
            let quit = notes_tx.clone();
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    if signals.forever().next().is_some() {
                        quit.send(Note::TermGone).ok();
                    }
                })
                .ok();
        }
        Err(e) => log::warn!("signals: {e}"),
    }
    let (jobs, job_rx) = unbounded();
    let worker = {
        let commands = commands.clone();
        std::thread::Builder::new()
            .name("commands".into())
            .spawn(move || run_jobs(commands, job_rx, notes_tx))
            .ok()
    };
    let mut s = Screen::new(commands, passwords, jobs);
    s.info("ims: type /help for commands, /quit to exit");
    s.info("keys: Tab completes, Up/Down recall, Alt-1..9 and Alt-A switch windows, PageUp/PageDown scroll");
    if let Some(user) = login {
        s.submit_login(user);
    }
    let code = s.event_loop(&mut terminal, &rx, &notes);
    crossterm::execute!(stdout, DisableBracketedPaste).ok();
    ratatui::restore();
    stdout.flush().ok();
    // The command thread ends once its queue is closed.
    let Screen { jobs, .. } = s;
    drop(jobs);
    if let Some(w) = worker {
        w.join().ok();
    }
    (code, std::thread::spawn(move || print_events(rx, false)))
}

/// Lines of history a new conversation window starts with.
const WINDOW_HISTORY: usize = 20;

/// The command thread: one command at a time, in the order typed.
fn run_jobs(commands: Commands, jobs: Receiver<Job>, notes: Sender<Note>) {
    for job in jobs {
        match job {
            Job::Line(line, to, token) => {
                if line.starts_with("/send ") {
                    // Hashing a large file must hold up neither the screen
                    // nor the commands typed after it.
                    let commands = commands.clone();
                    std::thread::Builder::new()
                        .name("offer".into())
                        .spawn(move || {
                            commands.command(&line, None);
                        })
                        .ok();
                    continue;
                }
                let sent = commands.command(&line, to.as_deref());
                if (token != 0 || !sent.is_empty()) && notes.send(Note::Sent(token, sent)).is_err()
                {
                    return;
                }
            }
            Job::Login(user, password) => {
                commands.login(&user, password);
            }
            Job::Passwd(current, new) => commands.passwd(&current, &new),
            Job::Typing(to, on) => {
                // Nobody asked for it: a failure is only logged.
                if let Err(e) = commands.client.send_typing(&to, on) {
                    log::debug!("typing notification to {to}: {e}");
                }
            }
        }
    }
}

/// How often the local time's offset from UTC is asked again (it moves
/// twice a year).
const OFFSET_EVERY: Duration = Duration::from_secs(600);

/// The local offset from UTC in seconds. The standard library knows no
/// time zones, and reading the zone database by hand is a library's job:
/// the system's `date +%z` knows (and honours `TZ`). UTC if it cannot say.
fn utc_offset() -> i64 {
    static CACHE: parking_lot::Mutex<Option<(std::time::Instant, i64)>> =
        parking_lot::Mutex::new(None);
    let mut cache = CACHE.lock();
    if let Some((when, offset)) = *cache {
        if when.elapsed() < OFFSET_EVERY {
            return offset;
        }
    }
    let offset = std::process::Command::new("date")
        .arg("+%z")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .and_then(|o| parse_offset(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or(0);
    *cache = Some((std::time::Instant::now(), offset));
    offset
}

/// `+0530` or `-0800` as seconds.
fn parse_offset(s: &str) -> Option<i64> {
    let (sign, digits) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let hours: i64 = digits[..2].parse().ok()?;
    let minutes: i64 = digits[2..].parse().ok()?;
    Some(sign * (hours * 3600 + minutes * 60))
}

/// Now as `HH:MM:SS`, local time.
fn stamp() -> String {
    let utc = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = (i64::try_from(utc).unwrap_or(0) + utc_offset()).rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

impl Screen {
    fn new(commands: Commands, passwords: Passwords, jobs: Sender<Job>) -> Screen {
        Screen {
            commands,
            passwords,
            jobs,
            windows: vec![Window::new(None)],
            active: 0,
            input: Vec::new(),
            cursor: 0,
            history: History::default(),
            prompt: None,
            completion: None,
            transfers: BTreeMap::new(),
            early: HashSet::new(),
            early_failed: HashSet::new(),
            me: None,
            ms: None,
            online: Vec::new(),
            my_status: crate::proto::status::Status::Available,
            palette: Palette {
                color: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            },
            next_token: 0,
            quit: false,
            view: std::cell::Cell::new((0, false, false)),
            width: std::cell::Cell::new(80),
            typists: BTreeMap::new(),
            typing_to: None,
        }
    }

    fn event_loop(
        &mut self,
        terminal: &mut DefaultTerminal,
        rx: &Receiver<Event>,
        notes: &Receiver<Note>,
    ) -> i32 {
        let mut events_open = true;
        while !self.quit {
            if let Err(e) = terminal.draw(|f| self.draw(f)) {
                log::warn!("drawing: {e}");
                return 1;
            }
            // One item, then everything already waiting, then one draw.
            let never = crossbeam_channel::never();
            let events = if events_open { rx } else { &never };
            select! {
                recv(events) -> e => match e {
                    Ok(e) => self.on_event(e),
                    Err(_) => events_open = false,
                },
                recv(notes) -> n => match n {
                    Ok(n) => self.on_note(n, terminal),
                    Err(_) => return 1,
                },
                default(TICK) => {}
            }
            for _ in 0..10_000 {
                if let Ok(e) = rx.try_recv() {
                    self.on_event(e);
                } else if let Ok(n) = notes.try_recv() {
                    self.on_note(n, terminal);
                } else {
                    break;
                }
            }
            self.refresh();
            self.typing_check(false);
        }
        0
    }

    /// Tells the buddy of the active window when we start and stop typing
    /// to them (called after every key and every tick): typing is text in
    /// the input line of a buddy's window that is no command.
    fn typing_check(&mut self, keyed: bool) {
        if !self.commands.client.typing_enabled() {
            return;
        }
        let now = Instant::now();
        let buddy = self.windows.get(self.active).and_then(|w| w.buddy.clone());
        let typing = !self.input.is_empty() && self.input.first() != Some(&'/');
        let want = buddy.filter(|_| typing && self.prompt.is_none());
        match (&mut self.typing_to, want) {
            (Some((to, last)), Some(b)) if *to == b => {
                if keyed {
                    *last = now;
                    // The client repeats `on` only when due.
                    self.jobs.send(Job::Typing(b, true)).ok();
                } else if now.duration_since(*last) >= TYPING_IDLE {
                    self.jobs.send(Job::Typing(b, false)).ok();
                    self.typing_to = None;
                }
            }
            (current, want) => {
                if let Some((to, _)) = current.take() {
                    self.jobs.send(Job::Typing(to, false)).ok();
                }
                if let Some(b) = want.filter(|_| keyed) {
                    self.jobs.send(Job::Typing(b.clone(), true)).ok();
                    self.typing_to = Some((b, now));
                }
            }
        }
        self.typists
            .retain(|_, at| now.duration_since(*at) < TYPIST_FORGOTTEN);
    }

    /// What the status bar shows of the client's state.
    fn refresh(&mut self) {
        let client = &self.commands.client;
        self.ms = client.ms_addr();
        // A buddy who is not available shows it: `bob(away)`.
        self.online = client
            .buddies()
            .into_iter()
            .filter(|b| b.online)
            .map(|b| match b.status.as_str() {
                "available" => clean(&b.user),
                other => format!("{}({})", clean(&b.user), clean(other)),
            })
            .collect();
        self.my_status = client.status().status;
    }

    fn on_note<B: Backend>(&mut self, n: Note, terminal: &mut Terminal<B>) {
        match n {
            Note::Term(TermEvent::Key(k)) => {
                self.commands.client.note_input();
                self.on_key(k, terminal);
                self.typing_check(true);
            }
            Note::Term(TermEvent::Paste(text)) => self.on_paste(&text),
            // The next draw takes the new size.
            Note::Term(_) => {}
            Note::TermGone => self.quit = true,
            Note::Sent(token, sent) => self.on_sent(token, sent),
        }
    }

    /// Our messages, as the command thread handed them to the client: the
    /// lines shown when they were typed get their ids (or a ✗ when the
    /// client took none); any other is shown now.
    fn on_sent(&mut self, token: u64, mut sent: Vec<Sent>) {
        if token != 0 {
            for w in &mut self.windows {
                let Some(l) = w.lines.iter_mut().rev().find(|l| l.token == token) else {
                    continue;
                };
                l.token = 0;
                let Some(at) = sent
                    .iter()
                    .position(|m| w.buddy.as_deref() == Some(m.to.as_str()))
                else {
                    // Refused before it got an id: the failure follows.
                    l.sent = Some((0, Some(false)));
                    continue;
                };
                let m = sent.remove(at);
                let key = (m.to, m.id);
                let state = if self.early.remove(&key) {
                    Some(true)
                } else if self.early_failed.remove(&key) {
                    Some(false)
                } else {
                    None
                };
                l.sent = Some((m.id, state));
            }
        }
        for m in sent {
            let delivered = if self.early.remove(&(m.to.clone(), m.id)) {
                Some(true)
            } else if self.early_failed.remove(&(m.to.clone(), m.id)) {
                Some(false)
            } else {
                None
            };
            let me = self.me.clone().unwrap_or_else(|| "me".into());
            let w = self.window_for(&m.to);
            let (nick, text) = match action(&m.text) {
                Some(act) => (None, format!("* {me} {}", clean(act))),
                None => (Some(me), clean(&m.text)),
            };
            self.push_line(
                w,
                Line {
                    stamp: stamp(),
                    kind: Kind::Ours,
                    nick,
                    text,
                    sent: Some((m.id, delivered)),
                    token: 0,
                },
                false,
            );
        }
    }

    // ---- windows and lines ----

    /// The window of `buddy`, opened if need be.
    fn window_for(&mut self, buddy: &str) -> usize {
        let buddy = buddy.to_ascii_lowercase();
        if let Some(i) = self
            .windows
            .iter()
            .position(|w| w.buddy.as_deref() == Some(buddy.as_str()))
        {
            return i;
        }
        // A new conversation window starts with the recent history.
        if self.me.is_some() {
            self.jobs
                .send(Job::Line(
                    format!("/history {buddy} {WINDOW_HISTORY}"),
                    None,
                    0,
                ))
                .ok();
        }
        self.windows.push(Window::new(Some(buddy)));
        self.windows.len() - 1
    }

    fn push_line(&mut self, w: usize, mut line: Line, spoken: bool) {
        // Everything shown was cleaned where it came in; cleaning again
        // changes nothing and makes sure of it (a local file name listed by
        // completion, say).
        line.text = clean(&line.text);
        line.nick = line.nick.as_deref().map(clean);
        let active = self.active;
        // Rows the line takes at the width last drawn.
        let rows = wrap(&self.styled(&line), self.width.get().max(STAMP_WIDTH + 1)).len();
        let Some(win) = self.windows.get_mut(w) else {
            return;
        };
        win.lines.push(line);
        if win.lines.len() > MAX_LINES {
            let extra = win.lines.len() - MAX_LINES;
            win.lines.drain(..extra);
            win.first_unread = win.first_unread.and_then(|i| i.checked_sub(extra));
        }
        if w != active {
            if win.unread == 0 {
                win.first_unread = Some(win.lines.len() - 1);
            }
            win.unread += 1;
            win.spoken |= spoken;
        } else if win.scroll > 0 {
            // Keep the text being read in place.
            win.scroll += rows;
        }
    }

    /// Adds every line of `text` (already cleaned) to window `w`.
    /// Puts a conversation's history above what window `w` shows; the
    /// messages the window already shows (the last ones of the history,
    /// recorded as they came) are not repeated.
    fn show_history(&mut self, w: usize, with: &str, messages: &[HistoryEntry]) {
        let Some(win) = self.windows.get_mut(w) else {
            return;
        };
        let shown = win
            .lines
            .iter()
            .filter(|l| matches!(l.kind, Kind::Theirs | Kind::Ours))
            .count();
        let older = &messages[..messages.len().saturating_sub(shown)];
        if older.is_empty() {
            return;
        }
        let mut lines: Vec<Line> = older
            .iter()
            .map(|m| {
                let ours = m.direction == "sent";
                Line {
                    stamp: String::from("--:--"),
                    kind: if ours { Kind::Ours } else { Kind::Theirs },
                    nick: Some(clean(if ours {
                        self.me.as_deref().unwrap_or("me")
                    } else {
                        with
                    })),
                    text: clean(&m.text),
                    // An id no live message has: ids start again at each
                    // run, and a delivery must never mark an old line.
                    sent: ours.then_some((u64::MAX, Some(m.state.as_deref() != Some("failed")))),
                    token: 0,
                }
            })
            .collect();
        lines.push(Line {
            stamp: String::from("--:--"),
            kind: Kind::Info,
            nick: None,
            text: String::from("-- earlier messages above --"),
            sent: None,
            token: 0,
        });
        let n = lines.len();
        let Some(win) = self.windows.get_mut(w) else {
            return;
        };
        lines.append(&mut win.lines);
        win.lines = lines;
        if let Some(f) = win.first_unread.as_mut() {
            *f += n;
        }
    }

    fn push_text(&mut self, w: usize, kind: Kind, text: &str) {
        let t = stamp();
        for l in text.split('\n') {
            self.push_line(
                w,
                Line {
                    stamp: t.clone(),
                    kind,
                    nick: None,
                    text: l.to_owned(),
                    sent: None,
                    token: 0,
                },
                false,
            );
        }
    }

    fn info(&mut self, text: &str) {
        self.push_text(0, Kind::Info, text);
    }

    fn mark_sent(&mut self, to: &str, id: u64, ok: bool) -> bool {
        for w in &mut self.windows {
            if w.buddy.as_deref() != Some(to) {
                continue;
            }
            for l in w.lines.iter_mut().rev() {
                if let Some((lid, state)) = &mut l.sent {
                    if *lid == id {
                        *state = Some(ok);
                        return true;
                    }
                }
            }
        }
        false
    }

    fn on_event(&mut self, e: Event) {
        let active = self.active;
        if let Event::Flush(f) = e {
            // Everything before it is on the screen (drawn at the next
            // refresh); nothing of its own to show.
            f.answer();
            return;
        }
        match &e {
            Event::Typing { from, state } => {
                if state == "on" {
                    self.typists.insert(clean(from), Instant::now());
                } else {
                    self.typists.remove(&clean(from));
                }
            }
            Event::Message {
                from,
                text,
                sent_at,
                ..
            } => {
                self.typists.remove(&clean(from));
                let w = self.window_for(from);
                let (nick, mut text) = match action(text) {
                    Some(act) => (None, format!("* {} {}", clean(from), clean(act))),
                    None => (Some(clean(from)), clean(text)),
                };
                if let Some(at) = sent_at {
                    text.push_str(&format!("  (sent {}, while you were offline)", clean(at)));
                }
                self.push_line(
                    w,
                    Line {
                        stamp: stamp(),
                        kind: Kind::Theirs,
                        nick,
                        text,
                        sent: None,
                        token: 0,
                    },
                    true,
                );
            }
            Event::Queued { to, .. } => {
                let w = self.window_for(to);
                self.push_text(w, Kind::Info, e.to_text().trim_start());
            }
            Event::Delivered { to, id, .. } => {
                if !self.mark_sent(to, *id, true) {
                    self.early.insert((to.clone(), *id));
                }
            }
            Event::SendFailed { to, id, .. } => {
                if !self.mark_sent(to, *id, false) {
                    self.early_failed.insert((to.clone(), *id));
                }
                let w = self.window_for(to);
                self.push_text(w, Kind::Error, &e.to_text());
            }
            Event::FileProgress {
                peer,
                id,
                direction,
                bytes,
                size,
                rate,
                ..
            } => {
                let key = (peer.clone(), *id, direction.clone());
                if bytes >= size {
                    self.transfers.remove(&key);
                } else {
                    self.transfers.insert(key, (*bytes, *size, *rate));
                }
            }
            Event::FileOffer { from: peer, id, .. } | Event::FileFailed { peer, id, .. } => {
                self.transfers
                    .retain(|(p, i, _), _| !(p == peer && i == id));
                let w = self.window_for(peer);
                let kind = if matches!(e, Event::FileFailed { .. }) {
                    Kind::Error
                } else {
                    Kind::Info
                };
                self.push_text(w, kind, &e.to_text());
            }
            Event::FileReceived { from: peer, .. } | Event::FileSent { to: peer, .. } => {
                self.transfers
                    .retain(|(p, _, d), _| !(p == peer && d != "hash"));
                let w = self.window_for(peer);
                self.push_text(w, Kind::Info, &e.to_text());
            }
            Event::Online { user } | Event::Offline { user } | Event::Status { user, .. } => {
                let text = e.to_text();
                self.push_text(0, Kind::Presence, text.trim_start());
                if let Some(w) = self
                    .windows
                    .iter()
                    .position(|w| w.buddy.as_deref() == Some(user.as_str()))
                {
                    self.push_text(w, Kind::Presence, text.trim_start());
                }
            }
            Event::LoggedIn { user } => {
                self.me = Some(user.clone());
                self.history.open_account(user);
                self.push_text(0, Kind::Info, &e.to_text());
            }
            Event::LoggedOut { .. } => {
                self.me = None;
                self.history.close_account();
                self.transfers.clear();
                self.push_text(0, Kind::Info, &e.to_text());
            }
            Event::Registered { .. }
            | Event::Request { .. }
            | Event::BuddyAdded { .. }
            | Event::BuddyRemoved { .. }
            | Event::Denied { .. } => self.push_text(0, Kind::Info, &e.to_text()),
            Event::KeyChanged { user } => {
                // In the buddy's window, where the next message would go,
                // and in the main window.
                let w = self.window_for(user);
                self.push_text(w, Kind::Error, &e.to_text());
                if w != 0 {
                    self.push_text(0, Kind::Error, &e.to_text());
                }
            }
            Event::Error { .. } => self.push_text(active, Kind::Error, &e.to_text()),
            Event::History { with, messages } => {
                let w = self.window_for(with);
                self.show_history(w, with, messages);
            }
            Event::SafetyNumber { .. }
            | Event::Notice { .. }
            | Event::Ok { .. }
            | Event::Buddies { .. }
            | Event::SearchResults { .. }
            | Event::Profile { .. } => self.push_text(active, Kind::Info, &e.to_text()),
            // Answered above.
            Event::Flush(_) => {}
        }
    }

    // ---- input ----

    fn on_paste(&mut self, text: &str) {
        self.completion = None;
        // A paste is one line: its line breaks become spaces.
        let text: String = text
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        for c in clean(&text).chars() {
            if !self.insert(c) {
                break;
            }
        }
    }

    /// Types `c` at the cursor; `false` (and a notice) when the line is
    /// full: longer than any message may be.
    fn insert(&mut self, c: char) -> bool {
        if self.input.len() >= MAX_INPUT {
            self.push_text(
                self.active,
                Kind::Error,
                &format!("the input line is full ({MAX_INPUT} characters)"),
            );
            return false;
        }
        self.input.insert(self.cursor, c);
        self.cursor += 1;
        true
    }

    fn on_key<B: Backend>(&mut self, k: KeyEvent, terminal: &mut Terminal<B>) {
        if k.kind == KeyEventKind::Release {
            return;
        }
        if k.code != KeyCode::Tab {
            self.completion = None;
        }
        let ctrl = k.modifiers.contains(KeyModifiers::CONTROL);
        let alt = k.modifiers.contains(KeyModifiers::ALT);
        match k.code {
            KeyCode::Char('a') if alt => {
                // To where a buddy spoke, else to any unread lines.
                let next = (self.windows.iter().position(|w| w.spoken))
                    .or_else(|| self.windows.iter().position(|w| w.unread > 0));
                if let Some(i) = next {
                    self.switch_to(i);
                }
            }
            KeyCode::Char(c) if alt && c.is_ascii_digit() => {
                let n = c.to_digit(10).unwrap_or(1) as usize;
                self.switch_to(if n == 0 { 9 } else { n - 1 });
            }
            KeyCode::Char('c') if ctrl => {
                self.input.clear();
                self.cursor = 0;
                if self.prompt.take().is_some() {
                    self.info("cancelled");
                }
            }
            KeyCode::Char('d') if ctrl => {
                if self.input.is_empty() {
                    self.quit = true;
                } else if self.cursor < self.input.len() {
                    self.input.remove(self.cursor);
                }
            }
            KeyCode::Char('a') if ctrl => self.cursor = 0,
            KeyCode::Char('e') if ctrl => self.cursor = self.input.len(),
            KeyCode::Char('u') if ctrl => {
                self.input.drain(..self.cursor);
                self.cursor = 0;
            }
            KeyCode::Char('k') if ctrl => self.input.truncate(self.cursor),
            KeyCode::Char('w') if ctrl => {
                let mut start = self.cursor;
                while start > 0 && self.input[start - 1] == ' ' {
                    start -= 1;
                }
                while start > 0 && self.input[start - 1] != ' ' {
                    start -= 1;
                }
                self.input.drain(start..self.cursor);
                self.cursor = start;
            }
            KeyCode::Char('l') if ctrl => {
                terminal.clear().ok();
            }
            KeyCode::Char('n') if ctrl => self.switch_to((self.active + 1) % self.windows.len()),
            KeyCode::Char('p') if ctrl => {
                self.switch_to((self.active + self.windows.len() - 1) % self.windows.len())
            }
            KeyCode::Right if alt => self.switch_to((self.active + 1) % self.windows.len()),
            KeyCode::Left if alt => {
                self.switch_to((self.active + self.windows.len() - 1) % self.windows.len())
            }
            KeyCode::Char(c) if !ctrl => {
                self.insert(c);
            }
            KeyCode::Backspace if self.cursor > 0 => {
                self.cursor -= 1;
                self.input.remove(self.cursor);
            }
            KeyCode::Delete if self.cursor < self.input.len() => {
                self.input.remove(self.cursor);
            }
            KeyCode::Left => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Right => self.cursor = (self.cursor + 1).min(self.input.len()),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = self.input.len(),
            KeyCode::Up if self.prompt.is_none() => {
                if let Some(h) = self.history.older() {
                    self.input = h.chars().collect();
                    self.cursor = self.input.len();
                }
            }
            KeyCode::Down if self.prompt.is_none() => {
                self.input = self.history.newer().unwrap_or("").chars().collect();
                self.cursor = self.input.len();
            }
            KeyCode::PageUp | KeyCode::PageDown => {
                let page = terminal.size().map(|s| s.height / 2).unwrap_or(10).max(1) as usize;
                let (shown, at_top, _) = self.view.get();
                if let Some(w) = self.windows.get_mut(self.active) {
                    w.scroll = match k.code {
                        KeyCode::PageUp if at_top => shown,
                        KeyCode::PageUp => shown + page,
                        _ => shown.saturating_sub(page),
                    };
                }
            }
            KeyCode::Tab if self.prompt.is_none() => self.complete(),
            KeyCode::Enter => {
                let line: String = self.input.drain(..).collect();
                self.cursor = 0;
                self.submit(line);
            }
            _ => {}
        }
    }

    fn switch_to(&mut self, i: usize) {
        if i == self.active || i >= self.windows.len() {
            return;
        }
        // The window left has been read: its marker goes.
        if let Some(w) = self.windows.get_mut(self.active) {
            w.first_unread = None;
        }
        if let Some(w) = self.windows.get_mut(i) {
            w.unread = 0;
            w.spoken = false;
            self.active = i;
        }
    }

    fn submit(&mut self, line: String) {
        if let Some(p) = self.prompt.take() {
            return self.answer(p, line);
        }
        let line = line.trim().to_owned();
        if line.is_empty() {
            return;
        }
        self.history.add(&line);
        let to = self.windows.get(self.active).and_then(|w| w.buddy.clone());
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("/quit"), ..) => self.quit = true,
            (Some("/query"), None, _) => self.switch_to(0),
            (Some("/query"), Some(name), None) => {
                let w = self.window_for(name);
                self.switch_to(w);
            }
            (Some("/query"), ..) => self.push_text(
                self.active,
                Kind::Error,
                "error (query): usage: /query [NAME]",
            ),
            (Some("/window"), Some(n), None) => match n.parse::<usize>() {
                Ok(n) if (1..=self.windows.len()).contains(&n) => self.switch_to(n - 1),
                _ => self.push_text(
                    self.active,
                    Kind::Error,
                    &format!(
                        "error (window): no window {}; there are {}",
                        clean(n),
                        self.windows.len()
                    ),
                ),
            },
            (Some("/close"), ..) => {
                if self.active == 0 {
                    self.push_text(
                        0,
                        Kind::Error,
                        "error (close): the main window stays; /quit exits",
                    );
                } else {
                    self.windows.remove(self.active);
                    self.active -= 1;
                }
            }
            _ => match needs_secret(&line) {
                Some(Secret::Login(user)) => self.submit_login(user),
                Some(Secret::Passwd) => self.prompt = Some(Prompt::PasswdCurrent),
                None => {
                    let token = self.echo(&line, to.as_deref());
                    self.jobs.send(Job::Line(line, to, token)).ok();
                }
            },
        }
    }

    /// Shows a message as it is typed, in the window of each buddy it goes
    /// to (its mark comes when the client has taken it); the token of the
    /// lines, or 0 when `line` is no message or its buddy is not known yet.
    fn echo(&mut self, line: &str, to: Option<&str>) -> u64 {
        let someone = || {
            to.map(str::to_owned)
                .or_else(|| self.commands.client.last_peer())
        };
        let (names, text): (Vec<String>, String) = if let Some(rest) = line.strip_prefix("/msg ") {
            let Some((names, text)) = rest.trim().split_once(' ') else {
                return 0;
            };
            (
                names
                    .split(',')
                    .map(|n| n.trim().to_ascii_lowercase())
                    .filter(|n| !n.is_empty())
                    .collect(),
                text.trim().to_owned(),
            )
        } else if line.starts_with("/me ") || !line.starts_with('/') {
            (someone().into_iter().collect(), line.to_owned())
        } else {
            return 0;
        };
        if names.is_empty() || text.is_empty() {
            return 0;
        }
        self.next_token += 1;
        let token = self.next_token;
        let me = self.me.clone().unwrap_or_else(|| "me".into());
        let (nick, shown) = match action(&text) {
            Some(act) => (None, format!("* {} {}", clean(&me), clean(act))),
            None => (Some(clean(&me)), clean(&text)),
        };
        for name in names {
            let w = self.window_for(&name);
            self.push_line(
                w,
                Line {
                    stamp: stamp(),
                    kind: Kind::Ours,
                    nick: nick.clone(),
                    text: shown.clone(),
                    sent: Some((0, None)),
                    token,
                },
                false,
            );
        }
        token
    }

    fn submit_login(&mut self, user: String) {
        match self.passwords.preset() {
            Some(password) => {
                self.jobs.send(Job::Login(user, password)).ok();
            }
            None => self.prompt = Some(Prompt::Login(user)),
        }
    }

    fn answer(&mut self, p: Prompt, secret: String) {
        match p {
            Prompt::Login(user) => {
                self.jobs.send(Job::Login(user, Ok(secret))).ok();
            }
            Prompt::PasswdCurrent => self.prompt = Some(Prompt::PasswdNew(secret)),
            Prompt::PasswdNew(current) => self.prompt = Some(Prompt::PasswdAgain(current, secret)),
            Prompt::PasswdAgain(current, new) => {
                if new == secret {
                    self.jobs.send(Job::Passwd(current, new)).ok();
                } else {
                    self.push_text(
                        self.active,
                        Kind::Error,
                        "error (passwd): the new passwords differ; nothing changed",
                    );
                }
            }
        }
    }

    /// Tab: commands for the first word, paths for `/send`'s last, names
    /// otherwise; again for the next candidate.
    fn complete(&mut self) {
        if let Some(c) = &mut self.completion {
            if c.candidates.len() > 1 {
                let end = self.cursor;
                let cand: Vec<char> = c.candidates[c.next].chars().collect();
                c.next = (c.next + 1) % c.candidates.len();
                let start = c.start;
                self.input.splice(start..end, cand.iter().copied());
                self.cursor = start + cand.len();
            }
            return;
        }
        let before: String = self.input[..self.cursor].iter().collect();
        let start_byte = before.rfind([' ', ',']).map(|i| i + 1).unwrap_or(0);
        let word = &before[start_byte..];
        let start = before[..start_byte].chars().count();
        let words: Vec<&str> = before.split(' ').collect();
        let candidates: Vec<String> = if start == 0 && word.starts_with('/') {
            command_words()
                .into_iter()
                .filter(|c| c.starts_with(word))
                .map(|c| format!("{c} "))
                .collect()
        } else if words.first() == Some(&"/send") && words.len() >= 3 {
            paths(word)
        } else {
            let mut names: Vec<String> = self
                .commands
                .client
                .buddies()
                .into_iter()
                .map(|b| b.user)
                .collect();
            names.extend(self.commands.client.pending_requests());
            names.extend(self.windows.iter().filter_map(|w| w.buddy.clone()));
            names.sort();
            names.dedup();
            names
                .into_iter()
                .filter(|n| n.starts_with(word))
                .map(|n| format!("{} ", clean(&n)))
                .collect()
        };
        if candidates.is_empty() {
            return;
        }
        let first: Vec<char> = if candidates.len() == 1 {
            candidates[0].chars().collect()
        } else {
            // The longest common prefix first; Tab again cycles.
            let mut prefix: Vec<char> = candidates[0].chars().collect();
            for c in &candidates[1..] {
                let n = prefix
                    .iter()
                    .zip(c.chars())
                    .take_while(|(a, b)| **a == *b)
                    .count();
                prefix.truncate(n);
            }
            let list = candidates
                .iter()
                .map(|c| c.trim_end())
                .collect::<Vec<_>>()
                .join(" ");
            self.push_text(self.active, Kind::Info, &list);
            prefix
        };
        self.input.splice(start..self.cursor, first.iter().copied());
        self.cursor = start + first.len();
        if candidates.len() > 1 {
            self.completion = Some(Completion {
                start,
                candidates,
                next: 0,
            });
        }
    }

    // ---- drawing ----

    fn draw(&self, f: &mut Frame<'_>) {
        let area = f.area();
        let transfer_lines = self.transfers.len().min(MAX_TRANSFER_LINES) as u16;
        let max_transfers = area.height.saturating_sub(3);
        let [pane, transfers, status, input] = Layout::vertical([
            Constraint::Min(1),
            Constraint::Length(transfer_lines.min(max_transfers)),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(area);
        self.draw_pane(f, pane);
        self.draw_transfers(f, transfers);
        self.draw_status(f, status);
        self.draw_input(f, input);
    }

    fn styled(&self, l: &Line) -> Vec<(String, Style)> {
        let p = &self.palette;
        let mut parts = vec![(format!("{} ", l.stamp), p.stamp())];
        if let Some(nick) = &l.nick {
            parts.push(("<".into(), Style::default()));
            parts.push((nick.clone(), p.nick(l.kind)));
            parts.push(("> ".into(), Style::default()));
        }
        parts.push((l.text.clone(), p.kind(l.kind)));
        match l.sent {
            Some((_, Some(true))) => parts.push((" ✓".into(), p.fg(Color::Green))),
            Some((_, Some(false))) => parts.push((" ✗".into(), p.fg(Color::Red))),
            _ => {}
        }
        parts
    }

    fn draw_pane(&self, f: &mut Frame<'_>, area: Rect) {
        let Some(w) = self.windows.get(self.active) else {
            return;
        };
        let width = area.width as usize;
        let height = area.height as usize;
        self.width.set(width);
        if width <= STAMP_WIDTH || height == 0 {
            return;
        }
        // Rows from the bottom up, as far as the view needs.
        let want = height + w.scroll;
        let mut rows: Vec<Vec<(String, Style)>> = Vec::new();
        let mut every_line = true;
        for (i, l) in w.lines.iter().enumerate().rev() {
            let mut wrapped = wrap(&self.styled(l), width);
            wrapped.reverse();
            rows.extend(wrapped);
            if w.first_unread == Some(i) {
                let rule = "-".repeat(width.saturating_sub(STAMP_WIDTH + 6).min(40));
                rows.push(vec![(
                    format!("{}{rule} new", " ".repeat(STAMP_WIDTH)),
                    self.palette.fg(Color::Magenta),
                )]);
            }
            if rows.len() >= want && i > 0 {
                every_line = false;
                break;
            }
        }
        let max = rows.len().saturating_sub(height);
        let scroll = w.scroll.min(max);
        self.view
            .set((scroll, every_line && scroll == max, w.scroll > 0));
        let visible: Vec<TextLine<'_>> = rows
            .iter()
            .skip(scroll)
            .take(height)
            .rev()
            .map(|r| {
                TextLine::from(
                    r.iter()
                        .map(|(t, s)| Span::styled(t.clone(), *s))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        // Short windows sit at the bottom, next to the input line.
        let top = height.saturating_sub(visible.len()) as u16;
        let rect = Rect {
            y: area.y + top,
            height: area.height - top,
            ..area
        };
        f.render_widget(Paragraph::new(visible), rect);
    }

    fn draw_transfers(&self, f: &mut Frame<'_>, area: Rect) {
        let lines: Vec<TextLine<'_>> = self
            .transfers
            .iter()
            .take(area.height as usize)
            .map(|((peer, _, dir), (bytes, size, rate))| {
                TextLine::from(Span::styled(
                    progress_text(&clean(peer), dir, *bytes, *size, *rate),
                    self.palette.transfer(),
                ))
            })
            .collect();
        f.render_widget(Paragraph::new(lines), area);
    }

    fn draw_status(&self, f: &mut Frame<'_>, area: Rect) {
        let bar = self.palette.bar();
        let mut spans = vec![Span::styled(format!("[{}] ", &stamp()[..5]), bar)];
        let who = match &self.me {
            Some(me) => {
                let me = match self.my_status {
                    crate::proto::status::Status::Available => clean(me),
                    other => format!("{} ({other})", clean(me)),
                };
                match &self.ms {
                    Some(ms) => format!("[{me} @ {}] ", clean(ms)),
                    None => format!("[{me}] "),
                }
            }
            None => "[not logged in] ".into(),
        };
        spans.push(Span::styled(who, bar));
        spans.push(Span::styled("[", bar));
        for (i, w) in self.windows.iter().enumerate() {
            let mut label = format!("{}:{}", i + 1, clean(w.title()));
            if w.unread > 0 {
                label.push_str(&format!("({})", w.unread));
            }
            let style = if i == self.active {
                bar.add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
            } else if w.spoken {
                bar.add_modifier(Modifier::BOLD)
            } else {
                bar
            };
            if i > 0 {
                spans.push(Span::styled(" ", bar));
            }
            spans.push(Span::styled(label, style));
        }
        spans.push(Span::styled("] ", bar));
        if self.me.is_some() {
            let online = if self.online.is_empty() {
                "none".to_owned()
            } else {
                self.online.join(" ")
            };
            spans.push(Span::styled(format!("[online: {online}] "), bar));
        }
        for who in self.typists.keys() {
            spans.push(Span::styled(format!("[{who} is typing…] "), bar));
        }
        match self.transfers.len() {
            0 => {}
            1 => spans.push(Span::styled("[1 transfer] ", bar)),
            n => spans.push(Span::styled(format!("[{n} transfers] "), bar)),
        }
        match self.view.get() {
            (_, _, false) => {}
            (n, false, true) => {
                spans.push(Span::styled(format!("[back {n} rows: PageDown] "), bar))
            }
            (n, true, true) => spans.push(Span::styled(
                format!("[back {n} rows, the top: PageDown] "),
                bar,
            )),
        }
        f.render_widget(Paragraph::new(TextLine::from(spans)).style(bar), area);
    }

    fn draw_input(&self, f: &mut Frame<'_>, area: Rect) {
        let label = match &self.prompt {
            Some(p) => p.label(),
            None => format!(
                "[{}]",
                clean(self.windows.get(self.active).map_or("main", |w| w.title()))
            ),
        };
        let shown: Vec<char> = match &self.prompt {
            Some(_) => vec!['*'; self.input.len()],
            None => self.input.clone(),
        };
        let label_w = label.chars().count() + 1;
        let room = (area.width as usize).saturating_sub(label_w + 1).max(1);
        // Scroll the line sideways so the cursor stays in view.
        let widths: Vec<usize> = shown
            .iter()
            .map(|c| c.width().unwrap_or(0).max(1))
            .collect();
        let mut first = 0;
        let mut before_cursor: usize = widths[..self.cursor].iter().sum();
        while before_cursor >= room && first < self.cursor {
            before_cursor -= widths[first];
            first += 1;
        }
        let mut text = String::new();
        let mut used = 0;
        for (c, w) in shown.iter().zip(&widths).skip(first) {
            if used + w > room {
                break;
            }
            used += w;
            text.push(if c.is_control() { '?' } else { *c });
        }
        let cursor_x = label_w + before_cursor;
        f.render_widget(
            Paragraph::new(TextLine::from(vec![
                Span::styled(label, Style::default().add_modifier(Modifier::BOLD)),
                Span::raw(" "),
                Span::raw(text),
            ])),
            area,
        );
        f.set_cursor_position((
            area.x + (cursor_x as u16).min(area.width.saturating_sub(1)),
            area.y,
        ));
    }
}

/// Splits a line's styled parts into rows of `width` columns; rows after
/// the first are indented by [`STAMP_WIDTH`]. Rows break after a space
/// when the word that follows fits on a row of its own, else anywhere.
fn wrap(parts: &[(String, Style)], width: usize) -> Vec<Vec<(String, Style)>> {
    let cells: Vec<(char, usize, Style)> = parts
        .iter()
        .flat_map(|(t, s)| t.chars().map(move |c| (c, c.width().unwrap_or(0), *s)))
        .collect();
    let word_room = width.saturating_sub(STAMP_WIDTH).max(1);
    // Columns of the word starting at `i`.
    let word_at = |i: usize| -> usize {
        cells[i..]
            .iter()
            .take_while(|c| c.0 != ' ')
            .map(|c| c.1)
            .sum()
    };
    let mut rows = Vec::new();
    let mut start = 0;
    loop {
        let first = rows.is_empty();
        let room = if first { width } else { word_room }.max(1);
        let mut used = 0;
        let mut end = start;
        while end < cells.len() && used + cells[end].1 <= room {
            used += cells[end].1;
            end += 1;
        }
        if end == start && end < cells.len() {
            // Wider than the row: alone on it.
            end += 1;
        }
        if end < cells.len() {
            // Not after the time stamp alone, and only before a word that
            // then fits.
            let least = if first { STAMP_WIDTH + 1 } else { 1 };
            if let Some(b) = (start + least..=end)
                .rev()
                .find(|&b| cells[b - 1].0 == ' ' && word_at(b) <= word_room)
            {
                end = b;
            }
        }
        let mut row: Vec<(String, Style)> = Vec::new();
        if !first {
            row.push((" ".repeat(STAMP_WIDTH), Style::default()));
        }
        for &(c, _, style) in &cells[start..end] {
            match row.last_mut() {
                Some((text, s)) if *s == style => text.push(c),
                _ => row.push((c.to_string(), style)),
            }
        }
        rows.push(row);
        start = end;
        if start >= cells.len() {
            return rows;
        }
    }
}

/// File paths starting with `word`, for `/send`.
fn paths(word: &str) -> Vec<String> {
    let (dir, prefix) = match word.rfind('/') {
        Some(i) => (&word[..=i], &word[i + 1..]),
        None => ("", word),
    };
    let read = if dir.is_empty() {
        Path::new(".")
    } else {
        Path::new(dir)
    };
    let Ok(entries) = std::fs::read_dir(read) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            if !name.starts_with(prefix) || (prefix.is_empty() && name.starts_with('.')) {
                return None;
            }
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            Some(format!("{dir}{name}{}", if is_dir { "/" } else { " " }))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::client::{Client, ClientConfig};
    use ratatui::backend::TestBackend;
    use std::sync::Arc;

    /// A screen on a client that is not started (no network).
    fn screen() -> Screen {
        let (tx, _) = unbounded();
        let client = Arc::new(Client::new(ClientConfig::default(), 0, tx.clone()));
        let (jobs, _) = unbounded();
        let mut s = Screen::new(Commands { client, tx }, Passwords::default(), jobs);
        s.palette.color = false;
        s
    }

    fn render(s: &Screen, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| s.draw(f)).unwrap();
        let buf = t.backend().buffer();
        (0..h)
            .map(|y| {
                (0..w)
                    .filter_map(|x| buf.cell((x, y)).map(|c| c.symbol().to_owned()))
                    .collect::<String>()
                    .trim_end()
                    .to_owned()
            })
            .collect()
    }

    fn message(from: &str, text: &str) -> Event {
        Event::Message {
            from: from.into(),
            text: text.into(),
            id: 1,
            sent_at: None,
            offline: false,
        }
    }

    #[test]
    fn a_window_starts_with_the_older_history_and_a_changed_key_warns_there() {
        let mut s = screen();
        s.on_event(message("bob", "newest words"));
        let entry = |direction: &str, text: &str| HistoryEntry {
            direction: direction.into(),
            id: 1,
            time: 0,
            text: text.into(),
            state: (direction == "sent").then(|| "delivered".into()),
        };
        s.on_event(Event::History {
            with: "bob".into(),
            messages: vec![
                entry("sent", "older question"),
                entry("received", "older answer"),
                entry("received", "newest words"),
            ],
        });
        s.on_event(Event::KeyChanged { user: "bob".into() });
        s.switch_to(1);
        let rows = render(&s, 200, 12).join("\n");
        assert_eq!(rows.matches("newest words").count(), 1, "{rows}");
        let q = rows.find("older question").expect(&rows);
        let a = rows.find("older answer").expect(&rows);
        let n = rows.find("newest words").expect(&rows);
        assert!(q < a && a < n, "{rows}");
        assert!(rows.contains("different key for bob"), "{rows}");
    }

    #[test]
    fn messages_go_to_their_window_and_are_counted_until_read() {
        let mut s = screen();
        s.on_event(message("bob", "hi there"));
        let rows = render(&s, 60, 10);
        assert!(rows.iter().all(|r| !r.contains("hi there")), "{rows:#?}");
        assert!(rows[8].contains("[1:main 2:bob(1)]"), "{rows:#?}");
        s.switch_to(1);
        let rows = render(&s, 60, 10);
        assert!(
            rows.iter().any(|r| r.ends_with("<bob> hi there")),
            "{rows:#?}"
        );
        assert!(rows.iter().any(|r| r.ends_with("---- new")), "{rows:#?}");
        assert_eq!(rows[9], "[bob]");
        assert!(rows[8].contains("[1:main 2:bob]"), "{rows:#?}");
    }

    #[test]
    fn alt_a_goes_where_a_buddy_spoke() {
        let mut s = screen();
        let carol = s.window_for("carol");
        s.push_text(carol, Kind::Info, "a notice");
        s.on_event(message("bob", "psst"));
        let alt_a = KeyEvent::new(KeyCode::Char('a'), KeyModifiers::ALT);
        let mut t = Terminal::new(TestBackend::new(40, 10)).unwrap();
        s.on_key(alt_a, &mut t);
        assert_eq!(s.windows[s.active].buddy.as_deref(), Some("bob"));
        s.on_key(alt_a, &mut t);
        assert_eq!(s.windows[s.active].buddy.as_deref(), Some("carol"));
    }

    #[test]
    fn a_delivery_marks_its_line_even_when_it_comes_first() {
        let mut s = screen();
        s.on_event(Event::Delivered {
            to: "bob".into(),
            id: 7,
            offline: false,
            via: crate::client::events::Via::Direct,
        });
        s.on_sent(
            0,
            vec![Sent {
                to: "bob".into(),
                id: 7,
                text: "hello".into(),
            }],
        );
        s.on_sent(
            0,
            vec![Sent {
                to: "bob".into(),
                id: 8,
                text: "again".into(),
            }],
        );
        s.on_event(Event::SendFailed {
            to: "bob".into(),
            id: 8,
            reason: "bob is offline".into(),
        });
        s.switch_to(1);
        let rows = render(&s, 60, 10);
        assert!(
            rows.iter().any(|r| r.ends_with("<me> hello ✓")),
            "{rows:#?}"
        );
        assert!(
            rows.iter().any(|r| r.ends_with("<me> again ✗")),
            "{rows:#?}"
        );
        assert!(
            rows.iter().any(|r| r.contains("not delivered to bob (#8)")),
            "{rows:#?}"
        );
    }

    #[test]
    fn a_typed_message_shows_at_once_and_is_marked_later() {
        let mut s = screen();
        s.me = Some("alice".into());
        let bob = s.window_for("bob");
        s.switch_to(bob);
        s.submit("first".into());
        s.submit("/msg bob,carol second".into());
        let rows = render(&s, 60, 10);
        assert!(
            rows.iter().any(|r| r.ends_with("<alice> first")),
            "{rows:#?}"
        );
        assert!(
            rows.iter().any(|r| r.ends_with("<alice> second")),
            "{rows:#?}"
        );
        // The delivery may come before the client's id reaches the screen.
        s.on_event(Event::Delivered {
            to: "bob".into(),
            id: 11,
            offline: false,
            via: crate::client::events::Via::Direct,
        });
        s.on_sent(
            1,
            vec![Sent {
                to: "bob".into(),
                id: 11,
                text: "first".into(),
            }],
        );
        // carol was refused at once: no id, a cross.
        s.on_sent(
            2,
            vec![Sent {
                to: "bob".into(),
                id: 12,
                text: "second".into(),
            }],
        );
        let rows = render(&s, 60, 10);
        assert!(
            rows.iter().any(|r| r.ends_with("<alice> first ✓")),
            "{rows:#?}"
        );
        s.on_event(Event::Delivered {
            to: "bob".into(),
            id: 12,
            offline: false,
            via: crate::client::events::Via::Direct,
        });
        let rows = render(&s, 60, 10);
        assert!(
            rows.iter().any(|r| r.ends_with("<alice> second ✓")),
            "{rows:#?}"
        );
        let carol = s.window_for("carol");
        s.switch_to(carol);
        let rows = render(&s, 60, 10);
        assert!(
            rows.iter().any(|r| r.ends_with("<alice> second ✗")),
            "{rows:#?}"
        );
        // Each message is shown once.
        let all: usize = s.windows.iter().map(|w| w.lines.len()).sum();
        assert_eq!(all, 3 + s.windows[0].lines.len());
    }

    #[test]
    fn the_status_bar_shows_who_is_typing() {
        let mut s = screen();
        let typing = |state: &str| Event::Typing {
            from: "alice".into(),
            state: state.into(),
        };
        let shown = |s: &Screen| render(s, 120, 10).join("\n").contains("alice is typing…");
        s.on_event(typing("on"));
        assert!(shown(&s));
        s.on_event(typing("off"));
        assert!(!shown(&s));
        s.on_event(typing("on"));
        s.on_event(message("alice", "hi"));
        assert!(!shown(&s), "a message ends the typing");
    }

    #[test]
    fn a_transfer_is_one_line_that_changes_in_place() {
        let mut s = screen();
        let progress = |bytes| Event::FileProgress {
            peer: "bob".into(),
            id: 3,
            direction: "send".into(),
            bytes,
            size: 1000,
            rate: 100,
            resumed: 0,
        };
        s.on_event(progress(100));
        s.on_event(progress(500));
        let rows = render(&s, 100, 10);
        let bars: Vec<&String> = rows.iter().filter(|r| r.contains("% to bob")).collect();
        assert_eq!(bars.len(), 1, "{rows:#?}");
        assert!(bars[0].contains(" 50% to bob"), "{rows:#?}");
        assert!(rows[8].contains("[1 transfer]"), "{rows:#?}");
        s.on_event(progress(1000));
        let rows = render(&s, 100, 10);
        assert!(rows.iter().all(|r| !r.contains("% to bob")), "{rows:#?}");
        // Progress never becomes lines of the conversation.
        assert!(s
            .windows
            .iter()
            .all(|w| w.lines.iter().all(|l| !l.text.contains('%'))));
    }

    #[test]
    fn escapes_are_drawn_as_text_and_long_lines_wrap_indented() {
        let mut s = screen();
        s.on_event(message(
            "bob",
            "\u{1b}[2J\u{1b}]0;pwned\u{7} and a long tail that wraps around",
        ));
        s.switch_to(1);
        let rows = render(&s, 40, 10);
        let text = rows.join("\n");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text}"
        );
        assert!(text.contains("<bob> ^[[2J^[]0;pwned^G"), "{text}");
        let at = rows.iter().position(|r| r.contains("<bob>")).unwrap();
        assert!(rows[at + 1].starts_with("         "), "{rows:#?}");
    }

    #[test]
    fn tiny_screens_do_not_break_anything() {
        let mut s = screen();
        for i in 0..30 {
            s.on_event(message("bob", &format!("line {i} {}", "y".repeat(i * 7))));
        }
        s.on_event(Event::FileProgress {
            peer: "bob".into(),
            id: 1,
            direction: "receive".into(),
            bytes: 1,
            size: 2,
            rate: 0,
            resumed: 0,
        });
        s.switch_to(1);
        s.input = "x".repeat(500).chars().collect();
        s.cursor = 250;
        for (w, h) in [(1, 1), (5, 2), (9, 3), (10, 4), (12, 30), (200, 3)] {
            render(&s, w, h);
        }
        let rows = render(&s, 30, 8);
        assert!(rows[7].chars().count() >= 29, "{rows:#?}");
        assert!(rows[7].starts_with("[bob] x"), "{rows:#?}");
    }

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("+0000"), Some(0));
        assert_eq!(parse_offset("+0530"), Some(5 * 3600 + 30 * 60));
        assert_eq!(parse_offset("-0800"), Some(-8 * 3600));
        assert_eq!(parse_offset("0800"), None);
        assert_eq!(parse_offset("+08"), None);
        assert_eq!(stamp().len(), 8);
    }

    #[test]
    fn rows_break_between_words_when_the_next_word_fits() {
        let parts = vec![
            ("12:00:00 ".to_owned(), Style::default()),
            ("one two three four five six".to_owned(), Style::default()),
        ];
        let rows: Vec<String> = wrap(&parts, 24)
            .iter()
            .map(|r| r.iter().map(|(t, _)| t.as_str()).collect())
            .collect();
        assert_eq!(rows, ["12:00:00 one two three ", "         four five six"]);
    }

    #[test]
    fn wrapped_rows_are_indented_and_keep_every_char() {
        let parts = vec![
            ("12:00:00 ".to_owned(), Style::default()),
            ("x".repeat(50), Style::default()),
        ];
        let rows = wrap(&parts, 20);
        let text: Vec<String> = rows
            .iter()
            .map(|r| r.iter().map(|(t, _)| t.as_str()).collect())
            .collect();
        assert!(text.iter().all(|r| r.chars().count() <= 20), "{text:?}");
        assert!(text[1..].iter().all(|r| r.starts_with("         x")));
        let xs: usize = text.iter().map(|r| r.matches('x').count()).sum();
        assert_eq!(xs, 50);
    }
}
