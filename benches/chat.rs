//! End-to-end chat benchmark: a CRS, an MS and two clients (alice, bob) in
//! this one process, talking over loopback through the library.
//!
//! Measures, and prints as a table:
//! 1. one-way message throughput for one pair (100-byte messages, sent
//!    without waiting, counted until every `Delivered` and every `Message`
//!    event arrived);
//! 2. round-trip time of one message (send, wait for its `Delivered`);
//! 3. file-transfer throughput of a large random file, beside the
//!    full-work baseline measured in the same run (the same work with no
//!    protocol: read in the transfer's chunk size, AES-256-GCM seal,
//!    loopback TCP, open, SHA-256, write to a file in the same directory,
//!    fsync), and three partial ones: AES-256-GCM on one core, raw
//!    loopback TCP, and seal → TCP → open of 64 KiB records.
//!
//! Each measure is taken for a direct pair, a pair whose listeners cannot
//! be reached (relayed by one MS) and such a pair on two MSs; the MSs'
//! per-user relay rate limit is off, so that the relay's own speed shows.
//!
//! `cargo bench --bench chat`; `IMS_BENCH_QUICK=1` for small sizes (seconds).
//! Full sizes need the `--bench` argument that `cargo bench` passes (run
//! the binary by hand with it); without it, as under `cargo test
//! --all-targets`, the benchmark only runs once with tiny sizes, as a test.
//! Temporary files go to /dev/shm when it exists (so the disk is not what
//! is measured), else to the system's temporary directory; `IMS_BENCH_DIR`
//! overrides; `IMS_BENCH_ONLY=messages|rtt|file` runs one part (profiling).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver};
use ims::client::events::Event;
use ims::client::{self, ClientConfig};
use ims::crypto::{aes_gcm_open_in_place, aes_gcm_seal_in_place, Sha256, GCM_TAG_LEN};
use ims::keyfile::{self, hex};
use ims::{crs, ms};

/// Bytes of text per message.
const MSG_BYTES: usize = 100;
/// Record size of the AES and seal-send-open baselines.
const RECORD: usize = 64 * 1024;
/// PBKDF2 iterations for the benchmark's accounts.
const KDF_ITERATIONS: u32 = 1_000;
/// Bound on any single wait for an event.
const EVENT_WAIT: Duration = Duration::from_secs(60);

struct Sizes {
    messages: usize,
    round_trips: usize,
    file_bytes: u64,
    baseline_bytes: u64,
}

impl Sizes {
    /// The sizes for this run and what to call them.
    fn from_env() -> (Sizes, &'static str) {
        let quick = std::env::var("IMS_BENCH_QUICK").is_ok_and(|v| v == "1");
        let bench = std::env::args().any(|a| a == "--bench");
        if !bench {
            let smoke = Sizes {
                messages: 2_000,
                round_trips: 200,
                file_bytes: 4 << 20,
                baseline_bytes: 16 << 20,
            };
            (smoke, " [smoke test: no --bench argument, tiny sizes]")
        } else if quick {
            let quick = Sizes {
                messages: 20_000,
                round_trips: 2_000,
                file_bytes: 64 << 20,
                baseline_bytes: 256 << 20,
            };
            (quick, " [quick]")
        } else {
            let full = Sizes {
                messages: 200_000,
                round_trips: 10_000,
                file_bytes: 1 << 30,
                baseline_bytes: 1 << 30,
            };
            (full, "")
        }
    }
}

fn main() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error"))
        .try_init();
    let (sizes, mode) = Sizes::from_env();
    let base = bench_dir();
    let dir = tempfile::Builder::new()
        .prefix("ims-chat-bench-")
        .tempdir_in(&base)
        .expect("temporary directory");
    println!(
        "ims chat benchmark{mode} (temporary files in {})",
        base.display()
    );

    let only = std::env::var("IMS_BENCH_ONLY").unwrap_or_default();
    let run = |part: &str| only.is_empty() || only == part;
    let cluster = Cluster::start(dir.path());
    let mut rows: Vec<Row> = Vec::new();
    if run("messages") {
        measure_messages(&cluster, &sizes, &mut rows);
    }
    if run("rtt") {
        measure_rtt(&cluster, &sizes, &mut rows);
    }
    if run("file") {
        measure_file(&cluster, dir.path(), &sizes, &mut rows);
    }
    cluster.stop();
    print_table(&rows);
}

/// Measure 1: messages per second, one way, one pair (direct, relayed
/// by one MS, relayed across two).
fn measure_messages(cluster: &Cluster, sizes: &Sizes, rows: &mut Vec<Row>) {
    let rate = message_throughput(&cluster.direct, sizes.messages);
    rows.push(Row::new(
        format!("messages/s (one pair, {MSG_BYTES} B, n={})", sizes.messages),
        format!("{rate:.0}"),
        ">= 50000",
        rate >= 50_000.0,
    ));
    for (what, pair) in [
        ("  relayed, one MS", &cluster.relayed),
        ("  relayed, two MSs", &cluster.relayed2),
    ] {
        let rate = message_throughput(pair, sizes.messages);
        rows.push(Row::new(what, format!("{rate:.0}"), "", true));
    }
}

/// Measure 2: round trips, direct and relayed.
fn measure_rtt(cluster: &Cluster, sizes: &Sizes, rows: &mut Vec<Row>) {
    let (p50, p99) = round_trips(&cluster.direct, sizes.round_trips);
    rows.push(Row::new(
        format!("RTT p50 ({MSG_BYTES} B, n={})", sizes.round_trips),
        format!("{:.1} us", p50.as_secs_f64() * 1e6),
        "<= 150 us",
        p50 <= Duration::from_micros(150),
    ));
    rows.push(Row::new(
        "RTT p99",
        format!("{:.1} us", p99.as_secs_f64() * 1e6),
        "",
        true,
    ));
    for (what, pair) in [
        ("  relayed, one MS", &cluster.relayed),
        ("  relayed, two MSs", &cluster.relayed2),
    ] {
        let (p50, p99) = round_trips(pair, sizes.round_trips);
        rows.push(Row::new(
            format!("{what}: RTT p50 / p99"),
            format!(
                "{:.1} / {:.1} us",
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6
            ),
            "",
            true,
        ));
    }
}

/// Measure 3: file transfer beside its baselines, measured in the same
/// run (the full-work baseline, the same work with no protocol around
/// it, before and after the transfers; and the older partial ones).
fn measure_file(cluster: &Cluster, dir: &Path, sizes: &Sizes, rows: &mut Vec<Row>) {
    let aes = aes_throughput(sizes.baseline_bytes);
    let tcp = tcp_throughput(sizes.baseline_bytes);
    let sealed_before = sealed_tcp_throughput(sizes.baseline_bytes);
    let (work_before, work_cpu_before) = full_work_baseline(dir, sizes.file_bytes);
    let (file, file_cpu) = file_transfer(&cluster.direct, dir, sizes.file_bytes);
    let (relayed, _) = file_transfer(&cluster.relayed, dir, sizes.file_bytes);
    let (relayed2, _) = file_transfer(&cluster.relayed2, dir, sizes.file_bytes);
    let (work_after, work_cpu_after) = full_work_baseline(dir, sizes.file_bytes);
    let sealed_after = sealed_tcp_throughput(sizes.baseline_bytes);
    let baseline = (sealed_before + sealed_after) / 2.0;
    let work = (work_before + work_after) / 2.0;
    let work_cpu = match (work_cpu_before, work_cpu_after) {
        (Some(a), Some(b)) => Some((a + b) / 2.0),
        _ => None,
    };
    let ns = |v: Option<f64>| v.map_or("?".into(), |v| format!("{v:.2} ns/B"));
    rows.push(Row::new(
        format!("file transfer MB/s ({} MiB)", sizes.file_bytes >> 20),
        format!("{file:.0} ({})", ns(file_cpu)),
        "",
        true,
    ));
    rows.push(Row::new(
        "  full-work baseline MB/s (before/after; CPU)",
        format!(
            "{work:.0} ({work_before:.0}/{work_after:.0}; {})",
            ns(work_cpu)
        ),
        "",
        true,
    ));
    let ratio = file / work;
    rows.push(Row::new(
        "file / full-work baseline",
        format!("{ratio:.2}"),
        ">= 0.80",
        ratio >= 0.80,
    ));
    if let (Some(f), Some(w)) = (file_cpu, work_cpu) {
        let cpu_ratio = f / w;
        rows.push(Row::new(
            "file CPU per byte / baseline's",
            format!("{cpu_ratio:.2}"),
            "<= 1.25",
            cpu_ratio <= 1.25,
        ));
    }
    let relayed_ratio = relayed / work;
    rows.push(Row::new(
        "  relayed (one MS) MB/s, / baseline",
        format!("{relayed:.0}, {relayed_ratio:.2}"),
        ">= 0.40",
        relayed_ratio >= 0.40,
    ));
    rows.push(Row::new(
        "  relayed (two MSs) MB/s, / baseline",
        format!("{relayed2:.0}, {:.2}", relayed2 / work),
        "",
        true,
    ));
    rows.push(Row::new(
        "  AES-256-GCM seal MB/s (1 core, 64 KiB)",
        format!("{aes:.0}"),
        "",
        true,
    ));
    rows.push(Row::new(
        "  raw loopback TCP MB/s",
        format!("{tcp:.0}"),
        "",
        true,
    ));
    rows.push(Row::new(
        "  seal+TCP+open MB/s (64 KiB, before/after)",
        format!("{baseline:.0} ({sealed_before:.0}/{sealed_after:.0})"),
        "",
        true,
    ));
}

/// The work a file transfer must do, with no protocol around it: read a
/// file of `size` random bytes in chunks of the transfer's size, seal
/// each with AES-256-GCM, send it over loopback TCP, open it, hash the
/// plaintext with SHA-256, write it to a file in the same directory and
/// fsync that at the end. (MB/s, CPU ns per byte).
fn full_work_baseline(dir: &Path, size: u64) -> (f64, Option<f64>) {
    let source = dir.join("baseline-in.bin");
    let sink = dir.join("baseline-out.bin");
    let sha = random_file(&source, size);
    let (mut w, mut r) = loopback_pair();
    let key = [5u8; 32];
    let chunk = ims::client::files::CHUNK;
    let cpu = cpu_time();
    let started = Instant::now();
    let reader_path = source.clone();
    let writer = std::thread::spawn(move || {
        let mut f = File::open(&reader_path).expect("open the baseline's file");
        let mut buf = Vec::with_capacity(chunk + GCM_TAG_LEN);
        let mut i = 0u64;
        loop {
            buf.resize(chunk, 0);
            let mut n = 0;
            while n < chunk {
                let got = f.read(&mut buf[n..]).expect("read");
                if got == 0 {
                    break;
                }
                n += got;
            }
            if n == 0 {
                return;
            }
            buf.truncate(n);
            aes_gcm_seal_in_place(&key, &nonce(i), b"aad", &mut buf).expect("seal");
            w.write_all(&(buf.len() as u32).to_be_bytes())
                .expect("write");
            w.write_all(&buf).expect("write");
            i += 1;
        }
    });
    let mut out = File::create(&sink).expect("create the baseline's output");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk + GCM_TAG_LEN];
    let mut got = 0u64;
    let mut i = 0u64;
    while got < size {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).expect("read");
        let len = u32::from_be_bytes(len) as usize;
        buf.resize(len, 0);
        r.read_exact(&mut buf).expect("read");
        aes_gcm_open_in_place(&key, &nonce(i), b"aad", &mut buf).expect("open");
        hasher.update(&buf);
        out.write_all(&buf).expect("write the output");
        got += buf.len() as u64;
        i += 1;
    }
    out.sync_all().expect("fsync");
    let elapsed = started.elapsed();
    writer.join().expect("writer");
    let per_byte = cpu_ns(cpu, size);
    assert_eq!(hex(&hasher.finish()), sha, "baseline's SHA-256");
    std::fs::remove_file(&source).expect("remove");
    std::fs::remove_file(&sink).expect("remove");
    println!(
        "full-work baseline: {} MiB in {:.2} s ({})",
        size >> 20,
        elapsed.as_secs_f64(),
        per_byte.map_or("CPU unknown".into(), |v| format!("{v:.2} ns/B"))
    );
    (mb_per_s(size, elapsed), per_byte)
}

/// CPU nanoseconds per unit since `since`, for `count` units.
fn cpu_ns(since: Option<Duration>, count: u64) -> Option<f64> {
    let used = cpu_time()?.saturating_sub(since?);
    Some(used.as_secs_f64() * 1e9 / count.max(1) as f64)
}

/// Where the temporary files go.
fn bench_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IMS_BENCH_DIR") {
        return PathBuf::from(d);
    }
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

struct Row {
    what: String,
    value: String,
    target: &'static str,
    met: bool,
}

impl Row {
    fn new(what: impl Into<String>, value: String, target: &'static str, met: bool) -> Row {
        Row {
            what: what.into(),
            value,
            target,
            met,
        }
    }
}

fn print_table(rows: &[Row]) {
    let w = rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
    let v = rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
    println!();
    println!("{:<w$}  {:>v$}  target", "measure", "value");
    println!("{}", "-".repeat(w + v + 22));
    for r in rows {
        let mark = match (r.target.is_empty(), r.met) {
            (true, _) => "",
            (false, true) => "  ok",
            (false, false) => "  MISSED",
        };
        println!("{:<w$}  {:>v$}  {}{mark}", r.what, r.value, r.target);
    }
}

/// Two users logged in and buddies: `a` talks to `b`.
struct Pair {
    a: client::Running,
    a_events: Receiver<Event>,
    a_name: &'static str,
    b: client::Running,
    b_events: Receiver<Event>,
    b_name: &'static str,
}

impl Pair {
    fn shutdown(self) {
        self.a.shutdown();
        self.b.shutdown();
    }
}

/// A CRS and two MSs; alice and bob (direct), carol and dave (relayed by
/// one MS: neither can be reached), erin and frank (relayed, on two MSs).
struct Cluster {
    crs: crs::Running,
    ms: ms::Running,
    ms2: ms::Running,
    direct: Pair,
    relayed: Pair,
    relayed2: Pair,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let started = Instant::now();
        let ms_key = dir.join("mskey");
        keyfile::generate_ms_key(&ms_key).expect("MSkey");
        let crs = crs::start(crs::CrsConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.join("crs"),
            ms_key_file: ms_key.clone(),
            min_iterations: KDF_ITERATIONS,
            ..crs::CrsConfig::default()
        })
        .expect("CRS start");
        let crs_addr = crs.local_addr().to_string();
        // The relay's own speed is measured, not its per-user limit.
        let ms = ms::start(ms::MsConfig {
            listen: "127.0.0.1:0".into(),
            crs: crs_addr.clone(),
            ms_key_file: ms_key.clone(),
            fake_iterations: KDF_ITERATIONS,
            relay_rate: 0.0,
            ..ms::MsConfig::default()
        })
        .expect("MS start");
        let client = |name: &str, reachable: bool| {
            let (tx, rx) = unbounded();
            let config = ClientConfig {
                crs: crs_addr.clone(),
                listen: "127.0.0.1:0".into(),
                // A port nothing listens on: buddies must relay.
                advertise_port: (!reachable).then_some(1),
                kdf_iterations: KDF_ITERATIONS,
                insecure_kdf: true,
                download_dir: dir.join(format!("{name}-downloads")),
                state_dir: dir.join(format!("{name}-state")),
                ack_timeout: Duration::from_secs(60),
                ..ClientConfig::default()
            };
            let running = client::start(config, tx).expect("client start");
            (running, rx)
        };
        let pair = |a_name: &'static str, b_name: &'static str, reachable: bool| {
            let (a, a_events) = client(a_name, reachable);
            let (b, b_events) = client(b_name, reachable);
            for (c, name) in [(&a, a_name), (&b, b_name)] {
                c.client
                    .register(name, "correct horse battery", Default::default())
                    .expect("register");
                c.client
                    .login(name, "correct horse battery")
                    .expect("login");
            }
            befriend(&a, &a_events, a_name, &b, &b_events, b_name);
            Pair {
                a,
                a_events,
                a_name,
                b,
                b_events,
                b_name,
            }
        };
        let direct = pair("alice", "bob", true);
        let relayed = pair("carol", "dave", false);
        // A second MS that takes one user: erin logs in there (it is the
        // less loaded), frank then at the first.
        let ms2 = ms::start(ms::MsConfig {
            listen: "127.0.0.1:0".into(),
            crs: crs_addr.clone(),
            ms_key_file: ms_key,
            fake_iterations: KDF_ITERATIONS,
            capacity: 1,
            relay_rate: 0.0,
            ..ms::MsConfig::default()
        })
        .expect("second MS start");
        let relayed2 = pair("erin", "frank", false);
        assert_ne!(
            relayed2.a.client.ms_addr(),
            relayed2.b.client.ms_addr(),
            "erin and frank on one MS"
        );
        println!(
            "cluster up: CRS {}, MSs {} and {}, three pairs ({:.1} s)",
            crs.local_addr(),
            ms.local_addr(),
            ms2.local_addr(),
            started.elapsed().as_secs_f64()
        );
        Cluster {
            crs,
            ms,
            ms2,
            direct,
            relayed,
            relayed2,
        }
    }

    fn stop(self) {
        self.direct.shutdown();
        self.relayed.shutdown();
        self.relayed2.shutdown();
        for ms in [self.ms, self.ms2] {
            ms.stopper().stop();
            ms.join();
        }
        self.crs.stopper().stop();
        self.crs.join();
    }
}

/// `a` asks `b` to be buddies, `b` accepts; both see it.
fn befriend(
    a: &client::Running,
    a_events: &Receiver<Event>,
    a_name: &str,
    b: &client::Running,
    b_events: &Receiver<Event>,
    b_name: &str,
) {
    a.client.add(b_name).expect("add");
    wait_for(
        b_events,
        |e| matches!(e, Event::Request { from } if from == a_name),
    );
    b.client.accept(a_name).expect("accept");
    wait_for(
        a_events,
        |e| matches!(e, Event::BuddyAdded { user, .. } if user == b_name),
    );
    wait_for(
        b_events,
        |e| matches!(e, Event::BuddyAdded { user, .. } if user == a_name),
    );
}

/// Waits for the first event that `want` matches, dropping the others.
fn wait_for(rx: &Receiver<Event>, want: impl Fn(&Event) -> bool) -> Event {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(e) if want(&e) => return e,
            Ok(Event::SendFailed { reason, .. }) => panic!("send failed: {reason}"),
            Ok(Event::FileFailed { reason, .. }) => panic!("file transfer failed: {reason}"),
            Ok(_) => {}
            Err(_) => panic!("no awaited event within {EVENT_WAIT:?}"),
        }
    }
}

/// A text of exactly `MSG_BYTES` bytes.
fn text(i: usize) -> String {
    let mut t = format!("message {i:>10} ");
    while t.len() < MSG_BYTES {
        t.push('x');
    }
    t.truncate(MSG_BYTES);
    t
}

/// Alice sends `n` messages without waiting; returns messages per second
/// until every `Delivered` (alice) and `Message` (bob) event arrived.
fn message_throughput(p: &Pair, n: usize) -> f64 {
    // Warm up: opens the session (INIT) and the connections.
    for i in 0..100 {
        p.a.client.send_message(p.b_name, &text(i)).expect("send");
    }
    for _ in 0..100 {
        wait_for(&p.a_events, |e| matches!(e, Event::Delivered { .. }));
        wait_for(&p.b_events, |e| matches!(e, Event::Message { .. }));
    }
    let texts: Vec<String> = (0..n).map(text).collect();
    let cpu = cpu_time();
    let started = Instant::now();
    // Ids come from one counter: a bitmap over their range tells each
    // delivery apart more cheaply than a hash set would.
    let mut ids = Vec::with_capacity(n);
    for t in &texts {
        ids.push(p.a.client.send_message(p.b_name, t).expect("send"));
    }
    let sent = started.elapsed();
    let first = ids.iter().copied().min().unwrap_or(0);
    let mut waiting = vec![false; n.max(1) * 2];
    for &id in &ids {
        let slot = waiting
            .get_mut((id - first) as usize)
            .expect("ids in range");
        assert!(!*slot, "id {id} given twice");
        *slot = true;
    }
    let mut delivered = 0;
    while delivered < n {
        if let Event::Delivered { id, .. } =
            wait_for(&p.a_events, |e| matches!(e, Event::Delivered { .. }))
        {
            let slot = id
                .checked_sub(first)
                .and_then(|i| waiting.get_mut(i as usize));
            match slot {
                Some(s) if *s => *s = false,
                _ => panic!("unexpected delivery of {id}"),
            }
            delivered += 1;
        }
    }
    let mut received = 0;
    while received < n {
        if let Event::Message { text, .. } =
            wait_for(&p.b_events, |e| matches!(e, Event::Message { .. }))
        {
            assert_eq!(text.len(), MSG_BYTES);
            received += 1;
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_note(cpu, n as u64, "message");
    println!(
        "messages: {n} sent in {:.2} s, all delivered and received in {:.2} s ({cpu})",
        sent.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    n as f64 / elapsed.as_secs_f64()
}

/// Send one, wait for its `Delivered`, `n` times; (p50, p99).
fn round_trips(p: &Pair, n: usize) -> (Duration, Duration) {
    let t = text(0);
    let mut times = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let started = Instant::now();
        let id = p.a.client.send_message(p.b_name, &t).expect("send");
        match wait_for(&p.a_events, |e| matches!(e, Event::Delivered { .. })) {
            Event::Delivered { id: got, .. } => assert_eq!(got, id),
            _ => unreachable!(),
        }
        // The first tenth warms up.
        if i >= n / 10 {
            times.push(started.elapsed());
        }
        while p.b_events.try_recv().is_ok() {}
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    (pct(0.50), pct(0.99))
}

/// xorshift64*: a fast generator for incompressible file content.
struct XorShift(u64);

impl XorShift {
    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

/// Writes `size` random bytes to `path`; returns their hex SHA-256.
fn random_file(path: &Path, size: u64) -> String {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ size);
    let mut f = File::create(path).expect("create the test file");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        f.write_all(&buf[..n]).expect("write the test file");
        left -= n as u64;
    }
    hex(&hasher.finish())
}

fn file_sha256(path: &Path) -> String {
    let mut f = File::open(path).expect("open the received file");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read the received file");
        if n == 0 {
            return hex(&hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// CPU time used by this whole process so far (all threads, user and
/// system), where /proc tells it; shows how much work a measure costs,
/// which a machine shared with other work blurs less than wall time.
fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesized command name; utime and stime are
    // the 14th and 15th fields, in ticks of 1/100 s (USER_HZ).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// "CPU 1.23 s, 4.5 ns/B" for the CPU time since `since`, per `count` `unit`s.
fn cpu_note(since: Option<Duration>, count: u64, unit: &str) -> String {
    match (since, cpu_time()) {
        (Some(a), Some(b)) => {
            let used = b.saturating_sub(a);
            format!(
                "CPU {:.2} s, {:.2} ns/{unit}",
                used.as_secs_f64(),
                used.as_secs_f64() * 1e9 / count as f64
            )
        }
        _ => "CPU unknown".into(),
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

/// Alice sends a random file of `size` bytes to bob; MB/s from bob's
/// acceptance to his `FileReceived`.
fn file_transfer(p: &Pair, dir: &Path, size: u64) -> (f64, Option<f64>) {
    let source = dir.join("payload.bin");
    let made = Instant::now();
    let sha = random_file(&source, size);
    println!(
        "file: {} MiB of random data written in {:.2} s",
        size >> 20,
        made.elapsed().as_secs_f64()
    );
    let offered = Instant::now();
    let id = p.a.client.send_file(p.b_name, &source).expect("offer");
    match wait_for(&p.b_events, |e| matches!(e, Event::FileOffer { .. })) {
        Event::FileOffer {
            id: got, size: s, ..
        } => {
            assert_eq!((got, s), (id, size));
        }
        _ => unreachable!(),
    }
    let offer_time = offered.elapsed();
    let cpu = cpu_time();
    let started = Instant::now();
    p.b.client.accept_file(p.a_name).expect("accept");
    let received = wait_for(&p.b_events, |e| matches!(e, Event::FileReceived { .. }));
    let elapsed = started.elapsed();
    let per_byte = cpu_ns(cpu, size);
    let cpu = cpu_note(cpu, size, "B");
    wait_for(&p.a_events, |e| matches!(e, Event::FileSent { .. }));
    let Event::FileReceived {
        path,
        sha256,
        size: got,
        ..
    } = received
    else {
        unreachable!()
    };
    assert_eq!(got, size);
    assert_eq!(sha256, sha, "reported SHA-256");
    let path = PathBuf::from(path);
    assert_eq!(file_sha256(&path), sha, "SHA-256 of the received file");
    std::fs::remove_file(&path).expect("remove the received file");
    std::fs::remove_file(&source).expect("remove the sent file");
    println!(
        "file: offered (hashed) in {:.2} s, transferred in {:.2} s ({cpu}), SHA-256 equal",
        offer_time.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    (mb_per_s(size, elapsed), per_byte)
}

/// Incompressible plaintext for the baselines.
fn pattern(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    XorShift(42).fill(&mut v);
    v
}

/// AES-256-GCM sealing of 64 KiB records on one core, MB/s.
fn aes_throughput(total: u64) -> f64 {
    let key = [7u8; 32];
    let plain = pattern(RECORD);
    let mut buf = Vec::with_capacity(RECORD + GCM_TAG_LEN);
    let records = total / RECORD as u64;
    let started = Instant::now();
    for i in 0..records {
        buf.clear();
        buf.extend_from_slice(&plain);
        aes_gcm_seal_in_place(&key, &nonce(i), b"aad", &mut buf).expect("seal");
    }
    mb_per_s(records * RECORD as u64, started.elapsed())
}

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

/// A connected loopback pair: (client end, server end).
fn loopback_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
    let (b, _) = listener.accept().expect("accept");
    a.set_nodelay(true).expect("nodelay");
    b.set_nodelay(true).expect("nodelay");
    (a, b)
}

/// A writer thread pushing `total` bytes through loopback TCP to a reader.
fn tcp_throughput(total: u64) -> f64 {
    let (mut w, mut r) = loopback_pair();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let buf = pattern(256 * 1024);
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            w.write_all(&buf[..n]).expect("write");
            left -= n as u64;
        }
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < total {
        let n = r.read(&mut buf).expect("read");
        assert!(n > 0, "early EOF");
        got += n as u64;
    }
    let elapsed = started.elapsed();
    writer.join().expect("writer");
    mb_per_s(total, elapsed)
}

/// A writer thread sealing 64 KiB records and writing them over loopback
/// TCP to a reader that opens them; MB/s of plaintext.
fn sealed_tcp_throughput(total: u64) -> f64 {
    let (mut w, mut r) = loopback_pair();
    let key = [9u8; 32];
    let records = total / RECORD as u64;
    let cpu = cpu_time();
    let started = Instant::now();
    let writer = std::thread::spawn(move || {
        let plain = pattern(RECORD);
        let mut buf = Vec::with_capacity(RECORD + GCM_TAG_LEN);
        for i in 0..records {
            buf.clear();
            buf.extend_from_slice(&plain);
            aes_gcm_seal_in_place(&key, &nonce(i), b"aad", &mut buf).expect("seal");
            w.write_all(&buf).expect("write");
        }
    });
    let mut buf = vec![0u8; RECORD + GCM_TAG_LEN];
    for i in 0..records {
        buf.resize(RECORD + GCM_TAG_LEN, 0);
        r.read_exact(&mut buf).expect("read");
        aes_gcm_open_in_place(&key, &nonce(i), b"aad", &mut buf).expect("open");
        assert_eq!(buf.len(), RECORD);
    }
    let elapsed = started.elapsed();
    writer.join().expect("writer");
    let bytes = records * RECORD as u64;
    println!(
        "seal+TCP+open: {} MiB in {:.2} s ({})",
        bytes >> 20,
        elapsed.as_secs_f64(),
        cpu_note(cpu, bytes, "B")
    );
    mb_per_s(bytes, elapsed)
}
