//! `tidecached clean`: removes an arena file no sidecar uses.
//!
//! The file is unlinked, never truncated: worker processes that still map
//! it (a sidecar killed, its workers not yet restarted) keep reading valid
//! pages, and the memory is returned when the last of them unmaps it. A
//! truncated file would kill them with SIGBUS at their next read.

use crate::server::{retire, SidecarError};
use crate::startup::{self, ArenaLock, Existing};
use std::io;
use std::path::{Path, PathBuf};

/// Why `clean` removed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CleanError {
    /// A running sidecar holds the file's lock.
    #[error(
        "{cache_file} is in use by a running tidecached ({holder}); stop it first: \
         an arena in use is never removed"
    )]
    InUse {
        /// The arena file.
        cache_file: PathBuf,
        /// Pid and socket of the holder, as it wrote them in the lock file.
        holder: String,
    },
    /// The file does not start with the arena's magic word.
    #[error("{path} is not a tidecache arena file ({reason}); refusing to remove it")]
    NotAnArena {
        /// The file.
        path: PathBuf,
        /// Why it is not one.
        reason: String,
    },
    /// An I/O operation failed; `context` says which.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// What `clean` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleaned {
    /// No file at the path: nothing to do.
    Nothing,
    /// The arena file (of this many bytes) and its lock file were removed.
    Removed {
        /// The file's length.
        bytes: u64,
    },
    /// `--dry-run`: the arena file (of this many bytes) would be removed.
    WouldRemove {
        /// The file's length.
        bytes: u64,
    },
}

impl From<SidecarError> for CleanError {
    fn from(e: SidecarError) -> Self {
        match e {
            SidecarError::NotAnArena { path, reason } => CleanError::NotAnArena { path, reason },
            SidecarError::Locked { cache_file, holder, .. } => CleanError::InUse { cache_file, holder },
            SidecarError::Io { context, source } => CleanError::Io { context, source },
            other => CleanError::Io {
                context: "checking the arena file".into(),
                source: io::Error::other(other.to_string()),
            },
        }
    }
}

fn arena_bytes(path: &Path) -> Result<Option<u64>, CleanError> {
    match startup::existing_arena(path)? {
        Existing::Nothing => Ok(None),
        Existing::Empty => Err(CleanError::NotAnArena {
            path: path.to_path_buf(),
            reason: "it is empty: no magic word".into(),
        }),
        Existing::Arena { bytes, .. } => Ok(Some(bytes)),
    }
}

/// The file `clean` works on for `cache_file`: its real path, symlinks
/// resolved (a symlink to an arena names the arena: removing the link
/// alone would free nothing), or `cache_file` itself if nothing is there.
pub fn real_file(cache_file: &Path) -> PathBuf {
    std::fs::canonicalize(cache_file).unwrap_or_else(|_| cache_file.to_path_buf())
}

/// Removes the arena file at `cache_file` ([`real_file`]: a symlink's
/// target, the link itself is left), its `<cache-file>.lock` and the
/// unfinished `<cache-file>.new-<pid>` files of killed starts, if
/// no sidecar holds the lock and the file starts with the arena's magic
/// word. Under the lock (taken as a sidecar takes it, so no sidecar can
/// start on the file meanwhile) the file is checked again, its LIVE word
/// cleared (processes still mapping it stop reading it: their lookups
/// miss) and it is unlinked. With `dry_run` nothing is changed: the lock is
/// only tested.
///
/// # Errors
/// [`CleanError::InUse`], [`CleanError::NotAnArena`] (an empty file too:
/// nothing proves it is an arena), [`CleanError::Io`].
pub fn clean(cache_file: &Path, dry_run: bool) -> Result<Cleaned, CleanError> {
    let cache_file = &real_file(cache_file);
    if arena_bytes(cache_file)?.is_none() {
        // No arena; a start killed while creating it may have left its
        // unfinished file (removed under the lock, unless a start holds it).
        if !dry_run {
            if let Ok(lock) = ArenaLock::take_as(cache_file, &format!("pid {}, tidecached clean", std::process::id())) {
                startup::remove_dead_starts_files(cache_file);
                lock.remove_lock_file();
            }
        }
        return Ok(Cleaned::Nothing);
    }
    if dry_run {
        if let Some(holder) = ArenaLock::holder(cache_file)? {
            return Err(CleanError::InUse {
                cache_file: cache_file.to_path_buf(),
                holder,
            });
        }
        return Ok(match arena_bytes(cache_file)? {
            Some(bytes) => Cleaned::WouldRemove { bytes },
            None => Cleaned::Nothing,
        });
    }
    let lock = ArenaLock::take_as(cache_file, &format!("pid {}, tidecached clean", std::process::id()))?;
    // Under the lock: unfinished arena files of killed starts go too.
    startup::remove_dead_starts_files(cache_file);
    let Some(bytes) = arena_bytes(cache_file)? else {
        lock.remove_lock_file();
        return Ok(Cleaned::Nothing);
    };
    if let Ok(file) = std::fs::OpenOptions::new().write(true).open(cache_file) {
        retire(&file);
    }
    std::fs::remove_file(cache_file).map_err(|source| CleanError::Io {
        context: format!("removing {}", cache_file.display()),
        source,
    })?;
    lock.remove_lock_file();
    tracing::info!(cache_file = %cache_file.display(), bytes, "arena file removed");
    Ok(Cleaned::Removed { bytes })
}
