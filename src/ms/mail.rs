//! Offline messages at the MS: it fetches what waits for a user at the
//! CRS (`MAIL`) and pushes it on the user's held login connection, after
//! the welcome and in order with every other push; the client's
//! acknowledgement (`MAIL-ACK`) goes back to the CRS, which alone deletes.
//!
//! A fetch happens after a login whose welcome says something waits, after
//! the login is announced again to a restarted CRS, and whenever the CRS
//! says so (`mail-waiting`). One thread does every fetch, so two never
//! race for a user; per login it remembers the last entry pushed and asks
//! only for newer ones, so an entry is pushed once per login (a new login
//! gets again whatever its predecessor did not acknowledge).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use log::{debug, warn};
use parking_lot::Mutex;

use super::users::OnlineUser;
use super::Ms;
use crate::proto::crs::{CrsReply, CrsRequest, EventKind};

/// Fetches wanted, and where each login's fetching got to.
pub struct Mailroom {
    wanted: (Sender<Arc<OnlineUser>>, Receiver<Arc<OnlineUser>>),
    /// Login id -> number of the last entry pushed on it.
    cursors: Mutex<HashMap<String, u64>>,
}

impl Default for Mailroom {
    fn default() -> Self {
        Mailroom {
            wanted: unbounded(),
            cursors: Mutex::new(HashMap::new()),
        }
    }
}

/// Attempts of one fetch before it waits for the next reason to fetch.
const FETCH_ATTEMPTS: u32 = 5;

impl Ms {
    /// Asks the mail thread to fetch what waits for `user`.
    pub(crate) fn want_mail(&self, user: Arc<OnlineUser>) {
        // Unbounded: at most one entry per login and notification.
        let _ = self.mail.wanted.0.send(user);
    }

    /// The mail thread: fetches, one user at a time, until the MS stops.
    pub(crate) fn mail_loop(self: Arc<Self>) {
        let wanted = self.mail.wanted.1.clone();
        while !self.stopping.load(Ordering::Relaxed) {
            match wanted.recv_timeout(Duration::from_millis(250)) {
                Ok(user) => {
                    self.fetch_mail(&user);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Fetches everything newer than what this login was given, and
    /// pushes it. Returns the entries pushed.
    pub fn fetch_mail(&self, user: &Arc<OnlineUser>) -> usize {
        let mut pushed = 0;
        {
            // Logins that ended keep no cursor.
            let mut cursors = self.mail.cursors.lock();
            cursors.retain(|login, _| self.users.by_login(login).is_some());
        }
        let mut after = self
            .mail
            .cursors
            .lock()
            .get(&user.login)
            .copied()
            .unwrap_or(0);
        let mut failures = 0;
        while !user.has_ended() {
            let reply = self.crs.call(&CrsRequest::Mail {
                user: user.name.clone(),
                after,
            });
            let items = match reply {
                Ok(CrsReply::Mail(items)) => items,
                Ok(other) => {
                    warn!("the CRS answered {other:?} to MAIL");
                    break;
                }
                Err(e) => {
                    failures += 1;
                    if failures >= FETCH_ATTEMPTS {
                        warn!("fetching {}'s offline messages: {e}; later", user.name);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200 * u64::from(failures)));
                    continue;
                }
            };
            if items.is_empty() {
                break;
            }
            for item in items {
                let seq = match &item {
                    EventKind::Mail { seq, .. } | EventKind::Receipt { seq, .. } => *seq,
                    _ => continue,
                };
                if seq <= after {
                    continue;
                }
                after = seq;
                self.pusher.push(user.clone(), item);
                pushed += 1;
            }
            self.mail.cursors.lock().insert(user.login.clone(), after);
        }
        if pushed > 0 {
            debug!("pushed {pushed} offline entries to {}", user.name);
        }
        pushed
    }
}
