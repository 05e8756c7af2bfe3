//! `ims-client`: the line-based messenger client.

use std::path::PathBuf;
use std::process::ExitCode;

use getopts::Options;
use ims::cli::{self, Parsed};
use ims::client::ui::{self, Passwords};
use ims::config::{self, ClientProgram};

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
    opts.optflag(
        "",
        "json",
        "one JSON object per line on stdout for every event",
    );
    config::add_flags(&mut opts, &config::client_settings());
    let m = match cli::parse("ims-client", USAGE, opts, &args) {
        Parsed::Run(m) => m,
        Parsed::Done => return ExitCode::SUCCESS,
        Parsed::Usage => return ExitCode::from(2),
    };
    cli::init_logging();
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
    let json = m.opt_present("json");
    let code = match m
        .free
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["register", name] => ui::register(config, name, &passwords, Default::default(), json),
        [] => ui::run(config, json, user, passwords),
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
