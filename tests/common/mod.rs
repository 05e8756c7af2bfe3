//! A harness for tests against the real programs: a temporary directory
//! with an MSkey, the CRS and MSs as child processes, and `ims-client
//! --json` processes driven through their stdin with their events collected
//! from stdout.
//!
//! Every child is owned by a guard that kills it on drop, also when a test
//! panics. Waiting is always for an event, with a generous timeout: the
//! machine is shared and slow, so nothing here sleeps a fixed time hoping
//! something has happened.

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// PBKDF2 iterations in tests: cheap on purpose.
pub const ITERATIONS: u32 = 1000;
/// How long to wait for anything that should happen soon.
pub const WAIT: Duration = Duration::from_secs(10);

pub const CRS_BIN: &str = env!("CARGO_BIN_EXE_ims-crs");
pub const MS_BIN: &str = env!("CARGO_BIN_EXE_ims-ms");
pub const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_ims-client");

/// Numbers log files so that restarted processes keep their old logs.
static LOG_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A temporary directory holding an MSkey, data directories and logs.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    /// The MSkey every good process uses.
    pub key: PathBuf,
}

impl TestEnv {
    pub fn new() -> TestEnv {
        let dir = tempfile::Builder::new()
            .prefix("ims-test-")
            .tempdir()
            .expect("temp dir");
        let key = dir.path().join("mskey");
        gen_key(&key);
        TestEnv { dir, key }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh file name in the directory.
    pub fn file(&self, stem: &str) -> PathBuf {
        let n = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
        self.path().join(format!("{stem}.{n}"))
    }

    /// Another MSkey (a wrong one, for the CRS).
    pub fn other_key(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        gen_key(&p);
        p
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        TestEnv::new()
    }
}

/// `ims-crs genkey FILE`.
pub fn gen_key(path: &Path) {
    let out = Command::new(CRS_BIN)
        .arg("genkey")
        .arg(path)
        .output()
        .expect("run ims-crs genkey");
    assert!(
        out.status.success(),
        "genkey failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Environment every child gets: no user configuration file, info logs.
fn quiet_env(cmd: &mut Command, env: &TestEnv) {
    cmd.env("XDG_CONFIG_HOME", env.path().join("xdg"))
        .env("HOME", env.path())
        .env(
            "RUST_LOG",
            std::env::var("IMS_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
}

/// A child process that is killed when this is dropped.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    /// Where its stderr (the log) goes.
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `grace` for the exit (SIGKILL after it).
    pub fn term(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let end = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() >= end {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            match self.child.as_mut()?.try_wait() {
                Ok(Some(st)) => {
                    self.child = None;
                    return Some(st);
                }
                Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Why a server did not come up.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

/// Spawns a server and waits for `listening on ADDR` on its stdout.
fn spawn_server(
    env: &TestEnv,
    name: &str,
    mut cmd: Command,
    timeout: Duration,
) -> Result<(Proc, SocketAddr), StartFailure> {
    let log = env.file(&format!("{name}.log"));
    quiet_env(&mut cmd, env);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&log).expect("log file"));
    let mut child = cmd.spawn().expect("spawn server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let mut proc = Proc {
        name: name.to_owned(),
        child: Some(child),
        log,
    };
    let first = rx.recv_timeout(timeout);
    let addr = first
        .ok()
        .and_then(|l| l.strip_prefix("listening on ").map(str::to_owned))
        .and_then(|a| a.trim().parse().ok());
    match addr {
        Some(addr) => Ok((proc, addr)),
        None => {
            let status = proc.wait_exit(Duration::from_secs(2));
            proc.kill9();
            Err(StartFailure {
                status,
                stderr: proc.log_text(),
            })
        }
    }
}

/// Options of a CRS.
#[derive(Clone, Debug, Default)]
pub struct CrsOpts {
    /// Listen address; `127.0.0.1:0` if none.
    pub listen: Option<String>,
    /// Data directory; a fresh one if none.
    pub data: Option<PathBuf>,
    /// More flags.
    pub args: Vec<String>,
}

/// A running CRS.
pub struct Crs {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub key: PathBuf,
    args: Vec<String>,
}

impl Crs {
    pub fn start(env: &TestEnv, opts: CrsOpts) -> Crs {
        let data = opts.data.clone().unwrap_or_else(|| env.file("crs-data"));
        let listen = opts.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        Crs::launch(env, &listen, data, env.key.clone(), opts.args)
    }

    fn launch(env: &TestEnv, listen: &str, data: PathBuf, key: PathBuf, args: Vec<String>) -> Crs {
        // Binding a port just freed can fail briefly: retry.
        let mut last = None;
        for _ in 0..20 {
            let mut cmd = Command::new(CRS_BIN);
            cmd.arg("--listen")
                .arg(listen)
                .arg("--data")
                .arg(&data)
                .arg("--ms-key")
                .arg(&key)
                .arg("--min-iterations")
                .arg(ITERATIONS.to_string())
                .args(&args);
            match spawn_server(env, "crs", cmd, WAIT) {
                Ok((proc, addr)) => {
                    return Crs {
                        proc,
                        addr,
                        data,
                        key,
                        args,
                    }
                }
                Err(e) => {
                    last = Some(e);
                    thread::sleep(Duration::from_millis(250));
                }
            }
        }
        panic!("the CRS did not start: {last:?}");
    }

    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Kills it with SIGKILL and starts it again on the same address and
    /// data directory.
    pub fn restart(&mut self, env: &TestEnv) {
        self.proc.kill9();
        let listen = self.addr.to_string();
        *self = Crs::launch(
            env,
            &listen,
            self.data.clone(),
            self.key.clone(),
            self.args.clone(),
        );
    }

    /// Runs an operator command (`user list`, `ms list`, ...) against it.
    pub fn op(&self, args: &[&str]) -> Output {
        Command::new(CRS_BIN)
            .args(args)
            .arg("--crs")
            .arg(self.addr.to_string())
            .arg("--ms-key")
            .arg(&self.key)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run ims-crs operator command")
    }

    /// An operator command that must succeed; its stdout.
    pub fn op_ok(&self, args: &[&str]) -> String {
        let out = self.op(args);
        assert!(
            out.status.success(),
            "ims-crs {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `user show NAME` as JSON.
    pub fn show_user(&self, name: &str) -> Value {
        let out = self.op_ok(&["user", "show", name]);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("user show {name}: {e}: {out}"))
    }

    /// `ms list` as rows of (address, load).
    pub fn ms_list(&self) -> Vec<(String, u32)> {
        let out = self.op_ok(&["ms", "list"]);
        out.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.get(1)?.to_string(), f.get(2)?.parse().ok()?))
            })
            .collect()
    }

    /// Waits until `ms list` satisfies `pred`; the last list.
    pub fn wait_ms_list(
        &self,
        what: &str,
        pred: impl Fn(&[(String, u32)]) -> bool,
    ) -> Vec<(String, u32)> {
        let end = Instant::now() + WAIT;
        loop {
            let list = self.ms_list();
            if pred(&list) {
                return list;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for ms list: {what}; last: {list:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ims-client register NAME` with `password`; panics unless it exits 0.
    pub fn register(&self, env: &TestEnv, name: &str, password: &str) {
        let out = self.try_register(env, name, password);
        assert!(
            out.status.success(),
            "register {name} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `ims-client register NAME` with `password`.
    pub fn try_register(&self, env: &TestEnv, name: &str, password: &str) -> Output {
        let mut cmd = Command::new(CLIENT_BIN);
        cmd.arg("register")
            .arg(name)
            .arg("--crs")
            .arg(self.addr.to_string())
            .arg("--kdf-iterations")
            .arg(ITERATIONS.to_string())
            .arg("--insecure-kdf")
            .arg("--json")
            .env("IMS_PASSWORD", password)
            .stdin(Stdio::null());
        quiet_env(&mut cmd, env);
        cmd.output().expect("run ims-client register")
    }
}

/// A running MS.
pub struct Ms {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Ms {
    pub fn start(env: &TestEnv, crs: SocketAddr, key: &Path) -> Ms {
        Ms::try_start(env, crs, key, &[]).unwrap_or_else(|e| panic!("the MS did not start: {e:?}"))
    }

    /// Starts an MS; the failure (exit status and log) if it never listens.
    pub fn try_start(
        env: &TestEnv,
        crs: SocketAddr,
        key: &Path,
        args: &[&str],
    ) -> Result<Ms, StartFailure> {
        Ms::try_start_crs(env, &crs.to_string(), key, args)
    }

    /// Starts an MS given its `--crs` as text (a list `A,B` of instances).
    pub fn try_start_crs(
        env: &TestEnv,
        crs: &str,
        key: &Path,
        args: &[&str],
    ) -> Result<Ms, StartFailure> {
        let mut cmd = Command::new(MS_BIN);
        if !args.contains(&"--listen") {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        cmd.arg("--crs")
            .arg(crs)
            .arg("--ms-key")
            .arg(key)
            .arg("--fake-iterations")
            .arg(ITERATIONS.to_string())
            .args(args);
        spawn_server(env, "ms", cmd, WAIT).map(|(proc, addr)| Ms { proc, addr })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }
}

/// A CRS with two MSs, the usual set-up.
pub struct Cluster {
    pub env: TestEnv,
    pub crs: Crs,
    pub ms: Vec<Ms>,
}

impl Cluster {
    pub fn start(n_ms: usize) -> Cluster {
        Cluster::start_with(n_ms, &[])
    }

    /// A CRS and `n_ms` MSs started with `ms_args` as extra flags.
    pub fn start_with(n_ms: usize, ms_args: &[&str]) -> Cluster {
        Cluster::start_configured(n_ms, "", ms_args)
    }

    /// A CRS reading `crs_config` (TOML; none if empty) and `n_ms` MSs
    /// started with `ms_args` as extra flags.
    pub fn start_configured(n_ms: usize, crs_config: &str, ms_args: &[&str]) -> Cluster {
        let env = TestEnv::new();
        let mut opts = CrsOpts::default();
        if !crs_config.is_empty() {
            let cfg = env.path().join("crs.toml");
            fs::write(&cfg, crs_config).unwrap();
            opts.args = vec!["-c".into(), cfg.to_str().unwrap().into()];
        }
        let crs = Crs::start(&env, opts);
        let ms = (0..n_ms)
            .map(|_| {
                Ms::try_start(&env, crs.addr, &env.key, ms_args)
                    .unwrap_or_else(|e| panic!("the MS did not start: {e:?}"))
            })
            .collect();
        Cluster { env, crs, ms }
    }

    pub fn register(&self, name: &str, password: &str) {
        self.crs.register(&self.env, name, password);
    }

    /// A client process with `password` in `IMS_PASSWORD`.
    pub fn client(&self, name: &str, password: &str) -> Client {
        Client::start(&self.env, self.crs.addr, name, password)
    }

    /// A client logged in as `user` (waits for `logged-in`).
    pub fn login(&self, user: &str, password: &str) -> Client {
        let c = self.client(user, password);
        c.send(&format!("/login {user}"));
        c.wait_event("logged-in", |e| e["user"] == user);
        c
    }
}

/// Collected events of one client and a way to wait for new ones.
#[derive(Default)]
struct EventLog {
    events: Mutex<(Vec<Value>, Vec<bool>)>,
    changed: Condvar,
}

/// An `ims-client --json` process: commands go to its stdin, events come
/// from its stdout.
pub struct Client {
    pub label: String,
    proc: Proc,
    stdin: Mutex<Option<ChildStdin>>,
    log: Arc<EventLog>,
}

impl Client {
    /// Starts `ims-client --json` with `IMS_PASSWORD=password`; `label`
    /// names it in failure messages.
    /// `crs` is an address, or a list `A,B` of CRS instances.
    pub fn start(
        env: &TestEnv,
        crs: impl std::fmt::Display,
        label: &str,
        password: &str,
    ) -> Client {
        Client::start_with(env, crs, label, password, &[])
    }

    pub fn start_with(
        env: &TestEnv,
        crs: impl std::fmt::Display,
        label: &str,
        password: &str,
        args: &[&str],
    ) -> Client {
        let mut all = vec![
            "--crs".to_owned(),
            crs.to_string(),
            "--json".to_owned(),
            "--kdf-iterations".to_owned(),
            ITERATIONS.to_string(),
            "--insecure-kdf".to_owned(),
        ];
        if !args.contains(&"--listen") {
            all.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        Client::spawn(env, label, Some(password), &all)
    }

    /// Starts `ims-client` with exactly `args` (e.g. `-c FILE --json`).
    pub fn start_raw(env: &TestEnv, label: &str, args: &[&str]) -> Client {
        Client::spawn(env, label, None, args)
    }

    fn spawn(env: &TestEnv, label: &str, password: Option<&str>, args: &[&str]) -> Client {
        let log = env.file(&format!("client-{label}.log"));
        let mut cmd = Command::new(CLIENT_BIN);
        cmd.args(args);
        if let Some(password) = password {
            cmd.env("IMS_PASSWORD", password);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("client log"));
        quiet_env(&mut cmd, env);
        let mut child = cmd.spawn().expect("spawn ims-client");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let events = Arc::new(EventLog::default());
        let sink = events.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                let mut g = sink.events.lock().unwrap();
                g.0.push(v);
                g.1.push(false);
                sink.changed.notify_all();
            }
            // End of output: wake waiters so they can report it.
            let mut g = sink.events.lock().unwrap();
            g.0.push(serde_json::json!({ "event": "<eof>" }));
            g.1.push(false);
            sink.changed.notify_all();
        });
        Client {
            label: label.to_owned(),
            proc: Proc {
                name: format!("client {label}"),
                child: Some(child),
                log,
            },
            stdin: Mutex::new(stdin),
            log: events,
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The client's log (stderr) so far.
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }

    /// The address its listener is bound to, from its log.
    pub fn listen_addr(&self) -> SocketAddr {
        let end = Instant::now() + WAIT;
        loop {
            if let Some(line) = self
                .log_text()
                .lines()
                .find(|l| l.contains("client listening on "))
            {
                let addr = line.rsplit(' ').next().unwrap_or_default();
                return addr
                    .parse()
                    .unwrap_or_else(|_| panic!("bad address in {line:?}"));
            }
            assert!(
                Instant::now() < end,
                "client {} never logged its address",
                self.label
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends one command line.
    pub fn send(&self, line: &str) {
        let mut g = self.stdin.lock().unwrap();
        let stdin = g.as_mut().expect("stdin closed");
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("client {}: cannot send {line:?}: {e}", self.label));
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Value> {
        self.log.events.lock().unwrap().0.clone()
    }

    /// Waits for the first event not yet taken by a `wait_for` that matches
    /// `pred`, takes it and returns it. Events may arrive in any order
    /// (a push can overtake a command's `ok`), so earlier unmatched events
    /// stay available. Panics with every event seen on timeout.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let end = Instant::now() + timeout;
        let mut g = self.log.events.lock().unwrap();
        loop {
            let (events, taken) = &mut *g;
            if let Some(i) = (0..events.len()).find(|&i| !taken[i] && pred(&events[i])) {
                taken[i] = true;
                return events[i].clone();
            }
            let now = Instant::now();
            if now >= end {
                let all: Vec<String> = events.iter().map(Value::to_string).collect();
                drop(g);
                panic!(
                    "client {}: timed out after {timeout:?} waiting for {what}; events:\n  {}\nlog:\n{}",
                    self.label,
                    all.join("\n  "),
                    self.proc.log_text()
                );
            }
            g = self.log.changed.wait_timeout(g, end - now).unwrap().0;
        }
    }

    /// Waits (up to [`WAIT`]) for an event of `kind` matching `pred`.
    pub fn wait_event(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for(kind, |e| e["event"] == kind && pred(e), WAIT)
    }

    /// Waits for the outcome of `command`: its `ok` or `error` (for
    /// `login`, `logged-in` or the login's `error`).
    pub fn wait_outcome(&self, command: &str) -> Value {
        self.wait_for(
            &format!("the outcome of {command}"),
            |e| {
                ((e["event"] == "ok" || e["event"] == "error") && e["command"] == command)
                    || (command == "login" && e["event"] == "logged-in")
            },
            WAIT,
        )
    }

    /// Waits for `ok` of `command` (panics on its `error`).
    pub fn wait_ok(&self, command: &str) -> Value {
        let e = self.wait_outcome(command);
        assert_eq!(
            e["event"], "ok",
            "client {}: {command} failed: {e}",
            self.label
        );
        e
    }

    /// Waits for `error` of `command` (panics on success); its reason.
    pub fn wait_error(&self, command: &str) -> String {
        let e = self.wait_outcome(command);
        assert_eq!(
            e["event"], "error",
            "client {}: expected {command} to fail: {e}",
            self.label
        );
        field(&e, "reason").to_owned()
    }

    /// Whether an event matching `pred` has been seen (taken or not).
    pub fn saw(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.log.events.lock().unwrap().0.iter().any(pred)
    }

    /// `/quit`, then waits for the process to exit.
    pub fn quit(mut self) -> Option<ExitStatus> {
        let _ = self
            .stdin
            .lock()
            .unwrap()
            .as_mut()
            .map(|s| writeln!(s, "/quit"));
        self.stdin.lock().unwrap().take();
        self.proc.wait_exit(WAIT)
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }
}

/// Makes `a` and `b` (both logged in) buddies: `a` asks, `b` accepts, and
/// each sees the other added and online.
pub fn befriend(a: &Client, an: &str, b: &Client, bn: &str) {
    a.send(&format!("/add {bn}"));
    b.wait_event("request", |e| e["from"] == an);
    b.send(&format!("/accept {an}"));
    a.wait_event("buddy-added", |e| e["user"] == bn && e["online"] == true);
    b.wait_event("buddy-added", |e| e["user"] == an && e["online"] == true);
}

/// The event's `user` (or another string field).
pub fn field<'a>(e: &'a Value, name: &str) -> &'a str {
    e[name].as_str().unwrap_or_default()
}

/// Raw protocol helpers: the client's half of the login exchange done by
/// hand with the library, so that tests can look at (and replay) bytes.
pub mod raw {
    use std::io::Write;
    use std::net::{SocketAddr, TcpStream};
    use std::time::{Duration, Instant};

    use ims::client::account::PasswordKeys;
    use ims::crypto::{self, scram, KdfParams, KdfPolicy};
    use ims::proto::crs::SEALED;
    use ims::proto::ms::{Challenge, MsRequest};
    use ims::proto::{self, Fields};
    use ims::seal::{Role, SessionKeys};
    use ims::wire::io::{write_message, MessageReader};
    use ims::wire::{Limits, Message};

    pub const TIMEOUT: Duration = Duration::from_secs(10);

    /// One connection reading whole messages.
    pub struct Conn {
        pub reader: MessageReader<TcpStream>,
    }

    impl Conn {
        pub fn connect(addr: SocketAddr) -> Conn {
            let s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
            s.set_nodelay(true).ok();
            Conn {
                reader: MessageReader::new(s),
            }
        }

        /// Writes raw bytes.
        pub fn write_raw(&mut self, bytes: &[u8]) {
            self.reader.get_mut().write_all(bytes).expect("write");
        }

        /// Sends a message and reads the reply.
        pub fn call(&mut self, m: &Message) -> Message {
            write_message(self.reader.get_mut(), m, Instant::now() + TIMEOUT).expect("write");
            self.read().expect("a reply")
        }

        /// The next message; `None` if the server closed.
        pub fn read(&mut self) -> Option<Message> {
            self.reader
                .read_message(&Limits::DEFAULT, Instant::now() + TIMEOUT)
                .ok()
                .flatten()
        }
    }

    /// One sealed request/reply to an MS as a logged-in user, on the
    /// login's held connection (pushes on it are skipped). `_ms` is where
    /// the login is, for the reader.
    pub fn ms_request(_ms: SocketAddr, login: &mut LoggedIn, req: &MsRequest) -> Message {
        let sealed = login
            .send
            .seal(SEALED, &[("Login", &login.login)], &req.to_message())
            .expect("seal");
        write_message(
            login.conn.reader.get_mut(),
            &sealed,
            Instant::now() + TIMEOUT,
        )
        .expect("write");
        let reply = loop {
            let m = login.conn.read().expect("a reply");
            if m.method() != Some(ims::proto::ms::PUSH) {
                break m;
            }
        };
        assert_eq!(reply.method(), Some(SEALED), "unsealed reply: {reply:?}");
        login.recv.open(&reply).expect("open reply")
    }

    /// What a successful raw login leaves: its held connection (dropping
    /// it ends the login) and its keys.
    pub struct LoggedIn {
        pub login: String,
        pub send: ims::seal::Sealer,
        pub recv: ims::seal::Opener,
        pub conn: Conn,
    }

    /// The bytes a login sent and what came back.
    pub struct Recorded {
        pub hello: Vec<u8>,
        pub login: Vec<u8>,
        pub reply: Message,
        pub session: Option<LoggedIn>,
    }

    /// A login between `LOGIN-HELLO` and `LOGIN`.
    pub struct Pending {
        conn: Conn,
        user: String,
        client_nonce: Vec<u8>,
        hello: Vec<u8>,
        /// The `LOGIN-HELLO` reply.
        pub challenge: Message,
        keys: Option<(PasswordKeys, Challenge)>,
    }

    /// Login step 1 by hand: `LOGIN-HELLO`, and the password's keys for
    /// the challenge.
    pub fn begin(ms: SocketAddr, user: &str, password: &str) -> Pending {
        let mut conn = Conn::connect(ms);
        let client_nonce = crypto::random_array::<24>().to_vec();
        let hello = MsRequest::LoginHello {
            user: user.to_owned(),
            client_nonce: client_nonce.clone(),
        }
        .to_message();
        let challenge = conn.call(&hello);
        let keys = challenge.is_success().then(|| {
            let ch = Challenge::from_message(&challenge).expect("challenge");
            let params = KdfParams {
                salt: ch.salt.clone(),
                iterations: ch.iterations,
            };
            (
                PasswordKeys::derive(password, &params, KdfPolicy::Insecure).expect("kdf"),
                ch,
            )
        });
        Pending {
            conn,
            user: user.to_owned(),
            client_nonce,
            hello: hello.encode(),
            challenge,
            keys,
        }
    }

    /// Login step 2 by hand: `LOGIN` with the proof.
    pub fn finish(p: Pending, listen_port: u16) -> Recorded {
        let Pending {
            mut conn,
            user,
            client_nonce,
            hello,
            challenge,
            keys,
        } = p;
        let Some((keys, ch)) = keys else {
            return Recorded {
                hello,
                login: Vec::new(),
                reply: challenge,
                session: None,
            };
        };
        let auth = proto::login_auth_message(
            &user,
            &client_nonce,
            &ch.server_nonce,
            &ch.salt,
            ch.iterations,
        );
        let proof = scram::client_proof(&keys.scram.client_key, &keys.scram.stored_key, &auth);
        let login = MsRequest::Login {
            proof: proof.to_vec(),
            listen_port,
        }
        .to_message();
        let reply = conn.call(&login);
        let sealed = reply.method() == Some(SEALED);
        let reply_ref = &reply;
        let session = sealed.then(move || {
            let reply = reply_ref;
            let expected = scram::server_signature(&keys.scram.server_key, &auth);
            let signature = reply.req_b64("Server-Signature").expect("Server-Signature");
            assert!(
                crypto::ct_eq(&expected, &signature),
                "the MS's signature is wrong"
            );
            let mut context = client_nonce.clone();
            context.extend_from_slice(&ch.server_nonce);
            let keys = SessionKeys::derive(&keys.scram.client_key, &context, Role::Initiator);
            let (send, mut recv) = (keys.send, keys.recv);
            recv.open(reply).expect("welcome opens");
            LoggedIn {
                login: reply.req("Login").expect("Login").to_owned(),
                send,
                recv,
                conn,
            }
        });
        Recorded {
            hello,
            login: login.encode(),
            reply,
            session,
        }
    }

    /// Logs `user` in at `ms` by hand; records the two requests' bytes.
    pub fn login(ms: SocketAddr, user: &str, password: &str, listen_port: u16) -> Recorded {
        finish(begin(ms, user, password), listen_port)
    }

    /// The code of a reply (0 for a request or nothing).
    pub fn code(m: &Message) -> u16 {
        m.code().unwrap_or(0)
    }
}

/// An INIT in `from`'s name to `to`, fresh and well formed but signed by
/// a key that is not `from`'s: what a forger can send.
pub fn forged_init(from: &str, to: &str) -> ims::proto::peer::Init {
    use ims::crypto;
    let mallory = crypto::RsaPrivateKey::generate(1024).unwrap();
    let nonce = crypto::random_array::<24>().to_vec();
    let share = crypto::EphemeralKey::generate().unwrap().public().to_vec();
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signature = mallory
        .sign_pss(&ims::proto::peer::init_transcript(
            from, to, time, &nonce, &share,
        ))
        .unwrap();
    ims::proto::peer::Init {
        from: from.into(),
        to: to.into(),
        time,
        nonce,
        share,
        signature,
    }
}

/// `from` offers the file at `path`, holding `content`, to `to` (named
/// `to_name`), who accepts it; checks that the received file on disk holds
/// `content` and gives the receiver's `file-received`.
pub fn send_and_receive(
    from: &Client,
    from_name: &str,
    to: &Client,
    to_name: &str,
    path: &Path,
    content: &[u8],
) -> Value {
    fs::write(path, content).unwrap();
    from.send(&format!("/send {to_name} {}", path.display()));
    to.wait_event("file-offer", |e| e["from"] == from_name);
    to.send(&format!("/accept {from_name}"));
    let got = to.wait_for(
        "file-received",
        |e| e["event"] == "file-received",
        std::time::Duration::from_secs(60),
    );
    assert_eq!(fs::read(field(&got, "path")).unwrap(), content);
    got
}
