//! The central repository server: registered users (in a durable
//! [`store`]), enrolled MSs, who is online where, and login locks (in
//! [`live`] state), served on one pre-threaded port.
//!
//! Two ways to run: on sled (the default), with the live state in this
//! process; or on PostgreSQL, where the live state and the CRS's own key
//! pair live in the database too, so several instances serve one directory.

pub mod guesses;
pub mod identity;
pub mod live;
pub mod live_pg;
pub mod mail;
pub mod metrics;
pub mod migrate;
pub mod operator;
pub mod service;
mod status;
pub mod store;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};

use crate::crypto::{self, RsaPrivateKey, RsaPublicKey};
use crate::keyfile;
use crate::prethread::{self, Server};
use live::{LiveState, MemLive, Wakeup};
use store::{PgStore, SledStore, Store, StoreSpec};

/// Everything the CRS needs to run; built from flags and the config file.
#[derive(Clone, Debug)]
pub struct CrsConfig {
    /// Where to listen (port 0: any free port).
    pub listen: String,
    /// The sled database and the CRS's own key live here (with the default
    /// store); local files only with a PostgreSQL store.
    pub data_dir: PathBuf,
    /// Where the data lives (`sled:DIR` or a `postgres://` URL, see
    /// [`StoreSpec`]); `None`: sled in `data_dir`.
    pub store: Option<String>,
    /// Where to serve Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<String>,
    /// The pre-shared MSkey.
    pub ms_key_file: PathBuf,
    /// Whether clients may register themselves.
    pub registration_open: bool,
    /// An MS silent this long is dropped and its users go offline.
    pub heartbeat_timeout: Duration,
    /// How long a login lock lasts if the MS that took it goes silent.
    pub lock_lease: Duration,
    /// How long an `EVENTS` poll waits for events before answering empty.
    pub poll_timeout: Duration,
    /// The fewest PBKDF2 iterations a registration may use.
    pub min_iterations: u32,
    /// Most results of one directory search.
    pub max_search_results: u32,
    /// Login attempts of one name from one address before each must wait.
    pub free_login_attempts: u32,
    /// Bounds of the offline messages waiting per recipient and per sender.
    pub mail_limits: store::MailLimits,
    /// Offline messages older than this are deleted unread (their senders
    /// told `expired`).
    pub mail_max_age: Duration,
    /// The worker pool.
    pub pool: prethread::Config,
}

impl Default for CrsConfig {
    fn default() -> Self {
        CrsConfig {
            listen: "127.0.0.1:7100".into(),
            data_dir: PathBuf::from("ims-crs-data"),
            store: None,
            metrics: None,
            ms_key_file: PathBuf::from("mskey"),
            registration_open: true,
            heartbeat_timeout: Duration::from_secs(15),
            lock_lease: Duration::from_secs(10),
            poll_timeout: Duration::from_secs(5),
            min_iterations: crypto::PBKDF2_MIN_ITERATIONS,
            max_search_results: 50,
            free_login_attempts: guesses::FREE_ATTEMPTS,
            mail_limits: store::MailLimits::default(),
            mail_max_age: mail::DEFAULT_MAX_AGE,
            // Kept links wait in the pool's gate, not on a worker (an MS's
            // event poll too: parked until its events come), so the
            // workers are sized by CPU work like every other server's.
            pool: prethread::Config {
                name: "crs".into(),
                ..prethread::Config::default()
            },
        }
    }
}

/// Why the CRS could not start.
#[derive(Debug)]
pub enum CrsError {
    /// The MSkey file is missing, unreadable, malformed or too open.
    MsKey(keyfile::KeyFileError),
    /// The database could not be opened.
    Store(store::StoreError),
    /// The data directory could not be made private, or others can read it.
    DataDir(String),
    /// The CRS's own key could not be read or made.
    Identity(String),
    /// The listener could not be bound.
    Listen(std::io::Error),
}

impl fmt::Display for CrsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CrsError::MsKey(e) => write!(f, "MSkey: {e}"),
            CrsError::Store(e) => write!(f, "database: {e}"),
            CrsError::DataDir(e) => write!(f, "data directory: {e}"),
            CrsError::Identity(e) => write!(f, "CRS key: {e}"),
            CrsError::Listen(e) => write!(f, "cannot listen: {e}"),
        }
    }
}

impl std::error::Error for CrsError {}

/// The running CRS's shared state.
pub struct Crs {
    config: CrsConfig,
    store: Arc<dyn Store>,
    ms_key: Vec<u8>,
    identity: RsaPrivateKey,
    identity_public: RsaPublicKey,
    live: Box<dyn LiveState>,
    /// Login attempts per (name, source), for every MS (in PostgreSQL: of
    /// every instance).
    guesses: Box<dyn guesses::GuessCounter>,
    events_ready: Arc<Wakeup>,
    stopping: AtomicBool,
    /// Tells an MS whether the CRS it reaches is the one it enrolled with
    /// (and so still knows its users): random per process with live state
    /// in memory, the directory's with live state in PostgreSQL.
    instance: String,
}

impl Crs {
    /// A CRS over `store`, for tests of the handlers without sockets.
    pub fn new(
        config: CrsConfig,
        store: Arc<dyn Store>,
        ms_key: Vec<u8>,
        identity: RsaPrivateKey,
    ) -> Crs {
        let wakeup = Arc::new(Wakeup::default());
        Crs::with_live(
            config,
            store,
            ms_key,
            identity,
            Box::new(MemLive::waking(wakeup.clone())),
            wakeup,
        )
    }

    /// A CRS over `store` with its live state in `live`, whose wake-ups
    /// come through `wakeup`.
    pub fn with_live(
        config: CrsConfig,
        store: Arc<dyn Store>,
        ms_key: Vec<u8>,
        identity: RsaPrivateKey,
        live: Box<dyn LiveState>,
        wakeup: Arc<Wakeup>,
    ) -> Crs {
        let identity_public = identity.public_key();
        let instance = live
            .shared_instance()
            .unwrap_or_else(|| crate::keyfile::hex(&crypto::random_array::<8>()));
        let guesses = live
            .shared_guesses(config.free_login_attempts)
            .unwrap_or_else(|| Box::new(guesses::Guesses::new(config.free_login_attempts)));
        Crs {
            config,
            store,
            ms_key,
            identity,
            identity_public,
            live,
            guesses,
            events_ready: wakeup,
            stopping: AtomicBool::new(false),
            instance,
        }
    }

    /// The same CRS with its store timed and its live state counted, and
    /// with `cache`, its store's reads cached ([`store::CachedStore`]: only
    /// for a store this process alone writes).
    ///
    /// The cache goes outside the timing: `ims_crs_store_seconds` stays
    /// the latency of the database itself (a hit costs microseconds and
    /// would only bury it in the lowest bucket), and its counts of reads
    /// become the cache's misses.
    fn counted(self, m: &Arc<metrics::CrsMetrics>, cache: bool) -> Crs {
        let timed = metrics::TimedStore {
            inner: self.store,
            metrics: m.clone(),
        };
        let store: Arc<dyn Store> = if cache {
            Arc::new(store::CachedStore::new(timed))
        } else {
            Arc::new(timed)
        };
        Crs {
            store,
            live: Box::new(metrics::CountingLive {
                inner: self.live,
                metrics: m.clone(),
            }),
            ..self
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Users online now.
    pub fn online_count(&self) -> usize {
        self.live.lock().online_count()
    }
}

/// Reads the CRS's RSA key from the data directory, making one at first start.
fn identity(dir: &Path) -> Result<RsaPrivateKey, CrsError> {
    let path = dir.join("crs-key.pem");
    match std::fs::read_to_string(&path) {
        Ok(pem) => RsaPrivateKey::from_pem(&pem)
            .map_err(|e| CrsError::Identity(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = RsaPrivateKey::generate(crypto::DEFAULT_RSA_BITS)
                .map_err(|e| CrsError::Identity(e.to_string()))?;
            let pem = key
                .to_pem()
                .map_err(|e| CrsError::Identity(e.to_string()))?;
            keyfile::write_private(&path, pem.as_bytes())
                .map_err(|e| CrsError::Identity(format!("{}: {e}", path.display())))?;
            info!("made the CRS key {}", path.display());
            Ok(key)
        }
        Err(e) => Err(CrsError::Identity(format!("{}: {e}", path.display()))),
    }
}

/// Makes the data directory (mode 0700 whatever the umask), or checks
/// that an existing one is not open to others: it holds salts, verifier
/// keys and wrapped private keys, enough to guess passwords offline.
pub fn private_data_dir(dir: &Path) -> Result<(), CrsError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let show = |e: std::io::Error| CrsError::DataDir(format!("{}: {e}", dir.display()));
    match std::fs::metadata(dir) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(CrsError::DataDir(format!(
                    "{}: mode {mode:o} lets others read the database; run chmod 700 on it",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(show)?;
            }
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(show)?;
            // The mode given to mkdir is masked by the umask: set it again.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(show)
        }
        Err(e) => Err(show(e)),
    }
}

/// Sets every directory under `dir` to 0700 and every file to 0600.
fn make_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mode = if kind.is_dir() {
            make_private(&path)?;
            0o700
        } else if kind.is_file() {
            0o600
        } else {
            continue;
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// A started CRS: its address, and the means to stop it.
pub struct Running {
    crs: Arc<Crs>,
    server: Server,
    reaper: std::thread::JoinHandle<()>,
    metrics: Option<crate::metrics::Endpoint>,
}

impl Running {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// A handle that stops the server from another thread or a signal.
    pub fn stopper(&self) -> prethread::Stopper {
        self.server.stopper()
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }

    /// Waits until stopped; joins every thread.
    pub fn join(self) {
        self.server.join();
        drop(self.metrics);
        self.crs.stopping.store(true, Ordering::Relaxed);
        self.crs.events_ready.notify_everyone();
        if self.reaper.join().is_err() {
            warn!("the reaper thread panicked");
        }
    }
}

/// Opens the database and keys and starts serving.
pub fn start(mut config: CrsConfig) -> Result<Running, CrsError> {
    // An idle event poll must end (and the MS poll again, which counts as a
    // heartbeat) well within the heartbeat timeout.
    config.poll_timeout = config.poll_timeout.min(config.heartbeat_timeout / 3);
    let ms_key = keyfile::read_ms_key(&config.ms_key_file).map_err(CrsError::MsKey)?;
    let spec = match &config.store {
        Some(text) => Some(
            StoreSpec::parse(text).map_err(|e| CrsError::Store(store::StoreError::Backend(e)))?,
        ),
        None => None,
    };
    let crs = match &spec {
        None | Some(StoreSpec::Sled(_)) => {
            // `sled:DIR` is the same as `--data DIR`.
            let dir = match &spec {
                Some(StoreSpec::Sled(dir)) => dir.clone(),
                _ => config.data_dir.clone(),
            };
            private_data_dir(&dir)?;
            let store = SledStore::open(&dir.join("db")).map_err(CrsError::Store)?;
            // Whatever the umask made of the database's files: ours alone.
            make_private(&dir).map_err(CrsError::DataDir)?;
            let identity = identity(&dir)?;
            Crs::new(config.clone(), Arc::new(store), ms_key, identity)
        }
        Some(StoreSpec::Postgres(url)) => {
            let store = PgStore::open(url).map_err(CrsError::Store)?;
            info!(
                "database {} (schema version {})",
                store.pool().shown(),
                store::schema::CURRENT
            );
            let (key, instance) =
                identity::shared(store.pool(), &ms_key).map_err(CrsError::Identity)?;
            let wakeup = Arc::new(Wakeup::default());
            let live = live_pg::PgLive::start(url, instance, wakeup.clone())
                .map_err(|e| CrsError::Store(store::StoreError::Backend(e)))?;
            Crs::with_live(
                config.clone(),
                Arc::new(store),
                ms_key,
                key,
                Box::new(live),
                wakeup,
            )
        }
    };
    let metrics = metrics::CrsMetrics::new();
    // One process owns a sled database, so every write passes the cache;
    // PostgreSQL is written by every instance serving the directory.
    let cache = !matches!(spec, Some(StoreSpec::Postgres(_)));
    let crs = Arc::new(crs.counted(&metrics, cache));
    let server = Server::bind(
        config.listen.as_str(),
        config.pool.clone(),
        Arc::new(service::CrsService(crs.clone())),
    )
    .map_err(CrsError::Listen)?;
    info!("CRS listening on {}", server.local_addr());
    metrics.pool.attach(server.stats_source());
    let endpoint = match &config.metrics {
        None => None,
        Some(addr) => {
            let (m, c) = (metrics.clone(), crs.clone());
            let refresh = Box::new(move || {
                m.pool.refresh();
                let mut live = c.live.lock();
                let (online, enrolled) = (live.online_count(), live.ms_list().len());
                drop(live);
                m.set_live(online, enrolled);
            });
            Some(
                crate::metrics::Endpoint::start(addr, metrics.registry.clone(), refresh)
                    .map_err(CrsError::Listen)?,
            )
        }
    };
    let reaper = {
        let crs = crs.clone();
        std::thread::Builder::new()
            .name("crs-reaper".into())
            .spawn(move || {
                let mut expiry = mail::Expiry::default();
                while !crs.stopping() {
                    std::thread::sleep(Duration::from_millis(250));
                    crs.reap();
                    expiry.tick(&crs);
                }
            })
            .map_err(CrsError::Listen)?
    };
    Ok(Running {
        crs,
        server,
        reaper,
        metrics: endpoint,
    })
}
