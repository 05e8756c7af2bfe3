//! Accounts, logins, buddies and presence against the real programs: one
//! CRS and two MSs per test (each test its own cluster, so they can run in
//! parallel), `ims-client --json` processes, and raw protocol clients built
//! from the library where bytes matter.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::raw::{self, Conn};
use common::{field, Client, Cluster, Ms, WAIT};
use ims::crypto;
use ims::proto::ms::MsRequest;
use ims::proto::{self, Fields, Refusal};
use ims::wire::Message;
use serde_json::Value;

const PW: &str = "correct horse";

fn names(buddies: &Value) -> Vec<(String, bool)> {
    buddies["buddies"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| (field(b, "user").to_owned(), b["online"] == true))
                .collect()
        })
        .unwrap_or_default()
}

/// Makes `a` and `b` (both logged in) buddies: `a` asks, `b` accepts.
fn befriend(a: &Client, a_name: &str, b: &Client, b_name: &str) {
    a.send(&format!("/add {b_name}"));
    let ok = a.wait_ok("add");
    assert_eq!(field(&ok, "detail"), format!("request sent to {b_name}"));
    b.wait_event("request", |e| e["from"] == a_name);
    b.send(&format!("/accept {a_name}"));
    b.wait_ok("accept");
    a.wait_event("buddy-added", |e| {
        e["user"] == b_name && e["online"] == true
    });
    b.wait_event("buddy-added", |e| {
        e["user"] == a_name && e["online"] == true
    });
}

/// 1. Registration, a request waiting for an offline user, add/accept,
///    presence across two MSs, remove and deny.
#[test]
fn buddies_and_presence_across_two_ms() {
    let c = Cluster::start(2);
    let users = ["alice", "bob", "carol"];
    for u in users {
        c.register(u, PW);
    }

    // alice asks bob while bob is offline: stored, shown at his login.
    let alice = c.login("alice", PW);
    alice.wait_event("buddies", |e| names(e).is_empty());
    alice.send("/add bob");
    let ok = alice.wait_ok("add");
    assert!(field(&ok, "detail").contains("offline"), "{ok}");
    let bob = c.login("bob", PW);
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    bob.wait_ok("accept");
    alice.wait_event("buddy-added", |e| e["user"] == "bob" && e["online"] == true);
    bob.wait_event("buddy-added", |e| {
        e["user"] == "alice" && e["online"] == true
    });

    // LOCATE balances by load: the three logins use both MSs.
    let carol = c.login("carol", PW);
    let list = c.crs.wait_ms_list("three users on two MSs", |l| {
        l.len() == 2 && l.iter().all(|(_, load)| *load >= 1)
    });
    assert_eq!(list.iter().map(|(_, l)| l).sum::<u32>(), 3, "{list:?}");
    for ms in &c.ms {
        assert!(
            ms.log_text().contains("logged in from"),
            "MS {} logged nobody in",
            ms.addr
        );
    }

    befriend(&alice, "alice", &carol, "carol");
    befriend(&bob, "bob", &carol, "carol");

    // Each user in turn goes offline and comes back; the others see both.
    let clients = [&alice, &bob, &carol];
    for (i, me) in users.iter().enumerate() {
        let others: Vec<usize> = (0..3).filter(|&j| j != i).collect();
        clients[i].send("/logout");
        clients[i].wait_event("logged-out", |e| e["user"] == *me);
        for &j in &others {
            clients[j].wait_event("offline", |e| e["user"] == *me);
        }
        clients[i].send(&format!("/login {me}"));
        clients[i].wait_event("logged-in", |e| e["user"] == *me);
        // Its buddy list at login shows the other two online.
        let b = clients[i].wait_event("buddies", |e| names(e).len() == 2);
        assert!(names(&b).iter().all(|(_, online)| *online), "{b}");
        for &j in &others {
            clients[j].wait_event("online", |e| e["user"] == *me);
        }
    }

    // remove: both sides hear of it.
    alice.send("/remove bob");
    alice.wait_ok("remove");
    alice.wait_event("buddy-removed", |e| e["user"] == "bob");
    bob.wait_event("buddy-removed", |e| e["user"] == "alice");
    alice.send("/buddies");
    let b = alice.wait_event("buddies", |e| names(e).len() == 1);
    assert_eq!(names(&b), vec![("carol".to_string(), true)]);

    // deny: the asker is told.
    bob.send("/add alice");
    assert_eq!(
        field(&bob.wait_ok("add"), "detail"),
        "request sent to alice"
    );
    alice.wait_event("request", |e| e["from"] == "bob");
    alice.send("/deny bob");
    alice.wait_ok("deny");
    bob.wait_event("denied", |e| e["by"] == "alice");
    // And nothing changed for them.
    let shown = c.crs.show_user("bob");
    assert_eq!(shown["contacts"], serde_json::json!(["carol"]), "{shown}");
    assert_eq!(shown["requests_from"], serde_json::json!([]), "{shown}");
}

/// 2. Twenty simultaneous logins of one user through both MSs, ten times:
///    each time exactly one wins, the others are refused clearly, and the
///    CRS and both MSs agree that the user is online once, at the winner's
///    MS. The winner's login lives as long as its connection: no probe and
///    no other MS can take it over.
#[test]
fn simultaneous_logins_one_wins() {
    const N: usize = 20;
    const ROUNDS: usize = 10;
    // Two hundred attempts of one name from one address would be guesses
    // past the free ones and past the MSs' rate of logins per address:
    // allow them here, where the lock is tested.
    let c = Cluster::start_configured(2, "free_login_attempts = 1000\n", &["--login-rate", "0"]);
    c.register("dave", PW);
    let ms: Vec<SocketAddr> = c.ms.iter().map(|m| m.addr).collect();
    for round in 0..ROUNDS {
        // All hellos first, then all proofs together, so the LOCKs race.
        let barrier = Arc::new(Barrier::new(N));
        let threads: Vec<_> = (0..N)
            .map(|i| {
                let (barrier, ms) = (barrier.clone(), ms[i % 2]);
                thread::spawn(move || {
                    let pending = std::panic::catch_unwind(|| raw::begin(ms, "dave", PW));
                    // Never leave the others waiting at the barrier.
                    barrier.wait();
                    let pending = pending.unwrap_or_else(|e| std::panic::resume_unwind(e));
                    assert!(pending.challenge.is_success(), "{:?}", pending.challenge);
                    (ms, raw::finish(pending, 40_000))
                })
            })
            .collect();
        // Every login's connection stays open until the round is checked.
        let logins: Vec<(SocketAddr, raw::Recorded)> = threads
            .into_iter()
            .map(|t| t.join().expect("login thread"))
            .collect();
        let won: Vec<&(SocketAddr, raw::Recorded)> =
            logins.iter().filter(|(_, r)| r.session.is_some()).collect();
        let replies: Vec<&Message> = logins.iter().map(|(_, r)| &r.reply).collect();
        assert_eq!(
            won.len(),
            1,
            "round {round}: exactly one login succeeds: {replies:?}"
        );
        for (_, r) in logins.iter().filter(|(_, r)| r.session.is_none()) {
            let r = &r.reply;
            assert_eq!(raw::code(r), 409, "{r:?}");
            let refusal = ims::proto::Refused::from_message(r).map(|r| r.refusal);
            assert!(
                matches!(
                    refusal,
                    Some(Refusal::AlreadyLoggedIn { .. } | Refusal::AlreadyLoggingIn)
                ),
                "unclear refusal: {r:?}"
            );
        }
        // The CRS and the MSs agree: online once, at the winner's MS.
        let shown = c.crs.show_user("dave");
        assert!(shown["online"].is_string(), "dave is online: {shown}");
        let list = c.crs.ms_list();
        assert_eq!(list.iter().map(|(_, l)| l).sum::<u32>(), 1, "{list:?}");
        let winner_ms = won[0].0.to_string();
        assert!(
            list.iter().any(|(a, l)| *a == winner_ms && *l == 1),
            "the winner's MS {winner_ms} holds the login: {list:?}"
        );
        // The winner's connection closes: offline at once, ready for the
        // next round.
        drop(logins);
        let end = Instant::now() + WAIT;
        while !c.crs.show_user("dave")["online"].is_null() {
            assert!(
                Instant::now() < end,
                "round {round}: dave stays online after his connection closed"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// 3. A wrong password changes nothing; a recorded login replayed is
///    refused; an MS with the wrong MSkey is never enrolled.
#[test]
fn wrong_password_replay_and_wrong_mskey() {
    // The replays below are attempts from one address in a row: allow
    // them, so that each is judged on its proof.
    let c = Cluster::start_configured(2, "free_login_attempts = 100\n", &[]);
    c.register("erin", PW);

    let wrong = c.client("erin-wrong", "not the password");
    wrong.send("/login erin");
    let reason = wrong.wait_error("login");
    assert!(reason.contains("wrong name or password"), "{reason}");
    // No lock left behind: the right password works at once.
    let right = c.login("erin", PW);
    assert_eq!(right.quit().map(|s| s.success()), Some(true));
    let end = Instant::now() + WAIT;
    while !c.crs.show_user("erin")["online"].is_null() {
        assert!(Instant::now() < end, "erin stays online after quitting");
        thread::sleep(Duration::from_millis(50));
    }

    // Record one real login, then log out.
    let ms0 = c.ms[0].addr;
    let mut rec = raw::login(ms0, "erin", PW, 40_001);
    let mut session = rec.session.take().expect("the recorded login succeeds");
    let bye = raw::ms_request(ms0, &mut session, &MsRequest::Logout);
    assert!(bye.is_success(), "{bye:?}");
    assert!(c.crs.show_user("erin")["online"].is_null());

    // Replayed on new connections, to both MSs: a fresh server nonce makes
    // the old proof fail.
    for ms in [ms0, c.ms[1].addr] {
        let mut conn = Conn::connect(ms);
        conn.write_raw(&rec.hello);
        let hello = conn.read().expect("hello reply");
        assert!(hello.is_success(), "{hello:?}");
        conn.write_raw(&rec.login);
        let login = conn.read().expect("login reply");
        assert_eq!(raw::code(&login), 401, "{login:?}");
        assert_eq!(login.header("Refusal"), Some("password-failure"));
        // Both at once, pipelined.
        let mut conn = Conn::connect(ms);
        conn.write_raw(&[rec.hello.clone(), rec.login.clone()].concat());
        assert!(conn.read().expect("hello reply").is_success());
        assert_eq!(raw::code(&conn.read().expect("login reply")), 401);
    }
    assert!(
        c.crs.show_user("erin")["online"].is_null(),
        "a replay logged erin in"
    );
    // Nothing changed: the password still works, and no lock is left.
    let again = raw::login(c.ms[1].addr, "erin", PW, 40_002);
    assert!(again.session.is_some(), "{:?}", again.reply);

    // An MS with another MSkey: refused, exits non-zero, says why.
    let bad_key = c.env.other_key("wrong-mskey");
    match Ms::try_start(&c.env, c.crs.addr, &bad_key, &[]) {
        Ok(ms) => panic!("an MS with the wrong MSkey runs at {}", ms.addr),
        Err(f) => {
            let status = f.status.expect("the MS exits by itself");
            assert!(!status.success(), "exit status {status:?}");
            assert!(
                f.stderr.contains("enrollment failed") && f.stderr.contains("bad MSkey proof"),
                "unclear stderr: {}",
                f.stderr
            );
        }
    }
    assert!(c.crs.proc.log_text().contains("bad MSkey proof"));
    let good: Vec<String> = c.ms.iter().map(|m| m.addr.to_string()).collect();
    let listed: Vec<String> = c.crs.ms_list().into_iter().map(|(a, _)| a).collect();
    assert_eq!(listed, good, "only the good MSs are enrolled");
    for _ in 0..10 {
        let reply = Conn::connect(c.crs.addr).call(&Message::request("LOCATE"));
        let ms = reply.header("Ms").unwrap_or_default().to_owned();
        assert!(good.contains(&ms), "LOCATE sent a client to {ms:?}");
    }
}

/// 4. A password change, then the new password logs in and the old one
///    does not; a profile change shows in search.
#[test]
fn password_change_and_profile_search() {
    let c = Cluster::start(2);
    c.register("frank", PW);
    c.register("gina", PW);
    let frank = c.login("frank", PW);
    // The current password is checked first: a wrong one changes nothing.
    frank.send("/passwd");
    frank.send("not the password");
    frank.send("brand new password");
    assert!(frank
        .wait_error("passwd")
        .contains("current password is wrong"));
    frank.send("/passwd");
    frank.send(PW);
    frank.send("brand new password");
    frank.wait_ok("passwd");
    frank.send("/profile company Initech Corp");
    let p = frank.wait_event("profile", |e| e["profile"]["company"] == "Initech Corp");
    assert_eq!(p["profile"]["company"], "Initech Corp");

    let gina = c.login("gina", PW);
    gina.send("/search initech");
    let found = gina.wait_event("search-results", |_| true);
    let results = found["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 1, "{found}");
    assert_eq!(results[0]["user"], "frank");
    assert_eq!(results[0]["profile"]["company"], "Initech Corp");
    assert_eq!(results[0]["online"], true);
    // A name prefix finds her too.
    gina.send("/search gi");
    let found = gina.wait_event("search-results", |_| true);
    assert_eq!(found["results"][0]["user"], "gina", "{found}");

    frank.send("/logout");
    frank.wait_event("logged-out", |_| true);
    let old = c.client("frank-old", PW);
    old.send("/login frank");
    assert!(old.wait_error("login").contains("wrong name or password"));
    c.login("frank", "brand new password");
}

/// 5. The CRS killed with SIGKILL right after acknowledging a
///    registration comes back with it; the MSs re-enroll by themselves and
///    re-announce who is logged in at them.
#[test]
fn crs_restart_after_kill9() {
    let mut c = Cluster::start(2);
    c.register("ivy", PW);
    let ivy = c.login("ivy", PW);
    c.register("henry", PW);
    c.crs.restart(&c.env);

    // Logins may find no MS until they re-enroll (they back off): retry.
    let henry = c.client("henry", PW);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        henry.send("/login henry");
        let e = henry.wait_outcome("login");
        if e["event"] == "logged-in" {
            break;
        }
        let reason = field(&e, "reason");
        assert!(
            reason.contains("no messaging server")
                || reason.contains("unavailable")
                || reason.contains("reach"),
            "unexpected login failure: {e}"
        );
        assert!(Instant::now() < end, "no login 20 s after the restart: {e}");
        thread::sleep(Duration::from_millis(200));
    }
    let mut addrs: Vec<String> = c.ms.iter().map(|m| m.addr.to_string()).collect();
    addrs.sort();
    c.crs.wait_ms_list("both MSs re-enrolled", |l| {
        let mut got: Vec<&String> = l.iter().map(|(a, _)| a).collect();
        got.sort();
        got.into_iter().eq(addrs.iter())
    });
    // ivy stayed logged in at her MS, which told the new CRS.
    let end = Instant::now() + WAIT;
    while !c.crs.show_user("ivy")["online"].is_string() {
        assert!(
            Instant::now() < end,
            "ivy was not re-announced: {}",
            c.crs.show_user("ivy")
        );
        thread::sleep(Duration::from_millis(100));
    }
    // And presence works across the restart: henry adds ivy.
    henry.send("/add ivy");
    henry.wait_ok("add");
    ivy.wait_event("request", |e| e["from"] == "henry");
}

/// What came back for a bad message: an error reply (4xx) or a close.
fn refused(conn: &mut Conn, what: &str) {
    match conn.read() {
        None => {}
        Some(m) => {
            let code = raw::code(&m);
            assert!((400..500).contains(&code), "{what}: answered {m:?}");
            // After an error the server closes.
            assert!(conn.read().is_none(), "{what}: connection kept after {m:?}");
        }
    }
}

fn send_bad(addr: SocketAddr, bytes: &[u8], half_close: bool, what: &str) {
    let mut conn = Conn::connect(addr);
    // The server may close before taking everything: ignore write errors.
    let _ = conn.reader.get_mut().write_all(bytes);
    if half_close {
        let _ = conn.reader.get_ref().shutdown(Shutdown::Write);
    }
    refused(&mut conn, what);
}

fn bad_inputs() -> Vec<(&'static str, Vec<u8>, bool)> {
    let long_line = format!(
        "LOCATE\r\nX-Long: {}\r\nContent-Length: 0\r\n\r\n\r\n",
        "a".repeat(3000)
    );
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("LOCATE\r\n{many}Content-Length: 0\r\n\r\n\r\n");
    let huge_block: String = (0..40)
        .map(|i| format!("X-H{i}: {}\r\n", "b".repeat(1000)))
        .collect();
    let huge_block = format!("LOCATE\r\n{huge_block}Content-Length: 0\r\n\r\n\r\n");
    let mut truncated =
        b"SEALED\r\nLogin: 00112233\r\nDir: i2r\r\nSeq: 1\r\nContent-Length: 200\r\n\r\n".to_vec();
    truncated.extend_from_slice(&[0x5a; 40]);
    vec![
        (
            "binary garbage",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(),
            false,
        ),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        (
            "bare LF",
            b"LOCATE\nContent-Length: 0\n\n\r\n".to_vec(),
            false,
        ),
        ("a 3 KB header line", long_line.into_bytes(), false),
        ("100 header lines", many.into_bytes(), false),
        ("a 40 KB header block", huge_block.into_bytes(), false),
        (
            "a 2 MB Content-Length",
            b"REGISTER\r\nContent-Length: 2000000\r\n\r\n".to_vec(),
            false,
        ),
        (
            "an unknown method",
            b"FROB\r\nContent-Length: 0\r\n\r\n\r\n".to_vec(),
            true,
        ),
        (
            "a lying Content-Length",
            b"LOCATE\r\nContent-Length: 2\r\n\r\nabcdef\r\n".to_vec(),
            false,
        ),
        ("a truncated sealed body", truncated, true),
    ]
}

/// 6. Garbage, oversized headers, an unknown method and a truncated sealed
///    body get an error or a close, and the servers go on serving.
#[test]
fn garbage_is_refused_and_service_continues() {
    let c = Cluster::start(2);
    c.register("liam", PW);
    let crs = c.crs.addr;
    let ms = c.ms[0].addr;
    for (what, bytes, half_close) in bad_inputs() {
        send_bad(crs, &bytes, half_close, &format!("CRS: {what}"));
        send_bad(ms, &bytes, half_close, &format!("MS: {what}"));
    }
    // The unknown method is answered with 405 by both.
    for addr in [crs, ms] {
        let reply = Conn::connect(addr).call(&Message::request("FROB"));
        assert_eq!(raw::code(&reply), 405, "{reply:?}");
    }
    // On an enrolled (operator) link to the CRS: a forged sealed message,
    // then a truncated one, each close the link.
    for body_len in [64usize, 10] {
        let mut link = enroll_admin(crs, &c.env.key);
        let mut forged = Message::request("SEALED")
            .with_header("Dir", "i2r")
            .with_header("Seq", 1)
            .with_body(vec![7u8; 64])
            .encode();
        if body_len < 64 {
            // Cut inside the body and stop sending.
            forged.truncate(forged.len() - 2 - (64 - body_len));
            link.write_raw(&forged);
            let _ = link.reader.get_ref().shutdown(Shutdown::Write);
        } else {
            link.write_raw(&forged);
        }
        refused(&mut link, "CRS: a bad sealed message on an enrolled link");
    }
    // A client's sealed request with an unknown login id.
    let reply = Conn::connect(ms).call(
        &Message::request("SEALED")
            .with_header("Login", "nobody")
            .with_header("Dir", "i2r")
            .with_header("Seq", 1)
            .with_body(vec![1u8; 40]),
    );
    assert_eq!(raw::code(&reply), 403, "{reply:?}");

    // Both answer the next valid request.
    let located = Conn::connect(crs).call(&Message::request("LOCATE"));
    assert!(
        located.is_success() && located.header("Ms").is_some(),
        "{located:?}"
    );
    for m in &c.ms {
        let hello = Conn::connect(m.addr).call(
            &MsRequest::LoginHello {
                user: "liam".into(),
                client_nonce: vec![9; 24],
            }
            .to_message(),
        );
        assert!(
            hello.is_success() && hello.req_b64("Salt").is_ok(),
            "{hello:?}"
        );
    }
    // And a whole login still works.
    c.login("liam", PW);
}

/// Enrolls an operator link by hand; the connection, ready for `SEALED`.
fn enroll_admin(crs: SocketAddr, key_file: &std::path::Path) -> Conn {
    let key = ims::keyfile::read_ms_key(key_file).expect("key");
    let mut conn = Conn::connect(crs);
    let ms_nonce = crypto::random_array::<32>();
    let reply = conn.call(
        &Message::request("ENROLL-HELLO").with_header("Ms-Nonce", crypto::b64_encode(&ms_nonce)),
    );
    let crs_nonce = reply.req_b64("Crs-Nonce").expect("Crs-Nonce");
    let proof = crypto::hmac_sha256(
        &key,
        &proto::enroll_ms_transcript(&ms_nonce, &crs_nonce, "test", 0, "admin", ""),
    );
    let reply = conn.call(
        &Message::request("ENROLL")
            .with_header("Listen", "test")
            .with_header("Capacity", 0)
            .with_header("Role", "admin")
            .with_header("Proof", crypto::b64_encode(&proof)),
    );
    assert!(reply.is_success(), "{reply:?}");
    conn
}

/// 7. Operator commands against the running CRS.
#[test]
fn operator_commands() {
    let c = Cluster::start(2);
    for u in ["jack", "kate", "leo"] {
        c.register(u, PW);
    }
    let listed = c.crs.op_ok(&["user", "list"]);
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        vec!["jack", "kate", "leo"]
    );

    let jack = c.login("jack", PW);
    let kate = c.login("kate", PW);
    befriend(&jack, "jack", &kate, "kate");
    let shown = c.crs.show_user("jack");
    assert_eq!(shown["user"], "jack");
    assert!(shown["online"].is_string(), "{shown}");
    assert_eq!(shown["contacts"], serde_json::json!(["kate"]));
    assert!(shown["public_key_fingerprint"]
        .as_str()
        .is_some_and(|f| !f.is_empty()));
    assert!(c.crs.show_user("leo")["online"].is_null());

    let out = c.crs.op(&["user", "show", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such user"));

    let ms = c.crs.ms_list();
    let mut want: Vec<String> = c.ms.iter().map(|m| m.addr.to_string()).collect();
    let mut got: Vec<String> = ms.iter().map(|(a, _)| a.clone()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(ms.iter().map(|(_, l)| l).sum::<u32>(), 2, "{ms:?}");

    // Deleting kate while she is online: jack is told, she is gone.
    assert_eq!(c.crs.op_ok(&["user", "delete", "kate"]).trim(), "ok");
    jack.wait_event("buddy-removed", |e| e["user"] == "kate");
    assert_eq!(
        c.crs.op_ok(&["user", "list"]).lines().collect::<Vec<_>>(),
        vec!["jack", "leo"]
    );
    assert!(!c.crs.op(&["user", "show", "kate"]).status.success());
    assert_eq!(c.crs.show_user("jack")["contacts"], serde_json::json!([]));
    drop(kate);
    let again = c.client("kate-again", PW);
    again.send("/login kate");
    assert!(again.wait_error("login").contains("wrong name or password"));
    assert!(!c.crs.op(&["user", "delete", "kate"]).status.success());

    // An operator with another key is refused.
    let other = c.env.other_key("other-key");
    let out = std::process::Command::new(common::CRS_BIN)
        .args(["user", "list", "--crs", &c.crs.addr_str(), "--ms-key"])
        .arg(&other)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad MSkey proof"),
        "{out:?}"
    );
}
