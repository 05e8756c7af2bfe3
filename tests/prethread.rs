//! The pre-threaded server over real sockets on 127.0.0.1: echo, overload,
//! slow peers, panics, shutdown, malformed input and stalled readers.
//!
//! Bounds are generous: the machine is shared, so tests check that things
//! happen, and only roughly how fast.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use ims::prethread::{Config, Outcome, Peer, Server, Service, Stats};
use ims::wire::io::{write_message, IoError, MessageReader};
use ims::wire::{code, Limits, Message};

/// Requests the test service understands:
/// - `ECHO`: `200` with the request's body;
/// - `BLOCK`: reports entry on `entered`, waits for a token on `release`;
/// - `PANIC`: panics;
/// - `BIG`: `200` with a 4 MiB body;
/// - `BYE`: `200`, then close;
/// - `FILES`: raise this session's body limit to the file-frame limit;
/// - `RAW`: take the socket over and echo 5 raw bytes after `taken`.
struct TestService {
    entered: Sender<()>,
    release: Receiver<()>,
}

/// The per-connection state: whether `FILES` was sent.
struct Session {
    files: bool,
}

impl Service for TestService {
    type Session = Session;

    fn open(&self, _peer: &Peer) -> Session {
        Session { files: false }
    }

    fn handle(&self, session: &mut Session, request: Message) -> Outcome {
        match request.method().unwrap_or("") {
            "ECHO" => Outcome::Reply(Message::ok().with_body(request.body)),
            "BLOCK" => {
                let _ = self.entered.send(());
                let _ = self.release.recv_timeout(Duration::from_secs(20));
                Outcome::Reply(Message::ok())
            }
            "PANIC" => panic!("test handler panics on request"),
            "BIG" => Outcome::Reply(Message::ok().with_body(vec![b'x'; 4 << 20])),
            "BYE" => Outcome::ReplyAndClose(Message::ok()),
            "FILES" => {
                session.files = true;
                Outcome::Reply(Message::ok())
            }
            "RAW" => Outcome::Takeover(Box::new(|mut stream: TcpStream, mut data: Vec<u8>| {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.write_all(b"taken");
                let mut buf = [0u8; 16];
                while data.len() < 5 {
                    match stream.read(&mut buf) {
                        Ok(n) if n > 0 => data.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let _ = stream.write_all(&data[..5]);
            })),
            _ => Outcome::Reply(Message::reply(code::UNKNOWN_METHOD, "unknown method")),
        }
    }

    fn limits(&self, session: &Session) -> Option<Limits> {
        session.files.then(|| Limits::DEFAULT.for_files())
    }
}

/// A test service and the test's ends of its channels: receive on the
/// first when a `BLOCK` handler starts, send on the second to release one.
fn service() -> (Arc<TestService>, Receiver<()>, Sender<()>) {
    let (entered_tx, entered_rx) = unbounded();
    let (release_tx, release_rx) = unbounded();
    let service = TestService {
        entered: entered_tx,
        release: release_rx,
    };
    (Arc::new(service), entered_rx, release_tx)
}

/// A config with short, test-friendly times.
fn config(name: &str, workers: usize, queue: usize) -> Config {
    Config {
        name: name.to_owned(),
        workers,
        queue,
        message_deadline: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        write_deadline: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(2),
        limits: Limits::DEFAULT,
        ..Config::default()
    }
}

/// A blocking test client.
struct Client {
    reader: MessageReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        Client {
            reader: MessageReader::new(stream),
        }
    }

    fn send(&mut self, message: &Message) {
        let deadline = Instant::now() + Duration::from_secs(5);
        write_message(self.reader.get_mut(), message, deadline).expect("send");
    }

    fn recv(&mut self) -> Result<Option<Message>, IoError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        self.reader
            .read_message(&Limits::DEFAULT.for_files(), deadline)
    }

    fn call(&mut self, message: &Message) -> Message {
        self.send(message);
        self.recv().expect("reply").expect("a reply, not a close")
    }

    fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

fn echo(body: &str) -> Message {
    Message::request("ECHO").with_body(body.as_bytes())
}

/// Polls `stats` until `done` holds, for at most `limit`.
fn wait_for(server: &Server, limit: Duration, done: impl Fn(&Stats) -> bool) -> Stats {
    let end = Instant::now() + limit;
    loop {
        let stats = server.stats();
        if done(&stats) || Instant::now() >= end {
            return stats;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok())
                .filter_map(|t| fs::read_to_string(t.path().join("comm")).ok())
                .filter(|comm| comm.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// Polls until `threads_named(prefix) == n`, for at most 3 s.
fn wait_threads(prefix: &str, n: usize) -> usize {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let count = threads_named(prefix);
        if count == n || Instant::now() >= end {
            return count;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the peer has closed: a read returns EOF or an error.
fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            // Skip a best-effort error reply.
            Ok(_) => {}
        }
    }
}

#[test]
fn handlers_run_without_sockets() {
    let (service, _, _) = service();
    let peer = Peer {
        remote: "127.0.0.1:1".parse().unwrap(),
        local: "127.0.0.1:2".parse().unwrap(),
    };
    let mut session = service.open(&peer);
    match service.handle(&mut session, echo("hi")) {
        Outcome::Reply(reply) => assert_eq!(reply.body, b"hi"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(service.limits(&session).is_none());
    let _ = service.handle(&mut session, Message::request("FILES"));
    assert!(service.limits(&session).is_some());
}

#[test]
fn echo_keep_alive_and_connection_per_request() {
    let (service, _, _) = service();
    let server = Server::bind("127.0.0.1:0", config("echo", 4, 16), service).unwrap();
    let addr = server.local_addr();

    let mut client = Client::connect(addr);
    for i in 0..200 {
        let body = format!("message {i}");
        let reply = client.call(&echo(&body));
        assert_eq!(reply.code(), Some(code::OK));
        assert_eq!(reply.body, body.as_bytes());
    }
    let reply = client.call(&Message::request("NOPE"));
    assert_eq!(reply.code(), Some(code::UNKNOWN_METHOD));
    let reply = client.call(&Message::request("BYE"));
    assert_eq!(reply.code(), Some(code::OK));
    assert!(matches!(client.recv(), Ok(None)), "closed after BYE");

    let clients: Vec<_> = (0..6)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..25 {
                    let body = format!("thread {t} request {i}");
                    let reply = Client::connect(addr).call(&echo(&body));
                    assert_eq!(reply.body, body.as_bytes());
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let stats = server.stats();
    assert_eq!(stats.accepted, 151);
    assert_eq!(stats.rejected_busy, 0);
    assert_eq!(stats.panicked, 0);
    server.stop_and_join();
}

#[test]
fn overload_gets_503_at_once() {
    let (service, entered, release) = service();
    let (workers, queue) = (2, 2);
    let server = Server::bind("127.0.0.1:0", config("busy", workers, queue), service).unwrap();
    let addr = server.local_addr();

    // Fill the workers, then the queue, with requests that block; one at
    // a time, so that none is refused while a worker is still picking up.
    let mut stuck = Vec::new();
    for i in 0..workers + queue {
        let mut client = Client::connect(addr);
        client.send(&Message::request("BLOCK"));
        stuck.push(client);
        if i < workers {
            entered
                .recv_timeout(Duration::from_secs(10))
                .expect("worker busy");
        } else {
            wait_for(&server, Duration::from_secs(10), |s| s.accepted > i as u64);
        }
    }
    let stats = server.stats();
    assert_eq!(stats.accepted, (workers + queue) as u64);
    assert_eq!(stats.rejected_busy, 0);

    // One more: refused at once, not queued.
    let started = Instant::now();
    let mut extra = Client::connect(addr);
    extra.send(&echo("please"));
    let reply = extra.recv().expect("a reply").expect("not a bare close");
    assert_eq!(reply.code(), Some(code::BUSY));
    assert!(
        matches!(extra.recv(), Ok(None) | Err(_)),
        "closed after 503"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "503 took {:?}",
        started.elapsed()
    );
    assert_eq!(server.stats().rejected_busy, 1);

    // Released, every stuck request completes.
    for _ in 0..workers + queue {
        release.send(()).unwrap();
    }
    for mut client in stuck {
        let reply = client.recv().expect("reply").expect("not closed");
        assert_eq!(reply.code(), Some(code::OK));
    }
    server.stop_and_join();
}

#[test]
fn slow_and_silent_peers_are_dropped_at_the_deadline() {
    let (service, _, _) = service();
    let workers = 2;
    let mut cfg = config("slow", workers, 8);
    cfg.message_deadline = Duration::from_secs(1);
    let server = Server::bind("127.0.0.1:0", cfg, service).unwrap();
    let addr = server.local_addr();

    let mut silent: Vec<_> = (0..workers)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // Tricklers: a byte every 200 ms of a request that would take 10 s.
    let tricklers: Vec<_> = (0..workers)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            thread::spawn(move || {
                let request = format!("ECHO\r\nX-Pad: {}\r\n", "a".repeat(40));
                for byte in request.as_bytes() {
                    if stream.write_all(&[*byte]).is_err() {
                        return true;
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                false
            })
        })
        .collect();

    let stats = wait_for(&server, Duration::from_secs(15), |s| {
        s.timed_out >= 2 * workers as u64
    });
    assert_eq!(stats.timed_out, 2 * workers as u64);

    // A silent peer got a best-effort 408 and was closed.
    let mut reader = MessageReader::new(silent.remove(0));
    let reply = reader
        .read_message(&Limits::DEFAULT, Instant::now() + Duration::from_secs(5))
        .expect("a reply")
        .expect("not a bare close");
    assert_eq!(reply.code(), Some(code::TIMEOUT));

    // A real request is served at once.
    let reply = Client::connect(addr).call(&echo("real"));
    assert_eq!(reply.body, b"real");

    for t in tricklers {
        assert!(t.join().unwrap(), "trickler was cut off");
    }
    server.stop_and_join();
}

#[test]
fn panics_do_not_shrink_the_pool() {
    let (service, entered, release) = service();
    let workers = 2;
    let server = Server::bind("127.0.0.1:0", config("pn", workers, 4), service).unwrap();
    let addr = server.local_addr();

    for _ in 0..5 {
        let mut client = Client::connect(addr);
        client.send(&Message::request("PANIC"));
        assert!(matches!(client.recv(), Ok(None) | Err(_)), "dropped");
    }
    let stats = wait_for(&server, Duration::from_secs(10), |s| s.panicked >= 5);
    assert_eq!(stats.panicked, 5);
    assert_eq!(wait_threads("pn-w", workers), workers, "pool size kept");

    // Still `workers` requests in parallel: both enter before either leaves.
    let blocked: Vec<_> = (0..workers)
        .map(|_| {
            let mut client = Client::connect(addr);
            client.send(&Message::request("BLOCK"));
            client
        })
        .collect();
    for _ in 0..workers {
        entered
            .recv_timeout(Duration::from_secs(10))
            .expect("served concurrently");
    }
    for _ in 0..workers {
        release.send(()).unwrap();
    }
    for mut client in blocked {
        assert_eq!(client.recv().unwrap().unwrap().code(), Some(code::OK));
    }
    server.stop_and_join();
    assert_eq!(wait_threads("pn-", 0), 0, "replacements joined too");
}

#[test]
fn stop_joins_every_thread_despite_idle_and_slow_peers() {
    let (service, _, _) = service();
    let mut cfg = config("sd", 3, 4);
    cfg.message_deadline = Duration::from_secs(30);
    cfg.idle_timeout = Duration::from_secs(30);
    cfg.shutdown_grace = Duration::from_secs(1);
    let server = Server::bind("127.0.0.1:0", cfg, service).unwrap();
    let addr = server.local_addr();
    assert_eq!(
        wait_threads("sd-", 5),
        5,
        "3 workers, the gate and the acceptor"
    );

    // Two idle keep-alive connections, and one stuck in mid-message
    // (which only the end of the grace period can cut).
    let mut idle: Vec<_> = (0..2)
        .map(|_| {
            let mut client = Client::connect(addr);
            assert_eq!(client.call(&echo("x")).code(), Some(code::OK));
            client
        })
        .collect();
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"ECHO\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    let stats = wait_for(&server, Duration::from_secs(5), |s| s.held == 3);
    assert_eq!(stats.held, 3, "all three connections held by the gate");
    assert_eq!(stats.active, 0, "no worker waits for a peer");

    let started = Instant::now();
    server.stop_and_join();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(6), "join took {took:?}");
    assert_eq!(wait_threads("sd-", 0), 0, "every thread joined");

    for client in &mut idle {
        assert!(closed_by_peer(client.stream()));
    }
    assert!(closed_by_peer(&mut half));
    // The listener is gone: refused, or at least closed at once.
    if let Ok(mut late) = TcpStream::connect(addr) {
        assert!(closed_by_peer(&mut late));
    }
}

#[test]
fn stop_wakes_an_acceptor_bound_to_the_any_address() {
    let (service, _, _) = service();
    let server = Server::bind("0.0.0.0:0", config("any", 1, 1), service).unwrap();
    let port = server.local_addr().port();
    let reply = Client::connect(SocketAddr::from(([127, 0, 0, 1], port))).call(&echo("a"));
    assert_eq!(reply.body, b"a");
    let stopper = server.stopper();
    assert!(!stopper.is_stopped());
    let started = Instant::now();
    stopper.stop();
    stopper.stop();
    server.join();
    assert!(stopper.is_stopped());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn malformed_input_gets_an_error_and_the_server_goes_on() {
    let (service, _, _) = service();
    let server = Server::bind("127.0.0.1:0", config("bad", 2, 4), service).unwrap();
    let addr = server.local_addr();

    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(b"\x00\x01\x02 garbage\r\n\r\n").unwrap();
    let mut reader = MessageReader::new(garbage);
    let reply = reader
        .read_message(&Limits::DEFAULT, Instant::now() + Duration::from_secs(5))
        .expect("a reply")
        .expect("not a bare close");
    assert_eq!(reply.code(), Some(code::BAD_REQUEST));
    assert!(closed_by_peer(reader.get_mut()));

    // An oversized header line: 413, or at least a close.
    let mut oversized = TcpStream::connect(addr).unwrap();
    let mut request = b"ECHO\r\nX-Long: ".to_vec();
    request.extend(std::iter::repeat_n(b'a', 64 * 1024));
    request.extend_from_slice(b"\r\nContent-Length: 0\r\n\r\n\r\n");
    let _ = oversized.write_all(&request);
    let mut reader = MessageReader::new(oversized);
    match reader.read_message(&Limits::DEFAULT, Instant::now() + Duration::from_secs(5)) {
        Ok(Some(reply)) => assert_eq!(reply.code(), Some(code::TOO_LARGE)),
        Ok(None) | Err(IoError::Io(_)) => {}
        Err(e) => panic!("unexpected {e}"),
    }

    // A body over the session's limit, then the same after `FILES`.
    let body = vec![b'b'; 2 << 20];
    let mut client = Client::connect(addr);
    let reply = client.call(&Message::request("ECHO").with_body(body.clone()));
    assert_eq!(reply.code(), Some(code::TOO_LARGE));
    let mut client = Client::connect(addr);
    assert_eq!(
        client.call(&Message::request("FILES")).code(),
        Some(code::OK)
    );
    let reply = client.call(&Message::request("ECHO").with_body(body.clone()));
    assert_eq!(reply.body, body);

    assert_eq!(Client::connect(addr).call(&echo("next")).body, b"next");
    server.stop_and_join();
}

#[test]
fn a_reader_that_stalls_cannot_hold_a_worker() {
    let (service, _, _) = service();
    let mut cfg = config("stall", 1, 4);
    cfg.write_deadline = Duration::from_secs(1);
    let server = Server::bind("127.0.0.1:0", cfg, service).unwrap();
    let addr = server.local_addr();

    // Many big replies asked for, none read: 80 MiB outgrows any buffer.
    let mut staller = TcpStream::connect(addr).unwrap();
    let big = Message::request("BIG").encode();
    for _ in 0..20 {
        staller.write_all(&big).unwrap();
    }
    let stats = wait_for(&server, Duration::from_secs(15), |s| s.timed_out >= 1);
    assert_eq!(stats.timed_out, 1);

    // The only worker is free again.
    let started = Instant::now();
    assert_eq!(Client::connect(addr).call(&echo("free")).body, b"free");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(staller);
    server.stop_and_join();
}

#[test]
fn takeover_gets_the_raw_socket() {
    let (service, _, _) = service();
    let server = Server::bind("127.0.0.1:0", config("raw", 1, 1), service).unwrap();
    let mut client = Client::connect(server.local_addr());
    client.send(&Message::request("RAW"));
    client.stream().write_all(b"hello").unwrap();
    let mut got = Vec::new();
    let stream = client.stream();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.read_to_end(&mut got);
    assert_eq!(got, b"takenhello");
    server.stop_and_join();
}

#[test]
fn sigterm_stops_the_server() {
    let (service, _, _) = service();
    let server = Server::bind("127.0.0.1:0", config("sig", 1, 1), service).unwrap();
    let watch = ims::prethread::stop_on_signals(server.stopper()).unwrap();
    signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
    let started = Instant::now();
    server.join();
    assert!(started.elapsed() < Duration::from_secs(5));
    watch.close();
}

#[test]
fn a_pipelined_burst_handled_slowly_is_not_timed_out_afterwards() {
    let (service, entered, release) = service();
    let mut cfg = config("burst", 2, 8);
    cfg.message_deadline = Duration::from_secs(1);
    let server = Server::bind("127.0.0.1:0", cfg, service).unwrap();
    let mut client = Client::connect(server.local_addr());
    // Two requests in one write: the worker takes the second from the
    // buffer after the first, which it holds past the message deadline.
    let mut burst = Message::request("BLOCK").encode();
    burst.extend(echo("second").encode());
    client.stream().write_all(&burst).unwrap();
    entered
        .recv_timeout(Duration::from_secs(10))
        .expect("worker busy");
    thread::sleep(Duration::from_millis(1500));
    release.send(()).unwrap();
    let first = client.recv().expect("reply").expect("not closed");
    assert_eq!(first.code(), Some(code::OK));
    let second = client.recv().expect("reply").expect("not closed");
    assert_eq!(second.body, b"second");
    // Whole messages were all it had: idle now, not late.
    thread::sleep(Duration::from_millis(500));
    let reply = client.call(&echo("later"));
    assert_eq!(reply.code(), Some(code::OK), "{reply:?}");
    assert_eq!(reply.body, b"later");
    server.stop_and_join();
}
