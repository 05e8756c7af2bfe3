//! Offline messages end to end, against the real binaries: messages to a
//! buddy who is offline are sealed, filed at the CRS (which holds no
//! text of them), shown at the buddy's login in order with their original
//! time, once, and reported delivered to their sender; blobs tampered
//! with, re-addressed or replayed at the CRS are refused with a notice;
//! bounds and expiry are told to the sender; and kill -9 of the CRS, of
//! the recipient's MS or of the recipient's client at random points loses
//! and duplicates nothing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use ims::crs::store::{MailEntry, MailStore, SledStore, StoredMail};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const PW: &str = "correct horse battery";

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Seconds since 1970 of an RFC 3339 UTC time as the client writes it.
fn parse_rfc3339(s: &str) -> u64 {
    let n = |a: usize, b: usize| s[a..b].parse::<u64>().unwrap_or_else(|_| panic!("{s}"));
    assert!(s.len() == 20 && s.ends_with('Z'), "{s}");
    let (y, m, d) = (n(0, 4), n(5, 7), n(8, 10));
    // Days from civil (Howard Hinnant), for years after 1970.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + n(11, 13) * 3600 + n(14, 16) * 60 + n(17, 19)
}

/// Waits until `n` events match `pred` (taking them), in arrival order.
fn take_n(c: &Client, what: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    (0..n)
        .map(|i| c.wait_for(&format!("{what} #{i}"), &pred, Duration::from_secs(60)))
        .collect()
}

/// Every file under `dir`, read whole.
fn all_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p.display().to_string(), b));
        }
    }
    out
}

#[test]
fn a_hundred_offline_messages_arrive_in_order_once_and_are_reported_delivered() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    bob.quit();
    alice.wait_event("offline", |e| e["user"] == "bob");

    let start = now_unix();
    for i in 0..100 {
        alice.send(&format!("/msg bob offline secret {i:03}"));
    }
    let queued = take_n(&alice, "queued", 100, |e| {
        e["event"] == "queued" && e["to"] == "bob"
    });
    let ids: Vec<u64> = queued.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert!(!alice.saw(|e| e["event"] == "send-failed"));

    // The CRS's files hold no text of them (sled writes through a log: a
    // plain text would be in it).
    let files = all_bytes(&c.crs.data);
    assert!(!files.is_empty());
    for (path, bytes) in &files {
        assert!(
            !bytes.windows(14).any(|w| w == b"offline secret"),
            "message text in {path}"
        );
    }

    thread::sleep(Duration::from_millis(1100));
    let bob = c.login("bob", PW);
    let got = take_n(&bob, "offline message", 100, |e| {
        e["event"] == "message" && e["from"] == "alice"
    });
    let end = now_unix();
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e["text"], format!("offline secret {i:03}"), "order: {e}");
        assert_eq!(e["offline"], true, "{e}");
        assert_eq!(e["id"].as_u64(), Some(ids[i]), "{e}");
        let at = parse_rfc3339(field(e, "sent_at"));
        assert!(
            at >= start && at <= end,
            "sent_at {at} outside {start}..{end}"
        );
        // The original time, not the time it arrived.
        assert!(at < end || start == end, "{e}");
    }
    let delivered = take_n(&alice, "delivered", 100, |e| {
        e["event"] == "delivered" && e["to"] == "bob"
    });
    let mut told: Vec<u64> = delivered
        .iter()
        .map(|e| {
            assert_eq!(e["offline"], true, "{e}");
            e["id"].as_u64().unwrap()
        })
        .collect();
    told.sort_unstable();
    assert_eq!(told, ids);

    // Bob's next login shows nothing again; a new one comes alone.
    bob.quit();
    alice.wait_event("offline", |e| e["user"] == "bob");
    alice.send("/msg bob one more");
    alice.wait_event("queued", |e| e["to"] == "bob");
    let bob = c.login("bob", PW);
    bob.wait_event("message", |e| e["text"] == "one more");
    alice.wait_event("delivered", |e| e["to"] == "bob" && e["offline"] == true);
    thread::sleep(Duration::from_millis(500));
    let shown = bob
        .events()
        .iter()
        .filter(|e| e["event"] == "message")
        .count();
    assert_eq!(shown, 1, "{:?}", bob.events());
    // Alice sees each delivery once.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        alice
            .events()
            .iter()
            .filter(|e| e["event"] == "delivered")
            .count(),
        101
    );
}

/// Edits the (stopped) CRS's sled store.
fn with_store(data: &Path, f: impl FnOnce(&SledStore)) {
    let s = SledStore::open(&data.join("db")).expect("open the CRS store");
    f(&s);
}

fn mails_for(s: &SledStore, user: &str) -> Vec<StoredMail> {
    s.mail_for(user, 0, 1000, 1 << 30)
        .expect("mail_for")
        .into_iter()
        .filter_map(|e| match e {
            MailEntry::Mail(m) => Some(m),
            MailEntry::Receipt(_) => None,
        })
        .collect()
}

#[test]
fn tampered_readdressed_and_replayed_blobs_are_refused() {
    let mut c = Cluster::start(1);
    for u in ["alice", "bob", "carol"] {
        c.register(u, PW);
    }
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    let carol = c.login("carol", PW);
    befriend(&alice, "alice", &bob, "bob");
    befriend(&alice, "alice", &carol, "carol");
    // Bob reads a first message, so that it can be replayed to him.
    bob.quit();
    alice.wait_event("offline", |e| e["user"] == "bob");
    alice.send("/msg bob first");
    alice.wait_event("queued", |e| e["to"] == "bob");
    let old = {
        c.crs.kill9();
        let mut m = Vec::new();
        with_store(&c.crs.data, |s| m = mails_for(s, "bob"));
        c.crs.restart(&c.env);
        c.crs.wait_ms_list("the MS back", |l| l.len() == 1);
        m
    };
    assert_eq!(old.len(), 1);
    let bob = c.client("bob", PW);
    log_in(&bob, "bob");
    bob.wait_event("message", |e| e["text"] == "first");
    alice.wait_event("delivered", |e| e["to"] == "bob");
    bob.quit();
    carol.quit();
    alice.wait_event("offline", |e| e["user"] == "bob");
    alice.wait_event("offline", |e| e["user"] == "carol");
    alice.send("/msg bob second");
    alice.send("/msg carol for carol only");
    alice.wait_event("queued", |e| e["to"] == "bob");
    alice.wait_event("queued", |e| e["to"] == "carol");

    c.crs.kill9();
    with_store(&c.crs.data, |s| {
        let l = ims::crs::store::MailLimits::default();
        let second = mails_for(s, "bob").pop().expect("second");
        // Tampered: one bit of the ciphertext flipped, filed again.
        let mut bad = second.clone();
        bad.id = format!("{:032x}", 1);
        // Inside the tag, just before the signature (its length and 256 bytes).
        let at = bad.blob.len() - 265;
        bad.blob[at] ^= 1;
        s.queue_mail(bad, &l).unwrap();
        // Re-addressed: carol's message filed for bob.
        let mut moved = mails_for(s, "carol").pop().expect("carol's");
        moved.to = "bob".into();
        s.queue_mail(moved, &l).unwrap();
        // Replayed: the first message, read and deleted, filed again.
        s.queue_mail(old[0].clone(), &l).unwrap();
    });
    c.crs.restart(&c.env);
    c.crs.wait_ms_list("the MS back", |l| l.len() == 1);

    let bob = c.client("bob", PW);
    log_in(&bob, "bob");
    bob.wait_event("message", |e| e["text"] == "second");
    for why in ["altered", "addressed to carol", "already received"] {
        bob.wait_event("notice", |e| {
            field(e, "text").contains("refused an offline message")
                && field(e, "text").contains(why)
        });
    }
    thread::sleep(Duration::from_millis(500));
    let texts: Vec<String> = bob
        .events()
        .iter()
        .filter(|e| e["event"] == "message")
        .map(|e| field(e, "text").to_owned())
        .collect();
    assert_eq!(texts, ["second"], "only the genuine new one is shown");
}

#[test]
fn bounds_and_expiry_are_told_to_the_sender() {
    let c = Cluster::start_configured(1, "mail_per_recipient = 3\nmail_max_age_secs = 2\n", &[]);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    bob.quit();
    alice.wait_event("offline", |e| e["user"] == "bob");
    for i in 0..4 {
        alice.send(&format!("/msg bob m{i}"));
    }
    take_n(&alice, "queued", 3, |e| e["event"] == "queued");
    let full = alice.wait_event("send-failed", |e| e["to"] == "bob");
    assert!(field(&full, "reason").contains("too many"), "{full}");
    let expired = take_n(&alice, "expired", 3, |e| {
        e["event"] == "send-failed" && e["reason"] == "expired"
    });
    assert_eq!(expired.len(), 3);
    let bob = c.login("bob", PW);
    thread::sleep(Duration::from_millis(1000));
    assert!(!bob.saw(|e| e["event"] == "message"), "{:?}", bob.events());
}

/// Which process a run kills.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Crs,
    BobsMs,
    BobsClient,
}

/// Logs `c` in as `user`, again and again until it works (servers may be
/// restarting).
fn log_in(c: &Client, user: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        c.send(&format!("/login {user}"));
        let e = c.wait_for(
            "the outcome of login",
            |e| {
                ((e["event"] == "ok" || e["event"] == "error") && e["command"] == "login")
                    || e["event"] == "logged-in"
            },
            Duration::from_secs(60),
        );
        if e["event"] == "logged-in" {
            return;
        }
        let why = field(&e, "reason");
        if why.contains("already logged in as") {
            return;
        }
        assert!(Instant::now() < end, "{user} cannot log in: {e}");
        thread::sleep(Duration::from_millis(300));
    }
}

/// Whether the last login event of `c` says it is logged in.
fn logged_in(c: &Client) -> bool {
    let mut state = false;
    for e in c.events() {
        match e["event"].as_str() {
            Some("logged-in") => state = true,
            Some("logged-out") | Some("<eof>") => state = false,
            _ => {}
        }
    }
    state
}

#[test]
fn kills_at_random_points_lose_and_duplicate_nothing() {
    const RUNS: usize = 20;
    const PER_RUN: usize = 8;
    let mut c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    // Bob's MS: the one with no user when bob logs in.
    let ms_b = Ms::start(&c.env, c.crs.addr, &c.env.key);
    let ms_b_addr = ms_b.addr.to_string();
    let mut ms_b = Some(ms_b);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    bob.quit();
    alice.wait_event("offline", |e| e["user"] == "bob");

    let seed: u64 = std::env::var("IMS_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill test seed {seed} (IMS_KILL_SEED={seed} repeats it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut clients: Vec<Client> = Vec::new();
    let mut sent_ids: Vec<u64> = Vec::new();
    for run in 0..RUNS {
        let victim = [Victim::Crs, Victim::BobsMs, Victim::BobsClient][run % 3];
        // Most logins and their deliveries are over within a few tens of
        // milliseconds here: kill anywhere from before the login to after.
        let delay = Duration::from_micros(rng.gen_range(0..120_000));
        let texts: Vec<String> = (0..PER_RUN).map(|i| format!("run {run} msg {i}")).collect();
        for t in &texts {
            alice.send(&format!("/msg bob {t}"));
            let q = alice.wait_event("queued", |e| e["to"] == "bob");
            sent_ids.push(q["id"].as_u64().unwrap());
        }
        let bob = c.client("bob", PW);
        bob.send("/login bob");
        clients.push(bob);
        thread::sleep(delay);
        eprintln!("run {run}: killing {victim:?} after {delay:?}");
        match victim {
            Victim::Crs => c.crs.restart(&c.env),
            Victim::BobsMs => {
                if let Some(mut m) = ms_b.take() {
                    m.kill9();
                }
                ms_b = Some(
                    Ms::try_start(&c.env, c.crs.addr, &c.env.key, &["--listen", &ms_b_addr])
                        .expect("restart bob's MS"),
                );
            }
            Victim::BobsClient => {
                clients.last_mut().unwrap().kill9();
                clients.push(c.client("bob", PW));
            }
        }
        // Until every message of the run was shown by some bob.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let bob = clients.last().unwrap();
            let shown = |t: &str| {
                clients.iter().any(|b| {
                    b.events()
                        .iter()
                        .any(|e| e["event"] == "message" && e["text"] == t)
                })
            };
            if texts.iter().all(|t| shown(t)) {
                break;
            }
            if Instant::now() >= end {
                panic!(
                    "run {run} ({victim:?} after {delay:?}): not every message arrived; bob saw {:?}\nbob's log:\n{}\nCRS log:\n{}\nbob's MS log:\n{}",
                    bob.events(),
                    bob.log_text(),
                    c.crs.proc.log_text(),
                    ms_b.as_ref().map(|m| m.log_text()).unwrap_or_default()
                );
            }
            if !logged_in(bob) {
                log_in(bob, "bob");
            }
            thread::sleep(Duration::from_millis(200));
        }
        // Bob goes away for the next run. (Alice may still think him
        // online if his logout met a restarting CRS: her client then finds
        // his listener gone and queues all the same.)
        let bob = clients.last().unwrap();
        bob.send("/quit");
        bob.wait_for(
            "its exit",
            |e| e["event"] == "<eof>",
            Duration::from_secs(60),
        );
        let end = Instant::now() + Duration::from_secs(60);
        while !c.crs.show_user("bob")["online"].is_null() {
            if Instant::now() >= end {
                panic!(
                    "bob stays online at the CRS\nbob's MS log:\n{}\nCRS log:\n{}",
                    ms_b.as_ref().map(|m| m.log_text()).unwrap_or_default(),
                    c.crs.proc.log_text()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    // A message shown but not yet acknowledged when its MS died waits at
    // the CRS: bob's next login acknowledges it (without showing it again).
    let last = c.client("bob", PW);
    log_in(&last, "bob");
    clients.push(last);
    // Every receipt reaches alice (her MS fetches them when told, or after
    // a restarted CRS takes her login back).
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let told: Vec<u64> = alice
            .events()
            .iter()
            .filter(|e| e["event"] == "delivered" && e["offline"] == true)
            .filter_map(|e| e["id"].as_u64())
            .collect();
        if sent_ids.iter().all(|i| told.contains(i)) {
            let mut counts = BTreeMap::new();
            for i in told {
                *counts.entry(i).or_insert(0) += 1;
            }
            assert!(counts.values().all(|&n| n == 1), "a delivery told twice");
            break;
        }
        if Instant::now() >= end {
            panic!(
                "receipts missing: {told:?} of {sent_ids:?}\nalice's MS log:\n{}\nCRS log:\n{}",
                c.ms[0].log_text(),
                c.crs.proc.log_text()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
    // Nothing shown twice, across every bob that ran.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for b in &clients {
        for e in b.events() {
            if e["event"] == "message" {
                *counts.entry(field(&e, "text").to_owned()).or_default() += 1;
            }
        }
    }
    assert_eq!(counts.len(), RUNS * PER_RUN, "{counts:?}");
    assert!(
        counts.values().all(|&n| n == 1),
        "shown twice: {:?}",
        counts.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
}

/// The blob is exactly what PROTOCOL.md §7 describes: one built by hand
/// from the description opens with the code, and one the code seals splits
/// into the described fields.
#[test]
fn the_blob_is_as_documented() {
    use ims::crypto::{self, offline, RsaPrivateKey};
    use ims::proto::transcript;
    let alice = RsaPrivateKey::generate(2048).unwrap();
    let bob = RsaPrivateKey::generate(2048).unwrap();
    let (id, sent_at, number) = ([9u8; 16], 1_764_750_000u64, 42u64);
    let k = [5u8; 32];
    let nonce = [6u8; 12];
    let aad = transcript(
        "ims offline aad v1",
        &[
            b"alice",
            b"bob",
            &id,
            &sent_at.to_be_bytes(),
            &number.to_be_bytes(),
        ],
    );
    let sealed = crypto::aes_gcm_seal(&k, &nonce, &aad, b"by hand").unwrap();
    let wrapped = bob.public_key().encrypt_oaep(&k).unwrap();
    let fields: [&[u8]; 8] = [
        b"alice",
        b"bob",
        &id,
        &sent_at.to_be_bytes(),
        &number.to_be_bytes(),
        &wrapped,
        &nonce,
        &sealed,
    ];
    let signed = transcript("ims offline v1", &fields);
    let signature = alice.sign_pss(&signed).unwrap();
    let mut all = fields.to_vec();
    all.push(&signature);
    let blob = transcript("ims offline v1", &all);
    // The signed part is the blob without its last field.
    assert_eq!(&blob[..signed.len()], &signed[..]);
    let p = offline::parse(&blob).unwrap();
    assert_eq!(
        (p.header.from.as_str(), p.header.to.as_str(), p.header.id),
        ("alice", "bob", id)
    );
    assert_eq!((p.header.sent_at, p.header.number), (sent_at, number));
    assert_eq!(
        p.open(&blob, &alice.public_key(), &bob).unwrap(),
        b"by hand"
    );

    // And the other way: the code's blob has the ten described fields.
    let h = offline::Header {
        from: "alice".into(),
        to: "bob".into(),
        id,
        sent_at,
        number,
    };
    let blob = offline::seal(&h, b"by code", &alice, &bob.public_key()).unwrap();
    let mut rest = &blob[..];
    let mut got: Vec<Vec<u8>> = Vec::new();
    while !rest.is_empty() {
        let n = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        got.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    assert_eq!(got.len(), 10);
    assert_eq!(got[0], b"ims offline v1");
    assert_eq!(
        (got[1].as_slice(), got[2].as_slice()),
        (&b"alice"[..], &b"bob"[..])
    );
    assert_eq!(got[3], id);
    assert_eq!(got[4], sent_at.to_be_bytes());
    assert_eq!(got[5], number.to_be_bytes());
    let k: [u8; 32] = bob.decrypt_oaep(&got[6]).unwrap().try_into().unwrap();
    let nonce: [u8; 12] = got[7].clone().try_into().unwrap();
    assert_eq!(
        crypto::aes_gcm_open(&k, &nonce, &aad, &got[8]).unwrap(),
        b"by code"
    );
    let signed_len = blob.len() - 4 - got[9].len();
    alice
        .public_key()
        .verify_pss(&blob[..signed_len], &got[9])
        .unwrap();
}
