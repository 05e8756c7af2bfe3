//! Forward secrecy of direct conversations (PROTOCOL.md §7), shown on
//! recordings: a CRS, an MS and two clients run in this process (so that
//! the test can read live session secrets through the `test-hooks`
//! accessors, which exist in no shipped build), and bob's listener is
//! reached through a proxy that records every byte.
//!
//! - a recorded conversation does not open with both users' long-term
//!   private keys, nor with anything derived from them and the recording,
//!   while the live session's secret opens every frame;
//! - two sessions of the same pair have different keys; a replayed INIT
//!   (valid old signature) gets no session and displaces no live one, also
//!   at a client that restarted and so forgot the INITs it saw; an INIT
//!   older than the freshness window is refused whatever the cache holds;
//! - 10,000 messages across at least 5 re-keys arrive in order, none lost,
//!   keys of one epoch open nothing of the next, and retired keys are
//!   erased.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{unbounded, Receiver};
use ims::client::events::Event;
use ims::client::handshake::{EpochKeys, Initiating};
use ims::client::{self, ClientConfig};
use ims::crypto::{self, hkdf_sha256_32, sha256, RsaPrivateKey};
use ims::proto::peer::{init_ack_transcript, session_id, Init, InitAck, CONFIRM, INIT, PEER};
use ims::proto::transcript;
use ims::seal::Role;
use ims::wire::io::{write_message, MessageReader};
use ims::wire::{self, Limits, Message};
use ims::{crs, keyfile, ms};

const PW: &str = "correct horse battery";
const KDF_ITERATIONS: u32 = 1_000;
/// Bound on any wait for something that should happen soon.
const WAIT: Duration = Duration::from_secs(30);

/// A forwarding proxy that records every byte both ways.
struct Tap {
    port: u16,
    target: Arc<Mutex<Option<SocketAddr>>>,
    to_callee: Arc<Mutex<Vec<u8>>>,
    from_callee: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    fn start() -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let target: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let to_callee = Arc::new(Mutex::new(Vec::new()));
        let from_callee = Arc::new(Mutex::new(Vec::new()));
        let (up, down, to) = (to_callee.clone(), from_callee.clone(), target.clone());
        thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                let Some(addr) = *to.lock().unwrap() else {
                    continue;
                };
                let Ok(outbound) = TcpStream::connect(addr) else {
                    continue;
                };
                let pipe = |mut from: TcpStream, mut to: TcpStream, log: Arc<Mutex<Vec<u8>>>| {
                    thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            // Recorded before forwarding, so that what
                            // arrived is always in the record.
                            log.lock().unwrap().extend_from_slice(&buf[..n]);
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
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
            target,
            to_callee,
            from_callee,
        }
    }

    fn point_at(&self, addr: SocketAddr) {
        *self.target.lock().unwrap() = Some(addr);
    }

    /// Every whole message recorded towards the callee, in order, per
    /// connection concatenated (connections do not interleave here: each
    /// message is recorded whole before the next write on any of them
    /// matters to these tests, and parsing stops at the first partial one).
    fn up(&self) -> Vec<Message> {
        messages(&self.to_callee.lock().unwrap())
    }

    fn down(&self) -> Vec<Message> {
        messages(&self.from_callee.lock().unwrap())
    }
}

/// Splits recorded bytes into messages.
fn messages(bytes: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Ok(wire::Status::Complete { message, used }) =
        wire::parse(&bytes[pos..], &Limits::DEFAULT.for_files())
    {
        out.push(message);
        pos += used;
    }
    out
}

/// A CRS and an MS in this process.
struct Net {
    dir: tempfile::TempDir,
    crs: Option<crs::Running>,
    ms: Option<ms::Running>,
}

/// A client in this process and its events.
struct Peer {
    running: Option<client::Running>,
    events: Receiver<Event>,
    /// Events seen and set aside by `wait`.
    seen: Vec<Event>,
}

impl Net {
    fn start() -> Net {
        // IMS_TEST_LOG=debug shows the clients' logs.
        let _ = env_logger::Builder::from_env(env_logger::Env::new().filter("IMS_TEST_LOG"))
            .is_test(true)
            .try_init();
        let dir = tempfile::Builder::new()
            .prefix("ims-fs-test-")
            .tempdir()
            .unwrap();
        let ms_key = dir.path().join("mskey");
        keyfile::generate_ms_key(&ms_key).expect("MSkey");
        let crs = crs::start(crs::CrsConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.path().join("crs"),
            ms_key_file: ms_key.clone(),
            min_iterations: KDF_ITERATIONS,
            ..crs::CrsConfig::default()
        })
        .expect("CRS start");
        let ms = ms::start(ms::MsConfig {
            listen: "127.0.0.1:0".into(),
            crs: crs.local_addr().to_string(),
            ms_key_file: ms_key,
            fake_iterations: KDF_ITERATIONS,
            ..ms::MsConfig::default()
        })
        .expect("MS start");
        Net {
            dir,
            crs: Some(crs),
            ms: Some(ms),
        }
    }

    /// A client of `name` (registered if `register`), logged in;
    /// reachable through `tap` if given; re-keying after `rekey` messages.
    fn client(&self, name: &str, register: bool, tap: Option<&Tap>, rekey: u64) -> Peer {
        let (tx, rx) = unbounded();
        let config = ClientConfig {
            crs: self.crs.as_ref().unwrap().local_addr().to_string(),
            listen: "127.0.0.1:0".into(),
            advertise_port: tap.map(|t| t.port),
            kdf_iterations: KDF_ITERATIONS,
            insecure_kdf: true,
            download_dir: self.dir.path().join(format!("{name}-dl")),
            state_dir: self.dir.path().join(format!("{name}-state")),
            ack_timeout: Duration::from_secs(60),
            auto_accept_files: true,
            rekey_messages: rekey,
            rekey_interval: Duration::from_secs(86_400),
            ..ClientConfig::default()
        };
        let running = client::start(config, tx).expect("client start");
        if let Some(t) = tap {
            t.point_at(running.local_addr());
        }
        if register {
            running
                .client
                .register(name, PW, Default::default())
                .expect("register");
        }
        running.client.login(name, PW).expect("login");
        Peer {
            running: Some(running),
            events: rx,
            seen: Vec::new(),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(ms) = self.ms.take() {
            ms.stopper().stop();
            ms.join();
        }
        if let Some(crs) = self.crs.take() {
            crs.stopper().stop();
            crs.join();
        }
    }
}

impl Peer {
    fn client(&self) -> &Arc<client::Client> {
        &self.running.as_ref().unwrap().client
    }

    fn addr(&self) -> SocketAddr {
        self.running.as_ref().unwrap().local_addr()
    }

    /// Waits for an event `want` matches (earlier ones stay available);
    /// fails on a failed send.
    fn wait(&mut self, what: &str, want: impl Fn(&Event) -> bool) -> Event {
        if let Some(i) = self.seen.iter().position(&want) {
            return self.seen.remove(i);
        }
        let end = Instant::now() + WAIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if want(&e) => return e,
                // Taken: the client may go on (dropping answers it).
                Ok(Event::Flush(_)) => {}
                Ok(Event::SendFailed { reason, id, .. }) => {
                    panic!("send {id} failed: {reason}")
                }
                Ok(e) => self.seen.push(e),
                Err(_) => panic!("no {what} within {WAIT:?}"),
            }
        }
    }

    fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
        }
    }

    /// The live session's epochs with `peer`: (id, secret), current first.
    fn secrets(&self, peer: &str) -> Vec<(String, [u8; 32])> {
        self.client().session_secrets_for_test(peer)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn befriend(a: &mut Peer, an: &str, b: &mut Peer, bn: &str) {
    a.client().add(bn).expect("add");
    b.wait(
        "request",
        |e| matches!(e, Event::Request { from } if from == an),
    );
    b.client().accept(an).expect("accept");
    a.wait(
        "buddy-added",
        |e| matches!(e, Event::BuddyAdded { user, online: true } if user == bn),
    );
    b.wait(
        "buddy-added",
        |e| matches!(e, Event::BuddyAdded { user, online: true } if user == an),
    );
}

/// Sends `text` from `a` to `bn` and waits for both ends to see it.
fn say(a: &mut Peer, b: &mut Peer, bn: &str, an: &str, text: &str) {
    let id = a.client().send_message(bn, text).expect("send");
    b.wait(
        "message",
        |e| matches!(e, Event::Message { from, text: t, .. } if from == an && t == text),
    );
    a.wait(
        "delivered",
        |e| matches!(e, Event::Delivered { id: i, .. } if *i == id),
    );
}

/// How many of `frames` the channel `label` of epoch (`id`, `secret`)
/// opens for `role`, in order.
fn opens(id: &str, secret: [u8; 32], label: &str, role: Role, frames: &[&Message]) -> usize {
    let mut recv = EpochKeys::from_secret_for_test(id, secret)
        .channel(label, role)
        .recv;
    frames.iter().filter(|f| recv.open(f).is_ok()).count()
}

/// Sealed frames of the message channel in `epoch` (any, if `None`).
fn frames<'a>(all: &'a [Message], epoch: Option<&str>) -> Vec<&'a Message> {
    all.iter()
        .filter(|m| m.method() == Some(PEER) && m.header("Channel") == Some("msg"))
        .filter(|m| epoch.is_none_or(|e| m.header("Session") == Some(e)))
        .collect()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_recorded_conversation_does_not_open_with_both_long_term_keys() {
    let net = Net::start();
    let tap = Tap::start();
    let mut bob = net.client("bob", true, Some(&tap), 0);
    let mut alice = net.client("alice", true, None, 0);
    befriend(&mut alice, "alice", &mut bob, "bob");
    for i in 0..20 {
        say(
            &mut alice,
            &mut bob,
            "bob",
            "alice",
            &format!("secret plan {i}"),
        );
    }
    let live = alice.secrets("bob");
    assert_eq!(live.len(), 1, "one epoch expected: {live:?}");
    assert_eq!(bob.secrets("alice"), live, "both ends hold the same secret");
    let (sid, secret) = live[0].clone();
    // What the thief takes later: both long-term private keys.
    let alice_key = alice.client().private_key_for_test().unwrap();
    let bob_key = bob.client().private_key_for_test().unwrap();

    let up = tap.up();
    let down = tap.down();
    let init = Init::from_message(
        up.iter()
            .find(|m| m.method() == Some(INIT))
            .expect("the INIT on the wire"),
    )
    .unwrap();
    let ack = InitAck::from_message(
        down.iter()
            .find(|m| m.is_success() && m.header("Share").is_some())
            .expect("the INIT-ACK on the wire"),
    )
    .unwrap();
    assert!(
        up.iter().any(|m| m.method() == Some(CONFIRM)),
        "the caller's key confirmation on the wire"
    );
    let requests = frames(&up, Some(&sid));
    let acks = frames(&down, Some(&sid));
    assert_eq!(requests.len(), 20, "every message on the wire");
    assert_eq!(acks.len(), 20, "every acknowledgement on the wire");

    // The session id is the documented hash of the two signed transcripts.
    let init_hash = sha256(&init.transcript());
    let ack_signed = init_ack_transcript("bob", "alice", &init_hash, &ack.nonce, &ack.share);
    let th = sha256(&transcript(
        "ims handshake v2",
        &[&init_hash, &sha256(&ack_signed)],
    ));
    assert_eq!(session_id(&th), sid);

    // The live secret opens every frame of the recording, both ways.
    let label = "msg:alice>bob";
    assert_eq!(opens(&sid, secret, label, Role::Responder, &requests), 20);
    assert_eq!(opens(&sid, secret, label, Role::Initiator, &acks), 20);

    // Nothing on the wire is encrypted to either long-term key.
    let clear_values: Vec<Vec<u8>> = [init.to_message(), ack.to_message()]
        .iter()
        .flat_map(|m| {
            m.headers
                .iter()
                .filter_map(|(_, v)| crypto::b64_decode(v).ok())
                .collect::<Vec<_>>()
        })
        .collect();
    for v in &clear_values {
        assert!(alice_key.decrypt_oaep(v).is_err());
        assert!(bob_key.decrypt_oaep(v).is_err());
    }

    // Everything the thief can derive from the keys and the recording,
    // as a secret itself and as input to the documented key schedule,
    // opens nothing.
    let mut candidates: Vec<Vec<u8>> = clear_values.clone();
    for k in [&alice_key, &bob_key] {
        let der = k.to_der().unwrap();
        candidates.push(sha256(&der).to_vec());
        candidates.push(der);
    }
    let mut both_shares = init.share.clone();
    both_shares.extend_from_slice(&ack.share);
    candidates.push(both_shares);
    let mut tried = 0;
    for c in &candidates {
        let as_secret: [u8; 32] = sha256(c);
        let mut direct = [0u8; 32];
        let n = c.len().min(32);
        direct[..n].copy_from_slice(&c[..n]);
        let scheduled = hkdf_sha256_32(c, &th, b"ims session secret v2");
        for s in [as_secret, direct, scheduled] {
            assert_ne!(s, secret);
            assert_eq!(opens(&sid, s, label, Role::Responder, &requests), 0);
            assert_eq!(opens(&sid, s, label, Role::Initiator, &acks), 0);
            tried += 1;
        }
    }
    assert!(tried >= 30, "only {tried} candidates tried");

    // The secret is gone with the session.
    alice.client().logout();
    assert!(alice.secrets("bob").is_empty());
}

#[test]
fn sessions_differ_and_a_replayed_init_gets_nowhere() {
    let net = Net::start();
    let tap = Tap::start();
    let mut bob = net.client("bob", true, Some(&tap), 0);
    let mut alice = net.client("alice", true, None, 0);
    befriend(&mut alice, "alice", &mut bob, "bob");

    say(&mut alice, &mut bob, "bob", "alice", "one");
    let first = bob.secrets("alice");
    assert_eq!(first.len(), 1);
    let inits_of = |up: &[Message]| -> Vec<Message> {
        up.iter()
            .filter(|m| m.method() == Some(INIT))
            .cloned()
            .collect()
    };
    let confirms_of = |up: &[Message]| -> Vec<Message> {
        up.iter()
            .filter(|m| m.method() == Some(CONFIRM))
            .cloned()
            .collect()
    };
    let init1 = inits_of(&tap.up())[0].clone();

    // Replayed to the same client: its cache of INITs seen refuses it.
    let mut conn = Raw::connect(bob.addr());
    let reply = conn.call(&init1).expect("a reply to the replayed INIT");
    assert_eq!(reply.code(), Some(401), "{reply:?}");
    assert_eq!(bob.secrets("alice"), first, "the live session stays");

    // A second session of the same pair has other keys.
    alice.client().logout();
    bob.wait(
        "offline",
        |e| matches!(e, Event::Offline { user } if user == "alice"),
    );
    alice.client().login("alice", PW).expect("login");
    bob.wait(
        "online",
        |e| matches!(e, Event::Online { user } if user == "alice"),
    );
    say(&mut alice, &mut bob, "bob", "alice", "two");
    let second = bob.secrets("alice");
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].0, first[0].0, "same session id twice");
    assert_ne!(second[0].1, first[0].1, "same session secret twice");
    let up = tap.up();
    let (init2, confirm2) = (inits_of(&up)[1].clone(), confirms_of(&up)[1].clone());

    // Bob's client restarts: the INITs it saw are forgotten.
    bob.shutdown();
    alice.wait(
        "offline",
        |e| matches!(e, Event::Offline { user } if user == "bob"),
    );
    let mut bob = net.client("bob", false, Some(&tap), 0);
    alice.wait(
        "online",
        |e| matches!(e, Event::Online { user } if user == "bob"),
    );
    say(&mut alice, &mut bob, "bob", "alice", "three");
    let live = bob.secrets("alice");
    assert_eq!(live.len(), 1);
    assert_eq!(alice.secrets("bob"), live);
    assert_eq!(inits_of(&tap.up()).len(), 3);

    // Session two's INIT, validly signed and still fresh, replayed with
    // its CONFIRM: bob answers the INIT (it cannot tell yet), but the
    // recorded confirmation is not for this answer, so no session comes
    // of it and the live one stays.
    let mut conn = Raw::connect(bob.addr());
    let reply = conn.call(&init2).expect("an answer to the replayed INIT");
    assert!(reply.is_success(), "{reply:?}");
    let reply = conn.call(&confirm2).expect("a refusal of the confirmation");
    assert_eq!(reply.code(), Some(401), "{reply:?}");
    assert!(conn.read().is_none(), "the connection was not closed");
    // And with no confirmation at all.
    let mut conn = Raw::connect(bob.addr());
    let reply = conn.call(&init2).expect("an answer to the replayed INIT");
    assert_eq!(reply.code(), Some(401), "seen now: {reply:?}");
    drop(conn);
    assert_eq!(
        bob.secrets("alice"),
        live,
        "a replayed INIT displaced the session"
    );
    say(&mut alice, &mut bob, "bob", "alice", "four");
    assert_eq!(bob.secrets("alice"), live);
    assert_eq!(alice.secrets("bob"), live);
    assert_eq!(inits_of(&tap.up()).len(), 3, "a new session was opened");

    // An INIT older than the freshness window, validly signed and never
    // seen, is refused although the restarted client's cache is empty.
    let alice_key = alice.client().private_key_for_test().unwrap();
    let old = now_unix() - ims::client::peer::MAX_CLOCK_SKEW_SECS - 5;
    let (_, stale) = Initiating::start("alice", "bob", old, &alice_key).unwrap();
    let mut conn = Raw::connect(bob.addr());
    let reply = conn.call(&stale.to_message()).expect("a reply");
    assert_eq!(reply.code(), Some(401), "{reply:?}");
    assert_eq!(bob.secrets("alice"), live);
    // A fresh one signed by someone else gets nowhere either.
    let mallory = RsaPrivateKey::generate(1024).unwrap();
    let (_, forged) = Initiating::start("alice", "bob", now_unix(), &mallory).unwrap();
    let reply = Raw::connect(bob.addr())
        .call(&forged.to_message())
        .expect("a reply");
    assert_eq!(reply.code(), Some(401), "{reply:?}");
    assert_eq!(bob.secrets("alice"), live);
}

#[test]
fn ten_thousand_messages_across_five_rekeys() {
    const N: usize = 10_000;
    const REKEY: u64 = 1_200;
    const BURST: usize = 500;
    let net = Net::start();
    let tap = Tap::start();
    let mut bob = net.client("bob", true, Some(&tap), REKEY);
    let mut alice = net.client("alice", true, None, REKEY);
    befriend(&mut alice, "alice", &mut bob, "bob");

    // Collects every epoch's secret while it is live.
    let seen: Arc<Mutex<HashMap<String, [u8; 32]>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, done, client) = (seen.clone(), done.clone(), alice.client().clone());
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                for (id, s) in client.session_secrets_for_test("bob") {
                    seen.lock().unwrap().insert(id, s);
                }
                thread::sleep(Duration::from_millis(1));
            }
        })
    };
    // Bursts sent without waiting, so that messages are in flight when a
    // re-key's answer switches the keys; between bursts the sender waits
    // for the burst's last delivery, which keeps it from running far
    // ahead of the answers (re-keys then come about every REKEY messages).
    for burst in 0..N / BURST {
        let mut last = 0;
        for i in burst * BURST..(burst + 1) * BURST {
            last = alice
                .client()
                .send_message("bob", &format!("message {i}"))
                .expect("send");
        }
        alice.wait(
            "delivered",
            |e| matches!(e, Event::Delivered { id, .. } if *id == last),
        );
    }
    for i in 0..N {
        let want = format!("message {i}");
        match bob.wait("message", |e| matches!(e, Event::Message { .. })) {
            Event::Message { text, .. } => assert_eq!(text, want, "out of order or lost"),
            _ => unreachable!(),
        }
    }
    let mut delivered = N / BURST;
    while delivered < N {
        alice.wait("delivered", |e| matches!(e, Event::Delivered { .. }));
        delivered += 1;
    }
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();

    // The epochs, in the order their frames went over the wire.
    let up = tap.up();
    let mut order: Vec<String> = Vec::new();
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for f in frames(&up, None) {
        let e = f.header("Session").unwrap().to_owned();
        if order.last() != Some(&e) {
            assert!(!order.contains(&e), "epoch {e} came back");
            order.push(e.clone());
        }
        *count.entry(e).or_default() += 1;
    }
    assert!(
        order.len() >= 6,
        "only {} epochs (so {} re-keys): {count:?}",
        order.len(),
        order.len().saturating_sub(1)
    );
    let sizes: Vec<usize> = order.iter().map(|e| count[e]).collect();
    println!("{} epochs, frames in each: {sizes:?}", order.len());
    let secrets = seen.lock().unwrap().clone();
    let label = "msg:alice>bob";
    let mut checked = 0;
    for pair in order.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        let Some(&s_old) = secrets.get(old) else {
            continue;
        };
        let old_frames = frames(&up, Some(old));
        let new_frames = frames(&up, Some(new));
        assert_eq!(
            opens(old, s_old, label, Role::Responder, &old_frames),
            old_frames.len(),
            "epoch {old}'s own frames"
        );
        // Neither under the new epoch's id nor under its own.
        assert_eq!(opens(new, s_old, label, Role::Responder, &new_frames), 0);
        assert_eq!(opens(old, s_old, label, Role::Responder, &new_frames), 0);
        if let Some(&s_new) = secrets.get(new) {
            assert_ne!(s_new, s_old);
            assert_eq!(
                opens(new, s_new, label, Role::Responder, &new_frames),
                new_frames.len()
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 3,
        "secrets of only {checked} re-keyed epochs caught"
    );

    // Retired keys are erased once nothing more can arrive under them and
    // a file transfer could no longer start in them (10 s), well before
    // the 30 s grace period ends.
    let end = Instant::now() + Duration::from_secs(25);
    while alice.secrets("bob").len() > 1 || bob.secrets("alice").len() > 1 {
        assert!(
            Instant::now() < end,
            "retired epochs kept: alice {}, bob {}",
            alice.secrets("bob").len(),
            bob.secrets("alice").len()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        alice.secrets("bob")[0].0,
        *order.last().unwrap(),
        "alice is in the last epoch"
    );
}

/// One connection speaking raw messages.
struct Raw {
    reader: MessageReader<TcpStream>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
        Raw {
            reader: MessageReader::new(s),
        }
    }

    fn call(&mut self, m: &Message) -> Option<Message> {
        write_message(self.reader.get_mut(), m, Instant::now() + WAIT).ok()?;
        self.read()
    }

    fn read(&mut self) -> Option<Message> {
        self.reader
            .read_message(&Limits::DEFAULT, Instant::now() + WAIT)
            .ok()
            .flatten()
    }
}

#[test]
fn both_sides_re_keying_at_once_lose_nothing() {
    const N: usize = 3_000;
    const REKEY: u64 = 250;
    let net = Net::start();
    let tap = Tap::start();
    let mut bob = net.client("bob", true, Some(&tap), REKEY);
    let mut alice = net.client("alice", true, None, REKEY);
    befriend(&mut alice, "alice", &mut bob, "bob");
    // The session first (a simultaneous open is another matter).
    say(&mut alice, &mut bob, "bob", "alice", "hello");
    say(&mut bob, &mut alice, "alice", "bob", "hi");
    // Both write at once, so that both reach the threshold together and
    // their REKEYs cross (the smaller name's wins).
    let sender = |from: &Peer, to: &'static str| {
        let client = from.client().clone();
        thread::spawn(move || {
            for i in 0..N {
                client.send_message(to, &format!("{to} {i}")).expect("send");
                if i % 100 == 99 {
                    // Let the answers catch up now and then.
                    thread::sleep(Duration::from_millis(20));
                }
            }
        })
    };
    let (a, b) = (sender(&alice, "bob"), sender(&bob, "alice"));
    a.join().unwrap();
    b.join().unwrap();
    for (p, me) in [(&mut bob, "bob"), (&mut alice, "alice")] {
        for i in 0..N {
            let want = format!("{me} {i}");
            match p.wait("message", |e| matches!(e, Event::Message { .. })) {
                Event::Message { text, .. } => assert_eq!(text, want, "out of order or lost"),
                _ => unreachable!(),
            }
        }
        let mut delivered = 0;
        while delivered < N {
            p.wait("delivered", |e| matches!(e, Event::Delivered { .. }));
            delivered += 1;
        }
    }
    let up = tap.up();
    let mut order: Vec<&str> = Vec::new();
    for f in frames(&up, None) {
        let e = f.header("Session").unwrap();
        if order.last() != Some(&e) {
            order.push(e);
        }
    }
    println!("alice>bob crossed {} epochs", order.len());
    assert!(order.len() >= 3, "only {} epochs", order.len());
    // Both ends end in the same single epoch.
    let end = Instant::now() + Duration::from_secs(25);
    loop {
        let (a, b) = (alice.secrets("bob"), bob.secrets("alice"));
        if a.len() == 1 && a == b {
            break;
        }
        assert!(Instant::now() < end, "alice {a:?} / bob {b:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn both_sides_opening_at_once_end_in_one_session_and_lose_nothing() {
    const N: usize = 50;
    let net = Net::start();
    let mut bob = net.client("bob", true, None, 0);
    let mut alice = net.client("alice", true, None, 0);
    befriend(&mut alice, "alice", &mut bob, "bob");
    for round in 0..5 {
        // No session: both write first, at once.
        let start = Arc::new(std::sync::Barrier::new(2));
        let sender = |from: &Peer, to: &'static str| {
            let (client, start) = (from.client().clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                for i in 0..N {
                    client
                        .send_message(to, &format!("{round} {to} {i}"))
                        .expect("send");
                }
            })
        };
        let (a, b) = (sender(&alice, "bob"), sender(&bob, "alice"));
        a.join().unwrap();
        b.join().unwrap();
        for (p, me) in [(&mut bob, "bob"), (&mut alice, "alice")] {
            for i in 0..N {
                let want = format!("{round} {me} {i}");
                match p.wait("message", |e| matches!(e, Event::Message { .. })) {
                    Event::Message { text, .. } => {
                        assert_eq!(text, want, "out of order or lost")
                    }
                    _ => unreachable!(),
                }
            }
            for _ in 0..N {
                p.wait("delivered", |e| matches!(e, Event::Delivered { .. }));
            }
        }
        let (a, b) = (alice.secrets("bob"), bob.secrets("alice"));
        assert_eq!(a, b, "round {round}: two different sessions");
        // Next round: a new login ends the session on both sides.
        alice.client().logout();
        bob.wait(
            "offline",
            |e| matches!(e, Event::Offline { user } if user == "alice"),
        );
        alice.client().login("alice", PW).expect("login");
        bob.wait(
            "online",
            |e| matches!(e, Event::Online { user } if user == "alice"),
        );
    }
}

#[test]
fn files_cross_re_keys_whole() {
    const FILES: usize = 3;
    let net = Net::start();
    let mut bob = net.client("bob", true, None, 20);
    let mut alice = net.client("alice", true, None, 20);
    befriend(&mut alice, "alice", &mut bob, "bob");
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let path = net.dir.path().join("plan.bin");
    std::fs::write(&path, &content).unwrap();
    // Messages both ways keep re-keying the session (every 20) while the
    // files are offered, accepted and streamed on their own channels.
    for f in 0..FILES {
        alice.client().send_file("bob", &path).expect("send file");
        for i in 0..30 {
            alice
                .client()
                .send_message("bob", &format!("{f} a {i}"))
                .expect("send");
            bob.client()
                .send_message("alice", &format!("{f} b {i}"))
                .expect("send");
        }
    }
    for _ in 0..FILES {
        let end = Instant::now() + WAIT;
        while !bob
            .seen
            .iter()
            .any(|e| matches!(e, Event::FileReceived { .. }))
        {
            if let Ok(e) = bob.events.recv_timeout(Duration::from_millis(100)) {
                if !matches!(e, Event::Flush(_)) {
                    bob.seen.push(e);
                }
            }
            while let Ok(e) = alice.events.try_recv() {
                if !matches!(e, Event::Flush(_)) {
                    alice.seen.push(e);
                }
            }
            let failed: Vec<&Event> = alice
                .seen
                .iter()
                .chain(bob.seen.iter())
                .filter(|e| {
                    matches!(
                        e,
                        Event::FileFailed { .. } | Event::SendFailed { .. } | Event::Error { .. }
                    )
                })
                .collect();
            assert!(failed.is_empty(), "{failed:?}");
            assert!(Instant::now() < end, "no file within {WAIT:?}");
        }
        match bob.wait("file-received", |e| matches!(e, Event::FileReceived { .. })) {
            Event::FileReceived { path, .. } => {
                assert_eq!(std::fs::read(path).unwrap(), content, "file damaged")
            }
            _ => unreachable!(),
        }
    }
    for _ in 0..FILES {
        alice.wait("file-sent", |e| matches!(e, Event::FileSent { .. }));
    }
    for f in 0..FILES {
        for i in 0..30 {
            let want = format!("{f} a {i}");
            bob.wait(
                "message",
                |e| matches!(e, Event::Message { text, .. } if *text == want),
            );
            let want = format!("{f} b {i}");
            alice.wait(
                "message",
                |e| matches!(e, Event::Message { text, .. } if *text == want),
            );
        }
    }
    assert!(
        !alice
            .seen
            .iter()
            .chain(bob.seen.iter())
            .any(|e| matches!(e, Event::FileFailed { .. })),
        "a transfer failed"
    );
}
