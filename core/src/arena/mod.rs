//! Building blocks of a cache kept in memory that other processes read
//! without locks: [`record`], a revision stored in atomic words and guarded
//! by a sequence word, so that a reader copying it while the single writer
//! reuses its space gets either a whole record or nothing.

pub mod record;

pub use record::{Record, RecordHeader, RecordWords, HEADER_WORDS};
