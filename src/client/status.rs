//! Our status and personal message, our buddies' as the servers push
//! them, and auto-away.
//!
//! The status goes to the MS (`STATUS`), which keeps it at the CRS and
//! pushes it to our buddies: it is not end to end, the servers see it.
//! `invisible` looks offline to buddies; before opening a session with a
//! buddy while invisible we `REVEAL` ourselves to that buddy alone, so that
//! their client knows where we are (it still shows us offline) and takes
//! our INIT and can answer.
//!
//! Auto-away: after `auto_away` without input while `available`, the
//! client sets `away` itself (keeping the personal message); the next
//! input restores what was set before. An explicit `/status` ends it.

use std::time::{Duration, Instant};

use log::{debug, warn};
use parking_lot::Mutex;

use super::error::ClientError;
use super::events::Event;
use super::Client;
use crate::proto::ms::MsRequest;
use crate::proto::status::{bounded, Status, StatusInfo, MAX_STATUS_MESSAGE_BYTES};

/// How often the auto-away timer looks at the idle time at most: a second
/// of idle limit is then reached within a quarter of a second.
pub const AWAY_TICK: Duration = Duration::from_millis(250);

/// The idle clock.
#[derive(Debug)]
pub struct Away {
    state: Mutex<AwayState>,
    /// Held while a status goes to the MS, so that an auto-away, its end
    /// and a status the user chose are applied one at a time, each
    /// checking first that it is still wanted.
    apply: Mutex<()>,
}

#[derive(Debug)]
struct AwayState {
    /// The last input.
    last_input: Instant,
    /// While auto-away is in force: the status it replaced.
    restore: Option<StatusInfo>,
    /// Counts the statuses the user chose: an auto-away or its end
    /// decided before the latest is dropped.
    chosen: u64,
}

impl Default for Away {
    fn default() -> Self {
        Away {
            state: Mutex::new(AwayState {
                last_input: Instant::now(),
                restore: None,
                chosen: 0,
            }),
            apply: Mutex::new(()),
        }
    }
}

/// A buddy's status as shown: `offline` unless online and visible.
pub fn shown(online: bool, info: Option<&StatusInfo>) -> (bool, String, String) {
    match info {
        Some(i) if online && i.status == Status::Invisible => {
            (false, "offline".into(), String::new())
        }
        Some(i) if online => (true, i.status.as_str().into(), i.message.clone()),
        None if online => (true, Status::Available.as_str().into(), String::new()),
        _ => (false, "offline".into(), String::new()),
    }
}

/// Our status as found at login (kept at the CRS from an earlier one).
pub fn kept_text(info: &StatusInfo) -> String {
    if info.message.is_empty() {
        format!("your status: {} (kept from your last login)", info.status)
    } else {
        format!(
            "your status: {}: {} (kept from your last login)",
            info.status, info.message
        )
    }
}

/// `status` and `message` as kept from a push: the message bounded.
pub fn received(status: Status, message: &str) -> StatusInfo {
    StatusInfo {
        status,
        message: bounded(message),
    }
}

impl Client {
    /// Our status and personal message (the default when logged out).
    pub fn status(&self) -> StatusInfo {
        self.state
            .lock()
            .session()
            .map(|s| s.status.clone())
            .unwrap_or_default()
    }

    /// Sets our status and personal message (an explicit choice: it ends
    /// auto-away).
    pub fn set_status(&self, status: Status, message: &str) -> Result<(), ClientError> {
        if message.len() > MAX_STATUS_MESSAGE_BYTES {
            return Err(ClientError::StatusTooLong);
        }
        {
            let mut a = self.away.state.lock();
            a.restore = None;
            a.chosen = a.chosen.wrapping_add(1);
        }
        let _one_at_a_time = self.away.apply.lock();
        self.apply_status(StatusInfo {
            status,
            message: message.to_owned(),
        })
    }

    fn apply_status(&self, info: StatusInfo) -> Result<(), ClientError> {
        self.ms_call(&MsRequest::SetStatus(info.clone()))?;
        if let Some(s) = self.state.lock().session_mut() {
            s.status = info;
        }
        Ok(())
    }

    /// Before a session with `to` is opened: while we are invisible, `to`
    /// must learn where we are to take it (and to answer).
    pub(super) fn reveal_if_invisible(&self, to: &str) {
        if self.status().status != Status::Invisible {
            return;
        }
        if let Err(e) = self.ms_call(&MsRequest::Reveal(to.to_owned())) {
            warn!("could not reveal ourselves to {to}: {e}");
        }
    }

    /// The user did something: the idle clock starts again, and an
    /// auto-away ends (the status before it is set again, off the
    /// caller's thread: a keypress must not wait for the MS).
    pub fn note_input(self: &std::sync::Arc<Self>) {
        let (restore, chosen) = {
            let mut a = self.away.state.lock();
            a.last_input = Instant::now();
            (a.restore.take(), a.chosen)
        };
        if let Some(prev) = restore {
            let c = self.clone();
            let spawned = std::thread::Builder::new()
                .name("client-back".into())
                .spawn(move || c.back_from_away(prev, chosen));
            if let Err(e) = spawned {
                warn!("cannot end auto-away: {e}");
            }
        }
    }

    /// A command line came in: as [`Client::note_input`], but an
    /// auto-away ends before the command runs (a `/logout` must find it
    /// ended), on the caller's thread, which waits for its MS anyway.
    pub fn note_line(&self) {
        let (restore, chosen) = {
            let mut a = self.away.state.lock();
            a.last_input = Instant::now();
            (a.restore.take(), a.chosen)
        };
        if let Some(prev) = restore {
            self.back_from_away(prev, chosen);
        }
    }

    fn back_from_away(&self, prev: StatusInfo, chosen: u64) {
        let status = prev.status;
        let _one_at_a_time = self.away.apply.lock();
        if self.away.state.lock().chosen != chosen {
            // The user chose a status since: it stays.
            return;
        }
        match self.apply_status(prev) {
            Ok(()) => self.emit(Event::Notice {
                text: format!("back: status {status} again"),
            }),
            Err(e) => self.emit(Event::Error {
                command: "status".into(),
                reason: format!("could not end auto-away: {e}"),
            }),
        }
    }

    /// A login starts the idle clock afresh (time at a password prompt
    /// is not idleness of a login).
    pub(super) fn idle_restart(&self) {
        let mut a = self.away.state.lock();
        a.last_input = Instant::now();
        a.restore = None;
    }

    /// Before a logout: an auto-away in force ends, so that the next
    /// login does not find a status the client set by itself.
    pub(super) fn end_auto_away(&self) {
        let Some(prev) = self.away.state.lock().restore.take() else {
            return;
        };
        let _one_at_a_time = self.away.apply.lock();
        if let Err(e) = self.apply_status(prev) {
            warn!("could not end auto-away before logging out: {e}");
        }
    }

    /// One look at the idle clock (the auto-away timer's tick): `away`
    /// once input has been idle for `auto_away`, if we are `available`.
    pub(super) fn auto_away_tick(&self) {
        let limit = self.config.auto_away;
        if limit.is_zero() || !self.is_logged_in() {
            return;
        }
        let _one_at_a_time = self.away.apply.lock();
        let current = self.status();
        {
            let mut a = self.away.state.lock();
            if a.restore.is_some()
                || a.last_input.elapsed() < limit
                || current.status != Status::Available
            {
                return;
            }
            a.restore = Some(current.clone());
        }
        let away = StatusInfo {
            status: Status::Away,
            message: current.message,
        };
        match self.apply_status(away) {
            Ok(()) => {
                debug!("idle for {limit:?}: away");
                self.emit(Event::Notice {
                    text: format!("status away: no input for {}s", limit.as_secs_f64().round()),
                });
            }
            Err(e) => {
                // Tried again at the next tick.
                self.away.state.lock().restore = None;
                warn!("auto-away: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_statuses() {
        let away = StatusInfo {
            status: Status::Away,
            message: "lunch".into(),
        };
        assert_eq!(
            shown(true, Some(&away)),
            (true, "away".into(), "lunch".into())
        );
        assert_eq!(shown(false, Some(&away)).1, "offline");
        let hidden = StatusInfo {
            status: Status::Invisible,
            message: "x".into(),
        };
        assert_eq!(
            shown(true, Some(&hidden)),
            (false, "offline".into(), String::new())
        );
        assert_eq!(shown(true, None).1, "available");
        assert!(
            received(Status::Busy, &"x".repeat(1000)).message.len() <= MAX_STATUS_MESSAGE_BYTES
        );
    }
}
