//! Direct conversations between real client processes: INIT, sealed
//! messages with acknowledgements, file transfers; what an attacker on the
//! wire sees and what a forged, replayed or altered message achieves.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ims::crypto::{self, RsaPrivateKey};
use ims::proto::peer::{init_transcript, Init, PEER};
use ims::wire::{self, Limits, Message};
use serde_json::Value;

const PW: &str = "correct horse";

fn login_with(c: &Cluster, user: &str, args: &[&str]) -> Client {
    let cl = Client::start_with(&c.env, c.crs.addr, user, PW, args);
    cl.send(&format!("/login {user}"));
    cl.wait_event("logged-in", |e| e["user"] == user);
    cl
}

fn count(c: &Client, pred: impl Fn(&Value) -> bool) -> usize {
    c.events().iter().filter(|e| pred(e)).count()
}

/// Waits until `n` events match `pred`.
fn wait_count(
    c: &Client,
    what: &str,
    n: usize,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let end = Instant::now() + timeout;
    loop {
        let matching: Vec<Value> = c.events().into_iter().filter(|e| pred(e)).collect();
        if matching.len() >= n {
            return matching;
        }
        assert!(
            Instant::now() < end,
            "client {}: only {} of {n} {what} after {timeout:?}",
            c.label,
            matching.len()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn three_clients_on_two_ms_chat_both_ways() {
    let c = Cluster::start(2);
    for u in ["alice", "bob", "carol"] {
        c.register(u, PW);
    }
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    let carol = c.login("carol", PW);
    befriend(&alice, "alice", &bob, "bob");
    befriend(&alice, "alice", &carol, "carol");
    befriend(&bob, "bob", &carol, "carol");

    alice.send("/msg bob hello bob");
    bob.wait_event("message", |e| {
        e["from"] == "alice" && e["text"] == "hello bob"
    });
    alice.wait_event("delivered", |e| e["to"] == "bob");
    // A plain line answers whoever we last heard from.
    bob.send("hi alice, how are you?");
    alice.wait_event("message", |e| {
        e["from"] == "bob" && e["text"] == "hi alice, how are you?"
    });
    bob.wait_event("delivered", |e| e["to"] == "alice");

    // One line to several buddies, reported per recipient.
    carol.send("/msg alice,bob meeting at 10");
    alice.wait_event("message", |e| {
        e["from"] == "carol" && e["text"] == "meeting at 10"
    });
    bob.wait_event("message", |e| {
        e["from"] == "carol" && e["text"] == "meeting at 10"
    });
    carol.wait_event("delivered", |e| e["to"] == "alice");
    carol.wait_event("delivered", |e| e["to"] == "bob");

    // UTF-8 survives.
    bob.send("/msg carol grüße, 你好 ✓");
    carol.wait_event("message", |e| e["text"] == "grüße, 你好 ✓");
}

#[test]
fn ten_thousand_messages_arrive_in_order() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    const N: usize = 10_000;
    let mut batch = String::new();
    for i in 0..N {
        batch.push_str(&format!("/msg bob message {i}\n"));
    }
    alice.send(batch.trim_end());
    let got = wait_count(&bob, "messages", N, Duration::from_secs(120), |e| {
        e["event"] == "message"
    });
    for (i, e) in got.iter().enumerate() {
        assert_eq!(
            e["text"],
            format!("message {i}"),
            "message {i} out of order or missing"
        );
    }
    wait_count(&alice, "deliveries", N, Duration::from_secs(60), |e| {
        e["event"] == "delivered"
    });
    assert_eq!(count(&alice, |e| e["event"] == "send-failed"), 0);
}

#[test]
fn offline_and_strangers_fail_clearly() {
    let c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.register(u, PW);
    }
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    alice.send("/msg carol are you there?");
    let e = alice.wait_event("send-failed", |e| e["to"] == "carol");
    assert!(field(&e, "reason").contains("not your buddy"), "{e}");
    bob.send("/logout");
    alice.wait_event("offline", |e| e["user"] == "bob");
    // To a buddy who is offline it is kept for them (tests/offline.rs).
    alice.send("/msg bob still there?");
    alice.wait_event("queued", |e| e["to"] == "bob");
    assert!(!alice.saw(|e| e["event"] == "send-failed" && e["to"] == "bob"));
}

/// A forwarding proxy that records every byte both ways.
struct Tap {
    port: u16,
    to_callee: Arc<Mutex<Vec<u8>>>,
    from_callee: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    fn start(target: Arc<Mutex<Option<SocketAddr>>>) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let to_callee = Arc::new(Mutex::new(Vec::new()));
        let from_callee = Arc::new(Mutex::new(Vec::new()));
        let (up, down) = (to_callee.clone(), from_callee.clone());
        thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                let Some(addr) = *target.lock().unwrap() else {
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(addr) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream, log: Arc<Mutex<Vec<u8>>>| {
                    thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        to.shutdown(std::net::Shutdown::Both).ok();
                    });
                };
                pipe(
                    inbound.try_clone().unwrap(),
                    outbound.try_clone().unwrap(),
                    up.clone(),
                );
                pipe(outbound, inbound, down.clone());
            }
        });
        Tap {
            port,
            to_callee,
            from_callee,
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Splits recorded bytes into messages.
fn messages(bytes: &[u8]) -> Vec<(Message, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok(wire::Status::Complete { message, used }) =
        wire::parse(&bytes[pos..], &Limits::DEFAULT.for_files())
    {
        out.push((message, bytes[pos..pos + used].to_vec()));
        pos += used;
    }
    out
}

fn send_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let mut conn = raw::Conn::connect(addr);
    conn.write_raw(bytes);
    conn.read()
}

#[test]
fn the_wire_shows_no_plaintext_and_replays_and_forgeries_fail() {
    let c = Cluster::start(2);
    c.register("alice", PW);
    c.register("bob", PW);
    let target = Arc::new(Mutex::new(None));
    let tap = Tap::start(target.clone());
    let dl = c.env.path().join("dl-bob");
    let bob = login_with(
        &c,
        "bob",
        &[
            "--advertise-port",
            &tap.port.to_string(),
            "--download-dir",
            dl.to_str().unwrap(),
        ],
    );
    let bob_addr = bob.listen_addr();
    *target.lock().unwrap() = Some(bob_addr);
    let alice = c.login("alice", PW);
    befriend(&alice, "alice", &bob, "bob");

    let secret = "the merger closes on friday 7731";
    alice.send(&format!("/msg bob {secret}"));
    bob.wait_event("message", |e| e["text"] == secret);
    alice.wait_event("delivered", |e| e["to"] == "bob");

    let file = c.env.path().join("plan.txt");
    let content = b"confidential file content 99281 ".repeat(20_000);
    send_and_receive(&alice, "alice", &bob, "bob", &file, &content);

    let up = tap.to_callee.lock().unwrap().clone();
    let down = tap.from_callee.lock().unwrap().clone();
    assert!(!up.is_empty() && !down.is_empty(), "the tap saw nothing");
    for bytes in [&up, &down] {
        assert!(
            !contains(bytes, secret.as_bytes()),
            "message plaintext on the wire"
        );
        assert!(
            !contains(bytes, b"confidential file content"),
            "file content on the wire"
        );
    }

    // A recorded message replayed on a new connection is refused.
    let recorded = messages(&up);
    let (msg, msg_bytes) = recorded
        .iter()
        .find(|(m, _)| m.method() == Some(PEER) && m.header("Channel") == Some("msg"))
        .cloned()
        .expect("a sealed message on the wire");
    let reply = send_raw(bob_addr, &msg_bytes);
    assert!(
        reply.as_ref().is_none_or(|r| r.method() != Some(PEER)),
        "a replayed message was acknowledged: {reply:?}"
    );
    // A bit-flipped message is refused.
    let mut flipped = msg.clone();
    let last = flipped.body.len() - 1;
    flipped.body[last] ^= 0x01;
    let reply = send_raw(bob_addr, &flipped.encode());
    assert!(
        reply.as_ref().is_none_or(|r| r.method() != Some(PEER)),
        "a tampered message was acknowledged: {reply:?}"
    );
    assert!(
        bob.log_text().contains("refused a message from alice"),
        "no log of the refusals"
    );

    // A forged INIT: alice's name, someone else's key.
    let forged = forged_init("alice", "bob");
    let reply =
        send_raw(bob_addr, &forged.to_message().encode()).expect("a reply to the forged INIT");
    assert_eq!(raw::code(&reply), 401, "forged INIT: {reply:?}");
    // An unsigned one.
    let mut unsigned = forged.to_message();
    unsigned.headers.remove("Signature");
    let reply = send_raw(bob_addr, &unsigned.encode()).expect("a reply to the unsigned INIT");
    assert_eq!(raw::code(&reply), 400, "unsigned INIT: {reply:?}");
    // A replayed INIT (the real one, recorded).
    let (_, init_bytes) = recorded
        .iter()
        .find(|(m, _)| m.method() == Some("INIT"))
        .cloned()
        .expect("the INIT on the wire");
    let reply = send_raw(bob_addr, &init_bytes).expect("a reply to the replayed INIT");
    assert_eq!(raw::code(&reply), 401, "replayed INIT: {reply:?}");

    // The conversation goes on.
    alice.send("/msg bob still fine?");
    bob.wait_event("message", |e| e["text"] == "still fine?");
    alice.wait_event("delivered", |e| e["to"] == "bob");
}

#[test]
fn a_hundred_mib_file_arrives_whole_with_bounded_memory() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let dl = c.env.path().join("dl");
    let bob = login_with(&c, "bob", &["--download-dir", dl.to_str().unwrap()]);
    let alice = c.login("alice", PW);
    befriend(&alice, "alice", &bob, "bob");
    let path = c.env.path().join("big.bin");
    let mut f = fs::File::create(&path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut sha = crypto::Sha256::new();
    for i in 0..100u32 {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (j as u32 ^ i.wrapping_mul(2_654_435_761)) as u8;
        }
        sha.update(&block);
        f.write_all(&block).unwrap();
    }
    drop(f);
    let want = ims::keyfile::hex(&sha.finish());
    let before = peak_rss_kib(bob.pid());
    alice.send(&format!("/send bob {}", path.display()));
    bob.wait_event("file-offer", |e| {
        e["from"] == "alice" && e["size"] == 100 * 1024 * 1024
    });
    bob.send("/accept alice");
    let got = bob.wait_for(
        "file-received",
        |e| e["event"] == "file-received",
        Duration::from_secs(120),
    );
    assert_eq!(field(&got, "sha256"), want);
    let mut check = crypto::Sha256::new();
    let mut r = fs::File::open(field(&got, "path")).unwrap();
    loop {
        let n = r.read(&mut block).unwrap();
        if n == 0 {
            break;
        }
        check.update(&block[..n]);
    }
    assert_eq!(
        ims::keyfile::hex(&check.finish()),
        want,
        "the stored file differs"
    );
    alice.wait_event("file-sent", |e| e["to"] == "bob");
    let peak = peak_rss_kib(bob.pid());
    assert!(
        peak < before + 48 * 1024,
        "the receiver's peak memory grew from {before} KiB to {peak} KiB for a 100 MiB file"
    );
    assert!(bob.saw(|e| e["event"] == "file-progress" && e["direction"] == "receive"));
}

#[test]
fn a_killed_senders_partial_file_goes_after_the_keep_time() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let dl = c.env.path().join("dl");
    let bob = login_with(
        &c,
        "bob",
        &[
            "--download-dir",
            dl.to_str().unwrap(),
            "--resume-keep-secs",
            "2",
        ],
    );
    let mut alice = c.login("alice", PW);
    befriend(&alice, "alice", &bob, "bob");
    // Sparse: big enough that the transfer is surely under way when it dies.
    let path = c.env.path().join("huge.bin");
    fs::File::create(&path).unwrap().set_len(4 << 30).unwrap();
    alice.send(&format!("/send bob {}", path.display()));
    bob.wait_for(
        "file-offer",
        |e| e["event"] == "file-offer",
        Duration::from_secs(120),
    );
    bob.send("/accept alice");
    bob.wait_event("file-progress", |e| e["direction"] == "receive");
    alice.kill9();
    let e = bob.wait_for(
        "file-failed",
        |e| e["event"] == "file-failed",
        Duration::from_secs(30),
    );
    assert!(field(&e, "reason").contains("broke off"), "{e}");
    let listing = || -> Vec<_> {
        fs::read_dir(&dl)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default()
    };
    // Kept, hidden, for a resumption...
    let kept = listing();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].to_string_lossy().starts_with(".ims-resume-"));
    // ...and gone once the keep time has passed.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !listing().is_empty() {
        assert!(
            Instant::now() < deadline,
            "still in the download directory: {:?}",
            listing()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `mib` MiB of varied bytes to `path`; their SHA-256.
fn write_varied(path: &Path, mib: u32) -> String {
    let mut f = fs::File::create(path).unwrap();
    let mut block = vec![0u8; 1 << 20];
    let mut sha = crypto::Sha256::new();
    for i in 0..mib {
        for (j, b) in block.iter_mut().enumerate() {
            *b = (j as u32 ^ i.wrapping_mul(2_654_435_761)) as u8;
        }
        sha.update(&block);
        f.write_all(&block).unwrap();
    }
    ims::keyfile::hex(&sha.finish())
}

#[test]
fn a_killed_transfer_resumes_where_it_broke_off() {
    const MIB: u32 = 256;
    let size = u64::from(MIB) << 20;
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let dl = c.env.path().join("dl");
    let bob = login_with(&c, "bob", &["--download-dir", dl.to_str().unwrap()]);
    let mut alice = c.login("alice", PW);
    befriend(&alice, "alice", &bob, "bob");
    let path = c.env.path().join("big.bin");
    let want = write_varied(&path, MIB);

    alice.send(&format!("/send bob {}", path.display()));
    bob.wait_for(
        "file-offer",
        |e| e["event"] == "file-offer",
        Duration::from_secs(120),
    );
    bob.send("/accept alice");
    // The sender dies once data is flowing: stopped at the first progress
    // report (a fast transfer may otherwise finish between two reports),
    // then killed.
    let seen = bob.wait_for(
        "data received",
        |e| {
            e["event"] == "file-progress"
                && e["direction"] == "receive"
                && e["bytes"].as_u64().unwrap_or(0) > 0
        },
        Duration::from_secs(300),
    );
    let stopped = std::process::Command::new("kill")
        .arg("-STOP")
        .arg(alice.pid().to_string())
        .status()
        .expect("kill -STOP");
    assert!(stopped.success(), "cannot stop the sender");
    alice.kill9();
    let seen = seen["bytes"].as_u64().unwrap();
    let e = bob.wait_for(
        "file-failed",
        |e| e["event"] == "file-failed",
        Duration::from_secs(30),
    );
    assert!(field(&e, "reason").contains("kept to resume"), "{e}");

    // Back again, the same file offered again.
    let alice = c.login("alice", PW);
    alice.send(&format!("/send bob {}", path.display()));
    bob.wait_for(
        "the second offer",
        |e| e["event"] == "file-offer",
        Duration::from_secs(120),
    );
    bob.send("/accept alice");
    let got = bob.wait_for(
        "file-received",
        |e| e["event"] == "file-received",
        Duration::from_secs(300),
    );
    assert_eq!(field(&got, "sha256"), want);
    let sent = alice.wait_for(
        "file-sent",
        |e| e["event"] == "file-sent",
        Duration::from_secs(60),
    );
    let resumed = sent["resumed"].as_u64().unwrap();
    println!(
        "resumed a {MIB} MiB file at {resumed} bytes ({:.1} %): {} bytes ({:.1} %) sent the second time",
        resumed as f64 * 100.0 / size as f64,
        size - resumed,
        (size - resumed) as f64 * 100.0 / size as f64
    );
    assert!(
        resumed >= seen && resumed < size,
        "resumed at {resumed}, though {seen} of {size} had arrived"
    );
    // Both sides report where it resumed.
    assert!(bob.saw(|e| e["event"] == "file-progress"
        && e["direction"] == "receive"
        && e["resumed"] == resumed));
    assert!(alice.saw(|e| e["event"] == "file-progress"
        && e["direction"] == "send"
        && e["resumed"] == resumed
        && e["bytes"] == resumed));
    // The stored file is whole, and nothing else is left.
    let mut check = crypto::Sha256::new();
    let mut r = fs::File::open(field(&got, "path")).unwrap();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut block).unwrap();
        if n == 0 {
            break;
        }
        check.update(&block[..n]);
    }
    assert_eq!(ims::keyfile::hex(&check.finish()), want);
    let left: Vec<_> = fs::read_dir(&dl)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
fn hostile_names_land_safely_and_nothing_is_overwritten() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let dl = c.env.path().join("dl");
    fs::create_dir_all(&dl).unwrap();
    fs::write(dl.join("notes.txt"), b"bob's own notes").unwrap();
    let bob = login_with(
        &c,
        "bob",
        &[
            "--download-dir",
            dl.to_str().unwrap(),
            "--auto-accept-files",
        ],
    );
    let alice = c.login("alice", PW);
    befriend(&alice, "alice", &bob, "bob");

    let src = c.env.path().join("src");
    fs::create_dir_all(&src).unwrap();
    // A name with backslashes and dots, legal on Unix, hostile elsewhere.
    let hostile = src.join("..\\..\\etc\\passwd");
    fs::write(&hostile, b"not a password file").unwrap();
    alice.send(&format!("/send bob {}", hostile.display()));
    let got = bob.wait_for(
        "file-received",
        |e| e["event"] == "file-received",
        Duration::from_secs(30),
    );
    assert_eq!(field(&got, "name"), "passwd");
    assert_eq!(Path::new(field(&got, "path")).parent().unwrap(), dl);

    let same = src.join("notes.txt");
    fs::write(&same, b"alice's notes").unwrap();
    alice.send(&format!("/send bob {}", same.display()));
    let got = bob.wait_for(
        "the second file",
        |e| e["event"] == "file-received" && e["name"] != "passwd",
        Duration::from_secs(30),
    );
    assert_eq!(field(&got, "name"), "notes (1).txt");
    assert_eq!(fs::read(dl.join("notes.txt")).unwrap(), b"bob's own notes");
    assert_eq!(
        fs::read(dl.join("notes (1).txt")).unwrap(),
        b"alice's notes"
    );
    let partial: Vec<_> = fs::read_dir(&dl)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(partial.is_empty());
}

#[test]
fn logging_out_ends_the_session_and_the_next_message_opens_a_new_one() {
    let c = Cluster::start(2);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    alice.send("/msg bob one");
    bob.wait_event("message", |e| e["text"] == "one");
    bob.send("/logout");
    alice.wait_event("offline", |e| e["user"] == "bob");
    bob.send("/login bob");
    bob.wait_for("a second login", |e| e["event"] == "logged-in", WAIT);
    alice.wait_event("online", |e| e["user"] == "bob");
    alice.send("/msg bob two");
    bob.wait_event("message", |e| e["text"] == "two");
    alice.wait_event("delivered", |e| e["to"] == "bob");
    // And the other way, after alice's own logout and login.
    alice.send("/logout");
    alice.wait_event("logged-out", |_| true);
    alice.send("/login alice");
    bob.wait_event("online", |e| e["user"] == "alice");
    bob.send("/msg alice three");
    alice.wait_event("message", |e| e["text"] == "three");
}

/// A relay that, before passing on the first frame of a file transfer's
/// connection, sends the receiver a copy with one byte of its sealed body
/// changed, on a connection of its own (an attacker who saw the clear
/// headers racing the real sender); returns how many it forged.
fn start_forging_relay(target: Arc<Mutex<Option<SocketAddr>>>) -> (u16, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let forged = Arc::new(Mutex::new(0usize));
    let count = forged.clone();
    thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(mut inbound) = inbound else { return };
            let Some(addr) = *target.lock().unwrap() else {
                continue;
            };
            let count = count.clone();
            thread::spawn(move || {
                // The first whole message.
                let mut head = Vec::new();
                let mut buf = [0u8; 65536];
                let first = loop {
                    match wire::parse(&head, &Limits::DEFAULT.for_files()) {
                        Ok(wire::Status::Complete { message, used }) => break (message, used),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                    match inbound.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                };
                let is_file = first.0.method() == Some(PEER)
                    && first
                        .0
                        .header("Channel")
                        .is_some_and(|c| c.starts_with("file:"));
                if is_file {
                    let mut bad = head[..first.1].to_vec();
                    let at = first.1 - 3; // the body's last byte, before CRLF
                    bad[at] ^= 0x40;
                    let reply = send_raw(addr, &bad);
                    assert!(
                        reply.as_ref().is_none_or(|r| r.method() != Some(PEER)),
                        "a forged frame was acknowledged: {reply:?}"
                    );
                    *count.lock().unwrap() += 1;
                }
                let Ok(mut outbound) = TcpStream::connect(addr) else {
                    return;
                };
                if outbound.write_all(&head).is_err() {
                    return;
                }
                let (mut up_from, mut up_to) =
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while let Ok(n) = up_from.read(&mut buf) {
                        if n == 0 || up_to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    up_to.shutdown(std::net::Shutdown::Both).ok();
                });
                let mut buf = [0u8; 65536];
                while let Ok(n) = outbound.read(&mut buf) {
                    if n == 0 || inbound.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                inbound.shutdown(std::net::Shutdown::Both).ok();
            });
        }
    });
    (port, forged)
}

#[test]
fn a_forged_first_frame_does_not_end_an_accepted_transfer() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let target = Arc::new(Mutex::new(None));
    let (port, forged) = start_forging_relay(target.clone());
    let dl = c.env.path().join("dl-bob-forged");
    let bob = login_with(
        &c,
        "bob",
        &[
            "--advertise-port",
            &port.to_string(),
            "--download-dir",
            dl.to_str().unwrap(),
        ],
    );
    *target.lock().unwrap() = Some(bob.listen_addr());
    let alice = c.login("alice", PW);
    befriend(&alice, "alice", &bob, "bob");

    let file = c.env.path().join("forged.txt");
    let content = b"the real content 4471 ".repeat(5_000);
    fs::write(&file, &content).unwrap();
    alice.send(&format!("/send bob {}", file.display()));
    bob.wait_event("file-offer", |e| e["from"] == "alice");
    bob.send("/accept alice");
    let got = bob.wait_for(
        "file-received",
        |e| e["event"] == "file-received" || e["event"] == "file-failed",
        Duration::from_secs(30),
    );
    assert_eq!(got["event"], "file-received", "{got}");
    assert_eq!(fs::read(field(&got, "path")).unwrap(), content);
    assert!(*forged.lock().unwrap() >= 1, "the relay forged nothing");
}

#[test]
fn typing_reaches_the_buddy_and_a_flood_is_cut() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");

    alice.send("/typing bob on");
    bob.wait_event("typing", |e| e["from"] == "alice" && e["state"] == "on");
    alice.send("/typing bob off");
    bob.wait_event("typing", |e| e["from"] == "alice" && e["state"] == "off");

    // A flood: every one answered, few sent.
    const FLOOD: usize = 200;
    for i in 0..FLOOD {
        alice.send(&format!(
            "/typing bob {}",
            if i % 2 == 0 { "on" } else { "off" }
        ));
    }
    wait_count(&alice, "typing answers", FLOOD + 2, WAIT, |e| {
        e["command"] == "typing"
    });
    // A last message marks the end: typing events sent before it are in.
    alice.send("/msg bob done");
    bob.wait_event("message", |e| e["text"] == "done");
    let shown = count(&bob, |e| e["event"] == "typing");
    println!("a flood of {FLOOD} typing changes showed {shown} at the buddy");
    assert!(
        shown <= 2 + 12,
        "{shown} typing events of a flood of {FLOOD} reached the buddy"
    );
}

#[test]
fn a_blocked_user_gets_nothing_through_and_sees_you_offline_until_unblocked() {
    let c = Cluster::start(2);
    for u in ["alice", "bob", "carol"] {
        c.register(u, PW);
    }
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    let carol = c.login("carol", PW);
    befriend(&alice, "alice", &bob, "bob");

    alice.send("/block bob");
    assert_eq!(alice.wait_outcome("block")["event"], "ok");
    alice.send("/block carol");
    assert_eq!(alice.wait_outcome("block")["event"], "ok");
    // Alice looks offline to bob.
    bob.wait_event("offline", |e| e["user"] == "alice");
    // Her client refuses whatever comes from him, even if he reached it:
    // an INIT in his name is answered as for anyone who is not an online
    // buddy (unblocked, this one would fail its signature check: 401).
    let reply = send_raw(alice.listen_addr(), &init_from("bob", "alice").encode())
        .expect("a reply to the INIT");
    assert_eq!(
        raw::code(&reply),
        403,
        "INIT from a blocked user: {reply:?}"
    );
    // His message and his file go nowhere, with no reason given.
    bob.send("/msg alice are you there?");
    let failed = bob.wait_event("send-failed", |e| e["to"] == "alice");
    let reason = field(&failed, "reason");
    assert!(
        reason == "alice is offline" || reason == "not delivered",
        "{failed}"
    );
    let path = c.env.path().join("note.txt");
    fs::write(&path, b"hello").unwrap();
    bob.send(&format!("/send alice {}", path.display()));
    assert_eq!(bob.wait_outcome("send")["event"], "error");
    // A buddy request from carol is dropped at the CRS; to her it looks
    // as if alice were offline.
    carol.send("/add alice");
    let e = carol.wait_outcome("add");
    assert_eq!(e["event"], "ok", "{e}");
    assert!(field(&e, "detail").contains("offline"), "{e}");
    // Alice's block list holds across logins.
    alice.send("/blocked");
    alice.wait_event("notice", |e| field(e, "text") == "blocked: bob carol");
    drop(alice);
    let alice = c.login("alice", PW);
    alice.send("/blocked");
    alice.wait_event("notice", |e| field(e, "text") == "blocked: bob carol");
    // Bob still sees her offline after her new login (a message to her
    // still fails, and by then the CRS's push would have come).
    bob.send("/msg alice hello?");
    bob.wait_event("send-failed", |e| e["to"] == "alice");
    assert!(!bob.saw(|e| e["event"] == "online" && e["user"] == "alice"));
    bob.send("/buddies");
    let b = bob.wait_event("buddies", |e| {
        e["buddies"].as_array().is_some_and(|b| !b.is_empty())
    });
    assert_eq!(b["buddies"][0]["online"], false, "{b}");
    assert!(!alice.saw(|e| e["event"] == "message" || e["event"] == "request"));

    // Unblocked: everything goes through again.
    alice.send("/unblock bob");
    assert_eq!(alice.wait_outcome("unblock")["event"], "ok");
    alice.send("/unblock carol");
    assert_eq!(alice.wait_outcome("unblock")["event"], "ok");
    bob.wait_event("online", |e| e["user"] == "alice");
    let reply = send_raw(alice.listen_addr(), &init_from("bob", "alice").encode())
        .expect("a reply to the INIT");
    assert_eq!(
        raw::code(&reply),
        401,
        "a forged INIT once unblocked: {reply:?}"
    );
    bob.send("/msg alice back again");
    alice.wait_event("message", |e| {
        e["from"] == "bob" && e["text"] == "back again"
    });
    bob.wait_event("delivered", |e| e["to"] == "alice");
    carol.send("/add alice");
    alice.wait_event("request", |e| e["from"] == "carol");
    alice.send("/blocked");
    alice.wait_event("notice", |e| field(e, "text") == "you block nobody");
}

/// An INIT in `from`'s name to `to`, signed with a key that is not theirs.
fn init_from(from: &str, to: &str) -> Message {
    let mallory = RsaPrivateKey::generate(1024).unwrap();
    let nonce = crypto::random_array::<24>().to_vec();
    let share = crypto::EphemeralKey::generate().unwrap().public().to_vec();
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    Init {
        from: from.into(),
        to: to.into(),
        time,
        nonce: nonce.clone(),
        share: share.clone(),
        signature: mallory
            .sign_pss(&init_transcript(from, to, time, &nonce, &share))
            .unwrap(),
    }
    .to_message()
}
