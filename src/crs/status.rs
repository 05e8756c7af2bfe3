//! Status and personal message at the CRS: kept in the user's record (so
//! they hold across logins and MSs) and pushed to the user's buddies while
//! the user is online. `invisible` hides presence: the buddies are told
//! `OFFLINE` and see the user offline in their contact lists, until the
//! user writes to one of them (`REVEAL`), who is then told where the user
//! is (still shown offline) so that their client takes the session.

use std::collections::{BTreeMap, BTreeSet};

use super::service::{refuse, user_err};
use super::store;
use super::Crs;
use crate::proto::crs::{CrsReply, EventKind, Status, StatusInfo};
use crate::proto::status::MAX_STATUS_MESSAGE_BYTES;
use crate::proto::{Answer, Refusal};

/// What a user's contacts may see of each of them: the status of those
/// who show online to the user, and who hides (invisible, or blocking the
/// user) and so shows offline.
#[derive(Debug, Default)]
pub(super) struct ContactsView {
    /// Shown as offline to the user.
    pub hidden: BTreeSet<String>,
    /// The status of the others.
    pub status: BTreeMap<String, StatusInfo>,
}

impl Crs {
    /// The status kept for `user` (the default when unknown).
    pub(super) fn status_of(&self, user: &str) -> StatusInfo {
        match self.store.get_user(user) {
            Ok(Some(u)) => StatusInfo {
                status: u.status,
                message: u.status_message,
            },
            _ => StatusInfo::default(),
        }
    }

    /// How `user`'s contacts show to `user` (a contact that cannot be read
    /// shows with no status, as before).
    pub(super) fn contacts_view(&self, user: &str, contacts: &BTreeSet<String>) -> ContactsView {
        let mut view = ContactsView::default();
        let views = match self.store.contact_views(user, contacts) {
            Ok(views) => views,
            Err(e) => {
                log::warn!("reading how {user}'s contacts show: {e}");
                return view;
            }
        };
        for (c, v) in views {
            if v.blocks_viewer || v.status == Status::Invisible {
                view.hidden.insert(c);
            } else {
                view.status.insert(
                    c,
                    StatusInfo {
                        status: v.status,
                        message: v.status_message,
                    },
                );
            }
        }
        view
    }

    /// `user` sets a status and personal message: kept, and pushed to the
    /// buddies `user` does not block while `user` is online (becoming
    /// invisible is an `OFFLINE` for them, leaving it an `ONLINE`).
    pub(super) fn set_status(&self, user: &str, info: StatusInfo) -> Answer<CrsReply> {
        if info.message.len() > MAX_STATUS_MESSAGE_BYTES {
            return refuse(Refusal::BadRequest, "personal message too long");
        }
        let user = store::canonical(user);
        let old = match self.store.get_user(&user) {
            Ok(Some(u)) => u,
            Ok(None) => return refuse(Refusal::NoSuchUser, "no such user"),
            Err(e) => return Err(user_err(e)),
        };
        if let Err(e) = self.store.set_status(&user, info.status, &info.message) {
            return Err(user_err(e));
        }
        if old.status == info.status && old.status_message == info.message {
            return Ok(CrsReply::Done);
        }
        let was_invisible = old.status == Status::Invisible;
        let mut live = self.live.lock();
        let Some(presence) = live.online(&user).map(|o| o.presence.clone()) else {
            return Ok(CrsReply::Done);
        };
        let event = match (was_invisible, info.status == Status::Invisible) {
            (true, true) => None,
            (false, true) => Some(EventKind::Offline { user: user.clone() }),
            (true, false) => Some(EventKind::Online {
                user: user.clone(),
                presence,
                status: info.status,
                message: info.message,
            }),
            (false, false) => Some(EventKind::Status {
                user: user.clone(),
                status: info.status,
                message: info.message,
            }),
        };
        if let Some(event) = event {
            live.notify(
                old.contacts
                    .iter()
                    .filter(|c| !old.blocked.contains(*c))
                    .map(String::as_str),
                &event,
            );
        }
        drop(live);
        if was_invisible
            && info.status != Status::Invisible
            && self.store.has_mail(&user).unwrap_or(true)
        {
            // Offline messages that waited while the user looked offline.
            self.tell_mail_waiting([user]);
        }
        Ok(CrsReply::Done)
    }

    /// `user`, invisible, writes to their buddy `to`: `to` is told where
    /// `user` is, marked invisible. Answered `200` whatever was done, so
    /// that it tells nothing.
    pub(super) fn reveal(&self, user: &str, to: &str) -> Answer<CrsReply> {
        let (user, to) = (store::canonical(user), store::canonical(to));
        let record = match self.store.get_user(&user) {
            Ok(Some(u)) => u,
            Ok(None) => return refuse(Refusal::NoSuchUser, "no such user"),
            Err(e) => return Err(user_err(e)),
        };
        if record.status != Status::Invisible
            || !record.contacts.contains(&to)
            || record.blocked.contains(&to)
        {
            return Ok(CrsReply::Done);
        }
        let mut live = self.live.lock();
        let Some(presence) = live.online(&user).map(|o| o.presence.clone()) else {
            return Ok(CrsReply::Done);
        };
        live.notify(
            [to.as_str()],
            &EventKind::Online {
                user: user.clone(),
                presence,
                status: Status::Invisible,
                message: String::new(),
            },
        );
        drop(live);
        Ok(CrsReply::Done)
    }
}
