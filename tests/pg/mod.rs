//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory as an unprivileged user (the server refuses to run as root),
//! listening on 127.0.0.1 at a free port with its unix socket in the same
//! directory, stopped and removed when the [`PgServer`] guard drops, so a
//! failing test stops it too.
//!
//! Never skipped: a missing PostgreSQL is a test failure that says how to
//! install it (`.ci/run` does).
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where PostgreSQL's programs are: on PATH, or Debian's versioned directory.
pub fn bin_dir() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
                return dir;
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql/*/bin); \
             install it with `apt-get install postgresql` (.ci/run does this)"
        )
    })
}

/// The uid and gid to run the server as: ours unless we are root, else
/// the `postgres` user (or `nobody`).
fn run_as() -> Option<(u32, u32)> {
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    for want in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == want {
                if let (Ok(u), Ok(g)) = (f[2].parse(), f[3].parse()) {
                    return Some((u, g));
                }
            }
        }
    }
    panic!("running as root and neither a postgres nor a nobody user exists");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A running test server; stopped and deleted on drop.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
    child: Option<Child>,
}

impl PgServer {
    /// initdb and start a server; waits until it accepts connections.
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("ims-pg-")
            .tempdir()
            .expect("tempdir");
        let user = run_as();
        if let Some((u, g)) = user {
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{u}:{g}"))
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown of the test database directory");
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((u, g)) = user {
            initdb.uid(u).gid(g);
        }
        let out = initdb.output().expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = PgServer {
            dir,
            bin,
            user,
            port: free_port(),
            child: None,
        };
        // The free port may be taken by someone else before the server
        // binds it: then another.
        for _ in 0..5 {
            if server.try_launch().is_ok() {
                server.create_db("ims");
                return server;
            }
            server.port = free_port();
        }
        server.launch();
        server.create_db("ims");
        server
    }

    /// Starts the server process on the existing data directory and port.
    pub fn launch(&mut self) {
        if let Err(e) = self.try_launch() {
            panic!("{e}");
        }
    }

    fn try_launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log file");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                // Tests crash the server process, never the machine: the
                // WAL in the page cache survives that, so no fsync needed.
                "-c",
                "fsync=off",
                "-c",
                "max_connections=300",
            ])
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((u, g)) = self.user {
            cmd.uid(u).gid(g);
        }
        self.child = Some(cmd.spawn().expect("start postgres"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match postgres::Client::connect(&self.url_of("postgres"), postgres::NoTls) {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                        self.child = None;
                        return Err(format!("postgres exited ({status}): {}", self.log()));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    self.stop();
                    return Err(format!("postgres did not start: {e}\n{}", self.log()));
                }
            }
        }
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// kill -9 the postmaster (its backends notice and exit).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            // Backends exit when they notice the postmaster gone; wait for
            // the port to be free so a restart can bind it.
            let deadline = Instant::now() + Duration::from_secs(30);
            while TcpListener::bind(("127.0.0.1", self.port)).is_err() && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = std::fs::remove_file(self.dir.path().join("data/postmaster.pid"));
        }
    }

    /// Fast shutdown (SIGINT), then SIGKILL if it lingers.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The URL of database `db`.
    pub fn url_of(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The URL of the test database `ims`.
    pub fn url(&self) -> String {
        self.url_of("ims")
    }

    /// Creates another empty database.
    pub fn create_db(&self, name: &str) {
        let mut c =
            postgres::Client::connect(&self.url_of("postgres"), postgres::NoTls).expect("connect");
        c.batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .expect("create database");
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
