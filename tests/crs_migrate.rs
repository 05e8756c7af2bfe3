//! `ims-crs migrate`: a sled directory of 10,000 users (two of them
//! registered for real, the rest loaded with contacts and requests) copied
//! into PostgreSQL, verified, then served: the copy has the same CRS key
//! and the real users log in against it. A second migration into the now
//! full database is refused.

mod common;
mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use common::raw::Conn;
use common::{Client, Crs, CrsOpts, Ms, TestEnv, CRS_BIN};
use ims::crs::store::{BuddyRequest, SledStore, User, Verifier};
use ims::wire::Message;

const PW: &str = "correct horse";
const LOADED: usize = 10_000;

fn fingerprint(crs: std::net::SocketAddr) -> String {
    let reply = Conn::connect(crs).call(&Message::request("CRS-KEY"));
    reply
        .header("Fingerprint")
        .expect("a fingerprint")
        .to_owned()
}

fn loaded_user(i: usize) -> User {
    let name = format!("u{i:05}");
    let mut contacts = BTreeSet::new();
    // Pairs (0,1), (2,3), ...: mutual.
    contacts.insert(format!("u{:05}", i ^ 1));
    let requests = if i % 10 == 0 && i + 2 < LOADED {
        vec![BuddyRequest {
            from: format!("u{:05}", i + 2),
            signature: vec![i as u8; 8],
            nonce: vec![1; 12],
            created_unix: 1_700_000_000,
        }]
    } else {
        Vec::new()
    };
    User {
        name,
        verifier: Verifier {
            salt: vec![i as u8; 16],
            iterations: 1000,
            stored_key: vec![2; 32],
            server_key: vec![3; 32],
        },
        profile: BTreeMap::from([("full_name".to_string(), format!("Loaded {i}"))]),
        public_key: vec![0x30, 1, 2],
        wrapped_private_key: vec![4; 40],
        contacts,
        requests,
        created_unix: 1_700_000_000 + i as u64,
        blocked: Default::default(),
        ..Default::default()
    }
}

fn migrate(env: &TestEnv, from: &str, to: &str) -> std::process::Output {
    Command::new(CRS_BIN)
        .args(["migrate", "--from", from, "--to", to, "--ms-key"])
        .arg(&env.key)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run ims-crs migrate")
}

#[test]
fn migrate_ten_thousand_users_then_log_in_against_the_copy() {
    let env = TestEnv::new();
    let data = env.path().join("sled-data");
    let mut old = Crs::start(
        &env,
        CrsOpts {
            data: Some(data.clone()),
            ..Default::default()
        },
    );
    old.register(&env, "alice", PW);
    old.register(&env, "bob", PW);
    let print = fingerprint(old.addr);
    old.kill9();
    {
        let s = SledStore::open(&data.join("db")).expect("open the sled store");
        s.bulk_load((0..LOADED).map(loaded_user)).expect("load");
        s.check_integrity().expect("integrity");
    }

    let db = pg::PgServer::start();
    let out = migrate(&env, &format!("sled:{}", data.display()), &db.url());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "migrate failed: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = (0..LOADED)
        .filter(|i| i % 10 == 0 && i + 2 < LOADED)
        .count();
    assert!(
        said.contains(&format!(
            "migrated {} users, {LOADED} contacts, {requests} requests",
            LOADED + 2
        )) && said.contains("verified")
            && said.contains("CRS key copied"),
        "{said}"
    );

    // The copy serves: same key, the real users log in, records intact.
    let new = Crs::start(
        &env,
        CrsOpts {
            args: vec!["--store".into(), db.url()],
            ..Default::default()
        },
    );
    assert_eq!(
        fingerprint(new.addr),
        print,
        "the CRS key moved with the data"
    );
    let _ms = Ms::start(&env, new.addr, &env.key);
    let alice = Client::start(&env, new.addr, "alice", PW);
    alice.send("/login alice");
    alice.wait_event("logged-in", |e| e["user"] == "alice");
    let bob = Client::start(&env, new.addr, "bob", PW);
    bob.send("/login bob");
    bob.wait_event("logged-in", |e| e["user"] == "bob");
    let shown = new.show_user("u00042");
    assert_eq!(shown["contacts"], serde_json::json!(["u00043"]), "{shown}");
    let shown = new.show_user("u00040");
    assert_eq!(
        shown["requests_from"],
        serde_json::json!(["u00042"]),
        "{shown}"
    );

    // Into a database that is not empty: refused, nothing changed.
    let again = migrate(&env, &format!("sled:{}", data.display()), &db.url());
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds"), "{err}");
}
