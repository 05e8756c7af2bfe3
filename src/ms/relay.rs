//! The relay: carries the connections of clients that cannot reach each
//! other (PROTOCOL.md §7, "Relayed connections") as frames on their held
//! login connections. A frame from a logged-in user goes to a buddy
//! logged in here, or over an MS link to the buddy's MS.
//!
//! Each receiving user has a *lane*: a queue and a thread that writes its
//! frames on the user's held connection, so a client that stops reading
//! holds up only its own lane, and is dropped when a write cannot finish
//! within the pool's write deadline. Each sending user has a *budget*:
//! the bytes of theirs queued anywhere here (at most `relay_queue_bytes`;
//! past it their frame's circuit is closed) and a token bucket of
//! `relay_rate` bytes a second that the lanes pace their frames by.
//! Clients keep at most [`RELAY_WINDOW`] unacknowledged bytes per circuit,
//! so well-behaved ones never meet the queue bound.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use log::{debug, warn};
use parking_lot::Mutex;

use super::users::OnlineUser;
use crate::proto::relay::{Frame, Op, RELAY_WINDOW};
use crate::wire::Message;

/// How long a lane without frames keeps its thread.
const LANE_IDLE: Duration = Duration::from_secs(30);

/// What one sending user may still do.
pub struct Budget {
    /// Bytes of theirs queued in lanes now.
    queued: AtomicU64,
    /// Tokens (bytes) and when they were last topped up.
    bucket: Mutex<(f64, Instant)>,
}

impl Budget {
    /// `weight` bytes of this sender's left the queues.
    pub fn release(&self, weight: u64) {
        self.queued.fetch_sub(weight, Ordering::Relaxed);
    }

    fn new(burst: f64) -> Budget {
        Budget {
            queued: AtomicU64::new(0),
            bucket: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes `n` bytes' worth of tokens at `rate` a second (burst
    /// `burst`): how long to wait before sending them.
    fn take(&self, n: u64, rate: f64, burst: f64) -> Duration {
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        let mut b = self.bucket.lock();
        let now = Instant::now();
        let (tokens, last) = *b;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(burst);
        let left = tokens - n as f64;
        *b = (left, now);
        if left >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((-left / rate).min(60.0))
        }
    }
}

/// A frame waiting in a lane.
struct Queued {
    message: Message,
    /// The sender's budget and the frame's weight in it.
    budget: Option<(Arc<Budget>, u64)>,
}

/// A receiving user's lane.
struct Lane {
    tx: Sender<Queued>,
    /// The login it writes to.
    login: String,
}

/// The relay of one MS.
pub struct Relay {
    /// Bytes a second one user may send through the relay (0: no limit).
    rate: f64,
    /// Bytes of one user's frames queued here at most.
    queue_bytes: u64,
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
    budgets: Mutex<HashMap<String, Arc<Budget>>>,
    /// Bytes relayed (a metric).
    pub relayed: prometheus_client::metrics::counter::Counter,
    /// Frames refused or dropped (a metric).
    pub refused: prometheus_client::metrics::counter::Counter,
    /// Links to other MSs.
    links: super::mslink::Links,
    /// Our own address (as enrolled), never a route elsewhere.
    pub(crate) me: Mutex<String>,
    /// Where users logged in elsewhere are, as the CRS said lately.
    routes: Mutex<HashMap<String, (String, Instant)>>,
}

/// How long the CRS's answer to where a user is logged in is reused.
const ROUTE_TTL: Duration = Duration::from_secs(5);

/// Finds where users not logged in here are: their MS's address.
pub type Locate<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Relay {
    /// A relay with these bounds.
    pub fn new(rate: f64, queue_bytes: u64) -> Relay {
        Relay {
            rate,
            queue_bytes,
            lanes: Arc::default(),
            budgets: Mutex::default(),
            relayed: Default::default(),
            refused: Default::default(),
            links: Default::default(),
            me: Mutex::default(),
            routes: Mutex::default(),
        }
    }

    fn burst(&self) -> f64 {
        // A window's worth at once, or a quarter second of the rate.
        (RELAY_WINDOW as f64).max(self.rate / 4.0)
    }

    fn budget(&self, user: &str) -> Arc<Budget> {
        let mut budgets = self.budgets.lock();
        if budgets.len() > 100_000 {
            // Budgets of users with nothing queued cost nothing to forget.
            budgets.retain(|_, b| b.queued.load(Ordering::Relaxed) > 0);
        }
        budgets
            .entry(user.to_owned())
            .or_insert_with(|| Arc::new(Budget::new(self.burst())))
            .clone()
    }

    /// A frame from `sender`'s client (a `RELAY` on its held connection):
    /// to a buddy here, or onward. Nothing is answered; a frame that
    /// cannot go closes its circuit at the sender.
    pub fn from_client(
        &self,
        sender: &Arc<OnlineUser>,
        message: Message,
        find: impl Fn(&str) -> Option<Arc<OnlineUser>>,
        onward: Option<(Locate<'_>, &[u8], Duration)>,
    ) {
        let mut frame = match Frame::from_message(message) {
            Ok(f) => f,
            Err(e) => {
                self.refused.inc();
                debug!("bad relay frame from {}: {e}", sender.name);
                return;
            }
        };
        let Some(to) = frame.to.take() else {
            self.refused.inc();
            return;
        };
        if !sender.contacts.lock().contains(&to) {
            debug!("{} relays to {to}, not a buddy: refused", sender.name);
            self.close_at(sender, &to, &frame);
            return;
        }
        frame.from = Some(sender.name.clone());
        frame.to = Some(to.clone());
        match find(&to) {
            Some(receiver) => {
                if !self.deliver(&receiver, frame.clone()) {
                    self.close_at(sender, &to, &frame);
                }
            }
            None => {
                let sent = onward.is_some_and(|(locate, key, timeout)| {
                    self.forward(frame.clone(), locate, key, timeout)
                });
                if !sent {
                    self.close_at(sender, &to, &frame);
                }
            }
        }
    }

    /// Sends `frame` (names set) to its receiver's MS over a link; false
    /// when the receiver is not logged in anywhere else, or the sender is
    /// over its queue bound.
    pub fn forward(&self, frame: Frame, locate: Locate<'_>, key: &[u8], timeout: Duration) -> bool {
        let (Some(from), Some(to)) = (frame.from.clone(), frame.to.clone()) else {
            return false;
        };
        let cached = self
            .routes
            .lock()
            .get(&to)
            .filter(|(_, at)| at.elapsed() < ROUTE_TTL)
            .map(|(a, _)| a.clone());
        let addr = match cached {
            Some(a) => a,
            None => {
                let Some(a) = locate(&to) else {
                    return false;
                };
                let mut routes = self.routes.lock();
                if routes.len() > 100_000 {
                    routes.retain(|_, (_, at)| at.elapsed() < ROUTE_TTL);
                }
                routes.insert(to.clone(), (a.clone(), Instant::now()));
                a
            }
        };
        let weight = frame.weight();
        let budget = self.budget(&from);
        let queued = budget.queued.fetch_add(weight, Ordering::Relaxed);
        if queued.saturating_add(weight) > self.queue_bytes && frame.op != Op::Close {
            budget.release(weight);
            warn!(
                "{from} is over its relay queue bound; circuit {} closed",
                frame.circuit
            );
            return false;
        }
        self.relayed.inc_by(frame.data.len() as u64);
        self.links
            .send(&addr, key, timeout, (frame, Some((budget, weight))));
        true
    }

    /// A frame from another MS's link (names set by that MS): to its
    /// receiver here; one that cannot be delivered is answered with a
    /// close from the receiver's name, sent back the same way.
    pub fn from_link(
        &self,
        frame: Frame,
        find: impl Fn(&str) -> Option<Arc<OnlineUser>>,
        locate: Locate<'_>,
        key: &[u8],
        timeout: Duration,
    ) {
        let (Some(from), Some(to)) = (frame.from.clone(), frame.to.clone()) else {
            self.refused.inc();
            return;
        };
        let delivered = find(&to).is_some_and(|r| self.deliver(&r, frame.clone()));
        if !delivered && frame.op != Op::Close {
            self.refused.inc();
            // The route may be stale: ask again next time.
            self.routes.lock().remove(&to);
            let mut close = Frame::new(frame.circuit, !frame.opener, Op::Close, Vec::new());
            close.from = Some(to);
            close.to = Some(from);
            self.forward(close, locate, key, timeout);
        }
    }

    /// A frame with its names set (from a sender here or from another
    /// MS) for `receiver`, logged in here: queued in its lane, unless the
    /// receiver is not the sender's buddy or the sender is over its
    /// queue bound. Whether it was queued.
    pub fn deliver(&self, receiver: &Arc<OnlineUser>, mut frame: Frame) -> bool {
        let Some(from) = frame.from.clone() else {
            return false;
        };
        if !receiver.contacts.lock().contains(&from) {
            self.refused.inc();
            return false;
        }
        let weight = frame.weight();
        let budget = self.budget(&from);
        let queued = budget.queued.fetch_add(weight, Ordering::Relaxed);
        if queued.saturating_add(weight) > self.queue_bytes && frame.op != Op::Close {
            budget.queued.fetch_sub(weight, Ordering::Relaxed);
            self.refused.inc();
            warn!(
                "{from} has {queued} bytes queued in the relay (at most {}); circuit {} closed",
                self.queue_bytes, frame.circuit
            );
            // The receiver's end goes too.
            let close = Frame {
                op: Op::Close,
                data: Vec::new(),
                to: None,
                ..frame
            };
            self.enqueue(receiver, close.into_message(), None);
            return false;
        }
        self.relayed.inc_by(frame.data.len() as u64);
        frame.to = None;
        self.enqueue(receiver, frame.into_message(), Some((budget, weight)));
        true
    }

    /// Tells `user` that its circuit of `frame` with `peer` is closed.
    fn close_at(&self, user: &Arc<OnlineUser>, peer: &str, frame: &Frame) {
        self.refused.inc();
        if frame.op == Op::Close {
            return;
        }
        let mut close = Frame::new(frame.circuit, !frame.opener, Op::Close, Vec::new());
        close.from = Some(peer.to_owned());
        self.enqueue(user, close.into_message(), None);
    }

    fn enqueue(
        &self,
        user: &Arc<OnlineUser>,
        message: Message,
        budget: Option<(Arc<Budget>, u64)>,
    ) {
        let mut lanes = self.lanes.lock();
        let fresh = lanes.get(&user.name).is_none_or(|l| l.login != user.login);
        if fresh {
            let (tx, rx) = unbounded();
            let (lanes_ref, who) = (self.lanes.clone(), user.clone());
            let (rate, burst) = (self.rate, self.burst());
            let spawned = std::thread::Builder::new()
                .name(format!("ms-relay-{}", user.name))
                .spawn(move || lane(lanes_ref, who, rx, rate, burst));
            if let Err(e) = spawned {
                warn!("cannot start a relay lane: {e}");
                if let Some((b, w)) = budget {
                    b.queued.fetch_sub(w, Ordering::Relaxed);
                }
                return;
            }
            lanes.insert(
                user.name.clone(),
                Lane {
                    tx,
                    login: user.login.clone(),
                },
            );
        }
        if let Some(l) = lanes.get(&user.name) {
            if let Err(e) = l.tx.send(Queued { message, budget }) {
                if let Some((b, w)) = e.0.budget {
                    b.queued.fetch_sub(w, Ordering::Relaxed);
                }
            }
        }
    }
}

/// A lane's thread: writes `user`'s frames on its held connection, paced
/// by each sender's budget, until idle or the login ends.
fn lane(
    lanes: Arc<Mutex<HashMap<String, Lane>>>,
    user: Arc<OnlineUser>,
    rx: Receiver<Queued>,
    rate: f64,
    burst: f64,
) {
    let release = |q: &Queued| {
        if let Some((b, w)) = &q.budget {
            b.queued.fetch_sub(*w, Ordering::Relaxed);
        }
    };
    let mut broken = false;
    loop {
        let q = match rx.recv_timeout(LANE_IDLE) {
            Ok(q) => q,
            Err(RecvTimeoutError::Timeout) => {
                let mut l = lanes.lock();
                // Under the lanes' lock nothing is being queued: leave
                // only when nothing is.
                if rx.is_empty() {
                    if l.get(&user.name).is_some_and(|x| x.login == user.login) {
                        l.remove(&user.name);
                    }
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if broken || user.has_ended() {
            release(&q);
            broken = true;
        } else {
            if let Some((b, w)) = &q.budget {
                let wait = b.take(*w, rate, burst);
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
            }
            let sent = match &user.held {
                Some(out) => out.send(&q.message),
                None => Err(std::io::ErrorKind::NotConnected.into()),
            };
            release(&q);
            if let Err(e) = sent {
                // A client that cannot take a frame within the write
                // deadline is not trusted with later ones: its login ends
                // (as for a push), and nobody else waited on it.
                debug!("relay to {}: {e}; its connection is closed", user.name);
                user.drop_connection();
                broken = true;
            }
        }
        if broken {
            let mut l = lanes.lock();
            while let Ok(q) = rx.try_recv() {
                release(&q);
            }
            if l.get(&user.name).is_some_and(|x| x.login == user.login) {
                l.remove(&user.name);
            }
            return;
        }
    }
}

/// Whether a listener answers at `address` within `timeout` (the
/// connection is closed at once, nothing is sent).
pub fn reachable(address: std::net::SocketAddr, timeout: Duration) -> bool {
    if address.port() == 0 {
        return false;
    }
    std::net::TcpStream::connect_timeout(&address, timeout).is_ok()
}

impl super::Ms {
    /// A `RELAY` frame on `sender`'s held connection.
    pub(crate) fn relay_from(&self, sender: &Arc<OnlineUser>, message: Message) {
        let locate = |user: &str| self.locate_user(user);
        self.relay.from_client(
            sender,
            message,
            |n| self.users.by_name(n),
            Some((&locate, &self.ms_key, self.config.crs_timeout)),
        )
    }

    /// A sealed frame on a proven link from another MS.
    pub(crate) fn relay_from_link(&self, frame: Frame) {
        let locate = |user: &str| self.locate_user(user);
        self.relay.from_link(
            frame,
            |n| self.users.by_name(n),
            &locate,
            &self.ms_key,
            self.config.crs_timeout,
        )
    }

    /// The address of the MS where `user` is logged in, if another.
    fn locate_user(&self, user: &str) -> Option<String> {
        match self.crs.call(&crate::proto::crs::CrsRequest::FindMs {
            user: user.to_owned(),
        }) {
            Ok(crate::proto::crs::CrsReply::MsAddress(a)) if a != *self.relay.me.lock() => Some(a),
            Ok(_) => None,
            Err(e) => {
                debug!("where is {user}: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Channel;
    use crate::prethread::Outbound;
    use crate::seal::{Role, SessionKeys};
    use crate::wire::io::MessageReader;
    use crate::wire::Limits;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    /// A login of `name` with `contacts`, its held connection (if any)
    /// the server end of a loopback pair whose other end is returned.
    fn user(name: &str, contacts: &[&str], held: bool) -> (Arc<OnlineUser>, Option<TcpStream>) {
        let keys = || SessionKeys::derive(&[1; 32], b"test", Role::Responder);
        let (out, far) = if held {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let far = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (near, _) = l.accept().unwrap();
            near.set_nonblocking(true).unwrap();
            (
                Some(Outbound::new(Arc::new(near), Duration::from_secs(3))),
                Some(far),
            )
        } else {
            (None, None)
        };
        let user = OnlineUser {
            name: name.into(),
            login: format!("login-{name}"),
            address: "127.0.0.1:1".parse().unwrap(),
            held: out,
            contacts: Mutex::new(contacts.iter().map(|c| c.to_string()).collect()),
            link: Mutex::new(Channel::new(keys(), Vec::new())),
            push: Mutex::new(keys().send),
            last_seen: AtomicU64::new(0),
            number: AtomicU64::new(0),
            ended: Default::default(),
        };
        (Arc::new(user), far)
    }

    fn frame(from: &str, circuit: u64, len: usize) -> Frame {
        let mut f = Frame::new(circuit, true, Op::Data, vec![7; len]);
        f.from = Some(from.into());
        f
    }

    #[test]
    fn a_receiver_that_stops_reading_is_dropped_and_stalls_no_one_else() {
        let relay = Relay::new(0.0, 1 << 30);
        let (bob, bob_far) = user("bob", &["alice"], true);
        let (carol, carol_far) = user("carol", &["dave"], true);
        // Carol reads; bob never does.
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let carol_far = carol_far.unwrap();
        std::thread::spawn(move || {
            let mut r = MessageReader::new(carol_far);
            for _ in 0..5 {
                let deadline = Instant::now() + Duration::from_secs(30);
                let m = r.read_message(&Limits::DEFAULT, deadline).unwrap().unwrap();
                let f = Frame::from_message(m).unwrap();
                assert_eq!(f.from.as_deref(), Some("dave"));
            }
            let _ = done_tx.send(Instant::now());
        });
        // Far more than the socket buffers hold (loopback's may take
        // tens of MiB).
        for i in 0..256 {
            assert!(relay.deliver(&bob, frame("alice", i, 256 * 1024)));
        }
        // Not buddies: refused.
        assert!(!relay.deliver(&bob, frame("dave", 1, 10)));
        for i in 0..5 {
            assert!(relay.deliver(&carol, frame("dave", i, 1000)));
        }
        let carol_done = done_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("carol's frames never came");
        // Bob's frames are dropped once a write missed its deadline (all
        // of them can never be written: nothing reads them), and nothing
        // of alice's stays counted against her.
        let end = Instant::now() + Duration::from_secs(60);
        while relay.budget("alice").queued.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < end, "alice's frames stay queued");
            std::thread::sleep(Duration::from_millis(20));
        }
        let bob_dropped = Instant::now();
        assert!(carol_done < bob_dropped, "carol waited for bob");
        // His connection was closed: what was written, then the end.
        let mut bob_far = bob_far.unwrap();
        bob_far
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut all = Vec::new();
        bob_far
            .read_to_end(&mut all)
            .expect("bob's connection never closed");
        assert!(all.len() < 256 * 256 * 1024, "everything was written");
    }

    #[test]
    fn the_bucket_paces_past_its_burst() {
        let b = Budget::new(1000.0);
        assert!(b.take(1000, 1000.0, 1000.0).is_zero());
        let wait = b.take(500, 1000.0, 1000.0);
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        assert!(
            Budget::new(0.0).take(1 << 40, 0.0, 0.0).is_zero(),
            "no limit"
        );
    }
}
