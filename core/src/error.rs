//! The one error type of tidecache-core.

use crate::revision::{Oid, Tid};
use crate::view::ViewId;

/// Errors raised by the MVCC rules of the cache. Every one of them means a
/// request was refused and nothing was changed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CoreError {
    /// An invalidation report starts after the horizon: the changes in
    /// `(horizon, from]` are unknown, so the report is refused (invariant 4).
    #[error("invalidation report from {from} leaves a gap after the horizon {horizon}")]
    Gap {
        /// Start (exclusive) of the refused report.
        from: Tid,
        /// The cache's horizon when the report arrived.
        horizon: Tid,
    },
    /// A report whose interval is empty or whose changes fall outside it.
    #[error("malformed invalidation report ({from}, {to}]: {reason}")]
    BadReport {
        /// Start (exclusive) of the report.
        from: Tid,
        /// End (inclusive) of the report.
        to: Tid,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A store whose interval or view contradicts itself.
    #[error("malformed store of {oid} serial {serial}: {reason}")]
    BadStore {
        /// The stored oid.
        oid: Oid,
        /// The stored serial.
        serial: Tid,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A view id that is not registered (released already, or never).
    #[error("view {0:?} is not registered")]
    UnknownView(ViewId),
}
