//! `ims-ms`: a messaging server.

use std::path::PathBuf;
use std::process::ExitCode;

use getopts::Options;
use ims::cli::{self, Parsed};
use ims::config;
use ims::ms::{self, MsConfig};

/// Threads here allocate and free each other's buffers (the gate reads,
/// a worker replies and drops): see `Cargo.toml` on why mimalloc.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "Usage: ims-ms [options]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut opts = Options::new();
    opts.optopt("c", "config", "configuration file (TOML)", "FILE");
    config::add_flags(&mut opts, &config::ms_settings());
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
    let table = config::ms_settings();
    let mut c = MsConfig::default();
    if let Some(path) = m.opt_str("config") {
        config::load(&PathBuf::from(path), &table, &mut c).map_err(|e| e.to_string())?;
    }
    config::apply_flags(m, &table, &mut c)?;
    Ok(c)
}
