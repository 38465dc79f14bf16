//! tidecache-core: the MVCC rules and the snapshot cache of tidecache.
//!
//! - [`revision`]: [`Oid`], [`Tid`], validity intervals.
//! - [`invalidation`]: the invalidation log, its horizon and contiguous
//!   reports (invariants 3 and 4 of docs/invariants.md).
//! - [`view`]: registered views and the low-water mark (invariant 5).
//! - [`process_views`]: a client process's views of one database and the
//!   one minimum it registers with the sidecar (invariant 5).
//! - [`rules`]: the store check against the log and the closing rule,
//!   applied by both caches (invariants 3 and 4).
//! - [`snapshot`]: [`SnapshotCache`], Arc-shared immutable states with a
//!   lock-free read path (invariants 1, 2, 3, 5, 6).
//! - [`eviction`]: [`SizeBound`], the byte budget caches share (moka).
//! - [`arena`]: the shared-memory arena the sidecar writes and every
//!   worker process reads without a lock or a system call (validated by
//!   segment generations, a seqlock, and CRC-32s).
//! - [`crash`]: named crash points of the arena writer, inert unless a test
//!   arms one (crash-consistency tests).
//! - [`database`]: one named database: cache, views, attach and resync
//!   (invariant 7).
//!
//! Concurrency primitives come from the `sync` module, which swaps in
//! loom's under `cfg(loom)`; the `tidecache-loom-tests` crate model-checks
//! the protocols built on them.
#![warn(missing_docs)]

pub mod arena;
pub mod crash;
pub mod database;
pub mod error;
#[cfg(feature = "snapshot")]
pub mod eviction;
#[cfg(feature = "snapshot")]
mod index;
pub mod invalidation;
pub mod process_views;
pub mod revision;
pub mod rules;
#[cfg(feature = "snapshot")]
pub mod snapshot;
mod sync;
pub mod view;

#[cfg(feature = "snapshot")]
pub use database::Database;
#[cfg(not(loom))]
pub use database::SharedDatabase;
pub use database::{AttachOutcome, DatabaseOf, DatabaseStats, Proof, Revisions, OPEN_SAMPLE};
pub use error::CoreError;
#[cfg(feature = "snapshot")]
pub use eviction::SizeBound;
pub use invalidation::InvalidationLog;
pub use process_views::{Change, ProcessViews};
pub use revision::{Oid, StateWeight, Tid, Validity};
pub use rules::{CacheStats, Refusal, StoreOutcome};
#[cfg(feature = "snapshot")]
pub use snapshot::{Hit, SnapshotCache, ENTRY_OVERHEAD};
pub use view::{ViewId, ViewRegistry};
