//! Configuration of the three programs: one table of [`Setting`]s per
//! program ([`crs_settings`], [`ms_settings`], [`client_settings`]) names
//! each setting once, with its file key, its flag if it has one, its kind
//! and where it goes in the program's typed configuration (whose
//! `Default` holds the defaults). Files (TOML) and flags are read through
//! the same table: every key optional, unknown keys, wrong types and
//! values out of bounds refused with the file (or flag) and key named.
//! Flags override what a file sets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use getopts::{Matches, Options};
use serde::Deserialize;

use crate::client::ClientConfig;
use crate::crs::CrsConfig;
use crate::ms::MsConfig;
use crate::prethread;

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

/// What kind of value a setting takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Text (an address, a path, a name).
    Text,
    /// `true` or `false` in a file; a flag without a value.
    Switch,
    /// A whole number from 0 to `max`.
    Int {
        /// The largest value taken.
        max: u64,
    },
    /// Seconds, checked by [`duration`].
    Secs,
    /// Events a second, checked as [`Rate`].
    Rate,
}

/// A setting's value, of its kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// [`Kind::Text`].
    Text(String),
    /// [`Kind::Switch`].
    Switch(bool),
    /// [`Kind::Int`], within its bound.
    Int(u64),
    /// [`Kind::Secs`].
    Secs(Duration),
    /// [`Kind::Rate`].
    Rate(f64),
}

impl Value {
    /// The text of a `Text` value.
    pub fn text(self) -> String {
        match self {
            Value::Text(t) => t,
            _ => String::new(),
        }
    }

    /// A `Switch` value.
    pub fn on(&self) -> bool {
        matches!(self, Value::Switch(true))
    }

    /// An `Int` value as `T` (its kind's bound keeps it in range).
    pub fn int<T: TryFrom<u64> + Default>(&self) -> T {
        match self {
            Value::Int(n) => T::try_from(*n).unwrap_or_default(),
            _ => T::default(),
        }
    }

    /// A `Secs` value.
    pub fn secs(&self) -> Duration {
        match self {
            Value::Secs(d) => *d,
            _ => Duration::ZERO,
        }
    }

    /// A `Rate` value.
    pub fn rate(&self) -> f64 {
        match self {
            Value::Rate(r) => *r,
            _ => 0.0,
        }
    }
}

/// A flag of a setting.
#[derive(Clone, Copy, Debug)]
pub struct Flag {
    /// The long name, without `--`.
    pub name: &'static str,
    /// What the value is (`ADDR`, `N`); empty for a switch.
    pub hint: &'static str,
    /// One line of `--help`.
    pub help: &'static str,
}

/// One setting of a program: written once, read from files and flags.
pub struct Setting<C> {
    /// Its key in a file (`pool.workers` for `workers` under `[pool]`), if
    /// files may set it.
    pub key: Option<&'static str>,
    /// Its flag, if it has one.
    pub flag: Option<Flag>,
    /// What it takes.
    pub kind: Kind,
    /// Puts a value of its kind into the configuration.
    pub set: fn(&mut C, Value),
}

const fn int(max: u64) -> Kind {
    Kind::Int { max }
}

const U16: Kind = int(u16::MAX as u64);
/// PBKDF2 iteration counts: a count a client refuses is a typo.
const ITERATIONS: Kind = int(crate::crypto::PBKDF2_MAX_ITERATIONS as u64);
const U32: Kind = int(u32::MAX as u64);
/// Threads, queue places: more than a machine could run is a typo.
const COUNT: Kind = int(1 << 20);
/// Connections: far beyond any open-files limit is a typo.
const CONNS: Kind = int(1 << 26);
/// Bytes of offline messages one mailbox may hold: up to 64 GiB.
const BYTES: Kind = int(1 << 36);

fn key<C>(key: &'static str, kind: Kind, set: fn(&mut C, Value)) -> Setting<C> {
    Setting {
        key: Some(key),
        flag: None,
        kind,
        set,
    }
}

impl<C> Setting<C> {
    /// The same setting with a flag.
    fn flag(mut self, name: &'static str, hint: &'static str, help: &'static str) -> Setting<C> {
        self.flag = Some(Flag { name, hint, help });
        self
    }

    /// The same setting without a file key (a flag only).
    fn flag_only(mut self) -> Setting<C> {
        self.key = None;
        self
    }
}

/// A configuration that holds a worker pool's settings under `[pool]`.
trait HasPool {
    /// The pool's settings.
    fn pool_mut(&mut self) -> &mut prethread::Config;
}

impl HasPool for CrsConfig {
    fn pool_mut(&mut self) -> &mut prethread::Config {
        &mut self.pool
    }
}

impl HasPool for MsConfig {
    fn pool_mut(&mut self) -> &mut prethread::Config {
        &mut self.pool
    }
}

impl HasPool for ClientProgram {
    fn pool_mut(&mut self) -> &mut prethread::Config {
        &mut self.client.pool
    }
}

/// Whether the pool's busiest knobs also get command-line flags (the
/// servers' do; the client's listener is tuned from its file only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum PoolFlags {
    Yes,
    No,
}

/// The `[pool]` settings every program shares, written once.
fn pool_settings<C: HasPool>(flags: PoolFlags) -> Vec<Setting<C>> {
    let workers = key("pool.workers", COUNT, |c: &mut C, v| {
        c.pool_mut().workers = v.int::<usize>().max(1)
    });
    let deadline = key("pool.message_deadline_secs", Kind::Secs, |c: &mut C, v| {
        c.pool_mut().message_deadline = v.secs()
    });
    let (workers, deadline) = match flags {
        PoolFlags::Yes => (
            workers.flag("workers", "N", "worker threads"),
            deadline.flag(
                "message-deadline",
                "SECS",
                "seconds within which one whole request must arrive (default 10)",
            ),
        ),
        PoolFlags::No => (workers, deadline),
    };
    vec![
        workers,
        key("pool.queue", COUNT, |c: &mut C, v| {
            c.pool_mut().queue = v.int()
        }),
        deadline,
        key("pool.idle_timeout_secs", Kind::Secs, |c: &mut C, v| {
            c.pool_mut().idle_timeout = v.secs()
        }),
        key("pool.write_deadline_secs", Kind::Secs, |c: &mut C, v| {
            c.pool_mut().write_deadline = v.secs()
        }),
        key("pool.max_connections", CONNS, |c: &mut C, v| {
            c.pool_mut().max_connections = v.int::<usize>().max(1)
        }),
        key("pool.max_per_source", CONNS, |c: &mut C, v| {
            c.pool_mut().max_per_source = v.int::<usize>().max(1)
        }),
    ]
}

/// The CRS's settings.
pub fn crs_settings() -> Vec<Setting<CrsConfig>> {
    type C = CrsConfig;
    vec![
        key("listen", Kind::Text, |c: &mut C, v| c.listen = v.text()).flag(
            "listen",
            "ADDR",
            "address to listen on (default 127.0.0.1:7100)",
        ),
        key("data_dir", Kind::Text, |c: &mut C, v| {
            c.data_dir = v.text().into()
        })
        .flag("data", "DIR", "data directory (default ./ims-crs-data)"),
        key("store", Kind::Text, |c: &mut C, v| c.store = Some(v.text())).flag(
            "store",
            "STORE",
            "where the data lives: sled:DIR (default: sled in --data) or postgres://USER@HOST/DB",
        ),
        key("metrics", Kind::Text, |c: &mut C, v| {
            c.metrics = Some(v.text())
        })
        .flag(
            "metrics",
            "ADDR",
            "serve Prometheus metrics on http://ADDR/metrics",
        ),
        key("ms_key", Kind::Text, |c: &mut C, v| {
            c.ms_key_file = v.text().into()
        })
        .flag("ms-key", "FILE", "MSkey file (default ./mskey)"),
        key("registration_open", Kind::Switch, |c: &mut C, v| {
            c.registration_open = v.on()
        }),
        key("registration_open", Kind::Switch, |c: &mut C, v| {
            if v.on() {
                c.registration_open = false
            }
        })
        .flag("close-registration", "", "refuse self-registration")
        .flag_only(),
        key("heartbeat_timeout_secs", Kind::Secs, |c: &mut C, v| {
            c.heartbeat_timeout = v.secs()
        }),
        key("lock_lease_secs", Kind::Secs, |c: &mut C, v| {
            c.lock_lease = v.secs()
        }),
        key("min_iterations", ITERATIONS, |c: &mut C, v| {
            c.min_iterations = v.int()
        })
        .flag(
            "min-iterations",
            "N",
            "fewest PBKDF2 iterations a registration may use",
        ),
        key("max_search_results", U32, |c: &mut C, v| {
            c.max_search_results = v.int()
        }),
        key("free_login_attempts", U32, |c: &mut C, v| {
            c.free_login_attempts = v.int()
        }),
        key("mail_per_recipient", COUNT, |c: &mut C, v| {
            c.mail_limits.per_recipient = v.int()
        }),
        key("mail_bytes_per_recipient", BYTES, |c: &mut C, v| {
            c.mail_limits.bytes_per_recipient = v.int()
        }),
        key("mail_per_sender", COUNT, |c: &mut C, v| {
            c.mail_limits.per_sender = v.int()
        }),
        key("mail_bytes_per_sender", BYTES, |c: &mut C, v| {
            c.mail_limits.bytes_per_sender = v.int()
        }),
        key("mail_max_age_secs", Kind::Secs, |c: &mut C, v| {
            c.mail_max_age = v.secs()
        }),
    ]
    .into_iter()
    .chain(pool_settings(PoolFlags::Yes))
    .collect()
}

/// The MS's settings.
pub fn ms_settings() -> Vec<Setting<MsConfig>> {
    type C = MsConfig;
    vec![
        key("listen", Kind::Text, |c: &mut C, v| c.listen = v.text()).flag(
            "listen",
            "ADDR",
            "address to listen on for clients (default 127.0.0.1:7101)",
        ),
        key("advertise", Kind::Text, |c: &mut C, v| {
            c.advertise = Some(v.text())
        })
        .flag(
            "advertise",
            "ADDR",
            "address given to clients (default: the bound address)",
        ),
        key("crs", Kind::Text, |c: &mut C, v| c.crs = v.text()).flag(
            "crs",
            "ADDR[,ADDR...]",
            "the CRS (default 127.0.0.1:7100); A,B,C: instances of one directory, used in turn when one fails",
        ),
        key("metrics", Kind::Text, |c: &mut C, v| c.metrics = Some(v.text())).flag(
            "metrics",
            "ADDR",
            "serve Prometheus metrics on http://ADDR/metrics",
        ),
        key("ms_key", Kind::Text, |c: &mut C, v| {
            c.ms_key_file = v.text().into()
        })
        .flag("ms-key", "FILE", "MSkey file (default ./mskey)"),
        key("capacity", U32, |c: &mut C, v| c.capacity = v.int()).flag(
            "capacity",
            "N",
            "most users logged in here",
        ),
        key("heartbeat_interval_secs", Kind::Secs, |c: &mut C, v| {
            c.heartbeat_interval = v.secs()
        })
        .flag(
            "heartbeat-interval",
            "SECS",
            "seconds between heartbeats to the CRS (default 3)",
        ),
        key("push_threads", COUNT, |c: &mut C, v| {
            c.push_threads = v.int()
        }),
        key("client_timeout_secs", Kind::Secs, |c: &mut C, v| {
            c.client_timeout = v.secs()
        })
        .flag(
            "client-timeout",
            "SECS",
            "seconds of client silence before a probe and logout (default 15)",
        ),
        key("fake_iterations", ITERATIONS, |c: &mut C, v| {
            c.fake_iterations = v.int()
        })
        .flag(
            "fake-iterations",
            "N",
            "PBKDF2 iterations shown for unknown names",
        )
        .flag_only(),
        key("login_rate_per_sec", Kind::Rate, |c: &mut C, v| {
            c.login_rate = v.rate()
        })
        .flag(
            "login-rate",
            "N",
            "login attempts a second from one address (default 5, burst 30; 0: no limit)",
        ),
        key("login_burst", U32, |c: &mut C, v| c.login_burst = v.int()),
        key("search_rate_per_sec", Kind::Rate, |c: &mut C, v| {
            c.search_rate = v.rate()
        }),
        key(
            "relay_rate_bytes_per_sec",
            Kind::Int { max: 1 << 40 },
            |c: &mut C, v| c.relay_rate = v.int::<u64>() as f64,
        ),
        key("probe_timeout_secs", Kind::Secs, |c: &mut C, v| {
            c.probe_timeout = v.secs()
        }),
        key("relay_queue_bytes", Kind::Int { max: 1 << 40 }, |c: &mut C, v| {
            c.relay_queue_bytes = v.int()
        }),
    ]
    .into_iter()
    .chain(pool_settings(PoolFlags::Yes))
    .collect()
}

/// The client program's configuration: the client's, and whom to log in
/// as at start.
#[derive(Clone, Debug, Default)]
pub struct ClientProgram {
    /// The client.
    pub client: ClientConfig,
    /// Log in as this user at start.
    pub user: Option<String>,
    /// File whose first line is the password.
    pub password_file: Option<PathBuf>,
}

/// The client's settings.
pub fn client_settings() -> Vec<Setting<ClientProgram>> {
    type C = ClientProgram;
    vec![
        key("crs", Kind::Text, |c: &mut C, v| c.client.crs = v.text()).flag(
            "crs",
            "ADDR[,ADDR...]",
            "the CRS (default 127.0.0.1:7100); A,B,C: instances of one directory, tried in turn",
        ),
        key("listen", Kind::Text, |c: &mut C, v| {
            c.client.listen = v.text()
        })
        .flag(
            "listen",
            "ADDR",
            "where this client listens (default 0.0.0.0:7300)",
        ),
        key("advertise_port", U16, |c: &mut C, v| {
            c.client.advertise_port = Some(v.int())
        })
        .flag(
            "advertise-port",
            "PORT",
            "the port buddies reach this client at, if forwarded to the listener",
        ),
        key("user", Kind::Text, |c: &mut C, v| c.user = Some(v.text())).flag(
            "user",
            "NAME",
            "log in as NAME at start",
        ),
        key("password_file", Kind::Text, |c: &mut C, v| {
            c.password_file = Some(v.text().into())
        })
        .flag(
            "password-file",
            "FILE",
            "read the password from the first line of FILE",
        ),
        key("crs_fingerprint", Kind::Text, |c: &mut C, v| {
            c.client.crs_fingerprint = Some(v.text())
        }),
        key("kdf_iterations", ITERATIONS, |c: &mut C, v| {
            c.client.kdf_iterations = v.int()
        })
        .flag("kdf-iterations", "N", "PBKDF2 iterations for new passwords"),
        key("insecure_kdf", Kind::Switch, |c: &mut C, v| {
            c.client.insecure_kdf = v.on()
        }),
        key("insecure_kdf", Kind::Switch, |c: &mut C, v| {
            c.client.insecure_kdf |= v.on()
        })
        .flag(
            "insecure-kdf",
            "",
            "allow fewer PBKDF2 iterations than 600000 (tests only)",
        )
        .flag_only(),
        key("rsa_bits", U32, |c: &mut C, v| c.client.rsa_bits = v.int()).flag(
            "rsa-bits",
            "N",
            "RSA key size for new accounts (default 2048)",
        ),
        key("download_dir", Kind::Text, |c: &mut C, v| {
            c.client.download_dir = v.text().into()
        })
        .flag(
            "download-dir",
            "DIR",
            "where received files go (default ~/Downloads)",
        ),
        key("state_dir", Kind::Text, |c: &mut C, v| {
            c.client.state_dir = v.text().into()
        })
        .flag(
            "state-dir",
            "DIR",
            "where the history and remembered buddy keys live (default ~/.local/state/ims)",
        ),
        key("auto_accept_files", Kind::Switch, |c: &mut C, v| {
            c.client.auto_accept_files = v.on()
        }),
        key("auto_accept_files", Kind::Switch, |c: &mut C, v| {
            c.client.auto_accept_files |= v.on()
        })
        .flag("auto-accept-files", "", "accept every file a buddy offers")
        .flag_only(),
        key("typing_notifications", Kind::Switch, |c: &mut C, v| {
            c.client.typing_notifications = v.on()
        }),
        key("resume_keep_secs", Kind::Secs, |c: &mut C, v| {
            c.client.resume_keep = v.secs()
        })
        .flag(
            "resume-keep-secs",
            "N",
            "keep a broken-off download's prefix this long for a resumption (default 86400)",
        ),
        key("keepalive_interval_secs", Kind::Secs, |c: &mut C, v| {
            c.client.keepalive_interval = v.secs()
        }),
        key("auto_away_secs", Kind::Secs, |c: &mut C, v| {
            c.client.auto_away = v.secs()
        }),
        key("rekey_messages", COUNT, |c: &mut C, v| {
            c.client.rekey_messages = v.int()
        }),
        key("rekey_interval_secs", Kind::Secs, |c: &mut C, v| {
            c.client.rekey_interval = v.secs()
        }),
        key("direct_connect_timeout_secs", Kind::Secs, |c: &mut C, v| {
            c.client.direct_connect_timeout = v.secs()
        })
        .flag(
            "direct-connect-timeout",
            "SECS",
            "seconds to try a buddy's listener before going through the relay (default 3)",
        ),
    ]
    .into_iter()
    .chain(pool_settings(PoolFlags::No))
    .collect()
}

/// Adds every flag of `table` to `opts`.
pub fn add_flags<C>(opts: &mut Options, table: &[Setting<C>]) {
    for f in table.iter().filter_map(|s| s.flag) {
        if f.hint.is_empty() {
            opts.optflag("", f.name, f.help);
        } else {
            opts.optopt("", f.name, f.help, f.hint);
        }
    }
}

/// A value from a file, checked against its kind.
fn from_toml(kind: Kind, v: &toml::Value) -> Result<Value, String> {
    let number = || match v {
        toml::Value::Float(f) => Ok(*f),
        toml::Value::Integer(i) => Ok(*i as f64),
        _ => Err(format!("expected a number, found {}", v.type_str())),
    };
    match kind {
        Kind::Text => v
            .as_str()
            .map(|s| Value::Text(s.to_owned()))
            .ok_or_else(|| format!("expected a string, found {}", v.type_str())),
        Kind::Switch => v
            .as_bool()
            .map(Value::Switch)
            .ok_or_else(|| format!("expected true or false, found {}", v.type_str())),
        Kind::Int { max } => match v.as_integer().map(u64::try_from) {
            Some(Ok(n)) if n <= max => Ok(Value::Int(n)),
            Some(_) => Err(format!("expected a whole number from 0 to {max}")),
            None => Err(format!("expected a whole number, found {}", v.type_str())),
        },
        Kind::Secs => duration(number()?).map(Value::Secs),
        Kind::Rate => Rate::try_from(number()?).map(|r| Value::Rate(r.0)),
    }
}

/// A flag's text, checked against its kind.
fn from_text(kind: Kind, s: &str) -> Result<Value, String> {
    let number = || {
        s.parse::<f64>()
            .map_err(|_| format!("'{s}' is not a valid number"))
    };
    match kind {
        Kind::Text => Ok(Value::Text(s.to_owned())),
        Kind::Switch => Ok(Value::Switch(true)),
        Kind::Int { max } => match s.parse::<u64>() {
            Ok(n) if n <= max => Ok(Value::Int(n)),
            _ => Err(format!("'{s}' is not a valid number (0 to {max})")),
        },
        Kind::Secs => duration(number()?).map(Value::Secs),
        Kind::Rate => Rate::try_from(number()?).map(|r| Value::Rate(r.0)),
    }
}

/// Reads the file at `path` into `c` through `table`.
pub fn load<C>(path: &Path, table: &[Setting<C>], c: &mut C) -> Result<(), ConfigError> {
    let fail = |message: String| ConfigError {
        path: path.to_owned(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let doc: toml::Table =
        toml::from_str(&text).map_err(|e| fail(e.to_string().trim().replace('\n', " ")))?;
    apply_table(&doc, "", table, c).map_err(fail)
}

fn apply_table<C>(
    doc: &toml::Table,
    prefix: &str,
    table: &[Setting<C>],
    c: &mut C,
) -> Result<(), String> {
    for (name, value) in doc {
        let full = format!("{prefix}{name}");
        if let toml::Value::Table(inner) = value {
            let sub = format!("{full}.");
            if table
                .iter()
                .any(|s| s.key.is_some_and(|k| k.starts_with(&sub)))
            {
                apply_table(inner, &sub, table, c)?;
                continue;
            }
        }
        let setting = table
            .iter()
            .find(|s| s.key == Some(full.as_str()))
            .ok_or_else(|| format!("unknown key `{full}`"))?;
        let v = from_toml(setting.kind, value).map_err(|e| format!("key `{full}`: {e}"))?;
        (setting.set)(c, v);
    }
    Ok(())
}

/// Applies the flags of `table` present in `m` to `c` (after a file).
pub fn apply_flags<C>(m: &Matches, table: &[Setting<C>], c: &mut C) -> Result<(), String> {
    for s in table {
        let Some(f) = s.flag else { continue };
        let v = if f.hint.is_empty() {
            if !m.opt_present(f.name) {
                continue;
            }
            Value::Switch(true)
        } else {
            let Some(text) = m.opt_str(f.name) else {
                continue;
            };
            from_text(s.kind, &text).map_err(|e| format!("--{}: {e}", f.name))?
        };
        (s.set)(c, v);
    }
    Ok(())
}

/// The longest duration a configuration may set: a week. Longer is a
/// typo, and would overflow deadlines computed from it.
pub const MAX_CONFIG_SECS: f64 = 7.0 * 86_400.0;

/// The most events a second a rate may allow.
pub const MAX_RATE: f64 = 1e6;

/// Seconds (possibly fractional) as a duration: finite, not negative, at
/// most [`MAX_CONFIG_SECS`]; the error says which rule `s` breaks.
pub fn duration(s: f64) -> Result<Duration, String> {
    if !s.is_finite() {
        return Err(format!("{s} is not a number of seconds"));
    }
    if s < 0.0 {
        return Err(format!("{s}: a duration cannot be negative"));
    }
    if s > MAX_CONFIG_SECS {
        return Err(format!("{s}: at most {MAX_CONFIG_SECS} seconds"));
    }
    Ok(Duration::from_secs_f64(s))
}

/// A duration key of a configuration file, checked by [`duration`] as it
/// is read (so the error names the file and the key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Secs(pub Duration);

impl TryFrom<f64> for Secs {
    type Error = String;

    fn try_from(s: f64) -> Result<Secs, String> {
        duration(s).map(Secs)
    }
}

/// A rate key (events a second) of a configuration file: finite, not
/// negative, at most [`MAX_RATE`].
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(try_from = "f64")]
pub struct Rate(pub f64);

impl TryFrom<f64> for Rate {
    type Error = String;

    fn try_from(r: f64) -> Result<Rate, String> {
        if r.is_finite() && (0.0..=MAX_RATE).contains(&r) {
            Ok(Rate(r))
        } else {
            Err(format!("{r}: a rate is a number from 0 to {MAX_RATE}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_examples_parse() {
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc");
        load(
            &etc.join("crs.toml"),
            &crs_settings(),
            &mut CrsConfig::default(),
        )
        .unwrap();
        load(
            &etc.join("ms.toml"),
            &ms_settings(),
            &mut MsConfig::default(),
        )
        .unwrap();
        let mut client = ClientProgram::default();
        load(&etc.join("client.toml"), &client_settings(), &mut client).unwrap();
    }

    #[test]
    fn every_key_and_flag_is_written_once() {
        fn check<C>(table: &[Setting<C>]) {
            let mut keys: Vec<_> = table.iter().filter_map(|s| s.key).collect();
            let n = keys.len();
            keys.sort();
            keys.dedup();
            assert_eq!(keys.len(), n, "a file key twice");
            let mut flags: Vec<_> = table
                .iter()
                .filter_map(|s| s.flag.map(|f| f.name))
                .collect();
            let n = flags.len();
            flags.sort();
            flags.dedup();
            assert_eq!(flags.len(), n, "a flag twice");
        }
        check(&crs_settings());
        check(&ms_settings());
        check(&client_settings());
    }

    #[test]
    fn unknown_key_and_wrong_type_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crs.toml");
        let table = crs_settings();
        let load_crs = |text: &str| {
            std::fs::write(&p, text).unwrap();
            let mut c = CrsConfig::default();
            load(&p, &table, &mut c).map(|()| c)
        };
        let e = load_crs("listen = \"1.2.3.4:5\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus") && e.contains("crs.toml"), "{e}");
        let e = load_crs("registration_open = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("registration_open"), "{e}");
        let e = load_crs("[pool]\nbogus = 3\n").unwrap_err().to_string();
        assert!(e.contains("pool.bogus"), "{e}");
        let e = load_crs("min_iterations = -5\n").unwrap_err().to_string();
        assert!(e.contains("min_iterations"), "{e}");
        let c = load_crs("listen = \"0.0.0.0:1\"\n[pool]\nworkers = 3\n").unwrap();
        assert_eq!(c.pool.workers, 3);
        assert_eq!(c.listen, "0.0.0.0:1");
    }

    #[test]
    fn bad_durations_and_rates_are_refused_naming_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ms.toml");
        let table = ms_settings();
        for (text, key) in [
            ("heartbeat_interval_secs = inf\n", "heartbeat_interval_secs"),
            ("heartbeat_interval_secs = nan\n", "heartbeat_interval_secs"),
            ("client_timeout_secs = -1\n", "client_timeout_secs"),
            ("client_timeout_secs = 1e300\n", "client_timeout_secs"),
            ("[pool]\nidle_timeout_secs = -inf\n", "idle_timeout_secs"),
            (
                "[pool]\nmessage_deadline_secs = 1e19\n",
                "message_deadline_secs",
            ),
            ("login_rate_per_sec = nan\n", "login_rate_per_sec"),
            ("search_rate_per_sec = -2\n", "search_rate_per_sec"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = load(&p, &table, &mut MsConfig::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains("ms.toml"), "{text}: {e}");
        }
        std::fs::write(
            &p,
            "heartbeat_interval_secs = 2.5\nclient_timeout_secs = 0\n",
        )
        .unwrap();
        let mut c = MsConfig::default();
        load(&p, &table, &mut c).unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_millis(2500));
        assert_eq!(c.client_timeout, Duration::ZERO);
    }

    #[test]
    fn flags_go_through_the_same_table() {
        let table = ms_settings();
        let mut opts = Options::new();
        add_flags(&mut opts, &table);
        let parse = |args: &[&str]| {
            let m = opts.parse(args).unwrap();
            let mut c = MsConfig::default();
            apply_flags(&m, &table, &mut c).map(|()| c)
        };
        let c = parse(&[
            "--capacity",
            "7",
            "--heartbeat-interval",
            "0.5",
            "--workers",
            "0",
        ])
        .unwrap();
        assert_eq!(c.capacity, 7);
        assert_eq!(c.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.pool.workers, 1);
        for bad in [
            ["--heartbeat-interval", "inf"],
            ["--client-timeout", "-3"],
            ["--capacity", "lots"],
            ["--login-rate", "NaN"],
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.contains(bad[0]), "{e}");
        }
    }
}
