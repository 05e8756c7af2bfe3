//! Configuration files (TOML) for the three programs: every key optional,
//! unknown keys and wrong types refused with the file and key named.
//! Flags override what a file sets; the `*Config` types of each role
//! hold the result.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration file was refused.
#[derive(Debug)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, naming the key.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses `path`.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError {
        path: path.to_owned(),
        message: e.to_string().trim().replace('\n', " "),
    })
}

/// The worker pool keys shared by every listener.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// Worker threads.
    pub workers: Option<usize>,
    /// Accepted connections that may wait for a worker.
    pub queue: Option<usize>,
    /// Seconds to receive one whole message.
    pub message_deadline_secs: Option<f64>,
    /// Seconds a kept connection may stay idle.
    pub idle_timeout_secs: Option<f64>,
}

impl PoolFile {
    /// Applies the keys that are set.
    pub fn apply(&self, pool: &mut crate::prethread::Config) {
        if let Some(w) = self.workers {
            pool.workers = w.max(1);
        }
        if let Some(q) = self.queue {
            pool.queue = q;
        }
        if let Some(s) = self.message_deadline_secs {
            pool.message_deadline = secs(s);
        }
        if let Some(s) = self.idle_timeout_secs {
            pool.idle_timeout = secs(s);
        }
    }
}

/// `etc/crs.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrsFile {
    /// Listen address.
    pub listen: Option<String>,
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// Where the data lives: `sled:DIR` or a `postgres://` URL.
    pub store: Option<String>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<String>,
    /// MSkey file.
    pub ms_key: Option<PathBuf>,
    /// Whether clients may register themselves.
    pub registration_open: Option<bool>,
    /// Seconds of silence after which an MS is dropped.
    pub heartbeat_timeout_secs: Option<f64>,
    /// Seconds a login lock lasts.
    pub lock_lease_secs: Option<f64>,
    /// Fewest PBKDF2 iterations accepted at registration.
    pub min_iterations: Option<u32>,
    /// Most results of one search.
    pub max_search_results: Option<u32>,
    /// The worker pool.
    #[serde(default)]
    pub pool: PoolFile,
}

/// `etc/ms.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsFile {
    /// Listen address.
    pub listen: Option<String>,
    /// Address given to clients.
    pub advertise: Option<String>,
    /// CRS address.
    pub crs: Option<String>,
    /// MSkey file.
    pub ms_key: Option<PathBuf>,
    /// Most users.
    pub capacity: Option<u32>,
    /// Seconds between heartbeats.
    pub heartbeat_interval_secs: Option<f64>,
    /// Pusher threads.
    pub push_threads: Option<usize>,
    /// Seconds of client silence before it is probed and logged out.
    pub client_timeout_secs: Option<f64>,
    /// Login attempts a second from one address (0: no limit).
    pub login_rate_per_sec: Option<f64>,
    /// Login attempts one address may make at once.
    pub login_burst: Option<u32>,
    /// Searches a second per user.
    pub search_rate_per_sec: Option<f64>,
    /// Where to serve Prometheus metrics.
    pub metrics: Option<String>,
    /// The worker pool.
    #[serde(default)]
    pub pool: PoolFile,
}

/// `etc/client.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// CRS address.
    pub crs: Option<String>,
    /// Listener address.
    pub listen: Option<String>,
    /// The port buddies reach this client at, if forwarded.
    pub advertise_port: Option<u16>,
    /// Log in as this user at start.
    pub user: Option<String>,
    /// File whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// Expected CRS key fingerprint.
    pub crs_fingerprint: Option<String>,
    /// PBKDF2 iterations for new passwords.
    pub kdf_iterations: Option<u32>,
    /// Allow fewer iterations than the production minimum.
    pub insecure_kdf: Option<bool>,
    /// RSA key size for new accounts.
    pub rsa_bits: Option<u32>,
    /// Where received files go.
    pub download_dir: Option<PathBuf>,
    /// Accept every file a buddy offers.
    pub auto_accept_files: Option<bool>,
    /// Seconds between keepalives to the MS.
    pub keepalive_interval_secs: Option<f64>,
    /// The listener's worker pool.
    #[serde(default)]
    pub pool: PoolFile,
}

/// Seconds (possibly fractional) as a duration; negatives count as zero.
pub fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_examples_parse() {
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc");
        load::<CrsFile>(&etc.join("crs.toml")).unwrap();
        load::<MsFile>(&etc.join("ms.toml")).unwrap();
        load::<ClientFile>(&etc.join("client.toml")).unwrap();
    }

    #[test]
    fn unknown_key_and_wrong_type_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crs.toml");
        std::fs::write(&p, "listen = \"1.2.3.4:5\"\nbogus = 1\n").unwrap();
        let e = load::<CrsFile>(&p).unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("crs.toml"), "{e}");
        std::fs::write(&p, "registration_open = \"yes\"\n").unwrap();
        let e = load::<CrsFile>(&p).unwrap_err().to_string();
        assert!(e.contains("registration_open"), "{e}");
        std::fs::write(&p, "listen = \"0.0.0.0:1\"\n[pool]\nworkers = 3\n").unwrap();
        let f = load::<CrsFile>(&p).unwrap();
        assert_eq!(f.pool.workers, Some(3));
    }
}
