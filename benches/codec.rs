//! Throughput of the wire codec: `parse`, `parse_head`, `encode` and the
//! buffered `MessageReader` on typical messages of the protocol (a LOGIN
//! request head, a sealed MSG with base64 headers and a 100-byte body, a
//! short reply). Prints one table; MB/s counts input (or output) bytes,
//! 1 MB = 10^6 bytes.
//!
//! Run with `cargo bench --bench codec`. It takes a few seconds: each row
//! is the median of several timed batches, so that other work on a shared
//! machine disturbs it less.

use std::hint::black_box;
use std::io::Cursor;
use std::time::{Duration, Instant};

use ims::wire::io::MessageReader;
use ims::wire::{parse, parse_head, Limits, Message, Status};

/// Batches per row; the median is reported.
const BATCHES: usize = 7;
/// Time per batch.
const BATCH: Duration = Duration::from_millis(60);

/// A LOGIN-like request: six headers (Content-Length included), no body,
/// about 250 bytes on the wire.
fn login() -> Message {
    Message::request("LOGIN")
        .with_header("User", "alice.liddell@example.org")
        .with_header("Client", "ims-client/0.1.0 (linux; x86_64; rustc 1.80)")
        .with_header("Nonce", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c")
        .with_header("Proof", "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=")
        .with_header("Listen", "127.0.0.1:40123")
}

/// A sealed MSG: routing headers, base64 seal headers (a wrapped key as
/// RSA-2048 makes it, a nonce, a tag) and a 100-byte ciphertext body.
fn sealed_msg() -> Message {
    let key: String = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2"
        .repeat(6)
        .chars()
        .take(344)
        .collect();
    Message::request("MSG")
        .with_header("From", "alice")
        .with_header("To", "bob")
        .with_header("Seq", 4711)
        .with_header("Seal-Key", key)
        .with_header("Seal-Nonce", "q83vEjRWeJCrze8S")
        .with_header("Seal-Tag", "3q2+7wAAAAAAAAAAAAAAAA==")
        .with_body((0..100u8).map(|i| i.wrapping_mul(37)).collect::<Vec<u8>>())
}

/// A short success reply with one header.
fn reply() -> Message {
    Message::ok().with_header("Session", "7c9e6679-7425-40de-944b-e07fc1f90ae7")
}

/// Runs `op` in timed batches after a warm-up; returns the median
/// nanoseconds per call.
fn measure(mut op: impl FnMut()) -> f64 {
    // Warm up and find a batch size of about BATCH.
    let mut iters = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..iters {
            op();
        }
        if t.elapsed() >= BATCH / 4 {
            let per = t.elapsed().as_secs_f64() / iters as f64;
            iters = ((BATCH.as_secs_f64() / per) as u64).max(1);
            break;
        }
        iters *= 2;
    }
    let mut samples: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                op();
            }
            t.elapsed().as_nanos() as f64 / iters as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[BATCHES / 2]
}

fn row(name: &str, bytes: usize, ns: f64) {
    let mbs = bytes as f64 / ns * 1e3;
    println!("{name:<46} {bytes:>7} {ns:>10.1} {mbs:>10.1}");
}

fn main() {
    let limits = Limits::DEFAULT;
    let cases = [
        ("LOGIN request", login()),
        ("sealed MSG, 100-byte body", sealed_msg()),
        ("200 reply", reply()),
    ];
    println!(
        "{:<46} {:>7} {:>10} {:>10}",
        "benchmark", "bytes", "ns/op", "MB/s"
    );

    for (name, m) in &cases {
        let bytes = m.encode();
        // Sanity: what is measured is a successful parse of the whole input.
        match parse(&bytes, &limits) {
            Ok(Status::Complete { message, used }) => {
                assert_eq!(&message, m);
                assert_eq!(used, bytes.len());
            }
            other => panic!("{name}: {other:?}"),
        }
        let ns = measure(|| {
            black_box(parse(black_box(&bytes), &limits).unwrap());
        });
        row(&format!("parse {name}"), bytes.len(), ns);
    }

    for (name, m) in &cases {
        let bytes = m.encode();
        let head = bytes.len() - m.body.len() - 2;
        let ns = measure(|| {
            black_box(parse_head(black_box(&bytes[..head]), &limits).unwrap());
        });
        row(&format!("parse_head {name}"), head, ns);
    }

    for (name, m) in &cases {
        let len = m.encoded_len();
        let ns = measure(|| {
            black_box(black_box(m).encode());
        });
        row(&format!("encode {name}"), len, ns);
        let mut out = Vec::with_capacity(len);
        let ns = measure(|| {
            out.clear();
            black_box(m).encode_into(&mut out);
            black_box(&out);
        });
        row(&format!("encode_into {name} (reused)"), len, ns);
    }

    // A reader draining 1000 pipelined messages of each kind from memory.
    for (name, m) in &cases {
        let one = m.encode();
        let stream: Vec<u8> = one.repeat(1000);
        let deadline = Instant::now() + Duration::from_secs(3600);
        let ns = measure(|| {
            let mut r = MessageReader::new(Cursor::new(black_box(&stream[..])));
            let mut n = 0;
            while let Some(m) = r.read_message(&limits, deadline).unwrap() {
                black_box(m);
                n += 1;
            }
            assert_eq!(n, 1000);
        });
        row(&format!("read_message x1000 {name}"), stream.len(), ns);
    }
}
