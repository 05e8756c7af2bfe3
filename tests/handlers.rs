//! The handlers of the CRS and the MS called directly, without sockets:
//! for each method a table of request and expected typed reply, every
//! refusal included. Each answer also goes through the wire codec and the
//! typed decoder, so what a program reads is what the handler meant.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ims::client::account::{wrap_aad, PasswordKeys};
use ims::crs::service::{CrsService, Peer2};
use ims::crs::store::MemStore;
use ims::crs::{Crs, CrsConfig};
use ims::crypto::{self, scram, KdfParams, KdfPolicy, RsaPrivateKey};
use ims::link::{login_keys, Channel, CrsCalls, LinkError};
use ims::ms::login::MsService;
use ims::ms::{Ms, MsConfig};
use ims::prethread::{Outcome, Peer, Service};
use ims::proto::crs::{
    ClientReply, ClientRequest, CrsReply, CrsRequest, Profile, Registration, StatusInfo, Verifier,
    MAX_PROFILE_BYTES, MAX_PROFILE_FIELDS, REGISTER_AAD,
};
use ims::proto::ms::{MsReply, MsRequest};
use ims::proto::{self, Answer, Refusal, Refused, Request};
use ims::seal::Role;
use ims::wire::{self, Limits, Message, Status};

const MS_KEY: &[u8] = &[7; 32];
const ITERATIONS: u32 = 16;
const PW: &str = "correct horse";

/// RSA keys take a while to make: one CRS key and one user key, shared.
fn rsa() -> &'static (RsaPrivateKey, RsaPrivateKey) {
    static KEYS: OnceLock<(RsaPrivateKey, RsaPrivateKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        (
            RsaPrivateKey::generate(2048).unwrap(),
            RsaPrivateKey::generate(2048).unwrap(),
        )
    })
}

fn crs_config() -> CrsConfig {
    CrsConfig {
        min_iterations: 1,
        poll_timeout: Duration::from_millis(50),
        ..CrsConfig::default()
    }
}

fn new_crs(config: CrsConfig) -> Arc<Crs> {
    Arc::new(Crs::new(
        config,
        Arc::new(MemStore::new()),
        MS_KEY.to_vec(),
        rsa().0.clone(),
    ))
}

/// Through the wire and back: the answer as a program reads it.
fn over_the_wire<R: Request>(
    req: &R,
    a: &Answer<R::Reply>,
    encode: impl Fn(&R::Reply) -> Message,
) -> Answer<R::Reply> {
    let m = match a {
        Ok(r) => encode(r),
        Err(r) => r.to_message(),
    };
    let bytes = m.encode();
    let parsed = match wire::parse(&bytes, &Limits::DEFAULT) {
        Ok(Status::Complete { message, .. }) => message,
        other => panic!("{other:?}"),
    };
    req.read_reply(&parsed).expect("a valid answer")
}

/// The refusal kind of an answer, or `None` for a success.
fn kind<T>(a: &Answer<T>) -> Option<Refusal> {
    a.as_ref().err().map(|r| r.refusal.clone())
}

fn password_keys(salt: &[u8]) -> PasswordKeys {
    PasswordKeys::derive(
        PW,
        &KdfParams {
            salt: salt.to_vec(),
            iterations: ITERATIONS,
        },
        KdfPolicy::Insecure,
    )
    .unwrap()
}

fn verifier(salt: &[u8]) -> Verifier {
    password_keys(salt).verifier(&KdfParams {
        salt: salt.to_vec(),
        iterations: ITERATIONS,
    })
}

/// A `REGISTER` as a client makes it.
fn registration(crs: &Crs, user: &str, profile: Profile) -> ClientRequest {
    let ClientReply::CrsKey { der, .. } = crs.client_call(ClientRequest::CrsKey).unwrap() else {
        panic!("no key")
    };
    let crs_key = ims::crypto::RsaPublicKey::from_der(&der).unwrap();
    let salt = [user.len() as u8; 16];
    let keys = password_keys(&salt);
    let private = &rsa().1;
    let reg = Registration {
        user: user.into(),
        verifier: verifier(&salt),
        public_key: private.public_key().to_der().unwrap(),
        wrapped_key: scram::wrap(&keys.wrap, &private.to_der().unwrap(), &wrap_aad(user)).unwrap(),
        profile,
    };
    let k = crypto::random_array::<32>();
    ClientRequest::Register {
        key: crs_key.encrypt_oaep(&k).unwrap(),
        sealed: crypto::aes_gcm_seal(
            &k,
            &[0; 12],
            REGISTER_AAD,
            &serde_json::to_vec(&reg).unwrap(),
        )
        .unwrap(),
    }
}

fn client(crs: &Crs, req: ClientRequest) -> Answer<ClientReply> {
    let a = crs.client_call(req.clone());
    assert_eq!(over_the_wire(&req, &a, ClientReply::to_message), a);
    a
}

fn call(crs: &Crs, who: Peer2, req: CrsRequest) -> Answer<CrsReply> {
    let a = crs.call(who, req.clone());
    assert_eq!(over_the_wire(&req, &a, CrsReply::to_message), a, "{req:?}");
    a
}

fn profile(fields: &[(&str, &str)]) -> Profile {
    fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn signed_add(from: &str, to: &str) -> CrsRequest {
    let nonce = vec![9; 16];
    CrsRequest::Add {
        from: from.into(),
        to: to.into(),
        signature: rsa()
            .1
            .sign_pss(&proto::add_transcript(from, to, &nonce))
            .unwrap(),
        nonce,
    }
}

#[test]
fn crs_client_requests() {
    let crs = new_crs(crs_config());
    assert_eq!(
        kind(&client(&crs, ClientRequest::Locate)),
        Some(Refusal::NoMs)
    );
    crs.enroll_ms("127.0.0.1:7101", 10, "one");
    assert_eq!(
        client(&crs, ClientRequest::Locate),
        Ok(ClientReply::Ms("127.0.0.1:7101".into()))
    );
    assert_eq!(
        client(
            &crs,
            registration(&crs, "alice", profile(&[("name", "Alice")]))
        ),
        Ok(ClientReply::Registered)
    );
    let table: Vec<(ClientRequest, Refusal)> = vec![
        (
            registration(&crs, "alice", Profile::new()),
            Refusal::NameTaken,
        ),
        (
            registration(&crs, "bad name!", Profile::new()),
            Refusal::BadRequest,
        ),
        (
            registration(&crs, "bigprofile", profile(&[("bio", &"x".repeat(2000))])),
            Refusal::TooLarge,
        ),
        (
            ClientRequest::Register {
                key: vec![1; 256],
                sealed: vec![2; 40],
            },
            Refusal::BadRequest,
        ),
    ];
    for (req, refusal) in table {
        assert_eq!(kind(&client(&crs, req)), Some(refusal));
    }
    let closed = new_crs(CrsConfig {
        registration_open: false,
        ..crs_config()
    });
    assert_eq!(
        kind(&client(
            &closed,
            registration(&closed, "bob", Profile::new())
        )),
        Some(Refusal::RegistrationClosed)
    );
}

#[test]
fn crs_ms_requests() {
    let crs = new_crs(crs_config());
    let ms = Peer2::Ms(crs.enroll_ms("127.0.0.1:7101", 10, "one"));
    for user in ["alice", "bob", "carol", "dave"] {
        let p = profile(&[("name", &format!("{user} Smith"))]);
        assert!(client(&crs, registration(&crs, user, p)).is_ok());
    }
    let alice_at: SocketAddr = "10.0.0.1:7300".parse().unwrap();
    let dave_at: SocketAddr = "10.0.0.4:7300".parse().unwrap();
    let src: IpAddr = "10.0.0.1".parse().unwrap();
    let big = profile(&[("bio", &"x".repeat(MAX_PROFILE_BYTES))]);
    let many: Profile = (0..=MAX_PROFILE_FIELDS)
        .map(|i| (format!("f{i}"), "v".to_string()))
        .collect();
    let weak = Verifier {
        iterations: 0,
        ..verifier(&[1; 16])
    };
    let huge = Verifier {
        iterations: u32::MAX,
        ..verifier(&[1; 16])
    };
    let short = Verifier {
        stored_key: vec![1; 5],
        ..verifier(&[1; 16])
    };
    let set_credentials = |v: Verifier| CrsRequest::SetCredentials {
        user: "alice".into(),
        verifier: v,
        wrapped_key: vec![1; 40],
    };
    let mut bad_sig = signed_add("alice", "carol");
    if let CrsRequest::Add { signature, .. } = &mut bad_sig {
        signature[0] ^= 1;
    }

    // (request, what must come back): `Ok(None)` a success of any content.
    type Expect = Result<Option<CrsReply>, Refusal>;
    let table: Vec<(CrsRequest, Expect)> = vec![
        (CrsRequest::Heartbeat { load: 0 }, Ok(Some(CrsReply::Done))),
        (
            CrsRequest::GetVerifier {
                user: "ALICE".into(),
                source: src,
            },
            Ok(Some(CrsReply::Verifier(verifier(&[5; 16])))),
        ),
        (
            CrsRequest::GetVerifier {
                user: "nobody".into(),
                source: src,
            },
            Err(Refusal::NoSuchUser),
        ),
        // ONLINE takes the lock itself when the MS holds none.
        (
            CrsRequest::Online {
                user: "dave".into(),
                address: dave_at,
            },
            Ok(None),
        ),
        (
            CrsRequest::Online {
                user: "dave".into(),
                address: alice_at,
            },
            Err(Refusal::AlreadyLoggedIn {
                address: Some(dave_at),
            }),
        ),
        (
            CrsRequest::Lock {
                user: "alice".into(),
            },
            Ok(Some(CrsReply::Done)),
        ),
        (
            CrsRequest::Lock {
                user: "alice".into(),
            },
            Err(Refusal::AlreadyLoggingIn),
        ),
        (
            CrsRequest::Online {
                user: "alice".into(),
                address: alice_at,
            },
            Ok(None),
        ),
        (
            CrsRequest::Lock {
                user: "alice".into(),
            },
            Err(Refusal::AlreadyLoggedIn {
                address: Some(alice_at),
            }),
        ),
        (set_credentials(weak), Err(Refusal::BadRequest)),
        (set_credentials(huge), Err(Refusal::BadRequest)),
        (set_credentials(short), Err(Refusal::BadRequest)),
        (
            set_credentials(verifier(&[5; 16])),
            Ok(Some(CrsReply::Done)),
        ),
        (
            CrsRequest::SetProfile {
                user: "alice".into(),
                profile: big,
            },
            Err(Refusal::TooLarge),
        ),
        (
            CrsRequest::SetProfile {
                user: "alice".into(),
                profile: many,
            },
            Err(Refusal::TooLarge),
        ),
        (
            CrsRequest::SetProfile {
                user: "alice".into(),
                profile: profile(&[("name", "Alice Smith"), ("company", "Acme")]),
            },
            Ok(Some(CrsReply::Done)),
        ),
        (signed_add("alice", "alice"), Err(Refusal::SameUser)),
        (bad_sig, Err(Refusal::BadSignature)),
        (signed_add("alice", "nobody"), Err(Refusal::NoSuchUser)),
        (signed_add("alice", "bob"), Ok(Some(CrsReply::Stored))),
        (
            CrsRequest::Accept {
                user: "bob".into(),
                from: "carol".into(),
            },
            Err(Refusal::NoSuchRequest),
        ),
        (
            CrsRequest::Accept {
                user: "bob".into(),
                from: "alice".into(),
            },
            Ok(None),
        ),
        (signed_add("alice", "bob"), Err(Refusal::AlreadyBuddies)),
        (
            CrsRequest::Deny {
                user: "bob".into(),
                from: "carol".into(),
            },
            Err(Refusal::NoSuchRequest),
        ),
        (
            CrsRequest::Remove {
                user: "alice".into(),
                buddy: "carol".into(),
            },
            Err(Refusal::NotABuddy),
        ),
        (
            CrsRequest::Remove {
                user: "alice".into(),
                buddy: "bob".into(),
            },
            Ok(Some(CrsReply::Done)),
        ),
        (
            CrsRequest::Unlock {
                user: "carol".into(),
            },
            Ok(Some(CrsReply::Done)),
        ),
        (
            CrsRequest::Offline {
                user: "alice".into(),
            },
            Ok(Some(CrsReply::Done)),
        ),
        (CrsRequest::ListMs, Err(Refusal::WrongLink)),
        (
            CrsRequest::DeleteUser { user: "bob".into() },
            Err(Refusal::WrongLink),
        ),
    ];
    for (req, expect) in table {
        let got = call(&crs, ms, req.clone());
        match (&expect, &got) {
            (Ok(None), Ok(_)) => {}
            (Ok(Some(want)), Ok(got)) => assert_eq!(got, want, "{req:?}"),
            (Err(want), Err(got)) => assert_eq!(&got.refusal, want, "{req:?}: {got:?}"),
            _ => panic!("{req:?}: expected {expect:?}, got {got:?}"),
        }
    }

    let Ok(CrsReply::Hits(hits)) = call(
        &crs,
        ms,
        CrsRequest::Search {
            text: "acme".into(),
            limit: 10,
        },
    ) else {
        panic!("search")
    };
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].user, "alice");
    let Ok(CrsReply::Events(batch)) = call(&crs, ms, CrsRequest::Events { ack: 0 }) else {
        panic!("events")
    };
    assert!(!batch.events.is_empty(), "the buddy events are queued");

    // The operator's link.
    let Ok(CrsReply::Users(users)) = call(
        &crs,
        Peer2::Admin,
        CrsRequest::ListUsers {
            after: None,
            limit: 10,
        },
    ) else {
        panic!("list")
    };
    assert_eq!(users, ["alice", "bob", "carol", "dave"]);
    let Ok(CrsReply::User(view)) = call(
        &crs,
        Peer2::Admin,
        CrsRequest::ShowUser {
            user: "alice".into(),
        },
    ) else {
        panic!("show")
    };
    assert_eq!(view.profile["company"], "Acme");
    for (req, refusal) in [
        (
            CrsRequest::ShowUser {
                user: "nobody".into(),
            },
            Refusal::NoSuchUser,
        ),
        (
            CrsRequest::DeleteUser {
                user: "nobody".into(),
            },
            Refusal::NoSuchUser,
        ),
        (CrsRequest::Heartbeat { load: 1 }, Refusal::WrongLink),
    ] {
        assert_eq!(kind(&call(&crs, Peer2::Admin, req)), Some(refusal));
    }
    assert_eq!(
        call(
            &crs,
            Peer2::Admin,
            CrsRequest::DeleteUser {
                user: "carol".into()
            }
        ),
        Ok(CrsReply::Done)
    );
    assert_eq!(
        kind(&call(
            &crs,
            Peer2::Ms(999),
            CrsRequest::Heartbeat { load: 0 }
        )),
        Some(Refusal::NotEnrolled)
    );
}

#[test]
fn crs_counts_login_attempts_when_they_start_for_every_ms() {
    let crs = new_crs(crs_config());
    let one = Peer2::Ms(crs.enroll_ms("127.0.0.1:7101", 10, "one"));
    let two = Peer2::Ms(crs.enroll_ms("127.0.0.1:7102", 10, "two"));
    assert!(client(&crs, registration(&crs, "alice", Profile::new())).is_ok());
    let guesser: IpAddr = "10.9.9.9".parse().unwrap();
    let hello = |ms, source| {
        call(
            &crs,
            ms,
            CrsRequest::GetVerifier {
                user: "alice".into(),
                source,
            },
        )
    };
    // Handshakes started, none judged yet, spread over two MSs: only the
    // free ones get a challenge.
    let free = ims::crs::guesses::FREE_ATTEMPTS;
    for i in 0..free {
        assert!(hello(if i % 2 == 0 { one } else { two }, guesser).is_ok());
    }
    for ms in [one, two] {
        match kind(&hello(ms, guesser)) {
            Some(Refusal::RateLimited { retry_after }) => assert!(retry_after >= Some(1)),
            other => panic!("a guess past the free ones was let through: {other:?}"),
        }
    }
    // The real user, elsewhere, is not slowed down; a success clears.
    let home: IpAddr = "10.1.1.1".parse().unwrap();
    assert!(hello(one, home).is_ok());
    assert!(call(
        &crs,
        one,
        CrsRequest::Lock {
            user: "alice".into()
        }
    )
    .is_ok());
    assert!(call(
        &crs,
        one,
        CrsRequest::Online {
            user: "alice".into(),
            address: SocketAddr::new(guesser, 7300)
        }
    )
    .is_ok());
    assert!(
        hello(two, guesser).is_ok(),
        "a proven password clears the count"
    );
}

#[test]
fn search_results_are_capped_by_bytes() {
    use ims::crs::store::{Store, User};
    let store = Arc::new(MemStore::new());
    // Records stored before the profile limits: as large as they come.
    for i in 0..6 {
        let mut u = User {
            name: format!("big{i}"),
            ..Default::default()
        };
        u.profile
            .insert("bio".into(), format!("match {}", "x".repeat(100_000)));
        store.create_user(u).unwrap();
    }
    let crs = Crs::new(crs_config(), store, MS_KEY.to_vec(), rsa().0.clone());
    let ms = Peer2::Ms(crs.enroll_ms("127.0.0.1:7101", 10, "one"));
    let req = CrsRequest::Search {
        text: "match".into(),
        limit: 50,
    };
    let Ok(CrsReply::Hits(hits)) = call(&crs, ms, req) else {
        panic!("search")
    };
    assert!(!hits.is_empty() && hits.len() < 6, "{} hits", hits.len());
    let body = CrsReply::Hits(hits).to_message().body.len();
    assert!(body <= ims::proto::crs::MAX_SEARCH_REPLY_BYTES, "{body}");
}

/// The MS's requests to the CRS, answered by the CRS's handlers in process.
struct InProcess {
    crs: Arc<Crs>,
    id: u64,
}

impl CrsCalls for InProcess {
    fn call(&self, req: &CrsRequest) -> Result<CrsReply, LinkError> {
        self.crs
            .call(Peer2::Ms(self.id), req.clone())
            .map_err(LinkError::Refused)
    }
}

fn ms_with_crs() -> (Arc<Crs>, Arc<Ms>) {
    let crs = new_crs(crs_config());
    let id = crs.enroll_ms("127.0.0.1:7101", 10, "one");
    for user in ["alice", "bob"] {
        assert!(client(&crs, registration(&crs, user, Profile::new())).is_ok());
    }
    let ms = Ms::in_process(
        MsConfig {
            fake_iterations: 99,
            push_threads: 1,
            ..MsConfig::default()
        },
        MS_KEY.to_vec(),
        Arc::new(InProcess {
            crs: crs.clone(),
            id,
        }),
    )
    .unwrap();
    (crs, ms)
}

/// A full login at the MS's handlers; the sealed welcome or the refusal.
fn login(ms: &Arc<Ms>, user: &str, password: &str, port: u16) -> Result<Message, Refused> {
    let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
    let client_nonce = vec![3; 24];
    let c = ms.hello(user, client_nonce.clone(), peer)?;
    let ch = c.challenge().clone();
    let keys = PasswordKeys::derive(
        password,
        &KdfParams {
            salt: ch.salt.clone(),
            iterations: ch.iterations,
        },
        KdfPolicy::Insecure,
    )
    .unwrap();
    let auth = proto::login_auth_message(
        user,
        &client_nonce,
        &ch.server_nonce,
        &ch.salt,
        ch.iterations,
    );
    let proof = scram::client_proof(&keys.scram.client_key, &keys.scram.stored_key, &auth);
    let (sealed, _) = ms.login(c, &proof, port, None)?;
    // The client's side: the MS proved itself, and the welcome opens.
    assert_eq!(
        sealed.header("Server-Signature"),
        Some(crypto::b64_encode(&scram::server_signature(&keys.scram.server_key, &auth)).as_str())
    );
    let mut ch_keys = Channel::new(
        login_keys(
            &keys.scram.client_key,
            &client_nonce,
            &ch.server_nonce,
            Role::Initiator,
        ),
        Vec::new(),
    );
    let inner = ch_keys.open(&sealed).unwrap();
    let req = MsRequest::Login {
        proof: proof.to_vec(),
        listen_port: port,
    };
    match req.read_reply(&inner).unwrap() {
        Ok(MsReply::Welcome(w)) => assert_eq!(w.user, user),
        other => panic!("{other:?}"),
    }
    Ok(sealed)
}

#[test]
fn ms_login_handlers() {
    let (_crs, ms) = ms_with_crs();
    let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
    // An unknown name gets a fake challenge, then a password failure.
    let fake = ms.hello("nobody", vec![1; 24], peer).ok().unwrap();
    assert_eq!(fake.challenge().iterations, 99);
    assert_eq!(
        ms.login(fake, &[0; 32], 7300, None).err().unwrap().refusal,
        Refusal::PasswordFailure
    );
    assert_eq!(
        ms.hello("alice", vec![1; 4], peer).err().map(|r| r.refusal),
        Some(Refusal::BadRequest)
    );
    assert_eq!(
        login(&ms, "alice", "wrong password", 1)
            .unwrap_err()
            .refusal,
        Refusal::PasswordFailure
    );
    // Online now. A wrong proof gets exactly what it got while she was
    // offline (the proof is checked before the lock): nothing tells
    // whether she is online.
    login(&ms, "alice", PW, 1).unwrap();
    let online = login(&ms, "alice", "wrong password", 1).unwrap_err();
    assert_eq!(online.refusal, Refusal::PasswordFailure);
    assert_eq!(online.to_message().code(), Some(401));
    // The right password while her login lives is refused: only the MS
    // holding a login decides it has ended, never a newer login.
    match login(&ms, "alice", PW, 1).unwrap_err().refusal {
        Refusal::AlreadyLoggedIn { address } => {
            assert_eq!(address, Some("127.0.0.1:1".parse().unwrap()))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn ms_user_request_handlers() {
    let (_crs, ms) = ms_with_crs();
    login(&ms, "alice", PW, 1).unwrap();
    let alice = ms.user("alice").expect("alice is logged in");
    let table: Vec<(MsRequest, Result<MsReply, Refusal>)> = vec![
        (MsRequest::Ping, Ok(MsReply::Done)),
        (
            MsRequest::LoginHello {
                user: "alice".into(),
                client_nonce: vec![1; 24],
            },
            Err(Refusal::BadRequest),
        ),
        (
            MsRequest::SetProfile(profile(&[("bio", &"y".repeat(5000))])),
            Err(Refusal::TooLarge),
        ),
        (
            MsRequest::SetProfile(profile(&[("name", "Alice")])),
            Ok(MsReply::Done),
        ),
        (
            MsRequest::Passwd {
                verifier: Verifier {
                    iterations: 0,
                    ..verifier(&[1; 16])
                },
                wrapped_key: vec![1; 40],
            },
            Err(Refusal::BadRequest),
        ),
        (
            MsRequest::Passwd {
                verifier: Verifier {
                    salt: vec![1; 2],
                    ..verifier(&[1; 16])
                },
                wrapped_key: vec![1; 40],
            },
            Err(Refusal::BadRequest),
        ),
        (MsRequest::Accept("bob".into()), Err(Refusal::NoSuchRequest)),
        (MsRequest::Deny("bob".into()), Err(Refusal::NoSuchRequest)),
        (MsRequest::Remove("bob".into()), Err(Refusal::NotABuddy)),
        (
            MsRequest::SetStatus(StatusInfo {
                status: ims::proto::status::Status::Away,
                message: "at lunch".into(),
            }),
            Ok(MsReply::Done),
        ),
        (MsRequest::Reveal("bob".into()), Ok(MsReply::Done)),
        (
            MsRequest::Add {
                to: "alice".into(),
                nonce: vec![1; 16],
                signature: vec![1; 256],
            },
            Err(Refusal::SameUser),
        ),
        (
            MsRequest::Add {
                to: "bob".into(),
                nonce: vec![1; 16],
                signature: vec![1; 256],
            },
            Err(Refusal::BadSignature),
        ),
    ];
    for (req, expect) in table {
        let got = ms.user_request(&alice, req.clone());
        let back = over_the_wire(&req, &got, MsReply::to_message);
        assert_eq!(back, got);
        match (&expect, &got) {
            (Ok(want), Ok(got)) => assert_eq!(got, want, "{req:?}"),
            (Err(want), Err(got)) => assert_eq!(&got.refusal, want, "{req:?}: {got:?}"),
            _ => panic!("{req:?}: expected {expect:?}, got {got:?}"),
        }
    }
    // Status changes are rate-limited per user (two of the burst taken above).
    let limited = (0..ims::ms::login::STATUS_BURST)
        .map(|_| ms.user_request(&alice, MsRequest::SetStatus(StatusInfo::default())))
        .filter(|r| matches!(r, Err(e) if matches!(e.refusal, Refusal::RateLimited { .. })))
        .count();
    assert!(limited >= 1, "no STATUS was rate-limited");
    match ms.user_request(&alice, MsRequest::Search("alice".into())) {
        Ok(MsReply::Hits(h)) => assert_eq!(h.len(), 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ms.user_request(&alice, MsRequest::Logout),
        Ok(MsReply::Done)
    );
    assert!(ms.user("alice").is_none());
}

fn reply(o: Outcome) -> (Message, bool) {
    match o {
        Outcome::Reply(m) => (m, false),
        Outcome::ReplyAndClose(m) => (m, true),
        other => panic!("no reply: {other:?}"),
    }
}

fn peer() -> Peer {
    Peer {
        remote: "127.0.0.1:50000".parse().unwrap(),
        local: "127.0.0.1:7100".parse().unwrap(),
    }
}

#[test]
fn crs_service_enrollment_and_sealed_requests_as_connection_states() {
    let crs = new_crs(crs_config());
    let svc = CrsService(crs.clone());
    let enroll = |key: &[u8]| {
        let mut conn = svc.open(&peer());
        let ms_nonce = [0x11u8; 32];
        let hello =
            Message::request("ENROLL-HELLO").with_header("Ms-Nonce", crypto::b64_encode(&ms_nonce));
        let (r, closed) = reply(svc.handle(&mut conn, hello));
        assert!(r.is_success() && !closed, "{r:?}");
        let crs_nonce = crypto::b64_decode(r.header("Crs-Nonce").unwrap()).unwrap();
        let proof = crypto::hmac_sha256(
            key,
            &proto::enroll_ms_transcript(&ms_nonce, &crs_nonce, "10.0.0.9:7101", 5, "ms", "x1"),
        );
        let m = Message::request("ENROLL")
            .with_header("Listen", "10.0.0.9:7101")
            .with_header("Capacity", 5)
            .with_header("Role", "ms")
            .with_header("Instance", "x1")
            .with_header("Proof", crypto::b64_encode(&proof));
        let (r, closed) = reply(svc.handle(&mut conn, m));
        (conn, r, closed, ms_nonce, crs_nonce)
    };
    // A wrong MSkey: a typed refusal, and the connection closes.
    let (_, r, closed, _, _) = enroll(&[9; 32]);
    assert!(closed);
    assert_eq!(
        Refused::from_message(&r).unwrap().refusal,
        Refusal::BadProof
    );
    // The right one: the CRS proves itself back, then requests are sealed.
    let (mut conn, r, closed, ms_nonce, crs_nonce) = enroll(MS_KEY);
    assert!(r.is_success() && !closed, "{r:?}");
    let id: u64 = r.header("Ms-Id").unwrap().parse().unwrap();
    let expected = crypto::hmac_sha256(
        MS_KEY,
        &proto::enroll_crs_transcript(&ms_nonce, &crs_nonce, id, r.header("Crs-Instance").unwrap()),
    );
    assert_eq!(
        crypto::b64_decode(r.header("Proof").unwrap()).unwrap(),
        expected
    );
    let mut ch = Channel::new(
        ims::link::enrollment_keys(MS_KEY, &ms_nonce, &crs_nonce, Role::Initiator),
        Vec::new(),
    );
    for (req, want) in [
        (CrsRequest::Heartbeat { load: 3 }, Ok(CrsReply::Done)),
        (CrsRequest::ListMs, Err(Refusal::WrongLink)),
    ] {
        let (outer, closed) = reply(svc.handle(&mut conn, ch.seal(&req.to_message()).unwrap()));
        assert!(!closed);
        let got = req.read_reply(&ch.open(&outer).unwrap()).unwrap();
        assert_eq!(got.map_err(|r| r.refusal), want);
    }
    // An EVENTS poll with nothing queued is parked (the worker is free),
    // keyed by the MS's id; at its deadline it is answered empty.
    let poll = CrsRequest::Events { ack: 0 };
    let parking = svc.parking().expect("the CRS parks its polls");
    let Outcome::Park(park) = svc.handle(&mut conn, ch.seal(&poll.to_message()).unwrap()) else {
        panic!("an idle poll is parked")
    };
    assert_eq!(park.key(), id);
    std::thread::sleep(
        park.until()
            .saturating_duration_since(std::time::Instant::now()),
    );
    let (outer, closed) = reply(svc.resume(&mut conn, false));
    assert!(!closed);
    let Ok(Ok(CrsReply::Events(batch))) = poll.read_reply(&ch.open(&outer).unwrap()) else {
        panic!("an empty batch at the deadline")
    };
    assert!(batch.events.is_empty());
    // Parked again; an event queued for this MS wakes it, and resuming
    // answers with the event.
    let Outcome::Park(park) = svc.handle(&mut conn, ch.seal(&poll.to_message()).unwrap()) else {
        panic!("an idle poll is parked")
    };
    for user in ["dora", "eve"] {
        assert!(client(&crs, registration(&crs, user, Profile::new())).is_ok());
    }
    let at: SocketAddr = "127.0.0.1:7300".parse().unwrap();
    let ms = Peer2::Ms(id);
    assert!(crs
        .call(
            ms,
            CrsRequest::Lock {
                user: "dora".into()
            }
        )
        .is_ok());
    let online = CrsRequest::Online {
        user: "dora".into(),
        address: at,
    };
    assert!(crs.call(ms, online).is_ok());
    assert!(!parking.woken(&park), "nothing for this MS yet");
    assert!(crs.call(ms, signed_add("eve", "dora")).is_ok());
    assert!(
        parking.woken(&park),
        "a request for dora wakes her MS's poll"
    );
    let (outer, closed) = reply(svc.resume(&mut conn, true));
    assert!(!closed);
    let Ok(Ok(CrsReply::Events(batch))) = poll.read_reply(&ch.open(&outer).unwrap()) else {
        panic!("the events")
    };
    assert_eq!(batch.events.len(), 1, "{batch:?}");
    assert_eq!(batch.events[0].recipients, ["dora"]);

    // A message that does not open ends the link.
    let mut forged = ch
        .seal(&CrsRequest::Heartbeat { load: 1 }.to_message())
        .unwrap();
    forged.body[0] ^= 1;
    assert!(matches!(svc.handle(&mut conn, forged), Outcome::Close));
}

#[test]
fn ms_service_login_as_connection_states() {
    let (_crs, ms) = ms_with_crs();
    let svc = MsService(ms.clone());
    let mut conn = svc.open(&peer());
    let client_nonce = vec![3u8; 24];
    let hello = MsRequest::LoginHello {
        user: "alice".into(),
        client_nonce: client_nonce.clone(),
    };
    let (r, closed) = reply(svc.handle(&mut conn, hello.to_message()));
    assert!(!closed);
    let Ok(Ok(MsReply::Challenge(ch))) = hello.read_reply(&r) else {
        panic!("{r:?}")
    };
    let keys = PasswordKeys::derive(
        PW,
        &KdfParams {
            salt: ch.salt.clone(),
            iterations: ch.iterations,
        },
        KdfPolicy::Insecure,
    )
    .unwrap();
    let auth = proto::login_auth_message(
        "alice",
        &client_nonce,
        &ch.server_nonce,
        &ch.salt,
        ch.iterations,
    );
    let proof = scram::client_proof(&keys.scram.client_key, &keys.scram.stored_key, &auth);
    // Anything but LOGIN now is refused and the connection closes.
    let (r, closed) = reply(svc.handle(&mut conn, MsRequest::Ping.to_message()));
    assert!(closed);
    assert_eq!(
        Refused::from_message(&r).unwrap().refusal,
        Refusal::BadRequest
    );
    // Again, properly.
    let mut conn = svc.open(&peer());
    let (r, _) = reply(svc.handle(&mut conn, hello.to_message()));
    let Ok(Ok(MsReply::Challenge(ch))) = hello.read_reply(&r) else {
        panic!("{r:?}")
    };
    let auth = proto::login_auth_message(
        "alice",
        &client_nonce,
        &ch.server_nonce,
        &ch.salt,
        ch.iterations,
    );
    let proof2 = scram::client_proof(&keys.scram.client_key, &keys.scram.stored_key, &auth);
    assert_ne!(proof, proof2, "a fresh server nonce");
    let login = MsRequest::Login {
        proof: proof2.to_vec(),
        listen_port: 1,
    };
    let (welcome, closed) = reply(svc.handle(&mut conn, login.to_message()));
    assert!(closed, "the login connection ends with the welcome");
    let login_id = welcome.header("Login").unwrap().to_owned();
    let mut ch_keys = Channel::new(
        login_keys(
            &keys.scram.client_key,
            &client_nonce,
            &ch.server_nonce,
            Role::Initiator,
        ),
        vec![("Login", login_id)],
    );
    assert!(matches!(
        login.read_reply(&ch_keys.open(&welcome).unwrap()),
        Ok(Ok(MsReply::Welcome(_)))
    ));
    // A sealed request on a new connection.
    let mut conn = svc.open(&peer());
    let (outer, _) = reply(svc.handle(
        &mut conn,
        ch_keys.seal(&MsRequest::Ping.to_message()).unwrap(),
    ));
    assert_eq!(
        MsRequest::Ping.read_reply(&ch_keys.open(&outer).unwrap()),
        Ok(Ok(MsReply::Done))
    );
    // A login the MS does not know: refused in the clear.
    let mut other = Channel::new(
        login_keys(&[1; 32], &client_nonce, &ch.server_nonce, Role::Initiator),
        vec![("Login", "0000".into())],
    );
    let (r, closed) = reply(svc.handle(
        &mut conn,
        other.seal(&MsRequest::Ping.to_message()).unwrap(),
    ));
    assert!(closed);
    assert_eq!(
        Refused::from_message(&r).unwrap().refusal,
        Refusal::NotLoggedIn
    );
}

/// `KEY`, `QUEUE`, `MAIL` and `MAIL-ACK`: offline messages are filed only
/// from their signed sender to a buddy who does not block them, fetched in
/// order, and acknowledged into a receipt for the sender.
#[test]
fn crs_offline_mail_requests() {
    use ims::crypto::offline;
    use ims::proto::crs::EventKind;
    let crs = new_crs(crs_config());
    let ms = Peer2::Ms(crs.enroll_ms("127.0.0.1:7101", 10, "one"));
    for user in ["alice", "bob", "carol"] {
        assert!(client(&crs, registration(&crs, user, Profile::new())).is_ok());
    }
    assert!(call(&crs, ms, signed_add("alice", "bob")).is_ok());
    assert!(call(
        &crs,
        ms,
        CrsRequest::Accept {
            user: "bob".into(),
            from: "alice".into()
        }
    )
    .is_ok());
    let key = |user: &str, who: &str| {
        call(
            &crs,
            ms,
            CrsRequest::Key {
                user: user.into(),
                who: who.into(),
            },
        )
    };
    let Ok(CrsReply::Key(der)) = key("alice", "bob") else {
        panic!("no key")
    };
    assert_eq!(der, rsa().1.public_key().to_der().unwrap());
    assert_eq!(kind(&key("alice", "carol")), Some(Refusal::NotABuddy));
    let seal = |from: &str, to: &str, id: u8| {
        let h = offline::Header {
            from: from.into(),
            to: to.into(),
            id: [id; 16],
            sent_at: 1_764_750_000,
            number: u64::from(id),
        };
        offline::seal(&h, b"hi", &rsa().1, &rsa().1.public_key()).unwrap()
    };
    let queue = |user: &str, blob: Vec<u8>| {
        call(
            &crs,
            ms,
            CrsRequest::Queue {
                user: user.into(),
                blob,
            },
        )
    };
    let blob = seal("alice", "bob", 1);
    assert_eq!(queue("alice", blob.clone()), Ok(CrsReply::Done));
    assert_eq!(queue("alice", blob.clone()), Ok(CrsReply::Done), "a retry");
    assert_eq!(
        kind(&queue("carol", blob.clone())),
        Some(Refusal::BadRequest)
    );
    assert_eq!(
        kind(&queue("alice", seal("alice", "carol", 2))),
        Some(Refusal::NotABuddy)
    );
    let mut forged = blob.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    assert_eq!(kind(&queue("alice", forged)), Some(Refusal::BadSignature));
    assert_eq!(
        kind(&queue("alice", b"not a blob".to_vec())),
        Some(Refusal::BadRequest)
    );
    let mail = |user: &str| {
        let Ok(CrsReply::Mail(items)) = call(
            &crs,
            ms,
            CrsRequest::Mail {
                user: user.into(),
                after: 0,
            },
        ) else {
            panic!("no mail answer")
        };
        items
    };
    let items = mail("bob");
    assert_eq!(items.len(), 1, "filed once");
    assert!(matches!(&items[0], EventKind::Mail { blob: b, .. } if *b == blob));
    let ack = |user: &str, ids: Vec<String>| {
        call(
            &crs,
            ms,
            CrsRequest::MailAck {
                user: user.into(),
                ids,
            },
        )
    };
    assert_eq!(
        kind(&ack("bob", vec!["zz".into()])),
        Some(Refusal::BadRequest)
    );
    // Another user's acknowledgement deletes nothing.
    assert_eq!(ack("carol", vec!["01".repeat(16)]), Ok(CrsReply::Done));
    assert_eq!(mail("bob").len(), 1);
    assert_eq!(ack("bob", vec!["01".repeat(16)]), Ok(CrsReply::Done));
    assert!(mail("bob").is_empty());
    let receipts = mail("alice");
    assert!(
        matches!(&receipts[..], [EventKind::Receipt { to, number: 1, outcome, .. }]
            if to == "bob" && outcome == "delivered"),
        "{receipts:?}"
    );
    // Bob blocks alice: nothing more is filed from her.
    assert!(call(
        &crs,
        ms,
        CrsRequest::Block {
            user: "bob".into(),
            who: "alice".into(),
            on: true
        }
    )
    .is_ok());
    assert_eq!(
        kind(&queue("alice", seal("alice", "bob", 3))),
        Some(Refusal::NotABuddy)
    );
    assert!(mail("bob").is_empty());
}
