//! Failures survived with nothing lost: dead clients, MSs and CRSs noticed
//! and healed, users never stuck online or locked out, acknowledged
//! registrations never lost to kill -9, and listeners that slow or hostile
//! peers cannot starve.

mod common;

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ims::client::account::{register, NewAccount};
use ims::crypto::KdfPolicy;
use ims::proto::crs::ClientRequest;
use ims::wire::Message;
use rand::{rngs::StdRng, Rng, SeedableRng};

const PW: &str = "correct horse";

/// A cluster whose CRS reads `crs_config` and whose MSs get `ms_args`.
fn cluster_with(n_ms: usize, crs_config: &str, ms_args: &[&str]) -> Cluster {
    let env = TestEnv::new();
    let cfg = env.path().join("crs.toml");
    fs::write(&cfg, crs_config).unwrap();
    let crs = Crs::start(
        &env,
        CrsOpts {
            args: vec!["-c".into(), cfg.to_str().unwrap().into()],
            ..Default::default()
        },
    );
    let ms = (0..n_ms)
        .map(|_| Ms::try_start(&env, crs.addr, &env.key, ms_args).expect("MS starts"))
        .collect();
    Cluster { env, crs, ms }
}

#[test]
fn a_killed_client_goes_offline_and_its_user_logs_in_again_at_once() {
    let c = cluster_with(1, "", &["--client-timeout", "2"]);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let mut bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");

    // Killed, and back at once: the new login takes over from the dead one.
    bob.kill9();
    let t = Instant::now();
    let mut bob = c.login("bob", PW);
    println!(
        "a killed client's user logged in again after {:?}",
        t.elapsed()
    );
    alice.wait_event("offline", |e| e["user"] == "bob");
    alice.wait_event("online", |e| e["user"] == "bob");
    alice.send("/msg bob welcome back");
    bob.wait_event("message", |e| e["text"] == "welcome back");

    // Killed for good: its MS notices and its buddies see it go.
    bob.kill9();
    let t = Instant::now();
    alice.wait_for(
        "bob offline",
        |e| e["event"] == "offline" && e["user"] == "bob",
        Duration::from_secs(30),
    );
    println!(
        "buddies saw a killed client offline after {:?}",
        t.elapsed()
    );
    assert!(c.crs.show_user("bob")["online"].is_null());
}

#[test]
fn a_killed_ms_takes_its_users_offline_and_they_log_in_elsewhere() {
    let mut c = cluster_with(
        2,
        "heartbeat_timeout_secs = 3\n",
        &["--heartbeat-interval", "0.5"],
    );
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    let bobs =
        c.ms.iter()
            .position(|m| m.log_text().contains("bob logged in"))
            .expect("bob's MS");
    let alices =
        c.ms.iter()
            .position(|m| m.log_text().contains("alice logged in"))
            .unwrap();
    assert_ne!(bobs, alices, "logins were not spread over the MSs");
    c.ms[bobs].kill9();
    let t = Instant::now();
    alice.wait_for(
        "bob offline",
        |e| e["event"] == "offline" && e["user"] == "bob",
        Duration::from_secs(30),
    );
    println!(
        "buddies saw users of a killed MS offline after {:?}",
        t.elapsed()
    );
    // The same client logs in again: it tries the MS of its last login
    // first (dead now), then asks the CRS for another.
    bob.wait_for(
        "bob logged out",
        |e| e["event"] == "logged-out",
        Duration::from_secs(30),
    );
    let t = Instant::now();
    bob.send("/login bob");
    bob.wait_event("logged-in", |e| e["user"] == "bob");
    println!(
        "a user of a killed MS logged in again after {:?}",
        t.elapsed()
    );
    assert!(c.ms[alices].log_text().contains("bob logged in"));
    alice.wait_event("online", |e| e["user"] == "bob");
    bob.send("/msg alice back via the other MS");
    alice.wait_event("message", |e| e["text"] == "back via the other MS");
    let list = c.crs.wait_ms_list("the dead MS gone", |l| l.len() == 1);
    assert_eq!(list.len(), 1);
}

#[test]
fn a_restarted_crs_gets_its_online_users_back_and_locks_nobody_out() {
    let mut c = cluster_with(2, "", &[]);
    for u in ["alice", "bob", "carol"] {
        c.register(u, PW);
    }
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    // Kill it in the middle of a login.
    let carol = c.client("carol", PW);
    carol.send("/login carol");
    c.crs.restart(&c.env);
    // The MSs re-enroll by themselves and tell it who is online.
    let end = Instant::now() + Duration::from_secs(30);
    while c.crs.show_user("alice")["online"].is_null() || c.crs.show_user("bob")["online"].is_null()
    {
        assert!(Instant::now() < end, "the MSs did not restore their users");
        thread::sleep(Duration::from_millis(200));
    }
    // Nothing acknowledged was lost.
    let buddies = c.crs.show_user("alice")["contacts"].clone();
    assert_eq!(buddies, serde_json::json!(["bob"]));
    // carol's interrupted login left no lock behind.
    let outcome = carol.wait_outcome("login");
    if outcome["event"] == "error" {
        carol.send("/login carol");
        carol.wait_event("logged-in", |e| e["user"] == "carol");
    }
    // Presence works again.
    bob.send("/logout");
    alice.wait_event("offline", |e| e["user"] == "bob");
    bob.send("/login bob");
    alice.wait_event("online", |e| e["user"] == "bob");
}

#[test]
fn a_restarted_ms_makes_its_clients_log_in_again() {
    let mut c = cluster_with(1, "", &[]);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    let addr = c.ms[0].addr.to_string();
    c.ms[0].kill9();
    let ms = (0..40)
        .find_map(|_| {
            Ms::try_start(&c.env, c.crs.addr, &c.env.key, &["--listen", &addr])
                .map_err(|_| thread::sleep(Duration::from_millis(250)))
                .ok()
        })
        .expect("the MS restarts on its port");
    c.ms[0] = ms;
    // Keepalives find the login gone: the client says so.
    let e = alice.wait_for(
        "logged-out",
        |e| e["event"] == "logged-out",
        Duration::from_secs(30),
    );
    assert_eq!(e["user"], "alice");
    assert!(alice.saw(|e| e["event"] == "notice" && field(e, "text").contains("log in again")));
    alice.send("/login alice");
    alice.wait_event("logged-in", |e| e["user"] == "alice");
    bob.wait_for(
        "bob logged out too",
        |e| e["event"] == "logged-out",
        Duration::from_secs(30),
    );
    bob.send("/login bob");
    bob.wait_event("logged-in", |e| e["user"] == "bob");
    // Whichever logged in first, each sees the other online.
    let end = Instant::now() + WAIT;
    loop {
        alice.send("/buddies");
        let b = alice.wait_event("buddies", |_| true);
        if b["buddies"].as_array().map(Vec::len) == Some(1)
            && b["buddies"][0]["user"] == "bob"
            && b["buddies"][0]["online"] == true
        {
            break;
        }
        assert!(
            Instant::now() < end,
            "alice never saw bob online again: {b}\nMS log:\n{}\nCRS log:\n{}\nbob log:\n{}",
            c.ms[0].log_text(),
            c.crs.proc.log_text(),
            bob.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Registers users one by one while the CRS is killed at random moments;
/// every acknowledged registration must survive, the database must always
/// reopen, and nobody may be left locked. `IMS_SOAK_CYCLES` sets the
/// number of kills (10 here; `make soak` runs 100).
#[test]
fn acknowledged_registrations_survive_kill_9() {
    let cycles: usize = std::env::var("IMS_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let env = TestEnv::new();
    let mut crs = Crs::start(&env, CrsOpts::default());
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut rng = StdRng::seed_from_u64(7);
    let mut next = 0usize;
    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (stop, acked, addr) = (stop.clone(), acked.clone(), crs.addr_str());
            let first = next;
            thread::spawn(move || {
                let mut i = first;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("u{i}");
                    let r = register(&NewAccount {
                        crs: &addr,
                        user: &name,
                        password: PW,
                        iterations: ITERATIONS,
                        policy: KdfPolicy::Insecure,
                        rsa_bits: 1024,
                        crs_fingerprint: None,
                        profile: Default::default(),
                        timeout: Duration::from_secs(2),
                    });
                    match r {
                        Ok(_) => acked.lock().unwrap().push(name),
                        Err(_) => return i,
                    }
                    i += 1;
                }
                i
            })
        };
        thread::sleep(Duration::from_millis(rng.gen_range(30..400)));
        crs.restart(&env);
        stop.store(true, Ordering::Relaxed);
        next = writer.join().unwrap() + 1;
        assert!(
            crs.proc.is_running(),
            "cycle {cycle}: the CRS did not reopen its database"
        );
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= cycles,
        "too few registrations to mean anything: {}",
        acked.len()
    );
    let listed = crs.op_ok(&["user", "list"]);
    let listed: std::collections::HashSet<&str> = listed.lines().collect();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|u| !listed.contains(u.as_str()))
        .collect();
    println!(
        "{cycles} kills, {} acknowledged registrations, {} lost",
        acked.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    // Nobody is left locked: the last acknowledged user logs in.
    let _ms = Ms::start(&env, crs.addr, &env.key);
    let last = acked.last().unwrap();
    let cl = Client::start(&env, crs.addr, last, PW);
    cl.send(&format!("/login {last}"));
    cl.wait_event("logged-in", |e| e["user"] == last.as_str());
}

/// Opens `silent` connections that send nothing and `trickling` ones that
/// send a byte every 300 ms, to `addr`.
fn slowloris(
    addr: std::net::SocketAddr,
    silent: usize,
    trickling: usize,
) -> (Vec<TcpStream>, Arc<AtomicBool>) {
    let mut held = Vec::new();
    for _ in 0..silent {
        held.push(TcpStream::connect(addr).unwrap());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for _ in 0..trickling {
        let mut s = TcpStream::connect(addr).unwrap();
        let stop = stop.clone();
        thread::spawn(move || {
            for b in b"LOCATE\r\nX-Slow: ".iter().cycle() {
                if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(300));
            }
        });
    }
    (held, stop)
}

/// A real request gets its answer while the listener is under attack.
fn answered_within(addr: std::net::SocketAddr, m: &Message, bound: Duration) -> Duration {
    let t = Instant::now();
    let mut conn = raw::Conn::connect(addr);
    let reply = conn.call(m);
    let took = t.elapsed();
    assert!(reply.code().is_some(), "no reply: {reply:?}");
    assert!(took < bound, "the answer took {took:?} (bound {bound:?})");
    took
}

#[test]
fn slow_peers_cannot_starve_any_listener() {
    const DEADLINE: &str = "1";
    // The CRS keeps a worker per link an MS holds open (up to the MS's
    // workers + 3), so it has more workers than the MS and the client.
    let pool = format!("[pool]\nworkers = 16\nmessage_deadline_secs = {DEADLINE}\n");
    let c = cluster_with(
        1,
        &pool,
        &["--workers", "4", "--message-deadline", DEADLINE],
    );
    c.register("alice", PW);
    let client_cfg = c.env.path().join("client.toml");
    fs::write(&client_cfg, pool.replace("16", "4")).unwrap();
    let alice = Client::start_with(
        &c.env,
        c.crs.addr,
        "alice",
        PW,
        &["-c", client_cfg.to_str().unwrap()],
    );
    alice.send("/login alice");
    alice.wait_event("logged-in", |_| true);
    let alice_addr = alice.listen_addr();
    let bound = Duration::from_secs(8);
    let crs_took = {
        let _attack = slowloris(c.crs.addr, 12, 8);
        answered_within(c.crs.addr, &ClientRequest::Locate.to_message(), bound)
    };
    let ms_took = {
        let _attack = slowloris(c.ms[0].addr, 6, 4);
        let hello = ims::proto::ms::MsRequest::LoginHello {
            user: "alice".into(),
            client_nonce: vec![1; 24],
        };
        answered_within(c.ms[0].addr, &hello.to_message(), bound)
    };
    let client_took = {
        let _attack = slowloris(alice_addr, 6, 4);
        answered_within(
            alice_addr,
            &Message::request("PROBE").with_header("User", "alice"),
            bound,
        )
    };
    println!("under slowloris: CRS answered in {crs_took:?}, MS in {ms_took:?}, client in {client_took:?}");
    // Still logged in and answering afterwards.
    alice.send("/buddies");
    alice.wait_event("buddies", |_| true);
}

#[test]
fn garbage_half_closes_and_lying_lengths_get_an_error_or_a_close_on_every_listener() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    let alice = c.login("alice", PW);
    let alice_addr = alice.listen_addr();
    let abuse: Vec<Vec<u8>> = vec![
        b"\x00\x01\x02\xff garbage\r\n\r\n".to_vec(),
        b"LOCATE\r\nContent-Length: 99999999999999\r\n\r\n".to_vec(),
        b"LOCATE\r\nContent-Length: 5\r\n\r\nab".to_vec(),
        [
            b"LOCATE\r\n".as_slice(),
            &b"X-Flood: a\r\n".repeat(500),
            b"\r\n",
        ]
        .concat(),
        vec![b'A'; 100_000],
        b"FROBNICATE\r\nContent-Length: 0\r\n\r\n\r\n".to_vec(),
    ];
    let valid: [(std::net::SocketAddr, Message); 3] = [
        (c.crs.addr, ClientRequest::Locate.to_message()),
        (
            c.ms[0].addr,
            ims::proto::ms::MsRequest::LoginHello {
                user: "alice".into(),
                client_nonce: vec![2; 24],
            }
            .to_message(),
        ),
        (
            alice_addr,
            Message::request("PROBE").with_header("User", "alice"),
        ),
    ];
    for (addr, good) in &valid {
        for bytes in &abuse {
            let mut conn = raw::Conn::connect(*addr);
            conn.write_raw(bytes);
            // Half-close: no more from us; the server must still answer or close.
            conn.reader
                .get_ref()
                .shutdown(std::net::Shutdown::Write)
                .ok();
            if let Some(reply) = conn.read() {
                let code = reply.code().unwrap_or(0);
                assert!(
                    (400..500).contains(&code),
                    "{addr}: {code} to {:?}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
                );
            }
            let reply = raw::Conn::connect(*addr).call(good);
            assert!(reply.code().is_some(), "{addr} stopped answering");
        }
    }
}

#[test]
fn wrong_passwords_slow_their_source_down() {
    let c = Cluster::start(1);
    c.register("gina", PW);
    let guesser = c.client("gina", "not her password");
    let mut refusals = Vec::new();
    for _ in 0..5 {
        guesser.send("/login gina");
        refusals.push(guesser.wait_error("login"));
    }
    assert!(
        refusals[..3]
            .iter()
            .all(|r| r.contains("wrong name or password")),
        "{refusals:?}"
    );
    assert!(
        refusals[3..]
            .iter()
            .any(|r| r.contains("too many wrong passwords")),
        "no delay after repeated wrong passwords: {refusals:?}"
    );
    // Once the delay has passed, the right password works from there too.
    thread::sleep(Duration::from_secs(3));
    let gina = c.client("gina", PW);
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        gina.send("/login gina");
        let e = gina.wait_outcome("login");
        if e["event"] == "logged-in" {
            break;
        }
        assert!(field(&e, "reason").contains("too many"), "{e}");
        assert!(Instant::now() < end, "never let in again");
        thread::sleep(Duration::from_secs(1));
    }
}
