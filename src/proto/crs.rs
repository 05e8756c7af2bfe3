//! Messages of the links that end at the CRS: client → CRS (clear or
//! encrypted to the CRS key), MS → CRS (inner messages of the sealed link),
//! operator → CRS, and the events the CRS pushes to MSs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::reply::{done_answer, json_answer};
pub use super::status::{Status, StatusInfo};
use super::{b64_serde, Answer, Fields, ProtoError, Refused, Request};
use crate::crypto;
use crate::wire::{code, Message};

/// Outer method of every message on a sealed link.
pub const SEALED: &str = "SEALED";

/// A user's password verifier (SCRAM-SHA-256 style): from it nobody can log in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verifier {
    /// Random per-user PBKDF2 salt.
    #[serde(with = "b64_serde")]
    pub salt: Vec<u8>,
    /// PBKDF2-HMAC-SHA-256 iteration count.
    pub iterations: u32,
    /// SHA-256(ClientKey).
    #[serde(with = "b64_serde")]
    pub stored_key: Vec<u8>,
    /// HMAC(SaltedPassword, "Server Key").
    #[serde(with = "b64_serde")]
    pub server_key: Vec<u8>,
}

impl Verifier {
    fn write(&self, m: Message) -> Message {
        m.with_header("Salt", crypto::b64_encode(&self.salt))
            .with_header("Iterations", self.iterations)
            .with_header("Stored-Key", crypto::b64_encode(&self.stored_key))
            .with_header("Server-Key", crypto::b64_encode(&self.server_key))
    }

    fn read(m: &Message) -> Result<Verifier, ProtoError> {
        Ok(Verifier {
            salt: m.req_b64("Salt")?,
            iterations: m.req_parse("Iterations")?,
            stored_key: m.req_b64("Stored-Key")?,
            server_key: m.req_b64("Server-Key")?,
        })
    }
}

/// Profile fields (full name, company, ...), free text.
pub type Profile = BTreeMap<String, String>;

/// Most fields of one profile: a directory card, not a document store.
pub const MAX_PROFILE_FIELDS: usize = 16;
/// Longest field name, in bytes.
pub const MAX_PROFILE_NAME: usize = 32;
/// Longest field value, in bytes.
pub const MAX_PROFILE_VALUE: usize = 1024;
/// Most bytes of all names and values together: fifty search results of
/// full profiles stay far below the 1 MiB body limit.
pub const MAX_PROFILE_BYTES: usize = 4096;
/// Most bytes of the profiles in one search reply: old records stored
/// before the profile limits cannot push a reply past the body limit.
pub const MAX_SEARCH_REPLY_BYTES: usize = 256 * 1024;

/// Why a profile is refused (the reason for people); `None` if it is fine.
pub fn profile_problem(p: &Profile) -> Option<String> {
    if p.len() > MAX_PROFILE_FIELDS {
        return Some(format!("a profile has at most {MAX_PROFILE_FIELDS} fields"));
    }
    let mut total = 0usize;
    for (k, v) in p {
        if k.is_empty() || k.len() > MAX_PROFILE_NAME {
            return Some(format!(
                "a profile field name has 1-{MAX_PROFILE_NAME} bytes"
            ));
        }
        if v.len() > MAX_PROFILE_VALUE {
            return Some(format!(
                "a profile field has at most {MAX_PROFILE_VALUE} bytes"
            ));
        }
        total = total.saturating_add(k.len()).saturating_add(v.len());
    }
    (total > MAX_PROFILE_BYTES)
        .then(|| format!("a profile has at most {MAX_PROFILE_BYTES} bytes in all"))
}

/// Everything a new account needs; sent inside `REGISTER`, encrypted to
/// the CRS public key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The name asked for.
    pub user: String,
    /// The password verifier.
    pub verifier: Verifier,
    /// The user's RSA public key, DER.
    #[serde(with = "b64_serde")]
    pub public_key: Vec<u8>,
    /// The private key wrapped under the password's wrap key.
    #[serde(with = "b64_serde")]
    pub wrapped_key: Vec<u8>,
    /// Initial profile.
    #[serde(default)]
    pub profile: Profile,
}

/// A buddy request as delivered to its target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuddyRequest {
    /// Who asks.
    pub from: String,
    /// The asker's public key (DER), to check the signature.
    #[serde(with = "b64_serde")]
    pub public_key: Vec<u8>,
    /// The asker's nonce.
    #[serde(with = "b64_serde")]
    pub nonce: Vec<u8>,
    /// RSA-PSS over [`super::add_transcript`].
    #[serde(with = "b64_serde")]
    pub signature: Vec<u8>,
}

/// Where an online user is and how to encrypt to them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    /// The client's listening address.
    pub address: SocketAddr,
    /// The user's public key, DER.
    #[serde(with = "b64_serde")]
    pub public_key: Vec<u8>,
}

/// One entry of a contact list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    /// The buddy's name.
    pub user: String,
    /// Present while the buddy is online.
    pub online: Option<Presence>,
    /// The buddy's status while online (`available` otherwise).
    #[serde(default)]
    pub status: Status,
    /// The buddy's personal message while online (empty otherwise).
    #[serde(default)]
    pub message: String,
}

/// What a client receives when its login completes (PROTOCOL.md §6 steps 6-7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The user's name as registered.
    pub user: String,
    /// The user's public key, DER.
    #[serde(with = "b64_serde")]
    pub public_key: Vec<u8>,
    /// The private key as wrapped by the client at registration.
    #[serde(with = "b64_serde")]
    pub wrapped_key: Vec<u8>,
    /// The contact list.
    pub contacts: Vec<Contact>,
    /// Buddy requests that waited for this login.
    pub requests: Vec<BuddyRequest>,
    /// Profile fields.
    #[serde(default)]
    pub profile: Profile,
    /// The users this user blocks.
    #[serde(default)]
    pub blocked: Vec<String>,
    /// The user's own status, as kept at the CRS from an earlier login.
    #[serde(default)]
    pub status: Status,
    /// The user's own personal message, likewise.
    #[serde(default)]
    pub message: String,
    /// Offline messages or receipts wait for this user (the MS fetches
    /// them with `MAIL` and pushes them after the welcome).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mail: bool,
}

/// A welcome as the MS forwards it to the client: the CRS's JSON as the
/// CRS wrote it, and the two things the MS itself acts on read out of it
/// (who the contacts are, whether mail waits). Reading only those skips
/// decoding the keys and the rest of every contact on each login, and
/// writing the client's copy again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WelcomeForward {
    /// The contacts' names.
    pub contacts: Vec<String>,
    /// See [`Welcome::mail`].
    pub mail: bool,
    /// The whole welcome, JSON.
    pub body: Vec<u8>,
}

impl WelcomeForward {
    /// From a typed welcome (a CRS in the same process).
    pub fn of(welcome: &Welcome) -> WelcomeForward {
        WelcomeForward {
            contacts: welcome.contacts.iter().map(|c| c.user.clone()).collect(),
            mail: welcome.mail,
            body: json(welcome),
        }
    }

    /// From the CRS's reply body; a body that is not a welcome is refused
    /// here, as the typed reading would.
    pub fn read(m: &Message) -> Result<WelcomeForward, ProtoError> {
        #[derive(Deserialize)]
        struct Named {
            user: String,
        }
        #[derive(Deserialize)]
        struct Head {
            contacts: Vec<Named>,
            #[serde(default)]
            mail: bool,
            // Present in every welcome: checked so that a body that is
            // not one is refused, not forwarded.
            #[allow(dead_code)]
            user: String,
        }
        let head: Head = m.json()?;
        Ok(WelcomeForward {
            contacts: head.contacts.into_iter().map(|c| c.user).collect(),
            mail: head.mail,
            body: m.body.clone(),
        })
    }

    /// The reply that carries it to the client: the same message as
    /// [`json_reply`] of the typed welcome.
    pub fn to_message(&self) -> Message {
        Message::ok()
            .with_header("Content-Type", "application/json")
            .with_body(self.body.clone())
    }
}

/// `ONLINE` (see [`CrsRequest::Online`]) as the MS asks it: the same
/// request, its welcome read as a [`WelcomeForward`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnlineForward {
    /// The user logging in.
    pub user: String,
    /// Where the user's listener is (port 0: not reachable).
    pub address: SocketAddr,
}

impl Request for OnlineForward {
    /// The welcome and the login's number.
    type Reply = (WelcomeForward, u64);

    fn to_message(&self) -> Message {
        CrsRequest::Online {
            user: self.user.clone(),
            address: self.address,
        }
        .to_message()
    }

    fn read_reply(&self, m: &Message) -> Result<Answer<Self::Reply>, ProtoError> {
        match Refused::from_message(m) {
            Some(r) => Ok(Err(r)),
            None => Ok(Ok((WelcomeForward::read(m)?, m.req_parse("Login-Number")?))),
        }
    }
}

/// One directory search result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    /// The user's name.
    pub user: String,
    /// Their profile.
    pub profile: Profile,
    /// Whether they are online now.
    pub online: bool,
}

/// An enrolled MS as the operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsInfo {
    /// The id the CRS gave it.
    pub id: u64,
    /// Where clients reach it.
    pub address: String,
    /// Most users it takes.
    pub capacity: u32,
    /// Users logged in there now.
    pub load: u32,
    /// Seconds since its last heartbeat.
    pub last_heartbeat_secs: u64,
}

/// What happened, for the MSs serving the users who must hear of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EventKind {
    /// `user` logged in.
    Online {
        /// Who.
        user: String,
        /// Where and with which key.
        presence: Presence,
        /// Their status (`invisible`: shown offline, but reachable, to
        /// a buddy they wrote to).
        #[serde(default)]
        status: Status,
        /// Their personal message.
        #[serde(default)]
        message: String,
    },
    /// `user`, online and seen by the recipient, changed their status or
    /// personal message.
    Status {
        /// Who.
        user: String,
        /// The new status (never `invisible`: that is an `offline`).
        status: Status,
        /// The new personal message.
        #[serde(default)]
        message: String,
    },
    /// `user` logged out or was lost.
    Offline {
        /// Who.
        user: String,
    },
    /// A buddy request for the recipient.
    Request(BuddyRequest),
    /// `buddy` is now the recipient's buddy.
    BuddyAdded {
        /// The new buddy.
        buddy: String,
        /// Set while the buddy is online.
        online: Option<Presence>,
        /// The buddy's status while online.
        #[serde(default)]
        status: Status,
        /// The buddy's personal message while online.
        #[serde(default)]
        message: String,
    },
    /// `buddy` is no longer the recipient's buddy.
    BuddyRemoved {
        /// The former buddy.
        buddy: String,
    },
    /// `by` denied the recipient's buddy request.
    Denied {
        /// Who said no.
        by: String,
    },
    /// The recipient logged in again elsewhere after this login stopped
    /// answering: the MS drops it and tells the client if it can.
    Evicted {
        /// Who.
        user: String,
        /// The old login's number (the `Login-Number` of its `ONLINE`): a
        /// newer login of the same user may already be at the same MS.
        login: u64,
    },
    /// CRS → MS: offline messages or receipts wait for `user`, who is
    /// online there: fetch them (`MAIL`) and push them.
    MailWaiting {
        /// Whose.
        user: String,
    },
    /// MS → client (and in `MAIL` answers): a sealed offline message.
    Mail {
        /// Its number at the CRS (for paging; not the message id).
        seq: u64,
        /// The sealed blob (PROTOCOL.md §7, "Offline messages").
        #[serde(with = "b64_serde")]
        blob: Vec<u8>,
        /// The sender's public key as the CRS has it (DER).
        #[serde(with = "b64_serde")]
        public_key: Vec<u8>,
    },
    /// MS → client (and in `MAIL` answers): what became of an offline
    /// message the recipient sent.
    Receipt {
        /// Its number at the CRS.
        seq: u64,
        /// The message's recipient.
        to: String,
        /// The message id (hex).
        id: String,
        /// The sender's own number of the message.
        number: u64,
        /// `delivered` or `expired`.
        outcome: String,
    },
}

/// An event and the users, served by the receiving MS, who must hear it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Users on that MS to tell.
    pub recipients: Vec<String>,
    /// What happened.
    pub kind: EventKind,
}

/// A numbered batch answering `EVENTS`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    /// Number of the first event in `events`; the next poll acks
    /// `first + events.len() - 1`.
    pub first: u64,
    /// The events, in order.
    pub events: Vec<Event>,
}

/// A request a client sends the CRS in the clear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientRequest {
    /// Which MS should I log in at?
    Locate,
    /// The CRS's public key.
    CrsKey,
    /// A new account, encrypted to the CRS public key.
    Register {
        /// RSA-OAEP of the one-time AES key.
        key: Vec<u8>,
        /// AES-256-GCM of the JSON [`Registration`].
        sealed: Vec<u8>,
    },
}

impl ClientRequest {
    /// Encodes into a wire message.
    pub fn to_message(&self) -> Message {
        match self {
            ClientRequest::Locate => Message::request("LOCATE"),
            ClientRequest::CrsKey => Message::request("CRS-KEY"),
            ClientRequest::Register { key, sealed } => Message::request("REGISTER")
                .with_header("Key", crypto::b64_encode(key))
                .with_body(sealed.clone()),
        }
    }

    /// Decodes a wire message; `Ok(None)` for a method of another link.
    pub fn from_message(m: &Message) -> Result<Option<ClientRequest>, ProtoError> {
        Ok(Some(match m.method() {
            Some("LOCATE") => ClientRequest::Locate,
            Some("CRS-KEY") => ClientRequest::CrsKey,
            Some("REGISTER") => ClientRequest::Register {
                key: m.req_b64("Key")?,
                sealed: m.body.clone(),
            },
            _ => return Ok(None),
        }))
    }
}

/// Associated data of the registration envelope.
pub const REGISTER_AAD: &[u8] = b"ims register v1";

/// A request an enrolled MS (or the operator) sends on its sealed link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrsRequest {
    /// Still alive; `load` users logged in here.
    Heartbeat {
        /// Users online at this MS.
        load: u32,
    },
    /// The verifier of `user`, for a login from `source`: the CRS counts
    /// the attempt now, and refuses while that (name, source) must wait.
    GetVerifier {
        /// Who logs in.
        user: String,
        /// The address the login comes from.
        source: IpAddr,
    },
    /// Take the login lease of `user`.
    Lock {
        /// Who logs in.
        user: String,
    },
    /// Give the lease back (wrong password).
    Unlock {
        /// Who failed to log in.
        user: String,
    },
    /// `user`'s login succeeded; their client listens at `address`.
    Online {
        /// Who.
        user: String,
        /// The client's address.
        address: SocketAddr,
    },
    /// `user` logged out or was lost.
    Offline {
        /// Who.
        user: String,
    },
    /// `user` proved their password at this MS while marked online
    /// elsewhere, and their old client does not answer: end the old login.
    Takeover {
        /// Who.
        user: String,
    },
    /// New password.
    SetCredentials {
        /// Whose.
        user: String,
        /// The new verifier.
        verifier: Verifier,
        /// The private key re-wrapped under the new password.
        wrapped_key: Vec<u8>,
    },
    /// New profile.
    SetProfile {
        /// Whose.
        user: String,
        /// The fields.
        profile: Profile,
    },
    /// Directory search.
    Search {
        /// Name prefix or profile text.
        text: String,
        /// Most results.
        limit: u32,
    },
    /// A signed buddy request.
    Add {
        /// Who asks.
        from: String,
        /// Whom.
        to: String,
        /// Fresh nonce.
        nonce: Vec<u8>,
        /// RSA-PSS over [`super::add_transcript`].
        signature: Vec<u8>,
    },
    /// `user` accepts `from`'s request.
    Accept {
        /// Who accepts.
        user: String,
        /// Whose request.
        from: String,
    },
    /// `user` denies `from`'s request.
    Deny {
        /// Who denies.
        user: String,
        /// Whose request.
        from: String,
    },
    /// `user` blocks (`on`) or unblocks `who`: a blocked user's buddy
    /// requests are dropped and `user` looks offline to them.
    Block {
        /// Who blocks.
        user: String,
        /// Whom.
        who: String,
        /// Block (true) or unblock.
        on: bool,
    },
    /// `user` sets their status and personal message (kept; pushed to
    /// their buddies while they are online).
    SetStatus {
        /// Whose.
        user: String,
        /// The status and message.
        info: StatusInfo,
    },
    /// `user`, online and invisible, is about to write to their buddy
    /// `to`: `to` is told where `user` is (shown offline still), so that
    /// `to`'s client takes the session and can answer.
    Reveal {
        /// Who writes.
        user: String,
        /// To whom.
        to: String,
    },
    /// `user` drops `buddy` (both directions).
    Remove {
        /// Who.
        user: String,
        /// The buddy.
        buddy: String,
    },
    /// Long poll for events; acknowledges every event up to `ack`.
    Events {
        /// Last event number processed (0: none yet).
        ack: u64,
    },
    /// `user` wants `who`'s public key, to seal an offline message to
    /// them (buddies only).
    Key {
        /// Who asks.
        user: String,
        /// Whose key.
        who: String,
    },
    /// `user` files a sealed offline message (the body).
    Queue {
        /// The sender, as the MS authenticated them.
        user: String,
        /// The blob.
        blob: Vec<u8>,
    },
    /// Offline messages and receipts waiting for `user`, after `after`.
    Mail {
        /// Whose.
        user: String,
        /// The last number already fetched (0: from the start).
        after: u64,
    },
    /// `user`'s client acknowledges offline messages and receipts by id.
    MailAck {
        /// Who.
        user: String,
        /// Message ids (hex).
        ids: Vec<String>,
    },
    /// Operator: registered names after `after`.
    ListUsers {
        /// Start after this name.
        after: Option<String>,
        /// Most names.
        limit: u32,
    },
    /// Operator: one user's record.
    ShowUser {
        /// Who.
        user: String,
    },
    /// Operator: delete a user.
    DeleteUser {
        /// Who.
        user: String,
    },
    /// Operator: enrolled MSs.
    ListMs,
    /// The MS where `user` is logged in (for the relay).
    FindMs {
        /// Who.
        user: String,
    },
}

impl CrsRequest {
    /// Encodes into an inner wire message.
    pub fn to_message(&self) -> Message {
        use CrsRequest::*;
        match self {
            Heartbeat { load } => Message::request("HEARTBEAT").with_header("Load", load),
            GetVerifier { user, source } => Message::request("VERIFIER")
                .with_header("User", user)
                .with_header("Source", source),
            Lock { user } => Message::request("LOCK").with_header("User", user),
            Unlock { user } => Message::request("UNLOCK").with_header("User", user),
            Online { user, address } => Message::request("ONLINE")
                .with_header("User", user)
                .with_header("Address", address),
            Offline { user } => Message::request("OFFLINE").with_header("User", user),
            Takeover { user } => Message::request("TAKEOVER").with_header("User", user),
            SetCredentials {
                user,
                verifier,
                wrapped_key,
            } => verifier
                .write(Message::request("SET-CREDENTIALS").with_header("User", user))
                .with_header("Wrapped-Key", crypto::b64_encode(wrapped_key)),
            SetProfile { user, profile } => Message::request("SET-PROFILE")
                .with_header("User", user)
                .with_body(json(profile)),
            Search { text, limit } => Message::request("SEARCH")
                .with_header("Limit", limit)
                .with_body(text.as_bytes().to_vec()),
            Add {
                from,
                to,
                nonce,
                signature,
            } => Message::request("ADD")
                .with_header("From", from)
                .with_header("To", to)
                .with_header("Nonce", crypto::b64_encode(nonce))
                .with_header("Signature", crypto::b64_encode(signature)),
            Accept { user, from } => Message::request("ACCEPT")
                .with_header("User", user)
                .with_header("From", from),
            Deny { user, from } => Message::request("DENY")
                .with_header("User", user)
                .with_header("From", from),
            Remove { user, buddy } => Message::request("REMOVE")
                .with_header("User", user)
                .with_header("Buddy", buddy),
            Block { user, who, on } => Message::request("BLOCK")
                .with_header("User", user)
                .with_header("Who", who)
                .with_header("Block", if *on { "on" } else { "off" }),
            SetStatus { user, info } => Message::request("STATUS")
                .with_header("User", user)
                .with_header("Content-Type", "application/json")
                .with_body(json(info)),
            Reveal { user, to } => Message::request("REVEAL")
                .with_header("User", user)
                .with_header("To", to),
            Events { ack } => Message::request("EVENTS").with_header("Ack", ack),
            Key { user, who } => Message::request("KEY")
                .with_header("User", user)
                .with_header("Who", who),
            Queue { user, blob } => Message::request("QUEUE")
                .with_header("User", user)
                .with_header("Content-Type", "application/octet-stream")
                .with_body(blob.clone()),
            Mail { user, after } => Message::request("MAIL")
                .with_header("User", user)
                .with_header("After", after),
            MailAck { user, ids } => Message::request("MAIL-ACK")
                .with_header("User", user)
                .with_header("Content-Type", "application/json")
                .with_body(json(ids)),
            ListUsers { after, limit } => {
                let m = Message::request("LIST-USERS").with_header("Limit", limit);
                match after {
                    Some(a) => m.with_header("After", a),
                    None => m,
                }
            }
            ShowUser { user } => Message::request("SHOW-USER").with_header("User", user),
            DeleteUser { user } => Message::request("DELETE-USER").with_header("User", user),
            ListMs => Message::request("LIST-MS"),
            FindMs { user } => Message::request("FIND-MS").with_header("User", user),
        }
    }

    /// Decodes an inner wire message.
    pub fn from_message(m: &Message) -> Result<CrsRequest, ProtoError> {
        use CrsRequest::*;
        let user = || m.req("User").map(str::to_owned);
        Ok(
            match m.method().ok_or(ProtoError::UnknownMethod(String::new()))? {
                "HEARTBEAT" => Heartbeat {
                    load: m.req_parse("Load")?,
                },
                "VERIFIER" => GetVerifier {
                    user: user()?,
                    source: m.req_parse("Source")?,
                },
                "LOCK" => Lock { user: user()? },
                "UNLOCK" => Unlock { user: user()? },
                "ONLINE" => Online {
                    user: user()?,
                    address: m.req_parse("Address")?,
                },
                "OFFLINE" => Offline { user: user()? },
                "TAKEOVER" => Takeover { user: user()? },
                "SET-CREDENTIALS" => SetCredentials {
                    user: user()?,
                    verifier: Verifier::read(m)?,
                    wrapped_key: m.req_b64("Wrapped-Key")?,
                },
                "SET-PROFILE" => SetProfile {
                    user: user()?,
                    profile: m.json()?,
                },
                "SEARCH" => Search {
                    text: String::from_utf8(m.body.clone())
                        .map_err(|_| ProtoError::Invalid("body"))?,
                    limit: m.req_parse("Limit")?,
                },
                "ADD" => Add {
                    from: m.req("From")?.to_owned(),
                    to: m.req("To")?.to_owned(),
                    nonce: m.req_b64("Nonce")?,
                    signature: m.req_b64("Signature")?,
                },
                "ACCEPT" => Accept {
                    user: user()?,
                    from: m.req("From")?.to_owned(),
                },
                "DENY" => Deny {
                    user: user()?,
                    from: m.req("From")?.to_owned(),
                },
                "REMOVE" => Remove {
                    user: user()?,
                    buddy: m.req("Buddy")?.to_owned(),
                },
                "BLOCK" => Block {
                    user: user()?,
                    who: m.req("Who")?.to_owned(),
                    on: match m.req("Block")? {
                        "on" => true,
                        "off" => false,
                        _ => return Err(ProtoError::Invalid("Block")),
                    },
                },
                "STATUS" => SetStatus {
                    user: user()?,
                    info: m.json::<StatusInfo>()?.checked()?,
                },
                "REVEAL" => Reveal {
                    user: user()?,
                    to: m.req("To")?.to_owned(),
                },
                "EVENTS" => Events {
                    ack: m.req_parse("Ack")?,
                },
                "KEY" => Key {
                    user: user()?,
                    who: m.req("Who")?.to_owned(),
                },
                "QUEUE" => Queue {
                    user: user()?,
                    blob: m.body.clone(),
                },
                "MAIL" => Mail {
                    user: user()?,
                    after: m.req_parse("After")?,
                },
                "MAIL-ACK" => MailAck {
                    user: user()?,
                    ids: m.json()?,
                },
                "LIST-USERS" => ListUsers {
                    after: m.header("After").map(str::to_owned),
                    limit: m.req_parse("Limit")?,
                },
                "SHOW-USER" => ShowUser { user: user()? },
                "DELETE-USER" => DeleteUser { user: user()? },
                "LIST-MS" => ListMs,
                "FIND-MS" => FindMs { user: user()? },
                other => return Err(ProtoError::UnknownMethod(other.to_owned())),
            },
        )
    }
}

/// The CRS's answer to a [`ClientRequest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientReply {
    /// `LOCATE`: the MS to log in at (`Ms` header).
    Ms(String),
    /// `CRS-KEY`: the CRS's public key, DER in the body, and its fingerprint.
    CrsKey {
        /// `Fingerprint` header.
        fingerprint: String,
        /// The key, DER.
        der: Vec<u8>,
    },
    /// `REGISTER`: the account exists.
    Registered,
}

impl ClientReply {
    /// As a `200` reply.
    pub fn to_message(&self) -> Message {
        match self {
            ClientReply::Ms(ms) => Message::ok().with_header("Ms", ms),
            ClientReply::CrsKey { fingerprint, der } => Message::ok()
                .with_header("Fingerprint", fingerprint)
                .with_body(der.clone()),
            ClientReply::Registered => Message::ok(),
        }
    }
}

impl Request for ClientRequest {
    type Reply = ClientReply;

    fn to_message(&self) -> Message {
        ClientRequest::to_message(self)
    }

    fn read_reply(&self, m: &Message) -> Result<Answer<ClientReply>, ProtoError> {
        if let Some(r) = Refused::from_message(m) {
            return Ok(Err(r));
        }
        m.code().ok_or(ProtoError::NotAReply)?;
        Ok(Ok(match self {
            ClientRequest::Locate => ClientReply::Ms(m.req("Ms")?.to_owned()),
            ClientRequest::CrsKey => ClientReply::CrsKey {
                fingerprint: m.req("Fingerprint")?.to_owned(),
                der: m.body.clone(),
            },
            ClientRequest::Register { .. } => ClientReply::Registered,
        }))
    }
}

/// What the operator sees of one user (`SHOW-USER`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    /// The name.
    pub user: String,
    /// Profile fields.
    pub profile: Profile,
    /// Buddies.
    pub contacts: Vec<String>,
    /// Names whose buddy requests wait.
    pub requests_from: Vec<String>,
    /// SHA-256 fingerprint of the public key.
    pub public_key_fingerprint: String,
    /// The client's address while online.
    pub online: Option<String>,
    /// When the account was made (seconds since the Unix epoch).
    pub created_unix: u64,
}

/// The CRS's answer to a [`CrsRequest`]; which variant depends on the
/// request (see [`CrsRequest::read_reply`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrsReply {
    /// `200`, nothing more.
    Done,
    /// `202`: a buddy request stored until its target logs in.
    Stored,
    /// `VERIFIER`: the verifier in headers.
    Verifier(Verifier),
    /// `ONLINE`: the user's record, and the number of this login
    /// (`Login-Number`, named again in an eviction).
    Welcome {
        /// The record.
        welcome: Welcome,
        /// The login's number.
        login: u64,
    },
    /// `SEARCH`.
    Hits(Vec<Hit>),
    /// `ACCEPT`: the new buddy.
    Contact(Contact),
    /// `EVENTS`.
    Events(EventBatch),
    /// `LIST-USERS`.
    Users(Vec<String>),
    /// `SHOW-USER`.
    User(Box<UserView>),
    /// `LIST-MS`.
    MsList(Vec<MsInfo>),
    /// `FIND-MS`: the MS's address (where clients reach it).
    MsAddress(String),
    /// `KEY`: a public key (DER).
    Key(Vec<u8>),
    /// `MAIL`: offline messages and receipts, in order (`Mail` and
    /// `Receipt` events).
    Mail(Vec<EventKind>),
}

impl CrsReply {
    /// As a success reply.
    pub fn to_message(&self) -> Message {
        match self {
            CrsReply::Done => Message::ok(),
            CrsReply::Stored => Message::reply(code::STORED, "stored until they log in"),
            CrsReply::Verifier(v) => v.write(Message::ok()),
            CrsReply::Welcome { welcome, login } => {
                json_reply(welcome).with_header("Login-Number", login)
            }
            CrsReply::Hits(h) => json_reply(h),
            CrsReply::Contact(c) => json_reply(c),
            CrsReply::Events(e) => json_reply(e),
            CrsReply::Users(u) => json_reply(u),
            CrsReply::User(u) => json_reply(u),
            CrsReply::MsList(l) => json_reply(l),
            CrsReply::MsAddress(a) => Message::ok().with_header("Ms", a),
            CrsReply::Key(der) => Message::ok()
                .with_header("Content-Type", "application/octet-stream")
                .with_body(der.clone()),
            CrsReply::Mail(items) => json_reply(items),
        }
    }
}

impl Request for CrsRequest {
    type Reply = CrsReply;

    fn to_message(&self) -> Message {
        CrsRequest::to_message(self)
    }

    fn read_reply(&self, m: &Message) -> Result<Answer<CrsReply>, ProtoError> {
        use CrsRequest::*;
        fn map<T>(
            a: Result<Answer<T>, ProtoError>,
            f: impl FnOnce(T) -> CrsReply,
        ) -> Result<Answer<CrsReply>, ProtoError> {
            a.map(|a| a.map(f))
        }
        match self {
            Heartbeat { .. }
            | Lock { .. }
            | Unlock { .. }
            | Offline { .. }
            | Takeover { .. }
            | SetCredentials { .. }
            | SetProfile { .. }
            | Deny { .. }
            | Remove { .. }
            | Block { .. }
            | SetStatus { .. }
            | Reveal { .. }
            | Queue { .. }
            | MailAck { .. }
            | DeleteUser { .. } => map(done_answer(m), |()| CrsReply::Done),
            Key { .. } => map(done_answer(m), |()| CrsReply::Key(m.body.clone())),
            Mail { .. } => map(json_answer(m), CrsReply::Mail),
            Add { .. } => map(done_answer(m), |()| {
                if m.code() == Some(code::STORED) {
                    CrsReply::Stored
                } else {
                    CrsReply::Done
                }
            }),
            GetVerifier { .. } => match Refused::from_message(m) {
                Some(r) => Ok(Err(r)),
                None => Verifier::read(m).map(|v| Ok(CrsReply::Verifier(v))),
            },
            Online { .. } => match Refused::from_message(m) {
                Some(r) => Ok(Err(r)),
                None => Ok(Ok(CrsReply::Welcome {
                    welcome: m.json()?,
                    login: m.req_parse("Login-Number")?,
                })),
            },
            Search { .. } => map(json_answer(m), CrsReply::Hits),
            Accept { .. } => map(json_answer(m), CrsReply::Contact),
            Events { .. } => map(json_answer(m), CrsReply::Events),
            ListUsers { .. } => map(json_answer(m), CrsReply::Users),
            ShowUser { .. } => map(json_answer(m), |u| CrsReply::User(Box::new(u))),
            ListMs => map(json_answer(m), CrsReply::MsList),
            FindMs { .. } => match Refused::from_message(m) {
                Some(r) => Ok(Err(r)),
                None => Ok(Ok(CrsReply::MsAddress(m.req("Ms")?.to_owned()))),
            },
        }
    }
}

/// A `200` reply with a JSON body.
pub fn json_reply<T: Serialize>(value: &T) -> Message {
    Message::ok()
        .with_header("Content-Type", "application/json")
        .with_body(json(value))
}

/// JSON encoding of our own types cannot fail (no maps with non-string keys).
pub(crate) fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(r: CrsRequest) {
        let m = r.to_message();
        let bytes = m.encode();
        let parsed = match crate::wire::parse(&bytes, &crate::wire::Limits::DEFAULT) {
            Ok(crate::wire::Status::Complete { message, .. }) => message,
            other => panic!("{other:?}"),
        };
        assert_eq!(CrsRequest::from_message(&parsed).unwrap(), r);
    }

    #[test]
    fn requests_round_trip() {
        let v = Verifier {
            salt: vec![1; 16],
            iterations: 600_000,
            stored_key: vec![2; 32],
            server_key: vec![3; 32],
        };
        round(CrsRequest::Heartbeat { load: 7 });
        round(CrsRequest::SetStatus {
            user: "joe".into(),
            info: StatusInfo {
                status: Status::Away,
                message: "at lunch ☕".into(),
            },
        });
        round(CrsRequest::Reveal {
            user: "joe".into(),
            to: "ann".into(),
        });
        round(CrsRequest::GetVerifier {
            user: "joe".into(),
            source: "10.1.2.3".parse().unwrap(),
        });
        round(CrsRequest::Online {
            user: "joe".into(),
            address: "127.0.0.1:7300".parse().unwrap(),
        });
        round(CrsRequest::SetCredentials {
            user: "joe".into(),
            verifier: v,
            wrapped_key: vec![9; 40],
        });
        let mut p = Profile::new();
        p.insert("name".into(), "Jöe Q".into());
        round(CrsRequest::SetProfile {
            user: "joe".into(),
            profile: p,
        });
        round(CrsRequest::Search {
            text: "al ice".into(),
            limit: 20,
        });
        round(CrsRequest::Add {
            from: "joe".into(),
            to: "alice".into(),
            nonce: vec![1, 2],
            signature: vec![3, 4],
        });
        round(CrsRequest::ListUsers {
            after: None,
            limit: 5,
        });
        round(CrsRequest::ListUsers {
            after: Some("b".into()),
            limit: 5,
        });
        round(CrsRequest::Events { ack: 12 });
    }

    #[test]
    fn missing_and_unknown() {
        let m = Message::request("LOCK");
        assert_eq!(
            CrsRequest::from_message(&m),
            Err(ProtoError::Missing("User"))
        );
        let m = Message::request("FROB");
        assert!(matches!(
            CrsRequest::from_message(&m),
            Err(ProtoError::UnknownMethod(_))
        ));
        let m = Message::request("HEARTBEAT").with_header("Load", "x");
        assert_eq!(
            CrsRequest::from_message(&m),
            Err(ProtoError::Invalid("Load"))
        );
    }

    #[test]
    fn a_forwarded_welcome_is_the_typed_one_byte_for_byte() {
        let welcome = Welcome {
            user: "alice".into(),
            public_key: vec![1, 2, 3],
            wrapped_key: vec![4; 40],
            contacts: vec![
                Contact {
                    user: "bob".into(),
                    online: Some(Presence {
                        address: "10.0.0.2:7000".parse().unwrap(),
                        public_key: vec![9; 20],
                    }),
                    status: Status::Away,
                    message: "out \"to\" lunch".into(),
                },
                Contact {
                    user: "carol".into(),
                    online: None,
                    status: Status::default(),
                    message: String::new(),
                },
            ],
            requests: vec![],
            profile: Profile::new(),
            blocked: vec!["mallory".into()],
            status: Status::default(),
            message: "hi".into(),
            mail: true,
        };
        let reply = CrsReply::Welcome {
            welcome: welcome.clone(),
            login: 7,
        }
        .to_message();
        let req = OnlineForward {
            user: "alice".into(),
            address: "10.0.0.1:7000".parse().unwrap(),
        };
        let (fwd, login) = req.read_reply(&reply).unwrap().unwrap();
        assert_eq!(login, 7);
        assert_eq!(fwd.contacts, ["bob", "carol"]);
        assert!(fwd.mail);
        assert_eq!(fwd, WelcomeForward::of(&welcome));
        assert_eq!(fwd.to_message(), json_reply(&welcome));
        // The client reads the typed welcome back from it.
        let back: Welcome = fwd.to_message().json().unwrap();
        assert_eq!(back, welcome);
        // Same request on the wire as the typed one.
        assert_eq!(
            req.to_message(),
            CrsRequest::Online {
                user: "alice".into(),
                address: "10.0.0.1:7000".parse().unwrap(),
            }
            .to_message()
        );
        // Not a welcome, or a refusal.
        let junk = Message::ok()
            .with_header("Content-Type", "application/json")
            .with_header("Login-Number", 1)
            .with_body(b"{\"contacts\":[]}".to_vec());
        assert!(req.read_reply(&junk).is_err());
        let refused = Refused::new(crate::proto::Refusal::NoSuchUser, "no such user").to_message();
        assert!(matches!(req.read_reply(&refused), Ok(Err(_))));
    }
}
