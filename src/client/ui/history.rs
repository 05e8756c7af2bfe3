//! The input line's history: commands only, never what was said (a
//! message's text is dropped from `/msg`, and plain lines and `/me` are not
//! kept), and one file per account, so that people sharing an OS account
//! do not see each other's commands. Before a login the history lives in
//! memory only.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

/// Entries kept (older ones are dropped when the file is read).
pub const MAX_ENTRIES: usize = 1000;
/// Longest entry kept: longer lines are no commands worth recalling.
pub const MAX_ENTRY: usize = 1024;

/// The state directory: `$XDG_STATE_HOME/ims` or `~/.local/state/ims`.
pub fn state_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("ims"))
}

/// What of `line` may be kept: `None` for text said to someone.
pub fn keepable(line: &str) -> Option<String> {
    let line = line.trim();
    if !line.starts_with('/') || line.len() > MAX_ENTRY {
        return None;
    }
    let mut words = line.splitn(3, ' ');
    match (words.next(), words.next()) {
        (Some("/me"), _) => None,
        // The names only: the text is what was said.
        (Some("/msg"), Some(names)) => Some(format!("/msg {names} ")),
        _ => Some(line.to_owned()),
    }
}

/// The history of the input line.
#[derive(Debug, Default)]
pub struct History {
    entries: Vec<String>,
    /// Where entries of the logged-in account are appended.
    file: Option<PathBuf>,
    /// While browsing with Up and Down: the entry shown.
    cursor: Option<usize>,
}

impl History {
    /// Switches to `user`'s history: entries so far (typed before the
    /// login) are kept in front of theirs.
    pub fn open_account(&mut self, user: &str) {
        let Some(dir) = state_dir() else { return };
        let path = dir.join("history").join(user);
        let mut entries: Vec<String> = std::fs::read_to_string(&path)
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default();
        let skip = entries.len().saturating_sub(MAX_ENTRIES);
        entries.drain(..skip);
        if skip > 0 {
            // Keep the file bounded too.
            let mut text = entries.join("\n");
            text.push('\n');
            if let Err(e) = std::fs::write(&path, text) {
                log::debug!("history {}: {e}", path.display());
            }
        }
        // What was typed before the login (the /login itself) stays newest.
        entries.append(&mut self.entries);
        self.entries = entries;
        self.file = Some(path);
        self.cursor = None;
    }

    /// Stops writing to the account's file (after a logout).
    pub fn close_account(&mut self) {
        self.file = None;
    }

    /// Keeps `line` if it is a command, in memory and in the account's file.
    pub fn add(&mut self, line: &str) {
        self.cursor = None;
        let Some(entry) = keepable(line) else { return };
        if self.entries.last() == Some(&entry) {
            return;
        }
        if let Some(path) = &self.file {
            // Only its owner may read what someone did (the directory and
            // the file alike).
            if let Some(dir) = path.parent() {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .ok();
            }
            let written = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| writeln!(f, "{entry}"));
            if let Err(e) = written {
                log::debug!("history {}: {e}", path.display());
            }
        }
        self.entries.push(entry);
    }

    /// The entry before the one shown (Up).
    pub fn older(&mut self) -> Option<&str> {
        let i = match self.cursor {
            None => self.entries.len().checked_sub(1)?,
            Some(0) => 0,
            Some(i) => i - 1,
        };
        self.cursor = Some(i);
        self.entries.get(i).map(String::as_str)
    }

    /// The entry after the one shown (Down); `None` past the newest.
    pub fn newer(&mut self) -> Option<&str> {
        let i = self.cursor? + 1;
        if i >= self.entries.len() {
            self.cursor = None;
            return None;
        }
        self.cursor = Some(i);
        self.entries.get(i).map(String::as_str)
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_commands_are_kept_and_never_text() {
        assert_eq!(keepable("hello there"), None);
        assert_eq!(keepable("/me waves"), None);
        assert_eq!(
            keepable("/msg bob,carol secret plans").as_deref(),
            Some("/msg bob,carol ")
        );
        assert_eq!(keepable("/query bob").as_deref(), Some("/query bob"));
        let mut h = History::default();
        h.add("/buddies");
        h.add("secret");
        h.add("/msg bob secret");
        assert_eq!(h.entries(), ["/buddies", "/msg bob "]);
        assert_eq!(h.older(), Some("/msg bob "));
        assert_eq!(h.older(), Some("/buddies"));
        assert_eq!(h.older(), Some("/buddies"));
        assert_eq!(h.newer(), Some("/msg bob "));
        assert_eq!(h.newer(), None);
    }
}
