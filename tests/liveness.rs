//! Liveness from the held connection between a client and its MS: a
//! killed client is offline for its buddies at once and can log in again
//! at once; a frozen one is offline within the keepalive limit; a client
//! whose listener nobody can reach still hears everything; silent
//! connections to a client's listener change nothing; and nothing tells a
//! stranger whether a user is online.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ims::wire::Message;

const PW: &str = "correct horse";

/// How soon buddies must see a killed client go offline.
const AT_ONCE: Duration = Duration::from_secs(2);
/// The default keepalive limit a frozen client must be offline within.
const KEEPALIVE_LIMIT: Duration = Duration::from_secs(30);

fn login_with(c: &Cluster, user: &str, args: &[&str]) -> Client {
    let cl = Client::start_with(&c.env, c.crs.addr, user, PW, args);
    cl.send(&format!("/login {user}"));
    cl.wait_event("logged-in", |e| e["user"] == user);
    cl
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn a_killed_client_is_offline_at_once_and_logs_in_again_at_once() {
    let c = Cluster::start(2);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let mut bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");

    let killed = Instant::now();
    bob.kill9();
    alice.wait_for(
        "bob offline",
        |e| e["event"] == "offline" && e["user"] == "bob",
        AT_ONCE,
    );
    eprintln!("bob seen offline {:?} after kill -9", killed.elapsed());

    // His old login is gone: the first new attempt succeeds.
    let bob2 = c.client("bob2", PW);
    bob2.send("/login bob");
    let outcome = bob2.wait_outcome("login");
    assert_eq!(outcome["event"], "logged-in", "{outcome}");
    alice.wait_event("online", |e| e["user"] == "bob");
}

#[test]
fn a_frozen_client_is_offline_within_the_keepalive_limit() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");

    // SIGSTOP: the connection stays open but nothing answers on it.
    signal(bob.pid(), "-STOP");
    let frozen = Instant::now();
    let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        alice.wait_for(
            "bob offline",
            |e| e["event"] == "offline" && e["user"] == "bob",
            KEEPALIVE_LIMIT,
        )
    }));
    signal(bob.pid(), "-CONT");
    seen.unwrap_or_else(|e| std::panic::resume_unwind(e));
    eprintln!(
        "frozen bob seen offline {:?} after SIGSTOP",
        frozen.elapsed()
    );
    // Woken up, bob learns that his login has ended.
    bob.wait_event("logged-out", |e| e["user"] == "bob");
}

#[test]
fn a_client_whose_listener_nobody_can_reach_still_hears_everything() {
    let c = Cluster::start(2);
    c.register("alice", PW);
    c.register("bob", PW);
    // A port where nothing listens, told to the servers as bob's.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let closed = closed.to_string();
    let bob = login_with(
        &c,
        "bob",
        &["--listen", "127.0.0.2:0", "--advertise-port", &closed],
    );
    let alice = c.login("alice", PW);

    // A buddy request, its acceptance, presence both ways.
    alice.send("/add bob");
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    bob.wait_event("buddy-added", |e| {
        e["user"] == "alice" && e["online"] == true
    });
    alice.wait_event("buddy-added", |e| e["user"] == "bob" && e["online"] == true);
    alice.send("/logout");
    bob.wait_event("offline", |e| e["user"] == "alice");
    alice.send("/login alice");
    bob.wait_event("online", |e| e["user"] == "alice");
    // A denied request is a notice pushed to the asker.
    c.register("carol", PW);
    let carol = c.login("carol", PW);
    bob.send("/add carol");
    carol.wait_event("request", |e| e["from"] == "bob");
    carol.send("/deny bob");
    bob.wait_event("denied", |e| e["by"] == "carol");
}

#[test]
fn silent_connections_to_a_listener_change_nothing() {
    let c = Cluster::start(1);
    for u in ["alice", "bob"] {
        c.register(u, PW);
    }
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    let target: SocketAddr = alice.listen_addr();

    // Fifty silent connections held to alice's listener for a minute (any
    // the listener closes at its deadline are opened again), while bob
    // logs out and in.
    let end = Instant::now() + Duration::from_secs(60);
    let mut silent: Vec<TcpStream> = (0..50)
        .map(|_| TcpStream::connect(target).unwrap())
        .collect();
    let mut rounds = 0;
    while Instant::now() < end {
        bob.send("/logout");
        bob.wait_event("logged-out", |e| e["user"] == "bob");
        alice.wait_event("offline", |e| e["user"] == "bob");
        bob.send("/login bob");
        bob.wait_event("logged-in", |e| e["user"] == "bob");
        alice.wait_event("online", |e| e["user"] == "bob");
        rounds += 1;
        // Replace the connections the listener closed.
        for s in &mut silent {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 64];
            let closed = !matches!(s.peek(&mut b),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            if closed {
                *s = TcpStream::connect(target).unwrap();
            } else {
                s.set_nonblocking(false).unwrap();
            }
        }
        thread::sleep(Duration::from_secs(2));
    }
    assert!(rounds >= 5, "only {rounds} rounds in a minute");
    assert!(
        !alice.saw(|e| e["event"] == "logged-out"),
        "alice was logged out"
    );
    // Still logged in, still hearing presence.
    bob.send("/logout");
    alice.wait_event("offline", |e| e["user"] == "bob");
}

#[test]
fn nothing_tells_a_stranger_whether_a_user_is_online() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let ms = c.ms[0].addr;

    // Junk proofs for alice (online) and bob (offline): the same code,
    // reason and refusal token.
    let online = raw::login(ms, "alice", "junk password", 40_000).reply;
    let offline = raw::login(ms, "bob", "junk password", 40_000).reply;
    assert_eq!(raw::code(&online), 401, "{online:?}");
    assert_eq!(online.start, offline.start, "{online:?} / {offline:?}");
    assert_eq!(online.header("Refusal"), offline.header("Refusal"));
    // The junk proof took no lock: bob logs in at once.
    let bob = c.login("bob", PW);
    drop(bob);

    // alice's listener answers strangers the same whoever they ask about.
    let ask = |user: &str| {
        raw::Conn::connect(alice.listen_addr())
            .call(&Message::request("PROBE").with_header("User", user))
    };
    let (me, other) = (ask("alice"), ask("nobody"));
    assert!(!me.is_success(), "{me:?}");
    assert_eq!(me.start, other.start);
    assert_eq!(me.headers, other.headers);
}
