//! SIGINT and SIGTERM stop a server gracefully; a second one ends the
//! process at once, for when a graceful stop hangs.

use std::io;
use std::thread::{self, JoinHandle};

use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use super::Stopper;

/// The thread that turns signals into [`Stopper::stop`]. Dropping it (or
/// [`SignalWatch::close`]) ends that thread and unregisters the handlers;
/// keep it alive for as long as signals should stop the server.
pub struct SignalWatch {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

/// Starts a thread that calls `stopper.stop()` on the first SIGINT or
/// SIGTERM. A second signal ends the process with that signal's default
/// action. The thread never keeps the process alive: it is an ordinary
/// thread that `main` returning ends, and the watch's drop closes it.
pub fn stop_on_signals(stopper: Stopper) -> io::Result<SignalWatch> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let thread = thread::Builder::new()
        .name("ims-signals".to_owned())
        .spawn(move || {
            let mut stopping = false;
            for signal in signals.forever() {
                if stopping {
                    warn!("signal {signal} again: exiting now");
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                    // Only reached if the default action did not end us.
                    std::process::exit(128 + signal);
                }
                stopping = true;
                info!("signal {signal}: stopping");
                stopper.stop();
            }
        })?;
    Ok(SignalWatch {
        handle,
        thread: Some(thread),
    })
}

impl SignalWatch {
    /// Stops watching: ends the thread and unregisters the handlers.
    pub fn close(self) {}
}

impl Drop for SignalWatch {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
