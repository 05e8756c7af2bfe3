//! The terminal client as people use it: the real `ims-client` in a tmux
//! pane against a real cluster, driven with `send-keys` and read with
//! `capture-pane`. tmux is required (`.ci/run` installs it); these tests
//! fail rather than skip without it.
//!
//! What they hold the client to: every message and every command's output
//! shows, in order, also while the client is busy with a large file; a
//! paste is one message; a transfer is one line that changes in place; a
//! resize loses nothing; remote strings carrying escape sequences are shown
//! inert; and line mode (`--plain`) prints every event on a line of its own.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{field, Cluster, CLIENT_BIN, ITERATIONS, WAIT};

const PW: &str = "correct horse battery";
/// Screens take longer than events: a transfer of 200 MB on a busy machine.
const LONG: Duration = Duration::from_secs(120);

/// tmux, or a loud failure: never a skipped test.
fn tmux_version() -> String {
    match Command::new("tmux").arg("-V").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        other => panic!(
            "tmux is required by the terminal tests and is missing ({other:?}); \
             install it (apt-get install -y tmux; .ci/run does this)"
        ),
    }
}

/// One tmux server (its own socket) with one pane running a client.
struct Pane {
    socket: PathBuf,
    label: String,
    log: PathBuf,
}

impl Pane {
    /// Runs `ims-client ARGS` full screen in a `width`x`height` pane, with
    /// its state directory and log in the cluster's directory.
    fn client(c: &Cluster, label: &str, args: &[&str], width: u16, height: u16) -> Pane {
        Pane::client_env(
            c,
            label,
            args,
            width,
            height,
            &[&format!("IMS_PASSWORD={PW}")],
        )
    }

    /// [`Pane::client`] with `env` (`NAME=VALUE`) instead of the password.
    fn client_env(
        c: &Cluster,
        label: &str,
        args: &[&str],
        width: u16,
        height: u16,
        env: &[&str],
    ) -> Pane {
        tmux_version();
        let dir = c.env.path();
        let socket = dir.join(format!("tmux-{label}"));
        let log = dir.join(format!("screen-{label}.log"));
        let state = dir.join(format!("state-{label}"));
        let downloads = dir.join(format!("downloads-{label}"));
        std::fs::create_dir_all(&downloads).unwrap();
        let mut cmd = vec!["env".to_owned()];
        cmd.extend(env.iter().map(|e| e.to_string()));
        cmd.extend([
            format!("XDG_STATE_HOME={}", state.display()),
            format!("XDG_CONFIG_HOME={}", dir.join("xdg").display()),
            format!("HOME={}", dir.display()),
            "RUST_LOG=info".to_owned(),
            "TERM=screen-256color".to_owned(),
            CLIENT_BIN.to_owned(),
            "--crs".to_owned(),
            c.crs.addr.to_string(),
            "--listen".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--kdf-iterations".to_owned(),
            ITERATIONS.to_string(),
            "--insecure-kdf".to_owned(),
            "--download-dir".to_owned(),
            downloads.display().to_string(),
            "--log-file".to_owned(),
            log.display().to_string(),
        ]);
        cmd.extend(args.iter().map(|a| a.to_string()));
        // After the client exits, the pane stays for a last look.
        let line = format!(
            "{}; echo CLIENT-EXITED $?; sleep 600",
            cmd.iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = Command::new("tmux")
            .arg("-u")
            .arg("-S")
            .arg(&socket)
            .args(["-f", "/dev/null", "new-session", "-d", "-s", "t"])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .arg(line)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux new-session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p = Pane {
            socket,
            label: label.to_owned(),
            log,
        };
        p.tmux(&["set-option", "-g", "history-limit", "5000"]);
        p
    }

    fn tmux(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-u")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "{}: tmux {args:?} failed: {}",
            self.label,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` as keys (no Enter).
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "t", "-l", text]);
    }

    /// Presses keys by tmux name (`Enter`, `PageUp`, `M-2`, ...).
    fn key(&self, key: &str) {
        self.tmux(&["send-keys", "-t", "t", key]);
    }

    /// Types `line` and Enter.
    fn line(&self, line: &str) {
        self.type_text(line);
        self.key("Enter");
    }

    /// The visible screen, one string per row, trailing blanks trimmed.
    fn screen(&self) -> Vec<String> {
        self.tmux(&["capture-pane", "-p", "-t", "t"])
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect()
    }

    /// Waits until the screen satisfies `pred`; the screen then. Panics
    /// with the screen and the client's log on timeout.
    fn wait(&self, what: &str, timeout: Duration, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let end = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            if Instant::now() >= end {
                panic!(
                    "{}: timed out after {timeout:?} waiting for {what}; screen:\n{}\nlog:\n{}",
                    self.label,
                    s.join("\n"),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a row containing `text`.
    fn wait_text(&self, text: &str) -> Vec<String> {
        self.wait(&format!("{text:?}"), WAIT * 3, |s| {
            s.iter().any(|l| l.contains(text))
        })
    }

    /// The conversation rows: everything above the transfer lines, the
    /// status bar and the input line.
    fn conversation(screen: &[String]) -> Vec<String> {
        let status = screen
            .iter()
            .rposition(|l| l.starts_with('[') && l.contains("] ["))
            .unwrap_or(screen.len());
        screen[..status]
            .iter()
            .filter(|l| !l.starts_with("[#") && !l.starts_with("[-"))
            .cloned()
            .collect()
    }

    /// Every row of the active window from its first line to its last,
    /// read page by page with PageUp and PageDown (the status bar says how
    /// far back the view is, and when it shows the top).
    fn whole_window(&self) -> Vec<String> {
        let back = |s: &[String]| -> Option<String> {
            let bar = s.iter().rev().find(|l| l.contains("] [")).cloned()?;
            let at = bar.find("[back ")?;
            Some(bar[at..].split(']').next()?.to_owned())
        };
        // Up to the top.
        let mut s = self.screen();
        for _ in 0..500 {
            if back(&s).is_some_and(|b| b.contains("the top")) {
                break;
            }
            let before = back(&s);
            self.key("PageUp");
            s = self.wait("the view to move back", WAIT, |now| back(now) != before);
        }
        let mut rows: Vec<String> = Pane::conversation(&s);
        // Down to the bottom, keeping what each page adds.
        while let Some(before) = back(&s) {
            self.key("PageDown");
            s = self.wait("the view to move forward", WAIT, |now| {
                back(now).as_ref() != Some(&before)
            });
            let page = Pane::conversation(&s);
            let overlap = (0..=page.len().min(rows.len()))
                .rev()
                .find(|&n| rows[rows.len() - n..] == page[..n])
                .unwrap_or(0);
            rows.extend_from_slice(&page[overlap..]);
        }
        rows
    }

    /// The screen once two captures in a row agree (the clock aside).
    fn settled(&self) -> Vec<String> {
        let mut a = self.screen();
        for _ in 0..50 {
            thread::sleep(Duration::from_millis(200));
            let b = self.screen();
            if Pane::conversation(&a) == Pane::conversation(&b) {
                return b;
            }
            a = b;
        }
        a
    }

    fn title(&self) -> String {
        self.tmux(&["display-message", "-p", "-t", "t", "#{pane_title}"])
            .trim()
            .to_owned()
    }
}

impl Drop for Pane {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Rows that are neither a line's start (a time stamp) nor its wrapped
/// continuation (indented): what a line drawn over another leaves.
fn broken_rows(rows: &[String]) -> Vec<String> {
    rows.iter()
        .filter(|r| !r.is_empty())
        .filter(|r| {
            let b = r.as_bytes();
            let stamped = b.len() >= 9
                && b[0..2].iter().all(u8::is_ascii_digit)
                && b[2] == b':'
                && b[3..5].iter().all(u8::is_ascii_digit)
                && b[5] == b':'
                && b[6..8].iter().all(u8::is_ascii_digit)
                && b[8] == b' ';
            !stamped && !r.starts_with("         ")
        })
        .cloned()
        .collect()
}

/// Positions of `wanted` in `rows`, in order; panics naming what is
/// missing or out of order.
fn assert_in_order(label: &str, rows: &[String], wanted: &[String]) {
    let mut at = 0;
    for w in wanted {
        match rows[at..].iter().position(|r| r.contains(w.as_str())) {
            Some(i) => at += i + 1,
            None => {
                let anywhere = rows.iter().any(|r| r.contains(w.as_str()));
                panic!(
                    "{label}: {w:?} {}; rows:\n{}",
                    if anywhere {
                        "is out of order"
                    } else {
                        "is missing"
                    },
                    rows.join("\n")
                );
            }
        }
    }
}

/// Two full-screen clients made buddies by typing.
fn two_buddies(c: &Cluster, width: u16, height: u16) -> (Pane, Pane) {
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = Pane::client(c, "alice", &["--user", "alice"], width, height);
    let bob = Pane::client(c, "bob", &["--user", "bob"], width, height);
    alice.wait_text("logged in as alice");
    bob.wait_text("logged in as bob");
    alice.line("/add bob");
    bob.wait_text("alice wants to be your buddy");
    bob.line("/accept alice");
    bob.wait_text("ok: alice is now your buddy");
    alice.wait_text("bob is now your buddy");
    alice.wait("bob online in the status bar", WAIT * 3, |s| {
        s.iter().any(|l| l.contains("[online: bob"))
    });
    (alice, bob)
}

/// 1. Two clients chat while one offers and sends a 200 MB file: every
///    message and every command's output shows in order, in the pane and
///    in the window's scrollback, the transfer is one line that changes in
///    place, and no line is drawn over another.
#[test]
fn nothing_is_lost_while_a_large_file_goes() {
    let c = Cluster::start(1);
    let (alice, bob) = two_buddies(&c, 120, 30);
    // The start-up hint and the login show.
    let s = alice.screen();
    assert!(
        s.iter().any(|l| l.contains("type /help for commands")),
        "{s:#?}"
    );

    let big = c.env.path().join("big.bin");
    File::create(&big)
        .and_then(|f| f.set_len(200 * 1024 * 1024))
        .unwrap();
    alice.line("/query bob");
    bob.line("/query alice");
    alice.line(&format!("/send bob {}", big.display()));
    // Typed while the file is being hashed: it must all get through.
    let mut expected_alice = Vec::new();
    let mut expected_bob = Vec::new();
    for i in 0..8 {
        let a = format!("alice says {i} while hashing");
        let b = format!("bob says {i} while alice hashes");
        alice.line(&a);
        bob.line(&b);
        expected_alice.push(a);
        expected_bob.push(b);
    }
    bob.wait_text("offers the file 'big.bin'");
    bob.line("/accept alice");
    bob.wait_text("ok: receiving the file from alice");
    // While it moves, both talk and run commands; alice's screen is
    // looked at after each line for the transfer's line.
    let mut bars: Vec<Vec<String>> = Vec::new();
    let bar_rows = |s: &[String]| -> Vec<String> {
        s.iter()
            .filter(|l| l.contains("% to bob"))
            .cloned()
            .collect()
    };
    for i in 0..12 {
        let a = format!("alice says {i} during the transfer");
        let b = format!("bob says {i} during the transfer");
        alice.line(&a);
        bob.line(&b);
        expected_alice.push(a);
        expected_bob.push(b);
        bars.push(bar_rows(&alice.screen()));
    }
    alice.line("/profile set fullname Alice Liddell");
    alice.line("/buddies");
    alice.line("/search bob");
    bob.line("/buddies");
    // The file arrives whole; until then the transfer's line is watched.
    let end = Instant::now() + LONG;
    loop {
        let s = alice.screen();
        if s.iter()
            .any(|l| l.contains("sent 'big.bin' (200.0 MiB) to bob"))
        {
            break;
        }
        bars.push(bar_rows(&s));
        assert!(
            Instant::now() < end,
            "the file never went:\n{}",
            s.join("\n")
        );
        thread::sleep(Duration::from_millis(100));
    }
    bob.wait("the file received", LONG, |s| {
        s.iter()
            .any(|l| l.contains("received 200.0 MiB from alice"))
    });
    // One line for the transfer, changing in place, gone at the end.
    assert!(bars.iter().all(|b| b.len() <= 1), "{bars:#?}");
    let mut seen: Vec<&String> = bars.iter().flatten().collect();
    seen.dedup();
    assert!(seen.len() >= 2, "the transfer line never moved: {seen:#?}");
    let s = alice.settled();
    assert!(
        !s.iter().any(|l| l.contains("% to bob")),
        "{}",
        s.join("\n")
    );

    // Every message delivered (✓) and shown on both sides, in order.
    let delivered = |p: &Pane, n: usize| {
        let end = Instant::now() + WAIT * 3;
        loop {
            let rows = p.whole_window();
            let ticks = rows.iter().filter(|r| r.contains(" ✓")).count();
            if ticks >= n {
                return;
            }
            assert!(
                Instant::now() < end,
                "{}: {ticks} of {n} messages delivered:\n{}",
                p.label,
                rows.join("\n")
            );
        }
    };
    delivered(&alice, expected_alice.len());
    delivered(&bob, expected_bob.len());
    let alice_rows = alice.whole_window();
    let bob_rows = bob.whole_window();
    assert_in_order("alice's window", &alice_rows, &expected_alice);
    assert_in_order("alice's window", &alice_rows, &expected_bob);
    assert_in_order("bob's window", &bob_rows, &expected_alice);
    assert_in_order("bob's window", &bob_rows, &expected_bob);
    let outputs: Vec<String> = [
        "offered ",
        "profile:",
        "fullname: Alice Liddell",
        "buddies:",
        "* bob (online)",
        "found:",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_in_order("alice's command outputs", &alice_rows, &outputs);
    // The transfer's end may come before or after the commands typed
    // during it (how fast 200 MB go is not the point): after the offer.
    assert_in_order(
        "alice's transfer",
        &alice_rows,
        &["offered ".into(), "sent 'big.bin'".into()],
    );
    assert_in_order(
        "bob's command outputs",
        &bob_rows,
        &[
            "ok: receiving the file from alice".into(),
            "* alice (online)".into(),
        ],
    );
    for (who, rows) in [("alice", &alice_rows), ("bob", &bob_rows)] {
        let broken = broken_rows(rows);
        assert!(broken.is_empty(), "{who}: rows drawn over: {broken:#?}");
    }
    // Messages were shown with their sender.
    assert!(bob_rows
        .iter()
        .any(|r| r.contains("<alice> alice says 0 while hashing")));

    // The main window holds the login and the start-up hint.
    alice.key("M-1");
    let s = alice.wait_text("logged in as alice");
    assert!(
        s.iter().any(|l| l.contains("type /help")),
        "{}",
        s.join("\n")
    );
    alice.line("/quit");
    alice.wait_text("CLIENT-EXITED 0");
    // Logs went to the file, never onto the screen.
    let log = std::fs::read_to_string(&alice.log).unwrap();
    assert!(log.contains("client listening on"), "{log}");
    drop(bob);
}

/// 2. A 2 KB paste is one message, whole.
#[test]
fn a_paste_is_one_message() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = Pane::client(&c, "alice", &["--user", "alice"], 100, 30);
    alice.wait_text("logged in as alice");
    let bob = c.login("bob", PW);
    alice.line("/add bob");
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    alice.wait_text("bob is now your buddy (online)");
    alice.line("/query bob");

    let text: String = (0..2048)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let file = c.env.path().join("paste.txt");
    std::fs::write(&file, format!("{}\n{}", &text[..1024], &text[1024..])).unwrap();
    alice.tmux(&["load-buffer", &file.display().to_string()]);
    // -p: as a terminal pastes (bracketed), which is what people do.
    alice.tmux(&["paste-buffer", "-p", "-t", "t"]);
    alice.key("Enter");
    // The line shows at once, whole (wrapped), before anything else.
    alice.wait_text(&format!("<alice> {}", &text[..40]));
    let end = Instant::now() + LONG;
    while !bob.saw(|e| e["event"] == "message") {
        assert!(
            Instant::now() < end,
            "no message reached bob; alice's screen:\n{}\nalice's log:\n{}\nbob's events: {:#?}\nbob's log:\n{}",
            alice.screen().join("\n"),
            std::fs::read_to_string(&alice.log).unwrap_or_default(),
            bob.events(),
            bob.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let got = bob.wait_event("message", |e| e["from"] == "alice");
    let expected = format!("{} {}", &text[..1024], &text[1024..]);
    assert_eq!(field(&got, "text"), expected);
    // Exactly one message.
    alice.wait_text(" ✓");
    thread::sleep(Duration::from_millis(500));
    let n = bob
        .events()
        .iter()
        .filter(|e| e["event"] == "message")
        .count();
    assert_eq!(n, 1);

    // An action: sent as such, shown as one.
    alice.line("/me waves");
    alice.wait_text("* alice waves");
    bob.wait_event("message", |e| e["text"] == "/me waves");
}

/// 3. A resize keeps every line, rewrapped, and the status bar.
#[test]
fn a_resize_keeps_everything() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    let alice = Pane::client(&c, "alice", &["--user", "alice"], 100, 40);
    alice.wait_text("logged in as alice");
    for i in 0..5 {
        alice.line(&format!(
            "/profile f{i} value number {i} {}",
            "x".repeat(40)
        ));
    }
    alice.wait_text("f4: value number 4");
    let before: Vec<String> = (0..5).map(|i| format!("f{i}: value number {i}")).collect();
    alice.tmux(&["resize-window", "-t", "t", "-x", "50", "-y", "30"]);
    // Redrawn: the input line at the bottom, long lines wrapped.
    let s = alice.wait("a narrower screen redrawn", WAIT, |s| {
        s.len() == 30
            && s.last().is_some_and(|l| l.starts_with("[main]"))
            && s.iter().any(|l| l.starts_with("         x"))
    });
    let rows = Pane::conversation(&s);
    assert_in_order("after narrowing", &rows, &before);
    assert!(broken_rows(&rows).is_empty(), "{}", s.join("\n"));
    alice.tmux(&["resize-window", "-t", "t", "-x", "140", "-y", "45"]);
    // The pane first shows the old picture; then the client redraws.
    let s = alice.wait("a wider screen redrawn", WAIT, |s| {
        s.len() == 45
            && s.iter().any(|r| r.contains("logged in as alice"))
            && s.last().is_some_and(|l| l.starts_with("[main]"))
    });
    let rows = Pane::conversation(&s);
    assert_in_order("after widening", &rows, &before);
    assert!(s.last().is_some_and(|l| l.starts_with("[main]")), "{s:#?}");
}

/// 4. A message, a file name and a profile field carrying escape sequences
///    are shown inert: the screen is not cleared, the title not changed,
///    the cursor not moved, no line forged.
#[test]
fn escape_sequences_from_others_are_inert() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("mallory", PW);
    let alice = Pane::client(&c, "alice", &["--user", "alice"], 120, 40);
    alice.wait_text("logged in as alice");
    let title = alice.title();
    let m = c.login("mallory", PW);
    alice.line("/add mallory");
    m.wait_event("request", |e| e["from"] == "alice");
    m.send("/accept alice");
    alice.wait_text("mallory is now your buddy (online)");
    alice.line("/query mallory");

    let evil = "\u{1b}[2J\u{1b}[H\u{1b}]0;pwned\u{7}\u{1b}[5;5HEVIL\u{1b}[31m";
    m.send(&format!("/msg alice hi{evil}\u{8}\u{8}\r<alice> forged"));
    alice.wait_text("<mallory> hi^[[2J^[[H^[]0;pwned^G^[[5;5HEVIL^[[31m^H^H^M<alice> forged");
    let dir = c.env.path().join("evil");
    std::fs::create_dir_all(&dir).unwrap();
    let name = format!("x{evil}.txt");
    let path = dir.join(&name);
    std::fs::write(&path, b"hello").unwrap();
    m.send(&format!("/send alice {}", path.display()));
    alice.wait_text("offers the file 'x^[[2J^[[H^[]0;pwned^G^[[5;5HEVIL^[[31m.txt'");
    m.send(&format!("/profile motto be{evil}"));
    m.wait_event("profile", |e| e["profile"]["motto"].is_string());
    alice.line("/search mallory");
    let s = alice.wait_text("motto=be^[[2J^[[H^[]0;pwned^G^[[5;5HEVIL^[[31m");

    // Nothing acted: the earlier lines are all there, the title is the
    // same, no text was put at row 5 column 5, the bar is intact.
    assert_ne!(alice.title(), "pwned");
    assert_eq!(alice.title(), title);
    let rows = Pane::conversation(&s);
    assert!(broken_rows(&rows).is_empty(), "{}", s.join("\n"));
    assert!(
        !s.iter()
            .any(|l| l.trim() == "EVIL" || l.starts_with("    EVIL")),
        "{}",
        s.join("\n")
    );
    assert!(
        !rows.iter().any(|r| r.starts_with("<alice>")),
        "a forged line: {}",
        s.join("\n")
    );
    assert!(s.iter().any(|l| l.contains("[alice @")), "{}", s.join("\n"));
    alice.key("M-1");
    alice.wait_text("logged in as alice");
}

/// A line-mode client with piped stdin and stdout.
struct PlainClient {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    raw: Arc<Mutex<Vec<u8>>>,
}

impl PlainClient {
    fn start(c: &Cluster, label: &str, user: &str) -> PlainClient {
        let dir = c.env.path();
        let mut child = Command::new(CLIENT_BIN)
            .args(["--plain", "--crs", &c.crs.addr.to_string()])
            .args(["--listen", "127.0.0.1:0", "--insecure-kdf"])
            .args(["--kdf-iterations", &ITERATIONS.to_string(), "--user", user])
            .env("IMS_PASSWORD", PW)
            .env("HOME", dir)
            .env("XDG_CONFIG_HOME", dir.join("xdg"))
            .env("XDG_STATE_HOME", dir.join(format!("state-{label}")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(dir.join(format!("plain-{label}.log"))).unwrap())
            .spawn()
            .expect("spawn ims-client --plain");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (l, r) = (lines.clone(), raw.clone());
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                r.lock().unwrap().extend_from_slice(&buf);
                let line = String::from_utf8_lossy(&buf);
                l.lock()
                    .unwrap()
                    .push(line.trim_end_matches('\n').to_owned());
                buf.clear();
            }
        });
        PlainClient {
            label: label.to_owned(),
            child,
            stdin,
            lines,
            raw,
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| pred(l))
            .count()
    }

    fn wait_count(&self, what: &str, n: usize, timeout: Duration, pred: impl Fn(&str) -> bool) {
        let end = Instant::now() + timeout;
        while self.count(&pred) < n {
            if Instant::now() >= end {
                panic!(
                    "{}: {} of {n} lines of {what}; output:\n{}",
                    self.label,
                    self.count(&pred),
                    self.lines.lock().unwrap().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PlainClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 5. `--plain` with piped input: 1,000 lines sent, 1,000 events printed
///    on both sides, each on a line of its own, in order; nothing on
///    stdout can act on a terminal.
#[test]
fn plain_mode_delivers_a_thousand_lines() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let mut alice = PlainClient::start(&c, "alice", "alice");
    let mut bob = PlainClient::start(&c, "bob", "bob");
    alice.wait_count("login", 1, WAIT, |l| l == "logged in as alice");
    bob.wait_count("login", 1, WAIT, |l| l == "logged in as bob");
    alice.send("/add bob");
    bob.wait_count("the request", 1, WAIT, |l| {
        l.starts_with("alice wants to be your buddy")
    });
    bob.send("/accept alice");
    alice.wait_count("bob added", 1, WAIT, |l| {
        l == "bob is now your buddy (online)"
    });

    // Half by /msg, half as plain lines to whom /query named.
    let mut script = String::new();
    for i in 0..500 {
        script.push_str(&format!("/msg bob line {i}\n"));
    }
    script.push_str("/query bob\n");
    for i in 500..1000 {
        script.push_str(&format!("line {i}\n"));
    }
    // Escapes, too: shown inert on the other side.
    script.push_str("/msg bob \u{1b}[2J\u{1b}]0;pwned\u{7}done\n");
    alice
        .stdin
        .as_mut()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    alice.stdin.as_mut().unwrap().flush().unwrap();
    bob.wait_count("messages", 1001, LONG, |l| l.starts_with("<alice> "));
    alice.wait_count("deliveries", 1001, LONG, |l| {
        l.starts_with("  (delivered to bob, #")
    });
    let got: Vec<String> = bob
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("<alice> "))
        .cloned()
        .collect();
    for (i, l) in got.iter().take(1000).enumerate() {
        assert_eq!(l, &format!("<alice> line {i}"));
    }
    assert_eq!(got[1000], "<alice> ^[[2J^[]0;pwned^Gdone");
    let raw = bob.raw.lock().unwrap().clone();
    assert!(!raw.contains(&0x1b), "an escape reached bob's stdout");
    assert!(!raw.contains(&0x07));

    // End of input: logged out, exit 0, the last line whole.
    alice.stdin.take();
    let status = alice.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let out = alice.lines.lock().unwrap().clone();
    assert_eq!(out.last().map(String::as_str), Some("alice logged out"));
    bob.send("/quit");
    bob.stdin.take();
    assert!(bob.child.wait().unwrap().success());
}

/// `--json`: a failed login at start exits non-zero; a message that cannot
/// be sent names its id.
#[test]
fn json_fixes() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    let out = Command::new(CLIENT_BIN)
        .args(["--json", "--crs", &c.crs.addr.to_string()])
        .args(["--listen", "127.0.0.1:0", "--insecure-kdf"])
        .args(["--kdf-iterations", &ITERATIONS.to_string()])
        .args(["--user", "nosuchuser"])
        .env("IMS_PASSWORD", PW)
        .env("HOME", c.env.path())
        .env("XDG_CONFIG_HOME", c.env.path().join("xdg"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(r#""reason":"wrong name or password""#),
        "{text}"
    );

    let alice = c.login("alice", PW);
    alice.send("/msg nobody hello");
    let e = alice.wait_event("send-failed", |e| e["to"] == "nobody");
    assert!(e["id"].as_u64().unwrap_or(0) > 0, "{e}");
}

/// The state directory of a pane's client.
fn state_dir(c: &Cluster, label: &str) -> PathBuf {
    c.env.path().join(format!("state-{label}"))
}

/// History: commands only, per account, never message text.
#[test]
fn history_keeps_commands_per_account() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = Pane::client(&c, "alice", &["--user", "alice"], 100, 30);
    alice.wait_text("logged in as alice");
    alice.line("/msg bob a secret text");
    alice.line("/buddies");
    alice.line("another secret");
    alice.wait_text("no buddies yet");
    alice.wait_text("error (msg): who to?");
    alice.line("/quit");
    let s = alice.wait_text("CLIENT-EXITED 0");
    // The screen is put back, and the logout that followed is printed.
    let lines: Vec<&String> = s.iter().filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines,
        ["alice logged out", "CLIENT-EXITED 0"],
        "{}",
        s.join("\n")
    );
    let file = state_dir(&c, "alice").join("ims/history/alice");
    let h = std::fs::read_to_string(&file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the history is readable by others: {mode:o}"
    );
    assert!(!h.contains("secret"), "{h}");
    assert!(h.lines().any(|l| l == "/buddies"), "{h}");
    drop(alice);
    assert!(!Path::new(&state_dir(&c, "alice").join("ims/history/bob")).exists());
    // Up recalls it in the next run of the same account.
    let dir2 = state_dir(&c, "alice2").join("ims/history");
    std::fs::create_dir_all(&dir2).unwrap();
    std::fs::copy(&file, dir2.join("alice")).unwrap();
    let again = Pane::client(&c, "alice2", &["--user", "alice"], 100, 30);
    again.wait_text("logged in as alice");
    again.key("Up");
    again.wait_text("[main] /quit");
    again.key("Up");
    again.wait_text("[main] /buddies");
    again.key("Up");
    again.wait_text("[main] /msg bob");
}

/// SGR colour parameters (30-37, 38, 40-47, 48, 90-97, 100-107) in text
/// captured with its attributes (`capture-pane -e`).
fn colours_in(captured: &str) -> Vec<String> {
    let mut found = Vec::new();
    for part in captured.split("\u{1b}[").skip(1) {
        let Some(end) = part.find('m') else { continue };
        let params = &part[..end];
        if !params.chars().all(|c| c.is_ascii_digit() || c == ';') {
            continue;
        }
        for p in params.split(';') {
            if let Ok(n) = p.parse::<u32>() {
                if matches!(n, 30..=38 | 40..=48 | 90..=97 | 100..=107) {
                    found.push(params.to_owned());
                }
            }
        }
    }
    found
}

/// Tab completes commands, names and paths; `/passwd` asks at the input
/// line for the current password and the new one twice, showing none of
/// them; `NO_COLOR` leaves attributes only.
#[test]
fn completion_passwd_and_no_color() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let bob = c.login("bob", PW);
    let alice = Pane::client_env(&c, "alice", &[], 100, 30, &["NO_COLOR=1"]);
    alice.wait_text("ims: type /help");
    // No password given: it is asked at the input line, shown as stars.
    alice.line("/login alice");
    alice.wait_text("password for alice:");
    alice.type_text(PW);
    alice.wait_text(&format!("password for alice: {}", "*".repeat(PW.len())));
    alice.key("Enter");
    alice.wait_text("logged in as alice");
    alice.line("/add bob");
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    alice.wait_text("bob is now your buddy (online)");

    alice.type_text("/que");
    alice.key("Tab");
    alice.wait_text("[main] /query");
    alice.type_text("b");
    alice.key("Tab");
    alice.wait_text("[main] /query bob");
    alice.key("Enter");
    alice.wait("bob's window", WAIT, |s| {
        s.last().is_some_and(|l| l.starts_with("[bob]"))
    });
    let dir = c.env.path().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("quarterly-report.pdf"), b"numbers").unwrap();
    alice.type_text(&format!("/send bob {}/quar", dir.display()));
    alice.key("Tab");
    alice.wait_text("quarterly-report.pdf");
    alice.key("C-u");
    alice.wait("an empty input line", WAIT, |s| {
        s.last().is_some_and(|l| l == "[bob]")
    });
    alice.line("/window 1");
    alice.wait("the main window", WAIT, |s| {
        s.last().is_some_and(|l| l == "[main]")
    });
    alice.key("M-2");
    alice.wait("bob's window again", WAIT, |s| {
        s.last().is_some_and(|l| l == "[bob]")
    });

    // The current password is checked; nothing typed shows.
    let new = "a brand new password";
    alice.line("/passwd");
    alice.wait_text("current password:");
    alice.line("wrong password");
    alice.wait_text("new password:");
    alice.line(new);
    alice.wait_text("new password again:");
    alice.line(new);
    alice.wait_text("error (passwd): the current password is wrong");
    alice.line("/passwd");
    alice.wait_text("current password:");
    alice.line(PW);
    alice.wait_text("new password:");
    alice.line(new);
    alice.wait_text("new password again:");
    alice.line(new);
    let s = alice.wait_text("ok (passwd)");
    let all = s.join("\n");
    assert!(!all.contains(PW) && !all.contains(new), "{all}");

    // Attributes only under NO_COLOR.
    let captured = alice.tmux(&["capture-pane", "-p", "-e", "-t", "t"]);
    assert!(captured.contains("\u{1b}["), "no attributes at all?");
    assert_eq!(colours_in(&captured), Vec::<String>::new(), "{captured:?}");

    // The new password is the one that works.
    alice.line("/quit");
    alice.wait_text("CLIENT-EXITED 0");
    drop(bob);
    let again = c.client("alice-again", new);
    again.send("/login alice");
    again.wait_event("logged-in", |e| e["user"] == "alice");
}

/// With colours (no `NO_COLOR`), there are some: the check above can fail.
#[test]
fn colours_without_no_color() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    let alice = Pane::client(&c, "alice", &["--user", "alice"], 100, 20);
    alice.wait_text("logged in as alice");
    alice.line("/nosuchcommand");
    alice.wait_text("error (nosuchcommand)");
    let captured = alice.tmux(&["capture-pane", "-p", "-e", "-t", "t"]);
    assert!(!colours_in(&captured).is_empty(), "{captured:?}");
}

/// Line mode on a terminal: the hint, then the password prompt on a line
/// of its own, then every event on its own line.
#[test]
fn plain_mode_on_a_terminal() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    let alice = Pane::client_env(&c, "alice", &["--plain", "--user", "alice"], 100, 20, &[]);
    let s = alice.wait_text("password for alice:");
    assert!(
        s.iter().any(|l| l == "type /help for commands"),
        "{}",
        s.join("\n")
    );
    alice.line(PW);
    alice.wait_text("no buddies yet");
    alice.line("/profile set motto carpe diem");
    alice.wait_text("  motto: carpe diem");
    alice.line("/quit");
    let s = alice.wait_text("CLIENT-EXITED 0");
    let at = s.iter().position(|l| l == "logged in as alice").unwrap();
    let rest: Vec<&str> = s[at..]
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        rest,
        [
            "logged in as alice",
            "no buddies yet; find people with /search and /add",
            "/profile set motto carpe diem",
            "profile:",
            "  motto: carpe diem",
            "/quit",
            "alice logged out",
            "CLIENT-EXITED 0",
        ],
        "{}",
        s.join("\n")
    );
}

/// A cancelled transfer is reported once on each side.
#[test]
fn a_cancel_is_reported_once() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    common::befriend(&alice, "alice", &bob, "bob");
    let big = c.env.path().join("big.bin");
    File::create(&big)
        .and_then(|f| f.set_len(200 * 1024 * 1024))
        .unwrap();
    alice.send(&format!("/send bob {}", big.display()));
    // Hashing before the offer reports its progress, to the end.
    alice.wait_event("file-progress", |e| {
        e["direction"] == "hash" && e["bytes"] == e["size"] && e["size"] == 200 * 1024 * 1024
    });
    bob.wait_event("file-offer", |e| e["from"] == "alice");
    bob.send("/accept alice");
    bob.wait_event("file-progress", |e| e["direction"] == "receive");
    alice.send("/cancel bob");
    alice.wait_ok("cancel");
    alice.wait_event("file-failed", |_| true);
    bob.wait_event("file-failed", |_| true);
    // Anything doubled would follow at once; give it a moment to show.
    thread::sleep(Duration::from_secs(2));
    let failed = |cl: &common::Client| {
        cl.events()
            .iter()
            .filter(|e| e["event"] == "file-failed")
            .count()
    };
    assert_eq!(failed(&alice), 1, "{:#?}", alice.events());
    assert_eq!(failed(&bob), 1, "{:#?}", bob.events());
}

/// The MS goes away: the screen says so in a line for people, once, and no
/// log line (they go to the log file) ever reaches the screen.
#[test]
fn a_lost_server_is_one_human_line_and_logs_stay_off_screen() {
    let mut c = Cluster::start(1);
    c.register("alice", PW);
    let alice = Pane::client(&c, "alice", &["--user", "alice"], 120, 30);
    alice.wait_text("logged in as alice");
    c.ms[0].kill9();
    // The login's held connection closes with the MS: the login ends at
    // once, in one human line.
    let s = alice.wait("the login to end", WAIT * 4, |s| {
        s.iter().any(|l| l.contains("alice logged out"))
    });
    let all = s.join("\n");
    assert_eq!(
        all.matches("the connection to the messaging server was lost")
            .count(),
        1,
        "{all}"
    );
    assert!(all.contains("log in again with /login alice"), "{all}");
    assert!(!all.contains("WARN") && !all.contains("INFO"), "{all}");
    assert!(broken_rows(&Pane::conversation(&s)).is_empty(), "{all}");
    let log = std::fs::read_to_string(&alice.log).unwrap();
    assert!(
        log.contains("WARN") && log.contains("messaging server closed"),
        "{log}"
    );
}

/// A buddy's status shows in the status bar and beside their name in
/// `/buddies` with their personal message; our own beside our name.
#[test]
fn statuses_show_in_the_status_bar_and_the_buddy_list() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = Pane::client(&c, "alice", &["--user", "alice"], 100, 30);
    alice.wait_text("logged in as alice");
    let bob = c.login("bob", PW);
    alice.line("/add bob");
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    alice.wait_text("bob is now your buddy (online)");

    bob.send("/status busy in a call");
    alice.wait_text("bob is busy: in a call");
    alice.wait_text("[online: bob(busy)]");
    alice.line("/buddies");
    alice.wait_text("* bob (busy): in a call");
    alice.line("/status away lunch");
    alice.wait_text("[alice (away) @");
    bob.wait_event("status", |e| {
        e["user"] == "alice" && e["status"] == "away" && e["message"] == "lunch"
    });
}

/// Auto-away in full screen: `away` after the idle limit (shown beside
/// our name), and any key ends it.
#[test]
fn auto_away_ends_at_a_keypress() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let config = c.env.path().join("away.toml");
    std::fs::write(&config, "auto_away_secs = 1\n").unwrap();
    let alice = Pane::client(
        &c,
        "alice",
        &["--user", "alice", "-c", config.to_str().unwrap()],
        100,
        30,
    );
    alice.wait_text("logged in as alice");
    let bob = c.login("bob", PW);
    alice.line("/add bob");
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    alice.wait_text("bob is now your buddy (online)");

    alice.wait_text("[alice (away) @");
    bob.wait_event("status", |e| e["user"] == "alice" && e["status"] == "away");
    alice.type_text("x");
    bob.wait_event("status", |e| {
        e["user"] == "alice" && e["status"] == "available"
    });
}

/// Typing in a buddy's window tells them (on as the first key goes in,
/// off when the line is sent), and their typing shows in the status bar.
#[test]
fn typing_is_told_and_shown() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = Pane::client(&c, "alice", &["--user", "alice"], 100, 30);
    alice.wait_text("logged in as alice");
    let bob = c.login("bob", PW);
    alice.line("/add bob");
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    alice.wait_text("bob is now your buddy (online)");
    alice.line("/query bob");

    alice.type_text("hel");
    bob.wait_event("typing", |e| e["from"] == "alice" && e["state"] == "on");
    alice.type_text("lo");
    alice.key("Enter");
    bob.wait_event("message", |e| e["text"] == "hello");
    bob.wait_event("typing", |e| e["from"] == "alice" && e["state"] == "off");

    bob.send("/typing alice on");
    alice.wait_text("[bob is typing…]");
    bob.send("/typing alice off");
    alice.wait("bob's typing gone from the status bar", WAIT * 3, |s| {
        !s.iter().any(|l| l.contains("bob is typing"))
    });
}
