//! `ims-client`: the line-based messenger client.

use std::path::PathBuf;
use std::process::ExitCode;

use getopts::Options;
use ims::cli::{self, set, Parsed};
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
    opts.optopt(
        "",
        "crs",
        "the CRS (default 127.0.0.1:7100); A,B,C: instances of one directory, tried in turn",
        "ADDR[,ADDR...]",
    );
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
        set(&mut c.crs, f.crs);
        set(&mut c.listen, f.listen);
        if f.advertise_port.is_some() {
            c.advertise_port = f.advertise_port;
        }
        if f.crs_fingerprint.is_some() {
            c.crs_fingerprint = f.crs_fingerprint;
        }
        set(&mut c.kdf_iterations, f.kdf_iterations);
        set(&mut c.insecure_kdf, f.insecure_kdf);
        set(&mut c.rsa_bits, f.rsa_bits);
        set(&mut c.download_dir, f.download_dir);
        set(&mut c.auto_accept_files, f.auto_accept_files);
        set(
            &mut c.keepalive_interval,
            f.keepalive_interval_secs.map(config::secs),
        );
        f.pool.apply(&mut c.pool);
        user = f.user;
        password_file = f.password_file;
    }
    set(&mut c.crs, m.opt_str("crs"));
    set(&mut c.listen, m.opt_str("listen"));
    set(
        &mut c.advertise_port,
        cli::num(m, "advertise-port")?.map(Some),
    );
    set(&mut c.kdf_iterations, cli::num(m, "kdf-iterations")?);
    if m.opt_present("insecure-kdf") {
        c.insecure_kdf = true;
    }
    set(&mut c.rsa_bits, cli::num(m, "rsa-bits")?);
    set(
        &mut c.download_dir,
        m.opt_str("download-dir").map(Into::into),
    );
    if m.opt_present("auto-accept-files") {
        c.auto_accept_files = true;
    }
    Ok((c, user, password_file))
}
