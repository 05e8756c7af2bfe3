//! Tests of the CRS store (`ims::crs::store`): the sled and PostgreSQL
//! stores against the in-memory model, persistence across reopen and kill
//! -9, atomicity under concurrency, name rules and every error variant, and
//! the PostgreSQL schema's versioning.
//!
//! The crash test re-executes this test binary as the writer child: with
//! `IMS_STORE_CRASH_DIR` (sled) or `IMS_STORE_CRASH_PG` (a database URL)
//! set, the otherwise empty test `crash_writer_child` runs the writer loop.
//! The PostgreSQL tests start their own server (see `pg/mod.rs`).
//!
//! The sled store is also tested behind its read cache (`CachedStore`, as
//! the CRS uses it): the same model, semantics, reopen and kill tests, plus
//! reads after every write and readers racing writers.

mod pg;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::thread;

use ims::crs::store::{
    canonical, valid_username, BuddyRequest, CachedStore, ContactView, MemStore, PgStore,
    SearchHit, SledStore, Store, StoreError, User, Verifier,
};
use ims::proto::status::Status;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const NAMES: &[&str] = &[
    "alice", "bob", "carol", "dave", "eve", "frank", "grace", "heidi", "ivan", "judy", "a.b", "x-1",
];
const VALUES: &[&str] = &[
    "Alice Smith",
    "ACME Corp",
    "bob@example.com",
    "Grace Hopper",
    "Zoë Ünïcode",
    "",
    "eve.online",
];
const NEEDLES: &[&str] = &[
    "a", "al", "acme", "SMITH", "", "zz", "ÜNÏ", "bob", "e", "x-", "corp",
];

fn verifier(seed: u8) -> Verifier {
    Verifier {
        salt: vec![seed; 16],
        iterations: 4096 + u32::from(seed),
        stored_key: vec![seed ^ 0x55; 32],
        server_key: vec![seed ^ 0xaa; 32],
    }
}

fn user(name: &str, seed: u8) -> User {
    let mut profile = BTreeMap::new();
    profile.insert("full_name".to_string(), format!("User {name}"));
    profile.insert("company".to_string(), "ACME Corp".to_string());
    User {
        name: name.to_string(),
        verifier: verifier(seed),
        profile,
        public_key: vec![0x30, seed, 1, 2, 3],
        wrapped_private_key: vec![seed; 48],
        contacts: BTreeSet::new(),
        requests: Vec::new(),
        created_unix: 1_700_000_000 + u64::from(seed),
        blocked: BTreeSet::new(),
        ..Default::default()
    }
}

fn request(from: &str, seed: u8) -> BuddyRequest {
    BuddyRequest {
        from: from.to_string(),
        signature: vec![seed; 64],
        nonce: vec![seed ^ 1; 12],
        created_unix: 1_700_000_000 + u64::from(seed),
    }
}

/// Every user record, in name order.
fn snapshot(s: &dyn Store) -> Vec<User> {
    let names = s.list_users(None, usize::MAX).expect("list");
    names
        .iter()
        .map(|n| s.get_user(n).expect("get").expect("listed user exists"))
        .collect()
}

/// Checks contacts are mutual and name existing users, and requests come
/// from existing users.
fn check_consistent(s: &dyn Store) {
    let users = snapshot(s);
    let by_name: BTreeMap<&str, &User> = users.iter().map(|u| (u.name.as_str(), u)).collect();
    for u in &users {
        for c in &u.contacts {
            let other = by_name
                .get(c.as_str())
                .unwrap_or_else(|| panic!("{} has missing contact {c}", u.name));
            assert!(
                other.contacts.contains(&u.name),
                "asymmetric contact {} -> {c}",
                u.name
            );
        }
        let mut froms = BTreeSet::new();
        for r in &u.requests {
            assert!(by_name.contains_key(r.from.as_str()), "request from ghost");
            assert!(froms.insert(&r.from), "two requests from {}", r.from);
            assert!(!u.contacts.contains(&r.from), "request from a buddy");
        }
    }
}

/// A name from the pool in random case, or occasionally an invalid one.
fn pick_name(rng: &mut StdRng) -> String {
    if rng.gen_ratio(1, 40) {
        return ["", "bad name", "ünï", &"x".repeat(33)][rng.gen_range(0..4)].to_string();
    }
    let n = NAMES[rng.gen_range(0..NAMES.len())];
    if rng.gen_ratio(1, 4) {
        n.to_uppercase()
    } else {
        n.to_string()
    }
}

fn pick_profile(rng: &mut StdRng) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    for key in ["full_name", "email", "company"] {
        if rng.gen_bool(0.6) {
            p.insert(
                key.to_string(),
                VALUES[rng.gen_range(0..VALUES.len())].to_string(),
            );
        }
    }
    p
}

/// Applies one random operation to `s`, returning its result rendered as
/// text (every result type is `Debug`), so two stores can be compared.
fn apply(s: &dyn Store, op: u32, rng: &mut StdRng) -> String {
    let seed: u8 = rng.gen();
    match op {
        0..=14 => {
            let mut u = user(&pick_name(rng), seed);
            u.profile = pick_profile(rng);
            // Junk a new record must not keep.
            if rng.gen_ratio(1, 5) {
                u.contacts.insert("bob".into());
                u.requests.push(request("carol", seed));
            }
            format!("{:?}", s.create_user(u))
        }
        15..=17 => format!("{:?}", s.get_user(&pick_name(rng))),
        18..=19 => format!("{:?}", s.get_verifier(&pick_name(rng))),
        20..=24 => format!("{:?}", s.delete_user(&pick_name(rng))),
        25..=27 => {
            let after = if rng.gen_bool(0.5) {
                Some(pick_name(rng))
            } else {
                None
            };
            let limit = rng.gen_range(0..6);
            format!("{:?}", s.list_users(after.as_deref(), limit))
        }
        28..=29 => format!("{:?}", s.user_count()),
        30..=33 => format!(
            "{:?}",
            s.set_credentials(&pick_name(rng), verifier(seed), vec![seed; 8])
        ),
        34..=38 => format!("{:?}", s.set_profile(&pick_name(rng), pick_profile(rng))),
        39..=43 => {
            let needle = NEEDLES[rng.gen_range(0..NEEDLES.len())];
            let limit = rng.gen_range(0..8);
            format!("{:?}", s.search(needle, limit))
        }
        44..=58 => {
            let to = pick_name(rng);
            format!("{:?}", s.add_request(&to, request(&pick_name(rng), seed)))
        }
        59..=62 => format!("{:?}", s.take_requests(&pick_name(rng))),
        63..=67 => {
            let to = pick_name(rng);
            format!("{:?}", s.remove_request(&to, &pick_name(rng)))
        }
        68..=77 => {
            let a = pick_name(rng);
            format!("{:?}", s.make_buddies(&a, &pick_name(rng)))
        }
        78..=84 => {
            let a = pick_name(rng);
            format!("{:?}", s.remove_buddies(&a, &pick_name(rng)))
        }
        85..=89 => format!("{:?}", s.contacts(&pick_name(rng))),
        90..=93 => {
            let name = pick_name(rng);
            format!(
                "{:?}",
                s.set_blocked(&name, &pick_name(rng).to_lowercase(), rng.gen_bool(0.7))
            )
        }
        94..=96 => {
            let status = [
                Status::Available,
                Status::Away,
                Status::Busy,
                Status::Invisible,
            ][rng.gen_range(0..4)];
            format!(
                "{:?}",
                s.set_status(
                    &pick_name(rng),
                    status,
                    NEEDLES[rng.gen_range(0..NEEDLES.len())]
                )
            )
        }
        _ => {
            // How some users show to one of them: what a login reads.
            let viewer = pick_name(rng).to_lowercase();
            let names: BTreeSet<String> = (0..rng.gen_range(0..6))
                .map(|_| pick_name(rng).to_lowercase())
                .collect();
            format!("{:?}", s.contact_views(&viewer, &names))
        }
    }
}

/// A durable store gives exactly the model's answers on a seeded random
/// sequence of operations, and ends in exactly the model's state.
/// `integrity` is the store's own full check.
fn check_model(store: &dyn Store, integrity: &dyn Fn() -> Result<(), StoreError>) {
    check_model_probing(store, integrity, false)
}

/// Everything a cache keeps of every name of the pool (and what the
/// store says of how each shows to each), rendered as text.
fn probe_all(s: &dyn Store) -> String {
    let all: BTreeSet<String> = NAMES.iter().map(|n| n.to_string()).collect();
    let mut out = String::new();
    for n in NAMES {
        out += &format!(
            "{n}: {:?} {:?} {:?} {:?}\n",
            s.get_verifier(n),
            s.contacts(n),
            s.contact_views(n, &all),
            s.get_user(n),
        );
    }
    out
}

/// [`check_model`]; with `probe`, every name is read after every
/// operation, so that a cache holds everything when the next write comes
/// and must drop what that write changes.
fn check_model_probing(
    store: &dyn Store,
    integrity: &dyn Fn() -> Result<(), StoreError>,
    probe: bool,
) {
    const OPS: usize = 4000;
    let mem = MemStore::new();
    let mut ops = StdRng::seed_from_u64(0x1_5eed);
    for i in 0..OPS {
        let op = ops.gen_range(0..100);
        // Both stores see the same argument stream.
        let arg_seed: u64 = ops.gen();
        let want = apply(&mem, op, &mut StdRng::seed_from_u64(arg_seed));
        let got = apply(store, op, &mut StdRng::seed_from_u64(arg_seed));
        assert_eq!(got, want, "op #{i} (kind {op}) diverged");
        if probe {
            assert_eq!(probe_all(store), probe_all(&mem), "reads after op #{i}");
        }
        if i % 500 == 499 {
            assert_eq!(snapshot(store), snapshot(&mem), "state after op #{i}");
            check_consistent(&mem);
            integrity().expect("integrity");
        }
    }
    let end = snapshot(&mem);
    assert_eq!(snapshot(store), end);
    check_consistent(store);
    integrity().expect("integrity");
    // The sequence must actually have exercised the interesting states.
    assert!(end.iter().any(|u| !u.contacts.is_empty()), "no buddies");
    assert!(end.iter().any(|u| !u.requests.is_empty()), "no requests");
    assert!(end.iter().any(|u| !u.blocked.is_empty()), "no blocks");
    assert!(
        end.iter().any(|u| u.status != Status::Available),
        "no status set"
    );
    // Every user's view of every other, read the cheap way, equals the
    // one made from the whole records.
    let all: BTreeSet<String> = end.iter().map(|u| u.name.clone()).collect();
    for viewer in &end {
        let want: BTreeMap<String, ContactView> = end
            .iter()
            .map(|u| (u.name.clone(), ContactView::of(u, &viewer.name)))
            .collect();
        assert_eq!(
            store.contact_views(&viewer.name, &all).expect("views"),
            want
        );
    }
}

#[test]
fn model_sled_matches_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sled = SledStore::open(dir.path()).expect("open");
    check_model(&sled, &|| sled.check_integrity());
}

#[test]
fn model_cached_sled_matches_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cached = CachedStore::new(SledStore::open(dir.path()).expect("open"));
    check_model_probing(&cached, &|| cached.inner().check_integrity(), true);
    // The reads filled it.
    assert!(cached.cached().0 > 0 && cached.cached().1 > 0, "{cached:?}");
}

/// The same with room for about one user per shard, so that entries are
/// evicted all the time.
#[test]
fn model_cached_sled_evicting_matches_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cached = CachedStore::with_capacity(SledStore::open(dir.path()).expect("open"), 1, 1);
    check_model_probing(&cached, &|| cached.inner().check_integrity(), true);
    let (users, records) = cached.cached();
    assert!(users <= 12 && records <= 12, "{cached:?}");
}

#[test]
fn model_postgres_matches_memory() {
    let server = pg::PgServer::start();
    let store = PgStore::open(&server.url()).expect("open");
    check_model(&store, &|| store.check_integrity());
}

/// Semantics the model test cannot show (it only compares the two stores).
fn check_semantics(s: &dyn Store) {
    for n in ["Alice", "bob", "carol", "dave"] {
        s.create_user(user(n, 1)).expect("create");
    }
    let alice = s.get_user("ALICE").expect("get").expect("alice");
    assert_eq!(alice.name, "alice");
    assert_eq!(alice.verifier, verifier(1));

    // A second request from the same sender replaces the first, at the end.
    s.add_request("alice", request("bob", 1)).expect("req");
    s.add_request("alice", request("Carol", 2)).expect("req");
    s.add_request("alice", request("bob", 3)).expect("req");
    let reqs = s.get_user("alice").expect("get").expect("alice").requests;
    assert_eq!(reqs, vec![request("carol", 2), request("bob", 3)]);

    // make_buddies clears requests in both directions.
    s.add_request("bob", request("alice", 4)).expect("req");
    s.make_buddies("bob", "alice").expect("buddies");
    s.make_buddies("alice", "bob").expect("idempotent");
    assert_eq!(
        s.get_user("alice").expect("get").expect("a").requests,
        vec![request("carol", 2)]
    );
    assert!(s
        .get_user("bob")
        .expect("get")
        .expect("b")
        .requests
        .is_empty());
    assert_eq!(
        s.contacts("alice").expect("c"),
        BTreeSet::from(["bob".to_string()])
    );
    assert_eq!(
        s.add_request("alice", request("bob", 5)),
        Err(StoreError::AlreadyBuddies)
    );

    // remove_request / take_requests.
    s.add_request("dave", request("alice", 6)).expect("req");
    s.add_request("dave", request("carol", 7)).expect("req");
    assert_eq!(s.remove_request("dave", "ALICE"), Ok(true));
    assert_eq!(s.remove_request("dave", "alice"), Ok(false));
    assert_eq!(s.take_requests("dave"), Ok(vec![request("carol", 7)]));
    assert_eq!(s.take_requests("dave"), Ok(vec![]));

    // Deleting carol withdraws her request to alice; deleting bob removes him
    // from alice's contacts.
    s.make_buddies("carol", "dave").expect("buddies");
    s.add_request("bob", request("carol", 8)).expect("req");
    assert_eq!(s.delete_user("Carol"), Ok(true));
    assert_eq!(s.delete_user("carol"), Ok(false));
    assert!(s
        .get_user("alice")
        .expect("get")
        .expect("a")
        .requests
        .is_empty());
    assert!(s
        .get_user("bob")
        .expect("get")
        .expect("b")
        .requests
        .is_empty());
    assert!(s.contacts("dave").expect("c").is_empty());
    assert_eq!(s.delete_user("bob"), Ok(true));
    assert!(s.contacts("alice").expect("c").is_empty());
    // A re-registered name inherits nothing.
    s.create_user(user("carol", 9)).expect("recreate");
    assert_eq!(s.get_user("carol").expect("get"), Some(user("carol", 9)));
    assert_eq!(s.remove_request("alice", "carol"), Ok(false));

    assert_eq!(s.remove_buddies("alice", "dave"), Ok(false));
    s.make_buddies("alice", "dave").expect("buddies");
    assert_eq!(s.remove_buddies("dave", "alice"), Ok(true));
    assert!(s.contacts("alice").expect("c").is_empty());
    assert!(s.contacts("dave").expect("c").is_empty());

    // Credentials and profile.
    s.set_credentials("alice", verifier(42), vec![42; 3])
        .expect("cred");
    let a = s.get_user("alice").expect("get").expect("a");
    assert_eq!(
        (a.verifier, a.wrapped_private_key),
        (verifier(42), vec![42; 3])
    );
    let profile = BTreeMap::from([("email".to_string(), "Alice@Example.com".to_string())]);
    s.set_profile("alice", profile.clone()).expect("profile");

    // Listing, paging and search.
    assert_eq!(s.user_count(), Ok(3));
    assert_eq!(
        s.list_users(None, 2),
        Ok(vec!["alice".into(), "carol".into()])
    );
    assert_eq!(s.list_users(Some("CAROL"), 5), Ok(vec!["dave".into()]));
    assert_eq!(s.list_users(Some("dave"), 5), Ok(vec![]));
    assert_eq!(
        s.search("example.COM", 10),
        Ok(vec![SearchHit {
            name: "alice".into(),
            profile: profile.clone()
        }])
    );
    let names = |hits: Vec<SearchHit>| hits.into_iter().map(|h| h.name).collect::<Vec<_>>();
    assert_eq!(names(s.search("Da", 10).expect("s")), vec!["dave"]);
    // "acme" is in carol's and dave's company; alice's profile was replaced.
    assert_eq!(
        names(s.search("acme", 10).expect("s")),
        vec!["carol", "dave"]
    );
    assert_eq!(names(s.search("acme", 1).expect("s")), vec!["carol"]);
    assert_eq!(names(s.search("", 2).expect("s")), vec!["alice", "carol"]);
    assert!(s.search("nothing-matches", 10).expect("s").is_empty());

    // Blocking: a set per user, kept in the record, changes reported.
    assert_eq!(s.set_blocked("alice", "Dave", true), Ok(true));
    assert_eq!(s.set_blocked("alice", "dave", true), Ok(false));
    assert_eq!(s.set_blocked("alice", "nobody-yet", true), Ok(true));
    let blocked = |s: &dyn Store| s.get_user("alice").expect("get").expect("alice").blocked;
    assert_eq!(
        blocked(s),
        BTreeSet::from(["dave".to_string(), "nobody-yet".to_string()])
    );
    assert_eq!(s.set_blocked("alice", "dave", false), Ok(true));
    assert_eq!(s.set_blocked("alice", "dave", false), Ok(false));
    assert_eq!(blocked(s), BTreeSet::from(["nobody-yet".to_string()]));
    assert_eq!(
        s.set_blocked("alice", "alice", true),
        Err(StoreError::SameUser)
    );
    assert_eq!(
        s.set_blocked("no-such", "alice", true),
        Err(StoreError::NoSuchUser)
    );
    assert_eq!(s.set_blocked("alice", "nobody-yet", false), Ok(true));

    // Status and personal message: kept in the record, any text.
    use ims::proto::status::Status;
    let status = |s: &dyn Store| {
        let u = s.get_user("alice").expect("get").expect("alice");
        (u.status, u.status_message)
    };
    assert_eq!(status(s), (Status::Available, String::new()));
    assert_eq!(
        s.set_status("Alice", Status::Away, "at lunch ☕ 'x' \\"),
        Ok(())
    );
    assert_eq!(status(s), (Status::Away, "at lunch ☕ 'x' \\".to_string()));
    assert_eq!(s.set_status("alice", Status::Invisible, ""), Ok(()));
    assert_eq!(status(s), (Status::Invisible, String::new()));
    assert_eq!(
        s.set_status("no-such", Status::Busy, ""),
        Err(StoreError::NoSuchUser)
    );
}

#[test]
fn semantics_memory() {
    check_semantics(&MemStore::new());
}

#[test]
fn semantics_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = SledStore::open(dir.path()).expect("open");
    check_semantics(&s);
    s.check_integrity().expect("integrity");
}

#[test]
fn semantics_cached_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = CachedStore::new(SledStore::open(dir.path()).expect("open"));
    check_semantics(&s);
    s.inner().check_integrity().expect("integrity");
}

#[test]
fn semantics_postgres() {
    let server = pg::PgServer::start();
    let s = PgStore::open(&server.url()).expect("open");
    check_semantics(&s);
    s.check_integrity().expect("integrity");
}

/// Everything written is there, unchanged, after drop and reopen.
fn check_reopen(open: &dyn Fn() -> Box<dyn Store>, integrity: &dyn Fn() -> Result<(), StoreError>) {
    let before = {
        let s = open();
        for (i, n) in NAMES.iter().enumerate() {
            s.create_user(user(n, i as u8)).expect("create");
        }
        s.make_buddies("alice", "bob").expect("buddies");
        s.make_buddies("alice", "carol").expect("buddies");
        s.add_request("dave", request("eve", 1)).expect("req");
        s.add_request("dave", request("frank", 2)).expect("req");
        s.set_profile("judy", BTreeMap::from([("x".into(), "y".into())]))
            .expect("profile");
        s.delete_user("ivan").expect("delete");
        s.set_blocked("bob", "grace", true).expect("block");
        s.set_status("carol", ims::proto::status::Status::Busy, "deadline")
            .expect("status");
        snapshot(&*s)
    };
    let s = open();
    assert_eq!(snapshot(&*s), before);
    assert_eq!(s.user_count(), Ok(NAMES.len() as u64 - 1));
    // The request index survived too: deleting a sender withdraws its request.
    s.delete_user("eve").expect("delete");
    assert_eq!(
        s.get_user("dave").expect("get").expect("dave").requests,
        vec![request("frank", 2)]
    );
    check_consistent(&*s);
    drop(s);
    integrity().expect("integrity");
}

#[test]
fn reopen_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_reopen(
        &|| Box::new(SledStore::open(dir.path()).expect("open")),
        &|| SledStore::open(dir.path()).expect("open").check_integrity(),
    );
}

#[test]
fn reopen_keeps_everything_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_reopen(
        &|| Box::new(CachedStore::new(SledStore::open(dir.path()).expect("open"))),
        &|| SledStore::open(dir.path()).expect("open").check_integrity(),
    );
}

#[test]
fn reopen_keeps_everything_postgres() {
    let server = pg::PgServer::start();
    let url = server.url();
    check_reopen(&|| Box::new(PgStore::open(&url).expect("open")), &|| {
        PgStore::open(&url).expect("open").check_integrity()
    });
}

const CRASH_DIR_ENV: &str = "IMS_STORE_CRASH_DIR";
const CRASH_PG_ENV: &str = "IMS_STORE_CRASH_PG";
const CRASH_CYCLE_ENV: &str = "IMS_STORE_CRASH_CYCLE";
/// Set (to anything) for the writer child to write through the cache.
const CRASH_CACHED_ENV: &str = "IMS_STORE_CRASH_CACHED";

/// Not a test on its own: the writer child of `kill_and_reopen`, active only
/// when the parent sets `IMS_STORE_CRASH_DIR` or `IMS_STORE_CRASH_PG`.
/// Creates users one by one and befriends each with the previous one,
/// printing an ACK line after each call returns.
#[test]
fn crash_writer_child() {
    let s: Box<dyn Store> = if let Some(dir) = std::env::var_os(CRASH_DIR_ENV) {
        let sled = SledStore::open(Path::new(&dir)).expect("child open");
        if std::env::var_os(CRASH_CACHED_ENV).is_some() {
            Box::new(CachedStore::new(sled))
        } else {
            Box::new(sled)
        }
    } else if let Ok(url) = std::env::var(CRASH_PG_ENV) {
        Box::new(PgStore::open(&url).expect("child open"))
    } else {
        return;
    };
    let cycle: u32 = std::env::var(CRASH_CYCLE_ENV)
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut out = std::io::stdout();
    let mut prev: Option<String> = None;
    // Bounded so an orphaned child cannot run forever.
    for i in 0..2000u32 {
        let name = format!("c{cycle}_{i}");
        s.create_user(user(&name, i as u8)).expect("child create");
        writeln!(out, "ACK user {name}").expect("stdout");
        out.flush().expect("flush");
        if let Some(p) = &prev {
            s.make_buddies(p, &name).expect("child buddies");
            writeln!(out, "ACK buddies {p} {name}").expect("stdout");
            out.flush().expect("flush");
        }
        prev = Some(name);
    }
}

/// kill -9 the writer after a random number of acknowledged writes, reopen,
/// and find every acknowledged write; several cycles on one directory.
#[test]
fn kill_and_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_kill_and_reopen(
        &[(CRASH_DIR_ENV, dir.path().as_os_str().to_owned())],
        &|| {
            let s = SledStore::open(dir.path()).expect("reopen after kill");
            s.check_integrity().expect("integrity after kill");
            Box::new(s)
        },
    );
}

/// The same with the writer, and the reader after the kill, behind the
/// cache.
#[test]
fn kill_and_reopen_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_kill_and_reopen(
        &[
            (CRASH_DIR_ENV, dir.path().as_os_str().to_owned()),
            (CRASH_CACHED_ENV, "1".into()),
        ],
        &|| {
            let s = SledStore::open(dir.path()).expect("reopen after kill");
            s.check_integrity().expect("integrity after kill");
            Box::new(CachedStore::new(s))
        },
    );
}

/// The same against PostgreSQL: the client killed mid-write.
#[test]
fn kill_and_reopen_postgres() {
    let server = pg::PgServer::start();
    let url = server.url();
    check_kill_and_reopen(&[(CRASH_PG_ENV, url.clone().into())], &|| {
        let s = PgStore::open(&url).expect("reopen after kill");
        s.check_integrity().expect("integrity after kill");
        Box::new(s)
    });
}

fn check_kill_and_reopen(env: &[(&str, std::ffi::OsString)], reopen: &dyn Fn() -> Box<dyn Store>) {
    let exe = std::env::current_exe().expect("current_exe");
    let mut rng = StdRng::seed_from_u64(0xdead);
    let mut acked_users: Vec<String> = Vec::new();
    let mut acked_pairs: Vec<(String, String)> = Vec::new();
    for cycle in 0..5u32 {
        let kill_after = rng.gen_range(1..40);
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_writer_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(CRASH_CYCLE_ENV, cycle.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut acks = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("read child");
            // libtest prints "test crash_writer_child ... " without a
            // newline before the test body runs, so look inside the line.
            let Some(at) = line.find("ACK ") else {
                continue;
            };
            let words: Vec<&str> = line[at..].split_whitespace().collect();
            match words.as_slice() {
                ["ACK", "user", n] => acked_users.push(n.to_string()),
                ["ACK", "buddies", a, b] => acked_pairs.push((a.to_string(), b.to_string())),
                _ => continue,
            }
            acks += 1;
            if acks == kill_after {
                break;
            }
        }
        child.kill().expect("kill child");
        child.wait().expect("reap child");
        assert_eq!(acks, kill_after, "child stopped early in cycle {cycle}");

        let s = reopen();
        for n in &acked_users {
            let u = s
                .get_user(n)
                .expect("decodes")
                .unwrap_or_else(|| panic!("acknowledged user {n} lost in cycle {cycle}"));
            let i: u32 = n
                .rsplit('_')
                .next()
                .and_then(|i| i.parse().ok())
                .expect("index");
            assert_eq!(u.verifier, verifier(i as u8));
        }
        for (a, b) in &acked_pairs {
            assert!(s.contacts(a).expect("contacts").contains(b), "lost {a}-{b}");
        }
        check_consistent(&*s);
    }
}

/// Racing registrations of one name: exactly one wins, on both stores.
fn check_create_race(s: Arc<dyn Store>) {
    const THREADS: usize = 8;
    for round in 0..5 {
        let name = format!("racer{round}");
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (s, barrier) = (s.clone(), barrier.clone());
                // Different spellings of the same canonical name.
                let spelled = if t % 2 == 0 {
                    name.clone()
                } else {
                    name.to_uppercase()
                };
                thread::spawn(move || {
                    barrier.wait();
                    s.create_user(user(&spelled, t as u8))
                })
            })
            .collect();
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(results
            .iter()
            .all(|r| matches!(r, Ok(()) | Err(StoreError::NameTaken))));
    }
    assert_eq!(s.user_count(), Ok(5));
}

/// Concurrent befriending, unfriending, requests and deletion on overlapping
/// pairs never leave a one-sided contact.
fn check_buddy_race(s: Arc<dyn Store>, ops_per_thread: usize) {
    const USERS: &[&str] = &["u0", "u1", "u2", "u3", "u4"];
    for n in USERS {
        s.create_user(user(n, 0)).expect("create");
    }
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                for _ in 0..ops_per_thread {
                    let a = USERS[rng.gen_range(0..USERS.len())];
                    let b = USERS[rng.gen_range(0..USERS.len())];
                    // Errors (SameUser, NoSuchUser after a delete, ...) are
                    // expected; only the final state matters.
                    let _ = match rng.gen_range(0..10) {
                        0..=3 => s.make_buddies(a, b).map(|_| true),
                        4..=6 => s.remove_buddies(a, b),
                        7 => s.add_request(a, request(b, 0)).map(|_| true),
                        8 if t == 0 => s.delete_user(a),
                        _ => s.create_user(user(a, 0)).map(|_| true),
                    };
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread");
    }
    check_consistent(&*s);
}

#[test]
fn concurrent_create_memory() {
    check_create_race(Arc::new(MemStore::new()));
}

#[test]
fn concurrent_create_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_create_race(Arc::new(SledStore::open(dir.path()).expect("open")));
}

#[test]
fn concurrent_create_postgres() {
    let server = pg::PgServer::start();
    check_create_race(Arc::new(PgStore::open(&server.url()).expect("open")));
}

#[test]
fn concurrent_create_cached_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_create_race(Arc::new(CachedStore::new(
        SledStore::open(dir.path()).expect("open"),
    )));
}

#[test]
fn concurrent_buddies_cached_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(CachedStore::new(SledStore::open(dir.path()).expect("open")));
    check_buddy_race(s.clone(), 200);
    s.inner().check_integrity().expect("integrity");
    check_cache_agrees(&s, &["u0", "u1", "u2", "u3", "u4"]);
}

#[test]
fn concurrent_buddies_postgres() {
    let server = pg::PgServer::start();
    let s = Arc::new(PgStore::open(&server.url()).expect("open"));
    check_buddy_race(s.clone(), 200);
    s.check_integrity().expect("integrity");
}

#[test]
fn concurrent_buddies_memory() {
    check_buddy_race(Arc::new(MemStore::new()), 2000);
}

#[test]
fn concurrent_buddies_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(SledStore::open(dir.path()).expect("open"));
    check_buddy_race(s.clone(), 200);
    s.check_integrity().expect("integrity");
}

#[test]
fn name_rules() {
    for ok in ["a", "Z", "alice", "Bob_2", "x.y-z", "0", &"n".repeat(32)] {
        assert!(valid_username(ok), "{ok:?} should be valid");
    }
    for bad in ["", " ", "a b", "a/b", "a@b", "é", "tab\t", &"n".repeat(33)] {
        assert!(!valid_username(bad), "{bad:?} should be invalid");
    }
    assert_eq!(canonical("MiXeD.Case-1"), "mixed.case-1");
}

/// Every error variant a caller can provoke, on both stores.
fn check_errors(s: &dyn Store) {
    use StoreError::*;
    s.create_user(user("alice", 1)).expect("create");
    s.create_user(user("bob", 2)).expect("create");

    assert_eq!(s.create_user(user("bad name", 0)), Err(InvalidName));
    assert_eq!(s.create_user(user("", 0)), Err(InvalidName));
    assert_eq!(s.get_user("a b"), Err(InvalidName));
    assert_eq!(s.delete_user("#"), Err(InvalidName));
    assert_eq!(
        s.add_request("alice", request("no way", 0)),
        Err(InvalidName)
    );
    assert_eq!(s.make_buddies("alice", "é"), Err(InvalidName));

    assert_eq!(s.create_user(user("ALICE", 3)), Err(NameTaken));
    assert_eq!(s.get_user("alice").expect("get"), Some(user("alice", 1)));

    assert_eq!(s.get_user("nobody"), Ok(None));
    assert_eq!(s.delete_user("nobody"), Ok(false));
    assert_eq!(
        s.set_credentials("nobody", verifier(0), vec![]),
        Err(NoSuchUser)
    );
    assert_eq!(s.set_profile("nobody", BTreeMap::new()), Err(NoSuchUser));
    assert_eq!(
        s.add_request("nobody", request("alice", 0)),
        Err(NoSuchUser)
    );
    assert_eq!(
        s.add_request("alice", request("nobody", 0)),
        Err(NoSuchUser)
    );
    assert_eq!(s.take_requests("nobody"), Err(NoSuchUser));
    assert_eq!(s.remove_request("nobody", "alice"), Err(NoSuchUser));
    assert_eq!(s.make_buddies("alice", "nobody"), Err(NoSuchUser));
    assert_eq!(s.make_buddies("nobody", "alice"), Err(NoSuchUser));
    assert_eq!(s.remove_buddies("alice", "nobody"), Err(NoSuchUser));
    assert_eq!(s.contacts("nobody"), Err(NoSuchUser));

    assert_eq!(s.make_buddies("alice", "ALICE"), Err(SameUser));
    assert_eq!(s.remove_buddies("bob", "bob"), Err(SameUser));
    assert_eq!(s.add_request("alice", request("Alice", 0)), Err(SameUser));

    s.make_buddies("alice", "bob").expect("buddies");
    assert_eq!(
        s.add_request("bob", request("alice", 0)),
        Err(AlreadyBuddies)
    );
    assert_eq!(
        s.add_request("alice", request("bob", 0)),
        Err(AlreadyBuddies)
    );

    // Failed calls changed nothing.
    assert_eq!(s.user_count(), Ok(2));
    check_consistent(s);
}

#[test]
fn errors_memory() {
    check_errors(&MemStore::new());
}

#[test]
fn errors_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_errors(&SledStore::open(dir.path()).expect("open"));
}

#[test]
fn errors_cached_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    check_errors(&CachedStore::new(
        SledStore::open(dir.path()).expect("open"),
    ));
}

#[test]
fn errors_postgres() {
    let server = pg::PgServer::start();
    check_errors(&PgStore::open(&server.url()).expect("open"));
}

/// The schema is created once, opening again changes nothing, a database
/// of a newer version is refused, a bad record is `Corrupt`, and an
/// unreachable server is `Backend`.
#[test]
fn postgres_schema_versions_and_errors() {
    use ims::crs::store::schema;
    let server = pg::PgServer::start();
    let url = server.url();
    let s = PgStore::open(&url).expect("create");
    s.create_user(user("alice", 1)).expect("create");
    drop(s);
    let s = PgStore::open(&url).expect("reopen migrates nothing");
    assert_eq!(s.user_count(), Ok(1));
    let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let v: i32 = c
        .query_one("SELECT version FROM ims_schema", &[])
        .expect("version")
        .get(0);
    assert_eq!(v, schema::CURRENT);
    let rows = c.query("SELECT * FROM ims_schema", &[]).expect("rows");
    assert_eq!(rows.len(), 1, "one version row");

    // A bad profile is Corrupt, named.
    c.execute(
        "UPDATE users SET profile = '{nope' WHERE name = 'alice'",
        &[],
    )
    .expect("vandalize");
    let e = s.get_user("alice").expect_err("corrupt");
    assert!(
        matches!(e, StoreError::Corrupt(_)) && e.to_string().contains("alice"),
        "{e}"
    );
    assert!(matches!(s.check_integrity(), Err(StoreError::Corrupt(_))));

    c.execute("UPDATE ims_schema SET version = version + 1", &[])
        .expect("bump");
    match PgStore::open(&url) {
        Err(StoreError::Backend(e)) => assert!(e.contains("newer"), "{e}"),
        other => panic!("a newer schema must be refused: {other:?}"),
    }
    assert!(matches!(
        PgStore::open("postgres://nobody@127.0.0.1:1/none"),
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        PgStore::open("postgres://x@host:notaport/db"),
        Err(StoreError::Backend(_))
    ));
}

/// Opens the database without the store, once the dropped store's handle
/// let go of its lock (sled's flusher thread releases it a moment after
/// the drop, later on a busy machine).
fn raw_open(dir: &Path) -> sled::Db {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < end =>
            {
                thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("raw open: {e:?}"),
        }
    }
}

/// Bad bytes on disk are `Corrupt`, never a panic; unusable paths and a
/// second open of a locked store are `Backend`.
#[test]
fn corrupt_and_backend_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = SledStore::open(dir.path()).expect("open");
        s.create_user(user("alice", 1)).expect("create");
        s.create_user(user("bob", 2)).expect("create");
        assert!(matches!(
            SledStore::open(dir.path()),
            Err(StoreError::Backend(_))
        ));
    }
    {
        // Vandalize the records behind the store's back.
        let db = raw_open(dir.path());
        let users = db.open_tree("users").expect("tree");
        users.insert("bob", &b"{not json"[..]).expect("insert");
        let mut carol = serde_json::to_vec(&user("carol", 3)).expect("json");
        carol.truncate(carol.len() / 2);
        users.insert("carol", carol).expect("insert");
        // A valid record under the wrong key.
        users
            .insert("dave", serde_json::to_vec(&user("eve", 4)).expect("json"))
            .expect("insert");
        db.flush().expect("flush");
    }
    let s = SledStore::open(dir.path()).expect("reopen");
    assert_eq!(
        s.get_user("alice").expect("alice ok"),
        Some(user("alice", 1))
    );
    for n in ["bob", "carol", "dave"] {
        let e = s.get_user(n).expect_err("corrupt");
        assert!(matches!(e, StoreError::Corrupt(_)), "{n}: {e:?}");
        assert!(e.to_string().contains(n), "error names the record: {e}");
    }
    assert!(matches!(s.contacts("bob"), Err(StoreError::Corrupt(_))));
    assert!(matches!(
        s.make_buddies("alice", "bob"),
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(s.search("", 10), Err(StoreError::Corrupt(_))));
    assert!(matches!(s.check_integrity(), Err(StoreError::Corrupt(_))));
    assert!(matches!(
        s.delete_user("carol"),
        Err(StoreError::Corrupt(_))
    ));
    // The failed transaction left alice untouched.
    assert_eq!(
        s.get_user("alice").expect("alice ok"),
        Some(user("alice", 1))
    );
    // Listing needs only keys, so it still works.
    assert_eq!(s.user_count(), Ok(4));

    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").expect("write");
    assert!(matches!(
        SledStore::open(&file),
        Err(StoreError::Backend(_))
    ));

    let std_err: &dyn std::error::Error = &StoreError::Corrupt("x".into());
    assert!(std_err.to_string().contains("corrupt"));
}

/// Every read through the cache equals the same read of the store behind
/// it, for every user of `names` (twice: the second time from the cache).
fn check_cache_agrees(s: &CachedStore<SledStore>, names: &[&str]) {
    let all: BTreeSet<String> = names.iter().map(|n| n.to_string()).collect();
    let raw = s.inner();
    for round in 0..2 {
        for n in names {
            assert_eq!(s.get_verifier(n), raw.get_verifier(n), "{n} (#{round})");
            assert_eq!(s.contacts(n), raw.contacts(n), "{n} (#{round})");
            assert_eq!(
                s.contact_views(n, &all),
                raw.contact_views(n, &all),
                "{n} (#{round})"
            );
            assert_eq!(s.status_fields(&all), raw.status_fields(&all), "#{round}");
            assert_eq!(s.get_user(n), raw.get_user(n), "{n} (#{round})");
        }
    }
}

/// A read that was cached, then a write that changes it: the next read
/// sees the write, for every kind of write and every read a cache
/// answers. Run on the model too, so the expectations are the store's.
fn check_reads_follow_writes(s: &dyn Store) {
    let set =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
    let all = set(&["ann", "bob", "cy", "dee"]);
    for (i, n) in ["ann", "bob", "cy", "dee"].iter().enumerate() {
        s.create_user(user(n, i as u8)).expect("create");
    }
    // A registered user's whole record.
    let record = |name: &str| s.get_user(name).expect("get").expect("registered");
    let view = |viewer: &str, of: &str| {
        s.contact_views(viewer, &all)
            .expect("views")
            .remove(of)
            .expect("registered")
    };
    // Status and message.
    assert_eq!(view("bob", "ann").status, Status::Available);
    s.set_status("ann", Status::Busy, "busy!").expect("status");
    let v = view("bob", "ann");
    assert_eq!(
        (v.status, v.status_message.as_str()),
        (Status::Busy, "busy!")
    );
    s.set_status("ANN", Status::Away, "").expect("status");
    let v = view("bob", "ann");
    assert_eq!((v.status, v.status_message.as_str()), (Status::Away, ""));
    assert_eq!(record("ann").status, Status::Away);
    s.set_status("ann", Status::Invisible, "x").expect("status");
    assert_eq!(record("ann").status, Status::Invisible);
    assert_eq!(view("cy", "ann").status, Status::Invisible);

    // Blocking, seen by the blocked viewer only.
    assert!(!view("bob", "ann").blocks_viewer);
    s.set_blocked("ann", "bob", true).expect("block");
    assert!(view("bob", "ann").blocks_viewer);
    assert!(!view("cy", "ann").blocks_viewer);
    assert!(record("ann").blocked.contains("bob"));
    s.set_blocked("ann", "bob", false).expect("unblock");
    assert!(!view("bob", "ann").blocks_viewer);
    assert!(record("ann").blocked.is_empty());

    // Contacts: made, removed, and removed by a deletion.
    assert!(s.contacts("ann").expect("c").is_empty());
    assert!(s.contacts("bob").expect("c").is_empty());
    s.make_buddies("ann", "bob").expect("buddies");
    assert_eq!(s.contacts("ann").expect("c"), set(&["bob"]));
    assert_eq!(s.contacts("bob").expect("c"), set(&["ann"]));
    s.make_buddies("cy", "ann").expect("buddies");
    assert_eq!(s.contacts("ann").expect("c"), set(&["bob", "cy"]));
    assert_eq!(record("cy").contacts, set(&["ann"]));
    assert_eq!(s.remove_buddies("bob", "ann"), Ok(true));
    assert_eq!(s.contacts("ann").expect("c"), set(&["cy"]));
    assert!(s.contacts("bob").expect("c").is_empty());
    assert_eq!(record("ann").contacts, set(&["cy"]));
    assert_eq!(record("bob").contacts, set(&[]));
    assert_eq!(s.delete_user("cy"), Ok(true));
    assert!(s.contacts("ann").expect("c").is_empty());
    assert!(record("ann").contacts.is_empty());
    assert_eq!(s.contacts("cy"), Err(StoreError::NoSuchUser));
    assert_eq!(s.get_verifier("cy"), Ok(None));
    assert_eq!(s.get_user("cy"), Ok(None));
    assert!(!s
        .contact_views("ann", &all)
        .expect("views")
        .contains_key("cy"));

    // A name registered again is the new user.
    s.create_user(user("cy", 77)).expect("recreate");
    assert_eq!(s.get_verifier("cy"), Ok(Some(verifier(77))));
    assert_eq!(s.get_user("cy").expect("get"), Some(user("cy", 77)));
    assert_eq!(view("ann", "cy"), ContactView::default());

    // Credentials.
    assert_eq!(s.get_verifier("dee"), Ok(Some(verifier(3))));
    s.set_credentials("dee", verifier(9), vec![9; 4])
        .expect("cred");
    assert_eq!(s.get_verifier("dee"), Ok(Some(verifier(9))));
    let dee = record("dee");
    assert_eq!(
        (dee.verifier, dee.wrapped_private_key),
        (verifier(9), vec![9; 4])
    );

    // Profile and requests, in the whole record.
    let profile = BTreeMap::from([("email".to_string(), "d@e.e".to_string())]);
    s.set_profile("dee", profile.clone()).expect("profile");
    assert_eq!(record("dee").profile, profile);
    s.add_request("dee", request("bob", 1)).expect("req");
    assert_eq!(record("dee").requests, vec![request("bob", 1)]);
    s.add_request("dee", request("ann", 2)).expect("req");
    assert_eq!(s.remove_request("dee", "bob"), Ok(true));
    assert_eq!(record("dee").requests, vec![request("ann", 2)]);
    assert_eq!(s.take_requests("dee"), Ok(vec![request("ann", 2)]));
    assert!(record("dee").requests.is_empty());
    // Deleting a sender withdraws its request from the recipient's record.
    s.add_request("dee", request("bob", 3)).expect("req");
    assert_eq!(record("dee").requests.len(), 1);
    assert_eq!(s.delete_user("bob"), Ok(true));
    assert!(record("dee").requests.is_empty());
    // Making buddies drops the request between them.
    s.add_request("dee", request("ann", 4)).expect("req");
    assert_eq!(record("dee").requests.len(), 1);
    s.make_buddies("ann", "dee").expect("buddies");
    let dee = record("dee");
    assert!(dee.requests.is_empty());
    assert_eq!(dee.contacts, set(&["ann"]));
}

#[test]
fn reads_follow_writes_memory() {
    check_reads_follow_writes(&MemStore::new());
}

#[test]
fn reads_follow_writes_cached_sled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = CachedStore::new(SledStore::open(dir.path()).expect("open"));
    check_reads_follow_writes(&s);
    check_cache_agrees(&s, &["ann", "bob", "cy", "dee"]);
}

/// Readers racing writers through the cache: once the writers stop, every
/// read through the cache equals the store's own. Several rounds, each
/// ending in that check, so a stale value cached by a reader that read
/// before a write has many chances to be caught.
#[test]
fn cache_readers_race_writers() {
    const USERS: &[&str] = &["w0", "w1", "w2", "w3", "w4", "w5"];
    const ROUNDS: usize = 8;
    const WRITES: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(CachedStore::new(SledStore::open(dir.path()).expect("open")));
    for (i, n) in USERS.iter().enumerate() {
        s.create_user(user(n, i as u8)).expect("create");
    }
    let all: BTreeSet<String> = USERS.iter().map(|n| n.to_string()).collect();
    for round in 0..ROUNDS {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3u64)
            .map(|t| {
                let (s, stop, all) = (s.clone(), stop.clone(), all.clone());
                thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(100 * round as u64 + t);
                    let mut reads = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let n = USERS[rng.gen_range(0..USERS.len())];
                        match rng.gen_range(0..4) {
                            0 => drop(s.contact_views(n, &all).expect("views")),
                            1 => drop(s.contacts(n).expect("contacts")),
                            2 => drop(s.get_verifier(n).expect("verifier")),
                            _ => drop(s.get_user(n).expect("user")),
                        }
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let s = s.clone();
                thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(1000 * round as u64 + t);
                    for _ in 0..WRITES {
                        let a = USERS[rng.gen_range(0..USERS.len())];
                        let b = USERS[rng.gen_range(0..USERS.len())];
                        let seed: u8 = rng.gen();
                        // SameUser for a == b is expected and harmless.
                        let _ = match rng.gen_range(0..6) {
                            0 => s.set_status(a, Status::Busy, &format!("m{seed}")),
                            1 => s.set_status(a, Status::Available, ""),
                            2 => s.set_blocked(a, b, rng.gen()).map(drop),
                            3 => s.make_buddies(a, b),
                            4 => s.remove_buddies(a, b).map(drop),
                            _ => s.set_credentials(a, verifier(seed), vec![seed]),
                        };
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
        assert!(reads > 0, "the readers read");
        check_cache_agrees(&s, USERS);
    }
    s.inner().check_integrity().expect("integrity");
}

/// A store that can hold one read, after it has read, until told to go:
/// to put a whole write between a cache's miss and its insert.
#[derive(Default)]
struct PausingStore {
    inner: MemStore,
    gate: parking_lot::Mutex<Option<Gate>>,
}

struct Gate {
    reached: std::sync::mpsc::Sender<()>,
    go: std::sync::mpsc::Receiver<()>,
}

impl PausingStore {
    /// Holds the next read (its value already read) until `go` is sent;
    /// `reached` is sent when it is held.
    fn arm(&self) -> (std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
        let (reached_tx, reached_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        *self.gate.lock() = Some(Gate {
            reached: reached_tx,
            go: go_rx,
        });
        (reached_rx, go_tx)
    }

    fn read<T>(&self, value: T) -> T {
        let gate = self.gate.lock().take();
        if let Some(gate) = gate {
            gate.reached.send(()).expect("reached");
            gate.go.recv().expect("go");
        }
        value
    }
}

impl ims::crs::store::MailStore for PausingStore {
    fn queue_mail(
        &self,
        mail: ims::crs::store::StoredMail,
        limits: &ims::crs::store::MailLimits,
    ) -> Result<ims::crs::store::Queued, StoreError> {
        self.inner.queue_mail(mail, limits)
    }
    fn has_mail(&self, user: &str) -> Result<bool, StoreError> {
        self.inner.has_mail(user)
    }
    fn mail_for(
        &self,
        user: &str,
        after: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<ims::crs::store::MailEntry>, StoreError> {
        self.inner.mail_for(user, after, max_items, max_bytes)
    }
    fn ack_mail(&self, user: &str, ids: &[String]) -> Result<BTreeSet<String>, StoreError> {
        self.inner.ack_mail(user, ids)
    }
    fn expire_mail(&self, before: u64) -> Result<BTreeSet<String>, StoreError> {
        self.inner.expire_mail(before)
    }
}

impl Store for PausingStore {
    fn create_user(&self, user: User) -> Result<(), StoreError> {
        self.inner.create_user(user)
    }
    fn get_user(&self, name: &str) -> Result<Option<User>, StoreError> {
        self.read(self.inner.get_user(name))
    }
    fn get_verifier(&self, name: &str) -> Result<Option<Verifier>, StoreError> {
        self.read(self.inner.get_verifier(name))
    }
    fn contact_views(
        &self,
        viewer: &str,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, ContactView>, StoreError> {
        self.read(self.inner.contact_views(viewer, names))
    }
    fn status_fields(
        &self,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, ims::crs::store::StatusFields>, StoreError> {
        self.read(self.inner.status_fields(names))
    }
    fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.delete_user(name)
    }
    fn list_users(&self, after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.list_users(after, limit)
    }
    fn user_count(&self) -> Result<u64, StoreError> {
        self.inner.user_count()
    }
    fn set_credentials(
        &self,
        name: &str,
        verifier: Verifier,
        wrapped_private_key: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.inner
            .set_credentials(name, verifier, wrapped_private_key)
    }
    fn set_profile(&self, name: &str, profile: BTreeMap<String, String>) -> Result<(), StoreError> {
        self.inner.set_profile(name, profile)
    }
    fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, StoreError> {
        self.inner.search(text, limit)
    }
    fn add_request(&self, to: &str, req: BuddyRequest) -> Result<(), StoreError> {
        self.inner.add_request(to, req)
    }
    fn take_requests(&self, name: &str) -> Result<Vec<BuddyRequest>, StoreError> {
        self.inner.take_requests(name)
    }
    fn remove_request(&self, to: &str, from: &str) -> Result<bool, StoreError> {
        self.inner.remove_request(to, from)
    }
    fn make_buddies(&self, a: &str, b: &str) -> Result<(), StoreError> {
        self.inner.make_buddies(a, b)
    }
    fn remove_buddies(&self, a: &str, b: &str) -> Result<bool, StoreError> {
        self.inner.remove_buddies(a, b)
    }
    fn contacts(&self, name: &str) -> Result<BTreeSet<String>, StoreError> {
        self.read(self.inner.contacts(name))
    }
    fn set_blocked(&self, name: &str, who: &str, on: bool) -> Result<bool, StoreError> {
        self.inner.set_blocked(name, who, on)
    }
    fn set_status(&self, name: &str, status: Status, message: &str) -> Result<(), StoreError> {
        self.inner.set_status(name, status, message)
    }
}

/// A read that missed the cache and read the store before a write, but
/// comes to cache its value only after the write returned, must not cache
/// it: the next read sees the write. For each read the cache answers and
/// a write that changes it.
#[test]
fn cache_drops_a_read_older_than_a_write() {
    type Read = fn(&dyn Store) -> String;
    type Write = fn(&dyn Store);
    let cases: Vec<(&str, Read, Write)> = vec![
        (
            "status",
            |s| {
                format!(
                    "{:?}",
                    s.contact_views("bob", &BTreeSet::from(["ann".into()]))
                )
            },
            |s| s.set_status("ann", Status::Busy, "later").expect("status"),
        ),
        (
            "blocked",
            |s| {
                format!(
                    "{:?}",
                    s.contact_views("bob", &BTreeSet::from(["ann".into()]))
                )
            },
            |s| assert_eq!(s.set_blocked("ann", "bob", true), Ok(true)),
        ),
        (
            "contacts",
            |s| format!("{:?}", s.contacts("ann")),
            |s| s.make_buddies("bob", "ann").expect("buddies"),
        ),
        (
            "verifier",
            |s| format!("{:?}", s.get_verifier("ann")),
            |s| {
                s.set_credentials("ann", verifier(50), vec![50])
                    .expect("cred")
            },
        ),
        (
            "record",
            |s| format!("{:?}", s.get_user("ann")),
            |s| s.add_request("ann", request("bob", 5)).expect("request"),
        ),
    ];
    for (what, read, write) in cases {
        let s = Arc::new(CachedStore::new(PausingStore::default()));
        s.create_user(user("ann", 1)).expect("create");
        s.create_user(user("bob", 2)).expect("create");
        let (reached, go) = s.inner().arm();
        let reader = {
            let s = s.clone();
            thread::spawn(move || read(&*s))
        };
        reached
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the read is held");
        write(&*s);
        go.send(()).expect("go");
        let old = reader.join().expect("reader");
        let new = read(&*s);
        assert_ne!(old, new, "{what}: the write changed nothing");
        assert_eq!(new, read(s.inner()), "{what}: stale after the write");
        assert_eq!(read(&*s), new, "{what}: and from the cache");
    }
}
