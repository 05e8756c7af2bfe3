//! The client: registration, login, buddies and presence, and the
//! pre-threaded listener that takes its MS's pushes (and, later, peers).
//! [`ui`] puts a full-screen, a line-based or a JSON interface on top.

pub mod account;
pub mod error;
pub mod events;
pub mod files;
pub mod handshake;
pub mod history;
pub mod offline;
pub mod peer;
pub mod relay;
pub mod session;
pub mod status;
pub mod trust;
pub mod typing;
pub mod ui;

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, info, warn};
use parking_lot::Mutex;

use crate::crypto::{self, KdfPolicy};
use crate::link::Conn;
use crate::prethread::{self, Outcome, Peer, Server, Service};
use crate::proto::crs::{EventKind, Hit, Profile};
use crate::proto::ms::{read_event, MsReply, MsRequest, PUSH};
use crate::proto::peer::{CONFIRM, INIT, PEER};
use crate::proto::relay::RELAY;
use crate::proto::status::{Status, StatusInfo};
use crate::proto::{Refusal, Refused};
use crate::wire::{Limits, Message};
use account::NewAccount;
use error::ClientError;
use events::{BuddyView, Event};
use session::{request_is_genuine, Credentials, Session, State};

/// The well-known port of the client's listener (one client per host, as
/// the design has it); tests and several clients on one host use port 0.
pub const DEFAULT_CLIENT_PORT: u16 = 7300;

/// Default of [`ClientConfig::rekey_messages`]: a busy conversation
/// crosses it several times a day, an idle one never.
pub const DEFAULT_REKEY_MESSAGES: u64 = 500;
/// Default of [`ClientConfig::rekey_interval`]: a day of conversation spans
/// several.
pub const DEFAULT_REKEY_INTERVAL: Duration = Duration::from_secs(3600);

/// Default of [`ClientConfig::auto_away`]: ten minutes away from the
/// keyboard, as other messengers have it.
pub const DEFAULT_AUTO_AWAY: Duration = Duration::from_secs(600);

/// Everything the client needs.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The CRS's address.
    pub crs: String,
    /// Where our listener binds.
    pub listen: String,
    /// The port buddies and the MS should connect to, when a router or
    /// proxy forwards another port to our listener (default: the bound one).
    pub advertise_port: Option<u16>,
    /// PBKDF2 iterations for new passwords.
    pub kdf_iterations: u32,
    /// Allow fewer iterations than the production minimum (tests, benchmarks).
    pub insecure_kdf: bool,
    /// RSA key size for new accounts.
    pub rsa_bits: u32,
    /// Expected fingerprint of the CRS's key (refuse to register elsewhere).
    pub crs_fingerprint: Option<String>,
    /// Bound on each exchange with a server.
    pub timeout: Duration,
    /// How long a sent message may wait for its acknowledgement.
    pub ack_timeout: Duration,
    /// Where received files go.
    pub download_dir: PathBuf,
    /// Where each account's remembered buddy keys live (a directory per
    /// account).
    pub state_dir: PathBuf,
    /// Accept every file a buddy offers without asking.
    pub auto_accept_files: bool,
    /// How long the received prefix of a broken-off transfer is kept for
    /// a resumption before it is deleted.
    pub resume_keep: Duration,
    /// Tell the buddy of the current conversation when we type (and
    /// allow `/typing`).
    pub typing_notifications: bool,
    /// How often a logged-in client tells its MS it is alive; the MS logs
    /// out a client silent for a few of these.
    pub keepalive_interval: Duration,
    /// The listener's worker pool.
    pub pool: prethread::Config,
    /// Re-key a conversation after this many messages (sent and received)
    /// under one key; 0: only by time.
    pub rekey_messages: u64,
    /// Re-key a conversation whose keys are this old (at its next message).
    pub rekey_interval: Duration,
    /// How long to try a buddy's listener before going through the relay.
    pub direct_connect_timeout: Duration,
    /// Set `away` after this long without input while `available`
    /// (zero: never).
    pub auto_away: Duration,
}

/// Default of [`ClientConfig::direct_connect_timeout`]: a listener that
/// answers at all answers well within it; one behind a router that drops
/// the attempt costs this once per buddy and login.
pub const DEFAULT_DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The user's download directory: `$XDG_DOWNLOAD_DIR`, `~/Downloads`, or
/// the current directory.
pub fn default_download_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DOWNLOAD_DIR") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join("Downloads"),
        None => PathBuf::from("."),
    }
}

/// The client's state directory: `$XDG_STATE_HOME/ims`,
/// `~/.local/state/ims`, or `.ims-state` in the current directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("ims");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/ims"),
        None => PathBuf::from(".ims-state"),
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            crs: "127.0.0.1:7100".into(),
            listen: format!("0.0.0.0:{DEFAULT_CLIENT_PORT}"),
            advertise_port: None,
            kdf_iterations: crypto::PBKDF2_MIN_ITERATIONS,
            insecure_kdf: false,
            rsa_bits: crypto::DEFAULT_RSA_BITS,
            crs_fingerprint: None,
            timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(10),
            download_dir: default_download_dir(),
            state_dir: default_state_dir(),
            auto_accept_files: false,
            resume_keep: Duration::from_secs(24 * 3600),
            typing_notifications: true,
            keepalive_interval: Duration::from_secs(5),
            rekey_messages: DEFAULT_REKEY_MESSAGES,
            rekey_interval: DEFAULT_REKEY_INTERVAL,
            direct_connect_timeout: DEFAULT_DIRECT_CONNECT_TIMEOUT,
            auto_away: DEFAULT_AUTO_AWAY,
            pool: prethread::Config {
                name: "client".into(),
                workers: 4,
                ..prethread::Config::default()
            },
        }
    }
}

impl ClientConfig {
    fn policy(&self) -> KdfPolicy {
        if self.insecure_kdf {
            KdfPolicy::Insecure
        } else {
            KdfPolicy::Production
        }
    }
}

/// Connects to `addr` within `timeout` (peer links).
pub use crate::link::connect;

/// A running client.
pub struct Client {
    config: ClientConfig,
    listen_port: u16,
    /// Logged out, logging in, or logged in.
    state: Mutex<State>,
    /// Each user's salt and iteration count at their last login here.
    known_kdf: Mutex<std::collections::HashMap<String, crypto::KdfParams>>,
    /// The MS of the last login through this client: the next login goes
    /// there first (see [`Credentials::last_ms`]).
    last_ms: Mutex<Option<String>>,
    /// The logged-in (or last) user's remembered buddy keys.
    keys: Mutex<Option<(String, trust::KeyBook)>>,
    /// The logged-in user's history, if it opened.
    history: Mutex<Option<history::History>>,
    /// The logged-in user's seen offline-message ids and acknowledgements.
    mailbox: Mutex<Option<offline::Mailbox>>,
    /// Serializes requests to the MS so their sequence numbers stay in order.
    calls: Mutex<()>,
    events: Sender<Event>,
    /// Shows an event at once, in the caller's thread, when the interface
    /// can (line modes): an offline message is printed right before its id
    /// is remembered, with no thread hand-over in between (see
    /// `offline.rs`).
    show_now: Mutex<Option<ShowNow>>,
    peers: peer::Peers,
    files: files::Files,
    typing: typing::Typing,
    away: status::Away,
    next_id: AtomicU64,
    /// Whom we last wrote to or heard from: plain lines go there.
    last_peer: Mutex<Option<String>>,
    /// Signalled when `state` changes: a login ends (installed or
    /// failed), the buddy list or a buddy's presence changes.
    changed: parking_lot::Condvar,
    /// The login's connection to our MS while logged in.
    held: Mutex<Option<Held>>,
    /// Numbers held connections, so that news of an old one is ignored.
    held_seq: AtomicU64,
    /// Pushes and ends of held connections, from their reader threads to
    /// the thread that applies them.
    from_ms: (Sender<FromMs>, Receiver<FromMs>),
    /// Connections to buddies relayed through our MS, and how each buddy
    /// is reached.
    relays: relay::Relays,
    /// Where our listener is bound (a relayed connection from a buddy
    /// becomes a connection to it).
    listener_addr: Mutex<Option<SocketAddr>>,
}

/// The held connection to our MS: requests and keepalives are written on
/// it, their replies come back through `replies` from its reader thread.
struct Held {
    id: u64,
    stream: Arc<TcpStream>,
    replies: Receiver<Message>,
    /// Held while one message is written: requests and relay frames
    /// from several threads never interleave.
    writing: Arc<Mutex<()>>,
}

/// What a held connection's reader thread passes on.
enum FromMs {
    /// A push (a `PUSH` message) on connection `id`.
    Push(u64, Message),
    /// A relay frame (`RELAY`) on connection `id`.
    Relay(u64, Message),
    /// Connection `id` closed or failed.
    Lost(u64),
}

/// Replies that may wait for their caller on a held connection; one
/// request is outstanding at a time, so more means a confused MS.
const HELD_REPLIES: usize = 4;

/// How long the reader of a held connection waits for one message; the
/// MS's keepalive replies come far more often, so this only bounds a
/// connection that is open but dead without a close.
const HELD_READ_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A reply that does not fit its request.
fn unexpected(reply: &MsReply) -> ClientError {
    ClientError::UnexpectedReply(format!(
        "unexpected reply from the messaging server: {reply:?}"
    ))
}

/// The buddy list of a session as shown to people, with how each
/// online buddy we talked to is reached.
fn buddy_views(s: &Session, relays: &relay::Relays) -> Vec<BuddyView> {
    s.buddies
        .iter()
        .map(|(u, p)| {
            let (online, status, message) = status::shown(p.is_some(), s.buddy_status.get(u));
            BuddyView {
                user: u.clone(),
                online,
                status,
                message,
                via: p.as_ref().and_then(|_| relays.known_route(u)),
            }
        })
        .collect()
}

/// The client and its listener.
pub struct Running {
    /// The client.
    pub client: Arc<Client>,
    server: Server,
    /// Dropped with `Running`: the timer threads end.
    _stop: Sender<()>,
}

impl Running {
    /// Where the listener listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Logs out (if logged in) and stops the listener.
    pub fn shutdown(self) {
        if self.client.is_logged_in() {
            self.client.logout();
        }
        self.server.stop_and_join();
    }
}

/// Starts the listener; events go to `events`.
pub fn start(config: ClientConfig, events: Sender<Event>) -> std::io::Result<Running> {
    let listener = std::net::TcpListener::bind(config.listen.as_str())?;
    let listen_port = config
        .advertise_port
        .unwrap_or(listener.local_addr()?.port());
    let client = Arc::new(Client::new(config.clone(), listen_port, events));
    *client.listener_addr.lock() = Some(listener.local_addr()?);
    let server = Server::from_listener(
        listener,
        config.pool.clone(),
        Arc::new(Listener(client.clone())),
    )?;
    info!("client listening on {}", server.local_addr());
    // The timers: each sleeps until its next deadline or until `stop`
    // says the client is going (its sender drops with `Running`).
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let (weak, until) = (Arc::downgrade(&client), stopped.clone());
    std::thread::Builder::new()
        .name("client-acks".into())
        .spawn(move || {
            // Fails messages whose acknowledgement is overdue, and erases
            // retired session keys (at least every second).
            while let Some(c) = weak.upgrade() {
                c.expire_pending();
                c.peers.tidy();
                // A request sent from now on is due no earlier than this.
                let latest = Instant::now() + c.config.ack_timeout.min(Duration::from_secs(1));
                let next = c
                    .peers
                    .pending
                    .lock()
                    .values()
                    .map(|p| p.deadline)
                    .min()
                    .map_or(latest, |d| d.min(latest));
                drop(c);
                if !matches!(until.recv_deadline(next), Err(RecvTimeoutError::Timeout)) {
                    return;
                }
            }
        })?;
    let (weak, until, news) = (
        Arc::downgrade(&client),
        stopped.clone(),
        client.from_ms.1.clone(),
    );
    std::thread::Builder::new()
        .name("client-pushes".into())
        .spawn(move || loop {
            crossbeam_channel::select! {
                recv(news) -> n => match (n, weak.upgrade()) {
                    (Ok(n), Some(c)) => c.on_ms_news(n),
                    _ => return,
                },
                recv(until) -> _ => return,
            }
        })?;
    if !config.auto_away.is_zero() {
        let (weak, until) = (Arc::downgrade(&client), stopped.clone());
        std::thread::Builder::new()
            .name("client-away".into())
            .spawn(move || {
                while let Some(c) = weak.upgrade() {
                    c.auto_away_tick();
                    let next = Instant::now() + c.config.auto_away.min(status::AWAY_TICK);
                    drop(c);
                    if !matches!(until.recv_deadline(next), Err(RecvTimeoutError::Timeout)) {
                        return;
                    }
                }
            })?;
    }
    let weak = Arc::downgrade(&client);
    std::thread::Builder::new()
        .name("client-keepalive".into())
        .spawn(move || {
            let mut failures = 0u32;
            while let Some(c) = weak.upgrade() {
                let next = Instant::now() + c.config.keepalive_interval;
                failures = c.keepalive(failures);
                c.flush_mail_acks();
                drop(c);
                if !matches!(stopped.recv_deadline(next), Err(RecvTimeoutError::Timeout)) {
                    return;
                }
            }
        })?;
    Ok(Running {
        client,
        server,
        _stop: stop,
    })
}

impl Client {
    /// A client whose listener (if any) is at `listen_port`.
    pub fn new(config: ClientConfig, listen_port: u16, events: Sender<Event>) -> Client {
        Client {
            config,
            listen_port,
            state: Mutex::new(State::LoggedOut),
            known_kdf: Mutex::new(std::collections::HashMap::new()),
            last_ms: Mutex::new(None),
            keys: Mutex::new(None),
            history: Mutex::new(None),
            mailbox: Mutex::new(None),
            calls: Mutex::new(()),
            events,
            show_now: Mutex::new(None),
            peers: peer::Peers::default(),
            files: files::Files::default(),
            typing: typing::Typing::default(),
            away: status::Away::default(),
            next_id: AtomicU64::new(1),
            last_peer: Mutex::new(None),
            changed: parking_lot::Condvar::new(),
            held: Mutex::new(None),
            held_seq: AtomicU64::new(1),
            from_ms: crossbeam_channel::unbounded(),
            relays: relay::Relays::default(),
            listener_addr: Mutex::new(None),
        }
    }

    /// Whether typing notifications are on (`typing_notifications`).
    pub fn typing_enabled(&self) -> bool {
        self.config.typing_notifications
    }

    /// Whom we last wrote to or heard from.
    pub fn last_peer(&self) -> Option<String> {
        self.last_peer.lock().clone()
    }

    /// Notes whom we are talking to.
    fn set_last_peer(&self, peer: &str) {
        *self.last_peer.lock() = Some(peer.to_owned());
    }

    /// A fresh id for a message or transfer.
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `peer` has a file offer waiting for our answer.
    pub fn has_file_offer_from(&self, peer: &str) -> bool {
        self.files.has_offer_from(&peer.to_ascii_lowercase())
    }

    fn emit(&self, e: Event) {
        self.record(&e);
        if self.events.send(e).is_err() {
            // The receiver goes away only when the interface is exiting.
            debug!("event dropped: the interface is gone");
        }
    }

    /// Lets the client show events at once through `show` (which prints
    /// and flushes, or says `false`) where showing and remembering must
    /// follow each other closely.
    pub fn show_directly(&self, show: ShowNow) {
        *self.show_now.lock() = Some(show);
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Whether a login is active.
    pub fn is_logged_in(&self) -> bool {
        self.state.lock().session().is_some()
    }

    /// Our name, if logged in.
    pub fn user(&self) -> Option<String> {
        self.state.lock().session().map(|s| s.user.clone())
    }

    /// The address of our MS, if logged in.
    pub fn ms_addr(&self) -> Option<String> {
        self.state.lock().session().map(|s| s.ms.clone())
    }

    /// Creates an account.
    pub fn register(
        &self,
        user: &str,
        password: &str,
        profile: Profile,
    ) -> Result<String, ClientError> {
        account::register(&NewAccount {
            crs: &self.config.crs,
            user,
            password,
            iterations: self.config.kdf_iterations,
            policy: self.config.policy(),
            rsa_bits: self.config.rsa_bits,
            crs_fingerprint: self.config.crs_fingerprint.as_deref(),
            profile,
            timeout: self.config.timeout,
        })
    }

    /// Logs in; the login, the buddy list and waiting requests are emitted.
    pub fn login(&self, user: &str, password: &str) -> Result<(), ClientError> {
        {
            let mut state = self.state.lock();
            match &*state {
                State::LoggedIn(s) => return Err(ClientError::AlreadyLoggedIn(s.user.clone())),
                State::LoggingIn => return Err(ClientError::LoginUnderWay),
                State::LoggedOut => *state = State::LoggingIn,
            }
        }
        // The remembered buddy keys first: a login that could not check
        // them must not talk to anyone.
        if let Ok(name) = account::normalize_name(user) {
            let mut keys = self.keys.lock();
            if keys.as_ref().map(|(u, _)| u) != Some(&name) {
                match trust::KeyBook::open(&self.config.state_dir, &name) {
                    Ok(book) => *keys = Some((name, book)),
                    Err(e) => {
                        *keys = None;
                        *self.state.lock() = State::LoggedOut;
                        self.changed.notify_all();
                        return Err(e.into());
                    }
                }
            }
        }
        let notice = |text: String| self.emit(Event::Notice { text });
        let known = account::normalize_name(user)
            .ok()
            .and_then(|u| self.known_kdf.lock().get(&u).cloned());
        let last_ms = self.last_ms.lock().clone();
        let result = Session::login_held(&Credentials {
            crs: &self.config.crs,
            user,
            password,
            policy: self.config.policy(),
            listen_port: self.listen_port,
            timeout: self.config.timeout,
            usual_iterations: self.config.kdf_iterations,
            known: known.as_ref(),
            notice: &notice,
            last_ms: last_ms.as_deref(),
        });
        let mut guard = self.state.lock();
        let session = match result.and_then(|(s, conn)| {
            self.hold(conn)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                *guard = State::LoggedOut;
                self.changed.notify_all();
                return Err(e);
            }
        };
        let user = session.user.clone();
        self.known_kdf
            .lock()
            .insert(user.clone(), session.kdf.clone());
        *self.last_ms.lock() = Some(session.ms.clone());
        let history = history::History::open(&self.config.state_dir, &user, session.history_key);
        let requests: Vec<String> = session.requests.keys().cloned().collect();
        let buddies = buddy_views(&session, &self.relays);
        let kept = session.status.clone();
        *guard = State::LoggedIn(Box::new(session));
        self.idle_restart();
        // Pushes that raced the end of the login wait for this, so they
        // are never lost and print after these.
        match history {
            Ok(h) => *self.history.lock() = Some(h),
            Err(e) => {
                *self.history.lock() = None;
                self.emit(Event::Notice {
                    text: format!("{e}; nothing is recorded in this login"),
                });
            }
        }
        self.open_mailbox(&user);
        self.emit(Event::LoggedIn { user });
        if kept != StatusInfo::default() {
            self.emit(Event::Notice {
                text: status::kept_text(&kept),
            });
        }
        self.emit(Event::Buddies { buddies });
        for from in requests {
            self.emit(Event::Request { from });
        }
        self.changed.notify_all();
        drop(guard);
        Ok(())
    }

    /// The buddy list with presence.
    pub fn buddies(&self) -> Vec<BuddyView> {
        self.state
            .lock()
            .session()
            .map(|s| buddy_views(s, &self.relays))
            .unwrap_or_default()
    }

    /// Names with a buddy request waiting for our answer.
    pub fn pending_requests(&self) -> Vec<String> {
        self.state
            .lock()
            .session()
            .map(|s| s.requests.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Our profile as of login (and our own changes since).
    pub fn profile(&self) -> Option<Profile> {
        self.state.lock().session().map(|s| s.profile.clone())
    }

    /// Starts reading a login's held connection: replies go to whoever
    /// waits in [`Client::ms_call`], pushes and the end to the thread
    /// started by [`start`].
    fn hold(&self, conn: Conn) -> Result<(), ClientError> {
        let mut reader = conn.into_reader();
        let stream = Arc::new(
            reader
                .get_ref()
                .try_clone()
                .map_err(|e| ClientError::Io(crate::link::LinkError::Io(e.into())))?,
        );
        let id = self.held_seq.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, replies) = crossbeam_channel::bounded(HELD_REPLIES);
        let to_client = self.from_ms.0.clone();
        // Known before its reader starts: pushes right after the welcome
        // (offline messages) must not look like news of an old connection.
        *self.held.lock() = Some(Held {
            id,
            stream,
            replies,
            writing: Arc::default(),
        });
        let started = std::thread::Builder::new()
            .name("client-ms".into())
            .spawn(move || loop {
                let read = reader.read_message(&Limits::DEFAULT, Instant::now() + HELD_READ_WAIT);
                match read {
                    // Sealed replies are request-form too (`SEALED`): a
                    // push is told apart by its method.
                    Ok(Some(m)) if m.method() == Some(PUSH) => {
                        if to_client.send(FromMs::Push(id, m)).is_err() {
                            return;
                        }
                    }
                    Ok(Some(m)) if m.method() == Some(RELAY) => {
                        if to_client.send(FromMs::Relay(id, m)).is_err() {
                            return;
                        }
                    }
                    Ok(Some(reply)) => {
                        if reply_tx.try_send(reply).is_err() {
                            warn!("the messaging server sent a reply nobody asked for");
                        }
                    }
                    Ok(None) | Err(_) => {
                        let _ = to_client.send(FromMs::Lost(id));
                        return;
                    }
                }
            })
            .map(|_| ());
        if let Err(e) = started {
            self.drop_held();
            return Err(ClientError::Io(crate::link::LinkError::Io(e.into())));
        }
        Ok(())
    }

    /// Closes the held connection, if any (logout, or the login ended).
    fn drop_held(&self) {
        if let Some(h) = self.held.lock().take() {
            let _ = h.stream.shutdown(std::net::Shutdown::Both);
        }
        self.relays.clear();
    }

    /// Applies what a held connection's reader passed on.
    fn on_ms_news(self: &Arc<Self>, news: FromMs) {
        let current = self.held.lock().as_ref().map(|h| h.id);
        match news {
            FromMs::Push(id, m) if current == Some(id) => {
                let answer = self.on_push(&m);
                if !answer.is_success() {
                    debug!("a push was refused: {:?}", answer.start);
                }
            }
            FromMs::Relay(id, m) if current == Some(id) => self.on_relay_frame(m),
            FromMs::Lost(id) if current == Some(id) => {
                // The log has this; people get one line below.
                warn!("the connection to the messaging server closed; the login ends");
                self.drop_held();
                self.peers.clear();
                self.files.clear();
                if let Some(s) = self.state.lock().log_out() {
                    self.emit(Event::Notice {
                        text: format!(
                            "the connection to the messaging server was lost; log in again with /login {}",
                            s.user
                        ),
                    });
                    self.emit(Event::LoggedOut { user: s.user });
                }
            }
            // News of a connection that has already been replaced.
            _ => {}
        }
    }

    /// One sealed request to our MS on the login's held connection, and
    /// its typed reply. The session is not held during the exchange
    /// (pushes and peers need it meanwhile); `calls` keeps requests in
    /// sequence.
    fn ms_call(&self, req: &MsRequest) -> Result<MsReply, ClientError> {
        let _serial = self.calls.lock();
        let sealed = {
            let mut guard = self.state.lock();
            let s = guard.session_mut().ok_or(ClientError::NotLoggedIn)?;
            s.seal_request(req)?
        };
        let (stream, replies, writing) = {
            let held = self.held.lock();
            let h = held.as_ref().ok_or(ClientError::NotLoggedIn)?;
            (
                Arc::clone(&h.stream),
                h.replies.clone(),
                Arc::clone(&h.writing),
            )
        };
        // A reply that came after its caller gave up is not ours.
        while replies.try_recv().is_ok() {}
        let io = |e: crate::wire::io::IoError| ClientError::Io(crate::link::LinkError::Io(e));
        {
            let _one = writing.lock();
            crate::wire::io::write_message(
                &mut &*stream,
                &sealed,
                Instant::now() + self.config.timeout,
            )
            .map_err(io)?;
        }
        let reply = match replies.recv_timeout(self.config.timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => return Err(io(crate::wire::io::IoError::Timeout)),
            Err(RecvTimeoutError::Disconnected) => {
                return Err(io(crate::wire::io::IoError::Io(
                    std::io::ErrorKind::ConnectionAborted.into(),
                )))
            }
        };
        let mut guard = self.state.lock();
        let s = guard.session_mut().ok_or(ClientError::NotLoggedIn)?;
        s.open_reply(req, &reply)
    }

    /// One keepalive to our MS; returns the failures in a row so far. An
    /// MS that no longer knows our login (it restarted, or gave up on us)
    /// or that stays unreachable ends the login here too.
    fn keepalive(&self, failures: u32) -> u32 {
        if !self.is_logged_in() {
            return 0;
        }
        let lost = match self.ms_call(&MsRequest::Ping) {
            Ok(_) => {
                if failures > 0 {
                    self.emit(Event::Notice {
                        text: "the messaging server answers again".into(),
                    });
                }
                return 0;
            }
            Err(ClientError::NotLoggedIn) => return 0,
            Err(ClientError::Refused(Refused {
                refusal: Refusal::NotLoggedIn,
                ..
            })) => "the messaging server no longer knows this login",
            Err(e) if failures + 1 >= 3 => {
                warn!("keepalive: {e}");
                "the messaging server does not answer"
            }
            Err(e) => {
                warn!("keepalive: {e}");
                if failures == 0 {
                    // The log has the details; people get one line.
                    self.emit(Event::Notice {
                        text: "lost contact with the messaging server; retrying...".into(),
                    });
                }
                return failures + 1;
            }
        };
        self.drop_held();
        self.peers.clear();
        self.files.clear();
        self.typing.clear();
        if let Some(s) = self.state.lock().log_out() {
            self.emit(Event::Notice {
                text: format!("{lost}; log in again with /login {}", s.user),
            });
            self.emit(Event::LoggedOut { user: s.user });
        }
        0
    }

    /// Keeps what `e` says about a conversation in the history.
    fn record(&self, e: &Event) {
        let guard = self.history.lock();
        let Some(h) = guard.as_ref() else { return };
        let r = match e {
            Event::Message { from, text, id, .. } => h.received(from, *id, peer::now_unix(), text),
            Event::Delivered { to, id, .. } => h.outcome(to, *id, true),
            Event::SendFailed { to, id, .. } if *id != 0 => h.outcome(to, *id, false),
            _ => Ok(()),
        };
        if let Err(e) = r {
            warn!("history: {e}");
        }
    }

    /// Keeps a message we are sending in the history.
    pub(crate) fn record_sent(&self, to: &str, id: u64, text: &str) {
        if let Some(h) = self.history.lock().as_ref() {
            if let Err(e) = h.sent(to, id, peer::now_unix(), text) {
                warn!("history: {e}");
            }
        }
    }

    /// `/history NAME [N]`: the last `n` lines with `name`.
    pub fn history(&self, name: &str, n: usize) -> Result<Event, ClientError> {
        let name = account::normalize_name(name)?;
        if !self.is_logged_in() {
            return Err(ClientError::NotLoggedIn);
        }
        let guard = self.history.lock();
        let h = guard.as_ref().ok_or(ClientError::HistoryClosed)?;
        let messages = h.last(&name, n)?;
        Ok(Event::History {
            with: name,
            messages,
        })
    }

    /// `/verify NAME [ok]`: the safety number of our key and `name`'s
    /// (its new key, if it changed); with `accept`, records that the user
    /// compared it, which also accepts a changed key.
    pub fn verify(&self, name: &str, accept: bool) -> Result<Event, ClientError> {
        let name = account::normalize_name(name)?;
        let (me, mine, presented) = {
            let guard = self.settled_session();
            let s = guard.session().ok_or(ClientError::NotLoggedIn)?;
            let presented = match s.buddies.get(&name) {
                None => return Err(ClientError::NotABuddy(name)),
                Some(p) => p.as_ref().map(|p| p.public_key.clone()),
            };
            (s.user.clone(), s.public_key.to_der()?, presented)
        };
        let mut keys = self.keys.lock();
        let Some((_, book)) = keys.as_mut().filter(|(u, _)| *u == me) else {
            return Err(ClientError::KeysNotOpen);
        };
        if accept && !book.accept(&name, presented.as_deref())? {
            return Err(ClientError::NoKeySeen(name));
        }
        let Some((theirs, verified)) = book.shown(&name, presented.as_deref()) else {
            return Err(ClientError::NoKeySeen(name));
        };
        Ok(Event::SafetyNumber {
            number: trust::safety_number((&me, &mine), (&name, &theirs)),
            user: name,
            verified,
        })
    }

    /// Logs out; buddies are told by the servers.
    pub fn logout(&self) {
        // Offline messages shown: told before the login ends.
        self.flush_mail_acks();
        self.end_auto_away();
        let result = self.ms_call(&MsRequest::Logout);
        self.drop_held();
        // Sessions with buddies end with the login.
        self.peers.clear();
        self.files.clear();
        self.typing.clear();
        if let Some(s) = self.state.lock().log_out() {
            if let Err(e) = result {
                warn!("logout: {e}");
            }
            self.emit(Event::LoggedOut { user: s.user });
        }
    }

    /// Directory search.
    pub fn search(&self, text: &str) -> Result<Vec<Hit>, ClientError> {
        match self.ms_call(&MsRequest::Search(text.to_owned()))? {
            MsReply::Hits(hits) => Ok(hits),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends a signed buddy request; `true` if delivered now, `false` if
    /// stored until they log in.
    pub fn add(&self, name: &str) -> Result<bool, ClientError> {
        let name = account::normalize_name(name)?;
        let req = {
            let guard = self.state.lock();
            let s = guard.session().ok_or(ClientError::NotLoggedIn)?;
            if name == s.user {
                return Err(Refused::new(Refusal::SameUser, "you cannot add yourself").into());
            }
            if s.buddies.contains_key(&name) {
                return Err(Refused::new(
                    Refusal::AlreadyBuddies,
                    format!("{name} is already your buddy"),
                )
                .into());
            }
            s.add_request(&name)?
        };
        Ok(matches!(self.ms_call(&req)?, MsReply::Done))
    }

    /// Whether we block `name`.
    pub fn is_blocked(&self, name: &str) -> bool {
        self.state
            .lock()
            .session()
            .is_some_and(|s| s.blocked.contains(&name.to_ascii_lowercase()))
    }

    /// The users we block.
    pub fn blocked(&self) -> Vec<String> {
        self.state
            .lock()
            .session()
            .map(|s| s.blocked.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Blocks (`on`) or unblocks `name`, at the CRS (so it holds across
    /// logins): their requests are dropped there, we look offline to
    /// them, and our client refuses their messages, sessions and files.
    pub fn block(self: &Arc<Self>, name: &str, on: bool) -> Result<(), ClientError> {
        let name = account::normalize_name(name)?;
        self.ms_call(&MsRequest::Block {
            who: name.clone(),
            on,
        })?;
        if let Some(s) = self.state.lock().session_mut() {
            if on {
                s.blocked.insert(name.clone());
            } else {
                s.blocked.remove(&name);
            }
        }
        if on {
            // What is under way with them stops.
            self.peers.drop_session(&name);
            self.cancel_transfers(&name);
        }
        Ok(())
    }

    /// Accepts `name`'s buddy request.
    pub fn accept(&self, name: &str) -> Result<(), ClientError> {
        let name = account::normalize_name(name)?;
        let contact = match self.ms_call(&MsRequest::Accept(name.clone()))? {
            MsReply::Contact(c) => Some(c),
            _ => None,
        };
        if let Some(s) = self.state.lock().session_mut() {
            s.requests.remove(&name);
            if let Some(c) = contact.filter(|c| c.user == name) {
                s.buddy_status
                    .insert(c.user.clone(), status::received(c.status, &c.message));
                s.buddies.insert(c.user, c.online);
            }
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Denies `name`'s buddy request.
    pub fn deny(&self, name: &str) -> Result<(), ClientError> {
        let name = account::normalize_name(name)?;
        self.ms_call(&MsRequest::Deny(name.clone()))?;
        if let Some(s) = self.state.lock().session_mut() {
            s.requests.remove(&name);
        }
        Ok(())
    }

    /// Removes `name` from both buddy lists.
    pub fn remove(&self, name: &str) -> Result<(), ClientError> {
        let name = account::normalize_name(name)?;
        self.ms_call(&MsRequest::Remove(name))?;
        Ok(())
    }

    /// Sets (or with an empty value, clears) one profile field.
    pub fn set_profile_field(&self, field: &str, value: &str) -> Result<Profile, ClientError> {
        let mut profile = self.profile().ok_or(ClientError::NotLoggedIn)?;
        if value.is_empty() {
            profile.remove(field);
        } else {
            profile.insert(field.to_owned(), value.to_owned());
        }
        self.ms_call(&MsRequest::SetProfile(profile.clone()))?;
        if let Some(s) = self.state.lock().session_mut() {
            s.profile = profile.clone();
        }
        Ok(profile)
    }

    /// Changes the password: a new verifier, our key re-wrapped.
    pub fn passwd(&self, current: &str, new_password: &str) -> Result<(), ClientError> {
        let current_check = self
            .state
            .lock()
            .session()
            .map(Session::password_check)
            .ok_or(ClientError::NotLoggedIn)?;
        // A PBKDF2 derivation: outside the lock.
        if !session::is_password(&current_check, current, self.config.policy())? {
            return Err(ClientError::WrongPassword);
        }
        if current == new_password {
            return Err(ClientError::SamePassword);
        }
        let (req, check, user) = {
            let guard = self.state.lock();
            let s = guard.session().ok_or(ClientError::NotLoggedIn)?;
            let (req, check, history_key) = s.rewrap(
                new_password,
                self.config.kdf_iterations,
                self.config.policy(),
            )?;
            (req, (check, history_key), s.user.clone())
        };
        let (check, history_key) = check;
        self.ms_call(&req)?;
        if let Some(h) = self.history.lock().as_mut() {
            if let Err(e) = h.rekey(history_key) {
                self.emit(Event::Notice {
                    text: format!("the history could not be re-sealed for the new password: {e}"),
                });
            }
        }
        if let Some(s) = self.state.lock().session_mut() {
            s.password_changed(check);
        }
        // The next login here expects the new parameters.
        if let MsRequest::Passwd { verifier, .. } = req {
            self.known_kdf.lock().insert(
                user,
                crypto::KdfParams {
                    salt: verifier.salt,
                    iterations: verifier.iterations,
                },
            );
        }
        Ok(())
    }

    /// Applies a push from our MS.
    /// The session, waiting for a login in progress to finish: our MS
    /// (and buddies who heard we are online) may reach us before our
    /// login is complete here.
    fn settled_session(&self) -> parking_lot::MutexGuard<'_, State> {
        let mut guard = self.state.lock();
        let end = Instant::now() + self.config.timeout;
        while guard.logging_in() && !self.changed.wait_until(&mut guard, end).timed_out() {}
        guard
    }

    fn on_push(&self, m: &Message) -> Message {
        let mut guard = self.settled_session();
        let Some(s) = guard.session_mut() else {
            return Refused::new(Refusal::NotLoggedIn, "not logged in").to_message();
        };
        if m.header("User") != Some(s.user.as_str()) {
            return Refused::new(Refusal::NoSuchUser, "not this user").to_message();
        }
        let inner = match s.push.open(m) {
            Ok(i) => i,
            Err(e) => {
                warn!("refused a push: {e}");
                return Refused::new(Refusal::BadProof, "unreadable push").to_message();
            }
        };
        let kind = match read_event(&inner) {
            Ok(k) => k,
            Err(e) => return e.reply(),
        };
        // A second event to show after the first (a status after an online).
        let mut also = None;
        let event = match kind {
            EventKind::Online {
                user,
                presence,
                status,
                message,
            } => {
                // Not a buddy: nothing changes.
                let Some(was) = s.buddies.get(&user).cloned() else {
                    return Message::ok();
                };
                let info = status::received(status, &message);
                let was_shown = was.is_some() && !s.status_hidden(&user);
                // The same login announced again (the CRS restarted, or a
                // status change) keeps its session.
                let same_login = matches!(&was, Some(p) if *p == presence);
                let old_info = s.buddy_status.insert(user.clone(), info.clone());
                s.buddies.insert(user.clone(), Some(presence));
                if !same_login {
                    // A new login of theirs: any old session's keys are gone
                    // with it, and it may be reached another way.
                    self.peers.drop_session(&user);
                    self.relays.forget(&user);
                }
                let news = (info.status != Status::Available || !info.message.is_empty())
                    .then(|| status_event(&user, &info));
                match (was_shown, info.status != Status::Invisible) {
                    // Invisible, and writing to us: reachable, shown offline.
                    (false, false) => {
                        drop(guard);
                        self.changed.notify_all();
                        return Message::ok();
                    }
                    (true, false) => Event::Offline { user },
                    (true, true) if same_login => {
                        if old_info.as_ref() == Some(&info) {
                            return Message::ok();
                        }
                        status_event(&user, &info)
                    }
                    (_, true) => {
                        also = news;
                        Event::Online { user }
                    }
                }
            }
            EventKind::Status {
                user,
                status,
                message,
            } => {
                if !matches!(s.buddies.get(&user), Some(Some(_))) {
                    return Message::ok();
                }
                let info = status::received(status, &message);
                if info.status == Status::Invisible {
                    // The CRS says OFFLINE for this; taken as one.
                    s.buddies.insert(user.clone(), None);
                    s.buddy_status.remove(&user);
                    self.peers.drop_session(&user);
                    Event::Offline { user }
                } else {
                    s.buddy_status.insert(user.clone(), info.clone());
                    status_event(&user, &info)
                }
            }
            EventKind::Offline { user } => {
                if !s.buddies.contains_key(&user) {
                    return Message::ok();
                }
                let was_shown =
                    matches!(s.buddies.get(&user), Some(Some(_))) && !s.status_hidden(&user);
                s.buddies.insert(user.clone(), None);
                s.buddy_status.remove(&user);
                self.peers.drop_session(&user);
                self.relays.forget(&user);
                if !was_shown {
                    drop(guard);
                    self.changed.notify_all();
                    return Message::ok();
                }
                Event::Offline { user }
            }
            EventKind::Request(r) => {
                if !request_is_genuine(&r, &s.user) {
                    warn!(
                        "dropped a buddy request claiming to be from {} with a bad signature",
                        r.from
                    );
                    return Message::ok();
                }
                let from = r.from.clone();
                s.requests.insert(from.clone(), r);
                Event::Request { from }
            }
            EventKind::BuddyAdded {
                buddy,
                online,
                status,
                message,
            } => {
                let is_online = online.is_some();
                s.requests.remove(&buddy);
                let info = status::received(status, &message);
                if is_online && (info.status != Status::Available || !info.message.is_empty()) {
                    also = Some(status_event(&buddy, &info));
                }
                s.buddy_status.insert(buddy.clone(), info);
                s.buddies.insert(buddy.clone(), online);
                Event::BuddyAdded {
                    user: buddy,
                    online: is_online,
                }
            }
            EventKind::BuddyRemoved { buddy } => {
                s.buddies.remove(&buddy);
                s.buddy_status.remove(&buddy);
                self.peers.drop_session(&buddy);
                Event::BuddyRemoved { user: buddy }
            }
            EventKind::Denied { by } => Event::Denied { by },
            k @ (EventKind::Mail { .. } | EventKind::Receipt { .. }) => {
                drop(guard);
                self.on_mail_push(k);
                return Message::ok();
            }
            // For MSs only.
            EventKind::MailWaiting { .. } => return Message::ok(),
            EventKind::Evicted { user, .. } => {
                if user != s.user {
                    return Message::ok();
                }
                guard.log_out();
                drop(guard);
                self.peers.clear();
                self.files.clear();
                self.typing.clear();
                self.emit(Event::Notice {
                    text: "the servers ended this login (you logged in elsewhere, or the account was removed)".into(),
                });
                self.emit(Event::LoggedOut { user });
                return Message::ok();
            }
        };
        drop(guard);
        self.changed.notify_all();
        self.emit(event);
        if let Some(e) = also {
            self.emit(e);
        }
        Message::ok()
    }
}

/// A buddy's status change as shown.
fn status_event(user: &str, info: &StatusInfo) -> Event {
    Event::Status {
        user: user.to_owned(),
        status: info.status.as_str().to_owned(),
        message: info.message.clone(),
    }
}

/// Shows one event at once (printed and flushed); `false` if it could not.
pub type ShowNow = Arc<dyn Fn(&Event) -> bool + Send + Sync>;

/// One connection to the client's listener.
enum PeerConn {
    /// Pushes, INIT and chat.
    Open,
    /// An INIT answered on this connection, waiting for its CONFIRM.
    Accepting(Box<peer::Accepting>),
    /// The connection of an incoming file transfer.
    Receiving(Box<files::Receiving>),
}

/// The client's listener service: its buddies' INIT, messages and files.
struct Listener(Arc<Client>);

impl Service for Listener {
    type Session = PeerConn;

    fn open(&self, _peer: &Peer) -> PeerConn {
        PeerConn::Open
    }

    fn handle(&self, conn: &mut PeerConn, request: Message) -> Outcome {
        let client = &self.0;
        if let PeerConn::Receiving(r) = conn {
            return match client.on_file_message(r, request) {
                None => Outcome::Silent,
                Some((reply, false)) => Outcome::Reply(reply),
                Some((reply, true)) => Outcome::ReplyAndClose(reply),
            };
        }
        // Only buddies' traffic: pushes come on the held connection to the
        // MS, and nothing here tells a stranger whether our user is online.
        match request.method() {
            Some(INIT) => {
                let (reply, accepting) = client.on_init(&request);
                if let Some(a) = accepting {
                    *conn = PeerConn::Accepting(Box::new(a));
                }
                Outcome::Reply(reply)
            }
            Some(CONFIRM) => {
                let accepting = match std::mem::replace(conn, PeerConn::Open) {
                    PeerConn::Accepting(a) => Some(*a),
                    _ => None,
                };
                match client.on_confirm(accepting, &request) {
                    None => Outcome::Silent,
                    Some(refusal) => Outcome::ReplyAndClose(refusal),
                }
            }
            Some(PEER) => match request.header("Channel") {
                Some("msg") => Outcome::Reply(client.on_peer_msg(&request)),
                Some(c) if c.starts_with("file:") => match client.open_receiving(&request) {
                    Ok(r) => {
                        let mut r = Box::new(r);
                        let outcome = match client.on_file_message(&mut r, request) {
                            None => Outcome::Silent,
                            Some((reply, false)) => Outcome::Reply(reply),
                            Some((reply, true)) => Outcome::ReplyAndClose(reply),
                        };
                        *conn = PeerConn::Receiving(r);
                        outcome
                    }
                    Err(reply) => Outcome::ReplyAndClose(reply),
                },
                _ => Outcome::ReplyAndClose(
                    Refused::new(Refusal::BadRequest, "unknown channel").to_message(),
                ),
            },
            Some(m) => Outcome::ReplyAndClose(
                crate::proto::ProtoError::UnknownMethod(m.to_owned()).reply(),
            ),
            None => Outcome::Close,
        }
    }

    /// A transfer's connection carries file frames (PROTOCOL.md §1).
    fn limits(&self, conn: &PeerConn) -> Option<Limits> {
        matches!(conn, PeerConn::Receiving(_)).then(|| Limits::DEFAULT.for_files())
    }

    fn close(&self, conn: PeerConn) {
        if let PeerConn::Receiving(r) = conn {
            self.0.close_receiving(*r);
        }
    }
}

/// What the client's unit tests share: a client with no listener and no
/// servers, logged in by hand.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::proto::crs::Presence;

    /// A client keeping its files under `dir`; its events.
    pub fn client(dir: &std::path::Path, typing: bool) -> (Arc<Client>, Receiver<Event>) {
        let config = ClientConfig {
            state_dir: dir.join("state"),
            download_dir: dir.join("downloads"),
            typing_notifications: typing,
            ..ClientConfig::default()
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        (Arc::new(Client::new(config, 0, tx)), rx)
    }

    /// Logs `c` in as `user` with these buddies (no server is asked).
    pub fn log_in(c: &Client, user: &str, buddies: &[(&str, Option<Presence>)]) {
        *c.state.lock() = State::LoggedIn(Box::new(session::session_for_test(user, buddies)));
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{client, log_in};
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn a_file_that_does_not_exist_or_is_no_file_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _events) = client(dir.path(), true);
        let missing = dir.path().join("missing.txt");
        match c.send_file("bob", &missing) {
            Err(ClientError::NoSuchFile { path, error }) => {
                assert_eq!(path, missing);
                assert_eq!(error.kind(), ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        let e = c.send_file("bob", &missing).unwrap_err();
        assert_eq!(e.io_kind(), Some(ErrorKind::NotFound));
        // The words people saw before: the path, then the system's.
        assert!(
            e.to_string()
                .starts_with(&format!("{}: ", missing.display())),
            "{e}"
        );
        match c.send_file("bob", dir.path()) {
            Err(ClientError::NotAFile(p)) => assert_eq!(p, dir.path()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answering_a_file_offer_that_is_not_there_is_no_such_offer() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _events) = client(dir.path(), true);
        log_in(&c, "ann", &[("bob", None)]);
        match c.accept_file("Bob") {
            Err(ClientError::NoSuchOffer(who)) => assert_eq!(who, "bob"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.deny_file("bob"),
            Err(ClientError::NoSuchOffer(_))
        ));
    }

    #[test]
    fn typing_to_someone_it_cannot_go_to_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _events) = client(dir.path(), true);
        assert!(matches!(
            c.send_typing("bob", true),
            Err(ClientError::NotLoggedIn)
        ));
        log_in(&c, "ann", &[("carol", None)]);
        match c.send_typing("bob", true) {
            Err(ClientError::NotABuddy(who)) => assert_eq!(who, "bob"),
            other => panic!("{other:?}"),
        }
        match c.send_typing("carol", true) {
            Err(ClientError::BuddyOffline(who)) => assert_eq!(who, "carol"),
            other => panic!("{other:?}"),
        }
        let (off, _events) = client(dir.path(), false);
        assert!(matches!(
            off.send_typing("carol", true),
            Err(ClientError::TypingOff)
        ));
    }

    #[test]
    fn a_message_that_cannot_go_says_why_with_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _events) = client(dir.path(), true);
        log_in(&c, "ann", &[]);
        let long = "x".repeat(peer::MAX_TEXT_BYTES + 1);
        match c.send_message("bob", &long) {
            Err((id, ClientError::MessageTooLong(n))) => {
                assert!(id > 0);
                assert_eq!(n, long.len());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            c.send_message("bob", "hi"),
            Err((_, ClientError::NotABuddy(_)))
        ));
    }

    #[test]
    fn verifying_a_stranger_is_not_a_buddy() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _events) = client(dir.path(), true);
        assert!(matches!(
            c.verify("bob", false),
            Err(ClientError::NotLoggedIn)
        ));
        log_in(&c, "ann", &[]);
        assert!(matches!(
            c.verify("bob", false),
            Err(ClientError::NotABuddy(_))
        ));
    }
}
