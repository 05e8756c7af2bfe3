//! File transfers between buddies: an offer on the message channel, an
//! answer, then the chunks on a connection and channel of their own, so
//! chat keeps flowing. Memory stays bounded on both sides (one chunk at a
//! time); the receiver writes to a temporary file in the download
//! directory, checks the sender's SHA-256, and only then gives it a safe,
//! unused name.
//!
//! A transfer that breaks off keeps what arrived (every chunk opened under
//! the transfer's keys, so it is the sender's own data) in a temporary
//! file named after the sender, name, size and SHA-256, for
//! `resume_keep`. When the same file is offered again, the answer asks for
//! the rest only (`Offset`); the whole file is still hashed at the end.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use log::{debug, warn};
use parking_lot::Mutex;

use super::error::{ClientError, PeerStep};
use super::events::{Event, Via};
use super::peer::{PeerSession, PendingKind};
use super::Client;
use crate::crypto::{self, Sha256};
use crate::keyfile::hex;
use crate::proto::peer::{Ack, PeerRequest, PEER};
use crate::proto::{Refusal, Refused, Request};
use crate::seal::{Opener, Role, Sealer};
use crate::wire::io::{write_message, MessageReader};
use crate::wire::{code, Limits, Message};

/// Bytes of file per chunk: large enough to amortize a seal, the system
/// calls and a thread hand-over (512 KiB needs a third fewer system calls
/// and less CPU per byte than 256 KiB; 1 MiB gains nothing more here and
/// makes the allocator return and refault the receiver's buffers), small
/// enough that a transfer holds little memory and that a sealed chunk
/// stays well inside the ordinary body limit, which the receiver's
/// listener applies to transfer connections.
pub const CHUNK: usize = 512 * 1024;
/// Room for a FILE-CHUNK's inner head, its CRLF and the tag (the head is
/// under 120 bytes even with the largest id and offset).
const CHUNK_HEAD_ROOM: usize = 4 * 1024;
const _: () = assert!(CHUNK + CHUNK_HEAD_ROOM <= Limits::DEFAULT.max_body);
/// Time between progress events.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Decrypted chunks that may wait for the receiver's file writes: the
/// connection's worker reads and decrypts the next chunk while the sink
/// thread writes this one, and memory stays bounded.
const SINK_DEPTH: usize = 2;

/// A file we offered.
pub struct OutTransfer {
    id: u64,
    peer: String,
    path: PathBuf,
    name: String,
    size: u64,
    sha256: String,
    cancelled: AtomicBool,
}

/// Where an incoming transfer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InState {
    Offered,
    Accepted,
    Receiving,
}

/// A file offered to us.
pub struct InTransfer {
    id: u64,
    peer: String,
    name: String,
    size: u64,
    sha256: String,
    state: Mutex<InState>,
    cancelled: AtomicBool,
    /// Set on accepting: the file the data goes to, and how much of it
    /// was kept from an earlier transfer (where the sender starts).
    part: Mutex<Option<Part>>,
}

/// Where an accepted transfer's data goes.
#[derive(Clone, Debug)]
struct Part {
    path: PathBuf,
    /// Bytes already there, from a transfer that broke off.
    offset: u64,
    /// Kept when the transfer breaks off (the file is this transfer's
    /// resumption file, not a one-off temporary file).
    keep: bool,
}

/// Prefix of the temporary files that keep a broken-off transfer's data.
const RESUME_PREFIX: &str = ".ims-resume-";

/// The resumption file of `peer`'s file `name` of `size` bytes with this
/// SHA-256: the same offer again finds it, nobody else's does.
fn resume_path(dir: &Path, peer: &str, name: &str, size: u64, sha256: &str) -> PathBuf {
    let mut h = Sha256::new();
    for part in [
        peer.as_bytes(),
        name.as_bytes(),
        &size.to_be_bytes(),
        sha256.as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_be_bytes());
        h.update(part);
    }
    let key = hex(&h.finish());
    dir.join(format!("{RESUME_PREFIX}{}.part", &key[..32]))
}

/// Whether the file was last written longer than `keep` ago.
fn expired(meta: &fs::Metadata, keep: Duration) -> bool {
    meta.modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age >= keep)
}

/// Deletes the resumption files in `dir` kept longer than `keep`.
fn sweep(dir: &Path, keep: Duration) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(RESUME_PREFIX) && name.ends_with(".part")) {
            continue;
        }
        if e.metadata().is_ok_and(|m| m.is_file() && expired(&m, keep)) {
            if let Err(err) = fs::remove_file(e.path()) {
                warn!("removing {}: {err}", e.path().display());
            }
        }
    }
}

/// Deletes `path` once it has not been written for `keep` (a resumption
/// that started meanwhile keeps it fresh).
fn expire_later(path: PathBuf, keep: Duration) {
    let spawned = std::thread::Builder::new()
        .name("resume-expiry".into())
        .spawn(move || loop {
            let wait = match fs::metadata(&path) {
                Err(_) => return,
                Ok(m) if expired(&m, keep) => {
                    if let Err(e) = fs::remove_file(&path) {
                        warn!("removing {}: {e}", path.display());
                    }
                    return;
                }
                Ok(m) => m
                    .modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .map_or(keep, |age| keep.saturating_sub(age)),
            };
            std::thread::sleep(wait.max(Duration::from_millis(50)));
        });
    if let Err(e) = spawned {
        warn!("cannot schedule the expiry of a kept transfer: {e}");
    }
}

/// Every transfer under way.
#[derive(Default)]
pub struct Files {
    outgoing: Mutex<HashMap<(String, u64), Arc<OutTransfer>>>,
    /// In order of arrival: `/accept NAME` takes the oldest offer from NAME.
    incoming: Mutex<Vec<Arc<InTransfer>>>,
    /// Held while an offer is answered: taking the offer, choosing its
    /// resumption file and marking it accepted are one step, so that two
    /// answers at once neither take the same offer nor the same file.
    answering: Mutex<()>,
}

impl Files {
    /// Forgets everything (logout).
    pub fn clear(&self) {
        for t in self.outgoing.lock().drain() {
            t.1.cancelled.store(true, Ordering::Relaxed);
        }
        for t in self.incoming.lock().drain(..) {
            t.cancelled.store(true, Ordering::Relaxed);
        }
    }

    /// Whether `peer` has an offer waiting for our answer.
    pub fn has_offer_from(&self, peer: &str) -> bool {
        self.incoming
            .lock()
            .iter()
            .any(|t| t.peer == peer && *t.state.lock() == InState::Offered)
    }

    fn take_offer(&self, peer: &str) -> Option<Arc<InTransfer>> {
        self.incoming
            .lock()
            .iter()
            .find(|t| t.peer == peer && *t.state.lock() == InState::Offered)
            .cloned()
    }

    fn remove_in(&self, peer: &str, id: u64) {
        self.incoming
            .lock()
            .retain(|t| !(t.peer == peer && t.id == id));
    }
}

/// A MIME type from the file name's extension.
pub fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "txt" | "md" | "log" => "text/plain",
        "html" | "htm" => "text/html",
        "csv" => "text/csv",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "mp4" => "video/mp4",
        "doc" | "docx" => "application/msword",
        "xls" | "xlsx" => "application/vnd.ms-excel",
        _ => "application/octet-stream",
    }
}

/// The sender's name reduced to one safe path component: only the last
/// component, only letters, digits, `.`, `-`, `_` and spaces, no leading
/// dot, at most 200 characters; never empty.
pub fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let cleaned: String = last
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '.' | '-' | '_' | ' '))
        .take(200)
        .collect();
    let trimmed = cleaned.trim().trim_start_matches('.').trim();
    if trimmed.is_empty() {
        "file".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// Links `temp` into `dir` under `name`, or `name (1)`, `name (2)`, ...:
/// never over an existing file (a hard link fails if the name is taken).
fn place(temp: &Path, dir: &Path, name: &str) -> std::io::Result<PathBuf> {
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) if !s.is_empty() => (s.to_owned(), format!(".{e}")),
        _ => (name.to_owned(), String::new()),
    };
    for n in 0..10_000 {
        let candidate = if n == 0 {
            dir.join(name)
        } else {
            dir.join(format!("{stem} ({n}){ext}"))
        };
        match fs::hard_link(temp, &candidate) {
            Ok(()) => {
                fs::remove_file(temp)?;
                return Ok(candidate);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::ErrorKind::AlreadyExists.into())
}

/// How far back the transfer rate looks: long enough to smooth out bursts
/// (the first chunks fill socket buffers at memory speed), short enough to
/// follow a link that slows down.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Before this much time has passed the rate is unknown (reported as 0)
/// rather than a burst's figure.
const RATE_SETTLE: Duration = Duration::from_millis(900);

/// Throttled progress reports with the rate over a sliding window.
struct Progress {
    /// Where the transfer started: the offset it resumed from, or 0.
    resumed: u64,
    started: Instant,
    last: Instant,
    /// (when, bytes so far), oldest first, spanning at most [`RATE_WINDOW`].
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Progress {
    fn new() -> Progress {
        Progress::from(0)
    }

    /// Progress of a transfer that starts at `resumed` bytes.
    fn from(resumed: u64) -> Progress {
        let now = Instant::now();
        let mut samples = std::collections::VecDeque::new();
        samples.push_back((now, resumed));
        Progress {
            resumed,
            started: now,
            last: now - PROGRESS_EVERY,
            samples,
        }
    }

    /// Bytes per second over the window ending now at `bytes`.
    fn rate(&mut self, now: Instant, bytes: u64) -> u64 {
        self.samples.push_back((now, bytes));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        if now.duration_since(self.started) < RATE_SETTLE {
            return 0;
        }
        let Some(&(t0, b0)) = self.samples.front() else {
            return 0;
        };
        let secs = now.duration_since(t0).as_secs_f64();
        if secs <= 0.0 {
            return 0;
        }
        (bytes.saturating_sub(b0) as f64 / secs) as u64
    }

    fn event(
        &mut self,
        peer: &str,
        id: u64,
        direction: &str,
        bytes: u64,
        size: u64,
        force: bool,
    ) -> Option<Event> {
        if !force && self.last.elapsed() < PROGRESS_EVERY {
            return None;
        }
        let now = Instant::now();
        self.last = now;
        let rate = self.rate(now, bytes);
        Some(Event::FileProgress {
            peer: peer.to_owned(),
            id,
            direction: direction.to_owned(),
            bytes,
            size,
            rate,
            resumed: self.resumed,
        })
    }
}

/// A decrypted chunk on its way to the file: the buffer and where the
/// data is in it.
type Chunk = (Vec<u8>, Range<usize>);

/// Hashes and writes an incoming transfer's chunks to its temporary file
/// on a thread of its own, in order, while the connection's worker reads
/// and decrypts the next ones.
struct Sink {
    chunks: Option<Sender<Chunk>>,
    thread: Option<JoinHandle<std::io::Result<(File, Sha256)>>>,
    /// Set by the thread once a write failed; it then only drains.
    failed: Arc<AtomicBool>,
}

impl Sink {
    /// The first `prefix` bytes of `file` are already there (a resumed
    /// transfer): they are hashed first, and the chunks written after them.
    fn start(mut file: File, temp: PathBuf, prefix: u64) -> std::io::Result<Sink> {
        let (chunks, queue) = crossbeam_channel::bounded::<Chunk>(SINK_DEPTH);
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        let thread = std::thread::Builder::new()
            .name("file-sink".into())
            .spawn(move || {
                let mut hasher = Sha256::new();
                // Anything behind the prefix (from a connection that
                // wrote on after the offset was answered) goes.
                let mut result =
                    hash_prefix(&mut file, prefix, &mut hasher).and_then(|()| file.set_len(prefix));
                if result.is_err() {
                    flag.store(true, Ordering::Relaxed);
                }
                for (buf, data) in queue {
                    if result.is_ok() {
                        let data = &buf[data];
                        hasher.update(data);
                        if let Err(e) = file.write_all(data) {
                            warn!("writing {}: {e}", temp.display());
                            flag.store(true, Ordering::Relaxed);
                            result = Err(e);
                        }
                    }
                }
                result.map(|()| (file, hasher))
            })?;
        Ok(Sink {
            chunks: Some(chunks),
            thread: Some(thread),
            failed,
        })
    }

    /// Queues a chunk (waiting while the queue is full); `false` if
    /// writing has failed.
    fn write(&self, chunk: Chunk) -> bool {
        !self.failed.load(Ordering::Relaxed)
            && self.chunks.as_ref().is_some_and(|c| c.send(chunk).is_ok())
    }

    /// Waits until every queued chunk is written: the file and the hash of
    /// everything written, or why not.
    fn finish(&mut self) -> std::io::Result<(File, Sha256)> {
        self.chunks = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(std::io::Error::other("the file writer panicked")),
            None => Err(std::io::Error::other("the file is closed")),
        }
    }
}

/// Hashes the first `len` bytes of `file` and leaves it positioned
/// behind them.
fn hash_prefix(file: &mut File, len: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; if len > 0 { CHUNK } else { 0 }];
    let mut left = len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    file.seek(SeekFrom::Start(len))?;
    Ok(())
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.chunks = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An incoming transfer's connection, between its first chunk and its end.
pub struct Receiving {
    transfer: Arc<InTransfer>,
    session: Arc<PeerSession>,
    /// The epoch of the session the transfer's channel belongs to.
    epoch: String,
    me: String,
    recv: Opener,
    send: Sealer,
    temp: PathBuf,
    /// Kept (for a resumption) if the transfer breaks off.
    keep: bool,
    /// Opened by the first frame that opens under the transfer's keys,
    /// never before: a forged first frame must not touch the file (the
    /// sink truncates it to the resumed prefix as it starts).
    sink: Option<Sink>,
    written: u64,
    progress: Progress,
    done: bool,
    /// A frame of this connection opened under the transfer's keys: only
    /// then does the transfer count as receiving, so that a forged first
    /// frame cannot end an accepted transfer.
    started: bool,
}

impl Client {
    /// Offers the file at `path` to `to`; the transfer starts when they accept.
    pub fn send_file(self: &Arc<Self>, to: &str, path: &Path) -> Result<u64, ClientError> {
        let to = to.to_ascii_lowercase();
        let meta = fs::metadata(path).map_err(|e| ClientError::reading(path, e))?;
        if !meta.is_file() {
            return Err(ClientError::NotAFile(path.to_owned()));
        }
        let mut file = File::open(path).map_err(|e| ClientError::reading(path, e))?;
        let id = self.next_id();
        // Hashing a large file takes a while: say how far it got, as a
        // transfer in the "hash" direction.
        let mut progress = Progress::new();
        let mut hashed = 0u64;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        let read = loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) => break Err(ClientError::reading(path, e)),
            };
            hasher.update(&buf[..n]);
            hashed = hashed.saturating_add(n as u64);
            if let Some(e) = progress.event(&to, id, "hash", hashed, meta.len(), false) {
                self.emit(e);
            }
        };
        // The end of hashing, also when reading failed: a progress line
        // shown for it can go.
        if let Some(e) = progress.event(&to, id, "hash", hashed, hashed, true) {
            self.emit(e);
        }
        read?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let t = Arc::new(OutTransfer {
            id,
            peer: to.clone(),
            path: path.to_owned(),
            name: name.clone(),
            size: meta.len(),
            sha256: hex(&hasher.finish()),
            cancelled: AtomicBool::new(false),
        });
        self.files
            .outgoing
            .lock()
            .insert((to.clone(), id), t.clone());
        let offer = PeerRequest::FileOffer {
            id,
            name,
            size: t.size,
            content_type: content_type(&t.name).to_owned(),
            sha256: t.sha256.clone(),
        };
        if let Err(e) = self.send_request(&to, &offer, id, PendingKind::Control("send".into())) {
            self.files.outgoing.lock().remove(&(to, id));
            return Err(e);
        }
        Ok(id)
    }

    /// Accepts the oldest file offer from `peer` (the answer went when
    /// this returns); [`ClientError::NoSuchOffer`] if there is none.
    pub fn accept_file(self: &Arc<Self>, peer: &str) -> Result<(), ClientError> {
        self.answer_file(peer, true)
    }

    /// Denies the oldest file offer from `peer`, as [`Client::accept_file`].
    pub fn deny_file(self: &Arc<Self>, peer: &str) -> Result<(), ClientError> {
        self.answer_file(peer, false)
    }

    fn answer_file(self: &Arc<Self>, peer: &str, accept: bool) -> Result<(), ClientError> {
        let peer = peer.to_ascii_lowercase();
        let answering = self.files.answering.lock();
        let Some(t) = self.files.take_offer(&peer) else {
            return Err(ClientError::NoSuchOffer(peer));
        };
        let mut offset = 0;
        if accept {
            let part = self.resume_point(&t);
            offset = part.offset;
            *t.part.lock() = Some(part);
            *t.state.lock() = InState::Accepted;
        } else {
            self.files.remove_in(&peer, t.id);
        }
        drop(answering);
        let id = self.next_id();
        self.send_request(
            &peer,
            &PeerRequest::FileAnswer {
                id: t.id,
                accept,
                offset,
            },
            id,
            PendingKind::Control(if accept { "accept" } else { "deny" }.into()),
        )?;
        // FILE-ANSWER's acknowledgement carries the transfer id, not ours.
        self.peers.pending.lock().remove(&(peer, id));
        Ok(())
    }

    /// Where an accepted transfer's data goes: its resumption file, and
    /// the prefix kept there by an earlier transfer of the same file.
    fn resume_point(&self, t: &Arc<InTransfer>) -> Part {
        let dir = &self.config.download_dir;
        let keep = self.config.resume_keep;
        sweep(dir, keep);
        let path = resume_path(dir, &t.peer, &t.name, t.size, &t.sha256);
        // The same file accepted twice at once: the second one writes a
        // file of its own, from the start.
        let busy = self.files.incoming.lock().iter().any(|o| {
            !Arc::ptr_eq(o, t)
                && *o.state.lock() != InState::Offered
                && o.part.lock().as_ref().is_some_and(|p| p.path == path)
        });
        if busy {
            return Part {
                path: dir.join(format!(".ims-{}.part", hex(&crypto::random_array::<8>()))),
                offset: 0,
                keep: false,
            };
        }
        let offset = match fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() <= t.size && !expired(&m, keep) => m.len(),
            Ok(_) => {
                if let Err(e) = fs::remove_file(&path) {
                    warn!("removing {}: {e}", path.display());
                }
                0
            }
            Err(_) => 0,
        };
        Part {
            path,
            offset,
            keep: true,
        }
    }

    /// Stops every transfer with `peer`, either direction; how many.
    pub fn cancel_transfers(self: &Arc<Self>, peer: &str) -> usize {
        let peer = peer.to_ascii_lowercase();
        let outs: Vec<Arc<OutTransfer>> = self
            .files
            .outgoing
            .lock()
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .map(|(_, t)| t.clone())
            .collect();
        let ins: Vec<Arc<InTransfer>> = self
            .files
            .incoming
            .lock()
            .iter()
            .filter(|t| t.peer == peer)
            .cloned()
            .collect();
        for t in &outs {
            t.cancelled.store(true, Ordering::Relaxed);
            self.files.outgoing.lock().remove(&(peer.clone(), t.id));
            self.tell_cancel(&peer, t.id, true);
            self.emit(Event::FileFailed {
                peer: peer.clone(),
                id: t.id,
                name: t.name.clone(),
                reason: "cancelled".into(),
            });
        }
        for t in &ins {
            t.cancelled.store(true, Ordering::Relaxed);
            let receiving = *t.state.lock() == InState::Receiving;
            if !receiving {
                // A receiving connection reports its own end when it sees the flag.
                self.files.remove_in(&peer, t.id);
                self.emit(Event::FileFailed {
                    peer: peer.clone(),
                    id: t.id,
                    name: t.name.clone(),
                    reason: "cancelled".into(),
                });
            }
            self.tell_cancel(&peer, t.id, false);
        }
        outs.len() + ins.len()
    }

    fn tell_cancel(self: &Arc<Self>, peer: &str, id: u64, from_sender: bool) {
        let req_id = self.next_id();
        if let Err(e) = self.send_request(
            peer,
            &PeerRequest::FileCancel { id, from_sender },
            req_id,
            PendingKind::Control("cancel".into()),
        ) {
            debug!("telling {peer} of the cancel: {e}");
        }
        self.peers.pending.lock().remove(&(peer.to_owned(), req_id));
    }

    pub(super) fn on_file_offer(
        self: &Arc<Self>,
        from: &str,
        id: u64,
        name: String,
        size: u64,
        content_type: String,
        sha256: String,
    ) -> Ack {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ack::refused(id, Refusal::BadRequest, "bad Sha256");
        }
        let t = Arc::new(InTransfer {
            id,
            peer: from.to_owned(),
            name: name.clone(),
            size,
            sha256: sha256.to_ascii_lowercase(),
            state: Mutex::new(InState::Offered),
            cancelled: AtomicBool::new(false),
            part: Mutex::new(None),
        });
        self.files.incoming.lock().push(t);
        self.emit(Event::FileOffer {
            from: from.to_owned(),
            id,
            name,
            size,
            content_type,
        });
        if self.config.auto_accept_files {
            let client = self.clone();
            let from = from.to_owned();
            std::thread::spawn(move || {
                if let Err(e) = client.accept_file(&from) {
                    client.emit(Event::Error {
                        command: "accept".into(),
                        reason: e.to_string(),
                    });
                }
            });
        }
        Ack::done(id)
    }

    pub(super) fn on_file_answer(
        self: &Arc<Self>,
        from: &str,
        id: u64,
        accept: bool,
        offset: u64,
    ) -> Ack {
        let Some(t) = self
            .files
            .outgoing
            .lock()
            .get(&(from.to_owned(), id))
            .cloned()
        else {
            return Ack::refused(id, Refusal::NoSuchTransfer, "no such offer");
        };
        if !accept {
            self.files.outgoing.lock().remove(&(from.to_owned(), id));
            self.emit(Event::FileFailed {
                peer: from.to_owned(),
                id,
                name: t.name.clone(),
                reason: format!("{from} declined"),
            });
            return Ack::done(id);
        }
        if offset > t.size {
            return Ack::refused(id, Refusal::BadRequest, "offset past the end");
        }
        let client = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("send-{id}"))
            .spawn(move || {
                let result = client.stream_file(&t, offset);
                client.files.outgoing.lock().remove(&(t.peer.clone(), t.id));
                match result {
                    Ok(via) => client.emit(Event::FileSent {
                        to: t.peer.clone(),
                        name: t.name.clone(),
                        size: t.size,
                        resumed: offset,
                        via,
                    }),
                    // A cancel here was reported by `cancel_transfers`.
                    Err(_) if t.cancelled.load(Ordering::Relaxed) => {}
                    Err(e) => client.emit(Event::FileFailed {
                        peer: t.peer.clone(),
                        id: t.id,
                        name: t.name.clone(),
                        reason: e.to_string(),
                    }),
                }
            });
        match spawned {
            Ok(_) => Ack::done(id),
            Err(_) => Ack::refused(id, Refusal::Internal, "cannot start the transfer"),
        }
    }

    pub(super) fn on_file_cancel(&self, from: &str, id: u64, from_sender: bool) -> Ack {
        if from_sender {
            let found = self
                .files
                .incoming
                .lock()
                .iter()
                .find(|t| t.peer == from && t.id == id)
                .cloned();
            if let Some(t) = found {
                t.cancelled.store(true, Ordering::Relaxed);
                if *t.state.lock() != InState::Receiving {
                    self.files.remove_in(from, id);
                    self.emit(Event::FileFailed {
                        peer: from.to_owned(),
                        id,
                        name: t.name.clone(),
                        reason: format!("cancelled by {from}"),
                    });
                }
            }
        } else if let Some(t) = self.files.outgoing.lock().remove(&(from.to_owned(), id)) {
            t.cancelled.store(true, Ordering::Relaxed);
            self.emit(Event::FileFailed {
                peer: from.to_owned(),
                id,
                name: t.name.clone(),
                reason: format!("cancelled by {from}"),
            });
        }
        Ack::done(id)
    }

    /// The sending side of an accepted transfer, on its own connection,
    /// from `start` (the prefix the receiver kept) to the end.
    fn stream_file(self: &Arc<Self>, t: &OutTransfer, start: u64) -> Result<Via, ClientError> {
        let me = self.user().ok_or(ClientError::NotLoggedIn)?;
        let session = self.session_with(&t.peer)?;
        let (keys, epoch) = session.file_channel(t.id, &me, &t.peer, Role::Initiator);
        let (mut send, mut recv) = (keys.send, keys.recv);
        let chan = format!("file:{}", t.id);
        let timeout = self.config.timeout;
        let (stream, via) = self.peer_connect(&t.peer, session.address)?;
        let mut reader = MessageReader::new(stream);
        let unreadable = |e| ClientError::reading(&t.path, e);
        let mut file = File::open(&t.path).map_err(unreadable)?;
        file.seek(SeekFrom::Start(start)).map_err(unreadable)?;
        // One buffer for every chunk: the inner FILE-CHUNK is encoded into
        // it, the file read straight behind its head, then it is sealed in
        // place and written from there.
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK + CHUNK_HEAD_ROOM);
        let mut offset = start;
        let mut progress = Progress::from(start);
        if let Some(e) = progress.event(&t.peer, t.id, "send", offset, t.size, true) {
            self.emit(e);
        }
        let broke = |e: &dyn std::fmt::Display| ClientError::BrokeOff(e.to_string());
        while offset < t.size {
            if t.cancelled.load(Ordering::Relaxed) {
                return Err(ClientError::Cancelled);
            }
            let n = (t.size - offset).min(CHUNK as u64) as usize;
            let head = PeerRequest::FileChunk {
                id: t.id,
                offset,
                data: Vec::new(),
            }
            .to_message();
            buf.clear();
            head.encode_head_for(n, &mut buf);
            let read = (&mut file)
                .take(n as u64)
                .read_to_end(&mut buf)
                .map_err(unreadable)?;
            if read < n {
                return Err(ClientError::FileShrank(t.path.clone()));
            }
            buf.extend_from_slice(b"\r\n");
            let sealed = send.seal_encoded(
                PEER,
                &session.clear(&me, &epoch, &chan),
                std::mem::take(&mut buf),
            )?;
            write_message(reader.get_mut(), &sealed, Instant::now() + timeout)
                .map_err(|e| broke(&e))?;
            buf = sealed.body;
            offset += n as u64;
            if let Some(e) = progress.event(&t.peer, t.id, "send", offset, t.size, offset == t.size)
            {
                self.emit(e);
            }
        }
        let end = send.seal(
            PEER,
            &session.clear(&me, &epoch, &chan),
            &PeerRequest::FileEnd { id: t.id }.to_message(),
        )?;
        write_message(reader.get_mut(), &end, Instant::now() + timeout).map_err(|e| broke(&e))?;
        let reply = reader
            .read_message(&Limits::DEFAULT, Instant::now() + timeout)
            .map_err(|e| broke(&e))?
            .ok_or_else(|| broke(&"closed"))?;
        if reply.method() != Some(PEER) {
            // An unsealed refusal of the transfer's connection.
            let refused = Refused::from_message(&reply)
                .unwrap_or_else(|| Refused::new(Refusal::BadRequest, ""));
            return Err(ClientError::PeerRefused {
                peer: t.peer.clone(),
                step: PeerStep::Transfer,
                refused,
            });
        }
        let inner = recv.open(&reply).map_err(|e| broke(&e))?;
        match (PeerRequest::FileEnd { id: t.id }).read_reply(&inner) {
            Ok(Ok(_)) => Ok(via),
            Ok(Err(refused)) => Err(ClientError::PeerRefused {
                peer: t.peer.clone(),
                step: PeerStep::File,
                refused,
            }),
            Err(error) => Err(ClientError::BadAnswer {
                peer: t.peer.clone(),
                error,
            }),
        }
    }

    /// The first chunk of an accepted transfer opens its receiving state.
    pub(super) fn open_receiving(&self, m: &Message) -> Result<Receiving, Message> {
        let from = m.header("From").unwrap_or("");
        let sid = m.header("Session").unwrap_or("");
        let id: u64 = m
            .header("Channel")
            .and_then(|c| c.strip_prefix("file:"))
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| Message::reply(code::BAD_REQUEST, "bad Channel"))?;
        let session = self
            .peers
            .get(from)
            .filter(|s| s.has_epoch(sid))
            .ok_or_else(|| Message::reply(code::NOT_FOUND, "unknown session"))?;
        let transfer = self
            .files
            .incoming
            .lock()
            .iter()
            .find(|t| t.peer == from && t.id == id)
            .cloned()
            .ok_or_else(|| Message::reply(code::NOT_FOUND, "no such transfer"))?;
        // The state changes when a frame opens (see `on_file_message`).
        if *transfer.state.lock() != InState::Accepted {
            return Err(Message::reply(code::FORBIDDEN, "transfer not accepted"));
        }
        let me = self
            .user()
            .ok_or_else(|| Message::reply(code::FORBIDDEN, "not logged in"))?;
        let keys = session
            .file_channel_in(sid, id, from, &me, Role::Responder)
            .ok_or_else(|| Message::reply(code::NOT_FOUND, "unknown session"))?;
        let dir = &self.config.download_dir;
        let fail = |e: std::io::Error| {
            warn!("cannot receive into {}: {e}", dir.display());
            Message::reply(code::INTERNAL, "cannot write the file")
        };
        let part = transfer
            .part
            .lock()
            .clone()
            .ok_or_else(|| Message::reply(code::FORBIDDEN, "transfer not accepted"))?;
        fs::create_dir_all(dir).map_err(fail)?;
        let temp = part.path.clone();
        // The file is opened by the first frame that opens (see
        // `on_file_message`): a forged connection neither truncates nor
        // deletes what was kept.
        Ok(Receiving {
            transfer,
            session,
            epoch: sid.to_owned(),
            me,
            recv: keys.recv,
            send: keys.send,
            temp,
            keep: part.keep,
            sink: None,
            written: part.offset,
            progress: Progress::from(part.offset),
            done: false,
            started: false,
        })
    }

    /// One message on a transfer's connection: `None` means no reply
    /// (a chunk); `Some((reply, close))` otherwise.
    pub(super) fn on_file_message(&self, r: &mut Receiving, m: Message) -> Option<(Message, bool)> {
        let t = r.transfer.clone();
        if t.cancelled.load(Ordering::Relaxed) {
            return Some((Message::reply(code::CONFLICT, "cancelled"), true));
        }
        // The chunk's data stays where decryption put it, in `plain`.
        let (inner, plain, data) = match r.recv.open_in_place(m) {
            Ok(i) => i.into_parts(),
            Err(e) => {
                warn!("refused a file chunk from {}: {e}", t.peer);
                return Some((Message::reply(code::BAD_REQUEST, "unreadable chunk"), true));
            }
        };
        if !r.started {
            let mut state = t.state.lock();
            if *state != InState::Accepted {
                // Another connection is receiving it: this one goes, alone.
                return Some((Message::reply(code::CONFLICT, "already receiving"), true));
            }
            *state = InState::Receiving;
            r.started = true;
            drop(state);
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&r.temp)
                .and_then(|file| Sink::start(file, r.temp.clone(), r.written));
            match opened {
                Ok(sink) => r.sink = Some(sink),
                Err(e) => {
                    warn!("cannot receive into {}: {e}", r.temp.display());
                    // Reported when the connection closes, as the transfer broke off.
                    return Some((
                        Message::reply(code::INTERNAL, "cannot write the file"),
                        true,
                    ));
                }
            }
        }
        let cannot_write = || {
            Some((
                Message::reply(code::INTERNAL, "cannot write the file"),
                true,
            ))
        };
        match PeerRequest::from_message(inner) {
            Ok(PeerRequest::FileChunk { id, offset, .. }) if id == t.id => {
                let len = data.len() as u64;
                let past_end = r.written.checked_add(len).is_none_or(|end| end > t.size);
                if offset != r.written || past_end {
                    return Some((
                        Message::reply(code::BAD_REQUEST, "chunk out of place"),
                        true,
                    ));
                }
                if !r.sink.as_ref().is_some_and(|s| s.write((plain, data))) {
                    return cannot_write();
                }
                r.written += len;
                if let Some(e) = r.progress.event(
                    &t.peer,
                    t.id,
                    "receive",
                    r.written,
                    t.size,
                    r.written == t.size,
                ) {
                    self.emit(e);
                }
                None
            }
            Ok(PeerRequest::FileEnd { id }) if id == t.id => {
                let (file, hasher) = match r.sink.take().map(|mut s| s.finish()) {
                    Some(Ok(done)) => done,
                    // Reported when the connection closes, as the transfer broke off.
                    _ => return cannot_write(),
                };
                let reply = match self.finish(r, file, hasher) {
                    Ok(()) => Ack::done(id),
                    Err(e) => Ack::refused(id, Refusal::BadRequest, e.to_string()),
                }
                .to_message();
                let clear = r.session.clear(&r.me, &r.epoch, "");
                let chan = format!("file:{id}");
                let clear = [clear[0], clear[1], clear[2], ("Channel", chan.as_str())];
                Some(match r.send.seal(PEER, &clear, &reply) {
                    Ok(sealed) => (sealed, true),
                    Err(e) => (Message::reply(code::INTERNAL, &e.to_string()), true),
                })
            }
            _ => Some((
                Message::reply(code::BAD_REQUEST, "unexpected message on a transfer"),
                true,
            )),
        }
    }

    /// Checks the whole file, all of it written to `file` and hashed by
    /// `hasher`, and moves it into place.
    fn finish(&self, r: &mut Receiving, file: File, hasher: Sha256) -> Result<(), ClientError> {
        let t = r.transfer.clone();
        // The transfer stays listed (its resumption file taken) until the
        // file is in place: an offer of the same file accepted meanwhile
        // must not take this one's complete data for a prefix to resume.
        let sha = hex(&hasher.finish());
        if r.written != t.size {
            return Err(self.abandon_for(r, ClientError::FileShort));
        }
        if sha != t.sha256 {
            return Err(self.abandon_for(r, ClientError::ChecksumMismatch));
        }
        if let Err(e) = file.sync_all() {
            return Err(self.abandon_for(r, ClientError::CannotWrite(e)));
        }
        match place(&r.temp, &self.config.download_dir, &safe_name(&t.name)) {
            Ok(path) => {
                r.done = true;
                self.files.remove_in(&t.peer, t.id);
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                self.emit(Event::FileReceived {
                    from: t.peer.clone(),
                    name,
                    size: t.size,
                    path: path.display().to_string(),
                    sha256: sha,
                    via: self.relays.route_from(&t.peer),
                });
                Ok(())
            }
            Err(e) => Err(self.abandon_for(r, ClientError::CannotStore(e))),
        }
    }

    /// As [`Client::abandon`], for an error that is then returned.
    fn abandon_for(&self, r: &mut Receiving, e: ClientError) -> ClientError {
        self.abandon(r, &e.to_string());
        e
    }

    /// Deletes the partial file and reports why.
    fn abandon(&self, r: &mut Receiving, reason: &str) {
        r.done = true;
        // Nothing may still be writing to the file being removed.
        if let Some(mut sink) = r.sink.take() {
            let _ = sink.finish();
        }
        if let Err(e) = fs::remove_file(&r.temp) {
            warn!("removing {}: {e}", r.temp.display());
        }
        self.files.remove_in(&r.transfer.peer, r.transfer.id);
        self.emit(Event::FileFailed {
            peer: r.transfer.peer.clone(),
            id: r.transfer.id,
            name: r.transfer.name.clone(),
            reason: reason.to_owned(),
        });
    }

    /// A transfer's connection ended: unless it finished, nothing stays.
    pub(super) fn close_receiving(&self, mut r: Receiving) {
        if !r.started {
            // No frame of this connection opened: the transfer is untouched
            // (still accepted, waiting for its real sender), and so is its
            // file, which nothing has opened.
            return;
        }
        if r.done {
            return;
        }
        if r.transfer.cancelled.load(Ordering::Relaxed) {
            self.abandon(&mut r, "cancelled");
        } else if r.keep && r.sink.take().is_some_and(|mut s| s.finish().is_ok()) {
            // What arrived stays for a resumption of the same file.
            r.done = true;
            self.files.remove_in(&r.transfer.peer, r.transfer.id);
            expire_later(r.temp.clone(), self.config.resume_keep);
            self.emit(Event::FileFailed {
                peer: r.transfer.peer.clone(),
                id: r.transfer.id,
                name: r.transfer.name.clone(),
                reason: format!(
                    "the transfer broke off ({} of {} bytes, kept to resume)",
                    r.written, r.transfer.size
                ),
            });
        } else {
            let reason = format!(
                "the transfer broke off ({} of {} bytes)",
                r.written, r.transfer.size
            );
            self.abandon(&mut r, &reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_made_safe() {
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(safe_name(".bashrc"), "bashrc");
        assert_eq!(safe_name("../.."), "file");
        assert_eq!(safe_name("a\u{0}b|c<d>.txt"), "abcd.txt");
        assert_eq!(safe_name("report 2026.pdf"), "report 2026.pdf");
        assert_eq!(safe_name(""), "file");
    }

    #[test]
    fn the_largest_chunk_fits_the_body_limit_sealed() {
        let head = PeerRequest::FileChunk {
            id: u64::MAX,
            offset: u64::MAX,
            data: Vec::new(),
        }
        .to_message();
        let mut inner = Vec::new();
        head.encode_head_for(CHUNK, &mut inner);
        inner.resize(inner.len() + CHUNK, 7);
        inner.extend_from_slice(b"\r\n");
        let mut keys = crate::seal::SessionKeys::derive(b"s", b"c", Role::Initiator);
        let sealed = keys.send.seal_encoded(PEER, &[], inner).unwrap();
        assert!(sealed.body.len() <= Limits::DEFAULT.max_body);
        // The head and tag need a fraction of the room kept for them.
        assert!(sealed.body.len() - CHUNK < CHUNK_HEAD_ROOM / 16);
    }

    #[test]
    fn existing_names_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a.txt"), b"old").unwrap();
        let t = dir.path().join(".t1");
        fs::write(&t, b"new").unwrap();
        let p = place(&t, dir.path(), "a.txt").unwrap();
        assert_eq!(p, dir.path().join("a (1).txt"));
        assert_eq!(fs::read(dir.path().join("a.txt")).unwrap(), b"old");
        assert!(!t.exists());
    }
}
