//! docs/PROTOCOL.md cannot drift from the code: every example exchange of
//! its §10 is parsed with the wire codec and decoded with the typed layer
//! (its proofs and its sealed message checked with the keys the document
//! states), every constant of its §9 equals the code's, and its table of
//! refusal tokens is the code's.

use std::collections::BTreeMap;
use std::time::Duration;

use ims::client::ClientConfig;
use ims::crs::CrsConfig;
use ims::crypto::{self, scram, KdfParams, KdfPolicy};
use ims::ms::MsConfig;
use ims::proto::crs::{ClientRequest, CrsRequest};
use ims::proto::ms::{read_event, MsReply, MsRequest};
use ims::proto::peer::PeerRequest;
use ims::proto::{self, Refusal, Request};
use ims::seal::{Role, SessionKeys};
use ims::wire::{self, Limits, Message, Status};

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap()
}

/// The fenced blocks whose info string starts with `tag`: (info, text).
fn blocks(doc: &str, tag: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.strip_prefix("```").filter(|i| i.starts_with(tag)) else {
            continue;
        };
        let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
        out.push((info.to_owned(), body.join("\n")));
    }
    out
}

/// One message as the document shows it, as the bytes on the wire.
fn wire_bytes(text: &str) -> Vec<u8> {
    let text = text.trim_start_matches('\n');
    let (head, body) = text.split_once("\n\n").unwrap_or((text.trim_end(), ""));
    let body = body.trim_end_matches('\n');
    let mut out = head.replace('\n', "\r\n").into_bytes();
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

fn parse(bytes: &[u8]) -> Message {
    match wire::parse(bytes, &Limits::DEFAULT) {
        Ok(Status::Complete { message, used }) => {
            assert_eq!(used, bytes.len(), "trailing bytes");
            message
        }
        other => panic!("{other:?}: {}", String::from_utf8_lossy(bytes)),
    }
}

fn messages(text: &str) -> Vec<Message> {
    text.split("\n----\n")
        .map(|m| parse(&wire_bytes(m)))
        .collect()
}

/// Decodes request/reply pairs with `decode(request, reply)`.
fn pairs(ms: &[Message], mut decode: impl FnMut(&Message, &Message)) {
    assert!(ms.len() >= 2 && ms.len() % 2 == 0, "request/reply pairs");
    for pair in ms.chunks(2) {
        assert!(pair[0].method().is_some(), "a request first: {:?}", pair[0]);
        assert!(pair[1].code().is_some(), "then a reply: {:?}", pair[1]);
        decode(&pair[0], &pair[1]);
    }
}

fn typed<R: Request>(req: R, reply: &Message) -> R::Reply
where
    R::Reply: std::fmt::Debug,
{
    match req.read_reply(reply).expect("a valid answer") {
        Ok(r) => r,
        // A refusal decodes to its typed kind, never `Other`.
        Err(r) => {
            assert!(!matches!(r.refusal, Refusal::Other(_)), "{r:?}");
            panic!("refusal {r:?}")
        }
    }
}

const MS_KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn client_key() -> [u8; 32] {
    let salted = crypto::derive_salted_password(
        b"correct horse",
        &KdfParams {
            salt: vec![0x33; 16],
            iterations: 600_000,
        },
        KdfPolicy::Production,
    )
    .unwrap();
    scram::Keys::from_salted_password(&salted).client_key
}

#[test]
fn every_link_has_an_example_and_each_decodes() {
    let doc = doc();
    let found = blocks(&doc, "ims-example");
    let links: Vec<&str> = found
        .iter()
        .map(|(i, _)| i.trim_start_matches("ims-example ").trim())
        .collect();
    assert_eq!(
        links,
        [
            "client-crs",
            "enroll",
            "ms-crs",
            "operator-crs",
            "login",
            "client-ms",
            "push",
            "peer"
        ]
    );
    for ((_, text), link) in found.iter().zip(links) {
        let ms = messages(text);
        match link {
            "client-crs" => pairs(&ms, |q, r| {
                let req = ClientRequest::from_message(q)
                    .unwrap()
                    .expect("a client request");
                typed(req, r);
            }),
            "ms-crs" | "operator-crs" => pairs(&ms, |q, r| {
                let req = CrsRequest::from_message(q).unwrap();
                match req.read_reply(r).expect("a valid answer") {
                    Ok(_) => {}
                    Err(refused) => {
                        // The example's refusal: typed, with its address.
                        assert_eq!(
                            refused.refusal,
                            Refusal::AlreadyLoggedIn {
                                address: Some("198.51.100.7:7300".parse().unwrap())
                            }
                        );
                    }
                }
            }),
            "client-ms" => pairs(&ms, |q, r| {
                let req = MsRequest::from_message(q).unwrap();
                typed(req, r);
            }),
            "push" => pairs(&ms, |q, r| {
                read_event(q).unwrap();
                assert!(r.is_success());
            }),
            "peer" => pairs(&ms, |q, r| {
                let req = PeerRequest::from_message(q.clone()).unwrap();
                let id = req.id();
                assert_eq!(typed(req, r), id);
            }),
            "enroll" => check_enrollment(&ms),
            "login" => check_login(&ms),
            other => panic!("unknown example {other}"),
        }
    }
}

fn b64(m: &Message, h: &str) -> Vec<u8> {
    crypto::b64_decode(m.header(h).unwrap()).unwrap()
}

fn check_enrollment(ms: &[Message]) {
    let key = unhex(MS_KEY_HEX);
    let [hello, challenge, enroll, done] = ms else {
        panic!("four messages")
    };
    assert_eq!(hello.method(), Some("ENROLL-HELLO"));
    let (ms_nonce, crs_nonce) = (b64(hello, "Ms-Nonce"), b64(challenge, "Crs-Nonce"));
    assert_eq!(
        (ms_nonce.as_slice(), crs_nonce.as_slice()),
        (&[0x11; 32][..], &[0x22; 32][..])
    );
    let h = |n: &str| enroll.header(n).unwrap();
    let proof = crypto::hmac_sha256(
        &key,
        &proto::enroll_ms_transcript(
            &ms_nonce,
            &crs_nonce,
            h("Listen"),
            h("Capacity").parse().unwrap(),
            h("Role"),
            h("Instance"),
        ),
    );
    assert_eq!(b64(enroll, "Proof"), proof);
    let crs_proof = crypto::hmac_sha256(
        &key,
        &proto::enroll_crs_transcript(
            &ms_nonce,
            &crs_nonce,
            done.header("Ms-Id").unwrap().parse().unwrap(),
            done.header("Crs-Instance").unwrap(),
        ),
    );
    assert_eq!(b64(done, "Proof"), crs_proof);
}

fn check_login(ms: &[Message]) {
    let [hello, challenge, login] = ms else {
        panic!("three messages")
    };
    let MsRequest::LoginHello { user, client_nonce } = MsRequest::from_message(hello).unwrap()
    else {
        panic!("LOGIN-HELLO")
    };
    let hello_req = MsRequest::from_message(hello).unwrap();
    let MsReply::Challenge(c) = typed(hello_req, challenge) else {
        panic!("a challenge")
    };
    let MsRequest::Login { proof, .. } = MsRequest::from_message(login).unwrap() else {
        panic!("LOGIN")
    };
    let salted = crypto::derive_salted_password(
        b"correct horse",
        &KdfParams {
            salt: c.salt.clone(),
            iterations: c.iterations,
        },
        KdfPolicy::Production,
    )
    .unwrap();
    let keys = scram::Keys::from_salted_password(&salted);
    let auth =
        proto::login_auth_message(&user, &client_nonce, &c.server_nonce, &c.salt, c.iterations);
    assert_eq!(
        proof,
        scram::client_proof(&keys.client_key, &keys.stored_key, &auth)
    );
    let doc = doc();
    let signature = crypto::b64_encode(&scram::server_signature(&keys.server_key, &auth));
    assert!(
        doc.contains(&format!("`Server-Signature: {signature}`")),
        "{signature}"
    );
    assert!(doc.contains(&format!(
        "is `{}` (hex)",
        ims::keyfile::hex(&keys.client_key)
    )));
}

#[test]
fn the_sealed_example_opens_as_the_document_says() {
    let doc = doc();
    let sealed = blocks(&doc, "ims-sealed-example");
    let [(_, text)] = sealed.as_slice() else {
        panic!("one sealed example")
    };
    let (head, body) = text.split_once("\n\n").unwrap();
    let body = crypto::b64_decode(body.trim()).unwrap();
    let mut bytes = head.replace('\n', "\r\n").into_bytes();
    bytes.extend_from_slice(b"\r\n\r\n");
    bytes.extend_from_slice(&body);
    bytes.extend_from_slice(b"\r\n");
    let outer = parse(&bytes);
    let context = [[0x44u8; 24].as_slice(), &[0x55; 24]].concat();
    let ck = client_key();

    // By the document's description alone: key, nonce, associated data.
    let key = crypto::hkdf_sha256_32(&ck, &context, b"ims seal i2r v1");
    let mut nonce = [0u8; 12];
    nonce[3] = 1;
    let mut aad = b"ims seal aad v1\0Q".to_vec();
    let field = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_be_bytes());
        out.extend_from_slice(b);
    };
    field(&mut aad, b"SEALED");
    aad.extend_from_slice(&3u64.to_be_bytes());
    for (n, v) in [
        ("login", "9f86d081884c7d659a2feaa0c55ad015"),
        ("dir", "i2r"),
        ("seq", "0"),
    ] {
        field(&mut aad, n.as_bytes());
        field(&mut aad, v.as_bytes());
    }
    aad.extend_from_slice(&(body.len() as u64).to_be_bytes());
    let shown = blocks(&doc, "text")
        .into_iter()
        .map(|(_, t)| t.trim().to_owned())
        .find(|t| t.starts_with("696d73207365616c"))
        .expect("the associated data in hex");
    assert_eq!(unhex(&shown), aad);
    let plain = crypto::aes_gcm_open(&key, &nonce, &aad, &body).unwrap();
    assert_eq!(parse(&plain).method(), Some("PING"));

    // And by the code.
    let mut keys = SessionKeys::derive(&ck, &context, Role::Responder);
    let inner = keys.recv.open(&outer).unwrap();
    assert_eq!(MsRequest::from_message(&inner).unwrap(), MsRequest::Ping);
    let mut theirs = SessionKeys::derive(&ck, &context, Role::Initiator);
    let again = theirs
        .send
        .seal(
            "SEALED",
            &[("Login", "9f86d081884c7d659a2feaa0c55ad015")],
            &MsRequest::Ping.to_message(),
        )
        .unwrap();
    assert_eq!(again.body, body);
}

#[test]
fn the_constants_are_the_codes() {
    let secs = |d: Duration| d.as_secs();
    let (crs, ms, client) = (
        CrsConfig::default(),
        MsConfig::default(),
        ClientConfig::default(),
    );
    let pool = ims::prethread::Config::default();
    let l = Limits::DEFAULT;
    use ims::proto::crs as pc;
    let code: BTreeMap<&str, u64> = [
        ("MAX_LINE", l.max_line as u64),
        ("MAX_HEADERS", l.max_headers as u64),
        ("MAX_HEADER_BYTES", l.max_header_bytes as u64),
        ("MAX_BODY", l.max_body as u64),
        ("MAX_FILE_BODY", l.max_file_body as u64),
        ("MESSAGE_DEADLINE_SECS", secs(pool.message_deadline)),
        ("IDLE_TIMEOUT_SECS", secs(pool.idle_timeout)),
        ("MAX_PER_SOURCE", ims::prethread::MAX_PER_SOURCE as u64),
        ("FD_RESERVE", ims::prethread::FD_RESERVE),
        (
            "PBKDF2_MIN_ITERATIONS",
            crypto::PBKDF2_MIN_ITERATIONS.into(),
        ),
        (
            "PBKDF2_MAX_ITERATIONS",
            crypto::PBKDF2_MAX_ITERATIONS.into(),
        ),
        ("SALT_LEN", crypto::SALT_LEN as u64),
        (
            "MIN_PASSWORD_LEN",
            ims::client::account::MIN_PASSWORD_LEN as u64,
        ),
        ("DEFAULT_RSA_BITS", crypto::DEFAULT_RSA_BITS.into()),
        ("ENROLL_NONCE_LEN", ims::link::ENROLL_NONCE_LEN as u64),
        (
            "MIN_ENROLL_NONCE_LEN",
            ims::link::MIN_ENROLL_NONCE_LEN as u64,
        ),
        ("LOGIN_NONCE_LEN", ims::ms::login::NONCE_LEN as u64),
        (
            "MIN_CLIENT_NONCE_LEN",
            ims::ms::login::MIN_CLIENT_NONCE_LEN as u64,
        ),
        ("MAX_PROFILE_FIELDS", pc::MAX_PROFILE_FIELDS as u64),
        ("MAX_PROFILE_NAME", pc::MAX_PROFILE_NAME as u64),
        ("MAX_PROFILE_VALUE", pc::MAX_PROFILE_VALUE as u64),
        ("MAX_PROFILE_BYTES", pc::MAX_PROFILE_BYTES as u64),
        ("MAX_SEARCH_REPLY_BYTES", pc::MAX_SEARCH_REPLY_BYTES as u64),
        ("STATUS_BURST", ims::ms::login::STATUS_BURST.into()),
        ("STATUS_PER_SEC", ims::ms::login::STATUS_PER_SEC as u64),
        (
            "MAX_STATUS_MESSAGE_BYTES",
            ims::proto::status::MAX_STATUS_MESSAGE_BYTES as u64,
        ),
        ("SEARCH_LIMIT", ims::ms::login::SEARCH_LIMIT.into()),
        ("FREE_ATTEMPTS", ims::crs::guesses::FREE_ATTEMPTS.into()),
        ("MAX_DELAY_SECS", secs(ims::crs::guesses::MAX_DELAY)),
        ("MAX_BATCH", ims::crs::live::MAX_BATCH as u64),
        (
            "POLL_TIMEOUT_SECS",
            secs(crs.poll_timeout.min(crs.heartbeat_timeout / 3)),
        ),
        ("HEARTBEAT_INTERVAL_SECS", secs(ms.heartbeat_interval)),
        ("HEARTBEAT_TIMEOUT_SECS", secs(crs.heartbeat_timeout)),
        ("LOCK_LEASE_SECS", secs(crs.lock_lease)),
        ("KEEPALIVE_SECS", secs(client.keepalive_interval)),
        ("CLIENT_TIMEOUT_SECS", secs(ms.client_timeout)),
        ("ACK_TIMEOUT_SECS", secs(client.ack_timeout)),
        ("FILE_CHUNK", ims::client::files::CHUNK as u64),
        ("MAX_TEXT_BYTES", ims::client::peer::MAX_TEXT_BYTES as u64),
        ("PEER_NONCE_LEN", ims::proto::peer::NONCE_LEN as u64),
        (
            "INIT_FRESHNESS_SECS",
            ims::client::peer::MAX_CLOCK_SKEW_SECS,
        ),
        ("CONFIRM_WAIT_SECS", secs(ims::client::peer::CONFIRM_WAIT)),
        ("REKEY_MESSAGES", client.rekey_messages),
        ("REKEY_INTERVAL_SECS", secs(client.rekey_interval)),
        ("EPOCH_GRACE_SECS", secs(ims::client::peer::EPOCH_GRACE)),
        ("DRAINED_HOLD_SECS", secs(ims::client::peer::DRAINED_HOLD)),
        ("MAX_RELAY_DATA", ims::proto::relay::MAX_RELAY_DATA as u64),
        ("RELAY_WINDOW", ims::proto::relay::RELAY_WINDOW),
        (
            "DIRECT_CONNECT_TIMEOUT_SECS",
            secs(client.direct_connect_timeout),
        ),
        ("OFFLINE_ID_LEN", crypto::offline::ID_LEN as u64),
        ("MAX_OFFLINE_BLOB", crypto::offline::MAX_BLOB as u64),
        ("MAIL_PAGE_ITEMS", ims::crs::mail::MAIL_PAGE_ITEMS as u64),
        ("MAIL_PAGE_BYTES", ims::crs::mail::MAIL_PAGE_BYTES as u64),
        ("MAX_ACK_IDS", ims::crs::mail::MAX_ACK_IDS as u64),
        ("MAIL_MAX_AGE_SECS", secs(crs.mail_max_age)),
        ("SEEN_KEEP_SECS", ims::client::offline::SEEN_KEEP_SECS),
    ]
    .into_iter()
    .collect();
    let doc = doc();
    let section = doc
        .split("## 9. Constants")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("§9");
    let mut stated = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, name, value, ..] = cells.as_slice() {
            if let Some(name) = name.strip_prefix('`').and_then(|n| n.strip_suffix('`')) {
                stated.insert(
                    name,
                    value
                        .parse::<u64>()
                        .unwrap_or_else(|_| panic!("{name}: {value}")),
                );
            }
        }
    }
    for (name, value) in &stated {
        assert_eq!(code.get(name), Some(value), "{name} in PROTOCOL.md §9");
    }
    for name in code.keys() {
        assert!(
            stated.contains_key(name),
            "{name} missing from PROTOCOL.md §9"
        );
    }
}

#[test]
fn the_refusal_table_is_the_codes() {
    let doc = doc();
    let mut stated = Vec::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if let [_, token, code, _, ..] = cells.as_slice() {
            let Some(token) = token.strip_prefix('`').and_then(|t| t.strip_suffix('`')) else {
                continue;
            };
            if token.contains(' ') || !token.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                continue;
            }
            if let Ok(code) = code.parse::<u16>() {
                stated.push((token.to_owned(), code));
            }
        }
    }
    let mut want: Vec<(String, u16)> = Refusal::TOKENS
        .iter()
        .map(|(t, c)| (t.to_string(), *c))
        .collect();
    stated.sort();
    want.sort();
    assert_eq!(stated, want);
}
