//! Relayed connections (PROTOCOL.md §7, "Relayed connections"): when a
//! buddy's listener cannot be reached (a home router refuses incoming
//! connections), the connection to it goes through our MS instead, as
//! relay frames on our held login connection.
//!
//! A relayed connection is a *circuit*: each end has a real loopback TCP
//! connection, one side of which is handed to the code that would have
//! used a direct connection (the caller's) or connected to our own
//! listener (the callee's), so INIT, INIT-ACK, CONFIRM, the sealed
//! messages, the file frames and every check on them are exactly those of
//! a direct connection. Two threads per circuit move the bytes: one reads
//! the loopback socket and sends frames (never more than [`RELAY_WINDOW`]
//! bytes unacknowledged), the other writes what arrives and acknowledges
//! it once written.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use log::{debug, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use super::error::ClientError;
use super::Client;
use crate::proto::relay::{Frame, Op, MAX_RELAY_DATA, RELAY_WINDOW};
use crate::wire::Message;

/// How a conversation or transfer with a buddy travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Straight to the buddy's listener.
    Direct,
    /// Through the MSs.
    Relay,
}

impl Via {
    /// As shown (`direct`, `relay`).
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Relay => "relay",
        }
    }
}

/// Circuits open at once: each costs two threads and a loopback
/// connection, and a buddy needs one for messages each way and one per
/// transfer, so more means a buddy opening them to exhaust us.
pub const MAX_CIRCUITS: usize = 256;

/// How long a circuit's sender waits for the receiver to acknowledge
/// what it has in flight before it gives the circuit up.
const CREDIT_WAIT: Duration = Duration::from_secs(60);

/// Which circuit: the buddy, the number, and whether we opened it (both
/// sides number the circuits they open independently).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    peer: String,
    id: u64,
    ours: bool,
}

/// One circuit's state.
struct Circuit {
    key: Key,
    /// Bytes from the buddy, for the writer thread; `None` once the
    /// buddy closed (the writer then ends the loopback connection).
    inbound: Mutex<Option<Sender<Vec<u8>>>>,
    /// Bytes received and not yet written: past twice the window the
    /// buddy ignores acknowledgements, and the circuit is closed.
    unwritten: AtomicU64,
    /// Bytes we may still send.
    credit: Mutex<u64>,
    more: Condvar,
    /// Closed (either side): the reader stops sending.
    closed: AtomicBool,
    /// Our end of the loopback connection.
    local: TcpStream,
}

impl Circuit {
    /// Ends this circuit here: nothing more goes out, what came in is
    /// still written, then the loopback connection ends.
    fn end(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.inbound.lock().take();
        // Wakes a sender waiting for credit, and the reader.
        self.more.notify_all();
        let _ = self.local.shutdown(Shutdown::Read);
    }
}

/// The circuits of a login and the route to each buddy.
#[derive(Default)]
pub struct Relays {
    circuits: Mutex<HashMap<Key, Arc<Circuit>>>,
    next: AtomicU64,
    /// How our last connection to each buddy went.
    routes: Mutex<HashMap<String, Via>>,
}

impl Relays {
    /// How our connections to `peer` go (direct until one had to be relayed).
    pub fn route(&self, peer: &str) -> Via {
        self.routes.lock().get(peer).copied().unwrap_or(Via::Direct)
    }

    /// The route to `peer`, if a connection was made.
    pub fn known_route(&self, peer: &str) -> Option<Via> {
        self.routes.lock().get(peer).copied()
    }

    /// How `peer`'s connections to us come: through the relay while a
    /// circuit they opened is open.
    pub fn route_from(&self, peer: &str) -> Via {
        let relayed = self
            .circuits
            .lock()
            .keys()
            .any(|k| k.peer == peer && !k.ours);
        if relayed {
            Via::Relay
        } else {
            Via::Direct
        }
    }

    /// Forgets how to reach `peer` (they logged in anew, or left).
    pub fn forget(&self, peer: &str) {
        self.routes.lock().remove(peer);
    }

    /// Ends every circuit (the login ended).
    pub fn clear(&self) {
        let all: Vec<_> = self.circuits.lock().drain().map(|(_, c)| c).collect();
        for c in all {
            c.end();
        }
        self.routes.lock().clear();
    }

    fn remove(&self, key: &Key) {
        self.circuits.lock().remove(key);
    }
}

/// How long our own loopback connection may take to reach the
/// listener's queue. It is there, or about to be, when `connect` returns
/// (only the last packet of the handshake may still be on its way), so
/// this bounds only a broken system.
const LOOPBACK_WAIT: Duration = Duration::from_secs(5);

/// A connected pair of loopback sockets: (the one handed out, ours).
fn loopback_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let outer = TcpStream::connect(l.local_addr()?)?;
    let want = outer.local_addr()?;
    let deadline = Instant::now() + LOOPBACK_WAIT;
    l.set_nonblocking(true)?;
    // Made only if our connection is not queued yet: woken by it.
    let mut waiter: Option<(Poll, Events)> = None;
    loop {
        match l.accept() {
            Ok((inner, from)) if from == want => {
                inner.set_nonblocking(false)?;
                for s in [&outer, &inner] {
                    let _ = s.set_nodelay(true);
                }
                return Ok((outer, inner));
            }
            // Only our own connection: another local process could race
            // it. Its connection goes; ours is behind it in the queue.
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ErrorKind::TimedOut.into());
                }
                if waiter.is_none() {
                    let poll = Poll::new()?;
                    // Registered after the queue was found empty: a
                    // connection queued since is reported at once.
                    poll.registry().register(
                        &mut SourceFd(&l.as_raw_fd()),
                        Token(0),
                        Interest::READABLE,
                    )?;
                    waiter = Some((poll, Events::with_capacity(1)));
                }
                if let Some((poll, events)) = waiter.as_mut() {
                    match poll.poll(events, Some(left)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
}

impl Client {
    /// A connection to `to`'s client: straight to its listener at
    /// `address` within `direct_connect_timeout` unless that failed
    /// before, else through the relay.
    pub(super) fn peer_connect(
        self: &Arc<Self>,
        to: &str,
        address: SocketAddr,
    ) -> Result<(TcpStream, Via), ClientError> {
        // Port 0: its MS found the listener unreachable at login.
        if self.relays.route(to) == Via::Direct && address.port() != 0 {
            let wait = self.config.direct_connect_timeout.min(self.config.timeout);
            match crate::link::connect_to(address, wait) {
                Ok(s) => {
                    self.relays.routes.lock().insert(to.to_owned(), Via::Direct);
                    return Ok((s, Via::Direct));
                }
                Err(e) => debug!("{to} at {address} cannot be reached ({e}); relaying"),
            }
        }
        let s = self
            .open_circuit(to)
            .map_err(|error| ClientError::Unreachable {
                peer: to.to_owned(),
                error,
            })?;
        self.relays.routes.lock().insert(to.to_owned(), Via::Relay);
        Ok((s, Via::Relay))
    }

    /// Opens a circuit to `to` through our MS; the loopback end that
    /// stands for the connection.
    fn open_circuit(self: &Arc<Self>, to: &str) -> std::io::Result<TcpStream> {
        let id = self.relays.next.fetch_add(1, Ordering::Relaxed);
        let key = Key {
            peer: to.to_owned(),
            id,
            ours: true,
        };
        let (outer, inner) = loopback_pair()?;
        let mut open = Frame::new(id, true, Op::Open, Vec::new());
        open.to = Some(to.to_owned());
        // The open goes before any byte of the circuit (the held
        // connection keeps order).
        self.write_held(&open.into_message())?;
        self.start_circuit(key, inner)?;
        Ok(outer)
    }

    /// Starts a circuit's two threads over `local`.
    fn start_circuit(self: &Arc<Self>, key: Key, local: TcpStream) -> std::io::Result<()> {
        let (tx, rx) = unbounded();
        let circuit = Arc::new(Circuit {
            key: key.clone(),
            inbound: Mutex::new(Some(tx)),
            unwritten: AtomicU64::new(0),
            credit: Mutex::new(RELAY_WINDOW),
            more: Condvar::new(),
            closed: AtomicBool::new(false),
            local: local.try_clone()?,
        });
        self.relays
            .circuits
            .lock()
            .insert(key.clone(), circuit.clone());
        let writer = local.try_clone()?;
        let (c1, w1) = (circuit.clone(), Arc::downgrade(self));
        let started = std::thread::Builder::new()
            .name(format!("relay-up-{}", key.peer))
            .spawn(move || pump_up(w1, c1, local))
            .and_then(|_| {
                let (c2, w2) = (circuit.clone(), Arc::downgrade(self));
                std::thread::Builder::new()
                    .name(format!("relay-down-{}", key.peer))
                    .spawn(move || pump_down(w2, c2, writer, rx))
            });
        if let Err(e) = started {
            self.relays.remove(&key);
            circuit.end();
            return Err(e);
        }
        Ok(())
    }

    /// A frame for `circuit` (or about it) to our MS.
    fn send_frame(&self, key: &Key, op: Op, data: Vec<u8>) -> std::io::Result<()> {
        let mut f = Frame::new(key.id, key.ours, op, data);
        f.to = Some(key.peer.clone());
        self.write_held(&f.into_message())
    }

    /// A `RELAY` frame our MS wrote on the held connection.
    pub(super) fn on_relay_frame(self: &Arc<Self>, m: Message) {
        let frame = match Frame::from_message(m) {
            Ok(f) => f,
            Err(e) => {
                warn!("bad relay frame from the messaging server: {e}");
                return;
            }
        };
        let Some(from) = frame.from.clone() else {
            return;
        };
        // The frame's sender opened it, or we did.
        let key = Key {
            peer: from.clone(),
            id: frame.circuit,
            ours: !frame.opener,
        };
        let circuit = self.relays.circuits.lock().get(&key).cloned();
        match (frame.op, circuit) {
            (Op::Open, None) => {
                let full = self.relays.circuits.lock().len() >= MAX_CIRCUITS;
                let accepted = if full {
                    Err(ClientError::CircuitsFull)
                } else {
                    self.accept_circuit(key.clone())
                };
                if let Err(e) = accepted {
                    debug!("relayed connection from {from} refused: {e}");
                    let _ = self.send_frame(&key, Op::Close, Vec::new());
                }
            }
            (Op::Open, Some(_)) => {
                warn!("{from} opened relay circuit {} twice", key.id);
            }
            (Op::Data, Some(c)) => {
                let n = frame.data.len() as u64;
                let over = c.unwritten.fetch_add(n, Ordering::Relaxed) + n > 2 * RELAY_WINDOW;
                let queued = !over
                    && c.inbound
                        .lock()
                        .as_ref()
                        .is_some_and(|tx| tx.send(frame.data).is_ok());
                if !queued {
                    if over {
                        warn!("{from} ignores the relay window; circuit closed");
                    }
                    self.relays.remove(&key);
                    c.end();
                    let _ = self.send_frame(&key, Op::Close, Vec::new());
                }
            }
            (Op::Ack(n), Some(c)) => {
                let mut credit = c.credit.lock();
                *credit = credit.saturating_add(n).min(4 * RELAY_WINDOW);
                c.more.notify_all();
            }
            (Op::Close, Some(c)) => {
                self.relays.remove(&key);
                c.end();
            }
            (Op::Close, None) => {}
            (_, None) => {
                // Bytes for a circuit that is gone: tell the other end.
                let _ = self.send_frame(&key, Op::Close, Vec::new());
            }
        }
    }

    /// A buddy opens a circuit to us: it becomes a connection to our own
    /// listener, which treats it as any other (INIT and all).
    fn accept_circuit(self: &Arc<Self>, key: Key) -> Result<(), ClientError> {
        if self.is_blocked(&key.peer) {
            return Err(ClientError::Blocked(key.peer));
        }
        let buddy = self
            .state
            .lock()
            .session()
            .is_some_and(|s| s.buddies.contains_key(&key.peer));
        if !buddy {
            return Err(ClientError::NotABuddy(key.peer));
        }
        // A client always has its listener; a bare one (tests) has none.
        let mut at = self
            .listener_addr
            .lock()
            .ok_or_else(|| ClientError::Local(std::io::ErrorKind::NotConnected.into()))?;
        if at.ip().is_unspecified() {
            at.set_ip(match at {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let local = crate::link::connect_to(at, self.config.timeout)?;
        self.start_circuit(key, local).map_err(ClientError::Local)
    }

    /// Writes `m` whole on the held connection to our MS.
    pub(super) fn write_held(&self, m: &Message) -> std::io::Result<()> {
        let (stream, lock) = {
            let held = self.held.lock();
            let h = held.as_ref().ok_or(std::io::ErrorKind::NotConnected)?;
            (Arc::clone(&h.stream), Arc::clone(&h.writing))
        };
        let _one = lock.lock();
        crate::wire::io::write_message(&mut &*stream, m, Instant::now() + self.config.timeout)
            .map_err(|e| match e {
                crate::wire::io::IoError::Io(e) => e,
                other => std::io::Error::other(other.to_string()),
            })
    }
}

/// Reads the loopback connection and sends what it carries, within the
/// credit the buddy gave; closes the circuit when it ends.
fn pump_up(client: std::sync::Weak<Client>, c: Arc<Circuit>, mut local: TcpStream) {
    let mut buf = vec![0u8; MAX_RELAY_DATA];
    loop {
        let n = match local.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut credit = c.credit.lock();
            let until = Instant::now() + CREDIT_WAIT;
            while *credit < n as u64 && !c.closed.load(Ordering::Relaxed) {
                if c.more.wait_until(&mut credit, until).timed_out() {
                    break;
                }
            }
            if *credit < n as u64 || c.closed.load(Ordering::Relaxed) {
                break;
            }
            *credit -= n as u64;
        }
        let Some(cl) = client.upgrade() else { return };
        if let Err(e) = cl.send_frame(&c.key, Op::Data, buf[..n].to_vec()) {
            debug!("relaying to {}: {e}", c.key.peer);
            break;
        }
    }
    if let Some(cl) = client.upgrade() {
        if !c.closed.swap(true, Ordering::Relaxed) {
            let _ = cl.send_frame(&c.key, Op::Close, Vec::new());
        }
        cl.relays.remove(&c.key);
    }
    c.end();
}

/// Writes what the buddy sent on the loopback connection, acknowledging
/// it once written; ends the connection when the buddy closed.
fn pump_down(
    client: std::sync::Weak<Client>,
    c: Arc<Circuit>,
    mut local: TcpStream,
    rx: Receiver<Vec<u8>>,
) {
    let mut unacked = 0u64;
    let _ = local.set_write_timeout(Some(CREDIT_WAIT));
    while let Ok(data) = rx.recv() {
        if local.write_all(&data).is_err() {
            break;
        }
        let n = data.len() as u64;
        c.unwritten.fetch_sub(n, Ordering::Relaxed);
        unacked += n;
        if unacked >= RELAY_WINDOW / 4 || rx.is_empty() {
            let Some(cl) = client.upgrade() else { return };
            if cl.send_frame(&c.key, Op::Ack(unacked), Vec::new()).is_err() {
                break;
            }
            unacked = 0;
        }
    }
    let _ = local.shutdown(Shutdown::Both);
    if let Some(cl) = client.upgrade() {
        if !c.closed.swap(true, Ordering::Relaxed) {
            let _ = cl.send_frame(&c.key, Op::Close, Vec::new());
        }
        cl.relays.remove(&c.key);
    }
    c.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_pair_is_connected_both_ways() {
        let (mut outer, mut inner) = loopback_pair().unwrap();
        assert_eq!(outer.peer_addr().unwrap(), inner.local_addr().unwrap());
        outer.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        inner.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        inner.write_all(b"pong").unwrap();
        outer.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }
}
