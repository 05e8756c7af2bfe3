//! `ims-client`: the messenger client: full screen on a terminal, lines
//! of text (`--plain`) or JSON (`--json`) otherwise.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use getopts::Options;
use ims::cli::{self, Parsed};
use ims::client::ui::{self, history, Mode, Passwords};
use ims::config::{self, ClientProgram};

const USAGE: &str = "Usage:
  ims-client register NAME [options]     create an account
  ims-client [options]                   run the client (type /help for commands)

On a terminal the client runs full screen and logs to a file; with --plain, or
when stdin or stdout is not a terminal, it prints one line per event.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Options::new();
    opts.optopt(
        "c",
        "config",
        "configuration file (default $XDG_CONFIG_HOME/ims/client.toml if present)",
        "FILE",
    );
    opts.optflag(
        "",
        "json",
        "one JSON object per line on stdout for every event",
    );
    opts.optflag(
        "",
        "plain",
        "one line of text per event, commands from stdin lines (no full screen)",
    );
    opts.optopt(
        "",
        "log-file",
        "append logs to FILE (default in full screen: $XDG_STATE_HOME/ims/client.log; otherwise stderr)",
        "FILE",
    );
    config::add_flags(&mut opts, &config::client_settings());
    let m = match cli::parse("ims-client", USAGE, opts, &args) {
        Parsed::Run(m) => m,
        Parsed::Done => return ExitCode::SUCCESS,
        Parsed::Usage => return ExitCode::from(2),
    };
    let json = m.opt_present("json");
    let mode = Mode::choose(m.opt_present("plain"), json);
    if let Err(e) = init_logging(m.opt_str("log-file").map(PathBuf::from), mode) {
        eprintln!("ims-client: {e}");
        return ExitCode::from(2);
    }
    let ClientProgram {
        client: config,
        user,
        password_file,
    } = match build_config(&m) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ims-client: {e}");
            return ExitCode::from(2);
        }
    };
    let passwords = Passwords {
        file: password_file,
    };
    let code = match m
        .free
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["register", name] => ui::register(config, name, &passwords, Default::default(), json),
        [] => ui::run(config, mode, user, passwords),
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

/// Logs (`RUST_LOG`, default `info`) go to `file` if given, else to the
/// state directory's `client.log` in full screen (where stderr would write
/// over the screen), else to stderr.
fn init_logging(file: Option<PathBuf>, mode: Mode) -> Result<(), String> {
    let file = file.or_else(|| {
        (mode == Mode::Screen)
            .then(history::state_dir)
            .flatten()
            .map(|d| d.join("client.log"))
    });
    let Some(path) = file else {
        cli::init_logging();
        return Ok(());
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    // Logs name buddies and addresses: for their owner only.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("log file {}: {e}", path.display()))?;
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .target(env_logger::Target::Pipe(Box::new(out)))
        .init();
    Ok(())
}

fn build_config(m: &getopts::Matches) -> Result<ClientProgram, String> {
    let table = config::client_settings();
    let mut c = ClientProgram::default();
    let path = m.opt_str("config").map(PathBuf::from).or_else(|| {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        let p = base.join("ims/client.toml");
        p.exists().then_some(p)
    });
    if let Some(path) = path {
        config::load(&path, &table, &mut c).map_err(|e| e.to_string())?;
    }
    config::apply_flags(m, &table, &mut c)?;
    Ok(c)
}
