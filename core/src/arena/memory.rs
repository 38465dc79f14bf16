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
        /// mode 0600 (0660 with `group`, owned by that group), and maps it
        /// shared, read-write. A file already there is unlinked first:
        /// processes that still map it keep their (retired) copy.
        ///
        /// # Errors
        /// Any I/O error, with the path.
        pub fn create_file(path: &Path, bytes: u64, group: Option<u32>) -> io::Result<Self> {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(with_path(e, path)),
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| with_path(e, path))?;
            restrict(&file, path, group)?;
            file.set_len(bytes).map_err(|e| with_path(e, path))?;
            Self::map_shared(&file, path)
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

        /// Maps the file at `path` read-only (a client).
        ///
        /// # Errors
        /// Any I/O error, with the path.
        pub fn map_read_only(path: &Path) -> io::Result<Self> {
            let file = File::open(path).map_err(|e| with_path(e, path))?;
            // SAFETY: as `map_shared`; this process only loads.
            let map = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| with_path(e, path))?;
            Ok(Memory {
                backing: Backing::ReadOnly(map),
            })
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
