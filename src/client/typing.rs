//! Typing notifications: "alice is typing" between the two ends of a
//! conversation, over the peer session (end to end, like messages).
//! Rate-limited on both sides: the sender sends only changes and at most
//! a few a second, the receiver shows at most a few a second from each
//! buddy and drops the rest (a flood from a hostile buddy costs one
//! acknowledgement each and nothing on the screen).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use parking_lot::Mutex;

use super::error::ClientError;
use super::events::Event;
use super::peer::PendingKind;
use super::Client;
use crate::proto::peer::{Ack, PeerRequest};

/// Typing notifications a burst may hold, each way, per buddy: a start
/// and a stop typed quickly both go through.
const BURST: f64 = 4.0;
/// Typing notifications per second, each way, per buddy, after a burst:
/// a person does not start and stop typing more often than this.
const PER_SEC: f64 = 2.0;
/// A repeated `on` is sent again only after this long (the receiver
/// forgets a typist it has not heard from for a while).
pub const REFRESH: Duration = Duration::from_secs(5);

/// A token bucket.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full() -> Bucket {
        Bucket {
            tokens: BURST,
            at: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * PER_SEC;
        self.tokens = (self.tokens + refill).min(BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What we told a buddy last.
struct Told {
    on: bool,
    at: Instant,
    bucket: Bucket,
}

/// Typing state of both directions, per buddy.
#[derive(Default)]
pub struct Typing {
    out: Mutex<HashMap<String, Told>>,
    incoming: Mutex<HashMap<String, Bucket>>,
}

impl Typing {
    /// Forgets everything (logout).
    pub fn clear(&self) {
        self.out.lock().clear();
        self.incoming.lock().clear();
    }

    /// Whether telling `to` that typing is `on` is due now (a change, or
    /// a refresh of `on`) and within the rate; records it if so.
    fn due(&self, to: &str, on: bool) -> bool {
        let mut out = self.out.lock();
        let now = Instant::now();
        let told = out.entry(to.to_owned()).or_insert(Told {
            on: !on,
            at: now,
            bucket: Bucket::full(),
        });
        let changed = told.on != on || (on && now.duration_since(told.at) >= REFRESH);
        if !changed || !told.bucket.take() {
            return false;
        }
        told.on = on;
        told.at = now;
        true
    }
}

impl Client {
    /// Tells `to` that we started (`on`) or stopped typing to them.
    /// `Ok(false)`: nothing sent (no change, or over the rate).
    pub fn send_typing(self: &Arc<Self>, to: &str, on: bool) -> Result<bool, ClientError> {
        if !self.config.typing_notifications {
            return Err(ClientError::TypingOff);
        }
        let to = to.to_ascii_lowercase();
        self.user().ok_or(ClientError::NotLoggedIn)?;
        if !self.typing.due(&to, on) {
            return Ok(false);
        }
        let id = self.next_id();
        let sent = self.send_request(
            &to,
            &PeerRequest::Typing { id, on },
            id,
            PendingKind::Control("typing".into()),
        );
        if sent.is_err() {
            // Not told: the next change must not be taken for a repeat.
            self.typing.out.lock().remove(&to);
        }
        sent.map(|()| true)
    }

    pub(super) fn on_typing(&self, from: &str, id: u64, on: bool) -> Ack {
        let shown = self
            .typing
            .incoming
            .lock()
            .entry(from.to_owned())
            .or_insert_with(Bucket::full)
            .take();
        if shown {
            self.emit(Event::Typing {
                from: from.to_owned(),
                state: if on { "on" } else { "off" }.into(),
            });
        } else {
            debug!("typing from {from} over the rate: dropped");
        }
        Ack::done(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_changes_go_and_a_flood_is_cut() {
        let t = Typing::default();
        assert!(t.due("bob", true));
        assert!(!t.due("bob", true), "a repeat is not sent");
        assert!(t.due("bob", false));
        let sent = (0..100).filter(|i| t.due("bob", i % 2 == 0)).count();
        assert!(sent <= BURST as usize, "{sent} of a flood of 100 sent");
        assert!(t.due("carol", true), "each buddy has a rate of its own");
    }
}
