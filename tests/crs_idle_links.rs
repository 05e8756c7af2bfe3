//! The CRS's links to its MSs are held connections that cost no worker
//! while idle: each MS keeps an `EVENTS` long poll open at all times, and
//! a poll with nothing to answer is parked in the CRS's gate, not on a
//! worker. A CRS with 2 workers and 10 MSs enrolled therefore has 10 polls
//! parked and both workers free: logins and presence go through at once.
//! (Were each poll to hold a worker for its 5 s, the 10 polls would keep
//! both busy and every login's requests to the CRS would queue behind
//! them.)

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{befriend, Cluster, WAIT};

const PW: &str = "correct horse";

/// MSs enrolled, each holding an `EVENTS` poll.
const MSS: usize = 10;

/// How soon presence must reach a buddy: far below the 5 s a poll would
/// hold a worker, and generous for a busy machine (a push takes a few
/// milliseconds when nothing waits for a worker).
const PROMPT: Duration = Duration::from_secs(3);

/// The metrics address the CRS logged ("metrics on http://ADDR/metrics").
fn metrics_addr(log: &str) -> SocketAddr {
    let at = log
        .find("metrics on http://")
        .unwrap_or_else(|| panic!("no metrics address in the log: {log}"));
    let rest = &log[at + "metrics on http://".len()..];
    let addr = rest.split("/metrics").next().unwrap_or_default();
    addr.parse()
        .unwrap_or_else(|e| panic!("bad metrics address {addr:?}: {e}"))
}

/// The value of the plain sample `name` in one scrape.
fn sample(addr: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    text.lines()
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.trim().parse::<f64>().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Waits (up to [`WAIT`]) for `name` to reach at least `want`; its value.
fn wait_sample(addr: SocketAddr, name: &str, want: f64) -> f64 {
    let end = Instant::now() + WAIT;
    loop {
        let v = sample(addr, name);
        if v >= want || Instant::now() >= end {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn idle_ms_links_hold_no_crs_worker() {
    let cluster =
        Cluster::start_configured(MSS, "metrics = \"127.0.0.1:0\"\n[pool]\nworkers = 2\n", &[]);
    let metrics = metrics_addr(&cluster.crs.proc.log_text());
    cluster
        .crs
        .wait_ms_list("every MS enrolled", |list| list.len() == MSS);

    // Every MS's poll is parked, though there are only 2 workers.
    let parked = wait_sample(metrics, "ims_crs_connections_parked", MSS as f64);
    assert!(
        parked >= MSS as f64,
        "{parked} polls parked with {MSS} MSs enrolled"
    );

    cluster.register("alice", PW);
    cluster.register("bob", PW);
    let alice = cluster.login("alice", PW);
    let bob = cluster.login("bob", PW);
    befriend(&alice, "alice", &bob, "bob");

    // Logins and presence go through without waiting for a worker, round
    // after round, while the polls stay parked.
    for round in 0..3 {
        bob.send("/logout");
        bob.wait_event("logged-out", |e| e["user"] == "bob");
        alice.wait_for(
            &format!("bob offline, round {round}"),
            |e| e["event"] == "offline" && e["user"] == "bob",
            PROMPT,
        );
        bob.send("/login bob");
        bob.wait_event("logged-in", |e| e["user"] == "bob");
        alice.wait_for(
            &format!("bob online, round {round}"),
            |e| e["event"] == "online" && e["user"] == "bob",
            PROMPT,
        );
    }
    let parked = wait_sample(metrics, "ims_crs_connections_parked", MSS as f64);
    assert!(
        parked >= MSS as f64,
        "{parked} polls parked after the logins"
    );
    // Nothing was refused for want of a worker.
    assert_eq!(sample(metrics, "ims_crs_busy_replies_total"), 0.0);
}
