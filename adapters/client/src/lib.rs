//! tidecache-client: the Rust client of `tidecached`, used by every adapter.
//!
//! A [`Client`] holds one Unix-socket connection, sends a request and waits
//! for its answer, each call bounded by a timeout (50 ms by default). When the
//! sidecar is absent, dead, restarting, slow or answers garbage, calls fail
//! fast with [`ClientError::Unavailable`] so the caller falls back to its
//! storage (invariant 8); the client reconnects by itself on a later call,
//! re-attaches the databases it joined with `Resync` (never a flush) and
//! re-registers its views. A database counts as joined only once an
//! `Attach` was answered `Started` or `Joined` (with a proof, invariant 7):
//! until then its lookups are unavailable, and reports and resyncs for it
//! are refused locally ([`ClientError::NotAttached`]).
//!
//! Lookups do not use the socket: the sidecar's Hello names its arena file,
//! which the client maps read-only, and [`Client::lookup_local`] finds the
//! revision visible at a view there, validated, without a system call
//! (`tidecache_core::arena::reader`). Attach and Resync answers give each
//! database's slot in the arena. While the connection is down, lookups miss.
//!
//! [`Session`] binds a client to one database, with its [`Outbox`]: one
//! ordered queue, drained by a background thread over the session's
//! connection, for reports, resyncs, the process's oldest view, stores and
//! sampled hits (so eviction keeps what is read); views are kept in the
//! process ([`tidecache_core::ProcessViews`]) and only their minimum is
//! registered with the sidecar. What an adapter (the PyO3 module) wraps:
//! nothing its application threads call waits on the socket, except
//! attach, flush and stats.
//!
//! # Fork
//!
//! A process may fork while another of its threads is inside a call (a
//! catch-up or ZEO thread mid-report in a gunicorn `--preload` master): the
//! child gets that call's lock *locked*, and the thread that would unlock it
//! does not exist there. The rules:
//!
//! - Everything a call locks or sends on lives in per-process state tagged
//!   with the process that created it: the connection, its lock, the
//!   published arena and slots (in [`Client`]); the outbox, the views and the hit
//!   batch (in [`Session`]). Every call first compares the tag with the
//!   calling process (one atomic load: a `pthread_atfork` child handler
//!   keeps the process id).
//! - A child never locks, reads through a lock, sends on, or drops the
//!   parent's state: it installs a fresh one (new lock, no connection, no
//!   views, a new outbox) and leaks the parent's, whose locks and
//!   channel may be mid-use by a thread that is not there. Only the child's
//!   copy of the parent's socket is closed (its number is kept in an
//!   atomic), so the sidecar sees the parent's connection close when the
//!   parent closes it, and no answer ever reaches the wrong process.
//! - What a child replays is read lock-free from an atomic snapshot the
//!   parent publishes on every change: the databases attached with the
//!   newest tid the sidecar had of each (replayed as `Resync` when the child
//!   connects) and the next local view id (so ids the parent handed out are
//!   never handed out again). The parent's views are not registered again:
//!   a view is one connection's, and an id the child does not know is
//!   ignored.
//! - The parent's background threads (the outbox's sender) do not
//!   exist in the child; its queue is never written to there.

#![warn(missing_docs)]

mod connect;
mod fork;
pub use tidecache_protocol as protocol;
pub mod outbox;
pub mod session;

pub use outbox::Outbox;
pub use session::Session;

use protocol::{
    encode, read_frame_len, write_frame, AttachState, ErrorCode, Found, Request, RequestBody, Response, ResponseBody,
    ServerStats, StoreItem, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
pub use tidecache_core::arena::Slot;
use tidecache_core::arena::{reader, Geometry, Memory};

/// Errors of the client. Callers treat every one as a miss.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No usable connection: absent, dead, timed out or garbled sidecar.
    #[error("tidecached at {socket} is unavailable: {reason}")]
    Unavailable {
        /// The socket path.
        socket: String,
        /// What went wrong, for logs.
        reason: String,
    },
    /// A report or resync for a database this client has not joined (no
    /// `Attach` answered `Started` or `Joined` yet): sent, it could move the
    /// horizon of a history the client's storage was never proved to hold
    /// (invariant 7). Attach (with a proof) first.
    #[error("not attached to database {db:?}: attach (with a proof) first")]
    NotAttached {
        /// The database key.
        db: String,
    },
    /// The sidecar refused the request with an error reply.
    #[error("tidecached refused the request ({code:?}): {message}")]
    Refused {
        /// Error code of the reply.
        code: ErrorCode,
        /// The sidecar's sentence.
        message: String,
        /// For [`ErrorCode::Gap`]: the sidecar's horizon.
        horizon: Option<u64>,
    },
}

/// Why the sidecar's arena cannot be mapped; lookups then go over the
/// socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// The file cannot be opened or mapped (permissions: see `--group`).
    #[error("cannot map the arena: {0}")]
    Io(#[from] std::io::Error),
    /// The file is not a sound arena of this layout version.
    #[error("not a usable arena: {0}")]
    Layout(#[from] tidecache_core::arena::LayoutError),
    /// The file is another run's (the sidecar restarted and replaced it).
    #[error("incarnation {found:#x}, the sidecar serves {expected:#x}")]
    Incarnation {
        /// The incarnation in the file's header.
        found: u64,
        /// The one the sidecar's Hello named.
        expected: u64,
    },
}

impl ClientError {
    /// Whether the database was flushed by another process since this
    /// client joined it ([`ErrorCode::Stale`]): attach again, with a proof.
    pub fn is_stale(&self) -> bool {
        matches!(
            self,
            ClientError::Refused {
                code: ErrorCode::Stale,
                ..
            }
        )
    }

    /// Whether this is a refused report that left a gap (invariant 4).
    pub fn is_gap(&self) -> bool {
        matches!(
            self,
            ClientError::Refused {
                code: ErrorCode::Gap,
                ..
            }
        )
    }
}

/// How to reach the sidecar.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Path of `tidecached`'s Unix socket.
    pub socket: PathBuf,
    /// Bound on each call: connect, send and answer (default 50 ms).
    pub timeout: Duration,
    /// After a failure, calls fail at once for this long before the client
    /// tries to reconnect (default 250 ms).
    pub retry_after: Duration,
    /// Name sent in Hello, for the sidecar's logs.
    pub name: String,
    /// Largest answer accepted, bytes (default 64 MiB, the sidecar's
    /// default frame limit); a larger length prefix is garbage: the
    /// connection is dropped and the call is `Unavailable`.
    pub max_frame: usize,
}

impl ClientConfig {
    /// Defaults for `socket`: 50 ms timeout, 250 ms between reconnects.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ClientConfig {
            socket: socket.into(),
            timeout: Duration::from_millis(50),
            retry_after: Duration::from_millis(250),
            name: format!("tidecache-client pid {}", std::process::id()),
            max_frame: protocol::DEFAULT_MAX_FRAME,
        }
    }
}

/// The sidecar's arena, mapped read-only.
pub struct MappedArena {
    memory: Memory,
    geometry: Geometry,
    incarnation: u64,
}

impl MappedArena {
    /// Maps the arena at `path` and checks its header (layout version,
    /// checksum, length) and that it is live with `incarnation`.
    ///
    /// # Errors
    /// [`MapError`]: the file cannot be mapped, is not a sound arena, or is
    /// of another incarnation.
    pub fn open(path: &std::path::Path, incarnation: u64) -> Result<Self, MapError> {
        Self::checked(Memory::map_read_only(path)?, incarnation)
    }

    /// Maps the arena file open as `file` (the read-only descriptor the
    /// sidecar handed over with its `Hello` answer) and checks it as
    /// [`MappedArena::open`] does: a descriptor of some other file (not an
    /// arena, another layout version, another incarnation) is refused.
    /// The mapping outlives `file`, which the caller closes.
    ///
    /// # Errors
    /// [`MapError`], as [`MappedArena::open`].
    pub fn from_file(file: &std::fs::File, incarnation: u64) -> Result<Self, MapError> {
        Self::checked(Memory::map_read_only_file(file)?, incarnation)
    }

    fn checked(memory: Memory, incarnation: u64) -> Result<Self, MapError> {
        use tidecache_core::arena::layout::header;
        let geometry = Geometry::read(memory.words(), memory.len_bytes())?;
        let found = memory.words()[header::INCARNATION].load(std::sync::atomic::Ordering::Acquire);
        if found != incarnation {
            return Err(MapError::Incarnation {
                found,
                expected: incarnation,
            });
        }
        Ok(MappedArena {
            memory,
            geometry,
            incarnation,
        })
    }

    /// The revision of `oid` visible at `view` in database slot `slot`
    /// (a miss unless the slot still holds the identity `slot` names).
    ///
    /// # Errors
    /// Why it missed.
    pub fn lookup(&self, slot: Slot, oid: u64, view: u64) -> Result<reader::Found, reader::Miss> {
        reader::lookup(self.memory.words(), &self.geometry, slot, oid, view)
    }

    /// Finds the revision of `oid` visible at `view`; copy its state with
    /// [`MappedArena::copy`] (which validates the copy).
    ///
    /// # Errors
    /// Why it missed.
    pub fn locate(&self, slot: Slot, oid: u64, view: u64) -> Result<reader::Located, reader::Miss> {
        reader::locate_visible(self.memory.words(), &self.geometry, slot, oid, view)
    }

    /// The largest state a revision in this arena can hold, bytes: a
    /// larger one cannot be stored.
    pub fn max_state_bytes(&self) -> usize {
        self.geometry.max_state_bytes()
    }

    /// Copies a located state into `buf` and validates it; `false` is a miss.
    pub fn copy(&self, found: &reader::Located, buf: &mut [u8]) -> bool {
        found.copy_to(self.memory.words(), buf)
    }
}

/// Maps the arena a `Hello` answer named: the descriptor that came with
/// it, or, when none came, the path (which a client in another mount
/// namespace, e.g. another container, may not resolve).
fn map_arena(arena: &protocol::ArenaInfo, fd: Option<std::fs::File>) -> Result<MappedArena, MapError> {
    match fd {
        Some(file) => MappedArena::from_file(&file, arena.incarnation),
        None => {
            tracing::info!(arena = %arena.path, "the sidecar handed over no arena descriptor; mapping its path");
            MappedArena::open(std::path::Path::new(&arena.path), arena.incarnation)
        }
    }
}

/// The sentence of a `VersionMismatch` answer to this client's `Hello`,
/// with what the operator should do: the sidecar is older than this
/// client (a newer one accepts its own and the previous version).
fn version_mismatch(sidecar_said: &str) -> String {
    format!(
        "{sidecar_said} (this client speaks protocol version {PROTOCOL_VERSION}; a tidecached accepts clients of \
         its own protocol version and of the previous one, so upgrade tidecached before the workers; until then \
         this process runs from its storage, uncached)"
    )
}

/// What lookups read without the connection's lock: the mapped arena and
/// the slot (number and identity) of each attached database, replaced
/// whole on every change.
#[derive(Default)]
struct Plane {
    arena: Option<Arc<MappedArena>>,
    slots: HashMap<String, Slot>,
}

/// The result of [`Client::lookup_local`].
#[derive(Debug, Clone, PartialEq)]
pub enum Local {
    /// The revision visible at the view.
    Hit(Found),
    /// Not in the arena (or not valid there): load from the storage.
    Miss,
    /// No arena to read (not connected, not attached, file not mappable).
    Unavailable,
}

struct View {
    db: String,
    tid: u64,
    remote: Option<u64>,
}

#[derive(Default)]
struct State {
    conn: Option<UnixStream>,
    down_until: Option<Instant>,
    next_id: u64,
    /// Databases joined (an `Attach` answered `Started` or `Joined`), and
    /// the newest tid the sidecar has from us: replayed as `Resync` on
    /// reconnect. A database whose attach is unanswered, `Behind` or
    /// `Prove` is not here.
    attached: HashMap<String, u64>,
    /// The slot identity each joined database had when this client joined
    /// it: sent with every store, report, resync and touch, so that a
    /// flush by another process (a restored backup) cuts this client off
    /// until it proves the new history (`ErrorCode::Stale`).
    identities: HashMap<String, u64>,
    views: HashMap<u64, View>,
    next_view: u64,
    connects: u64,
    closed: bool,
    /// The arena mapped at the last Hello.
    mapped: Option<Arc<MappedArena>>,
    /// Slots (number and identity) of the databases attached on this
    /// connection.
    slots: HashMap<String, Slot>,
}

/// What a forked child carries over from its parent, published by the
/// parent (under its lock) on every change and read lock-free by the child.
#[derive(Clone, Default)]
struct Replay {
    /// Databases attached, and the newest tid the sidecar has from us.
    attached: HashMap<String, u64>,
    /// Their slot identities (see `State::identities`).
    identities: HashMap<String, u64>,
    /// The last local view id handed out.
    next_view: u64,
    /// Closed for good.
    closed: bool,
}

/// One process's client state: a child installs its own (see the crate's
/// fork rules).
struct Proc {
    /// The process that created it ([`fork::process`]).
    pid: u32,
    state: Mutex<State>,
    plane: arc_swap::ArcSwap<Plane>,
    replay: arc_swap::ArcSwap<Replay>,
    /// The descriptor of `state.conn` while it is open, -1 otherwise: a
    /// child closes its copy without the lock.
    conn_fd: AtomicI32,
    /// A duplicate of the connection's socket, to shut it down without the
    /// lock ([`Client::abort`]: a call hung on a stopped sidecar holds it).
    /// A child drops its copy.
    shutdown: arc_swap::ArcSwapOption<UnixStream>,
    /// Set by [`Client::abort`]: no reconnect any more.
    aborted: std::sync::atomic::AtomicBool,
}

impl Proc {
    fn new(pid: u32, replay: Replay) -> Self {
        let state = State {
            attached: replay.attached.clone(),
            identities: replay.identities.clone(),
            next_view: replay.next_view,
            closed: replay.closed,
            ..State::default()
        };
        Proc {
            pid,
            state: Mutex::new(state),
            plane: arc_swap::ArcSwap::from_pointee(Plane::default()),
            replay: arc_swap::ArcSwap::from_pointee(replay),
            conn_fd: AtomicI32::new(-1),
            shutdown: arc_swap::ArcSwapOption::empty(),
            aborted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes what a forked child replays; call after changing
    /// `attached`, `next_view` or `closed`.
    fn remember(&self, st: &State) {
        self.replay.store(Arc::new(Replay {
            attached: st.attached.clone(),
            identities: st.identities.clone(),
            next_view: st.next_view,
            closed: st.closed,
        }));
    }

    fn set_conn(&self, st: &mut State, stream: UnixStream) {
        use std::os::fd::AsRawFd;
        let fd = stream.as_raw_fd();
        self.shutdown.store(stream.try_clone().ok().map(Arc::new));
        st.conn = Some(stream);
        self.conn_fd.store(fd, Ordering::Release);
    }

    /// Drops the connection; the descriptor is forgotten first, so a child
    /// forked meanwhile never closes a number that was reused.
    fn take_conn(&self, st: &mut State) -> Option<UnixStream> {
        self.conn_fd.store(-1, Ordering::Release);
        self.shutdown.store(None);
        st.conn.take()
    }
}

/// A connection to `tidecached` that reconnects by itself. Thread-safe:
/// calls are serialised on the one connection. Fork-safe: a forked child
/// gets its own connection and never waits on a lock of its parent's (see
/// the crate's fork rules).
pub struct Client {
    config: ClientConfig,
    proc: arc_swap::ArcSwap<Proc>,
}

impl Client {
    /// A client for `config`; connects lazily, on the first call.
    pub fn new(config: ClientConfig) -> Self {
        fork::register();
        Client {
            config,
            proc: arc_swap::ArcSwap::from_pointee(Proc::new(fork::process(), Replay::default())),
        }
    }

    /// This process's state: in a forked child, the first call installs a
    /// fresh one from the parent's replay snapshot, without touching the
    /// parent's lock.
    fn proc(&self) -> arc_swap::Guard<Arc<Proc>> {
        let current = self.proc.load();
        let pid = fork::process();
        if current.pid == pid {
            return current;
        }
        let fresh = Arc::new(Proc::new(pid, Replay::clone(&current.replay.load())));
        let previous = self.proc.compare_and_swap(&*current, fresh);
        if Arc::ptr_eq(&previous, &current) {
            // Ours won. The child's copy of the parent's socket closes (the
            // parent's connection stays up); the parent's state is leaked,
            // never dropped here: its lock may be held by a thread of the
            // parent's, its data mid-change.
            let fd = current.conn_fd.swap(-1, Ordering::AcqRel);
            if fd >= 0 {
                // SAFETY: `fd` is the inherited copy of the parent's
                // connection, whose `UnixStream` is leaked with the state
                // just below, so nothing else closes or uses this number.
                unsafe { libc::close(fd) };
            }
            // The child's copy of the duplicate closes too (only this
            // process's copy: the parent's socket stays open).
            drop(current.shutdown.swap(None));
            std::mem::forget(Arc::clone(&current));
            tracing::debug!(socket = %self.config.socket.display(), "forked: a fresh connection for this process");
        }
        drop(previous);
        drop(current);
        self.proc.load()
    }

    /// Publishes what lookups may use: the arena and slots while connected,
    /// nothing otherwise.
    fn publish(&self, p: &Proc, st: &State) {
        let plane = match (&st.conn, &st.mapped) {
            (Some(_), Some(arena)) => Plane {
                arena: Some(arena.clone()),
                slots: st.slots.clone(),
            },
            _ => Plane::default(),
        };
        p.plane.store(Arc::new(plane));
    }

    /// Looks up `oid` at `view` in `db` in the mapped arena: no lock, no
    /// system call.
    pub fn lookup_local(&self, db: &str, oid: u64, view: u64) -> Local {
        let p = self.proc();
        let plane = p.plane.load();
        let (Some(arena), Some(&slot)) = (&plane.arena, plane.slots.get(db)) else {
            return Local::Unavailable;
        };
        match arena.lookup(slot, oid, view) {
            Ok(f) => Local::Hit(Found {
                serial: f.serial,
                end: f.end,
                state: f.state,
            }),
            Err(_) => Local::Miss,
        }
    }

    /// Calls `f` with the mapped arena and the slot of `db` (number and
    /// identity: pass it to every lookup), while connected and attached (for
    /// adapters that read it directly); `None` otherwise.
    pub fn with_arena<R>(&self, db: &str, f: impl FnOnce(&MappedArena, Slot) -> R) -> Option<R> {
        let p = self.proc();
        let plane = p.plane.load();
        Some(f(plane.arena.as_ref()?, *plane.slots.get(db)?))
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    fn unavailable(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Unavailable {
            socket: self.config.socket.display().to_string(),
            reason: reason.into(),
        }
    }

    /// Whether the client holds a live connection now. No lock (one
    /// atomic load): it never waits for a call in progress.
    pub fn is_connected(&self) -> bool {
        self.proc().conn_fd.load(Ordering::Acquire) >= 0
    }

    /// Whether `db` is joined (its attach was answered `Started` or
    /// `Joined` and no `Stale` answer forgot it since), connected or not.
    /// No lock.
    pub fn is_joined(&self, db: &str) -> bool {
        self.proc().replay.load().attached.contains_key(db)
    }

    /// Whether a lookup of `db` over the socket may be tried now: joined,
    /// connected, and the arena not mapped (a lookup in the arena is
    /// better). No lock.
    pub fn serves_over_socket(&self, db: &str) -> bool {
        let p = self.proc();
        let plane = p.plane.load();
        plane.arena.is_none() && p.conn_fd.load(Ordering::Acquire) >= 0 && self.is_joined(db)
    }

    /// Connects now if the connection is down (Hello, `Resync` of the
    /// joined databases, views registered again); what a background thread
    /// calls so that a process that only reads gets back to the arena.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`].
    pub fn reconnect(&self) -> Result<(), ClientError> {
        let p = self.proc();
        let mut st = p.lock();
        self.ensure(&p, &mut st)
    }

    /// Ends a call in progress by shutting the connection down under it,
    /// without waiting for its lock (a sidecar that stopped answering
    /// holds a call for up to the timeout), and stops reconnecting: what
    /// closing does when the queue cannot be drained in time. Calls fail
    /// with `Unavailable` afterwards.
    pub fn abort(&self) {
        let p = self.proc();
        p.aborted.store(true, Ordering::Release);
        if let Some(s) = p.shutdown.load_full() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Closes the connection for good: the sidecar releases this client's
    /// views and attachments; later calls fail with `Unavailable`.
    pub fn close(&self) {
        let p = self.proc();
        let mut st = p.lock();
        st.closed = true;
        p.take_conn(&mut st);
        st.views.clear();
        st.slots.clear();
        self.publish(&p, &st);
        p.remember(&st);
    }

    /// Number of connections made so far (1 after the first call; more
    /// after reconnects).
    pub fn connects(&self) -> u64 {
        self.proc().lock().connects
    }

    /// Sends one request on the connection and reads its answer.
    fn exchange(&self, p: &Proc, st: &mut State, body: RequestBody) -> Result<ResponseBody, ClientError> {
        let conn = st.conn.as_mut().ok_or_else(|| self.unavailable("not connected"))?;
        st.next_id += 1;
        let id = st.next_id;
        let bytes = encode(&Request { id, body }).map_err(|e| self.unavailable(format!("encode: {e}")))?;
        let result = (|| {
            write_frame(conn, &bytes).map_err(|e| format!("send: {e}"))?;
            let n = read_frame_len(conn).map_err(|e| format!("receive: {e}"))?;
            if n > self.config.max_frame {
                return Err(format!(
                    "answer of {n} bytes is over the maximum of {} bytes",
                    self.config.max_frame
                ));
            }
            let mut buf = vec![0u8; n];
            conn.read_exact(&mut buf).map_err(|e| format!("receive: {e}"))?;
            let resp: Response = rmp_serde::from_slice(&buf).map_err(|e| format!("undecodable answer: {e}"))?;
            if resp.id != id {
                return Err(format!("answer to request {} where {id} was expected", resp.id));
            }
            Ok(resp.body)
        })();
        match result {
            Ok(ResponseBody::Error { code, message, horizon }) => Err(ClientError::Refused { code, message, horizon }),
            Ok(body) => Ok(body),
            Err(reason) => {
                self.mark_down(p, st);
                Err(self.unavailable(reason))
            }
        }
    }

    /// Sends `Hello` and reads its answer with the arena's descriptor, if
    /// one came with it ([`protocol::handoff`]): none from a sidecar that
    /// hands out none (an earlier version, or one that could not open its
    /// arena read-only). A wrong number of descriptors or a truncated
    /// control message (`MSG_CTRUNC`) drops the connection (`Unavailable`:
    /// lookups miss, invariant 8); every descriptor received is closed on
    /// every path but the one kept.
    fn hello(&self, p: &Proc, st: &mut State) -> Result<(ResponseBody, Option<std::fs::File>), ClientError> {
        let conn = st.conn.as_mut().ok_or_else(|| self.unavailable("not connected"))?;
        st.next_id += 1;
        let id = st.next_id;
        let hello = RequestBody::Hello {
            version: PROTOCOL_VERSION,
            client: self.config.name.clone(),
        };
        let bytes = encode(&Request { id, body: hello }).map_err(|e| self.unavailable(format!("encode: {e}")))?;
        let result = (|| {
            write_frame(conn, &bytes).map_err(|e| format!("send: {e}"))?;
            let received =
                protocol::handoff::read_frame_with_fds(conn, self.config.max_frame).map_err(|e| e.to_string())?;
            let mut fds = received.fds;
            if fds.len() > 1 {
                return Err(format!(
                    "the Hello answer came with {} descriptors where one arena was expected; all closed",
                    fds.len()
                ));
            }
            let resp: Response =
                rmp_serde::from_slice(&received.body).map_err(|e| format!("undecodable answer: {e}"))?;
            if resp.id != id {
                return Err(format!("answer to request {} where {id} was expected", resp.id));
            }
            Ok((resp.body, fds.pop().map(std::fs::File::from)))
        })();
        match result {
            Ok((ResponseBody::Error { code, message, horizon }, _)) => {
                Err(ClientError::Refused { code, message, horizon })
            }
            Ok(answer) => Ok(answer),
            Err(reason) => {
                self.mark_down(p, st);
                Err(self.unavailable(reason))
            }
        }
    }

    fn mark_down(&self, p: &Proc, st: &mut State) {
        if p.take_conn(st).is_some() {
            tracing::warn!(socket = %self.config.socket.display(), "lost the connection to tidecached");
        }
        st.down_until = Some(Instant::now() + self.config.retry_after);
        for v in st.views.values_mut() {
            v.remote = None;
        }
        st.slots.clear();
        self.publish(p, st);
    }

    /// Connects if needed: Hello, then `Resync` of every attached database
    /// and re-registration of every view.
    fn ensure(&self, p: &Proc, st: &mut State) -> Result<(), ClientError> {
        if st.conn.is_some() {
            return Ok(());
        }
        if st.closed || p.aborted.load(Ordering::Acquire) {
            return Err(self.unavailable("client closed"));
        }
        if st.down_until.is_some_and(|t| Instant::now() < t) {
            return Err(self.unavailable("down; waiting before reconnecting"));
        }
        let stream = connect::connect(&self.config.socket, self.config.timeout).map_err(|e| {
            st.down_until = Some(Instant::now() + self.config.retry_after);
            self.unavailable(format!("connect: {e}"))
        })?;
        let t = Some(self.config.timeout);
        if let Err(e) = stream.set_read_timeout(t).and_then(|_| stream.set_write_timeout(t)) {
            st.down_until = Some(Instant::now() + self.config.retry_after);
            return Err(self.unavailable(format!("set timeout: {e}")));
        }
        p.set_conn(st, stream);
        st.connects += 1;
        match self.hello(p, st) {
            Ok((ResponseBody::Hello { version, arena, .. }, fd)) if version == PROTOCOL_VERSION => {
                if st.mapped.as_ref().map(|m| m.incarnation) != Some(arena.incarnation) {
                    st.mapped = match map_arena(&arena, fd) {
                        Ok(m) => Some(Arc::new(m)),
                        Err(reason) => {
                            tracing::warn!(arena = %arena.path, %reason, "cannot map the sidecar's arena; lookups go over the socket");
                            None
                        }
                    };
                }
            }
            Ok((other, _)) => {
                self.mark_down(p, st);
                return Err(self.unavailable(format!("unexpected Hello answer {other:?}")));
            }
            Err(ClientError::Refused {
                code: ErrorCode::VersionMismatch,
                message,
                horizon,
            }) => {
                self.mark_down(p, st);
                return Err(ClientError::Refused {
                    code: ErrorCode::VersionMismatch,
                    message: version_mismatch(&message),
                    horizon,
                });
            }
            Err(e) => {
                self.mark_down(p, st);
                return Err(e);
            }
        }
        let attached: Vec<(String, u64)> = st.attached.iter().map(|(d, t)| (d.clone(), *t)).collect();
        for (db, tid) in attached {
            let known = st.identities.get(&db).copied();
            match self.exchange(
                p,
                st,
                RequestBody::Resync {
                    db: db.clone(),
                    tid,
                    identity: known,
                },
            ) {
                Ok(ResponseBody::Resynced { slot, identity, .. }) => {
                    st.slots.insert(db, Slot { index: slot, identity });
                }
                Err(e) if e.is_stale() => self.forget(p, st, &db),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        let views: Vec<(u64, String, u64)> = st.views.iter().map(|(k, v)| (*k, v.db.clone(), v.tid)).collect();
        for (local, db, tid) in views {
            if let ResponseBody::ViewRegistered { view } =
                self.exchange(p, st, RequestBody::RegisterView { db, tid })?
            {
                if let Some(v) = st.views.get_mut(&local) {
                    v.remote = Some(view);
                }
            }
        }
        self.publish(p, st);
        tracing::info!(socket = %self.config.socket.display(), "connected to tidecached");
        Ok(())
    }

    /// The slot identity `db` had when this client joined it.
    fn identity_of(&self, db: &str) -> Option<u64> {
        self.proc().lock().identities.get(db).copied()
    }

    /// `db` was flushed by another process since this client joined it
    /// (`Stale`): it is not joined any more (lookups unavailable, not
    /// replayed) until an attach proves the new history.
    fn forget(&self, p: &Proc, st: &mut State, db: &str) {
        st.attached.remove(db);
        st.identities.remove(db);
        st.slots.remove(db);
        p.remember(st);
        self.publish(p, st);
        tracing::warn!(
            db,
            "the database was flushed by another process (a restored backup?): attach again, with a proof"
        );
    }

    /// [`Client::forget`] `db` if `e` says it went stale; returns `e`.
    fn forget_if_stale(&self, db: &str, e: ClientError) -> ClientError {
        if e.is_stale() {
            let p = self.proc();
            let mut st = p.lock();
            self.forget(&p, &mut st, db);
        }
        e
    }

    fn call(&self, body: RequestBody) -> Result<ResponseBody, ClientError> {
        let p = self.proc();
        let mut st = p.lock();
        self.ensure(&p, &mut st)?;
        self.exchange(&p, &mut st, body)
    }

    fn unexpected(&self, got: ResponseBody, wanted: &str) -> ClientError {
        let p = self.proc();
        self.mark_down(&p, &mut p.lock());
        self.unavailable(format!("answered {got:?} where {wanted} was expected"))
    }

    /// Attaches to `db` with the storage's `lastTransaction()` (ZODB's
    /// `registerDB` time) and, after an [`AttachState::Prove`] answer, the
    /// horizon `proven` the caller proved its storage holds. Returns what
    /// the sidecar did and its horizon. Until an answer `Started` or
    /// `Joined`, the database is not joined: its lookups are unavailable,
    /// reports and resyncs for it are refused, and a reconnect does not
    /// replay it (invariant 7: a replayed `Resync` would join without a
    /// proof); attach again later.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`], [`ClientError::Refused`].
    pub fn attach(&self, db: &str, last_tid: u64, proven: Option<u64>) -> Result<(AttachState, u64), ClientError> {
        let p = self.proc();
        let mut st = p.lock();
        if st.attached.remove(db).is_some() | st.slots.remove(db).is_some() {
            st.identities.remove(db);
            p.remember(&st);
            self.publish(&p, &st);
        }
        self.ensure(&p, &mut st)?;
        match self.exchange(
            &p,
            &mut st,
            RequestBody::Attach {
                db: db.to_owned(),
                last_tid,
                proven,
            },
        )? {
            ResponseBody::Attached {
                state,
                horizon,
                slot,
                identity,
            } => {
                if matches!(state, AttachState::Started | AttachState::Joined) {
                    st.attached.insert(db.to_owned(), last_tid.max(horizon));
                    st.identities.insert(db.to_owned(), identity);
                    p.remember(&st);
                    st.slots.insert(db.to_owned(), Slot { index: slot, identity });
                    self.publish(&p, &st);
                }
                Ok((state, horizon))
            }
            other => {
                drop(st);
                Err(self.unexpected(other, "Attached"))
            }
        }
    }

    /// Whether `db` is joined (see [`Client::attach`]) and the connection
    /// is up: what lookups in the arena need too. No lock.
    pub fn is_attached(&self, db: &str) -> bool {
        self.proc().plane.load().slots.contains_key(db)
    }

    /// Looks up `oids` at `view` in `db`; one result per oid: in the mapped
    /// arena, or over the socket when the arena cannot be mapped.
    ///
    /// # Errors
    /// [`ClientError`]: treat as all misses; [`ClientError::NotAttached`]
    /// while `db` is not joined (invariant 7: a storage not proved to hold
    /// the sidecar's history is not served from it).
    pub fn lookup(&self, db: &str, view: u64, oids: Vec<u64>) -> Result<Vec<Option<Found>>, ClientError> {
        let local: Vec<Local> = oids.iter().map(|&oid| self.lookup_local(db, oid, view)).collect();
        if !local.contains(&Local::Unavailable) {
            return Ok(local
                .into_iter()
                .map(|l| match l {
                    Local::Hit(f) => Some(f),
                    _ => None,
                })
                .collect());
        }
        if !self.proc().lock().attached.contains_key(db) {
            return Err(ClientError::NotAttached { db: db.to_owned() });
        }
        self.lookup_remote(db, view, oids)
    }

    /// Looks up `oids` at `view` in `db` over the socket (the sidecar reads
    /// its arena), joined or not (for tools and tests; adapters use
    /// [`Client::lookup`]), in requests of at most
    /// [`protocol::MAX_LOOKUP_OIDS`] oids.
    ///
    /// # Errors
    /// [`ClientError`]: treat as all misses.
    pub fn lookup_remote(&self, db: &str, view: u64, oids: Vec<u64>) -> Result<Vec<Option<Found>>, ClientError> {
        let mut out = Vec::with_capacity(oids.len());
        for chunk in oids.chunks(protocol::MAX_LOOKUP_OIDS) {
            match self.call(RequestBody::Lookup {
                db: db.to_owned(),
                view,
                oids: chunk.to_vec(),
            })? {
                ResponseBody::Found { results } if results.len() == chunk.len() => out.extend(results),
                other => return Err(self.unexpected(other, "Found")),
            }
        }
        Ok(out)
    }

    /// Stores revisions; returns `(kept, refused)`.
    ///
    /// # Errors
    /// [`ClientError`]: the revisions are simply not cached.
    pub fn store(&self, db: &str, revisions: Vec<StoreItem>) -> Result<(u32, u32), ClientError> {
        let identity = self.identity_of(db);
        let answer = self.call(RequestBody::Store {
            db: db.to_owned(),
            revisions,
            identity,
        });
        match answer.map_err(|e| self.forget_if_stale(db, e))? {
            ResponseBody::Stored { kept, refused } => Ok((kept, refused)),
            other => Err(self.unexpected(other, "Stored")),
        }
    }

    /// Sends the invalidation report `(from, to, changes)`; returns the
    /// sidecar's horizon.
    ///
    /// # Errors
    /// [`ClientError::Refused`] with [`ErrorCode::Gap`] when `from` is past
    /// the horizon (see [`ClientError::is_gap`]): call [`Client::resync`].
    /// [`ClientError::Unavailable`]: the report is lost; resync later.
    /// [`ClientError::NotAttached`]: `db` is not joined.
    pub fn report(&self, db: &str, from: u64, to: u64, changes: Vec<(u64, u64)>) -> Result<u64, ClientError> {
        self.send_report(db, to, |identity| RequestBody::Report {
            db: db.to_owned(),
            from,
            to,
            changes,
            identity,
        })
    }

    /// Sends a report (exact or collapsed) up to `to` made by `body` from
    /// the database's identity; returns the sidecar's horizon.
    fn send_report(
        &self,
        db: &str,
        to: u64,
        body: impl FnOnce(Option<u64>) -> RequestBody,
    ) -> Result<u64, ClientError> {
        let p = self.proc();
        let mut st = p.lock();
        if !st.attached.contains_key(db) {
            return Err(ClientError::NotAttached { db: db.to_owned() });
        }
        self.ensure(&p, &mut st)?;
        let identity = st.identities.get(db).copied();
        match self.exchange(&p, &mut st, body(identity)) {
            Err(e) if e.is_stale() => {
                self.forget(&p, &mut st, db);
                Err(e)
            }
            Err(e) => Err(e),
            Ok(ResponseBody::Reported { horizon }) => {
                if let Some(t) = st.attached.get_mut(db) {
                    *t = (*t).max(to);
                }
                p.remember(&st);
                Ok(horizon)
            }
            Ok(other) => {
                drop(st);
                Err(self.unexpected(other, "Reported"))
            }
        }
    }

    /// Sends the collapsed invalidation report `(from, to, changes)`: every
    /// oid changed in `(from, to]`, each with a tid `T` (`from < T <= to`)
    /// at or after its newest change there (the exact newest, or an upper
    /// bound such as `to`: ZEO's reconnect and `getInvalidations`,
    /// RelStorage's poll). The sidecar applies it conservatively
    /// (docs/invariants.md, invariants 3 and 4). Returns the sidecar's
    /// horizon.
    ///
    /// # Errors
    /// As [`Client::report`]: a gap is [`ClientError::is_gap`] (call
    /// [`Client::resync`]); [`ClientError::Unavailable`]: the report is
    /// lost, resync later; [`ClientError::NotAttached`]: `db` is not joined.
    pub fn report_collapsed(&self, db: &str, from: u64, to: u64, changes: Vec<(u64, u64)>) -> Result<u64, ClientError> {
        self.send_report(db, to, |identity| RequestBody::CollapsedReport {
            db: db.to_owned(),
            from,
            to,
            changes,
            identity,
        })
    }

    /// Tells the sidecar this client lost invalidations up to `tid`;
    /// returns `(restarted, horizon)`.
    ///
    /// # Errors
    /// [`ClientError`]; [`ClientError::NotAttached`] when `db` is not joined.
    pub fn resync(&self, db: &str, tid: u64) -> Result<(bool, u64), ClientError> {
        let p = self.proc();
        let mut st = p.lock();
        let Some(t) = st.attached.get_mut(db) else {
            return Err(ClientError::NotAttached { db: db.to_owned() });
        };
        *t = (*t).max(tid);
        p.remember(&st);
        self.ensure(&p, &mut st)?;
        let identity = st.identities.get(db).copied();
        let answer = self.exchange(
            &p,
            &mut st,
            RequestBody::Resync {
                db: db.to_owned(),
                tid,
                identity,
            },
        );
        if let Err(e) = &answer {
            if e.is_stale() {
                self.forget(&p, &mut st, db);
            }
        }
        match answer? {
            ResponseBody::Resynced {
                restarted,
                horizon,
                slot,
                identity,
            } => {
                st.slots.insert(db.to_owned(), Slot { index: slot, identity });
                self.publish(&p, &st);
                Ok((restarted, horizon))
            }
            other => {
                drop(st);
                Err(self.unexpected(other, "Resynced"))
            }
        }
    }

    /// Registers a view of `db` at `tid` and returns a local id for it. The
    /// view is remembered even while the sidecar is unavailable and
    /// registered again on every reconnect. Never fails.
    pub fn register_view(&self, db: &str, tid: u64) -> u64 {
        let p = self.proc();
        let mut st = p.lock();
        st.next_view += 1;
        let local = st.next_view;
        p.remember(&st);
        st.views.insert(
            local,
            View {
                db: db.to_owned(),
                tid,
                remote: None,
            },
        );
        if self.ensure(&p, &mut st).is_ok() {
            if let Ok(ResponseBody::ViewRegistered { view }) =
                self.exchange(&p, &mut st, RequestBody::RegisterView { db: db.to_owned(), tid })
            {
                if let Some(v) = st.views.get_mut(&local) {
                    v.remote = Some(view);
                }
            }
        }
        local
    }

    /// Moves view `local` to `tid`. Never fails: an unknown id is ignored,
    /// an unavailable sidecar learns the new tid on reconnect.
    pub fn advance_view(&self, local: u64, tid: u64) {
        let p = self.proc();
        let mut st = p.lock();
        let Some(v) = st.views.get_mut(&local) else { return };
        v.tid = tid;
        let (db, remote) = (v.db.clone(), v.remote);
        match remote {
            Some(view) => {
                let r = self.exchange(
                    &p,
                    &mut st,
                    RequestBody::AdvanceView {
                        db: db.clone(),
                        view,
                        tid,
                    },
                );
                if let Err(ClientError::Refused {
                    code: ErrorCode::UnknownView,
                    ..
                }) = r
                {
                    // Detached by the sidecar (held the log back too long):
                    // register again at the new tid.
                    if let Ok(ResponseBody::ViewRegistered { view }) =
                        self.exchange(&p, &mut st, RequestBody::RegisterView { db, tid })
                    {
                        if let Some(v) = st.views.get_mut(&local) {
                            v.remote = Some(view);
                        }
                    }
                }
            }
            None => {
                // Registers it (with the new tid) if the sidecar is back.
                let _ = self.ensure(&p, &mut st);
            }
        }
    }

    /// Releases view `local`. Never fails.
    pub fn release_view(&self, local: u64) {
        let p = self.proc();
        let mut st = p.lock();
        if let Some(View {
            db, remote: Some(view), ..
        }) = st.views.remove(&local)
        {
            let _ = self.exchange(&p, &mut st, RequestBody::ReleaseView { db, view });
        }
    }

    /// Drops every revision of `db` in the sidecar (after a pack).
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn flush(&self, db: &str) -> Result<(), ClientError> {
        match self.call(RequestBody::Flush { db: db.to_owned() })? {
            ResponseBody::Done => Ok(()),
            other => Err(self.unexpected(other, "Done")),
        }
    }

    /// Tells the sidecar these revisions of `db` were read (hits in the
    /// arena), so eviction keeps them.
    ///
    /// # Errors
    /// [`ClientError`]: the hints are lost, which only costs hit ratio.
    pub fn touch(&self, db: &str, revisions: Vec<(u64, u64)>) -> Result<(), ClientError> {
        self.touch_counted(db, revisions, 0, 0)
    }

    /// [`Client::touch`] that also carries `hits` and `misses`: this
    /// client's lookups of `db` answered with a revision, and gone to the
    /// base storage, since the counts it last sent (the sidecar adds them
    /// to the database's host-wide counters; `revisions` may be empty).
    ///
    /// # Errors
    /// [`ClientError`]. `Unavailable`: nothing was counted, unless the
    /// sidecar took the request and its answer was lost (a timeout);
    /// `Refused`: the counts were added unless the database could not be
    /// served at all (`Limit`); `Stale` comes after they were added.
    pub fn touch_counted(
        &self,
        db: &str,
        revisions: Vec<(u64, u64)>,
        hits: u64,
        misses: u64,
    ) -> Result<(), ClientError> {
        let identity = self.identity_of(db);
        let answer = self.call(RequestBody::Touch {
            db: db.to_owned(),
            revisions,
            identity,
            hits,
            misses,
        });
        match answer.map_err(|e| self.forget_if_stale(db, e))? {
            ResponseBody::Done => Ok(()),
            other => Err(self.unexpected(other, "Done")),
        }
    }

    /// The sidecar's counters.
    ///
    /// # Errors
    /// [`ClientError`].
    pub fn stats(&self) -> Result<ServerStats, ClientError> {
        match self.call(RequestBody::Stats)? {
            ResponseBody::Stats(s) => Ok(s),
            other => Err(self.unexpected(other, "Stats")),
        }
    }
}
