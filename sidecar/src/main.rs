//! `tidecached`: the tidecache sidecar. See `tidecached --help`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidecache_client::{Client, ClientConfig};
use tidecache_sidecar::clean::{clean, real_file, Cleaned};
use tidecache_sidecar::metrics::{self, Format, Readout};
use tidecache_sidecar::scrape::MetricsEndpoint;
use tidecache_sidecar::{readiness, Server, ServerConfig};

/// tidecached: one per host beside the ZODB or RelStorage app servers. It
/// holds every object revision once for all worker processes and tracks each
/// connection's MVCC view, so a hit is always the state the connection's
/// snapshot must see.
///
/// Its version (--version) is the workspace's, the same as `stats` reports
/// and as the Python adapter's `tidecache.__version__`.
#[derive(Parser)]
#[command(name = "tidecached", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve in the foreground, logging to stderr (RUST_LOG or --log-level).
    ///
    /// Under a service manager (systemd Type=notify: $NOTIFY_SOCKET) it sends
    /// READY=1 and a STATUS line once the socket accepts connections, and
    /// STOPPING=1 on SIGTERM or SIGINT, which remove the socket and exit 0
    /// (the arena file stays, for a warm restart). A start that fails
    /// changes nothing: it removes an arena file it created.
    Serve {
        /// Path of the Unix socket to create (mode 0600; 0660 with --group),
        /// in an existing directory. Whoever can connect to it can store
        /// states that every worker is served, and flush any database: give
        /// it to the app servers' user only (docs/operations.md, Security
        /// model). A stale socket file is replaced; a live one (another
        /// tidecached) or any other kind of file is an error, and nothing is
        /// changed.
        #[arg(long)]
        socket: PathBuf,
        /// Size of the arena file, MiB, all databases together: states plus
        /// 40 bytes and padding to 8 bytes per revision, the bucket array
        /// (1/256 to 1/128 of it) and the database table; the file is exactly
        /// this size. Between 1 and 32768. Sizing: docs/operations.md. Allocated at start: if the
        /// mount of the arena file (/dev/shm: 64 MiB in a default Docker
        /// container) has less free, the start fails with an error naming
        /// both and leaves no file.
        #[arg(long, default_value_t = 256)]
        memory_mb: u64,
        /// Arena file. Default: /dev/shm/tidecache-<uid>-<hash of the socket
        /// path>.arena (memory that outlives the process, not a reboot). A
        /// sound arena file of the same size is re-attached at start (warm
        /// restart); a damaged one, or one of another size or layout
        /// version, is replaced by a new one; a file that is not an arena
        /// (no magic word) is refused and never touched. A file on a real
        /// disk also survives a reboot, but possibly torn by a power loss:
        /// then only its closed revisions whose checksum verifies are kept.
        /// <cache-file>.lock (of the file's real path) and the file itself
        /// are locked while the sidecar runs: a second one on the same file,
        /// under any name, exits with an error naming the first.
        #[arg(long)]
        cache_file: Option<PathBuf>,
        /// Group whose members may use the socket (mode 0660) and map the
        /// arena read-only (0640: they cannot write it). Default: the owner
        /// only (0600 both). The sidecar must be root or a member of it;
        /// checked before any file changes.
        #[arg(long)]
        group: Option<String>,
        /// Largest request accepted, MiB (1 to 4096); a larger frame gets an
        /// error and its connection is closed.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
        max_frame_mb: u64,
        /// Most databases served at once (each has a slot in the arena; at
        /// most 255).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=255))]
        max_databases: u64,
        /// How often revisions no registered view can see are reclaimed, ms.
        #[arg(long, default_value_t = 1000)]
        reclaim_interval_ms: u64,
        /// Most changes one database's invalidation log may hold. Past it the
        /// oldest registered views (connections left open too long) are
        /// detached: their stores are refused, their lookups stay correct.
        #[arg(long, default_value_t = 1_000_000)]
        max_log_changes: usize,
        /// Log level when RUST_LOG is not set (error, warn, info, debug, trace).
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Serve Prometheus metrics over HTTP at ADDR: GET or HEAD /metrics,
        /// any other path 404. No authentication. Off by default. ADDR is host:port (127.0.0.1:9187,
        /// [::1]:9187; 0.0.0.0:9187 for every interface) or a port alone,
        /// which listens on the loopback interface only. Bound before the
        /// arena is touched: a bad or busy address fails the start with
        /// nothing changed.
        #[arg(long, value_name = "ADDR")]
        metrics_listen: Option<String>,
    },
    /// Print the counters of a running tidecached (json, text or prometheus).
    ///
    /// json (the default): one JSON object on one line, the sidecar's Stats
    /// answer plus its version (as --version prints it), hit_ratio per
    /// database and in total, and, per database, horizon_time (ISO 8601
    /// UTC) and horizon_lag_s. text: for a person, tids also as ISO times,
    /// the horizon's lag in seconds, hit ratios. prometheus: what
    /// --metrics-listen serves, less tidecache_resyncs_total and
    /// tidecache_hit_hints_total (known inside the sidecar only). clients
    /// does not count this command's own connection. hits and misses are
    /// host-wide: every worker process counts its lookups (hits from the
    /// arena or over the socket, misses that went to its storage) and sends
    /// them with its hit hints, within a second and when it closes;
    /// socket_hits and socket_misses count the lookups the sidecar answered
    /// over its socket.
    Stats {
        /// Path of the running sidecar's socket.
        #[arg(long)]
        socket: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Health check: print one line, exit 0 if the sidecar answers, else 1.
    ///
    /// Connects, asks for the counters and prints `ok: N databases, M
    /// clients, arena X% full` (exit 0) or `error: ...` (exit 1: no socket,
    /// not a socket, nobody answering, no answer in time). M does not count
    /// the check's own connection; X is the arena's bytes in records over
    /// its size. For Docker's HEALTHCHECK, Kubernetes exec probes, a
    /// systemd timer or a monitoring agent. It never changes anything.
    Check {
        /// Path of the sidecar's socket.
        #[arg(long)]
        socket: PathBuf,
        /// How long to wait for the connection and the answer, ms.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Remove an arena file no sidecar uses, and its <cache-file>.lock.
    ///
    /// The unfinished <cache-file>.new-<pid> files of starts killed while
    /// allocating the arena go too (a start removes them as well).
    ///
    /// A symlink is resolved: its target is removed (the link is left).
    /// The file is unlinked, never truncated: workers that still map it keep
    /// valid pages, and the memory is freed when the last one unmaps it
    /// (restart them). Refused, changing nothing (exit 1), if a sidecar
    /// holds the file's lock (it is running: stop it first) or if the file
    /// does not start with the arena's magic word (not an arena, or empty).
    /// No file there: nothing to do, exit 0.
    Clean {
        /// The arena file (what `serve --cache-file` was given).
        #[arg(long, required_unless_present = "socket", conflicts_with = "socket")]
        cache_file: Option<PathBuf>,
        /// Instead of --cache-file: the --socket of a sidecar that ran
        /// without --cache-file, whose default arena file is removed
        /// (/dev/shm/tidecache-<uid>-<hash of the socket path>.arena).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Say what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve {
            socket,
            memory_mb,
            cache_file,
            group,
            max_frame_mb,
            max_databases,
            reclaim_interval_ms,
            max_log_changes,
            log_level,
            metrics_listen,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_level));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .init();
            // Test hook (sidecar/tests/crash_points.rs): kill this process
            // at a named step of the arena writer. Never set in production.
            if let Ok(spec) = std::env::var("TIDECACHED_CRASH_AT") {
                if let Err(e) = tidecache_core::crash::arm(&spec) {
                    eprintln!("tidecached: TIDECACHED_CRASH_AT: {e}");
                    return ExitCode::FAILURE;
                }
                tracing::warn!(%spec, "crash point armed by TIDECACHED_CRASH_AT: this process kills itself there");
            }
            let group = match group.as_deref().map(group_id).transpose() {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("tidecached: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Bound first: a bad address changes nothing.
            let endpoint = match metrics_listen.as_deref().map(MetricsEndpoint::bind).transpose() {
                Ok(e) => e,
                Err(e) => {
                    eprintln!("tidecached: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Checked here, in the option's own unit: the arena's layout
            // names bytes, and a huge value would overflow them.
            if !(1..=MAX_MEMORY_MB).contains(&memory_mb) {
                eprintln!(
                    "tidecached: --memory-mb (the arena's size) must be between 1 and {MAX_MEMORY_MB} MiB, got {memory_mb}"
                );
                return ExitCode::FAILURE;
            }
            let cache_file = cache_file.unwrap_or_else(|| default_cache_file(&socket));
            let server = Server::new(ServerConfig {
                socket: socket.clone(),
                memory_bytes: memory_mb << 20,
                cache_file,
                group,
                max_frame: (max_frame_mb << 20) as usize,
                max_databases: max_databases as usize,
                reclaim_interval: Duration::from_millis(reclaim_interval_ms.max(1)),
                max_log_changes,
            });
            let server = match server {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("tidecached: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut status = format!(
                "serving {}, arena {} ({} MiB)",
                socket.display(),
                server.arena_info().path,
                memory_mb
            );
            if let Some(endpoint) = endpoint {
                let addr = endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let me = server.clone();
                if let Err(e) = endpoint.spawn(move || me.readout()) {
                    eprintln!("tidecached: cannot start the metrics thread: {e}");
                    server.discard();
                    return ExitCode::FAILURE;
                }
                tracing::info!(address = %addr, "metrics served at http://{addr}/metrics");
                status.push_str(&format!(", metrics at http://{addr}/metrics"));
            }
            let listener = match server.bind() {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("tidecached: {e}");
                    server.discard();
                    return ExitCode::FAILURE;
                }
            };
            // The socket file this run made: on a signal, only that one is
            // removed (not a later sidecar's, made after this one's was
            // removed by hand).
            let bound = std::fs::symlink_metadata(&socket).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
            if let Err(e) = remove_socket_on_signal(socket.clone(), bound) {
                eprintln!("tidecached: cannot install signal handlers: {e}");
                let _ = std::fs::remove_file(&socket);
                server.discard();
                return ExitCode::FAILURE;
            }
            // The socket listens: connections queue from here on.
            readiness::ready(&status);
            server.serve(listener);
            ExitCode::SUCCESS
        }
        Command::Stats { socket, format } => match ask_stats(&socket, Duration::from_secs(5)) {
            Ok(readout) => {
                print!("{}", readout.render(format));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tidecached stats: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Check { socket, timeout_ms } => match ask_stats(&socket, Duration::from_millis(timeout_ms.max(1))) {
            Ok(r) => {
                println!(
                    "ok: {} databases, {} clients, arena {:.1}% full",
                    r.stats.databases.len(),
                    r.stats.clients,
                    metrics::arena_fill(&r.stats)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Clean {
            cache_file,
            socket,
            dry_run,
        } => {
            let Some(path) = cache_file.or_else(|| socket.as_deref().map(default_cache_file)) else {
                eprintln!("tidecached clean: give --cache-file or --socket");
                return ExitCode::FAILURE;
            };
            // A symlink's target is what is removed, and what is named.
            let path = real_file(&path);
            match clean(&path, dry_run) {
                Ok(Cleaned::Nothing) => {
                    println!("no file at {}: nothing to remove", path.display());
                    ExitCode::SUCCESS
                }
                Ok(Cleaned::WouldRemove { bytes }) => {
                    println!(
                        "would remove {} ({} MiB) and its .lock file; no sidecar uses it",
                        path.display(),
                        bytes >> 20
                    );
                    ExitCode::SUCCESS
                }
                Ok(Cleaned::Removed { bytes }) => {
                    println!("removed {} ({} MiB) and its .lock file", path.display(), bytes >> 20);
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tidecached clean: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Largest `--memory-mb`: the arena's layout holds up to 32 GiB.
const MAX_MEMORY_MB: u64 = 32 << 10;

/// Why `stats` or `check` got no counters.
#[derive(Debug, thiserror::Error)]
enum AskError {
    /// Nothing at the socket's path.
    #[error("no socket at {0} (is tidecached running, and is --socket its path?)")]
    NoSocket(PathBuf),
    /// Something else than a socket at the path.
    #[error("{0} is not a socket (is --socket the path tidecached serve was given?)")]
    NotASocket(PathBuf),
    /// The sidecar is unavailable or refused.
    #[error("{0}")]
    Client(#[from] tidecache_client::ClientError),
}

/// The counters of the sidecar at `socket`, `clients` less this
/// connection.
fn ask_stats(socket: &std::path::Path, timeout: Duration) -> Result<Readout, AskError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(socket) {
        Err(_) => return Err(AskError::NoSocket(socket.to_path_buf())),
        Ok(m) if !m.file_type().is_socket() => return Err(AskError::NotASocket(socket.to_path_buf())),
        Ok(_) => {}
    }
    let mut config = ClientConfig::new(socket);
    config.timeout = timeout;
    config.name = format!("tidecached stats pid {}", std::process::id());
    let mut stats = Client::new(config).stats()?;
    stats.clients = stats.clients.saturating_sub(1);
    Ok(Readout::new(stats, None))
}

/// On SIGTERM or SIGINT: STOPPING=1 to a service manager, log, remove the
/// socket file if it is still the one this run bound (`bound`: its device
/// and inode), exit 0 (the arena file stays, for a warm restart).
fn remove_socket_on_signal(socket: PathBuf, bound: Option<(u64, u64)>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            readiness::stopping();
            let now = std::fs::symlink_metadata(&socket).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.dev(), m.ino())
            });
            if now.is_some() && now == bound {
                tracing::info!(signal = sig, "stopping; removing the socket file");
                let _ = std::fs::remove_file(&socket);
            } else {
                tracing::info!(
                    signal = sig,
                    "stopping; the socket file is no longer this sidecar's: left as it is"
                );
            }
            std::process::exit(0);
        }
    })?;
    Ok(())
}

/// `/dev/shm/tidecache-<uid>-<CRC-32 of the socket path>.arena`, or the
/// socket's path plus `.arena` where there is no /dev/shm.
fn default_cache_file(socket: &std::path::Path) -> PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        let mut p = socket.as_os_str().to_owned();
        p.push(".arena");
        return PathBuf::from(p);
    }
    let absolute = std::path::absolute(socket).unwrap_or_else(|_| socket.to_path_buf());
    let hash = crc32fast::hash(absolute.as_os_str().as_encoded_bytes());
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    shm.join(format!("tidecache-{uid}-{hash:08x}.arena"))
}

/// Why `--group` names no group.
#[derive(Debug, thiserror::Error)]
enum GroupError {
    /// The name holds a NUL byte.
    #[error("bad group name {0:?}")]
    BadName(String),
    /// No group of that name in the group database.
    #[error("no group named {0:?}")]
    Unknown(String),
}

/// The id of group `name` (or a number).
fn group_id(name: &str) -> Result<u32, GroupError> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c = std::ffi::CString::new(name).map_err(|_| GroupError::BadName(name.to_owned()))?;
    // SAFETY: getgrnam reads a NUL-terminated string and returns a pointer
    // to static storage or null; it is read at once, on this thread only.
    let entry = unsafe { libc::getgrnam(c.as_ptr()) };
    if entry.is_null() {
        return Err(GroupError::Unknown(name.to_owned()));
    }
    // SAFETY: non-null, as checked.
    Ok(unsafe { (*entry).gr_gid })
}
