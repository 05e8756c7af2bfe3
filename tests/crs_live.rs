//! The live-state contract (`ims::crs::live`): the same checks on the
//! in-memory state and on PostgreSQL, and for PostgreSQL, two instances on
//! one database sharing it: one sees what the other did, and is woken by
//! `NOTIFY` when the other queues an event.

mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ims::crs::live::{LiveState, LockError, MemLive, Wakeup};
use ims::crs::live_pg::PgLive;
use ims::crs::store::PgStore;
use ims::prethread::Park;
use ims::proto::crs::{EventKind, Presence};

fn presence() -> Presence {
    Presence {
        address: "127.0.0.1:1".parse().expect("address"),
        public_key: vec![1],
    }
}

const LONG: Duration = Duration::from_secs(30);

fn check_contract(l: &dyn LiveState) {
    // Enrollment: the same MS process keeps its id; a restart is a new MS
    // and loses its users.
    let (a, lost) = l.lock().enroll("a:1", 10, "first");
    assert!(lost.is_empty());
    let (b, _) = l.lock().enroll("b:1", 10, "i");
    assert_ne!(a, b);
    assert_eq!(l.lock().enroll("a:1", 20, "first"), (a, vec![]));

    // Leases and online.
    {
        let mut t = l.lock();
        t.lock("joe", a, LONG).expect("lease");
        assert_eq!(t.lock("joe", b, LONG), Err(LockError::LoggingIn));
        assert!(t.holds_lock("joe", a));
        assert!(!t.holds_lock("joe", b));
    }
    let n1 = l.lock().set_online("joe", a, presence());
    assert!(!l.lock().holds_lock("joe", a), "online releases the lease");
    assert_eq!(l.lock().lock("joe", b, LONG), Err(LockError::LoggedIn));
    assert_eq!(l.lock().online("joe").map(|o| o.ms), Some(a));
    assert_eq!(
        l.lock().address("joe"),
        Some("127.0.0.1:1".parse().expect("addr"))
    );
    assert_eq!(l.lock().online_count(), 1);
    // An expired lease is no obstacle; unlock by another MS does nothing.
    l.lock().lock("ann", a, Duration::ZERO).expect("lease");
    l.lock().lock("ann", b, LONG).expect("expired lease taken");
    l.lock().unlock("ann", a);
    assert!(l.lock().holds_lock("ann", b));
    l.lock().unlock("ann", b);
    assert!(!l.lock().holds_lock("ann", b));

    // Load and locate: joe at a (capacity 20), nobody at b (10).
    assert_eq!(l.lock().locate(LONG).as_deref(), Some("b:1"));
    l.lock().set_online("kim", b, presence());
    l.lock().set_online("lou", b, presence());
    assert_eq!(l.lock().locate(LONG).as_deref(), Some("a:1"));
    let asked = ["joe", "kim", "nobody"]
        .map(String::from)
        .into_iter()
        .collect();
    let many = l.lock().online_many(&asked);
    assert_eq!(many.len(), 2, "{many:?}");
    assert_eq!((many["joe"].ms, many["kim"].ms), (a, b));
    let list = l.lock().ms_list();
    let loads: Vec<(u64, u32)> = list.iter().map(|m| (m.id, m.load)).collect();
    assert_eq!(loads, vec![(a, 1), (b, 2)]);
    assert_eq!(
        l.lock().locate(Duration::ZERO),
        None,
        "stale MSs are skipped"
    );

    // Events: numbered, grouped by MS, acknowledged.
    l.lock().notify(
        ["joe", "kim", "nobody"],
        &EventKind::Offline { user: "x".into() },
    );
    l.lock()
        .notify(["joe"], &EventKind::Offline { user: "y".into() });
    let batch = l.lock().events(a, 0).expect("enrolled");
    assert_eq!(batch.first, 1);
    assert_eq!(batch.events.len(), 2);
    assert_eq!(batch.events[0].recipients, vec!["joe".to_string()]);
    let batch = l.lock().events(a, 1).expect("enrolled");
    assert_eq!((batch.first, batch.events.len()), (2, 1));
    assert!(l.lock().events(a, 2).expect("enrolled").events.is_empty());
    assert_eq!(l.lock().events(a, 2).expect("enrolled").first, 3);
    let at_b = l.lock().events(b, 0).expect("enrolled");
    assert_eq!(at_b.events[0].recipients, vec!["kim".to_string()]);
    l.lock().notify_ms(
        a,
        vec!["joe".into()],
        EventKind::Evicted {
            user: "joe".into(),
            login: n1,
        },
    );
    assert_eq!(l.lock().events(a, 2).expect("enrolled").events.len(), 1);

    // Offline, only where the user is.
    assert!(!l.lock().set_offline("joe", Some(b)));
    assert!(l.lock().set_offline("joe", Some(a)));
    assert!(l.lock().online("joe").is_none());
    let n2 = l.lock().set_online("joe", a, presence());
    assert!(n2 > n1, "login numbers grow");

    // A restarted MS loses its users; its old id is dead.
    let (a2, lost) = l.lock().enroll("a:1", 10, "second");
    assert_ne!(a2, a);
    assert_eq!(lost, vec!["joe".to_string()]);
    assert!(l.lock().events(a, 0).is_none());
    assert!(!l.lock().touch(a));
    assert!(l.lock().touch(a2));

    // The reaper takes silent MSs' users offline and frees their leases.
    l.lock().lock("max", b, LONG).expect("lease");
    let mut lost = l.lock().reap(Duration::ZERO);
    lost.sort();
    assert_eq!(lost, vec!["kim".to_string(), "lou".to_string()]);
    assert_eq!(l.lock().online_count(), 0);
    let (c, _) = l.lock().enroll("c:1", 10, "i");
    l.lock().lock("max", c, LONG).expect("freed by the reaper");
    assert!(l.lock().commit_check());
}

/// `commit` of an untouched view succeeds.
trait CommitCheck {
    fn commit_check(self) -> bool;
}

impl CommitCheck for Box<dyn ims::crs::live::LiveTx + '_> {
    fn commit_check(self) -> bool {
        self.commit().is_ok()
    }
}

#[test]
fn contract_memory() {
    check_contract(&MemLive::default());
}

/// In memory, queuing an event wakes the polls of its MS, and only those.
#[test]
fn memory_wakes_only_the_ms_with_events() {
    let wakeup = Arc::new(Wakeup::default());
    let live = MemLive::waking(wakeup.clone());
    let (a, _) = live.lock().enroll("m:1", 10, "i");
    let (b, _) = live.lock().enroll("m:2", 10, "j");
    live.lock().lock("zed", a, LONG).expect("lease");
    live.lock().set_online("zed", a, presence());
    let at_a = wakeup.parking().prepare(a, LONG);
    let at_b = wakeup.parking().prepare(b, LONG);
    live.lock()
        .notify(["zed", "nobody"], &EventKind::Offline { user: "q".into() });
    assert!(wakeup.parking().woken(&at_a), "zed's MS is woken");
    assert!(!wakeup.parking().woken(&at_b), "the other MS sleeps on");
    live.lock()
        .notify_ms(b, vec!["x".into()], EventKind::Offline { user: "q".into() });
    assert!(wakeup.parking().woken(&at_b), "notify_ms wakes its MS");
    // A reaped MS's poll learns at once that it must enroll again.
    let at_a = wakeup.parking().prepare(a, LONG);
    assert!(!wakeup.parking().woken(&at_a));
    live.lock().reap(Duration::ZERO);
    assert!(wakeup.parking().woken(&at_a), "reaping wakes its MS");
}

fn pg_live(url: &str, instance: &str) -> (PgLive, Arc<Wakeup>) {
    let (live, wakeup, _) = pg_live_watched(url, instance);
    (live, wakeup)
}

/// As [`pg_live`], with a park prepared before the listener starts: the
/// listener wakes every poll once it has connected.
fn pg_live_watched(url: &str, instance: &str) -> (PgLive, Arc<Wakeup>, Park) {
    let wakeup = Arc::new(Wakeup::default());
    let connected = wakeup.parking().prepare(0, LONG);
    let live = PgLive::start(url, instance.into(), wakeup.clone()).expect("live state");
    (live, wakeup, connected)
}

#[test]
fn contract_postgres() {
    let server = pg::PgServer::start();
    PgStore::open(&server.url()).expect("schema");
    let (live, _) = pg_live(&server.url(), "dir");
    check_contract(&live);
    assert_eq!(live.shared_instance().as_deref(), Some("dir"));
}

/// Two instances on one database: one state, and a wake-up across.
#[test]
fn two_postgres_instances_share_state_and_wake_each_other() {
    let server = pg::PgServer::start();
    PgStore::open(&server.url()).expect("schema");
    let (one, _) = pg_live(&server.url(), "dir");
    let (two, woken, connected) = pg_live_watched(&server.url(), "dir");
    let (ms, _) = one.lock().enroll("m:1", 10, "i");
    assert_eq!(two.lock().enroll("m:1", 10, "i").0, ms, "the same MS");
    one.lock().lock("zed", ms, LONG).expect("lease");
    assert_eq!(two.lock().lock("zed", ms, LONG), Err(LockError::LoggingIn));
    one.lock().set_online("zed", ms, presence());
    assert_eq!(two.lock().online("zed").map(|o| o.ms), Some(ms));

    // Let the listener connect (it wakes every poll when it does) before
    // looking for its wake-up.
    let deadline = Instant::now() + LONG;
    while !woken.parking().woken(&connected) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mine = woken.parking().prepare(ms, LONG);
    let other = woken.parking().prepare(ms + 1000, LONG);
    one.lock()
        .notify(["zed"], &EventKind::Offline { user: "q".into() });
    while !woken.parking().woken(&mine) && Instant::now() < deadline + LONG {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        woken.parking().woken(&mine),
        "NOTIFY woke the other instance"
    );
    // Only that MS's polls.
    assert!(!woken.parking().woken(&other), "another MS's poll slept on");
    let batch = two.lock().events(ms, 0).expect("enrolled");
    assert_eq!(batch.events.len(), 1);
}

/// Instances starting together on an empty database: the schema is made
/// once, and they all end up with one CRS key and one directory instance.
#[test]
fn instances_starting_together_agree_on_schema_and_key() {
    let server = pg::PgServer::start();
    let url = server.url();
    let ms_key = [7u8; 32];
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let store = PgStore::open(&url).expect("open and migrate");
                let (key, instance) =
                    ims::crs::identity::shared(store.pool(), &ms_key).expect("identity");
                (key.public_key().fingerprint(), instance)
            })
        })
        .collect();
    let seen: Vec<(String, String)> = starts
        .into_iter()
        .map(|t| t.join().expect("start"))
        .collect();
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    // Another MSkey cannot open the key: refused, not replaced.
    let store = PgStore::open(&url).expect("open");
    let e = ims::crs::identity::shared(store.pool(), &[8u8; 32]).expect_err("wrong MSkey");
    assert!(e.contains("MSkey"), "{e}");
}

/// Password attempts are counted for the whole directory: a guesser gains
/// nothing by going through another instance.
#[test]
fn guesses_are_counted_across_postgres_instances() {
    use ims::crs::guesses::{GuessCounter, Guesses, FREE_ATTEMPTS};
    let server = pg::PgServer::start();
    PgStore::open(&server.url()).expect("schema");
    let (one, _) = pg_live(&server.url(), "dir");
    let (two, _) = pg_live(&server.url(), "dir");
    let g1 = one.shared_guesses(FREE_ATTEMPTS).expect("shared");
    let g2 = two.shared_guesses(FREE_ATTEMPTS).expect("shared");
    let memory: Box<dyn GuessCounter> = Box::new(Guesses::new(FREE_ATTEMPTS));
    let (a, b): (std::net::IpAddr, std::net::IpAddr) = (
        "10.0.0.1".parse().expect("ip"),
        "10.0.0.2".parse().expect("ip"),
    );
    for (first, second) in [(&g1, &g2), (&memory, &memory)] {
        for i in 0..FREE_ATTEMPTS {
            let g = if i % 2 == 0 { first } else { second };
            assert!(g.attempt("joe", a).is_ok(), "free attempt {i}");
        }
        let wait = second.attempt("joe", a).expect_err("the guesser waits");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(first.attempt("joe", b).is_ok(), "another source does not");
        second.succeeded("joe", a);
        assert!(first.attempt("joe", a).is_ok(), "a success clears it");
    }
}
