//! `ims-client`: the line-based messenger client.

use std::path::PathBuf;
use std::process::ExitCode;

use getopts::Options;
use ims::cli::{self, Parsed};
use ims::client::ui::{self, Passwords};
use ims::client::ClientConfig;
use ims::config::{self, ClientFile};

const USAGE: &str = "Usage:
  ims-client register NAME [options]     create an account
  ims-client [options]                   run the client (type /help for commands)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Options::new();
    opts.optopt(
        "c",
        "config",
        "configuration file (default $XDG_CONFIG_HOME/ims/client.toml if present)",
        "FILE",
    );
    opts.optopt("", "crs", "the CRS (default 127.0.0.1:7100)", "ADDR");
    opts.optopt(
        "",
        "listen",
        "where this client listens (default 0.0.0.0:7300)",
        "ADDR",
    );
    opts.optopt(
        "",
        "advertise-port",
        "the port buddies reach this client at, if forwarded to the listener",
        "PORT",
    );
    opts.optopt("", "user", "log in as NAME at start", "NAME");
    opts.optopt(
        "",
        "password-file",
        "read the password from the first line of FILE",
        "FILE",
    );
    opts.optflag(
        "",
        "json",
        "one JSON object per line on stdout for every event",
    );
    opts.optopt(
        "",
        "kdf-iterations",
        "PBKDF2 iterations for new passwords",
        "N",
    );
    opts.optflag(
        "",
        "insecure-kdf",
        "allow fewer PBKDF2 iterations than 600000 (tests only)",
    );
    opts.optopt(
        "",
        "rsa-bits",
        "RSA key size for new accounts (default 2048)",
        "N",
    );
    opts.optopt(
        "",
        "download-dir",
        "where received files go (default ~/Downloads)",
        "DIR",
    );
    opts.optflag("", "auto-accept-files", "accept every file a buddy offers");
    let m = match cli::parse("ims-client", USAGE, opts, &args) {
        Parsed::Run(m) => m,
        Parsed::Done => return ExitCode::SUCCESS,
        Parsed::Usage => return ExitCode::from(2),
    };
    cli::init_logging();
    let (config, file_user, file_password) = match build_config(&m) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ims-client: {e}");
            return ExitCode::from(2);
        }
    };
    let passwords = Passwords {
        file: m
            .opt_str("password-file")
            .map(PathBuf::from)
            .or(file_password),
    };
    let json = m.opt_present("json");
    let code = match m
        .free
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["register", name] => ui::register(config, name, &passwords, Default::default(), json),
        [] => ui::run(config, json, m.opt_str("user").or(file_user), passwords),
        other => {
            eprintln!(
                "ims-client: unknown command '{}'; see ims-client --help",
                other.join(" ")
            );
            2
        }
    };
    ExitCode::from(code as u8)
}

type Built = (ClientConfig, Option<String>, Option<PathBuf>);

fn build_config(m: &getopts::Matches) -> Result<Built, String> {
    let mut c = ClientConfig::default();
    let path = m.opt_str("config").map(PathBuf::from).or_else(|| {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        let p = base.join("ims/client.toml");
        p.exists().then_some(p)
    });
    let (mut user, mut password_file) = (None, None);
    if let Some(path) = path {
        let f: ClientFile = config::load(&path).map_err(|e| e.to_string())?;
        if let Some(v) = f.crs {
            c.crs = v;
        }
        if let Some(v) = f.listen {
            c.listen = v;
        }
        if f.advertise_port.is_some() {
            c.advertise_port = f.advertise_port;
        }
        if f.crs_fingerprint.is_some() {
            c.crs_fingerprint = f.crs_fingerprint;
        }
        if let Some(v) = f.kdf_iterations {
            c.kdf_iterations = v;
        }
        if let Some(v) = f.insecure_kdf {
            c.insecure_kdf = v;
        }
        if let Some(v) = f.rsa_bits {
            c.rsa_bits = v;
        }
        if let Some(v) = f.download_dir {
            c.download_dir = v;
        }
        if let Some(v) = f.auto_accept_files {
            c.auto_accept_files = v;
        }
        if let Some(v) = f.keepalive_interval_secs {
            c.keepalive_interval = config::secs(v);
        }
        f.pool.apply(&mut c.pool);
        user = f.user;
        password_file = f.password_file;
    }
    if let Some(v) = m.opt_str("crs") {
        c.crs = v;
    }
    if let Some(v) = m.opt_str("listen") {
        c.listen = v;
    }
    if let Some(v) = cli::num(m, "advertise-port")? {
        c.advertise_port = Some(v);
    }
    if let Some(v) = cli::num(m, "kdf-iterations")? {
        c.kdf_iterations = v;
    }
    if m.opt_present("insecure-kdf") {
        c.insecure_kdf = true;
    }
    if let Some(v) = cli::num(m, "rsa-bits")? {
        c.rsa_bits = v;
    }
    if let Some(v) = m.opt_str("download-dir") {
        c.download_dir = v.into();
    }
    if m.opt_present("auto-accept-files") {
        c.auto_accept_files = true;
    }
    Ok((c, user, password_file))
}
