//! Logins per second, presence latency, MS memory per online user and CRS
//! disk per registered user, against the real release binaries: one CRS
//! and two MSs, 10,000 registered users with 20 buddies each, and clients
//! simulated with the library.
//!
//! Run with `make bench` or `cargo build --release --bins && cargo bench
//! --bench login` (benches do not build the binaries). The binaries are
//! looked up in `$IMS_BIN_DIR`, else `$CARGO_TARGET_DIR/release`, else
//! `target/release` of this crate.
//!
//! What is measured, and how:
//! - the data set is written straight into a sled database with
//!   [`SledStore::bulk_load`] before the CRS starts. Every user has their
//!   own salt and verifier (derived once, 1000 PBKDF2 iterations, kept in
//!   memory so that simulated clients do no key derivation: the servers are
//!   measured); a handful of RSA keys is shared, the servers do not care;
//! - logins per second: many simulated clients at once, each login a full
//!   `LOGIN-HELLO` + `LOGIN` of a distinct user, preceded by `LOCATE` at
//!   the CRS for a user's first login only (later ones go straight to the
//!   MS of the last, as the client does; the first round is reported on
//!   its own line), all of them
//!   logged out after a round so the next round starts the same way; best
//!   round. Twice: for users none of whose buddies is online (the login
//!   path alone), and for users 0..8000 whose ring neighbours log in around
//!   them (each login then pushes presence to about 10 online buddies, each
//!   push a message on the buddy's held login connection);
//! - presence latency: from the moment a client holds its login reply to
//!   the moment each of its online buddies' clients holds the `online`
//!   push (0 when the push came first), and from the moment it sent
//!   `LOGIN`. Every simulated client keeps its login connection (the MS
//!   pushes on it, and its close logs the user out); one poller thread
//!   reads them all and routes each `PUSH` by its clear `User` header to
//!   that user's push keys. A logout closes the connection. Measured
//!   with logins one at a time against a background of online users (light
//!   load), and during the throughput rounds (saturation);
//! - MS memory: the MSs' VmRSS before and after the first round's users
//!   logged in, over the number of users;
//! - CRS disk: the data directory's size over the number of users.
//!
//! Targets are reported, not asserted: >= 3,000 logins/s, presence p99
//! <= 5 ms, <= 2 KB of MS memory per online user.
//!
//! Knobs (environment): `IMS_BENCH_CLIENTS` (simulated clients at once,
//! 16), `IMS_BENCH_ROUNDS` (3), `IMS_BENCH_ROUND_USERS` (8000),
//! `IMS_BENCH_MS_WORKERS` (the MSs' `--workers`), `IMS_BENCH_PUSH_THREADS`
//! (the MSs' `push_threads`), `IMS_BENCH_SOLO_ROUNDS` (6), `IMS_BENCH_LIGHT`
//! (light-load logins, 1000, with four times as many online in the
//! background), `IMS_BENCH_STORE`: `sled` (the default: one
//! CRS on sled), `postgres` (one CRS on PostgreSQL) or `postgres2` (two CRS
//! instances on one PostgreSQL database, each MS on its own instance). The
//! PostgreSQL variants start a server of their own (initdb into a temporary
//! directory, as the tests do). CPU time per login of each process (CRS
//! instances, PostgreSQL with its backends, MSs, and this process: the
//! simulated clients) is reported for the throughput rounds and for the
//! login path alone: on a shared machine it tells how the parts would
//! scale each on its own machine, and what presence costs each.
//!
//! A quick run that only checks that the bench works:
//! `IMS_BENCH_ROUNDS=1 IMS_BENCH_ROUND_USERS=200 IMS_BENCH_SOLO_ROUNDS=1
//! IMS_BENCH_LIGHT=100 cargo bench --bench login`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use ims::crs::store::{PgStore, SledStore, User, Verifier};
use ims::crypto::{self, scram, KdfParams, KdfPolicy, RsaPrivateKey};
use ims::proto;
use ims::proto::crs::{EventKind, SEALED};
use ims::proto::ms::{read_event, Challenge, MsRequest, PUSH};
use ims::proto::Fields;
use ims::seal::{Opener, Role, SessionKeys};
use ims::wire::io::{write_message, MessageReader};
use ims::wire::{Limits, Message};
use parking_lot::Mutex;

#[path = "../tests/pg/mod.rs"]
mod pg;

/// Registered users.
const USERS: usize = 10_000;
/// Buddies of each: the 10 users before and the 10 after, on a ring.
const BUDDIES: usize = 20;
/// PBKDF2 iterations of the data set (derived once per user).
const ITERATIONS: u32 = 1000;
/// RSA key pairs shared by all users.
const RSA_KEYS: usize = 4;
/// Users logged in per throughput round.
const ROUND_USERS: usize = 8_000;
/// Throughput rounds; the best counts.
const ROUNDS: usize = 3;
/// Simulated clients logging in at once (override: IMS_BENCH_CLIENTS).
const CLIENTS: usize = 16;
/// The listener port simulated clients announce; nothing connects there
/// (the MS pushes on the login connection).
const LISTEN_PORT: u16 = 7300;
/// Tries of a login refused because the same user's previous login (just
/// closed) has not ended yet at the servers.
const LOGGED_IN_RETRIES: usize = 2000;
/// Login path alone: users 11 apart on the ring (none is another's
/// buddy, so no presence is pushed), logged in and out this many times.
const SOLO_ROUNDS: usize = 6;
/// Light-load presence phase: background users online, then this many
/// logins one at a time.
const LIGHT_BACKGROUND: usize = 4_000;
const LIGHT_LOGINS: usize = 1_000;
/// Bound on each exchange.
const TIMEOUT: Duration = Duration::from_secs(10);
const PASSWORD: &str = "bench password";

fn name(i: usize) -> String {
    format!("u{i:05}")
}

fn index(name: &str) -> Option<usize> {
    name.strip_prefix('u')?.parse().ok().filter(|&i| i < USERS)
}

fn buddies(i: usize) -> impl Iterator<Item = usize> {
    (1..=BUDDIES / 2).flat_map(move |d| [(i + d) % USERS, (i + USERS - d) % USERS])
}

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------- processes

/// A child killed (SIGKILL) when dropped, also on panic.
struct Proc {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IMS_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("release")
}

fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.is_file() {
        eprintln!(
            "login bench: {} is missing. Benches do not build the binaries: run \
             `cargo build --release --bins` first (`make bench` does), or point \
             IMS_BIN_DIR at a directory holding ims-crs and ims-ms.",
            p.display()
        );
        std::process::exit(1);
    }
    p
}

/// Starts a server and waits for its `listening on ADDR` line.
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
        .recv_timeout(Duration::from_secs(30))
        .ok()
        .and_then(|l| l.strip_prefix("listening on ")?.trim().parse().ok());
    match addr {
        Some(addr) => Proc { child, addr, log },
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "a server did not start; its log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used; with `children`, also
/// what its exited children used (PostgreSQL's finished backends).
fn cpu_secs(pid: u32, children: bool) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..17 (1-based); here the
    // state (field 3) is f[0], so field n is f[n - 3].
    let get = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let ticks = get(14) + get(15) + if children { get(16) + get(17) } else { 0 };
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

/// The processes whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// CPU seconds of a PostgreSQL server: the postmaster, its live backends
/// and the ones that have exited.
fn pg_cpu_secs(postmaster: u32) -> f64 {
    cpu_secs(postmaster, true)
        + children_of(postmaster)
            .into_iter()
            .map(|c| cpu_secs(c, false))
            .sum::<f64>()
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = fs::read_dir(p) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

// ---------------------------------------------------------------- data set

/// What a simulated client knows about its user without deriving anything.
struct Account {
    salt: Vec<u8>,
    keys: scram::Keys,
}

/// Derives every user's keys (in parallel) and writes the store.
/// Where the data set goes.
enum Target<'a> {
    Sled(&'a Path),
    Postgres(&'a str),
}

fn make_data_set(target: Target<'_>) -> Vec<Account> {
    let started = Instant::now();
    let rsa: Vec<(Vec<u8>, Vec<u8>)> = (0..RSA_KEYS)
        .map(|_| {
            let k = RsaPrivateKey::generate(crypto::DEFAULT_RSA_BITS).expect("rsa");
            (
                k.to_der().expect("der"),
                k.public_key().to_der().expect("der"),
            )
        })
        .collect();
    let rsa = Arc::new(rsa);
    let threads = thread::available_parallelism().map_or(2, |n| n.get());
    let chunks: Vec<_> = (0..threads)
        .map(|t| {
            let rsa = rsa.clone();
            thread::spawn(move || {
                (t..USERS)
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
                        let (private, public) = &rsa[i % RSA_KEYS];
                        let wrapped = scram::wrap(
                            &scram::wrap_key(&salted),
                            private,
                            &ims::client::account::wrap_aad(&name(i)),
                        )
                        .expect("wrap");
                        let mut profile = BTreeMap::new();
                        profile.insert("full_name".into(), format!("Bench User {i}"));
                        profile.insert("company".into(), format!("Company {}", i % 100));
                        let user = User {
                            name: name(i),
                            verifier: Verifier {
                                salt: params.salt.clone(),
                                iterations: ITERATIONS,
                                stored_key: keys.stored_key.to_vec(),
                                server_key: keys.server_key.to_vec(),
                            },
                            profile,
                            public_key: public.clone(),
                            wrapped_private_key: wrapped,
                            contacts: buddies(i).map(name).collect(),
                            requests: Vec::new(),
                            created_unix: 1_700_000_000,
                            blocked: Default::default(),
                            ..Default::default()
                        };
                        (
                            i,
                            user,
                            Account {
                                salt: params.salt,
                                keys,
                            },
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<(usize, User, Account)> = chunks
        .into_iter()
        .flat_map(|t| t.join().expect("data thread"))
        .collect();
    all.sort_by_key(|(i, _, _)| *i);
    let derived = started.elapsed();
    let (users, accounts): (Vec<User>, Vec<Account>) =
        all.into_iter().map(|(_, u, a)| (u, a)).unzip();
    match target {
        Target::Sled(db) => {
            let store = SledStore::open(db).expect("open the store");
            store.bulk_load(users).expect("bulk load");
        }
        Target::Postgres(url) => {
            let store = PgStore::open(url).expect("open the store");
            for page in users.chunks(1000) {
                store.bulk_records(page).expect("bulk load");
            }
            for page in users.chunks(1000) {
                store.bulk_relations(page).expect("bulk load");
            }
        }
    }
    eprintln!(
        "data set: {USERS} users x {BUDDIES} buddies: keys in {:.1?}, store written in {:.1?}",
        derived,
        started.elapsed() - derived
    );
    accounts
}

// ---------------------------------------------------------------- clients

/// A logged-in simulated user: its held login connection.
struct Session {
    held: TcpStream,
}

/// One user's client state.
struct Slot {
    /// Opens this user's pushes; set before `LOGIN` is sent, since pushes
    /// may arrive before the login reply does.
    push: Mutex<Option<Opener>>,
    session: Mutex<Option<Session>>,
    /// When the client sent `LOGIN` and when it got the reply (ns since
    /// the epoch; 0: none).
    login_sent: AtomicU64,
    login_done: AtomicU64,
    /// The MS of this user's last login: the next one goes there first,
    /// without `LOCATE`, as the client does.
    last_ms: Mutex<Option<SocketAddr>>,
}

/// `online` pushes received: (subject, recipient, arrival ns).
type Arrivals = Mutex<Vec<(u32, u32, u64)>>;

struct World {
    epoch: Instant,
    /// CRS instances; user `i` asks `crs[i % len]` where to log in.
    crs: Vec<SocketAddr>,
    accounts: Vec<Account>,
    slots: Vec<Slot>,
    /// Held connections go to the poller thread through this.
    hold: crossbeam_channel::Sender<(usize, TcpStream, Vec<u8>)>,
    wake: mio::Waker,
    arrivals: Arrivals,
    /// `online` pushes received about each user.
    arrived: Vec<AtomicUsize>,
    pushes: AtomicU64,
    bad_pushes: AtomicU64,
    /// Why pushes could not be opened, with counts.
    push_failures: Mutex<BTreeMap<String, u64>>,
    busy_retries: AtomicU64,
}

fn connect(addr: SocketAddr) -> std::io::Result<MessageReader<TcpStream>> {
    let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_nodelay(true)?;
    Ok(MessageReader::new(s))
}

fn call(conn: &mut MessageReader<TcpStream>, m: &Message) -> Result<Message, String> {
    write_message(conn.get_mut(), m, Instant::now() + TIMEOUT).map_err(|e| e.to_string())?;
    conn.read_message(&Limits::DEFAULT, Instant::now() + TIMEOUT)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "closed".to_string())
}

/// Whether a reply says "busy, try again".
fn busy(m: &Message) -> bool {
    m.code() == Some(503)
}

impl World {
    /// One full login of user `i`; the number of buddies the CRS reported
    /// online in the welcome (each should get a push). A refusal because
    /// the user's previous login (whose connection was just closed) has
    /// not ended yet is retried.
    fn login(&self, i: usize) -> Result<usize, String> {
        for _ in 0..LOGGED_IN_RETRIES {
            match self.login_once(i) {
                Err(e) if e.starts_with("LOGIN: 409") => {
                    self.busy_retries.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(1));
                }
                other => return other,
            }
        }
        Err("LOGIN: still logged in".into())
    }

    fn login_once(&self, i: usize) -> Result<usize, String> {
        let user = name(i);
        let acct = &self.accounts[i];
        // The MS of the last login, as the client does; else LOCATE,
        // retried while the CRS is busy.
        let remembered = *self.slots[i].last_ms.lock();
        let ms: SocketAddr = if let Some(ms) = remembered {
            ms
        } else {
            loop {
                let mut crs = connect(self.crs[i % self.crs.len()])
                    .map_err(|e| format!("connect CRS: {e}"))?;
                let r = call(&mut crs, &Message::request("LOCATE"))?;
                if busy(&r) {
                    self.busy_retries.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(1));
                    continue;
                }
                break r
                    .req("Ms")
                    .map_err(|e| format!("LOCATE: {e}: {r:?}"))?
                    .parse()
                    .map_err(|_| "LOCATE: bad address".to_string())?;
            }
        };
        *self.slots[i].last_ms.lock() = Some(ms);
        let (mut conn, challenge, client_nonce) = loop {
            let mut conn = connect(ms).map_err(|e| format!("connect MS: {e}"))?;
            let client_nonce = crypto::random_array::<24>().to_vec();
            let hello = MsRequest::LoginHello {
                user: user.clone(),
                client_nonce: client_nonce.clone(),
            };
            let r = call(&mut conn, &hello.to_message())?;
            if busy(&r) {
                self.busy_retries.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            if !r.is_success() {
                return Err(format!("LOGIN-HELLO: {r:?}"));
            }
            break (conn, r, client_nonce);
        };
        let ch = Challenge::from_message(&challenge).map_err(|e| e.to_string())?;
        if ch.salt != acct.salt {
            return Err("the MS sent another salt".into());
        }
        let auth = proto::login_auth_message(
            &user,
            &client_nonce,
            &ch.server_nonce,
            &ch.salt,
            ch.iterations,
        );
        let proof = scram::client_proof(&acct.keys.client_key, &acct.keys.stored_key, &auth);
        let mut context = client_nonce.clone();
        context.extend_from_slice(&ch.server_nonce);
        let link = SessionKeys::derive(&acct.keys.client_key, &context, Role::Initiator);
        context.extend_from_slice(b"push");
        let push = SessionKeys::derive(&acct.keys.client_key, &context, Role::Initiator);
        let slot = &self.slots[i];
        *slot.push.lock() = Some(push.recv);
        let login = MsRequest::Login {
            proof: proof.to_vec(),
            listen_port: LISTEN_PORT,
        };
        slot.login_sent.store(now_ns(self.epoch), Ordering::Release);
        let reply = call(&mut conn, &login.to_message())?;
        let done = now_ns(self.epoch);
        if reply.method() != Some(SEALED) {
            *slot.push.lock() = None;
            return Err(format!(
                "LOGIN: {} {}",
                reply.code().unwrap_or(0),
                reply.reason().unwrap_or("")
            ));
        }
        slot.login_done.store(done, Ordering::Release);
        let expected = scram::server_signature(&acct.keys.server_key, &auth);
        let signature = reply.req_b64("Server-Signature").unwrap_or_default();
        if !crypto::ct_eq(&expected, &signature) {
            return Err("bad server signature".into());
        }
        let mut recv = link.recv;
        let welcome = recv.open(&reply).map_err(|e| format!("welcome: {e}"))?;
        // Contacts serialize as {"user":..,"online":null} or with a
        // presence object; counting beats parsing for a load generator.
        let online = count(&welcome.body, br#""online":{"#);
        // The connection now carries the login: the poller reads its pushes.
        let (stream, rest) = conn.into_parts();
        let held = stream.try_clone().map_err(|e| e.to_string())?;
        self.hold
            .send((i, stream, rest))
            .map_err(|_| "the poller is gone".to_string())?;
        let _ = self.wake.wake();
        *slot.session.lock() = Some(Session { held });
        Ok(online)
    }

    /// Logs user `i` out by closing its held connection: the MS ends the
    /// login at once.
    fn logout(&self, i: usize) -> Result<(), String> {
        let slot = &self.slots[i];
        let Some(s) = slot.session.lock().take() else {
            return Ok(());
        };
        let _ = s.held.shutdown(std::net::Shutdown::Both);
        *slot.push.lock() = None;
        slot.login_done.store(0, Ordering::Release);
        Ok(())
    }

    /// One pushed message for one of our users: open it and note an
    /// `online` event's arrival.
    fn on_push(&self, m: &Message) -> Message {
        let at = now_ns(self.epoch);
        self.pushes.fetch_add(1, Ordering::Relaxed);
        let Some(r) = m.header("User").and_then(index) else {
            self.bad_pushes.fetch_add(1, Ordering::Relaxed);
            return Message::reply(404, "not this user");
        };
        let opened = self.slots[r].push.lock().as_mut().map(|o| o.open(m));
        let inner = match opened {
            Some(Ok(inner)) => inner,
            failed => {
                self.bad_pushes.fetch_add(1, Ordering::Relaxed);
                let why = match failed {
                    Some(Err(e)) => e.to_string(),
                    _ => "not logged in".to_string(),
                };
                *self.push_failures.lock().entry(why).or_default() += 1;
                return Message::reply(401, "unreadable push");
            }
        };
        if let Ok(EventKind::Online { user, .. }) = read_event(&inner) {
            if let Some(s) = index(&user) {
                self.arrivals.lock().push((s as u32, r as u32, at));
                self.arrived[s].fetch_add(1, Ordering::Relaxed);
            }
        }
        Message::ok()
    }
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// Reads every held login connection until `stop`: pushes go to
/// [`World::on_push`]; a closed connection is forgotten.
fn hold_loop(
    world: Arc<World>,
    mut poll: mio::Poll,
    new: crossbeam_channel::Receiver<(usize, TcpStream, Vec<u8>)>,
    stop: Arc<AtomicBool>,
) {
    use mio::unix::SourceFd;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut conns: std::collections::HashMap<usize, (TcpStream, Vec<u8>)> =
        std::collections::HashMap::new();
    let mut next = 1usize;
    let mut events = mio::Events::with_capacity(1024);
    let mut chunk = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let _ = poll.poll(&mut events, Some(Duration::from_millis(50)));
        let mut ready: Vec<usize> = events
            .iter()
            .map(|e| e.token().0)
            .filter(|&t| t != 0)
            .collect();
        while let Ok((_, stream, rest)) = new.try_recv() {
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
                match stream.read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        // Short: the socket is empty; a later arrival
                        // raises a new event (as a client's reader would).
                        if n < chunk.len() {
                            break;
                        }
                    }
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
                if message.method() == Some(PUSH) {
                    world.on_push(&message);
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

/// Runs `f` over `users` with `clients` threads; (wall time, errors).
fn run_parallel<F>(users: &[usize], clients: usize, f: F) -> (Duration, Vec<String>)
where
    F: Fn(usize) -> Result<(), String> + Sync,
{
    let next = AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    let started = Instant::now();
    thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = users.get(k) else { break };
                if let Err(e) = f(i) {
                    errors.lock().push(format!("{}: {e}", name(i)));
                }
            });
        }
    });
    (started.elapsed(), errors.into_inner())
}

/// Waits until no push has arrived for `quiet` (at most `max`).
fn settle(world: &World, quiet: Duration, max: Duration) {
    let end = Instant::now() + max;
    let mut last = world.pushes.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while Instant::now() < end {
        thread::sleep(Duration::from_millis(20));
        let now = world.pushes.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
    }
}

/// Presence latencies of one phase, in µs, sorted.
#[derive(Default)]
struct Presence {
    /// From the subject's login reply to the push (0 if the push came first).
    from_reply: Vec<f64>,
    /// From the subject's `LOGIN` request to the push.
    from_request: Vec<f64>,
    /// Pushes that arrived before the subject's login reply.
    early: usize,
    /// When the last push arrived (ns since the epoch).
    last: u64,
}

impl Presence {
    fn extend(&mut self, other: Presence) {
        self.from_reply.extend(other.from_reply);
        self.from_request.extend(other.from_request);
        self.early += other.early;
        self.last = self.last.max(other.last);
        self.from_reply.sort_by(f64::total_cmp);
        self.from_request.sort_by(f64::total_cmp);
    }
}

/// Takes the `online` pushes received so far and measures each against its
/// subject's login (`sent`, `done`: the slots' timestamps).
fn latencies(world: &World, sent: &[u64], done: &[u64]) -> Presence {
    let arrivals = std::mem::take(&mut *world.arrivals.lock());
    let mut p = Presence::default();
    for (subject, _recipient, at) in arrivals {
        let (sent, done) = (sent[subject as usize], done[subject as usize]);
        if done == 0 || sent == 0 {
            continue;
        }
        p.last = p.last.max(at);
        p.from_request.push(at.saturating_sub(sent) as f64 / 1000.0);
        if at <= done {
            p.early += 1;
            p.from_reply.push(0.0);
        } else {
            p.from_reply.push((at - done) as f64 / 1000.0);
        }
    }
    p.from_reply.sort_by(f64::total_cmp);
    p.from_request.sort_by(f64::total_cmp);
    p
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let k = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

/// Every slot's (LOGIN sent, reply received) timestamps.
fn snapshot_logins(world: &World) -> (Vec<u64>, Vec<u64>) {
    world
        .slots
        .iter()
        .map(|s| {
            (
                s.login_sent.load(Ordering::Acquire),
                s.login_done.load(Ordering::Acquire),
            )
        })
        .unzip()
}

fn report_errors(what: &str, errors: &[String]) {
    if !errors.is_empty() {
        eprintln!(
            "{what}: {} failed, e.g. {:?}",
            errors.len(),
            &errors[..errors.len().min(3)]
        );
    }
}

fn main() {
    // Every simulated login holds a connection: thousands of descriptors.
    ims::prethread::raise_open_files_limit();
    // `cargo bench` passes --bench; any other argument filters benches by
    // name, as libtest would.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| "login".contains(f.as_str())) {
        return;
    }
    let knob = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let clients = knob("IMS_BENCH_CLIENTS", CLIENTS);
    let rounds = knob("IMS_BENCH_ROUNDS", ROUNDS).max(1);
    let round_n = knob("IMS_BENCH_ROUND_USERS", ROUND_USERS).clamp(1, USERS);
    let ms_workers: Option<String> = std::env::var("IMS_BENCH_MS_WORKERS").ok();
    let solo_rounds = knob("IMS_BENCH_SOLO_ROUNDS", SOLO_ROUNDS).max(1);
    let light_logins = knob("IMS_BENCH_LIGHT", LIGHT_LOGINS).clamp(1, LIGHT_LOGINS);
    let light_background = light_logins * LIGHT_BACKGROUND / LIGHT_LOGINS;
    let crs_bin = binary("ims-crs");
    let ms_bin = binary("ims-ms");
    let total = Instant::now();

    let dir = tempfile::Builder::new()
        .prefix("ims-login-bench-")
        .tempdir()
        .expect("temp dir");
    let key = dir.path().join("mskey");
    let st = Command::new(&crs_bin)
        .arg("genkey")
        .arg(&key)
        .status()
        .expect("genkey");
    assert!(st.success(), "genkey failed");
    let data = dir.path().join("crs-data");
    fs::create_dir_all(&data).expect("data dir");
    // The CRS refuses a data directory others can read.
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("data dir mode");
    }
    let variant = std::env::var("IMS_BENCH_STORE").unwrap_or_else(|_| "sled".into());
    let (pg_server, instances) = match variant.as_str() {
        "sled" => (None, 1),
        "postgres" => (Some(pg::PgServer::start()), 1),
        "postgres2" => (Some(pg::PgServer::start()), 2),
        other => panic!("IMS_BENCH_STORE={other}: use sled, postgres or postgres2"),
    };
    let accounts = match &pg_server {
        None => make_data_set(Target::Sled(&data.join("db"))),
        Some(db) => make_data_set(Target::Postgres(&db.url())),
    };

    let crs_all: Vec<Proc> = (0..instances)
        .map(|n| {
            let mut cmd = Command::new(&crs_bin);
            cmd.args(["--listen", "127.0.0.1:0", "--min-iterations", "1000"])
                .arg("--ms-key")
                .arg(&key);
            match &pg_server {
                None => {
                    cmd.arg("--data").arg(&data);
                }
                Some(db) => {
                    cmd.arg("--data")
                        .arg(dir.path().join(format!("crs-local{n}")))
                        .arg("--store")
                        .arg(db.url());
                }
            }
            spawn(cmd, dir.path().join(format!("crs{n}.log")))
        })
        .collect();
    let ms: Vec<Proc> = (0..2)
        .map(|n| {
            let mut cmd = Command::new(&ms_bin);
            // Every simulated client comes from 127.0.0.1: no login rate
            // limit and no per-source connection limit (real logins come
            // from many addresses; here thousands share one).
            cmd.args([
                "--listen",
                "127.0.0.1:0",
                "--fake-iterations",
                "1000",
                "--login-rate",
                "0",
            ])
            .arg("--crs")
            .arg(crs_all[n % crs_all.len()].addr.to_string())
            .arg("--ms-key")
            .arg(&key);
            if let Some(w) = &ms_workers {
                cmd.args(["--workers", w]);
            }
            let mut conf = String::new();
            if let Ok(threads) = std::env::var("IMS_BENCH_PUSH_THREADS") {
                conf.push_str(&format!("push_threads = {threads}\n"));
            }
            conf.push_str(&format!("[pool]\nmax_per_source = {}\n", USERS * 2));
            let path = dir.path().join(format!("ms{n}.toml"));
            fs::write(&path, conf).expect("ms config");
            cmd.arg("-c").arg(path);
            spawn(cmd, dir.path().join(format!("ms{n}.log")))
        })
        .collect();

    // The poller of held login connections.
    let stop = Arc::new(AtomicBool::new(false));
    let poll = mio::Poll::new().expect("poller");
    let wake = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
    let (hold, held_rx) = crossbeam_channel::unbounded();
    let world = Arc::new(World {
        epoch: Instant::now(),
        crs: crs_all.iter().map(|c| c.addr).collect(),
        accounts,
        slots: (0..USERS)
            .map(|_| Slot {
                push: Mutex::new(None),
                session: Mutex::new(None),
                login_sent: AtomicU64::new(0),
                login_done: AtomicU64::new(0),
                last_ms: Mutex::new(None),
            })
            .collect(),
        hold,
        wake,
        arrivals: Mutex::new(Vec::new()),
        arrived: (0..USERS).map(|_| AtomicUsize::new(0)).collect(),
        pushes: AtomicU64::new(0),
        bad_pushes: AtomicU64::new(0),
        push_failures: Mutex::new(BTreeMap::new()),
        busy_retries: AtomicU64::new(0),
    });
    let holder = {
        let (w, s) = (world.clone(), stop.clone());
        thread::spawn(move || hold_loop(w, poll, held_rx, s))
    };

    let rss = |procs: &[Proc]| -> u64 { procs.iter().map(|p| vm_rss_kib(p.pid())).sum() };

    // The login path alone: no buddy of these users is online.
    let solo: Vec<usize> = (0..USERS / (BUDDIES / 2 + 1))
        .map(|k| k * (BUDDIES / 2 + 1))
        .collect();
    // The CPU each process spends: CRS instances, PostgreSQL, MSs, and
    // this process (the simulated clients).
    let cpu = || -> [f64; 4] {
        [
            crs_all.iter().map(|p| cpu_secs(p.pid(), false)).sum(),
            pg_server
                .as_ref()
                .and_then(|s| s.pid())
                .map_or(0.0, pg_cpu_secs),
            ms.iter().map(|p| cpu_secs(p.pid(), false)).sum(),
            cpu_secs(std::process::id(), false),
        ]
    };
    let solo_cpu_before = cpu();
    let mut solo_rates = Vec::new();
    for _ in 0..solo_rounds {
        let (took, errors) = run_parallel(&solo, clients, |i| world.login(i).map(|_| ()));
        report_errors("solo login", &errors);
        solo_rates.push((solo.len() - errors.len()) as f64 / took.as_secs_f64());
        let (_, errors) = run_parallel(&solo, clients, |i| world.logout(i));
        report_errors("solo logout", &errors);
    }
    settle(&world, Duration::from_millis(300), Duration::from_secs(20));
    let solo_cpu_after = cpu();
    world.arrivals.lock().clear();
    let rss_before = rss(&ms);

    // Throughput rounds (also presence under full load), with the CPU each
    // process spends on them.
    let cpu_before = cpu();
    let round_users: Vec<usize> = (0..round_n).collect();
    let mut rates = Vec::new();
    let mut sustained = Vec::new();
    let mut logout_rates = Vec::new();
    let mut loaded = Presence::default();
    let mut expected_loaded = 0usize;
    let mut rss_after = 0;
    for round in 0..rounds {
        let expected = AtomicUsize::new(0);
        world.arrivals.lock().clear();
        let start = now_ns(world.epoch);
        let (took, errors) = run_parallel(&round_users, clients, |i| {
            world.login(i).map(|online| {
                expected.fetch_add(online, Ordering::Relaxed);
            })
        });
        report_errors("login", &errors);
        let ok = round_users.len() - errors.len();
        rates.push(ok as f64 / took.as_secs_f64());
        settle(&world, Duration::from_millis(300), Duration::from_secs(30));
        if round == 0 {
            rss_after = rss(&ms);
        }
        let (sent, done) = snapshot_logins(&world);
        let p = latencies(&world, &sent, &done);
        // Until the last presence push of the round was delivered.
        let all_in = (p.last.saturating_sub(start) as f64 / 1e9).max(took.as_secs_f64());
        sustained.push(ok as f64 / all_in);
        expected_loaded += expected.load(Ordering::Relaxed);
        loaded.extend(p);
        let (took_out, errors) = run_parallel(&round_users, clients, |i| world.logout(i));
        report_errors("logout", &errors);
        logout_rates.push((round_users.len() - errors.len()) as f64 / took_out.as_secs_f64());
        settle(&world, Duration::from_millis(300), Duration::from_secs(30));
        eprintln!(
            "round {}: {ok} logins in {took:.2?} ({:.0}/s; {:.0}/s until their pushes were in), \
             logouts {:.0}/s",
            round + 1,
            rates[round],
            sustained[round],
            logout_rates[round]
        );
    }
    let cpu_after = cpu();
    // Logins and logouts both ran; per login, its logout included.
    let round_logins = (round_n * rounds) as f64;
    let online_users = round_n as f64;
    let ms_bytes_per_user = (rss_after.saturating_sub(rss_before) * 1024) as f64 / online_users;

    // Presence under light load: a background of online users (the even
    // ones), then logins one at a time of users with about half their
    // buddies online.
    world.arrivals.lock().clear();
    let background: Vec<usize> = (0..light_background).map(|k| 2 * k).collect();
    let (_, errors) = run_parallel(&background, clients, |i| world.login(i).map(|_| ()));
    report_errors("background login", &errors);
    settle(&world, Duration::from_millis(300), Duration::from_secs(30));
    world.arrivals.lock().clear();
    let light_users: Vec<usize> = (0..light_logins).map(|k| 2 * k + 1).collect();
    let expected_light = AtomicUsize::new(0);
    let (light_took, errors) = run_parallel(&light_users, 1, |i| {
        let before = world.arrived[i].load(Ordering::Relaxed);
        let online = world.login(i)?;
        expected_light.fetch_add(online, Ordering::Relaxed);
        // Let its pushes land before the next login starts.
        let end = Instant::now() + Duration::from_millis(200);
        while world.arrived[i].load(Ordering::Relaxed) < before + online && Instant::now() < end {
            thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    });
    report_errors("light login", &errors);
    settle(&world, Duration::from_millis(300), Duration::from_secs(30));
    let (sent, done) = snapshot_logins(&world);
    let light = latencies(&world, &sent, &done);
    let everyone: Vec<usize> = background.iter().chain(&light_users).copied().collect();
    let (_, errors) = run_parallel(&everyone, clients, |i| world.logout(i));
    report_errors("logout", &errors);

    let disk = dir_size(&data);
    stop.store(true, Ordering::Relaxed);
    let _ = holder.join();

    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let list = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let ms_pair = |v: &[f64]| format!("{:.2} / {:.2}", pct(v, 0.5) / 1e3, pct(v, 0.99) / 1e3);
    println!();
    println!(
        "login bench: {USERS} users x {BUDDIES} buddies, {instances} CRS on {variant} + 2 MSs \
         (release), {clients} simulated clients, {rounds} rounds of {round_n} logins"
    );
    println!("{:<46} {:>18} {:>10}", "metric", "value", "target");
    let row = |m: &str, v: String, t: &str| println!("{m:<46} {v:>18} {t:>10}");
    row(
        "logins/s, login path alone (no buddy online)",
        format!("{:.0}", best(&solo_rates)),
        ">= 3000",
    );
    row("  all rounds", list(&solo_rates), "");
    row(
        "  first round (each user's first login: LOCATE first)",
        format!("{:.0}", solo_rates.first().copied().unwrap_or(0.0)),
        "",
    );
    row(
        "logins/s with presence to buddies (best)",
        format!("{:.0}", best(&rates)),
        "",
    );
    row("  all rounds", list(&rates), "");
    row("  until every presence push was in", list(&sustained), "");
    row(
        "logouts/s (best round)",
        format!("{:.0}", best(&logout_rates)),
        "",
    );
    row(
        "presence p50 / p99, light load (ms)",
        ms_pair(&light.from_reply),
        "p99 <= 5",
    );
    row(
        "  measured from the LOGIN request",
        ms_pair(&light.from_request),
        "",
    );
    row(
        "  pushes received / expected",
        format!(
            "{} / {}",
            light.from_reply.len(),
            expected_light.load(Ordering::Relaxed)
        ),
        "",
    );
    row(
        "  pushes in before the login reply",
        format!("{}", light.early),
        "",
    );
    row(
        "  one login and its pushes, each (ms)",
        format!(
            "{:.2}",
            light_took.as_secs_f64() * 1e3 / light_logins as f64
        ),
        "",
    );
    row(
        "presence p50 / p99, during the rounds (ms)",
        ms_pair(&loaded.from_reply),
        "",
    );
    row(
        "  pushes received / expected",
        format!("{} / {expected_loaded}", loaded.from_reply.len()),
        "",
    );
    row(
        "MS memory per online user (bytes)",
        format!("{ms_bytes_per_user:.0}"),
        "<= 2048",
    );
    row(
        "  VmRSS of both MSs before / after (KiB)",
        format!("{rss_before} / {rss_after}"),
        "",
    );
    row(
        "CRS disk per registered user (bytes)",
        format!("{:.0}", disk as f64 / USERS as f64),
        "",
    );
    row(
        "push failures seen by clients",
        format!("{}", world.bad_pushes.load(Ordering::Relaxed)),
        "",
    );
    for (why, n) in world.push_failures.lock().iter() {
        row(&format!("  {why}"), format!("{n}"), "");
    }
    // Per login, its logout included: the CRS instances, PostgreSQL, the
    // MSs and the simulated clients.
    let cpu_row = |before: [f64; 4], after: [f64; 4], logins: f64| {
        let each: Vec<String> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| format!("{:.0}", (a - b) * 1e6 / logins.max(1.0)))
            .collect();
        each.join(" / ")
    };
    row(
        "CPU per login+logout, CRS / PostgreSQL / MSs / clients (us)",
        "".into(),
        "",
    );
    row(
        "  with presence (the throughput rounds)",
        cpu_row(cpu_before, cpu_after, round_logins),
        "",
    );
    row(
        "  login path alone",
        cpu_row(
            solo_cpu_before,
            solo_cpu_after,
            (solo.len() * solo_rounds) as f64,
        ),
        "",
    );
    row(
        "busy (503) retries",
        format!("{}", world.busy_retries.load(Ordering::Relaxed)),
        "",
    );
    row(
        "bench time (s)",
        format!("{:.0}", total.elapsed().as_secs_f64()),
        "",
    );
    for p in ms.iter().chain(crs_all.iter()) {
        let log = fs::read_to_string(&p.log).unwrap_or_default();
        let warnings = log.lines().filter(|l| l.contains("WARN")).count();
        if warnings > 0 {
            eprintln!(
                "{} logged {warnings} warnings, e.g. {:?}",
                p.addr,
                log.lines().find(|l| l.contains("WARN")).unwrap_or("")
            );
        }
    }
}
