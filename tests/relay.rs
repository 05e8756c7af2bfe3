//! Relayed conversations: clients whose listeners cannot be reached (an
//! advertised port nothing listens on, as behind a home router) chat and
//! send files through their MS; what the relay sees, and what frames
//! replayed, altered or forged on the relay path achieve.

mod common;

use std::collections::HashMap;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ims::proto::relay::{Frame, Op, RELAY};
use ims::wire::io::{write_message, MessageReader};
use ims::wire::{Limits, Message};
use serde_json::Value;

const PW: &str = "correct horse";
/// An advertised port nothing listens on: buddies' direct connections
/// are refused at once, as a router would refuse them.
const UNREACHABLE: &[&str] = &["--advertise-port", "1"];

/// What the tap does to the next relay data frame for one user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inject {
    Nothing,
    /// Writes it twice.
    Replay,
    /// Flips a bit near the end of its bytes (inside the sealed body).
    Flip,
    /// Holds it back and sends it after the next one.
    Swap,
}

/// A proxy in front of an MS (clients are given its address by the CRS,
/// as the MS's advertised one) that records every message both ways and
/// can alter what the MS sends to one user, as a hostile relay could.
struct MsTap {
    addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    seen: Arc<Mutex<Vec<u8>>>,
    inject: Arc<Mutex<(Inject, String)>>,
    /// A frame held back by [`Inject::Swap`].
    held: Arc<Mutex<Option<Message>>>,
    /// Each user's connection towards its client, to write forged frames on.
    clients: Arc<Mutex<HashMap<String, Arc<Mutex<TcpStream>>>>>,
}

impl MsTap {
    fn start() -> MsTap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tap = MsTap {
            addr: listener.local_addr().unwrap(),
            target: Arc::default(),
            seen: Arc::default(),
            inject: Arc::new(Mutex::new((Inject::Nothing, String::new()))),
            held: Arc::default(),
            clients: Arc::default(),
        };
        let (target, seen, inject, clients, held) = (
            tap.target.clone(),
            tap.seen.clone(),
            tap.inject.clone(),
            tap.clients.clone(),
            tap.held.clone(),
        );
        thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(client) = inbound else { return };
                let Some(addr) = *target.lock().unwrap() else {
                    continue;
                };
                let Ok(ms) = TcpStream::connect(addr) else {
                    continue;
                };
                let to_client = Arc::new(Mutex::new(client.try_clone().unwrap()));
                let user = Arc::new(Mutex::new(String::new()));
                // Client to MS: recorded, and the login's user noted.
                {
                    let (seen, user, clients, to_client) = (
                        seen.clone(),
                        user.clone(),
                        clients.clone(),
                        to_client.clone(),
                    );
                    let (from, mut to) = (client.try_clone().unwrap(), ms.try_clone().unwrap());
                    thread::spawn(move || {
                        let mut r = MessageReader::new(from);
                        while let Ok(Some(m)) = r.read_message(&Limits::DEFAULT, far()) {
                            if m.method() == Some("LOGIN-HELLO") {
                                let name = m.header("User").unwrap_or("").to_owned();
                                clients
                                    .lock()
                                    .unwrap()
                                    .insert(name.clone(), to_client.clone());
                                *user.lock().unwrap() = name;
                            }
                            let bytes = m.encode();
                            seen.lock().unwrap().extend_from_slice(&bytes);
                            if write_message(&mut to, &m, far()).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                // MS to client: recorded, and altered when asked.
                let (seen, inject, held) = (seen.clone(), inject.clone(), held.clone());
                thread::spawn(move || {
                    let mut r = MessageReader::new(ms);
                    while let Ok(Some(m)) = r.read_message(&Limits::DEFAULT, far()) {
                        seen.lock().unwrap().extend_from_slice(&m.encode());
                        let is_data = m.method() == Some(RELAY)
                            && m.header("Op") == Some("data")
                            && m.body.len() > 40;
                        let what = {
                            let mut i = inject.lock().unwrap();
                            if is_data && i.0 != Inject::Nothing && *user.lock().unwrap() == i.1 {
                                std::mem::replace(&mut i.0, Inject::Nothing)
                            } else {
                                Inject::Nothing
                            }
                        };
                        let mut out = vec![m.clone()];
                        let mine = is_data && *user.lock().unwrap() == inject.lock().unwrap().1;
                        if what == Inject::Swap {
                            *held.lock().unwrap() = Some(m.clone());
                            out.clear();
                        } else if mine {
                            // The frame held back goes after this one.
                            if let Some(h) = held.lock().unwrap().take() {
                                out.push(h);
                            }
                        }
                        match what {
                            Inject::Nothing | Inject::Swap => {}
                            Inject::Replay => out.push(m),
                            Inject::Flip => {
                                let at = out[0].body.len() - 10;
                                out[0].body[at] ^= 0x04;
                            }
                        }
                        let mut w = to_client.lock().unwrap();
                        if out
                            .iter()
                            .any(|m| write_message(&mut *w, m, far()).is_err())
                        {
                            break;
                        }
                    }
                    let _ = to_client.lock().unwrap().shutdown(std::net::Shutdown::Both);
                });
            }
        });
        tap
    }

    fn seen(&self) -> Vec<u8> {
        self.seen.lock().unwrap().clone()
    }

    fn arm(&self, what: Inject, user: &str) {
        *self.inject.lock().unwrap() = (what, user.to_owned());
    }

    /// Writes `m` to `user`'s client as if its MS sent it.
    fn forge(&self, user: &str, m: &Message) {
        let c = self
            .clients
            .lock()
            .unwrap()
            .get(user)
            .cloned()
            .expect("user's connection");
        let mut w = c.lock().unwrap();
        write_message(&mut *w, m, far()).expect("forged frame written");
    }
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn login_with(c: &Cluster, user: &str, args: &[&str]) -> Client {
    let cl = Client::start_with(&c.env, c.crs.addr, user, PW, args);
    cl.send(&format!("/login {user}"));
    cl.wait_event("logged-in", |e| e["user"] == user);
    cl
}

fn count(c: &Client, pred: impl Fn(&Value) -> bool) -> usize {
    c.events().iter().filter(|e| pred(e)).count()
}

/// Waits until `what` appears in `c`'s log.
fn wait_log(c: &Client, what: &str, times: usize) {
    let end = Instant::now() + WAIT;
    while c.log_text().matches(what).count() < times {
        assert!(
            Instant::now() < end,
            "client {}: {what:?} not logged {times} times:\n{}",
            c.label,
            c.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sends `text` from `a` to `bn` and waits for its arrival and delivery;
/// the `delivered` event.
fn chat(a: &Client, b: &Client, bn: &str, text: &str) -> Value {
    a.send(&format!("/msg {bn} {text}"));
    b.wait_event("message", |e| e["text"] == text);
    a.wait_event("delivered", |e| e["to"] == bn)
}

#[test]
fn unreachable_clients_talk_through_the_relay_which_sees_no_plaintext_and_passes_no_forgery() {
    let tap = MsTap::start();
    let advertise = tap.addr.to_string();
    let c = Cluster::start_with(1, &["--advertise", &advertise]);
    *tap.target.lock().unwrap() = Some(c.ms[0].addr);
    for u in ["alice", "bob", "carol", "dave"] {
        c.register(u, PW);
    }
    let dl_alice = c.env.path().join("dl-alice");
    let dl_bob = c.env.path().join("dl-bob");
    let with = |dl: &std::path::Path| {
        let mut a: Vec<String> = UNREACHABLE.iter().map(|s| s.to_string()).collect();
        a.extend(["--download-dir".into(), dl.display().to_string()]);
        a
    };
    let (aa, ba) = (with(&dl_alice), with(&dl_bob));
    let alice = login_with(
        &c,
        "alice",
        &aa.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let bob = login_with(
        &c,
        "bob",
        &ba.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    befriend(&alice, "alice", &bob, "bob");
    let carol = c.login("carol", PW);
    let dave = c.login("dave", PW);
    befriend(&carol, "carol", &dave, "dave");

    // Their MS found their listeners unreachable at login and told the
    // CRS so (port 0): buddies relay at once. Carol's answered.
    assert_eq!(field(&c.crs.show_user("bob"), "online"), "127.0.0.1:0");
    assert_eq!(field(&c.crs.show_user("alice"), "online"), "127.0.0.1:0");
    let carol_at = c.crs.show_user("carol");
    assert!(!field(&carol_at, "online").ends_with(":0"), "{carol_at}");

    // Both ways, each through the relay.
    let secret = "the merger closes on friday 7731";
    let d = chat(&alice, &bob, "bob", secret);
    assert_eq!(d["via"], "relay", "{d}");
    let d = chat(&bob, &alice, "alice", "and the answer 5521");
    assert_eq!(d["via"], "relay", "{d}");
    // A reachable pair still goes direct.
    let d = chat(&carol, &dave, "dave", "direct hello");
    assert_eq!(d["via"], "direct", "{d}");
    alice.send("/buddies");
    let b = alice.wait_event("buddies", |e| e["buddies"][0]["user"] == "bob");
    assert_eq!(b["buddies"][0]["via"], "relay", "{b}");

    // Files both ways: several relay frames each, checked end to end.
    let content = b"confidential file content 99281 ".repeat(40_000);
    let file = c.env.path().join("plan.txt");
    let got = send_and_receive(&alice, "alice", &bob, "bob", &file, &content);
    assert_eq!(got["via"], "relay", "{got}");
    let sent = alice.wait_for(
        "file-sent",
        |e| e["event"] == "file-sent",
        Duration::from_secs(30),
    );
    assert_eq!(sent["via"], "relay", "{sent}");
    let back = c.env.path().join("reply.bin");
    let reply_content = b"second secret attachment 4410 ".repeat(5_000);
    let got = send_and_receive(&bob, "bob", &alice, "alice", &back, &reply_content);
    assert_eq!(got["via"], "relay", "{got}");

    // The relay carried all of it, and saw none of it.
    let seen = tap.seen();
    assert!(
        seen.len() > content.len() && contains(&seen, b"RELAY"),
        "the relay did not carry the conversation ({} bytes seen)",
        seen.len()
    );
    for needle in [
        secret.as_bytes(),
        b"and the answer 5521",
        b"confidential file content",
        b"second secret attachment",
    ] {
        assert!(
            !contains(&seen, needle),
            "{:?} crossed the relay in the clear",
            String::from_utf8_lossy(needle)
        );
    }

    // A relayed message replayed by the relay: shown once, the copy refused.
    let refusals = bob
        .log_text()
        .matches("refused a message from alice")
        .count();
    let dropped = alice.log_text().matches("bob refused our message").count();
    tap.arm(Inject::Replay, "bob");
    chat(&alice, &bob, "bob", "replay me 1");
    wait_log(&bob, "refused a message from alice", refusals + 1);
    wait_log(&alice, "bob refused our message", dropped + 1);
    // The sender gives that session up; the next message opens another.
    let d = chat(&alice, &bob, "bob", "after the replay");
    assert_eq!(d["via"], "relay");
    assert_eq!(count(&bob, |e| e["text"] == "replay me 1"), 1);

    // A bit flipped inside a relayed message: refused, never shown.
    tap.arm(Inject::Flip, "bob");
    alice.send("/msg bob flip me 2");
    alice.wait_event("send-failed", |e| e["to"] == "bob");
    wait_log(&bob, "refused a message from alice", refusals + 2);
    chat(&alice, &bob, "bob", "after the flip");
    assert_eq!(
        count(&bob, |e| e["event"] == "message"
            && e["text"] == "flip me 2"),
        0
    );

    // Two relayed messages swapped: the later one is shown, the earlier
    // (now out of order) refused, never shown.
    let dropped = alice.log_text().matches("bob refused our message").count();
    tap.arm(Inject::Swap, "bob");
    alice.send("/msg bob first of two");
    let end = Instant::now() + WAIT;
    while tap.held.lock().unwrap().is_none() {
        assert!(Instant::now() < end, "the tap never held a frame");
        thread::sleep(Duration::from_millis(10));
    }
    alice.send("/msg bob second of two");
    bob.wait_event("message", |e| e["text"] == "second of two");
    alice.wait_event("delivered", |e| e["to"] == "bob");
    wait_log(&bob, "refused a message from alice", refusals + 3);
    wait_log(&alice, "bob refused our message", dropped + 1);
    chat(&alice, &bob, "bob", "after the swap");
    assert_eq!(
        count(&bob, |e| e["event"] == "message"
            && e["text"] == "first of two"),
        0
    );

    // A forged connection in alice's name: an INIT signed by another key.
    let forged = forged_init("alice", "bob");
    let frame = |op: Op, data: Vec<u8>| {
        let mut f = Frame::new(990_001, true, op, data);
        f.from = Some("alice".into());
        f.into_message()
    };
    tap.forge("bob", &frame(Op::Open, Vec::new()));
    tap.forge("bob", &frame(Op::Data, forged.to_message().encode()));
    wait_log(&bob, "has a bad signature", 1);
    // Garbage on a forged circuit: no message, nothing breaks.
    tap.forge("bob", &frame(Op::Open, Vec::new()).with_header("X", "1"));
    let messages = count(&bob, |e| e["event"] == "message");
    chat(&alice, &bob, "bob", "still fine");
    assert_eq!(count(&bob, |e| e["event"] == "message"), messages + 1);
    drop(dave);
}

#[test]
fn a_relayed_flood_does_not_slow_another_relayed_pair() {
    // A low relay rate makes the flood last while the other pair talks.
    let env_cfg = tempfile::Builder::new()
        .prefix("ims-relay-cfg-")
        .tempdir()
        .unwrap();
    let cfg = env_cfg.path().join("ms.toml");
    fs::write(&cfg, "relay_rate_bytes_per_sec = 8388608\n").unwrap();
    let c = Cluster::start_with(1, &["-c", cfg.to_str().unwrap()]);
    for u in ["flood1", "flood2", "talk1", "talk2"] {
        c.register(u, PW);
    }
    let dl = c.env.path().join("dl-flood2");
    let dl_arg = dl.display().to_string();
    let mut sink_args: Vec<&str> = UNREACHABLE.to_vec();
    sink_args.extend(["--download-dir", &dl_arg, "--auto-accept-files"]);
    let f1 = login_with(&c, "flood1", UNREACHABLE);
    let f2 = login_with(&c, "flood2", &sink_args);
    let t1 = login_with(&c, "talk1", UNREACHABLE);
    let t2 = login_with(&c, "talk2", UNREACHABLE);
    befriend(&f1, "flood1", &f2, "flood2");
    befriend(&t1, "talk1", &t2, "talk2");
    // The talking pair's session first, so that its set-up is not measured.
    let d = chat(&t1, &t2, "talk2", "warm up");
    assert_eq!(d["via"], "relay");

    // 48 MiB at 8 MiB/s: several seconds of flood.
    let big = c.env.path().join("flood.bin");
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + 3) as u8).collect();
    let mut data = Vec::with_capacity(48 << 20);
    for _ in 0..48 {
        data.extend_from_slice(&chunk);
    }
    fs::write(&big, &data).unwrap();
    f1.send(&format!("/send flood2 {}", big.display()));
    f1.wait_for(
        "the flood under way",
        |e| {
            e["event"] == "file-progress"
                && e["direction"] == "send"
                && e["bytes"].as_u64() > Some(4 << 20)
        },
        Duration::from_secs(60),
    );

    let mut rtts = Vec::new();
    for i in 0..20 {
        let text = format!("ping {i}");
        let start = Instant::now();
        t1.send(&format!("/msg talk2 {text}"));
        let d = t1.wait_event("delivered", |e| e["to"] == "talk2");
        rtts.push(start.elapsed());
        assert_eq!(d["via"], "relay");
    }
    // The flood was still going when the last round trip ended.
    assert!(
        !f2.saw(|e| e["event"] == "file-received"),
        "the flood ended before the measurement; it proves nothing"
    );
    rtts.sort();
    let median = rtts[rtts.len() / 2];
    assert!(
        median < Duration::from_millis(50),
        "round trips during another pair's flood: {rtts:?}"
    );
    // And the flood itself arrives whole.
    let got = f2.wait_for(
        "file-received",
        |e| e["event"] == "file-received",
        Duration::from_secs(120),
    );
    assert_eq!(got["via"], "relay");
    assert_eq!(fs::read(field(&got, "path")).unwrap(), data);
}

#[test]
fn unreachable_clients_on_two_mss_talk_through_both() {
    let c0 = Cluster::start(0);
    let taps = [MsTap::start(), MsTap::start()];
    let mut c = c0;
    for tap in &taps {
        let ms = Ms::try_start(
            &c.env,
            c.crs.addr,
            &c.env.key,
            &["--advertise", &tap.addr.to_string()],
        )
        .unwrap_or_else(|e| panic!("the MS did not start: {e:?}"));
        *tap.target.lock().unwrap() = Some(ms.addr);
        c.ms.push(ms);
    }
    c.register("alice", PW);
    c.register("bob", PW);
    let dl = c.env.path().join("dl-bob");
    let dl_arg = dl.display().to_string();
    let mut bob_args: Vec<&str> = UNREACHABLE.to_vec();
    bob_args.extend(["--download-dir", &dl_arg]);
    let alice = login_with(&c, "alice", UNREACHABLE);
    let bob = login_with(&c, "bob", &bob_args);
    // One on each MS (the CRS hands out the less loaded one).
    let at = |ms: &Ms, who: &str| ms.log_text().contains(&format!("{who} logged in from"));
    assert!(
        (at(&c.ms[0], "alice") && at(&c.ms[1], "bob"))
            || (at(&c.ms[1], "alice") && at(&c.ms[0], "bob")),
        "alice and bob are not on different MSs"
    );
    befriend(&alice, "alice", &bob, "bob");

    let secret = "across two servers 6120";
    let d = chat(&alice, &bob, "bob", secret);
    assert_eq!(d["via"], "relay", "{d}");
    let d = chat(&bob, &alice, "alice", "and back again 8841");
    assert_eq!(d["via"], "relay", "{d}");

    let content = b"two-server file content 31337 ".repeat(30_000);
    let file = c.env.path().join("cross.txt");
    let got = send_and_receive(&alice, "alice", &bob, "bob", &file, &content);
    assert_eq!(got["via"], "relay", "{got}");
    let sent = alice.wait_for(
        "file-sent",
        |e| e["event"] == "file-sent",
        Duration::from_secs(30),
    );
    assert_eq!(sent["via"], "relay", "{sent}");

    // The MSs linked to each other, through the taps, and nothing of the
    // conversation showed on any of their connections.
    for tap in &taps {
        let seen = tap.seen();
        assert!(
            contains(&seen, b"RELAY-HELLO"),
            "no MS link through this tap"
        );
        assert!(seen.len() > content.len() / 2, "too little relayed here");
        for needle in [
            secret.as_bytes(),
            b"and back again 8841",
            b"two-server file content",
        ] {
            assert!(
                !contains(&seen, needle),
                "{:?} crossed an MS in the clear",
                String::from_utf8_lossy(needle)
            );
        }
    }
}
