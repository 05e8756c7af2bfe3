//! Requests per second of the pre-threaded pool against a baseline
//! thread-per-connection server, both over loopback with the same codec,
//! the same trivial handler (`200 OK`) and the same load generator.
//!
//! Run with `cargo bench --bench pool`. Two rounds, alternating servers so
//! that both see the same machine noise; the best of each is compared.
//! Connection-per-request load is capped in count so that TIME_WAIT
//! sockets cannot exhaust the ephemeral ports.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ims::prethread::{Config, Outcome, Peer, Server, Service};
use ims::wire::io::{write_message, MessageReader};
use ims::wire::{Limits, Message};

/// How long one measurement runs at most.
const RUN: Duration = Duration::from_secs(3);
/// Most connections of one connection-per-request measurement.
const MAX_CONNECTIONS: u64 = 20_000;
/// Requests per connection in the keep-alive measurement.
const KEEP_ALIVE: usize = 1000;
/// Load generator threads (and connections at once).
const CLIENTS: usize = 4;
/// Pool workers: enough for the clients' keep-alive connections; the
/// machine has 2 cores.
const WORKERS: usize = 4;
const ROUNDS: usize = 2;

/// The trivial handler: `200 OK` to everything.
struct Ok200;

impl Service for Ok200 {
    type Session = ();
    fn open(&self, _peer: &Peer) {}
    fn handle(&self, _session: &mut (), _request: Message) -> Outcome {
        Outcome::Reply(Message::ok())
    }
}

/// The baseline: a thread spawned per accepted connection, same codec.
struct Baseline {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Baseline {
    fn start() -> Baseline {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicUsize::new(0));
        let (stop2, live2) = (Arc::clone(&stop), Arc::clone(&live));
        let acceptor = thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                live2.fetch_add(1, Ordering::SeqCst);
                let live3 = Arc::clone(&live2);
                let spawned = thread::Builder::new().spawn(move || {
                    baseline_connection(stream);
                    live3.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    live2.fetch_sub(1, Ordering::SeqCst);
                }
            }
        });
        Baseline {
            addr,
            stop,
            live,
            acceptor: Some(acceptor),
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        while self.live.load(Ordering::SeqCst) > 0 {
            thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One baseline connection: read, reply, until the peer closes.
fn baseline_connection(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let limits = Limits::DEFAULT;
    let ok = Message::ok();
    let mut reader = MessageReader::new(stream);
    loop {
        let deadline = Instant::now() + Duration::from_secs(10);
        match reader.read_message(&limits, deadline) {
            Ok(Some(_)) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                if write_message(reader.get_mut(), &ok, deadline).is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// One measurement's outcome.
#[derive(Clone, Copy, Default)]
struct Run {
    requests: u64,
    errors: u64,
    seconds: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Drives `CLIENTS` threads against `addr`, `per_connection` requests on
/// each connection, until `RUN` passes or `max_connections` are used.
fn load(addr: SocketAddr, per_connection: usize, max_connections: u64) -> Run {
    let request = Message::request("PING").encode();
    let connections = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = started + RUN;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (request, connections, requests, errors) = (
                request.clone(),
                Arc::clone(&connections),
                Arc::clone(&requests),
                Arc::clone(&errors),
            );
            thread::spawn(move || {
                let limits = Limits::DEFAULT;
                while Instant::now() < end
                    && connections.fetch_add(1, Ordering::Relaxed) < max_connections
                {
                    let Ok(stream) = TcpStream::connect(addr) else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let mut reader = MessageReader::new(stream);
                    let mut done = 0;
                    for i in 0..per_connection {
                        if i % 64 == 63 && Instant::now() >= end {
                            break;
                        }
                        if reader.get_mut().write_all(&request).is_err() {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        let deadline = Instant::now() + Duration::from_secs(10);
                        match reader.read_message(&limits, deadline) {
                            Ok(Some(reply)) if reply.is_success() => done += 1,
                            _ => {
                                errors.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                    requests.fetch_add(done, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Run {
        requests: requests.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn measure_pool(per_connection: usize, max_connections: u64) -> Run {
    let config = Config {
        name: "bench".to_owned(),
        workers: WORKERS,
        queue: 4 * WORKERS,
        ..Config::default()
    };
    let server = Server::bind("127.0.0.1:0", config, Arc::new(Ok200)).expect("bind pool");
    let run = load(server.local_addr(), per_connection, max_connections);
    server.stop_and_join();
    run
}

fn measure_baseline(per_connection: usize, max_connections: u64) -> Run {
    let server = Baseline::start();
    let run = load(server.addr, per_connection, max_connections);
    server.stop();
    run
}

fn best(a: Run, b: Run) -> Run {
    if b.rate() > a.rate() {
        b
    } else {
        a
    }
}

fn main() {
    let cases: [(&str, usize, u64); 2] = [
        ("connection per request", 1, MAX_CONNECTIONS),
        ("keep-alive, 1000/conn", KEEP_ALIVE, u64::MAX),
    ];
    println!(
        "pool: {WORKERS} workers; load: {CLIENTS} client threads, {} s per run, {ROUNDS} rounds",
        RUN.as_secs()
    );
    println!(
        "{:<24} {:>6} {:>14} {:>14} {:>8} {:>8}",
        "case", "round", "baseline r/s", "pool r/s", "ratio", "errors"
    );
    let mut summary = Vec::new();
    for (label, per_connection, max_connections) in cases {
        let (mut best_base, mut best_pool) = (Run::default(), Run::default());
        for round in 1..=ROUNDS {
            // Alternate which goes first so that neither always runs on a
            // machine warmed (or tired) by the other.
            let (base, pool) = if round % 2 == 1 {
                let b = measure_baseline(per_connection, max_connections);
                (b, measure_pool(per_connection, max_connections))
            } else {
                let p = measure_pool(per_connection, max_connections);
                (measure_baseline(per_connection, max_connections), p)
            };
            println!(
                "{:<24} {:>6} {:>14.0} {:>14.0} {:>8.2} {:>8}",
                label,
                round,
                base.rate(),
                pool.rate(),
                pool.rate() / base.rate(),
                base.errors + pool.errors
            );
            best_base = best(best_base, base);
            best_pool = best(best_pool, pool);
        }
        summary.push((label, best_base, best_pool));
    }
    println!();
    println!(
        "{:<24} {:>14} {:>14} {:>8}",
        "best of rounds", "baseline r/s", "pool r/s", "ratio"
    );
    for (label, base, pool) in summary {
        println!(
            "{:<24} {:>14.0} {:>14.0} {:>8.2}",
            label,
            base.rate(),
            pool.rate(),
            pool.rate() / base.rate()
        );
    }
}
