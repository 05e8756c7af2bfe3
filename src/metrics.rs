//! Operations metrics: the Prometheus (OpenMetrics) text exposition on
//! `GET /metrics` at `--metrics ADDR`, for `ims-crs` and `ims-ms`.
//!
//! The encoding is `prometheus-client`'s; the endpoint is a tiny HTTP/1.0
//! responder on one thread of its own (a scrape every few seconds needs no
//! more), apart from the worker pool so that a busy server still answers
//! its scrapes. Requests are bounded ([`MAX_REQUEST`], [`READ_TIMEOUT`]);
//! anything but `GET /metrics` is a 404.
//!
//! Values read from elsewhere (users online, the pool's counters) are
//! brought up to date by a refresh function just before each encoding.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::prethread::StatsSource;

/// Largest scrape request read; a GET with a few headers fits many times.
pub const MAX_REQUEST: usize = 8 * 1024;

/// How long a scraper may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The exposition's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Brings read-through values up to date before an encoding.
pub type Refresh = Box<dyn Fn() + Send + Sync>;

/// A running `/metrics` endpoint; stopped on drop.
pub struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Binds `addr` (port 0: any) and serves `registry`.
    pub fn start(
        addr: &str,
        registry: Arc<Mutex<Registry>>,
        refresh: Refresh,
    ) -> io::Result<Endpoint> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            if let Err(e) = answer(conn, &registry, &refresh) {
                                warn!("metrics scrape: {e}");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        Err(e) => {
                            warn!("metrics endpoint: {e}");
                            std::thread::sleep(Duration::from_millis(200));
                        }
                    }
                }
            })?;
        info!("metrics on http://{local}/metrics");
        Ok(Endpoint {
            addr: local,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one request (bounded) and answers it.
fn answer(mut conn: TcpStream, registry: &Mutex<Registry>, refresh: &Refresh) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() >= MAX_REQUEST {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                b"",
            );
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next(), words.next());
    let path = path.map(|p| p.split('?').next().unwrap_or(p));
    match (method, path) {
        (Some("GET"), Some("/metrics")) => {
            refresh();
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry.lock())
                .map_err(|_| io::Error::other("encoding failed"))?;
            respond(&mut conn, "200 OK", CONTENT_TYPE, text.as_bytes())
        }
        _ => respond(&mut conn, "404 Not Found", "text/plain", b"not found\n"),
    }
}

fn respond(conn: &mut TcpStream, status: &str, ctype: &str, body: &[u8]) -> io::Result<()> {
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    conn.flush()
}

/// Adds `new - last` to a counter whose truth is a running total elsewhere.
pub fn catch_up(counter: &Counter, last: &mut u64, new: u64) {
    if new > *last {
        counter.inc_by(new - *last);
    }
    *last = new;
}

/// The worker pool's metrics, read from its counters at each scrape.
pub struct PoolMetrics {
    source: Mutex<Option<StatsSource>>,
    held: Gauge,
    parked: Gauge,
    queued: Gauge,
    accepted: Counter,
    busy: Counter,
    timed_out: Counter,
    last: Mutex<(u64, u64, u64)>,
}

impl PoolMetrics {
    /// Registers the pool's metrics under `prefix` (e.g. `ims_crs`).
    pub fn register(registry: &mut Registry) -> Arc<PoolMetrics> {
        let m = Arc::new(PoolMetrics {
            source: Mutex::new(None),
            held: Gauge::default(),
            parked: Gauge::default(),
            queued: Gauge::default(),
            accepted: Counter::default(),
            busy: Counter::default(),
            timed_out: Counter::default(),
            last: Mutex::new((0, 0, 0)),
        });
        registry.register(
            "connections_held",
            "Connections being served by a worker now",
            m.held.clone(),
        );
        registry.register(
            "connections_parked",
            "Connections owed a deferred reply (an idle long poll), waiting in the gate without a worker",
            m.parked.clone(),
        );
        registry.register(
            "queue_depth",
            "Accepted connections waiting for a worker now",
            m.queued.clone(),
        );
        registry.register(
            "connections_accepted",
            "Connections accepted",
            m.accepted.clone(),
        );
        registry.register(
            "busy_replies",
            "Connections refused with 503 busy because the queue was full",
            m.busy.clone(),
        );
        registry.register(
            "connections_timed_out",
            "Connections dropped on a deadline",
            m.timed_out.clone(),
        );
        m
    }

    /// The pool to read from, once its server runs.
    pub fn attach(&self, source: StatsSource) {
        *self.source.lock() = Some(source);
    }

    /// Reads the pool's counters into the metrics.
    pub fn refresh(&self) {
        let Some(stats) = self.source.lock().as_ref().map(StatsSource::snapshot) else {
            return;
        };
        self.held
            .set(i64::try_from(stats.active).unwrap_or(i64::MAX));
        self.parked
            .set(i64::try_from(stats.parked).unwrap_or(i64::MAX));
        self.queued
            .set(i64::try_from(stats.queued).unwrap_or(i64::MAX));
        let mut last = self.last.lock();
        catch_up(&self.accepted, &mut last.0, stats.accepted);
        catch_up(&self.busy, &mut last.1, stats.rejected_busy);
        catch_up(&self.timed_out, &mut last.2, stats.timed_out);
    }
}
