//! Status and personal message: the CRS's `STATUS` and `REVEAL` handlers
//! called directly (a table of request and answer, then what each pushes),
//! and real processes: a buddy on another MS sees a status and message, it
//! holds across the setter's re-login, `invisible` hides presence while
//! messages still flow both ways, and auto-away sets `away` after the idle
//! limit and ends at the next input.

mod common;

use std::fs;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use ims::client::account::{wrap_aad, PasswordKeys};
use ims::crs::service::Peer2;
use ims::crs::store::MemStore;
use ims::crs::{Crs, CrsConfig};
use ims::crypto::{self, scram, KdfParams, KdfPolicy, RsaPrivateKey};
use ims::proto::crs::{
    ClientReply, ClientRequest, Contact, CrsReply, CrsRequest, EventKind, Profile, Registration,
    Status, StatusInfo, Verifier, REGISTER_AAD,
};
use ims::proto::status::MAX_STATUS_MESSAGE_BYTES;
use ims::proto::{self, Refusal};
use serde_json::Value;

const MS_KEY: &[u8] = &[7; 32];
const KDF_ROUNDS: u32 = 16;
const PW: &str = "correct horse";

fn user_key() -> &'static (RsaPrivateKey, RsaPrivateKey) {
    static KEYS: OnceLock<(RsaPrivateKey, RsaPrivateKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        (
            RsaPrivateKey::generate(2048).unwrap(),
            RsaPrivateKey::generate(2048).unwrap(),
        )
    })
}

fn verifier(salt: &[u8]) -> (Verifier, PasswordKeys) {
    let params = KdfParams {
        salt: salt.to_vec(),
        iterations: KDF_ROUNDS,
    };
    let keys = PasswordKeys::derive(PW, &params, KdfPolicy::Insecure).unwrap();
    (keys.verifier(&params), keys)
}

fn register(crs: &Crs, user: &str) {
    let ClientReply::CrsKey { der, .. } = crs.client_call(ClientRequest::CrsKey).unwrap() else {
        panic!("no key")
    };
    let crs_key = crypto::RsaPublicKey::from_der(&der).unwrap();
    let (verifier, keys) = verifier(&[user.len() as u8; 16]);
    let private = &user_key().1;
    let reg = Registration {
        user: user.into(),
        verifier,
        public_key: private.public_key().to_der().unwrap(),
        wrapped_key: scram::wrap(&keys.wrap, &private.to_der().unwrap(), &wrap_aad(user)).unwrap(),
        profile: Profile::new(),
    };
    let k = crypto::random_array::<32>();
    let req = ClientRequest::Register {
        key: crs_key.encrypt_oaep(&k).unwrap(),
        sealed: crypto::aes_gcm_seal(
            &k,
            &[0; 12],
            REGISTER_AAD,
            &serde_json::to_vec(&reg).unwrap(),
        )
        .unwrap(),
    };
    crs.client_call(req).expect("registered");
}

/// Each answer also goes through the wire and the typed decoder.
fn call(crs: &Crs, ms: u64, req: CrsRequest) -> Result<CrsReply, Refusal> {
    let a = crs.call(Peer2::Ms(ms), req.clone());
    let m = match &a {
        Ok(r) => r.to_message(),
        Err(r) => r.to_message(),
    };
    let back = proto::Request::read_reply(&req, &m).expect("a valid answer");
    assert_eq!(back, a, "{req:?}");
    a.map_err(|r| r.refusal)
}

/// Logs `user` in at `ms`; the contacts of the welcome and the user's
/// own status as kept.
fn log_in(crs: &Crs, ms: u64, user: &str, port: u16) -> (Vec<Contact>, StatusInfo) {
    call(crs, ms, CrsRequest::Lock { user: user.into() }).expect("lock");
    let address = format!("10.0.0.1:{port}").parse().unwrap();
    match call(
        crs,
        ms,
        CrsRequest::Online {
            user: user.into(),
            address,
        },
    ) {
        Ok(CrsReply::Welcome { welcome, .. }) => (
            welcome.contacts,
            StatusInfo {
                status: welcome.status,
                message: welcome.message,
            },
        ),
        other => panic!("{other:?}"),
    }
}

/// The events queued for `ms` since the last call, as (recipients, kind).
fn drain(crs: &Crs, ms: u64, ack: &mut u64) -> Vec<(Vec<String>, EventKind)> {
    let Ok(CrsReply::Events(batch)) = call(crs, ms, CrsRequest::Events { ack: *ack }) else {
        panic!("events")
    };
    if let Some(last) = batch.events.len().checked_sub(1) {
        *ack = batch.first + last as u64;
    }
    batch
        .events
        .into_iter()
        .map(|e| (e.recipients, e.kind))
        .collect()
}

fn set(user: &str, status: Status, message: &str) -> CrsRequest {
    CrsRequest::SetStatus {
        user: user.into(),
        info: StatusInfo {
            status,
            message: message.into(),
        },
    }
}

fn reveal(user: &str, to: &str) -> CrsRequest {
    CrsRequest::Reveal {
        user: user.into(),
        to: to.into(),
    }
}

#[test]
fn crs_status_and_reveal_handlers() {
    let crs = Crs::new(
        CrsConfig {
            min_iterations: 1,
            poll_timeout: Duration::from_millis(50),
            ..CrsConfig::default()
        },
        Arc::new(MemStore::new()),
        MS_KEY.to_vec(),
        user_key().0.clone(),
    );
    let ms = crs.enroll_ms("127.0.0.1:7101", 10, "one");
    for u in ["alice", "bob", "carol"] {
        register(&crs, u);
    }
    // alice and bob are buddies; carol is nobody's.
    let nonce = vec![9; 16];
    let add = CrsRequest::Add {
        from: "alice".into(),
        to: "bob".into(),
        signature: user_key()
            .1
            .sign_pss(&proto::add_transcript("alice", "bob", &nonce))
            .unwrap(),
        nonce,
    };
    call(&crs, ms, add).expect("add");
    call(
        &crs,
        ms,
        CrsRequest::Accept {
            user: "bob".into(),
            from: "alice".into(),
        },
    )
    .expect("accept");
    log_in(&crs, ms, "bob", 7302);
    let (_, own) = log_in(&crs, ms, "alice", 7301);
    assert_eq!(own, StatusInfo::default());
    let mut ack = 0;
    drain(&crs, ms, &mut ack);

    let too_long = "x".repeat(MAX_STATUS_MESSAGE_BYTES + 1);
    let table: Vec<(CrsRequest, Result<CrsReply, Refusal>)> = vec![
        (
            set("alice", Status::Away, &too_long),
            Err(Refusal::BadRequest),
        ),
        (set("nobody", Status::Away, ""), Err(Refusal::NoSuchUser)),
        (reveal("nobody", "bob"), Err(Refusal::NoSuchUser)),
        // Not invisible: nothing to reveal, and nothing said.
        (reveal("alice", "bob"), Ok(CrsReply::Done)),
        (set("alice", Status::Away, "at lunch"), Ok(CrsReply::Done)),
        // The same again changes nothing.
        (set("alice", Status::Away, "at lunch"), Ok(CrsReply::Done)),
    ];
    for (req, expect) in table {
        assert_eq!(call(&crs, ms, req.clone()), expect, "{req:?}");
    }
    // One push, to bob: the change.
    assert_eq!(
        drain(&crs, ms, &mut ack),
        [(
            vec!["bob".to_owned()],
            EventKind::Status {
                user: "alice".into(),
                status: Status::Away,
                message: "at lunch".into(),
            }
        )]
    );

    // Invisible: bob hears alice go offline, sees her offline at his next
    // login, and so does the directory.
    call(&crs, ms, set("alice", Status::Invisible, "")).unwrap();
    assert_eq!(
        drain(&crs, ms, &mut ack),
        [(
            vec!["bob".to_owned()],
            EventKind::Offline {
                user: "alice".into()
            }
        )]
    );
    call(&crs, ms, set("alice", Status::Invisible, "still here")).unwrap();
    assert_eq!(drain(&crs, ms, &mut ack), [], "invisible to invisible");
    call(&crs, ms, CrsRequest::Offline { user: "bob".into() }).unwrap();
    let (contacts, _) = log_in(&crs, ms, "bob", 7302);
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0].online, None, "{contacts:?}");
    assert_eq!(contacts[0].status, Status::Available);
    assert_eq!(contacts[0].message, "");
    let Ok(CrsReply::Hits(hits)) = call(
        &crs,
        ms,
        CrsRequest::Search {
            text: "alice".into(),
            limit: 5,
        },
    ) else {
        panic!("search")
    };
    assert!(!hits[0].online, "{hits:?}");
    // alice's login announced nobody; bob's reached nobody who sees it
    // but alice.
    for (to, kind) in drain(&crs, ms, &mut ack) {
        assert!(
            !matches!(&kind, EventKind::Online { user, .. } if user == "alice"),
            "{to:?} {kind:?}"
        );
    }
    // Revealed to a buddy only: bob learns where she is, marked invisible.
    assert_eq!(call(&crs, ms, reveal("alice", "carol")), Ok(CrsReply::Done));
    assert_eq!(drain(&crs, ms, &mut ack), []);
    assert_eq!(call(&crs, ms, reveal("alice", "bob")), Ok(CrsReply::Done));
    let events = drain(&crs, ms, &mut ack);
    match events.as_slice() {
        [(
            to,
            EventKind::Online {
                user,
                status,
                message,
                presence,
            },
        )] => {
            assert_eq!(to, &["bob".to_owned()]);
            assert_eq!(
                (user.as_str(), *status, message.as_str()),
                ("alice", Status::Invisible, "")
            );
            assert_eq!(presence.address.port(), 7301);
        }
        other => panic!("{other:?}"),
    }

    // Visible again: an online with the status.
    call(&crs, ms, set("alice", Status::Busy, "deadline")).unwrap();
    match drain(&crs, ms, &mut ack).as_slice() {
        [(
            to,
            EventKind::Online {
                user,
                status,
                message,
                ..
            },
        )] => {
            assert_eq!(to, &["bob".to_owned()]);
            assert_eq!(
                (user.as_str(), *status, message.as_str()),
                ("alice", Status::Busy, "deadline")
            );
        }
        other => panic!("{other:?}"),
    }

    // Kept across logins: alice's own, and in bob's contacts.
    call(
        &crs,
        ms,
        CrsRequest::Offline {
            user: "alice".into(),
        },
    )
    .unwrap();
    let (_, own) = log_in(&crs, ms, "alice", 7301);
    assert_eq!(
        (own.status, own.message.as_str()),
        (Status::Busy, "deadline")
    );
    call(&crs, ms, CrsRequest::Offline { user: "bob".into() }).unwrap();
    let (contacts, _) = log_in(&crs, ms, "bob", 7302);
    assert!(contacts[0].online.is_some());
    assert_eq!(
        (contacts[0].status, contacts[0].message.as_str()),
        (Status::Busy, "deadline")
    );
}

// ---- real processes ----

/// Which of the cluster's MSs logged `user` in (waits for the log line).
fn ms_of(c: &Cluster, user: &str) -> usize {
    let end = Instant::now() + WAIT;
    loop {
        let line = format!("{user} logged in from");
        if let Some(i) = c.ms.iter().position(|m| m.log_text().contains(&line)) {
            return i;
        }
        assert!(Instant::now() < end, "no MS logged {user} in");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn buddy<'a>(e: &'a Value, name: &str) -> &'a Value {
    e["buddies"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["user"] == name))
        .unwrap_or_else(|| panic!("{name} not in {e}"))
}

/// `/buddies` until `who`'s entry satisfies `pred`.
fn wait_buddy(c: &Client, who: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let end = Instant::now() + WAIT;
    loop {
        c.send("/buddies");
        let e = c.wait_event("buddies", |e| {
            e["buddies"]
                .as_array()
                .is_some_and(|b| b.iter().any(|b| b["user"] == who))
        });
        let b = buddy(&e, who).clone();
        if pred(&b) {
            return b;
        }
        assert!(Instant::now() < end, "{who} is still {b}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_buddy_on_another_ms_sees_status_and_message_and_they_hold_across_relogin() {
    let c = Cluster::start(2);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    assert_ne!(ms_of(&c, "alice"), ms_of(&c, "bob"), "both on one MS");
    befriend(&alice, "alice", &bob, "bob");

    let start = Instant::now();
    alice.send("/status away at lunch");
    let ok = alice.wait_ok("status");
    assert!(field(&ok, "detail").contains("at lunch"), "{ok}");
    bob.wait_event("status", |e| {
        e["user"] == "alice" && e["status"] == "away" && e["message"] == "at lunch"
    });
    println!(
        "status seen by a buddy on another MS after {:?}",
        start.elapsed()
    );
    let b = wait_buddy(&bob, "alice", |b| b["status"] == "away");
    assert_eq!(b["online"], true, "{b}");
    assert_eq!(b["message"], "at lunch", "{b}");

    // A personal message too long, or an unknown status: refused.
    alice.send(&format!(
        "/status busy {}",
        "x".repeat(MAX_STATUS_MESSAGE_BYTES + 1)
    ));
    assert!(alice.wait_error("status").contains("at most"));
    alice.send("/status sleeping");
    assert!(alice.wait_error("status").contains("usage"));

    // A message with controls arrives whole, and harmless in JSON.
    alice.send("/status busy \u{1b}[2Jcall me");
    alice.wait_ok("status");
    bob.wait_event("status", |e| {
        e["status"] == "busy" && e["message"] == "\u{1b}[2Jcall me"
    });

    // Kept across alice's re-login: bob sees her come back busy.
    alice.send("/status away back at 2");
    alice.wait_ok("status");
    bob.wait_event("status", |e| e["message"] == "back at 2");
    drop(alice);
    bob.wait_event("offline", |e| e["user"] == "alice");
    let b = wait_buddy(&bob, "alice", |b| b["online"] == false);
    assert_eq!(b["status"], "offline", "{b}");
    let alice = c.login("alice", PW);
    alice.wait_event("notice", |e| {
        field(e, "text") == "your status: away: back at 2 (kept from your last login)"
    });
    bob.wait_event("online", |e| e["user"] == "alice");
    bob.wait_event("status", |e| {
        e["user"] == "alice" && e["status"] == "away" && e["message"] == "back at 2"
    });
    alice.send("/status");
    alice.wait_event("notice", |e| {
        field(e, "text") == "your status: away: back at 2"
    });
    // And bob, logging in again, finds it in his buddy list.
    drop(bob);
    let bob = c.login("bob", PW);
    let e = bob.wait_event("buddies", |e| {
        e["buddies"].as_array().is_some_and(|b| !b.is_empty())
    });
    let b = buddy(&e, "alice");
    assert_eq!(
        (b["status"].as_str(), b["message"].as_str()),
        (Some("away"), Some("back at 2")),
        "{e}"
    );
    alice.send("/status available");
    bob.wait_event("status", |e| {
        e["status"] == "available" && e["message"] == ""
    });
}

#[test]
fn invisible_looks_offline_yet_messages_flow_both_ways() {
    let c = Cluster::start(2);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");

    alice.send("/status invisible");
    alice.wait_ok("status");
    bob.wait_event("offline", |e| e["user"] == "alice");
    let b = wait_buddy(&bob, "alice", |b| b["online"] == false);
    assert_eq!(b["status"], "offline", "{b}");
    // Bob cannot reach her: she is offline to him.
    bob.send("/msg alice are you there?");
    bob.wait_event("send-failed", |e| e["to"] == "alice");
    assert!(!alice.saw(|e| e["event"] == "message"));

    // She writes; he gets it, and his answer reaches her.
    alice.send("/msg bob psst, it's me");
    bob.wait_event("message", |e| {
        e["from"] == "alice" && e["text"] == "psst, it's me"
    });
    alice.wait_event("delivered", |e| e["to"] == "bob");
    bob.send("/msg alice got it");
    alice.wait_event("message", |e| e["from"] == "bob" && e["text"] == "got it");
    bob.wait_event("delivered", |e| e["to"] == "alice");
    // All along she looked offline to him.
    let b = wait_buddy(&bob, "alice", |_| true);
    assert_eq!(b["online"], false, "{b}");
    let offline_at = bob
        .events()
        .iter()
        .rposition(|e| e["event"] == "offline" && e["user"] == "alice")
        .unwrap();
    assert!(
        !bob.events()[offline_at..]
            .iter()
            .any(|e| e["event"] == "online" || e["event"] == "status"),
        "bob saw alice while she was invisible"
    );

    // Visible again: online, for him too.
    alice.send("/status available");
    alice.wait_ok("status");
    bob.wait_event("online", |e| e["user"] == "alice");
    let b = wait_buddy(&bob, "alice", |b| b["online"] == true);
    assert_eq!(b["status"], "available", "{b}");
}

#[test]
fn auto_away_after_the_idle_limit_and_back_at_the_next_input() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let config = c.env.path().join("alice.toml");
    fs::write(&config, "auto_away_secs = 1\n").unwrap();
    let alice = Client::start_with(
        &c.env,
        c.crs.addr,
        "alice",
        PW,
        &["-c", config.to_str().unwrap()],
    );
    alice.send("/login alice");
    alice.wait_event("logged-in", |e| e["user"] == "alice");
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    alice.send("/status available reading");
    alice.wait_ok("status");
    bob.wait_event("status", |e| {
        e["user"] == "alice" && e["status"] == "available" && e["message"] == "reading"
    });

    // Idle: away, keeping the message; bob sees it.
    bob.wait_event("status", |e| {
        e["user"] == "alice" && e["status"] == "away" && e["message"] == "reading"
    });
    alice.wait_event("notice", |e| field(e, "text").starts_with("status away"));
    let b = wait_buddy(&bob, "alice", |b| b["status"] == "away");
    assert_eq!(b["message"], "reading", "{b}");
    // Any input: back to what it was.
    alice.send("/buddies");
    bob.wait_event("status", |e| {
        e["user"] == "alice" && e["status"] == "available" && e["message"] == "reading"
    });
    alice.wait_event("notice", |e| field(e, "text").starts_with("back"));

    // A status chosen by hand is not replaced by auto-away.
    alice.send("/status busy in a call");
    alice.wait_ok("status");
    bob.wait_event("status", |e| e["status"] == "busy");
    // A message from bob marks a time past the idle limit.
    std::thread::sleep(Duration::from_millis(1500));
    bob.send("/msg alice ping");
    alice.wait_event("message", |e| e["text"] == "ping");
    let b = wait_buddy(&bob, "alice", |_| true);
    assert_eq!(b["status"], "busy", "{b}");

    // Logging out while auto-away ends it first: the next login finds
    // the status chosen, not the one the client set.
    alice.send("/status available");
    alice.wait_ok("status");
    bob.wait_event("status", |e| {
        e["status"] == "available" && e["message"] == ""
    });
    bob.wait_event("status", |e| e["status"] == "away" && e["message"] == "");
    alice.send("/logout");
    alice.wait_event("logged-out", |e| e["user"] == "alice");
    bob.wait_event("offline", |e| e["user"] == "alice");
    alice.send("/login alice");
    alice.wait_event("logged-in", |e| e["user"] == "alice");
    bob.wait_event("online", |e| e["user"] == "alice");
    let b = wait_buddy(&bob, "alice", |b| b["online"] == true);
    assert_eq!(b["status"], "available", "{b}");
    assert!(!alice.saw(|e| field(e, "text").contains("kept from your last login")));
}
