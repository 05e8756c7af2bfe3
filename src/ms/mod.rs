//! A messaging server: enrolls with the CRS, logs clients in, relays
//! presence and buddy events to them. It never carries chat traffic.

pub mod limits;
pub mod login;
pub mod mail;
pub mod metrics;
pub mod mslink;
pub mod push;
pub mod relay;
pub mod users;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{info, warn};

use crate::crypto;
use crate::keyfile;
use crate::link::{CrsCalls, Identity, LinkError, LinkPool};
use crate::prethread::{self, Server};
use crate::proto::crs::{CrsReply, CrsRequest, EventKind};
use crate::proto::Refusal;
use push::Pusher;
use users::Users;

/// Everything an MS needs to run.
#[derive(Clone, Debug)]
pub struct MsConfig {
    /// Where to listen for clients (port 0: any free port).
    pub listen: String,
    /// The address given to clients; by default the bound address.
    pub advertise: Option<String>,
    /// The CRS's address.
    pub crs: String,
    /// The pre-shared MSkey.
    pub ms_key_file: PathBuf,
    /// Most users logged in here at once.
    pub capacity: u32,
    /// How often to tell the CRS we are alive.
    pub heartbeat_interval: Duration,
    /// Bound on each message to the CRS.
    pub crs_timeout: Duration,
    /// Threads pushing events to clients.
    pub push_threads: usize,
    /// PBKDF2 iterations shown for names that do not exist.
    pub fake_iterations: u32,
    /// A client silent this long on its held connection (no keepalive, no
    /// request) is logged out: its connection is closed. A connection that
    /// closes logs its user out at once.
    pub client_timeout: Duration,
    /// Login attempts a second from one address (0: no limit), with a
    /// burst of `login_burst`.
    pub login_rate: f64,
    /// Login attempts one address may make at once.
    pub login_burst: u32,
    /// Searches a second per user, with a burst of ten.
    pub search_rate: f64,
    /// The worker pool.
    pub pool: prethread::Config,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<String>,
    /// Bytes a second one user may send through the relay (0: no limit).
    pub relay_rate: f64,
    /// How long the MS tries a new login's listener (to tell its buddies
    /// whether to relay at once); zero: never tried.
    pub probe_timeout: Duration,
    /// Bytes of one user's relayed frames this MS holds at most.
    pub relay_queue_bytes: u64,
}

/// Default of [`MsConfig::relay_rate`]: 64 MiB/s, a 100 MB file in under
/// two seconds, while a few such users do not fill a gigabit link.
pub const DEFAULT_RELAY_RATE: f64 = 64.0 * 1024.0 * 1024.0;
/// Default of [`MsConfig::relay_queue_bytes`]: eight circuits' windows.
pub const DEFAULT_RELAY_QUEUE_BYTES: u64 = 8 * crate::proto::relay::RELAY_WINDOW;

impl Default for MsConfig {
    fn default() -> Self {
        MsConfig {
            listen: "127.0.0.1:7101".into(),
            advertise: None,
            crs: "127.0.0.1:7100".into(),
            ms_key_file: PathBuf::from("mskey"),
            capacity: 10_000,
            heartbeat_interval: Duration::from_secs(3),
            crs_timeout: Duration::from_secs(5),
            push_threads: 4,
            fake_iterations: crypto::PBKDF2_MIN_ITERATIONS,
            client_timeout: Duration::from_secs(15),
            login_rate: 5.0,
            login_burst: 30,
            search_rate: 2.0,
            pool: prethread::Config {
                name: "ms".into(),
                ..prethread::Config::default()
            },
            metrics: None,
            relay_rate: DEFAULT_RELAY_RATE,
            probe_timeout: Duration::from_secs(1),
            relay_queue_bytes: DEFAULT_RELAY_QUEUE_BYTES,
        }
    }
}

/// Why the MS could not start.
#[derive(Debug)]
pub enum MsError {
    /// The MSkey file is missing, unreadable, malformed or too open.
    MsKey(keyfile::KeyFileError),
    /// The listener could not be bound or a thread not started.
    Listen(std::io::Error),
    /// The first enrollment failed.
    Enroll(LinkError),
}

impl fmt::Display for MsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MsError::MsKey(e) => write!(f, "MSkey: {e}"),
            MsError::Listen(e) => write!(f, "cannot listen: {e}"),
            MsError::Enroll(e) => write!(f, "enrollment failed: {e}"),
        }
    }
}

impl std::error::Error for MsError {}

/// The running MS's shared state.
pub struct Ms {
    config: MsConfig,
    ms_key: Vec<u8>,
    /// Requests to the CRS.
    crs: Arc<dyn CrsCalls>,
    /// The enrolled links behind `crs`, for the event poll (absent when
    /// the CRS is called in the same process).
    links: Option<Arc<LinkPool>>,
    users: Users,
    pusher: Pusher,
    stopping: AtomicBool,
    login_limit: limits::Buckets<std::net::IpAddr>,
    search_limit: limits::Buckets<String>,
    /// Connections of clients that cannot reach each other.
    pub(crate) relay: relay::Relay,
    /// `STATUS` and `REVEAL` per user: each is a write at the CRS and
    /// pushes to every buddy.
    status_limit: limits::Buckets<String>,
    /// Offline messages being fetched for users here.
    mail: mail::Mailroom,
}

impl Ms {
    /// An MS whose requests to the CRS go to `crs`, without a listener or
    /// background threads: for tests of its handlers without sockets.
    pub fn in_process(
        config: MsConfig,
        ms_key: Vec<u8>,
        crs: Arc<dyn CrsCalls>,
    ) -> std::io::Result<Arc<Ms>> {
        Ms::new(config, ms_key, crs, None)
    }

    fn new(
        config: MsConfig,
        ms_key: Vec<u8>,
        crs: Arc<dyn CrsCalls>,
        links: Option<Arc<LinkPool>>,
    ) -> std::io::Result<Arc<Ms>> {
        let pusher = Pusher::start(config.push_threads)?;
        Ok(Arc::new(Ms {
            login_limit: limits::Buckets::new(config.login_burst, config.login_rate),
            search_limit: limits::Buckets::new(10, config.search_rate),
            relay: relay::Relay::new(config.relay_rate, config.relay_queue_bytes),
            status_limit: limits::Buckets::new(login::STATUS_BURST, login::STATUS_PER_SEC),
            config,
            ms_key,
            crs,
            links,
            users: Users::default(),
            pusher,
            stopping: AtomicBool::new(false),
            mail: mail::Mailroom::default(),
        }))
    }

    /// The login of `name` here, if any.
    pub fn user(&self, name: &str) -> Option<Arc<users::OnlineUser>> {
        self.users.by_name(name)
    }

    /// Users online here.
    pub fn load(&self) -> usize {
        self.users.len()
    }

    /// Applies one event from the CRS and pushes it to the local recipients
    /// who must hear it.
    pub(crate) fn apply(self: &Arc<Self>, event: crate::proto::crs::Event) {
        // Encoded once, at its first recipient here, for all of them.
        let mut encoded: Option<Arc<crate::wire::Message>> = None;
        for name in &event.recipients {
            // A login still arriving gets it when it is in.
            let Some(user) = self.users.find_or_hold(name, || crate::proto::crs::Event {
                recipients: vec![name.clone()],
                kind: event.kind.clone(),
            }) else {
                continue;
            };
            let relevant = {
                let mut contacts = user.contacts.lock();
                match &event.kind {
                    EventKind::Online { user: u, .. }
                    | EventKind::Offline { user: u }
                    | EventKind::Status { user: u, .. } => contacts.contains(u),
                    EventKind::BuddyAdded { buddy, .. } => {
                        contacts.insert(buddy.clone());
                        true
                    }
                    EventKind::BuddyRemoved { buddy } => {
                        contacts.remove(buddy);
                        true
                    }
                    EventKind::Request(_) | EventKind::Denied { .. } => true,
                    EventKind::MailWaiting { .. } => {
                        self.want_mail(user.clone());
                        false
                    }
                    // Fetched with MAIL, never sent as events.
                    EventKind::Mail { .. } | EventKind::Receipt { .. } => false,
                    EventKind::Evicted { login, .. } => {
                        // Only the old login, not a newer one here.
                        let old = *login == user.number.load(std::sync::atomic::Ordering::Relaxed);
                        if old {
                            // The CRS already took this login offline.
                            self.users.remove(name, Some(&user.login));
                            info!("{name} logged in elsewhere; their login here ends");
                        }
                        old
                    }
                }
            };
            if relevant {
                let message = encoded
                    .get_or_insert_with(|| Arc::new(crate::proto::ms::event_message(&event.kind)))
                    .clone();
                self.pusher.push_encoded(user, message);
            }
        }
    }

    /// Tells the CRS again about every user logged in here (after it
    /// restarted or dropped us); users it refuses are logged out here.
    fn reannounce(&self) {
        for user in self.users.all() {
            let lock = self.crs.call(&CrsRequest::Lock {
                user: user.name.clone(),
            });
            // Logged in through us after the CRS restarted, before this
            // loop noticed it: the CRS already has this very login.
            if let Err(LinkError::Refused(r)) = &lock {
                if r.refusal
                    == (Refusal::AlreadyLoggedIn {
                        address: Some(user.address),
                    })
                {
                    continue;
                }
            }
            let online = lock.is_ok().then(|| {
                self.crs.call(&CrsRequest::Online {
                    user: user.name.clone(),
                    address: user.address,
                })
            });
            let ok = match online {
                Some(Ok(CrsReply::Welcome { login, welcome })) => {
                    user.number
                        .store(login, std::sync::atomic::Ordering::Relaxed);
                    if welcome.mail {
                        self.want_mail(user.clone());
                    }
                    true
                }
                _ => false,
            };
            if !ok {
                warn!(
                    "{} could not be restored at the CRS; logged out here",
                    user.name
                );
                self.users.remove(&user.name, Some(&user.login));
            } else if self.users.by_login(&user.login).is_none() {
                // The login ended while it was being announced: its own
                // OFFLINE may have reached the CRS before our ONLINE.
                if let Err(e) = self.crs.call(&CrsRequest::Offline {
                    user: user.name.clone(),
                }) {
                    warn!("telling the CRS {} is gone: {e}", user.name);
                }
            }
        }
    }

    /// The `EVENTS` long poll, for ever: re-enrolls (and re-announces our
    /// users) whenever the link breaks.
    fn event_loop(self: Arc<Self>) {
        let Some(links) = self.links.clone() else {
            return;
        };
        let mut ack = 0u64;
        let mut backoff = Duration::from_millis(100);
        let mut link = None;
        // Which CRS (process) knows us, and as which MS.
        let mut known: Option<(String, u64)> = None;
        while !self.stopping.load(Ordering::Relaxed) {
            let mut l = match link.take() {
                Some(l) => l,
                None => match links.connect() {
                    Ok(l) => {
                        let now = (l.crs_instance.clone(), l.ms_id);
                        if known.as_ref() != Some(&now) {
                            // A restarted CRS, or one that gave up on us: it
                            // no longer knows our users, and events start over.
                            if known.is_some() {
                                info!("re-enrolled with the CRS");
                                links.clear();
                                self.reannounce();
                            }
                            known = Some(now);
                            ack = 0;
                        }
                        backoff = Duration::from_millis(100);
                        l
                    }
                    Err(e) => {
                        warn!("CRS unreachable: {e}; retrying in {backoff:?}");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            let reply = l.call_with(
                &CrsRequest::Events { ack },
                self.config.heartbeat_interval.saturating_mul(4),
            );
            match reply {
                Ok(CrsReply::Events(batch)) => {
                    // Numbers from another program: checked arithmetic.
                    let mut next = batch.first;
                    for e in batch.events {
                        // Events up to `ack` were resent: skip them.
                        if next > ack {
                            self.apply(e);
                            ack = next;
                        }
                        match next.checked_add(1) {
                            Some(n) => next = n,
                            None => break,
                        }
                    }
                    link = Some(l);
                }
                Ok(other) => warn!("bad answer to the event poll: {other:?}"),
                Err(LinkError::Refused(r)) => {
                    warn!("CRS refused the event poll: {r}");
                    std::thread::sleep(backoff);
                }
                Err(e) => warn!("event poll: {e}"),
            }
        }
    }

    /// Logs out clients that stopped sending keepalives on their held
    /// connection: the connection is closed, and its close logs the user
    /// out (see [`Ms::connection_closed`]); their buddies are told by the
    /// CRS. Only the MS holding a login decides that it is dead, and only
    /// from its own connection.
    fn reap_clients(&self) {
        for user in self.users.silent(self.config.client_timeout) {
            warn!("{}'s client is silent; logging it out", user.name);
            if user.held.is_some() {
                user.drop_connection();
            } else {
                self.end_login(&user);
            }
        }
    }

    /// The held connection of `user`'s login has closed (the client quit
    /// or died, its machine rebooted, or we closed it): the login ends now.
    pub(crate) fn connection_closed(&self, user: &users::OnlineUser) {
        if self.end_login(user) {
            info!("{}'s connection closed; logged out", user.name);
        }
    }

    /// Ends `user`'s login here and at the CRS, if it is still the
    /// current one; whether it was.
    fn end_login(&self, user: &users::OnlineUser) -> bool {
        if self.users.remove(&user.name, Some(&user.login)).is_none() {
            return false;
        }
        if let Err(e) = self.crs.call(&CrsRequest::Offline {
            user: user.name.clone(),
        }) {
            warn!("telling the CRS {} is gone: {e}", user.name);
        }
        true
    }

    fn heartbeat_loop(self: Arc<Self>) {
        while !self.stopping.load(Ordering::Relaxed) {
            self.reap_clients();
            let load = self.users.len() as u32;
            if let Err(e) = self.crs.call(&CrsRequest::Heartbeat { load }) {
                warn!("heartbeat: {e}");
            }
            let mut slept = Duration::ZERO;
            while slept < self.config.heartbeat_interval && !self.stopping.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                slept += Duration::from_millis(50);
            }
        }
    }
}

/// A started MS.
pub struct Running {
    ms: Arc<Ms>,
    server: Server,
    threads: Vec<JoinHandle<()>>,
    metrics: Option<crate::metrics::Endpoint>,
}

impl Running {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Stops it from another thread or a signal.
    pub fn stopper(&self) -> prethread::Stopper {
        self.server.stopper()
    }

    /// Waits until stopped: logs its users out at the CRS, joins every thread.
    pub fn join(self) {
        self.server.join();
        drop(self.metrics);
        self.ms.stopping.store(true, Ordering::Relaxed);
        for user in self.ms.users.all() {
            if let Err(e) = self.ms.crs.call(&CrsRequest::Offline {
                user: user.name.clone(),
            }) {
                warn!("logging {} out at the CRS: {e}", user.name);
                break;
            }
        }
        for t in self.threads {
            if t.join().is_err() {
                warn!("an MS thread panicked");
            }
        }
        match Arc::try_unwrap(self.ms) {
            Ok(ms) => ms.pusher.stop(),
            Err(_) => warn!("MS state still shared at exit"),
        }
    }
}

/// Binds, enrolls with the CRS, and starts serving.
pub fn start(config: MsConfig) -> Result<Running, MsError> {
    let ms_key = keyfile::read_ms_key(&config.ms_key_file).map_err(MsError::MsKey)?;
    let listener = std::net::TcpListener::bind(config.listen.as_str()).map_err(MsError::Listen)?;
    let bound = listener.local_addr().map_err(MsError::Listen)?;
    let advertise = config
        .advertise
        .clone()
        .unwrap_or_else(|| bound.to_string());
    let me = Identity {
        listen: advertise.clone(),
        capacity: config.capacity,
        role: "ms",
        instance: crate::keyfile::hex(&crypto::random_array::<8>()),
    };
    let links = Arc::new(LinkPool::new(
        config.crs.clone(),
        ms_key.clone(),
        me,
        config.crs_timeout,
        config.pool.workers.saturating_add(2),
    ));
    // Enroll before taking clients: an MS the CRS refuses must not run.
    links
        .call(&CrsRequest::Heartbeat { load: 0 })
        .map_err(MsError::Enroll)?;
    info!("enrolled with the CRS at {} as {advertise}", config.crs);
    let ms =
        Ms::new(config.clone(), ms_key, links.clone(), Some(links)).map_err(MsError::Listen)?;
    *ms.relay.me.lock() = advertise.clone();
    let server = Server::from_listener(
        listener,
        config.pool.clone(),
        Arc::new(login::MsService(ms.clone())),
    )
    .map_err(MsError::Listen)?;
    info!("MS listening on {bound}");
    let mut threads = Vec::new();
    for (name, f) in [
        ("ms-events", Ms::event_loop as fn(Arc<Ms>)),
        ("ms-heartbeat", Ms::heartbeat_loop as fn(Arc<Ms>)),
        ("ms-mail", Ms::mail_loop as fn(Arc<Ms>)),
    ] {
        let ms = ms.clone();
        threads.push(
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || f(ms))
                .map_err(MsError::Listen)?,
        );
    }
    let metrics = match &config.metrics {
        Some(addr) => {
            Some(metrics::serve(addr, &ms, server.stats_source()).map_err(MsError::Listen)?)
        }
        None => None,
    };
    Ok(Running {
        ms,
        server,
        threads,
        metrics,
    })
}
