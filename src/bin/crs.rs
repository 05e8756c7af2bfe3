//! `ims-crs`: the central repository server, and its operator commands.

use std::path::PathBuf;
use std::process::ExitCode;

use getopts::Options;
use ims::cli::{self, Parsed};
use ims::config;
use ims::crs::{self, CrsConfig};

/// Threads here allocate and free each other's buffers (the gate reads,
/// a worker replies and drops): see `Cargo.toml` on why mimalloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "Usage:
  ims-crs genkey FILE                       write a new random MSkey to FILE (mode 0600)
  ims-crs [options]                         run the CRS
  ims-crs user list | user show NAME | user delete NAME   (operator; talks to the running CRS)
  ims-crs ms list                           enrolled MSs, load, last heartbeat
  ims-crs migrate --from STORE --to STORE   copy a directory (e.g. sled:DIR to postgres://...)
                                            into an empty store, verified by counts and checksum";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Options::new();
    opts.optopt("c", "config", "configuration file (TOML)", "FILE");
    opts.optopt(
        "",
        "crs",
        "for operator commands: the running CRS (default: the listen address); A,B: any of these",
        "ADDR[,ADDR...]",
    );
    opts.optopt("", "from", "migrate: the store to copy", "STORE");
    opts.optopt("", "to", "migrate: the empty store to copy into", "STORE");
    config::add_flags(&mut opts, &config::crs_settings());
    let m = match cli::parse("ims-crs", USAGE, opts, &args) {
        Parsed::Run(m) => m,
        Parsed::Done => return ExitCode::SUCCESS,
        Parsed::Usage => return ExitCode::from(2),
    };
    cli::init_logging();
    let config = match build_config(&m) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ims-crs: {e}");
            return ExitCode::from(2);
        }
    };
    let free: Vec<&str> = m.free.iter().map(String::as_str).collect();
    let result = match free.as_slice() {
        [] => serve(config),
        ["genkey", file] => {
            ims::keyfile::generate_ms_key(&PathBuf::from(file)).map_err(|e| e.to_string())
        }
        ["user", rest @ ..] | ["ms", rest @ ..] => operator(&m, &config, free[0], rest),
        ["migrate"] => migrate(&m, &config),
        _ => {
            eprintln!(
                "ims-crs: unknown command '{}'; see ims-crs --help",
                free.join(" ")
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ims-crs: {e}");
            ExitCode::from(1)
        }
    }
}

fn build_config(m: &getopts::Matches) -> Result<CrsConfig, String> {
    let table = config::crs_settings();
    let mut c = CrsConfig::default();
    if let Some(path) = m.opt_str("config") {
        config::load(&PathBuf::from(path), &table, &mut c).map_err(|e| e.to_string())?;
    }
    config::apply_flags(m, &table, &mut c)?;
    Ok(c)
}

fn migrate(m: &getopts::Matches, config: &CrsConfig) -> Result<(), String> {
    use ims::crs::store::StoreSpec;
    let (Some(from), Some(to)) = (m.opt_str("from"), m.opt_str("to")) else {
        return Err("migrate needs --from STORE and --to STORE".into());
    };
    let (from, to) = (StoreSpec::parse(&from)?, StoreSpec::parse(&to)?);
    let key = ims::keyfile::read_ms_key(&config.ms_key_file).map_err(|e| e.to_string())?;
    let r = crs::migrate::migrate(&from, &to, &key)?;
    println!(
        "migrated {} users, {} contacts, {} requests; checksum {} verified{}",
        r.users,
        r.contacts,
        r.requests,
        r.checksum,
        if r.key_copied { "; CRS key copied" } else { "" }
    );
    Ok(())
}

fn serve(config: CrsConfig) -> Result<(), String> {
    let running = crs::start(config).map_err(|e| e.to_string())?;
    let _signals =
        ims::prethread::stop_on_signals(running.stopper()).map_err(|e| format!("signals: {e}"))?;
    cli::announce(running.local_addr());
    running.join();
    log::info!("CRS stopped");
    Ok(())
}

fn operator(
    m: &getopts::Matches,
    config: &CrsConfig,
    what: &str,
    rest: &[&str],
) -> Result<(), String> {
    let key = ims::keyfile::read_ms_key(&config.ms_key_file).map_err(|e| e.to_string())?;
    let crs = m.opt_str("crs").unwrap_or_else(|| config.listen.clone());
    print!("{}", crs::operator::run(&crs, &key, what, rest)?);
    Ok(())
}
