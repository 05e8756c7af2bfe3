//! `ims-crs`: the central repository server, and its operator commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use getopts::Options;
use ims::cli::{self, set, Parsed};
use ims::config::{self, CrsFile};
use ims::crs::store::StoreSpec;
use ims::crs::{self, CrsConfig};
use ims::link::{CrsLink, Identity};
use ims::proto::crs::{CrsRequest, MsInfo};
use ims::proto::Fields;

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
        "listen",
        "address to listen on (default 127.0.0.1:7100)",
        "ADDR",
    );
    opts.optopt("", "data", "data directory (default ./ims-crs-data)", "DIR");
    opts.optopt(
        "",
        "store",
        "where the data lives: sled:DIR (default: sled in --data) or postgres://USER@HOST/DB",
        "STORE",
    );
    opts.optopt("", "ms-key", "MSkey file (default ./mskey)", "FILE");
    opts.optopt(
        "",
        "metrics",
        "serve Prometheus metrics on http://ADDR/metrics",
        "ADDR",
    );
    opts.optopt(
        "",
        "crs",
        "for operator commands: the running CRS (default: the listen address); A,B: any of these",
        "ADDR[,ADDR...]",
    );
    opts.optopt("", "workers", "worker threads", "N");
    opts.optopt(
        "",
        "message-deadline",
        "seconds within which one whole request must arrive (default 10)",
        "SECS",
    );
    opts.optopt(
        "",
        "min-iterations",
        "fewest PBKDF2 iterations a registration may use",
        "N",
    );
    opts.optflag("", "close-registration", "refuse self-registration");
    opts.optopt("", "from", "migrate: the store to copy", "STORE");
    opts.optopt("", "to", "migrate: the empty store to copy into", "STORE");
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
    let mut c = CrsConfig::default();
    if let Some(path) = m.opt_str("config") {
        let f: CrsFile = config::load(&PathBuf::from(path)).map_err(|e| e.to_string())?;
        set(&mut c.listen, f.listen);
        set(&mut c.data_dir, f.data_dir);
        if let Some(store) = f.store {
            c.store = Some(StoreSpec::parse(&store)?);
        }
        set(&mut c.metrics, f.metrics.map(Some));
        set(&mut c.ms_key_file, f.ms_key);
        set(&mut c.registration_open, f.registration_open);
        set(
            &mut c.heartbeat_timeout,
            f.heartbeat_timeout_secs.map(config::secs),
        );
        set(&mut c.lock_lease, f.lock_lease_secs.map(config::secs));
        set(&mut c.min_iterations, f.min_iterations);
        set(&mut c.max_search_results, f.max_search_results);
        f.pool.apply(&mut c.pool);
    }
    set(&mut c.listen, m.opt_str("listen"));
    set(&mut c.data_dir, m.opt_str("data").map(Into::into));
    if let Some(store) = m.opt_str("store") {
        c.store = Some(StoreSpec::parse(&store)?);
    }
    set(&mut c.metrics, m.opt_str("metrics").map(Some));
    set(&mut c.ms_key_file, m.opt_str("ms-key").map(Into::into));
    set(&mut c.pool.workers, cli::num(m, "workers")?);
    set(
        &mut c.pool.message_deadline,
        cli::num::<f64>(m, "message-deadline")?.map(config::secs),
    );
    set(&mut c.min_iterations, cli::num(m, "min-iterations")?);
    if m.opt_present("close-registration") {
        c.registration_open = false;
    }
    Ok(c)
}

fn migrate(m: &getopts::Matches, config: &CrsConfig) -> Result<(), String> {
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
    let me = Identity {
        listen: "operator".into(),
        capacity: 0,
        role: "admin",
        instance: String::new(),
    };
    // Any instance of the directory will do: the first that answers.
    let mut link = None;
    let mut last = format!("no CRS address in {crs:?}");
    for one in ims::link::crs_list(&crs) {
        match CrsLink::connect(&one, &key, &me, Duration::from_secs(10)) {
            Ok(l) => {
                link = Some(l);
                break;
            }
            Err(e) => last = format!("{e} (is the CRS running at {one}?)"),
        }
    }
    let mut link = link.ok_or(last)?;
    let req = match (what, rest) {
        ("user", ["list"]) => CrsRequest::ListUsers {
            after: None,
            limit: 10_000,
        },
        ("user", ["show", name]) => CrsRequest::ShowUser {
            user: name.to_string(),
        },
        ("user", ["delete", name]) => CrsRequest::DeleteUser {
            user: name.to_string(),
        },
        ("ms", ["list"]) => CrsRequest::ListMs,
        _ => {
            return Err(format!(
                "unknown command '{what} {}'; see ims-crs --help",
                rest.join(" ")
            ))
        }
    };
    let reply = link.call(&req).map_err(|e| e.to_string())?;
    if !reply.is_success() {
        return Err(reply.reason().unwrap_or("refused").to_owned());
    }
    match req {
        CrsRequest::ListUsers { .. } => {
            let names: Vec<String> = reply.json().map_err(|e| e.to_string())?;
            for n in names {
                println!("{n}");
            }
        }
        CrsRequest::ListMs => {
            let list: Vec<MsInfo> = reply.json().map_err(|e| e.to_string())?;
            println!(
                "{:<4} {:<24} {:>8} {:>8} {:>10}",
                "id", "address", "load", "capacity", "heartbeat"
            );
            for ms in list {
                println!(
                    "{:<4} {:<24} {:>8} {:>8} {:>9}s",
                    ms.id, ms.address, ms.load, ms.capacity, ms.last_heartbeat_secs
                );
            }
        }
        CrsRequest::ShowUser { .. } => println!("{}", String::from_utf8_lossy(&reply.body)),
        _ => println!("ok"),
    }
    Ok(())
}
