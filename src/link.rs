//! The client side of an enrolled, sealed link to the CRS, used by MSs and
//! by the operator's tool: the enrollment handshake (PROTOCOL.md §5), then
//! sealed request/reply pairs, and a small pool of such links.

use std::fmt;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::crypto;
use crate::proto::crs::{CrsRequest, SEALED};
use crate::proto::{self, Fields};
use crate::seal::{Opener, Role, SealError, Sealer, SessionKeys};
use crate::wire::io::{write_message, IoError, MessageReader};
use crate::wire::{Limits, Message};

/// Why a call over the link failed.
#[derive(Debug)]
pub enum LinkError {
    /// The CRS could not be reached or the connection broke.
    Io(IoError),
    /// The CRS refused the enrollment (wrong MSkey) or answered it oddly.
    Refused(String),
    /// The CRS's own proof did not check out: not our CRS.
    BadCrsProof,
    /// A sealed reply did not open.
    Seal(SealError),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Io(e) => write!(f, "CRS link: {e}"),
            LinkError::Refused(r) => write!(f, "CRS refused enrollment: {r}"),
            LinkError::BadCrsProof => f.write_str("the CRS failed to prove it knows the MSkey"),
            LinkError::Seal(e) => write!(f, "CRS link: {e}"),
        }
    }
}

impl std::error::Error for LinkError {}

impl From<IoError> for LinkError {
    fn from(e: IoError) -> Self {
        LinkError::Io(e)
    }
}

impl From<SealError> for LinkError {
    fn from(e: SealError) -> Self {
        LinkError::Seal(e)
    }
}

/// Who we enroll as.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Where clients reach this MS (`host:port`); for the operator, a label.
    pub listen: String,
    /// Most users this MS takes.
    pub capacity: u32,
    /// `ms` or `admin`.
    pub role: &'static str,
    /// Random per process, so the CRS can tell a restarted MS from a new
    /// link of a running one.
    pub instance: String,
}

/// One enrolled link.
pub struct CrsLink {
    reader: MessageReader<TcpStream>,
    send: Sealer,
    recv: Opener,
    timeout: Duration,
    /// The id the CRS gave this MS.
    pub ms_id: u64,
    /// The CRS process's instance (a new one means it restarted).
    pub crs_instance: String,
}

impl CrsLink {
    /// Connects and enrolls; `timeout` bounds each message of the link.
    pub fn connect(
        crs: &str,
        ms_key: &[u8],
        me: &Identity,
        timeout: Duration,
    ) -> Result<CrsLink, LinkError> {
        let addr: SocketAddr = crs
            .to_socket_addrs()
            .map_err(|e| LinkError::Io(IoError::Io(e)))?
            .next()
            .ok_or_else(|| LinkError::Refused(format!("cannot resolve {crs}")))?;
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| LinkError::Io(IoError::Io(e)))?;
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("TCP_NODELAY: {e}");
        }
        let mut reader = MessageReader::new(stream);
        let limits = Limits::DEFAULT;

        let ms_nonce = crypto::random_array::<32>();
        let hello =
            Message::request("ENROLL-HELLO").with_header("Ms-Nonce", crypto::b64_encode(&ms_nonce));
        let reply = round_trip(&mut reader, &hello, &limits, timeout)?;
        if !reply.is_success() {
            return Err(LinkError::Refused(reply.reason().unwrap_or("").to_owned()));
        }
        let crs_nonce = reply
            .req_b64("Crs-Nonce")
            .map_err(|e| LinkError::Refused(e.to_string()))?;
        let proof = crypto::hmac_sha256(
            ms_key,
            &proto::enroll_ms_transcript(
                &ms_nonce,
                &crs_nonce,
                &me.listen,
                me.capacity,
                me.role,
                &me.instance,
            ),
        );
        let enroll = Message::request("ENROLL")
            .with_header("Listen", &me.listen)
            .with_header("Capacity", me.capacity)
            .with_header("Role", me.role)
            .with_header("Instance", &me.instance)
            .with_header("Proof", crypto::b64_encode(&proof));
        let reply = round_trip(&mut reader, &enroll, &limits, timeout)?;
        if !reply.is_success() {
            return Err(LinkError::Refused(reply.reason().unwrap_or("").to_owned()));
        }
        let crs_proof = reply
            .req_b64("Proof")
            .map_err(|e| LinkError::Refused(e.to_string()))?;
        let ms_id = reply
            .req_parse("Ms-Id")
            .map_err(|e| LinkError::Refused(e.to_string()))?;
        let crs_instance = reply.header("Crs-Instance").unwrap_or_default().to_owned();
        let expected = crypto::hmac_sha256(
            ms_key,
            &proto::enroll_crs_transcript(&ms_nonce, &crs_nonce, ms_id, &crs_instance),
        );
        if !crypto::ct_eq(&expected, &crs_proof) {
            return Err(LinkError::BadCrsProof);
        }
        let mut context = ms_nonce.to_vec();
        context.extend_from_slice(&crs_nonce);
        let keys = SessionKeys::derive(ms_key, &context, Role::Initiator);
        Ok(CrsLink {
            reader,
            send: keys.send,
            recv: keys.recv,
            timeout,
            ms_id,
            crs_instance,
        })
    }

    /// One sealed request and its (opened) reply; `wait` is extra time the
    /// CRS may take to answer (a long poll).
    pub fn call_with(&mut self, req: &CrsRequest, wait: Duration) -> Result<Message, LinkError> {
        let sealed = self.send.seal(SEALED, &[], &req.to_message())?;
        let deadline = Instant::now() + self.timeout;
        write_message(self.reader.get_mut(), &sealed, deadline)?;
        let reply = self
            .reader
            .read_message(&Limits::DEFAULT, Instant::now() + self.timeout + wait)?
            .ok_or(LinkError::Io(IoError::Wire(
                crate::wire::Error::EofInHeaders,
            )))?;
        if reply.method() != Some(SEALED) {
            // The CRS answers in the clear only when it drops the link.
            return Err(LinkError::Refused(
                reply.reason().unwrap_or("unsealed reply").to_owned(),
            ));
        }
        Ok(self.recv.open(&reply)?)
    }

    /// One sealed request and its reply.
    pub fn call(&mut self, req: &CrsRequest) -> Result<Message, LinkError> {
        self.call_with(req, Duration::ZERO)
    }
}

fn round_trip(
    reader: &mut MessageReader<TcpStream>,
    m: &Message,
    limits: &Limits,
    timeout: Duration,
) -> Result<Message, LinkError> {
    write_message(reader.get_mut(), m, Instant::now() + timeout)?;
    reader
        .read_message(limits, Instant::now() + timeout)?
        .ok_or(LinkError::Io(IoError::Wire(
            crate::wire::Error::EofInHeaders,
        )))
}

/// Idle enrolled links, reused so that a login costs no handshake.
///
/// The CRS may be several instances serving one directory (`A,B,C`): the
/// pool uses one at a time and, when it cannot be reached or refuses, moves
/// to the next in the list (round and round), staying there until that one
/// fails in turn.
pub struct LinkPool {
    crs: Vec<String>,
    /// Index in `crs` of the instance in use.
    current: std::sync::atomic::AtomicUsize,
    ms_key: Vec<u8>,
    me: Identity,
    timeout: Duration,
    idle: Mutex<Vec<CrsLink>>,
    /// Most idle links kept.
    max_idle: usize,
}

/// The addresses of a comma-separated CRS list, blanks dropped.
pub fn crs_list(crs: &str) -> Vec<String> {
    crs.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

impl LinkPool {
    /// A pool of links to `crs`: one address or a comma-separated list of
    /// instances of one directory.
    pub fn new(
        crs: String,
        ms_key: Vec<u8>,
        me: Identity,
        timeout: Duration,
        max_idle: usize,
    ) -> LinkPool {
        let mut list = crs_list(&crs);
        if list.is_empty() {
            list.push(crs);
        }
        LinkPool {
            crs: list,
            current: std::sync::atomic::AtomicUsize::new(0),
            ms_key,
            me,
            timeout,
            idle: Mutex::new(Vec::new()),
            max_idle,
        }
    }

    /// The CRS instance in use.
    pub fn current(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.crs[i % self.crs.len()]
    }

    /// A new enrolled link (not from the pool): to the instance in use, or
    /// else to the next that answers.
    pub fn connect(&self) -> Result<CrsLink, LinkError> {
        use std::sync::atomic::Ordering;
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for step in 0..self.crs.len() {
            let i = (start + step) % self.crs.len();
            match CrsLink::connect(&self.crs[i], &self.ms_key, &self.me, self.timeout) {
                Ok(link) => {
                    if step > 0
                        && self
                            .current
                            .compare_exchange(start, i, Ordering::Relaxed, Ordering::Relaxed)
                            .is_ok()
                    {
                        log::warn!(
                            "CRS {} failed ({}); moved to {}",
                            self.crs[start % self.crs.len()],
                            last.as_ref().map(ToString::to_string).unwrap_or_default(),
                            self.crs[i]
                        );
                    }
                    return Ok(link);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| LinkError::Refused("no CRS address".into())))
    }

    /// Drops every idle link (after the CRS restarted).
    pub fn clear(&self) {
        self.idle.lock().clear();
    }

    /// One request on an idle link or a new one. A reused link that fails
    /// is retried once on a fresh link: the CRS may have closed it.
    pub fn call(&self, req: &CrsRequest) -> Result<Message, LinkError> {
        let reused = self.idle.lock().pop();
        let (mut link, fresh) = match reused {
            Some(l) => (l, false),
            None => (self.connect()?, true),
        };
        let reply = match link.call(req) {
            Ok(r) => r,
            Err(LinkError::Io(_)) if !fresh => {
                link = self.connect()?;
                link.call(req)?
            }
            Err(e) => return Err(e),
        };
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(link);
        }
        Ok(reply)
    }
}
