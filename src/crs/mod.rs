//! The central repository server: registered users (in a durable
//! [`store`]), enrolled MSs, who is online where, and login locks (in
//! volatile [`live`] state), served on one pre-threaded port.

pub mod guesses;
pub mod live;
pub mod operator;
pub mod service;
pub mod store;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use parking_lot::{Condvar, Mutex};

use crate::crypto::{self, RsaPrivateKey, RsaPublicKey};
use crate::keyfile;
use crate::prethread::{self, Server};
use live::Live;
use store::{SledStore, Store};

/// Everything the CRS needs to run; built from flags and the config file.
#[derive(Clone, Debug)]
pub struct CrsConfig {
    /// Where to listen (port 0: any free port).
    pub listen: String,
    /// The sled database and the CRS's own key live here.
    pub data_dir: PathBuf,
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
    /// The worker pool.
    pub pool: prethread::Config,
}

impl Default for CrsConfig {
    fn default() -> Self {
        CrsConfig {
            listen: "127.0.0.1:7100".into(),
            data_dir: PathBuf::from("ims-crs-data"),
            ms_key_file: PathBuf::from("mskey"),
            registration_open: true,
            heartbeat_timeout: Duration::from_secs(15),
            lock_lease: Duration::from_secs(10),
            poll_timeout: Duration::from_secs(5),
            min_iterations: crypto::PBKDF2_MIN_ITERATIONS,
            max_search_results: 50,
            free_login_attempts: guesses::FREE_ATTEMPTS,
            // Kept links wait in the pool's gate, not on a worker, so the
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
    live: Mutex<Live>,
    /// Login attempts per (name, source), for every MS.
    guesses: guesses::Guesses,
    events_ready: Condvar,
    stopping: AtomicBool,
    /// Random per process: tells an MS whether the CRS it reaches is the
    /// one it enrolled with (and so still knows its users).
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
        let identity_public = identity.public_key();
        let guesses = guesses::Guesses::new(config.free_login_attempts);
        Crs {
            config,
            store,
            ms_key,
            identity,
            identity_public,
            live: Mutex::new(Live::default()),
            guesses,
            events_ready: Condvar::new(),
            stopping: AtomicBool::new(false),
            instance: crate::keyfile::hex(&crypto::random_array::<8>()),
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

    /// Waits until stopped; joins every thread.
    pub fn join(self) {
        self.server.join();
        self.crs.stopping.store(true, Ordering::Relaxed);
        self.crs.events_ready.notify_all();
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
    private_data_dir(&config.data_dir)?;
    let store = SledStore::open(&config.data_dir.join("db")).map_err(CrsError::Store)?;
    // Whatever the umask made of the database's files: ours alone.
    make_private(&config.data_dir).map_err(CrsError::DataDir)?;
    let identity = identity(&config.data_dir)?;
    let crs = Arc::new(Crs::new(config.clone(), Arc::new(store), ms_key, identity));
    let server = Server::bind(
        config.listen.as_str(),
        config.pool.clone(),
        Arc::new(service::CrsService(crs.clone())),
    )
    .map_err(CrsError::Listen)?;
    info!("CRS listening on {}", server.local_addr());
    let reaper = {
        let crs = crs.clone();
        std::thread::Builder::new()
            .name("crs-reaper".into())
            .spawn(move || {
                while !crs.stopping() {
                    std::thread::sleep(Duration::from_millis(250));
                    crs.reap();
                }
            })
            .map_err(CrsError::Listen)?
    };
    Ok(Running {
        crs,
        server,
        reaper,
    })
}
