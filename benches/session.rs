//! Session set-up benchmark: what opening a conversation costs, now
//! (signed ephemeral X25519: INIT, INIT-ACK, CONFIRM) and before (a secret
//! sent under the callee's RSA key with RSA-OAEP, INIT and INIT-ACK signed),
//! measured in the same run with 2048-bit RSA keys.
//!
//! Measures, and prints as a table:
//! 1. CPU per set-up, caller and callee, for both exchanges (the real code
//!    for the new one, `ims::client::handshake`; the same primitives the old
//!    code used, in the same order, for the baseline), one thread;
//! 2. the set-up round trip over loopback TCP: connect, INIT, INIT-ACK and
//!    (new) CONFIRM, the callee a thread answering with the same code, p50
//!    and p99, for both exchanges.
//!
//! Message throughput under the new keys is `cargo bench --bench chat`.
//!
//! `cargo bench --bench session`; `IMS_BENCH_QUICK=1` for small sizes.
//! Without the `--bench` argument (as under `cargo test --all-targets`) it
//! runs once with tiny sizes, as a test.

use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ims::client::handshake::{self, Initiating};
use ims::crypto::{self, RsaPrivateKey, RsaPublicKey};
use ims::proto::peer::{Confirm, Init, InitAck};
use ims::proto::{transcript, Fields};
use ims::wire::io::{write_message, MessageReader};
use ims::wire::{Limits, Message};

/// Bound on one exchange.
const TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let quick = std::env::var("IMS_BENCH_QUICK").is_ok_and(|v| v == "1");
    let bench = std::env::args().any(|a| a == "--bench");
    let (n, mode) = match (bench, quick) {
        (false, _) => (10, " [smoke test: no --bench argument, tiny sizes]"),
        (true, true) => (200, " [quick]"),
        (true, false) => (2_000, ""),
    };
    println!("ims session set-up benchmark{mode} (RSA-2048, n={n})");
    let joe = RsaPrivateKey::generate(2048).expect("RSA key");
    let alice = RsaPrivateKey::generate(2048).expect("RSA key");
    let keys = Keys {
        joe_pub: joe.public_key(),
        alice_pub: alice.public_key(),
        joe,
        alice,
    };

    let mut rows = Vec::new();
    let (caller_new, callee_new) = cpu_new(&keys, n);
    let (caller_old, callee_old) = cpu_old(&keys, n);
    rows.push(row(
        "CPU per set-up, caller (X25519 + RSA sign/verify)",
        caller_new,
    ));
    rows.push(row(
        "CPU per set-up, callee (X25519 + RSA sign/verify)",
        callee_new,
    ));
    rows.push(row(
        "CPU per set-up, caller (old: RSA-OAEP + sign/verify)",
        caller_old,
    ));
    rows.push(row(
        "CPU per set-up, callee (old: RSA-OAEP + sign/verify)",
        callee_old,
    ));
    let total_new = caller_new + callee_new;
    let total_old = caller_old + callee_old;
    rows.push((
        "CPU per set-up, both sides: new / old".into(),
        format!(
            "{:.0} / {:.0} us ({:.2}x)",
            us(total_new),
            us(total_old),
            total_new.as_secs_f64() / total_old.as_secs_f64()
        ),
    ));
    for (what, new) in [("new", true), ("old", false)] {
        let (p50, p99, cpu) = round_trips(&keys, n, new);
        rows.push((
            format!("set-up round trip over loopback, {what} (p50 / p99)"),
            format!("{:.0} / {:.0} us", us(p50), us(p99)),
        ));
        rows.push((
            format!("  process CPU per set-up, {what} (both sides)"),
            cpu.map_or("unknown".into(), |c| format!("{:.0} us", us(c))),
        ));
    }
    print_table(&rows);
}

struct Keys {
    joe: RsaPrivateKey,
    alice: RsaPrivateKey,
    joe_pub: RsaPublicKey,
    alice_pub: RsaPublicKey,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn row(what: &str, d: Duration) -> (String, String) {
    (what.to_owned(), format!("{:.0} us", us(d)))
}

/// Per-side time of the new exchange, `n` times (mean).
fn cpu_new(k: &Keys, n: usize) -> (Duration, Duration) {
    let (mut caller, mut callee) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let t = Instant::now();
        let (start, init) = Initiating::start("joe", "alice", now_unix(), &k.joe).unwrap();
        caller += t.elapsed();
        let t = Instant::now();
        let (ack, tentative) = handshake::respond(&init, &k.alice, &k.joe_pub).unwrap();
        callee += t.elapsed();
        let t = Instant::now();
        let (keys, confirm) = start.finish(&ack, &k.alice_pub).unwrap();
        caller += t.elapsed();
        let t = Instant::now();
        let theirs = tentative.confirm(&confirm).unwrap();
        callee += t.elapsed();
        assert_eq!(keys.id(), theirs.id());
    }
    (caller / n as u32, callee / n as u32)
}

/// The old exchange's caller half: a secret under the callee's key, signed.
fn old_init(k: &Keys) -> ([u8; 32], Vec<u8>, Vec<u8>, Vec<u8>) {
    let secret = crypto::random_array::<32>();
    let nonce = crypto::random_array::<24>().to_vec();
    let key = k.alice_pub.encrypt_oaep(&secret).unwrap();
    let signature = k
        .joe
        .sign_pss(&transcript(
            "ims init v1",
            &[b"joe", b"alice", &now_unix().to_be_bytes(), &nonce, &key],
        ))
        .unwrap();
    (secret, nonce, key, signature)
}

/// The old exchange's callee half (the signature check on a transcript of
/// the same size and the decryption), then its signed answer.
fn old_respond(
    alice: &RsaPrivateKey,
    joe_pub: &RsaPublicKey,
    nonce: &[u8],
    key: &[u8],
    signature: &[u8],
    time: u64,
) -> Vec<u8> {
    joe_pub
        .verify_pss(
            &transcript(
                "ims init v1",
                &[b"joe", b"alice", &time.to_be_bytes(), nonce, key],
            ),
            signature,
        )
        .unwrap();
    let secret = alice.decrypt_oaep(key).unwrap();
    assert_eq!(secret.len(), 32);
    alice
        .sign_pss(&transcript(
            "ims init-ack v1",
            &[b"alice", b"joe", nonce, &[0u8; 24]],
        ))
        .unwrap()
}

/// Per-side time of the old exchange, `n` times (mean).
fn cpu_old(k: &Keys, n: usize) -> (Duration, Duration) {
    let (mut caller, mut callee) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let t = Instant::now();
        let time = now_unix();
        let (_, nonce, key, signature) = old_init(k);
        caller += t.elapsed();
        let t = Instant::now();
        let ack_sig = old_respond(&k.alice, &k.joe_pub, &nonce, &key, &signature, time);
        callee += t.elapsed();
        let t = Instant::now();
        k.alice_pub
            .verify_pss(
                &transcript("ims init-ack v1", &[b"alice", b"joe", &nonce, &[0u8; 24]]),
                &ack_sig,
            )
            .unwrap();
        caller += t.elapsed();
    }
    (caller / n as u32, callee / n as u32)
}

/// `n` set-ups over loopback, each on a new connection as a caller does;
/// (p50, p99, process CPU per set-up).
fn round_trips(k: &Keys, n: usize, new: bool) -> (Duration, Duration, Option<Duration>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (alice, joe_pub) = (k.alice.clone(), k.joe_pub.clone());
    let server = thread::spawn(move || {
        for conn in listener.incoming().take(n + n / 10) {
            let conn = conn.unwrap();
            conn.set_nodelay(true).unwrap();
            let mut r = MessageReader::new(conn);
            let Ok(Some(m)) = r.read_message(&Limits::DEFAULT, Instant::now() + TIMEOUT) else {
                continue;
            };
            if new {
                let init = Init::from_message(&m).unwrap();
                let (ack, tentative) = handshake::respond(&init, &alice, &joe_pub).unwrap();
                write_message(r.get_mut(), &ack.to_message(), Instant::now() + TIMEOUT).unwrap();
                let c = r
                    .read_message(&Limits::DEFAULT, Instant::now() + TIMEOUT)
                    .unwrap()
                    .unwrap();
                tentative
                    .confirm(&Confirm::from_message(&c).unwrap())
                    .unwrap();
            } else {
                let sig = old_respond(
                    &alice,
                    &joe_pub,
                    &m.req_b64("Nonce").unwrap(),
                    &m.req_b64("Key").unwrap(),
                    &m.req_b64("Signature").unwrap(),
                    m.req_parse("Time").unwrap(),
                );
                let ack = Message::ok()
                    .with_header("Nonce", crypto::b64_encode(&[0u8; 24]))
                    .with_header("Echo", m.req("Nonce").unwrap())
                    .with_header("Signature", crypto::b64_encode(&sig));
                write_message(r.get_mut(), &ack, Instant::now() + TIMEOUT).unwrap();
            }
        }
    });
    let mut times = Vec::with_capacity(n);
    let mut cpu_start = None;
    for i in 0..n + n / 10 {
        // The first tenth warms up.
        if i == n / 10 {
            cpu_start = cpu_time();
        }
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        s.set_nodelay(true).unwrap();
        let mut r = MessageReader::new(s);
        if new {
            let (start, init) = Initiating::start("joe", "alice", now_unix(), &k.joe).unwrap();
            write_message(r.get_mut(), &init.to_message(), Instant::now() + TIMEOUT).unwrap();
            let reply = r
                .read_message(&Limits::DEFAULT, Instant::now() + TIMEOUT)
                .unwrap()
                .unwrap();
            let ack = InitAck::from_message(&reply).unwrap();
            let (_, confirm) = start.finish(&ack, &k.alice_pub).unwrap();
            write_message(r.get_mut(), &confirm.to_message(), Instant::now() + TIMEOUT).unwrap();
        } else {
            let time = now_unix();
            let (_, nonce, key, signature) = old_init(k);
            let init = Message::request("INIT")
                .with_header("From", "joe")
                .with_header("To", "alice")
                .with_header("Time", time)
                .with_header("Nonce", crypto::b64_encode(&nonce))
                .with_header("Key", crypto::b64_encode(&key))
                .with_header("Signature", crypto::b64_encode(&signature));
            write_message(r.get_mut(), &init, Instant::now() + TIMEOUT).unwrap();
            let reply = r
                .read_message(&Limits::DEFAULT, Instant::now() + TIMEOUT)
                .unwrap()
                .unwrap();
            k.alice_pub
                .verify_pss(
                    &transcript("ims init-ack v1", &[b"alice", b"joe", &nonce, &[0u8; 24]]),
                    &reply.req_b64("Signature").unwrap(),
                )
                .unwrap();
        }
        if i >= n / 10 {
            times.push(t.elapsed());
        }
    }
    let cpu = match (cpu_start, cpu_time()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) / n as u32),
        _ => None,
    };
    server.join().unwrap();
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99), cpu)
}

/// User + system CPU time of this process so far.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime and stime are
    // the 14th and 15th fields, in ticks of 1/100 s (USER_HZ).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn print_table(rows: &[(String, String)]) {
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!();
    for (what, value) in rows {
        println!("{what:<w$}  {value}");
    }
}
