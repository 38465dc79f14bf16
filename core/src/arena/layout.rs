//! The arena file's layout, version 2: where each word lives, and the pure
//! functions (packing, hashing, checksums, validation) both the writer and
//! the readers use. docs/architecture.md has the same layout as a table.
//!
//! All numbers are 64-bit words in host byte order (the file is a cache of
//! the host it lives on, never copied between machines). Offsets are in
//! words from the start of the file unless said otherwise.
//!
//! ```text
//! word 0          header (HEADER_WORDS words, one 4 KiB page)
//! db_word         database table: db_slots x DB_SLOT_WORDS
//! bucket_word     bucket array: bucket_count pointers
//! data_word       segments: segment_count x segment_words
//! ```
//!
//! A **pointer** (in a bucket or a record's `next`) is
//! `segment generation << 32 | word offset from data_word`; 0 is null.
//! A reader follows it only if the segment's generation word still holds
//! that generation: a pointer into a segment that was recycled since is
//! stale and reads as a miss.

use crate::sync::{AtomicU64, Ordering};

/// `b"TIDECACH"` as a little-endian word.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TIDECACH");

/// Layout version; a file with another version is discarded. Version 2
/// added [`header::BOOT_ID`] and the slot identity in
/// [`db_slot::STATE`].
pub const LAYOUT_VERSION: u64 = 2;

/// Words in the header (4096 bytes).
pub const HEADER_WORDS: usize = 512;

/// Header word indexes.
pub mod header {
    /// [`super::MAGIC`].
    pub const MAGIC: usize = 0;
    /// [`super::LAYOUT_VERSION`].
    pub const VERSION: usize = 1;
    /// Length of the file in bytes.
    pub const FILE_BYTES: usize = 2;
    /// Number of database slots.
    pub const DB_SLOTS: usize = 3;
    /// Number of buckets (a power of two).
    pub const BUCKETS: usize = 4;
    /// Number of segments.
    pub const SEGMENTS: usize = 5;
    /// Words per segment.
    pub const SEGMENT_WORDS: usize = 6;
    /// First word of the database table.
    pub const DB_WORD: usize = 7;
    /// First word of the bucket array.
    pub const BUCKET_WORD: usize = 8;
    /// First word of segment 0.
    pub const DATA_WORD: usize = 9;
    /// CRC-32 of words 0..=9 (as little-endian bytes), in the low 32 bits.
    pub const CRC: usize = 10;
    /// Random number chosen by each sidecar run that serves the file; a
    /// client checks it against the one the sidecar's Hello names.
    pub const INCARNATION: usize = 11;
    /// 1 while a sidecar serves the file; 0 before it is built and once it
    /// is retired (readers miss).
    pub const LIVE: usize = 12;
    /// Two words (13 and 14): the boot id ([`crate::arena::boot`]) of the
    /// host when a sidecar last created or re-attached the file. Another
    /// boot id on re-attach means the file may have outlived a power loss
    /// with its pages torn: open revisions and horizons are dropped and
    /// every closed record is verified before the file serves.
    pub const BOOT_ID: usize = 13;
    /// Words covered by [`CRC`].
    pub const CHECKED: usize = 10;
}

/// Words per database slot.
pub const DB_SLOT_WORDS: usize = 32;

/// Database slot word indexes.
pub mod db_slot {
    /// `identity << 16 | 1 << 8 | generation` while in use, `generation`
    /// when free (see [`crate::arena::slots`]). The generation (8 bits) is
    /// part of every record key of the database: a flush bumps it. The
    /// identity (48 random bits, not 0) is chosen each time the slot is
    /// given to a key; readers check it against the one they were given
    /// (version 2; version 1 had no identity).
    pub const STATE: usize = 0;
    /// The database's horizon (tid), 0 before its log starts.
    pub const HORIZON: usize = 1;
    /// Length in bytes of the database key.
    pub const KEY_LEN: usize = 2;
    /// CRC-32 of words STATE (identity included), HORIZON, KEY_LEN and the
    /// key bytes.
    pub const CRC: usize = 3;
    /// First word of the key (at most [`super::MAX_KEY_BYTES`] bytes).
    pub const KEY: usize = 4;
}

/// Longest database key the table holds; longer keys are kept by their
/// first bytes and the CRC-32 of the whole (`crc:XXXXXXXX:` prefix).
pub const MAX_KEY_BYTES: usize = (DB_SLOT_WORDS - db_slot::KEY) * 8;

/// Words of a segment's header.
pub const SEGMENT_HEADER_WORDS: usize = 4;

/// Segment header word indexes.
pub mod segment {
    /// Generation: odd while free or being recycled, even while in use.
    pub const GENERATION: usize = 0;
    /// `order << 8 | ring` (ring 0 free, 1 small, 2 main; order grows with
    /// every segment taken into use, so a restart can rebuild the rings).
    pub const META: usize = 1;
    /// Words in use, header included.
    pub const FILL: usize = 2;
}

/// Ring of a segment (see [`segment::META`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// Not in use.
    Free = 0,
    /// New revisions (S3-FIFO's small queue).
    Small = 1,
    /// Revisions read again, or stored again soon after eviction.
    Main = 2,
}

/// Words of a record's header.
pub const RECORD_HEADER_WORDS: usize = 5;

/// Record word indexes (from the record's first word).
pub mod record {
    /// Pointer to the next record of the same bucket.
    pub const NEXT: usize = 0;
    /// [`super::key`]: database slot, generation, oid.
    pub const KEY: usize = 1;
    /// Serial (tid that wrote the revision).
    pub const SERIAL: usize = 2;
    /// End of validity, [`super::OPEN`] while current.
    pub const END: usize = 3;
    /// `crc << 32 | flags << 24 | length`: state length in bytes (24 bits),
    /// writer-only flags (bits 24..32: read-frequency 0..3 in bits 24..26,
    /// unlinked in bit 31) that no reader looks at, and the CRC-32 of key,
    /// serial, end, length and state.
    pub const LENGTH: usize = 4;
}

/// `end` of an open (current) revision.
pub const OPEN: u64 = u64::MAX;

/// Largest state a record holds (16 MiB - 1; also bounded by the segment).
pub const MAX_STATE_BYTES: usize = (1 << 24) - 1;

/// Largest oid a record holds (48 bits); larger oids are never cached.
pub const MAX_OID: u64 = (1 << 48) - 1;

/// Mask of the length bits in [`record::LENGTH`].
pub const LENGTH_MASK: u64 = (1 << 24) - 1;

/// Flag bits of [`record::LENGTH`] (writer-only).
pub const FLAGS_MASK: u64 = 0xff << 24;

/// Unlinked flag in [`record::LENGTH`].
pub const UNLINKED: u64 = 1 << 31;

/// Longest chain a reader or the writer walks; past it a lookup misses.
pub const MAX_CHAIN: usize = 64;

/// Packs a record key: database slot (8 bits), generation (8 bits), oid (48
/// bits). `None` for an oid over [`MAX_OID`].
pub fn key(slot: u8, generation: u8, oid: u64) -> Option<u64> {
    (oid <= MAX_OID).then(|| u64::from(slot) << 56 | u64::from(generation) << 48 | oid)
}

/// The oid in a record key.
pub fn key_oid(key: u64) -> u64 {
    key & MAX_OID
}

/// The database slot in a record key.
pub fn key_slot(key: u64) -> u8 {
    (key >> 56) as u8
}

/// The generation in a record key.
pub fn key_generation(key: u64) -> u8 {
    (key >> 48) as u8
}

/// The bucket of a key among `buckets` (a power of two): Fibonacci hashing.
pub fn bucket_of(key: u64, buckets: u64) -> u64 {
    key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - buckets.trailing_zeros())
}

/// A pointer: segment generation and word offset from `data_word`.
pub fn pointer(generation: u64, offset: u64) -> u64 {
    (generation & 0xffff_ffff) << 32 | offset
}

/// Generation and offset of a pointer.
pub fn unpoint(p: u64) -> (u64, u64) {
    (p >> 32, p & 0xffff_ffff)
}

/// Words a record with `len` state bytes occupies.
pub fn record_words(len: usize) -> usize {
    RECORD_HEADER_WORDS + len.div_ceil(8)
}

/// CRC-32 of a record: key, serial, end, length and state.
pub fn record_crc(key: u64, serial: u64, end: u64, state: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&key.to_le_bytes());
    h.update(&serial.to_le_bytes());
    h.update(&end.to_le_bytes());
    h.update(&(state.len() as u64).to_le_bytes());
    h.update(state);
    h.finalize()
}

/// CRC-32 of words given as little-endian bytes.
pub fn words_crc(words: impl IntoIterator<Item = u64>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for w in words {
        h.update(&w.to_le_bytes());
    }
    h.finalize()
}

/// Sizes of every part of an arena, derived from its file size alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// File length in bytes.
    pub file_bytes: u64,
    /// Database slots.
    pub db_slots: u64,
    /// Buckets (a power of two).
    pub buckets: u64,
    /// Segments.
    pub segments: u64,
    /// Words per segment.
    pub segment_words: u64,
    /// First word of the database table.
    pub db_word: u64,
    /// First word of the bucket array.
    pub bucket_word: u64,
    /// First word of segment 0.
    pub data_word: u64,
}

/// Smallest arena: room for the header, the table and 8 segments of 16 KiB.
pub const MIN_FILE_BYTES: u64 = 1 << 20;

/// Smallest and largest segment, bytes.
const MIN_SEGMENT_BYTES: u64 = 16 << 10;
const MAX_SEGMENT_BYTES: u64 = 4 << 20;

/// Why an arena cannot be laid out or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The requested size is too small or too large.
    #[error("arena of {bytes} bytes: must be between {min} bytes and 32 GiB")]
    Size {
        /// Requested bytes.
        bytes: u64,
        /// Minimum.
        min: u64,
    },
    /// The file does not start with the magic word.
    #[error("not a tidecache arena (bad magic)")]
    Magic,
    /// Another layout version.
    #[error("layout version {found}, this build reads version {expected}")]
    Version {
        /// Version in the file.
        found: u64,
        /// [`LAYOUT_VERSION`].
        expected: u64,
    },
    /// The header's checksum does not match.
    #[error("header checksum mismatch (the file is damaged)")]
    HeaderChecksum,
    /// The file's length differs from its header's.
    #[error("file is {actual} bytes, its header says {expected} (truncated or extended)")]
    Length {
        /// Bytes on disk.
        actual: u64,
        /// Bytes in the header.
        expected: u64,
    },
    /// The header's geometry is not the one its size implies.
    #[error("header geometry does not match its size: {0}")]
    Geometry(&'static str),
}

impl Geometry {
    /// The layout of an arena of `file_bytes` bytes (rounded down to a
    /// multiple of 4 KiB) with `db_slots` database slots (at most 255).
    ///
    /// # Errors
    /// [`LayoutError::Size`] under [`MIN_FILE_BYTES`] or over 32 GiB.
    pub fn for_size(file_bytes: u64, db_slots: u64) -> Result<Self, LayoutError> {
        let file_bytes = file_bytes & !4095;
        if !(MIN_FILE_BYTES..=(32 << 30)).contains(&file_bytes) {
            return Err(LayoutError::Size {
                bytes: file_bytes,
                min: MIN_FILE_BYTES,
            });
        }
        let db_slots = db_slots.clamp(1, 255);
        let words = file_bytes / 8;
        let db_word = HEADER_WORDS as u64;
        let bucket_word = db_word + db_slots * DB_SLOT_WORDS as u64;
        // One bucket per 1 to 2 KiB of file (its KiB rounded up to a power
        // of two, halved): 1/256 to 1/128 of the file.
        let buckets = (file_bytes / 1024).next_power_of_two().max(1024) / 2;
        let data_word = bucket_word + buckets;
        let segment_bytes = (file_bytes / 64).clamp(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
        // A power of two, so segments never straddle odd offsets.
        let segment_bytes = 1u64 << (63 - segment_bytes.leading_zeros());
        let segment_words = segment_bytes / 8;
        let segments = words.saturating_sub(data_word) / segment_words;
        if segments < 8 {
            return Err(LayoutError::Size {
                bytes: file_bytes,
                min: MIN_FILE_BYTES,
            });
        }
        Ok(Geometry {
            file_bytes,
            db_slots,
            buckets,
            segments,
            segment_words,
            db_word,
            bucket_word,
            data_word,
        })
    }

    /// A small arena of `segments` segments of `segment_words` words, with 4
    /// database slots and 64 buckets: for tests and loom models that want
    /// eviction after a handful of records. Not a layout [`Geometry::read`]
    /// accepts (sizes are derived from the file size there).
    pub fn small(segments: u64, segment_words: u64) -> Self {
        let db_word = HEADER_WORDS as u64;
        let bucket_word = db_word + 4 * DB_SLOT_WORDS as u64;
        let data_word = bucket_word + 64;
        Geometry {
            file_bytes: (data_word + segments * segment_words) * 8,
            db_slots: 4,
            buckets: 64,
            segments,
            segment_words,
            db_word,
            bucket_word,
            data_word,
        }
    }

    /// The header words (0..[`header::CHECKED`]) and their CRC word.
    pub fn header_words(&self) -> [u64; header::CHECKED + 1] {
        let mut w = [0u64; header::CHECKED + 1];
        w[header::MAGIC] = MAGIC;
        w[header::VERSION] = LAYOUT_VERSION;
        w[header::FILE_BYTES] = self.file_bytes;
        w[header::DB_SLOTS] = self.db_slots;
        w[header::BUCKETS] = self.buckets;
        w[header::SEGMENTS] = self.segments;
        w[header::SEGMENT_WORDS] = self.segment_words;
        w[header::DB_WORD] = self.db_word;
        w[header::BUCKET_WORD] = self.bucket_word;
        w[header::DATA_WORD] = self.data_word;
        w[header::CRC] = u64::from(words_crc(w[..header::CHECKED].iter().copied()));
        w
    }

    /// Reads and checks the header of an arena of `actual_bytes` bytes.
    ///
    /// # Errors
    /// A [`LayoutError`] naming what is wrong: magic, version, checksum,
    /// length or geometry.
    pub fn read(words: &[AtomicU64], actual_bytes: u64) -> Result<Self, LayoutError> {
        if words.len() < HEADER_WORDS {
            return Err(LayoutError::Length {
                actual: actual_bytes,
                expected: MIN_FILE_BYTES,
            });
        }
        let w: Vec<u64> = words[..=header::CRC]
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .collect();
        if w[header::MAGIC] != MAGIC {
            return Err(LayoutError::Magic);
        }
        if w[header::VERSION] != LAYOUT_VERSION {
            return Err(LayoutError::Version {
                found: w[header::VERSION],
                expected: LAYOUT_VERSION,
            });
        }
        if w[header::CRC] != u64::from(words_crc(w[..header::CHECKED].iter().copied())) {
            return Err(LayoutError::HeaderChecksum);
        }
        if w[header::FILE_BYTES] != actual_bytes {
            return Err(LayoutError::Length {
                actual: actual_bytes,
                expected: w[header::FILE_BYTES],
            });
        }
        let g = Geometry::for_size(w[header::FILE_BYTES], w[header::DB_SLOTS])
            .map_err(|_| LayoutError::Geometry("size out of range"))?;
        if g.header_words()[..] != w[..] {
            return Err(LayoutError::Geometry("derived sizes differ"));
        }
        Ok(g)
    }

    /// Words in the whole file.
    pub fn words(&self) -> u64 {
        self.file_bytes / 8
    }

    /// First word of database slot `slot`.
    pub fn db_slot_word(&self, slot: u8) -> usize {
        (self.db_word + u64::from(slot) * DB_SLOT_WORDS as u64) as usize
    }

    /// Word of the bucket for `key`.
    pub fn bucket_word_of(&self, key: u64) -> usize {
        (self.bucket_word + bucket_of(key, self.buckets)) as usize
    }

    /// First word of segment `seg`.
    pub fn segment_word(&self, seg: u64) -> usize {
        (self.data_word + seg * self.segment_words) as usize
    }

    /// Largest state a record in this arena can hold, bytes.
    pub fn max_state_bytes(&self) -> usize {
        let payload = (self.segment_words as usize - SEGMENT_HEADER_WORDS - RECORD_HEADER_WORDS) * 8;
        payload.min(MAX_STATE_BYTES)
    }

    /// The segment holding data offset `offset` and whether a record header
    /// starting there lies within that segment's record area.
    pub fn locate(&self, offset: u64) -> Option<u64> {
        let seg = offset / self.segment_words;
        let within = offset % self.segment_words;
        (seg < self.segments
            && within >= SEGMENT_HEADER_WORDS as u64
            && within + RECORD_HEADER_WORDS as u64 <= self.segment_words)
            .then_some(seg)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn geometry_fits_the_file_and_is_checked_on_read() {
        for mb in [1u64, 2, 16, 256, 1024] {
            let g = Geometry::for_size(mb << 20, 64).unwrap();
            assert!(g.data_word + g.segments * g.segment_words <= g.words(), "{mb} MiB");
            assert!(g.segments >= 8);
            assert!(g.buckets.is_power_of_two());
            let words: Vec<AtomicU64> = (0..HEADER_WORDS).map(|_| AtomicU64::new(0)).collect();
            for (i, w) in g.header_words().iter().enumerate() {
                words[i].store(*w, Ordering::Relaxed);
            }
            assert_eq!(Geometry::read(&words, g.file_bytes), Ok(g));
            assert!(matches!(
                Geometry::read(&words, g.file_bytes - 4096),
                Err(LayoutError::Length { .. })
            ));
            words[header::SEGMENTS].store(g.segments + 1, Ordering::Relaxed);
            assert_eq!(Geometry::read(&words, g.file_bytes), Err(LayoutError::HeaderChecksum));
            words[header::VERSION].store(LAYOUT_VERSION + 5, Ordering::Relaxed);
            assert!(matches!(
                Geometry::read(&words, g.file_bytes),
                Err(LayoutError::Version { found, .. }) if found == LAYOUT_VERSION + 5
            ));
            words[header::MAGIC].store(0, Ordering::Relaxed);
            assert_eq!(Geometry::read(&words, g.file_bytes), Err(LayoutError::Magic));
        }
        assert!(Geometry::for_size(512 << 10, 64).is_err());
    }

    #[test]
    fn keys_and_pointers_round_trip() {
        let k = key(3, 250, MAX_OID).unwrap();
        assert_eq!((key_slot(k), key_generation(k), key_oid(k)), (3, 250, MAX_OID));
        assert_eq!(key(3, 0, MAX_OID + 1), None);
        assert_eq!(unpoint(pointer(0x1_0000_0007, 42)), (7, 42));
        for b in [1024u64, 1 << 20] {
            assert!((0..10_000u64).all(|k| bucket_of(k, b) < b));
        }
    }
}
