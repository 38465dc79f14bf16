//! The shared-memory arena: revisions and their index in one mapped file
//! that the sidecar writes and every worker process reads without a lock
//! or a system call.
//!
//! - [`boot`]: the boot id that tells a re-attach after a reboot (a file
//!   on a disk whose pages may be torn) from one within the same boot.
//! - [`layout`]: the file's layout (version [`layout::LAYOUT_VERSION`]),
//!   word by word, and the pure functions writer and readers share.
//! - [`reader`]: the validated, lock-free lookup.
//! - [`slots`]: the database slots: assignment, identity, generation,
//!   leases, release and recovery ([`Slot`] is what a holder keeps).
//! - [`writer`]: [`ArenaWriter`], the single writer: databases, records,
//!   chains, S3-FIFO eviction, recovery after a restart.
//! - [`cache`]: [`ArenaCache`], one database's revisions in the arena
//!   under the MVCC rules, and [`SharedArena`], the arena they share.
//! - [`memory`]: [`Memory`], the words: a mapped file (read-write for the
//!   sidecar, read-only for clients) or, for tests and loom, the heap.

pub mod boot;
pub mod cache;
pub mod layout;
pub mod memory;
pub mod reader;
pub mod slots;
pub mod writer;

pub use cache::{ArenaCache, SharedArena};
pub use layout::{Geometry, LayoutError};
pub use memory::Memory;
pub use reader::{Found, Miss};
pub use slots::Slot;
pub use writer::{ArenaStats, ArenaWriter, Dropped, NotWritten, Policy, RecordInfo, Recovered};
