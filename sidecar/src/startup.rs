//! What `tidecached serve` checks before it touches any file, and the lock
//! that makes one sidecar the only one using an arena file.
//!
//! A start that fails must change nothing: the arena file of a running
//! sidecar, or the warm file a stopped one left, outlives a mistyped
//! command line. So [`crate::Server::new`] runs, in order: these checks
//! (directories exist, `--group` can be applied, the socket is not live and
//! not something else, the file system has room for a new arena), then
//! [`ArenaLock::take`], then the arena, then the socket.

use crate::server::SidecarError;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use tidecache_core::arena::layout::MAGIC;

/// The directory `path` lives in must exist and be writable (the socket
/// and the arena file are made there).
///
/// # Errors
/// [`SidecarError::NoDirectory`], naming the option (`what`);
/// [`SidecarError::Io`] if it is not writable.
pub fn directory_exists(what: &'static str, path: &Path) -> Result<(), SidecarError> {
    let dir = parent(path);
    if !dir.is_dir() {
        return Err(SidecarError::NoDirectory {
            what,
            dir: dir.to_path_buf(),
        });
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(|_| {
        io_error(
            format!("{what}: bad path {}", path.display()),
            io::ErrorKind::InvalidInput.into(),
        )
    })?;
    // SAFETY: a NUL-terminated path; access only checks permissions.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
        return Err(io_error(
            format!(
                "the directory of {what}, {}, is not writable by this process",
                dir.display()
            ),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// This process may give files to group `gid` (`chown :gid`): it is root,
/// or the group is its effective group or one of its supplementary groups.
///
/// # Errors
/// [`SidecarError::Group`].
pub fn group_applicable(gid: u32) -> Result<(), SidecarError> {
    // SAFETY: geteuid and getegid cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid == 0 || egid == gid {
        return Ok(());
    }
    // SAFETY: with a size of 0, getgroups only returns the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let mut groups = vec![0 as libc::gid_t; n.max(0) as usize];
    // SAFETY: the buffer holds `n` entries.
    let n = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    if n >= 0 && groups[..n as usize].contains(&gid) {
        return Ok(());
    }
    Err(SidecarError::Group { gid, uid: euid })
}

/// The socket path is free for this sidecar: absent, or a socket nobody
/// answers on (a stale one, which [`crate::Server::bind`] replaces).
///
/// # Errors
/// [`SidecarError::NotASocket`], [`SidecarError::AlreadyRunning`].
pub fn socket_free(path: &Path) -> Result<(), SidecarError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(SidecarError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(SidecarError::AlreadyRunning(path.to_path_buf()));
        }
    }
    Ok(())
}

/// What lies at the arena file's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Nothing: a new arena is created.
    Nothing,
    /// An empty file (a start cut short between creating and sizing it):
    /// nothing to lose, replaced.
    Empty,
    /// A file that starts with the arena's magic word: re-attached if sound
    /// and of this format version, else replaced.
    Arena {
        /// Its length, bytes.
        bytes: u64,
        /// Its format (layout) version word, read without mapping it;
        /// `None` if the file is too short to hold one.
        version: Option<u64>,
    },
}

/// Looks at the file at `path` without changing it.
///
/// # Errors
/// [`SidecarError::NotAnArena`] for anything that is not proved to be an
/// arena by its first word (a database, a text file, a directory): it is
/// never replaced. [`SidecarError::Io`] if it cannot be read.
pub fn existing_arena(path: &Path) -> Result<Existing, SidecarError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(io_error(format!("reading {}", path.display()), e)),
    };
    let not_arena = |reason: &str| SidecarError::NotAnArena {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    if !meta.is_file() {
        return Err(not_arena("not a regular file"));
    }
    if meta.len() == 0 {
        return Ok(Existing::Empty);
    }
    let mut first = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut first))
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => not_arena("shorter than an arena header"),
            _ => io_error(format!("reading {}", path.display()), e),
        })?;
    if u64::from_ne_bytes(first) != MAGIC {
        return Err(not_arena("it does not start with the arena's magic word"));
    }
    Ok(Existing::Arena {
        bytes: meta.len(),
        version: format_version(path),
    })
}

/// The format (layout) version word of the arena file at `path`, read with
/// `pread`, without mapping the file (a file of another format version is
/// never mapped); `None` if it cannot be read.
fn format_version(path: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut word = [0u8; 8];
    let offset = tidecache_core::arena::layout::header::VERSION as u64 * 8;
    File::open(path).and_then(|f| f.read_exact_at(&mut word, offset)).ok()?;
    Some(u64::from_ne_bytes(word))
}

/// The arena file at `path`, about to be re-attached, is owned by this
/// process's effective user. A file another user owns is refused: its
/// owner could write it at any time, so whatever it put there (or put
/// later) would be served to every worker as cached state. In a shared
/// directory such as /dev/shm, where the default arena's name is
/// predictable, any local user could otherwise plant it before the
/// sidecar starts. Nothing at `path`: nothing to check.
///
/// # Errors
/// [`SidecarError::NotAnArena`] naming the owner, [`SidecarError::Io`].
pub fn owned_by_this_user(path: &Path) -> Result<(), SidecarError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(format!("reading {}", path.display()), e)),
    };
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() == euid {
        return Ok(());
    }
    Err(SidecarError::NotAnArena {
        path: path.to_path_buf(),
        reason: format!(
            "it is owned by uid {}, not by this sidecar's uid {euid}: its owner could write what \
             the sidecar would serve",
            meta.uid()
        ),
    })
}

/// The file system holding `path` has `bytes` bytes free for a new file.
///
/// # Errors
/// [`SidecarError::NoRoom`], naming the mount and what is free.
pub fn room_for(path: &Path, bytes: u64) -> Result<(), SidecarError> {
    let dir = parent(path);
    let free = free_bytes(dir).map_err(|e| io_error(format!("statvfs {}", dir.display()), e))?;
    if free >= bytes {
        Ok(())
    } else {
        Err(no_room(path, bytes))
    }
}

/// [`SidecarError::NoRoom`] for an arena of `bytes` bytes at `path`, with
/// what its file system has free now.
pub fn no_room(path: &Path, bytes: u64) -> SidecarError {
    let dir = parent(path);
    SidecarError::NoRoom {
        path: path.to_path_buf(),
        needed_mib: bytes.div_ceil(1 << 20),
        mount: mount_of(dir),
        free_mib: free_bytes(dir).map_or(0, |b| b >> 20),
    }
}

fn free_bytes(dir: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a zeroed statvfs is a valid value to be filled in.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(s.f_bavail as u64 * s.f_frsize as u64)
}

/// The mount point of the file system holding `dir`: its topmost ancestor
/// on the same device.
fn mount_of(dir: &Path) -> PathBuf {
    let Ok(dir) = dir.canonicalize() else {
        return dir.to_path_buf();
    };
    let Ok(dev) = std::fs::metadata(&dir).map(|m| m.dev()) else {
        return dir;
    };
    let mut mount = dir.as_path();
    while let Some(up) = mount.parent() {
        match std::fs::metadata(up) {
            Ok(m) if m.dev() == dev => mount = up,
            _ => break,
        }
    }
    mount.to_path_buf()
}

/// An exclusive `flock` on `<cache file>.lock`, held for the life of the
/// process (the kernel drops it when the process ends, `kill -9` too): no
/// two sidecars ever use one arena file. The file holds the holder's pid
/// and socket, for the error the next one reports. The lock file is named
/// after the arena file's real path (symlinks resolved: a symlink to the
/// file or to a directory on its path names the same lock), and the arena
/// file itself is `flock`ed too ([`ArenaLock::hold_arena`]), so a hard link
/// to it is refused as well.
#[derive(Debug)]
pub struct ArenaLock {
    _file: File,
    /// The lock file's path.
    path: PathBuf,
    arena: Option<File>,
}

/// `path` with its symlinks resolved: the file's real path if it exists,
/// else its directory's real path joined with its name; `path` itself if
/// neither resolves (the checks before report that).
fn real_path(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (std::fs::canonicalize(parent(path)), path.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => path.to_path_buf(),
    }
}

/// An exclusive non-blocking `flock` on the regular file at `path`, if
/// there is one: `Ok(None)` if there is none, `Ok(Some(None))` if another
/// process holds it.
fn flock_file(path: &Path) -> Result<Option<Option<File>>, SidecarError> {
    let file = match std::fs::File::open(path) {
        Ok(f) if f.metadata().map(|m| m.is_file()).unwrap_or(false) => f,
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(format!("opening {}", path.display()), e)),
    };
    // SAFETY: a valid open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_error(format!("locking {}", path.display()), e));
        }
        return Ok(Some(None));
    }
    Ok(Some(Some(file)))
}

impl ArenaLock {
    /// The lock file's path for an arena file.
    pub fn path_for(cache_file: &Path) -> PathBuf {
        let mut p = cache_file.as_os_str().to_owned();
        p.push(".lock");
        PathBuf::from(p)
    }

    /// Takes the lock (`LOCK_EX | LOCK_NB`), creating the lock file (mode
    /// 0600) if needed, and records this process in it.
    ///
    /// # Errors
    /// [`SidecarError::Locked`] if another process holds it,
    /// [`SidecarError::Io`] if the lock file cannot be opened.
    pub fn take(cache_file: &Path, socket: &Path) -> Result<Self, SidecarError> {
        Self::take_as(
            cache_file,
            &format!("pid {}, socket {}", std::process::id(), socket.display()),
        )
    }

    /// [`ArenaLock::take`] recording `holder` (`pid N, socket S` for a
    /// sidecar; `tidecached clean` says what it is doing) in the lock file.
    /// The lock file may be removed by the holder before it lets go
    /// ([`ArenaLock::remove_lock_file`]): a lock taken on a file that is no
    /// longer at the path is let go and taken again on the new one.
    ///
    /// # Errors
    /// As [`ArenaLock::take`].
    pub fn take_as(cache_file: &Path, holder: &str) -> Result<Self, SidecarError> {
        let path = Self::path_for(&real_path(cache_file));
        let mut attempts = 0;
        let file = loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io_error(format!("opening the lock file {}", path.display()), e))?;
            // SAFETY: a valid open descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(io_error(format!("locking {}", path.display()), e));
                }
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(SidecarError::Locked {
                    lock: path.clone(),
                    cache_file: cache_file.to_path_buf(),
                    holder: if holder.is_empty() {
                        "unknown".to_owned()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            // The previous holder may have removed the file between our
            // open and our lock: then this lock guards nothing.
            let same = match (file.metadata(), std::fs::metadata(&path)) {
                (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
                _ => false,
            };
            if same {
                break file;
            }
            attempts += 1;
            if attempts >= 10 {
                return Err(io_error(
                    format!("locking {}", path.display()),
                    io::Error::other("the lock file keeps being replaced"),
                ));
            }
        };
        // The arena file itself: another name of it (a hard link) has
        // another lock file, not another inode.
        let arena = match flock_file(cache_file)? {
            Some(None) => {
                // Refused: leave no lock file behind (held, so nobody
                // relies on it; one opened meanwhile is found replaced).
                let _ = std::fs::remove_file(&path);
                return Err(SidecarError::Locked {
                    lock: cache_file.to_path_buf(),
                    cache_file: cache_file.to_path_buf(),
                    holder: "a sidecar using this file under another name (a hard link)".to_owned(),
                });
            }
            Some(Some(f)) => Some(f),
            None => None,
        };
        let me = format!("{holder}\n");
        file.set_len(0)
            .and_then(|()| std::os::unix::fs::FileExt::write_all_at(&file, me.as_bytes(), 0))
            .map_err(|e| io_error(format!("writing the lock file {}", path.display()), e))?;
        Ok(ArenaLock {
            _file: file,
            path,
            arena,
        })
    }

    /// Whether a process holds the lock of the arena file at `cache_file`
    /// (its lock file or the file itself), changing nothing: the lock file
    /// is not created, and a lock it gets is let go at once. `Some(holder)`
    /// as the holder wrote it; `None` if free.
    ///
    /// # Errors
    /// [`SidecarError::Io`] if a file cannot be opened.
    pub fn holder(cache_file: &Path) -> Result<Option<String>, SidecarError> {
        let path = Self::path_for(&real_path(cache_file));
        if let Some(None) = flock_file(&path)? {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Ok(Some(if holder.is_empty() {
                "unknown".to_owned()
            } else {
                holder.to_owned()
            }));
        }
        if let Some(None) = flock_file(cache_file)? {
            return Ok(Some(
                "a sidecar using this file under another name (a hard link)".to_owned(),
            ));
        }
        Ok(None)
    }

    /// Removes the lock file while the lock is held (a failed start that
    /// removed its new arena, `tidecached clean`): nothing is left at the
    /// path. Errors are logged.
    pub fn remove_lock_file(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(lock = %self.path.display(), error = %e, "cannot remove the lock file");
            }
        }
    }

    /// Holds a `flock` on the arena file now at `cache_file` (a new one
    /// created under the lock, whose inode the lock taken at start did not
    /// cover): a later start on a hard link to it is refused.
    ///
    /// # Errors
    /// [`SidecarError::Locked`] if another process holds it (a file this
    /// run just made: not expected), [`SidecarError::Io`].
    pub fn hold_arena(&mut self, cache_file: &Path) -> Result<(), SidecarError> {
        if let (Some(held), Ok(now)) = (&self.arena, std::fs::metadata(cache_file)) {
            if held
                .metadata()
                .is_ok_and(|m| (m.dev(), m.ino()) == (now.dev(), now.ino()))
            {
                // Re-attached: the file locked at start.
                return Ok(());
            }
        }
        match flock_file(cache_file)? {
            Some(None) => Err(SidecarError::Locked {
                lock: cache_file.to_path_buf(),
                cache_file: cache_file.to_path_buf(),
                holder: "a sidecar using this file under another name (a hard link)".to_owned(),
            }),
            Some(Some(f)) => {
                self.arena = Some(f);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// Removes the `<cache-file>.new-<pid>` files of starts killed while they
/// were creating an arena (`Memory::create_file` makes the new arena under
/// that name and renames it over the cache file once allocated): a start
/// killed then (a service manager's start timeout, `kill`) leaves one,
/// empty or as large as the arena, that nothing else would ever remove.
/// Call with the arena's lock held ([`ArenaLock`]): such files are only
/// made under it, so every one found then is a dead start's. Returns how
/// many were removed; errors are logged.
pub fn remove_dead_starts_files(cache_file: &Path) -> usize {
    let (Some(name), dir) = (cache_file.file_name(), parent(cache_file)) else {
        return 0;
    };
    let mut prefix = name.to_owned();
    prefix.push(".new-");
    let prefix = prefix.as_encoded_bytes();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let bytes = file_name.as_encoded_bytes();
        let dead = bytes.len() > prefix.len()
            && bytes.starts_with(prefix)
            && bytes[prefix.len()..].iter().all(u8::is_ascii_digit)
            && entry.file_type().is_ok_and(|t| t.is_file());
        if !dead {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                removed += 1;
                tracing::info!(file = %entry.path().display(), "removed the unfinished arena file of a start that was killed");
            }
            Err(e) => {
                tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove the unfinished arena file of a killed start")
            }
        }
    }
    removed
}

fn io_error(context: String, source: io::Error) -> SidecarError {
    SidecarError::Io { context, source }
}
