//! One MS holding many logged-in clients, each on its held login
//! connection, against the real release binaries (a CRS and one MS):
//! - MS memory per online user (VmRSS after the logins less before, over
//!   the users) and the kernel's socket memory (`/proc/net/sockstat`);
//! - keepalive CPU: the MS's CPU time while every client sends its `PING`
//!   every 5 s on its connection, per second and per 100,000 users;
//! - presence latency while they are held: users are paired as buddies;
//!   for a sample of pairs one side's connection is closed and the time
//!   until the other side holds the `offline` push is measured.
//!
//! Simulated clients come from the loopback addresses 127.0.0.2 to
//! 127.0.0.20 (so that 100,000 connections to one port have enough source
//! ports) and live in this process: one poller thread reads every held
//! connection. Both this process and the MS need a descriptor per user:
//! the user count is cut to what the open-files hard limit allows, and
//! said so.
//!
//! Run with `cargo build --release --bins && cargo bench --bench held`
//! (100,000 users by default). Knobs (environment): `IMS_BENCH_HELD_USERS`,
//! `IMS_BENCH_HELD_SECS` (keepalive window, 10), `IMS_BENCH_HELD_SAMPLES`
//! (presence pairs, 1,000). A quick check that the bench works:
//! `IMS_BENCH_HELD_USERS=200 IMS_BENCH_HELD_SECS=2 cargo bench --bench held`.
//!
//! Targets are reported, not asserted: <= 2 KB of MS memory per online
//! user; presence p99 <= 20 ms.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use ims::crs::store::{SledStore, User, Verifier};
use ims::crypto::{self, scram, KdfParams, KdfPolicy, RsaPrivateKey};
use ims::proto;
use ims::proto::crs::{EventKind, SEALED};
use ims::proto::ms::{read_event, Challenge, MsRequest, PUSH};
use ims::proto::Fields;
use ims::seal::{Opener, Role, Sealer, SessionKeys};
use ims::wire::io::{write_message, MessageReader};
use ims::wire::{Limits, Message};
use mio::unix::SourceFd;
use parking_lot::Mutex;

const USERS: usize = 100_000;
const ITERATIONS: u32 = 1000;
const PASSWORD: &str = "bench password";
const TIMEOUT: Duration = Duration::from_secs(30);
const KEEPALIVE: Duration = Duration::from_secs(5);
const SECS: u64 = 10;
const SAMPLES: usize = 1000;
/// Source addresses 127.0.0.2 ..= 127.0.0.20.
const SOURCES: u8 = 19;
/// Descriptors kept for everything but the held connections.
const SPARE_FDS: u64 = 512;
/// Threads logging users in at once.
const LOGIN_THREADS: usize = 16;

fn name(i: usize) -> String {
    format!("h{i:06}")
}

fn index(name: &str, users: usize) -> Option<usize> {
    name.strip_prefix('h')?.parse().ok().filter(|&i| i < users)
}

fn knob(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("IMS_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
                .join("release")
        });
    let p = dir.join(name);
    if !p.is_file() {
        eprintln!(
            "held bench: {} is missing: run `cargo build --release --bins` first",
            p.display()
        );
        std::process::exit(1);
    }
    p
}

fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log).expect("log file"));
    let mut child = cmd.spawn().expect("spawn a server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .ok()
        .and_then(|l| l.strip_prefix("listening on ")?.trim().parse().ok());
    match addr {
        Some(addr) => Proc { child, addr },
        None => {
            let _ = child.kill();
            panic!(
                "a server did not start: {}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time of a process, in clock ticks (100 a second
/// on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after ')'.
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// The TCP line of /proc/net/sockstat (its `mem` is in pages).
fn sockstat_tcp() -> String {
    fs::read_to_string("/proc/net/sockstat")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .unwrap_or("")
        .to_owned()
}

/// What a simulated client keeps.
struct Held {
    /// Shared with the poller (one descriptor per user, not two).
    stream: Arc<TcpStream>,
    login: String,
    send: Sealer,
}

struct World {
    users: usize,
    epoch: Instant,
    keys: Vec<scram::Keys>,
    salts: Vec<Vec<u8>>,
    held: Vec<Mutex<Option<Held>>>,
    push: Vec<Mutex<Option<Opener>>>,
    /// When each user's `offline` push reached its buddy (ns; 0: not yet).
    offline_seen: Vec<AtomicU64>,
    replies: AtomicU64,
    pushes: AtomicU64,
}

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn make_data_set(db: &Path, users: usize) -> (Vec<scram::Keys>, Vec<Vec<u8>>) {
    let k = RsaPrivateKey::generate(crypto::DEFAULT_RSA_BITS).expect("rsa");
    let (private, public) = (
        k.to_der().expect("der"),
        k.public_key().to_der().expect("der"),
    );
    let threads = thread::available_parallelism().map_or(2, |n| n.get());
    let (private, public) = (Arc::new(private), Arc::new(public));
    let parts: Vec<_> = (0..threads)
        .map(|t| {
            let (private, public) = (private.clone(), public.clone());
            thread::spawn(move || {
                (t..users)
                    .step_by(threads)
                    .map(|i| {
                        let params = KdfParams::generate(ITERATIONS);
                        let salted = crypto::derive_salted_password(
                            PASSWORD.as_bytes(),
                            &params,
                            KdfPolicy::Insecure,
                        )
                        .expect("kdf");
                        let keys = scram::Keys::from_salted_password(&salted);
                        let wrapped = scram::wrap(
                            &scram::wrap_key(&salted),
                            &private,
                            &ims::client::account::wrap_aad(&name(i)),
                        )
                        .expect("wrap");
                        let user = User {
                            name: name(i),
                            verifier: Verifier {
                                salt: params.salt.clone(),
                                iterations: ITERATIONS,
                                stored_key: keys.stored_key.to_vec(),
                                server_key: keys.server_key.to_vec(),
                            },
                            profile: Default::default(),
                            public_key: public.to_vec(),
                            wrapped_private_key: wrapped,
                            // Pairs of buddies: 0-1, 2-3, ...
                            contacts: ((i ^ 1) < users).then(|| name(i ^ 1)).into_iter().collect(),
                            requests: Vec::new(),
                            created_unix: 1_700_000_000,
                            blocked: Default::default(),
                            ..Default::default()
                        };
                        (i, user, keys, params.salt)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<_> = parts
        .into_iter()
        .flat_map(|t| t.join().expect("data thread"))
        .collect();
    all.sort_by_key(|(i, ..)| *i);
    let mut keys = Vec::new();
    let mut salts = Vec::new();
    let mut records = Vec::new();
    for (_, u, k, s) in all {
        records.push(u);
        keys.push(k);
        salts.push(s);
    }
    let store = SledStore::open(db).expect("open the store");
    store.bulk_load(records).expect("bulk load");
    (keys, salts)
}

/// Connects to `ms` from loopback source address number `source`.
fn connect_from(ms: SocketAddr, source: u8) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 2 + source % SOURCES), 0);
    socket.bind(&from.into())?;
    socket.connect_timeout(&ms.into(), TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn call(conn: &mut MessageReader<TcpStream>, m: &Message) -> Result<Message, String> {
    write_message(conn.get_mut(), m, Instant::now() + TIMEOUT).map_err(|e| e.to_string())?;
    conn.read_message(&Limits::DEFAULT, Instant::now() + TIMEOUT)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "closed".to_string())
}

/// Logs user `i` in at `ms`; the connection goes to the poller.
fn login(
    world: &World,
    ms: SocketAddr,
    i: usize,
    to_poller: &crossbeam_channel::Sender<(Arc<TcpStream>, Vec<u8>)>,
    wake: &mio::Waker,
) -> Result<(), String> {
    let user = name(i);
    let stream = connect_from(ms, (i % 251) as u8).map_err(|e| format!("connect: {e}"))?;
    let mut conn = MessageReader::new(stream);
    let client_nonce = crypto::random_array::<24>().to_vec();
    let hello = MsRequest::LoginHello {
        user: user.clone(),
        client_nonce: client_nonce.clone(),
    };
    let r = call(&mut conn, &hello.to_message())?;
    let ch = Challenge::from_message(&r).map_err(|e| format!("{e}: {r:?}"))?;
    if ch.salt != world.salts[i] {
        return Err("another salt".into());
    }
    let keys = &world.keys[i];
    let auth = proto::login_auth_message(
        &user,
        &client_nonce,
        &ch.server_nonce,
        &ch.salt,
        ch.iterations,
    );
    let proof = scram::client_proof(&keys.client_key, &keys.stored_key, &auth);
    let mut context = client_nonce.clone();
    context.extend_from_slice(&ch.server_nonce);
    let link = SessionKeys::derive(&keys.client_key, &context, Role::Initiator);
    context.extend_from_slice(b"push");
    let push = SessionKeys::derive(&keys.client_key, &context, Role::Initiator);
    *world.push[i].lock() = Some(push.recv);
    let login = MsRequest::Login {
        proof: proof.to_vec(),
        listen_port: 7300,
    };
    let reply = call(&mut conn, &login.to_message())?;
    if reply.method() != Some(SEALED) {
        return Err(format!("LOGIN: {reply:?}"));
    }
    let login_id = reply.req("Login").map_err(|e| e.to_string())?.to_owned();
    let (stream, rest) = conn.into_parts();
    let stream = Arc::new(stream);
    *world.held[i].lock() = Some(Held {
        stream: stream.clone(),
        login: login_id,
        send: link.send,
    });
    to_poller
        .send((stream, rest))
        .map_err(|_| "poller gone".to_string())?;
    let _ = wake.wake();
    Ok(())
}

/// Reads every held connection: counts replies, records `offline` pushes.
fn poller(
    world: Arc<World>,
    mut poll: mio::Poll,
    new: crossbeam_channel::Receiver<(Arc<TcpStream>, Vec<u8>)>,
    stop: Arc<AtomicBool>,
) {
    let mut conns: HashMap<usize, (Arc<TcpStream>, Vec<u8>)> = HashMap::new();
    let mut next = 1usize;
    let mut events = mio::Events::with_capacity(4096);
    let mut chunk = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(50)));
        let mut ready: Vec<usize> = events
            .iter()
            .map(|e| e.token().0)
            .filter(|&t| t != 0)
            .collect();
        while let Ok((stream, rest)) = new.try_recv() {
            let _ = stream.set_nonblocking(true);
            let fd = stream.as_raw_fd();
            let token = next;
            next += 1;
            if poll
                .registry()
                .register(
                    &mut SourceFd(&fd),
                    mio::Token(token),
                    mio::Interest::READABLE,
                )
                .is_ok()
            {
                conns.insert(token, (stream, rest));
                ready.push(token);
            }
        }
        for token in ready {
            let Some((stream, buf)) = conns.get_mut(&token) else {
                continue;
            };
            let mut closed = false;
            loop {
                match (&**stream).read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            while let Ok(ims::wire::Status::Complete { message, used }) =
                ims::wire::parse(buf, &Limits::DEFAULT)
            {
                buf.drain(..used);
                if message.method() != Some(PUSH) {
                    world.replies.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                world.pushes.fetch_add(1, Ordering::Relaxed);
                let at = now_ns(world.epoch);
                let Some(r) = message.header("User").and_then(|u| index(u, world.users)) else {
                    continue;
                };
                let opened = world.push[r].lock().as_mut().map(|o| o.open(&message));
                if let Some(Ok(inner)) = opened {
                    if let Ok(EventKind::Offline { user }) = read_event(&inner) {
                        if let Some(s) = index(&user, world.users) {
                            world.offline_seen[s].store(at, Ordering::Release);
                        }
                    }
                }
            }
            if closed {
                if let Some((stream, _)) = conns.remove(&token) {
                    let fd = stream.as_raw_fd();
                    let _ = poll.registry().deregister(&mut SourceFd(&fd));
                }
            }
        }
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let k = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes --bench; any other argument filters benches by
    // name, as libtest would.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| "held".contains(f.as_str())) {
        return;
    }
    let limit = ims::prethread::raise_open_files_limit();
    let mut users = knob("IMS_BENCH_HELD_USERS", USERS as u64) as usize;
    // This process and the MS each hold one descriptor per user (the
    // poller and the keepalive writer share it).
    let most = limit.saturating_sub(SPARE_FDS) as usize;
    if users > most {
        eprintln!(
            "held bench: the open-files limit is {limit}: {users} users cut to {most} \
             (raise the hard limit, e.g. `ulimit -Hn 300000` as root, for the full size)"
        );
        users = most;
    }
    let users = users.max(2) & !1;
    let secs = knob("IMS_BENCH_HELD_SECS", SECS);
    let samples = (knob("IMS_BENCH_HELD_SAMPLES", SAMPLES as u64) as usize).min(users / 2);
    let (crs_bin, ms_bin) = (binary("ims-crs"), binary("ims-ms"));

    let dir = tempfile::Builder::new()
        .prefix("ims-held-bench-")
        .tempdir()
        .expect("temp dir");
    let key = dir.path().join("mskey");
    assert!(Command::new(&crs_bin)
        .arg("genkey")
        .arg(&key)
        .status()
        .expect("genkey")
        .success());
    let data = dir.path().join("crs-data");
    fs::create_dir_all(&data).expect("data dir");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("mode");
    }
    let started = Instant::now();
    let (keys, salts) = make_data_set(&data.join("db"), users);
    eprintln!(
        "held bench: {users} users written in {:?}",
        started.elapsed()
    );

    let mut cmd = Command::new(&crs_bin);
    cmd.args(["--listen", "127.0.0.1:0", "--min-iterations", "1000"])
        .arg("--data")
        .arg(&data)
        .arg("--ms-key")
        .arg(&key);
    let crs = spawn(cmd, dir.path().join("crs.log"));
    // The keepalive limit is set far out: logging 100,000 users in takes
    // longer than 15 s, and keepalives only run in their window.
    let conf = dir.path().join("ms.toml");
    fs::write(
        &conf,
        format!(
            "capacity = {}\nclient_timeout_secs = 3600\nlogin_rate_per_sec = 0\n\
             [pool]\nmax_per_source = {}\n",
            users + 10,
            users + 10
        ),
    )
    .expect("ms config");
    let mut cmd = Command::new(&ms_bin);
    cmd.args(["--listen", "127.0.0.1:0", "--fake-iterations", "1000"])
        .arg("-c")
        .arg(&conf)
        .arg("--crs")
        .arg(crs.addr.to_string())
        .arg("--ms-key")
        .arg(&key);
    let ms = spawn(cmd, dir.path().join("ms.log"));
    let ms_pid = ms.child.id();

    let poll = mio::Poll::new().expect("poll");
    let wake = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
    let (to_poller, from_logins) = crossbeam_channel::unbounded();
    let world = Arc::new(World {
        users,
        epoch: Instant::now(),
        keys,
        salts,
        held: (0..users).map(|_| Mutex::new(None)).collect(),
        push: (0..users).map(|_| Mutex::new(None)).collect(),
        offline_seen: (0..users).map(|_| AtomicU64::new(0)).collect(),
        replies: AtomicU64::new(0),
        pushes: AtomicU64::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (w, s) = (world.clone(), stop.clone());
        thread::spawn(move || poller(w, poll, from_logins, s))
    };

    // Log everyone in.
    let rss_before = vm_rss_kib(ms_pid);
    let sock_before = sockstat_tcp();
    let next = AtomicUsize::new(0);
    let errors = AtomicUsize::new(0);
    let started = Instant::now();
    thread::scope(|s| {
        for _ in 0..LOGIN_THREADS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= users {
                    break;
                }
                if let Err(e) = login(&world, ms.addr, i, &to_poller, &wake) {
                    if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("login of {}: {e}", name(i));
                    }
                }
            });
        }
    });
    let logged_in = users - errors.load(Ordering::Relaxed);
    let login_time = started.elapsed();
    // Let the MS settle its allocations.
    thread::sleep(Duration::from_secs(1));
    let rss_after = vm_rss_kib(ms_pid);
    let sock_after = sockstat_tcp();

    // Keepalives: every user pings every 5 s, spread evenly, for `secs`.
    let replies_before = world.replies.load(Ordering::Relaxed);
    let cpu_before = cpu_ticks(ms_pid);
    let window = Instant::now();
    let per_tick = (users as f64 / KEEPALIVE.as_secs_f64() / 100.0).ceil() as usize;
    let mut k = 0usize;
    let mut pings = 0u64;
    while window.elapsed() < Duration::from_secs(secs) {
        let tick = Instant::now();
        for _ in 0..per_tick {
            let i = k % users;
            k += 1;
            let mut guard = world.held[i].lock();
            if let Some(h) = guard.as_mut() {
                let Ok(m) = h.send.seal(
                    SEALED,
                    &[("Login", &h.login)],
                    &MsRequest::Ping.to_message(),
                ) else {
                    continue;
                };
                let mut stream: &TcpStream = &h.stream;
                if write_message(&mut stream, &m, Instant::now() + TIMEOUT).is_ok() {
                    pings += 1;
                }
            }
        }
        if let Some(rest) = Duration::from_millis(10).checked_sub(tick.elapsed()) {
            thread::sleep(rest);
        }
    }
    let took = window.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(500));
    let cpu = (cpu_ticks(ms_pid) - cpu_before) as f64 / 100.0;
    let replies = world.replies.load(Ordering::Relaxed) - replies_before;

    // Presence while held: close one side of `samples` pairs.
    let mut closed_at = Vec::new();
    for p in 0..samples {
        let i = 2 * p * (users / 2 / samples.max(1)).max(1);
        if i + 1 >= users {
            break;
        }
        if let Some(h) = world.held[i].lock().take() {
            let t = now_ns(world.epoch);
            let _ = h.stream.shutdown(std::net::Shutdown::Both);
            closed_at.push((i, t));
        }
        thread::sleep(Duration::from_millis(2));
    }
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end
        && closed_at
            .iter()
            .any(|(i, _)| world.offline_seen[*i].load(Ordering::Acquire) == 0)
    {
        thread::sleep(Duration::from_millis(20));
    }
    let mut lat: Vec<f64> = closed_at
        .iter()
        .filter_map(|(i, t)| {
            let seen = world.offline_seen[*i].load(Ordering::Acquire);
            (seen != 0).then(|| seen.saturating_sub(*t) as f64 / 1e6)
        })
        .collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    drop(ms);
    drop(crs);

    let per_user = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / logged_in.max(1) as f64;
    println!();
    println!(
        "held bench: {logged_in} of {users} users held by one MS (logins took {login_time:?})"
    );
    println!(
        "  MS RSS: {rss_before} KiB -> {rss_after} KiB: {per_user:.0} bytes per online user (target <= 2048)"
    );
    println!("  kernel sockets before: {sock_before}");
    println!("  kernel sockets after:  {sock_after}  (mem in pages of 4 KiB)");
    println!(
        "  keepalives: {pings} PINGs in {took:.1} s ({:.0}/s), {replies} replies; MS CPU {cpu:.2} s = {:.3} CPU-seconds per second per 100,000 users",
        pings as f64 / took,
        cpu / took * 100_000.0 / logged_in.max(1) as f64
    );
    println!(
        "  presence (offline push to a buddy after a close), {} of {} seen: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 <= 20)",
        lat.len(),
        closed_at.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
}
