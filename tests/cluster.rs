//! `make run-cluster`'s script as a user runs it: it starts a CRS and two
//! MSs with demo users, two clients chat and send a file through it, and
//! SIGINT stops everything it started, leaving no process and no port.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A port free right now (the script checks again and says if it is taken).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn bound(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) && !text.contains("cluster-") {
            found.push(format!("{}: {text}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// A running `scripts/run-cluster`: on drop (also when a test panics) it
/// gets SIGTERM, which makes it stop everything it started.
struct Script(std::process::Child);

impl Drop for Script {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            Command::new("kill")
                .args(["-TERM", &self.0.id().to_string()])
                .status()
                .ok();
            let end = Instant::now() + Duration::from_secs(15);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < end {
                thread::sleep(Duration::from_millis(100));
            }
            self.0.kill().ok();
            self.0.wait().ok();
        }
    }
}

/// `scripts/run-cluster` with the test's binaries, state directory and ports.
fn run_cluster(run_dir: &Path, ports: &[u16]) -> Command {
    let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/run-cluster"));
    cmd.env("RUN_DIR", run_dir)
        .env("BIN", Path::new(CRS_BIN).parent().unwrap())
        .env("RUST_LOG", "info");
    for (var, port) in ["CRS_PORT", "MS1_PORT", "MS2_PORT", "ALICE_PORT", "BOB_PORT"]
        .iter()
        .zip(ports)
    {
        cmd.env(var, port.to_string());
    }
    cmd
}

#[test]
fn run_cluster_chats_and_stops_cleanly() {
    let env = TestEnv::new();
    let run_dir = env.path().join("run");
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let mut cluster = Script(
        run_cluster(&run_dir, &ports)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start scripts/run-cluster"),
    );
    // Its output, line by line, until it says how to open the clients.
    let (tx, rx) = mpsc::channel();
    let out = cluster.0.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let end = Instant::now() + Duration::from_secs(120);
    while !seen.iter().any(|l: &String| l.contains("ims-client -c")) {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("run-cluster never became ready:\n{}", seen.join("\n")),
        }
    }
    for name in ["[crs]", "[ms1]", "[ms2]"] {
        assert!(
            seen.iter().any(|l| l.starts_with(name)),
            "no log lines from {name}:\n{}",
            seen.join("\n")
        );
    }

    let start = |user: &str| {
        let config = run_dir.join(format!("client-{user}.toml"));
        let c = Client::start_raw(&env, user, &["-c", config.to_str().unwrap(), "--json"]);
        c.wait_event("logged-in", |e| e["user"] == user);
        c
    };
    let alice = start("alice");
    let bob = start("bob");
    alice.send("/add bob");
    bob.wait_event("request", |e| e["from"] == "alice");
    bob.send("/accept alice");
    alice.wait_event("buddy-added", |e| e["user"] == "bob" && e["online"] == true);
    alice.send("/msg bob hello from the demo");
    bob.wait_event("message", |e| e["text"] == "hello from the demo");
    let file = env.path().join("demo.txt");
    std::fs::write(&file, b"demo file").unwrap();
    alice.send(&format!("/send bob {}", file.display()));
    bob.wait_event("file-offer", |e| e["from"] == "alice");
    bob.send("/accept alice");
    let got = bob.wait_for("file-received", |e| e["event"] == "file-received", WAIT);
    assert_eq!(std::fs::read(field(&got, "path")).unwrap(), b"demo file");
    alice.quit();
    bob.quit();

    // Ctrl-C.
    let status = Command::new("kill")
        .args(["-INT", &cluster.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let end = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = cluster.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "run-cluster did not stop within 30 s of SIGINT"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(exit.success(), "run-cluster exited with {exit}");
    let left = processes_mentioning(run_dir.to_str().unwrap());
    assert!(left.is_empty(), "processes left running: {left:?}");
    for p in &ports[..3] {
        assert!(!bound(*p), "port {p} still bound after the cluster stopped");
    }

    // A second run keeps the users of the first.
    let mut again = Script(
        run_cluster(&run_dir, &ports)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    let out = BufReader::new(again.0.stdout.take().unwrap());
    // Keep reading to the end: a closed pipe would kill the script.
    thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            tx.send(line).ok();
        }
    });
    let mut exists = false;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(60)) {
        exists |= line.contains("alice exists already");
        if line.contains("ims-client -c") {
            break;
        }
    }
    Command::new("kill")
        .args(["-TERM", &again.0.id().to_string()])
        .status()
        .unwrap();
    assert!(again.0.wait().unwrap().success());
    assert!(exists, "the second run did not find alice");

    // A taken port is named, and nothing starts.
    let squatter = TcpListener::bind(("127.0.0.1", ports[1])).unwrap();
    let out = run_cluster(&run_dir, &ports).output().unwrap();
    drop(squatter);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("port {}", ports[1])), "{err}");
    assert!(
        !bound(ports[0]),
        "the CRS started although a port was taken"
    );
}

#[test]
fn multi_host_run_in_network_namespaces() {
    let bin = Path::new(CRS_BIN).parent().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/multihost-test");
    let out = Command::new(script)
        .arg(bin)
        .output()
        .expect("run scripts/multihost-test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "multihost-test failed:\n{text}");
    assert!(text.contains("SKIP") || text.contains("1 passed"), "{text}");
}
