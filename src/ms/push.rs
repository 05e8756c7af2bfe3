//! Pushes to clients: a fixed set of pusher threads, each owning a share
//! of the users (by a hash of the name) so that one client's pushes leave
//! in order. A push is one sealed `PUSH` written on the client's held
//! login connection (PROTOCOL.md §6); the client does not answer it, the
//! connection's delivery order and its keepalives are the acknowledgement.
//! Pushes already queued together for one client leave in one write.
//! The MS never connects to a client.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender, TrySendError};
use log::{debug, warn};

use super::users::OnlineUser;
use crate::proto::crs::EventKind;
use crate::proto::ms::{event_message, PUSH};
use crate::wire::Message;

/// Pushes waiting per pusher thread; past this a push is dropped with a
/// warning rather than letting one slow client grow memory without bound.
pub const PUSH_QUEUE: usize = 10_000;

/// A user and the event for them, encoded once for all its recipients
/// (an `online` event carries the user's key, and goes to every buddy).
type Job = (Arc<OnlineUser>, Arc<Message>);

/// The pusher threads.
pub struct Pusher {
    lanes: Vec<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    /// Pushes delivered (a metric).
    pub pushed: prometheus_client::metrics::counter::Counter,
    /// Pushes that failed or were dropped (a metric).
    pub failed: prometheus_client::metrics::counter::Counter,
}

impl Pusher {
    /// Starts `n` pusher threads; each push is bounded by the pool's write
    /// deadline on the held connection.
    pub fn start(n: usize) -> std::io::Result<Pusher> {
        let mut lanes = Vec::new();
        let mut threads = Vec::new();
        let pushed = prometheus_client::metrics::counter::Counter::<u64>::default();
        let failed = prometheus_client::metrics::counter::Counter::<u64>::default();
        for i in 0..n.max(1) {
            let (tx, rx) = bounded::<Job>(PUSH_QUEUE);
            let (ok, bad) = (pushed.clone(), failed.clone());
            lanes.push(tx);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ms-push{i}"))
                    .spawn(move || {
                        let mut batch = Vec::new();
                        while let Ok(first) = rx.recv() {
                            // Whatever else is already queued goes out with
                            // it: a user's pushes in one write (a burst of
                            // presence when many buddies log in at once),
                            // never waiting for more to come.
                            batch.push(first);
                            while batch.len() < BATCH {
                                match rx.try_recv() {
                                    Ok(job) => batch.push(job),
                                    Err(_) => break,
                                }
                            }
                            for (user, events) in by_user(&mut batch) {
                                deliver(&user, &events, &ok, &bad);
                            }
                        }
                    })?,
            );
        }
        Ok(Pusher {
            lanes,
            threads,
            pushed,
            failed,
        })
    }

    /// Queues `event` for `user`'s client.
    pub fn push(&self, user: Arc<OnlineUser>, event: EventKind) {
        self.push_encoded(user, Arc::new(event_message(&event)));
    }

    /// Queues an event already encoded ([`event_message`]) for `user`'s
    /// client: one encoding shared by all its recipients.
    pub fn push_encoded(&self, user: Arc<OnlineUser>, event: Arc<Message>) {
        let mut h = DefaultHasher::new();
        user.name.hash(&mut h);
        let lane = &self.lanes[(h.finish() % self.lanes.len() as u64) as usize];
        match lane.try_send((user, event)) {
            Ok(()) => {}
            Err(TrySendError::Full((u, _))) => {
                self.failed.inc();
                warn!("push queue full; dropping a push to {}", u.name)
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Lets queued pushes go out, then joins the threads.
    pub fn stop(self) {
        drop(self.lanes);
        for t in self.threads {
            if t.join().is_err() {
                warn!("a pusher thread panicked");
            }
        }
    }
}

/// Most queued pushes a pusher takes at once.
const BATCH: usize = 256;

/// Takes the jobs out of `batch` grouped by user, users in the order of
/// their first push and each user's pushes in their order.
fn by_user(batch: &mut Vec<Job>) -> Vec<(Arc<OnlineUser>, Vec<Arc<Message>>)> {
    let mut groups: Vec<(Arc<OnlineUser>, Vec<Arc<Message>>)> = Vec::new();
    // By the login's address: one entry per login, not per name.
    let mut index: std::collections::HashMap<*const OnlineUser, usize> = Default::default();
    for (user, event) in batch.drain(..) {
        match index
            .get(&Arc::as_ptr(&user))
            .and_then(|&i| groups.get_mut(i))
        {
            Some((_, events)) => events.push(event),
            None => {
                index.insert(Arc::as_ptr(&user), groups.len());
                groups.push((user, vec![event]));
            }
        }
    }
    groups
}

/// Writes `events` to `user`'s client in one write, or ends its login.
fn deliver(
    user: &OnlineUser,
    events: &[Arc<Message>],
    ok: &prometheus_client::metrics::counter::Counter,
    bad: &prometheus_client::metrics::counter::Counter,
) {
    // Logged out while this waited: nobody listens for it.
    if user.has_ended() {
        debug!(
            "dropped {} pushes to {}, who logged out",
            events.len(),
            user.name
        );
        return;
    }
    match push_many(user, events) {
        Ok(()) => {
            ok.inc_by(events.len() as u64);
        }
        Err(e) => {
            bad.inc_by(events.len() as u64);
            // A client that just closed its connection is the usual case:
            // its close ends the login.
            if e.gone {
                debug!("push to {}: {}; its login ends", user.name, e.why);
            } else {
                warn!("push to {} failed: {}; ending its login", user.name, e.why);
            }
            // A held connection that cannot take a push within the write
            // deadline is not trusted with later ones: its close ends the
            // login.
            user.drop_connection();
        }
    }
}

/// Why a push was not written.
struct PushFailed {
    /// The client has gone (its connection closed or reset).
    gone: bool,
    why: String,
}

fn push_many(user: &OnlineUser, events: &[Arc<Message>]) -> Result<(), PushFailed> {
    let failed = |gone: bool, why: String| PushFailed { gone, why };
    let Some(out) = &user.held else {
        return Err(failed(false, "no held connection".into()));
    };
    let mut sealed = Vec::with_capacity(events.len());
    {
        let mut push = user.push.lock();
        for event in events {
            sealed.push(
                push.seal(PUSH, &[("User", &user.name)], event)
                    .map_err(|e| failed(false, e.to_string()))?,
            );
        }
    }
    out.send_all(&sealed).map_err(|e| {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset, NotConnected};
        failed(
            matches!(e.kind(), BrokenPipe | ConnectionReset | NotConnected),
            e.to_string(),
        )
    })?;
    debug!("pushed to {}", user.name);
    Ok(())
}
