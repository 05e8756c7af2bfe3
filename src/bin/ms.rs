//! `ims-ms`: a messaging server.

use std::path::PathBuf;
use std::process::ExitCode;

use getopts::Options;
use ims::cli::{self, set, Parsed};
use ims::config::{self, MsFile};
use ims::ms::{self, MsConfig};

const USAGE: &str = "Usage: ims-ms [options]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Options::new();
    opts.optopt("c", "config", "configuration file (TOML)", "FILE");
    opts.optopt(
        "",
        "listen",
        "address to listen on for clients (default 127.0.0.1:7101)",
        "ADDR",
    );
    opts.optopt(
        "",
        "advertise",
        "address given to clients (default: the bound address)",
        "ADDR",
    );
    opts.optopt(
        "",
        "crs",
        "the CRS (default 127.0.0.1:7100); A,B,C: instances of one directory, used in turn when one fails",
        "ADDR[,ADDR...]",
    );
    opts.optopt("", "ms-key", "MSkey file (default ./mskey)", "FILE");
    opts.optopt(
        "",
        "metrics",
        "serve Prometheus metrics on http://ADDR/metrics",
        "ADDR",
    );
    opts.optopt("", "capacity", "most users logged in here", "N");
    opts.optopt("", "workers", "worker threads", "N");
    opts.optopt(
        "",
        "heartbeat-interval",
        "seconds between heartbeats to the CRS (default 3)",
        "SECS",
    );
    opts.optopt(
        "",
        "message-deadline",
        "seconds within which one whole request must arrive (default 10)",
        "SECS",
    );
    opts.optopt(
        "",
        "fake-iterations",
        "PBKDF2 iterations shown for unknown names",
        "N",
    );
    opts.optopt(
        "",
        "client-timeout",
        "seconds of client silence before a probe and logout (default 15)",
        "SECS",
    );
    opts.optopt(
        "",
        "login-rate",
        "login attempts a second from one address (default 5, burst 30; 0: no limit)",
        "N",
    );
    let m = match cli::parse("ims-ms", USAGE, opts, &args) {
        Parsed::Run(m) => m,
        Parsed::Done => return ExitCode::SUCCESS,
        Parsed::Usage => return ExitCode::from(2),
    };
    cli::init_logging();
    let config = match build_config(&m) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ims-ms: {e}");
            return ExitCode::from(2);
        }
    };
    if !m.free.is_empty() {
        eprintln!(
            "ims-ms: unexpected argument '{}'; see ims-ms --help",
            m.free.join(" ")
        );
        return ExitCode::from(2);
    }
    let running = match ms::start(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ims-ms: {e}");
            return ExitCode::from(1);
        }
    };
    let _signals = match ims::prethread::stop_on_signals(running.stopper()) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("ims-ms: signals: {e}");
            return ExitCode::from(1);
        }
    };
    cli::announce(running.local_addr());
    running.join();
    log::info!("MS stopped");
    ExitCode::SUCCESS
}

fn build_config(m: &getopts::Matches) -> Result<MsConfig, String> {
    let mut c = MsConfig::default();
    if let Some(path) = m.opt_str("config") {
        let f: MsFile = config::load(&PathBuf::from(path)).map_err(|e| e.to_string())?;
        set(&mut c.listen, f.listen);
        if f.advertise.is_some() {
            c.advertise = f.advertise;
        }
        set(&mut c.crs, f.crs);
        set(&mut c.ms_key_file, f.ms_key);
        set(&mut c.capacity, f.capacity);
        set(
            &mut c.heartbeat_interval,
            f.heartbeat_interval_secs.map(config::secs),
        );
        set(&mut c.push_threads, f.push_threads);
        set(
            &mut c.client_timeout,
            f.client_timeout_secs.map(config::secs),
        );
        set(&mut c.login_rate, f.login_rate_per_sec);
        set(&mut c.login_burst, f.login_burst);
        set(&mut c.search_rate, f.search_rate_per_sec);
        set(&mut c.metrics, f.metrics.map(Some));
        f.pool.apply(&mut c.pool);
    }
    set(&mut c.listen, m.opt_str("listen"));
    set(&mut c.advertise, m.opt_str("advertise").map(Some));
    set(&mut c.crs, m.opt_str("crs"));
    set(&mut c.metrics, m.opt_str("metrics").map(Some));
    set(&mut c.ms_key_file, m.opt_str("ms-key").map(Into::into));
    set(&mut c.capacity, cli::num(m, "capacity")?);
    set(&mut c.pool.workers, cli::num(m, "workers")?);
    set(
        &mut c.heartbeat_interval,
        cli::num::<f64>(m, "heartbeat-interval")?.map(config::secs),
    );
    set(
        &mut c.pool.message_deadline,
        cli::num::<f64>(m, "message-deadline")?.map(config::secs),
    );
    set(&mut c.fake_iterations, cli::num(m, "fake-iterations")?);
    set(
        &mut c.client_timeout,
        cli::num::<f64>(m, "client-timeout")?.map(config::secs),
    );
    set(&mut c.login_rate, cli::num(m, "login-rate")?);
    Ok(c)
}
