//! The sealed envelope seen from outside: round trips, tampering with every
//! byte, replay, reordering, reflection, wrong keys and the 64-message window.

use ims::seal::{Role, SealError, SessionKeys};
use ims::wire::{self, Limits, Message, Status};

fn pair_with(secret: &[u8], context: &[u8]) -> (SessionKeys, SessionKeys) {
    (
        SessionKeys::derive(secret, context, Role::Initiator),
        SessionKeys::derive(secret, context, Role::Responder),
    )
}

fn pair() -> (SessionKeys, SessionKeys) {
    pair_with(b"shared secret", b"nonce-a|nonce-b")
}

/// The outer message as a receiver gets it: encoded, then parsed back.
fn over_the_wire(outer: &Message) -> Message {
    match wire::parse(&outer.encode(), &Limits::DEFAULT.for_files()).unwrap() {
        Status::Complete { message, .. } => message,
        Status::Incomplete => panic!("outer message incomplete"),
    }
}

fn ping(n: usize) -> Message {
    Message::request("PING").with_header("N", n)
}

#[test]
fn round_trip_requests_and_replies() {
    let (mut a, mut b) = pair();
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let inners = [
        Message::request("MSG")
            .with_header("From", "alice")
            .with_body("hello bob"),
        Message::ok(),
        Message::reply(404, "Not Found").with_header("X", "y"),
        Message::request("FILE-CHUNK")
            .with_header("Offset", 0)
            .with_body(binary.clone()),
        Message::request("EMPTY"),
        Message::reply(200, "").with_body(vec![0u8, b'\r', b'\n', 0xff]),
    ];
    for inner in &inners {
        // A to B as a request with routing headers, B to A as a reply.
        let outer = a
            .send
            .seal("RELAY", &[("From", "alice"), ("To", "bob")], inner)
            .unwrap();
        assert_eq!(outer.method(), Some("RELAY"));
        assert_eq!(outer.header("From"), Some("alice"));
        assert_eq!(outer.header("To"), Some("bob"));
        assert_eq!(outer.header("Dir"), Some("i2r"));
        let names: Vec<&str> = outer.headers.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["From", "To", "Dir", "Seq"]);
        assert!(!contains(&outer.encode(), b"hello bob"));
        assert_eq!(&b.recv.open(&over_the_wire(&outer)).unwrap(), inner);

        let reply = b
            .send
            .seal_reply(200, "OK", &[("To", "alice")], inner)
            .unwrap();
        assert_eq!(reply.code(), Some(200));
        assert_eq!(reply.header("Dir"), Some("r2i"));
        assert_eq!(&a.recv.open_owned(over_the_wire(&reply)).unwrap(), inner);
    }
    assert_eq!(a.send.next_seq(), Some(inners.len() as u64));
    assert_eq!(b.recv.highest_seq(), Some(inners.len() as u64 - 1));

    // The generic entry point takes any start line.
    let start = wire::Start::Reply {
        code: 503,
        reason: "Busy".into(),
    };
    let outer = a.send.seal_start(&start, &[], &Message::ok()).unwrap();
    assert_eq!(outer.start, start);
    assert_eq!(b.recv.open(&outer).unwrap(), Message::ok());
}

#[test]
fn every_flipped_byte_is_caught() {
    let (mut a, mut b) = pair();
    let inner = Message::request("MSG")
        .with_header("Text", "hi")
        .with_body(vec![1, 2, 3, 0, 255]);
    for outer in [
        a.send
            .seal("RELAY", &[("From", "alice"), ("To", "bob")], &inner)
            .unwrap(),
        a.send
            .seal_reply(200, "OK", &[("To", "bob")], &inner)
            .unwrap(),
    ] {
        let bytes = outer.encode();
        let mut still_parsed = 0;
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = bytes.clone();
                bad[i] ^= mask;
                let Ok(Status::Complete { message, .. }) =
                    wire::parse(&bad, &Limits::DEFAULT.for_files())
                else {
                    continue;
                };
                still_parsed += 1;
                let err = b.recv.open(&message).unwrap_err();
                assert!(
                    matches!(
                        err,
                        SealError::Tampered | SealError::Malformed(_) | SealError::Reflected
                    ),
                    "byte {i} ^ {mask:#x}: {err:?}"
                );
            }
        }
        assert!(still_parsed > bytes.len(), "the test must reach open()");
        // No forgery moved the window: the genuine message still opens.
        assert_eq!(b.recv.open(&over_the_wire(&outer)).unwrap(), inner);
    }
}

#[test]
fn replay_is_refused() {
    let (mut a, mut b) = pair();
    let first = a.send.seal("DATA", &[], &ping(0)).unwrap();
    b.recv.open(&first).unwrap();
    assert_eq!(b.recv.open(&first), Err(SealError::Replayed));
    let second = a.send.seal("DATA", &[], &ping(1)).unwrap();
    b.recv.open(&second).unwrap();
    assert_eq!(b.recv.open(&first), Err(SealError::Replayed));
    assert_eq!(b.recv.open(&second), Err(SealError::Replayed));
}

#[test]
fn older_message_after_newer_is_out_of_order() {
    let (mut a, mut b) = pair();
    let sealed: Vec<Message> = (0..3)
        .map(|n| a.send.seal("DATA", &[], &ping(n)).unwrap())
        .collect();
    b.recv.open(&sealed[2]).unwrap();
    assert_eq!(b.recv.open(&sealed[1]), Err(SealError::OutOfOrder));
    assert_eq!(b.recv.open(&sealed[0]), Err(SealError::OutOfOrder));
    // Still out of order on a second try: a rejected message is not recorded.
    assert_eq!(b.recv.open(&sealed[1]), Err(SealError::OutOfOrder));
    assert_eq!(b.recv.open(&sealed[2]), Err(SealError::Replayed));
}

#[test]
fn gaps_are_allowed() {
    let (mut a, mut b) = pair();
    let sealed: Vec<Message> = (0..4)
        .map(|n| a.send.seal("DATA", &[], &ping(n)).unwrap())
        .collect();
    b.recv.open(&sealed[0]).unwrap();
    // Message 1 is lost; 2 and 3 still arrive.
    assert_eq!(b.recv.open(&sealed[2]).unwrap(), ping(2));
    assert_eq!(b.recv.open(&sealed[3]).unwrap(), ping(3));
}

#[test]
fn own_message_reflected_back() {
    let (mut a, mut b) = pair();
    let to_b = a.send.seal("DATA", &[], &ping(0)).unwrap();
    assert_eq!(a.recv.open(&to_b), Err(SealError::Reflected));
    let to_a = b.send.seal_reply(200, "OK", &[], &ping(0)).unwrap();
    assert_eq!(b.recv.open(&to_a), Err(SealError::Reflected));
    // Relabelling the direction does not help: the key is the other one.
    let mut relabelled = to_b.clone();
    relabelled.headers.remove("Dir");
    relabelled.headers.remove("Seq");
    relabelled.headers.push("Dir", "r2i");
    relabelled.headers.push("Seq", "0");
    assert_eq!(a.recv.open(&relabelled), Err(SealError::Tampered));
    // Neither attempt disturbed the real receivers.
    assert_eq!(b.recv.open(&to_b).unwrap(), ping(0));
    assert_eq!(a.recv.open(&to_a).unwrap(), ping(0));
}

#[test]
fn wrong_key_is_tampered() {
    let (mut a, _) = pair();
    let sealed = a.send.seal("DATA", &[], &ping(0)).unwrap();
    for (secret, context) in [
        (&b"other secret"[..], &b"nonce-a|nonce-b"[..]),
        (b"shared secret", b"nonce-a|nonce-c"),
    ] {
        let (_, mut other) = pair_with(secret, context);
        assert_eq!(other.recv.open(&sealed), Err(SealError::Tampered));
    }
}

#[test]
fn clear_headers_are_authenticated() {
    let (mut a, mut b) = pair();
    let sealed = a
        .send
        .seal("RELAY", &[("From", "alice"), ("To", "bob")], &ping(0))
        .unwrap();
    let rebuild = |headers: &[(&str, &str)]| {
        let mut m = Message::request("RELAY").with_body(sealed.body.clone());
        for (n, v) in headers {
            m.headers.push(n, v);
        }
        m
    };
    let seq = sealed.header("Seq").unwrap();
    let cases = [
        // A changed value.
        rebuild(&[
            ("From", "mallory"),
            ("To", "bob"),
            ("Dir", "i2r"),
            ("Seq", seq),
        ]),
        // Reordered clear headers.
        rebuild(&[
            ("To", "bob"),
            ("From", "alice"),
            ("Dir", "i2r"),
            ("Seq", seq),
        ]),
        // An added one, a removed one.
        rebuild(&[
            ("From", "alice"),
            ("To", "bob"),
            ("Cc", "eve"),
            ("Dir", "i2r"),
            ("Seq", seq),
        ]),
        rebuild(&[("To", "bob"), ("Dir", "i2r"), ("Seq", seq)]),
        // Dir and Seq moved.
        rebuild(&[
            ("Dir", "i2r"),
            ("Seq", seq),
            ("From", "alice"),
            ("To", "bob"),
        ]),
        // Another method.
        {
            let mut m = rebuild(&[
                ("From", "alice"),
                ("To", "bob"),
                ("Dir", "i2r"),
                ("Seq", seq),
            ]);
            m.start = wire::Start::Request("RELAX".into());
            m
        },
    ];
    for forged in &cases {
        assert_eq!(b.recv.open(forged), Err(SealError::Tampered), "{forged:?}");
    }
    // The unmodified rebuild is genuine.
    let genuine = rebuild(&[
        ("From", "alice"),
        ("To", "bob"),
        ("Dir", "i2r"),
        ("Seq", seq),
    ]);
    assert_eq!(b.recv.open(&genuine).unwrap(), ping(0));
}

#[test]
fn missing_or_bad_dir_and_seq_are_malformed() {
    let (mut a, mut b) = pair();
    let sealed = a.send.seal("DATA", &[], &ping(0)).unwrap();
    let edit = |f: &dyn Fn(&mut Message)| {
        let mut m = sealed.clone();
        f(&mut m);
        m
    };
    let cases = [
        edit(&|m| {
            m.headers.remove("Dir");
        }),
        edit(&|m| {
            m.headers.remove("Seq");
        }),
        edit(&|m| m.headers.push("Seq", "0")),
        edit(&|m| {
            m.headers.remove("Seq");
            m.headers.push("Seq", "-1");
        }),
        edit(&|m| {
            m.headers.remove("Seq");
            m.headers.push("Seq", "00");
        }),
        edit(&|m| {
            m.headers.remove("Dir");
            m.headers.push("Dir", "up");
        }),
    ];
    for m in &cases {
        assert!(
            matches!(b.recv.open(m), Err(SealError::Malformed(_))),
            "{m:?}"
        );
    }
    assert_eq!(b.recv.open(&sealed).unwrap(), ping(0));
}

#[test]
fn reserved_clear_headers_are_refused() {
    let (mut a, _) = pair();
    for name in ["Dir", "seq", "Content-Length"] {
        assert!(matches!(
            a.send.seal("DATA", &[(name, "1")], &ping(0)),
            Err(SealError::Malformed(_))
        ));
    }
    // Nothing was consumed by the refusals.
    assert_eq!(a.send.next_seq(), Some(0));
}

#[test]
fn oversized_inner_message_fails_at_the_sender() {
    let (mut a, _) = pair();
    let too_big = Message::request("CHUNK").with_body(vec![0u8; Limits::DEFAULT.max_file_body + 1]);
    assert_eq!(
        a.send.seal("DATA", &[], &too_big),
        Err(SealError::Inner(wire::Error::BodyTooLarge))
    );
    assert_eq!(a.send.next_seq(), Some(0));
}

#[test]
fn window_at_the_64_boundary() {
    let (mut a, mut b) = pair();
    let sealed: Vec<Message> = (0..140)
        .map(|n| a.send.seal("DATA", &[], &ping(n)).unwrap())
        .collect();

    // Accept 0..=70 in order: 70 - 63 = 7 is the oldest one remembered.
    for m in &sealed[..=70] {
        b.recv.open(m).unwrap();
    }
    assert_eq!(b.recv.open(&sealed[70]), Err(SealError::Replayed));
    assert_eq!(b.recv.open(&sealed[7]), Err(SealError::Replayed));
    assert_eq!(b.recv.open(&sealed[6]), Err(SealError::OutOfOrder));
    assert_eq!(b.recv.open(&sealed[0]), Err(SealError::OutOfOrder));

    // A jump of exactly 63 keeps 70 in the window; its neighbour 71 was
    // skipped, so it is out of order rather than replayed.
    b.recv.open(&sealed[133]).unwrap();
    assert_eq!(b.recv.open(&sealed[70]), Err(SealError::Replayed));
    assert_eq!(b.recv.open(&sealed[71]), Err(SealError::OutOfOrder));
    assert_eq!(b.recv.open(&sealed[69]), Err(SealError::OutOfOrder));

    // A jump of 64 or more forgets everything before the new highest.
    let (mut a, mut b) = pair();
    let sealed: Vec<Message> = (0..=129)
        .map(|n| a.send.seal("DATA", &[], &ping(n)).unwrap())
        .collect();
    b.recv.open(&sealed[1]).unwrap();
    b.recv.open(&sealed[65]).unwrap(); // 65 - 1 = 64: 1 falls out
    assert_eq!(b.recv.open(&sealed[1]), Err(SealError::OutOfOrder));
    assert_eq!(b.recv.open(&sealed[65]), Err(SealError::Replayed));
    b.recv.open(&sealed[129]).unwrap(); // 129 - 65 = 64
    assert_eq!(b.recv.open(&sealed[65]), Err(SealError::OutOfOrder));
    assert_eq!(b.recv.open(&sealed[129]), Err(SealError::Replayed));
}

#[test]
fn tampered_messages_do_not_move_the_window() {
    let (mut a, mut b) = pair();
    let m0 = a.send.seal("DATA", &[], &ping(0)).unwrap();
    let m1 = a.send.seal("DATA", &[], &ping(1)).unwrap();
    // A forgery claiming a far-ahead sequence number.
    let mut forged = m1.clone();
    forged.headers.remove("Seq");
    forged.headers.push("Seq", "1000");
    assert_eq!(b.recv.open(&forged), Err(SealError::Tampered));
    let mut flipped = m1.clone();
    flipped.body[0] ^= 1;
    assert_eq!(b.recv.open(&flipped), Err(SealError::Tampered));
    assert_eq!(b.recv.highest_seq(), None);
    assert_eq!(b.recv.open(&m0).unwrap(), ping(0));
    assert_eq!(b.recv.open(&m1).unwrap(), ping(1));
}

#[test]
fn sessions_with_different_context_do_not_mix() {
    let (mut a1, _) = pair_with(b"s", b"session 1");
    let (_, mut b2) = pair_with(b"s", b"session 2");
    let m = a1.send.seal("DATA", &[], &ping(0)).unwrap();
    assert_eq!(b2.recv.open(&m), Err(SealError::Tampered));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
