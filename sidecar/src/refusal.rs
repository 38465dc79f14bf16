//! [`Refusal`]: why the sidecar refuses a request, one typed error per
//! kind, each mapped to the wire's [`ErrorCode`] (docs/protocol.md) and
//! from there to one Python exception.

use tidecache_core::CoreError;
use tidecache_protocol::{ErrorCode, ResponseBody};

/// Why a request was refused. The connection stays open for all of these
/// but the framing ones (`FrameTooLarge`, `Malformed`, `NoHello`,
/// `VersionMismatch`), after which the sidecar closes it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The frame's length is over `--max-frame-mb`.
    #[error("frame of {bytes} bytes is over the maximum of {max} bytes")]
    FrameTooLarge {
        /// Length the frame announced, bytes.
        bytes: usize,
        /// The limit, bytes.
        max: usize,
    },
    /// The body is not MessagePack.
    #[error("body is not MessagePack: {0}")]
    Malformed(String),
    /// Valid MessagePack, but no request this version knows.
    #[error("unknown message: {0}")]
    UnknownMessage(String),
    /// The first request was not `Hello`.
    #[error("the first request must be Hello")]
    NoHello,
    /// `Hello` a second time on one connection.
    #[error("Hello was said already")]
    HelloAgain,
    /// The client speaks a protocol version this sidecar does not: neither
    /// its own nor the previous one.
    #[error("{}", version_mismatch(*client, *server))]
    VersionMismatch {
        /// The client's version.
        client: u32,
        /// This sidecar's.
        server: u32,
    },
    /// `--max-databases` databases are attached already.
    #[error("already serving {0} attached databases (--max-databases)")]
    TooManyDatabases(usize),
    /// Every slot of the arena is held by an attached database.
    #[error("every database slot of the arena is taken (--max-databases)")]
    NoSlot,
    /// A `Lookup` of more oids than one request may carry.
    #[error("a Lookup of {asked} oids: at most {max} in one request")]
    TooManyOids {
        /// Oids asked for.
        asked: usize,
        /// [`tidecache_protocol::MAX_LOOKUP_OIDS`].
        max: usize,
    },
    /// A view this connection did not register.
    #[error("view {view} of {db:?} is not registered by this connection")]
    NotYourView {
        /// The database key.
        db: String,
        /// The view id.
        view: u64,
    },
    /// A tid more than a day past the sidecar's clock.
    #[error(
        "{what} at tid {tid:#018x}, more than a day past this host's clock ({limit:#018x} is the limit): \
         check the clock of the host that committed it, or the storage's last transaction"
    )]
    FutureTid {
        /// Which request: attach, report, resync.
        what: &'static str,
        /// The tid.
        tid: u64,
        /// The latest tid accepted now.
        limit: u64,
    },
    /// The request carries the identity of a slot flushed since: the
    /// client attaches again, with a proof of the new history.
    #[error("the database was flushed since this client attached (a restored backup or another file under its key?): attach again")]
    Stale,
    /// The MVCC rules refused it: a gap (invariant 4), a bad store or
    /// report, a view the database no longer has.
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// The sentence of [`Refusal::VersionMismatch`]: which versions this
/// sidecar speaks, and what to upgrade.
fn version_mismatch(client: u32, server: u32) -> String {
    let previous = tidecache_protocol::previous::VERSION;
    if client < server {
        format!(
            "protocol version {client} is not spoken by this tidecached, which speaks {server} and, for rolling \
             upgrades, {previous}: upgrade the client (the tidecache package) to a release of protocol \
             {previous} or {server}"
        )
    } else {
        format!(
            "protocol version {client} is newer than this tidecached's {server} (it also accepts {previous}): \
             upgrade tidecached first, then restart the workers"
        )
    }
}

impl Refusal {
    /// The wire's code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            Refusal::Malformed(_) => ErrorCode::Malformed,
            Refusal::UnknownMessage(_) => ErrorCode::UnknownMessage,
            Refusal::NoHello => ErrorCode::NoHello,
            Refusal::VersionMismatch { .. } => ErrorCode::VersionMismatch,
            Refusal::TooManyDatabases(_) | Refusal::NoSlot | Refusal::TooManyOids { .. } => ErrorCode::Limit,
            Refusal::NotYourView { .. } => ErrorCode::UnknownView,
            Refusal::FutureTid { .. } => ErrorCode::FutureTid,
            Refusal::Stale => ErrorCode::Stale,
            Refusal::Core(CoreError::Gap { .. }) => ErrorCode::Gap,
            Refusal::Core(CoreError::UnknownView(_)) => ErrorCode::UnknownView,
            Refusal::HelloAgain | Refusal::Core(_) => ErrorCode::BadRequest,
        }
    }

    /// The error reply: code, sentence, and for a gap the horizon the
    /// client must resync from.
    pub fn into_response(self) -> ResponseBody {
        let horizon = match &self {
            Refusal::Core(CoreError::Gap { horizon, .. }) => Some(horizon.0),
            _ => None,
        };
        ResponseBody::Error {
            code: self.code(),
            message: self.to_string(),
            horizon,
        }
    }
}
