//! The sidecar's server: a Unix socket, a thread per client connection,
//! one [`SharedDatabase`] per database key, all sharing one byte budget.

use crate::refusal::Refusal;
use crate::startup::{self, ArenaLock, Existing};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tidecache_core::arena::{layout, ArenaWriter, Geometry, LayoutError, Memory, SharedArena};
use tidecache_core::{AttachOutcome, Oid, SharedDatabase, StoreOutcome, Tid, ViewId};
use tidecache_protocol::{
    self as protocol, ArenaInfo, ArenaStats as WireArenaStats, AttachState, DatabaseStats as WireStats, Found, Request,
    RequestBody, Response, ResponseBody, ServerStats, PROTOCOL_VERSION,
};

/// Errors that stop the sidecar from starting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SidecarError {
    /// An I/O operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Another sidecar answers on the socket already.
    #[error(
        "another tidecached is already serving {0}; stop it first, or give this one another --socket and --cache-file"
    )]
    AlreadyRunning(PathBuf),
    /// The socket path exists and is not a socket: refusing to remove it.
    #[error("{0} exists and is not a socket; refusing to replace it: remove it or give another --socket")]
    NotASocket(PathBuf),
    /// The arena cannot be laid out (size out of range).
    #[error("arena: {0}")]
    Arena(LayoutError),
    /// `--cache-file` names a file that is not a tidecache arena.
    #[error(
        "{path} is not a tidecache arena file ({reason}); refusing to replace it: \
         remove it yourself or choose another --cache-file"
    )]
    NotAnArena {
        /// The file.
        path: PathBuf,
        /// Why it is not one.
        reason: String,
    },
    /// Another process holds the arena file's lock.
    #[error(
        "another tidecached ({holder}) is using the arena file {cache_file} (it holds {lock}); \
         stop it first, or give this one another --socket and --cache-file"
    )]
    Locked {
        /// The lock file.
        lock: PathBuf,
        /// The arena file.
        cache_file: PathBuf,
        /// Pid and socket of the holder, as it wrote them in the lock file.
        holder: String,
    },
    /// The file system of the arena file has no room for it.
    #[error(
        "the arena file {path} needs {needed_mib} MiB but {mount} has {free_mib} MiB free; \
         lower --memory-mb or enlarge the mount"
    )]
    NoRoom {
        /// The arena file.
        path: PathBuf,
        /// Its size, MiB.
        needed_mib: u64,
        /// The mount point it would live on.
        mount: PathBuf,
        /// Free there, MiB.
        free_mib: u64,
    },
    /// `--group` names a group this process cannot give files to.
    #[error(
        "this process (uid {uid}) is not a member of group {gid} and cannot give the socket and \
         arena file to it; add the user to the group or drop --group"
    )]
    Group {
        /// The group.
        gid: u32,
        /// The process's effective user.
        uid: u32,
    },
    /// The directory a path lives in does not exist.
    #[error("the directory of {what}, {}, does not exist", dir.display())]
    NoDirectory {
        /// The option (`--socket`, `--cache-file`).
        what: &'static str,
        /// The directory.
        dir: PathBuf,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> SidecarError {
    move |source| SidecarError::Io {
        context: context.into(),
        source,
    }
}

/// Settings of `tidecached serve`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Path of the Unix socket (created mode 0600).
    pub socket: PathBuf,
    /// Size of the arena file: the byte budget of all databases together.
    pub memory_bytes: u64,
    /// Path of the arena file (on /dev/shm unless `--cache-file`).
    pub cache_file: PathBuf,
    /// Group allowed to read the arena and use the socket (mode 0640 and
    /// 0660); `None`: the owner only (0600).
    pub group: Option<u32>,
    /// Largest frame body accepted, bytes.
    pub max_frame: usize,
    /// Most databases served at once.
    pub max_databases: usize,
    /// How often invisible revisions are reclaimed.
    pub reclaim_interval: Duration,
    /// Most changes a database's invalidation log may hold before the
    /// oldest views are detached (invariant 5).
    pub max_log_changes: usize,
}

type Db = Arc<SharedDatabase>;

/// A database and the number of client connections attached to it.
struct Entry {
    db: Db,
    attached: usize,
    /// `Resync` requests served for it (the metrics endpoint's
    /// `tidecache_resyncs_total`).
    resyncs: AtomicU64,
    /// Hit hints received for it, `(oid, serial)` pairs in `Touch`
    /// requests (`tidecache_hit_hints_total`).
    hit_hints: AtomicU64,
    /// Lookups its clients counted and sent in `Touch`: answered with a
    /// revision (`hits`), gone to the base storage (`misses`).
    hits: AtomicU64,
    misses: AtomicU64,
}

/// The sidecar's state, shared by every connection thread.
pub struct Server {
    config: ServerConfig,
    arena: Arc<SharedArena>,
    arena_info: ArenaInfo,
    /// The arena file opened read-only (`O_RDONLY`): a duplicate of it goes
    /// to every client with the answer to its `Hello`, so clients need not
    /// resolve `arena_info.path` (containers). Never a writable descriptor.
    /// `None` if it could not be opened at start (logged): clients then
    /// map the path.
    arena_fd: Option<std::fs::File>,
    /// Held for the life of the process: no other sidecar uses the file.
    _lock: ArenaLock,
    databases: RwLock<HashMap<String, Entry>>,
    /// Taken for writing by a flush, for reading by the requests that
    /// check their slot identity ([`Server::unflushed`]).
    flush_gate: RwLock<()>,
    clients: AtomicU64,
    /// Per refused protocol version: when it was last logged, and the
    /// refusals not logged since ([`Server::log_version_refusal`]).
    version_refusals: std::sync::Mutex<HashMap<u32, (Option<Instant>, u64)>>,
    started: Instant,
    /// This run created the arena file (none was there, or it replaced an
    /// empty or discarded one): [`Server::discard`] may remove it.
    created: bool,
}

impl Server {
    /// A server over the arena at `config.cache_file`. Nothing is changed
    /// before every check passed, in this order (see [`crate::startup`]):
    /// the size is valid; the socket's and the file's directories exist;
    /// `--group` can be applied; the socket path is not a live socket nor
    /// another kind of file; what lies at `cache_file` is nothing, an empty
    /// file or an arena (any other file is refused, never overwritten);
    /// the file system has room for a new arena (unless one of the same
    /// size is there to re-attach); the arena file's lock
    /// ([`ArenaLock`]) is free. Then the arena: the file a previous run left
    /// is re-attached if it is sound and of the same size (a warm restart:
    /// its databases serve at once, its records are verified in the
    /// background by [`Server::serve`]; after a reboot only its verified
    /// closed revisions are kept, see `ArenaWriter::recover`); otherwise it
    /// is discarded, with the reason in the log, and a new one created with
    /// its blocks allocated. A file of another format version is never
    /// mapped nor written: the new file is renamed over it (unlinked, never
    /// truncated), with a log line naming both versions. The arena is then
    /// opened once more, read-only, for the descriptor every `Hello` answer
    /// hands over. [`Server::bind`] comes last.
    ///
    /// # Errors
    /// [`SidecarError::Arena`] (size out of range),
    /// [`SidecarError::NoDirectory`], [`SidecarError::Group`],
    /// [`SidecarError::NotASocket`], [`SidecarError::AlreadyRunning`],
    /// [`SidecarError::NotAnArena`], [`SidecarError::NoRoom`],
    /// [`SidecarError::Locked`], [`SidecarError::Io`] (the file cannot be
    /// read, created or mapped).
    pub fn new(config: ServerConfig) -> Result<Arc<Self>, SidecarError> {
        let geometry =
            Geometry::for_size(config.memory_bytes, config.max_databases as u64).map_err(SidecarError::Arena)?;
        startup::directory_exists("--socket", &config.socket)?;
        startup::directory_exists("--cache-file", &config.cache_file)?;
        if let Some(gid) = config.group {
            startup::group_applicable(gid)?;
        }
        startup::socket_free(&config.socket)?;
        startup::owned_by_this_user(&config.cache_file)?;
        match startup::existing_arena(&config.cache_file)? {
            Existing::Arena {
                bytes,
                version: Some(layout::LAYOUT_VERSION),
            } if bytes == geometry.file_bytes => {}
            _ => startup::room_for(&config.cache_file, geometry.file_bytes)?,
        }
        let mut lock = ArenaLock::take(&config.cache_file, &config.socket)?;
        startup::remove_dead_starts_files(&config.cache_file);
        // Under the lock: what lies there now is what this run works on.
        let existing = startup::existing_arena(&config.cache_file)?;
        if existing != Existing::Nothing {
            startup::owned_by_this_user(&config.cache_file)?;
        }
        let (arena, created) = open_arena(&config, geometry, existing)?;
        if let Err(e) = lock.hold_arena(&config.cache_file) {
            if created {
                remove_new_arena(&config.cache_file, &lock);
            }
            return Err(e);
        }
        let incarnation = arena.writer().incarnation();
        let arena_fd = read_only_arena(&config.cache_file, incarnation);
        Ok(Arc::new(Server {
            arena_fd,
            arena_info: ArenaInfo {
                path: config.cache_file.display().to_string(),
                incarnation,
            },
            arena,
            _lock: lock,
            config,
            databases: RwLock::default(),
            flush_gate: RwLock::default(),
            clients: AtomicU64::new(0),
            version_refusals: std::sync::Mutex::default(),
            started: Instant::now(),
            created,
        }))
    }

    /// Undoes a start that failed after [`Server::new`] (the socket could
    /// not be bound, the signal handlers not installed): removes the arena
    /// file if this run created it, and its lock file, so a failed start
    /// leaves no arena behind. No client can have mapped it yet (the
    /// socket was never served). An arena file re-attached from a previous
    /// run is kept: it is that run's warm cache.
    pub fn discard(&self) {
        if self.created {
            remove_new_arena(&self.config.cache_file, &self._lock);
        }
    }

    /// Binds the socket, mode 0600. A stale socket file (nobody answers on
    /// it) is replaced; a live one is an error.
    ///
    /// # Errors
    /// [`SidecarError::AlreadyRunning`], [`SidecarError::NotASocket`],
    /// [`SidecarError::Io`].
    pub fn bind(&self) -> Result<UnixListener, SidecarError> {
        let path = &self.config.socket;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(SidecarError::NotASocket(path.clone()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(SidecarError::AlreadyRunning(path.clone()));
            }
            tracing::info!(socket = %path.display(), "removing a stale socket file");
            std::fs::remove_file(path).map_err(io_err(format!("removing stale socket {}", path.display())))?;
        }
        // Created 0600 from the start: no window in which others can connect.
        // SAFETY: umask only swaps the process's file creation mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(io_err(format!("binding {}", path.display())))?;
        let mode = match self.config.group {
            Some(gid) => {
                std::os::unix::fs::chown(path, None, Some(gid))
                    .map_err(io_err(format!("chown :{gid} {}", path.display())))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("chmod {mode:o} {}", path.display())))?;
        Ok(listener)
    }

    /// Serves connections from `listener` until the process ends; starts
    /// the reclamation thread.
    pub fn serve(self: &Arc<Self>, listener: UnixListener) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || me.reclaim_loop());
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || me.verify());
        tracing::info!(
            socket = %self.config.socket.display(),
            cache_file = %self.config.cache_file.display(),
            memory_mb = self.config.memory_bytes >> 20,
            "tidecached serving"
        );
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    let me = self.clone();
                    let spawned = std::thread::Builder::new()
                        .name("client".into())
                        .spawn(move || me.client(stream));
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "cannot start a thread for a client");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Verifies the records of a reopened arena, one segment per lock
    /// hold, logging progress: service goes on meanwhile (readers validate
    /// every record anyway; this removes the damaged ones for good).
    pub fn verify(&self) {
        let total = self.arena.stats().unverified_segments;
        if total == 0 {
            return;
        }
        let started = Instant::now();
        let (mut checked, mut discarded, mut done) = (0u64, 0u64, 0u64);
        let mut last_log = Instant::now();
        loop {
            let held = Instant::now();
            let Some((c, d)) = self.arena.writer().verify_next() else {
                break;
            };
            // Off the lock for as long as it was held: std's mutex is not
            // fair, and without a pause this loop would take it back at once
            // and keep Attach and Store waiting until the whole file is
            // verified (measured: the first hit after a restart on 1 GiB
            // waited 0.49 s, all of the verification).
            std::thread::sleep(held.elapsed());
            checked += c;
            discarded += d;
            done += 1;
            if last_log.elapsed() >= Duration::from_secs(1) {
                tracing::info!(
                    segments = done,
                    of = total,
                    records = checked,
                    discarded,
                    "verifying the reopened arena"
                );
                last_log = Instant::now();
            }
        }
        tracing::info!(
            segments = total,
            records = checked,
            discarded,
            ms = started.elapsed().as_millis() as u64,
            "reopened arena verified"
        );
    }

    fn reclaim_loop(&self) {
        loop {
            std::thread::sleep(self.config.reclaim_interval);
            for (name, db) in self.snapshot_databases() {
                let n = db.reclaim();
                if n > 0 {
                    tracing::debug!(db = %name, reclaimed = n, "reclaimed revisions no view can see");
                }
                let detached = db.enforce_log_limit(self.config.max_log_changes);
                if let Some((_, oldest)) = detached.first() {
                    tracing::warn!(
                        db = %name, views = detached.len(), oldest = %oldest, max = self.config.max_log_changes,
                        "detached views holding the low-water mark back (log over --max-log-changes): \
                         their stores are refused, their lookups stay correct; close ZODB connections \
                         kept open for long (or long transactions), or raise --max-log-changes"
                    );
                }
            }
        }
    }

    fn snapshot_databases(&self) -> Vec<(String, Db)> {
        let dbs = self.databases.read().unwrap_or_else(|p| p.into_inner());
        dbs.iter().map(|(k, v)| (k.clone(), v.db.clone())).collect()
    }

    /// The database `name`, created on first use. At `--max-databases`,
    /// databases no connection is attached to and no request holds are
    /// dropped to make room (their slots released: a handle a request might
    /// still hold is inert). A slot the previous run left in the arena file
    /// that no client claimed is freed for `name` by the arena itself
    /// ([`SharedArena::database`]) when no slot is free.
    fn database(&self, name: &str) -> Result<Db, Refusal> {
        if let Some(e) = self.databases.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Ok(e.db.clone());
        }
        let mut dbs = self.databases.write().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = dbs.get(name) {
            return Ok(e.db.clone());
        }
        if dbs.len() >= self.config.max_databases {
            let before = dbs.len();
            dbs.retain(|_, e| {
                // Handles are cloned only under this map's lock, held here
                // for writing: the map's is the only one unless a request
                // is in flight on it.
                let idle = e.attached == 0 && Arc::strong_count(&e.db) == 1;
                if idle {
                    e.db.cache().release();
                }
                !idle
            });
            tracing::info!(
                dropped = before - dbs.len(),
                "dropped databases no client is attached to"
            );
        }
        if dbs.len() >= self.config.max_databases {
            return Err(Refusal::TooManyDatabases(dbs.len()));
        }
        let Some(cache) = self.arena.database(name) else {
            return Err(Refusal::NoSlot);
        };
        match cache.horizon() {
            Some(h) => tracing::info!(db = %name, slot = cache.slot().index, horizon = %h,
                "database re-attached from the arena file: closed revisions serve now, open ones up to its horizon"),
            None => tracing::info!(db = %name, slot = cache.slot().index, "new database"),
        }
        let db = Arc::new(SharedDatabase::with_cache(cache));
        dbs.insert(
            name.to_owned(),
            Entry {
                db: db.clone(),
                attached: 0,
                resyncs: AtomicU64::new(0),
                hit_hints: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            },
        );
        Ok(db)
    }

    /// Counts `conn` as attached to `name` (once per connection).
    fn mark_attached(&self, conn: &mut Conn, name: &str) {
        if conn.attached.iter().any(|d| d == name) {
            return;
        }
        if let Some(e) = self.databases.write().unwrap_or_else(|p| p.into_inner()).get_mut(name) {
            e.attached += 1;
            conn.attached.push(name.to_owned());
        }
    }

    /// One client connection, until it closes or breaks a framing rule.
    fn client(&self, stream: UnixStream) {
        let n = self.clients.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(clients = n, "client connected");
        let mut conn = Conn {
            views: Vec::new(),
            attached: Vec::new(),
            behind: Vec::new(),
            hello: None,
            version: PROTOCOL_VERSION,
        };
        if let Err(e) = self.converse(&stream, &mut conn) {
            tracing::debug!(error = %e, "client connection ended");
        }
        {
            let mut dbs = self.databases.write().unwrap_or_else(|p| p.into_inner());
            for (db, view) in conn.views.drain(..) {
                if let Some(e) = dbs.get(&db) {
                    let _ = e.db.release_view(view);
                }
            }
            for db in conn.attached.drain(..) {
                if let Some(e) = dbs.get_mut(&db) {
                    e.attached -= 1;
                }
            }
        }
        let n = self.clients.fetch_sub(1, Ordering::Relaxed) - 1;
        tracing::debug!(
            client = conn.hello.as_deref().unwrap_or("?"),
            clients = n,
            "client gone; its views released"
        );
    }

    fn converse(&self, mut stream: &UnixStream, conn: &mut Conn) -> io::Result<()> {
        loop {
            let n = match protocol::read_frame_len(&mut stream) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            if n > self.config.max_frame {
                tracing::warn!(
                    bytes = n,
                    max = self.config.max_frame,
                    "frame over the maximum; closing the connection"
                );
                let refusal = Refusal::FrameTooLarge {
                    bytes: n,
                    max: self.config.max_frame,
                };
                return reply(&mut stream, conn.version, 0, refusal.into_response());
            }
            let mut body = vec![0u8; n];
            stream.read_exact(&mut body)?;
            let req: Request = match rmp_serde::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    if rmp_serde::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
                        // Valid MessagePack: a message this version does not know.
                        let id = rmp_serde::from_slice::<(u64, serde::de::IgnoredAny)>(&body).map_or(0, |r| r.0);
                        tracing::warn!(error = %e, "unknown message");
                        reply(
                            &mut stream,
                            conn.version,
                            id,
                            Refusal::UnknownMessage(e.to_string()).into_response(),
                        )?;
                        continue;
                    }
                    tracing::warn!(error = %e, "undecodable frame; closing the connection");
                    return reply(
                        &mut stream,
                        conn.version,
                        0,
                        Refusal::Malformed(e.to_string()).into_response(),
                    );
                }
            };
            if conn.hello.is_none() {
                match req.body {
                    RequestBody::Hello { version, client } if protocol::previous::accepted(version) => {
                        tracing::info!(client = %client, version, "client said hello");
                        conn.hello = Some(client);
                        // The connection speaks the client's version: its
                        // answers are encoded so that it can decode them.
                        conn.version = version;
                        let server = format!("tidecached {}", env!("CARGO_PKG_VERSION"));
                        self.reply_hello(
                            stream,
                            conn.version,
                            req.id,
                            ResponseBody::Hello {
                                version,
                                server,
                                arena: self.arena_info.clone(),
                            },
                        )?;
                        continue;
                    }
                    RequestBody::Hello { version, client } => {
                        let refusal = Refusal::VersionMismatch {
                            client: version,
                            server: PROTOCOL_VERSION,
                        };
                        self.log_version_refusal(version, &client, &refusal);
                        return reply(&mut stream, conn.version, req.id, refusal.into_response());
                    }
                    _ => {
                        return reply(&mut stream, conn.version, req.id, Refusal::NoHello.into_response());
                    }
                }
            }
            let answer = self.dispatch(conn, req.body);
            reply(&mut stream, conn.version, req.id, answer)?;
        }
    }

    /// Logs a `Hello` refused for its protocol version, at WARN, at most
    /// once a minute per version (a worker that cannot be served retries
    /// every quarter second).
    fn log_version_refusal(&self, version: u32, client: &str, refusal: &Refusal) {
        let mut last = self.version_refusals.lock().unwrap_or_else(|p| p.into_inner());
        let (at, suppressed) = last.entry(version).or_insert((None, 0));
        if at.is_some_and(|t: Instant| t.elapsed() < VERSION_REFUSAL_LOG_EVERY) {
            *suppressed += 1;
            return;
        }
        tracing::warn!(
            client = %client,
            version,
            refused_since_last_line = *suppressed,
            "refused a client of protocol version {version}: {refusal}"
        );
        *at = Some(Instant::now());
        *suppressed = 0;
    }

    fn dispatch(&self, conn: &mut Conn, body: RequestBody) -> ResponseBody {
        self.answer(conn, body).unwrap_or_else(Refusal::into_response)
    }

    fn answer(&self, conn: &mut Conn, body: RequestBody) -> Result<ResponseBody, Refusal> {
        Ok(match body {
            RequestBody::Hello { .. } => return Err(Refusal::HelloAgain),
            RequestBody::Attach {
                db: name,
                last_tid,
                proven,
            } => {
                not_in_the_future("attach", last_tid)?;
                let db = self.database(&name)?;
                self.mark_attached(conn, &name);
                let state = match db.attach(Tid(last_tid), proven.map(Tid)) {
                    AttachOutcome::Started => AttachState::Started,
                    AttachOutcome::Joined => AttachState::Joined,
                    AttachOutcome::Behind { horizon } => {
                        // A lagging client asks again every few ms until it
                        // catches up or flushes: said once per connection.
                        if conn.behind.iter().any(|d| d == &name) {
                            tracing::debug!(db = %name, last_tid = %Tid(last_tid), horizon = %horizon,
                                "a client's lastTransaction is still below the horizon");
                        } else {
                            tracing::info!(
                                db = %name, last_tid = %Tid(last_tid), horizon = %horizon,
                                "a client's lastTransaction is below the horizon (lagging, or a restored \
                                 backup): nothing is served to it until it catches up or flushes the database"
                            );
                            conn.behind.push(name.clone());
                        }
                        AttachState::Behind
                    }
                    AttachOutcome::Prove(p) => {
                        if proven.is_some() {
                            tracing::info!(db = %name, proven = ?proven, horizon = %p.horizon,
                                "the horizon moved while a client proved it; asked again");
                        }
                        AttachState::Prove {
                            witness: p.witness.iter().map(|o| o.0).collect(),
                            open_sample: p.open_sample.iter().map(|&(o, t)| (o.0, t.0)).collect(),
                        }
                    }
                };
                if !matches!(state, AttachState::Behind) {
                    conn.behind.retain(|d| d != &name);
                }
                let slot = db.cache().slot();
                ResponseBody::Attached {
                    state,
                    horizon: db.cache().horizon().map_or(0, |t| t.0),
                    slot: slot.index,
                    identity: slot.identity,
                }
            }
            RequestBody::Lookup { db, view, oids } => {
                if oids.len() > protocol::MAX_LOOKUP_OIDS {
                    // Refused before any answer is built: a miss costs 1
                    // byte in the request and 48 in the answer.
                    return Err(Refusal::TooManyOids {
                        asked: oids.len(),
                        max: protocol::MAX_LOOKUP_OIDS,
                    });
                }
                let db = self.database(&db)?;
                // The answer stays within half a frame: past that, further
                // oids answer as misses (always safe) rather than let one
                // request make the sidecar build an answer of any size.
                let mut budget = self.config.max_frame / 2;
                let results = oids
                    .into_iter()
                    .map(|oid| {
                        let hit = db.lookup(Oid(oid), Tid(view))?;
                        budget = budget.checked_sub(hit.state.len() + 32)?;
                        Some(Found {
                            serial: hit.serial,
                            end: hit.end,
                            state: hit.state,
                        })
                    })
                    .collect();
                ResponseBody::Found { results }
            }
            RequestBody::Store {
                db,
                revisions,
                identity,
            } => {
                let db = self.database(&db)?;
                let _gate = self.unflushed(&db, identity)?;
                let (mut kept, mut refused) = (0, 0);
                for r in revisions {
                    let out = db.store(Oid(r.oid), Tid(r.serial), r.end.map(Tid), Tid(r.view), r.state);
                    match out? {
                        StoreOutcome::Refused(_) => refused += 1,
                        _ => kept += 1,
                    }
                }
                ResponseBody::Stored { kept, refused }
            }
            RequestBody::Report {
                db: name,
                from,
                to,
                changes,
                identity,
            } => self.report(&name, identity, "report", from, to, changes, |db, from, to, changes| {
                db.report(from, to, changes)
            })?,
            RequestBody::CollapsedReport {
                db: name,
                from,
                to,
                changes,
                identity,
            } => self.report(
                &name,
                identity,
                "collapsed report",
                from,
                to,
                changes,
                |db, from, to, changes| db.report_collapsed(from, to, changes),
            )?,
            RequestBody::Resync {
                db: name,
                tid,
                identity,
            } => {
                not_in_the_future("resync", tid)?;
                let db = self.database(&name)?;
                let _gate = self.unflushed(&db, identity)?;
                self.mark_attached(conn, &name);
                let restarted = db.resync(Tid(tid));
                if let Some(e) = self.databases.read().unwrap_or_else(|p| p.into_inner()).get(&name) {
                    e.resyncs.fetch_add(1, Ordering::Relaxed);
                }
                if restarted {
                    tracing::info!(db = %name, tid = %Tid(tid), "log restarted; open revisions dropped");
                }
                let slot = db.cache().slot();
                ResponseBody::Resynced {
                    restarted,
                    horizon: db.cache().horizon().map_or(0, |t| t.0),
                    slot: slot.index,
                    identity: slot.identity,
                }
            }
            RequestBody::RegisterView { db: name, tid } => {
                let db = self.database(&name)?;
                let view = db.register_view(Tid(tid));
                conn.views.push((name, view));
                ResponseBody::ViewRegistered { view: view.0 }
            }
            RequestBody::AdvanceView { db: name, view, tid } => {
                conn.owns(&name, view)?;
                if let Err(e) = self.database(&name)?.advance_view(ViewId(view), Tid(tid)) {
                    // Detached by the log limit: no longer this connection's.
                    conn.views.retain(|(d, v)| !(d == &name && v.0 == view));
                    return Err(e.into());
                }
                ResponseBody::Done
            }
            RequestBody::ReleaseView { db: name, view } => {
                conn.owns(&name, view)?;
                conn.views.retain(|(d, v)| !(d == &name && v.0 == view));
                self.database(&name)?.release_view(ViewId(view))?;
                ResponseBody::Done
            }
            RequestBody::Flush { db: name } => {
                let db = self.database(&name)?;
                let _gate = self.flush_gate.write().unwrap_or_else(|p| p.into_inner());
                db.flush();
                tracing::info!(db = %name, "database flushed on request");
                ResponseBody::Done
            }
            RequestBody::Stats => ResponseBody::Stats(self.stats()),
            RequestBody::Touch {
                db,
                revisions,
                identity,
                hits,
                misses,
            } => {
                let name = db;
                let db = self.database(&name)?;
                if hits | misses != 0 {
                    // Counted whatever the identity says: the lookups were
                    // made (a stale client's missed in the arena anyway).
                    if let Some(e) = self.databases.read().unwrap_or_else(|p| p.into_inner()).get(&name) {
                        e.hits.fetch_add(hits, Ordering::Relaxed);
                        e.misses.fetch_add(misses, Ordering::Relaxed);
                    }
                }
                let _gate = self.unflushed(&db, identity)?;
                db.cache().touch(&revisions);
                if let Some(e) = self.databases.read().unwrap_or_else(|p| p.into_inner()).get(&name) {
                    e.hit_hints.fetch_add(revisions.len() as u64, Ordering::Relaxed);
                }
                ResponseBody::Done
            }
        })
    }

    /// Checks that a request carrying `identity` (the slot identity its
    /// client attached to) is for the database's current history: a flush
    /// gives the slot a new identity, and the processes still on the
    /// flushed one (a restored backup's other workers) must prove the new
    /// history before they store, report, resync or touch (invariant 7).
    /// The returned guard keeps a flush from coming between this check and
    /// the request's write.
    ///
    /// # Errors
    /// [`Refusal::Stale`].
    /// Applies a report (exact or collapsed, by `apply`) of database
    /// `name` from a client joined with `identity`; answers `Reported`.
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        name: &str,
        identity: Option<u64>,
        what: &'static str,
        from: u64,
        to: u64,
        changes: Vec<(u64, u64)>,
        apply: impl FnOnce(&Db, Tid, Tid, &[(Oid, Tid)]) -> Result<Tid, tidecache_core::CoreError>,
    ) -> Result<ResponseBody, Refusal> {
        not_in_the_future(what, to)?;
        let db = self.database(name)?;
        let _gate = self.unflushed(&db, identity)?;
        let changes: Vec<(Oid, Tid)> = changes.into_iter().map(|(o, t)| (Oid(o), Tid(t))).collect();
        match apply(&db, Tid(from), Tid(to), &changes) {
            Ok(h) => Ok(ResponseBody::Reported { horizon: h.0 }),
            Err(e) => {
                tracing::info!(db = %name, error = %e, "{what} refused");
                Err(e.into())
            }
        }
    }

    fn unflushed(&self, db: &Db, identity: Option<u64>) -> Result<std::sync::RwLockReadGuard<'_, ()>, Refusal> {
        let gate = self.flush_gate.read().unwrap_or_else(|p| p.into_inner());
        match identity {
            Some(id) if id != db.cache().slot().identity => Err(Refusal::Stale),
            _ => Ok(gate),
        }
    }

    /// [`Server::stats`] with what only the sidecar knows (resyncs and hit
    /// hints per database), taken now: what `--metrics-listen` serves. Takes the
    /// database map's lock for reading twice, for a copy, and the arena
    /// writer's lock once per database and once for the arena, each for
    /// a copy of counters.
    pub fn readout(&self) -> crate::metrics::Readout {
        let stats = self.stats();
        let inside = self
            .databases
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, e)| {
                let counters = crate::metrics::Inside {
                    resyncs: e.resyncs.load(Ordering::Relaxed),
                    hit_hints: e.hit_hints.load(Ordering::Relaxed),
                };
                (k.clone(), counters)
            })
            .collect();
        crate::metrics::Readout::new(stats, Some(inside))
    }

    /// Counters of the sidecar and every database.
    pub fn stats(&self) -> ServerStats {
        let mut out = ServerStats {
            server: format!("tidecached {}", env!("CARGO_PKG_VERSION")),
            uptime_s: self.started.elapsed().as_secs(),
            clients: self.clients.load(Ordering::Relaxed),
            capacity_bytes: self.config.memory_bytes,
            arena: self.arena_stats(),
            ..ServerStats::default()
        };
        let databases: Vec<(String, Db, u64, u64)> = {
            let dbs = self.databases.read().unwrap_or_else(|p| p.into_inner());
            dbs.iter()
                .map(|(k, e)| {
                    let (hits, misses) = (e.hits.load(Ordering::Relaxed), e.misses.load(Ordering::Relaxed));
                    (k.clone(), e.db.clone(), hits, misses)
                })
                .collect()
        };
        for (name, db, hits, misses) in databases {
            let s = db.stats();
            let c = s.cache;
            let w = WireStats {
                entries: c.entries,
                bytes: c.bytes,
                hits,
                misses,
                stores: c.stores,
                refused: c.refused,
                invalidations: c.invalidations,
                reclaimed: c.reclaimed,
                evicted: c.evicted,
                views: s.views,
                horizon: s.horizon.map(|t| t.0),
                low_water_mark: s.low_water_mark.map(|t| t.0),
                log_start: s.log_start.map(|t| t.0),
                log_len: s.log_len,
                detached: s.detached,
                socket_hits: c.hits,
                socket_misses: c.misses,
            };
            out.total.add(&w);
            out.databases.insert(name, w);
        }
        out
    }
}

impl Server {
    /// Where clients find the arena (the Hello answer).
    pub fn arena_info(&self) -> &ArenaInfo {
        &self.arena_info
    }

    /// Answers a `Hello`: the frame carries the arena's read-only
    /// descriptor on its first byte (`SCM_RIGHTS`, see
    /// [`tidecache_protocol::handoff`]), or none if the sidecar could not
    /// open one at start (then clients map `arena.path`).
    fn reply_hello(&self, stream: &UnixStream, version: u32, id: u64, body: ResponseBody) -> io::Result<()> {
        let Some(fd) = &self.arena_fd else {
            return reply(&mut &*stream, version, id, body);
        };
        let bytes = protocol::previous::encode_response(&Response { id, body }, version)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        protocol::handoff::write_frame_with_fd(stream, &bytes, std::os::fd::AsFd::as_fd(fd))
    }

    fn arena_stats(&self) -> WireArenaStats {
        let a = self.arena.stats();
        WireArenaStats {
            path: self.arena_info.path.clone(),
            file_bytes: a.file_bytes,
            entries: a.entries,
            state_bytes: a.state_bytes,
            record_bytes: a.record_bytes,
            small_segments: a.small_segments,
            main_segments: a.main_segments,
            free_segments: a.free_segments,
            inserted: a.inserted,
            evicted: a.evicted,
            promoted: a.promoted,
            reinserted: a.reinserted,
            ghost_hits: a.ghost_hits,
            removed: a.removed,
            unverified_segments: a.unverified_segments,
            discarded: a.discarded,
        }
    }
}

/// Opens the arena: re-attaches a sound file of the configured size, else
/// discards it (logging why) and creates a new one. `existing` is what
/// [`startup::existing_arena`] found there: anything but an arena or an
/// empty file was refused before.
/// Also says whether this run created the file (`false`: re-attached).
fn open_arena(
    config: &ServerConfig,
    geometry: Geometry,
    existing: Existing,
) -> Result<(Arc<SharedArena>, bool), SidecarError> {
    let path = &config.cache_file;
    let incarnation = fastrand::u64(1..);
    let mut discarded = None;
    if let Existing::Arena { version, .. } = existing {
        if version.is_none() {
            tracing::warn!(cache_file = %path.display(), reason = "shorter than an arena header",
                "discarding the arena file; starting empty");
        }
        if let Some(found) = version.filter(|&v| v != layout::LAYOUT_VERSION) {
            // Never mapped, never written (its words may mean other things
            // in its layout), never truncated (workers of the version that
            // wrote it may still map it): the new file is renamed over its
            // path, which unlinks it; its pages go back once the last
            // mapping of it is gone.
            tracing::warn!(
                cache_file = %path.display(), found, writes = layout::LAYOUT_VERSION,
                "arena {} has format version {found}, this tidecached writes {}: starting cold, \
                 the old file is replaced (unlinked, never truncated; workers that still map it \
                 let go of it when they reconnect or restart)",
                path.display(),
                layout::LAYOUT_VERSION
            );
        }
    }
    if let Existing::Arena {
        version: Some(layout::LAYOUT_VERSION),
        ..
    } = existing
    {
        let started = Instant::now();
        let reopened = Memory::open_file(path, config.group)
            .map_err(|e| e.to_string())
            .and_then(|m| {
                let m = Arc::new(m);
                match Geometry::read(m.words(), m.len_bytes()) {
                    Ok(g) if g != geometry => Err(format!(
                        "it is {} MiB for {} databases, this run asks for {} MiB for {}",
                        g.file_bytes >> 20,
                        g.db_slots,
                        geometry.file_bytes >> 20,
                        geometry.db_slots
                    )),
                    Ok(_) => ArenaWriter::recover(m, incarnation).map_err(|e: LayoutError| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            });
        match reopened {
            Ok((writer, found)) if found.rebooted => {
                tracing::warn!(
                    cache_file = %path.display(), databases = found.databases,
                    damaged_databases = found.damaged_databases, segments = found.segments,
                    kept = writer.stats().entries, dropped = found.discarded,
                    ms = started.elapsed().as_millis() as u64,
                    "re-attached an arena file last served before a reboot: its pages may be torn, so \
                     open revisions and horizons were dropped and only closed revisions whose CRC \
                     verifies were kept; each database's log restarts when its first client attaches"
                );
                return Ok((SharedArena::new(writer), false));
            }
            Ok((writer, found)) => {
                tracing::info!(
                    cache_file = %path.display(), databases = found.databases,
                    damaged_databases = found.damaged_databases, segments = found.segments,
                    ms = started.elapsed().as_millis() as u64,
                    "re-attached the arena file left by the previous run; verifying its records in the background"
                );
                return Ok((SharedArena::new(writer), false));
            }
            Err(reason) => {
                tracing::warn!(cache_file = %path.display(), %reason, "discarding the arena file; starting empty");
                // Opened before the new file replaces it: retired once the
                // new one exists, so a failed creation leaves it as it was.
                discarded = std::fs::OpenOptions::new().write(true).open(path).ok();
            }
        }
    }
    let memory = Memory::create_file(path, geometry.file_bytes, config.group).map_err(|e| {
        if e.kind() == io::ErrorKind::StorageFull {
            startup::no_room(path, geometry.file_bytes)
        } else {
            SidecarError::Io {
                context: format!("creating the arena file {}", path.display()),
                source: e,
            }
        }
    })?;
    if let Some(old) = discarded {
        retire(&old);
    }
    let writer = ArenaWriter::create(Arc::new(memory), geometry, incarnation);
    // The header on the disk before anything else: a power loss right
    // after this start cannot leave a file without its magic word (which
    // the next start would refuse to replace).
    if let Err(e) = writer.memory().persist(layout::HEADER_WORDS * 8) {
        tracing::warn!(cache_file = %path.display(), error = %e, "cannot write the arena header to the disk");
    }
    Ok((SharedArena::new(writer), true))
}

/// Opens the arena file at `path` read-only (`O_RDONLY`, close-on-exec),
/// the descriptor handed to clients, and checks that it is the file this
/// run serves (its header holds `incarnation`). `None`, logged, if not:
/// clients then map the path.
fn read_only_arena(path: &std::path::Path, incarnation: u64) -> Option<std::fs::File> {
    use std::os::unix::fs::FileExt;
    let checked = std::fs::File::open(path).and_then(|file| {
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, layout::header::INCARNATION as u64 * 8)?;
        if u64::from_ne_bytes(word) == incarnation {
            Ok(file)
        } else {
            Err(io::Error::other("another file is at the path now"))
        }
    });
    match checked {
        Ok(file) => Some(file),
        Err(e) => {
            tracing::warn!(
                cache_file = %path.display(), error = %e,
                "cannot open the arena file read-only to hand it to clients; they map its path instead"
            );
            None
        }
    }
}

/// Removes the arena file this run created at `path` and its lock file,
/// while `lock` is still held (a start waiting on the lock file finds it
/// gone and takes a new one: see [`ArenaLock::take`]). Errors are logged:
/// the start is failing already.
fn remove_new_arena(path: &std::path::Path, lock: &ArenaLock) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(cache_file = %path.display(), "start failed: removed the arena file it created"),
        Err(e) => {
            tracing::warn!(cache_file = %path.display(), error = %e, "start failed: cannot remove the arena file it created")
        }
    }
    lock.remove_lock_file();
}

/// Clears the LIVE word of a discarded arena file (replaced by a new one
/// at its path), so processes that still map it stop reading it (their
/// lookups miss).
pub(crate) fn retire(old: &std::fs::File) {
    use std::os::unix::fs::FileExt;
    let offset = layout::header::LIVE as u64 * 8;
    if old.metadata().map(|m| m.len() >= offset + 8).unwrap_or(false) {
        let _ = old.write_all_at(&0u64.to_ne_bytes(), offset);
    }
}

struct Conn {
    views: Vec<(String, ViewId)>,
    /// Databases this connection attached to (Attach or Resync).
    attached: Vec<String>,
    /// Databases whose last attach on this connection was answered
    /// `Behind` (logged once, not at every retry).
    behind: Vec<String>,
    hello: Option<String>,
    /// The protocol version the client said in Hello ([`PROTOCOL_VERSION`]
    /// until then): its answers are encoded for it.
    version: u32,
}

impl Conn {
    fn owns(&self, db: &str, view: u64) -> Result<(), Refusal> {
        if self.views.iter().any(|(d, v)| d == db && v.0 == view) {
            Ok(())
        } else {
            Err(Refusal::NotYourView {
                db: db.to_owned(),
                view,
            })
        }
    }
}

/// At most one log line per this long per refused protocol version.
const VERSION_REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// How far past the sidecar's wall clock a tid may lie: clocks of hosts
/// differ by seconds, not days.
const FUTURE_TID_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Refuses a tid more than [`FUTURE_TID_LIMIT`] past the wall clock
/// ([`ErrorCode::FutureTid`]): ZODB tids are UTC timestamps, and a report,
/// resync or attach at such a tid would raise the horizon of the database
/// for every other client, whose own commits could then never pass it.
fn not_in_the_future(what: &'static str, tid: u64) -> Result<(), Refusal> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let limit = tid_at((now + FUTURE_TID_LIMIT).as_secs());
    if tid <= limit {
        return Ok(());
    }
    tracing::warn!(what, tid = %Tid(tid), "refused a tid more than a day past this host's clock");
    Err(Refusal::FutureTid { what, tid, limit })
}

pub use crate::timestamp::tid_at;

/// Sends one answer, encoded for the connection's protocol `version`
/// (the client's, once it said Hello; see [`protocol::previous`]).
fn reply(stream: &mut &UnixStream, version: u32, id: u64, body: ResponseBody) -> io::Result<()> {
    let bytes = protocol::previous::encode_response(&Response { id, body }, version)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    protocol::write_frame(stream, &bytes)?;
    stream.flush()
}
