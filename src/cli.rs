//! What the three programs share around `main`: logging set-up, flag
//! parsing helpers, and the exit-code convention (0 success, 1 runtime
//! failure, 2 usage error), so each binary stays a thin shell.

use std::io::Write;

use getopts::{Matches, Options};

/// Starts logging to stderr through `log`/`env_logger`: `RUST_LOG`
/// chooses the level, `info` by default.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
}

/// The outcome of parsing flags.
pub enum Parsed {
    /// Go on with these.
    Run(Matches),
    /// `--help` or `--version` was printed: exit 0.
    Done,
    /// Bad flags: the message is printed; exit 2.
    Usage,
}

/// Parses `args` with `opts` (which gets `--help` and `--version` added).
pub fn parse(prog: &str, usage: &str, mut opts: Options, args: &[String]) -> Parsed {
    opts.optflag("h", "help", "print this help");
    opts.optflag("V", "version", "print the version");
    match opts.parse(args) {
        Ok(m) if m.opt_present("help") => {
            print!("{}", opts.usage(usage));
            Parsed::Done
        }
        Ok(m) if m.opt_present("version") => {
            println!("{prog} {}", env!("CARGO_PKG_VERSION"));
            Parsed::Done
        }
        Ok(m) => Parsed::Run(m),
        Err(e) => {
            eprintln!("{prog}: {e}; see {prog} --help");
            Parsed::Usage
        }
    }
}

/// Prints the bound address on stdout as `listening on ADDR`, the line
/// scripts and tests wait for.
pub fn announce(addr: std::net::SocketAddr) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "listening on {addr}")
        .and_then(|()| out.flush())
        .is_err()
    {
        log::warn!("stdout is closed");
    }
}
