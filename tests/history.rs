//! The conversation history on disk: it survives a restart and a new
//! password, holds no message text in the clear, and a file sealed under
//! another password is refused clearly.

mod common;

use std::fs;
use std::path::PathBuf;

use common::*;

const PW: &str = "correct horse battery";
const NEW_PW: &str = "brand new password";

fn history_file(c: &Cluster, user: &str) -> PathBuf {
    c.env
        .path()
        .join(".local/state/ims")
        .join(user)
        .join("history")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_thousand_messages_survive_a_restart_and_a_new_password() {
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);
    let alice = c.login("alice", PW);
    let bob = c.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");
    const N: usize = 1000;
    for i in 0..N {
        alice.send(&format!("/msg bob zebra-{i:04}"));
    }
    for _ in 0..N {
        alice.wait_event("delivered", |e| e["to"] == "bob");
    }
    bob.send("/msg alice quagga-answer");
    alice.wait_event("message", |e| e["text"] == "quagga-answer");
    drop(alice);

    let file = fs::read(history_file(&c, "alice")).expect("alice's history file");
    for needle in ["zebra", "quagga", "bob"] {
        assert!(
            !contains(&file, needle.as_bytes()),
            "the history file shows {needle:?}"
        );
    }

    let alice = c.login("alice", PW);
    alice.send(&format!("/history bob {}", N + 1));
    let h = alice.wait_event("history", |e| e["with"] == "bob");
    let m = h["messages"].as_array().expect("messages");
    assert_eq!(m.len(), N + 1);
    for (i, e) in m.iter().take(N).enumerate() {
        assert_eq!(e["text"], format!("zebra-{i:04}"), "{e}");
        assert_eq!(e["direction"], "sent");
        assert_eq!(e["state"], "delivered", "{e}");
    }
    assert_eq!(m[N]["text"], "quagga-answer");
    assert_eq!(m[N]["direction"], "received");
    alice.send("/history bob 2");
    let h = alice.wait_event("history", |e| e["with"] == "bob");
    assert_eq!(h["messages"].as_array().unwrap().len(), 2);

    // A new password: the history is sealed again under it.
    let old_file = fs::read(history_file(&c, "alice")).unwrap();
    alice.send("/passwd");
    alice.send(PW);
    alice.send(NEW_PW);
    alice.wait_ok("passwd");
    drop(alice);
    let alice = c.login("alice", NEW_PW);
    alice.send("/history bob 1");
    let h = alice.wait_event("history", |e| e["with"] == "bob");
    assert_eq!(h["messages"][0]["text"], "quagga-answer");
    drop(alice);

    // The file sealed under the old password does not open with the new
    // one, and says why.
    fs::write(history_file(&c, "alice"), old_file).unwrap();
    let alice = c.login("alice", NEW_PW);
    alice.wait_event("notice", |e| {
        field(e, "text").contains("written under another password")
    });
    alice.send("/history bob 1");
    assert!(alice.wait_error("history").contains("not open"));
}
