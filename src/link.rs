//! The one way a program talks to another: [`Conn`] connects within a
//! deadline and exchanges messages; [`Channel`] seals requests and opens
//! replies of a sealed link; [`Link`] joins the two and, for a
//! [`Request`] of any link, returns its typed reply or typed refusal.
//! The key schedules of the sealed links ([`enrollment_keys`],
//! [`login_keys`], [`push_keys`]) are defined here once and used by both
//! ends. [`LinkPool`] keeps enrolled links to the CRS for an MS.

use std::fmt;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::crypto;
use crate::proto::crs::{CrsReply, CrsRequest, OnlineForward, WelcomeForward, SEALED};
use crate::proto::{self, Fields, ProtoError, Refused, Request};
use crate::seal::{Opener, Role, SealError, Sealer, SessionKeys};
use crate::wire::io::{write_message, IoError, MessageReader};
use crate::wire::{Limits, Message};

/// Bytes of the nonces of enrollment.
pub const ENROLL_NONCE_LEN: usize = 32;
/// Fewest bytes of the MS's enrollment nonce the CRS accepts.
pub const MIN_ENROLL_NONCE_LEN: usize = 16;

/// Why a call over a link failed.
#[derive(Debug)]
pub enum LinkError {
    /// The address does not resolve to anything.
    Resolve(String),
    /// The other side could not be reached, or the connection broke or
    /// timed out.
    Io(IoError),
    /// A sealed message did not open, or ours could not be sealed.
    Seal(SealError),
    /// The reply is not a valid answer to the request.
    Proto(ProtoError),
    /// The other side refused, with a typed refusal.
    Refused(Refused),
    /// The other side failed to prove it holds the shared key (the CRS at
    /// enrollment, the MS at login): not who we meant to reach.
    BadProof,
}

impl LinkError {
    /// The refusal, if the other side refused.
    pub fn refusal(&self) -> Option<&proto::Refusal> {
        match self {
            LinkError::Refused(r) => Some(&r.refusal),
            _ => None,
        }
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Resolve(a) => write!(f, "cannot resolve {a}"),
            LinkError::Io(e) => write!(f, "{e}"),
            LinkError::Seal(e) => write!(f, "{e}"),
            LinkError::Proto(e) => write!(f, "bad reply: {e}"),
            LinkError::Refused(r) => write!(f, "{r}"),
            LinkError::BadProof => {
                f.write_str("the server failed to prove it knows the shared key")
            }
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

impl From<ProtoError> for LinkError {
    fn from(e: ProtoError) -> Self {
        LinkError::Proto(e)
    }
}

impl From<Refused> for LinkError {
    fn from(e: Refused) -> Self {
        LinkError::Refused(e)
    }
}

/// Connects to the first address `addr` resolves to that answers, within
/// `timeout` each; small request/reply exchanges, so no Nagle delay.
/// `addr` may list several (`A,B,C`: instances of one CRS directory): they
/// are tried in order. Nothing is sent before the connection stands, so a
/// request is never made twice.
pub fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, LinkError> {
    let mut last = None;
    for one in crs_list(addr) {
        let addrs = match one.to_socket_addrs() {
            Ok(a) => a,
            Err(e) => {
                last = Some(LinkError::Io(e.into()));
                continue;
            }
        };
        for a in addrs {
            match connect_to(a, timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(last.unwrap_or_else(|| LinkError::Resolve(addr.to_owned())))
}

/// The addresses of a comma-separated list, blanks dropped.
pub fn crs_list(crs: &str) -> Vec<String> {
    crs.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Connects to `addr` within `timeout`.
pub fn connect_to(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, LinkError> {
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| LinkError::Io(e.into()))?;
    if let Err(e) = s.set_nodelay(true) {
        log::debug!("TCP_NODELAY: {e}");
    }
    Ok(s)
}

/// A connection for a sequence of request/reply exchanges, each bounded
/// by the timeout (the write, then the read of the whole reply).
pub struct Conn {
    reader: MessageReader<TcpStream>,
    timeout: Duration,
}

impl Conn {
    /// Connects to `addr` (`host:port`).
    pub fn connect(addr: &str, timeout: Duration) -> Result<Conn, LinkError> {
        Ok(Conn::new(connect(addr, timeout)?, timeout))
    }

    /// Wraps a connected stream.
    pub fn new(stream: TcpStream, timeout: Duration) -> Conn {
        Conn {
            reader: MessageReader::new(stream),
            timeout,
        }
    }

    /// Sends `m` and reads the reply; `wait` is extra time the other side
    /// may take to answer (a long poll).
    pub fn exchange_with(&mut self, m: &Message, wait: Duration) -> Result<Message, LinkError> {
        write_message(self.reader.get_mut(), m, Instant::now() + self.timeout)?;
        self.reader
            .read_message(&Limits::DEFAULT, Instant::now() + self.timeout + wait)?
            .ok_or(LinkError::Io(IoError::Wire(
                crate::wire::Error::EofInHeaders,
            )))
    }

    /// Sends `m` and reads the reply.
    pub fn exchange(&mut self, m: &Message) -> Result<Message, LinkError> {
        self.exchange_with(m, Duration::ZERO)
    }

    /// A request in the clear and its typed reply.
    pub fn call<R: Request>(&mut self, req: &R) -> Result<R::Reply, LinkError> {
        let reply = self.exchange(&req.to_message())?;
        Ok(req.read_reply(&reply)??)
    }

    /// The stream, for a connection that changes hands (a peer session).
    pub fn into_stream(self) -> TcpStream {
        self.reader.into_parts().0
    }

    /// The reader with any bytes that arrived after the last reply (e.g.
    /// a push right behind a login's welcome), to go on reading.
    pub fn into_reader(self) -> MessageReader<TcpStream> {
        self.reader
    }
}

/// The two directions of a sealed link and the clear headers every
/// request of ours carries (`Login` on the client's link to its MS).
pub struct Channel {
    send: Sealer,
    recv: Opener,
    clear: Vec<(&'static str, String)>,
    /// The other side answered in the clear: it dropped the link.
    broken: bool,
}

impl Channel {
    /// A channel over `keys`.
    pub fn new(keys: SessionKeys, clear: Vec<(&'static str, String)>) -> Channel {
        Channel {
            send: keys.send,
            recv: keys.recv,
            clear,
            broken: false,
        }
    }

    /// Seals an inner message as a `SEALED` one.
    pub fn seal(&mut self, inner: &Message) -> Result<Message, LinkError> {
        self.seal_with(&[], inner)
    }

    /// Seals with clear headers beyond the channel's own (the MS's login
    /// reply carries `Server-Signature`).
    pub fn seal_with(
        &mut self,
        extra: &[(&str, &str)],
        inner: &Message,
    ) -> Result<Message, LinkError> {
        let clear: Vec<(&str, &str)> = self
            .clear
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(extra.iter().copied())
            .collect();
        Ok(self.send.seal(SEALED, &clear, inner)?)
    }

    /// Opens a sealed message; an unsealed one is the other side's
    /// refusal in the clear (it drops the link, or does not know it).
    pub fn open(&mut self, outer: &Message) -> Result<Message, LinkError> {
        if outer.method() != Some(SEALED) {
            self.broken = true;
            return Err(match Refused::from_message(outer) {
                Some(r) => LinkError::Refused(r),
                None => LinkError::Proto(ProtoError::Invalid("unsealed reply")),
            });
        }
        Ok(self.recv.open(outer)?)
    }

    /// One sealed request on `conn` and its typed reply.
    pub fn call<R: Request>(
        &mut self,
        conn: &mut Conn,
        req: &R,
        wait: Duration,
    ) -> Result<R::Reply, LinkError> {
        let sealed = self.seal(&req.to_message())?;
        let reply = conn.exchange_with(&sealed, wait)?;
        let inner = self.open(&reply)?;
        Ok(req.read_reply(&inner)??)
    }
}

/// The enrollment keys (PROTOCOL.md §5): from the MSkey and both nonces.
pub fn enrollment_keys(
    ms_key: &[u8],
    ms_nonce: &[u8],
    crs_nonce: &[u8],
    role: Role,
) -> SessionKeys {
    let context = [ms_nonce, crs_nonce].concat();
    SessionKeys::derive(ms_key, &context, role)
}

/// The keys of a client's requests to its MS (PROTOCOL.md §6).
pub fn login_keys(
    client_key: &[u8],
    client_nonce: &[u8],
    server_nonce: &[u8],
    role: Role,
) -> SessionKeys {
    let context = [client_nonce, server_nonce].concat();
    SessionKeys::derive(client_key, &context, role)
}

/// The keys of the MS's pushes to a client (PROTOCOL.md §6).
pub fn push_keys(
    client_key: &[u8],
    client_nonce: &[u8],
    server_nonce: &[u8],
    role: Role,
) -> SessionKeys {
    let context = [client_nonce, server_nonce, b"push"].concat();
    SessionKeys::derive(client_key, &context, role)
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

/// A connection and, on a sealed link, its channel.
pub struct Link {
    conn: Conn,
    channel: Option<Channel>,
    /// The id the CRS gave this MS (enrolled links).
    pub ms_id: u64,
    /// The CRS process's instance (a new one means it restarted).
    pub crs_instance: String,
}

/// An enrolled link to the CRS (the name its users know it by).
pub type CrsLink = Link;

impl Link {
    /// A link in the clear to `addr`.
    pub fn connect(addr: &str, timeout: Duration) -> Result<Link, LinkError> {
        Ok(Link {
            conn: Conn::connect(addr, timeout)?,
            channel: None,
            ms_id: 0,
            crs_instance: String::new(),
        })
    }

    /// A sealed link over an open connection.
    pub fn sealed(conn: Conn, channel: Channel) -> Link {
        Link {
            conn,
            channel: Some(channel),
            ms_id: 0,
            crs_instance: String::new(),
        }
    }

    /// Connects to the CRS and enrolls (PROTOCOL.md §5); `timeout`
    /// bounds each message of the link.
    pub fn enroll(
        crs: &str,
        ms_key: &[u8],
        me: &Identity,
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        let mut conn = Conn::connect(crs, timeout)?;
        let ms_nonce = crypto::random_array::<ENROLL_NONCE_LEN>();
        let hello =
            Message::request("ENROLL-HELLO").with_header("Ms-Nonce", crypto::b64_encode(&ms_nonce));
        let reply = conn.exchange(&hello)?;
        if let Some(r) = Refused::from_message(&reply) {
            return Err(LinkError::Refused(r));
        }
        let crs_nonce = reply.req_b64("Crs-Nonce")?;
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
        let reply = conn.exchange(&enroll)?;
        if let Some(r) = Refused::from_message(&reply) {
            return Err(LinkError::Refused(r));
        }
        let crs_proof = reply.req_b64("Proof")?;
        let ms_id = reply.req_parse("Ms-Id")?;
        let crs_instance = reply.req("Crs-Instance")?.to_owned();
        let expected = crypto::hmac_sha256(
            ms_key,
            &proto::enroll_crs_transcript(&ms_nonce, &crs_nonce, ms_id, &crs_instance),
        );
        if !crypto::ct_eq(&expected, &crs_proof) {
            return Err(LinkError::BadProof);
        }
        let keys = enrollment_keys(ms_key, &ms_nonce, &crs_nonce, Role::Initiator);
        Ok(Link {
            conn,
            channel: Some(Channel::new(keys, Vec::new())),
            ms_id,
            crs_instance,
        })
    }

    /// Whether the link may carry another request: not after the other
    /// side answered in the clear on a sealed link (it is dropping it).
    pub fn is_usable(&self) -> bool {
        self.channel.as_ref().is_none_or(|c| !c.broken)
    }

    /// One request and its typed reply; `wait` is extra time the other
    /// side may take to answer (a long poll).
    pub fn call_with<R: Request>(
        &mut self,
        req: &R,
        wait: Duration,
    ) -> Result<R::Reply, LinkError> {
        match &mut self.channel {
            Some(ch) => ch.call(&mut self.conn, req, wait),
            None => {
                let reply = self.conn.exchange_with(&req.to_message(), wait)?;
                Ok(req.read_reply(&reply)??)
            }
        }
    }

    /// One request and its typed reply.
    pub fn call<R: Request>(&mut self, req: &R) -> Result<R::Reply, LinkError> {
        self.call_with(req, Duration::ZERO)
    }
}

/// What the MS asks of the CRS: a pool of enrolled links, or (in tests of
/// the MS's handlers) the CRS's handlers called in the same process.
pub trait CrsCalls: Send + Sync {
    /// One request to the CRS and its typed reply.
    fn call(&self, req: &CrsRequest) -> Result<CrsReply, LinkError>;

    /// `ONLINE`, its welcome kept as the CRS wrote it for the MS to
    /// forward, and the login's number.
    fn online(&self, req: &OnlineForward) -> Result<(WelcomeForward, u64), LinkError> {
        match self.call(&CrsRequest::Online {
            user: req.user.clone(),
            address: req.address,
        })? {
            CrsReply::Welcome { welcome, login } => Ok((WelcomeForward::of(&welcome), login)),
            _ => Err(LinkError::Proto(ProtoError::NotAReply)),
        }
    }
}

/// Idle enrolled links, reused so that a login costs no handshake.
///
/// The CRS may be several instances serving one directory (`A,B,C`): the
/// pool uses one at a time and, when it cannot be reached or refuses to
/// enroll, moves to the next in the list (round and round), staying there
/// until that one fails in turn.
pub struct LinkPool {
    crs: Vec<String>,
    /// Index in `crs` of the instance in use.
    current: std::sync::atomic::AtomicUsize,
    ms_key: Vec<u8>,
    me: Identity,
    timeout: Duration,
    idle: Mutex<Vec<Link>>,
    /// Most idle links kept.
    max_idle: usize,
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
    pub fn connect(&self) -> Result<Link, LinkError> {
        use std::sync::atomic::Ordering;
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for step in 0..self.crs.len() {
            let i = (start + step) % self.crs.len();
            match Link::enroll(&self.crs[i], &self.ms_key, &self.me, self.timeout) {
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
        Err(last.unwrap_or_else(|| LinkError::Resolve("no CRS address".into())))
    }

    /// Drops every idle link (after the CRS restarted).
    pub fn clear(&self) {
        self.idle.lock().clear();
    }
}

impl CrsCalls for LinkPool {
    fn call(&self, req: &CrsRequest) -> Result<CrsReply, LinkError> {
        self.call_any(req)
    }

    fn online(&self, req: &OnlineForward) -> Result<(WelcomeForward, u64), LinkError> {
        self.call_any(req)
    }
}

impl LinkPool {
    /// One request on an idle link or a new one. A reused link that fails
    /// is retried once on a fresh link: the CRS may have closed it. A
    /// link that answered (even with a refusal) goes back to the pool.
    fn call_any<R: Request>(&self, req: &R) -> Result<R::Reply, LinkError> {
        let reused = self.idle.lock().pop();
        let (mut link, fresh) = match reused {
            Some(l) => (l, false),
            None => (self.connect()?, true),
        };
        let result = match link.call(req) {
            Err(LinkError::Io(_)) if !fresh => {
                link = self.connect()?;
                link.call(req)
            }
            other => other,
        };
        let answered = matches!(&result, Ok(_) | Err(LinkError::Refused(_)));
        if answered && link.is_usable() {
            let mut idle = self.idle.lock();
            if idle.len() < self.max_idle {
                idle.push(link);
            }
        }
        result
    }
}
