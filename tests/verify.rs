//! Keys a user can verify: safety numbers agree on both sides, a buddy's
//! key is remembered on first sight, and a key the CRS later hands out
//! differently (here: the account removed by the operator and registered
//! again with a new key pair, which to the client is the same as a CRS
//! substituting a key) raises `key-changed` and stops every message both
//! ways until `/verify NAME ok`.

mod common;

use common::*;

const PW: &str = "correct horse battery";

fn number(c: &Client, who: &str) -> (String, bool) {
    c.send(&format!("/verify {who}"));
    let e = c.wait_event("safety-number", |e| e["user"] == who);
    (field(&e, "number").to_owned(), e["verified"] == true)
}

/// `/verify WHO ok`: its safety number (now verified) and its `ok`.
fn accept(c: &Client, who: &str) -> String {
    c.send(&format!("/verify {who} ok"));
    let e = c.wait_event("safety-number", |e| e["user"] == who);
    assert_eq!(e["verified"], true, "{e}");
    c.wait_ok("verify");
    field(&e, "number").to_owned()
}

fn texts(c: &Client, from: &str) -> Vec<String> {
    c.events()
        .iter()
        .filter(|e| e["event"] == "message" && e["from"] == from)
        .map(|e| field(e, "text").to_owned())
        .collect()
}

#[test]
fn safety_numbers_match_and_a_substituted_key_stops_messages_until_verified() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    alice.send("/msg bob hello");
    bob.wait_event("message", |e| e["from"] == "alice" && e["text"] == "hello");
    bob.send("/msg alice hi back");
    alice.wait_event("message", |e| e["from"] == "bob" && e["text"] == "hi back");

    let (na, va) = number(&alice, "bob");
    let (nb, vb) = number(&bob, "alice");
    assert_eq!(na, nb, "both sides see the same safety number");
    assert!(!va && !vb);
    let groups: Vec<&str> = na.split(' ').collect();
    assert_eq!(groups.len(), 12, "{na}");
    assert!(groups
        .iter()
        .all(|g| g.len() == 5 && g.bytes().all(|b| b.is_ascii_digit())));
    assert_eq!(accept(&alice, "bob"), na);
    assert_eq!(number(&alice, "bob"), (na.clone(), true));

    // Bob's account is replaced by one with a new key pair.
    c.crs.op_ok(&["user", "delete", "bob"]);
    bob.wait_event("logged-out", |e| e["user"] == "bob");
    drop(bob);
    c.register("bob", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");

    alice.send("/msg bob secret-one");
    alice.wait_event("key-changed", |e| e["user"] == "bob");
    let e = alice.wait_event("send-failed", |e| e["to"] == "bob");
    assert!(field(&e, "reason").contains("key changed"), "{e}");
    // The other way too: alice refuses the session of the new key.
    bob.send("/msg alice from-the-new-key");
    bob.wait_event("send-failed", |e| e["to"] == "alice");
    alice.send("/msg bob secret-two");
    alice.wait_event("send-failed", |e| e["to"] == "bob");
    // Told once, not per message.
    assert_eq!(
        alice
            .events()
            .iter()
            .filter(|e| e["event"] == "key-changed")
            .count(),
        1
    );

    // The new number is not the verified one, and both sides agree on it.
    let (na2, va2) = number(&alice, "bob");
    let (nb2, _) = number(&bob, "alice");
    assert_ne!(na2, na);
    assert_eq!(na2, nb2);
    assert!(!va2);

    assert_eq!(accept(&alice, "bob"), na2);
    alice.send("/msg bob after-verify");
    bob.wait_event("message", |e| {
        e["from"] == "alice" && e["text"] == "after-verify"
    });
    assert_eq!(texts(&bob, "alice"), vec!["after-verify".to_owned()]);
    assert!(
        !texts(&alice, "bob").iter().any(|t| t == "from-the-new-key"),
        "a message under the unaccepted key was shown"
    );
    assert_eq!(number(&alice, "bob"), (na2.clone(), true));
}

#[test]
fn the_remembered_key_survives_a_restart() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    alice.send("/msg bob one");
    bob.wait_event("message", |e| e["text"] == "one");
    drop(alice);
    // A restarted client still knows bob's first key.
    c.crs.op_ok(&["user", "delete", "bob"]);
    bob.wait_event("logged-out", |e| e["user"] == "bob");
    drop(bob);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    alice.send("/msg bob two");
    alice.wait_event("key-changed", |e| e["user"] == "bob");
    alice.wait_event("send-failed", |e| e["to"] == "bob");
    assert!(texts(&bob, "alice").is_empty());
}
