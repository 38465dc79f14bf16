//! The words an arena lives in: a file mapped shared (the sidecar writes,
//! read-write), the same file mapped read-only (clients), or heap memory
//! (tests, and the only kind under loom).
//!
//! A mapping is seen as a slice of `AtomicU64`: every access to arena words
//! is atomic, so the writer and readers in other processes never race in
//! the language's sense. Read-only mappings are only ever loaded from
//! (plain 64-bit loads on every supported platform).

use crate::sync::AtomicU64;

/// Words of an arena.
pub struct Memory {
    backing: Backing,
}

enum Backing {
    Heap(Box<[AtomicU64]>),
    #[cfg(not(loom))]
    Shared(memmap2::MmapMut),
    #[cfg(not(loom))]
    ReadOnly(memmap2::Mmap),
}

impl Memory {
    /// Zeroed heap memory of `bytes` bytes (rounded down to whole words).
    pub fn heap(bytes: u64) -> Self {
        Memory {
            backing: Backing::Heap((0..bytes / 8).map(|_| AtomicU64::new(0)).collect()),
        }
    }

    /// The words.
    pub fn words(&self) -> &[AtomicU64] {
        match &self.backing {
            Backing::Heap(b) => b,
            #[cfg(not(loom))]
            Backing::Shared(m) => as_words(m),
            #[cfg(not(loom))]
            Backing::ReadOnly(m) => as_words(m),
        }
    }

    /// Length in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.words().len() as u64 * 8
    }
}

#[cfg(not(loom))]
fn as_words(bytes: &[u8]) -> &[AtomicU64] {
    // SAFETY: a mapping is page-aligned (so 8-byte aligned) and the slice
    // covers whole words of it; AtomicU64 has the size and alignment of
    // u64; every access through the slice is atomic, and the mapping lives
    // as long as the borrow of `Memory` that produced `bytes`.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<AtomicU64>(), bytes.len() / 8) }
}

#[cfg(not(loom))]
mod file {
    use super::{Backing, Memory};
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::path::Path;

    impl Memory {
        /// Creates (or replaces) the file at `path` with `bytes` zero bytes,
        /// mode 0600 (0640 with `group`, owned by that group), its blocks
        /// allocated (`posix_fallocate`), and maps it shared, read-write.
        ///
        /// The file is made under a temporary name beside `path`
        /// (`<path>.new-<pid>`) and renamed over `path` only once its blocks
        /// are allocated: a file system without room for it (a small
        /// `/dev/shm`) is an error here, never a SIGBUS when a page is first
        /// written, and leaves no file behind; a file already at `path` is
        /// untouched until the rename (processes that still map it keep their
        /// copy).
        ///
        /// # Errors
        /// Any I/O error, with the path; no room is
        /// [`io::ErrorKind::StorageFull`] (from `ENOSPC`).
        pub fn create_file(path: &Path, bytes: u64, group: Option<u32>) -> io::Result<Self> {
            let mut tmp = path.as_os_str().to_owned();
            tmp.push(format!(".new-{}", std::process::id()));
            let tmp = std::path::PathBuf::from(tmp);
            let made = Self::create_at(&tmp, bytes, group).and_then(|(file, memory)| {
                std::fs::rename(&tmp, path)
                    .map(|()| (file, memory))
                    .map_err(|e| with_path(e, path))
            });
            match made {
                Ok((_file, memory)) => Ok(memory),
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e)
                }
            }
        }

        fn create_at(path: &Path, bytes: u64, group: Option<u32>) -> io::Result<(File, Self)> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| with_path(e, path))?;
            restrict(&file, path, group)?;
            allocate(&file, bytes).map_err(|e| with_path(e, path))?;
            let memory = Self::map_shared(&file, path)?;
            Ok((file, memory))
        }

        /// Maps an existing file shared, read-write (a restart re-attaching
        /// its cache file). Permissions are set as by [`Memory::create_file`].
        ///
        /// # Errors
        /// Any I/O error, with the path.
        pub fn open_file(path: &Path, group: Option<u32>) -> io::Result<Self> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| with_path(e, path))?;
            restrict(&file, path, group)?;
            Self::map_shared(&file, path)
        }

        fn map_shared(file: &File, path: &Path) -> io::Result<Self> {
            // SAFETY: the file is the sidecar's own; other processes map it
            // read-only, and every access goes through atomics (see
            // `as_words`), so concurrent changes are not undefined behaviour.
            let map = unsafe { memmap2::MmapOptions::new().map_mut(file) }.map_err(|e| with_path(e, path))?;
            Ok(Memory {
                backing: Backing::Shared(map),
            })
        }

        /// Writes the first `bytes` bytes of a file mapping to the disk
        /// (`msync`), e.g. the header of a new arena, so that a power loss
        /// cannot leave a file whose data pages reached the disk but whose
        /// header did not. Nothing for other memory.
        ///
        /// # Errors
        /// The I/O error of `msync`.
        pub fn persist(&self, bytes: usize) -> io::Result<()> {
            match &self.backing {
                Backing::Shared(m) => m.flush_range(0, bytes.min(m.len())),
                _ => Ok(()),
            }
        }

        /// Maps the file at `path` read-only (a client).
        ///
        /// # Errors
        /// Any I/O error, with the path.
        pub fn map_read_only(path: &Path) -> io::Result<Self> {
            let file = File::open(path).map_err(|e| with_path(e, path))?;
            Self::map_read_only_file(&file).map_err(|e| with_path(e, path))
        }

        /// Maps an open file read-only (a client mapping the descriptor the
        /// sidecar handed it); the mapping outlives `file`.
        ///
        /// # Errors
        /// The I/O error of `mmap` (e.g. `file` is not a regular file).
        pub fn map_read_only_file(file: &File) -> io::Result<Self> {
            // SAFETY: as `map_shared`; this process only loads.
            let map = unsafe { memmap2::MmapOptions::new().map(file) }?;
            Ok(Memory {
                backing: Backing::ReadOnly(map),
            })
        }
    }

    /// Sets the file's length to `bytes` with every block allocated, so no
    /// later write into the mapping can fail for want of room.
    fn allocate(file: &File, bytes: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a valid open descriptor; posix_fallocate only allocates
        // blocks and extends the file.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) } {
            0 => Ok(()),
            // A file system without fallocate (glibc emulates it, others
            // may not): a sparse file, as before.
            libc::EOPNOTSUPP | libc::EINVAL => file.set_len(bytes),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    fn restrict(file: &File, path: &Path, group: Option<u32>) -> io::Result<()> {
        let mode = match group {
            Some(gid) => {
                std::os::unix::fs::fchown(file, None, Some(gid)).map_err(|e| with_path(e, path))?;
                0o640
            }
            None => 0o600,
        };
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| with_path(e, path))
    }

    fn with_path(e: io::Error, path: &Path) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
    }
}
