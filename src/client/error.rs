//! What can go wrong in the client, as one type: [`ClientError`], with a
//! variant per cause that a caller (an interface, a test, a program using
//! the library) matches on. Its [`fmt::Display`] is the text people see;
//! nothing in the client decides on that text.

use std::fmt;
use std::path::{Path, PathBuf};

use super::account::MIN_PASSWORD_LEN;
use super::handshake::HandshakeError;
use super::history::HistoryError;
use super::peer::MAX_TEXT_BYTES;
use super::trust::TrustError;
use crate::crypto;
use crate::link::LinkError;
use crate::proto::status::MAX_STATUS_MESSAGE_BYTES;
use crate::proto::{ProtoError, Refusal, Refused};
use crate::seal::SealError;
use crate::wire::io::IoError;

/// Why something the client was asked to do failed: one type for every
/// operation (accounts, conversations, files), with variants a caller
/// matches on. [`fmt::Display`] is the text people see; nothing decides
/// on it.
#[derive(Debug)]
pub enum ClientError {
    /// The password is too short.
    WeakPassword,
    /// The name is not 1-32 of `a-z 0-9 _ . -`.
    InvalidName,
    /// Not logged in.
    NotLoggedIn,
    /// Already logged in as this user.
    AlreadyLoggedIn(String),
    /// Another login is under way in this client.
    LoginUnderWay,
    /// `/passwd`: the current password given is not the account's.
    WrongPassword,
    /// `/passwd`: the new password is the current one.
    SamePassword,
    /// No password given ahead of time (`--password-file`,
    /// `IMS_PASSWORD`) and no terminal to ask on.
    NoPassword,
    /// The new password typed twice differs.
    PasswordsDiffer,
    /// The server could not be reached, broke the connection, or sent
    /// something that is not an answer.
    Io(LinkError),
    /// The server said no: act on the typed refusal, show its reason.
    Refused(Refused),
    /// The server's answer does not fit the request (a broken or newer
    /// server); the text says what came.
    UnexpectedReply(String),
    /// A key operation failed (e.g. iterations below the policy).
    Crypto(crypto::Error),
    /// The CRS's key is not the one configured.
    WrongCrsKey(String),
    /// The login challenge asks for more PBKDF2 iterations than
    /// [`crypto::PBKDF2_MAX_ITERATIONS`]: a hostile or broken server.
    TooManyIterations(u32),
    /// The MS failed to prove it holds our verifier: not our servers.
    ServerUnproven,
    /// The account's stored key pair does not match.
    KeyMismatch,
    /// The personal message is longer than the protocol allows.
    StatusTooLong,
    /// The named user is not our buddy (`/add` them first).
    NotABuddy(String),
    /// The buddy is offline (a message is kept for them instead; files,
    /// typing and sessions need them online).
    BuddyOffline(String),
    /// We block the named user: nothing goes to or comes from them.
    Blocked(String),
    /// The buddy's client refused without saying why (we are not its
    /// user's online buddy, or its user blocks us: it does not tell).
    NotDelivered,
    /// The buddy's client refused, with a typed refusal (its code) and
    /// its reason; `step` says what it refused.
    PeerRefused {
        /// The buddy.
        peer: String,
        /// What was refused.
        step: PeerStep,
        /// The refusal as the buddy's client sent it.
        refused: Refused,
    },
    /// The buddy's client cannot be reached, not even through the relay;
    /// the io kind says why.
    Unreachable {
        /// The buddy.
        peer: String,
        /// Why.
        error: std::io::Error,
    },
    /// The connection to the buddy's client broke off (or failed to
    /// carry a request) before an answer came; `error` if something was
    /// reported.
    NoAnswer {
        /// The buddy.
        peer: String,
        /// What the connection reported, if anything.
        error: Option<IoError>,
    },
    /// No acknowledgement came from the buddy in time.
    TimedOut(String),
    /// The buddy's client closed the connection instead of answering.
    PeerClosed(String),
    /// The buddy's answer is not a valid one.
    BadAnswer {
        /// The buddy.
        peer: String,
        /// What is wrong with it.
        error: ProtoError,
    },
    /// The buddy's answer to our INIT was not signed with their key: not
    /// their client (or the servers hand out a wrong key).
    PeerUnproven {
        /// The buddy.
        peer: String,
        /// The check that failed.
        error: HandshakeError,
    },
    /// The buddy opened a session with us at the same moment and did not
    /// finish it.
    OpenRaced(String),
    /// The session with the buddy ended (their client no longer knows
    /// it): what was waiting is lost and must be sent again.
    SessionEnded,
    /// A local failure of the session's handshake or seal.
    Handshake(HandshakeError),
    /// A message could not be sealed for the session.
    Seal(SealError),
    /// The key the servers hand out for the buddy differs from the one
    /// remembered: compare the safety number and accept it with
    /// `/verify NAME ok`.
    KeyChanged(String),
    /// No key of the buddy seen yet (they were never online with us).
    NoKeySeen(String),
    /// The buddy's public key is not a usable key.
    UnusableKey(String),
    /// The remembered buddy keys are not open in this login.
    KeysNotOpen,
    /// The remembered buddy keys cannot be read or written.
    KeyBook(TrustError),
    /// The history is not open in this login.
    HistoryClosed,
    /// The history cannot be read.
    History(HistoryError),
    /// A text message is longer than [`super::peer::MAX_TEXT_BYTES`];
    /// its length.
    MessageTooLong(usize),
    /// Typing notifications are turned off (`typing_notifications`).
    TypingOff,
    /// No file offer from the named buddy waits for an answer.
    NoSuchOffer(String),
    /// The file to send does not exist.
    NoSuchFile {
        /// As given.
        path: PathBuf,
        /// As the system reported it.
        error: std::io::Error,
    },
    /// The file to send cannot be read (the io kind says why).
    CannotRead {
        /// As given.
        path: PathBuf,
        /// As the system reported it.
        error: std::io::Error,
    },
    /// The path to send is not a regular file.
    NotAFile(PathBuf),
    /// The file got shorter while it was being sent.
    FileShrank(PathBuf),
    /// The transfer was cancelled (here or by the buddy).
    Cancelled,
    /// The transfer's connection broke off; the text says how.
    BrokeOff(String),
    /// The received file is shorter than offered.
    FileShort,
    /// The received file's SHA-256 is not the one offered.
    ChecksumMismatch,
    /// The received file cannot be written (the io kind says why).
    CannotWrite(std::io::Error),
    /// The received file cannot be moved into the download directory.
    CannotStore(std::io::Error),
    /// A buddy's relayed connection to us was refused: as many circuits
    /// as we allow are open.
    CircuitsFull,
    /// A local system call failed (a thread, a socket); the io kind
    /// says which.
    Local(std::io::Error),
}

// Errors cross threads (transfers report from their own).
const _: fn() = || {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<ClientError>();
};

/// The older name of [`ClientError`].
pub type AccountError = ClientError;

/// What a buddy's client refused (for the text shown).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerStep {
    /// A request on the message channel (a message, an offer, an answer).
    Request,
    /// Our INIT: the session.
    Session,
    /// A file transfer's connection.
    Transfer,
    /// The end of a transfer: the file as a whole (its checksum).
    File,
}

impl ClientError {
    /// The typed refusal, if a server or a buddy's client refused.
    pub fn refusal(&self) -> Option<&Refusal> {
        match self {
            ClientError::Refused(r) | ClientError::PeerRefused { refused: r, .. } => {
                Some(&r.refusal)
            }
            _ => None,
        }
    }

    /// The io kind, for failures the operating system reported.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            ClientError::Unreachable { error, .. }
            | ClientError::NoSuchFile { error, .. }
            | ClientError::CannotRead { error, .. }
            | ClientError::CannotWrite(error)
            | ClientError::CannotStore(error)
            | ClientError::Local(error) => Some(error.kind()),
            ClientError::NoAnswer {
                error: Some(IoError::Io(e)),
                ..
            }
            | ClientError::Io(LinkError::Io(IoError::Io(e))) => Some(e.kind()),
            ClientError::NoAnswer {
                error: Some(IoError::Timeout),
                ..
            }
            | ClientError::Io(LinkError::Io(IoError::Timeout))
            | ClientError::TimedOut(_) => Some(std::io::ErrorKind::TimedOut),
            _ => None,
        }
    }

    /// The file to send could not be opened or read.
    pub(crate) fn reading(path: &Path, error: std::io::Error) -> ClientError {
        let path = path.to_owned();
        if error.kind() == std::io::ErrorKind::NotFound {
            ClientError::NoSuchFile { path, error }
        } else {
            ClientError::CannotRead { path, error }
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::WeakPassword => write!(f, "password must have at least {MIN_PASSWORD_LEN} characters"),
            ClientError::InvalidName => f.write_str("invalid name: use 1-32 of a-z 0-9 _ . -"),
            ClientError::NotLoggedIn => f.write_str("not logged in; /login NAME first"),
            ClientError::AlreadyLoggedIn(me) => write!(f, "already logged in as {me}; /logout first"),
            ClientError::LoginUnderWay => f.write_str("a login is under way"),
            ClientError::WrongPassword => f.write_str("the current password is wrong"),
            ClientError::SamePassword => f.write_str("the new password is the current one"),
            ClientError::NoPassword => {
                f.write_str("no password: use --password-file FILE or IMS_PASSWORD")
            }
            ClientError::PasswordsDiffer => f.write_str("the passwords differ"),
            ClientError::Io(e) => write!(f, "cannot reach the server: {e}"),
            ClientError::Refused(r) => write!(f, "{r}"),
            ClientError::UnexpectedReply(what) => f.write_str(what),
            ClientError::Crypto(e) => write!(f, "{e}"),
            ClientError::WrongCrsKey(fp) => write!(
                f,
                "the CRS's key fingerprint is {fp}, not the configured one: refusing to send credentials"
            ),
            ClientError::TooManyIterations(n) => write!(
                f,
                "the messaging server asks for {n} password iterations, more than the {} this client accepts: refusing to log in there",
                crypto::PBKDF2_MAX_ITERATIONS
            ),
            ClientError::ServerUnproven => f.write_str("the messaging server failed to prove itself"),
            ClientError::KeyMismatch => f.write_str("the stored key pair does not match"),
            ClientError::StatusTooLong => write!(
                f,
                "the personal message has at most {MAX_STATUS_MESSAGE_BYTES} bytes"
            ),
            ClientError::NotABuddy(who) => write!(f, "{who} is not your buddy; /add {who} first"),
            ClientError::BuddyOffline(who) => write!(f, "{who} is offline"),
            ClientError::Blocked(who) => write!(f, "you block {who}; /unblock {who} first"),
            ClientError::NotDelivered => f.write_str("not delivered"),
            ClientError::PeerRefused { peer, step, refused } => match step {
                PeerStep::Request => write!(f, "{refused}"),
                PeerStep::Session => write!(f, "{peer} refused the session: {refused}"),
                PeerStep::Transfer => write!(f, "{peer} refused the file: {refused}"),
                PeerStep::File => write!(f, "{peer}: {refused}"),
            },
            ClientError::Unreachable { peer, error } => write!(
                f,
                "{peer} cannot be reached, not even through the relay: {error}"
            ),
            ClientError::NoAnswer { peer, error: None } | ClientError::TimedOut(peer) => {
                write!(f, "no answer from {peer}")
            }
            ClientError::NoAnswer {
                peer,
                error: Some(e),
            } => write!(f, "no answer from {peer}: {e}"),
            ClientError::PeerClosed(peer) => write!(f, "{peer} closed the connection"),
            ClientError::BadAnswer { peer, error } => write!(f, "{peer}: bad answer: {error}"),
            ClientError::PeerUnproven { peer, error } => {
                write!(f, "{peer}'s answer was not signed by {peer} ({error})")
            }
            ClientError::OpenRaced(peer) => write!(
                f,
                "{peer} opened a session at the same time and did not finish it"
            ),
            ClientError::SessionEnded => f.write_str("the session ended; send again"),
            ClientError::Handshake(e) => write!(f, "{e}"),
            ClientError::Seal(e) => write!(f, "{e}"),
            ClientError::KeyChanged(who) => write!(
                f,
                "{who}'s key changed; compare the safety number (/verify {who}) and accept it with /verify {who} ok"
            ),
            ClientError::NoKeySeen(who) => write!(
                f,
                "no key of {who} seen yet; try again while {who} is online"
            ),
            ClientError::UnusableKey(who) => write!(f, "{who}'s public key is unusable"),
            ClientError::KeysNotOpen => f.write_str("the remembered buddy keys are not open"),
            ClientError::KeyBook(e) => write!(f, "{e}"),
            ClientError::HistoryClosed => f.write_str("the history is not open in this login"),
            ClientError::History(e) => write!(f, "{e}"),
            ClientError::MessageTooLong(n) => write!(
                f,
                "message too long ({n} bytes; at most {MAX_TEXT_BYTES})"
            ),
            ClientError::TypingOff => {
                f.write_str("typing notifications are off (typing_notifications)")
            }
            ClientError::NoSuchOffer(who) => write!(f, "no file offer from {who}"),
            ClientError::NoSuchFile { path, error } | ClientError::CannotRead { path, error } => {
                write!(f, "{}: {error}", path.display())
            }
            ClientError::NotAFile(path) => write!(f, "{} is not a file", path.display()),
            ClientError::FileShrank(path) => {
                write!(f, "{} shrank while being sent", path.display())
            }
            ClientError::Cancelled => f.write_str("cancelled"),
            ClientError::BrokeOff(how) => write!(f, "the transfer broke off: {how}"),
            ClientError::FileShort => f.write_str("the file is shorter than offered"),
            ClientError::ChecksumMismatch => f.write_str("checksum mismatch"),
            ClientError::CannotWrite(e) => write!(f, "cannot write the file: {e}"),
            ClientError::CannotStore(e) => write!(f, "cannot store the file: {e}"),
            ClientError::CircuitsFull => write!(
                f,
                "{} circuits open",
                super::relay::MAX_CIRCUITS
            ),
            ClientError::Local(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<LinkError> for ClientError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Refused(r) => ClientError::Refused(r),
            e => ClientError::Io(e),
        }
    }
}

impl From<Refused> for ClientError {
    fn from(r: Refused) -> Self {
        ClientError::Refused(r)
    }
}

impl From<crypto::Error> for ClientError {
    fn from(e: crypto::Error) -> Self {
        ClientError::Crypto(e)
    }
}

impl From<HandshakeError> for ClientError {
    fn from(e: HandshakeError) -> Self {
        ClientError::Handshake(e)
    }
}

impl From<SealError> for ClientError {
    fn from(e: SealError) -> Self {
        ClientError::Seal(e)
    }
}

impl From<TrustError> for ClientError {
    fn from(e: TrustError) -> Self {
        ClientError::KeyBook(e)
    }
}

impl From<HistoryError> for ClientError {
    fn from(e: HistoryError) -> Self {
        ClientError::History(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Refusal;

    /// The words people see stay those the interfaces always showed (the
    /// process tests and scripts match some of them).
    #[test]
    fn errors_read_as_before() {
        let e = |e: ClientError| e.to_string();
        assert_eq!(
            e(ClientError::BuddyOffline("alice".into())),
            "alice is offline"
        );
        assert_eq!(e(ClientError::NotDelivered), "not delivered");
        assert_eq!(
            e(ClientError::NotABuddy("bob".into())),
            "bob is not your buddy; /add bob first"
        );
        assert!(e(ClientError::KeyChanged("bob".into())).contains("key changed"));
        assert_eq!(
            e(ClientError::SessionEnded),
            "the session ended; send again"
        );
        assert_eq!(e(ClientError::TimedOut("bob".into())), "no answer from bob");
        assert_eq!(
            e(ClientError::TypingOff),
            "typing notifications are off (typing_notifications)"
        );
        assert!(e(ClientError::BrokeOff("closed".into())).contains("broke off"));
        // A buddy's refusal of a request shows its reason alone, and keeps
        // its code for a caller.
        let refused = ClientError::PeerRefused {
            peer: "bob".into(),
            step: PeerStep::Request,
            refused: Refused::new(Refusal::NotABuddy, "not delivered"),
        };
        assert_eq!(
            e(ClientError::PeerRefused {
                peer: "bob".into(),
                step: PeerStep::Session,
                refused: Refused::new(Refusal::BadRequest, "no"),
            }),
            "bob refused the session: no"
        );
        assert_eq!(refused.refusal(), Some(&Refusal::NotABuddy));
        assert_eq!(e(refused), "not delivered");
    }
}
