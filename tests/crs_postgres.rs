//! Several CRS instances on one PostgreSQL database serving one directory:
//! accounts and presence across two instances and two MSs, an instance
//! killed with its MS moving to the other, the login lease across
//! instances, and the database killed during registrations.
//!
//! Each test starts its own PostgreSQL server (see `pg/mod.rs`).

mod common;
mod pg;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::raw;
use common::{field, Client, Crs, CrsOpts, Ms, TestEnv, WAIT};
use ims::wire::Message;
use serde_json::Value;

const PW: &str = "correct horse";

/// A CRS instance on the database at `url`.
fn crs_on(env: &TestEnv, url: &str, extra: &[&str]) -> Crs {
    let mut args = vec!["--store".to_owned(), url.to_owned()];
    args.extend(extra.iter().map(|a| a.to_string()));
    Crs::start(
        env,
        CrsOpts {
            args,
            ..Default::default()
        },
    )
}

/// An MS using the CRS instances `list` (comma-separated), first first.
fn ms_on(env: &TestEnv, list: &str, extra: &[&str]) -> Ms {
    Ms::try_start_crs(env, list, &env.key, extra)
        .unwrap_or_else(|e| panic!("the MS did not start: {e:?}"))
}

fn login(env: &TestEnv, crs: &str, user: &str) -> Client {
    let c = Client::start(env, crs, user, PW);
    c.send(&format!("/login {user}"));
    c.wait_event("logged-in", |e| e["user"] == user);
    c
}

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

/// Waits until `f` holds, up to `timeout`.
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Two instances, two MSs (each on a different instance), buddies across
/// them; then one instance is killed with SIGKILL: its MS moves to the
/// other within 5 s, logged-in users stay logged in, and a login, a buddy
/// request and a presence change made afterwards all arrive.
#[test]
fn two_instances_serve_one_directory_and_survive_one_killed() {
    let db = pg::PgServer::start();
    let env = TestEnv::new();
    let mut a = crs_on(&env, &db.url(), &[]);
    let b = crs_on(&env, &db.url(), &[]);
    let (aa, ba) = (a.addr_str(), b.addr_str());
    let ms1 = ms_on(&env, &format!("{aa},{ba}"), &[]);
    let ms2 = ms_on(&env, &format!("{ba},{aa}"), &[]);

    // Registered through either instance, known to both: one directory,
    // one CRS key (registrations are encrypted to it).
    a.register(&env, "alice", PW);
    b.register(&env, "bob", PW);
    a.register(&env, "carol", PW);
    assert_eq!(
        a.op_ok(&["user", "list"]),
        b.op_ok(&["user", "list"]),
        "both instances list the same users"
    );
    // Both MSs are seen by both instances.
    for crs in [&a, &b] {
        crs.wait_ms_list("two MSs", |l| l.len() == 2);
    }

    // alice logs in through B's LOCATE, bob through A's: one on each MS.
    // Clients know both instances, in either order.
    let alice = login(&env, &format!("{ba},{aa}"), "alice");
    let bob = login(&env, &format!("{aa},{ba}"), "bob");
    let list = b.wait_ms_list("one user on each MS", |l| {
        l.len() == 2 && l.iter().all(|(_, load)| *load == 1)
    });
    assert_eq!(list.len(), 2);

    alice.send("/add bob");
    alice.wait_ok("add");
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    bob.wait_ok("accept");
    alice.wait_event("buddy-added", |e| e["user"] == "bob" && e["online"] == true);
    bob.wait_event("buddy-added", |e| {
        e["user"] == "alice" && e["online"] == true
    });
    // Presence across the instances: bob goes and comes back.
    bob.send("/logout");
    bob.wait_event("logged-out", |e| e["user"] == "bob");
    alice.wait_event("offline", |e| e["user"] == "bob");
    bob.send("/login bob");
    bob.wait_event("logged-in", |e| e["user"] == "bob");
    alice.wait_event("online", |e| e["user"] == "bob");

    // Kill instance A: ms1 used it and moves to B.
    let ms1_was_on_a = !ms1.log_text().contains("moved to");
    assert!(ms1_was_on_a, "ms1 started on A");
    a.kill9();
    let killed = Instant::now();
    wait_until("ms1 to move to B", Duration::from_secs(5), || {
        ms1.log_text().contains(&format!("moved to {ba}"))
    });
    eprintln!("ms1 moved to B in {:?}", killed.elapsed());

    // The operator's tool given both instances uses the one alive.
    let out = std::process::Command::new(common::CRS_BIN)
        .args(["user", "list", "--crs", &format!("{aa},{ba}"), "--ms-key"])
        .arg(&env.key)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ims-crs user list");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("alice"),
        "{out:?}"
    );
    // Still logged in, as B sees it.
    for u in ["alice", "bob"] {
        let shown = b.show_user(u);
        assert!(shown["online"].is_string(), "{u} is still online: {shown}");
    }
    // A login afterwards (through B), a buddy request and presence.
    let carol = login(&env, &format!("{aa},{ba}"), "carol");
    carol.send("/add alice");
    carol.wait_ok("add");
    alice.wait_event("request", |e| e["from"] == "carol");
    alice.send("/accept carol");
    alice.wait_ok("accept");
    carol.wait_event("buddy-added", |e| e["user"] == "alice");
    bob.send("/logout");
    bob.wait_event("logged-out", |e| e["user"] == "bob");
    alice.wait_event("offline", |e| e["user"] == "bob");
    bob.send("/login bob");
    bob.wait_event("logged-in", |e| e["user"] == "bob");
    alice.wait_event("online", |e| e["user"] == "bob");
    alice.send("/buddies");
    let buddies = alice.wait_event("buddies", |e| names(e).len() == 2);
    assert!(
        names(&buddies).iter().all(|(_, online)| *online),
        "{buddies}"
    );
    drop(ms2);
}

/// Twenty simultaneous logins of one user through two MSs attached to two
/// CRS instances: exactly one wins; the lease is one across the directory.
#[test]
fn racing_logins_across_instances_one_wins() {
    const N: usize = 20;
    let db = pg::PgServer::start();
    let env = TestEnv::new();
    // Twenty attempts of one name from one address at once would be
    // guesses past the free ones: allow them here, where the lock is tested.
    let conf = env.path().join("crs-free.toml");
    std::fs::write(&conf, "free_login_attempts = 100\n").expect("config");
    let conf = conf.to_string_lossy().into_owned();
    let a = crs_on(&env, &db.url(), &["-c", &conf]);
    let b = crs_on(&env, &db.url(), &["-c", &conf]);
    let ms1 = ms_on(&env, &a.addr_str(), &["--workers", "12"]);
    let ms2 = ms_on(&env, &b.addr_str(), &["--workers", "12"]);
    a.register(&env, "dave", PW);
    let ms = [ms1.addr, ms2.addr];
    let port = alive_client("dave");
    let barrier = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (barrier, ms) = (barrier.clone(), ms[i % 2]);
            thread::spawn(move || {
                let pending = std::panic::catch_unwind(|| raw::begin(ms, "dave", PW));
                barrier.wait();
                let pending = pending.unwrap_or_else(|e| std::panic::resume_unwind(e));
                assert!(pending.challenge.is_success(), "{:?}", pending.challenge);
                // The whole login: a winner's connection carries its
                // login and must stay open until every racer is done.
                raw::finish(pending, port)
            })
        })
        .collect();
    let logins: Vec<raw::Recorded> = threads
        .into_iter()
        .map(|t| t.join().expect("login thread"))
        .collect();
    let replies: Vec<Message> = logins.iter().map(|r| r.reply.clone()).collect();
    let won = replies
        .iter()
        .filter(|r| r.method() == Some("SEALED"))
        .count();
    assert_eq!(won, 1, "exactly one login succeeds: {replies:?}");
    for r in replies.iter().filter(|r| r.method() != Some("SEALED")) {
        assert_eq!(raw::code(r), 409, "{r:?}");
        let refusal = ims::proto::Refused::from_message(r).map(|r| r.refusal);
        assert!(
            matches!(
                refusal,
                Some(ims::proto::Refusal::AlreadyLoggedIn { .. })
                    | Some(ims::proto::Refusal::AlreadyLoggingIn)
            ),
            "unclear refusal: {r:?}"
        );
    }
    for crs in [&a, &b] {
        let shown = crs.show_user("dave");
        assert!(shown["online"].is_string(), "dave is online: {shown}");
        let list = crs.ms_list();
        assert_eq!(list.iter().map(|(_, l)| l).sum::<u32>(), 1, "{list:?}");
    }
}

/// A listener that answers `PROBE` for `user` like a live client; its port.
fn alive_client(user: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = raw::Conn {
                reader: ims::wire::io::MessageReader::new(conn),
            };
            if let Some(m) = conn.read() {
                let reply = if m.method() == Some("PROBE") && m.header("User") == Some(user) {
                    Message::ok().with_header("User", user)
                } else {
                    Message::ok()
                };
                conn.write_raw(&reply.encode());
            }
        }
    });
    port
}

/// kill -9 of the database server during registrations (through two
/// instances), then its restart: no acknowledged registration is lost, and
/// both instances reconnect by themselves and say so in their logs.
#[test]
fn database_killed_during_registrations() {
    let mut db = pg::PgServer::start();
    let env = TestEnv::new();
    let crs = [crs_on(&env, &db.url(), &[]), crs_on(&env, &db.url(), &[])];
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..12 {
        if i == 5 {
            db.kill9();
        }
        if i == 8 {
            db.launch();
        }
        let name = format!("reg{i}");
        let out = crs[i % 2].try_register(&env, &name, PW);
        if out.status.success() {
            acked.push(name);
        } else {
            refused += 1;
        }
    }
    assert!(
        refused > 0,
        "registrations while the database was down fail"
    );
    // After the restart both serve again without being restarted.
    for (n, c) in crs.iter().enumerate() {
        let name = format!("after{n}");
        wait_until("a registration after the restart", WAIT, || {
            c.try_register(&env, &name, PW).status.success()
        });
        acked.push(name);
    }
    for c in &crs {
        let listed = c.op_ok(&["user", "list"]);
        for n in &acked {
            assert!(
                listed.lines().any(|l| l == n),
                "acknowledged {n} lost: {listed}"
            );
        }
        let log = c.proc.log_text();
        assert!(log.contains("lost a connection to the database"), "{log}");
        assert!(log.contains("reconnected to the database"), "{log}");
    }
}

/// An MS killed with SIGKILL is reaped by whichever instance notices first,
/// and a buddy on the other MS, attached to the other instance, hears that
/// its user went offline.
#[test]
fn a_dead_ms_is_reaped_across_instances() {
    let db = pg::PgServer::start();
    let env = TestEnv::new();
    let conf = env.path().join("crs.toml");
    std::fs::write(&conf, "heartbeat_timeout_secs = 3\n").expect("config");
    let conf = conf.to_string_lossy().into_owned();
    let a = crs_on(&env, &db.url(), &["-c", &conf]);
    let b = crs_on(&env, &db.url(), &["-c", &conf]);
    let (aa, ba) = (a.addr_str(), b.addr_str());
    let mut ms1 = ms_on(&env, &aa, &["--heartbeat-interval", "0.5"]);
    let _ms2 = ms_on(&env, &ba, &["--heartbeat-interval", "0.5"]);
    a.register(&env, "ann", PW);
    a.register(&env, "ben", PW);
    let ann = login(&env, &aa, "ann");
    let ben = login(&env, &ba, "ben");
    b.wait_ms_list("one user on each MS", |l| {
        l.len() == 2 && l.iter().all(|(_, load)| *load == 1)
    });
    common::befriend(&ann, "ann", &ben, "ben");
    // ann and ben are on different MSs: kill ms1 (attached to A), and the
    // one on ms2 (attached to B) hears the other go.
    let (gone, stays) = if ms1.log_text().contains("ann logged in") {
        ("ann", &ben)
    } else {
        ("ben", &ann)
    };
    ms1.kill9();
    stays.wait_event("offline", |e| e["user"] == gone);
    b.wait_ms_list("one MS left", |l| l.len() == 1);
    assert!(b.show_user(gone)["online"].is_null());
}
