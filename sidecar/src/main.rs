//! `tidecached`: the tidecache sidecar. See `tidecached --help`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tidecache_client::{Client, ClientConfig};
use tidecache_sidecar::{Server, ServerConfig};

/// tidecached: one per host beside the ZODB or RelStorage app servers. It
/// holds every object revision once for all worker processes and tracks each
/// connection's MVCC view, so a hit is always the state the connection's
/// snapshot must see.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve in the foreground, logging to stderr (RUST_LOG or --log-level).
    Serve {
        /// Path of the Unix socket to create (mode 0600), in an existing
        /// directory. A stale socket file is replaced; a live one (another
        /// tidecached) or any other kind of file is an error, and nothing is
        /// changed.
        #[arg(long)]
        socket: PathBuf,
        /// Size of the arena, MiB, all databases together: states plus 40
        /// bytes per revision, the bucket array (1/256 to 1/128 of it) and the
        /// database table. Between 1 and 32768. Allocated at start: if the
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
        /// arena (0640). Default: the owner only (0600 both). The sidecar
        /// must be root or a member of it; checked before any file changes.
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
    },
    /// Print the counters of a running tidecached as one JSON object.
    Stats {
        /// Path of the running sidecar's socket.
        #[arg(long)]
        socket: PathBuf,
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
            let listener = match server.bind() {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("tidecached: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Err(e) = remove_socket_on_signal(socket) {
                eprintln!("tidecached: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
            server.serve(listener);
            ExitCode::SUCCESS
        }
        Command::Stats { socket } => {
            let mut config = ClientConfig::new(&socket);
            config.timeout = Duration::from_secs(5);
            config.name = "tidecached stats".into();
            match Client::new(config).stats() {
                Ok(stats) => match serde_json::to_string(&stats) {
                    Ok(json) => {
                        println!("{json}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("tidecached stats: {e}");
                        ExitCode::FAILURE
                    }
                },
                Err(e) => {
                    eprintln!("tidecached stats: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// On SIGTERM or SIGINT: log, remove the socket file, exit 0.
fn remove_socket_on_signal(socket: PathBuf) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "stopping; removing the socket file");
            let _ = std::fs::remove_file(&socket);
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
