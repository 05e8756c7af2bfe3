//! The offline-message part of the CRS store (`MailStore`): the sled and
//! PostgreSQL stores against the in-memory model under random operations
//! (filing within the bounds, duplicates, paging in order, acknowledgement
//! filing receipts, expiry), and what sled and PostgreSQL keep across a
//! reopen. The PostgreSQL tests start their own server (see `pg/mod.rs`).

mod pg;

use ims::crs::store::mail::MemMail;
use ims::crs::store::{
    MailEntry, MailLimits, MailStore, MemStore, Outcome, PgStore, Queued, SledStore, StoredMail,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const USERS: &[&str] = &["alice", "bob", "carol", "dave"];

fn limits() -> MailLimits {
    MailLimits {
        per_recipient: 6,
        bytes_per_recipient: 600,
        per_sender: 8,
        bytes_per_sender: 700,
    }
}

fn mail(from: &str, to: &str, id: u32, size: usize, stored: u64) -> StoredMail {
    StoredMail {
        seq: 0,
        id: format!("{id:032x}"),
        from: from.into(),
        to: to.into(),
        number: u64::from(id),
        stored_unix: stored,
        blob: vec![id as u8; size],
    }
}

/// An entry without its number (stores number differently, in order).
fn shape(e: &MailEntry) -> String {
    match e {
        MailEntry::Mail(m) => format!("mail {}>{} {} {}", m.from, m.to, m.id, m.blob.len()),
        MailEntry::Receipt(r) => format!(
            "receipt {}>{} {} {} {:?}",
            r.owner, r.to, r.id, r.number, r.outcome
        ),
    }
}

fn everything(s: &dyn MailStore, user: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        // Small pages, to exercise paging.
        let page = s.mail_for(user, after, 3, 250).expect("mail_for");
        let Some(last) = page.last() else { break };
        assert!(page.last().unwrap().seq() > after);
        for w in page.windows(2) {
            assert!(w[0].seq() < w[1].seq(), "out of order");
        }
        after = last.seq();
        out.extend(page.iter().map(shape));
    }
    out
}

/// Random operations on `s` and the model; both must agree throughout.
fn check_against_model(s: &dyn MailStore) {
    let mut model = MemMail::default();
    let mut rng = StdRng::seed_from_u64(14);
    let mut next_id = 1u32;
    let mut filed: Vec<(String, String)> = Vec::new();
    for step in 0..400 {
        let op = rng.gen_range(0..10);
        match op {
            0..=4 => {
                let from = USERS[rng.gen_range(0..USERS.len())];
                let to = USERS[rng.gen_range(0..USERS.len())];
                // Sometimes a retry of an earlier one (same id).
                let id = if rng.gen_bool(0.1) && next_id > 1 {
                    rng.gen_range(1..next_id)
                } else {
                    next_id += 1;
                    next_id - 1
                };
                let m = mail(from, to, id, rng.gen_range(1..150), 1000 + step);
                let want = model.queue(m.clone(), &limits()).expect("model");
                let got = s.queue_mail(m, &limits()).expect("queue");
                assert_eq!(got, want, "step {step}: queue {from}>{to} #{id}");
                if got == Queued::Stored {
                    filed.push((to.to_owned(), format!("{id:032x}")));
                }
            }
            5..=7 => {
                let user = USERS[rng.gen_range(0..USERS.len())];
                let mut ids: Vec<String> = filed
                    .iter()
                    .filter(|_| rng.gen_bool(0.3))
                    .map(|(_, id)| id.clone())
                    .collect();
                ids.push(format!("{:032x}", 999_999));
                let want = model.ack(user, &ids, 5000).expect("model");
                let got = s.ack_mail(user, &ids).expect("ack");
                assert_eq!(got, want, "step {step}: ack by {user}");
            }
            8 => {
                let before = 1000 + rng.gen_range(0..step.max(1));
                let want = model.expire(before, 5000);
                // Receipts are filed "now" by the store; expire only mail
                // older than any receipt could be.
                let got = s.expire_mail(before).expect("expire");
                assert_eq!(got, want, "step {step}: expire before {before}");
            }
            _ => {
                for u in USERS {
                    assert_eq!(
                        s.has_mail(u).expect("has"),
                        model.has(u).expect("model"),
                        "step {step}: has_mail {u}"
                    );
                }
            }
        }
        if step % 25 == 0 {
            for u in USERS {
                let want: Vec<String> = {
                    let mut out = Vec::new();
                    let mut after = 0;
                    loop {
                        let page = model.entries(u, after, 3, 250).expect("model");
                        let Some(last) = page.last() else { break };
                        after = last.seq();
                        out.extend(page.iter().map(shape));
                    }
                    out
                };
                assert_eq!(everything(s, u), want, "step {step}: {u}'s entries");
            }
        }
    }
}

/// Hand-picked cases: bounds, duplicates, receipts replacing, paging.
fn check_semantics(s: &dyn MailStore) {
    let l = limits();
    assert_eq!(s.has_mail("bob"), Ok(false));
    assert_eq!(
        s.queue_mail(mail("alice", "bob", 1, 100, 10), &l),
        Ok(Queued::Stored)
    );
    assert_eq!(
        s.queue_mail(mail("alice", "bob", 1, 100, 10), &l),
        Ok(Queued::Duplicate)
    );
    // The same id to someone else is another message.
    assert_eq!(
        s.queue_mail(mail("alice", "carol", 1, 100, 10), &l),
        Ok(Queued::Stored)
    );
    assert_eq!(
        s.queue_mail(mail("dave", "bob", 2, 550, 10), &l),
        Ok(Queued::RecipientFull),
        "bytes per recipient"
    );
    for i in 3..9 {
        assert_eq!(
            s.queue_mail(mail("alice", "dave", i, 10, 10), &l),
            Ok(Queued::Stored)
        );
    }
    assert_eq!(
        s.queue_mail(mail("alice", "carol", 9, 10, 10), &l),
        Ok(Queued::SenderFull),
        "count per sender"
    );
    assert_eq!(s.has_mail("bob"), Ok(true));
    let e = s.mail_for("bob", 0, 10, 10_000).expect("mail_for");
    assert_eq!(e.len(), 1);
    let MailEntry::Mail(m) = &e[0] else {
        panic!("{e:?}")
    };
    assert_eq!((m.from.as_str(), m.number, m.blob.len()), ("alice", 1, 100));
    assert!(s
        .mail_for("bob", m.seq, 10, 10_000)
        .expect("after")
        .is_empty());
    // A page holds at least one entry, whatever its size.
    assert_eq!(s.mail_for("dave", 0, 10, 1).expect("page").len(), 1);
    assert_eq!(s.mail_for("dave", 0, 4, 10_000).expect("page").len(), 4);
    // Acknowledged: gone, and alice has a receipt.
    let senders = s.ack_mail("bob", std::slice::from_ref(&m.id)).expect("ack");
    assert_eq!(senders.into_iter().collect::<Vec<_>>(), ["alice"]);
    assert_eq!(s.has_mail("bob"), Ok(false));
    let r = s.mail_for("alice", 0, 10, 10_000).expect("receipts");
    let [MailEntry::Receipt(rc)] = &r[..] else {
        panic!("{r:?}")
    };
    assert_eq!(
        (rc.to.as_str(), rc.number, rc.outcome),
        ("bob", 1, Outcome::Delivered)
    );
    // Acknowledging again changes nothing; alice's ack drops her receipt.
    assert!(s
        .ack_mail("bob", std::slice::from_ref(&m.id))
        .expect("again")
        .is_empty());
    assert!(s
        .ack_mail("alice", std::slice::from_ref(&m.id))
        .expect("receipt")
        .is_empty());
    assert!(s.mail_for("alice", 0, 10, 10_000).expect("none").is_empty());
    // Expiry: carol's and dave's messages (filed at 10) go; alice is told.
    let senders = s.expire_mail(11).expect("expire");
    assert_eq!(senders.into_iter().collect::<Vec<_>>(), ["alice"]);
    assert_eq!(s.has_mail("carol"), Ok(false));
    let r = s.mail_for("alice", 0, 100, 10_000).expect("expired");
    assert_eq!(r.len(), 7);
    assert!(r
        .iter()
        .all(|e| matches!(e, MailEntry::Receipt(r) if r.outcome == Outcome::Expired)));
    assert!(s.mail_for("Bad Name", 0, 1, 1).is_err());
}

#[test]
fn memory_semantics() {
    check_semantics(&MemStore::new());
}

#[test]
fn sled_semantics_and_model() {
    let dir = tempdir();
    check_semantics(&SledStore::open(&dir.join("a")).expect("open"));
    check_against_model(&SledStore::open(&dir.join("b")).expect("open"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn memory_against_model() {
    check_against_model(&MemStore::new());
}

#[test]
fn sled_keeps_mail_across_a_reopen() {
    let dir = tempdir();
    let s = SledStore::open(&dir).expect("open");
    s.queue_mail(mail("alice", "bob", 1, 10, 10), &limits())
        .expect("queue");
    s.queue_mail(mail("alice", "bob", 2, 10, 10), &limits())
        .expect("queue");
    s.ack_mail("bob", &[format!("{:032x}", 1)]).expect("ack");
    drop(s);
    let s = SledStore::open(&dir).expect("reopen");
    let bob = everything(&s, "bob");
    assert_eq!(bob.len(), 1, "{bob:?}");
    assert_eq!(everything(&s, "alice").len(), 1, "the receipt");
    // Numbers keep increasing after a reopen.
    let before = s.mail_for("bob", 0, 9, 9_999).expect("page")[0].seq();
    s.queue_mail(mail("carol", "bob", 3, 10, 10), &limits())
        .expect("queue");
    let after = s.mail_for("bob", 0, 9, 9_999).expect("page");
    assert!(after[1].seq() > before);
    drop(s);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn postgres_semantics_model_and_reopen() {
    let server = pg::PgServer::start();
    check_semantics(&PgStore::open(&server.url()).expect("open"));
    server.create_db("model");
    check_against_model(&PgStore::open(&server.url_of("model")).expect("open"));
    server.create_db("reopen");
    let s = PgStore::open(&server.url_of("reopen")).expect("open");
    s.queue_mail(mail("alice", "bob", 1, 10, 10), &limits())
        .expect("queue");
    drop(s);
    let s = PgStore::open(&server.url_of("reopen")).expect("reopen");
    assert_eq!(everything(&s, "bob").len(), 1);
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ims-mail-store-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&d).expect("tempdir");
    d
}
