//! Process limits the servers depend on: open files.
//!
//! Every held connection costs a file descriptor, and the usual soft limit
//! (1,024) is far below what a gate can hold. The servers raise the soft
//! limit to the hard limit once at start and log both.

use std::sync::OnceLock;

use log::{info, warn};

/// File descriptors kept free of connections for everything else a
/// program opens: its data files (sled keeps a few dozen), its outgoing
/// links, the poller and log files.
pub const FD_RESERVE: u64 = 256;

/// Connections at once from one source address by default. High because
/// many honest users may share one address (carrier-grade NAT, an office);
/// low enough that one address cannot take every descriptor of a server.
pub const MAX_PER_SOURCE: usize = 4096;

/// The soft limit when it cannot be read: the usual Linux default.
const ASSUMED_LIMIT: u64 = 1024;

/// Raises this process's open-files soft limit to its hard limit (once;
/// later calls return the same value) and returns the limit in force.
pub fn raise_open_files_limit() -> u64 {
    static LIMIT: OnceLock<u64> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(now) => {
                info!(
                    "open-files limit: {now} (was {})",
                    before.map_or_else(|_| "unknown".to_owned(), |b| b.to_string())
                );
                now
            }
            Err(e) => {
                let soft = before.unwrap_or(ASSUMED_LIMIT);
                warn!("cannot raise the open-files limit ({e}); it stays {soft}");
                soft
            }
        }
    })
}
