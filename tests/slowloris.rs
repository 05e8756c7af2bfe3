//! Slow and silent connections cost no worker: the CRS, the MS and a
//! client's own listener are each flooded with 2,000 idle connections and
//! 200 that trickle a byte a second, all from 127.0.0.1, and a real login
//! (or a real message to the client) still completes within 2 s. The
//! flooded program's resident memory grows by at most [`RSS_BOUND_KIB`].

mod common;

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;

const PW: &str = "correct horse";

/// Connections that send nothing.
const IDLE: usize = 2000;
/// Connections that send one byte a second of a request never finished.
const TRICKLING: usize = 200;
/// What the issue asks of a login or a message under the flood.
const WITHIN: Duration = Duration::from_secs(2);
/// Resident memory a flooded program may grow by: 2,200 connections held
/// in the gate cost well under 1 KiB each in user space (the kernel's
/// socket memory is not in RSS); 16 MiB leaves room for the allocator.
const RSS_BOUND_KIB: u64 = 16 * 1024;

/// The connections of one flood, and the thread that trickles.
struct Flood {
    idle: Vec<TcpStream>,
    stop: Arc<AtomicBool>,
    trickler: Option<JoinHandle<usize>>,
}

impl Flood {
    /// Opens the flood against `addr`; returns once every connection is up.
    fn start(addr: SocketAddr) -> Flood {
        let idle: Vec<TcpStream> = (0..IDLE)
            .map(|i| {
                TcpStream::connect(addr).unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
            })
            .collect();
        let slow: Vec<TcpStream> = (0..TRICKLING)
            .map(|i| {
                TcpStream::connect(addr).unwrap_or_else(|e| panic!("trickling connection {i}: {e}"))
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let trickler = thread::spawn(move || {
            let line = b"LOGIN\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            let mut slow = slow;
            let mut sent = 0usize;
            let mut i = 0;
            while !stop2.load(Ordering::SeqCst) {
                let byte = line[i % line.len()];
                for s in &mut slow {
                    if s.write_all(&[byte]).is_ok() {
                        sent += 1;
                    }
                }
                i += 1;
                // One byte a second each; checked often so a stop is quick.
                let next = Instant::now() + Duration::from_secs(1);
                while Instant::now() < next && !stop2.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(50));
                }
            }
            sent
        });
        Flood {
            idle,
            stop,
            trickler: Some(trickler),
        }
    }

    /// How many of the idle connections the server still holds open, and
    /// whether every one it closed was closed for its deadline (a `408`):
    /// a connection set up slowly on a busy machine may reach the first
    /// message's deadline during the test, which is the server's right.
    fn idle_state(&self) -> (usize, bool) {
        let mut open = 0;
        let mut all_fair = true;
        for s in &self.idle {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 64];
            match s.peek(&mut b) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => open += 1,
                Ok(n) if b[..n].starts_with(b"408 ") => {}
                other => {
                    eprintln!("an idle connection ended without a 408: {other:?}");
                    all_fair = false;
                }
            }
            s.set_nonblocking(false).unwrap();
        }
        (open, all_fair)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.trickler.take() {
            let _ = t.join();
        }
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Floods `addr` (the program `pid`), runs `real` and checks that it took
/// less than [`WITHIN`], that the flood was really held meanwhile and that
/// the program's memory stayed bounded.
fn under_flood(
    what: &str,
    addr: SocketAddr,
    pid: u32,
    log: &dyn Fn() -> String,
    real: impl FnOnce(),
) {
    let before = rss_kib(pid);
    let flood = Flood::start(addr);
    // Give the gate a moment to take the flood in, then measure.
    thread::sleep(Duration::from_millis(200));
    let (open, fair) = flood.idle_state();
    assert!(
        fair && open >= IDLE / 2,
        "{what}: {open} of the flood's idle connections are held open; log:\n{}",
        log()
    );
    let started = Instant::now();
    real();
    let took = started.elapsed();
    let (held, fair) = flood.idle_state();
    let after = rss_kib(pid);
    drop(flood);
    eprintln!(
        "{what}: took {took:?} under {IDLE} idle ({held} still open) + {TRICKLING} trickling \
         connections; RSS {before} -> {after} KiB"
    );
    assert!(
        fair && held >= IDLE / 2,
        "{what}: {held} of the idle flood still held open"
    );
    assert!(took < WITHIN, "{what} took {took:?} under the flood");
    assert!(
        after.saturating_sub(before) <= RSS_BOUND_KIB,
        "{what}: RSS grew from {before} to {after} KiB"
    );
}

#[test]
fn floods_of_idle_and_trickling_connections_do_not_stop_real_work() {
    // The flood and the servers' ends of it need more descriptors than the
    // usual soft limit; the servers raise theirs at start.
    let limit = ims::prethread::raise_open_files_limit();
    assert!(
        limit >= 3 * (IDLE + TRICKLING) as u64,
        "open-files limit {limit} too low for the flood"
    );
    let c = Cluster::start(1);
    c.register("alice", PW);
    c.register("bob", PW);

    // The CRS: a client's first step (locating an MS) goes to it.
    let alice = c.client("alice", PW);
    under_flood(
        "login with the CRS flooded",
        c.crs.addr,
        c.crs.pid(),
        &|| c.crs.proc.log_text(),
        || {
            alice.send("/login alice");
            alice.wait_for(
                "logged-in",
                |e| e["event"] == "logged-in" && e["user"] == "alice",
                WAIT,
            );
        },
    );

    // The MS.
    let bob = c.client("bob", PW);
    under_flood(
        "login with the MS flooded",
        c.ms[0].addr,
        c.ms[0].pid(),
        &|| c.ms[0].log_text(),
        || {
            bob.send("/login bob");
            bob.wait_for(
                "logged-in",
                |e| e["event"] == "logged-in" && e["user"] == "bob",
                WAIT,
            );
        },
    );

    // The client's own listener: a buddy's message still arrives.
    befriend(&alice, "alice", &bob, "bob");
    alice.send("/msg bob warm up");
    bob.wait_event("message", |e| e["text"] == "warm up");
    let addr = bob.listen_addr();
    under_flood(
        "a message with the client flooded",
        addr,
        bob.pid(),
        &|| bob.log_text(),
        || {
            alice.send("/msg bob through the flood");
            bob.wait_event("message", |e| e["text"] == "through the flood");
        },
    );
}
