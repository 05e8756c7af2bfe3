//! Pushes to clients: a fixed set of pusher threads, each owning a share
//! of the users (by a hash of the name) so that one client's pushes leave
//! in order; a push opens a connection, sends one sealed `PUSH`, reads the
//! acknowledgement, and closes (the MS keeps no socket per user).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{bounded, Sender, TrySendError};
use log::{debug, warn};

use super::users::OnlineUser;
use crate::link::{connect_to, Conn};
use crate::proto::crs::EventKind;
use crate::proto::ms::{event_message, PUSH};
use crate::proto::Refused;

/// Pushes waiting per pusher thread; past this a push is dropped with a
/// warning rather than letting one slow client grow memory without bound.
pub const PUSH_QUEUE: usize = 10_000;

type Job = (Arc<OnlineUser>, EventKind);

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
    /// Starts `n` pusher threads; `timeout` bounds connect, write and ack.
    pub fn start(n: usize, timeout: Duration) -> std::io::Result<Pusher> {
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
                        for (user, event) in rx {
                            // Logged out while this waited: nobody listens for it.
                            if user.has_ended() {
                                debug!("dropped a push to {}, who logged out", user.name);
                                continue;
                            }
                            let result = push_one(&user, &event, timeout);
                            if result.is_ok() {
                                ok.inc();
                            }
                            if let Err(e) = result {
                                bad.inc();
                                warn!("push to {} at {} failed: {e}", user.name, user.address);
                                // Probe it at the next check rather than wait for its timeout.
                                user.suspect();
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

fn push_one(user: &OnlineUser, event: &EventKind, timeout: Duration) -> Result<(), String> {
    let sealed = user
        .push
        .lock()
        .seal(PUSH, &[("User", &user.name)], &event_message(event))
        .map_err(|e| e.to_string())?;
    let stream = connect_to(user.address, timeout).map_err(|e| e.to_string())?;
    let reply = Conn::new(stream, timeout)
        .exchange(&sealed)
        .map_err(|e| e.to_string())?;
    if reply.is_success() {
        debug!("pushed to {}", user.name);
        return Ok(());
    }
    match Refused::from_message(&reply) {
        Some(r) => Err(format!("client answered {r}")),
        None => Err("the client's answer is not a reply".into()),
    }
}
